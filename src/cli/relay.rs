//! `clubcast relay`: the relay appliance's lifecycle. Loads the configuration (defaults, file,
//! environment, flags), runs the engine and the operations endpoint, reloads on SIGHUP and
//! drains on SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use clubcast::client::swarm::MemberThread;
use clubcast::config::{BackendChoice, Key, Kind, RelaySettings, KEYS};
use clubcast::engine::{
    worker_count, Backend, Drained, EngineConfig, RelayEngine, RelayHandle, XdpConfig,
};
use clubcast::metrics::{MetricsServer, RelayMetrics, SwarmMetrics};
use clubcast::swarm::{SwarmConfig, SwarmNode};
use clubcast::wire::Role;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::logging::Logging;
use super::LogFlags;

const ABOUT: &str = "Run a relay: verify pieces and fan them out to every subscriber of their \
                     channel.";
const LONG_ABOUT: &str = "\
Run a relay: verify pieces and fan them out to every subscriber of their channel.

Publishers announce their channel and push signed pieces; the relay verifies every piece and \
forwards it to each subscriber of its channel. Subscribers prove their address with a stateless \
cookie (HELLO → COOKIE → SUBSCRIBE) and must send a KEEPALIVE at least every \
--subscriber-timeout.

Every setting below is also a key in the --config TOML file (same name: max-subscribers = 100) \
and an environment variable (CLUBCAST_MAX_SUBSCRIBERS=100); flags beat the environment, which \
beats the file. --print-config shows the result.

Signals: SIGHUP re-reads the config file and applies subscriber-timeout, max-channels, \
max-subscribers, channels, control-rate, verify-rate and log-level without dropping subscribers (other keys need a \
restart, and say so in the log). SIGTERM or SIGINT drains: /readyz turns 503, new datagrams \
are dropped, queued sends finish, and the relay exits 0 within --drain-timeout.

Operations endpoint on --metrics: /metrics (Prometheus), /healthz, /readyz.";

/// The relay's command line: a config file, and the settings given as flags.
#[derive(Debug)]
pub(crate) struct Args {
    config: Option<PathBuf>,
    print_config: bool,
    /// Settings given as flags: (key, value text).
    flags: Vec<(String, String)>,
}

/// Keys that are global flags of every subcommand rather than relay flags.
fn is_global(key: &Key) -> bool {
    matches!(key.name, "log-level" | "log-format")
}

/// The flag id of `key`: a switch that defaults to on is turned off with `--no-KEY`.
fn flag_id(key: &Key) -> String {
    match key.kind {
        Kind::Switch => format!("no-{}", key.name),
        _ => key.name.to_string(),
    }
}

fn key_arg(key: &'static Key, defaults: &RelaySettings) -> Arg {
    let env = key.env_var();
    match key.kind {
        Kind::Switch => Arg::new(flag_id(key))
            .long(flag_id(key))
            .action(ArgAction::SetTrue)
            .help(format!(
                "Turn off: {} [config: {} = false] [env: {env}=false]",
                key.help, key.name
            )),
        _ => {
            let shown = key.show(defaults);
            let arg = Arg::new(key.name)
                .long(key.name)
                .value_name(key.value_name)
                .help(format!("{} [env: {env}]", key.help))
                .value_parser(move |text: &str| key.check(text).map(|()| text.to_string()));
            if shown.is_empty() {
                arg
            } else {
                arg.default_value(shown)
            }
        }
    }
}

