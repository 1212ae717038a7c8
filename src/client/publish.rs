//! `clubcast publish`: read MPEG-TS, cut it into signed pieces, push them to a relay and/or
//! seed them into the swarm (a [`MemberThread`] that registers the channel's signed descriptor
//! with the tracker and pushes each piece to seeds of its club, within an upload limit).
//!
//! A reader thread turns the input (stdin, a file, a UDP port, or the built-in synthetic
//! stream) into byte chunks; the sending loop cuts whole TS packets into pieces of six, paces
//! them (by PCR with `realtime`, and never above `max_bitrate`), keeps the channel announced,
//! and ends the stream with end-of-stream pieces when the input ends.

use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::backend::{PortableSocket, RecvBatch};
use crate::crypto::{ChannelKey, ContentKey};
use crate::publisher::Publisher;
use crate::swarm::{ChannelInfo, SwarmConfig, SwarmNode, SwarmStats};
use crate::time::{wall_clock_us, MonotonicClock};
use crate::ts::{self, PacketChunker, PcrClock, SyntheticTs, PACKETS_PER_PIECE, PACKET_LEN};
use crate::wire::{Descriptor, PieceFlags, MAX_DATAGRAM};

use super::swarm::MemberThread;

/// Where the MPEG-TS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Standard input.
    Stdin,
    /// A file.
    File(PathBuf),
    /// Datagrams arriving on a local UDP address (e.g. from `ffmpeg ... -f mpegts udp://...`).
    Udp(SocketAddr),
    /// The built-in synthetic stream, generated in real time.
    Synthetic {
        /// Bits per second.
        bitrate_bps: u64,
        /// How long to run.
        duration: Duration,
    },
}

impl Input {
    /// `-` for stdin, `udp://ADDR` for a UDP listener, anything else is a file path.
    pub fn parse(spec: &str) -> Result<Self, PublishError> {
        if spec == "-" {
            return Ok(Input::Stdin);
        }
        if let Some(addr) = spec.strip_prefix("udp://") {
            return addr
                .parse()
                .map(Input::Udp)
                .map_err(|_| PublishError::BadInput(format!("{spec}: expected udp://IP:PORT")));
        }
        Ok(Input::File(PathBuf::from(spec)))
    }
}

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// The input.
    pub input: Input,
    /// Relay to push pieces to.
    pub relay: Option<SocketAddr>,
    /// Seed the swarm through a tracker.
    pub swarm: Option<PublishSwarm>,
    /// Pace a file by its PCRs (its real bitrate) instead of as fast as `max_bitrate` allows.
    pub realtime: bool,
    /// Never send faster than this many bits per second.
    pub max_bitrate_bps: u64,
    /// Number of clubs the stream is split into (`seq % clubs`).
    pub clubs: u8,
    /// How long to wait for the relay to acknowledge the announce.
    pub announce_timeout: Duration,
    /// Private channel: encrypt payloads with this content key.
    pub content_key: Option<ContentKey>,
}

/// How the publisher seeds the swarm.
#[derive(Debug, Clone)]
pub struct PublishSwarm {
    /// The tracker.
    pub tracker: SocketAddr,
    /// Local address for the swarm socket.
    pub listen: SocketAddr,
    /// Most the publisher uploads to the swarm, bits per second.
    pub upload_limit_bps: Option<u64>,
    /// The stream's nominal bitrate, announced in the descriptor (members size their uploads
    /// by it).
    pub stream_bitrate_bps: u64,
    /// After the last piece, keep serving repairs this long.
    pub linger: Duration,
    /// Before the first piece, wait up to this long for every club to have a seed (members
    /// that were waiting for the channel then get it from its first piece).
    pub wait_for_seeds: Duration,
}

