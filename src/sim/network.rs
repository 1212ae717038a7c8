//! The simulated network: hosts with access links of limited upload and download capacity
//! (FIFO queues with a delay limit), one-way delay by region plus a fixed per-pair part and
//! per-datagram jitter, Gilbert–Elliott bursty loss on each host's downlink, reordering and
//! duplication. Every draw comes from one seeded generator, in event order.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scenario::NetworkSpec;

/// One attachment to the network.
#[derive(Debug, Clone)]
pub(super) struct Host {
    /// Upload capacity, bytes per second (`None`: unlimited).
    up_bytes_per_s: Option<u64>,
    /// Download capacity, bytes per second (`None`: unlimited).
    down_bytes_per_s: Option<u64>,
    /// When the uplink and downlink are next free, µs.
    up_free: u64,
    down_free: u64,
    region: u8,
    /// Gilbert–Elliott state of the downlink: in a loss burst.
    bursting: bool,
    /// Still attached (departed peers are not).
    pub(super) alive: bool,
}

impl Host {
    /// A host with these capacities (bits per second) in `region`.
    pub(super) fn new(up_bps: Option<u64>, down_bps: Option<u64>, region: u8) -> Self {
        Host {
            up_bytes_per_s: up_bps.map(|b| (b / 8).max(1)),
            down_bytes_per_s: down_bps.map(|b| (b / 8).max(1)),
            up_free: 0,
            down_free: 0,
            region,
            bursting: false,
            alive: true,
        }
    }

    /// Queues `size` bytes on the uplink at `now`: when the last byte leaves, or `None` if the
    /// queue already holds more than `limit_us` of traffic (tail drop).
    pub(super) fn uplink(&mut self, now: u64, size: u64, limit_us: u64) -> Option<u64> {
        let Some(rate) = self.up_bytes_per_s else {
            return Some(now);
        };
        let start = self.up_free.max(now);
        if start - now > limit_us {
            return None;
        }
        self.up_free = start + size * 1_000_000 / rate;
        Some(self.up_free)
    }

    /// Queues `size` bytes arriving at `now` on the downlink: when it is delivered (when the
    /// downlink starts to take it: only queueing behind earlier datagrams delays it), or `None`
    /// if the queue is over `limit_us`.
    pub(super) fn downlink(&mut self, now: u64, size: u64, limit_us: u64) -> Option<u64> {
        let Some(rate) = self.down_bytes_per_s else {
            return Some(now);
        };
        let start = self.down_free.max(now);
        if start - now > limit_us {
            return None;
        }
        self.down_free = start + size * 1_000_000 / rate;
        Some(start)
    }
}

/// The shared part of the model: delays, loss, reordering, duplication.
pub(super) struct Network {
    /// One-way delay of each region to the backbone, and its per-pair spread, µs.
    region_delay: Vec<u64>,
    region_spread: Vec<u64>,
    jitter_us: u64,
    /// Gilbert–Elliott: chance per datagram of entering and of leaving a burst.
    enter_burst: f64,
    leave_burst: f64,
    reorder: f64,
    reorder_us: u64,
    duplicate: f64,
    pub(super) queue_limit_us: u64,
    salt: u64,
    rng: StdRng,
}

/// What the network does with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Lost on the way.
    Lost,
    /// Arrives after this many µs (and again after the second, if duplicated).
    Arrives(u64, Option<u64>),
}

impl Network {
    pub(super) fn new(spec: &NetworkSpec, seed: u64) -> Self {
        // Steady-state share of time in a burst = loss; mean burst = `burst` datagrams.
        let leave_burst = 1.0 / spec.burst.max(1.0);
        let enter_burst = if spec.loss > 0.0 {
            leave_burst * spec.loss / (1.0 - spec.loss)
        } else {
            0.0
        };
        Network {
            region_delay: spec
                .region
                .iter()
                .map(|r| r.delay.as_micros() as u64)
                .collect(),
            region_spread: spec
                .region
                .iter()
                .map(|r| r.spread.as_micros() as u64)
                .collect(),
            jitter_us: spec.jitter.as_micros() as u64,
            enter_burst,
            leave_burst,
            reorder: spec.reorder,
            reorder_us: spec.reorder_delay.as_micros() as u64,
            duplicate: spec.duplicate,
            queue_limit_us: spec.queue.as_micros() as u64,
            salt: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            rng: StdRng::seed_from_u64(seed ^ 0x6e65_7477),
        }
    }

