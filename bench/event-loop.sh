#!/usr/bin/env bash
# bench/event-loop.sh - how late the node daemons' event loops run during a
# resync under write load (a stall past the peer link's ping timeout, 500 ms,
# drops the link). Two node daemons on loopback addresses (alpha 127.0.0.2
# Primary, bravo 127.0.0.3), file disks under a temporary directory:
#
#   1. a volume of VOL_SIZE in pool pa on resource a; the peer is disconnected
#   2. while disconnected: DIRTY_SEQ of random data written sequentially
#      (nbdcopy: long runs) and DIRTY_RAND_IOS random 4 KiB writes (fio:
#      a fragmented bitmap), so the resync has both kinds of runs
#   3. fio writes to the volume on alpha (randwrite 4 KiB, queue depth 16,
#      unthrottled) while `resource connect` starts the resync; when it is
#      done, fio stops
#   4. each daemon's figures for that resync (`resource status --json`:
#      .peers[0].lastResync.eventLoop, from perf_hooks.monitorEventLoopDelay,
#      10 ms resolution taken off) and the worst 10 s window since it started
#      (.eventLoop.worstMaxMs: includes the handshake), link drops, stalls logged
#
# usage: bench/event-loop.sh [--runs N]
# env:   DISK_SIZE (8G) VOL_SIZE (6G) DIRTY_SEQ (2G) DIRTY_RAND_IOS (65536)
#        OUT (default /tmp/duet-bench-loop)
#        DAEMON_NODE_ARGS (e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof": node options of the daemons only)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2;;
    -h|--help) sed -n '2,22p' "$0"; exit 0;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
DISK_SIZE=${DISK_SIZE:-8G}
VOL_SIZE=${VOL_SIZE:-6G}
DIRTY_SEQ=${DIRTY_SEQ:-2G}
DIRTY_RAND_IOS=${DIRTY_RAND_IOS:-65536}
OUT=${OUT:-/tmp/duet-bench-loop}
for t in fio nbdinfo nbdcopy jq; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 3; }; done
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/duet-bench-loop.XXXXXX)
DUET="node $ROOT/bin/duet"
PIDS=()
stop_all() { local q; for q in "${PIDS[@]}"; do kill "$q" 2>/dev/null || true; done; for q in "${PIDS[@]}"; do wait "$q" 2>/dev/null || true; done; PIDS=(); }
cleanup() { stop_all; rm -rf "$WORK"; }
trap cleanup EXIT
A=127.0.0.2; B=127.0.0.3; EXPORT_PORT=21949; API_PORT=21950; LINK_PORT=21951

cluster() {
  stop_all
  rm -rf "$WORK/c"; mkdir -p "$WORK/c"
  truncate -s "$DISK_SIZE" "$WORK/c/alpha.img" "$WORK/c/bravo.img"
  echo "bench-secret-0123456789abcdef" > "$WORK/c/secret"
  cat > "$WORK/c/cluster.yaml" <<EOF
cluster: bench
secret: { file: secret }
nodes: { alpha: { address: $A }, bravo: { address: $B } }
resources:
  a: { protocol: C, port: $LINK_PORT, disk: { alpha: alpha.img, bravo: bravo.img }, prefer: alpha }
pools: { pa: { devices: [a] } }
exports: { port: $EXPORT_PORT }
api: { port: $API_PORT }
EOF
  for n in alpha bravo; do
    if $DUET resource --help 2>/dev/null | grep -q create-md; then $DUET --config "$WORK/c/cluster.yaml" --node $n resource create-md a >/dev/null 2>&1 || true; fi
    node ${DAEMON_NODE_ARGS:-} "$ROOT/bin/duet" --home "$WORK/c/home-$n" node run --config "$WORK/c/cluster.yaml" --node $n > "$WORK/c/$n.out" 2> "$WORK/c/$n.log" &
    PIDS+=($!)
  done
  wait_status alpha '.role == "Primary" and .disk == "UpToDate" and .peers[0].connection == "Connected" and .peers[0].disk == "UpToDate"' 120
}
st() { $DUET --config "$WORK/c/cluster.yaml" --node "$1" resource status a --json 2>/dev/null; }
wait_status() { # node jq-condition seconds
  local end=$((SECONDS + $3))
  while [ $SECONDS -lt $end ]; do
    st "$1" | jq -e ".resources[0] | $2" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "timed out waiting for $2 on $1" >&2; st "$1" >&2; return 1
}
duetc() { $DUET --config "$WORK/c/cluster.yaml" --node "$@"; }
URI=nbd://$A:$EXPORT_PORT/vol

