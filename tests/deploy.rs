//! The files in deploy/ against the real tools and the real relay: a Prometheus server scrapes
//! a relay under load with the shipped scrape config, promtool checks the config and rules,
//! every metric the dashboard and the alerts name is one the relay exports, the systemd unit
//! verifies, and the shipped relay configs load.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clubcast::metrics::text::parse_samples;
use common::{clubcast, http_request, print_config, require_tool, Proc, Relay};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// A relay with a publisher and subscribers pushing pieces through it.
fn relay_under_load() -> (Relay, Proc) {
    let relay = Relay::start(&[]);
    let mut load = clubcast();
    load.args(["loadgen", "--relay", &relay.addr.to_string()])
        .args([
            "--subscribers",
            "20",
            "--rate",
            "1000",
            "--duration",
            "120s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let load = Proc::spawn("loadgen", &mut load);
    relay.wait_metric(
        "clubcast_relay_pieces_forwarded_total",
        1000.0,
        Duration::from_secs(20),
    );
    (relay, load)
}

/// Metric names a PromQL expression refers to (ours and the standard process ones).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if word.starts_with("clubcast_") || word.starts_with("process_") {
            names.push(std::mem::take(&mut word));
        }
        word.clear();
    }
    names
}

/// Every PromQL expression in a Grafana dashboard (panel targets and template queries).
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The `expr:` values of a Prometheus rules file.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.is_empty() || rest.starts_with('|') || rest.starts_with('>') {
            // A block scalar: the more-indented lines that follow.
            let indent = line.len() - line.trim_start().len();
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push(' ');
                lines.next();
            }
            out.push(block);
        } else {
            out.push(rest.trim_matches(['\'', '"']).to_string());
        }
    }
    out
}

#[test]
fn dashboard_and_alerts_name_only_metrics_the_relay_exports() {
    let (relay, _load) = relay_under_load();
    let exported: BTreeSet<String> = parse_samples(&relay.scrape())
        .into_iter()
        .map(|s| s.name)
        .collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/clubcast-relay.json")).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 8,
        "only {} queries in the dashboard",
        exprs.len()
    );
    let alerts = rule_exprs(&read("prometheus/alerts.yml"));
    assert!(alerts.len() >= 4, "only {} alert expressions", alerts.len());

    let mut named = 0;
    for expr in exprs.iter().chain(&alerts) {
        for name in metric_names(expr) {
            named += 1;
            assert!(
                exported.contains(&name),
                "{name} (in {expr:?}) is not exported; the relay has {exported:?}"
            );
        }
    }
    assert!(named >= 15, "only {named} metric references found");
    // The panels the operators rely on.
    let all = exprs.join("\n");
    for needed in [
        "clubcast_relay_pieces_forwarded_total",
        "clubcast_relay_dropped_total",
        "clubcast_relay_subscribers",
        "clubcast_relay_forward_latency_seconds_bucket",
    ] {
        assert!(all.contains(needed), "no panel uses {needed}");
    }
}

