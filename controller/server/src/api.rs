//! The gRPC edge: wire types in, validated domain calls, wire types out.
//! Errors become gRPC statuses in one place ([`status`]).

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use rand::Rng as _;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_controller_core::policy::{
    self as core_policy, Decision, PolicyError, PolicyErrors, Protocol, Verdict,
};
use weft_controller_core::state::CertUse;
use weft_controller_core::time::rfc3339;
use weft_controller_core::{Error as CoreError, ErrorKind, Labels, NodeCert, Registration, State};
use weft_proto::convert::{InvalidMessage, parse_endpoint, parse_key, parse_net};
use weft_proto::pb::{
    self, admin_service_server::AdminService, agent_service_server::AgentService,
};
use weft_proto::token::JoinToken;

use crate::ca::{Ca, Csr};
use crate::controller::{ApiError, Controller, NodeStatus, now_unix};

/// Default join token lifetime.
const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

/// Most reachability changes a dry run returns (the rest are counted).
const MAX_DIFF_CHANGES: usize = 10_000;

/// Maps every error of the API to a gRPC status (the one place that does).
fn status(e: ApiError) -> Status {
    match e {
        ApiError::Core(e) => {
            let msg = e.to_string();
            match e.kind() {
                ErrorKind::NotFound => Status::not_found(msg),
                ErrorKind::AlreadyExists => Status::already_exists(msg),
                ErrorKind::InvalidArgument => Status::invalid_argument(msg),
                ErrorKind::PermissionDenied => Status::permission_denied(msg),
                ErrorKind::FailedPrecondition => Status::failed_precondition(msg),
                ErrorKind::ResourceExhausted => Status::resource_exhausted(msg),
                ErrorKind::Internal => Status::internal(msg),
            }
        }
        ApiError::Store(e) => Status::unavailable(format!(
            "the change could not be stored, nothing was changed: {e}"
        )),
    }
}

fn invalid(e: InvalidMessage) -> Status {
    Status::invalid_argument(e.to_string())
}

fn random_lower(n: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .map(|c| char::from(c).to_ascii_lowercase())
        .take(n)
        .collect()
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// IPv4-mapped IPv6 addresses become plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        IpAddr::V4(_) => ip,
    }
}

/// The endpoint to record for an agent: the one it asks for, else the
/// address we see it connect from with its WireGuard port.
fn advertised_endpoint(
    asked: &str,
    listen_port: u32,
    remote: Option<SocketAddr>,
    msg: &'static str,
) -> Result<Option<SocketAddr>, Status> {
    if let Some(ep) = parse_endpoint(msg, "endpoint", asked).map_err(invalid)? {
        return Ok(Some(ep));
    }
    let port = u16::try_from(listen_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "invalid {msg}: field `listen_port`: {listen_port} is not a UDP port"
            ))
        })?;
    Ok(remote.map(|r| SocketAddr::new(canonical(r.ip()), port)))
}

// ---------------------------------------------------------------- agents

/// `AgentService`: enrolment by join token, then mTLS.
#[derive(Debug)]
pub(crate) struct AgentApi {
    pub(crate) controller: Arc<Controller>,
    pub(crate) ca: Arc<Ca>,
    /// Lifetime of the node certificates issued, in seconds.
    pub(crate) cert_ttl_secs: u64,
}

/// The node a request comes from, and the certificate it came with.
#[derive(Debug)]
struct Caller {
    node_id: String,
    fingerprint: [u8; 32],
}

