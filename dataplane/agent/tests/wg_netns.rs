//! Privileged tests (root, network namespaces): `weft-agent wg` against
//! itself and against wireguard-go, configured with `wg set`, carrying
//! IPv4 and IPv6 pings, and three tunnels in a row relaying through the
//! middle one's kernel. Underlay 198.18.0.0/29, overlay 100.64.0.1-3 and
//! fd00::1-3 only; every namespace is deleted when the test ends.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_weft-agent");
const UAPI_DIR: &str = "/var/run/wireguard";
const PORT: u16 = 51820;

fn output(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing stdin of {args:?}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {args:?}: {e}"))
}

/// Runs a command that must succeed; returns its trimmed stdout.
fn run(args: &[&str]) -> String {
    let out = output(args, None);
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn succeeds(args: &[&str]) -> bool {
    output(args, None).status.success()
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(Duration::from_millis(100));
    }
}

fn is_root() -> bool {
    run(&["id", "-u"]) == "0" && Path::new("/dev/net/tun").exists()
}

/// A fresh WireGuard key pair: the private key written to
/// `<dir>/<name>.key`, and the public key.
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let private = run(&["wg", "genkey"]);
    let out = output(&["wg", "pubkey"], Some(&private));
    assert!(out.status.success(), "wg pubkey failed");
    let key_file = dir.join(format!("{name}.key"));
    fs::write(&key_file, format!("{private}\n")).unwrap_or_else(|e| panic!("writing key: {e}"));
    (
        key_file,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// Starts `cmd` in namespace `ns`, logging to `log`, and waits for the
/// UAPI socket of `ifname`.
fn spawn_daemon(ns: &str, ifname: &str, log: &Path, cmd: &[&str]) -> Child {
    let file = fs::File::create(log).unwrap_or_else(|e| panic!("creating log: {e}"));
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap_or_else(|e| panic!("log fd: {e}")))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let sock = PathBuf::from(format!("{UAPI_DIR}/{ifname}.sock"));
    wait_for(
        &format!("UAPI socket {}", sock.display()),
        Duration::from_secs(10),
        || sock.exists(),
    );
    child
}

/// `wg show IF dump` fields of the line of peer `public_key`.
fn dump_of(ns: &str, ifname: &str, public_key: &str) -> Vec<String> {
    let dump = run(&["ip", "netns", "exec", ns, "wg", "show", ifname, "dump"]);
    dump.lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_owned).collect::<Vec<_>>())
        .find(|f| f.first().map(String::as_str) == Some(public_key))
        .unwrap_or_else(|| panic!("no peer line for {public_key} in `wg show dump`:\n{dump}"))
}

/// Kills the daemons we started (by PID, printing their logs if the test
/// failed) and deletes the namespaces and UAPI sockets; never panics.
fn clean_up(daemons: &mut Vec<(Child, PathBuf)>, netns_and_ifnames: &[(&str, &str)], dir: &Path) {
    for (child, log) in daemons.iter_mut() {
        // Only our own children, by PID.
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            let text = fs::read_to_string(&*log).unwrap_or_default();
            eprintln!("---- {} ----\n{text}", log.display());
        }
    }
    daemons.clear();
    for (ns, ifname) in netns_and_ifnames {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_file(format!("{UAPI_DIR}/{ifname}.sock"));
    }
    let _ = fs::remove_dir_all(dir);
}

/// One side of the lab: a namespace, its interface and key pair.
struct Host {
    ns: String,
    ifname: String,
    underlay: &'static str,
    overlay4: &'static str,
    overlay6: &'static str,
    key_file: PathBuf,
    public_key: String,
}

