//! Tests of path computation and the fabric: examples, then properties.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use weft_dataplane_core::Key;

use super::*;

// ---- helpers ----

fn sites(specs: &[(&str, &[&str])]) -> Vec<SiteSpec> {
    specs
        .iter()
        .map(|(name, tags)| SiteSpec {
            name: (*name).to_owned(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        })
        .collect()
}

fn eu_rule() -> Vec<ResidencyRule> {
    vec![ResidencyRule { tag: "eu".into() }]
}

fn paths(
    specs: &[SiteSpec],
    rules: &[ResidencyRule],
    m: &Measurements,
    prev: Option<&PathTable>,
) -> PathTable {
    let params = PathParams::default();
    let graph = SiteGraph::new(specs, rules, m, |_| true, &params);
    compute_paths(TopologyMode::Gateways, graph, &params, prev)
}

fn key(i: u32) -> Key {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k[31] = 1;
    Key(k)
}

fn member(i: u32, site: &str, gateway: bool) -> MemberSpec {
    MemberSpec {
        id: Member::Node(format!("n{i}")),
        name: format!("{site}-{i}"),
        site: site.to_owned(),
        public_key: key(i),
        endpoint: Some(([198, 18, 0, i as u8], 51820).into()),
        prefixes: vec![
            format!("100.64.{}.{}/32", i / 256, i % 256)
                .parse()
                .expect("valid"),
            format!("fd00::{i:x}/128").parse().expect("valid"),
        ],
        gateway,
    }
}

fn external(i: u32, site: &str) -> MemberSpec {
    MemberSpec {
        id: Member::ExternalPeer(format!("x{i}")),
        gateway: false,
        ..member(i, site, false)
    }
}

fn input(mode: TopologyMode, specs: Vec<SiteSpec>, members: Vec<MemberSpec>) -> TopologyInput {
    TopologyInput {
        mode,
        sites: specs,
        residency: eu_rule(),
        members,
        params: PathParams::default(),
        persistent_keepalive: Some(25),
    }
}

fn addr(spec: &MemberSpec) -> IpAddr {
    match spec.prefixes[0] {
        IpNet::V4(n) => IpAddr::V4(n.addr()),
        IpNet::V6(n) => IpAddr::V6(n.addr()),
    }
}

/// Walks a packet from `src` to `dst` through the materialised configs:
/// each hop routes by longest prefix and the receiver checks the source.
/// Returns the members crossed, or why it was dropped. Where a hop may
/// spread flows (a shared route), the packet takes the routed peer.
fn walk(
    configs: &BTreeMap<Member, MemberConfig>,
    specs: &BTreeMap<Member, MemberSpec>,
    src: &Member,
    dst: &Member,
) -> Result<Vec<Member>, String> {
    walk_flow(configs, specs, src, dst, 0)
}

/// [`walk`] for one flow: where a hop spreads flows over a peer and its
/// fallbacks, the flow takes option `flow % options`.
fn walk_flow(
    configs: &BTreeMap<Member, MemberConfig>,
    specs: &BTreeMap<Member, MemberSpec>,
    src: &Member,
    dst: &Member,
    flow: usize,
) -> Result<Vec<Member>, String> {
    let by_key: BTreeMap<Key, &Member> = specs.iter().map(|(m, s)| (s.public_key, m)).collect();
    let (from, to) = (addr(&specs[src]), addr(&specs[dst]));
    let mut hops = vec![src.clone()];
    let mut cur = src.clone();
    while cur != *dst {
        let cfg = &configs[&cur];
        if cur != *src && !cfg.forwarding {
            return Err(format!("{cur} would have to forward but does not"));
        }
        let Some(peer) = cfg.route(to) else {
            return Err(format!("{cur} has no route to {to}"));
        };
        let mut next_key = peer.public_key;
        if peer.shared.iter().any(|r| r.contains(&to)) {
            let options: Vec<Key> = std::iter::once(peer.public_key)
                .chain(
                    peer.fallback
                        .iter()
                        .copied()
                        .filter(|k| cfg.peers.contains_key(k)),
                )
                .collect();
            next_key = options[flow % options.len()];
        }
        let next = by_key[&next_key].clone();
        // The receiver's view of the sender.
        let back = configs[&next]
            .peers
            .get(&specs[&cur].public_key)
            .ok_or_else(|| format!("{next} does not peer with {cur}"))?;
        let accepted = back
            .routes
            .iter()
            .chain(&back.shared)
            .chain(&back.accept_sources)
            .any(|p| p.contains(&from));
        if !accepted {
            return Err(format!("{next} refuses source {from} from {cur}"));
        }
        if hops.contains(&next) {
            return Err(format!("loop at {next}: {hops:?}"));
        }
        hops.push(next.clone());
        cur = next;
    }
    Ok(hops)
}

fn all_configs(fabric: &Fabric) -> BTreeMap<Member, MemberConfig> {
    fabric
        .members()
        .map(|m| (m.clone(), fabric.config(m).expect("member has a config")))
        .collect()
}

// ---- site paths ----

#[test]
fn sites_go_direct_until_the_link_breaks_then_relay_and_come_back() {
    let s = sites(&[("a", &[]), ("b", &[]), ("c", &[])]);
    let mut m = Measurements::default();
    for (x, y) in [("a", "b"), ("a", "c"), ("b", "c")] {
        m.set_link(x, y, Link::up(20_000));
    }
    let t1 = paths(&s, &[], &m, None);
    assert_eq!(t1.path("a", "b"), Some(vec!["a", "b"]));
    assert!(matches!(
        t1.trace("a", "b").route,
        SiteRoute::Direct { up: true, .. }
    ));

    m.set_link("a", "b", Link::down());
    let t2 = paths(&s, &[], &m, Some(&t1));
    assert_eq!(t2.path("a", "b"), Some(vec!["a", "c", "b"]));
    assert_eq!(t2.path("b", "a"), Some(vec!["b", "c", "a"]));
    let trace = t2.trace("a", "b");
    assert_eq!(
        trace.route,
        SiteRoute::Relayed {
            via: vec!["c".into()],
            reason: RelayReason::DirectDown
        }
    );
    assert_eq!(
        trace.to_string(),
        "a -> c -> b: relayed via c: the direct link is down"
    );

    m.set_link("a", "b", Link::up(20_000));
    let t3 = paths(&s, &[], &m, Some(&t2));
    assert_eq!(
        t3.path("a", "b"),
        Some(vec!["a", "b"]),
        "moves back when it recovers"
    );
}

#[test]
fn hysteresis_keeps_a_path_unless_the_new_one_is_clearly_better() {
    let s = sites(&[("a", &[]), ("b", &[]), ("c", &[])]);
    let mut m = Measurements::default();
    m.set_link("a", "b", Link::up(40_000));
    m.set_link("a", "c", Link::up(25_000));
    m.set_link("b", "c", Link::up(25_000));
    let t1 = paths(&s, &[], &m, None);
    assert_eq!(t1.path("a", "b"), Some(vec!["a", "b"]));

    // Relay 50 ms + 2 × 5 is cheaper than direct 65 + 5, but by 14 %, not
    // 20 %.
    m.set_link("a", "b", Link::up(65_000));
    let t2 = paths(&s, &[], &m, Some(&t1));
    assert_eq!(t2.path("a", "b"), Some(vec!["a", "b"]), "kept");
    assert!(t2.kept_by_hysteresis("a", "b"));
    let fresh = paths(&s, &[], &m, None);
    assert_eq!(
        fresh.path("a", "b"),
        Some(vec!["a", "c", "b"]),
        "without history the relay wins"
    );

    // Direct 90 + 5 vs 60: better by 37 % and 35 ms: switch.
    m.set_link("a", "b", Link::up(90_000));
    let t3 = paths(&s, &[], &m, Some(&t2));
    assert_eq!(t3.path("a", "b"), Some(vec!["a", "c", "b"]));
    let trace = t3.trace("a", "b");
    assert_eq!(
        trace.route,
        SiteRoute::Relayed {
            via: vec!["c".into()],
            reason: RelayReason::DirectSlower {
                direct_cost_us: 95_000,
                path_cost_us: 60_000
            }
        },
        "{trace}"
    );

    // Direct back to 52 + 5 vs 60: cheaper but not by the margin: stays.
    m.set_link("a", "b", Link::up(52_000));
    let t4 = paths(&s, &[], &m, Some(&t3));
    assert_eq!(t4.path("a", "b"), Some(vec!["a", "c", "b"]));
    assert!(matches!(
        t4.trace("a", "b").route,
        SiteRoute::Relayed {
            reason: RelayReason::KeptByHysteresis { .. },
            ..
        }
    ));
    // A lossy direct link counts as down.
    m.set_link(
        "a",
        "b",
        Link {
            latency_us: 1_000,
            loss_ppm: 500_000,
            up: true,
        },
    );
    let t5 = paths(&s, &[], &m, Some(&t4));
    assert!(matches!(
        t5.trace("a", "b").route,
        SiteRoute::Relayed {
            reason: RelayReason::DirectLossy { loss_ppm: 500_000 },
            ..
        }
    ));
    // Direct 20 + 5 vs 60: clearly better: back to direct.
    m.set_link("a", "b", Link::up(20_000));
    let t6 = paths(&s, &[], &m, Some(&t5));
    assert_eq!(t6.path("a", "b"), Some(vec!["a", "b"]));
}

#[test]
fn residency_fails_closed_and_says_why() {
    let s = sites(&[("a", &["eu"]), ("b", &["eu"]), ("c", &[]), ("d", &["eu"])]);
    let mut m = Measurements::default();
    m.set_link("a", "b", Link::down());
    m.set_link("a", "d", Link::down());
    let t = paths(&s, &eu_rule(), &m, None);
    assert_eq!(t.path("a", "b"), None, "eu traffic must not relay via c");
    let trace = t.trace("a", "b");
    assert_eq!(
        trace.route,
        SiteRoute::NoRoute(NoRoute::NoCompliantPath {
            tags: vec!["eu".into()],
            forbidden: vec!["c".into()]
        })
    );
    assert!(
        trace.to_string().contains("no route, traffic is dropped"),
        "{trace}"
    );
    // Unconstrained pairs still relay: c reaches b.
    assert_eq!(t.path("c", "b"), Some(vec!["c", "b"]));

    // An eu relay appears: a -> d is up again, d relays.
    m.set_link("a", "d", Link::up(10_000));
    let t = paths(&s, &eu_rule(), &m, Some(&t));
    assert_eq!(t.path("a", "b"), Some(vec!["a", "d", "b"]));
}

#[test]
fn a_site_without_a_gateway_is_unreachable_across_sites() {
    let params = PathParams::default();
    let s = sites(&[("a", &[]), ("b", &[])]);
    let graph = SiteGraph::new(&s, &[], &Measurements::default(), |s| s == "a", &params);
    let t = compute_paths(TopologyMode::Gateways, graph, &params, None);
    assert_eq!(
        t.trace("a", "b").route,
        SiteRoute::NoRoute(NoRoute::NoGateway { site: "b".into() })
    );
    assert_eq!(t.trace("a", "a").route, SiteRoute::Local);
    assert!(matches!(
        t.trace("a", "z").route,
        SiteRoute::NoRoute(NoRoute::UnknownSite(_))
    ));
}

// ---- fabric ----

fn three_sites() -> Vec<MemberSpec> {
    vec![
        member(1, "a", true),
        member(2, "a", true),
        member(3, "a", false),
        member(4, "a", false),
        member(5, "b", true),
        member(6, "b", false),
        member(7, "c", true),
        member(8, "c", false),
        external(9, "a"),
    ]
}

#[test]
fn full_mesh_fabric_matches_the_netmap() {
    use crate::model::{NetworkSettings, Registration};
    let settings = NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("net"));
    let mut state = crate::State::new(settings).expect("state");
    for s in ["a", "b"] {
        state.create_site(s, 0).expect("site");
    }
    for i in 0..6u32 {
        let site = if i < 3 { "a" } else { "b" };
        let k = key(i).0;
        state
            .create_token(&format!("t{i}"), k, site, 0, 60)
            .expect("token");
        state
            .register_node(
                Registration {
                    node_id: format!("n{i}"),
                    token_id: format!("t{i}"),
                    secret_hash: k,
                    name: format!("node-{i}"),
                    public_key: Key(k),
                    endpoint: Some(([198, 18, 1, i as u8], 51820).into()),
                    cert_fingerprint: k,
                    cert_expires_unix: 0,
                    csr_key: k,
                    labels: Default::default(),
                },
                1,
            )
            .expect("registers");
    }
    let input = TopologyInput::from_state(&state, &TopologyConfig::default());
    let fabric = Fabric::build(&input, &Measurements::default(), None);
    let old = crate::netmap::all_node_configs(&state);
    for (id, cfg) in &old {
        let new = fabric.config(&Member::Node(id.clone())).expect("config");
        assert_eq!(new.peer_configs(), cfg.peers, "node {id}");
        assert!(!new.forwarding);
    }
}

