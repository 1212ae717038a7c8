//! The simulator's own speed on the large scenarios of tests/scenarios/large/ (10 000 peers for
//! 60 s of stream, a 5 000-peer flash crowd, 3 000 peers behind one relay), with the outcome of
//! each against its bounds.
//!
//! Baseline, measured in the same run: each scenario at a tenth of its peers. The ratio of the
//! cost per simulated peer-second (full / tenth) shows how the simulator scales; the absolute
//! figures are wall time, events per second and simulated seconds per wall second. From the
//! largest run's cost per peer-second, it estimates the largest swarm simulated in 10 minutes.
//!
//! Run: `cargo bench --bench sim` (all), or `cargo bench --bench sim -- NAME` for scenarios whose
//! file name contains NAME; `-- --quick` runs only the tenth-sized baselines.

use std::path::Path;
use std::time::Instant;

use clubcast::sim::{self, Report, Scenario};

struct Run {
    report: Report,
    wall_s: f64,
}

impl Run {
    fn peer_seconds(&self) -> f64 {
        self.report.peers_joined as f64 * self.report.simulated_s
    }

    /// Wall microseconds per simulated peer-second.
    fn cost_us(&self) -> f64 {
        self.wall_s * 1e6 / self.peer_seconds()
    }
}

fn run(s: &Scenario) -> Run {
    let start = Instant::now();
    let report = sim::run(s, s.seed).expect("simulation runs");
    Run {
        report,
        wall_s: start.elapsed().as_secs_f64(),
    }
}

fn line(label: &str, r: &Run) {
    let rep = &r.report;
    let failed: Vec<String> = rep
        .bounds
        .iter()
        .filter(|b| !b.ok)
        .map(|b| format!("{} {} (limit {})", b.name, b.value, b.limit))
        .collect();
    let steady = rep.steady.map_or(String::new(), |st| {
        format!(
            "  (from {} s: continuity {:.4}, delay p99 {} ms)",
            st.after_s, st.continuity, st.delay_ms.p99
        )
    });
    println!(
        "{label:<26} {:>6} peers {:>5.0} s sim  {:>7.1} s wall  {:>5.2}x real time  {:>8.0} events/s  {:>6.0} µs/peer-s  continuity {:.4}  delay p99 {} ms{steady}  startup p99 {} ms  {}",
        rep.peers_joined,
        rep.simulated_s,
        r.wall_s,
        rep.simulated_s / r.wall_s,
        rep.events as f64 / r.wall_s,
        r.cost_us(),
        rep.continuity,
        rep.delay_ms.p99,
        rep.startup_ms.p99,
        if failed.is_empty() {
            "bounds met".to_string()
        } else {
            format!("MISSED: {}", failed.join("; "))
        }
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let quick = args.iter().any(|a| a == "--quick");
    let filter = args.iter().find(|a| !a.starts_with("--"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/large");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/scenarios/large")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter(|p| filter.is_none_or(|f| p.to_string_lossy().contains(f.as_str())))
        .collect();
    files.sort();
    let mut costliest: Option<(f64, f64)> = None; // (cost µs per peer-s, simulated s)
    for path in files {
        let full = Scenario::load(&path).expect("scenario loads");
        let mut tenth = full.clone();
        tenth.peers.count = (full.peers.count / 10).max(1);
        let baseline = run(&tenth);
        line(&format!("{} /10", full.name), &baseline);
        if quick {
            continue;
        }
        let r = run(&full);
        line(&full.name, &r);
        println!(
            "{:<26} cost per peer-second {:.2}x the tenth-sized baseline ({:.0} vs {:.0} µs)",
            "",
            r.cost_us() / baseline.cost_us(),
            r.cost_us(),
            baseline.cost_us()
        );
        if r.report.peers_joined >= 5000 && costliest.is_none_or(|(c, _)| r.cost_us() > c) {
            costliest = Some((r.cost_us(), r.report.simulated_s));
        }
    }
    if let Some((cost, secs)) = costliest {
        // Peers × simulated seconds that fit in 600 s of wall time at the costliest measured rate.
        let peers = 600.0 * 1e6 / cost / secs;
        println!(
            "largest swarm in 10 minutes (estimate from the costliest large run, {secs:.0} s simulated): about {peers:.0} peers"
        );
    }
}
