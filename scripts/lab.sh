#!/usr/bin/env bash
# Builds Weft (release) and manages the persistent netns lab:
#   scripts/lab.sh [up|down|status|clean] [flags]   (default: up)
# `up --force` rebuilds an existing lab. Needs root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
  echo "lab.sh: the lab creates network namespaces and must run as root" >&2
  exit 1
fi
if [ "$#" -eq 0 ]; then
  set -- up
fi

"$ROOT/scripts/setup.sh"
cargo build --release --workspace --bins
exec "$ROOT/target/release/weft" lab "$@"
