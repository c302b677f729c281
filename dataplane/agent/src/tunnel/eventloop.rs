//! The tunnel task: one `tokio::select!` over the TUN device, the UDP
//! socket, a timer and the command channel, and, when asked to, a loop
//! that polls the TUN device and the socket instead of sleeping (see
//! [`Engine::run`]). It owns all state, so the packet path takes no locks;
//! buffers are allocated once.
//!
//! Outbound, each wake-up reads TUN packets (TCP super-segments of up to
//! 64 KB with offload), cuts them into MTU-sized segments, encrypts them
//! into one send buffer and sends it with a few `sendmmsg` calls carrying
//! UDP GSO messages. Inbound, `recvmmsg` with UDP GRO returns many
//! datagrams per call; decrypted TCP segments of one flow are joined into
//! one super-packet per TUN write.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use weft_dataplane_core::Key;
use weft_dataplane_core::plan::PeerAction;

use super::destinations::{Delivery, Destinations};
use super::offload::{
    Coalescer, F_NEEDS_CSUM, GSO_NONE, TsoPlan, VNET_HDR_LEN, VnetHdr, complete_checksum,
};
use super::peers::{Peers, normalise};
use super::tun::Tun;
use super::uapi::{self, Request, SetRequest};
pub(crate) use super::udp::Udp;
use super::udp::{RecvBatch, SendBatch};
use super::{Command, Polling, TunnelDrops};

/// Timer resolution of boringtun's `update_timers` is a second; 250 ms
/// keeps handshake retries and keepalives punctual enough.
const TICK: Duration = Duration::from_millis(250);
/// TUN reads per wake-up before the loop looks at the other sources.
const TUN_BATCH: usize = 64;
/// `recvmmsg` calls per wake-up before the loop looks at the other sources.
const UDP_BATCH: usize = 8;
/// Large enough for any TUN packet (vnet header + 64 KB) or datagram.
const BUF_SIZE: usize = VNET_HDR_LEN + 65_536 + 64;
/// WireGuard message type of a cookie reply (not an authenticated packet).
const COOKIE_REPLY: u8 = 3;

/// All tunnel state, owned by the tunnel task.
#[derive(Debug)]
pub(crate) struct Engine {
    tun: Tun,
    udp: Udp,
    peers: Peers,
    fwmark: u32,
    /// Which decrypted packets are delivered, by destination.
    destinations: Destinations,
    /// Decrypted packets dropped, per reason.
    drops: TunnelDrops,
    /// One packet read from the TUN device, vnet header first.
    tun_buf: Vec<u8>,
    /// A segment to encrypt, or a decrypted packet.
    scratch: Vec<u8>,
    /// Handshake and timer messages.
    dst: Vec<u8>,
    rx: RecvBatch,
    tx: SendBatch,
    gro: Coalescer,
    /// When to poll instead of sleeping (see [`Engine::run`]).
    polling: Polling,
    /// Polling now: read with system calls, not through the runtime's
    /// readiness.
    spinning: bool,
}

impl Engine {
    /// `fwmark` must already be set on `udp`.
    pub(crate) fn new(
        tun: Tun,
        udp: Udp,
        private_key: Option<Key>,
        polling: Polling,
        fwmark: u32,
    ) -> Self {
        Engine {
            tun,
            udp,
            peers: Peers::new(private_key, rand::random::<u32>()),
            fwmark,
            destinations: Destinations::default(),
            drops: TunnelDrops::default(),
            tun_buf: vec![0; BUF_SIZE],
            scratch: vec![0; BUF_SIZE],
            dst: vec![0; BUF_SIZE],
            rx: RecvBatch::default(),
            tx: SendBatch::default(),
            gro: Coalescer::default(),
            polling,
            spinning: false,
        }
    }

