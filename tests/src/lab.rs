//! The lab: namespaces wired as TESTING.md's "distributed cloud", a
//! controller, and one agent per node, torn down when the `Lab` drops.
//!
//! ```text
//!                  <P>-wan  (router; 198.18.<i>.1 towards site i, 198.18.100.1 towards ctl)
//!        /            |              \                 \
//!   <P>-a (router)  <P>-b          <P>-c              <P>-ctl  198.18.100.2:7443
//!   wan0 198.18.1.2  ...            ...                (weft-controller)
//!   br0  198.19.1.1/24
//!     |        \
//!   <P>-a1      <P>-a2     eth0 198.19.1.11/24, 198.19.1.12/24; weft-agent
//! ```
//!
//! Nodes route 198.18.0.0/16 and 198.19.0.0/16 via their site router, never
//! a default route. WAN latency: site i's uplink gets `delay_ms(i)` one way
//! (default 5/10/15 ms), so traffic between sites i and j takes
//! `delay(i) + delay(j)` each way. The delay is added by a userspace delay
//! line in the WAN router (`weft lab wan-delay`, see `wan_delay.rs`), not by
//! netem, which many kernels (this project's CI machines among them) lack:
//! the WAN router sends packets for site LANs (198.19.0.0/16) through a TUN
//! device owned by the delay line, which writes them back after the delay;
//! a policy rule routes packets coming out of it normally.
//!
//! Variations: sites can have different node counts
//! ([`LabBuilder::site_nodes`]); a NAT site ([`LabBuilder::nat_sites`])
//! hides its LAN behind its router (nftables masquerade out of `wan0`, table
//! `weft_lab`; the WAN router has no route to that LAN, so its nodes can
//! reach out but nothing outside can reach them first; Linux masquerade
//! keeps a node's source port when it can, so one LAN socket has the same
//! public mapping towards every destination), or behind a symmetric NAT
//! ([`LabBuilder::symmetric_nat_sites`], `masquerade fully-random`: a new
//! random public port per destination); and the WAN path
//! between two sites can be cut while both keep their uplinks
//! ([`Lab::cut_pair`], blackhole rules at pref 50 in the WAN router, before
//! the delay line's rules at pref 100 and 200).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::bins;
use crate::netns;
use crate::process::{self, ProcRecord};

/// Controller's underlay address (in `<P>-ctl`).
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
/// TUN device of the WAN delay line, in the WAN router namespace.
pub const WAN_DELAY_DEV: &str = "wdly";
/// Priority of the WAN router's rules that cut a site pair: before the
/// delay line's (100 and 200), so cut packets never enter it.
pub const CUT_PREF: u32 = 50;
/// Controller's gRPC port.
pub const CONTROLLER_PORT: u16 = 7443;
/// WireGuard listen port of every agent.
pub const AGENT_PORT: u16 = 51820;
/// Where lab state files live (`lab.json` for `weft lab up`, `test-<P>.json`
/// for labs owned by a test process).
pub const STATE_ROOT: &str = "/run/weft-lab";

/// One site as recorded in the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteRec {
    /// Site name (`a`); also the router namespace suffix.
    pub name: String,
    /// 1-based index `i`: uplink 198.18.i.0/24, LAN 198.19.i.0/24.
    pub index: u8,
    /// One-way WAN delay of the uplink in ms (0 = none).
    pub delay_ms: u32,
    /// Whether the site's router masquerades its LAN (the WAN router has no
    /// route to it).
    #[serde(default)]
    pub nat: bool,
    /// Whether that NAT is symmetric (`masquerade fully-random`: a random
    /// public port per destination); implies `nat`.
    #[serde(default)]
    pub symmetric_nat: bool,
}

/// One node running (or meant to run) `weft-agent`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRec {
    /// Node name (`a1`).
    pub name: String,
    /// Site name.
    pub site: String,
    /// Namespace (`<P>-a1`).
    pub ns: String,
    /// LAN address.
    pub underlay: Ipv4Addr,
    /// TUN interface name (`wf<tag><name>`, unique host-wide because
    /// /var/run/wireguard is shared by all namespaces).
    pub iface: String,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// The join token of its first start.
    pub token: Option<String>,
    /// Whether the agent was started at least once (restarts pass no token).
    pub started: bool,
    /// Overlay addresses as the controller last listed them (so `weft lab
    /// status` works while the controller is down).
    #[serde(default)]
    pub overlay: Vec<String>,
    /// Extra `weft-agent` arguments (e.g. `--advertise`), for every start.
    #[serde(default)]
    pub extra_args: Vec<String>,
}

/// An extra host on a site's LAN without an agent (e.g. a wireguard-go peer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostRec {
    /// Host name (`x1`).
    pub name: String,
    /// Site name.
    pub site: String,
    /// Namespace (`<P>-x1`).
    pub ns: String,
    /// LAN address.
    pub underlay: Ipv4Addr,
}

/// Everything needed to find, inspect and tear down a lab, also from another
/// process (`weft lab status|down`). Serialized to the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Namespace prefix `<P>` (`w` + tag).
    pub prefix: String,
    /// 4 hex chars, used in interface names.
    pub tag: String,
    /// Directory with logs, controller data and agent state.
    pub dir: PathBuf,
    /// Process owning the lab (a test), if any: when it is gone, the lab is stale.
    pub owner: Option<(i32, u64)>,
    /// Namespaces created, in creation order.
    pub namespaces: Vec<String>,
    /// Sites.
    pub sites: Vec<SiteRec>,
    /// Nodes.
    pub nodes: Vec<NodeRec>,
    /// Extra hosts.
    pub hosts: Vec<HostRec>,
    /// Processes started (latest incarnation per key).
    pub procs: Vec<ProcRecord>,
    /// Whether WAN delays are in place (the delay line runs).
    pub netem: bool,
    /// The controller's `--ipv4-pool`, if not the default.
    #[serde(default)]
    pub ipv4_pool: Option<String>,
    /// Site pairs whose WAN path is cut ([`Lab::cut_pair`]), each sorted.
    #[serde(default)]
    pub cut_pairs: Vec<(String, String)>,
    /// Extra `weft-controller` arguments (e.g. `--cert-ttl 60s`).
    #[serde(default)]
    pub controller_args: Vec<String>,
}

/// Result of `ping -c N`.
#[derive(Debug, Clone, PartialEq)]
pub struct PingResult {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Replies received.
    pub received: u32,
    /// Loss in percent (100.0 when nothing was sent).
    pub loss: f64,
    /// Average RTT of the replies.
    pub rtt_avg: Option<Duration>,
}

impl PingResult {
    /// At least one reply.
    pub fn reachable(&self) -> bool {
        self.received > 0
    }

    /// Parses iputils `ping -q` output.
    pub fn parse(stdout: &str) -> PingResult {
        let mut r = PingResult {
            transmitted: 0,
            received: 0,
            loss: 100.0,
            rtt_avg: None,
        };
        for line in stdout.lines() {
            if line.contains("packets transmitted") {
                let nums: Vec<u32> = line
                    .split(',')
                    .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                    .collect();
                if let [tx, rx, ..] = nums[..] {
                    r.transmitted = tx;
                    r.received = rx;
                }
                if let Some(pct) = line
                    .split(',')
                    .find(|p| p.contains("packet loss"))
                    .and_then(|p| p.split_whitespace().next())
                    .and_then(|p| p.trim_end_matches('%').parse().ok())
                {
                    r.loss = pct;
                }
            } else if line.starts_with("rtt") || line.starts_with("round-trip") {
                // rtt min/avg/max/mdev = 0.045/0.061/0.078/0.013 ms
                r.rtt_avg = line
                    .split('=')
                    .nth(1)
                    .and_then(|v| v.trim().split('/').nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0));
            }
        }
        r
    }
}

/// A node as `weftctl -o json node get|list` shows it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// Controller-assigned ID (string or number).
    #[serde(default)]
    pub id: serde_json::Value,
    /// Name.
    pub name: String,
    /// Site.
    #[serde(default)]
    pub site: String,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Underlay endpoint.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Overlay addresses (IPv4 and IPv6).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Watch stream up.
    #[serde(default)]
    pub connected: bool,
    /// Last revision the agent applied.
    #[serde(default)]
    pub applied_revision: u64,
    /// Unix time of the agent's last report.
    #[serde(default)]
    pub last_report_unix: u64,
    /// Peers as the agent last reported them.
    #[serde(default)]
    pub peers: Vec<serde_json::Value>,
}

