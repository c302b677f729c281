//! `weft-agent wg IFNAME`: the tunnel as a plain WireGuard daemon.

#[derive(Debug, clap::Args)]
pub(crate) struct WgArgs {
    /// TUN interface to create.
    pub(crate) ifname: String,
}

pub(crate) fn main(_args: WgArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
