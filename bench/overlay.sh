#!/usr/bin/env bash
# bench/overlay.sh - Weft's userspace WireGuard tunnel against boringtun-cli
# and wireguard-go, measured in the same run between two network namespaces
# joined by a veth pair; optionally also a null relay (a tunnel without
# cryptography), the floor of any TUN + UDP userspace design. Prints a
# markdown table on stdout.
#
#   bench/overlay.sh [options]
#
#   --impls LIST     comma-separated, in this order of measurement
#                    [weft,boringtun,boringtun-t1,wireguard-go]
#                    weft          `weft-agent wg IF` (built in release if needed;
#                                  polls 200 µs after each packet, its default)
#                    boringtun     boringtun-cli, default threads
#                    boringtun-t1  boringtun-cli --threads 1
#                    wireguard-go  wireguard-go
#                    not measured unless asked for:
#                    weft-sleep    `weft-agent wg IF --busy-poll=off`:
#                                  sleeps as soon as nothing is readable
#                    weft-spin     `weft-agent wg IF --busy-poll`: never
#                                  sleeps (a CPU per end, idle or not)
#                    null-relay       `weft bench null-relay`: no crypto, one
#                                     thread, a packet per datagram, sleeps
#                                     in poll(2) (built in release if needed)
#                    null-relay-spin  the same with --busy-poll: spins on
#                                     non-blocking reads and sched_yield(2),
#                                     never sleeps (one CPU per end while it
#                                     runs, idle or not)
#   --duration S     iperf3 seconds per run, 1..30 [5]
#   --runs N         iperf3 runs per test, the median is reported [1]
#   --streams P      streams of the multi-stream test [4]
#   --pings N        pings per RTT measurement, 10 ms apart [200]
#   --mtu M          overlay MTU [1420]
#   --perf DIR       also record `perf record -g` of the weft daemons during
#                    one extra single-stream run; reports go to DIR
#   --keep-logs DIR  keep daemon logs and iperf3 JSON in DIR
#
#   Environment: WEFT_AGENT_BIN, BORINGTUN_BIN, WIREGUARD_GO_BIN, WEFT_BIN
#   (the `weft` tool of weft-tests) override the binaries; CARGO (default
#   cargo) builds weft-agent and weft. `scripts/setup.sh bench` installs
#   everything (boringtun-cli 0.7.1 from crates.io, perf).
#
# Columns: TCP throughput (iperf3, receiver side, Gbit/s) with 1 and P
# streams; RTT p50/p99 of pings over the overlay (and, in the first row,
# over the bare veth); CPU seconds the two tunnel processes spent (utime +
# stime from /proc, both ends together) per GB delivered, over the TCP runs;
# CPU of both tunnel processes over 2 s without traffic, 0.5 s after the
# pings, in % of one CPU.
# The × after Weft's throughput is against the best of the other WireGuard
# implementations in the same run (null relays excluded).
#
# Network: namespaces wbn<PID>a/b, veth, underlay 198.18.0.1/30 <->
# 198.18.0.2/30, overlay 100.64.0.1/32 <-> 100.64.0.2/32; no default route.
# Each implementation gets its own interface names (the UAPI socket
# directory /var/run/wireguard is shared by all namespaces). Null relays use
# UDP port 51820 too, with no keys and no UAPI socket. Everything is
# removed on exit; only processes this script started are stopped, by PID.

set -Eeuo pipefail
umask 077

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

IMPLS=weft,boringtun,boringtun-t1,wireguard-go
DURATION=5; RUNS=1; STREAMS=4; PINGS=200; MTU=1420; PERF_DIR=""; KEEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --impls) IMPLS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --streams) STREAMS=$2; shift 2 ;;
    --pings) PINGS=$2; shift 2 ;;
    --mtu) MTU=$2; shift 2 ;;
    --perf) PERF_DIR=$2; shift 2 ;;
    --keep-logs) KEEP=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done
