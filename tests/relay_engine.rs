//! The relay engine under load on loopback: every poll mode delivers every piece to every
//! subscriber across two workers; a subscriber that never reads does not lower the others'
//! delivery; UNSUBSCRIBE and keepalive expiry free subscriber state.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use clubcast::crypto::ChannelKey;
use clubcast::loadgen::{run_load, LoadConfig};
use clubcast::wire::{ChannelId, MessageType, Subscription};
use common::{subscribe_by_hand, Relay};

/// These tests measure delivery under load on a small machine: run them one at a time (a
/// busy-polling relay spins every core it has).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn load(relay: SocketAddr, subscribers: usize, rate_pps: u64, ms: u64) -> LoadConfig {
    LoadConfig {
        relay,
        subscribers,
        rate_pps,
        payload: 1128,
        duration: Duration::from_millis(ms),
        receiver_threads: 1,
        progress: false,
        key_seed: None,
        forge_every: 0,
    }
}

fn send(s: &UdpSocket, relay: SocketAddr, sub: &Subscription, kind: MessageType) {
    let mut buf = [0u8; 64];
    let n = sub.encode(kind, &mut buf).unwrap();
    s.send_to(&buf[..n], relay).unwrap();
}

/// Backends every engine test runs on. io_uring is required: where the kernel lacks it the
/// relay refuses `--backend uring` and these tests fail rather than skip.
const BACKENDS: [&str; 3] = ["portable", "uring", "uring-zerocopy"];

fn backend_flags(backend: &str) -> Vec<&'static str> {
    match backend {
        "portable" => vec!["--backend", "portable"],
        "uring" => vec!["--backend", "uring", "--zerocopy", "off"],
        _ => vec!["--backend", "uring", "--zerocopy", "on"],
    }
}

fn start(backend: &str, extra: &[&str]) -> Relay {
    let mut flags = backend_flags(backend);
    flags.extend_from_slice(extra);
    let relay = Relay::start(&flags);
    let name = if backend == "portable" {
        "portable"
    } else {
        "uring"
    };
    let info = format!(
        "clubcast_build_info{{version=\"{}\",backend=\"{name}\",",
        env!("CARGO_PKG_VERSION")
    );
    assert!(relay.scrape().contains(&info), "relay is not on {backend}");
    relay
}

#[test]
fn every_poll_mode_delivers_everything_on_two_workers() {
    let _serial = one_at_a_time();
    for backend in BACKENDS {
        for mode in ["busy", "adaptive", "block"] {
            let relay = start(backend, &["--workers", "2", "--poll", mode]);
            let report = run_load(&load(relay.addr, 40, 1000, 1000)).unwrap();
            let what = format!("{backend} --poll {mode}: {}", report.to_json());
            assert_eq!(report.delivered_ratio, 1.0, "{what}");
            assert_eq!(report.duplicates, 0, "{what}");
            let text = relay.scrape();
            assert!(
                text.contains("clubcast_relay_worker_busy_ratio{worker=\"1\"}"),
                "{text}"
            );
        }
    }
}

#[test]
fn a_subscriber_that_never_reads_does_not_hurt_the_others() {
    let _serial = one_at_a_time();
    for backend in BACKENDS {
        stalled_subscriber(backend);
    }
}

fn stalled_subscriber(backend: &str) {
    let relay = start(backend, &["--workers", "2"]);
    let seed = [77u8; 32];
    let channel = ChannelKey::from_seed(&seed).public().channel_id();
    // A subscriber with the smallest receive buffer that never reads, kept alive throughout.
    let (stalled, sub) = subscribe_by_hand(relay.addr, channel);
    socket2::SockRef::from(&stalled)
        .set_recv_buffer_size(1)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let keepalive = {
        let stop = Arc::clone(&stop);
        let relay = relay.addr;
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                send(&stalled, relay, &sub, MessageType::Keepalive);
                thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let report = run_load(&LoadConfig {
        key_seed: Some(seed),
        forge_every: 0,
        ..load(relay.addr, 50, 2000, 2000)
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    keepalive.join().unwrap();
    assert!(
        report.delivered_ratio >= 0.999,
        "{backend}: {}",
        report.to_json()
    );
    // The relay did send to the stalled subscriber too: one copy per accepted piece per
    // subscriber (workers publish their counters every 100 ms).
    thread::sleep(Duration::from_millis(300));
    let accepted = relay.metric("clubcast_relay_pieces_accepted_total");
    assert!(
        accepted >= report.pieces_sent as f64 * 0.999,
        "{accepted} accepted"
    );
    relay.wait_metric(
        "clubcast_relay_pieces_forwarded_total",
        accepted * 51.0,
        Duration::from_secs(5),
    );
}

#[test]
fn unsubscribe_and_keepalive_expiry_free_subscribers() {
    let _serial = one_at_a_time();
    for backend in BACKENDS {
        unsubscribe_and_expire(backend);
    }
}

fn unsubscribe_and_expire(backend: &str) {
    let relay = start(backend, &["--workers", "2", "--subscriber-timeout", "1s"]);
    let channel = ChannelId([5; 8]);
    let subs: Vec<_> = (0..10)
        .map(|_| subscribe_by_hand(relay.addr, channel))
        .collect();
    relay.wait_metric("clubcast_relay_subscribers", 10.0, Duration::from_secs(5));
    for (s, sub) in &subs[..4] {
        send(s, relay.addr, sub, MessageType::Unsubscribe);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while relay.metric("clubcast_relay_subscribers") != 6.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "unsubscribes not applied"
        );
        thread::sleep(Duration::from_millis(20));
    }
    // The rest stop sending KEEPALIVE: gone within the timeout and a sweep.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while relay.metric("clubcast_relay_subscribers") != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "expiry did not free subscribers"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        relay.metric("clubcast_relay_subscribers_expired_total"),
        6.0
    );
}
