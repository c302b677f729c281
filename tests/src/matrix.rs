//! The connectivity matrix: every node pings every other node's overlay
//! address, all pairs at once.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, anyhow};

use crate::lab::{Lab, NodeInfo, PingResult};

/// Ping results for every ordered pair of nodes.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Node names, rows and columns.
    pub names: Vec<String>,
    /// (from, to) → result.
    pub cells: BTreeMap<(String, String), PingResult>,
    /// Target address per node.
    pub targets: BTreeMap<String, IpAddr>,
}

impl Matrix {
    /// Pings (count, 0.2 s apart) between all ordered pairs of the lab's
    /// started nodes, over IPv4 (`ipv6 = false`) or IPv6 overlay addresses.
    pub fn measure(lab: &Lab, ipv6: bool, count: u32) -> Result<Matrix> {
        // Fall back to the recorded addresses when the controller is down.
        let infos = lab.try_nodes().or_else(|e| recorded(lab).ok_or(e))?;
        let names: Vec<String> = lab
            .state()
            .nodes
            .iter()
            .filter(|n| n.started)
            .map(|n| n.name.clone())
            .collect();
        let mut targets = BTreeMap::new();
        for name in &names {
            let info = infos
                .iter()
                .find(|i| &i.name == name)
                .ok_or_else(|| anyhow!("controller does not list node {name}"))?;
            let addr = if ipv6 {
                info.ipv6().map(IpAddr::V6)
            } else {
                info.ipv4().map(IpAddr::V4)
            };
            let addr = addr.ok_or_else(|| {
                anyhow!(
                    "node {name} has no overlay address of that family: {:?}",
                    info.addresses
                )
            })?;
            targets.insert(name.clone(), addr);
        }
        let count_s = count.to_string();
        let deadline = (count / 5 + 3).to_string();
        let mut running = Vec::new();
        for from in &names {
            for (to, addr) in &targets {
                if to == from {
                    continue;
                }
                let child = Command::new("ip")
                    .args(["netns", "exec", &lab.ns(from), "ping", "-n", "-q", "-c"])
                    .args([&count_s, "-i", "0.2", "-W", "1", "-w", &deadline])
                    .arg(addr.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("spawning ping")?;
                running.push(((from.clone(), to.clone()), child));
            }
        }
        let mut cells = BTreeMap::new();
        for (pair, child) in running {
            let out = child.wait_with_output().context("waiting for ping")?;
            cells.insert(
                pair,
                PingResult::parse(&String::from_utf8_lossy(&out.stdout)),
            );
        }
        Ok(Matrix {
            names,
            cells,
            targets,
        })
    }

    /// (reachable pairs, all pairs).
    pub fn reachable(&self) -> (usize, usize) {
        let ok = self.cells.values().filter(|r| r.reachable()).count();
        (ok, self.cells.len())
    }

    /// Pairs without a reply.
    pub fn unreachable(&self) -> Vec<(String, String)> {
        self.cells
            .iter()
            .filter(|(_, r)| !r.reachable())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Pairs that lost at least one packet.
    pub fn lossy(&self) -> Vec<(String, String, f64)> {
        self.cells
            .iter()
            .filter(|(_, r)| r.received < r.transmitted || r.transmitted == 0)
            .map(|((a, b), r)| (a.clone(), b.clone(), r.loss))
            .collect()
    }

    /// A table: rows = from, columns = to, cells = average RTT in ms (or
    /// `--` when nothing came back), then "N/M pairs reachable".
    pub fn render(&self) -> String {
        let w = 9;
        let mut s = String::new();
        let _ = write!(s, "{:<w$}", "from\\to");
        for to in &self.names {
            let _ = write!(s, "{to:>w$}");
        }
        s.push('\n');
        for from in &self.names {
            let _ = write!(s, "{from:<w$}");
            for to in &self.names {
                let cell = match self.cells.get(&(from.clone(), to.clone())) {
                    None => "·".to_owned(),
                    Some(r) => match r.rtt_avg {
                        Some(rtt) if r.reachable() => format!("{:.1}", rtt.as_secs_f64() * 1000.0),
                        Some(_) | None => "--".to_owned(),
                    },
                };
                let _ = write!(s, "{cell:>w$}");
            }
            s.push('\n');
        }
        let (ok, all) = self.reachable();
        let _ = writeln!(s, "(avg RTT in ms over the overlay; -- = no reply)");
        let _ = writeln!(s, "{ok}/{all} pairs reachable");
        s
    }
}

/// Node infos built from the addresses recorded in the lab state, if any.
fn recorded(lab: &Lab) -> Option<Vec<NodeInfo>> {
    let nodes = &lab.state().nodes;
    if nodes.iter().any(|n| n.overlay.is_empty()) {
        return None;
    }
    Some(
        nodes
            .iter()
            .map(|n| NodeInfo {
                id: serde_json::Value::Null,
                name: n.name.clone(),
                site: n.site.clone(),
                public_key: String::new(),
                endpoint: None,
                addresses: n.overlay.clone(),
                connected: false,
                applied_revision: 0,
                last_report_unix: 0,
                peers: Vec::new(),
            })
            .collect(),
    )
}
