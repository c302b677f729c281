//! `weft bench policy`: what network policy costs on the overlay path.
//!
//! A lab of two sites with one node each and no WAN delay (the WAN router
//! forwards in the kernel): a1 (`role=client`) sends to b1 (`role=bench`)
//! over the overlay, through the real controller and agents. Configurations,
//! alternated within each round:
//!
//! - `none`: no policy (b1 is not governed; the classifier still runs);
//! - `weft`: N rules (default 10,000) in one `NetworkPolicy` selecting b1,
//!   applied with `weftctl apply`: N − 1 rules allow a1's identity on TCP
//!   ports the benchmark never uses (10000, 10002, ...: none adjacent, so
//!   every rule stays its own entry in b1's policy map), and one last rule
//!   allows the benchmark flows (TCP 5201–5202, UDP 5203). Everything else
//!   to b1 is default-denied;
//! - `nft-linear` (the anchor): no Weft policy; the same rules as a linear
//!   nftables chain in b1's input hook for packets from its overlay
//!   interface (`ip saddr A1 tcp dport P accept` × (N − 1), the allow, then
//!   drop), so every packet of the benchmark walks all of them;
//! - `nft-set`: the same, with the N − 1 rules as one set lookup.
//!
//! Each configuration is checked before it is measured (`weftctl policy
//! explain` names the allowing rule, b1's agent reports the map entries, a
//! probe to a port no rule allows is dropped, the probe to an allowed port
//! connects) and measured: iperf3 TCP, one stream; 64-byte UDP datagrams
//! at full rate (`weft bench udp-send` → `udp-sink`); 64-byte TCP
//! request/response on one connection and on a new connection each
//! (`weft bench rr-client` → `rr-server`). Medians over the
//! rounds and ratios to `none` from the same run are printed as a markdown
//! table and written, with every sample, to the output directory.
//!
//! The lab is torn down on success, error and Ctrl-C (SIGINT, SIGTERM);
//! should this process be killed outright, `weft lab clean` removes it.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::{Args, ValueEnum};
use weft_tests::process::strip_ansi;
use weft_tests::{Lab, NodeInfo, netns};

/// iperf3's port on b1 (TCP and UDP).
const IPERF_PORT: u16 = 5201;
/// The request/response server's port on b1.
const RR_PORT: u16 = 5202;
/// The UDP sink's port on b1.
const UDP_PORT: u16 = 5203;
/// A port with a listener on b1 that no rule allows.
const DENIED_PORT: u16 = 5299;
/// First port of the rules that never match.
const FILLER_BASE: u32 = 10_000;
/// Weft policies are named `bench-1`, `bench-2`, ...
const POLICY_PREFIX: &str = "bench";
/// Rules per policy file. A file may hold 10,000 rules and 1 MiB, but the
/// controller also checks each policy's stored (block-style) YAML against
/// 1 MiB, which 10,000 rules of this shape exceed.
const RULES_PER_FILE: usize = 2_500;
/// nftables table in b1's namespace.
const NFT_TABLE: &str = "weft_bench";
/// Most rules the benchmark generates (never-matching ports 10000, 10002,
/// ... must stay below 65536).
const MAX_RULES: usize = 25_000;

/// Set by SIGINT/SIGTERM/SIGHUP: stop measuring and tear the lab down.
static STOP: AtomicBool = AtomicBool::new(false);

/// One way of holding the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum Config {
    /// No policy at all.
    None,
    /// The rules as Weft policy (eBPF on b1's overlay interface).
    Weft,
    /// The rules as a linear nftables chain in b1's input hook.
    NftLinear,
    /// The rules as one nftables set lookup in b1's input hook.
    NftSet,
}

impl Config {
    fn key(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Weft => "weft",
            Config::NftLinear => "nft-linear",
            Config::NftSet => "nft-set",
        }
    }

    fn title(self, rules: usize) -> String {
        let n = thousands(rules as u64);
        match self {
            Config::None => "no policy".to_owned(),
            Config::Weft => format!("Weft eBPF, {n} rules"),
            Config::NftLinear => format!("nftables, {n} linear rules"),
            Config::NftSet => format!("nftables, {n} rules as one set"),
        }
    }
}

/// `weft bench policy` options.
#[derive(Debug, Args)]
pub(crate) struct PolicyArgs {
    /// Rounds; every configuration is measured once per round.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Configurations, comma separated, in the order of the first round
    /// (later rounds rotate it).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "none,weft,nft-linear,nft-set"
    )]
    configs: Vec<Config>,
    /// Number of rules (the last one allows the benchmark flows).
    #[arg(long, default_value_t = 10_000)]
    rules: usize,
    /// Seconds per TCP bulk run.
    #[arg(long, default_value_t = 8)]
    tcp_secs: u64,
    /// Seconds per UDP 64-byte and request/response run (0: skip both).
    #[arg(long, default_value_t = 4)]
    small_secs: u64,
    /// Directory for the rule files, samples and summary (default
    /// /tmp/weft-bench-policy-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Host CPU busy percentage (over 1 s) above which a measurement waits.
    #[arg(long, default_value_t = 30.0)]
    busy_threshold: f64,
    /// Longest wait, in seconds, for an idle host before the first
    /// measurement (later ones wait at most 30 s); the run goes on busy
    /// after that and says so.
    #[arg(long, default_value_t = 180)]
    idle_wait_secs: u64,
}

