//! The io_uring backend: multishot `recvmsg` over a provided-buffer ring whose buffers are
//! pool slots, and fan-out as one `sendmsg` (or `sendmsg` zero-copy) request per copy, queued
//! during a round and submitted with one system call.
//!
//! Receive: the kernel picks a free slot from the ring for each datagram and reports its buffer
//! id; the datagram stays in that slot. A slot the relay keeps (an accepted piece) is replaced
//! in the ring by a fresh one from the pool; others go straight back into the ring. Send: every
//! queued copy points at the same slot; one pool reference per fan-out is held until the last
//! copy's completion (or, with zero-copy, its notification), then released.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::sockaddr;
use crate::engine::pool::{BufferPool, PieceRef, Release, SlotWriter, SLOT_LEN};
use crate::time::{MonotonicClock, Timestamp};
use crate::wire::ChannelId;

/// Provided buffers per worker ring (a power of two).
const RING_BUFFERS: u16 = 256;
/// Buffer group id of the ring (one ring per io_uring instance).
const BUF_GROUP: u16 = 0;
/// Submission queue entries.
const SQ_ENTRIES: u32 = 2048;
/// Copies in flight per worker at most.
const SEND_SLOTS: usize = 8192;
/// Completion queue entries: room for every copy's two completions (zero-copy) and a full
/// ring of receives, so the kernel never has to spill into its overflow list.
const CQ_ENTRIES: u32 =
    ((2 * SEND_SLOTS + 2 * RING_BUFFERS as usize + 64).next_power_of_two()) as u32;

const TAG_RECV: u64 = 1 << 62;
const TAG_WAKE: u64 = 2 << 62;
const TAG_SEND: u64 = 3 << 62;
const TAG_MASK: u64 = 3 << 62;

/// Whether zero-copy sends are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroCopy {
    /// Decide from the payload size: pieces (≤ 1232 bytes) are copied, which measured cheaper
    /// than pinning pages for every copy.
    #[default]
    Auto,
    /// Always `IORING_OP_SENDMSG_ZC`.
    On,
    /// Never.
    Off,
}

impl ZeroCopy {
    /// The name used in flags and config files.
    pub fn name(self) -> &'static str {
        match self {
            ZeroCopy::Auto => "auto",
            ZeroCopy::On => "on",
            ZeroCopy::Off => "off",
        }
    }
}

impl std::str::FromStr for ZeroCopy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ZeroCopy::Auto),
            "on" => Ok(ZeroCopy::On),
            "off" => Ok(ZeroCopy::Off),
            _ => Err(format!("{s:?} is not a zero-copy mode (auto, on, off)")),
        }
    }
}

/// Checks that this kernel supports what the backend needs (io_uring with provided-buffer
/// rings and multishot receive: Linux 6.0 or later). The error says what is missing.
pub fn probe() -> io::Result<()> {
    let ring: IoUring = IoUring::builder().build(8)?;
    let bufs = BufRing::new()?;
    bufs.register(&ring)?;
    ring.submitter().unregister_buf_ring(BUF_GROUP)?;
    let params = ring.params();
    if !params.is_feature_fast_poll() || !params.is_feature_ext_arg() {
        return Err(io::Error::other(
            "io_uring lacks fast poll or timed waits (kernel too old)",
        ));
    }
    // Multishot recvmsg (Linux 6.0) and zero-copy sendmsg (6.1) are the newest opcodes used.
    let mut supported = io_uring::Probe::new();
    ring.submitter().register_probe(&mut supported)?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "recvmsg"),
        (opcode::SendMsgZc::CODE, "sendmsg zero-copy"),
    ] {
        if !supported.is_supported(code) {
            return Err(io::Error::other(format!(
                "io_uring lacks {name} (kernel too old)"
            )));
        }
    }
    Ok(())
}