#[test]
fn promtool_accepts_the_shipped_config_and_rules() {
    require_tool("promtool");
    let run = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(deploy("prometheus"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        text
    };
    let config = run(&["check", "config", "prometheus.yml"]);
    assert!(config.contains("SUCCESS"), "{config}");
    let rules = run(&["check", "rules", "alerts.yml"]);
    assert!(rules.contains("SUCCESS"), "{rules}");
    if deploy("prometheus/alerts_test.yml").exists() {
        run(&["test", "rules", "alerts_test.yml"]);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// URL-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The first value of an instant query, if the result has one.
fn query(prometheus: SocketAddr, promql: &str) -> Option<f64> {
    let (status, body) = http_request(
        prometheus,
        &format!("/api/v1/query?query={}", encode(promql)),
    );
    assert_eq!(status, 200, "{promql}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{body}");
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Polls `promql` until its value satisfies `ok`.
fn wait_query(prometheus: SocketAddr, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(prometheus).is_err() {
            // Prometheus is still starting.
            assert!(
                Instant::now() < deadline,
                "prometheus never listened on {prometheus}"
            );
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        let v = query(prometheus, promql);
        if let Some(v) = v.filter(|&v| ok(v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "{promql} stayed at {v:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_real_prometheus_scrapes_a_relay_under_load_with_the_shipped_config() {
    require_tool("prometheus");
    let (relay, _load) = relay_under_load();
    let dir = tempfile::tempdir().unwrap();
    let shipped = read("prometheus/prometheus.yml");
    assert!(
        shipped.contains("127.0.0.1:9700"),
        "the shipped target moved:\n{shipped}"
    );
    // The shipped file, pointed at this relay and scraping every second.
    let config: String = shipped
        .replace("127.0.0.1:9700", &relay.metrics.to_string())
        .lines()
        .map(|l| match l.split_once("scrape_interval:") {
            Some((indent, _)) => format!("{indent}scrape_interval: 1s\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    std::fs::copy(
        deploy("prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        dir.path().join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.path().join("data").display()
    ))
    .arg(format!("--web.listen-address={web}"))
    .arg("--log.level=warn")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _prometheus = Proc::spawn("prometheus", &mut cmd);

    wait_query(web, "up{job=\"clubcast-relay\"}", |v| v == 1.0);
    let first = wait_query(web, "clubcast_relay_pieces_forwarded_total", |v| v > 0.0);
    let later = wait_query(web, "clubcast_relay_pieces_forwarded_total", |v| v > first);
    assert!(later > first);
    let rate = wait_query(
        web,
        "rate(clubcast_relay_pieces_forwarded_total[5s])",
        |v| v > 0.0,
    );
    // 1000 pieces/s to 20 subscribers: about 20 000 copies/s.
    assert!((5_000.0..60_000.0).contains(&rate), "forward rate {rate}/s");
    wait_query(web, "clubcast_relay_forward_latency_seconds_count", |v| {
        v > 0.0
    });
    let p99 = wait_query(
        web,
        "histogram_quantile(0.99, rate(clubcast_relay_forward_latency_seconds_bucket[5s]))",
        |v| v.is_finite() && v > 0.0,
    );
    assert!(p99 < 1.0, "p99 forward latency {p99}s");
    assert_eq!(query(web, "clubcast_relay_subscribers"), Some(20.0));
    assert_eq!(query(web, "clubcast_relay_ready"), Some(1.0));
    wait_query(web, "process_resident_memory_bytes", |v| v > 1e6);

    // The shipped alert rules are loaded and evaluate without error.
    let (status, body) = http_request(web, "/api/v1/rules");
    assert_eq!(status, 200);
    let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
    let groups = rules["data"]["groups"].as_array().unwrap();
    let loaded: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(loaded.len() >= 4, "{body}");
    assert!(
        loaded.iter().all(|r| r["health"] != "err"),
        "a rule fails to evaluate: {body}"
    );
}

#[test]
fn systemd_unit_verifies() {
    require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    // The shipped unit with the xdp drop-in's [Service] section after it (as systemd merges
    // them), ExecStart pointing at the binary under test.
    let unit = format!(
        "{}\n{}",
        read("systemd/clubcast-relay.service"),
        read("systemd/xdp.conf")
    )
    .replace("/usr/local/bin/clubcast", env!("CARGO_BIN_EXE_clubcast"));
    assert!(unit.contains("AmbientCapabilities=CAP_NET_ADMIN CAP_BPF CAP_NET_RAW"));
    let path = dir.path().join("clubcast-relay.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("clubcast-relay.service"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze warns about the unit:\n{text}"
    );
}

#[test]
fn shipped_relay_configs_load() {
    // The example config and the one in the Kubernetes ConfigMap are valid relay configs.
    print_config(&deploy("relay.toml"));

    let k8s = std::fs::read_dir(deploy("k8s"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<String>();
    let Some((_, rest)) = k8s.split_once("relay.toml: |") else {
        panic!("no relay.toml in the Kubernetes ConfigMap")
    };
    let mut lines = rest.lines().skip_while(|l| l.trim().is_empty());
    let first = lines.next().unwrap();
    let indent = first.len() - first.trim_start().len();
    let mut toml = format!("{}\n", first.trim_start());
    for l in lines {
        if !l.trim().is_empty() && l.len() - l.trim_start().len() < indent {
            break;
        }
        toml.push_str(l.get(indent..).unwrap_or(""));
        toml.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, &toml).unwrap();
    let printed = print_config(&file);
    assert!(
        printed.contains("metrics = \"0.0.0.0:9700\""),
        "in Kubernetes the kubelet and Prometheus must reach the metrics port:\n{printed}"
    );
}

#[test]
fn the_operators_deploy_check_passes_on_this_build() {
    let out = Command::new(deploy("check"))
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_clubcast"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
