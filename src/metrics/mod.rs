//! Relay metrics: each worker publishes its core's counters, its HdrHistograms of latency and
//! its busy ratio here, and `/metrics` renders the sum as Prometheus (OpenMetrics) text.
//!
//! The per-packet path never touches this module: a worker records latency into histograms it
//! owns and publishes a snapshot every [`PUBLISH_INTERVAL`] under a short lock of its own slot.
//! At scrape time the HdrHistograms become Prometheus histograms (fixed `le` buckets) plus
//! quantile gauges.

mod http;
mod process;
pub mod swarm;
pub mod text;

pub use http::{MetricsServer, MetricsSource};
pub use swarm::SwarmMetrics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::relay::{DropReason, RelayStats};
use crate::wire::ChannelId;

/// How often the engine publishes its counters.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// Upper bounds of the exported latency buckets, in µs.
const LATENCY_BUCKETS_US: [u64; 16] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];
/// Channels given their own `clubcast_relay_channel_subscribers` series (the most watched);
/// the rest are summed under `channel="other"`, so the label's cardinality stays bounded.
pub const TOP_CHANNELS: usize = 10;
/// Quantiles exported as gauges.
const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// A latency histogram in µs, 1 µs to 60 s at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

#[derive(Debug)]
struct Snapshot {
    stats: RelayStats,
    first_send_us: Histogram<u64>,
    forward_us: Histogram<u64>,
    busy_ratio: f64,
    /// Subscribers per channel on this worker.
    channels: Vec<(ChannelId, usize)>,
}

/// One worker's latency samples since its last publish (the worker owns and fills these).
#[derive(Debug)]
pub struct WorkerLatency {
    /// Receive → first copy handed to the kernel, µs.
    pub first_send_us: Histogram<u64>,
    /// Receive → last copy handed to the kernel (over all workers), µs.
    pub forward_us: Histogram<u64>,
}

impl WorkerLatency {
    /// Empty histograms.
    pub fn new() -> Self {
        WorkerLatency {
            first_send_us: latency_histogram(),
            forward_us: latency_histogram(),
        }
    }
}

impl Default for WorkerLatency {
    fn default() -> Self {
        Self::new()
    }
}

/// The relay's metrics, shared between the workers (writers) and the HTTP server (reader).
#[derive(Debug)]
pub struct RelayMetrics {
    backend: &'static str,
    /// How the backend runs, where it has choices (xdp: attach, socket and send modes).
    backend_mode: std::sync::OnceLock<String>,
    workers: Vec<Mutex<Snapshot>>,
    ready: AtomicBool,
    /// The XDP program's counters: packets redirected to AF_XDP, passed to the kernel.
    xdp_packets: [AtomicU64; 2],
}

impl RelayMetrics {
    /// Metrics of a relay running `backend` with `workers` workers.
    pub fn new(backend: &'static str, workers: usize) -> Arc<Self> {
        Arc::new(RelayMetrics {
            backend,
            backend_mode: std::sync::OnceLock::new(),
            workers: (0..workers.max(1))
                .map(|_| {
                    Mutex::new(Snapshot {
                        stats: RelayStats::default(),
                        first_send_us: latency_histogram(),
                        forward_us: latency_histogram(),
                        busy_ratio: 0.0,
                        channels: Vec::new(),
                    })
                })
                .collect(),
            ready: AtomicBool::new(false),
            xdp_packets: [AtomicU64::new(0), AtomicU64::new(0)],
        })
    }

    /// Records how the backend runs, for `clubcast_build_info{backend_mode}` (set once).
    pub fn set_backend_mode(&self, mode: &str) {
        let _ = self.backend_mode.set(mode.to_string());
    }

    /// Records the XDP program's totals: packets redirected to AF_XDP sockets and passed on
    /// to the kernel.
    pub fn set_xdp_packets(&self, redirected: u64, passed: u64) {
        self.xdp_packets[0].store(redirected, Ordering::Relaxed);
        self.xdp_packets[1].store(passed, Ordering::Relaxed);
    }

