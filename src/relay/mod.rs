//! The relay's sans-IO core: which datagrams to answer, which pieces to forward, to whom.
//!
//! [`RelayCore`] takes `(now, source, datagram)` and a reply buffer and returns an [`Inbound`]
//! verdict; it never touches a socket or a clock, so the engine, the tests and the simulator
//! drive the very same code. Pieces go through two steps so the engine can verify signatures in
//! batches: [`RelayCore::handle`] applies the cheap filters (layout, known channel, replay
//! window) and hands back a [`PendingPiece`]; after verification [`RelayCore::admit`] marks it
//! seen, and the engine sends the unchanged datagram to [`RelayCore::subscribers`]. Nothing
//! unverified is ever forwarded.

pub mod cookie;
pub mod limits;
mod subscribers;
mod window;

pub use cookie::{CookieCheck, CookieJar};
pub use subscribers::{Subscribers, Upsert};
pub use window::{SeqReject, SeqWindow};

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::crypto::{verify_announce, ChannelPublicKey};
use crate::time::Timestamp;
use crate::wire::{
    Announce, Announced, ChannelId, Cookie, Message, Piece, Subscribed, Subscription,
};
use limits::SourceLimiter;

/// Tunables of the relay core.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// A subscriber is dropped when no SUBSCRIBE or KEEPALIVE arrived for this long.
    pub subscriber_timeout: Duration,
    /// A channel with no subscribers and no announce for this long is forgotten.
    pub channel_idle_timeout: Duration,
    /// Cookie time bucket; a cookie is valid for one to two buckets.
    pub cookie_bucket: Duration,
    /// Most channels the relay tracks at once.
    pub max_channels: usize,
    /// Most subscribers per channel.
    pub max_subscribers_per_channel: usize,
    /// A subscriber is cut after this many refused copies between two of its keepalives.
    pub max_send_failures: u32,
    /// The only channels served, if set; others are refused (`channel_not_allowed`).
    pub allowed_channels: Option<Vec<ChannelId>>,
    /// Control messages (everything but pieces) accepted per second from one source IP, with
    /// bursts of twice as many; more are `rate_limited`.
    pub control_rate_per_source: u32,
    /// Pieces verified per second for one source IP at most (bursts of as many); more are
    /// `verify_budget` drops. Bounds what a forged flood can make the relay spend.
    pub verify_rate_per_source: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            subscriber_timeout: Duration::from_secs(5),
            channel_idle_timeout: Duration::from_secs(30),
            cookie_bucket: Duration::from_secs(60),
            max_channels: 1024,
            max_subscribers_per_channel: 4096,
            max_send_failures: 256,
            allowed_channels: None,
            control_rate_per_source: 2_000,
            verify_rate_per_source: 20_000,
        }
    }
}

