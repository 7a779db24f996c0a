#!/usr/bin/env bash
# bench/replication.sh - a replicated volume (two node daemons on loopback
# addresses, peer on this same machine) against the same volume unreplicated,
# same client (fio ioengine=nbd via shared/bench/nbd-bench.sh), same patterns
# as bench/run.sh; then resync time and rate, and peer-death detection.
#
#   volume       duet serve --pool: a 1 GiB volume on a plain file pool (no replication)
#   standalone   the cluster's volume with the peer disconnected (bitmap tracking only)
#   proto-A/B/C  the cluster's volume, peer connected, protocol A, B, C
#   resync       10M / 100M / 1G dirty on a 4 GiB device: time, rate, bytes sent;
#                and 100M with resync-rate 50M (achieved vs configured)
#   detect       time from SIGSTOP / SIGKILL of the peer to "lost" in the Primary's log
#
# usage: bench/replication.sh [--quick] [--patterns LIST] [--only volume,standalone,A,B,C,resync,detect]
# env:   OUT (default /tmp/duet-bench-repl), BENCH_DIR as in run.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
[ -x "$BENCH_DIR/nbd-bench.sh" ] || BENCH_DIR=/work/shared/bench
NBD_BENCH="$BENCH_DIR/nbd-bench.sh"
PATTERNS="seqread_1M_qd8,seqwrite_1M_qd8,randread_4k_qd1,randread_4k_qd32,randwrite_4k_qd1,randwrite_4k_qd32"
ONLY="volume,standalone,A,B,C,resync,detect"
OUT=${OUT:-/tmp/duet-bench-repl}
OPTS=(--repeat 2 --runtime 10 --ramp 2)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) OPTS=(--repeat 1 --runtime 5 --ramp 1); shift;;
    --patterns) PATTERNS="$2"; shift 2;;
    --only) ONLY="$2"; shift 2;;
    -h|--help) sed -n '2,16p' "$0"; exit 0;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
for t in fio nbdinfo nbdcopy jq qemu-io; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 3; }; done
rm -rf "$OUT"; mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/duet-bench-repl.XXXXXX)
DUET="node $ROOT/bin/duet"
PIDS=()
stop_all() { local q; for q in "${PIDS[@]}"; do kill -CONT "$q" 2>/dev/null || true; kill "$q" 2>/dev/null || true; done; for q in "${PIDS[@]}"; do wait "$q" 2>/dev/null || true; done; PIDS=(); }
cleanup() { stop_all; rm -rf "$WORK"; }
trap cleanup EXIT
A=127.0.0.2; B=127.0.0.3; EXPORT_PORT=21929; API_PORT=21930; LINK_PORT=21931

cluster() { # protocol extra-resource-keys
  stop_all
  rm -rf "$WORK/c"; mkdir -p "$WORK/c"
  truncate -s 4G "$WORK/c/alpha.img" "$WORK/c/bravo.img"
  echo "bench-secret-0123456789abcdef" > "$WORK/c/secret"
  cat > "$WORK/c/cluster.yaml" <<EOF
cluster: bench
secret: { file: secret }
nodes: { alpha: { address: $A }, bravo: { address: $B } }
resources:
  a: { protocol: $1, port: $LINK_PORT, disk: { alpha: alpha.img, bravo: bravo.img }, prefer: alpha${2:+, $2} }
pools: { pa: { devices: [a] } }
exports: { port: $EXPORT_PORT }
api: { port: $API_PORT }
EOF
  for n in alpha bravo; do
    $DUET --config "$WORK/c/cluster.yaml" --node $n resource create-md a > /dev/null
    $DUET --home "$WORK/c/home-$n" node run --config "$WORK/c/cluster.yaml" --node $n > "$OUT/$n.out" 2> "$WORK/c/$n.log" &
    PIDS+=($!)
    eval "PID_$n=$!"
  done
  wait_status alpha '.role == "Primary" and .disk == "UpToDate" and .peers[0].connection == "Connected" and .peers[0].disk == "UpToDate"' 60
}
st() { $DUET --config "$WORK/c/cluster.yaml" --node "$1" resource status a --json 2>/dev/null | jq -c '.resources[0]'; }
wait_status() { # node jq-condition seconds
  local end=$((SECONDS + $3))
  while [ $SECONDS -lt $end ]; do
    st "$1" | jq -e "$2" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "timed out waiting for $2 on $1" >&2; st "$1" >&2; return 1
}
duetc() { $DUET --config "$WORK/c/cluster.yaml" --node "$@"; }
bench() { # label uri pid
  echo "# $1" >&2
  sync
  "$NBD_BENCH" --uri "$2" --server-pid "$3" --label "$1" --patterns "$PATTERNS" "${OPTS[@]}" > "$OUT/$1.txt" 2> "$OUT/$1.progress"
}
IMG="$WORK/data.img"
head -c 1G /dev/urandom > "$IMG"

