//! Lowering of compiled network policy to the exact entries of the eBPF
//! policy maps (`weft_ebpf_common::policy`), and the diff between two such
//! sets of entries, which the agent applies to the live maps without
//! reloading the programs.
//!
//! Pure: no aya, no kernel. The entry types here mirror the kernel's keys
//! field for field but in plain Rust (host-order integers); the agent turns
//! them into the `#[repr(C)]` types of `weft-ebpf-common` (a test there
//! checks that the constants agree).
//!
//! - ipcache: LPM trie keyed by a 16-byte address; IPv4 prefixes are stored
//!   as IPv4-mapped IPv6 (`::ffff:a.b.c.d`, prefix length + 96).
//! - policy: LPM trie keyed by `{dst, src, proto, port}`; a port range is
//!   decomposed into aligned power-of-two blocks ([`port_blocks`], at most
//!   [`MAX_BLOCKS_PER_RANGE`]), each one entry whose prefix covers the
//!   identities, the protocol, the pad byte and the block's port bits. A
//!   packet is one lookup with the full key.
//! - governed: the set of destination identities that are default-deny.
//! - hosted: LPM trie of the prefixes that live on this node (its own
//!   overlay addresses, the workload prefixes it advertises), keyed like
//!   the ipcache. The classifiers judge and track only packets to (and
//!   flows from) these addresses: a node relaying for another member of
//!   the same identity (a gateway) passes them as forwarded, and the node
//!   that hosts the destination judges them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A numeric identity (0 is [`WORLD`]).
pub type Identity = u32;

/// Identity of addresses the ipcache does not know.
pub const WORLD: Identity = 0;

/// Rule indices must be below this (the size of the kernel's per-rule
/// counter array, `weft_ebpf_common::policy::RULE_COUNTER_SLOTS`).
pub const RULE_SLOTS: u32 = 1 << 16;

/// Most blocks one port range lowers to (2 × 16 − 2).
pub const MAX_BLOCKS_PER_RANGE: usize = 30;

/// Prefix bits of a policy key before the port: dst (32), src (32), proto
/// (8), pad (8).
pub const PORT_PREFIX_START: u32 = 80;

/// Prefix length of a full ipcache key (one address).
pub const IPCACHE_FULL_PREFIX: u32 = 128;

/// Protocol of a rule, keyed by its IP protocol number. `Icmp` covers
/// ICMPv6 too: the program looks ICMPv6 packets up as ICMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP and ICMPv6 (1; no ports: the range must be `0..=0`).
    Icmp,
}

impl Protocol {
    /// The protocol byte of the policy key.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
        }
    }
}

/// What a rule says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Drop it.
    Deny,
}

impl Verdict {
    /// The value stored in the map (`VERDICT_ALLOW` = 1, `VERDICT_DENY` = 2).
    #[must_use]
    pub const fn code(self) -> u32 {
        match self {
            Verdict::Allow => 1,
            Verdict::Deny => 2,
        }
    }
}

/// One compiled rule tuple: packets from `src` to `dst` with `protocol`
/// and a destination port in `first..=last` get `verdict`, counted in the
/// per-rule counter `rule`. Tuples of the same `(dst, src, protocol)` must
/// not overlap (the controller's compiler already split ranges and let deny
/// win).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyTuple {
    /// Destination identity.
    pub dst: Identity,
    /// Source identity ([`WORLD`] for unknown addresses).
    pub src: Identity,
    /// Protocol.
    pub protocol: Protocol,
    /// First destination port (0 for ICMP).
    pub first: u16,
    /// Last destination port, inclusive (0 for ICMP).
    pub last: u16,
    /// Verdict for the whole range.
    pub verdict: Verdict,
    /// Per-rule counter slot (< [`RULE_SLOTS`]).
    pub rule: u32,
}

/// What the agent knows of the node's compiled policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInput {
    /// Overlay prefix → identity.
    pub ipcache: Vec<(IpNet, Identity)>,
    /// Destination identities that are default-deny.
    pub governed: BTreeSet<Identity>,
    /// Rule tuples.
    pub tuples: Vec<PolicyTuple>,
    /// Names of the rules the tuples count in: slot `i + 1` is
    /// `rules[i]` (e.g. `db/ingress[0]`); slot 0 is unnamed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// Prefixes this node hosts (host bits are ignored): its own overlay
    /// addresses (/32 and /128) and the workload prefixes it advertises.
    /// Policy is enforced, and flows tracked, for these addresses only.
    /// The controller always names the node's own addresses, so an empty
    /// list only comes from a config computed before hosted prefixes
    /// existed: it is lowered as "every address is hosted", which enforces
    /// as such configs always did (fail closed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local: Vec<IpNet>,
}

