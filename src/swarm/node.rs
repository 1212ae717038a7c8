//! [`SwarmNode`]: one member of a channel's swarm — peer, relay amplifier or publisher — as a
//! sans-IO state machine. It takes datagrams and a time, and gives back datagrams to send
//! ([`SwarmNode::poll_transmit`]), verified pieces to play ([`SwarmNode::poll_piece`]) and when
//! it next wants to be woken ([`SwarmNode::poll_timeout`]).
//!
//! How pieces flow (the club design of BitTorrent Live):
//! - piece `seq` belongs to club `seq % K`; each peer is a member of one club;
//! - the publisher pushes each piece to a few *seeds* of its club (peers or relays that asked);
//! - a member that gets a piece of its own club first pushes it at once to its club mates
//!   (no window; the duplicates are counted), and through the paced, congestion-controlled
//!   last hop to the outside members that asked it for its club;
//! - it gets every other club from one upstream per club (a member of that club or a relay);
//! - relays are members of every club with a large out-degree;
//! - gaps are NACKed to an upstream, which resends from its ring under LEDBAT while the piece
//!   can still play; a new link starts with the last second of its clubs (catch-up), also under
//!   LEDBAT;
//! - upstreams that fall silent, lose or delay too much are replaced; one that sends a piece
//!   that fails verification is banned.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::link::Link;
use super::pacer::TokenBucket;
use super::ring::{PieceBytes, PieceRing};
use super::stats::SwarmStats;
use crate::crypto::{verify_descriptor, ChannelPublicKey};
use crate::relay::cookie::{CookieCheck, CookieJar};
use crate::time::Timestamp;
use crate::wire::{
    Accept, Ack, AckEntry, ChannelId, ClubMask, Cookie, CookieBytes, Descriptor, Hello, Join,
    Message, Nack, PeerEntry, Piece, PieceHeader, Role, TrackerAnnounce, MAX_DATAGRAM,
};

/// The club value of a member of every club (relays) and of the publisher.
pub const ALL_CLUBS: u8 = 0xff;
/// The club value of a peer that has not chosen its club yet.
pub const NO_CLUB: u8 = 0xfe;

/// How a member behaves: honest, or one of the adversaries the tests and simulator use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Follows the protocol.
    #[default]
    Honest,
    /// Corrupts every piece it forwards (its neighbours must ban it).
    Forger,
    /// Downloads and never uploads (accepts links and sends nothing).
    FreeRider,
    /// Forwards every piece this much late.
    Delayer(Duration),
}

/// What a channel is, from its signed descriptor.
#[derive(Debug, Clone)]
pub struct ChannelInfo {
    /// Number of clubs K (1..=64).
    pub clubs: u8,
    /// Nominal stream bitrate, bits per second.
    pub bitrate_bps: u64,
    /// The publisher session's first sequence number.
    pub first_seq: u64,
    /// Payloads are encrypted.
    pub private: bool,
}

/// Tunables of a swarm member.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// What this member is.
    pub role: Role,
    /// The tracker, if members are found through one.
    pub tracker: Option<SocketAddr>,
    /// Upload cap, bits per second (`None`: unlimited).
    pub upload_limit_bps: Option<u64>,
    /// Club mates kept (in-club push goes to each).
    pub max_mates: usize,
    /// Most downstream links (outside members we push to). Peers are further held to what
    /// their upload limit affords.
    pub max_downstreams: usize,
    /// Publisher: most seeds per club.
    pub seeds_per_club: usize,
    /// How long pieces are kept for repair and catch-up.
    pub ring: Duration,
    /// A piece older than this (since it arrived) is not resent: it could not play in time.
    pub repair_horizon: Duration,
    /// How much of the recent stream a new downstream link gets (catch-up).
    pub catch_up: Duration,
    /// How long a gap waits (for reordering) before it is NACKed.
    pub nack_delay: Duration,
    /// A club silent this long (or for eight of its pieces, if that is longer), while others
    /// arrive, gets a new upstream.
    pub silence_timeout: Duration,
    /// An upstream whose pieces trail the fastest path by this much is replaced.
    pub slow_threshold: Duration,
    /// Links not kept alive for this long are dropped.
    pub link_timeout: Duration,
    /// Interval between JOIN keepalives on links we asked for.
    pub keepalive: Duration,
    /// Interval between tracker announces.
    pub announce_interval: Duration,
    /// Honest or adversarial.
    pub behaviour: Behaviour,
    /// Seed of the member's random choices (fixed in tests and the simulator).
    pub seed: u64,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            role: Role::Peer,
            tracker: None,
            upload_limit_bps: None,
            max_mates: 4,
            max_downstreams: 64,
            seeds_per_club: 2,
            ring: Duration::from_secs(4),
            repair_horizon: Duration::from_secs(2),
            catch_up: Duration::from_secs(1),
            nack_delay: Duration::from_millis(40),
            silence_timeout: Duration::from_millis(600),
            slow_threshold: Duration::from_millis(800),
            link_timeout: Duration::from_secs(4),
            keepalive: Duration::from_secs(1),
            announce_interval: Duration::from_secs(5),
            behaviour: Behaviour::Honest,
            seed: 0,
        }
    }
}

/// Checks piece signatures. The default checks each one; the simulator shares one result per
/// piece among its many members.
pub trait PieceVerifier {
    /// Whether `piece` (whose bytes are `bytes`) is signed by `key`.
    fn verify(&mut self, key: &ChannelPublicKey, piece: &Piece<'_>, bytes: &PieceBytes) -> bool;
}

/// Verifies every piece with Ed25519.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ed25519Verifier;

impl PieceVerifier for Ed25519Verifier {
    fn verify(&mut self, key: &ChannelPublicKey, piece: &Piece<'_>, _: &PieceBytes) -> bool {
        key.verify_piece(piece).is_ok()
    }
}

/// A datagram to send.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// Bytes.
    pub data: Datagram,
}

/// The bytes of a [`Transmit`].
#[derive(Debug, Clone)]
pub enum Datagram {
    /// A piece, shared with the ring and every other queue that holds it.
    Piece(PieceBytes),
    /// A control message.
    Control(Vec<u8>),
}

impl Datagram {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Datagram::Piece(p) => p,
            Datagram::Control(c) => c,
        }
    }
}

/// A member we heard of (from the tracker, or because it contacted us).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    role: Role,
    club: u8,
    /// Do not ask it again before this.
    backoff_until: Timestamp,
}

/// A gap being repaired.
#[derive(Debug, Clone, Copy)]
struct Missing {
    noticed: Timestamp,
    next_nack: Timestamp,
    tries: u32,
    /// The upstream first asked: if the piece comes from elsewhere or never, it missed it.
    blamed: Option<SocketAddr>,
}

/// A piece queued for sending.
#[derive(Debug, Clone)]
struct Queued {
    to: SocketAddr,
    seq: u64,
    bytes: PieceBytes,
    queued: Timestamp,
}

/// Tracker conversation state.
#[derive(Debug)]
struct TrackerState {
    addr: SocketAddr,
    cookie: Option<CookieBytes>,
    next_announce: Timestamp,
    nonce: u64,
}

/// One member of one channel's swarm.
pub struct SwarmNode {
    config: SwarmConfig,
    key: ChannelPublicKey,
    channel: ChannelId,
    info: Option<ChannelInfo>,
    /// The publisher's signed descriptor, sent to the tracker (publisher only).
    descriptor: Option<Vec<u8>>,
    club: u8,
    club_chosen: bool,
    verifier: Box<dyn PieceVerifier + Send>,
    cookies: CookieJar,
    tracker: Option<TrackerState>,
    candidates: BTreeMap<SocketAddr, Candidate>,
    links: BTreeMap<SocketAddr, Link>,
    banned: BTreeSet<SocketAddr>,
    ring: PieceRing,
    /// Highest sequence number received per club.
    club_high: Vec<Option<u64>>,
    /// When each club last delivered a new piece.
    club_last: Vec<Timestamp>,
    missing: BTreeMap<u64, Missing>,
    /// Highest sequence number received, and the one up to which gaps were looked for.
    global_high: Option<u64>,
    gaps_checked: Option<u64>,
    last_new_piece: Timestamp,
    /// When the member first ran its timers knowing the channel.
    info_since: Option<Timestamp>,
    /// Smallest (arrival − publish time) seen: the fastest path's offset.
    best_offset_us: Option<i64>,
    control: VecDeque<Transmit>,
    urgent: VecDeque<Queued>,
    live: VecDeque<Queued>,
    delayed: VecDeque<(Timestamp, Queued, bool)>,
    bucket: TokenBucket,
    delivered: VecDeque<PieceBytes>,
    rng: StdRng,
    stats: SwarmStats,
    next_tick: Timestamp,
    started: Option<Timestamp>,
    leaving: bool,
}

