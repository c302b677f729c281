//! `weft bench null-relay`: the smallest userspace tunnel, without
//! cryptography, as a floor for `bench/overlay.sh`.
//!
//! One thread moves packets between a TUN device and a connected UDP socket:
//! a packet read from the TUN device goes as-is in one datagram to the peer,
//! a datagram from the peer is written as-is to the TUN device. No
//! encryption, no batching, no allocation per packet. By default the thread
//! sleeps in a blocking poll(2) on both descriptors (ppoll, for a clean
//! exit), so every packet that crosses the tunnel wakes it up, as in any
//! userspace tunnel; with
//! `--busy-poll` it never sleeps but spins on non-blocking reads, calling
//! sched_yield(2) after each empty round, which removes those wake-ups at
//! the price of one CPU per relay. (Without the yield, two spinning relays
//! on a 2-vCPU machine starve the processes whose packets they carry.)
//! Either way it exits on SIGTERM or SIGINT.

#![allow(unsafe_code, reason = "ppoll(2), fcntl(2) and sigaction(2)")]

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// Set by SIGTERM/SIGINT; both loops check it on every round.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Packets moved in each direction.
#[derive(Debug, Default)]
struct Counts {
    to_peer: u64,
    from_peer: u64,
}

/// Relays between TUN device `tun` (created here; the caller gives it
/// addresses and routes and brings it up) and UDP `listen` <-> `peer` until
/// SIGTERM or SIGINT.
pub(crate) fn run(tun: &str, listen: SocketAddr, peer: SocketAddr, busy_poll: bool) -> Result<()> {
    // No SA_RESTART: a signal makes a blocking ppoll(2) return EINTR.
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(sig, &action) }.with_context(|| format!("sigaction {sig}"))?;
    }
    let tun_file = weft_tests::wan_delay::open_tun(tun)?;
    let sock = UdpSocket::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
    sock.connect(peer)
        .with_context(|| format!("connecting UDP to {peer}"))?;
    let mut buf = vec![0u8; 65_536];
    let counts = if busy_poll {
        set_nonblocking(&tun_file)?;
        sock.set_nonblocking(true)
            .context("making the UDP socket non-blocking")?;
        spin(&tun_file, &sock, &mut buf)?
    } else {
        sleep_in_poll(&tun_file, &sock, &mut buf)?
    };
    eprintln!(
        "null-relay {tun}: {} packets to the peer, {} from the peer",
        counts.to_peer, counts.from_peer
    );
    Ok(())
}

fn set_nonblocking(file: &File) -> Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: plain fcntl(2) calls on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error()).context("making the TUN fd non-blocking");
    }
    Ok(())
}

/// TUN -> peer: one read, one send. A failed send is a lost packet (the
/// peer's relay may not be up yet: ECONNREFUSED).
fn tun_to_peer(mut tun: &File, sock: &UdpSocket, buf: &mut [u8]) -> io::Result<bool> {
    match tun.read(buf) {
        Ok(n) => {
            let _ = sock.send(&buf[..n]);
            Ok(true)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Peer -> TUN: one receive, one write. A failed write is a lost packet;
/// ICMP errors reported on the connected socket are ignored.
fn peer_to_tun(mut tun: &File, sock: &UdpSocket, buf: &mut [u8]) -> bool {
    match sock.recv(buf) {
        Ok(n) => {
            let _ = tun.write(&buf[..n]);
            true
        }
        Err(_) => false,
    }
}

fn sleep_in_poll(tun: &File, sock: &UdpSocket, buf: &mut [u8]) -> Result<Counts> {
    let mut counts = Counts::default();
    let mut fds = [
        libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SIGTERM/SIGINT stay blocked except inside ppoll(2), so one that comes
    // between the STOP check and the call still interrupts the call.
    let stop_signals = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT]);
    let mut in_poll = stop_signals
        .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
        .context("blocking SIGTERM and SIGINT")?;
    in_poll.remove(Signal::SIGTERM);
    in_poll.remove(Signal::SIGINT);
    while !STOP.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of two pollfd and `in_poll` a valid
        // signal set, both alive for the call; no timeout.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, std::ptr::null(), in_poll.as_ref()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0
            && tun_to_peer(tun, sock, buf).context("reading the TUN device")?
        {
            counts.to_peer += 1;
        }
        // POLLERR: a pending ICMP error, consumed by the recv.
        if fds[1].revents & (libc::POLLIN | libc::POLLERR) != 0 && peer_to_tun(tun, sock, buf) {
            counts.from_peer += 1;
        }
    }
    Ok(counts)
}

fn spin(tun: &File, sock: &UdpSocket, buf: &mut [u8]) -> Result<Counts> {
    let mut counts = Counts::default();
    while !STOP.load(Ordering::Relaxed) {
        let mut idle = true;
        if tun_to_peer(tun, sock, buf).context("reading the TUN device")? {
            counts.to_peer += 1;
            idle = false;
        }
        if peer_to_tun(tun, sock, buf) {
            counts.from_peer += 1;
            idle = false;
        }
        if idle {
            // sched_yield(2), not sleep: the CPU goes to whatever else is
            // runnable (the pinging process, the other relay on a small
            // machine), and this thread is back at once when nothing is.
            std::thread::yield_now();
        }
    }
    Ok(counts)
}
