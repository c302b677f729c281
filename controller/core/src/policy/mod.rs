//! Network policy: label-selector resources, their validation, and their
//! compilation to identities, an ipcache and rule tuples.
//!
//! - [`parse_documents`]: YAML -> validated [`Policy`]s, every error named
//!   by file, resource and field.
//! - [`compile`] / [`update`]: policies over [`Endpoint`]s -> [`Compiled`]
//!   (full, or only the destinations a change touches).
//! - [`compile_for_node`]: what one node enforces.
//! - [`lookup`]: a packet's verdict from the compiled tables alone.
//! - [`evaluate`]: the same semantics read straight off the policies, the
//!   reference the compiled form is tested against.

mod compile;
mod eval;
mod incremental;
mod lookup;
mod model;
mod parse;

pub use compile::{
    CanonicalTables, Compiled, DstPolicy, Identity, IdentityKey, PolicyTables, TupleKey,
    TupleValue, WORLD, compile, compile_for_node,
};
pub use eval::evaluate;
pub use incremental::update;
pub use lookup::{identity_of, lookup};
pub use model::{Endpoint, Policy, PortRange, PortRule, Protocol, Rule, Selector, Verdict};
pub use parse::{
    API_VERSION, KIND, MAX_INPUT_BYTES, MAX_RULES, PolicyError, PolicyErrors, parse_documents,
};
