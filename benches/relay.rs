//! Side-by-side relay benchmark on loopback with 500 subscribers, all in one run:
//!
//! - `naive`: one thread, std sockets, one `send_to` per subscriber, single verification: the
//!   baseline every other row is compared with;
//! - `portable ×1`, `portable ×N`: the engine on `recvmmsg`/`sendmmsg`, one worker and one per
//!   core;
//! - `uring ×1`, `uring ×N`, `uring zero-copy ×N`: the engine on io_uring;
//! - `raw sendmmsg`: no relay at all, one thread handing copies to the kernel as fast as it can,
//!   for reference: the kernel's limit on this machine.
//!
//! Each relay row runs the load generator's search for the highest rate with delivered ratio
//! ≥ 0.999, then a run at 80% of it for latency and CPU. CPU is the relay threads' own time
//! (from /proc), per Gbit/s of output. Run: `cargo bench --bench relay`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clubcast::backend::{PortableSocket, SendBatch};
use clubcast::engine::{worker_count, Backend, EngineConfig, PollMode, RelayEngine, ZeroCopy};
use clubcast::loadgen::{run_load, LoadConfig, LoadReport};
use clubcast::metrics::RelayMetrics;
use clubcast::relay::{Inbound, RelayConfig, RelayCore};
use clubcast::time::MonotonicClock;
use clubcast::wire::{Piece, MAX_DATAGRAM};

const SUBSCRIBERS: usize = 500;
const PAYLOAD: usize = 1128;
const TRIAL: Duration = Duration::from_millis(1500);
const SUSTAINED: f64 = 0.999;
/// Every relay row gets the same socket buffers: large buffers would hide overload in a queue
/// for the length of a trial and overstate the sustainable rate.
const RELAY_SOCKET_BUFFER: usize = 1 << 20;

/// CPU seconds used so far by this process's threads whose name starts with `prefix`.
fn thread_cpu(prefix: &str) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            if !comm.trim().starts_with(prefix) {
                return None;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .sum()
}

fn load(relay: SocketAddr, rate: u64, duration: Duration) -> LoadConfig {
    LoadConfig {
        relay,
        subscribers: SUBSCRIBERS,
        rate_pps: rate,
        payload: PAYLOAD,
        duration,
        receiver_threads: 1,
        progress: false,
        key_seed: None,
        forge_every: 0,
    }
}

/// The highest sustained rate (pieces/s in) and the report at 80% of it, with CPU per Gbit.
fn measure(relay: SocketAddr, threads: &str) -> (u64, LoadReport, f64) {
    let ok = |rate| run_load(&load(relay, rate, TRIAL)).unwrap().delivered_ratio >= SUSTAINED;
    let mut lo = 0;
    let mut rate = 100;
    while rate <= 1_000_000 && ok(rate) {
        lo = rate;
        rate *= 2;
    }
    let mut hi = rate;
    while lo > 0 && hi - lo > lo / 10 {
        let mid = (lo + hi) / 2;
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let at = (lo * 8 / 10).max(1);
    let cpu0 = thread_cpu(threads);
    let report = run_load(&load(relay, at, Duration::from_secs(2))).unwrap();
    let cpu = thread_cpu(threads) - cpu0;
    let cpu_per_gbit = cpu / report.elapsed.as_secs_f64() / report.gbps_out.max(1e-9);
    (lo, report, cpu_per_gbit)
}

/// The naive relay: same protocol core, one thread, one send_to per subscriber.
fn naive_relay(stop: Arc<AtomicBool>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sock = socket2::SockRef::from(&socket);
    sock.set_recv_buffer_size(RELAY_SOCKET_BUFFER).unwrap();
    sock.set_send_buffer_size(RELAY_SOCKET_BUFFER).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    thread::Builder::new()
        .name("naive-relay".into())
        .spawn(move || {
            if let Some(first) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
                core_affinity::set_for_current(first);
            }
            let clock = MonotonicClock::new();
            let mut core = RelayCore::new(RelayConfig::default());
            let mut buf = vec![0u8; 2048];
            let mut reply = vec![0u8; MAX_DATAGRAM];
            while !stop.load(Ordering::Relaxed) {
                core.handle_timeout(clock.now());
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                match core.handle(clock.now(), from, &buf[..n], &mut reply) {
                    Inbound::Reply(r) => {
                        let _ = socket.send_to(&reply[..r], from);
                    }
                    Inbound::Verify(p) => {
                        let ok =
                            Piece::parse(&buf[..n]).is_ok_and(|pc| p.key.verify_piece(&pc).is_ok());
                        if core.admit(&p, ok).is_ok() {
                            for s in core.subscribers(&p.channel) {
                                let _ = socket.send_to(&buf[..n], s);
                            }
                        }
                    }
                    _ => {}
                }
            }
        })
        .unwrap();
    addr
}

