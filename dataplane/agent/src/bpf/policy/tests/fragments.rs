//! IP fragments and IPv6 extension headers under BPF_PROG_TEST_RUN: the
//! fragments of a datagram whose first fragment the policy allowed pass,
//! those of any other datagram are dropped; a header chain the program
//! cannot follow to its end, to a governed hosted destination, is dropped.

use weft_ebpf_common::policy::{FRAG_TIMEOUT_NS, MAX_V6_EXT};

use super::*;

/// Another address of CLIENT's identity (100.64.1.0/24).
const CLIENT_B_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 8);
const CLIENT_B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 8);
/// Fragment size (a multiple of 8), as a 1420-byte MTU gives roughly.
const FRAG: usize = 1392;
/// IPv6 next-header values.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const ESP: u8 = 50;
const AH: u8 = 51;
const DEST_OPTS: u8 = 60;
const ICMPV6: u8 = 58;

/// A UDP datagram from `src_port` to `dst_port` with `body` bytes of data.
fn udp(src_port: u16, dst_port: u16, body: usize) -> Vec<u8> {
    let len = u16::try_from(8 + body).expect("fits");
    let mut d = src_port.to_be_bytes().to_vec();
    d.extend_from_slice(&dst_port.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend((0..body).map(|i| u8::try_from(i % 251).expect("< 251")));
    d
}

/// An ICMP (ICMPv6 if `v6`) echo request with `body` bytes of data.
fn ping(v6: bool, id: u16, body: usize) -> Vec<u8> {
    let mut d = echo(if v6 { 128 } else { 8 }, id);
    d.extend(std::iter::repeat_n(0xa5, body));
    d
}

/// A TCP SYN to `dst_port` with `body` bytes of data.
fn tcp(dst_port: u16, body: usize) -> Vec<u8> {
    let mut d = tcp_header(40000, dst_port, SYN);
    d.extend(std::iter::repeat_n(0x5a, body));
    d
}

/// One fragment of an IPv4 datagram: `offset` in 8-byte units, `more` the
/// MF flag; the total length covers `data` exactly.
fn v4_frag(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    offset: usize,
    more: bool,
    data: &[u8],
) -> Vec<u8> {
    let total = u16::try_from(20 + data.len()).expect("fits");
    let flags = u16::try_from(offset).expect("fits") | if more { 0x2000 } else { 0 };
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(data);
    ethernet(0x0800, &p)
}

/// `datagram` (an L4 header and its data) cut into IPv4 fragments of
/// [`FRAG`] bytes, as the sender's kernel does.
fn v4_fragments(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, id: u16, datagram: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = datagram.chunks(FRAG).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| v4_frag(src, dst, proto, id, i * FRAG / 8, i + 1 < chunks.len(), c))
        .collect()
}

/// An IPv6 fragment header.
fn frag_header(next: u8, id: u32, offset: usize, more: bool) -> Vec<u8> {
    let field = u16::try_from(offset << 3).expect("fits") | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// An 8-byte Hop-by-Hop or Destination Options header (one PadN option).
fn options(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// An 8-byte Routing header (type 4) with `segments_left`.
fn routing(next: u8, segments_left: u8) -> Vec<u8> {
    vec![next, 0, 4, segments_left, 0, 0, 0, 0]
}

/// A 24-byte Authentication Header (12-byte ICV).
fn ah(next: u8) -> Vec<u8> {
    let mut h = vec![next, 4, 0, 0, 0, 0, 0x10, 0x01, 0, 0, 0, 1];
    h.extend_from_slice(&[0; 12]);
    h
}

/// `datagram` cut into IPv6 fragments of [`FRAG`] bytes, each after the
/// unfragmentable headers `unfrag` (whose first type is `first` and whose
/// last names the Fragment header next) and a Fragment header naming
/// `proto`.
fn v6_fragments_after(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    (first, unfrag): (u8, &[u8]),
    proto: u8,
    id: u32,
    datagram: &[u8],
) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = datagram.chunks(FRAG).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut p = unfrag.to_vec();
            p.extend_from_slice(&frag_header(proto, id, i * FRAG / 8, i + 1 < chunks.len()));
            p.extend_from_slice(c);
            v6_raw(src, dst, first, &p)
        })
        .collect()
}

