//! `clubcast loadgen`: measure what a relay delivers.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use clubcast::loadgen::{run_load, LoadConfig, LoadReport};
use clubcast::wire::PieceHeader;

use super::args;

/// Measure a relay: a signing publisher and N subscribers in one process.
///
/// The publisher announces a fresh channel and sends signed pieces at --rate (or --bitrate);
/// subscribers do the real handshake and count what arrives (without verifying, so the
/// generator is not the bottleneck). Reports delivered ratio, loss, duplicates, reorders, output
/// pieces/s and Gbit/s, and latency from publisher send to subscriber receive. --find-max
/// searches for the highest rate that keeps the delivered ratio at or above 0.999.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The relay under test.
    #[arg(long, value_name = "ADDR", value_parser = args::socket_addr)]
    relay: SocketAddr,

    /// Subscribers to run.
    #[arg(long, default_value_t = 100, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    subscribers: u32,

    /// Pieces per second to publish (the start rate with --find-max).
    #[arg(long, value_name = "PPS", conflicts_with = "bitrate")]
    rate: Option<u64>,

    /// Publish this many bits per second instead of a piece rate (e.g. 8mbit).
    #[arg(long, value_name = "RATE", value_parser = args::bitrate)]
    bitrate: Option<u64>,

    /// Payload bytes per piece (1128 = six TS packets; at most 1136).
    #[arg(long, default_value_t = 1128, value_name = "BYTES")]
    payload: usize,

    /// How long to publish (per trial with --find-max).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = args::duration)]
    duration: Duration,

    /// Receiver threads draining the subscriber sockets.
    #[arg(long, default_value_t = 1, value_name = "N")]
    receiver_threads: usize,

    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,

    /// Also send a forgery (one payload byte changed, the signature kept) before every Nth
    /// piece (0: none). A relay that forwarded one shows it as a duplicate.
    #[arg(long, default_value_t = 0, value_name = "N")]
    forge_every: u64,

    /// Search for the highest rate with delivered ratio ≥ 0.999.
    #[arg(long)]
    find_max: bool,
}

/// Delivered ratio a rate must keep to count as sustained.
const SUSTAINED: f64 = 0.999;

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    if args.payload > PieceHeader::MAX_PAYLOAD || args.payload == 0 {
        bail!("--payload must be 1 to {} bytes", PieceHeader::MAX_PAYLOAD);
    }
    let rate = match (args.rate, args.bitrate) {
        (Some(r), _) => r,
        (None, Some(bps)) => (bps / (8 * args.payload as u64)).max(1),
        (None, None) => 1000,
    };
    let config = LoadConfig {
        relay: args.relay,
        subscribers: args.subscribers as usize,
        rate_pps: rate,
        payload: args.payload,
        duration: args.duration,
        receiver_threads: args.receiver_threads,
        progress: !args.json && !args.find_max,
        key_seed: None,
        forge_every: args.forge_every,
    };
    let report = if args.find_max {
        find_max(&config)?
    } else {
        run_load(&config)?
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Doubles the rate until delivery falls below [`SUSTAINED`], then bisects; the report of the
/// highest sustained rate.
fn find_max(base: &LoadConfig) -> anyhow::Result<LoadReport> {
    let trial = |rate: u64| -> anyhow::Result<LoadReport> {
        let r = run_load(&LoadConfig {
            rate_pps: rate,
            ..base.clone()
        })?;
        eprintln!(
            "  rate {rate:>8} pieces/s: delivered {:.5}",
            r.delivered_ratio
        );
        Ok(r)
    };
    let mut best: Option<(u64, LoadReport)> = None;
    let mut rate = base.rate_pps;
    let mut ceiling = None;
    while ceiling.is_none() && rate <= 10_000_000 {
        let r = trial(rate)?;
        if r.delivered_ratio >= SUSTAINED {
            best = Some((rate, r));
            rate *= 2;
        } else {
            ceiling = Some(rate);
        }
    }
    let Some((mut lo, mut report)) = best else {
        bail!(
            "even {} pieces/s is not sustained (delivered < {SUSTAINED})",
            base.rate_pps
        );
    };
    let mut hi = ceiling.unwrap_or(rate);
    while hi - lo > lo / 20 {
        let mid = lo + (hi - lo) / 2;
        let r = trial(mid)?;
        if r.delivered_ratio >= SUSTAINED {
            (lo, report) = (mid, r);
        } else {
            hi = mid;
        }
    }
    eprintln!("  highest sustained rate: {lo} pieces/s");
    Ok(report)
}

fn print_table(r: &LoadReport) {
    let h = &r.latency_us;
    println!("  pieces sent       {}", r.pieces_sent);
    if r.forged_sent > 0 {
        println!("  forged sent       {}", r.forged_sent);
    }
    println!("  subscribers       {}", r.subscribers);
    println!("  delivered ratio   {:.6}", r.delivered_ratio);
    println!(
        "  lost / dup / reorders   {} / {} / {}",
        r.lost, r.duplicates, r.reorders
    );
    println!(
        "  output            {:.0} pieces/s, {:.3} Gbit/s",
        r.pps_out, r.gbps_out
    );
    println!(
        "  latency (µs)      p50 {}  p99 {}  p99.9 {}  max {}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}
