//! The viewer's sans-IO core: subscribe to a channel at a relay, verify, reorder, play out.
//!
//! [`Viewer`] takes datagrams and a time and gives back datagrams to send
//! ([`Viewer::poll_transmit`]) and pieces in order ([`Viewer::poll_piece`]). The handshake is
//! HELLO → COOKIE → SUBSCRIBE → SUBSCRIBED, then a KEEPALIVE every second; a COOKIE at any time
//! means "(re)subscribe with this", which is how a viewer rides out relay restarts and cookie
//! rotation. Every piece is verified against the channel key before it is buffered.

mod jitter;

pub use jitter::{Insert, JitterBuffer, Released};

use std::time::Duration;

use crate::crypto::{ChannelPublicKey, ContentKey};
use crate::time::Timestamp;
use crate::wire::{CookieBytes, Hello, Message, MessageType, PieceFlags, Subscription, WireError};

/// Tunables of a viewer.
#[derive(Debug, Clone)]
pub struct ViewerConfig {
    /// Interval between KEEPALIVEs once subscribed.
    pub keepalive_interval: Duration,
    /// Interval between HELLO or SUBSCRIBE retries before the relay answers.
    pub retry_interval: Duration,
    /// How long a gap in the sequence is waited for before it is skipped.
    pub jitter_window: Duration,
    /// Most pieces held for reordering.
    pub max_buffered: usize,
    /// A private channel's content key; without it encrypted pieces cannot be played.
    pub content_key: Option<ContentKey>,
}

impl Default for ViewerConfig {
    fn default() -> Self {
        ViewerConfig {
            keepalive_interval: Duration::from_secs(1),
            retry_interval: Duration::from_millis(250),
            jitter_window: Duration::from_millis(200),
            max_buffered: 4096,
            content_key: None,
        }
    }
}

/// Why a received datagram was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ViewerDrop {
    /// Not a valid v1 message.
    #[error("malformed datagram: {0}")]
    Malformed(#[from] WireError),
    /// A piece of another channel.
    #[error("piece of another channel")]
    WrongChannel,
    /// A piece whose signature does not verify under the channel key.
    #[error("bad signature")]
    BadSignature,
    /// A piece already buffered or released.
    #[error("duplicate piece")]
    Duplicate,
    /// A piece whose slot was already skipped.
    #[error("late piece")]
    Late,
    /// A message a viewer does not expect.
    #[error("unexpected message")]
    Unexpected,
    /// An encrypted piece of a private channel, and no content key.
    #[error("encrypted piece and no content key")]
    Encrypted,
    /// An encrypted piece the content key does not open.
    #[error("encrypted piece the content key cannot decrypt")]
    Undecryptable,
}

/// What a useful datagram was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A verified piece, now buffered.
    Piece {
        /// Its sequence number.
        seq: u64,
        /// Publisher's wall-clock µs, for measuring delay behind the source.
        publish_time_us: u64,
    },
    /// A control message that moved the handshake along.
    Control,
}

/// Counters of one viewer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewerStats {
    /// Verified pieces buffered.
    pub pieces_received: u64,
    /// Pieces released in order.
    pub pieces_played: u64,
    /// Payload bytes released.
    pub bytes_played: u64,
    /// Sequence numbers skipped after the jitter window.
    pub pieces_lost: u64,
    /// Duplicates ignored.
    pub duplicates: u64,
    /// Pieces that came after their slot was skipped.
    pub late: u64,
    /// Pieces refused for a bad signature.
    pub bad_signatures: u64,
    /// Other datagrams refused.
    pub other_drops: u64,
    /// Verified pieces of a private channel that could not be read (no key, or a wrong one).
    pub unreadable: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Asking for a cookie.
    Hello,
    /// Have a cookie, waiting for SUBSCRIBED.
    Subscribing,
    /// Subscribed; keeping consent fresh.
    Subscribed,
}

/// One viewer of one channel at one relay.
pub struct Viewer {
    key: ChannelPublicKey,
    config: ViewerConfig,
    nonce: u64,
    state: State,
    cookie: CookieBytes,
    next_send: Timestamp,
    live: bool,
    jitter: JitterBuffer,
    stats: ViewerStats,
    finished: bool,
    /// Decrypted payload of the piece being handled.
    plaintext: Vec<u8>,
}

