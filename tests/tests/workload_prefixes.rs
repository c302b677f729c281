//! Workload prefixes end to end (issue 4 point 2, issue 3 point 1): node b1
//! routes for a "workload" (a namespace behind a veth in b1's namespace,
//! 100.100.2.10 in 100.100.2.0/24 and fd00:beef:2::10 in fd00:beef:2::/64,
//! outside the network's 100.64.0.0/16 pool and ULA /48).
//!
//! - The IPv4 prefix is advertised with `weftctl node advertise`, the IPv6
//!   one with `weft-agent --advertise` (b1's agent restarted with it):
//!   inside the prefix b1's join token allows, but with a workload label
//!   (`app=pg`) the token does not grant b1, so it waits, pending, until
//!   the operator approves it with that label.
//! - a1 gets both routes in Weft's table 51820 (marked `proto 87`) and one
//!   rule per family; its main table is untouched.
//! - a1 and c1 reach the workload (ping, TCP, IPv4 and IPv6) and the
//!   workload reaches them.
//! - An overlapping advertisement from c1 is refused, naming b1's prefix,
//!   and changes nothing.
//! - A policy selecting the workload by its label `app=pg` lets only
//!   `role=web` nodes (a1) in on TCP 5432: c1 is dropped, and b1 counts it.
//! - Withdrawing the prefixes removes the routes and rules on a1.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use weft_tests::nc::{connects, connects_from, listen};
use weft_tests::{Lab, Signal};

const WL_V4: &str = "100.100.2.10";
const WL_V6: &str = "fd00:beef:2::10";
const PREFIX_V4: &str = "100.100.2.0/24";
const PREFIX_V6: &str = "fd00:beef:2::/64";
const TABLE: &str = "51820";

const POLICY: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: pg}
spec:
  target: {matchLabels: {app: pg}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 5432}]
"#;

