import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice, FaultOp } from '../../src/blockdev/faulty.js';
import { BlockDevice } from '../../src/blockdev/types.js';
import { isZero, mulberry32, pattern, readAll, rejectsCode } from './conformance.js';

const SIZE = 256 * 1024;

/** A FaultyDevice over a memory device pre-filled (durably) with a pattern. */
async function setup(options: { random?: () => number; size?: number } = {}): Promise<{
  inner: MemoryDevice;
  dev: FaultyDevice;
  initial: Buffer;
}> {
  const size = options.size ?? SIZE;
  const inner = new MemoryDevice(size, 'inner');
  const initial = pattern(1234, size);
  inner.write(0, initial);
  const dev = new FaultyDevice(inner, { random: options.random });
  return { inner, dev, initial };
}

const ALL_OPS: [FaultOp, (d: BlockDevice) => unknown][] = [
  ['read', (d) => d.read(0, Buffer.alloc(10))],
  ['write', (d) => d.write(0, Buffer.alloc(10, 1))],
  ['flush', (d) => d.flush()],
  ['trim', (d) => d.trim(0, 10)],
  ['writeZeroes', (d) => d.writeZeroes(0, 10)],
  ['blockStatus', (d) => d.blockStatus(0, 10)],
  ['cache', (d) => d.cache(0, 10)],
];

describe('FaultyDevice.failWith', () => {
  test('count: fails exactly that many matching requests, other ops unaffected', async () => {
    const { dev, initial } = await setup();
    dev.failWith({ op: 'write', count: 2 });
    await rejectsCode(() => dev.write(0, Buffer.from('a')), 'EIO', 'first write');
    await dev.read(0, Buffer.alloc(4)); // reads are not matched and do not consume the count
    await rejectsCode(() => dev.write(100, Buffer.from('b')), 'EIO', 'second write');
    await dev.write(0, Buffer.from('c'));
    await dev.write(1, Buffer.from('d'));
    const got = await readAll(dev, 0, 4);
    assert.equal(got.subarray(0, 2).toString(), 'cd');
    assert.ok(got.subarray(2).equals(initial.subarray(2, 4)));
    assert.equal((await readAll(dev, 100, 1))[0], initial[100], 'the failed write left no trace');
    assert.equal(dev.calls.write, 4);
    assert.equal(dev.calls.read, 3);
  });

  test('offset range: only requests touching [offset, offset+length) fail, with the given code', async () => {
    const { dev } = await setup();
    dev.failWith({ op: 'read', offset: 4096, length: 4096, code: 'ENOSPC' });
    const read = (o: number, n: number) => dev.read(o, Buffer.alloc(n));
    await read(0, 4096); // ends right before
    await read(8192, 100); // starts right after
    await rejectsCode(() => read(4095, 2), 'ENOSPC', 'straddles the start');
    await rejectsCode(() => read(8191, 10), 'ENOSPC', 'straddles the end');
    await rejectsCode(() => read(0, 3 * 4096), 'ENOSPC', 'covers it');
    await rejectsCode(() => read(5000, 1), 'ENOSPC', 'inside');
    await dev.write(4096, Buffer.alloc(4096, 7)); // writes are another op
    // a zero-length request at an offset counts as touching one byte
    await rejectsCode(() => read(4096, 0), 'ENOSPC', 'zero length inside');
    await read(8192, 0);
  });

  test('offset without length: one byte', async () => {
    const { dev } = await setup();
    dev.failWith({ op: 'write', offset: 10 });
    await dev.write(9, Buffer.alloc(1));
    await dev.write(11, Buffer.alloc(1));
    await rejectsCode(() => dev.write(10, Buffer.alloc(1)), 'EIO', 'byte 10');
  });

  test("op '*' matches every op; clearFaults removes the rules", async () => {
    const { dev } = await setup();
    dev.failWith({ op: '*', code: 'EPERM' });
    for (const [op, call] of ALL_OPS) await rejectsCode(() => call(dev), 'EPERM', op);
    for (const [op] of ALL_OPS) assert.equal(dev.calls[op], 1, `calls.${op}`);
    dev.clearFaults();
    for (const [, call] of ALL_OPS) await call(dev);
  });

  test('count with op * is shared across ops', async () => {
    const { dev } = await setup();
    dev.failWith({ op: '*', count: 3 });
    await rejectsCode(() => dev.read(0, Buffer.alloc(1)), 'EIO', 'read');
    await rejectsCode(() => dev.flush(), 'EIO', 'flush');
    await rejectsCode(() => dev.trim(0, 1), 'EIO', 'trim');
    for (const [, call] of ALL_OPS) await call(dev);
  });

  test('probability with a seeded PRNG: about that fraction fails, reproducibly', async () => {
    const pattern1: boolean[] = [];
    const pattern2: boolean[] = [];
    for (const out of [pattern1, pattern2]) {
      const { dev } = await setup({ random: mulberry32(7) });
      dev.failWith({ op: 'read', probability: 0.3 });
      for (let i = 0; i < 1000; i++) {
        try {
          await dev.read(i, Buffer.alloc(1));
          out.push(false);
        } catch {
          out.push(true);
        }
      }
    }
    assert.deepEqual(pattern1, pattern2, 'same seed, same failures');
    const failures = pattern1.filter(Boolean).length;
    assert.ok(failures > 240 && failures < 360, `~300 of 1000 failed: ${failures}`);
    // probability 0 never fires, 1 always
    const { dev } = await setup({ random: mulberry32(8) });
    dev.failWith({ op: 'write', probability: 0 });
    for (let i = 0; i < 50; i++) await dev.write(i, Buffer.alloc(1));
    dev.clearFaults();
    dev.failWith({ op: 'write', probability: 1 });
    for (let i = 0; i < 50; i++) await rejectsCode(() => dev.write(i, Buffer.alloc(1)), 'EIO', `write ${i}`);
  });

  test('probability and count together: count only consumed by failures', async () => {
    const { dev } = await setup({ random: mulberry32(9) });
    dev.failWith({ op: 'read', probability: 0.5, count: 5 });
    let failures = 0;
    for (let i = 0; i < 200; i++) {
      try {
        await dev.read(0, Buffer.alloc(1));
      } catch {
        failures++;
      }
    }
    assert.equal(failures, 5);
  });
});