/// `weft bench rr-client`: TCP request/response of `size` bytes for
/// `secs` seconds, on one connection or (`connect_each`) a new connection
/// per transaction (at most `max` transactions then). Prints JSON.
pub(crate) fn rr_client(
    to: SocketAddr,
    secs: u64,
    size: usize,
    connect_each: bool,
    max: u64,
) -> Result<()> {
    ensure!(size > 0 && size <= 65_536, "size must be 1 to 65536 bytes");
    let connect = || -> Result<TcpStream> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .with_context(|| format!("connecting to {to}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(s)
    };
    let mut conn = if connect_each { None } else { Some(connect()?) };
    let req = vec![0x5a_u8; size];
    let mut resp = vec![0_u8; size];
    let mut lat_us: Vec<u32> = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end && (lat_us.len() as u64) < max {
        let t0 = Instant::now();
        let mut fresh = None;
        let s = match conn.as_mut() {
            Some(s) => s,
            None => fresh.insert(connect()?),
        };
        s.write_all(&req)?;
        s.read_exact(&mut resp)
            .context("reading the response (connection dropped?)")?;
        drop(fresh);
        lat_us.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat_us.sort_unstable();
    let pct = |p: usize| lat_us.get(lat_us.len() * p / 100).copied().unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "transactions": lat_us.len(),
            "secs": elapsed,
            "p50_us": pct(50),
            "p99_us": pct(99),
        })
    );
    Ok(())
}

/// `weft bench udp-send`: sends `size`-byte datagrams to `to` as fast as
/// it can for `secs` seconds; prints JSON.
pub(crate) fn udp_send(to: SocketAddr, secs: u64, size: usize) -> Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    sock.connect(to)?;
    let buf = vec![0x5a_u8; size.clamp(1, 65_000)];
    let (mut sent, mut failed) = (0_u64, 0_u64);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        for _ in 0..256 {
            // ENOBUFS and ICMP-induced ECONNREFUSED are counted, not fatal.
            match sock.send(&buf) {
                Ok(_) => sent += 1,
                Err(_) => failed += 1,
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"sent": sent, "failed": failed, "secs": start.elapsed().as_secs_f64()})
    );
    Ok(())
}

/// `weft bench udp-sink`: counts the datagrams arriving on `port` during
/// `secs` seconds from the first one (waiting at most `wait` seconds for
/// it); prints JSON.
pub(crate) fn udp_sink(port: u16, secs: u64, wait: u64) -> Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("binding UDP {port}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0_u8; 65_536];
    let mut packets = 0_u64;
    let give_up = Instant::now() + Duration::from_secs(wait);
    let mut end = None;
    loop {
        let now = Instant::now();
        match end {
            None if now >= give_up => break,
            Some(end) if now >= end => break,
            _ => {}
        }
        if sock.recv(&mut buf).is_ok() {
            end.get_or_insert(Instant::now() + Duration::from_secs(secs));
            packets += 1;
        }
    }
    println!(
        "{}",
        serde_json::json!({ "packets": packets, "secs": secs })
    );
    Ok(())
}

/// `weft bench rr-server`: echoes what each connection sends.
pub(crate) fn rr_server(port: u16) -> Result<()> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding {port}"))?;
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = [0_u8; 65_536];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

/// `weft bench policy`.
pub(crate) fn run(args: &PolicyArgs) -> Result<()> {
    ensure!(
        weft_tests::is_root(),
        "`weft bench policy` builds network namespaces and must run as root"
    );
    ensure!(
        (1..=MAX_RULES).contains(&args.rules),
        "--rules must be 1 to {MAX_RULES}"
    );
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.tcp_secs >= 1, "--tcp-secs must be at least 1");
    let mut configs = args.configs.clone();
    configs.dedup();
    ensure!(!configs.is_empty(), "no configurations to measure");
    if !configs.contains(&Config::None) {
        configs.insert(0, Config::None);
    }
    weft_tests::bins::require(&["weft-controller", "weft-agent", "weftctl", "weft"])?;
    let tools = Tools {
        iperf3: find_in_path("iperf3")?,
        nc: find_in_path("nc")?,
        weft: weft_tests::bins::path("weft")?,
    };
    find_in_path("nft")?;
    install_stop_handler()?;

    let out = match &args.out {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("weft-bench-policy-{}", unix_now())),
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("[bench] output in {}", out.display());

    let (busy, idle) = wait_idle(
        args.busy_threshold,
        Duration::from_secs(args.idle_wait_secs),
    )?;
    if !idle {
        eprintln!(
            "[bench] WARNING: host still {busy:.0}% busy after {}s; measuring anyway",
            args.idle_wait_secs
        );
    }

    eprintln!("[bench] building the lab: sites a, b; one node each; no WAN delay");
    let mut lab = Lab::builder()
        .sites(&["a", "b"])
        .nodes_per_site(1)
        .wan_delays_ms(&[])
        .try_build()?;
    ensure!(
        !lab.state().netem,
        "the WAN delay line runs although no delay was asked for"
    );
    let res = run_in_lab(&mut lab, args, &configs, &tools, &out);
    if res.is_err() {
        lab.print_log_tails();
    }
    drop(lab);
    res
}