fn v6_fragments(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, id: u32, datagram: &[u8]) -> Vec<Vec<u8>> {
    v6_fragments_after(src, dst, (FRAGMENT, &[]), proto, id, datagram)
}

/// An IPv6 packet whose payload-length field says `declared` bytes while
/// the frame carries all of `payload` (trailing bytes after the packet).
fn v6_declared(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8], declared: usize) -> Vec<u8> {
    let mut frame = v6_raw(src, dst, next, payload);
    let declared = u16::try_from(declared).expect("fits");
    frame[14 + 4..14 + 6].copy_from_slice(&declared.to_be_bytes());
    frame
}

/// Expects every fragment in turn to get `verdicts[i]` (the last verdict
/// repeats), with `rule` counted for each allowed or denied one.
fn expect_each(
    dp: &mut PolicyDatapath,
    what: &str,
    frames: &[Vec<u8>],
    verdicts: &[(PolicyVerdict, Option<u32>)],
) {
    assert!(frames.len() >= 2, "{what}: a fragmented datagram");
    for (i, frame) in frames.iter().enumerate() {
        let (verdict, rule) = verdicts[i.min(verdicts.len() - 1)];
        expect(dp, &format!("{what}, fragment {i}"), frame, verdict, rule);
    }
}

#[test]
fn v4_fragments_of_an_allowed_datagram_pass_and_of_a_denied_one_never_do() {
    let mut dp = loaded(&fixture());
    let (ok, deny, dd, bad) = (
        PolicyVerdict::Allowed,
        PolicyVerdict::Denied,
        PolicyVerdict::DefaultDenied,
        PolicyVerdict::Unparsable,
    );
    let allowed = v4_fragments(CLIENT_V4, WEB_V4, PROTO_UDP, 1, &udp(40000, 5000, 4000));
    assert_eq!(allowed.len(), 3);
    expect_each(&mut dp, "udp 5000", &allowed, &[(ok, Some(2))]);
    let denied = v4_fragments(CLIENT_V4, WEB_V4, PROTO_UDP, 2, &udp(40000, 5100, 4000));
    expect_each(
        &mut dp,
        "udp 5100",
        &denied,
        &[(deny, Some(3)), (bad, None)],
    );
    let default = v4_fragments(CLIENT_V4, WEB_V4, PROTO_UDP, 3, &udp(40000, 53, 4000));
    expect_each(&mut dp, "udp 53", &default, &[(dd, None), (bad, None)]);
    // ping -s 3000: allowed ICMP (rule 4); BLOCKED has no ICMP rule.
    let pings = v4_fragments(CLIENT_V4, WEB_V4, PROTO_ICMP, 4, &ping(false, 7, 3000));
    expect_each(&mut dp, "ping", &pings, &[(ok, Some(4))]);
    let blocked = v4_fragments(BLOCKED_V4, WEB_V4, PROTO_ICMP, 4, &ping(false, 7, 3000));
    expect_each(
        &mut dp,
        "blocked ping",
        &blocked,
        &[(dd, None), (bad, None)],
    );
    let syn = v4_fragments(CLIENT_V4, WEB_V4, PROTO_TCP, 5, &tcp(8080, 2000));
    expect_each(&mut dp, "tcp 8080", &syn, &[(ok, Some(1))]);
    let syn = v4_fragments(BLOCKED_V4, WEB_V4, PROTO_TCP, 5, &tcp(443, 2000));
    expect_each(
        &mut dp,
        "blocked tcp 443",
        &syn,
        &[(deny, Some(6)), (bad, None)],
    );
    // A datagram that passes whole remembers nothing; one that is
    // allowed in fragments is remembered once.
    // (Another source port: 40000 → 5000 is a tracked flow by now.)
    let whole = v4_frag(
        CLIENT_V4,
        WEB_V4,
        PROTO_UDP,
        6,
        0,
        false,
        &udp(40001, 5000, 8),
    );
    expect(&mut dp, "unfragmented udp 5000", &whole, ok, Some(2));
    let later = v4_frag(CLIENT_V4, WEB_V4, PROTO_UDP, 6, 2, false, &[0; 16]);
    expect(&mut dp, "fragment of a whole datagram", &later, bad, None);
    let datagrams = dp.tracked_datagrams().expect("tracked datagrams");
    assert_eq!(
        datagrams.len(),
        3,
        "udp 5000, ping, tcp 8080: {datagrams:?}"
    );
}

