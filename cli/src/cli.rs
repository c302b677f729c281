//! Command-line grammar (clap derive). Each command's `--help` explains its
//! arguments and units.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use weft_dataplane_core::Key;

use crate::duration::parse_duration;

/// Where `--config` points when neither the flag nor `WEFT_CONFIG` is set
/// and there is no `./admin.conf`.
pub(crate) const DEFAULT_CONFIG: &str = "/var/lib/weft-controller/admin.conf";

/// weftctl: operate a Weft overlay network (sites, join tokens, nodes,
/// external peers) through the controller's admin API.
#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub(crate) struct Cli {
    /// Admin config (JSON with the controller URL, its CA and an admin
    /// token), written by the controller on first start. Default:
    /// ./admin.conf if it exists, else /var/lib/weft-controller/admin.conf.
    #[arg(long, global = true, env = "WEFT_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Admin token to use instead of the one in the admin config (e.g.
    /// one made by `weftctl admin token create`). Prefer the environment
    /// variable: a flag shows in the process list.
    #[arg(
        long,
        global = true,
        env = "WEFT_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) token: Option<String>,

    /// Output format: `table` for people, `json` for scripts, `yaml` for
    /// policies (`get policy`, `get policies`: the policy documents).
    #[arg(short, long, global = true, env = "WEFT_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns / readable descriptions.
    Table,
    /// JSON (one value: an object or an array).
    Json,
    /// YAML documents (policies only).
    Yaml,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Manage sites (locations such as a region, data centre or edge).
    #[command(subcommand)]
    Site(SiteCommand),
    /// Manage join tokens, which enrol new nodes into a site.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect and remove nodes (machines running weft-agent).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage external peers: plain WireGuard devices (laptops, phones,
    /// routers) that join the overlay without running weft-agent.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Create or replace network policies from YAML files, all or nothing.
    /// With --dry-run, print which members would gain or lose access.
    Apply(ApplyArgs),
    /// Show resources: `get policies`, `get policy NAME`.
    #[command(subcommand)]
    Get(GetCommand),
    /// Delete resources: `delete policy NAME`.
    #[command(subcommand)]
    Delete(DeleteCommand),
    /// Network policy tools: `policy explain`.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Paths between nodes and sites: `route trace`, `route list`.
    #[command(subcommand)]
    Route(RouteCommand),
    /// How sites are connected: full mesh or through site gateways, with
    /// residency rules (`topology get`, `topology set`).
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Admin credentials: `admin token create|list|revoke`.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Show the audit log: every admin change (and refused attempt), which
    /// admin token made it, when, and the resulting revision.
    Audit {
        /// Only records this recent, e.g. 1h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        since: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Named admin tokens with a role and an expiry.
    #[command(subcommand)]
    Token(AdminTokenCommand),
}

