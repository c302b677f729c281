//! A small WireGuard network for dataplane tests: a hub namespace holding
//! a bridge, spoke namespaces joined to it by veth pairs, and a
//! `weft-agent wg` daemon in each, configured over the UAPI with `wg set`
//! (hub ↔ every spoke). Underlay 198.18.0.0/24 on the bridge (hub .1,
//! spoke i .10+i), overlay 100.64.0.1 / fd00::1 for the hub and
//! 100.64.1.(10+i) / fd00::1:(10+i) for spoke i. No default routes.
//!
//! Dropping a [`WgNet`] stops the daemons it started (by PID) and deletes
//! its namespaces and UAPI sockets; it never panics.

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;

use crate::{bins, netns, process};

/// Directory of UAPI sockets (shared by all namespaces).
const UAPI_DIR: &str = "/var/run/wireguard";
/// WireGuard UDP port of every node.
pub const WG_PORT: u16 = 51820;

/// One namespace running a tunnel.
#[derive(Debug, Clone)]
pub struct WgNode {
    pub ns: String,
    pub ifname: String,
    pub underlay: Ipv4Addr,
    pub overlay4: Ipv4Addr,
    pub overlay6: Ipv6Addr,
    pub public_key: String,
    key_file: PathBuf,
}

/// A hub and its spokes; see the module docs.
#[derive(Debug)]
pub struct WgNet {
    pub hub: WgNode,
    pub spokes: Vec<WgNode>,
    daemons: Vec<(Child, process::ProcRecord)>,
    dir: PathBuf,
    mtu: u16,
}

