//! Carrying out each command: the RPCs, then the text or JSON to print.
//! Nothing is printed here; output is returned so that a failing command
//! prints nothing on stdout.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use serde::Serialize;
use weft_proto::pb;

use crate::api::Api;
use crate::cli::{
    AdminCommand, AdminTokenCommand, ApplyArgs, Command, DeleteCommand, ExplainArgs, GetCommand,
    LabelChange, NodeCommand, Output, PeerAdd, PeerCommand, PolicyCommand, RoleArg, RouteCommand,
    SiteCommand, TokenCommand, TokenCreate, TopologyCommand, TopologyModeArg,
};
use crate::duration::format_secs;
use crate::output::utc;
use crate::view::{
    AdminTokenView, ApplyView, AuditRecordView, CreatedAdminTokenView, CreatedTokenView,
    DeletedView, ExplainView, ExternalPeerView, NodeView, PeerConfigView, PolicyView, SiteView,
    TokenView,
};
use crate::{render, wgquick};

/// What a successful command prints.
#[derive(Debug, Default)]
pub(crate) struct Printed {
    pub(crate) stdout: String,
    /// Hints for people; never needed by scripts.
    pub(crate) stderr: String,
}

impl Printed {
    fn out(stdout: String) -> Self {
        Printed {
            stdout,
            stderr: String::new(),
        }
    }
}

/// Runs `command` against the controller; `now` is the Unix time for
/// relative times ("3s ago").
pub(crate) async fn run(api: &Api, command: Command, output: Output, now: u64) -> Result<Printed> {
    match command {
        Command::Site(c) => site(api, c, output, now).await,
        Command::Token(c) => token(api, c, output, now).await,
        Command::Node(c) => node(api, c, output, now).await,
        Command::Peer(c) => peer(api, c, output, now).await,
        Command::Apply(a) => apply(api, a, output).await,
        Command::Get(c) => get(api, c, output).await,
        Command::Delete(DeleteCommand::Policy { name }) => {
            let mut c = api.client();
            let r = api.check(
                c.delete_policy(pb::DeleteRequest { name: name.clone() })
                    .await,
            )?;
            deleted(output, "policy", name, r.revision)
        }
        Command::Policy(PolicyCommand::Explain(a)) => explain(api, a, output).await,
        Command::Admin(AdminCommand::Token(c)) => admin_token(api, c, output, now).await,
        Command::Audit { since } => {
            let since_unix = since.map_or(0, |d| now.saturating_sub(d.as_secs()));
            let r = api.check(
                api.client()
                    .list_audit_records(pb::ListAuditRecordsRequest { since_unix })
                    .await,
            )?;
            let views: Vec<AuditRecordView> = r.records.iter().map(AuditRecordView::from).collect();
            let mut printed = emit(output, &views, || render::audit(&r.records))?;
            if r.omitted > 0 {
                printed.stderr = format!(
                    "{} older records left out; narrow with --since\n",
                    r.omitted
                );
            }
            Ok(printed)
        }
        Command::Route(RouteCommand::List) => {
            let r = api.check(api.client().list_routes(pb::ListRoutesRequest {}).await)?;
            let view: Vec<serde_json::Value> = r
                .routes
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "from": t.from, "to": t.to, "hops": t.hops,
                        "kind": t.kind, "explanation": t.explanation,
                    })
                })
                .collect();
            emit(output, &view, || render::site_routes(&r.routes))
        }
        Command::Topology(TopologyCommand::Get) => {
            let t = api.check(api.client().get_topology(pb::GetTopologyRequest {}).await)?;
            emit(output, &topology_view(&t), || render::topology(&t))
        }
        Command::Topology(TopologyCommand::Set(a)) => {
            let req = pb::Topology {
                mode: match a.mode {
                    TopologyModeArg::FullMesh => "full-mesh",
                    TopologyModeArg::Gateways => "gateways",
                }
                .to_owned(),
                gateways: a.gateways,
                site_tags: a
                    .site_tags
                    .into_iter()
                    .map(|(site, tags)| (site, pb::SiteTags { tags }))
                    .collect(),
                residency: a.residency,
                revision: 0,
            };
            let t = api.check(api.client().set_topology(req).await)?;
            emit(output, &topology_view(&t), || render::topology(&t))
        }
        Command::Route(RouteCommand::Trace { from, to }) => {
            let r = api.check(
                api.client()
                    .trace_route(pb::TraceRouteRequest { from, to })
                    .await,
            )?;
            let view = serde_json::json!({
                "hops": r.hops,
                "delivered": r.delivered,
                "explanation": r.explanation,
            });
            emit(output, &view, || {
                format!(
                    "{}\n{}\n",
                    r.hops.join(" -> "),
                    if r.delivered {
                        r.explanation.clone()
                    } else {
                        format!("{} (not delivered)", r.explanation)
                    }
                )
            })
        }
    }
}

