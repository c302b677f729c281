//! The agent's own check of the prefixes a config routes into the tunnel.
//!
//! Weft's routing table sits before `main`, so a prefix routed into the
//! tunnel that covers the controller, a peer's endpoint or the host's own
//! underlay would capture the very traffic that carries the overlay (or
//! anything else the host sends there). The controller refuses such
//! prefixes too; every agent checks again against what only it knows (its
//! own interfaces and routes), so a controller bug or a forged
//! advertisement cannot cut a node off.
//!
//! [`guard`] takes the config from the controller and the agent's own facts
//! ([`Protected`]) and returns the config without the refused prefixes,
//! with one [`Refusal`] per prefix taken out and why.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::NodeConfig;

/// Default of `weft-agent --min-route-prefix-v4`: no IPv4 prefix shorter
/// than a /8 is ever routed into the tunnel.
pub const DEFAULT_MIN_PREFIX_V4: u8 = 8;
/// Default of `weft-agent --min-route-prefix-v6`.
pub const DEFAULT_MIN_PREFIX_V6: u8 = 32;

/// What the agent knows of its own host, that no prefix of Weft's may
/// capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    /// The controller's addresses (its URL, resolved).
    pub controller: Vec<IpAddr>,
    /// The host's own underlay: the addresses (as host prefixes) and the
    /// non-default routes of its main table on interfaces other than
    /// Weft's.
    pub underlay: Vec<IpNet>,
    /// Shortest IPv4 prefix allowed.
    pub min_prefix_v4: u8,
    /// Shortest IPv6 prefix allowed.
    pub min_prefix_v6: u8,
}

impl Default for Protected {
    fn default() -> Self {
        Protected {
            controller: Vec::new(),
            underlay: Vec::new(),
            min_prefix_v4: DEFAULT_MIN_PREFIX_V4,
            min_prefix_v6: DEFAULT_MIN_PREFIX_V6,
        }
    }
}

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Shorter than the minimum prefix length of its family.
    TooShort { min: u8 },
    /// Covers the controller's address.
    CoversController(IpAddr),
    /// Covers the underlay endpoint of a peer in the config.
    CoversEndpoint { peer: String, endpoint: IpAddr },
    /// Overlaps an address or route of the host's own underlay.
    OverlapsUnderlay(IpNet),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::TooShort { min } => write!(f, "shorter than the minimum /{min}"),
            Reason::CoversController(ip) => write!(f, "covers the controller's address {ip}"),
            Reason::CoversEndpoint { peer, endpoint } => {
                write!(f, "covers peer {peer}'s endpoint {endpoint}")
            }
            Reason::OverlapsUnderlay(net) => {
                write!(f, "overlaps this host's underlay route or address {net}")
            }
        }
    }
}

/// Where a refused prefix was in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The node's kernel routes (`routes`).
    Routes,
    /// A peer's `allowed_ips`.
    AllowedIps { peer: String },
    /// A peer's `shared_routes`.
    SharedRoutes { peer: String },
    /// A peer's `accept_sources` (a spoofed underlay source is refused too).
    AcceptSources { peer: String },
}

impl Place {
    /// The peer the prefix belonged to, if any.
    pub fn peer(&self) -> Option<&str> {
        match self {
            Place::Routes => None,
            Place::AllowedIps { peer }
            | Place::SharedRoutes { peer }
            | Place::AcceptSources { peer } => Some(peer),
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Routes => f.write_str("routes"),
            Place::AllowedIps { peer } => write!(f, "peer {peer} allowed_ips"),
            Place::SharedRoutes { peer } => write!(f, "peer {peer} shared_routes"),
            Place::AcceptSources { peer } => write!(f, "peer {peer} accept_sources"),
        }
    }
}

/// One prefix taken out of a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub prefix: IpNet,
    pub place: Place,
    pub reason: Reason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused {} ({}): {}",
            self.prefix, self.place, self.reason
        )
    }
}

