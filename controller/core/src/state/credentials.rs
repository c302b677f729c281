//! Node credentials over time: which client certificate authenticates a
//! node now, certificate renewal, and WireGuard key rotation.
//!
//! A node holds at most two accepted certificates: its current one, and
//! the one its last renewal was authenticated with (the agent may not have
//! received the new one yet). The previous certificate is dropped the
//! first time the current one is used, or when it expires. A certificate
//! past its expiry is never accepted, and a deleted node has none.

use weft_dataplane_core::Key;

use super::State;
use crate::error::Error;
use crate::model::{Member, Node, NodeCert};
use crate::time::rfc3339;

/// Default lifetime of a node certificate: 30 days.
pub const DEFAULT_CERT_TTL_SECS: u64 = 30 * 86_400;
/// Shortest node certificate lifetime (`weft-controller --cert-ttl`): the
/// agent renews a third before expiry, so 30 s leaves it 10 s to do so.
pub const MIN_CERT_TTL_SECS: u64 = 30;
/// Longest node certificate lifetime: a year.
pub const MAX_CERT_TTL_SECS: u64 = 365 * 86_400;

/// Checks a node certificate lifetime; the error says why, for the caller
/// to put in its own message.
pub fn check_cert_ttl(secs: u64) -> Result<(), String> {
    if (MIN_CERT_TTL_SECS..=MAX_CERT_TTL_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(format!(
            "{secs} s is out of range: node certificates live from {MIN_CERT_TTL_SECS} s to 365 days \
             (agents renew them when a third of the lifetime is left)"
        ))
    }
}

/// How an accepted certificate authenticates its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertUse<'a> {
    /// The node's current certificate.
    Current(&'a Node),
    /// The current certificate, used for the first time since the renewal
    /// that issued it: the previous one is to be dropped
    /// ([`State::confirm_cert`]).
    FirstUse(&'a Node),
    /// The certificate the node's last renewal was authenticated with.
    Previous(&'a Node),
}

impl<'a> CertUse<'a> {
    /// The node the certificate authenticates.
    pub fn node(&self) -> &'a Node {
        match *self {
            CertUse::Current(n) | CertUse::FirstUse(n) | CertUse::Previous(n) => n,
        }
    }

    /// When the certificate expires (unix seconds; 0: never recorded).
    pub fn expires_unix(&self) -> u64 {
        match *self {
            CertUse::Current(n) | CertUse::FirstUse(n) => n.cert_expires_unix,
            CertUse::Previous(n) => n.previous_cert.map_or(0, |p| p.expires_unix),
        }
    }
}

/// Why a client certificate does not authenticate any node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertRefused {
    /// No node holds it: the node was deleted, or the certificate was
    /// replaced (renewal, retried registration).
    #[error(
        "this certificate is not (or no longer) accepted: the node was deleted or its certificate was replaced"
    )]
    Unknown,
    /// The certificate's lifetime is over.
    #[error(
        "the certificate of node {node} expired at {}; enrol the node again with a new join token",
        rfc3339(*.expires_unix)
    )]
    Expired {
        /// Node id.
        node: String,
        /// When it expired (unix seconds).
        expires_unix: u64,
    },
}

/// Whether a certificate expiring at `expires_unix` (0: never recorded)
/// is over at `now`.
fn expired(expires_unix: u64, now: u64) -> bool {
    expires_unix != 0 && now >= expires_unix
}