#[test]
fn v4_fragments_before_their_first_or_of_another_datagram_are_dropped() {
    let mut dp = loaded(&fixture());
    let (ok, bad) = (PolicyVerdict::Allowed, PolicyVerdict::Unparsable);
    let frags = v4_fragments(CLIENT_V4, WEB_V4, PROTO_UDP, 10, &udp(40000, 5000, 4000));
    expect(&mut dp, "second fragment first", &frags[1], bad, None);
    expect(&mut dp, "last fragment first", &frags[2], bad, None);
    expect(&mut dp, "first fragment", &frags[0], ok, Some(2));
    expect(&mut dp, "second fragment again", &frags[1], ok, Some(2));
    expect(&mut dp, "last fragment again", &frags[2], ok, Some(2));
    // The same identification from another address, to another hosted
    // address, or of another protocol is another datagram.
    let data = &udp(40000, 5000, 4000)[FRAG..2 * FRAG];
    let offset = FRAG / 8;
    for (what, frame) in [
        (
            "another source",
            v4_frag(CLIENT_B_V4, WEB_V4, PROTO_UDP, 10, offset, true, data),
        ),
        (
            "another destination",
            v4_frag(CLIENT_V4, WORKLOAD_V4, PROTO_UDP, 10, offset, true, data),
        ),
        (
            "another protocol",
            v4_frag(CLIENT_V4, WEB_V4, PROTO_TCP, 10, offset, true, data),
        ),
        (
            "another identification",
            v4_frag(CLIENT_V4, WEB_V4, PROTO_UDP, 11, offset, true, data),
        ),
    ] {
        expect(&mut dp, what, &frame, bad, None);
    }
}

#[test]
fn v4_first_fragments_without_their_whole_l4_header_are_dropped() {
    let mut dp = loaded(&fixture());
    let bad = PolicyVerdict::Unparsable;
    // A first fragment of 8 TCP bytes: the ports, not the flags.
    let segment = tcp(8080, 100);
    let tiny = v4_frag(CLIENT_V4, WEB_V4, PROTO_TCP, 20, 0, true, &segment[..8]);
    expect(&mut dp, "8-byte tcp first fragment", &tiny, bad, None);
    let rest = v4_frag(CLIENT_V4, WEB_V4, PROTO_TCP, 20, 1, false, &segment[8..]);
    expect(&mut dp, "the rest of the segment", &rest, bad, None);
    // The IPv4 total length ends before the UDP header; bytes after the
    // packet (which the kernel trims) are not read as one.
    let mut trailing = v4_frag(CLIENT_V4, WEB_V4, PROTO_UDP, 21, 0, true, &[]);
    trailing.extend_from_slice(&udp(40000, 5000, 0));
    expect(
        &mut dp,
        "udp header after the total length",
        &trailing,
        bad,
        None,
    );
    let mut whole = v4_frag(CLIENT_V4, WEB_V4, PROTO_UDP, 22, 0, false, &[0x9c, 0x40]);
    whole.extend_from_slice(&udp(40000, 5000, 0)[2..]);
    expect(
        &mut dp,
        "udp header cut by the total length",
        &whole,
        bad,
        None,
    );
    let datagrams = dp.tracked_datagrams().expect("tracked datagrams");
    assert!(datagrams.is_empty(), "nothing remembered: {datagrams:?}");
}

