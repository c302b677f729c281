//! A WAN delay line in userspace, for kernels without netem.
//!
//! The WAN router namespace routes site LAN prefixes into a TUN device; this
//! process reads each packet, holds it for the one-way delay of its source
//! site plus that of its destination site, and writes it back. Packets that
//! come back out of the TUN device are routed by a policy rule (`iif <tun>
//! lookup <table>`) over the real links. Delays are constant per pair of
//! sites, so packet order within a flow is kept.

#![allow(unsafe_code, reason = "TUNSETIFF ioctl on /dev/net/tun")]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// One-way delay for packets from or to a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayRule {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub one_way: Duration,
}

impl std::str::FromStr for DelayRule {
    type Err = anyhow::Error;
    /// `198.19.1.0/24=5` (milliseconds).
    fn from_str(s: &str) -> Result<Self> {
        let (net, ms) = s.split_once('=').context("expected PREFIX=MILLISECONDS")?;
        let (addr, len) = net
            .split_once('/')
            .context("expected an IPv4 prefix like 198.19.1.0/24")?;
        let network: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("bad address {addr:?}"))?;
        let prefix_len: u8 = len
            .parse()
            .with_context(|| format!("bad prefix length {len:?}"))?;
        if prefix_len > 32 {
            bail!("prefix length {prefix_len} > 32");
        }
        let ms: u64 = ms.parse().with_context(|| format!("bad delay {ms:?}"))?;
        Ok(DelayRule {
            network,
            prefix_len,
            one_way: Duration::from_millis(ms),
        })
    }
}

impl DelayRule {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        };
        u32::from(ip) & mask == u32::from(self.network) & mask
    }
}

/// Delay of a packet: the source's and the destination's one-way delays.
pub fn delay_of(rules: &[DelayRule], packet: &[u8]) -> Duration {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Duration::ZERO;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let of = |ip| {
        rules
            .iter()
            .find(|r| r.contains(ip))
            .map(|r| r.one_way)
            .unwrap_or_default()
    };
    of(src) + of(dst)
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates TUN device `name` (`IFF_TUN | IFF_NO_PI`: one IP packet per read
/// or write, no header); it lives as long as the returned file.
pub fn open_tun(name: &str) -> Result<File> {
    if name.is_empty() || name.len() > 15 {
        bail!("interface name {name:?} must be 1..=15 bytes");
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a valid, initialised ifreq-sized buffer that lives
    // across the call; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
    }
    Ok(file)
}

/// Runs the delay line on TUN device `tun` until killed.
pub fn run(tun: &str, rules: &[DelayRule]) -> Result<()> {
    let mut reader = open_tun(tun)?;
    let mut writer = reader.try_clone().context("cloning the TUN fd")?;
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let rules = rules.to_vec();
    let read_thread = std::thread::spawn(move || -> Result<()> {
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = reader.read(&mut buf).context("reading the TUN device")?;
            let due = Instant::now() + delay_of(&rules, &buf[..n]);
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return Ok(());
            }
        }
    });
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let timeout = queue
            .peek()
            .map(|Reverse((due, _, _))| due.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1));
        match rx.recv_timeout(timeout) {
            Ok((due, pkt)) => {
                seq += 1;
                queue.push(Reverse((due, seq, pkt)));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            if let Some(Reverse((_, _, pkt))) = queue.pop() {
                // A failed write is a lost packet, as on a real link.
                let _ = writer.write(&pkt);
            }
        }
    }
    match read_thread.join() {
        Ok(r) => r,
        Err(_) => bail!("the TUN reader panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn delay_adds_both_ends() {
        let rules: Vec<DelayRule> = ["198.19.1.0/24=5", "198.19.2.0/24=10"]
            .iter()
            .map(|r| r.parse().expect("valid rule"))
            .collect();
        assert_eq!(
            delay_of(&rules, &packet([198, 19, 1, 11], [198, 19, 2, 12])),
            Duration::from_millis(15)
        );
        assert_eq!(
            delay_of(&rules, &packet([198, 18, 100, 2], [198, 19, 2, 12])),
            Duration::from_millis(10)
        );
        assert_eq!(
            delay_of(&rules, &[0x60; 40]),
            Duration::ZERO,
            "IPv6 is not delayed"
        );
        assert!("198.19.1.0/33=5".parse::<DelayRule>().is_err());
        assert!("nonsense".parse::<DelayRule>().is_err());
    }
}
