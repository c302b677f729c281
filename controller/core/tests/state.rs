//! Unit tests of `State` mutations and their errors.

use weft_controller_core::topology::{ResidencyRule, TopologyConfig, TopologyMode};
use weft_controller_core::{Error, ErrorKind, NetworkSettings, Protected, Registration, State};
use weft_dataplane_core::Key;

const NOW: u64 = 1_795_834_800; // 2026-11-28T03:00:00Z
const HOUR: u64 = 3600;

fn settings() -> NetworkSettings {
    NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"))
}

/// A state with site "eu-west" and token "abc123" (secret hash [7; 32]).
fn state() -> State {
    let mut s = State::new(settings()).expect("default settings are valid");
    s.create_site("eu-west", NOW).expect("site can be created");
    s.create_token("abc123", [7; 32], "eu-west", NOW, HOUR)
        .expect("token can be created");
    s
}

fn reg(node_id: &str, name: &str, key: u8) -> Registration {
    Registration {
        node_id: node_id.to_owned(),
        token_id: "abc123".to_owned(),
        secret_hash: [7; 32],
        name: name.to_owned(),
        public_key: Key([key; 32]),
        endpoint: Some("198.18.0.1:51820".parse().expect("valid addr")),
        cert_fingerprint: [key; 32],
        cert_expires_unix: 0,
        csr_key: [key; 32],
        labels: Default::default(),
    }
}

