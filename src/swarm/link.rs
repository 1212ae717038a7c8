//! One link between two swarm members, as one side sees it: which clubs flow each way, whether
//! it is a club-mate link, when it was last heard from, its background (repair, catch-up)
//! queue under LEDBAT, its live send rate under AIMD, and the figures that decide whether to
//! replace the member at the other end. Also a member's table of its links.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use super::ledbat::{Ledbat, LedbatConfig};
use crate::time::Timestamp;
use crate::wire::{AckEntry, ClubMask, CookieBytes, Role};

/// A background piece sent on a link and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    at: Timestamp,
    bytes: u64,
}

/// The live send rate of a link to a downstream member: at most twice the link's share of the
/// stream, with a burst of 16 pieces. Live pieces are not acknowledged (an ACK per piece cost
/// a peer about 5 % of the stream rate in upload); a path that cannot carry its share shows as
/// gaps at the downstream, which repairs them or replaces its upstream.
#[derive(Debug, Clone)]
pub struct LiveRate {
    rate: u64,
    tokens: u64,
    last: Timestamp,
}

impl LiveRate {
    fn new(share_bytes_per_s: u64) -> Self {
        LiveRate {
            rate: share_bytes_per_s.max(1) * 2,
            tokens: 16 * 1232,
            last: Timestamp::ZERO,
        }
    }