impl PolicyInput {
    /// The name of rule counter `slot`, if the policy names it.
    #[must_use]
    pub fn rule_name(&self, slot: u32) -> Option<&str> {
        let i = usize::try_from(slot.checked_sub(1)?).ok()?;
        self.rules.get(i).map(String::as_str)
    }
}

/// Why an input cannot be lowered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPolicyInput {
    /// `first > last`.
    #[error("tuple {0:?}: first port {first} is above last port {last}", first = .0.first, last = .0.last)]
    EmptyRange(PolicyTuple),
    /// An ICMP tuple with ports other than `0..=0`.
    #[error("tuple {0:?}: ICMP has no ports, the range must be 0..=0")]
    IcmpPorts(PolicyTuple),
    /// Rule index outside the counter array.
    #[error("tuple {0:?}: rule index must be below {RULE_SLOTS}")]
    RuleOutOfRange(PolicyTuple),
    /// Two tuples of one `(dst, src, protocol)` share ports.
    #[error("tuples {0:?} and {1:?} overlap: each port must have one verdict")]
    Overlap(PolicyTuple, PolicyTuple),
    /// One prefix mapped to two identities.
    #[error("ipcache prefix {prefix} maps to both identity {a} and identity {b}")]
    IpcacheConflict {
        /// The (normalized) prefix.
        prefix: IpNet,
        /// One identity.
        a: Identity,
        /// The other.
        b: Identity,
    },
}

/// An aligned block of ports: the `2^(16 - prefix_len)` ports from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortBlock {
    /// First port (its low `16 - prefix_len` bits are zero).
    pub start: u16,
    /// Port bits fixed by the block (0..=16).
    pub prefix_len: u32,
}

impl PortBlock {
    /// Last port of the block.
    #[must_use]
    pub fn end(self) -> u16 {
        let size = 1u32 << (16 - self.prefix_len);
        u16::try_from(u32::from(self.start) + size - 1).unwrap_or(u16::MAX)
    }

    /// Whether `port` is in the block.
    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        port_mask(port, self.prefix_len) == self.start
    }
}

/// `port` with all but its first `prefix_len` bits cleared.
fn port_mask(port: u16, prefix_len: u32) -> u16 {
    match prefix_len {
        0 => 0,
        p if p >= 16 => port,
        p => port & (u16::MAX << (16 - p)),
    }
}

/// The aligned power-of-two blocks covering exactly `first..=last`, in
/// ascending order (empty if `first > last`; at most
/// [`MAX_BLOCKS_PER_RANGE`]).
#[must_use]
pub fn port_blocks(first: u16, last: u16) -> Vec<PortBlock> {
    let mut blocks = Vec::new();
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // Largest aligned block at `start` that does not pass `end`.
        let mut size_log = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << size_log) - 1 > end {
            size_log -= 1;
        }
        blocks.push(PortBlock {
            start: u16::try_from(start).unwrap_or(u16::MAX),
            prefix_len: 16 - size_log,
        });
        start += 1 << size_log;
    }
    blocks
}

/// Key of one ipcache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheEntryKey {
    /// Prefix length over the 16-byte address (IPv4: its own + 96).
    pub prefix_len: u32,
    /// The address (IPv4-mapped for IPv4), bits past the prefix zero.
    pub addr: [u8; 16],
}

impl IpcacheEntryKey {
    /// The key of a prefix (host bits cleared).
    #[must_use]
    pub fn from_net(net: IpNet) -> Self {
        match net.trunc() {
            IpNet::V4(n) => Self {
                prefix_len: u32::from(n.prefix_len()) + 96,
                addr: n.network().to_ipv6_mapped().octets(),
            },
            IpNet::V6(n) => Self {
                prefix_len: u32::from(n.prefix_len()),
                addr: n.network().octets(),
            },
        }
    }
}

/// The 16-byte form of an address (IPv4-mapped for IPv4), as the program
/// looks it up.
#[must_use]
pub fn lookup_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Key of one policy entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntryKey {
    /// Destination identity.
    pub dst: Identity,
    /// Source identity.
    pub src: Identity,
    /// IP protocol byte ([`Protocol::number`]).
    pub proto: u8,
    /// First port of the block (host order here, big-endian in the kernel).
    pub port: u16,
    /// LPM prefix length over the whole key: [`PORT_PREFIX_START`] + the
    /// block's port bits.
    pub prefix_len: u32,
}

/// Value of one policy entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntryValue {
    /// The verdict ([`Verdict::code`] in the kernel).
    pub verdict: Verdict,
    /// Per-rule counter slot.
    pub rule: u32,
}

