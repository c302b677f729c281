//! Node credentials over time: retried registrations must prove
//! possession of the first request's key, certificates expire and renew
//! (at most two accepted, the previous one until the new one is used),
//! WireGuard keys rotate.

use weft_controller_core::state::{CertRefused, CertUse, check_cert_ttl};
use weft_controller_core::{
    Error, ErrorKind, NetworkSettings, NodeCert, Registration, State, node_config,
};
use weft_dataplane_core::Key;

const NOW: u64 = 1_795_834_800; // 2026-11-28T03:00:00Z
const TTL: u64 = 100;

/// Site "a", token "tok" (secret hash [7; 32]) valid for 300 s, shorter
/// than the retry window, and nodes registered with it or others.
fn state() -> State {
    let settings =
        NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"));
    let mut s = State::new(settings).expect("valid settings");
    s.create_site("a", NOW).expect("site");
    s.create_token("tok", [7; 32], "a", NOW, 300)
        .expect("token");
    s
}

/// Node `name` with WireGuard key [key; 32], certificate [key; 32]
/// expiring at NOW + TTL, request signed by key [csr; 32].
fn reg(token: &str, name: &str, key: u8, csr: u8) -> Registration {
    Registration {
        node_id: format!("n-{name}"),
        token_id: token.to_owned(),
        secret_hash: [7; 32],
        name: name.to_owned(),
        public_key: Key([key; 32]),
        endpoint: Some("198.18.0.1:51820".parse().expect("valid addr")),
        cert_fingerprint: [key; 32],
        cert_expires_unix: NOW + TTL,
        csr_key: [csr; 32],
        labels: Default::default(),
    }
}

fn json(s: &State) -> String {
    serde_json::to_string(s).expect("state serializes")
}

fn cert(fp: u8, expires_unix: u64) -> NodeCert {
    NodeCert {
        fingerprint: [fp; 32],
        expires_unix,
    }
}

/// How certificate [fp; 32] authenticates at `now`: "current", "first
/// use", "previous" with the node's id, or the refusal.
fn auth(s: &State, fp: u8, now: u64) -> Result<(&'static str, String), CertRefused> {
    s.authenticate(&[fp; 32], now).map(|u| {
        let how = match u {
            CertUse::Current(_) => "current",
            CertUse::FirstUse(_) => "first use",
            CertUse::Previous(_) => "previous",
        };
        (how, u.node().id.clone())
    })
}

#[test]
fn a_replayed_token_with_the_public_name_and_key_but_another_request_key_is_refused() {
    let mut s = state();
    s.register_node(reg("tok", "a1", 1, 1), NOW)
        .expect("first use");
    // Name and WireGuard key are public; the request's key is not.
    let mut replay = reg("tok", "a1", 1, 2);
    replay.cert_fingerprint = [9; 32];
    assert_eq!(
        s.retried_registration("tok", &[7; 32], "a1", &Key([1; 32]), &[2; 32], NOW + 5),
        None
    );
    let before = json(&s);
    let e = s.register_node(replay, NOW + 5).expect_err("replay");
    assert_eq!(
        e.to_string(),
        "join token tok was already used by node n-a1"
    );
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert_eq!(json(&s), before, "nothing changed");
    assert_eq!(auth(&s, 9, NOW + 5), Err(CertRefused::Unknown));
}