/// Largest live queue, in pieces; beyond it the oldest are dropped.
const MAX_LIVE_QUEUE: usize = 4096;
/// Live pieces waiting longer than this are dropped: they would arrive too late to matter.
const MAX_LIVE_WAIT: Duration = Duration::from_millis(500);
/// How often links, repairs and timers are looked at.
const TICK: Duration = Duration::from_millis(20);
/// ACKs are flushed after this long or when full.
const ACK_DELAY: Duration = Duration::from_millis(20);
/// Gaps NACKed at most this many times.
const MAX_NACKS: u32 = 10;
/// Links asked for at once while looking for sources.
const MAX_PENDING_JOINS: usize = 8;

impl SwarmNode {
    /// A peer or relay of the channel with key `key`; it learns the channel's clubs and bitrate
    /// from the descriptor the tracker serves.
    pub fn new(key: ChannelPublicKey, config: SwarmConfig) -> Self {
        let club = if config.role == Role::Peer {
            NO_CLUB
        } else {
            ALL_CLUBS
        };
        SwarmNode {
            cookies: CookieJar::new(
                StdRng::seed_from_u64(config.seed ^ 0xc0c1).gen(),
                COOKIE_BUCKET,
            ),
            tracker: config.tracker.map(|addr| TrackerState {
                addr,
                cookie: None,
                next_announce: Timestamp::ZERO,
                nonce: config.seed | 1,
            }),
            rng: StdRng::seed_from_u64(config.seed),
            bucket: TokenBucket::new(
                config.upload_limit_bps,
                bucket_burst(config.upload_limit_bps),
            ),
            ring: PieceRing::new(config.ring),
            channel: key.channel_id(),
            key,
            info: None,
            descriptor: None,
            club,
            club_chosen: config.role != Role::Peer,
            verifier: Box::new(Ed25519Verifier),
            candidates: BTreeMap::new(),
            links: BTreeMap::new(),
            banned: BTreeSet::new(),
            club_high: Vec::new(),
            club_last: Vec::new(),
            missing: BTreeMap::new(),
            global_high: None,
            gaps_checked: None,
            last_new_piece: Timestamp::ZERO,
            info_since: None,
            best_offset_us: None,
            control: VecDeque::new(),
            urgent: VecDeque::new(),
            live: VecDeque::new(),
            delayed: VecDeque::new(),
            delivered: VecDeque::new(),
            stats: SwarmStats::default(),
            next_tick: Timestamp::ZERO,
            started: None,
            leaving: false,
            config,
        }
    }

    /// The publisher's member: it knows the channel (and sends `descriptor`, signed by the
    /// channel key, to the tracker) and seeds the clubs with [`SwarmNode::publish`].
    pub fn publisher(
        key: ChannelPublicKey,
        info: ChannelInfo,
        descriptor: Vec<u8>,
        mut config: SwarmConfig,
    ) -> Self {
        config.role = Role::Publisher;
        let mut node = SwarmNode::new(key, config);
        node.set_info(info);
        node.descriptor = Some(descriptor);
        node
    }

    /// Replaces the signature checker (the simulator shares verification among members).
    pub fn with_verifier(mut self, verifier: Box<dyn PieceVerifier + Send>) -> Self {
        self.verifier = verifier;
        self
    }

    /// Tells the member about other members (from a tracker's list, or directly). What a
    /// member says of itself (role, club) is updated; back-offs are kept.
    pub fn add_candidates(&mut self, entries: impl IntoIterator<Item = PeerEntry>) {
        for e in entries {
            if self.banned.contains(&e.addr) {
                continue;
            }
            let c = self.candidates.entry(e.addr).or_insert(Candidate {
                role: e.role,
                club: e.club,
                backoff_until: Timestamp::ZERO,
            });
            c.role = e.role;
            c.club = e.club;
        }
    }

    /// Gives the member the channel's description directly (without a tracker).
    pub fn set_info(&mut self, info: ChannelInfo) {
        let k = usize::from(info.clubs.clamp(1, 64));
        self.club_high = vec![None; k];
        self.club_last = vec![Timestamp::ZERO; k];
        self.stats.resize(k);
        self.info = Some(info);
    }

    /// The channel's description, once known.
    pub fn info(&self) -> Option<&ChannelInfo> {
        self.info.as_ref()
    }

    /// This member's club ([`ALL_CLUBS`] for relays and the publisher).
    pub fn club(&self) -> u8 {
        self.club
    }

    /// Counters so far.
    pub fn stats(&self) -> &SwarmStats {
        &self.stats
    }

    /// Links now: (mates, upstream links, downstream links).
    pub fn link_counts(&self) -> (usize, usize, usize) {
        let mates = self.links.values().filter(|l| l.mate).count();
        let up = self
            .links
            .values()
            .filter(|l| !l.mate && !l.recv.is_empty())
            .count();
        let down = self
            .links
            .values()
            .filter(|l| !l.mate && !l.send.is_empty())
            .count();
        (mates, up, down)
    }

    /// Per club: (downstream links we push it on, whether we have a source for it).
    pub fn club_view(&self) -> Vec<(usize, bool)> {
        (0..self.k())
            .map(|c| {
                let down = self
                    .links
                    .values()
                    .filter(|l| !l.mate && l.send.contains(c))
                    .count();
                let src = self.links.values().any(|l| l.is_source_of(c));
                (down, src)
            })
            .collect()
    }

    /// One line per link, for debugging and `clubcast watch -v`.
    pub fn describe_links(&self) -> String {
        let mut v: Vec<String> = self
            .links
            .iter()
            .map(|(a, l)| {
                format!(
                    "{a} club={} mate={} init={} est={} send={:#x} recv={:#x} want={:#x} new={} dup={} missed={} lost={} bg={} cwnd={} flight={}",
                    l.club, l.mate, l.initiated, l.established, l.send.0, l.recv.0, l.wanted.0,
                    l.pieces_new, l.pieces_dup, l.pieces_missed, l.lost, l.background.len(),
                    l.ledbat.window(), l.ledbat.in_flight()
                )
            })
            .collect();
        v.sort();
        v.join("\n")
    }

    /// Whether every club has a source: an upstream, or for the own club a mate or a seed.
    pub fn all_clubs_sourced(&self) -> bool {
        self.info.is_some() && (0..self.k()).all(|c| self.links.values().any(|l| l.is_source_of(c)))
    }

    /// Publisher: clubs that have at least one seed.
    pub fn clubs_seeded(&self) -> u32 {
        (0..self.k())
            .filter(|c| self.links.values().any(|l| !l.mate && l.send.contains(*c)))
            .count() as u32
    }

    /// Whether there is a link with `addr` (it proved its address, or we asked it).
    pub fn is_linked(&self, addr: &SocketAddr) -> bool {
        self.links.contains_key(addr)
    }

    /// Whether `addr` was banned.
    pub fn is_banned(&self, addr: &SocketAddr) -> bool {
        self.banned.contains(addr)
    }

    /// Pieces held for repair now.
    pub fn ring_len(&self) -> usize {
        self.ring.len()
    }

    fn k(&self) -> u8 {
        self.info.as_ref().map_or(1, |i| i.clubs.clamp(1, 64))
    }

    /// Bytes per second of one club's share of the stream, on the wire (each 1 128-byte
    /// payload travels with 96 bytes of header and signature).
    fn unit_bytes(&self) -> u64 {
        let wire = |bps: u64| bps / 8 * (PieceHeader::MAX_PAYLOAD as u64 + 96) / PAYLOAD;
        self.info
            .as_ref()
            .map_or(1, |i| (wire(i.bitrate_bps) / u64::from(self.k())).max(1))
    }