async fn apply(api: &Api, args: ApplyArgs, output: Output) -> Result<Printed> {
    let files = read_policy_files(&args.files)?;
    let req = pb::ApplyPoliciesRequest {
        files,
        dry_run: args.dry_run,
    };
    let r = api.check(api.client().apply_policies(req).await)?;
    emit(output, &ApplyView::from(&r), || render::applied(&r))
}

/// Each FILE, and each DIR's *.yaml and *.yml files sorted by name, with
/// the path as given as the file's name in errors.
fn read_policy_files(paths: &[std::path::PathBuf]) -> Result<Vec<pb::PolicyFile>> {
    let mut files = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut batch = if meta.is_dir() {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(path)
                .with_context(|| format!("cannot list directory {}", path.display()))?
            {
                let p = entry
                    .with_context(|| format!("cannot list directory {}", path.display()))?
                    .path();
                let yaml = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml");
                if yaml && p.is_file() {
                    found.push(p);
                }
            }
            if found.is_empty() {
                anyhow::bail!("directory {} has no *.yaml or *.yml files", path.display());
            }
            found.sort();
            found
        } else {
            vec![path.clone()]
        };
        for p in batch.drain(..) {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            files.push(pb::PolicyFile {
                name: p.display().to_string(),
                text,
            });
        }
    }
    Ok(files)
}

async fn get(api: &Api, command: GetCommand, output: Output) -> Result<Printed> {
    let mut c = api.client();
    match command {
        GetCommand::Policies => {
            let r = api.check(c.list_policies(pb::ListPoliciesRequest {}).await)?;
            if output == Output::Yaml {
                let docs: Vec<&str> = r.policies.iter().map(|p| p.yaml.as_str()).collect();
                return Ok(Printed::out(docs.join("---\n")));
            }
            let views: Vec<PolicyView> = r.policies.iter().map(PolicyView::from).collect();
            emit(output, &views, || render::policies(&r.policies))
        }
        GetCommand::Policy { name } => {
            let p = api.check(c.get_policy(pb::GetRequest { name }).await)?;
            if output == Output::Yaml {
                return Ok(Printed::out(p.yaml));
            }
            emit(output, &PolicyView::from(&p), || render::policy(&p))
        }
    }
}

async fn explain(api: &Api, args: ExplainArgs, output: Output) -> Result<Printed> {
    let req = pb::ExplainPolicyRequest {
        from: args.from.clone(),
        to: args.to.clone(),
        protocol: args.port.protocol.to_owned(),
        port: u32::from(args.port.port),
    };
    let r = api.check(api.client().explain_policy(req).await)?;
    emit(output, &ExplainView::from(&r), || render::explanation(&r))
}

