//! [`SeqWindow`]: values by sequence number in a window of slots. Sequence numbers are dense,
//! so a lookup is one subtraction and neighbours share cache lines (the piece ring and the
//! cache of verified pieces, looked up on every piece, once kept a hash map and a B-tree).

use std::collections::VecDeque;

/// Values by sequence number, at most `span` consecutive numbers apart: a value further
/// ahead pushes the oldest out, and one `span` or more behind the newest is not kept.
#[derive(Debug)]
pub(super) struct SeqWindow<T> {
    span: u64,
    /// Slot `i` holds the value for `base + i`, if any; the first and last slots are always
    /// full (an empty window has no slots).
    slots: VecDeque<Option<T>>,
    base: u64,
}

impl<T> SeqWindow<T> {
    /// An empty window of at most `span` (at least one) sequence numbers.
    pub(super) fn new(span: u64) -> Self {
        SeqWindow {
            span: span.max(1),
            slots: VecDeque::new(),
            base: 0,
        }
    }

    /// The value for `seq`, if held.
    pub(super) fn get(&self, seq: u64) -> Option<&T> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.slots.get(i)?.as_ref()
    }

    /// Stores `value` for `seq` (replacing any), calling `pushed_out` with each sequence
    /// number whose value the window had to drop to reach it; false, and nothing stored, for
    /// a `seq` too far behind the newest.
    pub(super) fn insert(&mut self, seq: u64, value: T, mut pushed_out: impl FnMut(u64)) -> bool {
        if let Some(newest) = self.newest() {
            if seq < newest && newest - seq >= self.span {
                return false;
            }
        }
        while !self.slots.is_empty() && seq >= self.base.saturating_add(self.span) {
            if let Some(Some(_)) = self.slots.pop_front() {
                pushed_out(self.base);
            }
            self.base += 1;
            self.trim();
        }
        if self.slots.is_empty() {
            self.base = seq;
        }
        if seq < self.base {
            for _ in seq..self.base {
                self.slots.push_front(None);
            }
            self.base = seq;
        }
        let i = (seq - self.base) as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || None);
        }
        self.slots[i] = Some(value);
        true
    }

    /// Drops the value for `seq`, if held.
    pub(super) fn remove(&mut self, seq: u64) {
        if let Some(i) = seq
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
        {
            if let Some(slot) = self.slots.get_mut(i) {
                *slot = None;
            }
        }
        self.trim();
    }

    /// Slots in use, from the oldest value held to the newest.
    #[cfg(test)]
    pub(super) fn width(&self) -> usize {
        self.slots.len()
    }

    fn newest(&self) -> Option<u64> {
        let n = self.slots.len().checked_sub(1)?;
        Some(self.base + n as u64)
    }

    fn trim(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        while let Some(None) = self.slots.back() {
            self.slots.pop_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_out_of_order_and_far_apart_keep_the_window_bounded() {
        let mut w = SeqWindow::new(100);
        let mut out = Vec::new();
        for seq in [50, 47, 53, 49] {
            assert!(w.insert(seq, seq, |s| out.push(s)));
        }
        for seq in 45..56 {
            assert_eq!(w.get(seq), [47, 49, 50, 53].contains(&seq).then_some(&seq));
        }
        assert_eq!(w.width(), 7);
        // Far ahead pushes the oldest out, and says which.
        assert!(w.insert(149, 149, |s| out.push(s)));
        assert_eq!(out, [47, 49]);
        assert!(w.get(50).is_some() && w.width() == 100);
        // Too far behind is refused; a jump of any size is taken.
        assert!(!w.insert(49, 0, |_| {}));
        assert!(w.insert(u64::MAX, 1, |s| out.push(s)));
        assert_eq!(out, [47, 49, 50, 53, 149]);
        assert_eq!((w.get(u64::MAX), w.width()), (Some(&1), 1));
        // Removing trims the window to what is held.
        assert!(w.insert(u64::MAX - 3, 2, |_| {}));
        w.remove(u64::MAX);
        assert_eq!((w.get(u64::MAX - 3), w.width()), (Some(&2), 1));
        w.remove(u64::MAX - 3);
        assert_eq!(w.width(), 0);
    }
}