/// Why a datagram was dropped. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a valid v1 message: garbage, truncated, oversized, bad fields.
    Malformed,
    /// A piece for a channel the relay has no key for.
    UnknownChannel,
    /// A piece whose signature does not verify.
    BadSignature,
    /// A piece already forwarded.
    Replayed,
    /// A piece older than the replay window.
    Stale,
    /// SUBSCRIBE, KEEPALIVE or UNSUBSCRIBE without a valid cookie (answered with a COOKIE only).
    InvalidCookie,
    /// KEEPALIVE or UNSUBSCRIBE from an address that is not subscribed.
    NotSubscribed,
    /// A new channel refused because the channel table is full.
    ChannelsFull,
    /// A new subscriber refused because the channel's table is full.
    SubscribersFull,
    /// An ANNOUNCE with a bad signature, an old epoch or a key that conflicts.
    BadAnnounce,
    /// A message only relays send (COOKIE, SUBSCRIBED, ANNOUNCED).
    UnexpectedMessage,
    /// A send the socket refused (buffer full): counted per subscriber copy.
    SendFailed,
    /// A piece not handed to another worker because its queue was full (counted per worker).
    WorkerBehind,
    /// A datagram not received because every pooled buffer was in use.
    PoolExhausted,
    /// An ANNOUNCE or SUBSCRIBE for a channel outside the configured `channels` list.
    ChannelNotAllowed,
    /// A datagram that arrived while the relay was draining for shutdown.
    Draining,
    /// A control message over its source's rate.
    RateLimited,
    /// A piece from an address that has not announced the channel.
    UnknownUpstream,
    /// A piece over its source's verification budget.
    VerifyBudget,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 19] = [
        DropReason::Malformed,
        DropReason::UnknownChannel,
        DropReason::BadSignature,
        DropReason::Replayed,
        DropReason::Stale,
        DropReason::InvalidCookie,
        DropReason::NotSubscribed,
        DropReason::ChannelsFull,
        DropReason::SubscribersFull,
        DropReason::BadAnnounce,
        DropReason::UnexpectedMessage,
        DropReason::SendFailed,
        DropReason::WorkerBehind,
        DropReason::PoolExhausted,
        DropReason::ChannelNotAllowed,
        DropReason::Draining,
        DropReason::RateLimited,
        DropReason::UnknownUpstream,
        DropReason::VerifyBudget,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownChannel => "unknown_channel",
            DropReason::BadSignature => "bad_signature",
            DropReason::Replayed => "replayed",
            DropReason::Stale => "stale",
            DropReason::InvalidCookie => "invalid_cookie",
            DropReason::NotSubscribed => "not_subscribed",
            DropReason::ChannelsFull => "channels_full",
            DropReason::SubscribersFull => "subscribers_full",
            DropReason::BadAnnounce => "bad_announce",
            DropReason::UnexpectedMessage => "unexpected_message",
            DropReason::SendFailed => "send_failed",
            DropReason::WorkerBehind => "worker_behind",
            DropReason::PoolExhausted => "pool_exhausted",
            DropReason::ChannelNotAllowed => "channel_not_allowed",
            DropReason::Draining => "draining",
            DropReason::RateLimited => "rate_limited",
            DropReason::UnknownUpstream => "unknown_upstream",
            DropReason::VerifyBudget => "verify_budget",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Running totals kept by the core; the engine exports them as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Datagrams handed to [`RelayCore::handle`].
    pub datagrams_in: u64,
    /// Bytes of those datagrams.
    pub bytes_in: u64,
    /// Datagrams that parsed as data pieces, before any other check.
    pub pieces_in: u64,
    /// Pieces verified and accepted for forwarding.
    pub pieces_accepted: u64,
    /// Piece copies handed to the engine to send (one per subscriber).
    pub piece_sends: u64,
    /// Bytes of those copies.
    pub bytes_forwarded: u64,
    /// Control replies produced.
    pub replies: u64,
    /// Drops, indexed like [`DropReason::ALL`].
    pub drops: [u64; DropReason::ALL.len()],
    /// Subscribers now, over all channels.
    pub subscribers: u64,
    /// Channels with an announced key now.
    pub channels: u64,
    /// Subscribers removed for lack of keepalives.
    pub subscribers_expired: u64,
    /// Subscribers cut because copies to them kept being refused.
    pub subscribers_cut: u64,
}

impl RelayStats {
    /// Drops counted for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Counts `n` drops for `reason`.
    pub fn record_drops(&mut self, reason: DropReason, n: u64) {
        self.drops[reason.index()] += n;
    }

    /// Adds another shard's totals (counters and gauges alike) to these.
    pub fn add(&mut self, o: &RelayStats) {
        self.datagrams_in += o.datagrams_in;
        self.bytes_in += o.bytes_in;
        self.pieces_in += o.pieces_in;
        self.pieces_accepted += o.pieces_accepted;
        self.piece_sends += o.piece_sends;
        self.bytes_forwarded += o.bytes_forwarded;
        self.replies += o.replies;
        for (a, b) in self.drops.iter_mut().zip(o.drops) {
            *a += b;
        }
        self.subscribers += o.subscribers;
        self.channels += o.channels;
        self.subscribers_expired += o.subscribers_expired;
        self.subscribers_cut += o.subscribers_cut;
    }
}

