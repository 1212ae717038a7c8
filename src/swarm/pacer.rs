//! Pacing: a token bucket that holds a member's upload to its limit (`--upload-limit`), with
//! a burst of a few datagrams so pacing adds at most a millisecond or two of delay. The limit
//! counts everything a member sends, as its line does: pieces and control, and each datagram's
//! IP and UDP headers ([`DATAGRAM_OVERHEAD`]).

use std::time::Duration;

use crate::time::Timestamp;

/// Bytes a datagram costs on the line beyond its payload: IPv4 and UDP headers.
pub const DATAGRAM_OVERHEAD: u64 = 28;

/// A token bucket in bytes. Pieces wait for tokens; control is charged when it goes (it must
/// not wait behind pieces), which may leave the bucket in debt by up to one burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second; `None` is unlimited.
    rate: Option<u64>,
    burst: u64,
    /// Negative: in debt for control sent.
    tokens: i64,
    last: Timestamp,
}

impl TokenBucket {
    /// A bucket refilling at `rate_bps` bits per second (`None`: unlimited) that holds at most
    /// `burst` bytes.
    pub fn new(rate_bps: Option<u64>, burst: u64) -> Self {
        TokenBucket {
            rate: rate_bps.map(|r| (r / 8).max(1)),
            burst,
            tokens: burst as i64,
            last: Timestamp::ZERO,
        }
    }

    /// Whether the bucket limits anything.
    pub fn is_limited(&self) -> bool {
        self.rate.is_some()
    }

    fn refill(&mut self, now: Timestamp) {
        let Some(rate) = self.rate else { return };
        if now <= self.last {
            return;
        }
        let us = now.saturating_since(self.last).as_micros() as u64;
        let add = us.saturating_mul(rate) / 1_000_000;
        if add > 0 {
            let burst = self.burst as i64;
            self.tokens = self
                .tokens
                .saturating_add(i64::try_from(add).unwrap_or(i64::MAX))
                .min(burst);
            // Keep the fraction of a byte that did not make a whole token.
            self.last = if self.tokens == burst {
                now
            } else {
                self.last + Duration::from_micros(add * 1_000_000 / rate)
            };
        }
    }

    /// Takes `bytes` if they are there.
    pub fn try_take(&mut self, now: Timestamp, bytes: u64) -> bool {
        if self.rate.is_none() {
            return true;
        }
        self.refill(now);
        let bytes = signed(bytes);
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }

    /// Takes `bytes` whether they are there or not (control, which goes at once), going into
    /// debt by at most one burst.
    pub fn charge(&mut self, now: Timestamp, bytes: u64) {
        if self.rate.is_none() {
            return;
        }
        self.refill(now);
        self.tokens = (self.tokens - signed(bytes)).max(-(self.burst as i64));
    }

    /// Takes `bytes` only if `reserve` more would be left (background traffic leaves room for
    /// the live pieces that may come next).
    pub fn try_take_leaving(&mut self, now: Timestamp, bytes: u64, reserve: u64) -> bool {
        if self.rate.is_none() {
            return true;
        }
        self.refill(now);
        if self.tokens >= self.needed_leaving(bytes, reserve) {
            self.tokens -= signed(bytes);
            true
        } else {
            false
        }
    }

    /// Whether [`TokenBucket::try_take_leaving`] would take `bytes` now (this takes nothing).
    pub fn would_take_leaving(&self, now: Timestamp, bytes: u64, reserve: u64) -> bool {
        let needed = self.needed_leaving(bytes, reserve).unsigned_abs();
        self.ready_at(now, needed) <= now
    }

    /// Tokens that must be there to take `bytes` and leave `reserve` (a full bucket is
    /// always enough).
    fn needed_leaving(&self, bytes: u64, reserve: u64) -> i64 {
        signed(bytes.saturating_add(reserve.min(self.burst.saturating_sub(bytes))))
    }

    /// When `bytes` will be there (now if they are).
    pub fn ready_at(&self, now: Timestamp, bytes: u64) -> Timestamp {
        let Some(rate) = self.rate else { return now };
        let mut b = self.clone();
        b.refill(now);
        let bytes = signed(bytes);
        if b.tokens >= bytes {
            return now;
        }
        let missing = (bytes - b.tokens).unsigned_abs();
        now + Duration::from_micros(missing.saturating_mul(1_000_000) / rate + 1)
    }
}

fn signed(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_rate_over_a_second() {
        // 1 Mbit/s = 125 000 bytes/s; 1 000-byte sends attempted every 100 µs for one second.
        let mut b = TokenBucket::new(Some(1_000_000), 4_000);
        let mut sent = 0u64;
        for i in 0..10_000u64 {
            if b.try_take(Timestamp::from_micros(i * 100), 1_000) {
                sent += 1_000;
            }
        }
        assert!((125_000..=129_000).contains(&sent), "sent {sent}");
        let now = Timestamp::from_micros(1_000_000);
        while b.try_take(now, 1_000) {}
        assert!(b.ready_at(now, 1_000) > now);
        assert!(TokenBucket::new(None, 0).try_take(now, u64::MAX));
    }

    #[test]
    fn control_charged_now_is_paid_back_before_pieces_go() {
        // 1 Mbit/s, a burst of 4 000 bytes, all spent on control and then some.
        let mut b = TokenBucket::new(Some(1_000_000), 4_000);
        let now = Timestamp::from_micros(1_000_000);
        b.charge(now, 3_000);
        b.charge(now, 3_000);
        assert!(!b.try_take(now, 1));
        // 2 000 bytes of debt and 1 000 for the piece: 24 ms at 125 000 bytes/s.
        let ready = b.ready_at(now, 1_000);
        assert_eq!(ready.saturating_since(now).as_millis(), 24);
        assert!(b.try_take(ready, 1_000));
        // Debt is capped at one burst.
        b.charge(ready, 1_000_000);
        let again = b.ready_at(ready, 0);
        assert_eq!(again.saturating_since(ready).as_millis(), 32);
    }

    #[test]
    fn would_take_leaving_says_what_try_take_leaving_does_and_takes_nothing() {
        // 1 Mbit/s, a burst of 4 000 bytes; 1 000-byte pieces leaving 1 500 bytes of room.
        let mut b = TokenBucket::new(Some(1_000_000), 4_000);
        let mut asked = 0;
        let mut taken = 0;
        for i in 0..2_000u64 {
            let now = Timestamp::from_micros(i * 500);
            let before = b.ready_at(now, 4_000);
            let would = b.would_take_leaving(now, 1_000, 1_500);
            assert_eq!(b.ready_at(now, 4_000), before, "a look takes nothing");
            asked += 1;
            let took = b.try_take_leaving(now, 1_000, 1_500);
            assert_eq!(would, took, "at {i}");
            taken += u64::from(took);
        }
        assert!(taken > 0 && taken < asked, "{taken} of {asked}");
        assert!(TokenBucket::new(None, 0).would_take_leaving(Timestamp::ZERO, u64::MAX, 1));
    }
}
