//! The controller dies (kill -9): the data plane keeps forwarding without a
//! single lost ping for 60 s; after a restart the controller still knows
//! all nodes with the same addresses, and the agents reconnect.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use weft_tests::{Lab, PingResult, Signal, process};

#[test]
fn controller_down() {
    if weft_tests::skip_unless_root("controller_down") {
        return;
    }
    let mut lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(2)
        .build();
    let before: BTreeMap<String, (Vec<String>, String, u64)> = lab
        .nodes()
        .into_iter()
        .map(|n| {
            (
                n.name.clone(),
                (
                    n.addresses.clone(),
                    n.public_key.clone(),
                    n.applied_revision,
                ),
            )
        })
        .collect();
    assert_eq!(
        before.len(),
        6,
        "expected 6 nodes before the kill: {before:?}"
    );

    let pairs = [("a1", "c2"), ("b1", "a2")];
    let targets: Vec<(&str, IpAddr)> = pairs
        .iter()
        .map(|(from, to)| (*from, IpAddr::V4(lab.node_addresses(to).0)))
        .collect();
    for (from, to) in &targets {
        lab.wait_until(
            Duration::from_secs(20),
            &format!("{from} to ping {to}"),
            || lab.ping_once(from, *to, 500),
        );
    }

    let status = lab.kill_controller(Signal::SIGKILL);
    eprintln!("controller killed: {status:?}");

    // 300 pings 0.2 s apart = 60 s, both pairs at once.
    let children: Vec<_> = targets
        .iter()
        .map(|(from, to)| {
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lab.ns(from),
                    "ping",
                    "-n",
                    "-q",
                    "-c",
                    "300",
                ])
                .args(["-i", "0.2", "-W", "1", "-w", "75", &to.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawning ping");
            ((*from, *to), child)
        })
        .collect();
    for ((from, to), child) in children {
        let out = child.wait_with_output().expect("waiting for ping");
        let r = PingResult::parse(&String::from_utf8_lossy(&out.stdout));
        eprintln!("{from} -> {to} with the controller down: {r:?}");
        assert_eq!(
            (r.transmitted, r.received),
            (300, 300),
            "{from} -> {to}: expected 0% loss over 60 s with the controller down, got {}/{} ({}% loss)",
            r.received,
            r.transmitted,
            r.loss
        );
    }

    let restart_unix = process::unix_now();
    lab.start_controller();
    let after: BTreeMap<String, (Vec<String>, String)> = lab
        .nodes()
        .into_iter()
        .map(|n| (n.name.clone(), (n.addresses.clone(), n.public_key.clone())))
        .collect();
    let before_ids: BTreeMap<String, (Vec<String>, String)> = before
        .iter()
        .map(|(k, (a, p, _))| (k.clone(), (a.clone(), p.clone())))
        .collect();
    assert_eq!(
        after, before_ids,
        "after a restart the controller should list the same 6 nodes with the same addresses and keys"
    );

    let mut last = String::new();
    let caught_up = weft_tests::try_wait_until(
        Duration::from_secs(30),
        "every agent to reconnect (connected, applied_revision >= before, a report after the restart)",
        || {
            let Ok(nodes) = lab.try_nodes() else {
                return false;
            };
            let lagging: Vec<String> = nodes
                .iter()
                .filter(|n| {
                    let rev_before = before.get(&n.name).map_or(0, |b| b.2);
                    !(n.connected
                        && n.applied_revision >= rev_before
                        && n.last_report_unix >= restart_unix)
                })
                .map(|n| {
                    format!(
                        "{} (connected {}, applied_revision {}, last_report_unix {})",
                        n.name, n.connected, n.applied_revision, n.last_report_unix
                    )
                })
                .collect();
            last = lagging.join("; ");
            lagging.is_empty() && nodes.len() == 6
        },
    );
    if let Err(e) = caught_up {
        panic!("{e:#}; lagging: {last} (restart at unix {restart_unix})");
    }

    // And the mesh still works end to end.
    for (from, to) in &targets {
        let r = lab.ping(from, *to, 3);
        assert!(
            r.reachable(),
            "{from} -> {to} after the controller restart: {r:?}"
        );
    }
}