#[test]
fn a_remembered_datagram_expires() {
    let mut dp = loaded(&fixture());
    let (ok, bad) = (PolicyVerdict::Allowed, PolicyVerdict::Unparsable);
    let frags = v4_fragments(CLIENT_V4, WEB_V4, PROTO_UDP, 30, &udp(40000, 5000, 4000));
    expect(&mut dp, "first fragment", &frags[0], ok, Some(2));
    expect(&mut dp, "second fragment", &frags[1], ok, Some(2));
    dp.age_datagrams(FRAG_TIMEOUT_NS)
        .expect("ageing the remembered datagrams");
    expect(&mut dp, "last fragment, too late", &frags[2], bad, None);
}

#[test]
fn fragmented_replies_to_flows_the_node_opened_pass_as_established() {
    let mut dp = loaded(&fixture());
    let (est, deny, bad) = (
        PolicyVerdict::Established,
        PolicyVerdict::Denied,
        PolicyVerdict::Unparsable,
    );
    // WEB sends BLOCKED (which may send it no UDP 41000: rule 6 is TCP
    // only, so default deny) a fragmented UDP datagram: the first fragment
    // opens the flow, the others pass untracked.
    let query = v4_fragments(WEB_V4, BLOCKED_V4, PROTO_UDP, 40, &udp(41000, 53, 3000));
    for f in &query {
        send(&mut dp, f);
    }
    let flows = dp.tracked_flows().expect("tracked flows");
    assert_eq!(
        flows.len(),
        1,
        "the first fragment opened the flow: {flows:?}"
    );
    let answer = v4_fragments(BLOCKED_V4, WEB_V4, PROTO_UDP, 41, &udp(53, 41000, 3000));
    expect_each(&mut dp, "fragmented reply", &answer, &[(est, None)]);
    let stray = v4_fragments(BLOCKED_V4, WEB_V4, PROTO_UDP, 42, &udp(53, 41001, 3000));
    let dd = PolicyVerdict::DefaultDenied;
    expect_each(&mut dp, "not a reply", &stray, &[(dd, None), (bad, None)]);
    // TCP: WEB's SYN, then BLOCKED's fragmented segments.
    send(&mut dp, &v4_syn(WEB_V4, BLOCKED_V4, 41000, 22));
    let mut segment = tcp_header(22, 41000, ACK);
    segment.extend(std::iter::repeat_n(0x77, 3000));
    let segments = v4_fragments(BLOCKED_V4, WEB_V4, PROTO_TCP, 43, &segment);
    expect_each(&mut dp, "fragmented tcp reply", &segments, &[(est, None)]);
    let mut other = tcp_header(22, 41002, ACK);
    other.extend(std::iter::repeat_n(0x77, 3000));
    let others = v4_fragments(BLOCKED_V4, WEB_V4, PROTO_TCP, 44, &other);
    expect_each(
        &mut dp,
        "tcp, another port",
        &others,
        &[(deny, Some(6)), (bad, None)],
    );
    // IPv6: an echo request out, a fragmented echo reply in.
    send(&mut dp, &v6_raw(WEB_V6, STRANGER_V6, ICMPV6, &echo(128, 9)));
    let mut pong = echo(129, 9);
    pong.extend(std::iter::repeat_n(0xa5, 3000));
    let pongs = v6_fragments(STRANGER_V6, WEB_V6, ICMPV6, 45, &pong);
    expect_each(&mut dp, "fragmented v6 echo reply", &pongs, &[(est, None)]);
    // The node's own fragmented IPv6 datagram opens its flow too.
    for f in v6_fragments(WEB_V6, STRANGER_V6, PROTO_UDP, 46, &udp(41000, 53, 3000)) {
        send(&mut dp, &f);
    }
    let answer6 = v6_fragments(STRANGER_V6, WEB_V6, PROTO_UDP, 47, &udp(53, 41000, 3000));
    expect_each(&mut dp, "fragmented v6 udp reply", &answer6, &[(est, None)]);
}

