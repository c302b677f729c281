//! Wire types to domain types (`TryFrom`, errors that name the field) and
//! back (`From`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use weft_dataplane_core::policy_maps::{PolicyInput, PolicyTuple, Protocol, Verdict};
use weft_dataplane_core::{Key, NodeConfig, PeerConfig};

use crate::pb;

/// A message from the wire that does not make a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {message}: field `{field}`: {reason}")]
pub struct InvalidMessage {
    pub message: &'static str,
    pub field: String,
    pub reason: String,
}

impl InvalidMessage {
    pub fn new(message: &'static str, field: impl Into<String>, reason: impl ToString) -> Self {
        InvalidMessage {
            message,
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

/// Parses a 32-byte WireGuard key from a bytes field.
pub fn parse_key(message: &'static str, field: &str, bytes: &[u8]) -> Result<Key, InvalidMessage> {
    Key::from_slice(bytes).map_err(|e| InvalidMessage::new(message, field, e))
}

/// Parses an optional `IP:PORT` field (empty = none).
pub fn parse_endpoint(
    message: &'static str,
    field: &str,
    s: &str,
) -> Result<Option<SocketAddr>, InvalidMessage> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<SocketAddr>()
        .map(Some)
        .map_err(|e| InvalidMessage::new(message, field, format!("{s:?} is not IP:PORT ({e})")))
}

/// Parses a workload prefix (a CIDR) from a string field.
pub fn parse_net(message: &'static str, field: &str, s: &str) -> Result<IpNet, InvalidMessage> {
    s.parse::<IpNet>()
        .map_err(|e| InvalidMessage::new(message, field, format!("{s:?} is not a CIDR ({e})")))
}

fn parse_nets(
    message: &'static str,
    field: &str,
    v: &[String],
) -> Result<Vec<IpNet>, InvalidMessage> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>().map_err(|e| {
                InvalidMessage::new(
                    message,
                    format!("{field}[{i}]"),
                    format!("{s:?} is not a CIDR ({e})"),
                )
            })
        })
        .collect()
}

impl TryFrom<pb::PeerConfig> for PeerConfig {
    type Error = InvalidMessage;
    fn try_from(p: pb::PeerConfig) -> Result<Self, Self::Error> {
        const M: &str = "PeerConfig";
        let keepalive = u16::try_from(p.persistent_keepalive)
            .map_err(|_| InvalidMessage::new(M, "persistent_keepalive", "must be at most 65535"))?;
        let fallback = p
            .fallback
            .iter()
            .enumerate()
            .map(|(i, k)| parse_key(M, &format!("fallback[{i}]"), k))
            .collect::<Result<_, _>>()?;
        Ok(PeerConfig {
            public_key: parse_key(M, "public_key", &p.public_key)?,
            endpoint: parse_endpoint(M, "endpoint", &p.endpoint)?,
            allowed_ips: parse_nets(M, "allowed_ips", &p.allowed_ips)?,
            persistent_keepalive: (keepalive != 0).then_some(keepalive),
            accept_sources: parse_nets(M, "accept_sources", &p.accept_sources)?,
            fallback,
            shared_routes: parse_nets(M, "shared_routes", &p.shared_routes)?,
            name: p.name,
        })
    }
}

impl From<&PeerConfig> for pb::PeerConfig {
    fn from(p: &PeerConfig) -> Self {
        pb::PeerConfig {
            name: p.name.clone(),
            public_key: p.public_key.0.to_vec(),
            endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
            allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
            persistent_keepalive: p.persistent_keepalive.map(u32::from).unwrap_or(0),
            accept_sources: p.accept_sources.iter().map(ToString::to_string).collect(),
            fallback: p.fallback.iter().map(|k| k.0.to_vec()).collect(),
            shared_routes: p.shared_routes.iter().map(ToString::to_string).collect(),
        }
    }
}