#[derive(Debug)]
struct Tools {
    iperf3: PathBuf,
    nc: PathBuf,
    weft: PathBuf,
}

/// One measured value.
#[derive(Debug, Clone)]
struct Sample {
    round: u32,
    config: Config,
    metric: &'static str,
    value: f64,
}

#[derive(Debug)]
struct Bench<'a> {
    lab: &'a Lab,
    /// Policy map entries b1's agent reported with the Weft policy.
    entries: std::cell::Cell<Option<u64>>,
    b1: Ipv4Addr,
    rules: usize,
    policy_dir: PathBuf,
    /// Policy names; the last one's last rule allows the benchmark.
    policies: Vec<String>,
    nft_linear: PathBuf,
    nft_set: PathBuf,
    weft: PathBuf,
}

fn run_in_lab(
    lab: &mut Lab,
    args: &PolicyArgs,
    configs: &[Config],
    tools: &Tools,
    out: &Path,
) -> Result<()> {
    let nodes = lab.try_nodes()?;
    let v4 = |name: &str| -> Result<Ipv4Addr> {
        nodes
            .iter()
            .find(|n| n.name == name)
            .and_then(NodeInfo::ipv4)
            .ok_or_else(|| anyhow!("the controller lists no overlay IPv4 address for {name}"))
    };
    let (a1, b1) = (v4("a1")?, v4("b1")?);
    eprintln!(
        "[bench] a1 {a1} -> b1 {b1} (b1's overlay interface {})",
        lab.iface("b1")
    );
    // The connection-rate test opens up to 20,000 connections per run:
    // let a1 reuse ports in TIME_WAIT (its own namespace only).
    netns::sysctl(&lab.ns("a1"), "net.ipv4.tcp_tw_reuse=1")?;
    lab.try_weftctl_ok(&["node", "label", "a1", "role=client"])?;
    lab.try_weftctl_ok(&["node", "label", "b1", "role=bench"])?;

    let ip_port = IPERF_PORT.to_string();
    lab.spawn(
        "bench-iperf3",
        "b1",
        &tools.iperf3,
        &["-s".into(), "-p".into(), ip_port],
    )?;
    lab.spawn(
        "bench-rr",
        "b1",
        &tools.weft,
        &[
            "bench".into(),
            "rr-server".into(),
            "--port".into(),
            RR_PORT.to_string(),
        ],
    )?;
    lab.spawn(
        "bench-denied",
        "b1",
        &tools.nc,
        &["-l".into(), "-k".into(), DENIED_PORT.to_string()],
    )?;

    let policy_dir = out.join("policies");
    let nft_linear = out.join("nft-linear.nft");
    let nft_set = out.join("nft-set.nft");
    let iface = lab.iface("b1");
    let _ = fs::remove_dir_all(&policy_dir);
    fs::create_dir_all(&policy_dir)?;
    let mut policies = Vec::new();
    let mut size = 0;
    for (name, yaml) in policy_files(args.rules) {
        let f = policy_dir.join(format!("{name}.yaml"));
        fs::write(&f, &yaml).with_context(|| format!("writing {}", f.display()))?;
        size += yaml.len();
        policies.push(name);
    }
    fs::write(&nft_linear, nft_rules(args.rules, a1, &iface, false))?;
    fs::write(&nft_set, nft_rules(args.rules, a1, &iface, true))?;
    eprintln!(
        "[bench] {} rules: {} ({} files, {size} bytes), {}, {}",
        args.rules,
        policy_dir.display(),
        policies.len(),
        nft_linear.display(),
        nft_set.display()
    );

    let b = Bench {
        lab,
        entries: std::cell::Cell::new(None),
        b1,
        rules: args.rules,
        policy_dir,
        policies,
        nft_linear,
        nft_set,
        weft: tools.weft.clone(),
    };
    wait_for(
        Duration::from_secs(30),
        "a1 to reach b1's listeners",
        || Ok(b.probe(IPERF_PORT)? && b.probe(RR_PORT)? && b.probe(DENIED_PORT)?),
    )?;
    // Warm-up (not recorded): the path, the ARP caches, the servers.
    b.tcp(2).context("warm-up iperf3 run")?;

    let mut samples: Vec<Sample> = Vec::new();
    let mut busy_notes: Vec<String> = Vec::new();
    let started = Instant::now();
    let mut active = Config::None;
    let outcome = (|| -> Result<()> {
        for round in 1..=args.rounds {
            let mut order = configs.to_vec();
            let shift = (round as usize - 1) % order.len();
            order.rotate_left(shift);
            for &config in &order {
                check_stop()?;
                eprintln!(
                    "[bench] round {round}/{} config {}",
                    args.rounds,
                    config.key()
                );
                b.leave(active)?;
                active = Config::None;
                b.enter(config)?;
                active = config;
                let (busy, idle) = wait_idle(args.busy_threshold, Duration::from_secs(30))?;
                if !idle {
                    busy_notes.push(format!(
                        "round {round} {}: host {busy:.0}% busy before measuring",
                        config.key()
                    ));
                }
                let mut rec = |metric, value| {
                    samples.push(Sample {
                        round,
                        config,
                        metric,
                        value,
                    });
                };
                rec("host_busy_before_pct", busy);
                let (gbps, retrans) = b.tcp(args.tcp_secs)?;
                rec("tcp_gbps", gbps);
                rec("tcp_retransmits", retrans);
                if args.small_secs > 0 {
                    rec("udp64_rx_pps", b.udp64(args.small_secs)?);
                    rec("rr_tps", b.rr(args.small_secs, false)?);
                    rec("crr_cps", b.rr(args.small_secs, true)?);
                }
                if let Some(hits) = b.nft_allow_hits(config)? {
                    ensure!(
                        hits > 0,
                        "{}: the final nftables allow counted no packets: the benchmark \
                         did not take the hooked path",
                        config.key()
                    );
                    rec("nft_allow_hits", hits as f64);
                }
                check_stop()?;
            }
        }
        Ok(())
    })();
    // Leave the namespaces as they were found, also after an error.
    if let Err(e) = b.leave(active) {
        eprintln!("[bench] cleaning up config {}: {e:#}", active.key());
    }
    outcome?;

    let summary = summarize(
        &samples,
        configs,
        args,
        started.elapsed(),
        &busy_notes,
        b.entries.get(),
    );
    fs::write(out.join("samples.tsv"), samples_tsv(&samples))?;
    fs::write(out.join("summary.md"), &summary)?;
    println!("{summary}");
    eprintln!(
        "[bench] samples in {}, summary in {}",
        out.join("samples.tsv").display(),
        out.join("summary.md").display()
    );
    Ok(())
}