/// Why `prefix` must not be routed into the tunnel, or `None` if it may.
/// `endpoints` are the peers' names with their endpoint addresses.
pub fn check(
    prefix: &IpNet,
    protected: &Protected,
    endpoints: &[(String, IpAddr)],
) -> Option<Reason> {
    let min = match prefix {
        IpNet::V4(_) => protected.min_prefix_v4,
        IpNet::V6(_) => protected.min_prefix_v6,
    };
    if prefix.prefix_len() < min {
        return Some(Reason::TooShort { min });
    }
    if let Some(ip) = protected.controller.iter().find(|ip| covers(prefix, **ip)) {
        return Some(Reason::CoversController(*ip));
    }
    if let Some((peer, ip)) = endpoints.iter().find(|(_, ip)| covers(prefix, *ip)) {
        return Some(Reason::CoversEndpoint {
            peer: peer.clone(),
            endpoint: *ip,
        });
    }
    protected
        .underlay
        .iter()
        .find(|u| overlaps(prefix, u))
        .map(|u| Reason::OverlapsUnderlay(*u))
}

/// `cfg` without the prefixes [`check`] refuses (in `routes`, and in every
/// peer's `allowed_ips`, `shared_routes` and `accept_sources`), and the
/// refusals, in config order. A config with nothing to refuse comes back
/// unchanged.
pub fn guard(mut cfg: NodeConfig, protected: &Protected) -> (NodeConfig, Vec<Refusal>) {
    let endpoints: Vec<(String, IpAddr)> = cfg
        .peers
        .values()
        .filter_map(|p| Some((peer_name(&p.name, &p.public_key), p.endpoint?.ip())))
        .map(|(n, ip)| (n, unmap(ip)))
        .collect();
    let mut refused = Vec::new();
    let mut keep = |nets: &mut Vec<IpNet>, place: &dyn Fn() -> Place| {
        nets.retain(|net| match check(net, protected, &endpoints) {
            None => true,
            Some(reason) => {
                refused.push(Refusal {
                    prefix: *net,
                    place: place(),
                    reason,
                });
                false
            }
        });
    };
    keep(&mut cfg.routes, &|| Place::Routes);
    for p in cfg.peers.values_mut() {
        let name = peer_name(&p.name, &p.public_key);
        keep(&mut p.allowed_ips, &|| Place::AllowedIps {
            peer: name.clone(),
        });
        keep(&mut p.shared_routes, &|| Place::SharedRoutes {
            peer: name.clone(),
        });
        keep(&mut p.accept_sources, &|| Place::AcceptSources {
            peer: name.clone(),
        });
    }
    (cfg, refused)
}

/// The refusals as one line for a report's `apply_error`.
pub fn summary(refusals: &[Refusal]) -> String {
    let parts: Vec<String> = refusals.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

fn peer_name(name: &str, key: &crate::Key) -> String {
    if name.is_empty() {
        key.to_string()
    } else {
        name.to_owned()
    }
}

/// IPv4-mapped IPv6 addresses as IPv4 (a dual-stack socket's view).
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn covers(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&unmap(ip))
}

