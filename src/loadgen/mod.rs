//! The load generator: a signing publisher and many subscribers in one process, measuring what
//! a relay delivers.
//!
//! Subscribers do the real handshake (HELLO → COOKIE → SUBSCRIBE, KEEPALIVE every second) but do
//! not verify signatures: they count, so that the generator is not the bottleneck. Receiver
//! threads drain many sockets each with `recvmmsg`. The publish-time field carries µs of one
//! monotonic clock shared by publisher and subscribers, so latency is exact within the process;
//! it is stamped just before the piece is signed, so it includes the publisher's Ed25519
//! signing (about 15 µs).

mod receiver;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{socket_towards, CLIENT_SOCKET_BUFFER};
use crate::crypto::ChannelKey;
use crate::metrics::latency_histogram;
use crate::publisher::Publisher;
use crate::time::{wall_clock_us, MonotonicClock};
use crate::wire::{PieceFlags, PieceHeader, MAX_DATAGRAM};

use receiver::{Receiver, SubscriberTotals};

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The relay under test.
    pub relay: SocketAddr,
    /// Subscribers to run.
    pub subscribers: usize,
    /// Pieces per second the publisher sends.
    pub rate_pps: u64,
    /// Payload bytes per piece (at most [`PieceHeader::MAX_PAYLOAD`]).
    pub payload: usize,
    /// How long the publisher sends.
    pub duration: Duration,
    /// Receiver threads (each drains a share of the subscriber sockets).
    pub receiver_threads: usize,
    /// Print a progress line every second on stderr.
    pub progress: bool,
    /// Seed of the channel key (a fresh random key when `None`), so other clients can join
    /// the channel under test.
    pub key_seed: Option<[u8; 32]>,
    /// Before every `forge_every`th piece (0: never), send a forgery of it: the same header
    /// and signature over one changed payload byte. A relay that forwarded one would show it as
    /// a duplicate (the real piece follows with the same sequence number).
    pub forge_every: u64,
}

/// What the relay delivered.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Pieces the publisher sent.
    pub pieces_sent: u64,
    /// Forged pieces sent besides.
    pub forged_sent: u64,
    /// Subscribers that completed the handshake.
    pub subscribers: usize,
    /// Distinct pieces received over all subscribers ÷ (pieces sent × subscribers).
    pub delivered_ratio: f64,
    /// Pieces not received, over all subscribers.
    pub lost: u64,
    /// Extra copies received.
    pub duplicates: u64,
    /// Pieces that arrived after a later one.
    pub reorders: u64,
    /// Pieces per second received at the subscribers.
    pub pps_out: f64,
    /// Gbit/s of datagrams received at the subscribers.
    pub gbps_out: f64,
    /// Publisher send → subscriber receive, µs.
    pub latency_us: Histogram<u64>,
    /// The sending period.
    pub elapsed: Duration,
}

impl LoadReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        let h = &self.latency_us;
        format!(
            concat!(
                "{{\"pieces_sent\":{},\"forged_sent\":{},\"subscribers\":{},\"delivered_ratio\":{:.6},\"lost\":{},",
                "\"duplicates\":{},\"reorders\":{},\"pps_out\":{:.1},\"gbps_out\":{:.6},",
                "\"latency_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\"duration_s\":{:.3}}}"
            ),
            self.pieces_sent,
            self.forged_sent,
            self.subscribers,
            self.delivered_ratio,
            self.lost,
            self.duplicates,
            self.reorders,
            self.pps_out,
            self.gbps_out,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            self.elapsed.as_secs_f64(),
        )
    }
}

/// Why a load run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// Bad parameters.
    #[error("{0}")]
    Config(String),
    /// The relay did not answer.
    #[error("relay {relay} {what} within {waited:?}")]
    RelayTimeout {
        /// The relay.
        relay: SocketAddr,
        /// What did not happen.
        what: &'static str,
        /// How long we waited.
        waited: Duration,
    },
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the last pieces to arrive after the publisher stops.
const DRAIN: Duration = Duration::from_millis(300);

