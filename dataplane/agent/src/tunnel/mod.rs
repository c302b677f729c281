//! Userspace WireGuard tunnel: boringtun's `noise::Tunn` per peer over a TUN
//! device and one dual-stack UDP socket, driven by our own event loop.
//!
//! [`start`] creates the TUN device, binds the UDP socket and the UAPI
//! socket, and spawns one task that owns all tunnel state (no locks on the
//! packet path). The returned [`TunnelHandle`] talks to that task through a
//! command channel:
//!
//! - [`TunnelHandle::apply`] adds, updates in place, or removes peers;
//! - [`TunnelHandle::peers`] reports endpoints, handshakes and transfer;
//! - [`TunnelHandle::set_private_key`] swaps our static key (rotation);
//! - [`TunnelHandle::shutdown`] stops the task, deletes the TUN device and
//!   removes the UAPI socket.
//!
//! Packet path: TUN → longest-prefix match of the destination over the
//! peers' allowed IPs → encapsulate → UDP to the peer's endpoint. UDP →
//! peer by handshake identity or receiver index → decapsulate → source
//! address must route back to that peer, or be among the sources accepted
//! from it (traffic a gateway relays), and the destination must be one this
//! node hosts or relays (`destinations.rs`) → TUN.
//!
//! Both directions work in batches: the TUN device does TCP segmentation
//! offload (we cut its 64 KB super-segments ourselves, `offload.rs`, and
//! join received segments back), and the UDP socket moves many datagrams
//! per system call with `sendmmsg`/`recvmmsg`, UDP GSO and GRO (`udp.rs`).

mod destinations;
mod eventloop;
mod offload;
mod peers;
mod sources;
mod tun;
pub(crate) mod uapi;
mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};
use weft_dataplane_core::plan::PeerAction;
use weft_dataplane_core::{Key, duration};

pub(crate) use destinations::Destinations;

/// Default directory of UAPI sockets, where `wg` looks for them.
pub(crate) const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";

/// How a tunnel is created.
#[derive(Debug, Clone)]
pub(crate) struct TunnelSettings {
    /// TUN interface name (1-15 characters).
    pub(crate) ifname: String,
    /// UDP port; 0 picks a random free port.
    pub(crate) listen_port: u16,
    /// Our static private key; `None` until set through the UAPI.
    pub(crate) private_key: Option<Key>,
    /// TUN MTU in bytes (1420 fits WireGuard over IPv6 on a 1500 underlay).
    pub(crate) mtu: u16,
    /// Directory of the UAPI socket `<uapi_dir>/<ifname>.sock`.
    pub(crate) uapi_dir: PathBuf,
    /// When the tunnel loop polls instead of sleeping.
    pub(crate) polling: Polling,
    /// Mark (SO_MARK) on the tunnel's own UDP packets, so that Weft's
    /// routing rule lets them through to the underlay; 0 = none.
    pub(crate) fwmark: u32,
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counter {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

impl Counter {
    fn add(&mut self, bytes: usize) {
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(bytes as u64);
    }
}

/// Decrypted packets the tunnel dropped, per reason, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TunnelDrops {
    /// The destination is neither hosted nor relayed by this node.
    pub(crate) not_for_us: Counter,
    /// The source neither routes back to the sending peer nor is accepted
    /// from it.
    pub(crate) bad_source: Counter,
}

impl TunnelDrops {
    /// The counters with the names reports use.
    pub(crate) fn named(&self) -> [(&'static str, Counter); 2] {
        [
            ("not_for_us", self.not_for_us),
            ("bad_source", self.bad_source),
        ]
    }
}

/// The default of `--busy-poll`: poll for 200 µs after the last packet,
/// which on a small VM catches the answer to a packet just sent (the
/// kernel's own idle poll, haltpoll, waits as long before halting a CPU).
pub(crate) const DEFAULT_BUSY_POLL: &str = "200us";

/// `--busy-poll`, for `weft-agent` and `weft-agent wg`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PollArgs {
    /// Poll the tunnel's TUN device and UDP socket instead of sleeping until the
    /// kernel wakes the loop for the next packet: `--busy-poll=200us` (the
    /// default) polls while packets keep coming and for 200 µs after the
    /// last one, then sleeps, so an idle tunnel costs no CPU; a longer time
    /// (units us, ms, s) saves more wake-ups on sparse traffic and spends
    /// more CPU; `--busy-poll` (or `=always`) never sleeps and keeps a CPU
    /// busy even when idle; `--busy-poll=off` sleeps at once. Polling
    /// saves wake-ups that cost about 0.1 ms of round-trip time on a small
    /// VM.
    #[arg(
        long,
        env = "WEFT_BUSY_POLL",
        value_name = "WHEN",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "always",
        default_value = DEFAULT_BUSY_POLL,
        value_parser = Polling::parse
    )]
    pub(crate) busy_poll: Polling,
}

