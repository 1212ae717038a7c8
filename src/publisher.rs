//! The publisher's sans-IO core: announces the channel and turns payloads into signed pieces.
//!
//! It numbers pieces, assigns clubs (`seq % clubs`), signs, and tracks whether the relay has
//! acknowledged the announce. Reading input, pacing and sockets belong to
//! [`crate::client::publish`].

use std::time::Duration;

use crate::crypto::{ChannelKey, ChannelPublicKey, ContentKey, CONTENT_TAG_LEN};
use crate::time::Timestamp;
use crate::wire::{Announce, Message, PieceFlags, PieceHeader, WireError};

/// A publishing session of one channel.
pub struct Publisher {
    key: ChannelKey,
    public: ChannelPublicKey,
    epoch_us: u64,
    clubs: u8,
    next_seq: u64,
    announced: bool,
    next_announce: Timestamp,
    /// Private channels: payloads are sealed with this key before signing.
    content_key: Option<ContentKey>,
    sealed: Vec<u8>,
}

impl Publisher {
    /// How often the announce is repeated (it doubles as the channel's liveness to the relay).
    pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);
    /// How often it is retried before the relay first acknowledges it.
    pub const ANNOUNCE_RETRY: Duration = Duration::from_millis(200);

    /// A session for `key` whose epoch is a wall-clock µs value that increases across restarts;
    /// the first piece's sequence number is the epoch. `clubs` is at least 1.
    pub fn new(key: ChannelKey, epoch_us: u64, clubs: u8) -> Self {
        Publisher {
            public: key.public(),
            key,
            epoch_us,
            clubs: clubs.max(1),
            // Sequence numbers start at the epoch, so they keep rising across publisher
            // restarts: a relay's replay window then refuses every piece of an older session.
            next_seq: epoch_us,
            announced: false,
            next_announce: Timestamp::ZERO,
            content_key: None,
            sealed: vec![0; PieceHeader::MAX_PAYLOAD],
        }
    }

    /// Makes the channel private: every payload is encrypted with `key` (and flagged
    /// [`PieceFlags::ENCRYPTED`]) before it is signed. Payloads then carry at most
    /// [`PieceHeader::MAX_PAYLOAD`] − [`CONTENT_TAG_LEN`] bytes.
    pub fn with_content_key(mut self, key: ContentKey) -> Self {
        self.content_key = Some(key);
        self
    }

    /// The largest payload [`Publisher::encode_piece`] takes.
    pub fn max_payload(&self) -> usize {
        match self.content_key {
            Some(_) => PieceHeader::MAX_PAYLOAD - CONTENT_TAG_LEN,
            None => PieceHeader::MAX_PAYLOAD,
        }
    }

    /// The channel's public key.
    pub fn public_key(&self) -> ChannelPublicKey {
        self.public
    }

    /// The sequence number the next piece gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether a relay has acknowledged this session's announce.
    pub fn is_announced(&self) -> bool {
        self.announced
    }

    /// Writes the next piece carrying `payload` into `buf`; returns its length.
    pub fn encode_piece(
        &mut self,
        payload: &[u8],
        flags: PieceFlags,
        publish_time_us: u64,
        buf: &mut [u8],
    ) -> Result<usize, WireError> {
        let channel = self.public.channel_id();
        let (payload, flags) = match &self.content_key {
            None => (payload, flags),
            Some(key) => {
                let n = key
                    .seal(channel, self.next_seq, payload, &mut self.sealed)
                    .ok_or(WireError::PayloadTooLarge(payload.len()))?;
                (&self.sealed[..n], flags | PieceFlags::ENCRYPTED)
            }
        };
        let header = PieceHeader {
            flags,
            club: (self.next_seq % u64::from(self.clubs)) as u8,
            channel,
            seq: self.next_seq,
            publish_time_us,
        };
        let n = header.encode(payload, buf, |m| self.key.sign(m))?;
        self.next_seq += 1;
        Ok(n)
    }

    /// An ANNOUNCE to send now, if one is due; written into `buf`.
    pub fn poll_announce(&mut self, now: Timestamp, buf: &mut [u8]) -> Option<usize> {
        if now < self.next_announce {
            return None;
        }
        let wait = if self.announced {
            Self::ANNOUNCE_INTERVAL
        } else {
            Self::ANNOUNCE_RETRY
        };
        self.next_announce = now + wait;
        let key = self.public.to_bytes();
        Announce::encode_signed(self.epoch_us, &key, buf, |m| self.key.sign(m)).ok()
    }

    /// When the next announce is due.
    pub fn poll_timeout(&self) -> Timestamp {
        self.next_announce
    }

    /// Handles a datagram from the relay; returns true if it acknowledged this session.
    pub fn handle_datagram(&mut self, datagram: &[u8]) -> bool {
        match Message::parse(datagram) {
            Ok(Message::Announced(a))
                if a.channel == self.public.channel_id() && a.epoch_us == self.epoch_us =>
            {
                self.announced = true;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Announced, Piece, MAX_DATAGRAM};

    #[test]
    fn pieces_are_numbered_signed_and_clubbed() {
        let mut p = Publisher::new(ChannelKey::from_seed(&[1; 32]), 77, 4);
        let mut buf = [0u8; MAX_DATAGRAM];
        for seq in 77..86 {
            let n = p
                .encode_piece(b"ts", PieceFlags::empty(), 1000 + seq, &mut buf)
                .unwrap();
            let piece = Piece::parse(&buf[..n]).unwrap();
            assert_eq!(piece.seq(), seq);
            assert_eq!(piece.header().club, (seq % 4) as u8);
            assert_eq!(piece.publish_time_us(), 1000 + seq);
            p.public_key().verify_piece(&piece).unwrap();
        }
        assert_eq!(p.next_seq(), 86);
    }

    #[test]
    fn announce_retries_until_acknowledged_then_repeats_slowly() {
        let mut p = Publisher::new(ChannelKey::from_seed(&[2; 32]), 77, 1);
        let mut buf = [0u8; MAX_DATAGRAM];
        let t0 = Timestamp::from_micros(1);
        assert!(p.poll_announce(t0, &mut buf).is_some());
        assert!(p.poll_announce(t0, &mut buf).is_none());
        assert_eq!(p.poll_timeout(), t0 + Publisher::ANNOUNCE_RETRY);

        let mut ack = [0u8; Announced::LEN];
        let wrong_epoch = Announced {
            channel: p.public_key().channel_id(),
            epoch_us: 1,
        };
        wrong_epoch.encode(&mut ack).unwrap();
        assert!(!p.handle_datagram(&ack));
        let right = Announced {
            channel: p.public_key().channel_id(),
            epoch_us: 77,
        };
        right.encode(&mut ack).unwrap();
        assert!(p.handle_datagram(&ack));
        assert!(p.is_announced());
        let t1 = t0 + Publisher::ANNOUNCE_RETRY;
        assert!(p.poll_announce(t1, &mut buf).is_some());
        assert_eq!(p.poll_timeout(), t1 + Publisher::ANNOUNCE_INTERVAL);
        assert!(!p.handle_datagram(b"garbage"));
    }
}
