/**
 * Shared helpers of the volume model and crash tests: seeded randomness,
 * devices that outlive a pool, and comparing a volume with its model.
 */
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { BlockDevice, BlockDeviceError } from '../../src/blockdev/types.js';
import { Pool } from '../../src/volume/pool.js';
import { ThinVolume } from '../../src/volume/volume.js';
import { checkPool } from '../../src/volume/check.js';
import { diffVolumes } from '../../src/volume/operations.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

// One seeded PRNG and byte pattern for all device tests (never-zero bytes, so a lost write or a stray zeroing shows).
export { mulberry32, pattern } from '../blockdev/conformance.js';

/** The same device, but close() leaves the data for the next open (a disk outlives a process). */
export function keep<T extends BlockDevice>(d: T): T {
  return new Proxy(d, { get: (t, k) => (k === 'close' ? () => undefined : Reflect.get(t, k, t)) });
}

export function memoryDevices(sizes: number[]): MemoryDevice[] {
  return sizes.map((s, i) => new MemoryDevice(s, `d${i}`));
}

export function vol(pool: Pool, name: string): ThinVolume {
  const st = pool.volume(name);
  assert.ok(st, `volume ${name} exists in pool ${pool.name}`);
  return new ThinVolume(pool, st);
}

export async function readVolume(pool: Pool, name: string): Promise<Buffer> {
  const v = vol(pool, name);
  const buf = Buffer.alloc(v.size, 0xee);
  await v.read(0, buf);
  return buf;
}

/** First index where a and b differ, -1 if equal (lengths must match). */
export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  if (a.equals(b)) return -1;
  // Binary-ish search by blocks, then bytes.
  const step = 4096;
  for (let at = 0; at < a.length; at += step) {
    const end = Math.min(a.length, at + step);
    if (!a.subarray(at, end).equals(b.subarray(at, end))) {
      for (let i = at; i < end; i++) if (a[i] !== b[i]) return i;
    }
  }
  return -1;
}

export function describeDiff(what: string, expected: Buffer, actual: Buffer): string {
  if (expected.length !== actual.length) return `${what}: size ${actual.length}, expected ${expected.length}`;
  const i = firstDiff(expected, actual);
  let last = i;
  let count = 0;
  for (let k = i; k < expected.length; k++) {
    if (expected[k] !== actual[k]) {
      count++;
      last = k;
    }
  }
  return `${what}: ${count} byte(s) differ in [${i}, ${last}]; at ${i} expected ${expected[i]}, read ${actual[i]}`;
}

export async function assertPoolOk(pool: Pool, when: string): Promise<void> {
  const report = await checkPool(pool);
  assert.ok(report.ok, `checkPool after ${when}: ${report.problems.join('\n  ')}`);
}

/** Every byte where NEW differs from OLD (past an end counts as zero) must lie in a diff range. */
export function assertDiffCovers(pool: Pool, oldName: string, oldContent: Buffer, newName: string, newContent: Buffer, when: string): void {
  const ranges = diffVolumes(pool, oldName, newName);
  const cs = pool.chunkSize;
  const covered = new Set<number>();
  for (const r of ranges) {
    assert.equal(r.offset % cs, 0, `diff range ${JSON.stringify(r)} is chunk-aligned`);
    assert.equal(r.length % cs, 0, `diff range ${JSON.stringify(r)} is chunk-aligned`);
    for (let c = r.offset / cs; c < (r.offset + r.length) / cs; c++) covered.add(c);
  }
  const n = Math.max(oldContent.length, newContent.length);
  for (let c = 0; c * cs < n; c++) {
    if (covered.has(c)) continue;
    const from = c * cs;
    const to = Math.min(n, from + cs);
    for (let i = from; i < to; i++) {
      const a = i < oldContent.length ? oldContent[i] : 0;
      const b = i < newContent.length ? newContent[i] : 0;
      if (a !== b) {
        assert.fail(`${when}: diff(${oldName}, ${newName}) = ${JSON.stringify(ranges)} misses chunk ${c}: byte ${i} is ${a} in ${oldName}, ${b} in ${newName}`);
      }
    }
  }
}

export function isBlockError(err: unknown, code: string): boolean {
  return err instanceof BlockDeviceError && err.code === code;
}

/** Resolve after `n` microtask turns (cuts power "in the middle" of a chain of awaits). */
export async function microticks(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await Promise.resolve();
}

export function macrotick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/* ------------------------------------------------------------ byte ranges */

export type Align = 'any' | 'sector' | 'chunk' | 'straddle' | 'tail';

/**
 * A byte range of a volume of `size` bytes from raw numbers; the `align`
 * modes make chunk-aligned ranges, ranges straddling a chunk boundary and
 * ranges reaching the volume's end common.
 */
export function pickRange(size: number, cs: number, off: number, len: number, align: Align): [number, number] {
  const maxLen = Math.min(size, 3 * cs + 5000);
  let o: number;
  let l: number;
  switch (align) {
    case 'any':
      o = off % size;
      l = 1 + (len % Math.min(maxLen, size - o));
      break;
    case 'sector':
      o = Math.floor((off % size) / 512) * 512;
      l = Math.min(size - o, 512 * (1 + (len % Math.max(1, Math.floor(maxLen / 512)))));
      break;
    case 'chunk':
      o = Math.floor((off % size) / cs) * cs;
      l = Math.min(size - o, cs * (1 + (len % 3)));
      break;
    case 'straddle': {
      const chunks = Math.ceil(size / cs);
      if (chunks < 2) return pickRange(size, cs, off, len, 'any');
      const boundary = cs * (1 + (off % (chunks - 1)));
      o = boundary - 1 - (len % Math.min(cs, boundary));
      l = Math.min(size - o, boundary - o + 1 + (Math.floor(len / cs) % cs));
      break;
    }
    case 'tail':
      o = size - 1 - (off % Math.min(size, maxLen));
      l = size - o;
      break;
  }
  assert.ok(o >= 0 && l >= 1 && o + l <= size, `range ${o}+${l} in ${size}`);
  return [o, l];
}

/** Whole chunks inside [o, o+l) (the last, partial chunk counts when the range reaches the end): what trim unmaps. */
export function trimmedRange(size: number, cs: number, o: number, l: number): [number, number] | undefined {
  const from = Math.ceil(o / cs);
  const to = o + l === size ? Math.ceil(size / cs) : Math.floor((o + l) / cs);
  if (from >= to) return undefined;
  return [from * cs, Math.min(size, to * cs)];
}