fn stdout(lab: &Lab, ns: &str, script: &str) -> String {
    let out = lab.sh(ns, script);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Weft's routes and rules on a node: `ip route show table 51820` (both
/// families) and the rules looking it up.
fn weft_routes(lab: &Lab, node: &str) -> (String, String) {
    let routes = stdout(
        lab,
        node,
        &format!("ip route show table {TABLE}; ip -6 route show table {TABLE}"),
    );
    let rules = stdout(
        lab,
        node,
        &format!("ip rule show | grep 'lookup {TABLE}'; ip -6 rule show | grep 'lookup {TABLE}'"),
    );
    (routes, rules)
}

/// Routes of the main table, as a baseline that must not change.
fn main_routes(lab: &Lab, node: &str) -> String {
    stdout(
        lab,
        node,
        "ip route show table main; ip -6 route show table main",
    )
}

fn node_json(lab: &Lab, node: &str) -> serde_json::Value {
    let out = lab.weftctl_ok(&["node", "get", node, "-o", "json"]);
    serde_json::from_str(&out).expect("node json")
}

/// Packets b1's policy dropped (denied + default-denied), as reported.
fn drops(lab: &Lab, node: &str) -> u64 {
    let v = node_json(lab, node);
    ["denied", "default_denied"]
        .iter()
        .map(|k| v["policy"]["verdicts"][k]["packets"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn workload_prefixes() {
    if weft_tests::skip_unless_root("workload_prefixes") {
        return;
    }
    let mut lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(1)
        .ipv4_pool("100.64.0.0/16")
        .token_grants("b1", &[], &[PREFIX_V6])
        .build();
    let (a1_v4, a1_v6) = lab.node_addresses("a1");
    let (c1_v4, _) = lab.node_addresses("c1");
    assert!(
        a1_v4.octets()[..2] == [100, 64],
        "the controller must use the chosen pool 100.64.0.0/16, a1 has {a1_v4}"
    );
    let wl4: IpAddr = WL_V4.parse().expect("valid");
    let wl6: IpAddr = WL_V6.parse().expect("valid");
    let main_before = main_routes(&lab, "a1");

    let wl = lab.add_workload(
        "b1",
        "pg",
        &[
            ("100.100.2.1/24", "100.100.2.10/24"),
            ("fd00:beef:2::1/64", "fd00:beef:2::10/64"),
        ],
    );
    let _workload_listeners = listen(&lab, &wl, &[("-4", 5432), ("-6", 5432)]);
    let _a1_listener = listen(&lab, "a1", &[("-4", 7000)]);

    // IPv4 by weftctl, IPv6 by the agent's flag.
    let out = lab.weftctl_ok(&["node", "advertise", "b1", PREFIX_V4, "--label", "app=pg"]);
    assert!(out.contains(PREFIX_V4), "advertise output: {out}");
    // b1 also governs its workload interface, so its own traffic to the
    // workload meets the policy.
    lab.set_agent_extra_args(
        "b1",
        &[
            "--advertise",
            &format!("{PREFIX_V6}:app=pg"),
            "--workload-interface",
            "w-pg",
        ],
    );
    lab.kill_agent("b1", Signal::SIGTERM);
    lab.start_agent("b1");
    lab.wait_until(
        Duration::from_secs(20),
        "b1's agent to ask for the IPv6 prefix (pending: its label is not granted)",
        || {
            node_json(&lab, "b1")["pending"][PREFIX_V6]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("label app=pg is not granted to node \"b1\""))
        },
    );
    let (routes, _) = weft_routes(&lab, "a1");
    assert!(
        !routes.contains("fd00:beef:2::"),
        "a pending prefix must not be routed:\n{routes}"
    );
    lab.weftctl_ok(&["node", "advertise", "b1", PREFIX_V6, "--label", "app=pg"]);
    lab.wait_until(
        Duration::from_secs(20),
        "b1's agent to advertise the IPv6 prefix",
        || {
            node_json(&lab, "b1")["workloads"]
                .get(PREFIX_V6)
                .is_some_and(|l| l["app"] == "pg")
        },
    );
    let shown = lab.weftctl_ok(&["node", "get", "b1"]);
    assert!(
        shown.contains("100.100.2.0/24 (app=pg)") && shown.contains("fd00:beef:2::/64 (app=pg)"),
        "`weftctl node get b1` must show the workloads:\n{shown}"
    );

    // Routes in Weft's table with their rules on a1 (and c1).
    for node in ["a1", "c1"] {
        lab.wait_until(
            Duration::from_secs(20),
            &format!("{node} to route both workload prefixes in table {TABLE}"),
            || {
                let (routes, rules) = weft_routes(&lab, node);
                routes.contains(PREFIX_V4)
                    && routes.contains(PREFIX_V6)
                    && rules.lines().filter(|l| l.contains("5182:")).count() == 2
            },
        );
    }
    let (routes, rules) = weft_routes(&lab, "a1");
    eprintln!("a1 table {TABLE}:\n{routes}a1 rules:\n{rules}");
    assert!(
        routes.lines().all(|l| l.contains("proto 87")),
        "every route in Weft's table is marked as Weft's:\n{routes}"
    );
    assert!(
        !weft_routes(&lab, "b1").0.contains("100.100.2.0"),
        "b1 must not route its own prefix into the tunnel"
    );
    assert_eq!(
        main_routes(&lab, "a1"),
        main_before,
        "a1's main table must not change"
    );
    assert!(
        !main_routes(&lab, "a1").contains("default"),
        "no default route in a node namespace"
    );
    assert!(
        stdout(&lab, "b1", "cat /proc/sys/net/ipv4/ip_forward").trim() == "1"
            && stdout(&lab, "b1", "cat /proc/sys/net/ipv6/conf/all/forwarding").trim() == "1",
        "b1 forwards for its workload"
    );

    // Reachability both ways, IPv4 and IPv6, ping and TCP.
    for node in ["a1", "c1"] {
        for to in [wl4, wl6] {
            lab.wait_until(
                Duration::from_secs(20),
                &format!("{node} to ping the workload at {to}"),
                || lab.ping_once(node, to, 500),
            );
            assert!(
                connects(&lab, node, to, 5432, Duration::from_secs(3)),
                "{node} -> workload {to} TCP 5432 must connect"
            );
        }
    }
    for to in [IpAddr::V4(a1_v4), IpAddr::V6(a1_v6), IpAddr::V4(c1_v4)] {
        assert!(
            lab.ping_once(&wl, to, 2000),
            "the workload must reach {to} through b1"
        );
    }
    assert!(
        connects(&lab, &wl, IpAddr::V4(a1_v4), 7000, Duration::from_secs(3)),
        "workload -> a1 TCP 7000 must connect"
    );

    // An overlapping advertisement is refused and changes nothing.
    let before = node_json(&lab, "c1");
    let revision_before = node_json(&lab, "a1")["applied_revision"].clone();
    let out = lab.weftctl(&["node", "advertise", "c1", "100.100.2.128/25"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an overlapping prefix must be refused"
    );
    assert!(
        err.contains("100.100.2.128/25 overlaps 100.100.2.0/24, already advertised by node \"b1\""),
        "the error must name the prefix and its holder: {err}"
    );
    assert_eq!(node_json(&lab, "c1")["workloads"], before["workloads"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        node_json(&lab, "a1")["applied_revision"],
        revision_before,
        "a refused advertisement must not produce a new revision"
    );
    assert!(
        !weft_routes(&lab, "a1").0.contains("100.100.2.128"),
        "a refused prefix must not be routed"
    );

    // Policy selecting the workload by its own label: only role=web on 5432.
    lab.weftctl_ok(&["node", "label", "a1", "role=web"]);
    let file = lab.dir().join("policy-pg.yaml");
    std::fs::write(&file, POLICY).expect("writing the policy file");
    lab.weftctl_ok(&["apply", "-f", &file.display().to_string()]);
    lab.wait_until(
        Duration::from_secs(10),
        "c1 -> workload TCP 5432 to be dropped by the policy",
        || !connects(&lab, "c1", wl4, 5432, Duration::from_millis(500)),
    );
    let drops_before = drops(&lab, "b1");
    for to in [wl4, wl6] {
        assert!(
            connects(&lab, "a1", to, 5432, Duration::from_secs(3)),
            "a1 (role=web) -> workload {to} TCP 5432 must connect under the policy"
        );
        assert!(
            !connects(&lab, "c1", to, 5432, Duration::from_secs(1)),
            "c1 (unlabelled) -> workload {to} TCP 5432 must be dropped"
        );
        assert!(
            !lab.ping_once("a1", to, 500),
            "ICMP to the workload is not allowed by the policy ({to})"
        );
    }
    let mut counted = drops_before;
    let dropped =
        weft_tests::try_wait_until(Duration::from_secs(5), "b1 to report the drops", || {
            counted = drops(&lab, "b1");
            counted > drops_before
        });
    assert!(
        dropped.is_ok(),
        "b1 must count the dropped packets (before {drops_before}, now {counted})"
    );
    let rules: BTreeMap<String, u64> = node_json(&lab, "b1")["policy"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["rule"].as_str().unwrap_or_default().to_owned(),
                r["packets"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        rules.get("pg/ingress[0]").copied().unwrap_or(0) > 0,
        "b1 counts the allowed packets under pg/ingress[0]: {rules:?}"
    );
    // Traffic from b1 itself to its workload is judged on the workload
    // interface: dropped while b1 is not role=web, allowed once it is.
    let (b1_v4, _) = lab.node_addresses("b1");
    let b1_src = IpAddr::V4(b1_v4);
    assert!(
        !connects_from(&lab, "b1", b1_src, wl4, 5432),
        "b1 (not role=web) -> its workload TCP 5432 must be dropped on w-pg"
    );
    lab.weftctl_ok(&["node", "label", "b1", "role=web"]);
    lab.wait_until(
        Duration::from_secs(10),
        "b1 (now role=web) -> its workload TCP 5432 to connect",
        || connects_from(&lab, "b1", b1_src, wl4, 5432),
    );
    lab.weftctl_ok(&["node", "label", "b1", "role-"]);
    lab.wait_until(
        Duration::from_secs(10),
        "b1 (role removed) -> its workload TCP 5432 to be dropped again",
        || !connects_from(&lab, "b1", b1_src, wl4, 5432),
    );
    // Nodes themselves stay open: the node's labels did not leak onto it.
    assert!(
        lab.ping_once("c1", IpAddr::V4(b1_v4), 2000),
        "b1 itself is not governed by the workload's policy"
    );

    // Withdrawing removes the routes and rules.
    lab.weftctl_ok(&["node", "withdraw", "b1", PREFIX_V4]);
    lab.weftctl_ok(&["node", "withdraw", "b1", PREFIX_V6]);
    for node in ["a1", "c1"] {
        lab.wait_until(
            Duration::from_secs(10),
            &format!("{node}'s routes and rules to the workload to be removed"),
            || {
                let (routes, rules) = weft_routes(&lab, node);
                routes.trim().is_empty() && rules.trim().is_empty()
            },
        );
    }
    assert!(
        !lab.ping_once("a1", wl4, 500),
        "a withdrawn workload is not reachable"
    );
    assert_eq!(
        main_routes(&lab, "a1"),
        main_before,
        "a1's main table must not change"
    );
}
