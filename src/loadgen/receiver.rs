//! One receiver thread of the load generator: many subscriber sockets, drained with `poll` and
//! `recvmmsg`, counting what each subscriber gets.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::backend::{PortableSocket, RecvBatch};
use crate::client::socket_towards;
use crate::metrics::latency_histogram;
use crate::time::MonotonicClock;
use crate::wire::{ChannelId, CookieBytes, Hello, Message, MessageType, Subscription};

/// Totals over some subscribers.
#[derive(Debug, Clone, Default)]
pub(super) struct SubscriberTotals {
    pub(super) unique: u64,
    pub(super) duplicates: u64,
    pub(super) reorders: u64,
    pub(super) bytes: u64,
}

impl SubscriberTotals {
    pub(super) fn add(&mut self, o: &SubscriberTotals) {
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.reorders += o.reorders;
        self.bytes += o.bytes;
    }
}

pub(super) enum HandshakeError {
    Io(io::Error),
    Timeout,
}

struct Subscriber {
    socket: PortableSocket,
    cookie: Option<CookieBytes>,
    subscribed: bool,
    seen: Vec<u64>,
    highest: Option<u64>,
    totals: SubscriberTotals,
}

impl Subscriber {
    /// Records a piece; returns true if it is new.
    fn record(&mut self, index: u64, len: usize) -> bool {
        let (word, bit) = ((index / 64) as usize, index % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        self.totals.bytes += len as u64;
        if self.seen[word] & (1 << bit) != 0 {
            self.totals.duplicates += 1;
            return false;
        }
        self.seen[word] |= 1 << bit;
        self.totals.unique += 1;
        match self.highest {
            Some(h) if index < h => self.totals.reorders += 1,
            _ => self.highest = Some(index),
        }
        true
    }
}

/// The subscribers one thread serves.
pub(super) struct Receiver {
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
    relay: SocketAddr,
    channel: ChannelId,
    first_seq: u64,
    clock: MonotonicClock,
    subs: Vec<Subscriber>,
    recv: RecvBatch,
    buf: [u8; 64],
}

const RETRY: Duration = Duration::from_millis(250);
/// Each subscriber socket's receive buffer: small enough (~200 full pieces) that a relay or
/// receiver that falls behind shows as loss within a trial instead of hiding in a queue.
const SUBSCRIBER_BUFFER: usize = 256 << 10;
const KEEPALIVE: Duration = Duration::from_secs(1);

impl Receiver {
    pub(super) fn open(
        relay: SocketAddr,
        channel: ChannelId,
        count: usize,
        first_seq: u64,
        clock: MonotonicClock,
    ) -> io::Result<Self> {
        let subs: Vec<Subscriber> = (0..count)
            .map(|_| {
                Ok(Subscriber {
                    socket: socket_towards(relay, SUBSCRIBER_BUFFER)?,
                    cookie: None,
                    subscribed: false,
                    seen: Vec::new(),
                    highest: None,
                    totals: SubscriberTotals::default(),
                })
            })
            .collect::<io::Result<_>>()?;
        // SAFETY: epoll_create1 takes no pointers; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        for (i, sub) in subs.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: both descriptors are open and ev is a live epoll_event.
            let r = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    sub.socket.fd(),
                    &mut ev,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Receiver {
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            relay,
            channel,
            first_seq,
            clock,
            subs,
            recv: RecvBatch::new(),
            buf: [0; 64],
        })
    }

    /// Sends HELLO, or SUBSCRIBE once a cookie is known, for subscriber `i`.
    fn send_control(&mut self, i: usize, kind: MessageType) {
        let sub = &self.subs[i];
        let n = match sub.cookie {
            None => Hello {
                channel: self.channel,
                nonce: i as u64,
            }
            .encode(&mut self.buf),
            Some(cookie) => Subscription {
                channel: self.channel,
                cookie,
            }
            .encode(kind, &mut self.buf),
        };
        if let Ok(n) = n {
            let _ = sub.socket.send_to(&self.buf[..n], self.relay);
        }
    }

    /// Subscribes every socket, or fails at `deadline`.
    pub(super) fn handshake(&mut self, deadline: Instant) -> Result<(), HandshakeError> {
        let mut next_retry = Instant::now();
        while self.subs.iter().any(|s| !s.subscribed) {
            let now = Instant::now();
            if now > deadline {
                return Err(HandshakeError::Timeout);
            }
            if now >= next_retry {
                for i in 0..self.subs.len() {
                    if !self.subs[i].subscribed {
                        self.send_control(i, MessageType::Subscribe);
                    }
                }
                next_retry = now + RETRY;
            }
            self.poll_and_drain(Duration::from_millis(20), None)
                .map_err(HandshakeError::Io)?;
        }
        Ok(())
    }

    /// Counts pieces until `stop`; returns the totals and the latency histogram.
    pub(super) fn run(
        mut self,
        stop: &AtomicBool,
        received: &AtomicU64,
    ) -> io::Result<(SubscriberTotals, Histogram<u64>)> {
        let mut latency = latency_histogram();
        let mut next_keepalive = Instant::now() + KEEPALIVE;
        while !stop.load(Ordering::Relaxed) {
            let got = self.poll_and_drain(Duration::from_millis(10), Some(&mut latency))?;
            received.fetch_add(got, Ordering::Relaxed);
            if Instant::now() >= next_keepalive {
                for i in 0..self.subs.len() {
                    self.send_control(i, MessageType::Keepalive);
                }
                next_keepalive += KEEPALIVE;
            }
        }
        let mut totals = SubscriberTotals::default();
        for s in &self.subs {
            totals.add(&s.totals);
        }
        Ok((totals, latency))
    }

    /// Waits up to `timeout` for any socket, then drains every readable one. Returns the number
    /// of new pieces.
    fn poll_and_drain(
        &mut self,
        timeout: Duration,
        mut latency: Option<&mut Histogram<u64>>,
    ) -> io::Result<u64> {
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: events is a live buffer of events.len() epoll_event structs.
        let ready = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                ms,
            )
        };
        if ready <= 0 {
            return Ok(0);
        }
        let mut new = 0;
        for e in 0..ready as usize {
            let i = self.events[e].u64 as usize;
            while self.subs[i].socket.recv_batch(&mut self.recv)? > 0 {
                let now_us = self.clock.now().as_micros();
                let mut resubscribe = false;
                for k in 0..self.recv.len() {
                    let (from, data) = self.recv.get(k);
                    if from != Some(self.relay) {
                        continue;
                    }
                    let sub = &mut self.subs[i];
                    match Message::parse(data) {
                        Ok(Message::Piece(p))
                            if p.seq() >= self.first_seq
                                && sub.record(p.seq() - self.first_seq, data.len()) =>
                        {
                            new += 1;
                            if let Some(h) = latency.as_deref_mut() {
                                h.saturating_record(now_us.saturating_sub(p.publish_time_us()));
                            }
                        }
                        Ok(Message::Cookie(c)) => {
                            sub.cookie = Some(c.cookie);
                            resubscribe = true;
                        }
                        Ok(Message::Subscribed(s)) if s.channel == self.channel => {
                            sub.subscribed = true;
                        }
                        _ => {}
                    }
                }
                if resubscribe {
                    self.send_control(i, MessageType::Subscribe);
                }
            }
        }
        Ok(new)
    }
}
