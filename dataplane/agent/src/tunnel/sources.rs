//! The sources a peer may send from besides the prefixes routed to it
//! (`PeerConfig::accept_sources`: traffic a gateway relays for others).
//!
//! A gateway may accept tens of thousands of prefixes, so they are kept as
//! sorted, disjoint, non-adjacent address ranges per family: the check on
//! the packet path is a binary search and allocates nothing.

use std::net::IpAddr;

use ipnet::IpNet;

/// Accepted source ranges of one peer (inclusive bounds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SourceRanges {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl SourceRanges {
    /// The ranges covered by `nets`, merged.
    pub(crate) fn new(nets: &[IpNet]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        SourceRanges {
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    /// Whether `ip` lies in one of the ranges.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => within(&self.v4, u32::from(a)),
            IpAddr::V6(a) => within(&self.v6, u128::from(a)),
        }
    }
}

/// Sorts ranges and joins the overlapping and adjacent ones.
fn merge<A: Ord + Copy + Successor>(mut ranges: Vec<(A, A)>) -> Vec<(A, A)> {
    ranges.sort_unstable();
    let mut out: Vec<(A, A)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if last.1.successor().is_none_or(|next| start <= next) => {
                last.1 = last.1.max(end);
            }
            Some(_) | None => out.push((start, end)),
        }
    }
    out.shrink_to_fit();
    out
}

fn within<A: Ord + Copy>(ranges: &[(A, A)], x: A) -> bool {
    let i = ranges.partition_point(|(start, _)| *start <= x);
    i > 0 && ranges[i - 1].1 >= x
}

trait Successor: Sized {
    fn successor(self) -> Option<Self>;
}

impl Successor for u32 {
    fn successor(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Successor for u128 {
    fn successor(self) -> Option<Self> {
        self.checked_add(1)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use ipnet::{Ipv4Net, Ipv6Net};
    use proptest::prelude::*;

    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter()
            .map(|s| s.parse().expect("test prefix"))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn overlapping_and_adjacent_prefixes_merge() {
        let r = SourceRanges::new(&nets(&[
            "100.64.1.0/24",
            "100.64.0.0/24",
            "100.64.0.128/25",
            "100.64.3.0/24",
            "0.0.0.0/0",
        ]));
        assert_eq!(r.v4, vec![(0, u32::MAX)]);
        let r = SourceRanges::new(&nets(&[
            "100.64.1.0/24",
            "100.64.0.0/24",
            "100.64.3.0/24",
            "fd00::/64",
        ]));
        assert_eq!(r.v4.len(), 2);
        assert!(r.contains(ip("100.64.0.0")) && r.contains(ip("100.64.1.255")));
        assert!(!r.contains(ip("100.64.2.0")) && r.contains(ip("100.64.3.9")));
        assert!(!r.contains(ip("100.63.255.255")) && !r.contains(ip("100.64.4.0")));
        assert!(r.contains(ip("fd00::ffff")) && !r.contains(ip("fd00:0:0:1::")));
        assert_eq!(SourceRanges::new(&[]), SourceRanges::default());
    }

    fn any_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
                IpNet::V4(
                    Ipv4Net::new(Ipv4Addr::from(a), l)
                        .expect("valid length")
                        .trunc(),
                )
            }),
            // Few distinct high bits, so that IPv6 prefixes overlap too.
            (0u128..4, any::<u64>(), 0u8..=128).prop_map(|(hi, lo, l)| {
                let a = (0xfd00_u128 << 112) | (hi << 64) | u128::from(lo);
                IpNet::V6(
                    Ipv6Net::new(Ipv6Addr::from(a), l)
                        .expect("valid length")
                        .trunc(),
                )
            }),
        ]
    }

    fn near(nets: Vec<IpNet>) -> impl Strategy<Value = (Vec<IpNet>, Vec<IpAddr>)> {
        // Probe the bounds of every prefix and one step beyond them.
        let mut probes = Vec::new();
        for n in &nets {
            match n {
                IpNet::V4(n) => {
                    let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
                    for a in [lo.wrapping_sub(1), lo, hi, hi.wrapping_add(1)] {
                        probes.push(IpAddr::V4(Ipv4Addr::from(a)));
                    }
                }
                IpNet::V6(n) => {
                    let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
                    for a in [lo.wrapping_sub(1), lo, hi, hi.wrapping_add(1)] {
                        probes.push(IpAddr::V6(Ipv6Addr::from(a)));
                    }
                }
            }
        }
        Just((nets, probes))
    }

    proptest! {
        #[test]
        fn contains_agrees_with_the_prefixes(
            (nets, probes) in prop::collection::vec(any_net(), 0..40).prop_flat_map(near),
            extra in prop::collection::vec(any::<u32>(), 0..20),
        ) {
            let r = SourceRanges::new(&nets);
            let extra = extra.into_iter().map(|a| IpAddr::V4(Ipv4Addr::from(a)));
            for a in probes.into_iter().chain(extra) {
                prop_assert_eq!(r.contains(a), nets.iter().any(|n| n.contains(&a)), "{}", a);
            }
        }
    }
}
