//! IP address management: one host index per member, lowest free first.
//!
//! Index `i` is IPv4 `pool.network() + i` and IPv6 `prefix + i` (the
//! interface id), so a member's two addresses always go together. Index 0
//! (the network address) and the IPv4 broadcast index are never handed out.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::{Member, NetworkSettings};

/// Which host indices are allocated, and to whom.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipam {
    allocated: BTreeMap<u32, Member>,
}

impl Ipam {
    /// The lowest free host index, or why there is none.
    pub fn next_free(&self, settings: &NetworkSettings) -> Result<u32, Error> {
        let max = max_index(settings.ipv4_pool);
        let mut candidate: u32 = 1;
        for &used in self.allocated.keys() {
            if used > candidate {
                break;
            }
            if used == candidate {
                candidate = candidate.saturating_add(1);
            }
        }
        if candidate > max || candidate == 0 {
            return Err(Error::PoolExhausted {
                pool: settings.ipv4_pool.to_string(),
                in_use: self.allocated.len(),
            });
        }
        Ok(candidate)
    }

    /// Who holds `index`, if anyone.
    pub fn owner(&self, index: u32) -> Option<&Member> {
        self.allocated.get(&index)
    }

    /// All allocations, by index.
    pub fn allocations(&self) -> impl Iterator<Item = (u32, &Member)> {
        self.allocated.iter().map(|(i, m)| (*i, m))
    }

    /// Number of allocated indices.
    pub fn len(&self) -> usize {
        self.allocated.len()
    }

    /// True when nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.allocated.is_empty()
    }

    /// Records `index` as held by `member` (the caller checked it is free).
    pub(crate) fn assign(&mut self, index: u32, member: Member) {
        self.allocated.insert(index, member);
    }

    /// Frees `index`.
    pub(crate) fn release(&mut self, index: u32) -> Option<Member> {
        self.allocated.remove(&index)
    }
}

/// The highest usable IPv4 host index of `pool` (0 when there is none).
pub fn max_index(pool: Ipv4Net) -> u32 {
    let host_bits = 32 - u32::from(pool.prefix_len().min(32));
    // All-ones host part is the broadcast address; minus one more for it.
    let size = 1u64 << host_bits;
    u32::try_from(size.saturating_sub(2)).unwrap_or(u32::MAX)
}

/// The IPv4 address at host index `index` of `pool`.
pub fn ipv4_at(pool: Ipv4Net, index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(pool.network()) | (index & u32::from(pool.hostmask())))
}

/// The IPv6 address at host index `index` of `prefix` (the interface id).
pub fn ipv6_at(prefix: Ipv6Net, index: u32) -> Ipv6Addr {
    Ipv6Addr::from(
        u128::from(prefix.network()) | (u128::from(index) & u128::from(prefix.hostmask())),
    )
}

/// The host index of `addr` in `pool`, if it is a usable host address.
pub fn ipv4_index(pool: Ipv4Net, addr: Ipv4Addr) -> Option<u32> {
    if !pool.contains(&addr) {
        return None;
    }
    let index = u32::from(addr) & u32::from(pool.hostmask());
    (1..=max_index(pool)).contains(&index).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pool: &str) -> NetworkSettings {
        NetworkSettings {
            ipv4_pool: pool.parse().expect("valid pool"),
            ipv6_prefix: "fd7e:4a1:1234::/48".parse().expect("valid prefix"),
            mtu: 1420,
            ..NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"))
        }
    }

    #[test]
    fn index_maps_to_both_families_and_back() {
        let s = settings("100.64.0.0/10");
        assert_eq!(ipv4_at(s.ipv4_pool, 1), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(ipv4_at(s.ipv4_pool, 256), Ipv4Addr::new(100, 64, 1, 0));
        assert_eq!(
            ipv6_at(s.ipv6_prefix, 256).to_string(),
            "fd7e:4a1:1234::100"
        );
        assert_eq!(
            ipv4_index(s.ipv4_pool, Ipv4Addr::new(100, 64, 1, 0)),
            Some(256)
        );
        assert_eq!(max_index(s.ipv4_pool), (1 << 22) - 2);
        assert_eq!(
            ipv4_index(s.ipv4_pool, Ipv4Addr::new(100, 64, 0, 0)),
            None,
            "network"
        );
        assert_eq!(
            ipv4_index(s.ipv4_pool, Ipv4Addr::new(100, 127, 255, 255)),
            None,
            "broadcast"
        );
        assert_eq!(
            ipv4_index(s.ipv4_pool, Ipv4Addr::new(100, 128, 0, 1)),
            None,
            "outside"
        );
    }

    #[test]
    fn lowest_free_first_then_exhausted() {
        let s = settings("100.64.0.0/29");
        let mut ipam = Ipam::default();
        for expected in 1..=6 {
            let i = ipam.next_free(&s).expect("pool has room");
            assert_eq!(i, expected);
            ipam.assign(i, Member::Node(format!("n-{i}")));
        }
        let err = ipam.next_free(&s).expect_err("a /29 has 6 hosts");
        assert_eq!(
            err.to_string(),
            "address pool 100.64.0.0/29 is exhausted (6 addresses in use)"
        );
        ipam.release(3);
        assert_eq!(
            ipam.next_free(&s),
            Ok(3),
            "a released index is reused, lowest first"
        );
    }
}
