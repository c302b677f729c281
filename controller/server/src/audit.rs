//! The audit log: one JSON record per line in `<data-dir>/audit.log`,
//! appended and fsynced before the API answers. Bounded: when the file
//! holds [`MAX_RECORDS`] records it becomes `audit.log.1` (replacing the
//! previous one) and a new file starts, so the last 100,000 to 200,000
//! records are kept.
//!
//! A line that is not a record (a damaged file) stops the controller at
//! start-up with a message naming the file and line; nothing is ever
//! truncated. A last line cut short by a crash during an append is kept as
//! it is, ended, and followed by a record saying so.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use tracing::warn;
use weft_controller_core::admin::{AuditRecord, Role, escape};

/// File name of the audit log inside the data dir.
pub(crate) const AUDIT_LOG: &str = "audit.log";

/// Records per file before it is rotated.
pub(crate) const MAX_RECORDS: u64 = 100_000;

/// Who makes an admin call, and which RPC: set by the admin gate for the
/// duration of the call, read when a mutation is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The admin token's name.
    pub(crate) credential: String,
    pub(crate) role: Role,
    /// The RPC's method name, e.g. `SetNodeLabels`.
    pub(crate) rpc: String,
}

tokio::task_local! {
    /// The admin caller of the current request (unset for agents).
    pub(crate) static CALLER: Caller;
}

/// The admin caller of the current task, if it serves an admin call.
pub(crate) fn current_caller() -> Option<Caller> {
    CALLER.try_with(Caller::clone).ok()
}

/// Why the audit log cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuditError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the audit log {} is damaged at line {line}: {problem}. Nothing was changed; move the \
         file aside (keep it for review) and the controller starts a new one",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// The audit log, open for appending.
#[derive(Debug)]
pub(crate) struct AuditLog {
    dir: PathBuf,
    file: File,
    records: u64,
    max_records: u64,
}

impl AuditLog {
    /// Opens (or creates) `<dir>/audit.log`, checking every line. Returns
    /// the log and its last record.
    pub(crate) fn open(
        dir: &Path,
        max_records: u64,
    ) -> Result<(AuditLog, Option<AuditRecord>), AuditError> {
        let path = dir.join(AUDIT_LOG);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error("reading", &path, e)),
        };
        let (records, torn) = parse(&bytes).map_err(|(line, problem)| AuditError::Corrupt {
            path: path.clone(),
            line,
            problem,
        })?;
        let file = open_append(&path)?;
        let mut log = AuditLog {
            dir: dir.to_path_buf(),
            file,
            records: records.len() as u64,
            max_records,
        };
        let mut last = records.last().cloned();
        if let Some(torn) = torn {
            let line = records.len() + 1;
            warn!(path = %path.display(), line, "the audit log's last line was cut short (crash during an append); kept as it is");
            log.write_raw(b"\n")?;
            let note = AuditRecord {
                unix: last.as_ref().map_or(0, |r| r.unix),
                credential: "controller".to_owned(),
                rpc: "-".to_owned(),
                summary: format!(
                    "line {line} was cut short by a crash during an append, kept as it is: {}",
                    escape(&String::from_utf8_lossy(&torn))
                ),
                revision: last.as_ref().map_or(0, |r| r.revision),
                outcome: "note".to_owned(),
            };
            log.append(&note)?;
            last = Some(note);
        }
        Ok((log, last))
    }

    /// Appends one record and fsyncs it; rotates a full file first.
    pub(crate) fn append(&mut self, record: &AuditRecord) -> Result<(), AuditError> {
        if self.records >= self.max_records {
            self.rotate()?;
        }
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        self.write_raw(&line)?;
        self.records += 1;
        Ok(())
    }

    fn write_raw(&mut self, data: &[u8]) -> Result<(), AuditError> {
        let path = self.dir.join(AUDIT_LOG);
        self.file
            .write_all(data)
            .map_err(|e| io_error("appending to", &path, e))?;
        self.file
            .sync_data()
            .map_err(|e| io_error("syncing", &path, e))
    }

    /// `audit.log` becomes `audit.log.1`; a new `audit.log` starts.
    fn rotate(&mut self) -> Result<(), AuditError> {
        let path = self.dir.join(AUDIT_LOG);
        let old = rotated(&self.dir);
        fs::rename(&path, &old).map_err(|e| io_error("renaming to", &old, e))?;
        self.file = open_append(&path)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("syncing directory", &self.dir, e))?;
        self.records = 0;
        Ok(())
    }
}