/// What a publishing session did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Pieces sent (including end-of-stream pieces).
    pub pieces: u64,
    /// TS payload bytes sent.
    pub payload_bytes: u64,
    /// Input bytes skipped to regain TS sync, plus a trailing partial packet.
    pub skipped_bytes: u64,
    /// Wall time from first piece to last.
    pub elapsed: Duration,
    /// What the swarm member did, when seeding a swarm.
    pub swarm: Option<SwarmStats>,
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The input could not be opened or read.
    #[error("input {what}: {source}")]
    Input {
        /// Which input.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// An input spec that makes no sense.
    #[error("bad input: {0}")]
    BadInput(String),
    /// The relay never acknowledged the announce.
    #[error("relay {relay} did not acknowledge the channel announce within {waited:?} (is `clubcast relay` running there?)")]
    RelayUnreachable {
        /// The relay.
        relay: SocketAddr,
        /// How long we waited.
        waited: Duration,
    },
    /// A socket error.
    #[error("socket: {0}")]
    Socket(#[from] io::Error),
}

/// End-of-stream pieces sent at the end, so that one lost copy does not leave viewers waiting.
const END_PIECES: usize = 3;
/// A partial piece is sent when no input arrived for this long.
const FLUSH_AFTER: Duration = Duration::from_millis(20);

/// Publishes `config.input` to the relay until the input ends or `stop` is set.
pub fn run_publish(
    key: ChannelKey,
    config: &PublishConfig,
    stop: Arc<AtomicBool>,
) -> Result<PublishReport, PublishError> {
    let towards = match (config.relay, &config.swarm) {
        (Some(r), _) => r,
        (None, Some(s)) => s.tracker,
        (None, None) => {
            return Err(PublishError::BadInput(
                "nowhere to publish: give a relay, a tracker, or both".into(),
            ))
        }
    };
    let socket = super::socket_towards(towards, super::CLIENT_SOCKET_BUFFER)?;
    let epoch_us = wall_clock_us();
    let swarm = match &config.swarm {
        Some(s) => Some(start_swarm(&key, epoch_us, config, s)?),
        None => None,
    };
    let chunks = spawn_reader(&config.input, Arc::clone(&stop))?;
    let mut publisher = Publisher::new(key, epoch_us, config.clubs);
    if let Some(k) = &config.content_key {
        publisher = publisher.with_content_key(k.clone());
    }
    // Whole TS packets per piece: six, or five when the encryption tag takes room.
    let per_piece = (publisher.max_payload() / PACKET_LEN).min(PACKETS_PER_PIECE);
    let mut session = Session {
        publisher,
        socket,
        relay: config.relay,
        swarm,
        clock: MonotonicClock::new(),
        buf: vec![0; MAX_DATAGRAM],
        recv: RecvBatch::new(),
        pacer: Pacer::new(config.max_bitrate_bps, config.realtime),
        report: PublishReport::default(),
    };
    if let Some(relay) = config.relay {
        session.announce(relay, config.announce_timeout)?;
        tracing::info!(%relay, channel = %session.publisher.public_key(), "channel announced; publishing");
    }

    let started = Instant::now();
    let mut chunker = PacketChunker::new();
    let mut payload = Vec::with_capacity(ts::PIECE_PAYLOAD);
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match chunks.recv_timeout(FLUSH_AFTER) {
            Ok(bytes) => chunker.push(&bytes),
            Err(RecvTimeoutError::Timeout) => {
                if chunker.packets() > 0 {
                    payload.clear();
                    chunker.take(per_piece, &mut payload);
                    session.send_piece(&payload, PieceFlags::empty())?;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while chunker.packets() >= per_piece {
            payload.clear();
            chunker.take(per_piece, &mut payload);
            session.send_piece(&payload, PieceFlags::empty())?;
        }
        session.service()?;
    }
    while chunker.packets() > 0 {
        payload.clear();
        chunker.take(per_piece, &mut payload);
        session.send_piece(&payload, PieceFlags::empty())?;
    }
    for _ in 0..END_PIECES {
        session.send_piece(&[], PieceFlags::END_OF_STREAM)?;
        thread::sleep(Duration::from_millis(2));
    }
    session.report.skipped_bytes = chunker.skipped_bytes() + chunker.partial_bytes() as u64;
    session.report.elapsed = started.elapsed();
    if let (Some(member), Some(s)) = (session.swarm.take(), &config.swarm) {
        session.report.swarm = Some(member.finish(s.linger)?);
    }
    Ok(session.report)
}

/// Starts the publisher's swarm member: signs the descriptor and seeds from a thread.
fn start_swarm(
    key: &ChannelKey,
    epoch_us: u64,
    config: &PublishConfig,
    s: &PublishSwarm,
) -> Result<MemberThread, PublishError> {
    let public = key.public();
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = Descriptor::encode_signed(
        &public.to_bytes(),
        epoch_us,
        config.clubs,
        config.content_key.is_some(),
        s.stream_bitrate_bps,
        &mut buf,
        |m| key.sign(m),
    )
    .map_err(|e| PublishError::BadInput(e.to_string()))?;
    let info = ChannelInfo {
        clubs: config.clubs,
        bitrate_bps: s.stream_bitrate_bps,
        first_seq: epoch_us,
        private: config.content_key.is_some(),
    };
    let node = SwarmNode::publisher(
        public,
        info,
        buf[..n].to_vec(),
        SwarmConfig {
            tracker: Some(s.tracker),
            upload_limit_bps: s.upload_limit_bps,
            seed: rand::random(),
            ..SwarmConfig::default()
        },
    );
    let member = MemberThread::spawn("swarm-publisher", s.listen, node, None)?;
    tracing::info!(tracker = %s.tracker, swarm = %member.local_addr(), "seeding the swarm");
    let deadline = Instant::now() + s.wait_for_seeds;
    while member.clubs_seeded() < u32::from(config.clubs) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    tracing::info!(
        "{} of {} clubs have a seed; publishing",
        member.clubs_seeded(),
        config.clubs
    );
    Ok(member)
}

struct Session {
    publisher: Publisher,
    socket: PortableSocket,
    relay: Option<SocketAddr>,
    swarm: Option<MemberThread>,
    clock: MonotonicClock,
    buf: Vec<u8>,
    recv: RecvBatch,
    pacer: Pacer,
    report: PublishReport,
}

impl Session {
    /// Announces until the relay acknowledges or `timeout` passes.
    fn announce(&mut self, relay: SocketAddr, timeout: Duration) -> Result<(), PublishError> {
        let deadline = Instant::now() + timeout;
        while !self.publisher.is_announced() {
            let now = Instant::now();
            if now >= deadline {
                return Err(PublishError::RelayUnreachable {
                    relay,
                    waited: timeout,
                });
            }
            self.send_announce_if_due();
            let wait = self
                .publisher
                .poll_timeout()
                .saturating_since(self.clock.now())
                .min(deadline - now);
            if self.socket.wait_readable(wait)? {
                self.drain_replies()?;
            }
        }
        Ok(())
    }

    fn send_announce_if_due(&mut self) {
        let Some(relay) = self.relay else { return };
        if let Some(n) = self
            .publisher
            .poll_announce(self.clock.now(), &mut self.buf)
        {
            // A lost or refused announce is retried on the next tick.
            let _ = self.socket.send_to(&self.buf[..n], relay);
        }
    }

    fn drain_replies(&mut self) -> io::Result<()> {
        while self.socket.recv_batch(&mut self.recv)? > 0 {
            for i in 0..self.recv.len() {
                let (from, data) = self.recv.get(i);
                if from.is_some() && from == self.relay {
                    self.publisher.handle_datagram(data);
                }
            }
        }
        Ok(())
    }

    /// Keeps the announce fresh and reads acknowledgements; never blocks.
    fn service(&mut self) -> io::Result<()> {
        self.send_announce_if_due();
        self.drain_replies()
    }

    fn send_piece(&mut self, payload: &[u8], mut flags: PieceFlags) -> Result<(), PublishError> {
        if payload.chunks(PACKET_LEN).any(random_access) {
            flags = flags | PieceFlags::KEYFRAME;
        }
        self.pacer.wait(payload);
        let n = self
            .publisher
            .encode_piece(payload, flags, wall_clock_us(), &mut self.buf)
            .map_err(|e| PublishError::BadInput(e.to_string()))?;
        // The relay may be momentarily unreachable or our buffer full: UDP is best effort, the
        // viewer's jitter buffer skips what is lost.
        if let Some(member) = &self.swarm {
            member.publish(&self.buf[..n]);
        }
        let sent = match self.relay {
            Some(relay) => self.socket.send_to(&self.buf[..n], relay).is_ok(),
            None => true,
        };
        if sent {
            self.report.pieces += 1;
            self.report.payload_bytes += payload.len() as u64;
        }
        if self.report.pieces % 64 == 0 {
            self.service()?;
        }
        Ok(())
    }
}

/// Whether a TS packet sets the random-access indicator (a keyframe starts in it).
fn random_access(packet: &[u8]) -> bool {
    packet.len() > 5 && packet[3] & 0x20 != 0 && packet[4] > 0 && packet[5] & 0x40 != 0
}

/// Paces pieces by PCR (real time) and by a bitrate ceiling.
struct Pacer {
    max_bitrate_bps: u64,
    next_free: Instant,
    realtime: Option<(PcrClock, Instant)>,
}

impl Pacer {
    /// Longest burst the bitrate ceiling lets through after an idle spell.
    const MAX_BURST: Duration = Duration::from_millis(20);

    fn new(max_bitrate_bps: u64, realtime: bool) -> Self {
        Pacer {
            max_bitrate_bps: max_bitrate_bps.max(8 * PACKET_LEN as u64),
            next_free: Instant::now(),
            realtime: realtime.then(|| (PcrClock::new(), Instant::now())),
        }
    }

    /// Sleeps until `payload` may be sent.
    fn wait(&mut self, payload: &[u8]) {
        if let Some((clock, start)) = &mut self.realtime {
            if let Some(pcr) = payload.chunks(PACKET_LEN).find_map(ts::pcr) {
                sleep_until(*start + clock.offset(pcr));
            }
        }
        let now = Instant::now();
        if self.next_free + Self::MAX_BURST < now {
            self.next_free = now - Self::MAX_BURST;
        }
        sleep_until(self.next_free);
        let bits = (payload.len().max(1) * 8) as u64;
        self.next_free += Duration::from_nanos(bits * 1_000_000_000 / self.max_bitrate_bps);
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// Starts the thread that reads the input; chunks arrive on the returned channel, which closes
/// at the end of the input.
fn spawn_reader(input: &Input, stop: Arc<AtomicBool>) -> Result<Receiver<Vec<u8>>, PublishError> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(64);
    let input_err = |what: String| move |source| PublishError::Input { what, source };
    match input.clone() {
        Input::Stdin => spawn(move || read_stream(io::stdin().lock(), &tx, &stop)),
        Input::File(path) => {
            let file = File::open(&path).map_err(input_err(path.display().to_string()))?;
            if file.metadata().is_ok_and(|m| m.is_dir()) {
                return Err(PublishError::BadInput(format!(
                    "{} is a directory",
                    path.display()
                )));
            }
            spawn(move || read_stream(file, &tx, &stop))
        }
        Input::Udp(addr) => {
            let socket = UdpSocket::bind(addr).map_err(input_err(format!("udp://{addr}")))?;
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(input_err(format!("udp://{addr}")))?;
            spawn(move || read_udp(&socket, &tx, &stop))
        }
        Input::Synthetic {
            bitrate_bps,
            duration,
        } => spawn(move || generate(bitrate_bps, duration, &tx, &stop)),
    }
    .map_err(PublishError::Socket)?;
    Ok(rx)
}

fn spawn(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    thread::Builder::new()
        .name("publish-input".into())
        .spawn(f)
        .map(|_| ())
}

fn read_stream(mut r: impl Read, tx: &SyncSender<Vec<u8>>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match r.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!("reading input: {e}");
                return;
            }
        }
    }
}

fn read_udp(socket: &UdpSocket, tx: &SyncSender<Vec<u8>>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv(&mut buf) {
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::error!("reading UDP input: {e}");
                return;
            }
        }
    }
}

