//! The embedded store: the whole state in one file, `<data-dir>/state.json`,
//! replaced atomically and durably on every change.
//!
//! Format: a header line `weft-store v1`, a line `sha256:<hex of the body>`,
//! then the JSON body. A save writes `state.json.tmp`, fsyncs it, keeps the
//! current file as `state.json.prev` (hard link), renames the temp file over
//! `state.json` and fsyncs the directory, so an acknowledged save survives
//! `kill -9` and power loss. A load takes the whole file or nothing.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use weft_controller_core::State;

/// Where the controller's state is kept.
pub(crate) trait Store {
    /// The stored state, `None` if nothing was ever stored.
    fn load(&self) -> Result<Option<State>, StoreError>;
    /// Stores the whole state; on `Ok` it is durable.
    fn save(&mut self, state: &State) -> Result<(), StoreError>;
}

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// An I/O operation on a store file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The state could not be encoded (a bug).
    #[error("encoding the state: {0}")]
    Encode(#[source] serde_json::Error),
    /// The stored file cannot be trusted as a whole.
    #[error(
        "cannot load the store {}: {problem}. The controller refuses to start with a \
         half-loaded store; {} holds the previous revision (inspect it, then copy it over \
         {} to recover)",
        path.display(), prev.display(), path.display()
    )]
    Corrupt {
        path: PathBuf,
        prev: PathBuf,
        problem: String,
    },
}

/// The store as a file in the data directory.
#[derive(Debug)]
pub(crate) struct FileStore {
    path: PathBuf,
    tmp: PathBuf,
    prev: PathBuf,
    prev_tmp: PathBuf,
    dir: PathBuf,
}

/// First line of a store file.
const MAGIC: &str = "weft-store v1";
const FILE_MODE: u32 = 0o600;

impl FileStore {
    /// The store at `<dir>/state.json` (the directory must exist).
    pub(crate) fn new(dir: &Path) -> Self {
        FileStore {
            path: dir.join("state.json"),
            tmp: dir.join("state.json.tmp"),
            prev: dir.join("state.json.prev"),
            prev_tmp: dir.join("state.json.prev.tmp"),
            dir: dir.to_path_buf(),
        }
    }

    fn corrupt(&self, problem: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            prev: self.prev.clone(),
            problem: problem.into(),
        }
    }

    /// Writes `data` to the temp file, mode 0600, and fsyncs it.
    fn write_tmp(&self, data: &[u8]) -> Result<(), StoreError> {
        let io = |op| move |source| io_error(op, &self.tmp, source);
        // A stale temp file from a crash is simply overwritten.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&self.tmp)
            .map_err(io("creating"))?;
        // `mode` applies only to new files; a stale one may have another.
        f.set_permissions(Permissions::from_mode(FILE_MODE))
            .map_err(io("setting permissions of"))?;
        f.write_all(data).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))
    }

    /// Makes `state.json.prev` the current `state.json`, atomically.
    fn keep_previous(&self) -> Result<(), StoreError> {
        match fs::remove_file(&self.prev_tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("removing", &self.prev_tmp, e)),
        }
        match fs::hard_link(&self.path, &self.prev_tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()), // first save
            Err(_) => {
                // No hard links on this filesystem: copy (keeps mode 0600).
                fs::copy(&self.path, &self.prev_tmp)
                    .map_err(|e| io_error("copying to", &self.prev_tmp, e))?;
                File::open(&self.prev_tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io_error("syncing", &self.prev_tmp, e))?;
            }
        }
        fs::rename(&self.prev_tmp, &self.prev).map_err(|e| io_error("renaming to", &self.prev, e))
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<State>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Saves replace the file atomically, so it never goes missing
                // once written: someone removed it. Don't start empty.
                if self.prev.exists() {
                    return Err(self.corrupt("the file is missing but a previous revision exists"));
                }
                return Ok(None);
            }
            Err(e) => return Err(io_error("reading", &self.path, e)),
        };
        decode(&bytes)
            .map(Some)
            .map_err(|problem| self.corrupt(problem))
    }

    fn save(&mut self, state: &State) -> Result<(), StoreError> {
        self.write_tmp(&encode(state)?)?;
        self.keep_previous()?;
        fs::rename(&self.tmp, &self.path).map_err(|e| io_error("renaming to", &self.path, e))?;
        // The renames are durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("syncing directory", &self.dir, e))
    }
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The whole file: header, checksum line, JSON body.
fn encode(state: &State) -> Result<Vec<u8>, StoreError> {
    let mut body = serde_json::to_vec_pretty(state).map_err(StoreError::Encode)?;
    body.push(b'\n');
    let sum = hex::encode(Sha256::digest(&body));
    let mut data = format!("{MAGIC}\nsha256:{sum}\n").into_bytes();
    data.extend_from_slice(&body);
    Ok(data)
}