[[ "$DURATION" =~ ^[0-9]+$ ]] && [ "$DURATION" -ge 1 ] && [ "$DURATION" -le 30 ] || { echo "--duration: 1..30" >&2; exit 2; }
[[ "$RUNS" =~ ^[1-9][0-9]?$ ]] || { echo "--runs: 1..99" >&2; exit 2; }
[[ "$STREAMS" =~ ^[1-9][0-9]?$ ]] || { echo "--streams: 1..99" >&2; exit 2; }
[[ "$PINGS" =~ ^[1-9][0-9]*$ ]] && [ "$PINGS" -le 2000 ] || { echo "--pings: 1..2000" >&2; exit 2; }
[[ "$MTU" =~ ^[0-9]+$ ]] && [ "$MTU" -ge 1280 ] && [ "$MTU" -le 1440 ] || { echo "--mtu: 1280..1440" >&2; exit 2; }

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { echo "bench/overlay.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
for c in ip iperf3 ping wg jq awk; do
  command -v "$c" >/dev/null || die "$c not found: run scripts/setup.sh"
done

TAG=$$
NS_A="wbn${TAG}a"; NS_B="wbn${TAG}b"
U_A=198.18.0.1; U_B=198.18.0.2
O_A=100.64.0.1; O_B=100.64.0.2
PORT=51820
SOCK_DIR=/var/run/wireguard
HZ=$(getconf CLK_TCK)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-bench.XXXXXX")
PIDS=()          # "pid:starttime" of everything we started

pid_start() { awk '{sub(/^.*\) /,""); print $20}' "/proc/$1/stat" 2>/dev/null || true; }
track() { PIDS+=("$1:$(pid_start "$1")"); }
stop_pid() { # pid:starttime -> TERM, up to 3 s, then KILL; only if still ours
  local p=${1%%:*} st=${1#*:} i
  [ -n "$st" ] && [ "$(pid_start "$p")" = "$st" ] || return 0
  kill -TERM "$p" 2>/dev/null || return 0
  for i in $(seq 30); do [ "$(pid_start "$p")" = "$st" ] || return 0; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
}
stop_all() {
  local e
  for e in "${PIDS[@]}"; do stop_pid "$e"; done
  PIDS=()
  wait 2>/dev/null || true
}
cleanup() {
  set +e
  trap - ERR
  stop_all
  for ns in "$NS_A" "$NS_B"; do ip netns del "$ns" 2>/dev/null; done
  if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ---------------------------------------------------------------- binaries
bin_for() {
  case "$1" in
    weft|weft-sleep|weft-spin)
      if [ -n "${WEFT_AGENT_BIN:-}" ]; then echo "$WEFT_AGENT_BIN"; return; fi
      local target=${CARGO_TARGET_DIR:-$ROOT/target}
      log "building weft-agent (release)"
      (cd "$ROOT" && ${CARGO:-cargo} build --release -q -p weft-agent) >&2 || die "cargo build failed"
      echo "$target/release/weft-agent" ;;
    boringtun|boringtun-t1)
      local b=${BORINGTUN_BIN:-$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")}
      [ -x "$b" ] || die "boringtun-cli not found: scripts/setup.sh bench"
      echo "$b" ;;
    wireguard-go)
      local b=${WIREGUARD_GO_BIN:-$(command -v wireguard-go || true)}
      [ -n "$b" ] && [ -x "$b" ] || die "wireguard-go not found: run scripts/setup.sh"
      echo "$b" ;;
    null-relay|null-relay-spin)
      if [ -n "${WEFT_BIN:-}" ]; then echo "$WEFT_BIN"; return; fi
      local target=${CARGO_TARGET_DIR:-$ROOT/target}
      log "building weft (weft-tests, release)"
      (cd "$ROOT" && ${CARGO:-cargo} build --release -q -p weft-tests --bin weft) >&2 || die "cargo build failed"
      echo "$target/release/weft" ;;
    *) die "unknown implementation $1" ;;
  esac
}
declare -A BIN
IFS=, read -r -a IMPL_LIST <<<"$IMPLS"
for impl in "${IMPL_LIST[@]}"; do BIN[$impl]=$(bin_for "$impl"); done

# ---------------------------------------------------------------- underlay
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add "wbv${TAG}a" netns "$NS_A" type veth peer name "wbv${TAG}b" netns "$NS_B"
for s in a b; do
  ns="wbn${TAG}$s"; [ $s = a ] && addr=$U_A || addr=$U_B
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$addr/30" dev "wbv${TAG}$s"
  ip -n "$ns" link set "wbv${TAG}$s" up
done
for i in $(seq 50); do nsx "$NS_A" ping -c1 -W1 -q "$U_B" >/dev/null 2>&1 && break; sleep 0.1; done

wg genkey >"$WORK/a.key"; wg pubkey <"$WORK/a.key" >"$WORK/a.pub"
wg genkey >"$WORK/b.key"; wg pubkey <"$WORK/b.key" >"$WORK/b.pub"

