//! The peer table: one boringtun `Tunn` per peer, cryptokey routing
//! (allowed IPs → peer), and the config changes the control API and the
//! UAPI make to it. No I/O here; the event loop drives it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use weft_dataplane_core::{Key, PeerConfig};

use super::PeerStats;
use super::sources::SourceRanges;
use super::uapi::SetRequest;

/// Handshake initiations per second we answer before asking for cookies
/// (boringtun's device uses the same figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Peer slots are 24-bit: boringtun puts `slot << 8` in the session index.
const SLOT_MASK: u32 = 0x00ff_ffff;

/// A routing table from prefixes to values, longest prefix first.
///
/// Per address family, one hash table per prefix length in use, longest
/// first: a lookup costs one probe per distinct prefix length (a few in
/// practice: /32, /128 and the workload prefixes' lengths), whatever the
/// number of prefixes, and allocates nothing.
#[derive(Debug, Clone)]
pub(crate) struct AllowedIps<T> {
    v4: Levels<u32, T>,
    v6: Levels<u128, T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Levels::default(),
            v6: Levels::default(),
        }
    }
}

impl<T: Copy + PartialEq> AllowedIps<T> {
    /// Maps `net` (truncated to its network address) to `value`; returns the
    /// previous owner of exactly that prefix.
    pub(crate) fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => self.v4.insert(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// Removes `net` if it maps to `value`.
    pub(crate) fn remove(&mut self, net: IpNet, value: T) {
        match net {
            IpNet::V4(n) => self.v4.remove(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.remove(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// Removes every prefix that maps to `value`.
    pub(crate) fn remove_value(&mut self, value: T) {
        self.v4.remove_value(value);
        self.v6.remove_value(value);
    }

    /// Longest-prefix match.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Option<T> {
        match ip {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// WireGuard's anti-spoofing rule: a packet decrypted from `value` may
    /// only carry a source address that routes back to `value`.
    pub(crate) fn source_allowed(&self, src: IpAddr, value: T) -> bool {
        self.lookup(src) == Some(value)
    }
}

/// Address bits of one family.
trait Bits: Copy + Eq + Hash {
    const WIDTH: u8;
    /// The first `len` bits, the others zero.
    fn mask(self, len: u8) -> Self;
}

impl Bits for u32 {
    const WIDTH: u8 = 32;
    fn mask(self, len: u8) -> Self {
        // `len` is a valid prefix length; a shift by the full width is 0.
        Self::MAX
            .checked_shl(u32::from(Self::WIDTH.saturating_sub(len)))
            .map_or(0, |m| self & m)
    }
}

impl Bits for u128 {
    const WIDTH: u8 = 128;
    fn mask(self, len: u8) -> Self {
        // `len` is a valid prefix length; a shift by the full width is 0.
        Self::MAX
            .checked_shl(u32::from(Self::WIDTH.saturating_sub(len)))
            .map_or(0, |m| self & m)
    }
}

/// The prefixes of one family: (prefix length, network bits → value),
/// longest length first; no empty table.
#[derive(Debug, Clone)]
struct Levels<A, T> {
    levels: Vec<(u8, HashMap<A, T, IntHash>)>,
}

impl<A, T> Default for Levels<A, T> {
    fn default() -> Self {
        Levels { levels: Vec::new() }
    }
}

impl<A: Bits, T: Copy + PartialEq> Levels<A, T> {
    fn insert(&mut self, addr: A, len: u8, value: T) -> Option<T> {
        let i = match self.levels.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.levels[i].0 == len => i,
            Some(i) => {
                self.levels.insert(i, (len, HashMap::default()));
                i
            }
            None => {
                self.levels.push((len, HashMap::default()));
                self.levels.len() - 1
            }
        };
        self.levels[i].1.insert(addr.mask(len), value)
    }

    fn remove(&mut self, addr: A, len: u8, value: T) {
        let Some(i) = self.levels.iter().position(|(l, _)| *l == len) else {
            return;
        };
        let map = &mut self.levels[i].1;
        if map.get(&addr.mask(len)) == Some(&value) {
            map.remove(&addr.mask(len));
        }
        if map.is_empty() {
            self.levels.remove(i);
        }
    }

    fn remove_value(&mut self, value: T) {
        for (_, map) in &mut self.levels {
            map.retain(|_, v| *v != value);
        }
        self.levels.retain(|(_, map)| !map.is_empty());
    }

    fn lookup(&self, addr: A) -> Option<T> {
        self.levels
            .iter()
            .find_map(|(len, map)| map.get(&addr.mask(*len)).copied())
    }
}

/// Hashing for address bits: a multiply-xorshift mix (the keys come from
/// the configuration, not from the network, so no keyed hash is needed).
#[derive(Debug, Clone, Copy, Default)]
struct IntHash;

impl BuildHasher for IntHash {
    type Hasher = IntHasher;
    fn build_hasher(&self) -> IntHasher {
        IntHasher(0)
    }
}

#[derive(Debug)]
struct IntHasher(u64);

impl IntHasher {
    fn mix(&mut self, v: u64) {
        // murmur3's 64-bit finaliser over the running state.
        let mut h = self.0.rotate_left(31) ^ v;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        self.0 = h;
    }
}

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }
    fn write_u128(&mut self, n: u128) {
        self.mix(n as u64);
        self.mix((n >> 64) as u64);
    }
}

/// Our static key pair and the rate limiter keyed on it.
pub(crate) struct Identity {
    pub(crate) private_key: Key,
    pub(crate) secret: StaticSecret,
    pub(crate) public: PublicKey,
    pub(crate) rate_limiter: Arc<RateLimiter>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public", &Key(self.public.to_bytes()))
            .finish_non_exhaustive()
    }
}

impl Identity {
    fn new(private_key: Key) -> Self {
        let secret = StaticSecret::from(private_key.0);
        let public = PublicKey::from(&secret);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Identity {
            private_key,
            secret,
            public,
            rate_limiter,
        }
    }
}

/// One peer: its config, its noise state and its counters.
pub(crate) struct Peer {
    pub(crate) name: String,
    pub(crate) public_key: Key,
    /// Current endpoint: configured, or learnt from authenticated packets.
    pub(crate) endpoint: Option<SocketAddr>,
    /// The endpoint last configured (`upsert` or UAPI), so that a config
    /// repeating it does not undo roaming.
    configured_endpoint: Option<SocketAddr>,
    /// As configured (truncated, deduplicated), in insertion order.
    pub(crate) allowed_ips: Vec<IpNet>,
    /// Sources accepted from this peer besides its allowed IPs (relayed
    /// traffic); not routed to it and not shown by `wg show`.
    accept_sources: SourceRanges,
    /// Peers interchangeable with this one (a site's other gateways, from
    /// the config's fallback list): flows to `shared` destinations are
    /// spread over this peer and them.
    equivalents: Vec<Key>,
    /// The routed prefixes whose flows are spread (`shared_routes`).
    shared: SourceRanges,
    pub(crate) keepalive: Option<u16>,
    pub(crate) preshared_key: Option<Key>,
    /// `None` while we have no private key.
    pub(crate) tunn: Option<Box<Tunn>>,
    /// UDP payload bytes sent to / authenticated from this peer.
    pub(crate) tx_bytes: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) last_handshake: Option<SystemTime>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("keepalive", &self.keepalive)
            .field("has_session_state", &self.tunn.is_some())
            .finish_non_exhaustive()
    }
}

