//! The piece ring: the last few seconds of verified pieces, by sequence number. It answers
//! "have I got this one?" (duplicates), serves repairs and catch-up, and refuses pieces older
//! than anything it still holds.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

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

/// Recent pieces, evicted by age.
#[derive(Debug)]
pub struct PieceRing {
    keep: Duration,
    pieces: HashMap<u64, Entry>,
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
            pieces: HashMap::new(),
            order: VecDeque::new(),
            floor: None,
            shortest: None,
        }
    }

    /// Whether `seq` is held.
    pub fn contains(&self, seq: u64) -> bool {
        self.pieces.contains_key(&seq)
    }

    /// Whether `seq` is older than anything the ring still holds or ever evicted.
    pub fn is_stale(&self, seq: u64) -> bool {
        self.floor.is_some_and(|f| seq <= f)
    }

    /// Stores a piece published at `published_us` (the publisher's clock); false if it was
    /// already held.
    pub fn insert(
        &mut self,
        now: Timestamp,
        seq: u64,
        club: u8,
        published_us: u64,
        bytes: PieceBytes,
    ) -> bool {
        if self.pieces.contains_key(&seq) {
            return false;
        }
        self.shortest = Some(self.shortest.map_or(bytes.len(), |s| s.min(bytes.len())));
        self.pieces.insert(
            seq,
            Entry {
                bytes,
                published_us,
                club,
            },
        );
        self.order.push_back((now, seq));
        self.evict(now);
        true
    }

    /// The piece `seq`, if held.
    pub fn get(&self, seq: u64) -> Option<&PieceBytes> {
        self.pieces.get(&seq).map(|e| &e.bytes)
    }

    /// The piece `seq` and when it was published (the publisher's clock, µs), if held.
    pub fn get_published(&self, seq: u64) -> Option<(&PieceBytes, u64)> {
        self.pieces.get(&seq).map(|e| (&e.bytes, e.published_us))
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
                let e = self.pieces.get(s)?;
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
            self.pieces.remove(&s);
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
}