/// What to do with one received datagram.
// The Verify variant carries the channel's key (about 200 bytes) so the engine can batch
// verification without a second table lookup; verdicts are returned by value and never stored
// in bulk, so the size costs a copy, not memory.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Send the first `n` bytes of the reply buffer back to the source.
    Reply(usize),
    /// A piece that passed the cheap filters: verify its signature with `key`, then call
    /// [`RelayCore::admit`].
    Verify(PendingPiece),
    /// Dropped and counted.
    Dropped(DropReason),
    /// Handled; nothing to send.
    Done,
}

/// A piece waiting for signature verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingPiece {
    /// Its channel.
    pub channel: ChannelId,
    /// Its sequence number.
    pub seq: u64,
    /// The key to verify it with.
    pub key: ChannelPublicKey,
    /// Where it came from, and when.
    pub from: SocketAddr,
    /// When it was received.
    pub received: Timestamp,
}

#[derive(Debug)]
struct Channel {
    key: Option<ChannelPublicKey>,
    /// Addresses that sent a valid ANNOUNCE: the only ones pieces are taken from.
    upstreams: [Option<Upstream>; MAX_UPSTREAMS],
    epoch_us: u64,
    window: SeqWindow,
    subscribers: Subscribers,
    last_announce: Option<Timestamp>,
    created: Timestamp,
}

impl Channel {
    fn new(now: Timestamp) -> Self {
        Channel {
            key: None,
            upstreams: [None; MAX_UPSTREAMS],
            epoch_us: 0,
            window: SeqWindow::new(),
            subscribers: Subscribers::default(),
            last_announce: None,
            created: now,
        }
    }

    fn upstream_slot(&self, from: SocketAddr) -> Option<usize> {
        self.upstreams
            .iter()
            .position(|u| u.is_some_and(|u| u.addr == from))
    }

    /// Remembers `from` as an upstream that announced at `now`. When all places are taken, an
    /// upstream that delivered an accepted piece within [`UPSTREAM_PROTECTED`] keeps its place
    /// (a captured ANNOUNCE replayed from spoofed addresses cannot evict a live publisher:
    /// replays never deliver an accepted piece); among the others the oldest announce goes.
    fn add_upstream(&mut self, from: SocketAddr, now: Timestamp) {
        if let Some(slot) = self.upstream_slot(from) {
            if let Some(u) = &mut self.upstreams[slot] {
                u.announced = now;
            }
            return;
        }
        let evictable = |u: &Option<Upstream>| match u {
            None => Some(Timestamp::ZERO),
            Some(u)
                if u.last_piece
                    .is_none_or(|t| now.saturating_since(t) >= UPSTREAM_PROTECTED) =>
            {
                Some(u.announced)
            }
            Some(_) => None,
        };
        let victim = (0..MAX_UPSTREAMS)
            .filter_map(|i| evictable(&self.upstreams[i]).map(|t| (t, i)))
            .min()
            .map(|(_, i)| i);
        if let Some(slot) = victim {
            self.upstreams[slot] = Some(Upstream {
                addr: from,
                announced: now,
                last_piece: None,
            });
        }
    }

    /// Notes an accepted piece from `from`.
    fn note_piece_from(&mut self, from: SocketAddr, at: Timestamp) {
        if let Some(slot) = self.upstream_slot(from) {
            if let Some(u) = &mut self.upstreams[slot] {
                u.last_piece = Some(at);
            }
        }
    }

    fn idle_since(&self) -> Timestamp {
        self.last_announce.unwrap_or(self.created)
    }
}

/// Addresses a channel takes pieces from (a publisher that moved keeps working: its next
/// announce adds the new address).
const MAX_UPSTREAMS: usize = 4;
/// An upstream that delivered an accepted piece this recently cannot be evicted.
const UPSTREAM_PROTECTED: Duration = Duration::from_secs(5);

/// One address a channel takes pieces from.
#[derive(Debug, Clone, Copy)]
struct Upstream {
    addr: SocketAddr,
    /// Its latest valid ANNOUNCE.
    announced: Timestamp,
    /// Its latest accepted piece.
    last_piece: Option<Timestamp>,
}

