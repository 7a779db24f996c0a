/**
 * Shared BlockDevice conformance suite: every implementation (memory, file,
 * faulty, later volumes and replicated resources) must pass it.
 *
 *   describeBlockDevice('memory', async (size, opts) => ({ dev, cleanup }));
 *
 * The factory must return a fresh device of exactly `size` bytes that reads
 * as zeros, read-only when `opts.readOnly` is set.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import {
  BlockDevice,
  BlockDeviceError,
  BlockErrorCode,
  Capabilities,
  Extent,
  EXTENT_HOLE,
  EXTENT_ZERO,
} from '../../src/blockdev/types.js';

export const KiB = 1024;
/** MemoryDevice's allocation chunk: offsets below straddle it on purpose. */
export const CHUNK = 64 * KiB;
/** Not a multiple of 512, 4 chunks and a tail. */
export const CONFORMANCE_SIZE = 4 * CHUNK + 1234;

export interface DeviceHandle {
  dev: BlockDevice;
  cleanup: () => unknown;
}
export interface FactoryOptions {
  readOnly?: boolean;
}
export type DeviceFactory = (size: number, options?: FactoryOptions) => Promise<DeviceHandle>;

export interface ConformanceOptions {
  /** Capabilities the device must report exactly (capabilities honesty). */
  capabilities?: Partial<Capabilities>;
  /** fast-check runs for the model property (default 40). */
  numRuns?: number;
  skip?: string | false;
}

// ---------------------------------------------------------------- helpers

/** Small seeded PRNG (mulberry32), returns [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Deterministic non-zero-heavy bytes (a zero byte is rare, so zeroing is visible). */
export function pattern(seed: number, length: number): Buffer {
  const rnd = mulberry32(seed);
  const buf = Buffer.alloc(length);
  for (let i = 0; i < length; i++) buf[i] = 1 + Math.floor(rnd() * 255);
  return buf;
}

export async function readAll(dev: BlockDevice, offset = 0, length = dev.size - offset): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee);
  await dev.read(offset, buf);
  return buf;
}

export function isZero(buf: Buffer): boolean {
  for (const b of buf) if (b !== 0) return false;
  return true;
}

/** `fn` must throw or reject with a BlockDeviceError of `code` (any code if null). */
export async function rejectsCode(fn: () => unknown, code: BlockErrorCode | null, what = ''): Promise<void> {
  await assert.rejects(
    async () => {
      await fn();
    },
    (err: unknown) => {
      assert.ok(err instanceof BlockDeviceError, `${what}: expected a BlockDeviceError, got ${String(err)}`);
      if (code !== null) assert.equal(err.code, code, `${what}: ${err.message}`);
      return true;
    },
    what,
  );
}

/** Checks the blockStatus contract; returns the extents. */
export async function checkExtents(dev: BlockDevice, offset: number, length: number): Promise<Extent[]> {
  const extents = await dev.blockStatus(offset, length);
  const where = `blockStatus(${offset}, ${length}) = ${JSON.stringify(extents)}`;
  assert.ok(Array.isArray(extents) && extents.length > 0, `${where}: at least one extent`);
  let pos = offset;
  for (const e of extents) {
    assert.equal(e.offset, pos, `${where}: contiguous from the offset`);
    assert.ok(Number.isSafeInteger(e.length) && e.length > 0, `${where}: positive lengths`);
    assert.equal(e.flags & ~(EXTENT_HOLE | EXTENT_ZERO), 0, `${where}: known flags only`);
    pos += e.length;
  }
  assert.ok(pos <= dev.size, `${where}: within the device (size ${dev.size})`);
  assert.ok(pos >= offset + 1, `${where}: covers at least one byte`);
  return extents;
}

/** A Buffer model whose bytes may be unknown (trimmed: content unspecified). */
class Model {
  readonly data: Buffer;
  readonly known: Uint8Array;
  constructor(initial: Buffer) {
    this.data = Buffer.from(initial);
    this.known = new Uint8Array(initial.length).fill(1);
  }
  write(offset: number, data: Buffer): void {
    data.copy(this.data, offset);
    this.known.fill(1, offset, offset + data.length);
  }
  zero(offset: number, length: number): void {
    this.data.fill(0, offset, offset + length);
    this.known.fill(1, offset, offset + length);
  }
  forget(offset: number, length: number): void {
    this.known.fill(0, offset, offset + length);
  }
  /** Index of the first known byte that differs, or -1. */
  mismatch(offset: number, actual: Buffer): number {
    for (let i = 0; i < actual.length; i++) {
      if (this.known[offset + i] && this.data[offset + i] !== actual[i]) return offset + i;
    }
    return -1;
  }
}