fn generate(bitrate_bps: u64, duration: Duration, tx: &SyncSender<Vec<u8>>, stop: &AtomicBool) {
    let mut stream = SyntheticTs::new(bitrate_bps);
    let start = Instant::now();
    let tick = Duration::from_millis(5);
    while !stop.load(Ordering::Relaxed) {
        let t = start.elapsed().min(duration);
        let mut chunk = Vec::new();
        stream.generate_until(t, &mut chunk);
        if !chunk.is_empty() && tx.send(chunk).is_err() {
            return;
        }
        if t >= duration {
            return;
        }
        thread::sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_specs() {
        assert_eq!(Input::parse("-").unwrap(), Input::Stdin);
        assert_eq!(
            Input::parse("udp://127.0.0.1:1234").unwrap(),
            Input::Udp("127.0.0.1:1234".parse().unwrap())
        );
        assert!(matches!(
            Input::parse("udp://nope"),
            Err(PublishError::BadInput(_))
        ));
        assert_eq!(Input::parse("a.ts").unwrap(), Input::File("a.ts".into()));
    }

    #[test]
    fn pacer_holds_the_bitrate_ceiling() {
        let mut p = Pacer::new(8 * 1128 * 200, false); // 200 full pieces per second
        let start = Instant::now();
        for _ in 0..21 {
            p.wait(&[0u8; 1128]);
        }
        // 21 pieces: the first goes at once (burst allowance), the rest 5 ms apart.
        assert!(
            start.elapsed() >= Duration::from_millis(95),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = spawn_reader(
            &Input::File("/nonexistent/x.ts".into()),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.ts"), "{err}");
    }
}
