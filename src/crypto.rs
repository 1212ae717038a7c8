//! Channel keys and signatures: Ed25519 keys, per-piece signing, single and batch verification.
//!
//! A channel *is* its publisher's public key; the 8-byte [`ChannelId`] on the wire is the
//! first 8 bytes of its BLAKE3 hash. Secret keys live in a file of 64 hex digits, mode 0600.
//! Nothing here touches the network; verification works on the views [`crate::wire`] parses.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::wire::{Announce, ChannelId, Descriptor, Piece, SIGNATURE_LEN};

/// Errors from keys and signatures.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A signature does not verify (or one in a batch does not).
    #[error("bad signature")]
    BadSignature,
    /// An encrypted payload that this content key cannot open (wrong key or altered).
    #[error("cannot decrypt: wrong content key, or the payload was altered")]
    Undecryptable,
    /// Bytes that are not a valid Ed25519 public key.
    #[error("not a valid Ed25519 public key")]
    InvalidPublicKey,
    /// Text that is not the expected number of hex digits.
    #[error("expected {expected} hex digits, got {got:?}")]
    BadHex {
        /// Digits expected.
        expected: usize,
        /// What was given (possibly shortened).
        got: String,
    },
    /// Reading or writing a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A secret key file that others may read.
    #[error("key file {path} is accessible by other users (mode {mode:o}); run: chmod 600 {path}")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a key.
    #[error("key file {path} does not hold a clubcast channel key: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A channel's public key: what viewers name a channel by and relays verify pieces with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelPublicKey {
    key: VerifyingKey,
    id: ChannelId,
}

impl ChannelPublicKey {
    /// A public key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, CryptoError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| CryptoError::InvalidPublicKey)?;
        Ok(Self::from_verifying_key(key))
    }

    /// A public key from 64 hex digits (the form `keygen` prints).
    pub fn from_hex(text: &str) -> Result<Self, CryptoError> {
        Self::from_bytes(&decode_hex::<32>(text.trim())?)
    }

    fn from_verifying_key(key: VerifyingKey) -> Self {
        let id = channel_id(key.as_bytes());
        ChannelPublicKey { key, id }
    }

    /// The 32 key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The wire channel id.
    pub fn channel_id(&self) -> ChannelId {
        self.id
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        encode_hex(self.key.as_bytes())
    }

    /// Verifies one piece's signature. The caller checks that the piece names this channel.
    pub fn verify_piece(&self, piece: &Piece<'_>) -> Result<(), CryptoError> {
        self.verify(piece.signed_bytes(), &piece.signature())
    }

    fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> Result<(), CryptoError> {
        let sig = Signature::from_bytes(signature);
        // verify_strict refuses small-order keys and malleable signatures.
        self.key
            .verify_strict(message, &sig)
            .map_err(|_| CryptoError::BadSignature)
    }
}

impl std::fmt::Display for ChannelPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The wire channel id of a public key: the first 8 bytes of its BLAKE3 hash.
pub fn channel_id(public_key: &[u8; 32]) -> ChannelId {
    let h = blake3::hash(public_key);
    let mut id = [0u8; 8];
    id.copy_from_slice(&h.as_bytes()[..8]);
    ChannelId(id)
}

/// Checks an ANNOUNCE: its signature must verify under the key it carries.
pub fn verify_announce(announce: &Announce<'_>) -> Result<ChannelPublicKey, CryptoError> {
    let key = ChannelPublicKey::from_bytes(&announce.public_key())?;
    key.verify(announce.signed_bytes(), &announce.signature())?;
    Ok(key)
}

/// Checks a channel descriptor's signature against the key it names; that key.
pub fn verify_descriptor(d: &Descriptor<'_>) -> Result<ChannelPublicKey, CryptoError> {
    let key = ChannelPublicKey::from_bytes(&d.public_key())?;
    key.verify(d.signed_bytes(), &d.signature())?;
    Ok(key)
}

