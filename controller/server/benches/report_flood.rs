//! Admin latency during a report flood: starts a real weft-controller on
//! 127.0.0.1 with its own data dir, enrols simulated nodes with real join
//! tokens, CSRs and mTLS, opens their Watch streams, then has every node
//! send Reports back to back for a bounded time while an admin client
//! measures GetNode, ListNodes and SetNodeLabels (a durable mutation).
//! Prints p50/p99/max per call; the goal is p99 <= 100 ms.
//!
//! `cargo bench -p weft-controller --bench report_flood [-- --nodes 200
//! --secs 20]`. Loopback only; everything it starts stops when it ends.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use weft_proto::pb;
use weft_proto::pb::agent_service_client::AgentServiceClient;

use common::Error;

struct Args {
    nodes: usize,
    secs: u64,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 200,
        secs: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--nodes" => a.nodes = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.nodes),
            "--secs" => a.secs = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.secs),
            // `cargo bench` passes --bench; ignore what is not ours.
            _ => {}
        }
    }
    a.secs = a.secs.clamp(1, 120);
    a.nodes = a.nodes.clamp(2, 1000);
    a
}

fn main() -> Result<(), Error> {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// A report as an agent with `peers` sends it: every peer seen and probed.
fn report(peers: &[[u8; 32]], revision: u64) -> pb::ReportRequest {
    pb::ReportRequest {
        applied_revision: revision,
        apply_error: String::new(),
        peers: peers
            .iter()
            .map(|k| pb::PeerStatus {
                public_key: k.to_vec(),
                last_handshake_unix: 1,
                rx_bytes: 1000,
                tx_bytes: 1000,
                endpoint: "198.18.0.1:51820".to_owned(),
                probe: Some(pb::PeerProbe {
                    rtt_us: 1000,
                    loss_permille: 0,
                    reachable: true,
                    samples: 10,
                }),
            })
            .collect(),
        ..Default::default()
    }
}

/// p50, p99 and max of a set of latencies, in milliseconds.
fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64, usize) {
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[i].as_secs_f64() * 1000.0
    };
    if v.is_empty() {
        return (0.0, 0.0, 0.0, 0);
    }
    (at(0.50), at(0.99), at(1.0), v.len())
}

async fn run(args: Args) -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let controller = common::start(dir.path(), false).await?;
    let cfg = controller.config.clone();
    let mut admin = common::admin(&cfg, &cfg.url, &cfg.token).await?;
    admin
        .create_site(pb::CreateSiteRequest {
            name: "bench".to_owned(),
        })
        .await?;

    let t0 = Instant::now();
    let mut nodes = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let token = common::join_token(&mut admin, "bench").await?;
        nodes.push(common::enrol(&cfg.url, &cfg.ca_pem, &token, &format!("n{i}")).await?);
    }
    println!(
        "enrolled {} nodes (join token, CSR, mTLS) in {:.1} s",
        nodes.len(),
        t0.elapsed().as_secs_f64()
    );

    // Every node watches its config, as agents do.
    let mut watches = Vec::new();
    for n in &nodes {
        let mut stream = AgentServiceClient::new(n.channel.clone())
            .watch(pb::WatchRequest {
                listen_port: 51820,
                ..Default::default()
            })
            .await?
            .into_inner();
        watches.push(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
        }));
    }

    let keys: Vec<[u8; 32]> = nodes.iter().map(|n| n.key).collect();
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(args.secs);
    let mut flood = Vec::new();
    for n in &nodes {
        let peers: Vec<[u8; 32]> = keys.iter().copied().filter(|k| *k != n.key).collect();
        let mut client = AgentServiceClient::new(n.channel.clone());
        let (accepted, refused, failed) = (accepted.clone(), refused.clone(), failed.clone());
        flood.push(tokio::spawn(async move {
            let msg = report(&peers, 1);
            while Instant::now() < end {
                match client.report(msg.clone()).await {
                    Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    // The admin client runs on its own thread and runtime, so that its
    // latency is the controller's, not the flood tasks' queue.
    let admin_cfg = cfg.clone();
    let probe_node = nodes[0].id.clone();
    let admin_thread = std::thread::spawn(move || -> Result<_, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let mut admin = common::admin(&admin_cfg, &admin_cfg.url, &admin_cfg.token)
                .await
                .map_err(|e| e.to_string())?;
            let (mut get, mut list, mut set) = (Vec::new(), Vec::new(), Vec::new());
            // Let the flood build up first.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut i = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                admin
                    .get_node(pb::GetRequest {
                        name: probe_node.clone(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                get.push(t.elapsed());
                let t = Instant::now();
                admin
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .map_err(|e| e.to_string())?;
                list.push(t.elapsed());
                let t = Instant::now();
                admin
                    .set_node_labels(pb::SetNodeLabelsRequest {
                        node: probe_node.clone(),
                        set: HashMap::from([("round".to_owned(), i.to_string())]),
                        remove: Vec::new(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                set.push(t.elapsed());
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok((get, list, set))
        })
    });

    for f in flood {
        f.await?;
    }
    let (get, list, set) = admin_thread
        .join()
        .map_err(|_| "the admin client panicked")??;
    for w in watches {
        w.abort();
    }
    let secs = args.secs as f64;
    let accepted = accepted.load(Ordering::Relaxed);
    let refused = refused.load(Ordering::Relaxed);
    println!(
        "flood: {} nodes for {} s: {} reports accepted ({:.0}/s), {} refused by the rate limit ({:.0}/s), {} failed",
        nodes.len(),
        args.secs,
        accepted,
        accepted as f64 / secs,
        refused,
        refused as f64 / secs,
        failed.load(Ordering::Relaxed)
    );
    println!("admin latency during the flood (ms):");
    println!("  call            count      p50      p99      max");
    let mut worst = 0.0f64;
    for (name, v) in [
        ("GetNode", get),
        ("ListNodes", list),
        ("SetNodeLabels", set),
    ] {
        let (p50, p99, max, n) = percentiles(v);
        worst = worst.max(p99);
        println!("  {name:<14} {n:>6} {p50:>8.1} {p99:>8.1} {max:>8.1}");
    }
    println!(
        "goal p99 <= 100 ms: {}",
        if worst <= 100.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