    /// The fixed one-way delay between hosts `a` and `b` (symmetric), µs.
    fn base_delay(&self, a: u32, ha: &Host, b: u32, hb: &Host) -> u64 {
        let (ra, rb) = (usize::from(ha.region), usize::from(hb.region));
        let spread = (self.region_spread[ra] + self.region_spread[rb]) / 2;
        let pair = (u64::from(a.min(b)) << 32) | u64::from(a.max(b));
        let extra = if spread == 0 {
            0
        } else {
            mix(pair ^ self.salt) % (spread + 1)
        };
        self.region_delay[ra] + self.region_delay[rb] + extra
    }

    /// Whether a datagram into `to` is lost, and if not how long it travels.
    pub(super) fn fate(&mut self, a: u32, from: &Host, b: u32, to: &mut Host) -> Fate {
        if self.enter_burst > 0.0 {
            let flip = if to.bursting {
                self.leave_burst
            } else {
                self.enter_burst
            };
            if self.rng.gen::<f64>() < flip {
                to.bursting = !to.bursting;
            }
            if to.bursting {
                return Fate::Lost;
            }
        }
        let mut delay = self.base_delay(a, from, b, to);
        if self.jitter_us > 0 {
            delay += self.rng.gen_range(0..=self.jitter_us);
        }
        if self.reorder > 0.0 && self.rng.gen::<f64>() < self.reorder {
            delay += self.rng.gen_range(0..=self.reorder_us);
        }
        let again = (self.duplicate > 0.0 && self.rng.gen::<f64>() < self.duplicate)
            .then(|| delay + 1 + self.rng.gen_range(0..=self.jitter_us.max(1_000)));
        Fate::Arrives(delay, again)
    }
}

/// SplitMix64's finaliser: a fixed, well-spread hash of a 64-bit value.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::scenario::Scenario;

    fn network(extra: &str) -> Network {
        let s = Scenario::parse(&format!("[peers]\ncount = 1\n[network]\n{extra}")).unwrap();
        Network::new(&s.network, 1)
    }

    #[test]
    fn bursty_loss_has_the_asked_rate_and_burst_length() {
        let mut n = network("loss = 0.05\nburst = 4.0\njitter = \"0ms\"\n");
        let from = Host::new(None, None, 0);
        let mut to = Host::new(None, None, 0);
        let (mut lost, mut bursts, mut was_lost) = (0u32, 0u32, false);
        let total = 400_000;
        for _ in 0..total {
            let l = n.fate(0, &from, 1, &mut to) == Fate::Lost;
            lost += u32::from(l);
            bursts += u32::from(l && !was_lost);
            was_lost = l;
        }
        let rate = f64::from(lost) / f64::from(total);
        let mean_burst = f64::from(lost) / f64::from(bursts);
        assert!((rate - 0.05).abs() < 0.005, "loss {rate}");
        assert!((mean_burst - 4.0).abs() < 0.4, "burst {mean_burst}");
    }

    #[test]
    fn delay_is_fixed_per_pair_plus_jitter() {
        let mut n = network("jitter = \"1ms\"\n[[network.region]]\nshare = 1.0\ndelay = \"10ms\"\nspread = \"8ms\"\n");
        let a = Host::new(None, None, 0);
        let mut b = Host::new(None, None, 0);
        let Fate::Arrives(d, None) = n.fate(3, &a, 9, &mut b) else {
            panic!()
        };
        assert!((20_000..=29_000).contains(&d), "{d}");
        for _ in 0..100 {
            let Fate::Arrives(e, _) = n.fate(9, &b.clone(), 3, &mut a.clone()) else {
                panic!()
            };
            assert!(e.abs_diff(d) <= 1_000, "same pair, either way: {d} vs {e}");
        }
    }

    #[test]
    fn a_full_uplink_queues_then_drops() {
        // 1 Mbit/s: a 1 250-byte datagram takes 10 ms.
        let mut h = Host::new(Some(1_000_000), None, 0);
        assert_eq!(h.uplink(0, 1250, 25_000), Some(10_000));
        assert_eq!(h.uplink(0, 1250, 25_000), Some(20_000));
        assert_eq!(h.uplink(0, 1250, 25_000), Some(30_000));
        assert_eq!(h.uplink(0, 1250, 25_000), None, "30 ms queued > 25 ms");
        assert_eq!(h.uplink(40_000, 1250, 25_000), Some(50_000), "drained");
    }
}
