//! The lab harness itself (no Weft binaries needed): the underlay routes
//! between sites through the routers, nodes have no default route, a cut
//! uplink isolates its site until restored, and dropping the lab removes
//! every namespace it made.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use weft_tests::{Lab, netns};

#[test]
fn lab_topology() {
    if weft_tests::skip_unless_root("lab_topology") {
        return;
    }
    let prefix;
    {
        let lab = Lab::builder().topology_only(true).build();
        prefix = lab.prefix().to_owned();
        let c2 = IpAddr::V4(Ipv4Addr::new(198, 19, 3, 12));
        let ctl = IpAddr::V4(Ipv4Addr::new(198, 18, 100, 2));
        for node in lab.node_names() {
            let routes = lab.exec(&node, &["ip", "-4", "route", "show", "default"]);
            assert!(
                routes.stdout.is_empty(),
                "{node} must not have a default route, has: {}",
                String::from_utf8_lossy(&routes.stdout)
            );
            lab.wait_until(
                Duration::from_secs(5),
                &format!("{node} to reach the controller ns"),
                || lab.ping_once(&node, ctl, 500),
            );
        }
        let r = lab.ping("a1", c2, 3);
        assert_eq!(r.received, 3, "a1 -> c2 over the underlay: {r:?}");

        lab.cut_link("c");
        let r = lab.ping("a1", c2, 2);
        assert_eq!(
            r.received, 0,
            "a1 still reaches c2 with site c's uplink cut: {r:?}"
        );
        assert!(
            lab.ping_once("c1", c2, 500),
            "c1 -> c2 (same LAN) must survive a cut uplink"
        );
        lab.restore_link("c");
        lab.wait_until(
            Duration::from_secs(5),
            "a1 to reach c2 after restore_link(c)",
            || lab.ping_once("a1", c2, 500),
        );
        let outside = lab.exec("a1", &["ping", "-c", "1", "-W", "1", "198.51.100.1"]);
        assert!(
            !outside.status.success(),
            "a1 must have no route out of the lab (198.51.100.1 answered)"
        );
    }
    let left: Vec<String> = netns::list_ns()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(
        left.is_empty(),
        "namespaces left after the lab dropped: {left:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/run/weft-lab/test-{prefix}.json")).exists(),
        "state file left after the lab dropped"
    );
}
