//! The relay as operators run it: configuration layers, JSON logs, SIGHUP reload without losing
//! subscribers, SIGTERM drain under load, /healthz and /readyz.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clubcast::wire::{ChannelId, Message, MessageType, Subscription, MAX_DATAGRAM};
use common::{clubcast, http_get, run_ok, signal, subscribe_by_hand, Proc, Relay, TestPublisher};

/// Waits for a log line containing `needle`; all lines seen, for the failure message.
fn wait_log(relay: &Relay, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = String::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match relay.log.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(needle) {
                    return line;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no log line with {needle:?} within {limit:?}; saw:\n{seen}");
}

/// Pieces that arrive on `socket` within `limit`, sending a KEEPALIVE first.
fn pieces_arriving(
    socket: &UdpSocket,
    sub: &Subscription,
    relay: SocketAddr,
    limit: Duration,
) -> usize {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = sub.encode(MessageType::Keepalive, &mut buf).unwrap();
    socket.send_to(&buf[..n], relay).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut pieces = 0;
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            if matches!(Message::parse(&buf[..n]), Ok(Message::Piece(_))) {
                pieces += 1;
            }
        }
    }
    pieces
}

/// Tries to subscribe; true if the relay confirmed.
fn try_subscribe(relay: SocketAddr, channel: ChannelId) -> bool {
    common::try_subscribe_by_hand(relay, channel).is_some()
}

#[test]
fn sighup_applies_a_lower_limit_and_keeps_the_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "max-subscribers = 10\nsubscriber-timeout = \"10s\"\n",
    )
    .unwrap();
    let relay = Relay::start(&["--config", config.to_str().unwrap(), "--workers", "1"]);
    let publisher = TestPublisher::start(relay.addr, [5; 32], Duration::from_millis(5));
    relay.wait_metric("clubcast_relay_channels", 1.0, Duration::from_secs(10));

    let subs: Vec<_> = (0..4)
        .map(|_| subscribe_by_hand(relay.addr, publisher.channel))
        .collect();
    for (socket, sub) in &subs {
        assert!(pieces_arriving(socket, sub, relay.addr, Duration::from_millis(300)) > 10);
    }

    // Lower the limit below the current count and bring in a change that needs a restart.
    std::fs::write(
        &config,
        "max-subscribers = 3\nsubscriber-timeout = \"10s\"\nsocket-buffer = \"1m\"\n",
    )
    .unwrap();
    signal(&relay.proc, libc::SIGHUP);
    wait_log(&relay, "socket-buffer changed", Duration::from_secs(5));
    wait_log(
        &relay,
        "reload: applied max-subscribers = 3",
        Duration::from_secs(5),
    );
    // Workers pick the change up within a round; give them one.
    std::thread::sleep(Duration::from_millis(200));

    let refused_before = relay.metric("clubcast_relay_dropped_total{reason=\"subscribers_full\"}");
    assert!(
        !try_subscribe(relay.addr, publisher.channel),
        "a fifth subscriber was admitted"
    );
    assert!(
        relay.metric("clubcast_relay_dropped_total{reason=\"subscribers_full\"}") > refused_before
    );
    for (socket, sub) in &subs {
        let n = pieces_arriving(socket, sub, relay.addr, Duration::from_millis(300));
        assert!(
            n > 10,
            "a subscriber lost its stream after the reload ({n} pieces)"
        );
    }
    assert_eq!(relay.metric("clubcast_relay_subscribers"), 4.0);

    // A broken file is refused and the running configuration stays.
    std::fs::write(&config, "max-subscribers = \"lots\"\n").unwrap();
    signal(&relay.proc, libc::SIGHUP);
    let line = wait_log(&relay, "reload failed", Duration::from_secs(5));
    assert!(line.contains("max-subscribers"), "{line}");
    assert!(!try_subscribe(relay.addr, publisher.channel));
    assert!(publisher.stop() > 100);
}

