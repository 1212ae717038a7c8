//! The standard `process_*` metrics (CPU, memory, file descriptors, threads, start time), read
//! from `/proc/self` at scrape time. Where `/proc` cannot be read a metric is left out rather
//! than reported as zero.

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// What `/proc/self/stat` says about this process.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    cpu_seconds: f64,
    threads: u64,
    start_seconds_since_boot: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
}

/// Parses `/proc/self/stat` text; `ticks` is the clock tick rate, `page` the page size.
fn parse_stat(text: &str, ticks: f64, page: u64) -> Option<Stat> {
    // The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field n is fields[n - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_seconds_since_boot: field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
    })
}

/// Boot time, seconds since the Unix epoch, from `/proc/stat`.
fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("btime "))?;
    line[6..].trim().parse().ok()
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf only reads the configuration value named; any name is safe to ask for.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|&v| v > 0)
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (r == 0).then_some(limit.rlim_cur)
}

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: f64,
) -> std::fmt::Result {
    e.encode_descriptor(name, help, unit, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// Writes the process metrics that can be read.
pub(super) fn encode(e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| {
            parse_stat(
                &t,
                sysconf(libc::_SC_CLK_TCK)? as f64,
                sysconf(libc::_SC_PAGESIZE)?,
            )
        });
    if let Some(s) = stat {
        e.encode_descriptor(
            "process_cpu",
            "User and system CPU time spent.",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, u64>(&s.cpu_seconds, None)?;
        gauge(
            e,
            "process_resident_memory",
            "Resident memory size.",
            Some(&Unit::Bytes),
            s.resident_bytes as f64,
        )?;
        gauge(
            e,
            "process_virtual_memory",
            "Virtual memory size.",
            Some(&Unit::Bytes),
            s.virtual_bytes as f64,
        )?;
        gauge(
            e,
            "process_threads",
            "OS threads in the process.",
            None,
            s.threads as f64,
        )?;
        if let Some(boot) = boot_time() {
            gauge(
                e,
                "process_start_time",
                "Start time of the process since the Unix epoch.",
                Some(&Unit::Seconds),
                boot + s.start_seconds_since_boot,
            )?;
        }
    }
    if let Some(n) = open_fds() {
        gauge(
            e,
            "process_open_fds",
            "Open file descriptors.",
            None,
            n as f64,
        )?;
    }
    if let Some(n) = max_fds() {
        gauge(
            e,
            "process_max_fds",
            "Most open file descriptors allowed.",
            None,
            n as f64,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_an_awkward_command_name() {
        let mut fields = vec!["0"; 50];
        fields[0] = "S"; // field 3
        fields[11] = "250"; // utime (14)
        fields[12] = "150"; // stime (15)
        fields[17] = "7"; // threads (20)
        fields[19] = "1000"; // start time (22)
        fields[20] = "4096000"; // vsize (23)
        fields[21] = "300"; // rss pages (24)
        let text = format!("1234 (a) b (c)) {}", fields.join(" "));
        let s = parse_stat(&text, 100.0, 4096).unwrap();
        assert_eq!(
            s,
            Stat {
                cpu_seconds: 4.0,
                threads: 7,
                start_seconds_since_boot: 10.0,
                virtual_bytes: 4_096_000,
                resident_bytes: 300 * 4096,
            }
        );
        assert_eq!(parse_stat("1234 (cut", 100.0, 4096), None);
        assert_eq!(parse_stat("1 (x) S 1 2", 100.0, 4096), None);
    }

    #[test]
    fn reads_this_process() {
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        let s = parse_stat(&text, 100.0, 4096).unwrap();
        assert!(s.threads >= 1 && s.resident_bytes > 0);
        assert!(open_fds().unwrap() >= 3);
        assert!(max_fds().unwrap() >= open_fds().unwrap());
        assert!(boot_time().unwrap() > 1.0e9);
    }
}
