//! The data piece: a 32-byte header, the payload, and a 64-byte signature over header‖payload.
//!
//! | bytes  | field |
//! |--------|-------|
//! | 0      | magic/version `0xC1` |
//! | 1      | type `DATA` (`0x01`) |
//! | 2      | flags ([`PieceFlags`]) |
//! | 3      | club |
//! | 4..12  | channel id |
//! | 12..20 | sequence number |
//! | 20..28 | publish time, µs of the publisher's wall clock |
//! | 28..30 | payload length |
//! | 30..32 | reserved, zero |
//!
//! The signature covers the header and payload exactly as they sit in the datagram, so a
//! receiver verifies in place with no copy; the leading magic and type bytes separate the
//! domain of piece signatures from every other message a channel key signs.

use super::{array, be_u64, out_slice, ChannelId, MessageType, WireError, MAGIC_V1};
use super::{MAX_DATAGRAM, SIGNATURE_LEN};

/// Flags byte of a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PieceFlags(u8);

impl PieceFlags {
    /// The payload starts with a keyframe (a good place to join).
    pub const KEYFRAME: PieceFlags = PieceFlags(0x01);
    /// The payload is encrypted with the channel's content key.
    pub const ENCRYPTED: PieceFlags = PieceFlags(0x02);
    /// The last piece of the stream: the publisher has ended it.
    pub const END_OF_STREAM: PieceFlags = PieceFlags(0x04);
    const KNOWN: u8 = 0x07;

    /// No flags.
    pub const fn empty() -> Self {
        PieceFlags(0)
    }

    /// Flags from a byte, refusing bits v1 does not define.
    pub fn from_bits(bits: u8) -> Result<Self, WireError> {
        if bits & !Self::KNOWN != 0 {
            return Err(WireError::UnknownFlags(bits));
        }
        Ok(PieceFlags(bits))
    }

    /// The raw byte.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// These flags with those of `other` cleared.
    pub const fn without(self, other: PieceFlags) -> PieceFlags {
        PieceFlags(self.0 & !other.0)
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: PieceFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for PieceFlags {
    type Output = PieceFlags;
    fn bitor(self, rhs: PieceFlags) -> PieceFlags {
        PieceFlags(self.0 | rhs.0)
    }
}

/// The fields a publisher chooses for a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceHeader {
    /// Flags.
    pub flags: PieceFlags,
    /// Club this piece belongs to (`seq % K`).
    pub club: u8,
    /// Channel.
    pub channel: ChannelId,
    /// Sequence number.
    pub seq: u64,
    /// Publish time, µs of the publisher's wall clock.
    pub publish_time_us: u64,
}

impl PieceHeader {
    /// Bytes of the header.
    pub const LEN: usize = 32;
    /// Largest payload a piece can carry within [`MAX_DATAGRAM`].
    pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - Self::LEN - SIGNATURE_LEN;

    /// Writes header, payload and the signature `sign` returns over them into `buf`, returning
    /// the piece's length. `sign` receives exactly the bytes a verifier will check.
    pub fn encode(
        &self,
        payload: &[u8],
        buf: &mut [u8],
        sign: impl FnOnce(&[u8]) -> [u8; SIGNATURE_LEN],
    ) -> Result<usize, WireError> {
        if payload.len() > Self::MAX_PAYLOAD {
            return Err(WireError::PayloadTooLarge(payload.len()));
        }
        let signed_len = Self::LEN + payload.len();
        let total = signed_len + SIGNATURE_LEN;
        let out = out_slice(buf, total)?;
        out[0] = MAGIC_V1;
        out[1] = MessageType::Data as u8;
        out[2] = self.flags.bits();
        out[3] = self.club;
        out[4..12].copy_from_slice(&self.channel.0);
        out[12..20].copy_from_slice(&self.seq.to_be_bytes());
        out[20..28].copy_from_slice(&self.publish_time_us.to_be_bytes());
        // MAX_PAYLOAD < 65536, checked above.
        out[28..30].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        out[30..32].fill(0);
        out[Self::LEN..signed_len].copy_from_slice(payload);
        let signature = sign(&out[..signed_len]);
        out[signed_len..total].copy_from_slice(&signature);
        Ok(total)
    }
}

/// A data piece viewed in place. Construct with [`Piece::parse`]; every accessor is infallible
/// because parsing checked the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<'a> {
    bytes: &'a [u8],
}

impl<'a> Piece<'a> {
    /// Smallest piece: header and signature, empty payload.
    pub const MIN_LEN: usize = PieceHeader::LEN + SIGNATURE_LEN;

    /// Checks the layout of a data piece (not its signature).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(WireError::TooShort(bytes.len()));
        }
        if bytes[0] != MAGIC_V1 {
            return Err(WireError::BadMagic(bytes[0]));
        }
        if bytes[1] != MessageType::Data as u8 {
            return Err(WireError::UnknownType(bytes[1]));
        }
        PieceFlags::from_bits(bytes[2])?;
        if bytes[30] != 0 || bytes[31] != 0 {
            return Err(WireError::ReservedNonZero);
        }
        let declared = usize::from(u16::from_be_bytes([bytes[28], bytes[29]]));
        let actual = bytes.len() - Self::MIN_LEN;
        if declared > PieceHeader::MAX_PAYLOAD {
            return Err(WireError::PayloadTooLarge(declared));
        }
        if declared != actual {
            return Err(WireError::LengthMismatch { declared, actual });
        }
        Ok(Piece { bytes })
    }

    /// The whole piece as received.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The header fields.
    pub fn header(&self) -> PieceHeader {
        PieceHeader {
            flags: self.flags(),
            club: self.bytes[3],
            channel: self.channel(),
            seq: self.seq(),
            publish_time_us: self.publish_time_us(),
        }
    }

    /// Flags.
    pub fn flags(&self) -> PieceFlags {
        PieceFlags(self.bytes[2])
    }

    /// Channel id.
    pub fn channel(&self) -> ChannelId {
        ChannelId(array(&self.bytes[4..12]))
    }

    /// Sequence number.
    pub fn seq(&self) -> u64 {
        be_u64(&self.bytes[12..20])
    }

    /// Publish time, µs of the publisher's wall clock.
    pub fn publish_time_us(&self) -> u64 {
        be_u64(&self.bytes[20..28])
    }

    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[PieceHeader::LEN..self.signed_len()]
    }

    /// The bytes the signature covers: header and payload.
    pub fn signed_bytes(&self) -> &'a [u8] {
        &self.bytes[..self.signed_len()]
    }

    /// The signature.
    pub fn signature(&self) -> [u8; SIGNATURE_LEN] {
        array(&self.bytes[self.signed_len()..])
    }

    fn signed_len(&self) -> usize {
        self.bytes.len() - SIGNATURE_LEN
    }
}
