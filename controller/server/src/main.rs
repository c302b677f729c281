//! weft-controller: the Weft control plane.
//!
//! Holds the desired state of the network in an embedded store in
//! `--data-dir`, runs its own certificate authority, and serves the agent
//! and admin gRPC APIs over TLS on `--listen`.

mod api;
mod audit;
mod auth;
mod ca;
mod controller;
mod fsutil;
mod limits;
mod store;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ipnet::Ipv6Net;
use rand::Rng as _;
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};
use weft_controller_core::model::check_ipv4_pool;
use weft_controller_core::{NetworkSettings, State};
use weft_proto::admin_config::{ADMIN_CONF, AdminConfig};
use weft_proto::pb::admin_service_server::AdminServiceServer;
use weft_proto::pb::agent_service_server::AgentServiceServer;

use crate::api::{AdminApi, AgentApi};
use crate::audit::{AuditLog, Caller};
use crate::auth::AdminGate;
use crate::ca::Ca;
use crate::controller::{Controller, now_unix};
use crate::store::{FileStore, Store};

/// The Weft controller: computes every node's WireGuard peers and pushes
/// them to the agents over mTLS. Needs no external service: its state lives
/// in an embedded store in --data-dir, and every acknowledged change is on
/// disk before the API answers.
#[derive(Debug, Parser)]
#[command(name = "weft-controller", version, about, long_about)]
struct Args {
    /// Directory for the store (state.json), the CA (ca.pem, ca.key) and
    /// admin.conf. Created (mode 0700) if missing.
    #[arg(
        long,
        env = "WEFT_DATA_DIR",
        default_value = "/var/lib/weft-controller"
    )]
    data_dir: PathBuf,

    /// Address and TCP port to serve the gRPC API on (TLS).
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:7443")]
    listen: SocketAddr,

    /// URL that agents and weftctl use to reach this controller, written to
    /// admin.conf. Default: https://<listen address>:<port> (127.0.0.1 when
    /// listening on all addresses).
    #[arg(long, env = "WEFT_ADVERTISE_URL")]
    advertise_url: Option<String>,

    /// IPv4 overlay pool of a new network, in CIDR notation: a private-use
    /// network (RFC 1918 or inside 100.64.0.0/10) from a /8 to a /24.
    /// Used only when the data dir holds no store yet (default
    /// 100.64.0.0/10); given with an existing store it must equal the
    /// stored pool. A smaller pool leaves room for workload prefixes
    /// (`weft-agent --advertise`) in the same range.
    #[arg(long, env = "WEFT_IPV4_POOL", value_name = "CIDR")]
    ipv4_pool: Option<ipnet::Ipv4Net>,

    /// An address agents reach the controller at (e.g. its public or NAT
    /// address); repeat for several (WEFT_CONTROLLER_ADDRESSES:
    /// comma-separated). No workload prefix may cover one, so that no node
    /// routes its connection to the controller into the overlay. The
    /// --listen address (unless unspecified), the --advertise-url host (if
    /// an IP address) and the local addresses of accepted agent
    /// connections are protected too.
    #[arg(
        long = "controller-address",
        env = "WEFT_CONTROLLER_ADDRESSES",
        value_name = "IP",
        value_delimiter = ','
    )]
    controller_addresses: Vec<IpAddr>,

    /// Shortest IPv4 workload prefix accepted, in bits (1-32): a prefix
    /// with a shorter length is refused, and one approved before is left
    /// out of every config. Stored with the network; default 8 (/8).
    #[arg(long, env = "WEFT_MIN_PREFIX_LEN_V4", value_name = "BITS",
          value_parser = clap::value_parser!(u8).range(1..=32))]
    min_prefix_len_v4: Option<u8>,

    /// Shortest IPv6 workload prefix accepted, in bits (1-128), as
    /// --min-prefix-len-v4. Stored with the network; default 32 (/32).
    #[arg(long, env = "WEFT_MIN_PREFIX_LEN_V6", value_name = "BITS",
          value_parser = clap::value_parser!(u8).range(1..=128))]
    min_prefix_len_v6: Option<u8>,
    /// Lifetime of the node certificates issued from now on (at enrolment
    /// and renewal), e.g. 30d, 12h, 90s (units s, m, h, d), from 30s to
    /// 365d. Agents renew theirs when a third of it is left; a certificate
    /// that expires locks its node out until it enrols again.
    #[arg(
        long,
        env = "WEFT_CERT_TTL",
        value_name = "DURATION",
        default_value = "30d",
        value_parser = parse_cert_ttl
    )]
    cert_ttl: u64,

    /// Serve the admin API (weftctl) on this address and TCP port alone,
    /// e.g. 127.0.0.1:7444; --listen then serves the agents only. Default:
    /// both on --listen. admin.conf points weftctl here.
    #[arg(long, env = "WEFT_ADMIN_LISTEN", value_name = "ADDR:PORT")]
    admin_listen: Option<SocketAddr>,
}