/// Verifies many pieces at once (about twice the speed of one by one). `Ok` means every
/// signature is good; on `Err` at least one is bad and the caller verifies them singly to
/// find which.
pub fn verify_batch(pieces: &[(Piece<'_>, ChannelPublicKey)]) -> Result<(), CryptoError> {
    match pieces {
        [] => Ok(()),
        [(piece, key)] => key.verify_piece(piece),
        _ => {
            let messages: Vec<&[u8]> = pieces.iter().map(|(p, _)| p.signed_bytes()).collect();
            let signatures: Vec<Signature> = pieces
                .iter()
                .map(|(p, _)| Signature::from_bytes(&p.signature()))
                .collect();
            let keys: Vec<VerifyingKey> = pieces.iter().map(|(_, k)| k.key).collect();
            ed25519_dalek::verify_batch(&messages, &signatures, &keys)
                .map_err(|_| CryptoError::BadSignature)
        }
    }
}

/// A channel's secret key: signs pieces and announces.
pub struct ChannelKey {
    key: SigningKey,
}

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelKey({})", self.public())
    }
}

impl ChannelKey {
    /// A fresh key from the OS's random source.
    pub fn generate() -> Self {
        ChannelKey {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// A key from a 32-byte seed (tests and the simulator use fixed seeds).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        ChannelKey {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// The public half.
    pub fn public(&self) -> ChannelPublicKey {
        ChannelPublicKey::from_verifying_key(self.key.verifying_key())
    }

    /// Signs `message` (a piece's header and payload, or an announce's signed part).
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(message).to_bytes()
    }

    /// Writes the secret key to a new file with mode 0600. Refuses to overwrite.
    pub fn write_new_file(&self, path: &Path) -> Result<(), CryptoError> {
        write_secret_file(path, self.key.as_bytes())
    }

    /// Reads a key file written by [`ChannelKey::write_new_file`]. Refuses files that other
    /// users can read.
    pub fn read_file(path: &Path) -> Result<Self, CryptoError> {
        Ok(Self::from_seed(&read_secret_file(path)?))
    }
}

/// Writes 32 secret bytes as hex to a new file with mode 0600. Refuses to overwrite.
fn write_secret_file(path: &Path, secret: &[u8; 32]) -> Result<(), CryptoError> {
    let io = |source| CryptoError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    writeln!(file, "{}", encode_hex(secret)).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Reads 32 secret bytes written by [`write_secret_file`]; refuses files others can read.
fn read_secret_file(path: &Path) -> Result<[u8; 32], CryptoError> {
    let io = |source| CryptoError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => CryptoError::BadKeyFile {
            path: path.to_owned(),
            reason: "not text".into(),
        },
        _ => io(e),
    })?;
    decode_hex::<32>(text.trim()).map_err(|e| CryptoError::BadKeyFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Bytes the content encryption adds to a payload (the Poly1305 tag).
pub const CONTENT_TAG_LEN: usize = 16;

/// A private channel's content key: payloads are sealed with ChaCha20-Poly1305 before they
/// are signed, so relays and peers verify and forward ciphertext they cannot read. The nonce
/// is the piece's sequence number (unique per channel: sessions start at their epoch), and the
/// channel id is authenticated with it.
#[derive(Clone)]
pub struct ContentKey([u8; 32]);

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentKey(..)")
    }
}

impl PartialEq for ContentKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

fn content_nonce(seq: u64) -> chacha20poly1305::Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    chacha20poly1305::Nonce::from(n)
}

