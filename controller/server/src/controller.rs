//! The controller's live state: the validated model, its store, and the
//! watch channels that push each node its config. Every mutation is
//! computed on a copy, persisted, and only then made visible and pushed, so
//! an acknowledged change is durable and a failed one changes nothing.
//!
//! Two locks: mutations are serialised by the writer lock, held while the
//! next state is written to disk (and its audit record appended); readers,
//! reports and Watch streams take only the live lock, which holds an
//! immutable `Arc` of the last committed state and is never held across
//! disk I/O, so they never wait for an fsync.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use weft_controller_core::admin::{AuditRecord, escape};
use weft_controller_core::topology::{
    Fabric, Link, Measurements, MemberTrace, ProbeVote, SiteTrace, TopologyInput, TopologyMode,
    found_unreachable,
};
use weft_controller_core::{Error as CoreError, Member, Protected, State, netmap};
use weft_dataplane_core::{Key, NodeConfig};
use weft_proto::pb;
use weft_proto::report::{MAX_REPORT_PEERS, ReportError};

use crate::audit::{AuditError, AuditLog, Caller, current_caller};
use crate::store::{Store, StoreError};

/// What an API call can fail with, before it becomes a gRPC status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("the change could not be stored, nothing was changed: {0}")]
    Store(#[from] StoreError),
    #[error("the change could not be recorded in the audit log, nothing was changed: {0}")]
    Audit(#[from] AuditError),
}

/// Live, not persisted, status of a node from its agent.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeStatus {
    pub(crate) streams: u32,
    pub(crate) applied_revision: u64,
    pub(crate) last_report_unix: u64,
    pub(crate) apply_error: String,
    /// The reported peers that are in the node's config (the others are
    /// ignored).
    pub(crate) peers: Vec<pb::PeerStatus>,
    pub(crate) policy: Option<pb::PolicyStatus>,
    /// Report entries about keys not in the node's config, ignored so far,
    /// and when that was last logged as a warning (Unix seconds).
    pub(crate) ignored_total: u64,
    pub(crate) ignored_warned_unix: u64,
    /// Packets the node's tunnel dropped after decryption, per reason.
    pub(crate) tunnel_drops: Vec<pb::VerdictCounter>,
}

/// Ignored report entries are logged as a warning at most this often per
/// node (a forger's every report would otherwise be a log line).
const IGNORED_WARN_SECS: u64 = 60;

/// Most peers a report may list for a node whose config has `configured`:
/// twice that plus [`REPORT_PEER_SLACK`] (a report can race a config
/// change that shrank the peer set), at most [`MAX_REPORT_PEERS`].
pub(crate) fn report_peer_limit(configured: usize) -> usize {
    configured
        .saturating_mul(2)
        .saturating_add(REPORT_PEER_SLACK)
        .min(MAX_REPORT_PEERS)
}

/// See [`report_peer_limit`].
const REPORT_PEER_SLACK: usize = 256;