#[test]
fn a_retry_respects_the_token_expiry() {
    let mut s = state();
    s.register_node(reg("tok", "a1", 1, 1), NOW)
        .expect("first use");
    let retry = |fp: u8| Registration {
        cert_fingerprint: [fp; 32],
        cert_expires_unix: NOW + 1000,
        ..reg("tok", "a1", 1, 1)
    };
    // The token expires at NOW + 300, inside the 600 s retry window.
    assert_eq!(
        s.retried_registration("tok", &[7; 32], "a1", &Key([1; 32]), &[1; 32], NOW + 300),
        None
    );
    let before = json(&s);
    let e = s.register_node(retry(8), NOW + 300).expect_err("expired");
    assert_eq!(
        e.to_string(),
        "join token tok was already used by node n-a1"
    );
    assert_eq!(json(&s), before, "nothing changed");
    // One second earlier the same agent gets its node back.
    let node = s.register_node(retry(9), NOW + 299).expect("retry").clone();
    assert_eq!(node.id, "n-a1");
    assert_eq!(auth(&s, 9, NOW + 299), Ok(("current", "n-a1".to_owned())));
    assert_eq!(auth(&s, 1, NOW + 299), Err(CertRefused::Unknown));
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn certificates_expire_and_renew_keeping_the_previous_one_until_the_new_one_is_used() {
    let mut s = state();
    s.register_node(reg("tok", "a1", 1, 1), NOW)
        .expect("registers");
    assert_eq!(auth(&s, 1, NOW), Ok(("current", "n-a1".to_owned())));
    assert_eq!(
        auth(&s, 1, NOW + TTL),
        Err(CertRefused::Expired {
            node: "n-a1".to_owned(),
            expires_unix: NOW + TTL
        })
    );
    assert_eq!(
        auth(&s, 1, NOW + TTL).expect_err("expired").to_string(),
        "the certificate of node n-a1 expired at 2026-11-28T03:01:40Z; enrol the node again with a new join token"
    );

    // Renewed at two thirds of its lifetime.
    let at = NOW + 70;
    s.renew_cert(&[1; 32], cert(2, at + TTL), at)
        .expect("renews");
    assert_eq!(auth(&s, 2, at), Ok(("first use", "n-a1".to_owned())));
    assert_eq!(auth(&s, 1, at), Ok(("previous", "n-a1".to_owned())));
    // The previous one still expires when it did.
    assert!(matches!(
        auth(&s, 1, NOW + TTL),
        Err(CertRefused::Expired { .. })
    ));
    assert_eq!(s.validate(), Ok(()));

    // The reply was lost: the agent renews again with the old certificate;
    // the never-used one is dropped, the old one stays previous.
    s.renew_cert(&[1; 32], cert(3, at + 1 + TTL), at + 1)
        .expect("renews again");
    assert_eq!(auth(&s, 2, at + 1), Err(CertRefused::Unknown));
    assert_eq!(auth(&s, 1, at + 1), Ok(("previous", "n-a1".to_owned())));

    // First use of the new one: the previous one is refused at once.
    let rev = s.revision();
    assert_eq!(s.confirm_cert("n-a1", &[3; 32]), Ok(true));
    assert_eq!(s.revision(), rev + 1);
    assert_eq!(s.confirm_cert("n-a1", &[3; 32]), Ok(false), "only once");
    assert_eq!(s.revision(), rev + 1);
    assert_eq!(auth(&s, 1, at + 2), Err(CertRefused::Unknown));
    assert_eq!(auth(&s, 3, at + 2), Ok(("current", "n-a1".to_owned())));
    let before = json(&s);
    let e = s
        .renew_cert(&[1; 32], cert(4, at + 2 + TTL), at + 2)
        .expect_err("the old certificate renews nothing");
    assert_eq!(e, Error::CertNotAccepted(CertRefused::Unknown));
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert_eq!(json(&s), before);

    // An expired certificate renews nothing either.
    let e = s
        .renew_cert(&[3; 32], cert(4, NOW + 1000), at + 1 + TTL)
        .expect_err("expired");
    assert!(
        matches!(e, Error::CertNotAccepted(CertRefused::Expired { .. })),
        "{e}"
    );
    assert_eq!(json(&s), before);

    // A certificate bound to another node is refused.
    s.create_token("tok2", [7; 32], "a", NOW, 300)
        .expect("token");
    s.register_node(reg("tok2", "b1", 5, 5), NOW).expect("b1");
    let before = json(&s);
    let e = s
        .renew_cert(&[3; 32], cert(5, NOW + 1000), at + 3)
        .expect_err("b1's certificate");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(json(&s), before);

    // Round trip through the store's JSON with a previous certificate.
    s.renew_cert(&[3; 32], cert(6, NOW + 1000), at + 3)
        .expect("renews");
    let back: State = serde_json::from_str(&json(&s)).expect("loads");
    assert_eq!(back, s);
    assert_eq!(back.validate(), Ok(()));

    // A deleted node's certificates are refused at once.
    s.delete_node("a1").expect("deleted");
    assert_eq!(auth(&s, 6, at + 3), Err(CertRefused::Unknown));
    assert_eq!(auth(&s, 3, at + 3), Err(CertRefused::Unknown));
}

#[test]
fn a_store_from_before_expiry_loads_and_its_certificates_stay_valid() {
    let mut s = state();
    let mut r = reg("tok", "a1", 1, 1);
    r.cert_expires_unix = 0;
    s.register_node(r, NOW).expect("registers");
    let text = json(&s)
        .replace(",\"registration_key\":\"0101010101010101010101010101010101010101010101010101010101010101\"", "");
    assert!(
        !text.contains("registration_key") && !text.contains("cert_expires_unix"),
        "{text}"
    );
    let old: State = serde_json::from_str(&text).expect("loads");
    assert_eq!(old.validate(), Ok(()));
    assert_eq!(
        auth(&old, 1, u64::MAX - 1),
        Ok(("current", "n-a1".to_owned()))
    );
    // Without the first request's key recorded, nothing is a retry.
    assert_eq!(
        old.retried_registration("tok", &[7; 32], "a1", &Key([1; 32]), &[1; 32], NOW + 1),
        None
    );
}

#[test]
fn two_nodes_sharing_a_previous_certificate_is_an_inconsistency() {
    let mut s = state();
    s.register_node(reg("tok", "a1", 1, 1), NOW).expect("a1");
    s.create_token("tok2", [7; 32], "a", NOW, 300)
        .expect("token");
    s.register_node(reg("tok2", "b1", 2, 2), NOW).expect("b1");
    s.renew_cert(&[2; 32], cert(3, NOW + TTL), NOW)
        .expect("renews");
    // b1's previous certificate is [2; 32]; give a1 the same as current.
    let text = json(&s).replacen(
        "0101010101010101010101010101010101010101010101010101010101010101",
        "0202020202020202020202020202020202020202020202020202020202020202",
        1,
    );
    let bad: State = serde_json::from_str(&text).expect("parses");
    let e = bad.validate().expect_err("inconsistent");
    assert!(e.to_string().contains("is bound to both"), "{e}");
}

#[test]
fn key_rotation_is_requested_by_generation_and_replaces_the_key_for_every_peer() {
    let mut s = state();
    s.register_node(reg("tok", "a1", 1, 1), NOW).expect("a1");
    s.create_token("tok2", [7; 32], "a", NOW, 300)
        .expect("token");
    s.register_node(reg("tok2", "b1", 2, 2), NOW).expect("b1");
    let generation = |s: &State| node_config(s, "n-a1").expect("a1").key_generation;
    assert_eq!(generation(&s), 0);
    assert_eq!(s.request_key_rotation("a1"), Ok(1));
    assert_eq!(
        generation(&s),
        1,
        "the agent's config asks for generation 1"
    );
    assert_eq!(
        s.request_key_rotation("nope"),
        Err(Error::NodeNotFound("nope".to_owned()))
    );

    // Refused, changing nothing: the zero key, another member's key, a
    // generation running ahead.
    let before = json(&s);
    assert_eq!(
        s.rotate_node_key("n-a1", Key([0; 32]), 1),
        Err(Error::ZeroKey)
    );
    let e = s
        .rotate_node_key("n-a1", Key([2; 32]), 1)
        .expect_err("b1's key");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let e = s
        .rotate_node_key("n-a1", Key([7; 32]), 3)
        .expect_err("ahead");
    assert_eq!(
        e.to_string(),
        "node \"a1\" rotated its WireGuard key to generation 3, but at most 2 may come next"
    );
    assert_eq!(json(&s), before);

    let rev = s.revision();
    assert_eq!(s.rotate_node_key("n-a1", Key([7; 32]), 1), Ok(true));
    assert_eq!(s.revision(), rev + 1);
    let b1 = node_config(&s, "n-b1").expect("b1");
    assert!(b1.peers.contains_key(&Key([7; 32])), "b1 has a1's new key");
    assert!(!b1.peers.contains_key(&Key([1; 32])), "and not the old one");
    assert_eq!(b1.peers[&Key([7; 32])].name, "a1");
    // A resumed rotation (lost reply) changes nothing.
    assert_eq!(s.rotate_node_key("n-a1", Key([7; 32]), 1), Ok(false));
    assert_eq!(s.revision(), rev + 1);
    // The agent rotates by itself: the next generation.
    assert_eq!(s.rotate_node_key("n-a1", Key([8; 32]), 2), Ok(true));
    assert_eq!(generation(&s), 2);
    // An older generation (a pending key from before a request) still
    // replaces the key but does not lower the generation.
    assert_eq!(s.rotate_node_key("n-a1", Key([9; 32]), 1), Ok(true));
    assert_eq!(generation(&s), 2);
    assert_eq!(s.node("a1").map(|n| n.public_key), Some(Key([9; 32])));
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn certificate_lifetimes_are_checked() {
    assert!(check_cert_ttl(30).is_ok());
    assert!(check_cert_ttl(30 * 86_400).is_ok());
    assert!(check_cert_ttl(365 * 86_400).is_ok());
    for bad in [0, 29, 365 * 86_400 + 1] {
        let e = check_cert_ttl(bad).expect_err("out of range");
        assert!(e.contains("out of range"), "{e}");
    }
}
