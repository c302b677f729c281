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
    let mut t = Table::new(&["ID", "SITE", "CREATED", "EXPIRES", "USED BY"]);
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
        ("Created", with_ago(n.created_unix, now)),
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
        return out;
    }
    let mut t = Table::new(&[
        "PEER",
        "PUBLIC KEY",
        "ENDPOINT",
        "LATEST HANDSHAKE",
        "RX",
        "TX",
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
        ]);
    }
    for line in t.render().lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
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
        ("Created", with_ago(p.created_unix, now)),
    ])
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
                },
                pb::PeerStatus {
                    public_key: vec![3; 32],
                    last_handshake_unix: 0,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    endpoint: String::new(),
                },
            ],
        }
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
    fn token_list_never_shows_a_secret_and_counts_down() {
        let tok = pb::JoinToken {
            id: "t1".into(),
            site: "a".into(),
            created_unix: NOW - 60,
            expires_unix: NOW + 3540,
            used_by_node: String::new(),
            token: "weft1.topsecret".into(),
        };
        let out = tokens(&[tok], NOW);
        assert!(!out.contains("topsecret"), "secret leaked:\n{out}");
        assert!(out.contains("in 59m"), "expiry:\n{out}");
    }
}