one_run() { # index
  cluster
  duetc alpha vol create pa/vol --size "$VOL_SIZE" >/dev/null
  for _ in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
  duetc alpha resource disconnect a >/dev/null
  wait_status alpha '.peers[0].connection == "StandAlone"' 30
  head -c "$DIRTY_SEQ" /dev/urandom > "$WORK/seq.bin"
  nbdcopy --flush "$WORK/seq.bin" "$URI"
  rm -f "$WORK/seq.bin"
  fio --name=dirty --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 --number_ios="$DIRTY_RAND_IOS" --size="$VOL_SIZE" --randrepeat=0 --output-format=terse >/dev/null
  local dirty; dirty=$(st alpha | jq '.resources[0].outOfSyncBytes')
  local drops0; drops0=$(cat "$WORK"/c/*.log | grep -c '"event":"disconnected"' || true)
  fio --name=load --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 --time_based --runtime=600 --size="$VOL_SIZE" --randrepeat=0 --output-format=json --output="$WORK/load.json" >/dev/null 2>&1 &
  local fio_pid=$!
  sleep 2
  local t0; t0=$(date +%s.%N)
  duetc alpha resource connect a >/dev/null
  wait_status alpha '.outOfSyncBytes == 0 and .peers[0].connection == "Connected" and .peers[0].lastResync != null' 900
  local t1; t1=$(date +%s.%N)
  wait_status bravo '.disk == "UpToDate" and .peers[0].lastResync != null' 60
  kill -TERM $fio_pid 2>/dev/null || true
  wait $fio_pid 2>/dev/null || true
  local sa sb; sa=$(st alpha); sb=$(st bravo)
  local drops; drops=$(( $(cat "$WORK"/c/*.log | grep -c '"event":"disconnected"' || true) - drops0 ))
  local stalls; stalls=$(cat "$WORK"/c/*.log | grep -c '"event":"event-loop-stall"' || true)
  # fio writes "terminating on signal" into its output file before the JSON.
  local iops; iops=$(sed -n '/^{/,$p' "$WORK/load.json" | jq '.jobs[0].write.iops | floor' 2>/dev/null || echo '?')
  local line
  line=$(printf 'run=%s dirty_MiB=%s resync_s=%.1f rate_MBps=%s fio_iops=%s | alpha p99=%s max=%s worst10s=%s | bravo p99=%s max=%s worst10s=%s | link_drops=%s stall_logs=%s' \
    "$1" "$((dirty / 1048576))" "$(echo "$t1 - $t0" | bc)" \
    "$(echo "$sa" | jq '.resources[0].peers[0].lastResync.rateBytesPerSec / 1000000 | floor')" "$iops" \
    "$(echo "$sa" | jq '.resources[0].peers[0].lastResync.eventLoop.p99Ms')" "$(echo "$sa" | jq '.resources[0].peers[0].lastResync.eventLoop.maxMs')" "$(echo "$sa" | jq '.eventLoop.worstMaxMs')" \
    "$(echo "$sb" | jq '.resources[0].peers[0].lastResync.eventLoop.p99Ms')" "$(echo "$sb" | jq '.resources[0].peers[0].lastResync.eventLoop.maxMs')" "$(echo "$sb" | jq '.eventLoop.worstMaxMs')" \
    "$drops" "$stalls")
  echo "$line" | tee -a "$OUT/event-loop.txt"
  cp "$WORK/c/alpha.log" "$OUT/alpha-$1.log"; cp "$WORK/c/bravo.log" "$OUT/bravo-$1.log"
  stop_all
}

: > "$OUT/event-loop.txt"
for i in $(seq "$RUNS"); do one_run "$i"; done
