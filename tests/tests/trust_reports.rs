//! Forged measurements: one node sending false reports with its own mTLS
//! identity cannot move other sites' traffic through its site.
//!
//! Sites a, b, c (2 nodes each) in gateway mode with gateways a1, b1, c1,
//! WAN RTTs a–b 30 ms, a–c 40 ms, b–c 50 ms: a <-> b is direct. Gateway c1
//! then sends, beside its running agent (`weft report-as` in its
//! namespace, with its identity.json), for about 30 s:
//!
//! - its links to a1 and b1 at 1 µs without loss, each entry 1,000 times
//!   (refused whole: a peer listed twice);
//! - its links to a1 and b1 at 1 µs, a1 and b1 "seen" at a made-up
//!   endpoint, a2 and b2 (not its peers in gateway mode) unreachable, and
//!   40 random keys (accepted: the non-peers are ignored, the 1 µs is one
//!   vote of two per link and the higher latency counts, one witness
//!   teaches no endpoint);
//! - a1 and b1 unreachable, all probes lost (one vote against a majority
//!   and a connected agent: nobody is marked down);
//!
//! and once each, a report with 30,000 peers and one with 300 (over the
//! absolute limit, and over twice its config's peers plus slack): refused
//! with RESOURCE_EXHAUSTED naming the limit.
//!
//! Meanwhile `weftctl route trace a2 b2` and `a1 b1` stay direct, a -> c
//! keeps its measured latency, a1 <-> b1 pings never touch c1's TUN
//! device, no endpoint is learnt for a1 or b1, the controller logs the
//! ignored entries at most once a minute (not per report or entry), and c1 stays a
//! normal member (connected, relaying c2 <-> a2).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_tests::{Lab, bins};

