//! One relay worker: its socket, its core shard, its loop.
//!
//! A round: take hand-offs from other workers; receive up to [`BATCHES_PER_ROUND`] batches into
//! pool slots (portable) or reap the ring's completions (uring) and process them; run timers;
//! publish metrics when due; then wait as the poll mode says. The per-packet path (everything
//! between receive and the last send) must not allocate, lock or block: sends never wait, a
//! full socket or a full hand-off queue is a counted drop.
//!
//! Every channel has one owner worker (by its id), which alone holds the channel's key, replay
//! window and epoch: pieces and announces of a channel that arrive on another worker's socket
//! are handed to the owner before any check, so a replay cannot slip past the window by arriving
//! on a different socket. Subscriptions stay with the worker whose socket they arrive on.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender, TrySendError};

use super::pool::{BufferPool, PieceRef, Release, SlotWriter, SLOT_LEN};
use super::wake::Waker;
use super::{set_hot_path, Control, PollMode};
use crate::backend::portable::RECV_BATCH;
use crate::backend::uring::{Received, SendDone, UringIo, ZeroCopy};
use crate::backend::xdp::XdpIo;
use crate::backend::{PortableSocket, RecvBatch, SendBatch};
use crate::crypto::{channel_id, verify_batch};
use crate::metrics::{RelayMetrics, WorkerLatency, PUBLISH_INTERVAL};
use crate::relay::{DropReason, Inbound, PendingPiece, RelayCore};
use crate::time::{MonotonicClock, Timestamp};
use crate::wire::{peek_type, Announce, ChannelId, MessageType, Piece, MAX_DATAGRAM};

/// Pieces queued from one worker to another at most.
pub(super) const HANDOFF_QUEUE: usize = 4096;
/// Receive batches handled per round before hand-offs and timers get a turn.
const BATCHES_PER_ROUND: usize = 8;
/// Longest blocking wait, so timers and the stop flag are seen.
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Adaptive polling spins this long after the last work before it blocks.
const SPIN_BEFORE_BLOCK: Duration = Duration::from_micros(200);

/// Which kernel interface a worker uses.
pub(super) enum IoKind {
    Portable,
    Uring(ZeroCopy),
    /// An AF_XDP socket bound to this worker's queue (the kernel socket stays for control
    /// replies, destinations without a known next hop, and traffic the program passes).
    Xdp(Box<XdpIo>),
}

/// What one worker passes another: always a pool reference, never bytes.
pub(super) enum Handoff {
    /// A verified, accepted piece: send it to your subscribers of `channel`.
    Forward { piece: PieceRef, channel: ChannelId },
    /// A piece or announce of a channel you own, received by another worker: handle it as if
    /// it had arrived on your socket from `from`.
    Inspect {
        datagram: PieceRef,
        from: SocketAddr,
    },
}

pub(super) struct Worker {
    pub(super) id: usize,
    pub(super) core: RelayCore,
    pub(super) socket: PortableSocket,
    pub(super) pool: Arc<BufferPool>,
    pub(super) inbox: Receiver<Handoff>,
    pub(super) peers: Vec<(usize, Sender<Handoff>)>,
    pub(super) wakers: Arc<Vec<Waker>>,
    pub(super) metrics: Arc<RelayMetrics>,
    pub(super) poll: PollMode,
    pub(super) pin: Option<core_affinity::CoreId>,
    pub(super) clock: MonotonicClock,
    pub(super) io: IoKind,
    /// Set once the engine drains: datagrams are dropped (counted), queued pieces still sent.
    pub(super) draining: bool,
}

/// Per-loop state, allocated once when the worker starts.
struct Buffers {
    reply: Vec<u8>,
    pending: Vec<(usize, PendingPiece)>,
    verified: Vec<bool>,
    latency: WorkerLatency,
    /// Whether the last receive found no free buffer (the stall is counted once).
    starved: bool,
    /// Destinations whose copy the kernel refused in the current fan-out.
    failed: Vec<SocketAddr>,
}

/// The backend's sending side.
enum Io {
    Portable {
        send: SendBatch,
    },
    Uring {
        ring: Box<UringIo>,
        done: Vec<SendDone>,
    },
    Xdp {
        xdp: Box<XdpIo>,
        /// Kernel sends for destinations the AF_XDP path cannot reach.
        send: SendBatch,
        fallback: Vec<SocketAddr>,
    },
}

