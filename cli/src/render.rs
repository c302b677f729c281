//! Table-mode text for each resource: lists as aligned tables, single
//! objects as `Label: value` descriptions. Pure: `now` is an argument.

use std::collections::BTreeMap;

use weft_proto::pb;

use crate::output::{Table, ago, bytes, fields, or_dash, until, utc};
use crate::view::key_b64;

/// `site list`.
pub(crate) fn sites(sites: &[pb::Site], now: u64) -> String {
    let mut t = Table::new(&["NAME", "NODES", "CREATED"]);
    for s in sites {
        t.row(vec![
            s.name.clone(),
            s.node_count.to_string(),
            ago(s.created_unix, now),
        ]);
    }
    t.render()
}

/// `site get`.
pub(crate) fn site(s: &pb::Site, now: u64) -> String {
    fields(&[
        ("Name", s.name.clone()),
        ("Nodes", s.node_count.to_string()),
        ("Created", with_ago(s.created_unix, now)),
    ])
}

/// `token list`: never the secret.
pub(crate) fn tokens(tokens: &[pb::JoinToken], now: u64) -> String {
    let mut t = Table::new(&["ID", "SITE", "CREATED", "EXPIRES", "USED BY", "GRANTS"]);
    for tok in tokens {
        let expires = if tok.used_by_node.is_empty() {
            until(tok.expires_unix, now)
        } else {
            "-".to_string()
        };
        t.row(vec![
            tok.id.clone(),
            tok.site.clone(),
            ago(tok.created_unix, now),
            expires,
            or_dash(&tok.used_by_node),
            grants(tok),
        ]);
    }
    t.render()
}

/// What a token grants beyond its site: `k=v, k2=v2; allow CIDR, CIDR`.
fn grants(tok: &pb::JoinToken) -> String {
    let mut parts = Vec::new();
    if !tok.labels.is_empty() {
        parts.push(labels(&tok.labels));
    }
    if !tok.allow_prefixes.is_empty() {
        parts.push(format!("allow {}", tok.allow_prefixes.join(", ")));
    }
    or_dash(&parts.join("; "))
}

/// `admin token list`: never the secret.
pub(crate) fn admin_tokens(tokens: &[pb::AdminToken], now: u64) -> String {
    let mut t = Table::new(&["NAME", "ROLE", "CREATED", "EXPIRES", "REVOKED"]);
    for tok in tokens {
        let expires = match tok.expires_unix {
            _ if tok.revoked_unix != 0 => "-".to_owned(),
            0 => "never".to_owned(),
            e => until(e, now),
        };
        t.row(vec![
            tok.name.clone(),
            tok.role.clone(),
            ago(tok.created_unix, now),
            expires,
            if tok.revoked_unix == 0 {
                "-".to_owned()
            } else {
                ago(tok.revoked_unix, now)
            },
        ]);
    }
    t.render()
}

/// `audit`: oldest first.
pub(crate) fn audit(records: &[pb::AuditRecord]) -> String {
    let mut t = Table::new(&["TIME", "CREDENTIAL", "RPC", "CHANGE", "REVISION", "OUTCOME"]);
    for r in records {
        t.row(vec![
            utc(r.unix),
            r.credential.clone(),
            r.rpc.clone(),
            or_dash(&r.summary),
            r.revision.to_string(),
            r.outcome.clone(),
        ]);
    }
    t.render()
}

/// `node list`. `revision` is the controller's current revision.
pub(crate) fn nodes(nodes: &[pb::Node], revision: u64, now: u64) -> String {
    let mut t = Table::new(&[
        "NAME",
        "ID",
        "SITE",
        "ADDRESSES",
        "ENDPOINT",
        "CONNECTED",
        "REVISION",
        "LAST REPORT",
    ]);
    for n in nodes {
        t.row(vec![
            n.name.clone(),
            n.id.clone(),
            n.site.clone(),
            or_dash(&n.addresses.join(",")),
            or_dash(&n.endpoint),
            yes_no(n.connected),
            format!("{}/{revision}", n.applied_revision),
            ago(n.last_report_unix, now),
        ]);
    }
    t.render()
}

