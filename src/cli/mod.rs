//! Command-line interface: one file per subcommand, each turning flags into library calls.
//! Errors become one line on stderr and a non-zero exit; only this layer uses `anyhow`.

mod args;
mod demo;
mod keygen;
mod loadgen;
mod publish;
mod relay;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: tracing::Level,
}

/// The subcommands; each one's help text is the doc comment of its `Args`.
#[derive(Debug, Subcommand)]
enum Command {
    Demo(demo::Args),
    Keygen(keygen::Args),
    Loadgen(loadgen::Args),
    Publish(publish::Args),
    Relay(relay::Args),
    Watch(watch::Args),
}

/// Runs the command line; the process exit code.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Keygen(a) => keygen::run(a),
        Command::Loadgen(a) => loadgen::run(a),
        Command::Publish(a) => publish::run(a),
        Command::Relay(a) => relay::run(a),
        Command::Watch(a) => watch::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clubcast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