#[test]
fn gateway_mode_routes_across_sites_through_gateways() {
    let members = three_sites();
    let specs: BTreeMap<Member, MemberSpec> =
        members.iter().map(|m| (m.id.clone(), m.clone())).collect();
    let fabric = Fabric::build(
        &input(
            TopologyMode::Gateways,
            sites(&[("a", &[]), ("b", &[]), ("c", &[])]),
            members,
        ),
        &Measurements::default(),
        None,
    );
    let configs = all_configs(&fabric);
    let n = |i: u32| Member::Node(format!("n{i}"));
    // A plain member peers with its site only.
    let c3 = &configs[&n(3)];
    assert_eq!(c3.peers.len(), 4, "{c3:#?}");
    assert!(!c3.forwarding);
    // Intra-site traffic is direct; cross-site goes gateway to gateway.
    assert_eq!(walk(&configs, &specs, &n(3), &n(4)), Ok(vec![n(3), n(4)]));
    let hops = walk(&configs, &specs, &n(3), &n(6)).expect("delivered");
    assert_eq!(
        hops.len(),
        4,
        "member, gateway of a, gateway of b, member: {hops:?}"
    );
    assert_eq!(hops[2], n(5));
    let x = Member::ExternalPeer("x9".into());
    assert!(walk(&configs, &specs, &x, &n(8)).is_ok());
    assert!(walk(&configs, &specs, &n(8), &x).is_ok());
    let trace = fabric.trace(&n(3), &n(6)).expect("members exist");
    assert!(trace.delivered);
    assert_eq!(trace.hops.len(), 4);

    // Both gateways of a carry a share of the remote destinations, shared
    // with the other gateway (flows spread over both); their own
    // addresses are theirs alone.
    let peer = |g: &Member| &c3.peers[&specs[g].public_key];
    let shares: Vec<usize> = [n(1), n(2)].iter().map(|g| peer(g).shared.len()).collect();
    // b's and c's four members, /32 and /128 each.
    assert_eq!(shares.iter().sum::<usize>(), 4 * 2, "{shares:?}");
    assert!(shares.iter().all(|s| *s > 0), "{shares:?}");
    for (g, other) in [(n(1), n(2)), (n(2), n(1))] {
        assert_eq!(peer(&g).routes.len(), 2, "only its own addresses");
        assert_eq!(peer(&g).fallback, vec![specs[&other].public_key]);
    }
    // Every flow, whichever gateway it takes, is delivered.
    for flow in 0..4 {
        let hops = walk_flow(&configs, &specs, &n(3), &n(6), flow).expect("delivered");
        assert_eq!(hops.len(), 4, "{hops:?}");
        assert!(hops[1] == n(1) || hops[1] == n(2), "{hops:?}");
    }
}

