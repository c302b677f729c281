//! Peer probes (issue 4, point 3's measurements): agents probe their peers'
//! endpoints and report round-trip time, loss and reachability, which
//! `weftctl node get` shows.
//!
//! In a 3-site lab whose WAN adds 5, 10 and 15 ms one way per site uplink,
//! a1's reported RTT to b1 is about 30 ms and to c1 about 40 ms, to a2
//! (same site) a few ms; cutting site b's uplink makes b1 unreachable in
//! a1's report within 5 s, and restoring it brings it back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use weft_tests::Lab;

/// a1's view of each peer: (rtt µs, loss ‰, reachable), by peer name.
fn probes(lab: &Lab, node: &str) -> BTreeMap<String, (u64, u64, bool)> {
    let names: BTreeMap<String, String> = lab
        .nodes()
        .into_iter()
        .map(|n| (n.public_key.clone(), n.name.clone()))
        .collect();
    let out = lab.weftctl_ok(&["node", "get", node, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("node json");
    let mut seen = BTreeMap::new();
    for p in v["peers"].as_array().into_iter().flatten() {
        let Some(probe) = p.get("probe") else {
            continue;
        };
        let key = p["public_key"].as_str().unwrap_or_default();
        let name = names.get(key).cloned().unwrap_or_else(|| key.to_owned());
        seen.insert(
            name,
            (
                probe["rtt_us"].as_u64().unwrap_or(0),
                probe["loss_permille"].as_u64().unwrap_or(0),
                probe["reachable"].as_bool().unwrap_or(false),
            ),
        );
    }
    seen
}

#[test]
fn peer_probes() {
    if weft_tests::skip_unless_root("peer_probes") {
        return;
    }
    let lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(2)
        .wan_delays_ms(&[5, 10, 15])
        .build();

    let in_range =
        |rtt_us: u64, lo_ms: u64, hi_ms: u64| (lo_ms * 1000..=hi_ms * 1000).contains(&rtt_us);
    lab.wait_until(
        Duration::from_secs(30),
        "a1 to report probe RTTs to b1 (~30 ms), c1 (~40 ms) and a2 (local)",
        || {
            let p = probes(&lab, "a1");
            matches!(p.get("b1"), Some(&(rtt, _, true)) if in_range(rtt, 25, 45))
                && matches!(p.get("c1"), Some(&(rtt, _, true)) if in_range(rtt, 35, 55))
                && matches!(p.get("a2"), Some(&(rtt, _, true)) if rtt > 0 && rtt < 15_000)
        },
    );
    eprintln!("a1's probes: {:?}", probes(&lab, "a1"));
    // The path a1 -> b1 from the probes: direct, at about the probed RTT.
    let trace = lab.weftctl_ok(&["route", "trace", "a1", "b1"]);
    assert!(
        trace.starts_with("a1 (a) -> b1 (b)") && trace.contains("a -> b: direct ("),
        "route trace a1 b1 before the cut:\n{trace}"
    );

    lab.cut_link("b");
    let cut = Instant::now();
    lab.wait_until(
        Duration::from_secs(15),
        "a1 to report b1 unreachable after site b's uplink is cut",
        || matches!(probes(&lab, "a1").get("b1"), Some(&(_, _, false))),
    );
    let took = cut.elapsed();
    eprintln!("b1 unreachable in a1's report {took:?} after the cut");
    assert!(
        took <= Duration::from_secs(5),
        "a1 took {took:?} to report b1 unreachable (budget 5 s)"
    );
    let p = probes(&lab, "a1");
    assert!(
        matches!(p.get("c1"), Some(&(_, _, true))),
        "c1 stays reachable: {p:?}"
    );
    let (_, loss, _) = p["b1"];
    assert!(loss > 0, "b1's probes are lost: {p:?}");
    // Full mesh does not relay: the trace says the direct link is down,
    // once site b's agents' last reports (from before the cut, which also
    // cut them off the controller) are stale (25 s).
    lab.wait_until(
        Duration::from_secs(40),
        "route trace a1 b1 to say the direct link is down",
        || {
            lab.weftctl_ok(&["route", "trace", "a1", "b1"])
                .contains("the link is down")
        },
    );

    lab.restore_link("b");
    lab.wait_until(
        Duration::from_secs(15),
        "a1 to report b1 reachable again after the uplink is restored",
        || matches!(probes(&lab, "a1").get("b1"), Some(&(_, _, true))),
    );
}