impl Bench<'_> {
    /// Puts `config`'s rules in place and checks they are enforced.
    fn enter(&self, config: Config) -> Result<()> {
        match config {
            Config::None => {
                ensure!(
                    self.probe(DENIED_PORT)?,
                    "no policy, yet a1 -> b1 TCP {DENIED_PORT} does not connect"
                );
                let e = self.explain(DENIED_PORT)?;
                ensure!(
                    e["reason"] == "not_governed",
                    "no policy, yet `policy explain` says {e}"
                );
            }
            Config::Weft => self.enter_weft()?,
            Config::NftLinear | Config::NftSet => {
                let file = if config == Config::NftLinear {
                    &self.nft_linear
                } else {
                    &self.nft_set
                };
                let f = file.display().to_string();
                let t0 = Instant::now();
                self.run_b1(60, &["nft", "-f", &f])?;
                let load = t0.elapsed();
                let listing = self.run_b1(60, &["nft", "list", "table", "ip", NFT_TABLE])?;
                let accepts = listing
                    .lines()
                    .filter(|l| l.contains("accept") && !l.contains("policy accept"))
                    .count();
                let elements = listing.matches(" . ").count();
                if config == Config::NftLinear {
                    ensure!(
                        accepts == self.rules,
                        "nftables holds {accepts} accept rules, expected {}",
                        self.rules
                    );
                } else {
                    ensure!(
                        elements >= self.rules - 1,
                        "the nftables set holds {elements} elements, expected {}",
                        self.rules - 1
                    );
                }
                ensure!(
                    !self.probe(DENIED_PORT)?,
                    "{}: a1 -> b1 TCP {DENIED_PORT} connects although no rule allows it",
                    config.key()
                );
                ensure!(
                    self.probe(RR_PORT)?,
                    "{}: a1 -> b1 TCP {RR_PORT} is dropped although the last rule allows it",
                    config.key()
                );
                let held = if config == Config::NftSet {
                    format!(
                        "{accepts} accept rules, a set of {} elements",
                        self.rules - 1
                    )
                } else {
                    format!("{accepts} accept rules")
                };
                eprintln!(
                    "[bench]   nftables loaded in {load:.2?}: {held}; TCP {DENIED_PORT} dropped, \
                     TCP {RR_PORT} allowed"
                );
            }
        }
        Ok(())
    }

    fn enter_weft(&self) -> Result<()> {
        let f = self.policy_dir.display().to_string();
        let t0 = Instant::now();
        let applied = self
            .lab
            .try_weftctl_ok(&["-o", "json", "apply", "-f", &f])?;
        let rev = json(&applied)?["revision"]
            .as_u64()
            .ok_or_else(|| anyhow!("`weftctl apply` printed no revision: {applied}"))?;
        self.wait_b1_revision(rev)?;
        let took = t0.elapsed();
        let entries = self.weft_entries()?;
        self.entries.set(Some(entries));
        ensure!(
            entries >= self.rules as u64,
            "b1's agent reports {entries} policy map entries, expected at least {}",
            self.rules
        );
        let allow = self.explain(IPERF_PORT)?;
        let last_policy = self.policies.last().map_or("", String::as_str);
        let last_rule = format!("ingress[{}]", (self.rules - 1) % RULES_PER_FILE);
        ensure!(
            allow["verdict"] == "allow"
                && allow["policy"] == last_policy
                && allow["rule"].as_str() == Some(last_rule.as_str()),
            "`policy explain --from a1 --to b1 --port {IPERF_PORT}/tcp` should name \
             policy {last_policy:?} {last_rule}, says {allow}"
        );
        let deny = self.explain(DENIED_PORT)?;
        ensure!(
            deny["verdict"] == "deny" && deny["reason"] == "default_deny",
            "`policy explain ... --port {DENIED_PORT}/tcp` should say default deny, says {deny}"
        );
        wait_for(
            Duration::from_secs(10),
            &format!("a1 -> b1 TCP {DENIED_PORT} to be dropped by the policy"),
            || Ok(!self.probe(DENIED_PORT)?),
        )?;
        ensure!(
            self.probe(RR_PORT)?,
            "weft: a1 -> b1 TCP {RR_PORT} is dropped although the last rule allows it"
        );
        eprintln!(
            "[bench]   policy applied and on b1 in {took:.2?}: {entries} map entries; explain: \
             {IPERF_PORT}/tcp allowed by {last_policy} {last_rule}, {DENIED_PORT}/tcp default deny \
             (probe dropped)"
        );
        Ok(())
    }

    /// Removes `config`'s rules; b1 is open again afterwards.
    fn leave(&self, config: Config) -> Result<()> {
        match config {
            Config::None => return Ok(()),
            Config::Weft => {
                let mut rev = 0;
                for name in &self.policies {
                    let out = self
                        .lab
                        .try_weftctl_ok(&["-o", "json", "delete", "policy", name])?;
                    rev = json(&out)?["revision"]
                        .as_u64()
                        .ok_or_else(|| anyhow!("`weftctl delete` printed no revision: {out}"))?;
                }
                self.wait_b1_revision(rev)?;
            }
            Config::NftLinear | Config::NftSet => {
                self.run_b1(30, &["nft", "delete", "table", "ip", NFT_TABLE])?;
            }
        }
        wait_for(
            Duration::from_secs(10),
            &format!("b1 to be open again after {}", config.key()),
            || self.probe(DENIED_PORT),
        )
    }

    fn wait_b1_revision(&self, rev: u64) -> Result<()> {
        wait_for(
            Duration::from_secs(30),
            &format!("b1's agent to apply revision {rev}"),
            || {
                let out = self
                    .lab
                    .try_weftctl_ok(&["-o", "json", "node", "get", "b1"])?;
                let info: NodeInfo = serde_json::from_str(&out)?;
                Ok(info.applied_revision >= rev)
            },
        )
    }

    /// `entries=` of the last "policy maps updated" line b1's agent logged.
    fn weft_entries(&self) -> Result<u64> {
        let logs = self.lab.dir().join("logs");
        let mut text = String::new();
        for ext in ["stdout", "stderr"] {
            text.push_str(
                &fs::read_to_string(logs.join(format!("agent-b1.{ext}"))).unwrap_or_default(),
            );
        }
        let line = text
            .lines()
            .rev()
            .find(|l| l.contains("policy maps updated"))
            .ok_or_else(|| anyhow!("b1's agent logged no \"policy maps updated\" line"))?;
        strip_ansi(line)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("entries=")?.parse().ok())
            .ok_or_else(|| anyhow!("no entries= in b1's agent log line: {line}"))
    }

    /// `weftctl -o json policy explain --from a1 --to b1 --port PORT/tcp`.
    fn explain(&self, port: u16) -> Result<serde_json::Value> {
        let p = format!("{port}/tcp");
        let out = self.lab.try_weftctl_ok(&[
            "-o", "json", "policy", "explain", "--from", "a1", "--to", "b1", "--port", &p,
        ])?;
        json(&out)
    }

    /// Whether a1 connects to b1's TCP `port` within about a second.
    fn probe(&self, port: u16) -> Result<bool> {
        check_stop()?;
        let (to, port) = (self.b1.to_string(), port.to_string());
        let out = netns::exec_in(
            &self.lab.ns("a1"),
            &["timeout", "3", "nc", "-z", "-w", "1", &to, &port],
        )?;
        Ok(out.status.success())
    }

    /// Runs a command in b1 (bounded), returns stdout.
    fn run_b1(&self, secs: u64, cmd: &[&str]) -> Result<String> {
        run_bounded(self.lab, "b1", secs, cmd)
    }

    /// iperf3 TCP, one stream, a1 -> b1: (Gbit/s received, retransmits).
    fn tcp(&self, secs: u64) -> Result<(f64, f64)> {
        let j = self.iperf3(secs, &[])?;
        let gbps = j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| anyhow!("iperf3 printed no end.sum_received"))?
            / 1e9;
        let retrans = j["end"]["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0);
        Ok((gbps, retrans))
    }

    /// 64-byte UDP datagrams at full rate a1 -> b1: datagrams/s b1 received,
    /// `weft bench udp-send` in a1 against `weft bench udp-sink` in b1 (no
    /// control connection that a flood could starve, unlike iperf3 UDP).
    fn udp64(&self, secs: u64) -> Result<f64> {
        let weft = self.weft.display().to_string();
        let to = format!("{}:{UDP_PORT}", self.b1);
        // The sink counts `secs` from the first datagram; the sender goes
        // on a little longer so that the window is always full.
        let (port, send_secs, sink_secs) = (
            UDP_PORT.to_string(),
            (secs + 1).to_string(),
            secs.to_string(),
        );
        let (sent, sunk) = std::thread::scope(|sc| {
            let sink = sc.spawn(|| {
                run_bounded(
                    self.lab,
                    "b1",
                    secs + 30,
                    &[
                        &weft, "bench", "udp-sink", "--port", &port, "--secs", &sink_secs,
                        "--wait", "5",
                    ],
                )
            });
            // Let the sink bind first.
            std::thread::sleep(Duration::from_millis(500));
            let sent = run_bounded(
                self.lab,
                "a1",
                secs + 30,
                &[
                    &weft, "bench", "udp-send", "--to", &to, "--secs", &send_secs,
                ],
            );
            let sunk = sink
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the UDP sink thread panicked")));
            (sent, sunk)
        });
        let (sent, sunk) = (json(&sent?)?, json(&sunk?)?);
        let packets = sunk["packets"].as_f64().unwrap_or(0.0);
        ensure!(packets > 0.0, "b1 received no UDP datagrams (sent: {sent})");
        // A flood b1 cannot keep up with leaves a backlog in the tunnel's
        // buffers: let it drain before the next test.
        wait_for(
            Duration::from_secs(60),
            "the path to drain after the UDP flood",
            || self.probe(RR_PORT),
        )?;
        Ok(packets / secs as f64)
    }

    fn iperf3(&self, secs: u64, extra: &[&str]) -> Result<serde_json::Value> {
        let (to, port, t) = (
            self.b1.to_string(),
            IPERF_PORT.to_string(),
            secs.to_string(),
        );
        let mut cmd = vec![
            "iperf3",
            "-c",
            &to,
            "-p",
            &port,
            "-t",
            &t,
            "-J",
            "--connect-timeout",
            "3000",
        ];
        cmd.extend_from_slice(extra);
        check_stop()?;
        let out = netns::exec_in(
            &self.lab.ns("a1"),
            &[&["timeout", &(secs + 30).to_string()], cmd.as_slice()].concat(),
        )?;
        check_stop()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let j: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
        if !out.status.success() || j.get("error").is_some() {
            bail!(
                "iperf3 {} failed ({}): {} {}",
                cmd.join(" "),
                out.status,
                j.get("error").map(ToString::to_string).unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(j)
    }

    /// 64-byte TCP request/response a1 -> b1: transactions/s, on one
    /// connection or on a new connection each (every SYN then meets the
    /// policy: a new flow).
    fn rr(&self, secs: u64, connect_each: bool) -> Result<f64> {
        let to = format!("{}:{RR_PORT}", self.b1);
        let weft = self.weft.display().to_string();
        let secs_s = secs.to_string();
        let mut cmd = vec![
            weft.as_str(),
            "bench",
            "rr-client",
            "--to",
            &to,
            "--secs",
            &secs_s,
        ];
        if connect_each {
            cmd.push("--connect-each");
        }
        let out = run_bounded(self.lab, "a1", secs + 30, &cmd)?;
        let j = json(&out)?;
        let n = j["transactions"].as_f64().unwrap_or(0.0);
        let s = j["secs"].as_f64().filter(|s| *s > 0.0).unwrap_or(1.0);
        Ok(n / s)
    }

    /// Packets the final nftables allow counted (None for Weft configs).
    fn nft_allow_hits(&self, config: Config) -> Result<Option<u64>> {
        if !matches!(config, Config::NftLinear | Config::NftSet) {
            return Ok(None);
        }
        let listing = self.run_b1(30, &["nft", "list", "chain", "ip", NFT_TABLE, "rules"])?;
        let hits = listing
            .lines()
            .filter(|l| l.contains("counter packets") && l.contains("accept"))
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "packets")?;
                words.next()?.parse::<u64>().ok()
            })
            .sum();
        Ok(Some(hits))
    }
}