/// Parses and checks a whole file, or says what is wrong with it.
fn decode(bytes: &[u8]) -> Result<State, String> {
    let (magic, rest) =
        split_line(bytes).ok_or("the header line is incomplete (empty or truncated file)")?;
    if magic != MAGIC.as_bytes() {
        return Err(if magic.starts_with(b"weft-store ") {
            format!(
                "unsupported format {:?}; this controller reads {MAGIC:?}",
                String::from_utf8_lossy(magic)
            )
        } else {
            format!("not a Weft store (the first line is not {MAGIC:?})")
        });
    }
    let (sum_line, body) =
        split_line(rest).ok_or("the checksum line is incomplete (truncated file)")?;
    let expected = sum_line
        .strip_prefix(b"sha256:")
        .and_then(|h| hex::decode(h).ok())
        .filter(|h| h.len() == 32)
        .ok_or("the second line is not \"sha256:<64 hex digits>\"")?;
    let actual = Sha256::digest(body);
    if actual.as_slice() != expected.as_slice() {
        return Err(format!(
            "checksum mismatch, the file is truncated or was modified (header says sha256:{}, \
             body has sha256:{})",
            hex::encode(&expected),
            hex::encode(actual)
        ));
    }
    let state: State =
        serde_json::from_slice(body).map_err(|e| format!("the body is not a valid state: {e}"))?;
    state.validate().map_err(|e| e.to_string())?;
    Ok(state)
}