type Op =
  | { kind: 'write'; offset: number; length: number; seed: number; fua: boolean }
  | { kind: 'zero'; offset: number; length: number; noHole: boolean; fua: boolean }
  | { kind: 'trim'; offset: number; length: number }
  | { kind: 'read'; offset: number; length: number }
  | { kind: 'flush' };

function rangeArb(size: number): fc.Arbitrary<{ offset: number; length: number }> {
  const chunks = Math.floor(size / CHUNK);
  const nearBoundary = fc
    .tuple(fc.integer({ min: 0, max: chunks }), fc.integer({ min: -3, max: 3 }))
    .map(([c, d]) => Math.min(size, Math.max(0, c * CHUNK + d)));
  const offset = fc.oneof(fc.integer({ min: 0, max: size }), nearBoundary);
  const length = fc.oneof(fc.integer({ min: 0, max: 16 }), fc.integer({ min: 0, max: 2 * CHUNK + 7 }));
  return fc.tuple(offset, length).map(([o, l]) => ({ offset: o, length: Math.min(l, size - o) }));
}

function opArb(size: number): fc.Arbitrary<Op> {
  const r = rangeArb(size);
  return fc.oneof(
    { weight: 4, arbitrary: fc.tuple(r, fc.nat(), fc.boolean()).map(([x, seed, fua]): Op => ({ kind: 'write', ...x, seed, fua })) },
    { weight: 2, arbitrary: fc.tuple(r, fc.boolean(), fc.boolean()).map(([x, noHole, fua]): Op => ({ kind: 'zero', ...x, noHole, fua })) },
    { weight: 1, arbitrary: r.map((x): Op => ({ kind: 'trim', ...x })) },
    { weight: 3, arbitrary: r.map((x): Op => ({ kind: 'read', ...x })) },
    { weight: 1, arbitrary: fc.constant<Op>({ kind: 'flush' }) },
  );
}

// ---------------------------------------------------------------- the suite

