//! Pure core of the Weft node agent.
//!
//! No clock, no sockets, no files: the desired configuration of a node
//! ([`config::NodeConfig`]), and the plans that turn an observed state into
//! the desired one ([`plan`], [`routes`] for workload prefixes), peer-probe
//! statistics ([`probe`]), and the peers to configure while some are found
//! dead ([`fallback`]). The agent crate carries the plans out.

pub mod config;
pub mod fallback;
pub mod key;
pub mod plan;
pub mod policy_maps;
pub mod probe;
pub mod routes;

pub use config::{NodeConfig, PeerConfig};
pub use key::{Key, KeyError};
