//! The dataplane believes a peer only for what it was granted (issue 11,
//! points 2 and 3):
//!
//! - `an_external_peer_cannot_reach_a_host_only_address`: an external
//!   WireGuard peer (unmodified wireguard-go, `weftctl peer add`) that
//!   routes 0.0.0.0/0 to node a1 on its side sends pings to an address a1
//!   hosts outside the overlay (198.18.250.1 on its loopback): a1's
//!   tunnel drops them (nothing reaches a1's stack, by an nftables counter;
//!   no reply), counts them as `not_for_us` in `weftctl node get`, and a1's
//!   overlay address still answers the same peer.
//! - `weft_routes_cannot_capture_the_tunnel`: with a route covering every
//!   peer's endpoint injected by hand into Weft's table 51820 on a1, the
//!   overlay keeps flowing: Weft's rule skips the tunnel's own marked
//!   packets, while an unmarked packet to the same endpoint is captured. A
//!   rule without the exemption (as older agents installed) is replaced.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use weft_tests::{Lab, Signal};

/// The host-only address on a1: underlay range, not in the overlay, not
/// used by the lab.
const HOST_ONLY: &str = "198.18.250.1";
/// Weft's routing table and rule priority (agent defaults).
const TABLE: &str = "51820";
/// The agent's default fwmark, as `ip rule` prints it.
const MARK_HEX: &str = "0xca6c";

fn stdout(lab: &Lab, ns: &str, script: &str) -> String {
    let out = lab.sh(ns, script);
    assert!(
        out.status.success(),
        "`{script}` in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn node_json(lab: &Lab, node: &str) -> serde_json::Value {
    let out = lab.weftctl_ok(&["-o", "json", "node", "get", node]);
    serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!("`weftctl -o json node get {node}` printed bad JSON ({e}): {out}")
    })
}

/// Packets a node's tunnel dropped as `not_for_us`, as last reported.
fn not_for_us(lab: &Lab, node: &str) -> u64 {
    node_json(lab, node)["tunnel_drops"]["not_for_us"]["packets"]
        .as_u64()
        .unwrap_or(0)
}

/// Packets counted by the nftables rule for [`HOST_ONLY`] in a1's input.
fn host_only_packets(lab: &Lab) -> u64 {
    let rules = stdout(lab, "a1", "nft list chain inet weft_test input");
    rules
        .lines()
        .find(|l| l.contains(HOST_ONLY))
        .and_then(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "packets")?;
            words.next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no counter for {HOST_ONLY} in a1's input chain:\n{rules}"))
}