    /// Bytes per second allowed.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn set_share(&mut self, share_bytes_per_s: u64) {
        self.rate = share_bytes_per_s.max(1) * 2;
    }

    /// Takes `bytes` for a live piece if the rate allows.
    fn try_take(&mut self, now: Timestamp, bytes: u64) -> bool {
        let us = now.saturating_since(self.last).as_micros() as u64;
        self.last = now;
        let burst = (self.rate / 20).max(16 * 1232);
        self.tokens = (self.tokens + us.saturating_mul(self.rate) / 1_000_000).min(burst);
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

/// A link to one member.
#[derive(Debug)]
pub struct Link {
    /// What the other member is.
    pub role: Role,
    /// Its club (`0xff`: every club).
    pub club: u8,
    /// Clubs we push to it.
    pub send: ClubMask,
    /// Clubs it pushes to us.
    pub recv: ClubMask,
    /// A club-mate link (both sides push their club at once, no window).
    pub mate: bool,
    /// We asked for this link (we keep it alive with JOINs); otherwise it asked us.
    pub initiated: bool,
    /// Links we asked for: the clubs we asked for.
    pub wanted: ClubMask,
    /// Links we asked for: we asked to be club mates.
    pub wants_mate: bool,
    /// Links we asked for: the cookie the other side gave us.
    pub cookie: CookieBytes,
    /// When the other side accepted.
    pub established_at: Timestamp,
    /// The other side has accepted (for links we asked for).
    pub established: bool,
    /// Links we asked for, once established: asked to carry more clubs (`wanted` beyond
    /// `recv`), the answer is awaited until this; not asked for more again before it.
    pub widen_at: Timestamp,
    /// When we last heard anything from it.
    pub last_heard: Timestamp,
    /// When the link we asked for (or a mate link) was last confirmed (an ACCEPT, or for mates
    /// either side's JOIN).
    pub last_keepalive: Timestamp,
    /// When the other side last sent a JOIN (keeps alive what we push to it).
    pub their_join: Timestamp,
    /// When we asked for it or last re-sent our JOIN.
    pub last_join: Timestamp,
    /// Pieces from it that were new to us.
    pub pieces_new: u64,
    /// Pieces from it we already had.
    pub pieces_dup: u64,
    /// Pieces of clubs it serves us that went missing (NACKed) — its loss, as we see it.
    pub pieces_missed: u64,
    /// Smoothed lateness of its pieces behind the fastest path we have seen, µs.
    pub lateness_us: f64,
    /// Background queue: sequence numbers to resend or catch up, under LEDBAT.
    pub background: VecDeque<u64>,
    /// The background flow's congestion controller (boxed: the timers walk every link, and
    /// a smaller link keeps more of them in cache).
    pub ledbat: Box<Ledbat>,
    /// The live flow's rate.
    pub live: LiveRate,
    /// Acknowledgements to send it (for links that push to us).
    pub pending_acks: Vec<AckEntry>,
    /// When the oldest pending acknowledgement was recorded.
    pub acks_since: Timestamp,
    /// Links that push to us: repairs from it (pieces we were missing, or that do not advance
    /// their club) are acknowledged until this, after we NACKed it: LEDBAT paces them on the
    /// ACKs. Live pieces are not.
    pub acks_until: Timestamp,
    /// Links that push to us: every piece from it is acknowledged until this, after it
    /// accepted our link (its catch-up, under LEDBAT, comes with the first live pieces).
    pub catch_up_until: Timestamp,
    sent: VecDeque<Sent>,
    /// Smoothed round-trip time of background pieces (send → ACK, including the ACK's
    /// batching delay).
    pub srtt: Duration,
    /// Background pieces sent and lost on this link.
    pub lost: u64,
    /// NACK entries we sent it, recent ones weighing most (see [`Link::repair_yield`]).
    pub nacked: f32,
    /// Pieces we had NACKed (to anyone) that came from it, on the same scale as `nacked`.
    pub answered: f32,
    /// Share of its upload it last said its seats leave free (0–255).
    pub spare: u8,
}

impl Link {
    const MAX_TRACKED: usize = 1024;

    /// A fresh link.
    pub fn new(now: Timestamp, role: Role, club: u8, initiated: bool, share_bytes: u64) -> Self {
        Link {
            role,
            club,
            send: ClubMask::NONE,
            recv: ClubMask::NONE,
            mate: false,
            initiated,
            wanted: ClubMask::NONE,
            wants_mate: false,
            cookie: CookieBytes::default(),
            established_at: now,
            established: !initiated,
            widen_at: now,
            last_heard: now,
            last_keepalive: now,
            their_join: now,
            last_join: now,
            pieces_new: 0,
            pieces_dup: 0,
            pieces_missed: 0,
            lateness_us: 0.0,
            background: VecDeque::new(),
            // Four packets at least: at 5 % loss, two held by unacknowledged losses for a
            // few round trips starved repairs.
            ledbat: Box::new(Ledbat::new(LedbatConfig {
                min_cwnd_packets: 4,
                ..LedbatConfig::default()
            })),
            live: LiveRate::new(share_bytes),
            pending_acks: Vec::new(),
            acks_since: now,
            acks_until: now,
            catch_up_until: now,
            sent: VecDeque::new(),
            srtt: Duration::from_millis(100),
            lost: 0,
            nacked: 0.0,
            answered: 0.0,
            spare: 0,
        }
    }

    /// Counts `n` NACK entries sent to it; older counts fade (halved past 32) so that the
    /// yield follows how busy it is now.
    pub fn note_nacked(&mut self, n: u32) {
        self.nacked += n as f32;
        if self.nacked > 32.0 {
            self.nacked /= 2.0;
            self.answered /= 2.0;
        }
    }

    /// Counts a piece we had NACKed that it sent us.
    pub fn note_answered(&mut self) {
        self.answered += 1.0;
    }

    /// Share of what we NACKed it that it answered, with a prior of one in two.
    pub fn repair_yield(&self) -> f32 {
        (self.answered + 1.0) / (self.nacked + 2.0)
    }

    /// How good a place it is for a NACK its club's sources did not answer: the upload it
    /// says it has free (a member whose seats fill its uplink lets repairs go stale in its
    /// queue while others have upload idle), unless it has left most of what we asked it
    /// unanswered (a member that claims room it does not give: a free rider, a liar).
    pub fn repair_score(&self) -> f32 {
        if self.nacked >= 4.0 && self.repair_yield() < 0.2 {
            -1.0
        } else {
            f32::from(self.spare) / 255.0
        }
    }

    /// Sets the live rate's share (bytes/s) after the clubs sent on the link changed.
    pub fn set_share(&mut self, share_bytes: u64) {
        self.live.set_share(share_bytes);
    }

    /// Whether a live piece of `bytes` may go now.
    pub fn live_allows(&mut self, now: Timestamp, bytes: u64) -> bool {
        self.live.try_take(now, bytes)
    }

    /// Whether a background piece of `bytes` fits the LEDBAT window.
    pub fn background_allows(&self, bytes: u64) -> bool {
        self.ledbat.can_send(bytes)
    }

    /// Records a background piece sent on the link (for ACK matching). Live pieces and
    /// everything between mates go unacknowledged.
    pub fn on_sent(&mut self, now: Timestamp, seq: u64, bytes: u64) {
        if self.mate {
            return;
        }
        self.ledbat.on_sent(bytes);
        if self.sent.len() >= Self::MAX_TRACKED {
            if let Some(old) = self.sent.pop_front() {
                self.forget(now, old);
            }
        }
        self.sent.push_back(Sent {
            seq,
            at: now,
            bytes,
        });
    }

    fn forget(&mut self, now: Timestamp, s: Sent) {
        self.lost += 1;
        self.ledbat.on_loss(now, s.bytes);
    }

    /// Handles acknowledgements from the other side.
    pub fn on_acks(&mut self, now: Timestamp, entries: impl Iterator<Item = AckEntry>) {
        for e in entries {
            let Some(i) = self.sent.iter().position(|s| s.seq == e.seq) else {
                continue;
            };
            let Some(s) = self.sent.remove(i) else {
                continue;
            };
            let rtt = now.saturating_since(s.at);
            self.srtt = (self.srtt * 7 + rtt) / 8;
            self.ledbat.on_rtt(rtt);
            // One-way delay plus the clocks' offset; the offset cancels against the base
            // delay. Shifted by 2^62 µs so a negative offset cannot wrap.
            let owd = e
                .received_us
                .wrapping_sub(s.at.as_micros())
                .wrapping_add(1 << 62);
            self.ledbat.on_ack(now, s.bytes, owd);
        }
    }

    /// Counts pieces sent long enough ago, and never acknowledged, as lost.
    pub fn detect_losses(&mut self, now: Timestamp) {
        let after = (self.srtt * 3).max(Duration::from_millis(250));
        while let Some(s) = self.sent.front().copied() {
            if now.saturating_since(s.at) < after {
                break;
            }
            self.sent.pop_front();
            self.forget(now, s);
        }
    }

    /// Whether this link brings us `club`: an upstream that granted it, or a club mate of it.
    pub fn is_source_of(&self, club: u8) -> bool {
        self.established && (self.recv.contains(club) || (self.mate && self.club == club))
    }
}

/// A member's links by address, in address order. Kept as sorted vectors: a lookup is a
/// binary search over eight-byte prefixes of the addresses alone, and a walk (the timers walk every link every tick,
/// and every new piece looks for where it goes) goes through the links contiguously. Links
/// come and go far less often than they are looked up or walked.
#[derive(Debug, Default)]
pub struct LinkTable {
    /// `order_prefix` of each address: what the binary search compares first. Eight bytes a
    /// link keep the search within a few cache lines (the simulator's members are never in
    /// cache when an event reaches them).
    prefixes: Vec<u64>,
    addrs: Vec<SocketAddr>,
    links: Vec<Link>,
}

/// Two integers that order addresses by IP, then family, port, flow and scope: equal exactly
/// when the addresses are (IPv4 addresses sort as `SocketAddr` sorts them).
fn order_key(addr: &SocketAddr) -> (u128, u128) {
    match addr {
        SocketAddr::V4(a) => (u128::from(a.ip().to_bits()), u128::from(a.port()) << 64),
        SocketAddr::V6(a) => (
            a.ip().to_bits(),
            1 << 80
                | u128::from(a.port()) << 64
                | u128::from(a.flowinfo()) << 32
                | u128::from(a.scope_id()),
        ),
    }
}

/// Eight bytes that never decrease as `order_key` grows and tell IPv4 addresses apart: an
/// IPv4 address's IP, family and port; for IPv6, enough of the IP to settle most searches.
fn order_prefix(key: &(u128, u128)) -> u64 {
    let (ip, rest) = *key;
    if ip < 1 << 32 {
        // IP, then family (bit 80 of `rest`), then port (bits 64..80).
        (ip as u64) << 17 | ((rest >> 64) as u64 & 0x1_ffff)
    } else {
        ((ip >> 64) as u64).saturating_add(1 << 49)
    }
}

impl LinkTable {
    fn position(&self, addr: &SocketAddr) -> Result<usize, usize> {
        let key = order_key(addr);
        let prefix = order_prefix(&key);
        let start = self.prefixes.partition_point(|&p| p < prefix);
        let equal = self.prefixes[start..]
            .iter()
            .take_while(|&&p| p == prefix)
            .count();
        if addr.is_ipv4() && equal <= 1 {
            // The prefix is the whole IPv4 address.
            return if equal == 1 { Ok(start) } else { Err(start) };
        }
        // Equal prefixes (IPv6 only) are settled by the whole key.
        match self.addrs[start..start + equal].binary_search_by(|a| order_key(a).cmp(&key)) {
            Ok(i) => Ok(start + i),
            Err(i) => Err(start + i),
        }
    }

    /// Number of links.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The link to `addr`.
    pub fn get(&self, addr: &SocketAddr) -> Option<&Link> {
        let i = self.position(addr).ok()?;
        self.links.get(i)
    }

    /// The link to `addr`, to change.
    pub fn get_mut(&mut self, addr: &SocketAddr) -> Option<&mut Link> {
        let i = self.position(addr).ok()?;
        self.links.get_mut(i)
    }

    /// Whether there is a link to `addr`.
    pub fn contains_key(&self, addr: &SocketAddr) -> bool {
        self.position(addr).is_ok()
    }

    /// The link to `addr`, made by `new` if there is none.
    pub fn get_or_insert_with(
        &mut self,
        addr: SocketAddr,
        new: impl FnOnce() -> Link,
    ) -> &mut Link {
        let i = match self.position(&addr) {
            Ok(i) => i,
            Err(i) => {
                self.prefixes.insert(i, order_prefix(&order_key(&addr)));
                self.addrs.insert(i, addr);
                self.links.insert(i, new());
                i
            }
        };
        &mut self.links[i]
    }

    /// Removes the link to `addr`.
    pub fn remove(&mut self, addr: &SocketAddr) -> Option<Link> {
        let i = self.position(addr).ok()?;
        self.prefixes.remove(i);
        self.addrs.remove(i);
        Some(self.links.remove(i))
    }

    /// Removes every link.
    pub fn clear(&mut self) {
        self.prefixes.clear();
        self.addrs.clear();
        self.links.clear();
    }

    /// Addresses and links, in address order.
    pub fn iter(
        &self,
    ) -> std::iter::Zip<std::slice::Iter<'_, SocketAddr>, std::slice::Iter<'_, Link>> {
        self.addrs.iter().zip(self.links.iter())
    }

    /// Addresses and links to change, in address order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&SocketAddr, &mut Link)> {
        self.addrs.iter().zip(self.links.iter_mut())
    }

    /// Addresses, in order.
    pub fn keys(&self) -> std::slice::Iter<'_, SocketAddr> {
        self.addrs.iter()
    }

    /// Links, in address order.
    pub fn values(&self) -> std::slice::Iter<'_, Link> {
        self.links.iter()
    }

    /// Links to change, in address order.
    pub fn values_mut(&mut self) -> std::slice::IterMut<'_, Link> {
        self.links.iter_mut()
    }
}

