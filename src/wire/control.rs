//! Control messages: address validation, subscriptions and channel announces.
//!
//! All share a 4-byte header: magic `0xC1`, type, flags, one reserved zero byte. Each has a
//! fixed length, chosen so that a relay's reply to a not-yet-validated address is never larger
//! than the request that caused it (HELLO and SUBSCRIBE are 32 bytes; COOKIE is 32).

use super::SIGNATURE_LEN;
use super::{array, be_u64, out_slice, ChannelId, MessageType, WireError, MAGIC_V1};

const HEADER_LEN: usize = 4;

// Anti-amplification, by construction: what a relay sends to an address it has not validated
// (COOKIE, SUBSCRIBED, ANNOUNCED) is never larger than the request that caused it.
const _: () = assert!(Cookie::LEN <= Hello::LEN && Cookie::LEN <= Subscription::LEN);
const _: () = assert!(Subscribed::LEN <= Subscription::LEN && Announced::LEN <= Announce::LEN);

/// Checks the fixed header and length of a control message, returning its flags byte.
fn parse_header(datagram: &[u8], kind: MessageType, len: usize) -> Result<u8, WireError> {
    parse_header_within(datagram, kind, len..=len)
}

/// Like [`parse_header`] for a message whose length lies in `lens`.
pub(super) fn parse_header_within(
    datagram: &[u8],
    kind: MessageType,
    lens: std::ops::RangeInclusive<usize>,
) -> Result<u8, WireError> {
    if datagram.len() < 2 {
        return Err(WireError::TooShort(datagram.len()));
    }
    if datagram[0] != MAGIC_V1 {
        return Err(WireError::BadMagic(datagram[0]));
    }
    if datagram[1] != kind as u8 {
        return Err(WireError::UnknownType(datagram[1]));
    }
    if !lens.contains(&datagram.len()) {
        return Err(WireError::WrongLength {
            kind,
            expected: *lens.start(),
            actual: datagram.len(),
        });
    }
    if datagram[3] != 0 {
        return Err(WireError::ReservedNonZero);
    }
    Ok(datagram[2])
}

/// Refuses any flag bit on messages that define none.
fn no_flags(flags: u8) -> Result<(), WireError> {
    match flags {
        0 => Ok(()),
        f => Err(WireError::UnknownFlags(f)),
    }
}

/// Writes the header and returns the message's slice of `buf`, zeroed after the header.
pub(super) fn begin(
    buf: &mut [u8],
    kind: MessageType,
    flags: u8,
    len: usize,
) -> Result<&mut [u8], WireError> {
    let out = out_slice(buf, len)?;
    out.fill(0);
    out[0] = MAGIC_V1;
    out[1] = kind as u8;
    out[2] = flags;
    Ok(out)
}

/// Client → relay: asks for a cookie. Padded to the size of the COOKIE it earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Channel the client intends to subscribe to.
    pub channel: ChannelId,
    /// Client's nonce, echoed in the COOKIE.
    pub nonce: u64,
}

impl Hello {
    /// Encoded length (12 bytes of zero padding at the end).
    pub const LEN: usize = 32;

    /// Parses a HELLO.
    pub fn parse(d: &[u8]) -> Result<Self, WireError> {
        no_flags(parse_header(d, MessageType::Hello, Self::LEN)?)?;
        if d[20..].iter().any(|&b| b != 0) {
            return Err(WireError::ReservedNonZero);
        }
        Ok(Hello {
            channel: ChannelId(array(&d[4..12])),
            nonce: be_u64(&d[12..20]),
        })
    }

    /// Encodes into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let out = begin(buf, MessageType::Hello, 0, Self::LEN)?;
        out[4..12].copy_from_slice(&self.channel.0);
        out[12..20].copy_from_slice(&self.nonce.to_be_bytes());
        Ok(Self::LEN)
    }
}

/// A stateless address-validation cookie: a time bucket and a keyed hash of address and bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CookieBytes(pub [u8; 20]);

/// Relay → client: the cookie to echo in SUBSCRIBE and KEEPALIVE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cookie {
    /// The nonce of the HELLO this answers (zero when it answers a SUBSCRIBE or KEEPALIVE).
    pub nonce: u64,
    /// The cookie.
    pub cookie: CookieBytes,
}

impl Cookie {
    /// Encoded length.
    pub const LEN: usize = 32;

    /// Parses a COOKIE.
    pub fn parse(d: &[u8]) -> Result<Self, WireError> {
        no_flags(parse_header(d, MessageType::Cookie, Self::LEN)?)?;
        Ok(Cookie {
            nonce: be_u64(&d[4..12]),
            cookie: CookieBytes(array(&d[12..32])),
        })
    }

    /// Encodes into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let out = begin(buf, MessageType::Cookie, 0, Self::LEN)?;
        out[4..12].copy_from_slice(&self.nonce.to_be_bytes());
        out[12..32].copy_from_slice(&self.cookie.0);
        Ok(Self::LEN)
    }
}

/// SUBSCRIBE, KEEPALIVE and UNSUBSCRIBE share this body: a channel and the echoed cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// Channel.
    pub channel: ChannelId,
    /// Cookie from the relay.
    pub cookie: CookieBytes,
}