/// `node get`: the node and its peers' status. `names` maps public keys to
/// node or external peer names (may be empty); `revision` is the current
/// revision when known.
pub(crate) fn node(
    n: &pb::Node,
    names: &BTreeMap<Vec<u8>, String>,
    revision: Option<u64>,
    now: u64,
) -> String {
    let applied = match revision {
        Some(current) if current == n.applied_revision => format!("{current} (up to date)"),
        Some(current) => format!("{} applied, {current} current", n.applied_revision),
        None => format!("{} applied", n.applied_revision),
    };
    let mut out = fields(&[
        ("Name", n.name.clone()),
        ("ID", n.id.clone()),
        ("Site", n.site.clone()),
        ("Public key", key_b64(&n.public_key)),
        ("Endpoint", or_dash(&n.endpoint)),
        ("Addresses", or_dash(&n.addresses.join(", "))),
        ("Labels", labels(&n.labels)),
        ("Workloads", workloads(&n.workloads)),
        ("Pending", pending(&n.pending)),
        ("Created", with_ago(n.created_unix, now)),
        ("Certificate", cert_expiry(n.cert_expires_unix, now)),
        ("Connected", yes_no(n.connected)),
        ("Revision", applied),
        ("Last report", ago(n.last_report_unix, now)),
        (
            "Apply error",
            if n.apply_error.is_empty() {
                "none".to_string()
            } else {
                n.apply_error.clone()
            },
        ),
    ]);
    out.push_str(&format!("Peers ({}):\n", n.peers.len()));
    if n.peers.is_empty() {
        out.push_str("  none reported\n");
    } else {
        peers_table(&mut out, n, names, now);
    }
    policy_section(&mut out, n.policy.as_ref());
    tunnel_drops_section(&mut out, &n.tunnel_drops);
    out
}

/// What the node's tunnel dropped after decryption, per reason.
fn tunnel_drops_section(out: &mut String, drops: &[pb::VerdictCounter]) {
    if drops.is_empty() {
        out.push_str("Tunnel drops: none reported\n");
        return;
    }
    out.push_str("Tunnel drops (since the agent started):\n");
    let mut t = Table::new(&["REASON", "PACKETS", "BYTES"]);
    for v in drops {
        t.row(vec![
            v.verdict.clone(),
            v.packets.to_string(),
            bytes(v.bytes),
        ]);
    }
    indent(out, &t.render());
}

/// When a node's certificate expires: `expires <utc> (in 20d)`; a
/// certificate from before expiry never does (until the agent renews it).
fn cert_expiry(expires_unix: u64, now: u64) -> String {
    if expires_unix == 0 {
        return "no expiry (issued before certificates expired; renewed by the agent)".to_string();
    }
    format!(
        "expires {} ({})",
        utc(expires_unix),
        until(expires_unix, now)
    )
}

fn peers_table(out: &mut String, n: &pb::Node, names: &BTreeMap<Vec<u8>, String>, now: u64) {
    let mut t = Table::new(&[
        "PEER",
        "PUBLIC KEY",
        "ENDPOINT",
        "LATEST HANDSHAKE",
        "RX",
        "TX",
        "RTT",
        "LOSS",
    ]);
    for p in &n.peers {
        t.row(vec![
            names
                .get(&p.public_key)
                .cloned()
                .unwrap_or_else(|| "?".to_string()),
            key_b64(&p.public_key),
            or_dash(&p.endpoint),
            ago(p.last_handshake_unix, now),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            probe_rtt(p.probe.as_ref()),
            probe_loss(p.probe.as_ref()),
        ]);
    }
    indent(out, &t.render());
}

/// A probed peer's median round-trip time, or why there is none.
fn probe_rtt(p: Option<&pb::PeerProbe>) -> String {
    match p {
        None => "-".to_owned(),
        Some(p) if !p.reachable => "unreachable".to_owned(),
        Some(p) if p.samples == 0 || p.rtt_us == 0 => "-".to_owned(),
        // Sub-millisecond round trips (same site) keep their digits.
        Some(p) if p.rtt_us < 1000 => format!("{:.2} ms", p.rtt_us as f64 / 1000.0),
        Some(p) => format!("{:.1} ms", p.rtt_us as f64 / 1000.0),
    }
}

fn probe_loss(p: Option<&pb::PeerProbe>) -> String {
    match p {
        Some(p) if p.samples > 0 => format!("{:.0}%", f64::from(p.loss_permille) / 10.0),
        Some(_) | None => "-".to_owned(),
    }
}