describe('FaultyDevice.setLatency', () => {
  test('delays every request; requests overlap; 0 removes it', async () => {
    const { dev } = await setup();
    dev.setLatency(40);
    let t0 = performance.now();
    await dev.read(0, Buffer.alloc(1));
    assert.ok(performance.now() - t0 >= 35, 'read delayed');
    t0 = performance.now();
    await dev.flush();
    assert.ok(performance.now() - t0 >= 35, 'flush delayed');
    t0 = performance.now();
    await Promise.all(Array.from({ length: 10 }, (_, i) => dev.write(i * 10, Buffer.alloc(5, i))));
    const elapsed = performance.now() - t0;
    assert.ok(elapsed >= 35 && elapsed < 300, `10 concurrent writes in ~40 ms, took ${elapsed}`);
    dev.setLatency(0);
    t0 = performance.now();
    for (let i = 0; i < 20; i++) await dev.read(0, Buffer.alloc(1));
    assert.ok(performance.now() - t0 < 35, 'no latency');
  });

  test('clearFaults also removes latency', async () => {
    const { dev } = await setup();
    dev.setLatency(1000);
    dev.clearFaults();
    const t0 = performance.now();
    await dev.read(0, Buffer.alloc(1));
    assert.ok(performance.now() - t0 < 100);
  });
});

