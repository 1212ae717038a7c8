//! The relay over a real (virtual) NIC, side by side in one run: portable, uring and xdp (copy
//! and multi-buffer sends) on the same veth pair between two network namespaces
//! (`scripts/xdp-veth run`), one worker each, pinned to the first core; the load generator runs
//! in the other namespace on the last core.
//!
//! Every row gets the same offered load; the figure compared is output per core: copies
//! delivered per second of relay CPU time (user + system, which includes the kernel's work of
//! sending on the relay's behalf). uring is the baseline. Needs root (namespaces, XDP).
//! Run: `cargo bench --bench relay_veth`.

use std::process::Command;

const SUBSCRIBERS: u64 = 200;
const RATE: u64 = 1000;
const SECONDS: u64 = 5;

struct Row {
    name: &'static str,
    backend: String,
    delivered: f64,
    out_pps: f64,
    cpu_s: f64,
    p99_us: u64,
}

fn run(name: &'static str, relay_args: &[&str]) -> Row {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/xdp-veth");
    let subscribers = SUBSCRIBERS.to_string();
    let rate = RATE.to_string();
    let duration = format!("{SECONDS}s");
    let out = Command::new(script)
        .args(["--bin", env!("CARGO_BIN_EXE_clubcast"), "run", "--"])
        .args(relay_args)
        .args(["--", "--subscribers", &subscribers, "--rate", &rate])
        .args(["--duration", &duration, "--json"])
        .output()
        .expect("cannot run scripts/xdp-veth");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: scripts/xdp-veth failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("no loadgen JSON");
    let field = |key: &str| -> f64 {
        let at = json.find(&format!("\"{key}\":")).expect(key) + key.len() + 3;
        json[at..]
            .split([',', '}'])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let cpu_s = text
        .lines()
        .find_map(|l| l.strip_prefix("relay_cpu_seconds "))
        .expect("no relay CPU line")
        .trim()
        .parse()
        .unwrap();
    let backend = text
        .lines()
        .find_map(|l| l.strip_prefix("backend "))
        .unwrap_or("?")
        .to_string();
    Row {
        name,
        backend,
        delivered: field("delivered_ratio"),
        out_pps: field("pps_out"),
        cpu_s,
        p99_us: field("p99") as u64,
    }
}

fn main() {
    println!(
        "clubcast relay over veth: {SUBSCRIBERS} subscribers × {RATE} pieces/s for {SECONDS} s \
         (offered {} copies/s), 1128-byte payloads, one relay worker",
        SUBSCRIBERS * RATE
    );
    let pin = ["--workers", "1", "--poll", "block"];
    let rows = [
        run("portable", &[&["--backend", "portable"][..], &pin].concat()),
        run("uring", &[&["--backend", "uring"][..], &pin].concat()),
        run(
            "xdp copy",
            &[
                &[
                    "--backend",
                    "xdp",
                    "--interface",
                    "$RELAY_IF",
                    "--xdp-tx",
                    "copy",
                ][..],
                &pin,
            ]
            .concat(),
        ),
        run(
            "xdp multi-buffer",
            &[
                &[
                    "--backend",
                    "xdp",
                    "--interface",
                    "$RELAY_IF",
                    "--xdp-tx",
                    "multi-buffer",
                ][..],
                &pin,
            ]
            .concat(),
        ),
    ];
    let per_core = |r: &Row| r.out_pps * SECONDS as f64 / r.cpu_s.max(0.01);
    let base = per_core(&rows[1]);
    println!();
    println!(
        "  {:<18} {:>10} {:>13} {:>11} {:>18} {:>9} {:>9}",
        "row",
        "delivered",
        "out pieces/s",
        "relay CPU s",
        "pieces/s per core",
        "p99 µs",
        "vs uring"
    );
    for r in &rows {
        println!(
            "  {:<18} {:>10.4} {:>13.0} {:>11.2} {:>18.0} {:>9} {:>8.2}x",
            r.name,
            r.delivered,
            r.out_pps,
            r.cpu_s,
            per_core(r),
            r.p99_us,
            per_core(r) / base
        );
    }
    println!();
    for r in &rows {
        println!("  {:<18} backend {}", r.name, r.backend);
    }
    println!("  pieces/s per core: copies delivered ÷ relay CPU seconds (user + system).");
}