impl TryFrom<pb::NodeConfig> for NodeConfig {
    type Error = InvalidMessage;
    fn try_from(c: pb::NodeConfig) -> Result<Self, Self::Error> {
        const M: &str = "NodeConfig";
        let mtu = u16::try_from(c.mtu)
            .ok()
            .filter(|m| (576..=9000).contains(m))
            .ok_or_else(|| {
                InvalidMessage::new(M, "mtu", format!("{} is outside 576..=9000", c.mtu))
            })?;
        let mut peers = BTreeMap::new();
        for (i, p) in c.peers.into_iter().enumerate() {
            let peer = PeerConfig::try_from(p).map_err(|mut e| {
                e.field = format!("peers[{i}].{}", e.field);
                e.message = M;
                e
            })?;
            if peers.insert(peer.public_key, peer).is_some() {
                return Err(InvalidMessage::new(
                    M,
                    format!("peers[{i}].public_key"),
                    "duplicate peer key",
                ));
            }
        }
        let policy = match c.policy {
            None => PolicyInput::default(),
            Some(p) => PolicyInput::try_from(p).map_err(|mut e| {
                e.field = format!("policy.{}", e.field);
                e.message = M;
                e
            })?,
        };
        Ok(NodeConfig {
            revision: c.revision,
            policy,
            routes: parse_nets(M, "routes", &c.routes)?,
            forwarding: c.forwarding,
            hosted: parse_nets(M, "hosted", &c.hosted)?,
            key_generation: c.key_generation,
            addresses: parse_nets(M, "addresses", &c.addresses)?,
            mtu,
            peers,
            node_id: c.node_id,
            node_name: c.node_name,
        })
    }
}

impl From<&NodeConfig> for pb::NodeConfig {
    fn from(c: &NodeConfig) -> Self {
        pb::NodeConfig {
            revision: c.revision,
            node_id: c.node_id.clone(),
            node_name: c.node_name.clone(),
            addresses: c.addresses.iter().map(ToString::to_string).collect(),
            mtu: u32::from(c.mtu),
            peers: c.peers.values().map(pb::PeerConfig::from).collect(),
            policy: (c.policy != PolicyInput::default()).then(|| pb::NodePolicy::from(&c.policy)),
            routes: c.routes.iter().map(ToString::to_string).collect(),
            forwarding: c.forwarding,
            hosted: c.hosted.iter().map(ToString::to_string).collect(),
            key_generation: c.key_generation,
        }
    }
}

fn u16_field(message: &'static str, field: String, v: u32) -> Result<u16, InvalidMessage> {
    u16::try_from(v).map_err(|_| InvalidMessage::new(message, field, format!("{v} is above 65535")))
}

