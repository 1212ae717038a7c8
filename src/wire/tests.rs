use super::*;
use proptest::prelude::*;

fn fake_sign(bytes: &[u8]) -> [u8; SIGNATURE_LEN] {
    let h = blake3::hash(bytes);
    let mut s = [0u8; SIGNATURE_LEN];
    s[..32].copy_from_slice(h.as_bytes());
    s[32..].copy_from_slice(h.as_bytes());
    s
}

fn channel() -> impl Strategy<Value = ChannelId> {
    any::<[u8; 8]>().prop_map(ChannelId)
}

fn cookie() -> impl Strategy<Value = CookieBytes> {
    any::<[u8; 20]>().prop_map(CookieBytes)
}

fn round_trip(m: Message<'_>) {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = m.encode(&mut buf).expect("encode");
    assert!(n <= MAX_DATAGRAM);
    assert_eq!(Message::parse(&buf[..n]).expect("parse"), m);
    // One byte short of the encoded length is always an error.
    assert!(Message::parse(&buf[..n - 1]).is_err());
}

proptest! {
    #[test]
    fn piece_round_trips(
        flags in 0u8..8, club: u8, ch in channel(), seq: u64, t: u64,
        payload in proptest::collection::vec(any::<u8>(), 0..=PieceHeader::MAX_PAYLOAD),
    ) {
        let header = PieceHeader { flags: PieceFlags::from_bits(flags).unwrap(), club, channel: ch, seq, publish_time_us: t };
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = header.encode(&payload, &mut buf, fake_sign).unwrap();
        prop_assert_eq!(n, PieceHeader::LEN + payload.len() + SIGNATURE_LEN);
        let piece = Piece::parse(&buf[..n]).unwrap();
        prop_assert_eq!(piece.header(), header);
        prop_assert_eq!(piece.payload(), &payload[..]);
        prop_assert_eq!(piece.signature(), fake_sign(piece.signed_bytes()));
        round_trip(Message::Piece(piece));
    }

    #[test]
    fn hello_round_trips(ch in channel(), nonce: u64) {
        round_trip(Message::Hello(Hello { channel: ch, nonce }));
    }

    #[test]
    fn cookie_round_trips(nonce: u64, c in cookie()) {
        round_trip(Message::Cookie(Cookie { nonce, cookie: c }));
    }

    #[test]
    fn subscriptions_round_trip(ch in channel(), c in cookie()) {
        let s = Subscription { channel: ch, cookie: c };
        round_trip(Message::Subscribe(s));
        round_trip(Message::Keepalive(s));
        round_trip(Message::Unsubscribe(s));
    }

    #[test]
    fn subscribed_round_trips(ch in channel(), live: bool) {
        round_trip(Message::Subscribed(Subscribed { channel: ch, live }));
    }

    #[test]
    fn announce_round_trips(epoch: u64, key: [u8; 32]) {
        let mut buf = [0u8; Announce::LEN];
        let n = Announce::encode_signed(epoch, &key, &mut buf, fake_sign).unwrap();
        let a = Announce::parse(&buf[..n]).unwrap();
        prop_assert_eq!(a.epoch_us(), epoch);
        prop_assert_eq!(a.public_key(), key);
        prop_assert_eq!(a.signature(), fake_sign(a.signed_bytes()));
        round_trip(Message::Announce(a));
    }

    #[test]
    fn announced_round_trips(ch in channel(), epoch_us: u64) {
        round_trip(Message::Announced(Announced { channel: ch, epoch_us }));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
        if let Ok(m) = Message::parse(&bytes) {
            // Whatever parses re-encodes to the same bytes.
            let mut buf = vec![0u8; bytes.len()];
            let n = m.encode(&mut buf).unwrap();
            prop_assert_eq!(&buf[..n], &bytes[..]);
        }
    }

    #[test]
    fn v1_prefixed_bytes_never_panic(t: u8, rest in proptest::collection::vec(any::<u8>(), 0..1300)) {
        // Random bytes behind a valid magic and a (likely) valid type reach the deeper parsers.
        let mut bytes = vec![MAGIC_V1, t % 0x22];
        bytes.extend_from_slice(&rest);
        let _ = Message::parse(&bytes);
    }

    #[test]
    fn corrupted_pieces_never_panic(flip in 0usize..160, bit in 0u8..8, cut in 0usize..200) {
        let header = PieceHeader { flags: PieceFlags::KEYFRAME, club: 3, channel: ChannelId([7; 8]), seq: 9, publish_time_us: 1 };
        let mut buf = [0u8; 256];
        let n = header.encode(&[0x47; 60], &mut buf, fake_sign).unwrap();
        buf[flip % n] ^= 1 << bit;
        let _ = Message::parse(&buf[..n]);
        let _ = Message::parse(&buf[..cut.min(n)]);
    }
}

#[test]
fn typed_errors_for_malformed_input() {
    assert_eq!(Message::parse(&[]), Err(WireError::TooShort(0)));
    assert_eq!(Message::parse(&[0x00, 0x01]), Err(WireError::BadMagic(0)));
    assert_eq!(
        Message::parse(&[MAGIC_V1, 0x7f]),
        Err(WireError::UnknownType(0x7f))
    );
    assert!(matches!(
        Message::parse(&[MAGIC_V1, MessageType::Hello as u8, 0, 0]),
        Err(WireError::WrongLength {
            expected: 32,
            actual: 4,
            ..
        })
    ));

    let header = PieceHeader {
        flags: PieceFlags::empty(),
        club: 0,
        channel: ChannelId([1; 8]),
        seq: 1,
        publish_time_us: 2,
    };
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = header.encode(&[1, 2, 3], &mut buf, fake_sign).unwrap();
    let mut bad = buf;
    bad[2] = 0x80;
    assert_eq!(Piece::parse(&bad[..n]), Err(WireError::UnknownFlags(0x80)));
    let mut bad = buf;
    bad[31] = 1;
    assert_eq!(Piece::parse(&bad[..n]), Err(WireError::ReservedNonZero));
    assert_eq!(
        Piece::parse(&buf[..n - 1]),
        Err(WireError::LengthMismatch {
            declared: 3,
            actual: 2
        })
    );
    assert_eq!(
        header.encode(&[0; PieceHeader::MAX_PAYLOAD + 1], &mut buf, fake_sign),
        Err(WireError::PayloadTooLarge(PieceHeader::MAX_PAYLOAD + 1))
    );
    assert!(matches!(
        header.encode(&[0; 10], &mut [0u8; 50], fake_sign),
        Err(WireError::BufferTooSmall {
            needed: 106,
            available: 50
        })
    ));
}
