//! Per-member WireGuard configs computed from the state.
//!
//! Topology v0 is a full mesh: every member peers with every other member,
//! routing that member's /32 and /128 to it, plus the workload prefixes a
//! node advertises. A node gets kernel routes (`routes`) for the workload
//! prefixes of every other node, and forwards when it advertises some.
//!
//! Each node's config also carries its compiled network policy: the policy
//! of the whole network is compiled once per call ([`policy::compile`]) and
//! cut per node ([`policy::compile_for_node`]), with the prefixes the node
//! hosts (its own /32 and /128, its advertised workload prefixes): the
//! only addresses its datapath enforces policy for, so that a node relaying
//! packets for another member never judges them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_dataplane_core::policy_maps::{self, PolicyInput, PolicyTuple};
use weft_dataplane_core::{Key, NodeConfig, PeerConfig};

use crate::policy::{self, Compiled, PolicyTables};
use crate::state::State;

/// Prefix length of the on-link IPv6 subnet given to the interface.
pub const IPV6_ONLINK_PREFIX_LEN: u8 = 64;

/// The config of the node with this id, or `None` if there is no such node.
pub fn node_config(state: &State, node_id: &str) -> Option<NodeConfig> {
    let node = state.node_by_id(node_id)?;
    let compiled = compile_state(state);
    Some(NodeConfig {
        policy: node_policy(&compiled, &node.id),
        key_generation: node.key_generation,
        ..config_for(
            state,
            &all_peers(state),
            &node.id,
            &node.name,
            &node.public_key,
            node.ipv4,
            node.ipv6,
        )
    })
}

/// The config of a plain WireGuard external peer (`node_id` and
/// `node_name` are both its name).
pub fn external_peer_config(state: &State, name: &str) -> Option<NodeConfig> {
    let peer = state.external_peer(name)?;
    Some(config_for(
        state,
        &all_peers(state),
        &peer.name,
        &peer.name,
        &peer.public_key,
        peer.ipv4,
        peer.ipv6,
    ))
}

/// The configs of all nodes, by node id.
pub fn all_node_configs(state: &State) -> BTreeMap<String, NodeConfig> {
    configs_with(state, &all_peers(state))
}

/// The configs of all nodes without peers, by node id: what gateway mode
/// completes with the topology's peers (skipping the full mesh, which
/// costs O(n²)).
pub fn all_node_configs_without_peers(state: &State) -> BTreeMap<String, NodeConfig> {
    configs_with(state, &BTreeMap::new())
}

fn configs_with(state: &State, peers: &BTreeMap<Key, PeerConfig>) -> BTreeMap<String, NodeConfig> {
    let compiled = compile_state(state);
    state
        .nodes()
        .map(|n| {
            let config = NodeConfig {
                policy: node_policy(&compiled, &n.id),
                key_generation: n.key_generation,
                ..config_for(state, peers, &n.id, &n.name, &n.public_key, n.ipv4, n.ipv6)
            };
            (n.id.clone(), config)
        })
        .collect()
}

/// The whole network's policy compiled over every node and external peer.
fn compile_state(state: &State) -> Compiled {
    let policies: Vec<policy::Policy> = state.policies().cloned().collect();
    policy::compile(&policies, &state.endpoints())
}

/// What the node with this id enforces, as the agent's lowering takes it.
/// Each tuple counts in the slot of the rule that decides it: the node's
/// deciding rules, sorted, are slots 1, 2, … and named in
/// [`PolicyInput::rules`]. [`PolicyInput::local`] is the prefixes of the
/// endpoints the node enforces policy for (itself and its workloads).
pub fn node_policy(compiled: &Compiled, node_id: &str) -> PolicyInput {
    let local: std::collections::BTreeSet<IpNet> = compiled
        .endpoints
        .values()
        .filter(|e| e.node.as_deref() == Some(node_id))
        .flat_map(|e| e.prefixes.iter().map(IpNet::trunc))
        .collect();
    PolicyInput {
        local: local.into_iter().collect(),
        ..tables_to_input(&policy::compile_for_node(compiled, node_id))
    }
}