/// The policy counters of a node's last report.
fn policy_section(out: &mut String, policy: Option<&pb::PolicyStatus>) {
    let Some(p) = policy else {
        out.push_str("Policy: no counters reported (no eBPF policy datapath)\n");
        return;
    };
    out.push_str(&format!(
        "Policy (since the agent started; {} tracked flows):\n",
        p.tracked_flows
    ));
    let mut t = Table::new(&["VERDICT", "PACKETS", "BYTES"]);
    for v in &p.verdicts {
        t.row(vec![
            v.verdict.clone(),
            v.packets.to_string(),
            bytes(v.bytes),
        ]);
    }
    indent(out, &t.render());
    if !p.rules.is_empty() {
        let mut t = Table::new(&["RULE", "PACKETS", "BYTES"]);
        for r in &p.rules {
            t.row(vec![r.rule.clone(), r.packets.to_string(), bytes(r.bytes)]);
        }
        indent(out, &t.render());
    }
}

fn indent(out: &mut String, text: &str) {
    for line in text.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
}

/// `peer list`.
pub(crate) fn external_peers(peers: &[pb::ExternalPeer], now: u64) -> String {
    let mut t = Table::new(&[
        "NAME",
        "SITE",
        "PUBLIC KEY",
        "ENDPOINT",
        "ADDRESSES",
        "CREATED",
    ]);
    for p in peers {
        t.row(vec![
            p.name.clone(),
            p.site.clone(),
            key_b64(&p.public_key),
            or_dash(&p.endpoint),
            or_dash(&p.addresses.join(",")),
            ago(p.created_unix, now),
        ]);
    }
    t.render()
}

/// `peer get`.
pub(crate) fn external_peer(p: &pb::ExternalPeer, now: u64) -> String {
    fields(&[
        ("Name", p.name.clone()),
        ("Site", p.site.clone()),
        ("Public key", key_b64(&p.public_key)),
        (
            "Endpoint",
            if p.endpoint.is_empty() {
                "none (the peer calls the nodes)".to_string()
            } else {
                p.endpoint.clone()
            },
        ),
        ("Addresses", or_dash(&p.addresses.join(", "))),
        ("Labels", labels(&p.labels)),
        ("Created", with_ago(p.created_unix, now)),
    ])
}

