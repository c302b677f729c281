//! `weftctl node delete b2`: within 2 s every other node drops b2's key,
//! and b2's packets are no longer accepted (b2 cannot ping a1).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use weft_tests::Lab;

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
