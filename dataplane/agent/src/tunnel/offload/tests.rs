use proptest::prelude::*;

use super::*;

/// RFC 1071 the slow way: 16-bit big-endian words, end-around carry.
fn reference_checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut acc: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        acc += u32::from(word);
        acc = (acc & 0xffff) + (acc >> 16);
    }
    #[allow(clippy::cast_possible_truncation)]
    let folded = acc as u16;
    !folded
}

/// Whether the TCP checksum of `pkt` is right, computed the slow way.
fn tcp_checksum_ok(pkt: &[u8]) -> bool {
    let v6 = pkt[0] >> 4 == 6;
    let ip_len = if v6 {
        40
    } else {
        usize::from(pkt[0] & 0x0f) * 4
    };
    let (src, dst) = addrs(pkt, v6);
    let l4 = pkt.len() - ip_len;
    let pseudo: Vec<u8> = if v6 {
        [src, dst, &(l4 as u32).to_be_bytes(), &[0, 0, 0, PROTO_TCP]].concat()
    } else {
        [src, dst, &[0, PROTO_TCP], &(l4 as u16).to_be_bytes()].concat()
    };
    reference_checksum(&[&pseudo, &pkt[ip_len..]]) == 0
}

fn ipv4_header_ok(pkt: &[u8]) -> bool {
    reference_checksum(&[&pkt[..20]]) == 0
}

/// A TCP packet as the kernel hands it to a TUN device with TSO: one
/// header, `payload` bytes, a partial checksum (pseudo-header sum only).
#[derive(Debug)]
struct Super {
    v6: bool,
    options: Vec<u8>,
    flags: u8,
    seq: u32,
    payload: Vec<u8>,
}

impl Super {
    fn tcp_len(&self) -> usize {
        20 + self.options.len()
    }

    fn ip_len(&self) -> usize {
        if self.v6 { 40 } else { 20 }
    }

    fn packet(&self) -> Vec<u8> {
        let total = self.ip_len() + self.tcp_len() + self.payload.len();
        let mut p = vec![0u8; self.ip_len()];
        if self.v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = PROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0xfff0u16.to_be_bytes()); // id wraps
            p[6] = 0x40; // DF
            p[8] = 64;
            p[9] = PROTO_TCP;
            p[12..16].copy_from_slice(&[100, 64, 0, 1]);
            p[16..20].copy_from_slice(&[100, 64, 0, 2]);
            ipv4_header_checksum(&mut p[..20]);
        }
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
        tcp[12] = ((self.tcp_len() / 4) as u8) << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        p.extend_from_slice(&tcp);
        p.extend_from_slice(&self.options);
        p.extend_from_slice(&self.payload);
        let ip_len = self.ip_len();
        let (src, dst) = addrs(&p, self.v6);
        let ph = fold(pseudo_header_sum(src, dst, PROTO_TCP, total - ip_len));
        p[ip_len + 16..ip_len + 18].copy_from_slice(&ph.to_be_bytes());
        p
    }

    fn vnet(&self, mss: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if self.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            // Deliberately wrong, as the kernel may send it.
            hdr_len: 1000,
            gso_size: mss,
            csum_start: self.ip_len() as u16,
            csum_offset: 16,
        }
    }
}

fn split(s: &Super, mss: u16) -> Vec<Vec<u8>> {
    let pkt = s.packet();
    let plan = TsoPlan::new(&pkt, &s.vnet(mss)).expect("valid super-segment");
    let mut out = vec![0u8; pkt.len()];
    (0..plan.count())
        .map(|i| {
            let n = plan.segment(&pkt, i, &mut out);
            out[..n].to_vec()
        })
        .collect()
}

fn payload_of(pkt: &[u8]) -> &[u8] {
    let v6 = pkt[0] >> 4 == 6;
    let ip_len = if v6 {
        40
    } else {
        usize::from(pkt[0] & 0x0f) * 4
    };
    let tcp_len = usize::from(pkt[ip_len + 12] >> 4) * 4;
    &pkt[ip_len + tcp_len..]
}

fn coalesce(segments: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut c = Coalescer::default();
    for s in segments {
        c.push(s);
    }
    let out = c.finish().map(<[u8]>::to_vec).collect();
    c.clear();
    out
}

/// What the kernel does with a packet we write: completes a partial
/// checksum; returns the header and the packet.
fn as_kernel_sees(written: &[u8]) -> (VnetHdr, Vec<u8>) {
    let hdr = VnetHdr::decode(written).expect("vnet header");
    let mut pkt = written[VNET_HDR_LEN..].to_vec();
    if hdr.flags & F_NEEDS_CSUM != 0 {
        complete_checksum(
            &mut pkt,
            usize::from(hdr.csum_start),
            usize::from(hdr.csum_offset),
        )
        .expect("checksum offsets inside the packet");
    }
    (hdr, pkt)
}

