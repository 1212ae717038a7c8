//! The deterministic swarm simulator: a scenario file ([`Scenario`]) run through the real
//! sans-IO members ([`crate::swarm::SwarmNode`]) and tracker ([`crate::tracker::TrackerCore`])
//! on a simulated network, in virtual time, on one thread. The same scenario and seed give the
//! same [`Report`] byte for byte.
//!
//! - `scenario`: the TOML format and its checks;
//! - `network`: access links with capacity and queues, delay by region, bursty loss,
//!   reordering, duplication;
//! - `world`: the event loop — members, tracker, publisher, churn, attacks, measurement;
//! - `report`: what a run found and whether the scenario's bounds held;
//! - `plot`: the delay CDF and continuity over time as SVG.

mod network;
mod plot;
mod queue;
mod report;
mod scenario;
mod world;

pub use plot::draw as plot;
pub use report::{
    Attacks, BoundCheck, Duplicates, Links, NetworkCounts, Quantiles, Repairs, Report, Spread,
};
pub use scenario::{
    AdversarySpec, Bounds, ChurnSpec, NetworkSpec, PeerClass, PeerSpec, PublisherSpec, Region,
    RelaySpec, Scenario, StreamSpec,
};

/// What can go wrong running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The scenario is not valid.
    #[error("bad scenario: {0}")]
    Scenario(String),
    /// The plot could not be drawn.
    #[error("cannot draw plot: {0}")]
    Plot(String),
    /// Setting up failed (a bug).
    #[error("simulator: {0}")]
    Internal(String),
}

/// Runs `scenario` with `seed` to the end.
pub fn run(scenario: &Scenario, seed: u64) -> Result<Report, SimError> {
    Ok(world::World::new(scenario, seed)?.run())
}
