//! A viewer, a relay core and a publisher core wired together in memory, with virtual time.

use super::*;
use crate::crypto::ChannelKey;
use crate::publisher::Publisher;
use crate::relay::{Inbound, RelayConfig, RelayCore};
use crate::wire::{Piece, MAX_DATAGRAM};
use std::net::SocketAddr;

const VIEWER: &str = "127.0.0.1:4000";
const PUBLISHER: &str = "127.0.0.1:5000";

fn ms(m: u64) -> Timestamp {
    Timestamp::from_micros(m * 1000 + 1)
}

struct World {
    relay: RelayCore,
    publisher: Publisher,
    viewer: Viewer,
    buf: Vec<u8>,
    reply: Vec<u8>,
}

impl World {
    fn new() -> Self {
        let key = ChannelKey::from_seed(&[4; 32]);
        let public = key.public();
        World {
            relay: RelayCore::with_cookie_key(RelayConfig::default(), [2; 32]),
            publisher: Publisher::new(key, 1, 1),
            viewer: Viewer::new(public, ViewerConfig::default()),
            buf: vec![0; MAX_DATAGRAM],
            reply: vec![0; MAX_DATAGRAM],
        }
    }

    /// Runs viewer ↔ relay control traffic until quiet.
    fn pump_control(&mut self, now: Timestamp) {
        let from: SocketAddr = VIEWER.parse().unwrap();
        while let Some(n) = self.viewer.poll_transmit(now, &mut self.buf) {
            if let Inbound::Reply(r) = self
                .relay
                .handle(now, from, &self.buf[..n], &mut self.reply)
            {
                self.viewer.handle_datagram(now, &self.reply[..r]).unwrap();
            }
        }
    }

    fn announce(&mut self, now: Timestamp) {
        let from: SocketAddr = PUBLISHER.parse().unwrap();
        if let Some(n) = self.publisher.poll_announce(now, &mut self.buf) {
            if let Inbound::Reply(r) = self
                .relay
                .handle(now, from, &self.buf[..n], &mut self.reply)
            {
                self.publisher.handle_datagram(&self.reply[..r]);
            }
        }
    }

    /// Publishes one piece through the relay; returns the bytes the viewer would receive.
    fn publish(&mut self, now: Timestamp, payload: &[u8], flags: PieceFlags) -> Option<Vec<u8>> {
        let from: SocketAddr = PUBLISHER.parse().unwrap();
        let n = self
            .publisher
            .encode_piece(payload, flags, 0, &mut self.buf)
            .unwrap();
        let Inbound::Verify(p) = self
            .relay
            .handle(now, from, &self.buf[..n], &mut self.reply)
        else {
            return None;
        };
        let ok = p
            .key
            .verify_piece(&Piece::parse(&self.buf[..n]).unwrap())
            .is_ok();
        self.relay.admit(&p, ok).ok()?;
        let subs = self.relay.subscribers(&p.channel);
        subs.contains(&VIEWER.parse().unwrap())
            .then(|| self.buf[..n].to_vec())
    }
}

#[test]
fn handshake_subscribes_and_keepalives_follow() {
    let mut w = World::new();
    w.pump_control(ms(0));
    assert!(w.viewer.is_subscribed());
    assert!(!w.viewer.is_live(), "no publisher yet");
    assert_eq!(w.viewer.poll_timeout(), ms(1000));
    w.announce(ms(10));
    w.pump_control(ms(1000));
    assert!(w.viewer.poll_transmit(ms(1001), &mut [0u8; 64]).is_none());
}

#[test]
fn stream_plays_in_order_despite_reordering_and_ends_at_end_of_stream() {
    let mut w = World::new();
    w.announce(ms(0));
    w.pump_control(ms(0));
    let mut delivered: Vec<Vec<u8>> = (0..10u8)
        .map(|i| {
            let flags = if i == 9 {
                PieceFlags::END_OF_STREAM
            } else {
                PieceFlags::empty()
            };
            w.publish(ms(1), &[i; 100], flags).expect("forwarded")
        })
        .collect();
    delivered.swap(2, 5);
    delivered.swap(7, 8);
    let dup = delivered[3].clone();
    delivered.push(dup);

    let mut played = Vec::new();
    for d in &delivered {
        let _ = w.viewer.handle_datagram(ms(2), d);
        while let Some(r) = w.viewer.poll_piece(ms(2)) {
            played.push(r.payload[0]);
        }
    }
    // Joining: the first piece waits one jitter window for earlier ones still in flight.
    assert!(played.is_empty());
    let after_window = ms(2) + ViewerConfig::default().jitter_window;
    while let Some(r) = w.viewer.poll_piece(after_window) {
        played.push(r.payload[0]);
    }
    assert_eq!(played, (0..10).collect::<Vec<u8>>());
    assert!(w.viewer.is_finished());
    let s = w.viewer.stats();
    assert_eq!(
        (s.pieces_played, s.duplicates, s.late, s.pieces_lost),
        (10, 1, 0, 0)
    );
}