impl AgentApi {
    /// The node a request comes from, by its client certificate, which
    /// must be one the node holds now and not expired (the TLS handshake
    /// checked the chain and the validity when the connection opened; a
    /// connection may outlive both). The first use of a renewed
    /// certificate drops the previous one.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated("no client certificate: enrol with a join token first")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
        let fingerprint: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
        let now = now_unix();
        let (node_id, first_use) = self
            .controller
            .read(|s, _| {
                s.authenticate(&fingerprint, now)
                    .map(|u| (u.node().id.clone(), matches!(u, CertUse::FirstUse(_))))
            })
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        if first_use {
            self.controller
                .mutate("first use of a renewed certificate", |s| {
                    s.confirm_cert(&node_id, &fingerprint)
                })
                .map_err(status)?;
            info!(node = %node_id, "renewed certificate in use: the previous one is no longer accepted");
        }
        Ok(Caller {
            node_id,
            fingerprint,
        })
    }
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<pb::NodeConfig, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        const M: &str = "RegisterRequest";
        let remote = req.remote_addr();
        let r = req.into_inner();
        let (token_id, secret) = JoinToken::parse_credential(&r.join_token)
            .map_err(|e| Status::permission_denied(format!("join token refused: {e}")))?;
        let public_key = parse_key(M, "public_key", &r.public_key).map_err(invalid)?;
        let endpoint = advertised_endpoint(&r.endpoint, r.listen_port, remote, M)?;
        let csr = Csr::parse(&r.csr_der).map_err(|e| {
            Status::invalid_argument(format!("invalid {M}: field `csr_der`: {e:#}"))
        })?;
        let csr_key = csr.key_hash;
        let now = now_unix();
        // A retry after a lost reply gets the node it created back, if it
        // proves possession of the first request's key.
        let retried = self.controller.read(|s, _| {
            s.retried_registration(
                &token_id,
                &sha256(&secret),
                &r.name,
                &public_key,
                &csr_key,
                now,
            )
            .map(str::to_owned)
        });
        if let Some(id) = &retried {
            info!(node = %id, name = %r.name, token = %token_id, "registration retried: same name, keys and token; issuing a new certificate");
        }
        let node_id = retried.unwrap_or_else(|| format!("n-{}", random_lower(8)));
        let cert = self
            .ca
            .sign_node_csr(csr, &node_id, now, self.cert_ttl_secs)
            .map_err(|e| Status::internal(format!("signing the node certificate: {e:#}")))?;
        let reg = Registration {
            node_id: node_id.clone(),
            token_id: token_id.clone(),
            secret_hash: sha256(&secret),
            name: r.name.clone(),
            public_key,
            endpoint,
            cert_fingerprint: cert.fingerprint,
            cert_expires_unix: cert.expires_unix,
            csr_key,
            labels: labels(r.labels.clone()),
        };
        match self.controller.mutate("register node", |s| {
            s.register_node(reg, now).map(|n| n.id.clone())
        }) {
            Ok(id) => {
                info!(node = %id, name = %r.name, token = %token_id, endpoint = ?endpoint, "node registered");
                Ok(Response::new(pb::RegisterResponse {
                    node_id: id,
                    client_cert_pem: cert.pem,
                }))
            }
            Err(e) => {
                warn!(name = %r.name, token = %token_id, error = %e, "registration refused");
                Err(status(e))
            }
        }
    }

    type WatchStream = ConfigStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<ConfigStream>, Status> {
        let Caller {
            node_id,
            fingerprint,
        } = self.caller(&req)?;
        let remote = req.remote_addr();
        let w = req.into_inner();
        let endpoint = advertised_endpoint(&w.endpoint, w.listen_port, remote, "WatchRequest")?;
        let advertise = workloads("WatchRequest", "advertise", &w.advertise)?;
        if !advertise.is_empty() {
            let changed = self
                .controller
                .mutate("advertise workload prefixes", |s| {
                    s.advertise_prefixes(&node_id, &advertise)
                })
                .map_err(|e| {
                    warn!(node = %node_id, error = %e, "agent's advertised prefixes refused");
                    status(e)
                })?;
            if changed {
                info!(node = %node_id, prefixes = ?advertise.keys().collect::<Vec<_>>(), "workload prefixes advertised by the agent");
            }
        }
        if endpoint.is_some() {
            self.controller
                .set_endpoint(&node_id, endpoint)
                .map_err(status)?;
        }
        let rx = self
            .controller
            .subscribe(&node_id)
            .ok_or_else(|| Status::unauthenticated("this node is no longer registered"))?;
        info!(node = %node_id, known_revision = w.known_revision, "agent watching its config");
        let guard = StreamGuard {
            controller: self.controller.clone(),
            node_id,
        };
        let configs = WatchStream::new(rx).map(move |cfg| {
            let _keep = &guard;
            Ok(pb::NodeConfig::from(cfg.as_ref()))
        });
        // The stream ends, with the reason, as soon as the certificate it
        // was opened with is no longer accepted (replaced, expired, node
        // deleted): a long-lived connection outlives no revocation.
        let refused = futures::stream::once(self.controller.until_refused(fingerprint))
            .map(|why| Err(Status::unauthenticated(why)));
        Ok(Response::new(Box::pin(configs.merge(refused))))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let node_id = self.caller(&req)?.node_id;
        self.controller.report(&node_id, req.into_inner());
        Ok(Response::new(pb::ReportResponse {}))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let caller = self.caller(&req)?;
        let csr = Csr::parse(&req.into_inner().csr_der).map_err(|e| {
            Status::invalid_argument(format!("invalid RenewRequest: field `csr_der`: {e:#}"))
        })?;
        let now = now_unix();
        let cert = self
            .ca
            .sign_node_csr(csr, &caller.node_id, now, self.cert_ttl_secs)
            .map_err(|e| Status::internal(format!("signing the node certificate: {e:#}")))?;
        let new = NodeCert {
            fingerprint: cert.fingerprint,
            expires_unix: cert.expires_unix,
        };
        self.controller
            .mutate("renew node certificate", |s| {
                s.renew_cert(&caller.fingerprint, new, now).map(drop)
            })
            .map_err(|e| {
                warn!(node = %caller.node_id, error = %e, "certificate renewal refused");
                status(e)
            })?;
        info!(node = %caller.node_id, expires = %rfc3339(cert.expires_unix), "node certificate renewed");
        Ok(Response::new(pb::RenewResponse {
            client_cert_pem: cert.pem,
            expires_unix: cert.expires_unix,
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let node_id = self.caller(&req)?.node_id;
        let r = req.into_inner();
        let key = parse_key("RotateKeyRequest", "public_key", &r.public_key).map_err(invalid)?;
        let (changed, generation) = self
            .controller
            .mutate("rotate node key", |s| {
                let changed = s.rotate_node_key(&node_id, key, r.generation)?;
                let generation = s.node_by_id(&node_id).map_or(0, |n| n.key_generation);
                Ok((changed, generation))
            })
            .map_err(|e| {
                warn!(node = %node_id, error = %e, "WireGuard key rotation refused");
                status(e)
            })?;
        if changed {
            info!(node = %node_id, public_key = %key, generation, "node rotated its WireGuard key");
        }
        Ok(Response::new(pb::RotateKeyResponse { generation }))
    }
}

/// Marks the node's stream closed when the stream is dropped.
struct StreamGuard {
    controller: Arc<Controller>,
    node_id: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.controller.unsubscribe(&self.node_id);
    }
}

// ---------------------------------------------------------------- admin

/// Checks the admin bearer token on every AdminService call.
#[derive(Clone, Debug)]
pub(crate) struct AdminAuth {
    pub(crate) token_hash: [u8; 32],
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get(weft_proto::admin_config::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing admin token (authorization: Bearer ...)")
            })?;
        // Compare hashes, so timing says nothing about the token.
        if sha256(given) == self.token_hash {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "admin token is not valid for this controller",
            ))
        }
    }
}

