//! The agent's state dir: its WireGuard private key, its identity with the
//! controller, the last config it applied (for headless restarts), and a
//! WireGuard key being rotated in. Files are written atomically (temp,
//! fsync, rename); a file that exists but cannot be read is an error, never
//! a reason to start afresh.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use weft_dataplane_core::{Key, NodeConfig};

pub(crate) const PRIVATE_KEY: &str = "private.key";
pub(crate) const IDENTITY: &str = "identity.json";
pub(crate) const CONFIG: &str = "config.json";
pub(crate) const PENDING_KEY: &str = "pending-key.json";

/// What enrolment gave the node: who it is and how to reach the controller.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Identity {
    pub(crate) node_id: String,
    pub(crate) name: String,
    pub(crate) controller_url: String,
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    /// Generation of the WireGuard key in `private.key` (0 until the
    /// first rotation; absent in identities written before rotation).
    #[serde(default)]
    pub(crate) key_generation: u64,
}

/// A WireGuard key being rotated in: generated, not yet known to be
/// accepted by the controller and in use. Kept until it is, so that a
/// crash at any step resumes the same rotation rather than losing the key
/// the controller may already hand to every peer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PendingKey {
    pub(crate) private_key: Key,
    /// The key generation it is for.
    pub(crate) generation: u64,
}

impl std::fmt::Debug for PendingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingKey")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The public key of a WireGuard private key.
pub(crate) fn public_key(private: &Key) -> Key {
    let secret = x25519_dalek::StaticSecret::from(private.0);
    Key(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

/// A new random WireGuard private key (clamped by x25519).
pub(crate) fn new_private_key() -> Key {
    let bytes: [u8; 32] = rand::random();
    Key(x25519_dalek::StaticSecret::from(bytes).to_bytes())
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("name", &self.name)
            .field("controller_url", &self.controller_url)
            .finish_non_exhaustive()
    }
}

/// The last applied config as stored (a damaged file fails to parse).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedConfig {
    config: NodeConfig,
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating with mode 0700) the state dir.
    pub(crate) fn open(dir: &Path) -> Result<StateDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The node's WireGuard private key, generated on first use. It never
    /// leaves this file (mode 0600) and the tunnel.
    pub(crate) fn load_or_create_key(&self, may_create: bool) -> Result<Key> {
        let path = self.path(PRIVATE_KEY);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<Key>().with_context(|| {
                format!(
                    "state file {} is corrupt (not a base64 WireGuard key); refusing to start with a new identity. \
                     Restore it, or remove the whole state dir and enrol again with a new join token",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !may_create {
                    bail!(
                        "state file {} is missing but {} exists: the node's identity is incomplete. Restore it, \
                         or remove the whole state dir and enrol again with a new join token",
                        path.display(),
                        self.path(IDENTITY).display()
                    );
                }
                let key = new_private_key();
                write_private(&path, format!("{key}\n").as_bytes())?;
                tracing::info!(path = %path.display(), "generated the node's WireGuard key pair");
                Ok(key)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The enrolled identity, if any.
    pub(crate) fn load_identity(&self) -> Result<Option<Identity>> {
        load_json(&self.path(IDENTITY))
    }

    pub(crate) fn save_identity(&self, id: &Identity) -> Result<()> {
        save_json(&self.path(IDENTITY), id)
    }

    /// The last applied config, if any.
    pub(crate) fn load_config(&self) -> Result<Option<NodeConfig>> {
        Ok(load_json::<PersistedConfig>(&self.path(CONFIG))?.map(|p| p.config))
    }

    pub(crate) fn save_config(&self, config: &NodeConfig) -> Result<()> {
        save_json(
            &self.path(CONFIG),
            &PersistedConfig {
                config: config.clone(),
            },
        )
    }

    /// The WireGuard key being rotated in, if a rotation is under way.
    pub(crate) fn load_pending_key(&self) -> Result<Option<PendingKey>> {
        load_json(&self.path(PENDING_KEY))
    }

    /// Records a key to rotate in (0600), before the controller hears of it.
    pub(crate) fn save_pending_key(&self, pending: &PendingKey) -> Result<()> {
        save_json(&self.path(PENDING_KEY), pending)
    }

    /// Makes the pending key the node's key once the controller accepted
    /// it: `private.key` first, then the identity's key generation, then
    /// the pending file goes. Each step is atomic and repeating them is
    /// harmless, so a crash anywhere leaves a rotation that resumes.
    pub(crate) fn promote_pending_key(
        &self,
        pending: &PendingKey,
        identity: &mut Identity,
    ) -> Result<()> {
        write_private(
            &self.path(PRIVATE_KEY),
            format!("{}\n", pending.private_key).as_bytes(),
        )?;
        identity.key_generation = identity.key_generation.max(pending.generation);
        self.save_identity(identity)?;
        self.discard_pending_key()
    }

    /// Forgets the pending key (promoted, or refused by the controller).
    pub(crate) fn discard_pending_key(&self) -> Result<()> {
        let path = self.path(PENDING_KEY);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }

    /// True when the dir holds an identity (the node enrolled before).
    pub(crate) fn has_identity(&self) -> bool {
        self.path(IDENTITY).exists()
    }
}

fn load_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading state file {}", path.display())),
    };
    serde_json::from_str(&text).map(Some).with_context(|| {
        format!(
            "state file {} is corrupt; refusing to start rather than guess. Restore it, or remove the whole \
             state dir and enrol again with a new join token",
            path.display()
        )
    })
}

fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("serialising state")?;
    write_private(path, text.as_bytes())
}

