//! Tracker messages: a peer's announce, the tracker's peer list, and the channel descriptor
//! the publisher signs. Same 4-byte header as the other control messages. A tracker answers an
//! announce only when its cookie (from the HELLO/COOKIE exchange) proves the address, so its
//! replies may be larger than the request.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::control::{begin, parse_header_within};
use super::swarm::ClubMask;
use super::SIGNATURE_LEN;
use super::{array, be_u64, ChannelId, CookieBytes, MessageType, WireError};

/// What a swarm member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// A viewer that re-uploads.
    Peer = 1,
    /// A relay appliance (member of every club, large out-degree).
    Relay = 2,
    /// The channel's publisher.
    Publisher = 3,
}

impl Role {
    pub(super) fn from_byte(b: u8) -> Result<Self, WireError> {
        match b {
            1 => Ok(Role::Peer),
            2 => Ok(Role::Relay),
            3 => Ok(Role::Publisher),
            other => Err(WireError::UnknownFlags(other)),
        }
    }
}

/// Member → tracker: "I am in this channel; who else is?"
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerAnnounce {
    /// Channel.
    pub channel: ChannelId,
    /// Cookie from the tracker's COOKIE.
    pub cookie: CookieBytes,
    /// What the sender is.
    pub role: Role,
    /// Its club (`0xff`: every club, as relays are).
    pub club: u8,
    /// Upload it offers, kbit/s.
    pub upload_kbps: u32,
    /// Downstream seats it has free (clubs' worth of upload it could still give; up to 255).
    pub free_seats: u8,
    /// Clubs it has no source for: the tracker lists members of them with free seats first.
    pub needs: ClubMask,
    /// It is leaving: forget it now.
    pub leaving: bool,
}

impl TrackerAnnounce {
    /// Encoded length.
    pub const LEN: usize = 48;
    const LEAVING: u8 = 0x01;

    /// Parses a tracker announce.
    pub fn parse(d: &[u8]) -> Result<Self, WireError> {
        let flags = parse_header_within(d, MessageType::TrackerAnnounce, Self::LEN..=Self::LEN)?;
        if flags & !Self::LEAVING != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        if d[35] != 0 {
            return Err(WireError::ReservedNonZero);
        }
        Ok(TrackerAnnounce {
            channel: ChannelId(array(&d[4..12])),
            cookie: CookieBytes(array(&d[12..32])),
            role: Role::from_byte(d[32])?,
            club: d[33],
            free_seats: d[34],
            upload_kbps: u32::from_be_bytes(array(&d[36..40])),
            needs: ClubMask(be_u64(&d[40..48])),
            leaving: flags & Self::LEAVING != 0,
        })
    }

    /// Encodes into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let flags = if self.leaving { Self::LEAVING } else { 0 };
        let out = begin(buf, MessageType::TrackerAnnounce, flags, Self::LEN)?;
        out[4..12].copy_from_slice(&self.channel.0);
        out[12..32].copy_from_slice(&self.cookie.0);
        out[32] = self.role as u8;
        out[33] = self.club;
        out[34] = self.free_seats;
        out[36..40].copy_from_slice(&self.upload_kbps.to_be_bytes());
        out[40..48].copy_from_slice(&self.needs.0.to_be_bytes());
        Ok(Self::LEN)
    }
}

/// One member in a peer list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEntry {
    /// Where it receives.
    pub addr: SocketAddr,
    /// What it is.
    pub role: Role,
    /// Its club.
    pub club: u8,
    /// It announced free seats (a hint: as of its last announce).
    pub free_seats: bool,
}

/// Entry byte 18: the role in the low bits, this flag for free seats.
const FREE_SEATS: u8 = 0x80;

/// Tracker → member: some members of the channel, viewed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peers<'a> {
    bytes: &'a [u8],
}

impl<'a> Peers<'a> {
    /// Bytes per entry: IPv6 (or IPv4-mapped) address, port, role, club.
    const ENTRY: usize = 20;
    const FIXED: usize = 16;
    /// Most entries in one datagram.
    pub const MAX: usize = (super::MAX_DATAGRAM - Self::FIXED) / Self::ENTRY;