/// `AdminService`.
#[derive(Debug)]
pub(crate) struct AdminApi {
    pub(crate) controller: Arc<Controller>,
    pub(crate) ca: Arc<Ca>,
}

impl AdminApi {
    /// Applies `change` to node `name` (name or id) and returns the node
    /// as changed, for the RPCs that edit one node.
    fn mutate_node<T>(
        &self,
        what: &str,
        name: &str,
        change: impl FnOnce(&mut State) -> Result<T, CoreError>,
    ) -> Result<weft_controller_core::Node, Status> {
        self.controller
            .mutate(what, |s| {
                change(s)?;
                s.node(name)
                    .cloned()
                    .ok_or_else(|| CoreError::NodeNotFound(name.to_owned()))
            })
            .map_err(status)
    }

    /// The node with its live status, as the API returns it.
    fn node_reply(&self, node: &weft_controller_core::Node) -> Response<pb::Node> {
        Response::new(
            self.controller
                .read(|_, st| node_pb(node, st.get(&node.id))),
        )
    }
}

/// A site with the number of nodes in it.
fn site_with_count(
    state: &weft_controller_core::State,
    site: &weft_controller_core::Site,
) -> pb::Site {
    site_pb(site, state.nodes().filter(|n| n.site == site.name).count())
}

fn site_pb(s: &weft_controller_core::Site, node_count: usize) -> pb::Site {
    pb::Site {
        name: s.name.clone(),
        created_unix: s.created_unix,
        node_count: u32::try_from(node_count).unwrap_or(u32::MAX),
    }
}

fn token_pb(t: &weft_controller_core::JoinToken) -> pb::JoinToken {
    pb::JoinToken {
        id: t.id.clone(),
        site: t.site.clone(),
        created_unix: t.created_unix,
        expires_unix: t.expires_unix,
        used_by_node: t.used_by.clone().unwrap_or_default(),
        token: String::new(),
    }
}

