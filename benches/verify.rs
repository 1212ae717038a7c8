//! Signature verification, the relay's costliest per-piece step: one by one (the baseline)
//! against batches, measured in the same run. Also the relay core's per-piece bookkeeping
//! without signatures, to show how much of a piece's cost is verification.
//!
//! Run: `cargo bench --bench verify`. Prints pieces per second and the ratio to the baseline.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clubcast::crypto::{verify_batch, ChannelKey, ChannelPublicKey};
use clubcast::publisher::Publisher;
use clubcast::relay::{Inbound, RelayConfig, RelayCore};
use clubcast::time::Timestamp;
use clubcast::wire::{Piece, PieceFlags, MAX_DATAGRAM};

const PIECES: usize = 4096;
const RUN_FOR: Duration = Duration::from_millis(1500);

/// Runs `f` (which handles `per_call` pieces) repeatedly for RUN_FOR; pieces per second.
fn rate(per_call: usize, mut f: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < RUN_FOR {
        f(calls);
        calls += 1;
    }
    (calls * per_call) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let key = ChannelKey::from_seed(&[7; 32]);
    let public = key.public();
    let mut publisher = Publisher::new(key, 1, 1);
    let pieces: Vec<Vec<u8>> = (0..PIECES)
        .map(|_| {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let n = publisher
                .encode_piece(&[0x47; 1128], PieceFlags::empty(), 0, &mut buf)
                .unwrap();
            buf.truncate(n);
            buf
        })
        .collect();
    let parsed: Vec<(Piece<'_>, ChannelPublicKey)> = pieces
        .iter()
        .map(|p| (Piece::parse(p).unwrap(), public))
        .collect();

    println!("clubcast bench: verification of 1224-byte pieces (6 TS packets), one core");
    let single = rate(1, |i| {
        let (p, k) = &parsed[i % PIECES];
        black_box(k.verify_piece(p)).unwrap();
    });
    println!(
        "  {:<34} {:>10.0} pieces/s   1.00x (baseline)",
        "single verify", single
    );
    for batch in [8usize, 32, 64] {
        let r = rate(batch, |i| {
            let start = (i * batch) % (PIECES - batch);
            black_box(verify_batch(&parsed[start..start + batch])).unwrap();
        });
        println!(
            "  {:<34} {:>10.0} pieces/s   {:.2}x",
            format!("batch verify ({batch})"),
            r,
            r / single
        );
    }

    // The relay core's cheap filters and bookkeeping, no signature check, 100 subscribers.
    let mut relay = RelayCore::with_cookie_key(RelayConfig::default(), [1; 32]);
    let mut reply = vec![0u8; MAX_DATAGRAM];
    let now = Timestamp::from_micros(1);
    let mut announce = vec![0u8; MAX_DATAGRAM];
    let n = publisher.poll_announce(now, &mut announce).unwrap();
    relay.handle(
        now,
        "127.0.0.1:1".parse().unwrap(),
        &announce[..n],
        &mut reply,
    );
    let src: SocketAddr = "127.0.0.1:2".parse().unwrap();
    let mut fresh = 0u64;
    let mut p = pieces[0].clone();
    let core = rate(1, |_| {
        // A new sequence number each time; the signature no longer matches, but verification
        // is reported as passed: this measures everything else.
        p[12..20].copy_from_slice(&(fresh + 10_000_000).to_be_bytes());
        fresh += 1;
        if let Inbound::Verify(pending) = relay.handle(now, src, &p, &mut reply) {
            black_box(relay.admit(&pending, true).ok());
            relay.record_sends(relay.subscribers(&pending.channel).len(), p.len());
        }
    });
    println!(
        "  {:<34} {:>10.0} pieces/s   {:.1}x single verify",
        "relay core, verify skipped",
        core,
        core / single
    );
}