/// The first line (without its `\n`) and the rest, if there is a `\n`.
fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use weft_controller_core::{NetworkSettings, Registration};
    use weft_dataplane_core::Key;

    use super::*;

    fn sample_state() -> State {
        let settings =
            NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"));
        let mut s = State::new(settings).expect("valid settings");
        s.create_site("eu-west", 1_000).expect("site");
        s.create_token("abc123", [7; 32], "eu-west", 1_000, 3_600)
            .expect("token");
        let reg = Registration {
            node_id: "n-1".to_owned(),
            token_id: "abc123".to_owned(),
            secret_hash: [7; 32],
            name: "a1".to_owned(),
            public_key: Key([1; 32]),
            endpoint: Some("198.18.0.1:51820".parse().expect("valid addr")),
            cert_fingerprint: [2; 32],
            cert_expires_unix: 0,
            csr_key: [2; 32],
            labels: Default::default(),
        };
        s.register_node(reg, 1_001).expect("registers");
        s.add_external_peer(
            "laptop",
            "eu-west",
            Key([3; 32]),
            None,
            Default::default(),
            1_002,
        )
        .expect("peer");
        s
    }

    fn saved() -> (tempfile::TempDir, FileStore, State) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = FileStore::new(dir.path());
        let state = sample_state();
        store.save(&state).expect("save succeeds");
        (dir, store, state)
    }

    fn assert_refused(store: &FileStore, why: &str) {
        let err = match store.load() {
            Err(e @ StoreError::Corrupt { .. }) => e.to_string(),
            Err(e) => panic!("{why}: expected a Corrupt error, got {e}"),
            Ok(s) => panic!("{why}: expected a refusal, loaded {s:?}"),
        };
        let path = store.path.display().to_string();
        assert!(
            err.contains(&format!("cannot load the store {path}: ")),
            "{why}: {err}"
        );
        assert!(
            err.contains("refuses to start with a half-loaded store"),
            "{why}: {err}"
        );
        assert!(
            err.contains("state.json.prev holds the previous revision"),
            "{why}: {err}"
        );
    }

    #[test]
    fn round_trip_with_header_checksum_and_private_mode() {
        let (dir, store, state) = saved();
        assert_eq!(store.load().expect("loads").as_ref(), Some(&state));
        let text = fs::read_to_string(dir.path().join("state.json")).expect("readable");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("weft-store v1"));
        assert!(
            lines
                .next()
                .is_some_and(|l| l.starts_with("sha256:") && l.len() == 71)
        );
        let mode = fs::metadata(&store.path).expect("exists").mode() & 0o777;
        assert_eq!(mode, 0o600, "state.json must be private");
        assert!(!store.tmp.exists(), "the temp file was renamed away");
    }

    #[test]
    fn previous_revision_is_kept_and_loadable() {
        let (_dir, mut store, first) = saved();
        let mut second = first.clone();
        second.delete_external_peer("laptop").expect("deleted");
        store.save(&second).expect("save succeeds");
        assert_eq!(store.load().expect("loads"), Some(second));
        let prev = fs::read(&store.prev).expect("state.json.prev exists");
        assert_eq!(
            decode(&prev),
            Ok(first),
            "state.json.prev holds the first revision"
        );
        assert!(!store.prev_tmp.exists());
    }

    #[test]
    fn missing_file_is_none_unless_a_previous_revision_exists() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = FileStore::new(dir.path());
        assert!(matches!(store.load(), Ok(None)), "empty dir is a new store");
        fs::write(&store.prev, b"anything").expect("write prev");
        assert_refused(&store, "state.json deleted by hand");
    }

    #[test]
    fn truncated_files_are_refused() {
        let (_dir, store, _state) = saved();
        let full = fs::read(&store.path).expect("readable");
        let header = MAGIC.len() + 1 + "sha256:".len() + 64 + 1;
        for len in [
            0,
            1,
            MAGIC.len(),
            MAGIC.len() + 1,
            20,
            header - 1,
            header,
            header + 1,
            full.len() / 2,
            full.len() - 1,
        ] {
            fs::write(&store.path, &full[..len]).expect("truncate");
            assert_refused(
                &store,
                &format!("truncated to {len} of {} bytes", full.len()),
            );
        }
    }

    #[test]
    fn flipped_bytes_are_refused() {
        let (_dir, store, _state) = saved();
        let full = fs::read(&store.path).expect("readable");
        for pos in [
            0,
            5,
            MAGIC.len() + 10,
            MAGIC.len() + 30,
            full.len() / 2,
            full.len() - 2,
        ] {
            let mut bad = full.clone();
            bad[pos] ^= 0x01;
            fs::write(&store.path, &bad).expect("write");
            assert_refused(&store, &format!("bit flipped at byte {pos}"));
        }
    }

    #[test]
    fn garbage_and_invalid_bodies_are_refused() {
        let (_dir, store, state) = saved();
        fs::write(&store.path, b"\x00\xffgarbage\n\n{}").expect("write");
        assert_refused(&store, "garbage");
        fs::write(&store.path, b"weft-store v2\nsha256:00\n{}").expect("write");
        assert_refused(&store, "future version");

        let with_sum = |body: &[u8]| {
            let mut f =
                format!("{MAGIC}\nsha256:{}\n", hex::encode(Sha256::digest(body))).into_bytes();
            f.extend_from_slice(body);
            f
        };
        fs::write(&store.path, with_sum(b"{not json")).expect("write");
        assert_refused(&store, "bad JSON with a good checksum");

        // Well-formed JSON whose state breaks an invariant.
        let mut v = serde_json::to_value(&state).expect("json");
        v["nodes"]["n-1"]["ipv4"] = "100.64.0.9".into();
        let body = serde_json::to_vec(&v).expect("json");
        fs::write(&store.path, with_sum(&body)).expect("write");
        assert_refused(&store, "state that fails validate()");
        let err = store.load().expect_err("refused").to_string();
        assert!(err.contains("state is inconsistent"), "{err}");
    }

    #[test]
    fn stale_tmp_from_a_crash_is_ignored_and_replaced() {
        let (_dir, mut store, state) = saved();
        fs::write(&store.tmp, b"half a write").expect("write");
        fs::set_permissions(&store.tmp, Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(store.load().expect("loads").as_ref(), Some(&state));
        store.save(&state).expect("save over a stale temp file");
        assert!(!store.tmp.exists());
        let mode = fs::metadata(&store.path).expect("exists").mode() & 0o777;
        assert_eq!(mode, 0o600, "a stale temp file's mode must not leak");
        assert_eq!(store.load().expect("loads"), Some(state));
    }
}
