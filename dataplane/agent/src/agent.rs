//! Agent mode: enrol once, then keep the tunnel and interface in line with
//! the config the controller streams; keep forwarding with the last applied
//! config while the controller is away.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tracing::{error, info, warn};
use weft_dataplane_core::fallback::{effective_peers, fallback_targets};
use weft_dataplane_core::plan::{apply_peer_actions, plan_peers};
use weft_dataplane_core::policy_maps;
use weft_dataplane_core::route_guard::{self, Protected, Refusal};
use weft_dataplane_core::{Key, NodeConfig, PeerConfig};
use weft_proto::client::connect;
use weft_proto::pb::{self, agent_service_client::AgentServiceClient};

use crate::bpf::policy::{LinkLayer, PolicyDatapath};
use crate::credentials::{self, Validity};
use crate::enrol::{Enrolment, enrol};
use crate::netlink::Netlink;
use crate::state::{Identity, PendingKey, StateDir, new_private_key, public_key};
use crate::tunnel::{self, Destinations, TunnelDrops, TunnelHandle, TunnelSettings};

/// How often the agent reports peer status to the controller.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the agent looks at the policy verdict counters (logged when
/// they change).
const POLICY_COUNTERS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the agent looks at the probes for peers found dead or back.
const DEAD_PEERS_INTERVAL: Duration = Duration::from_secs(1);
/// Settled probes a peer needs before the agent may find it dead.
const DEAD_MIN_SAMPLES: u32 = 3;

/// Flags of agent mode.
#[derive(Debug, clap::Args)]
pub(crate) struct AgentArgs {
    /// Directory for the node's private key (0600), identity and last
    /// applied config. Keep it across restarts: it is the node's identity.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft-agent")]
    state_dir: PathBuf,

    /// Controller URL, https://HOST:PORT. Needed only to enrol; afterwards
    /// the URL stored in the state dir is used.
    #[arg(long, env = "WEFT_CONTROLLER")]
    controller: Option<String>,

    /// Single-use join token from `weftctl token create`. Needed only to
    /// enrol; ignored once the node is enrolled.
    #[arg(long, env = "WEFT_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,

    /// Node name, unique in the network (default: the host name).
    #[arg(long, env = "WEFT_NODE_NAME")]
    name: Option<String>,

    /// Name of the TUN interface to create (at most 15 characters; must be
    /// unique per machine, since the UAPI socket directory is shared by all
    /// network namespaces).
    #[arg(long, env = "WEFT_INTERFACE", default_value = "weft0")]
    interface: String,

    /// UDP port for WireGuard.
    #[arg(long, env = "WEFT_LISTEN_PORT", default_value_t = 51820)]
    listen_port: u16,

    /// UDP port of peer probes (round-trip time, loss, reachability to each
    /// peer's endpoint, reported to the controller); the same on every
    /// node. 0 turns probing off.
    #[arg(long, env = "WEFT_PROBE_PORT", default_value_t = crate::probe::DEFAULT_PORT)]
    probe_port: u16,

    /// Node-side interface leading to workloads (a veth or bridge port);
    /// repeatable. The policy classifiers are attached to it too, so
    /// traffic from this node (and its other workloads) to the workloads
    /// is governed, not only traffic arriving through the tunnel. The agent
    /// refuses to start if the interface does not exist.
    #[arg(long = "workload-interface", value_name = "IFNAME")]
    workload_interfaces: Vec<String>,

    /// Underlay endpoint IP:PORT to advertise to peers (default: the address
    /// the controller sees this agent connect from, with --listen-port).
    #[arg(long, env = "WEFT_ENDPOINT")]
    endpoint: Option<SocketAddr>,

    /// Directory of the WireGuard UAPI socket `<dir>/<interface>.sock`,
    /// where `wg show` looks.
    #[arg(long, env = "WEFT_UAPI_DIR", default_value = tunnel::DEFAULT_UAPI_DIR)]
    uapi_dir: PathBuf,

    #[command(flatten)]
    poll: tunnel::PollArgs,

