//! Replay protection: a sliding window over a channel's sequence numbers.
//!
//! The relay remembers which of the last [`SeqWindow::SPAN`] sequence numbers it has forwarded.
//! A piece behind the window is stale; one inside it already marked is a replay. Checking is
//! separate from marking so that only verified pieces move the window.

/// Why a sequence number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqReject {
    /// Already forwarded.
    Duplicate,
    /// Older than anything the window still remembers.
    Stale,
}

/// A bitmap of recently seen sequence numbers.
#[derive(Debug, Clone)]
pub struct SeqWindow {
    highest: Option<u64>,
    bits: [u64; Self::WORDS],
}

impl SeqWindow {
    const WORDS: usize = 64;
    /// How many sequence numbers behind the highest the window remembers.
    pub const SPAN: u64 = (Self::WORDS * 64) as u64;

    /// An empty window: any first sequence number is accepted.
    pub fn new() -> Self {
        SeqWindow {
            highest: None,
            bits: [0; Self::WORDS],
        }
    }

    /// Whether `seq` would be accepted now.
    pub fn check(&self, seq: u64) -> Result<(), SeqReject> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if seq > highest {
            return Ok(());
        }
        if highest - seq >= Self::SPAN {
            return Err(SeqReject::Stale);
        }
        if self.get(seq) {
            Err(SeqReject::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Records `seq` as forwarded. Call only after [`SeqWindow::check`] accepted it.
    pub fn mark(&mut self, seq: u64) {
        match self.highest {
            Some(h) if seq <= h => {}
            Some(h) => {
                let advance = seq - h;
                if advance >= Self::SPAN {
                    self.bits = [0; Self::WORDS];
                } else {
                    for s in h + 1..seq {
                        self.clear(s);
                    }
                }
                self.highest = Some(seq);
            }
            None => self.highest = Some(seq),
        }
        let (w, b) = Self::slot(seq);
        self.bits[w] |= 1 << b;
    }

    fn slot(seq: u64) -> (usize, u32) {
        let i = seq % Self::SPAN;
        ((i / 64) as usize, (i % 64) as u32)
    }

    fn get(&self, seq: u64) -> bool {
        let (w, b) = Self::slot(seq);
        self.bits[w] & (1 << b) != 0
    }

    fn clear(&mut self, seq: u64) {
        let (w, b) = Self::slot(seq);
        self.bits[w] &= !(1 << b);
    }
}

impl Default for SeqWindow {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn duplicates_and_stale_are_refused() {
        let mut w = SeqWindow::new();
        for s in [10, 12, 11] {
            w.check(s).unwrap();
            w.mark(s);
        }
        assert_eq!(w.check(11), Err(SeqReject::Duplicate));
        w.check(9).unwrap();
        w.mark(10 + SeqWindow::SPAN);
        assert_eq!(w.check(10), Err(SeqReject::Stale));
        assert_eq!(w.check(11), Err(SeqReject::Duplicate));
        w.check(13).unwrap();
        w.check(11 + SeqWindow::SPAN).unwrap();
    }

    proptest! {
        /// The window agrees with an exact set model for everything inside its span.
        #[test]
        fn matches_a_set_model(seqs in proptest::collection::vec(0u64..20_000, 1..600)) {
            let mut w = SeqWindow::new();
            let mut seen = BTreeSet::new();
            let mut highest = None::<u64>;
            for s in seqs {
                let expect = match highest {
                    Some(h) if s <= h && h - s >= SeqWindow::SPAN => Err(SeqReject::Stale),
                    _ if seen.contains(&s) => Err(SeqReject::Duplicate),
                    _ => Ok(()),
                };
                prop_assert_eq!(w.check(s), expect);
                if expect.is_ok() {
                    w.mark(s);
                    seen.insert(s);
                    highest = Some(highest.map_or(s, |h| h.max(s)));
                }
            }
        }
    }
}
