//! The tunnel's UDP socket: dual-stack `[::]:port` (IPv4 peers appear as
//! `::ffff:a.b.c.d`), batched with `recvmmsg`/`sendmmsg`, with UDP GSO
//! (`UDP_SEGMENT`) on send and UDP GRO on receive, so one system call moves
//! dozens of WireGuard datagrams.
//!
//! [`SendBatch`] (pure) groups outgoing datagrams into GSO messages: runs of
//! equal-sized datagrams to one endpoint, the last one possibly shorter.
//! The `unsafe` here is the system calls and their C structures.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd as _;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Socket buffers: absorb bursts instead of dropping them.
const SOCKET_BUFFER: usize = 8 << 20;
/// Most datagrams in one GSO message (the kernel's `UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes in one GSO message: the UDP payload of one IP packet.
const MAX_GSO_BYTES: usize = 65_000;
/// Messages per `recvmmsg`.
const RECV_MSGS: usize = 8;
/// One received message: a datagram, or with GRO up to 64 KB of them.
const RECV_BUF: usize = 65_536;
/// Messages per `sendmmsg`.
const SEND_MSGS: usize = 32;
/// Bytes of outgoing datagrams held before a flush.
const SEND_BUF: usize = 1 << 20;
/// Room a caller may need for one datagram in [`SendBatch::slot`].
pub(crate) const MAX_DATAGRAM: usize = 65_536 + 64;

/// Our UDP socket.
#[derive(Debug)]
pub(crate) struct Udp {
    sock: UdpSocket,
    v6: bool,
    port: u16,
    /// Largest datagram we send inside a GSO message (0: GSO off). The
    /// kernel refuses GSO segments that do not fit the path MTU
    /// (`EINVAL`); such sizes then go one datagram at a time.
    gso_max: usize,
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
        let gro = set_int(&sock, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        let gso = gso_supported(&sock);
        let sock = UdpSocket::from_std(sock.into())?;
        let port = sock.local_addr()?.port();
        tracing::debug!(port, gso, gro, "UDP socket bound");
        Ok(Udp {
            sock,
            v6,
            port,
            gso_max: if gso { usize::MAX } else { 0 },
        })
    }

    fn socket(domain: Domain, port: u16) -> io::Result<Socket> {
        let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        let addr = if domain == Domain::IPV6 {
            s.set_only_v6(false)?;
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from(([0, 0, 0, 0], port))
        };
        // Past rmem_max/wmem_max when we may (CAP_NET_ADMIN); else as
        // large as the kernel allows.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            let size = i32::try_from(SOCKET_BUFFER).unwrap_or(i32::MAX);
            if set_int(&s, libc::SOL_SOCKET, force, size).is_err() {
                let _ = set_int(&s, libc::SOL_SOCKET, plain, size);
            }
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Marks the packets the socket sends (SO_MARK; 0 removes the mark).
    /// Needs CAP_NET_ADMIN.
    pub(crate) fn set_mark(&self, mark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.sock).set_mark(mark)
    }

    /// Largest datagram [`SendBatch`] may put in a GSO message (0: none).
    pub(crate) fn gso_max(&self) -> usize {
        self.gso_max
    }

