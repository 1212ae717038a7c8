//! Entry points for the fuzz targets in `fuzz/` and for their regression tests (which run the
//! saved inputs on stable Rust in `cargo test`). Each takes arbitrary bytes, drives one parser
//! or state machine with them, and panics only if an invariant breaks.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::RelaySettings;
use crate::crypto::{ChannelKey, ChannelPublicKey};
use crate::fault::{FaultInjector, FaultSpec};
use crate::publisher::Publisher;
use crate::relay::{Inbound, RelayConfig, RelayCore};
use crate::time::Timestamp;
use crate::viewer::{Viewer, ViewerConfig};
use crate::wire::{Join, Message, MAX_DATAGRAM};

/// Splits fuzz input into datagrams: a length byte, then that many bytes, repeated.
fn datagrams(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (&len, tail) = rest.split_first()?;
        let n = usize::from(len).min(tail.len());
        let (d, tail) = tail.split_at(n);
        rest = tail;
        Some((len, d))
    })
}

/// Any bytes as one datagram: parsing is total, and what parses re-encodes to a message that
/// parses the same.
pub fn wire(data: &[u8]) {
    if let Ok(m) = Message::parse(data) {
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = m.encode(&mut buf).expect("a parsed message re-encodes");
        assert_eq!(Message::parse(&buf[..n]), Ok(m));
    }
}

fn channel_key() -> ChannelKey {
    ChannelKey::from_seed(&[7; 32])
}

/// Datagrams from a few sources into a relay core that knows one channel: no panic, every
/// reply no larger than the datagram it answers (anti-amplification), counters consistent.
pub fn relay_core(data: &[u8]) {
    let mut relay = RelayCore::with_cookie_key(RelayConfig::default(), [3; 32]);
    let mut publisher = Publisher::new(channel_key(), 1, 1);
    let mut reply = vec![0u8; MAX_DATAGRAM];
    let mut buf = [0u8; MAX_DATAGRAM];
    let publisher_addr = SocketAddr::from(([10, 0, 0, 1], 7000));
    let n = publisher
        .poll_announce(Timestamp::ZERO, &mut buf)
        .expect("an announce is due");
    assert!(matches!(
        relay.handle(Timestamp::ZERO, publisher_addr, &buf[..n], &mut reply),
        Inbound::Reply(_)
    ));
    let mut now = Timestamp::ZERO;
    for (tag, d) in datagrams(data) {
        now = now + Duration::from_millis(u64::from(tag % 16));
        let from = match tag % 4 {
            0 => publisher_addr,
            k => SocketAddr::from(([10, 0, 0, 1 + k], 5000 + u16::from(tag))),
        };
        match relay.handle(now, from, d, &mut reply) {
            Inbound::Reply(len) => assert!(len <= d.len(), "{len}-byte reply to {} bytes", d.len()),
            Inbound::Verify(p) => {
                let ok =
                    crate::wire::Piece::parse(d).is_ok_and(|pc| p.key.verify_piece(&pc).is_ok());
                let _ = relay.admit(&p, ok);
            }
            Inbound::Dropped(_) | Inbound::Done => {}
        }
        relay.handle_timeout(now);
    }
    let s = relay.stats();
    assert!(s.pieces_accepted <= s.pieces_in && s.pieces_in <= s.datagrams_in);
}

/// Datagrams into a viewer of one channel: no panic, nothing played that was not verified.
pub fn viewer(data: &[u8]) {
    let key: ChannelPublicKey = channel_key().public();
    let mut viewer = Viewer::new(key, ViewerConfig::default());
    let mut now = Timestamp::ZERO;
    let mut played = 0u64;
    for (tag, d) in datagrams(data) {
        now = now + Duration::from_millis(u64::from(tag));
        let _ = viewer.handle_datagram(now, d);
        while viewer.poll_piece(now).is_some() {
            played += 1;
        }
    }
    // Arbitrary bytes cannot carry a valid signature of this key.
    assert_eq!(played, 0, "a forged piece was played");
}

/// Any text as a relay config file: an error or settings that print and read back the same.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut s = RelaySettings::default();
    if s.apply_toml(text, std::path::Path::new("fuzz.toml"))
        .is_ok()
    {
        let mut again = RelaySettings::default();
        again
            .apply_toml(&s.to_toml(), std::path::Path::new("printed.toml"))
            .expect("printed settings read back");
        assert_eq!(again, s);
    }
}