/// The full contents of the four policy maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyMaps {
    /// ipcache entries.
    pub ipcache: BTreeMap<IpcacheEntryKey, Identity>,
    /// policy entries (port blocks).
    pub policy: BTreeMap<PolicyEntryKey, PolicyEntryValue>,
    /// governed identities (value `1` in the kernel).
    pub governed: BTreeSet<Identity>,
    /// prefixes hosted by this node (value `1` in the kernel); empty maps
    /// host nothing.
    pub hosted: BTreeSet<IpcacheEntryKey>,
}

/// What the datapath decides for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The destination identity is not governed: pass.
    NotGoverned,
    /// The destination identity is governed but its address is not hosted
    /// by this node (it forwards the packet): pass.
    Forwarded,
    /// A rule matched.
    Rule {
        /// Its verdict.
        verdict: Verdict,
        /// Its counter slot.
        rule: u32,
    },
    /// Governed, no rule: drop.
    DefaultDeny,
}

/// Lowers `input` to map entries.
///
/// # Errors
///
/// [`InvalidPolicyInput`] for an empty range, ICMP with ports, a rule
/// index out of range, overlapping tuples, or a prefix given two
/// identities.
pub fn lower(input: &PolicyInput) -> Result<PolicyMaps, InvalidPolicyInput> {
    let hosted = if input.local.is_empty() {
        // A config from before hosted prefixes: every address (prefix
        // length 0 covers IPv4-mapped addresses too).
        [IpcacheEntryKey {
            prefix_len: 0,
            addr: [0; 16],
        }]
        .into()
    } else {
        input
            .local
            .iter()
            .map(|&net| IpcacheEntryKey::from_net(net))
            .collect()
    };
    let mut maps = PolicyMaps {
        governed: input.governed.clone(),
        hosted,
        ..PolicyMaps::default()
    };
    for &(net, identity) in &input.ipcache {
        let key = IpcacheEntryKey::from_net(net);
        if let Some(&a) = maps.ipcache.get(&key)
            && a != identity
        {
            return Err(InvalidPolicyInput::IpcacheConflict {
                prefix: net.trunc(),
                a,
                b: identity,
            });
        }
        maps.ipcache.insert(key, identity);
    }

    let mut tuples = input.tuples.clone();
    tuples.sort_by_key(|t| (t.dst, t.src, t.protocol, t.first));
    let mut previous: Option<PolicyTuple> = None;
    for t in tuples {
        if t.first > t.last {
            return Err(InvalidPolicyInput::EmptyRange(t));
        }
        if t.protocol == Protocol::Icmp && (t.first, t.last) != (0, 0) {
            return Err(InvalidPolicyInput::IcmpPorts(t));
        }
        if t.rule >= RULE_SLOTS {
            return Err(InvalidPolicyInput::RuleOutOfRange(t));
        }
        if let Some(p) = previous
            && (p.dst, p.src, p.protocol) == (t.dst, t.src, t.protocol)
            && p.last >= t.first
        {
            return Err(InvalidPolicyInput::Overlap(p, t));
        }
        previous = Some(t);
        let value = PolicyEntryValue {
            verdict: t.verdict,
            rule: t.rule,
        };
        for block in port_blocks(t.first, t.last) {
            maps.policy.insert(
                PolicyEntryKey {
                    dst: t.dst,
                    src: t.src,
                    proto: t.protocol.number(),
                    port: block.start,
                    prefix_len: PORT_PREFIX_START + block.prefix_len,
                },
                value,
            );
        }
    }
    Ok(maps)
}

impl PolicyMaps {
    /// Longest-prefix match of `addr` in the ipcache, as the kernel does it
    /// ([`WORLD`] when nothing matches).
    #[must_use]
    pub fn identity(&self, addr: IpAddr) -> Identity {
        covering_keys(addr)
            .find_map(|key| self.ipcache.get(&key))
            .copied()
            .unwrap_or(WORLD)
    }

    /// Whether `addr` lies in a hosted prefix, as the kernel's lookup in
    /// the hosted-prefix trie finds it.
    #[must_use]
    pub fn hosts(&self, addr: IpAddr) -> bool {
        covering_keys(addr).any(|key| self.hosted.contains(&key))
    }

    /// What the ingress program decides for a packet between identities:
    /// the governed check, then one longest-prefix match of the full key
    /// over the policy entries (a reference model of the kernel lookup).
    #[must_use]
    pub fn decide(&self, dst: Identity, src: Identity, proto: u8, port: u16) -> Decision {
        if !self.governed.contains(&dst) {
            return Decision::NotGoverned;
        }
        (0..=16)
            .rev()
            .find_map(|bits| {
                self.policy.get(&PolicyEntryKey {
                    dst,
                    src,
                    proto,
                    port: port_mask(port, bits),
                    prefix_len: PORT_PREFIX_START + bits,
                })
            })
            .map_or(Decision::DefaultDeny, |v| Decision::Rule {
                verdict: v.verdict,
                rule: v.rule,
            })
    }