    /// Waits until the socket may be readable.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.sock.readable().await
    }

    /// The address as our socket wants it (IPv4-mapped on a v6 socket).
    fn target(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other @ (SocketAddr::V4(_) | SocketAddr::V6(_)) => other,
        }
    }

    /// Sends one datagram, waiting while the socket buffer is full; errors
    /// are logged, not returned (UDP is lossy).
    pub(crate) async fn send(&self, buf: &[u8], to: SocketAddr) {
        let to = self.target(to);
        if let Err(e) = self.sock.send_to(buf, to).await {
            tracing::debug!(to = %to, error = %e, "UDP send failed");
        }
    }

    /// Receives up to a batch of messages without waiting (`WouldBlock`
    /// when none is queued).
    pub(crate) fn try_recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.count = 0;
        let n = self
            .sock
            .try_io(Interest::READABLE, || recvmmsg(&self.sock, batch))?;
        batch.count = n;
        Ok(n)
    }

    /// Like [`Udp::try_recv`] but always makes the system call (busy
    /// polling: the reactor's cached readiness is not consulted).
    pub(crate) fn recv_now(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.count = 0;
        let n = recvmmsg(&self.sock, batch)?;
        batch.count = n;
        Ok(n)
    }

    /// Sends everything in `batch` and empties it, waiting while the
    /// socket buffer is full (back-pressure instead of drops).
    pub(crate) async fn send_batch(&mut self, batch: &mut SendBatch) {
        let mut next = 0;
        while next < batch.groups.len() {
            let end = (next + SEND_MSGS).min(batch.groups.len());
            let groups = &batch.groups[next..end];
            let res = self.sock.try_io(Interest::WRITABLE, || {
                sendmmsg(&self.sock, self.v6, &batch.buf, groups)
            });
            match res {
                Ok(sent) => next += sent.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.sock.writable().await {
                        tracing::warn!(error = %e, "UDP socket poll failed");
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let g = batch.groups[next];
                    let gso_limit = match e.raw_os_error() {
                        // Segments larger than the path allows.
                        Some(libc::EINVAL | libc::EMSGSIZE) => Some(self.gso_max.min(g.seg - 1)),
                        // The device or kernel cannot do GSO at all.
                        Some(libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT) => Some(0),
                        // Unreachable endpoint and the like: not about GSO.
                        _ => None,
                    };
                    if g.count > 1
                        && let Some(limit) = gso_limit
                    {
                        self.gso_max = limit;
                        tracing::info!(error = %e, segment = g.seg, gso_max = self.gso_max, "UDP GSO refused; sending these datagrams one by one");
                        for seg in batch.buf[g.start..g.start + g.len].chunks(g.seg) {
                            self.send(seg, g.to).await;
                        }
                    } else {
                        tracing::debug!(to = %g.to, error = %e, "UDP send failed");
                    }
                    next += 1;
                }
            }
        }
        batch.clear();
    }
}

fn set_int(s: &impl std::os::fd::AsRawFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: `s` is an open socket; we pass a pointer to a live c_int and
    // its exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            socklen(mem::size_of::<i32>()),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether the kernel knows `UDP_SEGMENT` (Linux 4.18+): reading it works.
fn gso_supported(s: &Socket) -> bool {
    let mut v: i32 = 0;
    let mut len = socklen(mem::size_of::<i32>());
    // SAFETY: `s` is an open socket; `v` and `len` are live and sized.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    rc == 0
}

fn socklen(n: usize) -> libc::socklen_t {
    libc::socklen_t::try_from(n).unwrap_or(libc::socklen_t::MAX)
}

// ------------------------------------------------------------ receive

/// One received message.
#[derive(Debug, Clone, Copy)]
struct Meta {
    len: usize,
    from: Option<SocketAddr>,
    /// Size of each datagram when GRO joined several (0: one datagram).
    segment: usize,
}

/// Buffers for one `recvmmsg`, allocated once.
#[derive(Debug)]
pub(crate) struct RecvBatch {
    buf: Vec<u8>,
    meta: Vec<Meta>,
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buf: vec![0; RECV_MSGS * RECV_BUF],
            meta: vec![
                Meta {
                    len: 0,
                    from: None,
                    segment: 0,
                };
                RECV_MSGS
            ],
            count: 0,
        }
    }
}

