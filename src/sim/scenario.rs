//! Scenario files: what a simulation runs (stream, publisher, relays, peers, network, churn,
//! adversaries) and the bounds its report must meet. TOML, every key optional but the peer
//! count; unknown keys are errors so a typo is never a silently different experiment.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::SimError;

/// A whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, shown in the report.
    #[serde(default)]
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// Seed of every random choice (`--seed` overrides it).
    #[serde(default = "one")]
    pub seed: u64,
    /// The stream.
    #[serde(default)]
    pub stream: StreamSpec,
    /// The publisher.
    #[serde(default)]
    pub publisher: PublisherSpec,
    /// Relay amplifiers.
    #[serde(default)]
    pub relays: RelaySpec,
    /// The viewers.
    pub peers: PeerSpec,
    /// The network between everyone.
    #[serde(default)]
    pub network: NetworkSpec,
    /// Peers leaving and joining during the stream.
    #[serde(default)]
    pub churn: ChurnSpec,
    /// Misbehaving members.
    #[serde(default)]
    pub adversaries: AdversarySpec,
    /// What the report measures besides the whole run.
    #[serde(default)]
    pub measure: MeasureSpec,
    /// What the report must show.
    #[serde(default)]
    pub bounds: Bounds,
}

/// What the report measures besides the whole run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeasureSpec {
    /// Also measure the steady state: continuity and delay of the pieces published this long
    /// after the stream starts, once the swarm has formed (every peer joins around the start,
    /// a flash crowd that scenarios of churn and loss do not mean to test). When set, the
    /// continuity and delay bounds apply to the steady state; the report shows both.
    #[serde(deserialize_with = "opt_duration")]
    pub steady_after: Option<Duration>,
}

/// The stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSpec {
    /// Bitrate, kbit/s.
    pub bitrate_kbps: u64,
    /// Clubs K.
    pub clubs: u8,
    /// When the publisher starts publishing.
    #[serde(deserialize_with = "duration")]
    pub start: Duration,
    /// How long it publishes.
    #[serde(deserialize_with = "duration")]
    pub duration: Duration,
    /// How far behind the source viewers play: a piece arriving later than its publish time
    /// plus this is a miss.
    #[serde(deserialize_with = "duration")]
    pub playout_delay: Duration,
}

impl Default for StreamSpec {
    fn default() -> Self {
        StreamSpec {
            bitrate_kbps: 1000,
            clubs: 8,
            start: Duration::from_secs(3),
            duration: Duration::from_secs(20),
            playout_delay: Duration::from_secs(2),
        }
    }
}

/// The publisher.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublisherSpec {
    /// Upload, in multiples of the stream rate.
    pub upload: f64,
}

impl Default for PublisherSpec {
    fn default() -> Self {
        PublisherSpec { upload: 4.0 }
    }
}

/// Relay amplifiers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySpec {
    /// How many.
    pub count: usize,
    /// Most downstream links each.
    pub out_degree: usize,
    /// Upload, in multiples of the stream rate (none: as much as the out-degree needs).
    pub upload: Option<f64>,
}

impl Default for RelaySpec {
    fn default() -> Self {
        RelaySpec {
            count: 0,
            out_degree: 500,
            upload: None,
        }
    }
}

/// The viewers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    /// How many join at first.
    pub count: usize,
    /// When the first joins.
    #[serde(default, deserialize_with = "duration")]
    pub join_at: Duration,
    /// The joins are spread evenly over this long (a flash crowd is a short one).
    #[serde(default = "two_seconds", deserialize_with = "duration")]
    pub join_over: Duration,
    /// Kinds of peers by upload; one class with 1.5× the stream rate if none is given.
    #[serde(default = "default_classes")]
    pub class: Vec<PeerClass>,
}

/// A kind of peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerClass {
    /// Share of the peers in this class (shares are normalised).
    pub share: f64,
    /// Upload, in multiples of the stream rate.
    pub upload: f64,
    /// Download, in multiples of the stream rate.
    #[serde(default = "ten")]
    pub download: f64,
}

