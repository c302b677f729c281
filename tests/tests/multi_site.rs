//! Multi-site topologies end to end: gateway mode (members mesh inside
//! their site, traffic between sites goes member -> gateway -> gateway ->
//! member, `weftctl topology set --mode gateways`), failover when a gateway
//! dies or a WAN path between two sites is cut, residency rules that drop
//! rather than relay through a foreign site, and sites behind NAT (hole
//! punching between two NAT sites, relaying around a symmetric NAT).
//!
//! - `gateway_paths`: sites a (2 nodes), b (3), c (2), gateways a1, b1, b2,
//!   c1. A plain member peers only with its own site; a2 -> b3 and a2 -> c2
//!   cross both sites' gateways (route trace, the gateways' TUN packet
//!   counters, wg transfer), b3 -> b2 inside site b passes no other
//!   gateway; ping (IPv4 and IPv6) and TCP across sites.
//! - `gateway_agent_killed`: same lab; the b gateway carrying a2 -> b3 is
//!   `kill -9`ed: a2 -> b3 flows again within 5 s (the other gateway takes
//!   over), and after the agent restarts.
//! - `wan_path_cut`: sites a, b, c with gateways a1, b1, c1 and WAN RTTs
//!   a–b 30 ms, a–c 40 ms, b–c 50 ms: a -> b is direct; with the a–b WAN
//!   path cut, traffic flows again within 5 s, relayed via c; restored, the
//!   route goes back to direct.
//! - `residency_drops`: a and b tagged `eu` with the rule "eu traffic
//!   transits only eu sites", c untagged: with a–b cut, a <-> b traffic is
//!   dropped (no compliant path, and c relays nothing), a <-> c still flows;
//!   restored, a <-> b flows again.
//! - `nat_site_full_mesh` (and `nat_site_gateways`): site n behind NAT (its
//!   nodes announce unroutable LAN endpoints) with two normal sites: every
//!   node of n reaches and is reached by every node of the others (ping and
//!   TCP).
//! - `nat_sites_punch_through`: full mesh, site a (2 nodes, public), n and
//!   m (2 nodes each) behind NATs that keep source ports. The controller
//!   learns each NATed node's public mapping from a's reports (a1 and a2
//!   agree: a mapping needs two witnesses in other sites; "endpoint
//!   learnt" in its log, for all four) and hands it to the other NAT site;
//!   the simultaneous handshakes open both NATs: every node of n pings
//!   every node of m and back, TCP n -> m, directly (n1's endpoint for m1
//!   is m's NAT address, n1's wg transfer with m1 grows with the pings,
//!   a1's and a2's TUNs see none of them; n2 keeps n1's LAN endpoint).
//!   Prints how long after the mesh formed n1 -> m1 first answered.
//! - `symmetric_nat_relays_via_gateway`: site a (1 node), n (2) behind a
//!   port-preserving NAT, m (2) behind a symmetric one: in full mesh n1
//!   never reaches m1 (12 s). Gateway mode with gateways a1, n1, m1: the
//!   n–m link is measured down, `route trace` n2 -> m2 (and back, and
//!   n1 <-> m1) is relayed via a, n2 <-> m2 ping both ways through a1 (its
//!   TUN counters), TCP both ways, and a1 <-> every node of n and m.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use weft_tests::nc::{connects, listen};
use weft_tests::{Lab, Signal};

/// `weftctl -o json route trace FROM TO`.
#[derive(Debug, Clone)]
struct Trace {
    /// Node names along the path.
    nodes: Vec<String>,
    /// Hops as printed (`a1 (a, gateway)`).
    hops: Vec<String>,
    delivered: bool,
    explanation: String,
}

impl Trace {
    fn text(&self) -> String {
        format!(
            "{}\n{}{}",
            self.hops.join(" -> "),
            self.explanation,
            if self.delivered {
                ""
            } else {
                " (not delivered)"
            }
        )
    }
}

