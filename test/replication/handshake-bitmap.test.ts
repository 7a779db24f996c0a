/**
 * Bitmaps of thousands of runs on both sides of a split brain: each side's
 * marks cross in several frames, a slice of the event loop at a time, and
 * the resync that resolves it covers the union. The losing side keeps every
 * block it loses in its split-brain file, byte for byte (written in pieces,
 * the same file as when it was written at once), and restoring it puts
 * them back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { BLOCK } from '../../src/replication/bitmap.js';
import { restoreBlocks } from '../../src/replication/split-brain.js';
import { UserError } from '../../src/util/errors.js';
import { apart, readAll, syncedPair, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;

test('split brain with thousands of scattered blocks on each side: the union resyncs, the loser saves exactly what it loses', { timeout: 120_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-sb-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const { a, b } = await syncedPair(64 * MiB, { afterSplitBrain: 'discard-least-changes', splitBrainDir: dir });
  try {
    await apart(a, b);
    // alpha: every even block below 12,000 (6,000 runs); bravo: every block 3 mod 4 below 16,000 (4,000 runs).
    for (let blk = 0; blk < 12_000; blk += 2) await a.resource.write(blk * BLOCK, Buffer.alloc(BLOCK, 0xaa));
    await a.resource.demote();
    await b.resource.promote(false);
    for (let blk = 3; blk < 16_000; blk += 4) await b.resource.write(blk * BLOCK, Buffer.alloc(BLOCK, blk & 0xff));
    await b.resource.demote();
    const union = [...a.resource.bitmap.runs()].length + [...b.resource.bitmap.runs()].length;
    assert.equal(union, 10_000);
    const bravoBefore = await readAll(b.disk, b.resource.size);
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('healed', () => upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0, 60_000);
    assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(b.disk, a.resource.size)), 'alpha was kept everywhere, bravo-only blocks too');
    const saved = b.resource.splitBrain?.savedTo;
    assert.ok(saved, 'bravo saved what it lost');
    const text = fs.readFileSync(saved);
    const nl = text.indexOf(0x0a);
    const header = JSON.parse(text.subarray(0, nl).toString()) as { format: string; resource: string; node: string; peer: string; bytes: number; ranges: { offset: number; length: number }[] };
    assert.equal(header.format, 'duet-split-brain-blocks-v1');
    assert.deepEqual([header.resource, header.node, header.peer], ['r0', 'bravo', 'alpha']);
    // The union of both sides' blocks, merged: blocks 0, 2-4, 6-8, ... below 12,000, then 3 mod 4 up to 16,000.
    const want: { offset: number; length: number }[] = [];
    const marked = (blk: number): boolean => (blk < 12_000 && blk % 2 === 0) || (blk < 16_000 && blk % 4 === 3);
    for (let blk = 0; blk < 16_000; blk++) {
      if (!marked(blk)) continue;
      const last = want[want.length - 1];
      if (last && last.offset + last.length === blk * BLOCK) last.length += BLOCK;
      else want.push({ offset: blk * BLOCK, length: BLOCK });
    }
    assert.deepEqual(header.ranges, want);
    assert.equal(header.bytes, want.reduce((n, r) => n + r.length, 0));
    const body = Buffer.concat(want.map((r) => bravoBefore.subarray(r.offset, r.offset + r.length)));
    assert.equal(text.length, nl + 1 + body.length);
    assert.ok(text.subarray(nl + 1).equals(body), "the file holds bravo's bytes as they were");
    // The header line is the one JSON.stringify makes of the whole header, as before it was written in pieces.
    const h = JSON.parse(text.subarray(0, nl).toString()) as Record<string, unknown>;
    const whole = { format: h.format, resource: h.resource, node: h.node, peer: h.peer, generation: h.generation, savedAt: h.savedAt, bytes: h.bytes, ranges: want };
    assert.equal(text.subarray(0, nl).toString(), JSON.stringify(whole));

    // Restoring puts exactly those bytes back.
    const target = new MemoryDevice(b.resource.size, 'restore');
    assert.deepEqual(await restoreBlocks(saved, 'r0', target), { ranges: want.length, bytes: header.bytes });
    const restored = await readAll(target, b.resource.size);
    for (const r of want) assert.ok(restored.subarray(r.offset, r.offset + r.length).equals(bravoBefore.subarray(r.offset, r.offset + r.length)));
    await assert.rejects(restoreBlocks(saved, 'other', target), (err: Error) => err instanceof UserError && /holds blocks of resource r0, not other/.test(err.message));
    const cut = path.join(dir, 'cut.blocks');
    fs.writeFileSync(cut, text.subarray(0, text.length - 1));
    await assert.rejects(restoreBlocks(cut, 'r0', target), (err: Error) => err instanceof UserError && /truncated or damaged/.test(err.message));
    fs.writeFileSync(cut, 'not a header');
    await assert.rejects(restoreBlocks(cut, 'r0', target), (err: Error) => err instanceof UserError && /not a duet split-brain blocks file/.test(err.message));
  } finally {
    await a.connector.stop();
    await b.connector.stop();
    await a.resource.close();
    await b.resource.close();
  }
});