# ---------------------------------------------------------------- helpers
cpu_ticks() { # utime+stime of the given PIDs, in clock ticks
  local t=0 p v
  for p in "$@"; do
    v=$(awk '{sub(/^.*\) /,""); print $12+$13}' "/proc/$p/stat" 2>/dev/null || echo 0)
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{if(NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# rtt NS DST -> "p50 p99" in ms
rtt() {
  local out
  out=$(timeout $((PINGS / 50 + 20)) ip netns exec "$1" ping -n -c "$PINGS" -i 0.01 -W 1 "$2" 2>/dev/null | grep -o 'time=[0-9.]*' | cut -d= -f2 | sort -g || true)
  [ -n "$out" ] || { echo "- -"; return; }
  awk '{a[NR]=$1} END{i50=int(0.5*NR+0.999); i99=int(0.99*NR+0.999); printf "%.3f %.3f\n", a[i50], a[i99]}' <<<"$out"
}

# iperf NS DST STREAMS LABEL PIDS... -> "gbps bytes cpu_ticks"
iperf() {
  local ns=$1 dst=$2 streams=$3 label=$4; shift 4
  local j="$WORK/iperf-$label-$streams.json" c0 c1
  c0=$(cpu_ticks "$@")
  timeout $((DURATION + 30)) ip netns exec "$ns" iperf3 -c "$dst" -t "$DURATION" -P "$streams" -J >"$j" 2>&1 \
    || { log "iperf3 $label failed: $(jq -r '.error // empty' "$j" 2>/dev/null)"; echo "0 0 0"; return; }
  c1=$(cpu_ticks "$@")
  echo "$(jq -r '.end.sum_received.bits_per_second / 1e9' "$j") $(jq -r '.end.sum_received.bytes' "$j") $((c1 - c0))"
}

is_weft() { case "$1" in weft|weft-sleep|weft-spin) return 0 ;; *) return 1 ;; esac; }
is_null_relay() { case "$1" in null-relay|null-relay-spin) return 0 ;; *) return 1 ;; esac; }

start_daemon() { # impl ns ifname -> sets DAEMON_PID (no subshell: PIDS must see it)
  local impl=$1 ns=$2 ifn=$3 lf="$WORK/$3.log" me=$U_A peer=$U_B
  [ "$ns" = "$NS_A" ] || { me=$U_B; peer=$U_A; }
  case "$impl" in
    weft|weft-sleep|weft-spin)
      # WEFT_BUSY_POLL unset: the weft row measures the default.
      local poll=()
      case "$impl" in weft-sleep) poll=(--busy-poll=off) ;; weft-spin) poll=(--busy-poll) ;; esac
      ip netns exec "$ns" env -u WEFT_BUSY_POLL RUST_LOG=warn "${BIN[$impl]}" wg "${poll[@]}" "$ifn" >"$lf" 2>&1 & ;;
    boringtun) ip netns exec "$ns" "${BIN[$impl]}" --foreground --disable-drop-privileges --verbosity error "$ifn" >"$lf" 2>&1 & ;;
    boringtun-t1) ip netns exec "$ns" "${BIN[$impl]}" --foreground --disable-drop-privileges --threads 1 --verbosity error "$ifn" >"$lf" 2>&1 & ;;
    wireguard-go) ip netns exec "$ns" env WG_PROCESS_FOREGROUND=1 "${BIN[$impl]}" -f "$ifn" >"$lf" 2>&1 & ;;
    null-relay) ip netns exec "$ns" "${BIN[$impl]}" bench null-relay --tun "$ifn" --listen "$me:$PORT" --peer "$peer:$PORT" >"$lf" 2>&1 & ;;
    null-relay-spin) ip netns exec "$ns" "${BIN[$impl]}" bench null-relay --busy-poll --tun "$ifn" --listen "$me:$PORT" --peer "$peer:$PORT" >"$lf" 2>&1 & ;;
  esac
  DAEMON_PID=$!
  track "$DAEMON_PID"
}

wait_ready() { # impl ns ifname pid
  local impl=$1 i; shift
  for i in $(seq 100); do
    ip -n "$1" link show "$2" >/dev/null 2>&1 && { is_null_relay "$impl" || [ -S "$SOCK_DIR/$2.sock" ]; } && return 0
    kill -0 "$3" 2>/dev/null || die "daemon for $2 exited: $(tail -n 5 "$WORK/$2.log")"
    sleep 0.1
  done
  die "interface $2 (or its UAPI socket) did not appear within 10 s"
}

