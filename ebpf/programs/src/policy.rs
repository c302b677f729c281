//! Network-policy classifiers for the overlay device.
//!
//! `weft_policy_ingress` (remote → local) enforces: source and destination
//! address → identity through the ipcache (unknown → `WORLD`), destination
//! identity not governed → pass, else one LPM lookup of
//! `{dst, src, proto, port}` in the policy map: allow → pass, deny → drop,
//! no match → drop (default deny).
//!
//! Fail closed: a packet whose IP header cannot be read (truncated, wrong
//! version nibble, IHL < 5) is dropped, because its destination cannot be
//! shown to be ungoverned; a packet to a governed destination whose L4
//! header cannot be read (truncated TCP/UDP/ICMP, IPv4 or IPv6 non-first
//! fragment, more than [`MAX_V6_EXT`] IPv6 extension headers, an ESP
//! header) is dropped. Both count as `Unparsable`. Packets that are not IP
//! (`skb->protocol`) pass as `NotGoverned`: the policy governs IP only, and
//! a TUN device carries nothing else.
//!
//! IPv6 extension headers Hop-by-Hop, Routing, Destination Options,
//! Fragment (first fragment only) and AH are walked, up to [`MAX_V6_EXT`].
//!
//! `weft_policy_egress` does not enforce yet: it counts (`EgressPassed`)
//! and passes.
//!
//! Verdicts are `TC_ACT_UNSPEC` (pass: the next program, if any, or the stack
//! decides) and `TC_ACT_SHOT` (drop).

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use weft_ebpf_common::{
    Counters,
    policy::{
        CONFIG_L3_OFFSET, CONFIG_SLOTS, GOVERNED_MAX_ENTRIES, IPCACHE_MAX_ENTRIES, IpcacheKey,
        POLICY_MAX_ENTRIES, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue,
        PolicyVerdict, RULE_COUNTER_SLOTS, VERDICT_ALLOW, VERDICT_SLOTS, WORLD,
    },
};

/// Overlay prefix → identity.
#[map(name = "WEFT_IPCACHE")]
static WEFT_IPCACHE: LpmTrie<IpcacheKey, u32> = LpmTrie::with_max_entries(IPCACHE_MAX_ENTRIES, 0);

/// `{dst, src, proto, port block}` → verdict and rule.
#[map(name = "WEFT_POLICY")]
static WEFT_POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(POLICY_MAX_ENTRIES, 0);

/// Governed destination identities (value `GOVERNED`, non-zero).
#[map(name = "WEFT_GOVERNED")]
static WEFT_GOVERNED: HashMap<u32, u32> = HashMap::with_max_entries(GOVERNED_MAX_ENTRIES, 0);

/// Per-verdict counters.
#[map(name = "WEFT_POLICY_VERDICTS")]
static WEFT_POLICY_VERDICTS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(VERDICT_SLOTS, 0);

/// Per-rule counters (packets that a rule decided).
#[map(name = "WEFT_POLICY_RULES")]
static WEFT_POLICY_RULES: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(RULE_COUNTER_SLOTS, 0);

/// Loader-set configuration (`CONFIG_L3_OFFSET`).
#[map(name = "WEFT_POLICY_CONFIG")]
static WEFT_POLICY_CONFIG: Array<u32> = Array::with_max_entries(CONFIG_SLOTS, 0);

/// IPv6 extension headers walked at most.
const MAX_V6_EXT: usize = 4;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Why a packet could not be classified; every case drops and counts as
/// `Unparsable` (fail closed).
#[derive(Clone, Copy)]
enum Error {
    /// The configuration slot is missing (a map/common mismatch).
    NoConfig,
    /// The IP header, or the L4 header of a governed packet, cannot be read.
    Unparsable,
}

/// Enforces policy on what enters the kernel from the device.
#[classifier]
fn weft_policy_ingress(ctx: TcContext) -> i32 {
    let verdict = match try_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(Error::NoConfig | Error::Unparsable) => PolicyVerdict::Unparsable,
    };
    count(&WEFT_POLICY_VERDICTS, verdict.index(), ctx.len());
    action(verdict)
}

/// Counts what leaves through the device and passes it (not enforced yet).
#[classifier]
fn weft_policy_egress(ctx: TcContext) -> i32 {
    count(
        &WEFT_POLICY_VERDICTS,
        PolicyVerdict::EgressPassed.index(),
        ctx.len(),
    );
    TC_ACT_UNSPEC
}

