//! Types shared between Weft's eBPF programs and the agent: `#[repr(C)]`,
//! fixed-width, no implicit padding, so both sides agree on every byte.
//! The policy datapath's maps are in [`policy`].
#![no_std]

pub mod policy;

/// Name of the per-CPU array map of [`Counters`], indexed by [`Direction`].
pub const COUNTERS_MAP: &str = "WEFT_COUNTERS";
/// Name of the classifier counting packets entering the kernel from the device.
pub const COUNT_INGRESS_PROGRAM: &str = "weft_count_ingress";
/// Name of the classifier counting packets the kernel sends out of the device.
pub const COUNT_EGRESS_PROGRAM: &str = "weft_count_egress";

/// Which TC hook saw a packet; the index of its slot in [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Into the kernel from the device (on the TUN device: what the tunnel
    /// decrypted and wrote).
    Ingress = 0,
    /// Out of the kernel to the device (on the TUN device: what the tunnel
    /// will read and encrypt).
    Egress = 1,
}

impl Direction {
    /// Every direction, in slot order.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// Slot of this direction in [`COUNTERS_MAP`].
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Number of entries of [`COUNTERS_MAP`].
pub const COUNTER_SLOTS: u32 = Direction::ALL.len() as u32;

/// Packet and byte counters of one direction (one CPU's share in the map;
/// the agent sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen: `skb->len`, from the IP header on a TUN device, from the
    /// Ethernet header on an Ethernet device.
    pub bytes: u64,
}

impl Counters {
    /// Counts one packet of `len` bytes (wrapping, as kernel counters do).
    #[inline(always)]
    pub fn record(&mut self, len: u32) {
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(u64::from(len));
    }

    /// Adds another CPU's share (wrapping).
    #[must_use]
    pub const fn merge(self, other: Counters) -> Counters {
        Counters {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// SAFETY: `Counters` is `#[repr(C)]`, `Copy`, made of two `u64`s with no
// padding (asserted below), so every bit pattern is a valid value.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for Counters {}

// The layout is part of the kernel/user contract: fail the build, not the load.
const _: () = assert!(core::mem::size_of::<Counters>() == 16);
const _: () = assert!(core::mem::align_of::<Counters>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_have_no_padding() {
        assert_eq!(
            core::mem::size_of::<Counters>(),
            2 * core::mem::size_of::<u64>(),
            "Counters must be exactly two u64s: no implicit padding"
        );
        assert_eq!(core::mem::offset_of!(Counters, packets), 0);
        assert_eq!(core::mem::offset_of!(Counters, bytes), 8);
    }

    #[test]
    fn directions_cover_the_slots_once() {
        for (i, d) in Direction::ALL.iter().enumerate() {
            assert_eq!(d.index() as usize, i, "{d:?} out of slot order");
        }
        assert_eq!(COUNTER_SLOTS as usize, Direction::ALL.len());
    }

    #[test]
    fn record_and_merge_add_up() {
        let mut a = Counters::default();
        a.record(84);
        a.record(1420);
        let b = Counters {
            packets: 1,
            bytes: 60,
        };
        assert_eq!(
            a.merge(b),
            Counters {
                packets: 3,
                bytes: 1564
            }
        );
    }
}
