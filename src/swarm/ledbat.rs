//! LEDBAT (RFC 6817) congestion control for background transfers (catch-up and repair), so
//! they yield to the live pieces: the window grows while the measured queueing delay is below a
//! target and shrinks as soon as it passes it, well before loss.
//!
//! Sans-IO: the owner reports bytes sent, acknowledgements with the one-way delay each one
//! measured (the receiver's clock minus the sender's timestamp — a constant clock offset
//! cancels out against the base delay), and losses; it asks how much it may have in flight.

use std::time::Duration;

use crate::time::Timestamp;

/// Tunables; the defaults follow RFC 6817 except the target (see [`LedbatConfig::target`]).
#[derive(Debug, Clone)]
pub struct LedbatConfig {
    /// Queueing delay the flow aims for. RFC 6817 allows up to 100 ms; live pieces are due
    /// within a second, so background traffic backs off at 25 ms.
    pub target: Duration,
    /// Bytes per packet.
    pub mss: u64,
    /// Window growth per round trip at zero queueing delay, in packets (RFC: GAIN = 1).
    pub gain: f64,
    /// Smallest window, in packets.
    pub min_cwnd_packets: u64,
    /// Minutes of base-delay history (RFC: BASE_HISTORY = 10).
    pub base_history: usize,
    /// Delay samples the current delay is the minimum of (RFC: CURRENT_FILTER, here 4).
    pub current_filter: usize,
}

impl Default for LedbatConfig {
    fn default() -> Self {
        LedbatConfig {
            target: Duration::from_millis(25),
            mss: 1232,
            gain: 1.0,
            min_cwnd_packets: 2,
            base_history: 10,
            current_filter: 4,
        }
    }
}

/// One LEDBAT-controlled flow.
#[derive(Debug, Clone)]
pub struct Ledbat {
    config: LedbatConfig,
    /// Congestion window, bytes.
    cwnd: f64,
    /// Bytes sent and not yet acknowledged or lost.
    flight: u64,
    /// The most bytes ever in flight since the last loss: the window may not grow more than
    /// one packet past what the sender actually used (it would mean nothing).
    peak_flight: u64,
    /// Minimum one-way delay per minute, newest last (µs, as measured: may include an offset).
    base_delays: Vec<u64>,
    /// Start of the newest minute in `base_delays`.
    base_minute: Option<Timestamp>,
    /// The last few delay samples (µs).
    current: Vec<u64>,
    /// No second loss reaction before this (one per round trip).
    loss_quiet_until: Timestamp,
    /// Smoothed round-trip estimate, for the once-per-RTT loss reaction.
    rtt: Duration,
}

impl Ledbat {
    /// A flow with an initial window of two packets (RFC 6817 § 2.4.2).
    pub fn new(config: LedbatConfig) -> Self {
        Ledbat {
            cwnd: (config.min_cwnd_packets * config.mss) as f64,
            flight: 0,
            peak_flight: 0,
            base_delays: Vec::with_capacity(config.base_history),
            base_minute: None,
            current: Vec::with_capacity(config.current_filter),
            loss_quiet_until: Timestamp::ZERO,
            rtt: Duration::from_millis(100),
            config,
        }
    }

    /// The congestion window, bytes.
    pub fn window(&self) -> u64 {
        self.cwnd as u64
    }

    /// Bytes in flight.
    pub fn in_flight(&self) -> u64 {
        self.flight
    }

    /// Whether `bytes` more may be sent now.
    pub fn can_send(&self, bytes: u64) -> bool {
        self.flight + bytes <= self.window().max(self.config.mss)
    }

    /// Records `bytes` sent.
    pub fn on_sent(&mut self, bytes: u64) {
        self.flight += bytes;
        self.peak_flight = self.peak_flight.max(self.flight);
    }

    /// Updates the round-trip estimate (used to react to loss once per round trip).
    pub fn on_rtt(&mut self, sample: Duration) {
        self.rtt = (self.rtt * 7 + sample) / 8;
    }

    /// The base delay: the lowest one-way delay seen over the history (µs, as measured).
    fn base_delay(&self) -> Option<u64> {
        self.base_delays.iter().copied().min()
    }

