//! Maps of the network-policy datapath (`weft_policy_ingress` /
//! `weft_policy_egress`), shared by the eBPF programs and the agent.
//!
//! Per packet the ingress program does two ipcache lookups (source and
//! destination address → identity), one hash lookup (is the destination
//! identity governed?), one hosted-prefix LPM lookup (does the destination
//! address live on this node?) and one policy LPM lookup with the full key,
//! whatever the number of rules: port ranges are stored as aligned
//! power-of-two blocks, a prefix on the port bits of [`PolicyKey`]. A
//! later IP fragment (no L4 header) takes one [`FRAGMENTS_MAP`] lookup
//! instead of the tracking and policy lookups; an IPv6 header chain is
//! walked at most [`MAX_V6_EXT`] headers deep.
//!
//! Hosted prefixes: [`HOSTED_MAP`] holds the node's own overlay addresses
//! and the workload prefixes it advertises. Identities are per (site,
//! label set), so a node relaying traffic for another member (a gateway)
//! can share the destination's identity; the classifiers judge and track
//! only packets to (ingress) or from (egress) a hosted address, and pass a
//! packet for another node untouched ([`PolicyVerdict::Forwarded`]): the
//! node that hosts the destination judges it, with its own flow state.
//!
//! Epochs: the ipcache, policy, governed and hosted maps hold two copies of
//! the policy, told apart by an epoch (0 or 1) in every key. The programs
//! read the active epoch once per packet from [`CONFIG_MAP`]; the agent
//! writes a change into the inactive copy and then flips [`CONFIG_EPOCH`],
//! so every packet sees one whole policy, old or new.
//!
//! Connection tracking: [`CONNTRACK_MAP`], an LRU hash of [`CtKey`] →
//! [`CtValue`]. Both directions of a flow share one key, written in the
//! orientation of the packets that enter the node (remote → local): the
//! egress program records every flow the node opens, and the ingress
//! program records every governed flow a policy allowed (flows of hosted
//! addresses only, both ways). A packet of a
//! tracked flow passes as [`PolicyVerdict::Established`] without a policy
//! lookup, so a policy change never drops an established flow; the agent
//! marks the tracked inbound flows that a new policy no longer allows as
//! revoked ([`CT_REVOKED`]). The egress program opens TCP flows on a SYN
//! only, so the node's replies cannot re-open a revoked flow.
//!
//! Fragments: the L4 header (ports, ICMP type) is in the first fragment
//! of a datagram only. The ingress program judges a first fragment like a
//! whole datagram and, when it passes (allowed or established), remembers
//! the datagram in [`FRAGMENTS_MAP`], an LRU hash of [`FragKey`] (source,
//! destination, protocol, IPv4 identification or IPv6 fragment
//! identification) → [`FragValue`], for [`FRAG_TIMEOUT_NS`]. A later
//! fragment passes only if its datagram is remembered there, and counts
//! under the remembered verdict (and rule); any other later fragment, also
//! one that arrives before its first fragment, is dropped and counted as
//! [`PolicyVerdict::Unparsable`]: without its first fragment it cannot be
//! judged.
//!
//! Byte order: every multi-byte field of a key is big-endian (`[u8; N]`
//! arrays, so the type says it), because LPM tries compare keys bit by bit
//! from the first byte. Values are native-endian `u32`s.

