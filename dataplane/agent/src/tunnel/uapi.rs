//! The WireGuard cross-platform userspace API
//! (<https://www.wireguard.com/xplatform/>): `key=value` lines on a unix
//! socket `<dir>/<ifname>.sock`, so `wg show`, `wg set`, `wg setconf` and
//! `wg showconf` work against our tunnel.
//!
//! [`parse_request`] and [`format_get`] are pure; [`serve`] runs the socket
//! and hands requests to the tunnel's event loop.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use weft_dataplane_core::Key;

use super::{Command, PeerStats};
pub(crate) use weft_dataplane_core::uapi::{Request, SetRequest, parse_request};

/// `EINVAL`: the answer to any malformed request.
pub(crate) const EINVAL: i32 = 22;
/// Longest line we accept (a line holds one key or one prefix).
const MAX_LINE: u64 = 4096;
/// Most lines in one request (a big `wg setconf`).
const MAX_LINES: usize = 1 << 20;

/// The answer to `get=1` (including the final `errno=0` and blank line).
pub(crate) fn format_get(
    private_key: Option<Key>,
    listen_port: u16,
    fwmark: u32,
    peers: &[(PeerStats, Option<Key>)],
) -> String {
    let mut s = String::with_capacity(256 + peers.len() * 256);
    // Writing to a String cannot fail.
    let _ = (|| -> std::fmt::Result {
        if let Some(k) = private_key {
            writeln!(s, "private_key={}", k.to_hex())?;
        }
        writeln!(s, "listen_port={listen_port}")?;
        if fwmark != 0 {
            writeln!(s, "fwmark={fwmark}")?;
        }
        for (p, psk) in peers {
            writeln!(s, "public_key={}", p.public_key.to_hex())?;
            if let Some(psk) = psk {
                writeln!(s, "preshared_key={}", psk.to_hex())?;
            }
            writeln!(s, "protocol_version=1")?;
            if let Some(ep) = p.endpoint {
                writeln!(s, "endpoint={ep}")?;
            }
            let since = p
                .last_handshake
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default();
            writeln!(s, "last_handshake_time_sec={}", since.as_secs())?;
            writeln!(s, "last_handshake_time_nsec={}", since.subsec_nanos())?;
            writeln!(s, "tx_bytes={}", p.tx_bytes)?;
            writeln!(s, "rx_bytes={}", p.rx_bytes)?;
            writeln!(
                s,
                "persistent_keepalive_interval={}",
                p.persistent_keepalive.unwrap_or(0)
            )?;
            for net in &p.allowed_ips {
                writeln!(s, "allowed_ip={net}")?;
            }
        }
        writeln!(s, "errno=0")?;
        writeln!(s)
    })();
    s
}

/// The answer to a `set` or a failed request.
pub(crate) fn format_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

/// Creates `<dir>/<ifname>.sock` (and `dir`, mode 0755). A stale socket is
/// replaced; a live one (another daemon answers) is an error.
pub(crate) async fn bind(dir: &Path, ifname: &str) -> anyhow::Result<(UnixListener, PathBuf)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating UAPI directory {}", dir.display()))?;
    let path = dir.join(format!("{ifname}.sock"));
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            anyhow::bail!(
                "UAPI socket {} is in use: another daemon runs interface {ifname}",
                path.display()
            );
        }
        // Gone already (another cleanup got there first) is as good.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e)
                    .with_context(|| format!("removing stale UAPI socket {}", path.display()));
            }
            _ => {}
        }
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding UAPI socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok((listener, path))
}

