import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { Pool } from '../../src/volume/pool.js';
import { ThinVolume } from '../../src/volume/volume.js';
import { createVolume, shareVolume, resizeVolume, removeVolume, diffVolumes } from '../../src/volume/operations.js';

const MiB = 1024 * 1024;

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + (i >> 8)) & 0xff;
  return b;
}

async function readAll(vol: ThinVolume, offset: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await vol.read(offset, b);
  return b;
}

test('create, write, snapshot, overwrite, reopen: data and snapshot intact', async () => {
  const devs = [new MemoryDevice(64 * MiB, 'd0'), new MemoryDevice(32 * MiB, 'd1')];
  const pool = await Pool.create('p', devs.map(keep));
  const st = await createVolume(pool, 'v', 80 * MiB);
  const vol = new ThinVolume(pool, st);
  const a = pattern(3 * MiB, 1);
  await vol.write(5 * MiB + 1000, a);
  assert.deepEqual(await readAll(vol, 5 * MiB + 1000, a.length), a);
  assert.deepEqual(await readAll(vol, 0, 4096), Buffer.alloc(4096));
  const snap = await shareVolume(pool, 'v', 's', false);
  const b = pattern(100 * 1024, 2);
  await vol.write(5 * MiB + 5000, b);
  const sv = new ThinVolume(pool, snap);
  assert.deepEqual(await readAll(sv, 5 * MiB + 1000, a.length), a);
  const ranges = diffVolumes(pool, 's', 'v');
  assert.deepEqual(ranges, [{ offset: 5 * MiB, length: 128 * 1024 }]);
  await vol.flush();
  await pool.close();
  const pool2 = await Pool.open('p', [keep(devs[1]), keep(devs[0])]);
  const v2 = new ThinVolume(pool2, pool2.volume('v')!);
  const expect = Buffer.from(a);
  b.copy(expect, 4000);
  assert.deepEqual(await readAll(v2, 5 * MiB + 1000, a.length), expect);
  const s2 = new ThinVolume(pool2, pool2.volume('s')!);
  assert.deepEqual(await readAll(s2, 5 * MiB + 1000, a.length), a);
  assert.deepEqual(diffVolumes(pool2, 's', 'v'), ranges);
  await resizeVolume(pool2, 'v', 200 * MiB);
  assert.equal(v2.size, 200 * MiB);
  await removeVolume(pool2, 's');
  const u = pool2.usage();
  assert.ok(u.usedChunks > 0);
  await pool2.close();
});

/** The same device, but close() leaves the data for the next open (a disk outlives a process). */
function keep(d: MemoryDevice): MemoryDevice {
  return new Proxy(d, { get: (t, k) => (k === 'close' ? () => undefined : Reflect.get(t, k, t)) });
}

test('a pool whose last commit fails still gives its devices back (a fenced-off resource fails the flush; its data must not stay "in use" and block the resync)', async () => {
  const mem = new MemoryDevice(64 * MiB, 'd0');
  const dev = new FaultyDevice(mem);
  let closes = 0;
  const counted = new Proxy(dev, { get: (t, k) => (k === 'close' ? () => void closes++ : Reflect.get(t, k, t)) });
  const pool = await Pool.create('p', [counted]);
  const st = await createVolume(pool, 'v', 8 * MiB);
  await new ThinVolume(pool, st).write(0, pattern(64 * 1024, 3));
  dev.failWith({ op: 'flush', code: 'EIO' });
  await assert.rejects(pool.close(), /EIO|flush/i);
  assert.equal(closes, 1, 'the device was given back');
  assert.equal(pool.isClosed, true);
});
