//! Swarm messages between members: JOIN (ask a member to push some clubs, or to be a club
//! mate), ACCEPT (what it granted), NACK (resend these pieces) and ACK (these pieces arrived,
//! and when: the samples the upload side's congestion control runs on).
//!
//! Same 4-byte header as the other control messages. A member answers a JOIN from an address
//! it has not validated only with a COOKIE, or a refusal (an ACCEPT granting nothing), no
//! larger than the JOIN, and sends pieces, repairs or granting ACCEPTs only to addresses that
//! echoed its cookie.

use super::control::{begin, parse_header_within};
use super::{array, be_u64, ChannelId, CookieBytes, MessageType, Role, WireError};

// Anti-amplification: the answers to a JOIN are never larger than the JOIN.
const _: () = assert!(super::Cookie::LEN <= Join::LEN && Accept::LEN <= Join::LEN);

/// A set of clubs, one bit per club (K ≤ 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClubMask(pub u64);

impl ClubMask {
    /// No club.
    pub const NONE: ClubMask = ClubMask(0);

    /// Just `club`.
    pub const fn one(club: u8) -> ClubMask {
        ClubMask(1u64 << (club % 64))
    }

    /// Clubs `0..k`.
    pub const fn all(k: u8) -> ClubMask {
        if k >= 64 {
            ClubMask(u64::MAX)
        } else {
            ClubMask((1u64 << k) - 1)
        }
    }

    /// Whether `club` is in the set.
    pub const fn contains(self, club: u8) -> bool {
        club < 64 && self.0 & (1u64 << club) != 0
    }

    /// Number of clubs in the set.
    pub const fn len(self) -> u32 {
        self.0.count_ones()
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Clubs in either set.
    pub const fn union(self, other: ClubMask) -> ClubMask {
        ClubMask(self.0 | other.0)
    }

    /// Clubs in both sets.
    pub const fn intersect(self, other: ClubMask) -> ClubMask {
        ClubMask(self.0 & other.0)
    }

    /// Clubs of `self` not in `other`.
    pub const fn minus(self, other: ClubMask) -> ClubMask {
        ClubMask(self.0 & !other.0)
    }

    /// The clubs in the set, lowest first.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let club = rest.trailing_zeros() as u8;
            rest &= rest - 1;
            Some(club)
        })
    }
}

/// Member → member: "push me these clubs" (or, with [`Join::mate`], "let us be club mates"),
/// repeated every second as the link's keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Join {
    /// Channel.
    pub channel: ChannelId,
    /// The cookie the receiver gave (zeros on first contact).
    pub cookie: CookieBytes,
    /// What the sender is.
    pub role: Role,
    /// The sender's club (`0xff`: every club).
    pub club: u8,
    /// Clubs the sender wants pushed.
    pub want: ClubMask,
    /// A club-mate link: both sides push their club to each other at once.
    pub mate: bool,
    /// The link is new: send the last few seconds of the granted clubs (catch-up).
    pub catch_up: bool,
    /// The sender is leaving the link: stop sending now.
    pub leaving: bool,
    /// With [`Join::mate`]: the sender's own club has not reached it on time while other
    /// clubs do (its mates do not reach a source); a member whose club flows may take it as
    /// a mate beyond its usual number.
    pub starving: bool,
    /// With [`Join::leaving`]: the sender leaves the swarm, not only this link; the receiver
    /// forgets it as a member to ask.
    pub departing: bool,
    /// Share of the sender's upload its seats leave free (0–255: none to all), where
    /// NACKs its own sources cannot serve do best. A claim: members check it by what the
    /// sender answers.
    pub spare: u8,
}

impl Join {
    /// Encoded length.
    pub const LEN: usize = 44;
    const MATE: u8 = 0x01;
    const CATCH_UP: u8 = 0x02;
    const LEAVING: u8 = 0x04;
    const STARVING: u8 = 0x08;
    const DEPARTING: u8 = 0x10;

    /// Parses a JOIN.
    pub fn parse(d: &[u8]) -> Result<Self, WireError> {
        let flags = parse_header_within(d, MessageType::Join, Self::LEN..=Self::LEN)?;
        let known = Self::MATE | Self::CATCH_UP | Self::LEAVING | Self::STARVING | Self::DEPARTING;
        if flags & !known != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        if d[35] != 0 {
            return Err(WireError::ReservedNonZero);
        }
        Ok(Join {
            channel: ChannelId(array(&d[4..12])),
            cookie: CookieBytes(array(&d[12..32])),
            role: Role::from_byte(d[32])?,
            club: d[33],
            want: ClubMask(be_u64(&d[36..44])),
            mate: flags & Self::MATE != 0,
            catch_up: flags & Self::CATCH_UP != 0,
            leaving: flags & Self::LEAVING != 0,
            starving: flags & Self::STARVING != 0,
            departing: flags & Self::DEPARTING != 0,
            spare: d[34],
        })
    }