#[test]
fn an_external_peer_cannot_reach_a_host_only_address() {
    if weft_tests::skip_unless_root("an_external_peer_cannot_reach_a_host_only_address") {
        return;
    }
    let wg_go = Path::new("/usr/bin/wireguard-go");
    assert!(
        wg_go.is_file(),
        "{} missing: run scripts/setup.sh",
        wg_go.display()
    );
    let mut lab = Lab::builder().site_nodes(&[("a", 1), ("b", 1)]).build();
    let a1 = lab.node_info("a1");
    let a1_v4 = a1.ipv4().expect("a1 has an IPv4 overlay address");

    // a1 hosts an address outside the overlay, counted at its input hook.
    stdout(
        &lab,
        "a1",
        &format!(
            "ip addr add {HOST_ONLY}/32 dev lo && nft add table inet weft_test && \
             nft add chain inet weft_test input '{{ type filter hook input priority 0; }}' && \
             nft add rule inet weft_test input ip daddr {HOST_ONLY} counter"
        ),
    );

    // x1: wireguard-go on site a's LAN, registered as an external peer.
    let x1 = lab.add_host("a", "x1", 21);
    let iface = format!("wf{}x1", &lab.prefix()[1..]);
    let key_file = lab.dir().join("x1.key");
    let private = stdout(&lab, &x1, "wg genkey");
    std::fs::write(&key_file, format!("{private}\n")).expect("writing x1's key");
    let public = stdout(&lab, &x1, &format!("echo '{private}' | wg pubkey"));
    let added = lab.weftctl_ok(&[
        "-o",
        "json",
        "peer",
        "add",
        "x1",
        "--site",
        "a",
        "--public-key",
        &public,
        "--endpoint",
        "198.19.1.21:51820",
    ]);
    let added: serde_json::Value = serde_json::from_str(&added)
        .unwrap_or_else(|e| panic!("`weftctl -o json peer add` printed bad JSON ({e}): {added}"));
    let x1_v4: Ipv4Addr = added["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.split('/').next()?.parse().ok())
        .next()
        .unwrap_or_else(|| panic!("peer add gave no IPv4 address: {added}"));
    lab.wait_until(
        Duration::from_secs(20),
        "a1 to have x1 as a WireGuard peer",
        || lab.wg_peers("a1").contains(&public),
    );

    lab.spawn("wireguard-go-x1", &x1, wg_go, &["-f".into(), iface.clone()])
        .expect("starting wireguard-go");
    lab.wait_until(
        Duration::from_secs(10),
        "wireguard-go's UAPI socket to answer `wg show`",
        || lab.exec(&x1, &["wg", "show", &iface]).status.success(),
    );
    let a1_endpoint = a1
        .endpoint
        .clone()
        .unwrap_or_else(|| panic!("a1 has no endpoint: {a1:?}"));
    // x1 routes everything IPv4 to a1 on its side, the host-only
    // address included.
    stdout(
        &lab,
        &x1,
        &format!(
            "wg set {iface} private-key {key} listen-port 51820 peer {peer} endpoint {a1_endpoint} \
             allowed-ips 0.0.0.0/0 persistent-keepalive 5 && \
             ip addr add {x1_v4}/32 dev {iface} && ip link set {iface} up && \
             ip route add 100.64.0.0/10 dev {iface} && ip route add {HOST_ONLY}/32 dev {iface}",
            key = key_file.display(),
            peer = a1.public_key,
        ),
    );

    // The overlay address answers x1.
    lab.wait_until(
        Duration::from_secs(20),
        &format!("x1 to ping a1's overlay address {a1_v4}"),
        || lab.ping_once(&x1, IpAddr::V4(a1_v4), 1000),
    );
    let dropped_before = not_for_us(&lab, "a1");

    // The host-only address: nothing arrives, nothing answers.
    let host_only: IpAddr = HOST_ONLY.parse().expect("valid address");
    let r = lab.ping(&x1, host_only, 5);
    // ping keeps sending until its deadline when no reply comes.
    assert!(r.transmitted >= 5, "x1 must have sent 5 pings: {r:?}");
    assert!(
        !r.reachable(),
        "a1's host-only address {HOST_ONLY} answered x1 through the tunnel: {r:?}"
    );
    assert_eq!(
        host_only_packets(&lab),
        0,
        "packets to {HOST_ONLY} reached a1's stack"
    );
    lab.wait_until(
        Duration::from_secs(30),
        &format!(
            "a1's report to count the {} pings as not_for_us",
            r.transmitted
        ),
        || not_for_us(&lab, "a1") >= dropped_before + u64::from(r.transmitted),
    );
    let shown = lab.weftctl_ok(&["node", "get", "a1"]);
    assert!(
        shown
            .lines()
            .any(|l| l.contains("not_for_us") && !l.trim_end().ends_with(" 0 B")),
        "`weftctl node get a1` must show the not_for_us drops:\n{shown}"
    );

    // Still served: the overlay address, both ways.
    let r = lab.ping(&x1, IpAddr::V4(a1_v4), 3);
    assert!(r.reachable(), "x1 -> a1 overlay after the drops: {r:?}");
    let r = lab.ping("a1", IpAddr::V4(x1_v4), 3);
    assert!(r.reachable(), "a1 -> x1 overlay: {r:?}");
}

#[test]
fn weft_routes_cannot_capture_the_tunnel() {
    if weft_tests::skip_unless_root("weft_routes_cannot_capture_the_tunnel") {
        return;
    }
    let mut lab = Lab::builder()
        .site_nodes(&[("a", 1), ("b", 1)])
        .ipv4_pool("100.64.0.0/16")
        .build();
    let b1 = lab.node_info("b1");
    let b1_v4 = IpAddr::V4(b1.ipv4().expect("b1 has an IPv4 overlay address"));
    let b1_endpoint: IpAddr = b1
        .endpoint
        .as_deref()
        .and_then(|e| e.parse::<std::net::SocketAddr>().ok())
        .map(|e| e.ip())
        .unwrap_or_else(|| panic!("b1 has no endpoint: {b1:?}"));
    let iface = lab.iface("a1");

    // An older agent's rule (no exemption) is in place when b1's prefix
    // makes a1 install Weft's rule: it is replaced.
    stdout(
        &lab,
        "a1",
        &format!("ip rule add priority 5182 lookup {TABLE}"),
    );
    lab.weftctl_ok(&["node", "advertise", "b1", "100.100.2.0/24"]);
    let rules = || {
        stdout(
            &lab,
            "a1",
            &format!("ip rule show | grep 'lookup {TABLE}' || true"),
        )
    };
    lab.wait_until(
        Duration::from_secs(20),
        "a1's rule for table 51820 to exempt the tunnel's fwmark, and the old one to be gone",
        || {
            let r = rules();
            r.lines().count() == 1
                && r.contains(&format!("not from all fwmark {MARK_HEX} lookup {TABLE}"))
        },
    );
    eprintln!("a1 rules: {}", rules());
    lab.wait_until(
        Duration::from_secs(20),
        "a1 to ping b1's overlay address",
        || lab.ping_once("a1", b1_v4, 1000),
    );

    // A route in Weft's table covering b1's endpoint (and every LAN).
    stdout(
        &lab,
        "a1",
        &format!("ip route add 198.19.0.0/16 dev {iface} table {TABLE}"),
    );
    let route_get =
        |extra: &str| stdout(&lab, "a1", &format!("ip route get {b1_endpoint} {extra}"));
    let unmarked = route_get("");
    assert!(
        unmarked.contains(&format!("dev {iface}")),
        "an unmarked packet to b1's endpoint must be captured by the injected route: {unmarked}"
    );
    let marked = route_get(&format!("mark {MARK_HEX}"));
    assert!(
        !marked.contains(&format!("dev {iface}")),
        "a marked packet to b1's endpoint must skip Weft's table: {marked}"
    );

    // The tunnel keeps flowing: pings both ways over several seconds.
    let r = lab.ping("a1", b1_v4, 15);
    assert!(
        r.received >= 14,
        "a1 -> b1 over the overlay with Weft's table covering b1's endpoint: {r:?}"
    );
    let a1_v4 = IpAddr::V4(lab.node_info("a1").ipv4().expect("a1 IPv4"));
    let r = lab.ping("b1", a1_v4, 5);
    assert!(r.reachable(), "b1 -> a1 over the overlay: {r:?}");

    // New sessions get through as well: b1's agent restarts (a new
    // tunnel), so a1 answers fresh handshakes under the injected route.
    lab.kill_agent("b1", Signal::SIGTERM);
    lab.start_agent("b1");
    lab.wait_until(
        Duration::from_secs(30),
        "a1 to reach b1's restarted agent over the overlay",
        || lab.ping_once("a1", b1_v4, 1000),
    );
    let r = lab.ping("a1", b1_v4, 10);
    assert!(r.received >= 9, "a1 -> b1 after b1's restart: {r:?}");
    assert!(
        stdout(&lab, "a1", &format!("ip route show table {TABLE}")).contains("198.19.0.0/16"),
        "the injected route must still be in place (it is not Weft's)"
    );
}
