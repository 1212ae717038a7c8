//! Relay configuration: built-in defaults, then a TOML file, then `CLUBCAST_*` environment
//! variables, then command-line flags, each layer overriding the one before.
//!
//! Every key is read as text by one parser whatever layer it comes from (`8m` means the same in
//! a file, in `CLUBCAST_SOCKET_BUFFER` and after `--socket-buffer`), and an error names the key,
//! the layer it came from and the reason. The same table of keys gives the relay's flags, their
//! defaults in `--help`, `--print-config`, and which keys a SIGHUP may change live.

pub mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::crypto::ChannelPublicKey;
use crate::engine::{AttachMode, PollMode, TxMode, ZeroCopy};
use crate::relay::RelayConfig;

/// Prefix of the environment variables that set keys: `CLUBCAST_MAX_SUBSCRIBERS` sets
/// `max-subscribers`.
pub const ENV_PREFIX: &str = "CLUBCAST_";

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A config file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File(p) => write!(f, "config file {}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
            Origin::Flag(name) => write!(f, "flag --{name}"),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The reason.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A key the relay does not have.
    #[error("{origin}: unknown key `{key}` (keys: {})", key_names().collect::<Vec<_>>().join(", "))]
    UnknownKey {
        /// Where it was set.
        origin: Origin,
        /// The key as written.
        key: String,
    },
    /// A key with a value it cannot take.
    #[error("{origin}: key `{key}`: {reason}")]
    Invalid {
        /// Where it was set.
        origin: Origin,
        /// The key.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
}

/// Which kernel interface the relay asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring where the kernel has it, else portable.
    #[default]
    Auto,
    /// io_uring, or fail.
    Uring,
    /// recvmmsg/sendmmsg.
    Portable,
    /// AF_XDP on `interface`.
    Xdp,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Everything `clubcast relay` can be told.
#[derive(Debug, Clone, PartialEq)]
pub struct RelaySettings {
    /// UDP address for pieces and subscriptions.
    pub listen: SocketAddr,
    /// TCP address for /metrics, /healthz and /readyz.
    pub metrics: SocketAddr,
    /// Consent lifetime without SUBSCRIBE or KEEPALIVE.
    pub subscriber_timeout: Duration,
    /// Most channels at once.
    pub max_channels: usize,
    /// Most subscribers per channel.
    pub max_subscribers: usize,
    /// Channels the relay serves (public keys); empty: any channel.
    pub channels: Vec<ChannelPublicKey>,
    /// Control messages per second accepted from one source IP.
    pub control_rate: u32,
    /// Piece verifications per second allowed for one source IP.
    pub verify_rate: u32,
    /// Socket buffer per worker, bytes.
    pub socket_buffer: usize,
    /// Worker threads; 0 is one per core.
    pub workers: usize,
    /// How idle workers wait.
    pub poll: PollMode,
    /// Pin workers to cores.
    pub pin: bool,
    /// Pooled packet buffers.
    pub pool_slots: usize,
    /// Kernel interface.
    pub backend: BackendChoice,
    /// Zero-copy sends on io_uring; zero-copy AF_XDP sockets on xdp.
    pub zerocopy: ZeroCopy,
    /// The interface the xdp backend attaches to.
    pub interface: String,
    /// Receive queues the xdp backend serves, one worker each (0: all).
    pub queues: usize,
    /// Where the XDP program runs.
    pub xdp_mode: AttachMode,
    /// How the xdp backend builds copies; `None`: multi-buffer on zero-copy sockets, else copy.
    pub xdp_tx: Option<TxMode>,
    /// Most verbose log level shown.
    pub log_level: tracing::Level,
    /// Log line format.
    pub log_format: LogFormat,
    /// Longest a SIGTERM drain may take before the relay exits anyway.
    pub drain_timeout: Duration,
    /// Tracker of the swarms to amplify (`None`: no swarm).
    pub tracker: Option<SocketAddr>,
    /// Channels whose swarms the relay joins as an amplifier.
    pub swarm_channels: Vec<ChannelPublicKey>,
    /// Local address of the amplifier's swarm sockets (port 0: one ephemeral port each).
    pub swarm_listen: SocketAddr,
    /// Most swarm members the amplifier pushes to, per channel.
    pub swarm_out_degree: usize,
}

impl Default for RelaySettings {
    fn default() -> Self {
        let relay = RelayConfig::default();
        RelaySettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            metrics: SocketAddr::from(([127, 0, 0, 1], 9700)),
            subscriber_timeout: relay.subscriber_timeout,
            max_channels: relay.max_channels,
            max_subscribers: relay.max_subscribers_per_channel,
            channels: Vec::new(),
            control_rate: relay.control_rate_per_source,
            verify_rate: relay.verify_rate_per_source,
            socket_buffer: 8 << 20,
            workers: 0,
            poll: PollMode::Adaptive,
            pin: true,
            pool_slots: 16_384,
            backend: BackendChoice::Auto,
            zerocopy: ZeroCopy::Auto,
            interface: String::new(),
            queues: 0,
            xdp_mode: AttachMode::Native,
            xdp_tx: None,
            log_level: tracing::Level::INFO,
            log_format: LogFormat::Text,
            drain_timeout: Duration::from_secs(5),
            tracker: None,
            swarm_channels: Vec::new(),
            swarm_listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            swarm_out_degree: 500,
        }
    }
}

