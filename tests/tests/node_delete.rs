//! `weftctl node delete b2`: within 2 s every other node drops b2's key,
//! and b2's packets are no longer accepted (b2 cannot ping a1). The change
//! disturbs no other peer: a1 keeps its session with c1 (same handshake)
//! and a1 → c1 pings running across the delete lose nothing.

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_tests::{Lab, PingResult};

const BUDGET: Duration = Duration::from_secs(2);

#[test]
fn node_delete() {
    if weft_tests::skip_unless_root("node_delete") {
        return;
    }
    let lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(2)
        .build();
    let b2_key = lab.node_info("b2").public_key;
    let (a1_v4, _) = lab.node_addresses("a1");
    let a1 = IpAddr::V4(a1_v4);
    lab.wait_until(
        Duration::from_secs(20),
        "b2 to ping a1 before the delete",
        || lab.ping_once("b2", a1, 500),
    );

    let (c1_v4, _) = lab.node_addresses("c1");
    let c1 = IpAddr::V4(c1_v4);
    let c1_key = lab.node_info("c1").public_key;
    lab.wait_until(
        Duration::from_secs(20),
        "a1 to ping c1 before the delete",
        || lab.ping_once("a1", c1, 500),
    );
    let handshake_before = latest_handshake(&lab, "a1", &c1_key);
    // Pings a1 -> c1 every 50 ms for 4 s, across the delete.
    let background = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node("a1").ns,
            "ping",
            "-n",
            "-c",
            "80",
            "-i",
            "0.05",
            "-W",
            "1",
        ])
        .arg(c1.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ping a1 -> c1");

    let others: Vec<String> = lab.node_names().into_iter().filter(|n| n != "b2").collect();
    let t0 = Instant::now();
    lab.weftctl_ok(&["node", "delete", "b2"]);
    let mut still: Vec<String> = others.clone();
    let removed = weft_tests::try_wait_until(
        Duration::from_secs(10),
        "every other node to drop b2's key from `wg show peers`",
        || {
            still.retain(|n| lab.wg_peers(n).contains(&b2_key));
            still.is_empty()
        },
    );
    let took = t0.elapsed();
    assert!(
        removed.is_ok(),
        "after `weftctl node delete b2`, nodes {still:?} still have b2's key {b2_key} after {took:?}"
    );
    eprintln!(
        "b2's key gone from all {} other nodes after {took:?}",
        others.len()
    );
    assert!(
        took <= BUDGET,
        "b2's key should be gone from every node within {BUDGET:?}, took {took:?}"
    );

    // The controller no longer lists it.
    let listed: Vec<String> = lab.nodes().into_iter().map(|n| n.name).collect();
    assert!(
        !listed.iter().any(|n| n == "b2"),
        "`weftctl node list` still lists b2 after delete: {listed:?}"
    );

    // Other peers were not disturbed.
    let out = background
        .wait_with_output()
        .expect("waiting for ping a1 -> c1");
    let r = PingResult::parse(&String::from_utf8_lossy(&out.stdout));
    assert!(
        r.transmitted >= 70 && r.received == r.transmitted,
        "a1 -> c1 pings across the delete of b2 must all arrive: {}/{} replies",
        r.received,
        r.transmitted
    );
    let handshake_after = latest_handshake(&lab, "a1", &c1_key);
    assert_eq!(
        handshake_after, handshake_before,
        "a1's session with c1 must survive the delete of b2 (latest handshake changed)"
    );

    // b2's packets are not accepted any more.
    let r = lab.ping("b2", a1, 5);
    let total = t0.elapsed();
    assert_eq!(
        r.received, 0,
        "b2 should no longer reach a1 ({a1}) after being deleted, but got {}/{} replies",
        r.received, r.transmitted
    );
    eprintln!(
        "b2 -> a1: {}/{} replies (as expected none); total {total:?}",
        r.received, r.transmitted
    );
}

/// Unix time of `node`'s latest handshake with `peer` (`wg show latest-handshakes`).
fn latest_handshake(lab: &Lab, node: &str, peer: &str) -> u64 {
    let out = lab.wg_show(node, "latest-handshakes");
    out.lines()
        .find_map(|l| {
            let (k, t) = l.split_once('\t')?;
            (k.trim() == peer).then(|| t.trim().parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("{node} has no handshake entry for {peer}: {out}"))
}
