//! Compiling 10,000 policy rules over 1,000 identities, from scratch and
//! incrementally after one policy changes.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use weft_controller_core::policy::{
    Endpoint, Policy, PortRange, PortRule, Protocol, Rule, Selector, compile, update,
};

const IDENTITIES: u32 = 1_000;
const APPS: u32 = 50;
const POLICIES: u32 = 500;
const RULES_PER_POLICY: u32 = 20;

fn selector(pairs: &[(&str, String)]) -> Selector {
    Selector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        sites: Default::default(),
    }
}

/// 1,000 endpoints, each its own identity: 50 apps x 20 shards, 3 sites.
fn endpoints() -> Vec<Endpoint> {
    (0..IDENTITIES)
        .map(|i| Endpoint {
            name: format!("e{i}"),
            site: format!("site-{}", i % 3),
            node: Some(format!("node-{}", i % 100)),
            labels: BTreeMap::from([
                ("app".to_owned(), format!("app{}", i % APPS)),
                ("shard".to_owned(), format!("s{}", i / APPS)),
            ]),
            prefixes: vec![
                format!("100.64.{}.{}/32", i >> 8, i & 0xff)
                    .parse()
                    .expect("v4"),
                format!("fd00::{i:x}/128").parse().expect("v6"),
            ],
        })
        .collect()
}

/// 500 policies of 20 rules (16 allows, 4 denies) = 10,000 rules; each
/// targets one app (20 identities) and allows from other apps.
fn policies() -> Vec<Policy> {
    (0..POLICIES)
        .map(|p| {
            let rule = |r: u32| Rule {
                from: Some(selector(&[("app", format!("app{}", (p + r * 7) % APPS))])),
                ports: Some(vec![PortRule {
                    protocol: if r.is_multiple_of(2) {
                        Protocol::Tcp
                    } else {
                        Protocol::Udp
                    },
                    ports: PortRange {
                        first: (1000 + p * 3 + r) as u16,
                        last: (1000 + p * 3 + r * 5) as u16,
                    },
                }]),
            };
            Policy {
                name: format!("policy-{p}"),
                target: selector(&[("app", format!("app{}", p % APPS))]),
                ingress: (0..RULES_PER_POLICY - 4).map(rule).collect(),
                deny: (RULES_PER_POLICY - 4..RULES_PER_POLICY).map(rule).collect(),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let endpoints = endpoints();
    let policies = policies();
    let compiled = compile(&policies, &endpoints);
    let tuples = compiled.tables.tuples().count();
    eprintln!(
        "policy bench: {} rules, {} identities, {tuples} tuples",
        POLICIES * RULES_PER_POLICY,
        compiled.identities.len()
    );
    let mut changed = policies.clone();
    if let Some(rule) = changed[0].ingress.first_mut() {
        rule.ports = Some(vec![PortRule {
            protocol: Protocol::Tcp,
            ports: PortRange::single(443),
        }]);
    }

    let mut group = c.benchmark_group("policy");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("compile_10k_rules_1k_identities", |b| {
        b.iter(|| compile(black_box(&policies), black_box(&endpoints)))
    });
    group.bench_function("update_one_policy", |b| {
        b.iter_batched(
            || compiled.clone(),
            |prev| update(prev, black_box(&changed), black_box(&endpoints)),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
