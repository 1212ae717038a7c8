//! The v1 wire format: data pieces and control messages.
//!
//! Every datagram starts with the magic/version byte `0xC1` and a type byte. Parsing is
//! zero-copy (views borrow the received buffer) and total: any byte string yields a message or
//! a [`WireError`], never a panic. Encoding writes into a caller's buffer and never allocates.
//! This module knows nothing of keys or sockets: signatures are opaque 64-byte fields here and
//! are produced and checked in [`crate::crypto`].

mod control;
mod piece;
mod swarm;
mod tracker;

pub use control::{Announce, Announced, Cookie, CookieBytes, Hello, Subscribed, Subscription};
pub use piece::{Piece, PieceFlags, PieceHeader};
pub use swarm::{Accept, Ack, AckEntry, ClubMask, Join, Nack};
pub use tracker::{Descriptor, PeerEntry, Peers, Role, TrackerAnnounce};

/// Magic and version byte that opens every v1 datagram.
pub const MAGIC_V1: u8 = 0xC1;
/// Largest datagram clubcast sends: fits the IPv6 minimum MTU (1280) minus IP and UDP headers.
pub const MAX_DATAGRAM: usize = 1232;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The 8-byte channel id: the first 8 bytes of BLAKE3 of the publisher's public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChannelId(pub [u8; 8]);

impl std::fmt::Display for ChannelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The type byte (offset 1) of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// A signed data piece.
    Data = 0x01,
    /// Client → relay: ask for a cookie.
    Hello = 0x10,
    /// Relay → client: a stateless address-validation cookie.
    Cookie = 0x11,
    /// Client → relay: subscribe to a channel, echoing a cookie.
    Subscribe = 0x12,
    /// Relay → client: the subscription is in place.
    Subscribed = 0x13,
    /// Client → relay: consent freshness for an existing subscription.
    Keepalive = 0x14,
    /// Client → relay: end a subscription now.
    Unsubscribe = 0x15,
    /// Publisher → relay: a channel's public key, self-signed.
    Announce = 0x20,
    /// Relay → publisher: the announce was accepted.
    Announced = 0x21,
    /// Member → tracker: in this channel, who else is?
    TrackerAnnounce = 0x30,
    /// Tracker → member: members of the channel.
    Peers = 0x31,
    /// Publisher → tracker → members: the channel's signed descriptor.
    Descriptor = 0x32,
    /// Member → member: push me these clubs / be my club mate (and keepalive).
    Join = 0x40,
    /// Member → member: what a JOIN was granted.
    Accept = 0x41,
    /// Downstream → upstream: resend these pieces.
    Nack = 0x42,
    /// Downstream → upstream: these pieces arrived, at these times.
    Ack = 0x43,
}

impl MessageType {
    /// The type for a type byte, if v1 defines one.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => MessageType::Data,
            0x10 => MessageType::Hello,
            0x11 => MessageType::Cookie,
            0x12 => MessageType::Subscribe,
            0x13 => MessageType::Subscribed,
            0x14 => MessageType::Keepalive,
            0x15 => MessageType::Unsubscribe,
            0x20 => MessageType::Announce,
            0x21 => MessageType::Announced,
            0x30 => MessageType::TrackerAnnounce,
            0x31 => MessageType::Peers,
            0x32 => MessageType::Descriptor,
            0x40 => MessageType::Join,
            0x41 => MessageType::Accept,
            0x42 => MessageType::Nack,
            0x43 => MessageType::Ack,
            _ => return None,
        })
    }
}

/// Why a byte string is not a valid v1 message, or why a message does not fit a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the smallest message.
    #[error("datagram too short ({0} bytes)")]
    TooShort(usize),
    /// First byte is not the v1 magic.
    #[error("bad magic/version byte {0:#04x}")]
    BadMagic(u8),
    /// Type byte unknown to v1.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// A fixed-size message with the wrong length.
    #[error("{kind:?} must be {expected} bytes, got {actual}")]
    WrongLength {
        /// Which message.
        kind: MessageType,
        /// Its fixed length.
        expected: usize,
        /// The datagram's length.
        actual: usize,
    },
    /// A piece whose payload-length field disagrees with the datagram length.
    #[error("piece declares {declared} payload bytes but carries {actual}")]
    LengthMismatch {
        /// Payload length from the header.
        declared: usize,
        /// Payload bytes present.
        actual: usize,
    },
    /// More payload than fits a datagram.
    #[error("payload of {0} bytes exceeds the datagram budget")]
    PayloadTooLarge(usize),
    /// Reserved bytes that must be zero are not.
    #[error("reserved bytes are not zero")]
    ReservedNonZero,
    /// Flag bits v1 does not define.
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    /// The caller's buffer cannot hold the encoded message.
    #[error("buffer of {available} bytes cannot hold {needed}")]
    BufferTooSmall {
        /// Bytes the message needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
}

