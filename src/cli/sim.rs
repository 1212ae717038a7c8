//! `clubcast sim`: run a swarm scenario in the deterministic simulator and print its report.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clubcast::sim::{self, Scenario};

/// Simulate a swarm: run a scenario file through the real swarm code on a simulated network.
///
/// One thread, virtual time: the publisher, tracker, relays and every peer are the same state
/// machines the real programs run; the network (delay by region, capacity and queues, bursty
/// loss, reordering, duplication), churn and attackers come from the scenario (see
/// tests/scenarios/ for examples and the README for every key). The same scenario and seed give
/// the same report byte for byte; the simulator's own speed goes to stderr.
///
/// Exits with status 1 if a bound of the scenario's [bounds] table does not hold.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Scenario file (TOML).
    #[arg(long, value_name = "FILE")]
    scenario: PathBuf,

    /// Seed of every random choice [default: the scenario's `seed`, else 1].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,

    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,

    /// Also draw the delay CDF and continuity over time to this SVG file.
    #[arg(long, value_name = "OUT.svg")]
    plot: Option<PathBuf>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let scenario = Scenario::load(&args.scenario)?;
    let seed = args.seed.unwrap_or(scenario.seed);
    let started = Instant::now();
    let report = sim::run(&scenario, seed)?;
    let wall = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    eprintln!(
        "simulator: {} events in {wall:.2} s wall ({:.0} events/s, {:.1}x real time)",
        report.events,
        report.events as f64 / wall.max(1e-9),
        report.simulated_s / wall.max(1e-9)
    );
    if let Some(path) = &args.plot {
        sim::plot(&report, path).with_context(|| format!("plot for {}", scenario.name))?;
        eprintln!("plot written to {}", path.display());
    }
    if !report.passed() {
        let failed: Vec<&str> = report
            .bounds
            .iter()
            .filter(|b| !b.ok)
            .map(|b| b.name.as_str())
            .collect();
        bail!("bounds not met: {}", failed.join(", "));
    }
    Ok(())
}
