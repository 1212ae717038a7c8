//! The jitter buffer: puts verified pieces back in sequence order.
//!
//! A piece is released as soon as every earlier one has been released. A gap is waited for at
//! most the jitter window, counted from when the oldest piece behind it arrived, and then
//! skipped (counted as lost); the buffer never holds more than its capacity.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::time::Timestamp;
use crate::wire::PieceFlags;

/// Outcome of [`JitterBuffer::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Buffered for release.
    Accepted,
    /// Already buffered or released.
    Duplicate,
    /// Behind the release point: its slot was skipped already.
    Late,
}

/// A piece released in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Sequence number.
    pub seq: u64,
    /// Flags.
    pub flags: PieceFlags,
    /// Publisher's wall-clock µs.
    pub publish_time_us: u64,
    /// The payload.
    pub payload: Vec<u8>,
    /// Pieces skipped (lost) just before this one.
    pub skipped: u64,
}

#[derive(Debug)]
struct Slot {
    flags: PieceFlags,
    publish_time_us: u64,
    payload: Vec<u8>,
}

/// Reorders pieces by sequence number within a time window.
#[derive(Debug)]
pub struct JitterBuffer {
    window: Duration,
    capacity: usize,
    next: Option<u64>,
    slots: BTreeMap<u64, Slot>,
    /// Arrival order of buffered pieces; entries already released are removed lazily.
    arrivals: VecDeque<(Timestamp, u64)>,
}

impl JitterBuffer {
    /// Largest gap counted as lost pieces; beyond it a jump is a discontinuity.
    pub const MAX_COUNTED_GAP: u64 = 1 << 16;

    /// A buffer that waits up to `window` for a missing piece and holds at most `capacity`.
    pub fn new(window: Duration, capacity: usize) -> Self {
        JitterBuffer {
            window,
            capacity: capacity.max(1),
            next: None,
            slots: BTreeMap::new(),
            arrivals: VecDeque::new(),
        }
    }

    /// The next sequence number to release, once known.
    pub fn next_seq(&self) -> Option<u64> {
        self.next
    }

    /// Starts the sequence at `seq` if nothing was released yet: earlier pieces will be
    /// refused as late, and a gap before `seq`'s successors is waited for as any other gap.
    pub fn expect_from(&mut self, seq: u64) {
        if self.next.is_none() {
            self.next = Some(seq);
        }
    }

    /// Buffers a piece.
    pub fn insert(
        &mut self,
        now: Timestamp,
        seq: u64,
        flags: PieceFlags,
        publish_time_us: u64,
        payload: &[u8],
    ) -> Insert {
        if self.next.is_some_and(|n| seq < n) {
            return Insert::Late;
        }
        if self.slots.contains_key(&seq) {
            return Insert::Duplicate;
        }
        self.slots.insert(
            seq,
            Slot {
                flags,
                publish_time_us,
                payload: payload.to_vec(),
            },
        );
        self.arrivals.push_back((now, seq));
        Insert::Accepted
    }

    /// The next piece in order, if it is here or the gap before it has timed out.
    pub fn pop(&mut self, now: Timestamp) -> Option<Released> {
        let waited_out = self.deadline().is_some_and(|d| d <= now);
        let (&first, _) = self.slots.first_key_value()?;
        let in_order = match self.next {
            Some(n) => first == n,
            // A stream's very first piece needs no wait; joining mid-stream waits one window
            // so that earlier pieces still in flight are not skipped.
            None => first == 0,
        };
        if !(in_order || waited_out || self.slots.len() > self.capacity) {
            return None;
        }
        let slot = self.slots.remove(&first)?;
        while self
            .arrivals
            .front()
            .is_some_and(|(_, s)| !self.slots.contains_key(s))
        {
            self.arrivals.pop_front();
        }
        let skipped = match self.next {
            Some(n) if first - n <= Self::MAX_COUNTED_GAP => first - n,
            // A larger jump is a new publisher session (its sequence numbers start at its
            // epoch in µs), not loss.
            _ => 0,
        };
        self.next = Some(first + 1);
        Some(Released {
            seq: first,
            flags: slot.flags,
            publish_time_us: slot.publish_time_us,
            payload: slot.payload,
            skipped,
        })
    }