    /// Encodes into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let flags = (if self.mate { Self::MATE } else { 0 })
            | (if self.catch_up { Self::CATCH_UP } else { 0 })
            | (if self.leaving { Self::LEAVING } else { 0 })
            | (if self.starving { Self::STARVING } else { 0 })
            | (if self.departing { Self::DEPARTING } else { 0 });
        let out = begin(buf, MessageType::Join, flags, Self::LEN)?;
        out[4..12].copy_from_slice(&self.channel.0);
        out[12..32].copy_from_slice(&self.cookie.0);
        out[32] = self.role as u8;
        out[33] = self.club;
        out[34] = self.spare;
        out[36..44].copy_from_slice(&self.want.0.to_be_bytes());
        Ok(Self::LEN)
    }
}

/// Member → member: the answer to a validated JOIN, or a refusal (nothing granted) to any JOIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// Channel.
    pub channel: ChannelId,
    /// Clubs the sender will push (empty: refused, e.g. its upload is taken).
    pub granted: ClubMask,
    /// What the sender is.
    pub role: Role,
    /// The sender's club.
    pub club: u8,
    /// The sender took the link as a club-mate link.
    pub mate: bool,
    /// Share of the sender's upload its seats leave free, as in [`Join::spare`].
    pub spare: u8,
}

impl Accept {
    /// Encoded length.
    pub const LEN: usize = 24;
    const MATE: u8 = 0x01;

    /// Parses an ACCEPT.
    pub fn parse(d: &[u8]) -> Result<Self, WireError> {
        let flags = parse_header_within(d, MessageType::Accept, Self::LEN..=Self::LEN)?;
        if flags & !Self::MATE != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        if d[23] != 0 {
            return Err(WireError::ReservedNonZero);
        }
        Ok(Accept {
            channel: ChannelId(array(&d[4..12])),
            granted: ClubMask(be_u64(&d[12..20])),
            role: Role::from_byte(d[20])?,
            club: d[21],
            mate: flags & Self::MATE != 0,
            spare: d[22],
        })
    }

    /// Encodes into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let flags = if self.mate { Self::MATE } else { 0 };
        let out = begin(buf, MessageType::Accept, flags, Self::LEN)?;
        out[4..12].copy_from_slice(&self.channel.0);
        out[12..20].copy_from_slice(&self.granted.0.to_be_bytes());
        out[20] = self.role as u8;
        out[21] = self.club;
        out[22] = self.spare;
        Ok(Self::LEN)
    }
}

/// Member → upstream: these pieces are missing, resend them if they can still play in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nack {
    /// Channel.
    pub channel: ChannelId,
    /// The first sequence number the bitmap covers.
    pub base: u64,
    /// Bit `i` set: piece `base + i` is missing.
    pub missing: u64,
}

impl Nack {
    /// Encoded length.
    pub const LEN: usize = 28;

    /// Parses a NACK.
    pub fn parse(d: &[u8]) -> Result<Self, WireError> {
        let flags = parse_header_within(d, MessageType::Nack, Self::LEN..=Self::LEN)?;
        if flags != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        Ok(Nack {
            channel: ChannelId(array(&d[4..12])),
            base: be_u64(&d[12..20]),
            missing: be_u64(&d[20..28]),
        })
    }

    /// Encodes into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let out = begin(buf, MessageType::Nack, 0, Self::LEN)?;
        out[4..12].copy_from_slice(&self.channel.0);
        out[12..20].copy_from_slice(&self.base.to_be_bytes());
        out[20..28].copy_from_slice(&self.missing.to_be_bytes());
        Ok(Self::LEN)
    }

    /// The missing sequence numbers, lowest first.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        (0..64u64)
            .filter(|i| self.missing & (1 << i) != 0)
            .map(|i| self.base.saturating_add(i))
    }
}

/// One acknowledged piece: its sequence number and when it arrived, in µs of the receiver's
/// clock (the sender subtracts its own send time: a constant clock offset cancels out against
/// the base delay of LEDBAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckEntry {
    /// Sequence number.
    pub seq: u64,
    /// Arrival time, receiver's µs.
    pub received_us: u64,
}

/// Downstream → upstream: pieces that arrived, viewed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack<'a> {
    bytes: &'a [u8],
}

impl<'a> Ack<'a> {
    const FIXED: usize = 16;
    const ENTRY: usize = 16;
    /// Most entries in one ACK.
    pub const MAX: usize = 32;

    /// Parses an ACK.
    pub fn parse(d: &'a [u8]) -> Result<Self, WireError> {
        let flags = parse_header_within(
            d,
            MessageType::Ack,
            Self::FIXED..=Self::FIXED + Self::MAX * Self::ENTRY,
        )?;
        if flags != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        let count = usize::from(d[12]);
        if d[13..16] != [0, 0, 0] {
            return Err(WireError::ReservedNonZero);
        }
        if count > Self::MAX || d.len() != Self::FIXED + count * Self::ENTRY {
            return Err(WireError::WrongLength {
                kind: MessageType::Ack,
                expected: Self::FIXED + count.min(Self::MAX) * Self::ENTRY,
                actual: d.len(),
            });
        }
        Ok(Ack { bytes: d })
    }

