//! The WireGuard cross-platform userspace API (UAPI) protocol, as `wg`
//! speaks it over a daemon's unix socket: parsing a `get=1` / `set=1`
//! request into a validated [`Request`], and writing a [`SetRequest`]
//! back as request text. Pure; the agent's tunnel serves the socket and
//! applies the requests.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::Key;

/// A parsed UAPI request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get,
    Set(SetRequest),
}

/// A validated `set=1` request; applying it cannot fail half-way (except
/// for binding the listen port, which is done first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `Some(None)`: remove the private key (all-zero key).
    pub private_key: Option<Option<Key>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerSet>,
}

/// The changes to one peer in a `set` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    pub public_key: Key,
    pub remove: bool,
    pub update_only: bool,
    /// `Some(None)`: remove the preshared key.
    pub preshared_key: Option<Option<Key>>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)`: keepalive off.
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

impl PeerSet {
    /// A peer section that changes nothing yet.
    pub fn new(public_key: Key) -> Self {
        PeerSet {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("invalid UAPI request: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> UapiError {
    UapiError::Invalid(msg.into())
}

/// Parses one request: its lines, without the blank line that ends it.
pub fn parse_request(text: &str) -> Result<Request, UapiError> {
    let mut lines = text.lines();
    match lines.next() {
        Some("get=1") => match lines.next() {
            None => Ok(Request::Get),
            Some(l) => Err(invalid(format!("unexpected line after get=1: {l:?}"))),
        },
        Some("set=1") => parse_set(lines).map(Request::Set),
        Some(l) => Err(invalid(format!("unknown operation {l:?}"))),
        None => Err(invalid("empty request")),
    }
}

fn parse_set<'a>(lines: impl Iterator<Item = &'a str>) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    for line in lines {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| invalid(format!("line without '=': {line:?}")))?;
        if key == "public_key" {
            req.peers.push(PeerSet::new(parse_key(key, value)?));
            continue;
        }
        match req.peers.last_mut() {
            None => match key {
                "private_key" => {
                    let k = parse_key(key, value)?;
                    req.private_key = Some((!k.is_zero()).then_some(k));
                }
                "listen_port" => req.listen_port = Some(parse_num(key, value)?),
                "fwmark" => req.fwmark = Some(parse_num(key, value)?),
                "replace_peers" => req.replace_peers = parse_true(key, value)?,
                _ => return Err(invalid(format!("unknown interface key {key:?}"))),
            },
            Some(peer) => match key {
                "remove" => peer.remove = parse_true(key, value)?,
                "update_only" => peer.update_only = parse_true(key, value)?,
                "preshared_key" => {
                    let k = parse_key(key, value)?;
                    peer.preshared_key = Some((!k.is_zero()).then_some(k));
                }
                "endpoint" => {
                    peer.endpoint = Some(
                        value
                            .parse()
                            .map_err(|_| invalid(format!("bad endpoint {value:?}")))?,
                    );
                }
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive = Some(parse_num(key, value)?);
                }
                "replace_allowed_ips" => peer.replace_allowed_ips = parse_true(key, value)?,
                "allowed_ip" => peer.allowed_ips.push(parse_net(value)?),
                "protocol_version" => {
                    if value != "1" {
                        return Err(invalid(format!("unsupported protocol_version {value:?}")));
                    }
                }
                _ => return Err(invalid(format!("unknown peer key {key:?}"))),
            },
        }
    }
    Ok(req)
}

fn parse_key(key: &str, value: &str) -> Result<Key, UapiError> {
    if value.len() != 64 {
        return Err(invalid(format!("{key}: want 64 hex digits")));
    }
    Key::from_hex(value).map_err(|e| invalid(format!("{key}: {e}")))
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("{key}: not a number: {value:?}")));
    }
    value
        .parse()
        .map_err(|_| invalid(format!("{key}: out of range: {value:?}")))
}

fn parse_true(key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(format!("{key}: want true or false, got {value:?}"))),
    }
}

fn parse_net(value: &str) -> Result<IpNet, UapiError> {
    let bad = || invalid(format!("bad allowed_ip {value:?}"));
    let net = if value.contains('/') {
        value.parse::<IpNet>().map_err(|_| bad())?
    } else {
        IpNet::from(value.parse::<IpAddr>().map_err(|_| bad())?)
    };
    Ok(net.trunc())
}

impl SetRequest {
    /// The request as UAPI text (`set=1` and its lines, without the blank
    /// line that ends it): [`parse_request`] reads it back to an equal
    /// request.
    #[must_use]
    pub fn to_uapi(&self) -> String {
        let mut s = String::from("set=1\n");
        let hex = |k: Option<&Key>| k.map_or_else(|| "0".repeat(64), Key::to_hex);
        // Writing to a String cannot fail.
        if let Some(key) = &self.private_key {
            let _ = writeln!(s, "private_key={}", hex(key.as_ref()));
        }
        if let Some(port) = self.listen_port {
            let _ = writeln!(s, "listen_port={port}");
        }
        if let Some(mark) = self.fwmark {
            let _ = writeln!(s, "fwmark={mark}");
        }
        if self.replace_peers {
            s.push_str("replace_peers=true\n");
        }
        for peer in &self.peers {
            let _ = writeln!(s, "public_key={}", peer.public_key.to_hex());
            if peer.remove {
                s.push_str("remove=true\n");
            }
            if peer.update_only {
                s.push_str("update_only=true\n");
            }
            if let Some(psk) = &peer.preshared_key {
                let _ = writeln!(s, "preshared_key={}", hex(psk.as_ref()));
            }
            if let Some(endpoint) = peer.endpoint {
                let _ = writeln!(s, "endpoint={endpoint}");
            }
            if let Some(secs) = peer.persistent_keepalive {
                let _ = writeln!(s, "persistent_keepalive_interval={secs}");
            }
            if peer.replace_allowed_ips {
                s.push_str("replace_allowed_ips=true\n");
            }
            for net in &peer.allowed_ips {
                let _ = writeln!(s, "allowed_ip={net}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_key() -> impl Strategy<Value = Key> {
        any::<[u8; 32]>().prop_map(Key)
    }

    fn any_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
                IpNet::new(IpAddr::from(a.to_be_bytes()), l)
                    .expect("length <= 32")
                    .trunc()
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, l)| {
                IpNet::new(IpAddr::from(a.to_be_bytes()), l)
                    .expect("length <= 128")
                    .trunc()
            }),
        ]
    }

    fn any_peer() -> impl Strategy<Value = PeerSet> {
        (
            any_key(),
            any::<(bool, bool, bool)>(),
            proptest::option::of(proptest::option::of(any_key())),
            // Flow info and scope ids are not part of the text form.
            proptest::option::of(any::<(IpAddr, u16)>().prop_map(SocketAddr::from)),
            proptest::option::of(any::<u16>()),
            proptest::collection::vec(any_net(), 0..4),
        )
            .prop_map(|(key, (remove, update_only, replace), psk, ep, ka, ips)| {
                PeerSet {
                    remove,
                    update_only,
                    // An all-zero preshared key means "none".
                    preshared_key: psk.map(|k| k.filter(|k| !k.is_zero())),
                    endpoint: ep,
                    persistent_keepalive: ka,
                    replace_allowed_ips: replace,
                    allowed_ips: ips,
                    ..PeerSet::new(key)
                }
            })
    }

    proptest! {
        #[test]
        fn set_requests_round_trip_through_text(
            private_key in proptest::option::of(proptest::option::of(any_key())),
            listen_port in proptest::option::of(any::<u16>()),
            fwmark in proptest::option::of(any::<u32>()),
            replace_peers in any::<bool>(),
            peers in proptest::collection::vec(any_peer(), 0..4),
        ) {
            let req = SetRequest {
                private_key: private_key.map(|k| k.filter(|k| !k.is_zero())),
                listen_port,
                fwmark,
                replace_peers,
                peers,
            };
            let text = req.to_uapi();
            prop_assert_eq!(parse_request(&text), Ok(Request::Set(req)), "{}", text);
        }
    }

    #[test]
    fn get_takes_no_arguments() {
        assert_eq!(parse_request("get=1"), Ok(Request::Get));
        assert!(parse_request("get=1\nfwmark=1").is_err());
        assert!(parse_request("").is_err());
    }
}