#[test]
fn losing_a_gateway_moves_its_share_and_keeps_the_site_reachable() {
    let members = three_sites();
    let specs: BTreeMap<Member, MemberSpec> =
        members.iter().map(|m| (m.id.clone(), m.clone())).collect();
    let input = input(
        TopologyMode::Gateways,
        sites(&[("a", &[]), ("b", &[]), ("c", &[])]),
        members,
    );
    let mut fabric = Fabric::build(&input, &Measurements::default(), None);
    let n = |i: u32| Member::Node(format!("n{i}"));
    let mut m = Measurements::default();
    for gw in [1, 2] {
        m.set_down(n(gw), true);
        m.set_down(n(3 - gw), false);
        assert_eq!(fabric.handle_measurements(&m), Affected::All);
        let configs = all_configs(&fabric);
        for (src, dst) in [(n(3), n(6)), (n(6), n(3)), (n(8), n(4)), (n(gw), n(6))] {
            let hops = walk(&configs, &specs, &src, &dst)
                .unwrap_or_else(|e| panic!("{src} -> {dst} with gateway {gw} down: {e}"));
            if src != n(gw) {
                assert!(!hops.contains(&n(gw)), "{hops:?} crosses the down gateway");
            }
        }
    }
    // Both down: the site is cut off across sites, not inside.
    m.set_down(n(1), true);
    m.set_down(n(2), true);
    fabric.handle_measurements(&m);
    let configs = all_configs(&fabric);
    assert!(walk(&configs, &specs, &n(3), &n(6)).is_err());
    assert!(walk(&configs, &specs, &n(3), &n(4)).is_ok());
    let trace = fabric.trace(&n(3), &n(6)).expect("members");
    assert!(!trace.delivered);
    assert_eq!(
        trace.sites.route,
        SiteRoute::NoRoute(NoRoute::NoGateway { site: "a".into() })
    );
}

