//! A real weft-controller on 127.0.0.1 with its own data dir, and clients
//! for it: admin (bearer token) and simulated nodes (join token, CSR,
//! mTLS). Shared by the integration tests and the `report_flood` bench.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng as _;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use weft_proto::admin_config::{ADMIN_CONF, AUTHORIZATION, AdminConfig};
use weft_proto::pb;
use weft_proto::pb::admin_service_client::AdminServiceClient;
use weft_proto::pb::agent_service_client::AgentServiceClient;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The controller process; killed (SIGKILL) when dropped, also on panic.
pub struct Controller {
    child: Child,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub config: AdminConfig,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Starts weft-controller on free loopback ports (a second one for the
/// admin API if `separate_admin`); waits up to 30 s for it to serve.
pub async fn start(dir: &Path, separate_admin: bool) -> Result<Controller, Error> {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let admin_listen = if separate_admin {
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
    } else {
        None
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft-controller"));
    cmd.arg("--data-dir")
        .arg(dir)
        .arg("--listen")
        .arg(listen.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(a) = admin_listen {
        cmd.arg("--admin-listen").arg(a.to_string());
    }
    let child = cmd.spawn()?;
    let mut c = Controller {
        child,
        listen,
        admin_listen,
        config: AdminConfig {
            url: String::new(),
            ca_pem: String::new(),
            token: String::new(),
        },
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = c.child.try_wait()? {
            return Err(format!("weft-controller exited at start: {status}").into());
        }
        if let Ok(cfg) = AdminConfig::load(&dir.join(ADMIN_CONF))
            && tokio::net::TcpStream::connect(listen).await.is_ok()
            && tokio::net::TcpStream::connect(admin_listen.unwrap_or(listen))
                .await
                .is_ok()
        {
            c.config = cfg;
            return Ok(c);
        }
        if Instant::now() > deadline {
            return Err("weft-controller did not serve within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Adds `authorization: Bearer <token>` to each request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(AUTHORIZATION, self.0.clone());
        Ok(req)
    }
}

/// An AdminService client with a bearer token.
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// An admin client of `url` presenting `token`.
pub async fn admin(cfg: &AdminConfig, url: &str, token: &str) -> Result<Admin, Error> {
    let channel = weft_proto::client::connect(url, &cfg.ca_pem, None).await?;
    let value: MetadataValue<_> = format!("Bearer {token}").parse()?;
    Ok(AdminServiceClient::with_interceptor(channel, Bearer(value)))
}

/// An enrolled simulated node: its id, WireGuard public key and mTLS
/// channel.
pub struct Node {
    pub id: String,
    pub key: [u8; 32],
    pub channel: Channel,
}

/// Registers node `name` with `token` (a fresh CSR and a random key), as
/// weft-agent does; waits out the Register rate limit.
pub async fn enrol(url: &str, ca_pem: &str, token: &str, name: &str) -> Result<Node, Error> {
    let token: weft_proto::JoinToken = token.parse()?;
    let tls_key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&tls_key)?;
    let key: [u8; 32] = rand::rng().random();
    let channel = weft_proto::client::connect(url, ca_pem, None).await?;
    let req = pb::RegisterRequest {
        join_token: token.credential(),
        name: name.to_owned(),
        public_key: key.to_vec(),
        endpoint: String::new(),
        listen_port: 51820,
        csr_der: csr.der().to_vec(),
        labels: HashMap::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let resp = loop {
        match AgentServiceClient::new(channel.clone())
            .register(req.clone())
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(format!("registering {name}: {s}").into()),
        }
    };
    let key_pem = tls_key.serialize_pem();
    let channel =
        weft_proto::client::connect(url, ca_pem, Some((&resp.client_cert_pem, &key_pem))).await?;
    Ok(Node {
        id: resp.node_id,
        key,
        channel,
    })
}

/// A new join token for `site`.
pub async fn join_token(admin: &mut Admin, site: &str) -> Result<String, Error> {
    Ok(admin
        .create_join_token(pb::CreateJoinTokenRequest {
            site: site.to_owned(),
            ttl_seconds: 600,
            ..Default::default()
        })
        .await?
        .into_inner()
        .token)
}