/// Accepts UAPI connections until the tunnel's command channel closes.
pub(crate) async fn serve(listener: UnixListener, commands: mpsc::Sender<Command>) {
    loop {
        tokio::select! {
            () = commands.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let commands = commands.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle_connection(stream, commands).await {
                            tracing::debug!(error = %e, "UAPI connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves requests on one connection until the client closes it.
async fn handle_connection(stream: UnixStream, commands: mpsc::Sender<Command>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut text = String::new();
    let mut line = String::new();
    loop {
        text.clear();
        let mut count = 0usize;
        loop {
            line.clear();
            let n = (&mut reader).take(MAX_LINE).read_line(&mut line).await?;
            if n == 0 {
                return Ok(()); // EOF (mid-request too: nothing is applied)
            }
            if !line.ends_with('\n') || count >= MAX_LINES {
                write.write_all(format_errno(EINVAL).as_bytes()).await?;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request too long",
                ));
            }
            if line == "\n" {
                break;
            }
            text.push_str(&line);
            count += 1;
        }
        let reply = match parse_request(&text) {
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                if commands.send(Command::Uapi(req, tx)).await.is_err() {
                    return Ok(());
                }
                match rx.await {
                    Ok(reply) => reply,
                    Err(_) => return Ok(()),
                }
            }
            Err(e) => {
                tracing::info!(error = %e, "refused UAPI request");
                format_errno(EINVAL)
            }
        };
        write.write_all(reply.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use std::time::Duration;

    fn hex(b: u8) -> String {
        Key([b; 32]).to_hex()
    }

    #[test]
    fn parses_get() {
        assert_eq!(parse_request("get=1\n"), Ok(Request::Get));
        assert!(parse_request("get=1\nlisten_port=1\n").is_err());
    }

    #[test]
    fn parses_a_full_set() {
        let text = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nendpoint=198.18.0.2:51820\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=100.64.0.2/32\nallowed_ip=fd00::2/128\nprotocol_version=1\n\
             public_key={}\nremove=true\n\
             public_key={}\nupdate_only=true\nendpoint=[fd00::3]:1\nallowed_ip=100.64.9.9/24\n",
            hex(1),
            hex(2),
            hex(0),
            hex(3),
            hex(4)
        );
        let Ok(Request::Set(req)) = parse_request(&text) else {
            panic!("expected a valid set request");
        };
        assert_eq!(req.private_key, Some(Some(Key([1; 32]))));
        assert_eq!(req.listen_port, Some(51820));
        assert_eq!(req.fwmark, Some(0));
        assert!(req.replace_peers);
        assert_eq!(req.peers.len(), 3);
        let p = &req.peers[0];
        assert_eq!(p.public_key, Key([2; 32]));
        assert_eq!(p.preshared_key, Some(None));
        assert_eq!(p.endpoint, Some("198.18.0.2:51820".parse().expect("addr")));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips.len(), 2);
        assert!(req.peers[1].remove);
        assert!(req.peers[2].update_only);
        assert_eq!(
            req.peers[2].allowed_ips,
            vec!["100.64.9.0/24".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn zero_private_key_means_remove() {
        let Ok(Request::Set(req)) = parse_request(&format!("set=1\nprivate_key={}\n", hex(0)))
        else {
            panic!("expected a valid set request");
        };
        assert_eq!(req.private_key, Some(None));
    }

    #[test]
    fn rejects_bad_input() {
        let bad = [
            String::new(),
            "\n".into(),
            "get=2\n".into(),
            "set=1\nlisten_port=65536\n".into(),
            "set=1\nlisten_port=-1\n".into(),
            "set=1\nlisten_port=+1\n".into(),
            "set=1\nprivate_key=abcd\n".into(),
            format!("set=1\nprivate_key={}zz\n", &hex(1)[..62]),
            "set=1\nendpoint=198.18.0.2:1\n".into(), // peer key before public_key
            format!("set=1\npublic_key={}\nlisten_port=1\n", hex(1)),
            format!("set=1\npublic_key={}\nendpoint=nowhere\n", hex(1)),
            format!("set=1\npublic_key={}\nallowed_ip=100.64.0.0/33\n", hex(1)),
            format!("set=1\npublic_key={}\nprotocol_version=2\n", hex(1)),
            format!("set=1\npublic_key={}\nremove=yes\n", hex(1)),
            format!("set=1\npublic_key={}\nno_equals\n", hex(1)),
            "set=1\nfwmark=99999999999\n".into(),
            "set=1\nbogus=1\n".into(),
        ];
        for text in bad {
            assert!(parse_request(&text).is_err(), "accepted {text:?}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"=\n0123456789abcdef:/[].set1getpublic_keyallowed_ip";
        for _ in 0..5000 {
            let len = usize::try_from(seed % 200).unwrap_or(0);
            let mut s = String::new();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = usize::try_from(seed % alphabet.len() as u64).unwrap_or(0);
                s.push(char::from(alphabet[i]));
            }
            let _ = parse_request(&s);
            let _ = parse_request(&format!("set=1\n{s}"));
        }
    }

    #[test]
    fn formats_get() {
        let stats = PeerStats {
            name: String::new(),
            public_key: Key([2; 32]),
            endpoint: Some("[fd00::2]:51820".parse().expect("addr")),
            allowed_ips: vec!["100.64.0.2/32".parse().expect("net")],
            persistent_keepalive: Some(25),
            last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
            rx_bytes: 10,
            tx_bytes: 20,
        };
        let out = format_get(Some(Key([1; 32])), 51820, 0, &[(stats, None)]);
        let want = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nprotocol_version=1\n\
             endpoint=[fd00::2]:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\ntx_bytes=20\nrx_bytes=10\n\
             persistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nerrno=0\n\n",
            hex(1),
            hex(2)
        );
        assert_eq!(out, want);
        let empty = format_get(None, 0, 7, &[]);
        assert_eq!(empty, "listen_port=0\nfwmark=7\nerrno=0\n\n");
    }
}
