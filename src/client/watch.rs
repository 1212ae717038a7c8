//! `clubcast watch`: subscribe at a relay, verify and reorder pieces, write the MPEG-TS out.
//!
//! The loop sends what the [`Viewer`] asks for, feeds it every datagram from the relay, writes
//! each piece it releases in order, and flushes after every round so a player downstream sees
//! data with no added delay. It ends when the stream's end-of-stream piece is played (after an
//! UNSUBSCRIBE), when `stop` is set, or after `idle_timeout` without a piece.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::backend::RecvBatch;
use crate::crypto::ChannelPublicKey;
use crate::fault::{FaultInjector, FaultSpec, FaultStats};
use crate::time::{wall_clock_us, MonotonicClock};
use crate::viewer::{Received, Viewer, ViewerConfig, ViewerStats};
use crate::wire::MAX_DATAGRAM;

/// How to watch.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The relay.
    pub relay: SocketAddr,
    /// The channel (its public key).
    pub channel: ChannelPublicKey,
    /// Viewer tunables.
    pub viewer: ViewerConfig,
    /// Give up after this long without a piece (`None`: wait forever).
    pub idle_timeout: Option<Duration>,
    /// Faults to inject into what arrives from the relay (testing without netem).
    pub faults: Option<FaultSpec>,
}

/// How a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The publisher ended the stream.
    EndOfStream,
    /// Stopped from outside.
    Stopped,
}

/// What a watch did.
#[derive(Debug, Clone)]
pub struct WatchReport {
    /// How it ended.
    pub end: WatchEnd,
    /// The viewer's counters.
    pub stats: ViewerStats,
    /// Datagrams from addresses other than the relay, ignored.
    pub foreign_datagrams: u64,
    /// What the fault injector did, if one was configured.
    pub faults: Option<FaultStats>,
}

/// Why watching failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The output could not be written (e.g. the player downstream exited).
    #[error("writing output: {0}")]
    Output(io::Error),
    /// A socket error.
    #[error("socket: {0}")]
    Socket(#[from] io::Error),
    /// The channel is private and its pieces cannot be read here.
    #[error("channel is private: its pieces are encrypted and {}", if *.has_key { "the content key given does not decrypt them (wrong key?)" } else { "this watcher has no content key; pass --content-key FILE (written by keygen --private)" })]
    Private {
        /// Whether a (wrong) key was given.
        has_key: bool,
    },
    /// Nothing arrived for too long.
    #[error("no piece from relay {relay} for {waited:?} (subscribed: {subscribed}, publisher seen: {live})")]
    Idle {
        /// The relay.
        relay: SocketAddr,
        /// The idle time.
        waited: Duration,
        /// Whether the relay confirmed the subscription.
        subscribed: bool,
        /// Whether the relay had seen the publisher.
        live: bool,
    },
}

/// Verified but unreadable pieces (private channel) after which a watch gives up.
const UNREADABLE_BEFORE_GIVING_UP: u64 = 3;

/// Longest wait between rounds (bounds how late `stop` is noticed).
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Watches until the stream ends, `stop` is set, or the idle timeout passes. `on_piece` is
/// called for each verified piece with its delay behind the publisher in µs (wall clocks).
pub fn run_watch(
    config: &WatchConfig,
    output: &mut dyn Write,
    stop: &AtomicBool,
    on_piece: &mut dyn FnMut(u64),
) -> Result<WatchReport, WatchError> {
    let socket = super::socket_towards(config.relay, super::CLIENT_SOCKET_BUFFER)?;
    let clock = MonotonicClock::new();
    let mut viewer = Viewer::new(config.channel, config.viewer.clone());
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut recv = RecvBatch::new();
    let mut foreign = 0u64;
    let mut last_piece = Instant::now();
    let mut faults = config.faults.clone().map(FaultInjector::new);

    let end = loop {
        if stop.load(Ordering::Relaxed) {
            break WatchEnd::Stopped;
        }
        while let Some(n) = viewer.poll_transmit(clock.now(), &mut buf) {
            // Lost control messages are retried by the viewer's timers.
            let _ = socket.send_to(&buf[..n], config.relay);
        }
        let mut next = viewer.poll_timeout();
        if let Some(due) = faults.as_ref().and_then(FaultInjector::next_due) {
            next = next.min(due);
        }
        let wait = next.saturating_since(clock.now()).min(MAX_WAIT);
        if socket.wait_readable(wait)? {
            while socket.recv_batch(&mut recv)? > 0 {
                let now = clock.now();
                for i in 0..recv.len() {
                    let (from, data) = recv.get(i);
                    if from != Some(config.relay) {
                        foreign += 1;
                        continue;
                    }
                    match &mut faults {
                        Some(f) => f.push(now, data),
                        None => deliver(&mut viewer, now, data, &mut last_piece, on_piece),
                    }
                }
            }
        }
        if let Some(f) = &mut faults {
            let now = clock.now();
            while let Some(data) = f.pop(now) {
                deliver(&mut viewer, now, &data, &mut last_piece, on_piece);
            }
        }
        play_released(&mut viewer, clock.now(), output)?;
        if viewer.is_finished() {
            break WatchEnd::EndOfStream;
        }
        // A few verified pieces, none readable: say so rather than wait in silence.
        let s = viewer.stats();
        if s.unreadable >= UNREADABLE_BEFORE_GIVING_UP && s.pieces_received == 0 {
            return Err(WatchError::Private {
                has_key: config.viewer.content_key.is_some(),
            });
        }
        if let Some(idle) = config.idle_timeout {
            if last_piece.elapsed() >= idle {
                return Err(WatchError::Idle {
                    relay: config.relay,
                    waited: idle,
                    subscribed: viewer.is_subscribed(),
                    live: viewer.is_live(),
                });
            }
        }
    };
    if let Some(n) = viewer.encode_unsubscribe(&mut buf) {
        let _ = socket.send_to(&buf[..n], config.relay);
    }
    output.flush().map_err(WatchError::Output)?;
    Ok(WatchReport {
        end,
        stats: viewer.stats().clone(),
        foreign_datagrams: foreign,
        faults: faults.as_ref().map(FaultInjector::stats),
    })
}

/// Hands one datagram from the relay to the viewer.
fn deliver(
    viewer: &mut Viewer,
    now: crate::time::Timestamp,
    data: &[u8],
    last_piece: &mut Instant,
    on_piece: &mut dyn FnMut(u64),
) {
    if let Ok(Received::Piece {
        publish_time_us, ..
    }) = viewer.handle_datagram(now, data)
    {
        *last_piece = Instant::now();
        on_piece(wall_clock_us().saturating_sub(publish_time_us));
    }
}

/// Writes every piece the viewer releases now, in order, and flushes so a player downstream
/// sees them with no added delay.
pub(crate) fn play_released(
    viewer: &mut Viewer,
    now: crate::time::Timestamp,
    output: &mut dyn Write,
) -> Result<(), WatchError> {
    let mut wrote = false;
    while let Some(piece) = viewer.poll_piece(now) {
        output
            .write_all(&piece.payload)
            .map_err(WatchError::Output)?;
        wrote = true;
    }
    if wrote {
        output.flush().map_err(WatchError::Output)?;
    }
    Ok(())
}
