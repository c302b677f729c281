//! `weft report-as`: sends `Report`s to the controller with a node's own
//! mTLS identity (read from its agent state dir), saying whatever the
//! command line says: what a compromised node could send. The trust tests
//! run it inside a node's namespace, beside the node's running agent.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use weft_proto::pb;
use weft_proto::pb::agent_service_client::AgentServiceClient;

#[derive(Debug, clap::Args)]
pub(crate) struct ReportAsArgs {
    /// The node's agent state dir (its identity.json is used).
    #[arg(long)]
    state_dir: PathBuf,
    /// A peer entry: KEY=RTT_US/LOSS_PERMILLE/up|down[@IP:PORT] (KEY in
    /// base64; the endpoint is where the node claims to see the peer).
    /// Repeatable.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// This many entries with random keys appended (not anyone's peers).
    #[arg(long, default_value_t = 0)]
    random_peers: usize,
    /// Each --peer entry is listed this many times in one report.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Reports to send.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Time between two reports, in milliseconds.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
}

fn parse_peer(s: &str) -> Result<pb::PeerStatus> {
    // The last '=': base64 keys end in '=' padding.
    let (key, rest) = s
        .rsplit_once('=')
        .with_context(|| format!("peer {s:?}: want KEY=RTT/LOSS/up|down[@ENDPOINT]"))?;
    let public_key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .with_context(|| format!("peer key {key:?} is not base64"))?;
    let (figures, endpoint) = rest.split_once('@').unwrap_or((rest, ""));
    let f: Vec<&str> = figures.split('/').collect();
    let [rtt, loss, state] = f.as_slice() else {
        bail!("peer {s:?}: want RTT_US/LOSS_PERMILLE/up|down");
    };
    Ok(pb::PeerStatus {
        public_key,
        endpoint: endpoint.to_owned(),
        probe: Some(pb::PeerProbe {
            rtt_us: rtt.parse().context("RTT_US")?,
            loss_permille: loss.parse().context("LOSS_PERMILLE")?,
            reachable: *state == "up",
            samples: 20,
        }),
        ..Default::default()
    })
}

/// Sends the reports; prints one JSON line per report: `{"ok":true}` or
/// `{"ok":false,"code":"...","message":"..."}`.
pub(crate) fn run(a: &ReportAsArgs) -> Result<()> {
    let path = a.state_dir.join("identity.json");
    let id: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let field = |k: &str| {
        id[k]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{} has no {k}", path.display()))
    };
    let (url, ca, cert, key) = (
        field("controller_url")?,
        field("ca_pem")?,
        field("cert_pem")?,
        field("key_pem")?,
    );
    let mut peers = Vec::new();
    for p in &a.peers {
        let p = parse_peer(p)?;
        peers.extend(std::iter::repeat_n(p, a.repeat));
    }
    for _ in 0..a.random_peers {
        let key: [u8; 32] = rand::random();
        peers.push(pb::PeerStatus {
            public_key: key.to_vec(),
            ..Default::default()
        });
    }
    let report = pb::ReportRequest {
        applied_revision: 0,
        apply_error: String::new(),
        peers,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = weft_proto::client::connect(&url, &ca, Some((&cert, &key))).await?;
        let mut client = AgentServiceClient::new(channel);
        for i in 0..a.count {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
            }
            let line = match client.report(report.clone()).await {
                Ok(_) => serde_json::json!({ "ok": true }),
                Err(s) => serde_json::json!({
                    "ok": false,
                    "code": format!("{:?}", s.code()),
                    "message": s.message(),
                }),
            };
            println!("{line}");
        }
        anyhow::Ok(())
    })
}
