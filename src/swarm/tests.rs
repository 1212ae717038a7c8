//! The swarm core on a small in-memory network with virtual time: publisher, peers, optional
//! relay, loss and adversaries. (The simulator in `sim/` does the same at scale.)

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::crypto::ChannelKey;
use crate::publisher::Publisher;
use crate::time::Timestamp;
use crate::wire::{Descriptor, PeerEntry, Piece, PieceFlags, Role, MAX_DATAGRAM};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 7000))
}

struct Net {
    nodes: Vec<SwarmNode>,
    /// (deliver at, seq for ordering, from, to, bytes)
    in_flight: BTreeMap<(Timestamp, u64), (SocketAddr, usize, Vec<u8>)>,
    order: u64,
    index: std::collections::HashMap<SocketAddr, usize>,
    loss: f64,
    rng: StdRng,
    /// Pieces each node played (first copies, verified).
    played: Vec<HashSet<u64>>,
    key: crate::crypto::ChannelPublicKey,
    unsigned_played: u64,
    sent_by: Vec<u64>,
    /// Datagrams (from, to, bytes) this returns true for are lost, from `drop_from` until
    /// `drop_until`.
    drop: fn(usize, usize, &[u8]) -> bool,
    drop_from: Timestamp,
    drop_until: Timestamp,
}

struct Setup {
    peers: usize,
    clubs: u8,
    relay: bool,
    loss: f64,
    publisher_cap: f64,
    peer_cap: f64,
    behaviours: Vec<Behaviour>,
}

impl Setup {
    /// `peers` honest peers in `clubs` clubs, no relay, no loss, and upload to spare (4x the
    /// stream rate) at the publisher and every peer; tests change what they are about.
    fn honest(peers: usize, clubs: u8) -> Setup {
        Setup {
            peers,
            clubs,
            relay: false,
            loss: 0.0,
            publisher_cap: 4.0,
            peer_cap: 4.0,
            behaviours: vec![],
        }
    }
}

const BITRATE: u64 = 1_000_000;

fn build(s: &Setup, key: &ChannelKey) -> Net {
    let mut buf = [0u8; MAX_DATAGRAM];
    let public = key.public();
    let n = Descriptor::encode_signed(
        &public.to_bytes(),
        1000,
        s.clubs,
        false,
        BITRATE,
        &mut buf,
        |m| key.sign(m),
    )
    .unwrap();
    let info = ChannelInfo {
        clubs: s.clubs,
        bitrate_bps: BITRATE,
        first_seq: 1000,
        private: false,
    };
    let mut nodes = Vec::new();
    let publisher = SwarmNode::publisher(
        public,
        info.clone(),
        buf[..n].to_vec(),
        SwarmConfig {
            upload_limit_bps: Some((BITRATE as f64 * s.publisher_cap) as u64),
            seed: 1,
            ..SwarmConfig::default()
        },
    );
    nodes.push(publisher);
    let mut entries = vec![PeerEntry {
        addr: addr(0),
        role: Role::Publisher,
        club: ALL_CLUBS,
        free_seats: false,
    }];
    let first_peer = if s.relay {
        entries.push(PeerEntry {
            addr: addr(1),
            role: Role::Relay,
            club: ALL_CLUBS,
            free_seats: false,
        });
        let mut relay = SwarmNode::new(
            public,
            SwarmConfig {
                role: Role::Relay,
                max_downstreams: 500,
                seed: 2,
                ..SwarmConfig::default()
            },
        );
        relay.set_info(info.clone());
        nodes.push(relay);
        2
    } else {
        1
    };
    for i in 0..s.peers {
        let behaviour = s.behaviours.get(i).copied().unwrap_or_default();
        let mut p = SwarmNode::new(
            public,
            SwarmConfig {
                upload_limit_bps: Some((BITRATE as f64 * s.peer_cap) as u64),
                behaviour,
                seed: 100 + i as u64,
                ..SwarmConfig::default()
            },
        );
        p.set_info(info.clone());
        nodes.push(p);
        let _ = first_peer;
    }
    // Everyone knows the publisher and relay; peers learn each other's clubs by choosing
    // in a fixed order (like a tracker's answers would tell them).
    let total = nodes.len();
    let mut net = Net {
        index: (0..total).map(|i| (addr(i), i)).collect(),
        nodes,
        in_flight: BTreeMap::new(),
        order: 0,
        loss: s.loss,
        rng: StdRng::seed_from_u64(9),
        played: vec![HashSet::new(); total],
        key: public,
        unsigned_played: 0,
        sent_by: vec![0; total],
        drop: |_, _, _| false,
        drop_from: Timestamp::ZERO,
        drop_until: Timestamp::from_micros(u64::MAX),
    };
    // Peers choose clubs one by one, each seeing those before it.
    for i in first_peer..total {
        net.nodes[i].add_candidates(entries.clone());
        net.nodes[i].handle_timeout(Timestamp::from_micros(600_000));
        entries.push(PeerEntry {
            addr: addr(i),
            role: Role::Peer,
            club: net.nodes[i].club(),
            free_seats: false,
        });
    }
    for i in 0..total {
        let others: Vec<PeerEntry> = entries
            .iter()
            .filter(|e| e.addr != addr(i))
            .copied()
            .collect();
        net.nodes[i].add_candidates(others);
    }
    net
}

