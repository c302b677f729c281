//! The trust model end to end (issue 11, tests 7a and 7b): a node is
//! believed only for what the operator granted it.
//!
//! `hijack_prefixes_stay_pending`: b1's join token allows 128.0.0.0/1 (an
//! operator's too-wide grant, which also holds the controller's address);
//! its agent advertises `128.0.0.0/1` and the controller's /32. Both stay
//! pending, with the reason, in `weftctl node get b1`; no other node's
//! routes change (a1's and c1's `ip route show table all`, both families,
//! before and after, synchronised by a legitimate prefix approved
//! afterwards), every
//! node still pings every other over IPv4 and IPv6 and stays connected to
//! the controller; an operator's `weftctl node advertise` of either prefix
//! (or of one covering a1's endpoint) is refused with an error naming the
//! prefix and what it covers. Meanwhile c1's agent advertises a prefix
//! inside its token's allowed prefixes: approved at once and routed by
//! the others (so the route checks can see a change when there is one).
//!
//! `self_assigned_labels_gain_nothing`: a node enrolling with `--label
//! role=web` on a token that grants nothing, or that grants `role=db`, is
//! refused with a message naming the label and the token, and is not
//! listed; with a policy letting only `role=web` reach b1 (`role=db`,
//! granted by its token) on TCP 5432 and ICMP, a1 (granted `role=web`,
//! restated by its agent's `--label`) connects while a2 (enrolled without
//! that grant) is dropped, and b1 counts the drops.

use std::net::IpAddr;
use std::time::Duration;

use weft_tests::nc::{connects, listen};
use weft_tests::{Lab, Signal};

/// Where the lab's agents reach the controller.
const CONTROLLER: &str = "198.18.100.2";
const WIDE: &str = "128.0.0.0/1";
const CONTROLLER_32: &str = "198.18.100.2/32";
/// Inside c1's allowed prefixes: approved without an operator.
const C1_PREFIX: &str = "100.100.9.0/24";
/// Approved by the operator on b1 after the bad prefixes (a sync point).
const B1_LEGIT: &str = "100.100.7.0/24";

fn stdout(lab: &Lab, ns: &str, script: &str) -> String {
    String::from_utf8_lossy(&lab.sh(ns, script).stdout).into_owned()
}

/// Every route of a node, both families, all tables.
fn all_routes(lab: &Lab, node: &str) -> String {
    stdout(
        lab,
        node,
        "ip route show table all; ip -6 route show table all",
    )
}

/// Weft's table on a node, both families.
fn weft_table(lab: &Lab, node: &str) -> String {
    stdout(
        lab,
        node,
        "ip route show table 51820; ip -6 route show table 51820",
    )
}

fn node_json(lab: &Lab, node: &str) -> serde_json::Value {
    let out = lab.weftctl_ok(&["-o", "json", "node", "get", node]);
    serde_json::from_str(&out).expect("`weftctl -o json node get` prints JSON")
}

