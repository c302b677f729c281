//! Gateway-mode topology at scale: 10,000 nodes in 100 sites (2 gateways
//! each), all site links measured, some down, an `eu` residency rule.
//!
//! - `build`: the site paths and every site's tables, from which each
//!   member's config is read (`Fabric::build`);
//! - `join_and_leave`: one plain node joining and leaving again
//!   (`Fabric::upsert_member`, `Fabric::remove_member`); `join_after_clone`:
//!   one joining a freshly cloned fabric;
//! - `config`: materialising one member's full config;
//! - `paths`: recomputing the site paths with hysteresis after new
//!   measurements.
//!
//! Memory is measured with a counting allocator and printed once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use weft_controller_core::Member;
use weft_controller_core::topology::{
    Fabric, Link, Measurements, MemberSpec, PathParams, ResidencyRule, SiteGraph, SiteSpec,
    TopologyInput, TopologyMode, compute_paths,
};
use weft_dataplane_core::Key;

const SITES: u32 = 100;
const PER_SITE: u32 = 100;
const GATEWAYS: u32 = 2;

/// Counts live heap bytes, to report memory per node.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// The one unsafe block of this crate: a global allocator must be an
// `unsafe impl`; it only forwards to the system allocator and counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn key(i: u32) -> Key {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k[31] = 0x57;
    Key(k)
}

fn member(i: u32, site: u32, gateway: bool) -> MemberSpec {
    MemberSpec {
        id: Member::Node(format!("n-{i}")),
        name: format!("node-{i}"),
        site: format!("site-{site}"),
        public_key: key(i),
        endpoint: Some(([198, 18, (i >> 8) as u8, i as u8], 51820).into()),
        prefixes: vec![
            format!("100.64.{}.{}/32", i >> 8, i & 0xff)
                .parse()
                .expect("valid"),
            format!("fd00::{i:x}/128").parse().expect("valid"),
        ],
        gateway,
    }
}

fn input() -> TopologyInput {
    let sites = (0..SITES)
        .map(|s| SiteSpec {
            name: format!("site-{s}"),
            tags: if s.is_multiple_of(3) {
                ["eu".to_owned()].into_iter().collect()
            } else {
                Default::default()
            },
        })
        .collect();
    let members = (0..SITES)
        .flat_map(|s| (0..PER_SITE).map(move |k| member(s * PER_SITE + k + 1, s, k < GATEWAYS)))
        .collect();
    TopologyInput {
        mode: TopologyMode::Gateways,
        sites,
        residency: vec![ResidencyRule { tag: "eu".into() }],
        members,
        params: PathParams::default(),
        persistent_keepalive: Some(25),
    }
}

/// Latency from a cheap deterministic hash; one link in 20 down.
fn measurements(round: u32) -> Measurements {
    let mut m = Measurements::default();
    for a in 0..SITES {
        for b in (a + 1)..SITES {
            let h = (a * 7919 + b * 104_729 + round * 31).wrapping_mul(2_654_435_761);
            let link = if h.is_multiple_of(20) {
                Link::down()
            } else {
                Link::up(5_000 + h % 150_000)
            };
            m.set_link(&format!("site-{a}"), &format!("site-{b}"), link);
        }
    }
    m
}

fn bench(c: &mut Criterion) {
    let input = input();
    let meas = measurements(0);

    let before = LIVE.load(Ordering::Relaxed);
    let fabric = Fabric::build(&input, &meas, None);
    let fabric_bytes = LIVE.load(Ordering::Relaxed) - before;
    let nodes = fabric.member_count();
    let plain = Member::Node("n-50".into());
    let gateway = Member::Node("n-1".into());
    let before = LIVE.load(Ordering::Relaxed);
    let one = fabric.config(&plain).expect("member");
    let config_bytes = LIVE.load(Ordering::Relaxed) - before;
    let routes: usize = one.peers.values().map(|p| p.routes.len()).sum();
    let shared: usize = one.peers.values().map(|p| p.shared.len()).sum();
    println!(
        "topology memory: {fabric_bytes} bytes for {nodes} nodes in {SITES} sites = {} bytes/node \
         (member specs included); one plain member's materialised config: {} peers, {routes} routes \
         and {shared} shared routes, {config_bytes} bytes",
        fabric_bytes / nodes,
        one.peers.len(),
    );
    drop(one);

    let mut group = c.benchmark_group("topology");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("build/10000x100", |b| {
        b.iter(|| Fabric::build(black_box(&input), black_box(&meas), None))
    });
    let joiner = member(20_000, 42, false);
    // Steady state: a node joins and leaves again on the same fabric.
    let mut steady = fabric.clone();
    group.bench_function("join_and_leave/10000x100", |b| {
        b.iter(|| {
            steady.upsert_member(black_box(joiner.clone()));
            steady.remove_member(black_box(&joiner.id))
        })
    });
    // On a fresh copy (a copy-on-write controller): every list grows
    // from an exact-capacity clone, so this includes reallocations.
    group.bench_function("join_after_clone/10000x100", |b| {
        b.iter_batched_ref(
            || fabric.clone(),
            |f| f.upsert_member(black_box(joiner.clone())),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("config/plain", |b| {
        b.iter(|| fabric.config(black_box(&plain)))
    });
    group.bench_function("config/gateway", |b| {
        b.iter(|| fabric.config(black_box(&gateway)))
    });
    let params = PathParams::default();
    let noisy = measurements(1);
    group.bench_function("paths/100", |b| {
        b.iter(|| {
            let graph = SiteGraph::new(&input.sites, &input.residency, &noisy, |_| true, &params);
            compute_paths(TopologyMode::Gateways, graph, &params, Some(fabric.paths()))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