/// When the tunnel loop polls the TUN device and the UDP socket with system
/// calls in a loop instead of sleeping until one is readable. A sleeping
/// loop is woken by the kernel for each packet that arrives after a quiet
/// spell, which costs tens of microseconds per wake-up on a small VM (a
/// round trip over the tunnel has four); a polling loop sees the packet at
/// once but keeps a CPU busy while it polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Polling {
    /// Sleep whenever there is nothing to read.
    Sleep,
    /// Poll while packets keep coming, and for this long after the last
    /// one; then sleep until the next. An idle tunnel costs no CPU. The
    /// default, with [`DEFAULT_BUSY_POLL`].
    Linger(Duration),
    /// Never sleep: a CPU stays busy even when the tunnel is idle.
    Always,
}

impl Polling {
    /// Parses the value of `--busy-poll`: `always` (also `on`, `true`, `1`),
    /// `off` (also `false`, `0`), or a linger time with units `us`, `ms`,
    /// `s`: `500us`, `20ms`, `1s`.
    pub(crate) fn parse(s: &str) -> Result<Polling, String> {
        let v = s.trim().to_ascii_lowercase();
        match v.as_str() {
            "always" | "on" | "true" | "yes" | "1" => return Ok(Polling::Always),
            "off" | "false" | "no" | "0" => return Ok(Polling::Sleep),
            _ => {}
        }
        let bad = |why: &str| {
            format!(
                "invalid busy-poll setting {s:?}: {why} (use always, off, or a linger time such as 500us, 20ms or 1s)"
            )
        };
        if !v.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(bad("expected always, off or a number"));
        }
        let linger = duration::parse(&v, duration::MICROS_TO_SECONDS).map_err(|why| bad(&why))?;
        if linger.is_zero() {
            return Ok(Polling::Sleep);
        }
        if linger > Duration::from_secs(60) {
            return Err(bad("longer than 60s: use always"));
        }
        Ok(Polling::Linger(linger))
    }
}

/// What the tunnel knows about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerStats {
    /// Name from the last `Upsert` (empty for peers added through the UAPI).
    pub(crate) name: String,
    pub(crate) public_key: Key,
    /// Current endpoint: configured, or learnt from the peer's packets.
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) allowed_ips: Vec<IpNet>,
    pub(crate) persistent_keepalive: Option<u16>,
    /// Time of the latest completed handshake.
    pub(crate) last_handshake: Option<SystemTime>,
    /// WireGuard bytes (UDP payload, handshakes included) received and sent.
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
}

/// Requests to the tunnel task.
#[derive(Debug)]
pub(crate) enum Command {
    Apply(Vec<PeerAction>, oneshot::Sender<()>),
    Peers(oneshot::Sender<Vec<PeerStats>>),
    /// Which decrypted packets to deliver, by destination.
    SetDestinations(Destinations, oneshot::Sender<()>),
    Drops(oneshot::Sender<TunnelDrops>),
    /// Replace our static private key and handshake with every peer.
    SetPrivateKey(Key, oneshot::Sender<()>),
    /// A parsed UAPI request; the reply is the UAPI answer text.
    Uapi(uapi::Request, oneshot::Sender<String>),
    /// Stop; the sender fires once the TUN device and socket are closed.
    Shutdown(oneshot::Sender<()>),
}

/// A cheap, cloneable handle on a running tunnel.
#[derive(Debug, Clone)]
pub(crate) struct TunnelHandle {
    commands: mpsc::Sender<Command>,
    uapi_path: PathBuf,
    ifname: String,
}