#[test]
fn sigterm_under_load_drains_and_exits_zero_within_the_bound() {
    let mut relay = Relay::start(&["--drain-timeout", "3s", "--log-format", "json"]);
    assert_eq!(http_get(relay.metrics, "/healthz"), "ok\n");
    assert_eq!(http_get(relay.metrics, "/readyz"), "ready\n");
    let mut load = clubcast();
    load.args(["loadgen", "--relay", &relay.addr.to_string()])
        .args(["--subscribers", "50", "--rate", "2000", "--duration", "30s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _load = Proc::spawn("loadgen", &mut load);
    relay.wait_metric(
        "clubcast_relay_pieces_forwarded_total",
        20_000.0,
        Duration::from_secs(20),
    );

    signal(&relay.proc, libc::SIGTERM);
    let started = Instant::now();
    let status = relay.proc.wait(Duration::from_secs(8));
    let took = started.elapsed();
    assert!(status.success(), "relay exited with {status}");
    assert!(
        took < Duration::from_secs(4),
        "drain took {took:?}, bound 3s"
    );

    // Every line is one JSON object; the drain was complete, not cut by the bound.
    let lines: Vec<String> = relay.log.try_iter().collect();
    let mut messages = Vec::new();
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    assert!(
        messages.iter().any(|m| m.starts_with("SIGTERM: draining")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("drained in")),
        "{messages:?}"
    );
}

#[test]
fn config_layers_print_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "max-subscribers = 10\nmax-channels = 11\nworkers = 3\nlog-format = \"json\"\n",
    )
    .unwrap();
    let out = run_ok(
        clubcast()
            .args(["relay", "--print-config", "--config"])
            .arg(&file)
            .args(["--max-subscribers", "30", "--no-pin"])
            .env("CLUBCAST_MAX_SUBSCRIBERS", "20")
            .env("CLUBCAST_MAX_CHANNELS", "21"),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "max-subscribers = 30",
        "max-channels = 21",
        "workers = 3",
        "pin = false",
        "log-format = \"json\"",
        "listen = \"0.0.0.0:7000\"",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // What --print-config prints is a config file the relay reads back to the same result.
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, &text).unwrap();
    assert_eq!(common::print_config(&again), text);

    for (contents, env, expect) in [
        (
            "max-subscribers = \"many\"",
            None,
            "key `max-subscribers`: \"many\" is not a whole number",
        ),
        ("max-subscriber = 3", None, "unknown key `max-subscriber`"),
        (
            "",
            Some(("CLUBCAST_POLL", "sometimes")),
            "environment variable CLUBCAST_POLL: key `poll`",
        ),
    ] {
        std::fs::write(&file, contents).unwrap();
        let mut cmd = clubcast();
        cmd.args(["relay", "--config"]).arg(&file);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(expect), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn top_shows_live_rates_and_fails_clearly_without_a_relay() {
    let relay = Relay::start(&[]);
    let publisher = TestPublisher::start(relay.addr, [6; 32], Duration::from_millis(2));
    relay.wait_metric("clubcast_relay_channels", 1.0, Duration::from_secs(10));
    let _subs: Vec<_> = (0..3)
        .map(|_| subscribe_by_hand(relay.addr, publisher.channel))
        .collect();
    let out = run_ok(
        clubcast()
            .args(["top", "--metrics", &relay.metrics.to_string()])
            .args(["--count", "2", "--interval", "500ms"]),
    );
    let screen = String::from_utf8(out.stdout).unwrap();
    // Piped output is plain text, no terminal escapes.
    assert!(!screen.contains('\x1b'), "{screen:?}");
    let field = |label: &str| -> f64 {
        let last = screen.rsplit("clubcast relay at").next().unwrap();
        let after = last
            .split(label)
            .nth(1)
            .unwrap_or_else(|| panic!("no {label} in\n{screen}"));
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(field("pieces in/s") > 50.0, "{screen}");
    assert!(
        field("copies out/s") >= 2.0 * field("pieces in/s"),
        "{screen}"
    );
    assert_eq!(field("subscribers"), 3.0, "{screen}");
    assert!(screen.contains("ready"), "{screen}");
    assert!(!screen.contains("forward             -"), "{screen}");

    let gone = clubcast()
        .args(["top", "--metrics", "127.0.0.1:9", "--count", "1"])
        .output()
        .unwrap();
    assert!(!gone.status.success());
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(
        err.contains("cannot reach the relay's metrics at 127.0.0.1:9"),
        "{err}"
    );
    drop(publisher);
}
