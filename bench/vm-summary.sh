#!/usr/bin/env bash
# bench/vm-summary.sh RESULTS - the tables of bench/vm.sh from its results file
# (one record a line: io / spawn / mig / ho / gate / note), medians over runs.
set -euo pipefail
awk '
function kv(s, k,   i, n, f) { n = split(s, f, " "); for (i = 1; i <= n; i++) if (index(f[i], k "=") == 1) return substr(f[i], length(k) + 2); return "" }
function median(list,   n, a, i, j, t) {
  n = split(list, a, " "); if (n == 0) return ""
  for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
  return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
function minmax(list,   n, a, i, lo, hi) { n = split(list, a, " "); lo = hi = a[1] + 0
  for (i = 2; i <= n; i++) { if (a[i] + 0 < lo) lo = a[i] + 0; if (a[i] + 0 > hi) hi = a[i] + 0 }
  return (lo == hi) ? lo "" : lo "-" hi }
function add(key, v,   t) { t = (key in vals) ? vals[key] " " v : v; vals[key] = t }   # (mawk creates vals[key] when the left side comes first)
function ratio(x, y) { return (x == "" || y == "" || y + 0 == 0) ? "-" : sprintf("%.2f", x / y) }
function fmt(x) { return (x == "") ? "-" : (x + 0 >= 100 ? sprintf("%.0f", x) : sprintf("%.1f", x)) }
$1 == "io" { setup = $2; name = $4; l = kv($0, "load")
  add(setup SUBSEP name SUBSEP "MBps", kv($0, "MBps")); add(setup SUBSEP name SUBSEP "IOPS", kv($0, "IOPS"))
  add(setup SUBSEP name SUBSEP "lat", kv($0, "lat_us")); add("ioload", l); runs[$3] = 1 }
$1 == "spawn" { add("spawn", kv($0, "ms_per_dd")) }
$1 == "mig" { k = $2 " " $3; if (!(k in mseen)) { mseen[k] = 1; morder[++nm] = k }
  add("mt" SUBSEP k, kv($0, "total_ms")); add("md" SUBSEP k, kv($0, "down_ms")); add("ml" SUBSEP k, kv($0, "load")); if (kv($0, "wall_ms") != "") add("mw" SUBSEP k, kv($0, "wall_ms")) }
$1 == "ho" { nh++; hto[nh] = substr($2, 4); hon[nh] = kv($0, "vm_on"); hp[nh] = kv($0, "pause_ms"); hl[nh] = kv($0, "load"); add("hp", hp[nh]); add("hl", hl[nh]) }
$1 == "gate" || $1 == "note" { notes[++nn] = $0 }
END {
  if ("ioload" in vals) {
    nr = 0; for (r in runs) nr++
    printf "### Guest-visible disk I/O (median of %d runs, load %s)\n\n", nr, minmax(vals["ioload"])
    print "| measure | unit | a: VM on Primary | b: VM on other node | c: fio nbd from host | d: VM on nbdkit file | e: VM on duet serve file | a/c | b/a | a/d | e/d | a/e |"
    print "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    split("seqwrite_1M MBps MB/s|seqread_1M MBps MB/s|randwrite_4k IOPS IOPS|randread_4k IOPS IOPS|seqwrite_1M lat us/MiB|seqread_1M lat us/MiB|randwrite_4k lat us|randread_4k lat us", rows, "|")
    ns = split("a-primary b-other c-fio d-nbdkit e-serve", S, " ")
    for (i = 1; i <= 8; i++) {
      split(rows[i], f, " ")
      for (s = 1; s <= ns; s++) { k = S[s] SUBSEP f[1] SUBSEP f[2]; m[s] = (k in vals) ? median(vals[k]) : ""; all[s] = (k in vals) ? vals[k] : "-" }
      printf "| %s%s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", f[1], (f[2] == "lat" ? " latency" : ""), f[3], fmt(m[1]), fmt(m[2]), fmt(m[3]), fmt(m[4]), fmt(m[5]), ratio(m[1], m[3]), ratio(m[2], m[1]), ratio(m[1], m[4]), ratio(m[5], m[4]), ratio(m[1], m[5])
      runsline[i] = sprintf("%s %s: a %s; b %s; c %s; d %s; e %s", f[1], f[3], all[1], all[2], all[3], all[4], all[5])
    }
    print "\nRatios of latencies: above 1 is slower. Per run:"; for (i = 1; i <= 4; i++) print "- " runsline[i]
    if ("spawn" in vals) printf "- a dd start-up in the guest: %s ms (median; paid once per 256 blocks of 4 KiB, once per pass of 1 MiB blocks)\n", median(vals["spawn"])
    print ""
  }
  if (nm > 0) {
    print "### Live migration (vm migrate)\n"
    print "| memory | direction | runs | total ms, median (range) | guest paused ms, median (range) | vm migrate wall ms (daemon), median (range) | load |"
    print "|---|---|---:|---:|---:|---:|---|"
    for (i = 1; i <= nm; i++) { k = morder[i]; split(k, f, " "); n = split(vals["mt" SUBSEP k], tmp, " ")
      w = ("mw" SUBSEP k in vals) ? median(vals["mw" SUBSEP k]) " (" minmax(vals["mw" SUBSEP k]) ")" : "-"
      printf "| %s | %s | %d | %s (%s) | %s (%s) | %s | %s |\n", f[1], f[2], n, median(vals["mt" SUBSEP k]), minmax(vals["mt" SUBSEP k]), median(vals["md" SUBSEP k]), minmax(vals["md" SUBSEP k]), w, minmax(vals["ml" SUBSEP k]) }
    print ""
  }
  if (nh > 0) {
    print "### Handover (resource primary a --handover)\n"
    print "| run | Primary to | VM (on bravo) is on the | pause ms | load |"
    print "|---:|---|---|---:|---:|"
    for (i = 1; i <= nh; i++) printf "| %d | %s | %s node | %s | %s |\n", i, hto[i], hon[i] == "primary" ? "Primary" : "other", hp[i], hl[i]
    printf "\nmedian pause %s ms (range %s), load %s\n\n", median(vals["hp"]), minmax(vals["hp"]), minmax(vals["hl"])
  }
  for (i = 1; i <= nn; i++) print "note: " notes[i]
}' "$1"