/// How a key's value is written in TOML and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TOML string; a flag with a value.
    Text,
    /// A TOML integer; a flag with a value.
    Integer,
    /// A TOML boolean; a `--no-KEY` flag for keys that default to true.
    Switch,
    /// A TOML array of strings; a flag with a comma-separated value.
    List,
}

/// One configuration key.
pub struct Key {
    /// Name in files and flags (`max-subscribers`).
    pub name: &'static str,
    /// Placeholder for the value in `--help`.
    pub value_name: &'static str,
    /// What it does, for `--help` and the example config.
    pub help: &'static str,
    /// How the value is written.
    pub kind: Kind,
    /// Whether a SIGHUP reload applies a change without a restart.
    pub live: bool,
    set: fn(&mut RelaySettings, &str) -> Result<(), String>,
    show: fn(&RelaySettings) -> String,
}

impl Key {
    /// The key's value in `settings`, in flag syntax.
    pub fn show(&self, settings: &RelaySettings) -> String {
        (self.show)(settings)
    }

    /// The environment variable that sets this key.
    pub fn env_var(&self) -> String {
        format!(
            "{ENV_PREFIX}{}",
            self.name.replace('-', "_").to_ascii_uppercase()
        )
    }

    /// Checks `text` as a value of this key.
    pub fn check(&self, text: &str) -> Result<(), String> {
        (self.set)(&mut RelaySettings::default(), text)
    }
}

fn positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

fn rate(text: &str) -> Result<u32, String> {
    u32::try_from(positive(text)?).map_err(|_| format!("{text:?} is too large"))
}

fn nonzero_duration(text: &str) -> Result<Duration, String> {
    match values::duration(text)? {
        d if d.is_zero() => Err("must be longer than 0".into()),
        d => Ok(d),
    }
}

fn switch(text: &str) -> Result<bool, String> {
    match text.trim() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("{text:?} is not true or false")),
    }
}

fn channel_list(text: &str) -> Result<Vec<ChannelPublicKey>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| ChannelPublicKey::from_hex(s).map_err(|e| format!("{s:?}: {e}")))
        .collect()
}