    /// Marks the relay ready to serve (or not: starting, draining); `/readyz` answers by it.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the relay is ready to serve.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn lock(&self, worker: usize) -> MutexGuard<'_, Snapshot> {
        // A panic elsewhere while holding the lock leaves plain counters; keep serving them.
        self.workers[worker % self.workers.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes worker `worker`'s totals, subscribers per channel and busy ratio, and moves its latency samples into
    /// the shared histograms (leaving `latency` empty).
    pub fn publish(
        &self,
        worker: usize,
        stats: &RelayStats,
        channels: impl Iterator<Item = (ChannelId, usize)>,
        latency: &mut WorkerLatency,
        busy_ratio: f64,
    ) {
        let mut s = self.lock(worker);
        s.stats.clone_from(stats);
        s.channels.clear();
        s.channels.extend(channels);
        s.busy_ratio = busy_ratio;
        // All histograms share bounds, so adding cannot fail.
        let _ = s.first_send_us.add(&latency.first_send_us);
        let _ = s.forward_us.add(&latency.forward_us);
        latency.first_send_us.reset();
        latency.forward_us.reset();
    }

    /// The last published totals, summed over workers.
    pub fn stats(&self) -> RelayStats {
        let mut total = RelayStats::default();
        for w in 0..self.workers.len() {
            total.add(&self.lock(w).stats);
        }
        total
    }

    /// Subscribers per channel over all workers: the [`TOP_CHANNELS`] largest by id, then
    /// the sum of the rest (`None`).
    fn channel_subscribers(&self) -> Vec<(Option<ChannelId>, usize)> {
        let mut total: HashMap<ChannelId, usize> = HashMap::new();
        for w in 0..self.workers.len() {
            for &(id, n) in &self.lock(w).channels {
                *total.entry(id).or_default() += n;
            }
        }
        let mut all: Vec<(ChannelId, usize)> = total.into_iter().collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0 .0.cmp(&b.0 .0)));
        let rest: usize = all.iter().skip(TOP_CHANNELS).map(|c| c.1).sum();
        let mut top: Vec<(Option<ChannelId>, usize)> = all
            .into_iter()
            .take(TOP_CHANNELS)
            .map(|(id, n)| (Some(id), n))
            .collect();
        if rest > 0 {
            top.push((None, rest));
        }
        top
    }

    fn merged(&self, pick: fn(&Snapshot) -> &Histogram<u64>) -> Histogram<u64> {
        let mut h = latency_histogram();
        for w in 0..self.workers.len() {
            let _ = h.add(pick(&self.lock(w)));
        }
        h
    }

    /// Forward latency (receive → last copy sent) at quantile `q` since start, µs.
    pub fn forward_latency_us(&self, q: f64) -> u64 {
        self.merged(|s| &s.forward_us).value_at_quantile(q)
    }

    /// A registry that renders these metrics.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        registry
    }

    /// The metrics as OpenMetrics text.
    pub fn render(self: &Arc<Self>) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> std::fmt::Result {
    e.encode_descriptor(name, help, unit, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&(v as i64))
}

fn latency(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &Histogram<u64>,
) -> std::fmt::Result {
    let (sum, count, buckets) = prometheus_buckets(h);
    e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    let quantile_name = format!("{name}_quantile");
    let mut q = e.encode_descriptor(
        &quantile_name,
        "Quantiles of the histogram of the same name since start (from the HdrHistogram).",
        Some(&Unit::Seconds),
        MetricType::Gauge,
    )?;
    for quantile in QUANTILES {
        let label = format!("{quantile}");
        let v = h.value_at_quantile(quantile) as f64 / 1e6;
        q.encode_family(&[("quantile", label.as_str())])?
            .encode_gauge(&v)?;
    }
    Ok(())
}

