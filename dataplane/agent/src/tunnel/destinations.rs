//! Which decrypted packets the tunnel delivers to the TUN device, by
//! destination: a peer may only reach what this node hosts (its overlay
//! addresses, its approved workload prefixes), or, on a node that forwards,
//! what it relays (destinations routed to another peer, or in the config's
//! routes). Anything else (the host's underlay, Docker or LAN addresses)
//! is dropped and counted as `not_for_us`.
//!
//! Lookups are binary searches over merged ranges ([`SourceRanges`]) and
//! the peers' longest-prefix table: no allocation on the packet path.

use std::net::IpAddr;

use ipnet::IpNet;
use weft_dataplane_core::NodeConfig;

use super::sources::SourceRanges;

/// What the tunnel does with a decrypted packet, by its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Write it to the TUN device.
    Deliver,
    /// Drop it: this node neither hosts nor relays the destination.
    NotForUs,
}

/// The destinations a node delivers to; the default checks nothing (plain
/// WireGuard mode, or a controller that sends no `hosted`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Destinations {
    /// `None`: no check.
    check: Option<Check>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Check {
    hosted: SourceRanges,
    /// With forwarding on: the config's routes (workload prefixes of other
    /// nodes) that this node relays to.
    relayed: SourceRanges,
    forwarding: bool,
}

impl Destinations {
    /// The destinations of a config: none checked when it has no `hosted`.
    pub(crate) fn of(cfg: &NodeConfig) -> Destinations {
        Destinations::new(&cfg.hosted, cfg.forwarding, &cfg.routes)
    }

    /// Deliver to `hosted`, and with `forwarding` to `routes` and to
    /// destinations routed to a peer. An empty `hosted` checks nothing.
    pub(crate) fn new(hosted: &[IpNet], forwarding: bool, routes: &[IpNet]) -> Destinations {
        if hosted.is_empty() {
            return Destinations::default();
        }
        Destinations {
            check: Some(Check {
                hosted: SourceRanges::new(hosted),
                relayed: if forwarding {
                    SourceRanges::new(routes)
                } else {
                    SourceRanges::default()
                },
                forwarding,
            }),
        }
    }

    /// What to do with a packet to `dst`; `routed_to_peer` says whether the
    /// tunnel routes `dst` to one of its peers (asked only on a node that
    /// forwards, for a destination it does not host).
    pub(crate) fn delivery(&self, dst: IpAddr, routed_to_peer: impl FnOnce() -> bool) -> Delivery {
        let Some(c) = &self.check else {
            return Delivery::Deliver;
        };
        if c.hosted.contains(dst) || (c.forwarding && (c.relayed.contains(dst) || routed_to_peer()))
        {
            Delivery::Deliver
        } else {
            Delivery::NotForUs
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().expect("test prefix")).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_plain_member_delivers_only_what_it_hosts() {
        let d = Destinations::new(
            &nets(&["100.64.0.1/32", "fd7e::1/128", "100.100.1.0/24"]),
            false,
            &nets(&["100.100.2.0/24"]),
        );
        for (dst, want) in [
            ("100.64.0.1", Delivery::Deliver),
            ("fd7e::1", Delivery::Deliver),
            ("100.100.1.77", Delivery::Deliver),
            ("100.64.0.2", Delivery::NotForUs),
            ("198.18.250.1", Delivery::NotForUs),
            ("127.0.0.1", Delivery::NotForUs),
            ("fd7e::2", Delivery::NotForUs),
            // Routes are relayed only by a node that forwards.
            ("100.100.2.1", Delivery::NotForUs),
        ] {
            assert_eq!(d.delivery(ip(dst), || true), want, "{dst}");
        }
    }

    #[test]
    fn a_gateway_also_delivers_what_it_relays() {
        let d = Destinations::new(&nets(&["100.64.0.1/32"]), true, &nets(&["100.100.2.0/24"]));
        assert_eq!(d.delivery(ip("100.64.0.1"), || false), Delivery::Deliver);
        assert_eq!(d.delivery(ip("100.100.2.9"), || false), Delivery::Deliver);
        assert_eq!(
            d.delivery(ip("100.64.0.7"), || true),
            Delivery::Deliver,
            "routed to a peer"
        );
        assert_eq!(d.delivery(ip("100.64.0.7"), || false), Delivery::NotForUs);
        assert_eq!(d.delivery(ip("198.19.1.1"), || false), Delivery::NotForUs);
    }

    #[test]
    fn no_hosted_prefixes_checks_nothing() {
        let d = Destinations::new(&[], false, &[]);
        assert_eq!(d, Destinations::default());
        assert_eq!(d.delivery(ip("198.18.250.1"), || false), Delivery::Deliver);
    }

    fn net_strategy() -> impl Strategy<Value = IpNet> {
        (any::<u8>(), any::<u8>(), 8u8..=32).prop_map(|(c, d, len)| {
            IpNet::new(IpAddr::from([100, 64, c % 4, d]), len)
                .expect("valid")
                .trunc()
        })
    }

    proptest! {
        /// The range lookups agree with a plain scan of the prefixes.
        #[test]
        fn agrees_with_a_naive_scan(
            hosted in proptest::collection::vec(net_strategy(), 1..6),
            routes in proptest::collection::vec(net_strategy(), 0..4),
            peers in proptest::collection::vec(net_strategy(), 0..4),
            forwarding in any::<bool>(),
            c in 0u8..4,
            last in any::<u8>(),
        ) {
            let dst = IpAddr::from([100, 64, c, last]);
            let d = Destinations::new(&hosted, forwarding, &routes);
            let to_peer = peers.iter().any(|n| n.contains(&dst));
            let naive = hosted.iter().any(|n| n.contains(&dst))
                || (forwarding && (routes.iter().any(|n| n.contains(&dst)) || to_peer));
            let want = if naive { Delivery::Deliver } else { Delivery::NotForUs };
            prop_assert_eq!(d.delivery(dst, || to_peer), want);
        }
    }
}