impl Net {
    fn step(&mut self, now: Timestamp) {
        // Deliver what is due.
        while let Some((&(at, o), _)) = self.in_flight.first_key_value() {
            if at > now {
                break;
            }
            let (from, to, data) = self.in_flight.remove(&(at, o)).unwrap();
            self.nodes[to].handle_datagram(now, from, &data);
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].handle_timeout(now);
            while let Some(p) = self.nodes[i].poll_piece() {
                let piece = Piece::parse(&p).unwrap();
                // Whatever a member delivers for playing must be the publisher's piece.
                self.unsigned_played += u64::from(self.key.verify_piece(&piece).is_err());
                self.played[i].insert(piece.seq());
            }
            while let Some(t) = self.nodes[i].poll_transmit(now) {
                let Some(&to) = self.index.get(&t.to) else {
                    continue;
                };
                if matches!(t.data, Datagram::Piece(_)) {
                    self.sent_by[i] += t.data.as_bytes().len() as u64;
                }
                if self.rng.gen::<f64>() < self.loss
                    || (now >= self.drop_from
                        && now < self.drop_until
                        && (self.drop)(i, to, t.data.as_bytes()))
                {
                    continue;
                }
                self.order += 1;
                let delay = Duration::from_micros(5_000 + self.rng.gen_range(0..2_000));
                self.in_flight.insert(
                    (now + delay, self.order),
                    (addr(i), to, t.data.as_bytes().to_vec()),
                );
            }
        }
    }
}

/// Runs `secs` of a 1 Mbit/s stream; returns the net and the seqs published.
fn run(s: &Setup, secs: u64) -> (Net, Vec<u64>) {
    run_with(s, secs, |_| {})
}

/// [`run`], with `shape` applied to the network first.
fn run_with(s: &Setup, secs: u64, shape: impl FnOnce(&mut Net)) -> (Net, Vec<u64>) {
    let key = ChannelKey::from_seed(&[7; 32]);
    let mut net = build(s, &key);
    shape(&mut net);
    let mut publisher = Publisher::new(key, 1000, s.clubs);
    let mut buf = [0u8; MAX_DATAGRAM];
    let payload = [0x47u8; 1128];
    // 1 Mbit/s of 1 128-byte payloads: one piece every ~9 ms.
    let interval = 1128 * 8 * 1_000_000 / BITRATE;
    let mut published = Vec::new();
    let mut next_piece = std::env::var("START_US").map_or(1_000_000u64, |v| v.parse().unwrap());
    let end = 1_000_000 + secs * 1_000_000;
    let mut t = 600_000u64;
    while t < end + 2_000_000 {
        let now = Timestamp::from_micros(t);
        if t >= next_piece && t < end {
            let seq = publisher.next_seq();
            let n = publisher
                .encode_piece(&payload, PieceFlags::empty(), t, &mut buf)
                .unwrap();
            net.nodes[0].publish(now, Arc::from(&buf[..n]));
            published.push(seq);
            next_piece += interval;
        }
        net.step(now);
        t += 1_000;
    }
    (net, published)
}

fn continuity(net: &Net, node: usize, published: &[u64]) -> f64 {
    let got = published
        .iter()
        .filter(|s| net.played[node].contains(s))
        .count();
    got as f64 / published.len() as f64
}

