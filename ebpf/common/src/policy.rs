//! Maps of the network-policy datapath (`weft_policy_ingress` /
//! `weft_policy_egress`), shared by the eBPF programs and the agent.
//!
//! Per packet the ingress program does two ipcache lookups (source and
//! destination address → identity), one hash lookup (is the destination
//! identity governed?) and one policy LPM lookup with the full key, whatever
//! the number of rules: port ranges are stored as aligned power-of-two
//! blocks, a prefix on the port bits of [`PolicyKey`].
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
/// Name of the per-CPU array of [`crate::Counters`] indexed by
/// [`PolicyVerdict::index`].
pub const VERDICT_COUNTERS_MAP: &str = "WEFT_POLICY_VERDICTS";
/// Name of the per-CPU array of [`crate::Counters`] indexed by
/// [`PolicyValue::rule`].
pub const RULE_COUNTERS_MAP: &str = "WEFT_POLICY_RULES";
/// Name of the configuration array (`u32` values, indexed by
/// [`CONFIG_L3_OFFSET`]).
pub const CONFIG_MAP: &str = "WEFT_POLICY_CONFIG";
/// Name of the enforcing classifier (remote → local).
pub const POLICY_INGRESS_PROGRAM: &str = "weft_policy_ingress";
/// Name of the egress classifier (local → remote; counts and passes).
pub const POLICY_EGRESS_PROGRAM: &str = "weft_policy_egress";

/// Slot of [`CONFIG_MAP`]: where the IP header starts in the packet, in
/// bytes. 0 on an L3 device (the TUN device); 14 on an Ethernet device and
/// under BPF_PROG_TEST_RUN (which always hands TC programs an Ethernet
/// frame). The loader sets it; the program trusts it.
pub const CONFIG_L3_OFFSET: u32 = 0;
/// Number of slots of [`CONFIG_MAP`].
pub const CONFIG_SLOTS: u32 = 1;

/// The identity of addresses the ipcache does not know.
pub const WORLD: u32 = 0;
/// Value stored in [`GOVERNED_MAP`] for a governed identity (a `u32`
/// flag, not a `bool`: every bit pattern of a map value must be valid).
pub const GOVERNED: u32 = 1;

/// Capacity of [`IPCACHE_MAP`].
pub const IPCACHE_MAX_ENTRIES: u32 = 1 << 16;
/// Capacity of [`POLICY_MAP`] (blocks, not rules: a port range takes at
/// most [`MAX_BLOCKS_PER_RANGE`]).
pub const POLICY_MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of [`GOVERNED_MAP`].
pub const GOVERNED_MAX_ENTRIES: u32 = 1 << 16;
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

/// Data of an ipcache key: a 16-byte address, IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`, prefix length + 96). The LPM trie key is
/// `prefix_len: u32` (host order) followed by this.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheKey {
    /// The address, network byte order.
    pub addr: [u8; 16],
}

impl IpcacheKey {
    /// Full prefix length of a key (an exact address).
    pub const FULL_PREFIX: u32 = 128;
    /// Prefix bits an IPv4 prefix is offset by in its mapped form.
    pub const V4_MAPPED_OFFSET: u32 = 96;

    /// The key of an IPv4 address (`::ffff:a.b.c.d`).
    #[must_use]
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    /// The key of an IPv6 address.
    #[must_use]
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }
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
    /// Always 0 (explicit padding).
    pub pad: u8,
    /// Destination port (big-endian); 0 for ICMP and other protocols.
    pub port: [u8; 2],
}

impl PolicyKey {
    /// Prefix bits before the port: dst (32) + src (32) + proto (8) + pad (8).
    pub const PORT_PREFIX_START: u32 = 80;
    /// Full prefix length (an exact port).
    pub const FULL_PREFIX: u32 = Self::PORT_PREFIX_START + 16;

    /// The key of one packet (or of the first port of a block).
    #[must_use]
    pub const fn new(dst_identity: u32, src_identity: u32, proto: u8, port: u16) -> Self {
        Self {
            dst_identity: dst_identity.to_be_bytes(),
            src_identity: src_identity.to_be_bytes(),
            proto,
            pad: 0,
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
    /// Seen by the egress classifier, which does not enforce yet: passed.
    EgressPassed = 5,
}

impl PolicyVerdict {
    /// Every verdict, in slot order.
    pub const ALL: [PolicyVerdict; 6] = [
        PolicyVerdict::Allowed,
        PolicyVerdict::Denied,
        PolicyVerdict::DefaultDenied,
        PolicyVerdict::Unparsable,
        PolicyVerdict::NotGoverned,
        PolicyVerdict::EgressPassed,
    ];

    /// Slot of this verdict in [`VERDICT_COUNTERS_MAP`].
    #[must_use]
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Number of entries of [`VERDICT_COUNTERS_MAP`].
pub const VERDICT_SLOTS: u32 = PolicyVerdict::ALL.len() as u32;

// SAFETY (all three): `#[repr(C)]`, `Copy`, fixed-width integer fields and
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

const _: () = assert!(core::mem::size_of::<IpcacheKey>() == 16);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::align_of::<PolicyKey>() == 1);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);
const _: () = assert!(PolicyKey::FULL_PREFIX as usize == 8 * core::mem::size_of::<PolicyKey>());

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn ipcache_key_is_sixteen_bytes() {
        assert_eq!(size_of::<IpcacheKey>(), 16);
        assert_eq!(
            IpcacheKey::v4([100, 64, 0, 1]).addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 100, 64, 0, 1]
        );
    }

    #[test]
    fn policy_key_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(offset_of!(PolicyKey, dst_identity), 0);
        assert_eq!(offset_of!(PolicyKey, src_identity), 4);
        assert_eq!(offset_of!(PolicyKey, proto), 8);
        assert_eq!(offset_of!(PolicyKey, pad), 9);
        assert_eq!(offset_of!(PolicyKey, port), 10);
        assert_eq!(
            PolicyKey::PORT_PREFIX_START as usize,
            8 * offset_of!(PolicyKey, port)
        );
        let k = PolicyKey::new(0x0102_0304, 7, PROTO_TCP, 443);
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
