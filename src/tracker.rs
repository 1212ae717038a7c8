//! The tracker's sans-IO core: who is in each channel, and the channel's signed descriptor.
//!
//! Members prove their address with the same HELLO/COOKIE exchange relays use, then announce
//! (role, club, upload) and get back up to [`crate::wire::Peers::MAX`] other members — relays
//! first, then a random sample — and the channel's descriptor once the publisher has sent one.
//! Entries expire when their member stops announcing. Tables are bounded and refusals counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::crypto::verify_descriptor;
use crate::relay::cookie::{CookieCheck, CookieJar};
use crate::swarm::NO_CLUB;
use crate::time::Timestamp;
use crate::wire::{
    ChannelId, ClubMask, Cookie, Descriptor, Message, PeerEntry, Peers, Role, MAX_DATAGRAM,
};

/// A channel with a descriptor but no members is forgotten after this long.
const IDLE_CHANNEL: Duration = Duration::from_secs(300);

/// A member's announced upload counts for club balance up to this many times the stream's
/// bitrate: a peer that claims the moon (or says nothing of its limit) cannot empty its club
/// of everyone else.
const UPLOAD_CLAIM_CAP: u64 = 4;

/// The cap when the descriptor has not said the bitrate (kbit/s).
const UPLOAD_CLAIM_CAP_KBPS: u64 = 100_000;

/// Tunables of a tracker.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// A member is forgotten this long after its last announce.
    pub member_ttl: Duration,
    /// Most channels tracked.
    pub max_channels: usize,
    /// Most members per channel.
    pub max_members: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            // Three missed announces (members announce every 5 s once settled): departed
            // members that said nothing leave the lists soon.
            member_ttl: Duration::from_secs(15),
            max_channels: 1024,
            max_members: 100_000,
        }
    }
}

/// What a tracker counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Announces answered with a peer list.
    pub announces: u64,
    /// Descriptors accepted (new channels or newer sessions).
    pub descriptors: u64,
    /// Datagrams refused: malformed, bad cookie, bad signature, table full, unexpected.
    pub refused: u64,
    /// Members forgotten for not announcing.
    pub expired: u64,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    role: Role,
    club: u8,
    /// The upload it announced, kbit/s.
    upload_kbps: u32,
    /// Downstream seats it announced free.
    free_seats: u8,
    /// Times listed with free seats since it announced them (counted in its club's table of
    /// members with seats; 0 elsewhere).
    listings: u16,
    expires: Timestamp,
}

/// Channel `id` of `channels`, created if there are fewer than `max`.
fn channel_entry(
    channels: &mut HashMap<ChannelId, Channel>,
    max: usize,
    id: ChannelId,
) -> Option<&mut Channel> {
    let full = channels.len() >= max;
    match channels.entry(id) {
        std::collections::hash_map::Entry::Occupied(e) => Some(e.into_mut()),
        std::collections::hash_map::Entry::Vacant(_) if full => None,
        std::collections::hash_map::Entry::Vacant(e) => Some(e.insert(Channel::default())),
    }
}

/// Members of one kind (relays, or everyone else) in a table that can be sampled without
/// walking it: a dense list plus an index by address. Lookups only, never iteration order of
/// a hash map, so a seeded tracker answers the same way every run.
#[derive(Debug, Default)]
struct MemberTable {
    list: Vec<(SocketAddr, Member)>,
    index: HashMap<SocketAddr, usize>,
}

impl MemberTable {
    fn len(&self) -> usize {
        self.list.len()
    }

    fn get(&self, addr: &SocketAddr) -> Option<&Member> {
        self.index.get(addr).map(|i| &self.list[*i].1)
    }

    /// Inserts or replaces; the member it replaced.
    fn insert(&mut self, addr: SocketAddr, m: Member) -> Option<Member> {
        match self.index.get(&addr) {
            Some(&i) => Some(std::mem::replace(&mut self.list[i].1, m)),
            None => {
                self.index.insert(addr, self.list.len());
                self.list.push((addr, m));
                None
            }
        }
    }

    /// Counts one listing of `addr` against its seats; whether they are all spent.
    fn spend_listing(&mut self, addr: &SocketAddr) -> bool {
        let Some(&i) = self.index.get(addr) else {
            return false;
        };
        let m = &mut self.list[i].1;
        m.listings = m.listings.saturating_add(1);
        u32::from(m.listings) >= u32::from(m.free_seats) * LISTINGS_PER_SEAT
    }