/// The Weft policies, as (name, YAML): `rules - 1` rules that never match
/// the benchmark, then the one that allows it, [`RULES_PER_FILE`] a file.
fn policy_files(rules: usize) -> Vec<(String, String)> {
    let filler: Vec<u32> = filler_ports(rules).collect();
    let mut files = Vec::new();
    let mut next = 0;
    let mut index = 1;
    while next < rules {
        let take = RULES_PER_FILE.min(rules - next);
        let name = format!("{POLICY_PREFIX}-{index}");
        let mut s = format!(
            "# `weft bench policy`: rules {} to {} of {rules}; only the last rule of the \
             last file matches the benchmark flows.\n\
             apiVersion: weft.dev/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  \
             target: {{matchLabels: {{role: bench}}}}\n  ingress:\n",
            next + 1,
            next + take
        );
        for i in next..next + take {
            if let Some(port) = filler.get(i) {
                let _ = writeln!(
                    s,
                    "    - {{from: {{matchLabels: {{role: client}}}}, ports: [{{protocol: TCP, port: {port}}}]}}"
                );
            } else {
                let _ = writeln!(
                    s,
                    "    - from: {{matchLabels: {{role: client}}}}\n      ports: [{{protocol: TCP, port: {IPERF_PORT}}}, \
                     {{protocol: TCP, port: {RR_PORT}}}, {{protocol: UDP, port: {UDP_PORT}}}]"
                );
            }
        }
        files.push((name, s));
        next += take;
        index += 1;
    }
    files
}