#[test]
fn vnet_header_round_trips() {
    let h = VnetHdr {
        flags: 1,
        gso_type: GSO_TCPV6,
        hdr_len: 74,
        gso_size: 1360,
        csum_start: 40,
        csum_offset: 16,
    };
    let mut b = [0u8; VNET_HDR_LEN];
    h.encode(&mut b);
    assert_eq!(VnetHdr::decode(&b), Some(h));
    assert_eq!(VnetHdr::decode(&b[..9]), None);
}

#[test]
fn checksum_of_a_known_ipv4_header() {
    // From RFC 1071's usual worked example (Wikipedia "IPv4 header
    // checksum"): the checksum field is 0xb861.
    let mut h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    ipv4_header_checksum(&mut h);
    assert_eq!(&h[10..12], &[0xb8, 0x61]);
}

#[test]
fn segments_carry_their_own_headers() {
    let s = Super {
        v6: false,
        options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2], // NOP NOP timestamps
        flags: TCP_ACK | TCP_PSH | TCP_CWR,
        seq: u32::MAX - 1000, // wraps
        payload: (0..3000u32).map(|i| i as u8).collect(),
    };
    let segs = split(&s, 1200);
    assert_eq!(segs.len(), 3);
    let lens: Vec<usize> = segs.iter().map(|p| payload_of(p).len()).collect();
    assert_eq!(lens, vec![1200, 1200, 600]);
    for (i, p) in segs.iter().enumerate() {
        assert!(ipv4_header_ok(p), "IPv4 header checksum of segment {i}");
        assert!(tcp_checksum_ok(p), "TCP checksum of segment {i}");
        assert_eq!(usize::from(be16(p, 2)), p.len());
        assert_eq!(be16(p, 4), 0xfff0u16.wrapping_add(i as u16));
        assert_eq!(be32(p, 24), s.seq.wrapping_add(1200 * i as u32));
        let flags = p[33];
        assert_eq!(flags & TCP_PSH != 0, i == 2, "PSH only on the last");
        assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
        assert!(flags & TCP_ACK != 0);
    }
    let joined: Vec<u8> = segs.iter().flat_map(|p| payload_of(p).to_vec()).collect();
    assert_eq!(joined, s.payload);
}

#[test]
fn segmentation_rejects_inconsistent_headers() {
    let s = Super {
        v6: false,
        options: vec![],
        flags: TCP_ACK,
        seq: 1,
        payload: vec![0; 100],
    };
    let pkt = s.packet();
    let mut h = s.vnet(50);
    h.gso_type = GSO_TCPV6;
    assert!(TsoPlan::new(&pkt, &h).is_err(), "version mismatch");
    let mut h = s.vnet(50);
    h.gso_size = 0;
    assert!(TsoPlan::new(&pkt, &h).is_err(), "zero MSS");
    let mut h = s.vnet(50);
    h.csum_start = 200;
    assert!(TsoPlan::new(&pkt, &h).is_err(), "csum_start past the end");
    let mut h = s.vnet(50);
    h.gso_type = 5; // UDP
    assert_eq!(TsoPlan::new(&pkt, &h), Err(OffloadError::Unsupported(5)));
    assert!(TsoPlan::new(&pkt[..30], &s.vnet(50)).is_err(), "truncated");
}

#[test]
fn fin_segment_is_not_merged_but_keeps_its_place() {
    let s = Super {
        v6: true,
        options: vec![],
        flags: TCP_ACK | TCP_FIN,
        seq: 5,
        payload: vec![7; 4000],
    };
    let segs = split(&s, 1000);
    let out = coalesce(&segs);
    assert_eq!(out.len(), 2, "three merged, the FIN alone");
    let (h0, p0) = as_kernel_sees(&out[0]);
    assert_eq!((h0.gso_type, h0.gso_size), (GSO_TCPV6, 1000));
    assert_eq!(payload_of(&p0).len(), 3000);
    assert!(tcp_checksum_ok(&p0));
    let (h1, p1) = as_kernel_sees(&out[1]);
    assert_eq!(h1, VnetHdr::default());
    assert_eq!(p1, segs[3]);
}

#[test]
fn corrupt_or_out_of_order_segments_are_not_merged() {
    let s = Super {
        v6: false,
        options: vec![],
        flags: TCP_ACK,
        seq: 1,
        payload: vec![3; 5000],
    };
    let mut segs = split(&s, 1000);
    segs[2][60] ^= 0xff; // payload byte: checksum now wrong
    let out = coalesce(&segs);
    // [0,1] merged, [2] alone (bad checksum), [3] cannot follow [1]
    // across the hole, [3,4] merged.
    assert_eq!(out.len(), 3);
    assert_eq!(out[1][VNET_HDR_LEN..], segs[2][..]);
    let mut segs = split(&s, 1000);
    segs.swap(1, 2);
    let out = coalesce(&segs);
    let order: Vec<u32> = out.iter().map(|w| be32(&as_kernel_sees(w).1, 24)).collect();
    assert_eq!(order, vec![1, 2001, 1001, 3001], "arrival order kept");
}

