//! The controller's live state: the validated model, its store, and the
//! watch channels that push each node its config. Every mutation is
//! computed on a copy, persisted, and only then made visible and pushed, so
//! an acknowledged change is durable and a failed one changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{info, warn};
use weft_controller_core::topology::{
    Fabric, Link, Measurements, MemberTrace, SiteTrace, TopologyInput, TopologyMode,
};
use weft_controller_core::{Error as CoreError, Member, Protected, State, netmap};
use weft_dataplane_core::NodeConfig;
use weft_proto::pb;

use crate::store::{Store, StoreError};

/// What an API call can fail with, before it becomes a gRPC status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("the change could not be stored, nothing was changed: {0}")]
    Store(#[from] StoreError),
}

/// Live, not persisted, status of a node from its agent.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeStatus {
    pub(crate) streams: u32,
    pub(crate) applied_revision: u64,
    pub(crate) last_report_unix: u64,
    pub(crate) apply_error: String,
    pub(crate) peers: Vec<pb::PeerStatus>,
    pub(crate) policy: Option<pb::PolicyStatus>,
}

pub(crate) struct Controller {
    inner: Mutex<Inner>,
    /// When join tokens were last pruned (Unix seconds).
    pruned_unix: AtomicU64,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

/// Reports older than this are ignored by path computation: agents report
/// every 10 s and within a second of a reachability change, so an older
/// report is from an agent that lost the controller (maybe over the very
/// link being measured) and says nothing current.
pub(crate) const STALE_REPORT_SECS: u64 = 25;

/// Latency changes alone recompute the paths at most this often;
/// reachability changes (a link or a gateway down or back) at once.
const LATENCY_RECOMPUTE_SECS: u64 = 5;

struct Inner {
    state: State,
    store: Box<dyn Store + Send>,
    /// Latest config per node; agents' Watch streams subscribe to these.
    configs: BTreeMap<String, watch::Sender<Arc<NodeConfig>>>,
    status: BTreeMap<String, NodeStatus>,
    /// Configs computed from the state alone (full mesh, policy, kernel
    /// routes), by node id; gateway mode replaces their peers.
    base: BTreeMap<String, NodeConfig>,
    /// Gateway mode: per-member peers from the measured site paths (which
    /// are also the hysteresis state). `None` in full-mesh mode.
    fabric: Option<Fabric>,
    /// What the paths were last computed from, and when (Unix seconds).
    measurements: Measurements,
    measured_unix: u64,
    /// Endpoints of nodes as members of other sites see them, where that
    /// differs from the registered one (a node behind NAT), by node id.
    learnt: BTreeMap<String, SocketAddr>,
    /// Addresses agents reach the controller at: configured, and seen on
    /// accepted agent connections. No workload prefix may cover them.
    controller_addrs: BTreeSet<IpAddr>,
    /// Approved prefixes left out of the configs as no longer safe, by
    /// node id, with why (`State::withheld_prefixes`).
    withheld: BTreeMap<String, BTreeMap<IpNet, String>>,
}

/// Unix time now, in seconds.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Controller {
    pub(crate) fn new(state: State, store: Box<dyn Store + Send>) -> Controller {
        let mut inner = Inner {
            state,
            store,
            configs: BTreeMap::new(),
            status: BTreeMap::new(),
            base: BTreeMap::new(),
            fabric: None,
            measurements: Measurements::default(),
            measured_unix: 0,
            learnt: BTreeMap::new(),
            controller_addrs: BTreeSet::new(),
            withheld: BTreeMap::new(),
        };
        inner.publish();
        let c = Controller {
            inner: Mutex::new(inner),
            pruned_unix: AtomicU64::new(0),
        };
        c.prune_tokens(now_unix());
        c
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-changed
        // (mutations run on a copy), so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the state.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&State, &BTreeMap<String, NodeStatus>) -> T) -> T {
        let inner = self.lock();
        f(&inner.state, &inner.status)
    }

