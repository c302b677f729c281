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
//!   reference the compiled form is tested against; [`explain`] also says
//!   which rule decided.
//! - [`to_yaml`]: a policy back to the YAML [`parse_documents`] reads.
//! - [`reachability_diff`]: which endpoint pairs gain or lose access when
//!   the policies change (for dry runs).

mod compile;
mod diff;
mod eval;
mod incremental;
mod lookup;
mod model;
mod parse;
mod yaml;

pub use compile::{
    CanonicalTables, Compiled, DstPolicy, Identity, IdentityKey, PolicyTables, RuleList, RuleRef,
    TupleKey, TupleValue, WORLD, compile, compile_for_node,
};
pub use diff::{ReachabilityChange, reachability_diff};
pub use eval::{Decision, Explanation, evaluate, explain};
pub use incremental::update;
pub use lookup::{identity_of, lookup, lookup_rule};
pub use model::{Endpoint, Policy, PortRange, PortRule, Protocol, Rule, Selector, Verdict};
pub(crate) use parse::parse_text;
pub use parse::{
    API_VERSION, KIND, MAX_INPUT_BYTES, MAX_RULES, PolicyError, PolicyErrors, is_label_key,
    is_label_value, parse_documents,
};
pub use yaml::to_yaml;
