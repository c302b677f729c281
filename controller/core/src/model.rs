//! The objects of the network: sites, nodes, external peers, join tokens.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use weft_dataplane_core::Key;
use weft_dataplane_core::config::DEFAULT_MTU;

use crate::error::Error;
use crate::policy::{is_label_key, is_label_value};

/// Network-wide settings, fixed when the network is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    /// IPv4 overlay pool, by default [`DEFAULT_IPV4_POOL`].
    pub ipv4_pool: Ipv4Net,
    /// IPv6 ULA prefix (a /48 chosen at random by the caller); every member
    /// gets prefix + its host index, on-link as the first /64.
    pub ipv6_prefix: Ipv6Net,
    /// Overlay MTU.
    pub mtu: u16,
    /// WireGuard persistent keepalive in seconds, 0 = off.
    pub persistent_keepalive: u16,
    /// Shortest IPv4 workload prefix accepted (a /N with N below it is
    /// refused); absent in stores written before it: [`DEFAULT_MIN_PREFIX_LEN_V4`].
    #[serde(
        default = "default_min_prefix_len_v4",
        skip_serializing_if = "is_default_min_prefix_len_v4"
    )]
    pub min_prefix_len_v4: u8,
    /// Shortest IPv6 workload prefix accepted; absent in stores written
    /// before it: [`DEFAULT_MIN_PREFIX_LEN_V6`].
    #[serde(
        default = "default_min_prefix_len_v6",
        skip_serializing_if = "is_default_min_prefix_len_v6"
    )]
    pub min_prefix_len_v6: u8,
}

/// The default shortest IPv4 workload prefix: a /8.
pub const DEFAULT_MIN_PREFIX_LEN_V4: u8 = 8;

/// The default shortest IPv6 workload prefix: a /32.
pub const DEFAULT_MIN_PREFIX_LEN_V6: u8 = 32;

fn default_min_prefix_len_v4() -> u8 {
    DEFAULT_MIN_PREFIX_LEN_V4
}

fn default_min_prefix_len_v6() -> u8 {
    DEFAULT_MIN_PREFIX_LEN_V6
}

// Defaults are not written, so a store stays readable by a controller
// that predates the fields.
fn is_default_min_prefix_len_v4(len: &u8) -> bool {
    *len == DEFAULT_MIN_PREFIX_LEN_V4
}

fn is_default_min_prefix_len_v6(len: &u8) -> bool {
    *len == DEFAULT_MIN_PREFIX_LEN_V6
}

/// The default IPv4 overlay pool (RFC 6598 shared address space).
pub const DEFAULT_IPV4_POOL: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);

/// The default persistent keepalive, in seconds (survives common NAT timeouts).
pub const DEFAULT_PERSISTENT_KEEPALIVE: u16 = 25;

/// Smallest MTU accepted: the IPv6 minimum.
pub const MIN_MTU: u16 = 1280;

impl NetworkSettings {
    /// Default settings around a caller-chosen IPv6 prefix.
    pub fn with_ipv6_prefix(ipv6_prefix: Ipv6Net) -> Self {
        NetworkSettings {
            ipv4_pool: DEFAULT_IPV4_POOL,
            ipv6_prefix,
            mtu: DEFAULT_MTU,
            persistent_keepalive: DEFAULT_PERSISTENT_KEEPALIVE,
            min_prefix_len_v4: DEFAULT_MIN_PREFIX_LEN_V4,
            min_prefix_len_v6: DEFAULT_MIN_PREFIX_LEN_V6,
        }
    }

    /// The shortest workload prefix accepted in `prefix`'s family.
    pub fn min_prefix_len(&self, prefix: IpNet) -> u8 {
        match prefix {
            IpNet::V4(_) => self.min_prefix_len_v4,
            IpNet::V6(_) => self.min_prefix_len_v6,
        }
    }

    /// Checks that the settings can work.
    pub fn validate(&self) -> Result<(), Error> {
        let v4 = self.ipv4_pool;
        if v4 != v4.trunc() {
            return Err(Error::InvalidSettings(format!(
                "IPv4 pool {v4} has host bits set; did you mean {}?",
                v4.trunc()
            )));
        }
        if v4.prefix_len() > 30 {
            return Err(Error::InvalidSettings(format!(
                "IPv4 pool {v4} is too small; use a /30 or larger"
            )));
        }
        let v6 = self.ipv6_prefix;
        if v6 != v6.trunc() {
            return Err(Error::InvalidSettings(format!(
                "IPv6 prefix {v6} has host bits set; did you mean {}?",
                v6.trunc()
            )));
        }
        if v6.prefix_len() > 64 {
            return Err(Error::InvalidSettings(format!(
                "IPv6 prefix {v6} is too small; use a /64 or larger (a /48 is usual)"
            )));
        }
        check_min_prefix_lens(self.min_prefix_len_v4, self.min_prefix_len_v6)?;
        if self.mtu < MIN_MTU {
            return Err(Error::InvalidSettings(format!(
                "MTU {} is below the IPv6 minimum of {MIN_MTU}",
                self.mtu
            )));
        }
        Ok(())
    }
}