pub(crate) struct Controller {
    /// Serialises mutations; held across their disk writes.
    writer: Mutex<Writer>,
    /// The committed state and everything derived from it; held briefly,
    /// never across I/O.
    inner: Mutex<Inner>,
    /// When join tokens were last pruned (Unix seconds).
    pruned_unix: AtomicU64,
    /// The revision of the state, sent after every change (config streams
    /// watch it to end when their certificate is no longer accepted).
    changes: watch::Sender<u64>,
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

/// Reports trigger a re-measure at most this often (the 1 s tick catches
/// what falls in between): with many nodes reporting at once, re-measuring
/// on each report would keep the live lock busy and delay readers.
const REPORT_REMEASURE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Latency changes alone recompute the paths at most this often;
/// reachability changes (a link or a gateway down or back) at once.
const LATENCY_RECOMPUTE_SECS: u64 = 5;

/// What only mutations touch: the store and the audit log.
struct Writer {
    store: Box<dyn Store + Send>,
    audit: Option<AuditLog>,
}

struct Inner {
    /// The last committed state (immutable; replaced whole by mutations).
    state: Arc<State>,
    /// Latest config per node; agents' Watch streams subscribe to these.
    configs: BTreeMap<String, watch::Sender<Arc<NodeConfig>>>,
    /// Per node, the number of Watch streams opened so far: a new stream
    /// ends the older ones (one stream per node).
    watch_epochs: BTreeMap<String, watch::Sender<u64>>,
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
    /// When a report last triggered a re-measure.
    report_remeasured: Option<std::time::Instant>,
}

/// Unix time now, in seconds.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs blocking work (disk I/O) from async code without stalling the
/// runtime's worker: on a multi-threaded runtime the worker hands its other
/// tasks to another thread meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave the state half-changed
    // (mutations run on a copy), so a poisoned lock is safe to reuse.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Controller {
    #[cfg(test)]
    pub(crate) fn new(state: State, store: Box<dyn Store + Send>) -> Controller {
        Controller::with_audit(state, store, None)
    }

    /// A controller whose admin changes are recorded in `audit`.
    pub(crate) fn with_audit(
        state: State,
        store: Box<dyn Store + Send>,
        audit: Option<AuditLog>,
    ) -> Controller {
        let mut inner = Inner {
            state: Arc::new(state),
            configs: BTreeMap::new(),
            watch_epochs: BTreeMap::new(),
            status: BTreeMap::new(),
            base: BTreeMap::new(),
            fabric: None,
            measurements: Measurements::default(),
            measured_unix: 0,
            learnt: BTreeMap::new(),
            controller_addrs: BTreeSet::new(),
            withheld: BTreeMap::new(),
            report_remeasured: None,
        };
        inner.publish();
        let (changes, _) = watch::channel(inner.state.revision());
        let c = Controller {
            writer: Mutex::new(Writer { store, audit }),
            inner: Mutex::new(inner),
            pruned_unix: AtomicU64::new(0),
            changes,
        };
        c.prune_tokens(now_unix());
        c
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// The last committed state.
    pub(crate) fn snapshot(&self) -> Arc<State> {
        self.lock().state.clone()
    }

    /// Reads the state.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&State, &BTreeMap<String, NodeStatus>) -> T) -> T {
        let inner = self.lock();
        f(&inner.state, &inner.status)
    }