    /// Applies `f` to a copy of the state, persists the copy, then makes it
    /// current and pushes changed configs to the agents.
    pub(crate) fn mutate<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut State) -> Result<T, CoreError>,
    ) -> Result<T, ApiError> {
        let mut inner = self.lock();
        let mut next = inner.state.clone();
        let out = f(&mut next)?;
        if next.revision() == inner.state.revision() {
            return Ok(out);
        }
        inner.store.save(&next)?;
        inner.state = next;
        info!(
            revision = inner.state.revision(),
            change = what,
            "state changed"
        );
        inner.publish();
        Ok(out)
    }

    /// Like [`Controller::mutate`], for changes that must not route a
    /// protected address: `f` also gets the addresses the state does not
    /// hold (controller addresses, learnt endpoints).
    pub(crate) fn mutate_prefixes<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut State, &Protected) -> Result<T, CoreError>,
    ) -> Result<T, ApiError> {
        let protected = self.lock().protected();
        self.mutate(what, |s| f(s, &protected))
    }

    /// Records addresses agents reach the controller at; republishes if
    /// one is new (an approved prefix covering it is then left out).
    pub(crate) fn add_controller_addresses(&self, addrs: impl IntoIterator<Item = IpAddr>) {
        let mut inner = self.lock();
        let mut added = false;
        for ip in addrs {
            if inner.controller_addrs.insert(ip) {
                info!(address = %ip, "controller address: no workload prefix may cover it");
                added = true;
            }
        }
        if added {
            inner.publish();
        }
    }

    /// Approved prefixes left out of the configs, by node id, with why.
    pub(crate) fn withheld(&self) -> BTreeMap<String, BTreeMap<IpNet, String>> {
        self.lock().withheld.clone()
    }

    /// Subscribes to a node's config.
    pub(crate) fn subscribe(&self, node_id: &str) -> Option<watch::Receiver<Arc<NodeConfig>>> {
        let mut inner = self.lock();
        let rx = inner.configs.get(node_id).map(|tx| tx.subscribe())?;
        inner.status.entry(node_id.to_string()).or_default().streams += 1;
        Some(rx)
    }

    /// Notes that a node's Watch stream ended.
    pub(crate) fn unsubscribe(&self, node_id: &str) {
        let mut inner = self.lock();
        if let Some(s) = inner.status.get_mut(node_id) {
            s.streams = s.streams.saturating_sub(1);
        }
    }

    /// Records an agent's report.
    pub(crate) fn report(&self, node_id: &str, report: pb::ReportRequest) {
        let mut inner = self.lock();
        let s = inner.status.entry(node_id.to_string()).or_default();
        s.applied_revision = report.applied_revision;
        s.apply_error = report.apply_error;
        s.peers = report.peers;
        s.policy = report.policy;
        s.last_report_unix = now_unix();
        inner.remeasure(now_unix());
    }

    /// Lets reports age: recomputes the paths when the fresh reports say
    /// something new (called every second).
    pub(crate) fn tick(&self) {
        let now = now_unix();
        self.lock().remeasure(now);
        let last = self.pruned_unix.load(Ordering::Relaxed);
        if now >= last.saturating_add(3600) {
            self.prune_tokens(now);
        }
    }

    /// Forgets join tokens expired for a week (see `State::prune_tokens`).
    pub(crate) fn prune_tokens(&self, now: u64) {
        self.pruned_unix.store(now, Ordering::Relaxed);
        match self.mutate("prune expired join tokens", |s| Ok(s.prune_tokens(now))) {
            Ok(ids) if !ids.is_empty() => info!(tokens = ?ids, "expired join tokens pruned"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pruning expired join tokens failed; will retry"),
        }
    }

    /// The members a packet from `from` to `to` crosses, and why: the live
    /// topology in gateway mode; in full-mesh mode the paths the current
    /// measurements give.
    pub(crate) fn trace(&self, from: &Member, to: &Member) -> Option<MemberTrace> {
        let inner = self.lock();
        match &inner.fabric {
            Some(f) => f.trace(from, to),
            None => inner.full_mesh_view().trace(from, to),
        }
    }

    /// The route between every ordered pair of sites, and why.
    pub(crate) fn site_routes(&self) -> Vec<SiteTrace> {
        let inner = self.lock();
        match &inner.fabric {
            Some(f) => f.paths().trace_all(),
            None => inner.full_mesh_view().paths().trace_all(),
        }
    }

    /// The config of an external peer (plain WireGuard): in gateway mode
    /// its peers are its site's members, with its site's gateway carrying
    /// everything remote.
    pub(crate) fn external_peer_config(&self, name: &str) -> Option<NodeConfig> {
        let inner = self.lock();
        let mut cfg = netmap::external_peer_config(&inner.state, name)?;
        if let Some(f) = &inner.fabric {
            let member = f.config(&Member::ExternalPeer(name.to_owned()))?;
            cfg.peers = member.peer_configs();
        }
        Some(cfg)
    }

    /// Updates a node's endpoint if it changed (persisted).
    pub(crate) fn set_endpoint(
        &self,
        node_id: &str,
        endpoint: Option<SocketAddr>,
    ) -> Result<(), ApiError> {
        self.mutate("node endpoint", |s| {
            s.set_node_endpoint(node_id, endpoint).map(|_| ())
        })
    }
}

