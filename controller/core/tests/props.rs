//! Property tests: random operation sequences keep the state consistent,
//! IPAM never hands out a live address twice, refused operations change
//! nothing, and the netmap is a symmetric full mesh; advertised workload
//! prefixes never overlap each other or the overlay pools, and every node
//! routes exactly the other nodes' prefixes. Node labels are always the
//! ones their join token granted; an agent's advertisement is approved only
//! inside its token's allowed prefixes with granted labels, never relabels
//! an approved prefix, and what is published never routes a protected
//! address (controller, registered or learnt endpoint) into the overlay nor
//! a prefix shorter than the minimum, in full mesh and gateway mode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use proptest::prelude::*;
use weft_controller_core::state::{first_overlap, overlaps};
use weft_controller_core::topology::{
    Fabric, Measurements, TopologyConfig, TopologyInput, TopologyMode,
};
use weft_controller_core::{
    Error, Labels, NetworkSettings, Protected, Registration, State, TokenGrants, all_node_configs,
    external_peer_config, node_config,
};
use weft_dataplane_core::{Key, NodeConfig};

#[derive(Debug, Clone)]
enum Op {
    CreateSite(u8),
    DeleteSite(u8),
    CreateToken {
        token: u8,
        site: u8,
        ttl: u64,
        label: Option<u8>,
        allow: Option<u8>,
    },
    DeleteToken(u8),
    Register {
        id: u8,
        token: u8,
        secret_ok: bool,
        name: u8,
        key: u8,
        cert: u8,
        label: Option<u8>,
    },
    SetEndpoint {
        id: u8,
        port: Option<u16>,
    },
    DeleteNode {
        name_or_id: u8,
        by_name: bool,
    },
    AddPeer {
        name: u8,
        site: u8,
        key: u8,
    },
    DeletePeer(u8),
    Advertise {
        id: u8,
        prefixes: Vec<(u8, u8)>,
    },
    Withdraw {
        id: u8,
        prefix: u8,
    },
    AgentAdvertise {
        id: u8,
        prefixes: Vec<(u8, u8)>,
    },
    SetMinPrefixLens {
        v4: u8,
        v6: u8,
    },
}

/// Candidate workload prefixes: nested, disjoint, inside the overlay pools
/// (the /29 IPv4 pool and the ULA /48 below), a default route, and some
/// covering the underlay (endpoints are 198.18.0.<id>, the controller
/// 198.18.0.200) or shorter than the default minimum.
const PREFIXES: [&str; 14] = [
    "100.100.0.0/16",
    "100.100.2.0/24",
    "100.100.2.128/25",
    "100.100.3.0/24",
    "100.64.0.0/24",
    "fd00:beef::/48",
    "fd00:beef:2::/64",
    "fd00:beef:3::/64",
    "fd7e:4a1:1234:5::/64",
    "0.0.0.0/0",
    "198.18.0.0/28",
    "198.18.0.5/32",
    "128.0.0.0/1",
    "198.18.0.128/25",
];

/// Where the tests' agents reach the controller.
const CONTROLLER: [u8; 4] = [198, 18, 0, 200];

fn protected() -> Protected {
    Protected {
        controller: [IpAddr::from(CONTROLLER)].into(),
        ..Protected::default()
    }
}

fn app(i: u8) -> Labels {
    [("app".to_owned(), format!("a{i}"))].into_iter().collect()
}

fn prefix(i: u8) -> IpNet {
    PREFIXES[usize::from(i) % PREFIXES.len()]
        .parse()
        .expect("valid prefix")
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..2u8).prop_map(Op::CreateSite),
        1 => (0..3u8).prop_map(Op::DeleteSite),
        4 => (0..5u8, 0..3u8, prop_oneof![1 => Just(0u64), 6 => 1..200u64, 1 => Just(30 * 86_400 + 1)],
              prop::option::of(0..3u8), prop::option::of(0..14u8))
            .prop_map(|(token, site, ttl, label, allow)| Op::CreateToken { token, site, ttl, label, allow }),
        1 => (0..5u8).prop_map(Op::DeleteToken),
        6 => (0..12u8, 0..5u8, prop::bool::weighted(0.9), 0..12u8, 0..16u8, 0..16u8, prop::option::weighted(0.2, 0..3u8)).prop_map(
            |(id, token, secret_ok, name, key, cert, label)| Op::Register { id, token, secret_ok, name, key, cert, label }
        ),
        1 => (0..12u8, prop::option::of(51820..51823u16)).prop_map(|(id, port)| Op::SetEndpoint { id, port }),
        2 => (0..12u8, any::<bool>()).prop_map(|(name_or_id, by_name)| Op::DeleteNode { name_or_id, by_name }),
        3 => (0..12u8, 0..3u8, 0..16u8).prop_map(|(name, site, key)| Op::AddPeer { name, site, key }),
        2 => (0..12u8).prop_map(Op::DeletePeer),
        4 => (0..12u8, prop::collection::vec((0..14u8, 0..3u8), 1..3))
            .prop_map(|(id, prefixes)| Op::Advertise { id, prefixes }),
        2 => (0..12u8, 0..14u8).prop_map(|(id, prefix)| Op::Withdraw { id, prefix }),
        4 => (0..12u8, prop::collection::vec((0..14u8, 0..3u8), 1..4))
            .prop_map(|(id, prefixes)| Op::AgentAdvertise { id, prefixes }),
        1 => (0..34u8, 0..130u8).prop_map(|(v4, v6)| Op::SetMinPrefixLens { v4, v6 }),
    ]
}

