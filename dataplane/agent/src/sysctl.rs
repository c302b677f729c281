//! IP forwarding in the agent's network namespace, for nodes that route
//! for workload prefixes. Only switched on, never off: the agent does not
//! know who else relies on it.

use std::path::Path;

use anyhow::{Context, Result};
use tracing::info;

/// The sysctls that make the node forward IPv4 and IPv6 packets.
const FORWARDING: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// Turns IPv4 and IPv6 forwarding on where they are off, logging each
/// change.
pub(crate) fn enable_forwarding() -> Result<()> {
    for path in FORWARDING {
        set(Path::new(path), "1")?;
    }
    Ok(())
}

fn set(path: &Path, value: &str) -> Result<()> {
    let old =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if old.trim() == value {
        return Ok(());
    }
    std::fs::write(path, value)
        .with_context(|| format!("writing {value} to {}", path.display()))?;
    info!(sysctl = %path.display(), old = old.trim(), new = value, "forwarding enabled for workload prefixes");
    Ok(())
}