fn rotated(dir: &Path) -> PathBuf {
    dir.join(format!("{AUDIT_LOG}.1"))
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error("opening", path, e))
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> AuditError {
    AuditError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The records of a whole file and its unterminated last line, if any.
type Parsed = (Vec<AuditRecord>, Option<Vec<u8>>);

/// The records of a whole file, and its unterminated last line if any; or
/// the first bad line (1-based) and what is wrong with it.
fn parse(bytes: &[u8]) -> Result<Parsed, (usize, String)> {
    let mut records = Vec::new();
    let mut rest = bytes;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..end];
        rest = &rest[end + 1..];
        match serde_json::from_slice::<AuditRecord>(line) {
            Ok(r) => records.push(r),
            // A line cut short by a crash, ended at the next start-up.
            Err(_) if is_torn_note_next(rest) => {}
            Err(e) => return Err((records.len() + 1, format!("not an audit record: {e}"))),
        }
    }
    let torn = (!rest.is_empty()).then(|| rest.to_vec());
    Ok((records, torn))
}

/// Whether the next line is the note left after a line cut short.
fn is_torn_note_next(rest: &[u8]) -> bool {
    let next = rest.split(|&b| b == b'\n').next().unwrap_or_default();
    serde_json::from_slice::<AuditRecord>(next)
        .is_ok_and(|r| r.outcome == "note" && r.summary.contains("was cut short by a crash"))
}

/// The kept records at or after `since_unix`, oldest first (the rotated
/// file, then the current one). A line being appended right now is not
/// read yet.
pub(crate) fn read(dir: &Path, since_unix: u64) -> Result<Vec<AuditRecord>, AuditError> {
    let mut out = Vec::new();
    for path in [rotated(dir), dir.join(AUDIT_LOG)] {
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("reading", &path, e)),
        };
        let (records, _partial) = parse(&bytes).map_err(|(line, problem)| AuditError::Corrupt {
            path: path.clone(),
            line,
            problem,
        })?;
        out.extend(records.into_iter().filter(|r| r.unix >= since_unix));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(unix: u64, summary: &str) -> AuditRecord {
        AuditRecord {
            unix,
            credential: "ops".into(),
            rpc: "SetNodeLabels".into(),
            summary: summary.into(),
            revision: unix,
            outcome: "ok".into(),
        }
    }

    #[test]
    fn records_are_appended_and_read_back_since_a_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut log, last) = AuditLog::open(dir.path(), MAX_RECORDS).expect("opens");
        assert_eq!(last, None);
        for t in 1..=3 {
            log.append(&record(t, &format!("node=a{t}")))
                .expect("appended");
        }
        let got = read(dir.path(), 2).expect("reads");
        assert_eq!(got, vec![record(2, "node=a2"), record(3, "node=a3")]);
        drop(log);
        let (_log, last) = AuditLog::open(dir.path(), MAX_RECORDS).expect("reopens");
        assert_eq!(last, Some(record(3, "node=a3")));
    }

    #[test]
    fn a_full_file_is_rotated_and_the_last_two_files_are_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut log, _) = AuditLog::open(dir.path(), 3).expect("opens");
        for t in 1..=8 {
            log.append(&record(t, "x")).expect("appended");
        }
        let kept: Vec<u64> = read(dir.path(), 0)
            .expect("reads")
            .iter()
            .map(|r| r.unix)
            .collect();
        assert_eq!(kept, [4, 5, 6, 7, 8], "records 1-3 rotated out");
    }

    #[test]
    fn a_damaged_line_is_reported_and_nothing_is_truncated() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut log, _) = AuditLog::open(dir.path(), MAX_RECORDS).expect("opens");
        log.append(&record(1, "a")).expect("appended");
        log.append(&record(2, "b")).expect("appended");
        drop(log);
        let path = dir.path().join(AUDIT_LOG);
        let mut bytes = fs::read(&path).expect("readable");
        bytes[5] = b'#';
        fs::write(&path, &bytes).expect("damaged");
        let err = AuditLog::open(dir.path(), MAX_RECORDS).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("damaged at line 1"), "{msg}");
        assert!(msg.contains("move the file aside"), "{msg}");
        assert_eq!(fs::read(&path).expect("readable"), bytes, "file untouched");
        assert!(read(dir.path(), 0).is_err(), "reads report it too");
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_kept_and_noted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut log, _) = AuditLog::open(dir.path(), MAX_RECORDS).expect("opens");
        log.append(&record(1, "a")).expect("appended");
        drop(log);
        let path = dir.path().join(AUDIT_LOG);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"unix\":2,\"cred").expect("torn write");
        drop(f);
        let (mut log, last) = AuditLog::open(dir.path(), MAX_RECORDS).expect("opens");
        let note = last.expect("a note");
        assert_eq!(note.outcome, "note");
        assert!(note.summary.contains("line 2 was cut short"), "{note:?}");
        log.append(&record(3, "c")).expect("appended after");
        let text = fs::read_to_string(&path).expect("readable");
        assert!(
            text.contains("{\"unix\":2,\"cred\n"),
            "torn bytes kept:\n{text}"
        );
        let units: Vec<u64> = read(dir.path(), 0)
            .expect("reads")
            .iter()
            .map(|r| r.unix)
            .collect();
        assert_eq!(units, [1, 1, 3], "the record, the note, the next record");
        drop(log);
        AuditLog::open(dir.path(), MAX_RECORDS).expect("reopens cleanly");
    }
}
