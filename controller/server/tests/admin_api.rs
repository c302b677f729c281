//! The real controller on 127.0.0.1: admin tokens and roles, the audit log
//! across a kill -9, the separate admin listener, one Watch stream per
//! node and the Report rate limit.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tonic::Code;
use weft_proto::pb;
use weft_proto::pb::agent_service_client::AgentServiceClient;

/// A policy file that selects nothing in particular (valid YAML).
const POLICY: &str = "\
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  target: {matchLabels: {role: web}}
  ingress:
    - from: {matchLabels: {role: lb}}
      ports: [{protocol: TCP, port: 443}]
";

fn apply(dry_run: bool) -> pb::ApplyPoliciesRequest {
    pb::ApplyPoliciesRequest {
        files: vec![pb::PolicyFile {
            name: "web.yaml".into(),
            text: POLICY.into(),
        }],
        dry_run,
    }
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_expiry_and_revocation_of_admin_tokens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = common::start(dir.path(), false).await.expect("controller");
    let cfg = &c.config;
    let mut root = common::admin(cfg, &cfg.url, &cfg.token)
        .await
        .expect("client");

    let tokens = root
        .list_admin_tokens(pb::ListAdminTokensRequest {})
        .await
        .expect("bootstrap lists")
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        (tokens[0].name.as_str(), tokens[0].role.as_str()),
        ("bootstrap", "admin")
    );
    assert_eq!(tokens[0].expires_unix, 0);
    assert!(tokens[0].token.is_empty(), "never the secret");

    let viewer = root
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "ci".into(),
            role: "viewer".into(),
            ttl_seconds: 3600,
        })
        .await
        .expect("created")
        .into_inner();
    assert!(viewer.token.starts_with("weft-admin-"), "{}", viewer.token);
    let mut ci = common::admin(cfg, &cfg.url, &viewer.token)
        .await
        .expect("client");
    ci.list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("a viewer reads");
    ci.apply_policies(apply(true))
        .await
        .expect("a viewer dry-runs");
    for (what, err) in [
        (
            "CreateSite",
            ci.create_site(pb::CreateSiteRequest { name: "x".into() })
                .await
                .expect_err("a viewer cannot write"),
        ),
        (
            "ApplyPolicies",
            ci.apply_policies(apply(false))
                .await
                .expect_err("a viewer cannot apply"),
        ),
        (
            "CreateAdminToken",
            ci.create_admin_token(pb::CreateAdminTokenRequest {
                name: "mine".into(),
                role: "admin".into(),
                ttl_seconds: 0,
            })
            .await
            .expect_err("a viewer cannot promote itself"),
        ),
    ] {
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err}");
        assert!(
            err.message().contains("role viewer") && err.message().contains("\"ci\""),
            "{what}: {}",
            err.message()
        );
    }
    let sites = root
        .list_sites(pb::ListSitesRequest {})
        .await
        .expect("lists")
        .into_inner()
        .sites;
    assert!(sites.is_empty(), "nothing was created: {sites:?}");

    let mut wrong = common::admin(cfg, &cfg.url, "weft-admin-not-a-token")
        .await
        .expect("client");
    let err = wrong
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect_err("unknown token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // The only admin token cannot be revoked; a viewer can.
    let err = root
        .revoke_admin_token(pb::RevokeAdminTokenRequest {
            name: "bootstrap".into(),
        })
        .await
        .expect_err("last admin");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    root.revoke_admin_token(pb::RevokeAdminTokenRequest { name: "ci".into() })
        .await
        .expect("revoked");
    let err = ci
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect_err("revoked at once");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(
        err.message().contains("\"ci\" was revoked"),
        "{}",
        err.message()
    );

    // Expiry.
    let short = root
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "short".into(),
            role: "admin".into(),
            ttl_seconds: 1,
        })
        .await
        .expect("created")
        .into_inner();
    let short = common::admin(cfg, &cfg.url, &short.token)
        .await
        .expect("client");
    wait_until("the 1 s token to expire", 10, || {
        let mut short = short.clone();
        async move {
            match short.list_sites(pb::ListSitesRequest {}).await {
                Ok(_) => false,
                Err(e) => {
                    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
                    assert!(e.message().contains("\"short\" expired"), "{}", e.message());
                    true
                }
            }
        }
    })
    .await;
    drop(short);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_are_audited_and_the_log_survives_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = common::start(dir.path(), false).await.expect("controller");
    let cfg = c.config.clone();
    let mut root = common::admin(&cfg, &cfg.url, &cfg.token)
        .await
        .expect("client");
    root.create_site(pb::CreateSiteRequest { name: "a".into() })
        .await
        .expect("site");
    let token = common::join_token(&mut root, "a").await.expect("token");
    let node = common::enrol(&cfg.url, &cfg.ca_pem, &token, "a1")
        .await
        .expect("enrolled");
    let labelled = root
        .set_node_labels(pb::SetNodeLabelsRequest {
            node: "a1".into(),
            set: HashMap::from([("role".into(), "web".into())]),
            remove: vec![],
        })
        .await
        .expect("labelled")
        .into_inner();
    let err = root
        .create_site(pb::CreateSiteRequest {
            name: "Bad\u{1b}[2J".into(),
        })
        .await
        .expect_err("a bad name");
    assert_eq!(err.code(), Code::InvalidArgument);

    let records = root
        .list_audit_records(pb::ListAuditRecordsRequest::default())
        .await
        .expect("audit")
        .into_inner()
        .records;
    let lines: Vec<String> = records
        .iter()
        .map(|r| format!("{} {} {} {}", r.credential, r.rpc, r.summary, r.outcome))
        .collect();
    assert!(
        lines.contains(&"bootstrap SetNodeLabels node=a1 set role=web remove  ok".to_owned()),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("bootstrap CreateSite site=Bad\\x1b[2J refused: ")),
        "refused attempts are recorded, escaped: {lines:#?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("RegisterNode") || l.contains("Register ")),
        "agents' changes are not admin changes: {lines:#?}"
    );
    let set = records
        .iter()
        .find(|r| r.rpc == "SetNodeLabels")
        .expect("the labels record");
    assert!(set.revision > 0);
    let node_revision = root
        .get_node(pb::GetRequest {
            name: node.id.clone(),
        })
        .await
        .expect("node")
        .into_inner();
    assert_eq!(node_revision.labels, labelled.labels);

    // kill -9, restart: the log is intact and a viewer may read it.
    drop(c);
    let c = common::start(dir.path(), false).await.expect("restarted");
    let cfg = c.config.clone();
    let mut root = common::admin(&cfg, &cfg.url, &cfg.token)
        .await
        .expect("client");
    let viewer = root
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "auditor".into(),
            role: "viewer".into(),
            ttl_seconds: 600,
        })
        .await
        .expect("created")
        .into_inner();
    let mut auditor = common::admin(&cfg, &cfg.url, &viewer.token)
        .await
        .expect("client");
    let after = auditor
        .list_audit_records(pb::ListAuditRecordsRequest::default())
        .await
        .expect("a viewer reads the audit log")
        .into_inner()
        .records;
    assert_eq!(after[..records.len()], records[..], "kept across kill -9");
    let last = after.last().expect("the new token's record");
    assert_eq!(
        (
            last.credential.as_str(),
            last.rpc.as_str(),
            last.summary.as_str()
        ),
        (
            "bootstrap",
            "CreateAdminToken",
            "token=auditor role=viewer ttl=600s"
        )
    );
    let since = auditor
        .list_audit_records(pb::ListAuditRecordsRequest {
            since_unix: last.unix,
        })
        .await
        .expect("since")
        .into_inner()
        .records;
    assert!(since.iter().all(|r| r.unix >= last.unix) && !since.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_admin_listener_serves_admins_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = common::start(dir.path(), true).await.expect("controller");
    let cfg = &c.config;
    let admin_url = format!("https://{}", c.admin_listen.expect("admin listener"));
    assert_eq!(
        cfg.url, admin_url,
        "admin.conf points at the admin listener"
    );
    let mut admin = common::admin(cfg, &admin_url, &cfg.token)
        .await
        .expect("client");
    admin
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("served on the admin listener");
    let agents_url = format!("https://{}", c.listen);
    let mut on_agents = common::admin(cfg, &agents_url, &cfg.token)
        .await
        .expect("client");
    let err = on_agents
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect_err("no admin RPC on the agents' listener");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_watch_stream_per_node_and_reports_are_rate_limited() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = common::start(dir.path(), false).await.expect("controller");
    let cfg = c.config.clone();
    let mut root = common::admin(&cfg, &cfg.url, &cfg.token)
        .await
        .expect("client");
    root.create_site(pb::CreateSiteRequest { name: "a".into() })
        .await
        .expect("site");
    let token = common::join_token(&mut root, "a").await.expect("token");
    let node = common::enrol(&cfg.url, &cfg.ca_pem, &token, "a1")
        .await
        .expect("enrolled");
    let mut agent = AgentServiceClient::new(node.channel.clone());
    let watch = || pb::WatchRequest {
        listen_port: 51820,
        ..Default::default()
    };
    let mut first = agent.watch(watch()).await.expect("watch").into_inner();
    first
        .message()
        .await
        .expect("config")
        .expect("the first stream gets the config");
    let mut second = agent.watch(watch()).await.expect("watch").into_inner();
    second
        .message()
        .await
        .expect("config")
        .expect("the second stream gets the config");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        // The first stream may still deliver a config pushed meanwhile.
        while let Ok(Some(_)) = first.message().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the older stream must end when a newer one opens"
    );

    // Reports: a burst of 10, then 1 per second.
    let start = Instant::now();
    let (mut accepted, mut refused) = (0u64, 0u64);
    for _ in 0..40 {
        match agent.report(pb::ReportRequest::default()).await {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(e.message().contains("too many reports"), "{}", e.message());
                refused += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs();
    assert!(
        accepted >= 10 && accepted <= 11 + secs,
        "accepted {accepted} in {secs} s (burst 10, 1/s)"
    );
    assert_eq!(accepted + refused, 40);
}