    /// Label KEY=VALUE that network policy selects this node by; repeat
    /// for several (WEFT_LABELS: comma-separated). The node's labels are
    /// the ones its join token grants (`weftctl token create --label`):
    /// these may only restate them, any other refuses the enrolment. Sent
    /// when enrolling only; an operator changes them later with `weftctl
    /// node label`.
    #[arg(
        long = "label",
        env = "WEFT_LABELS",
        value_name = "KEY=VALUE",
        value_delimiter = ',',
        value_parser = parse_label
    )]
    labels: Vec<(String, String)>,

    /// Workload prefix this node routes for (containers or VMs behind it),
    /// with optional labels policy selects the workload by:
    /// CIDR[:KEY=VALUE,KEY=VALUE], e.g. 100.100.2.0/24:app=pg. Repeat for
    /// several (WEFT_ADVERTISE: space-separated). Sent at every connection.
    /// The controller approves a prefix at once only inside the prefixes
    /// the node's join token allows (`weftctl token create
    /// --allow-prefix`), with labels the node was granted, and if it
    /// passes its checks (no overlap with another node's prefix or the
    /// overlay pools, not shorter than the minimum, covering no controller
    /// address or member endpoint); any other stays pending, shown by
    /// `weftctl node get`, until an operator approves it with `weftctl node
    /// advertise`. An approved prefix is never relabelled from here;
    /// withdraw with `weftctl node withdraw`.
    #[arg(
        long = "advertise",
        env = "WEFT_ADVERTISE",
        value_name = "CIDR[:KEY=VALUE,...]",
        value_delimiter = ' ',
        value_parser = parse_advertisement
    )]
    advertise: Vec<pb::Workload>,

    /// Routing table for the routes to other nodes' workload prefixes
    /// (one `ip rule` per address family, priority 5182, looks it up).
    /// Only routes Weft marked as its own (proto 87) in it are changed.
    #[arg(
        long,
        env = "WEFT_ROUTE_TABLE",
        default_value_t = weft_dataplane_core::routes::DEFAULT_ROUTE_TABLE,
        value_parser = clap::value_parser!(u32).range(1..=0xffff_fffe)
    )]
    route_table: u32,

    /// Mark (SO_MARK) on the agent's own packets: WireGuard, peer probes
    /// and the controller connection. Weft's routing rule matches only
    /// packets without it, so no route in Weft's table can capture the
    /// traffic that carries the overlay. Decimal or 0x-hex; 0 turns the
    /// exemption off.
    #[arg(
        long,
        env = "WEFT_FWMARK",
        default_value_t = weft_dataplane_core::routes::DEFAULT_FWMARK,
        value_parser = parse_mark
    )]
    fwmark: u32,

    /// Shortest IPv4 prefix the agent routes into the tunnel (kernel
    /// routes and peers' allowed IPs); a shorter one from the controller
    /// is refused, as is any prefix covering the controller, a peer's
    /// endpoint, or this host's own addresses and routes.
    #[arg(
        long,
        env = "WEFT_MIN_ROUTE_PREFIX_V4",
        default_value_t = route_guard::DEFAULT_MIN_PREFIX_V4,
        value_parser = clap::value_parser!(u8).range(0..=32)
    )]
    min_route_prefix_v4: u8,

    /// Shortest IPv6 prefix the agent routes into the tunnel (see
    /// --min-route-prefix-v4).
    #[arg(
        long,
        env = "WEFT_MIN_ROUTE_PREFIX_V6",
        default_value_t = route_guard::DEFAULT_MIN_PREFIX_V6,
        value_parser = clap::value_parser!(u8).range(0..=128)
    )]
    min_route_prefix_v6: u8,

    /// Rotate the node's WireGuard key once connected to the controller:
    /// a new key is generated and kept in the state dir until the
    /// controller has handed it to every peer, then the tunnel switches to
    /// it (peers wait one handshake). Rotates at every start with this
    /// flag; `weftctl node rotate-key NODE` asks a running agent instead.
    #[arg(long, env = "WEFT_ROTATE_KEY")]
    rotate_key: bool,
}

/// Parses a mark in decimal or 0x-hex.
fn parse_mark(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a mark (a 32-bit number, decimal or 0x-hex): {e}"))
}

/// Parses `KEY=VALUE` (the controller checks the key and value).
fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Parses `CIDR[:KEY=VALUE,...]`; the labels start at the first ':' after
/// the prefix length (IPv6 addresses have colons of their own).
fn parse_advertisement(s: &str) -> Result<pb::Workload, String> {
    let slash = s
        .find('/')
        .ok_or_else(|| format!("{s:?} is not CIDR[:KEY=VALUE,...]: no prefix length"))?;
    let (prefix, labels) = match s[slash..].find(':') {
        Some(i) => (&s[..slash + i], &s[slash + i + 1..]),
        None => (s, ""),
    };
    let net: ipnet::IpNet = prefix
        .parse()
        .map_err(|e| format!("{prefix:?} is not a CIDR ({e})"))?;
    let labels = labels
        .split(',')
        .filter(|l| !l.trim().is_empty())
        .map(parse_label)
        .collect::<Result<_, _>>()?;
    Ok(pb::Workload {
        prefix: net.to_string(),
        labels,
        reason: String::new(),
    })
}

