//! Network policy on fragmented datagrams (issue 11, point 3): c1 is
//! `role=db`, a1 `role=web`, a2 unlabelled. The policy lets `role=web`
//! reach `role=db` on UDP 5000 and ICMP, and denies it UDP 5001; anything
//! else to c1 is default-denied. The overlay MTU is 1420, so the senders'
//! kernels cut every datagram below into three IP fragments.
//!
//! - a1 sends 4000-byte UDP datagrams to c1 on 5001 (denied), then on 5000
//!   (allowed), over IPv4 and IPv6: every allowed datagram arrives whole
//!   and intact, the denied socket receives nothing.
//! - `ping -s 3000` a1 → c1 is answered (ICMP allowed), a2 → c1 is not
//!   (default deny), and c1 → a2 is answered: the fragmented replies pass
//!   as a flow c1 opened.
//! - c1's reported verdict counters match the fragments exactly: a
//!   datagram's first fragment counts under the policy's verdict, the
//!   later fragments of a passed datagram under the same verdict, those of
//!   a dropped one as `unparsable`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use weft_tests::Lab;
use weft_tests::netns::udp_socket_in;

const POLICY: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {role: db}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: UDP, port: 5000}, {protocol: ICMP}]
  deny:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: UDP, port: 5001}]
"#;

const ALLOWED_PORT: u16 = 5000;
const DENIED_PORT: u16 = 5001;
/// UDP payload: 4008 bytes of UDP, three fragments at MTU 1420 (IPv4:
/// 1400 + 1400 + 1208; IPv6: 1368 + 1368 + 1272).
const DATAGRAM: usize = 4000;
/// Datagrams sent per port and IP version.
const DATAGRAMS: u64 = 5;
/// ICMP payload of `ping -s`: three fragments too.
const PING_SIZE: &str = "3000";
/// Echo requests per `ping`.
const PINGS: u64 = 3;
const FRAGMENTS: u64 = 3;

/// The ingress verdicts c1 reports.
const VERDICTS: [&str; 5] = [
    "allowed",
    "established",
    "denied",
    "default_denied",
    "unparsable",
];

/// Packets per verdict in a node's last report.
fn verdicts(lab: &Lab, node: &str) -> BTreeMap<&'static str, u64> {
    let out = lab.weftctl_ok(&["node", "get", node, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("node json");
    VERDICTS
        .iter()
        .map(|&name| {
            let packets = v["policy"]["verdicts"][name]["packets"]
                .as_u64()
                .unwrap_or(0);
            (name, packets)
        })
        .collect()
}

/// A node's verdict counters once its reports have caught up: agents
/// report counters that moved within a second, so two reads 1.5 s apart
/// agree.
fn settled(lab: &Lab, node: &str) -> BTreeMap<&'static str, u64> {
    let mut last = verdicts(lab, node);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1500));
        let now = verdicts(lab, node);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("{node}'s policy counters did not settle: last {last:?}");
}

/// The content of datagram `i`: its number, then a pattern.
fn datagram(i: u64) -> Vec<u8> {
    let mut d = i.to_be_bytes().to_vec();
    d.extend((8..DATAGRAM).map(|j| u8::try_from((j * 7 + 3) % 251).expect("< 251")));
    d
}

/// Receives `count` datagrams on `sock` within `timeout`, each checked to
/// be a whole [`datagram`] in order.
fn receive_whole(sock: &UdpSocket, count: u64, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65_536];
    for i in 0..count {
        let left = deadline.saturating_duration_since(Instant::now());
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        let (n, from) = sock.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!("{what}: datagram {i} of {count} did not arrive within {timeout:?}: {e}")
        });
        assert_eq!(
            n, DATAGRAM,
            "{what}: datagram {i} from {from} arrived with {n} bytes, not whole"
        );
        assert!(
            buf[..n] == datagram(i)[..],
            "{what}: datagram {i} from {from} arrived altered"
        );
    }
}

