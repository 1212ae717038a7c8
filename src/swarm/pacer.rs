//! Pacing: a token bucket that holds a member's upload to its limit (`--upload-limit`), with
//! a burst of a few datagrams so pacing adds at most a millisecond or two of delay.

use std::time::Duration;

use crate::time::Timestamp;

/// A token bucket in bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second; `None` is unlimited.
    rate: Option<u64>,
    burst: u64,
    tokens: u64,
    last: Timestamp,
}

impl TokenBucket {
    /// A bucket refilling at `rate_bps` bits per second (`None`: unlimited) that holds at most
    /// `burst` bytes.
    pub fn new(rate_bps: Option<u64>, burst: u64) -> Self {
        TokenBucket {
            rate: rate_bps.map(|r| (r / 8).max(1)),
            burst,
            tokens: burst,
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
            self.tokens = (self.tokens + add).min(self.burst);
            // Keep the fraction of a byte that did not make a whole token.
            self.last = if self.tokens == self.burst {
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
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }

    /// Takes `bytes` only if `reserve` more would be left (background traffic leaves room for
    /// the live pieces that may come next).
    pub fn try_take_leaving(&mut self, now: Timestamp, bytes: u64, reserve: u64) -> bool {
        if self.rate.is_none() {
            return true;
        }
        self.refill(now);
        if self.tokens >= bytes + reserve.min(self.burst.saturating_sub(bytes)) {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }

    /// When `bytes` will be there (now if they are).
    pub fn ready_at(&self, now: Timestamp, bytes: u64) -> Timestamp {
        let Some(rate) = self.rate else { return now };
        let mut b = self.clone();
        b.refill(now);
        if b.tokens >= bytes {
            return now;
        }
        let missing = bytes - b.tokens;
        now + Duration::from_micros(missing * 1_000_000 / rate + 1)
    }
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
}
