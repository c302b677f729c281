//! Privileged tests (root, network namespaces): `weft-agent wg` against
//! itself and against wireguard-go, configured with `wg set`, carrying
//! IPv4 and IPv6 pings. Underlay 198.18.0.0/30, overlay 100.64.0.1-2 and
//! fd00::1-2 only; every namespace is deleted when the test ends.

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
            let private = run(&["wg", "genkey"]);
            let out = output(&["wg", "pubkey"], Some(&private));
            assert!(out.status.success(), "wg pubkey failed");
            let key_file = dir.join(format!("{side}.key"));
            fs::write(&key_file, format!("{private}\n"))
                .unwrap_or_else(|e| panic!("writing key: {e}"));
            Host {
                ns: format!("wft{pid}{tag}{side}"),
                ifname: format!("wt{pid}{tag}{side}"),
                underlay,
                overlay4,
                overlay6,
                key_file,
                public_key: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
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

    /// Starts `cmd` inside `h`'s namespace, logging to a file.
    fn spawn(&mut self, side: char, cmd: &[&str]) {
        let h = if side == 'a' { &self.a } else { &self.b };
        let log = self.dir.join(format!("{side}.log"));
        let file = fs::File::create(&log).unwrap_or_else(|e| panic!("creating log: {e}"));
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap_or_else(|e| panic!("log fd: {e}")))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        self.daemons.push((child, log));
        let sock = PathBuf::from(format!("{UAPI_DIR}/{}.sock", h.ifname));
        wait_for(
            &format!("UAPI socket {}", sock.display()),
            Duration::from_secs(10),
            || sock.exists(),
        );
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
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            ifn,
            "listen-port",
            &PORT.to_string(),
            "private-key",
            &key,
            "peer",
            &peer.public_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ]);
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
        let dump = run(&[
            "ip", "netns", "exec", &h.ns, "wg", "show", &h.ifname, "dump",
        ]);
        dump.lines()
            .skip(1)
            .map(|l| l.split('\t').map(str::to_owned).collect::<Vec<_>>())
            .find(|f| f.first() == Some(&peer.public_key))
            .unwrap_or_else(|| {
                panic!(
                    "no peer line for {} in `wg show dump`:\n{dump}",
                    peer.public_key
                )
            })
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
        for (child, log) in &mut self.daemons {
            // Only our own children, by PID.
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                let text = fs::read_to_string(&*log).unwrap_or_default();
                eprintln!("---- {} ----\n{text}", log.display());
            }
        }
        for h in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", &h.ns])
                .stderr(Stdio::null())
                .status();
            let _ = fs::remove_file(format!("{UAPI_DIR}/{}.sock", h.ifname));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn weft_to_weft_ping_show_and_remove() {
    if !is_root() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let mut lab = Lab::new("w");
    lab.spawn('a', &[AGENT, "wg", &lab.a.ifname.clone()]);
    lab.spawn('b', &[AGENT, "wg", &lab.b.ifname.clone()]);
    lab.configure('a');
    lab.configure('b');

    lab.wait_ping('a', "100.64.0.2");
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
