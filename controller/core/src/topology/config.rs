//! The operator's topology settings, stored in the state.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::topology::graph::{PathParams, ResidencyRule};

/// How members of different sites reach each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyMode {
    /// Every member peers directly with every other member.
    #[default]
    FullMesh,
    /// Members mesh inside their site; traffic between sites goes through
    /// the sites' gateway nodes, relayed through other sites as the
    /// measured paths say.
    Gateways,
}

/// The operator's topology settings for a network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TopologyConfig {
    /// Full mesh or gateways.
    pub mode: TopologyMode,
    /// Residency tags by site name.
    pub site_tags: BTreeMap<String, BTreeSet<String>>,
    /// Ids of the nodes that are gateways of their site.
    pub gateways: BTreeSet<String>,
    /// Residency rules.
    pub residency: Vec<ResidencyRule>,
    /// Path costs and hysteresis.
    pub params: PathParams,
}

impl TopologyConfig {
    /// Whether these are the defaults (full mesh, nothing set).
    pub fn is_default(&self) -> bool {
        *self == TopologyConfig::default()
    }
}