/// Two namespaces joined by a veth; deletes them and stops the daemons it
/// started (by PID) on drop, without ever panicking.
struct Lab {
    a: Host,
    b: Host,
    daemons: Vec<(Child, PathBuf)>,
    dir: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("weft-wg-netns-{pid}-{tag}"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let host = |side: &str, underlay, overlay4, overlay6| {
            let (key_file, public_key) = keypair(&dir, side);
            Host {
                ns: format!("wft{pid}{tag}{side}"),
                ifname: format!("wt{pid}{tag}{side}"),
                underlay,
                overlay4,
                overlay6,
                key_file,
                public_key,
            }
        };
        let lab = Lab {
            a: host("a", "198.18.0.1", "100.64.0.1", "fd00::1"),
            b: host("b", "198.18.0.2", "100.64.0.2", "fd00::2"),
            daemons: Vec::new(),
            dir,
        };
        // From here on, Drop cleans up whatever exists.
        for h in [&lab.a, &lab.b] {
            run(&["ip", "netns", "add", &h.ns]);
            run(&["ip", "-n", &h.ns, "link", "set", "lo", "up"]);
        }
        run(&[
            "ip", "-n", &lab.a.ns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0",
            "netns", &lab.b.ns,
        ]);
        for h in [&lab.a, &lab.b] {
            run(&[
                "ip",
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/30", h.underlay),
                "dev",
                "ul0",
            ]);
            run(&["ip", "-n", &h.ns, "link", "set", "ul0", "up"]);
        }
        lab
    }

    /// A lab with `weft-agent wg [flags] IF` on both sides, configured as
    /// each other's peer, once a ping from a to b crosses.
    fn with_tunnels(tag: &str, flags: &[&str]) -> Lab {
        let mut lab = Lab::new(tag);
        for side in ['a', 'b'] {
            let ifname = lab.host(side).0.ifname.clone();
            let mut cmd = vec![AGENT, "wg"];
            cmd.extend_from_slice(flags);
            cmd.push(&ifname);
            lab.spawn(side, &cmd);
        }
        lab.configure('a');
        lab.configure('b');
        lab.wait_ping('a', "100.64.0.2");
        lab
    }

    /// Starts `cmd` inside `h`'s namespace, logging to a file.
    fn spawn(&mut self, side: char, cmd: &[&str]) {
        let h = if side == 'a' { &self.a } else { &self.b };
        let log = self.dir.join(format!("{side}.log"));
        let child = spawn_daemon(&h.ns, &h.ifname, &log, cmd);
        self.daemons.push((child, log));
    }

    fn host(&self, side: char) -> (&Host, &Host) {
        if side == 'a' {
            (&self.a, &self.b)
        } else {
            (&self.b, &self.a)
        }
    }

    /// Addresses, routes and `wg set` with the other side as the peer.
    fn configure(&self, side: char) {
        self.configure_with(side, true, None);
    }

