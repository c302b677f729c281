#!/usr/bin/env bash
# Runs Weft's fuzz targets (fuzz/, cargo-fuzz + libFuzzer) on the pinned
# stable toolchain (RUSTC_BOOTSTRAP=1 unlocks the sanitizer flags).
#
#   scripts/fuzz.sh                  every target for 600 s (10 min)
#   scripts/fuzz.sh -t 60 policy_yaml   one target for 60 s
#   scripts/fuzz.sh --smoke          every target for 15 s (CI)
#   scripts/fuzz.sh --list           the targets
#
# Each run starts from the seed corpus in fuzz/corpus/<target> (read-only)
# and first replays every input in fuzz/regressions/<target> (crashes found
# before, kept as regression tests). New inputs go to fuzz/target/work/; a
# crash is written to fuzz/artifacts/<target>/ and fails the run. The last
# line per target gives executions and time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"

SECONDS_PER_TARGET=600
declare -a TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -t|--time) SECONDS_PER_TARGET="$2"; shift 2 ;;
    --smoke) SECONDS_PER_TARGET=15; shift ;;
    --list) RUSTC_BOOTSTRAP=1 cargo fuzz list; exit 0 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz is missing: run scripts/setup.sh" >&2
  exit 1
fi
export RUSTC_BOOTSTRAP=1
if [ "${#TARGETS[@]}" -eq 0 ]; then
  mapfile -t TARGETS < <(cargo fuzz list)
  cargo fuzz build 2>&1 | tail -1
else
  for t in "${TARGETS[@]}"; do cargo fuzz build "$t" 2>&1 | tail -1; done
fi
declare -a SUMMARY=()
for t in "${TARGETS[@]}"; do
  work="$ROOT/fuzz/target/work/$t"
  seeds="$ROOT/fuzz/corpus/$t"
  mkdir -p "$work" "$seeds"
  if compgen -G "$ROOT/fuzz/regressions/$t/*" >/dev/null; then
    echo "== $t: replaying regressions"
    cargo fuzz run "$t" "$ROOT"/fuzz/regressions/"$t"/* -- -runs=1 2>&1 | tail -2
  fi
  echo "== $t: fuzzing for ${SECONDS_PER_TARGET}s"
  log="$ROOT/fuzz/target/$t.log"
  if ! cargo fuzz run "$t" "$work" "$seeds" -- \
      -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 -rss_limit_mb=4096 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz.sh: $t FAILED (crash input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  secs="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)"
  SUMMARY+=("$t: ${execs:-?} executions in ${secs:-?} s, 0 crashes")
  echo "${SUMMARY[-1]}"
done
echo "== fuzz summary"
printf '  %s\n' "${SUMMARY[@]}"