/// Name of the ipcache: LPM trie of [`IpcacheKey`] (with a prefix length) →
/// identity `u32`.
pub const IPCACHE_MAP: &str = "WEFT_IPCACHE";
/// Name of the policy map: LPM trie of [`PolicyKey`] → [`PolicyValue`].
pub const POLICY_MAP: &str = "WEFT_POLICY";
/// Name of the governed set: hash of identity `u32` → [`GOVERNED`].
pub const GOVERNED_MAP: &str = "WEFT_GOVERNED";
/// Name of the hosted prefixes: LPM trie of [`IpcacheKey`] (with a prefix
/// length) → [`HOSTED`]; the addresses that live on this node.
pub const HOSTED_MAP: &str = "WEFT_HOSTED";
/// Name of the per-CPU array of [`crate::Counters`] indexed by
/// [`PolicyVerdict::index`].
pub const VERDICT_COUNTERS_MAP: &str = "WEFT_POLICY_VERDICTS";
/// Name of the per-CPU array of [`crate::Counters`] indexed by
/// [`PolicyValue::rule`].
pub const RULE_COUNTERS_MAP: &str = "WEFT_POLICY_RULES";
/// Name of the configuration array (`u32` values, indexed by
/// [`CONFIG_L3_OFFSET`]).
pub const CONFIG_MAP: &str = "WEFT_POLICY_CONFIG";
/// Name of the connection-tracking table: LRU hash of [`CtKey`] →
/// [`CtValue`].
pub const CONNTRACK_MAP: &str = "WEFT_CT";
/// Name of the remembered datagrams: LRU hash of [`FragKey`] →
/// [`FragValue`] (see the module documentation, "Fragments").
pub const FRAGMENTS_MAP: &str = "WEFT_FRAGMENTS";
/// Name of the enforcing classifier (remote → local).
pub const POLICY_INGRESS_PROGRAM: &str = "weft_policy_ingress";
/// Name of the egress classifier (local → remote: records the flows the
/// node opens, counts and passes).
pub const POLICY_EGRESS_PROGRAM: &str = "weft_policy_egress";

/// Slot of [`CONFIG_MAP`]: where the IP header starts in the packet, in
/// bytes. 0 on an L3 device (the TUN device); 14 on an Ethernet device and
/// under BPF_PROG_TEST_RUN (which always hands TC programs an Ethernet
/// frame). The loader sets it; the program trusts it.
pub const CONFIG_L3_OFFSET: u32 = 0;
/// Slot of [`CONFIG_MAP`]: the active epoch (0 or 1) of the ipcache, policy,
/// governed and hosted maps.
pub const CONFIG_EPOCH: u32 = 1;
/// Slot of [`CONFIG_MAP`]: an interface index (0: none). The enforcing
/// classifier passes, without a lookup or a count, a packet that entered
/// the node through this interface: on a workload interface, traffic from
/// the TUN device, which the TUN device's own classifier already judged.
pub const CONFIG_SKIP_INGRESS_IFINDEX: u32 = 2;
/// Number of slots of [`CONFIG_MAP`].
pub const CONFIG_SLOTS: u32 = 3;
/// Number of epochs (copies of the policy maps).
pub const EPOCHS: u32 = 2;

/// The identity of addresses the ipcache does not know.
pub const WORLD: u32 = 0;
/// Value stored in [`GOVERNED_MAP`] for a governed identity (a `u32`
/// flag, not a `bool`: every bit pattern of a map value must be valid).
pub const GOVERNED: u32 = 1;
/// Value stored in [`HOSTED_MAP`] for a hosted prefix (non-zero).
pub const HOSTED: u32 = 1;