impl Io {
    /// Whether no send is queued or awaiting its completion.
    fn idle(&mut self) -> bool {
        match self {
            Io::Portable { .. } => true,
            Io::Uring { ring, .. } => ring.sends_in_flight() == 0,
            Io::Xdp { xdp, .. } => xdp.idle(),
        }
    }
}

/// Receive-side storage for either backend, kept apart from [`Io`] so a batch can be read
/// while its pieces are being sent.
struct Rx {
    recv: RecvBatch,
    /// Pool slots lent to the next `recvmmsg`, by batch position.
    writers: Vec<Option<SlotWriter>>,
    /// Datagrams reaped from the ring.
    reaped: Vec<Received>,
    /// The same, wrapped so each can be taken.
    received: Vec<Option<Received>>,
}

/// The datagrams of one receive, whichever backend received them.
enum Batch<'a> {
    Portable {
        recv: &'a mut RecvBatch,
        writers: &'a mut Vec<Option<SlotWriter>>,
        len: usize,
    },
    /// Datagrams already in pool slots (io_uring writes them there; AF_XDP payloads are
    /// copied there from the UMEM).
    Slots(&'a mut Vec<Option<Received>>),
}

impl Batch<'_> {
    fn len(&self) -> usize {
        match self {
            Batch::Portable { len, .. } => *len,
            Batch::Slots(r) => r.len(),
        }
    }

    /// Datagram `i`'s source and bytes (empty once taken).
    fn get<'p>(&'p self, pool: &'p BufferPool, i: usize) -> (Option<SocketAddr>, &'p [u8]) {
        match self {
            Batch::Portable { recv, writers, .. } => match writers[i] {
                Some(_) => recv.get(i),
                None => (None, &[]),
            },
            Batch::Slots(r) => match &r[i] {
                Some(d) => (d.from, pool.written(&d.writer, d.offset, d.len)),
                None => (None, &[]),
            },
        }
    }

    /// Takes datagram `i` out of the batch as a shareable pool reference.
    fn take(&mut self, pool: &BufferPool, i: usize, received_at: Timestamp) -> Option<PieceRef> {
        match self {
            Batch::Portable { recv, writers, .. } => {
                let len = recv.get(i).1.len();
                let writer = writers[i].take()?;
                recv.detach(i);
                Some(pool.freeze(writer, len, received_at))
            }
            Batch::Slots(r) => {
                let d = r[i].take()?;
                Some(pool.freeze_at(d.writer, d.offset, d.len, received_at))
            }
        }
    }
}

impl Worker {
    pub(super) fn run(mut self, control: &Control) -> io::Result<()> {
        let result = self.run_loop(control);
        if !self.draining {
            // Ended without draining (stopped, or failed): count this worker as quiesced, or a
            // drain would wait for it until its bound.
            control.quiesce();
        }
        result
    }

