#!/usr/bin/env bash
# bench/run.sh - duet serve vs nbdkit file vs qemu-nbd on the SAME file with the
# SAME client (fio ioengine=nbd via shared/bench/nbd-bench.sh), one after the
# other in one run, then a side-by-side table with ratios to nbdkit.
#
# usage: bench/run.sh [--quick] [--file PATH] [--size 1G] [--patterns LIST]
#                     [--servers duet,nbdkit,qemu] [-- extra nbd-bench options]
# env:   BENCH_DIR (where nbd-bench.sh lives; default ../shared/bench beside the repo)
#        OUT (result dir; default /tmp/duet-bench)
# Not a test: numbers depend on the machine; see bench/README.md for the last run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
[ -x "$BENCH_DIR/nbd-bench.sh" ] || BENCH_DIR=/work/shared/bench
NBD_BENCH="$BENCH_DIR/nbd-bench.sh"
FILE=/tmp/duet-bench.img
SIZE=1G
PATTERNS="seqread_1M_qd8,seqwrite_1M_qd8,randread_4k_qd1,randread_4k_qd32,randwrite_4k_qd32,seqread_1M_qd8_c4,randread_4k_qd32_c4,randwrite_4k_qd32_c4"
SERVERS="nbdkit,qemu,duet"
OUT=${OUT:-/tmp/duet-bench}
OPTS=(--repeat 2 --runtime 10 --ramp 2)
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) OPTS=(--repeat 1 --runtime 5 --ramp 1); shift;;
    --file) FILE="$2"; shift 2;;
    --size) SIZE="$2"; shift 2;;
    --patterns) PATTERNS="$2"; shift 2;;
    --servers) SERVERS="$2"; shift 2;;
    --) shift; EXTRA=("$@"); break;;
    -h|--help) sed -n '2,12p' "$0"; exit 0;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
for t in fio nbdinfo nbdkit qemu-nbd jq; do command -v $t >/dev/null || { echo "missing $t (apt-get install nbdkit libnbd-bin qemu-utils fio jq)" >&2; exit 3; }; done
mkdir -p "$OUT"
if [ ! -e "$FILE" ]; then
  echo "# creating $FILE ($SIZE of random data)" >&2
  truncate -s "$SIZE" "$FILE"
  dd if=/dev/urandom of="$FILE" bs=1M count=$(( $(stat -c %s "$FILE") / 1048576 )) conv=notrunc status=none
fi

PORT=21909
SPID=""
stop_server() { if [ -n "$SPID" ] && kill -0 "$SPID" 2>/dev/null; then kill "$SPID"; wait "$SPID" 2>/dev/null || true; fi; SPID=""; }
trap stop_server EXIT

run_one() { # label uri cmd...
  local label=$1 uri=$2; shift 2
  cat "$FILE" > /dev/null   # same start: file in the page cache
  "$@" > "$OUT/$label.server.log" 2>&1 &
  SPID=$!
  local ok=0
  for _ in $(seq 100); do nbdinfo --size "$uri" >/dev/null 2>&1 && { ok=1; break; }; kill -0 $SPID 2>/dev/null || break; sleep 0.1; done
  [ $ok = 1 ] || { echo "$label: server did not start (see $OUT/$label.server.log)" >&2; stop_server; return 1; }
  echo "# $label: $* (pid $SPID)" >&2
  "$NBD_BENCH" --uri "$uri" --server-pid "$SPID" --label "$label" --patterns "$PATTERNS" "${OPTS[@]}" "${EXTRA[@]}" \
    > "$OUT/$label.txt" 2> "$OUT/$label.progress"
  echo "# $label: VmHWM $(grep VmHWM /proc/$SPID/status | awk '{print $2$3}') threads $(ls /proc/$SPID/task | wc -l)" >> "$OUT/$label.txt"
  stop_server
}

IFS=',' read -r -a LIST <<< "$SERVERS"
for s in "${LIST[@]}"; do
  case $s in
    nbdkit) run_one nbdkit "nbd://127.0.0.1:$PORT/" nbdkit -f -i 127.0.0.1 -p $PORT file "$FILE";;
    qemu) run_one qemu-nbd "nbd://127.0.0.1:$PORT/" qemu-nbd --persistent --shared=8 -f raw --cache=writeback --aio=threads -b 127.0.0.1 -p $PORT "$FILE";;
    duet) run_one duet "nbd://127.0.0.1:$PORT/" node "$ROOT/bin/duet" serve "bench=$FILE" --listen 127.0.0.1:$PORT;;
    *) echo "unknown server $s" >&2; exit 2;;
  esac
done

# Table: primary metric per pattern, then duet/nbdkit and duet/qemu-nbd ratios.
awk '
  /^#/ || NF < 3 { next }
  { pat=$1; lab=""; prim=""
    for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="label") lab=kv[2]; if (kv[1]=="IOPS") iops=kv[2]; if (kv[1]=="MBps") mbps=kv[2]; if (kv[1]=="srv_cpu_pct") cpu[lab,pat]=kv[2] }
    for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="label") lab=kv[2]; if (kv[1]=="srv_cpu_pct") cpu[lab,pat]=kv[2] }
    v[lab,pat] = (pat ~ /^seq/) ? mbps : iops
    if (!(pat in seen)) { seen[pat]=1; pats[++n]=pat } }
  END {
    printf "| pattern | unit | nbdkit | qemu-nbd | duet | duet/nbdkit | duet/qemu-nbd | duet srv CPU %% |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
    for (j=1;j<=n;j++) { p=pats[j]; u=(p ~ /^seq/)?"MB/s":"IOPS"
      a=v["nbdkit",p]; b=v["qemu-nbd",p]; c=v["duet",p]
      r1=(a>0 && c!="")?sprintf("%.2f",c/a):"-"; r2=(b>0 && c!="")?sprintf("%.2f",c/b):"-"
      printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", p, u, a==""?"-":sprintf("%.0f",a), b==""?"-":sprintf("%.0f",b), c==""?"-":sprintf("%.0f",c), r1, r2, cpu["duet",p] }
  }' "$OUT"/*.txt | tee "$OUT/table.md"
echo "# raw results in $OUT" >&2
