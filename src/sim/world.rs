//! The discrete-event engine: one thread, virtual time in microseconds, one ordered queue of
//! events. Members are the real [`SwarmNode`]s and the tracker the real [`TrackerCore`]; this
//! file is only their IO — it carries their datagrams through the [`Network`], wakes them when
//! they asked, publishes the stream, runs churn and attacks, and watches what they play.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::network::{Fate, Host, Network};
use super::queue::EventQueue;
use super::report::{
    round3, Attacks, BoundCheck, ClubOutages, Duplicates, Links, Missed, NetworkCounts, Quantiles,
    Repairs, Report, Spread, SteadyState,
};
use super::scenario::Scenario;
use super::SimError;
use crate::crypto::{ChannelKey, ChannelPublicKey};
use crate::publisher::Publisher;
use crate::swarm::DATAGRAM_OVERHEAD as HEADERS;
use crate::swarm::{
    Behaviour, ChannelInfo, Datagram, PieceBytes, SwarmConfig, SwarmNode, SwarmStats, Transmit,
    VerifiedPieces, STARTUP_HOLD,
};
use crate::time::Timestamp;
use crate::tracker::{TrackerConfig, TrackerCore};
use crate::wire::{ClubMask, CookieBytes, Descriptor, Join, Piece, PieceFlags, Role, MAX_DATAGRAM};

const TRACKER: u32 = 0;
const PUBLISHER: u32 = 1;
const ATTACKER: u32 = 2;
const FIRST_RELAY: u32 = 3;
/// Senders at or above this are spoofed addresses, not hosts.
const SPOOFED: u32 = 1 << 31;
const PORT: u16 = 7000;
/// Hops are remembered per member for this many recent sequence numbers.
const HOP_SLOTS: usize = 1024;
/// A member that asks to be woken "now" after being served is woken this much later (it is
/// waiting on something the clock alone will not bring).
const IDLE_WAKE_US: u64 = 1_000;
/// Share of its line's upload a member is configured to use (`--upload-limit`, which counts
/// everything it sends, headers included): a little room for bursts.
const LIMIT_SHARE: f64 = 0.95;
/// How often spoofed JOINs are sent (in batches).
const BOGUS_TICK_US: u64 = 10_000;

/// The span a member's log lines carry while it handles an event (`sim --log-level trace`
/// shows each member's decisions in virtual time). When that level is off, this is one
/// cached level check per event and no fields are built.
fn node_span(i: u32, now_us: u64) -> tracing::Span {
    tracing::trace_span!("member", at = %addr_of(i).ip(), ms = now_us / 1000)
}

/// The address of host `i`.
fn addr_of(i: u32) -> SocketAddr {
    if i >= SPOOFED {
        let n = i - SPOOFED;
        let ip = Ipv4Addr::new(100, 64 + (n >> 16) as u8 % 64, (n >> 8) as u8, n as u8);
        return SocketAddr::from((ip, PORT));
    }
    let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
    SocketAddr::from((ip, PORT))
}

/// The host at `a`, if it is one of ours.
fn index_of(a: &SocketAddr) -> Option<u32> {
    match a {
        SocketAddr::V4(v4) if v4.port() == PORT && v4.ip().octets()[0] == 10 => {
            let o = v4.ip().octets();
            Some(u32::from_be_bytes([0, o[1], o[2], o[3]]))
        }
        _ => None,
    }
}

/// What a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Publisher,
    Relay,
    Honest,
    Forger,
    FreeRider,
    Delayer,
}

/// A member of the swarm and what the simulator watches of it.
struct Member {
    node: Option<SwarmNode>,
    kind: Kind,
    joined: u64,
    left: Option<u64>,
    /// The wake-up queued for it (`u64::MAX`: none).
    wake_at: u64,
    clubs_seen: u64,
    first_piece: Option<u64>,
    startup: Option<u64>,
    /// Index (from the first published piece) of the first piece it plays.
    play_from: Option<usize>,
    /// Pieces delivered before their deadline, by index.
    on_time: Vec<u64>,
    /// Pieces delivered at all, by index.
    delivered: Vec<u64>,
    /// Its club, once the tracker gave it one.
    club: Option<u8>,
    upload_bytes: u64,
    hops: Box<[u8; HOP_SLOTS]>,
    /// When each recent piece arrived, µs.
    got_at: Box<[u64; HOP_SLOTS]>,
}

impl Member {
    /// Whether it played the piece at `index` (from the first published) before its deadline.
    fn played_on_time(&self, index: usize) -> bool {
        bit(&self.on_time, index)
    }
}

fn bit(bits: &[u64], index: usize) -> bool {
    bits.get(index / 64)
        .is_some_and(|w| w >> (index % 64) & 1 == 1)
}

fn set_bit(bits: &mut Vec<u64>, index: usize) {
    let word = index / 64;
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    bits[word] |= 1 << (index % 64);
}

enum Agent {
    Tracker(Box<TrackerCore>),
    Member(Box<Member>),
    Nobody,
}