impl RecvBatch {
    /// Number of messages received by the last [`Udp::try_recv`].
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Message `i`: its sender and its datagrams (GRO may have joined
    /// several from the same sender).
    pub(crate) fn message(&self, i: usize) -> Option<(SocketAddr, std::slice::Chunks<'_, u8>)> {
        let m = self.meta.get(i).filter(|_| i < self.count)?;
        let data = &self.buf[i * RECV_BUF..i * RECV_BUF + m.len];
        let seg = if m.segment == 0 {
            m.len.max(1)
        } else {
            m.segment
        };
        Some((m.from?, data.chunks(seg)))
    }
}

/// `cmsghdr` space for one `int` (UDP_GRO) or `u16` (UDP_SEGMENT).
type CmsgSpace = [u64; 4];

fn recvmmsg(sock: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut names: [libc::sockaddr_storage; RECV_MSGS] = unsafe { mem::zeroed() };
    let mut ctrl: [CmsgSpace; RECV_MSGS] = [[0; 4]; RECV_MSGS];
    // SAFETY: as above.
    let mut iov: [libc::iovec; RECV_MSGS] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; RECV_MSGS] = unsafe { mem::zeroed() };
    for (i, chunk) in batch.buf.chunks_exact_mut(RECV_BUF).enumerate() {
        iov[i].iov_base = chunk.as_mut_ptr().cast();
        iov[i].iov_len = chunk.len();
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = (&raw mut names[i]).cast();
        h.msg_namelen = socklen(mem::size_of::<libc::sockaddr_storage>());
        h.msg_iov = &raw mut iov[i];
        h.msg_iovlen = 1;
        h.msg_control = ctrl[i].as_mut_ptr().cast();
        h.msg_controllen = mem::size_of::<CmsgSpace>();
    }
    // SAFETY: every mmsghdr points at live buffers of the stated sizes
    // (names, iov -> batch.buf chunks, ctrl) that outlive the call.
    let n = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            RECV_MSGS as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    for i in 0..n {
        let h = &msgs[i].msg_hdr;
        batch.meta[i] = Meta {
            len: msgs[i].msg_len as usize,
            from: sockaddr_to_std(&names[i]),
            segment: gro_segment(h),
        };
    }
    Ok(n)
}

/// The `UDP_GRO` control message of a received message, if any.
fn gro_segment(h: &libc::msghdr) -> usize {
    // SAFETY: `h` was filled by recvmmsg; its control pointer and length
    // describe a live buffer; the CMSG_* macros stay within it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                return usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    0
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, and
            // sockaddr_storage is large and aligned enough for it.
            let a = unsafe { &*(&raw const *s).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        libc::AF_INET => {
            // SAFETY: as above, for sockaddr_in.
            let a = unsafe { &*(&raw const *s).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        _ => None,
    }
}

// ------------------------------------------------------------ send

/// A run of datagrams to one endpoint sent as one (GSO) message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    to: SocketAddr,
    start: usize,
    len: usize,
    /// Size of each datagram but the last.
    seg: usize,
    count: usize,
    /// A shorter datagram ended the run.
    closed: bool,
}

/// Outgoing datagrams collected into one buffer, grouped for GSO.
#[derive(Debug)]
pub(crate) struct SendBatch {
    buf: Vec<u8>,
    used: usize,
    groups: Vec<Group>,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            buf: vec![0; SEND_BUF],
            used: 0,
            groups: Vec::with_capacity(SEND_BUF / 1024),
        }
    }
}