impl Inner {
    /// What no workload prefix may cover, besides the state's endpoints.
    fn protected(&self) -> Protected {
        Protected {
            controller: self.controller_addrs.clone(),
            learnt: self.learnt.clone(),
        }
    }

    /// Recomputes every node's config from the state and pushes those whose
    /// content changed. Approved prefixes that are no longer safe to route
    /// are left out (`State::publishable`).
    fn publish(&mut self) {
        let protected = self.protected();
        let withheld = self.state.withheld_prefixes(&protected);
        if withheld != self.withheld {
            for (id, prefixes) in &withheld {
                for (prefix, why) in prefixes {
                    warn!(node = %id, prefix = %prefix, reason = %why, "approved workload prefix left out of every config");
                }
            }
            self.withheld = withheld;
        }
        let view = self.state.publishable(&protected);
        let topology = view.topology();
        self.base = match topology.mode {
            TopologyMode::FullMesh => netmap::all_node_configs(&view),
            TopologyMode::Gateways => netmap::all_node_configs_without_peers(&view),
        };
        self.fabric = (topology.mode == TopologyMode::Gateways).then(|| {
            let input = TopologyInput::from_state(&view, topology);
            let prev = self.fabric.as_ref().map(Fabric::paths);
            Fabric::build(&input, &self.measurements, prev)
        });
        self.push();
    }

    /// A throwaway full-mesh fabric on the current measurements (for
    /// traces in full-mesh mode).
    fn full_mesh_view(&self) -> Fabric {
        let view = self.state.publishable(&self.protected());
        let mut topology = view.topology().clone();
        topology.mode = TopologyMode::FullMesh;
        let input = TopologyInput::from_state(&view, &topology);
        Fabric::build(&input, &self.measurements, None)
    }