fn json(s: &State) -> String {
    serde_json::to_string(s).expect("state serializes")
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

#[test]
fn register_allocates_addresses_and_uses_the_token() {
    let mut s = state();
    let rev = s.revision();
    let node = s
        .register_node(reg("n-1f2e", "a1", 1), NOW)
        .expect("registers");
    assert_eq!(node.ipv4.to_string(), "100.64.0.1");
    assert_eq!(node.ipv6.to_string(), "fd7e:4a1:1234::1");
    assert_eq!(node.site, "eu-west");
    assert_eq!(s.revision(), rev + 1);
    assert_eq!(
        s.token("abc123").and_then(|t| t.used_by.as_deref()),
        Some("n-1f2e")
    );
    assert_eq!(
        s.node("a1").map(|n| n.id.as_str()),
        Some("n-1f2e"),
        "lookup by name"
    );
    assert_eq!(
        s.node_by_cert(&[1; 32]).map(|n| n.name.as_str()),
        Some("a1")
    );
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn unknown_token_is_refused() {
    let mut s = state();
    assert_refused(
        &mut s,
        "join token nope is unknown or its secret does not match",
        |s| {
            let mut r = reg("n-1", "a1", 1);
            r.token_id = "nope".to_owned();
            s.register_node(r, NOW).map(drop)
        },
    );
}

#[test]
fn wrong_secret_reads_like_unknown_token() {
    let mut s = state();
    let mut r = reg("n-1", "a1", 1);
    r.secret_hash = [8; 32];
    let err = s.register_node(r, NOW).expect_err("wrong secret");
    assert_eq!(err, Error::TokenInvalid("abc123".to_owned()));
    assert_eq!(
        err.to_string(),
        "join token abc123 is unknown or its secret does not match"
    );
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
}

#[test]
fn used_token_is_refused_naming_the_node() {
    let mut s = state();
    s.register_node(reg("n-1f2e", "a1", 1), NOW)
        .expect("first use");
    assert_refused(
        &mut s,
        "join token abc123 was already used by node n-1f2e",
        |s| s.register_node(reg("n-2", "a2", 2), NOW).map(drop),
    );
}

#[test]
fn a_retry_after_a_lost_reply_gets_the_same_node_with_the_new_certificate() {
    let mut s = state();
    let first = s
        .register_node(reg("n-1f2e", "a1", 1), NOW)
        .expect("first use")
        .clone();
    // The same agent (name, key, request signed by the same key) retries
    // within the window.
    assert_eq!(
        s.retried_registration("abc123", &[7; 32], "a1", &Key([1; 32]), &[1; 32], NOW + 5),
        Some("n-1f2e")
    );
    let mut again = reg("n-1f2e", "a1", 1);
    again.cert_fingerprint = [9; 32];
    let node = s.register_node(again, NOW + 5).expect("retry").clone();
    assert_eq!((node.ipv4, node.ipv6), (first.ipv4, first.ipv6));
    assert!(
        s.node_by_cert(&[1; 32]).is_none(),
        "the lost certificate is dropped"
    );
    assert_eq!(
        s.node_by_cert(&[9; 32]).map(|n| n.id.as_str()),
        Some("n-1f2e")
    );
    assert_eq!(s.nodes().count(), 1);
    assert_eq!(s.validate(), Ok(()));
    // Not a retry: another key, another name, a wrong secret, another
    // request key, or too late.
    let retried = |s: &State, secret: [u8; 32], name: &str, key: u8, csr: u8, at: u64| {
        s.retried_registration("abc123", &secret, name, &Key([key; 32]), &[csr; 32], at)
            .map(str::to_owned)
    };
    assert_eq!(retried(&s, [7; 32], "a1", 2, 1, NOW + 5), None);
    assert_eq!(retried(&s, [7; 32], "a2", 1, 1, NOW + 5), None);
    assert_eq!(retried(&s, [8; 32], "a1", 1, 1, NOW + 5), None);
    assert_eq!(retried(&s, [7; 32], "a1", 1, 2, NOW + 5), None);
    assert_eq!(retried(&s, [7; 32], "a1", 1, 1, NOW + 601), None);
    assert_refused(
        &mut s,
        "join token abc123 was already used by node n-1f2e",
        |s| s.register_node(reg("n-1f2e", "a1", 1), NOW + 601).map(drop),
    );
}

#[test]
fn expired_tokens_are_pruned_after_a_week_unless_they_name_a_live_node() {
    let mut s = state();
    s.create_token("unused", [7; 32], "eu-west", NOW, HOUR)
        .expect("token");
    s.register_node(reg("n-1", "a1", 1), NOW)
        .expect("uses abc123");
    let week = 7 * 86_400;
    let rev = s.revision();
    assert!(
        s.prune_tokens(NOW + HOUR + week - 1).is_empty(),
        "kept a week"
    );
    assert_eq!(s.revision(), rev);
    assert_eq!(s.prune_tokens(NOW + HOUR + week), vec!["unused".to_owned()]);
    assert_eq!(s.revision(), rev + 1);
    assert!(s.token("abc123").is_some(), "a1 still lives");
    s.delete_node("a1").expect("deletes");
    assert_eq!(s.prune_tokens(NOW + HOUR + week), vec!["abc123".to_owned()]);
    assert_eq!(s.tokens().count(), 0);
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn expired_token_is_refused_with_the_time() {
    let mut s = state();
    assert_refused(
        &mut s,
        "join token abc123 expired at 2026-11-28T04:00:00Z",
        |s| s.register_node(reg("n-1", "a1", 1), NOW + HOUR).map(drop),
    );
    assert!(
        s.register_node(reg("n-1", "a1", 1), NOW + HOUR - 1).is_ok(),
        "last valid second"
    );
}

#[test]
fn token_creation_checks_site_ttl_and_duplicates() {
    let mut s = state();
    assert_refused(&mut s, "site \"nowhere\" not found", |s| {
        s.create_token("t2", [1; 32], "nowhere", NOW, HOUR)
            .map(drop)
    });
    for ttl in [0, 30 * 86_400 + 1] {
        let msg = format!(
            "join token lifetime must be between 1 second and 30 days (2592000 s), got {ttl} s"
        );
        assert_refused(&mut s, &msg, |s| {
            s.create_token("t2", [1; 32], "eu-west", NOW, ttl).map(drop)
        });
    }
    assert_refused(&mut s, "join token abc123 already exists", |s| {
        s.create_token("abc123", [1; 32], "eu-west", NOW, HOUR)
            .map(drop)
    });
    assert_refused(&mut s, "join token t9 not found", |s| s.delete_token("t9"));
    s.delete_token("abc123").expect("token deleted");
    assert_eq!(s.tokens().count(), 0);
}

#[test]
fn names_and_keys_must_be_unique_across_nodes_and_peers() {
    let mut s = state();
    s.create_token("t2", [9; 32], "eu-west", NOW, HOUR)
        .expect("token");
    s.register_node(reg("n-1f2e", "a1", 1), NOW)
        .expect("registers");
    let mut r2 = reg("n-2", "a1", 2);
    r2.token_id = "t2".to_owned();
    r2.secret_hash = [9; 32];
    assert_refused(
        &mut s,
        "node name \"a1\" is already taken by node n-1f2e",
        |s| s.register_node(r2.clone(), NOW).map(drop),
    );
    assert_refused(
        &mut s,
        "invalid node name \"A1\": use 1 to 63 characters from a-z, 0-9 and '-', not starting or ending with '-'",
        |s| {
            s.register_node(
                Registration {
                    name: "A1".to_owned(),
                    ..r2.clone()
                },
                NOW,
            )
            .map(drop)
        },
    );
    assert_refused(
        &mut s,
        "node id n-1f2e is already taken by node n-1f2e",
        |s| {
            s.register_node(
                Registration {
                    node_id: "n-1f2e".to_owned(),
                    name: "b".to_owned(),
                    ..r2.clone()
                },
                NOW,
            )
            .map(drop)
        },
    );
    let key1 = Key([1; 32]);
    assert_refused(
        &mut s,
        &format!("public key {key1} is already used by node n-1f2e"),
        |s| {
            s.register_node(
                Registration {
                    name: "b".to_owned(),
                    public_key: key1,
                    ..r2.clone()
                },
                NOW,
            )
            .map(drop)
        },
    );
    assert_refused(
        &mut s,
        &format!(
            "client certificate {} is already bound to node n-1f2e",
            "01".repeat(32)
        ),
        |s| {
            s.register_node(
                Registration {
                    name: "b".to_owned(),
                    cert_fingerprint: [1; 32],
                    ..r2.clone()
                },
                NOW,
            )
            .map(drop)
        },
    );
    assert_refused(
        &mut s,
        "external peer name \"a1\" is already taken by node n-1f2e",
        |s| {
            s.add_external_peer("a1", "eu-west", Key([5; 32]), None, Default::default(), NOW)
                .map(drop)
        },
    );
    assert_refused(
        &mut s,
        &format!("public key {key1} is already used by node n-1f2e"),
        |s| {
            s.add_external_peer("laptop", "eu-west", key1, None, Default::default(), NOW)
                .map(drop)
        },
    );
    assert_refused(&mut s, "public key must not be all zeros", |s| {
        s.add_external_peer(
            "laptop",
            "eu-west",
            Key([0; 32]),
            None,
            Default::default(),
            NOW,
        )
        .map(drop)
    });
    s.add_external_peer(
        "laptop",
        "eu-west",
        Key([5; 32]),
        None,
        Default::default(),
        NOW,
    )
    .expect("peer added");
    assert_refused(
        &mut s,
        "node name \"laptop\" is already taken by external peer \"laptop\"",
        |s| {
            s.register_node(
                Registration {
                    name: "laptop".to_owned(),
                    ..r2.clone()
                },
                NOW,
            )
            .map(drop)
        },
    );
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn site_deletion_is_refused_while_in_use_and_drops_its_tokens() {
    let mut s = state();
    s.register_node(reg("n-1", "a1", 1), NOW)
        .expect("registers");
    s.add_external_peer(
        "laptop",
        "eu-west",
        Key([5; 32]),
        None,
        Default::default(),
        NOW,
    )
    .expect("peer added");
    assert_refused(
        &mut s,
        "site \"eu-west\" still has 1 node(s) and 1 external peer(s); delete them first",
        |s| s.delete_site("eu-west"),
    );
    s.create_token("t2", [1; 32], "eu-west", NOW, HOUR)
        .expect("token");
    s.delete_node("a1").expect("deleted by name");
    s.delete_external_peer("laptop").expect("peer deleted");
    s.delete_site("eu-west").expect("empty site deleted");
    assert_eq!(s.tokens().count(), 0, "the site's tokens go with it");
    assert_eq!(s.validate(), Ok(()));
    assert_refused(&mut s, "site \"eu-west\" not found", |s| {
        s.delete_site("eu-west")
    });
    assert_refused(
        &mut s,
        "invalid site name \"EU\": use 1 to 63 characters from a-z, 0-9 and '-', not starting or ending with '-'",
        |s| s.create_site("EU", NOW).map(drop),
    );
}

#[test]
fn endpoint_changes_bump_the_revision_only_when_different() {
    let mut s = state();
    s.register_node(reg("n-1", "a1", 1), NOW)
        .expect("registers");
    let rev = s.revision();
    let same = Some("198.18.0.1:51820".parse().expect("valid addr"));
    assert_eq!(s.set_node_endpoint("n-1", same), Ok(false));
    assert_eq!(s.revision(), rev);
    assert_eq!(s.set_node_endpoint("n-1", None), Ok(true));
    assert_eq!(s.revision(), rev + 1);
    assert_eq!(
        s.set_node_endpoint("n-9", None),
        Err(Error::NodeNotFound("n-9".to_owned()))
    );
}

#[test]
fn deleted_addresses_are_reused_lowest_first() {
    let mut s = state();
    for i in 1..=3u8 {
        let id = format!("t{i}");
        s.create_token(&id, [i; 32], "eu-west", NOW, HOUR)
            .expect("token");
        let r = Registration {
            token_id: id,
            secret_hash: [i; 32],
            ..reg(&format!("n-{i}"), &format!("a{i}"), i)
        };
        s.register_node(r, NOW).expect("registers");
    }
    s.delete_node("n-2").expect("deleted");
    let peer = s
        .add_external_peer(
            "laptop",
            "eu-west",
            Key([9; 32]),
            None,
            Default::default(),
            NOW,
        )
        .expect("added");
    assert_eq!(peer.ipv4.to_string(), "100.64.0.2");
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn pool_exhaustion_is_a_clear_error() {
    let mut settings = settings();
    settings.ipv4_pool = "100.64.0.0/30".parse().expect("valid pool");
    let mut s = State::new(settings).expect("valid settings");
    s.create_site("edge", NOW).expect("site");
    s.add_external_peer("p1", "edge", Key([1; 32]), None, Default::default(), NOW)
        .expect("room for 2");
    s.add_external_peer("p2", "edge", Key([2; 32]), None, Default::default(), NOW)
        .expect("room for 2");
    assert_refused(
        &mut s,
        "address pool 100.64.0.0/30 is exhausted (2 addresses in use)",
        |s| {
            s.add_external_peer("p3", "edge", Key([3; 32]), None, Default::default(), NOW)
                .map(drop)
        },
    );
    let err = s
        .add_external_peer("p3", "edge", Key([3; 32]), None, Default::default(), NOW)
        .expect_err("full");
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
}

#[test]
fn bad_settings_are_refused() {
    let mut settings = settings();
    settings.ipv6_prefix = "fd00::/96".parse().expect("valid prefix");
    let err = State::new(settings).expect_err("a /96 cannot hold a /64");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn validate_names_what_is_inconsistent() {
    let mut s = state();
    s.register_node(reg("n-1", "a1", 1), NOW)
        .expect("registers");
    let mut v: serde_json::Value = serde_json::from_str(&json(&s)).expect("json");
    v["nodes"]["n-1"]["ipv4"] = "100.64.0.9".into();
    let broken: State = serde_json::from_value(v).expect("still well-formed");
    let err = broken.validate().expect_err("address does not match IPAM");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.to_string().contains("100.64.0.9"), "{err}");

    let mut v: serde_json::Value = serde_json::from_str(&json(&s)).expect("json");
    v["tokens"]["abc123"]["site"] = "gone".into();
    let broken: State = serde_json::from_value(v).expect("still well-formed");
    assert_eq!(
        broken.validate().map_err(|e| e.to_string()),
        Err(
            "state is inconsistent: join token abc123 is for site \"gone\", which does not exist"
                .to_owned()
        )
    );
}

#[test]
fn state_round_trips_through_json() {
    let mut s = state();
    s.register_node(reg("n-1", "a1", 1), NOW)
        .expect("registers");
    s.add_external_peer(
        "laptop",
        "eu-west",
        Key([5; 32]),
        None,
        Default::default(),
        NOW,
    )
    .expect("added");
    let text = json(&s);
    assert!(
        text.contains(&"01".repeat(32)),
        "fingerprint is hex: {text}"
    );
    let back: State = serde_json::from_str(&text).expect("deserializes");
    assert_eq!(back, s);
    assert_eq!(back.validate(), Ok(()));
}

// ---- labels and policies ----

const WEB_POLICY: &str = r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  target: {matchLabels: {app: web}}
  ingress:
    - from: {matchLabels: {app: lb}}
      ports: [{protocol: TCP, port: 443}]
---
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  target: {matchLabels: {app: db}}
"#;

fn web_policies() -> Vec<weft_controller_core::policy::Policy> {
    weft_controller_core::policy::parse_documents("p.yaml", WEB_POLICY).expect("valid policies")
}

#[test]
fn labels_are_validated_at_registration_and_set_and_removed_later() {
    let mut s = state();
    let grants = weft_controller_core::TokenGrants {
        labels: [("app".to_owned(), "web".to_owned())].into(),
        ..Default::default()
    };
    s.create_token_with_grants("granting", [7; 32], "eu-west", NOW, HOUR, grants)
        .expect("token with labels");
    let mut r = reg("n-1", "a1", 1);
    r.token_id = "granting".to_owned();
    r.labels = [("app".to_owned(), "bad value".to_owned())].into();
    assert_refused(
        &mut s,
        "label app=bad value is not granted by join token granting (it grants: app=web)",
        |s| s.register_node(r, NOW).map(drop),
    );
    let mut r = reg("n-1", "a1", 1);
    r.token_id = "granting".to_owned();
    r.labels = [("app".to_owned(), "web".to_owned())].into();
    s.register_node(r, NOW).expect("registers with labels");
    assert_eq!(s.node("a1").expect("node").labels["app"], "web");

    let rev = s.revision();
    let set = [("tier".to_owned(), "front".to_owned())].into();
    let labels = s
        .set_node_labels("a1", &set, &["app".to_owned()])
        .expect("labels change");
    assert_eq!(labels, set);
    assert_eq!(s.revision(), rev + 1);
    // The same change again changes nothing and bumps nothing.
    s.set_node_labels("n-1", &set, &["app".to_owned()])
        .expect("idempotent");
    assert_eq!(s.revision(), rev + 1);

    assert_refused(
        &mut s,
        "label \"tier\" is both set and removed; do one or the other",
        |s| {
            s.set_node_labels("a1", &set, &["tier".to_owned()])
                .map(drop)
        },
    );
    assert_refused(&mut s, "node \"zz\" not found", |s| {
        s.set_node_labels("zz", &set, &[]).map(drop)
    });
    let bad = [("-x".to_owned(), "v".to_owned())].into();
    assert_refused(
        &mut s,
        "invalid label key \"-x\": use up to 253 characters from A-Z, a-z, 0-9, '.', '_', '-', '/', starting and ending with a letter or digit",
        |s| s.set_node_labels("a1", &bad, &[]).map(drop),
    );
    s.validate().expect("still consistent");
}

#[test]
fn external_peers_carry_labels_and_are_endpoints() {
    let mut s = state();
    s.register_node(reg("n-1", "a1", 1), NOW)
        .expect("registers");
    let labels: weft_controller_core::Labels = [("role".to_owned(), "laptop".to_owned())].into();
    s.add_external_peer("x1", "eu-west", Key([9; 32]), None, labels.clone(), NOW)
        .expect("peer with labels");
    let eps = s.endpoints();
    let names: Vec<&str> = eps.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a1", "x1"]);
    assert_eq!(eps[0].node.as_deref(), Some("n-1"));
    assert_eq!(eps[1].node, None);
    assert_eq!(eps[1].labels, labels);
    assert_eq!(
        eps[1]
            .prefixes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["100.64.0.2/32", "fd7e:4a1:1234::2/128"]
    );
    assert_eq!(s.endpoint("n-1").map(|e| e.name), Some("a1".to_owned()));
}

#[test]
fn policies_apply_all_or_nothing_with_one_revision_and_delete() {
    let mut s = state();
    let rev = s.revision();
    let changes = s.apply_policies(web_policies()).expect("applies");
    assert_eq!(changes.created, ["db", "web"]);
    assert_eq!(s.revision(), rev + 1, "one revision for the whole apply");
    // Re-applying the same is a no-op.
    let changes = s.apply_policies(web_policies()).expect("applies");
    assert_eq!(changes.unchanged, ["db", "web"]);
    assert_eq!(s.revision(), rev + 1);

    // A batch with one bad policy changes nothing.
    let mut batch = web_policies();
    batch[1].ingress.clear(); // `db` unchanged, `web` changed ...
    let mut broken = batch[0].clone();
    broken.name = "Not A Label".to_owned(); // ... and one invalid.
    batch.push(broken);
    let before = json(&s);
    let err = s.apply_policies(batch).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("\"Not A Label\""), "{err}");
    assert_eq!(json(&s), before, "a refused apply must change nothing");

    let mut twice = web_policies();
    twice.push(twice[0].clone());
    let err = s.apply_policies(twice).expect_err("duplicate refused");
    assert!(err.to_string().contains("given more than once"), "{err}");

    s.delete_policy("web").expect("deletes");
    assert_eq!(s.revision(), rev + 2);
    assert!(s.policy("web").is_none() && s.policy("db").is_some());
    assert_refused(&mut s, "policy \"web\" not found", |s| {
        s.delete_policy("web").map(drop)
    });

    // Policies and labels survive serialization and validation.
    let back: State = serde_json::from_str(&json(&s)).expect("state deserializes");
    back.validate().expect("valid");
    assert_eq!(back, s);
}

#[test]
fn a_store_written_before_labels_and_policies_still_loads() {
    let text = include_str!("fixtures/state-v0.json");
    let s: State = serde_json::from_str(text).expect("old state loads");
    s.validate().expect("old state is valid");
    assert!(s.node("a1").expect("node a1").labels.is_empty());
    assert!(s.external_peer("laptop").expect("peer").labels.is_empty());
    assert_eq!(s.policies().count(), 0);
    assert!(s.node("a1").expect("node a1").advertised.is_empty());
    // Nothing new is written for it either: an old controller can read it back.
    let again: serde_json::Value = serde_json::to_value(&s).expect("serializes");
    let old: serde_json::Value = serde_json::from_str(text).expect("json");
    assert_eq!(again, old);
}

#[test]
fn a_damaged_stored_policy_is_an_inconsistency() {
    let mut s = state();
    s.apply_policies(web_policies()).expect("applies");
    let mut v = serde_json::to_value(&s).expect("serializes");
    v["policies"]["web"]["target"]["match_labels"]["app"] = "not valid!".into();
    let damaged: State = serde_json::from_value(v).expect("still deserializes");
    let err = damaged.validate().expect_err("invalid policy found");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.to_string().contains("policy \"web\""), "{err}");
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().expect("valid prefix")
}

fn workload(
    prefix: &str,
    labels: &[(&str, &str)],
) -> std::collections::BTreeMap<ipnet::IpNet, weft_controller_core::Labels> {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    [(net(prefix), labels)].into_iter().collect()
}

/// A state with nodes a1 and b1 registered (two tokens), in an IPv4
/// pool of 100.64.0.0/16 so that workloads can use the rest of the /10.
fn two_nodes() -> State {
    let mut settings = settings();
    settings.ipv4_pool = "100.64.0.0/16".parse().expect("valid pool");
    let mut s = State::new(settings).expect("valid settings");
    s.create_site("eu-west", NOW).expect("site can be created");
    s.create_token("abc123", [7; 32], "eu-west", NOW, HOUR)
        .expect("token can be created");
    s.register_node(reg("n-a1", "a1", 1), NOW)
        .expect("registers");
    s.create_token("def456", [7; 32], "eu-west", NOW, HOUR)
        .expect("token can be created");
    let mut r = reg("n-b1", "b1", 2);
    r.token_id = "def456".to_owned();
    s.register_node(r, NOW).expect("registers");
    s
}

#[test]
fn workload_prefixes_are_advertised_relabelled_and_withdrawn() {
    let mut s = two_nodes();
    let rev = s.revision();
    assert_eq!(
        s.advertise_prefixes(
            "b1",
            &workload("100.100.2.0/24", &[("app", "pg")]),
            &Protected::default()
        ),
        Ok(true)
    );
    assert_eq!(s.revision(), rev + 1);
    assert_eq!(
        s.advertise_prefixes(
            "b1",
            &workload("100.100.2.0/24", &[("app", "pg")]),
            &Protected::default()
        ),
        Ok(false),
        "the same advertisement again changes nothing"
    );
    assert_eq!(s.revision(), rev + 1);
    assert_eq!(
        s.advertise_prefixes(
            "n-b1",
            &workload("100.100.2.0/24", &[("app", "db")]),
            &Protected::default()
        ),
        Ok(true),
        "relabelled"
    );
    s.advertise_prefixes(
        "b1",
        &workload("fd00:beef:2::/64", &[]),
        &Protected::default(),
    )
    .expect("IPv6 workload");
    let b1 = s.node("b1").expect("b1");
    assert_eq!(b1.advertised.len(), 2);
    assert_eq!(
        b1.advertised[&net("100.100.2.0/24")]
            .get("app")
            .map(String::as_str),
        Some("db")
    );
    s.validate().expect("valid");
    let back: State = serde_json::from_str(&json(&s)).expect("round trips");
    assert_eq!(back, s);

    // Each workload is a policy endpoint of its own, hosted by b1, with
    // only its own labels.
    let endpoints = s.endpoints();
    let w = endpoints
        .iter()
        .find(|e| e.name == "b1/100.100.2.0/24")
        .expect("workload endpoint");
    assert_eq!(w.node.as_deref(), Some("n-b1"));
    assert_eq!(w.prefixes, vec![net("100.100.2.0/24")]);
    assert_eq!(w.labels.len(), 1);
    assert!(s.endpoint("b1/fd00:beef:2::/64").is_some());

    s.withdraw_prefix("b1", net("100.100.2.0/24"))
        .expect("withdrawn");
    assert_refused(
        &mut s,
        "node \"b1\" does not advertise 100.100.2.0/24",
        |s| s.withdraw_prefix("b1", net("100.100.2.0/24")),
    );
    assert_eq!(s.node("b1").expect("b1").advertised.len(), 1);
}

#[test]
fn overlapping_or_unroutable_prefixes_are_refused_and_change_nothing() {
    let mut s = two_nodes();
    s.advertise_prefixes(
        "b1",
        &workload("100.100.2.0/24", &[("app", "pg")]),
        &Protected::default(),
    )
    .expect("advertised");
    s.advertise_prefixes(
        "b1",
        &workload("fd00:beef:2::/64", &[]),
        &Protected::default(),
    )
    .expect("advertised");
    let cases = [
        (
            "100.100.2.128/25",
            "workload prefix 100.100.2.128/25 overlaps 100.100.2.0/24, already advertised by node \"b1\"",
        ),
        (
            "100.100.0.0/16",
            "workload prefix 100.100.0.0/16 overlaps 100.100.2.0/24, already advertised by node \"b1\"",
        ),
        (
            "fd00:beef::/32",
            "workload prefix fd00:beef::/32 overlaps fd00:beef:2::/64, already advertised by node \"b1\"",
        ),
        (
            "100.64.1.0/24",
            "workload prefix 100.64.1.0/24 overlaps the network's overlay pool 100.64.0.0/16; advertise prefixes outside it",
        ),
        (
            "fd7e:4a1:1234:77::/64",
            "workload prefix fd7e:4a1:1234:77::/64 overlaps the network's overlay pool fd7e:4a1:1234::/48; advertise prefixes outside it",
        ),
        (
            "0.0.0.0/0",
            "invalid workload prefix 0.0.0.0/0: a default route cannot be advertised",
        ),
        (
            "::/0",
            "invalid workload prefix ::/0: a default route cannot be advertised",
        ),
        (
            "100.100.9.1/24",
            "invalid workload prefix 100.100.9.1/24: host bits are set; did you mean 100.100.9.0/24?",
        ),
        (
            "127.0.0.0/8",
            "invalid workload prefix 127.0.0.0/8: loopback, link-local, multicast and unspecified addresses cannot be routed",
        ),
    ];
    for (prefix, expected) in cases {
        assert_refused(&mut s, expected, |s| {
            s.advertise_prefixes("a1", &workload(prefix, &[]), &Protected::default())
                .map(|_| ())
        });
    }
    // All or nothing: one bad prefix refuses the whole request.
    let mut both = workload("100.100.5.0/24", &[]);
    both.extend(workload("100.100.2.0/26", &[]));
    assert_refused(
        &mut s,
        "workload prefix 100.100.2.0/26 overlaps 100.100.2.0/24, already advertised by node \"b1\"",
        |s| {
            s.advertise_prefixes("a1", &both, &Protected::default())
                .map(|_| ())
        },
    );
    // Two overlapping prefixes in one request.
    let mut nested = workload("100.100.6.0/24", &[]);
    nested.extend(workload("100.100.6.0/25", &[]));
    assert_refused(
        &mut s,
        "workload prefix 100.100.6.0/25 overlaps 100.100.6.0/24, already advertised by node \"a1\"",
        |s| {
            s.advertise_prefixes("a1", &nested, &Protected::default())
                .map(|_| ())
        },
    );
    assert_refused(
        &mut s,
        "invalid label key \"-x\": use up to 253 characters from A-Z, a-z, 0-9, '.', '_', '-', '/', starting and ending with a letter or digit",
        |s| {
            s.advertise_prefixes(
                "a1",
                &workload("100.100.7.0/24", &[("-x", "1")]),
                &Protected::default(),
            )
            .map(|_| ())
        },
    );
    assert_refused(&mut s, "node \"z9\" not found", |s| {
        s.advertise_prefixes(
            "z9",
            &workload("100.100.7.0/24", &[]),
            &Protected::default(),
        )
        .map(|_| ())
    });
    // Deleting the node frees its prefixes.
    s.delete_node("b1").expect("deleted");
    s.advertise_prefixes(
        "a1",
        &workload("100.100.2.0/25", &[]),
        &Protected::default(),
    )
    .expect("free again");
}

#[test]
fn overlapping_stored_prefixes_are_an_inconsistency() {
    let mut s = two_nodes();
    s.advertise_prefixes(
        "a1",
        &workload("100.100.2.0/24", &[]),
        &Protected::default(),
    )
    .expect("advertised");
    let mut v = serde_json::to_value(&s).expect("serializes");
    v["nodes"]["n-b1"]["advertised"] = serde_json::json!({"100.100.2.64/26": {}});
    let damaged: State = serde_json::from_value(v).expect("still deserializes");
    let err = damaged.validate().expect_err("overlap found");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(
        err.to_string()
            .contains("100.100.2.0/24 and 100.100.2.64/26 overlap"),
        "{err}"
    );
}

#[test]
fn peers_route_workload_prefixes_and_policy_selects_workloads_by_their_labels() {
    use weft_dataplane_core::policy_maps::Verdict;
    let mut s = two_nodes();
    let web = [("role".to_owned(), "web".to_owned())].into();
    s.set_node_labels("a1", &web, &[]).expect("labels");
    // b1's own labels must not leak onto its workload.
    let db = [("app".to_owned(), "node-label".to_owned())].into();
    s.set_node_labels("b1", &db, &[]).expect("labels");
    let mut ads = workload("100.100.2.0/24", &[("app", "pg")]);
    ads.extend(workload("fd00:beef:2::/64", &[("app", "pg")]));
    s.advertise_prefixes("b1", &ads, &Protected::default())
        .expect("advertised");
    let policy = weft_controller_core::policy::parse_documents(
        "pg.yaml",
        r#"
apiVersion: weft.dev/v1
kind: NetworkPolicy
metadata: {name: pg}
spec:
  target: {matchLabels: {app: pg}}
  ingress:
    - from: {matchLabels: {role: web}}
      ports: [{protocol: TCP, port: 5432}]
"#,
    )
    .expect("valid policy");
    s.apply_policies(policy).expect("applied");

    let a1 = weft_controller_core::node_config(&s, "n-a1").expect("a1 config");
    let b1 = weft_controller_core::node_config(&s, "n-b1").expect("b1 config");
    assert_eq!(
        a1.routes,
        vec![net("100.100.2.0/24"), net("fd00:beef:2::/64")]
    );
    assert!(!a1.forwarding);
    assert!(b1.routes.is_empty(), "a node's own prefixes are behind it");
    assert!(b1.forwarding);
    let to_b1 = a1
        .peers
        .values()
        .find(|p| p.name == "b1")
        .expect("b1 is a1's peer");
    assert_eq!(to_b1.allowed_ips.len(), 4, "{:?}", to_b1.allowed_ips);
    assert!(to_b1.allowed_ips.contains(&net("100.100.2.0/24")));
    assert!(to_b1.allowed_ips.contains(&net("fd00:beef:2::/64")));

    // The workload is governed on b1 (which hosts it), not on a1; b1 node
    // itself (app=node-label) is not governed.
    let id_of = |cfg: &weft_dataplane_core::NodeConfig, p: &str| {
        cfg.policy
            .ipcache
            .iter()
            .find(|(prefix, _)| *prefix == net(p))
            .map(|(_, id)| *id)
            .expect("prefix in the ipcache")
    };
    let pg = id_of(&b1, "100.100.2.0/24");
    assert_eq!(
        id_of(&b1, "fd00:beef:2::/64"),
        pg,
        "same labels, same identity"
    );
    assert_eq!(b1.policy.governed, [pg].into_iter().collect());
    assert!(a1.policy.governed.is_empty());
    let web_id = a1
        .policy
        .ipcache
        .iter()
        .find(|(p, _)| p.addr() == std::net::IpAddr::V4(s.node("a1").expect("a1").ipv4))
        .map(|(_, id)| *id)
        .expect("a1 in the ipcache");
    let allowed: Vec<_> = b1
        .policy
        .tuples
        .iter()
        .filter(|t| t.verdict == Verdict::Allow)
        .map(|t| (t.src, t.dst, t.first, t.last))
        .collect();
    assert_eq!(allowed, vec![(web_id, pg, 5432, 5432)]);
}

/// A file of 10,000 rules in short form fits the 1 MiB limit; its stored,
/// canonical YAML is longer, and must not be held to the file limit.
#[test]
fn a_policy_of_ten_thousand_rules_is_stored_whatever_its_canonical_size() {
    use std::fmt::Write as _;
    let mut text = String::from(
        "apiVersion: weft.dev/v1\nkind: NetworkPolicy\nmetadata: {name: big}\nspec:\n  target: {matchLabels: {role: db}}\n  ingress:\n",
    );
    for i in 0..10_000u32 {
        let _ = writeln!(
            text,
            "    - ports: [{{protocol: TCP, port: {}}}]",
            10_000 + i
        );
    }
    assert!(text.len() < weft_controller_core::policy::MAX_INPUT_BYTES);
    let policies = weft_controller_core::policy::parse_documents("big.yaml", &text)
        .expect("a file under the limit parses");
    let canonical = weft_controller_core::policy::to_yaml(&policies[0]);
    assert!(
        canonical.len() > text.len(),
        "the canonical form is longer ({} vs {} bytes)",
        canonical.len(),
        text.len()
    );
    let mut s = state();
    let changes = s.apply_policies(policies).expect("stored");
    assert_eq!(changes.created, ["big"]);
}

fn topology(mode: TopologyMode, gateways: &[&str]) -> TopologyConfig {
    TopologyConfig {
        mode,
        gateways: gateways.iter().map(|g| (*g).to_owned()).collect(),
        ..TopologyConfig::default()
    }
}

#[test]
fn topology_gateways_are_stored_by_id_and_follow_node_deletion() {
    let mut s = state();
    s.register_node(reg("n-1", "a1", 1), NOW)
        .expect("registers");
    let mut cfg = topology(TopologyMode::Gateways, &["a1"]);
    cfg.site_tags
        .insert("eu-west".to_owned(), ["eu".to_owned()].into());
    cfg.residency = vec![ResidencyRule { tag: "eu".into() }];
    let rev = s.revision();
    assert_eq!(s.set_topology(cfg.clone()), Ok(true));
    assert_eq!(s.revision(), rev + 1);
    assert!(s.topology().gateways.contains("n-1"), "{:?}", s.topology());
    // The same settings again change nothing (by name or by id).
    assert_eq!(s.set_topology(cfg), Ok(false));
    assert_eq!(
        s.set_topology(TopologyConfig {
            gateways: ["n-1".to_owned()].into(),
            ..s.topology().clone()
        }),
        Ok(false)
    );
    assert_eq!(s.revision(), rev + 1);
    // Survives a store round trip and validates.
    let back: State = serde_json::from_str(&json(&s)).expect("loads");
    assert_eq!(back, s);
    assert_eq!(back.validate(), Ok(()));
    s.delete_node("a1").expect("deletes");
    assert!(s.topology().gateways.is_empty());
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn bad_topology_is_refused_naming_what_is_wrong() {
    let mut s = state();
    assert_refused(
        &mut s,
        "invalid topology: gateway \"nope\": no node has this name or id",
        |s| {
            s.set_topology(topology(TopologyMode::Gateways, &["nope"]))
                .map(|_| ())
        },
    );
    let mut cfg = topology(TopologyMode::Gateways, &[]);
    cfg.site_tags
        .insert("mars".to_owned(), ["eu".to_owned()].into());
    assert_refused(
        &mut s,
        "invalid topology: tags for site \"mars\": no such site",
        |s| s.set_topology(cfg).map(|_| ()),
    );
    let mut cfg = topology(TopologyMode::Gateways, &[]);
    cfg.site_tags
        .insert("eu-west".to_owned(), ["EU!".to_owned()].into());
    assert_refused(
        &mut s,
        "invalid site tag name \"EU!\": use 1 to 63 characters from a-z, 0-9 and '-', not starting or ending with '-'",
        |s| s.set_topology(cfg).map(|_| ()),
    );
    let mut cfg = topology(TopologyMode::Gateways, &[]);
    cfg.residency = vec![ResidencyRule { tag: String::new() }];
    let err = s.set_topology(cfg).expect_err("empty tag");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn a_state_stored_before_topology_modes_loads_as_full_mesh() {
    let s = state();
    let stored = json(&s);
    assert!(!stored.contains("topology"), "defaults are not written");
    let back: State = serde_json::from_str(&stored).expect("loads");
    assert_eq!(back.topology(), &TopologyConfig::default());
}
