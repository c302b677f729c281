//! Thin wrappers over `ip`, `tc` and `ip netns exec`: the only way the lab
//! touches the kernel. Every command names its namespace explicitly, so
//! nothing is ever configured in the host's namespace. Besides, UDP sockets
//! bound inside a namespace ([`udp_socket_in`]), for probes whose source
//! port matters.

use std::ffi::OsStr;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, Result, bail};

/// Runs a command to completion and captures its output.
pub fn output<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let shown = describe(program, &args);
    Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{shown}`"))
}

/// Runs a command and fails (with its stderr) if it exits non-zero.
pub fn run<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let shown = describe(program, &args);
    let out = output(program, &args)?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `args` inside namespace `ns` (`ip netns exec ns args...`).
pub fn exec_in(ns: &str, args: &[&str]) -> Result<Output> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    output("ip", full)
}

/// Runs `ip -n ns <args>` and fails on error.
pub fn ip(ns: &str, args: &str) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend(args.split_whitespace());
    run("ip", full).map(drop)
}

/// Creates a namespace with loopback up.
pub fn add_ns(ns: &str) -> Result<()> {
    run("ip", ["netns", "add", ns])?;
    ip(ns, "link set lo up")
}

/// Deletes a namespace, ignoring "does not exist".
pub fn del_ns(ns: &str) -> bool {
    output("ip", ["netns", "del", ns]).is_ok_and(|o| o.status.success())
}

/// Names of all namespaces on the host.
pub fn list_ns() -> Vec<String> {
    output("ip", ["netns", "list"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Sets a sysctl inside a namespace.
pub fn sysctl(ns: &str, key_value: &str) -> Result<()> {
    let out = exec_in(ns, &["sysctl", "-qw", key_value])?;
    if !out.status.success() {
        bail!(
            "sysctl {key_value} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates a veth pair with one end in each namespace.
pub fn veth(ns_a: &str, name_a: &str, ns_b: &str, name_b: &str) -> Result<()> {
    ip(
        ns_a,
        &format!("link add {name_a} type veth peer name {name_b} netns {ns_b}"),
    )
}

/// Adds a netem delay qdisc. Returns Ok(false) when the kernel has no netem
/// (`CONFIG_NET_SCH_NETEM` off), so callers can carry on without latency.
pub fn netem_delay(ns: &str, dev: &str, delay_us: u32) -> Result<bool> {
    let delay = format!("{delay_us}us");
    let out = exec_in(
        ns,
        &[
            "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", &delay,
        ],
    )?;
    if out.status.success() {
        return Ok(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("unknown") {
        return Ok(false);
    }
    bail!("tc netem on {dev} in {ns}: {}", err.trim())
}

fn describe<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// A UDP socket bound to `addr` in namespace `ns`. It is created by a
/// short-lived thread that entered the namespace (`setns`, that thread
/// only) and keeps that namespace for its whole life, whichever thread
/// uses it.
pub fn udp_socket_in(ns: &str, addr: SocketAddr) -> Result<UdpSocket> {
    let path = format!("/run/netns/{ns}");
    let handle = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<UdpSocket> {
            nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering namespace {ns}"))?;
            UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr} in {ns}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread entering {ns} panicked"))?
    })
}

/// Runs `f` on a short-lived thread that entered namespace `ns` (`setns`,
/// that thread only), so the sockets it opens (e.g. a gRPC client on a
/// current-thread runtime) live in `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let handle = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering namespace {ns}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread entering {ns} panicked"))?
    })
}
