//! The TUN device: one packet per read/write, each behind a
//! `virtio_net_hdr` (`IFF_VNET_HDR`), no packet-info header. With
//! TSO/checksum offload on (TUNSETOFFLOAD), reads may return TCP
//! super-segments of up to 64 KB and writes may carry them (see
//! `offload.rs`).
//!
//! `unsafe` here is the ioctls (TUNSETIFF, TUNSETOFFLOAD, SIOCSIFMTU,
//! SIOCGIFFLAGS/SIOCSIFFLAGS). Reads and writes go through
//! `std::fs::File`, driven by tokio's `AsyncFd`.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// TUN device flag: packets carry a `virtio_net_hdr`.
const IFF_VNET_HDR: libc::c_int = 0x4000;
/// TUNSETOFFLOAD bits: we take partial checksums and TCP segmentation.
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// `struct ifreq` reduced to what we use: a name and one int/short.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    /// `ifr_flags` (short) or `ifr_mtu` (int); padded to the union's size.
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        validate_ifname(name)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(req)
    }

    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Checks an interface name as the kernel will: 1..=15 bytes, no `/`,
/// whitespace, `:` or NUL (and it must not be `.` or `..`).
pub(crate) fn validate_ifname(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?} (1-15 printable characters, no '/' or ':')"),
        ))
    }
}

/// An open TUN interface (removed by the kernel when dropped).
#[derive(Debug)]
pub(crate) struct Tun {
    fd: AsyncFd<File>,
    name: String,
}

impl Tun {
    /// Creates (or attaches to) TUN interface `name`, sets its MTU and brings
    /// it up. Must be called inside a tokio runtime.
    pub(crate) fn open(name: &str, mtu: u16) -> io::Result<Tun> {
        let mut req = IfReq::new(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // The flags fit in a c_short (0x0001 | 0x1000 | 0x4000).
        #[allow(clippy::cast_possible_truncation)]
        req.set_short((libc::IFF_TUN | libc::IFF_NO_PI | IFF_VNET_HDR) as libc::c_short);
        // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a
        // properly sized, initialised `struct ifreq` the kernel reads and
        // writes (the name back) within its bounds.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let name = req.name();
        // SAFETY: `file` is the TUN descriptor just attached; TUNSETOFFLOAD
        // takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
            )
        };
        if rc < 0 {
            // Still correct: the kernel then hands us plain packets.
            tracing::warn!(interface = %name, error = %io::Error::last_os_error(), "TUN offloads unavailable");
        }
        set_mtu(&name, mtu)?;
        set_up(&name)?;
        // SAFETY: `file` owns a valid descriptor; it stays open and is
        // never replaced while the `AsyncFd` owns it.
        let fd = unsafe {
            AsyncFd::register_with_interest(file, Interest::READABLE | Interest::WRITABLE)?
        };
        Ok(Tun { fd, name })
    }

    /// Interface name the kernel gave us.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Waits until a packet may be readable.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        // Dropping the guard keeps the readiness; `try_read` clears it when
        // the queue is empty.
        self.fd.readable().await.map(drop)
    }

    /// Reads one vnet header and packet without waiting (`WouldBlock` when
    /// none is queued).
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd.try_io(Interest::READABLE, |f| (&mut &*f).read(buf))
    }

    /// Reads one vnet header and packet with a system call whatever the
    /// cached readiness says (busy polling: the reactor is not consulted).
    pub(crate) fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&mut self.fd.get_ref()).read(buf)
    }

    /// Writes one vnet header and packet, waiting while the device queue is
    /// full.
    pub(crate) async fn write(&self, packet: &[u8]) -> io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |f| (&mut &*f).write(packet))
            .await
            .map(drop)
    }
}

/// A throwaway datagram socket, the handle for interface ioctls.
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `sock` is an open socket and `req` a valid `struct ifreq`
    // (name + 24-byte union) for the interface ioctls we pass.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut IfReq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets the MTU of interface `name`.
pub(crate) fn set_mtu(name: &str, mtu: u16) -> io::Result<()> {
    let sock = ctl_socket()?;
    let mut req = IfReq::new(name)?;
    req.set_int(libc::c_int::from(mtu));
    ifreq_ioctl(&sock, libc::SIOCSIFMTU as _, &mut req)
}

/// Sets IFF_UP on interface `name`.
fn set_up(name: &str) -> io::Result<()> {
    let sock = ctl_socket()?;
    let mut req = IfReq::new(name)?;
    ifreq_ioctl(&sock, libc::SIOCGIFFLAGS as _, &mut req)?;
    #[allow(clippy::cast_possible_truncation)]
    let up = libc::IFF_UP as libc::c_short;
    req.set_short(req.short() | up);
    ifreq_ioctl(&sock, libc::SIOCSIFFLAGS as _, &mut req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(validate_ifname("wg0").is_ok());
        assert!(validate_ifname("a23456789012345").is_ok());
        assert!(validate_ifname("a234567890123456").is_err());
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_ifname("..").is_err());
    }
}
