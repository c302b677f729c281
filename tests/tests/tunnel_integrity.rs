//! Bulk transfer through `weft-agent wg` (TCP segmentation offload on the
//! TUN device, UDP GSO/GRO and coalescing on the way): every byte arrives,
//! in order, over IPv4 and IPv6 inside the tunnel; a UDP stream arrives
//! without reordering.

use std::fs;

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use weft_tests::wgnet::WgNet;

const MB: usize = 1 << 20;

fn random_file(net: &WgNet, name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    let path = net.dir().join(name);
    fs::write(&path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let digest = Sha256::digest(&data).to_vec();
    (path, digest)
}

#[test]
fn bulk_tcp_and_udp_arrive_whole_and_in_order() {
    if weft_tests::skip_unless_root("tunnel_integrity") {
        return;
    }
    let mut net =
        WgNet::star(1, 1420).unwrap_or_else(|e| panic!("building the tunnel pair: {e:#}"));
    let (hub, spoke) = (net.hub.clone(), net.spokes[0].clone());

    // 128 MB spoke -> hub over IPv4 inside the tunnel.
    let (file, want) = random_file(&net, "bulk4", 128 * MB);
    let got = net
        .tcp_transfer(&spoke, &hub, &hub.overlay4.to_string(), 5001, &file)
        .unwrap_or_else(|e| panic!("IPv4 transfer: {e:#}"));
    assert_eq!(got.len(), 128 * MB, "IPv4: received {} bytes", got.len());
    assert_eq!(Sha256::digest(&got).to_vec(), want, "IPv4: SHA-256 differs");

    // 32 MB hub -> spoke over IPv6 inside the tunnel.
    let (file, want) = random_file(&net, "bulk6", 32 * MB);
    let got = net
        .tcp_transfer(&hub, &spoke, &spoke.overlay6.to_string(), 5002, &file)
        .unwrap_or_else(|e| panic!("IPv6 transfer: {e:#}"));
    assert_eq!(got.len(), 32 * MB, "IPv6: received {} bytes", got.len());
    assert_eq!(Sha256::digest(&got).to_vec(), want, "IPv6: SHA-256 differs");

    // UDP: iperf3 numbers its datagrams; the server counts any that come
    // out of order.
    let server = net
        .spawn(&hub, 60, &["iperf3", "-s", "-1", "-p", "5201"])
        .unwrap_or_else(|e| panic!("iperf3 server: {e:#}"));
    weft_tests::try_wait_until(std::time::Duration::from_secs(10), "iperf3 server", || {
        net.sh(&hub, "ss -Hltn 'sport = :5201' | grep -q .")
            .is_ok_and(|o| o.status.success())
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let out = net
        .sh(
            &spoke,
            &format!(
                "timeout 30 iperf3 -u -c {} -p 5201 -b 300M -l 1372 -t 3 -J",
                hub.overlay4
            ),
        )
        .unwrap_or_else(|e| panic!("iperf3 client: {e:#}"));
    drop(server);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iperf3 -u failed: {text}");
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("iperf3 JSON ({e}): {text}"));
    let sum = &json["end"]["sum"];
    let packets = sum["packets"].as_u64().unwrap_or(0);
    let lost = sum["lost_packets"].as_u64().unwrap_or(u64::MAX);
    let out_of_order = json["end"]["sum"]["out_of_order"]
        .as_u64()
        .or_else(|| json["end"]["streams"][0]["udp"]["out_of_order"].as_u64())
        .unwrap_or_else(|| panic!("no out_of_order count in iperf3 output: {sum}"));
    assert!(packets > 10_000, "too few UDP datagrams sent: {sum}");
    assert_eq!(out_of_order, 0, "UDP datagrams reordered: {sum}");
    assert!(
        lost * 20 < packets,
        "more than 5 % of UDP datagrams lost: {sum}"
    );
    assert!(net.daemons_alive(), "a tunnel daemon exited");

    // The transfer counters saw it all (WireGuard adds 32 bytes a packet).
    let stats = net.peer_stats(&hub).unwrap_or_else(|e| panic!("{e:#}"));
    let (_, rx, tx, handshake) = stats
        .iter()
        .find(|p| p.0 == spoke.public_key)
        .unwrap_or_else(|| panic!("spoke missing from wg show: {stats:?}"))
        .clone();
    assert!(handshake > 0, "no handshake reported");
    assert!(rx > 128 * MB as u64, "hub rx counter {rx} below 128 MB");
    assert!(tx > 32 * MB as u64, "hub tx counter {tx} below 32 MB");
}
