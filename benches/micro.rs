//! Criterion micro-benchmarks of the per-piece steps: parse, sign, verify (single and batch of
//! 32), and the submission cost of fanning one piece out to 500 subscribers with `sendmmsg`.
//!
//! Run: `cargo bench --bench micro`. Throughput is in pieces (or copies) per second.

use std::hint::black_box;
use std::net::SocketAddr;

use clubcast::backend::{PortableSocket, SendBatch};
use clubcast::crypto::{verify_batch, ChannelKey, ChannelPublicKey};
use clubcast::publisher::Publisher;
use clubcast::wire::{Piece, PieceFlags, PieceHeader, MAX_DATAGRAM};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn pieces(n: usize) -> (Vec<Vec<u8>>, ChannelPublicKey) {
    let key = ChannelKey::from_seed(&[3; 32]);
    let public = key.public();
    let mut publisher = Publisher::new(key, 1, 1);
    let out = (0..n)
        .map(|_| {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let len = publisher
                .encode_piece(&[0x47; 1128], PieceFlags::empty(), 0, &mut buf)
                .unwrap();
            buf.truncate(len);
            buf
        })
        .collect();
    (out, public)
}

fn piece_steps(c: &mut Criterion) {
    let (raw, public) = pieces(64);
    let mut g = c.benchmark_group("piece");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse", |b| {
        b.iter(|| Piece::parse(black_box(&raw[0])).unwrap().seq())
    });
    let key = ChannelKey::from_seed(&[3; 32]);
    let header = PieceHeader {
        flags: PieceFlags::empty(),
        club: 0,
        channel: public.channel_id(),
        seq: 1,
        publish_time_us: 0,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    g.bench_function("sign", |b| {
        b.iter(|| {
            header
                .encode(black_box(&[0x47; 1128]), &mut buf, |m| key.sign(m))
                .unwrap()
        })
    });
    let parsed: Vec<(Piece<'_>, ChannelPublicKey)> = raw
        .iter()
        .map(|r| (Piece::parse(r).unwrap(), public))
        .collect();
    g.bench_function("verify", |b| {
        b.iter(|| public.verify_piece(black_box(&parsed[0].0)).unwrap())
    });
    g.throughput(Throughput::Elements(32));
    g.bench_function("batch_verify_32", |b| {
        b.iter(|| verify_batch(black_box(&parsed[..32])).unwrap())
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let (raw, _) = pieces(1);
    let receivers: Vec<PortableSocket> = (0..500)
        .map(|_| PortableSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap())
        .collect();
    let dests: Vec<SocketAddr> = receivers.iter().map(|r| r.local_addr().unwrap()).collect();
    let sender = PortableSocket::bind("127.0.0.1:0".parse().unwrap(), 8 << 20).unwrap();
    let mut batch = SendBatch::new();
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(500));
    // Receivers never read: once their small buffers fill, loopback drops at the receiver and
    // this measures what the relay pays to hand 500 copies to the kernel.
    g.bench_function("sendmmsg_500_subscribers", |b| {
        b.iter(|| sender.send_fanout(black_box(&raw[0]), &dests, &mut batch))
    });
    g.finish();
}

criterion_group!(benches, piece_steps, fanout);
criterion_main!(benches);
