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

/// The lab's variations, on the underlay alone: per-site node counts, a NAT
/// site whose nodes reach out but cannot be reached (one public mapping per
/// LAN socket, whatever the destination), a symmetric NAT site (a mapping
/// per destination), and a cut WAN path between two sites that leaves
/// their other paths alone.
#[test]
fn lab_variants() {
    if weft_tests::skip_unless_root("lab_variants") {
        return;
    }
    let ip = |s: &str| -> IpAddr { s.parse().expect("valid address") };
    let (a1, b1, c1, n1) = (
        ip("198.19.1.11"),
        ip("198.19.2.11"),
        ip("198.19.3.11"),
        ip("198.19.4.11"),
    );
    let ctl = ip("198.18.100.2");
    let prefix;
    {
        let mut lab = Lab::builder()
            .site_nodes(&[("a", 1), ("b", 2), ("c", 1), ("n", 2), ("m", 1)])
            .nat_sites(&["n"])
            .symmetric_nat_sites(&["m"])
            .wan_delays_ms(&[5, 10, 15, 20])
            .topology_only(true)
            .build();
        prefix = lab.prefix().to_owned();
        assert_eq!(
            lab.node_names(),
            ["a1", "b1", "b2", "c1", "n1", "n2", "m1"],
            "per-site node counts"
        );
        assert_eq!(lab.site_nodes("b"), ["b1", "b2"]);
        for (from, to) in [("a1", b1), ("a1", c1), ("b1", c1), ("a1", ctl), ("b2", ctl)] {
            lab.wait_until(
                Duration::from_secs(5),
                &format!("{from} to reach {to} over the underlay"),
                || lab.ping_once(from, to, 500),
            );
        }
        // a <-> b crosses the delay line: 2 × (5 + 10) ms.
        let r = lab.ping("a1", b1, 3);
        let rtt = r.rtt_avg.expect("a1 -> b1 replies");
        assert!(
            (Duration::from_millis(28)..Duration::from_millis(45)).contains(&rtt),
            "a1 -> b1 RTT {rtt:?}, expected about 30 ms"
        );

        // NAT site n: its nodes reach out (controller, other sites, each
        // other), nothing outside reaches them.
        lab.wait_until(Duration::from_secs(5), "n1 to reach the controller", || {
            lab.ping_once("n1", ctl, 500)
        });
        let r = lab.ping("n1", a1, 3);
        assert_eq!(r.received, 3, "n1 -> a1 through the NAT: {r:?}");
        // Masqueraded traffic crosses the delay line too: 2 × (20 + 5) ms.
        let rtt = r.rtt_avg.expect("n1 -> a1 replies");
        assert!(
            (Duration::from_millis(48)..Duration::from_millis(70)).contains(&rtt),
            "n1 -> a1 RTT {rtt:?}, expected about 50 ms"
        );
        assert!(
            lab.ping_once("n1", ip("198.19.4.12"), 500),
            "n1 -> n2 on their LAN"
        );
        for from in ["a1", "b1", "c1"] {
            assert!(
                !lab.ping_once(from, n1, 700),
                "{from} reaches n1 (198.19.4.11) behind the NAT"
            );
        }
        let _a1_listener = weft_tests::nc::listen(&lab, "a1", &[("-4", 7001)]);
        let _n1_listener = weft_tests::nc::listen(&lab, "n1", &[("-4", 7001)]);
        assert!(
            weft_tests::nc::connects(&lab, "n1", a1, 7001, Duration::from_secs(3)),
            "n1 opens a TCP connection to a1 through the NAT"
        );
        assert!(
            !weft_tests::nc::connects(&lab, "a1", n1, 7001, Duration::from_secs(2)),
            "a1 opens a TCP connection to n1 behind the NAT"
        );
        let out = lab.sh("n", "nft list table ip weft_lab");
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("masquerade") && table.contains("198.19.4.0/24"),
            "n's router masquerades its LAN:\n{table}"
        );

        // The mappings: n1's socket is 198.18.4.2 with one port towards
        // a1, b1 and c1 (its own port: nothing else holds it); m1's socket
        // gets a random port per destination.
        let seen = lab
            .udp_sources("n1", 40000, &["a1", "b1", "c1"])
            .unwrap_or_else(|e| panic!("UDP from n1: {e:#}"));
        eprintln!("n1:40000 as seen by a1, b1, c1: {seen:?}");
        assert!(
            seen.iter().all(|s| s.to_string() == "198.18.4.2:40000"),
            "n's NAT keeps the source port, the same towards every destination: {seen:?}"
        );
        let m1 = ip("198.19.5.11");
        assert!(
            !lab.ping_once("a1", m1, 700),
            "a1 reaches m1 behind the NAT"
        );
        let seen = lab
            .udp_sources("m1", 40000, &["a1", "b1", "c1"])
            .unwrap_or_else(|e| panic!("UDP from m1: {e:#}"));
        eprintln!("m1:40000 as seen by a1, b1, c1: {seen:?}");
        assert!(
            seen.iter().all(|s| s.ip() == ip("198.18.5.2")),
            "m's NAT maps to its uplink address: {seen:?}"
        );
        let ports: std::collections::BTreeSet<u16> = seen.iter().map(|s| s.port()).collect();
        assert_eq!(
            ports.len(),
            3,
            "m's symmetric NAT maps m1:40000 to another port per destination: {seen:?}"
        );
        let out = lab.sh("m", "nft list table ip weft_lab");
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("fully-random") && table.contains("198.19.5.0/24"),
            "m's router masquerades its LAN fully-random:\n{table}"
        );

        // Cut a <-> b only.
        lab.cut_pair("a", "b");
        assert_eq!(lab.cut_pairs(), [("a".to_owned(), "b".to_owned())]);
        assert!(lab.try_cut_pair("b", "a").is_err(), "cutting twice fails");
        for (from, to) in [
            ("a1", b1),
            ("b1", a1),
            ("b2", a1),
            ("a", ip("198.18.2.2")),
            ("b", ip("198.18.1.2")),
        ] {
            assert!(
                !lab.ping_once(from, to, 700),
                "{from} -> {to} must be cut by cut_pair(a, b)"
            );
        }
        for (from, to) in [
            ("a1", c1),
            ("c1", a1),
            ("b1", c1),
            ("c1", b1),
            ("a1", ctl),
            ("b1", ctl),
            ("n1", a1),
            ("n1", b1),
        ] {
            assert!(
                lab.ping_once(from, to, 1000),
                "{from} -> {to} must survive cut_pair(a, b)"
            );
        }
        // A NAT site's pair: n's masqueraded traffic is cut too.
        lab.cut_pair("n", "a");
        assert!(!lab.ping_once("n1", a1, 700), "n1 -> a1 with n <-> a cut");
        assert!(lab.ping_once("n1", b1, 1000), "n1 -> b1 with n <-> a cut");
        lab.restore_pair("a", "n");
        lab.restore_pair("b", "a");
        assert!(lab.cut_pairs().is_empty());
        assert!(
            lab.try_restore_pair("a", "b").is_err(),
            "restoring twice fails"
        );
        let rules = lab.exec("wan", &["ip", "rule", "show", "pref", "50"]);
        assert!(
            rules.stdout.is_empty(),
            "restore_pair must remove every rule it added, left: {}",
            String::from_utf8_lossy(&rules.stdout)
        );
        for (from, to) in [("a1", b1), ("b1", a1), ("n1", a1)] {
            lab.wait_until(
                Duration::from_secs(5),
                &format!("{from} to reach {to} after restore_pair"),
                || lab.ping_once(from, to, 500),
            );
        }
    }
    let left: Vec<String> = netns::list_ns()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(
        left.is_empty(),
        "namespaces left after the lab dropped: {left:?}"
    );
}
