//! `clubcast demo`: a publisher, a relay and many viewers on loopback, with a live progress
//! line and a summary table. Uses the same engine, publisher and viewer loops as the real
//! commands; no external tool is needed.

use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clubcast::client::publish::{run_publish, Input, PublishConfig, PublishReport};
use clubcast::client::watch::{run_watch, WatchConfig, WatchEnd, WatchReport};
use clubcast::crypto::ChannelKey;
use clubcast::engine::{worker_count, Backend, EngineConfig, RelayEngine, ZeroCopy};
use clubcast::metrics::{latency_histogram, RelayMetrics};
use clubcast::viewer::ViewerConfig;
use hdrhistogram::Histogram;

use super::args;

/// Run a publisher, a relay and 50 viewers on loopback, and report what they did.
///
/// The publisher sends a built-in synthetic MPEG-TS stream; the relay and viewers are the same
/// code as `clubcast relay` and `clubcast watch`. A live line shows pieces, delivered share and
/// latency; a summary table follows. Exits non-zero if a viewer misses the end of the stream.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Number of viewers.
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=2000))]
    viewers: u32,

    /// How long the publisher streams.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = args::duration)]
    duration: Duration,

    /// Bitrate of the synthetic stream.
    #[arg(long, default_value = "2mbit", value_name = "RATE", value_parser = args::bitrate)]
    bitrate: u64,
}

