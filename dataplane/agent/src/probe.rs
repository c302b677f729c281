//! Peer probes: every [`INTERVAL`] the agent sends each peer with a known
//! endpoint a 16-byte UDP probe to the peer's endpoint address at the
//! probe port (`--probe-port`, the same on every node), and echoes the
//! probes it receives. Per peer, [`ProbeWindow`] turns the answers into a
//! median round-trip time, a loss rate and reachability, which the agent
//! reports to the controller (and `weftctl node get` shows). The probes
//! travel the underlay beside the tunnel: they measure the path between
//! the two endpoints, whatever the overlay's policy.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};
use weft_dataplane_core::Key;
use weft_dataplane_core::probe::{Probe, ProbeKind, ProbeStats, ProbeWindow};

use crate::tunnel::TunnelHandle;

/// Default UDP port of the probes.
pub(crate) const DEFAULT_PORT: u16 = 51821;
/// Time between two probes to one peer.
const INTERVAL: Duration = Duration::from_millis(500);
/// A probe unanswered this long is lost.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive lost probes after which a peer is unreachable: about 2.5 s
/// after the path breaks (3 probes at [`INTERVAL`], the last one's
/// [`TIMEOUT`]).
const DOWN_AFTER: usize = 3;

/// The latest statistics per peer, shared with the reporter.
pub(crate) type SharedStats = Arc<Mutex<BTreeMap<Key, ProbeStats>>>;

/// Binds the probe socket on `[::]:port` (IPv4 and IPv6), or `0.0.0.0`
/// without IPv6.
fn bind(port: u16) -> anyhow::Result<UdpSocket> {
    let socket = |domain: Domain| -> std::io::Result<Socket> {
        let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        let addr = if domain == Domain::IPV6 {
            s.set_only_v6(false)?;
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from(([0, 0, 0, 0], port))
        };
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    };
    let s = match socket(Domain::IPV6) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => socket(Domain::IPV4)?,
        Err(e) => return Err(e.into()),
    };
    Ok(UdpSocket::from_std(s.into())?)
}

/// Starts probing the tunnel's peers and answering probes on `port`, the
/// probes marked with `fwmark` (Weft's rule exempts them; 0: unmarked);
/// returns the statistics it keeps up to date.
pub(crate) fn start(port: u16, tunnel: TunnelHandle, fwmark: u32) -> anyhow::Result<SharedStats> {
    let socket = bind(port).with_context(|| format!("binding the probe port {port}/udp"))?;
    if fwmark != 0 {
        socket2::SockRef::from(&socket)
            .set_mark(fwmark)
            .with_context(|| format!("marking the probe socket with fwmark {fwmark:#x}"))?;
    }
    info!(port, "probing peers");
    let stats = SharedStats::default();
    tokio::spawn(run(socket, port, tunnel, stats.clone()));
    Ok(stats)
}

/// Addresses compared without the IPv4-mapped form.
fn canonical(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

async fn run(socket: UdpSocket, port: u16, tunnel: TunnelHandle, stats: SharedStats) {
    let epoch = Instant::now();
    let now_ns = || u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let v6 = socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    let mut windows: BTreeMap<Key, ProbeWindow> = BTreeMap::new();
    // Endpoint address → peer, for matching replies.
    let mut by_addr: BTreeMap<IpAddr, Key> = BTreeMap::new();
    let mut seq: u64 = 0;
    let mut tick = tokio::time::interval(INTERVAL);
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Ok(peers) = tunnel.peers().await else { return };
                by_addr.clear();
                for p in &peers {
                    let Some(endpoint) = p.endpoint else { continue };
                    let ip = canonical(endpoint.ip());
                    by_addr.insert(ip, p.public_key);
                    let window = windows
                        .entry(p.public_key)
                        .or_insert_with(|| ProbeWindow::new(
                            u64::try_from(TIMEOUT.as_nanos()).unwrap_or(u64::MAX),
                            DOWN_AFTER,
                        ));
                    seq = seq.wrapping_add(1);
                    let to = target(ip, port, v6);
                    let probe = Probe { kind: ProbeKind::Request, seq }.encode();
                    match socket.send_to(&probe, to).await {
                        Ok(_) => window.sent(seq, now_ns()),
                        Err(e) => debug!(peer = %p.public_key, %to, error = %e, "sending a probe failed"),
                    }
                }
                windows.retain(|k, _| by_addr.values().any(|v| v == k));
                let now = now_ns();
                let fresh: BTreeMap<Key, ProbeStats> =
                    windows.iter().map(|(k, w)| (*k, w.stats(now))).collect();
                if let Ok(mut shared) = stats.lock() {
                    for (key, s) in &fresh {
                        if let Some(old) = shared.get(key)
                            && old.reachable != s.reachable
                        {
                            info!(peer = %key, reachable = s.reachable, rtt_us = ?s.rtt_us,
                                  loss_permille = s.loss_permille, "peer reachability changed");
                        }
                    }
                    *shared = fresh;
                }
            }
            got = socket.recv_from(&mut buf) => {
                let (n, from) = match got {
                    Ok(x) => x,
                    Err(e) => { warn!(error = %e, "probe socket"); continue; }
                };
                let probe = match Probe::decode(&buf[..n]) {
                    Ok(p) => p,
                    Err(e) => { debug!(%from, error = %e, "ignoring a datagram on the probe port"); continue; }
                };
                match probe.kind {
                    ProbeKind::Request => {
                        let reply = Probe { kind: ProbeKind::Reply, seq: probe.seq }.encode();
                        if let Err(e) = socket.send_to(&reply, from).await {
                            debug!(%from, error = %e, "answering a probe failed");
                        }
                    }
                    ProbeKind::Reply => {
                        let now = now_ns();
                        if let Some(w) = by_addr
                            .get(&canonical(from.ip()))
                            .and_then(|k| windows.get_mut(k))
                        {
                            w.replied(probe.seq, now);
                        }
                    }
                }
            }
        }
    }
}

/// Where the probe to a peer at `ip` goes: an IPv4 address as mapped IPv6
/// on a dual-stack socket.
fn target(ip: IpAddr, port: u16, v6_socket: bool) -> SocketAddr {
    match ip {
        IpAddr::V4(v4) if v6_socket => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port),
        IpAddr::V4(_) | IpAddr::V6(_) => SocketAddr::new(ip, port),
    }
}