pub(crate) fn main(args: AgentArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: AgentArgs) -> Result<()> {
    let state = StateDir::open(&args.state_dir)?;
    let enrolled = state.has_identity();
    let private_key = state.load_or_create_key(!enrolled)?;
    let identity = match state.load_identity()? {
        Some(id) => {
            if args.join_token.is_some() {
                info!(node = %id.node_id, "already enrolled; ignoring --join-token");
            }
            id
        }
        None => {
            let (Some(url), Some(token)) = (args.controller.as_deref(), args.join_token.as_deref())
            else {
                bail!(
                    "this node is not enrolled yet ({} has no identity): pass --controller https://HOST:PORT \
                     and --join-token TOKEN (from `weftctl token create --site SITE`)",
                    args.state_dir.display()
                );
            };
            let name = match &args.name {
                Some(n) => n.clone(),
                None => hostname()?,
            };
            let public_key = public_key(&private_key);
            info!(controller = url, name = %name, public_key = %public_key, "enrolling");
            let id = enrol(Enrolment {
                controller_url: url,
                token,
                name: &name,
                public_key,
                endpoint: args.endpoint,
                listen_port: args.listen_port,
                labels: args.labels.iter().cloned().collect(),
            })
            .await?;
            state.save_identity(&id)?;
            info!(node = %id.node_id, name = %id.name, "enrolled");
            id
        }
    };
    if args.rotate_key {
        match state.load_pending_key()? {
            Some(p) => info!(
                generation = p.generation,
                "--rotate-key: a key rotation is under way already; finishing it"
            ),
            None => {
                let pending = PendingKey {
                    private_key: new_private_key(),
                    generation: identity.key_generation.saturating_add(1),
                };
                state.save_pending_key(&pending)?;
                info!(
                    generation = pending.generation,
                    "--rotate-key: new WireGuard key generated; it replaces the current one once the controller accepts it"
                );
            }
        }
    }

    let tunnel = tunnel::start(TunnelSettings {
        ifname: args.interface.clone(),
        listen_port: args.listen_port,
        private_key: Some(private_key),
        mtu: weft_dataplane_core::config::DEFAULT_MTU,
        uapi_dir: args.uapi_dir.clone(),
        polling: args.poll.busy_poll,
        fwmark: args.fwmark,
    })
    .await?;
    // Packet and byte counters on the TUN device (eBPF); the agent works without them.
    let overlay_counters = crate::bpf::OverlayCounters::attach(tunnel.ifname())
        .inspect_err(|e| warn!(error = %format!("{e:#}"), "eBPF overlay counters unavailable"))
        .ok();
    // Network policy: ingress enforcement on the TUN device, attached
    // before the persisted config is re-applied (so a restarted agent
    // enforces its last policy as soon as its peers are back). The maps
    // start empty (nothing governed: everything passes) until a config
    // fills them. If the programs cannot be loaded the agent still
    // forwards, but `Applier::apply` refuses any config whose policy
    // governs this node rather than silently failing open.
    let policy = match load_policy_datapath(tunnel.ifname()) {
        Ok(d) => {
            info!(ifname = %tunnel.ifname(), "eBPF policy datapath attached");
            Some(Arc::new(Mutex::new(d)))
        }
        Err(e) => {
            error!(
                error = %format!("{e:#}"),
                "eBPF policy datapath unavailable: configs whose policy governs this node will be refused"
            );
            None
        }
    };
    let counters_task = policy.clone().map(|p| tokio::spawn(log_policy_counters(p)));
    let mut workload_policy = Vec::new();
    for ifname in &args.workload_interfaces {
        let mut datapath = PolicyDatapath::load(LinkLayer::Ethernet).with_context(|| {
            format!("loading the policy classifiers for workload interface {ifname}")
        })?;
        datapath
            .attach_workload(ifname, tunnel.ifname())
            .with_context(|| format!("workload interface {ifname}"))?;
        info!(ifname = %ifname, "eBPF policy datapath attached to a workload interface");
        workload_policy.push(datapath);
    }
    let probes = if args.probe_port == 0 {
        None
    } else {
        crate::probe::start(args.probe_port, tunnel.clone(), args.fwmark)
            .inspect_err(|e| warn!(error = %format!("{e:#}"), "peer probes unavailable"))
            .ok()
    };
    let routing = SharedRouting::default();
    // Peers found dead hand their routes to their fallbacks, whether the
    // controller is connected or not (the agent may run headless).
    let dead_peers_task = probes
        .clone()
        .map(|p| tokio::spawn(watch_dead_peers(routing.clone(), p, tunnel.clone())));
    let mut applier = Applier {
        tunnel: tunnel.clone(),
        netlink: Netlink::open()?,
        ifname: args.interface.clone(),
        routing,
        applied: None,
        state,
        policy,
        last_error: String::new(),
        probes,
        route_table: args.route_table,
        workload_policy,
        fwmark: args.fwmark,
        guard: Protected {
            controller: controller_addresses(&identity.controller_url).await,
            underlay: Vec::new(),
            min_prefix_v4: args.min_route_prefix_v4,
            min_prefix_v6: args.min_route_prefix_v6,
        },
    };
    if let Some(cfg) = applier.state.load_config()? {
        info!(
            revision = cfg.revision,
            peers = cfg.peers.len(),
            "re-applying the persisted config"
        );
        match applier.apply(cfg, false).await {
            Ok(refused) => applier.last_error = refusals_error(&refused),
            Err(e) => {
                error!(error = %format!("{e:#}"), "re-applying the persisted config failed");
            }
        }
    }

    let result = tokio::select! {
        r = controller_loop(&mut applier, identity, &args) => r,
        () = shutdown_signal() => Ok(()),
        () = tunnel.closed() => Err(anyhow::anyhow!("the tunnel stopped unexpectedly")),
    };
    if let Some(s) = overlay_counters.as_ref().and_then(|c| c.read().ok()) {
        info!(
            ingress_packets = s.ingress.packets,
            ingress_bytes = s.ingress.bytes,
            egress_packets = s.egress.packets,
            egress_bytes = s.egress.bytes,
            "overlay counters"
        );
    }
    if let Some(t) = counters_task {
        t.abort();
    }
    if let Some(t) = dead_peers_task {
        t.abort();
    }
    tunnel.shutdown().await;
    result
}