    /// [`Self::decide`] for a packet between addresses, in the kernel's
    /// order: a governed destination identity at an address this node does
    /// not host is [`Decision::Forwarded`] without a rule lookup.
    #[must_use]
    pub fn decide_packet(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Decision {
        let dst_identity = self.identity(dst);
        if self.governed.contains(&dst_identity) && !self.hosts(dst) {
            return Decision::Forwarded;
        }
        self.decide(dst_identity, self.identity(src), proto, port)
    }
}

/// The keys covering `addr` in a trie keyed like the ipcache, longest
/// prefix first.
fn covering_keys(addr: IpAddr) -> impl Iterator<Item = IpcacheEntryKey> {
    let full = u128::from_be_bytes(lookup_addr(addr));
    (0..=IPCACHE_FULL_PREFIX).rev().map(move |len| {
        let masked = if len == 0 {
            0
        } else {
            full & (u128::MAX << (128 - len))
        };
        IpcacheEntryKey {
            prefix_len: len,
            addr: Ipv6Addr::from(masked).octets(),
        }
    })
}

/// Map updates turning one [`PolicyMaps`] into another.
///
/// The kernel keeps two copies of the maps (epochs) and the programs read
/// only the active one. The agent applies a diff, op by op in the order of
/// [`MapsDiff::ops`], to the inactive copy, then flips the active epoch
/// with one write: each packet sees the old policy or the new one whole,
/// never a mix, so a change never drops a packet that both allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapsDiff {
    /// ipcache entries to insert or overwrite.
    pub ipcache_upserts: Vec<(IpcacheEntryKey, Identity)>,
    /// policy entries to insert or overwrite.
    pub policy_upserts: Vec<(PolicyEntryKey, PolicyEntryValue)>,
    /// identities to mark governed.
    pub governed_upserts: Vec<Identity>,
    /// identities no longer governed.
    pub governed_deletes: Vec<Identity>,
    /// policy entries to remove.
    pub policy_deletes: Vec<PolicyEntryKey>,
    /// ipcache entries to remove.
    pub ipcache_deletes: Vec<IpcacheEntryKey>,
    /// prefixes to mark hosted.
    pub hosted_upserts: Vec<IpcacheEntryKey>,
    /// prefixes no longer hosted.
    pub hosted_deletes: Vec<IpcacheEntryKey>,
}

impl MapsDiff {
    /// Whether there is nothing to do.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ipcache_upserts.is_empty()
            && self.policy_upserts.is_empty()
            && self.governed_upserts.is_empty()
            && self.governed_deletes.is_empty()
            && self.policy_deletes.is_empty()
            && self.ipcache_deletes.is_empty()
            && self.hosted_upserts.is_empty()
            && self.hosted_deletes.is_empty()
    }

    /// Number of map operations.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ipcache_upserts.len()
            + self.policy_upserts.len()
            + self.governed_upserts.len()
            + self.governed_deletes.len()
            + self.policy_deletes.len()
            + self.ipcache_deletes.len()
            + self.hosted_upserts.len()
            + self.hosted_deletes.len()
    }

    /// The single map operations of the diff: upserts, then deletes.
    #[must_use]
    pub fn ops(&self) -> Vec<MapOp> {
        let mut ops = Vec::with_capacity(self.len());
        ops.extend(
            self.policy_upserts
                .iter()
                .map(|&(k, v)| MapOp::PolicyUpsert(k, v)),
        );
        ops.extend(
            self.governed_upserts
                .iter()
                .map(|&id| MapOp::GovernedUpsert(id)),
        );
        ops.extend(
            self.ipcache_upserts
                .iter()
                .map(|&(k, id)| MapOp::IpcacheUpsert(k, id)),
        );
        ops.extend(self.hosted_upserts.iter().map(|&k| MapOp::HostedUpsert(k)));
        ops.extend(
            self.governed_deletes
                .iter()
                .map(|&id| MapOp::GovernedDelete(id)),
        );
        ops.extend(
            self.ipcache_deletes
                .iter()
                .map(|&k| MapOp::IpcacheDelete(k)),
        );
        ops.extend(self.hosted_deletes.iter().map(|&k| MapOp::HostedDelete(k)));
        ops.extend(self.policy_deletes.iter().map(|&k| MapOp::PolicyDelete(k)));
        ops
    }

    /// Applies the diff to an in-memory copy of the maps, op by op as the
    /// agent does to the kernel's.
    pub fn apply_to(&self, maps: &mut PolicyMaps) {
        for op in self.ops() {
            op.apply_to(maps);
        }
    }
}

