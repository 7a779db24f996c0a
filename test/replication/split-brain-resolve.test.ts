/**
 * `resource resolve RES --keep NODE` after a split brain: the choice is
 * asked on one node or both. Two different choices are no answer ("ask for
 * one"), and they must not outlive that refusal: a stale choice left on one
 * node would decide the next resolution against the admin's later one.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BLOCK } from '../../src/replication/bitmap.js';
import { apart, freePort, initialSync, newDisk, Node, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;

/** The node daemon's `resource resolve`: the choice, and a new connect. */
function resolve(n: Node, keep: string): void {
  n.resource.keepNode = keep;
  n.resource.standAlone = false;
  n.resource.lastRefusal = undefined;
  n.connector.kick('test: split-brain resolution');
}

test('two different --keep choices are refused and forgotten on both nodes: the admin\'s next choice, asked on one node, decides (simulator seed 4055)', { timeout: 60_000 }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-sb-resolve-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const a = await startNode('alpha', await newDisk(64 * MiB, 'alpha'), port, { splitBrainDir: dir });
  const b = await startNode('bravo', await newDisk(64 * MiB, 'bravo'), port, { splitBrainDir: dir });
  t.after(async () => {
    await stopNode(a).catch(() => undefined);
    await stopNode(b).catch(() => undefined);
  });
  await initialSync(a, b);
  await apart(a, b);
  for (let blk = 0; blk < 64; blk++) await a.resource.write(blk * BLOCK, Buffer.alloc(BLOCK, 0xaa));
  await a.resource.demote();
  await b.resource.promote(false);
  for (let blk = 1000; blk < 1016; blk++) await b.resource.write(blk * BLOCK, Buffer.alloc(BLOCK, 0xbb));
  await b.resource.demote();
  a.resource.standAlone = false;
  b.resource.standAlone = false;
  await until('the split brain found on both', () => a.resource.splitBrain !== null && b.resource.splitBrain !== null && a.resource.standAlone && b.resource.standAlone, 20_000);

  // Each node asked to keep the other one: no answer, and neither choice stays.
  resolve(a, 'bravo');
  resolve(b, 'alpha');
  await until('the conflict refused on both', () => /ask for one/.test(String(a.resource.lastRefusal)) && /ask for one/.test(String(b.resource.lastRefusal)), 20_000);
  assert.equal(a.resource.keepNode, undefined, 'alpha forgot its refused choice');
  assert.equal(b.resource.keepNode, undefined, 'bravo forgot its refused choice');

  // The admin asks again, on alpha only: bravo's data stays.
  b.resource.standAlone = false;
  b.resource.lastRefusal = undefined;
  resolve(a, 'bravo');
  await until('resolved keeping bravo', () => upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0, 20_000);
  assert.match(String(a.resource.splitBrain?.resolution), /kept bravo's data/);
  const one = Buffer.alloc(BLOCK);
  await a.disk.read(1000 * BLOCK, one);
  assert.equal(one[0], 0xbb, 'bravo\'s write is on alpha');
  await a.disk.read(0, one);
  assert.equal(one[0], 0, 'alpha\'s lone write is gone (saved in the split-brain file)');
});
