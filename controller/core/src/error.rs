//! Errors of the controller core, worded for an operator to act on as-is.

use crate::model::{MAX_ADVERTISED, MAX_LABELS, Member};
use crate::policy::PolicyErrors;
use crate::state::CertRefused;
use crate::time::rfc3339;

/// Why a state mutation (or a consistency check) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A site, node or external peer name is not a DNS label.
    #[error(
        "invalid {kind} name {name:?}: use 1 to 63 characters from a-z, 0-9 and '-', not starting or ending with '-'"
    )]
    InvalidName { kind: &'static str, name: String },
    /// A node id or join token id is malformed.
    #[error("invalid {kind} {id:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '-' and '_'")]
    InvalidId { kind: &'static str, id: String },
    /// The topology settings cannot work.
    #[error("invalid topology: {0}")]
    InvalidTopology(String),
    /// The network settings cannot work.
    #[error("invalid network settings: {0}")]
    InvalidSettings(String),
    /// A public key is all zeros (WireGuard's "no key").
    #[error("public key must not be all zeros")]
    ZeroKey,

    /// No site has this name.
    #[error("site {0:?} not found")]
    SiteNotFound(String),
    /// A site with this name already exists.
    #[error("site {0:?} already exists")]
    SiteExists(String),
    /// The site still has members.
    #[error(
        "site {name:?} still has {nodes} node(s) and {external_peers} external peer(s); delete them first"
    )]
    SiteNotEmpty {
        name: String,
        nodes: usize,
        external_peers: usize,
    },

    /// A join token with this id already exists.
    #[error("join token {0} already exists")]
    TokenExists(String),
    /// No join token has this id (admin operations only; see `TokenInvalid`).
    #[error("join token {0} not found")]
    TokenNotFound(String),
    /// Registration with an unknown token or a wrong secret (one message for
    /// both, so a caller without the secret learns nothing).
    #[error("join token {0} is unknown or its secret does not match")]
    TokenInvalid(String),
    /// The single-use token was already used.
    #[error("join token {id} was already used by node {node}")]
    TokenUsed { id: String, node: String },
    /// The token's lifetime is over.
    #[error("join token {id} expired at {}", rfc3339(*.expires_unix))]
    TokenExpired { id: String, expires_unix: u64 },
    /// The requested token lifetime is out of range.
    #[error("join token lifetime must be between 1 second and 30 days (2592000 s), got {0} s")]
    InvalidTokenTtl(u64),

    /// No node has this id or name.
    #[error("node {0:?} not found")]
    NodeNotFound(String),
    /// The node id collides with an existing node id or member name.
    #[error("node id {id} is already taken by {holder}")]
    NodeIdTaken { id: String, holder: Member },
    /// The name collides with an existing node id or member name.
    #[error("{kind} name {name:?} is already taken by {holder}")]
    NameTaken {
        kind: &'static str,
        name: String,
        holder: Member,
    },
    /// The WireGuard public key is already in use.
    #[error("public key {key} is already used by {holder}")]
    KeyInUse { key: String, holder: Member },
    /// The client certificate is already bound to another node.
    #[error("client certificate {fingerprint} is already bound to {holder}")]
    CertInUse { fingerprint: String, holder: Member },

    /// No external peer has this name.
    #[error("external peer {0:?} not found")]
    ExternalPeerNotFound(String),

    /// A label key is malformed.
    #[error(
        "invalid label key {0:?}: use up to 253 characters from A-Z, a-z, 0-9, '.', '_', '-', '/', starting and ending with a letter or digit"
    )]
    InvalidLabelKey(String),
    /// A label value is malformed.
    #[error(
        "invalid value {value:?} for label {key:?}: use up to 63 characters from A-Z, a-z, 0-9, '.', '_', '-'"
    )]
    InvalidLabelValue { key: String, value: String },
    /// One request both sets and removes a label.
    #[error("label {0:?} is both set and removed; do one or the other")]
    LabelSetAndRemoved(String),
    /// More labels than a member may carry.
    #[error("{count} labels given; at most {MAX_LABELS} are allowed")]
    TooManyLabels { count: usize },

    /// Policy files failed validation (every error, named by file,
    /// resource and field); nothing was applied.
    #[error("policies refused, nothing was applied:\n{0}")]
    InvalidPolicies(PolicyErrors),
    /// A policy is not acceptable as a whole (e.g. given twice).
    #[error("policy {name:?} refused, nothing was applied: {reason}")]
    InvalidPolicy { name: String, reason: String },
    /// No policy has this name.
    #[error("policy {0:?} not found")]
    PolicyNotFound(String),
    /// No node or external peer has this name.
    #[error("no node or external peer is named {0:?}")]
    EndpointNotFound(String),

    /// A workload prefix is malformed or cannot be routed.
    #[error("invalid workload prefix {prefix}: {reason}")]
    InvalidPrefix { prefix: String, reason: String },
    /// A workload prefix overlaps one advertised already.
    #[error("workload prefix {prefix} overlaps {other}, already advertised by node {node:?}")]
    PrefixOverlap {
        prefix: String,
        other: String,
        node: String,
    },
    /// A workload prefix overlaps an overlay address pool.
    #[error(
        "workload prefix {prefix} overlaps the network's overlay pool {pool}; advertise prefixes outside it"
    )]
    PrefixInPool { prefix: String, pool: String },
    /// The node does not advertise this prefix.
    #[error("node {node:?} does not advertise {prefix}")]
    PrefixNotAdvertised { node: String, prefix: String },
    /// More workload prefixes than one node may advertise.
    #[error("node {node:?} would advertise {count} prefixes; at most {MAX_ADVERTISED} are allowed")]
    TooManyPrefixes { node: String, count: usize },

    /// No overlay address is left.
    #[error("address pool {pool} is exhausted ({in_use} addresses in use)")]
    PoolExhausted { pool: String, in_use: usize },

    /// The state violates an invariant (found by `State::validate`).
    #[error("state is inconsistent: {0}")]
    Inconsistent(String),

    // ---- trust: identity and prefixes are granted ----
    /// An agent asked for a label its join token does not grant.
    #[error("label {label} is not granted by join token {token} (it grants: {granted})")]
    LabelNotGranted {
        label: String,
        token: String,
        granted: String,
    },
    /// A workload prefix is shorter than the network allows.
    #[error(
        "prefix {prefix} is shorter than the minimum /{min} for {family} workload prefixes (weft-controller --min-prefix-len-{})",
        if *family == "IPv4" { "v4" } else { "v6" }
    )]
    PrefixTooShort {
        prefix: String,
        min: u8,
        family: &'static str,
    },
    /// A workload prefix covers an address the underlay must carry.
    #[error(
        "prefix {prefix} covers {what}: routing it through the overlay would capture that traffic"
    )]
    PrefixCoversProtected { prefix: String, what: String },
    /// A join token allows more prefixes than a node may advertise.
    #[error("{count} allowed prefixes given; at most {MAX_ADVERTISED} are allowed")]
    TooManyAllowedPrefixes { count: usize },
    // ---- credentials: node certificate lifecycle, WireGuard key rotation ----
    /// A certificate renewal was authenticated by a certificate that is
    /// not (or no longer) accepted.
    #[error("certificate renewal refused: {0}")]
    CertNotAccepted(CertRefused),
    /// A key rotation names a key generation beyond the next one.
    #[error(
        "node {node:?} rotated its WireGuard key to generation {generation}, but at most {next} may come next"
    )]
    KeyGenerationAhead {
        node: String,
        generation: u64,
        next: u64,
    },
    // ---- admin credentials ----
    /// An admin token with this name exists (revoked tokens keep their
    /// name, so the audit log stays unambiguous).
    #[error("admin token {0:?} already exists (names of revoked tokens are not reused)")]
    AdminTokenExists(String),
    /// No admin token has this name.
    #[error("admin token {0:?} not found")]
    AdminTokenNotFound(String),
    /// The requested admin token lifetime is out of range.
    #[error("admin token lifetime must be between 1 second and 366 days (31622400 s), got {0} s")]
    InvalidAdminTokenTtl(u64),
    /// Revoking this token would leave no usable admin token.
    #[error(
        "admin token {0:?} is the last usable admin token; create another admin token before revoking it"
    )]
    LastAdminToken(String),
}