/// One map operation of a [`MapsDiff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or overwrite a policy entry.
    PolicyUpsert(PolicyEntryKey, PolicyEntryValue),
    /// Mark an identity governed.
    GovernedUpsert(Identity),
    /// Insert or overwrite an ipcache entry.
    IpcacheUpsert(IpcacheEntryKey, Identity),
    /// Mark an identity no longer governed.
    GovernedDelete(Identity),
    /// Remove an ipcache entry.
    IpcacheDelete(IpcacheEntryKey),
    /// Remove a policy entry.
    PolicyDelete(PolicyEntryKey),
    /// Mark a prefix hosted.
    HostedUpsert(IpcacheEntryKey),
    /// Mark a prefix no longer hosted.
    HostedDelete(IpcacheEntryKey),
}

impl MapOp {
    /// Applies this one operation to an in-memory copy of the maps.
    pub fn apply_to(self, maps: &mut PolicyMaps) {
        match self {
            MapOp::PolicyUpsert(k, v) => {
                maps.policy.insert(k, v);
            }
            MapOp::GovernedUpsert(id) => {
                maps.governed.insert(id);
            }
            MapOp::IpcacheUpsert(k, id) => {
                maps.ipcache.insert(k, id);
            }
            MapOp::GovernedDelete(id) => {
                maps.governed.remove(&id);
            }
            MapOp::IpcacheDelete(k) => {
                maps.ipcache.remove(&k);
            }
            MapOp::PolicyDelete(k) => {
                maps.policy.remove(&k);
            }
            MapOp::HostedUpsert(k) => {
                maps.hosted.insert(k);
            }
            MapOp::HostedDelete(k) => {
                maps.hosted.remove(&k);
            }
        }
    }
}

impl fmt::Display for MapsDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ipcache +{}/-{}, policy +{}/-{}, governed +{}/-{}, hosted +{}/-{}",
            self.ipcache_upserts.len(),
            self.ipcache_deletes.len(),
            self.policy_upserts.len(),
            self.policy_deletes.len(),
            self.governed_upserts.len(),
            self.governed_deletes.len(),
            self.hosted_upserts.len(),
            self.hosted_deletes.len()
        )
    }
}

fn map_diff<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let deletes = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect();
    (upserts, deletes)
}

