#!/usr/bin/env node
// bench/loop-stalls.mjs - the longest event-loop stall of single operations that
// scale with a device or a pool: a bitmap of 2^33 blocks (32 TiB) marked,
// walked and snapshotted; a million bitmap runs from a peer merged; a
// checkpoint and a reopen of a pool with MAPPED_GIB mapped in scattered 64 KiB
// chunks (the worst case: one leaf per 16 chunks). Not a test. Needs
// `npm run build` first.
// usage: node --max-old-space-size=4096 bench/loop-stalls.mjs [--mapped-gib 16]
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Bitmap } from '../dist/src/replication/bitmap.js';
import { Pool } from '../dist/src/volume/pool.js';
import { ThinVolume } from '../dist/src/volume/volume.js';
import { createVolume } from '../dist/src/volume/operations.js';

const args = process.argv.slice(2);
const mappedGiB = Number(args[args.indexOf('--mapped-gib') + 1] || 16);
const GiB = 1024 ** 3;
const TiB = 1024 ** 4;

/** Run `fn`; the longest the event loop waited meanwhile (1 ms resolution, resolution taken off) and the wall time. */
async function measure(what, fn) {
  const h = monitorEventLoopDelay({ resolution: 1 });
  h.enable();
  await new Promise((resolve) => setTimeout(resolve, 20)); // the histogram's timer runs from here
  const t0 = performance.now();
  await fn();
  const ms = performance.now() - t0;
  await new Promise((resolve) => setTimeout(resolve, 20));
  h.disable();
  console.log(`| ${what} | ${ms.toFixed(0)} | ${Math.max(0, h.max / 1e6 - 1).toFixed(0)} |`);
}

/** Superblocks, journal and checkpoint pieces are kept (the pool reopens); data is dropped (bench/volume-scale.mjs). */
class DiscardDevice {
  constructor(size, name) {
    this.size = size;
    this.name = name;
    this.blockSize = { minimum: 1, preferred: 4096, maximum: 64 * 1024 * 1024 };
    this.capabilities = { readOnly: false, flush: true, fua: true, trim: true, fastZero: true, extents: false, multiConn: true, rotational: false };
    this.kept = new Map();
  }
  read(offset, into) {
    into.fill(0);
    const kept = this.kept.get(offset);
    if (kept && kept.length >= into.length) kept.copy(into, 0, 0, into.length);
    else for (const [o, b] of this.kept) {
      const s = Math.max(o, offset), e = Math.min(o + b.length, offset + into.length);
      if (s < e) b.copy(into, s - offset, s - o, e - o);
    }
  }
  write(offset, data) {
    if (data.length <= 65536 && (offset < 16 * 1024 * 1024 || data.subarray(0, 8).toString() === 'DUETCKPT')) this.kept.set(offset, Buffer.concat([data]));
  }
  flush() {}
  trim() {}
  writeZeroes() {}
  blockStatus(offset, length) {
    return [{ offset, length, flags: 0 }];
  }
  cache() {}
  close() {}
}

console.log('| operation | wall ms | longest loop stall ms |');
console.log('|---|---:|---:|');
const big = new Bitmap(2 ** 33 * 4096);
await measure('bitmap of 2^33 blocks: markAll', () => big.markAll());
await measure('  walk its runs', () => [...big.runs()].length);
await measure('  snapshot for a write-back', () => big.snapshot().length);
const runs = [];
for (let i = 0; i < 1_000_000; i++) runs.push({ offset: i * 14 * 4096, length: 4096 });
const mine = new Bitmap(TiB);
if (mine.merge) {
  // As the handshake does now: marked a frame (4096 runs) at a time as they come, merged at the start of the resync.
  const theirs = new Bitmap(TiB);
  for (let i = 0; i < runs.length; i += 4096) {
    for (const r of runs.slice(i, i + 4096)) theirs.mark(r.offset, r.length);
    await new Promise((resolve) => setImmediate(resolve));
  }
  await measure('1,000,000 peer runs: the bitmap merged when the resync begins', () => mine.merge(theirs));
} else {
  await measure('1,000,000 peer runs: marked when the resync begins', () => runs.forEach((r) => mine.mark(r.offset, r.length)));
}

const dev = new DiscardDevice(4 * TiB, 'discard');
const pool = await Pool.create('stalls', [dev]);
const vol = new ThinVolume(pool, await createVolume(pool, 'big', 2 * TiB));
const chunk = Buffer.alloc(65536, 1);
const chunks = (mappedGiB * GiB) / 65536;
for (let i = 0; i < chunks; i++) {
  const r = vol.write(((i * 7919) % ((2 * TiB) / 65536)) * 65536, chunk);
  if (r instanceof Promise) await r;
  if (i % 100_000 === 0) await pool.commit();
}
await pool.commit();
await measure(`checkpoint of ${mappedGiB} GiB mapped (scattered)`, () => pool.pump.checkpoint());
await pool.close();
await measure(`pool open with ${mappedGiB} GiB mapped (scattered)`, async () => (await Pool.open('stalls', [dev])).close());
