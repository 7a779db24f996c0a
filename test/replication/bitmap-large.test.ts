/**
 * Devices past 16 TiB: block numbers above 2^32. Every index the bitmap
 * computes must be exact there (32-bit shifts wrap), and the resync loop
 * must walk such a bitmap and end. No 16 TiB file is needed: the bitmap
 * keeps only pages that hold marks, and MemoryDevice is sparse.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BorrowedDevice } from '../../src/blockdev/delegating.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { BLOCK, Bitmap } from '../../src/replication/bitmap.js';
import { createMetadata } from '../../src/replication/create-md.js';
import { layoutFor, newGi, NO_GI, readRecord, writeRecord } from '../../src/replication/meta.js';
import { apart, connected, freePort, Node, startNode, stopNode, until } from './pair.js';

const TWO_32 = 2 ** 32;
/** 2^32 + 2^20 blocks of 4 KiB: a little over 16 TiB. */
const DATA_BYTES = (TWO_32 + 2 ** 20) * BLOCK;

test('bitmap past block 2^32: marks, counts, runs and firstRun are exact; the resident pages stay few', { timeout: 30_000 }, async () => {
  const bm = new Bitmap(DATA_BYTES);
  bm.mark((TWO_32 - 1) * BLOCK, 2 * BLOCK); // straddles block 2^32
  bm.mark((TWO_32 + 100) * BLOCK, 1);
  assert.equal(bm.count, 3);
  // Aliases if an index wraps at 2^32.
  assert.equal(bm.isMarked(0), false);
  assert.equal(bm.isMarked(100), false);
  assert.equal(bm.isMarked(TWO_32 - 1), true);
  assert.equal(bm.isMarked(TWO_32), true);
  assert.equal(bm.isMarked(TWO_32 + 100), true);
  const want = [
    { offset: (TWO_32 - 1) * BLOCK, length: 2 * BLOCK },
    { offset: (TWO_32 + 100) * BLOCK, length: BLOCK },
  ];
  assert.deepEqual([...bm.runs()], want);
  assert.deepEqual(bm.firstRun(0, BLOCK), { offset: (TWO_32 - 1) * BLOCK, length: BLOCK });
  assert.deepEqual(bm.firstRun(TWO_32 * BLOCK, 1024 * BLOCK), { offset: TWO_32 * BLOCK, length: BLOCK });
  assert.deepEqual(bm.firstRun((TWO_32 + 1) * BLOCK, Infinity), want[1]);
  assert.equal(bm.firstRun((TWO_32 + 101) * BLOCK, Infinity), undefined);
  assert.ok(bm.residentPages <= 3, `${bm.residentPages} pages resident for 3 marks`);

  // On disk and back, through a sparse device holding just the bitmap area.
  const dev = new MemoryDevice(Bitmap.bytesFor(DATA_BYTES), 'bm');
  await bm.writeBack(dev, 0, true);
  const back = await Bitmap.read(dev, 0, DATA_BYTES);
  assert.equal(back.count, 3);
  assert.deepEqual([...back.runs()], want);
  assert.ok(back.residentPages <= 3);

  bm.clear(TWO_32 * BLOCK, BLOCK);
  assert.equal(bm.isMarked(TWO_32), false);
  assert.equal(bm.isMarked(TWO_32 - 1), true);
  assert.equal(bm.count, 2);
  bm.clearAll();
  assert.equal(bm.count, 0);
  assert.equal(bm.firstRun(0, Infinity), undefined);
});

/**
 * Two sparse in-memory disks of `dataBytes` that hold the same (empty) data in one generation, UpToDate:
 * no initial full sync of a huge device. Both nodes started.
 */
async function sameGenerationPair(dataBytes: number): Promise<{ da: MemoryDevice; db: MemoryDevice; a: Node; b: Node }> {
  const deviceBytes = layoutFor(dataBytes).deviceBytes + 64 * 1024 * 1024;
  const port = await freePort();
  const da = new MemoryDevice(deviceBytes, 'alpha-disk');
  const db = new MemoryDevice(deviceBytes, 'bravo-disk');
  for (const [dev, node] of [[da, 'alpha'], [db, 'bravo']] as const) await createMetadata(dev, { resource: 'r0', node });
  const gi = { current: newGi(), bitmap: NO_GI, history: [NO_GI, NO_GI] as [string, string] };
  for (const dev of [da, db]) {
    const layout = layoutFor(dev.size);
    const rec = (await readRecord(dev, layout))!;
    await writeRecord(dev, layout, { ...rec, gi, disk: 'UpToDate', fullSyncNeeded: false });
  }
  const a = await startNode('alpha', new BorrowedDevice(da), port);
  const b = await startNode('bravo', new BorrowedDevice(db), port);
  return { da, db, a, b };
}

test('resync of blocks past 2^32 on a 16 TiB pair: exactly those blocks travel, and the loop ends', { timeout: 60_000 }, async () => {
  const { da, db, a, b } = await sameGenerationPair(DATA_BYTES);
  try {
    await until('connected in sync', () => connected(a, b) && a.resource.bitmap.count === 0, 20_000);
    await a.resource.promote(false);
    await apart(a, b);
    const pattern = Buffer.alloc(3 * BLOCK, 0x5a);
    const at = (TWO_32 - 1) * BLOCK;
    await a.resource.write(at, pattern);
    await a.resource.write((TWO_32 + 4096) * BLOCK, pattern.subarray(0, BLOCK));
    assert.equal(a.resource.bitmap.count, 4);
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('resync done', () => connected(a, b) && a.resource.bitmap.count === 0 && b.resource.disk === 'UpToDate', 30_000);
    const got = Buffer.alloc(3 * BLOCK);
    await db.read(at, got);
    assert.deepEqual(got, pattern);
    const one = Buffer.alloc(BLOCK);
    await db.read((TWO_32 + 4096) * BLOCK, one);
    assert.deepEqual(one, pattern.subarray(0, BLOCK));
    assert.equal(a.resource.peer?.status().lastResync?.doneBytes, 4 * BLOCK);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('zeroing and trimming more than 4 GiB at once on a connected pair: the peer gets every byte of it (a frame\'s length is 32 bits)', { timeout: 60_000 }, async () => {
  const { db, a, b } = await sameGenerationPair(12 * 1024 ** 3);
  try {
    await until('connected in sync', () => connected(a, b) && a.resource.bitmap.count === 0, 20_000);
    await a.resource.promote(false);
    const GiB = 1024 ** 3;
    // Data on both sides at the start, the middle (past 4 GiB) and the end of the range zeroed below.
    const mark = Buffer.alloc(BLOCK, 0x6b);
    for (const at of [GiB, 5 * GiB, 7 * GiB - BLOCK, 9 * GiB]) await a.resource.write(at, mark);
    await a.resource.flush();
    await a.resource.writeZeroes(GiB, 6 * GiB);
    await a.resource.trim(8 * GiB, 4 * GiB - BLOCK);
    await a.resource.flush();
    assert.equal(a.resource.peer?.phase, 'connected', 'the link stayed up');
    assert.equal(a.resource.bitmap.count, 0, 'nothing marked: the peer took it all');
    const one = Buffer.alloc(BLOCK);
    for (const at of [GiB, 5 * GiB, 7 * GiB - BLOCK, 9 * GiB]) {
      await db.read(at, one);
      assert.ok(one.every((x) => x === 0), `bravo still holds data at ${at}`);
    }
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});
