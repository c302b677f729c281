//! Packet verdicts from the compiled tables alone, as the dataplane does it.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::compile::{Identity, PolicyTables, RuleRef, TupleKey, TupleValue, WORLD};
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
    match lookup_tuple(tables, src, dst, protocol, port) {
        Found::Open => Verdict::Allow,
        Found::Tuple(_, v) => v.verdict,
        Found::DefaultDeny => Verdict::Deny,
    }
}

/// The rule that decides a packet, as [`lookup`] finds it: `None` when the
/// destination is open or no rule matches (default deny).
pub fn lookup_rule(
    tables: &PolicyTables,
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Option<&RuleRef> {
    match lookup_tuple(tables, src, dst, protocol, port) {
        Found::Tuple(rules, v) => rules.get(v.rule as usize),
        Found::Open | Found::DefaultDeny => None,
    }
}

enum Found<'t> {
    /// Unknown, not hosted here, or not governed.
    Open,
    /// A tuple matched: the destination's rules and the tuple.
    Tuple(&'t [RuleRef], TupleValue),
    /// Governed and no tuple matched.
    DefaultDeny,
}

fn lookup_tuple<'t>(
    tables: &'t PolicyTables,
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Found<'t> {
    let src_id = identity_of(tables, src).unwrap_or(WORLD);
    let Some(dst_policy) = identity_of(tables, dst).and_then(|id| tables.dsts.get(&id)) else {
        return Found::Open;
    };
    if !dst_policy.governed {
        return Found::Open;
    }
    let port = if protocol.has_ports() { port } else { 0 };
    let probe = TupleKey {
        src: src_id,
        protocol,
        first: port,
    };
    match dst_policy.tuples.range(..=probe).next_back() {
        Some((k, v)) if k.src == src_id && k.protocol == protocol && port <= v.last => {
            Found::Tuple(&dst_policy.rules, *v)
        }
        Some(_) | None => Found::DefaultDeny,
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