    /// Runs until shutdown, the command channel closes, or the TUN device
    /// fails.
    ///
    /// The loop sleeps until the TUN device, the socket, a command or the
    /// timer wakes it, unless [`Polling`] says to poll: then, after a
    /// wake-up that moved packets (from the start with
    /// [`Polling::Always`]), it reads the TUN device and the socket with
    /// system calls in turn, so the next packet is picked up without a
    /// process wake-up. When both are empty it yields to the runtime's
    /// other tasks and to the kernel's scheduler (`sched_yield`), so
    /// whatever shares the CPU keeps running, and checks commands and
    /// timers. With [`Polling::Linger`] it goes back to sleeping once no
    /// packet came for the linger time.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        match self.polling {
            Polling::Sleep => {}
            Polling::Linger(linger) => {
                tracing::info!(interface = %self.tun.name(), linger = ?linger, "busy polling while packets flow")
            }
            Polling::Always => {
                tracing::info!(interface = %self.tun.name(), "busy polling: this tunnel keeps a CPU busy")
            }
        }
        let mut next_tick = Instant::now() + TICK;
        let timer = tokio::time::sleep_until(next_tick);
        tokio::pin!(timer);
        let polls = self.polling != Polling::Sleep;
        let mut poll_now = self.polling == Polling::Always;
        let done: Option<oneshot::Sender<()>> = loop {
            if poll_now {
                match self.poll(&mut commands, &mut next_tick).await {
                    Ok(()) => {
                        poll_now = false;
                        timer.as_mut().reset(next_tick);
                        continue;
                    }
                    Err(stop) => break stop,
                }
            }
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => break None,
                    Some(Command::Shutdown(done)) => break Some(done),
                    Some(cmd) => self.handle_command(cmd).await,
                },
                r = self.tun.readable() => {
                    match r.and(self.handle_tun().await) {
                        Ok(n) => poll_now = polls && n > 0,
                        Err(e) => {
                            tracing::error!(interface = %self.tun.name(), error = %e, "TUN device failed; stopping tunnel");
                            break None;
                        }
                    }
                }
                r = self.udp.readable() => match r {
                    Ok(()) => poll_now = self.handle_udp().await > 0 && polls,
                    Err(e) => tracing::warn!(error = %e, "UDP socket poll failed"),
                },
                () = &mut timer => {
                    self.handle_timers().await;
                    next_tick = following_tick(next_tick);
                    timer.as_mut().reset(next_tick);
                }
            }
        };
        tracing::info!(interface = %self.tun.name(), "tunnel stopped");
        drop(self);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    /// Polls without sleeping until the linger time passes without a packet
    /// (`Ok`; never with [`Polling::Always`]) or the tunnel must stop
    /// (`Err`, with the shutdown's reply if it was asked for).
    async fn poll(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        next_tick: &mut Instant,
    ) -> Result<(), Option<oneshot::Sender<()>>> {
        let linger = match self.polling {
            Polling::Linger(linger) => Some(linger),
            Polling::Always => None,
            Polling::Sleep => return Ok(()),
        };
        self.spinning = true;
        let mut last_packet = Instant::now();
        let stop = loop {
            let tun = match self.handle_tun().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(interface = %self.tun.name(), error = %e, "TUN device failed; stopping tunnel");
                    break Err(None);
                }
            };
            let udp = self.handle_udp().await;
            let now = Instant::now();
            if tun + udp > 0 {
                last_packet = now;
                continue;
            }
            match commands.try_recv() {
                Ok(Command::Shutdown(done)) => break Err(Some(done)),
                Ok(cmd) => self.handle_command(cmd).await,
                Err(mpsc::error::TryRecvError::Disconnected) => break Err(None),
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if now >= *next_tick {
                self.handle_timers().await;
                *next_tick = following_tick(*next_tick);
            }
            if linger.is_some_and(|l| now.duration_since(last_packet) >= l) {
                break Ok(());
            }
            tokio::task::yield_now().await;
            std::thread::yield_now();
        };
        self.spinning = false;
        stop
    }

    async fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Apply(actions, done) => {
                let mut kick = Vec::new();
                for action in actions {
                    match action {
                        PeerAction::Upsert(cfg) => {
                            let key = cfg.public_key;
                            if self.peers.upsert(cfg) {
                                kick.push(key);
                            }
                        }
                        PeerAction::Remove(key) => self.peers.remove(&key),
                    }
                }
                let _ = done.send(());
                let slots: Vec<u32> = kick.iter().filter_map(|k| self.peers.slot_of(k)).collect();
                self.initiate_handshakes(&slots).await;
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peers.stats().into_iter().map(|(s, _)| s).collect());
            }
            Command::SetDestinations(destinations, done) => {
                self.destinations = destinations;
                let _ = done.send(());
            }
            Command::Drops(reply) => {
                let _ = reply.send(self.drops);
            }
            Command::SetPrivateKey(key, done) => {
                self.peers.set_private_key(Some(key));
                let _ = done.send(());
                let slots = self.peers.slots();
                self.initiate_handshakes(&slots).await;
                tracing::info!(interface = %self.tun.name(), peers = slots.len(), "static key replaced; handshaking with every peer");
            }
            Command::Uapi(req, reply) => {
                let (answer, kick) = self.handle_uapi(req);
                let _ = reply.send(answer);
                self.initiate_handshakes(&kick).await;
            }
            // Handled by `run`.
            Command::Shutdown(done) => {
                let _ = done.send(());
            }
        }
    }

    /// Starts a handshake at once, rather than on the first packet or
    /// keepalive, with peers that have an endpoint and no session:
    ///
    /// - new peers: a peer that still holds a session with our previous
    ///   run (agent restarted) would otherwise keep sending on it until its
    ///   own rekey timeout, and traffic towards us would stall that long;
    /// - peers whose persistent keepalive was just turned on (as WireGuard
    ///   does): a node behind NAT opens its mappings now, not one keepalive
    ///   interval later.
    ///
    /// - peers without a session whose endpoint changed (a NAT mapping the
    ///   controller learnt): both ends of two NATed nodes try at once.
    ///
    /// - every peer when our static key changed (rotation): the peers
    ///   already have the new key, or get it at the same moment and then
    ///   initiate themselves.
    ///
    /// Sends one initiation each; boringtun's timers retry as usual.
    async fn initiate_handshakes(&mut self, slots: &[u32]) {
        let Engine {
            udp, peers, dst, ..
        } = self;
        for slot in slots {
            let Some((peer, _)) = peers.get_mut(*slot) else {
                continue;
            };
            if peer.has_session() {
                continue;
            }
            let (Some(tunn), Some(ep)) = (peer.tunn.as_mut(), peer.endpoint) else {
                continue;
            };
            // Forced: an initiation still under way went to the old
            // endpoint (for a peer behind NAT, one nothing reaches).
            if let TunnResult::WriteToNetwork(out) = tunn.format_handshake_initiation(dst, true) {
                peer.tx_bytes += out.len() as u64;
                udp.send(out, ep).await;
            }
        }
    }

    /// The UAPI answer, and the peers to start a handshake with.
    fn handle_uapi(&mut self, req: Request) -> (String, Vec<u32>) {
        match req {
            Request::Get => {
                let key = self.peers.identity().map(|i| i.private_key);
                let answer =
                    uapi::format_get(key, self.udp.port(), self.fwmark, &self.peers.stats());
                (answer, Vec::new())
            }
            Request::Set(set) => match self.apply_set(&set) {
                Ok(kick) => (uapi::format_errno(0), kick),
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI set failed");
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    (uapi::format_errno(errno), Vec::new())
                }
            },
        }
    }

    /// Binds a new listen port and sets the fwmark first (the only steps
    /// that can fail), then applies the rest: a failed request changes
    /// nothing. Returns the peers whose persistent keepalive it turned on.
    fn apply_set(&mut self, set: &SetRequest) -> io::Result<Vec<u32>> {
        let mark = set.fwmark.unwrap_or(self.fwmark);
        let new_udp = match set.listen_port {
            Some(port) if port != self.udp.port() => Some(Udp::bind(port)?),
            _ => None,
        };
        // The mark (SO_MARK, for policy routing of the tunnel's own
        // packets) goes on the socket that will carry the traffic.
        match &new_udp {
            Some(udp) if mark != 0 => udp.set_mark(mark)?,
            Some(_) => {}
            None if mark != self.fwmark => self.udp.set_mark(mark)?,
            None => {}
        }
        if let Some(udp) = new_udp {
            self.udp = udp;
            tracing::info!(listen_port = self.udp.port(), "listen port changed");
        }
        if mark != self.fwmark {
            tracing::info!(fwmark = mark, "fwmark changed");
            self.fwmark = mark;
        }
        Ok(self.peers.apply_set(set))
    }

    /// Packets from the TUN device: route, segment, encrypt, send.
    /// Returns the packets read.
    async fn handle_tun(&mut self) -> io::Result<usize> {
        let mut read = 0;
        for _ in 0..TUN_BATCH {
            let r = if self.spinning {
                self.tun.read_now(&mut self.tun_buf)
            } else {
                self.tun.try_read(&mut self.tun_buf)
            };
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            read += 1;
            self.encrypt_tun_packet(n).await;
        }
        if !self.tx.is_empty() {
            self.udp.send_batch(&mut self.tx).await;
        }
        Ok(read)
    }

    /// Encrypts the `n` bytes in `tun_buf` (a vnet header and a packet,
    /// maybe a TCP super-segment) into the send batch.
    async fn encrypt_tun_packet(&mut self, n: usize) {
        let Engine {
            udp,
            peers,
            tun_buf,
            scratch,
            tx,
            ..
        } = self;
        let Some(hdr) = VnetHdr::decode(&tun_buf[..n]) else {
            return;
        };
        let pkt = &mut tun_buf[VNET_HDR_LEN..n];
        let Some(dst) = Tunn::dst_address(pkt) else {
            return;
        };
        let Some(slot) = peers.route(dst) else {
            return;
        };
        let slot = peers.spread(slot, dst, pkt);
        let Some((peer, _)) = peers.get_mut(slot) else {
            return;
        };
        let Some(tunn) = peer.tunn.as_mut() else {
            return; // no private key yet
        };
        if hdr.gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0
                && complete_checksum(
                    pkt,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )
                .is_none()
            {
                tracing::debug!(?hdr, "dropped TUN packet: bad checksum offsets");
                return;
            }
            if tx.is_full() {
                udp.send_batch(tx).await;
            }
            encapsulate(tunn, pkt, tx, peer.endpoint, &mut peer.tx_bytes, udp);
            return;
        }
        let plan = match TsoPlan::new(pkt, &hdr) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(?hdr, error = ?e, "dropped TUN packet: cannot segment");
                return;
            }
        };
        for i in 0..plan.count() {
            if tx.is_full() {
                udp.send_batch(tx).await;
            }
            let len = plan.segment(pkt, i, scratch);
            encapsulate(
                tunn,
                &scratch[..len],
                tx,
                peer.endpoint,
                &mut peer.tx_bytes,
                udp,
            );
        }
    }

    /// Datagrams from the network: find the peer, decrypt, check, deliver.
    /// Returns the `recvmmsg` calls that returned datagrams.
    async fn handle_udp(&mut self) -> usize {
        let mut calls = 0;
        for _ in 0..UDP_BATCH {
            let r = if self.spinning {
                self.udp.recv_now(&mut self.rx)
            } else {
                self.udp.try_recv(&mut self.rx)
            };
            match r {
                Ok(_) => calls += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // e.g. ICMP errors reported on the socket: not fatal.
                    tracing::debug!(error = %e, "UDP receive failed");
                    continue;
                }
            }
            for i in 0..self.rx.len() {
                let Engine {
                    tun,
                    udp,
                    peers,
                    scratch,
                    rx,
                    gro,
                    destinations,
                    drops,
                    ..
                } = self;
                let Some((from, datagrams)) = rx.message(i) else {
                    continue;
                };
                let from = normalise(from);
                for datagram in datagrams {
                    if gro.is_full() {
                        flush_tun(tun, gro).await;
                    }
                    let rx = Receiver {
                        peers,
                        destinations,
                        drops,
                    };
                    decrypt_datagram(rx, udp, gro, scratch, datagram, from).await;
                }
            }
        }
        flush_tun(&self.tun, &mut self.gro).await;
        calls
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