/// Channels some core of this relay has an announced key for.
#[derive(Debug, Default)]
pub struct AnnouncedChannels(RwLock<HashSet<ChannelId>>);

impl AnnouncedChannels {
    fn set(&self) -> std::sync::RwLockReadGuard<'_, HashSet<ChannelId>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, id: ChannelId) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(id);
    }

    fn remove(&self, id: &ChannelId) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Whether `id` has an announced publisher.
    pub fn contains(&self, id: &ChannelId) -> bool {
        self.set().contains(id)
    }
}

/// The relay's protocol state: channels, their keys, replay windows and subscribers.
pub struct RelayCore {
    config: RelayConfig,
    announced: Arc<AnnouncedChannels>,
    control_limits: SourceLimiter,
    verify_limits: SourceLimiter,
    cookies: CookieJar,
    channels: HashMap<ChannelId, Channel>,
    stats: RelayStats,
    next_sweep: Timestamp,
}

impl RelayCore {
    /// How often expired subscribers and idle channels are swept.
    pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

    /// A core with a fresh random cookie key.
    pub fn new(config: RelayConfig) -> Self {
        Self::with_cookie_key(config, rand::random())
    }

    /// A core with a given cookie key (tests and the simulator use fixed keys).
    pub fn with_cookie_key(config: RelayConfig, cookie_key: [u8; 32]) -> Self {
        Self::with_shared(config, cookie_key, Arc::default())
    }

    /// A core that shares with others (a relay's other workers) the set of channels that have
    /// an announced publisher: a channel's ANNOUNCEs reach only its owner, but SUBSCRIBEs land
    /// on any worker, which must not take a real channel for a made-up one.
    pub fn with_shared(
        config: RelayConfig,
        cookie_key: [u8; 32],
        announced: Arc<AnnouncedChannels>,
    ) -> Self {
        RelayCore {
            announced,
            cookies: CookieJar::new(cookie_key, config.cookie_bucket),
            control_limits: SourceLimiter::new(
                config.control_rate_per_source,
                config.control_rate_per_source.saturating_mul(2),
            ),
            verify_limits: SourceLimiter::new(
                config.verify_rate_per_source,
                config.verify_rate_per_source,
            ),
            config,
            channels: HashMap::new(),
            stats: RelayStats::default(),
            next_sweep: Timestamp::ZERO,
        }
    }

    /// Applies new tunables (a live reload). Subscribers already admitted stay even where a
    /// lowered limit would now refuse them; channels no longer allowed are dropped with their
    /// subscribers.
    pub fn reconfigure(&mut self, config: RelayConfig) {
        self.control_limits.set_rate(
            config.control_rate_per_source,
            config.control_rate_per_source.saturating_mul(2),
        );
        self.verify_limits
            .set_rate(config.verify_rate_per_source, config.verify_rate_per_source);
        self.config = config;
        let allowed = self.config.allowed_channels.as_deref();
        let announced = &self.announced;
        self.channels.retain(|id, c| {
            let keep = allowed.is_none_or(|list| list.contains(id));
            if !keep && c.key.is_some() {
                announced.remove(id);
            }
            keep
        });
        self.refresh_gauges();
    }

    /// Whether the configuration lets the relay serve channel `id`.
    fn allows(&self, id: &ChannelId) -> bool {
        self.config
            .allowed_channels
            .as_ref()
            .is_none_or(|list| list.contains(id))
    }

    /// Totals so far.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Counts drops the engine saw (e.g. sends refused by a full socket).
    pub fn record_drops(&mut self, reason: DropReason, n: u64) {
        self.stats.record_drops(reason, n);
    }