impl SendBatch {
    /// Free space for the next datagram (at least [`MAX_DATAGRAM`] bytes
    /// unless [`is_full`](Self::is_full)).
    pub(crate) fn slot(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    /// Whether a flush must come before the next [`slot`](Self::slot).
    pub(crate) fn is_full(&self) -> bool {
        self.buf.len() - self.used < MAX_DATAGRAM
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Queues the `len` bytes just written at the start of the slot for
    /// `to`, joining the previous message when GSO allows (datagrams of at
    /// most `gso_max` bytes).
    pub(crate) fn commit(&mut self, len: usize, to: SocketAddr, gso_max: usize) {
        let start = self.used;
        self.used += len;
        if let Some(g) = self.groups.last_mut()
            && g.to == to
            && !g.closed
            && g.count < MAX_GSO_SEGMENTS
            && g.seg <= gso_max
            && len <= g.seg
            && g.len + len <= MAX_GSO_BYTES
        {
            g.len += len;
            g.count += 1;
            g.closed = len < g.seg;
            return;
        }
        self.groups.push(Group {
            to,
            start,
            len,
            seg: len,
            count: 1,
            closed: false,
        });
    }

    fn clear(&mut self) {
        self.used = 0;
        self.groups.clear();
    }
}

fn sendmmsg(sock: &UdpSocket, v6: bool, buf: &[u8], groups: &[Group]) -> io::Result<usize> {
    let n = groups.len().min(SEND_MSGS);
    let names: [Option<SockAddr>; SEND_MSGS] = std::array::from_fn(|i| {
        groups.get(i).map(|g| {
            let to = match g.to {
                SocketAddr::V4(a) if v6 => {
                    SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
                }
                other @ (SocketAddr::V4(_) | SocketAddr::V6(_)) => other,
            };
            SockAddr::from(to)
        })
    });
    let mut ctrl: [CmsgSpace; SEND_MSGS] = [[0; 4]; SEND_MSGS];
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut iov: [libc::iovec; SEND_MSGS] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; SEND_MSGS] = unsafe { mem::zeroed() };
    for (i, g) in groups.iter().take(n).enumerate() {
        let data = &buf[g.start..g.start + g.len];
        iov[i].iov_base = data.as_ptr().cast_mut().cast();
        iov[i].iov_len = data.len();
        let h = &mut msgs[i].msg_hdr;
        if let Some(name) = &names[i] {
            h.msg_name = name.as_ptr().cast_mut().cast();
            h.msg_namelen = name.len();
        }
        h.msg_iov = &raw mut iov[i];
        h.msg_iovlen = 1;
        if g.count > 1 {
            let seg = u16::try_from(g.seg).unwrap_or(u16::MAX);
            h.msg_control = ctrl[i].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure size computation.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
            // SAFETY: the control buffer (32 bytes, aligned) holds
            // CMSG_SPACE(2) bytes; CMSG_FIRSTHDR of it is non-null and
            // CMSG_DATA points inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
    }
    // SAFETY: the first `n` mmsghdrs point at live names, iovecs (into
    // `buf`) and control buffers that outlive the call; the kernel only
    // reads them (and writes msg_len).
    let sent = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    const ANY: usize = usize::MAX;

    fn push(b: &mut SendBatch, len: usize, to: SocketAddr, gso_max: usize) {
        b.slot()[..len].fill(0xab);
        b.commit(len, to, gso_max);
    }

    #[test]
    fn equal_datagrams_to_one_endpoint_form_one_message() {
        let a = addr("198.18.0.2:51820");
        let mut b = SendBatch::default();
        for _ in 0..10 {
            push(&mut b, 1452, a, ANY);
        }
        push(&mut b, 300, a, ANY);
        // After a shorter one, a new message starts.
        push(&mut b, 1452, a, ANY);
        assert_eq!(b.groups.len(), 2);
        assert_eq!(
            (b.groups[0].count, b.groups[0].seg, b.groups[0].len),
            (11, 1452, 10 * 1452 + 300)
        );
        assert_eq!((b.groups[1].start, b.groups[1].count), (10 * 1452 + 300, 1));
    }

    #[test]
    fn endpoint_size_and_limits_split_messages() {
        let a = addr("198.18.0.2:51820");
        let c = addr("[fd00::2]:51820");
        let mut b = SendBatch::default();
        push(&mut b, 100, a, ANY);
        push(&mut b, 100, c, ANY);
        push(&mut b, 200, c, ANY); // larger than the run's size
        assert_eq!(b.groups.len(), 3);
        let mut b = SendBatch::default();
        for _ in 0..(MAX_GSO_SEGMENTS + 1) {
            push(&mut b, 100, a, ANY);
        }
        assert_eq!(b.groups.len(), 2);
        let mut b = SendBatch::default();
        for _ in 0..3 {
            push(&mut b, 100, a, 0); // no GSO
        }
        assert_eq!(b.groups.len(), 3);
        let mut b = SendBatch::default();
        for len in [1500, 1500, 1400, 1400, 100] {
            push(&mut b, len, a, 1450); // GSO only up to 1450 bytes
        }
        let counts: Vec<usize> = b.groups.iter().map(|g| g.count).collect();
        assert_eq!(counts, vec![1, 1, 3]);
        let mut b = SendBatch::default();
        for _ in 0..60 {
            push(&mut b, 1452, a, ANY);
        }
        assert!(b.groups.iter().all(|g| g.len <= MAX_GSO_BYTES));
        assert_eq!(b.groups.iter().map(|g| g.count).sum::<usize>(), 60);
    }
}
