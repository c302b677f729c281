//! The network-policy datapath: loads `weft_policy_ingress` (enforcing) and
//! `weft_policy_egress` (counting only, for now), attaches them to a device,
//! and keeps their maps (ipcache, policy, governed) equal to the lowered
//! policy (`weft_dataplane_core::policy_maps`) by applying diffs: map
//! upserts and deletes, never a program reload.
//!
//! The agent loads it at start, attaches it to the TUN device before
//! re-applying its persisted config, and syncs the maps on every applied
//! config. Links live as long as the [`PolicyDatapath`] (no pinning: a
//! restarted agent reattaches before its peers are configured).

use std::collections::BTreeSet;

use anyhow::Context as _;
use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::TcAttachType;
use aya::programs::tc;
use weft_dataplane_core::policy_maps::{
    IpcacheEntryKey, MapsDiff, PolicyEntryKey, PolicyEntryValue, PolicyMaps,
};
use weft_ebpf_common::Counters;
use weft_ebpf_common::policy::{
    CONFIG_L3_OFFSET, CONFIG_MAP, GOVERNED, GOVERNED_MAP, IPCACHE_MAP, IpcacheKey,
    POLICY_EGRESS_PROGRAM, POLICY_INGRESS_PROGRAM, POLICY_MAP, PolicyKey, PolicyValue,
    PolicyVerdict, RULE_COUNTERS_MAP, VERDICT_COUNTERS_MAP,
};

use super::{OBJECT, classifier, tcx_supported};

/// Which hook each policy classifier goes on.
const POLICY_HOOKS: [(&str, TcAttachType); 2] = [
    (POLICY_INGRESS_PROGRAM, TcAttachType::Ingress),
    (POLICY_EGRESS_PROGRAM, TcAttachType::Egress),
];

/// What precedes the IP header on the device: the program reads the offset
/// from its config map, set once at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkLayer {
    /// An L3 device (the TUN device `weft0`): the packet starts at the IP
    /// header.
    Ip,
    /// An Ethernet device (a workload veth), and BPF_PROG_TEST_RUN, which
    /// always hands TC programs an Ethernet frame.
    Ethernet,
}

impl LinkLayer {
    fn l3_offset(self) -> u32 {
        match self {
            LinkLayer::Ip => 0,
            LinkLayer::Ethernet => 14,
        }
    }
}

/// The policy classifiers and their maps, loaded into the kernel; attached
/// to devices by [`PolicyDatapath::attach`] until dropped.
#[derive(Debug)]
pub(crate) struct PolicyDatapath {
    /// Owns the programs, their links and the maps.
    ebpf: Ebpf,
    /// What the maps hold (what the applied diffs add up to).
    current: PolicyMaps,
}

/// The policy counters, summed over all CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PolicyCounters {
    /// Per verdict, indexed by [`PolicyVerdict::index`].
    pub(crate) verdicts: [Counters; PolicyVerdict::ALL.len()],
    /// Per rule slot referenced by the current policy entries.
    pub(crate) rules: std::collections::BTreeMap<u32, Counters>,
}

impl PolicyCounters {
    /// The counter of one verdict.
    pub(crate) fn verdict(&self, verdict: PolicyVerdict) -> Counters {
        self.verdicts[verdict.index() as usize]
    }
}

impl PolicyDatapath {
    /// Loads (verifies) the policy classifiers for a device of `link`
    /// type, with empty maps: every destination is ungoverned, so
    /// everything passes until [`Self::apply`] says otherwise.
    pub(crate) fn load(link: LinkLayer) -> anyhow::Result<Self> {
        let mut ebpf =
            Ebpf::load(OBJECT).context("loading the eBPF object (needs CAP_BPF, Linux >= 5.11)")?;
        for (program, _) in POLICY_HOOKS {
            classifier(&mut ebpf, program)?
                .load()
                .with_context(|| format!("verifying {program}"))?;
        }
        let mut config: Array<&mut MapData, u32> = Array::try_from(map_mut(&mut ebpf, CONFIG_MAP)?)
            .with_context(|| format!("{CONFIG_MAP} is not an array of u32"))?;
        config
            .set(CONFIG_L3_OFFSET, link.l3_offset(), 0)
            .with_context(|| format!("setting {CONFIG_MAP}[l3 offset]"))?;
        Ok(Self {
            ebpf,
            current: PolicyMaps::default(),
        })
    }

