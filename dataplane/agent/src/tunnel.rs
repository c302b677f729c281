//! Userspace WireGuard tunnel.