impl clap::Args for Args {
    fn augment_args(cmd: Command) -> Command {
        let defaults = RelaySettings::default();
        let cmd = cmd
            .about(ABOUT)
            .long_about(LONG_ABOUT)
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("Read settings from this TOML file (keys as the flags, e.g. max-subscribers = 100)."),
            )
            .arg(
                Arg::new("print-config")
                    .long("print-config")
                    .action(ArgAction::SetTrue)
                    .help("Print the effective settings as TOML and exit."),
            );
        KEYS.iter()
            .filter(|k| !is_global(k))
            .fold(cmd, |cmd, key| cmd.arg(key_arg(key, &defaults)))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for Args {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
        let flags = KEYS
            .iter()
            .filter(|k| !is_global(k) && given(&flag_id(k)))
            .map(|k| {
                let value = match k.kind {
                    Kind::Switch => "false".to_string(),
                    _ => m.get_one::<String>(k.name).cloned().unwrap_or_default(),
                };
                (k.name.to_string(), value)
            })
            .collect();
        Ok(Args {
            config: m.get_one::<PathBuf>("config").cloned(),
            print_config: m.get_flag("print-config"),
            flags,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// Where the settings come from, kept for SIGHUP reloads.
struct Sources {
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
    flags: Vec<(String, String)>,
}

impl Sources {
    fn load(&self) -> anyhow::Result<RelaySettings> {
        Ok(RelaySettings::load(
            self.file.as_deref(),
            self.env.iter().cloned(),
            &self.flags,
        )?)
    }
}

/// The process environment's `CLUBCAST_*` variables (others are none of our business).
fn clubcast_env() -> anyhow::Result<Vec<(String, String)>> {
    std::env::vars_os()
        .filter(|(k, _)| {
            k.to_str()
                .is_some_and(|k| k.starts_with(clubcast::config::ENV_PREFIX))
        })
        .map(|(k, v)| {
            let k = k.to_string_lossy().into_owned();
            let v = v
                .into_string()
                .map_err(|_| anyhow::anyhow!("environment variable {k} is not UTF-8"))?;
            Ok((k, v))
        })
        .collect()
}

/// The backend the settings ask for, and a note when auto fell back to portable.
fn choose_backend(s: &RelaySettings) -> anyhow::Result<(Backend, Option<String>)> {
    match s.backend {
        BackendChoice::Portable => Ok((Backend::Portable, None)),
        BackendChoice::Uring => {
            clubcast::backend::uring::probe().map_err(|e| {
                anyhow::anyhow!("io_uring is not available here ({e}); use --backend portable")
            })?;
            Ok((
                Backend::Uring {
                    zerocopy: s.zerocopy,
                },
                None,
            ))
        }
        BackendChoice::Auto => Ok(Backend::detect(s.zerocopy)),
        BackendChoice::Xdp if s.interface.is_empty() => {
            anyhow::bail!("--backend xdp needs --interface IFACE (the NIC to attach to)")
        }
        BackendChoice::Xdp => Ok((Backend::Xdp, None)),
    }
}

/// Workers to run: as asked, or one per core, or (xdp) one per receive queue served.
fn workers(s: &RelaySettings, backend: Backend) -> anyhow::Result<usize> {
    if backend != Backend::Xdp {
        return Ok(worker_count(s.workers));
    }
    match (s.queues, s.workers) {
        (0, 0) => Ok(clubcast::backend::xdp::Interface::lookup(&s.interface)?.rx_queues as usize),
        (q, 0) => Ok(q),
        (0, w) => Ok(w),
        (q, w) if q == w => Ok(q),
        (q, w) => anyhow::bail!(
            "--queues {q} and --workers {w} disagree: the xdp backend runs one worker per queue"
        ),
    }
}

fn engine_config(s: &RelaySettings, backend: Backend) -> anyhow::Result<EngineConfig> {
    Ok(EngineConfig {
        listen: s.listen,
        relay: s.relay_config(),
        socket_buffer: s.socket_buffer,
        workers: workers(s, backend)?,
        pin: s.pin,
        poll: s.poll,
        pool_slots: s.pool_slots,
        backend,
        xdp: (backend == Backend::Xdp).then(|| XdpConfig {
            interface: s.interface.clone(),
            attach: s.xdp_mode,
            zerocopy: s.zerocopy,
            tx: s.xdp_tx,
        }),
    })
}

pub(crate) fn run(args: Args, log: LogFlags) -> anyhow::Result<()> {
    let mut flags = args.flags;
    flags.extend(log.as_config());
    let sources = Sources {
        file: args.config,
        env: clubcast_env()?,
        flags,
    };
    let settings = sources.load()?;
    if args.print_config {
        print!("{}", settings.to_toml());
        return Ok(());
    }
    let logging = Logging::init(settings.log_level, settings.log_format);
    // Before any thread starts, so no signal reaches a worker's default handler.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot handle signals")?;

    let (backend, fallback) = choose_backend(&settings)?;
    if let Some(reason) = fallback {
        tracing::warn!("{reason}: using the portable backend");
    }
    let config = engine_config(&settings, backend)?;
    let metrics = RelayMetrics::new(backend.name(), config.workers);
    let engine = RelayEngine::bind(&config, metrics.clone())
        .with_context(|| format!("cannot start the relay on udp {}", settings.listen))?;
    let swarm_metrics = SwarmMetrics::new("relay");
    let server = MetricsServer::start(settings.metrics, (metrics.clone(), swarm_metrics.clone()))
        .with_context(|| format!("cannot serve metrics on tcp {}", settings.metrics))?;
    let workers = engine.workers();
    let backend_name = match engine.xdp_summary() {
        Some(summary) => {
            metrics.set_backend_mode(summary);
            format!("xdp: {summary}")
        }
        None => backend.name().to_string(),
    };
    let relay = engine.spawn().context("cannot start the relay workers")?;
    metrics.set_ready(true);
    tracing::info!(
        "relay listening on {} (backend {backend_name}, {workers} workers, poll {}); metrics on http://{}/metrics",
        relay.addr(),
        settings.poll.name(),
        server.local_addr()
    );
    let _amplifiers = start_amplifiers(&settings, &swarm_metrics)?;
    serve(relay, &metrics, &mut signals, &sources, settings, &logging)
}

/// Runs until a worker fails or a signal says stop; reloads on SIGHUP.
fn serve(
    relay: RelayHandle,
    metrics: &RelayMetrics,
    signals: &mut Signals,
    sources: &Sources,
    mut settings: RelaySettings,
    logging: &Logging,
) -> anyhow::Result<()> {
    loop {
        for signal in signals.pending() {
            match signal {
                SIGHUP => settings = reload(&relay, sources, settings, logging),
                _ => return drain(relay, metrics, signal, settings.drain_timeout),
            }
        }
        if let Some((redirected, passed)) = relay.xdp_counts() {
            metrics.set_xdp_packets(redirected, passed);
        }
        if relay.any_finished() {
            metrics.set_ready(false);
            relay.stop().context("relay worker failed")?;
            anyhow::bail!("a relay worker stopped unexpectedly");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Re-reads the configuration and applies what can change live; on error keeps the old one.
fn reload(
    relay: &RelayHandle,
    sources: &Sources,
    old: RelaySettings,
    logging: &Logging,
) -> RelaySettings {
    let new = match sources.load() {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("reload failed, keeping the running configuration: {e:#}");
            return old;
        }
    };
    let changed = old.changed_keys(&new);
    let (live, restart): (Vec<&Key>, Vec<&Key>) = changed.iter().partition(|k| k.live);
    for key in &restart {
        tracing::warn!(
            "reload: {} changed to {:?}; it takes effect on restart",
            key.name,
            key.show(&new)
        );
    }
    if live.is_empty() {
        tracing::info!("reload: no live setting changed");
        return old;
    }
    relay.reconfigure(new.relay_config());
    logging.set_level(new.log_level);
    let applied: Vec<String> = live
        .iter()
        .map(|k| format!("{} = {}", k.name, k.show(&new)))
        .collect();
    tracing::info!("reload: applied {}", applied.join(", "));
    // Keys that need a restart keep their running values.
    let mut running = new;
    for key in restart {
        let _ = running.set(
            key.name,
            &key.show(&old),
            &clubcast::config::Origin::Default,
        );
    }
    running
}

/// Drains the relay for shutdown.
fn drain(
    relay: RelayHandle,
    metrics: &RelayMetrics,
    signal: i32,
    bound: Duration,
) -> anyhow::Result<()> {
    let name = if signal == SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    tracing::info!("{name}: draining (at most {bound:?})");
    metrics.set_ready(false);
    let started = std::time::Instant::now();
    let (outcome, result) = relay.drain(bound);
    result.context("relay worker failed while draining")?;
    let stats = metrics.stats();
    match outcome {
        Drained::Complete => tracing::info!(
            "drained in {:.0?}: {} pieces accepted, {} copies forwarded in all; exiting",
            started.elapsed(),
            stats.pieces_accepted,
            stats.piece_sends
        ),
        Drained::TimedOut => tracing::warn!(
            "drain bound of {bound:?} passed with sends still queued; exiting anyway"
        ),
    }
    Ok(())
}

/// Joins the swarms of `swarm-channels` as an amplifier: one member per channel, a member of
/// every club with a large out-degree. They stop with the relay.
fn start_amplifiers(
    settings: &RelaySettings,
    metrics: &Arc<SwarmMetrics>,
) -> anyhow::Result<Vec<MemberThread>> {
    let tracker = match (settings.tracker, settings.swarm_channels.is_empty()) {
        (None, true) => return Ok(Vec::new()),
        (None, false) => anyhow::bail!("swarm-channels needs a tracker (--tracker ADDR)"),
        (Some(_), true) => {
            anyhow::bail!("--tracker needs the channels to amplify (--swarm-channels KEYS)")
        }
        (Some(t), false) => t,
    };
    let mut members = Vec::new();
    for (i, channel) in settings.swarm_channels.iter().enumerate() {
        let node = SwarmNode::new(
            *channel,
            SwarmConfig {
                role: Role::Relay,
                tracker: Some(tracker),
                max_downstreams: settings.swarm_out_degree,
                seed: rand::random(),
                ..SwarmConfig::default()
            },
        );
        // A fixed port is the first channel's; the next channels take the ports after it.
        let mut listen = settings.swarm_listen;
        if listen.port() != 0 {
            let port = u16::try_from(usize::from(listen.port()) + i)
                .context("swarm-listen port + channels exceeds 65535")?;
            listen.set_port(port);
        }
        let member = MemberThread::spawn(
            "swarm-amplifier",
            listen,
            node,
            Some((Arc::clone(metrics), i)),
        )
        .with_context(|| format!("cannot bind the swarm socket on udp {}", listen))?;
        tracing::info!(%channel, %tracker, swarm = %member.local_addr(), "amplifying the swarm");
        members.push(member);
    }
    Ok(members)
}
