//! Compiling policy to identities, an ipcache and rule tuples.
//!
//! Every distinct (site, label set) among the endpoints gets a numeric
//! identity; selectors only ever look at (site, labels), so every verdict is
//! a function of (src identity, dst identity, protocol, port). For each
//! destination identity the compiler resolves all rules of all policies
//! selecting it into disjoint port ranges per (src identity, protocol), deny
//! winning over allow, so the dataplane needs one exact lookup per packet
//! whatever the number of rules.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::Serialize;

use crate::policy::model::{Endpoint, Policy, Protocol, Selector, Verdict};

/// A numeric identity for a (site, label set).
pub type Identity = u32;

/// The identity of addresses that belong to no known endpoint.
pub const WORLD: Identity = 0;

/// What an identity stands for: a site and a label set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct IdentityKey {
    /// The site.
    pub site: String,
    /// The labels.
    pub labels: BTreeMap<String, String>,
}

impl IdentityKey {
    /// The key of an endpoint.
    pub fn of(endpoint: &Endpoint) -> Self {
        IdentityKey {
            site: endpoint.site.clone(),
            labels: endpoint.labels.clone(),
        }
    }

    fn selected_by(&self, selector: &Selector) -> bool {
        selector.matches(&self.site, &self.labels)
    }
}

/// Start of a resolved port range for one source identity and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TupleKey {
    /// Source identity ([`WORLD`] for unknown addresses).
    pub src: Identity,
    /// Protocol.
    pub protocol: Protocol,
    /// First port of the range (0 for ICMP).
    pub first: u16,
}

/// End, verdict and deciding rule of a resolved port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TupleValue {
    /// Last port of the range (inclusive).
    pub last: u16,
    /// The verdict for the whole range.
    pub verdict: Verdict,
    /// Index in the destination's [`DstPolicy::rules`] of the rule that
    /// decides the range: the first deny rule covering it (policies by
    /// name, rules in file order), else the first allow rule, as
    /// [`crate::policy::explain`] names it.
    pub rule: u32,
}

/// Which list of a policy a rule is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RuleList {
    /// `spec.ingress`.
    Ingress,
    /// `spec.deny`.
    Deny,
}

/// One rule of one policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleRef {
    /// The policy's name.
    pub policy: String,
    /// Its list.
    pub list: RuleList,
    /// Index in the list.
    pub index: u32,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = match self.list {
            RuleList::Ingress => "ingress",
            RuleList::Deny => "deny",
        };
        write!(f, "{}/{list}[{}]", self.policy, self.index)
    }
}

/// The compiled policy of one destination identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DstPolicy {
    /// Selected by some policy: traffic no tuple allows is denied. An
    /// ungoverned identity has no tuples and accepts everything.
    pub governed: bool,
    /// Disjoint port ranges per (src, protocol), keyed by their start.
    pub tuples: BTreeMap<TupleKey, TupleValue>,
    /// The rules that decide some range ([`TupleValue::rule`] indexes
    /// this), in policy and file order.
    pub rules: Vec<RuleRef>,
}

/// What the dataplane enforces: the ipcache and per-destination tuples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyTables {
    /// Overlay prefix (host bits clear) -> identity; longest prefix wins.
    pub ipcache: BTreeMap<IpNet, Identity>,
    /// Destination identity -> its policy.
    pub dsts: BTreeMap<Identity, DstPolicy>,
}

/// The compiled policy of the whole network, with what it was built from
/// (kept so that [`crate::policy::update`] can tell what changed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// What the dataplane enforces.
    pub tables: PolicyTables,
    /// Identity -> what it stands for.
    pub identities: BTreeMap<Identity, IdentityKey>,
    /// Identity -> nodes hosting an endpoint of that identity.
    pub hosts: BTreeMap<Identity, BTreeSet<String>>,
    /// The policies compiled, by name.
    pub policies: BTreeMap<String, Policy>,
    /// The endpoints compiled, by name.
    pub endpoints: BTreeMap<String, Endpoint>,
}

