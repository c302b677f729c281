//! 3 sites × 2 nodes: every ordered pair pings over the IPv4 and the IPv6
//! overlay, and 50 MB sent over TCP from a1 to c2 arrive intact.

use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use weft_tests::{Lab, Matrix};

const TRANSFER_BYTES: usize = 50 * 1024 * 1024;
const PORT: &str = "5001";

#[test]
fn overlay_mesh() {
    if weft_tests::skip_unless_root("overlay_mesh") {
        return;
    }
    let mut lab = Lab::builder()
        .sites(&["a", "b", "c"])
        .nodes_per_site(2)
        .build();

    for ipv6 in [false, true] {
        let family = if ipv6 { "IPv6" } else { "IPv4" };
        // The first packets of a pair trigger its handshake: wait until every
        // pair has answered once, then require a loss-free round.
        let mut last = String::from("(not measured)");
        let waited = weft_tests::try_wait_until(
            Duration::from_secs(30),
            &format!("all 30 ordered pairs to answer a ping over the {family} overlay"),
            || match Matrix::measure(&lab, ipv6, 1) {
                Ok(m) => {
                    last = m.render();
                    m.unreachable().is_empty()
                }
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            },
        );
        if let Err(e) = waited {
            panic!("{e:#}\nlast measurement:\n{last}");
        }
        let m = Matrix::measure(&lab, ipv6, 3).expect("measuring the matrix");
        eprintln!("{family} overlay:\n{}", m.render());
        assert_eq!(
            m.cells.len(),
            30,
            "expected 30 ordered pairs, got {}",
            m.cells.len()
        );
        assert!(
            m.unreachable().is_empty(),
            "over {family}, these pairs got no reply: {:?}\n{}",
            m.unreachable(),
            m.render()
        );
        assert!(
            m.lossy().is_empty(),
            "over {family}, expected no loss once the mesh is up, lost: {:?}",
            m.lossy()
        );
    }

    // 50 MB a1 → c2 over TCP on c2's overlay IPv4, checked by SHA-256.
    let (c2_v4, _) = lab.node_addresses("c2");
    let src = lab.dir().join("transfer.in");
    let dst = lab.dir().join("transfer.out");
    let sent_hash = write_random_file(&src, TRANSFER_BYTES);
    let recv_script = format!("exec nc -l -n {PORT} > '{}'", dst.display());
    lab.spawn(
        "nc-recv",
        "c2",
        Path::new("/bin/sh"),
        &["-c".into(), recv_script],
    )
    .expect("starting the nc receiver on c2");
    lab.wait_until(
        Duration::from_secs(10),
        "nc on c2 to listen on TCP 5001",
        || {
            let out = lab.exec("c2", &["ss", "-ltnH"]);
            String::from_utf8_lossy(&out.stdout).contains(&format!(":{PORT}"))
        },
    );
    let t0 = Instant::now();
    let send = lab.sh(
        "a1",
        &format!(
            "timeout 180 nc -N -n -w 20 {} {PORT} < '{}'",
            IpAddr::V4(c2_v4),
            src.display()
        ),
    );
    assert!(
        send.status.success(),
        "sending 50 MB from a1 to c2 ({c2_v4}:{PORT}) failed ({}): {}",
        send.status,
        String::from_utf8_lossy(&send.stderr)
    );
    let status = lab.wait_proc("nc-recv", Duration::from_secs(60));
    let elapsed = t0.elapsed();
    assert!(
        status.is_some(),
        "the receiver on c2 did not finish within 60 s after the sender did"
    );
    let received = fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        received, TRANSFER_BYTES as u64,
        "c2 received {received} bytes, expected {TRANSFER_BYTES}"
    );
    let recv_hash = sha256_file(&dst);
    assert_eq!(
        recv_hash, sent_hash,
        "SHA-256 of the file received on c2 differs from the one sent by a1"
    );
    eprintln!(
        "50 MB a1 -> c2 intact in {:.2} s ({:.1} Mbit/s)",
        elapsed.as_secs_f64(),
        TRANSFER_BYTES as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
    );
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&dst);
}

/// Writes `len` random bytes (from /dev/urandom) to `path`; returns their SHA-256.
fn write_random_file(path: &PathBuf, len: usize) -> String {
    let mut urandom = File::open("/dev/urandom").expect("opening /dev/urandom");
    let mut out = File::create(path).expect("creating the transfer file");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        urandom
            .read_exact(&mut buf[..n])
            .expect("reading /dev/urandom");
        out.write_all(&buf[..n]).expect("writing the transfer file");
        hasher.update(&buf[..n]);
        left -= n;
    }
    hex::encode(hasher.finalize())
}

fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).expect("opening the received file");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("reading the received file");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}
