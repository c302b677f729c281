//! The desired configuration of one node, as the controller computes it and
//! the agent applies (and persists) it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::key::Key;

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
