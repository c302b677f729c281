//! The controller's own certificate authority: it signs the controller's
//! server certificate and every node's client certificate (mTLS). Nothing
//! else is trusted on the control channel.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateSigningRequestDer;
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

    /// Signs a node's certificate signing request. Whatever names the CSR
    /// asks for, the certificate names only the node (client auth only, so
    /// it can never pose as the controller). Returns the PEM and the SHA-256
    /// fingerprint of its DER, by which the controller recognises the node.
    pub(crate) fn sign_node_csr(
        &self,
        csr_der: &[u8],
        node_id: &str,
    ) -> Result<(String, [u8; 32])> {
        let der = CertificateSigningRequestDer::from(csr_der);
        let mut csr = CertificateSigningRequestParams::from_der(&der)
            .context("the certificate signing request is invalid")?;
        let name = format!("{node_id}.nodes.weft.internal");
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::DnsName(name.clone().try_into()?)];
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .context("signing the node certificate")?;
        Ok((cert.pem(), cert_hash(cert.der())))
    }
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

    #[test]
    fn node_cert_is_signed_and_names_only_the_node() {
        let ca = Ca::generate().expect("generate CA");
        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::new(vec![CONTROLLER_SERVER_NAME.to_string()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        let (pem, fp) = ca.sign_node_csr(csr.der(), "n-1234").expect("sign");
        assert!(pem.contains("BEGIN CERTIFICATE"));
        assert_ne!(fp, [0; 32]);
        assert!(
            ca.sign_node_csr(b"garbage", "n-1").is_err(),
            "garbage CSR must be refused"
        );
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = Ca::generate().expect("generate CA");
        let again = Ca::from_pem(ca.cert_pem(), &ca.issuer.key().serialize_pem()).expect("reload");
        assert_eq!(ca.hash(), again.hash());
    }
}