    /// Applies `f` to a copy of the state, persists the copy, then makes it
    /// current and pushes changed configs to the agents. Called for an
    /// admin (inside the admin gate), the change or its refusal is recorded
    /// in the audit log first, with `what` as its summary.
    pub(crate) fn mutate<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut State) -> Result<T, CoreError>,
    ) -> Result<T, ApiError> {
        let caller = current_caller();
        blocking(|| self.mutate_as(caller.as_ref(), what, f))
    }

    /// [`Controller::mutate`] on behalf of `caller` (recorded if `Some`).
    pub(crate) fn mutate_as<T>(
        &self,
        caller: Option<&Caller>,
        what: &str,
        f: impl FnOnce(&mut State) -> Result<T, CoreError>,
    ) -> Result<T, ApiError> {
        let mut writer = lock(&self.writer);
        // Only mutations replace the state, and they hold the writer lock:
        // this snapshot stays the current state until we replace it.
        let current = self.snapshot();
        let mut next = State::clone(&current);
        let record = |revision: u64, outcome: String| {
            caller.map(|c| AuditRecord {
                unix: now_unix(),
                credential: c.credential.clone(),
                rpc: c.rpc.clone(),
                summary: escape(what),
                revision,
                outcome,
            })
        };
        let out = match f(&mut next) {
            Ok(out) => out,
            Err(e) => {
                if let (Some(r), Some(log)) = (
                    record(
                        current.revision(),
                        format!("refused: {}", escape(&e.to_string())),
                    ),
                    writer.audit.as_mut(),
                ) && let Err(a) = log.append(&r)
                {
                    warn!(error = %a, "recording a refused admin change in the audit log failed");
                }
                return Err(e.into());
            }
        };
        if next.revision() == current.revision() {
            return Ok(out);
        }
        // The record first: a crash before the state is stored leaves a
        // record of a change that did not happen (noted at the next
        // start-up), never a change without its record.
        if let (Some(r), Some(log)) = (
            record(next.revision(), "ok".to_owned()),
            writer.audit.as_mut(),
        ) {
            log.append(&r)?;
        }
        writer.store.save(&next)?;
        let mut inner = self.lock();
        inner.state = Arc::new(next);
        info!(
            revision = inner.state.revision(),
            change = what,
            "state changed"
        );
        inner.publish();
        self.changes.send_replace(inner.state.revision());
        drop(writer);
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

    /// Resolves, with the reason, once the client certificate with this
    /// fingerprint no longer authenticates its node: replaced by a renewal
    /// or a retried registration, expired, or the node deleted. Checked
    /// after every state change and at the certificate's expiry.
    pub(crate) fn until_refused(
        self: &Arc<Self>,
        fingerprint: [u8; 32],
    ) -> impl Future<Output = String> + Send + 'static {
        let controller = Arc::clone(self);
        let mut changes = self.changes.subscribe();
        async move {
            loop {
                let now = now_unix();
                let expires = match controller
                    .read(|s, _| s.authenticate(&fingerprint, now).map(|u| u.expires_unix()))
                {
                    Ok(e) => e,
                    Err(e) => {
                        info!(reason = %e, "ending a config stream: its certificate is no longer accepted");
                        return e.to_string();
                    }
                };
                // Certificates without a recorded expiry are looked at
                // again after a day, like any other, on every change.
                let wait = if expires == 0 {
                    86_400
                } else {
                    expires.saturating_sub(now).clamp(1, 86_400)
                };
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return "the controller is shutting down".to_owned();
                        }
                    }
                    () = tokio::time::sleep(std::time::Duration::from_secs(wait)) => {}
                }
            }
        }
    }

    /// Subscribes to a node's config. A node has one Watch stream: the
    /// returned future resolves when a newer stream of the same node
    /// replaces this one (or the node is deleted), and the stream should
    /// then end.
    pub(crate) fn subscribe(
        &self,
        node_id: &str,
    ) -> Option<(
        watch::Receiver<Arc<NodeConfig>>,
        impl Future<Output = ()> + Send + 'static,
    )> {
        let mut inner = self.lock();
        let rx = inner.configs.get(node_id).map(|tx| tx.subscribe())?;
        let epochs = inner
            .watch_epochs
            .entry(node_id.to_string())
            .or_insert_with(|| watch::channel(0).0);
        epochs.send_modify(|e| *e += 1);
        let mut epoch_rx = epochs.subscribe();
        let mine = *epoch_rx.borrow_and_update();
        inner.status.entry(node_id.to_string()).or_default().streams += 1;
        let replaced = async move {
            // Err: the node was deleted (its config stream ends too).
            let _ = epoch_rx.wait_for(|e| *e != mine).await;
        };
        Some((rx, replaced))
    }

    /// Notes that a node's Watch stream ended.
    pub(crate) fn unsubscribe(&self, node_id: &str) {
        let mut inner = self.lock();
        if let Some(s) = inner.status.get_mut(node_id) {
            s.streams = s.streams.saturating_sub(1);
        }
    }

    /// Records an agent's report (already checked by
    /// `weft_proto::report::check_report`): refused whole when it lists
    /// more peers than [`report_peer_limit`] allows for the node's config;
    /// otherwise only the entries about peers in the node's current config
    /// are kept (the others are counted and ignored).
    pub(crate) fn report(
        &self,
        node_id: &str,
        mut report: pb::ReportRequest,
    ) -> Result<(), ReportError> {
        let mut inner = self.lock();
        let configured: BTreeSet<Key> = inner
            .configs
            .get(node_id)
            .map(|tx| tx.borrow().peers.keys().copied().collect())
            .unwrap_or_default();
        let limit = report_peer_limit(configured.len());
        if report.peers.len() > limit {
            return Err(ReportError::TooManyPeers {
                count: report.peers.len(),
                limit,
                why: format!(
                    " (twice the {} peers of this node's config, plus {REPORT_PEER_SLACK})",
                    configured.len()
                ),
            });
        }
        let listed = report.peers.len();
        report
            .peers
            .retain(|p| Key::from_slice(&p.public_key).is_ok_and(|k| configured.contains(&k)));
        let ignored = listed - report.peers.len();
        let now = now_unix();
        let s = inner.status.entry(node_id.to_string()).or_default();
        s.ignored_total = s
            .ignored_total
            .saturating_add(u64::try_from(ignored).unwrap_or(u64::MAX));
        if ignored > 0 {
            if now.saturating_sub(s.ignored_warned_unix) >= IGNORED_WARN_SECS {
                s.ignored_warned_unix = now;
                warn!(node = %node_id, ignored, ignored_total = s.ignored_total,
                      "report lists peers that are not in the node's config; ignoring them (logged at most once a minute)");
            } else {
                debug!(node = %node_id, ignored, "report entries about unconfigured peers ignored");
            }
        }
        s.applied_revision = report.applied_revision;
        s.apply_error = report.apply_error;
        s.peers = report.peers;
        s.policy = report.policy;
        s.tunnel_drops = report.tunnel_drops;
        s.last_report_unix = now;
        let at = std::time::Instant::now();
        if inner
            .report_remeasured
            .is_none_or(|t| at.duration_since(t) >= REPORT_REMEASURE_EVERY)
        {
            inner.report_remeasured = Some(at);
            inner.remeasure(now);
        }
        Ok(())
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
        self.watch_epochs.retain(|id, _| configs.contains_key(id));
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
        && a.hosted == b.hosted
        && a.key_generation == b.key_generation
}