    /// Parses a peer list (every entry is checked here, so iterating cannot fail).
    pub fn parse(d: &'a [u8]) -> Result<Self, WireError> {
        parse_header_within(
            d,
            MessageType::Peers,
            Self::FIXED..=Self::FIXED + Self::MAX * Self::ENTRY,
        )?;
        let count = usize::from(d[12]);
        if d[14..16] != [0, 0] {
            return Err(WireError::ReservedNonZero);
        }
        if d.len() != Self::FIXED + count * Self::ENTRY {
            return Err(WireError::WrongLength {
                kind: MessageType::Peers,
                expected: Self::FIXED + count * Self::ENTRY,
                actual: d.len(),
            });
        }
        for e in d[Self::FIXED..].chunks_exact(Self::ENTRY) {
            Role::from_byte(e[18] & !FREE_SEATS)?;
        }
        Ok(Peers { bytes: d })
    }

    /// The channel.
    pub fn channel(&self) -> ChannelId {
        ChannelId(array(&self.bytes[4..12]))
    }

    /// The club the tracker assigns to the asker, if it asked for one (it announced without
    /// a club).
    pub fn assigned_club(&self) -> Option<u8> {
        // Written as club + 1; zero is no assignment.
        self.bytes[13].checked_sub(1)
    }

    /// The members listed.
    pub fn iter(&self) -> impl Iterator<Item = PeerEntry> + 'a {
        self.bytes[Self::FIXED..]
            .chunks_exact(Self::ENTRY)
            .map(|e| {
                let ip6 = Ipv6Addr::from(array::<16>(&e[..16]));
                let ip = ip6.to_ipv4_mapped().map_or(IpAddr::V6(ip6), IpAddr::V4);
                PeerEntry {
                    addr: SocketAddr::new(ip, u16::from_be_bytes([e[16], e[17]])),
                    // Checked by parse.
                    role: Role::from_byte(e[18] & !FREE_SEATS).unwrap_or(Role::Peer),
                    club: e[19],
                    free_seats: e[18] & FREE_SEATS != 0,
                }
            })
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Writes a peer list of `channel` (at most [`Peers::MAX`] entries), with the club
    /// `assigned` to the asker if any, into `buf`.
    pub fn encode(
        channel: ChannelId,
        peers: &[PeerEntry],
        assigned: Option<u8>,
        buf: &mut [u8],
    ) -> Result<usize, WireError> {
        if peers.len() > Self::MAX {
            return Err(WireError::PayloadTooLarge(peers.len()));
        }
        let len = Self::FIXED + peers.len() * Self::ENTRY;
        let out = begin(buf, MessageType::Peers, 0, len)?;
        out[4..12].copy_from_slice(&channel.0);
        out[12] = peers.len() as u8;
        out[13] = assigned.map_or(0, |c| c.saturating_add(1));
        for (e, p) in out[Self::FIXED..].chunks_exact_mut(Self::ENTRY).zip(peers) {
            let ip = match p.addr.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            e[..16].copy_from_slice(&ip.octets());
            e[16..18].copy_from_slice(&p.addr.port().to_be_bytes());
            e[18] = p.role as u8 | if p.free_seats { FREE_SEATS } else { 0 };
            e[19] = p.club;
        }
        Ok(len)
    }
}

/// Publisher → tracker → members: what the channel is, signed by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor<'a> {
    bytes: &'a [u8],
}

impl<'a> Descriptor<'a> {
    /// Encoded length.
    pub const LEN: usize = 56 + SIGNATURE_LEN;
    const SIGNED_LEN: usize = 56;
    const PRIVATE: u8 = 0x01;

    /// Parses a descriptor (its signature is checked by [`crate::crypto`]).
    pub fn parse(d: &'a [u8]) -> Result<Self, WireError> {
        let flags = parse_header_within(d, MessageType::Descriptor, Self::LEN..=Self::LEN)?;
        if flags & !Self::PRIVATE != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        if d[45..48] != [0, 0, 0] {
            return Err(WireError::ReservedNonZero);
        }
        Ok(Descriptor { bytes: d })
    }