async fn site(api: &Api, command: SiteCommand, output: Output, now: u64) -> Result<Printed> {
    let mut c = api.client();
    match command {
        SiteCommand::Add { name } => {
            let s = api.check(c.create_site(pb::CreateSiteRequest { name }).await)?;
            emit(output, &SiteView::from(&s), || {
                format!("site {:?} created\n", s.name)
            })
        }
        SiteCommand::List => {
            let r = api.check(c.list_sites(pb::ListSitesRequest {}).await)?;
            let views: Vec<SiteView> = r.sites.iter().map(SiteView::from).collect();
            emit(output, &views, || render::sites(&r.sites, now))
        }
        SiteCommand::Get { name } => {
            let s = api.check(c.get_site(pb::GetRequest { name }).await)?;
            emit(output, &SiteView::from(&s), || render::site(&s, now))
        }
        SiteCommand::Delete { name } => {
            let r = api.check(
                c.delete_site(pb::DeleteRequest { name: name.clone() })
                    .await,
            )?;
            deleted(output, "site", name, r.revision)
        }
    }
}

async fn token(api: &Api, command: TokenCommand, output: Output, now: u64) -> Result<Printed> {
    let mut c = api.client();
    match command {
        TokenCommand::Create(TokenCreate {
            site,
            ttl,
            labels,
            allow_prefixes,
        }) => {
            let req = pb::CreateJoinTokenRequest {
                site,
                ttl_seconds: ttl.as_secs(),
                labels: labels.into_iter().collect(),
                allow_prefixes,
            };
            let t = api.check(c.create_join_token(req).await)?;
            match output {
                Output::Yaml => Err(no_yaml()),
                Output::Json => Ok(Printed::out(json(&CreatedTokenView::from(&t))?)),
                // Only the token on stdout: `TOKEN=$(weftctl token create ...)`.
                Output::Table => Ok(Printed {
                    stdout: format!("{}\n", t.token),
                    stderr: format!(
                        "join token {} for site {}: single use, expires at {} ({})\n",
                        t.id,
                        t.site,
                        utc(t.expires_unix),
                        match t.expires_unix.checked_sub(now) {
                            Some(secs) if secs > 0 => format!("in {}", format_secs(secs)),
                            _ => "already expired: check this machine's clock".to_string(),
                        },
                    ),
                }),
            }
        }
        TokenCommand::List => {
            let r = api.check(c.list_join_tokens(pb::ListJoinTokensRequest {}).await)?;
            let views: Vec<TokenView> = r.tokens.iter().map(TokenView::from).collect();
            emit(output, &views, || render::tokens(&r.tokens, now))
        }
        TokenCommand::Delete { id } => {
            let r = api.check(
                c.delete_join_token(pb::DeleteRequest { name: id.clone() })
                    .await,
            )?;
            deleted(output, "token", id, r.revision)
        }
    }
}

async fn admin_token(
    api: &Api,
    command: AdminTokenCommand,
    output: Output,
    now: u64,
) -> Result<Printed> {
    let mut c = api.client();
    match command {
        AdminTokenCommand::Create { name, role, ttl } => {
            let req = pb::CreateAdminTokenRequest {
                name,
                role: match role {
                    RoleArg::Admin => "admin",
                    RoleArg::Viewer => "viewer",
                }
                .to_owned(),
                ttl_seconds: ttl.as_secs(),
            };
            let t = api.check(c.create_admin_token(req).await)?;
            match output {
                Output::Yaml => Err(no_yaml()),
                Output::Json => Ok(Printed::out(json(&CreatedAdminTokenView::from(&t))?)),
                // Only the token on stdout: `T=$(weftctl admin token create ...)`.
                Output::Table => Ok(Printed {
                    stdout: format!("{}\n", t.token),
                    stderr: format!(
                        "admin token {:?} (role {}): expires at {}; shown once, the controller keeps only its hash\n",
                        t.name,
                        t.role,
                        utc(t.expires_unix),
                    ),
                }),
            }
        }
        AdminTokenCommand::List => {
            let r = api.check(c.list_admin_tokens(pb::ListAdminTokensRequest {}).await)?;
            let views: Vec<AdminTokenView> = r.tokens.iter().map(AdminTokenView::from).collect();
            emit(output, &views, || render::admin_tokens(&r.tokens, now))
        }
        AdminTokenCommand::Revoke { name } => {
            let r = api.check(
                c.revoke_admin_token(pb::RevokeAdminTokenRequest { name: name.clone() })
                    .await,
            )?;
            let text = format!("admin token {name:?} revoked (revision {})\n", r.revision);
            emit(
                output,
                &serde_json::json!({"name": name, "revoked": true, "revision": r.revision}),
                || text,
            )
        }
    }
}

