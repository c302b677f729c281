//! Flow hashing: which of several interchangeable peers (a site's
//! gateways) carries a packet, chosen per flow so that a flow's packets
//! stay in order on one path while different flows spread over all.
//!
//! The flow of an IP packet is its addresses, its protocol and, for TCP and
//! UDP packets that are not fragments, its ports. Fragments (IPv4 with
//! "more fragments" or an offset, IPv6 with a fragment header) hash on
//! addresses and protocol only, so all fragments of a datagram go one way.

/// IP protocol numbers with ports at the start of their header.
const TCP: u8 = 6;
const UDP: u8 = 17;
/// IPv6 fragment header.
const FRAGMENT: u8 = 44;

/// A 64-bit hash of the packet's flow; `None` for what is not an IPv4 or
/// IPv6 packet (too short, other version).
#[must_use]
pub fn flow_hash(packet: &[u8]) -> Option<u64> {
    let version = packet.first()? >> 4;
    let (addrs, proto, l4) = match version {
        4 => {
            let ihl = usize::from(packet.first()? & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return None;
            }
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            let fragment = frag & 0x3fff != 0;
            (&packet[12..20], packet[9], (!fragment).then_some(ihl))
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let next = packet[6];
            let l4 = (next != FRAGMENT).then_some(40);
            (&packet[8..40], next, l4)
        }
        _ => return None,
    };
    let mut h = mix(u64::from(proto) ^ 0x5745_4654);
    for chunk in addrs.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(word));
    }
    if let Some(off) = l4.filter(|_| proto == TCP || proto == UDP)
        && let Some(ports) = packet.get(off..off + 4)
    {
        h = mix(h ^ u64::from(u32::from_be_bytes([ports[0], ports[1], ports[2], ports[3]])));
    }
    Some(h)
}

/// Index in `0..n` for a flow hash, spread evenly; 0 when `n` is 0.
#[must_use]
pub fn pick(hash: u64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    // Multiply-shift: uses the high bits, which `mix` spreads well.
    ((u128::from(hash) * n as u128) >> 64) as usize
}

/// splitmix64's finaliser: a cheap, well-spread 64-bit mix (also the
/// controller's rendezvous hashing).
#[must_use]
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// An IPv4 packet: addresses 100.64.0.a -> 100.64.1.b, protocol,
    /// ports, TTL, fragment field and payload byte.
    #[allow(clippy::too_many_arguments)]
    fn v4(
        a: u8,
        b: u8,
        proto: u8,
        sport: u16,
        dport: u16,
        ttl: u8,
        frag: u16,
        fill: u8,
    ) -> Vec<u8> {
        let mut p = vec![fill; 48];
        p[0] = 0x45;
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[8] = ttl;
        p[9] = proto;
        p[12..16].copy_from_slice(&[100, 64, 0, a]);
        p[16..20].copy_from_slice(&[100, 64, 1, b]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn v6(a: u8, next: u8, sport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[6] = next;
        p[8] = 0xfd;
        p[23] = a;
        p[24] = 0xfd;
        p[39] = 9;
        p[40..42].copy_from_slice(&sport.to_be_bytes());
        p
    }

    #[test]
    fn ports_count_for_tcp_and_udp_but_not_for_fragments_or_icmp() {
        let h = |p: &[u8]| flow_hash(p).expect("an IP packet");
        assert_ne!(
            h(&v4(1, 2, TCP, 1000, 5432, 64, 0, 0)),
            h(&v4(1, 2, TCP, 1001, 5432, 64, 0, 0))
        );
        assert_ne!(
            h(&v4(1, 2, UDP, 1000, 53, 64, 0, 0)),
            h(&v4(1, 2, UDP, 1000, 54, 64, 0, 0))
        );
        // ICMP: bytes where ports would be do not matter.
        assert_eq!(
            h(&v4(1, 2, 1, 1000, 0, 64, 0, 0)),
            h(&v4(1, 2, 1, 2000, 7, 64, 0, 0))
        );
        // Fragments (MF, or an offset) hash without ports.
        assert_eq!(
            h(&v4(1, 2, UDP, 1000, 53, 64, 0x2000, 0)),
            h(&v4(1, 2, UDP, 9, 9, 64, 0x0010, 0))
        );
        assert_ne!(h(&v6(1, TCP, 1000)), h(&v6(1, TCP, 1001)));
        assert_eq!(h(&v6(1, FRAGMENT, 1000)), h(&v6(1, FRAGMENT, 1001)));
        assert_ne!(h(&v6(1, TCP, 1000)), h(&v6(2, TCP, 1000)));
        assert_eq!(flow_hash(&[]), None);
        assert_eq!(flow_hash(&[0x45; 10]), None);
        assert_eq!(flow_hash(&[0x20; 60]), None);
    }

    #[test]
    fn flows_spread_evenly() {
        let mut counts = [0usize; 3];
        for sport in 0..3000u16 {
            let h = flow_hash(&v4(1, 2, TCP, 10_000 + sport, 443, 64, 0, 0)).expect("IP");
            counts[pick(h, 3)] += 1;
        }
        for c in counts {
            assert!((850..1150).contains(&c), "{counts:?}");
        }
        assert_eq!(pick(u64::MAX, 0), 0);
    }

    proptest! {
        #[test]
        fn a_flow_hashes_the_same_whatever_its_ttl_and_payload(
            a in any::<u8>(), b in any::<u8>(), proto in prop::sample::select(vec![1u8, 6, 17]),
            sport in any::<u16>(), dport in any::<u16>(),
            ttl1 in any::<u8>(), ttl2 in any::<u8>(), fill1 in any::<u8>(), fill2 in any::<u8>(),
            n in 1usize..8,
        ) {
            let p1 = v4(a, b, proto, sport, dport, ttl1, 0, fill1);
            let p2 = v4(a, b, proto, sport, dport, ttl2, 0, fill2);
            let (h1, h2) = (flow_hash(&p1), flow_hash(&p2));
            prop_assert_eq!(h1, h2);
            prop_assert!(pick(h1.expect("IP"), n) < n);
        }
    }
}