/// Any v1 message, viewed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A signed data piece.
    Piece(Piece<'a>),
    /// Cookie request.
    Hello(Hello),
    /// Cookie reply.
    Cookie(Cookie),
    /// Subscribe with a cookie.
    Subscribe(Subscription),
    /// Subscription confirmed.
    Subscribed(Subscribed),
    /// Keep a subscription alive.
    Keepalive(Subscription),
    /// End a subscription.
    Unsubscribe(Subscription),
    /// Channel announce.
    Announce(Announce<'a>),
    /// Announce accepted.
    Announced(Announced),
    /// Member → tracker announce.
    TrackerAnnounce(TrackerAnnounce),
    /// Tracker's peer list.
    Peers(Peers<'a>),
    /// Signed channel descriptor.
    Descriptor(Descriptor<'a>),
    /// Swarm link request or keepalive.
    Join(Join),
    /// Swarm link answer.
    Accept(Accept),
    /// Repair request.
    Nack(Nack),
    /// Arrival report.
    Ack(Ack<'a>),
}

impl<'a> Message<'a> {
    /// Parses one datagram. Total: returns an error for every input that is not a v1 message.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, WireError> {
        let kind = peek_type(datagram)?;
        Ok(match kind {
            MessageType::Data => Message::Piece(Piece::parse(datagram)?),
            MessageType::Hello => Message::Hello(Hello::parse(datagram)?),
            MessageType::Cookie => Message::Cookie(Cookie::parse(datagram)?),
            MessageType::Subscribe => {
                Message::Subscribe(Subscription::parse(datagram, MessageType::Subscribe)?)
            }
            MessageType::Subscribed => Message::Subscribed(Subscribed::parse(datagram)?),
            MessageType::Keepalive => {
                Message::Keepalive(Subscription::parse(datagram, MessageType::Keepalive)?)
            }
            MessageType::Unsubscribe => {
                Message::Unsubscribe(Subscription::parse(datagram, MessageType::Unsubscribe)?)
            }
            MessageType::Announce => Message::Announce(Announce::parse(datagram)?),
            MessageType::Announced => Message::Announced(Announced::parse(datagram)?),
            MessageType::TrackerAnnounce => {
                Message::TrackerAnnounce(TrackerAnnounce::parse(datagram)?)
            }
            MessageType::Peers => Message::Peers(Peers::parse(datagram)?),
            MessageType::Descriptor => Message::Descriptor(Descriptor::parse(datagram)?),
            MessageType::Join => Message::Join(Join::parse(datagram)?),
            MessageType::Accept => Message::Accept(Accept::parse(datagram)?),
            MessageType::Nack => Message::Nack(Nack::parse(datagram)?),
            MessageType::Ack => Message::Ack(Ack::parse(datagram)?),
        })
    }

    /// Encodes the message into `buf`, returning its length. Pieces are copied as they are.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        match self {
            Message::Piece(p) => {
                let bytes = p.as_bytes();
                let out = out_slice(buf, bytes.len())?;
                out.copy_from_slice(bytes);
                Ok(bytes.len())
            }
            Message::Hello(m) => m.encode(buf),
            Message::Cookie(m) => m.encode(buf),
            Message::Subscribe(m) => m.encode(MessageType::Subscribe, buf),
            Message::Subscribed(m) => m.encode(buf),
            Message::Keepalive(m) => m.encode(MessageType::Keepalive, buf),
            Message::Unsubscribe(m) => m.encode(MessageType::Unsubscribe, buf),
            Message::Announce(m) => m.encode(buf),
            Message::Announced(m) => m.encode(buf),
            Message::TrackerAnnounce(m) => m.encode(buf),
            Message::Peers(m) => {
                let bytes = m.as_bytes();
                let out = out_slice(buf, bytes.len())?;
                out.copy_from_slice(bytes);
                Ok(bytes.len())
            }
            Message::Descriptor(d) => {
                let bytes = d.as_bytes();
                let out = out_slice(buf, bytes.len())?;
                out.copy_from_slice(bytes);
                Ok(bytes.len())
            }
            Message::Join(m) => m.encode(buf),
            Message::Accept(m) => m.encode(buf),
            Message::Nack(m) => m.encode(buf),
            Message::Ack(m) => {
                let bytes = m.as_bytes();
                let out = out_slice(buf, bytes.len())?;
                out.copy_from_slice(bytes);
                Ok(bytes.len())
            }
        }
    }
}

/// Reads the magic and type bytes without parsing the rest.
pub fn peek_type(datagram: &[u8]) -> Result<MessageType, WireError> {
    match datagram {
        [] | [_] => Err(WireError::TooShort(datagram.len())),
        [MAGIC_V1, t, ..] => MessageType::from_byte(*t).ok_or(WireError::UnknownType(*t)),
        [m, ..] => Err(WireError::BadMagic(*m)),
    }
}

/// The first `len` bytes of `buf`, or a typed error when it is too small.
fn out_slice(buf: &mut [u8], len: usize) -> Result<&mut [u8], WireError> {
    let available = buf.len();
    buf.get_mut(..len).ok_or(WireError::BufferTooSmall {
        needed: len,
        available,
    })
}

/// Big-endian reads from a slice whose length the caller has checked.
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

#[cfg(test)]
mod tests;