/// Capacity of [`IPCACHE_MAP`] (both epochs).
pub const IPCACHE_MAX_ENTRIES: u32 = 1 << 17;
/// Capacity of [`POLICY_MAP`] (blocks, not rules: a port range takes at
/// most [`MAX_BLOCKS_PER_RANGE`]; both epochs).
pub const POLICY_MAX_ENTRIES: u32 = 1 << 21;
/// Capacity of [`GOVERNED_MAP`] (both epochs).
pub const GOVERNED_MAX_ENTRIES: u32 = 1 << 17;
/// Capacity of [`HOSTED_MAP`] (both epochs): a node's own two addresses
/// and its advertised workload prefixes.
pub const HOSTED_MAX_ENTRIES: u32 = 1 << 12;
/// Capacity of [`CONNTRACK_MAP`]: the least recently used flow goes first
/// when it is full.
pub const CONNTRACK_MAX_ENTRIES: u32 = 1 << 16;
/// Idle time after which a tracked TCP flow no longer passes (its packets
/// meet the policy again).
pub const CT_TIMEOUT_TCP_NS: u64 = 2 * 3600 * 1_000_000_000;
/// Idle timeout of a tracked UDP flow.
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * 1_000_000_000;
/// Idle timeout of a tracked ICMP echo exchange.
pub const CT_TIMEOUT_ICMP_NS: u64 = 30 * 1_000_000_000;
/// A tracked entry's timestamp is rewritten at most this often (fewer
/// writes to a shared cache line).
pub const CT_REFRESH_NS: u64 = 1_000_000_000;
/// Capacity of [`FRAGMENTS_MAP`]: datagrams whose later fragments are
/// awaited; the least recently used goes first when it is full (its later
/// fragments are then dropped: fail closed).
pub const FRAGMENTS_MAX_ENTRIES: u32 = 1 << 14;
/// How long after its first fragment a datagram's later fragments pass.
/// Fragments of one datagram leave the sender together and cross the
/// overlay within milliseconds; an identification is reused sooner or
/// later, so the memory is kept short (the kernel's own reassembly
/// timeout is 30 s for IPv4, 60 s for IPv6).
pub const FRAG_TIMEOUT_NS: u64 = 5 * 1_000_000_000;
/// IPv6 extension headers the ingress program walks at most before the
/// L4 header; a longer chain to a governed, hosted destination is dropped.
pub const MAX_V6_EXT: usize = 8;
/// Capacity of [`RULE_COUNTERS_MAP`]: rule indices must be below this.
pub const RULE_COUNTER_SLOTS: u32 = 1 << 16;
/// Most aligned power-of-two blocks a 16-bit port range decomposes into.
pub const MAX_BLOCKS_PER_RANGE: usize = 30;

/// Protocol numbers in [`PolicyKey::proto`]. ICMPv6 packets are looked up
/// as [`PROTO_ICMP`]: the policy's "ICMP" covers both families.
pub const PROTO_ICMP: u8 = 1;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMPv6 on the wire (never in a key: see [`PROTO_ICMP`]).
pub const PROTO_ICMPV6: u8 = 58;

/// Data of an ipcache key: the epoch, then a 16-byte address, IPv4 as
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`). The LPM trie key is
/// `prefix_len: u32` (host order) followed by this; the prefix length
/// counts the epoch's 32 bits ([`IpcacheKey::EPOCH_BITS`]) plus the
/// address prefix (+ 96 for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheKey {
    /// The epoch (big-endian).
    pub epoch: [u8; 4],
    /// The address, network byte order.
    pub addr: [u8; 16],
}

impl IpcacheKey {
    /// Prefix bits of the epoch, matched exactly.
    pub const EPOCH_BITS: u32 = 32;
    /// Full prefix length of a key (an exact address).
    pub const FULL_PREFIX: u32 = Self::EPOCH_BITS + 128;
    /// Prefix bits an IPv4 prefix is offset by in its mapped form.
    pub const V4_MAPPED_OFFSET: u32 = 96;

    /// The key of an IPv4 address (`::ffff:a.b.c.d`) in `epoch`.
    #[must_use]
    pub const fn v4(epoch: u32, octets: [u8; 4]) -> Self {
        let mut addr = [0; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self::v6(epoch, addr)
    }

    /// The key of an IPv6 address in `epoch`.
    #[must_use]
    pub const fn v6(epoch: u32, octets: [u8; 16]) -> Self {
        Self {
            epoch: epoch.to_be_bytes(),
            addr: octets,
        }
    }
}

/// Key of the governed set: an identity in an epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GovernedKey {
    /// The epoch (0 or 1).
    pub epoch: u32,
    /// The destination identity.
    pub identity: u32,
}

/// Data of a policy key (the LPM trie key is `prefix_len: u32` followed by
/// this). All fields big-endian. Rules match `dst_identity`,
/// `src_identity`, `proto` and `pad` exactly ([`PolicyKey::PORT_PREFIX_START`]
/// bits) and a prefix of the port bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// Identity of the destination address (big-endian).
    pub dst_identity: [u8; 4],
    /// Identity of the source address (big-endian).
    pub src_identity: [u8; 4],
    /// IP protocol ([`PROTO_TCP`], [`PROTO_UDP`], [`PROTO_ICMP`]; others
    /// never match a rule).
    pub proto: u8,
    /// The epoch (0 or 1).
    pub epoch: u8,
    /// Destination port (big-endian); 0 for ICMP and other protocols.
    pub port: [u8; 2],
}

impl PolicyKey {
    /// Prefix bits before the port: dst (32) + src (32) + proto (8) + epoch (8).
    pub const PORT_PREFIX_START: u32 = 80;
    /// Full prefix length (an exact port).
    pub const FULL_PREFIX: u32 = Self::PORT_PREFIX_START + 16;

    /// The key of one packet (or of the first port of a block) in `epoch`.
    #[must_use]
    pub const fn new(
        epoch: u8,
        dst_identity: u32,
        src_identity: u32,
        proto: u8,
        port: u16,
    ) -> Self {
        Self {
            dst_identity: dst_identity.to_be_bytes(),
            src_identity: src_identity.to_be_bytes(),
            proto,
            epoch,
            port: port.to_be_bytes(),
        }
    }
}

/// What [`PolicyValue::verdict`] says.
pub const VERDICT_ALLOW: u32 = 1;
/// Drop the packet.
pub const VERDICT_DENY: u32 = 2;

/// Value of the policy map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyValue {
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`]; anything else drops (fail
    /// closed) and counts as denied.
    pub verdict: u32,
    /// Slot of the rule in [`RULE_COUNTERS_MAP`] (< [`RULE_COUNTER_SLOTS`]).
    pub rule: u32,
}

