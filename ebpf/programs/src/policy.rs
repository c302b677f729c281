//! Network-policy classifiers for the overlay device.
//!
//! `weft_policy_ingress` (remote → local) enforces: destination address →
//! identity through the ipcache (unknown → `WORLD`); destination identity
//! not governed → pass; destination address not hosted by this node (a
//! gateway relaying for another member of the same identity) → pass as
//! `Forwarded`, untracked; a packet of a tracked flow (the
//! connection-tracking table has its 5-tuple and the entry is not idle for
//! longer than its protocol's timeout) → pass as `Established`; else the
//! source identity and one LPM lookup of `{dst, src, proto, port}` in the
//! policy map: allow → pass and track the flow, deny → drop, no match →
//! drop (default deny). Every map lookup uses the active epoch read once
//! per packet.
//!
//! Fragments: a first fragment is judged like a whole datagram (its L4
//! header is in it); when it passes, allowed or established, the datagram
//! (source, destination, protocol, identification) is remembered in
//! `WEFT_FRAGMENTS` for `FRAG_TIMEOUT_NS`, and its later fragments, which
//! carry no L4 header, pass under the same verdict (and rule counter).
//! Any other later fragment to a governed, hosted destination (of a
//! denied datagram, one whose first fragment has not arrived yet or was
//! forgotten) is dropped as `Unparsable`.
//!
//! Fail closed: a packet whose IP header cannot be read (truncated, wrong
//! version nibble, IHL < 5) is dropped, because its destination cannot be
//! shown to be ungoverned; a packet to a governed, hosted destination whose
//! L4 header cannot be read is dropped. That is: a TCP, UDP or ICMP header
//! shorter than its minimum (20, 8, 8 bytes) or ending after the IP
//! packet's declared length (IPv4 total length, IPv6 payload length:
//! bytes after it are not the packet's, the kernel trims them), so a
//! first fragment must hold the whole L4 header; an IPv6 header chain
//! longer than [`MAX_V6_EXT`], malformed (Hop-by-Hop anywhere but first,
//! two Fragment headers) or truncated; an ESP header; a Routing header
//! with segments left (the packet's final destination is not the one
//! judged). All count as `Unparsable`. Packets that are not IP
//! (`skb->protocol`) pass as `NotGoverned`: the policy governs IP only,
//! and a TUN device carries nothing else. Other protocols, and IPv6
//! headers the program does not walk, are looked up as a protocol no rule
//! names: default deny.
//!
//! IPv6 extension headers Hop-by-Hop, Routing, Destination Options,
//! Fragment and AH are walked, up to [`MAX_V6_EXT`].
//!
//! `weft_policy_egress` (local → remote) does not enforce: it records the
//! flows the node opens in the tracking table (a TCP SYN, a UDP datagram,
//! an ICMP echo request from a hosted source address; a flow already there
//! is refreshed), so replies to connections the node opens pass its
//! ingress policy, counts (`EgressPassed`) and passes. A packet it cannot
//! parse, a later fragment, or one it forwards for another node (source
//! not hosted), passes untracked (a fragmented datagram's flow is tracked
//! by its first fragment). A revoked flow is not re-opened by the node's own packets.
//!
//! Verdicts are `TC_ACT_UNSPEC` (pass: the next program, if any, or the stack
//! decides) and `TC_ACT_SHOT` (drop).

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use weft_ebpf_common::{
    Counters,
    policy::{
        CONFIG_EPOCH, CONFIG_L3_OFFSET, CONFIG_SKIP_INGRESS_IFINDEX, CONFIG_SLOTS,
        CONNTRACK_MAX_ENTRIES, CT_INBOUND, CT_OUTBOUND, CT_REFRESH_NS, CT_REVOKED, CtKey, CtValue,
        FRAGMENTS_MAX_ENTRIES, FragKey, FragValue, GOVERNED_MAX_ENTRIES, GovernedKey,
        HOSTED_MAX_ENTRIES, IPCACHE_MAX_ENTRIES, IpcacheKey, MAX_V6_EXT, POLICY_MAX_ENTRIES,
        PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue, PolicyVerdict,
        RULE_COUNTER_SLOTS, VERDICT_ALLOW, VERDICT_SLOTS, WORLD,
    },
};