    /// Attaches both classifiers to `ifname` (in the calling thread's
    /// network namespace).
    pub(crate) fn attach(&mut self, ifname: &str) -> anyhow::Result<()> {
        if !tcx_supported()
            && let Err(e) = tc::qdisc_add_clsact(ifname)
        {
            tracing::debug!(ifname, error = %e, "adding clsact qdisc");
        }
        for (program, hook) in POLICY_HOOKS {
            classifier(&mut self.ebpf, program)?
                .attach(ifname, hook)
                .with_context(|| format!("attaching {program} to {ifname} {hook:?}"))?;
        }
        Ok(())
    }

    /// What the maps hold.
    pub(crate) fn current(&self) -> &PolicyMaps {
        &self.current
    }

    /// Brings the maps to `desired` by a diff from what they hold.
    pub(crate) fn sync(&mut self, desired: &PolicyMaps) -> anyhow::Result<MapsDiff> {
        let diff = weft_dataplane_core::policy_maps::diff(&self.current, desired);
        self.apply(&diff)?;
        Ok(diff)
    }

    /// Applies `diff` to the live maps, in the order [`MapsDiff`] documents
    /// (upserts, governed changes, then deletes), without touching the
    /// programs. On error the maps hold a prefix of the diff; the in-memory
    /// copy is updated only for what succeeded, so a later [`Self::sync`]
    /// finishes the job.
    pub(crate) fn apply(&mut self, diff: &MapsDiff) -> anyhow::Result<()> {
        for &(key, identity) in &diff.ipcache_upserts {
            self.ipcache()?
                .insert(&ipcache_key(key), identity, 0)
                .with_context(|| format!("{IPCACHE_MAP}: inserting {key:?}"))?;
            self.current.ipcache.insert(key, identity);
        }
        for &(key, value) in &diff.policy_upserts {
            self.policy()?
                .insert(&policy_key(key), policy_value(value), 0)
                .with_context(|| format!("{POLICY_MAP}: inserting {key:?}"))?;
            self.current.policy.insert(key, value);
        }
        for &identity in &diff.governed_upserts {
            self.governed()?
                .insert(identity, GOVERNED, 0)
                .with_context(|| format!("{GOVERNED_MAP}: inserting {identity}"))?;
            self.current.governed.insert(identity);
        }
        for &identity in &diff.governed_deletes {
            remove_present(self.governed()?.remove(&identity))
                .with_context(|| format!("{GOVERNED_MAP}: removing {identity}"))?;
            self.current.governed.remove(&identity);
        }
        for &key in &diff.policy_deletes {
            remove_present(self.policy()?.remove(&policy_key(key)))
                .with_context(|| format!("{POLICY_MAP}: removing {key:?}"))?;
            self.current.policy.remove(&key);
        }
        for &key in &diff.ipcache_deletes {
            remove_present(self.ipcache()?.remove(&ipcache_key(key)))
                .with_context(|| format!("{IPCACHE_MAP}: removing {key:?}"))?;
            self.current.ipcache.remove(&key);
        }
        Ok(())
    }

