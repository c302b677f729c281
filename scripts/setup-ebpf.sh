#!/usr/bin/env bash
# Installs what building Weft's eBPF programs needs, on STABLE Rust (no nightly,
# no clang, no system LLVM):
#   1. the rust-src component of the pinned toolchain (for `-Z build-std=core`);
#   2. bpf-linker, built against rustc's OWN libLLVM from the rustup sysroot, so
#      it reads exactly the LLVM bitcode rustc writes (Debian's LLVM is older).
#
# Idempotent: skips bpf-linker when the installed one already has the wanted
# version and links this rustc's libLLVM. Rerun after changing the toolchain.
# Needs rustup, a C linker (cc) and access to crates.io.
#
#   scripts/setup-ebpf.sh
#
# Env knobs: BPF_LINKER_VERSION (default 0.13.0, pairs with aya 0.14),
#            WEFT_RUSTC_LLVM_PREFIX (where the libLLVM symlink prefix lives).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BPF_LINKER_VERSION="${BPF_LINKER_VERSION:-0.13.0}"

log() { printf '[setup-ebpf] %s\n' "$*"; }
die() { printf '[setup-ebpf] ERROR: %s\n' "$*" >&2; exit 1; }

command -v rustup >/dev/null 2>&1 || die "rustup not found: install it from https://rustup.rs first"
command -v cc >/dev/null 2>&1 || die "no C linker (cc): apt-get install gcc libc6-dev"

# rust-toolchain.toml selects the toolchain only for commands run inside the repo.
cd "$ROOT"
channel="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)"
[ -n "$channel" ] || die "cannot read the toolchain channel from rust-toolchain.toml"

if rustup component list --toolchain "$channel" --installed 2>/dev/null | grep -q '^rust-src'; then
  log "rust-src for $channel: present"
else
  log "adding rust-src to $channel"
  rustup component add --toolchain "$channel" rust-src
fi

sysroot="$(rustc +"$channel" --print sysroot)"
llvm_major="$(rustc +"$channel" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
shopt -s nullglob
libs=("$sysroot"/lib/libLLVM.so.*)
shopt -u nullglob
[ "${#libs[@]}" -eq 1 ] || die "expected one libLLVM.so.* in $sysroot/lib, found: ${libs[*]:-none}"
libllvm="${libs[0]}"
soname="$(basename "$libllvm")" # e.g. libLLVM.so.22.1-rust-1.95.0-stable (file name == SONAME)

case "$llvm_major" in
  21 | 22 | 23) ;;
  *) die "bpf-linker $BPF_LINKER_VERSION supports LLVM 21-23; rustc $channel uses LLVM ${llvm_major:-unknown}" ;;
esac

# Is the installed bpf-linker the wanted version, loading this very libLLVM?
bpf_linker_ok() {
  local bin
  bin="$(command -v bpf-linker 2>/dev/null)" || return 1
  "$bin" --version 2>/dev/null | grep -qw "$BPF_LINKER_VERSION" || return 1
  local linked
  linked="$(ldd "$bin" 2>/dev/null | sed -n 's/^[[:space:]]*libLLVM[^ ]* => \([^ ]*\).*/\1/p' | head -n1)"
  [ -n "$linked" ] && [ "$(readlink -f "$linked")" = "$(readlink -f "$libllvm")" ]
}

if bpf_linker_ok; then
  log "bpf-linker $BPF_LINKER_VERSION linked against $soname: present"
  exit 0
fi

# bpf-linker's build script links `-lLLVM` from $LLVM_PREFIX/lib and sets an
# rpath there, so the prefix must outlive the install: keep it per soname.
prefix="${WEFT_RUSTC_LLVM_PREFIX:-${XDG_DATA_HOME:-$HOME/.local/share}/weft/rustc-llvm/$soname}"
mkdir -p "$prefix/lib"
ln -sfn "$libllvm" "$prefix/lib/libLLVM.so" # link time: -lLLVM
ln -sfn "$libllvm" "$prefix/lib/$soname"    # run time: DT_NEEDED soname via RUNPATH

log "building bpf-linker $BPF_LINKER_VERSION against rustc's LLVM $llvm_major ($libllvm)"
LLVM_PREFIX="$prefix" cargo +"$channel" install "bpf-linker@$BPF_LINKER_VERSION" --locked --force \
  --no-default-features --features "llvm-$llvm_major"

bpf_linker_ok || die "bpf-linker installed but does not run against $libllvm (check: ldd \$(command -v bpf-linker))"
log "bpf-linker: $(bpf-linker --version)"