    /// Clubs' worth of upload this member can give downstream links.
    fn upload_units(&self) -> u64 {
        let Some(limit) = self.config.upload_limit_bps else {
            return u64::MAX;
        };
        let units = limit / 8 / self.unit_bytes();
        match self.config.role {
            // Mates come first: a peer keeps room to push its club to each, and a tenth of
            // its upload for repairs and catch-up.
            Role::Peer => (units * 9 / 10).saturating_sub(self.mates_expected() as u64),
            // The publisher keeps a tenth of its upload for catch-up and repairs (the pieces
            // only it has), unless that would leave a club without a seat.
            Role::Publisher => (units * 9 / 10).max(units.min(u64::from(self.k()))),
            Role::Relay => units,
        }
    }

    /// Club mates this peer will have: the other members of its club it knows, up to the
    /// configured most.
    fn mates_expected(&self) -> usize {
        let known = self
            .candidates
            .values()
            .filter(|c| c.role == Role::Peer && c.club == self.club)
            .count();
        known.clamp(1, self.config.max_mates.max(1))
    }

    fn units_used(&self) -> u64 {
        self.links
            .values()
            .filter(|l| !l.mate)
            .map(|l| u64::from(l.send.len()))
            .sum()
    }

    /// Clubs this member can push: a peer its own club, and, from spare upload, the clubs it
    /// receives from an upstream (a second hop for clubs too small to serve everyone).
    /// Clubs this member can push: a peer its own club; relays and the publisher every club.
    fn clubs_offered(&self) -> ClubMask {
        match self.config.role {
            Role::Peer => ClubMask::one(self.club),
            _ => ClubMask::all(self.k()),
        }
    }

    // ---- input --------------------------------------------------------------------------

    /// Handles one datagram from `from`.
    pub fn handle_datagram(&mut self, now: Timestamp, from: SocketAddr, datagram: &[u8]) {
        self.started.get_or_insert(now);
        if self.banned.contains(&from) {
            self.stats.from_banned += 1;
            return;
        }
        let is_tracker = self.tracker.as_ref().is_some_and(|t| t.addr == from);
        let message = match Message::parse(datagram) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if let Some(l) = self.links.get_mut(&from) {
            l.last_heard = now;
        }
        match message {
            Message::Piece(p) => self.on_piece(now, from, &p, datagram),
            Message::Cookie(c) if is_tracker => self.on_tracker_cookie(now, c.cookie),
            Message::Cookie(c) => self.on_member_cookie(now, from, c.cookie),
            Message::Descriptor(d) if is_tracker => self.on_descriptor(&d),
            Message::Peers(p) if is_tracker && p.channel() == self.channel => {
                self.add_candidates(p.iter());
                self.stats.peer_lists += 1;
                if let Some(c) = p.assigned_club().filter(|c| *c < self.k()) {
                    if !self.club_chosen && self.info.is_some() {
                        self.club = c;
                        self.club_chosen = true;
                    }
                }
            }
            Message::Hello(h) => {
                // A member asking for a cookie before it JOINs.
                let reply = Cookie {
                    nonce: h.nonce,
                    cookie: self.cookies.issue(now, from),
                };
                self.send_control(from, |b| reply.encode(b));
            }
            Message::Join(j) if j.channel == self.channel => self.on_join(now, from, &j),
            Message::Accept(a) if a.channel == self.channel => self.on_accept(now, from, &a),
            Message::Nack(n) if n.channel == self.channel => self.on_nack(now, from, &n),
            Message::Ack(a) if a.channel() == self.channel => {
                if let Some(l) = self.links.get_mut(&from) {
                    l.on_acks(now, a.iter());
                }
            }
            _ => self.stats.unexpected += 1,
        }
    }

    fn on_tracker_cookie(&mut self, now: Timestamp, cookie: CookieBytes) {
        if let Some(t) = &mut self.tracker {
            t.cookie = Some(cookie);
            t.next_announce = now;
        }
    }

    /// A member's cookie: (re)send our JOIN to it with the cookie echoed.
    fn on_member_cookie(&mut self, now: Timestamp, from: SocketAddr, cookie: CookieBytes) {
        tracing::trace!(%from, "COOKIE");
        let Some(link) = self.links.get(&from) else {
            return;
        };
        if !link.initiated {
            return;
        }
        if let Some(l) = self.links.get_mut(&from) {
            l.cookie = cookie;
            l.last_join = now;
        }
        let join = self.join_for(from, cookie);
        self.send_control(from, |b| join.encode(b));
    }

    fn on_descriptor(&mut self, d: &Descriptor<'_>) {
        let Ok(key) = verify_descriptor(d) else {
            self.stats.unexpected += 1;
            return;
        };
        if key != self.key {
            return;
        }
        let newer = self
            .info
            .as_ref()
            .is_none_or(|i| d.epoch_us() > i.first_seq);
        if newer && self.config.role != Role::Publisher {
            self.set_info(ChannelInfo {
                clubs: d.clubs().clamp(1, 64),
                bitrate_bps: d.bitrate_bps(),
                first_seq: d.epoch_us(),
                private: d.private(),
            });
        }
    }

    fn on_piece(&mut self, now: Timestamp, from: SocketAddr, piece: &Piece<'_>, bytes: &[u8]) {
        if piece.channel() != self.channel {
            self.stats.unexpected += 1;
            return;
        }
        if !self.links.contains_key(&from) {
            // Not a member we linked with: not worth a signature check.
            self.stats.unknown_sender += 1;
            return;
        }
        let seq = piece.seq();
        let club = (seq % u64::from(self.k())) as u8;
        if self.ring.contains(seq) {
            self.stats.duplicates += 1;
            if let Some(l) = self.links.get_mut(&from) {
                l.pieces_dup += 1;
            }
            self.queue_ack(now, from, seq);
            return;
        }
        if self.ring.is_stale(seq) || self.info.as_ref().is_some_and(|i| seq < i.first_seq) {
            self.stats.stale += 1;
            return;
        }
        let shared: PieceBytes = Arc::from(bytes);
        if !self.verifier.verify(&self.key, piece, &shared) {
            self.ban(from);
            self.stats.bad_pieces += 1;
            return;
        }
        self.queue_ack(now, from, seq);
        self.accept_piece(now, Some(from), seq, club, piece.publish_time_us(), shared);
    }

    /// A new, verified piece: keep it, deliver it, pass it on.
    fn accept_piece(
        &mut self,
        now: Timestamp,
        from: Option<SocketAddr>,
        seq: u64,
        club: u8,
        publish_time_us: u64,
        bytes: PieceBytes,
    ) {
        self.ring.insert(now, seq, club, bytes.clone());
        // Only pieces that advance their club say how late a path is (repairs and catch-up
        // are late by design).
        let advances = self
            .club_high
            .get(usize::from(club))
            .is_some_and(|h| h.is_none_or(|h| seq > h));
        let len = bytes.len() as u64;
        self.stats.pieces_new += 1;
        self.stats.add_download(club, len);
        if let Some(m) = self.missing.remove(&seq) {
            if m.tries > 0 {
                self.stats.repaired += 1;
            }
            if let Some(b) = m.blamed.filter(|b| Some(*b) != from) {
                if let Some(l) = self.links.get_mut(&b) {
                    l.pieces_missed += 1;
                }
            }
        }
        if self.config.role != Role::Publisher {
            self.note_gaps(now, seq, club);
        }
        self.last_new_piece = now;
        if self.config.role != Role::Publisher && self.global_high.is_none_or(|h| seq > h) {
            self.global_high = Some(seq);
            let lag = (4 * u64::from(self.k())).max(32);
            self.note_global_gaps(now, seq.saturating_sub(lag));
        }
        if let Some(t) = self.club_last.get_mut(usize::from(club)) {
            *t = now;
        }
        // Lateness of this path behind the fastest one seen (clock offsets cancel).
        let offset = now.as_micros() as i64 - publish_time_us as i64;
        let best = *self.best_offset_us.get_or_insert(offset);
        self.best_offset_us = Some(best.min(offset));
        if let Some(l) = from.and_then(|f| self.links.get_mut(&f)) {
            l.pieces_new += 1;
            if advances {
                let late = (offset - best.min(offset)) as f64;
                l.lateness_us = l.lateness_us * 0.9 + late * 0.1;
            }
        }
        if self.config.role == Role::Peer {
            self.delivered.push_back(bytes.clone());
        }
        self.forward(now, from, seq, club, bytes);
    }