fn try_trace(lab: &Lab, from: &str, to: &str) -> Result<Trace, String> {
    let out = lab
        .try_weftctl_ok(&["-o", "json", "route", "trace", from, to])
        .map_err(|e| format!("{e:#}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("route trace JSON ({e}): {out}"))?;
    let hops: Vec<String> = v["hops"]
        .as_array()
        .ok_or_else(|| format!("route trace JSON without hops: {out}"))?
        .iter()
        .map(|h| h.as_str().unwrap_or_default().to_owned())
        .collect();
    let nodes = hops
        .iter()
        .map(|h| h.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    Ok(Trace {
        nodes,
        hops,
        delivered: v["delivered"]
            .as_bool()
            .ok_or_else(|| format!("route trace JSON without delivered: {out}"))?,
        explanation: v["explanation"].as_str().unwrap_or_default().to_owned(),
    })
}

fn trace(lab: &Lab, from: &str, to: &str) -> Trace {
    try_trace(lab, from, to).unwrap_or_else(|e| panic!("route trace {from} {to}: {e}"))
}

/// Waits until `route trace FROM TO` satisfies `ok`; returns it and how
/// long it took. Panics with the last trace after `timeout`.
fn wait_trace(
    lab: &Lab,
    from: &str,
    to: &str,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&Trace) -> bool,
) -> (Trace, Duration) {
    let t0 = Instant::now();
    loop {
        let last = match try_trace(lab, from, to) {
            Ok(t) if ok(&t) => return (t, t0.elapsed()),
            Ok(t) => t.text(),
            Err(e) => e,
        };
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for route trace {from} {to} to show {what}; \
             last:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The latency in `X -> Y: direct (30.6 ms)`, for `pair` = `X -> Y`.
fn direct_ms(explanation: &str, pair: &str) -> Option<f64> {
    let rest = explanation.strip_prefix(pair)?.strip_prefix(": direct (")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn v4(lab: &Lab, node: &str) -> IpAddr {
    lab.node_addresses(node).0.into()
}

fn v6(lab: &Lab, node: &str) -> IpAddr {
    lab.node_addresses(node).1.into()
}

/// Time from `since` until one ping `from` -> `to` gets a reply (pings
/// with a 300 ms reply timeout, back to back), or None after `limit`.
fn time_to_ping(
    lab: &Lab,
    from: &str,
    to: IpAddr,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    while since.elapsed() < limit {
        let t = Instant::now();
        if lab.ping_once(from, to, 300) {
            return Some(since.elapsed());
        }
        // An immediate error (no route yet): do not spin.
        if t.elapsed() < Duration::from_millis(250) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    None
}

/// TUN packet counters of several nodes: (rx, tx) by node.
fn tun_snapshot(lab: &Lab, nodes: &[&str]) -> Vec<(String, (u64, u64))> {
    nodes
        .iter()
        .map(|n| ((*n).to_owned(), lab.tun_packets(n)))
        .collect()
}

/// Counter increase (rx, tx) of `node` between two snapshots.
fn delta(
    before: &[(String, (u64, u64))],
    after: &[(String, (u64, u64))],
    node: &str,
) -> (u64, u64) {
    let get = |s: &[(String, (u64, u64))]| {
        s.iter()
            .find(|(n, _)| n == node)
            .map(|(_, c)| *c)
            .unwrap_or_else(|| panic!("{node} not in the snapshot"))
    };
    let ((rx0, tx0), (rx1, tx1)) = (get(before), get(after));
    (rx1.saturating_sub(rx0), tx1.saturating_sub(tx0))
}

/// Sites a (2), b (3), c (2) in gateway mode, gateways a1, b1, b2, c1,
/// with a2's, b3's and c2's peers down to their own sites and the paths
/// a2 -> b3 and b3 -> a2 delivered through gateways.
fn gateway_lab() -> Lab {
    let t0 = Instant::now();
    let lab = Lab::builder()
        .site_nodes(&[("a", 2), ("b", 3), ("c", 2)])
        .build();
    eprintln!("lab built (full mesh) in {:?}", t0.elapsed());
    let t1 = Instant::now();
    lab.set_gateway_mode(
        &["a1", "b1", "b2", "c1"],
        &[],
        &[("a2", &["a1"]), ("b3", &["b1", "b2"]), ("c2", &["c1"])],
        Duration::from_secs(20),
    );
    eprintln!(
        "plain members peer only inside their site {:?} after topology set",
        t1.elapsed()
    );
    for (from, to) in [("a2", "b3"), ("b3", "a2"), ("a2", "c2"), ("c2", "a2")] {
        let (t, _) = wait_trace(
            &lab,
            from,
            to,
            Duration::from_secs(30),
            "a delivered path through gateways",
            |t| t.delivered && t.nodes.len() == 4,
        );
        eprintln!("route trace {from} {to}:\n{}", t.text());
    }
    lab
}

#[test]
fn gateway_paths() {
    if weft_tests::skip_unless_root("gateway_paths") {
        return;
    }
    let t0 = Instant::now();
    let lab = gateway_lab();
    let all = ["a1", "a2", "b1", "b2", "b3", "c1", "c2"];

    // Who peers with whom: plain members only inside their site (checked by
    // gateway_lab); gateways with their site and some gateways elsewhere.
    let a1 = lab.wg_peer_names("a1");
    assert!(a1.contains("a2"), "gateway a1 peers with a2: {a1:?}");
    assert!(
        !a1.contains("b3") && !a1.contains("c2"),
        "gateway a1 must not peer with other sites' plain members: {a1:?}"
    );
    assert!(
        a1.contains("c1") && (a1.contains("b1") || a1.contains("b2")),
        "gateway a1 peers with gateways of b and c: {a1:?}"
    );
    let b3 = lab.wg_peer_names("b3");
    eprintln!("a1's peers {a1:?}, b3's peers {b3:?}");

    // a2 -> b3: a2 -> a1 -> (b1 or b2) -> b3; replies b3 -> (b1 or b2) -> a1 -> a2.
    let fwd = trace(&lab, "a2", "b3");
    let back = trace(&lab, "b3", "a2");
    assert_eq!(fwd.nodes[..2], ["a2", "a1"], "{}", fwd.text());
    assert_eq!(fwd.nodes[3], "b3", "{}", fwd.text());
    assert!(
        ["b1", "b2"].contains(&fwd.nodes[2].as_str()),
        "a2 -> b3 enters b through one of its gateways:\n{}",
        fwd.text()
    );
    assert!(
        fwd.hops[1].contains("gateway") && fwd.hops[2].contains("gateway"),
        "the trace marks the gateways:\n{}",
        fwd.text()
    );
    assert!(
        fwd.explanation.contains("a -> b: direct ("),
        "sites a and b are linked directly:\n{}",
        fwd.text()
    );
    assert_eq!(back.nodes[2..], ["a1", "a2"], "{}", back.text());
    let b_in = fwd.nodes[2].clone();
    let b_out = back.nodes[1].clone();
    eprintln!(
        "route trace: a2 -> b3 enters b at {b_in}, b3 -> a2 leaves b at {b_out} (flows spread over both b gateways)"
    );

    let (a2_v4, b3_v4, c2_v4) = (v4(&lab, "a2"), v4(&lab, "b3"), v4(&lab, "c2"));
    const N: u64 = 20;
    let a2_transfer = lab.wg_transfer("a2");
    let before = tun_snapshot(&lab, &all);
    let r = lab.ping("a2", b3_v4, N as u32);
    let after = tun_snapshot(&lab, &all);
    eprintln!("a2 -> b3 (IPv4) through gateways: {r:?}");
    assert_eq!(u64::from(r.received), N, "a2 -> b3 over IPv4: {r:?}");
    // a1 forwards requests and replies: each arrives on its TUN device and
    // goes back into it.
    let (rx, tx) = delta(&before, &after, "a1");
    assert!(
        rx >= 2 * N && tx >= 2 * N,
        "gateway a1 forwards {N} echo requests and {N} replies, its TUN counted \
         rx +{rx}, tx +{tx}"
    );
    // Site b's gateways are interchangeable: each direction of the ping
    // (one flow each) crosses one of them, whichever its flow hashes to.
    let (mut b_rx, mut b_tx) = (0, 0);
    for gw in ["b1", "b2"] {
        let (rx, tx) = delta(&before, &after, gw);
        eprintln!("{gw}: TUN rx +{rx}, tx +{tx}");
        b_rx += rx;
        b_tx += tx;
    }
    assert!(
        b_rx >= 2 * N && b_tx >= 2 * N,
        "b's gateways forward {N} echo requests and {N} replies between them, their TUNs \
         counted rx +{b_rx}, tx +{b_tx}"
    );
    // Site c carries nothing of it.
    for n in ["c1", "c2"] {
        let (rx, _) = delta(&before, &after, n);
        assert!(rx < N / 2, "{n} received {rx} packets of a2 <-> b3");
    }
    let a1_key = lab.node_info("a1").public_key;
    let sent_to_a1 = lab
        .wg_transfer("a2")
        .get(&a1_key)
        .map(|t| t.1)
        .unwrap_or(0)
        .saturating_sub(a2_transfer.get(&a1_key).map(|t| t.1).unwrap_or(0));
    assert!(
        sent_to_a1 >= N * 84,
        "a2 sends the pings to its gateway a1 (wg transfer +{sent_to_a1} bytes)"
    );

    // IPv6 too.
    let r = lab.ping("a2", v6(&lab, "b3"), 5);
    assert_eq!(r.received, 5, "a2 -> b3 over IPv6: {r:?}");

    // a2 -> c2 through a1 and c1.
    let t = trace(&lab, "a2", "c2");
    assert_eq!(t.nodes, ["a2", "a1", "c1", "c2"], "{}", t.text());
    let before = tun_snapshot(&lab, &all);
    let r = lab.ping("a2", c2_v4, N as u32);
    let after = tun_snapshot(&lab, &all);
    assert_eq!(u64::from(r.received), N, "a2 -> c2: {r:?}");
    for gw in ["a1", "c1"] {
        let (rx, tx) = delta(&before, &after, gw);
        assert!(
            rx >= 2 * N && tx >= 2 * N,
            "gateway {gw} forwards a2 <-> c2 both ways: TUN rx +{rx}, tx +{tx}"
        );
    }
    for gw in ["b1", "b2"] {
        let (rx, _) = delta(&before, &after, gw);
        assert!(rx < N / 2, "{gw} received {rx} packets of a2 <-> c2");
    }

    // Inside site b: b3 -> b2 directly, b1 not in between.
    let t = trace(&lab, "b3", "b2");
    assert_eq!(t.nodes, ["b3", "b2"], "{}", t.text());
    let before = tun_snapshot(&lab, &all);
    let r = lab.ping("b3", v4(&lab, "b2"), N as u32);
    let after = tun_snapshot(&lab, &all);
    assert_eq!(u64::from(r.received), N, "b3 -> b2: {r:?}");
    let (rx, _) = delta(&before, &after, "b2");
    assert!(rx >= N, "b2 received the {N} pings itself: rx +{rx}");
    let (rx, _) = delta(&before, &after, "b1");
    assert!(
        rx < N / 2,
        "b3 -> b2 inside site b must not pass gateway b1 (rx +{rx})"
    );

    // TCP across sites, both ways.
    let _l1 = listen(&lab, "b3", &[("-4", 7100)]);
    let _l2 = listen(&lab, "c2", &[("-4", 7100)]);
    let _l3 = listen(&lab, "a2", &[("-4", 7100)]);
    for (from, to) in [("a2", b3_v4), ("a2", c2_v4), ("b3", a2_v4), ("c2", a2_v4)] {
        assert!(
            connects(&lab, from, to, 7100, Duration::from_secs(5)),
            "TCP {from} -> {to}:7100 through the gateways"
        );
    }

    // Active-active per flow: b3's connections to a2 (each its own source
    // port, so its own flow) spread over both b gateways.
    let before = tun_snapshot(&lab, &all);
    for i in 0..16 {
        assert!(
            connects(&lab, "b3", a2_v4, 7100, Duration::from_secs(5)),
            "TCP b3 -> a2:7100, connection {i}"
        );
    }
    let after = tun_snapshot(&lab, &all);
    for gw in ["b1", "b2"] {
        let (rx, tx) = delta(&before, &after, gw);
        eprintln!("16 connections b3 -> a2: {gw} TUN rx +{rx}, tx +{tx}");
        assert!(
            rx >= 3 && tx >= 3,
            "flows of b3 -> a2 should spread over both gateways of b; {gw} forwarded rx +{rx}, tx +{tx}"
        );
    }
    eprintln!("gateway_paths passed in {:?}", t0.elapsed());
}

#[test]
fn gateway_agent_killed() {
    if weft_tests::skip_unless_root("gateway_agent_killed") {
        return;
    }
    let t0 = Instant::now();
    let mut lab = gateway_lab();
    let b3_v4 = v4(&lab, "b3");
    // The ping's flow crosses one of b's gateways (by its flow hash): the
    // one whose TUN counts the echo requests is killed.
    let all = ["b1", "b2"];
    let before = tun_snapshot(&lab, &all);
    let r = lab.ping("a2", b3_v4, 10);
    let after = tun_snapshot(&lab, &all);
    assert_eq!(r.received, 10, "a2 -> b3 before the kill: {r:?}");
    let carried = |gw: &str| delta(&before, &after, gw).0;
    let carrier = if carried("b1") >= carried("b2") {
        "b1"
    } else {
        "b2"
    }
    .to_owned();
    let other = if carrier == "b1" { "b2" } else { "b1" };
    eprintln!(
        "a2 <-> b3 pings: b1 rx +{}, b2 rx +{}; killing {carrier}",
        carried("b1"),
        carried("b2")
    );

    let killed = Instant::now();
    let status = lab.kill_agent(&carrier, Signal::SIGKILL);
    eprintln!("{carrier}'s agent killed: {status:?}");
    let took = time_to_ping(&lab, "a2", b3_v4, killed, Duration::from_secs(20));
    eprintln!("a2 -> b3 answered again {took:?} after {carrier} was killed");
    let Some(took) = took else {
        panic!(
            "a2 -> b3 got no reply within 20 s of killing gateway {carrier}; \
             trace now:\n{}",
            trace(&lab, "a2", "b3").text()
        );
    };
    assert!(
        took <= Duration::from_secs(5),
        "a2 -> b3 took {took:?} to flow again after gateway {carrier} was killed (budget 5 s)"
    );
    let r = lab.ping("a2", b3_v4, 10);
    assert_eq!(r.received, 10, "a2 -> b3 with {carrier} dead: {r:?}");
    let (t, after) = wait_trace(
        &lab,
        "a2",
        "b3",
        Duration::from_secs(15),
        &format!("the path through {other}"),
        |t| t.delivered && t.nodes.get(2).map(String::as_str) == Some(other),
    );
    eprintln!(
        "route trace a2 b3 {after:?} after the check, with {carrier} dead:\n{}",
        t.text()
    );

    let restarted = Instant::now();
    lab.start_agent(&carrier);
    lab.wait_until(
        Duration::from_secs(20),
        &format!("{carrier}'s agent to be back (peers on its interface)"),
        || lab.wg_peers(&carrier).len() >= 2,
    );
    let (t, took) = wait_trace(
        &lab,
        "a2",
        "b3",
        Duration::from_secs(30),
        "a delivered path with both b gateways up",
        |t| t.delivered && t.nodes.len() == 4,
    );
    eprintln!(
        "{carrier} restarted; {took:?} later the trace is:\n{}",
        t.text()
    );
    // Settle: reachability reports and routes follow the restart.
    std::thread::sleep(Duration::from_secs(3));
    let r = lab.ping("a2", b3_v4, 10);
    eprintln!(
        "a2 -> b3 {:?} after {carrier} restarted: {r:?}",
        restarted.elapsed()
    );
    assert_eq!(r.received, 10, "a2 -> b3 after {carrier} restarted: {r:?}");
    let r = lab.ping("b3", v4(&lab, "a2"), 10);
    assert_eq!(r.received, 10, "b3 -> a2 after {carrier} restarted: {r:?}");
    eprintln!("gateway_agent_killed passed in {:?}", t0.elapsed());
}

/// Sites a (2), b (2), c (`c_nodes`) in gateway mode with gateways a1, b1,
/// c1, default WAN delays (RTT a–b 30 ms, a–c 40 ms, b–c 50 ms), plus
/// `extra` topology flags; waits until a2 -> b2 is direct.
fn three_gateway_lab(c_nodes: usize, extra: &[&str]) -> Lab {
    let t0 = Instant::now();
    let lab = Lab::builder()
        .site_nodes(&[("a", 2), ("b", 2), ("c", c_nodes)])
        .wan_delays_ms(&[5, 10, 15])
        .build();
    eprintln!("lab built in {:?}", t0.elapsed());
    lab.set_gateway_mode(
        &["a1", "b1", "c1"],
        extra,
        &[("a2", &["a1"]), ("b2", &["b1"])],
        Duration::from_secs(20),
    );
    // Direct at the measured RTT (about 30 ms), so the paths follow the
    // probes before anything is cut.
    let (t, took) = wait_trace(
        &lab,
        "a2",
        "b2",
        Duration::from_secs(30),
        "a direct path a -> b at the measured RTT (25-45 ms)",
        |t| {
            t.delivered
                && direct_ms(&t.explanation, "a -> b").is_some_and(|ms| (25.0..45.0).contains(&ms))
        },
    );
    assert_eq!(t.nodes, ["a2", "a1", "b1", "b2"], "{}", t.text());
    eprintln!("{took:?} after topology set:\n{}", t.text());
    lab
}

#[test]
fn wan_path_cut() {
    if weft_tests::skip_unless_root("wan_path_cut") {
        return;
    }
    let t0 = Instant::now();
    let mut lab = three_gateway_lab(1, &[]);
    let b2_v4 = v4(&lab, "b2");
    let a2_v4 = v4(&lab, "a2");
    let r = lab.ping("a2", b2_v4, 5);
    assert_eq!(r.received, 5, "a2 -> b2 before the cut: {r:?}");
    eprintln!("a2 -> b2 direct: {r:?}");
    eprintln!("route list:\n{}", lab.weftctl_ok(&["route", "list"]));

    let cut = Instant::now();
    lab.cut_pair("a", "b");
    let took = time_to_ping(&lab, "a2", b2_v4, cut, Duration::from_secs(30));
    eprintln!("a2 -> b2 answered again {took:?} after the a-b WAN path was cut");
    let trace_now = trace(&lab, "a2", "b2");
    let Some(took) = took else {
        panic!(
            "a2 -> b2 got no reply within 30 s of cutting a <-> b; trace:\n{}",
            trace_now.text()
        );
    };
    assert!(
        took <= Duration::from_secs(5),
        "a2 -> b2 took {took:?} to flow again after the a-b path was cut (budget 5 s); \
         trace now:\n{}",
        trace_now.text()
    );
    let (t, _) = wait_trace(
        &lab,
        "a2",
        "b2",
        Duration::from_secs(5),
        "a path relayed via c",
        |t| t.delivered && t.explanation.contains("relayed via c"),
    );
    eprintln!("route trace a2 b2 with a <-> b cut:\n{}", t.text());
    assert_eq!(
        t.nodes,
        ["a2", "a1", "c1", "b1", "b2"],
        "relayed path:\n{}",
        t.text()
    );
    assert!(
        t.explanation.starts_with("a -> c -> b"),
        "site path a -> c -> b:\n{}",
        t.text()
    );
    let before = lab.tun_packets("c1");
    let r = lab.ping("a2", b2_v4, 10);
    let after = lab.tun_packets("c1");
    assert_eq!(r.received, 10, "a2 -> b2 relayed via c: {r:?}");
    let rtt = r.rtt_avg.expect("replies have an RTT");
    eprintln!("a2 -> b2 via c: {r:?}; c1 TUN rx +{}", after.0 - before.0);
    assert!(
        after.0 - before.0 >= 20,
        "c1 relays requests and replies: its TUN received {} packets",
        after.0 - before.0
    );
    // a–c 40 ms + c–b 50 ms.
    assert!(
        rtt >= Duration::from_millis(80),
        "relayed RTT {rtt:?} should be about 90 ms"
    );
    let r = lab.ping("b2", a2_v4, 5);
    assert_eq!(r.received, 5, "b2 -> a2 relayed via c: {r:?}");
    eprintln!(
        "route list with a <-> b cut:\n{}",
        lab.weftctl_ok(&["route", "list"])
    );

    let restored = Instant::now();
    lab.restore_pair("a", "b");
    let (t, took) = wait_trace(
        &lab,
        "a2",
        "b2",
        Duration::from_secs(30),
        "the direct path a -> b again",
        |t| t.delivered && t.explanation.contains("a -> b: direct ("),
    );
    eprintln!(
        "route back to direct {took:?} after restore_pair:\n{}",
        t.text()
    );
    assert_eq!(t.nodes, ["a2", "a1", "b1", "b2"], "{}", t.text());
    let took = time_to_ping(&lab, "a2", b2_v4, Instant::now(), Duration::from_secs(10));
    assert!(took.is_some(), "a2 -> b2 after the path came back");
    let r = lab.ping("a2", b2_v4, 10);
    assert_eq!(r.received, 10, "a2 -> b2 direct again: {r:?}");
    let rtt = r.rtt_avg.expect("replies have an RTT");
    assert!(
        rtt < Duration::from_millis(70),
        "direct RTT {rtt:?} should be about 30 ms"
    );
    eprintln!(
        "wan_path_cut passed in {:?} (restore to direct route {:?})",
        t0.elapsed(),
        restored.elapsed()
    );
}

#[test]
fn residency_drops() {
    if weft_tests::skip_unless_root("residency_drops") {
        return;
    }
    let t0 = Instant::now();
    let mut lab = three_gateway_lab(
        2,
        &[
            "--site-tag",
            "a=eu",
            "--site-tag",
            "b=eu",
            "--residency",
            "eu",
        ],
    );
    let (a2_v4, b2_v4, c2_v4) = (v4(&lab, "a2"), v4(&lab, "b2"), v4(&lab, "c2"));
    for (from, to) in [("a2", b2_v4), ("b2", a2_v4), ("a2", c2_v4), ("c2", a2_v4)] {
        let r = lab.ping(from, to, 5);
        assert_eq!(r.received, 5, "{from} -> {to} before the cut: {r:?}");
    }
    let topo = lab.weftctl_ok(&["-o", "json", "topology", "get"]);
    eprintln!("topology: {topo}");

    let cut = Instant::now();
    lab.cut_pair("a", "b");
    let (t, took) = wait_trace(
        &lab,
        "a2",
        "b2",
        Duration::from_secs(15),
        "no compliant path, not delivered",
        |t| !t.delivered && t.explanation.contains("no compliant path"),
    );
    eprintln!("{took:?} after the cut:\n{}", t.text());
    assert!(
        t.explanation.contains("a -> b: no route") && t.explanation.contains("eu"),
        "the trace names the rule:\n{}",
        t.text()
    );
    assert!(
        t.text().ends_with("(not delivered)"),
        "text form ends with (not delivered):\n{}",
        t.text()
    );
    let t = trace(&lab, "b2", "a2");
    assert!(
        !t.delivered && t.explanation.contains("no compliant path"),
        "b2 -> a2 is dropped too:\n{}",
        t.text()
    );
    let text = lab.weftctl_ok(&["route", "trace", "a2", "b2"]);
    assert!(
        text.trim_end().ends_with("(not delivered)"),
        "`weftctl route trace a2 b2`:\n{text}"
    );
    // Dropped, not relayed through c: no reply, and c's gateway sees none
    // of it.
    let c_before = tun_snapshot(&lab, &["c1", "c2"]);
    let r = lab.ping("a2", b2_v4, 20);
    let r_back = lab.ping("b2", a2_v4, 10);
    let c_after = tun_snapshot(&lab, &["c1", "c2"]);
    eprintln!(
        "a2 -> b2 {:?} after the cut: {r:?}; b2 -> a2: {r_back:?}",
        cut.elapsed()
    );
    assert_eq!(r.received, 0, "eu traffic a2 -> b2 must be dropped: {r:?}");
    assert_eq!(
        r_back.received, 0,
        "eu traffic b2 -> a2 must be dropped: {r_back:?}"
    );
    let (rx, _) = delta(&c_before, &c_after, "c1");
    assert!(
        rx < 10,
        "c1 must not relay eu traffic, its TUN received {rx} packets"
    );
    // a <-> c (and b <-> c) still flow.
    for (from, to) in [("a2", c2_v4), ("c2", a2_v4), ("b2", c2_v4), ("c2", b2_v4)] {
        let r = lab.ping(from, to, 5);
        assert_eq!(r.received, 5, "{from} -> {to} with a <-> b cut: {r:?}");
    }
    eprintln!(
        "route list with a <-> b cut:\n{}",
        lab.weftctl_ok(&["route", "list"])
    );

    lab.restore_pair("a", "b");
    let restored = Instant::now();
    let (t, took) = wait_trace(
        &lab,
        "a2",
        "b2",
        Duration::from_secs(30),
        "the direct path a -> b again",
        |t| t.delivered && t.explanation.contains("a -> b: direct ("),
    );
    eprintln!("{took:?} after restore_pair:\n{}", t.text());
    let took = time_to_ping(&lab, "a2", b2_v4, restored, Duration::from_secs(30));
    eprintln!("a2 -> b2 answered {took:?} after restore_pair");
    assert!(took.is_some(), "a2 -> b2 after the a-b path came back");
    for (from, to) in [("a2", b2_v4), ("b2", a2_v4)] {
        let r = lab.ping(from, to, 10);
        assert_eq!(r.received, 10, "{from} -> {to} after restore: {r:?}");
    }
    eprintln!("residency_drops passed in {:?}", t0.elapsed());
}

/// Site n behind NAT with two normal sites: every node of n pings every
/// node of the others and is pinged by every one of them, TCP both ways.
/// The first pings go from outside into n (nothing but the agents' own
/// handshakes, probes and keepalives opened the NAT mappings); `since` is
/// when the agents' mesh formed, for the timings.
fn check_nat_reachability(lab: &Lab, since: Instant) {
    let nat_nodes = lab.site_nodes("n");
    let others: Vec<String> = ["a", "b"].iter().flat_map(|s| lab.site_nodes(s)).collect();
    let addr: std::collections::BTreeMap<String, IpAddr> = lab
        .node_names()
        .into_iter()
        .map(|n| {
            let a = v4(lab, &n);
            (n, a)
        })
        .collect();
    for x in &nat_nodes {
        for y in &others {
            let t = Instant::now();
            lab.wait_until(
                Duration::from_secs(20),
                &format!("{y} to reach {x} (behind NAT) over the overlay"),
                || lab.ping_once(y, addr[x], 500),
            );
            eprintln!(
                "{y} -> {x} (NAT): first reply {:?} after the first try, {:?} after the mesh formed",
                t.elapsed(),
                since.elapsed()
            );
        }
    }
    let _listeners: Vec<_> = lab
        .node_names()
        .iter()
        .map(|n| listen(lab, n, &[("-4", 7200)]))
        .collect();
    for x in &nat_nodes {
        for y in &others {
            let r = lab.ping(y, addr[x], 3);
            assert_eq!(r.received, 3, "{y} -> {x} (behind NAT): {r:?}");
            let r = lab.ping(x, addr[y], 3);
            assert_eq!(r.received, 3, "{x} (behind NAT) -> {y}: {r:?}");
            assert!(
                connects(lab, y, addr[x], 7200, Duration::from_secs(5)),
                "TCP {y} -> {x} (behind NAT)"
            );
            assert!(
                connects(lab, x, addr[y], 7200, Duration::from_secs(5)),
                "TCP {x} (behind NAT) -> {y}"
            );
        }
    }
    // The NATed nodes' peers see them at the NAT router's uplink address.
    let a1_endpoints = lab.wg_show("a1", "endpoints");
    eprintln!("a1's peer endpoints:\n{a1_endpoints}");
    assert!(
        a1_endpoints.contains("198.18.3.2:"),
        "a1 should have learnt the NAT address 198.18.3.2 of n's nodes:\n{a1_endpoints}"
    );
}

/// Sites a, b (2 nodes each) and n (2 nodes) behind NAT; returns the lab
/// and when its mesh formed.
fn nat_lab() -> (Lab, Instant) {
    let t0 = Instant::now();
    let lab = Lab::builder()
        .site_nodes(&[("a", 2), ("b", 2), ("n", 2)])
        .nat_sites(&["n"])
        .wan_delays_ms(&[5, 10, 15])
        .build();
    eprintln!("lab with NAT site n built in {:?}", t0.elapsed());
    (lab, Instant::now())
}

/// The underlay of n: its nodes are unreachable from outside but reach out.
fn check_nat_underlay(lab: &Lab) {
    let n1_lan: IpAddr = lab.node("n1").underlay.into();
    assert!(
        !lab.ping_once("a1", n1_lan, 700),
        "a1 must not reach n1's LAN address behind the NAT"
    );
    assert!(
        lab.ping_once("n1", weft_tests::lab::CONTROLLER_IP.into(), 1000),
        "n1 reaches the controller through the NAT"
    );
}

#[test]
fn nat_site_full_mesh() {
    if weft_tests::skip_unless_root("nat_site_full_mesh") {
        return;
    }
    let t0 = Instant::now();
    let (lab, meshed) = nat_lab();
    check_nat_reachability(&lab, meshed);
    check_nat_underlay(&lab);
    eprintln!("nat_site_full_mesh passed in {:?}", t0.elapsed());
}

#[test]
fn nat_site_gateways() {
    if weft_tests::skip_unless_root("nat_site_gateways") {
        return;
    }
    let t0 = Instant::now();
    let (lab, _) = nat_lab();
    check_nat_underlay(&lab);
    let switched = Instant::now();
    lab.set_gateway_mode(
        &["a1", "b1", "n1"],
        &[],
        &[("n2", &["n1"]), ("a2", &["a1"])],
        Duration::from_secs(20),
    );
    let (t, took) = wait_trace(
        &lab,
        "a2",
        "n2",
        Duration::from_secs(30),
        "a delivered path a2 -> n2",
        |t| t.delivered,
    );
    eprintln!("{took:?} after topology set:\n{}", t.text());
    check_nat_reachability(&lab, switched);
    // Once the probes have had time to measure (nobody can probe n's
    // nodes first; they probe out), n stays reachable.
    std::thread::sleep(Duration::from_secs(10));
    eprintln!("route list:\n{}", lab.weftctl_ok(&["route", "list"]));
    for (from, to) in [("a2", "n2"), ("n2", "b2")] {
        let t = trace(&lab, from, to);
        assert!(t.delivered, "route trace {from} {to}:\n{}", t.text());
    }
    check_nat_reachability(&lab, switched);
    eprintln!("nat_site_gateways passed in {:?}", t0.elapsed());
}

/// Site `site`'s NAT address (its router's uplink, 198.18.<i>.2).
fn uplink_ip(lab: &Lab, site: &str) -> String {
    let s = lab
        .state()
        .sites
        .iter()
        .find(|s| s.name == site)
        .unwrap_or_else(|| panic!("no site {site}"));
    format!("198.18.{}.2", s.index)
}

/// The endpoint `node`'s interface has for peer `peer` (`wg show
/// endpoints`), if any.
fn endpoint_of(lab: &Lab, node: &str, peer: &str) -> Option<String> {
    let key = lab.node_info(peer).public_key;
    lab.wg_show(node, "endpoints").lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(key.as_str()))
            .then(|| f.next().map(str::to_owned))
            .flatten()
            .filter(|e| e != "(none)")
    })
}

/// The controller's log (stderr and stdout), without colours.
fn controller_log(lab: &Lab) -> String {
    let Some(p) = lab.proc("controller") else {
        return String::new();
    };
    [&p.stderr, &p.stdout]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|t| weft_tests::process::strip_ansi(&t))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A node's controller-assigned ID, as the controller logs it.
fn node_id(lab: &Lab, node: &str) -> String {
    let id = lab.node_info(node).id;
    id.as_str().map_or_else(|| id.to_string(), str::to_owned)
}

/// The controller's "endpoint learnt" lines about `node`.
fn learnt_lines(log: &str, id: &str) -> Vec<String> {
    let field = format!("node={id}");
    log.lines()
        .filter(|l| {
            l.contains("endpoint learnt") && l.split_whitespace().any(|w| w == field.as_str())
        })
        .map(str::to_owned)
        .collect()
}

/// Endpoints and last handshakes as the nodes' interfaces have them (peers
/// by name), and the controller's NAT and reachability log lines: printed
/// when a NAT test fails, before the lab's log tails.
fn nat_state(lab: &Lab, nodes: &[&str]) -> String {
    let names = lab.names_by_key();
    let name = |k: &str| names.get(k).cloned().unwrap_or_else(|| k.to_owned());
    let mut s = String::new();
    for n in nodes {
        s.push_str(&format!("--- {n}: peer endpoint, last handshake (unix)\n"));
        let hs = lab.wg_show(n, "latest-handshakes");
        for l in lab.wg_show(n, "endpoints").lines() {
            let mut f = l.split_whitespace();
            let (Some(k), Some(e)) = (f.next(), f.next()) else {
                continue;
            };
            let h = hs
                .lines()
                .find_map(|h| h.strip_prefix(k))
                .map_or("?", str::trim);
            s.push_str(&format!("  {:<4} {e:<22} {h}\n", name(k)));
        }
    }
    s.push_str("--- controller: NAT and reachability lines\n");
    for l in controller_log(lab).lines().filter(|l| {
        l.contains("endpoint learnt")
            || l.contains("reachability changed")
            || l.contains("site path changed")
    }) {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Prints [`nat_state`] when the test panics (declare it after the lab, so
/// it drops first, while the lab still runs).
struct NatStateOnPanic<'a> {
    lab: &'a Lab,
    nodes: Vec<&'static str>,
}

impl Drop for NatStateOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== NAT state at the failure =====\n{}",
                nat_state(self.lab, &self.nodes)
            );
        }
    }
}

/// Sites a (public), n and m behind NAT (m's symmetric when `m_symmetric`),
/// with the given node counts; returns the lab and when its mesh formed.
fn two_nat_lab(a: usize, n: usize, m: usize, m_symmetric: bool) -> (Lab, Instant) {
    let t0 = Instant::now();
    let b = Lab::builder()
        .site_nodes(&[("a", a), ("n", n), ("m", m)])
        .wan_delays_ms(&[5, 10, 15]);
    let lab = if m_symmetric {
        b.nat_sites(&["n"]).symmetric_nat_sites(&["m"])
    } else {
        b.nat_sites(&["n", "m"])
    }
    .build();
    eprintln!(
        "lab with NAT sites n and m ({}) built in {:?}",
        if m_symmetric {
            "m symmetric"
        } else {
            "both port-preserving"
        },
        t0.elapsed()
    );
    (lab, Instant::now())
}

#[test]
fn nat_sites_punch_through() {
    if weft_tests::skip_unless_root("nat_sites_punch_through") {
        return;
    }
    let t0 = Instant::now();
    // Two public nodes: the controller hands out a NAT mapping only when
    // two members of other sites see it (one could lie).
    let (lab, meshed) = two_nat_lab(2, 2, 2, false);
    let _diag = NatStateOnPanic {
        lab: &lab,
        nodes: vec!["a1", "a2", "n1", "n2", "m1", "m2"],
    };
    let (n_nodes, m_nodes) = (lab.site_nodes("n"), lab.site_nodes("m"));
    let (n_pub, m_pub) = (uplink_ip(&lab, "n"), uplink_ip(&lab, "m"));

    // n1 -> m1: both behind NAT, neither can be reached first; only the
    // mappings learnt through the controller and simultaneous handshakes
    // open a way.
    let took = time_to_ping(&lab, "n1", v4(&lab, "m1"), meshed, Duration::from_secs(30));
    eprintln!("n1 -> m1 (NAT to NAT) first answered {took:?} after the mesh formed");
    assert!(
        took.is_some(),
        "n1 -> m1 got no reply within 30 s of the mesh forming"
    );

    // Every node of n with every node of m, both ways.
    for x in &n_nodes {
        for y in &m_nodes {
            for (from, to) in [(x, y), (y, x)] {
                let t = Instant::now();
                lab.wait_until(
                    Duration::from_secs(20),
                    &format!("{from} to reach {to} (NAT to NAT)"),
                    || lab.ping_once(from, v4(&lab, to), 500),
                );
                eprintln!(
                    "{from} -> {to}: first reply {:?} after the first try, {:?} after the mesh \
                     formed",
                    t.elapsed(),
                    meshed.elapsed()
                );
            }
        }
    }
    eprintln!("{}", nat_state(&lab, &["n1", "m1"]));

    // Direct: the peers' endpoints are the other NAT's public address, and
    // a1 and a2 (the public nodes, which relay nothing in full mesh anyway)
    // carry none of it.
    for (x, y, public) in [("n1", "m1", &m_pub), ("m1", "n1", &n_pub)] {
        let e = endpoint_of(&lab, x, y);
        assert!(
            e.as_deref()
                .is_some_and(|e| e.starts_with(&format!("{public}:"))),
            "{x} should reach {y} at its NAT's public address {public}, has endpoint {e:?}"
        );
    }
    // Inside a site, the LAN address stays.
    let e = endpoint_of(&lab, "n2", "n1");
    assert!(
        e.as_deref()
            .is_some_and(|e| e.starts_with(&format!("{}:", lab.node("n1").underlay))),
        "n2 keeps n1's LAN endpoint, has {e:?}"
    );
    const N: u32 = 5;
    let m1_key = lab.node_info("m1").public_key;
    let n1_m1 = |lab: &Lab| {
        lab.wg_transfer("n1")
            .get(&m1_key)
            .copied()
            .unwrap_or((0, 0))
    };
    let transfer0 = n1_m1(&lab);
    let a1_before = lab.tun_packets("a1");
    let a2_before = lab.tun_packets("a2");
    for x in &n_nodes {
        for y in &m_nodes {
            for (from, to) in [(x, y), (y, x)] {
                let r = lab.ping(from, v4(&lab, to), N);
                assert_eq!(r.received, N, "{from} -> {to} (NAT to NAT): {r:?}");
            }
        }
    }
    let a1_after = lab.tun_packets("a1");
    let a2_after = lab.tun_packets("a2");
    let transfer1 = n1_m1(&lab);
    let (rx, tx) = (
        transfer1.0.saturating_sub(transfer0.0),
        transfer1.1.saturating_sub(transfer0.1),
    );
    let pings = u64::from(2 * N);
    eprintln!(
        "n1's wg transfer with m1 during the pings: rx +{rx}, tx +{tx} bytes; a1's TUN \
         rx +{}, tx +{}",
        a1_after.0 - a1_before.0,
        a1_after.1 - a1_before.1
    );
    assert!(
        rx >= pings * 84 && tx >= pings * 84,
        "n1 <-> m1's {pings} echo requests and replies go over n1's session with m1 \
         (wg transfer rx +{rx}, tx +{tx} bytes)"
    );
    assert!(
        a1_after.0 - a1_before.0 < 5 && a1_after.1 - a1_before.1 < 5,
        "a1 must carry nothing of the n <-> m pings: TUN rx +{}, tx +{}",
        a1_after.0 - a1_before.0,
        a1_after.1 - a1_before.1
    );
    assert!(
        a2_after.0 - a2_before.0 < 5 && a2_after.1 - a2_before.1 < 5,
        "a2 must carry nothing of the n <-> m pings: TUN rx +{}, tx +{}",
        a2_after.0 - a2_before.0,
        a2_after.1 - a2_before.1
    );

    // TCP n -> m.
    let _listeners: Vec<_> = m_nodes
        .iter()
        .map(|y| listen(&lab, y, &[("-4", 7300)]))
        .collect();
    for x in &n_nodes {
        for y in &m_nodes {
            assert!(
                connects(&lab, x, v4(&lab, y), 7300, Duration::from_secs(5)),
                "TCP {x} -> {y}:7300 (NAT to NAT)"
            );
        }
    }

    // The controller learnt every NATed node's public mapping.
    let mut missing = Vec::new();
    let logged = weft_tests::try_wait_until(
        Duration::from_secs(10),
        "the controller to log learnt endpoints for n's and m's nodes",
        || {
            let log = controller_log(&lab);
            missing = n_nodes
                .iter()
                .chain(&m_nodes)
                .filter(|n| learnt_lines(&log, &node_id(&lab, n)).is_empty())
                .cloned()
                .collect();
            missing.is_empty()
        },
    );
    assert!(
        logged.is_ok(),
        "the controller logged no \"endpoint learnt\" line for {missing:?}"
    );
    let log = controller_log(&lab);
    for n in n_nodes.iter().chain(&m_nodes) {
        for l in learnt_lines(&log, &node_id(&lab, n)) {
            eprintln!("controller about {n}: {l}");
        }
    }
    eprintln!("nat_sites_punch_through passed in {:?}", t0.elapsed());
}

#[test]
fn symmetric_nat_relays_via_gateway() {
    if weft_tests::skip_unless_root("symmetric_nat_relays_via_gateway") {
        return;
    }
    let t0 = Instant::now();
    let (lab, meshed) = two_nat_lab(1, 2, 2, true);
    let _diag = NatStateOnPanic {
        lab: &lab,
        nodes: vec!["a1", "n1", "n2", "m1", "m2"],
    };
    // In full mesh n and m cannot meet: m's NAT maps each destination to
    // its own port, so no mapping the controller could hand out (a1, the
    // only witness, is not enough anyway) is the one n's packets would
    // need, and m's packets reach n's NAT from ports it never sent to. Longer than two NAT sites that
    // keep their ports need (nat_sites_punch_through).
    let direct = time_to_ping(&lab, "n1", v4(&lab, "m1"), meshed, Duration::from_secs(12));
    eprintln!(
        "full mesh: n1 -> m1 (port-preserving NAT to symmetric NAT) within 12 s of the \
         mesh: {direct:?}\n{}",
        nat_state(&lab, &["n1", "m1"])
    );
    assert!(
        direct.is_none(),
        "n1 reached m1 behind the symmetric NAT directly in full mesh ({direct:?} after the \
         mesh formed): is m's masquerade fully-random?"
    );

    let switched = Instant::now();
    lab.set_gateway_mode(
        &["a1", "n1", "m1"],
        &[],
        &[("n2", &["n1"]), ("m2", &["m1"])],
        Duration::from_secs(20),
    );
    // The n–m link is measured down (probes between n1 and m1 go
    // unanswered): n <-> m goes via a.
    let (t, took) = wait_trace(
        &lab,
        "n2",
        "m2",
        Duration::from_secs(60),
        "a path relayed via a",
        |t| t.delivered && t.explanation.contains("relayed via a"),
    );
    eprintln!("{took:?} after topology set:\n{}", t.text());
    assert_eq!(
        t.nodes,
        ["n2", "n1", "a1", "m1", "m2"],
        "n2 -> m2 through the gateways and a1:\n{}",
        t.text()
    );
    for (from, to) in [("m2", "n2"), ("n1", "m1"), ("m1", "n1")] {
        let (t, _) = wait_trace(
            &lab,
            from,
            to,
            Duration::from_secs(10),
            "a path relayed via a",
            |t| t.delivered && t.explanation.contains("relayed via a"),
        );
        eprintln!("route trace {from} {to}:\n{}", t.text());
    }
    eprintln!("route list:\n{}", lab.weftctl_ok(&["route", "list"]));

    let (n2_v4, m2_v4) = (v4(&lab, "n2"), v4(&lab, "m2"));
    let took = time_to_ping(&lab, "n2", m2_v4, switched, Duration::from_secs(60));
    eprintln!("n2 -> m2 first answered {took:?} after topology set");
    assert!(
        took.is_some(),
        "n2 -> m2 got no reply within 60 s of topology set"
    );
    const N: u64 = 10;
    let all = ["a1", "n1", "n2", "m1", "m2"];
    for (from, to) in [("n2", m2_v4), ("m2", n2_v4)] {
        let before = tun_snapshot(&lab, &all);
        let r = lab.ping(from, to, N as u32);
        let after = tun_snapshot(&lab, &all);
        assert_eq!(u64::from(r.received), N, "{from} -> {to} via a: {r:?}");
        let (rx, tx) = delta(&before, &after, "a1");
        eprintln!("{from} -> {to} via a: {r:?}; a1's TUN rx +{rx}, tx +{tx}");
        assert!(
            rx >= 2 * N && tx >= 2 * N,
            "gateway a1 relays the {N} echo requests and replies of {from} -> {to}: TUN \
             rx +{rx}, tx +{tx}"
        );
    }
    let _l = [
        listen(&lab, "m2", &[("-4", 7300)]),
        listen(&lab, "n2", &[("-4", 7300)]),
    ];
    assert!(
        connects(&lab, "n2", m2_v4, 7300, Duration::from_secs(5)),
        "TCP n2 -> m2 via a"
    );
    assert!(
        connects(&lab, "m2", n2_v4, 7300, Duration::from_secs(5)),
        "TCP m2 -> n2 via a"
    );

    // a with each NAT site, both ways.
    for x in ["n1", "n2", "m1", "m2"] {
        let xa = v4(&lab, x);
        let a1 = v4(&lab, "a1");
        let t = Instant::now();
        lab.wait_until(Duration::from_secs(20), &format!("a1 to reach {x}"), || {
            lab.ping_once("a1", xa, 500)
        });
        let r = lab.ping("a1", xa, 3);
        assert_eq!(r.received, 3, "a1 -> {x}: {r:?}");
        let r = lab.ping(x, a1, 3);
        assert_eq!(r.received, 3, "{x} -> a1: {r:?}");
        eprintln!("a1 <-> {x} ({:?})", t.elapsed());
    }
    eprintln!(
        "symmetric_nat_relays_via_gateway passed in {:?}",
        t0.elapsed()
    );
}