# ---------------------------------------------------------------- measure
ROWS=()
UL_RTT=$(rtt "$NS_A" "$U_B")
log "underlay RTT p50/p99: $UL_RTT ms"
ip netns exec "$NS_B" iperf3 -s >"$WORK/iperf-server-underlay.log" 2>&1 &
track $!
for i in $(seq 50); do nsx "$NS_B" ss -Hltn 'sport = :5201' | grep -q . && break; sleep 0.1; done
read -r UL_G1 _ _ < <(iperf "$NS_A" "$U_B" 1 underlay)
read -r UL_G4 _ _ < <(iperf "$NS_A" "$U_B" "$STREAMS" underlay)
stop_all
log "underlay: 1 stream $UL_G1 Gbit/s, $STREAMS streams $UL_G4 Gbit/s"

n=0
for impl in "${IMPL_LIST[@]}"; do
  n=$((n + 1))
  IF_A="wb${TAG}${n}a"; IF_B="wb${TAG}${n}b"
  [ ${#IF_A} -le 15 ] || die "interface name $IF_A too long"
  log "$impl: starting"
  start_daemon "$impl" "$NS_A" "$IF_A"; pa=$DAEMON_PID
  start_daemon "$impl" "$NS_B" "$IF_B"; pb=$DAEMON_PID
  wait_ready "$impl" "$NS_A" "$IF_A" "$pa"; wait_ready "$impl" "$NS_B" "$IF_B" "$pb"
  if ! is_null_relay "$impl"; then
    nsx "$NS_A" wg set "$IF_A" listen-port $PORT private-key "$WORK/a.key" \
      peer "$(cat "$WORK/b.pub")" endpoint "$U_B:$PORT" allowed-ips "$O_B/32"
    nsx "$NS_B" wg set "$IF_B" listen-port $PORT private-key "$WORK/b.key" \
      peer "$(cat "$WORK/a.pub")" endpoint "$U_A:$PORT" allowed-ips "$O_A/32"
  fi
  for s in A B; do
    eval ns=\$NS_$s ifn=\$IF_$s
    if [ $s = A ]; then me=$O_A; peer=$O_B; else me=$O_B; peer=$O_A; fi
    ip -n "$ns" link set "$ifn" mtu "$MTU"
    ip -n "$ns" addr add "$me/32" dev "$ifn"
    ip -n "$ns" link set "$ifn" up
    ip -n "$ns" route add "$peer/32" dev "$ifn"
  done
  ok=0
  for i in $(seq 20); do nsx "$NS_A" ping -c1 -W1 -q "$O_B" >/dev/null 2>&1 && { ok=1; break; }; done
  [ $ok = 1 ] || die "$impl: no ping through the tunnel within 20 s (logs in $WORK)"

  ip netns exec "$NS_B" iperf3 -s >"$WORK/iperf-server-$impl.log" 2>&1 &
  IPERF_SRV=$!; track "$IPERF_SRV"
  for i in $(seq 50); do nsx "$NS_B" ss -Hltn 'sport = :5201' | grep -q . && break; sleep 0.1; done

  declare -a g1=() g4=()
  bytes=0; ticks=0
  for r in $(seq "$RUNS"); do
    read -r g b t < <(iperf "$NS_A" "$O_B" 1 "$impl-$r" "$pa" "$pb"); g1+=("$g"); bytes=$((bytes + b)); ticks=$((ticks + t))
    read -r g b t < <(iperf "$NS_A" "$O_B" "$STREAMS" "$impl-$r" "$pa" "$pb"); g4+=("$g"); bytes=$((bytes + b)); ticks=$((ticks + t))
  done
  if [ -n "$PERF_DIR" ] && [ "$impl" = weft ] && command -v perf >/dev/null; then
    mkdir -p "$PERF_DIR"
    timeout $((DURATION + 30)) ip netns exec "$NS_A" iperf3 -c "$O_B" -t "$DURATION" -J >/dev/null 2>&1 &
    pc=$!; track "$pc"
    sleep 0.5
    perf record -g -o "$PERF_DIR/perf-sender.data" -p "$pa" -- sleep $((DURATION > 2 ? DURATION - 1 : 1)) >/dev/null 2>&1 &
    p1=$!; track "$p1"
    perf record -g -o "$PERF_DIR/perf-receiver.data" -p "$pb" -- sleep $((DURATION > 2 ? DURATION - 1 : 1)) >/dev/null 2>&1 &
    p2=$!; track "$p2"
    wait "$p1" "$p2" "$pc" 2>/dev/null || true
    for side in sender receiver; do
      perf report -i "$PERF_DIR/perf-$side.data" --no-children --sort sym --stdio -g none 2>/dev/null \
        | awk '!/^#/ && NF && n++ < 40' >"$PERF_DIR/perf-$side.txt" || true
    done
    log "perf reports in $PERF_DIR"
  fi
  read -r p50 p99 < <(rtt "$NS_A" "$O_B")
  # CPU of an idle tunnel: after the pings, past any polling linger time.
  sleep 0.5
  c0=$(cpu_ticks "$pa" "$pb"); sleep 2; c1=$(cpu_ticks "$pa" "$pb")
  idle=$(awk -v t=$((c1 - c0)) -v hz="$HZ" 'BEGIN{ printf "%.0f", 100 * t / hz / 2 }')
  gb1=$(median "${g1[@]}"); gb4=$(median "${g4[@]}")
  cpu=$(awk -v t="$ticks" -v hz="$HZ" -v b="$bytes" 'BEGIN{ if (b > 0) printf "%.2f", (t / hz) / (b / 1e9); else print "-" }')
  log "$impl: 1 stream $gb1 Gbit/s, $STREAMS streams $gb4 Gbit/s, RTT p50/p99 $p50/$p99 ms, $cpu CPU s/GB, idle CPU $idle %"
  ROWS+=("$impl|$gb1|$gb4|$p50|$p99|$cpu|$idle")

  stop_all
  ip -n "$NS_A" link del "$IF_A" 2>/dev/null || true
  ip -n "$NS_B" link del "$IF_B" 2>/dev/null || true
  rm -f "$SOCK_DIR/$IF_A.sock" "$SOCK_DIR/$IF_B.sock"
done

# ---------------------------------------------------------------- table
read -r ul50 ul99 <<<"$UL_RTT"
best=$(for r in "${ROWS[@]}"; do IFS='|' read -r i g1 _ _ _ _ _ <<<"$r"; is_weft "$i" || is_null_relay "$i" || echo "$g1"; done | sort -g | tail -n1)
best4=$(for r in "${ROWS[@]}"; do IFS='|' read -r i _ g4 _ _ _ _ <<<"$r"; is_weft "$i" || is_null_relay "$i" || echo "$g4"; done | sort -g | tail -n1)
echo
echo "$(date -u +%Y-%m-%d), $(nproc) vCPU, kernel $(uname -r), overlay MTU $MTU, iperf3 ${DURATION} s × $RUNS run(s) per test (median), $PINGS pings"
echo
echo "| implementation | TCP 1 stream Gbit/s | TCP $STREAMS streams Gbit/s | RTT p50 ms | RTT p99 ms | CPU s/GB (both ends) | idle CPU % (both ends) |"
echo "|---|---|---|---|---|---|---|"
printf '| underlay (veth, no tunnel) | %.2f | %.2f | %s | %s | – | – |\n' "$UL_G1" "$UL_G4" "$ul50" "$ul99"
for r in "${ROWS[@]}"; do
  IFS='|' read -r i g1 g4 p50 p99 cpu idle <<<"$r"
  name=$i
  case "$i" in
    weft) name="weft-agent wg" ;;
    weft-sleep) name="weft-agent wg --busy-poll=off" ;;
    weft-spin) name="weft-agent wg --busy-poll" ;;
    boringtun) name="boringtun-cli (default threads)" ;;
    boringtun-t1) name="boringtun-cli --threads 1" ;;
    null-relay) name="null relay (no crypto, poll(2))" ;;
    null-relay-spin) name="null relay (no crypto, busy poll)" ;;
  esac
  if is_weft "$i" && [ -n "$best" ]; then
    g1=$(awk -v a="$g1" -v b="$best" 'BEGIN{ printf "%.2f (%.1f×)", a, (b > 0 ? a / b : 0) }')
    g4=$(awk -v a="$g4" -v b="$best4" 'BEGIN{ printf "%.2f (%.1f×)", a, (b > 0 ? a / b : 0) }')
  else
    g1=$(printf '%.2f' "$g1"); g4=$(printf '%.2f' "$g4")
  fi
  echo "| $name | $g1 | $g4 | $p50 | $p99 | $cpu | $idle |"
done