impl Peer {
    fn new(public_key: Key) -> Self {
        Peer {
            name: String::new(),
            public_key,
            endpoint: None,
            configured_endpoint: None,
            allowed_ips: Vec::new(),
            accept_sources: SourceRanges::default(),
            equivalents: Vec::new(),
            shared: SourceRanges::default(),
            keepalive: None,
            preshared_key: None,
            tunn: None,
            tx_bytes: 0,
            rx_bytes: 0,
            last_handshake: None,
        }
    }

    /// Whether a packet decrypted from this peer (in `slot`) may carry
    /// the source `src`: it routes back to the peer (WireGuard's rule), or
    /// the peer relays it (accepted sources). No allocation.
    pub(crate) fn source_allowed(&self, routes: &AllowedIps<u32>, slot: u32, src: IpAddr) -> bool {
        routes.source_allowed(src, slot) || self.accept_sources.contains(src)
    }

    /// Whether the peer has a session (a completed handshake) to send on.
    pub(crate) fn has_session(&self) -> bool {
        self.tunn
            .as_ref()
            .is_some_and(|t| t.time_since_last_handshake().is_some())
    }

    /// Records the time of the current session's handshake, if any, so it
    /// survives the session (and the `Tunn`).
    pub(crate) fn refresh_last_handshake(&mut self) {
        if let Some(ago) = self
            .tunn
            .as_ref()
            .and_then(|t| t.time_since_last_handshake())
        {
            self.last_handshake = SystemTime::now().checked_sub(ago);
        }
    }

    /// Replaces the noise state (new key, keepalive or PSK): sessions are lost.
    fn rebuild_tunn(&mut self, identity: Option<&Identity>, slot: u32) {
        self.refresh_last_handshake();
        self.tunn = identity.map(|id| {
            Box::new(Tunn::new(
                id.secret.clone(),
                PublicKey::from(self.public_key.0),
                self.preshared_key.map(|k| k.0),
                self.keepalive,
                slot,
                Some(Arc::clone(&id.rate_limiter)),
            ))
        });
    }

