//! Finding the Weft binaries: next to the running executable (for test
//! executables in `target/<profile>/deps/`, in `target/<profile>/`), or in
//! `$WEFT_BIN_DIR`.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Directory the binaries are taken from.
pub fn dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let Some(mut dir) = exe.parent().map(PathBuf::from) else {
        bail!("cannot tell the directory of {}", exe.display());
    };
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Full path of binary `name`, or an error saying how to build it.
pub fn path(name: &str) -> Result<PathBuf> {
    let dir = dir()?;
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{name} not found in {}: run `cargo build --workspace --bins` \
             (or point WEFT_BIN_DIR at a directory holding weft-controller, weft-agent and weftctl)",
            dir.display()
        );
    }
    Ok(p)
}

/// Fails unless all `names` exist.
pub fn require(names: &[&str]) -> Result<()> {
    for n in names {
        path(n)?;
    }
    Ok(())
}