    fn remove(&mut self, addr: &SocketAddr) -> Option<Member> {
        let i = self.index.remove(addr)?;
        let (_, m) = self.list.swap_remove(i);
        if let Some((moved, _)) = self.list.get(i) {
            self.index.insert(*moved, i);
        }
        Some(m)
    }

    /// Removes the members `keep` refuses; the removed ones.
    fn retain(&mut self, mut keep: impl FnMut(&Member) -> bool) -> Vec<(SocketAddr, Member)> {
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.list.len() {
            if keep(&self.list[i].1) {
                i += 1;
            } else {
                let addr = self.list[i].0;
                gone.extend(self.remove(&addr).map(|m| (addr, m)));
            }
        }
        gone
    }

    /// Up to `n` live members other than `asker`, chosen at random.
    fn sample(
        &self,
        rng: &mut StdRng,
        n: usize,
        asker: SocketAddr,
        now: Timestamp,
    ) -> Vec<PeerEntry> {
        let picks: Vec<usize> = if self.list.len() <= n + 1 {
            let mut all: Vec<usize> = (0..self.list.len()).collect();
            all.shuffle(rng);
            all
        } else {
            rand::seq::index::sample(rng, self.list.len(), n + 1).into_vec()
        };
        picks
            .into_iter()
            .map(|i| &self.list[i])
            .filter(|(addr, m)| *addr != asker && m.expires > now)
            .take(n)
            .map(|(addr, m)| PeerEntry {
                addr: *addr,
                role: m.role,
                club: m.club,
                free_seats: m.free_seats > 0,
            })
            .collect()
    }
}

#[derive(Debug, Default)]
struct Channel {
    descriptor: Option<Vec<u8>>,
    epoch_us: u64,
    clubs: u8,
    relays: MemberTable,
    others: MemberTable,
    /// Peers per club, kept as members come, change club and go.
    club_peers: Vec<usize>,
    /// The peers' counted upload per club, kbit/s (each claim capped; see [`UPLOAD_CLAIM_CAP`]).
    club_upload: Vec<u64>,
    /// Per club, the peers that announced free seats: listed first to a member that needs
    /// the club (one whose source left looks for a seat where there is one).
    with_seats: Vec<MemberTable>,
    /// The stream's bitrate from the descriptor, kbit/s (0: not known yet).
    bitrate_kbps: u64,
    /// When a member last announced, or the descriptor last came.
    last_active: Timestamp,
    /// Members that announced as the publisher, newest last (at most [`MAX_PUBLISHERS`];
    /// entries that left or changed role are skipped when read and pruned on expiry).
    publishers: Vec<SocketAddr>,
}

/// Publisher addresses a channel keeps for relays' lists.
const MAX_PUBLISHERS: usize = 4;
/// Most peers with free seats listed per club a member needs.
const SEATED_PER_NEEDED_CLUB: usize = 3;
/// A peer is listed with free seats at most this many times per seat it announced, until it
/// announces again (a member asks one of the few listed for a club).
const LISTINGS_PER_SEAT: u32 = 3;

impl Channel {
    fn members(&self) -> usize {
        self.relays.len() + self.others.len()
    }

    fn table(&mut self, role: Role) -> &mut MemberTable {
        if role == Role::Relay {
            &mut self.relays
        } else {
            &mut self.others
        }
    }

    /// Counts `m` at `addr` in (`delta` 1) or out (-1) of its club's peers, upload and
    /// peers with free seats.
    fn count(&mut self, addr: SocketAddr, m: &Member, delta: isize) {
        if m.role != Role::Peer || m.club >= self.clubs {
            return;
        }
        let upload = self.counted_upload(m);
        let club = usize::from(m.club);
        if let Some(t) = self.with_seats.get_mut(club) {
            if delta < 0 {
                t.remove(&addr);
            } else if m.free_seats > 0 {
                t.insert(addr, *m);
            }
        }
        if let Some(c) = self.club_peers.get_mut(club) {
            *c = c.saturating_add_signed(delta);
        }
        if let Some(u) = self.club_upload.get_mut(club) {
            *u = if delta >= 0 {
                u.saturating_add(upload)
            } else {
                u.saturating_sub(upload)
            };
        }
    }

