//! Fault injection for the project's own sockets (this kernel has no netem): loss, bursty loss
//! (Gilbert–Elliott), duplication, reordering and delay, decided by a seeded generator so a
//! run can be repeated. Sans-IO: datagrams go in with the time they arrived and come out when
//! they are due; the IO loop that wraps its socket with it decides what "arrive" means.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::time::Timestamp;

/// What to inject; parsed from `loss=5%,burst=3,dup=1%,reorder=2%,delay=20ms,jitter=5ms,seed=7`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// Long-run share of datagrams lost.
    pub loss: f64,
    /// Mean length of a loss burst, in datagrams (1: independent losses).
    pub burst: f64,
    /// Share of datagrams delivered twice.
    pub duplicate: f64,
    /// Share of datagrams held back behind later ones (by up to `reorder_by`).
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_by: Duration,
    /// Delay added to every datagram.
    pub delay: Duration,
    /// Extra random delay, uniform in 0..jitter (datagrams closer than that may swap).
    pub jitter: Duration,
    /// Seed of the decisions.
    pub seed: u64,
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec {
            loss: 0.0,
            burst: 1.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_by: Duration::from_millis(10),
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            seed: 1,
        }
    }
}

/// A fault specification that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad fault spec {spec:?}: {reason} (e.g. loss=5%,burst=3,dup=1%,reorder=2%,delay=20ms,jitter=5ms,seed=7)")]
pub struct FaultSpecError {
    spec: String,
    reason: String,
}

fn share(v: &str) -> Result<f64, String> {
    let (num, scale) = match v.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (v, 1.0),
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a share"))?;
    let x = x / scale;
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(format!("{v:?} is not between 0 and 100%"))
    }
}

impl std::str::FromStr for FaultSpec {
    type Err = FaultSpecError;
    fn from_str(text: &str) -> Result<Self, FaultSpecError> {
        let err = |reason: String| FaultSpecError {
            spec: text.to_string(),
            reason,
        };
        let mut spec = FaultSpec::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
            let duration = || crate::config::values::duration(value).map_err(&err);
            match key.trim() {
                "loss" => spec.loss = share(value).map_err(&err)?,
                "burst" => {
                    spec.burst = value
                        .parse::<f64>()
                        .ok()
                        .filter(|b| *b >= 1.0)
                        .ok_or_else(|| err(format!("burst {value:?} is not a length ≥ 1")))?
                }
                "dup" => spec.duplicate = share(value).map_err(&err)?,
                "reorder" => spec.reorder = share(value).map_err(&err)?,
                "reorder-by" => spec.reorder_by = duration()?,
                "delay" => spec.delay = duration()?,
                "jitter" => spec.jitter = duration()?,
                "seed" => {
                    spec.seed = value
                        .parse()
                        .map_err(|_| err(format!("seed {value:?} is not a number")))?
                }
                other => return Err(err(format!("unknown fault {other:?}"))),
            }
        }
        if spec.loss >= 1.0 {
            return Err(err("loss must be below 100%".into()));
        }
        Ok(spec)
    }
}

/// What the injector did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Datagrams offered.
    pub seen: u64,
    /// Datagrams dropped.
    pub dropped: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Datagrams held back behind later ones.
    pub reordered: u64,
}

/// A datagram held back: when it is due, arrival order, where it came from, its bytes.
type Held = (Timestamp, u64, Option<SocketAddr>, Vec<u8>);

/// Applies a [`FaultSpec`] to a stream of datagrams.
#[derive(Debug)]
pub struct FaultInjector {
    spec: FaultSpec,
    rng: StdRng,
    /// Gilbert–Elliott: in the bad state every datagram is lost.
    bad: bool,
    /// Probability of entering / leaving the bad state per datagram.
    enter_bad: f64,
    leave_bad: f64,
    queue: BinaryHeap<Reverse<Held>>,
    order: u64,
    stats: FaultStats,
}

impl FaultInjector {
    /// An injector for `spec`.
    pub fn new(spec: FaultSpec) -> Self {
        let leave_bad = 1.0 / spec.burst.max(1.0);
        // Stationary loss of the two-state chain: enter / (enter + leave) = loss.
        let enter_bad = if spec.loss > 0.0 {
            (spec.loss * leave_bad / (1.0 - spec.loss)).min(1.0)
        } else {
            0.0
        };
        FaultInjector {
            rng: StdRng::seed_from_u64(spec.seed),
            spec,
            bad: false,
            enter_bad,
            leave_bad,
            queue: BinaryHeap::new(),
            order: 0,
            stats: FaultStats::default(),
        }
    }

    /// What was done so far.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    /// Offers a datagram that arrived at `now`.
    pub fn push(&mut self, now: Timestamp, datagram: &[u8]) {
        self.push_from(now, None, datagram);
    }