async fn node(api: &Api, command: NodeCommand, output: Output, now: u64) -> Result<Printed> {
    let mut c = api.client();
    match command {
        NodeCommand::List { site } => {
            let req = pb::ListNodesRequest {
                site: site.unwrap_or_default(),
            };
            let r = api.check(c.list_nodes(req).await)?;
            let views: Vec<NodeView> = r.nodes.iter().map(NodeView::from).collect();
            emit(output, &views, || render::nodes(&r.nodes, r.revision, now))
        }
        NodeCommand::Get { node } => {
            let n = api.check(c.get_node(pb::GetRequest { name: node }).await)?;
            if output == Output::Yaml {
                return Err(no_yaml());
            }
            if output == Output::Json {
                return Ok(Printed::out(json(&NodeView::from(&n))?));
            }
            let (names, revision) = peer_names(api).await;
            Ok(Printed::out(render::node(&n, &names, revision, now)))
        }
        NodeCommand::Delete { node } => {
            let r = api.check(
                c.delete_node(pb::DeleteRequest { name: node.clone() })
                    .await,
            )?;
            deleted(output, "node", node, r.revision)
        }
        NodeCommand::Label { node, changes } => {
            let mut req = pb::SetNodeLabelsRequest {
                node,
                ..Default::default()
            };
            for change in changes {
                match change {
                    LabelChange::Set(k, v) => {
                        req.set.insert(k, v);
                    }
                    LabelChange::Remove(k) => req.remove.push(k),
                }
            }
            let n = api.check(c.set_node_labels(req).await)?;
            emit(output, &NodeView::from(&n), || {
                format!("node {:?} labels: {}\n", n.name, render::labels(&n.labels))
            })
        }
        NodeCommand::Advertise {
            node,
            prefix,
            labels,
        } => {
            let req = pb::AdvertisePrefixRequest {
                node,
                workload: Some(pb::Workload {
                    prefix,
                    labels: labels.into_iter().collect(),
                    reason: String::new(),
                }),
            };
            let n = api.check(c.advertise_prefix(req).await)?;
            emit(output, &NodeView::from(&n), || {
                format!(
                    "node {:?} workloads: {}\n",
                    n.name,
                    render::workloads(&n.workloads)
                )
            })
        }
        NodeCommand::RotateKey { node } => {
            let n = api.check(c.rotate_node_key(pb::RotateNodeKeyRequest { node }).await)?;
            emit(output, &NodeView::from(&n), || {
                format!(
                    "node {:?}: WireGuard key rotation requested; its agent replaces key {} \
                     (see `weftctl node get {}`)\n",
                    n.name,
                    crate::view::key_b64(&n.public_key),
                    n.name
                )
            })
        }
        NodeCommand::Withdraw { node, prefix } => {
            let req = pb::WithdrawPrefixRequest { node, prefix };
            let n = api.check(c.withdraw_prefix(req).await)?;
            emit(output, &NodeView::from(&n), || {
                format!(
                    "node {:?} workloads: {}\n",
                    n.name,
                    render::workloads(&n.workloads)
                )
            })
        }
    }
}

/// Names for public keys (nodes and external peers) and the current
/// revision, to make `node get` readable. Best effort: a failed lookup only
/// costs the names.
async fn peer_names(api: &Api) -> (BTreeMap<Vec<u8>, String>, Option<u64>) {
    let mut c = api.client();
    let mut names = BTreeMap::new();
    let mut revision = None;
    if let Ok(r) = c.list_nodes(pb::ListNodesRequest::default()).await {
        let r = r.into_inner();
        revision = Some(r.revision);
        names.extend(r.nodes.into_iter().map(|n| (n.public_key, n.name)));
    }
    if let Ok(r) = c.list_external_peers(pb::ListExternalPeersRequest {}).await {
        names.extend(
            r.into_inner()
                .peers
                .into_iter()
                .map(|p| (p.public_key, p.name)),
        );
    }
    (names, revision)
}

