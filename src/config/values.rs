//! Value syntax shared by flags, config files and environment variables: addresses,
//! bitrates, durations and sizes, parsed from text and shown back in the same syntax.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// `HOST:PORT` or `IP:PORT`, resolved to the first address.
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// A bitrate: a number with an optional unit `bit`, `kbit`, `mbit`, `gbit` (or `k`, `m`, `g`),
/// in bits per second: `2mbit`, `500kbit`, `1.5m`, `64000`.
pub fn bitrate(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, mult) = split_unit(
        &lower,
        &[
            ("gbit", 1e9),
            ("mbit", 1e6),
            ("kbit", 1e3),
            ("bit", 1.0),
            ("g", 1e9),
            ("m", 1e6),
            ("k", 1e3),
        ],
    );
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a bitrate (e.g. 2mbit, 500kbit, 64000)"))?;
    let bps = v * mult;
    if !(1.0..=1e12).contains(&bps) {
        return Err(format!("{s:?} is out of range (1 bit/s to 1000 gbit/s)"));
    }
    Ok(bps as u64)
}

/// A duration: a number with an optional unit `ms`, `s`, `m`, `h` (seconds if none).
pub fn duration(s: &str) -> Result<Duration, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, mult) = split_unit(
        &lower,
        &[("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)],
    );
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    if !(0.0..=1e7).contains(&(v * mult)) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// A byte size: a number with an optional unit `k`, `m` (KiB, MiB).
pub fn bytes(s: &str) -> Result<usize, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, mult) = split_unit(
        &lower,
        &[
            ("kib", 1024.0),
            ("mib", 1048576.0),
            ("k", 1024.0),
            ("m", 1048576.0),
        ],
    );
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 8m, 512k, 65536)"))?;
    let b = v * mult;
    if !(1.0..=1e10).contains(&b) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(b as usize)
}

fn split_unit<'a>(s: &'a str, units: &[(&str, f64)]) -> (&'a str, f64) {
    for (unit, mult) in units {
        if let Some(num) = s.strip_suffix(unit) {
            return (num.trim(), *mult);
        }
    }
    (s, 1.0)
}

/// A duration in the syntax [`duration`] reads back: `250ms`, `5s`, `2m`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A size in the syntax [`bytes`] reads back: `8m`, `512k`, `1000`.
pub fn show_bytes(b: usize) -> String {
    if b % (1 << 20) == 0 && b > 0 {
        format!("{}m", b >> 20)
    } else if b % 1024 == 0 && b > 0 {
        format!("{}k", b >> 10)
    } else {
        b.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitrates() {
        assert_eq!(bitrate("2mbit"), Ok(2_000_000));
        assert_eq!(bitrate("500kbit"), Ok(500_000));
        assert_eq!(bitrate("1.5M"), Ok(1_500_000));
        assert_eq!(bitrate("64000"), Ok(64_000));
        assert!(bitrate("fast").is_err());
        assert!(bitrate("0").is_err());
        assert!(bitrate("-1mbit").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("3"), Ok(Duration::from_secs(3)));
        assert!(duration("soon").is_err());
        assert!(duration("-1s").is_err());
    }

    #[test]
    fn sizes_and_addresses() {
        assert_eq!(bytes("8m"), Ok(8 << 20));
        assert_eq!(bytes("512k"), Ok(512 << 10));
        assert!(bytes("lots").is_err());
        assert_eq!(socket_addr("127.0.0.1:7000").unwrap().port(), 7000);
        assert_eq!(socket_addr("localhost:7000").unwrap().port(), 7000);
        assert!(socket_addr("no-port").is_err());
    }

    #[test]
    fn shown_values_read_back() {
        for d in [250, 5_000, 120_000, 1_500] {
            let d = Duration::from_millis(d);
            assert_eq!(duration(&show_duration(d)), Ok(d));
        }
        for b in [8 << 20, 512 << 10, 1000] {
            assert_eq!(bytes(&show_bytes(b)), Ok(b));
        }
    }
}