/// The network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSpec {
    /// Where members are; the one-way delay between two members is the sum of their regions'
    /// delays to the backbone, plus a fixed per-pair part and a per-datagram jitter.
    pub region: Vec<Region>,
    /// Per-datagram jitter, uniform in [0, this].
    #[serde(deserialize_with = "duration")]
    pub jitter: Duration,
    /// Average loss rate on every member's access link (Gilbert–Elliott).
    pub loss: f64,
    /// Mean length of a loss burst, in datagrams (1: independent losses).
    pub burst: f64,
    /// Share of datagrams held back (reordered).
    pub reorder: f64,
    /// How long a reordered datagram is held, at most.
    #[serde(deserialize_with = "duration")]
    pub reorder_delay: Duration,
    /// Share of datagrams delivered twice.
    pub duplicate: f64,
    /// Most queueing on an access link before datagrams are dropped.
    #[serde(deserialize_with = "duration")]
    pub queue: Duration,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            region: vec![Region {
                share: 1.0,
                delay: Duration::from_millis(15),
                spread: Duration::from_millis(10),
            }],
            jitter: Duration::from_millis(2),
            loss: 0.0,
            burst: 1.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(20),
            duplicate: 0.0,
            queue: Duration::from_millis(300),
        }
    }
}

/// A region of the world.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Share of the peers in it.
    pub share: f64,
    /// One-way delay from its members to the backbone.
    #[serde(deserialize_with = "duration")]
    pub delay: Duration,
    /// Each pair of members gets a fixed extra delay, uniform in [0, this].
    #[serde(default, deserialize_with = "duration")]
    pub spread: Duration,
}

/// Peers leaving and joining.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChurnSpec {
    /// Share of the peers that leave per minute; each is replaced by a new peer.
    pub per_minute: f64,
    /// Share of leavers that say goodbye (the rest vanish).
    pub graceful: f64,
    /// Churn starts this long after the stream.
    #[serde(deserialize_with = "duration")]
    pub after: Duration,
}

impl Default for ChurnSpec {
    fn default() -> Self {
        ChurnSpec {
            per_minute: 0.0,
            graceful: 0.5,
            after: Duration::from_secs(2),
        }
    }
}

/// Misbehaving members.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdversarySpec {
    /// Share of peers that corrupt every piece they forward.
    pub forgers: f64,
    /// Share of peers that never upload.
    pub free_riders: f64,
    /// Share of peers that forward every piece late.
    pub delayers: f64,
    /// How late delayers forward.
    #[serde(deserialize_with = "duration")]
    pub delay: Duration,
    /// JOINs per second from spoofed addresses at each relay (or the publisher).
    pub bogus_joins_per_s: u64,
}

impl Default for AdversarySpec {
    fn default() -> Self {
        AdversarySpec {
            forgers: 0.0,
            free_riders: 0.0,
            delayers: 0.0,
            delay: Duration::from_secs(1),
            bogus_joins_per_s: 0,
        }
    }
}