fn tables_to_input(tables: &PolicyTables) -> PolicyInput {
    let protocol = |p: policy::Protocol| match p {
        policy::Protocol::Tcp => policy_maps::Protocol::Tcp,
        policy::Protocol::Udp => policy_maps::Protocol::Udp,
        policy::Protocol::Icmp => policy_maps::Protocol::Icmp,
    };
    let verdict = |v: policy::Verdict| match v {
        policy::Verdict::Allow => policy_maps::Verdict::Allow,
        policy::Verdict::Deny => policy_maps::Verdict::Deny,
    };
    // The node's rules, each once, in order; slot = 1 + index.
    let names: std::collections::BTreeSet<&policy::RuleRef> =
        tables.dsts.values().flat_map(|d| d.rules.iter()).collect();
    let slot_of: BTreeMap<&policy::RuleRef, u32> = names.iter().copied().zip(1u32..).collect();
    let slot = |d: &policy::DstPolicy, index: u32| {
        d.rules
            .get(index as usize)
            .and_then(|r| slot_of.get(r))
            .copied()
            .unwrap_or(0)
    };
    PolicyInput {
        rules: names.iter().map(ToString::to_string).collect(),
        ipcache: tables.ipcache.iter().map(|(p, id)| (*p, *id)).collect(),
        governed: tables
            .dsts
            .iter()
            .filter(|(_, d)| d.governed)
            .map(|(id, _)| *id)
            .collect(),
        tuples: tables
            .dsts
            .iter()
            .flat_map(|(dst, d)| {
                d.tuples.iter().map(move |(k, v)| PolicyTuple {
                    dst: *dst,
                    src: k.src,
                    protocol: protocol(k.protocol),
                    // ICMP has no ports: the compiler's "all ports" is 0..=0
                    // for the datapath.
                    first: if k.protocol.has_ports() { k.first } else { 0 },
                    last: if k.protocol.has_ports() { v.last } else { 0 },
                    verdict: verdict(v.verdict),
                    rule: slot(d, v.rule),
                })
            })
            .collect(),
        local: Vec::new(),
    }
}

/// Every member as a peer, by key.
fn all_peers(state: &State) -> BTreeMap<Key, PeerConfig> {
    let keepalive = Some(state.settings().persistent_keepalive).filter(|k| *k != 0);
    let nodes = state.nodes().map(|n| {
        let mut p = peer(&n.name, n.public_key, n.endpoint, n.ipv4, n.ipv6, keepalive);
        p.allowed_ips.extend(n.advertised.keys().copied());
        p
    });
    let external = state
        .external_peers()
        .map(|p| peer(&p.name, p.public_key, p.endpoint, p.ipv4, p.ipv6, keepalive));
    nodes.chain(external).map(|p| (p.public_key, p)).collect()
}

fn peer(
    name: &str,
    public_key: Key,
    endpoint: Option<SocketAddr>,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    persistent_keepalive: Option<u16>,
) -> PeerConfig {
    PeerConfig {
        name: name.to_owned(),
        public_key,
        endpoint,
        allowed_ips: vec![
            IpNet::V4(Ipv4Net::from(ipv4)),
            IpNet::V6(Ipv6Net::from(ipv6)),
        ],
        persistent_keepalive,
        accept_sources: Vec::new(),
        fallback: Vec::new(),
        shared_routes: Vec::new(),
    }
}

