//! What no workload prefix may capture.
//!
//! Every node routes the workload prefixes of the others into the tunnel,
//! ahead of its main table. A prefix covering an address the underlay must
//! carry (where agents reach the controller, where members receive their
//! WireGuard packets) would pull that traffic into the overlay and cut the
//! network off; a very short one would capture everything. So a prefix is
//! refused, whoever asks for it, if it is shorter than the network's
//! minimum or covers such an address; and since endpoints move after a
//! prefix was approved, the configs leave out any approved prefix that has
//! come to cover one ([`crate::State::publishable`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::error::Error;
use crate::model::NetworkSettings;
use crate::state::State;

/// Protected addresses the state does not hold, from the controller's
/// runtime: where agents reach the controller, and endpoints learnt from
/// the agents' reports. Not persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protected {
    /// Addresses agents reach the controller at.
    pub controller: BTreeSet<IpAddr>,
    /// Endpoints of nodes as members of other sites see them, by node id.
    pub learnt: BTreeMap<String, SocketAddr>,
}

/// Every protected address, with what it is (for error messages): the
/// controller's, then every member's registered endpoint, then the learnt
/// ones. Ordered by address, so a prefix's covered addresses are one range.
#[derive(Debug, Clone, Default)]
pub struct Shield {
    addrs: BTreeMap<IpAddr, String>,
}

impl Shield {
    /// The protected addresses of `state` with `extra`.
    pub fn new(state: &State, extra: &Protected) -> Shield {
        let mut shield = Shield::default();
        for ip in &extra.controller {
            shield.add(*ip, || format!("the controller address {}", canonical(*ip)));
        }
        for n in state.nodes() {
            if let Some(e) = n.endpoint {
                shield.add(e.ip(), || {
                    format!("the endpoint {} of node {:?}", canonical(e.ip()), n.name)
                });
            }
        }
        for p in state.external_peers() {
            if let Some(e) = p.endpoint {
                shield.add(e.ip(), || {
                    format!(
                        "the endpoint {} of external peer {:?}",
                        canonical(e.ip()),
                        p.name
                    )
                });
            }
        }
        for (id, e) in &extra.learnt {
            let name = state
                .node_by_id(id)
                .map_or(id.as_str(), |n| n.name.as_str());
            shield.add(e.ip(), || {
                format!(
                    "the endpoint {} of node {name:?} (learnt from its peers)",
                    canonical(e.ip())
                )
            });
        }
        shield
    }

    fn add(&mut self, ip: IpAddr, what: impl FnOnce() -> String) {
        self.addrs.entry(canonical(ip)).or_insert_with(what);
    }

    /// The lowest protected address inside `prefix`, described.
    pub fn covered(&self, prefix: IpNet) -> Option<&str> {
        // IPv4 addresses sort before IPv6 ones: a range between two
        // addresses of one family holds only that family.
        self.addrs
            .range(prefix.network()..=prefix.broadcast())
            .next()
            .map(|(_, what)| what.as_str())
    }

    /// Every protected address.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addrs.keys().copied()
    }
}

/// Checks that a workload prefix is safe to route: not shorter than the
/// network's minimum for its family and covering no protected address.
pub fn check_safe(prefix: IpNet, settings: &NetworkSettings, shield: &Shield) -> Result<(), Error> {
    let min = settings.min_prefix_len(prefix);
    if prefix.prefix_len() < min {
        return Err(Error::PrefixTooShort {
            prefix: prefix.to_string(),
            min,
            family: match prefix {
                IpNet::V4(_) => "IPv4",
                IpNet::V6(_) => "IPv6",
            },
        });
    }
    if let Some(what) = shield.covered(prefix) {
        return Err(Error::PrefixCoversProtected {
            prefix: prefix.to_string(),
            what: what.to_owned(),
        });
    }
    Ok(())
}

/// IPv4-mapped IPv6 addresses as plain IPv4 (how the kernel routes them).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}
