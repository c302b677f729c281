#!/usr/bin/env bash
# Policy overhead benchmark: overlay TCP throughput a1 -> b1 with no policy,
# with 10,000 rules in Weft's eBPF policy, and with the same rules in
# nftables on the receiver (the anchor), in a lab of network namespaces.
#   scripts/bench-policy.sh [weft bench policy flags]   (e.g. --rounds 5)
# Installs what it needs (scripts/setup.sh), builds the release binaries,
# and prints a markdown table. Needs root; removes its lab when done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-policy.sh: the benchmark creates network namespaces and must run as root" >&2
  exit 1
fi

"$ROOT/scripts/setup.sh"
cargo build --release --workspace --bins
exec "$ROOT/target/release/weft" bench policy "$@"
