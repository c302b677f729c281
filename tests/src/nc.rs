//! TCP listeners and connection probes with netcat (OpenBSD `nc`) inside
//! lab namespaces.

use std::net::IpAddr;
use std::time::Duration;

use crate::Lab;

/// `nc -l -k` listeners in a namespace, killed (by PID) on drop.
#[derive(Debug)]
pub struct Listeners {
    pids: Vec<String>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = std::process::Command::new("kill").arg(pid).status();
        }
    }
}

/// Starts one `nc {family} -l -k PORT` per `(family, port)` (family `-4`
/// or `-6`) in namespace `ns` (a lab node's name or a lab namespace).
///
/// # Panics
/// If a listener cannot be started.
pub fn listen(lab: &Lab, ns: &str, ports: &[(&str, u16)]) -> Listeners {
    let mut pids = Vec::new();
    for (family, port) in ports {
        let out = lab.sh(
            ns,
            &format!("setsid nc {family} -l -k {port} </dev/null >/dev/null 2>&1 & echo $!"),
        );
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            !pid.is_empty(),
            "starting nc {family} -l {port} in {ns} failed"
        );
        pids.push(pid);
    }
    // Give the listeners a moment to bind.
    std::thread::sleep(Duration::from_millis(200));
    Listeners { pids }
}

/// One TCP connect from `from` to `to:port`, within `timeout`.
pub fn connects(lab: &Lab, from: &str, to: IpAddr, port: u16, timeout: Duration) -> bool {
    let t = format!("{:.3}", timeout.as_secs_f64());
    let (to, port) = (to.to_string(), port.to_string());
    lab.exec(from, &["timeout", &t, "nc", "-z", "-w", "2", &to, &port])
        .status
        .success()
}

/// One TCP connect from `from` with source address `src`, within 1.5 s.
pub fn connects_from(lab: &Lab, from: &str, src: IpAddr, to: IpAddr, port: u16) -> bool {
    let (src, to, port) = (src.to_string(), to.to_string(), port.to_string());
    lab.exec(
        from,
        &[
            "timeout", "1.5", "nc", "-z", "-w", "1", "-s", &src, &to, &port,
        ],
    )
    .status
    .success()
}
