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

    /// Output format: `table` for people, `json` for scripts.
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
