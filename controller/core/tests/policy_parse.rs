//! Parsing and validating policy YAML: good files parse, bad ones are
//! refused whole with errors naming file, resource and field.

use weft_controller_core::policy::{
    MAX_INPUT_BYTES, MAX_RULES, PolicyErrors, PortRange, Protocol, parse_documents,
};

fn errors(text: &str) -> Vec<String> {
    match parse_documents("policies.yaml", text) {
        Ok(p) => panic!("expected errors, parsed {p:?}"),
        Err(PolicyErrors(errs)) => errs.iter().map(ToString::to_string).collect(),
    }
}

fn assert_has(errs: &[String], wanted: &str) {
    assert!(
        errs.iter().any(|e| e.contains(wanted)),
        "expected an error containing {wanted:?}, got {errs:#?}"
    );
}

const GOOD: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  target: {matchLabels: {app: web}, sites: [eu-1]}
  ingress:
    - from: {matchLabels: {app: lb}}
      ports:
        - {protocol: TCP, port: 443}
        - {protocol: UDP, portRange: "8000-8100"}
        - {protocol: ICMP}
  deny:
    - from: {sites: [edge]}
---
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata:
  name: db
spec:
  target:
    matchLabels: {app: db}
---
"#;

#[test]
fn a_good_file_parses() {
    let policies = parse_documents("policies.yaml", GOOD).expect("valid policies");
    assert_eq!(policies.len(), 2);
    let web = &policies[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.target.match_labels["app"], "web");
    assert!(web.target.sites.contains("eu-1"));
    let ports = web.ingress[0].ports.as_ref().expect("ports given");
    assert_eq!(ports[0].protocol, Protocol::Tcp);
    assert_eq!(ports[0].ports, PortRange::single(443));
    assert_eq!(
        ports[1].ports,
        PortRange {
            first: 8000,
            last: 8100
        }
    );
    assert_eq!(ports[2].protocol, Protocol::Icmp);
    assert!(
        web.deny[0].ports.is_none(),
        "omitted ports mean all traffic"
    );
    assert!(policies[1].ingress.is_empty() && policies[1].deny.is_empty());
}

#[test]
fn every_error_of_every_document_is_reported_with_file_resource_and_field() {
    let text = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  target: {matchLabels: {app: web}}
  ingress:
    - ports:
        - {protocol: TCP, port: 443}
        - {protocol: TCP, port: 70000}
        - {protocol: SCTP}
    - from: {}
      colour: red
---
apiVersion: weft.dev/v2
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {}
  deny:
    - ports: [{protocol: ICMP, port: 8}]
"#;
    let errs = errors(text);
    for wanted in [
        r#"policies.yaml: NetworkPolicy "web": spec.ingress[0].ports[1].port: 70000 is not a port"#,
        r#"policies.yaml: NetworkPolicy "web": spec.ingress[0].ports[2].protocol: "SCTP" is not a protocol"#,
        r#"policies.yaml: NetworkPolicy "web": spec.ingress[1].from: an empty selector"#,
        r#"policies.yaml: NetworkPolicy "web": spec.ingress[1].colour: unknown field"#,
        r#"policies.yaml: NetworkPolicy "db": apiVersion: "weft.dev/v2" is not supported"#,
        r#"policies.yaml: NetworkPolicy "db": spec.target: an empty target"#,
        r#"policies.yaml: NetworkPolicy "db": spec.deny[0].ports[0].port: ICMP has no ports"#,
    ] {
        assert_has(&errs, wanted);
    }
    assert_eq!(errs.len(), 7, "one error per problem: {errs:#?}");
}

#[test]
fn contradictory_rules_are_refused() {
    // Allowing and denying the same traffic is fine (deny wins); a rule
    // that contradicts itself is not.
    let text = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: api}