/// Endpoints of nodes as the fresh reports of members of other sites see
/// them (the address their packets come from), where that differs from the
/// registered endpoint: a node behind NAT announces an address only its
/// LAN can reach, and its own handshakes show peers where its NAT maps it.
///
/// A mapping is learnt (`Some(e)`) when at least
/// [`ENDPOINT_WITNESSES`] reporters in other sites see the node at `e`
/// and none at another address other than the registered one: a single
/// node cannot hand its peers a false endpoint for another. It is
/// forgotten (`None`) when reporters disagree, or when every
/// reporter shows the registered endpoint, or when a lone reporter's
/// observation is contradicted by another reporter showing the registered
/// one. Otherwise (one reporter alone, or nobody reporting) nothing
/// changes and the node is left out. Reports list each peer once and
/// only peers of the reporter's config (`Controller::report`).
fn learn_endpoints(
    state: &State,
    statuses: &BTreeMap<String, NodeStatus>,
    now: u64,
) -> BTreeMap<String, Option<SocketAddr>> {
    let by_key: BTreeMap<&[u8], &weft_controller_core::Node> = state
        .nodes()
        .map(|n| (n.public_key.0.as_slice(), n))
        .collect();
    // Per node: what each reporter in another site sees.
    let mut votes: BTreeMap<&str, BTreeMap<&str, SocketAddr>> = BTreeMap::new();
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
            votes
                .entry(node.id.as_str())
                .or_default()
                .entry(reporter.id.as_str())
                .or_insert(seen);
        }
    }
    votes
        .into_iter()
        .filter_map(|(id, by_reporter)| {
            // Peers that have not heard from the node yet still show the
            // registered endpoint: two others agreeing outvote them. If
            // peers see the node at different addresses, its NAT maps each
            // destination apart (symmetric NAT): no single endpoint works
            // for everyone, so none is handed out and each peer keeps the
            // one it learnt from the node's own packets.
            let registered = state.node_by_id(id).and_then(|n| n.endpoint);
            let at_registered = by_reporter
                .values()
                .filter(|e| Some(**e) == registered)
                .count();
            let mut seen: BTreeMap<SocketAddr, usize> = BTreeMap::new();
            for e in by_reporter.values().filter(|e| Some(**e) != registered) {
                *seen.entry(*e).or_default() += 1;
            }
            let verdict = match seen.len() {
                0 => Some(None),
                1 => {
                    let (e, witnesses) = seen.into_iter().next()?;
                    if witnesses >= ENDPOINT_WITNESSES {
                        Some(Some(e))
                    } else if at_registered > 0 {
                        Some(None)
                    } else {
                        None
                    }
                }
                _ => Some(None),
            };
            verdict.map(|v| (id.to_owned(), v))
        })
        .collect()
}