/// Compiles policies over endpoints from scratch; identities are numbered
/// from 1 in (site, labels) order.
///
/// Names are unique keys: of two policies or endpoints with one name the
/// later wins. Of two endpoints claiming the same prefix, the one with the
/// smaller name wins.
pub fn compile(policies: &[Policy], endpoints: &[Endpoint]) -> Compiled {
    let policies = by_name(policies, |p| &p.name);
    let endpoints = by_name(endpoints, |e| &e.name);
    let keys: BTreeSet<IdentityKey> = endpoints.values().map(IdentityKey::of).collect();
    let identities: BTreeMap<Identity, IdentityKey> = (1..).zip(keys).collect();
    let mut compiled = Compiled {
        tables: PolicyTables::default(),
        identities,
        hosts: BTreeMap::new(),
        policies,
        endpoints,
    };
    compiled.rebuild_addresses();
    let all: BTreeSet<Identity> = compiled.identities.keys().copied().collect();
    compiled.recompute(&all);
    compiled
}

/// Only what `node` needs: the whole ipcache (to know every source) and
/// the policy of the identities it hosts.
pub fn compile_for_node(compiled: &Compiled, node: &str) -> PolicyTables {
    let dsts = compiled
        .tables
        .dsts
        .iter()
        .filter(|(id, _)| compiled.hosts.get(id).is_some_and(|h| h.contains(node)))
        .map(|(id, p)| (*id, p.clone()))
        .collect();
    PolicyTables {
        ipcache: compiled.tables.ipcache.clone(),
        dsts,
    }
}

impl PolicyTables {
    /// Every tuple as `(src, dst, protocol, first port, last port, verdict)`.
    pub fn tuples(
        &self,
    ) -> impl Iterator<Item = (Identity, Identity, Protocol, u16, u16, Verdict)> {
        self.dsts.iter().flat_map(|(dst, p)| {
            p.tuples
                .iter()
                .map(|(k, v)| (k.src, *dst, k.protocol, k.first, v.last, v.verdict))
        })
    }
}

impl Compiled {
    /// The identity of a (site, label set), if some endpoint has it.
    pub fn identity(&self, key: &IdentityKey) -> Option<Identity> {
        self.identities
            .iter()
            .find(|(_, k)| *k == key)
            .map(|(id, _)| *id)
    }

    /// The tables with identities spelled out as (site, labels) (`None` for
    /// [`WORLD`]), to compare compilations that numbered identities apart.
    pub fn canonical(&self) -> CanonicalTables {
        let name = |id: &Identity| self.identities.get(id).cloned();
        CanonicalTables {
            ipcache: self
                .tables
                .ipcache
                .iter()
                .map(|(net, id)| (*net, name(id)))
                .collect(),
            dsts: self
                .tables
                .dsts
                .iter()
                .map(|(id, p)| {
                    let tuples = p
                        .tuples
                        .iter()
                        .map(|(k, v)| ((name(&k.src), k.protocol, k.first), *v))
                        .collect();
                    (name(id), (p.governed, tuples))
                })
                .collect(),
        }
    }

    /// Rebuilds the ipcache and hosts from the endpoints and identities.
    pub(crate) fn rebuild_addresses(&mut self) {
        let ids: BTreeMap<&IdentityKey, Identity> =
            self.identities.iter().map(|(id, k)| (k, *id)).collect();
        let mut ipcache = BTreeMap::new();
        let mut hosts: BTreeMap<Identity, BTreeSet<String>> = BTreeMap::new();
        for e in self.endpoints.values() {
            let Some(&id) = ids.get(&IdentityKey::of(e)) else {
                continue; // Unreachable: every endpoint's key is numbered.
            };
            for net in &e.prefixes {
                ipcache.entry(net.trunc()).or_insert(id);
            }
            if let Some(node) = &e.node {
                hosts.entry(id).or_default().insert(node.clone());
            }
        }
        self.tables.ipcache = ipcache;
        self.hosts = hosts;
    }

    /// Recomputes the policy of the destination identities `dsts` (which
    /// must all be numbered) from the current policies and identities.
    pub(crate) fn recompute(&mut self, dsts: &BTreeSet<Identity>) {
        let mut sources = SourceCache::default();
        for &dst in dsts {
            let Some(key) = self.identities.get(&dst) else {
                continue;
            };
            let policy = dst_policy(key, &self.policies, &self.identities, &mut sources);
            self.tables.dsts.insert(dst, policy);
        }
    }
}

