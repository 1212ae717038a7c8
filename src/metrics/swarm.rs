//! Swarm figures for `/metrics` on peers, publishers and relay amplifiers: upload and download
//! by club, repairs asked and served, peers replaced and banned, links, and the delay behind
//! the source (a histogram of publish → arrival, by the two hosts' wall clocks).

use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::http::MetricsSource;
use super::{latency, latency_histogram};
use crate::swarm::SwarmStats;

#[derive(Debug, Default)]
struct Snapshot {
    role: &'static str,
    /// One entry per member (a relay amplifies several channels), summed when rendered.
    parts: Vec<(SwarmStats, (usize, usize, usize))>,
}

/// Swarm metrics of one member, refreshed by its IO loop.
#[derive(Debug)]
pub struct SwarmMetrics {
    snapshot: Mutex<Snapshot>,
    delay_us: Mutex<Histogram<u64>>,
}

impl SwarmMetrics {
    /// Metrics of a member whose role is `role` (`peer`, `relay`, `publisher`).
    pub fn new(role: &'static str) -> Arc<Self> {
        Arc::new(SwarmMetrics {
            snapshot: Mutex::new(Snapshot {
                role,
                ..Snapshot::default()
            }),
            delay_us: Mutex::new(latency_histogram()),
        })
    }

    /// Replaces the counters with the member's current ones.
    pub fn update(&self, stats: &SwarmStats, links: (usize, usize, usize)) {
        self.update_part(0, stats, links);
    }

    /// Replaces the counters of member `part` (of several in one process).
    pub fn update_part(&self, part: usize, stats: &SwarmStats, links: (usize, usize, usize)) {
        if let Ok(mut s) = self.snapshot.lock() {
            if s.parts.len() <= part {
                s.parts.resize_with(part + 1, Default::default);
            }
            s.parts[part] = (stats.clone(), links);
        }
    }

    /// Records one piece's delay behind the source, µs.
    pub fn record_delay(&self, us: u64) {
        if let Ok(mut h) = self.delay_us.lock() {
            h.saturating_record(us.max(1));
        }
    }

    /// The delay behind the source at quantile `q`, µs.
    pub fn delay_us(&self, q: f64) -> u64 {
        self.delay_us
            .lock()
            .map(|h| h.value_at_quantile(q))
            .unwrap_or(0)
    }

    /// The metrics as OpenMetrics text.
    pub fn render_text(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl MetricsSource for Arc<SwarmMetrics> {
    fn render(&self) -> String {
        self.render_text()
    }
}

fn by_club(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[u64],
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Counter)?;
    for (club, v) in values.iter().enumerate() {
        let club = club.to_string();
        family
            .encode_family(&[("club", club.as_str())])?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

impl Collector for SwarmMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let (role, s, links) = match self.snapshot.lock() {
            Ok(g) => {
                let mut sum = SwarmStats::default();
                let mut links = (0, 0, 0);
                for (stats, l) in &g.parts {
                    sum.absorb(stats);
                    links = (links.0 + l.0, links.1 + l.1, links.2 + l.2);
                }
                (g.role, sum, links)
            }
            Err(_) => return Ok(()),
        };
        e.encode_descriptor(
            "clubcast_swarm_member",
            "This member's role in the swarm.",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("role", role), ("version", env!("CARGO_PKG_VERSION"))])?;
        by_club(
            &mut e,
            "clubcast_swarm_upload",
            "Piece bytes uploaded, by club.",
            &s.upload_by_club,
        )?;
        by_club(
            &mut e,
            "clubcast_swarm_download",
            "Piece bytes downloaded (new pieces), by club.",
            &s.download_by_club,
        )?;
        let counters: [(&str, &str, u64); 12] = [
            ("clubcast_swarm_pieces", "Verified pieces new to this member.", s.pieces_new),
            ("clubcast_swarm_duplicate_pieces", "Pieces that arrived again (in-club push and repair races).", s.duplicates),
            ("clubcast_swarm_bad_pieces", "Pieces that failed verification; each bans its sender.", s.bad_pieces),
            ("clubcast_swarm_repairs_asked", "Pieces asked for in NACKs.", s.repairs_asked),
            ("clubcast_swarm_repaired", "Gaps filled after a NACK.", s.repaired),
            ("clubcast_swarm_repairs_given_up", "Gaps given up on (too late to play).", s.repairs_given_up),
            ("clubcast_swarm_repairs_served", "NACKed pieces queued for resending to other members.", s.repairs_served),
            ("clubcast_swarm_catch_up_pieces", "Pieces queued as catch-up for new links.", s.catch_up_queued),
            ("clubcast_swarm_peers_replaced", "Upstreams replaced for being silent, lossy or slow.", s.peers_replaced),
            ("clubcast_swarm_peers_banned", "Members banned for a piece that failed verification.", s.peers_banned),
            ("clubcast_swarm_live_dropped", "Live pieces dropped: waited too long for upload, or refused by a link's congestion control.", s.live_dropped + s.live_refused),
            ("clubcast_swarm_joins_refused", "JOINs refused for want of upload.", s.joins_refused),
        ];
        for (name, help, v) in counters {
            e.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        let mut family = e.encode_descriptor(
            "clubcast_swarm_links",
            "Links now, by kind: club mates, upstreams, downstreams.",
            None,
            MetricType::Gauge,
        )?;
        for (kind, n) in [
            ("mate", links.0),
            ("upstream", links.1),
            ("downstream", links.2),
        ] {
            family
                .encode_family(&[("kind", kind)])?
                .encode_gauge(&(n as i64))?;
        }
        if let Ok(h) = self.delay_us.lock() {
            latency(
                &mut e,
                "clubcast_swarm_delay_behind_source",
                "Delay of pieces behind the publisher (publish → arrival, wall clocks).",
                &h,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_swarm_figures() {
        let m = SwarmMetrics::new("peer");
        let mut s = SwarmStats::default();
        s.resize(2);
        s.add_upload(1, 1200);
        s.peers_banned = 1;
        m.update(&s, (2, 3, 4));
        m.record_delay(150_000);
        let text = m.render_text();
        assert!(
            text.contains("clubcast_swarm_upload_bytes_total{club=\"1\"} 1200"),
            "{text}"
        );
        assert!(text.contains("clubcast_swarm_peers_banned_total 1"));
        assert!(text.contains("clubcast_swarm_links{kind=\"downstream\"} 4"));
        assert!(text.contains("clubcast_swarm_delay_behind_source_seconds_count 1"));
    }
}
