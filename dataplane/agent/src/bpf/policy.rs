//! The network-policy datapath: loads `weft_policy_ingress` (enforcing) and
//! `weft_policy_egress` (tracking the flows the node opens), attaches them
//! to a device, and keeps their maps (ipcache, policy, governed, hosted)
//! equal to the lowered policy (`weft_dataplane_core::policy_maps`) by
//! applying diffs: map upserts and deletes, never a program reload. The
//! hosted prefixes (the node's own addresses and advertised workload
//! prefixes) limit enforcement and tracking to traffic of this node:
//! packets it forwards for other members pass unjudged.
//!
//! The maps hold two epochs. A change is written as a diff into the
//! inactive epoch (which holds the policy before last), then one write to
//! the config map makes it active: each packet sees one whole policy.
//! Afterwards the tracked inbound flows that the new policy no longer
//! allows are marked revoked in the connection-tracking table; every other
//! tracked flow keeps passing.
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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_dataplane_core::policy_maps::{
    Decision, IpcacheEntryKey, MapOp, MapsDiff, PolicyEntryKey, PolicyEntryValue, PolicyMaps,
    Verdict,
};
use weft_ebpf_common::Counters;
use weft_ebpf_common::policy::{
    CONFIG_EPOCH, CONFIG_L3_OFFSET, CONFIG_MAP, CONFIG_SKIP_INGRESS_IFINDEX, CONNTRACK_MAP,
    CT_INBOUND, CT_REVOKED, CtKey, CtValue, GOVERNED, GOVERNED_MAP, GovernedKey, HOSTED,
    HOSTED_MAP, IPCACHE_MAP, IpcacheKey, POLICY_EGRESS_PROGRAM, POLICY_INGRESS_PROGRAM, POLICY_MAP,
    PROTO_ICMP, PolicyKey, PolicyValue, PolicyVerdict, RULE_COUNTERS_MAP, VERDICT_COUNTERS_MAP,
};

#[cfg(test)]
use weft_ebpf_common::policy::{FRAGMENTS_MAP, FragKey, FragValue};

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
    /// What each epoch of the maps holds (what the applied diffs add up to).
    epochs: [PolicyMaps; 2],
    /// The epoch the programs read.
    active: u32,
}

