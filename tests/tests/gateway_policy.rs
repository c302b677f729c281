//! Through site gateways: a gateway forwards, the destination judges
//! (policy), and workloads behind plain members are reachable.
//!
//! Sites a (a1 gateway, a2 `role=web`) and b (b1 and b2 gateways, b3; all
//! three `role=db`, so the gateways share b3's policy identity). The
//! policy lets `role=web` reach `role=db` on TCP 5432 only.
//!
//! - a2 -> b3 TCP 5432 connects through a1 and a b gateway; TCP 22 is
//!   dropped, and counted on b3, not on the gateways.
//! - b3 opens connections to a2 (ungoverned): their replies come back
//!   through whichever b gateway carries b3, which has no flow state for
//!   them and must not judge them (`forwarded`), else they would be
//!   default-denied there.
//! - The b gateways count the relayed packets as `forwarded` and drop
//!   nothing.
//!
//! `gateway_workloads`: a workload prefix behind a plain member of site b
//! is reached from site a through both sites' gateways (route trace to the
//! workload address, the gateways' TUN counters, TCP and ping).

use std::net::IpAddr;
use std::time::Duration;

use weft_tests::Lab;
use weft_tests::nc::{connects, listen};

const POLICY: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 5432}]
"#;

fn node_json(lab: &Lab, node: &str) -> serde_json::Value {
    let out = lab.weftctl_ok(&["node", "get", node, "-o", "json"]);
    serde_json::from_str(&out).expect("node json")
}

/// Packets a node's policy datapath counted under `verdict`, as reported.
fn verdict(lab: &Lab, node: &str, verdict: &str) -> u64 {
    node_json(lab, node)["policy"]["verdicts"][verdict]["packets"]
        .as_u64()
        .unwrap_or(0)
}

fn drops(lab: &Lab, node: &str) -> u64 {
    verdict(lab, node, "denied") + verdict(lab, node, "default_denied")
}

#[test]
fn gateway_policy() {
    if weft_tests::skip_unless_root("gateway_policy") {
        return;
    }
    let lab = Lab::builder().site_nodes(&[("a", 2), ("b", 3)]).build();
    lab.set_gateway_mode(
        &["a1", "b1", "b2"],
        &[],
        &[("a2", &["a1"])],
        Duration::from_secs(15),
    );
    for n in ["b1", "b2", "b3"] {
        lab.weftctl_ok(&["node", "label", n, "role=db"]);
    }
    lab.weftctl_ok(&["node", "label", "a2", "role=web"]);
    let file = lab.dir().join("policy-db.yaml");
    std::fs::write(&file, POLICY).expect("writing the policy file");
    lab.weftctl_ok(&["apply", "-f", &file.display().to_string()]);

    let (b3_v4, _) = lab.node_addresses("b3");
    let (a2_v4, _) = lab.node_addresses("a2");
    let (b3, a2) = (IpAddr::V4(b3_v4), IpAddr::V4(a2_v4));
    let _b3 = listen(&lab, "b3", &[("-4", 5432), ("-4", 22)]);
    let _a2 = listen(&lab, "a2", &[("-4", 8080)]);
    let probe = Duration::from_secs(2);

    lab.wait_until(
        Duration::from_secs(20),
        "a2 -> b3 TCP 5432 to connect through the gateways",
        || connects(&lab, "a2", b3, 5432, probe),
    );
    let trace = lab.weftctl_ok(&["route", "trace", "a2", "b3"]);
    eprintln!("route trace a2 b3:\n{trace}");
    assert!(
        trace.starts_with("a2 (a) -> a1 (a, gateway) -> b"),
        "a2 -> b3 goes through the gateways:\n{trace}"
    );
    let back = lab.weftctl_ok(&["route", "trace", "b3", "a2"]);
    eprintln!("route trace b3 a2:\n{back}");

    let b3_drops = drops(&lab, "b3");
    assert!(
        !connects(&lab, "a2", b3, 22, probe),
        "a2 -> b3 TCP 22 must be dropped"
    );
    // b3 opens flows to a2 (ungoverned): their replies pass the
    // gateways untouched and b3's own flow state lets them in.
    for i in 0..5 {
        assert!(
            connects(&lab, "b3", a2, 8080, probe),
            "b3 -> a2 TCP 8080, attempt {i}: the replies were dropped"
        );
    }
    lab.wait_until(
        Duration::from_secs(15),
        "b3 to report the TCP 22 drop and the gateways their forwarded packets",
        || {
            drops(&lab, "b3") > b3_drops
                && verdict(&lab, "b1", "forwarded") + verdict(&lab, "b2", "forwarded") > 0
        },
    );
    for g in ["b1", "b2"] {
        let (fwd, dropped) = (verdict(&lab, g, "forwarded"), drops(&lab, g));
        eprintln!("{g}: forwarded {fwd} packets, dropped {dropped}");
        assert_eq!(dropped, 0, "gateway {g} must not judge what it forwards");
    }
    assert_eq!(drops(&lab, "a1"), 0, "a1 governs nothing and drops nothing");
}

/// Workload prefixes behind a plain member, reached through both sites'
/// gateways: a2 -> a1 -> b1 -> b2 -> the workload, and back.
#[test]
fn gateway_workloads() {
    if weft_tests::skip_unless_root("gateway_workloads") {
        return;
    }
    let mut lab = Lab::builder()
        .site_nodes(&[("a", 2), ("b", 2)])
        .ipv4_pool("100.64.0.0/16")
        .build();
    lab.set_gateway_mode(
        &["a1", "b1"],
        &[],
        &[("a2", &["a1"])],
        Duration::from_secs(15),
    );
    let wl = lab.add_workload("b2", "pg", &[("100.100.2.1/24", "100.100.2.10/24")]);
    let _listener = listen(&lab, &wl, &[("-4", 5432)]);
    lab.weftctl_ok(&["node", "advertise", "b2", "100.100.2.0/24"]);
    let workload: IpAddr = "100.100.2.10".parse().expect("valid");
    lab.wait_until(
        Duration::from_secs(20),
        "a2 -> the workload behind b2 (TCP 5432) through the gateways",
        || connects(&lab, "a2", workload, 5432, Duration::from_secs(2)),
    );
    let trace = lab.weftctl_ok(&["route", "trace", "a2", "100.100.2.10"]);
    eprintln!("route trace a2 100.100.2.10:\n{trace}");
    assert!(
        trace.starts_with("a2 (a) -> a1 (a, gateway) -> b1 (b, gateway) -> b2 (b)"),
        "the workload is reached through both gateways:\n{trace}"
    );
    let count = |node: &str| lab.tun_packets(node).0;
    let (a1_before, b1_before) = (count("a1"), count("b1"));
    let r = lab.ping("a2", workload, 10);
    assert_eq!(r.received, 10, "a2 -> workload: {r:?}");
    let (a1_rx, b1_rx) = (count("a1") - a1_before, count("b1") - b1_before);
    eprintln!("10 pings a2 -> workload: a1 TUN rx +{a1_rx}, b1 TUN rx +{b1_rx}");
    assert!(
        a1_rx >= 20 && b1_rx >= 20,
        "both gateways forward the requests and the replies: a1 rx +{a1_rx}, b1 rx +{b1_rx}"
    );
}
