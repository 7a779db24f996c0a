#!/usr/bin/env bash
# bench/volume.sh - a thin volume exported by `duet serve --pool` vs the raw file
# export `duet serve FILE` of the same data, same client (fio
# ioengine=nbd via shared/bench/nbd-bench.sh), same patterns as bench/run.sh.
#
#   raw       duet serve FILE                 (1 GiB random data, page cache)
#   volume    duet serve --pool: a 1 GiB volume, fully provisioned with the same data
#   first:    write patterns on a fresh volume in a fresh pool vs a fresh sparse file (median of 3)
#
# usage: bench/volume.sh [--quick] [--patterns LIST]
# env:   OUT (default /tmp/duet-bench-volume), BENCH_DIR as in run.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
[ -x "$BENCH_DIR/nbd-bench.sh" ] || BENCH_DIR=/work/shared/bench
NBD_BENCH="$BENCH_DIR/nbd-bench.sh"
PATTERNS="seqread_1M_qd8,seqwrite_1M_qd8,randread_4k_qd1,randread_4k_qd32,randwrite_4k_qd1,randwrite_4k_qd32"
FIRST_PATTERNS="seqwrite_1M_qd8,randwrite_4k_qd32"
OUT=${OUT:-/tmp/duet-bench-volume}
OPTS=(--repeat 2 --runtime 10 --ramp 2)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) OPTS=(--repeat 1 --runtime 5 --ramp 1); shift;;
    --patterns) PATTERNS="$2"; shift 2;;
    -h|--help) sed -n '2,13p' "$0"; exit 0;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
for t in fio nbdinfo nbdcopy jq; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 3; }; done
rm -rf "$OUT"; mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/duet-bench-vol.XXXXXX)
export DUET_HOME="$WORK/home"
DUET="node $ROOT/bin/duet"
PORT=21919
SPID=""
stop_server() { if [ -n "$SPID" ] && kill -0 "$SPID" 2>/dev/null; then kill "$SPID"; wait "$SPID" 2>/dev/null || true; fi; SPID=""; }
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT

start() { # label uri cmd...
  local label=$1 uri=$2; shift 2
  "$@" > "$OUT/$label.server.log" 2>&1 &
  SPID=$!
  for _ in $(seq 100); do nbdinfo --size "$uri" >/dev/null 2>&1 && return 0; kill -0 $SPID 2>/dev/null || break; sleep 0.1; done
  echo "$label: server did not start (see $OUT/$label.server.log)" >&2; return 1
}
bench() { # label uri patterns
  echo "# $1" >&2
  sync   # no writeback of an earlier step competing with this one
  "$NBD_BENCH" --uri "$2" --server-pid "$SPID" --label "$1" --patterns "$3" "${OPTS[@]}" > "$OUT/$1.txt" 2> "$OUT/$1.progress"
}

IMG="$WORK/data.img"
head -c 1G /dev/urandom > "$IMG"
truncate -s 40G "$WORK/pool.img"
$DUET pool create bench "$WORK/pool.img" >/dev/null
$DUET vol create bench/vol --size 1G >/dev/null

# raw file export
cat "$IMG" > /dev/null
start raw "nbd://127.0.0.1:$PORT/data" $DUET serve "data=$IMG" --listen 127.0.0.1:$PORT
bench raw "nbd://127.0.0.1:$PORT/data" "$PATTERNS"
stop_server

# provisioned volume
start volume "nbd://127.0.0.1:$PORT/vol" $DUET serve --pool bench --listen 127.0.0.1:$PORT
nbdcopy --flush "$IMG" "nbd://127.0.0.1:$PORT/vol"

bench volume "nbd://127.0.0.1:$PORT/vol" "$PATTERNS"

# first writes: each pattern on a fresh 48 GiB volume in a fresh pool (nearly every write hits an
# unallocated chunk), then the raw export of a fresh sparse 48 GiB file, 3 times each (median); sync before each run so
# neither pays for the other's writeback.
stop_server
for p in ${FIRST_PATTERNS//,/ }; do
 for rep in 1 2 3; do
  # A fresh pool on a fresh sparse file, as the raw export gets a fresh file.
  rm -f "$WORK/fresh-pool.img" "$DUET_HOME/pools/fresh.json"; truncate -s 64G "$WORK/fresh-pool.img"
  $DUET pool create fresh "$WORK/fresh-pool.img" >/dev/null
  $DUET vol create fresh/fresh --size 48G >/dev/null
  start volume "nbd://127.0.0.1:$PORT/fresh" $DUET serve --pool fresh --listen 127.0.0.1:$PORT
  sync
  "$NBD_BENCH" --uri "nbd://127.0.0.1:$PORT/fresh" --server-pid "$SPID" --label firstwr --patterns "$p" --repeat 1 --runtime 5 --ramp 0 > "$OUT/firstwr-$p-$rep.txt" 2> "$OUT/firstwr-$p-$rep.progress"
  stop_server
  rm -f "$WORK/fresh.img"; truncate -s 48G "$WORK/fresh.img"
  start rawfresh "nbd://127.0.0.1:$PORT/fresh" $DUET serve "fresh=$WORK/fresh.img" --listen 127.0.0.1:$PORT
  sync
  "$NBD_BENCH" --uri "nbd://127.0.0.1:$PORT/fresh" --server-pid "$SPID" --label rawfresh --patterns "$p" --repeat 1 --runtime 5 --ramp 0 > "$OUT/rawfresh-$p-$rep.txt" 2> "$OUT/rawfresh-$p-$rep.progress"
  stop_server
 done
done

awk '
  /^#/ || NF < 3 { next }
  { pat=$1; lab=""; for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="label") lab=kv[2]; if (kv[1]=="IOPS") iops=kv[2]; if (kv[1]=="MBps") mbps=kv[2]; if (kv[1]=="srv_cpu_pct") cpu=kv[2] }
    if (lab=="firstwr") { lab="volume"; pat="first:" pat } if (lab=="rawfresh") { lab="raw"; pat="first:" pat }
    x = (pat ~ /seq/) ? mbps : iops
    k[lab,pat]++; all[lab,pat,k[lab,pat]] = x; v[lab,pat] = x; c[lab,pat]=cpu
    if (!(pat in seen)) { seen[pat]=1; pats[++n]=pat } }
  END {
    # rows measured several times (first writes, one fresh setup each): the median
    for (key in k) if (k[key] > 1) { n2=k[key]; split(key, kp, SUBSEP)
      for (i=1;i<=n2;i++) m[i]=all[kp[1],kp[2],i]
      for (i=1;i<=n2;i++) for (j=i+1;j<=n2;j++) if (m[j]<m[i]) { t=m[i]; m[i]=m[j]; m[j]=t }
      v[key] = m[int((n2+1)/2)] }
    printf "| pattern | unit | raw file | volume | volume/raw | raw CPU %% | volume CPU %% |\n|---|---|---:|---:|---:|---:|---:|\n"
    for (j=1;j<=n;j++) { p=pats[j]; u=(p ~ /seq/)?"MB/s":"IOPS"; a=v["raw",p]; b=v["volume",p]
      printf "| %s | %s | %s | %s | %s | %s | %s |\n", p, u, a==""?"-":sprintf("%.0f",a), b==""?"-":sprintf("%.0f",b), (a>0&&b!="")?sprintf("%.2f",b/a):"-", c["raw",p], c["volume",p] } }' "$OUT"/*.txt | tee "$OUT/table.md"
