//! What `-o json` prints: serde structs of our own, built from the wire
//! types (the generated protobuf types stay free of serde). Field names are
//! a stable interface: scripts and tests parse them.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use weft_proto::pb;

/// A node with its live status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct NodeView {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) site: String,
    pub(crate) public_key: String,
    pub(crate) endpoint: String,
    pub(crate) addresses: Vec<String>,
    pub(crate) connected: bool,
    pub(crate) applied_revision: u64,
    pub(crate) last_report_unix: u64,
    pub(crate) apply_error: String,
    pub(crate) peers: Vec<PeerStatusView>,
    pub(crate) labels: BTreeMap<String, String>,
    /// Workload prefixes the node routes for, with their labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) workloads: BTreeMap<String, BTreeMap<String, String>>,
    /// Approved workload prefixes left out of every config, with why.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) withheld: BTreeMap<String, String>,
    /// Prefixes the agent asked for that wait for approval.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) pending: BTreeMap<String, PendingView>,
    /// The agent's policy counters (absent: no eBPF policy datapath, or
    /// no report yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) policy: Option<PolicyStatusView>,
    /// When the node's client certificate expires (unix seconds; 0: a
    /// certificate from before expiry).
    pub(crate) cert_expires_unix: u64,
    /// Packets the node's tunnel dropped after decryption, per reason
    /// (`not_for_us`, `bad_source`); absent: none reported.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) tunnel_drops: BTreeMap<String, CounterView>,
}

/// A workload prefix waiting for an operator's approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PendingView {
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) reason: String,
}

/// A node's policy counters, from the agent's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PolicyStatusView {
    /// Per verdict (`allowed`, `denied`, `default_denied`, …).
    pub(crate) verdicts: BTreeMap<String, CounterView>,
    /// Per rule that decided packets.
    pub(crate) rules: Vec<RuleCounterView>,
    pub(crate) tracked_flows: u64,
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct CounterView {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

/// The counter of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RuleCounterView {
    pub(crate) rule: String,
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

/// A node's view of one of its WireGuard peers, from the agent's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PeerStatusView {
    pub(crate) public_key: String,
    pub(crate) last_handshake_unix: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) endpoint: String,
    /// The node's probes of this peer (absent: not probed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) probe: Option<PeerProbeView>,
}

/// Round-trip time, loss and reachability from the node's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct PeerProbeView {
    pub(crate) rtt_us: u64,
    pub(crate) loss_permille: u32,
    pub(crate) reachable: bool,
    pub(crate) samples: u32,
}

/// An external (non-agent) WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ExternalPeerView {
    pub(crate) name: String,
    pub(crate) site: String,
    pub(crate) public_key: String,
    pub(crate) endpoint: String,
    pub(crate) addresses: Vec<String>,
    pub(crate) created_unix: u64,
    pub(crate) labels: BTreeMap<String, String>,
}

/// A network policy (`-o yaml` prints `yaml` alone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PolicyView {
    pub(crate) name: String,
    pub(crate) target: String,
    pub(crate) ingress_rules: u32,
    pub(crate) deny_rules: u32,
    pub(crate) yaml: String,
}

/// The result of `apply` (with `changes` on a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ApplyView {
    pub(crate) dry_run: bool,
    pub(crate) revision: u64,
    pub(crate) created: Vec<String>,
    pub(crate) updated: Vec<String>,
    pub(crate) unchanged: Vec<String>,
    pub(crate) changes: Vec<ReachabilityView>,
    pub(crate) changes_omitted: u32,
}

/// One pair that gains (`"+"`) or loses (`"-"`) access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ReachabilityView {
    pub(crate) change: &'static str,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) protocol: String,
    pub(crate) port_first: u32,
    pub(crate) port_last: u32,
}

/// The answer of `policy explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ExplainView {
    pub(crate) verdict: String,
    pub(crate) reason: String,
    pub(crate) policy: String,
    pub(crate) rule: String,
    pub(crate) selected_by: Vec<String>,
}

impl From<&pb::Policy> for PolicyView {
    fn from(p: &pb::Policy) -> Self {
        PolicyView {
            name: p.name.clone(),
            target: p.target.clone(),
            ingress_rules: p.ingress_rules,
            deny_rules: p.deny_rules,
            yaml: p.yaml.clone(),
        }
    }
}