#[derive(Debug)]
enum EventKind {
    /// A datagram reaches `to`'s downlink.
    Arrive {
        to: u32,
        from: u32,
        data: Datagram,
        hops: u8,
    },
    /// A datagram that queued on `to`'s downlink is handed over.
    Deliver {
        to: u32,
        from: u32,
        data: Datagram,
        hops: u8,
    },
    Wake(u32),
    Publish,
    Join,
    Churn,
    Bogus,
    TrackerTick,
}

/// A simulation in progress.
pub(super) struct World {
    s: Scenario,
    seed: u64,
    now: u64,
    queue: EventQueue<EventKind>,
    hosts: Vec<Host>,
    agents: Vec<Agent>,
    net: Network,
    rng: StdRng,
    key: ChannelKey,
    public: ChannelPublicKey,
    info: ChannelInfo,
    publisher: Publisher,
    /// Publish time (µs) and bytes of every piece, by index from the first.
    published: Vec<(u64, PieceBytes)>,
    first_seq: u64,
    verified: VerifiedPieces,
    /// Peers present, for churn to pick from, and each one's place in it.
    present: Vec<u32>,
    place: Vec<u32>,
    joins_left: usize,
    join_gap_us: u64,
    stream_end: u64,
    end: u64,
    bitrate: u64,
    departed: SwarmStats,
    delay: Histogram<u64>,
    /// Publish time (µs) from which pieces count for the steady state, if measured.
    steady_from: Option<u64>,
    /// Delay behind source of the pieces published from `steady_from` on, µs.
    steady_delay: Histogram<u64>,
    hops: Vec<u64>,
    /// Summed delay behind source by hops, µs.
    hop_delay: Vec<u64>,
    /// How long honest peers held pieces before sending them on, µs.
    forward_wait: Histogram<u64>,
    /// Time datagrams waited on access uplinks, µs.
    uplink_queue: Histogram<u64>,
    counts: NetworkCounts,
    attacks: Attacks,
    events: u64,
    scratch: Vec<Transmit>,
    played: Vec<PieceBytes>,
    joined: u64,
    left: u64,
    bogus_next: u32,
}

impl World {
    pub(super) fn new(s: &Scenario, seed: u64) -> Result<Self, SimError> {
        let mut key_seed = [0u8; 32];
        key_seed[..8].copy_from_slice(&seed.to_le_bytes());
        let key = ChannelKey::from_seed(&key_seed);
        let public = key.public();
        let bitrate = s.stream.bitrate_kbps * 1000;
        let first_seq = 1;
        let info = ChannelInfo {
            clubs: s.stream.clubs,
            bitrate_bps: bitrate,
            first_seq,
            private: false,
        };
        let start = s.stream.start.as_micros() as u64;
        let stream_end = start + s.stream.duration.as_micros() as u64;
        let end = stream_end + s.stream.playout_delay.as_micros() as u64 + 500_000;
        let count = s.peers.count;
        let mut w = World {
            net: Network::new(&s.network, seed),
            rng: StdRng::seed_from_u64(seed),
            publisher: Publisher::new(ChannelKey::from_seed(&key_seed), first_seq, s.stream.clubs),
            key,
            public,
            info,
            s: s.clone(),
            seed,
            now: 0,
            queue: EventQueue::new(),
            hosts: Vec::new(),
            agents: Vec::new(),
            published: Vec::new(),
            first_seq,
            verified: VerifiedPieces::new(),
            present: Vec::new(),
            place: Vec::new(),
            joins_left: count,
            join_gap_us: if count > 1 {
                s.peers.join_over.as_micros() as u64 / (count as u64 - 1)
            } else {
                0
            },
            stream_end,
            end,
            bitrate,
            departed: SwarmStats::default(),
            delay: histogram()?,
            steady_from: s
                .measure
                .steady_after
                .map(|w| (s.stream.start + w).as_micros() as u64),
            steady_delay: histogram()?,
            hops: Vec::new(),
            hop_delay: Vec::new(),
            forward_wait: histogram()?,
            uplink_queue: histogram()?,
            counts: NetworkCounts::default(),
            attacks: Attacks::default(),
            events: 0,
            scratch: Vec::new(),
            played: Vec::new(),
            joined: 0,
            left: 0,
            bogus_next: 0,
        };
        w.add_tracker();
        w.add_publisher()?;
        w.add_host(Host::new(None, None, 0), Agent::Nobody); // the attacker's
        for r in 0..s.relays.count {
            w.add_relay(r as u64);
        }
        w.schedule(start, EventKind::Publish);
        w.schedule(s.peers.join_at.as_micros() as u64, EventKind::Join);
        w.schedule(1_000_000, EventKind::TrackerTick);
        if s.churn.per_minute > 0.0 {
            let at = start + s.churn.after.as_micros() as u64;
            w.schedule(at, EventKind::Churn);
        }
        if s.adversaries.bogus_joins_per_s > 0 {
            w.schedule(start, EventKind::Bogus);
        }
        Ok(w)
    }

    fn schedule(&mut self, at: u64, kind: EventKind) {
        self.queue.push(at, kind);
    }

