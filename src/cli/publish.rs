//! `clubcast publish`: publish an MPEG-TS stream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clubcast::client::publish::{run_publish, Input, PublishConfig, PublishSwarm};
use clubcast::crypto::ChannelKey;

use super::args;

/// Publish an MPEG-TS stream (stdin, file or UDP) as signed pieces, to a relay (--to), into a
/// swarm (--tracker), or both.
///
/// The stream is cut into pieces of six 188-byte TS
/// packets, each signed with the channel key. Live input (stdin, udp://) is sent as it arrives;
/// a file is sent as fast as --max-bitrate allows, or at its own bitrate with --realtime. When
/// the input ends, end-of-stream pieces tell viewers to finish.
///
/// With --tracker the publisher registers the channel's signed descriptor (key, clubs, bitrate)
/// and seeds each club: every piece goes to a few members of its club, who pass it on. Its
/// upload to the swarm never exceeds --upload-limit.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Secret channel key written by `clubcast keygen`.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// Make the channel private: encrypt every payload with this content key (written by
    /// `clubcast keygen --private`). Relays still verify and forward; only watchers given the
    /// same file can play.
    #[arg(long, value_name = "FILE")]
    content_key: Option<PathBuf>,

    /// MPEG-TS source: `-` for stdin, `udp://IP:PORT` to listen for datagrams, or a file.
    #[arg(long, default_value = "-", value_name = "SOURCE")]
    input: String,

    /// Relay to push pieces to.
    #[arg(long, value_name = "ADDR", value_parser = args::socket_addr, required_unless_present = "tracker")]
    to: Option<SocketAddr>,

    /// Tracker of the swarm to seed (see `clubcast tracker`).
    #[arg(long, value_name = "ADDR", value_parser = args::socket_addr)]
    tracker: Option<SocketAddr>,

    /// Most the publisher uploads to the swarm (e.g. 4mbit; default: unlimited), counting
    /// everything it sends, IP and UDP headers included. Twice the stream's bitrate seeds
    /// every club twice.
    #[arg(long, value_name = "RATE", value_parser = args::bitrate, requires = "tracker")]
    upload_limit: Option<u64>,

    /// The stream's bitrate as announced to the swarm, which members size their uploads by
    /// (default: --max-bitrate).
    #[arg(long, value_name = "RATE", value_parser = args::bitrate, requires = "tracker")]
    stream_bitrate: Option<u64>,

    /// Before publishing, wait up to this long for members to take a seed in every club (they
    /// then play from the first piece). 0s starts at once.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = args::duration, requires = "tracker")]
    wait_for_seeds: Duration,

    /// Local UDP address of the publisher's swarm socket.
    #[arg(long, default_value = "0.0.0.0:0", value_name = "ADDR", value_parser = args::socket_addr)]
    swarm_listen: SocketAddr,

    /// Send a file at its real bitrate, paced by its PCR timestamps.
    #[arg(long)]
    realtime: bool,

    /// Never send faster than this (e.g. 20mbit, 500kbit).
    #[arg(long, default_value = "20mbit", value_name = "RATE", value_parser = args::bitrate)]
    max_bitrate: u64,

    /// Number of clubs the stream's pieces are split into (1 to 64). In a swarm, aim for clubs
    /// of three to five members: K ≈ expected peers / 4.
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = clap::value_parser!(u8).range(1..=64))]
    clubs: u8,

    /// How long to wait for the relay to acknowledge the channel.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = args::duration)]
    announce_timeout: Duration,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let key = ChannelKey::read_file(&args.key).context("cannot load the channel key")?;
    let config = PublishConfig {
        input: Input::parse(&args.input)?,
        relay: args.to,
        swarm: args.tracker.map(|tracker| PublishSwarm {
            tracker,
            listen: args.swarm_listen,
            upload_limit_bps: args.upload_limit,
            stream_bitrate_bps: args.stream_bitrate.unwrap_or(args.max_bitrate),
            linger: Duration::from_secs(3),
            wait_for_seeds: args.wait_for_seeds,
        }),
        realtime: args.realtime,
        max_bitrate_bps: args.max_bitrate,
        clubs: args.clubs,
        announce_timeout: args.announce_timeout,
        content_key: args::content_key(args.content_key.as_deref())?,
    };
    match (args.to, args.tracker) {
        (Some(to), Some(t)) => eprintln!(
            "publishing channel {} to {to} and the swarm of tracker {t}",
            key.public()
        ),
        (Some(to), None) => eprintln!("publishing channel {} to {to}", key.public()),
        (None, Some(t)) => eprintln!(
            "publishing channel {} to the swarm of tracker {t}",
            key.public()
        ),
        (None, None) => {}
    }
    let report = run_publish(key, &config, Arc::new(AtomicBool::new(false)))?;
    eprintln!(
        "published {} pieces ({} bytes of MPEG-TS) in {:.2} s{}",
        report.pieces,
        report.payload_bytes,
        report.elapsed.as_secs_f64(),
        if report.skipped_bytes > 0 {
            format!(
                "; skipped {} bytes that were not whole TS packets",
                report.skipped_bytes
            )
        } else {
            String::new()
        }
    );
    if let Some(s) = report.swarm {
        eprintln!(
            "swarm: uploaded {} bytes of pieces to {} JOINs granted; repairs served {}",
            s.upload_bytes(),
            s.joins_granted,
            s.repairs_served
        );
    }
    Ok(())
}