fn site(i: u8) -> String {
    format!("site-{i}")
}

fn token_secret(i: u8) -> [u8; 32] {
    [i + 1; 32]
}

/// Applies `op` at time `now`; `Ok(changed)`.
fn apply(s: &mut State, op: &Op, now: u64) -> Result<bool, Error> {
    match *op {
        Op::CreateSite(i) => s.create_site(&site(i), now).map(|_| true),
        Op::DeleteSite(i) => s.delete_site(&site(i)).map(|()| true),
        Op::CreateToken {
            token,
            site: i,
            ttl,
            label,
            allow,
        } => s
            .create_token_with_grants(
                &format!("t{token}"),
                token_secret(token),
                &site(i),
                now,
                ttl,
                TokenGrants {
                    labels: label.map(app).unwrap_or_default(),
                    allow_prefixes: allow.map(prefix).into_iter().collect(),
                },
            )
            .map(|_| true),
        Op::DeleteToken(t) => s.delete_token(&format!("t{t}")).map(|()| true),
        Op::Register {
            id,
            token,
            secret_ok,
            name,
            key,
            cert,
            label,
        } => {
            let reg = Registration {
                node_id: format!("n-{id}"),
                token_id: format!("t{token}"),
                secret_hash: if secret_ok {
                    token_secret(token)
                } else {
                    [0xee; 32]
                },
                name: format!("m{name}"),
                public_key: Key([key + 1; 32]),
                endpoint: None,
                cert_fingerprint: [cert; 32],
                cert_expires_unix: 0,
                csr_key: [cert; 32],
                labels: label.map(app).unwrap_or_default(),
            };
            s.register_node(reg, now).map(|_| true)
        }
        Op::SetEndpoint { id, port } => {
            let endpoint = port.map(|p| ([198, 18, 0, id], p).into());
            s.set_node_endpoint(&format!("n-{id}"), endpoint)
        }
        Op::DeleteNode {
            name_or_id,
            by_name,
        } => {
            let target = if by_name {
                format!("m{name_or_id}")
            } else {
                format!("n-{name_or_id}")
            };
            s.delete_node(&target).map(|_| true)
        }
        Op::AddPeer { name, site: i, key } => s
            .add_external_peer(
                &format!("m{name}"),
                &site(i),
                Key([key + 1; 32]),
                None,
                Default::default(),
                now,
            )
            .map(|_| true),
        Op::DeletePeer(name) => s.delete_external_peer(&format!("m{name}")).map(|()| true),
        Op::Advertise { id, ref prefixes } => {
            let wanted: BTreeMap<IpNet, Labels> =
                prefixes.iter().map(|&(p, a)| (prefix(p), app(a))).collect();
            s.advertise_prefixes(&format!("n-{id}"), &wanted, &protected())
        }
        Op::AgentAdvertise { id, ref prefixes } => {
            let wanted: BTreeMap<IpNet, Labels> =
                prefixes.iter().map(|&(p, a)| (prefix(p), app(a))).collect();
            s.agent_advertise(&format!("n-{id}"), &wanted, &protected())
        }
        Op::SetMinPrefixLens { v4, v6 } => s.set_min_prefix_lens(v4, v6),
        Op::Withdraw { id, prefix: p } => s
            .withdraw_prefix(&format!("n-{id}"), prefix(p))
            .map(|()| true),
    }
}

