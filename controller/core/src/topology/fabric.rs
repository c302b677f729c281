//! Per-member peers, routes and accepted sources, derived from the site
//! paths and kept incrementally.
//!
//! In gateway mode, for a member `m` of site `X`:
//!
//! - every other member of `X` is a direct peer, routing its own prefixes;
//! - a plain member routes each remote destination to the gateway of `X`
//!   that [`gateways::pick`] assigns it, and accepts from every gateway of
//!   `X` the sources of every site that has a path to `X` (the gateway a
//!   packet enters through is chosen by the previous site, and a gateway
//!   that fails over may send any of them);
//! - a gateway peers with every gateway of every other active site (so
//!   links stay measured even when unused). To a gateway of site `Y` it
//!   routes the destinations whose path from `X` goes next through `Y`,
//!   each to the gateway of `Y` picked for it. From the gateways of `Y` it
//!   accepts the sources whose path to some destination enters `X` from
//!   `Y`: the union over destinations `d` of `Y`'s subtree in the tree
//!   towards `d`. The source check cannot depend on the destination, so
//!   this is the tightest set a single list can express.
//! - a plain WireGuard external peer has one list for routing and the
//!   source check, so it uses one gateway for both directions: the gateway
//!   picked for its own key, which is also the gateway every other site
//!   sends its traffic to.
//!
//! Each peer also carries a fallback list: the site's other gateways, in
//! rotation, that an agent may move the peer's routes to when it finds the
//! peer dead before the controller has recomputed. The remote destinations
//! routed to a gateway are `shared`: any gateway of a site carries any
//! destination the site's paths reach, so members spread their flows over
//! the gateway and its fallbacks (active-active per flow). A gateway's own
//! prefixes and external peers' (which accept from one gateway only) stay
//! in `routes`.
//!
//! The fabric stores, per site, lists of member slots (4 bytes each), not
//! prefixes; a member's config is materialised from them on demand. A
//! member joining or leaving updates O(sites × path length) list entries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use weft_dataplane_core::{Key, PeerConfig};

use crate::model::Member;
use crate::topology::explain::SiteTrace;
use crate::topology::gateways::{self, key_hash};
use crate::topology::graph::{Measurements, PathParams, ResidencyRule, SiteGraph, SiteSpec};
use crate::topology::paths::{PathTable, compute_paths};
use crate::topology::{MemberSpec, TopologyInput, TopologyMode};

/// What one member must configure: its peers with routes and accepted
/// sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberConfig {
    /// The member.
    pub member: Member,
    /// Its site.
    pub site: String,
    /// Whether it forwards traffic between peers (an up gateway).
    pub forwarding: bool,
    /// Peers by public key.
    pub peers: BTreeMap<Key, PeerRoutes>,
}

/// One peer of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoutes {
    /// The peer's name.
    pub name: String,
    /// The peer's public key.
    pub public_key: Key,
    /// Underlay endpoint, if known.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive in seconds, `None` = off.
    pub persistent_keepalive: Option<u16>,
    /// Prefixes sent to this peer. Disjoint across a member's peers.
    pub routes: Vec<IpNet>,
    /// Sources accepted from this peer besides `routes` (relayed traffic).
    pub accept_sources: Vec<IpNet>,
    /// Peers interchangeable with this one (its site's other gateways, in
    /// rotation): `shared` flows spread over this peer and them, and the
    /// agent moves `routes` and `shared` to the first reachable one if this
    /// one is found dead.
    pub fallback: Vec<Key>,
    /// Remote destinations routed to this gateway whose flows the member
    /// spreads over this peer and its `fallback` (any gateway of a site
    /// carries any destination the site's paths reach). Disjoint from
    /// every peer's `routes` and `shared`.
    #[serde(default)]
    pub shared: Vec<IpNet>,
}

impl MemberConfig {
    /// The peers as the dataplane configures them: allowed IPs = routes,
    /// with the accepted sources and the fallback list.
    pub fn peer_configs(&self) -> BTreeMap<Key, PeerConfig> {
        self.peers
            .iter()
            .map(|(k, p)| {
                let peer = PeerConfig {
                    name: p.name.clone(),
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p.routes.clone(),
                    persistent_keepalive: p.persistent_keepalive,
                    accept_sources: p.accept_sources.clone(),
                    fallback: p.fallback.clone(),
                    shared_routes: p.shared.clone(),
                };
                (*k, peer)
            })
            .collect()
    }