    fn stats(&self) -> PeerStats {
        PeerStats {
            name: self.name.clone(),
            public_key: self.public_key,
            endpoint: self.endpoint,
            allowed_ips: self.allowed_ips.clone(),
            persistent_keepalive: self.keepalive,
            last_handshake: self.last_handshake,
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
        }
    }
}

/// All peers of the tunnel, by slot (the session index) and by key.
#[derive(Debug)]
pub(crate) struct Peers {
    identity: Option<Identity>,
    by_slot: HashMap<u32, Peer>,
    by_key: BTreeMap<Key, u32>,
    routes: AllowedIps<u32>,
    next_slot: u32,
}

impl Peers {
    /// An empty table; `first_slot` should be random so that a restarted
    /// tunnel does not reuse the session indices of the previous one.
    pub(crate) fn new(private_key: Option<Key>, first_slot: u32) -> Self {
        Peers {
            identity: private_key.filter(|k| !k.is_zero()).map(Identity::new),
            by_slot: HashMap::new(),
            by_key: BTreeMap::new(),
            routes: AllowedIps::default(),
            next_slot: first_slot & SLOT_MASK,
        }
    }

    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Peer slot for a public key.
    pub(crate) fn slot_of(&self, key: &Key) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// Cryptokey routing: which peer an outgoing packet to `dst` goes to.
    pub(crate) fn route(&self, dst: IpAddr) -> Option<u32> {
        self.routes.lookup(dst)
    }

    /// The peer that carries `packet` to `dst`, routed to `slot`: `slot`
    /// itself, or, for a destination among the peer's shared routes and a
    /// peer with interchangeable peers (a site's gateways), the one the
    /// packet's flow hashes to, among those that have an endpoint or a
    /// session. No allocation.
    pub(crate) fn spread(&self, slot: u32, dst: IpAddr, packet: &[u8]) -> u32 {
        let Some(p) = self.by_slot.get(&slot) else {
            return slot;
        };
        if p.equivalents.is_empty() || !p.shared.contains(dst) {
            return slot;
        }
        let Some(hash) = weft_dataplane_core::flow::flow_hash(packet) else {
            return slot;
        };
        let i = weft_dataplane_core::flow::pick(hash, 1 + p.equivalents.len());
        let Some(other) = i.checked_sub(1).and_then(|j| p.equivalents.get(j)) else {
            return slot;
        };
        match self.by_key.get(other) {
            Some(s)
                if self.by_slot.get(s).is_some_and(|q| {
                    q.tunn.is_some() && (q.endpoint.is_some() || q.has_session())
                }) =>
            {
                *s
            }
            _ => slot,
        }
    }

    /// A peer and the routing table (for the source check), borrowed apart.
    pub(crate) fn get_mut(&mut self, slot: u32) -> Option<(&mut Peer, &AllowedIps<u32>)> {
        self.by_slot.get_mut(&slot).map(|p| (p, &self.routes))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.by_slot.values_mut()
    }

    /// Stats of all peers, ordered by public key.
    pub(crate) fn stats(&mut self) -> Vec<(PeerStats, Option<Key>)> {
        let mut out = Vec::with_capacity(self.by_key.len());
        for slot in self.by_key.values() {
            if let Some(p) = self.by_slot.get_mut(slot) {
                p.refresh_last_handshake();
                out.push((p.stats(), p.preshared_key));
            }
        }
        out
    }

    /// Every peer's slot, ordered by public key.
    pub(crate) fn slots(&self) -> Vec<u32> {
        self.by_key.values().copied().collect()
    }

    /// Sets, changes or (with `None` or the zero key) removes our private
    /// key. All sessions are dropped unless the key is unchanged.
    pub(crate) fn set_private_key(&mut self, key: Option<Key>) {
        let key = key.filter(|k| !k.is_zero());
        if self.identity.as_ref().map(|i| i.private_key) == key {
            return;
        }
        self.identity = key.map(Identity::new);
        for (slot, peer) in &mut self.by_slot {
            peer.rebuild_tunn(self.identity.as_ref(), *slot);
        }
    }

    /// Removes a peer and its sessions; unknown keys are fine.
    pub(crate) fn remove(&mut self, key: &Key) {
        if let Some(slot) = self.by_key.remove(key) {
            self.by_slot.remove(&slot);
            self.routes.remove_value(slot);
        }
    }

    fn remove_all(&mut self) {
        self.by_slot.clear();
        self.by_key.clear();
        self.routes = AllowedIps::default();
    }

