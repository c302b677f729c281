//! The connection to the controller's AdminService: TLS channel, bearer
//! token on every call, and gRPC errors turned into one-line messages.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use weft_proto::admin_config::{AUTHORIZATION, AdminConfig};
use weft_proto::pb::admin_service_client::AdminServiceClient;

/// The generated client with the bearer token attached to every request.
pub(crate) type Client = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;

/// A connected AdminService client plus what error messages need to say.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    client: Client,
    url: String,
    config_path: PathBuf,
}

impl Api {
    /// Connects to the controller named in `cfg` (read from `config_path`).
    pub(crate) async fn connect(cfg: &AdminConfig, config_path: &Path) -> Result<Self> {
        let auth = BearerAuth::new(&cfg.token).map_err(|reason| {
            anyhow!(
                "admin config {} is not valid: {reason}",
                config_path.display()
            )
        })?;
        let channel = weft_proto::client::connect(&cfg.url, &cfg.ca_pem, None)
            .await
            .map_err(|e| {
                anyhow!(
                    "{} (is the controller running at {}?)",
                    error_chain(&e),
                    cfg.url
                )
            })?;
        Ok(Api {
            client: AdminServiceClient::with_interceptor(channel, auth),
            url: cfg.url.clone(),
            config_path: config_path.to_path_buf(),
        })
    }

    /// A handle for one call (cheap: clones share the channel).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// Unwraps a response, or turns the status into a one-line error.
    pub(crate) fn check<T>(&self, result: Result<Response<T>, Status>) -> Result<T> {
        result.map(Response::into_inner).map_err(|s| {
            anyhow!(describe_status(
                s.code(),
                s.message(),
                &self.url,
                &self.config_path
            ))
        })
    }
}

/// Adds `authorization: Bearer <token>` to each request.
#[derive(Clone)]
pub(crate) struct BearerAuth(MetadataValue<Ascii>);

impl BearerAuth {
    fn new(token: &str) -> Result<Self, String> {
        let mut value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| "token holds characters not allowed in a gRPC header".to_string())?;
        value.set_sensitive(true);
        Ok(BearerAuth(value))
    }
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(..)")
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(AUTHORIZATION, self.0.clone());
        Ok(request)
    }
}

/// One line for a failed call: the server's message, and for the codes an
/// operator can fix locally, the code and a hint.
pub(crate) fn describe_status(code: Code, message: &str, url: &str, config_path: &Path) -> String {
    let message = if message.trim().is_empty() {
        code.description().to_string()
    } else {
        one_line(message)
    };
    match code {
        Code::Unavailable => {
            format!("{message} (unavailable: is the controller running at {url}?)")
        }
        Code::Unauthenticated => {
            format!(
                "{message} (unauthenticated: check the token in {})",
                config_path.display()
            )
        }
        Code::PermissionDenied => {
            format!(
                "{message} (permission denied: the token in {} lacks the role for this)",
                config_path.display()
            )
        }
        Code::DeadlineExceeded => {
            format!("{message} (deadline exceeded: the controller at {url} is slow)")
        }
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => message,
    }
}

/// An error and its sources joined by `: `, skipping a source whose text
/// the previous one already shows (hyper and tonic repeat themselves).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = one_line(&err.to_string());
        if !parts.last().is_some_and(|prev| prev.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Collapses line breaks so an error stays on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://198.18.0.1:7443";

    #[test]
    fn plain_errors_are_the_server_message() {
        let got = describe_status(
            Code::NotFound,
            "site \"x\" not found",
            URL,
            Path::new("admin.conf"),
        );
        assert_eq!(got, "site \"x\" not found");
    }

    #[test]
    fn unavailable_and_unauthenticated_carry_code_and_hint() {
        let got = describe_status(
            Code::Unavailable,
            "connection refused",
            URL,
            Path::new("admin.conf"),
        );
        assert_eq!(
            got,
            "connection refused (unavailable: is the controller running at https://198.18.0.1:7443?)"
        );
        let got = describe_status(
            Code::Unauthenticated,
            "bad token",
            URL,
            Path::new("/etc/admin.conf"),
        );
        assert_eq!(
            got,
            "bad token (unauthenticated: check the token in /etc/admin.conf)"
        );
    }

    #[test]
    fn empty_or_multi_line_messages_become_one_line() {
        let got = describe_status(Code::Internal, "", URL, Path::new("a"));
        assert_eq!(got, Code::Internal.description());
        let got = describe_status(Code::Internal, "line one\nline two", URL, Path::new("a"));
        assert_eq!(got, "line one line two");
    }

    #[test]
    fn error_chain_skips_repeated_sources() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1
                    .as_deref()
                    .map(|e| e as &(dyn std::error::Error + 'static))
            }
        }
        let inner = E("refused", None);
        let e = E(
            "connect",
            Some(Box::new(E("connect", Some(Box::new(inner))))),
        );
        assert_eq!(error_chain(&e), "connect: refused");
    }

    #[test]
    fn bearer_auth_sets_the_header_and_hides_the_token() {
        let mut auth = BearerAuth::new("s3cret").expect("ascii token is valid");
        let req = auth
            .call(Request::new(()))
            .expect("interceptor never fails");
        assert_eq!(
            req.metadata()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret")
        );
        assert!(
            !format!("{auth:?}").contains("s3cret"),
            "Debug must not show the token"
        );
        assert!(
            BearerAuth::new("bad\ntoken").is_err(),
            "a newline cannot go into a header"
        );
    }
}