    /// Pushes a new piece to mates (own club, at once) and downstream links (paced).
    fn forward(
        &mut self,
        now: Timestamp,
        from: Option<SocketAddr>,
        seq: u64,
        club: u8,
        bytes: PieceBytes,
    ) {
        if self.config.behaviour == Behaviour::FreeRider {
            return;
        }
        let bytes = match self.config.behaviour {
            Behaviour::Forger => corrupt(&bytes),
            _ => bytes,
        };
        let own = self.config.role != Role::Peer || club == self.club;
        let mut targets: Vec<(SocketAddr, bool)> = Vec::new();
        for (addr, l) in &self.links {
            if Some(*addr) == from {
                continue;
            }
            if l.mate && own && l.club == club {
                targets.push((*addr, true));
            } else if !l.mate && l.send.contains(club) {
                // Seeds (the publisher's and relays' links to a club's own members) are
                // urgent too: they start the club's scream.
                let seed = self.config.role != Role::Peer && l.club == club;
                targets.push((*addr, seed));
            }
        }
        targets.sort_unstable_by_key(|(a, urgent)| (!*urgent, *a));
        for (to, urgent) in targets {
            let q = Queued {
                to,
                seq,
                bytes: bytes.clone(),
                queued: now,
            };
            match self.config.behaviour {
                Behaviour::Delayer(d) => self.delayed.push_back((now + d, q, urgent)),
                _ if urgent => self.urgent.push_back(q),
                _ => self.push_live(q),
            }
        }
    }

    fn push_live(&mut self, q: Queued) {
        if self.live.len() >= MAX_LIVE_QUEUE {
            self.live.pop_front();
            self.stats.live_dropped += 1;
        }
        self.live.push_back(q);
    }

    /// Looks for gaps across clubs: any piece more than two rounds of clubs behind the newest
    /// one (or, when the stream pauses or ends, behind the newest at all) that has not come.
    fn note_global_gaps(&mut self, now: Timestamp, upto: u64) {
        let Some(high) = self.global_high else { return };
        let upto = upto.min(high);
        let start = match self.gaps_checked {
            Some(c) if c >= upto => return,
            Some(c) => (c + 1).max(upto.saturating_sub(256)),
            // The first piece: look back as far as catch-up reaches (to the stream's start
            // for a member that was there when it began).
            None => upto.saturating_sub(self.catch_up_pieces()),
        };
        let first = self.info.as_ref().map_or(0, |i| i.first_seq);
        for s in start.max(first)..=upto {
            if !self.ring.contains(s) && !self.ring.is_stale(s) {
                self.missing.entry(s).or_insert(Missing {
                    noticed: now,
                    next_nack: now + self.config.nack_delay,
                    tries: 0,
                    blamed: None,
                });
            }
        }
        self.gaps_checked = Some(upto);
    }

    /// Pieces in the catch-up window at the stream's bitrate.
    fn catch_up_pieces(&self) -> u64 {
        self.info.as_ref().map_or(0, |i| {
            let per_s = i.bitrate_bps / 8 / PAYLOAD;
            per_s * self.config.catch_up.as_millis() as u64 / 1000
        })
    }

    /// How long a club may be silent before its upstream is replaced.
    fn silence_for(&self) -> Duration {
        let eight_rounds = self.info.as_ref().map_or(Duration::ZERO, |i| {
            let piece_us = PAYLOAD * 8 * 1_000_000 / i.bitrate_bps.max(1);
            Duration::from_micros(piece_us * 8 * u64::from(i.clubs))
        });
        self.config.silence_timeout.max(eight_rounds)
    }

    /// Records gaps in `club` up to `seq` for repair.
    fn note_gaps(&mut self, now: Timestamp, seq: u64, club: u8) {
        let k = u64::from(self.k());
        let Some(high) = self.club_high.get_mut(usize::from(club)) else {
            return;
        };
        let from = match *high {
            Some(h) if seq <= h => return,
            Some(h) => h + k,
            // First piece of the club: look back a little, not to the dawn of the stream.
            None => {
                let first = self.info.as_ref().map_or(seq, |i| i.first_seq);
                let back = seq.saturating_sub(8 * k).max(first);
                back + (club as u64 + k - back % k) % k
            }
        };
        *high = Some(seq);
        let mut s = from;
        while s < seq {
            if !self.ring.contains(s) && !self.ring.is_stale(s) {
                self.missing.entry(s).or_insert(Missing {
                    noticed: now,
                    next_nack: now + self.config.nack_delay,
                    tries: 0,
                    blamed: None,
                });
            }
            s += k;
        }
    }

    fn queue_ack(&mut self, now: Timestamp, from: SocketAddr, seq: u64) {
        let Some(l) = self.links.get_mut(&from) else {
            return;
        };
        if l.mate {
            return;
        }
        if l.pending_acks.is_empty() {
            l.acks_since = now;
        }
        l.pending_acks.push(AckEntry {
            seq,
            received_us: now.as_micros(),
        });
        if l.pending_acks.len() >= Ack::MAX {
            self.flush_acks(from);
        }
    }

