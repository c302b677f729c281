//! Admin credentials and the audit trail: named bearer tokens with a role
//! and an expiry (kept as SHA-256 hashes only), which RPCs each role may
//! call, and the records of admin changes. Pure: times are arguments.

use serde::{Deserialize, Serialize};

use crate::model::hex32;

/// Name of the token written to `admin.conf` when the controller creates a
/// network; listed and revoked like any other.
pub const BOOTSTRAP_TOKEN: &str = "bootstrap";

/// Lifetime of an admin token when none is asked for: 30 days.
pub const DEFAULT_ADMIN_TOKEN_TTL_SECS: u64 = 30 * 86_400;

/// Longest admin token lifetime: 366 days.
pub const MAX_ADMIN_TOKEN_TTL_SECS: u64 = 366 * 86_400;

/// What an admin credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every AdminService RPC.
    Admin,
    /// Read-only RPCs ([`is_read_only`]) and policy dry runs.
    Viewer,
}

impl Role {
    /// `admin` or `viewer`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    /// Parses `admin` or `viewer`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A named admin credential. The secret itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// Unique name (a DNS label), shown in the audit log.
    pub name: String,
    /// What the token may do.
    pub role: Role,
    /// SHA-256 of the bearer secret.
    #[serde(with = "hex32")]
    pub secret_hash: [u8; 32],
    /// When the token was created (unix seconds).
    pub created_unix: u64,
    /// First second at which the token is refused; 0: never expires (the
    /// bootstrap token only).
    pub expires_unix: u64,
    /// When the token was revoked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix: Option<u64>,
}

impl AdminToken {
    /// Whether the token is accepted at `now`.
    pub fn usable(&self, now: u64) -> bool {
        self.revoked_unix.is_none() && (self.expires_unix == 0 || now < self.expires_unix)
    }
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No admin token has this secret.
    #[error("admin token is not valid for this controller")]
    Unknown,
    /// The token was revoked.
    #[error("admin token {name:?} was revoked at {}", crate::time::rfc3339(*.at))]
    Revoked { name: String, at: u64 },
    /// The token's lifetime is over.
    #[error("admin token {name:?} expired at {}", crate::time::rfc3339(*.at))]
    Expired { name: String, at: u64 },
}

/// Whether an AdminService RPC (by its method name, e.g. `ListNodes`) only
/// reads: a viewer may call it. Everything else, including any RPC added
/// later and not listed here, needs the admin role. `ApplyPolicies` is
/// checked by the API itself (a viewer may dry-run).
pub fn is_read_only(method: &str) -> bool {
    method.starts_with("List")
        || method.starts_with("Get")
        || matches!(method, "ExplainPolicy" | "TraceRoute")
}

/// One admin change (or refused attempt), as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// When (unix seconds).
    pub unix: u64,
    /// Name of the admin token used (`controller` for the controller's own
    /// changes at start-up).
    pub credential: String,
    /// The RPC, e.g. `SetNodeLabels`.
    pub rpc: String,
    /// What changed, e.g. `node=a1 set role=web`; every value escaped.
    pub summary: String,
    /// The revision after the change (the unchanged revision when refused).
    pub revision: u64,
    /// `ok`, or `refused: <why>`.
    pub outcome: String,
}

pub use weft_dataplane_core::escape::escape;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_are_read_only() {
        for m in [
            "ListNodes",
            "GetNode",
            "GetTopology",
            "ListRoutes",
            "ExplainPolicy",
            "TraceRoute",
            "ListAuditRecords",
            "ListAdminTokens",
        ] {
            assert!(is_read_only(m), "{m}");
        }
        for m in [
            "SetNodeLabels",
            "DeleteNode",
            "ApplyPolicies",
            "CreateAdminToken",
            "RevokeAdminToken",
            "SetTopology",
            "SomeFutureRpc",
        ] {
            assert!(!is_read_only(m), "{m}");
        }
    }

    #[test]
    fn usable_until_expiry_or_revocation() {
        let mut t = AdminToken {
            name: "ci".into(),
            role: Role::Viewer,
            secret_hash: [1; 32],
            created_unix: 100,
            expires_unix: 200,
            revoked_unix: None,
        };
        assert!(t.usable(199));
        assert!(!t.usable(200));
        t.expires_unix = 0;
        assert!(t.usable(u64::MAX), "0 never expires");
        t.revoked_unix = Some(150);
        assert!(!t.usable(151));
    }
}
