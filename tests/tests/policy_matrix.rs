//! Network policy over three sites (issue 3: tests 6b and 6c, and point 4's
//! stateful enforcement), in one lab of 3 sites × 2 nodes:
//!
//! - labels: a1 `role=web`, a2 `role=batch`, b1 `role=db`, b2 `role=web`,
//!   c1 `role=db`, c2 none. Two policies (`db`, `web`) allow and deny by
//!   label, site, protocol and port.
//! - **Matrix**: for every ordered pair and TCP 5432, TCP 8080, UDP 5353
//!   and ICMP (IPv4; TCP 5432 and UDP 5353 over IPv6 too), the data plane's
//!   verdict equals `weftctl policy explain`'s, and a few are pinned by
//!   hand. Every dropped probe is counted on the node that dropped it (its
//!   reported policy counters, `weftctl node get -o json`), and the rules
//!   that decided are named in its per-rule counters.
//! - **≤ 1 s on every agent**: a policy that closes a flow to each of the
//!   four governed nodes is enforced on all of them within 1 s of
//!   `weftctl apply` returning (one probe thread per node).
//! - **Stateful**: a governed node's own connections (TCP, UDP, ping) to a
//!   node its policy would not admit get their replies; an allowed TCP
//!   stream keeps flowing, without one drop on the receiver, across three
//!   policy changes that still allow it; a change that revokes it ends it.

// setns(2) in helper threads that run probes and servers inside a node's
// network namespace.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weft_tests::Lab;

const NODES: [&str; 6] = ["a1", "a2", "b1", "b2", "c1", "c2"];
const GOVERNED: [&str; 4] = ["a1", "b1", "b2", "c1"];
const BUDGET: Duration = Duration::from_secs(1);

const POLICIES: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 5432}]
    - from: {sites: [c]}
      ports: [{protocol: ICMP}]
    - from: {matchLabels: {role: batch}}
      ports: [{protocol: TCP, portRange: "5000-5999"}]
  deny:
    - from: {matchLabels: {role: batch}}
      ports: [{protocol: TCP, port: 5432}]
---
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  target: {matchLabels: {role: web}}
  ingress:
    - ports: [{protocol: TCP, port: 8080}]
    - from: {matchLabels: {role: db}}
      ports: [{protocol: UDP, port: 5353}]
"#;

/// The `db` policy, still admitting web → db TCP 5432 (as part of a range).
const DB_WIDER: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, portRange: "5400-5500"}]
    - from: {sites: [c]}
      ports: [{protocol: ICMP}]
"#;

/// A policy selecting nothing that exists.
const UNRELATED: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: unrelated}
spec:
  target: {matchLabels: {role: cache}}
  ingress:
    - ports: [{protocol: TCP, port: 6379}]
"#;

/// The `db` policy without web → db TCP 5432: revokes it.
const DB_REVOKED: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {sites: [c]}
      ports: [{protocol: ICMP}]
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Probe {
    Tcp(u16),
    Udp(u16),
    Icmp,
}

impl Probe {
    fn explain_arg(self) -> String {
        match self {
            Probe::Tcp(p) => format!("{p}/tcp"),
            Probe::Udp(p) => format!("{p}/udp"),
            Probe::Icmp => "icmp".to_owned(),
        }
    }
}

/// Runs `f` on a new thread inside network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns(2) with a valid namespace fd changes only this
        // thread's network namespace; the thread is ours alone.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
}

/// Servers inside nodes' namespaces, stopped and joined on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// TCP listeners that accept and close, and UDP echo servers, on `[::]`
/// (IPv4 and IPv6) of every node.
fn serve(lab: &Lab, tcp: &[u16], udp: &[u16]) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let ready = Arc::new(AtomicUsize::new(0));
    let mut wanted = 0;
    for node in NODES {
        let ns = lab.ns(node);
        for &port in tcp {
            let (stop, ready) = (stop.clone(), ready.clone());
            wanted += 1;
            threads.push(in_ns(&ns, move || {
                let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).expect("bind tcp");
                l.set_nonblocking(true).expect("nonblocking");
                ready.fetch_add(1, Ordering::SeqCst);
                while !stop.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((s, _)) => drop(s),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        for &port in udp {
            let (stop, ready) = (stop.clone(), ready.clone());
            wanted += 1;
            threads.push(in_ns(&ns, move || {
                let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).expect("bind udp");
                s.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                ready.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], from);
                    }
                }
            }));
        }
    }
    lab.wait_until(Duration::from_secs(5), "probe servers to bind", || {
        ready.load(Ordering::SeqCst) == wanted
    });
    Servers { stop, threads }
}

