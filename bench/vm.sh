#!/usr/bin/env bash
# bench/vm.sh - VMs on duet volumes, measured (not asserted): two node daemons on
# this machine (alpha 127.0.0.2 Primary, bravo 127.0.0.3), QEMU (KVM where
# /dev/kvm opens, else TCG) booting the demo guest (src/vm/demo-guest.ts).
#
#   io        the guest's own disk figures (its benchmark mode, duet.bench=1: dd
#             O_DIRECT, sequential 1 MiB and 4 KiB runs at queue depth 1, each
#             for --secs), on a replicated volume prefilled with random data:
#               a  the VM on alpha, the Primary serving its disk
#               b  the VM on bravo, its disk over the "LAN" (loopback to 127.0.0.2)
#               c  fio ioengine=nbd from the host against the same export, same
#                  block sizes at queue depth 1 (shared/bench/nbd-bench.sh)
#               d  the same guest and QEMU command line against nbdkit serving a
#                  plain file (the anchor: what QEMU, TCG and virtio cost)
#               e  the same against `duet serve` of a plain file (duet's NBD server
#                  without a cluster: splits d..a into server and replication)
#             a, b, c, d, e in turn, --runs rounds, medians
#   migrate   vm migrate alpha -> bravo -> alpha with the ticking guest at 128 MiB
#             and 512 MiB: total time and guest pause as vm migrate prints them
#             (QEMU's count), and the source daemon's wall time (its log events)
#   handover  resource primary a --handover to bravo, alpha, ... under the ticking
#             guest (running on bravo): the pause vm web reports
#
# Before each part (and each round of io) it waits (at most --load-wait s) until
# the 1-minute load is below --load-max; every figure is printed with the load
# when it was taken.
#
# usage: bench/vm.sh [--quick] [--only io,migrate,handover] [--runs N] [--secs S]
#                    [--mib N] [--migrations N] [--handovers N] [--load-max L] [--load-wait S]
# env:   OUT (results, default /tmp/duet-bench-vm), BENCH_DIR as in run.sh
# Needs `npm run build`, qemu-system-x86_64, nbdkit, nbdcopy, nbdinfo, fio, jq, busybox-static.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
[ -x "$BENCH_DIR/nbd-bench.sh" ] || BENCH_DIR=/work/shared/bench
NBD_BENCH="$BENCH_DIR/nbd-bench.sh"
OUT=${OUT:-/tmp/duet-bench-vm}
ONLY="io,migrate,handover"
RUNS=3 SECS=10 MIB=128 MIGRATIONS=3 HANDOVERS=5 LOAD_MAX=1.5 LOAD_WAIT=600
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) RUNS=1 SECS=3 MIB=64 MIGRATIONS=1 HANDOVERS=2; shift;;
    --only) ONLY="$2"; shift 2;;
    --runs) RUNS="$2"; shift 2;;
    --secs) SECS="$2"; shift 2;;
    --mib) MIB="$2"; shift 2;;
    --migrations) MIGRATIONS="$2"; shift 2;;
    --handovers) HANDOVERS="$2"; shift 2;;
    --load-max) LOAD_MAX="$2"; shift 2;;
    --load-wait) LOAD_WAIT="$2"; shift 2;;
    -h|--help) sed -n '2,28p' "$0"; exit 0;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
for t in qemu-system-x86_64 nbdkit nbdcopy nbdinfo fio jq bc; do command -v $t >/dev/null || { echo "missing $t (apt-get install qemu-system-x86 nbdkit libnbd-bin fio jq bc)" >&2; exit 3; }; done
[ -f "$ROOT/dist/src/cli/main.js" ] || { echo "run npm run build first" >&2; exit 3; }

