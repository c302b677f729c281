//! One `weft-agent wg` tunnel with 60 peers: 6 real ones (each its own
//! namespace and daemon) and 54 that never answer. Traffic to and from the
//! real ones, at the same time, reaches the right peer and arrives whole;
//! packets for the silent peers (handshakes to nowhere) disturb nothing;
//! a peer using another peer's address as source is dropped; `wg show`
//! lists every peer with the right counters.

use std::fs;
use std::thread;

use rand::RngCore as _;
use weft_tests::wgnet::{WgNet, keypair};

fn netns_ip(ns: &str, args: &str) {
    weft_tests::netns::ip(ns, args).unwrap_or_else(|e| panic!("ip -n {ns} {args}: {e:#}"));
}

const REAL: usize = 6;
const SILENT: usize = 54;

#[test]
fn sixty_peers_on_one_tunnel() {
    if weft_tests::skip_unless_root("tunnel_many_peers") {
        return;
    }
    let mut net = WgNet::star(REAL, 1420).unwrap_or_else(|e| panic!("building the star: {e:#}"));
    let hub = net.hub.clone();

    // Silent peers: allowed IPs 100.65.0.x, endpoints nobody owns on the
    // bridge's subnet (198.18.0.200+) or off-link (198.19.250.x).
    let mut silent = Vec::new();
    let mut args: Vec<String> = Vec::new();
    for i in 0..SILENT {
        let (_, public) = keypair().unwrap_or_else(|e| panic!("{e:#}"));
        let endpoint = if i % 2 == 0 {
            format!("198.18.0.{}:51820", 200 + i / 2)
        } else {
            format!("198.19.250.{i}:51820")
        };
        args.extend([
            "peer".to_owned(),
            public.clone(),
            "endpoint".to_owned(),
            endpoint,
            "allowed-ips".to_owned(),
            format!("100.65.0.{}/32", i + 1),
        ]);
        silent.push(public);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    net.wg_set(&hub, &refs)
        .unwrap_or_else(|e| panic!("adding silent peers: {e:#}"));

    // Traffic towards the silent peers while the real ones work.
    let noise = net
        .spawn(
            &hub,
            30,
            &[
                "sh",
                "-c",
                "for i in $(seq 1 54); do ping -n -q -c 3 -i 0.2 -W 1 100.65.0.$i & done; wait",
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));

    // Every real spoke <-> hub, both IP versions, concurrently.
    thread::scope(|s| {
        for spoke in &net.spokes {
            let (net, hub) = (&net, &hub);
            s.spawn(move || {
                for (from, dst) in [
                    (spoke, hub.overlay4.to_string()),
                    (spoke, hub.overlay6.to_string()),
                    (hub, spoke.overlay4.to_string()),
                    (hub, spoke.overlay6.to_string()),
                ] {
                    let out = net
                        .sh(from, &format!("ping -n -q -c 20 -i 0.01 -W 2 {dst}"))
                        .unwrap_or_else(|e| panic!("{e:#}"));
                    let text = String::from_utf8_lossy(&out.stdout);
                    assert!(
                        text.contains(" 0% packet loss"),
                        "{} -> {dst}: {text}",
                        from.ns
                    );
                }
            });
        }
    });

    // Three spokes upload 8 MB each at the same time.
    let mut data = vec![0u8; 8 << 20];
    rand::rng().fill_bytes(&mut data);
    let file = net.dir().join("upload");
    fs::write(&file, &data).unwrap_or_else(|e| panic!("writing test data: {e}"));
    thread::scope(|s| {
        for (i, spoke) in net.spokes.iter().take(3).enumerate() {
            let (net, file, data, hub) = (&net, &file, &data, &hub);
            s.spawn(move || {
                let port = 5100 + u16::try_from(i).unwrap_or(0);
                let got = net
                    .tcp_transfer(spoke, hub, &hub.overlay4.to_string(), port, file)
                    .unwrap_or_else(|e| panic!("upload from {}: {e:#}", spoke.ns));
                assert!(got == *data, "upload from {} differs", spoke.ns);
            });
        }
    });
    drop(noise);
    assert!(net.daemons_alive(), "a tunnel daemon exited");

    // Cryptokey routing: spoke 0 sending with spoke 1's address as source
    // is dropped by the hub (the source must route back to the sender).
    let (s0, s1) = (&net.spokes[0], &net.spokes[1]);
    netns_ip(
        &s0.ns,
        &format!("addr add {}/32 dev {}", s1.overlay4, s0.ifname),
    );
    let hub4 = hub.overlay4.to_string();
    let s1_addr = s1.overlay4.to_string();
    assert!(
        !net.ping(s0, &hub4, &["-c", "3", "-I", &s1_addr])
            .unwrap_or(true),
        "the hub answered a packet from {} carrying {}'s source address",
        s0.ns,
        s1.ns
    );
    assert!(
        net.ping(s0, &hub4, &[]).unwrap_or(false),
        "{} lost its own traffic",
        s0.ns
    );

    let stats = net.peer_stats(&hub).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(stats.len(), REAL + SILENT, "peers in wg show: {stats:?}");
    for spoke in &net.spokes {
        let p = stats
            .iter()
            .find(|p| p.0 == spoke.public_key)
            .unwrap_or_else(|| panic!("{} missing from wg show", spoke.ns));
        assert!(
            p.1 > 0 && p.2 > 0 && p.3 > 0,
            "real peer {} without traffic: {p:?}",
            spoke.ns
        );
    }
    for key in &silent {
        let p = stats
            .iter()
            .find(|p| &p.0 == key)
            .unwrap_or_else(|| panic!("silent peer {key} missing from wg show"));
        assert_eq!(p.1, 0, "silent peer {key} has received bytes: {p:?}");
        assert_eq!(p.3, 0, "silent peer {key} has a handshake: {p:?}");
    }
}
