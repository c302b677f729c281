//! The tunnel task: one `tokio::select!` over the TUN device, the UDP
//! socket, a timer tick and the command channel. It owns all state, so the
//! packet path takes no locks; buffers are allocated once.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use weft_dataplane_core::Key;
use weft_dataplane_core::plan::PeerAction;

use super::Command;
use super::peers::{Peers, normalise};
use super::tun::Tun;
use super::uapi::{self, Request, SetRequest};

/// Timer resolution of boringtun's `update_timers` is a second; 250 ms
/// keeps handshake retries and keepalives punctual enough.
const TICK: Duration = Duration::from_millis(250);
/// Packets handled per wake-up before the loop looks at the other sources.
const BATCH: usize = 64;
/// Large enough for any datagram or TUN packet.
const BUF_SIZE: usize = 65_536 + 64;
/// Socket buffers: absorb bursts instead of dropping them.
const SOCKET_BUFFER: usize = 4 << 20;
/// WireGuard message type of a cookie reply (not an authenticated packet).
const COOKIE_REPLY: u8 = 3;

/// Our UDP socket: dual-stack `[::]:port` when IPv6 exists, else IPv4.
#[derive(Debug)]
pub(crate) struct Udp {
    sock: UdpSocket,
    v6: bool,
    port: u16,
}

impl Udp {
    /// Binds `port` (0: random) on all addresses. Call inside a runtime.
    pub(crate) fn bind(port: u16) -> io::Result<Udp> {
        let (sock, v6) = match Self::socket(Domain::IPV6, port) {
            Ok(s) => (s, true),
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                (Self::socket(Domain::IPV4, port)?, false)
            }
            Err(e) => return Err(e),
        };
        let sock = UdpSocket::from_std(sock.into())?;
        let port = sock.local_addr()?.port();
        Ok(Udp { sock, v6, port })
    }

    fn socket(domain: Domain, port: u16) -> io::Result<Socket> {
        let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        let addr = if domain == Domain::IPV6 {
            // IPv4 peers arrive as ::ffff:a.b.c.d on the same socket.
            s.set_only_v6(false)?;
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from(([0, 0, 0, 0], port))
        };
        // Best effort: the kernel caps them at rmem_max/wmem_max.
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Sends one datagram; errors are logged, not returned (UDP is lossy).
    async fn send(&self, buf: &[u8], to: SocketAddr) {
        let to = match to {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other @ (SocketAddr::V4(_) | SocketAddr::V6(_)) => other,
        };
        if let Err(e) = self.sock.send_to(buf, to).await {
            tracing::debug!(to = %to, error = %e, "UDP send failed");
        }
    }
}

