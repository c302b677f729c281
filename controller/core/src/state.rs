//! The desired state of the whole network and its validated mutations.
//!
//! Every mutation checks everything before it changes anything, so a
//! refused mutation leaves the state exactly as it was; a successful one
//! bumps the revision.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use weft_dataplane_core::Key;

use crate::admin::AdminToken;
use crate::error::Error;
use crate::guard::{Protected, Shield, check_safe};
use crate::ipam::{self, Ipam};
use crate::model::{
    ExternalPeer, JoinToken, Labels, MAX_ADVERTISED, Member, NetworkSettings, Node, PendingPrefix,
    Registration, Site, TokenGrants, check_id, check_labels, check_min_prefix_lens, check_name,
    check_prefix,
};
use crate::policy::{Endpoint, Policy, to_yaml};
use crate::topology::config::TopologyConfig;

mod admin_tokens;

/// Longest join token lifetime: 30 days.
pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 86_400;

/// How long expired join tokens are kept (listed as expired) before
/// [`State::prune_tokens`] forgets them: 7 days.
pub const TOKEN_KEEP_SECS: u64 = 7 * 86_400;

/// How long after a registration the same agent (same name and WireGuard
/// key, same token, a request signed by the same key) may register again
/// and get the same node: a retry after a lost reply.
pub const REGISTER_RETRY_SECS: u64 = 600;

mod credentials;
pub use credentials::{
    CertRefused, CertUse, DEFAULT_CERT_TTL_SECS, MAX_CERT_TTL_SECS, MIN_CERT_TTL_SECS,
    check_cert_ttl,
};

/// The desired state of the network, persisted as a whole by the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    revision: u64,
    settings: NetworkSettings,
    sites: BTreeMap<String, Site>,
    /// By node id.
    nodes: BTreeMap<String, Node>,
    /// By name.
    external_peers: BTreeMap<String, ExternalPeer>,
    /// By token id.
    tokens: BTreeMap<String, JoinToken>,
    ipam: Ipam,
    /// Network policies, by name (absent in stores written before policy).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    policies: BTreeMap<String, Policy>,
    /// Topology mode, gateways, site tags and residency rules (absent in
    /// stores written before topology modes: full mesh).
    #[serde(default, skip_serializing_if = "TopologyConfig::is_default")]
    topology: TopologyConfig,
    /// Admin tokens by name, revoked ones included (absent in stores
    /// written before named admin tokens).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    admin_tokens: BTreeMap<String, AdminToken>,
}

/// What [`State::apply_policies`] did, each list sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyChanges {
    /// Policies that did not exist.
    pub created: Vec<String>,
    /// Policies that existed with different content.
    pub updated: Vec<String>,
    /// Policies that existed with the same content.
    pub unchanged: Vec<String>,
}

impl State {
    /// An empty network at revision 0; refuses settings that cannot work.
    pub fn new(settings: NetworkSettings) -> Result<Self, Error> {
        settings.validate()?;
        Ok(State {
            revision: 0,
            settings,
            sites: BTreeMap::new(),
            nodes: BTreeMap::new(),
            external_peers: BTreeMap::new(),
            tokens: BTreeMap::new(),
            ipam: Ipam::default(),
            policies: BTreeMap::new(),
            topology: TopologyConfig::default(),
            admin_tokens: BTreeMap::new(),
        })
    }

    /// The revision, bumped by every successful mutation.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The network-wide settings.
    pub fn settings(&self) -> &NetworkSettings {
        &self.settings
    }

    /// The address allocations.
    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// Sets the shortest workload prefixes accepted (IPv4, IPv6); returns
    /// whether they changed (the revision is bumped only then). Approved
    /// prefixes now shorter stay recorded but are left out of every config
    /// ([`State::publishable`]).
    pub fn set_min_prefix_lens(&mut self, v4: u8, v6: u8) -> Result<bool, Error> {
        check_min_prefix_lens(v4, v6)?;
        if (
            self.settings.min_prefix_len_v4,
            self.settings.min_prefix_len_v6,
        ) == (v4, v6)
        {
            return Ok(false);
        }
        self.settings.min_prefix_len_v4 = v4;
        self.settings.min_prefix_len_v6 = v6;
        self.revision += 1;
        Ok(true)
    }

    // ---- sites ----

    /// Creates an empty site.
    pub fn create_site(&mut self, name: &str, now: u64) -> Result<&Site, Error> {
        check_name("site", name)?;
        match self.sites.entry(name.to_owned()) {
            Entry::Occupied(_) => Err(Error::SiteExists(name.to_owned())),
            Entry::Vacant(slot) => {
                self.revision += 1;
                Ok(slot.insert(Site {
                    name: name.to_owned(),
                    created_unix: now,
                }))
            }
        }
    }

    /// Deletes an empty site and all its join tokens (a used token of an
    /// empty site has no member left to account for).
    pub fn delete_site(&mut self, name: &str) -> Result<(), Error> {
        if !self.sites.contains_key(name) {
            return Err(Error::SiteNotFound(name.to_owned()));
        }
        let nodes = self.nodes.values().filter(|n| n.site == name).count();
        let external_peers = self
            .external_peers
            .values()
            .filter(|p| p.site == name)
            .count();
        if nodes > 0 || external_peers > 0 {
            return Err(Error::SiteNotEmpty {
                name: name.to_owned(),
                nodes,
                external_peers,
            });
        }
        self.sites.remove(name);
        self.tokens.retain(|_, t| t.site != name);
        self.topology.site_tags.remove(name);
        self.revision += 1;
        Ok(())
    }

    /// All sites, by name.
    pub fn sites(&self) -> impl Iterator<Item = &Site> {
        self.sites.values()
    }

