//! The desired configuration of one node, as the controller computes it and
//! the agent applies (and persists) it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::key::Key;
use crate::policy_maps::PolicyInput;

/// Default overlay MTU: 1500 minus the 80 bytes of WireGuard over IPv6.
pub const DEFAULT_MTU: u16 = 1420;

/// Everything one node must configure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Controller revision this config was computed at.
    pub revision: u64,
    pub node_id: String,
    pub node_name: String,
    /// Interface addresses with their on-link prefix, e.g. `100.64.0.7/10`.
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    /// Peers by public key.
    pub peers: BTreeMap<Key, PeerConfig>,
    /// The node's compiled network policy: the whole ipcache, the
    /// identities it hosts that are default-deny, their rule tuples, and
    /// the prefixes it hosts (the addresses it enforces policy for).
    /// Empty = nothing on this node is governed. Defaults to empty so that
    /// configs persisted before policy existed still load.
    #[serde(default)]
    pub policy: PolicyInput,
    /// Workload prefixes other nodes advertise, reachable through the
    /// overlay: the agent routes them into the tunnel in Weft's own
    /// routing table. Defaults to none (configs persisted before them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNet>,
    /// This node advertises workload prefixes and must forward packets
    /// between the overlay and them (IPv4 and IPv6 forwarding on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forwarding: bool,
    /// Prefixes this node hosts: its own overlay addresses (/32, /128) and
    /// its approved workload prefixes. The tunnel delivers a decrypted
    /// packet only to these, or, with `forwarding`, to a destination it
    /// relays. Empty = no check (controllers
    /// before it, configs persisted before it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosted: Vec<IpNet>,
    /// Generation of the node's WireGuard key the operator asked for: an
    /// agent whose key is of an older generation rotates it. 0 (absent in
    /// configs persisted before key rotation): never asked.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_generation: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One WireGuard peer of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConfig {
    /// Node or external peer name (for logs and humans).
    pub name: String,
    pub public_key: Key,
    /// Underlay endpoint; `None` when unknown (the peer calls us).
    pub endpoint: Option<SocketAddr>,
    /// Prefixes routed to this peer (cryptokey routing).
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive in seconds, `None` = off.
    pub persistent_keepalive: Option<u16>,
    /// Sources accepted from this peer besides those routed to it by
    /// `allowed_ips`: traffic it relays for others (a gateway). They are
    /// not routed to it. Defaults to none (configs persisted before them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept_sources: Vec<IpNet>,
    /// Peers interchangeable with this one (a site's other gateways): the
    /// flows of `shared_routes` spread over this peer and them, and this
    /// peer's routes move to the first live one while this peer is found
    /// dead (see [`crate::fallback`]). Defaults to none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<Key>,
    /// Prefixes routed to this peer like `allowed_ips`, whose flows are
    /// spread over this peer and its `fallback` peers by [`crate::flow`]
    /// (remote destinations behind a site's gateways). Disjoint from every
    /// peer's `allowed_ips` and `shared_routes`. Defaults to none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_routes: Vec<IpNet>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_persisted_before_policy_existed_still_loads() {
        let key = Key([5; 32]);
        let json = format!(
            r#"{{"revision":3,"node_id":"n1","node_name":"a1",
            "addresses":["100.64.0.1/10"],"mtu":1420,"peers":{{"{key}":{{
            "name":"b1","public_key":"{key}","endpoint":"198.18.0.2:51820",
            "allowed_ips":["100.64.0.2/32"],"persistent_keepalive":25}}}}}}"#
        );
        let cfg: NodeConfig = serde_json::from_str(&json).expect("old config loads");
        assert_eq!(cfg.policy, PolicyInput::default());
        assert!(cfg.routes.is_empty() && !cfg.forwarding);
        let peer = &cfg.peers[&key];
        assert!(peer.accept_sources.is_empty() && peer.fallback.is_empty());
        // Empty new fields are left out, so older agents read new configs.
        let text = serde_json::to_string(&cfg).expect("serializes");
        assert!(!text.contains("accept_sources") && !text.contains("fallback"));
        let again: NodeConfig = serde_json::from_str(&text).expect("round trips");
        assert_eq!(again, cfg);
    }

    #[test]
    fn a_policy_persisted_before_hosted_prefixes_still_loads() {
        let json = r#"{"ipcache":[["100.64.0.1/32",1]],"governed":[1],"tuples":[]}"#;
        let policy: PolicyInput = serde_json::from_str(json).expect("old policy loads");
        assert!(policy.local.is_empty());
        // Lowered as "every address hosted": it keeps enforcing.
        let maps = crate::policy_maps::lower(&policy).expect("lowers");
        assert!(maps.hosts("100.64.0.9".parse().expect("addr")));
        let hosted = PolicyInput {
            local: vec!["100.64.0.1/32".parse().expect("valid")],
            ..policy
        };
        let text = serde_json::to_string(&hosted).expect("serializes");
        assert!(text.contains(r#""local":["100.64.0.1/32"]"#), "{text}");
        let again: PolicyInput = serde_json::from_str(&text).expect("round trips");
        assert_eq!(again, hosted);
    }

    #[test]
    fn accepted_sources_and_fallbacks_round_trip() {
        let key = Key([5; 32]);
        let peer = PeerConfig {
            name: "g1".into(),
            public_key: key,
            endpoint: None,
            allowed_ips: vec!["100.64.0.2/32".parse().expect("valid")],
            persistent_keepalive: None,
            accept_sources: vec!["100.64.8.0/24".parse().expect("valid")],
            fallback: vec![Key([6; 32])],
            shared_routes: vec!["100.64.9.0/24".parse().expect("valid")],
        };
        let text = serde_json::to_string(&peer).expect("serializes");
        let again: PeerConfig = serde_json::from_str(&text).expect("loads");
        assert_eq!(again, peer);
    }
}