#[test]
fn members_relay_through_a_compliant_site_or_not_at_all() {
    let members = vec![
        member(1, "a", true),
        member(2, "a", false),
        member(3, "b", true),
        member(4, "b", false),
        member(5, "c", true),
        member(6, "d", true),
        member(7, "d", true),
    ];
    let specs: BTreeMap<Member, MemberSpec> =
        members.iter().map(|m| (m.id.clone(), m.clone())).collect();
    let sites = sites(&[("a", &["eu"]), ("b", &["eu"]), ("c", &[]), ("d", &["eu"])]);
    let input = input(TopologyMode::Gateways, sites, members);
    let mut m = Measurements::default();
    m.set_link("a", "b", Link::down());
    m.set_link("a", "c", Link::up(1_000));
    m.set_link("b", "c", Link::up(1_000));
    let fabric = Fabric::build(&input, &m, None);
    let n = |i: u32| Member::Node(format!("n{i}"));
    let configs = all_configs(&fabric);
    let hops = walk(&configs, &specs, &n(2), &n(4)).expect("relayed via d");
    let crossed: Vec<&str> = hops.iter().map(|h| specs[h].site.as_str()).collect();
    assert!(
        crossed.contains(&"d") && !crossed.contains(&"c"),
        "{crossed:?}"
    );
    assert!(walk(&configs, &specs, &n(4), &n(2)).is_ok());

    // d goes away too: c is faster but forbidden, so eu traffic is dropped.
    m.set_down(n(6), true);
    m.set_down(n(7), true);
    let fabric = Fabric::build(&input, &m, Some(fabric.paths()));
    let configs = all_configs(&fabric);
    assert!(walk(&configs, &specs, &n(2), &n(4)).is_err());
    let trace = fabric.trace(&n(2), &n(4)).expect("members");
    assert!(!trace.delivered);
    assert_eq!(
        trace.sites.route,
        SiteRoute::NoRoute(NoRoute::NoCompliantPath {
            tags: vec!["eu".into()],
            forbidden: vec!["c".into()]
        })
    );
    // c itself still reaches both.
    assert!(walk(&configs, &specs, &n(5), &n(4)).is_ok());
    assert!(walk(&configs, &specs, &n(2), &n(5)).is_ok());
}