    fn run_loop(&mut self, control: &Control) -> io::Result<()> {
        if let Some(core) = self.pin {
            if !core_affinity::set_for_current(core) {
                tracing::warn!(worker = self.id, "could not pin to core {}", core.id);
            }
        }
        let clock = self.clock;
        let mut io = match std::mem::replace(&mut self.io, IoKind::Portable) {
            IoKind::Portable => Io::Portable {
                send: SendBatch::new(),
            },
            IoKind::Xdp(xdp) => Io::Xdp {
                xdp,
                send: SendBatch::new(),
                fallback: Vec::with_capacity(4096),
            },
            IoKind::Uring(zc) => Io::Uring {
                ring: Box::new(UringIo::new(
                    self.socket.fd(),
                    self.wakers[self.id].fd(),
                    &self.pool,
                    zc,
                )?),
                done: Vec::with_capacity(8192),
            },
        };
        let mut rx = Rx {
            recv: RecvBatch::new(),
            writers: (0..RECV_BATCH).map(|_| None).collect(),
            reaped: Vec::with_capacity(1024),
            received: Vec::with_capacity(1024),
        };
        let mut b = Buffers {
            reply: vec![0; MAX_DATAGRAM],
            pending: Vec::with_capacity(1024),
            verified: Vec::with_capacity(1024),
            latency: WorkerLatency::new(),
            starved: false,
            failed: Vec::with_capacity(4096),
        };
        let mut next_publish = Instant::now();
        let mut interval_start = Instant::now();
        let mut idle = Duration::ZERO;
        let mut last_work = Instant::now();
        // The core was built from the config of generation 0: a reload that lands before this
        // thread runs is still applied.
        let mut generation = 0;
        while !control.stopping() {
            let round_start = Instant::now();
            if control.generation() != generation {
                generation = control.generation();
                self.core.reconfigure(control.relay_config());
            }
            if control.draining() && !self.draining {
                // From here on this worker makes no new hand-offs (see handle_batch, inspect).
                self.draining = true;
                control.quiesce();
            }
            set_hot_path(true);
            let mut worked = self.drain_inbox(&clock, &mut b, &mut io);
            worked |= match io {
                Io::Portable { .. } => self.receive_portable(&clock, &mut b, &mut rx, &mut io),
                Io::Uring { .. } => self.receive_uring(&clock, &mut b, &mut rx, &mut io)?,
                Io::Xdp { .. } => {
                    self.receive_xdp(&clock, &mut b, &mut rx, &mut io)
                        | self.receive_portable(&clock, &mut b, &mut rx, &mut io)
                }
            };
            if let Io::Xdp { xdp, .. } = &mut io {
                if let Err(e) = xdp.flush() {
                    tracing::debug!(worker = self.id, "AF_XDP send: {e}");
                }
                worked |= xdp.reap();
            }
            set_hot_path(false);
            let now = Instant::now();
            if worked {
                last_work = now;
            }
            self.core.handle_timeout(clock.now());
            if now >= next_publish {
                if let Io::Xdp { xdp, .. } = &mut io {
                    xdp.refresh_neighbours();
                }
                let elapsed = now - interval_start;
                let busy = 1.0 - idle.as_secs_f64() / elapsed.as_secs_f64().max(1e-9);
                let ratio = busy.clamp(0.0, 1.0);
                self.metrics.publish(
                    self.id,
                    self.core.stats(),
                    self.core.channel_subscribers(),
                    &mut b.latency,
                    ratio,
                );
                next_publish = now + PUBLISH_INTERVAL;
                interval_start = now;
                idle = Duration::ZERO;
            }
            self.wait(&clock, &mut io, worked, now - last_work)?;
            if !worked {
                // A round that found nothing to do is waiting too, whether it slept in the
                // kernel or (busy polling) spun through empty receives.
                idle += round_start.elapsed();
            }
            if self.draining && control.all_quiesced() && self.inbox.is_empty() && io.idle() {
                break;
            }
        }
        rx.recv.reset_buffers();
        for w in rx.writers.iter_mut().filter_map(Option::take) {
            self.pool.discard(w);
        }
        // Slots lent to an io_uring ring or in flight leave with it: the engine is stopping.
        while let Ok(h) = self.inbox.try_recv() {
            match h {
                Handoff::Forward { piece, .. } => self.pool.release(piece),
                Handoff::Inspect { datagram, .. } => self.pool.release(datagram),
            };
        }
        self.metrics.publish(
            self.id,
            self.core.stats(),
            self.core.channel_subscribers(),
            &mut b.latency,
            0.0,
        );
        Ok(())
    }