impl TryFrom<pb::NodePolicy> for PolicyInput {
    type Error = InvalidMessage;
    fn try_from(p: pb::NodePolicy) -> Result<Self, Self::Error> {
        const M: &str = "NodePolicy";
        let ipcache = p
            .ipcache
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let prefix = e.prefix.parse::<IpNet>().map_err(|err| {
                    InvalidMessage::new(
                        M,
                        format!("ipcache[{i}].prefix"),
                        format!("{:?} is not a CIDR ({err})", e.prefix),
                    )
                })?;
                Ok((prefix, e.identity))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tuples = p
            .tuples
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let protocol = match t.protocol {
                    6 => Protocol::Tcp,
                    17 => Protocol::Udp,
                    1 => Protocol::Icmp,
                    n => {
                        return Err(InvalidMessage::new(
                            M,
                            format!("tuples[{i}].protocol"),
                            format!("{n} is not 6 (TCP), 17 (UDP) or 1 (ICMP)"),
                        ));
                    }
                };
                let verdict = match t.verdict {
                    1 => Verdict::Allow,
                    2 => Verdict::Deny,
                    n => {
                        return Err(InvalidMessage::new(
                            M,
                            format!("tuples[{i}].verdict"),
                            format!("{n} is not 1 (allow) or 2 (deny)"),
                        ));
                    }
                };
                Ok(PolicyTuple {
                    dst: t.dst,
                    src: t.src,
                    protocol,
                    first: u16_field(M, format!("tuples[{i}].first"), t.first)?,
                    last: u16_field(M, format!("tuples[{i}].last"), t.last)?,
                    verdict,
                    rule: t.rule,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let local = p
            .local
            .iter()
            .enumerate()
            .map(|(i, prefix)| {
                prefix.parse::<IpNet>().map_err(|err| {
                    InvalidMessage::new(
                        M,
                        format!("local[{i}]"),
                        format!("{prefix:?} is not a CIDR ({err})"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let named = p.rules.len();
        if let Some((i, t)) = tuples
            .iter()
            .enumerate()
            .find(|(_, t)| t.rule as usize > named)
        {
            return Err(InvalidMessage::new(
                M,
                format!("tuples[{i}].rule"),
                format!("rule slot {} but only {named} rules are named", t.rule),
            ));
        }
        Ok(PolicyInput {
            ipcache,
            governed: p.governed.into_iter().collect(),
            tuples,
            rules: p.rules,
            local,
        })
    }
}

impl From<&PolicyInput> for pb::NodePolicy {
    fn from(p: &PolicyInput) -> Self {
        pb::NodePolicy {
            ipcache: p
                .ipcache
                .iter()
                .map(|(prefix, identity)| pb::IpcacheEntry {
                    prefix: prefix.to_string(),
                    identity: *identity,
                })
                .collect(),
            governed: p.governed.iter().copied().collect(),
            tuples: p
                .tuples
                .iter()
                .map(|t| pb::PolicyTuple {
                    dst: t.dst,
                    src: t.src,
                    protocol: u32::from(t.protocol.number()),
                    first: u32::from(t.first),
                    last: u32::from(t.last),
                    verdict: t.verdict.code(),
                    rule: t.rule,
                })
                .collect(),
            rules: p.rules.clone(),
            local: p.local.iter().map(ToString::to_string).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeConfig {
        let key = Key([7; 32]);
        let peer = PeerConfig {
            name: "b1".into(),
            public_key: key,
            endpoint: Some("198.18.2.2:51820".parse().expect("valid")),
            allowed_ips: vec![
                "100.64.0.2/32".parse().expect("valid"),
                "fd00::2/128".parse().expect("valid"),
            ],
            persistent_keepalive: Some(25),
            accept_sources: vec![
                "100.100.8.0/24".parse().expect("valid"),
                "fd00:beef:8::/64".parse().expect("valid"),
            ],
            fallback: vec![Key([8; 32]), Key([9; 32])],
            shared_routes: vec!["100.64.3.0/24".parse().expect("valid")],
        };
        NodeConfig {
            revision: 9,
            node_id: "n1".into(),
            node_name: "a1".into(),
            addresses: vec!["100.64.0.1/10".parse().expect("valid")],
            mtu: 1420,
            peers: [(key, peer)].into_iter().collect(),
            policy: PolicyInput {
                ipcache: vec![
                    ("100.64.0.1/32".parse().expect("valid"), 1),
                    ("fd00::2/128".parse().expect("valid"), 2),
                ],
                governed: [1].into_iter().collect(),
                tuples: vec![PolicyTuple {
                    dst: 1,
                    src: 2,
                    protocol: Protocol::Tcp,
                    first: 5432,
                    last: 5432,
                    verdict: Verdict::Allow,
                    rule: 1,
                }],
                rules: vec!["db/ingress[0]".into()],
                local: vec![
                    "100.64.0.1/32".parse().expect("valid"),
                    "fd00::1/128".parse().expect("valid"),
                    "100.100.8.0/24".parse().expect("valid"),
                ],
            },
            routes: vec![
                "100.100.2.0/24".parse().expect("valid"),
                "fd00:beef:2::/64".parse().expect("valid"),
            ],
            forwarding: true,
            hosted: vec![
                "100.64.0.1/32".parse().expect("valid"),
                "fd00::1/128".parse().expect("valid"),
                "100.100.8.0/24".parse().expect("valid"),
            ],
            key_generation: 3,
        }
    }

    #[test]
    fn node_config_round_trips() {
        let c = sample();
        assert_eq!(NodeConfig::try_from(pb::NodeConfig::from(&c)), Ok(c));
    }

    #[test]
    fn errors_name_the_field() {
        let mut w = pb::NodeConfig::from(&sample());
        w.peers[0].allowed_ips[1] = "not-a-cidr".into();
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "peers[0].allowed_ips[1]");
        let mut w = pb::NodeConfig::from(&sample());
        w.routes[1] = "fd00:beef:2::/129".into();
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "routes[1]");
        assert!(e.to_string().contains("is not a CIDR"), "{e}");
        let mut w = pb::NodeConfig::from(&sample());
        w.peers[0].public_key = vec![1, 2, 3];
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "peers[0].public_key");
        assert!(e.to_string().contains("32 bytes"), "{e}");
        let mut w = pb::NodeConfig::from(&sample());
        w.policy.as_mut().expect("policy").tuples[0].protocol = 99;
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "policy.tuples[0].protocol");
        let mut w = pb::NodeConfig::from(&sample());
        w.policy.as_mut().expect("policy").ipcache[1].prefix = "nope".into();
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "policy.ipcache[1].prefix");
        let mut w = pb::NodeConfig::from(&sample());
        w.policy.as_mut().expect("policy").tuples[0].last = 70000;
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "policy.tuples[0].last");
        let mut w = pb::NodeConfig::from(&sample());
        w.policy.as_mut().expect("policy").tuples[0].rule = 2;
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "policy.tuples[0].rule");
        assert!(e.to_string().contains("only 1 rules are named"), "{e}");
        let mut w = pb::NodeConfig::from(&sample());
        w.policy.as_mut().expect("policy").local[2] = "100.100.8.0/33".into();
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "policy.local[2]");
        assert!(e.to_string().contains("is not a CIDR"), "{e}");
        let mut w = pb::NodeConfig::from(&sample());
        w.hosted[1] = "fd00::1".into();
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "hosted[1]");
        assert!(e.to_string().contains("is not a CIDR"), "{e}");
    }

    #[test]
    fn bad_accepted_sources_and_fallbacks_are_named() {
        let mut w = pb::NodeConfig::from(&sample());
        w.peers[0].accept_sources[1] = "fd00:beef:8::/200".into();
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "peers[0].accept_sources[1]");
        assert!(
            e.to_string()
                .contains("\"fd00:beef:8::/200\" is not a CIDR"),
            "{e}"
        );
        let mut w = pb::NodeConfig::from(&sample());
        w.peers[0].fallback[1] = vec![9; 31];
        let e = NodeConfig::try_from(w).expect_err("must fail");
        assert_eq!(e.field, "peers[0].fallback[1]");
        assert!(e.to_string().contains("32 bytes, got 31"), "{e}");
    }

    #[test]
    fn a_peer_without_accepted_sources_or_fallbacks_has_empty_lists() {
        let mut w = pb::NodeConfig::from(&sample());
        w.peers[0].accept_sources.clear();
        w.peers[0].fallback.clear();
        let c = NodeConfig::try_from(w).expect("valid");
        let p = &c.peers[&Key([7; 32])];
        assert!(p.accept_sources.is_empty() && p.fallback.is_empty());
    }

    #[test]
    fn a_policy_without_hosted_prefixes_has_an_empty_list() {
        let mut w = pb::NodeConfig::from(&sample());
        w.policy.as_mut().expect("policy").local.clear();
        let c = NodeConfig::try_from(w).expect("valid");
        assert!(c.policy.local.is_empty());
        assert_eq!(c.policy.governed.len(), 1);
    }

    #[test]
    fn absent_policy_is_empty() {
        let mut w = pb::NodeConfig::from(&sample());
        w.policy = None;
        let c = NodeConfig::try_from(w).expect("valid");
        assert_eq!(c.policy, PolicyInput::default());
    }
}