    fn add_host(&mut self, host: Host, agent: Agent) -> u32 {
        let i = self.hosts.len() as u32;
        self.hosts.push(host);
        self.agents.push(agent);
        self.place.push(u32::MAX);
        i
    }

    fn member_config(&self, role: Role, upload: Option<f64>, seed: u64) -> SwarmConfig {
        // Members are told to use a little less than their line, as an operator would set
        // `--upload-limit`.
        let share = LIMIT_SHARE;
        SwarmConfig {
            role,
            tracker: Some(addr_of(TRACKER)),
            upload_limit_bps: upload.map(|u| (u * share * self.bitrate as f64) as u64),
            seed: self.seed.wrapping_mul(1_000_003).wrapping_add(seed),
            verified: Some(self.verified.clone()),
            ..SwarmConfig::default()
        }
    }

    fn new_member(&self, node: SwarmNode, kind: Kind) -> Agent {
        Agent::Member(Box::new(Member {
            node: Some(node),
            kind,
            joined: self.now,
            left: None,
            wake_at: u64::MAX,
            clubs_seen: 0,
            first_piece: None,
            startup: None,
            play_from: None,
            on_time: Vec::new(),
            delivered: Vec::new(),
            club: None,
            upload_bytes: 0,
            hops: Box::new([0; HOP_SLOTS]),
            got_at: Box::new([0; HOP_SLOTS]),
        }))
    }

    fn add_tracker(&mut self) {
        let config = TrackerConfig::default();
        let core = TrackerCore::new(config, [7; 32], self.seed);
        self.add_host(Host::new(None, None, 0), Agent::Tracker(Box::new(core)));
    }

