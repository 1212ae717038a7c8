//! Drives the relay core with a real publisher core and hand-made control messages, no sockets.

use super::*;
use crate::crypto::{verify_batch, ChannelKey};
use crate::publisher::Publisher;
use crate::wire::{
    CookieBytes, Hello, MessageType, PieceFlags, Subscribed, Subscription, MAX_DATAGRAM,
};
use std::sync::Arc;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn secs(s: u64) -> Timestamp {
    Timestamp::from_micros(s * 1_000_000 + 1)
}

struct Harness {
    relay: RelayCore,
    publisher: Publisher,
    reply: Vec<u8>,
}

impl Harness {
    fn new() -> Self {
        let mut h = Harness {
            relay: RelayCore::with_cookie_key(RelayConfig::default(), [7; 32]),
            publisher: Publisher::new(ChannelKey::from_seed(&[1; 32]), 100, 1),
            reply: vec![0; MAX_DATAGRAM],
        };
        h.announce(secs(0));
        h
    }

    fn channel(&self) -> ChannelId {
        self.publisher.public_key().channel_id()
    }

    fn send(&mut self, now: Timestamp, from: SocketAddr, d: &[u8]) -> Inbound {
        self.relay.handle(now, from, d, &mut self.reply)
    }

    fn announce(&mut self, now: Timestamp) {
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = self.publisher.poll_announce(now, &mut buf).unwrap();
        let Inbound::Reply(r) = self.send(now, addr(1), &buf[..n]) else {
            panic!("announce not acknowledged")
        };
        assert!(self.publisher.handle_datagram(&self.reply[..r]));
    }

    /// HELLO → COOKIE → SUBSCRIBE → SUBSCRIBED for `from`.
    fn subscribe(&mut self, now: Timestamp, from: SocketAddr) -> CookieBytes {
        let mut buf = [0u8; 64];
        let n = Hello {
            channel: self.channel(),
            nonce: 9,
        }
        .encode(&mut buf)
        .unwrap();
        let Inbound::Reply(r) = self.send(now, from, &buf[..n]) else {
            panic!("no cookie")
        };
        assert!(r <= n, "cookie reply larger than hello");
        let Ok(Message::Cookie(c)) = Message::parse(&self.reply[..r]) else {
            panic!()
        };
        assert_eq!(c.nonce, 9);
        let s = Subscription {
            channel: self.channel(),
            cookie: c.cookie,
        };
        let n = s.encode(MessageType::Subscribe, &mut buf).unwrap();
        let Inbound::Reply(r) = self.send(now, from, &buf[..n]) else {
            panic!("no ack")
        };
        assert_eq!(
            Message::parse(&self.reply[..r]),
            Ok(Message::Subscribed(Subscribed {
                channel: self.channel(),
                live: true
            }))
        );
        c.cookie
    }

