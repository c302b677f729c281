//! Limits and checks of an agent's `Report`, before the controller reads
//! anything in it: a report is bounded in size, lists each peer once with a
//! valid key, and its strings are short. A report that breaks one is
//! refused whole (nothing of it is recorded).
//!
//! What the report may say is the controller's to decide: only peers in
//! the node's current config count, at most about twice that many may be
//! listed (`weft-controller`).

use std::collections::BTreeMap;

use prost::Message as _;

use crate::convert::{InvalidMessage, parse_endpoint, parse_key};
use crate::pb;

/// Largest encoded report accepted, in bytes (a full mesh of 10,000 nodes
/// reports about 1.5 MB).
pub const MAX_REPORT_BYTES: usize = 3 << 20;
/// Most peers one report may list, whatever the node's config.
pub const MAX_REPORT_PEERS: usize = 20_000;
/// Longest `peers[].endpoint` (an `IP:PORT`, at most 47 characters for
/// IPv6 with brackets and port).
pub const MAX_ENDPOINT_LEN: usize = 64;
/// Longest `apply_error`, in bytes (agents cut theirs to this).
pub const MAX_APPLY_ERROR_LEN: usize = 4096;
/// Most per-rule and per-verdict policy counters one report may list.
pub const MAX_POLICY_COUNTERS: usize = 65_536;
/// Longest rule or verdict name in the policy counters.
pub const MAX_COUNTER_NAME_LEN: usize = 256;
/// Most tunnel drop counters (one per reason) one report may list.
pub const MAX_TUNNEL_DROP_COUNTERS: usize = 16;
/// Largest gRPC message an agent may send at all (the transport's limit,
/// above [`MAX_REPORT_BYTES`] so that a report over its own limit gets the
/// report's error).
pub const MAX_AGENT_MESSAGE_BYTES: usize = 4 << 20;

/// Why a report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Larger than [`MAX_REPORT_BYTES`].
    #[error("report refused: {bytes} bytes is over the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    /// More peers than the limit (absolute, or relative to the node's config).
    #[error("report refused: it lists {count} peers, over the limit of {limit}{why}")]
    TooManyPeers {
        count: usize,
        limit: usize,
        why: String,
    },
    /// More policy counters than [`MAX_POLICY_COUNTERS`].
    #[error("report refused: it lists {count} policy counters, over the limit of {limit}")]
    TooManyCounters { count: usize, limit: usize },
    /// A field is malformed (named).
    #[error("report refused: {0}")]
    Invalid(#[from] InvalidMessage),
}

impl ReportError {
    /// Whether this is a size limit (`RESOURCE_EXHAUSTED`) rather than a
    /// malformed field (`INVALID_ARGUMENT`).
    #[must_use]
    pub fn is_limit(&self) -> bool {
        !matches!(self, ReportError::Invalid(_))
    }
}

const M: &str = "ReportRequest";

fn too_long(field: String, len: usize, limit: usize) -> ReportError {
    ReportError::Invalid(InvalidMessage::new(
        M,
        field,
        format!("{len} bytes, over the limit of {limit}"),
    ))
}

