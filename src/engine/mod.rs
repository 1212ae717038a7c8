//! The relay engine: thread-per-core workers that drive [`RelayCore`]s over backend sockets.
//!
//! Each worker is pinned to a core and owns a `SO_REUSEPORT` socket on the listen address, a
//! relay core (its shard of the subscriber table: the kernel keeps each subscriber's datagrams
//! on one socket), and its own latency histograms. A piece is received once into a slot of the
//! shared [`pool::BufferPool`]; the worker that receives it verifies it, sends it to its own
//! subscribers, and hands a reference to the slot (not the bytes) to every other worker through
//! a bounded `crossbeam` channel so they send it to theirs. The slot returns to the pool when the
//! last worker is done with it. Nothing on the per-packet path takes a lock or allocates (the
//! counting-allocator test checks it), except Ed25519 batch verification, which allocates a few
//! vectors per batch, not per piece.

pub(crate) mod pool;
mod wake;
mod worker;

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::portable::RECV_BATCH;
use crate::backend::xdp::{Interface, XdpIo, XdpProgram};
use crate::backend::PortableSocket;
use crate::metrics::RelayMetrics;
use crate::relay::{AnnouncedChannels, RelayConfig, RelayCore};
use crate::time::MonotonicClock;

use pool::BufferPool;
use wake::Waker;
use worker::{Handoff, Worker};

pub use crate::backend::uring::ZeroCopy;
pub use crate::backend::xdp::{AttachMode, TxMode};

/// The kernel interface the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Batched `recvmmsg`/`sendmmsg`: runs anywhere.
    Portable,
    /// io_uring: multishot receive into pool slots, one submission per round for all sends.
    Uring {
        /// Whether sends use `IORING_OP_SENDMSG_ZC`.
        zerocopy: ZeroCopy,
    },
    /// AF_XDP sockets fed by an XDP program on [`EngineConfig::xdp`]'s interface.
    Xdp,
}

impl Backend {
    /// The name shown in logs and `clubcast_build_info`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Uring { .. } => "uring",
            Backend::Xdp => "xdp",
        }
    }

    /// `uring` where the kernel supports it, else `portable`, with the reason it fell back.
    pub fn detect(zerocopy: ZeroCopy) -> (Backend, Option<String>) {
        match crate::backend::uring::probe() {
            Ok(()) => (Backend::Uring { zerocopy }, None),
            Err(e) => (
                Backend::Portable,
                Some(format!("io_uring unavailable ({e})")),
            ),
        }
    }
}

/// How a worker waits when there is nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PollMode {
    /// Spin on the socket and queues without ever sleeping: lowest latency, one busy core each.
    Busy,
    /// Spin while traffic flows; after an idle spell, block until a datagram or a hand-off.
    #[default]
    Adaptive,
    /// Always block until a datagram or a hand-off.
    Block,
}

impl PollMode {
    /// The name used in flags and config files.
    pub fn name(self) -> &'static str {
        match self {
            PollMode::Busy => "busy",
            PollMode::Adaptive => "adaptive",
            PollMode::Block => "block",
        }
    }
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "busy" => Ok(PollMode::Busy),
            "adaptive" => Ok(PollMode::Adaptive),
            "block" => Ok(PollMode::Block),
            _ => Err(format!("{s:?} is not a poll mode (busy, adaptive, block)")),
        }
    }
}

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Protocol settings.
    pub relay: RelayConfig,
    /// Socket send and receive buffer size, bytes.
    pub socket_buffer: usize,
    /// Worker threads (0: one per available core).
    pub workers: usize,
    /// Pin each worker to its own core.
    pub pin: bool,
    /// How idle workers wait.
    pub poll: PollMode,
    /// Pooled packet buffers shared by all workers.
    pub pool_slots: usize,
    /// Kernel interface.
    pub backend: Backend,
    /// Where and how the xdp backend runs (required with [`Backend::Xdp`]).
    pub xdp: Option<XdpConfig>,
}

