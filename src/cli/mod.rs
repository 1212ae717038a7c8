//! Command-line interface: one file per subcommand, each turning flags into library calls.
//! Errors become one line on stderr and a non-zero exit; only this layer uses `anyhow`.

mod args;
mod demo;
mod keygen;
mod loadgen;
mod logging;
mod publish;
mod relay;
mod sim;
mod top;
mod tracker;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clubcast::config::LogFormat;

/// clubcast: live video carried by its viewers. A publisher signs every piece of an MPEG-TS
/// stream, relays verify and fan pieces out over UDP, viewers verify, reorder and play.
///
/// Start with `clubcast demo`. A real stream: `clubcast keygen --out channel.key`, then
/// `clubcast relay`, `ffmpeg ... -f mpegts - | clubcast publish --key channel.key --to RELAY`,
/// and `clubcast watch --relay RELAY --channel KEY | ffplay -`.
#[derive(Debug, Parser)]
#[command(name = "clubcast", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Log level on stderr: error, warn, info, debug or trace [default: info].
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<tracing::Level>,

    /// Log lines as text (for people) or json (one object per line, for collectors)
    /// [default: text].
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

/// The logging flags, which `clubcast relay` also takes from its config file and environment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogFlags {
    level: Option<tracing::Level>,
    format: Option<LogFormat>,
}

impl LogFlags {
    /// The flags given on the command line, as config keys and values.
    pub(crate) fn as_config(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(level) = self.level {
            out.push(("log-level".into(), level.to_string().to_ascii_lowercase()));
        }
        if let Some(format) = self.format {
            out.push(("log-format".into(), format.name().into()));
        }
        out
    }
}

/// The subcommands; each one's help text is the doc comment of its `Args`.
#[derive(Debug, Subcommand)]
enum Command {
    Demo(demo::Args),
    Keygen(keygen::Args),
    Loadgen(loadgen::Args),
    Publish(publish::Args),
    Relay(relay::Args),
    Sim(sim::Args),
    Top(top::Args),
    Tracker(tracker::Args),
    Watch(Box<watch::Args>),
}

/// Runs the command line; the process exit code.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = LogFlags {
        level: cli.log_level,
        format: cli.log_format,
    };
    if !matches!(cli.command, Command::Relay(_)) {
        // The relay sets up logging itself, once its config file is read.
        logging::Logging::init(
            log.level.unwrap_or(tracing::Level::INFO),
            log.format.unwrap_or_default(),
        );
    }
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Keygen(a) => keygen::run(a),
        Command::Loadgen(a) => loadgen::run(a),
        Command::Publish(a) => publish::run(a),
        Command::Relay(a) => relay::run(a, log),
        Command::Sim(a) => sim::run(a),
        Command::Top(a) => top::run(a),
        Command::Tracker(a) => tracker::run(a),
        Command::Watch(a) => watch::run(*a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clubcast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
