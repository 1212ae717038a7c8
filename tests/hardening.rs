//! A relay on a hostile network, as whole programs on loopback: a spoofed HELLO/SUBSCRIBE
//! flood is never amplified, a flood of made-up channels from thousands of source addresses
//! leaves memory bounded, a forged flood at several times the verify capacity leaves honest
//! delivery whole, and a relay restart under load does not end the stream.
//!
//! Loopback is all of 127.0.0.0/8, so sockets bound to 127.x.y.z stand in for distinct sources.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use clubcast::backend::{PortableSocket, SendBatch};
use clubcast::crypto::ChannelKey;
use clubcast::loadgen::{run_load, LoadConfig};
use clubcast::publisher::Publisher;
use clubcast::wire::{
    ChannelId, CookieBytes, Hello, Message, MessageType, PieceFlags, Subscription, MAX_DATAGRAM,
};
use common::{clubcast, keygen, watcher, Proc, Relay};

/// Floods saturate the machine: one at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A socket on source address 127.a.b.c.
fn source(i: u32) -> UdpSocket {
    let ip = Ipv4Addr::new(127, 10 + (i >> 16) as u8, (i >> 8) as u8, i as u8 | 1);
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

fn rss(relay: &Relay) -> f64 {
    relay.metric("process_resident_memory_bytes")
}

#[test]
fn a_spoofed_handshake_flood_is_never_amplified() {
    let _serial = one_at_a_time();
    let relay = Relay::start(&[]);
    let mut buf = [0u8; MAX_DATAGRAM];
    let sources: Vec<UdpSocket> = (0..200).map(source).collect();
    let (mut sent, mut received) = (vec![0usize; 200], vec![0usize; 200]);
    // Each source sends HELLOs and SUBSCRIBEs with made-up cookies, as a spoofer would, and
    // never answers: 50 rounds, 20 000 datagrams.
    for round in 0..50u64 {
        for (i, s) in sources.iter().enumerate() {
            let channel = ChannelId((round * 1000 + i as u64).to_le_bytes());
            let n = if round % 2 == 0 {
                Hello {
                    channel,
                    nonce: round,
                }
                .encode(&mut buf)
                .unwrap()
            } else {
                Subscription {
                    channel,
                    cookie: CookieBytes([round as u8; 20]),
                }
                .encode(MessageType::Subscribe, &mut buf)
                .unwrap()
            };
            if s.send_to(&buf[..n], relay.addr).is_ok() {
                sent[i] += n;
            }
        }
    }
    thread::sleep(Duration::from_millis(300));
    let mut stream_bytes = 0;
    for (i, s) in sources.iter().enumerate() {
        while let Ok(n) = s.recv(&mut buf) {
            received[i] += n;
            if !matches!(Message::parse(&buf[..n]), Ok(Message::Cookie(_))) {
                stream_bytes += n;
            }
        }
    }
    for i in 0..sources.len() {
        assert!(
            received[i] <= sent[i],
            "source {i} got {} bytes for {} sent",
            received[i],
            sent[i]
        );
    }
    assert_eq!(
        stream_bytes, 0,
        "an unvalidated source got something besides COOKIEs"
    );
    let (total_in, total_out): (usize, usize) = (sent.iter().sum(), received.iter().sum());
    println!(
        "spoofed flood: {total_in} bytes in, {total_out} bytes out (ratio {:.2})",
        total_out as f64 / total_in as f64
    );
    assert!(relay.metric("clubcast_relay_channels") == 0.0);
}

#[test]
fn a_flood_of_made_up_channels_from_thousands_of_sources_leaves_memory_bounded() {
    let _serial = one_at_a_time();
    let relay = Relay::start(&["--max-channels", "1024", "--max-subscribers", "64"]);
    // Let the process settle, then measure.
    thread::sleep(Duration::from_millis(300));
    let before = rss(&relay);
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut sent = 0u64;
    let started = Instant::now();
    // 2 000 sources do the real handshake (so their SUBSCRIBEs pass the cookie check) and
    // subscribe to 50 made-up channels each; meanwhile pieces for unknown channels pour in.
    let mut forger = Publisher::new(ChannelKey::from_seed(&[77; 32]), 1, 1);
    for i in 0..2000u32 {
        let s = source(i);
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let n = Hello {
            channel: ChannelId([0; 8]),
            nonce: 1,
        }
        .encode(&mut buf)
        .unwrap();
        s.send_to(&buf[..n], relay.addr).unwrap();
        let Ok(n) = s.recv(&mut buf) else { continue };
        let Ok(Message::Cookie(c)) = Message::parse(&buf[..n]) else {
            continue;
        };
        for k in 0..50u64 {
            let channel = ChannelId((u64::from(i) << 16 | k).to_le_bytes());
            let n = Subscription {
                channel,
                cookie: c.cookie,
            }
            .encode(MessageType::Subscribe, &mut buf)
            .unwrap();
            let _ = s.send_to(&buf[..n], relay.addr);
            let n = forger
                .encode_piece(&[0x47; 1128], PieceFlags::empty(), 0, &mut buf)
                .unwrap();
            let _ = s.send_to(&buf[..n], relay.addr);
            sent += 2;
        }
    }
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(500));
    let after = rss(&relay);
    let channels = relay.metric("clubcast_relay_channels");
    let text = relay.scrape();
    let dropped = |r: &str| {
        common::metric(
            &text,
            &format!("clubcast_relay_dropped_total{{reason=\"{r}\"}}"),
        )
    };
    println!(
        "made-up channel flood: {sent} datagrams from 2000 sources at {rate:.0}/s; RSS {:.1} → {:.1} MiB; \
         channels_full {}, unknown_channel {}, rate_limited {}",
        before / 1048576.0,
        after / 1048576.0,
        dropped("channels_full"),
        dropped("unknown_channel"),
        dropped("rate_limited")
    );
    assert_eq!(channels, 0.0, "no made-up channel became a real one");
    assert!(dropped("channels_full") > 90_000.0);
    assert!(dropped("unknown_channel") > 90_000.0);
    // At most 256 pending channels × 64 subscribers: a few MiB, not the flood's size.
    assert!(
        after - before < 32.0 * 1048576.0,
        "RSS grew by {:.1} MiB",
        (after - before) / 1048576.0
    );
}