fn node_pb(n: &weft_controller_core::Node, st: Option<&NodeStatus>) -> pb::Node {
    let st = st.cloned().unwrap_or_default();
    pb::Node {
        id: n.id.clone(),
        name: n.name.clone(),
        site: n.site.clone(),
        public_key: n.public_key.0.to_vec(),
        endpoint: n.endpoint.map(|e| e.to_string()).unwrap_or_default(),
        addresses: vec![n.ipv4.to_string(), n.ipv6.to_string()],
        created_unix: n.created_unix,
        connected: st.streams > 0,
        applied_revision: st.applied_revision,
        last_report_unix: st.last_report_unix,
        apply_error: st.apply_error,
        peers: st.peers,
        labels: n.labels.clone().into_iter().collect(),
        policy: st.policy,
        cert_expires_unix: n.cert_expires_unix,
        workloads: n
            .advertised
            .iter()
            .map(|(prefix, labels)| pb::Workload {
                prefix: prefix.to_string(),
                labels: labels.clone().into_iter().collect(),
            })
            .collect(),
    }
}

/// Wire workloads as prefix -> labels, each prefix parsed (labels and
/// overlaps are the core's to check); a prefix given twice is refused.
fn workloads(
    msg: &'static str,
    field: &str,
    wire: &[pb::Workload],
) -> Result<std::collections::BTreeMap<ipnet::IpNet, Labels>, Status> {
    let mut out = std::collections::BTreeMap::new();
    for (i, w) in wire.iter().enumerate() {
        let field = format!("{field}[{i}].prefix");
        let prefix = parse_net(msg, &field, &w.prefix).map_err(invalid)?;
        if out.insert(prefix, labels(w.labels.clone())).is_some() {
            return Err(invalid(InvalidMessage::new(
                msg,
                field,
                format!("{prefix} is given twice"),
            )));
        }
    }
    Ok(out)
}

fn peer_pb(p: &weft_controller_core::ExternalPeer) -> pb::ExternalPeer {
    pb::ExternalPeer {
        name: p.name.clone(),
        site: p.site.clone(),
        public_key: p.public_key.0.to_vec(),
        endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
        addresses: vec![p.ipv4.to_string(), p.ipv6.to_string()],
        created_unix: p.created_unix,
        labels: p.labels.clone().into_iter().collect(),
    }
}

/// Wire labels (a hash map) as domain labels, validated by the core.
fn labels(wire: std::collections::HashMap<String, String>) -> Labels {
    wire.into_iter().collect()
}

fn policy_pb(p: &core_policy::Policy) -> pb::Policy {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let mut target: Vec<String> = p
        .target
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !p.target.sites.is_empty() {
        let sites: Vec<&str> = p.target.sites.iter().map(String::as_str).collect();
        target.push(format!("sites={}", sites.join("|")));
    }
    pb::Policy {
        name: p.name.clone(),
        yaml: core_policy::to_yaml(p),
        ingress_rules: count(p.ingress.len()),
        deny_rules: count(p.deny.len()),
        target: target.join(", "),
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
    }
}

/// Parses every file; every error of every file (and names defined in two
/// files) comes back together.
fn parse_files(files: &[pb::PolicyFile]) -> Result<Vec<core_policy::Policy>, CoreError> {
    let mut errors = Vec::new();
    let mut policies = Vec::new();
    let mut defined_in: std::collections::BTreeMap<String, String> = Default::default();
    for f in files {
        match core_policy::parse_documents(&f.name, &f.text) {
            Ok(ps) => {
                for p in ps {
                    match defined_in.get(&p.name) {
                        Some(first) => errors.push(PolicyError {
                            file: f.name.clone(),
                            resource: format!("{} {:?}", core_policy::KIND, p.name),
                            field: "metadata.name".to_owned(),
                            message: format!("duplicate name: {first} already defines it"),
                        }),
                        None => {
                            defined_in.insert(p.name.clone(), f.name.clone());
                            policies.push(p);
                        }
                    }
                }
            }
            Err(PolicyErrors(e)) => errors.extend(e),
        }
    }
    if files.is_empty() {
        errors.push(PolicyError {
            file: String::new(),
            resource: String::new(),
            field: String::new(),
            message: "no policy files given".to_owned(),
        });
    } else if errors.is_empty() && policies.is_empty() {
        errors.push(PolicyError {
            file: files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            resource: String::new(),
            field: String::new(),
            message: "no policy documents found".to_owned(),
        });
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(CoreError::InvalidPolicies(PolicyErrors(errors)))
    }
}

