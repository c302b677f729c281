//! Agent-side fallback: when the agent finds a peer dead before the
//! controller has recomputed, the peer's routes move to the first live peer
//! of its fallback list (e.g. another gateway of the same site).
//!
//! Pure: the desired peers and the set of dead peers in, the peers to
//! configure out. The dead peer stays configured, with no allowed IPs, so
//! its sessions and probes continue and it is noticed when it comes back;
//! the prefixes it routed (and shared) are appended to its target's (so the
//! target's packets from them pass the source check), and the target also
//! accepts the sources the dead peer accepted (relayed traffic it now
//! carries). A dead peer whose fallbacks are all dead or unknown keeps its
//! routes: there is nowhere better to send them.
//!
//! The fallback list also names the peers the tunnel spreads a peer's
//! flows over (each flow, by a hash of its addresses and ports, to this
//! peer or one of its fallbacks: a site's gateways are interchangeable),
//! so dead peers are struck from every fallback list.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::PeerConfig;
use crate::key::Key;

/// Where each dead peer's routes go: dead peer → the first peer of its
/// fallback list that is configured, not dead and not itself. Dead peers
/// without such a peer are left out.
#[must_use]
pub fn fallback_targets(
    desired: &BTreeMap<Key, PeerConfig>,
    dead: &BTreeSet<Key>,
) -> BTreeMap<Key, Key> {
    dead.iter()
        .filter_map(|d| {
            let peer = desired.get(d)?;
            let target = peer
                .fallback
                .iter()
                .find(|k| *k != d && desired.contains_key(*k) && !dead.contains(*k))?;
            Some((*d, *target))
        })
        .collect()
}