    fn add_publisher(&mut self) -> Result<(), SimError> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let key = &self.key;
        let n = Descriptor::encode_signed(
            &self.public.to_bytes(),
            self.first_seq,
            self.info.clubs,
            false,
            self.bitrate,
            &mut buf,
            |m| key.sign(m),
        )
        .map_err(|e| SimError::Internal(e.to_string()))?;
        let upload = self.s.publisher.upload;
        let config = self.member_config(Role::Publisher, Some(upload), 1);
        let node = SwarmNode::publisher(self.public, self.info.clone(), buf[..n].to_vec(), config);
        let up = (upload * self.bitrate as f64) as u64;
        let agent = self.new_member(node, Kind::Publisher);
        let i = self.add_host(Host::new(Some(up), None, 0), agent);
        self.schedule(0, EventKind::Wake(i));
        Ok(())
    }

    fn add_relay(&mut self, r: u64) {
        let mut config = self.member_config(Role::Relay, self.s.relays.upload, 2 + r);
        config.max_downstreams = self.s.relays.out_degree;
        let up = self
            .s
            .relays
            .upload
            .map(|u| (u * self.bitrate as f64) as u64);
        let node = SwarmNode::new(self.public, config);
        let agent = self.new_member(node, Kind::Relay);
        let i = self.add_host(Host::new(up, None, 0), agent);
        self.schedule(0, EventKind::Wake(i));
    }

    /// Draws an index from `weights` (normalised here).
    fn pick(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.rng.gen::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    fn join_peer(&mut self) {
        let classes: Vec<f64> = self.s.peers.class.iter().map(|c| c.share).collect();
        let class = self.pick(&classes);
        let class = self.s.peers.class[class].clone();
        let regions: Vec<f64> = self.s.network.region.iter().map(|r| r.share).collect();
        let region = self.pick(&regions) as u8;
        let a = &self.s.adversaries;
        let x = self.rng.gen::<f64>();
        let kind = if x < a.forgers {
            Kind::Forger
        } else if x < a.forgers + a.free_riders {
            Kind::FreeRider
        } else if x < a.forgers + a.free_riders + a.delayers {
            Kind::Delayer
        } else {
            Kind::Honest
        };
        let i = self.hosts.len() as u64;
        let mut config = self.member_config(Role::Peer, Some(class.upload), i);
        config.behaviour = match kind {
            Kind::Forger => Behaviour::Forger,
            Kind::FreeRider => Behaviour::FreeRider,
            Kind::Delayer => Behaviour::Delayer(a.delay),
            _ => Behaviour::Honest,
        };
        let up = (class.upload * self.bitrate as f64) as u64;
        let down = (class.download * self.bitrate as f64) as u64;
        let node = SwarmNode::new(self.public, config);
        let agent = self.new_member(node, kind);
        let i = self.add_host(Host::new(Some(up.max(1)), Some(down), region), agent);
        self.place[i as usize] = self.present.len() as u32;
        self.present.push(i);
        self.joined += 1;
        self.schedule(self.now, EventKind::Wake(i));
    }

    /// Runs to the end; the report.
    pub(super) fn run(mut self) -> Report {
        while let Some((at, kind)) = self.queue.pop() {
            if at > self.end {
                break;
            }
            self.now = at;
            self.events += 1;
            self.handle(kind);
        }
        self.now = self.end;
        self.report()
    }

    fn handle(&mut self, kind: EventKind) {
        match kind {
            EventKind::Arrive {
                to,
                from,
                data,
                hops,
            } => self.arrive(to, from, data, hops),
            EventKind::Deliver {
                to,
                from,
                data,
                hops,
            } => self.deliver(to, from, data, hops),
            EventKind::Wake(i) => self.wake(i),
            EventKind::Publish => self.publish(),
            EventKind::Join => {
                self.join_peer();
                self.joins_left = self.joins_left.saturating_sub(1);
                if self.joins_left > 0 {
                    self.schedule(self.now + self.join_gap_us, EventKind::Join);
                }
            }
            EventKind::Churn => self.churn(),
            EventKind::Bogus => self.bogus(),
            EventKind::TrackerTick => {
                let now = Timestamp::from_micros(self.now);
                if let Agent::Tracker(t) = &mut self.agents[TRACKER as usize] {
                    t.handle_timeout(now);
                }
                self.schedule(self.now + 1_000_000, EventKind::TrackerTick);
            }
        }
    }

    fn member(&mut self, i: u32) -> Option<&mut Member> {
        match self.agents.get_mut(i as usize) {
            Some(Agent::Member(m)) if m.node.is_some() => Some(m),
            _ => None,
        }
    }

    fn wake(&mut self, i: u32) {
        let now = self.now;
        let Some(m) = self.member(i) else { return };
        if m.wake_at != now && m.wake_at != u64::MAX {
            return; // superseded by an earlier wake-up
        }
        m.wake_at = u64::MAX;
        if let Some(node) = &mut m.node {
            let _at = node_span(i, now).entered();
            node.handle_timeout(Timestamp::from_micros(now));
        }
        self.serve(i, true);
    }

    /// Collects what member `i` has to play and send, sends it, and queues its next wake-up.
    fn serve(&mut self, i: u32, woken: bool) {
        let now = self.now;
        let ts = Timestamp::from_micros(now);
        let mut out = std::mem::take(&mut self.scratch);
        let mut played = std::mem::take(&mut self.played);
        let Some(m) = self.member(i) else { return };
        let Some(node) = &mut m.node else { return };
        while let Some(p) = node.poll_piece() {
            played.push(p);
        }
        while let Some(t) = node.poll_transmit(ts) {
            out.push(t);
        }
        let mut next = node.poll_timeout(ts).as_micros();
        if next <= now && woken {
            next = now + IDLE_WAKE_US;
        }
        let wake = next < m.wake_at;
        if wake {
            m.wake_at = next;
        }
        for p in played.drain(..) {
            self.on_played(i, &p);
        }
        for t in out.drain(..) {
            self.send(i, t);
        }
        self.scratch = out;
        self.played = played;
        if wake {
            self.schedule(next, EventKind::Wake(i));
        }
    }

    /// Sends a datagram from host `from` through the network.
    fn send(&mut self, from: u32, t: Transmit) {
        let now = self.now;
        self.counts.datagrams += 1;
        let len = t.data.as_bytes().len() as u64;
        let mut hops = 0;
        if let Datagram::Piece(p) = &t.data {
            if let Some(m) = self.member(from) {
                m.upload_bytes += len;
                if let Ok(piece) = Piece::parse(p) {
                    hops = m.hops[piece.seq() as usize % HOP_SLOTS].saturating_add(1);
                    if m.kind == Kind::Honest {
                        let waited = now.saturating_sub(m.got_at[piece.seq() as usize % HOP_SLOTS]);
                        let _ = self.forward_wait.record(waited);
                    }
                }
            }
        }
        let Some(depart) =
            self.hosts[from as usize].uplink(now, len + HEADERS, self.net.queue_limit_us)
        else {
            if self.hosts[from as usize].alive {
                self.counts.queue_drops += 1;
            }
            return;
        };
        let depart = depart.max(now);
        if from > ATTACKER {
            let _ = self.uplink_queue.record(depart - now);
        }
        let to = index_of(&t.to).filter(|i| (*i as usize) < self.hosts.len() && *i != ATTACKER);
        let Some(to) = to.filter(|i| self.hosts[*i as usize].alive) else {
            self.counts.undeliverable += 1;
            if to.is_none() && from != ATTACKER {
                self.attacks.bogus_reply_bytes += len;
            }
            return;
        };
        self.transmit(from, to, t.data, hops, depart);
    }

    /// The datagram leaves `from`'s uplink at `depart` towards `to`.
    fn transmit(&mut self, from: u32, to: u32, data: Datagram, hops: u8, depart: u64) {
        // Spoofed datagrams leave from the attacker's host.
        let sender = if from >= SPOOFED { ATTACKER } else { from };
        let (a, b) = (sender.min(to) as usize, sender.max(to) as usize);
        if a == b {
            return; // nobody sends to itself
        }
        let (lo, hi) = self.hosts.split_at_mut(b);
        let (ha, hb) = (&mut lo[a], &mut hi[0]);
        let (src, dst) = if sender as usize == a {
            (ha, hb)
        } else {
            (hb, ha)
        };
        match self.net.fate(sender, src, to, dst) {
            Fate::Lost => self.counts.lost += 1,
            Fate::Arrives(delay, again) => {
                if let Some(d2) = again {
                    self.counts.duplicated += 1;
                    let data = data.clone();
                    self.schedule(
                        depart + d2,
                        EventKind::Arrive {
                            to,
                            from,
                            data,
                            hops,
                        },
                    );
                }
                self.schedule(
                    depart + delay,
                    EventKind::Arrive {
                        to,
                        from,
                        data,
                        hops,
                    },
                );
            }
        }
    }

    fn arrive(&mut self, to: u32, from: u32, data: Datagram, hops: u8) {
        let host = &mut self.hosts[to as usize];
        if !host.alive {
            self.counts.undeliverable += 1;
            return;
        }
        let size = data.as_bytes().len() as u64 + HEADERS;
        match host.downlink(self.now, size, self.net.queue_limit_us) {
            None => self.counts.queue_drops += 1,
            Some(at) if at <= self.now => self.deliver(to, from, data, hops),
            Some(at) => self.schedule(
                at,
                EventKind::Deliver {
                    to,
                    from,
                    data,
                    hops,
                },
            ),
        }
    }

    fn deliver(&mut self, to: u32, from: u32, data: Datagram, hops: u8) {
        let now = Timestamp::from_micros(self.now);
        let from_addr = addr_of(from);
        match &mut self.agents[to as usize] {
            Agent::Tracker(t) => {
                let mut replies = Vec::new();
                t.handle(now, from_addr, data.as_bytes(), &mut |r| {
                    replies.push(r.to_vec())
                });
                for r in replies {
                    self.send(
                        TRACKER,
                        Transmit {
                            to: from_addr,
                            data: Datagram::Control(r),
                        },
                    );
                }
            }
            Agent::Member(m) => {
                let Some(node) = &mut m.node else { return };
                let before = node.stats().pieces_new;
                let _at = node_span(to, self.now).entered();
                node.handle_datagram(now, from_addr, data.as_bytes());
                let new = node.stats().pieces_new > before;
                if let Ok(p) = Piece::parse(data.as_bytes()) {
                    if new {
                        m.hops[p.seq() as usize % HOP_SLOTS] = hops;
                        m.got_at[p.seq() as usize % HOP_SLOTS] = self.now;
                    }
                }
                if from >= SPOOFED && node.is_linked(&from_addr) {
                    self.attacks.bogus_links += 1;
                }
                self.serve(to, false);
            }
            Agent::Nobody => self.counts.undeliverable += 1,
        }
    }

    /// A piece member `i` delivered for playing.
    fn on_played(&mut self, i: u32, bytes: &PieceBytes) {
        let Ok(piece) = Piece::parse(bytes) else {
            return;
        };
        let seq = piece.seq();
        let Some(index) = seq
            .checked_sub(self.first_seq)
            .map(|x| x as usize)
            .filter(|x| *x < self.published.len())
        else {
            self.attacks.forged_played += 1;
            return;
        };
        let (published_at, genuine) = &self.published[index];
        let published_at = *published_at;
        if genuine.as_ref() != bytes.as_ref() {
            self.attacks.forged_played += 1;
            return;
        }
        let now = self.now;
        let k = u32::from(self.info.clubs);
        let all_clubs = if k >= 64 { u64::MAX } else { (1u64 << k) - 1 };
        let deadline = published_at + self.s.stream.playout_delay.as_micros() as u64;
        let next_index = self.published.len();
        let Some(m) = self.member(i) else { return };
        if m.kind != Kind::Honest {
            return;
        }
        let hops = m.hops[seq as usize % HOP_SLOTS];
        m.clubs_seen |= 1 << (seq % u64::from(k));
        let first = *m.first_piece.get_or_insert(now);
        let held_long_enough = now >= first + STARTUP_HOLD.as_micros() as u64;
        if m.startup.is_none() && (m.clubs_seen & all_clubs == all_clubs || held_long_enough) {
            // Close to the watcher: it starts once every club has delivered (the watcher waits
            // for one piece of every club in a row from where it starts), or after holding its
            // first pieces for STARTUP_HOLD, with the next piece published.
            m.startup = Some(now);
            m.play_from = Some(next_index);
        }
        if now <= deadline {
            set_bit(&mut m.on_time, index);
        }
        set_bit(&mut m.delivered, index);
        if m.club.is_none() {
            m.club = m.node.as_ref().map(SwarmNode::club);
        }
        let _ = self.delay.record(now.saturating_sub(published_at));
        if self.steady_from.is_some_and(|t| published_at >= t) {
            let _ = self.steady_delay.record(now.saturating_sub(published_at));
        }
        let h = usize::from(hops);
        if self.hops.len() <= h {
            self.hops.resize(h + 1, 0);
        }
        self.hops[h] += 1;
        if self.hop_delay.len() <= h {
            self.hop_delay.resize(h + 1, 0);
        }
        self.hop_delay[h] += now.saturating_sub(published_at);
    }

    fn publish(&mut self) {
        if self.now >= self.stream_end {
            return;
        }
        let mut buf = [0u8; MAX_DATAGRAM];
        let mut payload = [0x47u8; crate::ts::PIECE_PAYLOAD];
        let seq = self.publisher.next_seq();
        payload[1..9].copy_from_slice(&seq.to_be_bytes());
        if let Ok(n) =
            self.publisher
                .encode_piece(&payload, PieceFlags::empty(), self.now, &mut buf)
        {
            let bytes: PieceBytes = Arc::from(&buf[..n]);
            self.verified.insert(seq, bytes.clone());
            self.published.push((self.now, bytes.clone()));
            let now = Timestamp::from_micros(self.now);
            if let Some(node) = self.member(PUBLISHER).and_then(|m| m.node.as_mut()) {
                node.publish(now, bytes);
            }
            self.serve(PUBLISHER, false);
        }
        let interval = crate::ts::PIECE_PAYLOAD as u64 * 8 * 1_000_000 / self.bitrate;
        self.schedule(self.now + interval.max(1), EventKind::Publish);
    }

    /// One peer leaves (saying goodbye or not) and a new one joins; the next departure.
    fn churn(&mut self) {
        if self.now >= self.stream_end {
            return;
        }
        if !self.present.is_empty() {
            let pick = self.rng.gen_range(0..self.present.len());
            let i = self.present[pick];
            let graceful = self.rng.gen::<f64>() < self.s.churn.graceful;
            self.leave(i, graceful);
            self.join_peer();
        }
        let rate_per_s = self.s.churn.per_minute * self.present.len().max(1) as f64 / 60.0;
        let gap = -(1.0 - self.rng.gen::<f64>()).ln() / rate_per_s;
        let gap_us = (gap * 1e6).clamp(1.0, 3.6e9) as u64;
        self.schedule(self.now + gap_us, EventKind::Churn);
    }

    fn leave(&mut self, i: u32, graceful: bool) {
        let now = Timestamp::from_micros(self.now);
        if graceful {
            if let Some(node) = self.member(i).and_then(|m| m.node.as_mut()) {
                node.leave(now);
            }
            self.serve(i, false);
        }
        let at = self.now;
        if let Some(m) = self.member(i) {
            m.left = Some(at);
            if let Some(node) = m.node.take() {
                self.departed.absorb(node.stats());
            }
        }
        self.hosts[i as usize].alive = false;
        let place = self.place[i as usize] as usize;
        self.present.swap_remove(place);
        if let Some(&moved) = self.present.get(place) {
            self.place[moved as usize] = place as u32;
        }
        self.left += 1;
    }

    /// A batch of JOINs from spoofed addresses at each relay (or the publisher).
    fn bogus(&mut self) {
        if self.now >= self.stream_end {
            return;
        }
        let per_tick = (self.s.adversaries.bogus_joins_per_s * BOGUS_TICK_US / 1_000_000).max(1);
        let targets: Vec<u32> = if self.s.relays.count > 0 {
            (0..self.s.relays.count as u32)
                .map(|r| FIRST_RELAY + r)
                .collect()
        } else {
            vec![PUBLISHER]
        };
        for to in targets {
            for _ in 0..per_tick {
                let mut cookie = [0u8; 20];
                self.rng.fill(&mut cookie[..]);
                let join = Join {
                    channel: self.public.channel_id(),
                    cookie: CookieBytes(cookie),
                    role: Role::Peer,
                    club: 0,
                    want: ClubMask::all(self.info.clubs),
                    mate: false,
                    catch_up: true,
                    leaving: false,
                    starving: false,
                    departing: false,
                    spare: 0,
                };
                let mut buf = [0u8; Join::LEN];
                let Ok(n) = join.encode(&mut buf) else {
                    continue;
                };
                let from = SPOOFED + self.bogus_next % (1 << 22);
                self.bogus_next += 1;
                self.attacks.bogus_joins += 1;
                self.attacks.bogus_bytes += n as u64;
                self.counts.datagrams += 1;
                let data = Datagram::Control(buf[..n].to_vec());
                self.transmit(from, to, data, 0, self.now);
            }
        }
        self.schedule(self.now + BOGUS_TICK_US, EventKind::Bogus);
    }

    fn report(mut self) -> Report {
        let s = &self.s;
        let playout = s.stream.playout_delay.as_micros() as u64;
        let start = s.stream.start.as_micros() as u64;
        let n = self.published.len();
        let seconds = s.stream.duration.as_secs().max(1) as usize + 1;
        let mut bucket_expected = vec![0u64; seconds];
        let mut bucket_on_time = vec![0u64; seconds];
        let bucket_of = |t: u64| ((t.saturating_sub(start)) / 1_000_000) as usize;
        let mut whole = Tally::default();
        // The steady state: pieces from the first published at or after `steady_from`.
        let steady_first = self
            .steady_from
            .map(|t| self.published.partition_point(|(p, _)| *p < t));
        let mut steady = Tally::default();
        let mut outages = ClubOutages::default();
        let mut missed = Missed::default();
        let mut startup = self.delay.clone();
        startup.reset();
        let mut never_started = 0;
        let mut uploads = Vec::new();
        let mut stats = std::mem::take(&mut self.departed);
        let mut publisher_upload = 0.0;
        let mut relay_upload = Vec::new();
        let stream_s = s.stream.duration.as_secs_f64();
        let rate = self.bitrate as f64 / 8.0;
        let mut honest = 0u64;
        for agent in &self.agents {
            let Agent::Member(m) = agent else { continue };
            if let Some(node) = &m.node {
                stats.absorb(node.stats());
            }
            match m.kind {
                Kind::Publisher => {
                    publisher_upload = round3(m.upload_bytes as f64 / stream_s / rate);
                    continue;
                }
                Kind::Relay => {
                    relay_upload.push(round3(m.upload_bytes as f64 / stream_s / rate));
                    continue;
                }
                Kind::Honest => {}
                _ => continue,
            }
            honest += 1;
            let gone = m.left.unwrap_or(self.end);
            let present = gone.saturating_sub(m.joined.max(start));
            if present >= 5_000_000 {
                uploads.push(m.upload_bytes as f64 / (present as f64 / 1e6) / rate);
            }
            let Some(first) = m.play_from else {
                // Never started: counted, with its whole stay as its startup time, if it had
                // time enough to start.
                if gone.saturating_sub(m.joined) >= 5_000_000 && m.joined < self.stream_end {
                    never_started += 1;
                    let _ = startup.record(gone - m.joined.max(start));
                }
                continue;
            };
            // From joining, or from the stream's start for those who came early.
            let _ = startup.record(
                m.startup
                    .unwrap_or(gone)
                    .saturating_sub(m.joined.max(start)),
            );
            // Pieces it had to play: from its first to the last whose deadline came before it
            // left (or the run ended).
            let last = self.published.partition_point(|(t, _)| t + playout <= gone);
            if last <= first {
                continue;
            }
            let mut expected = 0;
            let mut on_time = 0;
            for index in first..last {
                let hit = m.played_on_time(index);
                if !hit {
                    missed.pieces += 1;
                    missed.late += u64::from(bit(&m.delivered, index));
                    let club = (index as u64 + self.first_seq) % u64::from(self.info.clubs);
                    missed.own_club += u64::from(m.club == Some(club as u8));
                }
                let b = bucket_of(self.published[index].0).min(seconds - 1);
                bucket_expected[b] += 1;
                bucket_on_time[b] += u64::from(hit);
                expected += 1;
                on_time += u64::from(hit);
            }
            let k = self.info.clubs;
            let first_seq = self.first_seq;
            let published = &self.published;
            outages.add_peer(
                k,
                (first..last).map(|index| {
                    let club = ((index as u64 + first_seq) % u64::from(k)) as u8;
                    (published[index].0, club, m.played_on_time(index))
                }),
            );
            whole.add(on_time, expected);
            if let Some(from) = steady_first {
                let from = from.max(first);
                if from < last {
                    let hits = (from..last).filter(|i| m.played_on_time(*i)).count() as u64;
                    steady.add(hits, (last - from) as u64);
                }
            }
        }
        let (continuity, worst_peer_continuity, p1_peer_continuity) = whole.figures();
        let delay_cdf = cdf(&self.delay);
        let mut report = Report {
            scenario: s.name.clone(),
            seed: self.seed,
            simulated_s: self.end as f64 / 1e6,
            clubs: s.stream.clubs,
            peers_joined: self.joined,
            peers_left: self.left,
            honest_peers: honest,
            pieces_published: n as u64,
            continuity,
            worst_peer_continuity,
            p1_peer_continuity,
            delay_ms: Quantiles::of(&self.delay),
            steady: s
                .measure
                .steady_after
                .map(|w| steady.steady_state(w, &self.steady_delay)),
            startup_ms: Quantiles::of(&startup),
            never_started,
            delay_by_hop_ms: self
                .hops
                .iter()
                .zip(&self.hop_delay)
                .map(|(n, d)| (*d as f64 / (*n).max(1) as f64 / 100.0).round() / 10.0)
                .collect(),
            hops: std::mem::take(&mut self.hops),
            forward_wait_ms: Quantiles::of(&self.forward_wait),
            uplink_queue_ms: Quantiles::of(&self.uplink_queue),
            links: Links {
                joins_granted: stats.joins_granted,
                joins_refused: stats.joins_refused,
                replaced_silent: stats.replaced_silent,
                replaced_lossy: stats.replaced_lossy,
                replaced_slow: stats.replaced_slow,
            },
            peer_upload: Spread::of(uploads),
            publisher_upload,
            control_bytes: stats.control_bytes_out,
            relay_upload,
            missed,
            club_outages: ClubOutages {
                share_of_missed: round3(
                    outages.pieces as f64
                        / whole.expected.saturating_sub(whole.on_time).max(1) as f64,
                ),
                ..outages
            },
            repairs: Repairs {
                asked: stats.repairs_asked,
                repaired: stats.repaired,
                given_up: stats.repairs_given_up,
                served: stats.repairs_served,
                unavailable: stats.repairs_unavailable,
                resent: stats.background_pieces_out,
            },
            duplicates: Duplicates {
                pieces: stats.duplicates,
                from_mates: stats.duplicates_from_mates,
            },
            attacks: Attacks {
                forged_caught: stats.bad_pieces,
                bans: stats.peers_banned,
                ..self.attacks
            },
            network: self.counts,
            continuity_by_second: bucket_expected
                .iter()
                .zip(&bucket_on_time)
                .filter(|(e, _)| **e > 0)
                .map(|(e, o)| round4(*o as f64 / *e as f64))
                .collect(),
            delay_cdf,
            events: self.events,
            bounds: Vec::new(),
        };
        report.bounds = check_bounds(s, &report);
        report
    }
}