/// `weftctl -o json route trace FROM TO`: (node names, explanation).
fn trace(lab: &Lab, from: &str, to: &str) -> (Vec<String>, String) {
    let out = lab.weftctl_ok(&["-o", "json", "route", "trace", from, to]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("route trace JSON");
    let nodes = v["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(|h| {
            h.as_str()
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    (
        nodes,
        v["explanation"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The latency in `X -> Y: direct (30.6 ms)`, for `pair` = `X -> Y`.
fn direct_ms(explanation: &str, pair: &str) -> Option<f64> {
    let rest = explanation.strip_prefix(pair)?.strip_prefix(": direct (")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn v4(lab: &Lab, node: &str) -> IpAddr {
    lab.node_addresses(node).0.into()
}

/// The controller's log, without colours.
fn controller_log(lab: &Lab) -> String {
    let p = lab.proc("controller").expect("controller process");
    [&p.stderr, &p.stdout]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|t| weft_tests::process::strip_ansi(&t))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The JSON lines `weft report-as` printed (one per report).
fn outcomes(lab: &Lab, key: &str) -> Vec<serde_json::Value> {
    let p = lab.proc(key).expect("report-as process");
    std::fs::read_to_string(&p.stdout)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{key} printed {l:?}: {e}")))
        .collect()
}

/// Runs `weft report-as` once in c1's namespace; its single outcome.
fn report_once(lab: &Lab, weft: &str, state_dir: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![weft, "report-as", "--state-dir", state_dir];
    args.extend_from_slice(extra);
    let out = lab.exec("c1", &args);
    assert!(
        out.status.success(),
        "weft report-as failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("report-as printed {text:?}: {e}"))
}

#[test]
fn forged_reports_cannot_pull_traffic_through_their_site() {
    if weft_tests::skip_unless_root("forged_reports_cannot_pull_traffic_through_their_site") {
        return;
    }
    let t0 = Instant::now();
    let mut lab = Lab::builder()
        .site_nodes(&[("a", 2), ("b", 2), ("c", 2)])
        .wan_delays_ms(&[5, 10, 15])
        .build();
    lab.set_gateway_mode(
        &["a1", "b1", "c1"],
        &[],
        &[("a2", &["a1"]), ("b2", &["b1"]), ("c2", &["c1"])],
        Duration::from_secs(20),
    );
    // Measured first: a -> b direct at about 30 ms, a -> c about 40 ms.
    lab.wait_until(
        Duration::from_secs(30),
        "a2 -> b2 direct at the measured RTT (25-45 ms)",
        || {
            let (nodes, why) = trace(&lab, "a2", "b2");
            nodes == ["a2", "a1", "b1", "b2"]
                && direct_ms(&why, "a -> b").is_some_and(|ms| (25.0..45.0).contains(&ms))
        },
    );
    lab.wait_until(
        Duration::from_secs(30),
        "a1 -> c1 direct at the measured RTT (35-60 ms)",
        || {
            let (_, why) = trace(&lab, "a1", "c1");
            direct_ms(&why, "a -> c").is_some_and(|ms| (35.0..60.0).contains(&ms))
        },
    );
    eprintln!("lab measured in {:?}", t0.elapsed());

    let weft = bins::path("weft").expect("weft binary");
    let weft_s = weft.display().to_string();
    let state_dir: PathBuf = lab.node("c1").state_dir.clone();
    let dir_s = state_dir.display().to_string();
    let key = |n: &str| lab.node_info(n).public_key;
    let (a1k, a2k, b1k, b2k) = (key("a1"), key("a2"), key("b1"), key("b2"));
    let fake_endpoint = "198.18.77.7:51820";

    // Oversize reports: refused, naming the limit.
    let big = report_once(&lab, &weft_s, &dir_s, &["--random-peers", "30000"]);
    eprintln!("30,000 peers: {big}");
    assert_eq!(big["code"], "ResourceExhausted", "{big}");
    assert!(
        big["message"]
            .as_str()
            .is_some_and(|m| m.contains("over the limit of 20000")),
        "{big}"
    );
    let over = report_once(&lab, &weft_s, &dir_s, &["--random-peers", "300"]);
    eprintln!("300 peers: {over}");
    assert_eq!(over["code"], "ResourceExhausted", "{over}");
    assert!(
        over["message"]
            .as_str()
            .is_some_and(|m| m.contains("over the limit of 262") && m.contains("3 peers")),
        "c1's config has 3 peers (c2, a1, b1): {over}"
    );

    // The floods, about 30 s each, beside c1's own agent.
    let fast = |k: &str, endpoint: &str| format!("{k}=1/0/up{endpoint}");
    let floods: [(&str, Vec<String>); 3] = [
        (
            "forge-dups",
            vec![
                "--peer".into(),
                fast(&a1k, ""),
                "--peer".into(),
                fast(&b1k, ""),
                "--repeat".into(),
                "1000".into(),
            ],
        ),
        (
            "forge-fast",
            vec![
                "--peer".into(),
                fast(&a1k, &format!("@{fake_endpoint}")),
                "--peer".into(),
                fast(&b1k, &format!("@{fake_endpoint}")),
                "--peer".into(),
                format!("{a2k}=0/1000/down"),
                "--peer".into(),
                format!("{b2k}=0/1000/down"),
                "--random-peers".into(),
                "40".into(),
            ],
        ),
        (
            "forge-down",
            vec![
                "--peer".into(),
                format!("{a1k}=0/1000/down"),
                "--peer".into(),
                format!("{b1k}=0/1000/down"),
            ],
        ),
    ];
    const COUNT: u32 = 100;
    for (name, extra) in &floods {
        let mut args = vec![
            "report-as".to_owned(),
            "--state-dir".to_owned(),
            dir_s.clone(),
            "--count".to_owned(),
            COUNT.to_string(),
            "--interval-ms".to_owned(),
            "300".to_owned(),
        ];
        args.extend(extra.iter().cloned());
        lab.spawn(name, "c1", &weft, &args)
            .unwrap_or_else(|e| panic!("spawning {name}: {e:#}"));
    }
    let flood_start = Instant::now();

    // While they run: a <-> b stays direct, a -> c keeps its latency, and
    // a1 <-> b1 traffic does not cross c1.
    std::thread::sleep(Duration::from_secs(3));
    let (a1_v4, b1_v4) = (v4(&lab, "a1"), v4(&lab, "b1"));
    let mut rounds = 0;
    while flood_start.elapsed() < Duration::from_secs(24) {
        for (from, to, want) in [
            ("a2", "b2", ["a2", "a1", "b1", "b2"].as_slice()),
            ("a1", "b1", ["a1", "b1"].as_slice()),
            ("b2", "a2", ["b2", "b1", "a1", "a2"].as_slice()),
        ] {
            let (nodes, why) = trace(&lab, from, to);
            assert_eq!(
                nodes, want,
                "route trace {from} {to} during the forged reports: {why}"
            );
        }
        let (_, why) = trace(&lab, "a1", "c1");
        assert!(
            direct_ms(&why, "a -> c").is_some_and(|ms| ms >= 30.0),
            "a -> c keeps its measured latency, not c1's 1 µs: {why}"
        );
        let c1_before = lab.tun_packets("c1");
        let r1 = lab.ping("a1", b1_v4, 10);
        let r2 = lab.ping("b1", a1_v4, 10);
        let c1_after = lab.tun_packets("c1");
        assert_eq!((r1.received, r2.received), (10, 10), "{r1:?} {r2:?}");
        let (rx, tx) = (c1_after.0 - c1_before.0, c1_after.1 - c1_before.1);
        assert!(
            rx < 4 && tx < 4,
            "a1 <-> b1's 40 packets must not cross c1: its TUN rx +{rx}, tx +{tx}"
        );
        rounds += 1;
    }
    eprintln!("{rounds} rounds of checks during the forged reports, all direct");

    for (name, _) in &floods {
        assert!(
            lab.wait_proc(name, Duration::from_secs(30)).is_some(),
            "{name} did not finish"
        );
    }
    let got: BTreeMap<&str, Vec<serde_json::Value>> = floods
        .iter()
        .map(|(name, _)| (*name, outcomes(&lab, name)))
        .collect();
    for (name, lines) in &got {
        assert_eq!(lines.len(), COUNT as usize, "{name}: {lines:?}");
    }
    // The controller also rate-limits each node's reports (10 in a burst,
    // then 1/s): c1's floods share that budget, so a report may be refused
    // for its rate before its content is read. Every report is either
    // judged on its content or refused for its rate, and each kind is
    // judged at least once.
    let rate_limited = |v: &serde_json::Value| {
        v["code"] == "ResourceExhausted"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("too many reports"))
    };
    let dup_refused = |v: &serde_json::Value| {
        v["code"] == "InvalidArgument"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("listed twice"))
    };
    let dups = &got["forge-dups"];
    assert!(
        dups.iter().all(|v| dup_refused(v) || rate_limited(v)) && dups.iter().any(dup_refused),
        "duplicates refused: {:?}",
        dups.iter().find(|v| !dup_refused(v))
    );
    for name in ["forge-fast", "forge-down"] {
        let lines = &got[name];
        assert!(
            lines.iter().all(|v| v["ok"] == true || rate_limited(v))
                && lines.iter().any(|v| v["ok"] == true),
            "{name}'s reports are accepted (and outvoted) or rate-limited: {:?}",
            lines.iter().find(|v| v["ok"] != true && !rate_limited(v))
        );
    }

    // One witness teaches no endpoint: b1 still has a1 where a1 is.
    let log = controller_log(&lab);
    for n in ["a1", "b1"] {
        let id = lab.node_info(n).id;
        let id = id.as_str().map_or_else(|| id.to_string(), str::to_owned);
        assert!(
            !log.lines()
                .any(|l| l.contains("endpoint learnt") && l.contains(&format!("node={id}"))),
            "no endpoint may be learnt for {n} from c1's word alone"
        );
    }
    let endpoints = lab.wg_show("b1", "endpoints");
    assert!(
        !endpoints.contains("198.18.77.7"),
        "b1 must not be handed c1's made-up endpoint for a1:\n{endpoints}"
    );
    // The ignored entries (42 in each of 100 reports) are logged at most
    // once a minute, not per report or entry.
    let ignored_lines = log
        .lines()
        .filter(|l| l.contains("not in the node's config"))
        .count();
    eprintln!("controller lines about ignored report entries: {ignored_lines}");
    assert!(
        (1..=2).contains(&ignored_lines),
        "the ignored entries are logged, once a minute at most: {ignored_lines} lines"
    );

    // The forger is still a normal member: connected, relaying for c2.
    // (Its own agent's reports share the rate limit with the forgeries: a
    // refused one makes the agent reconnect, so wait for the stream.)
    lab.wait_until(
        Duration::from_secs(30),
        "c1 connected to the controller",
        || lab.node_info("c1").connected,
    );
    let r = lab.ping("c2", v4(&lab, "a2"), 5);
    assert_eq!(r.received, 5, "c2 -> a2 through c1 and a1: {r:?}");
    let (nodes, why) = trace(&lab, "c2", "a2");
    assert_eq!(nodes, ["c2", "c1", "a1", "a2"], "{why}");
    eprintln!(
        "forged_reports_cannot_pull_traffic_through_their_site passed in {:?}",
        t0.elapsed()
    );
}
