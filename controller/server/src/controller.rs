//! The controller's live state: the validated model, its store, and the
//! watch channels that push each node its config. Every mutation is
//! computed on a copy, persisted, and only then made visible and pushed, so
//! an acknowledged change is durable and a failed one changes nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::{info, warn};
use weft_controller_core::{Error as CoreError, State, netmap};
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
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

struct Inner {
    state: State,
    store: Box<dyn Store + Send>,
    /// Latest config per node; agents' Watch streams subscribe to these.
    configs: BTreeMap<String, watch::Sender<Arc<NodeConfig>>>,
    status: BTreeMap<String, NodeStatus>,
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
        };
        inner.publish();
        Controller {
            inner: Mutex::new(inner),
        }
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
    /// Recomputes every node's config and pushes those whose content
    /// changed; drops the channels of deleted nodes (their streams end).
    fn publish(&mut self) {
        let configs = netmap::all_node_configs(&self.state);
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
}