    /// Submits queued work and waits as the poll mode says; `idle_for` is how long there has
    /// been no work.
    fn wait(
        &self,
        clock: &MonotonicClock,
        io: &mut Io,
        worked: bool,
        idle_for: Duration,
    ) -> io::Result<()> {
        // Copies the kernel has not taken yet (AF_XDP copy mode) must not wait for a wakeup.
        let tx_waiting = match io {
            Io::Xdp { xdp, .. } => xdp.tx_pending(),
            _ => false,
        };
        let block = !worked
            && !tx_waiting
            && match self.poll {
                PollMode::Busy => false,
                PollMode::Adaptive => idle_for >= SPIN_BEFORE_BLOCK,
                PollMode::Block => true,
            };
        if !block {
            if let Io::Uring { ring, .. } = io {
                ring.submit(&self.pool, None)?;
            }
            if !worked {
                if self.poll == PollMode::Busy {
                    std::hint::spin_loop();
                } else {
                    // Adaptive yields while it waits: work the kernel deferred to this core (on
                    // loopback, ksoftirqd finishing delivery of our own sends) gets to run.
                    std::thread::yield_now();
                }
            }
            return Ok(());
        }
        let waker = &self.wakers[self.id];
        waker.set_sleeping(true);
        // Pairs with the fence in Waker::wake: either we see the hand-off, or it sees us asleep.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.inbox.is_empty() {
            waker.set_sleeping(false);
            if let Io::Uring { ring, .. } = io {
                ring.submit(&self.pool, None)?;
            }
            return Ok(());
        }
        let timeout = self
            .core
            .poll_timeout()
            .saturating_since(clock.now())
            .min(MAX_WAIT);
        let result = match io {
            Io::Uring { ring, .. } => ring.submit(&self.pool, Some(timeout)),
            Io::Portable { .. } => self.poll_socket(timeout, None),
            Io::Xdp { xdp, .. } => self.poll_socket(timeout, Some(xdp.fd())),
        };
        waker.set_sleeping(false);
        result
    }

    /// Sleeps in `poll` on the socket, the doorbell and (xdp) the AF_XDP socket.
    fn poll_socket(&self, timeout: Duration, xsk: Option<RawFd>) -> io::Result<()> {
        let waker = &self.wakers[self.id];
        let mut fds = [
            libc::pollfd {
                fd: self.socket.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: waker.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: xsk.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        let n = if xsk.is_some() { 3 } else { 2 };
        // SAFETY: fds is a live array of three pollfd structs for the whole call; n ≤ 3.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if fds[1].revents != 0 {
            waker.clear();
        }
        Ok(())
    }

    /// Handles everything other workers handed over; true if there was any.
    fn drain_inbox(&mut self, clock: &MonotonicClock, b: &mut Buffers, io: &mut Io) -> bool {
        let mut any = false;
        while let Ok(h) = self.inbox.try_recv() {
            any = true;
            match h {
                Handoff::Forward { piece, channel } => self.fan_out(piece, &channel, clock, b, io),
                Handoff::Inspect { datagram, from } => self.inspect(datagram, from, clock, b, io),
            }
        }
        any
    }

    /// Handles a datagram of a channel this worker owns that arrived on another socket.
    fn inspect(
        &mut self,
        datagram: PieceRef,
        from: SocketAddr,
        clock: &MonotonicClock,
        b: &mut Buffers,
        io: &mut Io,
    ) {
        if self.draining {
            self.core.record_drops(DropReason::Draining, 1);
            self.pool.release(datagram);
            return;
        }
        let received_at = self.pool.received_at(&datagram);
        let data = self.pool.bytes(&datagram);
        let pending = handle_one(
            &mut self.core,
            &self.socket,
            received_at,
            from,
            data,
            &mut b.reply,
        );
        if let Some(p) = pending {
            let ok = Piece::parse(data).is_ok_and(|pc| p.key.verify_piece(&pc).is_ok());
            if self.core.admit(&p, ok).is_ok() {
                self.hand_to_peers(&datagram, p.channel);
                self.fan_out(datagram, &p.channel, clock, b, io);
                return;
            }
        }
        self.pool.release(datagram);
    }

    /// The worker that owns the channel of a piece or announce; `None` for other messages.
    fn owner_of(&self, data: &[u8]) -> Option<usize> {
        let channel = match peek_type(data) {
            Ok(MessageType::Data) => Piece::parse(data).ok()?.channel(),
            Ok(MessageType::Announce) => channel_id(&Announce::parse(data).ok()?.public_key()),
            _ => return None,
        };
        let workers = self.peers.len() + 1;
        Some((u64::from_le_bytes(channel.0) % workers as u64) as usize)
    }

    /// Passes datagram `i` of the batch to its channel's owner; false if this worker owns it.
    fn pass_to_owner(&mut self, batch: &mut Batch<'_>, i: usize, received_at: Timestamp) -> bool {
        if self.peers.is_empty() {
            return false;
        }
        let (from, data) = batch.get(&self.pool, i);
        let (Some(from), Some(owner)) = (from, self.owner_of(data)) else {
            return false;
        };
        if owner == self.id {
            return false;
        }
        let Some(datagram) = batch.take(&self.pool, i, received_at) else {
            return false;
        };
        let Some((_, tx)) = self.peers.iter().find(|(id, _)| *id == owner) else {
            self.pool.release(datagram);
            return true;
        };
        match tx.try_send(Handoff::Inspect { datagram, from }) {
            Ok(()) => self.wakers[owner].wake(),
            Err(TrySendError::Full(h) | TrySendError::Disconnected(h)) => {
                if let Handoff::Inspect { datagram, .. } = h {
                    self.pool.release(datagram);
                }
                self.core.record_drops(DropReason::WorkerBehind, 1);
            }
        }
        true
    }

    /// Receives up to [`BATCHES_PER_ROUND`] `recvmmsg` batches into pool slots and handles
    /// them; true if anything arrived.
    fn receive_portable(
        &mut self,
        clock: &MonotonicClock,
        b: &mut Buffers,
        rx: &mut Rx,
        io: &mut Io,
    ) -> bool {
        let mut any = false;
        for _ in 0..BATCHES_PER_ROUND {
            let n = self.recv_into_pool(rx, b);
            if n == 0 {
                break;
            }
            any = true;
            let received_at = clock.now();
            let mut batch = Batch::Portable {
                recv: &mut rx.recv,
                writers: &mut rx.writers,
                len: n,
            };
            self.handle_batch(&mut batch, received_at, clock, b, io);
            if n < RECV_BATCH {
                break;
            }
        }
        any
    }

    /// One `recvmmsg` into pool slots; the number of datagrams.
    fn recv_into_pool(&mut self, rx: &mut Rx, b: &mut Buffers) -> usize {
        // Keep the slots this worker already holds at the front, then top up from the pool.
        rx.writers.sort_unstable_by_key(Option::is_none);
        let mut slots = 0;
        for (i, slot) in rx.writers.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = self.pool.take();
            }
            let Some(w) = slot.as_mut() else { break };
            // SAFETY: the slot is ours (a SlotWriter) until frozen or discarded, and it is
            // only read back through RecvBatch::get after the receive; Batch::take detaches
            // it before it is frozen and handed on.
            unsafe { rx.recv.set_buffer(i, self.pool.as_mut_ptr(w), SLOT_LEN) };
            slots = i + 1;
        }
        if slots == 0 {
            // Every buffer is in flight: leave datagrams in the socket buffer (the kernel drops
            // what overflows) and count the stall once, not once per spin.
            if !b.starved {
                self.core.record_drops(DropReason::PoolExhausted, 1);
                b.starved = true;
            }
            return 0;
        }
        b.starved = false;
        rx.recv.set_active(slots);
        match self.socket.recv_batch(&mut rx.recv) {
            Ok(n) => n,
            Err(e) => {
                // A transient kernel error (ENOBUFS, ENOMEM) must not end the relay.
                tracing::debug!(worker = self.id, "recvmmsg: {e}");
                0
            }
        }
    }

    /// Reaps the ring: finished fan-outs are accounted, received datagrams handled, unkept
    /// slots go back to the ring. True if anything happened.
    fn receive_uring(
        &mut self,
        clock: &MonotonicClock,
        b: &mut Buffers,
        rx: &mut Rx,
        io: &mut Io,
    ) -> io::Result<bool> {
        let Io::Uring { ring, done } = io else {
            return Ok(false);
        };
        rx.reaped.clear();
        done.clear();
        let woke = ring.reap(&self.pool, clock, &mut rx.reaped, done)?;
        let any = woke || !rx.reaped.is_empty() || !done.is_empty();
        let core = &mut self.core;
        ring.drain_failures(|channel, addr| {
            core.record_send_failure(channel, addr);
        });
        for d in done.iter() {
            self.send_done(d, b);
        }
        if rx.reaped.is_empty() {
            return Ok(any);
        }
        rx.received.clear();
        rx.received.extend(rx.reaped.drain(..).map(Some));
        let received_at = clock.now();
        let mut batch = Batch::Slots(&mut rx.received);
        self.handle_batch(&mut batch, received_at, clock, b, io);
        if let Io::Uring { ring, .. } = io {
            for d in rx.received.iter_mut().filter_map(Option::take) {
                ring.give_back(&self.pool, d.writer);
            }
        }
        Ok(any)
    }

    /// Accounts a finished io_uring fan-out (its refused copies are reported separately).
    fn send_done(&mut self, d: &SendDone, b: &mut Buffers) {
        self.core.record_sends(d.sent as usize, d.bytes);
        if let Some(us) = d.first_send_us {
            b.latency.first_send_us.saturating_record(us);
        }
        record_forward(d.release, b);
    }

    fn handle_batch(
        &mut self,
        batch: &mut Batch<'_>,
        received_at: Timestamp,
        clock: &MonotonicClock,
        b: &mut Buffers,
        io: &mut Io,
    ) {
        b.pending.clear();
        if self.draining {
            self.core
                .record_drops(DropReason::Draining, batch.len() as u64);
            return;
        }
        for i in 0..batch.len() {
            if self.pass_to_owner(batch, i, received_at) {
                continue;
            }
            let (from, data) = batch.get(&self.pool, i);
            let Some(from) = from else {
                self.core.record_drops(DropReason::Malformed, 1);
                continue;
            };
            if let Some(p) = handle_one(
                &mut self.core,
                &self.socket,
                received_at,
                from,
                data,
                &mut b.reply,
            ) {
                b.pending.push((i, p));
            }
        }
        if b.pending.is_empty() {
            return;
        }
        verify_pending(|i| batch.get(&self.pool, i).1, &b.pending, &mut b.verified);
        for k in 0..b.pending.len() {
            let (i, p) = b.pending[k];
            if self.core.admit(&p, b.verified[k]).is_err() {
                continue;
            }
            let Some(piece) = batch.take(&self.pool, i, received_at) else {
                continue;
            };
            self.hand_to_peers(&piece, p.channel);
            self.fan_out(piece, &p.channel, clock, b, io);
        }
    }

    fn hand_to_peers(&mut self, piece: &PieceRef, channel: ChannelId) {
        for (id, tx) in &self.peers {
            let handoff = Handoff::Forward {
                piece: self.pool.share(piece),
                channel,
            };
            match tx.try_send(handoff) {
                Ok(()) => self.wakers[*id].wake(),
                Err(TrySendError::Full(h) | TrySendError::Disconnected(h)) => {
                    if let Handoff::Forward { piece, .. } = h {
                        self.pool.release(piece);
                    }
                    self.core.record_drops(DropReason::WorkerBehind, 1);
                }
            }
        }
    }

    /// Sends `piece` to this worker's subscribers of `channel` (or queues the copies, on
    /// io_uring) and gives up this worker's reference once they are handed to the kernel.
    fn fan_out(
        &mut self,
        piece: PieceRef,
        channel: &ChannelId,
        clock: &MonotonicClock,
        b: &mut Buffers,
        io: &mut Io,
    ) {
        let subscribers = self.core.subscribers(channel);
        if subscribers.is_empty() {
            record_forward(self.pool.release(piece), b);
            return;
        }
        match io {
            Io::Portable { send } => {
                let bytes = self.pool.bytes(&piece);
                b.failed.clear();
                let failed = &mut b.failed;
                let result = self
                    .socket
                    .send_fanout_with(bytes, subscribers, send, |a| failed.push(*a));
                let len = bytes.len();
                self.account_fanout(piece, channel, result.sent, len, clock, b);
            }
            Io::Xdp {
                xdp,
                send,
                fallback,
            } => {
                let bytes = self.pool.bytes(&piece);
                fallback.clear();
                b.failed.clear();
                let mut sent = xdp.fan_out(bytes, subscribers, fallback);
                if !fallback.is_empty() {
                    let failed = &mut b.failed;
                    sent += self
                        .socket
                        .send_fanout_with(bytes, fallback, send, |a| failed.push(*a))
                        .sent;
                }
                let len = bytes.len();
                self.account_fanout(piece, channel, sent, len, clock, b);
            }
            Io::Uring { ring, .. } => {
                match ring.queue_fanout(&self.pool, piece, *channel, subscribers) {
                    Ok((unqueued, leftover)) => {
                        if unqueued > 0 {
                            self.core
                                .record_drops(DropReason::SendFailed, unqueued as u64);
                        }
                        if let Some(piece) = leftover {
                            record_forward(self.pool.release(piece), b);
                        }
                    }
                    Err(e) => tracing::debug!(worker = self.id, "io_uring submit: {e}"),
                }
            }
        }
    }
}

