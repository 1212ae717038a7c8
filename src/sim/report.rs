//! What a simulation found: delay behind source, continuity, startup, hops, upload, repairs,
//! attacks, the network's own counts, and whether each of the scenario's bounds held. Only
//! simulated quantities are in it, so a scenario and seed give the same report byte for byte;
//! wall-clock speed is reported beside it by the caller.

use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Continuity and delay over the pieces published from some time into the stream on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SteadyState {
    /// How long after the stream's start the measured pieces begin, s.
    pub after_s: f64,
    /// Share of honest peers' pieces played before their deadline.
    pub continuity: f64,
    /// Continuity of the worst honest peer.
    pub worst_peer_continuity: f64,
    /// Continuity of the 1st-percentile honest peer.
    pub p1_peer_continuity: f64,
    /// Delay behind source of honest peers' pieces, ms.
    pub delay_ms: Quantiles,
}

/// 50th and 99th percentiles and maximum, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Quantiles {
    /// From a histogram of microseconds.
    pub(super) fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
        if h.is_empty() {
            return Quantiles::default();
        }
        Quantiles {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// A spread of values over members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// Of `values` (sorted here).
    pub(super) fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Spread {
            mean: round3(values.iter().sum::<f64>() / values.len() as f64),
            p10: round3(at(0.1)),
            p50: round3(at(0.5)),
            p90: round3(at(0.9)),
            max: round3(at(1.0)),
        }
    }
}

/// Outages: a club an honest peer missed, every piece of it, for [`OUTAGE`] or more of the
/// stream in a row. Repairs fill scattered losses; a run like this means the peer had no
/// working source for the club (its members full, or its upstream a free rider or gone).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ClubOutages {
    /// Outages (one peer, one club, one run of misses).
    pub count: u64,
    /// Peers with at least one.
    pub peers: u64,
    /// Pieces missed in them.
    pub pieces: u64,
    /// The longest, ms of publish time.
    pub longest_ms: f64,
    /// Their pieces as a share of all the pieces honest peers missed.
    pub share_of_missed: f64,
}

/// Why honest peers missed the pieces they missed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Missed {
    /// Pieces missed in all (not played before their deadline).
    pub pieces: u64,
    /// Of them, played after their deadline (they came, too late).
    pub late: u64,
    /// Of them, of the peer's own club (the ones it gets from seeds and mates).
    pub own_club: u64,
}

/// The shortest run of a club's missed pieces counted as an outage.
pub(super) const OUTAGE: std::time::Duration = std::time::Duration::from_secs(2);

impl ClubOutages {
    /// Adds one peer's outages. `pieces` are the pieces it had to play in publish order, as
    /// (publish time µs, club, played on time).
    pub(super) fn add_peer(&mut self, k: u8, pieces: impl Iterator<Item = (u64, u8, bool)>) {
        // Per club, the run of misses going on: (first publish time, last, pieces).
        let mut runs: Vec<Option<(u64, u64, u64)>> = vec![None; usize::from(k)];
        let before = self.count;
        for (t, club, hit) in pieces {
            let Some(run) = runs.get_mut(usize::from(club)) else {
                continue;
            };
            if hit {
                if let Some(r) = run.take() {
                    self.close(r);
                }
            } else {
                let r = run.get_or_insert((t, t, 0));
                r.1 = t;
                r.2 += 1;
            }
        }
        for r in runs.into_iter().flatten() {
            self.close(r);
        }
        self.peers += u64::from(self.count > before);
    }

    fn close(&mut self, (first, last, pieces): (u64, u64, u64)) {
        let us = last - first;
        if us >= OUTAGE.as_micros() as u64 {
            self.count += 1;
            self.pieces += pieces;
            self.longest_ms = self.longest_ms.max((us as f64 / 100.0).round() / 10.0);
        }
    }
}

