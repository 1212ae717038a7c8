//! The swarm member's IO: one UDP socket and a monotonic clock around a sans-IO
//! [`SwarmNode`]. [`Member`] runs the node (timers, receive, paced sends); on top of it,
//! [`run_swarm_watch`] plays what arrives (`clubcast watch --tracker`) and [`MemberThread`]
//! runs a publisher's or relay's member beside its other work.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};

use super::watch::{play_released, WatchEnd, WatchError};
use crate::backend::{PortableSocket, RecvBatch};
use crate::crypto::ChannelPublicKey;
use crate::fault::{FaultInjector, FaultSpec, FaultStats};
use crate::metrics::SwarmMetrics;
use crate::swarm::{ChannelInfo, PieceBytes, SwarmConfig, SwarmNode, SwarmStats, STARTUP_HOLD};
use crate::time::{wall_clock_us, MonotonicClock, Timestamp};
use crate::viewer::{Received, Viewer, ViewerConfig, ViewerStats};
use crate::wire::Piece;

/// Socket buffers of a swarm member: a second or two of a fast stream.
const MEMBER_SOCKET_BUFFER: usize = 4 << 20;
/// Longest wait between rounds (bounds how late `stop` and pacing are noticed).
const MAX_WAIT: Duration = Duration::from_millis(5);

/// A swarm member on a real socket.
pub struct Member {
    node: SwarmNode,
    socket: PortableSocket,
    clock: MonotonicClock,
    recv: RecvBatch,
    faults: Option<FaultInjector>,
    send_errors: u64,
}