/// The same rules for nftables, in b1's input hook for packets from its
/// overlay interface `iface`: linear, or the never-matching ones as a set.
fn nft_rules(rules: usize, a1: Ipv4Addr, iface: &str, as_set: bool) -> String {
    let mut s = format!(
        "# {rules} rules for `weft bench policy` (the nftables anchor).\n\
         table ip {NFT_TABLE} {{\n"
    );
    if as_set {
        s.push_str("  set fill {\n    type ipv4_addr . inet_service\n    elements = { ");
        for (i, port) in filler_ports(rules).enumerate() {
            let sep = if i == 0 { "" } else { ",\n      " };
            let _ = write!(s, "{sep}{a1} . {port}");
        }
        s.push_str(" }\n  }\n");
    }
    let _ = write!(
        s,
        "  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         iifname \"{iface}\" jump rules\n  }}\n  chain rules {{\n"
    );
    if as_set {
        if rules > 1 {
            s.push_str("    ip saddr . tcp dport @fill accept\n");
        }
    } else {
        for port in filler_ports(rules) {
            let _ = writeln!(s, "    ip saddr {a1} tcp dport {port} accept");
        }
    }
    let _ = write!(
        s,
        "    ip saddr {a1} meta l4proto . th dport {{ tcp . {IPERF_PORT}, tcp . {RR_PORT}, udp . {UDP_PORT} }} counter accept\n    \
         counter drop\n  }}\n}}\n"
    );
    s
}