export function describeBlockDevice(name: string, factory: DeviceFactory, options: ConformanceOptions = {}): void {
  const SIZE = CONFORMANCE_SIZE;

  async function withDevice(fn: (dev: BlockDevice) => Promise<void>, opts: FactoryOptions = {}): Promise<void> {
    const { dev, cleanup } = await factory(SIZE, opts);
    try {
      await fn(dev);
    } finally {
      await cleanup();
    }
  }

  describe(`BlockDevice conformance: ${name}`, { skip: options.skip ?? false }, () => {
    test('shape: size, block size limits, capabilities', () =>
      withDevice(async (dev) => {
        assert.equal(dev.size, SIZE);
        assert.equal(typeof dev.name, 'string');
        assert.ok(dev.name.length > 0);
        const { minimum, preferred, maximum } = dev.blockSize;
        assert.ok(minimum >= 1 && minimum <= 65536 && (minimum & (minimum - 1)) === 0, `minimum ${minimum}`);
        assert.ok(preferred >= minimum && maximum >= preferred, `${minimum} <= ${preferred} <= ${maximum}`);
        for (const [k, v] of Object.entries(dev.capabilities)) assert.equal(typeof v, 'boolean', k);
        assert.equal(dev.capabilities.readOnly, false);
        for (const [k, v] of Object.entries(options.capabilities ?? {})) {
          assert.equal(dev.capabilities[k as keyof Capabilities], v, `capabilities.${k}`);
        }
      }));

    test('a fresh device reads zeros', () =>
      withDevice(async (dev) => {
        assert.ok(isZero(await readAll(dev)));
      }));

    test('write/read round trips at unaligned offsets and lengths across chunk boundaries', () =>
      withDevice(async (dev) => {
        const model = Buffer.alloc(SIZE);
        const cases: [number, number][] = [
          [1, 1],
          [CHUNK - 1, 2],
          [CHUNK - 7, CHUNK + 13],
          [3, 3 * CHUNK - 5], // > 64 KiB: the file device's asynchronous path
          [2 * CHUNK + 4095, 4097],
          [SIZE - 17, 17],
          [SIZE - 1, 1],
          [12345, 0],
        ];
        let seed = 1;
        for (const [offset, length] of cases) {
          const data = pattern(seed++, length);
          await dev.write(offset, data);
          data.copy(model, offset);
          // read back exactly, then slightly wider, then the whole device
          assert.ok((await readAll(dev, offset, length)).equals(data), `exact read ${offset}+${length}`);
          const lo = Math.max(0, offset - 3);
          const hi = Math.min(SIZE, offset + length + 3);
          assert.ok((await readAll(dev, lo, hi - lo)).equals(model.subarray(lo, hi)), `wider read ${lo}..${hi}`);
        }
        assert.ok((await readAll(dev)).equals(model), 'whole device');
        // reads split differently from the writes
        for (let off = 0; off < SIZE; off += 50_001) {
          const n = Math.min(50_001, SIZE - off);
          assert.ok((await readAll(dev, off, n)).equals(model.subarray(off, off + n)), `split read at ${off}`);
        }
      }));

    test('the caller may reuse its buffer once write completes', () =>
      withDevice(async (dev) => {
        for (const length of [100, 2 * CHUNK]) {
          const data = pattern(length, length);
          const expected = Buffer.from(data);
          await dev.write(777, data);
          data.fill(0x55);
          assert.ok((await readAll(dev, 777, length)).equals(expected), `length ${length}`);
        }
      }));

    test('FUA writes and flush', () =>
      withDevice(async (dev) => {
        await dev.flush();
        const a = pattern(11, CHUNK + 3);
        await dev.write(CHUNK - 1, a, { fua: true });
        assert.ok((await readAll(dev, CHUNK - 1, a.length)).equals(a));
        const b = pattern(12, 10);
        await dev.write(5, b, { fua: false });
        await dev.flush();
        assert.ok((await readAll(dev, 5, 10)).equals(b));
        assert.ok((await readAll(dev, CHUNK - 1, a.length)).equals(a));
        await dev.flush(); // idempotent
      }));

    for (const zeroOpts of [{}, { noHole: true }, { fua: true }, { noHole: true, fua: true }]) {
      test(`writeZeroes ${JSON.stringify(zeroOpts)} reads zeros and leaves neighbours intact`, () =>
        withDevice(async (dev) => {
          const data = pattern(21, SIZE);
          await dev.write(0, data);
          const model = Buffer.from(data);
          const ranges: [number, number][] = [
            [CHUNK - 5, 10], // straddles a boundary, partial chunks
            [CHUNK + 100, 2 * CHUNK], // whole chunk 2 plus partials
            [SIZE - 1000, 1000], // the tail
            [4, 0],
          ];
          for (const [o, l] of ranges) {
            await dev.writeZeroes(o, l, zeroOpts);
            model.fill(0, o, o + l);
            assert.ok(isZero(await readAll(dev, o, l)), `zeroed ${o}+${l}`);
          }
          assert.ok((await readAll(dev)).equals(model), 'whole device matches');
          // zeroed ranges can be written again
          const again = pattern(22, 3 * CHUNK);
          await dev.write(CHUNK - 3, again);
          again.copy(model, CHUNK - 3);
          assert.ok((await readAll(dev)).equals(model), 'rewritten');
        }));
    }

    test('writeZeroes fastOnly: ENOTSUP unless fastZero, else zeros', () =>
      withDevice(async (dev) => {
        await dev.write(0, pattern(31, 2 * CHUNK));
        if (!dev.capabilities.fastZero) {
          await rejectsCode(() => dev.writeZeroes(0, CHUNK, { fastOnly: true }), 'ENOTSUP', 'fastOnly');
          assert.ok((await readAll(dev, 0, CHUNK)).equals(pattern(31, CHUNK)), 'nothing written on ENOTSUP');
        } else {
          await dev.writeZeroes(10, CHUNK, { fastOnly: true });
          assert.ok(isZero(await readAll(dev, 10, CHUNK)));
        }
      }));

    test('trim then write again; bytes outside the trimmed range are kept', () =>
      withDevice(async (dev) => {
        const data = pattern(41, SIZE);
        await dev.write(0, data);
        const ranges: [number, number][] = [
          [CHUNK - 9, 3 * CHUNK / 2], // partial + partial
          [3 * CHUNK, CHUNK], // one whole aligned chunk
          [SIZE - 1234, 1234], // the tail to the end
        ];
        for (const [o, l] of ranges) {
          await dev.trim(o, l);
          const before = await readAll(dev, 0, o);
          assert.ok(before.equals(data.subarray(0, o)), `before ${o} kept`);
          const afterStart = o + l;
          const after = await readAll(dev, afterStart, SIZE - afterStart);
          assert.ok(after.equals(data.subarray(afterStart)), `after ${afterStart} kept`);
          // trimmed content is unspecified: overwrite and check
          const fresh = pattern(o + 1, l);
          await dev.write(o, fresh);
          fresh.copy(data, o);
          assert.ok((await readAll(dev, o, l)).equals(fresh), `rewritten ${o}+${l}`);
        }
        await dev.trim(5, 0);
        await dev.trim(5, 10, { fua: true });
        await dev.write(5, data.subarray(5, 15));
        assert.ok((await readAll(dev)).equals(data));
      }));

    test('blockStatus: contiguous extents from the offset, within the device', () =>
      withDevice(async (dev) => {
        await dev.write(CHUNK + 10, pattern(51, 100));
        await dev.write(3 * CHUNK - 1, pattern(52, 2));
        await dev.writeZeroes(2 * CHUNK, CHUNK);
        await dev.trim(0, CHUNK);
        const probes: [number, number][] = [
          [0, SIZE],
          [0, 1],
          [1, 0],
          [CHUNK - 1, 3],
          [CHUNK + 50, 10],
          [2 * CHUNK + 7, CHUNK],
          [SIZE - 1, 1],
          [SIZE - 300, 300],
          [12345, SIZE - 12345],
        ];
        for (const [o, l] of probes) await checkExtents(dev, o, l);
        await dev.flush();
        for (const [o, l] of probes) await checkExtents(dev, o, l);
      }));

    test('blockStatus: data vs hole|zero, or only data without the extents capability', () =>
      withDevice(async (dev) => {
        await dev.write(0, pattern(61, 4096));
        await dev.flush();
        const written = await checkExtents(dev, 0, 4096);
        assert.equal(written[0]!.flags, 0, 'written region reports data');
        const untouched = await checkExtents(dev, 3 * CHUNK, 4096);
        if (dev.capabilities.extents) {
          assert.equal(untouched[0]!.flags, EXTENT_HOLE | EXTENT_ZERO, `untouched region: ${JSON.stringify(untouched)}`);
        } else {
          for (const e of await checkExtents(dev, 0, SIZE)) assert.equal(e.flags, 0, 'no extents capability: all data');
        }
      }));

    test('range errors: read, blockStatus and cache past the end reject EINVAL', () =>
      withDevice(async (dev) => {
        await rejectsCode(() => dev.read(SIZE - 1, Buffer.alloc(2)), 'EINVAL', 'read straddling the end');
        await rejectsCode(() => dev.read(SIZE, Buffer.alloc(1)), 'EINVAL', 'read at the end');
        await rejectsCode(() => dev.blockStatus(SIZE - 1, 2), 'EINVAL', 'blockStatus straddling the end');
        await rejectsCode(() => dev.blockStatus(SIZE + 1, 1), 'EINVAL', 'blockStatus past the end');
        await rejectsCode(() => dev.cache(SIZE, 1), 'EINVAL', 'cache past the end');
      }));

    test('range errors: write past the end rejects ENOSPC', () =>
      withDevice(async (dev) => {
        await rejectsCode(() => dev.write(SIZE - 1, Buffer.from([1, 2])), 'ENOSPC', 'write straddling the end');
        await rejectsCode(() => dev.write(SIZE, Buffer.from([1])), 'ENOSPC', 'write at the end');
        await rejectsCode(() => dev.write(SIZE + CHUNK, Buffer.from([1])), 'ENOSPC', 'write far past the end');
        await rejectsCode(() => dev.write(SIZE - 1, Buffer.from([1, 2]), { fua: true }), 'ENOSPC', 'FUA write past the end');
      }));

    test('range errors: trim and writeZeroes past the end reject ENOSPC', () =>
      withDevice(async (dev) => {
        await rejectsCode(() => dev.trim(SIZE - 1, 2), 'ENOSPC', 'trim past the end');
        await rejectsCode(() => dev.writeZeroes(SIZE - 1, 2), 'ENOSPC', 'writeZeroes past the end');
        await rejectsCode(() => dev.writeZeroes(SIZE - 1, 2, { noHole: true }), 'ENOSPC', 'writeZeroes noHole past the end');
      }));

    test('negative, fractional, NaN and unsafe offsets and lengths are rejected', () =>
      withDevice(async (dev) => {
        for (const bad of [-1, -CHUNK, 1.5, Number.NaN, 2 ** 53, Number.MAX_VALUE, Infinity]) {
          await rejectsCode(() => dev.read(bad, Buffer.alloc(1)), null, `read at ${bad}`);
          await rejectsCode(() => dev.write(bad, Buffer.from([9])), null, `write at ${bad}`);
          await rejectsCode(() => dev.trim(bad, 1), null, `trim at ${bad}`);
          await rejectsCode(() => dev.writeZeroes(bad, 1), null, `writeZeroes at ${bad}`);
          await rejectsCode(() => dev.blockStatus(bad, 1), null, `blockStatus at ${bad}`);
        }
        await rejectsCode(() => dev.trim(0, -1), null, 'negative trim length');
        await rejectsCode(() => dev.writeZeroes(0, -1), null, 'negative zero length');
        await rejectsCode(() => dev.writeZeroes(0, 2 ** 53), null, 'unsafe zero length');
      }));

    test('rejected requests leave no trace and do not break a later flush', () =>
      withDevice(async (dev) => {
        const data = pattern(71, SIZE);
        await dev.write(0, data);
        await dev.flush();
        const attempts: (() => unknown)[] = [
          () => dev.write(SIZE - 1, Buffer.from([1, 2])),
          () => dev.write(-1, Buffer.from([1])),
          () => dev.trim(SIZE - 1, 2),
          () => dev.writeZeroes(SIZE - 1, 2),
          () => dev.writeZeroes(-5, 6),
        ];
        for (const attempt of attempts) {
          try {
            await attempt();
          } catch {
            // expected; other tests check the codes
          }
        }
        assert.ok((await readAll(dev)).equals(data), 'content unchanged after rejected requests');
        // a valid write after them must be acknowledged, flushed and kept
        const good = pattern(72, 100);
        await dev.write(SIZE - 100, good);
        good.copy(data, SIZE - 100);
        await dev.flush();
        assert.ok((await readAll(dev)).equals(data), 'content after a flush: the valid write is kept');
      }));

    test('read-only: writes, trim and zeroes reject EPERM; reads work', () =>
      withDevice(
        async (dev) => {
          assert.equal(dev.capabilities.readOnly, true);
          await rejectsCode(() => dev.write(0, Buffer.from([1])), 'EPERM', 'write');
          await rejectsCode(() => dev.write(0, Buffer.from([1]), { fua: true }), 'EPERM', 'FUA write');
          await rejectsCode(() => dev.trim(0, 4096), 'EPERM', 'trim');
          await rejectsCode(() => dev.writeZeroes(0, 4096), 'EPERM', 'writeZeroes');
          await rejectsCode(() => dev.writeZeroes(0, 4096, { noHole: true }), 'EPERM', 'writeZeroes noHole');
          assert.ok(isZero(await readAll(dev)));
          await checkExtents(dev, 0, SIZE);
          await dev.flush();
          assert.ok(isZero(await readAll(dev)), 'still zeros after a flush');
        },
        { readOnly: true },
      ));

    test('after close, requests reject', () =>
      withDevice(async (dev) => {
        await dev.close();
        await rejectsCode(() => dev.read(0, Buffer.alloc(1)), null, 'read after close');
        await rejectsCode(() => dev.write(0, Buffer.alloc(1)), null, 'write after close');
      }));

    test('property: random write/writeZeroes/trim/read/flush sequences match a Buffer model', async () => {
      const { dev, cleanup } = await factory(SIZE);
      try {
        await fc.assert(
          fc.asyncProperty(fc.array(opArb(SIZE), { minLength: 1, maxLength: 25 }), async (ops) => {
            const model = new Model(await readAll(dev));
            for (const op of ops) {
              switch (op.kind) {
                case 'write': {
                  const data = pattern(op.seed, op.length);
                  await dev.write(op.offset, data, { fua: op.fua });
                  model.write(op.offset, data);
                  break;
                }
                case 'zero':
                  await dev.writeZeroes(op.offset, op.length, { noHole: op.noHole, fua: op.fua });
                  model.zero(op.offset, op.length);
                  break;
                case 'trim':
                  await dev.trim(op.offset, op.length);
                  model.forget(op.offset, op.length);
                  break;
                case 'read': {
                  const got = await readAll(dev, op.offset, op.length);
                  const bad = model.mismatch(op.offset, got);
                  assert.equal(bad, -1, `read ${op.offset}+${op.length}: byte ${bad} differs`);
                  break;
                }
                case 'flush':
                  await dev.flush();
                  break;
              }
            }
            const bad = model.mismatch(0, await readAll(dev));
            assert.equal(bad, -1, `final whole-device read: byte ${bad} differs`);
          }),
          { numRuns: options.numRuns ?? 40, seed: 424242 },
        );
      } finally {
        await cleanup();
      }
    });
  });
}