fn tcp_connects(lab: &Lab, from: &str, to: IpAddr, port: u16, timeout: Duration) -> bool {
    in_ns(&lab.ns(from), move || {
        TcpStream::connect_timeout(&SocketAddr::new(to, port), timeout).is_ok()
    })
    .join()
    .expect("probe thread")
}

fn udp_echoes(lab: &Lab, from: &str, to: IpAddr, port: u16, timeout: Duration) -> bool {
    in_ns(&lab.ns(from), move || {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).expect("bind udp client");
        s.set_read_timeout(Some(timeout)).expect("timeout");
        let token = format!("probe-{}", rand_token());
        let dst = match to {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port),
            IpAddr::V6(_) => SocketAddr::new(to, port),
        };
        if s.send_to(token.as_bytes(), dst).is_err() {
            return false;
        }
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match s.recv_from(&mut buf) {
                Ok((n, _)) if &buf[..n] == token.as_bytes() => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
        false
    })
    .join()
    .expect("probe thread")
}

fn rand_token() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn passes(lab: &Lab, from: &str, to: IpAddr, probe: Probe, timeout: Duration) -> bool {
    match probe {
        Probe::Tcp(port) => tcp_connects(lab, from, to, port, timeout),
        Probe::Udp(port) => udp_echoes(lab, from, to, port, timeout),
        Probe::Icmp => {
            let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
            lab.ping_once(from, to, ms)
        }
    }
}