impl WgNet {
    /// Builds the namespaces and links, starts the daemons and configures
    /// hub and spokes as peers of each other; returns once every spoke
    /// answers a ping from the hub over the tunnel.
    pub fn star(spokes: usize, mtu: u16) -> Result<WgNet> {
        if spokes == 0 || spokes > 200 {
            bail!("1..=200 spokes");
        }
        let id = format!("{:04x}", rand::random::<u16>());
        let dir = std::env::temp_dir().join(format!("weft-wgnet-{id}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let hub = node(&dir, &format!("wn{id}h"), Ipv4Addr::new(198, 18, 0, 1), 0)?;
        let spoke_nodes = (0..spokes)
            .map(|i| {
                let n = u8::try_from(10 + i).unwrap_or(u8::MAX);
                node(
                    &dir,
                    &format!("wn{id}s{i}"),
                    Ipv4Addr::new(198, 18, 0, n),
                    n,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut net = WgNet {
            hub,
            spokes: spoke_nodes,
            daemons: Vec::new(),
            dir,
            mtu,
        };
        // From here on, Drop cleans up whatever exists.
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> Result<()> {
        let hub = self.hub.clone();
        netns::add_ns(&hub.ns)?;
        netns::ip(&hub.ns, "link add br0 type bridge")?;
        netns::ip(&hub.ns, &format!("addr add {}/24 dev br0", hub.underlay))?;
        netns::ip(&hub.ns, "link set br0 up")?;
        for (i, s) in self.spokes.clone().iter().enumerate() {
            netns::add_ns(&s.ns)?;
            netns::veth(&hub.ns, &format!("v{i}"), &s.ns, "ul0")?;
            netns::ip(&hub.ns, &format!("link set v{i} master br0 up"))?;
            netns::ip(&s.ns, &format!("addr add {}/24 dev ul0", s.underlay))?;
            netns::ip(&s.ns, "link set ul0 up")?;
        }
        let agent = bins::path("weft-agent")?;
        for n in std::iter::once(&hub).chain(self.spokes.clone().iter()) {
            let (child, rec) = process::spawn_in_ns(
                &n.ifname,
                &n.ns,
                &agent,
                &["wg".to_owned(), n.ifname.clone()],
                &[("RUST_LOG".to_owned(), "info".to_owned())],
                &self.dir,
            )?;
            self.daemons.push((child, rec));
        }
        for n in std::iter::once(&hub).chain(self.spokes.clone().iter()) {
            let sock = PathBuf::from(format!("{UAPI_DIR}/{}.sock", n.ifname));
            crate::try_wait_until(
                Duration::from_secs(20),
                &format!("UAPI socket {}", sock.display()),
                || sock.exists(),
            )?;
            self.set_interface(n)?;
        }
        for s in &self.spokes {
            self.wg_set(
                &hub,
                &[
                    "peer",
                    &s.public_key,
                    "endpoint",
                    &format!("{}:{WG_PORT}", s.underlay),
                    "allowed-ips",
                    &format!("{}/32,{}/128", s.overlay4, s.overlay6),
                ],
            )?;
            self.wg_set(
                s,
                &[
                    "peer",
                    &hub.public_key,
                    "endpoint",
                    &format!("{}:{WG_PORT}", hub.underlay),
                    "allowed-ips",
                    "100.64.0.0/10,fd00::/8",
                ],
            )?;
        }
        for s in &self.spokes {
            self.wait_ping(&hub, &s.overlay4.to_string())?;
        }
        Ok(())
    }

    /// Key, port, MTU, addresses and routes of one node's interface.
    fn set_interface(&self, n: &WgNode) -> Result<()> {
        self.wg_set(
            n,
            &[
                "listen-port",
                &WG_PORT.to_string(),
                "private-key",
                &n.key_file.to_string_lossy(),
            ],
        )?;
        netns::ip(&n.ns, &format!("link set {} mtu {} up", n.ifname, self.mtu))?;
        netns::ip(
            &n.ns,
            &format!("addr add {}/32 dev {}", n.overlay4, n.ifname),
        )?;
        netns::ip(
            &n.ns,
            &format!("addr add {}/128 dev {} nodad", n.overlay6, n.ifname),
        )?;
        netns::ip(&n.ns, &format!("route add 100.64.0.0/10 dev {}", n.ifname))?;
        netns::ip(&n.ns, &format!("route add fd00::/8 dev {}", n.ifname))?;
        Ok(())
    }

    /// `wg set IF args...` inside the node's namespace.
    pub fn wg_set(&self, n: &WgNode, args: &[&str]) -> Result<()> {
        let mut full = vec!["wg", "set", n.ifname.as_str()];
        full.extend_from_slice(args);
        let out = netns::exec_in(&n.ns, &full)?;
        if !out.status.success() {
            bail!(
                "wg set {} in {}: {}",
                n.ifname,
                n.ns,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Sets the MTU of every tunnel interface.
    pub fn set_mtu(&mut self, mtu: u16) -> Result<()> {
        for n in std::iter::once(&self.hub).chain(self.spokes.iter()) {
            netns::ip(&n.ns, &format!("link set {} mtu {mtu}", n.ifname))?;
        }
        self.mtu = mtu;
        Ok(())
    }

    /// Runs a shell command inside a node's namespace.
    pub fn sh(&self, n: &WgNode, script: &str) -> Result<Output> {
        netns::exec_in(&n.ns, &["sh", "-c", script])
    }

    /// One ping (`extra` are more ping options) from `n` to `dst`.
    pub fn ping(&self, n: &WgNode, dst: &str, extra: &[&str]) -> Result<bool> {
        let mut args = vec!["ping", "-n", "-q", "-c", "1", "-W", "1"];
        args.extend_from_slice(extra);
        args.push(dst);
        Ok(netns::exec_in(&n.ns, &args)?.status.success())
    }

    /// Waits (up to 20 s) until `n` gets an answer from `dst`.
    pub fn wait_ping(&self, n: &WgNode, dst: &str) -> Result<()> {
        crate::try_wait_until(
            Duration::from_secs(20),
            &format!("ping {} -> {dst}", n.ns),
            || self.ping(n, dst, &[]).unwrap_or(false),
        )
    }

    /// `wg show IF dump` peer lines: public key → (rx, tx, handshake).
    pub fn peer_stats(&self, n: &WgNode) -> Result<Vec<(String, u64, u64, u64)>> {
        let out = netns::exec_in(&n.ns, &["wg", "show", &n.ifname, "dump"])?;
        if !out.status.success() {
            bail!("wg show {} dump failed", n.ifname);
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut peers = Vec::new();
        for line in text.lines().skip(1) {
            // public-key psk endpoint allowed-ips handshake rx tx keepalive
            let f: Vec<&str> = line.split('\t').collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if let Some(key) = f.first() {
                peers.push(((*key).to_owned(), num(5), num(6), num(4)));
            }
        }
        Ok(peers)
    }

    /// The log of a node's daemon (for failure messages).
    pub fn log(&self, n: &WgNode) -> String {
        self.daemons
            .iter()
            .find(|(_, r)| r.key == n.ifname)
            .map(|(_, r)| process::tail(&r.stderr, 30))
            .unwrap_or_default()
    }

    /// Whether every daemon is still running.
    pub fn daemons_alive(&mut self) -> bool {
        self.daemons
            .iter_mut()
            .all(|(c, _)| matches!(c.try_wait(), Ok(None)))
    }

    /// A scratch directory removed with the network.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for WgNet {
    fn drop(&mut self) {
        for (child, rec) in &mut self.daemons {
            let _ = process::stop(rec, Some(child), Signal::SIGTERM, Duration::from_secs(5));
            if std::thread::panicking() {
                eprintln!(
                    "---- {} ({}) ----\n{}",
                    rec.key,
                    rec.ns,
                    process::tail(&rec.stderr, 40)
                );
            }
        }
        for n in std::iter::once(&self.hub).chain(self.spokes.iter()) {
            let _ = netns::del_ns(&n.ns);
            let _ = fs::remove_file(format!("{UAPI_DIR}/{}.sock", n.ifname));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A node's names, addresses and fresh key pair (`n` = 0: the hub).
fn node(dir: &Path, name: &str, underlay: Ipv4Addr, n: u8) -> Result<WgNode> {
    let (private, public) = keypair()?;
    let key_file = dir.join(format!("{name}.key"));
    fs::write(&key_file, format!("{private}\n"))?;
    let (overlay4, overlay6) = if n == 0 {
        (Ipv4Addr::new(100, 64, 0, 1), "fd00::1".parse()?)
    } else {
        (
            Ipv4Addr::new(100, 64, 1, n),
            format!("fd00::1:{n}").parse()?,
        )
    };
    Ok(WgNode {
        ns: name.to_owned(),
        ifname: name.to_owned(),
        underlay,
        overlay4,
        overlay6,
        public_key: public,
        key_file,
    })
}

/// A WireGuard key pair made by `wg` (private, public), base64.
pub fn keypair() -> Result<(String, String)> {
    let private = netns::run("wg", ["genkey"])?;
    let private = String::from_utf8_lossy(&private.stdout).trim().to_owned();
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("echo '{private}' | wg pubkey")])
        .output()
        .context("running wg pubkey")?;
    if !out.status.success() {
        bail!("wg pubkey failed");
    }
    Ok((
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

/// Kills a helper process (by its PID, through its handle) when dropped.
#[derive(Debug)]
pub struct Helper(pub Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl WgNet {
    /// Starts `args` in a node's namespace in the background, bounded by
    /// `timeout(1)`.
    pub fn spawn(&self, n: &WgNode, secs: u32, args: &[&str]) -> Result<Helper> {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &n.ns, "timeout", &secs.to_string()])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {args:?} in {}", n.ns))?;
        Ok(Helper(child))
    }

    /// Sends the file `data` from `from` to `dst` (an overlay address of
    /// `to`) over one TCP connection and returns the bytes `to` received.
    pub fn tcp_transfer(
        &self,
        from: &WgNode,
        to: &WgNode,
        dst: &str,
        port: u16,
        data: &Path,
    ) -> Result<Vec<u8>> {
        let family = if dst.contains(':') { "-6" } else { "-4" };
        let out = self.dir.join(format!("recv-{}-{port}", to.ns));
        let listener = self.spawn(
            to,
            180,
            &[
                "sh",
                "-c",
                &format!("nc {family} -l {port} > {}", out.display()),
            ],
        )?;
        let mut listener = listener;
        crate::try_wait_until(
            Duration::from_secs(10),
            &format!("nc listening on port {port} in {}", to.ns),
            || {
                self.sh(to, &format!("ss -Hltn 'sport = :{port}' | grep -q ."))
                    .is_ok_and(|o| o.status.success())
            },
        )?;
        let sent = self.sh(
            from,
            &format!(
                "timeout 180 nc {family} -N {dst} {port} < {}",
                data.display()
            ),
        )?;
        if !sent.status.success() {
            bail!(
                "sending to {dst}:{port} failed: {}",
                String::from_utf8_lossy(&sent.stderr)
            );
        }
        let status = process::wait_child(&mut listener.0, Duration::from_secs(60))
            .context("receiver did not finish within 60 s after the sender")?;
        if !status.success() {
            bail!("receiver exited with {status}");
        }
        fs::read(&out).with_context(|| format!("reading {}", out.display()))
    }
}