/// Repair traffic, summed over members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Repairs {
    /// Pieces asked for in NACKs (a piece asked again counts again).
    pub asked: u64,
    /// Gaps filled after a NACK.
    pub repaired: u64,
    /// Gaps given up on.
    pub given_up: u64,
    /// NACKed pieces queued for resending to others.
    pub served: u64,
    /// Queued or NACKed pieces not resent: no longer had, or too old by the time there was room.
    pub unavailable: u64,
    /// Pieces sent from the background queues under LEDBAT: repairs and catch-up.
    pub resent: u64,
}

/// Pieces members received and already had: upload spent for nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Duplicates {
    /// All of them (in-club push to every mate, repair races).
    pub pieces: u64,
    /// Those pushed by club mates (in-club flooding).
    pub from_mates: u64,
}

/// Attacks and how they fared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Attacks {
    /// Pieces delivered for playing that the publisher did not publish (must be 0).
    pub forged_played: u64,
    /// Pieces that failed verification at a member (each bans its sender).
    pub forged_caught: u64,
    /// Bans issued.
    pub bans: u64,
    /// JOINs sent from spoofed addresses.
    pub bogus_joins: u64,
    /// Bytes the targets sent back to spoofed addresses.
    pub bogus_reply_bytes: u64,
    /// Bytes of the bogus JOINs.
    pub bogus_bytes: u64,
    /// Spoofed addresses that got a link (must be 0).
    pub bogus_links: u64,
}

/// The network's own counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct NetworkCounts {
    /// Datagrams sent.
    pub datagrams: u64,
    /// Lost to bursty loss.
    pub lost: u64,
    /// Dropped by a full access-link queue.
    pub queue_drops: u64,
    /// Sent to nobody (a departed member, a spoofed address).
    pub undeliverable: u64,
    /// Delivered twice.
    pub duplicated: u64,
}

/// How links came and went, summed over members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Links {
    /// JOINs granted.
    pub joins_granted: u64,
    /// JOINs refused (no upload left, or nothing to give).
    pub joins_refused: u64,
    /// Upstreams replaced because a club fell silent.
    pub replaced_silent: u64,
    /// Upstreams replaced for missing most of their pieces.
    pub replaced_lossy: u64,
    /// Upstreams replaced for trailing the fastest path.
    pub replaced_slow: u64,
}

/// One bound of the scenario and how the run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BoundCheck {
    /// What is bounded.
    pub name: String,
    /// The bound.
    pub limit: f64,
    /// The run's value.
    pub value: f64,
    /// Whether it held.
    pub ok: bool,
}

/// Everything a run found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Seed used.
    pub seed: u64,
    /// Simulated seconds.
    pub simulated_s: f64,
    /// Clubs K.
    pub clubs: u8,
    /// Peers that joined (churn included), and those that left.
    pub peers_joined: u64,
    /// Peers that left.
    pub peers_left: u64,
    /// Honest peers measured.
    pub honest_peers: u64,
    /// Pieces published.
    pub pieces_published: u64,
    /// Share of honest peers' pieces played before their deadline.
    pub continuity: f64,
    /// Continuity of the worst honest peer.
    pub worst_peer_continuity: f64,
    /// Continuity of the 1st-percentile honest peer.
    pub p1_peer_continuity: f64,
    /// Delay behind source of honest peers' pieces, ms.
    pub delay_ms: Quantiles,
    /// The same figures over the pieces published once the swarm had formed, if the scenario
    /// asks (`[measure] steady_after`).
    pub steady: Option<SteadyState>,
    /// Join to playing, honest peers, ms.
    pub startup_ms: Quantiles,
    /// Honest peers that never started.
    pub never_started: u64,
    /// Pieces by the number of hops they took from the publisher (index = hops).
    pub hops: Vec<u64>,
    /// Mean delay behind source by hops, ms (index = hops).
    pub delay_by_hop_ms: Vec<f64>,
    /// How long honest peers hold a piece before sending it on (pacing, queues), ms.
    pub forward_wait_ms: Quantiles,
    /// Queueing on members' access uplinks, ms.
    pub uplink_queue_ms: Quantiles,
    /// Upload of honest peers, in multiples of the stream rate.
    pub peer_upload: Spread,
    /// Publisher upload over the stream, in multiples of the stream rate.
    pub publisher_upload: f64,
    /// Upload of each relay over the stream, in multiples of the stream rate.
    pub relay_upload: Vec<f64>,
    /// Control (JOINs, ACCEPTs, ACKs, NACKs, keepalives) members sent, bytes without IP and
    /// UDP headers, summed.
    pub control_bytes: u64,
    /// Why pieces were missed.
    pub missed: Missed,
    /// Clubs honest peers missed whole for a while.
    pub club_outages: ClubOutages,
    /// Repair traffic.
    pub repairs: Repairs,
    /// Duplicate pieces, summed over members.
    pub duplicates: Duplicates,
    /// Links.
    pub links: Links,
    /// Attacks.
    pub attacks: Attacks,
    /// The network's counts.
    pub network: NetworkCounts,
    /// Continuity by second of publish time.
    pub continuity_by_second: Vec<f64>,
    /// Delay CDF: (delay ms, share of pieces at or below it).
    pub delay_cdf: Vec<(f64, f64)>,
    /// Events the simulator processed.
    pub events: u64,
    /// The scenario's bounds.
    pub bounds: Vec<BoundCheck>,
}