    fn flush_acks(&mut self, to: SocketAddr) {
        let Some(l) = self.links.get_mut(&to) else {
            return;
        };
        if l.pending_acks.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut l.pending_acks);
        let channel = self.channel;
        self.send_control(to, |b| Ack::encode(channel, &entries, b));
    }

    fn ban(&mut self, addr: SocketAddr) {
        if self.banned.insert(addr) {
            self.stats.peers_banned += 1;
        }
        self.links.remove(&addr);
        self.candidates.remove(&addr);
    }

    fn on_join(&mut self, now: Timestamp, from: SocketAddr, j: &Join) {
        tracing::trace!(%from, club = j.club, want = j.want.0, mate = j.mate, leaving = j.leaving, "JOIN");
        if self.cookies.check(now, from, &j.cookie) == CookieCheck::Invalid {
            // Prove the address first: a COOKIE no larger than the JOIN, and nothing else.
            let reply = Cookie {
                nonce: 0,
                cookie: self.cookies.issue(now, from),
            };
            self.send_control(from, |b| reply.encode(b));
            self.stats.joins_unproven += 1;
            return;
        }
        if j.leaving {
            if let Some(l) = self.links.get_mut(&from) {
                l.send = ClubMask::NONE;
                if l.mate {
                    l.mate = false;
                }
                if l.recv.is_empty() {
                    self.links.remove(&from);
                }
            }
            return;
        }
        if self.info.is_none() || self.leaving {
            return; // nothing to give yet; it will ask again
        }
        self.candidates.entry(from).or_insert(Candidate {
            role: j.role,
            club: j.club,
            backoff_until: Timestamp::ZERO,
        });
        let (granted, mate) = match self.links.get_mut(&from) {
            Some(l) if l.mate || !l.send.is_empty() => {
                // A keepalive of a link we granted: it keeps only what it still wants.
                if !l.mate {
                    l.send = l.send.intersect(j.want);
                }
                let own = if l.mate {
                    ClubMask::one(self.club)
                } else {
                    ClubMask::NONE
                };
                (l.send.union(own), l.mate)
            }
            _ => self.grant(now, from, j),
        };
        if let Some(l) = self.links.get_mut(&from) {
            l.their_join = now;
            l.last_heard = now;
            if l.mate {
                l.last_keepalive = now;
            }
        }
        let accept = Accept {
            channel: self.channel,
            granted,
            role: self.config.role,
            club: self.club,
            mate,
        };
        self.send_control(from, |b| accept.encode(b));
        if j.catch_up && !granted.is_empty() && !mate {
            self.queue_catch_up(now, from, granted);
        }
    }

    /// Decides what a new JOIN gets, and records the link.
    fn grant(&mut self, now: Timestamp, from: SocketAddr, j: &Join) -> (ClubMask, bool) {
        let unit = self.unit_bytes();
        let is_peer = self.config.role == Role::Peer;
        let mates = self.links.values().filter(|l| l.mate).count();
        if is_peer && j.mate && self.club_chosen && j.club == self.club {
            if mates >= self.config.max_mates && !self.links.get(&from).is_some_and(|l| l.mate) {
                return (ClubMask::NONE, false);
            }
            let l = self
                .links
                .entry(from)
                .or_insert_with(|| Link::new(now, j.role, j.club, false, unit));
            l.mate = true;
            l.established = true;
            l.club = j.club;
            return (ClubMask::one(self.club), true);
        }
        let mut offer = j.want.intersect(self.clubs_offered());
        if self.config.role == Role::Publisher {
            self.make_room_for_seed(now, j);
            // At most a few seeds per club, and a second seed only while every other club can
            // still have its first.
            let seeds = self.config.seeds_per_club;
            let k = self.k();
            let seeded = |c: u8| self.links.values().filter(|l| l.send.contains(c)).count();
            let unseeded = (0..k).filter(|c| seeded(*c) == 0).count() as u64;
            let free = self.upload_units().saturating_sub(self.units_used());
            for c in offer.iter() {
                let n = seeded(c);
                let starves_others = n >= 1 && free.saturating_sub(1) < unseeded;
                if n >= seeds || (j.role == Role::Peer && starves_others) {
                    offer = offer.minus(ClubMask::one(c));
                }
            }
        }
        if self.config.role == Role::Publisher && j.role == Role::Relay {
            self.make_room_for_relay(u64::from(offer.len()));
        }
        let downstreams = self
            .links
            .values()
            .filter(|l| !l.mate && !l.send.is_empty())
            .count();
        let free = self.upload_units().saturating_sub(self.units_used());
        // As many of the clubs asked for as the upload affords.
        let offer = ClubMask(
            offer
                .iter()
                .take(usize::try_from(free).unwrap_or(usize::MAX))
                .fold(0, |m, c| m | (1u64 << c)),
        );
        if offer.is_empty() || downstreams >= self.config.max_downstreams {
            self.stats.joins_refused += 1;
            return (ClubMask::NONE, false);
        }
        let l = self
            .links
            .entry(from)
            .or_insert_with(|| Link::new(now, j.role, j.club, false, unit));
        l.send = l.send.union(offer);
        l.club = j.club;
        let share = unit * u64::from(l.send.len());
        l.set_share(share);
        self.stats.joins_granted += 1;
        tracing::debug!(%from, clubs = offer.0, club = j.club, "granted");
        (offer, false)
    }

    /// Publisher: a member asks to seed its club and the club's seats are taken. Members ask
    /// only when their club is not reaching them, so the oldest seat (if it has had a few
    /// seconds) goes to the asker: a seed that went bad, or hoards, is rotated out.
    fn make_room_for_seed(&mut self, now: Timestamp, j: &Join) {
        let c = j.club;
        if j.role != Role::Peer || j.want != ClubMask::one(c) {
            return;
        }
        let seats: Vec<(Timestamp, SocketAddr)> = self
            .links
            .iter()
            .filter(|(_, l)| l.send.contains(c) && l.club == c)
            .map(|(a, l)| (l.established_at, *a))
            .collect();
        let free = self.upload_units().saturating_sub(self.units_used());
        if seats.is_empty() || (seats.len() < self.config.seeds_per_club && free > 1) {
            return;
        }
        let Some(&(since, oldest)) = seats.iter().min() else {
            return;
        };
        if now.saturating_since(since) < SEED_TENURE {
            return;
        }
        if let Some(l) = self.links.get_mut(&oldest) {
            l.send = l.send.minus(ClubMask::one(c));
            if l.send.is_empty() && l.recv.is_empty() {
                self.links.remove(&oldest);
            }
            self.stats.seeds_rotated += 1;
        }
    }

    /// Publisher: relays amplify, so a relay's JOIN takes seats from peer seeds (which then
    /// find the relay) until `units` are free.
    fn make_room_for_relay(&mut self, units: u64) {
        let mut seeds: Vec<(Timestamp, SocketAddr)> = self
            .links
            .iter()
            .filter(|(_, l)| l.role == Role::Peer && !l.send.is_empty())
            .map(|(a, l)| (l.established_at, *a))
            .collect();
        seeds.sort_unstable();
        for (_, addr) in seeds {
            if self.upload_units().saturating_sub(self.units_used()) >= units {
                break;
            }
            self.links.remove(&addr);
            self.stats.seeds_rotated += 1;
        }
    }

    fn queue_catch_up(&mut self, now: Timestamp, to: SocketAddr, clubs: ClubMask) {
        let recent = self
            .ring
            .recent(now, self.config.catch_up, |c| clubs.contains(c));
        if let Some(l) = self.links.get_mut(&to) {
            for (seq, _) in &recent {
                if !l.background.contains(seq) {
                    l.background.push_back(*seq);
                }
            }
            self.stats.catch_up_queued += recent.len() as u64;
        }
    }

    fn on_accept(&mut self, now: Timestamp, from: SocketAddr, a: &Accept) {
        tracing::trace!(%from, granted = a.granted.0, mate = a.mate, "ACCEPT");
        let Some(l) = self.links.get_mut(&from) else {
            return;
        };
        if !l.initiated {
            return;
        }
        l.last_keepalive = now;
        if a.granted.is_empty() {
            // Refused (full): try someone else, and not this one for a while.
            match self.links.get_mut(&from) {
                Some(l) if !l.send.is_empty() => {
                    l.initiated = false;
                    l.wanted = ClubMask::NONE;
                    l.wants_mate = false;
                    l.established = true;
                }
                _ => {
                    self.links.remove(&from);
                }
            }
            if let Some(c) = self.candidates.get_mut(&from) {
                c.backoff_until = now + REFUSED_BACKOFF;
            }
            return;
        }
        if !l.established {
            l.established_at = now;
        }
        l.established = true;
        l.mate = a.mate;
        l.club = a.club;
        l.role = a.role;
        l.recv = if a.mate { ClubMask::NONE } else { a.granted };
    }

    fn on_nack(&mut self, now: Timestamp, from: SocketAddr, n: &Nack) {
        if !self.links.contains_key(&from) || self.config.behaviour == Behaviour::FreeRider {
            self.stats.nacks_ignored += 1;
            return;
        }
        let horizon = self.config.repair_horizon;
        let mut served = 0;
        let mut missed = 0;
        let seqs: Vec<u64> = n.seqs().collect();
        for seq in seqs {
            if self.ring.get_fresh(now, seq, horizon).is_some() {
                if let Some(l) = self.links.get_mut(&from) {
                    if !l.background.contains(&seq) {
                        l.background.push_back(seq);
                        served += 1;
                    }
                }
            } else {
                missed += 1;
            }
        }
        self.stats.repairs_served += served;
        self.stats.repairs_unavailable += missed;
        tracing::trace!(%from, base = n.base, served, missed, "NACK served");
    }

    // ---- publishing ---------------------------------------------------------------------

    /// Publisher: a new signed piece to seed into its club.
    pub fn publish(&mut self, now: Timestamp, bytes: PieceBytes) {
        self.started.get_or_insert(now);
        let Ok(piece) = Piece::parse(&bytes) else {
            return;
        };
        let seq = piece.seq();
        let club = (seq % u64::from(self.k())) as u8;
        let t = piece.publish_time_us();
        self.accept_piece(now, None, seq, club, t, bytes);
    }

    // ---- output -------------------------------------------------------------------------

    /// The next verified piece, new to this member, in arrival order (play it, or feed it to a
    /// jitter buffer).
    pub fn poll_piece(&mut self) -> Option<PieceBytes> {
        self.delivered.pop_front()
    }

    /// The next datagram to send now, if any is due and the upload limit allows it.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Transmit> {
        if let Some(t) = self.control.pop_front() {
            self.stats.control_bytes_out += t.data.as_bytes().len() as u64;
            return Some(t);
        }
        while let Some(&(at, _, _)) = self.delayed.front() {
            if at > now {
                break;
            }
            let Some((_, q, urgent)) = self.delayed.pop_front() else {
                break;
            };
            if urgent {
                self.urgent.push_back(q);
            } else {
                self.push_live(q);
            }
        }
        if let Some(t) = self.next_urgent(now) {
            return Some(t);
        }
        if let Some(t) = self.next_live(now) {
            return Some(t);
        }
        self.next_background(now)
    }

    fn next_urgent(&mut self, now: Timestamp) -> Option<Transmit> {
        let q = self.urgent.front()?;
        if !self.bucket.try_take(now, q.bytes.len() as u64) {
            return None;
        }
        let q = self.urgent.pop_front()?;
        Some(self.sent_piece(now, q, false))
    }

    fn next_live(&mut self, now: Timestamp) -> Option<Transmit> {
        while let Some(q) = self.live.front() {
            if now.saturating_since(q.queued) > MAX_LIVE_WAIT {
                self.live.pop_front();
                self.stats.live_dropped += 1;
                continue;
            }
            let len = q.bytes.len() as u64;
            let to = q.to;
            if self.bucket.ready_at(now, len) > now {
                return None;
            }
            let allowed = match self.links.get_mut(&to) {
                None => {
                    self.live.pop_front();
                    continue;
                }
                Some(l) => l.live_allows(now, len),
            };
            if !allowed {
                // The link's congestion control says no: the downstream repairs it or finds
                // another upstream.
                self.live.pop_front();
                self.stats.live_refused += 1;
                continue;
            }
            self.bucket.try_take(now, len);
            let q = self.live.pop_front()?;
            return Some(self.sent_piece(now, q, false));
        }
        None
    }

    fn next_background(&mut self, now: Timestamp) -> Option<Transmit> {
        let horizon = self.config.repair_horizon;
        let mut addrs: Vec<SocketAddr> = self
            .links
            .iter()
            .filter(|(_, l)| !l.background.is_empty())
            .map(|(a, _)| *a)
            .collect();
        addrs.sort_unstable();
        // Start the round-robin at a different link each time.
        if !addrs.is_empty() {
            let k = (self.stats.background_pieces_out as usize) % addrs.len();
            addrs.rotate_left(k);
        }
        for to in addrs {
            while let Some(l) = self.links.get_mut(&to) {
                let Some(&seq) = l.background.front() else {
                    break;
                };
                let Some(bytes) = self.ring.get_fresh(now, seq, horizon).cloned() else {
                    l.background.pop_front();
                    self.stats.repairs_unavailable += 1;
                    continue;
                };
                let len = bytes.len() as u64;
                if !l.background_allows(len) {
                    self.stats.background_blocked_window += 1;
                    break;
                }
                // A member's repairs and catch-up go as soon as live traffic leaves a gap; the
                // publisher, whose upload is mostly seats, keeps a datagram's room for the
                // next live piece.
                let reserve = match self.config.role {
                    Role::Publisher => MAX_DATAGRAM as u64,
                    _ => 0,
                };
                if !self.bucket.try_take_leaving(now, len, reserve) {
                    self.stats.background_blocked_upload += 1;
                    return None;
                }
                l.background.pop_front();
                let bytes = match self.config.behaviour {
                    Behaviour::Forger => corrupt(&bytes),
                    _ => bytes,
                };
                self.stats.background_pieces_out += 1;
                return Some(self.sent_piece(
                    now,
                    Queued {
                        to,
                        seq,
                        bytes,
                        queued: now,
                    },
                    true,
                ));
            }
        }
        None
    }

    fn sent_piece(&mut self, now: Timestamp, q: Queued, background: bool) -> Transmit {
        let len = q.bytes.len() as u64;
        let club = (q.seq % u64::from(self.k())) as u8;
        self.stats.add_upload(club, len);
        if let Some(l) = self.links.get_mut(&q.to) {
            l.on_sent(now, q.seq, len, background);
        }
        Transmit {
            to: q.to,
            data: Datagram::Piece(q.bytes),
        }
    }

    fn send_control(
        &mut self,
        to: SocketAddr,
        encode: impl FnOnce(&mut [u8]) -> Result<usize, crate::wire::WireError>,
    ) {
        let mut buf = [0u8; MAX_DATAGRAM];
        if let Ok(n) = encode(&mut buf) {
            self.control.push_back(Transmit {
                to,
                data: Datagram::Control(buf[..n].to_vec()),
            });
        }
    }

    /// When the member next has something to do without new input.
    pub fn poll_timeout(&self, now: Timestamp) -> Timestamp {
        let mut next = self.next_tick;
        if !self.control.is_empty() {
            return now;
        }
        if let Some((at, _, _)) = self.delayed.front() {
            next = next.min(*at);
        }
        if let Some(q) = self.urgent.front().or(self.live.front()) {
            next = next.min(self.bucket.ready_at(now, q.bytes.len() as u64));
        }
        if self.links.values().any(|l| !l.background.is_empty()) {
            next = next.min(self.bucket.ready_at(now, MAX_DATAGRAM as u64));
        }
        next.max(now)
    }

    // ---- timers -------------------------------------------------------------------------

    /// Runs timers: tracker announces, link upkeep, ACK flushes, NACKs, replacement.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.started.get_or_insert(now);
        self.flush_due_acks(now);
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        self.tracker_upkeep(now);
        if self.info.is_none() || self.leaving {
            return;
        }
        self.choose_club(now);
        self.expire_links(now);
        self.keep_links_alive(now);
        self.replace_bad_upstreams(now);
        self.find_mates(now);
        self.find_sources(now);
        if now.saturating_since(self.last_new_piece) > STREAM_PAUSE {
            if let Some(h) = self.global_high {
                self.note_global_gaps(now, h);
            }
        }
        self.send_nacks(now);
        for l in self.links.values_mut() {
            l.detect_losses(now);
        }
    }

    fn flush_due_acks(&mut self, now: Timestamp) {
        let due: Vec<SocketAddr> = self
            .links
            .iter()
            .filter(|(_, l)| {
                !l.pending_acks.is_empty() && now.saturating_since(l.acks_since) >= ACK_DELAY
            })
            .map(|(a, _)| *a)
            .collect();
        for a in due {
            self.flush_acks(a);
        }
    }

    fn tracker_upkeep(&mut self, now: Timestamp) {
        if self.tracker.as_ref().is_none_or(|t| now < t.next_announce) {
            return;
        }
        let interval = if !self.club_chosen || self.info.is_none() {
            // Waiting for the channel to appear, or for a peer list: ask again soon.
            Duration::from_millis(250)
        } else if self.picture_incomplete() {
            // Members that have not said their club yet, or clubs nobody is known in.
            Duration::from_secs(1)
        } else {
            self.config.announce_interval
        };
        let Some(t) = &mut self.tracker else { return };
        let addr = t.addr;
        t.next_announce = now + interval;
        let cookie = t.cookie;
        let nonce = t.nonce;
        if let Some(d) = self.descriptor.clone() {
            self.control.push_back(Transmit {
                to: addr,
                data: Datagram::Control(d),
            });
        }
        match cookie {
            None => {
                let hello = Hello {
                    channel: self.channel,
                    nonce,
                };
                self.send_control(addr, |b| hello.encode(b));
            }
            Some(cookie) => {
                let a = TrackerAnnounce {
                    channel: self.channel,
                    cookie,
                    role: self.config.role,
                    club: self.club,
                    upload_kbps: self
                        .config
                        .upload_limit_bps
                        .map_or(u32::MAX, |b| u32::try_from(b / 1000).unwrap_or(u32::MAX)),
                    leaving: false,
                };
                self.send_control(addr, |b| a.encode(b));
            }
        }
    }

    /// Whether the tracker's next list may tell more: members that had not chosen a club, or
    /// a club with no member known.
    fn picture_incomplete(&self) -> bool {
        let k = self.k();
        let mut known = ClubMask::NONE;
        for c in self.candidates.values() {
            if c.role == Role::Peer && c.club == NO_CLUB {
                return true;
            }
            if c.role == Role::Peer && c.club < k {
                known = known.union(ClubMask::one(c.club));
            }
        }
        self.config.role != Role::Publisher && known.len() < u32::from(k)
    }

    /// A peer joins the club with the fewest members it has heard of.
    fn choose_club(&mut self, now: Timestamp) {
        if self.club_chosen {
            return;
        }
        // With a tracker, the tracker assigns the club (it sees everyone, so clubs stay even);
        // a peer chooses by itself only if no assignment came for a while after the channel
        // appeared.
        let since = *self.info_since.get_or_insert(now);
        if self.tracker.is_some() && now.saturating_since(since) < CLUB_ASSIGNMENT_WAIT {
            return;
        }
        let k = self.k();
        let mut counts = vec![0usize; usize::from(k)];
        for c in self.candidates.values() {
            if c.role == Role::Peer && c.club < k {
                counts[usize::from(c.club)] += 1;
            }
        }
        let least = counts.iter().copied().min().unwrap_or(0);
        let choices: Vec<u8> = (0..k)
            .filter(|c| counts[usize::from(*c)] == least)
            .collect();
        self.club = *choices.choose(&mut self.rng).unwrap_or(&0);
        self.club_chosen = true;
        if let Some(t) = &mut self.tracker {
            t.next_announce = now; // tell the tracker our club
        }
    }

    /// Each side of a link lives on its own keepalives: what we push, on the other side's
    /// JOINs; what we asked for, on its ACCEPTs; a mate link, on either.
    fn expire_links(&mut self, now: Timestamp) {
        let timeout = self.config.link_timeout;
        let mut dead = Vec::new();
        for (a, l) in self.links.iter_mut() {
            if !l.mate && !l.send.is_empty() && now.saturating_since(l.their_join) > timeout {
                l.send = ClubMask::NONE;
                self.stats.links_expired += 1;
            }
            let asked_stale =
                (l.initiated || l.mate) && now.saturating_since(l.last_keepalive) > timeout;
            let empty = !l.initiated && !l.mate && l.send.is_empty();
            if asked_stale || empty {
                dead.push((*a, asked_stale));
            }
        }
        for (a, asked_stale) in dead {
            if asked_stale {
                self.stats.links_expired += 1;
                self.drop_link(now, a, false);
            } else {
                self.links.remove(&a);
            }
        }
    }

    fn keep_links_alive(&mut self, now: Timestamp) {
        let due: Vec<SocketAddr> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.initiated && now.saturating_since(l.last_join) >= self.keepalive_for(l)
            })
            .map(|(a, _)| *a)
            .collect();
        for a in due {
            let cookie = self.links.get(&a).map(|l| l.cookie).unwrap_or_default();
            let join = self.join_for(a, cookie);
            self.send_control(a, |b| join.encode(b));
            if let Some(l) = self.links.get_mut(&a) {
                l.last_join = now;
            }
        }
    }

    fn keepalive_for(&self, l: &Link) -> Duration {
        if l.established {
            self.config.keepalive
        } else {
            Duration::from_millis(300)
        }
    }

    /// The JOIN that asks for (or keeps) the link to `to`.
    fn join_for(&self, to: SocketAddr, cookie: CookieBytes) -> Join {
        let l = self.links.get(&to);
        Join {
            channel: self.channel,
            cookie,
            role: self.config.role,
            club: self.club,
            want: l.map_or(ClubMask::NONE, |l| l.wanted),
            mate: l.is_some_and(|l| l.wants_mate),
            catch_up: l.is_some_and(|l| !l.established),
            leaving: false,
        }
    }

    fn drop_link(&mut self, now: Timestamp, addr: SocketAddr, backoff: bool) {
        self.stop_receiving(addr);
        if backoff {
            if let Some(c) = self.candidates.get_mut(&addr) {
                c.backoff_until = now + REPLACED_BACKOFF;
            }
        }
    }

    /// Ends what we receive from `addr` (telling it, if we asked for the link), and keeps the
    /// link only if we still push to it as its upstream.
    fn stop_receiving(&mut self, addr: SocketAddr) {
        let Some(l) = self.links.get(&addr) else {
            return;
        };
        if l.initiated {
            let mut leave = self.join_for_link(l, l.cookie);
            leave.leaving = true;
            self.send_control(addr, |b| leave.encode(b));
        }
        match self.links.get_mut(&addr) {
            Some(l) if !l.mate && !l.send.is_empty() => {
                l.recv = ClubMask::NONE;
                l.wanted = ClubMask::NONE;
                l.wants_mate = false;
                l.initiated = false;
                l.established = true;
            }
            _ => {
                self.links.remove(&addr);
            }
        }
    }

    fn join_for_link(&self, l: &Link, cookie: CookieBytes) -> Join {
        Join {
            channel: self.channel,
            cookie,
            role: self.config.role,
            club: self.club,
            want: l.wanted,
            mate: l.wants_mate,
            catch_up: false,
            leaving: false,
        }
    }

    /// Replaces upstreams that went silent, lose too much or trail the fastest path.
    fn replace_bad_upstreams(&mut self, now: Timestamp) {
        let k = self.k();
        let silence = self.silence_for();
        // The stream is live if some club delivered recently.
        let live = self
            .club_last
            .iter()
            .any(|t| *t > Timestamp::ZERO && now.saturating_since(*t) < silence / 2);
        let mut bad: Vec<(SocketAddr, &'static str)> = Vec::new();
        for (addr, l) in &self.links {
            if !l.initiated || !l.established || l.mate {
                continue;
            }
            let silent_club = l.recv.iter().filter(|c| *c < k).any(|c| {
                let last = self.club_last[usize::from(c)];
                live && now.saturating_since(last.max(l.established_at)) > silence
            });
            let received = l.pieces_new + l.pieces_dup;
            let lossy = received >= 50 && l.pieces_missed * 5 > received;
            let slow =
                received >= 50 && l.lateness_us > self.config.slow_threshold.as_micros() as f64;
            if silent_club {
                bad.push((*addr, "silent"));
            } else if lossy {
                bad.push((*addr, "lossy"));
            } else if slow {
                bad.push((*addr, "slow"));
            }
        }
        for (addr, why) in bad {
            tracing::debug!(peer = %addr, why, "replacing upstream");
            self.drop_link(now, addr, true);
            self.stats.peers_replaced += 1;
        }
    }

    fn eligible(&self, now: Timestamp, addr: &SocketAddr, c: &Candidate) -> bool {
        // A member that only takes from us may still be asked to give.
        let free = self.links.get(addr).is_none_or(|l| !l.initiated && !l.mate);
        free && !self.banned.contains(addr) && c.backoff_until <= now
    }

    fn pending_joins(&self) -> usize {
        self.links
            .values()
            .filter(|l| l.initiated && !l.established)
            .count()
    }

    fn find_mates(&mut self, now: Timestamp) {
        if self.config.role != Role::Peer || !self.club_chosen {
            return;
        }
        let have = self
            .links
            .values()
            .filter(|l| l.mate || l.wants_mate)
            .count();
        let want = self.config.max_mates.saturating_sub(have);
        if want == 0 || self.pending_joins() >= MAX_PENDING_JOINS {
            return;
        }
        let mut options: Vec<SocketAddr> = self
            .candidates
            .iter()
            .filter(|(a, c)| {
                c.role == Role::Peer && c.club == self.club && self.eligible(now, a, c)
            })
            .map(|(a, _)| *a)
            .collect();
        options.sort_unstable();
        options.shuffle(&mut self.rng);
        for addr in options.into_iter().take(want) {
            self.ask(now, addr, ClubMask::one(self.club), true);
        }
    }

    /// Asks one upstream for every club that has no source.
    fn find_sources(&mut self, now: Timestamp) {
        if !self.club_chosen || self.pending_joins() >= MAX_PENDING_JOINS {
            return;
        }
        let k = self.k();
        let silence = self.silence_for();
        let mut needed = ClubMask::NONE;
        for c in 0..k {
            let mut covered = self.links.values().any(|l| {
                (!l.mate && l.is_source_of(c))
                    || (l.initiated && !l.established && l.wanted.contains(c))
            });
            if c == self.club && self.config.role == Role::Peer {
                // Mates carry the own club while it flows; when it does not, ask for a seed.
                let last = self.club_last[usize::from(c)];
                let flowing = last > Timestamp::ZERO && now.saturating_since(last) < silence;
                covered |= flowing && self.links.values().any(|l| l.mate);
            }
            if !covered {
                needed = needed.union(ClubMask::one(c));
            }
        }
        if self.config.role == Role::Publisher || needed.is_empty() {
            return;
        }
        // Own club: its mates are sources once linked; still ask the publisher or a relay to
        // seed it, which is how a club's first pieces arrive.
        let mut best: Vec<(u8, SocketAddr)> = Vec::new();
        for (addr, c) in &self.candidates {
            if !self.eligible(now, addr, c) {
                continue;
            }
            let rank = match c.role {
                Role::Relay => 0,
                Role::Publisher => 1,
                Role::Peer if needed.contains(c.club) && c.club != self.club => 2,
                Role::Peer => continue,
            };
            best.push((rank, *addr));
        }
        best.sort_unstable();
        // Shuffle within each rank, deterministically.
        let mut i = 0;
        while i < best.len() {
            let r = best[i].0;
            let j = best[i..]
                .iter()
                .position(|(x, _)| *x != r)
                .map_or(best.len(), |p| i + p);
            best[i..j].shuffle(&mut self.rng);
            i = j;
        }
        for (_, addr) in best {
            if needed.is_empty() || self.pending_joins() >= MAX_PENDING_JOINS {
                break;
            }
            let c = self.candidates[&addr];
            let want = match (c.role, self.config.role) {
                (Role::Peer, _) => ClubMask::one(c.club),
                // Peers ask the publisher to seed their own club only; relays ask it for all.
                (Role::Publisher, Role::Peer) => ClubMask::one(self.club),
                _ => needed,
            };
            if want.intersect(needed).is_empty() {
                continue;
            }
            self.ask(now, addr, want.intersect(needed), false);
            needed = needed.minus(want);
        }
    }

    /// Sends a JOIN asking `addr` for `want` (or to be a mate).
    fn ask(&mut self, now: Timestamp, addr: SocketAddr, want: ClubMask, mate: bool) {
        let c = self.candidates[&addr];
        let unit = self.unit_bytes();
        let l = self
            .links
            .entry(addr)
            .or_insert_with(|| Link::new(now, c.role, c.club, true, unit));
        l.initiated = true;
        l.established = false;
        l.wanted = want;
        l.wants_mate = mate;
        l.last_join = now;
        let join = self.join_for(addr, CookieBytes::default());
        self.send_control(addr, |b| join.encode(b));
        self.stats.joins_sent += 1;
    }

    /// NACKs gaps that waited out the reordering delay, to a source of their club.
    fn send_nacks(&mut self, now: Timestamp) {
        let k = u64::from(self.k());
        let deadline = self.config.repair_horizon;
        let mut by_target: BTreeMap<SocketAddr, Vec<u64>> = BTreeMap::new();
        let mut give_up = Vec::new();
        let seqs: Vec<u64> = self
            .missing
            .iter()
            .filter(|(_, m)| m.next_nack <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in seqs {
            let m = self.missing[&seq];
            if m.tries >= MAX_NACKS || now.saturating_since(m.noticed) > deadline {
                give_up.push(seq);
                continue;
            }
            let club = (seq % k) as u8;
            // First the club's sources: upstreams and seeds (which had the piece pushed to
            // them) before mates (which may have missed it as we did). After two tries, any
            // member we are linked with: every member receives every club, so most have it.
            let mut sources: Vec<(u8, SocketAddr)> = self
                .links
                .iter()
                .filter(|(_, l)| l.established || !l.initiated)
                .filter_map(|(a, l)| {
                    let rank = match (l.is_source_of(club), l.mate) {
                        (true, false) => 0,
                        (true, true) => 1,
                        _ if m.tries >= 2 => 2,
                        _ => return None,
                    };
                    Some((rank, *a))
                })
                .collect();
            if sources.is_empty() {
                continue;
            }
            sources.sort_unstable();
            let sources: Vec<SocketAddr> = sources.into_iter().map(|(_, a)| a).collect();
            let target = sources[(m.tries as usize) % sources.len()];
            let rtt = self
                .links
                .get(&target)
                .map_or(Duration::from_millis(100), |l| l.srtt);
            by_target.entry(target).or_default().push(seq);
            if let Some(e) = self.missing.get_mut(&seq) {
                e.blamed.get_or_insert(target);
                e.tries += 1;
                e.next_nack = now + (rtt * 2).max(Duration::from_millis(80));
            }
        }
        for seq in give_up {
            tracing::trace!(seq, "repair given up");
            if let Some(b) = self.missing.remove(&seq).and_then(|m| m.blamed) {
                if let Some(l) = self.links.get_mut(&b) {
                    l.pieces_missed += 1;
                }
            }
            self.stats.repairs_given_up += 1;
        }
        for (to, mut seqs) in by_target {
            seqs.sort_unstable();
            let mut i = 0;
            while i < seqs.len() {
                let base = seqs[i];
                let mut missing = 0u64;
                while i < seqs.len() && seqs[i] - base < 64 {
                    missing |= 1 << (seqs[i] - base);
                    i += 1;
                }
                let nack = Nack {
                    channel: self.channel,
                    base,
                    missing,
                };
                self.stats.repairs_asked += u64::from(missing.count_ones());
                tracing::trace!(%to, base, missing, "NACK");
                self.send_control(to, |b| nack.encode(b));
            }
        }
    }

    /// Leaves: tells linked members and the tracker. Nothing more is sent after the datagrams
    /// this queues.
    pub fn leave(&mut self, now: Timestamp) {
        let addrs: Vec<SocketAddr> = self.links.keys().copied().collect();
        for a in addrs {
            if let Some(l) = self.links.get(&a) {
                let mut j = self.join_for_link(l, l.cookie);
                j.leaving = true;
                self.send_control(a, |b| j.encode(b));
            }
        }
        self.links.clear();
        self.urgent.clear();
        self.live.clear();
        self.delayed.clear();
        if let Some(t) = &self.tracker {
            if let Some(cookie) = t.cookie {
                let a = TrackerAnnounce {
                    channel: self.channel,
                    cookie,
                    role: self.config.role,
                    club: self.club,
                    upload_kbps: 0,
                    leaving: true,
                };
                let addr = t.addr;
                self.send_control(addr, |b| a.encode(b));
            }
        }
        self.leaving = true;
        let _ = now;
    }
}

/// Payload bytes of a full piece (six TS packets).
const PAYLOAD: u64 = 1128;
/// No new piece for this long: look for gaps up to the newest piece (the stream paused or
/// ended, so no later piece will reveal them).
const STREAM_PAUSE: Duration = Duration::from_millis(150);
/// A peer waits this long for the tracker to assign its club before choosing one itself.
const CLUB_ASSIGNMENT_WAIT: Duration = Duration::from_secs(3);
/// A member replaced as an upstream is not asked again for this long.
const REPLACED_BACKOFF: Duration = Duration::from_secs(3);
/// A member that refused a JOIN is not asked again for this long.
const REFUSED_BACKOFF: Duration = Duration::from_secs(2);
const COOKIE_BUCKET: Duration = Duration::from_secs(30);
/// A publisher's seed keeps its seat at least this long.
const SEED_TENURE: Duration = Duration::from_secs(1);

/// Burst of the upload bucket: 20 ms of the limit, and at least four datagrams.
fn bucket_burst(limit_bps: Option<u64>) -> u64 {
    let four = 4 * MAX_DATAGRAM as u64;
    limit_bps.map_or(four, |b| (b / 8 / 50).max(four))
}

/// A forger's copy of a piece: one payload byte flipped, the signature left as it was.
fn corrupt(bytes: &PieceBytes) -> PieceBytes {
    let mut v = bytes.to_vec();
    if let Some(b) = v.get_mut(40) {
        *b ^= 0x5a;
    }
    Arc::from(v)
}