/// After a successful `op` from `old` to `new`: a new node has exactly its
/// token's labels and allowed prefixes; an agent's advertisement changes no
/// label and no approved prefix, and approves only safe prefixes inside
/// the node's allowed ones with labels the node was granted.
fn check_grants(old: &State, new: &State, op: &Op) {
    match *op {
        Op::Register { id, token, .. } => {
            let id = format!("n-{id}");
            if old.node_by_id(&id).is_some() {
                return;
            }
            let node = new.node_by_id(&id).expect("registered");
            let token = new.token(&format!("t{token}")).expect("token exists");
            assert_eq!(node.labels, token.labels, "labels come from the token");
            assert_eq!(node.allowed_prefixes, token.allow_prefixes);
        }
        Op::AgentAdvertise { id, .. } => {
            let id = format!("n-{id}");
            let (before, after) = (
                old.node_by_id(&id).expect("node"),
                new.node_by_id(&id).expect("node"),
            );
            assert_eq!(
                before.labels, after.labels,
                "an agent cannot relabel its node"
            );
            for (prefix, labels) in &before.advertised {
                assert_eq!(
                    after.advertised.get(prefix),
                    Some(labels),
                    "an agent cannot relabel or withdraw an approved prefix"
                );
            }
            let withheld = new.withheld_prefixes(&protected());
            for (prefix, labels) in &after.advertised {
                if before.advertised.contains_key(prefix) {
                    continue;
                }
                assert!(
                    after.allowed_prefixes.iter().any(|a| a.contains(prefix)),
                    "{prefix} approved outside the allowed prefixes {:?}",
                    after.allowed_prefixes
                );
                assert!(
                    labels.iter().all(|(k, v)| after.labels.get(k) == Some(v)),
                    "{prefix} approved with labels {labels:?} not granted ({:?})",
                    after.labels
                );
                assert!(
                    !withheld.get(&id).is_some_and(|w| w.contains_key(prefix)),
                    "{prefix} approved but unsafe"
                );
                assert!(!after.pending.contains_key(prefix));
            }
        }
        Op::CreateSite(_)
        | Op::DeleteSite(_)
        | Op::CreateToken { .. }
        | Op::DeleteToken(_)
        | Op::SetEndpoint { .. }
        | Op::DeleteNode { .. }
        | Op::AddPeer { .. }
        | Op::DeletePeer(_)
        | Op::Advertise { .. }
        | Op::Withdraw { .. }
        | Op::SetMinPrefixLens { .. } => {}
    }
}

fn live_addresses(s: &State) -> Vec<IpAddr> {
    let nodes = s
        .nodes()
        .flat_map(|n| [IpAddr::V4(n.ipv4), IpAddr::V6(n.ipv6)]);
    let peers = s
        .external_peers()
        .flat_map(|p| [IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)]);
    nodes.chain(peers).collect()
}

fn assert_netmap_invariants(s: &State) {
    let mut configs: BTreeMap<Key, NodeConfig> = BTreeMap::new();
    let node_configs = all_node_configs(s);
    assert_eq!(node_configs.len(), s.nodes().count());
    for node in s.nodes() {
        let config = node_config(s, &node.id).expect("every node has a config");
        assert_eq!(
            node_configs.get(&node.id),
            Some(&config),
            "all_node_configs agrees with node_config"
        );
        assert_eq!(config.revision, s.revision());
        let addrs: Vec<IpAddr> = config.addresses.iter().map(IpNet::addr).collect();
        assert_eq!(
            addrs,
            vec![IpAddr::V4(node.ipv4), IpAddr::V6(node.ipv6)],
            "addresses match the node"
        );
        assert_eq!(
            config.addresses[0].prefix_len(),
            s.settings().ipv4_pool.prefix_len()
        );
        assert_eq!(config.addresses[1].prefix_len(), 64);
        let others: BTreeSet<IpNet> = s
            .nodes()
            .filter(|n| n.id != node.id)
            .flat_map(|n| n.advertised.keys().copied())
            .collect();
        assert_eq!(
            config.routes.iter().copied().collect::<BTreeSet<_>>(),
            others,
            "{} routes exactly the other nodes' prefixes",
            node.name
        );
        assert_eq!(config.routes.len(), others.len(), "no route twice");
        assert_eq!(config.forwarding, !node.advertised.is_empty());
        configs.insert(node.public_key, config);
    }
    for peer in s.external_peers() {
        let config = external_peer_config(s, &peer.name).expect("every peer has a config");
        let addrs: Vec<IpAddr> = config.addresses.iter().map(IpNet::addr).collect();
        assert_eq!(addrs, vec![IpAddr::V4(peer.ipv4), IpAddr::V6(peer.ipv6)]);
        configs.insert(peer.public_key, config);
    }
    let members = configs.len();
    for (key, config) in &configs {
        assert!(
            !config.peers.contains_key(key),
            "{} has itself as a peer",
            config.node_name
        );
        assert_eq!(
            config.peers.len(),
            members - 1,
            "{} is not in a full mesh",
            config.node_name
        );
        let mut seen = BTreeSet::new();
        for (peer_key, peer) in &config.peers {
            assert_eq!(*peer_key, peer.public_key);
            let other = configs.get(peer_key).expect("every peer is a member");
            assert!(
                other.peers.contains_key(key),
                "{} has {} as peer but not back",
                config.node_name,
                other.node_name
            );
            let other_addrs: Vec<IpAddr> = other.addresses.iter().map(IpNet::addr).collect();
            let allowed: Vec<IpAddr> = peer.allowed_ips.iter().take(2).map(IpNet::addr).collect();
            assert_eq!(
                allowed, other_addrs,
                "allowed IPs of {} start with its addresses",
                peer.name
            );
            let advertised: Vec<IpNet> = s
                .nodes()
                .find(|n| n.public_key == *peer_key)
                .map(|n| n.advertised.keys().copied().collect())
                .unwrap_or_default();
            assert_eq!(
                peer.allowed_ips[2..],
                advertised[..],
                "then come the prefixes {} advertises",
                peer.name
            );
            for net in &peer.allowed_ips {
                assert!(
                    seen.insert(*net),
                    "allowed IP {net} appears twice in {}",
                    config.node_name
                );
            }
        }
    }
}