/// `ping -c PINGS -s PING_SIZE` (no `-w`: exactly PINGS requests); the
/// replies received.
fn ping_big(lab: &Lab, from: &str, to: IpAddr) -> u64 {
    let to = to.to_string();
    let mut args = vec!["ping", "-n", "-c", "3", "-i", "0.3", "-W", "2"];
    if to.contains('.') {
        // Fragment locally, whatever the path MTU says.
        args.extend(["-M", "dont"]);
    }
    args.extend(["-s", PING_SIZE, &to]);
    let out = lab.exec(from, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" packets transmitted, ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("ping {from} -> {to}: no summary in {text:?}"))
}

#[test]
fn policy_fragments() {
    if weft_tests::skip_unless_root("policy_fragments") {
        return;
    }
    let lab = Lab::builder().site_nodes(&[("a", 2), ("c", 1)]).build();
    let (c1_v4, c1_v6) = lab.node_addresses("c1");
    let (a2_v4, a2_v6) = lab.node_addresses("a2");
    let c1 = [IpAddr::V4(c1_v4), IpAddr::V6(c1_v6)];
    let a2 = [IpAddr::V4(a2_v4), IpAddr::V6(a2_v6)];

    for ip in c1 {
        lab.wait_until(
            Duration::from_secs(20),
            &format!("a1 to ping c1 at {ip} before policy"),
            || lab.ping_once("a1", ip, 500),
        );
    }

    // Receivers on c1, senders on a1 (one socket per IP version).
    let (c1_ns, a1_ns) = (lab.ns("c1"), lab.ns("a1"));
    let bind = |ns: &str, addr: SocketAddr| {
        udp_socket_in(ns, addr).unwrap_or_else(|e| panic!("UDP socket in {ns}: {e:#}"))
    };
    let receivers: Vec<(UdpSocket, UdpSocket)> = c1
        .iter()
        .map(|&ip| {
            (
                bind(&c1_ns, SocketAddr::new(ip, ALLOWED_PORT)),
                bind(&c1_ns, SocketAddr::new(ip, DENIED_PORT)),
            )
        })
        .collect();
    let senders: Vec<UdpSocket> = ["0.0.0.0:0", "[::]:0"]
        .iter()
        .map(|a| bind(&a1_ns, a.parse().expect("address")))
        .collect();

    // Before any policy, fragmented datagrams and pings cross.
    for (i, (ip, sender)) in c1.iter().zip(&senders).enumerate() {
        sender
            .send_to(&datagram(0), SocketAddr::new(*ip, DENIED_PORT))
            .expect("send before policy");
        receive_whole(
            &receivers[i].1,
            1,
            Duration::from_secs(5),
            &format!("a1 -> c1 {ip} UDP {DENIED_PORT} before policy"),
        );
    }
    assert_eq!(
        ping_big(&lab, "a2", c1[0]),
        PINGS,
        "a2 -> c1 ping -s {PING_SIZE} must work before any policy"
    );

    lab.weftctl_ok(&["node", "label", "c1", "role=db"]);
    lab.weftctl_ok(&["node", "label", "a1", "role=web"]);
    let file = lab.dir().join("policy-db.yaml");
    std::fs::write(&file, POLICY).expect("writing the policy file");
    lab.weftctl_ok(&["apply", "-f", &file.display().to_string()]);
    lab.wait_until(
        Duration::from_secs(15),
        "c1 to enforce the policy (a2 -> c1 ping dropped)",
        || !lab.ping_once("a2", c1[0], 500),
    );
    let before = settled(&lab, "c1");

    // Denied datagrams first, then allowed ones, on the same path: once
    // the allowed ones are in, the denied ones would have been too.
    for (ip, sender) in c1.iter().zip(&senders) {
        for i in 0..DATAGRAMS {
            sender
                .send_to(&datagram(i), SocketAddr::new(*ip, DENIED_PORT))
                .expect("send to the denied port");
        }
        for i in 0..DATAGRAMS {
            sender
                .send_to(&datagram(i), SocketAddr::new(*ip, ALLOWED_PORT))
                .expect("send to the allowed port");
        }
    }
    for (ip, (allowed, denied)) in c1.iter().zip(&receivers) {
        receive_whole(
            allowed,
            DATAGRAMS,
            Duration::from_secs(10),
            &format!("a1 -> c1 {ip} UDP {ALLOWED_PORT} (allowed)"),
        );
        denied
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("read timeout");
        let mut buf = vec![0u8; 65_536];
        if let Ok((n, from)) = denied.recv_from(&mut buf) {
            panic!("c1 {ip} UDP {DENIED_PORT} (denied) received {n} bytes from {from}");
        }
    }

    for (ip, a2_ip) in c1.iter().zip(a2) {
        assert_eq!(
            ping_big(&lab, "a1", *ip),
            PINGS,
            "a1 -> c1 {ip} ping -s {PING_SIZE}: ICMP is allowed, every reply must come"
        );
        assert_eq!(
            ping_big(&lab, "a2", *ip),
            0,
            "a2 -> c1 {ip} ping -s {PING_SIZE}: default deny, no request may arrive"
        );
        assert_eq!(
            ping_big(&lab, "c1", a2_ip),
            PINGS,
            "c1 -> a2 {a2_ip} ping -s {PING_SIZE}: the fragmented replies to c1's own \
             requests must pass"
        );
    }

    let after = settled(&lab, "c1");
    let moved: BTreeMap<&str, u64> = VERDICTS
        .iter()
        .map(|&v| (v, after[v] - before[v]))
        .collect();
    eprintln!("c1's verdict counters moved by {moved:?}");
    // Per IP version: the first allowed datagram (allowed) opens a UDP
    // flow, the others pass as established, all their fragments alike;
    // a1's first echo request is allowed, the next ones established; a2's
    // are default-denied; the replies to c1's pings are established. The
    // later fragments of dropped datagrams are unparsable.
    let per_version = [
        ("allowed", FRAGMENTS + FRAGMENTS),
        (
            "established",
            (DATAGRAMS - 1) * FRAGMENTS + (PINGS - 1) * FRAGMENTS + PINGS * FRAGMENTS,
        ),
        ("denied", DATAGRAMS),
        ("default_denied", PINGS),
        (
            "unparsable",
            DATAGRAMS * (FRAGMENTS - 1) + PINGS * (FRAGMENTS - 1),
        ),
    ];
    let want: BTreeMap<&str, u64> = per_version.iter().map(|&(v, n)| (v, 2 * n)).collect();
    assert_eq!(
        moved, want,
        "c1's verdict counters must count every fragment (IPv4 and IPv6)"
    );
}