impl ContentKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        ContentKey(rand::random())
    }

    /// A key from known bytes (tests).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ContentKey(bytes)
    }

    /// Writes the key to a new file with mode 0600. Refuses to overwrite.
    pub fn write_new_file(&self, path: &Path) -> Result<(), CryptoError> {
        write_secret_file(path, &self.0)
    }

    /// Reads a key file written by [`ContentKey::write_new_file`].
    pub fn read_file(path: &Path) -> Result<Self, CryptoError> {
        read_secret_file(path).map(ContentKey)
    }

    fn cipher(&self) -> chacha20poly1305::ChaCha20Poly1305 {
        use chacha20poly1305::KeyInit;
        chacha20poly1305::ChaCha20Poly1305::new(&chacha20poly1305::Key::from(self.0))
    }

    /// Encrypts `plaintext` of piece `seq` of `channel` into `out`; the ciphertext's length
    /// (plaintext + [`CONTENT_TAG_LEN`]), or `None` if `out` is too small.
    pub fn seal(
        &self,
        channel: ChannelId,
        seq: u64,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        use chacha20poly1305::AeadInOut;
        let n = plaintext.len();
        let out = out.get_mut(..n + CONTENT_TAG_LEN)?;
        out[..n].copy_from_slice(plaintext);
        let tag = self
            .cipher()
            .encrypt_inout_detached(&content_nonce(seq), &channel.0, (&mut out[..n]).into())
            .ok()?;
        out[n..].copy_from_slice(&tag);
        Some(n + CONTENT_TAG_LEN)
    }

    /// Decrypts the payload of piece `seq` of `channel` into `out`; the plaintext's length, or
    /// an error if it is not authentic under this key.
    pub fn open(
        &self,
        channel: ChannelId,
        seq: u64,
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        use chacha20poly1305::AeadInOut;
        let n = ciphertext
            .len()
            .checked_sub(CONTENT_TAG_LEN)
            .ok_or(CryptoError::Undecryptable)?;
        let out = out.get_mut(..n).ok_or(CryptoError::Undecryptable)?;
        out.copy_from_slice(&ciphertext[..n]);
        let tag = chacha20poly1305::Tag::try_from(&ciphertext[n..])
            .map_err(|_| CryptoError::Undecryptable)?;
        self.cipher()
            .decrypt_inout_detached(&content_nonce(seq), &channel.0, out.into(), &tag)
            .map_err(|_| CryptoError::Undecryptable)?;
        Ok(n)
    }
}