impl NodeInfo {
    /// Overlay IPv4 address.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.addrs().find_map(|a| match a {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
    }

    /// Overlay IPv6 address.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.addrs().find_map(|a| match a {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        })
    }

    fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        // Tolerate "100.64.0.1/10" as well as "100.64.0.1".
        self.addresses
            .iter()
            .filter_map(|a| a.split('/').next()?.parse().ok())
    }
}

/// Builds a [`Lab`].
#[derive(Debug, Clone)]
pub struct LabBuilder {
    sites: Vec<String>,
    nodes_per_site: usize,
    site_nodes: BTreeMap<String, usize>,
    nat_sites: BTreeSet<String>,
    symmetric_nat_sites: BTreeSet<String>,
    delays_ms: Vec<u32>,
    mesh_timeout: Duration,
    start_agents: bool,
    persistent: bool,
    topology_only: bool,
    ipv4_pool: Option<String>,
    /// Extra `weftctl token create` arguments per node (its grants).
    token_args: BTreeMap<String, Vec<String>>,
    controller_args: Vec<String>,
}

impl Default for LabBuilder {
    fn default() -> Self {
        LabBuilder {
            sites: vec!["a".into(), "b".into(), "c".into()],
            nodes_per_site: 2,
            site_nodes: BTreeMap::new(),
            nat_sites: BTreeSet::new(),
            symmetric_nat_sites: BTreeSet::new(),
            delays_ms: vec![5, 10, 15],
            mesh_timeout: Duration::from_secs(60),
            start_agents: true,
            persistent: false,
            topology_only: false,
            ipv4_pool: None,
            token_args: BTreeMap::new(),
            controller_args: Vec::new(),
        }
    }
}

