//! MTU handling of `weft-agent wg`: inner packets exactly at and just below
//! the tunnel MTU pass in both IP versions; bigger ones are fragmented by
//! the sender's kernel (IPv4 without DF) and still arrive; with a tunnel
//! MTU above what the underlay carries, the outer datagrams get fragmented
//! and traffic (pings and a TCP transfer) still flows.

use std::fs;

use rand::RngCore as _;
use weft_tests::wgnet::WgNet;

/// ICMP payload sizes giving an IP packet of `total` bytes.
fn v4_payload(total: u16) -> String {
    (total - 28).to_string()
}

fn v6_payload(total: u16) -> String {
    (total - 48).to_string()
}

#[test]
fn packets_at_around_and_above_the_mtu() {
    if weft_tests::skip_unless_root("tunnel_mtu") {
        return;
    }
    let mut net =
        WgNet::star(1, 1420).unwrap_or_else(|e| panic!("building the tunnel pair: {e:#}"));
    let (hub, spoke) = (net.hub.clone(), net.spokes[0].clone());
    let (h4, h6) = (hub.overlay4.to_string(), hub.overlay6.to_string());

    for total in [1420u16, 1419, 1281, 100] {
        assert!(
            net.ping(&spoke, &h4, &["-M", "do", "-s", &v4_payload(total)])
                .unwrap_or(false),
            "IPv4 packet of {total} bytes (MTU 1420) did not pass"
        );
        assert!(
            net.ping(&spoke, &h6, &["-M", "do", "-s", &v6_payload(total)])
                .unwrap_or(false),
            "IPv6 packet of {total} bytes (MTU 1420) did not pass"
        );
    }
    // One byte over with DF: refused locally, never sent.
    assert!(
        !net.ping(&spoke, &h4, &["-M", "do", "-s", &v4_payload(1421)])
            .unwrap_or(true),
        "a DF packet above the interface MTU was answered"
    );
    // Above the MTU without DF: IP fragments cross the tunnel.
    for total in [1421u16, 3000, 9000] {
        assert!(
            net.ping(&spoke, &h4, &["-M", "dont", "-s", &v4_payload(total)])
                .unwrap_or(false),
            "fragmented IPv4 packet of {total} bytes did not pass"
        );
        assert!(
            net.ping(&spoke, &h6, &["-s", &v6_payload(total)])
                .unwrap_or(false),
            "fragmented IPv6 packet of {total} bytes did not pass"
        );
    }

    // A tunnel MTU of 1500 over a 1500-byte underlay: full-size inner
    // packets need outer fragmentation (and no UDP GSO for them).
    net.set_mtu(1500).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        net.ping(&spoke, &h4, &["-M", "do", "-s", &v4_payload(1500)])
            .unwrap_or(false),
        "1500-byte IPv4 packet over a 1500-byte underlay did not pass"
    );
    assert!(
        net.ping(&spoke, &h6, &["-M", "do", "-s", &v6_payload(1500)])
            .unwrap_or(false),
        "1500-byte IPv6 packet over a 1500-byte underlay did not pass"
    );
    let mut data = vec![0u8; 16 << 20];
    rand::rng().fill_bytes(&mut data);
    let file = net.dir().join("mtu1500");
    fs::write(&file, &data).unwrap_or_else(|e| panic!("writing test data: {e}"));
    let got = net
        .tcp_transfer(&spoke, &hub, &h4, 5003, &file)
        .unwrap_or_else(|e| panic!("TCP transfer at MTU 1500: {e:#}"));
    assert!(
        got == data,
        "TCP data at MTU 1500 differs ({} bytes received)",
        got.len()
    );
    assert!(net.daemons_alive(), "a tunnel daemon exited");
}