/// Runs one load test against `config.relay`.
pub fn run_load(config: &LoadConfig) -> Result<LoadReport, LoadError> {
    if config.payload > PieceHeader::MAX_PAYLOAD {
        return Err(LoadError::Config(format!(
            "payload of {} bytes exceeds the piece maximum of {}",
            config.payload,
            PieceHeader::MAX_PAYLOAD
        )));
    }
    if config.rate_pps == 0 || config.subscribers == 0 {
        return Err(LoadError::Config(
            "rate and subscribers must be at least 1".into(),
        ));
    }
    let clock = MonotonicClock::new();
    let key = config
        .key_seed
        .map_or_else(ChannelKey::generate, |seed| ChannelKey::from_seed(&seed));
    let channel = key.public().channel_id();
    let epoch = wall_clock_us();
    let mut publisher = Publisher::new(key, epoch, 1);
    let socket = socket_towards(config.relay, CLIENT_SOCKET_BUFFER)?;
    announce(&mut publisher, &socket, config.relay, &clock)?;

    let threads = config.receiver_threads.clamp(1, config.subscribers);
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::with_capacity(threads);
    for t in 0..threads {
        let count = config.subscribers / threads + usize::from(t < config.subscribers % threads);
        receivers.push(Receiver::open(config.relay, channel, count, epoch, clock)?);
    }
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    for r in &mut receivers {
        r.handshake(deadline).map_err(|e| match e {
            receiver::HandshakeError::Io(e) => LoadError::Io(e),
            receiver::HandshakeError::Timeout => LoadError::RelayTimeout {
                relay: config.relay,
                what: "did not confirm every subscription",
                waited: HANDSHAKE_TIMEOUT,
            },
        })?;
    }
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let stop = Arc::clone(&stop);
            let received = Arc::clone(&received);
            thread::Builder::new()
                .name(format!("loadgen-rx-{i}"))
                .spawn(move || r.run(&stop, &received))
        })
        .collect::<io::Result<_>>()?;

    let (sent, forged_sent, elapsed) =
        send_pieces(&mut publisher, &socket, config, &clock, &received)?;
    thread::sleep(DRAIN);
    stop.store(true, Ordering::Relaxed);
    let mut totals = SubscriberTotals::default();
    let mut latency_us = latency_histogram();
    for h in handles {
        let (t, lat) = h
            .join()
            .map_err(|_| io::Error::other("receiver thread panicked"))??;
        totals.add(&t);
        let _ = latency_us.add(&lat);
    }
    let expected = sent * config.subscribers as u64;
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(LoadReport {
        pieces_sent: sent,
        forged_sent,
        subscribers: config.subscribers,
        delivered_ratio: if expected == 0 {
            0.0
        } else {
            totals.unique as f64 / expected as f64
        },
        lost: expected.saturating_sub(totals.unique),
        duplicates: totals.duplicates,
        reorders: totals.reorders,
        pps_out: totals.unique as f64 / secs,
        gbps_out: totals.bytes as f64 * 8.0 / secs / 1e9,
        latency_us,
        elapsed,
    })
}

/// Announces the channel until the relay acknowledges.
fn announce(
    publisher: &mut Publisher,
    socket: &crate::backend::PortableSocket,
    relay: SocketAddr,
    clock: &MonotonicClock,
) -> Result<(), LoadError> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut reply = [0u8; 64];
    while !publisher.is_announced() {
        if Instant::now() > deadline {
            return Err(LoadError::RelayTimeout {
                relay,
                what: "did not acknowledge the announce",
                waited: HANDSHAKE_TIMEOUT,
            });
        }
        if let Some(n) = publisher.poll_announce(clock.now(), &mut buf) {
            let _ = socket.send_to(&buf[..n], relay);
        }
        if socket.wait_readable(Duration::from_millis(50))? {
            if let Ok((n, from)) = socket.as_std().recv_from(&mut reply) {
                if from == relay {
                    publisher.handle_datagram(&reply[..n]);
                }
            }
        }
    }
    Ok(())
}

