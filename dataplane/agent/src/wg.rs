//! `weft-agent wg IFNAME`: the tunnel as a plain WireGuard daemon, configured
//! through the UAPI socket (`wg set`, `wg setconf`), as wireguard-go is.
//!
//! Starts with no private key and a random UDP port; `wg set IFNAME
//! private-key FILE listen-port N ...` configures it. Runs in the foreground
//! until SIGTERM or SIGINT, then deletes the interface, removes its UAPI
//! socket and exits 0.

use std::path::PathBuf;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use weft_dataplane_core::config::DEFAULT_MTU;

use crate::tunnel::{self, PollArgs, TunnelSettings};

#[derive(Debug, clap::Args)]
pub(crate) struct WgArgs {
    /// TUN interface to create (1-15 characters).
    pub(crate) ifname: String,
    /// Directory of the UAPI socket `<DIR>/<IFNAME>.sock` that `wg` talks to.
    #[arg(long, env = "WEFT_UAPI_DIR", default_value = tunnel::DEFAULT_UAPI_DIR)]
    pub(crate) uapi_dir: PathBuf,
    /// MTU of the TUN interface, in bytes.
    #[arg(long, env = "WEFT_MTU", default_value_t = DEFAULT_MTU)]
    pub(crate) mtu: u16,
    #[command(flatten)]
    pub(crate) poll: PollArgs,
}

pub(crate) fn main(args: WgArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // One thread: the tunnel is one task, and on a small machine a second
    // worker only adds wake-ups.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: WgArgs) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let handle = tunnel::start(TunnelSettings {
        ifname: args.ifname,
        listen_port: 0,
        private_key: None,
        mtu: args.mtu,
        uapi_dir: args.uapi_dir,
        polling: args.poll.busy_poll,
        // Plain WireGuard: marked only if `wg set fwmark` says so.
        fwmark: 0,
    })
    .await?;
    let stopped_by_itself = tokio::select! {
        _ = sigterm.recv() => false,
        _ = sigint.recv() => false,
        () = handle.closed() => true,
    };
    tracing::info!(interface = %handle.ifname(), "shutting down");
    handle.shutdown().await;
    if stopped_by_itself {
        anyhow::bail!("tunnel {} stopped unexpectedly", handle.ifname());
    }
    Ok(())
}