    /// [`Lab::configure`], with or without the peer's endpoint and with a
    /// persistent keepalive.
    fn configure_with(&self, side: char, with_endpoint: bool, keepalive: Option<u16>) {
        let (h, peer) = self.host(side);
        let (ns, ifn) = (h.ns.as_str(), h.ifname.as_str());
        run(&["ip", "-n", ns, "link", "set", ifn, "up", "mtu", "1420"]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/32", h.overlay4),
            "dev",
            ifn,
        ]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/128", h.overlay6),
            "dev",
            ifn,
            "nodad",
        ]);
        run(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            &format!("{}/32", peer.overlay4),
            "dev",
            ifn,
        ]);
        run(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            &format!("{}/128", peer.overlay6),
            "dev",
            ifn,
        ]);
        let key = h.key_file.to_string_lossy();
        let endpoint = format!("{}:{PORT}", peer.underlay);
        let allowed = format!("{}/32,{}/128", peer.overlay4, peer.overlay6);
        let port = PORT.to_string();
        let keepalive = keepalive.map(|k| k.to_string());
        let mut cmd = vec![
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            ifn,
            "listen-port",
            &port,
            "private-key",
            &key,
            "peer",
            &peer.public_key,
            "allowed-ips",
            &allowed,
        ];
        if with_endpoint {
            cmd.extend(["endpoint", &endpoint]);
        }
        if let Some(k) = &keepalive {
            cmd.extend(["persistent-keepalive", k]);
        }
        run(&cmd);
    }

    fn ping(&self, from: char, to: &str, count: &str) -> bool {
        let (h, _) = self.host(from);
        succeeds(&[
            "ip", "netns", "exec", &h.ns, "ping", "-n", "-q", "-c", count, "-W", "1", to,
        ])
    }

    fn wait_ping(&self, from: char, to: &str) {
        wait_for(
            &format!("ping {from} -> {to}"),
            Duration::from_secs(20),
            || self.ping(from, to, "1"),
        );
    }

    /// `wg show IF dump` peer line fields for the other side.
    fn peer_dump(&self, side: char) -> Vec<String> {
        let (h, peer) = self.host(side);
        dump_of(&h.ns, &h.ifname, &peer.public_key)
    }

    /// Asserts the peer has a handshake, traffic both ways and the endpoint.
    fn assert_handshake_and_transfer(&self, side: char) {
        let (_, peer) = self.host(side);
        let f = self.peer_dump(side);
        // public-key psk endpoint allowed-ips latest-handshake rx tx keepalive
        assert_eq!(f.len(), 8, "unexpected dump line {f:?}");
        assert_eq!(
            f[2],
            format!("{}:{PORT}", peer.underlay),
            "endpoint in {f:?}"
        );
        assert!(
            f[3].contains(&format!("{}/32", peer.overlay4)),
            "allowed ips in {f:?}"
        );
        let num = |i: usize| {
            f[i].parse::<u64>()
                .unwrap_or_else(|_| panic!("field {i} of {f:?}"))
        };
        assert!(num(4) > 0, "no handshake reported: {f:?}");
        assert!(num(5) > 0 && num(6) > 0, "no transfer reported: {f:?}");
    }

    /// CPU each daemon used over `window`, in % of one CPU (utime + stime
    /// of all its threads, from /proc).
    fn daemons_cpu_percent(&self, window: Duration) -> Vec<f64> {
        let ticks = |pid: u32| -> u64 {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_else(|e| panic!("daemon {pid} gone: {e}"));
            // Fields after the command name: state is field 3, utime 14,
            // stime 15 (1-based), so 11 and 12 here.
            let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            f[11] + f[12]
        };
        let hz: f64 = run(&["getconf", "CLK_TCK"])
            .trim()
            .parse()
            .expect("CLK_TCK");
        let pids: Vec<u32> = self.daemons.iter().map(|(c, _)| c.id()).collect();
        let before: Vec<u64> = pids.iter().map(|p| ticks(*p)).collect();
        let start = Instant::now();
        sleep(window);
        let secs = start.elapsed().as_secs_f64();
        pids.iter()
            .zip(before)
            .map(|(p, b)| 100.0 * (ticks(*p) - b) as f64 / hz / secs)
            .collect()
    }

    /// Sends SIGTERM to every daemon we started and checks it exits 0 and
    /// removes its UAPI socket.
    fn stop_all_cleanly(&mut self) {
        for (child, log) in &mut self.daemons {
            run(&["kill", "-TERM", &child.id().to_string()]);
            let deadline = Instant::now() + Duration::from_secs(10);
            let status = loop {
                match child.try_wait() {
                    Ok(Some(s)) => break s,
                    Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(50)),
                    other => panic!("daemon {} did not exit on SIGTERM: {other:?}", child.id()),
                }
            };
            let log = fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "daemon exited with {status}; log:\n{log}");
        }
        self.daemons.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let hosts = [
            (self.a.ns.as_str(), self.a.ifname.as_str()),
            (self.b.ns.as_str(), self.b.ifname.as_str()),
        ];
        clean_up(&mut self.daemons, &hosts, &self.dir);
    }
}