    /// The peer routing `addr`, by longest prefix (its flows may be
    /// spread over that peer's `fallback` peers too, if `addr` is in its
    /// `shared` routes).
    pub fn route(&self, addr: std::net::IpAddr) -> Option<&PeerRoutes> {
        self.peers
            .values()
            .flat_map(|p| p.routes.iter().chain(&p.shared).map(move |r| (r, p)))
            .filter(|(r, _)| r.contains(&addr))
            .max_by_key(|(r, _)| r.prefix_len())
            .map(|(_, p)| p)
    }
}

/// Which configs a change touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affected {
    /// The members of these sites (and the member itself).
    Sites(BTreeSet<String>),
    /// Every member.
    All,
}

/// The members a packet crosses from one member to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberTrace {
    /// Members crossed, source and (if delivered) destination included.
    pub hops: Vec<MemberHop>,
    /// Whether the packet reaches the destination.
    pub delivered: bool,
    /// The site-level route and its reason.
    pub sites: SiteTrace,
}

/// One member on a traced path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberHop {
    /// Member name.
    pub name: String,
    /// Its site.
    pub site: String,
    /// Whether it forwards as a gateway.
    pub gateway: bool,
}

impl fmt::Display for MemberTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hops: Vec<String> = self
            .hops
            .iter()
            .map(|h| {
                let gw = if h.gateway { ", gateway" } else { "" };
                format!("{} ({}{gw})", h.name, h.site)
            })
            .collect();
        if self.delivered {
            writeln!(f, "{}", hops.join(" -> "))?;
        } else {
            writeln!(f, "not delivered")?;
        }
        write!(f, "sites: {}", self.sites)
    }
}

/// Of one source site: the (from, to) site hops on its paths to every
/// destination, and the destinations it reaches.
type SourceHops = (BTreeSet<(usize, usize)>, Vec<usize>);

#[derive(Debug, Clone)]
struct Entry {
    spec: MemberSpec,
    site: usize,
    hash: u64,
    /// A gateway not found down.
    gateway_up: bool,
}

#[derive(Debug, Clone, Default)]
struct SiteTables {
    /// Member slots in this site, sorted.
    members: Vec<u32>,
    /// Up gateways, sorted by slot.
    gateways: Vec<u32>,
    /// `egress[i]`: remote members routed through `gateways[i]`.
    egress: Vec<Vec<u32>>,
    /// `relay[y][j]`: remote members this site's gateways send to gateway
    /// `j` of site `y`.
    relay: Vec<Vec<Vec<u32>>>,
    /// `accept[y]`: sources accepted from the gateways of site `y`.
    accept: Vec<Vec<u32>>,
    /// Remote members with a path to this site.
    inbound: Vec<u32>,
}

/// Per-member configs of a whole network, kept incrementally.
#[derive(Debug, Clone)]
pub struct Fabric {
    mode: TopologyMode,
    sites_spec: Vec<SiteSpec>,
    residency: Vec<ResidencyRule>,
    params: PathParams,
    keepalive: Option<u16>,
    measurements: Measurements,
    paths: PathTable,
    members: Vec<Option<Entry>>,
    free: BTreeSet<u32>,
    by_id: BTreeMap<Member, u32>,
    sites: Vec<SiteTables>,
}

impl Fabric {
    /// Computes everything. `prev` is the previous path table (hysteresis
    /// state), `None` the first time.
    pub fn build(
        input: &TopologyInput,
        measurements: &Measurements,
        prev: Option<&PathTable>,
    ) -> Fabric {
        let empty = SiteGraph::new(&[], &[], measurements, |_| false, &input.params);
        let mut fabric = Fabric {
            mode: input.mode,
            sites_spec: input.sites.clone(),
            residency: input.residency.clone(),
            params: input.params,
            keepalive: input.persistent_keepalive,
            measurements: measurements.clone(),
            paths: compute_paths(input.mode, empty, &input.params, None),
            members: Vec::new(),
            free: BTreeSet::new(),
            by_id: BTreeMap::new(),
            sites: Vec::new(),
        };
        let mut specs: Vec<&MemberSpec> = input.members.iter().collect();
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        specs.dedup_by(|a, b| a.id == b.id);
        for spec in specs {
            let slot = fabric.members.len() as u32;
            fabric.by_id.insert(spec.id.clone(), slot);
            fabric.members.push(Some(Entry {
                spec: spec.clone(),
                site: usize::MAX,
                hash: key_hash(&spec.public_key),
                gateway_up: false,
            }));
        }
        fabric.recompute(prev.cloned().as_ref());
        fabric
    }