/// The peers to configure given the `desired` ones and the peers found
/// `dead`: every dead peer with a live fallback hands its allowed IPs
/// (and accepted sources) to that fallback; everything else is as desired.
/// With no dead peer the result equals `desired`.
#[must_use]
pub fn effective_peers(
    desired: &BTreeMap<Key, PeerConfig>,
    dead: &BTreeSet<Key>,
) -> BTreeMap<Key, PeerConfig> {
    let targets = fallback_targets(desired, dead);
    let mut out = desired.clone();
    if !dead.is_empty() {
        for p in out.values_mut() {
            p.fallback.retain(|k| !dead.contains(k));
        }
    }
    if targets.is_empty() {
        return out;
    }
    for (from, to) in &targets {
        let (Some(moved), Some(accepted)) = (
            out.get_mut(from)
                .map(|p| std::mem::take(&mut p.allowed_ips)),
            desired.get(from).map(|p| p.accept_sources.clone()),
        ) else {
            continue;
        };
        let shared = out
            .get_mut(from)
            .map(|p| std::mem::take(&mut p.shared_routes))
            .unwrap_or_default();
        if let Some(target) = out.get_mut(to) {
            target.allowed_ips.extend(moved);
            target.shared_routes.extend(shared);
            target.accept_sources.extend(accepted);
        }
    }
    for to in targets.values().collect::<BTreeSet<_>>() {
        if let Some(target) = out.get_mut(to) {
            target.allowed_ips.sort_unstable();
            target.allowed_ips.dedup();
            target.shared_routes.sort_unstable();
            target.shared_routes.dedup();
            target.accept_sources.sort_unstable();
            target.accept_sources.dedup();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ipnet::{IpNet, Ipv4Net};
    use proptest::prelude::*;

    use super::*;

    fn key(i: u8) -> Key {
        Key([i; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn peer(i: u8, allowed: &[&str], fallback: &[u8]) -> PeerConfig {
        PeerConfig {
            name: format!("p{i}"),
            public_key: key(i),
            endpoint: None,
            allowed_ips: allowed.iter().map(|s| net(s)).collect(),
            persistent_keepalive: None,
            accept_sources: vec![net(&format!("100.100.{i}.0/24"))],
            fallback: fallback.iter().map(|f| key(*f)).collect(),
            shared_routes: Vec::new(),
        }
    }

    fn peers(list: Vec<PeerConfig>) -> BTreeMap<Key, PeerConfig> {
        list.into_iter().map(|p| (p.public_key, p)).collect()
    }

    #[test]
    fn routes_move_to_the_first_live_fallback() {
        let desired = peers(vec![
            peer(1, &["100.64.1.0/24", "fd00:1::/64"], &[2, 3]),
            peer(2, &["100.64.2.0/24"], &[1, 3]),
            peer(3, &["100.64.3.0/24"], &[1, 2]),
        ]);
        let dead: BTreeSet<Key> = [key(1), key(2)].into();
        let eff = effective_peers(&desired, &dead);
        // 1's first fallback (2) is dead too: 3 takes both.
        assert!(eff[&key(1)].allowed_ips.is_empty());
        assert!(eff[&key(2)].allowed_ips.is_empty());
        assert_eq!(
            eff[&key(3)].allowed_ips,
            vec![
                net("100.64.1.0/24"),
                net("100.64.2.0/24"),
                net("100.64.3.0/24"),
                net("fd00:1::/64")
            ]
        );
        assert_eq!(
            eff[&key(3)].accept_sources,
            vec![
                net("100.100.1.0/24"),
                net("100.100.2.0/24"),
                net("100.100.3.0/24")
            ]
        );
        // The dead peers keep everything else (they stay configured).
        assert_eq!(eff[&key(1)].accept_sources, desired[&key(1)].accept_sources);
        assert_eq!(
            fallback_targets(&desired, &dead),
            [(key(1), key(3)), (key(2), key(3))].into()
        );
    }

    #[test]
    fn a_dead_peer_without_a_live_fallback_keeps_its_routes() {
        let desired = peers(vec![
            peer(1, &["100.64.1.0/24"], &[2, 9, 1]),
            peer(2, &["100.64.2.0/24"], &[]),
        ]);
        let dead: BTreeSet<Key> = [key(1), key(2)].into();
        let eff = effective_peers(&desired, &dead);
        assert_eq!(eff[&key(1)].allowed_ips, desired[&key(1)].allowed_ips);
        assert_eq!(eff[&key(1)].fallback, vec![key(9)], "dead peers struck");
        assert_eq!(eff[&key(2)], desired[&key(2)]);
        assert!(fallback_targets(&desired, &dead).is_empty());
    }

    /// Up to 6 peers (keys 1..=6) with disjoint /32s, fallback lists that
    /// may name themselves or unknown keys (7, 8), and a dead set.
    fn scenario() -> impl Strategy<Value = (BTreeMap<Key, PeerConfig>, BTreeSet<Key>)> {
        (1usize..=6).prop_flat_map(|n| {
            let owners = prop::collection::vec(0..n, 0..24);
            let fallbacks = prop::collection::vec(prop::collection::vec(1u8..=8, 0..4), n);
            let accepts = prop::collection::vec(prop::collection::vec(0u8..8, 0..3), n);
            let dead = prop::collection::btree_set(1u8..=8, 0..=n + 1);
            (owners, fallbacks, accepts, dead).prop_map(
                move |(owners, fallbacks, accepts, dead)| {
                    let mut desired = BTreeMap::new();
                    for (i, (fallback, accept)) in fallbacks.into_iter().zip(accepts).enumerate() {
                        let id = u8::try_from(i + 1).expect("at most 6 peers");
                        // Odd prefixes are shared routes, even ones plain.
                        let (shared, allowed): (Vec<IpNet>, Vec<IpNet>) = owners
                            .iter()
                            .enumerate()
                            .filter(|(_, o)| **o == i)
                            .map(|(j, _)| {
                                let host = u8::try_from(j).expect("fewer than 256 prefixes");
                                IpNet::V4(Ipv4Net::from(Ipv4Addr::new(100, 64, 0, host)))
                            })
                            .partition(
                                |n| matches!(n, IpNet::V4(v) if v.addr().octets()[3] % 2 == 1),
                            );
                        let accept_sources = accept
                            .into_iter()
                            .map(|a| net(&format!("100.100.{a}.0/24")))
                            .collect();
                        let p = PeerConfig {
                            name: format!("p{id}"),
                            public_key: key(id),
                            endpoint: None,
                            allowed_ips: allowed,
                            persistent_keepalive: None,
                            accept_sources,
                            fallback: fallback.into_iter().map(key).collect(),
                            shared_routes: shared,
                        };
                        desired.insert(key(id), p);
                    }
                    (desired, dead.into_iter().map(key).collect())
                },
            )
        })
    }

    fn routed(peers: &BTreeMap<Key, PeerConfig>) -> Vec<(IpNet, Key)> {
        peers
            .values()
            .flat_map(|p| {
                p.allowed_ips
                    .iter()
                    .chain(&p.shared_routes)
                    .map(|n| (*n, p.public_key))
            })
            .collect()
    }

    proptest! {
        #[test]
        fn every_desired_prefix_is_routed_by_exactly_one_peer((desired, dead) in scenario()) {
            let eff = effective_peers(&desired, &dead);
            prop_assert_eq!(eff.keys().collect::<Vec<_>>(), desired.keys().collect::<Vec<_>>());
            let want: BTreeSet<IpNet> = routed(&desired).into_iter().map(|(n, _)| n).collect();
            let got = routed(&eff);
            prop_assert_eq!(got.len(), want.len());
            prop_assert_eq!(got.into_iter().map(|(n, _)| n).collect::<BTreeSet<_>>(), want);
        }

        #[test]
        fn without_dead_peers_nothing_changes((desired, _dead) in scenario()) {
            prop_assert_eq!(effective_peers(&desired, &BTreeSet::new()), desired);
        }

        #[test]
        fn only_dead_peers_with_a_live_fallback_and_their_targets_change(
            (desired, dead) in scenario()
        ) {
            let eff = effective_peers(&desired, &dead);
            let targets = fallback_targets(&desired, &dead);
            for (k, p) in &desired {
                let e = &eff[k];
                // Names, endpoints and keepalives never change; fallback
                // lists lose exactly the dead peers.
                prop_assert_eq!(
                    (&e.name, e.endpoint, e.persistent_keepalive),
                    (&p.name, p.endpoint, p.persistent_keepalive)
                );
                let live: Vec<Key> =
                    p.fallback.iter().copied().filter(|f| !dead.contains(f)).collect();
                prop_assert_eq!(&e.fallback, &live);
                if !targets.contains_key(k) && !targets.values().any(|t| t == k) {
                    prop_assert_eq!(
                        (&e.allowed_ips, &e.accept_sources),
                        (&p.allowed_ips, &p.accept_sources)
                    );
                }
                if dead.contains(k) && !targets.contains_key(k) {
                    // No live fallback: its routes stay.
                    prop_assert_eq!(&e.allowed_ips, &p.allowed_ips);
                }
            }
        }

        #[test]
        fn routes_of_a_dead_peer_with_a_live_fallback_end_on_a_live_peer(
            (desired, dead) in scenario()
        ) {
            let eff = effective_peers(&desired, &dead);
            for (from, p) in &desired {
                let live_fallback = p
                    .fallback
                    .iter()
                    .find(|k| *k != from && desired.contains_key(*k) && !dead.contains(*k));
                if !dead.contains(from) {
                    continue;
                }
                let Some(to) = live_fallback else { continue };
                prop_assert!(eff[from].allowed_ips.is_empty());
                let target = &eff[to];
                prop_assert!(!dead.contains(to));
                for n in &p.allowed_ips {
                    prop_assert!(target.allowed_ips.contains(n), "{} not moved to {}", n, to);
                }
                // Whatever the dead peer's packets could carry, the target's may.
                for n in &p.accept_sources {
                    prop_assert!(target.accept_sources.contains(n) || target.allowed_ips.contains(n));
                }
            }
        }
    }
}