impl Collector for RelayMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = self.stats();
        e.encode_descriptor(
            "clubcast_build",
            "Version and IO backend of this relay.",
            None,
            MetricType::Info,
        )?
        .encode_info(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("backend", self.backend),
            (
                "backend_mode",
                self.backend_mode.get().map_or("", String::as_str),
            ),
        ])?;

        let c = |e: &mut DescriptorEncoder<'_>, name, help, v| counter(e, name, help, None, v);
        c(
            &mut e,
            "clubcast_relay_datagrams_received",
            "Datagrams received.",
            s.datagrams_in,
        )?;
        counter(
            &mut e,
            "clubcast_relay_received",
            "Bytes of datagrams received.",
            Some(&Unit::Bytes),
            s.bytes_in,
        )?;
        c(
            &mut e,
            "clubcast_relay_pieces_received",
            "Data pieces received (valid layout), before any check.",
            s.pieces_in,
        )?;
        c(
            &mut e,
            "clubcast_relay_pieces_accepted",
            "Pieces verified and accepted for forwarding.",
            s.pieces_accepted,
        )?;
        c(
            &mut e,
            "clubcast_relay_pieces_forwarded",
            "Piece copies sent to subscribers.",
            s.piece_sends,
        )?;
        counter(
            &mut e,
            "clubcast_relay_forwarded",
            "Bytes of piece copies sent to subscribers.",
            Some(&Unit::Bytes),
            s.bytes_forwarded,
        )?;
        c(
            &mut e,
            "clubcast_relay_control_replies",
            "Control replies sent (COOKIE, SUBSCRIBED, ANNOUNCED).",
            s.replies,
        )?;
        c(
            &mut e,
            "clubcast_relay_subscribers_expired",
            "Subscribers dropped for lack of KEEPALIVE.",
            s.subscribers_expired,
        )?;
        c(
            &mut e,
            "clubcast_relay_subscribers_cut",
            "Subscribers cut because copies to them kept being refused.",
            s.subscribers_cut,
        )?;

        let mut drops = e.encode_descriptor(
            "clubcast_relay_dropped",
            "Datagrams (or piece copies, for send_failed and worker_behind) dropped, by reason.",
            None,
            MetricType::Counter,
        )?;
        for reason in DropReason::ALL {
            drops
                .encode_family(&[("reason", reason.label())])?
                .encode_counter::<NoLabelSet, _, u64>(&s.dropped(reason), None)?;
        }

        gauge(
            &mut e,
            "clubcast_relay_subscribers",
            "Subscribers now, over all channels.",
            s.subscribers,
        )?;
        gauge(
            &mut e,
            "clubcast_relay_channels",
            "Channels with an announced publisher now.",
            s.channels,
        )?;
        gauge(
            &mut e,
            "clubcast_relay_ready",
            "1 while the relay serves, 0 while it starts or drains.",
            u64::from(self.ready()),
        )?;
        let mut per_channel = e.encode_descriptor(
            "clubcast_relay_channel_subscribers",
            "Subscribers now of the most watched channels (channel id), the rest under \"other\".",
            None,
            MetricType::Gauge,
        )?;
        for (id, n) in self.channel_subscribers() {
            let label = id.map_or_else(|| "other".to_string(), |id| id.to_string());
            per_channel
                .encode_family(&[("channel", label.as_str())])?
                .encode_gauge(&(n as i64))?;
        }

        let mut busy = e.encode_descriptor(
            "clubcast_relay_worker_busy_ratio",
            "Share of the last publish interval each worker spent working rather than waiting.",
            None,
            MetricType::Gauge,
        )?;
        for w in 0..self.workers.len() {
            let id = w.to_string();
            let ratio = self.lock(w).busy_ratio;
            busy.encode_family(&[("worker", id.as_str())])?
                .encode_gauge(&ratio)?;
        }

        if self.backend == "xdp" {
            let [redirected, passed] = &self.xdp_packets;
            counter(
                &mut e,
                "clubcast_xdp_redirected_packets",
                "Packets the XDP program sent to the relay's AF_XDP sockets.",
                None,
                redirected.load(Ordering::Relaxed),
            )?;
            counter(
                &mut e,
                "clubcast_xdp_passed_packets",
                "Packets the XDP program passed on to the kernel (other traffic).",
                None,
                passed.load(Ordering::Relaxed),
            )?;
        }
        latency(
            &mut e,
            "clubcast_relay_first_send_latency",
            "Time from receiving a piece to handing its first copy to the kernel.",
            &self.merged(|s| &s.first_send_us),
        )?;
        latency(
            &mut e,
            "clubcast_relay_forward_latency",
            "Time from receiving a piece to handing its last copy (over all workers) to the kernel.",
            &self.merged(|s| &s.forward_us),
        )?;
        process::encode(&mut e)
    }
}

