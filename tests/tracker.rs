//! `clubcast tracker` as a process: members prove their address, announce, and find each
//! other; the publisher's signed descriptor is served and a forged one is not; members that
//! stop announcing are forgotten.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use clubcast::crypto::ChannelKey;
use clubcast::wire::{
    ChannelId, ClubMask, Descriptor, Hello, Message, Role, TrackerAnnounce, MAX_DATAGRAM,
};
use common::start_tracker;

/// A member socket that has proved its address; announcing returns the replies.
struct Member {
    socket: UdpSocket,
    cookie: clubcast::wire::CookieBytes,
    tracker: SocketAddr,
}

impl Member {
    fn join(tracker: SocketAddr) -> Member {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = Hello {
            channel: ChannelId([0; 8]),
            nonce: 5,
        }
        .encode(&mut buf)
        .unwrap();
        socket.send_to(&buf[..n], tracker).unwrap();
        let n = socket.recv(&mut buf).expect("no COOKIE");
        let Ok(Message::Cookie(c)) = Message::parse(&buf[..n]) else {
            panic!("not a cookie")
        };
        Member {
            socket,
            cookie: c.cookie,
            tracker,
        }
    }

    fn announce(&self, channel: ChannelId, role: Role) -> Vec<Vec<u8>> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = TrackerAnnounce {
            channel,
            cookie: self.cookie,
            role,
            club: 2,
            upload_kbps: 6000,
            free_seats: 0,
            needs: ClubMask::NONE,
            leaving: false,
        }
        .encode(&mut buf)
        .unwrap();
        self.socket.send_to(&buf[..n], self.tracker).unwrap();
        let mut replies = Vec::new();
        self.socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while let Ok(n) = self.socket.recv(&mut buf) {
            let done = matches!(Message::parse(&buf[..n]), Ok(Message::Peers(_)));
            replies.push(buf[..n].to_vec());
            if done {
                break;
            }
        }
        replies
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }
}

fn peers(replies: &[Vec<u8>]) -> Vec<(SocketAddr, Role)> {
    replies
        .iter()
        .find_map(|r| match Message::parse(r) {
            Ok(Message::Peers(p)) => Some(p.iter().map(|e| (e.addr, e.role)).collect()),
            _ => None,
        })
        .expect("no peer list")
}

#[test]
fn members_find_each_other_and_get_the_signed_descriptor() {
    let (_tracker, addr) = start_tracker("2s");
    let key = ChannelKey::from_seed(&[21; 32]);
    let channel = key.public().channel_id();

    // The publisher registers the channel: a forged descriptor first, then the real one.
    let publisher = Member::join(addr);
    let mut buf = [0u8; MAX_DATAGRAM];
    let public = key.public().to_bytes();
    let n = Descriptor::encode_signed(&public, 77, 4, false, 4_000_000, &mut buf, |m| key.sign(m))
        .unwrap();
    let mut forged = buf[..n].to_vec();
    forged[44] = 16;
    publisher.socket.send_to(&forged, addr).unwrap();
    publisher.socket.send_to(&buf[..n], addr).unwrap();
    publisher.announce(channel, Role::Publisher);

    let relay = Member::join(addr);
    relay.announce(channel, Role::Relay);
    let viewer = Member::join(addr);
    let replies = viewer.announce(channel, Role::Peer);
    let Ok(Message::Descriptor(d)) = Message::parse(&replies[0]) else {
        panic!("no descriptor before the peer list")
    };
    assert_eq!(
        (d.clubs(), d.epoch_us()),
        (4, 77),
        "the signed descriptor, not the forgery"
    );
    let list = peers(&replies);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0], (relay.addr(), Role::Relay), "relays first");
    assert!(list.contains(&(publisher.addr(), Role::Publisher)));

    // Members that stop announcing are forgotten; one that keeps announcing stays.
    std::thread::sleep(Duration::from_millis(1500));
    relay.announce(channel, Role::Relay);
    std::thread::sleep(Duration::from_millis(1500));
    let list = peers(&viewer.announce(channel, Role::Peer));
    assert_eq!(list, vec![(relay.addr(), Role::Relay)]);
}