/// Any text as Prometheus exposition text.
pub fn metrics_text(data: &[u8]) {
    let _ = crate::metrics::text::parse_samples(&String::from_utf8_lossy(data));
}

/// Any bytes as an Ethernet frame on the AF_XDP path: a parsed payload lies inside the frame.
pub fn frame(data: &[u8]) {
    if let Some(f) = crate::backend::xdp::frame::parse_udp(data) {
        assert!(f.payload_offset + f.payload_len <= data.len());
    }
}

/// Any text as a fault specification; a valid one drives an injector.
pub fn fault_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = text.parse::<FaultSpec>() {
        let mut f = FaultInjector::new(spec);
        for i in 0..64u64 {
            f.push(Timestamp::from_micros(i * 1000), &i.to_le_bytes());
        }
        let mut out = 0;
        while f.pop(Timestamp::from_micros(u64::MAX / 2)).is_some() {
            out += 1;
        }
        let s = f.stats();
        assert_eq!(out, s.seen - s.dropped + s.duplicated);
    }
}

/// Datagrams from a few sources into a tracker: no panic, and an address that has not proved
/// itself is never sent more than it sent.
pub fn tracker(data: &[u8]) {
    use crate::tracker::{TrackerConfig, TrackerCore};
    let mut t = TrackerCore::new(TrackerConfig::default(), [4; 32], 1);
    let mut now = Timestamp::ZERO;
    for (tag, d) in datagrams(data) {
        now = now + Duration::from_millis(u64::from(tag));
        let from = SocketAddr::from(([10, 0, 0, 1 + tag % 4], 4000));
        let mut sent = 0;
        t.handle(now, from, d, &mut |r| sent += r.len());
        // Replies bigger than the request go only to proven addresses, whose announce carries
        // a cookie no fuzzer will guess.
        assert!(
            sent <= d.len() || matches!(Message::parse(d), Ok(Message::TrackerAnnounce(_))),
            "{sent} bytes for {} bytes",
            d.len()
        );
        t.handle_timeout(now);
    }
}

/// Datagrams from a few sources into a swarm peer, with real signed pieces among them: no
/// panic, every piece handed out for playing verifies under the channel key, and an address
/// with no link is never sent more than it sent.
pub fn swarm_node(data: &[u8]) {
    use crate::swarm::{ChannelInfo, SwarmConfig, SwarmNode};
    use crate::wire::{PeerEntry, PieceFlags, Role};
    let key = ChannelKey::from_seed(&[9; 32]);
    let public = key.public();
    let mut publisher = Publisher::new(key, 1000, 4);
    let mut node = SwarmNode::new(public, SwarmConfig::default());
    node.set_info(ChannelInfo {
        clubs: 4,
        bitrate_bps: 1_000_000,
        first_seq: 1000,
        private: false,
    });
    let addr = |tag: u8| SocketAddr::from(([10, 0, 0, 1 + tag % 4], 4000));
    node.add_candidates((0..4).map(|t| PeerEntry {
        addr: addr(t),
        role: Role::Peer,
        club: t,
        free_seats: t % 2 == 0,
    }));
    let mut now = Timestamp::ZERO;
    let mut piece = [0u8; MAX_DATAGRAM];
    for (tag, d) in datagrams(data) {
        now = now + Duration::from_millis(u64::from(tag % 50));
        let from = addr(tag);
        let linked = node.is_linked(&from);
        if tag & 0x80 != 0 {
            // A real piece from this source.
            if let Ok(n) = publisher.encode_piece(d, PieceFlags::empty(), 0, &mut piece) {
                node.handle_datagram(now, from, &piece[..n]);
            }
        }
        node.handle_datagram(now, from, d);
        node.handle_timeout(now);
        let mut to_source = 0;
        while let Some(t) = node.poll_transmit(now) {
            if t.to == from {
                to_source += t.data.as_bytes().len();
            }
        }
        assert!(
            linked || node.is_linked(&from) || to_source <= d.len().max(Join::LEN),
            "{to_source} bytes to an unlinked source that sent {}",
            d.len()
        );
        while let Some(p) = node.poll_piece() {
            let p = crate::wire::Piece::parse(&p).expect("a delivered piece parses");
            assert!(
                public.verify_piece(&p).is_ok(),
                "delivered an unsigned piece"
            );
        }
    }
}
