#!/usr/bin/env node
// bench/write-throttle.mjs - small random writes on one event loop while
// another process fills the page cache with dirty pages: how late the loop
// runs and how many writes it makes, for each FileDevice writeMode
// ('sync': on the loop, 'pool': libuv's pool, 'adaptive': on the loop while
// fast). Each mode runs in its own process: a quiet phase, then `dd` writes
// --dirty-gib into a scratch file (deleted after, which drops its dirty
// pages without writing them). Also says how full the kernel's dirty limits
// were when a write on the loop was slow: a predictive switch (read
// /proc/meminfo, go to the pool before the kernel throttles) helps only if
// slow writes come with a high dirty level (measured with the prototype of
// one, mode 'predict' at 5269aef). Not a test; needs `npm run build`.
// usage: node bench/write-throttle.mjs [--modes sync,pool,adaptive] [--seconds 10] [--quiet 3] [--dirty-gib 8] [--dir DIR]
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHistogram, monitorEventLoopDelay } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';

const args = process.argv.slice(2);
const arg = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const modes = arg('--modes', 'sync,pool,adaptive').split(',');
const seconds = Number(arg('--seconds', 10));
const quiet = Number(arg('--quiet', 3));
const dirtyGiB = Number(arg('--dirty-gib', 8));
const child = arg('--child', undefined);
// The device file and dd's scratch file: a directory on the disk to measure (default: a new one in the temporary directory).
const given = arg('--dir', undefined);
const dir = child ? path.resolve(given) : given ? path.resolve(given) : fs.mkdtempSync(path.join(os.tmpdir(), 'duet-write-throttle-'));
// Why slow calls were slow (costs a getrusage per call: not for the IOPS figures): a sleep in
// the kernel (throttling, a journal or page lock) is a voluntary context switch, losing the CPU
// to another process an involuntary one.
const why = args.includes('--why');
const slowWriteMs = args.includes('--slow-ms') ? Number(arg('--slow-ms')) : undefined; // adaptive's limit (default: file.ts's)

const DEVICE_BYTES = 1024 ** 3;
const BLOCK = 4096;
const QUEUE_DEPTH = 32;
const SLOW_MS = 2;
const LONG_MS = 50;

/** Dirty + Writeback, and the kernel's free-run ceiling (half way between its background and hard limits: mm/page-writeback.c). */
function dirtyLevel() {
  const m = Object.fromEntries(
    fs.readFileSync('/proc/meminfo', 'utf8').split('\n').filter(Boolean).map((l) => {
      const [k, v] = l.split(':');
      return [k, parseInt(v, 10) * 1024];
    }),
  );
  const vm = (f) => Number(fs.readFileSync(`/proc/sys/vm/${f}`, 'utf8'));
  const dirtyable = m.MemFree + m['Active(file)'] + m['Inactive(file)'];
  const limit = vm('dirty_bytes') || (vm('dirty_ratio') * dirtyable) / 100;
  let background = vm('dirty_background_bytes') || (vm('dirty_background_ratio') * dirtyable) / 100;
  if (background >= limit) background = limit / 2;
  return { dirty: m.Dirty + m.Writeback, background, freerun: (background + limit) / 2, limit };
}

/** The share of recorded values at or under `ns`. */
function percentileRank(h, ns) {
  let lo = 0;
  let hi = 100;
  for (let i = 0; i < 30; i++) {
    const mid = (lo + hi) / 2;
    if (h.percentile(mid) <= ns) lo = mid;
    else hi = mid;
  }
  return lo / 100;
}

const MiB = (n) => Math.round(n / 1024 / 1024);

