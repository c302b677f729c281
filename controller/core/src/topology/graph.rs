//! The site graph paths are computed on: sites with residency tags, which
//! of them can send and relay (an up gateway), and the measured links.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::Member;

/// Measured state of the underlay link between two sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Round-trip latency in microseconds.
    pub latency_us: u32,
    /// Packet loss in parts per million.
    pub loss_ppm: u32,
    /// Whether probes get through at all.
    pub up: bool,
}

impl Link {
    /// An up link with this latency and no loss.
    pub fn up(latency_us: u32) -> Self {
        Link {
            latency_us,
            loss_ppm: 0,
            up: true,
        }
    }

    /// A down link.
    pub fn down() -> Self {
        Link {
            latency_us: 0,
            loss_ppm: 0,
            up: false,
        }
    }
}

/// What the agents measured: links between sites (unordered pairs) and
/// members found down (e.g. a gateway that stopped answering).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Measurements {
    links: BTreeMap<(String, String), Link>,
    down: BTreeSet<Member>,
}

impl Measurements {
    /// Records the link between sites `a` and `b` (either order).
    pub fn set_link(&mut self, a: &str, b: &str, link: Link) {
        self.links.insert(pair(a, b), link);
    }

    /// The measured link between `a` and `b`, if any.
    pub fn link(&self, a: &str, b: &str) -> Option<Link> {
        self.links.get(&pair(a, b)).copied()
    }

    /// Marks a member down (`true`) or up again (`false`).
    pub fn set_down(&mut self, member: Member, down: bool) {
        if down {
            self.down.insert(member);
        } else {
            self.down.remove(&member);
        }
    }

    /// Whether the member was found down.
    pub fn is_down(&self, member: &Member) -> bool {
        self.down.contains(member)
    }

    /// Whether both say the same links are up and the same members down
    /// (latency and loss aside).
    pub fn same_reachability(&self, other: &Measurements) -> bool {
        self.down == other.down
            && self.links.len() == other.links.len()
            && self
                .links
                .iter()
                .zip(&other.links)
                .all(|((ka, a), (kb, b))| ka == kb && a.up == b.up)
    }

    /// The links measured down, as "a-b".
    pub fn down_links(&self) -> Vec<String> {
        self.links
            .iter()
            .filter(|(_, l)| !l.up)
            .map(|((a, b), _)| format!("{a}-{b}"))
            .collect()
    }

    /// The members found down.
    pub fn down_members(&self) -> Vec<String> {
        self.down.iter().map(ToString::to_string).collect()
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

/// A residency rule: traffic between two sites that both carry `tag`
/// transits only sites that carry `tag`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResidencyRule {
    /// The site tag, e.g. `eu`.
    pub tag: String,
}

/// How link measurements become path costs, and the hysteresis margins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathParams {
    /// Latency assumed for a link nobody has measured yet (it counts as up).
    pub unmeasured_latency_us: u32,
    /// Added to every link's cost, so that at equal latency fewer hops win
    /// and a relayed path pays for each relay.
    pub hop_penalty_us: u32,
    /// A link losing this much or more (ppm) counts as down.
    pub max_loss_ppm: u32,
    /// Loss weight: cost = latency × (1 + loss_factor × loss).
    pub loss_factor: u32,
    /// Hysteresis: a working path is replaced only by one cheaper by at
    /// least this many percent ...
    pub switch_percent: u32,
    /// ... and by at least this many microseconds.
    pub switch_min_gain_us: u64,
}

impl Default for PathParams {
    fn default() -> Self {
        PathParams {
            unmeasured_latency_us: 50_000,
            hop_penalty_us: 5_000,
            max_loss_ppm: 200_000,
            loss_factor: 4,
            switch_percent: 20,
            switch_min_gain_us: 2_000,
        }
    }
}

impl PathParams {
    /// Refuses parameters that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.switch_percent > 100 {
            return Err(format!(
                "switch_percent {} is over 100",
                self.switch_percent
            ));
        }
        if self.max_loss_ppm == 0 || self.max_loss_ppm > 1_000_000 {
            return Err(format!(
                "max_loss_ppm {} is not in 1..=1000000",
                self.max_loss_ppm
            ));
        }
        Ok(())
    }
}