    /// When [`JitterBuffer::pop`] will release something without new input.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.arrivals.front().map(|(t, _)| *t + self.window)
    }

    /// Pieces buffered.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: Duration = Duration::from_millis(100);

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_micros(ms * 1000)
    }

    fn put(j: &mut JitterBuffer, now: Timestamp, seq: u64) -> Insert {
        j.insert(now, seq, PieceFlags::empty(), seq, &seq.to_be_bytes())
    }

    fn drain(j: &mut JitterBuffer, now: Timestamp) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| j.pop(now))
            .map(|r| (r.seq, r.skipped))
            .collect()
    }

    #[test]
    fn reorders_within_the_window() {
        let mut j = JitterBuffer::new(W, 100);
        for s in [0, 2, 1, 3] {
            assert_eq!(put(&mut j, t(0), s), Insert::Accepted);
        }
        assert_eq!(drain(&mut j, t(0)), vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
        assert_eq!(put(&mut j, t(0), 2), Insert::Late);
    }

    #[test]
    fn skips_a_gap_after_the_window() {
        let mut j = JitterBuffer::new(W, 100);
        put(&mut j, t(0), 0);
        put(&mut j, t(10), 2);
        assert_eq!(drain(&mut j, t(10)), vec![(0, 0)]);
        assert_eq!(j.deadline(), Some(t(110)));
        assert_eq!(drain(&mut j, t(109)), vec![]);
        assert_eq!(drain(&mut j, t(110)), vec![(2, 1)]);
        assert_eq!(put(&mut j, t(120), 1), Insert::Late);
        assert_eq!(put(&mut j, t(120), 3), Insert::Accepted);
        assert_eq!(put(&mut j, t(120), 3), Insert::Duplicate);
    }

    #[test]
    fn mid_stream_join_waits_one_window() {
        let mut j = JitterBuffer::new(W, 100);
        put(&mut j, t(0), 501);
        put(&mut j, t(5), 500);
        assert_eq!(drain(&mut j, t(50)), vec![]);
        assert_eq!(drain(&mut j, t(100)), vec![(500, 0), (501, 0)]);
    }

    #[test]
    fn a_new_publisher_session_is_a_discontinuity_not_loss() {
        let mut j = JitterBuffer::new(W, 100);
        put(&mut j, t(0), 0);
        drain(&mut j, t(0));
        put(&mut j, t(1), 5_000_000);
        put(&mut j, t(2), 5_000_001);
        assert_eq!(drain(&mut j, t(101)), vec![(5_000_000, 0), (5_000_001, 0)]);
    }

    #[test]
    fn capacity_bounds_the_buffer() {
        let mut j = JitterBuffer::new(W, 3);
        put(&mut j, t(0), 0);
        drain(&mut j, t(0));
        for s in 2..6 {
            put(&mut j, t(0), s);
        }
        assert_eq!(drain(&mut j, t(0)), vec![(2, 1), (3, 0), (4, 0), (5, 0)]);
    }

    proptest! {
        /// Whatever the arrival order, releases are strictly increasing, and with no loss and
        /// enough time every piece is released exactly once.
        #[test]
        fn releases_in_order(perm in Just((0u64..64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut j = JitterBuffer::new(W, 1000);
            let mut out = Vec::new();
            for (i, s) in perm.iter().enumerate() {
                put(&mut j, t(i as u64), *s);
                out.extend(drain(&mut j, t(i as u64)));
            }
            out.extend(drain(&mut j, t(10_000)));
            let seqs: Vec<u64> = out.iter().map(|x| x.0).collect();
            prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]));
            let lost: u64 = out.iter().map(|x| x.1).sum();
            prop_assert_eq!(seqs.len() as u64 + lost, 64);
        }
    }
}