impl From<&pb::ApplyPoliciesResponse> for ApplyView {
    fn from(r: &pb::ApplyPoliciesResponse) -> Self {
        ApplyView {
            dry_run: r.dry_run,
            revision: r.revision,
            created: r.created.clone(),
            updated: r.updated.clone(),
            unchanged: r.unchanged.clone(),
            changes: r
                .changes
                .iter()
                .map(|c| ReachabilityView {
                    change: if c.gained { "+" } else { "-" },
                    from: c.from.clone(),
                    to: c.to.clone(),
                    protocol: c.protocol.clone(),
                    port_first: c.port_first,
                    port_last: c.port_last,
                })
                .collect(),
            changes_omitted: r.changes_omitted,
        }
    }
}

impl From<&pb::ExplainPolicyResponse> for ExplainView {
    fn from(r: &pb::ExplainPolicyResponse) -> Self {
        ExplainView {
            verdict: r.verdict.clone(),
            reason: r.reason.clone(),
            policy: r.policy.clone(),
            rule: r.rule.clone(),
            selected_by: r.selected_by.clone(),
        }
    }
}

/// A site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct SiteView {
    pub(crate) name: String,
    pub(crate) created_unix: u64,
    pub(crate) node_count: u32,
}

/// A join token as listed: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TokenView {
    pub(crate) id: String,
    pub(crate) site: String,
    pub(crate) created_unix: u64,
    pub(crate) expires_unix: u64,
    pub(crate) used_by_node: String,
    /// Labels the enrolled node gets.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) labels: BTreeMap<String, String>,
    /// Prefixes its agent may advertise inside without approval.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) allow_prefixes: Vec<String>,
}

/// A freshly created join token, with its secret (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct CreatedTokenView {
    pub(crate) id: String,
    pub(crate) site: String,
    pub(crate) expires_unix: u64,
    pub(crate) token: String,
    /// Labels the enrolled node gets.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) labels: BTreeMap<String, String>,
    /// Prefixes its agent may advertise inside without approval.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) allow_prefixes: Vec<String>,
}

/// An admin token as listed: never the secret. 0: never expires / not
/// revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct AdminTokenView {
    pub(crate) name: String,
    pub(crate) role: String,
    pub(crate) created_unix: u64,
    pub(crate) expires_unix: u64,
    pub(crate) revoked_unix: u64,
}

/// A freshly created admin token, with its secret (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct CreatedAdminTokenView {
    pub(crate) name: String,
    pub(crate) role: String,
    pub(crate) expires_unix: u64,
    pub(crate) token: String,
}

/// One record of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct AuditRecordView {
    pub(crate) unix: u64,
    pub(crate) credential: String,
    pub(crate) rpc: String,
    pub(crate) summary: String,
    pub(crate) revision: u64,
    pub(crate) outcome: String,
}

impl From<&pb::AdminToken> for AdminTokenView {
    fn from(t: &pb::AdminToken) -> Self {
        AdminTokenView {
            name: t.name.clone(),
            role: t.role.clone(),
            created_unix: t.created_unix,
            expires_unix: t.expires_unix,
            revoked_unix: t.revoked_unix,
        }
    }
}

impl From<&pb::AdminToken> for CreatedAdminTokenView {
    fn from(t: &pb::AdminToken) -> Self {
        CreatedAdminTokenView {
            name: t.name.clone(),
            role: t.role.clone(),
            expires_unix: t.expires_unix,
            token: t.token.clone(),
        }
    }
}

impl From<&pb::AuditRecord> for AuditRecordView {
    fn from(r: &pb::AuditRecord) -> Self {
        AuditRecordView {
            unix: r.unix,
            credential: r.credential.clone(),
            rpc: r.rpc.clone(),
            summary: r.summary.clone(),
            revision: r.revision,
            outcome: r.outcome.clone(),
        }
    }
}

/// Result of a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct DeletedView {
    pub(crate) kind: &'static str,
    pub(crate) name: String,
    pub(crate) revision: u64,
}

/// An external peer's computed configuration (`peer config -o json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PeerConfigView {
    pub(crate) name: String,
    pub(crate) site: String,
    pub(crate) revision: u64,
    pub(crate) addresses: Vec<String>,
    pub(crate) listen_endpoint: String,
    pub(crate) mtu: u32,
    pub(crate) peers: Vec<ConfigPeerView>,
}

/// One peer in a [`PeerConfigView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ConfigPeerView {
    pub(crate) name: String,
    pub(crate) public_key: String,
    pub(crate) endpoint: String,
    pub(crate) allowed_ips: Vec<String>,
    pub(crate) persistent_keepalive: u32,
}

