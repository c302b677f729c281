//! Per-member WireGuard configs computed from the state.
//!
//! Topology v0 is a full mesh: every member peers with every other member,
//! routing exactly that member's /32 and /128 to it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_dataplane_core::{Key, NodeConfig, PeerConfig};

use crate::state::State;

/// Prefix length of the on-link IPv6 subnet given to the interface.
pub const IPV6_ONLINK_PREFIX_LEN: u8 = 64;

/// The config of the node with this id, or `None` if there is no such node.
pub fn node_config(state: &State, node_id: &str) -> Option<NodeConfig> {
    let node = state.node_by_id(node_id)?;
    Some(config_for(
        state,
        &all_peers(state),
        &node.id,
        &node.name,
        &node.public_key,
        node.ipv4,
        node.ipv6,
    ))
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
    let peers = all_peers(state);
    state
        .nodes()
        .map(|n| {
            let config = config_for(state, &peers, &n.id, &n.name, &n.public_key, n.ipv4, n.ipv6);
            (n.id.clone(), config)
        })
        .collect()
}

/// Every member as a peer, by key.
fn all_peers(state: &State) -> BTreeMap<Key, PeerConfig> {
    let keepalive = Some(state.settings().persistent_keepalive).filter(|k| *k != 0);
    let nodes = state
        .nodes()
        .map(|n| peer(&n.name, n.public_key, n.endpoint, n.ipv4, n.ipv6, keepalive));
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
    NodeConfig {
        revision: state.revision(),
        node_id: id.to_owned(),
        node_name: name.to_owned(),
        addresses: vec![IpNet::V4(v4), IpNet::V6(v6)],
        mtu: settings.mtu,
        peers,
    }
}
