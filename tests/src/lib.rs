//! Weft's network-namespace lab for end-to-end tests and `weft lab up`.
//!
//! A [`Lab`] builds TESTING.md's topology (a WAN router, one router per
//! site with a LAN bridge, nodes behind it, a controller namespace on the
//! WAN), starts `weft-controller` and one `weft-agent` per node, and tears it
//! all down when dropped. Underlay addresses come from 198.18.0.0/15 only.

pub mod bins;
pub mod lab;
pub mod matrix;
pub mod nc;
pub mod netns;
pub mod process;
pub mod wan_delay;
pub mod wgnet;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use lab::{Lab, LabBuilder, LabState, NodeInfo, NodeRec, PingResult};
pub use matrix::Matrix;
pub use nix::sys::signal::Signal;

/// Whether we run as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For netns tests: returns true when the test must be skipped (not root
/// and `WEFT_SKIP_NETNS=1`, printing a loud SKIPPED line); panics when not
/// root otherwise, so CI (root) can never silently skip.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    if std::env::var("WEFT_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!(
            "\n*** SKIPPED {test}: not root and WEFT_SKIP_NETNS=1 (this test needs network namespaces) ***\n"
        );
        return true;
    }
    panic!(
        "{test} needs root (it builds network namespaces): run it as root, \
         e.g. `sudo -E cargo test -p weft-tests`, or set WEFT_SKIP_NETNS=1 to skip explicitly"
    );
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn try_wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
