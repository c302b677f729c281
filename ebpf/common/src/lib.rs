//! Types shared between Weft's eBPF programs and the agent: `#[repr(C)]`,
//! fixed-width, no implicit padding. Policy maps arrive with eBPF policy.
#![no_std]

/// Per-interface packet counters kept by the overlay classifier, indexed by
/// [`Counter`] in a per-CPU array map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets seen.
    Packets = 0,
    /// Bytes seen.
    Bytes = 1,
}

/// Number of entries of the counter map.
pub const COUNTER_SLOTS: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_slots_cover_every_counter() {
        assert!((Counter::Bytes as u32) < COUNTER_SLOTS);
        assert!((Counter::Packets as u32) < COUNTER_SLOTS);
    }
}