spec:
  target: {matchLabels: {app: api}}
  ingress:
    - ports:
        - {protocol: TCP, portRange: "8100-8000"}
        - {protocol: UDP, port: 53, portRange: "53-54"}
        - {protocol: TCP, portRange: "10-x"}
    - from: {matchLabels: {app: lb}, sites: []}
    - ports: []
  deny:
    - ports: [{protocol: TCP, port: 443}]
"#;
    let errs = errors(text);
    assert_has(
        &errs,
        r#"policies.yaml: NetworkPolicy "api": spec.ingress[0].ports[0].portRange: "8100-8000" is reversed (first port above last); did you mean "8000-8100"?"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: NetworkPolicy "api": spec.ingress[0].ports[1].portRange: give port or portRange, not both"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: NetworkPolicy "api": spec.ingress[0].ports[2].portRange: "10-x" is not a port range"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: NetworkPolicy "api": spec.ingress[1].from.sites: an empty list selects no site"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: NetworkPolicy "api": spec.ingress[2].ports: an empty list matches no traffic"#,
    );

    let same_tuple = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: api}
spec:
  target: {matchLabels: {app: api}}
  ingress: [{ports: [{protocol: TCP, port: 443}]}]
  deny: [{ports: [{protocol: TCP, port: 443}]}]
"#;
    parse_documents("policies.yaml", same_tuple).expect("allow and deny of one tuple is valid");
}

#[test]
fn duplicate_names_bad_labels_and_kinds_are_named() {
    let text = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: web}
spec: {target: {matchLabels: {app: web}}}
---
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: web}
spec: {target: {matchLabels: {tier: 1, "-bad": x}}}
---
apiVersion: weft.dev/v1
kind: Deployment
metadata: {name: Web_1}
spec: {target: {sites: [eu-1, eu-1]}}
---
kind: NetworkPolicy
spec: {target: {sites: [eu-1]}}
"#;
    let errs = errors(text);
    assert_has(
        &errs,
        r#"policies.yaml: NetworkPolicy "web": metadata.name: duplicate name: document 1 already defines it"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: NetworkPolicy "web": spec.target.matchLabels.tier: expected a string label value, got the number 1; quote it"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: NetworkPolicy "web": spec.target.matchLabels.-bad: "-bad" is not a label key"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: Deployment "Web_1": kind: "Deployment" is not a policy kind"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: Deployment "Web_1": metadata.name: "Web_1" is not a DNS label"#,
    );
    assert_has(
        &errs,
        r#"policies.yaml: Deployment "Web_1": spec.target.sites[1]: site "eu-1" is listed twice"#,
    );
    assert_has(&errs, "policies.yaml: document 4: apiVersion: missing");
    assert_has(&errs, "policies.yaml: document 4: metadata: missing");
}

#[test]
fn malformed_yaml_is_refused_with_the_file_named() {
    let errs = errors("apiVersion: weft.dev/v1\nkind: [NetworkPolicy\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("policies.yaml: invalid YAML:"),
        "{errs:#?}"
    );

    let errs = errors("apiVersion: a\napiVersion: b\n");
    assert!(
        errs[0].starts_with("policies.yaml: invalid YAML:"),
        "duplicate keys: {errs:#?}"
    );

    let errs = errors("- just\n- a list\n");
    assert_has(
        &errs,
        "policies.yaml: document 1: expected a mapping, got a list",
    );
}

#[test]
fn oversized_files_are_refused_with_the_limit() {
    let big = format!("# {}\n", "x".repeat(MAX_INPUT_BYTES));
    let errs = errors(&big);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("the limit is 1048576 bytes (1 MiB)"),
        "{errs:#?}"
    );

    let mut text = String::from(
        "apiVersion: weft.dev/v1\nkind: NetworkPolicy\nmetadata: {name: many}\nspec:\n  target: {sites: [a]}\n  ingress:\n",
    );
    for _ in 0..=MAX_RULES {
        text.push_str("  - {}\n");
    }
    assert!(text.len() < MAX_INPUT_BYTES);
    let errs = errors(&text);
    assert_has(
        &errs,
        "policies.yaml: file has 10001 rules; the limit is 10000 rules",
    );
}