/// How to run the xdp backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpConfig {
    /// The interface to attach to; one worker per receive queue.
    pub interface: String,
    /// Where the program runs.
    pub attach: AttachMode,
    /// AF_XDP zero-copy: on (fail without), off (copy mode), auto (zero-copy where the driver
    /// has it).
    pub zerocopy: ZeroCopy,
    /// How fan-out copies are built; `None` picks multi-buffer on zero-copy sockets and copy
    /// otherwise (multi-buffer measured slower in copy mode).
    pub tx: Option<TxMode>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            relay: RelayConfig::default(),
            socket_buffer: 8 << 20,
            workers: 0,
            pin: true,
            poll: PollMode::Adaptive,
            pool_slots: 16_384,
            backend: Backend::Portable,
            xdp: None,
        }
    }
}

/// Workers to run for `requested` (0: one per core the process may use).
pub fn worker_count(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

thread_local! {
    static ON_HOT_PATH: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is a relay worker inside its per-packet path (outside batch
/// verification). Lets a test's counting allocator attribute allocations; cheap and
/// allocation-free to call.
pub fn on_hot_path() -> bool {
    ON_HOT_PATH.with(Cell::get)
}

fn set_hot_path(on: bool) {
    ON_HOT_PATH.with(|c| c.set(on));
}

/// A bound relay, ready to run: one socket per worker on the same address.
pub struct RelayEngine {
    workers: Vec<Worker>,
    addr: SocketAddr,
    relay: RelayConfig,
    /// The attached XDP program (detached when the engine stops) and how the backend runs.
    xdp: Option<(XdpProgram, String)>,
}

/// The xdp backend's program and sockets, set up before any worker starts.
struct XdpSetup {
    program: XdpProgram,
    sockets: Vec<XdpIo>,
    summary: String,
}

impl XdpSetup {
    fn new(config: &EngineConfig, port: u16, workers: usize) -> io::Result<Self> {
        let xdp = config.xdp.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the xdp backend needs an interface",
            )
        })?;
        let iface = Interface::lookup(&xdp.interface).map_err(io::Error::other)?;
        if workers > iface.rx_queues as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "interface {} has {} receive queue(s); the xdp backend runs one worker per \
                     queue (use --workers {} or fewer)",
                    iface.name, iface.rx_queues, iface.rx_queues
                ),
            ));
        }
        let mut program =
            XdpProgram::attach(&iface.name, port, xdp.attach).map_err(io::Error::other)?;
        // Copies leave from the address the relay listens on, or (listening on all) the
        // interface's: subscribers only take pieces from the address they subscribed at.
        let local_ip = match config.listen.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip,
            _ => iface.ipv4,
        };
        let local = std::net::SocketAddrV4::new(local_ip, port);
        let mut sockets = Vec::with_capacity(workers);
        for queue in 0..workers as u32 {
            let socket = bind_xsk(&iface, queue, local, xdp)?;
            program
                .register(queue, socket.fd())
                .map_err(io::Error::other)?;
            sockets.push(socket);
        }
        let zerocopy = sockets.first().is_some_and(XdpIo::zerocopy);
        let wanted_multi = xdp.tx == Some(TxMode::MultiBuffer);
        let fell_back =
            wanted_multi && sockets.first().is_some_and(|s| s.tx_mode() == TxMode::Copy);
        let summary = format!(
            "{} on {}, {} mode, {} sends{}",
            xdp.attach.name(),
            iface.name,
            if zerocopy { "zero-copy" } else { "copy" },
            sockets.first().map_or("copy", |s| s.tx_mode().name()),
            if fell_back {
                " (multi-buffer unavailable)"
            } else {
                ""
            },
        );
        Ok(XdpSetup {
            program,
            sockets,
            summary,
        })
    }
}