impl Member {
    /// Binds `listen` for `node`; `faults` are applied to what arrives (testing without netem).
    pub fn bind(
        listen: SocketAddr,
        node: SwarmNode,
        faults: Option<FaultSpec>,
    ) -> io::Result<Self> {
        Ok(Member {
            node,
            socket: PortableSocket::bind(listen, MEMBER_SOCKET_BUFFER)?,
            clock: MonotonicClock::new(),
            recv: RecvBatch::new(),
            faults: faults.map(FaultInjector::new),
            send_errors: 0,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The node.
    pub fn node(&self) -> &SwarmNode {
        &self.node
    }

    /// The node, to feed it.
    pub fn node_mut(&mut self) -> &mut SwarmNode {
        &mut self.node
    }

    /// Now, on this member's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// What the fault injector did.
    pub fn fault_stats(&self) -> Option<FaultStats> {
        self.faults.as_ref().map(FaultInjector::stats)
    }

    /// Sends everything the node has due now.
    pub fn flush(&mut self) {
        let now = self.clock.now();
        while let Some(t) = self.node.poll_transmit(now) {
            // UDP is best effort: a refused send is a lost datagram, which the swarm repairs.
            if self.socket.send_to(t.data.as_bytes(), t.to).is_err() {
                self.send_errors += 1;
            }
        }
    }

    /// One round: timers, sends due, then receive for up to `max_wait` (less if the node wants
    /// to be woken sooner), then sends again.
    pub fn turn(&mut self, max_wait: Duration) -> io::Result<()> {
        let now = self.clock.now();
        self.node.handle_timeout(now);
        self.flush();
        let mut next = self.node.poll_timeout(now);
        if let Some(due) = self.faults.as_ref().and_then(FaultInjector::next_due) {
            next = next.min(due);
        }
        let wait = next.saturating_since(self.clock.now()).min(max_wait);
        if self.socket.wait_readable(wait)? {
            while self.socket.recv_batch(&mut self.recv)? > 0 {
                let now = self.clock.now();
                for i in 0..self.recv.len() {
                    let (from, data) = self.recv.get(i);
                    let Some(from) = from else { continue };
                    match &mut self.faults {
                        Some(f) => f.push_from(now, Some(from), data),
                        None => self.node.handle_datagram(now, from, data),
                    }
                }
            }
        }
        if let Some(f) = &mut self.faults {
            let now = self.clock.now();
            while let Some((from, data)) = f.pop_from(now) {
                if let Some(from) = from {
                    self.node.handle_datagram(now, from, &data);
                }
            }
        }
        let now = self.clock.now();
        self.node.handle_timeout(now);
        self.flush();
        Ok(())
    }

    /// Leaves the swarm: tells linked members and the tracker, and sends it.
    pub fn leave(&mut self) {
        let now = self.clock.now();
        self.node.leave(now);
        self.flush();
    }
}

/// How to watch through the swarm.
#[derive(Debug, Clone)]
pub struct SwarmWatchConfig {
    /// The channel.
    pub channel: ChannelPublicKey,
    /// Local address to receive on (peers and the tracker reach us here).
    pub listen: SocketAddr,
    /// The member's tunables (tracker, upload limit, behaviour).
    pub swarm: SwarmConfig,
    /// Playout tunables (jitter window, content key).
    pub viewer: ViewerConfig,
    /// Give up after this long without a piece once one has come (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Faults to inject into what arrives.
    pub faults: Option<FaultSpec>,
    /// After the end of the stream, keep serving (uploads, repairs) this long before leaving.
    pub linger: Duration,
}

/// What a swarm watch did.
#[derive(Debug, Clone)]
pub struct SwarmWatchReport {
    /// How it ended.
    pub end: WatchEnd,
    /// Playout counters.
    pub viewer: ViewerStats,
    /// Swarm counters.
    pub swarm: SwarmStats,
    /// What the fault injector did.
    pub faults: Option<FaultStats>,
    /// The club whose first piece came last, and how long after the first piece of all
    /// (`None`: it never came).
    pub slowest_club: Option<(u8, Option<Duration>)>,
}

/// Joins the swarm, plays what arrives into `output` and re-uploads, until the stream ends,
/// `stop` is set, or the idle timeout passes. `on_piece` gets each new piece's delay behind
/// the publisher in µs (wall clocks). `on_bound` gets the local address once bound.
pub fn run_swarm_watch(
    config: &SwarmWatchConfig,
    output: &mut dyn Write,
    stop: &AtomicBool,
    metrics: Option<&Arc<SwarmMetrics>>,
    on_bound: &mut dyn FnMut(SocketAddr),
) -> Result<SwarmWatchReport, WatchError> {
    let node = SwarmNode::new(config.channel, config.swarm.clone());
    let mut member = Member::bind(config.listen, node, config.faults.clone())?;
    on_bound(member.local_addr()?);
    let mut viewer = Viewer::new(config.channel, config.viewer.clone());
    let mut last_piece: Option<Instant> = None;
    // Pieces held back until the first piece of every club, from where playing starts, is
    // here (or for a while): the jitter window then starts when playing starts, and the start
    // of the stream, which arrives through catch-up and repair, is not skipped. (A source for
    // every club is not enough: a club's first pieces may still be on their way through
    // catch-up when its link is accepted, and the jitter window would skip them.)
    let mut held: Vec<PieceBytes> = Vec::new();
    let mut held_seqs: BTreeSet<u64> = BTreeSet::new();
    let mut first_arrival: Option<Instant> = None;
    let mut last_metrics = Instant::now();
    let mut finished_at: Option<Instant> = None;
    let end = loop {
        if stop.load(Ordering::Relaxed) {
            break WatchEnd::Stopped;
        }
        member.turn(MAX_WAIT)?;
        let now = member.now();
        // Once playing, pieces go straight to the viewer; until then they are held and their
        // sequence numbers kept, to tell when the head of the stream is complete.
        let playing = viewer.stats().pieces_received > 0;
        while let Some(bytes) = member.node_mut().poll_piece() {
            first_arrival.get_or_insert_with(Instant::now);
            if !playing {
                if let Ok(p) = Piece::parse(&bytes) {
                    held_seqs.insert(p.seq());
                }
            }
            held.push(bytes);
        }
        let starting = !playing
            && !held.is_empty()
            && (first_arrival.is_some_and(|t| t.elapsed() >= STARTUP_HOLD)
                || member
                    .node()
                    .info()
                    .is_some_and(|info| head_is_complete(info, &held_seqs)));
        if starting {
            // In sequence order: where playing starts is decided on the earliest piece held,
            // as `head_is_complete` judged it.
            held.sort_by_cached_key(|b| Piece::parse(b).map_or(u64::MAX, |p| p.seq()));
            held_seqs.clear();
        }
        let release: Vec<PieceBytes> = if playing || starting {
            std::mem::take(&mut held)
        } else {
            Vec::new()
        };
        for bytes in release {
            if viewer.stats().pieces_received == 0 {
                start_playout(&mut viewer, member.node(), &bytes);
                if let (Some(info), Ok(p)) = (member.node().info(), Piece::parse(&bytes)) {
                    tracing::debug!(
                        seq = p.seq() - info.first_seq.min(p.seq()),
                        behind_ms = wall_clock_us().saturating_sub(p.publish_time_us()) / 1000,
                        club = member.node().club(),
                        "first piece"
                    );
                }
            }
            if let Ok(Received::Piece {
                publish_time_us, ..
            }) = viewer.accept_verified(now, &bytes)
            {
                last_piece = Some(Instant::now());
                if let Some(m) = metrics {
                    m.record_delay(wall_clock_us().saturating_sub(publish_time_us));
                }
            }
        }
        play_released(&mut viewer, member.now(), output)?;
        if let Some(m) = metrics {
            if last_metrics.elapsed() >= Duration::from_millis(250) {
                m.update(member.node().stats(), member.node().link_counts());
                last_metrics = Instant::now();
            }
        }
        if viewer.is_finished() {
            // Keep serving the others a little: they may still be repairing the end.
            let at = *finished_at.get_or_insert_with(Instant::now);
            if at.elapsed() >= config.linger {
                break WatchEnd::EndOfStream;
            }
            continue;
        }
        let s = viewer.stats();
        if s.unreadable >= 3 && s.pieces_received == 0 {
            member.leave();
            return Err(WatchError::Private {
                has_key: config.viewer.content_key.is_some(),
            });
        }
        if let (Some(idle), Some(last)) = (config.idle_timeout, last_piece) {
            if last.elapsed() >= idle {
                member.leave();
                return Err(WatchError::Idle {
                    relay: config.swarm.tracker.unwrap_or(config.listen),
                    waited: idle,
                    subscribed: true,
                    live: true,
                });
            }
        }
    };
    tracing::debug!(
        "club {}, {:?}, links at the end:\n{}",
        member.node().club(),
        member.node().stats(),
        member.node().describe_links()
    );
    member.leave();
    output.flush().map_err(WatchError::Output)?;
    if let Some(m) = metrics {
        m.update(member.node().stats(), member.node().link_counts());
    }
    let slowest_club = member.node().slowest_club_start();
    Ok(SwarmWatchReport {
        slowest_club,
        end,
        viewer: viewer.stats().clone(),
        swarm: member.node().stats().clone(),
        faults: member.fault_stats(),
    })
}

/// A member whose first piece is within catch-up reach of the stream's first piece was there
/// when the stream began: it plays from the very first piece, which repair and catch-up
/// bring even if later ones arrived first.
fn start_playout(viewer: &mut Viewer, node: &SwarmNode, first: &[u8]) {
    let (Some(info), Ok(piece)) = (node.info(), Piece::parse(first)) else {
        return;
    };
    if plays_from_first(info, piece.seq()) {
        viewer.expect_from(info.first_seq);
    }
}

/// Whether a member whose earliest piece is `seq` plays from the stream's first piece.
fn plays_from_first(info: &ChannelInfo, seq: u64) -> bool {
    let per_second = (info.bitrate_bps / 8 / crate::ts::PIECE_PAYLOAD as u64).max(1);
    seq >= info.first_seq && seq - info.first_seq <= per_second
}

/// Whether the pieces `held` let playing start with no gap at its head: one piece of every
/// club, in a row, from where playing starts (the stream's first piece, or the earliest held).
fn head_is_complete(info: &ChannelInfo, held: &BTreeSet<u64>) -> bool {
    let Some(&earliest) = held.first() else {
        return false;
    };
    let start = if plays_from_first(info, earliest) {
        info.first_seq
    } else {
        earliest
    };
    (start..start + u64::from(info.clubs)).all(|s| held.contains(&s))
}

/// A swarm member running on its own thread (the publisher's seeding, a relay's amplifier):
/// pieces given to [`MemberThread::publish`] are seeded; the counters are readable at any time.
pub struct MemberThread {
    pieces: Sender<PieceBytes>,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<SwarmStats>>,
    seeded: Arc<AtomicU32>,
    local_addr: SocketAddr,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl MemberThread {
    /// Binds `listen` and starts `node` on a thread named `name`; its figures go to part
    /// `metrics.1` of `metrics.0`.
    pub fn spawn(
        name: &str,
        listen: SocketAddr,
        node: SwarmNode,
        metrics: Option<(Arc<SwarmMetrics>, usize)>,
    ) -> io::Result<Self> {
        let mut member = Member::bind(listen, node, None)?;
        let local_addr = member.local_addr()?;
        let (tx, rx) = crossbeam::channel::bounded::<PieceBytes>(4096);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(SwarmStats::default()));
        let seeded = Arc::new(AtomicU32::new(0));
        let shared = Shared {
            stop: Arc::clone(&stop),
            stats: Arc::clone(&stats),
            seeded: Arc::clone(&seeded),
        };
        let thread = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || member_loop(&mut member, &rx, &shared, metrics.as_ref()))?;
        Ok(MemberThread {
            pieces: tx,
            stop,
            stats,
            seeded,
            local_addr,
            thread: Some(thread),
        })
    }

    /// The member's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Seeds a signed piece (publisher).
    pub fn publish(&self, piece: &[u8]) {
        if Piece::parse(piece).is_ok() {
            // A full queue means the member is far behind; the swarm repairs what is skipped.
            let _ = self.pieces.try_send(Arc::from(piece));
        }
    }

    /// Publisher: how many clubs have a seed now.
    pub fn clubs_seeded(&self) -> u32 {
        self.seeded.load(Ordering::Relaxed)
    }

    /// The member's counters now.
    pub fn stats(&self) -> SwarmStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Lets queued pieces go out for up to `grace`, then leaves the swarm and stops.
    pub fn finish(mut self, grace: Duration) -> io::Result<SwarmStats> {
        thread::sleep(grace);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| io::Error::other("swarm member thread panicked"))??;
        }
        Ok(self.stats())
    }
}

