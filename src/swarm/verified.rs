//! [`VerifiedPieces`]: pieces already verified by some member of the same process, shared so
//! that many members (the simulator's thousands) check each signature once and hold one copy of
//! each piece. A piece byte-for-byte equal to a verified one is as good as verified; any other
//! copy is checked with the channel key as usual.

use std::sync::{Arc, Mutex};

use super::ring::PieceBytes;
use super::seq_window::SeqWindow;

/// How many of the newest sequence numbers are remembered.
const REMEMBERED: u64 = 8192;

/// A cache of verified pieces by sequence number, shared by cloning.
#[derive(Clone)]
pub struct VerifiedPieces {
    inner: Arc<Mutex<SeqWindow<PieceBytes>>>,
}

impl Default for VerifiedPieces {
    fn default() -> Self {
        VerifiedPieces {
            inner: Arc::new(Mutex::new(SeqWindow::new(REMEMBERED + 1))),
        }
    }
}

impl std::fmt::Debug for VerifiedPieces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedPieces").finish_non_exhaustive()
    }
}

impl VerifiedPieces {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared copy of piece `seq` if `bytes` are exactly the verified piece.
    pub fn lookup(&self, seq: u64, bytes: &[u8]) -> Option<PieceBytes> {
        let window = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        window
            .get(seq)
            .filter(|held| same_bytes(held, bytes))
            .cloned()
    }

    /// Remembers `bytes` as the verified piece `seq` (the caller checked its signature).
    pub fn insert(&self, seq: u64, bytes: PieceBytes) {
        let mut window = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        window.insert(seq, bytes, |_| {});
    }
}

/// Whether two byte strings are equal, at once when they are the same memory (in the
/// simulator a piece travels as one shared copy).
pub(super) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    std::ptr::eq(a, b) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_identical_bytes_are_found_and_old_ones_go() {
        let v = VerifiedPieces::new();
        v.insert(5, Arc::from(&b"genuine"[..]));
        assert!(v.lookup(5, b"genuine").is_some());
        assert!(v.lookup(5, b"forged!").is_none());
        assert!(v.lookup(6, b"genuine").is_none());
        v.insert(3, Arc::from(&b"earlier"[..]));
        assert!(v.lookup(3, b"earlier").is_some() && v.lookup(5, b"genuine").is_some());
        assert!(v.lookup(4, b"genuine").is_none());
        v.insert(5 + REMEMBERED, Arc::from(&b"later"[..]));
        assert!(v.lookup(5, b"genuine").is_some(), "still within the window");
        assert!(v.lookup(3, b"earlier").is_none(), "too old to keep");
        v.insert(2, Arc::from(&b"old"[..]));
        assert!(v.lookup(2, b"old").is_none(), "too old to keep");
        v.insert(6 + REMEMBERED, Arc::from(&b"next"[..]));
        assert!(v.lookup(5, b"genuine").is_none() && v.lookup(5 + REMEMBERED, b"later").is_some());
        // A jump of any size starts over; the window stays bounded.
        v.insert(u64::MAX, Arc::from(&b"last"[..]));
        assert!(v.lookup(u64::MAX, b"last").is_some());
        assert!(v.lookup(6 + REMEMBERED, b"next").is_none());
        let held = v.inner.lock().unwrap().width() as u64;
        assert!(held <= REMEMBERED + 1, "{held}");
    }
}