/// Checks minimum workload prefix lengths: IPv4 1 to 32, IPv6 1 to 128
/// (a default route is never accepted anyway).
pub fn check_min_prefix_lens(v4: u8, v6: u8) -> Result<(), Error> {
    if !(1..=32).contains(&v4) {
        return Err(Error::InvalidSettings(format!(
            "minimum IPv4 prefix length {v4} must be between 1 and 32"
        )));
    }
    if !(1..=128).contains(&v6) {
        return Err(Error::InvalidSettings(format!(
            "minimum IPv6 prefix length {v6} must be between 1 and 128"
        )));
    }
    Ok(())
}

/// A location: region, data centre, edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Unique name, a DNS label.
    pub name: String,
    /// When the site was created (unix seconds).
    pub created_unix: u64,
}

/// A machine running `weft-agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique id, chosen by the controller at registration.
    pub id: String,
    /// Unique name (among nodes and external peers), a DNS label.
    pub name: String,
    /// Name of the node's site.
    pub site: String,
    /// WireGuard public key (the private key never leaves the node).
    pub public_key: Key,
    /// Underlay endpoint other members send to, if known.
    pub endpoint: Option<SocketAddr>,
    /// Overlay IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6 address.
    pub ipv6: Ipv6Addr,
    /// When the node registered (unix seconds).
    pub created_unix: u64,
    /// SHA-256 of the node's mTLS client certificate (DER).
    #[serde(with = "hex32")]
    pub cert_fingerprint: [u8; 32],
    /// Labels policy selects on (absent in stores written before labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Workload prefixes the node routes for (containers or VMs behind
    /// it), each with the labels policy selects that workload by (absent
    /// in stores written before workload prefixes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub advertised: BTreeMap<IpNet, Labels>,
    /// When the current client certificate expires (unix seconds); 0 for
    /// a certificate issued before certificates expired (absent in older
    /// stores), accepted until the agent renews it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cert_expires_unix: u64,
    /// The certificate the last renewal was authenticated with: still
    /// accepted until the current one is first used or it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_cert: Option<NodeCert>,
    /// SHA-256 of the public key (SubjectPublicKeyInfo, DER) of the first
    /// registration's certificate signing request: a retried
    /// registration must be signed by the same key (absent in older
    /// stores: no retry).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex32")]
    pub registration_key: Option<[u8; 32]>,
    /// Generation of the node's WireGuard key: bumped by an operator's
    /// rotation request, reached by the agent when it rotates (0, absent,
    /// until the first rotation).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_generation: u64,
    /// Prefixes the node's join token allows its agent to advertise
    /// without an operator's approval (absent in stores written before
    /// grants: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_prefixes: Vec<IpNet>,
    /// Prefixes the agent asked to advertise that were not approved, with
    /// why: never routed until an operator approves them (absent in
    /// stores written before pending prefixes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pending: BTreeMap<IpNet, PendingPrefix>,
}

/// A workload prefix an agent asked for that waits for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingPrefix {
    /// The labels the agent asked for (empty when they were malformed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Why it was not approved, for the operator.
    pub reason: String,
}

/// A client certificate of a node, by fingerprint, with its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCert {
    /// SHA-256 of the certificate (DER).
    #[serde(with = "hex32")]
    pub fingerprint: [u8; 32],
    /// When it expires (unix seconds; 0: never recorded).
    pub expires_unix: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A plain WireGuard peer (no agent), configured by hand by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalPeer {
    /// Unique name (among nodes and external peers), a DNS label.
    pub name: String,
    /// Name of the peer's site.
    pub site: String,
    /// WireGuard public key.
    pub public_key: Key,
    /// Underlay endpoint, if it has a reachable one.
    pub endpoint: Option<SocketAddr>,
    /// Overlay IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6 address.
    pub ipv6: Ipv6Addr,
    /// When the peer was added (unix seconds).
    pub created_unix: u64,
    /// Labels policy selects on (absent in stores written before labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// A single-use, expiring credential with which a node enrols in a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// Public id, part of the token string.
    pub id: String,
    /// Site the node joins.
    pub site: String,
    /// SHA-256 of the token's secret (the secret itself is never stored).
    #[serde(with = "hex32")]
    pub secret_hash: [u8; 32],
    /// When the token was created (unix seconds).
    pub created_unix: u64,
    /// First second at which the token is no longer accepted (unix seconds).
    pub expires_unix: u64,
    /// Id of the node that used the token, once used.
    pub used_by: Option<String>,
    /// Labels the enrolled node gets, granted by the operator (absent in
    /// stores written before grants: none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Prefixes the enrolled node's agent may advertise without approval
    /// (absent in stores written before grants: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_prefixes: Vec<IpNet>,
}

