//! weftctl end to end against an in-process mock AdminService over TLS:
//! the bearer token reaches the server, stdout carries only what scripts
//! need, JSON has the documented fields, and errors print nothing on stdout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::mpsc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use weft_proto::client::CONTROLLER_SERVER_NAME;
use weft_proto::pb;
use weft_proto::pb::admin_service_server::{AdminService, AdminServiceServer};

const TOKEN: &str = "test-admin-token";
const NOW_ISH: u64 = 1_700_000_000;

struct Mock;

fn authorised<T>(req: &Request<T>) -> Result<(), Status> {
    let want = format!("Bearer {TOKEN}");
    match req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        Some(got) if got == want => Ok(()),
        _ => Err(Status::unauthenticated("invalid admin token")),
    }
}

fn node(name: &str, key: u8) -> pb::Node {
    pb::Node {
        id: format!("id-{name}"),
        name: name.into(),
        site: "a".into(),
        public_key: vec![key; 32],
        endpoint: format!("198.19.1.{key}:51820"),
        addresses: vec![format!("100.64.0.{key}/10")],
        created_unix: NOW_ISH,
        connected: true,
        applied_revision: 11,
        last_report_unix: NOW_ISH,
        apply_error: String::new(),
        peers: vec![pb::PeerStatus {
            public_key: vec![if key == 1 { 2 } else { 1 }; 32],
            last_handshake_unix: 0,
            rx_bytes: 10,
            tx_bytes: 20,
            endpoint: String::new(),
            probe: None,
        }],
        labels: Default::default(),
        tunnel_drops: vec![],
        workloads: vec![],
        policy: Some(pb::PolicyStatus {
            verdicts: vec![
                pb::VerdictCounter {
                    verdict: "allowed".into(),
                    packets: 7,
                    bytes: 700,
                },
                pb::VerdictCounter {
                    verdict: "default_denied".into(),
                    packets: 3,
                    bytes: 180,
                },
            ],
            rules: vec![pb::RuleCounter {
                rule: "db/ingress[0]".into(),
                packets: 7,
                bytes: 700,
            }],
            tracked_flows: 2,
        }),
    }
}

