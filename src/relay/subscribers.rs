//! The subscribers of one channel: a dense address list for fan-out and an index for control
//! messages, each entry with the time its consent expires.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::time::Timestamp;

/// Outcome of [`Subscribers::upsert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// A new subscriber.
    Added,
    /// An existing subscriber's consent was refreshed.
    Refreshed,
    /// The table is full; nothing changed.
    Full,
}

/// Subscribers of one channel.
#[derive(Debug, Default)]
pub struct Subscribers {
    addrs: Vec<SocketAddr>,
    expires: Vec<Timestamp>,
    /// Copies the kernel refused since the subscriber's last SUBSCRIBE or KEEPALIVE.
    failures: Vec<u32>,
    index: HashMap<SocketAddr, usize>,
}

impl Subscribers {
    /// Adds `addr` or refreshes it, with consent until `expires`; at most `limit` entries.
    pub fn upsert(&mut self, addr: SocketAddr, expires: Timestamp, limit: usize) -> Upsert {
        if let Some(&i) = self.index.get(&addr) {
            self.expires[i] = expires;
            self.failures[i] = 0;
            return Upsert::Refreshed;
        }
        if self.addrs.len() >= limit {
            return Upsert::Full;
        }
        self.index.insert(addr, self.addrs.len());
        self.addrs.push(addr);
        self.expires.push(expires);
        self.failures.push(0);
        Upsert::Added
    }

    /// Refreshes an existing subscriber; false if `addr` is not one.
    pub fn refresh(&mut self, addr: SocketAddr, expires: Timestamp) -> bool {
        match self.index.get(&addr) {
            Some(&i) => {
                self.expires[i] = expires;
                self.failures[i] = 0;
                true
            }
            None => false,
        }
    }

    /// Counts a refused copy to `addr`; removes the subscriber and returns true when that makes
    /// `limit` since its last keepalive.
    pub fn fail(&mut self, addr: SocketAddr, limit: u32) -> bool {
        let Some(&i) = self.index.get(&addr) else {
            return false;
        };
        self.failures[i] += 1;
        if self.failures[i] < limit {
            return false;
        }
        self.index.remove(&addr);
        self.swap_remove(i);
        true
    }

    /// Removes `addr`; false if it was not subscribed.
    pub fn remove(&mut self, addr: SocketAddr) -> bool {
        match self.index.remove(&addr) {
            Some(i) => {
                self.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Removes every subscriber whose consent expired at or before `now`; returns how many.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let before = self.addrs.len();
        let mut i = 0;
        while i < self.addrs.len() {
            if self.expires[i] <= now {
                self.index.remove(&self.addrs[i]);
                self.swap_remove(i);
            } else {
                i += 1;
            }
        }
        before - self.addrs.len()
    }

    /// Every subscriber's address, in no particular order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Removes entry `i` (already gone from the index) by moving the last entry into its place.
    fn swap_remove(&mut self, i: usize) {
        self.addrs.swap_remove(i);
        self.expires.swap_remove(i);
        self.failures.swap_remove(i);
        if let Some(moved) = self.addrs.get(i) {
            self.index.insert(*moved, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn t(s: u64) -> Timestamp {
        Timestamp::from_micros(s * 1_000_000)
    }

    #[test]
    fn upsert_refresh_remove_expire() {
        let mut s = Subscribers::default();
        assert_eq!(s.upsert(a(1), t(5), 3), Upsert::Added);
        assert_eq!(s.upsert(a(2), t(10), 3), Upsert::Added);
        assert_eq!(s.upsert(a(3), t(5), 3), Upsert::Added);
        assert_eq!(s.upsert(a(4), t(5), 3), Upsert::Full);
        assert_eq!(s.upsert(a(1), t(20), 3), Upsert::Refreshed);
        assert!(s.refresh(a(3), t(6)));
        assert!(!s.refresh(a(9), t(6)));
        assert_eq!(s.expire(t(6)), 1); // a(3)
        assert_eq!(s.len(), 2);
        assert!(s.remove(a(1)));
        assert!(!s.remove(a(1)));
        assert_eq!(s.addrs(), &[a(2)]);
        assert_eq!(s.expire(t(10)), 1);
        assert!(s.is_empty());
    }

    #[test]
    fn a_subscriber_that_keeps_failing_is_cut_and_keepalive_forgives() {
        let mut s = Subscribers::default();
        s.upsert(a(1), t(9), 10);
        s.upsert(a(2), t(9), 10);
        assert!(!s.fail(a(1), 3));
        assert!(!s.fail(a(1), 3));
        assert!(s.refresh(a(1), t(10))); // consent renewed: the count starts again
        assert!(!s.fail(a(1), 3));
        assert!(!s.fail(a(1), 3));
        assert!(s.fail(a(1), 3));
        assert_eq!(s.addrs(), &[a(2)]);
        assert!(!s.fail(a(1), 3), "already gone");
    }

    #[test]
    fn index_stays_consistent_after_swap_removes() {
        let mut s = Subscribers::default();
        for p in 0..50 {
            s.upsert(a(p), t(u64::from(p % 5)), 100);
        }
        s.expire(t(2)); // removes p%5 in {0,1,2}
        assert_eq!(s.len(), 20);
        for p in 0..50u16 {
            let present = s.addrs().contains(&a(p));
            assert_eq!(present, p % 5 >= 3);
            assert_eq!(s.refresh(a(p), t(9)), present);
        }
    }
}