impl<'a> IntoIterator for &'a LinkTable {
    type Item = (&'a SocketAddr, &'a Link);
    type IntoIter = std::iter::Zip<std::slice::Iter<'a, SocketAddr>, std::slice::Iter<'a, Link>>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_table_finds_and_walks_links_in_address_order() {
        let now = Timestamp::from_micros(1_000_000);
        let v4 = |a: [u8; 4], port: u16| SocketAddr::from((a, port));
        let v6: SocketAddr = "[2001:db8::1]:7000".parse().unwrap();
        let v6_other_scope: SocketAddr = "[2001:db8::1%3]:7000".parse().unwrap();
        // IPv6 addresses whose prefixes tie: one /64, and IPs an IPv4 address could have.
        let v6_same_64: SocketAddr = "[2001:db8::2]:6000".parse().unwrap();
        let v6_small_ip: SocketAddr = "[::a00:9]:7000".parse().unwrap();
        let v6_small_ip_flow = SocketAddr::V6(std::net::SocketAddrV6::new(
            "::a00:9".parse().unwrap(),
            7000,
            5,
            0,
        ));
        let addrs = [
            v4([10, 0, 1, 2], 7000),
            v6,
            v4([10, 0, 0, 9], 7001),
            v6_other_scope,
            v4([10, 0, 0, 9], 7000),
            v4([192, 168, 0, 1], 1),
            v6_same_64,
            v6_small_ip,
            v6_small_ip_flow,
        ];
        let mut table = LinkTable::default();
        for (i, a) in addrs.iter().enumerate() {
            table.get_or_insert_with(*a, || Link::new(now, Role::Peer, i as u8, false, 1));
        }
        // Inserting again keeps the link that is there.
        table.get_or_insert_with(addrs[0], || Link::new(now, Role::Peer, 99, false, 1));
        assert_eq!(table.len(), addrs.len());
        for (i, a) in addrs.iter().enumerate() {
            assert_eq!(table.get(a).map(|l| l.club), Some(i as u8), "{a}");
        }
        // IPv4 addresses in the order `SocketAddr` gives them (the simulator's reports depend
        // on it); every address once.
        let walked: Vec<SocketAddr> = table.keys().copied().collect();
        let v4s: Vec<SocketAddr> = walked.iter().copied().filter(|a| a.is_ipv4()).collect();
        let mut sorted = v4s.clone();
        sorted.sort();
        assert_eq!(v4s, sorted);
        let mut by_key = addrs.to_vec();
        by_key.sort_by_key(order_key);
        assert_eq!(walked, by_key);
        for pair in by_key.windows(2) {
            let (a, b) = (order_key(&pair[0]), order_key(&pair[1]));
            assert!(order_prefix(&a) <= order_prefix(&b), "{pair:?}");
        }
        assert!(table
            .iter()
            .all(|(a, l)| table.get(a).unwrap().club == l.club));
        assert_eq!(table.remove(&v6).map(|l| l.club), Some(1));
        assert!(!table.contains_key(&v6) && table.contains_key(&v6_other_scope));
        assert!(table.remove(&v6).is_none());
        assert_eq!(table.remove(&v6_small_ip).map(|l| l.club), Some(7));
        assert_eq!(table.get(&v6_small_ip_flow).map(|l| l.club), Some(8));
        assert_eq!(table.get(&addrs[4]).map(|l| l.club), Some(4));
        table.clear();
        assert!(table.is_empty() && table.get(&addrs[0]).is_none());
    }