#[test]
fn fragments_to_ungoverned_or_forwarded_destinations_pass_unremembered() {
    let mut dp = loaded(&fixture());
    let later = |dst| v4_frag(STRANGER_V4, dst, PROTO_UDP, 50, 10, false, &[0; 64]);
    expect(
        &mut dp,
        "fragment to open",
        &later(OPEN_V4),
        PolicyVerdict::NotGoverned,
        None,
    );
    expect(
        &mut dp,
        "fragment to peer",
        &later(PEER_V4),
        PolicyVerdict::Forwarded,
        None,
    );
    let frags = v6_fragments(CLIENT_V6, PEER_V6, PROTO_UDP, 51, &udp(40000, 22, 3000));
    expect_each(
        &mut dp,
        "v6 to peer",
        &frags,
        &[(PolicyVerdict::Forwarded, None)],
    );
    let datagrams = dp.tracked_datagrams().expect("tracked datagrams");
    assert!(datagrams.is_empty(), "{datagrams:?}");
}

#[test]
fn v6_fragments_of_an_allowed_datagram_pass_and_of_a_denied_one_never_do() {
    let mut dp = loaded(&fixture());
    let (ok, deny, dd, bad) = (
        PolicyVerdict::Allowed,
        PolicyVerdict::Denied,
        PolicyVerdict::DefaultDenied,
        PolicyVerdict::Unparsable,
    );
    let allowed = v6_fragments(CLIENT_V6, WEB_V6, PROTO_UDP, 1, &udp(40000, 5000, 4000));
    assert_eq!(allowed.len(), 3);
    expect_each(&mut dp, "v6 udp 5000", &allowed, &[(ok, Some(2))]);
    let denied = v6_fragments(CLIENT_V6, WEB_V6, PROTO_UDP, 2, &udp(40000, 5100, 4000));
    expect_each(
        &mut dp,
        "v6 udp 5100",
        &denied,
        &[(deny, Some(3)), (bad, None)],
    );
    let default = v6_fragments(CLIENT_V6, WEB_V6, PROTO_UDP, 3, &udp(40000, 53, 4000));
    expect_each(&mut dp, "v6 udp 53", &default, &[(dd, None), (bad, None)]);
    let pings = v6_fragments(CLIENT_V6, WEB_V6, ICMPV6, 4, &ping(true, 7, 3000));
    expect_each(&mut dp, "v6 ping", &pings, &[(ok, Some(4))]);
    let syn = v6_fragments(CLIENT_V6, WEB_V6, PROTO_TCP, 5, &tcp(8000, 2000));
    expect_each(&mut dp, "v6 tcp 8000", &syn, &[(ok, Some(1))]);
    // Out of order: a later fragment before the first is dropped.
    let late = v6_fragments(CLIENT_V6, WEB_V6, PROTO_UDP, 6, &udp(40000, 5001, 4000));
    expect(&mut dp, "v6 later fragment first", &late[2], bad, None);
    expect(&mut dp, "v6 first fragment", &late[0], ok, Some(2));
    expect(&mut dp, "v6 later fragment again", &late[2], ok, Some(2));
    // Another source of the same identity, same identification.
    let other = v6_fragments(CLIENT_B_V6, WEB_V6, PROTO_UDP, 6, &udp(40000, 5001, 4000));
    expect(&mut dp, "v6 another source", &other[1], bad, None);
    // An atomic fragment (offset 0, no more fragments) is a whole datagram.
    let mut atomic = frag_header(PROTO_UDP, 7, 0, false);
    atomic.extend_from_slice(&udp(40001, 5000, 8));
    let atomic = v6_raw(CLIENT_V6, WEB_V6, FRAGMENT, &atomic);
    expect(&mut dp, "v6 atomic fragment", &atomic, ok, Some(2));
    let datagrams = dp.tracked_datagrams().expect("tracked datagrams");
    assert_eq!(
        datagrams.len(),
        4,
        "udp 5000, ping, tcp, udp 5001: {datagrams:?}"
    );
}