/// Every key, in the order `--print-config` shows them.
pub static KEYS: &[Key] = &[
    Key {
        name: "listen",
        value_name: "ADDR",
        help: "UDP address to receive pieces and subscriptions on.",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.listen = values::socket_addr(v)?;
            Ok(())
        },
        show: |s| s.listen.to_string(),
    },
    Key {
        name: "metrics",
        value_name: "ADDR",
        help: "TCP address for /metrics (Prometheus), /healthz (alive) and /readyz (serving).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.metrics = values::socket_addr(v)?;
            Ok(())
        },
        show: |s| s.metrics.to_string(),
    },
    Key {
        name: "subscriber-timeout",
        value_name: "DURATION",
        help: "Drop a subscriber after this long without SUBSCRIBE or KEEPALIVE (e.g. 5s).",
        kind: Kind::Text,
        live: true,
        set: |s, v| {
            s.subscriber_timeout = nonzero_duration(v)?;
            Ok(())
        },
        show: |s| values::show_duration(s.subscriber_timeout),
    },
    Key {
        name: "max-channels",
        value_name: "N",
        help: "Most channels tracked at once; more are refused and counted.",
        kind: Kind::Integer,
        live: true,
        set: |s, v| {
            s.max_channels = positive(v)?;
            Ok(())
        },
        show: |s| s.max_channels.to_string(),
    },
    Key {
        name: "max-subscribers",
        value_name: "N",
        help: "Most subscribers per channel; more are refused and counted. Lowering it live \
               keeps the subscribers already there.",
        kind: Kind::Integer,
        live: true,
        set: |s, v| {
            s.max_subscribers = positive(v)?;
            Ok(())
        },
        show: |s| s.max_subscribers.to_string(),
    },
    Key {
        name: "channels",
        value_name: "KEYS",
        help: "Serve only these channels (public keys, comma-separated; empty: any channel). \
               Channels taken off the list live are dropped with their subscribers.",
        kind: Kind::List,
        live: true,
        set: |s, v| {
            s.channels = channel_list(v)?;
            Ok(())
        },
        show: |s| {
            let keys: Vec<String> = s.channels.iter().map(ToString::to_string).collect();
            keys.join(",")
        },
    },
    Key {
        name: "control-rate",
        value_name: "N",
        help: "Control messages (HELLO, SUBSCRIBE, KEEPALIVE, ANNOUNCE, ...) accepted per \
               second from one source IP, bursts of twice as many; more are dropped as \
               rate_limited.",
        kind: Kind::Integer,
        live: true,
        set: |s, v| {
            s.control_rate = rate(v)?;
            Ok(())
        },
        show: |s| s.control_rate.to_string(),
    },
    Key {
        name: "verify-rate",
        value_name: "N",
        help: "Piece signatures verified per second for one source IP at most; more are \
               dropped as verify_budget (bounds what a forged flood can cost).",
        kind: Kind::Integer,
        live: true,
        set: |s, v| {
            s.verify_rate = rate(v)?;
            Ok(())
        },
        show: |s| s.verify_rate.to_string(),
    },
    Key {
        name: "socket-buffer",
        value_name: "BYTES",
        help: "UDP socket send/receive buffer size per worker (e.g. 8m).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.socket_buffer = values::bytes(v)?;
            Ok(())
        },
        show: |s| values::show_bytes(s.socket_buffer),
    },
    Key {
        name: "workers",
        value_name: "N",
        help: "Worker threads, each with its own socket on the listen address (0: one per core).",
        kind: Kind::Integer,
        live: false,
        set: |s, v| {
            s.workers = v
                .trim()
                .parse()
                .map_err(|_| format!("{v:?} is not a whole number"))?;
            Ok(())
        },
        show: |s| s.workers.to_string(),
    },
    Key {
        name: "poll",
        value_name: "MODE",
        help: "How idle workers wait: busy (spin, lowest latency, burns a core each), adaptive \
               (spin while traffic flows, then block), or block.",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.poll = v.trim().parse()?;
            Ok(())
        },
        show: |s| s.poll.name().to_string(),
    },
    Key {
        name: "pin",
        value_name: "BOOL",
        help: "Pin each worker to its own core.",
        kind: Kind::Switch,
        live: false,
        set: |s, v| {
            s.pin = switch(v)?;
            Ok(())
        },
        show: |s| s.pin.to_string(),
    },
    Key {
        name: "pool-slots",
        value_name: "N",
        help: "Packet buffers shared by the workers; datagrams wait in the socket when all are \
               in use.",
        kind: Kind::Integer,
        live: false,
        set: |s, v| {
            s.pool_slots = positive(v)?;
            Ok(())
        },
        show: |s| s.pool_slots.to_string(),
    },
    Key {
        name: "backend",
        value_name: "BACKEND",
        help: "Kernel interface: uring (io_uring: multishot receive, one submission per round \
               for all sends), portable (recvmmsg/sendmmsg, runs anywhere), xdp (AF_XDP on \
               --interface: datagrams bypass the kernel's UDP stack; needs CAP_BPF, \
               CAP_NET_ADMIN, CAP_NET_RAW), or auto (uring where the kernel has it, else \
               portable).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.backend = v.trim().parse()?;
            Ok(())
        },
        show: |s| s.backend.name().to_string(),
    },
    Key {
        name: "zerocopy",
        value_name: "MODE",
        help: "Zero-copy: on the uring backend, zero-copy sends (auto: off for pieces, which \
               measured cheaper to copy than to pin); on the xdp backend, AF_XDP zero-copy \
               sockets (auto: where the driver has them; veth has not).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.zerocopy = v.trim().parse()?;
            Ok(())
        },
        show: |s| s.zerocopy.name().to_string(),
    },
    Key {
        name: "interface",
        value_name: "IFACE",
        help: "Network interface for the xdp backend; one worker per receive queue served.",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.interface = v.trim().to_string();
            Ok(())
        },
        show: |s| s.interface.clone(),
    },
    Key {
        name: "queues",
        value_name: "N",
        help: "Receive queues of --interface the xdp backend serves, 0..N-1, one worker and \
               AF_XDP socket each (0: all of them). Datagrams on other queues reach the relay \
               through the kernel.",
        kind: Kind::Integer,
        live: false,
        set: |s, v| {
            s.queues = v
                .trim()
                .parse()
                .map_err(|_| format!("{v:?} is not a whole number"))?;
            Ok(())
        },
        show: |s| s.queues.to_string(),
    },
    Key {
        name: "xdp-mode",
        value_name: "MODE",
        help: "Where the XDP program runs: native (in the driver) or generic (any interface, \
               slower).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.xdp_mode = v.trim().parse()?;
            Ok(())
        },
        show: |s| s.xdp_mode.name().to_string(),
    },
    Key {
        name: "xdp-tx",
        value_name: "MODE",
        help: "How the xdp backend builds each copy: copy (headers and payload in one frame), \
               multi-buffer (a header frame plus one shared payload frame), or auto \
               (multi-buffer on zero-copy sockets, copy otherwise, where it measured faster).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.xdp_tx = match v.trim() {
                "auto" => None,
                "copy" => Some(TxMode::Copy),
                "multi-buffer" => Some(TxMode::MultiBuffer),
                other => {
                    return Err(format!(
                        "{other:?} is not an xdp send mode (auto, copy, multi-buffer)"
                    ))
                }
            };
            Ok(())
        },
        show: |s| s.xdp_tx.map_or("auto", TxMode::name).to_string(),
    },
    Key {
        name: "log-level",
        value_name: "LEVEL",
        help: "Most verbose log lines shown: error, warn, info, debug or trace.",
        kind: Kind::Text,
        live: true,
        set: |s, v| {
            s.log_level = v
                .trim()
                .parse()
                .map_err(|_| format!("{v:?} is not error, warn, info, debug or trace"))?;
            Ok(())
        },
        show: |s| s.log_level.as_str().to_ascii_lowercase(),
    },
    Key {
        name: "log-format",
        value_name: "FORMAT",
        help: "Log lines on stderr as text (for people) or json (one object per line, for \
               collectors).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.log_format = v.trim().parse()?;
            Ok(())
        },
        show: |s| s.log_format.name().to_string(),
    },
    Key {
        name: "drain-timeout",
        value_name: "DURATION",
        help: "On SIGTERM, stop taking datagrams, finish queued sends, and exit within this long.",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.drain_timeout = values::duration(v)?;
            Ok(())
        },
        show: |s| values::show_duration(s.drain_timeout),
    },
    Key {
        name: "tracker",
        value_name: "ADDR",
        help: "Join the swarms of swarm-channels through this tracker, as an amplifier: a member \
               of every club that pushes each piece to up to swarm-out-degree members \
               (empty: no swarm).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.tracker = match v.trim() {
                "" => None,
                t => Some(values::socket_addr(t)?),
            };
            Ok(())
        },
        show: |s| s.tracker.map(|t| t.to_string()).unwrap_or_default(),
    },
    Key {
        name: "swarm-channels",
        value_name: "KEYS",
        help: "Channels (public keys, comma-separated) whose swarms the relay amplifies; needs \
               tracker.",
        kind: Kind::List,
        live: false,
        set: |s, v| {
            s.swarm_channels = channel_list(v)?;
            Ok(())
        },
        show: |s| {
            let keys: Vec<String> = s.swarm_channels.iter().map(ToString::to_string).collect();
            keys.join(",")
        },
    },
    Key {
        name: "swarm-listen",
        value_name: "ADDR",
        help: "UDP address of the amplifier's swarm sockets (port 0: an ephemeral port per \
               channel; a fixed port is the first channel's, the next channels take the ports \
               after it).",
        kind: Kind::Text,
        live: false,
        set: |s, v| {
            s.swarm_listen = values::socket_addr(v)?;
            Ok(())
        },
        show: |s| s.swarm_listen.to_string(),
    },
    Key {
        name: "swarm-out-degree",
        value_name: "N",
        help: "Most swarm members the amplifier pushes to, per channel.",
        kind: Kind::Integer,
        live: false,
        set: |s, v| {
            s.swarm_out_degree = positive(v)?;
            Ok(())
        },
        show: |s| s.swarm_out_degree.to_string(),
    },
];