    /// The channel.
    pub fn channel(&self) -> ChannelId {
        ChannelId(array(&self.bytes[4..12]))
    }

    /// The entries.
    pub fn iter(&self) -> impl Iterator<Item = AckEntry> + 'a {
        self.bytes[Self::FIXED..]
            .chunks_exact(Self::ENTRY)
            .map(|e| AckEntry {
                seq: be_u64(&e[..8]),
                received_us: be_u64(&e[8..16]),
            })
    }

    /// Writes an ACK of `entries` (at most [`Ack::MAX`]) into `buf`.
    pub fn encode(
        channel: ChannelId,
        entries: &[AckEntry],
        buf: &mut [u8],
    ) -> Result<usize, WireError> {
        if entries.len() > Self::MAX {
            return Err(WireError::PayloadTooLarge(entries.len()));
        }
        let len = Self::FIXED + entries.len() * Self::ENTRY;
        let out = begin(buf, MessageType::Ack, 0, len)?;
        out[4..12].copy_from_slice(&channel.0);
        out[12] = entries.len() as u8;
        for (e, a) in out[Self::FIXED..]
            .chunks_exact_mut(Self::ENTRY)
            .zip(entries)
        {
            e[..8].copy_from_slice(&a.seq.to_be_bytes());
            e[8..16].copy_from_slice(&a.received_us.to_be_bytes());
        }
        Ok(len)
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Message, MAX_DATAGRAM};

    #[test]
    fn swarm_messages_round_trip_and_refuse_junk() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let j = Join {
            channel: ChannelId([1; 8]),
            cookie: CookieBytes([2; 20]),
            role: Role::Peer,
            club: 3,
            want: ClubMask(0b1010),
            mate: true,
            catch_up: true,
            leaving: true,
            starving: true,
            departing: true,
            spare: 200,
        };
        let n = j.encode(&mut buf).unwrap();
        assert_eq!(Message::parse(&buf[..n]), Ok(Message::Join(j)));
        buf[35] = 1;
        assert_eq!(Join::parse(&buf[..n]), Err(WireError::ReservedNonZero));
        buf[35] = 0;
        buf[2] |= 0x80;
        assert!(Join::parse(&buf[..n]).is_err(), "unknown flag");

        let a = Accept {
            channel: ChannelId([1; 8]),
            granted: ClubMask::one(5),
            role: Role::Relay,
            club: 0xff,
            mate: false,
            spare: 17,
        };
        let n = a.encode(&mut buf).unwrap();
        assert_eq!(Message::parse(&buf[..n]), Ok(Message::Accept(a)));
        buf[23] = 1;
        assert_eq!(Accept::parse(&buf[..n]), Err(WireError::ReservedNonZero));

        let k = Nack {
            channel: ChannelId([1; 8]),
            base: 100,
            missing: 0b101,
        };
        let n = k.encode(&mut buf).unwrap();
        assert_eq!(Message::parse(&buf[..n]), Ok(Message::Nack(k)));
        assert_eq!(k.seqs().collect::<Vec<_>>(), vec![100, 102]);

        let entries: Vec<AckEntry> = (0..Ack::MAX as u64)
            .map(|i| AckEntry {
                seq: 1000 + i,
                received_us: 5_000 + i * 7,
            })
            .collect();
        let n = Ack::encode(ChannelId([4; 8]), &entries, &mut buf).unwrap();
        let Ok(Message::Ack(parsed)) = Message::parse(&buf[..n]) else {
            panic!("ack did not parse")
        };
        assert_eq!(parsed.channel(), ChannelId([4; 8]));
        assert_eq!(parsed.iter().collect::<Vec<_>>(), entries);
        assert!(Ack::parse(&buf[..n - 1]).is_err(), "truncated");
        buf[12] = 40;
        assert!(Ack::parse(&buf[..n]).is_err(), "count beyond MAX");
    }

    #[test]
    fn club_masks() {
        let m = ClubMask::all(4);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(ClubMask::all(64).len(), 64);
        assert!(m.contains(3) && !m.contains(4) && !m.contains(200));
        assert_eq!(m.minus(ClubMask::one(1)).len(), 3);
        let sparse = ClubMask::one(63)
            .union(ClubMask::one(5))
            .union(ClubMask::one(0));
        assert_eq!(sparse.iter().collect::<Vec<_>>(), vec![0, 5, 63]);
        assert_eq!(ClubMask::all(64).iter().count(), 64);
        assert_eq!(ClubMask::NONE.iter().count(), 0);
    }
}
