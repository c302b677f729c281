//! weft-agent: the Weft node agent.
//!
//! `weft-agent --controller URL --join-token TOKEN` enrols the node and then
//! keeps its WireGuard tunnel, addresses and routes in line with the config
//! the controller streams. `weft-agent wg IFNAME` runs the same tunnel as a
//! plain WireGuard daemon configured through the UAPI socket (`wg set`).

mod tunnel;
mod wg;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "weft-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the tunnel as a plain WireGuard daemon configured with `wg set`
    /// through the UAPI socket, as wireguard-go does.
    Wg(wg::WgArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Wg(args)) => wg::main(args),
        None => anyhow::bail!("agent mode not wired yet"),
    }
}
