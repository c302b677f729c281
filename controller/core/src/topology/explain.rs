//! Why traffic between two sites takes the path it takes, or none: the
//! data behind `weftctl route list|trace`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::topology::config::TopologyMode;
use crate::topology::paths::{PathTable, dijkstra};

/// The route between two sites and the reason for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteTrace {
    /// Source site.
    pub from: String,
    /// Destination site.
    pub to: String,
    /// Sites traffic crosses, `from` and `to` included; empty without a
    /// route.
    pub hops: Vec<String>,
    /// What was decided and why.
    pub route: SiteRoute,
}

/// The kind of route between two sites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteRoute {
    /// Both ends are in the same site: members talk directly.
    Local,
    /// Over the direct link between the two sites.
    Direct {
        /// Measured (or assumed) latency of the link, µs.
        latency_us: u32,
        /// Whether the link is up (in full-mesh mode a down direct link is
        /// still the only path).
        up: bool,
    },
    /// Through one or more relay sites.
    Relayed {
        /// The relay sites, in order.
        via: Vec<String>,
        /// Why not the direct link.
        reason: RelayReason,
    },
    /// Traffic is dropped (fail closed).
    NoRoute(NoRoute),
}

/// Why traffic is relayed rather than sent over the direct link. Costs are
/// in µs: latency weighted by loss, plus a penalty per hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayReason {
    /// The direct link is down.
    DirectDown,
    /// The direct link loses too many packets to be used.
    DirectLossy {
        /// Measured loss, ppm.
        loss_ppm: u32,
    },
    /// The relayed path is cheaper.
    DirectSlower {
        /// Cost of the direct link.
        direct_cost_us: u64,
        /// Cost of the relayed path.
        path_cost_us: u64,
    },
    /// The direct link is cheaper again, but not by the hysteresis margin:
    /// the relayed path is kept to avoid flapping.
    KeptByHysteresis {
        /// Cost of the direct link.
        direct_cost_us: u64,
        /// Cost of the relayed path.
        path_cost_us: u64,
    },
}

/// Why two sites have no route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoRoute {
    /// No such site.
    UnknownSite(String),
    /// In gateway mode, this end's site has no gateway up.
    NoGateway {
        /// The site without a gateway.
        site: String,
    },
    /// No path of up links between sites that can relay.
    NoPath,
    /// Paths exist, but each transits a site the residency rules forbid.
    NoCompliantPath {
        /// Tags both ends carry: transit sites must carry all of them.
        tags: Vec<String>,
        /// The sites the best unconstrained path would transit that lack
        /// them.
        forbidden: Vec<String>,
    },
    /// Paths exist and the pair itself is not constrained, but each path
    /// leaves a tagged site for one without the tag before the
    /// destination, which that site's own constrained traffic to the same
    /// destination could not follow (forwarding is by destination only).
    TransitConflict {
        /// The destination's rule tags.
        tags: Vec<String>,
    },
}

impl PathTable {
    /// The route from site `from` to site `to`, with its reason.
    pub fn trace(&self, from: &str, to: &str) -> SiteTrace {
        let g = &self.graph;
        let trace = |hops: Vec<usize>, route| SiteTrace {
            from: from.to_owned(),
            to: to.to_owned(),
            hops: hops.iter().map(|i| g.names[*i].clone()).collect(),
            route,
        };
        let (x, d) = match (g.site_index(from), g.site_index(to)) {
            (Some(x), Some(d)) => (x, d),
            (None, _) => {
                return trace(
                    vec![],
                    SiteRoute::NoRoute(NoRoute::UnknownSite(from.into())),
                );
            }
            (_, None) => return trace(vec![], SiteRoute::NoRoute(NoRoute::UnknownSite(to.into()))),
        };
        if x == d {
            return trace(vec![x], SiteRoute::Local);
        }
        let Some(path) = self.path_idx(x, d) else {
            return trace(vec![], SiteRoute::NoRoute(self.why_no_route(x, d)));
        };
        let link = g.link(x, d);
        if path.len() == 2 {
            let up = g.cost(x, d).is_some();
            return trace(
                path,
                SiteRoute::Direct {
                    latency_us: link.latency_us,
                    up,
                },
            );
        }
        let path_cost_us = self.cost_idx(x, d);
        let reason = match g.cost(x, d) {
            None if link.up => RelayReason::DirectLossy {
                loss_ppm: link.loss_ppm,
            },
            None => RelayReason::DirectDown,
            Some(direct_cost_us) if direct_cost_us < path_cost_us => {
                RelayReason::KeptByHysteresis {
                    direct_cost_us,
                    path_cost_us,
                }
            }
            Some(direct_cost_us) => RelayReason::DirectSlower {
                direct_cost_us,
                path_cost_us,
            },
        };
        let via = path[1..path.len() - 1]
            .iter()
            .map(|i| g.names[*i].clone())
            .collect();
        trace(path, SiteRoute::Relayed { via, reason })
    }