/// [`PolicyTables`] with identities replaced by what they stand for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalTables {
    /// Prefix -> identity key.
    pub ipcache: BTreeMap<IpNet, Option<IdentityKey>>,
    /// Destination -> (governed, (src, protocol, first) -> (last, verdict)).
    #[allow(clippy::type_complexity)]
    pub dsts: BTreeMap<
        Option<IdentityKey>,
        (
            bool,
            BTreeMap<(Option<IdentityKey>, Protocol, u16), TupleValue>,
        ),
    >,
}

fn by_name<T: Clone>(items: &[T], name: impl Fn(&T) -> &String) -> BTreeMap<String, T> {
    items.iter().map(|i| (name(i).clone(), i.clone())).collect()
}

/// Source identities per selector, memoised: rules share selectors.
#[derive(Default)]
struct SourceCache {
    by_selector: BTreeMap<Selector, Vec<Identity>>,
}

impl SourceCache {
    fn sources(
        &mut self,
        from: Option<&Selector>,
        identities: &BTreeMap<Identity, IdentityKey>,
    ) -> Vec<Identity> {
        match from {
            None => std::iter::once(WORLD)
                .chain(identities.keys().copied())
                .collect(),
            Some(sel) => self
                .by_selector
                .entry(sel.clone())
                .or_insert_with(|| {
                    identities
                        .iter()
                        .filter(|(_, k)| k.selected_by(sel))
                        .map(|(id, _)| *id)
                        .collect()
                })
                .clone(),
        }
    }
}

/// Port intervals (as u32, inclusive) collected per (src, protocol), each
/// with the ordinal of its rule (the order in which rules decide).
#[derive(Default)]
struct Intervals {
    allow: Vec<(u32, u32, u32)>,
    deny: Vec<(u32, u32, u32)>,
}

fn dst_policy(
    dst: &IdentityKey,
    policies: &BTreeMap<String, Policy>,
    identities: &BTreeMap<Identity, IdentityKey>,
    sources: &mut SourceCache,
) -> DstPolicy {
    let mut governed = false;
    let mut collected: BTreeMap<(Identity, Protocol), Intervals> = BTreeMap::new();
    // Ordinal → rule; ordinals follow policy (name) order, then file order.
    let mut all_rules: Vec<RuleRef> = Vec::new();
    for policy in policies.values().filter(|p| dst.selected_by(&p.target)) {
        governed = true;
        let rules = (0u32..)
            .zip(&policy.ingress)
            .map(|(i, r)| (i, r, RuleList::Ingress))
            .chain(
                (0u32..)
                    .zip(&policy.deny)
                    .map(|(i, r)| (i, r, RuleList::Deny)),
            );
        for (index, rule, list) in rules {
            let ordinal = u32::try_from(all_rules.len()).unwrap_or(u32::MAX);
            all_rules.push(RuleRef {
                policy: policy.name.clone(),
                list,
                index,
            });
            let port_rules = rule.port_rules();
            for src in sources.sources(rule.from.as_ref(), identities) {
                for pr in &port_rules {
                    let iv = collected.entry((src, pr.protocol)).or_default();
                    let range = (u32::from(pr.ports.first), u32::from(pr.ports.last), ordinal);
                    match list {
                        RuleList::Ingress => iv.allow.push(range),
                        RuleList::Deny => iv.deny.push(range),
                    }
                }
            }
        }
    }
    // Ordinal → index in the rules that decide something.
    let mut used: BTreeMap<u32, u32> = BTreeMap::new();
    let mut resolved = Vec::new();
    for ((src, protocol), iv) in collected {
        for (first, last, verdict, ordinal) in resolve(iv) {
            // Both ends come from u16 ports, so they fit back.
            let (Ok(first), Ok(last)) = (u16::try_from(first), u16::try_from(last)) else {
                continue;
            };
            used.insert(ordinal, 0);
            resolved.push((src, protocol, first, last, verdict, ordinal));
        }
    }
    let mut rules = Vec::with_capacity(used.len());
    for (ordinal, index) in &mut used {
        *index = u32::try_from(rules.len()).unwrap_or(u32::MAX);
        if let Some(r) = all_rules.get(*ordinal as usize) {
            rules.push(r.clone());
        }
    }
    let tuples = resolved
        .into_iter()
        .map(|(src, protocol, first, last, verdict, ordinal)| {
            (
                TupleKey {
                    src,
                    protocol,
                    first,
                },
                TupleValue {
                    last,
                    verdict,
                    rule: used.get(&ordinal).copied().unwrap_or(0),
                },
            )
        })
        .collect();
    DstPolicy {
        governed,
        tuples,
        rules,
    }
}

