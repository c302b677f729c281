//! Recompiling only what a change touches.
//!
//! A destination identity's tuples depend on (a) the policies whose target
//! selects it and (b) the set of identities their rules' `from` selects.
//! So after a change the affected destinations are:
//!
//! 1. identities that are new (first endpoint with that site and labels);
//! 2. identities selected by the target of a changed, added or removed
//!    policy (old or new version);
//! 3. if identities were added or removed: identities selected by the target
//!    of any policy with a rule whose `from` is omitted (any source) or
//!    selects an added or removed identity.
//!
//! Every other destination keeps its tuples. Identities keep their numbers
//! while some endpoint has their (site, labels), so the dataplane's maps
//! change only where policy did; new ones take the smallest free numbers.
//! The ipcache and hosts are rebuilt: that is linear in the endpoints and
//! independent of the number of rules.

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::compile::{Compiled, Identity, IdentityKey};
use crate::policy::model::{Endpoint, Policy, Selector};

/// Compiles `policies` over `endpoints`, reusing `prev` for every
/// destination identity the change does not touch. Equal to
/// [`crate::policy::compile`] up to identity numbering. Takes `prev` by
/// value: its tables are reused in place rather than copied.
pub fn update(prev: Compiled, policies: &[Policy], endpoints: &[Endpoint]) -> Compiled {
    let policies: BTreeMap<String, Policy> = policies
        .iter()
        .map(|p| (p.name.clone(), p.clone()))
        .collect();
    let endpoints: BTreeMap<String, Endpoint> = endpoints
        .iter()
        .map(|e| (e.name.clone(), e.clone()))
        .collect();

    // Identities: keep the numbers of keys still present.
    let keys: BTreeSet<IdentityKey> = endpoints.values().map(IdentityKey::of).collect();
    let mut identities: BTreeMap<Identity, IdentityKey> = prev
        .identities
        .iter()
        .filter(|(_, k)| keys.contains(*k))
        .map(|(id, k)| (*id, k.clone()))
        .collect();
    let removed: Vec<&IdentityKey> = prev
        .identities
        .values()
        .filter(|k| !keys.contains(*k))
        .collect();
    let known: BTreeSet<&IdentityKey> = identities.values().collect();
    let added: Vec<IdentityKey> = keys
        .iter()
        .filter(|k| !known.contains(k))
        .cloned()
        .collect();
    let mut next: Identity = 1;
    let mut added_ids = BTreeSet::new();
    for key in &added {
        while identities.contains_key(&next) {
            next += 1;
        }
        identities.insert(next, key.clone());
        added_ids.insert(next);
    }

    // Affected destinations.
    let selected = |sel: &Selector| -> Vec<Identity> {
        identities
            .iter()
            .filter(|(_, k)| sel.matches(&k.site, &k.labels))
            .map(|(id, _)| *id)
            .collect()
    };
    let mut affected = added_ids;
    let names: BTreeSet<&String> = prev.policies.keys().chain(policies.keys()).collect();
    for name in names {
        let (old, new) = (prev.policies.get(name), policies.get(name));
        if old != new {
            for p in old.into_iter().chain(new) {
                affected.extend(selected(&p.target));
            }
        }
    }
    if !added.is_empty() || !removed.is_empty() {
        let changed_keys: Vec<&IdentityKey> = added.iter().chain(removed.iter().copied()).collect();
        for p in policies.values() {
            let touches = p.ingress.iter().chain(&p.deny).any(|r| match &r.from {
                None => true,
                Some(sel) => changed_keys.iter().any(|k| sel.matches(&k.site, &k.labels)),
            });
            if touches {
                affected.extend(selected(&p.target));
            }
        }
    }

    let mut tables = prev.tables;
    tables
        .dsts
        .retain(|id, _| identities.contains_key(id) && !affected.contains(id));
    let mut compiled = Compiled {
        tables,
        identities,
        hosts: BTreeMap::new(),
        policies,
        endpoints,
    };
    compiled.rebuild_addresses();
    compiled.recompute(&affected);
    compiled
}