/// Overlay prefix → identity.
#[map(name = "WEFT_IPCACHE")]
static WEFT_IPCACHE: LpmTrie<IpcacheKey, u32> = LpmTrie::with_max_entries(IPCACHE_MAX_ENTRIES, 0);

/// `{dst, src, proto, port block}` → verdict and rule.
#[map(name = "WEFT_POLICY")]
static WEFT_POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(POLICY_MAX_ENTRIES, 0);

/// Governed destination identities per epoch (value `GOVERNED`, non-zero).
#[map(name = "WEFT_GOVERNED")]
static WEFT_GOVERNED: HashMap<GovernedKey, u32> =
    HashMap::with_max_entries(GOVERNED_MAX_ENTRIES, 0);

/// Prefixes hosted by this node per epoch (value `HOSTED`, non-zero): its
/// own overlay addresses and its advertised workload prefixes.
#[map(name = "WEFT_HOSTED")]
static WEFT_HOSTED: LpmTrie<IpcacheKey, u32> = LpmTrie::with_max_entries(HOSTED_MAX_ENTRIES, 0);

/// Tracked flows, keyed in the remote → local orientation.
#[map(name = "WEFT_CT")]
static WEFT_CT: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(CONNTRACK_MAX_ENTRIES, 0);

/// Fragmented datagrams whose first fragment passed, keyed as they enter.
#[map(name = "WEFT_FRAGMENTS")]
static WEFT_FRAGMENTS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(FRAGMENTS_MAX_ENTRIES, 0);

/// Per-verdict counters.
#[map(name = "WEFT_POLICY_VERDICTS")]
static WEFT_POLICY_VERDICTS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(VERDICT_SLOTS, 0);

/// Per-rule counters (packets that a rule decided).
#[map(name = "WEFT_POLICY_RULES")]
static WEFT_POLICY_RULES: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(RULE_COUNTER_SLOTS, 0);

/// Loader-set configuration (`CONFIG_L3_OFFSET`, `CONFIG_EPOCH`).
#[map(name = "WEFT_POLICY_CONFIG")]
static WEFT_POLICY_CONFIG: Array<u32> = Array::with_max_entries(CONFIG_SLOTS, 0);

/// IPv6 next-header values of the extension headers.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_ESP: u8 = 50;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Smallest L4 headers: a first fragment must hold the whole of one.
const TCP_MIN: usize = 20;
const UDP_LEN: usize = 8;
const ICMP_MIN: usize = 8;

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

/// Enforces policy on what enters the kernel from the device (on a
/// workload interface, attached to egress: what goes to the workload).
#[classifier]
fn weft_policy_ingress(ctx: TcContext) -> i32 {
    if judged_elsewhere(&ctx) {
        return TC_ACT_UNSPEC;
    }
    let verdict = match try_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(Error::NoConfig | Error::Unparsable) => PolicyVerdict::Unparsable,
    };
    count(&WEFT_POLICY_VERDICTS, verdict.index(), ctx.len());
    action(verdict)
}

/// Tracks and counts what leaves through the device, and passes it.
#[classifier]
fn weft_policy_egress(ctx: TcContext) -> i32 {
    // Not enforcing: a packet that cannot be parsed passes untracked.
    let _ = track_egress(&ctx);
    count(
        &WEFT_POLICY_VERDICTS,
        PolicyVerdict::EgressPassed.index(),
        ctx.len(),
    );
    TC_ACT_UNSPEC
}