/// Labels as `k=v, k2=v2` (sorted), or `none`.
/// Workload prefixes with their labels, e.g. `100.100.2.0/24 (app=pg)`,
/// and why one is not routed, if it is not.
pub(crate) fn workloads(workloads: &[pb::Workload]) -> String {
    if workloads.is_empty() {
        return "none".to_owned();
    }
    workloads
        .iter()
        .map(|w| {
            let mut s = w.prefix.clone();
            if !w.labels.is_empty() {
                s.push_str(&format!(" ({})", labels(&w.labels)));
            }
            if !w.reason.is_empty() {
                s.push_str(&format!(" [not routed: {}]", w.reason));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prefixes waiting for approval, each with its reason.
pub(crate) fn pending(pending: &[pb::Workload]) -> String {
    if pending.is_empty() {
        return "none".to_owned();
    }
    pending
        .iter()
        .map(|w| {
            let labelled = if w.labels.is_empty() {
                String::new()
            } else {
                format!(" ({})", labels(&w.labels))
            };
            format!("{}{labelled}: {}", w.prefix, w.reason)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn labels(labels: &std::collections::HashMap<String, String>) -> String {
    if labels.is_empty() {
        return "none".to_string();
    }
    let sorted: BTreeMap<&String, &String> = labels.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `get policies`.
pub(crate) fn policies(policies: &[pb::Policy]) -> String {
    let mut t = Table::new(&["NAME", "TARGET", "INGRESS", "DENY"]);
    for p in policies {
        t.row(vec![
            p.name.clone(),
            p.target.clone(),
            p.ingress_rules.to_string(),
            p.deny_rules.to_string(),
        ]);
    }
    t.render()
}

/// `topology get|set`.
pub(crate) fn topology(t: &pb::Topology) -> String {
    let tags: BTreeMap<&str, String> = t
        .site_tags
        .iter()
        .map(|(s, tags)| (s.as_str(), tags.tags.join(",")))
        .collect();
    let tags: Vec<String> = tags.iter().map(|(s, t)| format!("{s}={t}")).collect();
    let list = |v: &[String]| or_dash(&v.join(", "));
    fields(&[
        ("Mode", t.mode.clone()),
        ("Gateways", list(&t.gateways)),
        ("Site tags", list(&tags)),
        ("Residency", list(&t.residency)),
        ("Revision", t.revision.to_string()),
    ])
}

/// `route list`.
pub(crate) fn site_routes(routes: &[pb::SiteRouteInfo]) -> String {
    let mut t = Table::new(&["FROM", "TO", "ROUTE", "PATH", "WHY"]);
    for r in routes {
        // The explanation reads "a -> c -> b: relayed via c: why".
        let why = r
            .explanation
            .split_once(": ")
            .map_or(r.explanation.as_str(), |(_, w)| w);
        t.row(vec![
            r.from.clone(),
            r.to.clone(),
            r.kind.clone(),
            or_dash(&r.hops.join(" -> ")),
            why.to_owned(),
        ]);
    }
    t.render()
}

/// `get policy NAME`: a summary, then the document.
pub(crate) fn policy(p: &pb::Policy) -> String {
    let mut out = fields(&[
        ("Name", p.name.clone()),
        ("Target", p.target.clone()),
        ("Ingress rules", p.ingress_rules.to_string()),
        ("Deny rules", p.deny_rules.to_string()),
    ]);
    out.push_str("---\n");
    out.push_str(&p.yaml);
    out
}

/// `policy explain`: `allow: policy "db", ingress[1]` and the like.
pub(crate) fn explanation(r: &pb::ExplainPolicyResponse) -> String {
    let why = match r.reason.as_str() {
        "deny_rule" | "allow_rule" => format!("policy {:?}, {}", r.policy, r.rule),
        "default_deny" => {
            let names: Vec<String> = r.selected_by.iter().map(|n| format!("{n:?}")).collect();
            let noun = if names.len() == 1 {
                "policy"
            } else {
                "policies"
            };
            format!(
                "default deny (target selected by {noun} {})",
                names.join(", ")
            )
        }
        "not_governed" => "not governed (no policy selects the target)".to_string(),
        other => other.to_string(),
    };
    format!("{}: {why}\n", r.verdict)
}

/// `apply`: what changed; on a dry run, the reachability diff.
pub(crate) fn applied(r: &pb::ApplyPoliciesResponse) -> String {
    let mut out = String::new();
    let verb = if r.dry_run { "would be " } else { "" };
    for (names, what) in [
        (&r.created, "created"),
        (&r.updated, "updated"),
        (&r.unchanged, "unchanged"),
    ] {
        for name in names {
            let verb = if what == "unchanged" { "" } else { verb };
            out.push_str(&format!("policy {name:?} {verb}{what}\n"));
        }
    }
    if !r.dry_run {
        out.push_str(&format!("revision {}\n", r.revision));
        return out;
    }
    out.push_str("dry run: nothing was applied\n");
    if r.changes.is_empty() {
        out.push_str("no reachability change\n");
        return out;
    }
    out.push_str("reachability changes (+ gains access, - loses access):\n");
    for c in &r.changes {
        let sign = if c.gained { '+' } else { '-' };
        out.push_str(&format!(
            "{sign} {} -> {} {}\n",
            c.from,
            c.to,
            port_text(&c.protocol, c.port_first, c.port_last)
        ));
    }
    if r.changes_omitted > 0 {
        out.push_str(&format!("... and {} more\n", r.changes_omitted));
    }
    out
}

/// `tcp/443`, `tcp/8000-8100`, `tcp/all`, or `icmp`.
fn port_text(protocol: &str, first: u32, last: u32) -> String {
    match (protocol, first, last) {
        ("icmp", _, _) => "icmp".to_string(),
        (p, 0, 65535) => format!("{p}/all"),
        (p, f, l) if f == l => format!("{p}/{f}"),
        (p, f, l) => format!("{p}/{f}-{l}"),
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn with_ago(unix: u64, now: u64) -> String {
    if unix == 0 {
        "-".to_string()
    } else {
        format!("{} ({})", utc(unix), ago(unix, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn node_a1() -> pb::Node {
        pb::Node {
            id: "n-1".into(),
            name: "a1".into(),
            site: "a".into(),
            public_key: vec![1; 32],
            endpoint: "198.19.1.11:51820".into(),
            addresses: vec!["100.64.0.1/10".into(), "fd7e::1/64".into()],
            created_unix: NOW - 86_400,
            connected: true,
            applied_revision: 11,
            last_report_unix: NOW - 3,
            apply_error: String::new(),
            peers: vec![
                pb::PeerStatus {
                    public_key: vec![2; 32],
                    last_handshake_unix: NOW - 12,
                    rx_bytes: 2048,
                    tx_bytes: 100,
                    endpoint: "198.19.1.12:51820".into(),
                    probe: None,
                },
                pb::PeerStatus {
                    public_key: vec![3; 32],
                    last_handshake_unix: 0,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    endpoint: String::new(),
                    probe: None,
                },
            ],
            labels: Default::default(),
            tunnel_drops: vec![],
            policy: None,
            workloads: vec![],
            pending: vec![],
            cert_expires_unix: 0,
        }
    }

    #[test]
    fn node_shows_pending_and_withheld_prefixes_with_why() {
        let mut n = node_a1();
        n.workloads = vec![pb::Workload {
            prefix: "198.19.5.0/24".into(),
            labels: Default::default(),
            reason: "prefix 198.19.5.0/24 covers the endpoint 198.19.5.9 of node \"b1\"".into(),
        }];
        n.pending = vec![pb::Workload {
            prefix: "128.0.0.0/1".into(),
            labels: [("app".to_owned(), "x".to_owned())].into(),
            reason: "prefix 128.0.0.0/1 is shorter than the minimum /8".into(),
        }];
        let out = node(&n, &BTreeMap::new(), None, NOW);
        assert!(
            out.contains("Workloads:    198.19.5.0/24 [not routed: prefix 198.19.5.0/24 covers the endpoint 198.19.5.9 of node \"b1\"]"),
            "{out}"
        );
        assert!(
            out.contains("Pending:      128.0.0.0/1 (app=x): prefix 128.0.0.0/1 is shorter than the minimum /8"),
            "{out}"
        );
        let view = serde_json::to_value(crate::view::NodeView::from(&n)).expect("serialises");
        assert_eq!(
            view["pending"]["128.0.0.0/1"]["reason"],
            "prefix 128.0.0.0/1 is shorter than the minimum /8"
        );
        assert_eq!(view["pending"]["128.0.0.0/1"]["labels"]["app"], "x");
        assert!(
            view["withheld"]["198.19.5.0/24"]
                .as_str()
                .is_some_and(|r| r.contains("covers the endpoint"))
        );
    }

    #[test]
    fn explanations_name_the_deciding_rule() {
        let rule = |verdict: &str, reason: &str, rule: &str| pb::ExplainPolicyResponse {
            verdict: verdict.into(),
            reason: reason.into(),
            policy: "web".into(),
            rule: rule.into(),
            selected_by: Vec::new(),
        };
        assert_eq!(
            explanation(&rule("deny", "deny_rule", "deny[0]")),
            "deny: policy \"web\", deny[0]\n"
        );
        assert_eq!(
            explanation(&rule("allow", "allow_rule", "ingress[1]")),
            "allow: policy \"web\", ingress[1]\n"
        );
        let default = pb::ExplainPolicyResponse {
            verdict: "deny".into(),
            reason: "default_deny".into(),
            selected_by: vec!["db".into(), "web".into()],
            ..Default::default()
        };
        assert_eq!(
            explanation(&default),
            "deny: default deny (target selected by policies \"db\", \"web\")\n"
        );
        let open = pb::ExplainPolicyResponse {
            verdict: "allow".into(),
            reason: "not_governed".into(),
            ..Default::default()
        };
        assert_eq!(
            explanation(&open),
            "allow: not governed (no policy selects the target)\n"
        );
    }

    #[test]
    fn dry_run_prints_the_reachability_diff() {
        let change = |gained, protocol: &str, first, last| pb::ReachabilityChange {
            from: "a1".into(),
            to: "b2".into(),
            protocol: protocol.into(),
            port_first: first,
            port_last: last,
            gained,
        };
        let r = pb::ApplyPoliciesResponse {
            revision: 7,
            dry_run: true,
            created: vec!["web".into()],
            updated: Vec::new(),
            unchanged: vec!["db".into()],
            changes: vec![
                change(true, "tcp", 443, 443),
                change(false, "tcp", 8000, 8100),
                change(false, "udp", 0, 65535),
                change(false, "icmp", 0, 65535),
            ],
            changes_omitted: 2,
        };
        let want = "\
policy \"web\" would be created
policy \"db\" unchanged
dry run: nothing was applied
reachability changes (+ gains access, - loses access):
+ a1 -> b2 tcp/443
- a1 -> b2 tcp/8000-8100
- a1 -> b2 udp/all
- a1 -> b2 icmp
... and 2 more
";
        assert_eq!(applied(&r), want);
        let none = pb::ApplyPoliciesResponse {
            dry_run: true,
            unchanged: vec!["db".into()],
            ..Default::default()
        };
        assert!(applied(&none).ends_with("no reachability change\n"));
        let real = pb::ApplyPoliciesResponse {
            revision: 8,
            updated: vec!["web".into()],
            ..Default::default()
        };
        assert_eq!(applied(&real), "policy \"web\" updated\nrevision 8\n");
    }

    #[test]
    fn labels_are_sorted_or_none() {
        let l: std::collections::HashMap<String, String> =
            [("tier".into(), "db".into()), ("app".into(), "x".into())].into();
        assert_eq!(labels(&l), "app=x, tier=db");
        assert_eq!(labels(&Default::default()), "none");
    }

    #[test]
    fn node_list_shows_applied_over_current_revision() {
        let out = nodes(&[node_a1()], 12, NOW);
        let want = "\
NAME   ID    SITE   ADDRESSES                  ENDPOINT            CONNECTED   REVISION   LAST REPORT
a1     n-1   a      100.64.0.1/10,fd7e::1/64   198.19.1.11:51820   yes         11/12      3s ago
";
        assert_eq!(out, want);
    }

    #[test]
    fn node_get_names_peers_and_shows_handshakes() {
        let names = BTreeMap::from([(vec![2; 32], "a2".to_string())]);
        let out = node(&node_a1(), &names, Some(12), NOW);
        assert!(
            out.contains("Revision:     11 applied, 12 current\n"),
            "revision line:\n{out}"
        );
        assert!(
            out.contains("Last report:  3s ago\n"),
            "last report line:\n{out}"
        );
        assert!(out.contains("Peers (2):\n"), "peer count:\n{out}");
        let peer_lines: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("Peers"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .collect();
        assert_eq!(peer_lines.len(), 3, "header and two peers:\n{out}");
        assert!(
            peer_lines[1].starts_with("  a2 ") && peer_lines[1].contains("12s ago"),
            "{}",
            peer_lines[1]
        );
        assert!(
            peer_lines[1].contains("2.0 KiB") && peer_lines[1].contains("100 B"),
            "{}",
            peer_lines[1]
        );
        assert!(
            peer_lines[2].starts_with("  ? ") && peer_lines[2].contains("never"),
            "{}",
            peer_lines[2]
        );
    }

    #[test]
    fn node_get_shows_the_tunnel_drops() {
        let out = node(&node_a1(), &BTreeMap::new(), None, NOW);
        assert!(out.contains("Tunnel drops: none reported\n"), "{out}");
        let n = pb::Node {
            tunnel_drops: vec![pb::VerdictCounter {
                verdict: "not_for_us".into(),
                packets: 4,
                bytes: 2048,
            }],
            ..node_a1()
        };
        let out = node(&n, &BTreeMap::new(), None, NOW);
        let lines: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("Tunnel drops"))
            .collect();
        assert_eq!(lines.len(), 3, "title, header, one reason:\n{out}");
        assert!(
            lines[2].contains("not_for_us")
                && lines[2].contains(" 4 ")
                && lines[2].contains("2.0 KiB"),
            "{out}"
        );
    }

    #[test]
    fn token_list_never_shows_a_secret_and_counts_down() {
        let tok = pb::JoinToken {
            id: "t1".into(),
            site: "a".into(),
            created_unix: NOW - 60,
            expires_unix: NOW + 3540,
            used_by_node: String::new(),
            token: "weft1.topsecret".into(),
            labels: [("role".to_owned(), "db".to_owned())].into(),
            allow_prefixes: vec!["100.100.0.0/16".into()],
        };
        let out = tokens(&[tok], NOW);
        assert!(!out.contains("topsecret"), "secret leaked:\n{out}");
        assert!(out.contains("in 59m"), "expiry:\n{out}");
        assert!(
            out.contains("role=db; allow 100.100.0.0/16"),
            "grants:\n{out}"
        );
    }
}
