//! The peer table: one boringtun `Tunn` per peer, cryptokey routing
//! (allowed IPs → peer), and the config changes the control API and the
//! UAPI make to it. No I/O here; the event loop drives it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use weft_dataplane_core::{Key, PeerConfig};

use super::PeerStats;
use super::uapi::SetRequest;

/// Handshake initiations per second we answer before asking for cookies
/// (boringtun's device uses the same figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Peer slots are 24-bit: boringtun puts `slot << 8` in the session index.
const SLOT_MASK: u32 = 0x00ff_ffff;

/// A routing table from prefixes to values, longest prefix first.
///
/// A linear scan: fine for tens of peers; a trie replaces it when we need
/// thousands of prefixes.
#[derive(Debug, Clone)]
pub(crate) struct AllowedIps<T> {
    /// Sorted by prefix length, longest first; prefixes are unique.
    entries: Vec<(IpNet, T)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            entries: Vec::new(),
        }
    }
}

impl<T: Copy + PartialEq> AllowedIps<T> {
    /// Maps `net` (truncated to its network address) to `value`; returns the
    /// previous owner of exactly that prefix.
    pub(crate) fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let net = net.trunc();
        if let Some(e) = self.entries.iter_mut().find(|(n, _)| *n == net) {
            return Some(std::mem::replace(&mut e.1, value));
        }
        let pos = self
            .entries
            .iter()
            .position(|(n, _)| n.prefix_len() < net.prefix_len())
            .unwrap_or(self.entries.len());
        self.entries.insert(pos, (net, value));
        None
    }

    /// Removes every prefix that maps to `value`.
    pub(crate) fn remove_value(&mut self, value: T) {
        self.entries.retain(|(_, v)| *v != value);
    }

    /// Longest-prefix match.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Option<T> {
        self.entries
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, v)| *v)
    }

    /// WireGuard's anti-spoofing rule: a packet decrypted from `value` may
    /// only carry a source address that routes back to `value`.
    pub(crate) fn source_allowed(&self, src: IpAddr, value: T) -> bool {
        self.lookup(src) == Some(value)
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
    /// As configured (truncated, deduplicated), in insertion order.
    pub(crate) allowed_ips: Vec<IpNet>,
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
            allowed_ips: Vec::new(),
            keepalive: None,
            preshared_key: None,
            tunn: None,
            tx_bytes: 0,
            rx_bytes: 0,
            last_handshake: None,
        }
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

    /// Routes `net` to `slot`, taking it away from any other peer (a prefix
    /// belongs to one peer, as in WireGuard).
    fn add_allowed_ip(&mut self, slot: u32, net: IpNet) {
        let net = net.trunc();
        if let Some(old) = self.routes.insert(net, slot)
            && old != slot
            && let Some(p) = self.by_slot.get_mut(&old)
        {
            p.allowed_ips.retain(|n| *n != net);
        }
        if let Some(p) = self.by_slot.get_mut(&slot)
            && !p.allowed_ips.contains(&net)
        {
            p.allowed_ips.push(net);
        }
    }

    fn clear_allowed_ips(&mut self, slot: u32) {
        self.routes.remove_value(slot);
        if let Some(p) = self.by_slot.get_mut(&slot) {
            p.allowed_ips.clear();
        }
    }

    /// Changes keepalive and PSK of a peer; rebuilds its `Tunn` only when
    /// one of them actually changed (boringtun has no setter for them).
    fn set_keepalive_psk(
        &mut self,
        slot: u32,
        keepalive: Option<Option<u16>>,
        psk: Option<Option<Key>>,
    ) {
        let Some(p) = self.by_slot.get_mut(&slot) else {
            return;
        };
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
    }

    /// Adds a peer or updates it in place (its sessions survive unless the
    /// keepalive changes). An `endpoint` of `None` keeps the learnt one.
    pub(crate) fn upsert(&mut self, cfg: PeerConfig) {
        let slot = self.slot_or_insert(cfg.public_key);
        if let Some(p) = self.by_slot.get_mut(&slot) {
            p.name = cfg.name;
            if cfg.endpoint.is_some() {
                p.endpoint = cfg.endpoint.map(normalise);
            }
        }
        self.set_keepalive_psk(slot, Some(cfg.persistent_keepalive), None);
        self.clear_allowed_ips(slot);
        for net in cfg.allowed_ips {
            self.add_allowed_ip(slot, net);
        }
    }

    /// Applies a validated UAPI `set` (everything but the listen port, which
    /// the event loop owns).
    pub(crate) fn apply_set(&mut self, req: &SetRequest) {
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
            }
            self.set_keepalive_psk(slot, ps.persistent_keepalive.map(Some), ps.preshared_key);
            if ps.replace_allowed_ips {
                self.clear_allowed_ips(slot);
            }
            for net in &ps.allowed_ips {
                self.add_allowed_ip(slot, *net);
            }
        }
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
    use super::*;
    use crate::tunnel::uapi::PeerSet;

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
