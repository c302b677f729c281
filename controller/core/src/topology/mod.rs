//! Topology: which member sends what to whom, across sites.
//!
//! - [`graph`]: sites with residency tags, link measurements, path costs.
//! - [`paths`]: one shortest-path tree per destination site, residency
//!   constraints, hysteresis ([`compute_paths`]).
//! - [`explain`]: why a pair of sites has its route, or none
//!   ([`PathTable::trace`]).
//! - [`gateways`]: which of a site's gateways carries which destination.
//! - [`fabric`]: per-member peers, routes and accepted sources derived from
//!   the site paths, kept incrementally ([`Fabric`]).
//! - [`votes`]: link measurements from probe reports, one vote per
//!   reporter, robust to a lying reporter ([`Measurements::from_votes`]).
//!
//! Two modes ([`TopologyMode`]): `FullMesh` (every member peers with every
//! other, as [`crate::netmap`] computes) and `Gateways` (members mesh inside
//! their site; traffic between sites goes through gateway nodes along the
//! site paths).

pub mod config;
pub mod explain;
pub mod fabric;
pub mod gateways;
pub mod graph;
pub mod paths;
pub mod votes;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use weft_dataplane_core::Key;

use crate::model::Member;
use crate::state::State;

pub use config::{TopologyConfig, TopologyMode};
pub use explain::{NoRoute, RelayReason, SiteRoute, SiteTrace};
pub use fabric::{Affected, Fabric, MemberConfig, MemberHop, MemberTrace, PeerRoutes};
pub use graph::{Link, Measurements, PathParams, ResidencyRule, SiteGraph, SiteSpec};
pub use paths::{PathTable, compute_paths};
pub use votes::{ProbeVote, found_unreachable};

/// A node or external peer as topology sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    /// Which member.
    pub id: Member,
    /// Its name (for peers' names and traces).
    pub name: String,
    /// Its site.
    pub site: String,
    /// WireGuard public key.
    pub public_key: Key,
    /// Underlay endpoint, if known.
    pub endpoint: Option<SocketAddr>,
    /// Overlay prefixes it owns: its /32 and /128, then any workload
    /// prefixes it routes for.
    pub prefixes: Vec<IpNet>,
    /// Whether it is a gateway of its site (only nodes can be).
    pub gateway: bool,
}

/// Everything the fabric is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyInput {
    /// Full mesh or gateways.
    pub mode: TopologyMode,
    /// Sites with their tags.
    pub sites: Vec<SiteSpec>,
    /// Residency rules.
    pub residency: Vec<ResidencyRule>,
    /// Nodes and external peers.
    pub members: Vec<MemberSpec>,
    /// Path costs and hysteresis.
    pub params: PathParams,
    /// Persistent keepalive given to every peer, `None` = off.
    pub persistent_keepalive: Option<u16>,
}

impl TopologyInput {
    /// The input for a state with these topology settings (usually
    /// `state.topology()`).
    pub fn from_state(state: &State, config: &TopologyConfig) -> Self {
        let host = |v4, v6| vec![IpNet::V4(Ipv4Net::from(v4)), IpNet::V6(Ipv6Net::from(v6))];
        let nodes = state.nodes().map(|n| MemberSpec {
            id: Member::Node(n.id.clone()),
            name: n.name.clone(),
            site: n.site.clone(),
            public_key: n.public_key,
            endpoint: n.endpoint,
            prefixes: host(n.ipv4, n.ipv6)
                .into_iter()
                .chain(n.advertised.keys().copied())
                .collect(),
            gateway: config.gateways.contains(&n.id),
        });
        let external = state.external_peers().map(|p| MemberSpec {
            id: Member::ExternalPeer(p.name.clone()),
            name: p.name.clone(),
            site: p.site.clone(),
            public_key: p.public_key,
            endpoint: p.endpoint,
            prefixes: host(p.ipv4, p.ipv6),
            gateway: false,
        });
        TopologyInput {
            mode: config.mode,
            sites: state
                .sites()
                .map(|s| SiteSpec {
                    name: s.name.clone(),
                    tags: config.site_tags.get(&s.name).cloned().unwrap_or_default(),
                })
                .collect(),
            residency: config.residency.clone(),
            members: nodes.chain(external).collect(),
            params: config.params,
            persistent_keepalive: Some(state.settings().persistent_keepalive).filter(|k| *k != 0),
        }
    }
}