async fn peer(api: &Api, command: PeerCommand, output: Output, now: u64) -> Result<Printed> {
    let mut c = api.client();
    match command {
        PeerCommand::Add(PeerAdd {
            name,
            site,
            public_key,
            endpoint,
            labels,
        }) => {
            let req = pb::CreateExternalPeerRequest {
                name,
                site,
                public_key: public_key.0.to_vec(),
                endpoint: endpoint.map(|e| e.to_string()).unwrap_or_default(),
                labels: labels.into_iter().collect(),
            };
            let p = api.check(c.create_external_peer(req).await)?;
            let mut printed = emit(output, &ExternalPeerView::from(&p), || {
                format!(
                    "external peer {:?} created in site {}: {}\n",
                    p.name,
                    p.site,
                    p.addresses.join(", ")
                )
            })?;
            if output == Output::Table {
                printed.stderr = format!("its wg-quick config: weftctl peer config {}\n", p.name);
            }
            Ok(printed)
        }
        PeerCommand::List => {
            let r = api.check(c.list_external_peers(pb::ListExternalPeersRequest {}).await)?;
            let views: Vec<ExternalPeerView> = r.peers.iter().map(ExternalPeerView::from).collect();
            emit(output, &views, || render::external_peers(&r.peers, now))
        }
        PeerCommand::Get { name } => {
            let p = api.check(c.get_external_peer(pb::GetRequest { name }).await)?;
            emit(output, &ExternalPeerView::from(&p), || {
                render::external_peer(&p, now)
            })
        }
        PeerCommand::Delete { name } => {
            let r = api.check(
                c.delete_external_peer(pb::DeleteRequest { name: name.clone() })
                    .await,
            )?;
            deleted(output, "external peer", name, r.revision)
        }
        PeerCommand::Config { name } => {
            let p = api.check(
                c.get_external_peer(pb::GetRequest { name: name.clone() })
                    .await,
            )?;
            let cfg = api.check(c.get_external_peer_config(pb::GetRequest { name }).await)?;
            match output {
                Output::Json => Ok(Printed::out(json(&PeerConfigView::new(&p, &cfg))?)),
                Output::Table => Ok(Printed::out(wgquick::render(&p.site, &p.endpoint, &cfg)?)),
                Output::Yaml => Err(no_yaml()),
            }
        }
    }
}

/// JSON of `value` in JSON mode, else the text `table` makes.
fn topology_view(t: &pb::Topology) -> serde_json::Value {
    let tags: BTreeMap<&str, &[String]> = t
        .site_tags
        .iter()
        .map(|(s, tags)| (s.as_str(), tags.tags.as_slice()))
        .collect();
    serde_json::json!({
        "mode": t.mode,
        "gateways": t.gateways,
        "site_tags": tags,
        "residency": t.residency,
        "revision": t.revision,
    })
}

fn emit<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> String,
) -> Result<Printed> {
    match output {
        Output::Json => Ok(Printed::out(json(value)?)),
        Output::Table => Ok(Printed::out(table())),
        Output::Yaml => Err(no_yaml()),
    }
}

fn no_yaml() -> anyhow::Error {
    anyhow::anyhow!(
        "-o yaml is for policies (`get policy`, `get policies`); use -o json or -o table here"
    )
}

fn deleted(output: Output, kind: &'static str, name: String, revision: u64) -> Result<Printed> {
    let text = format!("{kind} {name:?} deleted (revision {revision})\n");
    emit(
        output,
        &DeletedView {
            kind,
            name,
            revision,
        },
        || text,
    )
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    let mut s = serde_json::to_string_pretty(value).context("cannot encode JSON output")?;
    s.push('\n');
    Ok(s)
}