/// Disjoint, sorted ranges with their verdict and deciding rule ordinal:
/// deny where any deny covers (the smallest covering deny ordinal), allow
/// where only allows cover (the smallest covering allow ordinal); adjacent
/// ranges with the same verdict and rule are joined.
fn resolve(iv: Intervals) -> Vec<(u32, u32, Verdict, u32)> {
    // Sweep over range boundaries with the covering ordinals of each kind
    // (a multiset: ordinal → how many intervals of it cover).
    let mut events: Vec<(u32, bool, Verdict, u32)> = Vec::new();
    for (list, verdict) in [(&iv.deny, Verdict::Deny), (&iv.allow, Verdict::Allow)] {
        for &(a, b, ordinal) in list {
            events.push((a, true, verdict, ordinal));
            events.push((b + 1, false, verdict, ordinal));
        }
    }
    events.sort_unstable_by_key(|e| e.0);
    let mut deny: BTreeMap<u32, u32> = BTreeMap::new();
    let mut allow: BTreeMap<u32, u32> = BTreeMap::new();
    let mut out: Vec<(u32, u32, Verdict, u32)> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while i < events.len() && events[i].0 == at {
            let (_, start, verdict, ordinal) = events[i];
            let set = match verdict {
                Verdict::Deny => &mut deny,
                Verdict::Allow => &mut allow,
            };
            if start {
                *set.entry(ordinal).or_insert(0) += 1;
            } else if let Some(n) = set.get_mut(&ordinal) {
                *n -= 1;
                if *n == 0 {
                    set.remove(&ordinal);
                }
            }
            i += 1;
        }
        let Some(&(next, ..)) = events.get(i) else {
            break;
        };
        let decided = match (deny.keys().next(), allow.keys().next()) {
            (Some(&d), _) => Some((Verdict::Deny, d)),
            (None, Some(&a)) => Some((Verdict::Allow, a)),
            (None, None) => None,
        };
        let Some((verdict, ordinal)) = decided else {
            continue;
        };
        let last = next - 1;
        match out.last_mut() {
            Some(prev) if prev.1 + 1 == at && prev.2 == verdict && prev.3 == ordinal => {
                prev.1 = last;
            }
            Some(_) | None => out.push((at, last, verdict, ordinal)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_carves_holes_in_allows() {
        let iv = Intervals {
            allow: vec![(80, 90, 0), (85, 100, 0), (200, 200, 0)],
            deny: vec![(85, 86, 1), (95, 95, 1), (300, 400, 1)],
        };
        assert_eq!(
            resolve(iv),
            vec![
                (80, 84, Verdict::Allow, 0),
                (85, 86, Verdict::Deny, 1),
                (87, 94, Verdict::Allow, 0),
                (95, 95, Verdict::Deny, 1),
                (96, 100, Verdict::Allow, 0),
                (200, 200, Verdict::Allow, 0),
                (300, 400, Verdict::Deny, 1),
            ]
        );
    }

    #[test]
    fn the_first_covering_rule_decides() {
        let iv = Intervals {
            allow: vec![(80, 90, 2), (85, 100, 0), (95, 95, 3)],
            deny: vec![(88, 89, 5), (86, 96, 4)],
        };
        assert_eq!(
            resolve(iv),
            vec![
                (80, 84, Verdict::Allow, 2),
                (85, 85, Verdict::Allow, 0),
                (86, 96, Verdict::Deny, 4),
                (97, 100, Verdict::Allow, 0),
            ]
        );
    }

    #[test]
    fn full_range_deny_leaves_nothing_allowed() {
        let iv = Intervals {
            allow: vec![(0, 65535, 0)],
            deny: vec![(0, 65535, 1)],
        };
        assert_eq!(resolve(iv), vec![(0, 65535, Verdict::Deny, 1)]);
    }
}
