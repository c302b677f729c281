//! The compiled policy agrees with the naive evaluator of the policies on
//! random label sets, endpoints, rules and packets (IPv4 and IPv6), also as
//! cut for one node; and incremental recompilation equals a full one.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use weft_controller_core::policy::{
    Compiled, Decision, Endpoint, Policy, PortRange, PortRule, Protocol, Rule, RuleList, Selector,
    Verdict, compile, compile_for_node, evaluate, explain, lookup, lookup_rule, parse_documents,
    reachability_diff, to_yaml, update,
};

const KEYS: [&str; 3] = ["app", "tier", "env"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const SITES: [&str; 3] = ["s1", "s2", "s3"];
const NODES: [&str; 3] = ["n0", "n1", "n2"];
const MAX_ENDPOINTS: u8 = 8;

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
        prop::sample::select(VALUES.to_vec()).prop_map(str::to_owned),
        0..=3,
    )
}

fn site() -> impl Strategy<Value = String> {
    prop::sample::select(SITES.to_vec()).prop_map(str::to_owned)
}

/// A selector that selects something specific (as parsing guarantees).
fn selector() -> impl Strategy<Value = Selector> {
    (
        prop::collection::btree_map(
            prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
            prop::sample::select(VALUES.to_vec()).prop_map(str::to_owned),
            0..=2,
        ),
        prop::collection::btree_set(site(), 0..=2),
    )
        .prop_map(|(mut match_labels, sites)| {
            if match_labels.is_empty() && sites.is_empty() {
                match_labels.insert("app".to_owned(), "a".to_owned());
            }
            Selector {
                match_labels,
                sites,
            }
        })
}

/// Ports from a small space, so that ranges overlap often.
fn port_rule() -> impl Strategy<Value = PortRule> {
    let ports = prop_oneof![
        Just(PortRange::ALL),
        (1u16..20).prop_map(PortRange::single),
        (1u16..20, 0u16..8).prop_map(|(first, len)| PortRange {
            first,
            last: first + len
        }),
    ];
    prop_oneof![
        ports.clone().prop_map(|ports| PortRule {
            protocol: Protocol::Tcp,
            ports
        }),
        ports.prop_map(|ports| PortRule {
            protocol: Protocol::Udp,
            ports
        }),
        Just(PortRule {
            protocol: Protocol::Icmp,
            ports: PortRange::ALL
        }),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::option::weighted(0.8, selector()),
        prop::option::weighted(0.7, prop::collection::vec(port_rule(), 1..=3)),
    )
        .prop_map(|(from, ports)| Rule { from, ports })
}

fn policy(name: String) -> impl Strategy<Value = Policy> {
    (
        selector(),
        prop::collection::vec(rule(), 0..=3),
        prop::collection::vec(rule(), 0..=2),
    )
        .prop_map(move |(target, ingress, deny)| Policy {
            name: name.clone(),
            target,
            ingress,
            deny,
        })
}

/// Endpoint `i` owns 100.64.i.0/24 and fd00::i:0/112, except endpoint 0,
/// which owns the /16 and /96 around all of them (so lookups need LPM).
fn prefixes(i: u8) -> Vec<IpNet> {
    let (v4, v6) = if i == 0 {
        ("100.64.0.0/16".to_owned(), "fd00::/96".to_owned())
    } else {
        (format!("100.64.{i}.0/24"), format!("fd00::{i:x}:0/112"))
    };
    vec![
        v4.parse().expect("valid v4 prefix"),
        v6.parse().expect("valid v6 prefix"),
    ]
}

fn endpoint(i: u8) -> impl Strategy<Value = Endpoint> {
    (
        site(),
        labels(),
        prop::option::weighted(0.8, 0..NODES.len()),
    )
        .prop_map(move |(site, labels, node)| Endpoint {
            name: format!("e{i}"),
            site,
            node: node.map(|n| NODES[n].to_owned()),
            labels,
            prefixes: prefixes(i),
        })
}

fn endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
    (1..=MAX_ENDPOINTS).prop_flat_map(|n| (0..n).map(endpoint).collect::<Vec<_>>())
}

fn policies() -> impl Strategy<Value = Vec<Policy>> {
    (0..=5usize).prop_flat_map(|n| (0..n).map(|i| policy(format!("p{i}"))).collect::<Vec<_>>())
}