/// Destination ports of the rules that never match: 10000, 10002, ...
/// (never adjacent, so no two merge into one range).
fn filler_ports(rules: usize) -> impl Iterator<Item = u32> {
    (0..rules.saturating_sub(1) as u32).map(|i| FILLER_BASE + 2 * i)
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn values(samples: &[Sample], config: Config, metric: &str) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s.config == config && s.metric == metric)
        .map(|s| s.value)
        .collect()
}

/// A summary row: sample metric, title, how a value is shown.
type Metric = (&'static str, &'static str, fn(f64) -> String);

fn summarize(
    samples: &[Sample],
    configs: &[Config],
    args: &PolicyArgs,
    took: Duration,
    busy_notes: &[String],
    entries: Option<u64>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Policy overhead, a1 -> b1 over the overlay (2 sites × 1 node, no WAN delay); \
         medians of {} rounds, ratio to \"no policy\" from this run:\n",
        args.rounds
    );
    let mut header = String::from("| metric |");
    let mut rule = String::from("|---|");
    for c in configs {
        let _ = write!(header, " {} |", c.title(args.rules));
        rule.push_str("---|");
    }
    let _ = writeln!(s, "{header}\n{rule}");
    let metrics: [Metric; 5] = [
        ("tcp_gbps", "TCP 1 stream, Gbit/s", |v| format!("{v:.2}")),
        ("udp64_rx_pps", "UDP 64 B received, pkt/s", |v| {
            format!("{:.1} k", v / 1e3)
        }),
        ("rr_tps", "TCP request/response 64 B, trans/s", |v| {
            format!("{:.1} k", v / 1e3)
        }),
        (
            "crr_cps",
            "TCP connect + request/response 64 B, conn/s",
            |v| format!("{:.2} k", v / 1e3),
        ),
        ("tcp_retransmits", "TCP retransmits per run", |v| {
            format!("{v:.0}")
        }),
    ];
    for (metric, title, fmt) in metrics {
        let Some(base) = median(&mut values(samples, Config::None, metric)) else {
            continue;
        };
        let mut row = format!("| {title} |");
        for &c in configs {
            let cell = match median(&mut values(samples, c, metric)) {
                None => "–".to_owned(),
                Some(v) if c == Config::None || metric == "tcp_retransmits" => fmt(v),
                Some(v) if base > 0.0 => format!("{} ({:.2}×)", fmt(v), v / base),
                Some(v) => fmt(v),
            };
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s, "\nTCP Gbit/s per round:\n");
    let _ = writeln!(s, "{header}\n{rule}");
    for round in 1..=args.rounds {
        let mut row = format!("| round {round} |");
        for &c in configs {
            let v = samples
                .iter()
                .find(|x| x.round == round && x.config == c && x.metric == "tcp_gbps")
                .map_or("–".to_owned(), |x| format!("{:.2}", x.value));
            let _ = write!(row, " {v} |");
        }
        let _ = writeln!(s, "{row}");
    }
    let busiest = samples
        .iter()
        .filter(|x| x.metric == "host_busy_before_pct")
        .map(|x| x.value)
        .fold(0.0_f64, f64::max);
    let _ = writeln!(
        s,
        "\n{} s TCP runs, {} s UDP and request/response runs; {} CPUs, kernel {}; \
         b1's policy map held {} entries with the Weft policy; host CPU at most {busiest:.0}% \
         busy in the second before a measurement; run took {:.0} s.",
        args.tcp_secs,
        args.small_secs,
        std::thread::available_parallelism().map_or(0, usize::from),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        entries.map_or("?".to_owned(), thousands),
        took.as_secs_f64()
    );
    if !busy_notes.is_empty() {
        let _ = writeln!(
            s,
            "\nWARNING: the host was busy (other work), figures are noisy: {}",
            busy_notes.join("; ")
        );
    }
    s
}