/// Creates the TUN device, binds the UDP and UAPI sockets and spawns the
/// tunnel task. Must run inside a tokio runtime.
pub(crate) async fn start(settings: TunnelSettings) -> anyhow::Result<TunnelHandle> {
    tun::validate_ifname(&settings.ifname)?;
    // The UAPI socket first: it tells us whether another daemon already
    // runs this interface, before we attach to its TUN device.
    let (listener, uapi_path) = uapi::bind(&settings.uapi_dir, &settings.ifname).await?;
    let mut guard = RemoveOnDrop(Some(uapi_path.clone()));
    let tun = tun::Tun::open(&settings.ifname, settings.mtu)
        .with_context(|| format!("creating TUN device {}", settings.ifname))?;
    let ifname = tun.name().to_owned();
    let udp = eventloop::Udp::bind(settings.listen_port)
        .with_context(|| format!("binding UDP port {}", settings.listen_port))?;
    if settings.fwmark != 0 {
        udp.set_mark(settings.fwmark).with_context(|| {
            format!(
                "marking the tunnel's UDP socket with fwmark {:#x}",
                settings.fwmark
            )
        })?;
    }
    tracing::info!(
        interface = %ifname,
        listen_port = udp.port(),
        uapi = %uapi_path.display(),
        fwmark = settings.fwmark,
        "tunnel up"
    );
    let (tx, rx) = mpsc::channel(64);
    let engine = eventloop::Engine::new(
        tun,
        udp,
        settings.private_key,
        settings.polling,
        settings.fwmark,
    );
    tokio::spawn(engine.run(rx));
    tokio::spawn(uapi::serve(listener, tx.clone()));
    guard.disarm();
    Ok(TunnelHandle {
        commands: tx,
        uapi_path,
        ifname,
    })
}

impl TunnelHandle {
    /// Adds peers, updates known ones in place (sessions kept; the `Tunn` is
    /// recreated only when the keepalive changes; the configured endpoint
    /// replaces a learnt one only when the configured one changed), removes
    /// peers and their sessions at once.
    pub(crate) async fn apply(&self, actions: Vec<PeerAction>) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Apply(actions, tx)).await?;
        rx.await.context("tunnel task stopped")
    }

    /// All peers with their current endpoint, latest handshake and transfer,
    /// ordered by public key.
    pub(crate) async fn peers(&self) -> anyhow::Result<Vec<PeerStats>> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Peers(tx)).await?;
        rx.await.context("tunnel task stopped")
    }

    /// Sets which decrypted packets are delivered, by destination.
    pub(crate) async fn set_destinations(&self, d: Destinations) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetDestinations(d, tx)).await?;
        rx.await.context("tunnel task stopped")
    }

    /// Decrypted packets dropped so far, per reason.
    pub(crate) async fn drops(&self) -> anyhow::Result<TunnelDrops> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Drops(tx)).await?;
        rx.await.context("tunnel task stopped")
    }

    /// Replaces our static private key (key rotation): every session
    /// ends, and a handshake with the new key starts at once with every
    /// peer that has an endpoint, so traffic waits one handshake (packets
    /// meanwhile are queued by the peers' sessions, a few per peer).
    pub(crate) async fn set_private_key(&self, key: Key) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetPrivateKey(key, tx)).await?;
        rx.await.context("tunnel task stopped")
    }

    /// Stops the tunnel: deletes the TUN device, closes the sockets and
    /// removes the UAPI socket file. Idempotent.
    pub(crate) async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        if let Err(e) = std::fs::remove_file(&self.uapi_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.uapi_path.display(), error = %e, "removing UAPI socket");
        }
    }

    /// Resolves when the tunnel task has stopped (shutdown or fatal error).
    pub(crate) async fn closed(&self) {
        self.commands.closed().await;
    }

    /// Interface name.
    pub(crate) fn ifname(&self) -> &str {
        &self.ifname
    }

    async fn send(&self, cmd: Command) -> anyhow::Result<()> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| anyhow::anyhow!("tunnel {} is stopped", self.ifname))
    }
}

/// Removes a file when dropped (start-up failed half-way).
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_poll_settings_parse() {
        assert_eq!(
            Polling::parse(DEFAULT_BUSY_POLL),
            Ok(Polling::Linger(Duration::from_micros(200)))
        );
        assert_eq!(Polling::parse("always"), Ok(Polling::Always));
        assert_eq!(Polling::parse("TRUE"), Ok(Polling::Always));
        assert_eq!(Polling::parse("off"), Ok(Polling::Sleep));
        assert_eq!(Polling::parse("0ms"), Ok(Polling::Sleep));
        assert_eq!(
            Polling::parse("500us"),
            Ok(Polling::Linger(Duration::from_micros(500)))
        );
        assert_eq!(
            Polling::parse(" 20ms "),
            Ok(Polling::Linger(Duration::from_millis(20)))
        );
        assert_eq!(
            Polling::parse("2s"),
            Ok(Polling::Linger(Duration::from_secs(2)))
        );
        for (bad, why) in [
            ("", "expected always"),
            ("20", "missing unit"),
            ("20m", "unknown unit"),
            ("fast", "expected always"),
            ("61s", "longer than 60s"),
            ("99999999999999999999ms", "too large"),
        ] {
            let e = Polling::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