/// Every address that must stay on the underlay: the controller's, every
/// member's registered endpoint and the learnt ones.
fn guarded(s: &State, p: &Protected) -> Vec<IpAddr> {
    let nodes = s.nodes().filter_map(|n| n.endpoint.map(|e| e.ip()));
    let peers = s
        .external_peers()
        .filter_map(|x| x.endpoint.map(|e| e.ip()));
    let learnt = p.learnt.values().map(SocketAddr::ip);
    p.controller
        .iter()
        .copied()
        .chain(nodes)
        .chain(peers)
        .chain(learnt)
        .collect()
}

/// What would be published from `s` routes no guarded address into the
/// overlay, and no prefix shorter than the minimum, beyond the members'
/// own /32 and /128: in full mesh and (with `gateways`) in gateway mode.
fn assert_published_safe(s: &State, p: &Protected, gateways: bool) {
    let view = s.publishable(p);
    let guarded = guarded(s, p);
    let own: BTreeSet<IpNet> = live_addresses(s).into_iter().map(IpNet::from).collect();
    let check = |who: &str, net: &IpNet| {
        if own.contains(net) {
            return;
        }
        assert!(
            net.prefix_len() >= s.settings().min_prefix_len(*net),
            "{who} gets {net}, shorter than the minimum"
        );
        for ip in &guarded {
            assert!(!net.contains(ip), "{who} routes {net}, covering {ip}");
        }
    };
    let check_config = |who: &str, peers: &BTreeMap<Key, weft_dataplane_core::PeerConfig>| {
        for peer in peers.values() {
            for net in peer.allowed_ips.iter().chain(&peer.shared_routes) {
                check(who, net);
            }
        }
    };
    for (id, config) in all_node_configs(&view) {
        for net in &config.routes {
            check(&id, net);
        }
        check_config(&id, &config.peers);
    }
    if !gateways {
        return;
    }
    // Gateway mode, one gateway per site.
    let mut g = view.into_owned();
    let mut per_site = BTreeMap::new();
    for n in g.nodes() {
        per_site
            .entry(n.site.clone())
            .or_insert_with(|| n.id.clone());
    }
    g.set_topology(TopologyConfig {
        mode: TopologyMode::Gateways,
        gateways: per_site.into_values().collect(),
        ..TopologyConfig::default()
    })
    .expect("gateways are nodes");
    let fabric = Fabric::build(
        &TopologyInput::from_state(&g, g.topology()),
        &Measurements::default(),
        None,
    );
    for n in g.nodes() {
        if let Some(member) = fabric.config(&weft_controller_core::Member::Node(n.id.clone())) {
            check_config(&n.id, &member.peer_configs());
        }
    }
}