/// What a join token grants the node it enrols, beyond its site.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenGrants {
    /// The node's labels.
    pub labels: Labels,
    /// Prefixes the node's agent may advertise without approval.
    pub allow_prefixes: Vec<IpNet>,
}

/// A node's registration request, as the API edge has authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Id for the new node, generated by the caller.
    pub node_id: String,
    /// Join token id.
    pub token_id: String,
    /// SHA-256 of the secret the node presented.
    pub secret_hash: [u8; 32],
    /// Requested node name.
    pub name: String,
    /// The node's WireGuard public key.
    pub public_key: Key,
    /// The node's underlay endpoint, if known.
    pub endpoint: Option<SocketAddr>,
    /// SHA-256 of the client certificate issued to the node.
    pub cert_fingerprint: [u8; 32],
    /// When that certificate expires (unix seconds).
    pub cert_expires_unix: u64,
    /// SHA-256 of the public key (SubjectPublicKeyInfo) of the node's
    /// certificate signing request, whose signature the API edge verified.
    pub csr_key: [u8; 32],
    /// Labels the node asked for (`weft-agent --label`): they may only
    /// restate what the token grants.
    pub labels: Labels,
}

/// Something holding an overlay address, a name and a key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Member {
    /// A node, by id.
    Node(String),
    /// An external peer, by name.
    ExternalPeer(String),
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Member::Node(id) => write!(f, "node {id}"),
            Member::ExternalPeer(name) => write!(f, "external peer {name:?}"),
        }
    }
}

/// Checks a site, node or external peer name: a DNS label.
pub fn check_name(kind: &'static str, name: &str) -> Result<(), Error> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            kind,
            name: name.to_owned(),
        })
    }
}

/// Labels of a node or external peer: key -> value.
pub type Labels = BTreeMap<String, String>;

/// Most labels one node or external peer may carry.
pub const MAX_LABELS: usize = 64;

/// Checks labels as the policy parser checks the labels selectors name, so
/// that every label a member carries can be selected.
pub fn check_labels(labels: &Labels) -> Result<(), Error> {
    if labels.len() > MAX_LABELS {
        return Err(Error::TooManyLabels {
            count: labels.len(),
        });
    }
    for (key, value) in labels {
        check_label(key, value)?;
    }
    Ok(())
}