fn load_policy_datapath(ifname: &str) -> Result<PolicyDatapath> {
    let mut datapath = PolicyDatapath::load(LinkLayer::Ip)?;
    datapath.attach(ifname)?;
    Ok(datapath)
}

/// Logs the policy verdict counters (summed over CPUs) whenever they
/// change, at most once per [`POLICY_COUNTERS_INTERVAL`].
async fn log_policy_counters(policy: Arc<Mutex<PolicyDatapath>>) {
    use weft_ebpf_common::policy::PolicyVerdict;
    let mut last = None;
    let mut tick = tokio::time::interval(POLICY_COUNTERS_INTERVAL);
    loop {
        tick.tick().await;
        let counters = match policy.lock() {
            Ok(p) => p.verdict_counters(),
            Err(_) => return,
        };
        let Ok(c) = counters else { continue };
        let packets = |v: PolicyVerdict| c[v.index() as usize].packets;
        // Ingress verdicts only: egress moves with every packet sent.
        let now = [
            PolicyVerdict::Allowed,
            PolicyVerdict::Denied,
            PolicyVerdict::DefaultDenied,
            PolicyVerdict::Unparsable,
            PolicyVerdict::NotGoverned,
            PolicyVerdict::Established,
            PolicyVerdict::Forwarded,
        ]
        .map(packets);
        if last == Some(now) {
            continue;
        }
        last = Some(now);
        info!(
            allowed = packets(PolicyVerdict::Allowed),
            denied = packets(PolicyVerdict::Denied),
            default_denied = packets(PolicyVerdict::DefaultDenied),
            unparsable = packets(PolicyVerdict::Unparsable),
            not_governed = packets(PolicyVerdict::NotGoverned),
            established = packets(PolicyVerdict::Established),
            forwarded = packets(PolicyVerdict::Forwarded),
            "policy counters (packets)"
        );
    }
}

/// How reports and `weftctl node get` name a verdict.
fn verdict_name(v: weft_ebpf_common::policy::PolicyVerdict) -> &'static str {
    use weft_ebpf_common::policy::PolicyVerdict;
    match v {
        PolicyVerdict::Allowed => "allowed",
        PolicyVerdict::Denied => "denied",
        PolicyVerdict::DefaultDenied => "default_denied",
        PolicyVerdict::Unparsable => "unparsable",
        PolicyVerdict::NotGoverned => "not_governed",
        PolicyVerdict::EgressPassed => "egress",
        PolicyVerdict::Established => "established",
        PolicyVerdict::Forwarded => "forwarded",
    }
}

/// What a report says of refused prefixes: empty when there are none.
fn refusals_error(refused: &[Refusal]) -> String {
    if refused.is_empty() {
        String::new()
    } else {
        format!(
            "applied without {} unsafe prefixes: {}",
            refused.len(),
            route_guard::summary(refused)
        )
    }
}

/// The controller's addresses, from its URL `https://HOST:PORT` (a host
/// name is resolved; none if it cannot be, which is logged).
async fn controller_addresses(url: &str) -> Vec<std::net::IpAddr> {
    let authority = url
        .strip_prefix("https://")
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let host_port = if authority.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (!h.contains(':') || h.ends_with(']'))
    }) {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    };
    match tokio::net::lookup_host(host_port.as_str()).await {
        Ok(addrs) => {
            let mut ips: Vec<std::net::IpAddr> = addrs.map(|a| a.ip().to_canonical()).collect();
            ips.sort();
            ips.dedup();
            ips
        }
        Err(e) => {
            warn!(controller = url, error = %e, "cannot resolve the controller's address: routes covering it cannot be refused");
            Vec::new()
        }
    }
}

fn hostname() -> Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(name.trim().to_ascii_lowercase())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}

/// Applies configs by diff and remembers what it applied.
struct Applier {
    tunnel: TunnelHandle,
    netlink: Netlink,
    ifname: String,
    /// The tunnel's peers: desired, found dead, applied.
    routing: SharedRouting,
    applied: Option<NodeConfig>,
    state: StateDir,
    /// The policy datapath on the TUN device; `None` if it could not be
    /// loaded (then configs that govern this node are refused).
    policy: Option<Arc<Mutex<PolicyDatapath>>>,
    /// Why the last config from the controller was not applied (empty:
    /// it was).
    last_error: String,
    /// Peer probe statistics; `None` when probing is off or failed to start.
    probes: Option<crate::probe::SharedStats>,
    /// The policy datapaths of workload interfaces, kept equal to the main
    /// one's maps.
    workload_policy: Vec<PolicyDatapath>,
    /// Weft's routing table (workload prefixes of other nodes).
    route_table: u32,
    /// The mark Weft's routing rule exempts (0: none).
    fwmark: u32,
    /// What no prefix from the controller may capture (the underlay is
    /// observed again at each apply).
    guard: Protected,
}

