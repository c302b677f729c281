//! Connecting to the controller over TLS: with the CA from a config file, or
//! (once, at enrolment) with only a join token's CA pin.
//!
//! The controller's certificate always carries the fixed server name
//! [`CONTROLLER_SERVER_NAME`] and is checked against the Weft CA, never the
//! system roots, so a controller can be reached by any IP or host name.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Name in the controller's certificate; clients verify against it.
pub const CONTROLLER_SERVER_NAME: &str = "controller.weft.internal";

/// Why a connection to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("controller URL {url:?} is invalid: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to controller at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot reach controller at {url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "controller at {url} presented a certificate authority that does not match the join token's CA hash \
         (expected sha256 {expected}); refusing to enrol: check the token and the controller URL"
    )]
    PinMismatch { url: String, expected: String },
}

/// Opens a TLS channel to the controller, trusting only `ca_pem`, with an
/// optional client identity (`cert_pem`, `key_pem`) for mTLS.
pub async fn connect(
    url: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, ConnectError> {
    let endpoint = endpoint(url, ca_pem, identity)?;
    endpoint
        .connect()
        .await
        .map_err(|source| ConnectError::Transport {
            url: url.to_string(),
            source,
        })
}

/// Like [`connect`], but connects lazily on first use (and reconnects).
pub fn connect_lazy(
    url: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, ConnectError> {
    Ok(endpoint(url, ca_pem, identity)?.connect_lazy())
}

fn endpoint(
    url: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Endpoint, ConnectError> {
    let bad = |reason: String| ConnectError::BadUrl {
        url: url.to_string(),
        reason,
    };
    if !url.starts_with("https://") {
        return Err(bad("it must start with https://".into()));
    }
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(CONTROLLER_SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| bad(e.to_string()))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_keepalive(Some(Duration::from_secs(10)))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
        })
}

/// SHA-256 of a certificate's DER encoding, the form join tokens pin.
pub fn cert_hash(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Fetches the controller's CA certificate over TLS, accepting it only if
/// its SHA-256 equals `pin` and it signed the controller's certificate.
/// Returns the CA as PEM.
pub async fn fetch_pinned_ca(url: &str, pin: [u8; 32]) -> Result<String, ConnectError> {
    let bad = |reason: String| ConnectError::BadUrl {
        url: url.to_string(),
        reason,
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("it must start with https://".into()));
    }
    let host = uri.host().ok_or_else(|| bad("no host".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let io_err = |source| ConnectError::Io {
        url: url.to_string(),
        source,
    };

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        provider: provider.clone(),
        found: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| {
        io_err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out after 5 s",
        ))
    })?
    .map_err(io_err)?;
    let name = ServerName::try_from(CONTROLLER_SERVER_NAME).map_err(|e| bad(e.to_string()))?;
    let handshake = connector.connect(name, tcp).await;
    let found = verifier.found.lock().ok().and_then(|mut f| f.take());
    match (handshake, found) {
        (Ok(_), Some(der)) => Ok(pem_encode("CERTIFICATE", &der)),
        (Err(_), None) | (Ok(_), None) => Err(ConnectError::PinMismatch {
            url: url.to_string(),
            expected: hex(&pin),
        }),
        (Err(e), Some(_)) => Err(io_err(e)),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// PEM-encodes DER bytes.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Accepts the server only if a certificate in its chain hashes to the pin
/// and the leaf verifies against that certificate as the sole root.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
    found: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_hash(c.as_ref()) == self.pin)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        if let Ok(mut f) = self.found.lock() {
            *f = Some(ca.as_ref().to_vec());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