/// Checks one label.
pub fn check_label(key: &str, value: &str) -> Result<(), Error> {
    if !is_label_key(key) {
        return Err(Error::InvalidLabelKey(key.to_owned()));
    }
    if !is_label_value(value) {
        return Err(Error::InvalidLabelValue {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Most workload prefixes one node may advertise.
pub const MAX_ADVERTISED: usize = 256;

/// Checks a workload prefix on its own (overlaps are the state's to
/// check): host bits clear, not a default route, and a unicast network
/// that may be routed (not loopback, link-local or multicast).
pub fn check_prefix(prefix: IpNet) -> Result<(), Error> {
    let bad = |reason: String| {
        Err(Error::InvalidPrefix {
            prefix: prefix.to_string(),
            reason,
        })
    };
    if prefix != prefix.trunc() {
        return bad(format!(
            "host bits are set; did you mean {}?",
            prefix.trunc()
        ));
    }
    if prefix.prefix_len() == 0 {
        return bad("a default route cannot be advertised".to_owned());
    }
    let special = match prefix {
        IpNet::V4(n) => {
            let a = n.network();
            a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_unspecified()
        }
        IpNet::V6(n) => {
            let a = n.network();
            a.is_loopback()
                || a.is_multicast()
                || a.is_unspecified()
                || (a.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if special {
        return bad(
            "loopback, link-local, multicast and unspecified addresses cannot be routed".to_owned(),
        );
    }
    Ok(())
}

/// Checks an IPv4 overlay pool chosen when a network is created: a
/// private-use network (RFC 1918 or RFC 6598 shared address space), host
/// bits clear, between a /8 and a /24.
pub fn check_ipv4_pool(pool: Ipv4Net) -> Result<(), Error> {
    if pool != pool.trunc() {
        return Err(Error::InvalidSettings(format!(
            "IPv4 pool {pool} has host bits set; did you mean {}?",
            pool.trunc()
        )));
    }
    if !(8..=24).contains(&pool.prefix_len()) {
        return Err(Error::InvalidSettings(format!(
            "IPv4 pool {pool} must be between a /8 and a /24"
        )));
    }
    let private = [
        Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8),
        Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12),
        Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16),
        DEFAULT_IPV4_POOL,
    ];
    if !private.iter().any(|p| p.contains(&pool)) {
        return Err(Error::InvalidSettings(format!(
            "IPv4 pool {pool} is not inside a private-use range (RFC 1918 or 100.64.0.0/10)"
        )));
    }
    Ok(())
}

/// Checks a node id or join token id.
pub fn check_id(kind: &'static str, id: &str) -> Result<(), Error> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId {
            kind,
            id: id.to_owned(),
        })
    }
}

/// Serde for 32-byte hashes as lower-case hex.
mod opt_hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    use weft_dataplane_core::Key;

    #[allow(clippy::ref_option)] // serde's `with` passes a reference
    pub(super) fn serialize<S: Serializer>(
        bytes: &Option<[u8; 32]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&Key(*b).to_hex()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<[u8; 32]>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| Key::from_hex(&s).map(|k| k.0))
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    use weft_dataplane_core::Key;

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&Key(*bytes).to_hex())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        Key::from_hex(&s)
            .map(|k| k.0)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["a", "eu-west-1", "0", &"a".repeat(63)] {
            assert!(check_name("site", good).is_ok(), "{good:?} should be valid");
        }
        for bad in ["", "-a", "a-", "EU", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(
                check_name("site", bad).is_err(),
                "{bad:?} should be invalid"
            );
        }
    }

    #[test]
    fn labels_are_checked_like_policy_selectors() {
        for (k, v) in [
            ("app", "web"),
            ("app.kubernetes.io/name", "db-1"),
            ("tier", ""),
            ("A_b.c", "X.y_z"),
        ] {
            assert_eq!(check_label(k, v), Ok(()), "{k}={v} should be valid");
        }
        for bad_key in ["", "-app", "app-", "a b", "é", &"k".repeat(254)] {
            assert_eq!(
                check_label(bad_key, "v"),
                Err(Error::InvalidLabelKey(bad_key.to_owned())),
                "{bad_key:?} should be an invalid key"
            );
        }
        for bad_value in ["a b", "a/b", "a=b", &"v".repeat(64)] {
            assert!(
                matches!(
                    check_label("app", bad_value),
                    Err(Error::InvalidLabelValue { .. })
                ),
                "{bad_value:?} should be an invalid value"
            );
        }
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        assert_eq!(
            check_labels(&many),
            Err(Error::TooManyLabels {
                count: MAX_LABELS + 1
            })
        );
    }

    #[test]
    fn default_settings_are_valid_and_bad_ones_are_named() {
        let prefix: Ipv6Net = "fd7e:4a1:1234::/48".parse().expect("valid prefix");
        let mut s = NetworkSettings::with_ipv6_prefix(prefix);
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.ipv4_pool.to_string(), "100.64.0.0/10");
        s.ipv4_pool = "100.64.0.5/10".parse().expect("valid net");
        let err = s
            .validate()
            .expect_err("host bits must be refused")
            .to_string();
        assert!(err.contains("did you mean 100.64.0.0/10"), "{err}");
    }

    #[test]
    fn a_chosen_ipv4_pool_is_private_and_between_a_slash_8_and_a_slash_24() {
        let pool = |s: &str| -> Ipv4Net { s.parse().expect("valid net") };
        for good in ["100.64.0.0/16", "100.64.0.0/10", "100.100.0.0/24"] {
            assert_eq!(check_ipv4_pool(pool(good)), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("100.64.0.0/25", "between a /8 and a /24"),
            ("100.64.0.1/16", "did you mean 100.64.0.0/16"),
            ("100.0.0.0/8", "not inside a private-use range"),
            ("198.18.0.0/16", "not inside a private-use range"),
        ] {
            let err = check_ipv4_pool(pool(bad))
                .expect_err("must be refused")
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn workload_prefixes_must_be_routable_networks() {
        let net = |s: &str| -> IpNet { s.parse().expect("valid net") };
        for good in ["100.100.2.0/24", "fd00:beef:2::/64", "100.100.2.10/32"] {
            assert_eq!(check_prefix(net(good)), Ok(()), "{good}");
        }
        for bad in [
            "0.0.0.0/0",
            "::/0",
            "100.100.2.1/24",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "fe80::/64",
            "ff00::/8",
            "::1/128",
        ] {
            assert!(
                matches!(check_prefix(net(bad)), Err(Error::InvalidPrefix { .. })),
                "{bad} must be refused"
            );
        }
    }
}