    /// Takes the fresh reports' measurements; in gateway mode recomputes
    /// the paths (with hysteresis) and pushes the configs that changed.
    /// Latency alone is taken at most every [`LATENCY_RECOMPUTE_SECS`].
    fn remeasure(&mut self, now: u64) {
        // Learnt endpoints outlive the reports that taught them (a
        // controller cut off from a site keeps handing out what worked);
        // reports that see a node at its registered endpoint again, or the
        // node's deletion, drop them.
        let mut learnt = self.learnt.clone();
        learnt.retain(|id, _| self.state.node_by_id(id).is_some());
        for (id, seen) in learn_endpoints(&self.state, &self.status, now) {
            match seen {
                Some(e) => learnt.insert(id, e),
                None => learnt.remove(&id),
            };
        }
        if learnt != self.learnt {
            for (id, e) in &learnt {
                if self.learnt.get(id) != Some(e) {
                    info!(node = %id, endpoint = %e, "endpoint learnt from peers in other sites (behind NAT?)");
                }
            }
            self.learnt = learnt;
            // A learnt endpoint may fall inside an approved prefix, which
            // must then leave the configs: publish, not only push.
            self.publish();
        }
        let m = measure(&self.state, &self.status, now);
        if m == self.measurements {
            return;
        }
        let urgent = !m.same_reachability(&self.measurements);
        if !urgent && now.saturating_sub(self.measured_unix) < LATENCY_RECOMPUTE_SECS {
            return;
        }
        if urgent {
            info!(
                links_down = ?m.down_links(),
                members_down = ?m.down_members(),
                "reachability changed"
            );
        }
        self.measurements = m;
        self.measured_unix = now;
        let Some(fabric) = &mut self.fabric else {
            return;
        };
        let before = fabric.paths().clone();
        fabric.handle_measurements(&self.measurements);
        if *fabric.paths() != before {
            for t in fabric.paths().trace_all() {
                if before.trace(&t.from, &t.to).route != t.route {
                    info!(route = %t, "site path changed");
                }
            }
        }
        self.push();
    }

    /// Pushes every node the config it should have now (base config, with
    /// the fabric's peers in gateway mode) if its content changed; drops the
    /// channels of deleted nodes (their streams end).
    fn push(&mut self) {
        let fabric = self.fabric.as_ref();
        // Learnt endpoints by key, with the node's site: given to members of
        // other sites only (the node's own site reaches it on its LAN).
        let learnt: BTreeMap<weft_dataplane_core::Key, (&str, SocketAddr)> = self
            .learnt
            .iter()
            .filter_map(|(id, e)| {
                let n = self.state.node_by_id(id)?;
                Some((n.public_key, (n.site.as_str(), *e)))
            })
            .collect();
        let configs: BTreeMap<String, NodeConfig> = self
            .base
            .iter()
            .map(|(id, base)| {
                let mut cfg = base.clone();
                if let Some(member) = fabric.and_then(|f| f.config(&Member::Node(id.clone()))) {
                    cfg.peers = member.peer_configs();
                    cfg.forwarding |= member.forwarding;
                }
                let site = self.state.node_by_id(id).map(|n| n.site.as_str());
                for (key, peer) in cfg.peers.iter_mut() {
                    if let Some((peer_site, e)) = learnt.get(key)
                        && site != Some(*peer_site)
                    {
                        peer.endpoint = Some(*e);
                    }
                }
                (id.clone(), cfg)
            })
            .collect();
        self.configs.retain(|id, _| {
            let keep = configs.contains_key(id);
            if !keep {
                warn!(node = %id, "node deleted: closing its config stream");
            }
            keep
        });
        self.status.retain(|id, _| configs.contains_key(id));
        for (id, cfg) in configs {
            match self.configs.get(&id) {
                Some(tx) => {
                    tx.send_if_modified(|cur| {
                        if same_content(cur, &cfg) {
                            false
                        } else {
                            *cur = Arc::new(cfg);
                            true
                        }
                    });
                }
                None => {
                    let (tx, _rx) = watch::channel(Arc::new(cfg));
                    self.configs.insert(id, tx);
                }
            }
        }
    }
}

/// Equal but for the revision tag (a revision bump alone is not pushed).
fn same_content(a: &NodeConfig, b: &NodeConfig) -> bool {
    a.addresses == b.addresses
        && a.mtu == b.mtu
        && a.peers == b.peers
        && a.node_name == b.node_name
        && a.node_id == b.node_id
        && a.policy == b.policy
        && a.routes == b.routes
        && a.forwarding == b.forwarding
}