/// `weftctl args...` must fail; returns its stderr.
fn refused(lab: &Lab, args: &[&str]) -> String {
    let out = lab.weftctl(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "`weftctl {}` must be refused; stdout: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// Every node pings every other node's overlay addresses (IPv4 and IPv6).
fn assert_full_reachability(lab: &Lab, nodes: &[&str]) {
    let addrs: Vec<(String, [IpAddr; 2])> = nodes
        .iter()
        .map(|n| {
            let (v4, v6) = lab.node_addresses(n);
            ((*n).to_owned(), [IpAddr::V4(v4), IpAddr::V6(v6)])
        })
        .collect();
    for from in nodes {
        for (to, ips) in &addrs {
            if to == from {
                continue;
            }
            for ip in ips {
                lab.wait_until(
                    Duration::from_secs(20),
                    &format!("{from} to ping {to} at {ip}"),
                    || lab.ping_once(from, *ip, 1000),
                );
            }
        }
    }
}

#[test]
fn hijack_prefixes_stay_pending() {
    if weft_tests::skip_unless_root("trust hijack_prefixes_stay_pending") {
        return;
    }
    let nodes = ["a1", "b1", "c1"];
    let mut lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(1)
        .ipv4_pool("100.64.0.0/16")
        .token_grants("b1", &[], &[WIDE])
        .token_grants("c1", &[], &["100.100.0.0/16"])
        .build();

    // c1's agent asks for a prefix its token allows: approved at once.
    lab.set_agent_extra_args("c1", &["--advertise", C1_PREFIX]);
    lab.kill_agent("c1", Signal::SIGTERM);
    lab.start_agent("c1");
    for node in ["a1", "b1"] {
        lab.wait_until(
            Duration::from_secs(20),
            &format!("{node} to route c1's allowed prefix {C1_PREFIX} in table 51820"),
            || weft_table(&lab, node).contains(C1_PREFIX),
        );
    }
    assert!(
        node_json(&lab, "c1")["pending"].is_null(),
        "nothing of c1's is pending: {}",
        node_json(&lab, "c1")
    );
    assert_full_reachability(&lab, &nodes);
    // b1 restarts below; the others' routes must not move.
    let others = ["a1", "c1"];
    let before: Vec<String> = others.iter().map(|n| all_routes(&lab, n)).collect();

    // b1's agent asks for everything from 128.0.0.0 up and the controller.
    lab.set_agent_extra_args("b1", &["--advertise", WIDE, "--advertise", CONTROLLER_32]);
    lab.kill_agent("b1", Signal::SIGTERM);
    lab.start_agent("b1");
    lab.wait_until(
        Duration::from_secs(20),
        "b1's two prefixes to be pending",
        || {
            let pending = &node_json(&lab, "b1")["pending"];
            !pending[WIDE].is_null() && !pending[CONTROLLER_32].is_null()
        },
    );
    let b1 = node_json(&lab, "b1");
    assert_eq!(
        b1["pending"][WIDE]["reason"],
        "prefix 128.0.0.0/1 is shorter than the minimum /8 for IPv4 workload prefixes (weft-controller --min-prefix-len-v4)",
        "{b1}"
    );
    assert_eq!(
        b1["pending"][CONTROLLER_32]["reason"],
        format!(
            "prefix {CONTROLLER_32} covers the controller address {CONTROLLER}: routing it through the overlay would capture that traffic"
        ),
        "{b1}"
    );
    assert!(b1["workloads"].is_null(), "nothing approved: {b1}");
    let shown = lab.weftctl_ok(&["node", "get", "b1"]);
    assert!(
        shown.contains("Pending:")
            && shown.contains("128.0.0.0/1: prefix 128.0.0.0/1 is shorter than the minimum /8")
            && shown.contains(&format!(
                "{CONTROLLER_32}: prefix {CONTROLLER_32} covers the controller address {CONTROLLER}"
            )),
        "`weftctl node get b1` must show the pending prefixes and why:\n{shown}"
    );

    // The operator cannot approve them either, nor a prefix covering a1's
    // endpoint; each refusal names the prefix and what it covers.
    let err = refused(&lab, &["node", "advertise", "b1", WIDE]);
    assert!(
        err.contains(
            "prefix 128.0.0.0/1 is shorter than the minimum /8 for IPv4 workload prefixes"
        ),
        "{err}"
    );
    let err = refused(&lab, &["node", "advertise", "b1", CONTROLLER_32]);
    assert!(
        err.contains(&format!(
            "prefix {CONTROLLER_32} covers the controller address {CONTROLLER}"
        )),
        "{err}"
    );
    let a1_endpoint = lab.node("a1").underlay;
    let err = refused(&lab, &["node", "advertise", "b1", "198.19.0.0/16"]);
    assert!(
        err.contains(&format!(
            "prefix 198.19.0.0/16 covers the endpoint {a1_endpoint} of node \"a1\""
        )),
        "{err}"
    );

    // Sync: a legitimate prefix approved after all that reaches a1 and c1;
    // by then any route from the bad ones would have reached them too.
    lab.weftctl_ok(&["node", "advertise", "b1", B1_LEGIT]);
    for node in ["a1", "c1"] {
        lab.wait_until(
            Duration::from_secs(20),
            &format!("{node} to route b1's approved prefix {B1_LEGIT}"),
            || weft_table(&lab, node).contains(B1_LEGIT),
        );
    }
    for (node, before) in others.iter().zip(&before) {
        let after: String = all_routes(&lab, node)
            .lines()
            .filter(|l| !l.contains(B1_LEGIT))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            &after, before,
            "{node}'s routes changed beyond b1's approved prefix"
        );
        assert!(
            !after.contains("128.0.0.0/1") && !after.contains(CONTROLLER_32),
            "{node} routes a pending prefix:\n{after}"
        );
    }

    assert_full_reachability(&lab, &nodes);
    lab.wait_until(
        Duration::from_secs(20),
        "every node to be connected to the controller",
        || lab.nodes().iter().all(|n| n.connected),
    );
    let b1 = node_json(&lab, "b1");
    assert!(
        !b1["pending"][WIDE].is_null() && !b1["pending"][CONTROLLER_32].is_null(),
        "still pending after the refused approvals: {b1}"
    );
}

const POLICY: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 5432}]
    - from: {matchLabels: {role: web}}
      ports: [{protocol: ICMP}]
"#;