/// All tunnel state, owned by the tunnel task.
#[derive(Debug)]
pub(crate) struct Engine {
    tun: Tun,
    udp: Udp,
    peers: Peers,
    fwmark: u32,
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Engine {
    pub(crate) fn new(tun: Tun, udp: Udp, private_key: Option<Key>) -> Self {
        Engine {
            tun,
            udp,
            peers: Peers::new(private_key, rand::random::<u32>()),
            fwmark: 0,
            src: vec![0; BUF_SIZE],
            dst: vec![0; BUF_SIZE],
        }
    }

    /// Runs until shutdown, the command channel closes, or the TUN device
    /// fails.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let done: Option<oneshot::Sender<()>> = loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => break None,
                    Some(Command::Shutdown(done)) => break Some(done),
                    Some(cmd) => self.handle_command(cmd).await,
                },
                r = self.tun.readable() => {
                    if let Err(e) = r.and(self.handle_tun().await) {
                        tracing::error!(interface = %self.tun.name(), error = %e, "TUN device failed; stopping tunnel");
                        break None;
                    }
                }
                r = self.udp.sock.readable() => match r {
                    Ok(()) => self.handle_udp().await,
                    Err(e) => tracing::warn!(error = %e, "UDP socket poll failed"),
                },
                _ = tick.tick() => self.handle_timers().await,
            }
        };
        tracing::info!(interface = %self.tun.name(), "tunnel stopped");
        drop(self);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    async fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Apply(actions, done) => {
                let mut added = Vec::new();
                for action in actions {
                    match action {
                        PeerAction::Upsert(cfg) => {
                            if self.peers.slot_of(&cfg.public_key).is_none() {
                                added.push(cfg.public_key);
                            }
                            self.peers.upsert(cfg);
                        }
                        PeerAction::Remove(key) => self.peers.remove(&key),
                    }
                }
                let _ = done.send(());
                self.initiate_handshakes(&added).await;
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peers.stats().into_iter().map(|(s, _)| s).collect());
            }
            Command::Uapi(req, reply) => {
                let _ = reply.send(self.handle_uapi(req));
            }
            // Handled by `run`.
            Command::Shutdown(done) => {
                let _ = done.send(());
            }
        }
    }

    /// Starts a handshake with new peers at once rather than on their first
    /// packet: a peer that still holds a session with our previous run
    /// (agent restarted) would otherwise keep sending on it until its own
    /// rekey timeout, and traffic towards us would stall that long.
    async fn initiate_handshakes(&mut self, keys: &[Key]) {
        let Engine {
            udp, peers, dst, ..
        } = self;
        for key in keys {
            let Some(slot) = peers.slot_of(key) else {
                continue;
            };
            let Some((peer, _)) = peers.get_mut(slot) else {
                continue;
            };
            let (Some(tunn), Some(ep)) = (peer.tunn.as_mut(), peer.endpoint) else {
                continue;
            };
            if let TunnResult::WriteToNetwork(out) = tunn.format_handshake_initiation(dst, false) {
                peer.tx_bytes += out.len() as u64;
                udp.send(out, ep).await;
            }
        }
    }

    fn handle_uapi(&mut self, req: Request) -> String {
        match req {
            Request::Get => {
                let key = self.peers.identity().map(|i| i.private_key);
                uapi::format_get(key, self.udp.port(), self.fwmark, &self.peers.stats())
            }
            Request::Set(set) => match self.apply_set(&set) {
                Ok(()) => uapi::format_errno(0),
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI set failed");
                    uapi::format_errno(e.raw_os_error().unwrap_or(libc::EIO))
                }
            },
        }
    }

    /// Binds a new listen port first (the only step that can fail), then
    /// applies the rest: a failed request changes nothing.
    fn apply_set(&mut self, set: &SetRequest) -> io::Result<()> {
        if let Some(port) = set.listen_port
            && port != self.udp.port()
        {
            self.udp = Udp::bind(port)?;
            tracing::info!(listen_port = self.udp.port(), "listen port changed");
        }
        if let Some(mark) = set.fwmark {
            // Stored and reported only: we do not set SO_MARK yet.
            self.fwmark = mark;
        }
        self.peers.apply_set(set);
        Ok(())
    }

    /// Packets from the TUN device: route, encrypt, send.
    async fn handle_tun(&mut self) -> io::Result<()> {
        let Engine {
            tun,
            udp,
            peers,
            src,
            dst,
            ..
        } = self;
        for _ in 0..BATCH {
            let n = match tun.try_read(src) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let packet = &src[..n];
            let Some(slot) = Tunn::dst_address(packet).and_then(|ip| peers.route(ip)) else {
                continue;
            };
            let Some((peer, _)) = peers.get_mut(slot) else {
                continue;
            };
            let Some(tunn) = peer.tunn.as_mut() else {
                continue; // no private key yet
            };
            match tunn.encapsulate(packet, dst) {
                TunnResult::WriteToNetwork(out) => {
                    if let Some(ep) = peer.endpoint {
                        peer.tx_bytes += out.len() as u64;
                        udp.send(out, ep).await;
                    }
                }
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %peer.public_key, error = ?e, "encapsulate failed")
                }
                TunnResult::Done
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
        Ok(())
    }

    /// Datagrams from the network: find the peer, decrypt, check, deliver.
    async fn handle_udp(&mut self) {
        let Engine {
            tun,
            udp,
            peers,
            src,
            dst,
            ..
        } = self;
        for _ in 0..BATCH {
            let (n, from) = match udp.sock.try_recv_from(src) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // e.g. ICMP errors reported on the socket: not fatal.
                    tracing::debug!(error = %e, "UDP receive failed");
                    continue;
                }
            };
            let from = normalise(from);
            let datagram = &src[..n];
            let Some(slot) = find_peer(peers, datagram, from, dst, udp).await else {
                continue;
            };
            let Some((peer, routes)) = peers.get_mut(slot) else {
                continue;
            };
            let Some(tunn) = peer.tunn.as_mut() else {
                continue;
            };
            let authenticated = match tunn.decapsulate(Some(from.ip()), datagram, dst) {
                TunnResult::Done => datagram.first() != Some(&COOKIE_REPLY),
                TunnResult::Err(e) => {
                    tracing::trace!(from = %from, error = ?e, "dropped datagram");
                    false
                }
                TunnResult::WriteToNetwork(out) => {
                    let is_cookie = out.first() == Some(&COOKIE_REPLY);
                    peer.tx_bytes += out.len() as u64;
                    udp.send(out, from).await;
                    if !is_cookie {
                        // Packets queued while the handshake was pending.
                        while let TunnResult::WriteToNetwork(out) = tunn.decapsulate(None, &[], dst)
                        {
                            peer.tx_bytes += out.len() as u64;
                            udp.send(out, from).await;
                        }
                    }
                    !is_cookie
                }
                TunnResult::WriteToTunnelV4(packet, addr) => {
                    if routes.source_allowed(addr.into(), slot) {
                        write_tun(tun, packet).await;
                    } else {
                        tracing::debug!(peer = %peer.public_key, source = %addr, "dropped packet: source not in allowed IPs");
                    }
                    true
                }
                TunnResult::WriteToTunnelV6(packet, addr) => {
                    if routes.source_allowed(addr.into(), slot) {
                        write_tun(tun, packet).await;
                    } else {
                        tracing::debug!(peer = %peer.public_key, source = %addr, "dropped packet: source not in allowed IPs");
                    }
                    true
                }
            };
            if authenticated {
                peer.rx_bytes += n as u64;
                if peer.endpoint != Some(from) {
                    tracing::info!(peer = %peer.public_key, endpoint = %from, "peer endpoint changed");
                    peer.endpoint = Some(from);
                }
            }
        }
    }

    /// Handshake retries, rekeys and keepalives; rate limiter reset.
    async fn handle_timers(&mut self) {
        if let Some(id) = self.peers.identity() {
            // Counts are per second; it ignores calls within the second.
            id.rate_limiter.reset_count();
        }
        let Engine {
            udp, peers, dst, ..
        } = self;
        for peer in peers.iter_mut() {
            let Some(tunn) = peer.tunn.as_mut() else {
                continue;
            };
            match tunn.update_timers(dst) {
                TunnResult::WriteToNetwork(out) => {
                    if let Some(ep) = peer.endpoint {
                        peer.tx_bytes += out.len() as u64;
                        udp.send(out, ep).await;
                    }
                }
                TunnResult::Done
                | TunnResult::Err(_)
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..) => {}
            }
            peer.refresh_last_handshake();
        }
    }
}