/// Base64 of a key as `wg` shows it. Any length is encoded so that a bad
/// key from the server is still visible rather than hidden.
pub(crate) fn key_b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

impl From<&pb::Node> for NodeView {
    fn from(n: &pb::Node) -> Self {
        NodeView {
            id: n.id.clone(),
            name: n.name.clone(),
            site: n.site.clone(),
            public_key: key_b64(&n.public_key),
            endpoint: n.endpoint.clone(),
            addresses: n.addresses.clone(),
            connected: n.connected,
            applied_revision: n.applied_revision,
            last_report_unix: n.last_report_unix,
            apply_error: n.apply_error.clone(),
            peers: n.peers.iter().map(PeerStatusView::from).collect(),
            labels: n.labels.clone().into_iter().collect(),
            workloads: n
                .workloads
                .iter()
                .map(|w| (w.prefix.clone(), w.labels.clone().into_iter().collect()))
                .collect(),
            withheld: n
                .workloads
                .iter()
                .filter(|w| !w.reason.is_empty())
                .map(|w| (w.prefix.clone(), w.reason.clone()))
                .collect(),
            pending: n
                .pending
                .iter()
                .map(|w| {
                    let view = PendingView {
                        labels: w.labels.clone().into_iter().collect(),
                        reason: w.reason.clone(),
                    };
                    (w.prefix.clone(), view)
                })
                .collect(),
            policy: n.policy.as_ref().map(PolicyStatusView::from),
            tunnel_drops: counters(&n.tunnel_drops),
            cert_expires_unix: n.cert_expires_unix,
        }
    }
}

/// Counters by verdict or reason.
fn counters(v: &[pb::VerdictCounter]) -> BTreeMap<String, CounterView> {
    v.iter()
        .map(|v| {
            let c = CounterView {
                packets: v.packets,
                bytes: v.bytes,
            };
            (v.verdict.clone(), c)
        })
        .collect()
}

impl From<&pb::PolicyStatus> for PolicyStatusView {
    fn from(p: &pb::PolicyStatus) -> Self {
        PolicyStatusView {
            verdicts: counters(&p.verdicts),
            rules: p
                .rules
                .iter()
                .map(|r| RuleCounterView {
                    rule: r.rule.clone(),
                    packets: r.packets,
                    bytes: r.bytes,
                })
                .collect(),
            tracked_flows: p.tracked_flows,
        }
    }
}

impl From<&pb::PeerStatus> for PeerStatusView {
    fn from(p: &pb::PeerStatus) -> Self {
        PeerStatusView {
            public_key: key_b64(&p.public_key),
            last_handshake_unix: p.last_handshake_unix,
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            endpoint: p.endpoint.clone(),
            probe: p.probe.map(|q| PeerProbeView {
                rtt_us: q.rtt_us,
                loss_permille: q.loss_permille,
                reachable: q.reachable,
                samples: q.samples,
            }),
        }
    }
}

impl From<&pb::ExternalPeer> for ExternalPeerView {
    fn from(p: &pb::ExternalPeer) -> Self {
        ExternalPeerView {
            name: p.name.clone(),
            site: p.site.clone(),
            public_key: key_b64(&p.public_key),
            endpoint: p.endpoint.clone(),
            addresses: p.addresses.clone(),
            created_unix: p.created_unix,
            labels: p.labels.clone().into_iter().collect(),
        }
    }
}

impl From<&pb::Site> for SiteView {
    fn from(s: &pb::Site) -> Self {
        SiteView {
            name: s.name.clone(),
            created_unix: s.created_unix,
            node_count: s.node_count,
        }
    }
}

impl From<&pb::JoinToken> for TokenView {
    fn from(t: &pb::JoinToken) -> Self {
        TokenView {
            id: t.id.clone(),
            site: t.site.clone(),
            created_unix: t.created_unix,
            expires_unix: t.expires_unix,
            used_by_node: t.used_by_node.clone(),
            labels: t.labels.clone().into_iter().collect(),
            allow_prefixes: t.allow_prefixes.clone(),
        }
    }
}

impl From<&pb::JoinToken> for CreatedTokenView {
    fn from(t: &pb::JoinToken) -> Self {
        CreatedTokenView {
            id: t.id.clone(),
            site: t.site.clone(),
            expires_unix: t.expires_unix,
            token: t.token.clone(),
            labels: t.labels.clone().into_iter().collect(),
            allow_prefixes: t.allow_prefixes.clone(),
        }
    }
}

