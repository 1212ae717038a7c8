//! Stateless address validation: a cookie is a time bucket and a keyed hash of the source
//! address and that bucket. The relay stores nothing per HELLO, so a flood of spoofed HELLOs
//! costs it one hash each and earns each spoofed address one reply no larger than its request.

use std::net::SocketAddr;
use std::time::Duration;

use crate::time::Timestamp;
use crate::wire::CookieBytes;

/// What a presented cookie is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieCheck {
    /// Issued for this address in the current bucket.
    Fresh,
    /// Issued for this address in the previous bucket: valid, but the client should get a new
    /// one before it expires.
    Aging,
    /// Forged, for another address, or expired.
    Invalid,
}

/// Issues and checks cookies under a secret key that never leaves the relay.
pub struct CookieJar {
    key: [u8; 32],
    bucket_us: u64,
}

impl CookieJar {
    /// A jar with a key and a bucket length; a cookie stays valid for one to two buckets.
    pub fn new(key: [u8; 32], bucket: Duration) -> Self {
        let bucket_us = u64::try_from(bucket.as_micros()).unwrap_or(u64::MAX).max(1);
        CookieJar { key, bucket_us }
    }

    /// The cookie for `addr` at `now`.
    pub fn issue(&self, now: Timestamp, addr: SocketAddr) -> CookieBytes {
        self.cookie_for(self.bucket(now), addr)
    }

    /// Checks a cookie presented by `addr` at `now`.
    pub fn check(&self, now: Timestamp, addr: SocketAddr, cookie: &CookieBytes) -> CookieCheck {
        let current = self.bucket(now);
        let presented = u32::from_be_bytes([cookie.0[0], cookie.0[1], cookie.0[2], cookie.0[3]]);
        let age = current.wrapping_sub(presented);
        if age > 1 || self.cookie_for(presented, addr) != *cookie {
            return CookieCheck::Invalid;
        }
        if age == 0 {
            CookieCheck::Fresh
        } else {
            CookieCheck::Aging
        }
    }

    fn bucket(&self, now: Timestamp) -> u32 {
        // Truncation is fine: buckets only need to differ between neighbours.
        (now.as_micros() / self.bucket_us) as u32
    }

    fn cookie_for(&self, bucket: u32, addr: SocketAddr) -> CookieBytes {
        let mut input = [0u8; 1 + 16 + 2 + 4];
        let n = match addr {
            SocketAddr::V4(a) => {
                input[0] = 4;
                input[1..5].copy_from_slice(&a.ip().octets());
                5
            }
            SocketAddr::V6(a) => {
                input[0] = 6;
                input[1..17].copy_from_slice(&a.ip().octets());
                17
            }
        };
        input[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
        input[n + 2..n + 6].copy_from_slice(&bucket.to_be_bytes());
        let mac = blake3::keyed_hash(&self.key, &input[..n + 6]);
        let mut out = [0u8; 20];
        out[..4].copy_from_slice(&bucket.to_be_bytes());
        out[4..].copy_from_slice(&mac.as_bytes()[..16]);
        CookieBytes(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUCKET: Duration = Duration::from_secs(60);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cookie_is_bound_to_address_and_time() {
        let jar = CookieJar::new([9; 32], BUCKET);
        let t0 = Timestamp::from_micros(1_000_000);
        let a = addr("10.0.0.1:5000");
        let c = jar.issue(t0, a);
        assert_eq!(jar.check(t0, a, &c), CookieCheck::Fresh);
        assert_eq!(jar.check(t0 + BUCKET, a, &c), CookieCheck::Aging);
        assert_eq!(jar.check(t0 + BUCKET * 2, a, &c), CookieCheck::Invalid);
        assert_eq!(
            jar.check(t0, addr("10.0.0.1:5001"), &c),
            CookieCheck::Invalid
        );
        assert_eq!(jar.check(t0, addr("[::1]:5000"), &c), CookieCheck::Invalid);
        let other = CookieJar::new([8; 32], BUCKET);
        assert_eq!(other.check(t0, a, &c), CookieCheck::Invalid);
        assert_eq!(
            jar.check(t0, a, &CookieBytes::default()),
            CookieCheck::Invalid
        );
    }

    #[test]
    fn future_buckets_are_invalid() {
        let jar = CookieJar::new([9; 32], BUCKET);
        let a = addr("[2001:db8::1]:9");
        let later = jar.issue(Timestamp::ZERO + BUCKET * 5, a);
        assert_eq!(jar.check(Timestamp::ZERO, a, &later), CookieCheck::Invalid);
    }
}
