//! Which gateway of a site is a destination's primary.
//!
//! WireGuard routes a prefix to exactly one peer, so each destination
//! member is assigned a primary gateway (Weft agents then spread flows
//! over it and its site's other gateways, see `fabric`; plain WireGuard
//! peers stay on the primary) by rendezvous hashing (highest score of
//! hash(member key, gateway key)). Every member of the world computes the
//! same choice, spreading destinations evenly; when a gateway goes down only
//! its share moves, each destination to its second-best gateway, and the
//! others stay where they were.

use weft_dataplane_core::Key;
use weft_dataplane_core::flow::mix;

/// A stable 64-bit digest of a public key.
pub fn key_hash(key: &Key) -> u64 {
    key.0.chunks_exact(8).fold(0x5745_4654_u64, |h, chunk| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        mix(h ^ u64::from_le_bytes(word))
    })
}

/// The rendezvous score of a destination on a gateway (both by
/// [`key_hash`]).
pub fn score(destination: u64, gateway: u64) -> u64 {
    mix(destination ^ mix(gateway))
}

/// Index of the gateway (by hash, in `gateways`) with the highest score for
/// `destination`; ties go to the lower index. `None` without gateways.
pub fn pick(destination: u64, gateways: impl IntoIterator<Item = u64>) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (i, g) in gateways.into_iter().enumerate() {
        let s = score(destination, g);
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> u64 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        key_hash(&Key(k))
    }

    #[test]
    fn destinations_spread_and_only_the_lost_share_moves() {
        let gws = [key(1_000_001), key(1_000_002), key(1_000_003)];
        let dests: Vec<u64> = (0..3000).map(key).collect();
        let before: Vec<usize> = dests
            .iter()
            .map(|d| pick(*d, gws).expect("gateways"))
            .collect();
        for g in 0..3 {
            let n = before.iter().filter(|c| **c == g).count();
            assert!((800..1200).contains(&n), "gateway {g} carries {n} of 3000");
        }
        // Gateway 1 goes down: its share moves, nothing else does.
        let survivors = [gws[0], gws[2]];
        for (d, old) in dests.iter().zip(&before) {
            let new = pick(*d, survivors).expect("gateways");
            let new = if new == 0 { 0 } else { 2 };
            if *old != 1 {
                assert_eq!(new, *old, "a destination on a surviving gateway moved");
            }
        }
        assert_eq!(pick(1, []), None);
    }
}
