#!/usr/bin/env bash
# Prepares a fresh Debian 12 root machine (with rustup) to build and test Weft.
# Idempotent: installs only what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Debian packages the tests and the lab use (TESTING.md).
PACKAGES=(
  iproute2 iputils-ping iperf3 netcat-openbsd nftables iptables tcpdump
  ethtool bpftool wireguard-tools wireguard-go jq procps
)

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "Debian packages: all present"
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    die "missing packages (${missing[*]}) and not root: run as root or install them"
  fi
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y --no-install-recommends "${missing[@]}"
}

install_rust() {
  command -v rustup >/dev/null 2>&1 || die "rustup not found: install it from https://rustup.rs first"
  local channel
  channel="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")"
  [ -n "$channel" ] || die "cannot read the toolchain channel from rust-toolchain.toml"
  if rustup toolchain list | grep -q "^$channel"; then
    log "Rust toolchain $channel: present"
  else
    log "installing Rust toolchain $channel"
    rustup toolchain install "$channel" --profile minimal
  fi
  local have
  have="$(rustup component list --toolchain "$channel" --installed 2>/dev/null || true)"
  local want=()
  for c in rust-src rustfmt clippy; do
    grep -q "^$c" <<<"$have" || want+=("$c")
  done
  if [ "${#want[@]}" -eq 0 ]; then
    log "Rust components rust-src rustfmt clippy: present"
  else
    log "adding Rust components: ${want[*]}"
    rustup component add --toolchain "$channel" "${want[@]}"
  fi
}

# eBPF toolchain: bpf-linker built against rustc's own LLVM (see setup-ebpf.sh).
install_ebpf_toolchain() {
  "$ROOT/scripts/setup-ebpf.sh"
}

# bench/overlay.sh compares the tunnel with boringtun-cli (built from
# crates.io) and wireguard-go; `--perf` uses perf. Only with `setup.sh bench`.
install_bench_tools() {
  PACKAGES=(linux-perf)
  install_packages
  local bt="${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli"
  if [ -x "$bt" ] && "$bt" --version 2>/dev/null | grep -q '0\.7\.1'; then
    log "boringtun-cli 0.7.1: present"
  else
    log "installing boringtun-cli 0.7.1"
    cargo install boringtun-cli --version 0.7.1 --locked
  fi
}

# Fuzzing (scripts/fuzz.sh, CI's smoke pass): cargo-fuzz from crates.io.
install_fuzz_tools() {
  if cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0\.13'; then
    log "cargo-fuzz: present"
  else
    log "installing cargo-fuzz 0.13"
    cargo install cargo-fuzz --version '^0.13' --locked
  fi
}

install_packages
install_rust
install_ebpf_toolchain
install_fuzz_tools
if [ "${1:-}" = bench ]; then
  install_bench_tools
fi
log "done"