#[test]
fn joining_and_leaving_incrementally_equals_recomputing() {
    let mut members = three_sites();
    let input0 = input(
        TopologyMode::Gateways,
        sites(&[("a", &[]), ("b", &[]), ("c", &[])]),
        members.clone(),
    );
    let mut fabric = Fabric::build(&input0, &Measurements::default(), None);
    let joiner = member(10, "b", false);
    let affected = fabric.upsert_member(joiner.clone());
    assert_eq!(
        affected,
        Affected::Sites(["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect())
    );
    members.push(joiner);
    let rebuilt = Fabric::build(
        &TopologyInput {
            members: members.clone(),
            ..input0.clone()
        },
        &Measurements::default(),
        None,
    );
    assert_eq!(all_configs(&fabric), all_configs(&rebuilt));
    fabric
        .remove_member(&Member::Node("n6".into()))
        .expect("exists");
    members.retain(|m| m.id != Member::Node("n6".into()));
    let rebuilt = Fabric::build(
        &TopologyInput { members, ..input0 },
        &Measurements::default(),
        None,
    );
    assert_eq!(all_configs(&fabric), all_configs(&rebuilt));
}

// ---- properties ----

/// A random network of up to 6 sites.
#[derive(Debug, Clone)]
struct Net {
    sites: Vec<SiteSpec>,
    /// (a, b, latency ms, up)
    links: Vec<(usize, usize, u32, bool)>,
    /// members per site: (gateway count, plain count, external)
    members: Vec<(usize, usize, bool)>,
    down: Vec<bool>,
    two_rules: bool,
}

fn net() -> impl Strategy<Value = Net> {
    (2usize..=6)
        .prop_flat_map(|n| {
            (
                proptest::collection::vec(0u8..4, n),
                proptest::collection::vec((1u32..100, prop::bool::weighted(0.7)), n * n),
                proptest::collection::vec((0usize..3, 0usize..3, any::<bool>()), n),
                proptest::collection::vec(prop::bool::weighted(0.2), 3 * n),
                any::<bool>(),
            )
        })
        .prop_map(|(tags, links, members, down, two_rules)| {
            let n = tags.len();
            let tag_names = |t: u8| -> BTreeSet<String> {
                let mut s = BTreeSet::new();
                if t & 1 != 0 {
                    s.insert("eu".to_owned());
                }
                if t & 2 != 0 {
                    s.insert("de".to_owned());
                }
                s
            };
            Net {
                sites: (0..n)
                    .map(|i| SiteSpec {
                        name: format!("s{i}"),
                        tags: tag_names(tags[i]),
                    })
                    .collect(),
                links: (0..n)
                    .flat_map(|a| ((a + 1)..n).map(move |b| (a, b)))
                    .map(|(a, b)| (a, b, links[a * n + b].0, links[a * n + b].1))
                    .collect(),
                members,
                down,
                two_rules,
            }
        })
}

impl Net {
    fn rules(&self) -> Vec<ResidencyRule> {
        let mut r = eu_rule();
        if self.two_rules {
            r.push(ResidencyRule { tag: "de".into() });
        }
        r
    }

    fn measurements(&self, noise: impl Fn(usize) -> f64) -> Measurements {
        let mut m = Measurements::default();
        for (i, (a, b, ms, up)) in self.links.iter().enumerate() {
            let latency = (f64::from(*ms) * 1000.0 * noise(i)) as u32;
            let link = if *up { Link::up(latency) } else { Link::down() };
            m.set_link(&self.sites[*a].name, &self.sites[*b].name, link);
        }
        m
    }

    fn member_specs(&self) -> Vec<MemberSpec> {
        let mut out = Vec::new();
        let mut i = 1;
        for (s, (gws, plain, ext)) in self.members.iter().enumerate() {
            let site = &self.sites[s].name;
            for k in 0..gws + plain {
                out.push(member(i, site, k < *gws));
                i += 1;
            }
            if *ext {
                out.push(external(i, site));
                i += 1;
            }
        }
        out
    }
}

/// Sites reachable from `x` towards `d` over up links and active sites
/// with tags never dropping (the forwarding rule), by plain search.
fn oracle_reaches(g: &SiteGraph, x: usize, d: usize) -> bool {
    let level = |s: usize| g.masks[s] & g.masks[d];
    let mut seen = vec![false; g.len()];
    let mut stack = vec![x];
    while let Some(u) = stack.pop() {
        if u == d {
            return true;
        }
        if std::mem::replace(&mut seen[u], true) {
            continue;
        }
        for v in 0..g.len() {
            let ok = v != u
                && g.cost(u, v).is_some()
                && g.active[u]
                && g.active[v]
                && level(v) & level(u) == level(u);
            if ok {
                stack.push(v);
            }
        }
    }
    false
}

/// Whether any path from `x` to `d` transits only sites with all the
/// tags the pair requires (exact compliance, not the forwarding rule).
fn compliant_path_exists(g: &SiteGraph, x: usize, d: usize) -> bool {
    let req = g.required(x, d);
    let mut seen = vec![false; g.len()];
    let mut stack = vec![x];
    while let Some(u) = stack.pop() {
        if u == d {
            return true;
        }
        if std::mem::replace(&mut seen[u], true) {
            continue;
        }
        for v in 0..g.len() {
            if v != u
                && g.cost(u, v).is_some()
                && g.active[u]
                && g.active[v]
                && (v == d || g.may_transit(v, req))
            {
                stack.push(v);
            }
        }
    }
    false
}

/// Checks every pair of a site path table against the oracles.
fn check_table(net: &Net, t: &PathTable) -> Result<(), TestCaseError> {
    let graph = t.graph();
    let n = graph.len();
    for x in 0..n {
        for d in (0..n).filter(|d| *d != x) {
            let path = t.path_idx(x, d);
            prop_assert_eq!(
                path.is_some(),
                oracle_reaches(graph, x, d),
                "{} -> {}",
                x,
                d
            );
            if !net.two_rules && graph.required(x, d) != 0 {
                prop_assert_eq!(path.is_some(), compliant_path_exists(graph, x, d));
            }
            let trace = t.trace(&graph.names[x], &graph.names[d]);
            match path {
                None => prop_assert!(matches!(trace.route, SiteRoute::NoRoute(_)), "{}", trace),
                Some(path) => {
                    let unique: BTreeSet<_> = path.iter().collect();
                    prop_assert_eq!(unique.len(), path.len(), "loop: {:?}", path);
                    for w in path.windows(2) {
                        prop_assert!(graph.cost(w[0], w[1]).is_some(), "down link in {:?}", path);
                    }
                    let req = graph.required(x, d);
                    for via in &path[1..path.len() - 1] {
                        prop_assert!(
                            graph.may_transit(*via, req),
                            "{:?} transits forbidden {}",
                            path,
                            via
                        );
                        prop_assert!(graph.active[*via]);
                    }
                    prop_assert_eq!(trace.hops.len(), path.len());
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Paths follow next hops without loops, use only up links and active
    /// sites, never transit a forbidden site, and exist exactly when the
    /// forwarding rule allows one (and, for a single rule, whenever a
    /// compliant path exists for a constrained pair).
    #[test]
    fn site_paths_are_loop_free_up_and_compliant(net in net()) {
        let params = PathParams::default();
        let m = net.measurements(|_| 1.0);
        let active: BTreeSet<String> = net
            .members
            .iter()
            .zip(&net.sites)
            .filter(|((g, _, _), _)| *g > 0)
            .map(|(_, s)| s.name.clone())
            .collect();
        let graph = SiteGraph::new(&net.sites, &net.rules(), &m, |s| active.contains(s), &params);
        let t = compute_paths(TopologyMode::Gateways, graph, &params, None);
        check_table(&net, &t)?;
    }

    /// The same holds with history, whatever the links do between rounds:
    /// hysteresis never keeps a broken, looping or non-compliant path.
    #[test]
    fn paths_with_history_stay_loop_free_and_compliant(net in net(), seed in any::<u64>()) {
        let params = PathParams::default();
        let mut rng = seed;
        let mut next = move || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            rng >> 33
        };
        let mut net = net;
        let mut prev: Option<PathTable> = None;
        for _round in 0..10 {
            for l in net.links.iter_mut() {
                match next() % 8 {
                    0 => l.3 = !l.3,
                    1 => l.2 = 1 + (next() % 150) as u32,
                    _ => {}
                }
            }
            let m = net.measurements(|_| 1.0);
            let graph = SiteGraph::new(&net.sites, &net.rules(), &m, |_| true, &params);
            let t = compute_paths(TopologyMode::Gateways, graph, &params, prev.as_ref());
            check_table(&net, &t)?;
            prev = Some(t);
        }
    }

    /// Under measurement noise of ±8 % around fixed latencies, a path that
    /// was left is never taken again (no flapping), and with history the
    /// table stays loop-free and compliant.
    #[test]
    fn noisy_measurements_do_not_flap(net in net(), seed in any::<u64>()) {
        let params = PathParams::default();
        let mut rng = seed;
        let mut noise = move || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            0.92 + ((rng >> 33) % 1601) as f64 / 10_000.0
        };
        let mut prev: Option<PathTable> = None;
        let n = net.sites.len();
        let mut history: BTreeMap<(usize, usize), Vec<Vec<usize>>> = BTreeMap::new();
        for _round in 0..12 {
            let factors: Vec<f64> = (0..net.links.len()).map(|_| noise()).collect();
            let m = net.measurements(|i| factors[i]);
            let graph = SiteGraph::new(&net.sites, &net.rules(), &m, |_| true, &params);
            let t = compute_paths(TopologyMode::Gateways, graph.clone(), &params, prev.as_ref());
            for x in 0..n {
                for d in (0..n).filter(|d| *d != x) {
                    let path = t.path_idx(x, d);
                    prop_assert_eq!(path.is_some(), oracle_reaches(&graph, x, d));
                    let Some(path) = path else { continue };
                    let seen = history.entry((x, d)).or_default();
                    if seen.last() != Some(&path) {
                        prop_assert!(!seen.contains(&path), "{} -> {} went back to {:?} after {:?}", x, d, path, seen);
                        seen.push(path);
                    }
                }
            }
            prev = Some(t);
        }
    }

    /// Every pair of members with a site path is delivered along the
    /// configs' routes, hop by hop, each receiver accepting the source,
    /// without loops, crossing exactly the sites of the site path; pairs
    /// without one are not delivered. Routes never overlap within a config.
    #[test]
    fn members_deliver_along_the_site_paths(net in net(), gw_down in any::<u64>()) {
        let mut m = net.measurements(|_| 1.0);
        let specs = net.member_specs();
        for (k, s) in specs.iter().enumerate() {
            if s.gateway && net.down[k % net.down.len()] && gw_down % 2 == 0 {
                m.set_down(s.id.clone(), true);
            }
        }
        let input = TopologyInput {
            mode: TopologyMode::Gateways,
            sites: net.sites.clone(),
            residency: net.rules(),
            members: specs.clone(),
            params: PathParams::default(),
            persistent_keepalive: None,
        };
        let fabric = Fabric::build(&input, &m, None);
        let configs = all_configs(&fabric);
        let by_id: BTreeMap<Member, MemberSpec> = specs.iter().map(|s| (s.id.clone(), s.clone())).collect();
        for cfg in configs.values() {
            let mut seen = BTreeSet::new();
            for p in cfg.peers.values() {
                for r in p.routes.iter().chain(&p.shared) {
                    prop_assert!(seen.insert(*r), "{} routes {} twice", cfg.member, r);
                }
            }
        }
        for src in by_id.values() {
            for dst in by_id.values().filter(|d| d.id != src.id) {
                let site_path = fabric.paths().path(&src.site, &dst.site);
                let result = walk(&configs, &by_id, &src.id, &dst.id);
                let trace = fabric.trace(&src.id, &dst.id).expect("members");
                match site_path {
                    Some(site_path) => {
                        let hops = result.map_err(|e| TestCaseError::fail(format!("{} -> {}: {e}", src.id, dst.id)))?;
                        let mut crossed: Vec<&str> = hops.iter().map(|h| by_id[h].site.as_str()).collect();
                        crossed.dedup();
                        prop_assert_eq!(&crossed, &site_path);
                        // Flows spread over a site's gateways all arrive,
                        // over the same sites.
                        for flow in 1..4 {
                            let alt = walk_flow(&configs, &by_id, &src.id, &dst.id, flow)
                                .map_err(|e| TestCaseError::fail(format!("{} -> {} flow {flow}: {e}", src.id, dst.id)))?;
                            let mut sites: Vec<&str> = alt.iter().map(|h| by_id[h].site.as_str()).collect();
                            sites.dedup();
                            prop_assert_eq!(&sites, &site_path);
                        }
                        prop_assert!(trace.delivered);
                        prop_assert_eq!(trace.hops.len(), hops.len());
                    }
                    None => {
                        prop_assert!(result.is_err(), "{} -> {} delivered without a site path", src.id, dst.id);
                        prop_assert!(!trace.delivered);
                    }
                }
            }
        }
    }

    /// Members joining and leaving one at a time give the same configs as
    /// computing the final membership from scratch.
    #[test]
    fn incremental_changes_equal_a_rebuild(net in net(), order in proptest::collection::vec(any::<u16>(), 1..8)) {
        let specs = net.member_specs();
        let plain: Vec<&MemberSpec> = specs.iter().filter(|s| !s.gateway).collect();
        prop_assume!(!plain.is_empty());
        let m = net.measurements(|_| 1.0);
        let base: Vec<MemberSpec> = specs.iter().filter(|s| s.gateway).cloned().collect();
        let input = |members: Vec<MemberSpec>| TopologyInput {
            mode: TopologyMode::Gateways,
            sites: net.sites.clone(),
            residency: net.rules(),
            members,
            params: PathParams::default(),
            persistent_keepalive: Some(25),
        };
        let mut fabric = Fabric::build(&input(base.clone()), &m, None);
        let mut present: BTreeMap<Member, MemberSpec> = base.iter().map(|s| (s.id.clone(), s.clone())).collect();
        for o in order {
            let s = plain[o as usize % plain.len()];
            if present.remove(&s.id).is_some() {
                prop_assert!(fabric.remove_member(&s.id).is_some());
            } else {
                fabric.upsert_member(s.clone());
                present.insert(s.id.clone(), s.clone());
            }
        }
        let rebuilt = Fabric::build(&input(present.into_values().collect()), &m, None);
        prop_assert_eq!(all_configs(&fabric), all_configs(&rebuilt));
    }
}
