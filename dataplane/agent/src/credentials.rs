//! The node's credentials over time: its client certificate, renewed over
//! mTLS before it expires, and its WireGuard key, rotated when the
//! operator asks (`weftctl node rotate-key`) or the agent is told to
//! (`weft-agent --rotate-key`).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use tonic::Code;
use tonic::transport::Channel;
use tracing::{error, info};
use weft_proto::pb::{self, agent_service_client::AgentServiceClient};

use crate::state::{Identity, PendingKey, StateDir, public_key};
use crate::tunnel::TunnelHandle;

/// A certificate valid for longer than this was issued before node
/// certificates expired: the agent renews it at once.
const LONGEST_CERT_SECS: i64 = 366 * 86_400;

/// The validity of a certificate, unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Validity {
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
}

impl Validity {
    /// The validity of the first certificate in `pem`.
    pub(crate) fn of_pem(pem: &str) -> Result<Validity> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| anyhow!("the node certificate is not PEM: {e}"))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| anyhow!("the node certificate does not parse: {e}"))?;
        let v = cert.validity();
        Ok(Validity {
            not_before: v.not_before.timestamp(),
            not_after: v.not_after.timestamp(),
        })
    }

    /// When to renew: once less than a third of the lifetime is left; at
    /// once for a certificate from before certificates expired.
    pub(crate) fn renew_at(&self) -> i64 {
        let lifetime = self.not_after.saturating_sub(self.not_before);
        if lifetime > LONGEST_CERT_SECS {
            return self.not_before;
        }
        self.not_after.saturating_sub(lifetime / 3)
    }

    /// Whether the certificate is no longer valid at `now`.
    pub(crate) fn expired(&self, now: i64) -> bool {
        now > self.not_after
    }
}

/// Unix time now, in seconds.
pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Renews the node's client certificate with a new TLS key, over the
/// current mTLS channel, and stores the new identity (atomically) before
/// returning it. The controller keeps accepting the current certificate
/// until the new one is first used, so a crash or a lost reply here loses
/// nothing: the agent renews again with the certificate it still has.
pub(crate) async fn renew(
    client: &mut AgentServiceClient<Channel>,
    state: &StateDir,
    id: &Identity,
) -> Result<Identity> {
    let key = rcgen::KeyPair::generate().context("generating a new TLS key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .context("creating a certificate signing request")?;
    let resp = client
        .renew(pb::RenewRequest {
            csr_der: csr.der().to_vec(),
        })
        .await
        .map_err(|s| anyhow!("certificate renewal refused: {}", s.message()))?
        .into_inner();
    let validity = Validity::of_pem(&resp.client_cert_pem)
        .context("the controller sent an unreadable certificate")?;
    let renewed = Identity {
        cert_pem: resp.client_cert_pem,
        key_pem: key.serialize_pem(),
        ..id.clone()
    };
    state.save_identity(&renewed)?;
    info!(
        node = %id.node_id,
        expires_unix = validity.not_after,
        renew_at_unix = validity.renew_at(),
        "client certificate renewed"
    );
    Ok(renewed)
}

/// Rotates the WireGuard key to `pending` (already stored in the state
/// dir): registers its public key with the controller, which hands it to
/// every peer in place of the old one, then swaps the tunnel's key (which
/// handshakes with every peer at once) and makes it the node's key on
/// disk. A transport error keeps the pending key for the next session; a
/// refusal of the key itself discards it.
pub(crate) async fn rotate(
    client: &mut AgentServiceClient<Channel>,
    state: &StateDir,
    tunnel: &TunnelHandle,
    id: &mut Identity,
    pending: PendingKey,
) -> Result<()> {
    let public = public_key(&pending.private_key);
    info!(public_key = %public, generation = pending.generation, "rotating the WireGuard key");
    let reply = client
        .rotate_key(pb::RotateKeyRequest {
            public_key: public.0.to_vec(),
            generation: pending.generation,
        })
        .await;
    match reply {
        Ok(_) => {}
        Err(s) if matches!(s.code(), Code::InvalidArgument | Code::AlreadyExists) => {
            error!(
                public_key = %public,
                generation = pending.generation,
                reason = %s.message(),
                "the controller refused the new WireGuard key; keeping the current one"
            );
            return state.discard_pending_key();
        }
        Err(s) => return Err(anyhow!("WireGuard key rotation failed: {}", s.message())),
    }
    // Peers get the new key from the controller now: swap at once (the
    // later of the two ends starts the handshake that completes), then
    // persist; the pending file stays until the end, so a crash resumes.
    tunnel
        .set_private_key(pending.private_key)
        .await
        .context("swapping the tunnel's key")?;
    state.promote_pending_key(&pending, id)?;
    info!(public_key = %public, generation = id.key_generation, "WireGuard key rotated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_when_a_third_of_the_lifetime_is_left() {
        let v = Validity {
            not_before: 1_000,
            not_after: 1_000 + 30 * 86_400,
        };
        assert_eq!(v.renew_at(), 1_000 + 20 * 86_400);
        let short = Validity {
            not_before: 1_000,
            not_after: 1_060,
        };
        assert_eq!(short.renew_at(), 1_040);
        assert!(!short.expired(1_060));
        assert!(short.expired(1_061));
        // rcgen's defaults (1975 to 4096): issued before expiry, renew now.
        let old = Validity {
            not_before: 157_766_400,
            not_after: 67_090_108_800,
        };
        assert_eq!(old.renew_at(), old.not_before);
    }

    #[test]
    fn validity_is_read_from_the_certificate() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 1, 31);
        let cert = params.self_signed(&key).expect("cert");
        let v = Validity::of_pem(&cert.pem()).expect("parses");
        assert_eq!(v.not_before, 1_767_225_600);
        assert_eq!(v.not_after, 1_767_225_600 + 30 * 86_400);
        assert!(Validity::of_pem("not a certificate").is_err());
    }
}