#[test]
fn every_peer_plays_the_whole_stream_within_upload_caps() {
    let s = Setup {
        publisher_cap: 2.0,
        peer_cap: 1.5,
        ..Setup::honest(24, 8)
    };
    let (net, published) = run(&s, 6);
    for i in 1..net.nodes.len() {
        if continuity(&net, i, &published) < 1.0 {
            for (j, n) in net.nodes.iter().enumerate() {
                eprintln!(
                    "node {j} club {} links {:?} refused {} granted {}",
                    n.club(),
                    n.link_counts(),
                    n.stats().joins_refused,
                    n.stats().joins_granted
                );
            }
            eprintln!("{}", net.nodes[i].describe_links());
        }
        assert_eq!(
            continuity(&net, i, &published),
            1.0,
            "peer {i} missed pieces: {:?}",
            net.nodes[i].stats()
        );
    }
    let secs = 8.0;
    let publisher_rate = net.sent_by[0] as f64 * 8.0 / secs / BITRATE as f64;
    assert!(
        publisher_rate <= 2.0,
        "publisher sent {publisher_rate:.2}x the stream"
    );
    for i in 1..net.nodes.len() {
        assert!(
            net.sent_by[i] as f64 * 8.0 / 6.0 <= 1.5 * BITRATE as f64 * 1.05,
            "peer {i} over its cap"
        );
    }
    let uploaders = (1..net.nodes.len()).filter(|i| net.sent_by[*i] > 0).count();
    assert!(
        uploaders >= net.nodes.len() - 2,
        "uploads not spread: {:?}",
        net.sent_by
    );
}

#[test]
fn forgers_are_banned_and_nothing_forged_is_played() {
    let mut behaviours = vec![Behaviour::Honest; 18];
    behaviours[3] = Behaviour::Forger;
    behaviours[9] = Behaviour::Forger;
    let s = Setup {
        publisher_cap: 2.0,
        peer_cap: 2.5,
        behaviours,
        ..Setup::honest(18, 6)
    };
    let (net, published) = run(&s, 8);
    let banned: u64 = net.nodes.iter().map(|n| n.stats().peers_banned).sum();
    assert!(banned >= 2, "both forgers should be banned, {banned} bans");
    assert_eq!(
        net.unsigned_played, 0,
        "a forged piece was delivered for playing"
    );
    // Honest peers lose at most the time it takes to ban a forger and find another upstream
    // (a forger can hold a club's only seat for a second or two); once that is done, they
    // play nearly everything (each peer still learns of a forger by itself).
    let recent = &published[published.len() / 2..];
    for (i, n) in net.nodes.iter().enumerate().skip(1) {
        if i == 4 || i == 10 {
            continue;
        }
        assert!(
            continuity(&net, i, &published) >= 0.9 && continuity(&net, i, recent) >= 0.97,
            "peer {i} club {}: {:.3} overall, {:.3} in the second half: {:?}\n{}",
            n.club(),
            continuity(&net, i, &published),
            continuity(&net, i, recent),
            n.stats(),
            n.describe_links()
        );
    }
}

#[test]
fn repair_keeps_continuity_under_five_percent_loss() {
    let s = Setup {
        loss: 0.05,
        publisher_cap: 2.0,
        peer_cap: 1.5,
        ..Setup::honest(21, 10)
    };
    let (net, published) = run(&s, 6);
    let mut worst = 1.0f64;
    for i in 1..net.nodes.len() {
        let c = continuity(&net, i, &published);
        if c < 0.995 {
            let miss: Vec<usize> = published
                .iter()
                .enumerate()
                .filter(|(_, s)| !net.played[i].contains(s))
                .map(|(j, _)| j)
                .collect();
            eprintln!(
                "== node {i} club {} continuity {c} missing {:?}\n{}",
                net.nodes[i].club(),
                miss,
                net.nodes[i].describe_links()
            );
        }
        worst = worst.min(c);
    }
    let repaired: u64 = net.nodes.iter().map(|n| n.stats().repaired).sum();
    assert!(repaired > 0);
    assert!(worst >= 0.995, "worst continuity {worst}");
}

