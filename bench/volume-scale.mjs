#!/usr/bin/env node
// bench/volume-scale.mjs - snapshot/clone time at 1 GiB and 1 TiB virtual size,
// and metadata memory / on-disk size per mapped chunk (extrapolated per TiB).
// Not a test. Needs `npm run build` first. Usage: node bench/volume-scale.mjs [--mapped-gib 16]
//
// Snapshot times use a pool on a sparse file (commits really fsync). For the metadata
// figures the pool sits on a "discard" device (reads zeros, drops writes, flush is a no-op) of
// 4 TiB, so the figures are the volume layer's own cost, not the disk's.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FileDevice } from '../dist/src/blockdev/file.js';
import { Pool } from '../dist/src/volume/pool.js';
import { ThinVolume } from '../dist/src/volume/volume.js';
import { createVolume, shareVolume } from '../dist/src/volume/operations.js';
import { serializeCheckpoint } from '../dist/src/volume/checkpoint.js';

const GiB = 1024 ** 3;
const TiB = 1024 ** 4;
const args = process.argv.slice(2);
const mappedGiB = Number(args[args.indexOf('--mapped-gib') + 1] || 16);

class DiscardDevice {
  constructor(size, name) {
    this.size = size;
    this.name = name;
    this.blockSize = { minimum: 1, preferred: 4096, maximum: 64 * 1024 * 1024 };
    this.capabilities = { readOnly: false, flush: true, fua: true, trim: true, fastZero: true, extents: false, multiConn: true, rotational: false };
    // Superblocks, journal and checkpoint pieces are kept so the pool can reopen; data is dropped.
    this.kept = new Map();
  }
  read(offset, into) {
    into.fill(0);
    for (const [o, b] of this.kept) {
      const s = Math.max(o, offset), e = Math.min(o + b.length, offset + into.length);
      if (s < e) b.copy(into, s - offset, s - o, e - o);
    }
  }
  write(offset, data) {
    if (data.length <= 65536 && (offset < 16 * 1024 * 1024 || data.subarray(0, 8).toString() === 'DUETCKPT')) this.kept.set(offset, Buffer.from(data));
  }
  flush() {}
  trim() {}
  writeZeroes() {}
  blockStatus(offset, length) { return [{ offset, length, flags: 0 }]; }
  cache() {}
  close() {}
}

function ms(t0) { return Number(process.hrtime.bigint() - t0) / 1e6; }
function median(xs) { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; }

// Metadata per mapped data: map N GiB (one 64 KiB chunk write each) into a fresh pool.
const dev2 = new DiscardDevice(4 * TiB, 'discard-4T-b');
const pool2 = await Pool.create('scale', [dev2]);
const st = await createVolume(pool2, 'big', 2 * TiB);
const vol = new ThinVolume(pool2, st);
global.gc?.();
const heap0 = process.memoryUsage();
const results = [];
const chunk = Buffer.alloc(65536, 1);
const chunks = mappedGiB * 16384;
let t0 = process.hrtime.bigint();
for (let c = 0; c < chunks; c++) await vol.write(c * 65536, chunk);
const writeMs = ms(t0);
await vol.flush();
global.gc?.();
const heap1 = process.memoryUsage();
t0 = process.hrtime.bigint();
const stream = serializeCheckpoint({ nextVolumeId: pool2.nextVolumeId, volumes: [...pool2.volumes.values()].map((v) => ({ record: v.record, root: v.root })) });
const serMs = ms(t0);
const mappedTiB = (chunks * 65536) / TiB;
// What the discard device keeps (journal records, for the reopen below) is not the pool's memory.
const keptBytes = [...dev2.kept.values()].reduce((n, b) => n + b.length, 0);
const memPerTiB = (heap1.heapUsed + heap1.arrayBuffers - heap0.heapUsed - heap0.arrayBuffers - keptBytes) / mappedTiB;
results.push(`mapped ${mappedGiB} GiB (${chunks} chunks of 64 KiB) in ${(writeMs / 1000).toFixed(1)} s (${((chunks * 65536) / writeMs / 1000).toFixed(0)} MB/s of first writes, discard device)`);
results.push(`map memory: ${((memPerTiB) / 2 ** 20).toFixed(0)} MiB per TiB mapped (measured heap+arrayBuffers growth), plus the pool's chunk table: 4 bytes per chunk = ${(4 * TiB / 65536 / 2 ** 20).toFixed(0)} MiB per TiB of pool`);
results.push(`checkpoint: ${(stream.length / mappedTiB / 2 ** 20).toFixed(1)} MiB per TiB mapped per copy (x2 copies on disk), serialized in ${serMs.toFixed(0)} ms for ${mappedGiB} GiB`);
t0 = process.hrtime.bigint();
await pool2.close();
const reopenDev = dev2;
reopenDev.close = () => {};
t0 = process.hrtime.bigint();
const again = await Pool.open('scale', [reopenDev]);
results.push(`reopen (read checkpoint, rebuild counts, write a fresh checkpoint) with ${mappedGiB} GiB mapped: ${ms(t0).toFixed(0)} ms`);
await again.close();
// Snapshot time on a real (sparse) file: the commit's flushes are part of it.
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-scale-'));
const file = path.join(dir, 'pool.img');
fs.closeSync(fs.openSync(file, 'w'));
fs.truncateSync(file, 64 * GiB);
const pool = await Pool.create('bench', [FileDevice.open(file)]);

// Snapshot/clone time: 1 GiB and 1 TiB volumes, each with 1 GiB written.
for (const [label, size] of [['1G', GiB], ['1T', TiB]]) {
  const st = await createVolume(pool, `v${label}`, size);
  const vol = new ThinVolume(pool, st);
  const buf = Buffer.alloc(1024 * 1024, 7);
  // 1 GiB written, spread over the whole virtual size.
  for (let i = 0; i < 1024; i++) await vol.write(Math.floor((i * (size / 1024)) / buf.length) * buf.length, buf);
  await vol.flush();
  const snap = [], clone = [];
  for (let i = 0; i < 7; i++) {
    let t0 = process.hrtime.bigint();
    await shareVolume(pool, `v${label}`, `s${label}-${i}`, false);
    snap.push(ms(t0));
    t0 = process.hrtime.bigint();
    await shareVolume(pool, `s${label}-${i}`, `c${label}-${i}`, true);
    clone.push(ms(t0));
    await vol.write(0, buf); // diverge a little, as between real snapshots
  }
  results.push(`snapshot ${label} virtual (1 GiB mapped): median ${median(snap).toFixed(2)} ms (min ${Math.min(...snap).toFixed(2)}, max ${Math.max(...snap).toFixed(2)})`);
  results.push(`clone    ${label} virtual (1 GiB mapped): median ${median(clone).toFixed(2)} ms (min ${Math.min(...clone).toFixed(2)}, max ${Math.max(...clone).toFixed(2)})`);
}

await pool.close();
fs.rmSync(dir, { recursive: true, force: true });
console.log(results.join('\n'));