    /// Subscribers now of every channel that has any.
    pub fn channel_subscribers(&self) -> impl Iterator<Item = (ChannelId, usize)> + '_ {
        self.channels
            .iter()
            .filter(|(_, c)| !c.subscribers.is_empty())
            .map(|(id, c)| (*id, c.subscribers.len()))
    }

    /// Subscribers of `channel` now.
    pub fn subscribers(&self, channel: &ChannelId) -> &[SocketAddr] {
        self.channels
            .get(channel)
            .map_or(&[], |c| c.subscribers.addrs())
    }

    /// Handles one datagram from `from`. Replies are written into `reply` (at least
    /// [`crate::wire::MAX_DATAGRAM`] bytes). Allocates only when a channel or subscriber is added.
    pub fn handle(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Inbound {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += datagram.len() as u64;
        let verdict = match Message::parse(datagram) {
            Err(_) => Inbound::Dropped(DropReason::Malformed),
            Ok(Message::Piece(piece)) => {
                self.stats.pieces_in += 1;
                self.precheck_piece(now, from, &piece)
            }
            Ok(_) if !self.control_limits.allow(now, from) => {
                Inbound::Dropped(DropReason::RateLimited)
            }
            Ok(Message::Hello(hello)) => self.reply_cookie(now, from, hello.nonce, reply),
            Ok(Message::Subscribe(s)) => self.on_subscribe(now, from, &s, reply),
            Ok(Message::Keepalive(s)) => self.on_keepalive(now, from, &s, reply),
            Ok(Message::Unsubscribe(s)) => self.on_unsubscribe(now, from, &s, reply),
            Ok(Message::Announce(a)) => self.on_announce(now, from, &a, reply),
            Ok(
                Message::Cookie(_)
                | Message::Subscribed(_)
                | Message::Announced(_)
                | Message::TrackerAnnounce(_)
                | Message::Peers(_)
                | Message::Descriptor(_)
                | Message::Join(_)
                | Message::Accept(_)
                | Message::Nack(_)
                | Message::Ack(_),
            ) => Inbound::Dropped(DropReason::UnexpectedMessage),
        };
        match verdict {
            Inbound::Dropped(reason) => self.stats.record_drops(reason, 1),
            Inbound::Reply(_) => self.stats.replies += 1,
            _ => {}
        }
        verdict
    }

    /// Completes a piece from [`Inbound::Verify`]: `verified` says whether its signature held.
    /// On `Ok` the piece is accepted (marked seen) and should go to [`RelayCore::subscribers`];
    /// on `Err` it is dropped and counted.
    pub fn admit(&mut self, pending: &PendingPiece, verified: bool) -> Result<(), DropReason> {
        match self.admit_inner(pending, verified) {
            Ok(()) => {
                self.stats.pieces_accepted += 1;
                Ok(())
            }
            Err(reason) => {
                self.stats.record_drops(reason, 1);
                Err(reason)
            }
        }
    }

    /// Counts a copy to `addr` that the kernel refused (counted as `send_failed`); a subscriber
    /// that keeps failing is cut. Returns true if it was.
    pub fn record_send_failure(&mut self, channel: &ChannelId, addr: SocketAddr) -> bool {
        self.stats.record_drops(DropReason::SendFailed, 1);
        let limit = self.config.max_send_failures;
        let cut = self
            .channels
            .get_mut(channel)
            .is_some_and(|c| c.subscribers.fail(addr, limit));
        if cut {
            self.stats.subscribers_cut += 1;
            self.stats.subscribers = self.stats.subscribers.saturating_sub(1);
        }
        cut
    }

    /// Counts `copies` copies of a `piece_len`-byte piece handed to the kernel.
    pub fn record_sends(&mut self, copies: usize, piece_len: usize) {
        self.stats.piece_sends += copies as u64;
        self.stats.bytes_forwarded += (copies * piece_len) as u64;
    }

    fn admit_inner(&mut self, pending: &PendingPiece, verified: bool) -> Result<(), DropReason> {
        if !verified {
            return Err(DropReason::BadSignature);
        }
        let channel = self
            .channels
            .get_mut(&pending.channel)
            .filter(|c| c.key == Some(pending.key))
            .ok_or(DropReason::UnknownChannel)?;
        // Checked again: a batch may hold two copies of one piece.
        channel.window.check(pending.seq).map_err(seq_drop)?;
        channel.window.mark(pending.seq);
        channel.note_piece_from(pending.from, pending.received);
        Ok(())
    }

    /// When [`RelayCore::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Timestamp {
        self.next_sweep
    }

    /// Expires subscribers whose consent lapsed and forgets idle channels.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + Self::SWEEP_INTERVAL;
        let idle = self.config.channel_idle_timeout;
        let mut expired = 0;
        let announced = &self.announced;
        self.channels.retain(|id, c| {
            expired += c.subscribers.expire(now);
            let keep = !c.subscribers.is_empty() || now.saturating_since(c.idle_since()) < idle;
            if !keep && c.key.is_some() {
                announced.remove(id);
            }
            keep
        });
        self.stats.subscribers_expired += expired as u64;
        self.refresh_gauges();
    }

    fn refresh_gauges(&mut self) {
        self.stats.channels = self.channels.values().filter(|c| c.key.is_some()).count() as u64;
        self.stats.subscribers = self
            .channels
            .values()
            .map(|c| c.subscribers.len() as u64)
            .sum();
    }

    /// The cheap filters, cheapest first: known channel, announced upstream, inside the
    /// window and not seen, within the source's verification budget.
    fn precheck_piece(&mut self, now: Timestamp, from: SocketAddr, piece: &Piece<'_>) -> Inbound {
        let Some((channel, key)) = self
            .channels
            .get_mut(&piece.channel())
            .and_then(|c| c.key.map(|k| (c, k)))
        else {
            return Inbound::Dropped(DropReason::UnknownChannel);
        };
        if channel.upstream_slot(from).is_none() {
            return Inbound::Dropped(DropReason::UnknownUpstream);
        }
        if let Err(reject) = channel.window.check(piece.seq()) {
            return Inbound::Dropped(seq_drop(reject));
        }
        if !self.verify_limits.allow(now, from) {
            return Inbound::Dropped(DropReason::VerifyBudget);
        }
        Inbound::Verify(PendingPiece {
            channel: piece.channel(),
            seq: piece.seq(),
            key,
            from,
            received: now,
        })
    }

    fn reply_cookie(
        &self,
        now: Timestamp,
        from: SocketAddr,
        nonce: u64,
        reply: &mut [u8],
    ) -> Inbound {
        let cookie = Cookie {
            nonce,
            cookie: self.cookies.issue(now, from),
        };
        encoded(cookie.encode(reply))
    }

    fn on_subscribe(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        s: &Subscription,
        reply: &mut [u8],
    ) -> Inbound {
        let check = self.cookies.check(now, from, &s.cookie);
        if check == CookieCheck::Invalid {
            self.stats.record_drops(DropReason::InvalidCookie, 1);
            return self.reply_cookie(now, from, 0, reply);
        }
        let expires = now + self.config.subscriber_timeout;
        let limit = self.config.max_subscribers_per_channel;
        let channel = match self.channel_entry(s.channel, now, false) {
            Ok(c) => c,
            Err(reason) => return Inbound::Dropped(reason),
        };
        let live = channel.key.is_some();
        match channel.subscribers.upsert(from, expires, limit) {
            Upsert::Full => return Inbound::Dropped(DropReason::SubscribersFull),
            Upsert::Added => self.stats.subscribers += 1,
            Upsert::Refreshed => {}
        }
        if check == CookieCheck::Aging {
            // Still subscribed; the fresh cookie prompts a SUBSCRIBE that gets SUBSCRIBED.
            return self.reply_cookie(now, from, 0, reply);
        }
        encoded(
            Subscribed {
                channel: s.channel,
                live,
            }
            .encode(reply),
        )
    }

    fn on_keepalive(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        s: &Subscription,
        reply: &mut [u8],
    ) -> Inbound {
        let check = self.cookies.check(now, from, &s.cookie);
        let expires = now + self.config.subscriber_timeout;
        let refreshed = check != CookieCheck::Invalid
            && self
                .channels
                .get_mut(&s.channel)
                .is_some_and(|c| c.subscribers.refresh(from, expires));
        match (check, refreshed) {
            (CookieCheck::Fresh, true) => Inbound::Done,
            // A fresh cookie tells the client to (re)subscribe.
            (CookieCheck::Aging, true) => self.reply_cookie(now, from, 0, reply),
            (CookieCheck::Invalid, _) => {
                self.stats.record_drops(DropReason::InvalidCookie, 1);
                self.reply_cookie(now, from, 0, reply)
            }
            (_, false) => {
                self.stats.record_drops(DropReason::NotSubscribed, 1);
                self.reply_cookie(now, from, 0, reply)
            }
        }
    }

    fn on_unsubscribe(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        s: &Subscription,
        reply: &mut [u8],
    ) -> Inbound {
        if self.cookies.check(now, from, &s.cookie) == CookieCheck::Invalid {
            // No reply: an invalid UNSUBSCRIBE is noise, not a client to help.
            let _ = reply;
            return Inbound::Dropped(DropReason::InvalidCookie);
        }
        let removed = self
            .channels
            .get_mut(&s.channel)
            .is_some_and(|c| c.subscribers.remove(from));
        if removed {
            self.stats.subscribers = self.stats.subscribers.saturating_sub(1);
            Inbound::Done
        } else {
            Inbound::Dropped(DropReason::NotSubscribed)
        }
    }

    fn on_announce(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        a: &Announce<'_>,
        reply: &mut [u8],
    ) -> Inbound {
        let Ok(key) = verify_announce(a) else {
            return Inbound::Dropped(DropReason::BadAnnounce);
        };
        let id = key.channel_id();
        let announced = Arc::clone(&self.announced);
        let channel = match self.channel_entry(id, now, true) {
            Ok(c) => c,
            Err(reason) => return Inbound::Dropped(reason),
        };
        match channel.key {
            Some(k) if k != key => return Inbound::Dropped(DropReason::BadAnnounce),
            Some(_) if a.epoch_us() < channel.epoch_us => {
                return Inbound::Dropped(DropReason::BadAnnounce)
            }
            Some(_) if a.epoch_us() == channel.epoch_us => {}
            _ => {
                // A new key or a new publisher session. The replay window stays: a new
                // session's sequence numbers start at its epoch, above every older session's.
                if channel.key.is_none() {
                    announced.insert(id);
                }
                channel.key = Some(key);
                channel.epoch_us = a.epoch_us();
            }
        }
        channel.last_announce = Some(now);
        channel.add_upstream(from, now);
        self.refresh_gauges();
        encoded(
            Announced {
                channel: id,
                epoch_us: a.epoch_us(),
            }
            .encode(reply),
        )
    }
}

