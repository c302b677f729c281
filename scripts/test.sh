#!/usr/bin/env bash
# The full check CI runs (as root): setup, fmt, clippy, build, all tests
# including the netns end-to-end tests in tests/tests/.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: must run as root (the end-to-end tests build network namespaces)" >&2
  exit 1
fi
if [ "${CI:-}" = "1" ] || [ "${CI:-}" = "true" ]; then
  if [ -n "${WEFT_SKIP_NETNS:-}" ]; then
    echo "test.sh: WEFT_SKIP_NETNS is set under CI: refusing (CI must run the netns tests)" >&2
    exit 1
  fi
fi

declare -a NAMES=() RESULTS=()
FAILED=0
step() {
  local name="$1"
  shift
  echo
  echo "===== $name: $*"
  local t0=$SECONDS
  if "$@"; then
    RESULTS+=("ok    $name ($((SECONDS - t0))s)")
  else
    RESULTS+=("FAIL  $name ($((SECONDS - t0))s)")
    FAILED=1
  fi
  NAMES+=("$name")
}

summary() {
  echo
  echo "===== summary"
  for r in "${RESULTS[@]}"; do echo "  $r"; done
  if [ "$FAILED" -eq 0 ]; then echo "ALL PASSED"; else echo "FAILED"; fi
}

step setup "$ROOT/scripts/setup.sh" || true
if [ "$FAILED" -ne 0 ]; then summary; exit 1; fi
step fmt cargo fmt --all --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
step build cargo build --workspace --bins
if [ "$FAILED" -ne 0 ]; then summary; exit 1; fi
step test cargo test --workspace --no-fail-fast -- --test-threads=1
# A short pass over every fuzz target (seed corpus, regressions, 15 s of
# new inputs each); scripts/fuzz.sh without --smoke runs them 10 min each.
step fuzz-smoke "$ROOT/scripts/fuzz.sh" --smoke
summary
exit "$FAILED"
