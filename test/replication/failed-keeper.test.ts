/**
 * Review of 1039649 (change 3): a node whose own disk failed after it saw its peer's disk fail
 * refuses to work through that peer's (stale) disk "until its own disk is attached again, then the
 * ordinary decision runs". When that disk comes back recorded Failed, the ordinary decision makes the
 * stale disk the source of a full sync over it: the writes only it had are gone, unsaved.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BorrowedDevice } from '../../src/blockdev/delegating.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { connected, freePort, newDisk, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

test('the disk that kept the data after its peer\'s failed, back recorded Failed, is not overwritten from the peer\'s stale disk', { timeout: 60_000 }, async () => {
  const port = await freePort();
  const alphaMem = await newDisk(SIZE, 'alpha');
  const bravoMem = await newDisk(SIZE, 'bravo');
  const fa = new FaultyDevice(new BorrowedDevice(alphaMem), { writeBack: false });
  const fb = new FaultyDevice(new BorrowedDevice(bravoMem), { writeBack: false });
  let a = await startNode('alpha', fa, port);
  let b = await startNode('bravo', fb, port);
  try {
    await until('both-new', () => connected(a, b));
    await a.resource.promote(true);
    await until('synced', () => upToDate(a, b));
    // bravo's disk stops answering: alpha goes on alone with the data (a new generation).
    fb.failWith({ op: '*', code: 'EIO' });
    await a.resource.write(0, Buffer.alloc(MiB, 0x11));
    await a.resource.flush();
    await until('alpha recorded that bravo lost its disk, the handshake over', () => a.resource.record.peerDiskFailed && connected(a, b));
    // Acknowledged writes only alpha's disk has.
    await a.resource.write(8 * MiB, Buffer.alloc(MiB, 0xaa));
    await a.resource.flush();
    // Then alpha's disk fails too (a bad area of its data: its Failed record still lands).
    fa.failWith({ op: '*', offset: 0, length: a.resource.size, code: 'EIO' });
    await Promise.resolve().then(() => a.resource.write(16 * MiB, Buffer.alloc(4096, 0xab))).catch(() => undefined);
    await until('alpha detached', () => a.resource.disk === 'Diskless');
    await a.resource.demote().catch(() => undefined);
    await stopNode(a);
    await stopNode(b);
    // Both disks repaired, both nodes restart on them.
    b = await startNode('bravo', new BorrowedDevice(bravoMem), port);
    a = await startNode('alpha', new BorrowedDevice(alphaMem), port);
    assert.equal(a.resource.disk, 'Inconsistent');
    assert.equal(a.resource.record.peerDiskFailed, true);
    const one = Buffer.alloc(4096);
    await alphaMem.read(8 * MiB, one);
    assert.equal(one[0], 0xaa, 'the write is on alpha\'s disk');
    // They decide (a refusal: nobody has good data) before anything could be written to alpha's disk.
    await until('the decision', () => /nobody has good data/.test(String(a.resource.lastRefusal)) || a.resource.peer?.phase === 'sync-target', 20_000);
    assert.match(String(a.resource.lastRefusal), /nobody has good data: bravo's disk failed \(alpha saw it\)/);
    await alphaMem.read(8 * MiB, one);
    assert.equal(one[0], 0xaa, `alpha's acknowledged writes were overwritten from bravo's stale disk (alpha: ${a.resource.disk}, last resync ${JSON.stringify(a.resource.peer?.status().lastResync?.totalBytes)}, refusal: ${a.resource.lastRefusal})`);
  } finally {
    await stopNode(a).catch(() => undefined);
    await stopNode(b).catch(() => undefined);
  }
});