/// Coarse class of an [`Error`], for mapping to gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The named object does not exist.
    NotFound,
    /// An object with this name, id or key exists already.
    AlreadyExists,
    /// The request itself is malformed.
    InvalidArgument,
    /// The caller's credentials (join token) do not allow this.
    PermissionDenied,
    /// The request is valid but the state does not allow it now.
    FailedPrecondition,
    /// The address pool is full.
    ResourceExhausted,
    /// The stored state is broken: a bug or a damaged store.
    Internal,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidName { .. }
            | Error::InvalidId { .. }
            | Error::InvalidSettings(_)
            | Error::InvalidTopology(_)
            | Error::ZeroKey
            | Error::InvalidTokenTtl(_)
            | Error::InvalidLabelKey(_)
            | Error::InvalidLabelValue { .. }
            | Error::TooManyLabels { .. }
            | Error::LabelSetAndRemoved(_)
            | Error::InvalidPolicies(_)
            | Error::InvalidPolicy { .. }
            | Error::InvalidPrefix { .. }
            | Error::PrefixInPool { .. }
            | Error::TooManyPrefixes { .. }
            | Error::PrefixTooShort { .. }
            | Error::PrefixCoversProtected { .. }
            | Error::TooManyAllowedPrefixes { .. }
            | Error::KeyGenerationAhead { .. } => ErrorKind::InvalidArgument,
            Error::SiteNotFound(_)
            | Error::TokenNotFound(_)
            | Error::NodeNotFound(_)
            | Error::ExternalPeerNotFound(_)
            | Error::PolicyNotFound(_)
            | Error::EndpointNotFound(_)
            | Error::PrefixNotAdvertised { .. } => ErrorKind::NotFound,
            Error::SiteExists(_)
            | Error::TokenExists(_)
            | Error::NodeIdTaken { .. }
            | Error::NameTaken { .. }
            | Error::KeyInUse { .. }
            | Error::CertInUse { .. }
            | Error::PrefixOverlap { .. } => ErrorKind::AlreadyExists,
            Error::TokenInvalid(_)
            | Error::TokenUsed { .. }
            | Error::TokenExpired { .. }
            | Error::LabelNotGranted { .. }
            | Error::CertNotAccepted(_) => ErrorKind::PermissionDenied,
            Error::SiteNotEmpty { .. } | Error::LastAdminToken(_) => ErrorKind::FailedPrecondition,
            Error::AdminTokenExists(_) => ErrorKind::AlreadyExists,
            Error::AdminTokenNotFound(_) => ErrorKind::NotFound,
            Error::InvalidAdminTokenTtl(_) => ErrorKind::InvalidArgument,
            Error::PoolExhausted { .. } => ErrorKind::ResourceExhausted,
            Error::Inconsistent(_) => ErrorKind::Internal,
        }
    }
}
