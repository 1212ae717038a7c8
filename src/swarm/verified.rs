//! [`VerifiedPieces`]: pieces already verified by some member of the same process, shared so
//! that many members (the simulator's thousands) check each signature once and hold one copy of
//! each piece. A piece byte-for-byte equal to a verified one is as good as verified; any other
//! copy is checked with the channel key as usual.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::ring::PieceBytes;

/// How many of the newest sequence numbers are remembered.
const REMEMBERED: u64 = 8192;

/// A cache of verified pieces by sequence number, shared by cloning.
#[derive(Clone, Default)]
pub struct VerifiedPieces {
    inner: Arc<Mutex<BTreeMap<u64, PieceBytes>>>,
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
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&seq).filter(|held| held.as_ref() == bytes).cloned()
    }

    /// Remembers `bytes` as the verified piece `seq` (the caller checked its signature).
    pub fn insert(&self, seq: u64, bytes: PieceBytes) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(seq, bytes);
        if let Some((&newest, _)) = map.last_key_value() {
            while map
                .first_key_value()
                .is_some_and(|(&oldest, _)| oldest + REMEMBERED < newest)
            {
                map.pop_first();
            }
        }
    }
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
        v.insert(5 + REMEMBERED + 1, Arc::from(&b"later"[..]));
        assert!(v.lookup(5, b"genuine").is_none(), "too old to keep");
    }
}
