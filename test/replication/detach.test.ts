/**
 * A detach is durable: after an I/O error took a disk out, that disk is
 * not trusted again (after a restart, on either node) until a full sync
 * from the node that kept the data. Whether or not the failing disk still
 * took the "Failed" record, the node that kept the data starts a new
 * generation and remembers the peer's disk failed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BorrowedDevice } from '../../src/blockdev/delegating.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { connected, freePort, newDisk, readAll, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

for (const recorded of [true, false]) {
  test(`EIO detaches the Primary's disk (${recorded ? 'the Failed record reaches it' : 'it takes no more writes'}): after restarting both nodes it is Inconsistent or behind, and a full sync from the peer makes it identical`, async () => {
    const port = await freePort();
    const alphaMem = await newDisk(SIZE, 'alpha');
    const bravoMem = await newDisk(SIZE, 'bravo');
    const faulty = new FaultyDevice(new BorrowedDevice(alphaMem), { writeBack: false });
    let a = await startNode('alpha', faulty, port);
    let b = await startNode('bravo', new BorrowedDevice(bravoMem), port);
    try {
      await until('both-new', () => connected(a, b));
      await a.resource.promote(true);
      await until('synced', () => upToDate(a, b));
      await a.resource.write(0, Buffer.alloc(MiB, 1));
      await a.resource.flush();
      const before = b.resource.record.gi.current;
      // The data area fails; the metadata at the end of the disk still takes writes, or nothing does.
      faulty.failWith(recorded ? { op: '*', offset: 0, length: a.resource.size, code: 'EIO' } : { op: '*', code: 'EIO' });
      await a.resource.write(8 * MiB, Buffer.alloc(MiB, 2));
      assert.equal(a.resource.disk, 'Diskless');
      // Writes go on through bravo, which now keeps the data in a generation of its own.
      await a.resource.write(16 * MiB, Buffer.alloc(MiB, 3));
      await a.resource.flush();
      await until('bravo recorded that alpha lost its disk', () => b.resource.record.peerDiskFailed && b.resource.record.gi.current !== before);

      // Both nodes restart; alpha's disk is healthy again.
      await a.resource.demote();
      await stopNode(a);
      await stopNode(b);
      a = await startNode('alpha', new BorrowedDevice(alphaMem), port);
      a.resource.standAlone = true;
      if (recorded) {
        assert.equal(a.resource.disk, 'Inconsistent', 'a disk recorded Failed is not trusted');
        assert.equal(a.resource.record.fullSyncNeeded, true);
      }
      b = await startNode('bravo', new BorrowedDevice(bravoMem), port);
      assert.equal(b.resource.record.peerDiskFailed, true, 'bravo remembers alpha lost its disk');
      a.resource.standAlone = false;
      await until('full sync from bravo', () => upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0);
      assert.equal(a.resource.peer?.status().lastResync?.totalBytes, a.resource.size, 'every block went back to alpha');
      assert.equal(b.resource.record.peerDiskFailed, false);
      assert.ok((await readAll(alphaMem, a.resource.size)).equals(await readAll(bravoMem, a.resource.size)));
    } finally {
      await stopNode(a);
      await stopNode(b);
    }
  });
}