/// Encrypts one IP packet for `tunn` into the send batch (a handshake
/// initiation instead when there is no session yet; the packet is queued).
fn encapsulate(
    tunn: &mut Tunn,
    packet: &[u8],
    tx: &mut SendBatch,
    endpoint: Option<SocketAddr>,
    tx_bytes: &mut u64,
    udp: &Udp,
) {
    let len = match tunn.encapsulate(packet, tx.slot()) {
        TunnResult::WriteToNetwork(out) => out.len(),
        TunnResult::Err(e) => {
            tracing::debug!(error = ?e, "encapsulate failed");
            return;
        }
        TunnResult::Done | TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
            return;
        }
    };
    if let Some(ep) = endpoint {
        *tx_bytes += len as u64;
        tx.commit(len, ep, udp.gso_max());
    }
}

/// What the receive path reads and counts besides the datagram.
struct Receiver<'a> {
    peers: &'a mut Peers,
    destinations: &'a Destinations,
    drops: &'a mut TunnelDrops,
}

/// Decrypts one datagram from `from`; data goes to the coalescer (if its
/// source and destination pass), protocol answers straight to the network.
async fn decrypt_datagram(
    rx: Receiver<'_>,
    udp: &Udp,
    gro: &mut Coalescer,
    scratch: &mut [u8],
    datagram: &[u8],
    from: SocketAddr,
) {
    let Receiver {
        peers,
        destinations,
        drops,
    } = rx;
    let Some(slot) = find_peer(peers, datagram, from, scratch, udp).await else {
        return;
    };
    let Some((peer, routes)) = peers.get_mut(slot) else {
        return;
    };
    let Some(tunn) = peer.tunn.as_mut() else {
        return;
    };
    let authenticated = match tunn.decapsulate(Some(from.ip()), datagram, scratch) {
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
                while let TunnResult::WriteToNetwork(out) = tunn.decapsulate(None, &[], scratch) {
                    peer.tx_bytes += out.len() as u64;
                    udp.send(out, from).await;
                }
            }
            !is_cookie
        }
        TunnResult::WriteToTunnelV4(packet, addr) => {
            let source = addr.into();
            admit(packet, source, peer, slot, routes, destinations, drops, gro);
            true
        }
        TunnResult::WriteToTunnelV6(packet, addr) => {
            let source = addr.into();
            admit(packet, source, peer, slot, routes, destinations, drops, gro);
            true
        }
    };
    if authenticated {
        peer.rx_bytes += datagram.len() as u64;
        if peer.endpoint != Some(from) {
            tracing::info!(peer = %peer.public_key, endpoint = %from, "peer endpoint changed");
            peer.endpoint = Some(from);
        }
    }
}