#[test]
fn a_relay_amplifies_a_weak_publisher() {
    let s = Setup {
        relay: true,
        publisher_cap: 1.2,
        peer_cap: 1.0,
        ..Setup::honest(30, 6)
    };
    let (net, published) = run(&s, 5);
    for i in 2..net.nodes.len() {
        assert!(
            continuity(&net, i, &published) >= 0.999,
            "peer {i}: {:?}\n{}\nrelay {:?}\n{}\npublisher {:?}\n{}",
            net.nodes[i].stats(),
            net.nodes[i].describe_links(),
            net.nodes[1].stats(),
            net.nodes[1].describe_links(),
            net.nodes[0].stats(),
            net.nodes[0].describe_links()
        );
    }
}

/// A publisher of a 4-club channel that announces itself to a tracker at `tracker`.
fn publisher_with_tracker(tracker: SocketAddr) -> SwarmNode {
    let key = ChannelKey::from_seed(&[7; 32]);
    let public = key.public();
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = Descriptor::encode_signed(&public.to_bytes(), 1000, 4, false, BITRATE, &mut buf, |m| {
        key.sign(m)
    })
    .unwrap();
    let info = ChannelInfo {
        clubs: 4,
        bitrate_bps: BITRATE,
        first_seq: 1000,
        private: false,
    };
    SwarmNode::publisher(
        public,
        info,
        buf[..n].to_vec(),
        SwarmConfig {
            tracker: Some(tracker),
            seed: 1,
            ..SwarmConfig::default()
        },
    )
}

/// Runs `node`'s timers every 10 ms from `from_ms` to `to_ms`; the times (ms) at which it
/// sent `to` a datagram of `kind`.
fn sends_to(
    node: &mut SwarmNode,
    to: SocketAddr,
    kind: crate::wire::MessageType,
    from_ms: u64,
    to_ms: u64,
) -> Vec<u64> {
    let mut at = Vec::new();
    for ms in (from_ms..to_ms).step_by(10) {
        let now = Timestamp::from_micros(ms * 1000);
        node.handle_timeout(now);
        while let Some(t) = node.poll_transmit(now) {
            if t.to == to && t.data.as_bytes().get(1) == Some(&(kind as u8)) {
                at.push(ms);
            }
        }
    }
    at
}

#[test]
fn a_member_asks_an_unanswering_tracker_again_within_a_quarter_second() {
    // A lost HELLO or COOKIE used to cost the publisher a whole second per try, and peers
    // learnt of it that much later.
    let tracker = addr(999);
    let mut publisher = publisher_with_tracker(tracker);
    let hellos = sends_to(
        &mut publisher,
        tracker,
        crate::wire::MessageType::Hello,
        0,
        1000,
    );
    assert!(hellos.len() >= 4, "asked the tracker at {hellos:?} ms");
}

#[test]
fn an_unanswered_announce_is_repeated_soon_then_less_and_less_often() {
    // A lost announce, or its lost answer, used to wait for the next interval (a second or
    // more): the publisher's first lost delayed the stream for everybody, and a club whose
    // members missed the publisher's address went unseeded (simulator, small-clubs-loss).
    use crate::wire::{Cookie, CookieBytes, MessageType, Peers};
    let tracker = addr(999);
    let mut publisher = publisher_with_tracker(tracker);
    let mut buf = [0u8; MAX_DATAGRAM];
    let cookie = Cookie {
        nonce: 0,
        cookie: CookieBytes([3; 20]),
    };
    let n = cookie.encode(&mut buf).unwrap();
    publisher.handle_datagram(Timestamp::ZERO, tracker, &buf[..n]);
    let unanswered = sends_to(
        &mut publisher,
        tracker,
        MessageType::TrackerAnnounce,
        0,
        2000,
    );
    // (Timers run every 20 ms, so each repeat comes up to a tick late.)
    let gaps: Vec<u64> = unanswered.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps.len(), 3, "announced at {unanswered:?} ms");
    for (gap, wait) in gaps.iter().zip([250, 500, 1000]) {
        assert!(
            (wait..=wait + 20).contains(gap),
            "repeated after 250 ms, then 500 ms, then a second: {unanswered:?} ms"
        );
    }
    // Answered: back to the usual interval (a second for a publisher).
    let channel = ChannelKey::from_seed(&[7; 32]).public().channel_id();
    let n = Peers::encode(channel, &[], None, &mut buf).unwrap();
    let last = unanswered[3];
    publisher.handle_datagram(
        Timestamp::from_micros(last * 1000 + 5_000),
        tracker,
        &buf[..n],
    );
    let answered = sends_to(
        &mut publisher,
        tracker,
        MessageType::TrackerAnnounce,
        last + 10,
        last + 1200,
    );
    assert_eq!(
        answered,
        vec![last + 1000],
        "once answered, announced at the usual interval"
    );
}