/// The map updates that turn `old` into `new`.
#[must_use]
pub fn diff(old: &PolicyMaps, new: &PolicyMaps) -> MapsDiff {
    let (ipcache_upserts, ipcache_deletes) = map_diff(&old.ipcache, &new.ipcache);
    let (policy_upserts, policy_deletes) = map_diff(&old.policy, &new.policy);
    MapsDiff {
        ipcache_upserts,
        policy_upserts,
        governed_upserts: new.governed.difference(&old.governed).copied().collect(),
        governed_deletes: old.governed.difference(&new.governed).copied().collect(),
        policy_deletes,
        ipcache_deletes,
        hosted_upserts: new.hosted.difference(&old.hosted).copied().collect(),
        hosted_deletes: old.hosted.difference(&new.hosted).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    fn tuple(
        dst: Identity,
        src: Identity,
        protocol: Protocol,
        first: u16,
        last: u16,
    ) -> PolicyTuple {
        PolicyTuple {
            dst,
            src,
            protocol,
            first,
            last,
            verdict: Verdict::Allow,
            rule: 0,
        }
    }

    #[test]
    fn blocks_of_known_ranges() {
        assert_eq!(
            port_blocks(0, u16::MAX),
            vec![PortBlock {
                start: 0,
                prefix_len: 0
            }]
        );
        assert_eq!(
            port_blocks(443, 443),
            vec![PortBlock {
                start: 443,
                prefix_len: 16
            }]
        );
        // 1..=65534 is the worst case: 15 blocks up, 15 down.
        assert_eq!(port_blocks(1, 65534).len(), MAX_BLOCKS_PER_RANGE);
        assert!(port_blocks(2, 1).is_empty());
    }

    #[test]
    fn lower_rejects_bad_tuples() {
        let overlap = PolicyInput {
            tuples: vec![
                tuple(1, 2, Protocol::Tcp, 10, 20),
                tuple(1, 2, Protocol::Tcp, 20, 30),
            ],
            ..PolicyInput::default()
        };
        assert!(matches!(
            lower(&overlap),
            Err(InvalidPolicyInput::Overlap(..))
        ));
        let apart = PolicyInput {
            tuples: vec![
                tuple(1, 2, Protocol::Tcp, 10, 20),
                tuple(1, 2, Protocol::Udp, 10, 20),
                tuple(1, 3, Protocol::Tcp, 10, 20),
            ],
            ..PolicyInput::default()
        };
        assert!(lower(&apart).is_ok());
        let icmp = PolicyInput {
            tuples: vec![tuple(1, 2, Protocol::Icmp, 0, 8)],
            ..PolicyInput::default()
        };
        assert!(matches!(
            lower(&icmp),
            Err(InvalidPolicyInput::IcmpPorts(..))
        ));
        let conflict = PolicyInput {
            ipcache: vec![
                ("100.64.0.0/12".parse().expect("net"), 1),
                ("100.65.0.0/12".parse().expect("net"), 2),
            ],
            ..PolicyInput::default()
        };
        assert!(matches!(
            lower(&conflict),
            Err(InvalidPolicyInput::IpcacheConflict { a: 1, b: 2, .. })
        ));
    }

    #[test]
    fn ipv4_is_mapped_and_longest_prefix_wins() {
        let maps = lower(&PolicyInput {
            ipcache: vec![
                ("100.64.0.0/10".parse().expect("net"), 5),
                ("100.64.1.7/32".parse().expect("net"), 6),
                ("fd00::/64".parse().expect("net"), 7),
            ],
            ..PolicyInput::default()
        })
        .expect("lower");
        let key = IpcacheEntryKey::from_net("100.64.0.0/10".parse().expect("net"));
        assert_eq!(key.prefix_len, 106);
        assert_eq!(&key.addr[10..], &[0xff, 0xff, 100, 64, 0, 0]);
        assert_eq!(maps.identity(Ipv4Addr::new(100, 64, 1, 7).into()), 6);
        assert_eq!(maps.identity(Ipv4Addr::new(100, 64, 1, 8).into()), 5);
        assert_eq!(maps.identity(Ipv4Addr::new(8, 8, 8, 8).into()), WORLD);
        assert_eq!(maps.identity("fd00::9".parse().expect("addr")), 7);
        assert_eq!(maps.identity("fd01::9".parse().expect("addr")), WORLD);
    }

    #[test]
    fn hosted_prefixes_decide_what_is_judged_here() {
        let input = PolicyInput {
            ipcache: vec![
                ("100.64.0.0/10".parse().expect("net"), 1),
                ("100.100.2.0/24".parse().expect("net"), 1),
                ("fd00::/8".parse().expect("net"), 1),
            ],
            governed: [1].into(),
            tuples: vec![tuple(1, 1, Protocol::Tcp, 22, 22)],
            // Host bits of a workload prefix are ignored.
            local: vec![
                "100.64.0.7/32".parse().expect("net"),
                "fd00::7/128".parse().expect("net"),
                "100.100.2.9/24".parse().expect("net"),
            ],
            ..PolicyInput::default()
        };
        let maps = lower(&input).expect("lower");
        let keys: Vec<_> = maps.hosted.iter().map(|k| k.prefix_len).collect();
        assert_eq!(keys, vec![120, 128, 128], "{:?}", maps.hosted);
        assert!(maps.hosted.contains(&IpcacheEntryKey::from_net(
            "100.100.2.0/24".parse().expect("net")
        )));
        let addr = |s: &str| -> IpAddr { s.parse().expect("addr") };
        for hosted in ["100.64.0.7", "fd00::7", "100.100.2.200"] {
            assert!(maps.hosts(addr(hosted)), "{hosted}");
        }
        for other in ["100.64.0.8", "fd00::8", "100.100.3.1", "::ffff:100.64.0.6"] {
            assert!(!maps.hosts(addr(other)), "{other}");
        }
        let allow = Decision::Rule {
            verdict: Verdict::Allow,
            rule: 0,
        };
        let peer = addr("100.64.0.9");
        // Same identity, same port: judged where hosted, forwarded elsewhere.
        assert_eq!(maps.decide_packet(peer, addr("100.64.0.7"), 6, 22), allow);
        assert_eq!(
            maps.decide_packet(peer, addr("100.64.0.7"), 6, 23),
            Decision::DefaultDeny
        );
        assert_eq!(
            maps.decide_packet(peer, addr("100.64.0.8"), 6, 23),
            Decision::Forwarded
        );
        assert_eq!(
            maps.decide_packet(addr("fd00::9"), addr("fd00::8"), 17, 53),
            Decision::Forwarded
        );
        assert_eq!(
            maps.decide_packet(peer, addr("100.100.2.1"), 6, 23),
            Decision::DefaultDeny
        );
        // An ungoverned destination passes whether hosted or not.
        assert_eq!(
            maps.decide_packet(peer, addr("198.18.0.1"), 6, 23),
            Decision::NotGoverned
        );
    }

    #[test]
    fn no_hosted_prefixes_means_every_address_is_hosted() {
        // A policy computed before hosted prefixes keeps enforcing
        // everything it governs.
        let maps = lower(&PolicyInput {
            ipcache: vec![("100.64.0.0/10".parse().expect("net"), 1)],
            governed: [1].into(),
            ..PolicyInput::default()
        })
        .expect("lower");
        assert_eq!(maps.hosted.len(), 1);
        for a in ["100.64.0.1", "100.127.255.254", "fd00::1", "198.18.0.1"] {
            assert!(maps.hosts(a.parse().expect("addr")), "{a}");
        }
        assert_eq!(
            maps.decide_packet(
                "100.64.0.2".parse().expect("addr"),
                "100.64.0.1".parse().expect("addr"),
                6,
                22
            ),
            Decision::DefaultDeny
        );
        assert!(PolicyMaps::default().hosted.is_empty());
    }

    #[test]
    fn hosted_prefix_changes_are_diffed() {
        let with = |local: &[&str]| {
            lower(&PolicyInput {
                local: local.iter().map(|s| s.parse().expect("net")).collect(),
                ..PolicyInput::default()
            })
            .expect("lower")
        };
        let old = with(&["100.64.0.7/32", "fd00::7/128"]);
        let new = with(&["100.64.0.7/32", "fd00::7/128", "100.100.2.0/24"]);
        let d = diff(&old, &new);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d.ops(),
            vec![MapOp::HostedUpsert(IpcacheEntryKey::from_net(
                "100.100.2.0/24".parse().expect("net")
            ))]
        );
        assert!(d.to_string().ends_with("hosted +1/-0"), "{d}");
        let back = diff(&new, &old);
        assert_eq!(back.hosted_deletes.len(), 1);
        let mut applied = new.clone();
        back.apply_to(&mut applied);
        assert_eq!(applied, old);
    }

    /// Naive evaluator: linear scans over the input.
    fn naive(input: &PolicyInput, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Decision {
        let id = |addr: IpAddr| {
            input
                .ipcache
                .iter()
                .filter(|(net, _)| match (net, addr) {
                    (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
                    (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
                    _ => false,
                })
                .max_by_key(|(net, _)| net.prefix_len())
                .map_or(WORLD, |(_, id)| *id)
        };
        let (d, s) = (id(dst), id(src));
        if !input.governed.contains(&d) {
            return Decision::NotGoverned;
        }
        let contains = |net: &IpNet, addr: IpAddr| match (net, addr) {
            (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
            (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
            _ => false,
        };
        if !input.local.is_empty() && !input.local.iter().any(|n| contains(n, dst)) {
            return Decision::Forwarded;
        }
        input
            .tuples
            .iter()
            .find(|t| {
                t.dst == d
                    && t.src == s
                    && t.protocol.number() == proto
                    && (t.first..=t.last).contains(&port)
            })
            .map_or(Decision::DefaultDeny, |t| Decision::Rule {
                verdict: t.verdict,
                rule: t.rule,
            })
    }

    fn arb_protocol() -> impl Strategy<Value = Protocol> {
        prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Icmp)
        ]
    }

    fn arb_port() -> impl Strategy<Value = u16> {
        prop_oneof![
            any::<u16>(),
            0u16..64,
            (u16::MAX - 64)..=u16::MAX,
            1000u16..1100
        ]
    }

    prop_compose! {
        fn arb_tuple()(
            dst in 0u32..4, src in 0u32..4, protocol in arb_protocol(),
            a in arb_port(), b in arb_port(), allow in any::<bool>(), rule in 0u32..100,
        ) -> PolicyTuple {
            let (first, last) = if protocol == Protocol::Icmp { (0, 0) } else { (a.min(b), a.max(b)) };
            let verdict = if allow { Verdict::Allow } else { Verdict::Deny };
            PolicyTuple { dst, src, protocol, first, last, verdict, rule }
        }
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u8>(), any::<u8>(), 16u8..=32).prop_map(|(c, d, len)| {
                IpNet::new(Ipv4Addr::new(100, 64, c & 0x0f, d).into(), len).expect("len <= 32")
            }),
            (any::<u8>(), 112u8..=128).prop_map(|(x, len)| {
                IpNet::new(
                    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(x)).into(),
                    len,
                )
                .expect("len <= 128")
            }),
        ]
    }

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (any::<u8>(), any::<u8>()).prop_map(|(c, d)| IpAddr::from(Ipv4Addr::new(
                100,
                64,
                c & 0x0f,
                d
            ))),
            any::<u8>().prop_map(|x| IpAddr::from(Ipv6Addr::new(
                0xfd00,
                0,
                0,
                0,
                0,
                0,
                0,
                u16::from(x)
            ))),
            Just(IpAddr::from(Ipv4Addr::new(192, 0, 2, 1))),
        ]
    }

    prop_compose! {
        /// A valid input: overlapping tuples and conflicting prefixes are
        /// dropped greedily.
        fn arb_input()(
            nets in proptest::collection::vec((arb_net(), 0u32..4), 0..12),
            governed in proptest::collection::btree_set(0u32..4, 0..4),
            tuples in proptest::collection::vec(arb_tuple(), 0..24),
            local in proptest::collection::vec(arb_net(), 0..4),
        ) -> PolicyInput {
            let mut kept: Vec<PolicyTuple> = Vec::new();
            for t in tuples {
                let clash = kept.iter().any(|k| {
                    (k.dst, k.src, k.protocol) == (t.dst, t.src, t.protocol)
                        && k.first <= t.last && t.first <= k.last
                });
                if !clash {
                    kept.push(t);
                }
            }
            let mut ipcache: Vec<(IpNet, Identity)> = Vec::new();
            for (net, id) in nets {
                if !ipcache.iter().any(|(n, _)| n.trunc() == net.trunc()) {
                    ipcache.push((net, id));
                }
            }
            PolicyInput { ipcache, governed, tuples: kept, rules: vec![], local }
        }
    }

    proptest! {
        #[test]
        fn blocks_cover_the_range_exactly_without_overlap(a in any::<u16>(), b in any::<u16>()) {
            let (first, last) = (a.min(b), a.max(b));
            let blocks = port_blocks(first, last);
            prop_assert!(blocks.len() <= MAX_BLOCKS_PER_RANGE);
            prop_assert_eq!(blocks.first().map(|b| b.start), Some(first));
            prop_assert_eq!(blocks.last().map(|b| b.end()), Some(last));
            for pair in blocks.windows(2) {
                prop_assert_eq!(u32::from(pair[0].end()) + 1, u32::from(pair[1].start));
            }
            for block in &blocks {
                let size = 1u32 << (16 - block.prefix_len);
                prop_assert_eq!(u32::from(block.start) % size, 0, "{:?} unaligned", block);
                prop_assert!(block.contains(block.start) && block.contains(block.end()));
            }
        }

        #[test]
        fn lpm_lookup_of_lowered_entries_equals_naive_range_lookup(
            input in arb_input(),
            packets in proptest::collection::vec(
                (arb_addr(), arb_addr(), arb_protocol(), arb_port()), 1..48),
        ) {
            let maps = lower(&input).expect("valid input");
            // Probe the range edges too: first, last, last + 1, first - 1.
            let mut probes: Vec<(IpAddr, IpAddr, u8, u16)> = packets
                .iter()
                .map(|&(s, d, p, port)| (s, d, p.number(), port))
                .collect();
            if let Some(&(s, d, _, _)) = packets.first() {
                for t in &input.tuples {
                    for port in [t.first, t.last, t.last.wrapping_add(1), t.first.wrapping_sub(1)] {
                        probes.push((s, d, t.protocol.number(), port));
                    }
                }
            }
            for (src, dst, proto, port) in probes {
                prop_assert_eq!(
                    maps.decide_packet(src, dst, proto, port),
                    naive(&input, src, dst, proto, port),
                    "{} -> {} proto {} port {}", src, dst, proto, port
                );
            }
        }

        #[test]
        fn every_tuple_port_hits_its_own_tuple(input in arb_input()) {
            let maps = lower(&input).expect("valid input");
            for t in &input.tuples {
                let mid = u16::try_from((u32::from(t.first) + u32::from(t.last)) / 2)
                    .expect("the midpoint of two u16s is a u16");
                for port in [t.first, t.last, mid] {
                    let got = maps.decide(t.dst, t.src, t.protocol.number(), port);
                    let want = if input.governed.contains(&t.dst) {
                        Decision::Rule { verdict: t.verdict, rule: t.rule }
                    } else {
                        Decision::NotGoverned
                    };
                    prop_assert_eq!(got, want);
                }
            }
        }

        #[test]
        fn diff_applied_to_old_yields_new(old in arb_input(), new in arb_input()) {
            let (old, new) = (lower(&old).expect("valid"), lower(&new).expect("valid"));
            let d = diff(&old, &new);
            let mut applied = old.clone();
            d.apply_to(&mut applied);
            prop_assert_eq!(&applied, &new);
            prop_assert!(diff(&new, &new).is_empty());
        }
    }
}
