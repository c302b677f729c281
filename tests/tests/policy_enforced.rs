//! Network policy enforced end to end (issue 3, tests 6b–6d, one policy):
//! c1 is labelled `role=db`, a1 `role=web`; the policy lets `role=web` reach
//! `role=db` on TCP 5432 and explicitly denies TCP 22 from site a; anything
//! else to c1 is default-denied.
//!
//! - a1 → c1 TCP 5432 connects (IPv4 and IPv6); a2 → c1 TCP 5432 (v4, v6),
//!   a1 → c1 TCP 22 and a1 → c1 ping are dropped, and c1 counts the drops
//!   (its agent logs `policy counters` when they change).
//! - Nodes no policy selects stay open (a1 ↔ b1 ping).
//! - The denied flow fails ≤ 1 s after `weftctl apply` returns.
//! - With the controller killed and c1's agent killed (-9) and restarted,
//!   the allowed flow works again and the denied ones stay denied.
//!
//! Connection tracking (replies to what a governed node opens, flows
//! across policy changes) and a larger matrix are in `policy_matrix.rs`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_tests::nc::{connects, listen};
use weft_tests::process::strip_ansi;
use weft_tests::{Lab, Signal};

const BUDGET: Duration = Duration::from_secs(1);

const POLICY: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 5432}]
  deny:
    - from: {sites: [a]}
      ports: [{protocol: TCP, port: 22}]
"#;

/// The last `policy counters` line of an agent's log, as (field, value).
fn counters(lab: &Lab, node: &str) -> Option<Vec<(String, u64)>> {
    let logs = lab.dir().join("logs");
    let text: String = [".stderr", ".stdout"]
        .iter()
        .map(|ext| logs.join(format!("agent-{node}{ext}")))
        .filter_map(|p: PathBuf| std::fs::read_to_string(p).ok())
        .collect::<Vec<_>>()
        .join("\n");
    let line = text.lines().rev().find(|l| l.contains("policy counters"))?;
    let plain = strip_ansi(line);
    Some(
        plain
            .split_whitespace()
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect(),
    )
}

fn counter(lab: &Lab, node: &str, name: &str) -> u64 {
    counters(lab, node)
        .and_then(|c| c.into_iter().find(|(k, _)| k == name).map(|(_, v)| v))
        .unwrap_or(0)
}

