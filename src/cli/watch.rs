//! `clubcast watch`: watch a channel.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clubcast::client::watch::{run_watch, WatchConfig};
use clubcast::crypto::ChannelPublicKey;
use clubcast::fault::FaultSpec;
use clubcast::viewer::ViewerConfig;

use super::args;

/// Watch a channel through a relay and write its MPEG-TS to stdout or a file.
///
/// Subscribes, verifies every piece against the channel key,
/// reorders within the jitter window, and writes the MPEG-TS to stdout or a file, so that
/// `clubcast watch ... | ffplay -` plays it. Exits 0 when the publisher ends the stream.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Relay to subscribe at.
    #[arg(long, value_name = "ADDR", value_parser = args::socket_addr)]
    relay: SocketAddr,

    /// Channel to watch: the public key printed by `clubcast keygen` (64 hex digits).
    #[arg(long, value_name = "KEY", value_parser = channel)]
    channel: ChannelPublicKey,

    /// Where to write the stream: `-` for stdout, or a file (created or truncated).
    #[arg(long, default_value = "-", value_name = "DEST")]
    output: String,

    /// How long a missing piece is waited for before it is skipped.
    #[arg(long, default_value = "200ms", value_name = "DURATION", value_parser = args::duration)]
    jitter: Duration,

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
    let config = WatchConfig {
        relay: args.relay,
        channel: args.channel,
        viewer: ViewerConfig {
            jitter_window: args.jitter,
            content_key: args::content_key(args.content_key.as_deref())?,
            ..ViewerConfig::default()
        },
        idle_timeout: args.idle_timeout,
        faults: args.faults,
    };
    tracing::info!("watching channel {} at {}", args.channel, args.relay);
    let report = run_watch(&config, &mut output, &AtomicBool::new(false), &mut |_| {})?;
    let s = report.stats;
    if let Some(f) = report.faults {
        eprintln!(
            "faults injected: {} of {} datagrams dropped, {} duplicated, {} reordered",
            f.dropped, f.seen, f.duplicated, f.reordered
        );
    }
    eprintln!(
        "end of stream: played {} pieces ({} bytes), lost {}, late {}, duplicates {}, bad signatures {}",
        s.pieces_played, s.bytes_played, s.pieces_lost, s.late, s.duplicates, s.bad_signatures
    );
    Ok(())
}