fn small_pool_settings() -> NetworkSettings {
    let mut settings =
        NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"));
    // 6 hosts for up to 12 members (names are shared): exhaustion happens too.
    settings.ipv4_pool = "100.64.0.0/29".parse().expect("valid pool");
    settings
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_operations_keep_the_state_consistent(
        ops in prop::collection::vec((op(), 0..5u64), 1..120),
        learnt in prop::collection::btree_map(0..12u8, 0..=255u8, 0..4),
    ) {
        let mut guard = protected();
        guard.learnt = learnt
            .iter()
            .map(|(id, host)| (format!("n-{id}"), SocketAddr::from(([198, 18, 0, *host], 40000))))
            .collect();
        let mut s = State::new(small_pool_settings()).expect("valid settings");
        let mut now = 1_000u64;
        for (op, dt) in &ops {
            now += dt;
            let before = serde_json::to_string(&s).expect("serializes");
            let before_rev = s.revision();
            let live_before: BTreeSet<IpAddr> = live_addresses(&s).into_iter().collect();
            // A Register repeating a live node's registration (same token,
            // name and key, within the window) is a retry: same node.
            let retry = matches!(op, Op::Register { id, .. } if s.node_by_id(&format!("n-{id}")).is_some());
            let old = s.clone();
            match apply(&mut s, op, now) {
                Err(e) => {
                    let after = serde_json::to_string(&s).expect("serializes");
                    prop_assert_eq!(after, before, "{:?} failed ({}) but changed the state", op, e);
                }
                Ok(changed) => {
                    prop_assert_eq!(s.revision(), before_rev + u64::from(changed));
                    let live = live_addresses(&s);
                    let unique: BTreeSet<IpAddr> = live.iter().copied().collect();
                    prop_assert_eq!(unique.len(), live.len(), "duplicate live address after {:?}", op);
                    let new: Vec<_> = unique.difference(&live_before).collect();
                    if retry {
                        prop_assert!(new.is_empty(), "a retried registration keeps its addresses");
                    } else if matches!(op, Op::Register { .. } | Op::AddPeer { .. }) {
                        prop_assert_eq!(new.len(), 2, "one IPv4 and one IPv6 address are new");
                    }
                    prop_assert_eq!(s.ipam().len() * 2, live.len());
                    check_grants(&old, &s, op);
                }
            }
            if let Err(e) = s.validate() {
                return Err(TestCaseError::fail(format!("invalid after {op:?}: {e}")));
            }
            assert_netmap_invariants(&s);
            assert_published_safe(&s, &guard, false);
        }
        assert_published_safe(&s, &guard, true);
        let all: Vec<IpNet> = s.nodes().flat_map(|n| n.advertised.keys().copied()).collect();
        for (i, a) in all.iter().enumerate() {
            prop_assert!(a.prefix_len() > 0, "default route {} advertised", a);
            prop_assert!(
                !overlaps(*a, IpNet::V4(s.settings().ipv4_pool))
                    && !overlaps(*a, IpNet::V6(s.settings().ipv6_prefix)),
                "{} overlaps an overlay pool", a
            );
            for b in &all[i + 1..] {
                prop_assert!(!overlaps(*a, *b), "{} and {} overlap", a, b);
            }
        }
        let back: State = serde_json::from_str(&serde_json::to_string(&s).expect("serializes"))
            .expect("deserializes");
        prop_assert_eq!(back, s);
    }
}

fn naive_overlap(prefixes: &[IpNet]) -> bool {
    prefixes
        .iter()
        .enumerate()
        .any(|(i, a)| prefixes[i + 1..].iter().any(|b| overlaps(*a, *b)))
}

proptest! {
    #[test]
    fn first_overlap_agrees_with_pairwise_comparison(
        nets in prop::collection::vec(
            prop_oneof![
                (0u32..64, 8u8..=30).prop_map(|(a, len)| {
                    // Inside 100.64.0.0/10, bits spread over the prefix.
                    let addr = std::net::Ipv4Addr::from(0x6440_0000 | (a << 16) | (a << 9));
                    IpNet::V4(ipnet::Ipv4Net::new(addr, len.max(10)).expect("valid").trunc())
                }),
                (0u16..64, 16u8..=128).prop_map(|(a, len)| {
                    let addr = std::net::Ipv6Addr::new(0xfd00, a, a << 3, 0, 0, 0, 0, 0);
                    IpNet::V6(ipnet::Ipv6Net::new(addr, len).expect("valid").trunc())
                }),
            ],
            0..12,
        ),
    ) {
        let found = first_overlap(nets.iter().copied());
        prop_assert_eq!(found.is_some(), naive_overlap(&nets), "{:?}", found);
        if let Some((a, b)) = found {
            prop_assert!(overlaps(a, b), "{} and {} do not overlap", a, b);
        }
    }
}
