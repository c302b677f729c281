//! Headless restart: with the controller gone, a1's agent is killed (-9) and
//! restarted without a token; from its persisted config it is reachable again
//! within 2 s of the restart, with the same overlay addresses.

use std::net::IpAddr;
use std::time::Duration;

use weft_tests::{Lab, Signal};

const BUDGET: Duration = Duration::from_secs(2);

#[test]
fn agent_restart_headless() {
    if weft_tests::skip_unless_root("agent_restart_headless") {
        return;
    }
    let mut lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(2)
        .build();
    let (a1_v4, a1_v6) = lab.node_addresses("a1");
    let a1 = IpAddr::V4(a1_v4);
    lab.wait_until(
        Duration::from_secs(20),
        "b1 to ping a1 before the restart",
        || lab.ping_once("b1", a1, 500),
    );
    let addrs_before = lab.iface_addrs("a1");
    assert!(
        addrs_before
            .iter()
            .any(|a| a.starts_with(&format!("{a1_v4}/")))
            && addrs_before
                .iter()
                .any(|a| a.starts_with(&format!("{a1_v6}/"))),
        "a1's interface should carry {a1_v4} and {a1_v6}, has {addrs_before:?}"
    );

    lab.kill_controller(Signal::SIGKILL);
    lab.kill_agent("a1", Signal::SIGKILL);
    lab.wait_until(
        Duration::from_secs(5),
        "a1's interface to vanish with its agent",
        || lab.iface_addrs("a1").is_empty(),
    );

    let started = lab.start_agent("a1");
    let reached = weft_tests::try_wait_until(
        Duration::from_secs(30),
        "b1 to ping a1 after a1's headless restart",
        || lab.ping_once("b1", a1, 200),
    );
    let took = started.elapsed();
    assert!(
        reached.is_ok(),
        "b1 could not reach a1 ({a1}) within 30 s of a1's restart without controller"
    );
    eprintln!("b1 reached a1 {took:?} after a1's agent was started");
    assert!(
        took <= BUDGET,
        "b1 should reach a1 within {BUDGET:?} of the agent restart, took {took:?}"
    );
    let addrs_after = lab.iface_addrs("a1");
    assert_eq!(
        addrs_after, addrs_before,
        "a1's interface addresses changed across the restart"
    );
}