#[test]
fn weft_to_weft_ping_show_and_remove() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let mut lab = Lab::with_tunnels("w", &[]);
    lab.wait_ping('b', "100.64.0.1");
    lab.wait_ping('a', "fd00::2");
    lab.wait_ping('b', "fd00::1");
    lab.assert_handshake_and_transfer('a');
    lab.assert_handshake_and_transfer('b');
    let conf = run(&[
        "ip",
        "netns",
        "exec",
        &lab.a.ns,
        "wg",
        "showconf",
        &lab.a.ifname,
    ]);
    assert!(
        conf.contains(&lab.b.public_key),
        "showconf lacks the peer:\n{conf}"
    );

    let (ns, ifn, peer) = (
        lab.a.ns.clone(),
        lab.a.ifname.clone(),
        lab.b.public_key.clone(),
    );
    run(&[
        "ip", "netns", "exec", &ns, "wg", "set", &ifn, "peer", &peer, "remove",
    ]);
    assert_eq!(
        run(&["ip", "netns", "exec", &ns, "wg", "show", &ifn, "peers"]),
        ""
    );
    assert!(
        !lab.ping('a', "100.64.0.2", "2"),
        "ping a -> b works after removing b"
    );
    assert!(
        !lab.ping('b', "100.64.0.1", "2"),
        "ping b -> a works after a removed b"
    );
    assert!(
        !lab.ping('b', "fd00::1", "2"),
        "ping6 b -> a works after a removed b"
    );

    let socks = [lab.a.ifname.clone(), lab.b.ifname.clone()];
    lab.stop_all_cleanly();
    for ifn in socks {
        let sock = format!("{UAPI_DIR}/{ifn}.sock");
        assert!(
            !Path::new(&sock).exists(),
            "{sock} left behind after SIGTERM"
        );
    }
}

/// `--busy-poll`: the loop that never sleeps still handshakes, carries
/// both families, answers `wg` (commands), runs its timers (keepalives) and
/// stops on SIGTERM.
#[test]
fn busy_polling_tunnels_carry_traffic_and_stop_cleanly() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let mut lab = Lab::with_tunnels("p", &["--busy-poll"]);
    lab.wait_ping('b', "fd00::1");
    lab.assert_handshake_and_transfer('a');
    lab.assert_handshake_and_transfer('b');
    assert!(lab.ping('a', "100.64.0.2", "2"), "ping a -> b");
    // Timers run: a persistent keepalive set now is sent within its
    // interval (b's received bytes grow without any traffic).
    let (ns, ifn, peer) = (
        lab.a.ns.clone(),
        lab.a.ifname.clone(),
        lab.b.public_key.clone(),
    );
    run(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "wg",
        "set",
        &ifn,
        "peer",
        &peer,
        "persistent-keepalive",
        "1",
    ]);
    let rx = |lab: &Lab| -> u64 {
        let out = run(&[
            "ip",
            "netns",
            "exec",
            &lab.b.ns,
            "wg",
            "show",
            &lab.b.ifname,
            "transfer",
        ]);
        out.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = rx(&lab);
    wait_for(
        "a keepalive from a busy-polling tunnel",
        Duration::from_secs(5),
        || rx(&lab) > before,
    );
    // It polls even when idle (a keepalive a second is all the traffic).
    let cpu = lab.daemons_cpu_percent(Duration::from_secs(1));
    assert!(
        cpu.iter().all(|p| *p > 40.0),
        "an always-polling tunnel should keep a CPU busy: {cpu:?} %"
    );
    lab.stop_all_cleanly();
}

/// `--busy-poll=LINGER`: the loop polls while packets keep coming (a ping
/// train 10 ms apart, inside the 50 ms linger time) and sleeps once they
/// stop, so an idle tunnel costs no CPU.
#[test]
fn lingering_poll_spins_while_packets_flow_and_sleeps_when_idle() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let mut lab = Lab::with_tunnels("l", &["--busy-poll=50ms"]);
    lab.wait_ping('b', "fd00::1");
    lab.assert_handshake_and_transfer('a');
    lab.assert_handshake_and_transfer('b');
    let idle_check = |lab: &Lab, when: &str| {
        sleep(Duration::from_millis(200));
        let cpu = lab.daemons_cpu_percent(Duration::from_secs(1));
        assert!(
            cpu.iter().all(|p| *p < 10.0),
            "{when}: an idle tunnel should sleep: {cpu:?} % CPU"
        );
    };
    idle_check(&lab, "after the first pings");
    let mut train = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.a.ns,
            "ping",
            "-n",
            "-q",
            "-i",
            "0.01",
            "-c",
            "200",
            "-W",
            "1",
            "100.64.0.2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ping");
    sleep(Duration::from_millis(300));
    let cpu = lab.daemons_cpu_percent(Duration::from_secs(1));
    let status = train.wait().expect("waiting for ping");
    assert!(status.success(), "the ping train lost every reply");
    assert!(
        cpu.iter().all(|p| *p > 40.0),
        "both ends should poll between pings 10 ms apart: {cpu:?} % CPU"
    );
    idle_check(&lab, "after the ping train");
    lab.stop_all_cleanly();
}

