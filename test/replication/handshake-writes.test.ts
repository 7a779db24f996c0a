/**
 * A link that comes up while the Primary is writing: writes already on
 * their way to the disk when the handshake starts finish before this side
 * says what it has (new ones wait for the decision), so the state it sent
 * still holds when the decision is made and the handshake does not start
 * over, however slow the disk.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { BLOCK } from '../../src/replication/bitmap.js';
import { apart, connected, freePort, newDisk, readAll, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;

test('writes in flight when the link comes up: no handshake starts over, the resync covers them', { timeout: 120_000 }, async () => {
  const events: { event?: string; why?: string }[] = [];
  const log = pino(new Writable({ write: (chunk: Buffer, _e, cb) => (events.push(JSON.parse(chunk.toString()) as { event?: string }), cb()) }));
  const slow = new FaultyDevice(await newDisk(2048 * MiB, 'alpha'), { writeBack: false });
  const port = await freePort();
  const a = await startNode('alpha', slow, port, { log });
  const b = await startNode('bravo', await newDisk(2048 * MiB, 'bravo'), port);
  let writing = true;
  const writers: Promise<void>[] = [];
  try {
    await until('both-new connection', () => connected(a, b));
    await a.resource.promote(true);
    await until('initial sync', () => upToDate(a, b), 60_000);
    await apart(a, b);
    // A bitmap of 20,000 runs (its frames take a while to go), and eight writers on fresh
    // blocks, each write 2 ms on the disk: some are always in flight.
    for (let blk = 100_000; blk < 140_000; blk += 2) a.resource.bitmap.mark(blk * BLOCK, BLOCK);
    slow.setLatency(2);
    let next = 0;
    for (let w = 0; w < 8; w++) {
      writers.push(
        (async () => {
          while (writing && next < 8000) await a.resource.write(next++ * BLOCK, Buffer.alloc(BLOCK, 1 + (next % 250)));
        })(),
      );
    }
    await until('writes marked', () => a.resource.bitmap.count > 50);
    const before = events.length;
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('connected and resyncing', () => a.resource.peer?.phase === 'sync-source' || (a.resource.peer?.phase === 'connected' && a.resource.bitmap.count === 0), 30_000);
    writing = false;
    await Promise.all(writers);
    slow.setLatency(0);
    await a.resource.flush();
    await until('in sync', () => upToDate(a, b) && a.resource.bitmap.count === 0, 60_000);
    // (A ping timeout on a machine too busy to answer in 400 ms is another matter: only a handshake that
    // found its own state changed counts.)
    const restarts = events.slice(before).filter((e) => e.event === 'disconnected' && /state changed during the handshake/.test(String(e.why)));
    assert.deepEqual(restarts, [], 'the handshake never started over');
    assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(b.disk, a.resource.size)));
  } finally {
    writing = false;
    await Promise.allSettled(writers);
    slow.setLatency(0);
    await stopNode(a);
    await stopNode(b);
  }
});