/// Lowercase hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Exactly `N` bytes from `2N` hex digits.
pub fn decode_hex<const N: usize>(text: &str) -> Result<[u8; N], CryptoError> {
    let bad = || CryptoError::BadHex {
        expected: 2 * N,
        got: text.chars().take(80).collect(),
    };
    if text.len() != 2 * N || !text.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{PieceFlags, PieceHeader, MAX_DATAGRAM};
    use proptest::prelude::*;

    #[test]
    fn content_keys_seal_and_open_only_their_own_pieces() {
        let key = ContentKey::from_bytes([1; 32]);
        let channel = ChannelId([5; 8]);
        let mut sealed = [0u8; 1200];
        let n = key
            .seal(channel, 42, b"secret stream", &mut sealed)
            .unwrap();
        assert_eq!(n, 13 + CONTENT_TAG_LEN);
        assert_ne!(&sealed[..13], b"secret stream");
        let mut out = [0u8; 1200];
        assert_eq!(key.open(channel, 42, &sealed[..n], &mut out).unwrap(), 13);
        assert_eq!(&out[..13], b"secret stream");
        // Another sequence number, another channel, another key, or one flipped bit: refused.
        assert!(key.open(channel, 43, &sealed[..n], &mut out).is_err());
        assert!(key
            .open(ChannelId([6; 8]), 42, &sealed[..n], &mut out)
            .is_err());
        let other = ContentKey::from_bytes([2; 32]);
        assert!(other.open(channel, 42, &sealed[..n], &mut out).is_err());
        sealed[3] ^= 1;
        assert!(key.open(channel, 42, &sealed[..n], &mut out).is_err());
        assert!(
            key.open(channel, 42, &sealed[..5], &mut out).is_err(),
            "shorter than a tag"
        );
        assert!(
            key.seal(channel, 1, &[0; 100], &mut [0u8; 110]).is_none(),
            "no room for the tag"
        );
    }

    #[test]
    fn content_key_files_round_trip_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.content");
        let key = ContentKey::generate();
        key.write_new_file(&path).unwrap();
        assert_eq!(ContentKey::read_file(&path).unwrap(), key);
        assert!(key.write_new_file(&path).is_err(), "never overwrites");
        assert_eq!(format!("{key:?}"), "ContentKey(..)", "never printed");
    }

    fn piece_bytes(key: &ChannelKey, seq: u64, payload: &[u8]) -> Vec<u8> {
        let header = PieceHeader {
            flags: PieceFlags::empty(),
            club: 0,
            channel: key.public().channel_id(),
            seq,
            publish_time_us: 5,
        };
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = header.encode(payload, &mut buf, |m| key.sign(m)).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn signed_piece_verifies_and_tampering_is_caught() {
        let key = ChannelKey::from_seed(&[1; 32]);
        let bytes = piece_bytes(&key, 1, b"hello");
        let piece = Piece::parse(&bytes).unwrap();
        key.public().verify_piece(&piece).unwrap();

        let other = ChannelKey::from_seed(&[2; 32]);
        assert!(matches!(
            other.public().verify_piece(&piece),
            Err(CryptoError::BadSignature)
        ));
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x10;
            if let Ok(p) = Piece::parse(&t) {
                assert!(
                    key.public().verify_piece(&p).is_err(),
                    "flip at {i} verified"
                );
            }
        }
    }

    #[test]
    fn batch_verification_accepts_good_and_rejects_one_bad() {
        let a = ChannelKey::from_seed(&[3; 32]);
        let b = ChannelKey::from_seed(&[4; 32]);
        let raw: Vec<Vec<u8>> = (0..16)
            .map(|i| piece_bytes(if i % 2 == 0 { &a } else { &b }, i, &[i as u8; 100]))
            .collect();
        let mut batch: Vec<(Piece<'_>, ChannelPublicKey)> = raw
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let k = if i % 2 == 0 { a.public() } else { b.public() };
                (Piece::parse(r).unwrap(), k)
            })
            .collect();
        verify_batch(&batch).unwrap();
        batch[7].1 = a.public(); // a piece of b's checked against a's key
        assert!(verify_batch(&batch).is_err());
        assert!(verify_batch(&batch[7..8]).is_err());
        verify_batch(&[]).unwrap();
    }

    #[test]
    fn announce_is_self_signed() {
        let key = ChannelKey::from_seed(&[5; 32]);
        let mut buf = [0u8; Announce::LEN];
        Announce::encode_signed(42, &key.public().to_bytes(), &mut buf, |m| key.sign(m)).unwrap();
        let a = Announce::parse(&buf).unwrap();
        assert_eq!(verify_announce(&a).unwrap(), key.public());
        buf[10] ^= 1; // a different epoch than was signed
        assert!(verify_announce(&Announce::parse(&buf).unwrap()).is_err());
    }

    #[test]
    fn key_file_round_trip_and_permissions() {
        let dir = std::env::temp_dir().join(format!("clubcast-key-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("channel.key");
        let _ = fs::remove_file(&path);
        let key = ChannelKey::generate();
        key.write_new_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ChannelKey::read_file(&path).unwrap().public(), key.public());
        assert!(matches!(
            key.write_new_file(&path),
            Err(CryptoError::Io { .. })
        ));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ChannelKey::read_file(&path),
            Err(CryptoError::InsecurePermissions { mode: 0o644, .. })
        ));
        fs::write(&path, "not a key").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            ChannelKey::read_file(&path),
            Err(CryptoError::BadKeyFile { .. })
        ));
        assert!(matches!(
            ChannelKey::read_file(&dir.join("missing")),
            Err(CryptoError::Io { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn hex_round_trips(bytes: [u8; 32]) {
            prop_assert_eq!(decode_hex::<32>(&encode_hex(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn public_key_parsing_never_panics(text in "\\PC{0,80}") {
            let _ = ChannelPublicKey::from_hex(&text);
        }
    }
}
