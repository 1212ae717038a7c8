//! The relay engine: drives [`RelayCore`] over a backend socket with a real clock.
//!
//! Today one worker runs the `portable` backend: wait for the socket, `recvmmsg` a batch, let the
//! core answer control messages and pre-check pieces, verify the batch's signatures together,
//! and fan each admitted piece out with `sendmmsg` straight from the receive buffer. Forward
//! latency (receive → last copy handed to the kernel) goes into a worker-owned HdrHistogram that
//! is published to [`RelayMetrics`] every [`PUBLISH_INTERVAL`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::backend::portable::RECV_BATCH;
use crate::backend::{PortableSocket, RecvBatch, SendBatch};
use crate::crypto::verify_batch;
use crate::metrics::{latency_histogram, RelayMetrics, PUBLISH_INTERVAL};
use crate::relay::{DropReason, Inbound, PendingPiece, RelayConfig, RelayCore};
use crate::time::{MonotonicClock, Timestamp};
use crate::wire::{Piece, MAX_DATAGRAM};

/// The name of the backend this engine runs, as shown in logs and `clubcast_build_info`.
pub const BACKEND: &str = "portable";
/// Longest the loop sleeps before checking timers and the stop flag.
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Receive batches handled per round before timers get a turn.
const BATCHES_PER_ROUND: usize = 16;

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Protocol settings.
    pub relay: RelayConfig,
    /// Socket send and receive buffer size, bytes.
    pub socket_buffer: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            relay: RelayConfig::default(),
            socket_buffer: 8 << 20,
        }
    }
}

/// A bound relay, ready to run.
pub struct RelayEngine {
    core: RelayCore,
    socket: PortableSocket,
    metrics: Arc<RelayMetrics>,
    clock: MonotonicClock,
    recv: RecvBatch,
    send: SendBatch,
    reply: Vec<u8>,
    pending: Vec<(usize, PendingPiece)>,
    verified: Vec<bool>,
    latency_us: Histogram<u64>,
    next_publish: Instant,
}

impl RelayEngine {
    /// Binds the listen socket.
    pub fn bind(config: &EngineConfig, metrics: Arc<RelayMetrics>) -> io::Result<Self> {
        let socket = PortableSocket::bind(config.listen, config.socket_buffer)?;
        Ok(RelayEngine {
            core: RelayCore::new(config.relay.clone()),
            socket,
            metrics,
            clock: MonotonicClock::new(),
            recv: RecvBatch::new(),
            send: SendBatch::new(),
            reply: vec![0; MAX_DATAGRAM],
            pending: Vec::with_capacity(RECV_BATCH),
            verified: Vec::with_capacity(RECV_BATCH),
            latency_us: latency_histogram(),
            next_publish: Instant::now(),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Runs until `stop` is set, then publishes final metrics.
    pub fn run(mut self, stop: &AtomicBool) -> io::Result<()> {
        while !stop.load(Ordering::Relaxed) {
            self.poll_once()?;
        }
        self.publish_metrics();
        Ok(())
    }

    /// Starts the engine on its own thread.
    pub fn spawn(self) -> io::Result<RelayHandle> {
        let addr = self.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("relay-worker".into())
            .spawn(move || self.run(&flag))?;
        Ok(RelayHandle { addr, stop, thread })
    }

    /// One round: wait for input (bounded by the core's next timer), drain up to
    /// [`BATCHES_PER_ROUND`] batches, run timers, publish metrics when due.
    fn poll_once(&mut self) -> io::Result<()> {
        let now = self.clock.now();
        let wait = self.core.poll_timeout().saturating_since(now).min(MAX_WAIT);
        if self.socket.wait_readable(wait)? {
            for _ in 0..BATCHES_PER_ROUND {
                let n = match self.socket.recv_batch(&mut self.recv) {
                    Ok(n) => n,
                    // A transient kernel error (ENOBUFS, ENOMEM) must not end the relay.
                    Err(e) => {
                        tracing::debug!("recvmmsg: {e}");
                        0
                    }
                };
                if n == 0 {
                    break;
                }
                let received_at = self.clock.now();
                self.process_batch(received_at);
                if n < RECV_BATCH {
                    break;
                }
            }
        }
        self.core.handle_timeout(self.clock.now());
        if Instant::now() >= self.next_publish {
            self.publish_metrics();
        }
        Ok(())
    }

    fn publish_metrics(&mut self) {
        self.metrics
            .publish(self.core.stats(), &mut self.latency_us);
        self.next_publish = Instant::now() + PUBLISH_INTERVAL;
    }

    /// Handles every datagram of the last receive. Must not block: sends use MSG_DONTWAIT and
    /// a refused copy is a counted drop.
    fn process_batch(&mut self, received_at: Timestamp) {
        let RelayEngine {
            core,
            socket,
            recv,
            send,
            reply,
            pending,
            verified,
            latency_us,
            clock,
            ..
        } = self;
        pending.clear();
        for i in 0..recv.len() {
            let (from, data) = recv.get(i);
            let Some(from) = from else {
                core.record_drops(DropReason::Malformed, 1);
                continue;
            };
            match core.handle(received_at, from, data, reply) {
                Inbound::Reply(n) => {
                    if socket.send_to(&reply[..n], from).is_err() {
                        core.record_drops(DropReason::SendFailed, 1);
                    }
                }
                Inbound::Verify(p) => pending.push((i, p)),
                Inbound::Dropped(_) | Inbound::Done => {}
            }
        }
        if pending.is_empty() {
            return;
        }
        verify_pending(recv, pending, verified);
        for (&(i, p), &ok) in pending.iter().zip(verified.iter()) {
            let (_, data) = recv.get(i);
            if let Ok(subscribers) = core.admit(&p, data.len(), ok) {
                let result = socket.send_fanout(data, subscribers, send);
                if result.failed > 0 {
                    core.record_drops(DropReason::SendFailed, result.failed as u64);
                }
                let us = clock.now().saturating_since(received_at).as_micros();
                latency_us.saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
            }
        }
    }
}

/// Verifies the pending pieces of a batch: all together first, one by one if that fails.
fn verify_pending(recv: &RecvBatch, pending: &[(usize, PendingPiece)], verified: &mut Vec<bool>) {
    verified.clear();
    let piece = |i: usize| Piece::parse(recv.get(i).1).ok();
    let batch: Vec<(Piece<'_>, _)> = pending
        .iter()
        .filter_map(|&(i, p)| piece(i).map(|pc| (pc, p.key)))
        .collect();
    if batch.len() == pending.len() && batch.len() > 1 && verify_batch(&batch).is_ok() {
        verified.resize(pending.len(), true);
        return;
    }
    verified.extend(
        pending
            .iter()
            .map(|&(i, p)| piece(i).is_some_and(|pc| p.key.verify_piece(&pc).is_ok())),
    );
}

/// A relay engine running on its own thread.
pub struct RelayHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<io::Result<()>>,
}

impl RelayHandle {
    /// The relay's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the engine and waits for it.
    pub fn stop(self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| io::Error::other("relay worker panicked"))?
    }
}