#[inline(always)]
fn action(verdict: PolicyVerdict) -> i32 {
    match verdict {
        PolicyVerdict::Allowed | PolicyVerdict::NotGoverned | PolicyVerdict::EgressPassed => {
            TC_ACT_UNSPEC
        }
        PolicyVerdict::Denied | PolicyVerdict::DefaultDenied | PolicyVerdict::Unparsable => {
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn count(map: &PerCpuArray<Counters>, slot: u32, len: u32) {
    if let Some(counters) = map.get_ptr_mut(slot) {
        // SAFETY: the kernel returned this CPU's value of the slot, valid and
        // exclusively ours while the program runs (per-CPU map, migration
        // disabled).
        unsafe { (*counters).record(len) };
    }
}

/// Addresses and where the L4 header may start.
struct L3 {
    src: [u8; 16],
    dst: [u8; 16],
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<PolicyVerdict, Error> {
    let l3 = WEFT_POLICY_CONFIG
        .get(CONFIG_L3_OFFSET)
        .copied()
        .ok_or(Error::NoConfig)? as usize;
    // `skb->protocol` is a big-endian ethertype in the low 16 bits.
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let v6 = match ethertype {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return Ok(PolicyVerdict::NotGoverned),
    };
    let addrs = if v6 {
        v6_addrs(ctx, l3)?
    } else {
        v4_addrs(ctx, l3)?
    };
    let dst_identity = identity(&addrs.dst);
    if !governed(dst_identity) {
        return Ok(PolicyVerdict::NotGoverned);
    }
    let src_identity = identity(&addrs.src);
    let (proto, port) = if v6 { v6_l4(ctx, l3)? } else { v4_l4(ctx, l3)? };
    let key = Key::new(
        PolicyKey::FULL_PREFIX,
        PolicyKey::new(dst_identity, src_identity, proto, port),
    );
    match WEFT_POLICY.get(&key) {
        None => Ok(PolicyVerdict::DefaultDenied),
        Some(value) => {
            let value: PolicyValue = *value;
            count(&WEFT_POLICY_RULES, value.rule, ctx.len());
            if value.verdict == VERDICT_ALLOW {
                Ok(PolicyVerdict::Allowed)
            } else {
                // VERDICT_DENY, or a value this program does not know.
                Ok(PolicyVerdict::Denied)
            }
        }
    }
}

#[inline(always)]
fn identity(addr: &[u8; 16]) -> u32 {
    let key = Key::new(IpcacheKey::FULL_PREFIX, IpcacheKey { addr: *addr });
    WEFT_IPCACHE.get(&key).copied().unwrap_or(WORLD)
}

#[inline(always)]
fn governed(identity: u32) -> bool {
    match WEFT_GOVERNED.get_ptr(identity) {
        // SAFETY: the kernel returned a pointer to the map value, valid while
        // the program runs; a concurrent update rewrites a u32 in place.
        Some(flag) => unsafe { *flag != 0 },
        None => false,
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Error> {
    ctx.load::<T>(offset).map_err(|_| Error::Unparsable)
}

#[inline(always)]
fn v4_addrs(ctx: &TcContext, l3: usize) -> Result<L3, Error> {
    let vihl: u8 = load(ctx, l3)?;
    if vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return Err(Error::Unparsable);
    }
    let src: [u8; 4] = load(ctx, l3 + 12)?;
    let dst: [u8; 4] = load(ctx, l3 + 16)?;
    Ok(L3 {
        src: IpcacheKey::v4(src).addr,
        dst: IpcacheKey::v4(dst).addr,
    })
}

#[inline(always)]
fn v6_addrs(ctx: &TcContext, l3: usize) -> Result<L3, Error> {
    let version: u8 = load(ctx, l3)?;
    if version >> 4 != 6 {
        return Err(Error::Unparsable);
    }
    // Read the whole fixed header's tail so a truncated one fails here.
    let _: u8 = load(ctx, l3 + 39)?;
    Ok(L3 {
        src: load(ctx, l3 + 8)?,
        dst: load(ctx, l3 + 24)?,
    })
}

/// Protocol and destination port of an IPv4 packet.
#[inline(always)]
fn v4_l4(ctx: &TcContext, l3: usize) -> Result<(u8, u16), Error> {
    let vihl: u8 = load(ctx, l3)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    let frag: [u8; 2] = load(ctx, l3 + 6)?;
    if u16::from_be_bytes(frag) & 0x1fff != 0 {
        // A non-first fragment carries no L4 header.
        return Err(Error::Unparsable);
    }
    let proto: u8 = load(ctx, l3 + 9)?;
    l4(ctx, l3 + ihl, proto)
}

/// Protocol and destination port of an IPv6 packet, after the extension
/// headers.
#[inline(always)]
fn v6_l4(ctx: &TcContext, l3: usize) -> Result<(u8, u16), Error> {
    let mut next: u8 = load(ctx, l3 + 6)?;
    let mut off = l3 + 40;
    for _ in 0..MAX_V6_EXT {
        let len = match next {
            // Hop-by-Hop, Routing, Destination Options: (len + 1) * 8.
            0 | 43 | 60 => {
                let hdr: [u8; 2] = load(ctx, off)?;
                next = hdr[0];
                (usize::from(hdr[1]) + 1) * 8
            }
            // Fragment: 8 bytes; only the first fragment has the L4 header.
            44 => {
                let hdr: [u8; 4] = load(ctx, off)?;
                if u16::from_be_bytes([hdr[2], hdr[3]]) >> 3 != 0 {
                    return Err(Error::Unparsable);
                }
                next = hdr[0];
                8
            }
            // Authentication Header: (len + 2) * 4.
            51 => {
                let hdr: [u8; 2] = load(ctx, off)?;
                next = hdr[0];
                (usize::from(hdr[1]) + 2) * 4
            }
            // ESP hides the L4 header.
            50 => return Err(Error::Unparsable),
            _ => return l4(ctx, off, next),
        };
        off += len;
    }
    match next {
        0 | 43 | 44 | 50 | 51 | 60 => Err(Error::Unparsable),
        _ => l4(ctx, off, next),
    }
}

/// Key protocol and port of the L4 header at `off`. ICMPv6 is keyed as
/// ICMP; ICMP and other protocols have port 0.
#[inline(always)]
fn l4(ctx: &TcContext, off: usize, proto: u8) -> Result<(u8, u16), Error> {
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let ports: [u8; 4] = load(ctx, off)?;
            Ok((proto, u16::from_be_bytes([ports[2], ports[3]])))
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // Type and code must be there.
            let _: [u8; 2] = load(ctx, off)?;
            Ok((PROTO_ICMP, 0))
        }
        _ => Ok((proto, 0)),
    }
}