impl PeerConfigView {
    /// Combines the external peer object and its computed config.
    pub(crate) fn new(peer: &pb::ExternalPeer, cfg: &pb::NodeConfig) -> Self {
        PeerConfigView {
            name: cfg.node_name.clone(),
            site: peer.site.clone(),
            revision: cfg.revision,
            addresses: cfg.addresses.clone(),
            listen_endpoint: peer.endpoint.clone(),
            mtu: cfg.mtu,
            peers: cfg
                .peers
                .iter()
                .map(|p| ConfigPeerView {
                    name: p.name.clone(),
                    public_key: key_b64(&p.public_key),
                    endpoint: p.endpoint.clone(),
                    allowed_ips: p.allowed_ips.clone(),
                    persistent_keepalive: p.persistent_keepalive,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_json_has_the_documented_fields() {
        let node = pb::Node {
            id: "n1".into(),
            name: "a1".into(),
            site: "a".into(),
            public_key: vec![1; 32],
            endpoint: "198.19.1.11:51820".into(),
            addresses: vec!["100.64.0.1/10".into()],
            created_unix: 5,
            connected: true,
            applied_revision: 7,
            last_report_unix: 100,
            apply_error: String::new(),
            peers: vec![pb::PeerStatus {
                public_key: vec![2; 32],
                last_handshake_unix: 90,
                rx_bytes: 10,
                tx_bytes: 20,
                endpoint: "198.19.1.12:51820".into(),
                probe: None,
            }],
            labels: [("app".to_owned(), "web".to_owned())].into(),
            tunnel_drops: vec![],
            policy: None,
            workloads: vec![],
            pending: vec![],
            cert_expires_unix: 0,
        };
        let json = serde_json::to_value(NodeView::from(&node)).expect("node view serialises");
        let want = serde_json::json!({
            "id": "n1", "name": "a1", "site": "a",
            "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            "endpoint": "198.19.1.11:51820", "addresses": ["100.64.0.1/10"],
            "connected": true, "applied_revision": 7, "last_report_unix": 100, "apply_error": "",
            "peers": [{
                "public_key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
                "last_handshake_unix": 90, "rx_bytes": 10, "tx_bytes": 20, "endpoint": "198.19.1.12:51820"
            }],
            "labels": {"app": "web"}, "cert_expires_unix": 0
        });
        assert_eq!(json, want);
        let dropped = pb::Node {
            tunnel_drops: vec![
                pb::VerdictCounter {
                    verdict: "not_for_us".into(),
                    packets: 3,
                    bytes: 252,
                },
                pb::VerdictCounter {
                    verdict: "bad_source".into(),
                    packets: 0,
                    bytes: 0,
                },
            ],
            ..node
        };
        let json = serde_json::to_value(NodeView::from(&dropped)).expect("node view serialises");
        assert_eq!(
            json["tunnel_drops"],
            serde_json::json!({
                "not_for_us": {"packets": 3, "bytes": 252},
                "bad_source": {"packets": 0, "bytes": 0}
            })
        );
    }

    #[test]
    fn external_peer_json_has_the_documented_fields() {
        let peer = pb::ExternalPeer {
            name: "x1".into(),
            site: "a".into(),
            public_key: vec![1; 32],
            endpoint: String::new(),
            addresses: vec!["100.64.0.9/10".into()],
            created_unix: 42,
            labels: Default::default(),
        };
        let json =
            serde_json::to_value(ExternalPeerView::from(&peer)).expect("peer view serialises");
        let want = serde_json::json!({
            "name": "x1", "site": "a",
            "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            "endpoint": "", "addresses": ["100.64.0.9/10"], "created_unix": 42,
            "labels": {}
        });
        assert_eq!(json, want);
    }

    #[test]
    fn created_token_json_has_exactly_four_fields() {
        let t = pb::JoinToken {
            id: "t1".into(),
            site: "a".into(),
            created_unix: 1,
            expires_unix: 3601,
            used_by_node: String::new(),
            token: "weft1.secret".into(),
            ..Default::default()
        };
        let json = serde_json::to_value(CreatedTokenView::from(&t)).expect("token view serialises");
        assert_eq!(
            json,
            serde_json::json!({"id": "t1", "site": "a", "expires_unix": 3601, "token": "weft1.secret"})
        );
        let listed = serde_json::to_string(&TokenView::from(&t)).expect("token view serialises");
        assert!(
            !listed.contains("secret"),
            "a listed token must not carry its secret: {listed}"
        );
    }
}