/// An AF_XDP socket for `queue` as `xdp` asks: zero-copy when on or (auto) when the driver has
/// it; multi-buffer sends unless told otherwise on a copy-mode socket.
fn bind_xsk(
    iface: &Interface,
    queue: u32,
    local: std::net::SocketAddrV4,
    xdp: &XdpConfig,
) -> io::Result<XdpIo> {
    let tx = |zerocopy: bool| {
        xdp.tx.unwrap_or(if zerocopy {
            TxMode::MultiBuffer
        } else {
            TxMode::Copy
        })
    };
    // Multi-buffer needs kernel and driver support (XDP_USE_SG, Linux 6.6): without it, copy
    // the payload per subscriber instead, and say so.
    let bind = |zerocopy: bool| {
        let wanted = tx(zerocopy);
        XdpIo::bind(iface, queue, local, zerocopy, wanted).or_else(|e| {
            if wanted != TxMode::MultiBuffer {
                return Err(e);
            }
            let io = XdpIo::bind(iface, queue, local, zerocopy, TxMode::Copy)?;
            tracing::warn!(
                "AF_XDP multi-buffer is not available on {} ({e}); copying the payload per \
                 subscriber instead",
                iface.name
            );
            Ok(io)
        })
    };
    match xdp.zerocopy {
        ZeroCopy::On => bind(true).map_err(io::Error::other),
        ZeroCopy::Off => bind(false).map_err(io::Error::other),
        ZeroCopy::Auto => bind(true)
            .or_else(|_| bind(false))
            .map_err(io::Error::other),
    }
}