    fn piece(&mut self, flags: PieceFlags) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = self
            .publisher
            .encode_piece(&[0x47; 188], flags, 5, &mut buf)
            .unwrap();
        buf.truncate(n);
        buf
    }

    /// Runs a piece through both steps, verifying for real.
    fn forward(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        d: &[u8],
    ) -> Result<Vec<SocketAddr>, DropReason> {
        match self.send(now, from, d) {
            Inbound::Verify(p) => {
                let ok = p.key.verify_piece(&Piece::parse(d).unwrap()).is_ok();
                self.relay.admit(&p, ok)?;
                let subs = self.relay.subscribers(&p.channel).to_vec();
                self.relay.record_sends(subs.len(), d.len());
                Ok(subs)
            }
            Inbound::Dropped(r) => Err(r),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn verified_pieces_fan_out_to_every_subscriber() {
    let mut h = Harness::new();
    for p in 10..13 {
        h.subscribe(secs(1), addr(p));
    }
    let piece = h.piece(PieceFlags::KEYFRAME);
    let mut subs = h.forward(secs(1), addr(1), &piece).unwrap();
    subs.sort();
    assert_eq!(subs, vec![addr(10), addr(11), addr(12)]);
    let s = h.relay.stats();
    assert_eq!((s.pieces_accepted, s.piece_sends), (1, 3));
    assert_eq!(s.bytes_forwarded, 3 * piece.len() as u64);
}

#[test]
fn forged_replayed_unknown_and_garbage_are_dropped_by_reason() {
    let mut h = Harness::new();
    h.subscribe(secs(1), addr(10));
    let good = h.piece(PieceFlags::empty());
    h.forward(secs(1), addr(1), &good).unwrap();

    // From an address that never announced the channel, nothing is even looked at.
    assert_eq!(
        h.forward(secs(1), addr(66), &good),
        Err(DropReason::UnknownUpstream)
    );
    // Replay of a forwarded piece (from the publisher's address, as a spoofer would).
    assert_eq!(
        h.forward(secs(1), addr(1), &good),
        Err(DropReason::Replayed)
    );
    // A forged piece: right channel, signed by someone else.
    let mut forger = Publisher::new(ChannelKey::from_seed(&[6; 32]), 1, 1);
    let mut forged = vec![0u8; MAX_DATAGRAM];
    let n = forger
        .encode_piece(&[1; 188], PieceFlags::empty(), 5, &mut forged)
        .unwrap();
    forged.truncate(n);
    forged[4..12].copy_from_slice(&h.channel().0);
    forged[12..20].copy_from_slice(&101u64.to_be_bytes());
    assert_eq!(
        h.forward(secs(1), addr(1), &forged),
        Err(DropReason::BadSignature)
    );
    // A piece for a channel nobody announced.
    let mut stranger = vec![0u8; MAX_DATAGRAM];
    let n = forger
        .encode_piece(&[1; 188], PieceFlags::empty(), 5, &mut stranger)
        .unwrap();
    assert_eq!(
        h.forward(secs(1), addr(66), &stranger[..n]),
        Err(DropReason::UnknownChannel)
    );
    // Truncated and garbage.
    assert_eq!(
        h.forward(secs(1), addr(66), &good[..50]),
        Err(DropReason::Malformed)
    );
    assert_eq!(
        h.forward(secs(1), addr(66), b"\xde\xad\xbe\xef"),
        Err(DropReason::Malformed)
    );

    // The stream goes on: the next real piece (seq 101, the one the forger imitated) is forwarded.
    let next = h.piece(PieceFlags::empty());
    assert_eq!(h.forward(secs(1), addr(1), &next).unwrap(), vec![addr(10)]);

    let s = h.relay.stats();
    for (reason, n) in [
        (DropReason::UnknownUpstream, 1),
        (DropReason::Replayed, 1),
        (DropReason::BadSignature, 1),
        (DropReason::UnknownChannel, 1),
        (DropReason::Malformed, 2),
    ] {
        assert_eq!(s.dropped(reason), n, "{reason:?}");
    }
    assert_eq!(s.pieces_accepted, 2);
}

#[test]
fn duplicate_inside_one_verification_batch_is_sent_once() {
    let mut h = Harness::new();
    h.subscribe(secs(1), addr(10));
    let piece = h.piece(PieceFlags::empty());
    let (Inbound::Verify(a), Inbound::Verify(b)) = (
        h.send(secs(1), addr(1), &piece),
        h.send(secs(1), addr(1), &piece),
    ) else {
        panic!("both copies pass the cheap filters before either is admitted")
    };
    let p = Piece::parse(&piece).unwrap();
    verify_batch(&[(p, a.key), (p, b.key)]).unwrap();
    assert!(h.relay.admit(&a, true).is_ok());
    assert_eq!(h.relay.admit(&b, true), Err(DropReason::Replayed));
}

#[test]
fn subscribe_without_valid_cookie_gets_only_a_small_cookie() {
    let mut h = Harness::new();
    let mut buf = [0u8; 64];
    let s = Subscription {
        channel: h.channel(),
        cookie: CookieBytes([3; 20]),
    };
    let n = s.encode(MessageType::Subscribe, &mut buf).unwrap();
    let Inbound::Reply(r) = h.send(secs(1), addr(20), &buf[..n]) else {
        panic!()
    };
    assert!(r <= n);
    assert!(matches!(
        Message::parse(&h.reply[..r]),
        Ok(Message::Cookie(_))
    ));
    assert!(h.relay.subscribers(&h.channel()).is_empty());
    assert_eq!(h.relay.stats().dropped(DropReason::InvalidCookie), 1);

    // A cookie issued to another address does not work either.
    let other_cookie = h.relay.cookies.issue(secs(1), addr(21));
    let s = Subscription {
        channel: h.channel(),
        cookie: other_cookie,
    };
    let n = s.encode(MessageType::Subscribe, &mut buf).unwrap();
    assert!(matches!(
        h.send(secs(1), addr(20), &buf[..n]),
        Inbound::Reply(_)
    ));
    assert!(h.relay.subscribers(&h.channel()).is_empty());
}

#[test]
fn subscribers_without_keepalive_expire_and_keepalive_keeps_them() {
    let mut h = Harness::new();
    let kept = h.subscribe(secs(1), addr(10));
    h.subscribe(secs(1), addr(11));
    let timeout = RelayConfig::default().subscriber_timeout.as_secs();
    let mut buf = [0u8; 64];
    for t in 2..=timeout + 2 {
        let s = Subscription {
            channel: h.channel(),
            cookie: kept,
        };
        let n = s.encode(MessageType::Keepalive, &mut buf).unwrap();
        assert_eq!(h.send(secs(t), addr(10), &buf[..n]), Inbound::Done);
        h.announce(secs(t));
        h.relay.handle_timeout(secs(t));
    }
    assert_eq!(h.relay.subscribers(&h.channel()), &[addr(10)]);
    assert_eq!(h.relay.stats().subscribers_expired, 1);
    assert_eq!(h.relay.stats().subscribers, 1);

    // An expired subscriber's keepalive is told to resubscribe (a cookie, no stream).
    let s = Subscription {
        channel: h.channel(),
        cookie: h.relay.cookies.issue(secs(9), addr(11)),
    };
    let n = s.encode(MessageType::Keepalive, &mut buf).unwrap();
    let Inbound::Reply(r) = h.send(secs(9), addr(11), &buf[..n]) else {
        panic!()
    };
    assert!(matches!(
        Message::parse(&h.reply[..r]),
        Ok(Message::Cookie(_))
    ));

    // Unsubscribe removes at once.
    let s = Subscription {
        channel: h.channel(),
        cookie: h.relay.cookies.issue(secs(9), addr(10)),
    };
    let n = s.encode(MessageType::Unsubscribe, &mut buf).unwrap();
    assert_eq!(h.send(secs(9), addr(10), &buf[..n]), Inbound::Done);
    assert!(h.relay.subscribers(&h.channel()).is_empty());
}

#[test]
fn restarted_publisher_is_served_and_old_session_replays_are_refused() {
    let mut h = Harness::new();
    h.subscribe(secs(1), addr(10));
    let old_pieces: Vec<Vec<u8>> = (0..3).map(|_| h.piece(PieceFlags::empty())).collect();
    for p in &old_pieces {
        h.forward(secs(1), addr(1), p).unwrap();
    }
    let old_announce = {
        let mut old = Publisher::new(ChannelKey::from_seed(&[1; 32]), 50, 1);
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = old.poll_announce(secs(2), &mut buf).unwrap();
        buf[..n].to_vec()
    };
    assert_eq!(
        h.send(secs(2), addr(1), &old_announce),
        Inbound::Dropped(DropReason::BadAnnounce)
    );

    // The publisher restarts 10 000 µs later; its sequence numbers start at the new epoch.
    h.publisher = Publisher::new(ChannelKey::from_seed(&[1; 32]), 10_100, 1);
    h.announce(secs(2));
    let p = h.piece(PieceFlags::empty());
    assert_eq!(h.forward(secs(2), addr(1), &p).unwrap(), vec![addr(10)]);
    // A captured piece of the old session, replayed now, is refused: it is 10 000 sequence
    // numbers behind, past the replay window.
    assert_eq!(
        h.forward(secs(2), addr(1), &old_pieces[2]),
        Err(DropReason::Stale)
    );
    let after = h.piece(PieceFlags::empty());
    assert_eq!(h.forward(secs(2), addr(1), &after).unwrap(), vec![addr(10)]);
}

#[test]
fn tables_are_bounded() {
    let config = RelayConfig {
        max_channels: 2,
        max_subscribers_per_channel: 1,
        ..Default::default()
    };
    let mut relay = RelayCore::with_cookie_key(config, [1; 32]);
    let mut reply = [0u8; MAX_DATAGRAM];
    let mut buf = [0u8; 64];
    let mut verdicts = Vec::new();
    for ch in 0..3u8 {
        for port in [30, 31] {
            let cookie = relay.cookies.issue(secs(0), addr(port));
            let s = Subscription {
                channel: ChannelId([ch; 8]),
                cookie,
            };
            let n = s.encode(MessageType::Subscribe, &mut buf).unwrap();
            verdicts.push(relay.handle(secs(0), addr(port), &buf[..n], &mut reply));
        }
    }
    assert!(matches!(verdicts[0], Inbound::Reply(_)));
    assert_eq!(verdicts[1], Inbound::Dropped(DropReason::SubscribersFull));
    // Channels nobody announced may take a quarter of the table (here 1 of 2).
    assert_eq!(verdicts[2], Inbound::Dropped(DropReason::ChannelsFull));
    assert_eq!(verdicts[4], Inbound::Dropped(DropReason::ChannelsFull));
    assert_eq!(relay.stats().subscribers, 1);
}

#[test]
fn made_up_channels_cannot_crowd_out_announced_ones() {
    let config = RelayConfig {
        max_channels: 8,
        ..Default::default()
    };
    let mut relay = RelayCore::with_cookie_key(config, [1; 32]);
    let mut reply = [0u8; MAX_DATAGRAM];
    let mut buf = [0u8; MAX_DATAGRAM];
    // One validated address subscribes to 100 channels no publisher has announced.
    for ch in 0..100u8 {
        let cookie = relay.cookies.issue(secs(0), addr(30));
        let n = Subscription {
            channel: ChannelId([ch; 8]),
            cookie,
        }
        .encode(MessageType::Subscribe, &mut buf)
        .unwrap();
        relay.handle(secs(0), addr(30), &buf[..n], &mut reply);
    }
    assert_eq!(relay.channels.len(), 2, "a quarter of 8");
    assert_eq!(relay.stats().dropped(DropReason::ChannelsFull), 98);
    // Real publishers still get the other six places.
    for seed in 1..=6u8 {
        let mut p = Publisher::new(ChannelKey::from_seed(&[seed; 32]), 1, 1);
        let n = p.poll_announce(secs(0), &mut buf).unwrap();
        assert!(
            matches!(
                relay.handle(secs(0), addr(40), &buf[..n], &mut reply),
                Inbound::Reply(_)
            ),
            "publisher {seed} refused"
        );
    }
}

#[test]
fn control_messages_are_rate_limited_per_source() {
    let config = RelayConfig {
        control_rate_per_source: 100,
        ..Default::default()
    };
    let mut relay = RelayCore::with_cookie_key(config, [1; 32]);
    let mut reply = [0u8; MAX_DATAGRAM];
    let mut buf = [0u8; 64];
    let n = Hello {
        channel: ChannelId([1; 8]),
        nonce: 1,
    }
    .encode(&mut buf)
    .unwrap();
    let mut replies = 0;
    for _ in 0..1000 {
        if let Inbound::Reply(_) = relay.handle(secs(0), addr(50), &buf[..n], &mut reply) {
            replies += 1;
        }
    }
    assert_eq!(replies, 200, "a burst of twice the rate");
    assert_eq!(relay.stats().dropped(DropReason::RateLimited), 800);
    // Another source is not affected; the flooder gets 100 more a second later.
    assert!(matches!(
        relay.handle(
            secs(0),
            SocketAddr::from(([10, 9, 9, 9], 1)),
            &buf[..n],
            &mut reply
        ),
        Inbound::Reply(_)
    ));
    let later = (0..1000)
        .filter(|_| {
            matches!(
                relay.handle(secs(1), addr(50), &buf[..n], &mut reply),
                Inbound::Reply(_)
            )
        })
        .count();
    assert_eq!(later, 100);
}

#[test]
fn a_forged_flood_from_the_publishers_address_is_held_to_the_verify_budget() {
    let mut h = Harness::new();
    h.relay.reconfigure(RelayConfig {
        verify_rate_per_source: 50,
        ..RelayConfig::default()
    });
    let mut forger = Publisher::new(ChannelKey::from_seed(&[6; 32]), 1, 1);
    let mut forged = vec![0u8; MAX_DATAGRAM];
    let mut verifies = 0;
    for seq in 0..500u64 {
        let n = forger
            .encode_piece(&[1; 188], PieceFlags::empty(), 5, &mut forged)
            .unwrap();
        forged[4..12].copy_from_slice(&h.channel().0);
        forged[12..20].copy_from_slice(&(200 + seq).to_be_bytes());
        if let Inbound::Verify(_) = h.send(secs(1), addr(1), &forged[..n]) {
            verifies += 1;
        }
    }
    assert_eq!(verifies, 50, "one second's budget");
    assert_eq!(h.relay.stats().dropped(DropReason::VerifyBudget), 450);
}

#[test]
fn a_subscriber_whose_copies_keep_failing_is_cut() {
    let config = RelayConfig {
        max_send_failures: 3,
        ..Default::default()
    };
    let mut h = Harness::new();
    h.relay = RelayCore::with_cookie_key(config, [7; 32]);
    h.publisher = Publisher::new(ChannelKey::from_seed(&[1; 32]), 100, 1);
    h.announce(secs(0));
    h.subscribe(secs(1), addr(10));
    h.subscribe(secs(1), addr(11));
    let ch = h.channel();
    assert!(!h.relay.record_send_failure(&ch, addr(10)));
    assert!(!h.relay.record_send_failure(&ch, addr(10)));
    assert!(h.relay.record_send_failure(&ch, addr(10)));
    assert_eq!(h.relay.subscribers(&ch), &[addr(11)]);
    let s = h.relay.stats();
    let got = (
        s.subscribers_cut,
        s.subscribers,
        s.dropped(DropReason::SendFailed),
    );
    assert_eq!(got, (1, 1, 3));
}

#[test]
fn unexpected_messages_are_counted() {
    let mut h = Harness::new();
    let mut buf = [0u8; 64];
    let n = Subscribed {
        channel: h.channel(),
        live: true,
    }
    .encode(&mut buf)
    .unwrap();
    assert_eq!(
        h.send(secs(1), addr(5), &buf[..n]),
        Inbound::Dropped(DropReason::UnexpectedMessage)
    );
}

#[test]
fn reconfigure_keeps_subscribers_applies_new_limits_and_drops_disallowed_channels() {
    let mut h = Harness::new();
    for port in 40..44 {
        h.subscribe(secs(1), addr(port));
    }
    let ours = h.channel();
    let other = ChannelId([9; 8]);
    h.relay.reconfigure(RelayConfig {
        max_subscribers_per_channel: 2,
        ..RelayConfig::default()
    });
    // Lowered below the current count: the four stay and still get pieces, a fifth is refused.
    assert_eq!(h.relay.subscribers(&ours).len(), 4);
    let piece = h.piece(PieceFlags::default());
    assert_eq!(h.forward(secs(1), addr(1), &piece).unwrap().len(), 4);
    let cookie = h.relay.cookies.issue(secs(1), addr(50));
    let mut buf = [0u8; 64];
    let s = Subscription {
        channel: ours,
        cookie,
    };
    let n = s.encode(MessageType::Subscribe, &mut buf).unwrap();
    assert_eq!(
        h.send(secs(1), addr(50), &buf[..n]),
        Inbound::Dropped(DropReason::SubscribersFull)
    );

    // An allow-list without our channel drops it and refuses it from then on.
    h.relay.reconfigure(RelayConfig {
        allowed_channels: Some(vec![other]),
        ..RelayConfig::default()
    });
    assert!(h.relay.subscribers(&ours).is_empty());
    assert_eq!(h.relay.stats().subscribers, 0);
    let cookie = h.relay.cookies.issue(secs(1), addr(41));
    let s = Subscription {
        channel: ours,
        cookie,
    };
    let n = s.encode(MessageType::Subscribe, &mut buf).unwrap();
    assert_eq!(
        h.send(secs(1), addr(41), &buf[..n]),
        Inbound::Dropped(DropReason::ChannelNotAllowed)
    );
    let mut announce = [0u8; MAX_DATAGRAM];
    let due = h.publisher.poll_timeout();
    let n = h.publisher.poll_announce(due, &mut announce).unwrap();
    assert_eq!(
        h.send(due, addr(1), &announce[..n]),
        Inbound::Dropped(DropReason::ChannelNotAllowed)
    );
    assert_eq!(h.relay.stats().dropped(DropReason::ChannelNotAllowed), 2);
}

#[test]
fn replayed_announces_from_spoofed_addresses_do_not_evict_an_active_publisher() {
    let mut h = Harness::new();
    h.subscribe(secs(1), addr(10));
    let mut announce = [0u8; MAX_DATAGRAM];
    let due = h.publisher.poll_timeout();
    let n = h.publisher.poll_announce(due, &mut announce).unwrap();
    let captured = announce[..n].to_vec();
    for round in 0..3u64 {
        // The publisher keeps streaming from its address...
        let p = h.piece(PieceFlags::empty());
        assert_eq!(
            h.forward(secs(2 + round), addr(1), &p).unwrap(),
            vec![addr(10)]
        );
        // ...while its captured announce is replayed from five other addresses.
        for spoofed in 100..105 {
            let _ = h.send(secs(2 + round), addr(spoofed), &captured);
        }
    }
    let p = h.piece(PieceFlags::empty());
    assert_eq!(h.forward(secs(6), addr(1), &p).unwrap(), vec![addr(10)]);
}

#[test]
fn a_core_that_does_not_own_a_channel_still_knows_it_is_real() {
    // Two workers' cores: `owner` sees the channel's ANNOUNCE, `other` only SUBSCRIBEs.
    let config = RelayConfig {
        max_channels: 8,
        ..Default::default()
    };
    let shared = Arc::new(AnnouncedChannels::default());
    let mut owner = RelayCore::with_shared(config.clone(), [1; 32], Arc::clone(&shared));
    let mut other = RelayCore::with_shared(config, [1; 32], shared);
    let mut reply = [0u8; MAX_DATAGRAM];
    let mut buf = [0u8; MAX_DATAGRAM];
    let subscribe =
        |core: &mut RelayCore, channel: ChannelId, port: u16, buf: &mut [u8], reply: &mut [u8]| {
            let cookie = core.cookies.issue(secs(0), addr(port));
            let n = Subscription { channel, cookie }
                .encode(MessageType::Subscribe, buf)
                .unwrap();
            core.handle(secs(0), addr(port), &buf[..n], reply)
        };
    // Made-up channels fill `other`'s quota for unannounced ones (a quarter of 8).
    for ch in 0..10u8 {
        subscribe(&mut other, ChannelId([ch; 8]), 30, &mut buf, &mut reply);
    }
    // A real channel, announced at its owner, is still taken on `other`.
    let mut p = Publisher::new(ChannelKey::from_seed(&[50; 32]), 1, 1);
    let n = p.poll_announce(secs(0), &mut buf).unwrap();
    assert!(matches!(
        owner.handle(secs(0), addr(40), &buf[..n], &mut reply),
        Inbound::Reply(_)
    ));
    let real = p.public_key().channel_id();
    assert!(matches!(
        subscribe(&mut other, real, 31, &mut buf, &mut reply),
        Inbound::Reply(_)
    ));
    assert_eq!(other.subscribers(&real), &[addr(31)]);
}