impl Subscription {
    /// Encoded length.
    pub const LEN: usize = 32;

    /// Parses a message of type `kind` (SUBSCRIBE, KEEPALIVE or UNSUBSCRIBE).
    pub fn parse(d: &[u8], kind: MessageType) -> Result<Self, WireError> {
        no_flags(parse_header(d, kind, Self::LEN)?)?;
        Ok(Subscription {
            channel: ChannelId(array(&d[4..12])),
            cookie: CookieBytes(array(&d[12..32])),
        })
    }

    /// Encodes as a message of type `kind`.
    pub fn encode(&self, kind: MessageType, buf: &mut [u8]) -> Result<usize, WireError> {
        let out = begin(buf, kind, 0, Self::LEN)?;
        out[4..12].copy_from_slice(&self.channel.0);
        out[12..32].copy_from_slice(&self.cookie.0);
        Ok(Self::LEN)
    }
}

/// Relay → client: the subscription is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribed {
    /// Channel.
    pub channel: ChannelId,
    /// Whether the relay has seen the channel's publisher (else it waits for it).
    pub live: bool,
}

impl Subscribed {
    /// Encoded length.
    pub const LEN: usize = 12;
    const LIVE: u8 = 0x01;

    /// Parses a SUBSCRIBED.
    pub fn parse(d: &[u8]) -> Result<Self, WireError> {
        let flags = parse_header(d, MessageType::Subscribed, Self::LEN)?;
        if flags & !Self::LIVE != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        Ok(Subscribed {
            channel: ChannelId(array(&d[4..12])),
            live: flags & Self::LIVE != 0,
        })
    }

    /// Encodes into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let flags = if self.live { Self::LIVE } else { 0 };
        let out = begin(buf, MessageType::Subscribed, flags, Self::LEN)?;
        out[4..12].copy_from_slice(&self.channel.0);
        Ok(Self::LEN)
    }
}

/// Publisher → relay: the channel's public key and session epoch, signed by that key.
///
/// The signature covers the first 44 bytes (header, epoch, key). A relay learns the key that
/// verifies the channel's pieces from it; a newer epoch starts a new sequence space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce<'a> {
    bytes: &'a [u8],
}

impl<'a> Announce<'a> {
    /// Encoded length.
    pub const LEN: usize = HEADER_LEN + 8 + 32 + SIGNATURE_LEN;
    const SIGNED_LEN: usize = HEADER_LEN + 8 + 32;

    /// Parses an ANNOUNCE (layout only; the signature is checked by the receiver).
    pub fn parse(d: &'a [u8]) -> Result<Self, WireError> {
        no_flags(parse_header(d, MessageType::Announce, Self::LEN)?)?;
        Ok(Announce { bytes: d })
    }

    /// Writes an ANNOUNCE for `public_key` and `epoch_us`, signed by `sign`.
    pub fn encode_signed(
        epoch_us: u64,
        public_key: &[u8; 32],
        buf: &mut [u8],
        sign: impl FnOnce(&[u8]) -> [u8; SIGNATURE_LEN],
    ) -> Result<usize, WireError> {
        let out = begin(buf, MessageType::Announce, 0, Self::LEN)?;
        out[4..12].copy_from_slice(&epoch_us.to_be_bytes());
        out[12..44].copy_from_slice(public_key);
        let signature = sign(&out[..Self::SIGNED_LEN]);
        out[Self::SIGNED_LEN..].copy_from_slice(&signature);
        Ok(Self::LEN)
    }

    /// Copies the announce as it is into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        out_slice(buf, Self::LEN)?.copy_from_slice(self.bytes);
        Ok(Self::LEN)
    }

    /// Publisher session epoch (µs of its wall clock when the session began).
    pub fn epoch_us(&self) -> u64 {
        be_u64(&self.bytes[4..12])
    }

    /// The channel's Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        array(&self.bytes[12..44])
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> &'a [u8] {
        &self.bytes[..Self::SIGNED_LEN]
    }

    /// The signature.
    pub fn signature(&self) -> [u8; SIGNATURE_LEN] {
        array(&self.bytes[Self::SIGNED_LEN..])
    }
}

/// Relay → publisher: the announce for this channel and epoch is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// Channel.
    pub channel: ChannelId,
    /// Epoch accepted.
    pub epoch_us: u64,
}

impl Announced {
    /// Encoded length.
    pub const LEN: usize = 20;

    /// Parses an ANNOUNCED.
    pub fn parse(d: &[u8]) -> Result<Self, WireError> {
        no_flags(parse_header(d, MessageType::Announced, Self::LEN)?)?;
        Ok(Announced {
            channel: ChannelId(array(&d[4..12])),
            epoch_us: be_u64(&d[12..20]),
        })
    }

    /// Encodes into `buf`.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let out = begin(buf, MessageType::Announced, 0, Self::LEN)?;
        out[4..12].copy_from_slice(&self.channel.0);
        out[12..20].copy_from_slice(&self.epoch_us.to_be_bytes());
        Ok(Self::LEN)
    }
}