/// Parses `--cert-ttl` into whole seconds within the accepted range.
fn parse_cert_ttl(s: &str) -> Result<u64, String> {
    use weft_dataplane_core::duration;
    let d = duration::parse(s, duration::SECONDS_TO_DAYS)
        .map_err(|why| format!("invalid certificate lifetime {s:?}: {why}"))?;
    let secs = d.as_secs();
    weft_controller_core::state::check_cert_ttl(secs)
        .map_err(|why| format!("invalid certificate lifetime {s:?}: {why}"))?;
    Ok(secs)
}

/// Limits of the gRPC server, per connection and per request.
mod server_limits {
    use std::time::Duration;

    /// Requests one connection may have in progress at once; more wait.
    pub(crate) const CONCURRENCY_PER_CONNECTION: usize = 32;
    /// HTTP/2 streams one connection may open at once (an agent needs 2).
    pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 64;
    /// A request handler taking longer is cancelled (DEADLINE_EXCEEDED);
    /// Watch streams are not affected once they are established.
    pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Largest admin request (policy files).
    pub(crate) const ADMIN_MAX_MESSAGE: usize = 16 * 1024 * 1024;
    /// HTTP/2 pings to find dead connections, and how long to wait for
    /// the answer.
    pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
    pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let dir = &args.data_dir;
    create_private_dir(dir)?;
    let _lock = lock_data_dir(dir)?;
    let mut store = FileStore::new(dir);
    let (mut state, fresh) = match store.load()? {
        Some(state) => {
            if let Some(pool) = args.ipv4_pool
                && pool != state.settings().ipv4_pool
            {
                bail!(
                    "--ipv4-pool {pool} disagrees with the pool of the existing network in {} ({}); \
                     the pool is fixed when the network is created",
                    dir.display(),
                    state.settings().ipv4_pool
                );
            }
            info!(
                revision = state.revision(),
                nodes = state.nodes().count(),
                "loaded the store"
            );
            (state, false)
        }
        None => {
            let mut settings = NetworkSettings::with_ipv6_prefix(random_ula());
            if let Some(pool) = args.ipv4_pool {
                check_ipv4_pool(pool).context("--ipv4-pool")?;
                settings.ipv4_pool = pool;
            }
            (State::new(settings)?, true)
        }
    };
    let ca = Arc::new(Ca::load_or_create(dir, fresh)?);
    let min_v4 = args
        .min_prefix_len_v4
        .unwrap_or(state.settings().min_prefix_len_v4);
    let min_v6 = args
        .min_prefix_len_v6
        .unwrap_or(state.settings().min_prefix_len_v6);
    if state
        .set_min_prefix_lens(min_v4, min_v6)
        .context("--min-prefix-len-v4/-v6")?
        && !fresh
    {
        store
            .save(&state)
            .context("storing the minimum prefix lengths")?;
        info!(
            min_prefix_len_v4 = min_v4,
            min_prefix_len_v6 = min_v6,
            "minimum workload prefix lengths changed"
        );
    }
    if fresh {
        store.save(&state).context("writing the initial store")?;
        info!(ipv4 = %state.settings().ipv4_pool, ipv6 = %state.settings().ipv6_prefix, "created a new network");
    }
    let url = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| default_url(args.admin_listen.unwrap_or(args.listen)));
    let admin = admin_config(dir, &url, ca.cert_pem())?;
    let token_hash: [u8; 32] = Sha256::digest(admin.token.as_bytes()).into();

    let server_cert = ca.issue_server_cert()?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            server_cert.chain_pem,
            server_cert.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()))
        .client_auth_optional(true);

    let (mut audit, last_record) = AuditLog::open(dir, audit::MAX_RECORDS)?;
    let startup = Caller {
        credential: "controller".to_owned(),
        role: weft_controller_core::admin::Role::Admin,
        rpc: "Startup".to_owned(),
    };
    // The record of an admin change is written before the state: a newer
    // revision than the state's means the controller stopped in between.
    if let Some(r) = last_record.filter(|r| r.outcome == "ok" && r.revision > state.revision()) {
        warn!(revision = r.revision, rpc = %r.rpc, "the last audited change was not stored (the controller stopped in between)");
        let note = weft_controller_core::admin::AuditRecord {
            unix: now_unix(),
            credential: startup.credential.clone(),
            rpc: startup.rpc.clone(),
            summary: format!(
                "the previous record ({} by {} for revision {}) was not stored: the controller stopped in between",
                r.rpc, r.credential, r.revision
            ),
            revision: state.revision(),
            outcome: "note".to_owned(),
        };
        audit.append(&note).context("writing to the audit log")?;
    }
    let controller = Arc::new(Controller::with_audit(state, Box::new(store), Some(audit)));
    controller.add_controller_addresses(controller_addresses(&args, &url));
    controller
        .mutate_as(
            Some(&startup),
            "token=bootstrap (the token of admin.conf)",
            |s| {
                s.ensure_bootstrap_token(token_hash, now_unix());
                Ok(())
            },
        )
        .context("recording the bootstrap admin token")?;
    let agent = AgentApi {
        controller: controller.clone(),
        ca: ca.clone(),
        cert_ttl_secs: args.cert_ttl,
        limits: Arc::default(),
    };
    // Reports age even when none arrive (agents cut off): re-measure every
    // second so that paths stop relying on them.
    let ticker = controller.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            every.tick().await;
            ticker.tick();
        }
    });
    let admin_api = AdminApi {
        controller: controller.clone(),
        ca: ca.clone(),
        data_dir: dir.clone(),
    };
    let admin = AdminGate::new(
        AdminServiceServer::new(admin_api)
            .max_decoding_message_size(server_limits::ADMIN_MAX_MESSAGE),
        controller,
    );
    let agent = AgentServiceServer::new(agent)
        .max_decoding_message_size(weft_proto::report::MAX_AGENT_MESSAGE_BYTES);

    info!(listen = %args.listen, admin_listen = ?args.admin_listen, url = %url, cert_ttl_secs = args.cert_ttl, ca_sha256 = %hex::encode(ca.hash()), admin_conf = %dir.join(ADMIN_CONF).display(), "controller serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    match args.admin_listen {
        None => {
            server(tls)?
                .add_service(agent)
                .add_service(admin)
                .serve_with_shutdown(args.listen, stopped())
                .await
                .with_context(|| format!("serving on {}", args.listen))?;
        }
        Some(admin_listen) => {
            let agents = server(tls.clone())?
                .add_service(agent)
                .serve_with_shutdown(args.listen, stopped());
            let admins = server(tls)?
                .add_service(admin)
                .serve_with_shutdown(admin_listen, stopped());
            tokio::try_join!(
                async {
                    agents
                        .await
                        .with_context(|| format!("serving on {}", args.listen))
                },
                async {
                    admins
                        .await
                        .with_context(|| format!("serving the admin API on {admin_listen}"))
                },
            )?;
        }
    }
    info!("controller stopped");
    Ok(())
}