    /// Slot of `key`, creating the peer (without sessions yet) if unknown.
    fn slot_or_insert(&mut self, key: Key) -> u32 {
        if let Some(slot) = self.by_key.get(&key) {
            return *slot;
        }
        let slot = loop {
            let s = self.next_slot;
            self.next_slot = (self.next_slot + 1) & SLOT_MASK;
            if !self.by_slot.contains_key(&s) {
                break s;
            }
        };
        let mut peer = Peer::new(key);
        peer.rebuild_tunn(self.identity.as_ref(), slot);
        self.by_slot.insert(slot, peer);
        self.by_key.insert(key, slot);
        slot
    }

    /// Routes `nets` to `slot`, taking them away from any other peer (a
    /// prefix belongs to one peer, as in WireGuard). Linear in the number
    /// of prefixes, however many move between peers.
    fn add_allowed_ips(&mut self, slot: u32, nets: &[IpNet]) {
        let mut added = Vec::new();
        let mut taken: HashMap<u32, HashSet<IpNet>> = HashMap::new();
        for net in nets {
            let net = net.trunc();
            match self.routes.insert(net, slot) {
                Some(old) if old == slot => {} // already ours
                Some(old) => {
                    taken.entry(old).or_default().insert(net);
                    added.push(net);
                }
                None => added.push(net),
            }
        }
        for (old, nets) in taken {
            if let Some(p) = self.by_slot.get_mut(&old) {
                p.allowed_ips.retain(|n| !nets.contains(n));
            }
        }
        if let Some(p) = self.by_slot.get_mut(&slot) {
            p.allowed_ips.extend(added);
        }
    }

    fn clear_allowed_ips(&mut self, slot: u32) {
        if let Some(p) = self.by_slot.get_mut(&slot) {
            for net in p.allowed_ips.drain(..) {
                self.routes.remove(net, slot);
            }
        }
    }

    /// Changes keepalive and PSK of a peer; rebuilds its `Tunn` only when
    /// one of them actually changed (boringtun has no setter for them).
    /// Returns whether the keepalive went from off to on.
    fn set_keepalive_psk(
        &mut self,
        slot: u32,
        keepalive: Option<Option<u16>>,
        psk: Option<Option<Key>>,
    ) -> bool {
        let Some(p) = self.by_slot.get_mut(&slot) else {
            return false;
        };
        let was_on = p.keepalive.is_some();
        let mut changed = false;
        if let Some(k) = keepalive.map(|k| k.filter(|s| *s != 0))
            && p.keepalive != k
        {
            p.keepalive = k;
            changed = true;
        }
        if let Some(k) = psk.map(|k| k.filter(|s| !s.is_zero()))
            && p.preshared_key != k
        {
            p.preshared_key = k;
            changed = true;
        }
        if changed {
            p.rebuild_tunn(self.identity.as_ref(), slot);
        }
        !was_on && p.keepalive.is_some()
    }

    /// Adds a peer or updates it in place (its sessions survive unless the
    /// keepalive changes). The configured endpoint replaces the current
    /// one only when it differs from the one configured before (or the
    /// peer is new) and the peer has no session: otherwise the endpoint
    /// learnt from the peer's authenticated packets stays, since a peer
    /// behind NAT is reachable only there. An `endpoint` of `None` keeps
    /// the current one.
    ///
    /// Returns whether to start a handshake now: the peer is new, its
    /// persistent keepalive was turned on (its sessions are gone), or it
    /// has no session and a new endpoint to try (for two nodes behind NATs,
    /// both ends trying the learnt mappings at once opens both).
    pub(crate) fn upsert(&mut self, cfg: PeerConfig) -> bool {
        let new = !self.by_key.contains_key(&cfg.public_key);
        let slot = self.slot_or_insert(cfg.public_key);
        let mut moved = false;
        if let Some(p) = self.by_slot.get_mut(&slot) {
            p.name = cfg.name;
            let configured = cfg.endpoint.map(normalise);
            // A working session proves the current endpoint: a changed
            // configured one (say, a NAT mapping the controller learnt
            // from other peers) is only a hint until the session ends.
            if configured.is_some()
                && configured != p.configured_endpoint
                && (p.endpoint.is_none() || !p.has_session())
            {
                moved = p.endpoint != configured;
                p.endpoint = configured;
            }
            p.configured_endpoint = configured;
            p.accept_sources = SourceRanges::new(&cfg.accept_sources);
            p.equivalents = cfg
                .fallback
                .iter()
                .copied()
                .filter(|k| *k != cfg.public_key)
                .collect();
            p.shared = SourceRanges::new(&cfg.shared_routes);
        }
        let keepalive_on = self.set_keepalive_psk(slot, Some(cfg.persistent_keepalive), None);
        self.clear_allowed_ips(slot);
        self.add_allowed_ips(slot, &cfg.allowed_ips);
        self.add_allowed_ips(slot, &cfg.shared_routes);
        new || keepalive_on || moved
    }