fn samples_tsv(samples: &[Sample]) -> String {
    let mut s = String::from("round\tconfig\tmetric\tvalue\n");
    for x in samples {
        let _ = writeln!(
            s,
            "{}\t{}\t{}\t{}",
            x.round,
            x.config.key(),
            x.metric,
            x.value
        );
    }
    s
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Runs `cmd` in namespace `ns` under `timeout secs`; fails on a non-zero
/// exit. Returns stdout.
fn run_bounded(lab: &Lab, ns: &str, secs: u64, cmd: &[&str]) -> Result<String> {
    check_stop()?;
    let t = secs.to_string();
    let full = [&["timeout", t.as_str()], cmd].concat();
    let out = netns::exec_in(&lab.ns(ns), &full)?;
    check_stop()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.trim().chars().take(2_000).collect();
        bail!("`{}` in {ns} failed ({}): {err}", cmd.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("expected JSON, got: {text}"))
}

/// Polls `cond` every 100 ms until it holds, `timeout` passes or a stop
/// signal arrives.
fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        check_stop()?;
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= timeout {
            let why = last_err
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{why}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (total, idle) jiffies of all CPUs from /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total = v.iter().sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

/// Host CPU busy percentage over one second.
fn busy_1s() -> f64 {
    let a = cpu_jiffies();
    std::thread::sleep(Duration::from_secs(1));
    match (a, cpu_jiffies()) {
        (Some((t0, i0)), Some((t1, i1))) if t1 > t0 => {
            100.0 * (1.0 - (i1.saturating_sub(i0)) as f64 / (t1 - t0) as f64)
        }
        _ => 0.0,
    }
}

/// Waits (at most `max`) for the host to be less than `threshold` % busy.
/// Returns the last reading and whether it got there.
fn wait_idle(threshold: f64, max: Duration) -> Result<(f64, bool)> {
    let start = Instant::now();
    let mut said = false;
    loop {
        check_stop()?;
        let busy = busy_1s();
        if busy < threshold {
            return Ok((busy, true));
        }
        if start.elapsed() >= max {
            return Ok((busy, false));
        }
        if !said {
            eprintln!(
                "[bench] host {busy:.0}% busy (other work); waiting up to {max:?} for it to calm down"
            );
            said = true;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set [`STOP`] instead of killing us, so the
/// lab is torn down on the way out.
#[allow(unsafe_code)]
fn install_stop_handler() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; no previous handler is relied upon.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

fn find_in_path(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} not found: run scripts/setup.sh"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_hold_the_rules() {
        let files = policy_files(10_000);
        assert_eq!(files.len(), 4);
        assert_eq!(files[3].0, "bench-4");
        let all: String = files.iter().map(|(_, y)| y.as_str()).collect();
        assert_eq!(all.matches("    - ").count(), 10_000);
        assert!(all.contains("port: 29996}"));
        assert!(!all.contains("port: 29998}"));
        assert!(
            files[3]
                .1
                .trim_end()
                .ends_with(&format!("{{protocol: UDP, port: {UDP_PORT}}}]"))
        );
        assert_eq!(policy_files(1).len(), 1);
        assert_eq!(policy_files(2_501).len(), 2);
    }

    #[test]
    fn nft_rules_match_the_policy() {
        let a1 = Ipv4Addr::new(100, 64, 0, 1);
        let linear = nft_rules(5, a1, "wf1234b1", false);
        assert_eq!(linear.matches("accept\n").count(), 5);
        assert!(linear.contains("ip saddr 100.64.0.1 tcp dport 10006 accept"));
        let set = nft_rules(5, a1, "wf1234b1", true);
        assert_eq!(set.matches("100.64.0.1 . ").count(), 4);
        for text in [&linear, &set] {
            assert!(text.contains("iifname \"wf1234b1\" jump rules"));
        }
    }

    #[test]
    fn medians_and_thousands() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
        assert_eq!(thousands(10_002), "10,002");
        assert_eq!(thousands(999), "999");
    }
}