/// Pieces one core verifies per second, one at a time, measured now.
fn verify_capacity() -> f64 {
    let key = ChannelKey::from_seed(&[1; 32]);
    let mut p = Publisher::new(ChannelKey::from_seed(&[1; 32]), 1, 1);
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = p
        .encode_piece(&[0x47; 1128], PieceFlags::empty(), 0, &mut buf)
        .unwrap();
    let piece = clubcast::wire::Piece::parse(&buf[..n]).unwrap();
    let public = key.public();
    let start = Instant::now();
    for _ in 0..2000 {
        assert!(public.verify_piece(&piece).is_ok());
    }
    2000.0 / start.elapsed().as_secs_f64()
}

#[test]
fn honest_delivery_survives_a_forged_flood_beyond_verify_capacity() {
    let _serial = one_at_a_time();
    let capacity = verify_capacity();
    let relay = Relay::start(&["--workers", "1"]);
    let seed = [33u8; 32];
    let channel = ChannelKey::from_seed(&seed).public().channel_id();
    // Forged pieces for the honest channel from 16 other addresses, as fast as one thread can
    // push them (sendmmsg, 64 at a time). Signed once by another key; each batch gets a fresh
    // sequence number, so nothing is a replay and no signature matches.
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, flooded, target) = (Arc::clone(&stop), Arc::clone(&flooded), relay.addr);
        thread::spawn(move || {
            let mut forger = Publisher::new(ChannelKey::from_seed(&[9; 32]), 1, 1);
            let mut buf = [0u8; MAX_DATAGRAM];
            let n = forger
                .encode_piece(&[0x47; 1128], PieceFlags::empty(), 0, &mut buf)
                .unwrap();
            buf[4..12].copy_from_slice(&channel.0);
            let sockets: Vec<PortableSocket> = (0..16u8)
                .map(|i| {
                    PortableSocket::bind(SocketAddr::from(([127, 9, 0, i + 1], 0)), 1 << 20)
                        .unwrap()
                })
                .collect();
            let dests = vec![target; 64];
            let mut batch = SendBatch::new();
            // Paced at four times what one core verifies: far beyond verification, without
            // simply overflowing the relay's socket (which would test the kernel, not the relay).
            let started = Instant::now();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = started.elapsed().as_secs_f64() * 4.0 * capacity;
                if (k * dests.len() as u64) as f64 > due {
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                buf[12..20].copy_from_slice(&(u64::MAX / 2 + k).to_be_bytes());
                // Offered load: what the flooder tried (a full socket refuses some).
                let _ = sockets[(k % 16) as usize].send_fanout(&buf[..n], &dests, &mut batch);
                flooded.fetch_add(dests.len() as u64, Ordering::Relaxed);
                k += 1;
            }
        })
    };
    let started = Instant::now();
    let report = run_load(&LoadConfig {
        relay: relay.addr,
        subscribers: 20,
        rate_pps: 500,
        payload: 1128,
        duration: Duration::from_secs(4),
        receiver_threads: 1,
        progress: false,
        key_seed: Some(seed),
        forge_every: 0,
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let flood_rate = flooded.load(Ordering::Relaxed) as f64 / elapsed;
    let text = relay.scrape();
    let dropped = |r: &str| {
        common::metric(
            &text,
            &format!("clubcast_relay_dropped_total{{reason=\"{r}\"}}"),
        )
    };
    let received = common::metric(&text, "clubcast_relay_datagrams_received_total") / elapsed;
    println!(
        "forged flood offered at {flood_rate:.0} pieces/s ({:.1}x the {capacity:.0}/s one core \
         verifies), relay received {received:.0} datagrams/s: honest delivered ratio {:.4} \
         ({} pieces x 20), unknown_upstream {}, bad_signature {}",
        flood_rate / capacity,
        report.delivered_ratio,
        report.pieces_sent,
        dropped("unknown_upstream"),
        dropped("bad_signature")
    );
    assert!(
        flood_rate > 2.0 * capacity,
        "the flood ({flood_rate:.0}/s) did not exceed verify capacity ({capacity:.0}/s)"
    );
    assert!(
        report.delivered_ratio >= 0.999,
        "{}",
        report.delivered_ratio
    );
    assert_eq!(report.duplicates, 0);
    assert!(dropped("unknown_upstream") > 50_000.0);
    assert_eq!(
        dropped("bad_signature"),
        0.0,
        "a forgery reached verification"
    );
}

#[test]
fn a_relay_restart_under_load_does_not_end_the_stream() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path());
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let relay = Relay::start_on(&listen, &[]);
    let addr: SocketAddr = listen.parse().unwrap();
    let outputs: Vec<_> = (0..5)
        .map(|i| dir.path().join(format!("w{i}.ts")))
        .collect();
    let mut watchers: Vec<Proc> = outputs.iter().map(|o| watcher(addr, &public, o)).collect();
    relay.wait_metric("clubcast_relay_subscribers", 5.0, Duration::from_secs(10));
    // Six seconds of a 1 Mbit/s synthetic stream, published in real time (paced by its PCR).
    let (input, _) = common::synthetic_input(dir.path(), 6, 1_000_000);
    let mut cmd = clubcast();
    cmd.args(["publish", "--realtime", "--to", &listen, "--input"])
        .arg(&input)
        .arg("--key")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut publisher = Proc::spawn("publisher", &mut cmd);
    thread::sleep(Duration::from_secs(2));
    // The relay dies without a goodbye and a new one takes its port.
    drop(relay);
    thread::sleep(Duration::from_millis(300));
    let relay = Relay::start_on(&listen, &[]);
    relay.wait_metric("clubcast_relay_subscribers", 5.0, Duration::from_secs(10));
    assert!(publisher.wait(Duration::from_secs(20)).success());
    for (w, out) in watchers.iter_mut().zip(&outputs) {
        let status = w.wait(Duration::from_secs(20));
        let err = common::stderr_of(w);
        assert!(status.success(), "{err}");
        assert!(err.contains("end of stream"), "{err}");
        let bytes = std::fs::metadata(out).unwrap().len();
        assert!(bytes > 100_000, "{bytes} bytes: {err}");
    }
}

