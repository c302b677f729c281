//! Node credentials have a lifecycle:
//!
//! - (e) a used join token replayed with a node's public name and
//!   WireGuard key (and a request key of the replayer's own) gets no
//!   certificate and changes nothing;
//! - (f) under a ping every 50 ms from a1 to b1, a certificate renewal
//!   (60 s lifetime, renewed when a third of the validity, which starts a
//!   minute before issue, is left) and `weftctl node rotate-key a1`
//!   lose at most one packet; the new key shows in `weftctl node list`,
//!   a1's `wg show` and b1's; a1's old certificate is refused once its
//!   agent uses the new one.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use weft_proto::JoinToken;
use weft_proto::admin_config::AdminConfig;
use weft_proto::client::connect;
use weft_proto::pb::{self, agent_service_client::AgentServiceClient};
use weft_tests::{Lab, PingResult, netns};

/// Node certificate lifetime of the lab's controller.
const CERT_TTL: &str = "60s";
/// Pings at 50 ms for 90 s: long enough for the next renewal (at most
/// 40 s away) and a key rotation after it, on a busy machine.
const PINGS: u32 = 1800;

/// What the test reads of an agent's `identity.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
struct Identity {
    cert_pem: String,
    key_pem: String,
}

fn identity(lab: &Lab, node: &str) -> Identity {
    let path = lab.node(node).state_dir.join("identity.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Runs one exchange with the controller's agent API from the
/// controller's namespace, as an agent would.
fn as_agent<T: Send>(
    lab: &Lab,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    call: impl AsyncFnOnce(AgentServiceClient<tonic::transport::Channel>) -> Result<T, tonic::Status>
    + Send,
) -> Result<T, tonic::Status> {
    let url = lab.controller_url();
    netns::in_netns(&lab.ns("ctl"), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(async {
            // A TLS handshake refused is a transport error, not the
            // controller's answer: report it as `unavailable`.
            let channel = connect(&url, ca_pem, identity)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
            call(AgentServiceClient::new(channel)).await
        }))
    })
    .unwrap_or_else(|e| panic!("running a gRPC client in the controller's namespace: {e:#}"))
}

/// `(name, id, public key, addresses)` of every node, from weftctl.
fn node_summary(lab: &Lab) -> Vec<(String, String, String, Vec<String>)> {
    lab.nodes()
        .into_iter()
        .map(|n| (n.name, n.id.to_string(), n.public_key, n.addresses))
        .collect()
}

/// `weftctl -o json node get NODE` as JSON.
fn node_json(lab: &Lab, node: &str) -> serde_json::Value {
    let out = lab.weftctl_ok(&["-o", "json", "node", "get", node]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("node get JSON ({e}): {out}"))
}