/// Slots of [`VERDICT_COUNTERS_MAP`]: what the policy classifiers decided.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyVerdict {
    /// Governed destination, an allow rule matched: passed.
    Allowed = 0,
    /// Governed destination, a deny rule matched: dropped.
    Denied = 1,
    /// Governed destination, no rule matched: dropped.
    DefaultDenied = 2,
    /// The program could not parse the packet and it was not shown to go
    /// to an ungoverned destination: dropped (fail closed).
    Unparsable = 3,
    /// Destination not governed (or not IP at all): passed.
    NotGoverned = 4,
    /// Seen by the egress classifier, which does not enforce: passed (and
    /// the flow tracked).
    EgressPassed = 5,
    /// Governed destination, the flow is tracked (the node opened it, or a
    /// policy allowed it earlier): passed without a policy lookup.
    Established = 6,
    /// Governed destination identity, but an address this node does not
    /// host (a gateway relaying for another member): passed without a
    /// policy lookup or tracking; the node hosting it judges it.
    Forwarded = 7,
}

impl PolicyVerdict {
    /// Every verdict, in slot order.
    pub const ALL: [PolicyVerdict; 8] = [
        PolicyVerdict::Allowed,
        PolicyVerdict::Denied,
        PolicyVerdict::DefaultDenied,
        PolicyVerdict::Unparsable,
        PolicyVerdict::NotGoverned,
        PolicyVerdict::EgressPassed,
        PolicyVerdict::Established,
        PolicyVerdict::Forwarded,
    ];

