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
    /// identities it hosts that are default-deny, and their rule tuples.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_persisted_before_policy_existed_still_loads() {
        let json = r#"{"revision":3,"node_id":"n1","node_name":"a1",
            "addresses":["100.64.0.1/10"],"mtu":1420,"peers":{}}"#;
        let cfg: NodeConfig = serde_json::from_str(json).expect("old config loads");
        assert_eq!(cfg.policy, PolicyInput::default());
        assert!(cfg.routes.is_empty() && !cfg.forwarding);
        let again: NodeConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).expect("serializes"))
                .expect("round trips");
        assert_eq!(again, cfg);
    }
}
