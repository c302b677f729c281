//! BPF_PROG_TEST_RUN tests of the policy classifiers (need root).
//!
//! BPF_PROG_TEST_RUN hands TC programs an Ethernet frame (the kernel runs
//! `eth_type_trans` on the input and sets `skb->protocol` from it), so the
//! datapath is loaded as [`LinkLayer::Ethernet`] here: the program reads the
//! L3 offset from its config map, 14 here, 0 on the TUN device. Everything
//! after the offset is the same code path. One test also writes packets
//! into a real TUN device in a fresh network namespace ([`LinkLayer::Ip`]).

// Only `setns(2)` and the TUNSETIFF ioctl, for the TUN test.
#![allow(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use aya::programs::{TestRun as _, TestRunOptions};
use ipnet::IpNet;
use weft_dataplane_core::policy_maps::{
    self, Decision, PolicyInput, PolicyMaps, PolicyTuple, Protocol, Verdict, lower,
};
use weft_ebpf_common::policy::{
    CT_OUTBOUND, PROTO_ICMP, PROTO_TCP, PROTO_UDP, PolicyKey, RULE_COUNTER_SLOTS, VERDICT_ALLOW,
    VERDICT_DENY,
};

use super::*;

mod fragments;

const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_UNSPEC` (-1) as BPF_PROG_TEST_RUN reports it (`TCX_NEXT`).
const TC_ACT_UNSPEC: u32 = u32::MAX;

const WEB: u32 = 10;
const OPEN: u32 = 11;
const CLIENT: u32 = 20;
const BLOCKED: u32 = 21;

const WEB_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const OPEN_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 7);
const BLOCKED_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 2, 7);
const STRANGER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const WEB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const OPEN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7);
const STRANGER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
/// Another node of WEB's identity (same site and labels), which this node
/// relays packets to, as a gateway does: not hosted here.
const PEER_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
/// In WEB's workload prefix hosted here (100.100.2.0/24).
const WORKLOAD_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 2, 9);
/// In a workload prefix of WEB's identity hosted elsewhere.
const REMOTE_WORKLOAD_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 3, 9);

#[derive(Clone, Copy, Debug)]
enum L4 {
    Tcp(u16),
    Udp(u16),
    Icmp,
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn l4_bytes(l4: L4, v6: bool) -> (u8, Vec<u8>) {
    match l4 {
        L4::Tcp(port) => {
            let mut h = 40000u16.to_be_bytes().to_vec();
            h.extend_from_slice(&port.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
            (PROTO_TCP, h)
        }
        L4::Udp(port) => {
            let mut h = 40000u16.to_be_bytes().to_vec();
            h.extend_from_slice(&port.to_be_bytes());
            h.extend_from_slice(&[0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
            (PROTO_UDP, h)
        }
        L4::Icmp if v6 => (58, vec![128, 0, 0, 0, 0, 1, 0, 1]),
        L4::Icmp => (PROTO_ICMP, vec![8, 0, 0, 0, 0, 1, 0, 1]),
    }
}

/// IPv4 packet (header without options, DF) in an Ethernet frame.
fn v4_raw(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("fits");
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    ethernet(0x0800, &p)
}

fn v4(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Vec<u8> {
    let (proto, payload) = l4_bytes(l4, false);
    v4_raw(src, dst, proto, &payload)
}

/// IPv6 packet whose first next-header is `next`, then `payload`.
fn v6_raw(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("fits");
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    ethernet(0x86dd, &p)
}

fn v6(src: Ipv6Addr, dst: Ipv6Addr, l4: L4) -> Vec<u8> {
    let (proto, payload) = l4_bytes(l4, true);
    v6_raw(src, dst, proto, &payload)
}

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

fn tuple(
    src: u32,
    protocol: Protocol,
    (first, last): (u16, u16),
    verdict: Verdict,
    rule: u32,
) -> PolicyTuple {
    PolicyTuple {
        dst: WEB,
        src,
        protocol,
        first,
        last,
        verdict,
        rule,
    }
}

/// WEB is governed, OPEN is not. CLIENT may reach WEB on TCP 8000-8080
/// (rule 1), UDP 5000-5199 except 5100, which a deny rule takes (the
/// compiler's split: rules 2, 3, 2), and ICMP (rule 4); anyone unknown
/// (WORLD) on TCP 443 (rule 5); BLOCKED is denied all TCP (rule 6).
/// This node hosts WEB's and OPEN's addresses and the workload prefix
/// 100.100.2.0/24; PEER and 100.100.0.0/16 outside it have WEB's identity
/// but live on other nodes.
fn fixture() -> PolicyMaps {
    lower(&fixture_input()).expect("valid fixture")
}

fn fixture_input() -> PolicyInput {
    PolicyInput {
        ipcache: vec![
            (net("100.64.0.1/32"), WEB),
            (net("100.64.0.2/32"), OPEN),
            (net("100.64.0.3/32"), WEB),
            (net("100.64.1.0/24"), CLIENT),
            (net("100.64.2.0/24"), BLOCKED),
            (net("100.100.0.0/16"), WEB),
            (net("fd00::1/128"), WEB),
            (net("fd00::2/128"), OPEN),
            (net("fd00::3/128"), WEB),
            (net("fd00:1::/64"), CLIENT),
        ],
        governed: [WEB].into(),
        tuples: vec![
            tuple(CLIENT, Protocol::Tcp, (8000, 8080), Verdict::Allow, 1),
            tuple(CLIENT, Protocol::Udp, (5000, 5099), Verdict::Allow, 2),
            tuple(CLIENT, Protocol::Udp, (5100, 5100), Verdict::Deny, 3),
            tuple(CLIENT, Protocol::Udp, (5101, 5199), Verdict::Allow, 2),
            tuple(CLIENT, Protocol::Icmp, (0, 0), Verdict::Allow, 4),
            tuple(
                policy_maps::WORLD,
                Protocol::Tcp,
                (443, 443),
                Verdict::Allow,
                5,
            ),
            tuple(BLOCKED, Protocol::Tcp, (0, u16::MAX), Verdict::Deny, 6),
        ],
        rules: Vec::new(),
        local: vec![
            net("100.64.0.1/32"),
            net("fd00::1/128"),
            net("100.64.0.2/32"),
            net("fd00::2/128"),
            net("100.100.2.0/24"),
        ],
    }
}

fn loaded(maps: &PolicyMaps) -> PolicyDatapath {
    let mut dp = PolicyDatapath::load(LinkLayer::Ethernet)
        .unwrap_or_else(|e| panic!("loading the policy classifiers failed (run as root): {e:#}"));
    dp.sync(maps).expect("filling the maps");
    dp
}

fn run(dp: &mut PolicyDatapath, program: &str, frame: &[u8]) -> u32 {
    let opts = TestRunOptions {
        data_in: Some(frame),
        ..Default::default()
    };
    classifier(dp.ebpf_mut(), program)
        .expect("classifier in the object")
        .test_run(opts)
        .map_err(anyhow::Error::from)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {program} failed (root?): {e:#}"))
        .return_value
}

fn len(frame: &[u8]) -> u64 {
    u64::try_from(frame.len()).expect("fits")
}

/// Runs the ingress classifier once on `frame` and checks its action, that
/// exactly the `verdict` counter moved by one packet of the frame's
/// length, and that `rule`'s counter (if any) moved by the same and, when
/// the policy is small, no other rule's counter moved.
fn expect(
    dp: &mut PolicyDatapath,
    what: &str,
    frame: &[u8],
    verdict: PolicyVerdict,
    rule: Option<u32>,
) {
    let slots: Vec<u32> = if dp.current().policy.len() < 1000 {
        let all: std::collections::BTreeSet<u32> =
            dp.current().policy.values().map(|v| v.rule).collect();
        all.into_iter().collect()
    } else {
        rule.into_iter().collect()
    };
    let rules = |dp: &PolicyDatapath| -> Vec<Counters> {
        slots
            .iter()
            .map(|&r| dp.rule_counter(r).expect("rule counter"))
            .collect()
    };
    let (verdicts_before, rules_before) = (dp.verdict_counters().expect("verdicts"), rules(dp));
    let action = run(dp, POLICY_INGRESS_PROGRAM, frame);
    let (verdicts_after, rules_after) = (dp.verdict_counters().expect("verdicts"), rules(dp));
    let want_action = match verdict {
        PolicyVerdict::Allowed
        | PolicyVerdict::NotGoverned
        | PolicyVerdict::EgressPassed
        | PolicyVerdict::Established
        | PolicyVerdict::Forwarded => TC_ACT_UNSPEC,
        PolicyVerdict::Denied | PolicyVerdict::DefaultDenied | PolicyVerdict::Unparsable => {
            TC_ACT_SHOT
        }
    };
    assert_eq!(action, want_action, "{what}: action (want {verdict:?})");
    let one = Counters {
        packets: 1,
        bytes: len(frame),
    };
    for v in PolicyVerdict::ALL {
        let i = v.index() as usize;
        let moved = delta(verdicts_before[i], verdicts_after[i]);
        let want = if v == verdict {
            one
        } else {
            Counters::default()
        };
        assert_eq!(moved, want, "{what}: {v:?} counter (want {verdict:?})");
    }
    for ((slot, before), after) in slots.iter().zip(rules_before).zip(rules_after) {
        let want = if rule == Some(*slot) {
            one
        } else {
            Counters::default()
        };
        assert_eq!(delta(before, after), want, "{what}: counter of rule {slot}");
    }
}

fn delta(before: Counters, after: Counters) -> Counters {
    Counters {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
    }
}

#[test]
fn layout_constants_agree_with_the_lowering() {
    assert_eq!(policy_maps::RULE_SLOTS, RULE_COUNTER_SLOTS);
    assert_eq!(policy_maps::PORT_PREFIX_START, PolicyKey::PORT_PREFIX_START);
    assert_eq!(policy_maps::WORLD, weft_ebpf_common::policy::WORLD);
    assert_eq!(Protocol::Tcp.number(), PROTO_TCP);
    assert_eq!(Protocol::Udp.number(), PROTO_UDP);
    assert_eq!(Protocol::Icmp.number(), PROTO_ICMP);
    assert_eq!(Verdict::Allow.code(), VERDICT_ALLOW);
    assert_eq!(Verdict::Deny.code(), VERDICT_DENY);
    assert_eq!(
        policy_maps::MAX_BLOCKS_PER_RANGE,
        weft_ebpf_common::policy::MAX_BLOCKS_PER_RANGE
    );
}

#[test]
fn allows_by_rule_over_tcp_udp_icmp_v4_and_v6() {
    let mut dp = loaded(&fixture());
    let ok = PolicyVerdict::Allowed;
    expect(
        &mut dp,
        "v4 tcp 8000",
        &v4(CLIENT_V4, WEB_V4, L4::Tcp(8000)),
        ok,
        Some(1),
    );
    expect(
        &mut dp,
        "v6 tcp 8043",
        &v6(CLIENT_V6, WEB_V6, L4::Tcp(8043)),
        ok,
        Some(1),
    );
    expect(
        &mut dp,
        "v4 udp 5000",
        &v4(CLIENT_V4, WEB_V4, L4::Udp(5000)),
        ok,
        Some(2),
    );
    expect(
        &mut dp,
        "v6 udp 5199",
        &v6(CLIENT_V6, WEB_V6, L4::Udp(5199)),
        ok,
        Some(2),
    );
    expect(
        &mut dp,
        "v4 icmp",
        &v4(CLIENT_V4, WEB_V4, L4::Icmp),
        ok,
        Some(4),
    );
    expect(
        &mut dp,
        "v6 icmpv6",
        &v6(CLIENT_V6, WEB_V6, L4::Icmp),
        ok,
        Some(4),
    );
}

#[test]
fn deny_rule_wins_over_allow() {
    let mut dp = loaded(&fixture());
    let (deny, ok) = (PolicyVerdict::Denied, PolicyVerdict::Allowed);
    expect(
        &mut dp,
        "v4 udp 5100",
        &v4(CLIENT_V4, WEB_V4, L4::Udp(5100)),
        deny,
        Some(3),
    );
    expect(
        &mut dp,
        "v6 udp 5100",
        &v6(CLIENT_V6, WEB_V6, L4::Udp(5100)),
        deny,
        Some(3),
    );
    expect(
        &mut dp,
        "v4 udp 5099",
        &v4(CLIENT_V4, WEB_V4, L4::Udp(5099)),
        ok,
        Some(2),
    );
    expect(
        &mut dp,
        "v4 udp 5101",
        &v4(CLIENT_V4, WEB_V4, L4::Udp(5101)),
        ok,
        Some(2),
    );
    // BLOCKED's deny-all TCP, even on the port WORLD may use.
    let blocked = v4(BLOCKED_V4, WEB_V4, L4::Tcp(443));
    expect(&mut dp, "blocked tcp 443", &blocked, deny, Some(6));
}

#[test]
fn default_deny_for_governed_and_pass_for_not_governed() {
    let mut dp = loaded(&fixture());
    let dd = PolicyVerdict::DefaultDenied;
    expect(
        &mut dp,
        "v4 tcp 22",
        &v4(CLIENT_V4, WEB_V4, L4::Tcp(22)),
        dd,
        None,
    );
    expect(
        &mut dp,
        "v6 udp 53",
        &v6(CLIENT_V6, WEB_V6, L4::Udp(53)),
        dd,
        None,
    );
    // BLOCKED has no ICMP rule: default deny, not its TCP deny.
    expect(
        &mut dp,
        "blocked icmp",
        &v4(BLOCKED_V4, WEB_V4, L4::Icmp),
        dd,
        None,
    );
    // A protocol no rule names (GRE) to a governed destination.
    let gre = v4_raw(CLIENT_V4, WEB_V4, 47, &[0, 0, 0x08, 0, 0, 0, 0, 0]);
    expect(&mut dp, "v4 gre", &gre, dd, None);

    let open = PolicyVerdict::NotGoverned;
    expect(
        &mut dp,
        "v4 to open",
        &v4(STRANGER_V4, OPEN_V4, L4::Tcp(22)),
        open,
        None,
    );
    expect(
        &mut dp,
        "v6 to open",
        &v6(STRANGER_V6, OPEN_V6, L4::Udp(9)),
        open,
        None,
    );
    // An address the ipcache does not know is WORLD, not governed here.
    expect(
        &mut dp,
        "v4 to world",
        &v4(CLIENT_V4, STRANGER_V4, L4::Icmp),
        open,
        None,
    );
}

#[test]
fn port_range_boundaries() {
    let mut dp = loaded(&fixture());
    let (ok, dd) = (PolicyVerdict::Allowed, PolicyVerdict::DefaultDenied);
    for (port, verdict, rule) in [
        (7999, dd, None),
        (8000, ok, Some(1)),
        (8080, ok, Some(1)),
        (8081, dd, None),
    ] {
        let what = format!("v4 tcp {port}");
        expect(
            &mut dp,
            &what,
            &v4(CLIENT_V4, WEB_V4, L4::Tcp(port)),
            verdict,
            rule,
        );
        let what = format!("v6 tcp {port}");
        expect(
            &mut dp,
            &what,
            &v6(CLIENT_V6, WEB_V6, L4::Tcp(port)),
            verdict,
            rule,
        );
    }
    // Same ports over UDP have no rule.
    let udp = v4(CLIENT_V4, WEB_V4, L4::Udp(8000));
    expect(&mut dp, "v4 udp 8000", &udp, dd, None);
}

#[test]
fn unknown_source_is_world() {
    let mut dp = loaded(&fixture());
    let (ok, dd) = (PolicyVerdict::Allowed, PolicyVerdict::DefaultDenied);
    expect(
        &mut dp,
        "v4 world 443",
        &v4(STRANGER_V4, WEB_V4, L4::Tcp(443)),
        ok,
        Some(5),
    );
    expect(
        &mut dp,
        "v6 world 443",
        &v6(STRANGER_V6, WEB_V6, L4::Tcp(443)),
        ok,
        Some(5),
    );
    // WORLD has nothing on 8000, which CLIENT may use.
    expect(
        &mut dp,
        "v4 world 8000",
        &v4(STRANGER_V4, WEB_V4, L4::Tcp(8000)),
        dd,
        None,
    );
}

#[test]
fn unparsable_packets_to_governed_destinations_are_dropped_and_counted() {
    let mut dp = loaded(&fixture());
    let bad = PolicyVerdict::Unparsable;
    // TCP header cut after 2 bytes (the destination port is missing).
    let cut = v4_raw(CLIENT_V4, WEB_V4, PROTO_TCP, &[0x9c, 0x40]);
    expect(&mut dp, "v4 truncated tcp", &cut, bad, None);
    let cut6 = v6_raw(CLIENT_V6, WEB_V6, PROTO_UDP, &[0x9c]);
    expect(&mut dp, "v6 truncated udp", &cut6, bad, None);
    let icmp_cut = v6_raw(CLIENT_V6, WEB_V6, 58, &[128]);
    expect(&mut dp, "v6 truncated icmpv6", &icmp_cut, bad, None);
    // (An IP header cut short cannot be fed in: BPF_PROG_TEST_RUN refuses
    // an IPv4/IPv6 ethertype without the whole fixed header, EINVAL. The
    // program drops it through the same `Error::Unparsable` path.)
    // Ethertype says IPv4, the version nibble says otherwise.
    let mut garbage = v4(CLIENT_V4, WEB_V4, L4::Tcp(8000));
    garbage[14] = 0x95;
    expect(&mut dp, "v4 bad version", &garbage, bad, None);
    // IHL below 5.
    let mut ihl = v4(CLIENT_V4, WEB_V4, L4::Tcp(8000));
    ihl[14] = 0x43;
    expect(&mut dp, "v4 ihl 3", &ihl, bad, None);
    // A non-first IPv4 fragment has no L4 header.
    let mut frag = v4(CLIENT_V4, WEB_V4, L4::Tcp(8000));
    frag[14 + 6..14 + 8].copy_from_slice(&[0x00, 0x10]);
    expect(&mut dp, "v4 non-first fragment", &frag, bad, None);
    // IPv6 non-first fragment.
    let frag6 = v6_raw(
        CLIENT_V6,
        WEB_V6,
        44,
        &[6, 0, 0x00, 0x08, 0, 0, 0, 1, 1, 2, 3, 4],
    );
    expect(&mut dp, "v6 non-first fragment", &frag6, bad, None);
    // One IPv6 extension header more than the program walks.
    let mut chain = Vec::new();
    for _ in 0..weft_ebpf_common::policy::MAX_V6_EXT {
        chain.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    chain.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
    let (_, tcp) = l4_bytes(L4::Tcp(8000), true);
    chain.extend_from_slice(&tcp);
    let long = v6_raw(CLIENT_V6, WEB_V6, 0, &chain);
    expect(&mut dp, "v6 too many extension headers", &long, bad, None);

    // Truncated to an ungoverned destination: passes.
    let open_cut = v4_raw(CLIENT_V4, OPEN_V4, PROTO_TCP, &[0x9c, 0x40]);
    expect(
        &mut dp,
        "v4 truncated to open",
        &open_cut,
        PolicyVerdict::NotGoverned,
        None,
    );
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut dp = loaded(&fixture());
    let (_, tcp) = l4_bytes(L4::Tcp(8080), true);
    // Hop-by-Hop (8 B) → Destination Options (16 B) → first fragment → TCP.
    let mut chain = vec![60, 0, 1, 4, 0, 0, 0, 0];
    chain.extend_from_slice(&[44, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    chain.extend_from_slice(&[6, 0, 0x00, 0x01, 0, 0, 0, 7]);
    chain.extend_from_slice(&tcp);
    let frame = v6_raw(CLIENT_V6, WEB_V6, 0, &chain);
    expect(
        &mut dp,
        "v6 hbh+dstopts+frag tcp 8080",
        &frame,
        PolicyVerdict::Allowed,
        Some(1),
    );
}

#[test]
fn egress_counts_and_passes() {
    let mut dp = loaded(&fixture());
    let frame = v4(WEB_V4, CLIENT_V4, L4::Tcp(22));
    let action = run(&mut dp, POLICY_EGRESS_PROGRAM, &frame);
    assert_eq!(action, TC_ACT_UNSPEC);
    let counters = dp.counters().expect("counters");
    assert_eq!(
        counters.verdict(PolicyVerdict::EgressPassed),
        Counters {
            packets: 1,
            bytes: len(&frame)
        }
    );
}

#[test]
fn diffs_change_verdicts_without_reloading() {
    let mut dp = loaded(&PolicyMaps::default());
    let to_web = v4(CLIENT_V4, WEB_V4, L4::Tcp(8000));
    // Empty maps: nothing governed.
    expect(&mut dp, "empty", &to_web, PolicyVerdict::NotGoverned, None);
    let report = dp.sync(&fixture()).expect("apply fixture");
    assert!(!report.change.is_empty());
    expect(&mut dp, "fixture", &to_web, PolicyVerdict::Allowed, Some(1));
    // Narrow rule 1 to 8001-8080: 8000 falls to default deny.
    let mut input_narrow = fixture();
    let narrowed = lower(&PolicyInput {
        ipcache: vec![],
        governed: [WEB].into(),
        tuples: vec![tuple(
            CLIENT,
            Protocol::Tcp,
            (8001, 8080),
            Verdict::Allow,
            1,
        )],
        rules: Vec::new(),
        local: Vec::new(),
    })
    .expect("valid");
    input_narrow
        .policy
        .retain(|k, _| k.proto != PROTO_TCP || k.src != CLIENT);
    input_narrow.policy.extend(narrowed.policy);
    let report = dp.sync(&input_narrow).expect("apply narrowing");
    let diff = report.change;
    assert!(!diff.policy_deletes.is_empty() && !diff.policy_upserts.is_empty());
    // The flow the fixture admitted on 8000 is tracked no more.
    assert_eq!(report.flows_revoked, 1, "the 8000 flow is revoked");
    assert_eq!(dp.current(), &input_narrow);
    expect(
        &mut dp,
        "narrowed 8000",
        &to_web,
        PolicyVerdict::DefaultDenied,
        None,
    );
    let to_8001 = v4(CLIENT_V4, WEB_V4, L4::Tcp(8001));
    expect(
        &mut dp,
        "narrowed 8001",
        &to_8001,
        PolicyVerdict::Allowed,
        Some(1),
    );
    // Ungovern WEB: everything to it passes again.
    let mut open = input_narrow.clone();
    open.governed.clear();
    dp.sync(&open).expect("apply ungovern");
    expect(
        &mut dp,
        "ungoverned",
        &to_web,
        PolicyVerdict::NotGoverned,
        None,
    );
    // Deleting what is already gone is not an error (a retried diff).
    let again = policy_maps::MapsDiff {
        policy_deletes: diff.policy_deletes.clone(),
        governed_deletes: vec![OPEN],
        ..Default::default()
    };
    let inactive = 1 - dp.active_epoch();
    dp.apply_epoch(inactive, &again)
        .expect("deletes of missing entries");
    // Back to empty.
    dp.sync(&PolicyMaps::default()).expect("clear");
    assert_eq!(dp.current(), &PolicyMaps::default());
    expect(
        &mut dp,
        "cleared",
        &to_web,
        PolicyVerdict::NotGoverned,
        None,
    );
}

/// 10,000 rule tuples over 100 destination and 100 source identities, with
/// unaligned port ranges (many blocks each): the kernel's verdicts, over
/// IPv4 and IPv6, agree with the reference lookup on the range edges of a
/// sample of rules.
#[test]
fn ten_thousand_rules_keep_the_right_verdicts() {
    const RULES: u32 = 10_000;
    let dst_of = |i: u32| 1000 + i / 100;
    let src_of = |i: u32| 2000 + i % 100;
    let low = |id: u32| u8::try_from(id % 1000).expect("< 100");
    let v4_of =
        |id: u32| Ipv4Addr::new(100, 64 + u8::try_from(id / 1000).expect("< 3"), 0, low(id));
    let v6_of = |id: u32| {
        Ipv6Addr::new(
            0xfd00,
            u16::try_from(id / 1000).expect("fits"),
            0,
            0,
            0,
            0,
            0,
            u16::from(low(id)),
        )
    };
    let mut input = PolicyInput::default();
    for i in 0..RULES {
        let first = 1001 + u16::try_from((i * 37) % 20_000).expect("fits");
        let last = first + 1 + u16::try_from((i * 101) % 3000).expect("fits");
        input.tuples.push(PolicyTuple {
            dst: dst_of(i),
            src: src_of(i),
            protocol: if i % 2 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            first,
            last,
            verdict: if i % 3 == 0 {
                Verdict::Deny
            } else {
                Verdict::Allow
            },
            rule: i,
        });
    }
    for id in (1000..1100).chain(2000..2100) {
        if id < 2000 {
            input.governed.insert(id);
            input
                .local
                .push(IpNet::from(std::net::IpAddr::from(v4_of(id))));
            input
                .local
                .push(IpNet::from(std::net::IpAddr::from(v6_of(id))));
        }
        input
            .ipcache
            .push((IpNet::from(std::net::IpAddr::from(v4_of(id))), id));
        input
            .ipcache
            .push((IpNet::from(std::net::IpAddr::from(v6_of(id))), id));
    }
    let maps = lower(&input).expect("valid");
    let started = Instant::now();
    let mut dp = loaded(&maps);
    eprintln!(
        "{RULES} rules = {} policy entries, loaded and filled in {:?}",
        maps.policy.len(),
        started.elapsed()
    );
    assert!(maps.policy.len() > usize::try_from(RULES).expect("fits"));

    let mut checked = 0;
    for i in (0..RULES).step_by(97) {
        let t = input.tuples[usize::try_from(i).expect("fits")];
        for port in [t.first - 1, t.first, t.last, t.last + 1] {
            let l4 = match t.protocol {
                Protocol::Tcp => L4::Tcp(port),
                Protocol::Udp => L4::Udp(port),
                Protocol::Icmp => L4::Icmp,
            };
            let (verdict, rule) = match maps.decide(t.dst, t.src, t.protocol.number(), port) {
                Decision::Rule {
                    verdict: Verdict::Allow,
                    rule,
                } => (PolicyVerdict::Allowed, Some(rule)),
                Decision::Rule {
                    verdict: Verdict::Deny,
                    rule,
                } => (PolicyVerdict::Denied, Some(rule)),
                Decision::DefaultDeny => (PolicyVerdict::DefaultDenied, None),
                Decision::NotGoverned => (PolicyVerdict::NotGoverned, None),
                Decision::Forwarded => (PolicyVerdict::Forwarded, None),
            };
            if port == t.first || port == t.last {
                assert_eq!(
                    rule,
                    Some(i),
                    "rule {i} port {port}: the reference disagrees"
                );
            }
            let what = format!("rule {i} ({:?}) port {port}", t.protocol);
            let frame = v4(v4_of(t.src), v4_of(t.dst), l4);
            expect(&mut dp, &format!("v4 {what}"), &frame, verdict, rule);
            let frame = v6(v6_of(t.src), v6_of(t.dst), l4);
            expect(&mut dp, &format!("v6 {what}"), &frame, verdict, rule);
            checked += 2;
        }
    }
    assert!(checked >= 800, "checked {checked} packets");
}

/// A fresh network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status()
        {
            Ok(s) if s.success() => {}
            other => eprintln!("deleting netns {} failed: {other:?}", self.0),
        }
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (iproute2)");
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens TUN device `name` (IFF_TUN | IFF_NO_PI) in the calling thread's
/// network namespace.
fn open_tun(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd as _;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // struct ifreq: 16-byte name, then the flags (a short) in the union.
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = i16::try_from(libc::IFF_TUN | libc::IFF_NO_PI).expect("flags fit a short");
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: `file` is an open /dev/net/tun descriptor; `req` is a 40-byte
    // `struct ifreq` the kernel reads and writes within its bounds.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// Strips the Ethernet header our builders add: on TUN the packet starts
/// at the IP header.
fn l3(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

#[test]
fn enforces_on_a_tun_device_where_packets_start_at_the_ip_header() {
    use std::io::Write as _;
    let pid = std::process::id();
    let ns = Netns::create(format!("weft-pol-{pid}"));
    let ifname = format!("wpol{pid}");
    let moved = std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{}", ns.0)).expect("netns file");
            use std::os::fd::AsRawFd as _;
            // SAFETY: an open netns descriptor; only this thread moves.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let tun = open_tun(&ifname);
            ip(&["-n", &ns.0, "link", "set", &ifname, "up"]);
            let mut dp = PolicyDatapath::load(LinkLayer::Ip).expect("load (root?)");
            dp.attach(&ifname).expect("attach to the TUN device");
            dp.sync(&fixture()).expect("fill the maps");
            let packets = [
                l3(&v4(CLIENT_V4, WEB_V4, L4::Tcp(8000))).to_vec(),
                l3(&v6(CLIENT_V6, WEB_V6, L4::Udp(5100))).to_vec(),
                l3(&v4(CLIENT_V4, WEB_V4, L4::Tcp(22))).to_vec(),
                l3(&v6(STRANGER_V6, OPEN_V6, L4::Tcp(22))).to_vec(),
                l3(&v4_raw(CLIENT_V4, WEB_V4, PROTO_TCP, &[0x9c, 0x40])).to_vec(),
                l3(&v4(CLIENT_V4, PEER_V4, L4::Tcp(22))).to_vec(),
            ];
            let before = dp.verdict_counters().expect("counters");
            for p in &packets {
                (&tun).write_all(p).expect("write into the TUN device");
            }
            let after = dp.verdict_counters().expect("counters");
            // Egress is left out: the kernel may send IPv6 router
            // solicitations out of the new device at any time.
            let moved: Vec<(PolicyVerdict, Counters)> = PolicyVerdict::ALL
                .iter()
                .filter(|&&v| v != PolicyVerdict::EgressPassed)
                .map(|&v| {
                    let i = v.index() as usize;
                    (v, delta(before[i], after[i]))
                })
                .collect();
            (moved, packets.map(|p| len(&p)))
        })
        .join()
        .expect("netns thread panicked")
    });
    let (moved, lens) = moved;
    let one = |l: u64| Counters {
        packets: 1,
        bytes: l,
    };
    assert_eq!(
        moved,
        vec![
            (PolicyVerdict::Allowed, one(lens[0])),
            (PolicyVerdict::Denied, one(lens[1])),
            (PolicyVerdict::DefaultDenied, one(lens[2])),
            (PolicyVerdict::Unparsable, one(lens[4])),
            (PolicyVerdict::NotGoverned, one(lens[3])),
            (PolicyVerdict::Established, Counters::default()),
            (PolicyVerdict::Forwarded, one(lens[5])),
        ],
        "verdict counters on the TUN device (bytes = IP packet lengths: no link header)"
    );
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn tcp_header(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut h = src_port.to_be_bytes().to_vec();
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

/// A TCP segment with ACK set (not opening a connection).
fn v4_tcp(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    v4_raw(src, dst, PROTO_TCP, &tcp_header(src_port, dst_port, ACK))
}

/// A TCP SYN (opening a connection).
fn v4_syn(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    v4_raw(src, dst, PROTO_TCP, &tcp_header(src_port, dst_port, SYN))
}

fn v6_syn(src: Ipv6Addr, dst: Ipv6Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    v6_raw(src, dst, PROTO_TCP, &tcp_header(src_port, dst_port, SYN))
}

fn v6_tcp(src: Ipv6Addr, dst: Ipv6Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    v6_raw(src, dst, PROTO_TCP, &tcp_header(src_port, dst_port, ACK))
}

/// An ICMP (or ICMPv6) message of `kind` with echo identifier `id`.
fn echo(kind: u8, id: u16) -> Vec<u8> {
    let mut h = vec![kind, 0, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h
}

/// Runs the egress classifier: it never drops.
fn send(dp: &mut PolicyDatapath, frame: &[u8]) {
    assert_eq!(
        run(dp, POLICY_EGRESS_PROGRAM, frame),
        TC_ACT_UNSPEC,
        "egress passes"
    );
}

#[test]
fn replies_to_flows_the_node_opened_pass_as_established() {
    let mut dp = loaded(&fixture());
    let (est, dd, deny) = (
        PolicyVerdict::Established,
        PolicyVerdict::DefaultDenied,
        PolicyVerdict::Denied,
    );
    // BLOCKED may send WEB no TCP at all (rule 6).
    let reply = v4_tcp(BLOCKED_V4, WEB_V4, 22, 41000);
    expect(&mut dp, "reply before WEB opened", &reply, deny, Some(6));
    // A TCP segment that opens nothing does not track.
    send(&mut dp, &v4_tcp(WEB_V4, BLOCKED_V4, 41000, 22));
    expect(&mut dp, "reply to an ACK", &reply, deny, Some(6));
    send(&mut dp, &v4_syn(WEB_V4, BLOCKED_V4, 41000, 22));
    expect(&mut dp, "reply to WEB's flow", &reply, est, None);
    expect(&mut dp, "reply again", &reply, est, None);
    let other_port = v4_tcp(BLOCKED_V4, WEB_V4, 22, 41001);
    expect(&mut dp, "another local port", &other_port, deny, Some(6));
    let other_remote = v4_tcp(BLOCKED_V4, WEB_V4, 23, 41000);
    expect(&mut dp, "another remote port", &other_remote, deny, Some(6));
    // IPv6, to an unknown (WORLD) address that may only reach 443.
    let reply6 = v6_tcp(STRANGER_V6, WEB_V6, 80, 41000);
    expect(&mut dp, "v6 reply before", &reply6, dd, None);
    send(&mut dp, &v6_syn(WEB_V6, STRANGER_V6, 41000, 80));
    expect(&mut dp, "v6 reply", &reply6, est, None);
    // ICMP echo: the reply to WEB's request passes, by identifier.
    let pong = v4_raw(BLOCKED_V4, WEB_V4, PROTO_ICMP, &echo(0, 77));
    expect(&mut dp, "echo reply before", &pong, dd, None);
    send(
        &mut dp,
        &v4_raw(WEB_V4, BLOCKED_V4, PROTO_ICMP, &echo(8, 77)),
    );
    expect(&mut dp, "echo reply", &pong, est, None);
    let other_id = v4_raw(BLOCKED_V4, WEB_V4, PROTO_ICMP, &echo(0, 78));
    expect(&mut dp, "echo reply, other id", &other_id, dd, None);
    // A tracked echo does not open the door to echo requests.
    let ping_in = v4_raw(BLOCKED_V4, WEB_V4, PROTO_ICMP, &echo(8, 77));
    expect(&mut dp, "echo request in", &ping_in, dd, None);
    let ping6_in = v6_raw(STRANGER_V6, WEB_V6, 58, &echo(128, 5));
    expect(&mut dp, "v6 echo request in", &ping6_in, dd, None);
    send(&mut dp, &v6_raw(WEB_V6, STRANGER_V6, 58, &echo(128, 9)));
    let pong6 = v6_raw(STRANGER_V6, WEB_V6, 58, &echo(129, 9));
    expect(&mut dp, "v6 echo reply", &pong6, est, None);
    // An echo reply the node sends does not track anything.
    send(
        &mut dp,
        &v4_raw(WEB_V4, BLOCKED_V4, PROTO_ICMP, &echo(0, 99)),
    );
    let stray = v4_raw(BLOCKED_V4, WEB_V4, PROTO_ICMP, &echo(8, 99));
    expect(&mut dp, "request after our reply", &stray, dd, None);
    let flows = dp.tracked_flows().expect("tracked flows");
    assert_eq!(flows.len(), 4, "three outbound flows and echo 9: {flows:?}");
    assert!(flows.iter().all(|(_, v)| v.origin == CT_OUTBOUND));
}

#[test]
fn allowed_flows_survive_policy_changes_until_revoked() {
    let mut dp = loaded(&fixture());
    let (ok, est, dd) = (
        PolicyVerdict::Allowed,
        PolicyVerdict::Established,
        PolicyVerdict::DefaultDenied,
    );
    let first = v4_tcp(CLIENT_V4, WEB_V4, 40000, 8000);
    expect(&mut dp, "first packet", &first, ok, Some(1));
    expect(&mut dp, "second packet", &first, est, None);
    let flows = dp.tracked_flows().expect("tracked flows");
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].1.origin, flows[0].1.rule), (CT_INBOUND, 1));
    // A flow WEB opened to BLOCKED, which policy would deny.
    send(&mut dp, &v4_syn(WEB_V4, BLOCKED_V4, 41000, 22));
    let reply = v4_tcp(BLOCKED_V4, WEB_V4, 22, 41000);

    // An unrelated change: the epoch flips, both flows keep passing.
    let epoch = dp.active_epoch();
    let mut unrelated = fixture();
    unrelated.governed.insert(OPEN);
    let report = dp.sync(&unrelated).expect("unrelated change");
    assert_eq!(report.flows_revoked, 0);
    assert_ne!(dp.active_epoch(), epoch, "the change flips the epoch");
    expect(
        &mut dp,
        "allowed flow after an unrelated change",
        &first,
        est,
        None,
    );
    expect(
        &mut dp,
        "opened flow after an unrelated change",
        &reply,
        est,
        None,
    );
    // Syncing the same policy writes nothing and does not flip.
    let epoch = dp.active_epoch();
    let report = dp.sync(&unrelated).expect("same policy");
    assert_eq!((report.written, report.flows_revoked), (0, 0));
    assert!(report.change.is_empty());
    assert_eq!(dp.active_epoch(), epoch);

    // Revoke CLIENT's TCP rule: its flow ends, WEB's own flow stays.
    let mut revoked = unrelated.clone();
    revoked
        .policy
        .retain(|k, _| k.proto != PROTO_TCP || k.src != CLIENT);
    let report = dp.sync(&revoked).expect("revoking change");
    assert_eq!(report.flows_revoked, 1);
    expect(&mut dp, "revoked flow", &first, dd, None);
    // WEB's own packets of the revoked flow (an ACK, a retransmission) do
    // not re-open it.
    send(&mut dp, &v4_tcp(WEB_V4, CLIENT_V4, 8000, 40000));
    expect(&mut dp, "revoked flow after WEB's ACK", &first, dd, None);
    assert_eq!(
        dp.tracked_flow_count().expect("count"),
        1,
        "only WEB's own flow is live"
    );
    expect(
        &mut dp,
        "opened flow after the revocation",
        &reply,
        est,
        None,
    );
    // Both epochs were written by diffs: the stale one caught up.
    let report = dp.sync(&fixture()).expect("back to the fixture");
    assert!(report.written > 0);
    assert_eq!(dp.current(), &fixture());
    expect(&mut dp, "allowed again", &first, ok, Some(1));
}

/// A gateway relays packets to PEER, another node of WEB's identity: it
/// passes them as forwarded, without a policy lookup and without tracking
/// them (PEER judges them, with its own flow state), and still enforces
/// on the addresses it hosts itself.
#[test]
fn packets_to_addresses_hosted_elsewhere_pass_as_forwarded_untracked() {
    let mut dp = loaded(&fixture());
    let (fwd, dd, ok) = (
        PolicyVerdict::Forwarded,
        PolicyVerdict::DefaultDenied,
        PolicyVerdict::Allowed,
    );
    // What default deny drops at WEB passes to PEER.
    let to_peer = v4(CLIENT_V4, PEER_V4, L4::Tcp(22));
    expect(&mut dp, "v4 tcp 22 to peer", &to_peer, fwd, None);
    expect(
        &mut dp,
        "v6 udp 53 to peer",
        &v6(CLIENT_V6, PEER_V6, L4::Udp(53)),
        fwd,
        None,
    );
    // The reply of a flow PEER opened through another gateway.
    let reply = v4_tcp(BLOCKED_V4, PEER_V4, 22, 41000);
    expect(&mut dp, "reply to peer's flow", &reply, fwd, None);
    // What a rule allows at WEB (and would track) is neither counted in
    // the rule nor tracked for PEER.
    let allowed = v4_tcp(CLIENT_V4, PEER_V4, 40000, 8000);
    expect(&mut dp, "allowed port to peer", &allowed, fwd, None);
    expect(&mut dp, "allowed port again", &allowed, fwd, None);
    expect(
        &mut dp,
        "v6 icmp to peer",
        &v6(CLIENT_V6, PEER_V6, L4::Icmp),
        fwd,
        None,
    );
    let remote = v4(CLIENT_V4, REMOTE_WORKLOAD_V4, L4::Tcp(22));
    expect(&mut dp, "workload prefix elsewhere", &remote, fwd, None);
    // Unparsable L4 to a forwarded destination passes too: it is judged
    // where it is going.
    let cut = v4_raw(CLIENT_V4, PEER_V4, PROTO_TCP, &[0x9c, 0x40]);
    expect(&mut dp, "truncated tcp to peer", &cut, fwd, None);
    let flows = dp.tracked_flows().expect("tracked flows");
    assert!(
        flows.is_empty(),
        "forwarded packets track nothing: {flows:?}"
    );

    // The same packets to addresses hosted here are judged.
    expect(
        &mut dp,
        "v4 tcp 22 to web",
        &v4(CLIENT_V4, WEB_V4, L4::Tcp(22)),
        dd,
        None,
    );
    let to_web = v4_tcp(CLIENT_V4, WEB_V4, 40000, 8000);
    expect(&mut dp, "allowed port to web", &to_web, ok, Some(1));
    let workload = v4(CLIENT_V4, WORKLOAD_V4, L4::Tcp(22));
    expect(&mut dp, "hosted workload prefix", &workload, dd, None);
    let flows = dp.tracked_flows().expect("tracked flows");
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0].0.dst, policy_maps::lookup_addr(WEB_V4.into()));

    // PEER's address moves here (a hosted-prefix change flips the epoch):
    // enforced; and back: forwarded again.
    let mut input = fixture_input();
    input.local.push(net("100.64.0.3/32"));
    let hosting = lower(&input).expect("valid");
    let epoch = dp.active_epoch();
    let report = dp.sync(&hosting).expect("host peer's address");
    assert_eq!(report.change.hosted_upserts.len(), 1);
    assert_ne!(dp.active_epoch(), epoch);
    expect(&mut dp, "hosted now", &to_peer, dd, None);
    expect(&mut dp, "allowed, hosted now", &allowed, ok, Some(1));
    let report = dp.sync(&fixture()).expect("peer's address leaves");
    assert_eq!(report.change.hosted_deletes.len(), 1);
    assert_eq!(
        report.flows_revoked, 0,
        "an address leaving revokes nothing"
    );
    expect(&mut dp, "forwarded again", &to_peer, fwd, None);
    assert_eq!(dp.current(), &fixture());
}

/// The egress classifier opens flows only for packets from addresses this
/// node hosts: what a gateway forwards leaves untracked, so replies to it
/// are not taken for replies to the gateway's own flows.
#[test]
fn egress_tracks_only_flows_of_hosted_sources() {
    let mut dp = loaded(&fixture());
    let (fwd, est, deny) = (
        PolicyVerdict::Forwarded,
        PolicyVerdict::Established,
        PolicyVerdict::Denied,
    );
    // PEER opens flows through this node (TCP, UDP, ICMP echo, v4 and v6).
    send(&mut dp, &v4_syn(PEER_V4, BLOCKED_V4, 41000, 22));
    send(&mut dp, &v4(PEER_V4, CLIENT_V4, L4::Udp(53)));
    send(
        &mut dp,
        &v4_raw(PEER_V4, BLOCKED_V4, PROTO_ICMP, &echo(8, 77)),
    );
    send(&mut dp, &v6_syn(PEER_V6, STRANGER_V6, 41000, 80));
    send(&mut dp, &v6_raw(PEER_V6, CLIENT_V6, 58, &echo(128, 9)));
    send(&mut dp, &v4_syn(REMOTE_WORKLOAD_V4, BLOCKED_V4, 41000, 22));
    let flows = dp.tracked_flows().expect("tracked flows");
    assert!(
        flows.is_empty(),
        "forwarded packets open no flow: {flows:?}"
    );
    let reply = v4_tcp(BLOCKED_V4, PEER_V4, 22, 41000);
    expect(&mut dp, "reply to a forwarded flow", &reply, fwd, None);

    // The same from hosted sources opens flows.
    send(&mut dp, &v4_syn(WEB_V4, BLOCKED_V4, 41000, 22));
    send(&mut dp, &v4_syn(WORKLOAD_V4, BLOCKED_V4, 41000, 22));
    send(&mut dp, &v6_raw(WEB_V6, CLIENT_V6, 58, &echo(128, 9)));
    let flows = dp.tracked_flows().expect("tracked flows");
    assert_eq!(flows.len(), 3, "{flows:?}");
    assert!(flows.iter().all(|(_, v)| v.origin == CT_OUTBOUND));
    let reply = v4_tcp(BLOCKED_V4, WEB_V4, 22, 41000);
    expect(&mut dp, "reply to web's flow", &reply, est, None);
    let reply = v4_tcp(BLOCKED_V4, WORKLOAD_V4, 22, 41000);
    expect(&mut dp, "reply to the workload's flow", &reply, est, None);
    let other = v4_tcp(BLOCKED_V4, WORKLOAD_V4, 22, 41001);
    expect(&mut dp, "not a tracked flow", &other, deny, Some(6));
}