/// Passes a decrypted packet from `peer` to the coalescer if its source
/// routes back to the peer or is accepted from it, and its destination is
/// one this node delivers to; counts it otherwise.
#[allow(clippy::too_many_arguments)]
fn admit(
    packet: &[u8],
    source: std::net::IpAddr,
    peer: &super::peers::Peer,
    slot: u32,
    routes: &super::peers::AllowedIps<u32>,
    destinations: &Destinations,
    drops: &mut TunnelDrops,
    gro: &mut Coalescer,
) {
    if !peer.source_allowed(routes, slot, source) {
        drops.bad_source.add(packet.len());
        tracing::debug!(peer = %peer.public_key, source = %source, "dropped packet: source neither in allowed IPs nor accepted");
        return;
    }
    let Some(dst) = Tunn::dst_address(packet) else {
        return;
    };
    match destinations.delivery(dst, || routes.lookup(dst).is_some()) {
        Delivery::Deliver => gro.push(packet),
        Delivery::NotForUs => {
            drops.not_for_us.add(packet.len());
            tracing::debug!(peer = %peer.public_key, source = %source, destination = %dst, "dropped packet: destination not hosted nor relayed here");
        }
    }
}

/// The timer's next deadline after `tick`: one period later, or one period
/// from now if the loop fell behind (ticks are not made up).
fn following_tick(tick: Instant) -> Instant {
    let next = tick + TICK;
    let now = Instant::now();
    if next > now { next } else { now + TICK }
}

/// Writes the coalesced packets to the TUN device, in order.
async fn flush_tun(tun: &Tun, gro: &mut Coalescer) {
    if gro.is_empty() {
        return;
    }
    for packet in gro.finish() {
        if let Err(e) = tun.write(packet).await {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }
    gro.clear();
}