    /// How much of `m`'s announced upload counts towards its club's capacity.
    fn counted_upload(&self, m: &Member) -> u64 {
        let cap = match self.bitrate_kbps {
            0 => UPLOAD_CLAIM_CAP_KBPS,
            b => b.saturating_mul(UPLOAD_CLAIM_CAP),
        };
        u64::from(m.upload_kbps).min(cap)
    }

    fn insert(&mut self, addr: SocketAddr, m: Member) {
        // A member that changed role moves table.
        let other = if m.role == Role::Relay {
            &mut self.others
        } else {
            &mut self.relays
        };
        if let Some(old) = other.remove(&addr) {
            self.count(addr, &old, -1);
        }
        if let Some(old) = self.table(m.role).insert(addr, m) {
            self.count(addr, &old, -1);
        }
        self.count(addr, &m, 1);
        if m.role == Role::Publisher {
            self.publishers.retain(|a| *a != addr);
            if self.publishers.len() == MAX_PUBLISHERS {
                self.publishers.remove(0);
            }
            self.publishers.push(addr);
        }
    }

    /// The live members that announced as the publisher, newest first, but `asker`.
    fn live_publishers(&self, asker: SocketAddr, now: Timestamp) -> Vec<PeerEntry> {
        self.publishers
            .iter()
            .rev()
            .filter(|a| **a != asker)
            .filter_map(|a| {
                let m = self.others.get(a)?;
                (m.role == Role::Publisher && m.expires > now).then_some(PeerEntry {
                    addr: *a,
                    role: m.role,
                    club: m.club,
                    free_seats: m.free_seats > 0,
                })
            })
            .collect()
    }

    fn remove(&mut self, addr: &SocketAddr) {
        for old in [self.relays.remove(addr), self.others.remove(addr)]
            .into_iter()
            .flatten()
        {
            self.count(*addr, &old, -1);
        }
    }

    fn get(&self, addr: &SocketAddr) -> Option<&Member> {
        self.relays.get(addr).or_else(|| self.others.get(addr))
    }

    /// A new descriptor may change K and the bitrate: count the clubs again.
    fn set_stream(&mut self, clubs: u8, bitrate_bps: u64) {
        self.clubs = clubs;
        self.bitrate_kbps = bitrate_bps / 1000;
        self.club_peers = vec![0; usize::from(clubs)];
        self.club_upload = vec![0; usize::from(clubs)];
        self.with_seats = (0..clubs).map(|_| MemberTable::default()).collect();
        let members = self.others.list.clone();
        for (addr, m) in members {
            self.count(addr, &m, 1);
        }
    }

    /// The club with the least upload among its peers other than `asker` (then the fewest
    /// peers, then the lowest number), once the descriptor has said how many clubs there are.
    ///
    /// Every club must carry its share of the stream to all the others, so what a club needs
    /// is upload, not heads: clubs even in numbers but not in upload left the poorest club
    /// unable to seat everyone (the simulator's loss-and-churn swarm, see README).
    fn club_to_assign(&self, asker: SocketAddr) -> Option<u8> {
        if self.clubs == 0 {
            return None;
        }
        let own = self
            .get(&asker)
            .filter(|m| m.role == Role::Peer && m.club < self.clubs);
        (0..self.clubs).min_by_key(|c| {
            let i = usize::from(*c);
            let (mut upload, mut peers) = (self.club_upload[i], self.club_peers[i]);
            if let Some(m) = own.filter(|m| m.club == *c) {
                upload = upload.saturating_sub(self.counted_upload(m));
                peers = peers.saturating_sub(1);
            }
            (upload, peers)
        })
    }

    /// For a member that `needs` clubs, peers of those clubs that announced free seats: a
    /// few per club, in all at most half of `room` (the rest of a list stays a random sample).
    fn with_seats_in(
        &mut self,
        rng: &mut StdRng,
        needs: ClubMask,
        room: usize,
        asker: SocketAddr,
        now: Timestamp,
    ) -> Vec<PeerEntry> {
        let clubs: Vec<u8> = needs.iter().filter(|c| *c < self.clubs).collect();
        if clubs.is_empty() {
            return Vec::new();
        }
        let budget = room / 2;
        let per_club = (budget / clubs.len()).clamp(1, SEATED_PER_NEEDED_CLUB);
        let mut listed = Vec::new();
        for c in clubs {
            let n = per_club.min(budget.saturating_sub(listed.len()));
            if n == 0 {
                break;
            }
            let seated = &mut self.with_seats[usize::from(c)];
            let drawn = seated.sample(rng, n, asker, now);
            // Each listing spends some of the member's announced seats: listed to everyone
            // who needs its club, it would be asked by far more members than it has seats.
            for e in &drawn {
                if seated.spend_listing(&e.addr) {
                    seated.remove(&e.addr);
                }
            }
            listed.extend(drawn);
        }
        listed
    }