impl Report {
    /// Whether every bound held.
    pub fn passed(&self) -> bool {
        self.bounds.iter().all(|b| b.ok)
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario {} (seed {}): {:.1} s simulated, K = {}, {} pieces published",
            self.scenario, self.seed, self.simulated_s, self.clubs, self.pieces_published
        )?;
        writeln!(
            f,
            "peers: {} joined, {} left, {} honest measured, {} never started",
            self.peers_joined, self.peers_left, self.honest_peers, self.never_started
        )?;
        writeln!(
            f,
            "continuity: {:.4} overall, worst peer {:.4}, 1st percentile {:.4}",
            self.continuity, self.worst_peer_continuity, self.p1_peer_continuity
        )?;
        let q = |q: &Quantiles| format!("p50 {} ms, p99 {} ms, max {} ms", q.p50, q.p99, q.max);
        writeln!(f, "delay behind source: {}", q(&self.delay_ms))?;
        if let Some(st) = &self.steady {
            writeln!(
                f,
                "steady state (pieces published from {} s on): continuity {:.4}, worst peer {:.4}, 1st percentile {:.4}; delay {}",
                st.after_s,
                st.continuity,
                st.worst_peer_continuity,
                st.p1_peer_continuity,
                q(&st.delay_ms)
            )?;
        }
        writeln!(f, "startup: {}", q(&self.startup_ms))?;
        let total: u64 = self.hops.iter().sum::<u64>().max(1);
        let hops: Vec<String> = self
            .hops
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(h, n)| format!("{h}: {:.1}%", *n as f64 * 100.0 / total as f64))
            .collect();
        writeln!(f, "hops: {}", hops.join(", "))?;
        let by_hop: Vec<String> = self
            .delay_by_hop_ms
            .iter()
            .enumerate()
            .filter(|(h, _)| self.hops.get(*h).is_some_and(|n| *n > 0))
            .map(|(h, d)| format!("{h}: {d}"))
            .collect();
        writeln!(f, "mean delay by hops, ms: {}", by_hop.join(", "))?;
        writeln!(
            f,
            "held in peers before forwarding: {}; uplink queues: {}",
            q(&self.forward_wait_ms),
            q(&self.uplink_queue_ms)
        )?;
        let u = &self.peer_upload;
        writeln!(
            f,
            "peer upload (x stream): mean {}, p10 {}, p50 {}, p90 {}, max {}",
            u.mean, u.p10, u.p50, u.p90, u.max
        )?;
        writeln!(
            f,
            "publisher upload: {}x stream; relays: {:?}; control sent by members: {} bytes",
            self.publisher_upload, self.relay_upload, self.control_bytes
        )?;
        let m = &self.missed;
        writeln!(
            f,
            "missed: {} pieces, {} came too late, {} of the peer's own club",
            m.pieces, m.late, m.own_club
        )?;
        let o = &self.club_outages;
        writeln!(
            f,
            "club outages (every piece of a club missed for {} s or more): {} at {} peers, {} pieces ({:.1}% of those missed), longest {} ms",
            OUTAGE.as_secs(),
            o.count,
            o.peers,
            o.pieces,
            o.share_of_missed * 100.0,
            o.longest_ms
        )?;
        let r = &self.repairs;
        writeln!(
            f,
            "repairs: {} asked, {} repaired, {} given up, {} served ({} unavailable), {} resent \
             with catch-up",
            r.asked, r.repaired, r.given_up, r.served, r.unavailable, r.resent
        )?;
        let d = &self.duplicates;
        writeln!(
            f,
            "duplicate pieces: {} ({} from club mates)",
            d.pieces, d.from_mates
        )?;
        let l = &self.links;
        writeln!(
            f,
            "links: {} joins granted, {} refused; upstreams replaced: {} silent, {} lossy, {} slow",
            l.joins_granted, l.joins_refused, l.replaced_silent, l.replaced_lossy, l.replaced_slow
        )?;
        let a = &self.attacks;
        writeln!(
            f,
            "attacks: {} forged played, {} forged caught, {} bans; bogus joins {} ({} B in, {} B replied, {} linked)",
            a.forged_played, a.forged_caught, a.bans, a.bogus_joins, a.bogus_bytes, a.bogus_reply_bytes, a.bogus_links
        )?;
        let n = &self.network;
        writeln!(
            f,
            "network: {} datagrams, {} lost, {} queue drops, {} undeliverable, {} duplicated",
            n.datagrams, n.lost, n.queue_drops, n.undeliverable, n.duplicated
        )?;
        writeln!(f, "events: {}", self.events)?;
        for b in &self.bounds {
            writeln!(
                f,
                "bound {}: {} {} (limit {})",
                b.name,
                if b.ok { "ok" } else { "FAILED" },
                b.value,
                b.limit
            )?;
        }
        Ok(())
    }
}