describe('FaultyDevice power cut', () => {
  test("unflushed writes are lost after powerCut({keep:'none'})", async () => {
    const { inner, dev, initial } = await setup();
    const data = pattern(5, 70_000);
    await dev.write(1000, data);
    assert.ok((await readAll(dev, 1000, data.length)).equals(data), 'visible through the cache');
    assert.ok((await readAll(inner, 1000, data.length)).equals(initial.subarray(1000, 1000 + data.length)), 'not yet on stable storage');
    assert.equal(dev.unflushedWrites, 1);
    await dev.powerCut({ keep: 'none' });
    assert.ok((await readAll(inner)).equals(initial), 'inner shows the pre-write state');
    dev.powerOn();
    assert.ok((await readAll(dev)).equals(initial), 'after power on too');
    assert.equal(dev.unflushedWrites, 0);
  });

  test('flushed writes survive', async () => {
    const { inner, dev, initial } = await setup();
    const model = Buffer.from(initial);
    const a = pattern(6, 100_000);
    await dev.write(10, a);
    a.copy(model, 10);
    await dev.flush();
    const b = pattern(7, 10);
    await dev.write(20, b); // unflushed: lost
    await dev.powerCut({ keep: 'none' });
    assert.ok((await readAll(inner)).equals(model));
  });

  test('FUA writes survive without a flush; earlier unflushed writes do not', async () => {
    const { inner, dev, initial } = await setup();
    const model = Buffer.from(initial);
    await dev.write(0, Buffer.alloc(100, 1)); // lost
    const fua = pattern(8, 5000);
    await dev.write(50_000, fua, { fua: true });
    fua.copy(model, 50_000);
    assert.ok((await readAll(inner, 50_000, fua.length)).equals(fua), 'durable at completion');
    await dev.powerCut({ keep: 'none' });
    assert.ok((await readAll(inner)).equals(model));
  });

  test('unflushed writeZeroes and trim are lost; FUA ones survive', async () => {
    const { inner, dev, initial } = await setup();
    const model = Buffer.from(initial);
    await dev.writeZeroes(0, 70_000);
    await dev.writeZeroes(100_000, 5_000, { noHole: true });
    await dev.trim(128 * 1024, 64 * 1024);
    assert.ok(isZero(await readAll(dev, 0, 70_000)), 'zeros visible through the cache');
    await dev.writeZeroes(200_000, 3_000, { fua: true });
    model.fill(0, 200_000, 203_000);
    await dev.powerCut({ keep: 'none' });
    const got = await readAll(inner);
    assert.ok(got.subarray(0, 200_000).equals(model.subarray(0, 200_000)), 'unflushed zeroes/trim lost');
    assert.ok(isZero(got.subarray(200_000, 203_000)), 'FUA writeZeroes survived');
    assert.ok(got.subarray(203_000).equals(model.subarray(203_000)));

    // FUA trim: the range must not read as the old data... content is unspecified,
    // but it reached stable storage, so the inner device saw the trim.
    dev.powerOn();
    await dev.trim(0, 64 * 1024, { fua: true });
    await dev.powerCut({ keep: 'none' });
    assert.ok(inner.allocatedBytes < 4 * 64 * 1024, 'FUA trim deallocated on the inner device');
  });

  test('after powerCut every op rejects EIO until powerOn', async () => {
    const { dev } = await setup();
    await dev.powerCut();
    for (const [op, call] of ALL_OPS) await rejectsCode(() => call(dev), 'EIO', op);
    await rejectsCode(() => dev.write(0, Buffer.alloc(1), { fua: true }), 'EIO', 'FUA write');
    dev.powerOn();
    for (const [, call] of ALL_OPS) await call(dev);
    await dev.powerCut({ keep: 'random', random: mulberry32(1) });
    await rejectsCode(() => dev.read(0, Buffer.alloc(1)), 'EIO', 'off again');
    dev.powerOn();
    await dev.read(0, Buffer.alloc(1));
  });

  test('writes during the outage are not queued', async () => {
    const { inner, dev, initial } = await setup();
    await dev.powerCut();
    await rejectsCode(() => dev.write(0, Buffer.alloc(10, 9)), 'EIO', 'write');
    dev.powerOn();
    await dev.flush();
    assert.ok((await readAll(inner)).equals(initial));
    assert.ok((await readAll(dev)).equals(initial));
  });
});

// ------------------------------------------------------- keep:'random' property

type PowerOp =
  | { kind: 'write'; offset: number; data: number[]; fua: boolean }
  | { kind: 'zero'; offset: number; length: number; noHole: boolean; fua: boolean }
  | { kind: 'trim'; offset: number; length: number; fua: boolean };

const SMALL = 24;

function powerOpArb(allowFua: boolean): fc.Arbitrary<PowerOp> {
  const fua = allowFua ? fc.boolean() : fc.constant(false);
  const range = fc
    .tuple(fc.integer({ min: 0, max: SMALL - 1 }), fc.integer({ min: 1, max: SMALL }))
    .map(([o, l]) => ({ offset: o, length: Math.min(l, SMALL - o) }));
  return fc.oneof(
    { weight: 4, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 255 }), fua).map(([r, b, f]): PowerOp => ({
      kind: 'write', offset: r.offset, data: Array.from({ length: r.length }, (_, i) => ((b + i * 37) % 255) + 1), fua: f,
    })) },
    { weight: 1, arbitrary: fc.tuple(range, fc.boolean(), fua).map(([r, noHole, f]): PowerOp => ({ kind: 'zero', ...r, noHole, fua: f })) },
    { weight: 1, arbitrary: fc.tuple(range, fua).map(([r, f]): PowerOp => ({ kind: 'trim', ...r, fua: f })) },
  );
}

async function issue(dev: BlockDevice, op: PowerOp): Promise<void> {
  if (op.kind === 'write') await dev.write(op.offset, Buffer.from(op.data), { fua: op.fua });
  else if (op.kind === 'zero') await dev.writeZeroes(op.offset, op.length, { noHole: op.noHole, fua: op.fua });
  else await dev.trim(op.offset, op.length, { fua: op.fua });
}

