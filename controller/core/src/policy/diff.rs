//! The reachability diff of a policy change, for `apply --dry-run`.
//!
//! Method: only a destination selected (by target) by a policy that is
//! added, removed or changed can change verdict, because a verdict depends
//! only on the policies selecting the destination. For each such
//! destination and every other endpoint as source, the verdicts before and
//! after are compared with the naive evaluator at a finite set of probes:
//! per TCP and UDP, port 0 and every boundary of every port range in the
//! old and new policies (`first` and `last + 1`). Between two consecutive
//! boundaries every rule covers all ports or none, so one probe decides
//! the whole interval; ICMP has one probe. Adjacent intervals with the same
//! change are merged. Sources are known endpoints only: traffic from
//! addresses outside the overlay's endpoints is not listed. The cost is
//! endpoints x affected destinations x boundaries x rules, and the output
//! is sorted, so it is deterministic.

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::eval::evaluate;
use crate::policy::model::{Endpoint, Policy, PortRange, Protocol, Verdict};

/// One endpoint pair that gains or loses access to some traffic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReachabilityChange {
    /// Source endpoint name.
    pub from: String,
    /// Destination endpoint name.
    pub to: String,
    /// The protocol.
    pub protocol: Protocol,
    /// The destination ports ([`PortRange::ALL`] for ICMP).
    pub ports: PortRange,
    /// True if the traffic is allowed after the change and denied before.
    pub gained: bool,
}

/// What changes between `old` and `new` policies for traffic between
/// `endpoints`, sorted by source, destination, protocol and port.
pub fn reachability_diff(
    old: &[Policy],
    new: &[Policy],
    endpoints: &[Endpoint],
) -> Vec<ReachabilityChange> {
    let by_name = |ps: &[Policy]| -> BTreeMap<String, Policy> {
        ps.iter().map(|p| (p.name.clone(), p.clone())).collect()
    };
    let (old_map, new_map) = (by_name(old), by_name(new));
    let names: BTreeSet<&String> = old_map.keys().chain(new_map.keys()).collect();
    let changed: Vec<&Policy> = names
        .into_iter()
        .filter(|n| old_map.get(*n) != new_map.get(*n))
        .flat_map(|n| old_map.get(n).into_iter().chain(new_map.get(n)))
        .collect();
    if changed.is_empty() {
        return Vec::new();
    }
    let mut sorted: Vec<&Endpoint> = endpoints.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let dsts: Vec<&Endpoint> = sorted
        .iter()
        .copied()
        .filter(|e| changed.iter().any(|p| p.target.matches(&e.site, &e.labels)))
        .collect();
    let probes = probes(old.iter().chain(new));

    let mut out = Vec::new();
    for src in &sorted {
        for dst in &dsts {
            if src.name == dst.name {
                continue;
            }
            for (protocol, starts) in &probes {
                // (first port, gained) of the interval being extended.
                let mut open: Option<(u16, bool)> = None;
                for (i, &start) in starts.iter().enumerate() {
                    let before = evaluate(old, Some(src), Some(dst), *protocol, start);
                    let after = evaluate(new, Some(src), Some(dst), *protocol, start);
                    let change = (before != after).then_some(after == Verdict::Allow);
                    let end = starts
                        .get(i + 1)
                        .map_or(u16::MAX, |next| next.saturating_sub(1));
                    match (open, change) {
                        (Some((_, g)), Some(c)) if g == c => {}
                        (Some((first, gained)), _) => {
                            out.push(ReachabilityChange {
                                from: src.name.clone(),
                                to: dst.name.clone(),
                                protocol: *protocol,
                                ports: PortRange {
                                    first,
                                    last: start.saturating_sub(1),
                                },
                                gained,
                            });
                            open = change.map(|c| (start, c));
                        }
                        (None, c) => open = c.map(|c| (start, c)),
                    }
                    if i + 1 == starts.len()
                        && let Some((first, gained)) = open
                    {
                        out.push(ReachabilityChange {
                            from: src.name.clone(),
                            to: dst.name.clone(),
                            protocol: *protocol,
                            ports: if protocol.has_ports() {
                                PortRange { first, last: end }
                            } else {
                                PortRange::ALL
                            },
                            gained,
                        });
                    }
                }
            }
        }
    }
    out.sort();
    out
}

/// Per protocol, the first port of every interval on which all rules of
/// `policies` agree (ICMP: just one probe).
fn probes<'a>(policies: impl Iterator<Item = &'a Policy>) -> Vec<(Protocol, Vec<u16>)> {
    let mut bounds: BTreeMap<Protocol, BTreeSet<u16>> = Protocol::ALL
        .iter()
        .map(|&p| (p, BTreeSet::from([0])))
        .collect();
    for policy in policies {
        for rule in policy.ingress.iter().chain(&policy.deny) {
            for pr in rule.port_rules() {
                if !pr.protocol.has_ports() {
                    continue;
                }
                let set = bounds.entry(pr.protocol).or_default();
                set.insert(pr.ports.first);
                if let Some(next) = pr.ports.last.checked_add(1) {
                    set.insert(next);
                }
            }
        }
    }
    bounds
        .into_iter()
        .map(|(p, set)| (p, set.into_iter().collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_documents;

    fn endpoint(name: &str, app: &str) -> Endpoint {
        Endpoint {
            name: name.to_owned(),
            site: "s1".to_owned(),
            node: Some(name.to_owned()),
            labels: [("app".to_owned(), app.to_owned())].into(),
            prefixes: Vec::new(),
        }
    }

    fn policies(text: &str) -> Vec<Policy> {
        parse_documents("t.yaml", text).expect("valid policies")
    }

    #[test]
    fn a_new_policy_closes_all_but_its_allowed_ports_and_merges_ranges() {
        let eps = [endpoint("lb", "lb"), endpoint("web", "web")];
        let new = policies(
            r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  target: {matchLabels: {app: web}}
  ingress:
    - from: {matchLabels: {app: lb}}
      ports: [{protocol: TCP, portRange: "443-444"}, {protocol: TCP, port: 445}]
"#,
        );
        let diff = reachability_diff(&[], &new, &eps);
        let lost = |protocol, first, last| ReachabilityChange {
            from: "lb".into(),
            to: "web".into(),
            protocol,
            ports: PortRange { first, last },
            gained: false,
        };
        assert_eq!(
            diff,
            vec![
                lost(Protocol::Tcp, 0, 442),
                lost(Protocol::Tcp, 446, 65535),
                lost(Protocol::Udp, 0, 65535),
                lost(Protocol::Icmp, 0, 65535),
            ]
        );
        // And back: removing the policy gains exactly what was lost.
        let back = reachability_diff(&new, &[], &eps);
        assert_eq!(back.len(), 4);
        assert!(back.iter().all(|c| c.gained), "{back:?}");
        assert!(reachability_diff(&new, &new, &eps).is_empty());
    }
}