/// What the report must show (honest peers only).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bounds {
    /// Least continuity over all honest peers' pieces.
    pub min_continuity: Option<f64>,
    /// Least continuity of the worst honest peer.
    pub min_peer_continuity: Option<f64>,
    /// Most delay behind source, 99th percentile.
    #[serde(deserialize_with = "opt_duration")]
    pub max_delay_p99: Option<Duration>,
    /// Most startup time, 99th percentile.
    #[serde(deserialize_with = "opt_duration")]
    pub max_startup_p99: Option<Duration>,
    /// Most honest peers that never started playing.
    pub max_never_started: Option<u64>,
    /// Most club outages (a club one honest peer missed whole for 2 s or more).
    pub max_club_outages: Option<u64>,
    /// Most publisher upload, in multiples of the stream rate.
    pub max_publisher_upload: Option<f64>,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::parse(&text).map_err(|e| match e {
            SimError::Scenario(m) => SimError::Scenario(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses and checks a scenario.
    pub fn parse(text: &str) -> Result<Self, SimError> {
        let s: Scenario = toml::from_str(text).map_err(|e| SimError::Scenario(e.to_string()))?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Scenario(m.to_string()));
        let share = |x: f64| (0.0..=1.0).contains(&x);
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if self.stream.bitrate_kbps == 0 || self.stream.bitrate_kbps > 100_000 {
            return bad("stream.bitrate_kbps must be 1..=100000");
        }
        if !(1..=64).contains(&self.stream.clubs) {
            return bad("stream.clubs must be 1..=64");
        }
        if self.stream.duration.is_zero() {
            return bad("stream.duration must be more than 0");
        }
        if self
            .measure
            .steady_after
            .is_some_and(|w| w >= self.stream.duration)
        {
            return bad("measure.steady_after must be shorter than stream.duration");
        }
        if self.peers.count > 1_000_000 {
            return bad("peers.count must be at most 1000000");
        }
        if self.peers.class.is_empty()
            || self.peers.class.iter().any(|c| {
                !(positive(c.share)
                    && c.upload.is_finite()
                    && c.upload >= 0.0
                    && positive(c.download))
            })
        {
            return bad("peers.class needs share > 0, upload >= 0 and download > 0 for each");
        }
        if self.network.region.is_empty() || self.network.region.iter().any(|r| !positive(r.share))
        {
            return bad("network.region needs at least one region, each with share > 0");
        }
        if !positive(self.publisher.upload) || self.relays.upload.is_some_and(|u| !positive(u)) {
            return bad("publisher.upload and relays.upload must be more than 0");
        }
        let a = &self.adversaries;
        if ![
            self.network.loss,
            self.network.reorder,
            self.network.duplicate,
            self.churn.graceful,
            a.forgers,
            a.free_riders,
            a.delayers,
        ]
        .into_iter()
        .all(share)
            || a.forgers + a.free_riders + a.delayers > 1.0
        {
            return bad("loss, reorder, duplicate, graceful and adversary shares must be in 0..=1");
        }
        if self.network.loss >= 1.0 || self.network.burst < 1.0 {
            return bad("network.loss must be below 1 and network.burst at least 1");
        }
        if !(0.0..=60.0).contains(&self.churn.per_minute) {
            return bad("churn.per_minute must be in 0..=60");
        }
        Ok(())
    }
}

fn one() -> u64 {
    1
}

fn ten() -> f64 {
    10.0
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}

fn default_classes() -> Vec<PeerClass> {
    vec![PeerClass {
        share: 1.0,
        upload: 1.5,
        download: 10.0,
    }]
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    crate::config::values::duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_a_file_leaves_out() {
        let s = Scenario::parse("[peers]\ncount = 10\n").unwrap();
        assert_eq!(s.peers.count, 10);
        assert_eq!(s.stream.bitrate_kbps, 1000);
        assert_eq!(s.peers.class.len(), 1);
        assert_eq!(s.network.region.len(), 1);
    }

    #[test]
    fn typos_and_nonsense_are_errors_that_name_the_key() {
        let e = Scenario::parse("[peers]\ncount = 10\nconut = 3\n").unwrap_err();
        assert!(e.to_string().contains("conut"), "{e}");
        let e = Scenario::parse("[peers]\ncount = 10\n[network]\nloss = 1.5\n").unwrap_err();
        assert!(e.to_string().contains("loss"), "{e}");
        let e = Scenario::parse("[peers]\ncount = 10\n[stream]\nstart = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        assert!(
            Scenario::parse("[stream]\nclubs = 3\n").is_err(),
            "peers are required"
        );
        let e = Scenario::parse(
            "[peers]\ncount = 10\n[stream]\nduration = \"5s\"\n[measure]\nsteady_after = \"5s\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("steady_after"), "{e}");
    }
}
