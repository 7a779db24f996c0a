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

/** The model for big bitmaps: sorted, disjoint, non-adjacent block intervals [start, end). */
type Intervals = [number, number][];

function addInterval(m: Intervals, s: number, e: number): Intervals {
  if (s >= e) return m;
  const out: Intervals = [];
  for (const [a, b] of m) {
    if (b < s || a > e) out.push([a, b]);
    else {
      s = Math.min(s, a);
      e = Math.max(e, b);
    }
  }
  out.push([s, e]);
  return out.sort((x, y) => x[0] - y[0]);
}

function removeInterval(m: Intervals, s: number, e: number): Intervals {
  if (s >= e) return m;
  const out: Intervals = [];
  for (const [a, b] of m) {
    if (b <= s || a >= e) out.push([a, b]);
    else {
      if (a < s) out.push([a, s]);
      if (b > e) out.push([e, b]);
    }
  }
  return out;
}

const PAGE_BLOCKS = 32768; // blocks one 4 KiB page of bits covers (128 MiB of data)

test('bitmap over several pages: whole pages marked, cleared and merged (shared full pages) agree with a model; runs, firstRun, counts and the on-disk copy too', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 5 }),
      fc.integer({ min: 0, max: PAGE_BLOCKS - 1 }),
      fc.array(
        fc.record({
          kind: fc.constantFrom('mark', 'clear', 'markAll', 'clearAll', 'merge', 'mergeAll'),
          at: fc.double({ min: 0, max: 1, noNaN: true }),
          blocks: fc.oneof(fc.integer({ min: 0, max: 100 }), fc.integer({ min: PAGE_BLOCKS - 50, max: 2 * PAGE_BLOCKS + 50 })),
          writeBack: fc.boolean(),
        }),
        { maxLength: 25, size: 'max' },
      ),
      fc.integer({ min: 1, max: 3 * PAGE_BLOCKS }),
      async (pages, tail, ops, pieceBlocks) => {
        const blocks = pages * PAGE_BLOCKS + tail;
        const dataBytes = blocks * BLOCK - (tail > 0 ? 100 : 0); // a partial last block too
        const bm = new Bitmap(dataBytes);
        const dev = new MemoryDevice(Bitmap.bytesFor(dataBytes), 'bm');
        let model: Intervals = [];
        for (const op of ops) {
          const from = Math.min(blocks, Math.floor(op.at * blocks));
          const to = Math.min(blocks, from + op.blocks);
          if (op.kind === 'mark') {
            bm.mark(from * BLOCK, (to - from) * BLOCK);
            model = addInterval(model, from, to);
          } else if (op.kind === 'clear') {
            bm.clear(from * BLOCK, (to - from) * BLOCK);
            model = removeInterval(model, from, to);
          } else if (op.kind === 'merge') {
            // The peer's marks: an interval and every third block around it.
            const other = new Bitmap(dataBytes);
            other.mark(from * BLOCK, (to - from) * BLOCK);
            model = addInterval(model, from, to);
            for (let blk = Math.max(0, from - 300); blk < Math.min(blocks, to + 300); blk += 3) {
              other.mark(blk * BLOCK, BLOCK);
              model = addInterval(model, blk, blk + 1);
            }
            bm.merge(other);
          } else if (op.kind === 'mergeAll') {
            const other = new Bitmap(dataBytes);
            other.markAll();
            bm.merge(other);
            model = addInterval([], 0, blocks);
          } else if (op.kind === 'markAll') {
            bm.markAll();
            model = addInterval([], 0, blocks);
          } else {
            bm.clearAll();
            model = [];
          }
          assert.equal(bm.count, model.reduce((n, [a, b]) => n + b - a, 0));
          if (op.writeBack) await bm.writeBack(dev, 0);
        }
        const want = model.map(([a, b]) => ({ offset: a * BLOCK, length: Math.min(dataBytes, b * BLOCK) - a * BLOCK }));
        assert.deepEqual([...bm.runs()], want);
        const walked: { offset: number; length: number }[] = [];
        for (let cursor = 0, r = bm.firstRun(0, pieceBlocks * BLOCK); r; r = bm.firstRun(cursor, pieceBlocks * BLOCK)) {
          assert.ok(r.length <= pieceBlocks * BLOCK);
          const last = walked[walked.length - 1];
          if (last && last.offset + last.length === r.offset) last.length += r.length;
          else walked.push({ ...r });
          cursor = r.offset + r.length;
        }
        assert.deepEqual(walked, want);
        const batched = [];
        for await (const batch of bm.runBatches(3)) batched.push(...batch);
        assert.deepEqual(batched, want);
        await bm.writeBack(dev, 0);
        const again = await Bitmap.read(dev, 0, dataBytes);
        assert.equal(again.count, bm.count);
        assert.deepEqual([...again.runs()], want);
      },
    ),
    { numRuns: 150 },
  );
});

test('bitmap of 2^33 blocks (32 TiB): markAll, walking it, clearing pieces and clearAll hold no gigabyte of pages', async () => {
  const blocks = 2 ** 33;
  const bm = new Bitmap(blocks * BLOCK);
  const before = process.memoryUsage().arrayBuffers;
  bm.markAll();
  assert.equal(bm.count, blocks);
  assert.deepEqual([...bm.runs()], [{ offset: 0, length: blocks * BLOCK }]);
  assert.deepEqual(bm.firstRun(5 * BLOCK, 64 * 1024 * 1024), { offset: 5 * BLOCK, length: 64 * 1024 * 1024 });
  // A resync's pieces: a partial page is copied, a whole page dropped.
  bm.clear(0, 64 * 1024 * 1024);
  bm.clear(128 * 1024 * 1024, 128 * 1024 * 1024);
  assert.equal(bm.count, blocks - 16384 - PAGE_BLOCKS);
  assert.equal(bm.firstRun(64 * 1024 * 1024, Infinity)?.length, 64 * 1024 * 1024);
  assert.deepEqual(bm.firstRun(0, Infinity), { offset: 64 * 1024 * 1024, length: 64 * 1024 * 1024 });
  // A run over a full page ends right after it.
  bm.clear(4 * PAGE_BLOCKS * BLOCK, BLOCK);
  const runs = [...bm.runs()];
  assert.deepEqual(runs[1], { offset: 2 * PAGE_BLOCKS * BLOCK, length: 2 * PAGE_BLOCKS * BLOCK });
  assert.deepEqual(runs[2], { offset: (4 * PAGE_BLOCKS + 1) * BLOCK, length: blocks * BLOCK - (4 * PAGE_BLOCKS + 1) * BLOCK });
  const pages = bm.snapshot();
  assert.ok(pages.length <= 5, `${pages.length} entries for a bitmap of all but three pages full`);
  assert.equal(pages.reduce((n, p) => n + p.count, 0), blocks / PAGE_BLOCKS);
  assert.ok(process.memoryUsage().arrayBuffers - before < 64 * 1024 * 1024, 'full pages are one shared page');
  bm.clearAll();
  assert.equal(bm.count, 0);
  assert.equal(bm.firstRun(0, Infinity), undefined);
});
