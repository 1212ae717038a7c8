//! One link between two swarm members, as one side sees it: which clubs flow each way, whether
//! it is a club-mate link, when it was last heard from, its background (repair, catch-up)
//! queue under LEDBAT, its live send rate under AIMD, and the figures that decide whether to
//! replace the member at the other end.

use std::collections::VecDeque;
use std::time::Duration;

use super::ledbat::{Ledbat, LedbatConfig};
use crate::time::Timestamp;
use crate::wire::{AckEntry, ClubMask, CookieBytes, Role};

/// A piece sent on a link and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    at: Timestamp,
    bytes: u64,
    background: bool,
}

/// The live send rate of a link to a downstream member: AIMD on the losses its ACKs reveal,
/// between the link's share of the stream and twice it. Random loss of a few percent does not
/// move it (that is repair's job); only heavy loss, a sign of congestion, cuts it, and a path
/// that cannot carry the share is left to the downstream, which replaces its upstream.
#[derive(Debug, Clone)]
pub struct LiveRate {
    share: u64,
    rate: u64,
    tokens: u64,
    last: Timestamp,
    last_cut: Timestamp,
    /// Recent outcomes, one bit per piece (1: lost), newest in bit 0.
    recent: u64,
}

impl LiveRate {
    fn new(share_bytes_per_s: u64) -> Self {
        let share = share_bytes_per_s.max(1);
        LiveRate {
            share,
            rate: share * 2,
            tokens: 16 * 1232,
            last: Timestamp::ZERO,
            last_cut: Timestamp::ZERO,
            recent: 0,
        }
    }

    /// Bytes per second allowed now.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn set_share(&mut self, share_bytes_per_s: u64) {
        self.share = share_bytes_per_s.max(1);
        self.rate = self.share * 2;
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

    /// Loss fraction above which the rate is cut.
    const CONGESTED: u32 = 64 / 5;

    fn on_loss(&mut self, now: Timestamp, rtt: Duration) {
        self.recent = (self.recent << 1) | 1;
        if self.recent.count_ones() < Self::CONGESTED
            || now.saturating_since(self.last_cut) < rtt.max(Duration::from_millis(50))
        {
            return;
        }
        self.last_cut = now;
        self.rate = (self.rate * 4 / 5).max(self.share);
    }

    fn on_ack(&mut self, bytes: u64) {
        self.recent <<= 1;
        // About one stream share more per second of clean acknowledgements.
        self.rate = (self.rate + bytes / 8).min(self.share * 2);
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
    /// The background flow's congestion controller.
    pub ledbat: Ledbat,
    /// The live flow's rate.
    pub live: LiveRate,
    /// Acknowledgements to send it (for links that push to us).
    pub pending_acks: Vec<AckEntry>,
    /// When the oldest pending acknowledgement was recorded.
    pub acks_since: Timestamp,
    sent: VecDeque<Sent>,
    /// Smoothed round-trip time (send → ACK, including the ACK's batching delay).
    pub srtt: Duration,
    /// Pieces sent and lost on this link.
    pub lost: u64,
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
            ledbat: Ledbat::new(LedbatConfig {
                min_cwnd_packets: 4,
                ..LedbatConfig::default()
            }),
            live: LiveRate::new(share_bytes),
            pending_acks: Vec::new(),
            acks_since: now,
            sent: VecDeque::new(),
            srtt: Duration::from_millis(100),
            lost: 0,
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

    /// Records a piece sent on the link (for ACK matching). Mates are not acknowledged.
    pub fn on_sent(&mut self, now: Timestamp, seq: u64, bytes: u64, background: bool) {
        if self.mate {
            return;
        }
        if background {
            self.ledbat.on_sent(bytes);
        }
        if self.sent.len() >= Self::MAX_TRACKED {
            if let Some(old) = self.sent.pop_front() {
                self.forget(now, old);
            }
        }
        self.sent.push_back(Sent {
            seq,
            at: now,
            bytes,
            background,
        });
    }

    fn forget(&mut self, now: Timestamp, s: Sent) {
        self.lost += 1;
        if s.background {
            self.ledbat.on_loss(now, s.bytes);
        }
        self.live.on_loss(now, self.srtt);
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
            if s.background {
                self.ledbat.on_rtt(rtt);
                // One-way delay plus the clocks' offset; the offset cancels against the base
                // delay. Shifted by 2^62 µs so a negative offset cannot wrap.
                let owd = e
                    .received_us
                    .wrapping_sub(s.at.as_micros())
                    .wrapping_add(1 << 62);
                self.ledbat.on_ack(now, s.bytes, owd);
            } else {
                self.live.on_ack(s.bytes);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_rate_backs_off_on_loss_and_recovers_on_acks() {
        let now = Timestamp::from_micros(1_000_000);
        let mut l = Link::new(now, Role::Peer, 0, false, 10_000);
        assert_eq!(l.live.rate(), 20_000);
        for i in 0..20 {
            l.on_sent(now, i, 1_000, false);
        }
        l.detect_losses(now + Duration::from_secs(1));
        assert_eq!(l.lost, 20);
        assert!(l.live.rate() < 20_000 && l.live.rate() >= 10_000);
        let low = l.live.rate();
        let later = now + Duration::from_secs(2);
        for i in 10..30 {
            l.on_sent(later, i, 1_000, false);
        }
        l.on_acks(
            later + Duration::from_millis(10),
            (10..30).map(|seq| AckEntry {
                seq,
                received_us: 0,
            }),
        );
        assert!(l.live.rate() > low);
        assert_eq!(l.lost, 20);
    }
}