#[test]
fn v6_extension_headers_around_the_fragment_header_are_walked() {
    let mut dp = loaded(&fixture());
    let (ok, deny, bad) = (
        PolicyVerdict::Allowed,
        PolicyVerdict::Denied,
        PolicyVerdict::Unparsable,
    );
    // Hop-by-Hop, Destination Options, Routing (no segment left) before
    // the Fragment header.
    let mut unfrag = options(DEST_OPTS);
    unfrag.extend_from_slice(&options(ROUTING));
    unfrag.extend_from_slice(&routing(FRAGMENT, 0));
    let chain = (HOP_BY_HOP, unfrag.as_slice());
    let allowed = v6_fragments_after(
        CLIENT_V6,
        WEB_V6,
        chain,
        PROTO_UDP,
        60,
        &udp(40000, 5000, 4000),
    );
    expect_each(&mut dp, "hbh+dst+rt, udp 5000", &allowed, &[(ok, Some(2))]);
    let denied = v6_fragments_after(
        CLIENT_V6,
        WEB_V6,
        chain,
        PROTO_UDP,
        61,
        &udp(40000, 5100, 4000),
    );
    expect_each(
        &mut dp,
        "hbh+dst+rt, udp 5100",
        &denied,
        &[(deny, Some(3)), (bad, None)],
    );
    // AH and Destination Options after the Fragment header, in the
    // fragmentable part (in the first fragment only).
    let mut inner = ah(DEST_OPTS);
    inner.extend_from_slice(&options(PROTO_UDP));
    inner.extend_from_slice(&udp(40001, 5000, 4000));
    let frags = v6_fragments(CLIENT_V6, WEB_V6, AH, 62, &inner);
    expect_each(&mut dp, "frag+ah+dst, udp 5000", &frags, &[(ok, Some(2))]);
    let mut inner = ah(DEST_OPTS);
    inner.extend_from_slice(&options(PROTO_UDP));
    inner.extend_from_slice(&udp(40000, 5100, 4000));
    let frags = v6_fragments(CLIENT_V6, WEB_V6, AH, 63, &inner);
    expect_each(
        &mut dp,
        "frag+ah+dst, udp 5100",
        &frags,
        &[(deny, Some(3)), (bad, None)],
    );
}

#[test]
fn v6_chains_that_are_too_long_malformed_or_truncated_are_dropped() {
    let mut dp = loaded(&fixture());
    let (ok, bad) = (PolicyVerdict::Allowed, PolicyVerdict::Unparsable);
    let (_, segment) = l4_bytes(L4::Tcp(8000), true);
    // MAX_V6_EXT headers are walked; one more is too many.
    let chain = |n: usize| {
        let mut p = Vec::new();
        for i in 0..n {
            p.extend_from_slice(&options(if i + 1 < n { DEST_OPTS } else { PROTO_TCP }));
        }
        p.extend_from_slice(&segment);
        v6_raw(CLIENT_V6, WEB_V6, DEST_OPTS, &p)
    };
    expect(
        &mut dp,
        "longest chain walked",
        &chain(MAX_V6_EXT),
        ok,
        Some(1),
    );
    expect(
        &mut dp,
        "one header too many",
        &chain(MAX_V6_EXT + 1),
        bad,
        None,
    );
    // Hop-by-Hop anywhere but first.
    let mut p = options(HOP_BY_HOP);
    p.extend_from_slice(&options(PROTO_TCP));
    p.extend_from_slice(&segment);
    let late_hbh = v6_raw(CLIENT_V6, WEB_V6, DEST_OPTS, &p);
    expect(
        &mut dp,
        "hop-by-hop after another header",
        &late_hbh,
        bad,
        None,
    );
    // A Routing header with segments left sends the packet on: its final
    // destination is not the one judged.
    let mut p = routing(PROTO_TCP, 1);
    p.extend_from_slice(&segment);
    let source_routed = v6_raw(CLIENT_V6, WEB_V6, ROUTING, &p);
    expect(
        &mut dp,
        "routing header, 1 segment left",
        &source_routed,
        bad,
        None,
    );
    let mut p = routing(PROTO_TCP, 0);
    p.extend_from_slice(&l4_bytes(L4::Tcp(8001), true).1);
    let done = v6_raw(CLIENT_V6, WEB_V6, ROUTING, &p);
    expect(
        &mut dp,
        "routing header, 0 segments left",
        &done,
        ok,
        Some(1),
    );
    // Two Fragment headers.
    let mut p = frag_header(FRAGMENT, 70, 0, true);
    p.extend_from_slice(&frag_header(PROTO_TCP, 71, 0, true));
    p.extend_from_slice(&segment);
    let twice = v6_raw(CLIENT_V6, WEB_V6, FRAGMENT, &p);
    expect(&mut dp, "two fragment headers", &twice, bad, None);
    // ESP hides what follows.
    let esp = v6_raw(
        CLIENT_V6,
        WEB_V6,
        ESP,
        &[0, 0, 0x10, 1, 0, 0, 0, 1, 0, 0, 0, 0],
    );
    expect(&mut dp, "esp", &esp, bad, None);
    // A header cut short: its length says 16 bytes, 8 are there.
    let cut = v6_raw(
        CLIENT_V6,
        WEB_V6,
        DEST_OPTS,
        &[PROTO_TCP, 1, 1, 4, 0, 0, 0, 0],
    );
    expect(&mut dp, "truncated destination options", &cut, bad, None);
    // The payload length ends before the TCP header: bytes after the
    // packet (which the kernel trims) are not read as one.
    let mut p = options(PROTO_TCP);
    p.extend_from_slice(&segment);
    let trailing = v6_declared(CLIENT_V6, WEB_V6, DEST_OPTS, &p, 8);
    expect(
        &mut dp,
        "tcp header after the payload length",
        &trailing,
        bad,
        None,
    );
}