    /// Offers a datagram that arrived at `now` from `from` (kept with it, for
    /// [`FaultInjector::pop_from`]).
    pub fn push_from(&mut self, now: Timestamp, from: Option<SocketAddr>, datagram: &[u8]) {
        self.stats.seen += 1;
        self.bad = if self.bad {
            !self.rng.gen_bool(self.leave_bad)
        } else {
            self.rng.gen_bool(self.enter_bad)
        };
        if self.bad {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.gen_bool(self.spec.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut due = now + self.spec.delay;
            if !self.spec.jitter.is_zero() {
                due = due + self.spec.jitter.mul_f64(self.rng.gen::<f64>());
            }
            if self.rng.gen_bool(self.spec.reorder) {
                self.stats.reordered += 1;
                due = due + self.spec.reorder_by;
            }
            self.order += 1;
            self.queue
                .push(Reverse((due, self.order, from, datagram.to_vec())));
        }
    }

    /// When the next datagram is due, if any is held.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.queue.peek().map(|Reverse((due, _, _, _))| *due)
    }

    /// The next datagram due by `now`.
    pub fn pop(&mut self, now: Timestamp) -> Option<Vec<u8>> {
        self.pop_from(now).map(|(_, d)| d)
    }

    /// The next datagram due by `now`, with where it came from.
    pub fn pop_from(&mut self, now: Timestamp) -> Option<(Option<SocketAddr>, Vec<u8>)> {
        if self.next_due()? > now {
            return None;
        }
        self.queue.pop().map(|Reverse((_, _, from, d))| (from, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_millis(ms)
    }

    #[test]
    fn parses_specs_and_refuses_nonsense() {
        let s: FaultSpec = "loss=5%, burst=3,dup=0.01,reorder=2%,delay=20ms,jitter=5ms,seed=7"
            .parse()
            .unwrap();
        assert_eq!(s.loss, 0.05);
        assert_eq!(s.burst, 3.0);
        assert_eq!(s.duplicate, 0.01);
        assert_eq!(s.delay, Duration::from_millis(20));
        assert_eq!(s.seed, 7);
        for bad in [
            "loss=150%",
            "loss=100%",
            "burst=0.5",
            "wobble=1",
            "loss",
            "delay=soon",
        ] {
            assert!(bad.parse::<FaultSpec>().is_err(), "{bad}");
        }
        assert_eq!("".parse::<FaultSpec>().unwrap(), FaultSpec::default());
    }

    #[test]
    fn loss_and_bursts_match_the_spec_over_many_datagrams() {
        for burst in [1.0, 4.0] {
            let spec = FaultSpec {
                loss: 0.05,
                burst,
                ..FaultSpec::default()
            };
            let mut f = FaultInjector::new(spec);
            let mut runs = Vec::new();
            let mut run = 0;
            for i in 0..200_000u64 {
                let before = f.stats().dropped;
                f.push(at(0), &i.to_le_bytes());
                if f.stats().dropped > before {
                    run += 1;
                } else if run > 0 {
                    runs.push(run);
                    run = 0;
                }
                while f.pop(at(0)).is_some() {}
            }
            let loss = f.stats().dropped as f64 / 200_000.0;
            let mean_run = runs.iter().sum::<u64>() as f64 / runs.len() as f64;
            assert!((loss - 0.05).abs() < 0.005, "burst {burst}: loss {loss}");
            assert!(
                (mean_run - burst).abs() < burst * 0.15,
                "burst {burst}: runs {mean_run}"
            );
        }
    }

    #[test]
    fn delays_duplicates_and_reorders_deterministically() {
        let spec = FaultSpec {
            duplicate: 0.1,
            reorder: 0.1,
            reorder_by: Duration::from_millis(10),
            delay: Duration::from_millis(5),
            seed: 3,
            ..FaultSpec::default()
        };
        let run = || {
            let mut f = FaultInjector::new(spec.clone());
            let mut out = Vec::new();
            for i in 0..1000u64 {
                f.push(at(i), &i.to_le_bytes());
                while let Some(d) = f.pop(at(i)) {
                    out.push(u64::from_le_bytes(d.try_into().unwrap()));
                }
            }
            while let Some(d) = f.pop(at(10_000)) {
                out.push(u64::from_le_bytes(d.try_into().unwrap()));
            }
            (out, f.stats())
        };
        let (out, stats) = run();
        assert_eq!(run().0, out, "same seed, same result");
        assert_eq!(out.len() as u64, 1000 + stats.duplicated);
        assert!(stats.duplicated > 50 && stats.reordered > 50);
        let inversions = out.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(inversions > 20, "{inversions}");
        // Nothing is delivered before its delay.
        let mut f = FaultInjector::new(spec);
        f.push(at(0), b"x");
        assert_eq!(f.pop(at(4)), None);
        assert!(f.pop(at(16)).is_some());
    }
}
