//! The controller's own certificate authority: it signs the controller's
//! server certificate and every node's client certificate (mTLS). Nothing
//! else is trusted on the control channel.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rcgen::PublicKeyData as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateSigningRequestDer;
use sha2::{Digest as _, Sha256};
use weft_proto::client::{CONTROLLER_SERVER_NAME, cert_hash};

use crate::fsutil::write_private;

pub(crate) const CA_CERT: &str = "ca.pem";
pub(crate) const CA_KEY: &str = "ca.key";

/// A loaded CA, able to issue certificates.
pub(crate) struct Ca {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("hash", &hex::encode(self.hash()))
            .finish_non_exhaustive()
    }
}

/// A freshly issued server certificate with its key.
pub(crate) struct ServerCert {
    /// Leaf followed by the CA, so clients can pin the CA from the chain.
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
}

impl Ca {
    /// Loads the CA from `dir`, or creates it when `create` is set and
    /// neither file exists.
    pub(crate) fn load_or_create(dir: &Path, create: bool) -> Result<Ca> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert_pem = std::fs::read_to_string(&cert_path)
                    .with_context(|| format!("reading {}", cert_path.display()))?;
                let key_pem = std::fs::read_to_string(&key_path)
                    .with_context(|| format!("reading {}", key_path.display()))?;
                Ca::from_pem(&cert_pem, &key_pem).with_context(|| {
                    format!(
                        "loading the CA from {} and {}",
                        cert_path.display(),
                        key_path.display()
                    )
                })
            }
            (false, false) if create => {
                let ca = Ca::generate()?;
                write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes())?;
                write_private(&cert_path, ca.cert_pem.as_bytes())?;
                Ok(ca)
            }
            (false, false) => bail!(
                "the CA files {} and {} are missing but the store exists: enrolled nodes could not be \
                 verified any more; restore them from a backup",
                cert_path.display(),
                key_path.display()
            ),
            _ => bail!(
                "only one of {} and {} exists; restore the pair from a backup",
                cert_path.display(),
                key_path.display()
            ),
        }
    }

    fn generate() -> Result<Ca> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Weft controller CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let cert_pem = cert.pem();
        Ca::from_pem(&cert_pem, &key.serialize_pem())
    }

    fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let der = rustls_pemfile_cert(cert_pem)?;
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)
            .context("parsing the CA certificate")?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            cert_der: der,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate (DER): what join tokens pin.
    pub(crate) fn hash(&self) -> [u8; 32] {
        cert_hash(&self.cert_der)
    }

    /// Issues the controller's TLS server certificate for the fixed name
    /// `controller.weft.internal` (clients never verify by host or IP).
    pub(crate) fn issue_server_cert(&self) -> Result<ServerCert> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![CONTROLLER_SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, CONTROLLER_SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's verified certificate signing request for `ttl_secs`
    /// from `now`. Whatever names the CSR asks for, the certificate names
    /// only the node (client auth only, so it can never pose as the
    /// controller). Returns the PEM, the SHA-256 fingerprint of its DER, by
    /// which the controller recognises the node, and its expiry.
    pub(crate) fn sign_node_csr(
        &self,
        csr: Csr,
        node_id: &str,
        now: u64,
        ttl_secs: u64,
    ) -> Result<IssuedCert> {
        let Csr { mut params, .. } = csr;
        let name = format!("{node_id}.nodes.weft.internal");
        let mut cert = CertificateParams::new(Vec::<String>::new())?;
        cert.subject_alt_names = vec![SanType::DnsName(name.clone().try_into()?)];
        cert.distinguished_name.push(DnType::CommonName, name);
        cert.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        cert.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        cert.is_ca = IsCa::ExplicitNoCa;
        let expires_unix = now.saturating_add(ttl_secs);
        // Valid from a minute ago: a controller clock slightly ahead of the
        // agent's must not make a fresh certificate "not yet valid".
        cert.not_before = unix_time(now.saturating_sub(NOT_BEFORE_SLACK_SECS))?;
        cert.not_after = unix_time(expires_unix)?;
        params.params = cert;
        let signed = params
            .signed_by(&self.issuer)
            .context("signing the node certificate")?;
        Ok(IssuedCert {
            pem: signed.pem(),
            fingerprint: cert_hash(signed.der()),
            expires_unix,
        })
    }
}

/// How long before its issue a node certificate is valid.
const NOT_BEFORE_SLACK_SECS: u64 = 60;