/// RFC 7112: the first fragment must hold the whole header chain. A first
/// fragment whose L4 header is missing (or only in bytes after the packet)
/// is dropped, and so are the fragments that would carry that header.
#[test]
fn v6_first_fragments_without_their_l4_header_are_dropped() {
    let mut dp = loaded(&fixture());
    let bad = PolicyVerdict::Unparsable;
    let datagram = {
        let mut d = options(PROTO_UDP);
        d.extend_from_slice(&udp(40000, 5100, 40));
        d
    };
    // First fragment: the Fragment header and the Destination Options
    // only; the UDP header (to a denied port) comes in the next one.
    let mut first = frag_header(DEST_OPTS, 80, 0, true);
    first.extend_from_slice(&datagram[..8]);
    let first = v6_raw(CLIENT_V6, WEB_V6, FRAGMENT, &first);
    expect(&mut dp, "first fragment without udp", &first, bad, None);
    let mut second = frag_header(DEST_OPTS, 80, 1, false);
    second.extend_from_slice(&datagram[8..]);
    let second = v6_raw(CLIENT_V6, WEB_V6, FRAGMENT, &second);
    expect(&mut dp, "second fragment with udp 5100", &second, bad, None);
    // The same, with a UDP header to an allowed port after the packet's
    // declared end: still no L4 header in the first fragment.
    let mut first = frag_header(DEST_OPTS, 81, 0, true);
    first.extend_from_slice(&datagram[..8]);
    let declared = first.len();
    first.extend_from_slice(&udp(40000, 5000, 0));
    let first = v6_declared(CLIENT_V6, WEB_V6, FRAGMENT, &first, declared);
    expect(
        &mut dp,
        "allowed udp header after the packet",
        &first,
        bad,
        None,
    );
    let mut second = frag_header(DEST_OPTS, 81, 1, false);
    second.extend_from_slice(&datagram[8..]);
    let second = v6_raw(CLIENT_V6, WEB_V6, FRAGMENT, &second);
    expect(&mut dp, "its second fragment", &second, bad, None);
    let datagrams = dp.tracked_datagrams().expect("tracked datagrams");
    assert!(datagrams.is_empty(), "{datagrams:?}");
}
