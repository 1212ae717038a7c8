//! The piece ring: the last few seconds of verified pieces, by sequence number. It answers
//! "have I got this one?" (duplicates), serves repairs and catch-up, and refuses pieces older
//! than anything it still holds.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::seq_window::SeqWindow;
use crate::time::Timestamp;

/// A verified piece as every member shares it: the datagram's bytes, reference-counted so a
/// piece held in the ring and queued for many links exists once.
pub type PieceBytes = Arc<[u8]>;

#[derive(Debug, Clone)]
struct Entry {
    bytes: PieceBytes,
    /// When the publisher says it published the piece (its clock, µs).
    published_us: u64,
    club: u8,
}

/// The widest window of sequence numbers held at once: a piece further ahead than this of
/// the oldest held pushes the oldest out (at the stream's rate of about a hundred pieces a
/// second, minutes of stream; the ring keeps seconds).
const MAX_SPAN: u64 = 1 << 14;

/// Recent pieces, evicted by age.
#[derive(Debug)]
pub struct PieceRing {
    keep: Duration,
    pieces: SeqWindow<Entry>,
    order: VecDeque<(Timestamp, u64)>,
    /// Sequence numbers at or below this were evicted: a piece this old is stale.
    floor: Option<u64>,
    /// Length of the shortest piece ever stored.
    shortest: Option<usize>,
}

impl PieceRing {
    /// A ring that keeps pieces for `keep` after they arrive.
    pub fn new(keep: Duration) -> Self {
        PieceRing {
            keep,
            pieces: SeqWindow::new(MAX_SPAN),
            order: VecDeque::new(),
            floor: None,
            shortest: None,
        }
    }

    /// Whether `seq` is held.
    pub fn contains(&self, seq: u64) -> bool {
        self.entry(seq).is_some()
    }

    fn entry(&self, seq: u64) -> Option<&Entry> {
        self.pieces.get(seq)
    }

    /// Whether `seq` is older than anything the ring still holds or ever evicted.
    pub fn is_stale(&self, seq: u64) -> bool {
        self.floor.is_some_and(|f| seq <= f)
    }

    /// Stores a piece published at `published_us` (the publisher's clock); false if it was
    /// already held (or is too far behind the newest to keep).
    pub fn insert(
        &mut self,
        now: Timestamp,
        seq: u64,
        club: u8,
        published_us: u64,
        bytes: PieceBytes,
    ) -> bool {
        if self.contains(seq) {
            return false;
        }
        let len = bytes.len();
        let entry = Entry {
            bytes,
            published_us,
            club,
        };
        let floor = &mut self.floor;
        let stored = self.pieces.insert(seq, entry, |old| {
            *floor = Some(floor.map_or(old, |f| f.max(old)));
        });
        if !stored {
            return false;
        }
        self.shortest = Some(self.shortest.map_or(len, |s| s.min(len)));
        self.order.push_back((now, seq));
        self.evict(now);
        true
    }

    /// The piece `seq`, if held.
    pub fn get(&self, seq: u64) -> Option<&PieceBytes> {
        self.entry(seq).map(|e| &e.bytes)
    }

    /// The piece `seq` and when it was published (the publisher's clock, µs), if held.
    pub fn get_published(&self, seq: u64) -> Option<(&PieceBytes, u64)> {
        self.entry(seq).map(|e| (&e.bytes, e.published_us))
    }

    /// The length of the shortest piece ever stored (a lower bound on what any piece the
    /// ring serves costs to send), if any was.
    pub fn shortest(&self) -> Option<usize> {
        self.shortest
    }

    /// Pieces of the clubs `wanted` says yes to that arrived within `within` of `now`, oldest
    /// first.
    pub fn recent(
        &self,
        now: Timestamp,
        within: Duration,
        wanted: impl Fn(u8) -> bool,
    ) -> Vec<(u64, PieceBytes)> {
        let mut out: Vec<(u64, PieceBytes)> = self
            .order
            .iter()
            .rev()
            .take_while(|(t, _)| now.saturating_since(*t) <= within)
            .filter_map(|(_, s)| {
                let e = self.entry(*s)?;
                wanted(e.club).then(|| (*s, e.bytes.clone()))
            })
            .collect();
        out.sort_by_key(|(s, _)| *s);
        out
    }

    fn evict(&mut self, now: Timestamp) {
        while let Some(&(t, s)) = self.order.front() {
            if now.saturating_since(t) <= self.keep {
                break;
            }
            self.order.pop_front();
            self.pieces.remove(s);
            self.floor = Some(self.floor.map_or(s, |f| f.max(s)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_micros(ms * 1000)
    }

    #[test]
    fn holds_recent_pieces_and_evicts_by_age() {
        let mut r = PieceRing::new(Duration::from_millis(100));
        let b: PieceBytes = Arc::from(&[1u8, 2, 3][..]);
        assert!(r.insert(at(0), 10, 0, 7, b.clone()));
        assert!(!r.insert(at(1), 10, 0, 7, b.clone()), "duplicate");
        assert!(r.insert(at(50), 11, 1, 9, b.clone()));
        assert_eq!(r.get_published(10).map(|(_, t)| t), Some(7));
        assert_eq!(r.get_published(11).map(|(_, t)| t), Some(9));
        assert_eq!(
            r.recent(at(60), Duration::from_millis(100), |c| c == 1)
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            vec![11]
        );
        assert_eq!(r.shortest(), Some(3));
        r.insert(at(140), 12, 0, 12, Arc::from(&[1u8, 2][..]));
        assert_eq!(r.shortest(), Some(2));
        assert!(!r.contains(10) && r.contains(11));
        assert!(r.is_stale(10) && !r.is_stale(11));
    }

    #[test]
    fn pieces_out_of_order_and_far_apart_keep_the_window_bounded() {
        let mut r = PieceRing::new(Duration::from_secs(10));
        let b = |n: u8| -> PieceBytes { Arc::from(&[n][..]) };
        // Out of order, with gaps, below and above the first.
        for seq in [100, 97, 103, 99] {
            assert!(r.insert(at(0), seq, 0, seq, b(seq as u8)));
        }
        assert!(!r.insert(at(0), 97, 0, 0, b(0)), "duplicate");
        for seq in 95..106 {
            assert_eq!(r.contains(seq), [97, 99, 100, 103].contains(&seq), "{seq}");
        }
        assert_eq!(r.get(99).map(|p| p[0]), Some(99));
        assert!(r.pieces.width() <= 7, "window {}", r.pieces.width());
        // A piece far ahead pushes the oldest out (they become stale), within the span.
        let far = 99 + MAX_SPAN;
        assert!(r.insert(at(1), far, 0, far, b(1)));
        assert!(!r.contains(97) && !r.contains(99) && r.contains(100) && r.contains(far));
        assert!(r.is_stale(99) && !r.is_stale(100));
        assert!(r.pieces.width() as u64 <= MAX_SPAN);
        // One far behind the newest is not kept; a jump of any size is.
        assert!(!r.insert(at(1), 5, 0, 5, b(5)));
        assert!(!r.contains(5));
        assert!(r.insert(at(2), u64::MAX - 1, 0, 0, b(2)));
        assert!(r.contains(u64::MAX - 1) && !r.contains(far) && r.pieces.width() == 1);
        // Eviction by age empties the window.
        assert!(r.insert(at(20_000), u64::MAX, 0, 0, b(3)));
        assert!(!r.contains(u64::MAX - 1) && r.contains(u64::MAX) && r.pieces.width() == 1);
    }
}
