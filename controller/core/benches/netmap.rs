//! Computing every node's config in a 1,000-node full mesh.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use weft_controller_core::{NetworkSettings, Registration, State, all_node_configs};
use weft_dataplane_core::Key;

const NODES: u32 = 1_000;

fn state_with_nodes(n: u32) -> State {
    let settings =
        NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"));
    let mut state = State::new(settings).expect("valid settings");
    state.create_site("bench", 0).expect("site");
    for i in 0..n {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&(i + 1).to_be_bytes());
        let token = format!("t{i}");
        state
            .create_token(&token, key, "bench", 0, 3600)
            .expect("token");
        let reg = Registration {
            node_id: format!("n-{i}"),
            token_id: token,
            secret_hash: key,
            name: format!("node-{i}"),
            public_key: Key(key),
            endpoint: Some(([198, 18, (i >> 8) as u8, i as u8], 51820).into()),
            cert_fingerprint: key,
            cert_expires_unix: 0,
            csr_key: key,
            labels: Default::default(),
        };
        state.register_node(reg, 1).expect("registers");
    }
    state
}

fn bench(c: &mut Criterion) {
    let state = state_with_nodes(NODES);
    let mut group = c.benchmark_group("netmap");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    group.bench_function("all_node_configs/1000", |b| {
        b.iter(|| all_node_configs(black_box(&state)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