/// A packet between endpoints by index (`None`: an address no endpoint owns).
#[derive(Debug, Clone)]
struct Packet {
    src: Option<u8>,
    dst: Option<u8>,
    host: u8,
    v6: bool,
    protocol: Protocol,
    port: u16,
}

fn packet() -> impl Strategy<Value = Packet> {
    (
        prop::option::weighted(0.9, 0..MAX_ENDPOINTS),
        prop::option::weighted(0.9, 0..MAX_ENDPOINTS),
        1u8..=254,
        any::<bool>(),
        prop::sample::select(Protocol::ALL.to_vec()),
        0u16..24,
    )
        .prop_map(|(src, dst, host, v6, protocol, port)| Packet {
            src,
            dst,
            host,
            v6,
            protocol,
            port,
        })
}

/// An address of endpoint `i`, or one outside every endpoint's prefixes.
fn address(i: Option<u8>, host: u8, v6: bool) -> IpAddr {
    match (i, v6) {
        (Some(i), false) => IpAddr::V4(Ipv4Addr::new(100, 64, i, host)),
        (Some(i), true) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, i.into(), host.into())),
        (None, false) => IpAddr::V4(Ipv4Addr::new(100, 65, 0, host)),
        (None, true) => IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, host.into())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn compiled_lookup_agrees_with_the_naive_evaluator(
        policies in policies(),
        endpoints in endpoints(),
        packets in prop::collection::vec(packet(), 1..40),
    ) {
        let compiled = compile(&policies, &endpoints);
        let ordered: Vec<Policy> = compiled.policies.values().cloned().collect();
        for p in packets {
            // Indices past the endpoints generated are unknown addresses.
            let src_ep = p.src.and_then(|i| endpoints.get(usize::from(i)));
            let dst_ep = p.dst.and_then(|i| endpoints.get(usize::from(i)));
            let src = address(src_ep.map(|_| p.src.unwrap_or(0)), p.host, p.v6);
            let dst = address(dst_ep.map(|_| p.dst.unwrap_or(0)), p.host, p.v6);
            let expected = evaluate(&policies, src_ep, dst_ep, p.protocol, p.port);
            let got = lookup(&compiled.tables, src, dst, p.protocol, p.port);
            prop_assert_eq!(got, expected, "packet {:?} ({} -> {})", p, src, dst);
            // The deciding rule is the one explain names (over the policies
            // as compiled: by name, the last of a name winning).
            let rule = lookup_rule(&compiled.tables, src, dst, p.protocol, p.port)
                .map(|r| (r.policy.clone(), r.list, r.index as usize));
            let want = match explain(&ordered, src_ep, dst_ep, p.protocol, p.port).decision {
                Decision::Deny { policy, rule } => Some((policy, RuleList::Deny, rule)),
                Decision::Allow { policy, rule } => Some((policy, RuleList::Ingress, rule)),
                Decision::DefaultDeny { .. }
                | Decision::NotGoverned
                | Decision::UnknownDestination => None,
            };
            prop_assert_eq!(rule, want, "deciding rule of {:?} ({} -> {})", p, src, dst);
            if let Some(node) = dst_ep.and_then(|e| e.node.as_deref()) {
                let cut = compile_for_node(&compiled, node);
                let on_node = lookup(&cut, src, dst, p.protocol, p.port);
                prop_assert_eq!(on_node, expected, "on node {}: packet {:?}", node, p);
            }
        }
    }

    #[test]
    fn incremental_update_equals_full_recompile(
        before in (policies(), endpoints()),
        after in (policies(), endpoints()),
        keep_policies in prop::collection::vec(any::<bool>(), 5),
        keep_endpoints in prop::collection::vec(any::<bool>(), MAX_ENDPOINTS as usize),
    ) {
        // The change: some of `after`'s items replaced by `before`'s of the
        // same name, so that some things stay and some change.
        let mix = |old: &[Policy], new: &[Policy]| -> Vec<Policy> {
            new.iter().enumerate().map(|(i, p)| {
                match old.get(i) {
                    Some(o) if keep_policies[i] => o.clone(),
                    Some(_) | None => p.clone(),
                }
            }).collect()
        };
        let (p0, e0) = before;
        let (p1, e1) = after;
        let p1 = mix(&p0, &p1);
        let e1: Vec<Endpoint> = e1.iter().enumerate().map(|(i, e)| match e0.get(i) {
            Some(o) if keep_endpoints[i] => o.clone(),
            Some(_) | None => e.clone(),
        }).collect();

        let prev = compile(&p0, &e0);
        let incremental = update(prev.clone(), &p1, &e1);
        let full = compile(&p1, &e1);
        prop_assert_eq!(incremental.canonical(), full.canonical());
        assert_stable_identities(&prev, &incremental);
        // And back again, from the incremental result.
        let back = update(incremental.clone(), &p0, &e0);
        prop_assert_eq!(back.canonical(), prev.canonical());
        assert_stable_identities(&incremental, &back);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn explain_agrees_with_evaluate_and_names_a_matching_rule(
        policies in policies(),
        endpoints in endpoints(),
        packets in prop::collection::vec(packet(), 1..40),
    ) {
        for p in packets {
            let src = p.src.and_then(|i| endpoints.get(usize::from(i)));
            let dst = p.dst.and_then(|i| endpoints.get(usize::from(i)));
            let expected = evaluate(&policies, src, dst, p.protocol, p.port);
            let got = explain(&policies, src, dst, p.protocol, p.port);
            prop_assert_eq!(got.verdict, expected, "packet {:?}: {:?}", p, got.decision);
            let rule = |name: &str, deny: bool, i: usize| {
                let policy = policies.iter().find(|q| q.name == name).expect("named policy exists");
                let rules = if deny { &policy.deny } else { &policy.ingress };
                rules[i].clone()
            };
            match &got.decision {
                Decision::Deny { policy, rule: i } | Decision::Allow { policy, rule: i } => {
                    let deny = matches!(got.decision, Decision::Deny { .. });
                    let r = rule(policy, deny, *i);
                    prop_assert!(r.covers(p.protocol, p.port), "rule {:?} does not cover {:?}", r, p);
                    prop_assert_eq!(got.verdict == Verdict::Deny, deny);
                }
                Decision::DefaultDeny { policies: names } => prop_assert!(!names.is_empty()),
                Decision::NotGoverned | Decision::UnknownDestination => {
                    prop_assert_eq!(got.verdict, Verdict::Allow);
                }
            }
        }
    }

    #[test]
    fn reachability_diff_lists_exactly_the_packets_whose_verdict_changes(
        old in policies(),
        new in policies(),
        endpoints in endpoints(),
        packets in prop::collection::vec(packet(), 1..40),
    ) {
        let diff = reachability_diff(&old, &new, &endpoints);
        for p in packets {
            let (Some(src), Some(dst)) = (
                p.src.and_then(|i| endpoints.get(usize::from(i))),
                p.dst.and_then(|i| endpoints.get(usize::from(i))),
            ) else { continue };
            if src.name == dst.name {
                continue;
            }
            let before = evaluate(&old, Some(src), Some(dst), p.protocol, p.port);
            let after = evaluate(&new, Some(src), Some(dst), p.protocol, p.port);
            let listed: Vec<_> = diff.iter().filter(|c| {
                c.from == src.name && c.to == dst.name && c.protocol == p.protocol
                    && (!p.protocol.has_ports() || c.ports.contains(p.port))
            }).collect();
            if before == after {
                prop_assert!(listed.is_empty(), "unchanged {:?} listed: {:?}", p, listed);
            } else {
                prop_assert_eq!(listed.len(), 1, "changed {:?} listed {:?}", p, listed);
                prop_assert_eq!(listed[0].gained, after == Verdict::Allow);
            }
        }
    }

    #[test]
    fn yaml_of_a_policy_parses_back_to_it(policies in policies()) {
        for p in &policies {
            let text = to_yaml(p);
            let back = parse_documents("p.yaml", &text);
            prop_assert_eq!(back, Ok(vec![p.clone()]), "{}", text);
        }
    }
}

/// Identities whose (site, labels) survive keep their numbers.
fn assert_stable_identities(prev: &Compiled, next: &Compiled) {
    for (id, key) in &next.identities {
        if let Some(old) = prev.identity(key) {
            assert_eq!(old, *id, "identity of {key:?} renumbered");
        }
    }
}