    /// Applies a validated UAPI `set` (everything but the listen port, which
    /// the event loop owns). Returns the slots of the peers whose
    /// persistent keepalive it turned on (new peers included): like
    /// WireGuard, the caller starts a handshake with them at once. (Slots
    /// of peers the request removed again may be among them.)
    pub(crate) fn apply_set(&mut self, req: &SetRequest) -> Vec<u32> {
        let mut keepalive_on = Vec::new();
        if let Some(key) = req.private_key {
            self.set_private_key(key);
        }
        if req.replace_peers {
            self.remove_all();
        }
        for ps in &req.peers {
            if ps.remove {
                self.remove(&ps.public_key);
                continue;
            }
            if ps.update_only && !self.by_key.contains_key(&ps.public_key) {
                continue;
            }
            let slot = self.slot_or_insert(ps.public_key);
            if let Some(ep) = ps.endpoint
                && let Some(p) = self.by_slot.get_mut(&slot)
            {
                p.endpoint = Some(normalise(ep));
                p.configured_endpoint = p.endpoint;
            }
            if self.set_keepalive_psk(slot, ps.persistent_keepalive.map(Some), ps.preshared_key)
                && !keepalive_on.contains(&slot)
            {
                keepalive_on.push(slot);
            }
            if ps.replace_allowed_ips {
                self.clear_allowed_ips(slot);
            }
            self.add_allowed_ips(slot, &ps.allowed_ips);
        }
        keepalive_on
    }
}

