import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { connected, freePort, readAll, startNode, stopNode, syncedPair, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;

test('new disks: both-new until one is forced Primary, then a full sync makes them identical', async () => {
  const { a, b } = await syncedPair();
  try {
    assert.equal(a.resource.role, 'Primary');
    assert.equal(b.resource.role, 'Secondary');
    assert.equal(a.resource.record.gi.current, b.resource.record.gi.current);
    assert.notEqual(a.resource.record.gi.current, '0');
    assert.equal(a.resource.bitmap.count, 0);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

for (const protocol of ['A', 'B', 'C'] as const) {
  test(`protocol ${protocol}: writes, zeroes and trims land on both disks; after a flush the peer has them`, async () => {
    const { a, b } = await syncedPair(64 * MiB, { protocol });
    try {
      const data = randomBytes(3 * MiB);
      await a.resource.write(5 * MiB + 512, data);
      await a.resource.writeZeroes(6 * MiB, 4096);
      await a.resource.trim(7 * MiB, 65536);
      await a.resource.write(100 * 4096, Buffer.alloc(4096, 7), { fua: true });
      await a.resource.flush();
      const size = a.resource.size;
      assert.ok((await readAll(a.disk, size)).equals(await readAll(b.disk, size)));
      const back = Buffer.alloc(data.length);
      await a.resource.read(5 * MiB + 512, back);
      assert.ok(back.subarray(0, MiB - 512).equals(data.subarray(0, MiB - 512)));
    } finally {
      await stopNode(a);
      await stopNode(b);
    }
  });
}

test('a Secondary refuses I/O; a second Primary is refused while the first is Primary', async () => {
  const { a, b } = await syncedPair();
  try {
    assert.throws(() => b.resource.read(0, Buffer.alloc(512)), /Secondary on bravo/);
    await assert.rejects(b.resource.promote(false), /alpha is Primary/);
    await a.resource.demote();
    await until('alpha Secondary seen by bravo', () => b.resource.peer?.state?.role === 'Secondary');
    await b.resource.promote(false);
    await b.resource.write(0, Buffer.alloc(4096, 1));
    await b.resource.flush();
    const got = Buffer.alloc(4096);
    await a.disk.read(0, got);
    assert.equal(got[0], 1);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('disconnect, write, reconnect: only the dirty blocks travel, in the right direction', async () => {
  const { a, b } = await syncedPair();
  try {
    a.resource.standAlone = true;
    b.resource.standAlone = true;
    a.connector.kick('test disconnect');
    await until('disconnected', () => a.resource.peer === undefined && b.resource.peer === undefined);
    // 10 blocks of 4 KiB in two places, one write across a block boundary (3 blocks).
    await a.resource.write(0, randomBytes(10 * 4096));
    await a.resource.write(20 * MiB + 100, randomBytes(8192));
    assert.equal(a.resource.bitmap.outOfSyncBytes, 13 * 4096);
    assert.notEqual(a.resource.record.gi.bitmap, '0', 'a new generation started');
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('resync done', () => upToDate(a, b) && a.resource.bitmap.count === 0);
    const progress = a.resource.peer!.resync!.progress();
    assert.equal(progress.sentBytes, 13 * 4096);
    assert.equal(progress.doneBytes, 13 * 4096);
    assert.equal(a.resource.record.gi.current, b.resource.record.gi.current);
    assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(b.disk, a.resource.size)));
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('split brain: both wrote while apart; detected, nothing merged; resolve --keep saves the loser\'s blocks first', async () => {
  const { a, b } = await syncedPair();
  try {
    a.resource.standAlone = true;
    b.resource.standAlone = true;
    a.connector.kick('test');
    await until('apart', () => !a.resource.peer && !b.resource.peer);
    await a.resource.write(0, Buffer.alloc(8192, 0xaa));
    await b.resource.promote(false);
    await b.resource.write(MiB, Buffer.alloc(4096, 0xbb));
    const bBefore = await readAll(b.disk, 2 * MiB);
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('split brain refused', () => a.resource.splitBrain !== null && b.resource.splitBrain !== null && a.resource.standAlone && b.resource.standAlone);
    assert.equal(a.resource.splitBrain!.localChangedBytes, 8192);
    assert.equal(a.resource.splitBrain!.peerChangedBytes, 4096);
    assert.match(a.resource.lastRefusal ?? '', /split brain/);
    // Nothing moved.
    assert.ok((await readAll(b.disk, 2 * MiB)).equals(bBefore));
    // Keep alpha: bravo must step down first, then its blocks are saved and overwritten.
    await b.resource.demote();
    b.resource.keepNode = 'alpha';
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('resolved', () => upToDate(a, b));
    assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(b.disk, a.resource.size)));
    const saved = b.resource.splitBrain?.savedTo;
    assert.ok(saved, 'bravo saved what it lost');
    const fs = await import('node:fs');
    const text = fs.readFileSync(saved);
    const nl = text.indexOf(0x0a);
    const header = JSON.parse(text.subarray(0, nl).toString()) as { ranges: { offset: number; length: number }[]; bytes: number };
    assert.equal(header.bytes, 8192 + 4096);
    // bravo's own block (0xbb at 1 MiB) is in the file.
    assert.ok(text.subarray(nl + 1).includes(Buffer.alloc(4096, 0xbb)));
    fs.rmSync(saved);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('split-brain policy discard-least-changes picks the side with fewer changes', async () => {
  const { a, b } = await syncedPair(64 * MiB, { afterSplitBrain: 'discard-least-changes' });
  try {
    a.resource.standAlone = true;
    b.resource.standAlone = true;
    a.connector.kick('test');
    await until('apart', () => !a.resource.peer && !b.resource.peer);
    await a.resource.write(0, Buffer.alloc(3 * 4096, 0xaa));
    await a.resource.demote();
    await b.resource.promote(false);
    await b.resource.write(MiB, Buffer.alloc(4096, 0xbb));
    await b.resource.demote();
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('healed', () => upToDate(a, b));
    const got = Buffer.alloc(4096);
    await b.disk.read(0, got);
    assert.equal(got[0], 0xaa, 'alpha changed more and was kept');
    await b.disk.read(MiB, got);
    assert.equal(got[0], 0, "bravo's change was discarded");
    if (b.resource.splitBrain?.savedTo) (await import('node:fs')).rmSync(b.resource.splitBrain.savedTo);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('EIO on the Primary\'s disk: detached, Diskless, reads and writes go on through the peer', async () => {
  const port = await freePort();
  const faulty = new FaultyDevice(new MemoryDevice(64 * MiB, 'alpha-disk'), { writeBack: false });
  const a = await startNode('alpha', faulty, port);
  const b = await startNode('bravo', new MemoryDevice(64 * MiB, 'bravo-disk'), port);
  try {
    await until('both-new', () => connected(a, b));
    await a.resource.promote(true);
    await until('synced', () => upToDate(a, b));
    await a.resource.write(0, Buffer.alloc(4096, 5));
    faulty.failWith({ op: '*', code: 'EIO' });
    await a.resource.write(4096, Buffer.alloc(4096, 6));
    assert.equal(a.resource.disk, 'Diskless');
    const got = Buffer.alloc(8192);
    await a.resource.read(0, got);
    assert.equal(got[0], 5);
    assert.equal(got[4096], 6);
    await a.resource.flush();
    await until('peer sees Diskless', () => b.resource.peer?.state?.disk === 'Diskless');
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('verify finds exactly a block corrupted behind the Secondary\'s back; reconnecting resyncs it', async () => {
  const { a, b } = await syncedPair();
  try {
    await a.resource.write(0, randomBytes(8 * MiB));
    await a.resource.flush();
    await b.disk.write(3 * MiB + 8192, Buffer.alloc(4096, 0x66));
    const v = await a.resource.peer!.runVerify();
    assert.equal(v.outOfSyncBytes, 4096);
    assert.deepEqual(v.ranges, [{ offset: 3 * MiB + 8192, length: 4096 }]);
    a.connector.kick('resync what verify found');
    await until('resynced', () => upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0);
    assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(b.disk, a.resource.size)));
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});