    /// Writes a descriptor signed by `sign`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_signed(
        public_key: &[u8; 32],
        epoch_us: u64,
        clubs: u8,
        private: bool,
        bitrate_bps: u64,
        buf: &mut [u8],
        sign: impl FnOnce(&[u8]) -> [u8; SIGNATURE_LEN],
    ) -> Result<usize, WireError> {
        let flags = if private { Self::PRIVATE } else { 0 };
        let out = begin(buf, MessageType::Descriptor, flags, Self::LEN)?;
        out[4..36].copy_from_slice(public_key);
        out[36..44].copy_from_slice(&epoch_us.to_be_bytes());
        out[44] = clubs;
        out[48..56].copy_from_slice(&bitrate_bps.to_be_bytes());
        let signature = sign(&out[..Self::SIGNED_LEN]);
        out[Self::SIGNED_LEN..].copy_from_slice(&signature);
        Ok(Self::LEN)
    }

    /// The channel's public key.
    pub fn public_key(&self) -> [u8; 32] {
        array(&self.bytes[4..36])
    }

    /// The publisher session's epoch (µs); a newer one replaces an older.
    pub fn epoch_us(&self) -> u64 {
        be_u64(&self.bytes[36..44])
    }

    /// Number of clubs K.
    pub fn clubs(&self) -> u8 {
        self.bytes[44]
    }

    /// Whether payloads are encrypted (a private channel).
    pub fn private(&self) -> bool {
        self.bytes[2] & Self::PRIVATE != 0
    }

    /// The stream's bitrate, bits per second.
    pub fn bitrate_bps(&self) -> u64 {
        be_u64(&self.bytes[48..56])
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> &'a [u8] {
        &self.bytes[..Self::SIGNED_LEN]
    }

    /// The signature.
    pub fn signature(&self) -> [u8; SIGNATURE_LEN] {
        array(&self.bytes[Self::SIGNED_LEN..])
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_refuse_junk() {
        let a = TrackerAnnounce {
            channel: ChannelId([1; 8]),
            cookie: CookieBytes([2; 20]),
            role: Role::Relay,
            club: 0xff,
            upload_kbps: 100_000,
            free_seats: 17,
            needs: ClubMask(0x8000_0000_0000_0005),
            leaving: true,
        };
        let mut buf = [0u8; super::super::MAX_DATAGRAM];
        let n = a.encode(&mut buf).unwrap();
        assert_eq!(TrackerAnnounce::parse(&buf[..n]), Ok(a));
        buf[32] = 9;
        assert!(TrackerAnnounce::parse(&buf[..n]).is_err(), "unknown role");

        let list: Vec<PeerEntry> = (0..Peers::MAX)
            .map(|i| PeerEntry {
                addr: if i % 2 == 0 {
                    SocketAddr::from(([10, 0, (i / 256) as u8, i as u8], 7000 + i as u16))
                } else {
                    SocketAddr::from((Ipv6Addr::LOCALHOST, 9000))
                },
                role: Role::Peer,
                club: (i % 4) as u8,
                free_seats: i % 3 == 0,
            })
            .collect();
        let channel = ChannelId([3; 8]);
        let n = Peers::encode(channel, &list, Some(3), &mut buf).unwrap();
        assert!(n <= super::super::MAX_DATAGRAM);
        let parsed = Peers::parse(&buf[..n]).unwrap();
        assert_eq!(parsed.channel(), channel);
        assert_eq!(parsed.assigned_club(), Some(3));
        assert_eq!(parsed.iter().collect::<Vec<_>>(), list);
        assert!(Peers::parse(&buf[..n - 1]).is_err(), "truncated");
        let mut too_many = list.clone();
        too_many.push(list[0]);
        assert!(Peers::encode(channel, &too_many, None, &mut buf).is_err());

        let n = Descriptor::encode_signed(&[7; 32], 99, 4, true, 4_000_000, &mut buf, |_| [5; 64])
            .unwrap();
        let d = Descriptor::parse(&buf[..n]).unwrap();
        assert_eq!(
            (
                d.public_key(),
                d.epoch_us(),
                d.clubs(),
                d.private(),
                d.bitrate_bps()
            ),
            ([7; 32], 99, 4, true, 4_000_000)
        );
        assert_eq!(d.signature(), [5; 64]);
    }
}
