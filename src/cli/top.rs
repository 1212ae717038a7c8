//! `clubcast top`: a live terminal view of one relay, from its /metrics endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use clubcast::metrics::text::{parse_samples, Sample};

use super::args;

/// Watch one relay live: rates, drops, subscribers, latency quantiles, workers, process.
///
/// Scrapes the relay's /metrics every --interval and shows per-second rates computed between
/// the last two scrapes. On a terminal the screen is redrawn in place; otherwise (piped, in a
/// script) each refresh is printed after the last.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The relay's metrics address (its --metrics).
    #[arg(long, default_value = "127.0.0.1:9700", value_name = "ADDR", value_parser = args::socket_addr)]
    metrics: SocketAddr,

    /// Time between refreshes (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = args::duration)]
    interval: Duration,

    /// Stop after this many refreshes (0: run until interrupted).
    #[arg(long, default_value_t = 0, value_name = "N")]
    count: u64,
}

/// One scrape: samples by name and label set.
struct Scrape {
    at: Instant,
    samples: Vec<Sample>,
}

impl Scrape {
    fn value(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    }

    fn labelled<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    fn with_label(&self, name: &str, label: &str, value: &str) -> Option<f64> {
        self.labelled(name)
            .find(|s| s.label(label) == Some(value))
            .map(|s| s.value)
    }
}

fn fetch(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot reach the relay's metrics at {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("reading /metrics from {addr}"))?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr} did not answer with HTTP"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or("");
        anyhow::bail!("{addr}/metrics answered {status:?}");
    }
    Ok(Scrape {
        at: Instant::now(),
        samples: parse_samples(body),
    })
}

/// Per-second rate of a counter between two scrapes.
fn rate(old: &Scrape, new: &Scrape, name: &str) -> f64 {
    let secs = new.at.duration_since(old.at).as_secs_f64().max(1e-3);
    match (old.value(name), new.value(name)) {
        (Some(a), Some(b)) => (b - a).max(0.0) / secs,
        _ => 0.0,
    }
}

fn ms(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".into(), |s| format!("{:.2}ms", s * 1e3))
}

/// The screen for two consecutive scrapes.
fn render(addr: SocketAddr, old: &Scrape, new: &Scrape) -> String {
    let mut o = String::new();
    let info = new.labelled("clubcast_build_info").next();
    let label = |k| info.and_then(|s| s.label(k)).unwrap_or("?");
    let ready = match new.value("clubcast_relay_ready") {
        Some(v) if v > 0.0 => "ready",
        Some(_) => "NOT READY",
        None => "?",
    };
    let _ = writeln!(
        o,
        "clubcast relay at {addr}  version {}  backend {}  {ready}",
        label("version"),
        label("backend")
    );
    let r = |name| rate(old, new, name);
    let _ = writeln!(
        o,
        "\n  datagrams in/s {:>10.0}   pieces in/s {:>9.0}   accepted/s {:>9.0}",
        r("clubcast_relay_datagrams_received_total"),
        r("clubcast_relay_pieces_received_total"),
        r("clubcast_relay_pieces_accepted_total"),
    );
    let _ = writeln!(
        o,
        "  copies out/s   {:>10.0}   out Mbit/s  {:>9.1}   replies/s  {:>9.0}",
        r("clubcast_relay_pieces_forwarded_total"),
        r("clubcast_relay_forwarded_bytes_total") * 8.0 / 1e6,
        r("clubcast_relay_control_replies_total"),
    );
    let v = |name| new.value(name).unwrap_or(0.0);
    let _ = writeln!(
        o,
        "  subscribers    {:>10.0}   channels    {:>9.0}   expired {:>6.0}  cut {:>6.0}",
        v("clubcast_relay_subscribers"),
        v("clubcast_relay_channels"),
        v("clubcast_relay_subscribers_expired_total"),
        v("clubcast_relay_subscribers_cut_total"),
    );

    let _ = writeln!(
        o,
        "\n  latency          p50        p90        p99      p99.9"
    );
    for (title, name) in [
        (
            "first send",
            "clubcast_relay_first_send_latency_quantile_seconds",
        ),
        (
            "forward   ",
            "clubcast_relay_forward_latency_quantile_seconds",
        ),
    ] {
        let q = |q| new.with_label(name, "quantile", q);
        let _ = writeln!(
            o,
            "  {title} {:>10} {:>10} {:>10} {:>10}",
            ms(q("0.5")),
            ms(q("0.9")),
            ms(q("0.99")),
            ms(q("0.999"))
        );
    }

    let _ = writeln!(o, "\n  drops            total     per s");
    let mut any = false;
    for s in new.labelled("clubcast_relay_dropped_total") {
        let reason = s.label("reason").unwrap_or("?");
        if s.value == 0.0 {
            continue;
        }
        any = true;
        let before = old
            .with_label("clubcast_relay_dropped_total", "reason", reason)
            .unwrap_or(s.value);
        let secs = new.at.duration_since(old.at).as_secs_f64().max(1e-3);
        let _ = writeln!(
            o,
            "  {reason:<16} {:>6.0} {:>9.0}",
            s.value,
            (s.value - before).max(0.0) / secs
        );
    }
    if !any {
        let _ = writeln!(o, "  none");
    }

    let busy: BTreeMap<String, f64> = new
        .labelled("clubcast_relay_worker_busy_ratio")
        .map(|s| (s.label("worker").unwrap_or("?").to_string(), s.value))
        .collect();
    let workers: Vec<String> = busy
        .iter()
        .map(|(w, b)| format!("{w}: {:.0}%", b * 100.0))
        .collect();
    let _ = writeln!(o, "\n  workers busy     {}", workers.join("  "));
    let _ = writeln!(
        o,
        "  process          cpu {:.0}%  rss {:.1} MiB  fds {:.0}  threads {:.0}",
        r("process_cpu_seconds_total") * 100.0,
        v("process_resident_memory_bytes") / (1 << 20) as f64,
        v("process_open_fds"),
        v("process_threads"),
    );
    let channels: Vec<String> = new
        .labelled("clubcast_relay_channel_subscribers")
        .take(5)
        .map(|s| format!("{} {:.0}", s.label("channel").unwrap_or("?"), s.value))
        .collect();
    if !channels.is_empty() {
        let _ = writeln!(o, "  top channels     {}", channels.join("  "));
    }
    o
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let mut old = fetch(args.metrics)?;
    let mut shown = 0;
    while args.count == 0 || shown < args.count {
        std::thread::sleep(args.interval);
        let new = fetch(args.metrics)?;
        let screen = render(args.metrics, &old, &new);
        let mut out = std::io::stdout().lock();
        if terminal {
            // Home the cursor and clear, then draw.
            write!(out, "\x1b[H\x1b[2J{screen}")?;
        } else {
            writeln!(out, "{screen}")?;
        }
        out.flush()?;
        old = new;
        shown += 1;
    }
    Ok(())
}
