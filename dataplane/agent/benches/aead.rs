//! The cost the tunnel cannot avoid: WireGuard's ChaCha20-Poly1305 per
//! byte, through boringtun's `Tunn` (which the tunnel uses for every data
//! packet), against a plain copy of the same packet as the baseline.
//!
//! `cargo bench -p weft-agent --bench aead`. A packet of 1420 bytes (the
//! overlay MTU) is sealed by one end and opened by the other; the
//! throughputs bound the tunnel: one GB through it costs one seal and one
//! open, on top of the copies and system calls around them.

use std::hint::black_box;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

/// Inner packet size: the overlay MTU.
const PACKET: usize = 1420;
/// Packets per measured batch when opening (each can be opened once).
const BATCH: usize = 256;

/// A minimal IPv4 header, so `Tunn` accepts the packet as IP.
fn ip_packet() -> Vec<u8> {
    let mut p = vec![0x5a_u8; PACKET];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(PACKET).expect("fits").to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p
}

/// Two ends with an established session (a -> b).
fn session() -> (Tunn, Tunn) {
    let sa = StaticSecret::from([1u8; 32]);
    let sb = StaticSecret::from([2u8; 32]);
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1 << 8, None);
    let mut b = Tunn::new(sb, pa, None, None, 2 << 8, None);
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false) else {
        panic!("no handshake initiation");
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut out) else {
        panic!("no handshake response");
    };
    let resp = resp.to_vec();
    // a completes the handshake and sends a keepalive that confirms it to b.
    if let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, &resp, &mut buf) {
        let keepalive = keepalive.to_vec();
        let _ = b.decapsulate(None, &keepalive, &mut out);
    }
    (a, b)
}

fn seal(a: &mut Tunn, packet: &[u8], out: &mut [u8]) -> usize {
    match a.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(d) => d.len(),
        TunnResult::Done
        | TunnResult::Err(_)
        | TunnResult::WriteToTunnelV4(..)
        | TunnResult::WriteToTunnelV6(..) => panic!("encapsulate did not produce a datagram"),
    }
}

fn aead(c: &mut Criterion) {
    let packet = ip_packet();
    let mut out = vec![0u8; PACKET + 64];
    let mut g = c.benchmark_group("aead_1420B");
    g.throughput(Throughput::Bytes(PACKET as u64));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("copy (baseline)", |bench| {
        bench.iter(|| {
            out[..PACKET].copy_from_slice(black_box(&packet));
            black_box(&out);
        });
    });
    let (mut a, mut b) = session();
    g.bench_function("seal (Tunn::encapsulate)", |bench| {
        bench.iter(|| black_box(seal(&mut a, black_box(&packet), &mut out)));
    });
    g.throughput(Throughput::Bytes((PACKET * BATCH) as u64));
    g.bench_function("open (Tunn::decapsulate)", |bench| {
        bench.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| {
                        let n = seal(&mut a, &packet, &mut out);
                        out[..n].to_vec()
                    })
                    .collect::<Vec<_>>()
            },
            |datagrams| {
                let mut plain = vec![0u8; PACKET + 64];
                for d in &datagrams {
                    match b.decapsulate(None, d, &mut plain) {
                        TunnResult::WriteToTunnelV4(p, _) => {
                            black_box(p);
                        }
                        TunnResult::Done
                        | TunnResult::Err(_)
                        | TunnResult::WriteToNetwork(_)
                        | TunnResult::WriteToTunnelV6(..) => panic!("decapsulate failed"),
                    }
                }
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