/// Atomic, durable write with mode 0600.
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let k1 = s.load_or_create_key(true).expect("create");
        let k2 = s.load_or_create_key(true).expect("load");
        assert_eq!(k1, k2, "a restarted agent must keep its key");
        let mode = std::fs::metadata(dir.path().join(PRIVATE_KEY))
            .expect("stat")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn corrupt_files_are_errors_not_new_identities() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let k = s.load_or_create_key(true).expect("create");
        std::fs::write(dir.path().join(PRIVATE_KEY), "garbage").expect("write");
        let e = s
            .load_or_create_key(true)
            .expect_err("corrupt key must fail");
        assert!(format!("{e:#}").contains("private.key"), "{e:#}");
        assert_ne!(
            std::fs::read_to_string(dir.path().join(PRIVATE_KEY)).expect("read"),
            format!("{k}\n")
        );
        std::fs::write(dir.path().join(IDENTITY), "{ not json").expect("write");
        let e = s.load_identity().expect_err("corrupt identity must fail");
        assert!(format!("{e:#}").contains("identity.json"), "{e:#}");
        std::fs::write(dir.path().join(CONFIG), "").expect("write");
        assert!(s.load_config().is_err(), "truncated config must fail");
    }

    fn identity() -> Identity {
        Identity {
            node_id: "n-1".into(),
            name: "a1".into(),
            controller_url: "https://198.18.0.1:7443".into(),
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
            key_generation: 0,
        }
    }

    #[test]
    fn a_pending_key_survives_until_promoted_and_promotion_is_repeatable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let old = s.load_or_create_key(true).expect("create");
        let mut id = identity();
        s.save_identity(&id).expect("save");
        assert_eq!(s.load_pending_key().expect("none"), None);
        let pending = PendingKey {
            private_key: new_private_key(),
            generation: 1,
        };
        s.save_pending_key(&pending).expect("save");
        let mode = std::fs::metadata(dir.path().join(PENDING_KEY))
            .expect("stat")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // A restart before the controller answered: the key is still there.
        let again = StateDir::open(dir.path()).expect("reopen");
        assert_eq!(
            again.load_pending_key().expect("read"),
            Some(pending.clone())
        );
        assert_eq!(again.load_or_create_key(false).expect("key"), old);
        again
            .promote_pending_key(&pending, &mut id)
            .expect("promote");
        assert_eq!(
            again.load_or_create_key(false).expect("key"),
            pending.private_key
        );
        assert_eq!(
            again.load_identity().expect("id").map(|i| i.key_generation),
            Some(1)
        );
        assert_eq!(again.load_pending_key().expect("gone"), None);
        // Repeating a promotion whose last step was lost changes nothing.
        again.promote_pending_key(&pending, &mut id).expect("again");
        assert_eq!(
            again.load_or_create_key(false).expect("key"),
            pending.private_key
        );
        // A damaged pending key is an error, not a silent loss.
        std::fs::write(dir.path().join(PENDING_KEY), "{").expect("write");
        let e = again.load_pending_key().expect_err("corrupt");
        assert!(format!("{e:#}").contains(PENDING_KEY), "{e:#}");
    }

    #[test]
    fn an_identity_from_before_key_rotation_loads() {
        let text = r#"{"node_id":"n-1","name":"a1","controller_url":"https://198.18.0.1:7443",
            "ca_pem":"ca","cert_pem":"cert","key_pem":"key"}"#;
        let id: Identity = serde_json::from_str(text).expect("loads");
        assert_eq!(id.key_generation, 0);
    }

    #[test]
    fn missing_key_with_identity_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let e = s.load_or_create_key(false).expect_err("must fail");
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
    }
}
