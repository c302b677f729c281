//! Pure core of the Weft node agent.
//!
//! No clock, no sockets, no files: the desired configuration of a node
//! ([`config::NodeConfig`]), and the plans that turn an observed state into
//! the desired one ([`plan`], [`routes`] for workload prefixes), the
//! agent's own refusal of unsafe prefixes ([`route_guard`]), peer-probe
//! statistics ([`probe`]), the peers to configure while some are found
//! dead ([`fallback`]), the flow hash that spreads flows over a site's
//! gateways ([`flow`]), human durations for flags ([`duration`]), the
//! WireGuard UAPI protocol ([`uapi`]) and reported text made safe to show
//! ([`escape`]). The
//! agent crate carries the plans out.

pub mod config;
pub mod duration;
pub mod escape;
pub mod fallback;
pub mod flow;
pub mod key;
pub mod plan;
pub mod policy_maps;
pub mod probe;
pub mod route_guard;
pub mod routes;
pub mod uapi;

pub use config::{NodeConfig, PeerConfig};
pub use key::{Key, KeyError};
