//! Weft's gRPC API (`weft.v1`): generated protobuf types and services, and
//! conversions of wire types into validated domain types. Protobuf types stay
//! in this crate's `pb` module; the rest of Weft works with domain types.
//! Also the pieces both ends of the control channel share: join tokens and
//! TLS connection set-up.

pub mod admin_config;
pub mod client;
pub mod convert;
pub mod report;
pub mod token;

/// Generated code for package `weft.v1`.
#[allow(
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod pb {
    tonic::include_proto!("weft.v1");
}

pub use convert::InvalidMessage;
pub use token::JoinToken;