    /// The site with this name.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.get(name)
    }

    // ---- join tokens ----

    /// Creates a join token for `site`, valid for `ttl_secs` from `now`,
    /// granting nothing beyond the site.
    pub fn create_token(
        &mut self,
        id: &str,
        secret_hash: [u8; 32],
        site: &str,
        now: u64,
        ttl_secs: u64,
    ) -> Result<&JoinToken, Error> {
        self.create_token_with_grants(id, secret_hash, site, now, ttl_secs, TokenGrants::default())
    }

    /// Creates a join token for `site`, valid for `ttl_secs` from `now`,
    /// whose node gets `grants`: its labels, and the prefixes its agent may
    /// advertise without approval (each a routable network; their safety
    /// is checked when advertised).
    pub fn create_token_with_grants(
        &mut self,
        id: &str,
        secret_hash: [u8; 32],
        site: &str,
        now: u64,
        ttl_secs: u64,
        grants: TokenGrants,
    ) -> Result<&JoinToken, Error> {
        check_id("join token id", id)?;
        check_labels(&grants.labels)?;
        let allow_prefixes = check_allowed_prefixes(grants.allow_prefixes)?;
        if !self.sites.contains_key(site) {
            return Err(Error::SiteNotFound(site.to_owned()));
        }
        if !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl_secs) {
            return Err(Error::InvalidTokenTtl(ttl_secs));
        }
        match self.tokens.entry(id.to_owned()) {
            Entry::Occupied(_) => Err(Error::TokenExists(id.to_owned())),
            Entry::Vacant(slot) => {
                self.revision += 1;
                Ok(slot.insert(JoinToken {
                    id: id.to_owned(),
                    site: site.to_owned(),
                    secret_hash,
                    created_unix: now,
                    expires_unix: now.saturating_add(ttl_secs),
                    used_by: None,
                    labels: grants.labels,
                    allow_prefixes,
                }))
            }
        }
    }

    /// Deletes a join token, used or not.
    pub fn delete_token(&mut self, id: &str) -> Result<(), Error> {
        self.tokens
            .remove(id)
            .ok_or_else(|| Error::TokenNotFound(id.to_owned()))?;
        self.revision += 1;
        Ok(())
    }

    /// Forgets the join tokens that can no longer matter: expired more
    /// than [`TOKEN_KEEP_SECS`] ago and either unused or used by a node
    /// that is gone (a used token of a live node stays: it says how the
    /// node joined). Returns their ids; bumps the revision if any.
    pub fn prune_tokens(&mut self, now: u64) -> Vec<String> {
        let gone: Vec<String> = self
            .tokens
            .values()
            .filter(|t| now >= t.expires_unix.saturating_add(TOKEN_KEEP_SECS))
            .filter(|t| {
                t.used_by
                    .as_ref()
                    .is_none_or(|n| !self.nodes.contains_key(n))
            })
            .map(|t| t.id.clone())
            .collect();
        for id in &gone {
            self.tokens.remove(id);
        }
        if !gone.is_empty() {
            self.revision += 1;
        }
        gone
    }

    /// All join tokens, by id.
    pub fn tokens(&self) -> impl Iterator<Item = &JoinToken> {
        self.tokens.values()
    }

    /// The join token with this id.
    pub fn token(&self, id: &str) -> Option<&JoinToken> {
        self.tokens.get(id)
    }

    // ---- nodes ----

    /// Enrols a node with a join token: checks the token (single use, not
    /// expired, secret matches), that the labels the agent asked for are
    /// granted by the token, the name, key and certificate, then allocates
    /// its addresses. The node's labels and allowed prefixes are the
    /// token's. All or nothing.
    pub fn register_node(&mut self, reg: Registration, now: u64) -> Result<&Node, Error> {
        let token = self
            .tokens
            .get(&reg.token_id)
            .filter(|t| hashes_equal(&t.secret_hash, &reg.secret_hash))
            .ok_or_else(|| Error::TokenInvalid(reg.token_id.clone()))?;
        if let Some(node) = &token.used_by {
            if self.is_retry(&reg, now) {
                return self.redo_registration(reg);
            }
            return Err(Error::TokenUsed {
                id: token.id.clone(),
                node: node.clone(),
            });
        }
        if now >= token.expires_unix {
            return Err(Error::TokenExpired {
                id: token.id.clone(),
                expires_unix: token.expires_unix,
            });
        }
        let site = token.site.clone();
        if !self.sites.contains_key(&site) {
            return Err(Error::SiteNotFound(site));
        }
        if let Some((k, v)) = reg
            .labels
            .iter()
            .find(|(k, v)| token.labels.get(*k) != Some(*v))
        {
            return Err(Error::LabelNotGranted {
                label: format!("{k}={v}"),
                token: token.id.clone(),
                granted: label_list(&token.labels),
            });
        }
        let labels = token.labels.clone();
        let allowed_prefixes = token.allow_prefixes.clone();
        check_id("node id", &reg.node_id)?;
        if let Some(holder) = self.name_holder(&reg.node_id) {
            return Err(Error::NodeIdTaken {
                id: reg.node_id,
                holder,
            });
        }
        check_name("node", &reg.name)?;
        if let Some(holder) = self.name_holder(&reg.name) {
            return Err(Error::NameTaken {
                kind: "node",
                name: reg.name,
                holder,
            });
        }
        self.check_key_free(&reg.public_key)?;
        if let Some(holder) = self.node_by_cert(&reg.cert_fingerprint) {
            return Err(Error::CertInUse {
                fingerprint: Key(reg.cert_fingerprint).to_hex(),
                holder: Member::Node(holder.id.clone()),
            });
        }
        let index = self.ipam.next_free(&self.settings)?;

        // Nothing can fail from here on.
        self.ipam.assign(index, Member::Node(reg.node_id.clone()));
        if let Some(token) = self.tokens.get_mut(&reg.token_id) {
            token.used_by = Some(reg.node_id.clone());
        }
        self.revision += 1;
        let node = Node {
            id: reg.node_id.clone(),
            name: reg.name,
            site,
            public_key: reg.public_key,
            endpoint: reg.endpoint,
            ipv4: ipam::ipv4_at(self.settings.ipv4_pool, index),
            ipv6: ipam::ipv6_at(self.settings.ipv6_prefix, index),
            created_unix: now,
            cert_fingerprint: reg.cert_fingerprint,
            labels,
            advertised: BTreeMap::new(),
            allowed_prefixes,
            pending: BTreeMap::new(),
            cert_expires_unix: reg.cert_expires_unix,
            previous_cert: None,
            registration_key: Some(reg.csr_key),
            key_generation: 0,
        };
        Ok(self.nodes.entry(reg.node_id).or_insert(node))
    }

    /// The id of the node a registration repeats, if it is a retry: the
    /// token (secret checked, not expired) was used by a node with the
    /// same name and WireGuard key less than [`REGISTER_RETRY_SECS`] ago,
    /// and the request is signed by the key of that node's first request
    /// (`csr_key`, the SHA-256 of its public key: name and WireGuard key
    /// are public, possession of that key is not). An agent whose first
    /// `Register` reply was lost retries like that; it gets the same node
    /// back, with a new certificate.
    pub fn retried_registration(
        &self,
        token_id: &str,
        secret_hash: &[u8; 32],
        name: &str,
        public_key: &Key,
        csr_key: &[u8; 32],
        now: u64,
    ) -> Option<&str> {
        let token = self
            .tokens
            .get(token_id)
            .filter(|t| hashes_equal(&t.secret_hash, secret_hash))
            .filter(|t| now < t.expires_unix)?;
        let node = self.nodes.get(token.used_by.as_deref()?)?;
        (node.name == name
            && node.public_key == *public_key
            && node
                .registration_key
                .is_some_and(|k| hashes_equal(&k, csr_key))
            && now < node.created_unix.saturating_add(REGISTER_RETRY_SECS))
        .then_some(node.id.as_str())
    }

    fn is_retry(&self, reg: &Registration, now: u64) -> bool {
        self.retried_registration(
            &reg.token_id,
            &reg.secret_hash,
            &reg.name,
            &reg.public_key,
            &reg.csr_key,
            now,
        ) == Some(reg.node_id.as_str())
    }

    /// A retried registration: the node gets the new certificate (the one
    /// whose reply was lost, and any earlier one, is no longer accepted)
    /// and endpoint.
    fn redo_registration(&mut self, reg: Registration) -> Result<&Node, Error> {
        if let Some(holder) = self
            .node_by_cert(&reg.cert_fingerprint)
            .filter(|n| n.id != reg.node_id)
        {
            return Err(Error::CertInUse {
                fingerprint: Key(reg.cert_fingerprint).to_hex(),
                holder: Member::Node(holder.id.clone()),
            });
        }
        let node = self
            .nodes
            .get_mut(&reg.node_id)
            .ok_or_else(|| Error::NodeNotFound(reg.node_id.clone()))?;
        node.cert_fingerprint = reg.cert_fingerprint;
        node.cert_expires_unix = reg.cert_expires_unix;
        node.previous_cert = None;
        node.endpoint = reg.endpoint;
        self.revision += 1;
        Ok(node)
    }

    /// Sets a node's underlay endpoint; returns whether it changed (the
    /// revision is bumped only then).
    pub fn set_node_endpoint(
        &mut self,
        node_id: &str,
        endpoint: Option<SocketAddr>,
    ) -> Result<bool, Error> {
        let node = self
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| Error::NodeNotFound(node_id.to_owned()))?;
        if node.endpoint == endpoint {
            return Ok(false);
        }
        node.endpoint = endpoint;
        self.revision += 1;
        Ok(true)
    }

    /// Sets and removes labels of a node (by id or name); returns the new
    /// labels. A key both set and removed is refused. The revision is
    /// bumped only if the labels changed.
    pub fn set_node_labels(
        &mut self,
        id_or_name: &str,
        set: &Labels,
        remove: &[String],
    ) -> Result<Labels, Error> {
        let id = self
            .node(id_or_name)
            .map(|n| n.id.clone())
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        check_labels(set)?;
        if let Some(key) = remove.iter().find(|k| set.contains_key(*k)) {
            return Err(Error::LabelSetAndRemoved(key.clone()));
        }
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        let mut labels = node.labels.clone();
        labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        for key in remove {
            labels.remove(key);
        }
        check_labels(&labels)?;
        if labels != node.labels {
            node.labels = labels.clone();
            self.revision += 1;
        }
        Ok(labels)
    }

    // ---- workload prefixes ----

    /// An operator advertises (approves) workload prefixes from a node (by
    /// id or name), each with its labels; a prefix the node advertises
    /// already is relabelled, one pending is approved. All or nothing:
    /// every prefix is checked first ([`check_prefix`], not inside an
    /// overlay pool, no overlap with any other advertised prefix of any
    /// node, and [`check_safe`]: not shorter than the minimum, covering no
    /// controller address or member endpoint, `protected` naming the ones
    /// the state does not hold). Returns whether anything changed (the
    /// revision is bumped only then).
    pub fn advertise_prefixes(
        &mut self,
        id_or_name: &str,
        prefixes: &BTreeMap<IpNet, Labels>,
        protected: &Protected,
    ) -> Result<bool, Error> {
        let node = self
            .node(id_or_name)
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        let id = node.id.clone();
        let shield = Shield::new(self, protected);
        let mut next = node.advertised.clone();
        let mut pending = node.pending.clone();
        for (prefix, labels) in prefixes {
            check_labels(labels)?;
            self.check_prefix_free(&id, *prefix)?;
            check_safe(*prefix, &self.settings, &shield)?;
            next.insert(*prefix, labels.clone());
            pending.remove(prefix);
        }
        // Prefixes of one request must not overlap each other either.
        if let Some((a, b)) = first_overlap(prefixes.keys().copied()) {
            return Err(Error::PrefixOverlap {
                prefix: b.to_string(),
                other: a.to_string(),
                node: node.name.clone(),
            });
        }
        if next.len() > MAX_ADVERTISED {
            return Err(Error::TooManyPrefixes {
                node: node.name.clone(),
                count: next.len(),
            });
        }
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        if node.advertised == next && node.pending == pending {
            return Ok(false);
        }
        node.advertised = next;
        node.pending = pending;
        self.revision += 1;
        Ok(true)
    }

    /// A node's agent asks to advertise workload prefixes (`weft-agent
    /// --advertise`, on every `Watch`). A prefix is approved at once only
    /// if it is inside the node's allowed prefixes (from its join token),
    /// its labels are among the node's own (granted) labels and it passes
    /// every check an operator's would ([`State::advertise_prefixes`]);
    /// any other becomes pending, with the reason, until an operator
    /// approves or withdraws it. A prefix approved already is left as it
    /// is: an agent cannot relabel it. The node's pending prefixes become
    /// exactly this request's unapproved ones. Only a missing node or more
    /// than [`MAX_ADVERTISED`] prefixes fail. Returns whether anything
    /// changed (the revision is bumped only then).
    pub fn agent_advertise(
        &mut self,
        node_id: &str,
        prefixes: &BTreeMap<IpNet, Labels>,
        protected: &Protected,
    ) -> Result<bool, Error> {
        let node = self
            .nodes
            .get(node_id)
            .ok_or_else(|| Error::NodeNotFound(node_id.to_owned()))?;
        if prefixes.len() > MAX_ADVERTISED {
            return Err(Error::TooManyPrefixes {
                node: node.name.clone(),
                count: prefixes.len(),
            });
        }
        let shield = Shield::new(self, protected);
        let mut advertised = node.advertised.clone();
        let mut pending = BTreeMap::new();
        for (prefix, labels) in prefixes {
            if node.advertised.contains_key(prefix) {
                continue;
            }
            match self.agent_prefix_refusal(node, &advertised, *prefix, labels, &shield) {
                None => {
                    advertised.insert(*prefix, labels.clone());
                }
                Some(reason) => {
                    let labels = if check_labels(labels).is_ok() {
                        labels.clone()
                    } else {
                        Labels::new()
                    };
                    pending.insert(*prefix, PendingPrefix { labels, reason });
                }
            }
        }
        if node.advertised == advertised && node.pending == pending {
            return Ok(false);
        }
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.advertised = advertised;
            node.pending = pending;
        }
        self.revision += 1;
        Ok(true)
    }

    /// Why an agent's prefix is not approved at once (`None`: it is).
    /// `advertised` is the node's approved prefixes so far, this request's
    /// included.
    fn agent_prefix_refusal(
        &self,
        node: &Node,
        advertised: &BTreeMap<IpNet, Labels>,
        prefix: IpNet,
        labels: &Labels,
        shield: &Shield,
    ) -> Option<String> {
        if let Err(e) = check_labels(labels) {
            return Some(e.to_string());
        }
        let checks = self
            .check_prefix_free(&node.id, prefix)
            .and_then(|()| check_safe(prefix, &self.settings, shield));
        if let Err(e) = checks {
            return Some(e.to_string());
        }
        if let Some(other) = advertised.keys().find(|p| overlaps(**p, prefix)) {
            return Some(
                Error::PrefixOverlap {
                    prefix: prefix.to_string(),
                    other: other.to_string(),
                    node: node.name.clone(),
                }
                .to_string(),
            );
        }
        if advertised.len() >= MAX_ADVERTISED {
            return Some(
                Error::TooManyPrefixes {
                    node: node.name.clone(),
                    count: advertised.len() + 1,
                }
                .to_string(),
            );
        }
        let command = format!("weftctl node advertise {} {prefix}", node.name);
        if !node.allowed_prefixes.iter().any(|a| a.contains(&prefix)) {
            let allowed = if node.allowed_prefixes.is_empty() {
                "none".to_owned()
            } else {
                let list: Vec<String> = node
                    .allowed_prefixes
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                list.join(", ")
            };
            return Some(format!(
                "not inside the prefixes node {:?}'s join token allows ({allowed}); approve it with `{command}`",
                node.name
            ));
        }
        if let Some((k, v)) = labels.iter().find(|(k, v)| node.labels.get(*k) != Some(*v)) {
            return Some(format!(
                "label {k}={v} is not granted to node {:?} (it has: {}); approve it with `{command} --label KEY=VALUE`",
                node.name,
                label_list(&node.labels)
            ));
        }
        None
    }

    /// Withdraws a workload prefix, advertised or pending, from a node (by
    /// id or name).
    pub fn withdraw_prefix(&mut self, id_or_name: &str, prefix: IpNet) -> Result<(), Error> {
        let node = self
            .node(id_or_name)
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        let id = node.id.clone();
        if !node.advertised.contains_key(&prefix) && !node.pending.contains_key(&prefix) {
            return Err(Error::PrefixNotAdvertised {
                node: node.name.clone(),
                prefix: prefix.to_string(),
            });
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.advertised.remove(&prefix);
            node.pending.remove(&prefix);
        }
        self.revision += 1;
        Ok(())
    }

    /// Whether node `node_id` may advertise `prefix`: a routable network
    /// outside the overlay pools that overlaps no prefix advertised by any
    /// node (the same prefix of the same node excepted: relabelling).
    fn check_prefix_free(&self, node_id: &str, prefix: IpNet) -> Result<(), Error> {
        check_prefix(prefix)?;
        let pool = match prefix {
            IpNet::V4(_) => IpNet::V4(self.settings.ipv4_pool),
            IpNet::V6(_) => IpNet::V6(self.settings.ipv6_prefix),
        };
        if overlaps(pool, prefix) {
            return Err(Error::PrefixInPool {
                prefix: prefix.to_string(),
                pool: pool.to_string(),
            });
        }
        for node in self.nodes.values() {
            for other in node.advertised.keys() {
                if node.id == node_id && *other == prefix {
                    continue;
                }
                if overlaps(*other, prefix) {
                    return Err(Error::PrefixOverlap {
                        prefix: prefix.to_string(),
                        other: other.to_string(),
                        node: node.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Approved prefixes that are no longer safe to route ([`check_safe`]:
    /// an endpoint moved inside one, a controller address appeared, the
    /// minimum was raised), by node id, with why.
    pub fn withheld_prefixes(
        &self,
        protected: &Protected,
    ) -> BTreeMap<String, BTreeMap<IpNet, String>> {
        let shield = Shield::new(self, protected);
        let mut out: BTreeMap<String, BTreeMap<IpNet, String>> = BTreeMap::new();
        for node in self.nodes.values() {
            for prefix in node.advertised.keys() {
                if let Err(e) = check_safe(*prefix, &self.settings, &shield) {
                    out.entry(node.id.clone())
                        .or_default()
                        .insert(*prefix, e.to_string());
                }
            }
        }
        out
    }

    /// The state as configs are computed from it: without the approved
    /// prefixes that are no longer safe to route
    /// ([`State::withheld_prefixes`]). Borrowed when there are none.
    pub fn publishable(&self, protected: &Protected) -> Cow<'_, State> {
        let withheld = self.withheld_prefixes(protected);
        if withheld.is_empty() {
            return Cow::Borrowed(self);
        }
        let mut view = self.clone();
        for (id, prefixes) in withheld {
            if let Some(node) = view.nodes.get_mut(&id) {
                node.advertised.retain(|p, _| !prefixes.contains_key(p));
            }
        }
        Cow::Owned(view)
    }

    /// Deletes a node by id or name and releases its addresses.
    pub fn delete_node(&mut self, id_or_name: &str) -> Result<Node, Error> {
        let id = self
            .node(id_or_name)
            .map(|n| n.id.clone())
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        let node = self
            .nodes
            .remove(&id)
            .ok_or_else(|| Error::NodeNotFound(id_or_name.to_owned()))?;
        if let Some(index) = ipam::ipv4_index(self.settings.ipv4_pool, node.ipv4) {
            self.ipam.release(index);
        }
        self.topology.gateways.remove(&id);
        self.revision += 1;
        Ok(node)
    }

    /// The node with this id, or else with this name.
    pub fn node(&self, id_or_name: &str) -> Option<&Node> {
        self.nodes
            .get(id_or_name)
            .or_else(|| self.nodes.values().find(|n| n.name == id_or_name))
    }

    /// The node with this id (names are not considered).
    pub fn node_by_id(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// All nodes, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// The node whose current or previous client certificate has this
    /// SHA-256 fingerprint (whether still accepted or not: see
    /// [`State::authenticate`]).
    pub fn node_by_cert(&self, fingerprint: &[u8; 32]) -> Option<&Node> {
        self.nodes.values().find(|n| {
            n.cert_fingerprint == *fingerprint
                || n.previous_cert
                    .is_some_and(|p| p.fingerprint == *fingerprint)
        })
    }

    // ---- external peers ----

    /// Adds a plain WireGuard peer to `site` and allocates its addresses.
    pub fn add_external_peer(
        &mut self,
        name: &str,
        site: &str,
        public_key: Key,
        endpoint: Option<SocketAddr>,
        labels: Labels,
        now: u64,
    ) -> Result<&ExternalPeer, Error> {
        check_name("external peer", name)?;
        check_labels(&labels)?;
        if let Some(holder) = self.name_holder(name) {
            return Err(Error::NameTaken {
                kind: "external peer",
                name: name.to_owned(),
                holder,
            });
        }
        if !self.sites.contains_key(site) {
            return Err(Error::SiteNotFound(site.to_owned()));
        }
        self.check_key_free(&public_key)?;
        let index = self.ipam.next_free(&self.settings)?;

        self.ipam
            .assign(index, Member::ExternalPeer(name.to_owned()));
        self.revision += 1;
        let peer = ExternalPeer {
            name: name.to_owned(),
            site: site.to_owned(),
            public_key,
            endpoint,
            ipv4: ipam::ipv4_at(self.settings.ipv4_pool, index),
            ipv6: ipam::ipv6_at(self.settings.ipv6_prefix, index),
            created_unix: now,
            labels,
        };
        Ok(self.external_peers.entry(name.to_owned()).or_insert(peer))
    }

    /// Deletes an external peer and releases its addresses.
    pub fn delete_external_peer(&mut self, name: &str) -> Result<(), Error> {
        let peer = self
            .external_peers
            .remove(name)
            .ok_or_else(|| Error::ExternalPeerNotFound(name.to_owned()))?;
        if let Some(index) = ipam::ipv4_index(self.settings.ipv4_pool, peer.ipv4) {
            self.ipam.release(index);
        }
        self.revision += 1;
        Ok(())
    }

    /// The external peer with this name.
    pub fn external_peer(&self, name: &str) -> Option<&ExternalPeer> {
        self.external_peers.get(name)
    }

    /// All external peers, by name.
    pub fn external_peers(&self) -> impl Iterator<Item = &ExternalPeer> {
        self.external_peers.values()
    }

    // ---- policies ----

    /// Creates or replaces policies by name, all or nothing: every policy
    /// is checked first. The revision is bumped once if anything changed.
    pub fn apply_policies(&mut self, policies: Vec<Policy>) -> Result<PolicyChanges, Error> {
        let mut seen = BTreeMap::new();
        for p in &policies {
            if seen.insert(p.name.as_str(), ()).is_some() {
                return Err(Error::InvalidPolicy {
                    name: p.name.clone(),
                    reason: "given more than once".to_owned(),
                });
            }
            check_policy(p).map_err(|reason| Error::InvalidPolicy {
                name: p.name.clone(),
                reason,
            })?;
        }
        let mut changes = PolicyChanges::default();
        for p in policies {
            let list = match self.policies.get(&p.name) {
                None => &mut changes.created,
                Some(old) if *old == p => &mut changes.unchanged,
                Some(_) => &mut changes.updated,
            };
            list.push(p.name.clone());
            self.policies.insert(p.name.clone(), p);
        }
        if !changes.created.is_empty() || !changes.updated.is_empty() {
            self.revision += 1;
        }
        for list in [
            &mut changes.created,
            &mut changes.updated,
            &mut changes.unchanged,
        ] {
            list.sort();
        }
        Ok(changes)
    }

    /// Deletes a policy; what it governed is open again unless another
    /// policy selects it.
    pub fn delete_policy(&mut self, name: &str) -> Result<Policy, Error> {
        let policy = self
            .policies
            .remove(name)
            .ok_or_else(|| Error::PolicyNotFound(name.to_owned()))?;
        self.revision += 1;
        Ok(policy)
    }

    /// The policy with this name.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.get(name)
    }

    /// All policies, by name.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    /// Every node (`node` = its id) and external peer (`node` = `None`)
    /// as something policy selects, with its /32 and /128, and every
    /// workload prefix (named `NODE/PREFIX`, hosted and enforced by the
    /// node advertising it, with the workload's own labels only), by name.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let node = |n: &Node| Endpoint {
            name: n.name.clone(),
            site: n.site.clone(),
            node: Some(n.id.clone()),
            labels: n.labels.clone(),
            prefixes: host_prefixes(n.ipv4, n.ipv6),
        };
        let peer = |p: &ExternalPeer| Endpoint {
            name: p.name.clone(),
            site: p.site.clone(),
            node: None,
            labels: p.labels.clone(),
            prefixes: host_prefixes(p.ipv4, p.ipv6),
        };
        let workloads = self.nodes.values().flat_map(|n| {
            n.advertised.iter().map(|(prefix, labels)| Endpoint {
                name: workload_name(&n.name, *prefix),
                site: n.site.clone(),
                node: Some(n.id.clone()),
                labels: labels.clone(),
                prefixes: vec![*prefix],
            })
        });
        let mut all: Vec<Endpoint> = self
            .nodes
            .values()
            .map(node)
            .chain(self.external_peers.values().map(peer))
            .chain(workloads)
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The endpoint of the node (by id or name) or external peer `name`.
    pub fn endpoint(&self, name: &str) -> Option<Endpoint> {
        let wanted = self
            .node(name)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| name.to_owned());
        self.endpoints().into_iter().find(|e| e.name == wanted)
    }

    // ---- topology ----

    /// The topology settings (gateways by node id).
    pub fn topology(&self) -> &TopologyConfig {
        &self.topology
    }

    /// Replaces the topology settings. Gateways may be given by node name
    /// or id (stored by id); every gateway must be a node, every tagged
    /// site must exist, tags are DNS labels. Returns whether anything
    /// changed (the revision is bumped only then).
    pub fn set_topology(&mut self, mut config: TopologyConfig) -> Result<bool, Error> {
        let mut gateways = std::collections::BTreeSet::new();
        for g in &config.gateways {
            let node = self.node(g).ok_or_else(|| {
                Error::InvalidTopology(format!("gateway {g:?}: no node has this name or id"))
            })?;
            gateways.insert(node.id.clone());
        }
        config.gateways = gateways;
        for (site, tags) in &config.site_tags {
            if !self.sites.contains_key(site) {
                return Err(Error::InvalidTopology(format!(
                    "tags for site {site:?}: no such site"
                )));
            }
            for tag in tags {
                check_name("site tag", tag)?;
            }
        }
        config.site_tags.retain(|_, tags| !tags.is_empty());
        for rule in &config.residency {
            check_name("residency tag", &rule.tag)?;
        }
        config.residency.sort();
        config.residency.dedup();
        config.params.validate().map_err(Error::InvalidTopology)?;
        if config == self.topology {
            return Ok(false);
        }
        self.topology = config;
        self.revision += 1;
        Ok(true)
    }

    // ---- consistency ----

    /// Full consistency check, for a state loaded from disk: settings,
    /// names, unique keys, addresses and certificates, addresses inside the
    /// pools and matching IPAM, references to existing sites.
    pub fn validate(&self) -> Result<(), Error> {
        // A bad name in a stored state is an inconsistency, not a bad request.
        self.check_consistency().map_err(|e| {
            if let Error::Inconsistent(_) = e {
                e
            } else {
                Error::Inconsistent(e.to_string())
            }
        })
    }

    fn check_consistency(&self) -> Result<(), Error> {
        self.settings.validate()?;
        let bad = |msg: String| Err(Error::Inconsistent(msg));

        for (key, site) in &self.sites {
            if *key != site.name {
                return bad(format!("site {:?} is stored under {key:?}", site.name));
            }
            check_name("site", &site.name)?;
        }

        // Every member with its name, key and index; uniqueness checked below.
        let mut names: BTreeMap<&str, Member> = BTreeMap::new();
        let mut seen = Seen::default();
        let mut certs: BTreeMap<[u8; 32], Member> = BTreeMap::new();
        // Node ids first: node(id_or_name) must be unambiguous.
        for (key, node) in &self.nodes {
            if *key != node.id {
                return bad(format!("node {} is stored under {key:?}", node.id));
            }
            check_id("node id", &node.id)?;
        }
        for node in self.nodes.values() {
            let member = Member::Node(node.id.clone());
            claim(&mut names, node.id.as_str(), &member, "id")?;
        }
        for node in self.nodes.values() {
            let member = Member::Node(node.id.clone());
            check_name("node", &node.name)?;
            claim(&mut names, node.name.as_str(), &member, "name")?;
            self.check_member(
                &member,
                &node.site,
                &node.public_key,
                node.ipv4,
                node.ipv6,
                &mut seen,
            )?;
            let previous = node.previous_cert.map(|p| p.fingerprint);
            for fingerprint in std::iter::once(node.cert_fingerprint).chain(previous) {
                if let Some(other) = certs.insert(fingerprint, member.clone()) {
                    return bad(format!(
                        "client certificate {} is bound to both {other} and {member}",
                        Key(fingerprint).to_hex()
                    ));
                }
            }
        }
        for (key, peer) in &self.external_peers {
            if *key != peer.name {
                return bad(format!(
                    "external peer {:?} is stored under {key:?}",
                    peer.name
                ));
            }
            let member = Member::ExternalPeer(peer.name.clone());
            check_name("external peer", &peer.name)?;
            claim(&mut names, peer.name.as_str(), &member, "name")?;
            self.check_member(
                &member,
                &peer.site,
                &peer.public_key,
                peer.ipv4,
                peer.ipv6,
                &mut seen,
            )?;
        }
        for (index, owner) in self.ipam.allocations() {
            if seen.indices.get(&index) != Some(owner) {
                return bad(format!(
                    "IPAM records {} as held by {owner}, which does not hold it",
                    ipam::ipv4_at(self.settings.ipv4_pool, index)
                ));
            }
        }

        for (key, token) in &self.tokens {
            if *key != token.id {
                return bad(format!("join token {} is stored under {key:?}", token.id));
            }
            check_id("join token id", &token.id)?;
            if !self.sites.contains_key(&token.site) {
                return bad(format!(
                    "join token {} is for site {:?}, which does not exist",
                    token.id, token.site
                ));
            }
            if token.expires_unix <= token.created_unix {
                return bad(format!(
                    "join token {} expires before it was created",
                    token.id
                ));
            }
            check_labels(&token.labels)?;
            check_allowed_prefixes(token.allow_prefixes.clone())?;
        }
        for node in self.nodes.values() {
            check_labels(&node.labels)?;
            check_allowed_prefixes(node.allowed_prefixes.clone())?;
            if node.pending.len() > MAX_ADVERTISED {
                return bad(format!(
                    "node {} has {} pending prefixes, more than {MAX_ADVERTISED}",
                    node.name,
                    node.pending.len()
                ));
            }
            for (prefix, p) in &node.pending {
                check_labels(&p.labels)?;
                if node.advertised.contains_key(prefix) {
                    return bad(format!(
                        "node {} has {prefix} both advertised and pending",
                        node.name
                    ));
                }
            }
            if node.advertised.len() > MAX_ADVERTISED {
                return bad(format!(
                    "node {} advertises {} prefixes, more than {MAX_ADVERTISED}",
                    node.name,
                    node.advertised.len()
                ));
            }
            for (prefix, labels) in &node.advertised {
                check_labels(labels)?;
                check_prefix(*prefix)?;
                let pool = match prefix {
                    IpNet::V4(_) => IpNet::V4(self.settings.ipv4_pool),
                    IpNet::V6(_) => IpNet::V6(self.settings.ipv6_prefix),
                };
                if overlaps(pool, *prefix) {
                    return bad(format!(
                        "node {} advertises {prefix}, inside the overlay pool {pool}",
                        node.name
                    ));
                }
            }
        }
        let all = self
            .nodes
            .values()
            .flat_map(|n| n.advertised.keys().copied());
        if let Some((a, b)) = first_overlap(all) {
            return bad(format!("advertised prefixes {a} and {b} overlap"));
        }
        for peer in self.external_peers.values() {
            check_labels(&peer.labels)?;
        }
        for (key, policy) in &self.policies {
            if *key != policy.name {
                return bad(format!("policy {:?} is stored under {key:?}", policy.name));
            }
            if let Err(reason) = check_policy(policy) {
                return bad(format!("policy {key:?}: {reason}"));
            }
        }
        for id in &self.topology.gateways {
            if !self.nodes.contains_key(id) {
                return bad(format!("gateway {id:?} is not a node"));
            }
        }
        for site in self.topology.site_tags.keys() {
            if !self.sites.contains_key(site) {
                return bad(format!("topology tags site {site:?}, which does not exist"));
            }
        }
        if let Err(reason) = self.topology.params.validate() {
            return bad(format!("topology: {reason}"));
        }
        Ok(())
    }

    /// Checks one member's site, key and addresses, recording key and index.
    fn check_member(
        &self,
        member: &Member,
        site: &str,
        key: &Key,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
        seen: &mut Seen,
    ) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Inconsistent(msg));
        if !self.sites.contains_key(site) {
            return bad(format!(
                "{member} is in site {site:?}, which does not exist"
            ));
        }
        if key.is_zero() {
            return bad(format!("{member} has an all-zero public key"));
        }
        if let Some(other) = seen.keys.insert(*key, member.clone()) {
            return bad(format!(
                "public key {key} is used by both {other} and {member}"
            ));
        }
        let Some(index) = ipam::ipv4_index(self.settings.ipv4_pool, v4) else {
            return bad(format!(
                "{member} has address {v4}, which is not a host address of the pool {}",
                self.settings.ipv4_pool
            ));
        };
        let expected_v6 = ipam::ipv6_at(self.settings.ipv6_prefix, index);
        if v6 != expected_v6 {
            return bad(format!(
                "{member} has IPv6 address {v6}, expected {expected_v6} to match its IPv4 address {v4}"
            ));
        }
        if let Some(other) = seen.indices.insert(index, member.clone()) {
            return bad(format!("address {v4} is held by both {other} and {member}"));
        }
        if self.ipam.owner(index) != Some(member) {
            return bad(format!(
                "address {v4} of {member} is not recorded for it in IPAM"
            ));
        }
        Ok(())
    }

    // ---- helpers ----

    /// Who already uses `name` as a node id, node name or external peer name.
    fn name_holder(&self, name: &str) -> Option<Member> {
        if self.nodes.contains_key(name) {
            return Some(Member::Node(name.to_owned()));
        }
        if let Some(n) = self.nodes.values().find(|n| n.name == name) {
            return Some(Member::Node(n.id.clone()));
        }
        self.external_peers
            .contains_key(name)
            .then(|| Member::ExternalPeer(name.to_owned()))
    }

    /// Refuses the all-zero key and keys already in use.
    fn check_key_free(&self, key: &Key) -> Result<(), Error> {
        if key.is_zero() {
            return Err(Error::ZeroKey);
        }
        let holder = if let Some(n) = self.nodes.values().find(|n| n.public_key == *key) {
            Member::Node(n.id.clone())
        } else if let Some(p) = self.external_peers.values().find(|p| p.public_key == *key) {
            Member::ExternalPeer(p.name.clone())
        } else {
            return Ok(());
        };
        Err(Error::KeyInUse {
            key: key.to_base64(),
            holder,
        })
    }
}

/// Checks a policy exactly as the parser would: it must survive the trip to
/// YAML and back unchanged (so a policy built in code, or read from a
/// damaged store, obeys every rule a file does).
fn check_policy(policy: &Policy) -> Result<(), String> {
    match crate::policy::parse_text("stored policy", &to_yaml(policy)) {
        Ok(back) if back.len() == 1 && back[0] == *policy => Ok(()),
        Ok(_) => Err("it does not survive a round trip through YAML".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// A member's overlay addresses as host prefixes.
fn host_prefixes(v4: Ipv4Addr, v6: Ipv6Addr) -> Vec<IpNet> {
    vec![IpNet::V4(Ipv4Net::from(v4)), IpNet::V6(Ipv6Net::from(v6))]
}

/// The policy endpoint name of a workload prefix of node `node`.
pub fn workload_name(node: &str, prefix: IpNet) -> String {
    format!("{node}/{prefix}")
}

/// Whether two prefixes share an address (prefixes of different families
/// never do).
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b) || b.contains(&a)
}

/// Some pair of overlapping prefixes among `prefixes`, in O(n log n): in
/// address order, CIDR blocks are nested or disjoint, so a block overlaps
/// an earlier one exactly when it starts before the furthest end seen.
pub fn first_overlap(prefixes: impl IntoIterator<Item = IpNet>) -> Option<(IpNet, IpNet)> {
    let mut sorted: Vec<IpNet> = prefixes.into_iter().collect();
    // `IpAddr` orders every IPv4 address before every IPv6 one, so the
    // families never mix in the comparisons below.
    sorted.sort_by_key(|p| (p.network(), p.prefix_len()));
    let mut widest: Option<IpNet> = None;
    for p in sorted {
        if let Some(w) = widest
            && p.network() <= w.broadcast()
        {
            return Some((w, p));
        }
        if widest.is_none_or(|w| p.broadcast() > w.broadcast()) {
            widest = Some(p);
        }
    }
    None
}

/// Keys and address indices met so far by `State::validate`.
#[derive(Default)]
struct Seen {
    keys: BTreeMap<Key, Member>,
    indices: BTreeMap<u32, Member>,
}

/// Records that `member` uses `value` as a name or id; a second member
/// using the same string makes the state inconsistent.
fn claim<'a>(
    names: &mut BTreeMap<&'a str, Member>,
    value: &'a str,
    member: &Member,
    what: &str,
) -> Result<(), Error> {
    match names.insert(value, member.clone()) {
        Some(other) if other != *member => Err(Error::Inconsistent(format!(
            "{what} {value:?} of {member} is also used by {other}"
        ))),
        Some(_) | None => Ok(()),
    }
}

/// Labels as `k=v, k2=v2`, or `none`.
fn label_list(labels: &Labels) -> String {
    if labels.is_empty() {
        return "none".to_owned();
    }
    let list: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    list.join(", ")
}

/// Checks a join token's allowed prefixes ([`check_prefix`], at most
/// [`MAX_ADVERTISED`]); returns them sorted, without duplicates.
fn check_allowed_prefixes(prefixes: Vec<IpNet>) -> Result<Vec<IpNet>, Error> {
    let mut sorted = prefixes;
    sorted.sort();
    sorted.dedup();
    if sorted.len() > MAX_ADVERTISED {
        return Err(Error::TooManyAllowedPrefixes {
            count: sorted.len(),
        });
    }
    for p in &sorted {
        check_prefix(*p)?;
    }
    Ok(sorted)
}

/// Compares two hashes in time independent of where they differ.
fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
