//! MPEG-TS as clubcast needs it: cut a byte stream into whole 188-byte packets, read PCRs for
//! real-time pacing, and generate a synthetic stream for the demo and tests.
//!
//! clubcast does not demultiplex: pieces carry TS packets untouched, six to a piece.

use std::time::Duration;

/// Bytes of one TS packet.
pub const PACKET_LEN: usize = 188;
/// TS packets per piece: 6 × 188 = 1128 bytes, inside the piece payload budget.
pub const PACKETS_PER_PIECE: usize = 6;
/// Payload bytes of a full piece.
pub const PIECE_PAYLOAD: usize = PACKET_LEN * PACKETS_PER_PIECE;
const _: () = assert!(PIECE_PAYLOAD <= crate::wire::PieceHeader::MAX_PAYLOAD);
/// The sync byte that opens every TS packet.
pub const SYNC: u8 = 0x47;
/// PCR ticks per second.
const PCR_HZ: u64 = 27_000_000;
/// PCR values wrap at 2^33 × 300.
const PCR_WRAP: u64 = (1 << 33) * 300;

/// Gathers bytes into whole, sync-aligned TS packets. Bytes between packets that do not start
/// with a sync byte are skipped (and counted) until the stream realigns.
#[derive(Debug, Default)]
pub struct PacketChunker {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`; always a sync byte when any remain.
    pos: usize,
    skipped: u64,
}

impl PacketChunker {
    /// An empty chunker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(bytes);
        self.realign();
    }

    /// Whole packets' worth of bytes buffered (packets found misaligned later are skipped).
    pub fn packets(&self) -> usize {
        self.pending().len() / PACKET_LEN
    }

    /// Removes up to `max_packets` whole packets, appending them to `out`; returns how many.
    pub fn take(&mut self, max_packets: usize, out: &mut Vec<u8>) -> usize {
        let mut n = 0;
        while n < max_packets && self.pending().len() >= PACKET_LEN {
            out.extend_from_slice(&self.pending()[..PACKET_LEN]);
            self.pos += PACKET_LEN;
            self.realign();
            n += 1;
        }
        n
    }

    /// Bytes skipped to regain sync.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// Bytes left that do not make a whole packet (dropped at end of stream).
    pub fn partial_bytes(&self) -> usize {
        self.pending().len() % PACKET_LEN
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Moves `pos` to the next byte that starts a packet: a sync byte whose following packet,
    /// if already buffered, starts with a sync byte too.
    fn realign(&mut self) {
        let pending = self.pending();
        let aligned_at = (0..pending.len()).find(|&i| {
            pending[i] == SYNC && pending.get(i + PACKET_LEN).is_none_or(|&b| b == SYNC)
        });
        let skip = aligned_at.unwrap_or(pending.len());
        self.skipped += skip as u64;
        self.pos += skip;
    }
}

/// The PCR of a packet in 27 MHz ticks, if it carries one.
pub fn pcr(packet: &[u8]) -> Option<u64> {
    if packet.len() < 12 || packet[0] != SYNC {
        return None;
    }
    let has_adaptation = packet[3] & 0x20 != 0;
    let adaptation_len = packet[4];
    let has_pcr = adaptation_len >= 7 && packet[5] & 0x10 != 0;
    if !has_adaptation || !has_pcr {
        return None;
    }
    let b = &packet[6..12];
    let base = (u64::from(b[0]) << 25)
        | (u64::from(b[1]) << 17)
        | (u64::from(b[2]) << 9)
        | (u64::from(b[3]) << 1)
        | (u64::from(b[4]) >> 7);
    let ext = (u64::from(b[4] & 1) << 8) | u64::from(b[5]);
    // The extension counts 0..300; anything larger is not a valid PCR.
    (ext < 300).then_some(base * 300 + ext)
}

/// Maps PCRs to offsets from the stream's start, so a file can be sent at its real bitrate.
///
/// The first PCR anchors offset zero. Wrap-around is followed; a jump of more than
/// [`PcrClock::MAX_JUMP`] (a discontinuity, a new file) re-anchors at the current offset.
#[derive(Debug, Default)]
pub struct PcrClock {
    anchor: Option<(u64, Duration)>,
    last: Option<(u64, Duration)>,
}

impl PcrClock {
    /// Larger PCR steps than this are treated as discontinuities.
    pub const MAX_JUMP: Duration = Duration::from_secs(5);

    /// A clock with no anchor yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream offset at which a packet with this PCR is due.
    pub fn offset(&mut self, pcr: u64) -> Duration {
        let Some((last_pcr, last_offset)) = self.last else {
            self.anchor = Some((pcr, Duration::ZERO));
            self.last = Some((pcr, Duration::ZERO));
            return Duration::ZERO;
        };
        let pcr = pcr % PCR_WRAP;
        let step = (pcr + PCR_WRAP - last_pcr % PCR_WRAP) % PCR_WRAP;
        let step = ticks(step);
        let offset = if step > Self::MAX_JUMP {
            last_offset
        } else {
            last_offset + step
        };
        self.last = Some((pcr, offset));
        offset
    }
}

fn ticks(t: u64) -> Duration {
    Duration::from_nanos(t.saturating_mul(1000) / (PCR_HZ / 1_000_000))
}

/// A synthetic MPEG-TS stream at a fixed bitrate: PAT and PMT every 100 ms, and a private data
/// stream on PID 0x100 with a PCR every 40 ms and a deterministic payload.
#[derive(Debug)]
pub struct SyntheticTs {
    bitrate_bps: u64,
    packets: u64,
    continuity: [u8; 3],
}

impl SyntheticTs {
    const PMT_PID: u16 = 0x1000;
    const DATA_PID: u16 = 0x100;

    /// A stream of `bitrate_bps` bits per second (at least one packet per second).
    pub fn new(bitrate_bps: u64) -> Self {
        SyntheticTs {
            bitrate_bps: bitrate_bps.max(PACKET_LEN as u64 * 8),
            packets: 0,
            continuity: [0; 3],
        }
    }

    /// Stream time at which packet `n` is due.
    pub fn due(&self, n: u64) -> Duration {
        let ns =
            u128::from(n) * (PACKET_LEN as u128 * 8 * 1_000_000_000) / u128::from(self.bitrate_bps);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Packets generated so far.
    pub fn packets_generated(&self) -> u64 {
        self.packets
    }

    /// Appends every packet due by stream time `until` to `out`.
    pub fn generate_until(&mut self, until: Duration, out: &mut Vec<u8>) {
        while self.due(self.packets) <= until {
            self.next_packet(out);
        }
    }

    /// Appends the next packet to `out`.
    pub fn next_packet(&mut self, out: &mut Vec<u8>) {
        let now = self.due(self.packets);
        let per_100ms = (self.bitrate_bps / (PACKET_LEN as u64 * 8) / 10).max(3);
        let per_40ms = (self.bitrate_bps / (PACKET_LEN as u64 * 8) / 25).max(1);
        let n = self.packets;
        self.packets += 1;
        match n % per_100ms {
            0 => self.psi(out, 0, 0, &Self::pat_section()),
            1 => self.psi(out, Self::PMT_PID, 1, &Self::pmt_section()),
            _ if n % per_40ms == 0 => self.data(out, n, Some(now)),
            _ => self.data(out, n, None),
        }
    }

    fn header(&mut self, out: &mut Vec<u8>, pid: u16, slot: usize, start: bool, adaptation: bool) {
        let cc = self.continuity[slot];
        self.continuity[slot] = (cc + 1) & 0x0f;
        out.push(SYNC);
        out.push((u8::from(start) << 6) | ((pid >> 8) as u8 & 0x1f));
        out.push(pid as u8);
        out.push(if adaptation { 0x30 } else { 0x10 } | cc);
    }

    fn psi(&mut self, out: &mut Vec<u8>, pid: u16, slot: usize, section: &[u8]) {
        let start = out.len();
        self.header(out, pid, slot, true, false);
        out.push(0); // pointer field
        out.extend_from_slice(section);
        out.resize(start + PACKET_LEN, 0xff);
    }

    fn data(&mut self, out: &mut Vec<u8>, n: u64, pcr_at: Option<Duration>) {
        let start = out.len();
        self.header(out, Self::DATA_PID, 2, false, pcr_at.is_some());
        if let Some(at) = pcr_at {
            let ticks = (at.as_nanos() as u64).saturating_mul(27) / 1000 % PCR_WRAP;
            let (base, ext) = (ticks / 300, ticks % 300);
            out.extend_from_slice(&[
                7,
                0x10,
                (base >> 25) as u8,
                (base >> 17) as u8,
                (base >> 9) as u8,
                (base >> 1) as u8,
                (((base & 1) as u8) << 7) | 0x7e | ((ext >> 8) as u8),
                ext as u8,
            ]);
        }
        let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        while out.len() < start + PACKET_LEN {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(x as u8);
        }
    }

    fn pat_section() -> Vec<u8> {
        let mut s = vec![0x00, 0xb0, 13, 0x00, 0x01, 0xc1, 0x00, 0x00, 0x00, 0x01];
        s.extend_from_slice(&[0xe0 | (Self::PMT_PID >> 8) as u8, Self::PMT_PID as u8]);
        with_crc(s)
    }

    fn pmt_section() -> Vec<u8> {
        let pid = Self::DATA_PID;
        let mut s = vec![0x02, 0xb0, 18, 0x00, 0x01, 0xc1, 0x00, 0x00];
        s.extend_from_slice(&[0xe0 | (pid >> 8) as u8, pid as u8, 0xf0, 0x00]);
        s.extend_from_slice(&[0x06, 0xe0 | (pid >> 8) as u8, pid as u8, 0xf0, 0x00]);
        with_crc(s)
    }
}

/// Appends the MPEG-2 CRC-32 of a PSI section.
fn with_crc(mut section: Vec<u8>) -> Vec<u8> {
    let mut crc = 0xffff_ffffu32;
    for &b in &section {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    section.extend_from_slice(&crc.to_be_bytes());
    section
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn synthetic_stream_is_aligned_and_paced() {
        let mut ts = SyntheticTs::new(2_000_000);
        let mut out = Vec::new();
        ts.generate_until(Duration::from_secs(1), &mut out);
        assert_eq!(out.len() % PACKET_LEN, 0);
        let packets = out.len() / PACKET_LEN;
        // 2 Mbit/s of 188-byte packets: 1329.8 per second, plus the packet at t=0.
        assert_eq!(packets, 1330);
        assert!(out.chunks(PACKET_LEN).all(|p| p[0] == SYNC));
        let mut clock = PcrClock::new();
        let offsets: Vec<Duration> = out
            .chunks(PACKET_LEN)
            .filter_map(pcr)
            .map(|p| clock.offset(p))
            .collect();
        assert!(offsets.len() >= 20, "{} PCRs", offsets.len());
        let last = *offsets.last().unwrap();
        assert!(
            last > Duration::from_millis(900) && last <= Duration::from_secs(1),
            "{last:?}"
        );
    }

    #[test]
    fn long_streams_keep_their_pace() {
        // Packet times must keep growing far beyond where a 64-bit product would saturate.
        let ts = SyntheticTs::new(1_000_000_000);
        let n = 100_000_000;
        assert!(ts.due(n + 1) > ts.due(n));
        assert_eq!(ts.due(n).as_secs(), 150);
    }

    #[test]
    fn psi_crc_matches_known_value() {
        // The CRC of a section including its own CRC is zero for MPEG-2's CRC-32.
        let pat = SyntheticTs::pat_section();
        assert_eq!(with_crc(pat)[pat_len()..], [0, 0, 0, 0]);
    }

    fn pat_len() -> usize {
        SyntheticTs::pat_section().len()
    }

    #[test]
    fn pcr_clock_follows_wrap_and_reanchors_on_jumps() {
        let mut c = PcrClock::new();
        let near_wrap = PCR_WRAP - PCR_HZ / 2;
        assert_eq!(c.offset(near_wrap), Duration::ZERO);
        assert_eq!(c.offset(PCR_HZ / 2), Duration::from_secs(1));
        // A 20-second jump is a discontinuity: time does not leap.
        assert_eq!(c.offset(PCR_HZ / 2 + 20 * PCR_HZ), Duration::from_secs(1));
        assert_eq!(c.offset(PCR_HZ / 2 + 21 * PCR_HZ), Duration::from_secs(2));
    }

    #[test]
    fn chunker_skips_garbage_and_keeps_packets_whole() {
        let mut ts = SyntheticTs::new(1_000_000);
        let mut stream = Vec::new();
        for _ in 0..20 {
            ts.next_packet(&mut stream);
        }
        let mut c = PacketChunker::new();
        c.push(&[1, 2, 3]);
        c.push(&stream[..100]);
        c.push(&stream[100..]);
        assert_eq!(c.skipped_bytes(), 3);
        let mut out = Vec::new();
        assert_eq!(c.take(6, &mut out), 6);
        assert_eq!(c.take(100, &mut out), 14);
        assert_eq!(out, stream);
    }

    proptest! {
        #[test]
        fn chunker_never_panics_and_emits_only_sync_packets(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..500), 0..10)
        ) {
            let mut c = PacketChunker::new();
            let mut out = Vec::new();
            for ch in &chunks {
                c.push(ch);
                c.take(3, &mut out);
            }
            prop_assert!(out.chunks(PACKET_LEN).all(|p| p.len() == PACKET_LEN && p[0] == SYNC));
        }

        #[test]
        fn pcr_never_panics(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..8)) {
            let mut clock = PcrClock::new();
            for p in &packets {
                if let Some(v) = pcr(p) {
                    prop_assert!(v < PCR_WRAP);
                    clock.offset(v);
                }
            }
        }

        #[test]
        fn pcr_clock_accepts_any_values(values in proptest::collection::vec(any::<u64>(), 1..20)) {
            let mut clock = PcrClock::new();
            for v in values {
                clock.offset(v);
            }
        }
    }
}