/// The peer a datagram belongs to: by the sender's static key for a
/// handshake initiation (after mac1 and rate-limit checks, which may answer
/// with a cookie), else by our receiver index (`slot << 8 | session`).
async fn find_peer(
    peers: &Peers,
    datagram: &[u8],
    from: SocketAddr,
    scratch: &mut [u8],
    udp: &Udp,
) -> Option<u32> {
    match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(_) => {
            let id = peers.identity()?;
            let packet = match id
                .rate_limiter
                .verify_packet(Some(from.ip()), datagram, scratch)
            {
                Ok(p) => p,
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    udp.send(cookie, from).await;
                    return None;
                }
                Err(_) => return None,
            };
            let Packet::HandshakeInit(init) = packet else {
                return None;
            };
            let half = parse_handshake_anon(&id.secret, &id.public, &init).ok()?;
            peers.slot_of(&Key(half.peer_static_public))
        }
        Packet::HandshakeResponse(p) => Some(p.receiver_idx >> 8),
        Packet::PacketCookieReply(p) => Some(p.receiver_idx >> 8),
        Packet::PacketData(p) => Some(p.receiver_idx >> 8),
    }
}

async fn write_tun(tun: &Tun, packet: &[u8]) {
    if let Err(e) = tun.write(packet).await {
        tracing::debug!(error = %e, "TUN write failed");
    }
}
