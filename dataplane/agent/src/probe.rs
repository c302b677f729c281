//! Peer probes: every [`INTERVAL`] the agent sends each peer with a known
//! endpoint a 24-byte UDP probe to the peer's endpoint address at the
//! probe port (`--probe-port`, the same on every node), and echoes the
//! probes it receives (at most [`EchoBudget`] per interval). Each peer
//! gets a random 64-bit token, drawn here, that its probes carry and its
//! replies echo: replies are matched to peers by token ([`Prober`]), not
//! by source address, so peers sharing a NAT address are measured apart
//! and replies nobody asked for are ignored (and counted). Per peer,
//! [`weft_dataplane_core::probe::ProbeWindow`] turns the answers into a
//! median round-trip time, a loss rate and reachability, which the agent
//! reports to the controller (and `weftctl node get` shows). The probes
//! travel the underlay beside the tunnel: they measure the path between
//! the two endpoints, whatever the overlay's policy.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};
use weft_dataplane_core::Key;
use weft_dataplane_core::probe::{BadProbe, EchoBudget, Probe, ProbeKind, ProbeStats, Prober};

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
    let peers = move || {
        let tunnel = tunnel.clone();
        async move {
            let peers = tunnel.peers().await.ok()?;
            Some(
                peers
                    .into_iter()
                    .map(|p| (p.public_key, p.endpoint))
                    .collect(),
            )
        }
    };
    tokio::spawn(run(socket, port, peers, stats.clone(), Arc::default()));
    Ok(stats)
}