/// Endpoints of nodes as the fresh reports of members of other sites see
/// them (the address their packets come from), where that differs from the
/// registered endpoint: a node behind NAT announces an address only its
/// LAN can reach, and its own handshakes show peers where its NAT maps it.
/// `None` when every report shows the registered one, or when reports
/// disagree. Nodes nobody in another site reports are left out.
fn learn_endpoints(
    state: &State,
    statuses: &BTreeMap<String, NodeStatus>,
    now: u64,
) -> BTreeMap<String, Option<SocketAddr>> {
    let by_key: BTreeMap<&[u8], &weft_controller_core::Node> = state
        .nodes()
        .map(|n| (n.public_key.0.as_slice(), n))
        .collect();
    let mut votes: BTreeMap<&str, BTreeSet<SocketAddr>> = BTreeMap::new();
    let fresh = statuses
        .iter()
        .filter(|(_, st)| now.saturating_sub(st.last_report_unix) <= STALE_REPORT_SECS)
        .filter_map(|(id, st)| state.node_by_id(id).map(|n| (n, st)));
    for (reporter, st) in fresh {
        for p in &st.peers {
            let Some(node) = by_key.get(p.public_key.as_slice()) else {
                continue;
            };
            let Ok(seen) = p.endpoint.parse::<SocketAddr>() else {
                continue;
            };
            if node.site == reporter.site {
                continue;
            }
            votes.entry(node.id.as_str()).or_default().insert(seen);
        }
    }
    votes
        .into_iter()
        .map(|(id, v)| {
            // Peers that have not heard from the node yet still show the
            // registered endpoint: any other observation outvotes them. If
            // peers see the node at different addresses, its NAT maps each
            // destination apart (symmetric NAT): no single endpoint works
            // for everyone, so none is handed out and each peer keeps the
            // one it learnt from the node's own packets.
            let registered = state.node_by_id(id).and_then(|n| n.endpoint);
            let mut seen = v.into_iter().filter(|e| Some(*e) != registered);
            let learnt = match (seen.next(), seen.next()) {
                (Some(e), None) => Some(e),
                _ => None,
            };
            (id.to_owned(), learnt)
        })
        .collect()
}