#[test]
fn lost_piece_is_skipped_after_the_jitter_window() {
    let mut w = World::new();
    w.announce(ms(0));
    w.pump_control(ms(0));
    let pieces: Vec<_> = (0..3u8)
        .map(|i| w.publish(ms(1), &[i], PieceFlags::empty()).unwrap())
        .collect();
    w.viewer.handle_datagram(ms(10), &pieces[0]).unwrap();
    w.viewer.handle_datagram(ms(10), &pieces[2]).unwrap();
    assert!(
        w.viewer.poll_piece(ms(10)).is_none(),
        "joining waits one window"
    );
    let deadline = w.viewer.poll_timeout();
    assert_eq!(deadline, ms(10) + ViewerConfig::default().jitter_window);
    let first = w.viewer.poll_piece(deadline).unwrap();
    let r = w.viewer.poll_piece(deadline).unwrap();
    assert_eq!((r.seq - first.seq, r.skipped), (2, 1));
    assert_eq!(w.viewer.stats().pieces_lost, 1);
    assert_eq!(
        w.viewer.handle_datagram(ms(300), &pieces[1]),
        Err(ViewerDrop::Late)
    );
}

#[test]
fn forged_and_foreign_pieces_are_refused() {
    let mut w = World::new();
    w.announce(ms(0));
    w.pump_control(ms(0));
    let mut piece = w.publish(ms(1), b"real", PieceFlags::empty()).unwrap();
    let last = piece.len() - 1;
    piece[last] ^= 1;
    assert_eq!(
        w.viewer.handle_datagram(ms(1), &piece),
        Err(ViewerDrop::BadSignature)
    );
    let mut other = Publisher::new(ChannelKey::from_seed(&[9; 32]), 1, 1);
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = other
        .encode_piece(b"x", PieceFlags::empty(), 0, &mut buf)
        .unwrap();
    assert_eq!(
        w.viewer.handle_datagram(ms(1), &buf[..n]),
        Err(ViewerDrop::WrongChannel)
    );
    assert!(matches!(
        w.viewer.handle_datagram(ms(1), b"junk"),
        Err(ViewerDrop::Malformed(_))
    ));
    assert_eq!(w.viewer.stats().bad_signatures, 1);
    assert!(w.viewer.poll_piece(ms(1000)).is_none());
}

#[test]
fn viewer_resubscribes_after_relay_restart() {
    let mut w = World::new();
    w.announce(ms(0));
    w.pump_control(ms(0));
    // The relay restarts: new cookie key, no subscribers.
    w.relay = RelayCore::with_cookie_key(RelayConfig::default(), [3; 32]);
    w.announce(ms(1200));
    w.pump_control(ms(1000)); // KEEPALIVE with the old cookie → COOKIE → SUBSCRIBE → SUBSCRIBED
    assert_eq!(
        w.relay
            .subscribers(&w.publisher.public_key().channel_id())
            .len(),
        1
    );
    assert!(w.publish(ms(1300), b"after", PieceFlags::empty()).is_some());
}

#[test]
fn a_private_channel_plays_only_with_its_content_key() {
    let content = ContentKey::from_bytes([8; 32]);
    let mut w = World::new();
    w.publisher =
        Publisher::new(ChannelKey::from_seed(&[4; 32]), 1, 1).with_content_key(content.clone());
    let public = w.publisher.public_key();
    w.pump_control(ms(0));
    w.announce(ms(1));
    let payload = [0x47u8; 940];
    let piece = w
        .publish(ms(2), &payload, PieceFlags::empty())
        .expect("the relay verified and forwarded the ciphertext");
    // What travels is ciphertext, flagged, and signed as such.
    let parsed = Piece::parse(&piece).unwrap();
    assert!(parsed.flags().contains(PieceFlags::ENCRYPTED));
    assert_ne!(&parsed.payload()[..940], &payload[..]);
    assert_eq!(parsed.payload().len(), 940 + crate::crypto::CONTENT_TAG_LEN);

    // The viewer without the key verifies the piece but cannot play it.
    assert_eq!(
        w.viewer.handle_datagram(ms(3), &piece),
        Err(ViewerDrop::Encrypted)
    );
    assert_eq!(w.viewer.stats().unreadable, 1);
    // A viewer with a wrong key neither.
    let mut wrong = Viewer::new(
        public,
        ViewerConfig {
            content_key: Some(ContentKey::from_bytes([9; 32])),
            ..ViewerConfig::default()
        },
    );
    assert_eq!(
        wrong.handle_datagram(ms(3), &piece),
        Err(ViewerDrop::Undecryptable)
    );
    // With the key: the plaintext plays, without the encryption flag.
    let mut right = Viewer::new(
        public,
        ViewerConfig {
            content_key: Some(content),
            ..ViewerConfig::default()
        },
    );
    assert!(matches!(
        right.handle_datagram(ms(3), &piece),
        Ok(Received::Piece { .. })
    ));
    let released = right.poll_piece(ms(1000)).expect("played");
    assert_eq!(released.payload, payload.to_vec());
}
