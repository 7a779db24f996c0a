/**
 * Found by a review of 1039649: a split brain's failed disk gets a full sync, and only its bitmap's marks are
 * saved first. But the disk failed: its bitmap is the part least to be trusted. A failed bitmap
 * write-back detaches the disk, yet the activity log still forgets the extent it was evicting.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BorrowedDevice } from '../../src/blockdev/delegating.js';
import { DelegatingDevice } from '../../src/blockdev/delegating.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { BlockDeviceError, MaybePromise, WriteOptions } from '../../src/blockdev/types.js';
import { createMetadata } from '../../src/replication/create-md.js';
import { layoutFor } from '../../src/replication/meta.js';
import { connected, freePort, newDisk, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** A disk with a bad sector at 16 MiB: writes there fail at once, the rest works (a real file), the record area slowly. */
class BadBitmapArea extends DelegatingDevice {
  bad = false;
  closed = false;
  override close(): MaybePromise<void> {
    this.closed = true;
    return super.close();
  }
  override write(offset: number, data: Buffer, options?: WriteOptions): MaybePromise<void> {
    const l = layoutFor(this.size);
    if (this.bad && offset < 16 * MiB + 4096 && offset + data.length > 16 * MiB) throw new BlockDeviceError('EIO', `${this.name}: bad sector in the bitmap area`);
    // The failing disk is slow to take the Failed record (it retries): 200 ms.
    if (this.bad && offset >= l.recordOffset) return new Promise<void>((r) => setTimeout(r, 200)).then(() => this.inner.write(offset, data, options));
    return this.inner.write(offset, data, options);
  }
}

/** Every saved range of a split-brain file with the byte at `at` (or undefined). */
function savedByteAt(file: string, at: number): number | undefined {
  const raw = fs.readFileSync(file);
  const nl = raw.indexOf(0x0a);
  const header = JSON.parse(raw.subarray(0, nl).toString()) as { ranges: { offset: number; length: number }[] };
  let pos = nl + 1;
  for (const r of header.ranges) {
    if (at >= r.offset && at < r.offset + r.length) return raw[pos + at - r.offset];
    pos += r.length;
  }
  return undefined;
}

test('a split brain\'s failed disk whose bitmap write-back failed: its acknowledged writes are kept (on its disk or in the split-brain file)', { timeout: 60_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-review16-marks-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const alphaMem = await newDisk(SIZE, 'alpha');
  const bravoFile = path.join(dir, 'bravo.disk');
  fs.writeFileSync(bravoFile, '');
  fs.truncateSync(bravoFile, SIZE);
  const md = FileDevice.open(bravoFile);
  await createMetadata(md, { resource: 'r0', node: 'bravo' });
  md.close();
  const faulty = new BadBitmapArea(FileDevice.open(bravoFile));
  const bravoMem = { read: (at: number, into: Buffer) => { const f = FileDevice.open(bravoFile, { exclusive: false, readOnly: true }); try { return f.read(at, into); } finally { f.close(); } } };
  let a = await startNode('alpha', new BorrowedDevice(alphaMem), port, { splitBrainDir: dir });
  let b = await startNode('bravo', faulty, port, { splitBrainDir: dir, alSlots: 2 });
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
    // bravo goes on alone too; the bitmap area of its disk has gone bad (the rest still works).
    await b.resource.promote(false);
    const layout = layoutFor(SIZE);
    faulty.bad = true;
    await b.resource.write(8 * MiB, Buffer.alloc(MiB, 0xbb)); // acknowledged: on bravo's disk
    await b.resource.flush();
    // A write on the bad sector: EIO, the disk is detached (its Failed record still lands); the admin
    // stops the service there at once (Secondary).
    await Promise.resolve().then(() => b.resource.write(16 * MiB, Buffer.alloc(4096, 0xbc))).catch(() => undefined);
    assert.equal(b.resource.disk, 'Diskless');
    await b.resource.demote().catch(() => undefined);
    await stopNode(b);
    // (The detached disk is closed once its Failed record landed.)
    await until('the detached disk closed (its Failed record landed)', () => faulty.closed);
    const check = Buffer.alloc(4096);
    await bravoMem.read(8 * MiB, check);
    assert.equal(check[0], 0xbb, 'the acknowledged write is on bravo\'s disk');
    // bravo restarts on its disk (replaced controller): recorded Failed, so Inconsistent.
    b = await startNode('bravo', FileDevice.open(bravoFile), port, { splitBrainDir: dir });
    b.resource.standAlone = true;
    assert.equal(b.resource.disk, 'Inconsistent');
    b.resource.standAlone = false;
    a.resource.standAlone = false;
    a.connector.kick('test: together');
    await until('settled', () => (a.resource.standAlone && b.resource.standAlone) || (upToDate(a, b) && b.resource.bitmap.count === 0 && a.resource.bitmap.count === 0), 20_000);
    await bravoMem.read(8 * MiB, check);
    const saved = b.resource.splitBrain?.savedTo ?? undefined;
    const kept = check[0] === 0xbb || (saved !== undefined && savedByteAt(saved, 8 * MiB) === 0xbb);
    assert.ok(kept, `bravo's acknowledged write at 8 MiB is neither on its disk (${check[0]}) nor in ${saved ?? 'a saved file'}`);
  } finally {
    await stopNode(a).catch(() => undefined);
    await stopNode(b).catch(() => undefined);
  }
});