/// A gRPC server with TLS and the limits of [`server_limits`].
fn server(tls: ServerTlsConfig) -> Result<Server> {
    use server_limits::*;
    Ok(Server::builder()
        .tls_config(tls)
        .context("configuring TLS")?
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT)))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))
}

/// Holds an exclusive lock on `<data-dir>/lock` for the process lifetime,
/// so two controllers never write one store.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!(
                "another weft-controller is already running with data dir {}",
                dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// A random /48 from fd00::/8 (RFC 4193 unique local addresses).
fn random_ula() -> Ipv6Net {
    let mut rng = rand::rng();
    let g: [u16; 3] = [
        0xfd00 | u16::from(rng.random::<u8>()),
        rng.random(),
        rng.random(),
    ];
    let addr = std::net::Ipv6Addr::new(g[0], g[1], g[2], 0, 0, 0, 0, 0);
    Ipv6Net::new_assert(addr, 48)
}

/// The addresses agents reach the controller at that are known at start:
/// --controller-address, the --listen address unless unspecified, and the
/// URL's host if it is an IP address.
fn controller_addresses(args: &Args, url: &str) -> Vec<IpAddr> {
    let mut addrs = args.controller_addresses.clone();
    if !args.listen.ip().is_unspecified() {
        addrs.push(args.listen.ip());
    }
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    if let Ok(sa) = host.parse::<SocketAddr>() {
        addrs.push(sa.ip());
    } else if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
        addrs.push(ip);
    }
    addrs
        .into_iter()
        .map(|ip| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        })
        .filter(|ip| !ip.is_loopback())
        .collect()
}

fn default_url(listen: SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    };
    format!("https://{}", SocketAddr::new(ip, listen.port()))
}

/// Loads admin.conf (keeping its token), or writes a new one with a fresh
/// admin token; rewrites it when the URL or CA changed.
fn admin_config(dir: &Path, url: &str, ca_pem: &str) -> Result<AdminConfig> {
    let path = dir.join(ADMIN_CONF);
    let token = if path.exists() {
        AdminConfig::load(&path)?.token
    } else {
        let bytes: [u8; 32] = rand::rng().random();
        hex::encode(bytes)
    };
    let cfg = AdminConfig {
        url: url.to_string(),
        ca_pem: ca_pem.to_string(),
        token,
    };
    let current = path
        .exists()
        .then(|| AdminConfig::load(&path).ok())
        .flatten();
    if current.as_ref() != Some(&cfg) {
        if cfg.token.len() < 32 {
            bail!("the admin token in {} is too short", path.display());
        }
        fsutil::write_private(&path, cfg.to_json().as_bytes())?;
        info!(path = %path.display(), "wrote admin.conf (use it with weftctl --config)");
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_ttl_takes_units_and_a_range() {
        assert_eq!(parse_cert_ttl("30d"), Ok(30 * 86_400));
        assert_eq!(parse_cert_ttl("60s"), Ok(60));
        assert_eq!(parse_cert_ttl("1h30m"), Ok(5400));
        for (bad, why) in [
            ("10s", "out of range"),
            ("400d", "out of range"),
            ("60", "missing unit"),
            ("fast", "expected a number"),
        ] {
            let e = parse_cert_ttl(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        let args = Args::try_parse_from(["weft-controller"]).expect("defaults");
        assert_eq!(args.cert_ttl, 30 * 86_400);
    }
}
