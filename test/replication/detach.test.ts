/**
 * A detach is durable: after an I/O error took a disk out, that disk is
 * not trusted again (after a restart, on either node) until a full sync
 * from the node that kept the data. Whether or not the failing disk still
 * took the "Failed" record, the node that kept the data starts a new
 * generation and remembers the peer's disk failed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BorrowedDevice } from '../../src/blockdev/delegating.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { apart, connected, freePort, initialSync, newDisk, readAll, startNode, stopNode, until, upToDate } from './pair.js';

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
      await initialSync(a, b);
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

test('a split brain where one disk failed after its node wrote alone: the peer that saw it fail keeps its data by itself, the failed disk\'s own changes are saved (only those), and the disks end identical (simulator seeds 1493, 2819)', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-detach-sb-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const alphaMem = await newDisk(SIZE, 'alpha');
  const bravoMem = await newDisk(SIZE, 'bravo');
  const faulty = new FaultyDevice(new BorrowedDevice(bravoMem), { writeBack: false });
  let a = await startNode('alpha', new BorrowedDevice(alphaMem), port, { splitBrainDir: dir });
  let b = await startNode('bravo', faulty, port, { splitBrainDir: dir });
  try {
    await initialSync(a, b);
    await a.resource.demote();
    // Apart: each goes on alone (a split brain in the making).
    await apart(a, b);
    await b.resource.promote(false);
    await b.resource.write(32 * MiB, Buffer.alloc(MiB, 0xbb));
    await b.resource.flush();
    await a.resource.promote(false);
    await a.resource.write(0, Buffer.alloc(MiB, 0xaa));
    await a.resource.flush();
    await a.resource.demote();
    // bravo's disk dies whole, its Failed record with it: it goes on Diskless, and serves through alpha.
    faulty.failWith({ op: '*', code: 'EIO' });
    await assert.rejects(async () => b.resource.write(40 * MiB, Buffer.alloc(MiB, 0xcc)));
    assert.equal(b.resource.disk, 'Diskless');
    await b.resource.demote();
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('alpha recorded that bravo lost its disk, the handshake over', () => a.resource.record.peerDiskFailed && connected(a, b));
    await b.resource.promote(false);
    await b.resource.write(48 * MiB, Buffer.alloc(MiB, 0xdd));
    await b.resource.flush();
    await b.resource.demote();
    // bravo restarts on its repaired disk, whose record still says UpToDate on its own branch.
    await stopNode(b);
    b = await startNode('bravo', new BorrowedDevice(bravoMem), port, { splitBrainDir: dir });
    assert.equal(b.resource.disk, 'UpToDate');
    await until('full sync from alpha', () => upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0, 20_000);
    assert.equal(b.resource.peer?.status().lastResync?.totalBytes, b.resource.size, 'every block went back to bravo');
    assert.match(String(b.resource.splitBrain?.resolution), /kept alpha's data/);
    // What bravo wrote alone on its disk is kept in the file, and nothing more than its changes.
    const saved = String(b.resource.splitBrain?.savedTo);
    assert.ok(fs.existsSync(saved), 'the failed disk\'s changes are saved');
    const header = JSON.parse(fs.readFileSync(saved).subarray(0, fs.readFileSync(saved).indexOf(0x0a)).toString()) as { bytes: number };
    assert.ok(header.bytes >= MiB && header.bytes <= 8 * MiB, `saved ${header.bytes} bytes: its own changes, not the whole disk`);
    // The data bravo served since (through alpha) stays; its lone branch is gone from the disks.
    const all = await readAll(bravoMem, b.resource.size);
    assert.ok(all.equals(await readAll(alphaMem, a.resource.size)));
    assert.equal(all[0], 0xaa);
    assert.equal(all[48 * MiB], 0xdd);
    assert.equal(all[32 * MiB], 0);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});