#[test]
fn credentials() {
    if weft_tests::skip_unless_root("credentials") {
        return;
    }
    let mut lab = Lab::builder()
        .sites(&["a", "b"])
        .nodes_per_site(1)
        .controller_args(&["--cert-ttl", CERT_TTL])
        .build();
    let ca_pem = AdminConfig::load(&lab.admin_conf())
        .expect("admin.conf")
        .ca_pem;

    // ----- (e) a replayed join token -----
    let before = node_summary(&lab);
    let a1_key = lab.node_info("a1").public_key;
    let token: JoinToken = lab
        .node("a1")
        .token
        .clone()
        .expect("a1 enrolled with a token")
        .parse()
        .expect("a lab token parses");
    let key = rcgen::KeyPair::generate().expect("a fresh TLS key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .expect("a CSR");
    let replay = pb::RegisterRequest {
        join_token: token.credential(),
        name: "a1".into(),
        public_key: base64::engine::general_purpose::STANDARD
            .decode(&a1_key)
            .expect("base64 key"),
        endpoint: "198.19.1.99:51820".into(),
        listen_port: 51820,
        csr_der: csr.der().to_vec(),
        labels: Default::default(),
    };
    // Within the 10 minutes in which a genuine retry would get a1 back.
    let answer = as_agent(&lab, &ca_pem, None, async move |mut c| {
        c.register(replay).await.map(tonic::Response::into_inner)
    });
    match answer {
        Ok(r) => panic!(
            "a replayed token with a1's public name and key got a certificate for node {}",
            r.node_id
        ),
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
            assert!(s.message().contains("already used"), "{s:?}");
        }
    }
    assert_eq!(node_summary(&lab), before, "the replay changed the nodes");

    // ----- (f) renewal and key rotation under a ping -----
    let (b1_v4, _) = lab.node_addresses("b1");
    let old = identity(&lab, "a1");
    let ping_args: Vec<String> = [
        "-n",
        "-i",
        "0.05",
        "-W",
        "1",
        "-c",
        &PINGS.to_string(),
        &b1_v4.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    lab.spawn("ping", "a1", Path::new("ping"), &ping_args)
        .expect("ping starts");

    // Renewal: when a third of the validity is left, within 40 s.
    lab.wait_until(
        Duration::from_secs(60),
        "a1 renews its certificate (identity.json changes)",
        || identity(&lab, "a1").cert_pem != old.cert_pem,
    );
    let expires = node_json(&lab, "a1")["cert_expires_unix"]
        .as_u64()
        .expect("cert_expires_unix in node get");
    assert!(expires > 0, "node get shows the certificate's expiry");
    // The agent reconnects with the new certificate at once; its first use
    // ends the old one's acceptance, long before the old one expires.
    let refused = |lab: &Lab| {
        as_agent(
            lab,
            &ca_pem,
            Some((&old.cert_pem, &old.key_pem)),
            async |mut c| {
                c.report(pb::ReportRequest::default())
                    .await
                    .map(tonic::Response::into_inner)
            },
        )
    };
    lab.wait_until(
        Duration::from_secs(10),
        "the controller refuses a1's old certificate",
        || {
            matches!(refused(&lab), Err(s) if s.code() == tonic::Code::Unauthenticated
                && s.message().contains("no longer"))
        },
    );
    assert!(lab.proc_alive("ping"), "the ping ended before the rotation");

    // Rotation.
    lab.weftctl_ok(&["node", "rotate-key", "a1"]);
    let mut new_key = String::new();
    lab.wait_until(
        Duration::from_secs(30),
        "a1's new key in weftctl, in a1's `wg show` and in b1's, the old one gone",
        || {
            let k = lab.node_info("a1").public_key;
            let b1_peers = lab.wg_peers("b1");
            new_key.clone_from(&k);
            k != a1_key
                && lab.wg_show("a1", "public-key").trim() == k
                && b1_peers.contains(&k)
                && !b1_peers.contains(&a1_key)
        },
    );
    eprintln!("a1 rotated its key: {a1_key} -> {new_key}");
    assert!(
        lab.proc_alive("ping"),
        "the ping ended before the rotation was done"
    );
    // The new session carries traffic (one ping through it), then the
    // ping runs to its end.
    let status = lab
        .wait_proc("ping", Duration::from_secs(u64::from(PINGS) / 20 + 30))
        .expect("the ping finishes");
    let stdout = std::fs::read_to_string(&lab.proc("ping").expect("ping record").stdout)
        .expect("ping output");
    let result = PingResult::parse(&stdout);
    eprintln!(
        "ping a1 -> b1 across a renewal and a key rotation: {} sent, {} received ({status})",
        result.transmitted, result.received
    );
    assert_eq!(result.transmitted, PINGS, "ping output:\n{stdout}");
    assert!(
        result.transmitted - result.received <= 1,
        "lost {} of {} pings across a renewal and a key rotation (at most 1 allowed)",
        result.transmitted - result.received,
        result.transmitted
    );
    let after = lab.ping("a1", b1_v4.into(), 3);
    assert_eq!(
        after.received, 3,
        "a1 reaches b1 with its new key: {after:?}"
    );
}