/// `x` to three decimals (reports stay readable and stable).
pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_and_quantiles_of_known_values() {
        let s = Spread::of((1..=11).map(f64::from).collect());
        assert_eq!(
            (s.p10, s.p50, s.p90, s.max, s.mean),
            (2.0, 6.0, 10.0, 11.0, 6.0)
        );
        let mut h = Histogram::<u64>::new(3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let q = Quantiles::of(&h);
        assert!(
            (q.p50 - 500.0).abs() < 1.0 && (q.p99 - 990.0).abs() < 1.0,
            "{q:?}"
        );
        assert!((q.max - 1000.0).abs() < 1.0);
    }

    #[test]
    fn only_a_club_missed_whole_for_two_seconds_is_an_outage() {
        // Two clubs, a piece every 100 ms (each club every 200 ms), 5 s.
        let piece = |i: u64, hit: bool| (i * 100_000, (i % 2) as u8, hit);
        let mut o = ClubOutages::default();
        // Club 1 missed from 1.1 s to 3.3 s (12 pieces, 2.2 s); club 0 misses one piece in
        // three all along (scattered: no outage).
        o.add_peer(
            2,
            (0..50).map(|i| {
                let hit = if i % 2 == 1 {
                    !(11..=33).contains(&i)
                } else {
                    i % 3 != 0
                };
                piece(i, hit)
            }),
        );
        assert_eq!((o.count, o.peers, o.pieces), (1, 1, 12));
        assert!((o.longest_ms - 2200.0).abs() < 1e-9);
        // A run still going at the end counts (2.1 s to 4.9 s, 15 pieces); 1.8 s does not.
        o.add_peer(2, (0..50).map(|i| piece(i, i % 2 == 0 || i < 21)));
        o.add_peer(
            2,
            (0..50).map(|i| piece(i, i % 2 == 0 || !(10..30).contains(&i))),
        );
        assert_eq!((o.count, o.peers, o.pieces), (2, 2, 27));
        assert!((o.longest_ms - 2800.0).abs() < 1e-9);
    }
}
