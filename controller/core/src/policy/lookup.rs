//! Packet verdicts from the compiled tables alone, as the dataplane does it.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::compile::{Identity, PolicyTables, TupleKey, WORLD};
use crate::policy::model::{Protocol, Verdict};

/// The verdict for a packet from `src` to `dst` of `protocol` to `port`
/// (ignored for ICMP): ipcache longest-prefix match for both addresses, then
/// one ordered lookup in the destination's tuples.
///
/// A destination not in the tables (unknown, or not hosted where the
/// tables were cut for) or not governed is allowed; a governed one allows
/// only what a tuple allows.
pub fn lookup(
    tables: &PolicyTables,
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Verdict {
    let src_id = identity_of(tables, src).unwrap_or(WORLD);
    let Some(dst_policy) = identity_of(tables, dst).and_then(|id| tables.dsts.get(&id)) else {
        return Verdict::Allow;
    };
    if !dst_policy.governed {
        return Verdict::Allow;
    }
    let port = if protocol.has_ports() { port } else { 0 };
    let probe = TupleKey {
        src: src_id,
        protocol,
        first: port,
    };
    match dst_policy.tuples.range(..=probe).next_back() {
        Some((k, v)) if k.src == src_id && k.protocol == protocol && port <= v.last => v.verdict,
        Some(_) | None => Verdict::Deny,
    }
}

/// The identity of an address by longest-prefix match in the ipcache.
pub fn identity_of(tables: &PolicyTables, addr: IpAddr) -> Option<Identity> {
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    (0..=max).rev().find_map(|len| {
        let net = IpNet::new(addr, len).ok()?.trunc();
        tables.ipcache.get(&net).copied()
    })
}
