//! `admin.conf`: how an operator's tools reach the controller (URL, CA,
//! admin token). Written by the controller on first start, mode 0600.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// File name of the admin config inside the controller's data dir.
pub const ADMIN_CONF: &str = "admin.conf";

/// Contents of `admin.conf` (JSON).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminConfig {
    /// Controller URL, `https://HOST:PORT`.
    pub url: String,
    /// The controller's CA certificate, PEM.
    pub ca_pem: String,
    /// Bearer token for the AdminService.
    pub token: String,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Why an admin config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AdminConfigError {
    #[error("cannot read admin config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin config {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
}

impl AdminConfig {
    /// Reads and checks an admin config file.
    pub fn load(path: &Path) -> Result<Self, AdminConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AdminConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&p, &text)
    }

    /// Checks the text of an admin config; `origin` (a path) names it in
    /// errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self, AdminConfigError> {
        let invalid = |reason: String| AdminConfigError::Invalid {
            path: origin.to_owned(),
            reason,
        };
        let cfg: AdminConfig = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if !cfg.url.starts_with("https://") {
            return Err(invalid(format!(
                "url {:?} must start with https://",
                cfg.url
            )));
        }
        if !cfg.ca_pem.contains("BEGIN CERTIFICATE") {
            return Err(invalid("ca_pem holds no PEM certificate".into()));
        }
        if cfg.token.is_empty() {
            return Err(invalid("token is empty".into()));
        }
        Ok(cfg)
    }

    /// Serialises the config as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Metadata key and prefix for the admin bearer token.
pub const AUTHORIZATION: &str = "authorization";
