/**
 * Review of 1039649 (change 2): a --keep is forgotten when a split brain uses it, or when two
 * conflict. One that a connect never needed (the split brain went away otherwise: the peer came
 * back on a new disk) stays, in memory, and decides the next split brain, weeks later, by itself.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BLOCK } from '../../src/replication/bitmap.js';
import { connected, freePort, newDisk, Node, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;

/** The node daemon's `resource resolve`: the choice, and a new connect. */
function resolve(n: Node, keep: string): void {
  n.resource.keepNode = keep;
  n.resource.standAlone = false;
  n.resource.lastRefusal = undefined;
  n.connector.kick('test: split-brain resolution');
}

async function apartAndDiverge(a: Node, b: Node, byteA: number, byteB: number): Promise<void> {
  a.resource.standAlone = true;
  b.resource.standAlone = true;
  a.connector.kick('test: apart');
  await until('apart', () => !a.resource.peer && !b.resource.peer);
  await a.resource.promote(false);
  for (let blk = 0; blk < 16; blk++) await a.resource.write(blk * BLOCK, Buffer.alloc(BLOCK, byteA));
  await a.resource.demote();
  await b.resource.promote(false);
  for (let blk = 1000; blk < 1008; blk++) await b.resource.write(blk * BLOCK, Buffer.alloc(BLOCK, byteB));
  await b.resource.demote();
}

test('a --keep that no connect used does not decide a later split brain', { timeout: 60_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-review16-keep-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const a = await startNode('alpha', await newDisk(64 * MiB, 'alpha'), port, { splitBrainDir: dir });
  let b = await startNode('bravo', await newDisk(64 * MiB, 'bravo'), port, { splitBrainDir: dir });
  t.after(async () => {
    await stopNode(a).catch(() => undefined);
    await stopNode(b).catch(() => undefined);
  });
  await until('both-new connection', () => connected(a, b));
  await a.resource.promote(true);
  await until('initial sync', () => upToDate(a, b));
  await a.resource.demote();
  await apartAndDiverge(a, b, 0xa1, 0xb1);
  a.resource.standAlone = false;
  b.resource.standAlone = false;
  await until('the split brain found', () => a.resource.splitBrain !== null && a.resource.standAlone && b.resource.standAlone, 20_000);
  // The admin asks alpha to keep bravo's data; bravo is down meanwhile, and its disk turns out dead:
  // it comes back on a new disk, which takes alpha's data (no split brain any more, nothing to keep).
  await stopNode(b);
  resolve(a, 'bravo');
  b = await startNode('bravo', await newDisk(64 * MiB, 'bravo'), port, { splitBrainDir: dir });
  await until('full sync to the new disk', () => upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0, 20_000);

  // Weeks later, a new split brain (after-split-brain: disconnect): the admin's to resolve.
  await apartAndDiverge(a, b, 0xa2, 0xb2);
  a.resource.standAlone = false;
  b.resource.standAlone = false;
  await until('met again', () => (a.resource.standAlone && b.resource.standAlone) || (upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0), 20_000);
  const one = Buffer.alloc(BLOCK);
  await a.disk.read(0, one);
  assert.equal(one[0], 0xa2, `alpha's writes of the new split brain were discarded by the old --keep (resolution: ${a.resource.splitBrain?.resolution})`);
});
