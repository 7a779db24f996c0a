/**
 * Found by the review of 1039649's fixes (a nit): a failed disk's blocks are saved reading what can be
 * read, zeros for the rest. If the disk is detached during the save (a further I/O error elsewhere), every
 * read after it fails too: the save went on and listed the whole rest of the disk as "unreadable" zeros,
 * a file that claims to hold the node's changes and holds nothing. It stops with an error instead.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DelegatingDevice } from '../../src/blockdev/delegating.js';
import { BlockDeviceError, type MaybePromise } from '../../src/blockdev/types.js';
import { Bitmap } from '../../src/replication/bitmap.js';
import { Resource } from '../../src/replication/resource.js';
import { saveBlocks } from '../../src/replication/split-brain.js';
import { silentLogger } from '../../src/util/log.js';
import { newDisk } from './pair.js';

const MiB = 1024 * 1024;

/** Reads fail from the `failAfter`-th on, and the first failure detaches the disk (as an I/O error elsewhere would). */
class DyingDisk extends DelegatingDevice {
  reads = 0;
  onFirstFailure: (() => void) | undefined;
  constructor(inner: ConstructorParameters<typeof DelegatingDevice>[0], private readonly failAfter: number) {
    super(inner);
  }
  override read(offset: number, into: Buffer): MaybePromise<void> {
    if (offset < 8 * MiB || offset >= 24 * MiB || ++this.reads < this.failAfter) return super.read(offset, into);
    const detach = this.onFirstFailure;
    this.onFirstFailure = undefined;
    detach?.();
    throw new BlockDeviceError('EIO', `${this.name}: read error at ${offset}`);
  }
}

test('saving a failed disk\'s blocks stops when the disk is detached meanwhile (no file of zeros claiming to be its changes)', { timeout: 30_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-save-detached-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const disk = new DyingDisk(await newDisk(64 * MiB, 'bravo'), 4);
  const r = await Resource.open(disk, { resource: 'r0', node: 'bravo', protocol: 'C', log: silentLogger(), splitBrainDir: dir });
  t.after(() => r.close());
  disk.onFirstFailure = () => r.detach(new BlockDeviceError('EIO', 'bravo-disk: write error'));
  const changes = new Bitmap(r.size);
  changes.mark(8 * MiB, 16 * MiB);
  await assert.rejects(saveBlocks(r, 'alpha', changes, true), /detached/);
  assert.equal(r.disk, 'Diskless');
  assert.deepEqual(fs.readdirSync(dir).filter((f) => f.endsWith('.unreadable')), [], 'no list of "unreadable" blocks for a disk that is gone');
});
