//! The validated policy resources and the endpoints they select.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A validated `NetworkPolicy` resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Unique name, a DNS label.
    pub name: String,
    /// The endpoints this policy governs (they become default-deny).
    pub target: Selector,
    /// Traffic allowed to the targets.
    pub ingress: Vec<Rule>,
    /// Traffic denied to the targets; a deny wins over any allow.
    pub deny: Vec<Rule>,
}

/// Selects endpoints by labels and site: all given labels must match and,
/// if sites are given, the endpoint's site must be one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    /// Labels the endpoint must carry with exactly these values.
    pub match_labels: BTreeMap<String, String>,
    /// Sites the endpoint must be in; empty means any site.
    pub sites: BTreeSet<String>,
}

/// One allow or deny rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// The peers the rule applies to; `None` means any source, including
    /// addresses that belong to no known endpoint.
    pub from: Option<Selector>,
    /// The traffic the rule applies to; `None` means all of it.
    pub ports: Option<Vec<PortRule>>,
}

/// A protocol and, for TCP and UDP, a range of destination ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRule {
    /// The IP protocol.
    pub protocol: Protocol,
    /// The destination ports; always [`PortRange::ALL`] for ICMP.
    pub ports: PortRange,
}

/// The L4 protocols policy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP and ICMPv6 (no ports).
    Icmp,
}

impl Protocol {
    /// Every protocol, in a fixed order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp];

    /// Whether packets of this protocol have ports policy can match on.
    pub fn has_ports(self) -> bool {
        match self {
            Protocol::Tcp | Protocol::Udp => true,
            Protocol::Icmp => false,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Icmp => "ICMP",
        })
    }
}

/// An inclusive range of ports, `first <= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port in the range.
    pub first: u16,
    /// Last port in the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port, 0 to 65535.
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    /// The range holding just this port.
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// Whether `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// What happens to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Drop it.
    Deny,
}

/// Something with overlay addresses that policy can select: a node, a
/// workload behind a node, or an external peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Unique name.
    pub name: String,
    /// Name of the endpoint's site.
    pub site: String,
    /// The node that enforces policy for this endpoint (itself for a node,
    /// its host for a workload; external peers have none).
    pub node: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Overlay prefixes the endpoint owns (IPv4 and IPv6).
    pub prefixes: Vec<IpNet>,
}

impl Selector {
    /// Whether an endpoint in `site` with `labels` is selected.
    pub fn matches(&self, site: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.sites.is_empty() || self.sites.contains(site))
            && self
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl Rule {
    /// Whether the rule covers a packet of `protocol` to `port` (the port
    /// is ignored for ICMP).
    pub fn covers(&self, protocol: Protocol, port: u16) -> bool {
        match &self.ports {
            None => true,
            Some(rules) => rules.iter().any(|r| {
                r.protocol == protocol && (!protocol.has_ports() || r.ports.contains(port))
            }),
        }
    }

    /// The protocols and port ranges the rule covers, spelled out.
    pub fn port_rules(&self) -> Vec<PortRule> {
        match &self.ports {
            Some(rules) => rules.clone(),
            None => Protocol::ALL
                .iter()
                .map(|&protocol| PortRule {
                    protocol,
                    ports: PortRange::ALL,
                })
                .collect(),
        }
    }
}