/// `wg set IF fwmark M` marks the tunnel's own UDP packets (SO_MARK), for
/// policy routing; `fwmark 0` removes the mark. An nftables rule in a's
/// namespace counts marked WireGuard datagrams.
#[test]
fn fwmark_marks_the_tunnels_packets() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let mut lab = Lab::with_tunnels("m", &[]);
    let ns = lab.a.ns.clone();
    let ifn = lab.a.ifname.clone();
    run(&[
        "ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "weftmark",
    ]);
    run(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "nft",
        "add",
        "chain",
        "inet",
        "weftmark",
        "out",
        "{ type filter hook output priority 0 ; }",
    ]);
    run(&[
        "ip", "netns", "exec", &ns, "nft", "add", "rule", "inet", "weftmark", "out", "meta",
        "mark", "0x51", "udp", "dport", "51820", "counter",
    ]);
    let marked = || -> u64 {
        let out = run(&[
            "ip", "netns", "exec", &ns, "nft", "list", "chain", "inet", "weftmark", "out",
        ]);
        let at = out.find("packets ").expect("a counter in the chain");
        out[at + 8..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("packet count")
    };
    assert!(lab.ping('a', "100.64.0.2", "2"));
    assert_eq!(marked(), 0, "packets marked before any fwmark was set");
    run(&[
        "ip", "netns", "exec", &ns, "wg", "set", &ifn, "fwmark", "0x51",
    ]);
    assert_eq!(
        run(&["ip", "netns", "exec", &ns, "wg", "show", &ifn, "fwmark"]),
        "0x51"
    );
    assert!(lab.ping('a', "100.64.0.2", "3"));
    let after = marked();
    assert!(after >= 3, "{after} marked datagrams for 3 pings");
    run(&["ip", "netns", "exec", &ns, "wg", "set", &ifn, "fwmark", "0"]);
    assert!(lab.ping('a', "100.64.0.2", "3"));
    assert_eq!(marked(), after, "packets still marked after fwmark 0");
    lab.stop_all_cleanly();
}

#[test]
fn weft_and_wireguard_go_interoperate() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let wggo = "/usr/bin/wireguard-go";
    assert!(
        Path::new(wggo).exists(),
        "wireguard-go is not installed (apt-get install wireguard-go)"
    );
    let mut lab = Lab::new("g");
    lab.spawn('a', &[AGENT, "wg", &lab.a.ifname.clone()]);
    lab.spawn(
        'b',
        &[
            "env",
            "WG_PROCESS_FOREGROUND=1",
            wggo,
            "-f",
            &lab.b.ifname.clone(),
        ],
    );
    lab.configure('a');
    lab.configure('b');

    lab.wait_ping('a', "100.64.0.2");
    lab.wait_ping('b', "100.64.0.1");
    lab.wait_ping('b', "fd00::1");
    lab.wait_ping('a', "fd00::2");
    lab.assert_handshake_and_transfer('a');
    lab.assert_handshake_and_transfer('b');
}

#[test]
fn second_daemon_on_the_same_interface_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let mut lab = Lab::new("d");
    let ifn = lab.a.ifname.clone();
    lab.spawn('a', &[AGENT, "wg", &ifn]);
    let out = output(&["ip", "netns", "exec", &lab.b.ns, AGENT, "wg", &ifn], None);
    assert!(!out.status.success(), "a second daemon for {ifn} started");
    assert!(
        Path::new(&format!("{UAPI_DIR}/{ifn}.sock")).exists(),
        "the second daemon removed the first one's socket"
    );
}

#[test]
fn persistent_keepalive_opens_the_path_before_any_traffic() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let mut lab = Lab::new("k");
    lab.spawn('a', &[AGENT, "wg", &lab.a.ifname.clone()]);
    lab.spawn('b', &[AGENT, "wg", &lab.b.ifname.clone()]);
    // b does not know a's endpoint: only a packet from a can tell it. a
    // keeps the path open every 120 s, and must start at once, as
    // WireGuard does, not after the first interval.
    lab.configure_with('b', false, None);
    lab.configure_with('a', true, Some(120));
    let want = format!("{}:{PORT}", lab.a.underlay);
    wait_for(
        "b to learn a's endpoint without traffic",
        Duration::from_secs(10),
        || {
            let f = lab.peer_dump('b');
            f[2] == want && f[4] != "0"
        },
    );
    // And the path works from b, which was never told where a is.
    lab.wait_ping('b', "100.64.0.1");
}

