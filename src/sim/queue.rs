//! The simulator's event queue: events ordered by time, and by insertion among events of the
//! same time (so a run is deterministic).
//!
//! A timing wheel: the next second of virtual time is cut into slots of 128 µs, each an unsorted
//! list; only the slot being drained is a heap, and a small one. Events further out wait in an
//! overflow heap until the wheel reaches them. Pushing is a list append and popping sifts a heap
//! of a few hundred keys that stay in cache; one heap of every event in flight was a tenth of the
//! simulator's time and grew with the swarm. The keys are small; the events wait in a slab.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Time, insertion order, slab slot: the order events come out in.
type Key = Reverse<(u64, u64, u32)>;

/// log2 of a slot's width in microseconds.
const SLOT_SHIFT: u32 = 7;
/// Slots on the wheel (a power of two): 8192 × 128 µs ≈ 1.05 s ahead.
const SLOTS: u64 = 8192;

/// Events of type `T`, taken out earliest first.
pub(super) struct EventQueue<T> {
    /// The slot being drained (virtual time >> SLOT_SHIFT); its events, and any queued for
    /// earlier times, are in `current`.
    slot: u64,
    current: BinaryHeap<Key>,
    /// Slot `s` in `(slot, slot + SLOTS)` waits in `wheel[s % SLOTS]`.
    wheel: Vec<Vec<Key>>,
    on_wheel: usize,
    /// Events at or beyond `slot + SLOTS`.
    overflow: BinaryHeap<Key>,
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    order: u64,
}

impl<T> EventQueue<T> {
    pub(super) fn new() -> Self {
        EventQueue {
            slot: 0,
            current: BinaryHeap::new(),
            wheel: (0..SLOTS).map(|_| Vec::new()).collect(),
            on_wheel: 0,
            overflow: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            order: 0,
        }
    }

    /// Queues `event` for time `at`, after every event already queued for that time.
    pub(super) fn push(&mut self, at: u64, event: T) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(event);
                s
            }
            None => {
                self.slots.push(Some(event));
                (self.slots.len() - 1) as u32
            }
        };
        self.order += 1;
        self.place(Reverse((at, self.order, slot)));
    }

    /// Puts a key where its time belongs: the current heap, the wheel or the overflow.
    fn place(&mut self, key: Key) {
        let s = key.0 .0 >> SLOT_SHIFT;
        if s <= self.slot {
            self.current.push(key);
        } else if s < self.slot + SLOTS {
            self.wheel[(s % SLOTS) as usize].push(key);
            self.on_wheel += 1;
        } else {
            self.overflow.push(key);
        }
    }

    /// The earliest event and its time.
    pub(super) fn pop(&mut self) -> Option<(u64, T)> {
        loop {
            if let Some(Reverse((at, _, slot))) = self.current.pop() {
                let event = self.slots[slot as usize].take()?;
                self.free.push(slot);
                return Some((at, event));
            }
            if !self.advance() {
                return None;
            }
        }
    }

    /// Moves on to the next slot that holds events; false when none is left.
    fn advance(&mut self) -> bool {
        if self.on_wheel == 0 {
            // Nothing within a second: jump to the overflow's earliest.
            let Some(Reverse((at, _, _))) = self.overflow.peek() else {
                return false;
            };
            self.slot = (at >> SLOT_SHIFT) - 1;
        }
        self.slot += 1;
        let bucket = std::mem::take(&mut self.wheel[(self.slot % SLOTS) as usize]);
        self.on_wheel -= bucket.len();
        // The drained heap's allocation becomes the emptied slot's list.
        let mut spare = std::mem::replace(&mut self.current, BinaryHeap::from(bucket)).into_vec();
        spare.clear();
        self.wheel[(self.slot % SLOTS) as usize] = spare;
        // The wheel now reaches one slot further: bring in what the overflow holds for it
        // (after a jump, that includes the new current slot).
        while let Some(&key) = self.overflow.peek() {
            if key.0 .0 >> SLOT_SHIFT >= self.slot + SLOTS {
                break;
            }
            self.overflow.pop();
            self.place(key);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_first_in_first_out_at_the_same_time() {
        let mut q = EventQueue::new();
        q.push(30, "c");
        q.push(10, "a1");
        q.push(20, "b");
        q.push(10, "a2");
        assert_eq!(q.pop(), Some((10, "a1")));
        q.push(10, "a3"); // a slot is reused; order still holds
        assert_eq!(q.pop(), Some((10, "a2")));
        assert_eq!(q.pop(), Some((10, "a3")));
        assert_eq!(q.pop(), Some((20, "b")));
        assert_eq!(q.pop(), Some((30, "c")));
        assert_eq!(q.pop(), None);
        assert!(q.slots.len() <= 4, "slots are reused: {}", q.slots.len());
    }

    /// Against a plain sorted order, with times spread over the current slot, the wheel and the
    /// overflow, and pushes between pops (as the simulator does: never before the last pop).
    #[test]
    fn the_wheel_gives_the_same_order_as_sorting_by_time_then_insertion() {
        let mut q = EventQueue::new();
        let mut reference: Vec<(u64, u64)> = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut now = 0u64;
        let mut id = 0u64;
        let mut out = Vec::new();
        for round in 0..20_000 {
            for _ in 0..(next() % 3) {
                let ahead = match next() % 10 {
                    0 => 0,
                    1..=6 => next() % 200,
                    7 | 8 => next() % 500_000,
                    _ => next() % 5_000_000,
                };
                q.push(now + ahead, id);
                reference.push((now + ahead, id));
                id += 1;
            }
            if round % 2 == 0 {
                if let Some((at, e)) = q.pop() {
                    assert!(at >= now, "time never goes back");
                    now = at;
                    out.push((at, e));
                }
            }
        }
        // Sparse far events: the wheel empties and jumps to the overflow's earliest slot, which
        // may hold several.
        for gap in [3_000_000, 3_000_050, 9_000_000, 9_000_000, 20_000_000] {
            q.push(now + gap, id);
            reference.push((now + gap, id));
            id += 1;
        }
        while let Some((at, e)) = q.pop() {
            out.push((at, e));
        }
        // Events were pushed in id order, so a stable sort by time is the expected order.
        reference.sort_by_key(|&(at, _)| at);
        assert_eq!(out.len(), reference.len());
        assert_eq!(out, reference);
    }
}