/// Pieces played on time out of those due, summed and per peer.
#[derive(Default)]
struct Tally {
    on_time: u64,
    expected: u64,
    per_peer: Vec<f64>,
}

impl Tally {
    fn add(&mut self, on_time: u64, expected: u64) {
        self.on_time += on_time;
        self.expected += expected;
        self.per_peer.push(on_time as f64 / expected.max(1) as f64);
    }

    /// Continuity overall, of the worst peer and of the 1st-percentile peer, rounded (0 for
    /// none).
    fn figures(&mut self) -> (f64, f64, f64) {
        self.per_peer.sort_by(f64::total_cmp);
        let share = if self.expected == 0 {
            0.0
        } else {
            self.on_time as f64 / self.expected as f64
        };
        let at = |i: usize| self.per_peer.get(i).copied().unwrap_or(0.0);
        (
            round4(share),
            round4(at(0)),
            round4(at(self.per_peer.len() / 100)),
        )
    }

    fn steady_state(mut self, after: Duration, delay: &Histogram<u64>) -> SteadyState {
        let (continuity, worst_peer_continuity, p1_peer_continuity) = self.figures();
        SteadyState {
            after_s: after.as_secs_f64(),
            continuity,
            worst_peer_continuity,
            p1_peer_continuity,
            delay_ms: Quantiles::of(delay),
        }
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// The delay CDF at a few hundred points, in ms.
fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let total = h.len() as f64;
    let mut out = Vec::new();
    let mut seen = 0u64;
    for v in h.iter_quantiles(4) {
        seen += v.count_since_last_iteration();
        let ms = (v.value_iterated_to() as f64 / 100.0).round() / 10.0;
        let share = round4(seen as f64 / total);
        if out.last().is_none_or(|(m, _): &(f64, f64)| *m < ms) {
            out.push((ms, share));
        } else if let Some(last) = out.last_mut() {
            last.1 = share;
        }
    }
    out
}

fn check_bounds(s: &Scenario, r: &Report) -> Vec<BoundCheck> {
    let b = &s.bounds;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut out = Vec::new();
    let mut at_least = |name: &str, limit: Option<f64>, value: f64| {
        if let Some(limit) = limit {
            out.push(BoundCheck {
                name: name.to_string(),
                limit,
                value,
                ok: value >= limit,
            });
        }
    };
    // With a steady state measured, continuity and delay bounds hold it (the report shows the
    // whole run beside it).
    let (continuity, worst_peer, delay_p99, which) = match &r.steady {
        Some(st) => (
            st.continuity,
            st.worst_peer_continuity,
            st.delay_ms.p99,
            "steady ",
        ),
        None => (r.continuity, r.worst_peer_continuity, r.delay_ms.p99, ""),
    };
    at_least(&format!("{which}continuity"), b.min_continuity, continuity);
    at_least(
        &format!("{which}worst peer continuity"),
        b.min_peer_continuity,
        worst_peer,
    );
    let mut at_most = |name: &str, limit: Option<f64>, value: f64| {
        if let Some(limit) = limit {
            out.push(BoundCheck {
                name: name.to_string(),
                limit,
                value,
                ok: value <= limit,
            });
        }
    };
    at_most(
        &format!("{which}delay p99 ms"),
        b.max_delay_p99.map(ms),
        delay_p99,
    );
    at_most(
        "startup p99 ms",
        b.max_startup_p99.map(ms),
        r.startup_ms.p99,
    );
    at_most(
        "never started",
        b.max_never_started.map(|n| n as f64),
        r.never_started as f64,
    );
    at_most(
        "club outages",
        b.max_club_outages.map(|n| n as f64),
        r.club_outages.count as f64,
    );
    at_most(
        "publisher upload",
        b.max_publisher_upload,
        r.publisher_upload,
    );
    // Always: nothing forged is played, and no spoofed address gets a link.
    at_most("forged played", Some(0.0), r.attacks.forged_played as f64);
    at_most("bogus links", Some(0.0), r.attacks.bogus_links as f64);
    if r.attacks.bogus_joins > 0 {
        // The flood's target answers an unproven address with no more than it was sent.
        let ratio = r.attacks.bogus_reply_bytes as f64 / r.attacks.bogus_bytes.max(1) as f64;
        at_most("bogus reply bytes per byte", Some(1.0), round3(ratio));
    }
    out
}

/// An empty histogram of microseconds (three significant figures).
fn histogram() -> Result<Histogram<u64>, SimError> {
    Histogram::new(3).map_err(|e| SimError::Internal(e.to_string()))
}