impl RelayEngine {
    /// Binds one `SO_REUSEPORT` socket per worker on `config.listen`.
    pub fn bind(config: &EngineConfig, metrics: Arc<RelayMetrics>) -> io::Result<Self> {
        let n = worker_count(config.workers);
        // Each worker keeps a receive batch of slots lent to the kernel; leave as many again
        // for pieces in flight.
        // Slots each worker lends the kernel for receiving (and may hold once more while it
        // handles a full receive), plus as many again for pieces in flight.
        let lent = match config.backend {
            Backend::Portable | Backend::Xdp => RECV_BATCH,
            Backend::Uring { .. } => 256,
        };
        let min_slots = n * lent * 3;
        if config.pool_slots < min_slots {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a pool of {} buffers is too small for {n} workers (at least {min_slots})",
                    config.pool_slots
                ),
            ));
        }
        let first = PortableSocket::bind_shared(config.listen, config.socket_buffer)?;
        let addr = first.local_addr()?; // the real port when asked for port 0
        let mut sockets = vec![first];
        for _ in 1..n {
            sockets.push(PortableSocket::bind_shared(addr, config.socket_buffer)?);
        }
        let mut xdp = match config.backend {
            Backend::Xdp => Some(XdpSetup::new(config, addr.port(), n)?),
            _ => None,
        };
        let pool = Arc::new(BufferPool::new(config.pool_slots));
        let wakers: Arc<Vec<Waker>> =
            Arc::new((0..n).map(|_| Waker::new()).collect::<io::Result<_>>()?);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| crossbeam::channel::bounded::<Handoff>(worker::HANDOFF_QUEUE))
            .unzip();
        let cookie_key: [u8; 32] = rand::random();
        // Which channels have a publisher, as their owners learn it, for every worker.
        let announced = Arc::new(AnnouncedChannels::default());
        // One clock for all workers: timestamps cross workers with the pieces.
        let clock = MonotonicClock::new();
        let cores = if config.pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut xdp_io: Vec<Option<XdpIo>> = match &mut xdp {
            Some(setup) => setup.sockets.drain(..).map(Some).collect(),
            None => (0..n).map(|_| None).collect(),
        };
        let workers = sockets
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(id, (socket, inbox))| Worker {
                id,
                core: RelayCore::with_shared(
                    config.relay.clone(),
                    cookie_key,
                    Arc::clone(&announced),
                ),
                socket,
                pool: Arc::clone(&pool),
                inbox,
                peers: senders
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != id)
                    .map(|(j, s)| (j, s.clone()))
                    .collect(),
                wakers: Arc::clone(&wakers),
                metrics: Arc::clone(&metrics),
                poll: config.poll,
                pin: (!cores.is_empty()).then(|| cores[id % cores.len()]),
                clock,
                io: match (config.backend, xdp_io[id].take()) {
                    (Backend::Xdp, Some(x)) => worker::IoKind::Xdp(Box::new(x)),
                    (Backend::Uring { zerocopy }, _) => worker::IoKind::Uring(zerocopy),
                    _ => worker::IoKind::Portable,
                },
                draining: false,
            })
            .collect();
        Ok(RelayEngine {
            workers,
            addr,
            relay: config.relay.clone(),
            xdp: xdp.map(|x| (x.program, x.summary)),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// How the xdp backend runs (attach mode, interface, socket mode, send mode), if it does.
    pub fn xdp_summary(&self) -> Option<&str> {
        self.xdp.as_ref().map(|(_, s)| s.as_str())
    }

    /// Starts every worker on its own thread.
    pub fn spawn(self) -> io::Result<RelayHandle> {
        let control = Arc::new(Control::new(self.workers.len(), self.relay.clone()));
        let threads = self
            .workers
            .into_iter()
            .map(|w| {
                let control = Arc::clone(&control);
                std::thread::Builder::new()
                    .name(format!("relay-worker-{}", w.id))
                    .spawn(move || w.run(&control))
            })
            .collect::<io::Result<_>>()?;
        Ok(RelayHandle {
            addr: self.addr,
            control,
            threads,
            xdp: self.xdp.map(|(p, _)| p),
        })
    }
}

/// Phases of a running engine, in order.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const STOPPING: u8 = 2;

/// What the handle tells the workers: the phase, and live configuration changes. Workers read
/// it once per round (one atomic load each), never per packet.
pub(crate) struct Control {
    phase: AtomicU8,
    workers: usize,
    /// Workers that have stopped taking new datagrams while draining.
    quiesced: AtomicUsize,
    generation: AtomicU64,
    relay: Mutex<RelayConfig>,
}

impl Control {
    fn new(workers: usize, relay: RelayConfig) -> Self {
        Control {
            phase: AtomicU8::new(RUNNING),
            workers,
            quiesced: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            relay: Mutex::new(relay),
        }
    }

    pub(crate) fn draining(&self) -> bool {
        self.phase.load(Ordering::Acquire) >= DRAINING
    }

    pub(crate) fn stopping(&self) -> bool {
        self.phase.load(Ordering::Acquire) >= STOPPING
    }

    /// Records that the calling worker takes no more datagrams.
    pub(crate) fn quiesce(&self) {
        self.quiesced.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether every worker has stopped taking datagrams, so no new hand-offs can appear.
    pub(crate) fn all_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::SeqCst) >= self.workers
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn relay_config(&self) -> RelayConfig {
        self.relay.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every queued send was handed to the kernel and every worker finished.
    Complete,
    /// The bound passed first; the workers were stopped with work still queued.
    TimedOut,
}

/// A relay running on its worker threads.
pub struct RelayHandle {
    addr: SocketAddr,
    control: Arc<Control>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    /// Detached after the workers stop (dropped last).
    xdp: Option<XdpProgram>,
}

impl RelayHandle {
    /// The relay's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether a worker has ended (it failed: workers run until stopped).
    pub fn any_finished(&self) -> bool {
        self.threads.iter().any(JoinHandle::is_finished)
    }

    /// Applies new relay tunables on every worker within a round (live reload): subscribers
    /// already admitted stay.
    pub fn reconfigure(&self, relay: RelayConfig) {
        *self.control.relay.lock().unwrap_or_else(|e| e.into_inner()) = relay;
        self.control.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Drains: workers stop taking datagrams (counted as `draining`), finish the pieces already
    /// accepted and queued, and end. After `bound`, they are stopped whatever is left.
    pub fn drain(self, bound: Duration) -> (Drained, io::Result<()>) {
        self.control.phase.store(DRAINING, Ordering::Release);
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline && !self.threads.iter().all(JoinHandle::is_finished) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let outcome = if self.threads.iter().all(JoinHandle::is_finished) {
            Drained::Complete
        } else {
            Drained::TimedOut
        };
        (outcome, self.stop())
    }

    /// Stops every worker at once and waits for them, then detaches the XDP program; the first
    /// worker error, if any.
    pub fn stop(mut self) -> io::Result<()> {
        self.control.phase.store(STOPPING, Ordering::Release);
        let mut result = Ok(());
        for t in std::mem::take(&mut self.threads) {
            let r = t
                .join()
                .map_err(|_| io::Error::other("relay worker panicked"))
                .and_then(|r| r);
            if result.is_ok() {
                result = r;
            }
        }
        drop(self.xdp.take());
        result
    }

    /// Packets the XDP program redirected to the workers and passed to the kernel.
    pub fn xdp_counts(&self) -> Option<(u64, u64)> {
        self.xdp.as_ref().map(XdpProgram::counts)
    }
}