    /// The current delay: the lowest of the last few samples (filters out noise).
    fn current_delay(&self) -> Option<u64> {
        self.current.iter().copied().min()
    }

    /// Estimated queueing delay on the path now.
    pub fn queueing_delay(&self) -> Duration {
        match (self.current_delay(), self.base_delay()) {
            (Some(c), Some(b)) => Duration::from_micros(c.saturating_sub(b)),
            _ => Duration::ZERO,
        }
    }

    fn record_delay(&mut self, now: Timestamp, delay_us: u64) {
        let new_minute = self
            .base_minute
            .is_none_or(|m| now.saturating_since(m) >= Duration::from_secs(60));
        if new_minute {
            if self.base_delays.len() == self.config.base_history {
                self.base_delays.remove(0);
            }
            self.base_delays.push(delay_us);
            self.base_minute = Some(now);
        } else if let Some(last) = self.base_delays.last_mut() {
            *last = (*last).min(delay_us);
        }
        if self.current.len() == self.config.current_filter {
            self.current.remove(0);
        }
        self.current.push(delay_us);
    }

    /// An acknowledgement of `acked` bytes whose one-way delay was `delay_us` (receiver's clock
    /// minus sender's timestamp, µs; any constant offset between the clocks is fine).
    pub fn on_ack(&mut self, now: Timestamp, acked: u64, delay_us: u64) {
        self.flight = self.flight.saturating_sub(acked);
        self.record_delay(now, delay_us);
        let target = self.config.target.as_micros() as f64;
        let queueing = self.queueing_delay().as_micros() as f64;
        let off_target = (target - queueing) / target;
        let mss = self.config.mss as f64;
        self.cwnd += self.config.gain * off_target * acked as f64 * mss / self.cwnd;
        // Do not grow beyond what is actually in use (RFC 6817 § 2.4.2, ALLOWED_INCREASE = 1).
        let max_allowed = self.peak_flight as f64 + mss;
        self.cwnd = self.cwnd.min(max_allowed).max(self.min_cwnd());
    }

    /// `lost` bytes were lost: the window halves, at most once per round trip.
    pub fn on_loss(&mut self, now: Timestamp, lost: u64) {
        self.flight = self.flight.saturating_sub(lost);
        if now < self.loss_quiet_until {
            return;
        }
        self.loss_quiet_until = now + self.rtt;
        self.cwnd = (self.cwnd / 2.0).max(self.min_cwnd());
        self.peak_flight = self.flight;
    }