    #[test]
    fn live_pieces_are_held_to_twice_the_share_with_a_burst_of_sixteen() {
        let now = Timestamp::from_micros(1_000_000);
        let mut l = Link::new(now, Role::Peer, 0, false, 10_000);
        assert_eq!(l.live.rate(), 20_000);
        let sent = (0..40).filter(|_| l.live_allows(now, 1_232)).count();
        assert_eq!(sent, 16);
        // 100 ms at 20 000 B/s: 2 000 bytes, one more piece.
        let later = now + Duration::from_millis(100);
        assert!(l.live_allows(later, 1_232));
        assert!(!l.live_allows(later, 1_232));
    }

    #[test]
    fn background_pieces_are_lost_unless_acknowledged_in_time() {
        let now = Timestamp::from_micros(1_000_000);
        let mut l = Link::new(now, Role::Peer, 0, false, 10_000);
        for i in 0..20 {
            l.on_sent(now, i, 1_000);
        }
        l.detect_losses(now + Duration::from_secs(1));
        assert_eq!(l.lost, 20);
        let later = now + Duration::from_secs(2);
        for i in 20..40 {
            l.on_sent(later, i, 1_000);
        }
        l.on_acks(
            later + Duration::from_millis(10),
            (20..40).map(|seq| AckEntry {
                seq,
                received_us: 0,
            }),
        );
        l.detect_losses(later + Duration::from_secs(1));
        assert_eq!(l.lost, 20);
        assert!(l.srtt < Duration::from_millis(100));
    }
}