/// What [`PolicyDatapath::sync`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SyncReport {
    /// The change from the previously active policy to the new one (empty:
    /// nothing was written).
    pub(crate) change: MapsDiff,
    /// Map operations written into the inactive epoch.
    pub(crate) written: usize,
    /// Tracked inbound flows removed because the new policy denies them.
    pub(crate) flows_revoked: usize,
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
    /// The sum of two sets of counters (of two datapaths).
    #[must_use]
    pub(crate) fn merge(mut self, other: &PolicyCounters) -> PolicyCounters {
        for (total, c) in self.verdicts.iter_mut().zip(other.verdicts) {
            *total = total.merge(c);
        }
        for (rule, c) in &other.rules {
            let total = self.rules.entry(*rule).or_default();
            *total = total.merge(*c);
        }
        self
    }

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
        set_config(&mut ebpf, CONFIG_L3_OFFSET, link.l3_offset(), "l3 offset")?;
        set_config(&mut ebpf, CONFIG_EPOCH, 0, "epoch")?;
        Ok(Self {
            ebpf,
            epochs: [PolicyMaps::default(), PolicyMaps::default()],
            active: 0,
        })
    }

    /// Attaches the classifiers to a workload interface: the node-side end
    /// of a link to workloads (a veth, a bridge port). What the node sends
    /// the workloads leaves through it, so the enforcing classifier goes on
    /// its egress and the tracking one on its ingress. Packets that came in
    /// through `judged_by` (the TUN device, whose classifier already
    /// enforced the policy on them) pass without a second lookup or count.
    pub(crate) fn attach_workload(&mut self, ifname: &str, judged_by: &str) -> anyhow::Result<()> {
        let skip = if_index(judged_by)?;
        set_config(
            &mut self.ebpf,
            CONFIG_SKIP_INGRESS_IFINDEX,
            skip,
            "skip ingress ifindex",
        )?;
        if !tcx_supported()
            && let Err(e) = tc::qdisc_add_clsact(ifname)
        {
            tracing::debug!(ifname, error = %e, "adding clsact qdisc");
        }
        for (program, hook) in [
            (POLICY_INGRESS_PROGRAM, TcAttachType::Egress),
            (POLICY_EGRESS_PROGRAM, TcAttachType::Ingress),
        ] {
            classifier(&mut self.ebpf, program)?
                .attach(ifname, hook)
                .with_context(|| format!("attaching {program} to {ifname} {hook:?}"))?;
        }
        Ok(())
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

    /// What the active epoch of the maps holds.
    pub(crate) fn current(&self) -> &PolicyMaps {
        &self.epochs[self.active as usize]
    }

    /// The epoch the programs read.
    pub(crate) fn active_epoch(&self) -> u32 {
        self.active
    }

    /// Makes `desired` the active policy: a diff into the inactive epoch,
    /// a flip, then the revocation of tracked inbound flows it denies.
    /// Nothing is written when `desired` is already active. On error the
    /// active epoch is unchanged (the inactive one may hold a prefix of the
    /// diff, which the next sync completes).
    pub(crate) fn sync(&mut self, desired: &PolicyMaps) -> anyhow::Result<SyncReport> {
        let change = weft_dataplane_core::policy_maps::diff(self.current(), desired);
        if change.is_empty() {
            return Ok(SyncReport::default());
        }
        let next = 1 - self.active;
        let stale = &self.epochs[next as usize];
        let write = weft_dataplane_core::policy_maps::diff(stale, desired);
        self.apply_epoch(next, &write)?;
        set_config(&mut self.ebpf, CONFIG_EPOCH, next, "epoch")?;
        self.active = next;
        let flows_revoked = self
            .revoke_denied_flows()
            .context("revoking tracked flows the new policy denies")?;
        Ok(SyncReport {
            change,
            written: write.len(),
            flows_revoked,
        })
    }

    /// Applies `diff` to the maps of `epoch`, op by op, without touching
    /// the programs. On error the maps hold a prefix of the diff; the
    /// in-memory copy is updated only for what succeeded, so a later
    /// [`Self::sync`] finishes the job.
    pub(crate) fn apply_epoch(&mut self, epoch: u32, diff: &MapsDiff) -> anyhow::Result<()> {
        for op in diff.ops() {
            match op {
                MapOp::PolicyUpsert(key, value) => self
                    .policy()?
                    .insert(&policy_key(epoch, key), policy_value(value), 0)
                    .with_context(|| format!("{POLICY_MAP}: inserting {key:?}"))?,
                MapOp::GovernedUpsert(identity) => self
                    .governed()?
                    .insert(GovernedKey { epoch, identity }, GOVERNED, 0)
                    .with_context(|| format!("{GOVERNED_MAP}: inserting {identity}"))?,
                MapOp::IpcacheUpsert(key, identity) => self
                    .ipcache()?
                    .insert(&ipcache_key(epoch, key), identity, 0)
                    .with_context(|| format!("{IPCACHE_MAP}: inserting {key:?}"))?,
                MapOp::GovernedDelete(identity) => {
                    remove_present(self.governed()?.remove(&GovernedKey { epoch, identity }))
                        .with_context(|| format!("{GOVERNED_MAP}: removing {identity}"))?;
                }
                MapOp::IpcacheDelete(key) => {
                    remove_present(self.ipcache()?.remove(&ipcache_key(epoch, key)))
                        .with_context(|| format!("{IPCACHE_MAP}: removing {key:?}"))?;
                }
                MapOp::PolicyDelete(key) => {
                    remove_present(self.policy()?.remove(&policy_key(epoch, key)))
                        .with_context(|| format!("{POLICY_MAP}: removing {key:?}"))?;
                }
                MapOp::HostedUpsert(key) => self
                    .hosted()?
                    .insert(&ipcache_key(epoch, key), HOSTED, 0)
                    .with_context(|| format!("{HOSTED_MAP}: inserting {key:?}"))?,
                MapOp::HostedDelete(key) => {
                    remove_present(self.hosted()?.remove(&ipcache_key(epoch, key)))
                        .with_context(|| format!("{HOSTED_MAP}: removing {key:?}"))?;
                }
            }
            op.apply_to(&mut self.epochs[epoch as usize]);
        }
        Ok(())
    }

    /// Marks the tracked inbound flows that the active policy does not
    /// allow as revoked (a revoked rule ends the flows it admitted; flows
    /// the node opened, and flows still allowed, stay). Returns how many.
    fn revoke_denied_flows(&mut self) -> anyhow::Result<usize> {
        let policy = &self.epochs[self.active as usize];
        let mut ct: HashMap<&mut MapData, CtKey, CtValue> =
            HashMap::try_from(map_mut(&mut self.ebpf, CONNTRACK_MAP)?)
                .with_context(|| format!("{CONNTRACK_MAP} is not a hash of CtKey → CtValue"))?;
        let mut revoke = Vec::new();
        for entry in ct.iter() {
            // An entry evicted while we iterate ends the walk early at
            // worst; the flows it skips meet this check on the next change.
            let Ok((key, value)) = entry else { break };
            if value.origin == CT_INBOUND && !flow_allowed(policy, &key) {
                revoke.push((key, value));
            }
        }
        for (key, value) in &revoke {
            let tombstone = CtValue {
                origin: CT_REVOKED,
                ..*value
            };
            ct.insert(key, tombstone, 0)
                .with_context(|| format!("{CONNTRACK_MAP}: revoking {key:?}"))?;
        }
        Ok(revoke.len())
    }

    /// How many flows the connection-tracking table holds (live or idle,
    /// until evicted or revoked).
    pub(crate) fn tracked_flow_count(&self) -> anyhow::Result<u64> {
        let map = self
            .ebpf
            .map(CONNTRACK_MAP)
            .with_context(|| format!("map {CONNTRACK_MAP} missing from the eBPF object"))?;
        let ct: HashMap<&MapData, CtKey, CtValue> = HashMap::try_from(map)
            .with_context(|| format!("{CONNTRACK_MAP} is not a hash of CtKey → CtValue"))?;
        Ok(ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.origin != CT_REVOKED)
            .count() as u64)
    }

    /// The tracked flows (key and entry), for tests and diagnostics.
    #[cfg(test)]
    pub(crate) fn tracked_flows(&self) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
        let map = self
            .ebpf
            .map(CONNTRACK_MAP)
            .with_context(|| format!("map {CONNTRACK_MAP} missing from the eBPF object"))?;
        let ct: HashMap<&MapData, CtKey, CtValue> = HashMap::try_from(map)
            .with_context(|| format!("{CONNTRACK_MAP} is not a hash of CtKey → CtValue"))?;
        Ok(ct.iter().filter_map(Result::ok).collect())
    }

    /// The remembered fragmented datagrams (key and entry), for tests.
    #[cfg(test)]
    pub(crate) fn tracked_datagrams(&self) -> anyhow::Result<Vec<(FragKey, FragValue)>> {
        let map = self
            .ebpf
            .map(FRAGMENTS_MAP)
            .with_context(|| format!("map {FRAGMENTS_MAP} missing from the eBPF object"))?;
        let frags: HashMap<&MapData, FragKey, FragValue> = HashMap::try_from(map)
            .with_context(|| format!("{FRAGMENTS_MAP} is not a hash of FragKey → FragValue"))?;
        Ok(frags.iter().filter_map(Result::ok).collect())
    }

    /// Moves every remembered datagram's first fragment `by_ns` into the
    /// past (tests of the timeout).
    #[cfg(test)]
    pub(crate) fn age_datagrams(&mut self, by_ns: u64) -> anyhow::Result<()> {
        let remembered = self.tracked_datagrams()?;
        let mut frags: HashMap<&mut MapData, FragKey, FragValue> =
            HashMap::try_from(map_mut(&mut self.ebpf, FRAGMENTS_MAP)?)
                .with_context(|| format!("{FRAGMENTS_MAP} is not a hash of FragKey → FragValue"))?;
        for (key, value) in remembered {
            let aged = FragValue {
                first_seen_ns: value.first_seen_ns.saturating_sub(by_ns),
                ..value
            };
            frags
                .insert(key, aged, 0)
                .with_context(|| format!("{FRAGMENTS_MAP}: ageing {key:?}"))?;
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
        let referenced: BTreeSet<u32> = self.current().policy.values().map(|v| v.rule).collect();
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

    fn hosted(&mut self) -> anyhow::Result<LpmTrie<&mut MapData, IpcacheKey, u32>> {
        LpmTrie::try_from(map_mut(&mut self.ebpf, HOSTED_MAP)?)
            .with_context(|| format!("{HOSTED_MAP} is not an LPM trie of IpcacheKey → u32"))
    }

    fn governed(&mut self) -> anyhow::Result<HashMap<&mut MapData, GovernedKey, u32>> {
        HashMap::try_from(map_mut(&mut self.ebpf, GOVERNED_MAP)?)
            .with_context(|| format!("{GOVERNED_MAP} is not a hash of GovernedKey → u32"))
    }

    #[cfg(test)]
    fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Sets `CONFIG_MAP[slot]` (`what` names the slot in errors).
fn set_config(ebpf: &mut Ebpf, slot: u32, value: u32, what: &str) -> anyhow::Result<()> {
    let mut config: Array<&mut MapData, u32> = Array::try_from(map_mut(ebpf, CONFIG_MAP)?)
        .with_context(|| format!("{CONFIG_MAP} is not an array of u32"))?;
    config
        .set(slot, value, 0)
        .with_context(|| format!("setting {CONFIG_MAP}[{what}] to {value}"))
}

/// The index of interface `ifname` in this network namespace.
#[allow(unsafe_code)] // if_nametoindex(3)
fn if_index(ifname: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(ifname)
        .with_context(|| format!("interface name {ifname:?} contains a NUL byte"))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(
        index != 0,
        "interface {ifname:?} not found: {}",
        std::io::Error::last_os_error()
    );
    Ok(index)
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

fn ipcache_key(epoch: u32, key: IpcacheEntryKey) -> Key<IpcacheKey> {
    Key::new(
        IpcacheKey::EPOCH_BITS + key.prefix_len,
        IpcacheKey::v6(epoch, key.addr),
    )
}

fn policy_key(epoch: u32, key: PolicyEntryKey) -> Key<PolicyKey> {
    // Epochs are 0 and 1.
    let epoch = u8::from(epoch != 0);
    Key::new(
        key.prefix_len,
        PolicyKey::new(epoch, key.dst, key.src, key.proto, key.port),
    )
}

/// Whether `policy` lets the first packet of the tracked inbound flow `key`
/// in (ungoverned destination, an address no longer hosted here, whose
/// packets pass unjudged, or an allow rule).
fn flow_allowed(policy: &PolicyMaps, key: &CtKey) -> bool {
    // ICMP rules have port 0; an ICMP key's port says request or reply.
    let port = if key.proto == PROTO_ICMP {
        0
    } else {
        u16::from_be_bytes(key.dst_port)
    };
    matches!(
        policy.decide_packet(addr(key.src), addr(key.dst), key.proto, port),
        Decision::NotGoverned
            | Decision::Forwarded
            | Decision::Rule {
                verdict: Verdict::Allow,
                ..
            }
    )
}

/// A 16-byte kernel address as an `IpAddr` (IPv4-mapped → IPv4).
fn addr(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4.octets())),
        None => IpAddr::V6(v6),
    }
}

fn policy_value(value: PolicyEntryValue) -> PolicyValue {
    PolicyValue {
        verdict: value.verdict.code(),
        rule: value.rule,
    }
}

#[cfg(test)]
mod tests;
