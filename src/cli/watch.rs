//! `clubcast watch`: watch a channel.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use std::sync::Arc;

use clubcast::client::swarm::{run_swarm_watch, SwarmWatchConfig};
use clubcast::client::watch::{run_watch, WatchConfig};
use clubcast::crypto::ChannelPublicKey;
use clubcast::fault::FaultSpec;
use clubcast::metrics::{MetricsServer, SwarmMetrics};
use clubcast::swarm::{Behaviour, SwarmConfig};
use clubcast::viewer::ViewerConfig;

use super::args;

/// Watch a channel through a relay (--relay) or as a member of its swarm (--tracker), and
/// write its MPEG-TS to stdout or a file.
///
/// Verifies every piece against the channel key,
/// reorders within the jitter window, and writes the MPEG-TS to stdout or a file, so that
/// `clubcast watch ... | ffplay -` plays it. Exits 0 when the publisher ends the stream.
///
/// With --tracker the watcher joins the channel's swarm: it waits for the channel to appear,
/// takes its club's pieces from the publisher or club mates and the other clubs from their
/// members, and re-uploads its own club to others, never above --upload-limit.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Relay to subscribe at.
    #[arg(long, value_name = "ADDR", value_parser = args::socket_addr, required_unless_present = "tracker", conflicts_with = "tracker")]
    relay: Option<SocketAddr>,

    /// Join the channel's swarm through this tracker instead of subscribing at a relay.
    #[arg(long, value_name = "ADDR", value_parser = args::socket_addr)]
    tracker: Option<SocketAddr>,

    /// Swarm: most this watcher uploads to other members (e.g. 3mbit; default: unlimited),
    /// counting everything it sends, IP and UDP headers included. The tracker also hears it and balances clubs by their members' upload (a claim counts up to
    /// 4x the stream's bitrate, as does an unlimited one).
    #[arg(long, value_name = "RATE", value_parser = args::bitrate, requires = "tracker")]
    upload_limit: Option<u64>,

    /// Swarm: local UDP address to receive on (other members reach this watcher here).
    #[arg(long, default_value = "0.0.0.0:0", value_name = "ADDR", value_parser = args::socket_addr)]
    listen: SocketAddr,

    /// Swarm: serve /metrics (upload and download by club, repairs, peers replaced and banned,
    /// delay behind the source) on this TCP address.
    #[arg(long, value_name = "ADDR", value_parser = args::socket_addr, requires = "tracker")]
    metrics: Option<SocketAddr>,

    /// Swarm: after the stream ends, keep serving other members this long before leaving.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = args::duration)]
    linger: Duration,

    /// Swarm, for testing: misbehave as `forge` (corrupt what is forwarded), `free-ride`
    /// (never upload) or `delay=DURATION` (forward late).
    #[arg(long, value_name = "KIND", value_parser = adversary, hide = true)]
    adversary: Option<Behaviour>,

    /// Channel to watch: the public key printed by `clubcast keygen` (64 hex digits).
    #[arg(long, value_name = "KEY", value_parser = channel)]
    channel: ChannelPublicKey,

    /// Where to write the stream: `-` for stdout, or a file (created or truncated).
    #[arg(long, default_value = "-", value_name = "DEST")]
    output: String,

    /// How long a missing piece is waited for before it is skipped (default: 200ms from a
    /// relay, 2s in a swarm, where repairs need a round trip or two). In a swarm, gaps are
    /// repaired for as long, and pieces served to others' repairs for as long after arrival.
    #[arg(long, value_name = "DURATION", value_parser = args::duration)]
    jitter: Option<Duration>,

    /// Exit with an error after this long without a piece (default: wait for ever).
    #[arg(long, value_name = "DURATION", value_parser = args::duration)]
    idle_timeout: Option<Duration>,

    /// Inject faults into what arrives from the relay, for testing where the kernel has no
    /// netem: e.g. loss=5%,burst=3,dup=1%,reorder=2%,reorder-by=10ms,delay=20ms,jitter=5ms,seed=7
    /// (burst is the mean length of a loss burst; the same seed repeats the same decisions).
    #[arg(long, value_name = "SPEC")]
    faults: Option<FaultSpec>,

    /// Content key of a private channel (the file `clubcast keygen --private` wrote).
    #[arg(long, value_name = "FILE")]
    content_key: Option<PathBuf>,
}

fn adversary(s: &str) -> Result<Behaviour, String> {
    match s {
        "forge" => Ok(Behaviour::Forger),
        "free-ride" => Ok(Behaviour::FreeRider),
        _ => match s.strip_prefix("delay=") {
            Some(d) => Ok(Behaviour::Delayer(args::duration(d)?)),
            None => Err(format!(
                "{s:?}: expected forge, free-ride or delay=DURATION"
            )),
        },
    }
}