impl State {
    /// The node the client certificate with this SHA-256 fingerprint
    /// authenticates at `now`, and how.
    pub fn authenticate(
        &self,
        fingerprint: &[u8; 32],
        now: u64,
    ) -> Result<CertUse<'_>, CertRefused> {
        let node = self.node_by_cert(fingerprint).ok_or(CertRefused::Unknown)?;
        let refused = |expires_unix| CertRefused::Expired {
            node: node.id.clone(),
            expires_unix,
        };
        if node.cert_fingerprint == *fingerprint {
            if expired(node.cert_expires_unix, now) {
                return Err(refused(node.cert_expires_unix));
            }
            return Ok(if node.previous_cert.is_some() {
                CertUse::FirstUse(node)
            } else {
                CertUse::Current(node)
            });
        }
        match node.previous_cert {
            Some(p) if p.fingerprint == *fingerprint => {
                if expired(p.expires_unix, now) {
                    Err(refused(p.expires_unix))
                } else {
                    Ok(CertUse::Previous(node))
                }
            }
            Some(_) | None => Err(CertRefused::Unknown),
        }
    }

    /// The current certificate of node `node_id` (with fingerprint
    /// `fingerprint`) was used: its previous one is no longer accepted.
    /// Returns whether anything changed (the revision is bumped only then).
    pub fn confirm_cert(&mut self, node_id: &str, fingerprint: &[u8; 32]) -> Result<bool, Error> {
        let node = self
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| Error::NodeNotFound(node_id.to_owned()))?;
        if node.cert_fingerprint != *fingerprint || node.previous_cert.is_none() {
            return Ok(false);
        }
        node.previous_cert = None;
        self.revision += 1;
        Ok(true)
    }

    /// Renews a node's certificate: `new` becomes current, and the
    /// certificate the request was authenticated with (`authenticated_with`,
    /// current or previous) stays accepted as the previous one (until
    /// `new` is first used or it expires). Any other certificate of the
    /// node is no longer accepted. Refused if `authenticated_with` is not
    /// accepted at `now` or `new` is bound to a node already.
    pub fn renew_cert(
        &mut self,
        authenticated_with: &[u8; 32],
        new: NodeCert,
        now: u64,
    ) -> Result<&Node, Error> {
        let (id, old) = match self.authenticate(authenticated_with, now) {
            Ok(CertUse::Current(n) | CertUse::FirstUse(n)) => (
                n.id.clone(),
                NodeCert {
                    fingerprint: n.cert_fingerprint,
                    expires_unix: n.cert_expires_unix,
                },
            ),
            Ok(CertUse::Previous(n)) => match n.previous_cert {
                Some(p) => (n.id.clone(), p),
                None => return Err(Error::CertNotAccepted(CertRefused::Unknown)),
            },
            Err(e) => return Err(Error::CertNotAccepted(e)),
        };
        if let Some(holder) = self.node_by_cert(&new.fingerprint) {
            return Err(Error::CertInUse {
                fingerprint: Key(new.fingerprint).to_hex(),
                holder: Member::Node(holder.id.clone()),
            });
        }
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| Error::NodeNotFound(id.clone()))?;
        node.previous_cert = Some(old);
        node.cert_fingerprint = new.fingerprint;
        node.cert_expires_unix = new.expires_unix;
        self.revision += 1;
        Ok(node)
    }

    /// Asks a node's agent (node by id or name) to rotate its WireGuard
    /// key: bumps the key generation its config carries. Returns the new
    /// generation.
    pub fn request_key_rotation(&mut self, id_or_name: &str) -> Result<u64, Error> {
        let id = self
            .node(id_or_name)
            .map(|n| n.id.clone())
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        node.key_generation = node.key_generation.saturating_add(1);
        self.revision += 1;
        Ok(node.key_generation)
    }

    /// The agent of node `node_id` replaced its WireGuard key by `key` for
    /// key generation `generation` (the one its config asked for, or the
    /// next one when it rotates by itself). The key must be free (not
    /// zero, not another member's); the generation may not run ahead of
    /// the next one. Giving the node's current key again (an agent
    /// resuming a rotation whose reply it lost) is accepted. Returns
    /// whether anything changed (the revision is bumped only then): every
    /// peer then gets the new key in place of the old one.
    pub fn rotate_node_key(
        &mut self,
        node_id: &str,
        key: Key,
        generation: u64,
    ) -> Result<bool, Error> {
        let node = self
            .nodes
            .get(node_id)
            .ok_or_else(|| Error::NodeNotFound(node_id.to_owned()))?;
        let next = node.key_generation.saturating_add(1);
        if generation > next {
            return Err(Error::KeyGenerationAhead {
                node: node.name.clone(),
                generation,
                next,
            });
        }
        let same_key = node.public_key == key;
        if !same_key {
            self.check_key_free(&key)?;
        }
        let node = self
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| Error::NodeNotFound(node_id.to_owned()))?;
        let generation = generation.max(node.key_generation);
        if same_key && generation == node.key_generation {
            return Ok(false);
        }
        node.public_key = key;
        node.key_generation = generation;
        self.revision += 1;
        Ok(true)
    }
}
