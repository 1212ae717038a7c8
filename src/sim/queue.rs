//! The simulator's event queue: events ordered by time, and by insertion among events of the
//! same time (so a run is deterministic). The heap holds only small keys; the events wait in a
//! slab, so sifting moves 24 bytes instead of whole events (the queue holds every datagram in
//! flight: it was an eighth of the simulator's time).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Events of type `T`, taken out earliest first.
pub(super) struct EventQueue<T> {
    heap: BinaryHeap<Reverse<(u64, u64, u32)>>,
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    order: u64,
}

impl<T> EventQueue<T> {
    pub(super) fn new() -> Self {
        EventQueue {
            heap: BinaryHeap::new(),
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
        self.heap.push(Reverse((at, self.order, slot)));
    }

    /// The earliest event and its time.
    pub(super) fn pop(&mut self) -> Option<(u64, T)> {
        let Reverse((at, _, slot)) = self.heap.pop()?;
        let event = self.slots[slot as usize].take()?;
        self.free.push(slot);
        Some((at, event))
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
}
