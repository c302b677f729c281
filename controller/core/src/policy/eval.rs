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