#[test]
fn policy_enforced() {
    if weft_tests::skip_unless_root("policy_enforced") {
        return;
    }
    let mut lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(2)
        .build();
    let (c1_v4, c1_v6) = lab.node_addresses("c1");
    let (c1, c1_6) = (IpAddr::V4(c1_v4), IpAddr::V6(c1_v6));
    let (b1_v4, _) = lab.node_addresses("b1");
    let (a1_v4, _) = lab.node_addresses("a1");
    let (a1, b1) = (IpAddr::V4(a1_v4), IpAddr::V4(b1_v4));
    let _listeners = listen(&lab, "c1", &[("-4", 5432), ("-6", 5432), ("-4", 22)]);
    let probe = Duration::from_millis(300);

    // Before any policy everything is open.
    lab.wait_until(
        Duration::from_secs(20),
        "a1 to ping c1 before policy",
        || lab.ping_once("a1", c1, 500),
    );
    lab.wait_until(
        Duration::from_secs(10),
        "a2 -> c1 TCP 5432 to connect before policy",
        || connects(&lab, "a2", c1, 5432, probe),
    );
    assert!(
        connects(&lab, "a1", c1, 22, Duration::from_secs(2)),
        "a1 -> c1 TCP 22 should connect before any policy"
    );

    lab.weftctl_ok(&["node", "label", "c1", "role=db"]);
    lab.weftctl_ok(&["node", "label", "a1", "role=web"]);
    assert!(
        connects(&lab, "a2", c1, 5432, Duration::from_secs(2)),
        "labels alone must not close anything: a2 -> c1 TCP 5432 failed"
    );
    let file = lab.dir().join("policy-db.yaml");
    std::fs::write(&file, POLICY).expect("writing the policy file");
    let file_s = file.display().to_string();

    lab.weftctl_ok(&["apply", "-f", &file_s]);
    let applied = Instant::now();
    // When the first probe that failed was sent.
    let mut took = Duration::ZERO;
    let closed = weft_tests::try_wait_until(
        Duration::from_secs(10),
        "a2 -> c1 TCP 5432 to be dropped after `weftctl apply`",
        || {
            took = applied.elapsed();
            !connects(&lab, "a2", c1, 5432, probe)
        },
    );
    assert!(
        closed.is_ok(),
        "a2 -> c1 TCP 5432 still connects 10 s after `weftctl apply` (policy not enforced)"
    );
    eprintln!(
        "policy enforced on c1: the first probe dropped was sent {took:?} after `weftctl apply` returned"
    );
    assert!(
        took <= BUDGET,
        "policy took {took:?} to be enforced on c1 after `weftctl apply` returned (budget {BUDGET:?})"
    );

    let check_policy = |lab: &Lab, when: &str| {
        assert!(
            connects(lab, "a1", c1, 5432, Duration::from_secs(2)),
            "{when}: a1 (role=web) -> c1 (role=db) TCP 5432 over IPv4 must connect"
        );
        assert!(
            connects(lab, "a1", c1_6, 5432, Duration::from_secs(2)),
            "{when}: a1 (role=web) -> c1 (role=db) TCP 5432 over IPv6 must connect"
        );
        assert!(
            !connects(lab, "a2", c1, 5432, Duration::from_secs(1)),
            "{when}: a2 (unlabelled) -> c1 TCP 5432 over IPv4 must be dropped"
        );
        assert!(
            !connects(lab, "a2", c1_6, 5432, Duration::from_secs(1)),
            "{when}: a2 (unlabelled) -> c1 TCP 5432 over IPv6 must be dropped"
        );
        assert!(
            !connects(lab, "a1", c1, 22, Duration::from_secs(1)),
            "{when}: a1 -> c1 TCP 22 is explicitly denied and must be dropped"
        );
        assert!(
            !lab.ping_once("a1", c1, 500),
            "{when}: a1 -> c1 ICMP is not allowed and must be dropped"
        );
        assert!(
            lab.ping_once("a1", b1, 1000) && lab.ping_once("b1", a1, 1000),
            "{when}: a1 <-> b1 ping must still work (neither is governed)"
        );
    };
    check_policy(&lab, "after apply");

    // The drops are counted on c1.
    lab.wait_until(
        Duration::from_secs(5),
        "c1's agent to log policy counters with default-denied and denied drops",
        || counter(&lab, "c1", "default_denied") > 0 && counter(&lab, "c1", "denied") > 0,
    );
    eprintln!("c1 policy counters: {:?}", counters(&lab, "c1"));

    // Controller down, c1's agent restarted: same enforcement.
    lab.kill_controller(Signal::SIGKILL);
    lab.kill_agent("c1", Signal::SIGKILL);
    lab.wait_until(
        Duration::from_secs(5),
        "c1's interface to vanish with its agent",
        || lab.iface_addrs("c1").is_empty(),
    );
    let started = lab.start_agent("c1");
    lab.wait_until(
        Duration::from_secs(30),
        "a1 -> c1 TCP 5432 to connect again after c1's headless restart",
        || connects(&lab, "a1", c1, 5432, Duration::from_millis(500)),
    );
    eprintln!(
        "a1 -> c1 TCP 5432 connects again {:?} after c1's agent was started",
        started.elapsed()
    );
    check_policy(&lab, "controller down, after c1's agent restart");
    // The restarted agent's counters start at 0; it counted the drops of
    // `check_policy` again.
    lab.wait_until(
        Duration::from_secs(5),
        "c1's restarted agent to log its drops",
        || counter(&lab, "c1", "default_denied") > 0 && counter(&lab, "c1", "denied") > 0,
    );
    eprintln!(
        "c1 policy counters after restart: {:?}",
        counters(&lab, "c1")
    );
}