fn external_peer() -> pb::ExternalPeer {
    pb::ExternalPeer {
        name: "x1".into(),
        site: "a".into(),
        public_key: vec![9; 32],
        endpoint: "198.19.9.9:51821".into(),
        addresses: vec!["100.64.0.9/10".into()],
        created_unix: NOW_ISH,
        labels: Default::default(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the mock"))
}

#[tonic::async_trait]
impl AdminService for Mock {
    async fn create_site(
        &self,
        r: Request<pb::CreateSiteRequest>,
    ) -> Result<Response<pb::Site>, Status> {
        authorised(&r)?;
        Ok(Response::new(pb::Site {
            name: r.into_inner().name,
            created_unix: NOW_ISH,
            node_count: 0,
        }))
    }
    async fn list_sites(
        &self,
        r: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        authorised(&r)?;
        Ok(Response::new(pb::ListSitesResponse {
            sites: vec![pb::Site {
                name: "a".into(),
                created_unix: NOW_ISH,
                node_count: 2,
            }],
        }))
    }
    async fn get_site(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::Site>, Status> {
        authorised(&r)?;
        unimplemented()
    }
    async fn delete_site(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        authorised(&r)?;
        Ok(Response::new(pb::DeleteResponse { revision: 13 }))
    }
    async fn create_join_token(
        &self,
        r: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        authorised(&r)?;
        let r = r.into_inner();
        let now = unix_now();
        Ok(Response::new(pb::JoinToken {
            id: "t1".into(),
            site: r.site,
            created_unix: now,
            expires_unix: now + r.ttl_seconds,
            used_by_node: String::new(),
            token: "weft1.t1.secret".into(),
        }))
    }
    async fn list_join_tokens(
        &self,
        r: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }
    async fn delete_join_token(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }
    async fn list_nodes(
        &self,
        r: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        authorised(&r)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: vec![node("a1", 1), node("a2", 2)],
            revision: 12,
        }))
    }
    async fn get_node(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::Node>, Status> {
        authorised(&r)?;
        let name = r.into_inner().name;
        match name.as_str() {
            "a1" | "id-a1" => Ok(Response::new(node("a1", 1))),
            _ => Err(Status::not_found(format!("node {name:?} not found"))),
        }
    }
    async fn delete_node(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }
    async fn create_external_peer(
        &self,
        r: Request<pb::CreateExternalPeerRequest>,
    ) -> Result<Response<pb::ExternalPeer>, Status> {
        authorised(&r)?;
        unimplemented()
    }
    async fn list_external_peers(
        &self,
        r: Request<pb::ListExternalPeersRequest>,
    ) -> Result<Response<pb::ListExternalPeersResponse>, Status> {
        authorised(&r)?;
        Ok(Response::new(pb::ListExternalPeersResponse {
            peers: vec![external_peer()],
        }))
    }
    async fn get_external_peer(
        &self,
        r: Request<pb::GetRequest>,
    ) -> Result<Response<pb::ExternalPeer>, Status> {
        authorised(&r)?;
        Ok(Response::new(external_peer()))
    }
    async fn delete_external_peer(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }
    async fn set_node_labels(
        &self,
        r: Request<pb::SetNodeLabelsRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        authorised(&r)?;
        unimplemented()
    }
    async fn advertise_prefix(
        &self,
        r: Request<pb::AdvertisePrefixRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        authorised(&r)?;
        unimplemented()
    }
    async fn withdraw_prefix(
        &self,
        r: Request<pb::WithdrawPrefixRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn trace_route(
        &self,
        r: Request<pb::TraceRouteRequest>,
    ) -> Result<Response<pb::TraceRouteResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn list_routes(
        &self,
        r: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn get_topology(
        &self,
        r: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::Topology>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn set_topology(
        &self,
        r: Request<pb::Topology>,
    ) -> Result<Response<pb::Topology>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn apply_policies(
        &self,
        r: Request<pb::ApplyPoliciesRequest>,
    ) -> Result<Response<pb::ApplyPoliciesResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn list_policies(
        &self,
        r: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn get_policy(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::Policy>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn delete_policy(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn explain_policy(
        &self,
        r: Request<pb::ExplainPolicyRequest>,
    ) -> Result<Response<pb::ExplainPolicyResponse>, Status> {
        authorised(&r)?;
        unimplemented()
    }

    async fn get_external_peer_config(
        &self,
        r: Request<pb::GetRequest>,
    ) -> Result<Response<pb::NodeConfig>, Status> {
        authorised(&r)?;
        Ok(Response::new(pb::NodeConfig {
            revision: 12,
            node_id: "x1".into(),
            node_name: "x1".into(),
            addresses: vec!["100.64.0.9/10".into()],
            mtu: 1420,
            policy: None,
            routes: vec![],
            forwarding: false,
            hosted: vec![],
            peers: vec![pb::PeerConfig {
                name: "a1".into(),
                public_key: vec![1; 32],
                endpoint: "198.19.1.1:51820".into(),
                allowed_ips: vec!["100.64.0.1/32".into()],
                persistent_keepalive: 25,
                accept_sources: vec![],
                fallback: vec![],
                shared_routes: vec![],
            }],
        }))
    }
}

/// A running mock controller and admin configs pointing at it.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn start(tag: &str) -> Fixture {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-signed CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec![CONTROLLER_SERVER_NAME.to_string()])
            .expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("server cert");
        let identity = Identity::from_pem(cert.pem(), key.serialize_pem());

        let (tx, rx) = mpsc::channel::<SocketAddr>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                tx.send(listener.local_addr().expect("local addr"))
                    .expect("send addr");
                Server::builder()
                    .tls_config(ServerTlsConfig::new().identity(identity))
                    .expect("server TLS")
                    .add_service(AdminServiceServer::new(Mock))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .expect("mock server runs");
            });
        });
        let addr = rx.recv().expect("mock server address");

        let dir = std::env::temp_dir().join(format!("weftctl-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (file, token) in [("admin.conf", TOKEN), ("wrong.conf", "wrong-token")] {
            let conf = serde_json::json!({"url": format!("https://{addr}"), "ca_pem": ca_cert.pem(), "token": token});
            std::fs::write(dir.join(file), conf.to_string()).expect("write admin config");
        }
        Fixture { dir }
    }

    fn run(&self, conf: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_weftctl"))
            .arg("--config")
            .arg(self.dir.join(conf))
            .args(args)
            .env_remove("WEFT_OUTPUT")
            .output()
            .expect("weftctl runs")
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run("admin.conf", args);
        let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
        let stderr = String::from_utf8(out.stderr).expect("utf-8 stderr");
        assert!(out.status.success(), "weftctl {args:?} failed: {stderr}");
        (stdout, stderr)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn token_create_prints_only_the_token_on_stdout() {
    let f = Fixture::start("token");
    let (stdout, stderr) = f.ok(&["token", "create", "--site", "a", "--ttl", "2d"]);
    assert_eq!(stdout, "weft1.t1.secret\n");
    assert!(
        stderr.contains("single use") && stderr.contains("in 2d"),
        "stderr hint: {stderr}"
    );

    let (stdout, _) = f.ok(&[
        "-o", "json", "token", "create", "--site", "a", "--ttl", "30s",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("token JSON");
    let expires = v["expires_unix"]
        .as_u64()
        .expect("expires_unix is a number");
    assert!(
        expires.abs_diff(unix_now() + 30) <= 5,
        "ttl 30s must reach the server, expires {expires}"
    );
    assert_eq!(
        v,
        serde_json::json!({"id": "t1", "site": "a", "expires_unix": expires, "token": "weft1.t1.secret"})
    );
}

#[test]
fn node_list_json_and_get_table() {
    let f = Fixture::start("node");
    let (stdout, _) = f.ok(&["node", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("node list JSON");
    let nodes = v.as_array().expect("node list is an array");
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["name"], "a1");
    assert_eq!(
        nodes[0]["public_key"],
        "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
    );
    assert_eq!(nodes[0]["applied_revision"], 11);
    assert_eq!(nodes[0]["peers"][0]["rx_bytes"], 10);
    assert_eq!(
        nodes[0]["policy"]["verdicts"]["default_denied"]["packets"],
        3
    );
    assert_eq!(nodes[0]["policy"]["rules"][0]["rule"], "db/ingress[0]");
    assert_eq!(nodes[0]["policy"]["tracked_flows"], 2);

    let (stdout, _) = f.ok(&["node", "list"]);
    assert!(
        stdout.starts_with("NAME ") && stdout.contains("11/12"),
        "node table:\n{stdout}"
    );

    let (stdout, _) = f.ok(&["node", "get", "id-a1"]);
    assert!(
        stdout.contains("11 applied, 12 current"),
        "node get:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("a2 ") && l.contains("never")),
        "peer a2:\n{stdout}"
    );
    assert!(stdout.contains("2 tracked flows"), "policy:\n{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("default_denied ") && l.contains(" 3 ")),
        "verdict counters:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("db/ingress[0] ") && l.contains(" 7 ")),
        "rule counters:\n{stdout}"
    );
}

#[test]
fn peer_config_is_wg_quick() {
    let f = Fixture::start("peer");
    let (stdout, _) = f.ok(&["peer", "config", "x1"]);
    assert!(
        stdout.starts_with("# Weft external peer \"x1\" (site a), revision 12\n[Interface]\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\nListenPort = 51821\n")
            && stdout.contains("\nPersistentKeepalive = 25\n"),
        "{stdout}"
    );
}

#[test]
fn errors_print_one_line_on_stderr_and_nothing_on_stdout() {
    let f = Fixture::start("errors");
    let out = f.run("admin.conf", &["node", "get", "zz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "stdout must be empty on error");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: node \"zz\" not found\n"
    );

    let out = f.run("wrong.conf", &["site", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "stdout must be empty on error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid admin token") && stderr.contains("check the token in"),
        "{stderr}"
    );
    assert!(
        stderr.contains("wrong.conf"),
        "the hint must name the config file: {stderr}"
    );
}