/// What the agents' fresh reports (the last [`STALE_REPORT_SECS`]) say:
/// site links from their probes, and the nodes found down. A node is down
/// when its agent is not connected and every fresh probe of it (at least
/// one) goes unanswered.
fn measure(state: &State, statuses: &BTreeMap<String, NodeStatus>, now: u64) -> Measurements {
    let by_key: BTreeMap<&[u8], (&str, &str)> = state
        .nodes()
        .map(|n| (n.public_key.0.as_slice(), (n.id.as_str(), n.site.as_str())))
        .collect();
    let fresh = statuses
        .iter()
        .filter(|(_, st)| now.saturating_sub(st.last_report_unix) <= STALE_REPORT_SECS)
        .filter_map(|(id, st)| state.node_by_id(id).map(|n| (n, st)));
    let mut links = Vec::new();
    // Per probed node: (probes, answered).
    let mut seen: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for (n, st) in fresh {
        for p in &st.peers {
            let (Some(probe), Some((peer_id, peer_site))) =
                (p.probe.as_ref(), by_key.get(p.public_key.as_slice()))
            else {
                continue;
            };
            if probe.samples == 0 {
                continue;
            }
            let up = probe.reachable && probe.rtt_us > 0;
            let e = seen.entry(peer_id).or_default();
            e.0 += 1;
            e.1 += u32::from(up);
            let link = if up {
                Link {
                    latency_us: u32::try_from(probe.rtt_us).unwrap_or(u32::MAX),
                    loss_ppm: probe.loss_permille.saturating_mul(1000),
                    up: true,
                }
            } else {
                Link::down()
            };
            links.push((n.site.clone(), (*peer_site).to_owned(), link));
        }
    }
    let mut m = Measurements::from_probes(links);
    for (id, (probes, answered)) in seen {
        let connected = statuses.get(id).is_some_and(|s| s.streams > 0);
        if probes > 0 && answered == 0 && !connected {
            m.set_down(Member::Node(id.to_owned()), true);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use weft_controller_core::topology::{TopologyConfig, TopologyMode};
    use weft_controller_core::{NetworkSettings, Registration};
    use weft_dataplane_core::Key;

    use super::*;
    use crate::store::FileStore;

    const NOW: u64 = 1_800_000_000;

    /// Sites a, b, c; nodes a1, a2, b1, c1 (key = [i; 32], id n-<name>).
    fn state() -> State {
        let settings =
            NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"));
        let mut s = State::new(settings).expect("valid settings");
        for (i, (name, site)) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")]
            .into_iter()
            .enumerate()
        {
            if s.site(site).is_none() {
                s.create_site(site, NOW).expect("site");
            }
            let token = format!("t{i}");
            s.create_token(&token, [7; 32], site, NOW, 3_600)
                .expect("token");
            let k = u8::try_from(i + 1).expect("small");
            let reg = Registration {
                node_id: format!("n-{name}"),
                token_id: token,
                secret_hash: [7; 32],
                name: name.to_owned(),
                public_key: Key([k; 32]),
                endpoint: Some(format!("198.18.0.{k}:51820").parse().expect("addr")),
                cert_fingerprint: [k; 32],
                labels: Default::default(),
            };
            s.register_node(reg, NOW).expect("registers");
        }
        s
    }

    fn probe(key: u8, rtt_ms: u64, reachable: bool) -> pb::PeerStatus {
        pb::PeerStatus {
            public_key: vec![key; 32],
            probe: Some(pb::PeerProbe {
                rtt_us: if reachable { rtt_ms * 1000 } else { 0 },
                loss_permille: if reachable { 0 } else { 1000 },
                reachable,
                samples: 10,
            }),
            ..Default::default()
        }
    }

    fn status(peers: Vec<pb::PeerStatus>, at: u64, streams: u32) -> NodeStatus {
        NodeStatus {
            streams,
            last_report_unix: at,
            peers,
            ..Default::default()
        }
    }

    #[test]
    fn measure_takes_fresh_reports_and_finds_disconnected_unanswering_nodes_down() {
        let s = state();
        let mut st = BTreeMap::new();
        // a1 probes b1 (down) and c1 (up); c1 probes b1 (down).
        st.insert(
            "n-a1".to_owned(),
            status(vec![probe(3, 0, false), probe(4, 40, true)], NOW, 1),
        );
        st.insert("n-c1".to_owned(), status(vec![probe(3, 0, false)], NOW, 1));
        let m = measure(&s, &st, NOW);
        assert!(!m.link("a", "b").expect("measured").up);
        assert_eq!(m.link("a", "c").map(|l| l.latency_us), Some(40_000));
        assert!(
            m.is_down(&Member::Node("n-b1".into())),
            "b1 is not connected"
        );
        // Connected to the controller: not declared down.
        st.insert("n-b1".to_owned(), status(vec![], NOW, 1));
        assert!(!measure(&s, &st, NOW).is_down(&Member::Node("n-b1".into())));
        // Reports older than STALE_REPORT_SECS say nothing.
        let later = NOW + STALE_REPORT_SECS + 1;
        assert_eq!(measure(&s, &st, later), Measurements::default());
    }

    fn seen_at(key: u8, endpoint: &str) -> pb::PeerStatus {
        pb::PeerStatus {
            public_key: vec![key; 32],
            endpoint: endpoint.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_seen_from_other_sites_are_learnt_and_handed_to_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Controller::new(state(), Box::new(FileStore::new(dir.path())));
        let (a2, b1) = (
            c.subscribe("n-a2").expect("a2"),
            c.subscribe("n-b1").expect("b1"),
        );
        let endpoint_of_a1 = |rx: &watch::Receiver<Arc<NodeConfig>>| {
            rx.borrow().peers[&Key([1; 32])]
                .endpoint
                .map(|e| e.to_string())
        };
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.0.1:51820"));
        // a2 (same site) sees a1 on the LAN; b1 and c1 see it behind a NAT.
        let report = |id: &str, endpoint: &str| {
            c.report(
                id,
                pb::ReportRequest {
                    peers: vec![seen_at(1, endpoint)],
                    ..Default::default()
                },
            );
        };
        report("n-a2", "198.18.0.1:51820");
        report("n-b1", "198.18.9.1:40000");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.9.1:40000"));
        assert_eq!(
            endpoint_of_a1(&a2).as_deref(),
            Some("198.18.0.1:51820"),
            "a's own site keeps the LAN endpoint"
        );
        // A peer that has not heard from a1 yet does not outvote b1.
        report("n-c1", "198.18.0.1:51820");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.9.1:40000"));
        // Another site sees another port (symmetric NAT): nothing is handed
        // out, each peer keeps what a1's own packets taught it.
        report("n-c1", "198.18.9.1:40001");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.0.1:51820"));
        // Everyone sees it at its registered endpoint again: nothing learnt.
        report("n-c1", "198.18.0.1:51820");
        report("n-b1", "198.18.0.1:51820");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.0.1:51820"));
        assert!(c.lock().learnt.is_empty());
    }

    #[test]
    fn gateway_mode_configs_follow_the_measured_paths() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Controller::new(state(), Box::new(FileStore::new(dir.path())));
        let a2 = c.subscribe("n-a2").expect("a2 subscribes");
        let a1 = c.subscribe("n-a1").expect("a1 subscribes");
        let peers = |rx: &watch::Receiver<Arc<NodeConfig>>| -> Vec<String> {
            rx.borrow().peers.values().map(|p| p.name.clone()).collect()
        };
        assert_eq!(peers(&a2), ["a1", "b1", "c1"], "full mesh");
        c.mutate("topology", |s| {
            s.set_topology(TopologyConfig {
                mode: TopologyMode::Gateways,
                gateways: ["a1", "b1", "c1"].map(str::to_owned).into(),
                ..Default::default()
            })
        })
        .expect("topology set");
        assert_eq!(peers(&a2), ["a1"], "a plain member peers with its site");
        assert!(a1.borrow().forwarding, "the gateway forwards");
        let b1_v4 = {
            let inner = c.lock();
            inner.state.node("b1").expect("b1").ipv4
        };
        let routed_via = |rx: &watch::Receiver<Arc<NodeConfig>>| {
            let cfg = rx.borrow();
            cfg.peers
                .values()
                .find(|p| p.allowed_ips.iter().any(|n| n.contains(&IpAddr::V4(b1_v4))))
                .map(|p| p.name.clone())
        };
        assert_eq!(routed_via(&a1).as_deref(), Some("b1"));
        // a1 finds b1 unreachable, c1 reaches both: a relays b's traffic via c.
        let now = now_unix();
        c.report(
            "n-a1",
            pb::ReportRequest {
                peers: vec![probe(3, 0, false), probe(4, 40, true)],
                ..Default::default()
            },
        );
        c.report(
            "n-c1",
            pb::ReportRequest {
                peers: vec![probe(3, 50, true), probe(1, 40, true)],
                ..Default::default()
            },
        );
        assert!(now_unix() - now < STALE_REPORT_SECS);
        assert_eq!(routed_via(&a1).as_deref(), Some("c1"), "relayed via c");
        let trace = c
            .trace(&Member::Node("n-a2".into()), &Member::Node("n-b1".into()))
            .expect("trace");
        assert!(trace.delivered, "{trace}");
        let hops: Vec<&str> = trace.hops.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(hops, ["a2", "a1", "c1", "b1"], "{trace}");
        let routes = c.site_routes();
        let ab = routes
            .iter()
            .find(|t| t.from == "a" && t.to == "b")
            .expect("a -> b");
        assert!(ab.to_string().contains("relayed via c"), "{ab}");
    }
}