#[test]
fn non_tcp_packets_pass_through_in_order() {
    let udp = {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[9] = 17;
        p
    };
    let s = Super {
        v6: false,
        options: vec![],
        flags: TCP_ACK,
        seq: 1,
        payload: vec![1; 2000],
    };
    let segs = split(&s, 1000);
    let out = coalesce(&[segs[0].clone(), udp.clone(), segs[1].clone()]);
    // The UDP packet belongs to no TCP flow: the segments still merge.
    assert_eq!(out.len(), 2);
    assert_eq!(out[1][VNET_HDR_LEN..], udp[..]);
    assert_eq!(out[1][..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
}

fn any_super() -> impl Strategy<Value = (Super, u16)> {
    (
        any::<bool>(),
        prop::sample::select(vec![0usize, 4, 12, 40]),
        prop::sample::select(vec![TCP_ACK, TCP_ACK | TCP_PSH]),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 1..20_000),
        prop::sample::select(vec![1u16, 7, 536, 1000, 1228, 1368, 1380, 9000]),
    )
        .prop_map(|(v6, opts, flags, seq, payload, mss)| {
            let options = (0..opts)
                .map(|i| if i % 4 == 0 { 1 } else { i as u8 })
                .collect();
            (
                Super {
                    v6,
                    options,
                    flags,
                    seq,
                    payload,
                },
                mss,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn sum_matches_the_reference(data in prop::collection::vec(any::<u8>(), 0..3000)) {
        prop_assert_eq!(!fold(sum(&data, 0)), reference_checksum(&[&data]));
    }

    /// Sums chain: a running sum (in network order) plus the host-order
    /// fast loop of the next part is the sum of both parts.
    #[test]
    fn sums_chain_across_parts(
        prefix in prop::collection::vec(any::<u16>(), 0..100),
        data in prop::collection::vec(any::<u8>(), 0..3000),
    ) {
        let prefix: Vec<u8> = prefix.iter().flat_map(|w| w.to_be_bytes()).collect();
        let mut out = vec![0u8; data.len()];
        let copied = copy_sum(&mut out, &data, sum(&prefix, 0));
        prop_assert_eq!(!fold(sum(&data, sum(&prefix, 0))), reference_checksum(&[&prefix, &data]));
        prop_assert_eq!(!fold(copied), reference_checksum(&[&prefix, &data]));
    }

    #[test]
    fn copy_sum_copies_and_sums(data in prop::collection::vec(any::<u8>(), 0..3000)) {
        let mut out = vec![0u8; data.len()];
        let acc = copy_sum(&mut out, &data, 0);
        prop_assert_eq!(&out, &data);
        prop_assert_eq!(!fold(acc), reference_checksum(&[&data]));
    }

    #[test]
    fn split_then_coalesce_round_trips((s, mss) in any_super()) {
        let segs = split(&s, mss);
        let mss = usize::from(mss);
        prop_assert_eq!(segs.len(), s.payload.len().div_ceil(mss));
        for p in &segs {
            prop_assert!(tcp_checksum_ok(p));
            prop_assert!(s.v6 || ipv4_header_ok(p));
            prop_assert!(payload_of(p).len() <= mss);
        }
        let out = coalesce(&segs);
        // At most 64 segments and 64 KB per super-packet.
        prop_assert!(out.len() >= segs.len().div_ceil(MAX_MERGED));
        let mut joined = Vec::new();
        let mut seq = s.seq;
        for w in &out {
            let (h, p) = as_kernel_sees(w);
            prop_assert!(p.len() <= MAX_IP_LEN);
            prop_assert!(tcp_checksum_ok(&p), "super-packet checksum");
            prop_assert!(s.v6 || ipv4_header_ok(&p));
            let ip_len = s.ip_len();
            prop_assert_eq!(be32(&p, ip_len + 4), seq);
            let body = payload_of(&p);
            if h.gso_type != GSO_NONE {
                prop_assert_eq!(usize::from(h.gso_size), mss.min(s.payload.len()));
                prop_assert_eq!(usize::from(h.hdr_len), ip_len + s.tcp_len());
            }
            seq = seq.wrapping_add(body.len() as u32);
            joined.extend_from_slice(body);
        }
        prop_assert_eq!(joined, s.payload);
    }

    #[test]
    fn coalescing_never_reorders_a_flow(
        (s, _) in any_super(),
        order in prop::collection::vec(0usize..64, 0..40),
    ) {
        // Segments of one flow in a random order (with repeats): every
        // packet's bytes come out, in arrival order.
        let segs = split(&s, 500);
        let input: Vec<Vec<u8>> = order.iter().map(|i| segs[i % segs.len()].clone()).collect();
        let out = coalesce(&input);
        let got: Vec<u8> = out.iter().flat_map(|w| payload_of(&as_kernel_sees(w).1).to_vec()).collect();
        let want: Vec<u8> = input.iter().flat_map(|p| payload_of(p).to_vec()).collect();
        prop_assert_eq!(got, want);
    }
}
