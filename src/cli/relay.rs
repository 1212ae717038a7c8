//! `clubcast relay`: run a relay until killed.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clubcast::engine::{worker_count, Backend, EngineConfig, PollMode, RelayEngine, ZeroCopy};
use clubcast::metrics::{MetricsServer, RelayMetrics};
use clubcast::relay::RelayConfig;

use super::args;

/// Run a relay: verify pieces and fan them out to every subscriber of their channel.
///
/// Publishers announce their channel and push signed pieces; the relay verifies
/// every piece and forwards it to each subscriber of its channel. Subscribers prove their
/// address with a stateless cookie (HELLO → COOKIE → SUBSCRIBE) and must send a KEEPALIVE at
/// least every --subscriber-timeout. Metrics in Prometheus text on http://METRICS/metrics.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// UDP address to receive pieces and subscriptions on.
    #[arg(long, default_value = "0.0.0.0:7000", value_name = "ADDR", value_parser = args::socket_addr)]
    listen: SocketAddr,

    /// TCP address for /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:9700", value_name = "ADDR", value_parser = args::socket_addr)]
    metrics: SocketAddr,

    /// Drop a subscriber after this long without SUBSCRIBE or KEEPALIVE (e.g. 5s).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = args::duration)]
    subscriber_timeout: Duration,

    /// Most channels tracked at once; more are refused and counted.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_channels: usize,

    /// Most subscribers per channel; more are refused and counted.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    max_subscribers: usize,

    /// UDP socket send/receive buffer size per worker (e.g. 8m).
    #[arg(long, default_value = "8m", value_name = "BYTES", value_parser = args::bytes)]
    socket_buffer: usize,

    /// Worker threads, each with its own socket on --listen (default: one per core).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// How idle workers wait: busy (spin, lowest latency, burns a core each), adaptive (spin
    /// while traffic flows, then block), or block.
    #[arg(long, default_value = "adaptive", value_name = "MODE")]
    poll: PollMode,

    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,

    /// Packet buffers shared by the workers; datagrams wait in the socket when all are in use.
    #[arg(long, default_value_t = 16_384, value_name = "N")]
    pool_slots: usize,

    /// Kernel interface: uring (io_uring: multishot receive, one submission per round for all
    /// sends), portable (recvmmsg/sendmmsg, runs anywhere), or auto (uring where the kernel has
    /// it, else portable).
    #[arg(long, default_value = "auto", value_name = "BACKEND", value_parser = ["auto", "uring", "portable"])]
    backend: String,

    /// Zero-copy sends on the uring backend: on, off, or auto (off for pieces, which measured
    /// cheaper to copy than to pin).
    #[arg(long, default_value = "auto", value_name = "MODE")]
    zerocopy: ZeroCopy,
}

/// The backend the flags ask for, and a note when auto fell back to portable.
fn choose_backend(name: &str, zerocopy: ZeroCopy) -> anyhow::Result<(Backend, Option<String>)> {
    match name {
        "portable" => Ok((Backend::Portable, None)),
        "uring" => {
            clubcast::backend::uring::probe().map_err(|e| {
                anyhow::anyhow!("io_uring is not available here ({e}); use --backend portable")
            })?;
            Ok((Backend::Uring { zerocopy }, None))
        }
        _ => Ok(Backend::detect(zerocopy)),
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let (backend, fallback) = choose_backend(&args.backend, args.zerocopy)?;
    if let Some(reason) = fallback {
        tracing::warn!("{reason}: using the portable backend");
    }
    let config = EngineConfig {
        listen: args.listen,
        relay: RelayConfig {
            subscriber_timeout: args.subscriber_timeout,
            max_channels: args.max_channels,
            max_subscribers_per_channel: args.max_subscribers,
            ..RelayConfig::default()
        },
        socket_buffer: args.socket_buffer,
        workers: worker_count(args.workers.unwrap_or(0)),
        pin: !args.no_pin,
        poll: args.poll,
        pool_slots: args.pool_slots,
        backend,
    };
    let metrics = RelayMetrics::new(backend.name(), config.workers);
    let engine = RelayEngine::bind(&config, metrics.clone())
        .with_context(|| format!("cannot start the relay on udp {}", args.listen))?;
    let server = MetricsServer::start(args.metrics, metrics)
        .with_context(|| format!("cannot serve metrics on tcp {}", args.metrics))?;
    tracing::info!(
        "relay listening on {} (backend {}, {} workers, poll {:?}); metrics on http://{}/metrics",
        engine.local_addr(),
        backend.name(),
        engine.workers(),
        args.poll,
        server.local_addr()
    );
    let stop = AtomicBool::new(false);
    engine.run(&stop).context("relay worker failed")
}