    /// Slot of this verdict in [`VERDICT_COUNTERS_MAP`].
    #[must_use]
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Number of entries of [`VERDICT_COUNTERS_MAP`].
pub const VERDICT_SLOTS: u32 = PolicyVerdict::ALL.len() as u32;

/// Key of [`CONNTRACK_MAP`]: one flow, in the orientation of the packets
/// that enter the node (`src` remote, `dst` local). Addresses are 16 bytes
/// (IPv4-mapped for IPv4), ports big-endian. For an ICMP echo exchange
/// `src_port` is the echo identifier and `dst_port` says which message
/// enters the node: 1 an echo request, 0 an echo reply; `proto` is
/// [`PROTO_ICMP`] for ICMP and ICMPv6 alike.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    /// Remote address.
    pub src: [u8; 16],
    /// Local address.
    pub dst: [u8; 16],
    /// Remote port (big-endian), or the ICMP echo identifier.
    pub src_port: [u8; 2],
    /// Local port (big-endian); for ICMP 1 (echo requests enter) or 0
    /// (echo replies enter).
    pub dst_port: [u8; 2],
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_ICMP`].
    pub proto: u8,
    /// Always 0 (explicit padding).
    pub pad: [u8; 3],
}

/// [`CtValue::origin`]: the node opened the flow (seen first on egress).
pub const CT_OUTBOUND: u32 = 1;
/// [`CtValue::origin`]: a policy allowed the flow into the node.
pub const CT_INBOUND: u32 = 2;
/// [`CtValue::origin`]: an inbound flow a later policy revoked. It passes
/// nothing, and the node's own packets of the flow do not re-open it (only
/// a new TCP connection, a SYN, or a policy that allows it again does).
pub const CT_REVOKED: u32 = 3;

/// Value of [`CONNTRACK_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` when a packet of the flow was last seen (updated
    /// at most every [`CT_REFRESH_NS`]).
    pub last_seen_ns: u64,
    /// [`CT_OUTBOUND`], [`CT_INBOUND`] or [`CT_REVOKED`].
    pub origin: u32,
    /// Rule slot that allowed an inbound flow (0 for outbound flows).
    pub rule: u32,
}

impl CtValue {
    /// Idle timeout of a flow of protocol `proto`.
    #[must_use]
    pub const fn timeout_ns(proto: u8) -> u64 {
        match proto {
            PROTO_TCP => CT_TIMEOUT_TCP_NS,
            PROTO_UDP => CT_TIMEOUT_UDP_NS,
            _ => CT_TIMEOUT_ICMP_NS,
        }
    }

    /// Whether a packet of protocol `proto` seen at `now_ns` still belongs
    /// to this tracked flow.
    #[must_use]
    pub const fn live(&self, proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) < Self::timeout_ns(proto)
    }
}

/// Key of [`FRAGMENTS_MAP`]: one fragmented datagram entering the node.
/// Addresses are 16 bytes (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// The identification (big-endian): IPv4's 16 bits in the last two
    /// bytes, IPv6's Fragment header's 32 bits.
    pub id: [u8; 4],
    /// IPv4's protocol; for IPv6 the Fragment header's next header (the
    /// same in every fragment of a datagram).
    pub proto: u8,
    /// Always 0 (explicit padding).
    pub pad: [u8; 3],
}

/// Value of [`FRAGMENTS_MAP`]: how the datagram's first fragment passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragValue {
    /// `bpf_ktime_get_ns` when the first fragment passed.
    pub first_seen_ns: u64,
    /// [`PolicyVerdict::index`] of [`PolicyVerdict::Allowed`] or
    /// [`PolicyVerdict::Established`]; any other value passes nothing.
    pub verdict: u32,
    /// The rule that allowed it (0 when established).
    pub rule: u32,
}

impl FragValue {
    /// Whether a later fragment seen at `now_ns` still belongs to this
    /// datagram.
    #[must_use]
    pub const fn live(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.first_seen_ns) < FRAG_TIMEOUT_NS
    }
}

// SAFETY (all): `#[repr(C)]`, `Copy`, fixed-width integer fields and
// byte arrays with no implicit padding (sizes asserted below), so every bit
// pattern is a valid value.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for IpcacheKey {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for PolicyKey {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for PolicyValue {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for GovernedKey {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for CtKey {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for CtValue {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for FragKey {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for FragValue {}

const _: () = assert!(core::mem::size_of::<IpcacheKey>() == 20);
const _: () = assert!(core::mem::size_of::<GovernedKey>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue>() == 16);
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);
const _: () = assert!(core::mem::size_of::<FragValue>() == 16);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::align_of::<PolicyKey>() == 1);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);
const _: () = assert!(PolicyKey::FULL_PREFIX as usize == 8 * core::mem::size_of::<PolicyKey>());

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn ipcache_key_is_epoch_then_address() {
        assert_eq!(size_of::<IpcacheKey>(), 20);
        assert_eq!(offset_of!(IpcacheKey, addr), 4);
        let k = IpcacheKey::v4(1, [100, 64, 0, 1]);
        assert_eq!(k.epoch, [0, 0, 0, 1]);
        assert_eq!(
            k.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 100, 64, 0, 1]
        );
        assert_eq!(
            IpcacheKey::FULL_PREFIX as usize,
            8 * size_of::<IpcacheKey>()
        );
    }

    #[test]
    fn conntrack_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(offset_of!(CtKey, dst), 16);
        assert_eq!(offset_of!(CtKey, src_port), 32);
        assert_eq!(offset_of!(CtKey, dst_port), 34);
        assert_eq!(offset_of!(CtKey, proto), 36);
        assert_eq!(size_of::<CtValue>(), 16);
        assert_eq!(offset_of!(CtValue, origin), 8);
    }

    #[test]
    fn fragment_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(offset_of!(FragKey, dst), 16);
        assert_eq!(offset_of!(FragKey, id), 32);
        assert_eq!(offset_of!(FragKey, proto), 36);
        assert_eq!(offset_of!(FragKey, pad), 37);
        assert_eq!(size_of::<FragValue>(), 16);
        assert_eq!(offset_of!(FragValue, verdict), 8);
        assert_eq!(offset_of!(FragValue, rule), 12);
    }

    #[test]
    fn a_remembered_datagram_lives_for_the_fragment_timeout() {
        let v = FragValue {
            first_seen_ns: 1_000,
            verdict: PolicyVerdict::Allowed.index(),
            rule: 2,
        };
        assert!(v.live(1_000));
        assert!(v.live(1_000 + FRAG_TIMEOUT_NS - 1));
        assert!(!v.live(1_000 + FRAG_TIMEOUT_NS));
        // A clock read before the entry was written is not idle time.
        assert!(v.live(0));
    }

    #[test]
    fn conntrack_timeouts_by_protocol() {
        let v = CtValue {
            last_seen_ns: 1_000,
            origin: CT_OUTBOUND,
            rule: 0,
        };
        assert!(v.live(PROTO_UDP, 1_000 + CT_TIMEOUT_UDP_NS - 1));
        assert!(!v.live(PROTO_UDP, 1_000 + CT_TIMEOUT_UDP_NS));
        assert!(v.live(PROTO_TCP, 1_000 + CT_TIMEOUT_UDP_NS));
        assert!(!v.live(PROTO_ICMP, 1_000 + CT_TIMEOUT_ICMP_NS));
        // A clock read before the entry was written is not idle time.
        assert!(v.live(PROTO_ICMP, 0));
    }

    #[test]
    fn policy_key_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(offset_of!(PolicyKey, dst_identity), 0);
        assert_eq!(offset_of!(PolicyKey, src_identity), 4);
        assert_eq!(offset_of!(PolicyKey, proto), 8);
        assert_eq!(offset_of!(PolicyKey, epoch), 9);
        assert_eq!(offset_of!(PolicyKey, port), 10);
        assert_eq!(
            PolicyKey::PORT_PREFIX_START as usize,
            8 * offset_of!(PolicyKey, port)
        );
        let k = PolicyKey::new(1, 0x0102_0304, 7, PROTO_TCP, 443);
        assert_eq!(k.epoch, 1);
        assert_eq!(k.dst_identity, [1, 2, 3, 4]);
        assert_eq!(k.src_identity, [0, 0, 0, 7]);
        assert_eq!(k.port, [0x01, 0xbb]);
    }

    #[test]
    fn policy_value_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(offset_of!(PolicyValue, verdict), 0);
        assert_eq!(offset_of!(PolicyValue, rule), 4);
    }

    #[test]
    fn verdicts_cover_the_slots_once() {
        for (i, v) in PolicyVerdict::ALL.iter().enumerate() {
            assert_eq!(v.index() as usize, i, "{v:?} out of slot order");
        }
        assert_eq!(VERDICT_SLOTS as usize, PolicyVerdict::ALL.len());
    }
}
