import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { BLOCK, Bitmap } from '../../src/replication/bitmap.js';

/** The model: a set of out-of-sync block numbers. */
function modelRuns(model: Set<number>, dataBytes: number): { offset: number; length: number }[] {
  const blocks = [...model].sort((a, b) => a - b);
  const runs: { offset: number; length: number }[] = [];
  for (const b of blocks) {
    const last = runs[runs.length - 1];
    const offset = b * BLOCK;
    const length = Math.min(dataBytes, offset + BLOCK) - offset;
    if (last && last.offset + last.length === offset) last.length += length;
    else runs.push({ offset, length });
  }
  return runs;
}

test('bitmap: mark/clear ranges agree with a set of blocks; runs, counts and the on-disk copy too', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 3 * 1024 * 1024 }),
      fc.array(fc.record({ mark: fc.boolean(), at: fc.double({ min: 0, max: 1, noNaN: true }), len: fc.integer({ min: 0, max: 300_000 }), writeBack: fc.boolean() }), { maxLength: 40 }),
      async (dataBytes, ops) => {
        const bm = new Bitmap(dataBytes);
        const model = new Set<number>();
        const blocks = Math.ceil(dataBytes / BLOCK);
        const dev = new MemoryDevice(Bitmap.bytesFor(dataBytes) + 8192, 'bm');
        for (const op of ops) {
          const offset = Math.floor(op.at * dataBytes);
          const length = Math.min(op.len, dataBytes - offset);
          if (op.mark) {
            bm.mark(offset, length);
            if (length > 0) for (let b = Math.floor(offset / BLOCK); b < Math.ceil((offset + length) / BLOCK); b++) model.add(b);
          } else {
            bm.clear(offset, length);
            if (length > 0) {
              const end = offset + length >= dataBytes ? blocks : Math.floor((offset + length) / BLOCK);
              for (let b = Math.ceil(offset / BLOCK); b < end; b++) model.delete(b);
            }
          }
          assert.equal(bm.count, model.size);
          if (op.writeBack) await bm.writeBack(dev, 8192);
        }
        assert.deepEqual([...bm.runs()], modelRuns(model, dataBytes));
        await bm.writeBack(dev, 8192);
        const again = await Bitmap.read(dev, 8192, dataBytes);
        assert.equal(again.count, model.size);
        assert.deepEqual([...again.runs()], modelRuns(model, dataBytes));
      },
    ),
    { numRuns: 200 },
  );
});

test('bitmap: write-back writes only the pages that changed', async () => {
  const dataBytes = 4 * 1024 ** 3; // 4 GiB: 1M blocks, 128 KiB of bitmap, 32 pages
  const bm = new Bitmap(dataBytes);
  assert.equal(Bitmap.bytesFor(dataBytes), 128 * 1024);
  const dev = new MemoryDevice(256 * 1024, 'bm');
  assert.equal(await bm.writeBack(dev, 0, true), 32);
  bm.mark(0, 1);
  bm.mark(dataBytes - 1, 1);
  bm.mark(1024 ** 3, 8192);
  assert.equal(await bm.writeBack(dev, 0), 3);
  assert.equal(await bm.writeBack(dev, 0), 0);
  bm.mark(0, 1); // already set: nothing changes
  assert.equal(await bm.writeBack(dev, 0), 0);
  const back = await Bitmap.read(dev, 0, dataBytes);
  assert.deepEqual([...back.runs()], [
    { offset: 0, length: BLOCK },
    { offset: 1024 ** 3, length: 2 * BLOCK },
    { offset: dataBytes - BLOCK, length: BLOCK },
  ]);
  assert.equal(back.outOfSyncBytes, 4 * BLOCK);
  back.markAll();
  assert.equal(back.count, dataBytes / BLOCK);
  back.clearAll();
  assert.equal(back.count, 0);
});

test('bitmap: firstRun walks the same ranges as runs, cut at any piece size', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 2 * 1024 * 1024 }),
      fc.array(fc.record({ at: fc.double({ min: 0, max: 1, noNaN: true }), len: fc.integer({ min: 1, max: 600_000 }) }), { maxLength: 20 }),
      fc.integer({ min: 1, max: 400 }),
      (dataBytes, marks, pieceBlocks) => {
        const bm = new Bitmap(dataBytes);
        for (const m of marks) bm.mark(Math.floor(m.at * dataBytes), m.len);
        const walked: { offset: number; length: number }[] = [];
        for (let cursor = 0, guard = 0; guard < 100_000; guard++) {
          const r = bm.firstRun(cursor, pieceBlocks * BLOCK);
          if (!r) break;
          assert.ok(r.length <= pieceBlocks * BLOCK);
          const last = walked[walked.length - 1];
          if (last && last.offset + last.length === r.offset) last.length += r.length;
          else walked.push({ ...r });
          cursor = r.offset + r.length;
        }
        assert.deepEqual(walked, [...bm.runs()]);
      },
    ),
    { numRuns: 300 },
  );
});
