//! wg-quick configuration for an external peer, from the `NodeConfig` the
//! controller computes for it. The controller never holds the peer's private
//! key, so the `PrivateKey` line is a placeholder the operator fills in.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use weft_dataplane_core::Key;
use weft_proto::pb;

/// Placeholder written instead of the private key.
pub(crate) const PRIVATE_KEY_PLACEHOLDER: &str = "<PRIVATE KEY>";

/// Renders a wg-quick config. `site` and `endpoint` come from the external
/// peer object; its listen port is taken from the port of `endpoint`.
pub(crate) fn render(site: &str, endpoint: &str, cfg: &pb::NodeConfig) -> Result<String> {
    let mut out = format!(
        "# Weft external peer {:?} (site {site}), revision {}\n[Interface]\nPrivateKey = {PRIVATE_KEY_PLACEHOLDER}\n",
        cfg.node_name, cfg.revision
    );
    if !cfg.addresses.is_empty() {
        out.push_str(&format!("Address = {}\n", cfg.addresses.join(", ")));
    }
    if let Ok(addr) = endpoint.parse::<SocketAddr>() {
        out.push_str(&format!("ListenPort = {}\n", addr.port()));
    }
    if cfg.mtu != 0 {
        out.push_str(&format!("MTU = {}\n", cfg.mtu));
    }
    for peer in &cfg.peers {
        let key = Key::from_slice(&peer.public_key).with_context(|| {
            format!(
                "controller sent an invalid public key for peer {:?}",
                peer.name
            )
        })?;
        out.push_str("\n[Peer]\n");
        if !peer.name.is_empty() {
            out.push_str(&format!("# {}\n", peer.name));
        }
        out.push_str(&format!("PublicKey = {key}\n"));
        if !peer.endpoint.is_empty() {
            out.push_str(&format!("Endpoint = {}\n", peer.endpoint));
        }
        if !peer.allowed_ips.is_empty() {
            out.push_str(&format!("AllowedIPs = {}\n", peer.allowed_ips.join(", ")));
        }
        if peer.persistent_keepalive != 0 {
            out.push_str(&format!(
                "PersistentKeepalive = {}\n",
                peer.persistent_keepalive
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::NodeConfig {
        pb::NodeConfig {
            revision: 12,
            node_id: "x1".into(),
            node_name: "x1".into(),
            addresses: vec!["100.64.0.9/10".into(), "fd7e:1::9/64".into()],
            mtu: 1420,
            policy: None,
            routes: vec![],
            forwarding: false,
            hosted: vec![],
            peers: vec![
                pb::PeerConfig {
                    name: "a1".into(),
                    public_key: vec![1; 32],
                    endpoint: "198.19.1.11:51820".into(),
                    allowed_ips: vec!["100.64.0.1/32".into(), "fd7e:1::1/128".into()],
                    persistent_keepalive: 25,
                    ..Default::default()
                },
                pb::PeerConfig {
                    name: "b1".into(),
                    public_key: vec![2; 32],
                    endpoint: String::new(),
                    allowed_ips: vec!["100.64.0.2/32".into()],
                    persistent_keepalive: 0,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn renders_interface_and_every_peer() {
        let out = render("a", "198.51.100.7:51821", &sample()).expect("sample config renders");
        let want = "\
# Weft external peer \"x1\" (site a), revision 12
[Interface]
PrivateKey = <PRIVATE KEY>
Address = 100.64.0.9/10, fd7e:1::9/64
ListenPort = 51821
MTU = 1420

[Peer]
# a1
PublicKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=
Endpoint = 198.19.1.11:51820
AllowedIPs = 100.64.0.1/32, fd7e:1::1/128
PersistentKeepalive = 25

[Peer]
# b1
PublicKey = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=
AllowedIPs = 100.64.0.2/32
";
        assert_eq!(out, want);
    }

    #[test]
    fn omits_listen_port_without_an_endpoint_and_mtu_when_unset() {
        let mut cfg = sample();
        cfg.mtu = 0;
        let out = render("a", "", &cfg).expect("sample config renders");
        assert!(
            !out.contains("ListenPort"),
            "no endpoint means no ListenPort:\n{out}"
        );
        assert!(!out.contains("MTU"), "mtu 0 means no MTU line:\n{out}");
    }

    #[test]
    fn ipv6_endpoint_gives_its_port() {
        let out = render("a", "[2001:db8::7]:4500", &sample()).expect("sample config renders");
        assert!(
            out.contains("\nListenPort = 4500\n"),
            "expected ListenPort 4500:\n{out}"
        );
    }

    #[test]
    fn invalid_peer_key_is_an_error_naming_the_peer() {
        let mut cfg = sample();
        cfg.peers[1].public_key = vec![0; 5];
        let err = render("a", "", &cfg).expect_err("a 5-byte key must be refused");
        assert!(
            format!("{err:#}").contains("\"b1\""),
            "error should name peer b1: {err:#}"
        );
    }
}