    /// Traces between every ordered pair of sites, for `route list`.
    pub fn trace_all(&self) -> Vec<SiteTrace> {
        let names = &self.graph.names;
        names
            .iter()
            .flat_map(|a| names.iter().filter(move |b| *b != a).map(move |b| (a, b)))
            .map(|(a, b)| self.trace(a, b))
            .collect()
    }

    fn why_no_route(&self, x: usize, d: usize) -> NoRoute {
        let g = &self.graph;
        if self.mode == TopologyMode::Gateways {
            for s in [x, d] {
                if !g.active[s] {
                    return NoRoute::NoGateway {
                        site: g.names[s].clone(),
                    };
                }
            }
        }
        // The best path ignoring residency, if any.
        let free = |a: usize, b: usize| {
            (a != d && g.active[a] && g.active[b])
                .then(|| g.cost(a, b))
                .flatten()
        };
        let (_, next) = dijkstra(g.len(), d, free, |_| None, |_| None);
        let mut transit = Vec::new();
        let mut cur = x;
        while let Some(hop) = next[cur] {
            if hop == d {
                break;
            }
            transit.push(hop);
            cur = hop;
        }
        if next[x].is_none() {
            return NoRoute::NoPath;
        }
        let required = g.required(x, d);
        if required != 0 {
            return NoRoute::NoCompliantPath {
                tags: g.tag_names(required),
                forbidden: transit
                    .into_iter()
                    .filter(|s| !g.may_transit(*s, required))
                    .map(|s| g.names[s].clone())
                    .collect(),
            };
        }
        NoRoute::TransitConflict {
            tags: g.tag_names(g.masks[d]),
        }
    }
}

impl fmt::Display for SiteTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        if !self.hops.is_empty() {
            write!(f, "{}: ", self.hops.join(" -> "))?;
        } else {
            write!(f, "{} -> {}: ", self.from, self.to)?;
        }
        match &self.route {
            SiteRoute::Local => write!(f, "same site, direct"),
            SiteRoute::Direct {
                latency_us,
                up: true,
            } => {
                write!(f, "direct ({:.1} ms)", ms(u64::from(*latency_us)))
            }
            SiteRoute::Direct { up: false, .. } => {
                write!(
                    f,
                    "direct, but the link is down (full-mesh mode does not relay)"
                )
            }
            SiteRoute::Relayed { via, reason } => {
                write!(f, "relayed via {}: ", via.join(", "))?;
                match reason {
                    RelayReason::DirectDown => write!(f, "the direct link is down"),
                    RelayReason::DirectLossy { loss_ppm } => write!(
                        f,
                        "the direct link loses {:.1} % of packets",
                        f64::from(*loss_ppm) / 10_000.0
                    ),
                    RelayReason::DirectSlower {
                        direct_cost_us,
                        path_cost_us,
                    } => write!(
                        f,
                        "the direct link is {:.1} ms slower ({:.1} ms against {:.1} ms)",
                        ms(direct_cost_us - path_cost_us),
                        ms(*direct_cost_us),
                        ms(*path_cost_us)
                    ),
                    RelayReason::KeptByHysteresis {
                        direct_cost_us,
                        path_cost_us,
                    } => write!(
                        f,
                        "kept: the direct link ({:.1} ms) is not enough faster than this path ({:.1} ms) to switch",
                        ms(*direct_cost_us),
                        ms(*path_cost_us)
                    ),
                }
            }
            SiteRoute::NoRoute(why) => {
                write!(f, "no route, traffic is dropped: ")?;
                match why {
                    NoRoute::UnknownSite(s) => write!(f, "no site {s:?}"),
                    NoRoute::NoGateway { site } => write!(f, "site {site} has no gateway up"),
                    NoRoute::NoPath => write!(f, "no path of working links"),
                    NoRoute::NoCompliantPath { tags, forbidden } => write!(
                        f,
                        "no compliant path: traffic between sites tagged {} may transit only such sites, and the paths there cross {}",
                        tags.join(", "),
                        if forbidden.is_empty() {
                            "sites without those tags".to_owned()
                        } else {
                            forbidden.join(", ")
                        }
                    ),
                    NoRoute::TransitConflict { tags } => write!(
                        f,
                        "every path leaves a site tagged {} for one without before reaching the destination",
                        tags.join(", ")
                    ),
                }
            }
        }
    }
}
