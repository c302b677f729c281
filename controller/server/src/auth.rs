//! The admin gate: every AdminService call must carry a usable admin token
//! (`authorization: Bearer <token>`), and a viewer token may call only the
//! read-only RPCs. The caller (token name, role, RPC) is then known to the
//! call for the audit log.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest as _, Sha256};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use weft_controller_core::admin::{Role, is_read_only};

use crate::audit::{CALLER, Caller, current_caller};
use crate::controller::{Controller, now_unix};

/// Wraps the AdminService: authenticates, authorises by role, and runs the
/// call with its [`Caller`] set.
#[derive(Debug, Clone)]
pub(crate) struct AdminGate<S> {
    inner: S,
    controller: Arc<Controller>,
}

impl<S> AdminGate<S> {
    pub(crate) fn new(inner: S, controller: Arc<Controller>) -> Self {
        AdminGate { inner, controller }
    }
}

/// The caller of `method` with this `authorization` header, or why not.
pub(crate) fn check(
    controller: &Controller,
    authorization: Option<&str>,
    method: &str,
) -> Result<Caller, Status> {
    let given = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("missing admin token (authorization: Bearer ...)")
        })?;
    // Compare hashes, so timing says nothing about the secret.
    let hash: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    let now = now_unix();
    let (credential, role) = controller
        .read(|s, _| {
            s.authenticate_admin(&hash, now)
                .map(|t| (t.name.clone(), t.role))
        })
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    // ApplyPolicies: a viewer may dry-run (checked by the call itself).
    if role == Role::Viewer && !is_read_only(method) && method != "ApplyPolicies" {
        return Err(Status::permission_denied(format!(
            "admin token {credential:?} has the role {role}, which may only read; {method} \
             needs the role admin"
        )));
    }
    Ok(Caller {
        credential,
        role,
        rpc: method.to_owned(),
    })
}

/// Refuses the current call unless its caller has the admin role; `what`
/// names the action in the message.
pub(crate) fn require_admin(what: &str) -> Result<(), Status> {
    match current_caller() {
        Some(c) if c.role == Role::Viewer => Err(Status::permission_denied(format!(
            "admin token {:?} has the role viewer, which may only read; {what} needs the role admin",
            c.credential
        ))),
        Some(_) => Ok(()),
        None => Err(Status::unauthenticated("not an authenticated admin call")),
    }
}

impl<S> Service<Request<Body>> for AdminGate<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        let authorization = req
            .headers()
            .get(weft_proto::admin_config::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match check(&self.controller, authorization, method) {
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
            Ok(caller) => {
                // The clone that was made ready is the one to call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(CALLER.scope(caller, async move { inner.call(req).await }))
            }
        }
    }
}

impl<S: NamedService> NamedService for AdminGate<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use weft_controller_core::{NetworkSettings, State};

    use super::*;
    use crate::store::FileStore;

    fn sha(s: &str) -> [u8; 32] {
        Sha256::digest(s.as_bytes()).into()
    }

    fn controller(dir: &std::path::Path) -> Controller {
        let settings =
            NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"));
        let mut s = State::new(settings).expect("valid settings");
        let now = now_unix();
        s.ensure_bootstrap_token(sha("root-secret"), now);
        s.create_admin_token("ci", Role::Viewer, sha("ci-secret"), now, 3600)
            .expect("viewer");
        s.create_admin_token("gone", Role::Admin, sha("gone-secret"), now, 3600)
            .expect("admin");
        s.revoke_admin_token("gone", now).expect("revoked");
        Controller::new(s, Box::new(FileStore::new(dir)))
    }

    #[test]
    fn tokens_are_checked_and_viewers_only_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = controller(dir.path());
        let caller = check(&c, Some("Bearer root-secret"), "SetNodeLabels").expect("admin");
        assert_eq!(
            (caller.credential.as_str(), caller.role, caller.rpc.as_str()),
            ("bootstrap", Role::Admin, "SetNodeLabels")
        );
        for read in [
            "ListNodes",
            "GetNode",
            "ExplainPolicy",
            "ListAuditRecords",
            "ApplyPolicies",
        ] {
            check(&c, Some("Bearer ci-secret"), read).expect("a viewer may call it");
        }
        let denied = check(&c, Some("Bearer ci-secret"), "DeleteNode").expect_err("viewer");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("\"ci\" has the role viewer")
                && denied.message().contains("DeleteNode needs the role admin"),
            "{}",
            denied.message()
        );
        for (auth, why) in [
            (None, "missing admin token"),
            (Some("root-secret"), "missing admin token"),
            (Some("Bearer nope"), "not valid for this controller"),
            (Some("Bearer gone-secret"), "\"gone\" was revoked"),
        ] {
            let e = check(&c, auth, "ListNodes").expect_err(why);
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{why}");
            assert!(e.message().contains(why), "{}", e.message());
        }
    }

    #[tokio::test]
    async fn apply_without_dry_run_needs_an_admin() {
        let viewer = Caller {
            credential: "ci".into(),
            role: Role::Viewer,
            rpc: "ApplyPolicies".into(),
        };
        let e = CALLER
            .scope(viewer, async {
                require_admin("ApplyPolicies without dry_run")
            })
            .await
            .expect_err("viewer");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let admin = Caller {
            credential: "ops".into(),
            role: Role::Admin,
            rpc: "ApplyPolicies".into(),
        };
        CALLER
            .scope(admin, async { require_admin("apply") })
            .await
            .expect("admin");
        assert!(require_admin("apply").is_err(), "no caller: refused");
    }
}