    fn min_cwnd(&self) -> f64 {
        (self.config.min_cwnd_packets * self.config.mss) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bottleneck of `capacity` bytes/s with a FIFO queue and `base` one-way delay, driven
    /// by one LEDBAT sender in 10 ms steps; `offset` is added to every measured delay (clock
    /// skew between sender and receiver). Returns (window, queueing delay) at each second.
    struct Path {
        capacity: f64,
        base: Duration,
        queue_bytes: f64,
        offset_us: u64,
    }

    impl Path {
        fn delay_us(&self) -> u64 {
            let queueing = self.queue_bytes / self.capacity;
            self.base.as_micros() as u64 + (queueing * 1e6) as u64 + self.offset_us
        }

        /// Runs `seconds` of a saturating sender; the queueing delay of each last second.
        fn run(&mut self, l: &mut Ledbat, start: Timestamp, seconds: u64) -> Vec<Duration> {
            let step = Duration::from_millis(10);
            let mut out = Vec::new();
            let mut now = start;
            for s in 0..seconds * 100 {
                now = now + step;
                // Send what the window allows, one packet at a time, into the queue.
                while l.can_send(l.config.mss) {
                    l.on_sent(l.config.mss);
                    self.queue_bytes += l.config.mss as f64;
                }
                // The bottleneck drains; drained bytes are acked with the delay they saw.
                let drained = (self.capacity * step.as_secs_f64()).min(self.queue_bytes);
                let delay = self.delay_us();
                self.queue_bytes -= drained;
                let mut left = drained as u64;
                while left >= l.config.mss {
                    l.on_ack(now, l.config.mss, delay);
                    left -= l.config.mss;
                }
                if s % 100 == 99 {
                    // The queueing delay the last acknowledged packets saw.
                    out.push(Duration::from_micros(delay - self.offset_us) - self.base);
                }
            }
            out
        }
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::ZERO + Duration::from_millis(ms)
    }

    #[test]
    fn settles_near_the_target_queueing_delay() {
        let mut l = Ledbat::new(LedbatConfig::default());
        let mut path = Path {
            capacity: 1_000_000.0,
            base: Duration::from_millis(20),
            queue_bytes: 0.0,
            offset_us: 0,
        };
        let queueing = path.run(&mut l, at(0), 30);
        let settled = queueing[20..].iter().max().unwrap();
        assert!(
            *settled > Duration::from_millis(10) && *settled < Duration::from_millis(40),
            "{queueing:?}"
        );
    }

    #[test]
    fn backs_off_when_queueing_delay_passes_the_target() {
        let config = LedbatConfig::default();
        let mss = config.mss;
        let mut l = Ledbat::new(config);
        // Each round: fill the window, then every packet is acknowledged with `delay_us`.
        let round = |l: &mut Ledbat, now: Timestamp, delay_us: u64| {
            let mut sent = 0;
            while l.can_send(mss) {
                l.on_sent(mss);
                sent += 1;
            }
            for _ in 0..sent {
                l.on_ack(now, mss, delay_us);
            }
        };
        // No queue at first: 20 ms one-way, the window grows.
        let mut now = at(0);
        for _ in 0..50 {
            now = now + Duration::from_millis(40);
            round(&mut l, now, 20_000);
        }
        let grown = l.window();
        assert!(grown > 2 * mss, "{grown}");
        assert_eq!(l.queueing_delay(), Duration::ZERO);
        // Live traffic fills the queue: 60 ms of queueing, well past the 25 ms target.
        let mut windows = Vec::new();
        for _ in 0..20 {
            now = now + Duration::from_millis(40);
            round(&mut l, now, 80_000);
            windows.push(l.window());
        }
        assert_eq!(l.queueing_delay(), Duration::from_millis(60));
        assert!(
            windows.windows(2).all(|w| w[1] <= w[0]),
            "the window never grows"
        );
        assert!(l.window() < grown / 2, "{} vs {grown}", l.window());
        assert!(l.window() >= 2 * mss, "never below the minimum");
        // The queue drains: the flow grows again.
        let low = l.window();
        for _ in 0..20 {
            now = now + Duration::from_millis(40);
            round(&mut l, now, 21_000);
        }
        assert!(l.window() > low);
    }

    #[test]
    fn a_clock_offset_between_the_ends_changes_nothing() {
        let run = |offset_us| {
            let mut l = Ledbat::new(LedbatConfig::default());
            let mut path = Path {
                capacity: 500_000.0,
                base: Duration::from_millis(30),
                queue_bytes: 0.0,
                offset_us,
            };
            (path.run(&mut l, at(0), 10), l.window())
        };
        assert_eq!(run(0), run(7_000_000_000));
    }

    #[test]
    fn loss_halves_the_window_once_per_round_trip() {
        let mut l = Ledbat::new(LedbatConfig::default());
        l.on_rtt(Duration::from_millis(100));
        for i in 0..50 {
            let mut sent = 0;
            while l.can_send(1232) {
                l.on_sent(1232);
                sent += 1;
            }
            for _ in 0..sent {
                l.on_ack(at(i), 1232, 10_000);
            }
        }
        assert!(l.window() >= 8 * 1232, "{}", l.window());
        let before = l.window();
        l.on_loss(at(1000), 1232);
        l.on_loss(at(1010), 1232); // same round trip
        assert_eq!(l.window(), before / 2);
        l.on_loss(at(1200), 1232);
        assert_eq!(l.window(), before / 4);
    }

    #[test]
    fn the_base_delay_forgets_old_minutes() {
        let mut l = Ledbat::new(LedbatConfig::default());
        // A short path, then a route change to a longer one: after the history window the
        // old minimum is gone and the longer path does not read as queueing.
        l.on_ack(at(0), 0, 10_000);
        for minute in 1..=11u64 {
            l.on_ack(at(minute * 60_000), 0, 50_000);
        }
        assert_eq!(l.queueing_delay(), Duration::ZERO);
    }
}