/// Sends pieces at `rate_pps` for `duration`, in bursts of whatever is due every 200 µs.
fn send_pieces(
    publisher: &mut Publisher,
    socket: &crate::backend::PortableSocket,
    config: &LoadConfig,
    clock: &MonotonicClock,
    received: &AtomicU64,
) -> Result<(u64, u64, Duration), LoadError> {
    let payload = vec![0x47u8; config.payload];
    let mut forged = 0u64;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let start = Instant::now();
    let mut sent = 0u64;
    let mut next_report = start + Duration::from_secs(1);
    let mut last_announce = start;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= config.duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * config.rate_pps as f64) as u64 + 1;
        while sent < due {
            let now_us = clock.now().as_micros();
            let n = publisher
                .encode_piece(&payload, PieceFlags::empty(), now_us, &mut buf)
                .map_err(|e| LoadError::Config(e.to_string()))?;
            if config.forge_every > 0 && sent % config.forge_every == 0 {
                let last_payload_byte = n - crate::wire::SIGNATURE_LEN - 1;
                buf[last_payload_byte] ^= 0x01;
                let _ = socket.send_to(&buf[..n], config.relay);
                buf[last_payload_byte] ^= 0x01;
                forged += 1;
            }
            // A send refused by a full buffer is a piece the relay never saw: counted as sent,
            // it shows as loss, which is what it is.
            let _ = socket.send_to(&buf[..n], config.relay);
            sent += 1;
        }
        if last_announce.elapsed() >= Publisher::ANNOUNCE_INTERVAL {
            if let Some(n) = publisher.poll_announce(clock.now(), &mut buf) {
                let _ = socket.send_to(&buf[..n], config.relay);
            }
            last_announce = Instant::now();
        }
        if config.progress && Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let got = received.load(Ordering::Relaxed);
            let expected = sent * config.subscribers as u64;
            eprintln!(
                "  {:4.1} s  sent {:8}  received {:10}  delivered {:7.3} %",
                elapsed.as_secs_f64(),
                sent,
                got,
                100.0 * got as f64 / expected.max(1) as f64
            );
        }
        thread::sleep(Duration::from_micros(200));
    }
    Ok((sent, forged, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineConfig, RelayEngine};
    use crate::metrics::RelayMetrics;

    #[test]
    fn measures_full_delivery_through_a_relay() {
        let config = EngineConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 2,
            ..EngineConfig::default()
        };
        let relay = RelayEngine::bind(&config, RelayMetrics::new("portable", 2))
            .unwrap()
            .spawn()
            .unwrap();
        let report = run_load(&LoadConfig {
            relay: relay.addr(),
            subscribers: 10,
            rate_pps: 500,
            payload: 1000,
            duration: Duration::from_millis(600),
            receiver_threads: 2,
            progress: false,
            key_seed: None,
            forge_every: 0,
        })
        .unwrap();
        relay.stop().unwrap();
        assert!(report.pieces_sent >= 290, "{}", report.to_json());
        assert_eq!(report.delivered_ratio, 1.0, "{}", report.to_json());
        assert_eq!((report.lost, report.duplicates), (0, 0));
        assert_eq!(report.latency_us.len(), report.pieces_sent * 10);
        let json = report.to_json();
        for key in [
            "\"delivered_ratio\":1.000000",
            "\"pps_out\":",
            "\"gbps_out\":",
            "\"p999\":",
        ] {
            assert!(json.contains(key), "{json}");
        }
    }

    #[test]
    fn refuses_oversized_payloads_and_an_absent_relay() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let base = LoadConfig {
            relay: silent.local_addr().unwrap(),
            subscribers: 1,
            rate_pps: 10,
            payload: 5000,
            duration: Duration::from_millis(10),
            receiver_threads: 1,
            progress: false,
            key_seed: None,
            forge_every: 0,
        };
        assert!(matches!(run_load(&base), Err(LoadError::Config(_))));
    }
}
