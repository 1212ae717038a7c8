//! Pooled, reference-counted packet buffers.
//!
//! A piece is received once into a slot of the pool; every send of it, on any worker, refers to
//! that slot by a [`PieceRef`] (an index, not a pointer), and the slot returns to the free list
//! when the last reference is released. Allocation happens once, when the pool is built; the
//! per-packet path only moves indices through a lock-free queue.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crossbeam::queue::ArrayQueue;

use crate::time::Timestamp;

/// Bytes per slot: more than any valid datagram, so longer ones arrive cut short and fail to
/// parse.
pub(crate) const SLOT_LEN: usize = 2048;

struct Slot {
    data: UnsafeCell<[u8; SLOT_LEN]>,
    refs: AtomicU32,
    offset: AtomicU32,
    len: AtomicU32,
    received_at: AtomicU64,
    first_sent: AtomicBool,
    /// Latest time (µs, +1 so that zero means never) any worker handed a copy to the kernel.
    last_sent: AtomicU64,
}

// SAFETY: `data` is written only through a `SlotWriter`, which exists only while the slot is
// off the free list and unshared (refs == 1, one owner); after `freeze` it is only read, and the
// hand-off to other threads goes through a channel (release/acquire), so no data race exists.
unsafe impl Sync for Slot {}

/// A fixed set of buffers shared by all workers.
pub(crate) struct BufferPool {
    slots: Box<[Slot]>,
    free: ArrayQueue<u32>,
}

/// Exclusive access to a slot being filled.
pub(crate) struct SlotWriter {
    index: u32,
}

/// A shared, read-only reference to a filled slot. Not `Clone`: share with
/// [`BufferPool::share`], and give every reference back with [`BufferPool::release`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PieceRef {
    index: u32,
}

impl BufferPool {
    /// A pool of `slots` buffers (at least one).
    pub(crate) fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        let free = ArrayQueue::new(slots);
        for i in 0..slots {
            // Capacity equals the number of slots, so every push fits.
            let _ = free.push(i as u32);
        }
        BufferPool {
            slots: (0..slots)
                .map(|_| Slot {
                    data: UnsafeCell::new([0; SLOT_LEN]),
                    refs: AtomicU32::new(0),
                    offset: AtomicU32::new(0),
                    len: AtomicU32::new(0),
                    received_at: AtomicU64::new(0),
                    first_sent: AtomicBool::new(false),
                    last_sent: AtomicU64::new(0),
                })
                .collect(),
            free,
        }
    }

    /// Slots free now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.free.len()
    }

    /// Takes a free slot to fill; `None` when every slot is in use (the caller drops input).
    pub(crate) fn take(&self) -> Option<SlotWriter> {
        let index = self.free.pop()?;
        let slot = &self.slots[index as usize];
        slot.refs.store(1, Ordering::Relaxed);
        slot.first_sent.store(false, Ordering::Relaxed);
        slot.last_sent.store(0, Ordering::Relaxed);
        Some(SlotWriter { index })
    }

    /// The writable bytes of a slot being filled.
    pub(crate) fn buf_mut<'a>(&'a self, w: &'a mut SlotWriter) -> &'a mut [u8; SLOT_LEN] {
        // SAFETY: a SlotWriter is the only handle to its slot (taken off the free list, not
        // yet frozen), and the returned borrow is tied to the writer's unique borrow.
        unsafe { &mut *self.slots[w.index as usize].data.get() }
    }

    /// A raw pointer to the slot's bytes, for kernel interfaces that fill it (recvmmsg).
    pub(crate) fn as_mut_ptr(&self, w: &mut SlotWriter) -> *mut u8 {
        self.slots[w.index as usize].data.get().cast()
    }

    /// Ends writing: the first `len` bytes are the datagram, received at `received_at`.
    pub(crate) fn freeze(&self, w: SlotWriter, len: usize, received_at: Timestamp) -> PieceRef {
        self.freeze_at(w, 0, len, received_at)
    }

    /// Ends writing: `len` bytes from `offset` are the datagram (io_uring puts a header first).
    pub(crate) fn freeze_at(
        &self,
        w: SlotWriter,
        offset: usize,
        len: usize,
        received_at: Timestamp,
    ) -> PieceRef {
        let slot = &self.slots[w.index as usize];
        let offset = offset.min(SLOT_LEN);
        slot.offset.store(offset as u32, Ordering::Relaxed);
        slot.len
            .store(len.min(SLOT_LEN - offset) as u32, Ordering::Relaxed);
        slot.received_at
            .store(received_at.as_micros(), Ordering::Relaxed);
        PieceRef { index: w.index }
    }

    /// Returns an unused writer's slot.
    pub(crate) fn discard(&self, w: SlotWriter) {
        self.slots[w.index as usize]
            .refs
            .store(0, Ordering::Relaxed);
        let _ = self.free.push(w.index);
    }

    /// The datagram in a slot.
    pub(crate) fn bytes(&self, r: &PieceRef) -> &[u8] {
        let slot = &self.slots[r.index as usize];
        let offset = slot.offset.load(Ordering::Relaxed) as usize;
        let len = slot.len.load(Ordering::Relaxed) as usize;
        // SAFETY: a PieceRef exists only for a frozen slot, which nobody writes until every
        // reference is released; shared reads are fine.
        let data: &[u8; SLOT_LEN] = unsafe { &*slot.data.get() };
        &data[offset..offset + len]
    }

    /// Bytes `offset..offset + len` of a slot being filled, once the kernel has written them.
    pub(crate) fn written<'a>(&'a self, w: &'a SlotWriter, offset: usize, len: usize) -> &'a [u8] {
        let end = (offset + len).min(SLOT_LEN);
        // SAFETY: the writer is the only handle to the slot; the kernel's write completed
        // before its completion entry was read, and nothing writes while this borrow lives.
        let data: &[u8; SLOT_LEN] = unsafe { &*self.slots[w.index as usize].data.get() };
        &data[offset.min(end)..end]
    }

    /// When the datagram in a slot was received.
    pub(crate) fn received_at(&self, r: &PieceRef) -> Timestamp {
        Timestamp::from_micros(
            self.slots[r.index as usize]
                .received_at
                .load(Ordering::Relaxed),
        )
    }

    /// True for exactly one caller per filling of the slot: the first to send it.
    pub(crate) fn claim_first_send(&self, r: &PieceRef) -> bool {
        !self.slots[r.index as usize]
            .first_sent
            .swap(true, Ordering::Relaxed)
    }

    /// Records that copies of the slot were handed to the kernel at `at`.
    pub(crate) fn note_sent(&self, r: &PieceRef, at: Timestamp) {
        self.slots[r.index as usize]
            .last_sent
            .fetch_max(at.as_micros() + 1, Ordering::Relaxed);
    }

    /// One more reference to the same slot.
    pub(crate) fn share(&self, r: &PieceRef) -> PieceRef {
        self.slots[r.index as usize]
            .refs
            .fetch_add(1, Ordering::Relaxed);
        PieceRef { index: r.index }
    }

    /// Gives a reference back. For the last one, the slot is free again and the answer says
    /// whether any copy was sent and when the datagram was received.
    pub(crate) fn release(&self, r: PieceRef) -> Release {
        let slot = &self.slots[r.index as usize];
        // AcqRel: every reader's use happens before the slot is reused for writing.
        if slot.refs.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Release::Shared;
        }
        let last_sent = slot.last_sent.load(Ordering::Relaxed);
        let last = Release::Last {
            last_sent: last_sent.checked_sub(1).map(Timestamp::from_micros),
            received_at: Timestamp::from_micros(slot.received_at.load(Ordering::Relaxed)),
        };
        let _ = self.free.push(r.index);
        last
    }
}

