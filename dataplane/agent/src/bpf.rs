//! eBPF on the overlay device: loads Weft's classifiers (ebpf/programs,
//! compiled by build.rs and embedded in the binary) and attaches them to the
//! TUN device with TC (tcx links on Linux >= 6.6, clsact filters before).
//!
//! [`OverlayCounters`] only counts packets and bytes per direction; it never
//! drops. Dropping it detaches them. [`policy`] is the network-policy
//! datapath, which the agent attaches to the TUN device and keeps in line
//! with each applied config.

use anyhow::Context as _;
use aya::Ebpf;
use aya::maps::PerCpuArray;
use aya::programs::{SchedClassifier, TcAttachType, tc};
use aya::util::KernelVersion;
use weft_ebpf_common::{
    COUNT_EGRESS_PROGRAM, COUNT_INGRESS_PROGRAM, COUNTERS_MAP, Counters, Direction,
};

#[allow(
    dead_code,
    reason = "the Ethernet link layer (workload interfaces), per-rule counters and map \
              inspection are used only by its tests so far"
)]
pub(crate) mod policy;

/// Packet and byte counters of one interface, per direction, attached while
/// this value lives.
#[derive(Debug)]
pub(crate) struct OverlayCounters {
    /// Owns the programs, their links and the counter map.
    ebpf: Ebpf,
    ifname: String,
}

/// Counters summed over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct OverlayStats {
    /// Into the kernel from the interface (on the TUN device: decrypted
    /// traffic from peers).
    pub(crate) ingress: Counters,
    /// Out of the kernel to the interface (on the TUN device: traffic the
    /// tunnel will encrypt for peers).
    pub(crate) egress: Counters,
}

impl OverlayCounters {
    /// Loads the counting classifiers and attaches them to the ingress and
    /// egress of `ifname` (in the calling thread's network namespace).
    /// Needs CAP_BPF and CAP_NET_ADMIN.
    pub(crate) fn attach(ifname: &str) -> anyhow::Result<Self> {
        let mut ebpf = load()?;
        if !tcx_supported() {
            // Netlink attach needs the clsact qdisc; "exists" is fine and
            // any real problem shows up in `attach` below.
            if let Err(e) = tc::qdisc_add_clsact(ifname) {
                tracing::debug!(ifname, error = %e, "adding clsact qdisc");
            }
        }
        for (program, hook) in HOOKS {
            classifier(&mut ebpf, program)?
                .attach(ifname, hook)
                .with_context(|| format!("attaching {program} to {ifname} {hook:?}"))?;
        }
        Ok(Self {
            ebpf,
            ifname: ifname.to_owned(),
        })
    }

    /// Reads the counters, summed over all CPUs.
    pub(crate) fn read(&self) -> anyhow::Result<OverlayStats> {
        read_stats(&self.ebpf).with_context(|| format!("eBPF counters of {}", self.ifname))
    }
}

/// The object build.rs leaves in OUT_DIR (the `[[bin]]` of ebpf/programs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-overlay"));

/// Which classifier goes on which hook: one per hook, as a TC program cannot
/// tell which hook runs it.
const HOOKS: [(&str, TcAttachType); 2] = [
    (COUNT_INGRESS_PROGRAM, TcAttachType::Ingress),
    (COUNT_EGRESS_PROGRAM, TcAttachType::Egress),
];

/// Loads the object and its classifiers into the kernel, attached nowhere.
fn load() -> anyhow::Result<Ebpf> {
    let mut ebpf =
        Ebpf::load(OBJECT).context("loading the eBPF object (needs CAP_BPF, Linux >= 5.11)")?;
    for (program, _) in HOOKS {
        classifier(&mut ebpf, program)?
            .load()
            .with_context(|| format!("verifying {program}"))?;
    }
    Ok(ebpf)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a TC classifier"))
}

fn read_stats(ebpf: &Ebpf) -> anyhow::Result<OverlayStats> {
    let map = ebpf
        .map(COUNTERS_MAP)
        .with_context(|| format!("map {COUNTERS_MAP} missing from the eBPF object"))?;
    let counters = PerCpuArray::<_, Counters>::try_from(map)
        .with_context(|| format!("map {COUNTERS_MAP} is not a per-CPU array of Counters"))?;
    let total = |direction: Direction| -> anyhow::Result<Counters> {
        let per_cpu = counters
            .get(&direction.index(), 0)
            .with_context(|| format!("reading {COUNTERS_MAP}[{direction:?}]"))?;
        Ok(per_cpu
            .iter()
            .fold(Counters::default(), |sum, cpu| sum.merge(*cpu)))
    };
    Ok(OverlayStats {
        ingress: total(Direction::Ingress)?,
        egress: total(Direction::Egress)?,
    })
}

/// tcx links (Linux >= 6.6) need no qdisc; aya falls back to netlink before.
fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

#[cfg(test)]
// Only `setns(2)`, to attach inside a test network namespace.
#[allow(unsafe_code)]
mod tests {
    use std::fs::File;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::os::fd::AsRawFd as _;
    use std::process::Command;