impl Worker {
    /// Counts a synchronous fan-out of `piece` (`sent` copies handed to the kernel, refused
    /// ones in `b.failed`), records first-send latency, and gives up this worker's reference.
    fn account_fanout(
        &mut self,
        piece: PieceRef,
        channel: &ChannelId,
        sent: usize,
        len: usize,
        clock: &MonotonicClock,
        b: &mut Buffers,
    ) {
        self.core.record_sends(sent, len);
        for addr in b.failed.drain(..) {
            self.core.record_send_failure(channel, addr);
        }
        if sent > 0 {
            let now = clock.now();
            self.pool.note_sent(&piece, now);
            if self.pool.claim_first_send(&piece) {
                let us = now.saturating_since(self.pool.received_at(&piece));
                b.latency.first_send_us.saturating_record(micros(us));
            }
        }
        record_forward(self.pool.release(piece), b);
    }

    /// Receives from the AF_XDP socket: each datagram's payload is copied into a pool slot
    /// and its UMEM frame goes straight back to the kernel. True if anything arrived.
    fn receive_xdp(
        &mut self,
        clock: &MonotonicClock,
        b: &mut Buffers,
        rx: &mut Rx,
        io: &mut Io,
    ) -> bool {
        let Io::Xdp { xdp, .. } = io else {
            return false;
        };
        rx.received.clear();
        let pool = &self.pool;
        let (mut oversized, mut starved) = (0u64, 0u64);
        let (n, rejected) = xdp.receive(RECV_BATCH, |from, payload| {
            if payload.len() > SLOT_LEN {
                oversized += 1;
                return;
            }
            let Some(mut w) = pool.take() else {
                starved += 1;
                return;
            };
            pool.buf_mut(&mut w)[..payload.len()].copy_from_slice(payload);
            rx.received.push(Some(Received {
                writer: w,
                offset: 0,
                len: payload.len(),
                from: Some(from),
            }));
        });
        self.core
            .record_drops(DropReason::Malformed, rejected as u64 + oversized);
        self.core.record_drops(DropReason::PoolExhausted, starved);
        if rx.received.is_empty() {
            return n > 0;
        }
        let received_at = clock.now();
        let mut batch = Batch::Slots(&mut rx.received);
        self.handle_batch(&mut batch, received_at, clock, b, io);
        for d in rx.received.iter_mut().filter_map(Option::take) {
            self.pool.discard(d.writer);
        }
        true
    }
}

