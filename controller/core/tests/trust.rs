//! The trust model in the core: a node's labels are the ones its join
//! token grants; an agent's workload prefixes are approved only inside its
//! token's allowed prefixes with granted labels, and otherwise wait for an
//! operator; no prefix, whoever asks, may be shorter than the minimum or
//! cover the controller or a member's endpoint, and what is published
//! leaves out an approved prefix that came to cover one.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use weft_controller_core::{
    Error, ErrorKind, Labels, NetworkSettings, Protected, Registration, State, TokenGrants,
    all_node_configs,
};
use weft_dataplane_core::Key;

const NOW: u64 = 1_795_834_800;
const HOUR: u64 = 3600;

fn net(s: &str) -> IpNet {
    s.parse().expect("valid prefix")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn workloads(items: &[(&str, &[(&str, &str)])]) -> BTreeMap<IpNet, Labels> {
    items.iter().map(|(p, l)| (net(p), labels(l))).collect()
}

fn json(s: &State) -> String {
    serde_json::to_string(s).expect("state serializes")
}

/// The controller at 198.18.0.1, nothing learnt.
fn controller() -> Protected {
    Protected {
        controller: [IpAddr::from([198, 18, 0, 1])].into(),
        ..Protected::default()
    }
}

/// Site "s" with pool 100.64.0.0/16 (workloads use the rest of the /10).
fn empty() -> State {
    let mut settings =
        NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"));
    settings.ipv4_pool = "100.64.0.0/16".parse().expect("valid pool");
    let mut s = State::new(settings).expect("valid settings");
    s.create_site("s", NOW).expect("site");
    s
}

/// Registers node `name` (key `k`, endpoint 198.18.1.k:51820) with a
/// fresh token granting `grants`, asking for `asked` labels.
fn enrol(
    s: &mut State,
    name: &str,
    k: u8,
    grants: TokenGrants,
    asked: Labels,
) -> Result<(), Error> {
    let token = format!("t-{name}");
    s.create_token_with_grants(&token, [k; 32], "s", NOW, HOUR, grants)
        .expect("token");
    s.register_node(
        Registration {
            node_id: format!("n-{name}"),
            token_id: token,
            secret_hash: [k; 32],
            name: name.to_owned(),
            public_key: Key([k; 32]),
            endpoint: Some(SocketAddr::from(([198, 18, 1, k], 51820))),
            cert_fingerprint: [k; 32],
            cert_expires_unix: NOW + 30 * 86_400,
            csr_key: [k; 32],
            labels: asked,
        },
        NOW,
    )
    .map(drop)
}

fn grants(l: &[(&str, &str)], allow: &[&str]) -> TokenGrants {
    TokenGrants {
        labels: labels(l),
        allow_prefixes: allow.iter().map(|p| net(p)).collect(),
    }
}

/// Asserts `op` fails with `expected` and leaves the state unchanged.
fn assert_refused(s: &mut State, expected: &str, op: impl FnOnce(&mut State) -> Result<(), Error>) {
    let before = json(s);
    let err = op(s).expect_err("operation should be refused");
    assert_eq!(err.to_string(), expected);
    assert_eq!(
        json(s),
        before,
        "a refused operation must not change the state"
    );
}

// ---- identity ----

#[test]
fn a_node_gets_the_labels_and_allowed_prefixes_its_token_grants() {
    let mut s = empty();
    let g = grants(&[("role", "db"), ("tier", "back")], &["100.100.0.0/16"]);
    enrol(&mut s, "a1", 1, g.clone(), Labels::new()).expect("no labels asked: all granted");
    let a1 = s.node("a1").expect("a1");
    assert_eq!(a1.labels, g.labels);
    assert_eq!(a1.allowed_prefixes, g.allow_prefixes);
    // Restating what the token grants (or part of it) is fine.
    enrol(&mut s, "a2", 2, g.clone(), labels(&[("role", "db")])).expect("restates its grant");
    assert_eq!(s.node("a2").expect("a2").labels, g.labels);
    s.validate().expect("consistent");
}

#[test]
fn a_label_the_token_does_not_grant_refuses_the_enrolment() {
    let mut s = empty();
    s.create_token_with_grants(
        "tok1",
        [1; 32],
        "s",
        NOW,
        HOUR,
        grants(&[("role", "db")], &[]),
    )
    .expect("token");
    s.create_token("tok2", [2; 32], "s", NOW, HOUR)
        .expect("token");
    let reg = |token: &str, k: u8, asked: Labels| Registration {
        node_id: format!("n-{k}"),
        token_id: token.to_owned(),
        secret_hash: [k; 32],
        name: format!("x{k}"),
        public_key: Key([k; 32]),
        endpoint: None,
        cert_fingerprint: [k; 32],
        cert_expires_unix: NOW + 30 * 86_400,
        csr_key: [k; 32],
        labels: asked,
    };
    assert_refused(
        &mut s,
        "label role=web is not granted by join token tok1 (it grants: role=db)",
        |s| {
            s.register_node(reg("tok1", 1, labels(&[("role", "web")])), NOW)
                .map(drop)
        },
    );
    // One granted label does not carry another.
    assert_refused(
        &mut s,
        "label zone=x is not granted by join token tok1 (it grants: role=db)",
        |s| {
            s.register_node(
                reg("tok1", 1, labels(&[("role", "db"), ("zone", "x")])),
                NOW,
            )
            .map(drop)
        },
    );
    assert_refused(
        &mut s,
        "label role=web is not granted by join token tok2 (it grants: none)",
        |s| {
            s.register_node(reg("tok2", 2, labels(&[("role", "web")])), NOW)
                .map(drop)
        },
    );
    let err = s
        .register_node(reg("tok2", 2, labels(&[("role", "web")])), NOW)
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    // The token was not used by the refused attempts.
    assert!(s.token("tok1").expect("tok1").used_by.is_none());
    s.register_node(reg("tok1", 1, Labels::new()), NOW)
        .expect("without asking, the grant applies");
    assert_eq!(s.node("x1").expect("x1").labels, labels(&[("role", "db")]));
}

#[test]
fn token_grants_are_checked_when_the_token_is_created() {
    let mut s = empty();
    for (g, expected) in [
        (
            grants(&[("-bad", "x")], &[]),
            "invalid label key \"-bad\": use up to 253 characters from A-Z, a-z, 0-9, '.', '_', '-', '/', starting and ending with a letter or digit",
        ),
        (
            grants(&[], &["100.100.2.1/24"]),
            "invalid workload prefix 100.100.2.1/24: host bits are set; did you mean 100.100.2.0/24?",
        ),
        (
            grants(&[], &["0.0.0.0/0"]),
            "invalid workload prefix 0.0.0.0/0: a default route cannot be advertised",
        ),
    ] {
        assert_refused(&mut s, expected, |s| {
            s.create_token_with_grants("t", [1; 32], "s", NOW, HOUR, g)
                .map(drop)
        });
    }
    let many = TokenGrants {
        allow_prefixes: (0..=256u32)
            .map(|i| {
                IpNet::from(ipnet::Ipv4Net::new_assert(
                    (0x6500_0000 + (i << 8)).into(),
                    24,
                ))
            })
            .collect(),
        ..TokenGrants::default()
    };
    assert_refused(
        &mut s,
        "257 allowed prefixes given; at most 256 are allowed",
        |s| {
            s.create_token_with_grants("t", [1; 32], "s", NOW, HOUR, many)
                .map(drop)
        },
    );
}

// ---- prefixes ----

#[test]
fn an_agent_cannot_relabel_its_node_or_an_approved_prefix() {
    let mut s = empty();
    enrol(
        &mut s,
        "b1",
        2,
        grants(&[("app", "pg")], &["100.100.0.0/16"]),
        Labels::new(),
    )
    .expect("enrols");
    s.advertise_prefixes(
        "b1",
        &workloads(&[("100.100.2.0/24", &[("app", "pg")])]),
        &controller(),
    )
    .expect("operator approves");
    let before = json(&s);
    // The agent asks for the same prefix with other labels: nothing moves.
    let changed = s
        .agent_advertise(
            "n-b1",
            &workloads(&[("100.100.2.0/24", &[("role", "web")])]),
            &controller(),
        )
        .expect("not an error");
    assert!(!changed);
    assert_eq!(json(&s), before, "the approved labels stay");
}

#[test]
fn an_agents_prefixes_wait_for_approval_outside_its_grants() {
    let mut s = empty();
    enrol(&mut s, "b1", 2, TokenGrants::default(), Labels::new()).expect("enrols");
    let rev = s.revision();
    let asked = workloads(&[("100.100.2.0/24", &[("app", "pg")])]);
    assert_eq!(s.agent_advertise("n-b1", &asked, &controller()), Ok(true));
    assert_eq!(s.revision(), rev + 1);
    let b1 = s.node("b1").expect("b1");
    assert!(b1.advertised.is_empty(), "nothing approved");
    let pending = &b1.pending[&net("100.100.2.0/24")];
    assert_eq!(pending.labels, labels(&[("app", "pg")]));
    assert_eq!(
        pending.reason,
        "not inside the prefixes node \"b1\"'s join token allows (none); approve it with `weftctl node advertise b1 100.100.2.0/24`"
    );
    // Pending prefixes are routed by nobody.
    for config in all_node_configs(&s).values() {
        assert!(config.routes.is_empty() && !config.forwarding);
    }
    // The same request again changes nothing.
    assert_eq!(s.agent_advertise("n-b1", &asked, &controller()), Ok(false));
    s.validate().expect("consistent");

    // The operator approves it, with the labels the operator chooses.
    s.advertise_prefixes(
        "b1",
        &workloads(&[("100.100.2.0/24", &[("app", "db")])]),
        &controller(),
    )
    .expect("approved");
    let b1 = s.node("b1").expect("b1");
    assert!(b1.pending.is_empty());
    assert_eq!(
        b1.advertised[&net("100.100.2.0/24")],
        labels(&[("app", "db")])
    );
    // The agent asking again does not relabel it.
    assert_eq!(s.agent_advertise("n-b1", &asked, &controller()), Ok(false));

    // A pending prefix is dropped by withdraw (until the agent asks again).
    s.agent_advertise(
        "n-b1",
        &workloads(&[("100.100.9.0/24", &[])]),
        &controller(),
    )
    .expect("pending");
    assert!(
        s.node("b1")
            .expect("b1")
            .pending
            .contains_key(&net("100.100.9.0/24"))
    );
    s.withdraw_prefix("b1", net("100.100.9.0/24"))
        .expect("withdrawn");
    let b1 = s.node("b1").expect("b1");
    assert!(b1.pending.is_empty());
    assert!(b1.advertised.contains_key(&net("100.100.2.0/24")));
}

#[test]
fn the_allowed_prefixes_approve_at_once_with_granted_labels_only() {
    let mut s = empty();
    enrol(
        &mut s,
        "b1",
        2,
        grants(&[("app", "pg")], &["100.100.0.0/16", "fd00:beef::/32"]),
        Labels::new(),
    )
    .expect("enrols");
    let asked = workloads(&[
        ("100.100.2.0/24", &[("app", "pg")]),
        ("fd00:beef:2::/64", &[]),
        ("100.100.3.0/24", &[("app", "web")]),
        ("100.101.0.0/24", &[]),
        ("100.100.2.128/25", &[]),
    ]);
    assert_eq!(s.agent_advertise("n-b1", &asked, &controller()), Ok(true));
    let b1 = s.node("b1").expect("b1");
    let approved: Vec<String> = b1.advertised.keys().map(ToString::to_string).collect();
    assert_eq!(
        approved,
        ["100.100.2.0/24", "fd00:beef:2::/64"],
        "{:?}",
        b1.pending
    );
    let reasons: BTreeMap<String, String> = b1
        .pending
        .iter()
        .map(|(p, w)| (p.to_string(), w.reason.clone()))
        .collect();
    assert_eq!(
        reasons["100.100.3.0/24"],
        "label app=web is not granted to node \"b1\" (it has: app=pg); approve it with `weftctl node advertise b1 100.100.3.0/24 --label KEY=VALUE`"
    );
    assert_eq!(
        reasons["100.101.0.0/24"],
        "not inside the prefixes node \"b1\"'s join token allows (100.100.0.0/16, fd00:beef::/32); approve it with `weftctl node advertise b1 100.101.0.0/24`"
    );
    assert_eq!(
        reasons["100.100.2.128/25"],
        "workload prefix 100.100.2.128/25 overlaps 100.100.2.0/24, already advertised by node \"b1\""
    );
    assert_eq!(reasons.len(), 3);
    // The next request replaces what is pending; approved prefixes stay.
    s.agent_advertise("n-b1", &BTreeMap::new(), &controller())
        .expect("ok");
    let b1 = s.node("b1").expect("b1");
    assert!(b1.pending.is_empty());
    assert_eq!(b1.advertised.len(), 2);
    s.validate().expect("consistent");
}

/// Nodes a1 (endpoint 198.18.1.1) and b1 (198.18.1.2, allowed
/// everything in 128.0.0.0/1 and 198.16.0.0/12), an external peer x1 at
/// 198.18.2.9, the controller at 198.18.0.1, a1 learnt at 198.18.3.7.
fn guarded_network() -> (State, Protected) {
    let mut s = empty();
    enrol(&mut s, "a1", 1, TokenGrants::default(), Labels::new()).expect("a1");
    enrol(
        &mut s,
        "b1",
        2,
        grants(&[], &["128.0.0.0/1", "198.16.0.0/12", "fd00::/8"]),
        Labels::new(),
    )
    .expect("b1");
    s.add_external_peer(
        "x1",
        "s",
        Key([9; 32]),
        Some(SocketAddr::from(([198, 18, 2, 9], 51820))),
        Labels::new(),
        NOW,
    )
    .expect("peer");
    let mut p = controller();
    p.learnt.insert(
        "n-a1".to_owned(),
        SocketAddr::from(([198, 18, 3, 7], 40000)),
    );
    (s, p)
}

const UNSAFE: [(&str, &str); 7] = [
    (
        "128.0.0.0/1",
        "prefix 128.0.0.0/1 is shorter than the minimum /8 for IPv4 workload prefixes (weft-controller --min-prefix-len-v4)",
    ),
    (
        "fd00::/31",
        "prefix fd00::/31 is shorter than the minimum /32 for IPv6 workload prefixes (weft-controller --min-prefix-len-v6)",
    ),
    (
        "198.18.0.1/32",
        "prefix 198.18.0.1/32 covers the controller address 198.18.0.1: routing it through the overlay would capture that traffic",
    ),
    (
        "198.18.0.0/16",
        "prefix 198.18.0.0/16 covers the controller address 198.18.0.1: routing it through the overlay would capture that traffic",
    ),
    (
        "198.18.1.0/30",
        "prefix 198.18.1.0/30 covers the endpoint 198.18.1.1 of node \"a1\": routing it through the overlay would capture that traffic",
    ),
    (
        "198.18.2.0/24",
        "prefix 198.18.2.0/24 covers the endpoint 198.18.2.9 of external peer \"x1\": routing it through the overlay would capture that traffic",
    ),
    (
        "198.18.3.7/32",
        "prefix 198.18.3.7/32 covers the endpoint 198.18.3.7 of node \"a1\" (learnt from its peers): routing it through the overlay would capture that traffic",
    ),
];

#[test]
fn an_operator_cannot_approve_a_prefix_that_is_too_short_or_covers_the_underlay() {
    let (mut s, p) = guarded_network();
    for (prefix, expected) in UNSAFE {
        assert_refused(&mut s, expected, |s| {
            s.advertise_prefixes("b1", &workloads(&[(prefix, &[])]), &p)
                .map(drop)
        });
        let err = s
            .advertise_prefixes("b1", &workloads(&[(prefix, &[])]), &p)
            .expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
    // A node's own endpoint is protected too: others would send its
    // WireGuard packets into the tunnel towards it.
    assert_refused(
        &mut s,
        "prefix 198.18.1.2/32 covers the endpoint 198.18.1.2 of node \"b1\": routing it through the overlay would capture that traffic",
        |s| {
            s.advertise_prefixes("b1", &workloads(&[("198.18.1.2/32", &[])]), &p)
                .map(drop)
        },
    );
    // All or nothing: a safe prefix with an unsafe one changes nothing.
    assert_refused(&mut s, UNSAFE[2].1, |s| {
        s.advertise_prefixes(
            "b1",
            &workloads(&[("100.100.2.0/24", &[]), ("198.18.0.1/32", &[])]),
            &p,
        )
        .map(drop)
    });
    // Next to them, a safe prefix is fine.
    s.advertise_prefixes("b1", &workloads(&[("198.18.4.0/24", &[])]), &p)
        .expect("covers nothing");
}

#[test]
fn an_agents_unsafe_prefixes_stay_pending_even_inside_its_allowed_prefixes() {
    let (mut s, p) = guarded_network();
    let asked: BTreeMap<IpNet, Labels> = UNSAFE
        .iter()
        .map(|(prefix, _)| (net(prefix), Labels::new()))
        .collect();
    assert_eq!(s.agent_advertise("n-b1", &asked, &p), Ok(true));
    let b1 = s.node("b1").expect("b1");
    assert!(b1.advertised.is_empty(), "{:?}", b1.advertised);
    for (prefix, expected) in UNSAFE {
        assert_eq!(b1.pending[&net(prefix)].reason, expected, "{prefix}");
    }
    for config in all_node_configs(&s).values() {
        assert!(config.routes.is_empty(), "pending prefixes are not routed");
    }
    s.validate().expect("consistent");
}

#[test]
fn the_minimum_prefix_lengths_are_settable_and_checked() {
    let (mut s, p) = guarded_network();
    assert_refused(
        &mut s,
        "invalid network settings: minimum IPv4 prefix length 33 must be between 1 and 32",
        |s| s.set_min_prefix_lens(33, 32).map(drop),
    );
    assert_refused(
        &mut s,
        "invalid network settings: minimum IPv6 prefix length 0 must be between 1 and 128",
        |s| s.set_min_prefix_lens(8, 0).map(drop),
    );
    let rev = s.revision();
    assert_eq!(s.set_min_prefix_lens(20, 48), Ok(true));
    assert_eq!(s.set_min_prefix_lens(20, 48), Ok(false));
    assert_eq!(s.revision(), rev + 1);
    assert_refused(
        &mut s,
        "prefix 100.96.0.0/16 is shorter than the minimum /20 for IPv4 workload prefixes (weft-controller --min-prefix-len-v4)",
        |s| {
            s.advertise_prefixes("b1", &workloads(&[("100.96.0.0/16", &[])]), &p)
                .map(drop)
        },
    );
    s.advertise_prefixes("b1", &workloads(&[("100.96.0.0/20", &[])]), &p)
        .expect("long enough");
    // Stored, and survives a round trip.
    let back: State = serde_json::from_str(&json(&s)).expect("loads");
    assert_eq!(back.settings().min_prefix_len_v4, 20);
    assert_eq!(back.settings().min_prefix_len_v6, 48);
    assert_eq!(back, s);
}

#[test]
fn an_approved_prefix_that_comes_to_cover_an_endpoint_is_not_published() {
    let (mut s, mut p) = guarded_network();
    s.advertise_prefixes(
        "b1",
        &workloads(&[("198.19.5.0/24", &[]), ("198.19.6.0/24", &[])]),
        &p,
    )
    .expect("safe when approved");
    assert!(s.withheld_prefixes(&p).is_empty());
    let routes = |s: &State, p: &Protected| -> Vec<String> {
        all_node_configs(&s.publishable(p))["n-a1"]
            .routes
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(routes(&s, &p), ["198.19.5.0/24", "198.19.6.0/24"]);
    // a1 moves into one of them; b1 is learnt inside the other.
    s.set_node_endpoint("n-a1", Some(SocketAddr::from(([198, 19, 5, 9], 51820))))
        .expect("moved");
    p.learnt.insert(
        "n-b1".to_owned(),
        SocketAddr::from(([198, 19, 6, 1], 51820)),
    );
    let withheld = s.withheld_prefixes(&p);
    assert_eq!(
        withheld["n-b1"][&net("198.19.5.0/24")],
        "prefix 198.19.5.0/24 covers the endpoint 198.19.5.9 of node \"a1\": routing it through the overlay would capture that traffic"
    );
    assert!(withheld["n-b1"].contains_key(&net("198.19.6.0/24")));
    assert!(routes(&s, &p).is_empty(), "neither is published");
    let b1_peer = all_node_configs(&s.publishable(&p))["n-a1"]
        .peers
        .values()
        .find(|x| x.name == "b1")
        .map(|x| x.allowed_ips.len());
    assert_eq!(b1_peer, Some(2), "b1's own /32 and /128 only");
    // The state itself keeps them (the operator sees why in `node get`).
    assert_eq!(s.node("b1").expect("b1").advertised.len(), 2);
    // A raised minimum withholds too.
    s.set_min_prefix_lens(25, 32).expect("valid");
    let p = controller();
    s.set_node_endpoint("n-a1", Some(SocketAddr::from(([198, 18, 1, 1], 51820))))
        .expect("moved back");
    assert!(
        s.withheld_prefixes(&p)["n-b1"][&net("198.19.6.0/24")]
            .contains("shorter than the minimum /25")
    );
}

#[test]
fn grants_and_pending_prefixes_survive_the_store_and_old_stores_load() {
    let (mut s, p) = guarded_network();
    s.agent_advertise(
        "n-b1",
        &workloads(&[("198.18.0.1/32", &[("app", "x")]), ("198.19.0.0/24", &[])]),
        &p,
    )
    .expect("ok");
    s.create_token_with_grants(
        "spare",
        [5; 32],
        "s",
        NOW,
        HOUR,
        grants(&[("k", "v")], &["100.100.0.0/16"]),
    )
    .expect("token");
    s.set_min_prefix_lens(10, 40).expect("valid");
    let text = json(&s);
    for field in [
        "allowed_prefixes",
        "pending",
        "allow_prefixes",
        "min_prefix_len_v4",
    ] {
        assert!(text.contains(field), "{field} is stored");
    }
    let back: State = serde_json::from_str(&text).expect("loads");
    back.validate().expect("valid");
    assert_eq!(back, s);
    let b1 = back.node("b1").expect("b1");
    assert_eq!(b1.pending.len(), 1, "{:?}", b1.pending);
    assert_eq!(b1.advertised.len(), 1);
    assert_eq!(
        back.token("spare").expect("token").labels,
        labels(&[("k", "v")])
    );

    // A store written before grants: no grants, nothing pending, the
    // default minimums, and written back without the new fields.
    let old = include_str!("fixtures/state-v0.json");
    let s: State = serde_json::from_str(old).expect("old state loads");
    s.validate().expect("valid");
    assert_eq!(s.settings().min_prefix_len_v4, 8);
    assert_eq!(s.settings().min_prefix_len_v6, 32);
    assert!(
        s.tokens()
            .all(|t| t.labels.is_empty() && t.allow_prefixes.is_empty())
    );
    assert!(
        s.nodes()
            .all(|n| n.allowed_prefixes.is_empty() && n.pending.is_empty())
    );
    for field in [
        "allowed_prefixes",
        "pending",
        "allow_prefixes",
        "min_prefix_len",
    ] {
        assert!(
            !json(&s).contains(field),
            "{field} is not written when empty"
        );
    }
}

#[test]
fn a_damaged_pending_prefix_is_an_inconsistency() {
    let (mut s, p) = guarded_network();
    s.advertise_prefixes("b1", &workloads(&[("198.19.0.0/24", &[])]), &p)
        .expect("approved");
    let mut v = serde_json::to_value(&s).expect("serializes");
    v["nodes"]["n-b1"]["pending"] = serde_json::json!({"198.19.0.0/24": {"reason": "x"}});
    let damaged: State = serde_json::from_value(v).expect("deserializes");
    let err = damaged.validate().expect_err("inconsistent");
    assert!(
        err.to_string().contains("both advertised and pending"),
        "{err}"
    );
}
