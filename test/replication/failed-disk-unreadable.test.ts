/**
 * Found by a review of 1039649: a split brain's failed disk is now read (its changes saved) before its full
 * sync. A failed disk is one with I/O errors: one unreadable sector among its changes and the save
 * fails, the disk is detached again, and the full sync that would have rewritten the sector never runs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BorrowedDevice } from '../../src/blockdev/delegating.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { restoreBlocks } from '../../src/replication/split-brain.js';
import { connected, freePort, newDisk, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

test('a split brain\'s failed disk with an unreadable sector among its changes still gets its full sync', { timeout: 60_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-review16-unreadable-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const alphaMem = await newDisk(SIZE, 'alpha');
  const bravoMem = await newDisk(SIZE, 'bravo');
  const fb = new FaultyDevice(new BorrowedDevice(bravoMem), { writeBack: false });
  const a = await startNode('alpha', new BorrowedDevice(alphaMem), port, { splitBrainDir: dir });
  let b = await startNode('bravo', fb, port, { splitBrainDir: dir });
  try {
    await until('both-new', () => connected(a, b));
    await a.resource.promote(true);
    await until('synced', () => upToDate(a, b));
    await a.resource.demote();
    a.resource.standAlone = true;
    b.resource.standAlone = true;
    a.connector.kick('test: apart');
    await until('apart', () => !a.resource.peer && !b.resource.peer);
    await a.resource.promote(false);
    await a.resource.write(0, Buffer.alloc(MiB, 0xaa));
    await a.resource.flush();
    await a.resource.demote();
    await b.resource.promote(false);
    await b.resource.write(8 * MiB, Buffer.alloc(MiB, 0xbb));
    await b.resource.flush();
    // bravo's data area fails (its Failed record lands).
    fb.failWith({ op: '*', offset: 0, length: b.resource.size, code: 'EIO' });
    await Promise.resolve().then(() => b.resource.write(16 * MiB, Buffer.alloc(4096, 0xbc))).catch(() => undefined);
    await until('bravo detached', () => b.resource.disk === 'Diskless');
    await b.resource.demote().catch(() => undefined);
    await stopNode(b);
    // Back on its disk, one sector among its own changes still unreadable (a rewrite would remap it).
    const again = new FaultyDevice(new BorrowedDevice(bravoMem), { writeBack: false });
    again.failWith({ op: 'read', offset: 8 * MiB, length: 4096, code: 'EIO' });
    b = await startNode('bravo', again, port, { splitBrainDir: dir });
    assert.equal(b.resource.disk, 'Inconsistent');
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('bravo has alpha\'s data again', () => upToDate(a, b) && b.resource.bitmap.count === 0, 10_000).catch(() => undefined);
    assert.ok(upToDate(a, b), `bravo's failed disk never got its full sync (bravo: ${b.resource.disk}, refusal: ${b.resource.lastRefusal ?? a.resource.lastRefusal})`);
    // The unreadable block is listed beside the saved blocks (zeros in the file), and restoring them leaves it alone.
    const saved = String(b.resource.splitBrain?.savedTo);
    const listed = JSON.parse(fs.readFileSync(`${saved}.unreadable`, 'utf8')) as { ranges: { offset: number; length: number }[] };
    assert.deepEqual(listed.ranges, [{ offset: 8 * MiB, length: 4096 }]);
    const target = new MemoryDevice(b.resource.size, 'restore-target');
    await target.write(8 * MiB, Buffer.alloc(4096, 0x77));
    await restoreBlocks(saved, 'r0', target);
    const back = Buffer.alloc(8192);
    await target.read(8 * MiB, back);
    assert.equal(back[0], 0x77, 'the unreadable block is not restored as zeros');
    assert.equal(back[4096], 0xbb, 'the readable rest of bravo\'s change is restored');
  } finally {
    await stopNode(a).catch(() => undefined);
    await stopNode(b).catch(() => undefined);
  }
});