/// Records receive → last copy sent when the last reference to a piece is released.
fn record_forward(release: Release, b: &mut Buffers) {
    if let Release::Last {
        last_sent: Some(last_sent),
        received_at,
    } = release
    {
        b.latency
            .forward_us
            .saturating_record(micros(last_sent.saturating_since(received_at)));
    }
}

/// Runs one datagram through the core and sends any reply; a piece that passed the cheap
/// filters comes back for verification.
fn handle_one(
    core: &mut RelayCore,
    socket: &PortableSocket,
    received_at: Timestamp,
    from: SocketAddr,
    data: &[u8],
    reply: &mut [u8],
) -> Option<PendingPiece> {
    // Control messages may grow tables (a new subscriber): that is not the hot path.
    set_hot_path(is_piece(data));
    let verdict = core.handle(received_at, from, data, reply);
    set_hot_path(true);
    match verdict {
        Inbound::Reply(len) => {
            if socket.send_to(&reply[..len], from).is_err() {
                core.record_drops(DropReason::SendFailed, 1);
            }
            None
        }
        Inbound::Verify(p) => Some(p),
        Inbound::Dropped(_) | Inbound::Done => None,
    }
}

fn is_piece(data: &[u8]) -> bool {
    matches!(peek_type(data), Ok(MessageType::Data))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Verifies the pending pieces of a batch (`data(i)` is datagram `i`): all together first
/// (when more than one), one by one if that fails. Single verification allocates nothing; batch
/// verification allocates a few vectors per batch, outside the audited hot path.
fn verify_pending<'a>(
    data: impl Fn(usize) -> &'a [u8],
    pending: &[(usize, PendingPiece)],
    verified: &mut Vec<bool>,
) {
    verified.clear();
    let piece = |i: usize| Piece::parse(data(i)).ok();
    if pending.len() > 1 {
        set_hot_path(false);
        let batch: Vec<(Piece<'_>, _)> = pending
            .iter()
            .filter_map(|&(i, p)| piece(i).map(|pc| (pc, p.key)))
            .collect();
        let all_good = batch.len() == pending.len() && verify_batch(&batch).is_ok();
        drop(batch);
        set_hot_path(true);
        if all_good {
            verified.resize(pending.len(), true);
            return;
        }
    }
    verified.extend(
        pending
            .iter()
            .map(|&(i, p)| piece(i).is_some_and(|pc| p.key.verify_piece(&pc).is_ok())),
    );
}