impl LabBuilder {
    /// Site names (default a, b, c). Short lowercase names: node `a1` gets
    /// interface `wf<tag>a1`, so site name + node digit must fit 9 chars.
    pub fn sites(mut self, sites: &[&str]) -> Self {
        self.sites = sites.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Nodes per site (default 2): `<site>1`, `<site>2`, ... Sites given a
    /// count by [`LabBuilder::site_nodes`] keep theirs.
    pub fn nodes_per_site(mut self, n: usize) -> Self {
        self.nodes_per_site = n;
        self
    }

    /// Sites with their own node counts, in order, e.g.
    /// `&[("a", 2), ("b", 3), ("c", 2)]`: sets the site list (like
    /// [`LabBuilder::sites`]) and each site's count.
    pub fn site_nodes(mut self, sites: &[(&str, usize)]) -> Self {
        self.sites = sites.iter().map(|(s, _)| (*s).to_owned()).collect();
        self.site_nodes = sites.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect();
        self
    }

    /// Sites behind NAT: the site router masquerades its LAN out of `wan0`
    /// (nftables table `weft_lab` in the router namespace) and drops
    /// connections opened from outside (towards the LAN or the router
    /// itself), and the WAN router has no route to the LAN. Its nodes reach the WAN and the controller; nothing outside
    /// reaches them until they sent something. Their agents still announce
    /// their LAN address as endpoint. The masquerade keeps a LAN socket's
    /// source port when no other mapping holds it, and reuses a socket's
    /// mapping for new destinations: the same public address and port
    /// towards everyone (what UDP hole punching needs).
    pub fn nat_sites(mut self, sites: &[&str]) -> Self {
        self.nat_sites = sites.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Sites behind a symmetric NAT: like [`LabBuilder::nat_sites`], but the
    /// router masquerades with `fully-random`, so each destination sees a
    /// LAN socket at its own random public port (a peer cannot learn from
    /// a third party where to reach it: no hole punching).
    pub fn symmetric_nat_sites(mut self, sites: &[&str]) -> Self {
        self.symmetric_nat_sites = sites.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    fn nodes_of(&self, site: &str) -> usize {
        self.site_nodes
            .get(site)
            .copied()
            .unwrap_or(self.nodes_per_site)
    }

    /// One-way WAN delay per site uplink in ms, in site order (default 5, 10, 15;
    /// sites beyond the list get the last value; empty = no netem).
    pub fn wan_delays_ms(mut self, delays: &[u32]) -> Self {
        self.delays_ms = delays.to_vec();
        self
    }

    /// How long `build` waits for the WireGuard full mesh (default 60 s).
    pub fn mesh_timeout(mut self, t: Duration) -> Self {
        self.mesh_timeout = t;
        self
    }

    /// Whether `build` starts the agents (default true). When false, the
    /// namespaces, controller, sites and tokens are ready and agents can be
    /// started one by one with [`Lab::start_agent`].
    pub fn start_agents(mut self, yes: bool) -> Self {
        self.start_agents = yes;
        self
    }

    /// Only the namespaces and underlay: no controller, no agents (to check
    /// the topology itself, or to run something else in it).
    pub fn topology_only(mut self, yes: bool) -> Self {
        self.topology_only = yes;
        self
    }

    /// Extra `weft-controller` arguments, for every start (e.g.
    /// `["--cert-ttl", "60s"]`).
    pub fn controller_args(mut self, args: &[&str]) -> Self {
        self.controller_args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// The controller's IPv4 overlay pool (`weft-controller --ipv4-pool`),
    /// e.g. `100.64.0.0/16` to leave the rest of 100.64.0.0/10 for
    /// workload prefixes (default: the controller's, 100.64.0.0/10).
    pub fn ipv4_pool(mut self, pool: &str) -> Self {
        self.ipv4_pool = Some(pool.to_owned());
        self
    }

    /// What the join token of `node` grants: `labels` (`KEY=VALUE`, what
    /// its agent's `--label` may restate) and `allow_prefixes` (CIDRs its
    /// agent's `--advertise` is approved inside, with granted labels), as
    /// `weftctl token create --label ... --allow-prefix ...`.
    pub fn token_grants(mut self, node: &str, labels: &[&str], allow_prefixes: &[&str]) -> Self {
        let args = self.token_args.entry(node.to_owned()).or_default();
        for l in labels {
            args.extend(["--label".to_owned(), (*l).to_owned()]);
        }
        for p in allow_prefixes {
            args.extend(["--allow-prefix".to_owned(), (*p).to_owned()]);
        }
        self
    }

    /// A lab for `weft lab up`: state in /run/weft-lab/lab.json, directory
    /// /run/weft-lab/<P>/, processes outlive this process after [`Lab::detach`].
    pub fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// Builds the lab; panics (after tearing down what was built, and with the
    /// log tails in the message) when something fails. For tests.
    pub fn build(self) -> Lab {
        match self.try_build() {
            Ok(lab) => lab,
            Err(e) => panic!("building the lab failed: {e:#}"),
        }
    }

    /// Builds the lab, returning an error (with log tails) on failure.
    pub fn try_build(self) -> Result<Lab> {
        ensure!(
            crate::is_root(),
            "the lab needs root (network namespaces); run as root"
        );
        ensure!(!self.sites.is_empty(), "a lab needs at least one site");
        if let Some(both) = self
            .nat_sites
            .intersection(&self.symmetric_nat_sites)
            .next()
        {
            bail!("site {both:?} cannot be both a NAT site and a symmetric NAT site");
        }
        for nat in self.nat_sites.iter().chain(&self.symmetric_nat_sites) {
            ensure!(
                self.sites.contains(nat),
                "NAT site {nat:?} is not one of the sites {:?}",
                self.sites
            );
        }
        for stale in clean_stale_test_labs() {
            eprintln!("weft lab: tore down stale test lab {stale} (its test process died)");
        }
        if !self.topology_only {
            bins::require(&["weft-controller", "weft-agent", "weftctl"])?;
        }
        let (prefix, tag) = fresh_prefix()?;
        let dir = if self.persistent {
            PathBuf::from(STATE_ROOT).join(&prefix)
        } else {
            std::env::temp_dir().join(format!("weft-lab-{prefix}"))
        };
        fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        // Holds the controller's CA key and the agents' private keys.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
        let state_file = if self.persistent {
            PathBuf::from(STATE_ROOT).join("lab.json")
        } else {
            PathBuf::from(STATE_ROOT).join(format!("test-{prefix}.json"))
        };
        let owner = if self.persistent {
            None
        } else {
            let me = i32::try_from(std::process::id()).unwrap_or(0);
            Some((me, process::start_time(me).unwrap_or(0)))
        };
        let mut lab = Lab {
            st: LabState {
                prefix,
                tag,
                dir,
                owner,
                namespaces: Vec::new(),
                sites: Vec::new(),
                nodes: Vec::new(),
                hosts: Vec::new(),
                procs: Vec::new(),
                netem: false,
                ipv4_pool: self.ipv4_pool.clone(),
                controller_args: self.controller_args.clone(),
                cut_pairs: Vec::new(),
            },
            children: BTreeMap::new(),
            owned: true,
            state_file: Some(state_file),
        };
        // On error `lab` drops here and tears down what was built.
        match lab.populate(&self) {
            Ok(()) => Ok(lab),
            Err(e) => Err(e.context(format!(
                "lab {} (logs in {}):\n{}",
                lab.st.prefix,
                lab.st.dir.display(),
                lab.log_tails(30)
            ))),
        }
    }
}

/// A running lab. Dropping it kills its processes and deletes its namespaces
/// (unless it was detached with [`Lab::detach`] or attached without ownership).
#[derive(Debug)]
pub struct Lab {
    st: LabState,
    children: BTreeMap<String, Child>,
    owned: bool,
    state_file: Option<PathBuf>,
}

impl Lab {
    /// Starts describing a lab (3 sites × 2 nodes by default).
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    /// Re-opens a lab from its state (for `weft lab status|down`). With
    /// `owned`, dropping it tears the lab down.
    pub fn attach(state: LabState, state_file: PathBuf, owned: bool) -> Lab {
        Lab {
            st: state,
            children: BTreeMap::new(),
            owned,
            state_file: Some(state_file),
        }
    }

    /// Gives up ownership: processes keep running, namespaces stay, and the
    /// state file describes them.
    pub fn detach(mut self) -> LabState {
        self.owned = false;
        self.save_state();
        // Dropping the `Child` handles neither kills nor waits.
        self.children.clear();
        self.st.clone()
    }

    /// The lab's recorded state.
    pub fn state(&self) -> &LabState {
        &self.st
    }

    /// Namespace prefix `<P>`.
    pub fn prefix(&self) -> &str {
        &self.st.prefix
    }

    /// Lab directory (logs, data, state).
    pub fn dir(&self) -> &Path {
        &self.st.dir
    }

    /// Namespace name of a short name (`wan`, `ctl`, a site, node or host);
    /// a full namespace name passes through.
    pub fn ns(&self, name: &str) -> String {
        if name.starts_with(&format!("{}-", self.st.prefix)) {
            name.to_owned()
        } else {
            format!("{}-{name}", self.st.prefix)
        }
    }

    /// Node names in order (`a1`, `a2`, `b1`, ...).
    pub fn node_names(&self) -> Vec<String> {
        self.st.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// A node's record; panics on an unknown name.
    pub fn node(&self, name: &str) -> &NodeRec {
        self.st
            .nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name:?} in lab {}", self.st.prefix))
    }

    /// A node's TUN interface name.
    pub fn iface(&self, node: &str) -> String {
        self.node(node).iface.clone()
    }

    /// Controller `--data-dir`.
    pub fn controller_data_dir(&self) -> PathBuf {
        self.st.dir.join("controller")
    }

    /// `admin.conf` for `weftctl --config`.
    pub fn admin_conf(&self) -> PathBuf {
        self.controller_data_dir().join("admin.conf")
    }

    /// `https://198.18.100.2:7443`.
    pub fn controller_url(&self) -> String {
        format!("https://{CONTROLLER_IP}:{CONTROLLER_PORT}")
    }

    // ----- running commands -------------------------------------------------

    /// Runs a command in a namespace (short or full name) and returns its
    /// output; panics only when `ip netns exec` cannot be spawned.
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        netns::exec_in(&self.ns(ns), cmd).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs a shell script (`sh -c`) in a namespace.
    pub fn sh(&self, ns: &str, script: &str) -> Output {
        self.exec(ns, &["sh", "-c", script])
    }

    /// Runs `weftctl --config <admin.conf> args...` in the controller's namespace.
    pub fn weftctl(&self, args: &[&str]) -> Output {
        self.try_weftctl(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Lab::weftctl`] returning an error instead of panicking.
    pub fn try_weftctl(&self, args: &[&str]) -> Result<Output> {
        let weftctl = bins::path("weftctl")?;
        let conf = self.admin_conf();
        let mut full: Vec<&str> = vec!["netns", "exec"];
        let ns = self.ns("ctl");
        full.push(&ns);
        let weftctl = weftctl.display().to_string();
        let conf = conf.display().to_string();
        full.extend([weftctl.as_str(), "--config", conf.as_str()]);
        full.extend_from_slice(args);
        let mut cmd = Command::new("ip");
        cmd.args(&full).stdin(Stdio::null());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WEFT_") {
                cmd.env_remove(k);
            }
        }
        cmd.output()
            .with_context(|| format!("cannot run weftctl {}", args.join(" ")))
    }

    /// Runs weftctl, expects success, returns stdout.
    pub fn weftctl_ok(&self, args: &[&str]) -> String {
        self.try_weftctl_ok(args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Lab::weftctl_ok`] returning an error instead of panicking.
    pub fn try_weftctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.try_weftctl(args)?;
        ensure!(
            out.status.success(),
            "`weftctl {}` failed ({}): stderr: {} stdout: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `weftctl -o json node list`.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.try_nodes().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Lab::nodes`] returning an error instead of panicking.
    pub fn try_nodes(&self) -> Result<Vec<NodeInfo>> {
        let out = self.try_weftctl_ok(&["-o", "json", "node", "list"])?;
        serde_json::from_str(&out)
            .with_context(|| format!("`weftctl -o json node list` printed unexpected JSON: {out}"))
    }

    /// `weftctl -o json node get NAME`.
    pub fn node_info(&self, name: &str) -> NodeInfo {
        let out = self.weftctl_ok(&["-o", "json", "node", "get", name]);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("`weftctl -o json node get {name}` printed unexpected JSON ({e}): {out}")
        })
    }

    /// A node's overlay addresses from the controller.
    pub fn node_addresses(&self, name: &str) -> (Ipv4Addr, Ipv6Addr) {
        let info = self.node_info(name);
        match (info.ipv4(), info.ipv6()) {
            (Some(v4), Some(v6)) => (v4, v6),
            (v4, v6) => panic!(
                "node {name}: expected one IPv4 and one IPv6 overlay address, got {:?} \
                 (parsed v4 {v4:?}, v6 {v6:?})",
                info.addresses
            ),
        }
    }

    /// Creates a join token for `site`, returns it.
    pub fn create_token(&self, site: &str, ttl: &str) -> String {
        self.try_create_token(site, ttl)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates a join token for `site` with extra `weftctl token create`
    /// arguments (grants: `--label K=V`, `--allow-prefix CIDR`), returns it.
    pub fn create_token_with(&self, site: &str, ttl: &str, extra: &[&str]) -> String {
        self.try_create_token_with(site, ttl, extra)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn try_create_token(&self, site: &str, ttl: &str) -> Result<String> {
        self.try_create_token_with(site, ttl, &[])
    }

    fn try_create_token_with(&self, site: &str, ttl: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["token", "create", "--site", site, "--ttl", ttl];
        args.extend_from_slice(extra);
        let out = self.try_weftctl_ok(&args)?;
        let token = out.trim().to_owned();
        ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "`weftctl token create` should print only the token, printed {out:?}"
        );
        Ok(token)
    }

    /// `ping -c count` from a namespace (short or full name) to `to`
    /// (0.2 s interval, 1 s per-reply wait).
    pub fn ping(&self, from: &str, to: IpAddr, count: u32) -> PingResult {
        let count_s = count.to_string();
        let deadline = (count / 5 + 3).to_string();
        let to_s = to.to_string();
        let out = self.exec(
            from,
            &[
                "ping", "-n", "-q", "-c", &count_s, "-i", "0.2", "-W", "1", "-w", &deadline, &to_s,
            ],
        );
        PingResult::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// One ping with a reply timeout in ms; true when the reply came.
    pub fn ping_once(&self, from: &str, to: IpAddr, timeout_ms: u32) -> bool {
        let w = format!("{:.3}", f64::from(timeout_ms) / 1000.0);
        let to_s = to.to_string();
        let out = self.exec(from, &["ping", "-n", "-q", "-c", "1", "-W", &w, &to_s]);
        out.status.success()
    }

    /// What the nodes `to` see as the source of one UDP datagram each from
    /// a single socket on node `from` (its LAN address, port `port`), sent
    /// to a socket on port `port` + 1 of each: the NAT's public mapping of
    /// that socket per destination. Behind a port-preserving NAT all are
    /// the same; behind a symmetric one each destination sees another port.
    pub fn udp_sources(&self, from: &str, port: u16, to: &[&str]) -> Result<Vec<SocketAddr>> {
        let sock = |node: &str, port: u16| {
            let n = self.node(node);
            netns::udp_socket_in(&n.ns, SocketAddr::new(n.underlay.into(), port))
        };
        let sender = sock(from, port)?;
        let mut seen = Vec::new();
        for dest in to {
            let sink = sock(dest, port + 1)?;
            sink.set_read_timeout(Some(Duration::from_millis(500)))?;
            let target = sink.local_addr()?;
            let mut buf = [0u8; 64];
            let mut got = None;
            // A few tries: the first datagram may wait for ARP.
            for _ in 0..6 {
                sender
                    .send_to(b"weft-lab-mapping", target)
                    .with_context(|| format!("{from} sending to {target}"))?;
                if let Ok((_, src)) = sink.recv_from(&mut buf) {
                    got = Some(src);
                    break;
                }
            }
            seen.push(got.ok_or_else(|| anyhow!("{dest} ({target}) heard nothing from {from}"))?);
        }
        Ok(seen)
    }

    /// Polls `cond` every 50 ms until it holds; panics after `timeout` with a
    /// message naming `what` (the drop then prints the log tails).
    pub fn wait_until(&self, timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
        if let Err(e) = crate::try_wait_until(timeout, what, cond) {
            panic!("{e:#}");
        }
    }

    // ----- WireGuard --------------------------------------------------------

    /// `wg show <iface> <what>` in a node's namespace (empty when it fails).
    pub fn wg_show(&self, node: &str, what: &str) -> String {
        let n = self.node(node);
        let out = self.exec(&n.ns, &["wg", "show", &n.iface, what]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Peer public keys the node's interface has.
    pub fn wg_peers(&self, node: &str) -> BTreeSet<String> {
        self.wg_show(node, "peers")
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Per-peer transfer from `wg show <iface> transfer`: public key ->
    /// (received bytes, sent bytes). Empty when it fails.
    pub fn wg_transfer(&self, node: &str) -> BTreeMap<String, (u64, u64)> {
        self.wg_show(node, "transfer")
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let key = f.next()?.to_owned();
                let rx = f.next()?.parse().ok()?;
                let tx = f.next()?.parse().ok()?;
                Some((key, (rx, tx)))
            })
            .collect()
    }

    /// Packets through a node's TUN device (`ip -s -j link show`): (received,
    /// sent) as the kernel counts them: `received` is what the tunnel wrote
    /// to the device (decrypted packets arriving), `sent` what the kernel
    /// routed into it (packets leaving into the tunnel). (0, 0) when the
    /// device is absent.
    pub fn tun_packets(&self, node: &str) -> (u64, u64) {
        let n = self.node(node);
        let out = self.exec(&n.ns, &["ip", "-s", "-j", "link", "show", "dev", &n.iface]);
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let stats = &json[0]["stats64"];
        (
            stats["rx"]["packets"].as_u64().unwrap_or(0),
            stats["tx"]["packets"].as_u64().unwrap_or(0),
        )
    }

    /// Node names by WireGuard public key, from the controller.
    pub fn names_by_key(&self) -> BTreeMap<String, String> {
        self.nodes()
            .into_iter()
            .map(|n| (n.public_key, n.name))
            .collect()
    }

    /// Names of the nodes a node's interface has as peers (keys the
    /// controller does not know are listed as keys).
    pub fn wg_peer_names(&self, node: &str) -> BTreeSet<String> {
        let names = self.names_by_key();
        self.wg_peers(node)
            .into_iter()
            .map(|k| names.get(&k).cloned().unwrap_or(k))
            .collect()
    }

    /// `weftctl topology set --mode gateways --gateway G...` followed by
    /// `extra` arguments (site tags, residency), printing what `topology
    /// get` then says; waits until each plain member in `members` peers
    /// with exactly the gateways listed with it.
    pub fn set_gateway_mode(
        &self,
        gateways: &[&str],
        extra: &[&str],
        members: &[(&str, &[&str])],
        timeout: Duration,
    ) {
        let mut args = vec!["topology", "set", "--mode", "gateways"];
        for g in gateways {
            args.extend(["--gateway", g]);
        }
        args.extend_from_slice(extra);
        self.weftctl_ok(&args);
        eprintln!(
            "{}:\n{}",
            args.join(" "),
            self.weftctl_ok(&["topology", "get"])
        );
        for (member, want) in members {
            let want: BTreeSet<String> = want.iter().map(|g| (*g).to_owned()).collect();
            let mut last = BTreeSet::new();
            let ok = crate::try_wait_until(timeout, "peers", || {
                last = self.wg_peer_names(member);
                last == want
            });
            assert!(
                ok.is_ok(),
                "{member}'s peers should become {want:?} within {timeout:?}, are {last:?}"
            );
        }
    }

    /// Waits until the controller lists every lab node (with started agents)
    /// and each of their interfaces has every other one as a peer.
    pub fn wait_mesh(&self, timeout: Duration) -> Result<()> {
        let mut last = String::from("nothing checked yet");
        let expected: BTreeSet<String> = self
            .st
            .nodes
            .iter()
            .filter(|n| n.started)
            .map(|n| n.name.clone())
            .collect();
        let res = crate::try_wait_until(
            timeout,
            "every node's `wg show` to list all other nodes",
            || match self.mesh_gaps(&expected) {
                Ok(None) => true,
                Ok(Some(gaps)) => {
                    last = gaps;
                    false
                }
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            },
        );
        res.map_err(|e| anyhow!("{e:#}; last state: {last}"))
    }

    fn mesh_gaps(&self, expected: &BTreeSet<String>) -> Result<Option<String>> {
        let nodes = self.try_nodes()?;
        let keys: BTreeMap<String, String> = nodes
            .iter()
            .filter(|n| expected.contains(&n.name))
            .map(|n| (n.name.clone(), n.public_key.clone()))
            .collect();
        let missing: Vec<&String> = expected.iter().filter(|n| !keys.contains_key(*n)).collect();
        if !missing.is_empty() {
            return Ok(Some(format!("controller does not list nodes {missing:?}")));
        }
        let mut gaps = Vec::new();
        for name in expected {
            let peers = self.wg_peers(name);
            let lacking: Vec<&str> = keys
                .iter()
                .filter(|(other, key)| *other != name && !peers.contains(*key))
                .map(|(other, _)| other.as_str())
                .collect();
            if !lacking.is_empty() {
                gaps.push(format!("{name} lacks peers {lacking:?}"));
            }
        }
        Ok(if gaps.is_empty() {
            None
        } else {
            Some(gaps.join("; "))
        })
    }

    // ----- processes --------------------------------------------------------

    /// Starts a tracked process in a namespace (killed when the lab drops).
    /// A running process with the same key is an error.
    pub fn spawn(&mut self, key: &str, ns: &str, program: &Path, args: &[String]) -> Result<()> {
        if self.proc_alive(key) {
            bail!("process {key} is already running");
        }
        let ns = self.ns(ns);
        let (child, rec) =
            process::spawn_in_ns(key, &ns, program, args, &[], &self.st.dir.join("logs"))?;
        self.children.insert(key.to_owned(), child);
        self.st.procs.retain(|p| p.key != key);
        self.st.procs.push(rec);
        self.save_state();
        Ok(())
    }

    /// The record of a tracked process.
    pub fn proc(&self, key: &str) -> Option<&ProcRecord> {
        self.st.procs.iter().find(|p| p.key == key)
    }

    /// Whether a tracked process is running.
    pub fn proc_alive(&mut self, key: &str) -> bool {
        if let Some(child) = self.children.get_mut(key) {
            return matches!(child.try_wait(), Ok(None));
        }
        self.proc(key).is_some_and(process::is_alive)
    }

    /// Sends `sig` to a tracked process and waits (10 s) for it to exit,
    /// escalating to SIGKILL. Returns its exit status if it was our child.
    pub fn stop_proc(&mut self, key: &str, sig: Signal) -> Option<ExitStatus> {
        let rec = self.proc(key)?.clone();
        let status = process::stop(
            &rec,
            self.children.get_mut(key),
            sig,
            Duration::from_secs(10),
        );
        self.children.remove(key);
        status
    }

    /// Waits up to `timeout` for a tracked child to exit by itself.
    pub fn wait_proc(&mut self, key: &str, timeout: Duration) -> Option<ExitStatus> {
        let child = self.children.get_mut(key)?;
        let status = process::wait_child(child, timeout);
        if status.is_some() {
            self.children.remove(key);
        }
        status
    }

    /// Starts the controller and waits until it is ready (admin.conf written
    /// and the port accepting connections).
    pub fn start_controller(&mut self) {
        if let Err(e) = self.try_start_controller() {
            panic!("{e:#}");
        }
    }

    /// [`Lab::start_controller`] returning an error.
    pub fn try_start_controller(&mut self) -> Result<()> {
        self.spawn_controller()?;
        self.wait_controller_ready(Duration::from_secs(30))
    }

    /// Starts the controller without waiting for readiness (to watch it fail).
    pub fn spawn_controller(&mut self) -> Result<()> {
        let bin = bins::path("weft-controller")?;
        let data = self.controller_data_dir();
        let mut args = vec![
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("{CONTROLLER_IP}:{CONTROLLER_PORT}"),
        ];
        if let Some(pool) = &self.st.ipv4_pool {
            args.extend(["--ipv4-pool".into(), pool.clone()]);
        }
        args.extend(self.st.controller_args.iter().cloned());
        self.spawn("controller", "ctl", &bin, &args)
    }

    fn wait_controller_ready(&mut self, timeout: Duration) -> Result<()> {
        let conf = self.admin_conf();
        let ns = self.ns("ctl");
        let addr = CONTROLLER_IP.to_string();
        let port = CONTROLLER_PORT.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.wait_proc("controller", Duration::ZERO) {
                bail!(
                    "weft-controller exited ({status}) before becoming ready; stderr:\n{}",
                    self.proc("controller")
                        .map(|p| process::tail(&p.stderr, 30))
                        .unwrap_or_default()
                );
            }
            if conf.exists() {
                let out = netns::exec_in(&ns, &["nc", "-z", "-w", "1", &addr, &port])?;
                if out.status.success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for weft-controller to be ready \
                     ({} exists: {}, {addr}:{port} accepting in {ns})",
                    conf.display(),
                    conf.exists()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Signals the controller and waits for it to exit.
    pub fn kill_controller(&mut self, sig: Signal) -> Option<ExitStatus> {
        self.stop_proc("controller", sig)
    }

    /// Starts (or restarts) a node's agent. The first start passes the node's
    /// join token; restarts reuse the state dir and pass no token. Returns
    /// the instant just before the spawn.
    pub fn start_agent(&mut self, name: &str) -> Instant {
        self.try_start_agent(name)
            .unwrap_or_else(|e| panic!("starting agent {name}: {e:#}"))
    }

    /// [`Lab::start_agent`] returning an error.
    pub fn try_start_agent(&mut self, name: &str) -> Result<Instant> {
        let bin = bins::path("weft-agent")?;
        let idx = self
            .st
            .nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?}"))?;
        let node = self.st.nodes[idx].clone();
        let token = if node.started {
            None
        } else {
            Some(
                node.token
                    .clone()
                    .ok_or_else(|| anyhow!("node {name} has no join token"))?,
            )
        };
        let mut args =
            self.agent_args(&node.name, node.underlay, &node.state_dir, token.as_deref());
        args.extend(node.extra_args.iter().cloned());
        let t0 = Instant::now();
        self.spawn(&format!("agent-{name}"), &node.ns, &bin, &args)?;
        self.st.nodes[idx].started = true;
        self.save_state();
        Ok(t0)
    }

    /// `weft-agent` arguments for an agent named `name` at `underlay` with
    /// interface `wf<tag><name>` and `state_dir`, with or without a token.
    pub fn agent_args(
        &self,
        name: &str,
        underlay: Ipv4Addr,
        state_dir: &Path,
        token: Option<&str>,
    ) -> Vec<String> {
        let mut args = vec![
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--controller".into(),
            self.controller_url(),
            "--name".into(),
            name.to_owned(),
            "--interface".into(),
            format!("wf{}{name}", self.st.tag),
            "--listen-port".into(),
            AGENT_PORT.to_string(),
            "--endpoint".into(),
            format!("{underlay}:{AGENT_PORT}"),
        ];
        if let Some(token) = token {
            args.extend(["--join-token".into(), token.to_owned()]);
        }
        args
    }

    /// Addresses on a node's TUN interface (`ip -j addr show`), as
    /// `addr/prefixlen`, link-local excluded. Empty when the interface is absent.
    pub fn iface_addrs(&self, node: &str) -> BTreeSet<String> {
        let n = self.node(node);
        let out = self.exec(&n.ns, &["ip", "-j", "addr", "show", "dev", &n.iface]);
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let mut addrs = BTreeSet::new();
        for link in json.as_array().into_iter().flatten() {
            for a in link["addr_info"].as_array().into_iter().flatten() {
                if a["scope"] == "link" {
                    continue;
                }
                if let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                    addrs.insert(format!("{local}/{len}"));
                }
            }
        }
        addrs
    }

    /// Signals a node's agent and waits for it to exit.
    pub fn kill_agent(&mut self, name: &str, sig: Signal) -> Option<ExitStatus> {
        self.stop_proc(&format!("agent-{name}"), sig)
    }

    /// Runs `weft-agent args...` once in namespace `ns` (fresh output files)
    /// and waits up to `timeout` for it to exit. Returns (exit status or None
    /// if it had to be killed, stderr, time to exit).
    pub fn run_agent_once(
        &mut self,
        key: &str,
        ns: &str,
        args: &[String],
        timeout: Duration,
    ) -> (Option<ExitStatus>, String, Duration) {
        let bin = bins::path("weft-agent").unwrap_or_else(|e| panic!("{e:#}"));
        let t0 = Instant::now();
        self.spawn(key, ns, &bin, args)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let status = self.wait_proc(key, timeout);
        let elapsed = t0.elapsed();
        if status.is_none() {
            self.stop_proc(key, Signal::SIGKILL);
        }
        let stderr = self
            .proc(key)
            .map(|p| fs::read_to_string(&p.stderr).unwrap_or_default())
            .unwrap_or_default();
        (status, stderr, elapsed)
    }

    /// Path of the `weft-agent` binary (for tests that run it directly).
    pub fn agent_bin(&self) -> PathBuf {
        bins::path("weft-agent").unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Sets extra `weft-agent` arguments of a node, used from its next
    /// start on (e.g. `--advertise CIDR:KEY=VALUE`).
    pub fn set_agent_extra_args(&mut self, node: &str, args: &[&str]) {
        let n = self
            .st
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node:?}"));
        n.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
        self.save_state();
    }

    // ----- topology ---------------------------------------------------------

    /// Adds a workload behind `node`: a namespace `<P>-<name>` joined to
    /// the node's namespace by a veth pair (`w-<name>` on the node side,
    /// `eth0` inside). Each `(gateway, address)` pair, e.g.
    /// `("100.100.2.1/24", "100.100.2.10/24")`, puts the gateway on the
    /// node side and the address inside, whose default route (of that
    /// family, inside the workload namespace only) points at the gateway.
    /// Returns the namespace name; it is removed with the lab.
    pub fn add_workload(&mut self, node: &str, name: &str, nets: &[(&str, &str)]) -> String {
        self.try_add_workload(node, name, nets)
            .unwrap_or_else(|e| panic!("adding workload {name} behind {node}: {e:#}"))
    }

    fn try_add_workload(
        &mut self,
        node: &str,
        name: &str,
        nets: &[(&str, &str)],
    ) -> Result<String> {
        let node_ns = self.node(node).ns.clone();
        let ns = self.ns(name);
        let port = format!("w-{name}");
        ensure!(port.len() <= 15, "workload name {name:?} too long");
        self.add_ns(&ns)?;
        netns::veth(&node_ns, &port, &ns, "eth0")?;
        netns::ip(&ns, "link set lo up")?;
        let addr_of = |cidr: &str| -> Result<IpAddr> {
            let ip = cidr.split('/').next().unwrap_or_default();
            ip.parse::<IpAddr>()
                .with_context(|| format!("{cidr:?} is not ADDRESS/LEN"))
        };
        for (gateway, address) in nets {
            let v6 = addr_of(gateway)?.is_ipv6();
            let family = if v6 { "-6 " } else { "" };
            let nodad = if v6 { " nodad" } else { "" };
            netns::ip(
                &node_ns,
                &format!("{family}addr add {gateway} dev {port}{nodad}"),
            )?;
            netns::ip(&ns, &format!("{family}addr add {address} dev eth0{nodad}"))?;
        }
        netns::ip(&node_ns, &format!("link set {port} up"))?;
        netns::ip(&ns, "link set eth0 up")?;
        for (gateway, _) in nets {
            let gw = addr_of(gateway)?;
            let family = if gw.is_ipv6() { "-6 " } else { "" };
            // Inside the workload namespace only: never in a node's.
            netns::ip(&ns, &format!("{family}route add default via {gw}"))?;
        }
        Ok(ns)
    }

    /// Adds a host namespace `<P>-<name>` on `site`'s LAN at 198.19.<i>.<octet>
    /// (routes like a node's, no agent). Returns the namespace name.
    pub fn add_host(&mut self, site: &str, name: &str, octet: u8) -> String {
        self.try_add_host(site, name, octet)
            .unwrap_or_else(|e| panic!("adding host {name}: {e:#}"))
    }

    fn try_add_host(&mut self, site: &str, name: &str, octet: u8) -> Result<String> {
        let idx = self.site_index(site)?;
        let ns = self.ns(name);
        let ip = Ipv4Addr::new(198, 19, idx, octet);
        self.attach_lan_host(site, idx, &ns, name, ip)?;
        self.st.hosts.push(HostRec {
            name: name.to_owned(),
            site: site.to_owned(),
            ns: ns.clone(),
            underlay: ip,
        });
        self.save_state();
        Ok(ns)
    }

    /// Cuts a site's WAN uplink (both veth ends down).
    pub fn cut_link(&self, site: &str) {
        self.site_index(site).unwrap_or_else(|e| panic!("{e:#}"));
        let router = self.ns(site);
        let wan = self.ns("wan");
        for (ns, dev) in [(&router, "wan0".to_owned()), (&wan, format!("to-{site}"))] {
            netns::ip(ns, &format!("link set {dev} down")).unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    /// Restores a cut uplink: links up and the routes the kernel dropped
    /// with them put back.
    pub fn restore_link(&self, site: &str) {
        let i = self.site_index(site).unwrap_or_else(|e| panic!("{e:#}"));
        let nat = self.st.sites.iter().any(|s| s.name == site && s.nat);
        let router = self.ns(site);
        let wan = self.ns("wan");
        let res = (|| -> Result<()> {
            netns::ip(&router, "link set wan0 up")?;
            netns::ip(&wan, &format!("link set to-{site} up"))?;
            // Routes via a gateway vanish when their link goes down; the link
            // may need a moment before the gateway is reachable again.
            crate::try_wait_until(Duration::from_secs(5), "uplink routes restored", || {
                uplink_routes(&router, &wan, i, nat).is_ok()
            })
        })();
        res.unwrap_or_else(|e| panic!("restoring link of site {site}: {e:#}"));
    }

    /// Cuts the WAN path between sites `a` and `b` only (both directions):
    /// blackhole rules in the WAN router, before the delay line, drop what
    /// one site sends the other (from and to uplink and LAN addresses).
    /// Both keep their uplinks to the other sites and the controller.
    /// Undone by [`Lab::restore_pair`]; recorded in the state.
    pub fn cut_pair(&mut self, a: &str, b: &str) {
        self.try_cut_pair(a, b)
            .unwrap_or_else(|e| panic!("cutting {a} <-> {b}: {e:#}"));
    }

    /// [`Lab::cut_pair`] returning an error (cutting a cut pair is one).
    pub fn try_cut_pair(&mut self, a: &str, b: &str) -> Result<()> {
        let key = self.pair_key(a, b)?;
        ensure!(
            !self.st.cut_pairs.contains(&key),
            "the path {a} <-> {b} is already cut"
        );
        let (i, j) = (self.site_index(a)?, self.site_index(b)?);
        // Record first: teardown deletes the namespace anyway, and a
        // half-made cut can be restored (missing rules are skipped).
        self.st.cut_pairs.push(key);
        self.save_state();
        let wan = self.ns("wan");
        for rule in pair_rules(i, j) {
            netns::ip(&wan, &format!("rule add {rule}"))?;
        }
        Ok(())
    }

    /// Restores the WAN path between `a` and `b` cut by [`Lab::cut_pair`]:
    /// removes exactly the rules it added.
    pub fn restore_pair(&mut self, a: &str, b: &str) {
        self.try_restore_pair(a, b)
            .unwrap_or_else(|e| panic!("restoring {a} <-> {b}: {e:#}"));
    }

    /// [`Lab::restore_pair`] returning an error (restoring a pair that is
    /// not cut is one).
    pub fn try_restore_pair(&mut self, a: &str, b: &str) -> Result<()> {
        let key = self.pair_key(a, b)?;
        ensure!(
            self.st.cut_pairs.contains(&key),
            "the path {a} <-> {b} is not cut (cut: {:?})",
            self.st.cut_pairs
        );
        let (i, j) = (self.site_index(a)?, self.site_index(b)?);
        let wan = self.ns("wan");
        let listed = netns::exec_in(
            &wan,
            &["ip", "-4", "rule", "show", "pref", &CUT_PREF.to_string()],
        )?;
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        for rule in pair_rules(i, j) {
            // `ip rule show` prints "from X to Y blackhole".
            let shown = rule
                .trim_end_matches(&format!(" pref {CUT_PREF}"))
                .to_owned();
            if listed.lines().any(|l| l.contains(&shown)) {
                netns::ip(&wan, &format!("rule del {rule}"))?;
            }
        }
        self.st.cut_pairs.retain(|p| *p != key);
        self.save_state();
        Ok(())
    }

    /// Site pairs whose WAN path is cut now.
    pub fn cut_pairs(&self) -> &[(String, String)] {
        &self.st.cut_pairs
    }

    fn pair_key(&self, a: &str, b: &str) -> Result<(String, String)> {
        self.site_index(a)?;
        self.site_index(b)?;
        ensure!(a != b, "a site pair needs two sites, got {a} twice");
        Ok(if a < b {
            (a.to_owned(), b.to_owned())
        } else {
            (b.to_owned(), a.to_owned())
        })
    }

    /// Names of a site's nodes, in order.
    pub fn site_nodes(&self, site: &str) -> Vec<String> {
        self.st
            .nodes
            .iter()
            .filter(|n| n.site == site)
            .map(|n| n.name.clone())
            .collect()
    }

    /// Masquerades site `i`'s LAN out of `wan0` and drops connections
    /// opened from the WAN towards the LAN or the router itself (nftables
    /// table `weft_lab` in the router namespace, removed with it); `fully-random` (a random
    /// public port per connection, hence per destination) when `symmetric`.
    fn masquerade(&self, router: &str, i: u8, symmetric: bool) -> Result<()> {
        let flags = if symmetric { " fully-random" } else { "" };
        let ruleset = [
            "table ip weft_lab {".to_owned(),
            "  chain masq {".to_owned(),
            "    type nat hook postrouting priority srcnat; policy accept;".to_owned(),
            format!("    oifname \"wan0\" ip saddr 198.19.{i}.0/24 masquerade{flags}"),
            "  }".to_owned(),
            "  chain from_wan {".to_owned(),
            "    type filter hook forward priority filter; policy accept;".to_owned(),
            "    iifname \"wan0\" ct state established,related accept".to_owned(),
            "    iifname \"wan0\" drop".to_owned(),
            "  }".to_owned(),
            // Unsolicited packets for the router itself are dropped too, as
            // a NAT gateway's firewall does: accepted, they would leave a
            // conntrack entry (e.g. of a peer's hole-punching handshake
            // arriving first) whose reply tuple takes the port the LAN
            // node's own mapping needs, and the masquerade would move that
            // node to another port towards that peer.
            "  chain to_router {".to_owned(),
            "    type filter hook input priority filter; policy accept;".to_owned(),
            "    iifname \"wan0\" ct state established,related accept".to_owned(),
            "    iifname \"wan0\" drop".to_owned(),
            "  }".to_owned(),
            "}".to_owned(),
        ]
        .join("\n")
            + "\n";
        let path = self.st.dir.join(format!("nft-{router}.conf"));
        fs::write(&path, ruleset).with_context(|| format!("writing {}", path.display()))?;
        let path_s = path.display().to_string();
        let out = netns::exec_in(router, &["nft", "-f", &path_s])?;
        ensure!(
            out.status.success(),
            "nft -f {path_s} in {router} failed (is nftables installed? scripts/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    fn site_index(&self, site: &str) -> Result<u8> {
        self.st
            .sites
            .iter()
            .find(|s| s.name == site)
            .map(|s| s.index)
            .ok_or_else(|| anyhow!("no site {site:?} in lab {}", self.st.prefix))
    }

    /// Starts the WAN delay line (when any site has a delay) and routes the
    /// WAN router's traffic towards site LANs through it.
    fn start_wan_delay(&mut self) -> Result<()> {
        let rules: Vec<String> = self
            .st
            .sites
            .iter()
            .filter(|s| s.delay_ms > 0)
            .flat_map(|s| {
                let mut r = vec![format!("198.19.{}.0/24={}", s.index, s.delay_ms)];
                // A NAT site's traffic crosses the WAN from and to its
                // uplink address.
                if s.nat {
                    r.push(format!("198.18.{}.0/24={}", s.index, s.delay_ms));
                }
                r
            })
            .collect();
        if rules.is_empty() {
            return Ok(());
        }
        let wan = self.ns("wan");
        netns::sysctl(&wan, "net.ipv4.conf.all.rp_filter=0")?;
        netns::sysctl(&wan, "net.ipv4.conf.default.rp_filter=0")?;
        let bin = bins::path("weft")?;
        let mut args = vec![
            "lab".to_owned(),
            "wan-delay".to_owned(),
            "--tun".to_owned(),
            WAN_DELAY_DEV.to_owned(),
        ];
        for r in rules {
            args.push("--rule".to_owned());
            args.push(r);
        }
        self.spawn("wan-delay", "wan", &bin, &args)?;
        crate::try_wait_until(
            Duration::from_secs(10),
            "the WAN delay line's TUN device",
            || netns::ip(&wan, &format!("link show {WAN_DELAY_DEV}")).is_ok(),
        )?;
        netns::ip(&wan, &format!("link set {WAN_DELAY_DEV} up"))?;
        netns::ip(
            &wan,
            &format!("route add 198.19.0.0/16 dev {WAN_DELAY_DEV} table 200"),
        )?;
        netns::ip(
            &wan,
            &format!("rule add iif {WAN_DELAY_DEV} lookup main pref 100"),
        )?;
        netns::ip(&wan, "rule add to 198.19.0.0/16 lookup 200 pref 200")?;
        let nat_uplinks: Vec<u8> = self
            .st
            .sites
            .iter()
            .filter(|s| s.nat && s.delay_ms > 0)
            .map(|s| s.index)
            .collect();
        for i in nat_uplinks {
            netns::ip(
                &wan,
                &format!("route add 198.18.{i}.0/24 dev {WAN_DELAY_DEV} table 200"),
            )?;
            netns::ip(
                &wan,
                &format!("rule add to 198.18.{i}.0/24 lookup 200 pref 200"),
            )?;
        }
        self.st.netem = true;
        Ok(())
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        // Record first: a half-made namespace must still be deleted.
        self.st.namespaces.push(ns.to_owned());
        self.save_state();
        netns::add_ns(ns)
    }

    fn populate(&mut self, b: &LabBuilder) -> Result<()> {
        let wan = self.ns("wan");
        let ctl = self.ns("ctl");
        self.add_ns(&wan)?;
        netns::sysctl(&wan, "net.ipv4.ip_forward=1")?;

        // Controller namespace on the WAN.
        self.add_ns(&ctl)?;
        netns::veth(&wan, "to-ctl", &ctl, "eth0")?;
        netns::ip(&wan, "addr add 198.18.100.1/24 dev to-ctl")?;
        netns::ip(&wan, "link set to-ctl up")?;
        netns::ip(&ctl, "addr add 198.18.100.2/24 dev eth0")?;
        netns::ip(&ctl, "link set eth0 up")?;
        netns::ip(&ctl, "route add 198.18.0.0/16 via 198.18.100.1")?;
        netns::ip(&ctl, "route add 198.19.0.0/16 via 198.18.100.1")?;

        for (pos, site) in b.sites.iter().enumerate() {
            let index = u8::try_from(pos + 1).context("too many sites")?;
            ensure!(
                index < 100,
                "too many sites (198.18.100.0/24 is the controller's)"
            );
            let delay_ms = b
                .delays_ms
                .get(pos)
                .or(b.delays_ms.last())
                .copied()
                .unwrap_or(0);
            let router = self.ns(site);
            self.add_ns(&router)?;
            netns::sysctl(&router, "net.ipv4.ip_forward=1")?;
            let to_site = format!("to-{site}");
            ensure!(to_site.len() <= 15, "site name {site:?} too long");
            netns::veth(&wan, &to_site, &router, "wan0")?;
            netns::ip(&wan, &format!("addr add 198.18.{index}.1/24 dev {to_site}"))?;
            netns::ip(&wan, &format!("link set {to_site} up"))?;
            netns::ip(&router, &format!("addr add 198.18.{index}.2/24 dev wan0"))?;
            netns::ip(&router, "link set wan0 up")?;
            let symmetric_nat = b.symmetric_nat_sites.contains(site);
            let nat = symmetric_nat || b.nat_sites.contains(site);
            uplink_routes(&router, &wan, index, nat)?;
            netns::ip(&router, "link add br0 type bridge")?;
            netns::ip(&router, &format!("addr add 198.19.{index}.1/24 dev br0"))?;
            netns::ip(&router, "link set br0 up")?;
            if nat {
                self.masquerade(&router, index, symmetric_nat)?;
            }
            self.st.sites.push(SiteRec {
                name: site.clone(),
                index,
                delay_ms,
                nat,
                symmetric_nat,
            });
            for n in 1..=b.nodes_of(site) {
                let name = format!("{site}{n}");
                let iface = format!("wf{}{name}", self.st.tag);
                ensure!(
                    iface.len() <= 15,
                    "interface name {iface} longer than 15 chars: use shorter site names"
                );
                let octet = u8::try_from(10 + n).context("too many nodes per site")?;
                let ip = Ipv4Addr::new(198, 19, index, octet);
                let ns = self.ns(&name);
                self.attach_lan_host(site, index, &ns, &name, ip)?;
                self.st.nodes.push(NodeRec {
                    name: name.clone(),
                    site: site.clone(),
                    ns,
                    underlay: ip,
                    iface,
                    state_dir: self.st.dir.join("agents").join(&name),
                    token: None,
                    started: false,
                    overlay: Vec::new(),
                    extra_args: Vec::new(),
                });
            }
        }
        self.start_wan_delay()?;
        self.save_state();
        if b.topology_only {
            return Ok(());
        }

        self.try_start_controller()?;
        for site in &b.sites {
            self.try_weftctl_ok(&["site", "add", site])?;
        }
        for idx in 0..self.st.nodes.len() {
            let site = self.st.nodes[idx].site.clone();
            let grants: Vec<&str> = b
                .token_args
                .get(&self.st.nodes[idx].name)
                .map(|a| a.iter().map(String::as_str).collect())
                .unwrap_or_default();
            let token = self.try_create_token_with(&site, "1h", &grants)?;
            self.st.nodes[idx].token = Some(token);
        }
        self.save_state();
        if b.start_agents {
            for name in self.node_names() {
                self.try_start_agent(&name)?;
            }
            self.wait_mesh(b.mesh_timeout)?;
            self.record_overlay_addresses()?;
        }
        Ok(())
    }

    /// Copies the controller's view of the nodes' overlay addresses into the
    /// state file.
    pub fn record_overlay_addresses(&mut self) -> Result<()> {
        let infos = self.try_nodes()?;
        for n in &mut self.st.nodes {
            if let Some(info) = infos.iter().find(|i| i.name == n.name) {
                n.overlay.clone_from(&info.addresses);
            }
        }
        self.save_state();
        Ok(())
    }

    /// Creates namespace `ns`, plugs it into the site bridge with `ip`/24 and
    /// routes the lab's underlay ranges via the site router.
    fn attach_lan_host(
        &mut self,
        site: &str,
        index: u8,
        ns: &str,
        name: &str,
        ip: Ipv4Addr,
    ) -> Result<()> {
        let router = self.ns(site);
        self.add_ns(ns)?;
        let port = format!("p-{name}");
        ensure!(port.len() <= 15, "host name {name:?} too long");
        netns::veth(&router, &port, ns, "eth0")?;
        netns::ip(&router, &format!("link set {port} master br0 up"))?;
        netns::ip(ns, &format!("addr add {ip}/24 dev eth0"))?;
        netns::ip(ns, "link set eth0 up")?;
        netns::ip(ns, &format!("route add 198.18.0.0/16 via 198.19.{index}.1"))?;
        netns::ip(ns, &format!("route add 198.19.0.0/16 via 198.19.{index}.1"))?;
        Ok(())
    }

    // ----- logs, state, teardown -------------------------------------------

    /// The last `lines` lines of every process log, with headers.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for p in &self.st.procs {
            for path in [&p.stderr, &p.stdout] {
                let t = process::tail(path, lines);
                if t.trim().is_empty() {
                    continue;
                }
                s.push_str(&format!(
                    "----- {} (last {lines} lines) -----\n{t}\n",
                    path.display()
                ));
            }
        }
        if s.is_empty() {
            s.push_str("(no process output)\n");
        }
        s
    }

    /// Prints [`Lab::log_tails`] to stderr.
    pub fn print_log_tails(&self) {
        eprintln!(
            "===== weft lab {}: log tails (full logs in {}) =====\n{}",
            self.st.prefix,
            self.st.dir.join("logs").display(),
            self.log_tails(40)
        );
    }

    fn save_state(&self) {
        let Some(path) = &self.state_file else { return };
        let _ = fs::create_dir_all(STATE_ROOT);
        if let Ok(json) = serde_json::to_vec_pretty(&self.st) {
            let tmp = path.with_extension("json.tmp");
            if fs::write(&tmp, json).is_ok() {
                let _ = fs::rename(&tmp, path);
            }
        }
    }

    /// Kills every recorded process (SIGTERM, then SIGKILL after 3 s) and
    /// deletes every recorded namespace and the state file. Never panics.
    pub fn teardown(&mut self, keep_dir: bool) {
        let procs = self.st.procs.clone();
        // Signal all first so they shut down in parallel.
        for p in &procs {
            let _ = process::signal_checked(p, Signal::SIGTERM);
        }
        for p in procs.iter().rev() {
            process::stop(
                p,
                self.children.get_mut(&p.key),
                Signal::SIGTERM,
                Duration::from_secs(3),
            );
        }
        self.children.clear();
        for ns in self.st.namespaces.iter().rev() {
            netns::del_ns(ns);
        }
        // Anything else carrying our prefix (e.g. made by a test directly).
        let prefix = format!("{}-", self.st.prefix);
        for ns in netns::list_ns() {
            if ns.starts_with(&prefix) {
                netns::del_ns(&ns);
            }
        }
        if let Some(path) = &self.state_file {
            let _ = fs::remove_file(path);
        }
        if !keep_dir {
            let _ = fs::remove_dir_all(&self.st.dir);
        }
        self.owned = false;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        if panicking {
            self.print_log_tails();
        }
        if self.owned {
            self.teardown(panicking);
            if panicking {
                eprintln!(
                    "weft lab {}: logs kept in {}",
                    self.st.prefix,
                    self.st.dir.display()
                );
            }
        }
    }
}

/// Tears down labs of test processes that died without cleaning up (their
/// owner PID no longer has the recorded start time). Returns their prefixes.
pub fn clean_stale_test_labs() -> Vec<String> {
    let mut cleaned = Vec::new();
    let Ok(entries) = fs::read_dir(STATE_ROOT) else {
        return cleaned;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("test-") && name.ends_with(".json")) {
            continue;
        }
        let Ok(st) = fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| serde_json::from_slice::<LabState>(&b).map_err(anyhow::Error::from))
        else {
            continue;
        };
        let owner_alive = st
            .owner
            .is_some_and(|(pid, start)| process::start_time(pid) == Some(start));
        if owner_alive {
            continue;
        }
        let prefix = st.prefix.clone();
        Lab::attach(st, path, true).teardown(false);
        cleaned.push(prefix);
    }
    cleaned
}

/// A prefix `w` + 4 random hex chars no existing namespace uses.
fn fresh_prefix() -> Result<(String, String)> {
    let existing = netns::list_ns();
    for _ in 0..100 {
        let tag = format!("{:04x}", rand::random::<u16>());
        let prefix = format!("w{tag}");
        let taken = existing
            .iter()
            .any(|n| n.starts_with(&format!("{prefix}-")))
            || Path::new(STATE_ROOT).join(&prefix).exists();
        if !taken {
            return Ok((prefix, tag));
        }
    }
    bail!("could not find an unused lab prefix")
}

/// Routes between site `i`'s router and the WAN router (none from the WAN
/// router to the LAN of a NAT site).
fn uplink_routes(router: &str, wan: &str, i: u8, nat: bool) -> Result<()> {
    netns::ip(
        router,
        &format!("route replace 198.19.0.0/16 via 198.18.{i}.1"),
    )?;
    netns::ip(
        router,
        &format!("route replace 198.18.0.0/16 via 198.18.{i}.1"),
    )?;
    if !nat {
        netns::ip(
            wan,
            &format!("route replace 198.19.{i}.0/24 via 198.18.{i}.2"),
        )?;
    }
    Ok(())
}

/// The WAN router's rules cutting the path between sites `i` and `j`, both
/// directions, uplink and LAN addresses (a NAT site's traffic leaves with
/// its uplink address).
fn pair_rules(i: u8, j: u8) -> Vec<String> {
    let nets = |k: u8| [format!("198.18.{k}.0/24"), format!("198.19.{k}.0/24")];
    let mut rules = Vec::new();
    for (x, y) in [(i, j), (j, i)] {
        for from in nets(x) {
            for to in nets(y) {
                rules.push(format!("from {from} to {to} blackhole pref {CUT_PREF}"));
            }
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_output() {
        let out = "PING 100.64.0.2 (100.64.0.2) 56(84) bytes of data.\n\n\
                   --- 100.64.0.2 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n\
                   rtt min/avg/max/mdev = 0.045/1.500/0.078/0.013 ms\n";
        let r = PingResult::parse(out);
        assert_eq!((r.transmitted, r.received), (3, 2));
        assert!((r.loss - 33.3333).abs() < 1e-6, "loss {}", r.loss);
        assert_eq!(r.rtt_avg, Some(Duration::from_micros(1500)));
        assert!(r.reachable());
    }

    #[test]
    fn pair_rules_cut_both_directions_and_both_ranges() {
        let rules = pair_rules(1, 3);
        assert_eq!(rules.len(), 8);
        assert!(rules.iter().all(|r| r.ends_with("blackhole pref 50")));
        for (from, to) in [
            ("198.19.1.0/24", "198.19.3.0/24"),
            ("198.19.3.0/24", "198.19.1.0/24"),
            ("198.18.1.0/24", "198.19.3.0/24"),
            ("198.18.3.0/24", "198.18.1.0/24"),
        ] {
            assert!(
                rules.contains(&format!("from {from} to {to} blackhole pref 50")),
                "{from} -> {to} missing in {rules:?}"
            );
        }
        assert!(!rules.iter().any(|r| r.contains(".2.0/24")));
    }

    #[test]
    fn parses_total_loss() {
        let out = "--- 100.64.0.2 ping statistics ---\n\
                   5 packets transmitted, 0 received, +2 errors, 100% packet loss, time 4000ms\n";
        let r = PingResult::parse(out);
        assert_eq!((r.transmitted, r.received), (5, 0));
        assert_eq!(r.loss, 100.0);
        assert_eq!(r.rtt_avg, None);
        assert!(!r.reachable());
    }
}
