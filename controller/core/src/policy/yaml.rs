//! Policies back to the YAML [`crate::policy::parse_documents`] reads.
//!
//! The state keeps parsed policies; `get policy -o yaml` and the store's
//! re-validation need text. The output is canonical (fixed key order, every
//! string quoted, so a name like `"123"` stays a string) and parses back to
//! the same [`Policy`] (tested below and on every state load).

use std::fmt::Write as _;

use crate::policy::Policy;
use crate::policy::model::{PortRange, PortRule, Protocol, Rule, Selector};
use crate::policy::parse::{API_VERSION, KIND};

/// The policy as one YAML document (no `---`).
pub fn to_yaml(policy: &Policy) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata:\n  name: {}\nspec:\n  target:\n",
        quote(&policy.name)
    );
    selector(&mut out, &policy.target, 4);
    for (key, rules) in [("ingress", &policy.ingress), ("deny", &policy.deny)] {
        if rules.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  {key}:");
        for r in rules {
            rule(&mut out, r);
        }
    }
    out
}

fn rule(out: &mut String, rule: &Rule) {
    if rule.from.is_none() && rule.ports.is_none() {
        out.push_str("    - {}\n");
        return;
    }
    // The first key goes on the list item's line.
    let mut lead = "    - ";
    if let Some(from) = &rule.from {
        let _ = writeln!(out, "{lead}from:");
        selector(out, from, 8);
        lead = "      ";
    }
    if let Some(ports) = &rule.ports {
        let _ = writeln!(out, "{lead}ports:");
        for p in ports {
            let _ = writeln!(out, "        - {}", port_rule(p));
        }
    }
}

fn port_rule(p: &PortRule) -> String {
    let protocol = match p.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Icmp => "ICMP",
    };
    match p.ports {
        _ if !p.protocol.has_ports() || p.ports == PortRange::ALL => {
            format!("{{protocol: {protocol}}}")
        }
        PortRange { first, last } if first == last => {
            format!("{{protocol: {protocol}, port: {first}}}")
        }
        PortRange { first, last } => {
            format!("{{protocol: {protocol}, portRange: \"{first}-{last}\"}}")
        }
    }
}

fn selector(out: &mut String, sel: &Selector, indent: usize) {
    let pad = " ".repeat(indent);
    if !sel.match_labels.is_empty() {
        let _ = writeln!(out, "{pad}matchLabels:");
        for (k, v) in &sel.match_labels {
            let _ = writeln!(out, "{pad}  {}: {}", quote(k), quote(v));
        }
    }
    if !sel.sites.is_empty() {
        let sites: Vec<String> = sel.sites.iter().map(|s| quote(s)).collect();
        let _ = writeln!(out, "{pad}sites: [{}]", sites.join(", "));
    }
}

/// A YAML double-quoted scalar. Valid names and labels are printable ASCII
/// without quotes or backslashes, for which Rust's escaping is YAML's; a
/// string that is not (a damaged store) fails to parse back, as it should.
fn quote(s: &str) -> String {
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_documents;

    const TEXT: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: "123"}
spec:
  target: {matchLabels: {app: web, "x.io/tier": "1"}, sites: [eu-1, "0"]}
  ingress:
    - from: {matchLabels: {app: lb}}
      ports:
        - {protocol: TCP, port: 443}
        - {protocol: UDP, portRange: "8000-8100"}
        - {protocol: ICMP}
        - {protocol: TCP}
    - ports: [{protocol: UDP, port: 53}]
    - {}
  deny:
    - from: {sites: [edge]}
"#;

    #[test]
    fn yaml_parses_back_to_the_same_policy() {
        let policies = parse_documents("in.yaml", TEXT).expect("valid policy");
        for p in &policies {
            let text = to_yaml(p);
            let back = parse_documents("out.yaml", &text)
                .unwrap_or_else(|e| panic!("to_yaml output must parse: {e}\n{text}"));
            assert_eq!(
                back,
                vec![p.clone()],
                "round trip changed the policy:\n{text}"
            );
        }
    }

    #[test]
    fn yaml_is_readable() {
        let policies = parse_documents("in.yaml", TEXT).expect("valid policy");
        let text = to_yaml(&policies[0]);
        assert!(
            text.starts_with("apiVersion: weft.dev/v1\nkind: NetworkPolicy\n"),
            "{text}"
        );
        assert!(
            text.contains("        - {protocol: TCP, port: 443}\n"),
            "{text}"
        );
        assert!(text.contains("    - {}\n"), "{text}");
    }
}
