//! Per-source budgets in bounded memory: a fixed table of token buckets indexed by a keyed hash
//! of the source IP. A flood from any number of addresses cannot grow it (addresses that hash
//! together share a bucket), and the hash key is random per relay, so an attacker cannot aim
//! at an honest source's bucket.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};

use crate::time::Timestamp;

/// Buckets in the table (a power of two): 64 KiB, whatever the traffic.
const BUCKETS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens left, in thousandths (so refills of less than one token per tick add up).
    milli_tokens: u64,
    refilled: Timestamp,
}

/// Token buckets of `rate` tokens per second up to `burst`, one per source IP (hashed).
#[derive(Debug)]
pub struct SourceLimiter {
    rate: u64,
    burst: u64,
    buckets: Box<[Bucket]>,
    hasher: std::collections::hash_map::RandomState,
}

impl SourceLimiter {
    /// A limiter allowing each source `rate` per second with bursts of `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = u64::from(burst.max(1));
        SourceLimiter {
            rate: u64::from(rate),
            burst,
            buckets: vec![
                Bucket {
                    milli_tokens: burst * 1000,
                    refilled: Timestamp::ZERO,
                };
                BUCKETS
            ]
            .into_boxed_slice(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn index(&self, ip: IpAddr) -> usize {
        let mut h = self.hasher.build_hasher();
        match ip {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => h.write(&v6.octets()),
        }
        (h.finish() as usize) & (BUCKETS - 1)
    }

    /// Takes one token from `from`'s bucket at `now`; false if it has none left.
    pub fn allow(&mut self, now: Timestamp, from: SocketAddr) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        let i = self.index(from.ip());
        let b = &mut self.buckets[i];
        let elapsed_us =
            u64::try_from(now.saturating_since(b.refilled).as_micros()).unwrap_or(u64::MAX);
        // rate tokens/s = rate milli-tokens/ms = rate / 1000 milli-tokens/µs.
        let refill = elapsed_us.saturating_mul(rate) / 1000;
        b.milli_tokens = (b.milli_tokens.saturating_add(refill)).min(burst * 1000);
        // Datagrams handed over by another worker carry its (older) receive time: never move
        // the refill clock back, or that time would be counted twice.
        b.refilled = b.refilled.max(now);
        if b.milli_tokens >= 1000 {
            b.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// Changes the rate and burst (a live reload); buckets keep their tokens, capped.
    pub fn set_rate(&mut self, rate: u32, burst: u32) {
        self.rate = u64::from(rate);
        self.burst = u64::from(burst.max(1));
        for b in self.buckets.iter_mut() {
            b.milli_tokens = b.milli_tokens.min(self.burst * 1000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(ms: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_millis(ms)
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut l = SourceLimiter::new(100, 10);
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let allowed = (0..50).filter(|_| l.allow(at(0), a)).count();
        assert_eq!(allowed, 10, "the burst");
        // 100 per second: 5 more after 50 ms.
        let allowed = (0..50).filter(|_| l.allow(at(50), a)).count();
        assert_eq!(allowed, 5);
        // Other ports of the same IP share the bucket; another IP has its own.
        assert!(!l.allow(at(50), "10.0.0.1:6000".parse().unwrap()));
        assert!(l.allow(at(50), "10.0.0.2:5000".parse().unwrap()));
        // Tokens never pile up beyond the burst.
        let allowed = (0..50).filter(|_| l.allow(at(60_000), a)).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn a_flood_from_many_addresses_stays_in_the_table() {
        let mut l = SourceLimiter::new(10, 10);
        for i in 0..100_000u32 {
            let ip = std::net::Ipv4Addr::from(i.wrapping_mul(2_654_435_761));
            l.allow(at(0), SocketAddr::from((ip, 1)));
        }
        assert_eq!(l.buckets.len(), BUCKETS);
    }
}