if want volume; then
  export DUET_HOME="$WORK/home"
  truncate -s 4G "$WORK/pool.img"
  $DUET pool create bench "$WORK/pool.img" >/dev/null
  $DUET vol create bench/vol --size 1G >/dev/null
  $DUET serve --pool bench --listen 127.0.0.1:$EXPORT_PORT > "$OUT/volume.server.log" 2>&1 &
  SPID=$!; PIDS+=($SPID)
  for _ in $(seq 100); do nbdinfo --size nbd://127.0.0.1:$EXPORT_PORT/vol >/dev/null 2>&1 && break; sleep 0.1; done
  nbdcopy --flush "$IMG" nbd://127.0.0.1:$EXPORT_PORT/vol
  bench volume nbd://127.0.0.1:$EXPORT_PORT/vol $SPID
  stop_all
  unset DUET_HOME
fi

for p in A B C; do
  want $p || { [ $p = C ] && want standalone; } || continue
  cluster $p
  duetc alpha vol create pa/vol --size 1G >/dev/null
  nbdcopy --flush "$IMG" nbd://$A:$EXPORT_PORT/vol
  wait_status alpha '.outOfSyncBytes == 0 and .peers[0].connection == "Connected"' 60
  want $p && bench proto-$p nbd://$A:$EXPORT_PORT/vol $PID_alpha
  if [ $p = C ] && want standalone; then
    duetc alpha resource disconnect a >/dev/null
    bench standalone nbd://$A:$EXPORT_PORT/vol $PID_alpha
  fi
done

if want resync; then
  : > "$OUT/resync.txt"
  for spec in "10M:" "100M:" "1G:" "100M:\"resync-rate\": 50M"; do
    size=${spec%%:*}; extra=${spec#*:}
    cluster C "$extra"
    duetc alpha vol create pa/vol --size 2G >/dev/null
    duetc alpha resource disconnect a >/dev/null
    wait_status alpha '.peers[0].connection == "StandAlone"' 10
    head -c "$size" "$IMG" > "$WORK/chunk"
    nbdcopy --flush "$WORK/chunk" nbd://$A:$EXPORT_PORT/vol
    dirty=$(st alpha | jq '.outOfSyncBytes')
    t0=$(date +%s.%N)
    duetc alpha resource connect a >/dev/null
    wait_status alpha '.outOfSyncBytes == 0 and .peers[0].connection == "Connected" and .peers[0].lastResync != null' 600
    t1=$(date +%s.%N)
    last=$(st alpha | jq -c '.peers[0].lastResync')
    echo "resync dirty=$size dirtyBytes=$dirty wall_s=$(echo "$t1 - $t0" | bc) rate_MBps=$(echo "$last" | jq '.rateBytesPerSec / 1000000 | floor') sent=$(echo "$last" | jq '.sentBytes') configured=${extra:-dynamic}" | tee -a "$OUT/resync.txt"
  done
fi

if want detect; then
  : > "$OUT/detect.txt"
  for sig in STOP KILL; do
    cluster C
    before=$(grep -c '"event":"disconnected"' "$WORK/c/alpha.log" || true)
    t0=$(date +%s%3N)
    kill -$sig $PID_bravo
    for _ in $(seq 100); do [ "$(grep -c '"event":"disconnected"' "$WORK/c/alpha.log")" -gt "$before" ] && break; sleep 0.05; done
    t1=$(grep '"event":"disconnected"' "$WORK/c/alpha.log" | tail -1 | jq '.time')
    echo "detect signal=$sig ms=$((t1 - t0)) (ping-interval 200 ms, ping-timeout 500 ms: defaults)" | tee -a "$OUT/detect.txt"
    kill -CONT $PID_bravo 2>/dev/null || true
  done
fi
stop_all

# Table: ratios against the unreplicated volume.
echo
echo "| pattern | unit | volume | standalone | proto A | proto B | proto C | C/volume | C/standalone |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
metric() { # file pattern
  [ -f "$1" ] || { echo "-"; return; }
  local line; line=$(grep "^$2 " "$1" || true)
  [ -n "$line" ] || { echo "-"; return; }
  if [[ $2 == seq* ]]; then echo "$line" | sed -E 's/.* MBps=([0-9.]+).*/\1/'; else echo "$line" | sed -E 's/.* IOPS=([0-9.]+).*/\1/'; fi
}
for p in ${PATTERNS//,/ }; do
  unit=IOPS; [[ $p == seq* ]] && unit=MB/s
  v=$(metric "$OUT/volume.txt" $p); s=$(metric "$OUT/standalone.txt" $p)
  a=$(metric "$OUT/proto-A.txt" $p); b=$(metric "$OUT/proto-B.txt" $p); c=$(metric "$OUT/proto-C.txt" $p)
  r1=-; r2=-
  [[ $v != - && $c != - ]] && r1=$(echo "scale=2; $c / $v" | bc)
  [[ $s != - && $c != - ]] && r2=$(echo "scale=2; $c / $s" | bc)
  echo "| $p | $unit | $v | $s | $a | $b | $c | $r1 | $r2 |"
done
[ -f "$OUT/resync.txt" ] && { echo; cat "$OUT/resync.txt"; }
[ -f "$OUT/detect.txt" ] && { echo; cat "$OUT/detect.txt"; }