#[test]
fn an_upstream_whose_pieces_arrive_is_kept_when_its_accepts_are_lost() {
    // From 2 s on, every ACCEPT the publisher sends is lost; its pieces still arrive. The
    // link used to expire 4 s after the last ACCEPT, taking the club's only seed with it.
    let s = Setup::honest(2, 1);
    let (net, published) = run_with(&s, 10, |net| {
        net.drop_from = Timestamp::from_micros(2_000_000);
        net.drop = |from, _, bytes| {
            from == 0
                && matches!(
                    crate::wire::Message::parse(bytes),
                    Ok(crate::wire::Message::Accept(_))
                )
        };
    });
    for peer in 1..=2 {
        let c = continuity(&net, peer, &published);
        assert!(c >= 0.99, "peer {peer} continuity {c:.3}");
        assert_eq!(net.nodes[peer].stats().links_expired, 0, "peer {peer}");
    }
}

#[test]
fn each_member_says_which_club_started_last() {
    // Peer 1 (node 1) never gets club 0: every piece of it sent to it is lost.
    let s = Setup::honest(6, 3);
    let (net, _) = run_with(&s, 3, |net| {
        net.drop = |_, to, bytes| to == 1 && Piece::parse(bytes).is_ok_and(|p| p.seq() % 3 == 0);
    });
    assert_eq!(net.nodes[1].slowest_club_start(), Some((0, None)));
    for peer in 2..=6 {
        let (club, after) = net.nodes[peer].slowest_club_start().unwrap();
        let after = after.unwrap_or_else(|| panic!("peer {peer}: club {club} never came"));
        assert!(
            club < 3 && after < Duration::from_secs(1),
            "peer {peer}: club {club} after {after:?}"
        );
    }
    // Before any piece there is nothing to say.
    let key = ChannelKey::from_seed(&[7; 32]);
    let fresh = SwarmNode::new(key.public(), SwarmConfig::default());
    assert_eq!(fresh.slowest_club_start(), None);
}

#[test]
fn an_upstream_nobody_else_can_stand_in_for_is_kept_through_a_silence() {
    // Two peers in two clubs: each gets the other's club only from the other (the publisher
    // seeds a peer its own club). Peer 2's pieces to peer 1 are lost for 0.8 s, longer than a
    // silence. Replacing peer 2 used to leave peer 1 without that club for the 3 s back-off.
    let s = Setup::honest(2, 2);
    let (net, published) = run_with(&s, 8, |net| {
        net.drop_from = Timestamp::from_micros(3_000_000);
        net.drop_until = Timestamp::from_micros(3_800_000);
        net.drop = |from, to, bytes| from == 2 && to == 1 && Piece::parse(bytes).is_ok();
    });
    let c = continuity(&net, 1, &published);
    assert_eq!(net.nodes[1].stats().peers_replaced, 0);
    assert!(c >= 0.97, "peer 1 continuity {c:.3}");
    assert!(continuity(&net, 2, &published) >= 0.99);
}

#[test]
fn a_peer_gets_its_own_club_from_the_relay_it_already_receives_others_from() {
    // Behind a relay, with a publisher that can seed little more than the relay. From 3 s
    // on, every piece other peers send to the last peer is lost: everything it plays must
    // come from the relay, its own club too (which its mates had carried, and which it did
    // not ask the relay for). It used to be unable to ask a member it held a link to for
    // more clubs.
    let s = Setup {
        relay: true,
        publisher_cap: 1.2,
        ..Setup::honest(6, 3)
    };
    let (net, published) = run_with(&s, 8, |net| {
        net.drop_from = Timestamp::from_micros(3_000_000);
        net.drop = |from, to, bytes| from >= 2 && to == 7 && Piece::parse(bytes).is_ok();
    });
    // Pieces published from 4 s on (a second to notice and ask) all play.
    let late: Vec<u64> = published[published.len() * 3 / 8..].to_vec();
    let c = continuity(&net, 7, &late);
    assert!(
        c >= 0.99,
        "the last peer played {c:.3} of the stream after 4 s"
    );
}