/// What an admin token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RoleArg {
    /// Everything.
    Admin,
    /// Read only: list, get, explain, trace, audit, policy dry runs.
    Viewer,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AdminTokenCommand {
    /// Create an admin token. The token is printed once (stdout) and never
    /// again: the controller keeps only its hash. Use it with
    /// WEFT_ADMIN_TOKEN=... weftctl ...
    Create {
        /// Token name (a DNS label, never reused), shown in the audit log.
        name: String,
        /// What the token may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// How long the token stays valid (at most 366d), e.g. 12h, 30d.
        #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// List admin tokens with their role, expiry and revocation (never
    /// their secrets).
    #[command(alias = "ls")]
    List,
    /// Revoke an admin token at once (it stays listed as revoked). The
    /// last usable admin token cannot be revoked.
    Revoke {
        /// Token name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum RouteCommand {
    /// Show the path from one node to another, as the topology computes it
    /// from the agents' latest probes (round-trip time, loss, reachability
    /// between sites), and why: direct, relayed through which sites and
    /// why, or dropped and why (e.g. no path a residency rule allows).
    Trace {
        /// Source: node name or id, external peer name, or overlay address
        /// (also one inside a workload prefix a node advertises).
        from: String,
        /// Destination, as the source.
        to: String,
    },
    /// Show the route between every ordered pair of sites, and why.
    List,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TopologyCommand {
    /// Show the topology settings.
    Get,
    /// Replace the topology settings with exactly what the flags say (an
    /// omitted flag means its default: full mesh, no gateways, no tags, no
    /// rules). Every node's config follows at once.
    ///
    /// Example: weftctl topology set --mode gateways --gateway fra1
    /// --gateway fra2 --gateway nyc1 --site-tag fra=eu --site-tag
    /// par=eu --residency eu
    Set(TopologySet),
}

/// How sites reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TopologyModeArg {
    /// Every member peers directly with every other member; nothing is
    /// relayed.
    FullMesh,
    /// Members mesh inside their site; traffic between sites goes through
    /// the sites' gateways (active-active: flows are spread over a site's
    /// gateways by a hash of their addresses and ports; a dead gateway's
    /// flows move to the others), relayed through other sites when the
    /// measured direct path is down or much slower.
    Gateways,
}

#[derive(Debug, Args)]
pub(crate) struct TopologySet {
    /// Topology mode.
    #[arg(long, value_enum, default_value_t = TopologyModeArg::FullMesh)]
    pub(crate) mode: TopologyModeArg,
    /// A node (name or id) that is a gateway of its site; repeat for more.
    /// Give each site that has members at least one, better two.
    #[arg(long = "gateway", value_name = "NODE")]
    pub(crate) gateways: Vec<String>,
    /// Residency tags of a site, SITE=TAG[,TAG...]; repeat per site.
    #[arg(long = "site-tag", value_name = "SITE=TAGS", value_parser = parse_site_tags)]
    pub(crate) site_tags: Vec<(String, Vec<String>)>,
    /// A residency rule: traffic between two sites tagged TAG transits
    /// only sites tagged TAG; without such a path it is dropped, never
    /// relayed elsewhere. Repeat for more tags.
    #[arg(long = "residency", value_name = "TAG")]
    pub(crate) residency: Vec<String>,
}

fn parse_site_tags(s: &str) -> Result<(String, Vec<String>), String> {
    let (site, tags) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SITE=TAG[,TAG...]"))?;
    if site.is_empty() {
        return Err(format!("{s:?}: the site name is empty"));
    }
    let tags: Vec<String> = tags
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    Ok((site.to_owned(), tags))
}

#[derive(Debug, Args)]
pub(crate) struct ApplyArgs {
    /// A policy file, or a directory whose *.yaml and *.yml files are all
    /// applied (sorted by name, not recursive). Repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR",
        required = true
    )]
    pub(crate) files: Vec<PathBuf>,
    /// Change nothing; print the reachability diff the apply would cause
    /// (`+ FROM -> TO tcp/443`: gains access, `-`: loses it).
    #[arg(long)]
    pub(crate) dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum GetCommand {
    /// List network policies (`-o yaml`: all their documents).
    Policies,
    /// Show one network policy (`-o yaml`: its document, as applied).
    Policy {
        /// Policy name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeleteCommand {
    /// Delete a network policy; what it governed is open again unless
    /// another policy selects it.
    Policy {
        /// Policy name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Say whether traffic from one member to another is allowed, and
    /// which rule decided.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ExplainArgs {
    /// Source: node name or id, or external peer name.
    #[arg(long)]
    pub(crate) from: String,
    /// Destination: node name or id, or external peer name.
    #[arg(long)]
    pub(crate) to: String,
    /// Destination port and protocol: PORT/tcp, PORT/udp, or icmp.
    #[arg(long, value_name = "PORT/PROTO|icmp", value_parser = parse_port)]
    pub(crate) port: PortSpec,
}

/// A packet's protocol and destination port, as `policy explain` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortSpec {
    /// "tcp", "udp" or "icmp".
    pub(crate) protocol: &'static str,
    /// 0 for ICMP.
    pub(crate) port: u16,
}

/// Parses `443/tcp`, `53/udp` or `icmp`.
pub(crate) fn parse_port(s: &str) -> Result<PortSpec, String> {
    let lower = s.trim().to_ascii_lowercase();
    if lower == "icmp" {
        return Ok(PortSpec {
            protocol: "icmp",
            port: 0,
        });
    }
    let bad = || format!("{s:?} is not PORT/tcp, PORT/udp or icmp (e.g. 443/tcp)");
    let (port, proto) = lower.split_once('/').ok_or_else(bad)?;
    let protocol = match proto {
        "tcp" => "tcp",
        "udp" => "udp",
        _ => return Err(bad()),
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} is not a port (1 to 65535)"))?;
    Ok(PortSpec { protocol, port })
}

/// One `node label` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LabelChange {
    /// `KEY=VALUE`.
    Set(String, String),
    /// `KEY-`.
    Remove(String),
}

/// Parses `KEY=VALUE` (set) or `KEY-` (remove).
pub(crate) fn parse_label_change(s: &str) -> Result<LabelChange, String> {
    if let Some((k, v)) = s.split_once('=') {
        return Ok(LabelChange::Set(k.to_owned(), v.to_owned()));
    }
    match s.strip_suffix('-') {
        Some(k) if !k.is_empty() => Ok(LabelChange::Remove(k.to_owned())),
        _ => Err(format!(
            "{s:?} is neither KEY=VALUE (set) nor KEY- (remove)"
        )),
    }
}

/// Parses `KEY=VALUE` (the controller checks the key and value).
pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    match parse_label_change(s) {
        Ok(LabelChange::Set(k, v)) => Ok((k, v)),
        Ok(LabelChange::Remove(_)) | Err(_) => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum SiteCommand {
    /// Create a site.
    Add {
        /// Site name, unique in the network.
        name: String,
    },
    /// List all sites with their node counts.
    #[command(alias = "ls")]
    List,
    /// Show one site.
    Get {
        /// Site name.
        name: String,
    },
    /// Delete a site (the controller refuses while it still has nodes).
    #[command(alias = "rm")]
    Delete {
        /// Site name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a single-use join token for a site. In table mode only the
    /// token is printed on stdout, so `TOKEN=$(weftctl token create --site a)`
    /// works; its expiry goes to stderr.
    Create(TokenCreate),
    /// List join tokens (never shows their secrets).
    #[command(alias = "ls")]
    List,
    /// Delete (revoke) a join token.
    #[command(alias = "rm")]
    Delete {
        /// Token ID, as shown by `weftctl token list`.
        id: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct TokenCreate {
    /// Site the enrolled node will belong to.
    #[arg(long)]
    pub(crate) site: String,
    /// How long the token stays valid: a number with a unit, s (seconds),
    /// m (minutes), h (hours) or d (days), e.g. 30s, 15m, 1h, 2d, 1h30m.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub(crate) ttl: Duration,
    /// Label KEY=VALUE the enrolled node gets (network policy selects nodes
    /// by their labels); repeat for several. The agent's `--label` may
    /// only restate these: any other refuses the enrolment.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// A prefix (CIDR) inside which the node's agent may advertise
    /// workload prefixes (`weft-agent --advertise`) without approval, with
    /// labels the node was granted; repeat for several. Anything else it
    /// advertises waits, pending, for `weftctl node advertise`.
    #[arg(long = "allow-prefix", value_name = "CIDR")]
    pub(crate) allow_prefixes: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// List nodes with their connection and configuration status.
    /// REVISION is applied/current: the configuration revision the node
    /// reported as applied, and the controller's current revision.
    #[command(alias = "ls")]
    List {
        /// Only nodes in this site.
        #[arg(long)]
        site: Option<String>,
    },
    /// Describe one node, including the status of its WireGuard peers
    /// (latest handshake, bytes received and sent).
    Get {
        /// Node name or node ID.
        #[arg(value_name = "NAME|ID")]
        node: String,
    },
    /// Remove a node from the network; its peers drop it at the next
    /// revision. The agent must enrol again with a new token to come back.
    #[command(alias = "rm")]
    Delete {
        /// Node name or node ID.
        #[arg(value_name = "NAME|ID")]
        node: String,
    },
    /// Set (KEY=VALUE) or remove (KEY-) labels of a node, which network
    /// policy selects nodes by.
    Label {
        /// Node name or node ID.
        #[arg(value_name = "NAME|ID")]
        node: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(value_name = "KEY=VALUE|KEY-", required = true, value_parser = parse_label_change)]
        changes: Vec<LabelChange>,
    },
    /// Advertise a workload prefix the node routes for (containers or VMs
    /// behind it), or relabel one it advertises, or approve one its agent
    /// asked for (pending in `node get`): every other node routes the
    /// prefix to it through the overlay, and network policy selects the
    /// workload by its labels (the ones given here). Refused if the prefix
    /// overlaps one another node advertises or the overlay pools, is
    /// shorter than the network's minimum, or covers a controller address
    /// or a member's endpoint.
    Advertise {
        /// Node name or node ID.
        #[arg(value_name = "NAME|ID")]
        node: String,
        /// The prefix, e.g. 100.100.2.0/24 or fd00:beef:2::/64.
        #[arg(value_name = "CIDR")]
        prefix: String,
        /// Label KEY=VALUE of the workload; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Withdraw a workload prefix from a node: the other nodes remove
    /// their routes to it. Also drops a pending prefix (until the agent
    /// asks for it again).
    Withdraw {
        /// Node name or node ID.
        #[arg(value_name = "NAME|ID")]
        node: String,
        /// The prefix, as advertised.
        #[arg(value_name = "CIDR")]
        prefix: String,
    },
    /// Rotate a node's WireGuard key: its agent generates a new key,
    /// registers it, and every peer swaps the old key for the new one;
    /// traffic waits one handshake. The new key shows in `node get` once
    /// the agent has rotated (it must be connected).
    #[command(name = "rotate-key")]
    RotateKey {
        /// Node name or node ID.
        #[arg(value_name = "NAME|ID")]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PeerCommand {
    /// Add an external peer. The controller assigns its overlay addresses
    /// and adds it to every node's WireGuard peers.
    Add(PeerAdd),
    /// List external peers.
    #[command(alias = "ls")]
    List,
    /// Show one external peer.
    Get {
        /// External peer name.
        name: String,
    },
    /// Delete an external peer.
    #[command(alias = "rm")]
    Delete {
        /// External peer name.
        name: String,
    },
    /// Print a wg-quick config for an external peer (save it as
    /// /etc/wireguard/weft.conf, fill in the private key, run
    /// `wg-quick up weft`). `-o json` prints the same data as JSON.
    Config {
        /// External peer name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct PeerAdd {
    /// External peer name, unique in the network.
    pub(crate) name: String,
    /// Site the peer belongs to.
    #[arg(long)]
    pub(crate) site: String,
    /// The peer's WireGuard public key: base64 of 32 bytes, as printed by
    /// `wg pubkey`.
    #[arg(long, value_name = "KEY", value_parser = parse_public_key)]
    pub(crate) public_key: Key,
    /// The peer's reachable underlay address, IP:PORT (IPv6 as
    /// [ADDR]:PORT). Omit when the peer is behind NAT: it then calls the
    /// nodes, never the reverse.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_endpoint)]
    pub(crate) endpoint: Option<SocketAddr>,
    /// Label KEY=VALUE that network policy selects the peer by; repeat for
    /// several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
}

/// Parses a WireGuard public key given in base64.
pub(crate) fn parse_public_key(s: &str) -> Result<Key, String> {
    s.parse::<Key>()
        .map_err(|e| format!("{e}: expected the base64 of 32 bytes, as `wg pubkey` prints it"))
}

/// Parses an `IP:PORT` endpoint with a non-zero port.
pub(crate) fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    let addr = s.trim().parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not IP:PORT (e.g. 198.51.100.7:51820 or [2001:db8::7]:51820)")
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "{s:?} has port 0: give the port the peer listens on"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_token_create_with_default_ttl() {
        let cli =
            Cli::try_parse_from(["weftctl", "token", "create", "--site", "a"]).expect("valid args");
        let Command::Token(TokenCommand::Create(args)) = cli.command else {
            panic!("expected token create, got {:?}", cli.command);
        };
        assert_eq!(args.ttl, Duration::from_secs(3600));
        assert_eq!(cli.output, Output::Table);
    }

    #[test]
    fn policy_arguments_parse() {
        assert_eq!(
            parse_port("443/TCP"),
            Ok(PortSpec {
                protocol: "tcp",
                port: 443
            })
        );
        assert_eq!(
            parse_port("icmp"),
            Ok(PortSpec {
                protocol: "icmp",
                port: 0
            })
        );
        for bad in ["443", "0/tcp", "443/sctp", "x/udp", "70000/tcp"] {
            assert!(parse_port(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            parse_label_change("app=web"),
            Ok(LabelChange::Set("app".into(), "web".into()))
        );
        assert_eq!(
            parse_label_change("app-"),
            Ok(LabelChange::Remove("app".into()))
        );
        assert!(parse_label_change("app").is_err());
        assert!(parse_label("app-").is_err());
        let cli =
            Cli::try_parse_from(["weftctl", "apply", "-f", "a.yaml", "-f", "dir", "--dry-run"])
                .expect("valid args");
        let Command::Apply(a) = cli.command else {
            panic!("expected apply, got {:?}", cli.command);
        };
        assert!(a.dry_run);
        assert_eq!(a.files.len(), 2);
    }

    #[test]
    fn output_flag_is_global() {
        let cli =
            Cli::try_parse_from(["weftctl", "node", "list", "-o", "json"]).expect("valid args");
        assert_eq!(cli.output, Output::Json);
    }

    #[test]
    fn bad_ttl_is_a_usage_error_that_explains() {
        let err = Cli::try_parse_from(["weftctl", "token", "create", "--site", "a", "--ttl", "10"])
            .expect_err("a ttl without unit must be refused");
        assert!(
            err.to_string().contains("missing unit"),
            "unexpected error: {err}"
        );
    }

    #[test]
    fn peer_add_validates_key_and_endpoint_locally() {
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let ok = Cli::try_parse_from([
            "weftctl",
            "peer",
            "add",
            "x1",
            "--site",
            "a",
            "--public-key",
            key,
            "--endpoint",
            "[2001:db8::7]:51820",
        ]);
        assert!(ok.is_ok(), "valid peer add refused: {ok:?}");

        let short = Cli::try_parse_from([
            "weftctl",
            "peer",
            "add",
            "x1",
            "--site",
            "a",
            "--public-key",
            "AQID",
        ])
        .expect_err("a 3-byte key must be refused");
        assert!(
            short.to_string().contains("32 bytes"),
            "unexpected error: {short}"
        );

        let bad_ep = Cli::try_parse_from([
            "weftctl",
            "peer",
            "add",
            "x1",
            "--site",
            "a",
            "--public-key",
            key,
            "--endpoint",
            "host:51820",
        ])
        .expect_err("a host name endpoint must be refused");
        assert!(
            bad_ep.to_string().contains("is not IP:PORT"),
            "unexpected error: {bad_ep}"
        );

        assert!(
            parse_endpoint("198.51.100.7:0").is_err(),
            "port 0 must be refused"
        );
    }
}