/// Packets a node's policy dropped (denied + default-denied), as reported.
fn drops(lab: &Lab, node: &str) -> u64 {
    let v = node_json(lab, node);
    ["denied", "default_denied"]
        .iter()
        .map(|k| v["policy"]["verdicts"][k]["packets"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn self_assigned_labels_gain_nothing() {
    if weft_tests::skip_unless_root("trust self_assigned_labels_gain_nothing") {
        return;
    }
    let mut lab = Lab::builder()
        .site_nodes(&[("a", 2), ("b", 1)])
        .token_grants("a1", &["role=web"], &[])
        .token_grants("b1", &["role=db"], &[])
        .start_agents(false)
        .build();
    // a1 restates its grant; a2 asks for nothing (it has no grant).
    lab.set_agent_extra_args("a1", &["--label", "role=web"]);
    for node in ["a1", "a2", "b1"] {
        lab.start_agent(node);
    }
    lab.wait_mesh(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let labels = |lab: &Lab, node: &str| node_json(lab, node)["labels"].clone();
    assert_eq!(labels(&lab, "a1"), serde_json::json!({"role": "web"}));
    assert_eq!(labels(&lab, "b1"), serde_json::json!({"role": "db"}));
    assert_eq!(labels(&lab, "a2"), serde_json::json!({}));

    // Enrolling with a self-assigned role=web is refused, naming the
    // label, the token and what it grants.
    let a2_underlay = lab.node("a2").underlay;
    for (grant, grants_shown) in [(None, "none"), (Some("role=db"), "role=db")] {
        let extra: Vec<&str> = grant.iter().flat_map(|g| ["--label", *g]).collect();
        let token = lab.create_token_with("a", "10m", &extra);
        let id = token.split('.').nth(1).expect("weft1.<id>.<secret>.<pin>");
        let state_dir = lab
            .dir()
            .join("agents")
            .join(format!("rogue-{grants_shown}"));
        let mut args = lab.agent_args("rogue", a2_underlay, &state_dir, Some(&token));
        args.extend(["--label".to_owned(), "role=web".to_owned()]);
        let (status, stderr, _) = lab.run_agent_once("rogue", "a2", &args, Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| !s.success()),
            "an agent asking for an ungranted label must exit with an error ({status:?}):\n{stderr}"
        );
        let expected = format!(
            "the controller refused to enrol this node: label role=web is not granted by join token {id} (it grants: {grants_shown})"
        );
        assert!(
            weft_tests::process::strip_ansi(&stderr).contains(&expected),
            "the agent must print why: {expected:?}\n{stderr}"
        );
        assert!(
            lab.nodes().iter().all(|n| n.name != "rogue"),
            "a refused node must not be listed"
        );
    }

    // Only role=web reaches b1 (role=db): a1 does, a2 is dropped.
    let (b1_v4, b1_v6) = lab.node_addresses("b1");
    let (b1, b1_6) = (IpAddr::V4(b1_v4), IpAddr::V6(b1_v6));
    let _listeners = listen(&lab, "b1", &[("-4", 5432), ("-6", 5432)]);
    for from in ["a1", "a2"] {
        lab.wait_until(
            Duration::from_secs(20),
            &format!("{from} -> b1 TCP 5432 to connect before any policy"),
            || connects(&lab, from, b1, 5432, Duration::from_millis(500)),
        );
    }
    let file = lab.dir().join("policy-db.yaml");
    std::fs::write(&file, POLICY).expect("writing the policy file");
    lab.weftctl_ok(&["apply", "-f", &file.display().to_string()]);
    lab.wait_until(
        Duration::from_secs(10),
        "a2 -> b1 TCP 5432 to be dropped by the policy",
        || !connects(&lab, "a2", b1, 5432, Duration::from_millis(500)),
    );
    let drops_before = drops(&lab, "b1");
    for to in [b1, b1_6] {
        assert!(
            connects(&lab, "a1", to, 5432, Duration::from_secs(3)),
            "a1 (granted role=web) -> b1 {to} TCP 5432 must connect"
        );
        assert!(
            lab.ping_once("a1", to, 2000),
            "a1 (granted role=web) -> b1 {to} ICMP must pass"
        );
        assert!(
            !connects(&lab, "a2", to, 5432, Duration::from_secs(1)),
            "a2 (no grant) -> b1 {to} TCP 5432 must be dropped"
        );
        assert!(
            !lab.ping_once("a2", to, 1000),
            "a2 (no grant) -> b1 {to} ICMP must be dropped"
        );
    }
    let mut counted = drops_before;
    let dropped =
        weft_tests::try_wait_until(Duration::from_secs(10), "b1 to report the drops", || {
            counted = drops(&lab, "b1");
            counted > drops_before
        });
    assert!(
        dropped.is_ok(),
        "b1 must count a2's dropped packets (before {drops_before}, now {counted})"
    );
    assert_eq!(
        labels(&lab, "a2"),
        serde_json::json!({}),
        "a2 gained no label"
    );
}