/// Copies per second one thread hands to the kernel with sendmmsg to 500 sockets, no relay.
fn raw_sendmmsg() -> f64 {
    let receivers: Vec<PortableSocket> = (0..SUBSCRIBERS)
        .map(|_| PortableSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap())
        .collect();
    let dests: Vec<SocketAddr> = receivers.iter().map(|r| r.local_addr().unwrap()).collect();
    let sender = PortableSocket::bind("127.0.0.1:0".parse().unwrap(), 8 << 20).unwrap();
    let piece = vec![0x47u8; PAYLOAD + 96];
    let mut batch = SendBatch::new();
    let start = Instant::now();
    let mut copies = 0usize;
    while start.elapsed() < Duration::from_secs(2) {
        copies += sender.send_fanout(&piece, &dests, &mut batch).sent;
    }
    copies as f64 / start.elapsed().as_secs_f64()
}

struct Row {
    name: String,
    max_in: u64,
    report: LoadReport,
    cpu_per_gbit: f64,
}

fn main() {
    let cores = worker_count(0);
    // Relay threads start at the first core; the load generator (publisher and receivers,
    // which inherit this thread's affinity) takes the last, so a one-worker relay and the load
    // generator do not share a core.
    if let Some(last) = core_affinity::get_core_ids().and_then(|c| c.last().copied()) {
        core_affinity::set_for_current(last);
    }
    println!("clubcast relay bench: loopback, {SUBSCRIBERS} subscribers, {PAYLOAD}-byte payloads, {cores} cores");
    let mut rows = Vec::new();

    let stop = Arc::new(AtomicBool::new(false));
    let naive = naive_relay(Arc::clone(&stop));
    let (max_in, report, cpu) = measure(naive, "naive-relay");
    stop.store(true, Ordering::Relaxed);
    rows.push(Row {
        name: "naive (send_to per copy)".into(),
        max_in,
        report,
        cpu_per_gbit: cpu,
    });

    let uring = Backend::Uring {
        zerocopy: ZeroCopy::Off,
    };
    let uring_zc = Backend::Uring {
        zerocopy: ZeroCopy::On,
    };
    let mut engines = vec![
        (Backend::Portable, 1),
        (Backend::Portable, cores),
        (uring, 1),
        (uring, cores),
    ];
    engines.push((uring_zc, cores));
    engines.dedup();
    for (backend, workers) in engines {
        let config = EngineConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers,
            pin: true,
            poll: PollMode::Adaptive,
            socket_buffer: RELAY_SOCKET_BUFFER,
            backend,
            ..EngineConfig::default()
        };
        let relay = RelayEngine::bind(&config, RelayMetrics::new(backend.name(), workers))
            .unwrap()
            .spawn()
            .unwrap();
        let (max_in, report, cpu) = measure(relay.addr(), "relay-worker");
        relay.stop().unwrap();
        let zc = if backend == uring_zc {
            " zero-copy"
        } else {
            ""
        };
        rows.push(Row {
            name: format!("{}{zc} ×{workers}", backend.name()),
            max_in,
            report,
            cpu_per_gbit: cpu,
        });
    }
    let raw = raw_sendmmsg();

    let base = rows[0].max_in.max(1) as f64 * SUBSCRIBERS as f64;
    println!();
    println!(
        "  {:<26} {:>12} {:>10} {:>10} {:>11} {:>13} {:>9}",
        "row", "out pieces/s", "Gbit/s", "p99 µs", "p99.9 µs", "CPU s/Gbit", "vs naive"
    );
    for r in &rows {
        let out = r.max_in as f64 * SUBSCRIBERS as f64;
        let gbps = out * (PAYLOAD + 96) as f64 * 8.0 / 1e9;
        let h = &r.report.latency_us;
        println!(
            "  {:<26} {:>12.0} {:>10.3} {:>10} {:>11} {:>13.2} {:>8.2}x",
            r.name,
            out,
            gbps,
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            r.cpu_per_gbit,
            out / base
        );
    }
    println!(
        "  {:<26} {:>12.0} {:>10.3} {:>10} {:>11} {:>13} {:>8.2}x",
        "raw sendmmsg (no relay)",
        raw,
        raw * (PAYLOAD + 96) as f64 * 8.0 / 1e9,
        "-",
        "-",
        "-",
        raw / base
    );
    println!();
    println!(
        "  out pieces/s: highest rate with delivered ≥ {SUSTAINED} × {SUBSCRIBERS} subscribers;"
    );
    println!("  latency (publisher send → subscriber receive) and CPU at 80% of that rate.");
    println!("  Relay threads start at core 0, the load generator runs on the last core.");
}