impl Viewer {
    /// A viewer of the channel with public key `key`. It sends its first HELLO at once.
    pub fn new(key: ChannelPublicKey, config: ViewerConfig) -> Self {
        Viewer {
            key,
            jitter: JitterBuffer::new(config.jitter_window, config.max_buffered),
            config,
            nonce: rand::random(),
            state: State::Hello,
            cookie: CookieBytes::default(),
            next_send: Timestamp::ZERO,
            live: false,
            stats: ViewerStats::default(),
            finished: false,
            plaintext: vec![0; crate::wire::PieceHeader::MAX_PAYLOAD],
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> &ViewerStats {
        &self.stats
    }

    /// Whether the relay confirmed the subscription.
    pub fn is_subscribed(&self) -> bool {
        self.state == State::Subscribed
    }

    /// Whether the relay has seen the channel's publisher.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Whether the end-of-stream piece has been played: nothing more will come.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Handles one datagram from the relay.
    pub fn handle_datagram(
        &mut self,
        now: Timestamp,
        datagram: &[u8],
    ) -> Result<Received, ViewerDrop> {
        let result = self.handle_inner(now, datagram);
        self.count(&result);
        result
    }

    /// Takes a piece a swarm member has already verified against this channel's key: decrypts
    /// it if the channel is private and buffers it for playing, with no second signature check.
    pub fn accept_verified(
        &mut self,
        now: Timestamp,
        datagram: &[u8],
    ) -> Result<Received, ViewerDrop> {
        let result = match Message::parse(datagram)? {
            Message::Piece(piece) => self.buffer_piece(now, &piece, false),
            _ => Err(ViewerDrop::Unexpected),
        };
        self.count(&result);
        result
    }

    fn count(&mut self, result: &Result<Received, ViewerDrop>) {
        match result {
            Ok(Received::Piece { .. }) => self.stats.pieces_received += 1,
            Ok(Received::Control) => {}
            Err(ViewerDrop::BadSignature) => self.stats.bad_signatures += 1,
            Err(ViewerDrop::Duplicate) => self.stats.duplicates += 1,
            Err(ViewerDrop::Late) => self.stats.late += 1,
            Err(ViewerDrop::Encrypted | ViewerDrop::Undecryptable) => self.stats.unreadable += 1,
            Err(_) => self.stats.other_drops += 1,
        }
    }

    /// Verifies (if `verify`), decrypts and buffers one piece.
    fn buffer_piece(
        &mut self,
        now: Timestamp,
        piece: &crate::wire::Piece<'_>,
        verify: bool,
    ) -> Result<Received, ViewerDrop> {
        if piece.channel() != self.key.channel_id() {
            return Err(ViewerDrop::WrongChannel);
        }
        if verify {
            self.key
                .verify_piece(piece)
                .map_err(|_| ViewerDrop::BadSignature)?;
        }
        let (seq, publish_time_us) = (piece.seq(), piece.publish_time_us());
        self.live = true;
        let (flags, payload) = if piece.flags().contains(PieceFlags::ENCRYPTED) {
            let key = self
                .config
                .content_key
                .as_ref()
                .ok_or(ViewerDrop::Encrypted)?;
            let n = key
                .open(piece.channel(), seq, piece.payload(), &mut self.plaintext)
                .map_err(|_| ViewerDrop::Undecryptable)?;
            (
                piece.flags().without(PieceFlags::ENCRYPTED),
                &self.plaintext[..n],
            )
        } else {
            (piece.flags(), piece.payload())
        };
        match self
            .jitter
            .insert(now, seq, flags, publish_time_us, payload)
        {
            Insert::Accepted => Ok(Received::Piece {
                seq,
                publish_time_us,
            }),
            Insert::Duplicate => Err(ViewerDrop::Duplicate),
            Insert::Late => Err(ViewerDrop::Late),
        }
    }

    fn handle_inner(&mut self, now: Timestamp, datagram: &[u8]) -> Result<Received, ViewerDrop> {
        match Message::parse(datagram)? {
            Message::Piece(piece) => self.buffer_piece(now, &piece, true),
            Message::Cookie(c) => {
                self.cookie = c.cookie;
                self.state = State::Subscribing;
                self.next_send = now;
                Ok(Received::Control)
            }
            Message::Subscribed(s) if s.channel == self.key.channel_id() => {
                if self.state != State::Subscribed {
                    self.next_send = now + self.config.keepalive_interval;
                }
                self.state = State::Subscribed;
                self.live |= s.live;
                Ok(Received::Control)
            }
            _ => Err(ViewerDrop::Unexpected),
        }
    }

    /// A datagram to send to the relay now, if one is due; written into `buf`.
    pub fn poll_transmit(&mut self, now: Timestamp, buf: &mut [u8]) -> Option<usize> {
        if now < self.next_send || self.finished {
            return None;
        }
        let channel = self.key.channel_id();
        let subscription = Subscription {
            channel,
            cookie: self.cookie,
        };
        let (sent, wait) = match self.state {
            State::Hello => (
                Hello {
                    channel,
                    nonce: self.nonce,
                }
                .encode(buf),
                self.config.retry_interval,
            ),
            State::Subscribing => (
                subscription.encode(MessageType::Subscribe, buf),
                self.config.retry_interval,
            ),
            State::Subscribed => (
                subscription.encode(MessageType::Keepalive, buf),
                self.config.keepalive_interval,
            ),
        };
        self.next_send = now + wait;
        sent.ok()
    }

    /// An UNSUBSCRIBE to send when leaving, if subscribed.
    pub fn encode_unsubscribe(&self, buf: &mut [u8]) -> Option<usize> {
        if self.state == State::Hello {
            return None;
        }
        Subscription {
            channel: self.key.channel_id(),
            cookie: self.cookie,
        }
        .encode(MessageType::Unsubscribe, buf)
        .ok()
    }

    /// Plays from `seq` on (a swarm member that was there when the stream began starts at its
    /// first piece, whichever piece reached it first).
    pub fn expect_from(&mut self, seq: u64) {
        self.jitter.expect_from(seq);
    }

    /// The next piece in order, if one can be played now.
    pub fn poll_piece(&mut self, now: Timestamp) -> Option<Released> {
        if self.finished {
            return None;
        }
        let released = self.jitter.pop(now)?;
        self.stats.pieces_played += 1;
        self.stats.bytes_played += released.payload.len() as u64;
        self.stats.pieces_lost += released.skipped;
        if released.flags.contains(PieceFlags::END_OF_STREAM) {
            self.finished = true;
        }
        Some(released)
    }

    /// When the viewer next has something to do without new input.
    pub fn poll_timeout(&self) -> Timestamp {
        match self.jitter.deadline() {
            Some(d) => d.min(self.next_send),
            None => self.next_send,
        }
    }
}

#[cfg(test)]
mod tests;