/// The dry-run answer: `next` is the state the apply would produce.
fn dry_run_pb(
    current: &State,
    next: &State,
    changes: weft_controller_core::PolicyChanges,
) -> pb::ApplyPoliciesResponse {
    let old: Vec<core_policy::Policy> = current.policies().cloned().collect();
    let new: Vec<core_policy::Policy> = next.policies().cloned().collect();
    let diff = core_policy::reachability_diff(&old, &new, &next.endpoints());
    let omitted = diff.len().saturating_sub(MAX_DIFF_CHANGES);
    pb::ApplyPoliciesResponse {
        revision: current.revision(),
        dry_run: true,
        created: changes.created,
        updated: changes.updated,
        unchanged: changes.unchanged,
        changes: diff
            .into_iter()
            .take(MAX_DIFF_CHANGES)
            .map(|c| pb::ReachabilityChange {
                from: c.from,
                to: c.to,
                protocol: protocol_name(c.protocol).to_owned(),
                port_first: u32::from(c.ports.first),
                port_last: u32::from(c.ports.last),
                gained: c.gained,
            })
            .collect(),
        changes_omitted: u32::try_from(omitted).unwrap_or(u32::MAX),
    }
}

/// A member by node name or id, external peer name, or an overlay address
/// (the member holding it: its own address or a workload prefix it
/// advertises, longest prefix first).
fn find_member(state: &State, what: &str) -> Result<weft_controller_core::Member, Status> {
    use weft_controller_core::Member;
    if let Some(n) = state.node(what) {
        return Ok(Member::Node(n.id.clone()));
    }
    if let Some(p) = state.external_peer(what) {
        return Ok(Member::ExternalPeer(p.name.clone()));
    }
    let addr: Option<IpAddr> = what
        .parse()
        .ok()
        .or_else(|| what.parse::<ipnet::IpNet>().ok().map(|n| n.addr()));
    let Some(addr) = addr else {
        return Err(Status::not_found(format!(
            "{what:?} is not a node, an external peer or an overlay address"
        )));
    };
    let host = |a: IpAddr, v4: std::net::Ipv4Addr, v6: std::net::Ipv6Addr| {
        a == IpAddr::V4(v4) || a == IpAddr::V6(v6)
    };
    if let Some(n) = state.nodes().find(|n| host(addr, n.ipv4, n.ipv6)) {
        return Ok(Member::Node(n.id.clone()));
    }
    if let Some(p) = state.external_peers().find(|p| host(addr, p.ipv4, p.ipv6)) {
        return Ok(Member::ExternalPeer(p.name.clone()));
    }
    state
        .nodes()
        .flat_map(|n| n.advertised.keys().map(move |p| (p, n)))
        .filter(|(p, _)| p.contains(&addr))
        .max_by_key(|(p, _)| p.prefix_len())
        .map(|(_, n)| Member::Node(n.id.clone()))
        .ok_or_else(|| {
            Status::not_found(format!(
                "no node or external peer holds {addr} (not a member's address nor inside an advertised prefix)"
            ))
        })
}

fn route_kind(route: &weft_controller_core::topology::SiteRoute) -> &'static str {
    use weft_controller_core::topology::SiteRoute;
    match route {
        SiteRoute::Local => "local",
        SiteRoute::Direct { .. } => "direct",
        SiteRoute::Relayed { .. } => "relayed",
        SiteRoute::NoRoute(_) => "none",
    }
}

fn topology_pb(state: &State) -> pb::Topology {
    use weft_controller_core::topology::TopologyMode;
    let t = state.topology();
    pb::Topology {
        mode: match t.mode {
            TopologyMode::FullMesh => "full-mesh",
            TopologyMode::Gateways => "gateways",
        }
        .to_owned(),
        gateways: t
            .gateways
            .iter()
            .map(|id| state.node_by_id(id).map_or(id.clone(), |n| n.name.clone()))
            .collect(),
        site_tags: t
            .site_tags
            .iter()
            .map(|(site, tags)| {
                let tags = pb::SiteTags {
                    tags: tags.iter().cloned().collect(),
                };
                (site.clone(), tags)
            })
            .collect(),
        residency: t.residency.iter().map(|r| r.tag.clone()).collect(),
        revision: state.revision(),
    }
}

fn topology_from_pb(
    t: pb::Topology,
) -> Result<weft_controller_core::topology::TopologyConfig, Status> {
    use weft_controller_core::topology::{ResidencyRule, TopologyConfig, TopologyMode};
    let mode = match t.mode.as_str() {
        "" | "full-mesh" | "full_mesh" => TopologyMode::FullMesh,
        "gateways" => TopologyMode::Gateways,
        other => {
            return Err(Status::invalid_argument(format!(
                "invalid Topology: field `mode`: {other:?} is not full-mesh or gateways"
            )));
        }
    };
    Ok(TopologyConfig {
        mode,
        gateways: t.gateways.into_iter().collect(),
        site_tags: t
            .site_tags
            .into_iter()
            .map(|(site, tags)| (site, tags.tags.into_iter().collect()))
            .collect(),
        residency: t
            .residency
            .into_iter()
            .map(|tag| ResidencyRule { tag })
            .collect(),
        params: Default::default(),
    })
}