/// A certificate signing request whose self-signature was verified: the
/// sender holds the private key of `key_hash`.
pub(crate) struct Csr {
    params: CertificateSigningRequestParams,
    /// SHA-256 of the requested public key (SubjectPublicKeyInfo, DER).
    pub(crate) key_hash: [u8; 32],
}

impl std::fmt::Debug for Csr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Csr")
            .field("key_hash", &hex::encode(self.key_hash))
            .finish_non_exhaustive()
    }
}

impl Csr {
    /// Parses a PKCS#10 request (DER) and verifies its signature.
    pub(crate) fn parse(der: &[u8]) -> Result<Csr> {
        let der = CertificateSigningRequestDer::from(der);
        // rcgen verifies the request's signature with the key it carries
        // (proof of possession) and refuses it otherwise.
        let params = CertificateSigningRequestParams::from_der(&der).context(
            "the certificate signing request is invalid or its signature does not verify",
        )?;
        let key_hash = Sha256::digest(params.public_key.subject_public_key_info()).into();
        Ok(Csr { params, key_hash })
    }
}

/// A node certificate just issued.
#[derive(Debug)]
pub(crate) struct IssuedCert {
    pub(crate) pem: String,
    pub(crate) fingerprint: [u8; 32],
    pub(crate) expires_unix: u64,
}

fn unix_time(secs: u64) -> Result<time::OffsetDateTime> {
    let secs = i64::try_from(secs).context("time out of range")?;
    time::OffsetDateTime::from_unix_timestamp(secs).context("time out of range")
}

fn rustls_pemfile_cert(pem: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        bail!("no PEM certificate found");
    }
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .context("certificate PEM is not valid base64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair, names: Vec<String>) -> Vec<u8> {
        CertificateParams::new(names)
            .expect("params")
            .serialize_request(key)
            .expect("csr")
            .der()
            .to_vec()
    }

    #[test]
    fn node_cert_is_signed_names_only_the_node_and_expires() {
        let ca = Ca::generate().expect("generate CA");
        let key = KeyPair::generate().expect("key");
        let der = csr(&key, vec![CONTROLLER_SERVER_NAME.to_string()]);
        let parsed = Csr::parse(&der).expect("valid CSR");
        let spki_hash: [u8; 32] = Sha256::digest(key.subject_public_key_info()).into();
        assert_eq!(parsed.key_hash, spki_hash, "the request's key is recorded");
        let now = 1_800_000_000;
        let cert = ca.sign_node_csr(parsed, "n-1234", now, 60).expect("sign");
        assert!(cert.pem.contains("BEGIN CERTIFICATE"));
        assert_ne!(cert.fingerprint, [0; 32]);
        assert_eq!(cert.expires_unix, now + 60);
        let der = rustls_pemfile_cert(&cert.pem).expect("PEM");
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parses");
        assert_eq!(x509.validity().not_after.timestamp(), 1_800_000_060);
        assert_eq!(x509.validity().not_before.timestamp(), 1_800_000_000 - 60);
        let names: Vec<String> = x509
            .subject_alternative_name()
            .expect("valid extension")
            .expect("has SANs")
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["DNSName(n-1234.nodes.weft.internal)"]);
        assert!(
            Csr::parse(b"garbage").is_err(),
            "garbage CSR must be refused"
        );
    }

    #[test]
    fn a_request_whose_signature_does_not_verify_is_refused() {
        let key = KeyPair::generate().expect("key");
        let mut der = csr(&key, Vec::new());
        // The signature is the last field: flip its last byte.
        let last = der.len() - 1;
        der[last] ^= 0x55;
        let e = Csr::parse(&der).expect_err("bad signature");
        assert!(format!("{e:#}").contains("signature"), "{e:#}");
        // A request naming another key than the one that signed it: the
        // public key of `other`, the signature of `key`.
        let other = KeyPair::generate().expect("key");
        let good = csr(&key, Vec::new());
        let theirs = other.subject_public_key_info();
        let ours = key.subject_public_key_info();
        let at = good
            .windows(ours.len())
            .position(|w| w == ours.as_slice())
            .expect("the request carries its key");
        let mut forged = good.clone();
        forged[at..at + theirs.len()].copy_from_slice(&theirs);
        assert!(
            Csr::parse(&forged).is_err(),
            "a foreign key must not verify"
        );
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = Ca::generate().expect("generate CA");
        let again = Ca::from_pem(ca.cert_pem(), &ca.issuer.key().serialize_pem()).expect("reload");
        assert_eq!(ca.hash(), again.hash());
    }
}
