//! Enrolment: verify the controller by the join token's CA pin, then
//! register the node's WireGuard public key and get a client certificate.

use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow};
use weft_dataplane_core::Key;
use weft_proto::JoinToken;
use weft_proto::client::{connect, fetch_pinned_ca};
use weft_proto::pb::{RegisterRequest, agent_service_client::AgentServiceClient};

use crate::state::Identity;

/// What the node tells the controller about itself.
#[derive(Debug)]
pub(crate) struct Enrolment<'a> {
    pub(crate) controller_url: &'a str,
    pub(crate) token: &'a str,
    pub(crate) name: &'a str,
    pub(crate) public_key: Key,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) listen_port: u16,
    pub(crate) labels: std::collections::HashMap<String, String>,
}

/// Enrols the node; returns the identity to persist.
pub(crate) async fn enrol(e: Enrolment<'_>) -> Result<Identity> {
    let token: JoinToken = e.token.parse()?;
    let ca_pem = fetch_pinned_ca(e.controller_url, token.ca_hash).await?;
    let key = rcgen::KeyPair::generate().context("generating the node's TLS key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .context("creating a certificate signing request")?;
    let channel = connect(e.controller_url, &ca_pem, None).await?;
    let resp = AgentServiceClient::new(channel)
        .register(RegisterRequest {
            join_token: token.credential(),
            name: e.name.to_string(),
            public_key: e.public_key.0.to_vec(),
            endpoint: e.endpoint.map(|x| x.to_string()).unwrap_or_default(),
            listen_port: u32::from(e.listen_port),
            csr_der: csr.der().to_vec(),
            labels: e.labels,
        })
        .await
        .map_err(|s| anyhow!("the controller refused to enrol this node: {}", s.message()))?
        .into_inner();
    Ok(Identity {
        node_id: resp.node_id,
        name: e.name.to_string(),
        controller_url: e.controller_url.to_string(),
        ca_pem,
        cert_pem: resp.client_cert_pem,
        key_pem: key.serialize_pem(),
        key_generation: 0,
    })
}
