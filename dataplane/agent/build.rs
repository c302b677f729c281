//! Builds ebpf/programs for the BPF target and leaves the object in
//! `$OUT_DIR/weft-overlay`, which `src/bpf.rs` embeds.
//!
//! Stable Rust: the nested build runs on this crate's own toolchain (pinned
//! in rust-toolchain.toml) with `RUSTC_BOOTSTRAP=1`, which makes aya-build
//! pass `-Z build-std=core`; it links with bpf-linker built against rustc's
//! own LLVM (scripts/setup-ebpf.sh).

use std::env;
use std::io;
use std::path::PathBuf;

use aya_build::{Package, Toolchain};

/// Package name in ebpf/programs/Cargo.toml.
const PROGRAMS_PACKAGE: &str = "weft-ebpf-programs";

fn main() -> aya_build::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../../ebpf").canonicalize()?;
    let programs_dir = ebpf_dir.join("programs");
    // aya-build watches the programs' folder; their shared types live here.
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("common").display()
    );
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");

    // Set by rustup's cargo proxy to the toolchain rust-toolchain.toml pins.
    // aya-build's default is `nightly`, which we do not use.
    let toolchain = env::var("RUSTUP_TOOLCHAIN").map_err(|_| {
        io::Error::other("RUSTUP_TOOLCHAIN is not set: build through rustup's cargo")
    })?;
    if !on_path("bpf-linker") {
        return Err(io::Error::other(
            "bpf-linker not found on PATH: run scripts/setup-ebpf.sh (builds it against rustc's LLVM)",
        )
        .into());
    }
    // SAFETY: the build script is single-threaded here: no other thread
    // reads or writes the environment concurrently.
    #[allow(unsafe_code)]
    unsafe {
        if env::var_os("RUSTC_BOOTSTRAP").is_none() {
            env::set_var("RUSTC_BOOTSTRAP", "1");
        }
        // aya-build turns every line the nested cargo prints on stderr into
        // a cargo warning; its "Compiling .." progress is only noise.
        // Errors still come through.
        env::set_var("CARGO_TERM_QUIET", "true");
    }
    // aya-build runs `cargo build --package ..` in the current directory;
    // ebpf/programs is a workspace of its own (excluded from the root one).
    env::set_current_dir(&programs_dir)?;
    let root_dir = programs_dir
        .to_str()
        .ok_or_else(|| io::Error::other("ebpf/programs path is not UTF-8"))?;
    aya_build::build_ebpf(
        [Package {
            name: PROGRAMS_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