    use aya::programs::{TestRun as _, TestRunOptions};

    use super::*;

    /// `TC_ACT_UNSPEC` (-1) as BPF_PROG_TEST_RUN reports it: "no verdict",
    /// the packet goes on (`TCX_NEXT`: the next program on the hook runs).
    const TC_ACT_UNSPEC: u32 = u32::MAX;

    /// Runs `program` on `frame` `repeat` times with BPF_PROG_TEST_RUN and
    /// returns its verdict. The kernel feeds TC programs an Ethernet frame
    /// here (it runs `eth_type_trans` on the input), so `skb->len` is the
    /// whole frame.
    fn test_run(ebpf: &mut Ebpf, program: &str, frame: &[u8], repeat: u32) -> u32 {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        };
        classifier(ebpf, program)
            .expect("classifier in the object")
            .test_run(opts)
            .map_err(anyhow::Error::from)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {program} failed (root?): {e:#}"))
            .return_value
    }

    fn load_for_test() -> Ebpf {
        load().unwrap_or_else(|e| panic!("loading the classifiers failed (run as root): {e:#}"))
    }

    fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(14 + payload.len());
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// IPv4 ICMP echo request with `data_len` bytes of data (checksums are
    /// not checked on this path, only the IPv4 header one is filled in).
    fn ipv4_echo(src: Ipv4Addr, dst: Ipv4Addr, data_len: usize) -> Vec<u8> {
        let total = u16::try_from(20 + 8 + data_len).expect("packet fits in 64 KiB");
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]); // id, DF, ttl, ICMP, csum
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        let csum = ipv4_checksum(&p);
        p[10..12].copy_from_slice(&csum.to_be_bytes());
        p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]); // echo request, id 1, seq 1
        p.resize(usize::from(total), 0xab);
        p
    }

    /// IPv6 ICMPv6 echo request with `data_len` bytes of data.
    fn ipv6_echo(src: Ipv6Addr, dst: Ipv6Addr, data_len: usize) -> Vec<u8> {
        let payload = u16::try_from(8 + data_len).expect("payload fits in 64 KiB");
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&payload.to_be_bytes());
        p.extend_from_slice(&[58, 64]); // ICMPv6, hop limit
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]); // echo request
        p.resize(40 + usize::from(payload), 0xcd);
        p
    }

    fn ipv4_checksum(header: &[u8]) -> u16 {
        let sum: u32 = header
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        !u16::try_from((folded & 0xffff) + (folded >> 16)).expect("folded to 16 bits")
    }

    fn frame_len(frame: &[u8]) -> u64 {
        u64::try_from(frame.len()).expect("frame length fits u64")
    }

    #[test]
    fn test_run_counts_ipv4_and_ipv6_ingress_exactly_and_passes() {
        let mut ebpf = load_for_test();
        let v4 = ethernet(
            0x0800,
            &ipv4_echo(
                Ipv4Addr::new(100, 64, 0, 2),
                Ipv4Addr::new(100, 64, 0, 1),
                56,
            ),
        );
        let v6 = ethernet(
            0x86dd,
            &ipv6_echo(
                "fd00:77::2".parse().expect("address"),
                "fd00:77::1".parse().expect("address"),
                1000,
            ),
        );
        assert_eq!(read_stats(&ebpf).expect("read"), OverlayStats::default());

        let v4_verdict = test_run(&mut ebpf, COUNT_INGRESS_PROGRAM, &v4, 3);
        let v6_verdict = test_run(&mut ebpf, COUNT_INGRESS_PROGRAM, &v6, 2);

        assert_eq!(
            v4_verdict, TC_ACT_UNSPEC,
            "IPv4 packet must pass (TC_ACT_UNSPEC)"
        );
        assert_eq!(
            v6_verdict, TC_ACT_UNSPEC,
            "IPv6 packet must pass (TC_ACT_UNSPEC)"
        );
        let stats = read_stats(&ebpf).expect("read");
        assert_eq!(
            stats.ingress,
            Counters {
                packets: 5,
                bytes: 3 * frame_len(&v4) + 2 * frame_len(&v6),
            },
            "ingress must count 3 IPv4 ({} B) and 2 IPv6 ({} B) runs",
            v4.len(),
            v6.len()
        );
        assert_eq!(stats.egress, Counters::default(), "egress untouched");
    }

    #[test]
    fn test_run_counts_egress_apart_from_ingress() {
        let mut ebpf = load_for_test();
        let v4 = ethernet(
            0x0800,
            &ipv4_echo(
                Ipv4Addr::new(198, 18, 0, 1),
                Ipv4Addr::new(198, 18, 0, 2),
                1372,
            ),
        );
        // Not IP at all (ARP request): counted and passed all the same.
        // (The kernel refuses frames with nothing after the Ethernet header.)
        let arp = ethernet(
            0x0806,
            &[
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18,
                0, 2,
            ],
        );

        let verdict = test_run(&mut ebpf, COUNT_EGRESS_PROGRAM, &v4, 4);
        let arp_verdict = test_run(&mut ebpf, COUNT_EGRESS_PROGRAM, &arp, 1);

        assert_eq!(verdict, TC_ACT_UNSPEC, "egress must pass (TC_ACT_UNSPEC)");
        assert_eq!(arp_verdict, TC_ACT_UNSPEC, "a non-IP frame must pass too");
        let stats = read_stats(&ebpf).expect("read");
        assert_eq!(
            stats.egress,
            Counters {
                packets: 5,
                bytes: 4 * frame_len(&v4) + frame_len(&arp),
            }
        );
        assert_eq!(stats.ingress, Counters::default(), "ingress untouched");
    }

    /// Two fresh network namespaces joined by a veth pair; deleted on drop
    /// (which takes the veth with them).
    struct VethLab {
        ns_a: String,
        ns_b: String,
        if_a: String,
    }

    const ADDR_A: &str = "198.18.233.1";
    const ADDR_B: &str = "198.18.233.2";

    impl VethLab {
        fn create() -> Self {
            let pid = std::process::id();
            let lab = Self {
                ns_a: format!("weft-bpf-a-{pid}"),
                ns_b: format!("weft-bpf-b-{pid}"),
                if_a: format!("wbpa{pid}"),
            };
            let if_b = format!("wbpb{pid}");
            let (a, b) = (lab.ns_a.as_str(), lab.ns_b.as_str());
            // The guard exists before the first command: a failure half-way
            // still deletes whatever was created.
            ip(&["netns", "add", a]);
            ip(&["netns", "add", b]);
            ip(&[
                "link", "add", &lab.if_a, "netns", a, "type", "veth", "peer", "name", &if_b,
                "netns", b,
            ]);
            for (ns, ifname, addr) in [(a, lab.if_a.as_str(), ADDR_A), (b, &if_b, ADDR_B)] {
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/30"),
                    "dev",
                    ifname,
                ]);
                ip(&["-n", ns, "link", "set", ifname, "up"]);
            }
            lab
        }
    }

    impl Drop for VethLab {
        fn drop(&mut self) {
            for ns in [&self.ns_a, &self.ns_b] {
                // Never panic here (we may be unwinding already).
                match Command::new("ip").args(["netns", "del", ns]).status() {
                    Ok(s) if s.success() => {}
                    other => eprintln!("VethLab: deleting netns {ns} failed: {other:?}"),
                }
            }
        }
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("running `ip` (iproute2)");
        assert!(
            out.status.success(),
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Moves the calling thread (only) into network namespace `ns`.
    fn enter_netns(ns: &str) {
        let file = File::open(format!("/run/netns/{ns}")).expect("open netns file");
        // SAFETY: `file` is an open netns descriptor for the whole call;
        // setns only changes this thread's namespace, which the caller owns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({ns}): {}", std::io::Error::last_os_error());
    }

    #[test]
    fn counts_a_ping_over_a_veth_in_a_fresh_netns() {
        let lab = VethLab::create();
        const PINGS: u64 = 3;
        // Load and attach from a thread inside the namespace (interface
        // names resolve there); the links live as long as the thread holds
        // `counters`, i.e. until after the ping and the read.
        let (before, after, ping) = std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&lab.ns_a);
                let counters = OverlayCounters::attach(&lab.if_a)
                    .unwrap_or_else(|e| panic!("attach to {}: {e:#}", lab.if_a));
                let before = counters.read().expect("read before");
                let ping = Command::new("ip")
                    .args(["netns", "exec", &lab.ns_a, "ping", "-n", "-q"])
                    .args(["-c", &PINGS.to_string(), "-i", "0.2", "-W", "2", ADDR_B])
                    .output()
                    .expect("running ping");
                let after = counters.read().expect("read after");
                (before, after, ping)
            })
            .join()
            .expect("netns thread panicked")
        });

        assert!(
            ping.status.success(),
            "ping {ADDR_B} with the counters attached failed (a dropped packet?): {}{}",
            String::from_utf8_lossy(&ping.stdout),
            String::from_utf8_lossy(&ping.stderr)
        );
        // Echo request/reply: 14 B Ethernet + 20 B IPv4 + 8 B ICMP + 56 B data.
        // ARP and IPv6 neighbour discovery may add packets, never remove any.
        let min_bytes = PINGS * 98;
        let egress = after.egress.packets - before.egress.packets;
        let ingress = after.ingress.packets - before.ingress.packets;
        assert!(
            egress >= PINGS,
            "egress grew by {egress} packets, want >= {PINGS}"
        );
        assert!(
            ingress >= PINGS,
            "ingress grew by {ingress} packets, want >= {PINGS}"
        );
        assert!(
            after.egress.bytes - before.egress.bytes >= min_bytes,
            "egress bytes {before:?} -> {after:?}, want >= +{min_bytes}"
        );
        assert!(
            after.ingress.bytes - before.ingress.bytes >= min_bytes,
            "ingress bytes {before:?} -> {after:?}, want >= +{min_bytes}"
        );
    }
}