/// Reporters in other sites that must see a node at one address for it to
/// be handed out as the node's endpoint.
const ENDPOINT_WITNESSES: usize = 2;

/// What the agents' fresh reports (the last [`STALE_REPORT_SECS`]) say:
/// site links from their probes, one vote per reporter
/// ([`Measurements::from_votes`]), and the nodes found down: those whose
/// agent is not connected and that more reporters find unreachable than
/// reachable.
fn measure(state: &State, statuses: &BTreeMap<String, NodeStatus>, now: u64) -> Measurements {
    let by_key: BTreeMap<&[u8], (&str, &str)> = state
        .nodes()
        .map(|n| (n.public_key.0.as_slice(), (n.id.as_str(), n.site.as_str())))
        .collect();
    let fresh = statuses
        .iter()
        .filter(|(_, st)| now.saturating_sub(st.last_report_unix) <= STALE_REPORT_SECS)
        .filter_map(|(id, st)| state.node_by_id(id).map(|n| (n, st)));
    let mut votes = Vec::new();
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
            let link = if probe.reachable && probe.rtt_us > 0 {
                Link {
                    latency_us: u32::try_from(probe.rtt_us).unwrap_or(u32::MAX),
                    loss_ppm: probe.loss_permille.min(1000).saturating_mul(1000),
                    up: true,
                }
            } else {
                Link::down()
            };
            votes.push(ProbeVote {
                reporter: n.id.clone(),
                reporter_site: n.site.clone(),
                peer: (*peer_id).to_owned(),
                peer_site: (*peer_site).to_owned(),
                link,
            });
        }
    }
    let mut m = Measurements::from_votes(&votes);
    for id in found_unreachable(&votes) {
        let connected = statuses.get(&id).is_some_and(|s| s.streams > 0);
        if !connected {
            m.set_down(Member::Node(id), true);
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
                cert_expires_unix: 0,
                csr_key: [k; 32],
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
            c.subscribe("n-a2").expect("a2").0,
            c.subscribe("n-b1").expect("b1").0,
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
            )
            .expect("report accepted");
            // Reports re-measure at most every 250 ms; the tick always.
            c.tick();
        };
        report("n-a2", "198.18.0.1:51820");
        report("n-b1", "198.18.9.1:40000");
        assert_eq!(
            endpoint_of_a1(&b1).as_deref(),
            Some("198.18.0.1:51820"),
            "one reporter alone teaches nothing"
        );
        report("n-c1", "198.18.9.1:40000");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.9.1:40000"));
        assert_eq!(
            endpoint_of_a1(&a2).as_deref(),
            Some("198.18.0.1:51820"),
            "a's own site keeps the LAN endpoint"
        );
        // Another site sees another port (symmetric NAT): nothing is handed
        // out, each peer keeps what a1's own packets taught it.
        report("n-c1", "198.18.9.1:40001");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.0.1:51820"));
        // Learnt again, then one reporter sees the registered endpoint: a
        // lone witness left does not keep the mapping.
        report("n-c1", "198.18.9.1:40000");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.9.1:40000"));
        report("n-c1", "198.18.0.1:51820");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.0.1:51820"));
        // Everyone sees it at its registered endpoint again: nothing learnt.
        report("n-b1", "198.18.0.1:51820");
        assert_eq!(endpoint_of_a1(&b1).as_deref(), Some("198.18.0.1:51820"));
        assert!(c.lock().learnt.is_empty());
    }

    #[test]
    fn one_node_cannot_set_another_nodes_endpoint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Controller::new(state(), Box::new(FileStore::new(dir.path())));
        let a2 = c.subscribe("n-a2").expect("a2").0;
        let forged = || pb::ReportRequest {
            peers: vec![
                seen_at(1, "198.18.66.6:6666"),
                seen_at(3, "198.18.66.6:6667"),
            ],
            ..Default::default()
        };
        // c1 claims a1 and b1 behind addresses of its choosing, over and over.
        for _ in 0..10 {
            c.report("n-c1", forged()).expect("report accepted");
        }
        c.tick();
        assert!(c.lock().learnt.is_empty(), "one witness is not enough");
        // a2 (same site as a1) cannot vouch for a1: it reaches a1 on its LAN.
        c.report(
            "n-a2",
            pb::ReportRequest {
                peers: vec![
                    seen_at(1, "198.18.66.6:6666"),
                    seen_at(3, "198.18.66.6:6667"),
                ],
                ..Default::default()
            },
        )
        .expect("report accepted");
        // Reports re-measure at most every 250 ms; the tick always.
        c.tick();
        let learnt = c.lock().learnt.clone();
        assert_eq!(
            learnt.keys().collect::<Vec<_>>(),
            ["n-b1"],
            "a2 and c1 are two witnesses from other sites for b1, none for a1"
        );
        assert_eq!(
            a2.borrow().peers[&Key([3; 32])].endpoint,
            Some("198.18.66.6:6667".parse().expect("addr"))
        );
    }

    #[test]
    fn reports_count_only_configured_peers_and_are_size_capped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Controller::new(state(), Box::new(FileStore::new(dir.path())));
        // c1's config has a1, a2 and b1; it also reports on keys 9 and 10.
        c.report(
            "n-c1",
            pb::ReportRequest {
                peers: vec![probe(1, 5, true), probe(9, 1, true), probe(10, 1, true)],
                ..Default::default()
            },
        )
        .expect("report accepted");
        let (kept, ignored) = {
            let inner = c.lock();
            let st = &inner.status["n-c1"];
            (st.peers.len(), st.ignored_total)
        };
        assert_eq!((kept, ignored), (1, 2));
        // Over twice the config's 3 peers plus the slack: refused whole,
        // nothing recorded.
        let limit = report_peer_limit(3);
        assert_eq!(limit, 262);
        let many: Vec<pb::PeerStatus> = (0..=limit)
            .map(|i| pb::PeerStatus {
                public_key: {
                    let mut k = vec![200; 32];
                    k[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    k
                },
                ..Default::default()
            })
            .collect();
        let e = c
            .report(
                "n-c1",
                pb::ReportRequest {
                    peers: many,
                    applied_revision: 99,
                    ..Default::default()
                },
            )
            .expect_err("too many peers");
        assert!(e.is_limit());
        assert!(e.to_string().contains("over the limit of 262"), "{e}");
        assert_eq!(c.lock().status["n-c1"].applied_revision, 0);
    }

    #[test]
    fn gateway_mode_configs_follow_the_measured_paths() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Controller::new(state(), Box::new(FileStore::new(dir.path())));
        let a2 = c.subscribe("n-a2").expect("a2 subscribes").0;
        let a1 = c.subscribe("n-a1").expect("a1 subscribes").0;
        // b1's agent is connected: a1's word alone (b1 unreachable) cuts the
        // a-b link but cannot mark b1 down.
        let _b1 = c.subscribe("n-b1").expect("b1 subscribes");
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
        )
        .expect("report accepted");
        c.report(
            "n-c1",
            pb::ReportRequest {
                peers: vec![probe(3, 50, true), probe(1, 40, true)],
                ..Default::default()
            },
        )
        .expect("report accepted");
        c.tick();
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

    #[test]
    fn a_forging_gateway_cannot_pull_traffic_through_its_site() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Controller::new(state(), Box::new(FileStore::new(dir.path())));
        let a1 = c.subscribe("n-a1").expect("a1 subscribes").0;
        c.mutate("topology", |s| {
            s.set_topology(TopologyConfig {
                mode: TopologyMode::Gateways,
                gateways: ["a1", "b1", "c1"].map(str::to_owned).into(),
                ..Default::default()
            })
        })
        .expect("topology set");
        let report = |id: &str, peers: Vec<pb::PeerStatus>| {
            c.report(
                id,
                pb::ReportRequest {
                    peers,
                    ..Default::default()
                },
            )
            .expect("report accepted");
        };
        // Honest: a-b 30 ms, a-c 40 ms, b-c 50 ms.
        report("n-a1", vec![probe(3, 30, true), probe(4, 40, true)]);
        report("n-b1", vec![probe(1, 30, true), probe(4, 50, true)]);
        // c1 claims a1 and b1 a microsecond away, a thousand times each,
        // and a2 (not its peer in gateway mode) unreachable.
        let fast = |k: u8| pb::PeerStatus {
            public_key: vec![k; 32],
            probe: Some(pb::PeerProbe {
                rtt_us: 1,
                loss_permille: 0,
                reachable: true,
                samples: 20,
            }),
            ..Default::default()
        };
        let mut forged: Vec<pb::PeerStatus> = (0..1000).flat_map(|_| [fast(1), fast(3)]).collect();
        forged.truncate(report_peer_limit(2) - 1);
        forged.push(probe(2, 0, false));
        report("n-c1", forged);
        let routes = c.site_routes();
        let ab = routes
            .iter()
            .find(|t| t.from == "a" && t.to == "b")
            .expect("a -> b");
        assert!(ab.to_string().contains("direct"), "{ab}");
        let inner = c.lock();
        assert_eq!(
            inner.measurements.link("a", "c").map(|l| l.latency_us),
            Some(40_000),
            "two reporters: the higher latency counts"
        );
        assert!(!inner.measurements.is_down(&Member::Node("n-a2".into())));
        drop(inner);
        let b1_v4 = c.lock().state.node("b1").expect("b1").ipv4;
        let via = a1
            .borrow()
            .peers
            .values()
            .find(|p| p.allowed_ips.iter().any(|n| n.contains(&IpAddr::V4(b1_v4))))
            .map(|p| p.name.clone());
        assert_eq!(
            via.as_deref(),
            Some("b1"),
            "a1 sends b's traffic to b1 directly"
        );
    }

    /// A store whose save waits until the test lets it finish.
    struct GatedStore {
        entered: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl Store for GatedStore {
        fn load(&self) -> Result<Option<State>, StoreError> {
            Ok(None)
        }
        fn save(&mut self, _state: &State) -> Result<(), StoreError> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            Ok(())
        }
    }

    #[test]
    fn readers_reports_and_watches_never_wait_for_a_disk_write() {
        use std::sync::mpsc;
        use std::time::Duration;
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let store = GatedStore {
            entered: entered_tx,
            release: release_rx,
        };
        let c = Arc::new(Controller::new(state(), Box::new(store)));
        let before = c.read(|s, _| s.revision());
        let writer = {
            let c = c.clone();
            std::thread::spawn(move || c.mutate("site=d", |s| s.create_site("d", NOW).map(|_| ())))
        };
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the mutation reached the store");
        // The write is now blocked inside the store: everything else must
        // still answer, from the last committed state.
        let (done_tx, done) = mpsc::channel();
        {
            let c = c.clone();
            std::thread::spawn(move || {
                let revision = c.read(|s, _| s.revision());
                c.report(
                    "n-a1",
                    pb::ReportRequest {
                        applied_revision: 5,
                        ..Default::default()
                    },
                )
                .expect("report accepted");
                let subscribed = c.subscribe("n-b1").is_some();
                let reported = c.read(|_, st| st.get("n-a1").map(|s| s.applied_revision));
                let _ = done_tx.send((revision, subscribed, reported));
            });
        }
        let (revision, subscribed, reported) = done
            .recv_timeout(Duration::from_secs(10))
            .expect("read, report and subscribe must not wait for the disk write");
        assert_eq!(revision, before, "readers see the committed state");
        assert!(subscribed);
        assert_eq!(reported, Some(5));
        release.send(()).expect("release the write");
        writer
            .join()
            .expect("writer thread")
            .expect("the mutation succeeds");
        assert_eq!(
            c.read(|s, _| s.revision()),
            before + 1,
            "then it is visible"
        );
    }

    #[test]
    fn admin_changes_and_refusals_are_audited_before_they_are_stored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, _) = crate::audit::AuditLog::open(dir.path(), 100).expect("audit log");
        let c = Controller::with_audit(state(), Box::new(FileStore::new(dir.path())), Some(log));
        let ops = Caller {
            credential: "ops".into(),
            role: weft_controller_core::admin::Role::Admin,
            rpc: "SetNodeLabels".into(),
        };
        let set = weft_controller_core::Labels::from([("role".to_owned(), "web".to_owned())]);
        c.mutate_as(Some(&ops), "node=a1 set role=web\u{1b}[2J", |s| {
            s.set_node_labels("a1", &set, &[])
        })
        .expect("labelled");
        let revision = c.read(|s, _| s.revision());
        c.mutate_as(Some(&ops), "node=zz", |s| {
            s.set_node_labels("zz", &set, &[])
        })
        .expect_err("no such node");
        c.mutate_as(None, "site=e", |s| s.create_site("e", NOW).map(|_| ()))
            .expect("an agent-side change");
        let records = crate::audit::read(dir.path(), 0).expect("readable");
        assert_eq!(records.len(), 2, "{records:#?}");
        assert_eq!(records[0].credential, "ops");
        assert_eq!(records[0].rpc, "SetNodeLabels");
        assert_eq!(
            records[0].summary, "node=a1 set role=web\\x1b[2J",
            "escaped"
        );
        assert_eq!(
            (records[0].revision, records[0].outcome.as_str()),
            (revision, "ok")
        );
        assert_eq!(records[1].revision, revision, "a refusal changes nothing");
        assert!(
            records[1]
                .outcome
                .starts_with("refused: node \"zz\" not found"),
            "{}",
            records[1].outcome
        );
    }

    #[tokio::test]
    async fn a_new_watch_stream_ends_the_older_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Controller::new(state(), Box::new(FileStore::new(dir.path())));
        let (_rx1, replaced1) = c.subscribe("n-a1").expect("a1");
        let (_rx2, replaced2) = c.subscribe("n-a1").expect("a1 again");
        let (_rx3, replaced3) = c.subscribe("n-b1").expect("b1");
        tokio::time::timeout(std::time::Duration::from_secs(5), replaced1)
            .await
            .expect("the first stream is told to end");
        let pending = |f| tokio::time::timeout(std::time::Duration::from_millis(50), f);
        assert!(pending(replaced2).await.is_err(), "the newest stream stays");
        assert!(
            pending(replaced3).await.is_err(),
            "other nodes are not affected"
        );
    }
}