impl Drop for MemberThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a member thread shares with its owner.
struct Shared {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<SwarmStats>>,
    seeded: Arc<AtomicU32>,
}

fn member_loop(
    member: &mut Member,
    pieces: &Receiver<PieceBytes>,
    shared: &Shared,
    metrics: Option<&(Arc<SwarmMetrics>, usize)>,
) -> io::Result<()> {
    let Shared {
        stop,
        stats,
        seeded,
    } = shared;
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        while let Ok(p) = pieces.try_recv() {
            let now = member.now();
            member.node_mut().publish(now, p);
        }
        member.turn(Duration::from_millis(1))?;
        seeded.store(member.node().clubs_seeded(), Ordering::Relaxed);
        if last_stats.elapsed() >= Duration::from_millis(100) {
            if let Ok(mut s) = stats.lock() {
                s.clone_from(member.node().stats());
            }
            if let Some((m, part)) = metrics {
                m.update_part(*part, member.node().stats(), member.node().link_counts());
            }
            last_stats = Instant::now();
        }
    }
    tracing::debug!(
        "{:?}, links at the end:\n{}",
        member.node().stats(),
        member.node().describe_links()
    );
    member.leave();
    if let Ok(mut s) = stats.lock() {
        s.clone_from(member.node().stats());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ChannelInfo {
        ChannelInfo {
            clubs: 4,
            bitrate_bps: 8 * crate::ts::PIECE_PAYLOAD as u64 * 10, // 10 pieces a second
            first_seq: 100,
            private: false,
        }
    }

    #[test]
    fn playing_waits_for_one_piece_of_every_club_from_its_start() {
        let info = info();
        let held = |seqs: &[u64]| seqs.iter().copied().collect::<BTreeSet<u64>>();
        // There at the start: the stream's first pieces are needed, whatever came first.
        assert!(!head_is_complete(&info, &held(&[])));
        assert!(!head_is_complete(&info, &held(&[101, 102, 103, 104, 105])));
        assert!(head_is_complete(&info, &held(&[100, 101, 102, 103])));
        assert!(!head_is_complete(
            &info,
            &held(&[100, 101, 103, 104, 105, 106])
        ));
        // Joining later: from the earliest piece held.
        assert!(head_is_complete(&info, &held(&[500, 501, 502, 503, 509])));
        assert!(!head_is_complete(&info, &held(&[500, 501, 503, 504])));
    }
}