    /// The site paths (keep it: it is the hysteresis state).
    pub fn paths(&self) -> &PathTable {
        &self.paths
    }

    /// The topology mode.
    pub fn mode(&self) -> TopologyMode {
        self.mode
    }

    /// Number of members.
    pub fn member_count(&self) -> usize {
        self.by_id.len()
    }

    /// Members, sorted.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.by_id.keys()
    }

    /// New measurements: recomputes the paths (with hysteresis against the
    /// current ones) and every table.
    pub fn handle_measurements(&mut self, measurements: &Measurements) -> Affected {
        self.measurements = measurements.clone();
        let before = (self.paths.next.clone(), self.gateway_flags());
        let prev = self.paths.clone();
        self.recompute(Some(&prev));
        if (self.paths.next.clone(), self.gateway_flags()) == before {
            Affected::Sites(BTreeSet::new())
        } else {
            Affected::All
        }
    }

    /// Adds a member or replaces one with the same id. A plain member is
    /// added incrementally; a gateway, a member of an unknown site or one
    /// replacing a gateway makes everything recompute.
    pub fn upsert_member(&mut self, spec: MemberSpec) -> Affected {
        let mut affected = BTreeSet::new();
        if let Some(slot) = self.by_id.get(&spec.id).copied() {
            if self.entry(slot).is_some_and(|e| e.spec.gateway) {
                return self.replace_and_recompute(spec);
            }
            self.remove_slot(slot, &mut affected);
        }
        let site = self.paths.graph.site_index(&spec.site);
        let Some(site) = site.filter(|_| !spec.gateway) else {
            return self.replace_and_recompute(spec);
        };
        let slot = match self.free.pop_first() {
            Some(s) => s,
            None => {
                self.members.push(None);
                (self.members.len() - 1) as u32
            }
        };
        self.by_id.insert(spec.id.clone(), slot);
        self.members[slot as usize] = Some(Entry {
            hash: key_hash(&spec.public_key),
            spec,
            site,
            gateway_up: false,
        });
        self.place(slot, true, &mut affected);
        self.named(affected)
    }

    /// Removes a member; `None` if there is no such member.
    pub fn remove_member(&mut self, id: &Member) -> Option<Affected> {
        let slot = *self.by_id.get(id)?;
        if self.entry(slot).is_some_and(|e| e.spec.gateway) {
            self.by_id.remove(id);
            self.members[slot as usize] = None;
            self.free.insert(slot);
            let prev = self.paths.clone();
            self.recompute(Some(&prev));
            return Some(Affected::All);
        }
        let mut affected = BTreeSet::new();
        self.remove_slot(slot, &mut affected);
        Some(self.named(affected))
    }

    /// The config of one member.
    pub fn config(&self, id: &Member) -> Option<MemberConfig> {
        let slot = *self.by_id.get(id)?;
        let e = self.entry(slot)?;
        let mut peers = BTreeMap::new();
        // External peers (plain WireGuard) accept only from the one gateway
        // their key picks: traffic to them is never spread.
        let external: BTreeSet<IpNet> = self
            .live()
            .filter(|(_, e)| matches!(e.spec.id, Member::ExternalPeer(_)))
            .flat_map(|(_, e)| e.spec.prefixes.iter().copied())
            .collect();
        let mut add = |p: u32, routes: Vec<IpNet>, accept: Vec<IpNet>, fallback: Vec<Key>| {
            if let Some(pe) = self.entry(p) {
                // A gateway's own prefixes go to it; what it carries for
                // others is shared with its interchangeable peers.
                let (routes, shared) = if fallback.is_empty() {
                    (routes, Vec::new())
                } else {
                    routes
                        .into_iter()
                        .partition(|r| pe.spec.prefixes.contains(r) || external.contains(r))
                };
                let peer = PeerRoutes {
                    name: pe.spec.name.clone(),
                    public_key: pe.spec.public_key,
                    endpoint: pe.spec.endpoint,
                    persistent_keepalive: self.keepalive,
                    routes,
                    accept_sources: accept,
                    fallback,
                    shared,
                };
                peers.insert(pe.spec.public_key, peer);
            }
        };
        let own = |p: u32| {
            self.entry(p)
                .map(|e| e.spec.prefixes.clone())
                .unwrap_or_default()
        };
        if self.mode == TopologyMode::FullMesh {
            for (p, _) in self.live().filter(|(p, _)| *p != slot) {
                add(p, own(p), vec![], vec![]);
            }
        } else {
            let t = &self.sites[e.site];
            let external = matches!(e.spec.id, Member::ExternalPeer(_));
            let affinity = if external {
                gateways::pick(e.hash, self.hashes(&t.gateways)).map(|i| t.gateways[i])
            } else {
                None
            };
            for &p in t.members.iter().filter(|p| **p != slot) {
                let mut routes = own(p);
                let (mut accept, mut fallback) = (vec![], vec![]);
                if let Some(i) = t.gateways.iter().position(|g| *g == p) {
                    if external {
                        if affinity == Some(p) {
                            let mut all: Vec<u32> = t.egress.concat();
                            all.extend_from_slice(&t.inbound);
                            all.sort_unstable();
                            all.dedup();
                            routes.extend(self.prefixes(&all));
                            routes.sort_unstable();
                        }
                    } else {
                        accept = self.prefixes(&t.inbound);
                        if !e.gateway_up {
                            routes.extend(self.prefixes(&t.egress[i]));
                            routes.sort_unstable();
                            fallback = self.rotated(&t.gateways, i);
                        }
                    }
                }
                add(p, routes, accept, fallback);
            }
            if e.gateway_up {
                for (y, ty) in self.sites.iter().enumerate().filter(|(y, _)| *y != e.site) {
                    for (j, &g) in ty.gateways.iter().enumerate() {
                        let routes = t.relay.get(y).and_then(|r| r.get(j));
                        let routes = routes.map(|r| self.prefixes(r)).unwrap_or_default();
                        let accept = t.accept.get(y).map(|a| self.prefixes(a));
                        add(
                            g,
                            routes,
                            accept.unwrap_or_default(),
                            self.rotated(&ty.gateways, j),
                        );
                    }
                }
            }
        }
        Some(MemberConfig {
            member: e.spec.id.clone(),
            site: e.spec.site.clone(),
            forwarding: e.gateway_up,
            peers,
        })
    }

    /// The members a packet from `src` to `dst` crosses, and why.
    pub fn trace(&self, src: &Member, dst: &Member) -> Option<MemberTrace> {
        let (s, d) = (*self.by_id.get(src)?, *self.by_id.get(dst)?);
        let (se, de) = (self.entry(s)?, self.entry(d)?);
        let sites = self.paths.trace(&se.spec.site, &de.spec.site);
        let hop = |slot: u32| {
            self.entry(slot).map(|e| MemberHop {
                name: e.spec.name.clone(),
                site: e.spec.site.clone(),
                gateway: e.gateway_up,
            })
        };
        let mut hops: Vec<MemberHop> = hop(s).into_iter().collect();
        let mut cur = s;
        let mut delivered = s == d;
        while !delivered && hops.len() <= self.members.len() {
            let Some(next) = self.next_member(cur, d) else {
                break;
            };
            hops.extend(hop(next));
            cur = next;
            delivered = cur == d;
        }
        Some(MemberTrace {
            hops,
            delivered,
            sites,
        })
    }

    // ---- internals ----

    fn entry(&self, slot: u32) -> Option<&Entry> {
        self.members.get(slot as usize).and_then(Option::as_ref)
    }

    fn live(&self) -> impl Iterator<Item = (u32, &Entry)> {
        self.members
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i as u32, e)))
    }

    fn hashes<'a>(&'a self, slots: &'a [u32]) -> impl Iterator<Item = u64> + 'a {
        slots.iter().map(|s| self.entry(*s).map_or(0, |e| e.hash))
    }

    /// The prefixes of these members, sorted (configs do not depend on
    /// slot numbers).
    fn prefixes(&self, slots: &[u32]) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = slots
            .iter()
            .filter_map(|s| self.entry(*s))
            .flat_map(|e| e.spec.prefixes.iter().copied())
            .collect();
        out.sort_unstable();
        out
    }

    /// Keys of `gateways` other than the `i`th, starting after it.
    fn rotated(&self, gateways: &[u32], i: usize) -> Vec<Key> {
        let n = gateways.len();
        (1..n)
            .filter_map(|k| self.entry(gateways[(i + k) % n]))
            .map(|e| e.spec.public_key)
            .collect()
    }

    fn gateway_flags(&self) -> Vec<bool> {
        self.members
            .iter()
            .map(|e| e.as_ref().is_some_and(|e| e.gateway_up))
            .collect()
    }

    fn named(&self, sites: BTreeSet<usize>) -> Affected {
        Affected::Sites(
            sites
                .into_iter()
                .map(|s| self.paths.graph.names[s].clone())
                .collect(),
        )
    }

    fn replace_and_recompute(&mut self, spec: MemberSpec) -> Affected {
        let slot = match self.by_id.get(&spec.id) {
            Some(s) => *s,
            None => match self.free.pop_first() {
                Some(s) => s,
                None => {
                    self.members.push(None);
                    (self.members.len() - 1) as u32
                }
            },
        };
        self.by_id.insert(spec.id.clone(), slot);
        self.members[slot as usize] = Some(Entry {
            hash: key_hash(&spec.public_key),
            spec,
            site: usize::MAX,
            gateway_up: false,
        });
        let prev = self.paths.clone();
        self.recompute(Some(&prev));
        Affected::All
    }

    /// Recomputes gateway health, the site paths and every table.
    fn recompute(&mut self, prev: Option<&PathTable>) {
        let mode = self.mode;
        let measurements = &self.measurements;
        let mut active = BTreeSet::new();
        for e in self.members.iter_mut().flatten() {
            e.gateway_up = mode == TopologyMode::Gateways
                && e.spec.gateway
                && matches!(e.spec.id, Member::Node(_))
                && !measurements.is_down(&e.spec.id);
            if e.gateway_up {
                active.insert(e.spec.site.clone());
            }
        }
        let graph = SiteGraph::new(
            &self.sites_spec,
            &self.residency,
            measurements,
            |s| mode == TopologyMode::FullMesh || active.contains(s),
            &self.params,
        );
        self.paths = compute_paths(mode, graph, &self.params, prev);
        let n = self.paths.graph.len();
        self.sites = vec![SiteTables::default(); n];
        let mut orphans = Vec::new();
        for (slot, e) in self.members.iter_mut().enumerate() {
            let Some(e) = e else { continue };
            match self.paths.graph.site_index(&e.spec.site) {
                Some(site) => {
                    e.site = site;
                    self.sites[site].members.push(slot as u32);
                    if e.gateway_up {
                        self.sites[site].gateways.push(slot as u32);
                    }
                }
                None => orphans.push(e.spec.id.clone()),
            }
        }
        // A member of an unknown site has nowhere to be.
        for id in orphans {
            if let Some(slot) = self.by_id.remove(&id) {
                self.members[slot as usize] = None;
                self.free.insert(slot);
            }
        }
        if mode == TopologyMode::FullMesh {
            return;
        }
        for site in 0..n {
            let t = &mut self.sites[site];
            t.egress = vec![Vec::new(); t.gateways.len()];
            t.accept = vec![Vec::new(); n];
            t.relay = vec![Vec::new(); n];
        }
        for y in 0..n {
            let count = self.sites[y].gateways.len();
            for x in 0..n {
                self.sites[x].relay[y] = vec![Vec::new(); count];
            }
        }
        // Slots in increasing order keep every list sorted.
        let sources = self.source_hops();
        let mut picks = vec![None; n];
        for slot in 0..self.members.len() as u32 {
            let Some(e) = self.entry(slot) else { continue };
            let (hash, d) = (e.hash, e.site);
            for (p, t) in picks.iter_mut().zip(&self.sites) {
                *p = gateways::pick(hash, self.hashes(&t.gateways));
            }
            for x in (0..n).filter(|x| *x != d) {
                let Some(y) = self.paths.next_idx(x, d) else {
                    continue;
                };
                if let Some(i) = picks[x] {
                    self.sites[x].egress[i].push(slot);
                }
                if let Some(j) = picks[y] {
                    self.sites[x].relay[y][j].push(slot);
                }
            }
            let (hops, reach) = &sources[d];
            for &(v, w) in hops {
                self.sites[w].accept[v].push(slot);
            }
            for &t in reach {
                self.sites[t].inbound.push(slot);
            }
        }
    }

    /// Per source site: the (from, to) site hops on its paths to every
    /// destination, and the destinations it reaches.
    fn source_hops(&self) -> Vec<SourceHops> {
        let n = self.paths.graph.len();
        (0..n)
            .map(|s| {
                let mut hops = BTreeSet::new();
                let mut reach = Vec::new();
                for d in (0..n).filter(|d| *d != s) {
                    if let Some(path) = self.paths.path_idx(s, d) {
                        reach.push(d);
                        hops.extend(path.windows(2).map(|w| (w[0], w[1])));
                    }
                }
                (hops, reach)
            })
            .collect()
    }

    /// Puts (`add`) or takes out a plain member's slot in every table.
    fn place(&mut self, slot: u32, add: bool, affected: &mut BTreeSet<usize>) {
        let Some(e) = self.entry(slot) else { return };
        let (hash, d) = (e.hash, e.site);
        let edit = |list: &mut Vec<u32>| {
            match (list.binary_search(&slot), add) {
                (Err(at), true) => list.insert(at, slot),
                (Ok(at), false) => {
                    list.remove(at);
                }
                _ => {}
            };
        };
        edit(&mut self.sites[d].members);
        affected.insert(d);
        if self.mode == TopologyMode::FullMesh {
            affected.extend(0..self.sites.len());
            return;
        }
        let n = self.sites.len();
        let pick = |fabric: &Fabric, site: usize| {
            gateways::pick(hash, fabric.hashes(&fabric.sites[site].gateways))
        };
        for x in (0..n).filter(|x| *x != d) {
            let Some(y) = self.paths.next_idx(x, d) else {
                continue;
            };
            let (i, j) = (pick(self, x), pick(self, y));
            let t = &mut self.sites[x];
            if let Some(list) = i.and_then(|i| t.egress.get_mut(i)) {
                edit(list);
            }
            if let Some(list) = j.and_then(|j| t.relay.get_mut(y)?.get_mut(j)) {
                edit(list);
            }
            affected.insert(x);
        }
        for t in (0..n).filter(|t| *t != d) {
            let Some(path) = self.paths.path_idx(d, t) else {
                continue;
            };
            edit(&mut self.sites[t].inbound);
            for w in path.windows(2) {
                if let Some(list) = self.sites[w[1]].accept.get_mut(w[0]) {
                    edit(list);
                }
                affected.insert(w[1]);
            }
        }
    }

    fn remove_slot(&mut self, slot: u32, affected: &mut BTreeSet<usize>) {
        self.place(slot, false, affected);
        if let Some(e) = self.members.get_mut(slot as usize).and_then(Option::take) {
            self.by_id.remove(&e.spec.id);
            self.free.insert(slot);
        }
    }

    /// The member after `cur` on the way to `dst`, as the configs route.
    fn next_member(&self, cur: u32, dst: u32) -> Option<u32> {
        let (c, d) = (self.entry(cur)?, self.entry(dst)?);
        if self.mode == TopologyMode::FullMesh || c.site == d.site {
            return Some(dst);
        }
        let x = &self.sites[c.site];
        let y = self.paths.next_idx(c.site, d.site)?;
        if matches!(c.spec.id, Member::ExternalPeer(_)) {
            let i = gateways::pick(c.hash, self.hashes(&x.gateways))?;
            return Some(x.gateways[i]);
        }
        let (site, hash) = if c.gateway_up {
            (&self.sites[y], d.hash)
        } else {
            (x, d.hash)
        };
        let i = gateways::pick(hash, self.hashes(&site.gateways))?;
        Some(site.gateways[i])
    }
}