A=127.0.0.2; B=127.0.0.3
EXPORT_PORT=21951 API_PORT=21952 LINK_PORT=21953 NBDKIT_PORT=21954 SERVE_PORT=21955
for p in $EXPORT_PORT $API_PORT $LINK_PORT $NBDKIT_PORT $SERVE_PORT; do
  if ss -Htln "sport = :$p" | grep -q .; then echo "port $p is in use (another bench/vm.sh?)" >&2; exit 3; fi
done
VOL_MIB=$((MIB + 8))   # the guest's benchmark area is 4 MiB .. 4+MIB MiB
mkdir -p "$OUT"; : > "$OUT/results.txt"
WORK=$(mktemp -d /tmp/duet-bench-vm.XXXXXX)
DUET="node $ROOT/bin/duet"
PIDS=()   # node daemons and nbdkit, ended by pid

# The QEMUs (they outlive their daemon on purpose): by pid file, only if that pid is the QEMU of that
# pid file (its command line names the VM's QMP socket), as test/e2e/cluster-harness.ts killVms does.
kill_vms() {
  local pf dir pid
  for pf in "$WORK"/c/home-*/vms/*/qemu.pid "$WORK"/anchor/qemu.pid; do
    [ -f "$pf" ] || continue
    dir=$(dirname "$pf"); pid=$(cat "$pf" 2>/dev/null) || continue
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/qmp.sock"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
}
stop_all() {
  local q
  for q in "${PIDS[@]}"; do kill "$q" 2>/dev/null || true; done
  for q in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$q" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$q" 2>/dev/null || true; wait "$q" 2>/dev/null || true
  done
  PIDS=()
  kill_vms
}
cleanup() { stop_all; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

load1() { cut -d' ' -f1 /proc/loadavg; }
# wait_load WHAT: until the 1-minute load is below LOAD_MAX, at most LOAD_WAIT s
wait_load() {
  local end=$((SECONDS + LOAD_WAIT)) l
  while :; do
    l=$(load1)
    if awk -v l="$l" -v m="$LOAD_MAX" 'BEGIN { exit !(l < m) }'; then echo "# $1: load $l" >&2; return 0; fi
    if [ $SECONDS -ge $end ]; then echo "# $1: load $l still >= $LOAD_MAX after ${LOAD_WAIT}s: measuring anyway" >&2; echo "gate $1 timed-out load=$l" >> "$OUT/results.txt"; return 0; fi
    sleep 10
  done
}
record() { echo "$*" >> "$OUT/results.txt"; }

echo "# building the demo guest" >&2
read -r KERNEL INITRD < <(node "$ROOT/bench/vm-guest.mjs" build "$WORK/guest")
BASE_APPEND="console=ttyS0 quiet panic=-1"
BENCH_APPEND="$BASE_APPEND duet.bench=1 duet.bench.mib=$MIB duet.bench.secs=$SECS duet.bench.then=poweroff"

# cluster NAME MEMORY_MIB PREFER APPEND: fresh disks, both daemons, in sync (VM web on volume pa/web, not created yet)
cluster() {
  stop_all
  [ -d "$WORK/c" ] && { mkdir -p "$OUT/logs-$CLUSTER"; cp "$WORK"/c/*.log "$OUT/logs-$CLUSTER/" 2>/dev/null || true; }
  CLUSTER=$1
  rm -rf "$WORK/c"; mkdir -p "$WORK/c"
  truncate -s 1G "$WORK/c/alpha.img" "$WORK/c/bravo.img"
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
vms:
  web: { disks: [pa/web], memory: ${2}M, cpus: 1, prefer: $3, boot: { kernel: $KERNEL, initrd: $INITRD, append: "$4" } }
EOF
  local n
  for n in alpha bravo; do
    $DUET --config "$WORK/c/cluster.yaml" --node $n resource create-md a > /dev/null
    $DUET --home "$WORK/c/home-$n" node run --config "$WORK/c/cluster.yaml" --node $n > "$WORK/c/$n.out" 2> "$WORK/c/$n.log" &
    PIDS+=($!)
    eval "PID_$n=$!"
  done
  wait_status alpha '.role == "Primary" and .disk == "UpToDate" and .peers[0].connection == "Connected" and .peers[0].disk == "UpToDate"' 60
}
duetc() { $DUET --config "$WORK/c/cluster.yaml" --node "$@"; }
st() { duetc "$1" resource status a --json 2>/dev/null | jq -c '.resources[0]'; }
wait_status() { # node jq-condition seconds
  local end=$((SECONDS + $3))
  while [ $SECONDS -lt $end ]; do
    st "$1" | jq -e "$2" >/dev/null 2>&1 && return 0
    sleep 0.3
  done
  echo "timed out waiting for $2 on $1" >&2; st "$1" >&2; return 1
}
in_sync='.disk == "UpToDate" and .peers[0].connection == "Connected" and .peers[0].disk == "UpToDate" and .outOfSyncBytes == 0'
vm_state() { duetc alpha vm list --json 2>/dev/null | jq -r '.vms[] | select(.name == "web") | "\(.state) \(.node // "nowhere")"'; }
wait_vm() { # "STATE NODE" seconds (a stopped VM runs nowhere)
  local end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ]; do [ "$(vm_state)" = "$1" ] && return 0; sleep 1; done
  echo "timed out waiting for vm web to be $1 (it is $(vm_state))" >&2; return 1
}
console_of() { tr -d '\r' < "$WORK/c/home-$1/vms/web/console.log" 2>/dev/null || true; }
last_tick() { console_of "$1" | sed -n 's/^tick \([0-9]*\) boot=.*/\1/p' | tail -1; }
wait_ticks() { # node n seconds: n more ticks on node's console than now
  local from; from=$(last_tick "$1"); from=${from:-0}
  local end=$((SECONDS + $3)) t
  while [ $SECONDS -lt $end ]; do t=$(last_tick "$1"); [ "${t:-0}" -ge $((from + $2)) ] && return 0; sleep 0.5; done
  echo "timed out waiting for $2 ticks on $1 after tick $from" >&2; return 1
}

# guest_results SETUP RUN FILE: the result lines of the last benchmark in a console file
guest_results() {
  local text; text=$(tr -d '\r' < "$3" | awk '/^duet-bench start/ { buf = "" } { buf = buf $0 "\n" } END { printf "%s", buf }')
  if ! grep -q '^duet-bench done' <<< "$text" || grep -q 'ERROR' <<< "$text"; then
    echo "$1 run $2: the guest's benchmark failed:" >&2; tail -20 <<< "$text" >&2; return 1
  fi
  local l; l=$(load1)
  sed -n 's/^duet-bench result //p' <<< "$text" | while read -r name ops bytes csec; do
    name=${name#name=}; ops=${ops#ops=}; bytes=${bytes#bytes=}; csec=${csec#csec=}
    if [ "$name" = spawn ]; then record "spawn $1 $2 ms_per_dd=$(echo "scale=2; $csec * 10 / $ops" | bc) load=$l"; continue; fi
    record "io $1 $2 $name MBps=$(echo "scale=1; $bytes / $csec / 10000" | bc) IOPS=$(echo "scale=0; $ops * 100 / $csec" | bc) lat_us=$(echo "scale=0; $csec * 10000 / $ops" | bc) load=$l"
  done
}

benches_done() { local n; n=$(grep -c '^duet-bench done' "$1" 2>/dev/null) || true; echo "${n:-0}"; }
# (a) and (b): the cluster's VM booted in benchmark mode on NODE; it powers off when done (and stays off)
duet_vm_run() { # SETUP NODE RUN
  echo "# io $1 run $3: the VM on $2" >&2
  local cons="$WORK/c/home-$2/vms/web/console.log" done0 end
  done0=$(benches_done "$cons")
  local out; out=$(duetc alpha vm start web --on "$2") || { echo "$out" >&2; return 1; }
  # the console file, not vm list: a CLI call is a Node start-up, CPU the guest would miss
  end=$((SECONDS + SECS * 4 + 600))
  until [ "$(benches_done "$cons")" -gt "$done0" ]; do
    [ $SECONDS -lt $end ] || { echo "$1 run $3: no 'duet-bench done' on $cons" >&2; return 1; }
    sleep 1
  done
  wait_vm "stopped nowhere" 60
  guest_results "$1" "$3" "$cons"
}
# (c): fio from the host, the same export, queue depth 1
fio_run() { # SETUP RUN
  echo "# io $1 run $2: fio ioengine=nbd" >&2
  sync
  "$NBD_BENCH" --uri "nbd://$A:$EXPORT_PORT/web" --server-pid "$PID_alpha" --label "$1" \
    --patterns seqwrite_1M_qd1,seqread_1M_qd1,randwrite_4k_qd1,randread_4k_qd1 \
    --runtime "$SECS" --ramp 1 --repeat 1 --gate 0 --foreign-max 0 --size $((MIB * 1048576)) \
    > "$OUT/fio-$2.txt" 2> "$OUT/fio-$2.progress"
  local l; l=$(load1)
  grep -v '^#' "$OUT/fio-$2.txt" | while read -r p rest; do
    local iops mbps lat
    iops=$(sed -E 's/.*IOPS=([0-9.]+).*/\1/' <<< "$rest"); mbps=$(sed -E 's/.*MBps=([0-9.]+).*/\1/' <<< "$rest"); lat=$(sed -E 's/.*lat_mean_us=([0-9.]+).*/\1/' <<< "$rest")
    if [[ $p == seq* ]]; then lat=$(echo "scale=0; 1048576 / $mbps" | bc); fi   # per 1 MiB request, as the guest's
    record "io $1 $2 ${p%_qd1} MBps=$mbps IOPS=$iops lat_us=${lat%.*} load=$l"
  done
}
# (d), (e): the same guest, the QEMU command line duet would use, its disk from a server of a plain file
anchor_run() { # SETUP RUN PORT EXPORT
  echo "# io $1 run $2: the guest on $A:$3" >&2
  rm -rf "$WORK/anchor"; mkdir -p "$WORK/anchor"
  local args; mapfile -t args < <(node "$ROOT/bench/vm-guest.mjs" qemu-args "$WORK/anchor" "128" "$A" "$3" "$4" "$KERNEL" "$INITRD" "$BENCH_APPEND")
  timeout $((SECS * 4 + 600)) qemu-system-x86_64 "${args[@]}" > "$WORK/anchor/qemu.stderr" 2>&1 || { echo "anchor QEMU failed: $(cat "$WORK/anchor/qemu.stderr")" >&2; return 1; }
  guest_results "$1" "$2" "$WORK/anchor/console.log"
}

if want io; then
  wait_load io
  cluster io 128 alpha "$BENCH_APPEND"
  duetc alpha vm stop web > /dev/null   # marked stopped before its volume exists: it starts when a run starts it
  duetc alpha vol create pa/web --size ${VOL_MIB}M > /dev/null
  head -c $((VOL_MIB * 1048576)) /dev/urandom > "$WORK/fill.img"
  nbdcopy --flush "$WORK/fill.img" "nbd://$A:$EXPORT_PORT/web"
  wait_status alpha "$in_sync" 120
  cp "$WORK/fill.img" "$WORK/serve.img"
  mv "$WORK/fill.img" "$WORK/anchor.img"
  nbdkit -f -i $A -p $NBDKIT_PORT file "$WORK/anchor.img" > "$WORK/nbdkit.log" 2>&1 &
  PIDS+=($!)
  $DUET serve "web=$WORK/serve.img" --listen $A:$SERVE_PORT > "$WORK/serve.log" 2>&1 &
  PIDS+=($!)
  for u in "nbd://$A:$NBDKIT_PORT/" "nbd://$A:$SERVE_PORT/web"; do
    for _ in $(seq 100); do nbdinfo --size "$u" > /dev/null 2>&1 && break; sleep 0.1; done
  done
  for r in $(seq "$RUNS"); do
    [ "$r" = 1 ] || wait_load "io round $r"
    duet_vm_run a-primary alpha "$r"
    duet_vm_run b-other bravo "$r"
    fio_run c-fio "$r"
    anchor_run d-nbdkit "$r" $NBDKIT_PORT ""
    anchor_run e-serve "$r" $SERVE_PORT web
  done
fi

if want migrate; then
  for mem in 128 512; do
    wait_load "migrate ${mem}M"
    cluster "migrate-$mem" "$mem" alpha "$BASE_APPEND"
    duetc alpha vol create pa/web --size 16M > /dev/null   # VMs run unless stopped: it boots now
    wait_vm "running alpha" 120
    wait_ticks alpha 5 120
    from=alpha
    for r in $(seq "$MIGRATIONS"); do
      for to in bravo alpha; do
        out=$(duetc alpha vm migrate web --to $to 2>&1) || { echo "$out" >&2; exit 1; }
        total=$(sed -nE 's/.*: ([0-9]+) ms, guest paused ([0-9]+) ms.*/\1/p' <<< "$out")
        down=$(sed -nE 's/.*: ([0-9]+) ms, guest paused ([0-9]+) ms.*/\2/p' <<< "$out")
        echo "# $out" >&2
        # the command's own time, from the source daemon's log (QEMU's total-time leaves out starting the destination QEMU)
        for _ in $(seq 30); do   # (the daemon's log is written asynchronously)
          wall=$(jq -nrR '[inputs | fromjson? | select(.event == "vm-migrating" or .event == "vm-migrated")] | .[-2:] | if length == 2 and .[0].event == "vm-migrating" then .[1].time - .[0].time else "" end' "$WORK/c/$from.log")
          [ -n "$wall" ] && break; sleep 0.1
        done
        record "mig ${mem}M $from-$to $r total_ms=$total down_ms=$down wall_ms=$wall load=$(load1)"
        wait_ticks $to 3 60
        from=$to
      done
    done
    errors=$(console_of alpha | grep -c ERROR || true)
    [ "$errors" = 0 ] || record "note migrate ${mem}M: $errors guest ERROR lines"
  done
fi

if want handover; then
  wait_load handover
  cluster handover 128 bravo "$BASE_APPEND"
  duetc alpha vol create pa/web --size 16M > /dev/null
  wait_vm "running bravo" 120
  wait_ticks bravo 5 120
  for r in $(seq "$HANDOVERS"); do
    if [ $((r % 2)) = 1 ]; then to=bravo; else to=alpha; fi
    wait_status $to "$in_sync" 60
    out=$(duetc $to resource primary a --handover 2>&1) || { echo "$out" >&2; exit 1; }
    echo "# $out" >&2
    pause=$(sed -nE 's/.*vm web paused ([0-9]+) ms.*/\1/p' <<< "$out")
    where=other; [ $to = bravo ] && where=primary
    record "ho to-$to $r pause_ms=$pause vm_on=$where load=$(load1)"
    wait_ticks bravo 3 60
  done
  errors=$(console_of bravo | grep -c ERROR || true)
  [ "$errors" = 0 ] || record "note handover: $errors guest ERROR lines"
fi
stop_all
[ -d "$WORK/c" ] && { mkdir -p "$OUT/logs-$CLUSTER"; cp "$WORK"/c/*.log "$OUT/logs-$CLUSTER/" 2>/dev/null || true; }

# ---- summary ------------------------------------------------------------------------------------
"$ROOT/bench/vm-summary.sh" "$OUT/results.txt" | tee "$OUT/summary.md"
