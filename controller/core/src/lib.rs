//! Pure core of the Weft controller.
//!
//! The desired state of the network ([`State`]: sites, nodes, external
//! peers, join tokens, address allocations), its validated mutations, the
//! per-node WireGuard configs computed from it ([`netmap`]), and multi-site
//! path computation with per-member routes ([`topology`]). No clock,
//! randomness or I/O: times and generated ids are arguments.

pub mod admin;
pub mod error;
pub mod guard;
pub mod ipam;
pub mod model;
pub mod netmap;
pub mod policy;
pub mod state;
pub mod time;
pub mod topology;

pub use error::{Error, ErrorKind};
pub use guard::Protected;
pub use model::{
    ExternalPeer, JoinToken, Labels, Member, NetworkSettings, Node, NodeCert, PendingPrefix,
    Registration, Site, TokenGrants,
};
pub use netmap::{all_node_configs, external_peer_config, node_config};
pub use state::{PolicyChanges, State};