/// What releasing a reference did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// Other references remain.
    Shared,
    /// That was the last; the slot is free.
    Last {
        /// When the last copy was handed to the kernel, by any worker (`None`: never sent).
        last_sent: Option<Timestamp>,
        /// When the datagram was received.
        received_at: Timestamp,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn slots_cycle_through_shares_and_releases() {
        let pool = BufferPool::new(2);
        let mut w = pool.take().unwrap();
        pool.buf_mut(&mut w)[..3].copy_from_slice(b"abc");
        let r = pool.freeze(w, 3, Timestamp::from_micros(7));
        assert_eq!(pool.bytes(&r), b"abc");
        assert_eq!(pool.received_at(&r), Timestamp::from_micros(7));
        let a = pool.share(&r);
        let b = pool.share(&r);
        assert_eq!(pool.available(), 1);
        assert!(pool.claim_first_send(&a));
        assert!(!pool.claim_first_send(&r));
        pool.note_sent(&a, Timestamp::from_micros(20));
        pool.note_sent(&r, Timestamp::from_micros(10));
        assert_eq!(pool.release(r), Release::Shared);
        assert_eq!(pool.release(a), Release::Shared);
        let last = Release::Last {
            last_sent: Some(Timestamp::from_micros(20)),
            received_at: Timestamp::from_micros(7),
        };
        assert_eq!(pool.release(b), last);
        assert_eq!(pool.available(), 2);
    }

    #[test]
    fn exhaustion_is_reported_not_fatal() {
        let pool = BufferPool::new(1);
        let w = pool.take().unwrap();
        assert!(pool.take().is_none());
        pool.discard(w);
        assert!(pool.take().is_some());
    }

    #[test]
    fn references_cross_threads_and_return_every_slot() {
        let pool = Arc::new(BufferPool::new(64));
        let (tx, rx) = crossbeam::channel::bounded::<PieceRef>(1024);
        let reader = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                let mut sum = 0u64;
                for r in rx {
                    sum += u64::from(pool.bytes(&r)[0]);
                    pool.release(r);
                }
                sum
            })
        };
        let mut expected = 0u64;
        for i in 0..10_000u32 {
            let mut w = loop {
                if let Some(w) = pool.take() {
                    break w;
                }
                std::thread::yield_now();
            };
            pool.buf_mut(&mut w)[0] = (i % 251) as u8;
            expected += u64::from(i % 251);
            let r = pool.freeze(w, 1, Timestamp::ZERO);
            let copy = pool.share(&r);
            tx.send(copy).unwrap();
            pool.release(r);
        }
        drop(tx);
        assert_eq!(reader.join().unwrap(), expected);
        assert_eq!(pool.available(), 64);
    }
}
