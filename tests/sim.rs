//! The simulator as users run it: every scenario in tests/scenarios/ meets the bounds it states,
//! a scenario and seed give the same report byte for byte, and `clubcast sim` reports, plots and
//! refuses bad input clearly.

mod common;

use std::path::{Path, PathBuf};

use clubcast::sim::{self, Scenario};

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios")
}

/// Runs a scenario file with its own seed and fails with the whole report if a bound is missed.
fn meets_its_bounds(file: &str) {
    let scenario = Scenario::load(&scenarios_dir().join(file)).expect("scenario loads");
    let report = sim::run(&scenario, scenario.seed).expect("simulation runs");
    assert!(
        !report.bounds.is_empty() && report.honest_peers > 0 && report.pieces_published > 0,
        "{file}: nothing measured\n{report}"
    );
    assert!(report.passed(), "{file} missed a bound:\n{report}");
}

macro_rules! scenarios {
    ($($name:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $name() {
                meets_its_bounds($file);
            }
        )*

        /// A scenario file nobody runs would be a claim nobody checks.
        #[test]
        fn every_scenario_file_is_run() {
            let listed = [$($file),*];
            for entry in std::fs::read_dir(scenarios_dir()).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let name = path.file_name().unwrap().to_str().unwrap().to_string();
                    assert!(listed.contains(&name.as_str()), "{name} is not in tests/sim.rs");
                }
            }
        }
    };
}

scenarios! {
    scenario_loss_and_churn => "loss-churn.toml",
    scenario_loss_and_churn_with_more_upload => "loss-churn-2x.toml",
    scenario_flash_crowd => "flash-crowd.toml",
    scenario_forgers => "forgers.toml",
    scenario_free_riders => "free-riders.toml",
    scenario_delayers => "delayers.toml",
    scenario_relay_amplifier => "relay-amplifier.toml",
    scenario_bogus_subscriber_flood => "bogus-flood.toml",
    scenario_small_clubs_with_loss => "small-clubs-loss.toml",
}

/// A small scenario that draws on every source of randomness: regions, jitter, bursty loss,
/// reordering, duplication, churn, heterogeneous peers, forgers and a flood of spoofed JOINs.
const EVERYTHING: &str = r#"
name = "everything"
[stream]
clubs = 6
start = "2s"
duration = "6s"
[relays]
count = 1
[peers]
count = 40
join_over = "2s"
[[peers.class]]
share = 0.6
upload = 2.0
[[peers.class]]
share = 0.4
upload = 0.9
[network]
loss = 0.03
burst = 2.0
reorder = 0.02
duplicate = 0.01
[[network.region]]
share = 0.5
delay = "10ms"
spread = "10ms"
[[network.region]]
share = 0.5
delay = "50ms"
spread = "20ms"
[churn]
per_minute = 0.5
after = "1s"
[adversaries]
forgers = 0.1
bogus_joins_per_s = 500
"#;

#[test]
fn a_scenario_and_seed_give_the_same_report_byte_for_byte() {
    let s = Scenario::parse(EVERYTHING).unwrap();
    let first = sim::run(&s, 7).unwrap();
    let again = sim::run(&s, 7).unwrap();
    assert_eq!(first.to_json(), again.to_json());
    assert_eq!(first.to_string(), again.to_string());
    // The run did something worth comparing: churn, loss, attacks, repairs.
    assert!(first.peers_left > 0, "{first}");
    assert!(
        first.network.lost > 0 && first.network.duplicated > 0,
        "{first}"
    );
    assert!(
        first.attacks.bogus_joins > 0 && first.attacks.forged_caught > 0,
        "{first}"
    );
    assert!(first.repairs.repaired > 0, "{first}");
    assert_eq!(first.attacks.forged_played, 0, "{first}");
    // And the seed matters.
    let other = sim::run(&s, 8).unwrap();
    assert_ne!(first.to_json(), other.to_json());
}

#[test]
fn a_steady_state_is_measured_beside_the_whole_run_and_holds_the_bounds() {
    let text = "[stream]\nclubs = 4\nduration = \"8s\"\n[peers]\ncount = 30\n\
                [network]\nloss = 0.03\n[bounds]\nmin_continuity = 0.5\nmax_delay_p99 = \"2s\"\n";
    let whole = sim::run(&Scenario::parse(text).unwrap(), 2).unwrap();
    assert!(whole.steady.is_none());
    let names: Vec<&str> = whole.bounds.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names[..2], ["continuity", "delay p99 ms"]);
    let text = format!("{text}[measure]\nsteady_after = \"4s\"\n");
    let r = sim::run(&Scenario::parse(&text).unwrap(), 2).unwrap();
    // Measuring changes nothing in the run.
    assert_eq!(
        (r.continuity, r.delay_ms, r.events),
        (whole.continuity, whole.delay_ms, whole.events)
    );
    let st = r.steady.expect("steady state measured");
    assert_eq!(st.after_s, 4.0);
    assert!(st.continuity > 0.5 && st.worst_peer_continuity <= st.continuity);
    assert!(st.delay_ms.p50 > 0.0 && st.delay_ms.max <= r.delay_ms.max);
    // The bounds hold the steady state, and say so.
    let steady: Vec<(&str, f64)> = r
        .bounds
        .iter()
        .map(|b| (b.name.as_str(), b.value))
        .collect();
    assert_eq!(
        steady[..2],
        [
            ("steady continuity", st.continuity),
            ("steady delay p99 ms", st.delay_ms.p99)
        ]
    );
    let shown = r.to_string();
    assert!(
        shown.contains("steady state (pieces published from 4 s on): continuity"),
        "{shown}"
    );
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["steady"]["after_s"], 4.0);
}

#[test]
fn the_cli_reports_json_and_draws_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("everything.toml");
    std::fs::write(&file, EVERYTHING).unwrap();
    let svg = dir.path().join("plot.svg");
    let run = || {
        common::clubcast()
            .args(["sim", "--scenario"])
            .arg(&file)
            .args(["--seed", "3", "--json", "--plot"])
            .arg(&svg)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(json["scenario"], "everything");
    assert_eq!(json["seed"], 3);
    assert!(json["continuity"].as_f64().unwrap() > 0.5, "{json}");
    assert!(json["delay_cdf"].as_array().unwrap().len() > 10);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("events/s"), "{stderr}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("delay behind source"));
    // The same run through the CLI prints the same bytes.
    assert_eq!(run().stdout, out.stdout);
}

#[test]
fn the_cli_refuses_bad_scenarios_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let sim_with = |text: &str| {
        let file = dir.path().join("s.toml");
        std::fs::write(&file, text).unwrap();
        let out = common::clubcast()
            .args(["sim", "--scenario"])
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = sim_with("[peers]\ncount = 5\nspeed = 3\n");
    assert_eq!(code, Some(1));
    assert!(
        err.contains("bad scenario") && err.contains("speed"),
        "{err}"
    );
    let (code, err) = sim_with("[peers]\ncount = 5\n[network]\nloss = 2.0\n");
    assert_eq!(code, Some(1));
    assert!(err.contains("loss"), "{err}");
    // A bound the run cannot meet fails the command, naming the bound.
    let (code, err) = sim_with(
        "[stream]\nduration = \"2s\"\n[peers]\ncount = 5\n[bounds]\nmax_delay_p99 = \"1ms\"\n",
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("bounds not met: delay p99"), "{err}");
    let out = common::clubcast()
        .args(["sim", "--scenario", "/nonexistent/s.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read scenario /nonexistent/s.toml"),
        "{err}"
    );
}
