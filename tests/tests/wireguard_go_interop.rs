//! Interop with an independent WireGuard: unmodified wireguard-go on x1
//! (site a's LAN, 198.19.1.21), registered with `weftctl peer add` and
//! configured from `weftctl peer config`, handshakes with and pings every
//! node, and every node pings it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use weft_tests::Lab;

/// wg-quick keys that `wg setconf` does not understand.
const WG_QUICK_ONLY: [&str; 9] = [
    "Address",
    "DNS",
    "MTU",
    "Table",
    "PreUp",
    "PostUp",
    "PreDown",
    "PostDown",
    "SaveConfig",
];

#[test]
fn wireguard_go_interop() {
    if weft_tests::skip_unless_root("wireguard_go_interop") {
        return;
    }
    let wg_go = Path::new("/usr/bin/wireguard-go");
    assert!(
        wg_go.is_file(),
        "{} missing: run scripts/setup.sh",
        wg_go.display()
    );
    let mut lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(2)
        .build();
    let x1 = lab.add_host("a", "x1", 21);
    let iface = format!("wf{}x1", &lab.prefix()[1..]);

    // Keys made by wg itself; the private key never goes to the controller.
    let private = stdout(&lab, &x1, &["wg", "genkey"]);
    let public = {
        let out = lab.sh(&x1, &format!("echo '{private}' | wg pubkey"));
        assert!(out.status.success(), "wg pubkey failed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };

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
    let added: serde_json::Value = serde_json::from_str(&added).unwrap_or_else(|e| {
        panic!("`weftctl -o json peer add` printed unexpected JSON ({e}): {added}")
    });
    let addrs: Vec<IpAddr> = added["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.split('/').next()?.parse().ok())
        .collect();
    let x1_v4: Ipv4Addr = addrs
        .iter()
        .find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .unwrap_or_else(|| panic!("peer add gave no IPv4 address: {added}"));
    let x1_v6: Option<Ipv6Addr> = addrs.iter().find_map(|a| match a {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });

    let config = lab.weftctl_ok(&["peer", "config", "x1"]);
    assert!(
        config.contains("<PRIVATE KEY>"),
        "`weftctl peer config x1` should hold a `PrivateKey = <PRIVATE KEY>` placeholder:\n{config}"
    );
    assert!(
        config.contains("Address"),
        "`weftctl peer config x1` has no Address line:\n{config}"
    );
    let peer_sections = config.matches("[Peer]").count();
    assert_eq!(
        peer_sections, 6,
        "expected one [Peer] per node (6):\n{config}"
    );
    let has_listen_port = config
        .lines()
        .any(|l| l.trim_start().starts_with("ListenPort"));
    let wg_conf: String = config
        .replace("<PRIVATE KEY>", &private)
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or_default().trim();
            !WG_QUICK_ONLY.contains(&key)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let conf_path = lab.dir().join("x1.conf");
    std::fs::write(&conf_path, &wg_conf).expect("writing x1.conf");

    // Unmodified wireguard-go in the foreground.
    lab.spawn("wireguard-go-x1", &x1, wg_go, &["-f".into(), iface.clone()])
        .expect("starting wireguard-go");
    lab.wait_until(
        Duration::from_secs(10),
        "wireguard-go's UAPI socket to answer `wg show`",
        || lab.exec(&x1, &["wg", "show", &iface]).status.success(),
    );
    run(
        &lab,
        &x1,
        &["wg", "setconf", &iface, &conf_path.display().to_string()],
    );
    if !has_listen_port {
        run(&lab, &x1, &["wg", "set", &iface, "listen-port", "51820"]);
    }
    run(
        &lab,
        &x1,
        &["ip", "addr", "add", &format!("{x1_v4}/32"), "dev", &iface],
    );
    if let Some(v6) = x1_v6 {
        run(
            &lab,
            &x1,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                &iface,
                "nodad",
            ],
        );
    }
    run(&lab, &x1, &["ip", "link", "set", &iface, "up"]);
    run(
        &lab,
        &x1,
        &["ip", "route", "add", "100.64.0.0/10", "dev", &iface],
    );

    let nodes = lab.nodes();
    assert_eq!(nodes.len(), 6, "expected 6 nodes");
    // Every node learns x1 from the controller.
    for n in &nodes {
        lab.wait_until(
            Duration::from_secs(10),
            &format!("{} to have x1 ({public}) as a WireGuard peer", n.name),
            || lab.wg_peers(&n.name).contains(&public),
        );
    }
    // x1 → every node; the first packet starts the handshake.
    for n in &nodes {
        let ip = IpAddr::V4(n.ipv4().expect("node IPv4"));
        lab.wait_until(
            Duration::from_secs(20),
            &format!("wireguard-go x1 to ping {} at {ip}", n.name),
            || lab.ping_once(&x1, ip, 1000),
        );
    }
    let handshakes = stdout(&lab, &x1, &["wg", "show", &iface, "latest-handshakes"]);
    for n in &nodes {
        let line = handshakes
            .lines()
            .find(|l| l.starts_with(&n.public_key))
            .unwrap_or_else(|| {
                panic!(
                    "x1 has no peer {} ({}):\n{handshakes}",
                    n.name, n.public_key
                )
            });
        let ts: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        assert!(
            ts > 0,
            "x1 never completed a handshake with {}: {line}",
            n.name
        );
    }
    // Every node → x1.
    for n in &nodes {
        let r = lab.ping(&n.name, IpAddr::V4(x1_v4), 3);
        assert!(
            r.reachable(),
            "{} could not ping wireguard-go x1 at {x1_v4}: {r:?}",
            n.name
        );
    }
}

fn stdout(lab: &Lab, ns: &str, cmd: &[&str]) -> String {
    let out = lab.exec(ns, cmd);
    assert!(
        out.status.success(),
        "`{}` in {ns} failed: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn run(lab: &Lab, ns: &str, cmd: &[&str]) {
    stdout(lab, ns, cmd);
}