impl RelayCore {
    /// The channel `id`, created if the table has room. Channels no publisher has announced
    /// (`announced` false: created by a SUBSCRIBE that came first) may take a quarter of the
    /// table at most, so made-up channel ids cannot crowd out real ones.
    fn channel_entry(
        &mut self,
        id: ChannelId,
        now: Timestamp,
        announced: bool,
    ) -> Result<&mut Channel, DropReason> {
        if !self.allows(&id) {
            return Err(DropReason::ChannelNotAllowed);
        }
        let pending_limit = (self.config.max_channels / 4).max(1);
        let full = self.channels.len() >= self.config.max_channels
            || (!announced && !self.channels.contains_key(&id) && {
                // Only when a SUBSCRIBE would create an entry: read the shared set once.
                let set = self.announced.set();
                !set.contains(&id)
                    && self
                        .channels
                        .iter()
                        .filter(|(cid, c)| c.key.is_none() && !set.contains(cid))
                        .count()
                        >= pending_limit
            });
        match self.channels.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(_) if full => Err(DropReason::ChannelsFull),
            std::collections::hash_map::Entry::Vacant(e) => Ok(e.insert(Channel::new(now))),
        }
    }
}

fn seq_drop(reject: SeqReject) -> DropReason {
    match reject {
        SeqReject::Duplicate => DropReason::Replayed,
        SeqReject::Stale => DropReason::Stale,
    }
}

/// A reply's verdict; a reply buffer too small for a control message is a caller bug that is
/// still not allowed to panic, so it degrades to a silent drop.
fn encoded(r: Result<usize, crate::wire::WireError>) -> Inbound {
    match r {
        Ok(n) => Inbound::Reply(n),
        Err(_) => Inbound::Done,
    }
}

#[cfg(test)]
mod tests;
