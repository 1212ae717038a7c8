//! `clubcast tracker`: tell swarm members who else is in their channel.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use clubcast::time::MonotonicClock;
use clubcast::tracker::{TrackerConfig, TrackerCore};
use clubcast::wire::MAX_DATAGRAM;

use super::args;

/// Run a tracker: members of a channel (peers, relays, the publisher) announce themselves and
/// get back other members, relays first, and the channel's signed descriptor.
///
/// Members prove their address with HELLO/COOKIE before they get a list; entries expire when a
/// member stops announcing for --member-ttl. Descriptors are accepted only with a valid
/// signature of the channel key they name, and a newer session replaces an older one. Each new
/// watcher is given the club whose members announced the least upload (each claim counted up
/// to 4x the stream's bitrate), so every club can carry its share to all the others.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7100", value_name = "ADDR", value_parser = args::socket_addr)]
    listen: SocketAddr,

    /// Forget a member this long after its last announce.
    /// (Settled members announce every 5 s: three missed announces.)
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = args::duration)]
    member_ttl: Duration,

    /// Most channels tracked; more are refused.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_channels: usize,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(args.listen)
        .with_context(|| format!("cannot listen on udp {}", args.listen))?;
    socket.set_read_timeout(Some(Duration::from_millis(250)))?;
    let config = TrackerConfig {
        member_ttl: args.member_ttl,
        max_channels: args.max_channels,
        ..TrackerConfig::default()
    };
    let mut core = TrackerCore::new(config, rand::random(), rand::random());
    tracing::info!("tracker listening on {}", socket.local_addr()?);
    let clock = MonotonicClock::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut next_sweep = Instant::now();
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => core.handle(clock.now(), from, &buf[..n], &mut |reply| {
                // A refused send is the member's loss; it announces again.
                let _ = socket.send_to(reply, from);
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => tracing::debug!("recv: {e}"),
        }
        if Instant::now() >= next_sweep {
            core.handle_timeout(clock.now());
            next_sweep = Instant::now() + Duration::from_secs(1);
        }
    }
}
