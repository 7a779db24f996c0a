/**
 * Found by a review of 1039649: a peer's record "peerDiskFailed" outlives the moment it was made. The disk it
 * is about may have been repaired and written as Primary since (its peer away): that branch is
 * then not "the failed disk's old branch", and a split brain with it is for the admin.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BorrowedDevice } from '../../src/blockdev/delegating.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { connected, freePort, newDisk, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

test('a disk its peer saw fail, repaired and written as Primary while that peer was down, is not discarded by itself when it meets the peer again', { timeout: 60_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-review16-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const alphaMem = await newDisk(SIZE, 'alpha');
  const bravoMem = await newDisk(SIZE, 'bravo');
  const faulty = new FaultyDevice(new BorrowedDevice(bravoMem), { writeBack: false });
  let a = await startNode('alpha', new BorrowedDevice(alphaMem), port, { splitBrainDir: dir });
  let b = await startNode('bravo', faulty, port, { splitBrainDir: dir });
  try {
    await until('both-new', () => connected(a, b));
    await a.resource.promote(true);
    await until('synced', () => upToDate(a, b));
    // bravo's disk stops answering (a cable, a controller): it takes no Failed record.
    faulty.failWith({ op: '*', code: 'EIO' });
    await a.resource.write(0, Buffer.alloc(MiB, 0xaa));
    await a.resource.flush();
    await until('bravo went Diskless', () => b.resource.disk === 'Diskless');
    await until('alpha recorded that bravo lost its disk, the handshake over', () => a.resource.record.peerDiskFailed && connected(a, b));
    await a.resource.demote();
    // alpha goes down (maintenance, power). bravo's disk is fine again: bravo restarts on it, alone.
    await stopNode(a);
    await stopNode(b);
    b = await startNode('bravo', new BorrowedDevice(bravoMem), port, { splitBrainDir: dir });
    assert.equal(b.resource.disk, 'UpToDate');
    // The users go on on bravo (no witness: a plain promotion; with one, the admin's --force).
    await b.resource.promote(false);
    await b.resource.write(8 * MiB, Buffer.alloc(MiB, 0xbb));
    await b.resource.flush();
    // Later the service stops there (or bravo restarts after a crash): Secondary.
    await b.resource.demote();
    // alpha comes back, its record still saying bravo's disk failed.
    a = await startNode('alpha', new BorrowedDevice(alphaMem), port, { splitBrainDir: dir });
    assert.equal(a.resource.record.peerDiskFailed, true);
    await until('the two met', () => (a.resource.splitBrain !== null && b.resource.splitBrain !== null) || upToDate(a, b), 20_000);
    // Give an automatic resync the time to run, if one started.
    await until('settled', () => (a.resource.standAlone && b.resource.standAlone) || (upToDate(a, b) && b.resource.bitmap.count === 0), 20_000);
    const one = Buffer.alloc(4096);
    await bravoMem.read(8 * MiB, one);
    assert.equal(one[0], 0xbb, `bravo's acknowledged writes as Primary were overwritten without the admin (resolution: ${b.resource.splitBrain?.resolution})`);
    assert.equal(b.resource.splitBrain?.resolution, null, 'a split brain left for the admin (after-split-brain: disconnect)');
  } finally {
    await stopNode(a).catch(() => undefined);
    await stopNode(b).catch(() => undefined);
  }
});
