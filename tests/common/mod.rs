//! Helpers shared by the whole-program tests: run the real `clubcast` binary, find the
//! addresses it bound, scrape its metrics, and clean up processes on every exit path.

#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clubcast::wire::{ChannelId, Hello, Message, MessageType, Subscription, MAX_DATAGRAM};

/// The binary under test.
pub fn clubcast() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clubcast"));
    c.env("NO_COLOR", "1");
    c
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.into(),
        }
    }

    /// Waits for exit, failing the test after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}",
                self.name
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay process and the addresses it reported.
pub struct Relay {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub log: mpsc::Receiver<String>,
}

impl Relay {
    /// Starts `clubcast relay` on ephemeral loopback ports with `extra` flags.
    pub fn start(extra: &[&str]) -> Relay {
        Relay::start_on("127.0.0.1:0", extra)
    }

    /// Starts `clubcast relay` on UDP `listen` (metrics on an ephemeral port) with `extra`.
    pub fn start_on(listen: &str, extra: &[&str]) -> Relay {
        let mut cmd = clubcast();
        cmd.args(["relay", "--listen", listen, "--metrics", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn("relay", &mut cmd);
        let stderr = proc.child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("relay printed no startup line");
        let addr = between(&line, "relay listening on ", " (backend");
        let metrics = between(&line, "metrics on http://", "/metrics");
        Relay {
            proc,
            addr: addr.parse().unwrap(),
            metrics: metrics.parse().unwrap(),
            log: rx,
        }
    }

    /// The relay's /metrics text.
    pub fn scrape(&self) -> String {
        http_get(self.metrics, "/metrics")
    }

    /// One sample's value, e.g. `clubcast_relay_dropped_total{reason="malformed"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        metric(&self.scrape(), sample)
    }

    /// Waits until `sample` reaches at least `value`.
    pub fn wait_metric(&self, sample: &str, value: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.metric(sample);
            if v >= value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sample} stayed at {v}, wanted {value}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
    let i = s
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in {s:?}"))
        + start.len();
    let j = s[i..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end:?} in {s:?}"))
        + i;
    &s[i..j]
}

/// GET `path` over HTTP/1.1; the body.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = http_request(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// GET `path` over HTTP/1.1; the status code and the body (chunked bodies joined).
pub fn http_request(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// Sends `signal` to a child process.
pub fn signal(proc: &Proc, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(proc.child.id()).unwrap();
    // SAFETY: kill only sends a signal to our own child, which has not been reaped yet.
    let r = unsafe { libc::kill(pid, signal) };
    assert_eq!(r, 0, "cannot signal {}", proc.name);
}

/// The value of one sample in Prometheus text; panics if absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Runs `cmd` to its end; its output, failing the test (with its stderr) if it failed.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes `seconds` of a synthetic MPEG-TS stream at `bitrate_bps` to `dir/in.ts`; the path
/// and the bytes.
pub fn synthetic_input(dir: &Path, seconds: u64, bitrate_bps: u64) -> (PathBuf, Vec<u8>) {
    let path = dir.join("in.ts");
    let mut ts = Vec::new();
    clubcast::ts::SyntheticTs::new(bitrate_bps)
        .generate_until(Duration::from_secs(seconds), &mut ts);
    std::fs::write(&path, &ts).unwrap();
    (path, ts)
}

/// Publishes file `input` to `relay` as fast as 8 Mbit/s allows, with `key` and `extra` flags,
/// and waits for the publisher to finish successfully.
pub fn publish_file(relay: SocketAddr, input: &Path, key: &Path, extra: &[&std::ffi::OsStr]) {
    run_ok(
        clubcast()
            .args([
                "publish",
                "--max-bitrate",
                "8mbit",
                "--to",
                &relay.to_string(),
            ])
            .arg("--input")
            .arg(input)
            .arg("--key")
            .arg(key)
            .args(extra),
    );
}

/// `clubcast relay --print-config --config FILE`: the effective settings, as TOML.
pub fn print_config(file: &Path) -> String {
    let out = run_ok(
        clubcast()
            .args(["relay", "--print-config", "--config"])
            .arg(file),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `clubcast keygen` in `dir`; the key path and the public key.
pub fn keygen(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("channel.key");
    let out = run_ok(clubcast().args(["keygen", "--out"]).arg(&path));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(public.len(), 64, "{public}");
    (path, public)
}

/// Starts a watcher writing to `output`.
pub fn watcher(relay: SocketAddr, channel: &str, output: &Path) -> Proc {
    watcher_with(relay, channel, output, &[])
}

/// Starts a watcher writing to `output`, with `extra` flags.
pub fn watcher_with(
    relay: SocketAddr,
    channel: &str,
    output: &Path,
    extra: &[&std::ffi::OsStr],
) -> Proc {
    let mut cmd = clubcast();
    cmd.args([
        "watch",
        "--relay",
        &relay.to_string(),
        "--channel",
        channel,
        "--idle-timeout",
        "30s",
        "--output",
    ])
    .arg(output)
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    Proc::spawn("watcher", &mut cmd)
}

/// Everything a finished child wrote to stderr.
pub fn stderr_of(proc: &mut Proc) -> String {
    let mut s = String::new();
    if let Some(mut e) = proc.child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Fails with a clear message when a required external tool is missing. Never skips: the
/// README's setup and CI install it.
pub fn require_tool(tool: &str) {
    let found = Command::new(tool)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{tool} is required by this test but was not found: run scripts/setup (CI installs it)"
    );
}

/// A subscriber driven by hand on loopback: HELLO → COOKIE → SUBSCRIBE → SUBSCRIBED. Its
/// socket (5 s read timeout) and subscription, for KEEPALIVE and UNSUBSCRIBE.
pub fn subscribe_by_hand(relay: SocketAddr, channel: ChannelId) -> (UdpSocket, Subscription) {
    try_subscribe_by_hand(relay, channel).expect("SUBSCRIBE not confirmed")
}

/// Like [`subscribe_by_hand`], but `None` if the relay does not confirm the SUBSCRIBE within a
/// second (e.g. its table is full). A missing COOKIE still fails the test.
pub fn try_subscribe_by_hand(
    relay: SocketAddr,
    channel: ChannelId,
) -> Option<(UdpSocket, Subscription)> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = Hello { channel, nonce: 3 }.encode(&mut buf).unwrap();
    s.send_to(&buf[..n], relay).unwrap();
    let n = s.recv(&mut buf).expect("no COOKIE for HELLO");
    let Ok(Message::Cookie(c)) = Message::parse(&buf[..n]) else {
        panic!("not a cookie")
    };
    let sub = Subscription {
        channel,
        cookie: c.cookie,
    };
    let n = sub.encode(MessageType::Subscribe, &mut buf).unwrap();
    s.send_to(&buf[..n], relay).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let n = s.recv(&mut buf).ok()?;
        if matches!(Message::parse(&buf[..n]), Ok(Message::Subscribed(_))) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            return Some((s, sub));
        }
    }
    None
}

/// A publisher thread on loopback: announces channel `ChannelKey::from_seed(seed)` and sends a
/// signed piece every `interval` until dropped.
pub struct TestPublisher {
    pub channel: ChannelId,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl TestPublisher {
    pub fn start(relay: SocketAddr, seed: [u8; 32], interval: Duration) -> TestPublisher {
        use clubcast::crypto::ChannelKey;
        use clubcast::publisher::Publisher;
        use clubcast::time::{wall_clock_us, Timestamp};
        use clubcast::wire::PieceFlags;
        use std::sync::atomic::{AtomicBool, Ordering};

        let key = ChannelKey::from_seed(&seed);
        let channel = key.public().channel_id();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut publisher = Publisher::new(key, wall_clock_us(), 1);
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.set_nonblocking(true).unwrap();
            let start = Instant::now();
            let now = || Timestamp::from_micros(start.elapsed().as_micros() as u64 + 1);
            let mut buf = [0u8; MAX_DATAGRAM];
            let mut sent = 0;
            while !stopped.load(Ordering::Relaxed) {
                if let Some(n) = publisher.poll_announce(now(), &mut buf) {
                    let _ = socket.send_to(&buf[..n], relay);
                }
                while let Ok(n) = socket.recv(&mut buf) {
                    publisher.handle_datagram(&buf[..n]);
                }
                if publisher.is_announced() {
                    let t = wall_clock_us();
                    let n = publisher
                        .encode_piece(&[0x47; 1128], PieceFlags::default(), t, &mut buf)
                        .unwrap();
                    if socket.send_to(&buf[..n], relay).is_ok() {
                        sent += 1;
                    }
                }
                thread::sleep(interval);
            }
            sent
        });
        TestPublisher {
            channel,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops publishing; the number of pieces sent.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestPublisher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts `clubcast tracker` on an ephemeral loopback port with member TTL `ttl`; the process
/// and its address.
pub fn start_tracker(ttl: &str) -> (Proc, SocketAddr) {
    let mut cmd = clubcast();
    cmd.args(["tracker", "--listen", "127.0.0.1:0", "--member-ttl", ttl])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut proc = Proc::spawn("tracker", &mut cmd);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proc.child.stderr.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .split("tracker listening on ")
        .nth(1)
        .unwrap_or_else(|| panic!("no startup line: {line:?}"))
        .trim()
        .parse()
        .unwrap();
    (proc, addr)
}