fn config_for(
    state: &State,
    all_peers: &BTreeMap<Key, PeerConfig>,
    id: &str,
    name: &str,
    key: &Key,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
) -> NodeConfig {
    let settings = state.settings();
    let mut peers = all_peers.clone();
    peers.remove(key);
    // The pool's and the /64's prefix lengths are valid by construction
    // (settings are validated); fall back to host routes rather than panic.
    let v4 = Ipv4Net::new(ipv4, settings.ipv4_pool.prefix_len()).unwrap_or(Ipv4Net::from(ipv4));
    let v6 = Ipv6Net::new(ipv6, IPV6_ONLINK_PREFIX_LEN).unwrap_or(Ipv6Net::from(ipv6));
    // Workload prefixes of the other nodes; a node's own are behind it.
    let routes: Vec<IpNet> = state
        .nodes()
        .filter(|n| n.public_key != *key)
        .flat_map(|n| n.advertised.keys().copied())
        .collect();
    let forwarding = state
        .nodes()
        .any(|n| n.public_key == *key && !n.advertised.is_empty());
    // What the member's tunnel delivers to: its own addresses and its
    // approved workload prefixes.
    let hosted: Vec<IpNet> = [IpNet::from(IpAddr::V4(ipv4)), IpNet::from(IpAddr::V6(ipv6))]
        .into_iter()
        .chain(
            state
                .nodes()
                .filter(|n| n.public_key == *key)
                .flat_map(|n| n.advertised.keys().map(IpNet::trunc)),
        )
        .collect();
    NodeConfig {
        revision: state.revision(),
        node_id: id.to_owned(),
        node_name: name.to_owned(),
        addresses: vec![IpNet::V4(v4), IpNet::V6(v6)],
        mtu: settings.mtu,
        peers,
        // Set by the callers for nodes; external peers run plain
        // WireGuard and enforce nothing.
        policy: PolicyInput::default(),
        routes,
        forwarding,
        hosted,
        // Set by the callers for nodes (external peers rotate by hand).
        key_generation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Endpoint, parse_documents};

    fn endpoint(name: &str, role: &str) -> Endpoint {
        let n = if name == "db" { 1 } else { 2 };
        Endpoint {
            name: name.into(),
            site: "s".into(),
            node: Some(format!("n-{name}")),
            labels: [("role".to_owned(), role.to_owned())].into_iter().collect(),
            prefixes: vec![
                format!("100.64.0.{n}/32").parse().expect("valid"),
                format!("fd00::{n}/128").parse().expect("valid"),
            ],
        }
    }

    #[test]
    fn node_policy_carries_only_what_the_node_hosts() {
        let policies = parse_documents(
            "t.yaml",
            r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 5432}]
    - from: {matchLabels: {role: web}}
      ports: [{protocol: ICMP}]
  deny:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 22}]
"#,
        )
        .expect("valid policy");
        let compiled = policy::compile(&policies, &[endpoint("db", "db"), endpoint("web", "web")]);
        let db = node_policy(&compiled, "n-db");
        let web = node_policy(&compiled, "n-web");
        assert_eq!(db.ipcache.len(), 4, "{db:?}");
        assert_eq!(web.ipcache, db.ipcache, "every node gets the whole ipcache");
        assert_eq!(db.governed.len(), 1, "{db:?}");
        assert!(web.governed.is_empty() && web.tuples.is_empty(), "{web:?}");
        let allowed: Vec<_> = db
            .tuples
            .iter()
            .filter(|t| t.verdict == policy_maps::Verdict::Allow)
            .collect();
        assert_eq!(allowed.len(), 2, "{db:?}");
        assert_eq!(
            (allowed[0].protocol, allowed[0].first, allowed[0].last),
            (policy_maps::Protocol::Tcp, 5432, 5432)
        );
        // Each tuple counts in the slot of the rule that decides it.
        assert_eq!(
            db.rules,
            vec!["db/ingress[0]", "db/ingress[1]", "db/deny[0]"]
        );
        let icmp: Vec<_> = allowed
            .iter()
            .filter(|t| t.protocol == policy_maps::Protocol::Icmp)
            .collect();
        assert_eq!((icmp[0].first, icmp[0].last), (0, 0), "ICMP has no ports");
        assert_eq!(db.rule_name(icmp[0].rule), Some("db/ingress[1]"));
        assert_eq!(db.rule_name(allowed[0].rule), Some("db/ingress[0]"));
        let denied: Vec<_> = db
            .tuples
            .iter()
            .filter(|t| t.verdict == policy_maps::Verdict::Deny)
            .collect();
        assert_eq!(denied.len(), 1, "{db:?}");
        assert_eq!(db.rule_name(denied[0].rule), Some("db/deny[0]"));
        assert!(web.rules.is_empty());
        // Each node hosts its own prefixes only.
        let nets =
            |v: &[&str]| -> Vec<IpNet> { v.iter().map(|s| s.parse().expect("net")).collect() };
        assert_eq!(db.local, nets(&["100.64.0.1/32", "fd00::1/128"]));
        assert_eq!(web.local, nets(&["100.64.0.2/32", "fd00::2/128"]));
        policy_maps::lower(&db).expect("the agent can lower it");
    }

    /// A gateway with the same site and labels as a member (so the same,
    /// governed identity) hosts only its own addresses: it forwards the
    /// member's packets unjudged; the member judges them.
    #[test]
    fn nodes_host_their_own_addresses_and_workload_prefixes_only() {
        use crate::model::{NetworkSettings, Registration};
        let settings =
            NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("net"));
        let mut state = State::new(settings).expect("state");
        state.create_site("a", 0).expect("site");
        let labels = |role: &str| -> crate::Labels {
            [("role".to_owned(), role.to_owned())].into_iter().collect()
        };
        for (i, (name, role)) in [("gw", "db"), ("db", "db"), ("web", "web")]
            .into_iter()
            .enumerate()
        {
            let k = [u8::try_from(i).expect("small") + 1; 32];
            let grants = crate::model::TokenGrants {
                labels: labels(role),
                ..Default::default()
            };
            state
                .create_token_with_grants(&format!("t{i}"), k, "a", 0, 60, grants)
                .expect("token");
            state
                .register_node(
                    Registration {
                        node_id: format!("n-{name}"),
                        token_id: format!("t{i}"),
                        secret_hash: k,
                        name: name.to_owned(),
                        public_key: Key(k),
                        endpoint: Some(([198, 18, 0, 10 + k[0]], 51820).into()),
                        cert_fingerprint: k,
                        cert_expires_unix: 0,
                        csr_key: k,
                        labels: labels(role),
                    },
                    1,
                )
                .expect("registers");
        }
        // Outside the pools (100.64.0.0/10, fd7e:4a1:1234::/48).
        let workload: IpNet = "fd00:beef:2::/64".parse().expect("net");
        state
            .advertise_prefixes(
                "db",
                &[(workload, labels("pg"))].into_iter().collect(),
                &crate::Protected::default(),
            )
            .expect("advertises");
        let policies = parse_documents(
            "t.yaml",
            r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 5432}]
