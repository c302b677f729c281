//! Bad input is refused loudly and changes nothing: garbage, reused, expired
//! and wrongly pinned join tokens; a corrupt agent state file; a corrupt or
//! truncated controller store.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use weft_tests::{Lab, Signal};

const EXIT_DEADLINE: Duration = Duration::from_secs(15);

/// What `node list` says that must not change: (name, id, key, addresses).
fn node_summary(lab: &Lab) -> Vec<(String, String, String, Vec<String>)> {
    lab.nodes()
        .into_iter()
        .map(|n| (n.name, n.id.to_string(), n.public_key, n.addresses))
        .collect()
}

fn assert_refused(
    case: &str,
    status: Option<ExitStatus>,
    stderr: &str,
    took: Duration,
    needles: &[&str],
) {
    if let Err(e) = check_refused(case, status, stderr, took, needles) {
        panic!("{e}");
    }
}

/// Exited non-zero (within the deadline) with one of `needles` in stderr.
fn check_refused(
    case: &str,
    status: Option<ExitStatus>,
    stderr: &str,
    took: Duration,
    needles: &[&str],
) -> Result<(), String> {
    let Some(status) = status else {
        return Err(format!(
            "{case}: expected the process to exit non-zero within {EXIT_DEADLINE:?}, \
             it kept running; stderr:\n{stderr}"
        ));
    };
    if status.success() {
        return Err(format!(
            "{case}: expected a non-zero exit, got {status}; stderr:\n{stderr}"
        ));
    }
    let lower = stderr.to_lowercase();
    if !needles.iter().any(|n| lower.contains(&n.to_lowercase())) {
        return Err(format!(
            "{case}: expected stderr to mention one of {needles:?}; stderr:\n{stderr}"
        ));
    }
    eprintln!("{case}: refused as expected ({status}, after {took:?})");
    Ok(())
}

/// All regular files under `dir`, with their contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.insert(p.clone(), fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

fn read_from(path: &Path, offset: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(offset..).unwrap_or_default()).into_owned()
}

#[test]
fn bad_input() {
    if weft_tests::skip_unless_root("bad_input") {
        return;
    }
    let mut lab = Lab::builder().sites(&["a", "b"]).nodes_per_site(1).build();
    let nodes_before = node_summary(&lab);
    let host = lab.add_host("a", "a3", 13);
    let underlay = "198.19.1.13".parse().expect("ip");

    // ----- join tokens -----
    let valid = lab.create_token("a", "1h");
    let wrong_ca = {
        let mut t = valid.clone();
        let last = t.pop().expect("non-empty token");
        t.push(if last == '0' { '1' } else { '0' });
        t
    };
    let expired = lab.create_token("a", "1s");
    let used = lab.node("a1").token.clone().expect("a1's token");
    // Let the 1 s token expire (wall-clock expiry, nothing to poll).
    std::thread::sleep(Duration::from_millis(2200));

    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "garbage token",
            "garbage-token-not-weft",
            &["invalid", "malformed"],
        ),
        ("reused token", &used, &["already used"]),
        ("expired token", &expired, &["expired"]),
        ("token pinned to another CA", &wrong_ca, &["does not match"]),
    ];
    for (i, (case, token, needles)) in cases.iter().enumerate() {
        let state_dir = lab.dir().join(format!("bad-agent-{i}"));
        let args = lab.agent_args("a3", underlay, &state_dir, Some(token));
        let (status, stderr, took) =
            lab.run_agent_once(&format!("bad-agent-{i}"), &host, &args, EXIT_DEADLINE);
        assert_refused(case, status, &stderr, took, needles);
        assert_eq!(
            node_summary(&lab),
            nodes_before,
            "{case}: `weftctl node list` changed"
        );
    }

    // ----- corrupt agent state -----
    lab.kill_agent("a1", Signal::SIGTERM);
    let state_dir = lab.node("a1").state_dir.clone();
    let a1_underlay = lab.node("a1").underlay;
    let a1_ns = lab.node("a1").ns.clone();
    let pristine = snapshot(&state_dir);
    assert!(
        !pristine.is_empty(),
        "a1's state dir {} holds no files after its first run",
        state_dir.display()
    );
    let mut failures = Vec::new();
    for (n, path) in pristine.keys().enumerate() {
        let garbage = b"\x00\xffthis is not weft state\xfe\n".to_vec();
        fs::write(path, &garbage).expect("corrupting a state file");
        let args = lab.agent_args("a1", a1_underlay, &state_dir, None);
        let key = format!("corrupt-a1-{n}");
        let (status, stderr, took) = lab.run_agent_once(&key, &a1_ns, &args, EXIT_DEADLINE);
        let fname = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let case = format!("a1 with corrupt {}", path.display());
        if let Err(e) = check_refused(&case, status, &stderr, took, &[&fname]) {
            failures.push(e);
        }
        let mut expected = pristine.clone();
        expected.insert(path.clone(), garbage);
        if snapshot(&state_dir) != expected {
            failures.push(format!(
                "{case}: the state dir changed (a new identity or rewritten files)"
            ));
        }
        if node_summary(&lab) != nodes_before {
            failures.push(format!("{case}: `weftctl node list` changed"));
        }
        fs::write(path, &pristine[path]).expect("restoring the state file");
    }
    assert!(failures.is_empty(), "corrupt agent state: {failures:#?}");
    lab.start_agent("a1");
    lab.wait_mesh(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("a1 after restoring its state: {e:#}"));
    assert_eq!(
        node_summary(&lab),
        nodes_before,
        "a1 came back with a different identity"
    );

    // ----- corrupt controller store -----
    lab.kill_controller(Signal::SIGTERM);
    let store = lab.controller_data_dir().join("state.json");
    let original = fs::read(&store).unwrap_or_else(|e| {
        panic!(
            "reading the controller store {}: {e}; data dir holds: {:?}",
            store.display(),
            snapshot(&lab.controller_data_dir())
                .keys()
                .collect::<Vec<_>>()
        )
    });
    assert!(original.len() > 2, "controller store is (nearly) empty");
    let truncated = original[..original.len() / 2].to_vec();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    // XOR 0xff turns an ASCII byte into one that can never start valid UTF-8
    // followed by ASCII, so the corruption is always detectable.
    flipped[mid] ^= 0xff;
    for (case, bytes) in [
        ("truncated store", truncated),
        ("byte-flipped store", flipped),
    ] {
        fs::write(&store, &bytes).expect("corrupting the store");
        let log = lab
            .proc("controller")
            .map(|p| p.stderr.clone())
            .expect("controller log");
        let offset = fs::metadata(&log).map_or(0, |m| m.len() as usize);
        lab.spawn_controller().expect("spawning the controller");
        let t0 = std::time::Instant::now();
        let status = lab.wait_proc("controller", EXIT_DEADLINE);
        if status.is_none() {
            lab.kill_controller(Signal::SIGKILL);
        }
        let stderr = read_from(&log, offset);
        assert_refused(case, status, &stderr, t0.elapsed(), &["state.json"]);
        assert!(
            fs::read(&store).expect("reading the store") == bytes,
            "{case}: the controller rewrote {} (it must leave a corrupt store as it is)",
            store.display()
        );
    }
    fs::write(&store, &original).expect("restoring the store");
    lab.start_controller();
    assert_eq!(
        node_summary(&lab),
        nodes_before,
        "the controller lost or changed nodes after restoring its store"
    );
}
