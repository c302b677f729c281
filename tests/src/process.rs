//! Processes the lab starts: spawned inside a namespace with `ip netns exec`,
//! logged to files, and stopped only by PID (checked against its start time,
//! so a reused PID is never signalled).

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A process the lab started, as recorded in the lab's state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcRecord {
    /// Lab-wide key, e.g. `controller`, `agent-a1`.
    pub key: String,
    /// Namespace it runs in.
    pub ns: String,
    /// PID (`ip netns exec` execs the program, so this is the program's PID).
    pub pid: i32,
    /// Start time from field 22 of `/proc/PID/stat` (clock ticks since boot).
    pub start_time: u64,
    /// The command line, for humans.
    pub argv: Vec<String>,
    /// File its stdout goes to.
    pub stdout: PathBuf,
    /// File its stderr goes to.
    pub stderr: PathBuf,
}

/// Start time (field 22 of `/proc/PID/stat`) of a live, non-zombie process.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The comm field (2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether the process recorded in `rec` is still the one running at its PID.
pub fn is_alive(rec: &ProcRecord) -> bool {
    start_time(rec.pid) == Some(rec.start_time)
}

/// Sends `sig` to the recorded process if (and only if) its PID still has the
/// recorded start time. Returns whether a signal was sent.
pub fn signal_checked(rec: &ProcRecord, sig: Signal) -> bool {
    if !is_alive(rec) {
        return false;
    }
    signal::kill(Pid::from_raw(rec.pid), sig).is_ok()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Spawns `program args` in namespace `ns`, appending its output to
/// `log_dir/<key>.stdout|.stderr`. The process gets its own process group
/// (a Ctrl-C in the terminal does not reach it) and no `WEFT_*` variables
/// from our environment (flags are explicit; a stray `WEFT_JOIN_TOKEN` would
/// falsify a restart-without-token test).
pub fn spawn_in_ns(
    key: &str,
    ns: &str,
    program: &Path,
    args: &[String],
    envs: &[(String, String)],
    log_dir: &Path,
) -> Result<(Child, ProcRecord)> {
    fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let stdout_path = log_dir.join(format!("{key}.stdout"));
    let stderr_path = log_dir.join(format!("{key}.stderr"));
    let open = |p: &Path| -> Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening log {}", p.display()))
    };
    let out = open(&stdout_path)?;
    let mut err = open(&stderr_path)?;
    let mut argv = vec![program.display().to_string()];
    argv.extend(args.iter().cloned());
    // A header makes restarts visible in the log.
    let _ = writeln!(
        err,
        "===== weft-lab: start at unix {} in netns {ns}: {}",
        unix_now(),
        argv.join(" ")
    );

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(k);
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning `ip netns exec {ns} {}`", argv.join(" ")))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    let start_time = start_time(pid).unwrap_or(0);
    let rec = ProcRecord {
        key: key.to_owned(),
        ns: ns.to_owned(),
        pid,
        start_time,
        argv,
        stdout: stdout_path,
        stderr: stderr_path,
    };
    Ok((child, rec))
}

/// Stops a process: `sig`, then, if it is still running after `grace`,
/// SIGKILL. Works for our children (reaped through `child`) and for detached
/// processes from an earlier command (polled through /proc). Never panics.
pub fn stop(
    rec: &ProcRecord,
    child: Option<&mut Child>,
    sig: Signal,
    grace: Duration,
) -> Option<ExitStatus> {
    match child {
        Some(child) => {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            let _ = signal::kill(Pid::from_raw(rec.pid), sig);
            if let Some(status) = wait_child(child, grace) {
                return Some(status);
            }
            let _ = child.kill();
            wait_child(child, Duration::from_secs(5))
        }
        None => {
            if !signal_checked(rec, sig) {
                return None;
            }
            let deadline = Instant::now() + grace;
            while is_alive(rec) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if signal_checked(rec, Signal::SIGKILL) {
                let deadline = Instant::now() + Duration::from_secs(5);
                while is_alive(rec) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
            }
            None
        }
    }
}

/// Waits up to `timeout` for a child to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// The last `lines` lines of a file (lossy UTF-8), or a note saying why not.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// `s` without ANSI escape sequences (colours in agent logs).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