/// A site as path computation sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSpec {
    /// The site's name.
    pub name: String,
    /// Residency tags, e.g. `eu`.
    pub tags: BTreeSet<String>,
}

/// Sites by index (sorted by name), their residency levels, which can send
/// and relay across sites, and the cost of every link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteGraph {
    pub(crate) names: Vec<String>,
    pub(crate) index: BTreeMap<String, usize>,
    pub(crate) tags: Vec<BTreeSet<String>>,
    /// Residency rule tags, bit `i` of a mask = `rules[i]`.
    pub(crate) rules: Vec<String>,
    /// Rule tags each site carries.
    pub(crate) masks: Vec<u64>,
    /// Whether the site can take part in cross-site traffic (in gateway
    /// mode: it has at least one gateway up).
    pub(crate) active: Vec<bool>,
    /// Link state (measured, or assumed for unmeasured links), n × n.
    pub(crate) links: Vec<Link>,
    /// Cost in µs of each link, `None` when down, n × n.
    pub(crate) costs: Vec<Option<u64>>,
}

/// At most this many residency rules (tags are a 64-bit mask).
pub const MAX_RESIDENCY_RULES: usize = 64;

impl SiteGraph {
    /// Builds the graph. `active` says which sites can send and relay
    /// across sites; rules beyond [`MAX_RESIDENCY_RULES`] are ignored.
    pub fn new(
        sites: &[SiteSpec],
        rules: &[ResidencyRule],
        measurements: &Measurements,
        active: impl Fn(&str) -> bool,
        params: &PathParams,
    ) -> Self {
        let mut sorted: Vec<&SiteSpec> = sites.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        sorted.dedup_by(|a, b| a.name == b.name);
        let names: Vec<String> = sorted.iter().map(|s| s.name.clone()).collect();
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let rules: Vec<String> = rules
            .iter()
            .map(|r| r.tag.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .take(MAX_RESIDENCY_RULES)
            .collect();
        let masks = sorted
            .iter()
            .map(|s| {
                rules
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| s.tags.contains(*t))
                    .fold(0u64, |m, (i, _)| m | (1 << i))
            })
            .collect();
        let n = names.len();
        let mut links = vec![Link::down(); n * n];
        let mut costs = vec![None; n * n];
        for a in 0..n {
            for b in 0..n {
                if a == b {
                    continue;
                }
                let link = measurements
                    .link(&names[a], &names[b])
                    .unwrap_or(Link::up(params.unmeasured_latency_us));
                links[a * n + b] = link;
                costs[a * n + b] = link_cost(&link, params);
            }
        }
        SiteGraph {
            active: names.iter().map(|s| active(s)).collect(),
            tags: sorted.iter().map(|s| s.tags.clone()).collect(),
            names,
            index,
            rules,
            masks,
            links,
            costs,
        }
    }

    /// Number of sites.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no sites.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Site names, by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index of a site.
    pub fn site_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub(crate) fn cost(&self, a: usize, b: usize) -> Option<u64> {
        self.costs[a * self.len() + b]
    }

    pub(crate) fn link(&self, a: usize, b: usize) -> Link {
        self.links[a * self.len() + b]
    }

    /// Rule tags a path from `src` to `dst` must stay within: those both
    /// ends carry.
    pub(crate) fn required(&self, src: usize, dst: usize) -> u64 {
        self.masks[src] & self.masks[dst]
    }

    /// Whether `via` may relay traffic for which `required` applies.
    pub(crate) fn may_transit(&self, via: usize, required: u64) -> bool {
        self.masks[via] & required == required
    }

    /// Tag names in a mask.
    pub(crate) fn tag_names(&self, mask: u64) -> Vec<String> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, t)| t.clone())
            .collect()
    }
}

/// The cost of a link in µs, `None` when it is down or too lossy.
fn link_cost(link: &Link, params: &PathParams) -> Option<u64> {
    if !link.up || link.loss_ppm >= params.max_loss_ppm {
        return None;
    }
    let latency = u64::from(link.latency_us);
    let loss = u64::from(link.loss_ppm) * u64::from(params.loss_factor);
    Some(latency + latency * loss / 1_000_000 + u64::from(params.hop_penalty_us))
}