    /// The per-verdict counters and the per-rule counters of the rules the
    /// current policy references, summed over CPUs.
    pub(crate) fn counters(&self) -> anyhow::Result<PolicyCounters> {
        let mut out = PolicyCounters {
            verdicts: self.verdict_counters()?,
            ..PolicyCounters::default()
        };
        let rules = per_cpu_counters(&self.ebpf, RULE_COUNTERS_MAP)?;
        let referenced: BTreeSet<u32> = self.current.policy.values().map(|v| v.rule).collect();
        for rule in referenced {
            out.rules
                .insert(rule, sum(&rules, rule, RULE_COUNTERS_MAP)?);
        }
        Ok(out)
    }

    /// The per-verdict counters, indexed by [`PolicyVerdict::index`],
    /// summed over CPUs.
    pub(crate) fn verdict_counters(&self) -> anyhow::Result<[Counters; PolicyVerdict::ALL.len()]> {
        let verdicts = per_cpu_counters(&self.ebpf, VERDICT_COUNTERS_MAP)?;
        let mut out = [Counters::default(); PolicyVerdict::ALL.len()];
        for verdict in PolicyVerdict::ALL {
            out[verdict.index() as usize] = sum(&verdicts, verdict.index(), VERDICT_COUNTERS_MAP)?;
        }
        Ok(out)
    }

    /// The per-rule counter of `rule`, summed over CPUs.
    pub(crate) fn rule_counter(&self, rule: u32) -> anyhow::Result<Counters> {
        let rules = per_cpu_counters(&self.ebpf, RULE_COUNTERS_MAP)?;
        sum(&rules, rule, RULE_COUNTERS_MAP)
    }

    fn ipcache(&mut self) -> anyhow::Result<LpmTrie<&mut MapData, IpcacheKey, u32>> {
        LpmTrie::try_from(map_mut(&mut self.ebpf, IPCACHE_MAP)?)
            .with_context(|| format!("{IPCACHE_MAP} is not an LPM trie of IpcacheKey → u32"))
    }

    fn policy(&mut self) -> anyhow::Result<LpmTrie<&mut MapData, PolicyKey, PolicyValue>> {
        LpmTrie::try_from(map_mut(&mut self.ebpf, POLICY_MAP)?)
            .with_context(|| format!("{POLICY_MAP} is not an LPM trie of PolicyKey → PolicyValue"))
    }

    fn governed(&mut self) -> anyhow::Result<HashMap<&mut MapData, u32, u32>> {
        HashMap::try_from(map_mut(&mut self.ebpf, GOVERNED_MAP)?)
            .with_context(|| format!("{GOVERNED_MAP} is not a hash of u32 → u32"))
    }

    #[cfg(test)]
    fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

/// A delete of an entry that is already gone is done.
fn remove_present(result: Result<(), aya::maps::MapError>) -> anyhow::Result<()> {
    match result {
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn per_cpu_counters<'a>(
    ebpf: &'a Ebpf,
    name: &str,
) -> anyhow::Result<PerCpuArray<&'a MapData, Counters>> {
    let map = ebpf
        .map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    PerCpuArray::try_from(map).with_context(|| format!("{name} is not a per-CPU array of Counters"))
}

fn sum(map: &PerCpuArray<&MapData, Counters>, index: u32, name: &str) -> anyhow::Result<Counters> {
    let per_cpu = map
        .get(&index, 0)
        .with_context(|| format!("reading {name}[{index}]"))?;
    Ok(per_cpu
        .iter()
        .fold(Counters::default(), |total, cpu| total.merge(*cpu)))
}

fn ipcache_key(key: IpcacheEntryKey) -> Key<IpcacheKey> {
    Key::new(key.prefix_len, IpcacheKey::v6(key.addr))
}

fn policy_key(key: PolicyEntryKey) -> Key<PolicyKey> {
    Key::new(
        key.prefix_len,
        PolicyKey::new(key.dst, key.src, key.proto, key.port),
    )
}

fn policy_value(value: PolicyEntryValue) -> PolicyValue {
    PolicyValue {
        verdict: value.verdict.code(),
        rule: value.rule,
    }
}

#[cfg(test)]
mod tests;