fn channel(s: &str) -> Result<ChannelPublicKey, String> {
    ChannelPublicKey::from_hex(s).map_err(|e| format!("not a channel key: {e}"))
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let mut output: Box<dyn Write> = if args.output == "-" {
        Box::new(io::stdout().lock())
    } else {
        let file = File::create(&args.output)
            .with_context(|| format!("cannot create output file {}", args.output))?;
        Box::new(BufWriter::new(file))
    };
    let content_key = args::content_key(args.content_key.as_deref())?;
    let Some(relay) = args.relay else {
        return run_swarm(args, content_key, &mut output);
    };
    let config = WatchConfig {
        relay,
        channel: args.channel,
        viewer: ViewerConfig {
            jitter_window: args.jitter.unwrap_or(Duration::from_millis(200)),
            content_key,
            ..ViewerConfig::default()
        },
        idle_timeout: args.idle_timeout,
        faults: args.faults,
    };
    tracing::info!("watching channel {} at {relay}", args.channel);
    let report = run_watch(&config, &mut output, &AtomicBool::new(false), &mut |_| {})?;
    let s = report.stats;
    print_faults(report.faults);
    eprintln!(
        "end of stream: played {} pieces ({} bytes), lost {}, late {}, duplicates {}, bad signatures {}",
        s.pieces_played, s.bytes_played, s.pieces_lost, s.late, s.duplicates, s.bad_signatures
    );
    Ok(())
}

fn run_swarm(
    args: Args,
    content_key: Option<clubcast::crypto::ContentKey>,
    output: &mut dyn Write,
) -> anyhow::Result<()> {
    let tracker = args.tracker.context("give --relay or --tracker")?;
    let metrics = SwarmMetrics::new("peer");
    if let Some(addr) = args.metrics {
        let server = MetricsServer::start(addr, Arc::clone(&metrics))
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!("metrics on http://{}/metrics", server.local_addr());
    }
    let jitter_window = args.jitter.unwrap_or(Duration::from_secs(2));
    let config = SwarmWatchConfig {
        channel: args.channel,
        listen: args.listen,
        swarm: SwarmConfig {
            tracker: Some(tracker),
            upload_limit_bps: args.upload_limit,
            behaviour: args.adversary.unwrap_or_default(),
            seed: rand::random(),
            ..SwarmConfig::default()
        }
        .repairing_within(jitter_window),
        viewer: ViewerConfig {
            jitter_window,
            content_key,
            ..ViewerConfig::default()
        },
        idle_timeout: args.idle_timeout,
        faults: args.faults,
        linger: args.linger,
    };
    let channel = args.channel;
    let report = run_swarm_watch(
        &config,
        output,
        &AtomicBool::new(false),
        Some(&metrics),
        &mut |addr| {
            tracing::info!(
                "joining the swarm of channel {channel} through tracker {tracker} from {addr}"
            )
        },
    )?;
    print_faults(report.faults);
    let v = report.viewer;
    let w = report.swarm;
    eprintln!(
        "end of stream: played {} pieces ({} bytes), lost {}, late {}, duplicates {}, bad signatures {}",
        v.pieces_played, v.bytes_played, v.pieces_lost, v.late, w.duplicates, w.bad_pieces
    );
    eprintln!(
        "swarm: uploaded {} bytes, downloaded {} bytes, repaired {} of {} asked, served {} repairs, replaced {} upstreams, banned {} members, delay behind source p50 {} ms p99 {} ms",
        w.upload_bytes(),
        w.download_bytes(),
        w.repaired,
        w.repairs_asked,
        w.repairs_served,
        w.peers_replaced,
        w.peers_banned,
        metrics.delay_us(0.5) / 1000,
        metrics.delay_us(0.99) / 1000
    );
    match report.slowest_club {
        Some((club, Some(after))) => eprintln!(
            "clubs: the last to start was club {club}, {} ms after the first piece",
            after.as_millis()
        ),
        Some((club, None)) => eprintln!("clubs: club {club} never arrived"),
        None => {}
    }
    Ok(())
}

/// Says what the fault injector did, if one ran.
fn print_faults(faults: Option<clubcast::fault::FaultStats>) {
    if let Some(f) = faults {
        eprintln!(
            "faults injected: {} of {} datagrams dropped, {} duplicated, {} reordered",
            f.dropped, f.seen, f.duplicated, f.reordered
        );
    }
}
