//! Site-level path computation: one shortest-path tree per destination
//! site, by measured cost, within residency constraints, with hysteresis.
//!
//! Forwarding is by destination only (WireGuard routes by destination), so
//! for each destination `d` every site has exactly one next hop: the
//! routes towards `d` form a tree rooted at `d`, which makes them loop-free
//! and makes every relay agree with the path by construction.
//!
//! **Residency.** A rule tag `t` constrains a pair when both ends carry
//! `t`: its path may transit only sites carrying `t`. A relay cannot tell
//! constrained traffic from unconstrained traffic to the same destination,
//! so the tree for `d` only uses an edge `x → y` when `y` carries every rule
//! tag that both `x` and `d` carry (tags never drop along a path). Every
//! path in the tree is then compliant for every source. With one tag
//! (the usual `eu` case) this is exact for constrained pairs: they get a
//! route whenever a path through tagged sites exists. It is conservative
//! for unconstrained sources (a path that enters a tagged site and leaves
//! it again is not used) and with overlapping tags.
//!
//! **Hysteresis.** Given the previous table, a site keeps its previous next
//! hop towards `d` while the previous path is still usable (links up,
//! compliant, sites active) unless the best path now is cheaper by at least
//! [`PathParams::switch_percent`] and [`PathParams::switch_min_gain_us`].
//! The others take the cheapest path in the graph where kept sites may only
//! use their previous next hop (a Dijkstra run), so the result is again a
//! tree. A kept site's cost can then only fall; an unusable path is left at
//! once.

use crate::topology::config::TopologyMode;
use crate::topology::graph::{PathParams, SiteGraph};

const INF: u64 = u64::MAX;

/// Next hops of every site towards every other, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTable {
    pub(crate) mode: TopologyMode,
    pub(crate) graph: SiteGraph,
    pub(crate) params: PathParams,
    /// `next[d * n + x]`: the site after `x` towards `d`.
    pub(crate) next: Vec<Option<usize>>,
    /// `cost[d * n + x]`: cost of that path in µs, `u64::MAX` without one.
    pub(crate) cost: Vec<u64>,
    /// `kept[d * n + x]`: the next hop was kept by hysteresis.
    pub(crate) kept: Vec<bool>,
}

/// Computes the paths between all sites; `prev` is the previous result
/// (the hysteresis state), `None` the first time.
pub fn compute_paths(
    mode: TopologyMode,
    graph: SiteGraph,
    params: &PathParams,
    prev: Option<&PathTable>,
) -> PathTable {
    let n = graph.len();
    let mut next = vec![None; n * n];
    let mut cost = vec![INF; n * n];
    let mut kept = vec![false; n * n];
    // Previous next hops translated to this graph's indices, by name.
    let prev_rows: Option<Vec<Vec<Option<usize>>>> = prev.map(|p| {
        (0..n)
            .map(|d| match p.graph.site_index(&graph.names[d]) {
                None => vec![None; n],
                Some(pd) => (0..n)
                    .map(|x| {
                        let px = p.graph.site_index(&graph.names[x])?;
                        let hop = p.next[pd * p.graph.len() + px]?;
                        graph.site_index(&p.graph.names[hop])
                    })
                    .collect(),
            })
            .collect()
    });
    for d in 0..n {
        let row = d * n..(d + 1) * n;
        cost[d * n + d] = 0;
        match mode {
            TopologyMode::FullMesh => {
                // Every member peers directly; nothing relays.
                for x in (0..n).filter(|x| *x != d) {
                    next[d * n + x] = Some(d);
                    cost[d * n + x] = graph.cost(x, d).unwrap_or(INF);
                }
            }
            TopologyMode::Gateways => {
                let prev_row = prev_rows.as_ref().map(|r| r[d].as_slice());
                let tree = tree(&graph, params, d, prev_row);
                next[row.clone()].copy_from_slice(&tree.next);
                cost[row.clone()].copy_from_slice(&tree.dist);
                kept[row].copy_from_slice(&tree.kept);
            }
        }
    }
    PathTable {
        mode,
        graph,
        params: *params,
        next,
        cost,
        kept,
    }
}

impl PathTable {
    /// The site graph the table was computed on.
    pub fn graph(&self) -> &SiteGraph {
        &self.graph
    }

    /// The topology mode.
    pub fn mode(&self) -> TopologyMode {
        self.mode
    }

    /// The next site from `from` towards `to`, `None` without a route (or
    /// when they are the same site).
    pub fn next_hop(&self, from: &str, to: &str) -> Option<&str> {
        let (x, d) = (self.graph.site_index(from)?, self.graph.site_index(to)?);
        self.next_idx(x, d).map(|i| self.graph.names[i].as_str())
    }

    /// The sites from `from` to `to`, both included; `None` without a
    /// route.
    pub fn path(&self, from: &str, to: &str) -> Option<Vec<&str>> {
        let (x, d) = (self.graph.site_index(from)?, self.graph.site_index(to)?);
        let path = self.path_idx(x, d)?;
        Some(path.iter().map(|i| self.graph.names[*i].as_str()).collect())
    }

    pub(crate) fn next_idx(&self, x: usize, d: usize) -> Option<usize> {
        self.next[d * self.graph.len() + x]
    }

    pub(crate) fn cost_idx(&self, x: usize, d: usize) -> u64 {
        self.cost[d * self.graph.len() + x]
    }

