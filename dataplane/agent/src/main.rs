//! weft-agent: the Weft node agent.
//!
//! `weft-agent --controller URL --join-token TOKEN` enrols the node and then
//! keeps its WireGuard tunnel, addresses and routes in line with the config
//! the controller streams. `weft-agent wg IFNAME` runs the same tunnel as a
//! plain WireGuard daemon configured through the UAPI socket (`wg set`).

mod agent;
mod bpf;
mod credentials;
mod enrol;
mod netlink;
mod probe;
mod state;
mod sysctl;
mod tunnel;
mod wg;

use clap::{Parser, Subcommand};

/// The Weft node agent: runs a userspace WireGuard tunnel (TUN device +
/// UDP socket) and keeps it configured as the controller says. Enrol once
/// with --controller and --join-token; afterwards the state dir is enough,
/// and the agent keeps forwarding with its last config when the controller
/// is unreachable. `wg show IFNAME` works through the standard UAPI socket.
#[derive(Debug, Parser)]
#[command(
    name = "weft-agent",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    agent: agent::AgentArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the tunnel as a plain WireGuard daemon configured with `wg set`
    /// through the UAPI socket, as wireguard-go is.
    Wg(wg::WgArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Wg(args)) => wg::main(args),
        None => {
            init_logging();
            agent::main(cli.agent)
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
