//! Ethernet/IPv4/UDP framing for the AF_XDP path: reading a received frame's addresses and
//! payload, and writing the 42 header bytes of a datagram to one subscriber.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Ethernet (14) + IPv4 without options (20) + UDP (8).
pub(crate) const HEADERS_LEN: usize = 42;
const ETH_P_IPV4: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
/// Time to live of sent datagrams (the Linux default).
const TTL: u8 = 64;

/// A MAC address.
pub type Mac = [u8; 6];

/// What the relay needs from a received UDP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame {
    /// Sender's MAC: the next hop back to it (the sender itself on-link, else its router).
    pub src_mac: Mac,
    /// Sender.
    pub src: SocketAddrV4,
    /// Destination.
    pub dst: SocketAddrV4,
    /// Where the UDP payload starts in the frame, and its length.
    pub payload_offset: usize,
    /// Payload length.
    pub payload_len: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses an Ethernet frame holding an unfragmented IPv4 UDP datagram; `None` for anything
/// else or anything inconsistent (lengths that do not fit the frame).
pub fn parse_udp(frame: &[u8]) -> Option<UdpFrame> {
    if frame.len() < HEADERS_LEN || be16(frame, 12) != ETH_P_IPV4 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_UDP || be16(ip, 6) & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(be16(ip, 2));
    if total < ihl + 8 || total > ip.len() {
        return None;
    }
    let udp = &ip[ihl..total];
    let udp_len = usize::from(be16(udp, 4));
    if udp_len < 8 || udp_len > udp.len() {
        return None;
    }
    let mut src_mac = [0; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    Some(UdpFrame {
        src_mac,
        src: SocketAddrV4::new(addr(12), be16(udp, 0)),
        dst: SocketAddrV4::new(addr(16), be16(udp, 2)),
        payload_offset: 14 + ihl + 8,
        payload_len: udp_len - 8,
    })
}

/// The one's-complement sum of `bytes` as 16-bit big-endian words (odd length padded with
/// zero), not yet folded: sums of pieces add up, so a payload's sum is computed once and reused
/// for every copy.
pub(crate) fn ones_sum(bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(2);
    let mut sum: u64 = (&mut chunks)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a one's-complement sum to 16 bits and complements it.
fn finish(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub(crate) fn internet_checksum(bytes: &[u8]) -> u16 {
    finish(ones_sum(bytes))
}

/// One end of a datagram on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) mac: Mac,
    pub(crate) addr: SocketAddrV4,
}

/// Writes the Ethernet, IPv4 and UDP headers of a `payload_len`-byte datagram into `out[..42]`,
/// with both checksums; `payload_sum` is [`ones_sum`] of the payload.
pub(crate) fn write_headers(
    out: &mut [u8],
    from: &Endpoint,
    to: &Endpoint,
    payload_len: usize,
    payload_sum: u64,
) {
    let out = &mut out[..HEADERS_LEN];
    out[0..6].copy_from_slice(&to.mac);
    out[6..12].copy_from_slice(&from.mac);
    out[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    let total = (20 + 8 + payload_len) as u16;
    let ip = &mut out[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]); // identification: unused without fragments
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    ip[8] = TTL;
    ip[9] = IPPROTO_UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&from.addr.ip().octets());
    ip[16..20].copy_from_slice(&to.addr.ip().octets());
    let sum = internet_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut out[34..42];
    udp[0..2].copy_from_slice(&from.addr.port().to_be_bytes());
    udp[2..4].copy_from_slice(&to.addr.port().to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    // Pseudo-header (addresses, protocol, UDP length), UDP header, payload.
    let pseudo = ones_sum(&out[26..34]) + u64::from(IPPROTO_UDP) + (8 + payload_len) as u64;
    let sum = match finish(pseudo + ones_sum(&out[34..42]) + payload_sum) {
        0 => 0xffff, // 0 would mean "no checksum"
        s => s,
    };
    out[40..42].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(mac: u8, ip: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            mac: [mac; 6],
            addr: SocketAddrV4::new(Ipv4Addr::from(ip), port),
        }
    }

    #[test]
    fn written_headers_parse_back_with_a_valid_ip_checksum() {
        let from = endpoint(1, [10, 0, 0, 1], 7000);
        let to = endpoint(2, [10, 0, 0, 2], 40000);
        let payload = b"signed piece bytes";
        let mut frame = vec![0u8; HEADERS_LEN + payload.len()];
        write_headers(&mut frame, &from, &to, payload.len(), ones_sum(payload));
        frame[HEADERS_LEN..].copy_from_slice(payload);
        // A header whose checksum is right sums to zero.
        assert_eq!(internet_checksum(&frame[14..34]), 0);
        // So does the UDP datagram with its pseudo-header.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&frame[26..34]);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        pseudo.extend_from_slice(&frame[34..]);
        assert_eq!(internet_checksum(&pseudo), 0);
        let parsed = parse_udp(&frame).unwrap();
        assert_eq!(parsed.src, from.addr);
        assert_eq!(parsed.dst, to.addr);
        assert_eq!(parsed.src_mac, from.mac);
        assert_eq!(
            &frame[parsed.payload_offset..][..parsed.payload_len],
            payload
        );
    }

    #[test]
    fn checksum_matches_a_known_header() {
        // The classic example header (checksum field zeroed): 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
    }

    #[test]
    fn refuses_what_is_not_a_whole_udp_datagram() {
        let from = endpoint(1, [10, 0, 0, 1], 7000);
        let to = endpoint(2, [10, 0, 0, 2], 9);
        let mut frame = vec![0u8; HEADERS_LEN + 10];
        write_headers(&mut frame, &from, &to, 10, 0);
        assert!(parse_udp(&frame).is_some());
        assert!(parse_udp(&frame[..HEADERS_LEN + 5]).is_none(), "truncated");
        let mut tcp = frame.clone();
        tcp[23] = 6;
        assert!(parse_udp(&tcp).is_none(), "not UDP");
        let mut fragment = frame.clone();
        fragment[20] = 0x20; // more fragments
        assert!(parse_udp(&fragment).is_none(), "fragment");
        let mut arp = frame.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(parse_udp(&arp).is_none(), "ARP");
        let mut long_udp = frame.clone();
        long_udp[38..40].copy_from_slice(&500u16.to_be_bytes());
        assert!(parse_udp(&long_udp).is_none(), "UDP length past the frame");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_stays_inside_the_frame(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            if let Some(f) = parse_udp(&bytes) {
                proptest::prop_assert!(f.payload_offset + f.payload_len <= bytes.len());
            }
        }
    }
}