/// What `weftctl policy explain` says: true for allow.
fn explained_allow(lab: &Lab, from: &str, to: &str, probe: Probe) -> bool {
    let out = lab.weftctl_ok(&[
        "policy",
        "explain",
        "--from",
        from,
        "--to",
        to,
        "--port",
        &probe.explain_arg(),
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("explain json");
    match v["verdict"].as_str() {
        Some("allow") => true,
        Some("deny") => false,
        other => panic!("explain {from} -> {to} {probe:?}: verdict {other:?} in {out}"),
    }
}

/// A node's reported policy counters: packets per verdict and per rule.
#[derive(Debug, Default, Clone)]
struct Counted {
    verdicts: BTreeMap<String, u64>,
    rules: BTreeMap<String, u64>,
}

impl Counted {
    fn drops(&self) -> u64 {
        ["denied", "default_denied", "unparsable"]
            .iter()
            .map(|v| self.verdicts.get(*v).copied().unwrap_or(0))
            .sum()
    }
}

fn counted(lab: &Lab, node: &str) -> Counted {
    let out = lab.weftctl_ok(&["node", "get", node, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("node json");
    let policy = &v["policy"];
    let mut c = Counted::default();
    if let Some(verdicts) = policy["verdicts"].as_object() {
        for (k, x) in verdicts {
            c.verdicts
                .insert(k.clone(), x["packets"].as_u64().unwrap_or(0));
        }
    }
    if let Some(rules) = policy["rules"].as_array() {
        for r in rules {
            let name = r["rule"].as_str().unwrap_or_default().to_owned();
            c.rules.insert(name, r["packets"].as_u64().unwrap_or(0));
        }
    }
    c
}

/// A node's drop count once its reports have caught up: agents report
/// counters that moved within a second, so two reads 1.5 s apart agree.
fn settled_drops(lab: &Lab, node: &str) -> u64 {
    let mut last = counted(lab, node).drops();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1500));
        let now = counted(lab, node).drops();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("{node}'s drop counter did not settle");
}

fn apply(lab: &Lab, name: &str, yaml: &str) {
    let file = lab.dir().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).expect("writing a policy file");
    lab.weftctl_ok(&["apply", "-f", &file.display().to_string()]);
}

#[test]
fn policy_matrix() {
    if weft_tests::skip_unless_root("policy_matrix") {
        return;
    }
    let lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(2)
        .build();
    let addrs: BTreeMap<&str, (IpAddr, IpAddr)> = NODES
        .iter()
        .map(|&n| {
            let (v4, v6) = lab.node_addresses(n);
            (n, (IpAddr::V4(v4), IpAddr::V6(v6)))
        })
        .collect();
    let v4 = |n: &str| addrs[n].0;
    let v6 = |n: &str| addrs[n].1;
    let servers = serve(&lab, &[5432, 8080, 5000, 9000], &[5353]);
    let short = Duration::from_millis(400);

    for (node, role) in [
        ("a1", "web"),
        ("a2", "batch"),
        ("b1", "db"),
        ("b2", "web"),
        ("c1", "db"),
    ] {
        lab.weftctl_ok(&["node", "label", node, &format!("role={role}")]);
    }
    // Before any policy, every governed node answers c2 on TCP 5432.
    for to in GOVERNED {
        lab.wait_until(
            Duration::from_secs(20),
            &format!("c2 -> {to} TCP 5432 before the policy"),
            || tcp_connects(&lab, "c2", v4(to), 5432, short),
        );
    }

    // --- 6c: enforced on every agent within 1 s of `weftctl apply`. ---
    // c2 (no labels) may send the db nodes only ICMP, the web nodes TCP
    // 8080: its TCP 5432 is closed on all four.
    let file = lab.dir().join("policies.yaml");
    std::fs::write(&file, POLICIES).expect("writing the policy file");
    let stop = Arc::new(AtomicBool::new(false));
    let first_drop: Arc<Mutex<BTreeMap<&'static str, Instant>>> = Arc::default();
    let watchers: Vec<JoinHandle<()>> = GOVERNED
        .iter()
        .map(|&to| {
            let (stop, first_drop) = (stop.clone(), first_drop.clone());
            let dst = v4(to);
            in_ns(&lab.ns("c2"), move || {
                while !stop.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    let ok = TcpStream::connect_timeout(
                        &SocketAddr::new(dst, 5432),
                        Duration::from_millis(150),
                    )
                    .is_ok();
                    if !ok {
                        first_drop.lock().expect("lock").entry(to).or_insert(sent);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    lab.weftctl_ok(&["apply", "-f", &file.display().to_string()]);
    let applied = Instant::now();
    let deadline = applied + Duration::from_secs(10);
    while first_drop.lock().expect("lock").len() < GOVERNED.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    for w in watchers {
        w.join().expect("watcher");
    }
    let first_drop = first_drop.lock().expect("lock").clone();
    for to in GOVERNED {
        let Some(at) = first_drop.get(to) else {
            panic!("c2 -> {to} TCP 5432 still connects 10 s after `weftctl apply`");
        };
        let took = at.saturating_duration_since(applied);
        eprintln!(
            "policy enforced on {to}: first dropped probe sent {took:?} after apply returned"
        );
        assert!(
            took <= BUDGET,
            "{to} enforced the policy {took:?} after `weftctl apply` returned (budget {BUDGET:?})"
        );
    }

    // --- 6b: the matrix. ---
    let before: BTreeMap<&str, Counted> = NODES.iter().map(|&n| (n, counted(&lab, n))).collect();
    let mut dropped_at: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut allowed, mut denied) = (0, 0);
    let mut verdicts: BTreeMap<(&str, &str, Probe, bool), bool> = BTreeMap::new();
    for from in NODES {
        for to in NODES {
            if from == to {
                continue;
            }
            for probe in [
                Probe::Tcp(5432),
                Probe::Tcp(8080),
                Probe::Udp(5353),
                Probe::Icmp,
            ] {
                let want = explained_allow(&lab, from, to, probe);
                let families: &[bool] = match probe {
                    Probe::Tcp(5432) | Probe::Udp(_) => &[false, true],
                    Probe::Tcp(_) | Probe::Icmp => &[false],
                };
                for &six in families {
                    let dst = if six { v6(to) } else { v4(to) };
                    // An allowed probe gets a second, longer chance.
                    let got = passes(&lab, from, dst, probe, short)
                        || (want && passes(&lab, from, dst, probe, Duration::from_secs(2)));
                    assert_eq!(
                        got,
                        want,
                        "{from} -> {to} {probe:?} over IPv{}: data plane {} but explain says {}",
                        if six { 6 } else { 4 },
                        if got { "passes" } else { "drops" },
                        if want { "allow" } else { "deny" }
                    );
                    verdicts.insert((from, to, probe, six), got);
                    if got {
                        allowed += 1;
                    } else {
                        denied += 1;
                        *dropped_at.entry(to).or_default() += 1;
                    }
                }
            }
        }
    }
    eprintln!("matrix: {allowed} probes passed, {denied} dropped, all as explained");
    // Pinned by hand, so the matrix cannot agree with a wrong explain.
    for (from, to, probe, want) in [
        ("a1", "b1", Probe::Tcp(5432), true),  // web -> db
        ("b2", "c1", Probe::Tcp(5432), true),  // web -> db across sites
        ("a2", "b1", Probe::Tcp(5432), false), // batch: explicit deny
        ("c2", "b1", Probe::Tcp(5432), false), // default deny
        ("c2", "b1", Probe::Icmp, true),       // from site c
        ("a1", "b1", Probe::Icmp, false),      // not from site c
        ("c2", "a1", Probe::Tcp(8080), true),  // web: 8080 from anyone
        ("c2", "a1", Probe::Udp(5353), false), // web: UDP only from db
        ("c1", "a1", Probe::Udp(5353), true),
        ("a2", "c2", Probe::Tcp(5432), true), // c2 is not governed
    ] {
        assert_eq!(
            verdicts.get(&(from, to, probe, false)),
            Some(&want),
            "{from} -> {to} {probe:?}"
        );
    }
    assert!(
        allowed >= 40 && denied >= 40,
        "matrix too one-sided: {allowed}/{denied}"
    );
    // Every drop is counted on the node that dropped it, and the deciding
    // rules are named.
    lab.wait_until(
        Duration::from_secs(15),
        "every node to report its drops",
        || {
            NODES.iter().all(|&n| {
                let want = dropped_at.get(n).copied().unwrap_or(0);
                counted(&lab, n).drops() >= before[n].drops() + want
            })
        },
    );
    for n in ["a2", "c2"] {
        assert_eq!(
            counted(&lab, n).drops(),
            before[n].drops(),
            "{n} is not governed and must drop nothing"
        );
    }
    let b1 = counted(&lab, "b1");
    eprintln!("b1 counters: {b1:?}");
    for rule in ["db/deny[0]", "db/ingress[0]", "db/ingress[1]"] {
        assert!(
            b1.rules.get(rule).copied().unwrap_or(0) > 0,
            "b1 must count packets decided by {rule}: {b1:?}"
        );
    }

    // --- Stateful: b1 (governed) opens connections c2's policy role would
    // never be admitted on; the replies pass. ---
    assert!(
        !tcp_connects(&lab, "c2", v4("b1"), 9000, short),
        "c2 -> b1 TCP 9000 must be dropped (default deny)"
    );
    assert!(
        tcp_connects(&lab, "b1", v4("c2"), 9000, Duration::from_secs(2)),
        "b1 -> c2 TCP 9000: the reply to b1's own connection must pass b1's policy"
    );
    assert!(
        tcp_connects(&lab, "b1", v6("c2"), 9000, Duration::from_secs(2)),
        "b1 -> c2 TCP 9000 over IPv6"
    );
    assert!(
        udp_echoes(&lab, "b1", v4("c2"), 5353, Duration::from_secs(2)),
        "b1 -> c2 UDP 5353: the echo must pass b1's policy"
    );
    assert!(
        lab.ping_once("b1", v4("a2"), 1000),
        "b1 pings a2: the echo reply must pass b1's policy"
    );

    // The streams below bind TCP 5432 themselves.
    drop(servers);

    // --- An allowed flow survives policy changes that still allow it. ---
    let drops_before = settled_drops(&lab, "b1");
    let stream = Stream::start(&lab, "a1", "b1", v4("b1"), 80);
    stream.wait_lines(5, Duration::from_secs(10));
    apply(&lab, "db", DB_WIDER);
    apply(&lab, "unrelated", UNRELATED);
    lab.weftctl_ok(&["node", "label", "c2", "env=lab"]);
    let (sent, received) = stream.finish(Duration::from_secs(20));
    assert_eq!(
        (sent, received),
        (80, 80),
        "the a1 -> b1 stream lost lines across policy changes that allow it"
    );
    // No drop on b1 meanwhile.
    assert_eq!(
        settled_drops(&lab, "b1"),
        drops_before,
        "b1 dropped packets while only allowed traffic flowed across policy changes"
    );

    // --- A change that revokes the flow ends it. ---
    let stream = Stream::start(&lab, "a1", "b1", v4("b1"), 80);
    stream.wait_lines(5, Duration::from_secs(10));
    apply(&lab, "db", DB_REVOKED);
    let (_, received) = stream.finish(Duration::from_secs(8));
    assert!(
        (5..80).contains(&received),
        "the revoked a1 -> b1 stream should stop part way, got {received} of 80 lines"
    );
    assert!(
        !tcp_connects(&lab, "a1", v4("b1"), 5432, short),
        "a1 -> b1 TCP 5432 must be dropped after the revocation"
    );
    lab.wait_until(
        Duration::from_secs(5),
        "b1 to count the revoked stream's drops",
        || counted(&lab, "b1").drops() > drops_before,
    );
}

/// A slow TCP stream of numbered lines, one every 50 ms, from a node to a
/// receiver thread listening on TCP 5432 at the destination (in-order
/// check: each line must carry the next number).
struct Stream {
    writer: JoinHandle<usize>,
    reader: JoinHandle<usize>,
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Stream {
    fn start(lab: &Lab, from: &str, to: &str, dst: IpAddr, lines: usize) -> Stream {
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (r, s) = (received.clone(), stop.clone());
        let reader = in_ns(&lab.ns(to), move || {
            // The probe servers hold [::]:5432; this one binds the address.
            let l = TcpListener::bind((dst, 5432)).expect("bind the stream receiver");
            l.set_nonblocking(true).expect("nonblocking");
            let _ = tx.send(());
            let conn = loop {
                if s.load(Ordering::SeqCst) {
                    return 0;
                }
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            conn.set_nonblocking(false).expect("blocking");
            conn.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            let mut n = 0;
            while !s.load(Ordering::SeqCst) {
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) if line.ends_with('\n') => {
                        assert_eq!(line.trim(), format!("line {n}"), "out of order");
                        n += 1;
                        r.store(n, Ordering::SeqCst);
                        line.clear();
                    }
                    Ok(_) | Err(_) => {}
                }
            }
            n
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the stream receiver to bind");
        let s = stop.clone();
        let writer = in_ns(&lab.ns(from), move || {
            let Ok(mut conn) =
                TcpStream::connect_timeout(&SocketAddr::new(dst, 5432), Duration::from_secs(3))
            else {
                return 0;
            };
            let mut sent = 0;
            for i in 0..lines {
                if s.load(Ordering::SeqCst)
                    || conn.write_all(format!("line {i}\n").as_bytes()).is_err()
                {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            sent
        });
        Stream {
            writer,
            reader,
            received,
            stop,
        }
    }

    fn wait_lines(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.received.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "the stream did not start: {} lines in {timeout:?}",
                self.received.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the writer, then for the receiver to have everything the
    /// writer sent (or `timeout`); returns (sent, received).
    fn finish(self, timeout: Duration) -> (usize, usize) {
        let deadline = Instant::now() + timeout;
        while !self.writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.writer.is_finished() {
            self.stop.store(true, Ordering::SeqCst);
        }
        let sent = self.writer.join().expect("writer");
        while self.received.load(Ordering::SeqCst) < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::SeqCst);
        let received = self.reader.join().expect("reader");
        (sent, received)
    }
}
