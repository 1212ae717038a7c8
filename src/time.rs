//! Time as the sans-IO cores see it: a plain count of microseconds handed in by the caller.
//!
//! The cores never read a clock. Runners pass [`Timestamp`]s taken from a monotonic clock
//! ([`MonotonicClock`]); the simulator passes virtual time. Publish times on the wire are a
//! separate thing: microseconds of the publisher's wall clock ([`wall_clock_us`]), used only to
//! measure delay behind the source.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A point in time, in microseconds since an epoch chosen by whoever drives the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch itself.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `us` microseconds after the epoch.
    pub const fn from_micros(us: u64) -> Self {
        Timestamp(us)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(us))
    }
}

/// A monotonic clock that turns [`Instant`]s into [`Timestamp`]s from a fixed start.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    /// A clock whose epoch is now.
    pub fn new() -> Self {
        MonotonicClock {
            start: Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.at(Instant::now())
    }

    /// `instant` as a timestamp of this clock.
    pub fn at(&self, instant: Instant) -> Timestamp {
        let us = instant.saturating_duration_since(self.start).as_micros();
        Timestamp(u64::try_from(us).unwrap_or(u64::MAX))
    }

    /// The instant a timestamp of this clock stands for.
    pub fn instant(&self, t: Timestamp) -> Instant {
        self.start + Duration::from_micros(t.0)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Microseconds since the UNIX epoch on this host's wall clock (the publish-time field).
pub fn wall_clock_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_micros(10);
        assert_eq!((t + Duration::from_micros(5)).as_micros(), 15);
        assert_eq!(
            t.saturating_since(Timestamp::from_micros(20)),
            Duration::ZERO
        );
        assert_eq!(
            Timestamp::from_micros(u64::MAX - 1) + Duration::from_secs(1),
            Timestamp::from_micros(u64::MAX)
        );
    }

    #[test]
    fn monotonic_clock_round_trips_instants() {
        let clock = MonotonicClock::new();
        let later = Instant::now() + Duration::from_millis(3);
        let t = clock.at(later);
        let back = clock.instant(t);
        assert!(back <= later && later - back < Duration::from_micros(2));
    }
}