async function runChild(mode) {
  const { FileDevice } = await import('../dist/src/blockdev/file.js');
  const file = path.join(dir, 'device.img');
  const dev = FileDevice.open(file, { writeMode: mode, adaptive: { slowWriteMs } });
  const data = Buffer.alloc(BLOCK, 0x5a);
  let inFlight = 0;
  let done = 0;
  let running = true;
  const calls = createHistogram();
  let slowCalls = 0;
  let slept = 0;
  let preempted = 0;
  let worstCallMs = 0;
  const slowAt = []; // dirty level / free-run ceiling when a call was slow
  const long = []; // calls over LONG_MS: "ms@dirty/free-run"
  let level = dirtyLevel();
  let peak = level;
  const sampler = setInterval(() => {
    level = dirtyLevel();
    if (level.dirty > peak.dirty) peak = level;
  }, 100);

  const loop = () => {
    if (!running) return;
    // Up to QUEUE_DEPTH requests a turn of the loop, as many as are not in the pool (an NBD client at qd32).
    for (let n = 0; n < QUEUE_DEPTH && inFlight < QUEUE_DEPTH; n++) {
      const offset = Math.floor(Math.random() * (DEVICE_BYTES / BLOCK)) * BLOCK;
      const u0 = why ? process.resourceUsage() : undefined;
      const t0 = process.hrtime.bigint();
      const r = dev.write(offset, data);
      const ns = process.hrtime.bigint() - t0;
      let cause = '';
      if (u0 && ns > BigInt(SLOW_MS * 1e6)) {
        const u1 = process.resourceUsage();
        if (u1.voluntaryContextSwitches > u0.voluntaryContextSwitches) (slept++, (cause = ' slept'));
        else if (u1.involuntaryContextSwitches > u0.involuntaryContextSwitches) (preempted++, (cause = ' preempted'));
      }
      calls.record(ns > 0n ? ns : 1n);
      const ms = Number(ns) / 1e6;
      if (ms > worstCallMs) worstCallMs = ms;
      if (ms > SLOW_MS) {
        slowCalls++;
        slowAt.push(level.dirty / level.freerun);
        if (ms > LONG_MS) long.push(`${Math.round(ms)}@${(level.dirty / level.freerun).toFixed(2)}${cause}`);
      }
      if (r instanceof Promise) {
        inFlight++;
        r.then(() => {
          inFlight--;
          done++;
        });
      } else done++;
    }
    setImmediate(loop);
  };

  const phase = async (ms) => {
    const h = monitorEventLoopDelay({ resolution: 10 });
    h.enable();
    const d0 = done;
    const t0 = performance.now();
    await new Promise((resolve) => setTimeout(resolve, ms));
    h.disable();
    const late = (ns) => Math.max(0, ns / 1e6 - 10);
    return { iops: Math.round(((done - d0) * 1000) / (performance.now() - t0)), p99: late(h.percentile(99)), max: late(h.max) };
  };

  loop();
  const calm = await phase(quiet * 1000);
  const quietBackoff = dev.writeBackoff();
  calls.reset();
  slowCalls = 0;
  slept = 0;
  preempted = 0;
  worstCallMs = 0;
  slowAt.length = 0;
  long.length = 0;
  const scratch = path.join(dir, 'dirt');
  const dd = spawn('dd', ['if=/dev/zero', `of=${scratch}`, 'bs=1M', `count=${dirtyGiB * 1024}`, 'status=none'], { stdio: 'ignore' });
  const loaded = await phase(seconds * 1000);
  dd.kill();
  running = false;
  clearInterval(sampler);
  while (inFlight > 0) await new Promise((resolve) => setTimeout(resolve, 5));
  fs.rmSync(scratch, { force: true });
  const backoff = dev.writeBackoff();
  const onLoop = (b) => (b ? Math.round((100 * b.onThread) / (b.onThread + b.inPool)) : mode === 'sync' ? 100 : 0);
  const loadedOnLoop = backoff && quietBackoff ? { onThread: backoff.onThread - quietBackoff.onThread, inPool: backoff.inPool - quietBackoff.inPool } : undefined;
  dev.close();
  slowAt.sort((a, b) => a - b);
  console.log(
    JSON.stringify({
      mode,
      quietIops: calm.iops,
      quietP99: calm.p99,
      quietMax: calm.max,
      iops: loaded.iops,
      p99: loaded.p99,
      max: loaded.max,
      slowCalls,
      ...(why ? { slept, preempted } : {}),
      worstCallMs: Math.round(worstCallMs * 10) / 10,
      callP999us: Math.round(calls.percentile(99.9) / 1000),
      callsOver: Object.fromEntries([2, 5, 10, 20, 50].map((ms) => [ms, Math.round(calls.count * (1 - percentileRank(calls, ms * 1e6)))])),
      peakDirtyMiB: MiB(peak.dirty),
      freerunMiB: MiB(peak.freerun),
      backgroundMiB: MiB(peak.background),
      slowAtDirtyOverFreerun: slowAt.length ? [slowAt[0], slowAt[slowAt.length >> 1], slowAt[slowAt.length - 1]].map((x) => Math.round(x * 100) / 100) : [],
      long,
      quietOnLoopPct: onLoop(quietBackoff),
      onLoopPct: onLoop(loadedOnLoop),
      backoff,
    }),
  );
}

function main() {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'device.img');
  if (!fs.existsSync(file) || fs.statSync(file).size !== DEVICE_BYTES) {
    fs.rmSync(file, { force: true });
    execFileSync('fallocate', ['-l', String(DEVICE_BYTES), file]);
  }
  const rows = [];
  for (const mode of modes) {
    const out = execFileSync(process.execPath, [fileURLToPath(import.meta.url), ...args, '--child', mode, '--dir', dir], { encoding: 'utf8', timeout: (quiet + seconds + 30) * 1000, killSignal: 'SIGKILL' });
    const r = JSON.parse(out.trim().split('\n').pop());
    console.error(JSON.stringify(r));
    rows.push(r);
  }
  console.log('| mode | quiet IOPS | on loop % | IOPS while dd dirties | on loop % | loop p99 ms | loop max ms | calls > 2 ms | longest call ms | peak dirty / free-run MiB |');
  console.log('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const r of rows) {
    console.log(`| ${r.mode} | ${r.quietIops} | ${r.quietOnLoopPct} | ${r.iops} | ${r.onLoopPct} | ${r.p99.toFixed(1)} | ${r.max.toFixed(1)} | ${r.slowCalls} | ${r.worstCallMs} | ${r.peakDirtyMiB} / ${r.freerunMiB} |`);
  }
  fs.rmSync(file, { force: true });
  fs.rmSync(`${file}.duet-lock`, { force: true });
  if (!given) fs.rmSync(dir, { recursive: true, force: true });
}

if (child) await runChild(child);
else main();