/// Whether the packet entered the node through the interface the loader
/// named in `CONFIG_SKIP_INGRESS_IFINDEX` (whose classifier judged it).
#[inline(always)]
fn judged_elsewhere(ctx: &TcContext) -> bool {
    let Ok(skip) = config(CONFIG_SKIP_INGRESS_IFINDEX) else {
        return false;
    };
    // SAFETY: `skb` is the context the kernel passed to this program,
    // valid while it runs; `ingress_ifindex` is a readable field.
    skip != 0 && unsafe { (*ctx.skb.skb).ingress_ifindex } == skip
}

#[inline(always)]
fn action(verdict: PolicyVerdict) -> i32 {
    match verdict {
        PolicyVerdict::Allowed | PolicyVerdict::NotGoverned | PolicyVerdict::EgressPassed => {
            TC_ACT_UNSPEC
        }
        PolicyVerdict::Established | PolicyVerdict::Forwarded => TC_ACT_UNSPEC,
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

/// Source and destination addresses (16 bytes, IPv4-mapped for IPv4).
struct L3 {
    src: [u8; 16],
    dst: [u8; 16],
}

/// What the programs need of the L4 header.
#[derive(Clone, Copy)]
struct L4 {
    /// Key protocol: TCP, UDP, ICMP (for ICMPv6 too), or another number.
    proto: u8,
    /// Source port; the echo identifier of an ICMP echo request or reply.
    src_port: u16,
    /// Destination port; 0 for other protocols. For ICMP: 1 for an echo
    /// request, 0 for anything else (the tracking key tells requests and
    /// replies apart; the policy lookup uses port 0 for ICMP).
    dst_port: u16,
    /// An ICMP(v6) echo request.
    echo_request: bool,
    /// A TCP segment opening a connection (SYN without ACK).
    tcp_syn: bool,
    /// Whether the flow can be tracked: TCP, UDP, an ICMP echo request or
    /// reply.
    trackable: bool,
}

/// A fragmented datagram as its fragments name it.
#[derive(Clone, Copy)]
struct FragId {
    /// The identification (big-endian; IPv4's in the last two bytes).
    id: [u8; 4],
    /// IPv4's protocol, or the IPv6 Fragment header's next header.
    proto: u8,
}

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fragment {
    /// A whole datagram.
    Not,
    /// The first fragment: the L4 header, more fragments follow.
    First,
    /// A later fragment: no L4 header.
    Later,
}

/// What the L4 parse found. Every field is always written (no enum
/// payloads): the verifier rejects copies of uninitialised stack bytes.
#[derive(Clone, Copy)]
struct Parsed {
    /// The L4 header ([`L4::NONE`] in a later fragment).
    l4: L4,
    fragment: Fragment,
    /// The datagram, for a first or later fragment.
    id: FragId,
}

impl Parsed {
    #[inline(always)]
    fn head(l4: L4, first: Option<FragId>) -> Self {
        match first {
            Some(id) => Self {
                l4,
                fragment: Fragment::First,
                id,
            },
            None => Self {
                l4,
                fragment: Fragment::Not,
                id: FragId {
                    id: [0; 4],
                    proto: 0,
                },
            },
        }
    }

    #[inline(always)]
    fn later(id: FragId) -> Self {
        Self {
            l4: L4::NONE,
            fragment: Fragment::Later,
            id,
        }
    }
}

impl L4 {
    /// No L4 header (a later fragment).
    const NONE: L4 = L4 {
        proto: 0,
        src_port: 0,
        dst_port: 0,
        echo_request: false,
        tcp_syn: false,
        trackable: false,
    };
}

/// `CONFIG_MAP[slot]`.
#[inline(always)]
fn config(slot: u32) -> Result<u32, Error> {
    WEFT_POLICY_CONFIG
        .get(slot)
        .copied()
        .ok_or(Error::NoConfig)
}

/// Addresses and L4 fields of the packet, whose IP header starts at `l3`.
/// `Ok(None)` for a packet that is not IP.
#[inline(always)]
fn parse_l3(ctx: &TcContext, l3: usize) -> Result<Option<(bool, L3)>, Error> {
    // `skb->protocol` is a big-endian ethertype in the low 16 bits.
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    match ethertype {
        ETH_P_IP => Ok(Some((false, v4_addrs(ctx, l3)?))),
        ETH_P_IPV6 => Ok(Some((true, v6_addrs(ctx, l3)?))),
        _ => Ok(None),
    }
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<PolicyVerdict, Error> {
    let l3 = config(CONFIG_L3_OFFSET)? as usize;
    let epoch = config(CONFIG_EPOCH)?;
    let Some((v6, addrs)) = parse_l3(ctx, l3)? else {
        return Ok(PolicyVerdict::NotGoverned);
    };
    let dst_identity = identity(epoch, &addrs.dst);
    if !governed(epoch, dst_identity) {
        return Ok(PolicyVerdict::NotGoverned);
    }
    // Identities are per (site, labels): a gateway can share the identity
    // of the member it relays to. The node hosting the address judges it.
    if !hosted(epoch, &addrs.dst) {
        return Ok(PolicyVerdict::Forwarded);
    }
    let parsed = if v6 { v6_l4(ctx, l3)? } else { v4_l4(ctx, l3)? };
    // SAFETY: a BPF helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if parsed.fragment == Fragment::Later {
        return Ok(later_fragment(ctx, &addrs, parsed.id, now));
    }
    let (verdict, rule) = judge(ctx, epoch, dst_identity, &addrs, &parsed.l4, now);
    if parsed.fragment == Fragment::First
        && matches!(verdict, PolicyVerdict::Allowed | PolicyVerdict::Established)
    {
        let entry = FragValue {
            first_seen_ns: now,
            verdict: verdict.index(),
            rule,
        };
        // A full table evicts its least recently used datagram, whose
        // later fragments are then dropped.
        let _ = WEFT_FRAGMENTS.insert(&frag_key(&addrs, parsed.id), &entry, 0);
    }
    Ok(verdict)
}

/// The verdict (and the rule that gave it, 0 for none) of a whole
/// datagram or a first fragment to a governed, hosted destination.
#[inline(always)]
fn judge(
    ctx: &TcContext,
    epoch: u32,
    dst_identity: u32,
    addrs: &L3,
    l4: &L4,
    now: u64,
) -> (PolicyVerdict, u32) {
    let ct_key = CtKey {
        src: addrs.src,
        dst: addrs.dst,
        src_port: l4.src_port.to_be_bytes(),
        dst_port: l4.dst_port.to_be_bytes(),
        proto: l4.proto,
        pad: [0; 3],
    };
    if l4.trackable && refresh(&ct_key, l4.proto, now) {
        return (PolicyVerdict::Established, 0);
    }
    let src_identity = identity(epoch, &addrs.src);
    let key = Key::new(
        PolicyKey::FULL_PREFIX,
        PolicyKey::new(
            epoch as u8,
            dst_identity,
            src_identity,
            l4.proto,
            if l4.proto == PROTO_ICMP { 0 } else { l4.dst_port },
        ),
    );
    match WEFT_POLICY.get(&key) {
        None => (PolicyVerdict::DefaultDenied, 0),
        Some(value) => {
            let value: PolicyValue = *value;
            count(&WEFT_POLICY_RULES, value.rule, ctx.len());
            if value.verdict == VERDICT_ALLOW {
                if l4.trackable && (l4.proto != PROTO_ICMP || l4.echo_request) {
                    let entry = CtValue {
                        last_seen_ns: now,
                        origin: CT_INBOUND,
                        rule: value.rule,
                    };
                    // A full table evicts its least recently used flow;
                    // an error only means this flow meets the policy again.
                    let _ = WEFT_CT.insert(&ct_key, &entry, 0);
                }
                (PolicyVerdict::Allowed, value.rule)
            } else {
                // VERDICT_DENY, or a value this program does not know.
                (PolicyVerdict::Denied, value.rule)
            }
        }
    }
}

/// The verdict of a later fragment to a governed, hosted destination:
/// its datagram's, if the first fragment passed not long ago.
#[inline(always)]
fn later_fragment(ctx: &TcContext, addrs: &L3, frag: FragId, now: u64) -> PolicyVerdict {
    let Some(entry) = WEFT_FRAGMENTS.get_ptr(&frag_key(addrs, frag)) else {
        return PolicyVerdict::Unparsable;
    };
    // SAFETY: the kernel returned a pointer to the map value, valid while
    // the program runs; a racing writer can only store another whole entry
    // of a datagram that passed.
    let entry: FragValue = unsafe { *entry };
    if !entry.live(now) {
        PolicyVerdict::Unparsable
    } else if entry.verdict == PolicyVerdict::Allowed.index() {
        count(&WEFT_POLICY_RULES, entry.rule, ctx.len());
        PolicyVerdict::Allowed
    } else if entry.verdict == PolicyVerdict::Established.index() {
        PolicyVerdict::Established
    } else {
        PolicyVerdict::Unparsable
    }
}

#[inline(always)]
fn frag_key(addrs: &L3, frag: FragId) -> FragKey {
    FragKey {
        src: addrs.src,
        dst: addrs.dst,
        id: frag.id,
        proto: frag.proto,
        pad: [0; 3],
    }
}

/// Records the flow of a packet the node sends, keyed as its replies will
/// arrive.
#[inline(always)]
fn track_egress(ctx: &TcContext) -> Result<(), Error> {
    let l3 = config(CONFIG_L3_OFFSET)? as usize;
    let Some((v6, addrs)) = parse_l3(ctx, l3)? else {
        return Ok(());
    };
    let parsed = if v6 { v6_l4(ctx, l3)? } else { v4_l4(ctx, l3)? };
    // A later fragment has no L4 header: its flow is its first fragment's.
    if parsed.fragment == Fragment::Later || !parsed.l4.trackable {
        return Ok(());
    }
    let l4 = parsed.l4;
    let is_icmp = l4.proto == PROTO_ICMP;
    // The reply's orientation: remote → local, ports swapped; an echo
    // reply carries the request's identifier, and answers a request (and
    // a request is answered by a reply) of the other kind.
    let ct_key = CtKey {
        src: addrs.dst,
        dst: addrs.src,
        src_port: if is_icmp { l4.src_port } else { l4.dst_port }.to_be_bytes(),
        dst_port: if is_icmp {
            u16::from(!l4.echo_request)
        } else {
            l4.src_port
        }
        .to_be_bytes(),
        proto: l4.proto,
        pad: [0; 3],
    };
    // SAFETY: a BPF helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if refresh(&ct_key, l4.proto, now) {
        return Ok(());
    }
    // A packet the node forwards for another node (a gateway relaying)
    // opens no flow here: the hosts at both ends track it.
    if !hosted(config(CONFIG_EPOCH)?, &addrs.src) {
        return Ok(());
    }
    // Only what opens a flow creates an entry: a TCP SYN, a UDP datagram,
    // an echo request. A revoked flow stays revoked unless a new TCP
    // connection reuses its ports.
    let opens = match l4.proto {
        PROTO_TCP => l4.tcp_syn,
        PROTO_UDP => !revoked(&ct_key, l4.proto, now),
        _ => l4.echo_request && !revoked(&ct_key, l4.proto, now),
    };
    if !opens {
        return Ok(());
    }
    let entry = CtValue {
        last_seen_ns: now,
        origin: CT_OUTBOUND,
        rule: 0,
    };
    let _ = WEFT_CT.insert(&ct_key, &entry, 0);
    Ok(())
}

/// Whether `key` is a live tracked flow (not revoked); if so, its
/// timestamp is moved to `now` (at most every `CT_REFRESH_NS`).
#[inline(always)]
fn refresh(key: &CtKey, proto: u8, now: u64) -> bool {
    let Some(entry) = WEFT_CT.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: the kernel returned a pointer to the map value, valid while
    // the program runs; a racing writer can only store another timestamp.
    unsafe {
        if (*entry).origin == CT_REVOKED || !(*entry).live(proto, now) {
            return false;
        }
        if now.saturating_sub((*entry).last_seen_ns) >= CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
    }
    true
}

/// Whether `key` is a revoked flow that has not idled out.
#[inline(always)]
fn revoked(key: &CtKey, proto: u8, now: u64) -> bool {
    match WEFT_CT.get_ptr(key) {
        // SAFETY: the kernel returned a pointer to the map value, valid
        // while the program runs.
        Some(entry) => unsafe { (*entry).origin == CT_REVOKED && (*entry).live(proto, now) },
        None => false,
    }
}

#[inline(always)]
fn identity(epoch: u32, addr: &[u8; 16]) -> u32 {
    let key = Key::new(IpcacheKey::FULL_PREFIX, IpcacheKey::v6(epoch, *addr));
    WEFT_IPCACHE.get(&key).copied().unwrap_or(WORLD)
}

/// Whether `addr` lies in a prefix this node hosts.
#[inline(always)]
fn hosted(epoch: u32, addr: &[u8; 16]) -> bool {
    let key = Key::new(IpcacheKey::FULL_PREFIX, IpcacheKey::v6(epoch, *addr));
    WEFT_HOSTED.get(&key).is_some_and(|flag| *flag != 0)
}

#[inline(always)]
fn governed(epoch: u32, identity: u32) -> bool {
    match WEFT_GOVERNED.get_ptr(&GovernedKey { epoch, identity }) {
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
        src: IpcacheKey::v4(0, src).addr,
        dst: IpcacheKey::v4(0, dst).addr,
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

/// `T` at `off`, if it ends by `end` (the IP packet's declared end).
#[inline(always)]
fn load_in<T>(ctx: &TcContext, off: usize, end: usize) -> Result<T, Error> {
    if off + core::mem::size_of::<T>() > end {
        return Err(Error::Unparsable);
    }
    load(ctx, off)
}

/// Where the IP packet starting at `l3` ends, by its declared `length`
/// (from `l3`). A length of 0 (GSO packets beyond 64 KiB) means the
/// packet runs to the end of the buffer.
#[inline(always)]
fn packet_end(ctx: &TcContext, l3: usize, length: usize) -> usize {
    if length == 0 {
        ctx.len() as usize
    } else {
        l3 + length
    }
}

/// The L4 header of an IPv4 packet, or its fragment identity.
#[inline(always)]
fn v4_l4(ctx: &TcContext, l3: usize) -> Result<Parsed, Error> {
    // Version/IHL, TOS, total length, identification, flags/offset.
    let hdr: [u8; 8] = load(ctx, l3)?;
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    let proto: u8 = load(ctx, l3 + 9)?;
    let id = FragId {
        id: [0, 0, hdr[4], hdr[5]],
        proto,
    };
    if frag & 0x1fff != 0 {
        // A later fragment carries no L4 header.
        return Ok(Parsed::later(id));
    }
    let l4 = l4(ctx, l3 + ihl, packet_end(ctx, l3, total), proto)?;
    // MF: more fragments follow this first one.
    Ok(Parsed::head(l4, (frag & 0x2000 != 0).then_some(id)))
}

/// The L4 header of an IPv6 packet after its extension headers, or its
/// fragment identity.
#[inline(always)]
fn v6_l4(ctx: &TcContext, l3: usize) -> Result<Parsed, Error> {
    let fixed: [u8; 2] = load(ctx, l3 + 4)?;
    let payload = usize::from(u16::from_be_bytes(fixed));
    let end = if payload == 0 {
        packet_end(ctx, l3, 0)
    } else {
        l3 + 40 + payload
    };
    let mut next: u8 = load(ctx, l3 + 6)?;
    let mut off = l3 + 40;
    let mut fragment_seen = false;
    let mut first: Option<FragId> = None;
    for i in 0..MAX_V6_EXT {
        let len = match next {
            // Hop-by-Hop only right after the fixed header (RFC 8200).
            NEXTHDR_HOP if i != 0 => return Err(Error::Unparsable),
            // Hop-by-Hop, Destination Options: (len + 1) * 8.
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let hdr: [u8; 2] = load_in(ctx, off, end)?;
                next = hdr[0];
                (usize::from(hdr[1]) + 1) * 8
            }
            // Routing: (len + 1) * 8. With segments left the kernel would
            // send the packet on to an address this program did not judge.
            NEXTHDR_ROUTING => {
                let hdr: [u8; 4] = load_in(ctx, off, end)?;
                if hdr[3] != 0 {
                    return Err(Error::Unparsable);
                }
                next = hdr[0];
                (usize::from(hdr[1]) + 1) * 8
            }
            // Fragment: 8 bytes; only the first fragment has the L4 header.
            NEXTHDR_FRAGMENT => {
                if fragment_seen {
                    return Err(Error::Unparsable);
                }
                fragment_seen = true;
                let hdr: [u8; 8] = load_in(ctx, off, end)?;
                let field = u16::from_be_bytes([hdr[2], hdr[3]]);
                let id = FragId {
                    id: [hdr[4], hdr[5], hdr[6], hdr[7]],
                    proto: hdr[0],
                };
                if field >> 3 != 0 {
                    return Ok(Parsed::later(id));
                }
                // M: more fragments follow (else an atomic fragment, a
                // whole datagram).
                if field & 1 != 0 {
                    first = Some(id);
                }
                next = hdr[0];
                8
            }
            // Authentication Header: (len + 2) * 4.
            NEXTHDR_AUTH => {
                let hdr: [u8; 2] = load_in(ctx, off, end)?;
                next = hdr[0];
                (usize::from(hdr[1]) + 2) * 4
            }
            // ESP hides the L4 header.
            NEXTHDR_ESP => return Err(Error::Unparsable),
            _ => return Ok(Parsed::head(l4(ctx, off, end, next)?, first)),
        };
        off += len;
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_ESP | NEXTHDR_AUTH
        | NEXTHDR_DEST => Err(Error::Unparsable),
        _ => Ok(Parsed::head(l4(ctx, off, end, next)?, first)),
    }
}

/// Key protocol, ports and echo identifier of the L4 header at `off`,
/// which must lie whole before `end`. ICMPv6 is keyed as ICMP; ICMP and
/// other protocols have port 0.
#[inline(always)]
fn l4(ctx: &TcContext, off: usize, end: usize, proto: u8) -> Result<L4, Error> {
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let min = if proto == PROTO_TCP { TCP_MIN } else { UDP_LEN };
            if off + min > end {
                return Err(Error::Unparsable);
            }
            let ports: [u8; 4] = load(ctx, off)?;
            let tcp_syn = if proto == PROTO_TCP {
                // Flags: SYN 0x02, ACK 0x10.
                let flags: u8 = load(ctx, off + 13)?;
                flags & 0x12 == 0x02
            } else {
                false
            };
            Ok(L4 {
                proto,
                src_port: u16::from_be_bytes([ports[0], ports[1]]),
                dst_port: u16::from_be_bytes([ports[2], ports[3]]),
                echo_request: false,
                tcp_syn,
                trackable: true,
            })
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // Type, code, checksum and the 4 bytes of the rest of the
            // header (the echo identifier and sequence).
            let hdr: [u8; ICMP_MIN] = load_in(ctx, off, end)?;
            let (request, reply) = if proto == PROTO_ICMP {
                (8, 0)
            } else {
                (128, 129)
            };
            let echo = hdr[0] == request || hdr[0] == reply;
            let id = if echo {
                u16::from_be_bytes([hdr[4], hdr[5]])
            } else {
                0
            };
            Ok(L4 {
                proto: PROTO_ICMP,
                src_port: id,
                dst_port: u16::from(hdr[0] == request),
                echo_request: hdr[0] == request,
                tcp_syn: false,
                trackable: echo,
            })
        }
        _ => Ok(L4 {
            proto,
            src_port: 0,
            dst_port: 0,
            echo_request: false,
            tcp_syn: false,
            trackable: false,
        }),
    }
}
