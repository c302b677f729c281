//! `weft`: developer tool. `weft lab up|status|cut|restore|down|clean`
//! manages a persistent network-namespace lab (3 sites × 2 nodes by default,
//! a controller) on this machine; `weft bench policy` measures what network
//! policy costs on the overlay path; `weft bench null-relay` is the
//! tunnel without cryptography that `bench/overlay.sh` measures as a floor.

mod bench_policy;
mod null_relay;
mod report_as;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use weft_tests::lab::STATE_ROOT;
use weft_tests::{Lab, LabState, Matrix, process};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "Weft developer tools")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// A persistent lab of network namespaces on this machine (needs root).
    #[command(subcommand)]
    Lab(LabCmd),
    /// Benchmarks on a lab of network namespaces (needs root).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// (Testing) sends reports to the controller as the node whose agent
    /// state dir is given, saying what the flags say (forged measurements).
    #[command(hide = true)]
    ReportAs(report_as::ReportAsArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Policy overhead: overlay throughput a1 -> b1 with no policy, with
    /// N rules (default 10,000) in Weft's eBPF policy, and with the same
    /// rules in nftables on b1 (a linear chain, and one set), alternated
    /// within rounds; prints medians and ratios to "no policy" as a
    /// markdown table.
    ///
    /// Builds its own lab (sites a and b, one node each, no WAN delay) and
    /// removes it when done, on error and on Ctrl-C. Needs iperf3, nc and
    /// nft; binaries are taken from the directory of this executable
    /// (override with WEFT_BIN_DIR).
    Policy(bench_policy::PolicyArgs),
    /// A userspace tunnel without cryptography, the floor of a TUN + UDP
    /// design: creates TUN device --tun (the caller adds addresses and
    /// routes and brings it up) and, in one thread, sends each packet read
    /// from it as-is in one UDP datagram from --listen to --peer, and writes
    /// each datagram from --peer as-is to it. Sleeps in poll(2), or with
    /// --busy-poll spins on non-blocking reads, yielding the CPU after each
    /// empty round but never sleeping (one CPU). Runs until SIGTERM or
    /// SIGINT. `bench/overlay.sh --impls null-relay,null-relay-spin`.
    NullRelay {
        /// TUN device to create.
        #[arg(long)]
        tun: String,
        /// Local UDP address.
        #[arg(long)]
        listen: SocketAddr,
        /// The other relay's UDP address.
        #[arg(long)]
        peer: SocketAddr,
        /// Spin on non-blocking reads (sched_yield(2) after each empty
        /// round) instead of sleeping in poll(2).
        #[arg(long)]
        busy_poll: bool,
    },
    /// (Internal) sends datagrams as fast as it can; prints JSON.
    #[command(hide = true)]
    UdpSend {
        /// Destination.
        #[arg(long)]
        to: SocketAddr,
        /// Duration in seconds.
        #[arg(long)]
        secs: u64,
        /// Datagram size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// (Internal) counts the datagrams arriving on a port for SECS
    /// seconds from the first one; prints JSON.
    #[command(hide = true)]
    UdpSink {
        /// UDP port to listen on (all addresses).
        #[arg(long)]
        port: u16,
        /// How long to count, in seconds from the first datagram.
        #[arg(long)]
        secs: u64,
        /// How long to wait for the first datagram, in seconds.
        #[arg(long, default_value_t = 5)]
        wait: u64,
    },
    /// (Internal) echo server for the request/response test.
    #[command(hide = true)]
    RrServer {
        /// TCP port to listen on (all addresses).
        #[arg(long)]
        port: u16,
    },
    /// (Internal) request/response client: sends SIZE bytes, waits for
    /// them back, for SECS seconds; prints JSON.
    #[command(hide = true)]
    RrClient {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
        /// Duration in seconds.
        #[arg(long)]
        secs: u64,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// A new TCP connection per transaction.
        #[arg(long)]
        connect_each: bool,
        /// Stop after this many transactions.
        #[arg(long, default_value_t = 20_000)]
        max: u64,
    },
}

#[derive(Debug, Subcommand)]
enum LabCmd {
    /// Build the lab and leave it running, then print the connectivity matrix.
    ///
    /// Namespaces `<P>-wan` (WAN router), `<P>-ctl` (weft-controller at
    /// 198.18.100.2:7443), `<P>-a|b|c` (site routers, uplinks 198.18.<i>.0/24,
    /// LANs 198.19.<i>.0/24) and `<P>-a1` ... `<P>-c2` (nodes running
    /// weft-agent, interface `wf<tag><node>`). Site uplinks get one-way WAN
    /// delays of 5/10/15 ms from a userspace delay line in the WAN router.
    /// Binaries are taken from the directory of this executable (override
    /// with WEFT_BIN_DIR). State: /run/weft-lab/lab.json.
    Up {
        /// Tear down an existing lab first.
        #[arg(long)]
        force: bool,
        /// Sites, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "a,b,c")]
        sites: Vec<String>,
        /// Nodes per site.
        #[arg(long, default_value_t = 2)]
        nodes_per_site: usize,
        /// Node counts of single sites, SITE=N, comma separated (e.g.
        /// `a=2,b=3`); other sites get --nodes-per-site.
        #[arg(long, value_delimiter = ',', value_parser = parse_site_count)]
        site_nodes: Vec<(String, usize)>,
        /// Sites behind NAT, comma separated: the site router masquerades its
        /// LAN and the WAN router has no route to it.
        #[arg(long, value_delimiter = ',')]
        nat_sites: Vec<String>,
        /// Sites behind a symmetric NAT, comma separated: like --nat-sites,
        /// but the masquerade picks a random public port per destination
        /// (`masquerade fully-random`).
        #[arg(long, value_delimiter = ',')]
        symmetric_nat_sites: Vec<String>,
        /// Seconds to wait for the WireGuard mesh to form.
        #[arg(long, default_value_t = 60)]
        mesh_timeout_secs: u64,
        /// Only namespaces and the underlay: no controller, no agents.
        #[arg(long)]
        topology_only: bool,
    },
    /// Show the lab's processes and reprint the connectivity matrix.
    Status,
    /// Cut the WAN path between two sites (both directions) while both keep
    /// their uplinks to the other sites and the controller.
    Cut {
        /// One site.
        a: String,
        /// The other site.
        b: String,
    },
    /// Restore a WAN path cut with `weft lab cut`.
    Restore {
        /// One site.
        a: String,
        /// The other site.
        b: String,
    },
    /// Kill the lab's processes (by recorded PID and start time) and delete
    /// its namespaces and files.
    Down,
    /// Tear down labs left behind by test processes that died (e.g. killed
    /// with Ctrl-C before their cleanup ran).
    Clean,
    /// (Internal) the WAN delay line the lab runs in its WAN router
    /// namespace: holds packets read from TUN device --tun for the one-way
    /// delays of their source and destination prefixes, then writes them back.
    #[command(hide = true)]
    WanDelay {
        /// TUN device to create.
        #[arg(long)]
        tun: String,
        /// PREFIX=MILLISECONDS, e.g. 198.19.1.0/24=5 (repeatable).
        #[arg(long = "rule")]
        rules: Vec<weft_tests::wan_delay::DelayRule>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Top::Lab(cmd) => lab(cmd),
        Top::Bench(cmd) => bench(cmd),
        Top::ReportAs(args) => report_as::run(&args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn lab(cmd: LabCmd) -> Result<()> {
    if !weft_tests::is_root() {
        bail!("`weft lab` creates network namespaces and must run as root (try sudo)");
    }
    match cmd {
        LabCmd::Up {
            force,
            sites,
            nodes_per_site,
            site_nodes,
            nat_sites,
            symmetric_nat_sites,
            mesh_timeout_secs,
            topology_only,
        } => up(&UpArgs {
            force,
            sites,
            nodes_per_site,
            site_nodes,
            nat_sites,
            symmetric_nat_sites,
            mesh_timeout_secs,
            topology_only,
        }),
        LabCmd::Status => status(),
        LabCmd::Cut { a, b } => cut(&a, &b, true),
        LabCmd::Restore { a, b } => cut(&a, &b, false),
        LabCmd::Down => down(),
        LabCmd::Clean => clean(),
        LabCmd::WanDelay { tun, rules } => weft_tests::wan_delay::run(&tun, &rules),
    }
}

fn bench(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Policy(args) => bench_policy::run(&args),
        BenchCmd::NullRelay {
            tun,
            listen,
            peer,
            busy_poll,
        } => null_relay::run(&tun, listen, peer, busy_poll),
        BenchCmd::RrServer { port } => bench_policy::rr_server(port),
        BenchCmd::UdpSend { to, secs, size } => bench_policy::udp_send(to, secs, size),
        BenchCmd::UdpSink { port, secs, wait } => bench_policy::udp_sink(port, secs, wait),
        BenchCmd::RrClient {
            to,
            secs,
            size,
            connect_each,
            max,
        } => bench_policy::rr_client(to, secs, size, connect_each, max),
    }
}

fn state_file() -> PathBuf {
    Path::new(STATE_ROOT).join("lab.json")
}

fn load(path: &Path) -> Result<LabState> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn parse_site_count(s: &str) -> Result<(String, usize), String> {
    let (site, n) = s
        .split_once('=')
        .ok_or_else(|| format!("expected SITE=N, got {s:?}"))?;
    let n = n
        .parse()
        .map_err(|e| format!("bad node count in {s:?}: {e}"))?;
    Ok((site.to_owned(), n))
}

#[derive(Debug)]
struct UpArgs {
    force: bool,
    sites: Vec<String>,
    nodes_per_site: usize,
    site_nodes: Vec<(String, usize)>,
    nat_sites: Vec<String>,
    symmetric_nat_sites: Vec<String>,
    mesh_timeout_secs: u64,
    topology_only: bool,
}

fn up(args: &UpArgs) -> Result<()> {
    let UpArgs {
        force,
        ref sites,
        nodes_per_site,
        ref site_nodes,
        ref nat_sites,
        ref symmetric_nat_sites,
        mesh_timeout_secs,
        topology_only,
    } = *args;
    let path = state_file();
    if path.exists() {
        if !force {
            let prefix = load(&path).map(|s| s.prefix).unwrap_or_else(|_| "?".into());
            bail!(
                "a lab already exists (prefix {prefix}, {}): use `weft lab status`, \
                 `weft lab down`, or `weft lab up --force` to rebuild it",
                path.display()
            );
        }
        down()?;
    }
    let counts: Vec<(&str, usize)> = sites
        .iter()
        .map(|site| {
            let n = site_nodes
                .iter()
                .rev()
                .find(|(s, _)| s == site)
                .map_or(nodes_per_site, |(_, n)| *n);
            (site.as_str(), n)
        })
        .collect();
    if let Some((unknown, _)) = site_nodes.iter().find(|(s, _)| !sites.contains(s)) {
        bail!("--site-nodes names site {unknown:?}, which is not in --sites {sites:?}");
    }
    let nat: Vec<&str> = nat_sites.iter().map(String::as_str).collect();
    let symmetric: Vec<&str> = symmetric_nat_sites.iter().map(String::as_str).collect();
    println!(
        "building lab: sites and node counts {counts:?}, NAT sites {nat:?}, symmetric \
         NAT sites {symmetric:?} (waiting up to {mesh_timeout_secs}s for the mesh)..."
    );
    let lab = Lab::builder()
        .site_nodes(&counts)
        .nat_sites(&nat)
        .symmetric_nat_sites(&symmetric)
        .mesh_timeout(Duration::from_secs(mesh_timeout_secs))
        .persistent(true)
        .topology_only(topology_only)
        .try_build()?;
    print_info(&lab);
    if topology_only {
        print!("{}", underlay_matrix(&lab));
    } else {
        let matrix = Matrix::measure(&lab, false, 3)?;
        print!("{}", matrix.render());
    }
    let st = lab.detach();
    println!(
        "lab {} is up (state in {}).",
        st.prefix,
        state_file().display()
    );
    Ok(())
}

fn print_info(lab: &Lab) {
    let st = lab.state();
    let weftctl = weft_tests::bins::path("weftctl")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "weftctl".into());
    println!("\nlab {}: dir {}", st.prefix, st.dir.display());
    if st.netem {
        let delays: Vec<String> = st
            .sites
            .iter()
            .map(|s| format!("{} {}ms", s.name, s.delay_ms))
            .collect();
        println!("WAN one-way delays: {}", delays.join(", "));
    } else {
        println!("WAN delays: none");
    }
    let nat: Vec<String> = st
        .sites
        .iter()
        .filter(|s| s.nat)
        .map(|s| {
            if s.symmetric_nat {
                format!("{} (symmetric)", s.name)
            } else {
                s.name.clone()
            }
        })
        .collect();
    if !nat.is_empty() {
        println!("sites behind NAT: {}", nat.join(", "));
    }
    if !st.cut_pairs.is_empty() {
        let cuts: Vec<String> = st
            .cut_pairs
            .iter()
            .map(|(a, b)| format!("{a} <-> {b}"))
            .collect();
        println!("cut WAN paths: {}", cuts.join(", "));
    }
    println!("\nnodes:");
    for n in &st.nodes {
        println!(
            "  {:<4} ns {:<10} underlay {:<13} iface {}",
            n.name, n.ns, n.underlay, n.iface
        );
    }
    if let Some(first) = st.nodes.first() {
        println!("\npoke around:");
        println!("  ip netns exec {} wg show {}", first.ns, first.iface);
        println!("  ip netns exec {} ip addr show {}", first.ns, first.iface);
        println!(
            "  ip netns exec {} {weftctl} --config {} node list",
            lab.ns("ctl"),
            lab.admin_conf().display()
        );
        println!("  logs: {}/logs/", st.dir.display());
        println!("  weft lab status | weft lab down");
    }
    println!();
}

fn status() -> Result<()> {
    let path = state_file();
    if !path.exists() {
        bail!(
            "no lab is up ({} missing); run `weft lab up`",
            path.display()
        );
    }
    let lab = Lab::attach(load(&path)?, path, false);
    println!("processes:");
    for p in &lab.state().procs {
        let alive = if process::is_alive(p) {
            "running"
        } else {
            "DEAD"
        };
        println!("  {:<14} pid {:<8} {alive}", p.key, p.pid);
    }
    print_info(&lab);
    if lab.state().procs.is_empty() {
        print!("{}", underlay_matrix(&lab));
    } else {
        let matrix = Matrix::measure(&lab, false, 3)?;
        print!("{}", matrix.render());
    }
    Ok(())
}

/// Underlay reachability (LAN addresses) between all nodes and the controller
/// namespace, for a topology-only lab.
fn underlay_matrix(lab: &Lab) -> String {
    let st = lab.state();
    let mut s = String::from("underlay reachability (one ping each):\n");
    let mut ok = 0;
    let mut all = 0;
    for from in &st.nodes {
        let mut row = format!("  {:<4}", from.name);
        for to in &st.nodes {
            if to.name == from.name {
                row.push_str("    ·");
                continue;
            }
            all += 1;
            let reached = lab.ping_once(&from.ns, to.underlay.into(), 1000);
            ok += usize::from(reached);
            row.push_str(if reached { "   ok" } else { " FAIL" });
        }
        s.push_str(&row);
        s.push('\n');
    }
    s.push_str(&format!("{ok}/{all} underlay pairs reachable\n"));
    s
}

fn cut(a: &str, b: &str, cut: bool) -> Result<()> {
    let path = state_file();
    if !path.exists() {
        bail!(
            "no lab is up ({} missing); run `weft lab up`",
            path.display()
        );
    }
    let mut lab = Lab::attach(load(&path)?, path, false);
    if cut {
        lab.try_cut_pair(a, b)?;
        println!("WAN path {a} <-> {b} cut (`weft lab restore {a} {b}` undoes it)");
    } else {
        lab.try_restore_pair(a, b)?;
        println!("WAN path {a} <-> {b} restored");
    }
    Ok(())
}

fn down() -> Result<()> {
    let path = state_file();
    if !path.exists() {
        println!("no lab is up ({} missing); nothing to do", path.display());
        return Ok(());
    }
    let st = load(&path)?;
    let prefix = st.prefix.clone();
    let mut lab = Lab::attach(st, path, true);
    lab.teardown(false);
    println!("lab {prefix} is down: processes stopped, namespaces deleted");
    Ok(())
}

fn clean() -> Result<()> {
    let cleaned = weft_tests::lab::clean_stale_test_labs();
    for prefix in &cleaned {
        println!("{prefix}: stale test lab torn down");
    }
    println!("{} stale lab(s) cleaned", cleaned.len());
    Ok(())
}