/** Bytes as values, -1 = unknown (trimmed: content unspecified). */
function applyModel(state: number[], op: PowerOp): void {
  if (op.kind === 'write') op.data.forEach((b, i) => (state[op.offset + i] = b));
  else for (let i = op.offset; i < op.offset + op.length; i++) state[i] = op.kind === 'zero' ? 0 : -1;
}

function matches(state: number[], actual: Buffer): boolean {
  return state.every((b, i) => b === -1 || b === actual[i]);
}

/**
 * Is `actual` the result of applying some subsequence of `ops` (in order) to
 * `base`, the subsequence including every op for which `required` holds?
 */
function someSubsequence(base: number[], ops: PowerOp[], required: (op: PowerOp) => boolean, actual: Buffer): number[] | null {
  const n = ops.length;
  for (let mask = 0; mask < 1 << n; mask++) {
    if (ops.some((op, i) => required(op) && !(mask & (1 << i)))) continue;
    const state = [...base];
    ops.forEach((op, i) => {
      if (mask & (1 << i)) applyModel(state, op);
    });
    if (matches(state, actual)) return ops.map((_, i) => (mask >> i) & 1);
  }
  return null;
}

async function runPowerCut(flushed: PowerOp[], unflushed: PowerOp[], seed: number): Promise<{ base: number[]; actual: Buffer }> {
  const inner = new MemoryDevice(SMALL, 'inner');
  const initial = pattern(seed, SMALL);
  inner.write(0, initial);
  const dev = new FaultyDevice(inner);
  const base = [...initial];
  for (const op of flushed) {
    await issue(dev, op);
    applyModel(base, op);
  }
  await dev.flush();
  for (const op of unflushed) await issue(dev, op);
  await dev.powerCut({ keep: 'random', random: mulberry32(seed) });
  return { base, actual: await readAll(inner) };
}

describe("FaultyDevice powerCut({keep:'random'})", () => {
  test('a seeded PRNG gives a reproducible, strict, in-order subset', async () => {
    const ops: PowerOp[] = Array.from({ length: 10 }, (_, i) => ({ kind: 'write', offset: i * 2, data: [i + 1, i + 1], fua: false }));
    const a = await runPowerCut([], ops, 3);
    const b = await runPowerCut([], ops, 3);
    assert.ok(a.actual.equals(b.actual), 'same seed, same survivors');
    const kept = someSubsequence(a.base, ops, () => false, a.actual);
    assert.ok(kept, 'a subsequence');
    const n = kept.filter(Boolean).length;
    assert.ok(n > 0 && n < 10, `some but not all of 10 writes kept with this seed (${n})`);
  });

  test('property: inner content = flushed state + some in-order subsequence of the unflushed ops', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(powerOpArb(false), { maxLength: 3 }),
        fc.array(powerOpArb(false), { minLength: 1, maxLength: 7 }),
        fc.nat(),
        async (flushed, unflushed, seed) => {
          const { base, actual } = await runPowerCut(flushed, unflushed, seed);
          const kept = someSubsequence(base, unflushed, () => false, actual);
          assert.ok(kept, `inner ${JSON.stringify([...actual])} is no in-order subsequence of the unflushed ops`);
        },
      ),
      { numRuns: 300, seed: 1357 },
    );
  });

  test('property: with FUA ops, every FUA op is part of the surviving subsequence', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(powerOpArb(true), { maxLength: 2 }),
        fc.array(powerOpArb(true), { minLength: 1, maxLength: 7 }),
        fc.nat(),
        async (flushed, unflushed, seed) => {
          const { base, actual } = await runPowerCut(flushed, unflushed, seed);
          const kept = someSubsequence(base, unflushed, (op) => op.fua, actual);
          assert.ok(kept, `inner ${JSON.stringify([...actual])}: no in-order subsequence containing every FUA op`);
        },
      ),
      { numRuns: 300, seed: 2468 },
    );
  });

  test('an earlier unflushed write never lands on top of a later FUA write', async () => {
    const inner = new MemoryDevice(16, 'inner');
    const dev = new FaultyDevice(inner);
    await dev.write(0, Buffer.alloc(8, 0xaa)); // unflushed
    await dev.write(0, Buffer.alloc(8, 0xbb), { fua: true }); // durable on completion
    assert.ok((await readAll(inner, 0, 8)).equals(Buffer.alloc(8, 0xbb)));
    const decisions = [0.1, 0.9]; // the cache had destaged the first write, not (again) the second
    await dev.powerCut({ keep: 'random', random: () => decisions.shift() ?? 0.9 });
    assert.deepEqual([...(await readAll(inner, 0, 8))], Array(8).fill(0xbb), 'the FUA data must survive the power cut');
  });
});