fn explain_pb(e: core_policy::Explanation) -> pb::ExplainPolicyResponse {
    let verdict = match e.verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    };
    let mut out = pb::ExplainPolicyResponse {
        verdict: verdict.to_owned(),
        ..Default::default()
    };
    match e.decision {
        Decision::Deny { policy, rule } => {
            out.reason = "deny_rule".to_owned();
            out.policy = policy;
            out.rule = format!("deny[{rule}]");
        }
        Decision::Allow { policy, rule } => {
            out.reason = "allow_rule".to_owned();
            out.policy = policy;
            out.rule = format!("ingress[{rule}]");
        }
        Decision::DefaultDeny { policies } => {
            out.reason = "default_deny".to_owned();
            out.selected_by = policies;
        }
        // Explain always has a known destination.
        Decision::NotGoverned | Decision::UnknownDestination => {
            out.reason = "not_governed".to_owned();
        }
    }
    out
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_site(
        &self,
        req: Request<pb::CreateSiteRequest>,
    ) -> Result<Response<pb::Site>, Status> {
        let name = req.into_inner().name;
        let now = now_unix();
        let site = self
            .controller
            .mutate("create site", |s| {
                s.create_site(&name, now).map(|s| site_pb(s, 0))
            })
            .map_err(status)?;
        info!(site = %name, "site created");
        Ok(Response::new(site))
    }

    async fn list_sites(
        &self,
        _req: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        let sites = self
            .controller
            .read(|s, _| s.sites().map(|site| site_with_count(s, site)).collect());
        Ok(Response::new(pb::ListSitesResponse { sites }))
    }

    async fn get_site(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Site>, Status> {
        let name = req.into_inner().name;
        self.controller
            .read(|s, _| s.site(&name).map(|site| site_with_count(s, site)))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("site {name:?} not found")))
    }

    async fn delete_site(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let name = req.into_inner().name;
        let revision = self
            .controller
            .mutate("delete site", |s| {
                s.delete_site(&name).map(|()| s.revision())
            })
            .map_err(status)?;
        info!(site = %name, "site deleted");
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let r = req.into_inner();
        let ttl = if r.ttl_seconds == 0 {
            DEFAULT_TOKEN_TTL_SECS
        } else {
            r.ttl_seconds
        };
        let token = JoinToken {
            id: random_lower(6),
            secret: random_lower(16),
            ca_hash: self.ca.hash(),
        };
        let now = now_unix();
        let mut out = self
            .controller
            .mutate("create join token", |s| {
                s.create_token(&token.id, sha256(&token.secret), &r.site, now, ttl)
                    .map(token_pb)
            })
            .map_err(status)?;
        info!(token = %token.id, site = %r.site, ttl_secs = ttl, "join token created");
        out.token = token.to_string();
        Ok(Response::new(out))
    }

    async fn list_join_tokens(
        &self,
        _req: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        let tokens = self
            .controller
            .read(|s, _| s.tokens().map(token_pb).collect());
        Ok(Response::new(pb::ListJoinTokensResponse { tokens }))
    }

    async fn delete_join_token(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let id = req.into_inner().name;
        let revision = self
            .controller
            .mutate("delete join token", |s| {
                s.delete_token(&id).map(|()| s.revision())
            })
            .map_err(status)?;
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let site = req.into_inner().site;
        let (nodes, revision) = self.controller.read(|s, st| {
            let nodes = s
                .nodes()
                .filter(|n| site.is_empty() || n.site == site)
                .map(|n| node_pb(n, st.get(&n.id)))
                .collect();
            (nodes, s.revision())
        });
        Ok(Response::new(pb::ListNodesResponse { nodes, revision }))
    }

    async fn get_node(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Node>, Status> {
        let name = req.into_inner().name;
        self.controller
            .read(|s, st| s.node(&name).map(|n| node_pb(n, st.get(&n.id))))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("node {name:?} not found")))
    }

    async fn delete_node(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let name = req.into_inner().name;
        let (node, revision) = self
            .controller
            .mutate("delete node", |s| {
                s.delete_node(&name).map(|n| (n, s.revision()))
            })
            .map_err(status)?;
        info!(node = %node.id, name = %node.name, "node deleted");
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn create_external_peer(
        &self,
        req: Request<pb::CreateExternalPeerRequest>,
    ) -> Result<Response<pb::ExternalPeer>, Status> {
        const M: &str = "CreateExternalPeerRequest";
        let r = req.into_inner();
        let key = parse_key(M, "public_key", &r.public_key).map_err(invalid)?;
        let endpoint = parse_endpoint(M, "endpoint", &r.endpoint).map_err(invalid)?;
        let now = now_unix();
        let peer = self
            .controller
            .mutate("add external peer", |s| {
                s.add_external_peer(
                    &r.name,
                    &r.site,
                    key,
                    endpoint,
                    labels(r.labels.clone()),
                    now,
                )
                .map(peer_pb)
            })
            .map_err(status)?;
        info!(peer = %r.name, site = %r.site, "external peer added");
        Ok(Response::new(peer))
    }

    async fn list_external_peers(
        &self,
        _req: Request<pb::ListExternalPeersRequest>,
    ) -> Result<Response<pb::ListExternalPeersResponse>, Status> {
        let peers = self
            .controller
            .read(|s, _| s.external_peers().map(peer_pb).collect());
        Ok(Response::new(pb::ListExternalPeersResponse { peers }))
    }

    async fn get_external_peer(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::ExternalPeer>, Status> {
        let name = req.into_inner().name;
        self.controller
            .read(|s, _| s.external_peer(&name).map(peer_pb))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("external peer {name:?} not found")))
    }

    async fn delete_external_peer(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let name = req.into_inner().name;
        let revision = self
            .controller
            .mutate("delete external peer", |s| {
                s.delete_external_peer(&name).map(|()| s.revision())
            })
            .map_err(status)?;
        info!(peer = %name, "external peer deleted");
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn get_external_peer_config(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::NodeConfig>, Status> {
        let name = req.into_inner().name;
        self.controller
            .external_peer_config(&name)
            .map(|c| Response::new(pb::NodeConfig::from(&c)))
            .ok_or_else(|| Status::not_found(format!("external peer {name:?} not found")))
    }

    async fn set_node_labels(
        &self,
        req: Request<pb::SetNodeLabelsRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let r = req.into_inner();
        let set = labels(r.set);
        let node = self.mutate_node("set node labels", &r.node, |s| {
            s.set_node_labels(&r.node, &set, &r.remove)
        })?;
        info!(node = %node.id, labels = ?node.labels, "node labels set");
        Ok(self.node_reply(&node))
    }

    async fn advertise_prefix(
        &self,
        req: Request<pb::AdvertisePrefixRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        const M: &str = "AdvertisePrefixRequest";
        let r = req.into_inner();
        let w = r
            .workload
            .ok_or_else(|| invalid(InvalidMessage::new(M, "workload", "missing")))?;
        let advertise = workloads(M, "workload", std::slice::from_ref(&w))?;
        let node = self.mutate_node("advertise workload prefix", &r.node, |s| {
            s.advertise_prefixes(&r.node, &advertise)
        })?;
        info!(node = %node.id, prefix = %w.prefix, labels = ?w.labels, "workload prefix advertised");
        Ok(self.node_reply(&node))
    }

    async fn withdraw_prefix(
        &self,
        req: Request<pb::WithdrawPrefixRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        const M: &str = "WithdrawPrefixRequest";
        let r = req.into_inner();
        let prefix = parse_net(M, "prefix", &r.prefix).map_err(invalid)?;
        let node = self.mutate_node("withdraw workload prefix", &r.node, |s| {
            s.withdraw_prefix(&r.node, prefix)
        })?;
        info!(node = %node.id, prefix = %prefix, "workload prefix withdrawn");
        Ok(self.node_reply(&node))
    }

    async fn apply_policies(
        &self,
        req: Request<pb::ApplyPoliciesRequest>,
    ) -> Result<Response<pb::ApplyPoliciesResponse>, Status> {
        let r = req.into_inner();
        let policies = parse_files(&r.files).map_err(|e| status(e.into()))?;
        if r.dry_run {
            let out = self
                .controller
                .read(|s, _| {
                    let mut next = s.clone();
                    let changes = next.apply_policies(policies)?;
                    Ok(dry_run_pb(s, &next, changes))
                })
                .map_err(|e: CoreError| status(e.into()))?;
            return Ok(Response::new(out));
        }
        let (changes, revision) = self
            .controller
            .mutate("apply policies", |s| {
                s.apply_policies(policies).map(|c| (c, s.revision()))
            })
            .map_err(status)?;
        info!(
            created = ?changes.created,
            updated = ?changes.updated,
            unchanged = changes.unchanged.len(),
            revision,
            "policies applied"
        );
        Ok(Response::new(pb::ApplyPoliciesResponse {
            revision,
            dry_run: false,
            created: changes.created,
            updated: changes.updated,
            unchanged: changes.unchanged,
            changes: Vec::new(),
            changes_omitted: 0,
        }))
    }

    async fn list_policies(
        &self,
        _req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let (policies, revision) = self
            .controller
            .read(|s, _| (s.policies().map(policy_pb).collect(), s.revision()));
        Ok(Response::new(pb::ListPoliciesResponse {
            policies,
            revision,
        }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let name = req.into_inner().name;
        self.controller
            .read(|s, _| s.policy(&name).map(policy_pb))
            .map(Response::new)
            .ok_or_else(|| status(CoreError::PolicyNotFound(name).into()))
    }

    async fn delete_policy(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let name = req.into_inner().name;
        let revision = self
            .controller
            .mutate("delete policy", |s| {
                s.delete_policy(&name).map(|_| s.revision())
            })
            .map_err(status)?;
        info!(policy = %name, revision, "policy deleted");
        Ok(Response::new(pb::DeleteResponse { revision }))
    }

    async fn trace_route(
        &self,
        req: Request<pb::TraceRouteRequest>,
    ) -> Result<Response<pb::TraceRouteResponse>, Status> {
        let r = req.into_inner();
        let (src, dst) = self
            .controller
            .read(|s, _| Ok::<_, Status>((find_member(s, &r.from)?, find_member(s, &r.to)?)))?;
        let trace = self
            .controller
            .trace(&src, &dst)
            .ok_or_else(|| Status::not_found("no such member in the topology"))?;
        Ok(Response::new(pb::TraceRouteResponse {
            hops: trace
                .hops
                .iter()
                .map(|h| {
                    let gw = if h.gateway { ", gateway" } else { "" };
                    format!("{} ({}{gw})", h.name, h.site)
                })
                .collect(),
            delivered: trace.delivered,
            explanation: trace.sites.to_string(),
        }))
    }

    async fn list_routes(
        &self,
        _req: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let routes = self
            .controller
            .site_routes()
            .into_iter()
            .map(|t| pb::SiteRouteInfo {
                kind: route_kind(&t.route).to_owned(),
                explanation: t.to_string(),
                from: t.from,
                to: t.to,
                hops: t.hops,
            })
            .collect();
        Ok(Response::new(pb::ListRoutesResponse { routes }))
    }

    async fn get_topology(
        &self,
        _req: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::Topology>, Status> {
        Ok(Response::new(self.controller.read(|s, _| topology_pb(s))))
    }

    async fn set_topology(
        &self,
        req: Request<pb::Topology>,
    ) -> Result<Response<pb::Topology>, Status> {
        let config = topology_from_pb(req.into_inner())?;
        let (changed, out) = self
            .controller
            .mutate("topology", |s| {
                let changed = s.set_topology(config)?;
                Ok((changed, topology_pb(s)))
            })
            .map_err(status)?;
        info!(
            changed,
            mode = %out.mode,
            gateways = ?out.gateways,
            residency = ?out.residency,
            revision = out.revision,
            "topology set"
        );
        Ok(Response::new(out))
    }

    async fn rotate_node_key(
        &self,
        req: Request<pb::RotateNodeKeyRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let name = req.into_inner().node;
        let node = self.mutate_node("request WireGuard key rotation", &name, |s| {
            s.request_key_rotation(&name)
        })?;
        info!(node = %node.id, generation = node.key_generation, "WireGuard key rotation requested");
        Ok(self.node_reply(&node))
    }

    async fn explain_policy(
        &self,
        req: Request<pb::ExplainPolicyRequest>,
    ) -> Result<Response<pb::ExplainPolicyResponse>, Status> {
        const M: &str = "ExplainPolicyRequest";
        let r = req.into_inner();
        let protocol = match r.protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            other => {
                return Err(Status::invalid_argument(format!(
                    "invalid {M}: field `protocol`: {other:?} is not tcp, udp or icmp"
                )));
            }
        };
        let port = if protocol.has_ports() {
            u16::try_from(r.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "invalid {M}: field `port`: {} is not a port (1 to 65535)",
                        r.port
                    ))
                })?
        } else {
            0
        };
        let explanation = self
            .controller
            .read(|s, _| {
                let find = |name: &str| {
                    s.endpoint(name)
                        .ok_or_else(|| CoreError::EndpointNotFound(name.to_owned()))
                };
                let (src, dst) = (find(&r.from)?, find(&r.to)?);
                let policies: Vec<core_policy::Policy> = s.policies().cloned().collect();
                Ok(core_policy::explain(
                    &policies,
                    Some(&src),
                    Some(&dst),
                    protocol,
                    port,
                ))
            })
            .map_err(|e: CoreError| status(e.into()))?;
        Ok(Response::new(explain_pb(explanation)))
    }
}