/// Checks a report against the limits above: its size, the number of
/// peers and counters, each peer's key (valid and listed once: a peer
/// given twice is refused, not counted twice), endpoint and probe, and the
/// length of every string.
///
/// # Errors
/// [`ReportError`] naming the limit or the field.
pub fn check_report(r: &pb::ReportRequest) -> Result<(), ReportError> {
    let bytes = r.encoded_len();
    if bytes > MAX_REPORT_BYTES {
        return Err(ReportError::TooLarge {
            bytes,
            limit: MAX_REPORT_BYTES,
        });
    }
    if r.peers.len() > MAX_REPORT_PEERS {
        return Err(ReportError::TooManyPeers {
            count: r.peers.len(),
            limit: MAX_REPORT_PEERS,
            why: String::new(),
        });
    }
    if r.apply_error.len() > MAX_APPLY_ERROR_LEN {
        return Err(too_long(
            "apply_error".into(),
            r.apply_error.len(),
            MAX_APPLY_ERROR_LEN,
        ));
    }
    let mut first = BTreeMap::new();
    for (i, p) in r.peers.iter().enumerate() {
        let field = |f: &str| format!("peers[{i}].{f}");
        let key = parse_key(M, &field("public_key"), &p.public_key)?;
        if let Some(j) = first.insert(key, i) {
            return Err(InvalidMessage::new(
                M,
                field("public_key"),
                format!("peer {key} is listed twice (also peers[{j}]); one entry per peer"),
            )
            .into());
        }
        if p.endpoint.len() > MAX_ENDPOINT_LEN {
            return Err(too_long(
                field("endpoint"),
                p.endpoint.len(),
                MAX_ENDPOINT_LEN,
            ));
        }
        parse_endpoint(M, &field("endpoint"), &p.endpoint)?;
        if let Some(probe) = &p.probe
            && probe.loss_permille > 1000
        {
            return Err(InvalidMessage::new(
                M,
                field("probe.loss_permille"),
                format!("{} is over 1000", probe.loss_permille),
            )
            .into());
        }
    }
    if r.tunnel_drops.len() > MAX_TUNNEL_DROP_COUNTERS {
        return Err(ReportError::TooManyCounters {
            count: r.tunnel_drops.len(),
            limit: MAX_TUNNEL_DROP_COUNTERS,
        });
    }
    for (i, c) in r.tunnel_drops.iter().enumerate() {
        if c.verdict.len() > MAX_COUNTER_NAME_LEN {
            return Err(too_long(
                format!("tunnel_drops[{i}].verdict"),
                c.verdict.len(),
                MAX_COUNTER_NAME_LEN,
            ));
        }
    }
    if let Some(policy) = &r.policy {
        let count = policy.rules.len() + policy.verdicts.len();
        if count > MAX_POLICY_COUNTERS {
            return Err(ReportError::TooManyCounters {
                count,
                limit: MAX_POLICY_COUNTERS,
            });
        }
        let names = policy
            .rules
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("policy.rules[{i}].rule"), &c.rule))
            .chain(
                policy
                    .verdicts
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("policy.verdicts[{i}].verdict"), &c.verdict)),
            );
        for (field, name) in names {
            if name.len() > MAX_COUNTER_NAME_LEN {
                return Err(too_long(field, name.len(), MAX_COUNTER_NAME_LEN));
            }
        }
    }
    Ok(())
}

/// `s` cut to at most `max` bytes, at a character boundary.
#[must_use]
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(k: u8) -> pb::PeerStatus {
        pb::PeerStatus {
            public_key: vec![k; 32],
            endpoint: "198.18.0.1:51820".into(),
            ..Default::default()
        }
    }

    fn report(peers: Vec<pb::PeerStatus>) -> pb::ReportRequest {
        pb::ReportRequest {
            peers,
            ..Default::default()
        }
    }

    #[test]
    fn a_sane_report_passes() {
        assert_eq!(check_report(&report((1..=50).map(peer).collect())), Ok(()));
    }

    #[test]
    fn a_peer_listed_twice_is_refused_naming_both_entries() {
        let e = check_report(&report(vec![peer(1), peer(2), peer(1)])).expect_err("refused");
        assert!(!e.is_limit());
        let msg = e.to_string();
        assert!(
            msg.contains("peers[2].public_key") && msg.contains("also peers[0]"),
            "{msg}"
        );
    }

    #[test]
    fn limits_are_named() {
        let many: Vec<pb::PeerStatus> = (0..=MAX_REPORT_PEERS)
            .map(|i| pb::PeerStatus {
                public_key: {
                    let mut k = vec![1; 32];
                    k[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    k
                },
                ..Default::default()
            })
            .collect();
        let e = check_report(&report(many)).expect_err("too many");
        assert!(e.is_limit());
        assert!(e.to_string().contains("over the limit of 20000"), "{e}");

        let mut r = report(vec![peer(1)]);
        r.apply_error = "x".repeat(MAX_APPLY_ERROR_LEN + 1);
        let e = check_report(&r).expect_err("long error");
        assert!(e.to_string().contains("apply_error"), "{e}");

        let mut p = peer(1);
        p.endpoint = format!("198.18.0.1:{}", "1".repeat(100));
        let e = check_report(&report(vec![p])).expect_err("long endpoint");
        assert!(e.to_string().contains("peers[0].endpoint"), "{e}");

        let mut p = peer(1);
        p.endpoint = "nowhere".into();
        let e = check_report(&report(vec![p])).expect_err("bad endpoint");
        assert!(e.to_string().contains("is not IP:PORT"), "{e}");

        let e = check_report(&report(vec![pb::PeerStatus {
            public_key: vec![1; 31],
            ..Default::default()
        }]))
        .expect_err("short key");
        assert!(e.to_string().contains("peers[0].public_key"), "{e}");

        let mut r = report(vec![]);
        r.apply_error = "y".repeat(MAX_APPLY_ERROR_LEN);
        r.policy = Some(pb::PolicyStatus {
            rules: vec![
                pb::RuleCounter {
                    rule: "z".repeat(1000),
                    ..Default::default()
                };
                (MAX_REPORT_BYTES / 1000) + 1
            ],
            ..Default::default()
        });
        let e = check_report(&r).expect_err("large");
        assert!(matches!(e, ReportError::TooLarge { .. }), "{e}");
        assert!(e.is_limit());
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