/// Whether two prefixes share an address (one contains the other).
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::config::{DEFAULT_MTU, PeerConfig};
    use crate::key::Key;
    use crate::policy_maps::PolicyInput;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn peer(i: u8, endpoint: Option<&str>, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            name: format!("p{i}"),
            public_key: Key([i; 32]),
            endpoint: endpoint.map(|e| e.parse::<SocketAddr>().expect("test endpoint")),
            allowed_ips: allowed.iter().map(|s| net(s)).collect(),
            persistent_keepalive: None,
            accept_sources: Vec::new(),
            fallback: Vec::new(),
            shared_routes: Vec::new(),
        }
    }

    fn config(peers: Vec<PeerConfig>, routes: &[&str]) -> NodeConfig {
        NodeConfig {
            revision: 1,
            node_id: "n1".into(),
            node_name: "a1".into(),
            addresses: vec![net("100.64.0.1/10"), net("fd7e:4a1::1/64")],
            mtu: DEFAULT_MTU,
            peers: peers.into_iter().map(|p| (p.public_key, p)).collect(),
            policy: PolicyInput::default(),
            routes: routes.iter().map(|s| net(s)).collect(),
            forwarding: false,
            hosted: vec![net("100.64.0.1/32"), net("fd7e:4a1::1/128")],
            key_generation: 0,
        }
    }

    /// The lab's view from node a1: controller 198.18.100.2, LAN
    /// 198.19.1.0/24, site routes 198.18.0.0/16 and 198.19.0.0/16.
    fn lab() -> Protected {
        Protected {
            controller: vec!["198.18.100.2".parse().expect("ip")],
            underlay: vec![
                net("198.19.1.11/32"),
                net("198.19.1.0/24"),
                net("198.18.0.0/16"),
                net("198.19.0.0/16"),
                net("127.0.0.1/32"),
                net("::1/128"),
            ],
            ..Protected::default()
        }
    }

    #[test]
    fn members_own_addresses_and_workload_prefixes_pass() {
        let cfg = config(
            vec![
                peer(
                    2,
                    Some("198.19.1.12:51820"),
                    &["100.64.0.2/32", "fd7e:4a1::2/128"],
                ),
                peer(
                    3,
                    Some("198.19.2.11:51820"),
                    &["100.64.0.3/32", "fd7e:4a1::3/128", "100.100.3.0/24"],
                ),
                peer(4, None, &["100.64.0.4/32", "fd7e:4a1::4/128"]),
            ],
            &["100.100.3.0/24", "fd00:beef:3::/64"],
        );
        let (out, refused) = guard(cfg.clone(), &lab());
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(out, cfg);
    }

    #[test]
    fn each_unsafe_prefix_is_refused_with_its_reason() {
        let mut attacker = peer(
            9,
            Some("198.19.3.11:51820"),
            &["100.64.0.9/32", "128.0.0.0/1", "198.18.100.2/32"],
        );
        attacker.shared_routes = vec![net("198.19.2.0/25")];
        attacker.accept_sources = vec![net("198.19.1.11/32"), net("100.100.9.0/24")];
        let cfg = config(
            vec![
                peer(2, Some("[::ffff:198.19.2.11]:51820"), &["100.64.0.2/32"]),
                attacker,
            ],
            &[
                "0.0.0.0/0",
                "198.19.2.11/32",
                "100.100.9.0/24",
                "198.0.0.0/8",
                "fd00::/16",
            ],
        );
        let (out, refused) = guard(cfg, &lab());
        let got: Vec<String> = refused.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            vec![
                "refused 0.0.0.0/0 (routes): shorter than the minimum /8",
                "refused 198.19.2.11/32 (routes): covers peer p2's endpoint 198.19.2.11",
                "refused 198.0.0.0/8 (routes): covers the controller's address 198.18.100.2",
                "refused fd00::/16 (routes): shorter than the minimum /32",
                "refused 128.0.0.0/1 (peer p9 allowed_ips): shorter than the minimum /8",
                "refused 198.18.100.2/32 (peer p9 allowed_ips): covers the controller's address 198.18.100.2",
                "refused 198.19.2.0/25 (peer p9 shared_routes): covers peer p2's endpoint 198.19.2.11",
                "refused 198.19.1.11/32 (peer p9 accept_sources): overlaps this host's underlay route or address 198.19.1.11/32",
            ]
        );
        assert_eq!(refused[4].place.peer(), Some("p9"));
        assert_eq!(out.routes, vec![net("100.100.9.0/24")]);
        let p9 = &out.peers[&Key([9; 32])];
        assert_eq!(p9.allowed_ips, vec![net("100.64.0.9/32")]);
        assert!(p9.shared_routes.is_empty());
        assert_eq!(p9.accept_sources, vec![net("100.100.9.0/24")]);
        assert!(summary(&refused).contains("; refused 128.0.0.0/1"));
    }

    #[test]
    fn a_prefix_inside_an_underlay_route_is_refused_too() {
        let cfg = config(vec![], &["198.19.1.128/25", "198.19.0.0/16"]);
        let (out, refused) = guard(cfg, &lab());
        assert!(out.routes.is_empty(), "{out:?}");
        assert_eq!(
            refused.iter().map(|r| r.reason.clone()).collect::<Vec<_>>(),
            vec![
                Reason::OverlapsUnderlay(net("198.19.1.0/24")),
                Reason::OverlapsUnderlay(net("198.19.1.11/32")),
            ]
        );
    }

    #[test]
    fn minimums_follow_the_flags() {
        let p = Protected {
            min_prefix_v4: 16,
            min_prefix_v6: 48,
            ..Protected::default()
        };
        let cfg = config(
            vec![],
            &[
                "100.100.0.0/15",
                "100.100.0.0/16",
                "fd00:beef::/47",
                "fd00:beef::/48",
            ],
        );
        let (out, _) = guard(cfg, &p);
        assert_eq!(
            out.routes,
            vec![net("100.100.0.0/16"), net("fd00:beef::/48")]
        );
    }

    /// Addresses a test may protect or route, from a few small blocks so
    /// that random prefixes often cover them.
    fn ip_strategy() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::from([198, 18, c, d])),
            (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::from([100, 64, c, d])),
            any::<u16>().prop_map(|x| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, x])),
        ]
    }

    fn net_strategy() -> impl Strategy<Value = IpNet> {
        (ip_strategy(), any::<u8>()).prop_map(|(ip, len)| {
            let max = if ip.is_ipv4() { 33 } else { 129 };
            IpNet::new(ip, len % max).expect("valid length").trunc()
        })
    }

    fn peer_strategy() -> impl Strategy<Value = PeerConfig> {
        (
            any::<u8>(),
            proptest::option::of(ip_strategy()),
            proptest::collection::vec(net_strategy(), 0..4),
            proptest::collection::vec(net_strategy(), 0..3),
            proptest::collection::vec(net_strategy(), 0..3),
        )
            .prop_map(|(k, ep, allowed, shared, accept)| PeerConfig {
                name: format!("p{k}"),
                public_key: Key([k; 32]),
                endpoint: ep.map(|ip| SocketAddr::new(ip, 51820)),
                allowed_ips: allowed,
                persistent_keepalive: None,
                accept_sources: accept,
                fallback: Vec::new(),
                shared_routes: shared,
            })
    }

    proptest! {
        #[test]
        fn no_output_prefix_covers_a_protected_address(
            peers in proptest::collection::vec(peer_strategy(), 0..5),
            routes in proptest::collection::vec(net_strategy(), 0..6),
            controller in proptest::collection::vec(ip_strategy(), 0..3),
            underlay in proptest::collection::vec(net_strategy(), 0..4),
        ) {
            let protected = Protected { controller, underlay, ..Protected::default() };
            let mut cfg = config(Vec::new(), &[]);
            cfg.peers = peers.into_iter().map(|p| (p.public_key, p)).collect::<BTreeMap<_, _>>();
            cfg.routes = routes;
            let endpoints: Vec<IpAddr> = cfg.peers.values().filter_map(|p| p.endpoint).map(|e| e.ip()).collect();
            let before: usize = cfg.routes.len() + cfg.peers.values().map(|p| p.allowed_ips.len() + p.shared_routes.len() + p.accept_sources.len()).sum::<usize>();
            let (out, refused) = guard(cfg, &protected);
            let mut kept = out.routes.clone();
            for p in out.peers.values() {
                kept.extend(&p.allowed_ips);
                kept.extend(&p.shared_routes);
                kept.extend(&p.accept_sources);
            }
            prop_assert_eq!(kept.len() + refused.len(), before, "every prefix kept or refused");
            for k in &kept {
                let min = if k.addr().is_ipv4() { DEFAULT_MIN_PREFIX_V4 } else { DEFAULT_MIN_PREFIX_V6 };
                prop_assert!(k.prefix_len() >= min, "{} is too short", k);
                for ip in protected.controller.iter().chain(&endpoints) {
                    prop_assert!(!k.contains(ip), "{} covers {}", k, ip);
                }
                for u in &protected.underlay {
                    prop_assert!(!k.contains(&u.network()) && !u.contains(&k.network()), "{} overlaps {}", k, u);
                }
            }
        }

        #[test]
        fn safe_configs_pass_unchanged(
            members in proptest::collection::btree_set(1u8..250, 0..8),
            workloads in proptest::collection::btree_set(0u8..=255, 0..4),
        ) {
            // Overlay /32 and /128 per member, workload /24s from
            // 100.100.0.0/16, endpoints and controller on the underlay.
            let peers: Vec<PeerConfig> = members
                .iter()
                .map(|&i| {
                    let mut p = peer(i, Some(&format!("198.19.2.{i}:51820")), &[]);
                    p.allowed_ips = vec![
                        IpNet::from(IpAddr::from([100, 64, 0, i])),
                        IpNet::from(IpAddr::from([0xfd7e, 0x4a1, 0, 0, 0, 0, 0, u16::from(i)])),
                    ];
                    p
                })
                .collect();
            let mut cfg = config(peers, &[]);
            cfg.routes = workloads
                .iter()
                .map(|&w| IpNet::new(IpAddr::from([100, 100, w, 0]), 24).expect("valid"))
                .collect();
            let (out, refused) = guard(cfg.clone(), &lab());
            prop_assert!(refused.is_empty(), "{:?}", refused);
            prop_assert_eq!(out, cfg);
        }
    }
}
