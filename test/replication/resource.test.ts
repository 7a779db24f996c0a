import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { apart, freePort, initialSync, newDisk, readAll, startNode, stopNode, syncedPair, until, upToDate } from './pair.js';

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
    await apart(a, b);
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
    await apart(a, b);
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
  const faulty = new FaultyDevice(await newDisk(64 * MiB, 'alpha'), { writeBack: false });
  const a = await startNode('alpha', faulty, port);
  const b = await startNode('bravo', await newDisk(64 * MiB, 'bravo'), port);
  try {
    await initialSync(a, b);
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

for (const side of ['Primary', 'Secondary'] as const) test(`verify started on the ${side} finds exactly a block corrupted behind the Secondary's back; reconnecting resyncs it`, async () => {
  const { a, b } = await syncedPair();
  try {
    await a.resource.write(0, randomBytes(8 * MiB));
    await a.resource.flush();
    await b.disk.write(3 * MiB + 8192, Buffer.alloc(4096, 0x66));
    // On the Secondary it asks the Primary for the digests (VERIFY_ASK): the same verdict.
    const v = await (side === 'Primary' ? a : b).resource.peer!.runVerify();
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

test('malformed and truncated frames from an authenticated peer end that link only; it comes back and stays in sync', async () => {
  const { a, b } = await syncedPair();
  try {
    const firstLink = b.resource.peer!;
    // A write frame shorter than its header, then garbage: the receiver drops the link, both processes go on.
    a.resource.peer!.link.send(30, Buffer.alloc(5));
    await until('link dropped', () => b.resource.peer !== firstLink);
    await until('reconnected', () => upToDate(a, b));
    const second = b.resource.peer!;
    a.resource.peer!.link.send(999, Buffer.from('nonsense'));
    await until('dropped again', () => b.resource.peer !== second);
    await until('reconnected again', () => upToDate(a, b));
    await a.resource.write(0, Buffer.alloc(4096, 9));
    await a.resource.flush();
    const got = Buffer.alloc(4096);
    await b.disk.read(0, got);
    assert.equal(got[0], 9);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('disks of different sizes are refused with a clear reason; nothing is overwritten', async () => {
  const port = await freePort();
  const a = await startNode('alpha', await newDisk(64 * MiB, 'alpha'), port);
  const b = await startNode('bravo', await newDisk(32 * MiB, 'bravo'), port);
  try {
    await until('refused', () => a.resource.lastRefusal !== undefined && b.resource.lastRefusal !== undefined);
    assert.match(a.resource.lastRefusal!, /differ in size/);
    assert.equal(a.resource.disk, 'Inconsistent');
    assert.equal(b.resource.disk, 'Inconsistent');
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('promotion of an Inconsistent or Outdated disk needs --force; UpToDate with the peer away does not', async () => {
  const port = await freePort();
  const a = await startNode('alpha', await newDisk(16 * MiB, 'alpha'), port);
  try {
    await assert.rejects(a.resource.promote(false), /Inconsistent: it may hold old or partial data; promote with --force/);
    await a.resource.promote(true);
    assert.equal(a.resource.disk, 'UpToDate');
    await a.resource.demote();
    await a.resource.saveRecord({ disk: 'Outdated' });
    await assert.rejects(a.resource.promote(false), /Outdated/);
    await a.resource.saveRecord({ disk: 'UpToDate' });
    const before = a.resource.record.gi.current;
    await a.resource.promote(false);
    assert.notEqual(a.resource.record.gi.current, before, 'promoted without the peer: a new generation');
  } finally {
    await stopNode(a);
  }
});

test('checksum-based resync sends only the blocks whose digests differ', async () => {
  const { a, b } = await syncedPair(64 * MiB, { checksumResync: true });
  try {
    await apart(a, b);
    // 1 MiB rewritten with the same bytes it had (digests match), 64 KiB really changed.
    const same = Buffer.alloc(MiB);
    await a.resource.read(8 * MiB, same);
    await a.resource.write(8 * MiB, same);
    await a.resource.write(16 * MiB, randomBytes(65536));
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('resynced', () => upToDate(a, b) && a.resource.bitmap.count === 0);
    const p = a.resource.peer!.resync!.progress();
    assert.equal(p.doneBytes, MiB + 65536);
    assert.equal(p.sentBytes, 65536, 'only the changed 64 KiB travelled');
    assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(b.disk, a.resource.size)));
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('a fixed resync rate is honoured (bounded from above), a dynamic one finishes', async () => {
  const { a, b } = await syncedPair(64 * MiB, { resyncRateBytesPerSec: 8 * MiB });
  try {
    await apart(a, b);
    await a.resource.write(0, randomBytes(12 * MiB));
    const started = Date.now();
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('resynced', () => upToDate(a, b) && a.resource.bitmap.count === 0);
    // 12 MiB at 8 MiB/s cannot take less than 1.5 s minus the 100 ms burst and the first piece.
    assert.ok(Date.now() - started >= 1000, `resync took ${Date.now() - started} ms`);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('dual primary (allow-two-primaries): racing writes to the same blocks are detected and both replicas end identical', async () => {
  const { a, b } = await syncedPair(16 * MiB, { allowTwoPrimaries: true });
  try {
    await b.resource.promote(false);
    assert.equal(b.resource.role, 'Primary');
    for (let round = 0; round < 20; round++) {
      const off = (round % 8) * 65536;
      await Promise.all([a.resource.write(off, Buffer.alloc(65536, 1 + round)), b.resource.write(off + 4096, Buffer.alloc(65536, 100 + round))]);
    }
    await a.resource.flush();
    await b.resource.flush();
    assert.ok((await readAll(a.disk, MiB)).equals(await readAll(b.disk, MiB)), 'replicas identical after racing writes');
    assert.ok(a.resource.conflictingWrites + b.resource.conflictingWrites > 0, 'the races were seen');
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});