/// A datagram received into a pool slot.
pub(crate) struct Received {
    /// The slot; freeze it to keep the datagram, or hand it back with [`UringIo::give_back`].
    pub(crate) writer: SlotWriter,
    /// Where the datagram starts in the slot.
    pub(crate) offset: usize,
    /// Its length.
    pub(crate) len: usize,
    /// Its source.
    pub(crate) from: Option<SocketAddr>,
}

/// The kernel-visible state of one queued copy; boxed so addresses stay put until completion.
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    group: u32,
}

/// One fan-out in flight: its pool reference and the copies not yet completed.
struct Group {
    piece: Option<PieceRef>,
    channel: ChannelId,
    remaining: u32,
    sent: u32,
    bytes: usize,
}

/// The provided-buffer ring: 16-byte entries in page-aligned memory shared with the kernel.
struct BufRing {
    base: *mut types::BufRingEntry,
    bytes: usize,
    tail: u16,
}

impl BufRing {
    fn new() -> io::Result<Self> {
        let bytes = usize::from(RING_BUFFERS) * size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BufRing {
            base: base.cast(),
            bytes,
            tail: 0,
        })
    }

    /// Registers the ring as buffer group [`BUF_GROUP`] of `ring`. Whoever registers must
    /// unregister before this `BufRing` is dropped (both callers do).
    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the memory is mapped for RING_BUFFERS entries and, per the contract above,
        // stays mapped until the group is unregistered.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.base as u64,
                RING_BUFFERS,
                BUF_GROUP,
                0,
            )
        }
    }

    /// Adds a buffer at the tail (visible to the kernel after [`BufRing::publish`]).
    fn push(&mut self, addr: *mut u8, len: u32, bid: u16) {
        let index = usize::from(self.tail & (RING_BUFFERS - 1));
        // SAFETY: index < RING_BUFFERS, the number of entries mapped at base.
        let entry = unsafe { &mut *self.base.add(index) };
        entry.set_addr(addr as u64);
        entry.set_len(len);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: base is the first entry of the registered ring, so its resv field is the
        // ring's tail, which the kernel reads atomically; u16 is aligned within the entry.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.base) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new(); the ring is unregistered first
        // (UringIo's drop order) or was never registered.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

/// One worker's io_uring.
pub(crate) struct UringIo {
    ring: IoUring,
    fd: RawFd,
    waker_fd: RawFd,
    zerocopy: bool,
    bufs: BufRing,
    lent: Vec<Option<SlotWriter>>,
    free_bids: Vec<u16>,
    recv_hdr: Box<libc::msghdr>,
    recv_armed: bool,
    recv_paused_until: Option<Instant>,
    wake_armed: bool,
    wake_buf: Box<u64>,
    sends: Box<[SendSlot]>,
    free_sends: Vec<u32>,
    groups: Vec<Group>,
    free_groups: Vec<u32>,
    completions: Vec<(u64, i32, u32)>,
    /// Copies the kernel refused since the last [`UringIo::drain_failures`].
    failures: Vec<(ChannelId, SocketAddr)>,
}

/// What a completed fan-out produced, for the worker's accounting.
pub(crate) struct SendDone {
    /// The pool's answer to releasing the fan-out's reference.
    pub(crate) release: Release,
    /// Receive → this completion, µs, if this was the piece's first fan-out to complete.
    pub(crate) first_send_us: Option<u64>,
    /// Copies the kernel accepted.
    pub(crate) sent: u32,
    /// Bytes per copy.
    pub(crate) bytes: usize,
}

impl UringIo {
    /// Sets up a ring on socket `fd`, lends it `RING_BUFFERS` pool slots and arms the
    /// multishot receive and the doorbell (`waker_fd`, an eventfd).
    pub(crate) fn new(
        fd: RawFd,
        waker_fd: RawFd,
        pool: &BufferPool,
        zerocopy: ZeroCopy,
    ) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)?;
        let bufs = BufRing::new()?;
        bufs.register(&ring)?;
        // SAFETY: msghdr is plain old data; zero is a valid empty header.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let sends = (0..SEND_SLOTS)
            .map(|_| SendSlot {
                // SAFETY: as above.
                hdr: unsafe { std::mem::zeroed() },
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                addr: sockaddr::zeroed(),
                group: 0,
            })
            .collect();
        let mut io = UringIo {
            ring,
            fd,
            waker_fd,
            zerocopy: zerocopy == ZeroCopy::On,
            bufs,
            lent: (0..RING_BUFFERS).map(|_| None).collect(),
            free_bids: (0..RING_BUFFERS).rev().collect(),
            recv_hdr,
            recv_armed: false,
            recv_paused_until: None,
            wake_armed: false,
            wake_buf: Box::new(0),
            sends,
            free_sends: (0..SEND_SLOTS as u32).rev().collect(),
            groups: Vec::with_capacity(SEND_SLOTS),
            free_groups: Vec::with_capacity(SEND_SLOTS),
            completions: Vec::with_capacity(CQ_ENTRIES as usize),
            failures: Vec::with_capacity(SEND_SLOTS),
        };
        io.submit(pool, None)?;
        Ok(io)
    }

    /// Sends queued or submitted whose completion has not been reaped yet.
    pub(crate) fn sends_in_flight(&self) -> usize {
        SEND_SLOTS - self.free_sends.len()
    }

    /// Lends free pool slots to the ring for every buffer id not in it.
    pub(crate) fn refill(&mut self, pool: &BufferPool) {
        let mut pushed = false;
        while let Some(&bid) = self.free_bids.last() {
            let Some(w) = pool.take() else { break };
            self.free_bids.pop();
            self.lend(pool, w, bid);
            pushed = true;
        }
        if pushed {
            self.bufs.publish();
        }
    }

    fn lend(&mut self, pool: &BufferPool, mut w: SlotWriter, bid: u16) {
        let addr = pool.as_mut_ptr(&mut w);
        self.bufs.push(addr, SLOT_LEN as u32, bid);
        self.lent[usize::from(bid)] = Some(w);
    }

    /// Returns a slot the relay did not keep to the ring (or to the pool if the ring is full).
    pub(crate) fn give_back(&mut self, pool: &BufferPool, w: SlotWriter) {
        match self.free_bids.pop() {
            Some(bid) => {
                self.lend(pool, w, bid);
                self.bufs.publish();
            }
            None => pool.discard(w),
        }
    }

    /// Queues the multishot receive and the doorbell poll if they are not armed. A full
    /// kernel (EAGAIN, EBUSY) leaves them for the next round.
    fn arm(&mut self) -> io::Result<()> {
        let recv_ready = self.recv_paused_until.is_none_or(|t| Instant::now() >= t);
        if !self.recv_armed && recv_ready && self.free_bids.len() < usize::from(RING_BUFFERS) {
            let sqe = opcode::RecvMsgMulti::new(types::Fd(self.fd), &*self.recv_hdr, BUF_GROUP)
                .build()
                .user_data(TAG_RECV);
            if !self.push(&sqe)? {
                return Ok(());
            }
            self.recv_armed = true;
            self.recv_paused_until = None;
        }
        if !self.wake_armed {
            let sqe = opcode::PollAdd::new(types::Fd(self.waker_fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(TAG_WAKE);
            if self.push(&sqe)? {
                self.wake_armed = true;
            }
        }
        Ok(())
    }

    /// Pushes one request, submitting first if the queue is full. `Ok(false)`: the kernel is
    /// momentarily out of room (try again next round).
    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<bool> {
        loop {
            // SAFETY: every request references memory owned by self (boxed headers, send
            // slots, ring buffers lent from the pool) that stays valid until its completion.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(true);
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if transient(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues one copy of `piece` (whose reference moves in) to every address in `dests`.
    /// Returns how many copies could not be queued, and the reference back if none was.
    pub(crate) fn queue_fanout(
        &mut self,
        pool: &BufferPool,
        piece: PieceRef,
        channel: ChannelId,
        dests: &[SocketAddr],
    ) -> io::Result<(usize, Option<PieceRef>)> {
        let room = dests.len().min(self.free_sends.len());
        if room == 0 {
            return Ok((dests.len(), Some(piece)));
        }
        let bytes = pool.bytes(&piece);
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        let group = match self.free_groups.pop() {
            Some(g) => g,
            None => {
                self.groups.push(Group {
                    piece: None,
                    channel: ChannelId::default(),
                    remaining: 0,
                    sent: 0,
                    bytes: 0,
                });
                (self.groups.len() - 1) as u32
            }
        };
        let mut queued = 0u32;
        for dest in &dests[..room] {
            let Some(index) = self.free_sends.pop() else {
                break;
            };
            let slot = &mut self.sends[index as usize];
            let namelen = sockaddr::write(dest, &mut slot.addr);
            slot.iov = libc::iovec {
                iov_base: ptr as *mut libc::c_void,
                iov_len: len,
            };
            slot.hdr.msg_name = (&mut slot.addr as *mut libc::sockaddr_storage).cast();
            slot.hdr.msg_namelen = namelen;
            slot.hdr.msg_iov = &mut slot.iov;
            slot.hdr.msg_iovlen = 1;
            slot.group = group;
            let hdr: *const libc::msghdr = &slot.hdr;
            let sqe = if self.zerocopy {
                opcode::SendMsgZc::new(types::Fd(self.fd), hdr)
                    .flags(libc::MSG_DONTWAIT as u32)
                    .build()
            } else {
                opcode::SendMsg::new(types::Fd(self.fd), hdr)
                    .flags(libc::MSG_DONTWAIT as u32)
                    .build()
            };
            match self.push(&sqe.user_data(TAG_SEND | u64::from(index))) {
                Ok(true) => queued += 1,
                other => {
                    self.free_sends.push(index);
                    if queued == 0 {
                        self.free_groups.push(group);
                        other?;
                        return Ok((dests.len(), Some(piece)));
                    }
                    break;
                }
            }
        }
        self.groups[group as usize] = Group {
            piece: Some(piece),
            channel,
            remaining: queued,
            sent: 0,
            bytes: len,
        };
        Ok((dests.len() - queued as usize, None))
    }

    /// Lends free slots to the ring, re-arms what ended, submits queued requests and, if
    /// `wait` is set, sleeps until a completion or `wait`.
    pub(crate) fn submit(&mut self, pool: &BufferPool, wait: Option<Duration>) -> io::Result<()> {
        self.refill(pool);
        self.arm()?;
        let result = match wait {
            None => self.ring.submit(),
            Some(d) => {
                let ts = types::Timespec::new()
                    .sec(d.as_secs())
                    .nsec(d.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Takes every completion: received datagrams go to `received`; finished fan-outs to
    /// `done`. Returns whether the doorbell rang.
    pub(crate) fn reap(
        &mut self,
        pool: &BufferPool,
        clock: &MonotonicClock,
        received: &mut Vec<Received>,
        done: &mut Vec<SendDone>,
    ) -> io::Result<bool> {
        let mut woke = false;
        self.completions.clear();
        self.completions.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
        );
        let now = clock.now();
        for k in 0..self.completions.len() {
            let (ud, result, flags) = self.completions[k];
            match ud & TAG_MASK {
                TAG_RECV => self.on_recv(pool, result, flags, received),
                TAG_WAKE => {
                    woke = true;
                    if !cqueue::more(flags) {
                        self.wake_armed = false;
                    }
                    // SAFETY: reads 8 bytes into a live boxed u64; EAGAIN if already cleared.
                    let _ = unsafe {
                        libc::read(self.waker_fd, (&mut *self.wake_buf as *mut u64).cast(), 8)
                    };
                }
                TAG_SEND => self.on_send(pool, (ud & !TAG_MASK) as u32, result, flags, now, done),
                _ => {}
            }
        }
        Ok(woke)
    }

    fn on_recv(
        &mut self,
        pool: &BufferPool,
        result: i32,
        flags: u32,
        received: &mut Vec<Received>,
    ) {
        if !cqueue::more(flags) {
            self.recv_armed = false;
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            // -ENOBUFS: the ring ran dry; refill and re-arm follow at the next submit. Any other
            // error pauses the receive briefly so a persistent one cannot become a busy loop.
            if result < 0 && result != -libc::ENOBUFS {
                tracing::debug!(
                    "io_uring recvmsg: {}",
                    io::Error::from_raw_os_error(-result)
                );
                self.recv_paused_until = Some(Instant::now() + Duration::from_millis(10));
            }
            return;
        };
        let Some(w) = self.lent.get_mut(usize::from(bid)).and_then(Option::take) else {
            return;
        };
        self.free_bids.push(bid);
        let len = usize::try_from(result).unwrap_or(0);
        let buffer = pool.written(&w, 0, len);
        let (offset, len, from) = match types::RecvMsgOut::parse(buffer, &self.recv_hdr) {
            Ok(out) => {
                let payload = out.payload_data();
                let offset = payload.as_ptr() as usize - buffer.as_ptr() as usize;
                let from = read_name(out.name_data());
                // A datagram longer than the slot arrives cut short and fails to parse.
                (offset, payload.len(), from)
            }
            Err(()) => (0, 0, None),
        };
        received.push(Received {
            writer: w,
            offset,
            len,
            from,
        });
    }

    fn on_send(
        &mut self,
        pool: &BufferPool,
        index: u32,
        result: i32,
        flags: u32,
        now: Timestamp,
        done: &mut Vec<SendDone>,
    ) {
        let Some(slot) = self.sends.get(index as usize) else {
            return;
        };
        let g = slot.group as usize;
        // A zero-copy send completes twice: its result (flagged MORE), then a notification
        // that the buffer is free again. Only the last completion frees the slot.
        if !cqueue::notif(flags) {
            if result >= 0 {
                self.groups[g].sent += 1;
            } else if let Some(addr) = sockaddr::read(&slot.addr, slot.hdr.msg_namelen) {
                self.failures.push((self.groups[g].channel, addr));
            }
        }
        if cqueue::more(flags) {
            return;
        }
        self.free_sends.push(index);
        let group = &mut self.groups[g];
        group.remaining -= 1;
        if group.remaining > 0 {
            return;
        }
        let sent = group.sent;
        if let Some(piece) = group.piece.take() {
            let mut first_send_us = None;
            if sent > 0 {
                pool.note_sent(&piece, now);
                if pool.claim_first_send(&piece) {
                    let us = now.saturating_since(pool.received_at(&piece)).as_micros();
                    first_send_us = Some(u64::try_from(us).unwrap_or(u64::MAX));
                }
            }
            done.push(SendDone {
                release: pool.release(piece),
                first_send_us,
                sent,
                bytes: group.bytes,
            });
        }
        self.free_groups.push(g as u32);
    }
}

impl UringIo {
    /// Hands every refused copy (its channel and destination) to `f`.
    pub(crate) fn drain_failures(&mut self, mut f: impl FnMut(&ChannelId, SocketAddr)) {
        for (channel, addr) in self.failures.drain(..) {
            f(&channel, addr);
        }
    }
}

/// The source address the kernel wrote into a receive buffer's name field.
fn read_name(name: &[u8]) -> Option<SocketAddr> {
    let mut storage = sockaddr::zeroed();
    let n = name.len().min(size_of::<libc::sockaddr_storage>());
    // SAFETY: copies n ≤ size_of(sockaddr_storage) bytes into a live, zeroed storage.
    unsafe {
        std::ptr::copy_nonoverlapping(
            name.as_ptr(),
            (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
            n,
        );
    }
    sockaddr::read(&storage, n as libc::socklen_t)
}

/// Errors after which the kernel just needs a moment (out of request memory, completions to
/// reap first, a signal).
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
    )
}

impl Drop for UringIo {
    fn drop(&mut self) {
        let _ = self.ring.submitter().unregister_buf_ring(BUF_GROUP);
    }
}
