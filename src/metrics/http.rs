//! A minimal HTTP/1.1 server for `/metrics`, `/healthz` (alive) and `/readyz` (serving) on the
//! operations address.
//!
//! One thread, one request per connection, bounded reads with timeouts: enough for Prometheus
//! and curl, and nothing a slow or malicious client can wedge for long.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::RelayMetrics;

/// What the endpoint serves: a Prometheus text exposition, and whether the process is ready.
pub trait MetricsSource: Send + Sync + 'static {
    /// The `/metrics` body.
    fn render(&self) -> String;
    /// Whether `/readyz` says ready.
    fn ready(&self) -> bool {
        true
    }
}

/// A relay that also amplifies swarms: its metrics, then the swarm members'.
impl MetricsSource for (Arc<RelayMetrics>, Arc<super::SwarmMetrics>) {
    fn render(&self) -> String {
        let relay = RelayMetrics::render(&self.0);
        // Both are complete expositions; only the last may keep its end marker.
        let relay = relay.strip_suffix("# EOF\n").unwrap_or(&relay);
        format!("{relay}{}", self.1.render_text())
    }
    fn ready(&self) -> bool {
        RelayMetrics::ready(&self.0)
    }
}

impl MetricsSource for Arc<RelayMetrics> {
    fn render(&self) -> String {
        RelayMetrics::render(self)
    }
    fn ready(&self) -> bool {
        RelayMetrics::ready(self)
    }
}

const MAX_REQUEST_HEAD: u64 = 8 * 1024;
/// Longest a client may take to send its request, however it dribbles the bytes.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A reader that fails once the request's deadline has passed.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

/// A running metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
}

impl MetricsServer {
    /// Binds `addr` and serves `metrics` from a background thread for the life of the process.
    pub fn start(addr: SocketAddr, metrics: impl MetricsSource) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    // A broken client is its own problem; the next one is served.
                    let _ = serve(stream, &metrics);
                }
            })?;
        Ok(MetricsServer { local_addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

fn serve(stream: TcpStream, metrics: &impl MetricsSource) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let request = DeadlineReader {
        stream: &stream,
        deadline: Instant::now() + REQUEST_DEADLINE,
    };
    let mut reader = BufReader::new(request.take(MAX_REQUEST_HEAD));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers so the client sees a clean close.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") if metrics.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready (starting or draining)\n".to_string(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let mut out = &stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_health_and_errors() {
        let metrics = RelayMetrics::new("portable", 1);
        let server =
            MetricsServer::start("127.0.0.1:0".parse().unwrap(), Arc::clone(&metrics)).unwrap();
        let a = server.local_addr();
        let r = get(a, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("clubcast_relay_pieces_forwarded_total 0"));
        assert!(get(a, "GET /healthz HTTP/1.1\r\n\r\n").ends_with("ok\n"));
        assert!(get(a, "GET /readyz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 503"));
        assert!(get(a, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(a, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(a, "\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 405"));
        metrics.set_ready(true);
        assert!(get(a, "GET /readyz HTTP/1.1\r\n\r\n").ends_with("ready\n"));
    }

    #[test]
    fn a_dribbling_client_cannot_hold_the_server() {
        let server = MetricsServer::start(
            "127.0.0.1:0".parse().unwrap(),
            RelayMetrics::new("portable", 1),
        )
        .unwrap();
        let a = server.local_addr();
        let mut slow = TcpStream::connect(a).unwrap();
        let start = Instant::now();
        // One byte a second keeps every single read short of a timeout.
        let dribble = std::thread::spawn(move || {
            for b in b"GET /metrics HTTP/1.1\r\n" {
                if slow.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        // The next client is served once the slow one's deadline has passed.
        let r = get(a, "GET /healthz HTTP/1.1\r\n\r\n");
        assert!(r.ends_with("ok\n"));
        // Without the deadline the slow client would hold the server for its whole 11.5 s.
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "{:?}",
            start.elapsed()
        );
        drop(dribble);
    }
}