/// One node of [`Chain`].
struct ChainNode {
    ns: String,
    ifname: String,
    overlay4: &'static str,
    overlay6: &'static str,
    key_file: PathBuf,
    public_key: String,
}

/// Three namespaces in a row, a — g — b, on two veths (a 198.18.0.1/30 —
/// 198.18.0.2/30 g 198.18.0.5/30 — 198.18.0.6/30 b), each running
/// `weft-agent wg`. a and b peer only with g; g forwards between them
/// through its kernel (TUN in, TUN out). Cleans up like [`Lab`].
struct Chain {
    a: ChainNode,
    g: ChainNode,
    b: ChainNode,
    daemons: Vec<(Child, PathBuf)>,
    dir: PathBuf,
}

impl Chain {
    fn new(tag: &str) -> Chain {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("weft-wg-netns-{pid}-{tag}"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let node = |side: &str, overlay4, overlay6| {
            let (key_file, public_key) = keypair(&dir, side);
            ChainNode {
                ns: format!("wft{pid}{tag}{side}"),
                ifname: format!("wt{pid}{tag}{side}"),
                overlay4,
                overlay6,
                key_file,
                public_key,
            }
        };
        let chain = Chain {
            a: node("a", "100.64.0.1", "fd00::1"),
            g: node("g", "100.64.0.3", "fd00::3"),
            b: node("b", "100.64.0.2", "fd00::2"),
            daemons: Vec::new(),
            dir,
        };
        // From here on, Drop cleans up whatever exists.
        for n in [&chain.a, &chain.g, &chain.b] {
            run(&["ip", "netns", "add", &n.ns]);
            run(&["ip", "-n", &n.ns, "link", "set", "lo", "up"]);
        }
        let links = [
            (
                &chain.a,
                "ul0",
                "198.18.0.1/30",
                &chain.g,
                "ula",
                "198.18.0.2/30",
            ),
            (
                &chain.g,
                "ulb",
                "198.18.0.5/30",
                &chain.b,
                "ul0",
                "198.18.0.6/30",
            ),
        ];
        for (x, xif, xaddr, y, yif, yaddr) in links {
            run(&[
                "ip", "-n", &x.ns, "link", "add", xif, "type", "veth", "peer", "name", yif,
                "netns", &y.ns,
            ]);
            for (n, ifn, addr) in [(x, xif, xaddr), (y, yif, yaddr)] {
                run(&["ip", "-n", &n.ns, "addr", "add", addr, "dev", ifn]);
                run(&["ip", "-n", &n.ns, "link", "set", ifn, "up"]);
            }
        }
        chain
    }

    fn start(&mut self) {
        for n in [&self.a, &self.g, &self.b] {
            let log = self.dir.join(format!("{}.log", n.ifname));
            let child = spawn_daemon(&n.ns, &n.ifname, &log, &[AGENT, "wg", &n.ifname]);
            self.daemons.push((child, log));
        }
    }

    /// Addresses, kernel routes into the tunnel for `routes`, and `wg set`
    /// with `peers`: (peer, its endpoint, its allowed IPs).
    fn configure(&self, n: &ChainNode, routes: &[&str], peers: &[(&ChainNode, &str, &[&str])]) {
        let (ns, ifn) = (n.ns.as_str(), n.ifname.as_str());
        run(&["ip", "-n", ns, "link", "set", ifn, "up", "mtu", "1420"]);
        let v4 = format!("{}/32", n.overlay4);
        run(&["ip", "-n", ns, "addr", "add", &v4, "dev", ifn]);
        let v6 = format!("{}/128", n.overlay6);
        run(&["ip", "-n", ns, "addr", "add", &v6, "dev", ifn, "nodad"]);
        for r in routes {
            run(&["ip", "-n", ns, "route", "add", r, "dev", ifn]);
        }
        let key = n.key_file.to_string_lossy();
        let port = PORT.to_string();
        let allowed: Vec<String> = peers.iter().map(|(_, _, a)| a.join(",")).collect();
        let mut cmd = vec![
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            ifn,
            "listen-port",
            &port,
            "private-key",
            &key,
        ];
        for ((peer, endpoint, _), allowed) in peers.iter().zip(&allowed) {
            cmd.extend([
                "peer",
                peer.public_key.as_str(),
                "endpoint",
                endpoint,
                "allowed-ips",
                allowed,
            ]);
        }
        run(&cmd);
    }

    fn ping(&self, from: &ChainNode, to: &str, count: &str) -> bool {
        succeeds(&[
            "ip", "netns", "exec", &from.ns, "ping", "-n", "-q", "-c", count, "-W", "1", to,
        ])
    }

    fn wait_ping(&self, from: &ChainNode, to: &str) {
        wait_for(
            &format!("ping {} -> {to}", from.ifname),
            Duration::from_secs(20),
            || self.ping(from, to, "1"),
        );
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let nodes = [
            (self.a.ns.as_str(), self.a.ifname.as_str()),
            (self.g.ns.as_str(), self.g.ifname.as_str()),
            (self.b.ns.as_str(), self.b.ifname.as_str()),
        ];
        clean_up(&mut self.daemons, &nodes, &self.dir);
    }
}

#[test]
fn a_gateway_relays_between_its_peers_through_its_kernel() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let mut chain = Chain::new("r");
    chain.start();
    let (a, g, b) = (&chain.a, &chain.g, &chain.b);
    // a and b route each other's addresses to g, and so accept them from g.
    chain.configure(
        a,
        &[
            "100.64.0.2/32",
            "100.64.0.3/32",
            "fd00::2/128",
            "fd00::3/128",
        ],
        &[(
            g,
            "198.18.0.2:51820",
            &[
                "100.64.0.3/32",
                "fd00::3/128",
                "100.64.0.2/32",
                "fd00::2/128",
            ],
        )],
    );
    chain.configure(
        b,
        &[
            "100.64.0.1/32",
            "100.64.0.3/32",
            "fd00::1/128",
            "fd00::3/128",
        ],
        &[(
            g,
            "198.18.0.5:51820",
            &[
                "100.64.0.3/32",
                "fd00::3/128",
                "100.64.0.1/32",
                "fd00::1/128",
            ],
        )],
    );
    chain.configure(
        g,
        &[
            "100.64.0.1/32",
            "100.64.0.2/32",
            "fd00::1/128",
            "fd00::2/128",
        ],
        &[
            (a, "198.18.0.1:51820", &["100.64.0.1/32", "fd00::1/128"]),
            (b, "198.18.0.6:51820", &["100.64.0.2/32", "fd00::2/128"]),
        ],
    );
    chain.wait_ping(a, "100.64.0.3");
    chain.wait_ping(b, "100.64.0.3");
    // A new namespace does not forward: g drops what is not for itself.
    assert!(
        !chain.ping(a, "100.64.0.2", "2"),
        "a reached b through g with forwarding off"
    );
    run(&[
        "ip",
        "netns",
        "exec",
        &g.ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    chain.wait_ping(a, "100.64.0.2");
    chain.wait_ping(b, "100.64.0.1");
    chain.wait_ping(a, "fd00::2");
    chain.wait_ping(b, "fd00::1");
    // a and b only ever talked to g.
    for (n, peer) in [(a, g), (b, g)] {
        let out = run(&[
            "ip", "netns", "exec", &n.ns, "wg", "show", &n.ifname, "peers",
        ]);
        assert_eq!(out, peer.public_key, "peers of {}", n.ifname);
    }
    // g's tunnel carried the relayed packets both ways.
    for peer in [a, b] {
        let f = dump_of(&g.ns, &g.ifname, &peer.public_key);
        let num = |i: usize| f[i].parse::<u64>().unwrap_or(0);
        assert!(
            num(5) > 0 && num(6) > 0,
            "no transfer with {}: {f:?}",
            peer.ifname
        );
    }
}