/// The names of every key.
pub fn key_names() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|k| k.name)
}

/// The key called `name`.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

impl RelaySettings {
    /// Sets key `name` from `text`, as given at `origin`.
    pub fn set(&mut self, name: &str, text: &str, origin: &Origin) -> Result<(), ConfigError> {
        let key = key(name).ok_or_else(|| ConfigError::UnknownKey {
            origin: origin.clone(),
            key: name.to_string(),
        })?;
        (key.set)(self, text).map_err(|reason| ConfigError::Invalid {
            origin: origin.clone(),
            key: key.name,
            reason,
        })
    }

    /// Applies the keys of a TOML document read from `path`.
    pub fn apply_toml(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    reason: e.message().to_string(),
                })?;
        let origin = Origin::File(path.to_path_buf());
        for (name, value) in &table {
            let text = toml_text(value).map_err(|reason| match key(name) {
                Some(k) => ConfigError::Invalid {
                    origin: origin.clone(),
                    key: k.name,
                    reason,
                },
                None => ConfigError::UnknownKey {
                    origin: origin.clone(),
                    key: name.clone(),
                },
            })?;
            self.set(name, &text, &origin)?;
        }
        Ok(())
    }

    /// Applies every `CLUBCAST_*` variable in `vars`; another `CLUBCAST_` name is an error (a
    /// typo would otherwise be ignored).
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (var, text) in vars {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let origin = Origin::Env(var.clone());
            let name = rest.to_ascii_lowercase().replace('_', "-");
            self.set(&name, &text, &origin)?;
        }
        Ok(())
    }

    /// The settings from defaults, then the file at `file` (if any), then `env`, then `flags`
    /// (key name, value text) in order.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut settings = RelaySettings::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            settings.apply_toml(&text, path)?;
        }
        settings.apply_env(env)?;
        for (name, text) in flags {
            settings.set(name, text, &Origin::Flag(name.clone()))?;
        }
        Ok(settings)
    }

    /// The settings as a TOML document that [`RelaySettings::apply_toml`] reads back.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for key in KEYS {
            let shown = key.show(self);
            let value = match key.kind {
                Kind::Integer | Kind::Switch => shown,
                Kind::Text => toml::Value::String(shown).to_string(),
                Kind::List => {
                    let items: Vec<String> = shown
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_string()).to_string())
                        .collect();
                    format!("[{}]", items.join(", "))
                }
            };
            out.push_str(&format!("{} = {value}\n", key.name));
        }
        out
    }

    /// Keys whose values differ between `self` and `new`.
    pub fn changed_keys(&self, new: &RelaySettings) -> Vec<&'static Key> {
        KEYS.iter()
            .filter(|k| k.show(self) != k.show(new))
            .collect()
    }

    /// The relay core's tunables these settings ask for.
    pub fn relay_config(&self) -> RelayConfig {
        RelayConfig {
            subscriber_timeout: self.subscriber_timeout,
            max_channels: self.max_channels,
            max_subscribers_per_channel: self.max_subscribers,
            allowed_channels: (!self.channels.is_empty()).then(|| {
                self.channels
                    .iter()
                    .map(ChannelPublicKey::channel_id)
                    .collect()
            }),
            control_rate_per_source: self.control_rate,
            verify_rate_per_source: self.verify_rate,
            ..RelayConfig::default()
        }
    }
}

/// A TOML value as the text a flag would take.
fn toml_text(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| match v {
                toml::Value::String(s) if !s.contains(',') => Ok(s.clone()),
                _ => Err("expected a list of strings".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(",")),
        toml::Value::Table(_) | toml::Value::Datetime(_) => {
            Err("expected a string, number, boolean or list".into())
        }
    }
}

impl BackendChoice {
    /// The name used in flags and files.
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Uring => "uring",
            BackendChoice::Portable => "portable",
            BackendChoice::Xdp => "xdp",
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "uring" => Ok(BackendChoice::Uring),
            "portable" => Ok(BackendChoice::Portable),
            "xdp" => Ok(BackendChoice::Xdp),
            _ => Err(format!(
                "{s:?} is not a backend (auto, uring, portable, xdp)"
            )),
        }
    }
}

impl LogFormat {
    /// The name used in flags and files.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not a log format (text, json)")),
        }
    }
}

#[cfg(test)]
mod tests;