/// Publishes a synthetic file through a fresh relay to one watcher started with `watch_args`;
/// the input, the watcher's output and its stderr.
fn watch_with(watch_args: &[&str]) -> (Vec<u8>, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path());
    let relay = Relay::start(&[]);
    let (input, ts) = common::synthetic_input(dir.path(), 4, 2_000_000);
    let output = dir.path().join("out.ts");
    let extra: Vec<&std::ffi::OsStr> = watch_args.iter().map(|a| a.as_ref()).collect();
    let mut watch = common::watcher_with(relay.addr, &public, &output, &extra);
    relay.wait_metric("clubcast_relay_subscribers", 1.0, Duration::from_secs(10));
    common::publish_file(relay.addr, &input, &key, &[]);
    let status = watch.wait(Duration::from_secs(30));
    let err = common::stderr_of(&mut watch);
    assert!(status.success(), "{err}");
    (ts, std::fs::read(&output).unwrap(), err)
}

/// The number after `label` in `text`.
fn count(text: &str, label: &str) -> u64 {
    text.split(label)
        .nth(1)
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn duplicated_reordered_and_delayed_datagrams_still_play_byte_for_byte() {
    let _serial = one_at_a_time();
    let (input, output, err) = watch_with(&[
        "--jitter",
        "300ms",
        "--faults",
        "dup=5%,reorder=10%,reorder-by=20ms,delay=5ms,jitter=3ms,seed=3",
    ]);
    println!("{err}");
    // "faults injected: D of N datagrams dropped, U duplicated, R reordered"
    let (dropped, duplicated, reordered) = (
        count(&err, "faults injected: "),
        count(&err, "datagrams dropped, "),
        count(&err, "duplicated, "),
    );
    assert_eq!(dropped, 0, "{err}");
    assert!(duplicated > 10 && reordered > 20, "{err}");
    assert_eq!(count(&err, "lost "), 0, "{err}");
    // Extra copies are dropped by the viewer: as duplicates, or as late once played.
    assert_eq!(
        count(&err, "duplicates ") + count(&err, "late "),
        duplicated,
        "{err}"
    );
    assert!(
        output == input,
        "output differs from input ({} vs {} bytes)",
        output.len(),
        input.len()
    );
}

#[test]
fn bursty_loss_is_counted_and_the_stream_plays_on() {
    let _serial = one_at_a_time();
    let (input, output, err) = watch_with(&["--faults", "loss=3%,burst=3,seed=11"]);
    println!("{err}");
    let dropped = count(&err, "faults injected: ");
    let lost = count(&err, "lost ");
    assert!(dropped > 5, "{err}");
    // Every dropped piece is a lost piece (a dropped control message is retried instead).
    assert!(
        lost <= dropped && lost + 3 >= dropped,
        "dropped {dropped}, lost {lost}"
    );
    let missing = input.len() - output.len();
    assert!(
        missing as u64 <= lost * 1128 && missing as u64 >= lost.saturating_sub(1) * 1128,
        "{missing} bytes missing for {lost} lost pieces"
    );
}
