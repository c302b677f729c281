//! Reconciliation plans: desired state in, observed state in, the actions
//! that turn one into the other out. Applying a plan twice changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::config::PeerConfig;
use crate::key::Key;

/// A change to the tunnel's peer set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAction {
    /// Add the peer, or update it in place (keeping its sessions) when its
    /// key is already known.
    Upsert(PeerConfig),
    /// Remove the peer and forget its sessions.
    Remove(Key),
}

/// A change to the interface's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressAction {
    Add(IpNet),
    Remove(IpNet),
}

/// Peer actions that turn `observed` into `desired`. Peers whose config is
/// unchanged produce no action, so they are never disturbed.
pub fn plan_peers(
    desired: &BTreeMap<Key, PeerConfig>,
    observed: &BTreeMap<Key, PeerConfig>,
) -> Vec<PeerAction> {
    let mut actions = Vec::new();
    for key in observed.keys() {
        if !desired.contains_key(key) {
            actions.push(PeerAction::Remove(*key));
        }
    }
    for (key, peer) in desired {
        if observed.get(key) != Some(peer) {
            actions.push(PeerAction::Upsert(peer.clone()));
        }
    }
    actions
}

/// Applies peer actions to a model of the tunnel's peers (what the tunnel
/// does, minus the sessions).
pub fn apply_peer_actions(observed: &mut BTreeMap<Key, PeerConfig>, actions: &[PeerAction]) {
    for action in actions {
        match action {
            PeerAction::Upsert(p) => {
                observed.insert(p.public_key, p.clone());
            }
            PeerAction::Remove(k) => {
                observed.remove(k);
            }
        }
    }
}

/// Address actions that turn `observed` into `desired`. Link-local IPv6
/// addresses belong to the kernel and are never removed.
pub fn plan_addresses(desired: &[IpNet], observed: &[IpNet]) -> Vec<AddressAction> {
    let want: BTreeSet<IpNet> = desired.iter().copied().collect();
    let have: BTreeSet<IpNet> = observed.iter().copied().collect();
    let mut actions: Vec<AddressAction> = have
        .difference(&want)
        .filter(|a| !is_link_local(a))
        .map(|a| AddressAction::Remove(*a))
        .collect();
    actions.extend(want.difference(&have).map(|a| AddressAction::Add(*a)));
    actions
}

fn is_link_local(net: &IpNet) -> bool {
    match net {
        IpNet::V6(n) => n.addr().segments()[0] & 0xffc0 == 0xfe80,
        IpNet::V4(n) => n.addr().octets()[0] == 169 && n.addr().octets()[1] == 254,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    fn peer(seed: u8, port: u16, keepalive: Option<u16>) -> PeerConfig {
        PeerConfig {
            name: format!("p{seed}"),
            public_key: Key([seed; 32]),
            endpoint: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, seed)),
                port,
            )),
            allowed_ips: vec![IpNet::from(IpAddr::V4(Ipv4Addr::new(100, 64, 0, seed)))],
            persistent_keepalive: keepalive,
            accept_sources: Vec::new(),
            fallback: Vec::new(),
            shared_routes: Vec::new(),
        }
    }

    fn peers_strategy() -> impl Strategy<Value = BTreeMap<Key, PeerConfig>> {
        proptest::collection::vec(
            (0u8..12, 51820u16..51823, proptest::option::of(0u16..3)),
            0..10,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(s, p, k)| {
                    let pc = peer(s, p, k);
                    (pc.public_key, pc)
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn applying_the_plan_yields_desired(desired in peers_strategy(), mut observed in peers_strategy()) {
            let actions = plan_peers(&desired, &observed);
            apply_peer_actions(&mut observed, &actions);
            prop_assert_eq!(&observed, &desired);
            prop_assert!(plan_peers(&desired, &observed).is_empty(), "second plan must be empty");
        }

        #[test]
        fn unchanged_peers_are_not_touched(desired in peers_strategy(), observed in peers_strategy()) {
            for action in plan_peers(&desired, &observed) {
                if let PeerAction::Upsert(p) = action {
                    prop_assert_ne!(observed.get(&p.public_key), Some(&p));
                }
            }
        }

        #[test]
        fn address_plan_converges(d in proptest::collection::vec(0u8..8, 0..5), o in proptest::collection::vec(0u8..8, 0..5)) {
            let net = |i: u8| IpNet::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, i)), 10).expect("valid prefix");
            let desired: Vec<IpNet> = d.iter().map(|i| net(*i)).collect();
            let mut observed: BTreeSet<IpNet> = o.iter().map(|i| net(*i)).collect();
            for a in plan_addresses(&desired, &observed.iter().copied().collect::<Vec<_>>()) {
                match a {
                    AddressAction::Add(n) => { observed.insert(n); }
                    AddressAction::Remove(n) => { observed.remove(&n); }
                }
            }
            prop_assert_eq!(observed, desired.into_iter().collect::<BTreeSet<_>>());
        }
    }

    #[test]
    fn link_local_addresses_are_left_alone() {
        let ll: IpNet = "fe80::1/64".parse().expect("valid");
        assert!(plan_addresses(&[], &[ll]).is_empty());
    }
}
