/**
 * The commit period (dm-thin's, 1 s by default): a client that never
 * flushes loses, in a power cut, at most the writes of the last period to
 * newly mapped chunks, not everything since the pool was opened.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { Pool } from '../../src/volume/pool.js';
import { createVolume } from '../../src/volume/operations.js';
import { keep, MiB, readVolume, vol } from './helpers.js';

async function writeThenCut(commitPeriodMs: number, waitMs: number): Promise<Buffer> {
  const inner = new MemoryDevice(64 * MiB, 'd0');
  const dev = new FaultyDevice(keep(inner));
  const pool = await Pool.create('p', [dev], { commitPeriodMs });
  await createVolume(pool, 'v', 8 * MiB);
  // A write to a chunk never mapped before, and no flush after it.
  await vol(pool, 'v').write(4 * MiB, Buffer.alloc(4096, 0x5a));
  await new Promise((r) => setTimeout(r, waitMs));
  await dev.powerCut();
  await pool.close().catch(() => undefined);
  const again = await Pool.open('p', [new FaultyDevice(keep(inner))], { commitPeriodMs: 0 });
  try {
    return (await readVolume(again, 'v')).subarray(4 * MiB, 4 * MiB + 4096);
  } finally {
    await again.close();
  }
}

test('an unflushed write to a new chunk survives a power cut once a commit period has passed', async () => {
  assert.ok((await writeThenCut(200, 700)).every((b) => b === 0x5a), 'the periodic commit made it durable');
});

test('without the commit period the same write is lost (only a flush commits): the test can tell', async () => {
  assert.ok((await writeThenCut(0, 700)).every((b) => b === 0), 'nothing committed it');
});
