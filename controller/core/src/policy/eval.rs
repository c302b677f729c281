//! The naive evaluator: policy semantics read straight off the resources.
//!
//! Slow (it looks at every rule of every policy per packet) and obviously
//! right; the compiled form is tested against it.

use crate::policy::model::{Endpoint, Policy, Protocol, Rule, Verdict};

/// The verdict for a packet from `src` to `dst` (`None`: an address that
/// belongs to no known endpoint), of `protocol` to `port` (ignored for ICMP).
///
/// Deny if any deny rule of a policy selecting `dst` matches; else allow if
/// no policy selects `dst`; else allow iff some allow rule matches.
pub fn evaluate(
    policies: &[Policy],
    src: Option<&Endpoint>,
    dst: Option<&Endpoint>,
    protocol: Protocol,
    port: u16,
) -> Verdict {
    let Some(dst) = dst else {
        return Verdict::Allow; // Nothing we govern.
    };
    let selecting = || {
        policies
            .iter()
            .filter(|p| p.target.matches(&dst.site, &dst.labels))
    };
    let matches = |rule: &Rule| {
        let from_ok = match (&rule.from, src) {
            (None, _) => true,
            (Some(sel), Some(src)) => sel.matches(&src.site, &src.labels),
            (Some(_), None) => false,
        };
        from_ok && rule.covers(protocol, port)
    };
    if selecting().any(|p| p.deny.iter().any(matches)) {
        return Verdict::Deny;
    }
    if selecting().next().is_none() {
        return Verdict::Allow;
    }
    if selecting().any(|p| p.ingress.iter().any(matches)) {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

/// Which part of the policies decided a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Rule `deny[rule]` of `policy` matched (a deny wins over any allow).
    Deny {
        /// The policy's name.
        policy: String,
        /// Index in the policy's `deny` list.
        rule: usize,
    },
    /// Rule `ingress[rule]` of `policy` matched.
    Allow {
        /// The policy's name.
        policy: String,
        /// Index in the policy's `ingress` list.
        rule: usize,
    },
    /// The destination is governed by these policies and none allows it.
    DefaultDeny {
        /// Names of the policies that select the destination.
        policies: Vec<String>,
    },
    /// No policy selects the destination, so it is open.
    NotGoverned,
    /// The destination belongs to no known endpoint (nothing we govern).
    UnknownDestination,
}

/// A verdict with the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// What happens to the packet (always equal to [`evaluate`]'s).
    pub verdict: Verdict,
    /// Why.
    pub decision: Decision,
}

/// [`evaluate`], also saying which rule decided: the first matching deny
/// rule (policies in the order given, rules in file order), else the first
/// matching ingress rule, else default deny or not governed.
pub fn explain(
    policies: &[Policy],
    src: Option<&Endpoint>,
    dst: Option<&Endpoint>,
    protocol: Protocol,
    port: u16,
) -> Explanation {
    let Some(dst) = dst else {
        return Explanation {
            verdict: Verdict::Allow,
            decision: Decision::UnknownDestination,
        };
    };
    let selecting: Vec<&Policy> = policies
        .iter()
        .filter(|p| p.target.matches(&dst.site, &dst.labels))
        .collect();
    let matches = |rule: &Rule| {
        let from_ok = match (&rule.from, src) {
            (None, _) => true,
            (Some(sel), Some(src)) => sel.matches(&src.site, &src.labels),
            (Some(_), None) => false,
        };
        from_ok && rule.covers(protocol, port)
    };
    let first_match = |rules: fn(&Policy) -> &Vec<Rule>| {
        selecting.iter().find_map(|p| {
            rules(p)
                .iter()
                .position(&matches)
                .map(|rule| (p.name.clone(), rule))
        })
    };
    if let Some((policy, rule)) = first_match(|p| &p.deny) {
        return Explanation {
            verdict: Verdict::Deny,
            decision: Decision::Deny { policy, rule },
        };
    }
    if selecting.is_empty() {
        return Explanation {
            verdict: Verdict::Allow,
            decision: Decision::NotGoverned,
        };
    }
    match first_match(|p| &p.ingress) {
        Some((policy, rule)) => Explanation {
            verdict: Verdict::Allow,
            decision: Decision::Allow { policy, rule },
        },
        None => Explanation {
            verdict: Verdict::Deny,
            decision: Decision::DefaultDeny {
                policies: selecting.iter().map(|p| p.name.clone()).collect(),
            },
        },
    }
}