/// Sum (s), count and per-bucket counts (upper bound in s) of a µs HdrHistogram.
fn prometheus_buckets(h: &Histogram<u64>) -> (f64, u64, Vec<(f64, u64)>) {
    let mut counts = [0u64; LATENCY_BUCKETS_US.len() + 1];
    let mut sum_us = 0f64;
    for v in h.iter_recorded() {
        let value = h.highest_equivalent(v.value_iterated_to());
        let n = v.count_at_value();
        sum_us += h.median_equivalent(v.value_iterated_to()) as f64 * n as f64;
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < value);
        counts[i] += n;
    }
    let buckets = LATENCY_BUCKETS_US
        .iter()
        .map(|&b| b as f64 / 1e6)
        .chain(std::iter::once(f64::INFINITY))
        .zip(counts)
        .collect();
    (sum_us / 1e6, h.len(), buckets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_drops_and_latency_histogram() {
        let m = RelayMetrics::new("portable", 2);
        let mut stats = RelayStats {
            pieces_accepted: 7,
            piece_sends: 70,
            subscribers: 10,
            ..Default::default()
        };
        stats.record_drops(DropReason::BadSignature, 2);
        let mut lat = WorkerLatency::new();
        for us in [3, 40, 40, 700, 2_000_000] {
            lat.forward_us.record(us).unwrap();
        }
        lat.first_send_us.record(3).unwrap();
        let channel = |i: u8| ChannelId([i; 8]);
        let many = (1..=12).map(|i| (channel(i), usize::from(i)));
        m.publish(0, &stats, many, &mut lat, 0.25);
        let one = [(channel(12), 8)].into_iter();
        m.publish(1, &stats, one, &mut WorkerLatency::new(), 0.5);
        assert!(lat.forward_us.is_empty());
        let text = m.render();
        for line in [
            "clubcast_relay_pieces_accepted_total 14",
            "clubcast_relay_pieces_forwarded_total 140",
            "clubcast_relay_dropped_total{reason=\"bad_signature\"} 4",
            "clubcast_relay_dropped_total{reason=\"malformed\"} 0",
            "clubcast_relay_subscribers 20",
            "clubcast_relay_worker_busy_ratio{worker=\"1\"} 0.5",
            "clubcast_relay_first_send_latency_seconds_count 1",
            "clubcast_relay_forward_latency_seconds_count 5",
            "clubcast_relay_forward_latency_seconds_bucket{le=\"0.000005\"} 1",
            "clubcast_relay_forward_latency_seconds_bucket{le=\"0.00005\"} 3",
            "clubcast_relay_forward_latency_seconds_bucket{le=\"0.001\"} 4",
            "clubcast_relay_forward_latency_seconds_bucket{le=\"1.0\"} 4",
            "clubcast_relay_forward_latency_seconds_bucket{le=\"+Inf\"} 5",
            "clubcast_build_info{version=\"0.1.0\",backend=\"portable\",backend_mode=\"\"} 1",
            "clubcast_relay_ready 0",
            // Summed over workers, the ten largest by name, the rest (1 + 2) as "other".
            "clubcast_relay_channel_subscribers{channel=\"0c0c0c0c0c0c0c0c\"} 20",
            "clubcast_relay_channel_subscribers{channel=\"0303030303030303\"} 3",
            "clubcast_relay_channel_subscribers{channel=\"other\"} 3",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("channel=\"0202020202020202\""), "{text}");
        m.set_ready(true);
        assert!(m.render().contains("clubcast_relay_ready 1"));
    }
}