"#,
        )
        .expect("valid policy");
        state.apply_policies(policies).expect("applies");

        let configs = all_node_configs(&state);
        let node = |id: &str| state.node_by_id(id).expect("node");
        let (gw, db, web) = (node("n-gw"), node("n-db"), node("n-web"));
        let host = |n: &crate::model::Node| {
            vec![
                IpNet::V4(Ipv4Net::from(n.ipv4)),
                IpNet::V6(Ipv6Net::from(n.ipv6)),
            ]
        };
        let gw_policy = &configs["n-gw"].policy;
        let db_policy = &configs["n-db"].policy;
        assert_eq!(gw_policy.local, host(gw));
        let mut db_local = host(db);
        db_local.insert(1, workload);
        assert_eq!(
            db_policy.local, db_local,
            "own addresses and workload prefix"
        );
        assert_eq!(configs["n-web"].policy.local, host(web));
        // The tunnel delivers to the same prefixes.
        assert_eq!(configs["n-gw"].hosted, host(gw));
        assert_eq!(
            configs["n-db"].hosted,
            [host(db), vec![workload]].concat(),
            "own /32 and /128, then the approved workload prefix"
        );
        assert_eq!(configs["n-web"].hosted, host(web));
        assert_eq!(
            gw_policy.governed, db_policy.governed,
            "gw and db share their identity"
        );
        assert!(!gw_policy.governed.is_empty());
        assert_eq!(
            node_config(&state, "n-db").expect("config").policy,
            *db_policy
        );

        let gw_maps = policy_maps::lower(gw_policy).expect("lowers");
        let db_maps = policy_maps::lower(db_policy).expect("lowers");
        let (from, to_db) = (IpAddr::V4(web.ipv4), IpAddr::V4(db.ipv4));
        assert_eq!(
            gw_maps.decide_packet(from, to_db, 6, 22),
            policy_maps::Decision::Forwarded,
            "the gateway does not judge db's packets"
        );
        assert_eq!(
            db_maps.decide_packet(from, to_db, 6, 22),
            policy_maps::Decision::DefaultDeny
        );
        assert_eq!(
            gw_maps.decide_packet(from, IpAddr::V4(gw.ipv4), 6, 22),
            policy_maps::Decision::DefaultDeny,
            "the gateway judges its own packets"
        );
    }
}