impl Applier {
    /// Applies `cfg` without the prefixes this node refuses to route
    /// (returned; each is logged); persists `cfg` as received, so that a
    /// restart checks it again against the host as it is then.
    async fn apply(&mut self, received: NodeConfig, persist: bool) -> Result<Vec<Refusal>> {
        self.guard.underlay = self
            .netlink
            .underlay(&self.ifname)
            .await
            .context("reading this host's own addresses and routes")?;
        let (cfg, refused) = route_guard::guard(received.clone(), &self.guard);
        for r in &refused {
            warn!(
                revision = received.revision,
                prefix = %r.prefix,
                peer = r.place.peer().unwrap_or("-"),
                place = %r.place,
                reason = %r.reason,
                "refused to route an unsafe prefix"
            );
        }
        // Policy first, so that peers and addresses added below never see
        // traffic before the policy that governs them is in the maps.
        self.apply_policy(&cfg)?;
        // Destinations before peers: a new peer never reaches more than
        // this config lets it.
        self.tunnel.set_destinations(Destinations::of(&cfg)).await?;
        self.netlink
            .apply_interface(&self.ifname, &cfg.addresses, cfg.mtu)
            .await?;
        {
            let mut routing = self.routing.lock().await;
            let dead = dead_peers(self.probes.as_ref(), &cfg.peers);
            log_fallbacks(&routing.desired, &routing.dead, &cfg.peers, &dead);
            routing.desired = cfg.peers.clone();
            routing.dead = dead;
            routing.sync(&self.tunnel, Some(cfg.revision)).await?;
        }
        // Workload prefixes: forwarding on when this node routes for some,
        // then the routes to other nodes' prefixes into the tunnel.
        if cfg.forwarding {
            crate::sysctl::enable_forwarding()?;
        }
        self.netlink
            .apply_routes(&self.ifname, self.route_table, &cfg.routes, self.fwmark)
            .await?;
        if persist {
            self.state.save_config(&received)?;
        }
        self.applied = Some(cfg);
        Ok(refused)
    }

    /// Lowers the config's policy and brings the live maps to it by a
    /// diff (no program reload).
    fn apply_policy(&mut self, cfg: &NodeConfig) -> Result<()> {
        let maps = policy_maps::lower(&cfg.policy)
            .with_context(|| format!("revision {}: invalid policy", cfg.revision))?;
        for datapath in &mut self.workload_policy {
            datapath
                .sync(&maps)
                .context("updating a workload interface's policy maps")?;
        }
        let Some(policy) = &self.policy else {
            if cfg.policy.governed.is_empty() {
                return Ok(());
            }
            bail!(
                "revision {}: policy governs {} identities on this node but the eBPF policy \
                 datapath is not loaded; refusing the config rather than failing open",
                cfg.revision,
                cfg.policy.governed.len()
            );
        };
        let mut policy = policy
            .lock()
            .map_err(|_| anyhow::anyhow!("policy datapath lock poisoned"))?;
        let report = policy.sync(&maps).context("updating the policy maps")?;
        if !report.change.is_empty() {
            info!(
                revision = cfg.revision,
                governed = maps.governed.len(),
                hosted = maps.hosted.len(),
                entries = maps.policy.len(),
                change = %report.change,
                written = report.written,
                epoch = policy.active_epoch(),
                flows_revoked = report.flows_revoked,
                "policy maps updated"
            );
        }
        Ok(())
    }

    /// What a prompt report watches: verdict counts, peer reachability and
    /// peer endpoints.
    async fn watched(&self) -> Watched {
        let endpoints = self
            .tunnel
            .peers()
            .await
            .map(|peers| {
                peers
                    .into_iter()
                    .map(|p| (p.public_key, p.endpoint))
                    .collect()
            })
            .unwrap_or_default();
        let reachable = self
            .probes
            .as_ref()
            .and_then(|p| p.lock().ok())
            .map(|s| s.iter().map(|(k, v)| (*k, v.reachable)).collect())
            .unwrap_or_default();
        Watched {
            verdicts: self.verdict_packets(),
            reachable,
            endpoints,
            drops: self.tunnel.drops().await.unwrap_or_default(),
        }
    }

    /// Packets per verdict, `None` without a policy datapath.
    fn verdict_packets(&self) -> Option<Vec<u64>> {
        let policy = self.policy.as_ref()?.lock().ok()?;
        let mut packets: Vec<u64> = policy
            .verdict_counters()
            .ok()?
            .iter()
            .map(|c| c.packets)
            .collect();
        for datapath in &self.workload_policy {
            for (total, c) in packets.iter_mut().zip(datapath.verdict_counters().ok()?) {
                *total = total.wrapping_add(c.packets);
            }
        }
        Some(packets)
    }

