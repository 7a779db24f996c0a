/**
 * Review of db9ab1e (peerDiskFailedGi): the keeper records the generation its Diskless peer claims in
 * memory. A record is in memory at once and on disk only once written (saveRecord), so a disk that failed
 * on the write of a new generation (its Failed record not landing either) claims the older generation
 * when it is back: to seenFailed that is "written since", and the refusal that kept a Diskless node from
 * serving a stale disk as current (seed 7558) no longer applies.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BorrowedDevice, DelegatingDevice } from '../../src/blockdev/delegating.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { BlockDeviceError, MaybePromise, WriteOptions } from '../../src/blockdev/types.js';
import { layoutFor, readRecord } from '../../src/replication/meta.js';
import { connected, freePort, newDisk, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** A disk that dies after `recordWrites` more record writes (armed): every I/O fails from then on. */
class DiesAfterRecordWrites extends DelegatingDevice {
  recordWrites: number | undefined;
  dead = false;
  override write(offset: number, data: Buffer, options?: WriteOptions): MaybePromise<void> {
    if (!this.dead && this.recordWrites !== undefined && offset >= layoutFor(this.size).recordOffset) {
      if (this.recordWrites === 0) this.dead = true;
      else this.recordWrites--;
    }
    if (this.dead) throw new BlockDeviceError('EIO', `${this.name}: dead`);
    return this.inner.write(offset, data, options);
  }
  override read(offset: number, into: Buffer): MaybePromise<void> {
    if (this.dead) throw new BlockDeviceError('EIO', `${this.name}: dead`);
    return this.inner.read(offset, into);
  }
  override flush(): MaybePromise<void> {
    if (this.dead) throw new BlockDeviceError('EIO', `${this.name}: dead`);
    return this.inner.flush();
  }
}

test('a Diskless node that saw its peer\'s disk fail does not serve that disk when it comes back claiming the generation it had on disk, not in memory', { timeout: 60_000 }, async () => {
  const port = await freePort();
  const alphaMem = await newDisk(SIZE, 'alpha');
  const bravoMem = await newDisk(SIZE, 'bravo');
  let fa = new FaultyDevice(new BorrowedDevice(alphaMem), { writeBack: false });
  const fb = new DiesAfterRecordWrites(new BorrowedDevice(bravoMem));
  let a = await startNode('alpha', fa, port);
  let b = await startNode('bravo', fb, port);
  try {
    await until('both-new', () => connected(a, b));
    await a.resource.promote(true);
    await until('synced', () => upToDate(a, b));
    await a.resource.demote();
    await stopNode(a);
    await until('bravo alone', () => !b.resource.peer);
    const onDisk = b.resource.record.gi.current;
    // bravo is promoted alone; its disk takes the "Primary" record and dies on the new generation's.
    fb.recordWrites = 1;
    const refused = await b.resource.promote(false).then(() => undefined, (e: unknown) => e);
    assert.ok(refused, "promotion fails");
    assert.equal(b.resource.disk, 'Diskless');
    const inMemory = b.resource.record.gi.current;
    assert.notEqual(inMemory, onDisk, 'the new generation is in memory only');
    assert.equal((await readRecord(bravoMem, layoutFor(SIZE)))!.gi.current, onDisk, 'the disk claims the old one');
    // alpha comes back: bravo works through it; alpha records bravo's disk failed and keeps the data.
    fa = new FaultyDevice(new BorrowedDevice(alphaMem), { writeBack: false });
    a = await startNode('alpha', fa, port);
    await until('alpha recorded that bravo lost its disk', () => a.resource.record.peerDiskFailed, 20_000);
    await a.resource.promote(false);
    await a.resource.write(0, Buffer.alloc(MiB, 0xcc));
    await a.resource.flush();
    // Then alpha's disk fails too: no disk holds alpha's writes but alpha's.
    fa.failWith({ op: '*', code: 'EIO' });
    await Promise.resolve().then(() => a.resource.write(16 * MiB, Buffer.alloc(4096, 0xab))).catch(() => undefined);
    await until('alpha detached', () => a.resource.disk === 'Diskless');
    await a.resource.demote().catch(() => undefined);
    // bravo's disk is repaired; bravo restarts on it (UpToDate, at the old generation).
    await stopNode(b);
    b = await startNode('bravo', new BorrowedDevice(bravoMem), port);
    assert.equal(b.resource.disk, 'UpToDate');
    await until('the decision', () => connected(a, b) || a.resource.lastRefusal !== undefined, 20_000);
    if (connected(a, b)) {
      // What the users see then: promoted on alpha, they read bravo's old data as current.
      await a.resource.promote(false);
      const got = Buffer.alloc(4096);
      await a.resource.read(0, got);
      assert.equal(got[0], 0xcc, `alpha (Diskless) serves bravo's stale disk: alpha's acknowledged write reads back as 0x${got[0].toString(16)}`);
    }
    assert.match(String(a.resource.lastRefusal), /bravo's disk failed \(alpha saw it\)/);
  } finally {
    await stopNode(a).catch(() => undefined);
    await stopNode(b).catch(() => undefined);
  }
});