    /// Forgets members that stopped announcing; how many.
    fn expire(&mut self, now: Timestamp) -> usize {
        let mut gone = self.relays.retain(|m| m.expires > now);
        gone.extend(self.others.retain(|m| m.expires > now));
        for (addr, m) in &gone {
            self.count(*addr, m, -1);
        }
        let others = &self.others;
        self.publishers
            .retain(|a| others.get(a).is_some_and(|m| m.role == Role::Publisher));
        gone.len()
    }
}

/// The tracker's state.
pub struct TrackerCore {
    config: TrackerConfig,
    cookies: CookieJar,
    channels: HashMap<ChannelId, Channel>,
    rng: StdRng,
    stats: TrackerStats,
}

impl TrackerCore {
    /// A tracker with a cookie key and a seed for its peer sampling (fixed in tests and the
    /// simulator, random in the real one).
    pub fn new(config: TrackerConfig, cookie_key: [u8; 32], seed: u64) -> Self {
        TrackerCore {
            cookies: CookieJar::new(cookie_key, Duration::from_secs(60)),
            config,
            channels: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            stats: TrackerStats::default(),
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> &TrackerStats {
        &self.stats
    }

    /// Members of `channel` now.
    pub fn members(&self, channel: &ChannelId) -> usize {
        self.channels.get(channel).map_or(0, Channel::members)
    }

    /// Handles one datagram; replies to `from` are passed to `send`.
    pub fn handle(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        datagram: &[u8],
        send: &mut dyn FnMut(&[u8]),
    ) {
        let mut buf = [0u8; MAX_DATAGRAM];
        match Message::parse(datagram) {
            Ok(Message::Hello(h)) => {
                let cookie = Cookie {
                    nonce: h.nonce,
                    cookie: self.cookies.issue(now, from),
                };
                if let Ok(n) = cookie.encode(&mut buf) {
                    send(&buf[..n]);
                }
            }
            Ok(Message::Descriptor(d)) => self.on_descriptor(now, &d),
            Ok(Message::TrackerAnnounce(a)) => {
                if self.cookies.check(now, from, &a.cookie) == CookieCheck::Invalid {
                    // Prove the address first: a COOKIE no larger than the announce.
                    self.stats.refused += 1;
                    let cookie = Cookie {
                        nonce: 0,
                        cookie: self.cookies.issue(now, from),
                    };
                    if let Ok(n) = cookie.encode(&mut buf) {
                        send(&buf[..n]);
                    }
                    return;
                }
                self.on_announce(now, from, &a, send);
            }
            _ => self.stats.refused += 1,
        }
    }

    fn on_descriptor(&mut self, now: Timestamp, d: &Descriptor<'_>) {
        let Ok(key) = verify_descriptor(d) else {
            self.stats.refused += 1;
            return;
        };
        let max = self.config.max_channels;
        let Some(channel) = channel_entry(&mut self.channels, max, key.channel_id()) else {
            self.stats.refused += 1;
            return;
        };
        channel.last_active = now;
        if channel.descriptor.is_some() && d.epoch_us() <= channel.epoch_us {
            return; // the same session again, or an older one replayed
        }
        channel.descriptor = Some(d.as_bytes().to_vec());
        channel.epoch_us = d.epoch_us();
        channel.set_stream(d.clubs(), d.bitrate_bps());
        self.stats.descriptors += 1;
    }

    fn on_announce(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        a: &crate::wire::TrackerAnnounce,
        send: &mut dyn FnMut(&[u8]),
    ) {
        let ttl = self.config.member_ttl;
        let max_members = self.config.max_members;
        let max = self.config.max_channels;
        let Some(channel) = channel_entry(&mut self.channels, max, a.channel) else {
            self.stats.refused += 1;
            return;
        };
        channel.last_active = now;
        if a.leaving {
            channel.remove(&from);
            return;
        }
        if channel.members() >= max_members && channel.get(&from).is_none() {
            self.stats.refused += 1;
            return;
        }
        // A peer without a club is given the club with the least upload, so clubs stay even
        // in capacity however many join at once.
        let assigned = (a.role == Role::Peer && a.club == NO_CLUB)
            .then(|| channel.club_to_assign(from))
            .flatten();
        channel.insert(
            from,
            Member {
                role: a.role,
                club: assigned.unwrap_or(a.club),
                upload_kbps: a.upload_kbps,
                free_seats: a.free_seats,
                listings: 0,
                expires: now + ttl,
            },
        );
        // Relays first, then a random sample of the rest; never the asker itself. Sampling
        // costs the size of the list, not of the channel. A relay is told of the publisher
        // too, first: it feeds hundreds and should not take the stream from peers while it
        // waits to draw the publisher by chance (peers find the publisher by chance, which
        // keeps a flash crowd from all asking it at once).
        let mut others = if a.role == Role::Relay {
            channel.live_publishers(from, now)
        } else {
            Vec::new()
        };
        let listed = others.len();
        others.extend(
            channel
                .relays
                .sample(&mut self.rng, Peers::MAX - listed, from, now),
        );
        let room = Peers::MAX - others.len();
        others.extend(channel.with_seats_in(&mut self.rng, a.needs, room, from, now));
        // The rest at random: drawn with room for the members already listed, which the
        // sample may draw again.
        let room = Peers::MAX - others.len();
        let sampled = channel
            .others
            .sample(&mut self.rng, room + others.len(), from, now);
        for mut e in sampled {
            if others.len() == Peers::MAX {
                break;
            }
            if !others.iter().any(|p| p.addr == e.addr) {
                // Free seats as far as its listings have not spent them.
                if e.role == Role::Peer {
                    e.free_seats = channel
                        .with_seats
                        .get(usize::from(e.club))
                        .is_some_and(|t| t.get(&e.addr).is_some());
                }
                others.push(e);
            }
        }
        let mut buf = [0u8; MAX_DATAGRAM];
        if let Some(d) = &channel.descriptor {
            send(d);
        }
        if let Ok(n) = Peers::encode(a.channel, &others, assigned, &mut buf) {
            send(&buf[..n]);
        }
        self.stats.announces += 1;
    }

    /// Forgets members that stopped announcing, and channels left with none and no descriptor.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let mut expired = 0;
        self.channels.retain(|_, c| {
            expired += c.expire(now);
            // A channel nobody announces in is forgotten after a while, descriptor and all,
            // so self-signed descriptors cannot fill the table for good.
            c.members() > 0
                || (c.descriptor.is_some() && now.saturating_since(c.last_active) < IDLE_CHANNEL)
        });
        self.stats.expired += expired as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ChannelKey;
    use crate::wire::{CookieBytes, Hello, TrackerAnnounce};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn at(s: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_secs(s)
    }

    /// Sends `d` from `from`; the replies.
    fn exchange(t: &mut TrackerCore, now: Timestamp, from: SocketAddr, d: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        t.handle(now, from, d, &mut |r| out.push(r.to_vec()));
        out
    }

    fn cookie(t: &mut TrackerCore, now: Timestamp, from: SocketAddr) -> CookieBytes {
        let mut buf = [0u8; 64];
        let n = Hello {
            channel: ChannelId([0; 8]),
            nonce: 1,
        }
        .encode(&mut buf)
        .unwrap();
        let replies = exchange(t, now, from, &buf[..n]);
        let Ok(Message::Cookie(c)) = Message::parse(&replies[0]) else {
            panic!()
        };
        c.cookie
    }

    /// A proven announce of `role` in club 1 with 4 Mbit/s; the replies.
    fn announce(
        t: &mut TrackerCore,
        now: Timestamp,
        from: SocketAddr,
        channel: ChannelId,
        role: Role,
    ) -> Vec<Vec<u8>> {
        announce_as(t, now, from, channel, role, 1, 4000)
    }

    /// A proven announce with the given club and upload; the replies.
    fn announce_as(
        t: &mut TrackerCore,
        now: Timestamp,
        from: SocketAddr,
        channel: ChannelId,
        role: Role,
        club: u8,
        upload_kbps: u32,
    ) -> Vec<Vec<u8>> {
        let a = TrackerAnnounce {
            channel,
            cookie: cookie(t, now, from),
            role,
            club,
            upload_kbps,
            free_seats: 0,
            needs: ClubMask::NONE,
            leaving: false,
        };
        send_announce(t, now, from, a)
    }

    /// Sends `a` (its cookie made good); the replies.
    fn send_announce(
        t: &mut TrackerCore,
        now: Timestamp,
        from: SocketAddr,
        mut a: TrackerAnnounce,
    ) -> Vec<Vec<u8>> {
        a.cookie = cookie(t, now, from);
        let mut buf = [0u8; 64];
        let n = a.encode(&mut buf).unwrap();
        exchange(t, now, from, &buf[..n])
    }

    /// A descriptor of channel `key` with `clubs` clubs at `bitrate_bps`, signed.
    fn descriptor(key: &ChannelKey, clubs: u8, bitrate_bps: u64) -> Vec<u8> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let public = key.public().to_bytes();
        let n = Descriptor::encode_signed(&public, 100, clubs, false, bitrate_bps, &mut buf, |m| {
            key.sign(m)
        })
        .unwrap();
        buf[..n].to_vec()
    }

    fn listed(replies: &[Vec<u8>]) -> Vec<SocketAddr> {
        replies
            .iter()
            .find_map(|r| match Message::parse(r) {
                Ok(Message::Peers(p)) => Some(p.iter().map(|e| e.addr).collect()),
                _ => None,
            })
            .expect("no peer list")
    }

    #[test]
    fn members_find_each_other_relays_first_and_expire() {
        let mut t = TrackerCore::new(TrackerConfig::default(), [1; 32], 7);
        let ch = ChannelId([9; 8]);
        assert!(listed(&announce(&mut t, at(0), addr(1), ch, Role::Peer)).is_empty());
        announce(&mut t, at(0), addr(2), ch, Role::Peer);
        announce(&mut t, at(0), addr(3), ch, Role::Relay);
        let l = listed(&announce(&mut t, at(1), addr(4), ch, Role::Peer));
        assert_eq!(l.len(), 3);
        assert_eq!(l[0], addr(3), "the relay comes first");
        assert!(!l.contains(&addr(4)), "never the asker");
        // Without re-announcing, members are forgotten after the TTL.
        t.handle_timeout(at(31));
        assert_eq!(t.members(&ch), 0);
        assert_eq!(t.stats().expired, 4);
    }

    #[test]
    fn relays_are_told_of_the_publisher_first_peers_by_chance() {
        let mut t = TrackerCore::new(TrackerConfig::default(), [1; 32], 7);
        let ch = ChannelId([9; 8]);
        // Far more peers than a list holds: a list draws the publisher by chance.
        let peers = 4 * Peers::MAX;
        for i in 0..peers {
            announce(&mut t, at(0), addr(100 + i as u16), ch, Role::Peer);
        }
        announce(&mut t, at(0), addr(2), ch, Role::Publisher);
        let publisher_listed = |l: &[SocketAddr]| l.iter().filter(|a| **a == addr(2)).count();
        for n in 0..20 {
            let l = listed(&announce(&mut t, at(1), addr(3), ch, Role::Relay));
            assert_eq!(
                l[0],
                addr(2),
                "announce {n}: the publisher comes first for a relay"
            );
            assert_eq!(publisher_listed(&l), 1, "listed once");
            assert_eq!(l.len(), Peers::MAX, "a full list");
        }
        let peer_lists: usize = (0..20)
            .map(|_| publisher_listed(&listed(&announce(&mut t, at(1), addr(4), ch, Role::Peer))))
            .sum();
        assert!(
            peer_lists < 20,
            "peers find the publisher by chance: {peer_lists} of 20"
        );
        // A publisher that stops announcing is no longer listed to relays.
        t.handle_timeout(at(40));
        announce(&mut t, at(41), addr(5), ch, Role::Peer);
        let l = listed(&announce(&mut t, at(41), addr(3), ch, Role::Relay));
        assert_eq!(l, vec![addr(5)]);
    }

    /// The peer list in `replies`, as entries.
    fn entries(replies: &[Vec<u8>]) -> Vec<PeerEntry> {
        replies
            .iter()
            .find_map(|r| match Message::parse(r) {
                Ok(Message::Peers(p)) => Some(p.iter().collect()),
                _ => None,
            })
            .expect("no peer list")
    }

    /// A tracker that has the descriptor of a channel of four clubs; the channel.
    fn channel_of_four_clubs() -> (TrackerCore, ChannelId) {
        let mut t = TrackerCore::new(TrackerConfig::default(), [1; 32], 7);
        let key = ChannelKey::from_seed(&[3; 32]);
        exchange(&mut t, at(0), addr(9), &descriptor(&key, 4, 1_000_000));
        (t, key.public().channel_id())
    }

    /// A peer's announce (its cookie is made good when sent): its club, seats free, and
    /// the clubs it needs.
    fn peer_announce(ch: ChannelId, club: u8, free_seats: u8, needs: u64) -> TrackerAnnounce {
        TrackerAnnounce {
            channel: ch,
            cookie: CookieBytes::default(),
            role: Role::Peer,
            club,
            upload_kbps: 1800,
            free_seats,
            needs: ClubMask(needs),
            leaving: false,
        }
    }

    #[test]
    fn a_member_that_needs_a_club_is_told_of_its_peers_with_free_seats_first() {
        let (mut t, ch) = channel_of_four_clubs();
        let peer = |club, free_seats, needs| peer_announce(ch, club, free_seats, needs);
        // Far more full peers than a list holds, in every club; three of club 2 have seats.
        for i in 0..4 * Peers::MAX as u16 {
            send_announce(&mut t, at(0), addr(1000 + i), peer((i % 4) as u8, 0, 0));
        }
        let seated = [addr(11), addr(12), addr(13)];
        for a in seated {
            send_announce(&mut t, at(0), a, peer(2, 5, 0));
        }
        let with_seats = |l: &[PeerEntry]| {
            let mut v: Vec<SocketAddr> =
                l.iter().filter(|e| e.free_seats).map(|e| e.addr).collect();
            v.sort();
            v
        };
        // A peer of club 0 that has no source for club 2 hears of all three, flagged.
        let l = entries(&send_announce(&mut t, at(1), addr(20), peer(0, 0, 0b100)));
        assert_eq!(with_seats(&l), seated);
        assert!(l.iter().all(|e| e.free_seats == seated.contains(&e.addr)));
        assert_eq!(l.len(), Peers::MAX, "the rest is the usual sample");
        // One that needs nothing draws them only by chance.
        let drawn: usize = (0..20)
            .map(|_| {
                with_seats(&entries(&send_announce(
                    &mut t,
                    at(1),
                    addr(21),
                    peer(0, 0, 0),
                )))
                .len()
            })
            .sum();
        assert!(drawn < 20 * seated.len(), "by chance: {drawn}");
        // A peer whose seats filled says so and is no longer put first; one that expires is
        // forgotten there too.
        send_announce(&mut t, at(2), addr(11), peer(2, 0, 0));
        for a in (0..4 * Peers::MAX as u16)
            .map(|i| addr(1000 + i))
            .chain([addr(12), addr(20)])
        {
            let club = if a == addr(12) { 2 } else { 0 };
            send_announce(&mut t, at(10), a, peer(club, u8::from(a == addr(12)), 0));
        }
        t.handle_timeout(at(16));
        let l = entries(&send_announce(&mut t, at(16), addr(20), peer(0, 0, 0b100)));
        assert_eq!(with_seats(&l), vec![addr(12)]);
    }

    #[test]
    fn a_peer_with_free_seats_is_listed_so_a_few_times_per_seat_until_it_announces_again() {
        let (mut t, ch) = channel_of_four_clubs();
        let peer = |club, free_seats, needs| peer_announce(ch, club, free_seats, needs);
        let seated = addr(11);
        send_announce(&mut t, at(0), seated, peer(2, 2, 0));
        let listed_free = |t: &mut TrackerCore, asker: u16| {
            entries(&send_announce(t, at(1), addr(asker), peer(0, 0, 0b100)))
                .iter()
                .any(|e| e.addr == seated && e.free_seats)
        };
        // Two seats: listed with them to six members that need club 2, then as full (it is
        // still listed, as any member may be).
        let budget = 2 * LISTINGS_PER_SEAT as u16;
        for asker in 0..budget {
            assert!(listed_free(&mut t, 100 + asker), "listing {asker}");
        }
        assert!(!listed_free(&mut t, 200));
        assert!(
            entries(&send_announce(&mut t, at(1), addr(201), peer(0, 0, 0b100)))
                .iter()
                .any(|e| e.addr == seated && !e.free_seats)
        );
        // Its next announce renews them.
        send_announce(&mut t, at(2), seated, peer(2, 1, 0));
        assert!(listed_free(&mut t, 202));
    }

    /// A peer without a club announces `upload_kbps`; the club the tracker gives it.
    fn assigned(t: &mut TrackerCore, from: SocketAddr, ch: ChannelId, upload_kbps: u32) -> u8 {
        announce_as(t, at(1), from, ch, Role::Peer, NO_CLUB, upload_kbps)
            .iter()
            .find_map(|r| match Message::parse(r) {
                Ok(Message::Peers(p)) => p.assigned_club(),
                _ => None,
            })
            .expect("no club assigned")
    }

    #[test]
    fn clubs_are_assigned_by_upload_with_claims_capped() {
        let mut t = TrackerCore::new(TrackerConfig::default(), [1; 32], 7);
        let key = ChannelKey::from_seed(&[3; 32]);
        let ch = key.public().channel_id();
        // Two clubs, 1 Mbit/s: claims count up to 4 Mbit/s.
        exchange(&mut t, at(0), addr(9), &descriptor(&key, 2, 1_000_000));
        assert_eq!(
            assigned(&mut t, addr(1), ch, 1800),
            0,
            "ties go to the lowest"
        );
        assert_eq!(assigned(&mut t, addr(2), ch, 800), 1);
        // Club 1 has as many peers but less upload.
        assert_eq!(assigned(&mut t, addr(3), ch, 800), 1, "upload, not heads");
        // A claim of 100 Mbit/s counts as 4: club 1 holds 5 600, club 0 1 800.
        assert_eq!(assigned(&mut t, addr(4), ch, 100_000), 1);
        for a in 5..8 {
            assert_eq!(assigned(&mut t, addr(a), ch, 1800), 0);
        }
        // Club 0 now holds 7 200 against club 1's capped 5 600 (uncapped: 101 600).
        assert_eq!(
            assigned(&mut t, addr(8), ch, 1800),
            1,
            "the claim was capped"
        );
        // A peer asking again is weighed without itself: addr(1) (1 800 in club 0) sees
        // 5 400 there against 7 400, and stays.
        assert_eq!(assigned(&mut t, addr(1), ch, 1800), 0);
    }

    #[test]
    fn unproven_addresses_get_only_a_small_cookie() {
        let mut t = TrackerCore::new(TrackerConfig::default(), [1; 32], 7);
        let mut buf = [0u8; 64];
        let n = TrackerAnnounce {
            channel: ChannelId([9; 8]),
            cookie: CookieBytes([4; 20]),
            role: Role::Peer,
            club: 0,
            upload_kbps: 0,
            free_seats: 0,
            needs: ClubMask::NONE,
            leaving: false,
        }
        .encode(&mut buf)
        .unwrap();
        let replies = exchange(&mut t, at(0), addr(1), &buf[..n]);
        assert_eq!(replies.len(), 1);
        assert!(replies[0].len() <= n);
        assert!(matches!(
            Message::parse(&replies[0]),
            Ok(Message::Cookie(_))
        ));
        assert_eq!(t.members(&ChannelId([9; 8])), 0);
    }

    #[test]
    fn the_signed_descriptor_is_served_and_forgeries_are_not() {
        let mut t = TrackerCore::new(TrackerConfig::default(), [1; 32], 7);
        let key = ChannelKey::from_seed(&[3; 32]);
        let ch = key.public().channel_id();
        let good = descriptor(&key, 4, 4_000_000);
        let mut forged = good.clone();
        forged[44] = 9; // K changed after signing
        assert!(exchange(&mut t, at(0), addr(9), &forged).is_empty());
        assert!(exchange(&mut t, at(0), addr(9), &good).is_empty());
        let replies = announce(&mut t, at(1), addr(1), ch, Role::Peer);
        let Ok(Message::Descriptor(d)) = Message::parse(&replies[0]) else {
            panic!("no descriptor first")
        };
        assert_eq!((d.clubs(), d.bitrate_bps()), (4, 4_000_000));
        assert_eq!(t.stats().descriptors, 1);
        assert!(t.stats().refused >= 1);
    }
}