    /// The policy datapath's counters, with the applied policy's rule
    /// names; `None` without a policy datapath.
    fn policy_status(&self) -> Option<pb::PolicyStatus> {
        let policy = self.policy.as_ref()?.lock().ok()?;
        // The TUN device's and every workload interface's: a packet is
        // judged (and counted) at one of them only.
        let counters = std::iter::once(&*policy)
            .chain(self.workload_policy.iter())
            .map(PolicyDatapath::counters)
            .try_fold(crate::bpf::policy::PolicyCounters::default(), |total, c| {
                c.map(|c| total.merge(&c))
            });
        let counters = match counters {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading the policy counters failed");
                return None;
            }
        };
        let input = self.applied.as_ref().map(|c| &c.policy);
        let verdicts = weft_ebpf_common::policy::PolicyVerdict::ALL
            .iter()
            .map(|&v| {
                let c = counters.verdict(v);
                pb::VerdictCounter {
                    verdict: verdict_name(v).to_owned(),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        let rules = counters
            .rules
            .iter()
            .filter(|(_, c)| c.packets != 0)
            .map(|(&slot, c)| pb::RuleCounter {
                rule: input
                    .and_then(|p| p.rule_name(slot))
                    .map_or_else(|| format!("rule slot {slot}"), str::to_owned),
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect();
        let tracked_flows = policy.tracked_flow_count().unwrap_or(0);
        Some(pb::PolicyStatus {
            verdicts,
            rules,
            tracked_flows,
        })
    }

    fn revision(&self) -> u64 {
        self.applied.as_ref().map(|c| c.revision).unwrap_or(0)
    }
}

/// The tunnel's peers: as the controller wants them, the peers the probes
/// find dead, and what is applied: the desired peers with each dead peer's
/// routes moved to its first live fallback ([`effective_peers`]).
#[derive(Debug, Default)]
struct PeerRouting {
    desired: BTreeMap<Key, PeerConfig>,
    dead: BTreeSet<Key>,
    /// Peers as last applied to the tunnel.
    applied: BTreeMap<Key, PeerConfig>,
}

/// Shared by the applier and [`watch_dead_peers`]; an async lock, held
/// across the tunnel call so that changes reach the tunnel in order.
type SharedRouting = Arc<tokio::sync::Mutex<PeerRouting>>;

impl PeerRouting {
    /// Brings the tunnel's peers to the effective ones, by diff.
    async fn sync(&mut self, tunnel: &TunnelHandle, revision: Option<u64>) -> Result<()> {
        let effective = effective_peers(&self.desired, &self.dead);
        let actions = plan_peers(&effective, &self.applied);
        if actions.is_empty() {
            return Ok(());
        }
        info!(
            revision = ?revision,
            dead_peers = self.dead.len(),
            changes = actions.len(),
            "applying peer changes"
        );
        tunnel.apply(actions.clone()).await?;
        apply_peer_actions(&mut self.applied, &actions);
        Ok(())
    }
}

/// The configured peers the probes find dead: at least
/// [`DEAD_MIN_SAMPLES`] settled probes and none of the recent ones
/// answered.
fn dead_peers(
    probes: Option<&crate::probe::SharedStats>,
    desired: &BTreeMap<Key, PeerConfig>,
) -> BTreeSet<Key> {
    let Some(stats) = probes.and_then(|p| p.lock().ok()) else {
        return BTreeSet::new();
    };
    stats
        .iter()
        .filter(|(k, s)| desired.contains_key(k) && s.samples >= DEAD_MIN_SAMPLES && !s.reachable)
        .map(|(k, _)| *k)
        .collect()
}

/// Logs the routes that move to a fallback or back, going from the old
/// desired peers and dead set to the new ones.
fn log_fallbacks(
    old_desired: &BTreeMap<Key, PeerConfig>,
    old_dead: &BTreeSet<Key>,
    desired: &BTreeMap<Key, PeerConfig>,
    dead: &BTreeSet<Key>,
) {
    let before = fallback_targets(old_desired, old_dead);
    let after = fallback_targets(desired, dead);
    // Peers by name when they have one, else by key.
    let label = |k: &Key| match desired.get(k) {
        Some(p) if !p.name.is_empty() => p.name.clone(),
        Some(_) | None => k.to_string(),
    };
    for (from, to) in &after {
        if before.get(from) != Some(to) {
            let routes = desired.get(from).map_or(0, |p| p.allowed_ips.len());
            info!(
                peer = %from, fallback = %to,
                "peer {} found dead: its {routes} routes move to {}", label(from), label(to)
            );
        }
    }
    for (from, p) in desired {
        if after.contains_key(from) {
            continue;
        }
        if before.contains_key(from) {
            if dead.contains(from) {
                info!(peer = %from, "peer {} is still dead but no fallback is live: its routes return to it", label(from));
            } else {
                info!(peer = %from, "peer {} is back", label(from));
            }
        } else if dead.contains(from) && !old_dead.contains(from) && !p.fallback.is_empty() {
            info!(peer = %from, "peer {} found dead but no fallback is live: it keeps its routes", label(from));
        }
    }
}

/// Re-applies the peers whenever the set of dead peers changes, whether
/// the controller is connected or not.
async fn watch_dead_peers(
    routing: SharedRouting,
    probes: crate::probe::SharedStats,
    tunnel: TunnelHandle,
) {
    let mut tick = tokio::time::interval(DEAD_PEERS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut routing = routing.lock().await;
        let dead = dead_peers(Some(&probes), &routing.desired);
        if dead == routing.dead {
            continue;
        }
        log_fallbacks(&routing.desired, &routing.dead, &routing.desired, &dead);
        routing.dead = dead;
        if let Err(e) = routing.sync(&tunnel, None).await {
            warn!(error = %format!("{e:#}"), "applying the fallback routes failed");
        }
    }
}

/// Connects, watches and reports forever, reconnecting with backoff (at
/// once after a certificate renewal).
async fn controller_loop(applier: &mut Applier, mut id: Identity, args: &AgentArgs) -> Result<()> {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut connected = false;
        match session(applier, &mut id, args, &mut connected).await {
            Ok(SessionEnd::Renewed) => {
                info!("reconnecting with the renewed certificate");
                backoff = BACKOFF_MIN;
                continue;
            }
            Ok(SessionEnd::Closed) => warn!("controller closed the config stream; reconnecting"),
            Err(e) => warn!(
                error = %format!("{e:#}"),
                retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                "controller unreachable; still forwarding with the last applied config"
            ),
        }
        if connected {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Why a session with the controller ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The controller closed the config stream.
    Closed,
    /// The certificate was renewed: reconnect with the new one.
    Renewed,
}

async fn session(
    applier: &mut Applier,
    id: &mut Identity,
    args: &AgentArgs,
    connected: &mut bool,
) -> Result<SessionEnd> {
    let validity = Validity::of_pem(&id.cert_pem).context("reading the node certificate")?;
    if validity.expired(credentials::now_unix()) {
        bail!(
            "the node's certificate expired at unix time {} (the agent was away longer than its lifetime): \
             the controller will refuse it; enrol the node again (new state dir, new join token)",
            validity.not_after
        );
    }
    // The controller may have moved (a host name): refuse routes to where
    // it is now.
    let controller = controller_addresses(&id.controller_url).await;
    if !controller.is_empty() {
        applier.guard.controller = controller;
    }
    let channel = connect(
        &id.controller_url,
        &id.ca_pem,
        Some((&id.cert_pem, &id.key_pem)),
    )
    .await?;
    let mut client = AgentServiceClient::new(channel);
    if credentials::now_unix() >= validity.renew_at() {
        *id = credentials::renew(&mut client, &applier.state, id).await?;
        return Ok(SessionEnd::Renewed);
    }
    let mut stream = client
        .watch(pb::WatchRequest {
            known_revision: applier.revision(),
            endpoint: args.endpoint.map(|e| e.to_string()).unwrap_or_default(),
            listen_port: u32::from(args.listen_port),
            advertise: args.advertise.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("watch refused: {}", s.message()))?
        .into_inner();
    *connected = true;
    info!(controller = %id.controller_url, "connected to the controller");
    // A rotation under way (interrupted, or asked by --rotate-key) first.
    if let Some(pending) = applier.state.load_pending_key()? {
        credentials::rotate(&mut client, &applier.state, &applier.tunnel, id, pending).await?;
    }
    let renew_in = u64::try_from(validity.renew_at() - credentials::now_unix()).unwrap_or(0);
    let renewal = tokio::time::sleep(Duration::from_secs(renew_in));
    tokio::pin!(renewal);
    let mut report_tick = tokio::time::interval(REPORT_INTERVAL);
    let mut counters_tick = tokio::time::interval(POLICY_COUNTERS_INTERVAL);
    // What the last report said that triggers a prompt one on change.
    let mut reported = Watched::default();
    loop {
        tokio::select! {
            msg = stream.message() => {
                let Some(wire) = msg.context("config stream broke")? else { return Ok(SessionEnd::Closed) };
                let asked_generation = wire.key_generation;
                applier.last_error = match NodeConfig::try_from(wire) {
                    Ok(cfg) => {
                        let rev = cfg.revision;
                        match applier.apply(cfg, true).await {
                            Ok(refused) => { info!(revision = rev, refused = refused.len(), "config applied"); refusals_error(&refused) }
                            Err(e) => { error!(revision = rev, error = %format!("{e:#}"), "applying config failed"); format!("{e:#}") }
                        }
                    }
                    Err(e) => { error!(error = %e, "controller sent an invalid config; keeping the current one"); e.to_string() }
                };
                reported = report(&mut client, applier).await?;
                // The operator asked for a newer key (weftctl node rotate-key):
                // finish a rotation under way, then rotate to a key made
                // after the request if that one was older.
                for _ in 0..2 {
                    if asked_generation <= id.key_generation {
                        break;
                    }
                    let pending = match applier.state.load_pending_key()? {
                        Some(p) => p,
                        None => {
                            let p = PendingKey { private_key: new_private_key(), generation: asked_generation };
                            applier.state.save_pending_key(&p)?;
                            p
                        }
                    };
                    let before = id.key_generation;
                    credentials::rotate(&mut client, &applier.state, &applier.tunnel, id, pending).await?;
                    if id.key_generation == before {
                        break; // refused: wait for the next request
                    }
                }
            }
            () = &mut renewal => {
                *id = credentials::renew(&mut client, &applier.state, id).await?;
                return Ok(SessionEnd::Renewed);
            }
            _ = report_tick.tick() => reported = report(&mut client, applier).await?,
            // Policy counters that moved, peers whose reachability changed
            // and peers that roamed are reported within a second, so the
            // controller (and `weftctl node get`) see drops, broken paths
            // and NAT mappings as they happen.
            _ = counters_tick.tick() => {
                if applier.watched().await != reported {
                    reported = report(&mut client, applier).await?;
                }
            }
        }
    }
}

/// The parts of a report whose change triggers a prompt report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Watched {
    /// Packets per policy verdict.
    verdicts: Option<Vec<u64>>,
    /// Peers the probes find reachable.
    reachable: BTreeMap<Key, bool>,
    /// Where each peer's packets come from (a peer that roams, e.g. from
    /// behind NAT, teaches the controller its mapping this way).
    endpoints: BTreeMap<Key, Option<std::net::SocketAddr>>,
    /// Decrypted packets the tunnel dropped.
    drops: TunnelDrops,
}

/// Reports the applied revision, the last error, the peers (with their
/// probes) and the policy counters; returns what it reported of
/// [`Watched`].
async fn report(
    client: &mut AgentServiceClient<tonic::transport::Channel>,
    applier: &Applier,
) -> Result<Watched> {
    let counted = applier.watched().await;
    let probed = applier
        .probes
        .as_ref()
        .and_then(|p| p.lock().ok().map(|s| s.clone()))
        .unwrap_or_default();
    let peers = applier
        .tunnel
        .peers()
        .await?
        .into_iter()
        .map(|p| pb::PeerStatus {
            probe: probed.get(&p.public_key).map(|s| pb::PeerProbe {
                rtt_us: s.rtt_us.unwrap_or(0),
                loss_permille: s.loss_permille,
                reachable: s.reachable,
                samples: s.samples,
            }),
            public_key: p.public_key.0.to_vec(),
            last_handshake_unix: p
                .last_handshake
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
        })
        .collect();
    client
        .report(pb::ReportRequest {
            applied_revision: applier.revision(),
            // Cut to what the controller accepts (a longer one would have
            // the whole report refused).
            apply_error: weft_proto::report::truncate(
                &applier.last_error,
                weft_proto::report::MAX_APPLY_ERROR_LEN,
            )
            .to_owned(),
            peers,
            policy: applier.policy_status(),
            tunnel_drops: counted
                .drops
                .named()
                .into_iter()
                .map(|(verdict, c)| pb::VerdictCounter {
                    verdict: verdict.to_owned(),
                    packets: c.packets,
                    bytes: c.bytes,
                })
                .collect(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("report refused: {}", s.message()))?;
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use weft_dataplane_core::probe::ProbeStats;

    use super::*;

    #[test]
    fn a_peer_is_dead_after_enough_unanswered_probes() {
        let peer = |i: u8| PeerConfig {
            name: format!("p{i}"),
            public_key: Key([i; 32]),
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
            accept_sources: Vec::new(),
            fallback: Vec::new(),
            shared_routes: Vec::new(),
        };
        let desired: BTreeMap<Key, PeerConfig> = (1..=4).map(|i| (Key([i; 32]), peer(i))).collect();
        let stats = |samples, reachable| ProbeStats {
            rtt_us: None,
            loss_permille: 1000,
            reachable,
            samples,
        };
        let probes = crate::probe::SharedStats::default();
        probes.lock().expect("not poisoned").extend([
            (Key([1; 32]), stats(3, false)),  // dead
            (Key([2; 32]), stats(2, false)),  // too few probes yet
            (Key([3; 32]), stats(20, true)),  // alive
            (Key([9; 32]), stats(20, false)), // not a configured peer
        ]);
        assert_eq!(
            dead_peers(Some(&probes), &desired),
            BTreeSet::from([Key([1; 32])])
        );
        assert!(dead_peers(None, &desired).is_empty());
    }

    #[test]
    fn advertisements_parse_with_and_without_labels() {
        let w = parse_advertisement("100.100.2.0/24:app=pg,tier=db").expect("valid");
        assert_eq!(w.prefix, "100.100.2.0/24");
        assert_eq!(w.labels.len(), 2);
        assert_eq!(w.labels.get("app").map(String::as_str), Some("pg"));
        let w = parse_advertisement("fd00:beef:2::/64:app=pg").expect("valid");
        assert_eq!(w.prefix, "fd00:beef:2::/64");
        assert_eq!(w.labels.get("app").map(String::as_str), Some("pg"));
        let w = parse_advertisement("fd00:beef:2::/64").expect("valid");
        assert!(w.labels.is_empty());
        for bad in [
            "100.100.2.0",
            "100.100.2.0/33",
            "fd00:beef:2::/64:app",
            "x/24",
        ] {
            assert!(parse_advertisement(bad).is_err(), "{bad} must be refused");
        }
    }
}