/// IPv4-mapped IPv6 addresses (from our dual-stack socket) as plain IPv4.
pub(crate) fn normalise(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use weft_dataplane_core::uapi::PeerSet;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn longest_prefix_wins_whatever_the_insertion_order() {
        let mut t = AllowedIps::default();
        t.insert(net("100.64.0.0/10"), 1);
        t.insert(net("100.64.3.0/24"), 2);
        t.insert(net("0.0.0.0/0"), 3);
        t.insert(net("100.64.3.7/32"), 4);
        t.insert(net("fd00::/8"), 5);
        t.insert(net("fd00::1/128"), 6);
        assert_eq!(t.lookup(ip("100.64.3.7")), Some(4));
        assert_eq!(t.lookup(ip("100.64.3.8")), Some(2));
        assert_eq!(t.lookup(ip("100.65.0.1")), Some(1));
        assert_eq!(t.lookup(ip("198.18.0.1")), Some(3));
        assert_eq!(t.lookup(ip("fd00::1")), Some(6));
        assert_eq!(t.lookup(ip("fd00::2")), Some(5));
        assert_eq!(t.lookup(ip("fe80::1")), None);
    }

    #[test]
    fn prefixes_are_truncated_and_replaced() {
        let mut t = AllowedIps::default();
        assert_eq!(t.insert(net("100.64.3.9/24"), 1), None);
        assert_eq!(t.insert(net("100.64.3.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("100.64.3.200")), Some(2));
        t.remove_value(2);
        assert_eq!(t.lookup(ip("100.64.3.200")), None);
    }

    #[test]
    fn source_check_rejects_spoofed_and_more_specific_sources() {
        let mut t = AllowedIps::default();
        t.insert(net("100.64.0.0/10"), 1);
        t.insert(net("100.64.0.2/32"), 2);
        assert!(t.source_allowed(ip("100.64.0.9"), 1));
        // Inside peer 1's prefix, but routed to peer 2: peer 1 may not use it.
        assert!(!t.source_allowed(ip("100.64.0.2"), 1));
        assert!(t.source_allowed(ip("100.64.0.2"), 2));
        assert!(!t.source_allowed(ip("198.18.0.1"), 1));
        assert!(!t.source_allowed(ip("fd00::1"), 1));
    }

    fn cfg(seed: u8, ips: &[&str], keepalive: Option<u16>) -> PeerConfig {
        PeerConfig {
            name: format!("p{seed}"),
            public_key: Key([seed; 32]),
            endpoint: None,
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            persistent_keepalive: keepalive,
            accept_sources: Vec::new(),
            fallback: Vec::new(),
            shared_routes: Vec::new(),
        }
    }

    fn endpoint(s: &str) -> SocketAddr {
        s.parse().expect("test endpoint")
    }

    #[test]
    fn relayed_sources_pass_only_from_the_peer_that_relays_them() {
        let mut peers = Peers::new(Some(Key([7; 32])), 5);
        // Peer 1, a gateway, relays the other site's 100.64.8.0/24 and
        // fd00:8::/64; peer 2 is a plain member of our site.
        let mut gateway = cfg(1, &["100.64.0.1/32", "fd00::1/128"], None);
        gateway.accept_sources = vec![net("100.64.8.0/24"), net("fd00:8::/64")];
        peers.upsert(gateway);
        peers.upsert(cfg(2, &["100.64.0.2/32", "100.64.9.0/24"], None));
        let g = peers.slot_of(&Key([1; 32])).expect("gateway");
        let m = peers.slot_of(&Key([2; 32])).expect("member");
        let allowed = |peers: &mut Peers, slot: u32, src: &str| {
            let (peer, routes) = peers.get_mut(slot).expect("peer");
            peer.source_allowed(routes, slot, ip(src))
        };
        // Relayed sources from the gateway pass.
        assert!(allowed(&mut peers, g, "100.64.8.77"));
        assert!(allowed(&mut peers, g, "fd00:8::9"));
        // Its own address too, as before.
        assert!(allowed(&mut peers, g, "100.64.0.1"));
        // The same sources from another peer are refused.
        assert!(!allowed(&mut peers, m, "100.64.8.77"));
        assert!(!allowed(&mut peers, m, "fd00:8::9"));
        // Spoofed sources are still dropped, from either.
        for src in ["100.64.7.1", "100.64.0.3", "fd00:9::1", "198.18.0.1"] {
            assert!(!allowed(&mut peers, g, src), "{src} from the gateway");
            assert!(!allowed(&mut peers, m, src), "{src} from the member");
        }
        // Accepted sources are not routed to the gateway.
        assert_eq!(peers.route(ip("100.64.8.77")), None);
        // `wg show` shows allowed IPs (routes) only.
        let stats = peers.stats();
        let shown = stats
            .iter()
            .find(|(s, _)| s.public_key == Key([1; 32]))
            .expect("gateway stats");
        assert_eq!(
            shown.0.allowed_ips,
            vec![net("100.64.0.1/32"), net("fd00::1/128")]
        );
        // An update without them withdraws them.
        peers.upsert(cfg(1, &["100.64.0.1/32"], None));
        assert!(!allowed(&mut peers, g, "100.64.8.77"));
    }

    #[test]
    fn a_repeated_config_keeps_the_learnt_endpoint() {
        let mut peers = Peers::new(Some(Key([7; 32])), 5);
        let configured = |ep: Option<&str>| PeerConfig {
            endpoint: ep.map(endpoint),
            ..cfg(1, &["100.64.0.1/32"], None)
        };
        let current = |peers: &mut Peers| {
            let slot = peers.slot_of(&Key([1; 32])).expect("peer");
            peers.get_mut(slot).expect("peer").0.endpoint
        };
        let roam = |peers: &mut Peers, to: &str| {
            let slot = peers.slot_of(&Key([1; 32])).expect("peer");
            // What the event loop does on an authenticated packet.
            peers.get_mut(slot).expect("peer").0.endpoint = Some(endpoint(to));
        };
        peers.upsert(configured(Some("198.18.0.2:51820")));
        assert_eq!(current(&mut peers), Some(endpoint("198.18.0.2:51820")));
        // The peer's packets come from its NAT mapping.
        roam(&mut peers, "198.18.5.5:40000");
        peers.upsert(configured(Some("198.18.0.2:51820")));
        assert_eq!(current(&mut peers), Some(endpoint("198.18.5.5:40000")));
        // No endpoint configured: the learnt one stays too.
        peers.upsert(configured(None));
        assert_eq!(current(&mut peers), Some(endpoint("198.18.5.5:40000")));
        // A configured endpoint that changed (here: from none) is applied.
        peers.upsert(configured(Some("198.18.0.2:51820")));
        assert_eq!(current(&mut peers), Some(endpoint("198.18.0.2:51820")));
        roam(&mut peers, "198.18.5.5:40000");
        peers.upsert(configured(Some("198.18.0.3:51820")));
        assert_eq!(current(&mut peers), Some(endpoint("198.18.0.3:51820")));
        // An explicit UAPI `set` applies its endpoint whatever was learnt.
        roam(&mut peers, "198.18.5.5:40000");
        peers.apply_set(&SetRequest {
            peers: vec![PeerSet {
                endpoint: Some(endpoint("198.18.0.3:51820")),
                ..PeerSet::new(Key([1; 32]))
            }],
            ..SetRequest::default()
        });
        assert_eq!(current(&mut peers), Some(endpoint("198.18.0.3:51820")));
    }

    fn tcp_packet(sport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 9, 9]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&443u16.to_be_bytes());
        p
    }

    #[test]
    fn flows_spread_over_a_peer_and_its_live_equivalents() {
        let mut peers = Peers::new(Some(Key([7; 32])), 5);
        let gw = |seed: u8, shared: &[&str], fallback: &[u8], ep: Option<&str>| PeerConfig {
            endpoint: ep.map(endpoint),
            fallback: fallback.iter().map(|i| Key([*i; 32])).collect(),
            shared_routes: shared.iter().map(|s| net(s)).collect(),
            ..cfg(seed, &[&format!("100.64.0.{seed}/32")], None)
        };
        peers.upsert(gw(1, &["100.64.9.0/24"], &[2, 3], Some("198.18.0.1:51820")));
        peers.upsert(gw(2, &[], &[1, 3], Some("198.18.0.2:51820")));
        // Peer 3 has no endpoint and no session: it cannot carry anything.
        peers.upsert(gw(3, &[], &[1, 2], None));
        let slot = |i: u8| peers.slot_of(&Key([i; 32])).expect("peer");
        let dst = ip("100.64.9.9");
        let routed = peers.route(dst).expect("route");
        assert_eq!(routed, slot(1));
        let mut carried = BTreeMap::new();
        for sport in 0..600u16 {
            let pkt = tcp_packet(40_000 + sport);
            let s = peers.spread(routed, dst, &pkt);
            assert_eq!(s, peers.spread(routed, dst, &pkt), "one flow, one peer");
            *carried.entry(s).or_insert(0) += 1;
        }
        assert!(
            !carried.contains_key(&slot(3)),
            "no endpoint, no flows: {carried:?}"
        );
        assert!(
            carried[&slot(1)] > 150 && carried[&slot(2)] > 150,
            "{carried:?}"
        );
        // The gateway's own address is not shared: always to it.
        let own = ip("100.64.0.1");
        assert_eq!(peers.route(own), Some(slot(1)));
        assert!((0..50).all(|s| peers.spread(slot(1), own, &tcp_packet(s)) == slot(1)));
        // Without equivalents every flow stays on the routed peer.
        peers.upsert(gw(1, &["100.64.9.0/24"], &[], Some("198.18.0.1:51820")));
        assert!((0..50).all(|s| peers.spread(routed, dst, &tcp_packet(s)) == routed));
    }

    #[test]
    fn new_peers_and_keepalives_turned_on_ask_for_a_handshake() {
        let mut peers = Peers::new(Some(Key([7; 32])), 5);
        assert!(peers.upsert(cfg(1, &["100.64.0.1/32"], None)), "new peer");
        assert!(!peers.upsert(cfg(1, &["100.64.0.1/32"], None)), "unchanged");
        assert!(
            peers.upsert(cfg(1, &["100.64.0.1/32"], Some(25))),
            "keepalive on"
        );
        assert!(
            !peers.upsert(cfg(1, &["100.64.0.1/32"], Some(25))),
            "still on"
        );
        assert!(
            !peers.upsert(cfg(1, &["100.64.0.1/32"], None)),
            "keepalive off"
        );
        // A new endpoint for a peer without a session: try it now.
        let at = |e: &str| PeerConfig {
            endpoint: Some(endpoint(e)),
            ..cfg(1, &["100.64.0.1/32"], None)
        };
        assert!(peers.upsert(at("198.18.0.1:51820")), "endpoint learnt");
        assert!(!peers.upsert(at("198.18.0.1:51820")), "same endpoint");
        assert!(peers.upsert(at("198.18.0.2:40000")), "endpoint moved");
        let slot = peers.slot_of(&Key([1; 32])).expect("peer");
        assert!(!peers.get_mut(slot).expect("peer").0.has_session());

        // UAPI: only a keepalive turned on, as in WireGuard.
        let set = |key: u8, keepalive: Option<u16>| SetRequest {
            peers: vec![PeerSet {
                persistent_keepalive: keepalive,
                ..PeerSet::new(Key([key; 32]))
            }],
            ..SetRequest::default()
        };
        assert!(
            peers.apply_set(&set(2, None)).is_empty(),
            "new, no keepalive"
        );
        let kicked = peers.apply_set(&set(3, Some(25)));
        assert_eq!(kicked, vec![peers.slot_of(&Key([3; 32])).expect("peer 3")]);
        assert!(peers.apply_set(&set(3, Some(25))).is_empty(), "unchanged");
        assert!(peers.apply_set(&set(3, Some(0))).is_empty(), "turned off");
        assert_eq!(peers.apply_set(&set(2, Some(10))).len(), 1, "turned on");
    }

    /// A naive longest-prefix match over (prefix, value), later entries
    /// replacing earlier ones for the same prefix.
    fn naive(entries: &[(IpNet, u32)], ip: IpAddr) -> Option<u32> {
        let mut owner: BTreeMap<IpNet, u32> = BTreeMap::new();
        for (n, v) in entries {
            owner.insert(n.trunc(), *v);
        }
        owner
            .into_iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, v)| v)
    }

    fn any_entry() -> impl Strategy<Value = (IpNet, u32)> {
        let v4 = (0u32..64, 0u8..=32).prop_map(|(a, l)| {
            // Few distinct high bits, so that prefixes nest and collide.
            let addr = std::net::Ipv4Addr::from(0x6440_0000 | (a.rotate_right(6)));
            IpNet::V4(ipnet::Ipv4Net::new(addr, l).expect("valid length"))
        });
        let v6 = (0u128..64, 0u8..=128).prop_map(|(a, l)| {
            let addr = std::net::Ipv6Addr::from((0xfd00_u128 << 112) | a.rotate_right(6));
            IpNet::V6(ipnet::Ipv6Net::new(addr, l).expect("valid length"))
        });
        (prop_oneof![v4, v6], 0u32..4)
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_a_naive_longest_prefix_match(
            entries in prop::collection::vec(any_entry(), 0..30),
            removed in prop::option::of(0u32..4),
        ) {
            let mut t = AllowedIps::default();
            for (n, v) in &entries {
                t.insert(*n, *v);
            }
            let mut kept = entries.clone();
            if let Some(r) = removed {
                t.remove_value(r);
                // Removing a value removes the prefixes it owns last.
                let mut owner: BTreeMap<IpNet, u32> = BTreeMap::new();
                for (n, v) in &entries {
                    owner.insert(n.trunc(), *v);
                }
                kept = owner.into_iter().filter(|(_, v)| *v != r).collect();
            }
            for (n, _) in &entries {
                for probe in [n.network(), n.broadcast()] {
                    prop_assert_eq!(t.lookup(probe), naive(&kept, probe), "{}", probe);
                }
            }
        }
    }

    #[test]
    fn upsert_keeps_slot_and_moves_prefixes_between_peers() {
        let mut peers = Peers::new(Some(Key([7; 32])), 5);
        peers.upsert(cfg(1, &["100.64.0.1/32"], None));
        peers.upsert(cfg(2, &["100.64.0.2/32"], None));
        let s1 = peers.slot_of(&Key([1; 32])).expect("peer 1");
        let s2 = peers.slot_of(&Key([2; 32])).expect("peer 2");
        assert_ne!(s1, s2);
        // Peer 2 takes peer 1's prefix.
        peers.upsert(cfg(2, &["100.64.0.1/32", "100.64.0.2/32"], Some(25)));
        assert_eq!(peers.slot_of(&Key([2; 32])), Some(s2));
        assert_eq!(peers.route(ip("100.64.0.1")), Some(s2));
        let stats = peers.stats();
        assert_eq!(stats[0].0.allowed_ips, Vec::<IpNet>::new());
        assert_eq!(stats[1].0.persistent_keepalive, Some(25));
        peers.remove(&Key([2; 32]));
        assert_eq!(peers.route(ip("100.64.0.1")), None);
        assert!(peers.get_mut(s2).is_none());
    }

    #[test]
    fn uapi_set_update_only_and_replace_allowed_ips() {
        let mut peers = Peers::new(None, 0);
        let mut req = SetRequest {
            peers: vec![PeerSet {
                update_only: true,
                ..PeerSet::new(Key([1; 32]))
            }],
            ..SetRequest::default()
        };
        peers.apply_set(&req);
        assert!(
            peers.slot_of(&Key([1; 32])).is_none(),
            "update_only must not create"
        );
        req.peers[0].update_only = false;
        req.peers[0].allowed_ips = vec![net("100.64.0.1/32")];
        peers.apply_set(&req);
        req.peers[0].allowed_ips = vec![net("100.64.0.2/32")];
        peers.apply_set(&req);
        assert_eq!(peers.stats()[0].0.allowed_ips.len(), 2);
        req.peers[0].replace_allowed_ips = true;
        peers.apply_set(&req);
        assert_eq!(peers.stats()[0].0.allowed_ips, vec![net("100.64.0.2/32")]);
    }

    #[test]
    fn mapped_addresses_are_shown_as_ipv4() {
        let a: SocketAddr = "[::ffff:198.18.0.2]:51820".parse().expect("addr");
        assert_eq!(
            normalise(a),
            "198.18.0.2:51820".parse::<SocketAddr>().expect("addr")
        );
        let b: SocketAddr = "[fd00::2]:51820".parse().expect("addr");
        assert_eq!(normalise(b), b);
    }
}