/// Addresses compared without the IPv4-mapped form.
fn canonical(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

/// What the probe loop ignored, for logs and tests.
#[derive(Debug, Default)]
pub(crate) struct Ignored {
    /// Replies whose token matched no probed peer.
    unknown_token: AtomicU64,
    /// Datagrams that are not probes of this format (older versions too).
    malformed: AtomicU64,
    /// Requests left unanswered beyond the echo budget.
    over_budget: AtomicU64,
}

/// The peers to probe: (key, endpoint) per peer, `None` once the tunnel is
/// gone.
type PeerList = Vec<(Key, Option<SocketAddr>)>;

async fn run<F, Fut>(
    socket: UdpSocket,
    port: u16,
    mut peers: F,
    stats: SharedStats,
    ignored: Arc<Ignored>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<PeerList>>,
{
    let epoch = Instant::now();
    let now_ns = || u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let v6 = socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    let mut prober: Prober<Key> = Prober::new(
        u64::try_from(TIMEOUT.as_nanos()).unwrap_or(u64::MAX),
        DOWN_AFTER,
    );
    let mut budget = EchoBudget::default();
    let mut tick = tokio::time::interval(INTERVAL);
    let mut buf = [0u8; 64];
    let mut old_format_seen = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(peers) = peers().await else { return };
                let probed: BTreeMap<Key, IpAddr> = peers
                    .iter()
                    .filter_map(|(k, e)| e.map(|e| (*k, canonical(e.ip()))))
                    .collect();
                prober.set_peers(probed.keys(), rand::random::<u64>);
                budget.refill(peers.len());
                for (key, ip) in &probed {
                    let Some(probe) = prober.request(key) else { continue };
                    let to = target(*ip, port, v6);
                    match socket.send_to(&probe.encode(), to).await {
                        Ok(_) => prober.sent(key, probe, now_ns()),
                        Err(e) => debug!(peer = %key, %to, error = %e, "sending a probe failed"),
                    }
                }
                ignored.unknown_token.store(prober.unknown_replies(), Ordering::Relaxed);
                ignored.over_budget.store(budget.refused(), Ordering::Relaxed);
                let fresh = prober.stats(now_ns());
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
                    Err(e) => {
                        ignored.malformed.fetch_add(1, Ordering::Relaxed);
                        if matches!(e, BadProbe::Version(_)) && !old_format_seen {
                            old_format_seen = true;
                            warn!(%from, error = %e, "ignoring probes of another format (logged once)");
                        } else {
                            debug!(%from, error = %e, "ignoring a datagram on the probe port");
                        }
                        continue;
                    }
                };
                match probe.kind {
                    ProbeKind::Request => {
                        if !budget.take() {
                            ignored.over_budget.store(budget.refused(), Ordering::Relaxed);
                            continue;
                        }
                        if let Err(e) = socket.send_to(&probe.reply().encode(), from).await {
                            debug!(%from, error = %e, "answering a probe failed");
                        }
                    }
                    ProbeKind::Reply => {
                        if let Err(e) = prober.handle_reply(probe, now_ns()) {
                            ignored.unknown_token.store(prober.unknown_replies(), Ordering::Relaxed);
                            debug!(%from, error = %e, "ignoring a probe reply");
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Waits up to `secs` for `f` to hold.
    async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_sharing_an_address_are_measured_apart_and_forged_replies_ignored() {
        // Two peers behind one address (127.0.0.1, different WireGuard
        // ports): their probes go to the same probe port, here this
        // agent's own, which answers both. Matched by source address only
        // one of them could be credited; by token both are.
        let socket = bind(0).expect("probe socket");
        let port = socket.local_addr().expect("bound").port();
        let stats = SharedStats::default();
        let ignored = Arc::new(Ignored::default());
        let (p1, p2) = (Key([1; 32]), Key([2; 32]));
        let peers = move || async move {
            Some(vec![
                (p1, Some(SocketAddr::from(([127, 0, 0, 1], 40001)))),
                (p2, Some(SocketAddr::from(([127, 0, 0, 1], 40002)))),
                (Key([3; 32]), None),
            ])
        };
        let task = tokio::spawn(run(socket, port, peers, stats.clone(), ignored.clone()));
        let reachable = |k: &Key| {
            stats
                .lock()
                .expect("stats")
                .get(k)
                .is_some_and(|s| s.reachable && s.rtt_us.is_some() && s.samples >= 2)
        };
        eventually(10, "both peers measured reachable", || {
            reachable(&p1) && reachable(&p2)
        })
        .await;
        assert_eq!(
            stats.lock().expect("stats").len(),
            2,
            "the peer without an endpoint is not probed"
        );

        // Replies with tokens nobody drew, and an old-format probe: ignored
        // and counted, never answered.
        let forger = std::net::UdpSocket::bind("127.0.0.1:0").expect("forger");
        forger
            .set_read_timeout(Some(Duration::from_millis(700)))
            .expect("timeout");
        for token in 0..5u64 {
            let forged = Probe {
                kind: ProbeKind::Reply,
                seq: 1,
                token,
            };
            forger
                .send_to(&forged.encode(), ("127.0.0.1", port))
                .expect("sent");
        }
        let mut v1 = [0u8; 16];
        v1[..4].copy_from_slice(b"WFP1");
        v1[4] = 1;
        forger.send_to(&v1, ("127.0.0.1", port)).expect("sent");
        eventually(5, "the forged datagrams counted", || {
            ignored.unknown_token.load(Ordering::Relaxed) >= 5
                && ignored.malformed.load(Ordering::Relaxed) >= 1
        })
        .await;
        let mut reply = [0u8; 64];
        assert!(
            forger.recv_from(&mut reply).is_err(),
            "nothing answers a reply or an old-format probe"
        );
        // A current request is echoed with its token.
        let req = Probe {
            kind: ProbeKind::Request,
            seq: 42,
            token: 0xabc,
        };
        forger
            .send_to(&req.encode(), ("127.0.0.1", port))
            .expect("sent");
        let (n, _) = forger.recv_from(&mut reply).expect("echoed");
        assert_eq!(Probe::decode(&reply[..n]), Ok(req.reply()));
        task.abort();
    }
}