/// What all viewers have seen so far.
struct Audience {
    pieces: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let (backend, _) = Backend::detect(ZeroCopy::Auto);
    let config = EngineConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        backend,
        workers: worker_count(0),
        // The demo's viewers share these cores with the relay: pinned workers would wait for
        // whichever viewer holds their core.
        pin: false,
        ..EngineConfig::default()
    };
    let metrics = RelayMetrics::new(backend.name(), config.workers);
    let relay = RelayEngine::bind(&config, metrics.clone())
        .context("cannot bind the demo relay on loopback")?
        .spawn()?;
    let key = ChannelKey::generate();
    let channel = key.public();
    eprintln!(
        "clubcast demo: 1 publisher → relay {} ({} backend) → {} viewers, {:.1} s of a {:.1} Mbit/s synthetic stream (channel {})",
        relay.addr(),
        backend.name(),
        args.viewers,
        args.duration.as_secs_f64(),
        args.bitrate as f64 / 1e6,
        &channel.to_hex()[..16],
    );

    let audience = Arc::new(Audience {
        pieces: AtomicU64::new(0),
        latency_us: Mutex::new(latency_histogram()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let watch_config = WatchConfig {
        relay: relay.addr(),
        channel,
        viewer: ViewerConfig::default(),
        idle_timeout: Some(args.duration + Duration::from_secs(10)),
        faults: None,
    };
    let viewers: Vec<_> = (0..args.viewers)
        .map(|i| {
            spawn_viewer(
                i,
                watch_config.clone(),
                Arc::clone(&audience),
                Arc::clone(&stop),
            )
        })
        .collect::<io::Result<_>>()?;
    wait_for_subscribers(&metrics, u64::from(args.viewers))?;

    let publish_config = PublishConfig {
        content_key: None,
        input: Input::Synthetic {
            bitrate_bps: args.bitrate,
            duration: args.duration,
        },
        relay: Some(relay.addr()),
        swarm: None,
        realtime: false,
        max_bitrate_bps: args.bitrate.saturating_mul(4),
        clubs: 1,
        announce_timeout: Duration::from_secs(5),
    };
    let publish_stop = Arc::clone(&stop);
    let publisher = thread::Builder::new()
        .name("demo-publisher".into())
        .spawn(move || run_publish(key, &publish_config, publish_stop))?;

    let started = Instant::now();
    let interval = if io::stderr().is_terminal() {
        250
    } else {
        1000
    };
    while !publisher.is_finished() {
        thread::sleep(Duration::from_millis(interval));
        progress(started, &metrics, &audience);
    }
    let published = publisher
        .join()
        .map_err(|_| anyhow::anyhow!("publisher thread panicked"))??;
    let reports: Vec<WatchReport> = viewers
        .into_iter()
        .map(|v| {
            v.join()
                .map_err(|_| anyhow::anyhow!("viewer thread panicked"))?
        })
        .collect::<anyhow::Result<_>>()?;
    if io::stderr().is_terminal() {
        eprintln!();
    }
    stop.store(true, Ordering::Relaxed);
    relay.stop()?;
    summary(&published, &reports, &metrics, &audience);
    let finished = reports
        .iter()
        .filter(|r| r.end == WatchEnd::EndOfStream)
        .count();
    if finished != reports.len() {
        bail!(
            "{} of {} viewers did not reach the end of the stream",
            reports.len() - finished,
            reports.len()
        );
    }
    Ok(())
}

fn spawn_viewer(
    i: u32,
    config: WatchConfig,
    audience: Arc<Audience>,
    stop: Arc<AtomicBool>,
) -> io::Result<thread::JoinHandle<anyhow::Result<WatchReport>>> {
    thread::Builder::new()
        .name(format!("demo-viewer-{i}"))
        .spawn(move || {
            let mut local = latency_histogram();
            let mut on_piece = |latency_us: u64| {
                local.saturating_record(latency_us);
                audience.pieces.fetch_add(1, Ordering::Relaxed);
                if local.len() >= 64 {
                    merge(&audience, &mut local);
                }
            };
            let report = run_watch(&config, &mut io::sink(), &stop, &mut on_piece);
            merge(&audience, &mut local);
            Ok(report?)
        })
}

fn merge(audience: &Audience, local: &mut Histogram<u64>) {
    let mut shared = audience
        .latency_us
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let _ = shared.add(&*local);
    local.reset();
}

fn wait_for_subscribers(metrics: &RelayMetrics, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.stats().subscribers < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} viewers subscribed within 10 s",
                metrics.stats().subscribers
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn progress(started: Instant, metrics: &RelayMetrics, audience: &Audience) {
    let stats = metrics.stats();
    let expected = stats.piece_sends;
    let got = audience.pieces.load(Ordering::Relaxed);
    let pct = if expected == 0 {
        100.0
    } else {
        100.0 * got as f64 / expected as f64
    };
    let h = audience
        .latency_us
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // On a terminal the line redraws in place; in a log it is one line per update.
    let (start, end) = if io::stderr().is_terminal() {
        ("\r", "")
    } else {
        ("", "\n")
    };
    eprint!(
        "{start}  {:5.1} s  pieces {:6}  delivered {:7.3} %  latency p50 {}  p99 {}  subscribers {:4}   {end}",
        started.elapsed().as_secs_f64(),
        stats.pieces_accepted,
        pct.min(100.0),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        stats.subscribers,
    );
    let _ = io::stderr().flush();
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn summary(
    published: &PublishReport,
    reports: &[WatchReport],
    metrics: &RelayMetrics,
    audience: &Audience,
) {
    let n = reports.len() as u64;
    let sum = |f: fn(&WatchReport) -> u64| reports.iter().map(f).sum::<u64>();
    let played_bytes = sum(|r| r.stats.bytes_played);
    let expected_bytes = published.payload_bytes * n;
    let finished = reports
        .iter()
        .filter(|r| r.end == WatchEnd::EndOfStream)
        .count();
    let relay = metrics.stats();
    let dropped: u64 = relay.drops.iter().sum();
    let h = audience
        .latency_us
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let q = |q: f64| ms(h.value_at_quantile(q));
    let f = |q: f64| ms(metrics.forward_latency_us(q));
    let rows: [(&str, String); 8] = [
        (
            "published",
            format!(
                "{} pieces, {} bytes of MPEG-TS in {:.2} s",
                published.pieces,
                published.payload_bytes,
                published.elapsed.as_secs_f64()
            ),
        ),
        (
            "relay",
            format!(
                "{} accepted, {} copies forwarded, {} dropped",
                relay.pieces_accepted, relay.piece_sends, dropped
            ),
        ),
        (
            "viewers finished",
            format!("{finished} of {n} reached end of stream"),
        ),
        (
            "delivered",
            format!(
                "{:.3} % of bytes ({} of {})",
                pct(played_bytes, expected_bytes),
                played_bytes,
                expected_bytes
            ),
        ),
        (
            "lost / late / dup",
            format!(
                "{} / {} / {} pieces over all viewers",
                sum(|r| r.stats.pieces_lost),
                sum(|r| r.stats.late),
                sum(|r| r.stats.duplicates)
            ),
        ),
        (
            "bad signatures",
            format!("{}", sum(|r| r.stats.bad_signatures)),
        ),
        (
            "publish → viewer",
            format!(
                "p50 {}  p99 {}  p99.9 {}  max {}",
                q(0.5),
                q(0.99),
                q(0.999),
                ms(h.max())
            ),
        ),
        (
            "relay forward",
            format!(
                "p50 {}  p99 {}  p99.9 {}  (receive → last copy sent)",
                f(0.5),
                f(0.99),
                f(0.999)
            ),
        ),
    ];
    println!();
    println!("  {:<18} summary", "clubcast demo");
    println!("  {:-<18} {:-<60}", "", "");
    for (k, v) in rows {
        println!("  {k:<18} {v}");
    }
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        100.0
    } else {
        100.0 * a as f64 / b as f64
    }
}