    /// Whether `from` kept its previous next hop towards `to` under the
    /// hysteresis rule (rather than taking the cheapest path afresh).
    pub fn kept_by_hysteresis(&self, from: &str, to: &str) -> bool {
        match (self.graph.site_index(from), self.graph.site_index(to)) {
            (Some(x), Some(d)) => {
                self.kept[d * self.graph.len() + x] && self.next_idx(x, d).is_some()
            }
            _ => false,
        }
    }

    /// Indices of the sites from `x` to `d`; `None` without a route.
    pub(crate) fn path_idx(&self, x: usize, d: usize) -> Option<Vec<usize>> {
        let mut path = vec![x];
        let mut cur = x;
        while cur != d {
            cur = self.next_idx(cur, d)?;
            path.push(cur);
            if path.len() > self.graph.len() {
                return None; // cannot happen: the rows are trees
            }
        }
        Some(path)
    }
}

struct Tree {
    next: Vec<Option<usize>>,
    dist: Vec<u64>,
    kept: Vec<bool>,
}

/// The tree of paths towards `d`.
fn tree(g: &SiteGraph, params: &PathParams, d: usize, prev: Option<&[Option<usize>]>) -> Tree {
    let n = g.len();
    let allowed = |x: usize, y: usize| edge_towards(g, d, x, y);
    let none = |_: usize| None;
    let (best, _) = dijkstra(n, d, allowed, none, none);
    let mut kept = vec![false; n];
    if let Some(prev) = prev {
        let prev_cost = previous_costs(n, d, prev, allowed);
        for x in (0..n).filter(|x| *x != d) {
            if let Some(old) = prev_cost[x] {
                kept[x] = !better_by_margin(best[x], old, params);
            }
        }
    }
    let only = |x: usize| {
        if kept[x] {
            prev.and_then(|p| p[x])
        } else {
            None
        }
    };
    let prefer = |x: usize| prev.and_then(|p| p[x]);
    let (dist, next) = dijkstra(n, d, allowed, only, prefer);
    // A kept site whose path became unreachable cannot happen (its previous
    // path is usable), but never report a kept flag without a route.
    for x in 0..n {
        kept[x] &= next[x].is_some();
    }
    Tree { next, dist, kept }
}

/// The cost of the edge `x → y` in the tree towards `d`, `None` if the
/// tree may not use it: both sites active, the link up, and `y` carrying
/// every rule tag that `x` and `d` both carry.
fn edge_towards(g: &SiteGraph, d: usize, x: usize, y: usize) -> Option<u64> {
    if x == y || x == d || !g.active[x] || !g.active[y] {
        return None;
    }
    let level = g.masks[x] & g.masks[d];
    if g.masks[y] & level != level {
        return None;
    }
    g.cost(x, y)
}

/// Whether `new` beats `old` by the hysteresis margin.
pub(crate) fn better_by_margin(new: u64, old: u64, params: &PathParams) -> bool {
    if new >= old {
        return false;
    }
    let gain = old - new;
    gain >= params.switch_min_gain_us
        && u128::from(gain) * 100 >= u128::from(old) * u128::from(params.switch_percent)
}

/// Cost of each site's previous path to `d` in the current graph, `None`
/// where it is no longer usable (an edge down or not allowed, a loop, no
/// previous hop).
fn previous_costs(
    n: usize,
    d: usize,
    prev: &[Option<usize>],
    allowed: impl Fn(usize, usize) -> Option<u64>,
) -> Vec<Option<u64>> {
    let mut memo: Vec<Option<Option<u64>>> = vec![None; n];
    memo[d] = Some(Some(0));
    let mut chain = Vec::new();
    for x in 0..n {
        chain.clear();
        let mut cur = x;
        let end = loop {
            if let Some(known) = memo[cur] {
                break known;
            }
            if chain.len() > n {
                break None; // a loop
            }
            chain.push(cur);
            match prev[cur].filter(|y| allowed(cur, *y).is_some()) {
                Some(y) => cur = y,
                None => break None,
            }
        };
        let mut acc = end;
        for &c in chain.iter().rev() {
            acc = acc.and_then(|a| {
                let y = prev[c]?;
                Some(a.saturating_add(allowed(c, y)?))
            });
            memo[c] = Some(acc);
        }
    }
    memo.into_iter().map(Option::flatten).collect()
}

/// Dijkstra towards `root` over the edges `edge(x, y)` (from `x` to `y`).
/// `only(x)`, when set, is the one next hop `x` may use; at equal cost
/// `prefer(x)` wins, then the hop settled first. O(n²): n is the number of
/// sites.
pub(crate) fn dijkstra(
    n: usize,
    root: usize,
    edge: impl Fn(usize, usize) -> Option<u64>,
    only: impl Fn(usize) -> Option<usize>,
    prefer: impl Fn(usize) -> Option<usize>,
) -> (Vec<u64>, Vec<Option<usize>>) {
    let mut dist = vec![INF; n];
    let mut next = vec![None; n];
    let mut done = vec![false; n];
    dist[root] = 0;
    loop {
        let mut u = None;
        for i in 0..n {
            if !done[i] && dist[i] != INF && u.is_none_or(|b: usize| dist[i] < dist[b]) {
                u = Some(i);
            }
        }
        let Some(u) = u else { break };
        done[u] = true;
        for x in 0..n {
            if done[x] || only(x).is_some_and(|o| o != u) {
                continue;
            }
            let Some(w) = edge(x, u) else { continue };
            let c = dist[u].saturating_add(w);
            if c < dist[x] || (c == dist[x] && prefer(x) == Some(u)) {
                dist[x] = c;
                next[x] = Some(u);
            }
        }
    }
    (dist, next)
}
