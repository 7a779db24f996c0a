/**
 * duet's own NBD client against duet's own server (in process), the pair
 * later layers use: pipelined I/O against a model, every command, structured
 * and simple replies, errors that leave the connection usable, NbdDevice.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import type net from 'node:net';
import { randomBytes } from 'node:crypto';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '../../src/blockdev/types.js';
import { StaticExports } from '../../src/nbd/exports.js';
import { NbdServer } from '../../src/nbd/server.js';
import { NbdClient, NbdError } from '../../src/nbd/client.js';
import { NbdDevice } from '../../src/nbd/device.js';
import { silentLogger } from '../../src/util/log.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
let server: NbdServer;
let port: number;
const disk = new MemoryDevice(SIZE, 'disk');
const flaky = new FaultyDevice(new MemoryDevice(SIZE, 'flaky-inner'), { writeBack: false });

before(async () => {
  server = new NbdServer({
    exports: new StaticExports([
      { name: 'disk', device: disk, description: 'a memory disk' },
      { name: 'flaky', device: flaky },
      { name: 'ro', device: new MemoryDevice(SIZE, 'ro'), readOnly: true },
    ]),
    log: silentLogger(),
  });
  port = ((await server.listen('127.0.0.1', 0)) as net.AddressInfo).port;
});

after(async () => {
  await server.close();
});

test('list and info name every export', async () => {
  const list = await NbdClient.list({ host: '127.0.0.1', port });
  assert.deepEqual(list.map((e) => e.name), ['disk', 'flaky', 'ro']);
  assert.equal(list[0].description, 'a memory disk');
  const info = await NbdClient.info({ host: '127.0.0.1', port, exportName: 'disk' });
  assert.equal(info.size, SIZE);
  assert.equal(info.blockSize?.maximum, 32 * MiB);
});

for (const structuredReplies of [true, false]) {
  test(`200 pipelined random reads and writes match a model (structured replies: ${structuredReplies})`, async () => {
    const c = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'disk', structuredReplies });
    try {
      const model = Buffer.alloc(SIZE);
      await c.writeZeroes(0, SIZE);
      // Writes first (non-overlapping), all in flight together, then reads, all in flight.
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 200; i++) {
        const offset = i * 65536 + (i % 7) * 513;
        const data = randomBytes(1 + ((i * 7919) % 60000));
        data.copy(model, offset);
        writes.push(c.write(offset, data, { fua: i % 10 === 0 }));
      }
      await Promise.all(writes);
      await c.flush();
      const reads = [];
      for (let i = 0; i < 200; i++) {
        const offset = (i * 104729) % (SIZE - 300000);
        const length = 1 + ((i * 31) % 300000);
        reads.push(c.read(offset, length).then((got) => assert.ok(got.equals(model.subarray(offset, offset + length)), `read ${offset}+${length}`)));
      }
      await Promise.all(reads);
    } finally {
      await c.disconnect();
    }
  });
}

test('trim, zeroes, cache and block status through the client', async () => {
  const c = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'disk' });
  try {
    await c.write(0, Buffer.alloc(128 * 1024, 0xaa));
    await c.trim(0, 128 * 1024);
    await c.writeZeroes(128 * 1024, 128 * 1024, { noHole: true });
    await c.cache(0, MiB);
    const extents = await c.blockStatus(0, 512 * 1024);
    assert.equal(extents[0].flags, EXTENT_HOLE | EXTENT_ZERO, JSON.stringify(extents));
    const one = await c.blockStatus(128 * 1024, 512 * 1024, { reqOne: true });
    assert.equal(one.length, 1);
    assert.equal(one[0].flags & EXTENT_HOLE, 0, 'noHole zeroes stay allocated');
    assert.ok((await c.read(0, 256 * 1024)).equals(Buffer.alloc(256 * 1024)));
    // A large read over holes arrives as OFFSET_HOLE chunks and reassembles to zeros.
    await c.trim(14 * MiB, 2 * MiB);
    await c.write(15 * MiB, Buffer.alloc(4096, 0x5a));
    const expected = Buffer.alloc(2 * MiB);
    expected.fill(0x5a, MiB, MiB + 4096);
    assert.ok((await c.read(14 * MiB, 2 * MiB)).equals(expected));
  } finally {
    await c.disconnect();
  }
});

test('a device error reaches the client as EIO and the connection goes on', async () => {
  const c = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'flaky' });
  try {
    flaky.failWith({ op: 'read', offset: MiB, length: 4096, count: 1 });
    await assert.rejects(c.read(MiB, 4096), (e: NbdError) => e.code === 'EIO');
    assert.equal((await c.read(MiB, 4096)).length, 4096);
    flaky.failWith({ op: 'write', count: 1, code: 'ENOSPC' });
    await assert.rejects(c.write(0, Buffer.alloc(512)), (e: NbdError) => e.code === 'ENOSPC');
    await c.write(0, Buffer.alloc(512, 1));
    await c.flush();
  } finally {
    flaky.clearFaults();
    await c.disconnect();
  }
});

test('writes to a read-only export fail with EPERM; unknown export is a clear error', async () => {
  const c = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'ro' });
  try {
    assert.ok(c.transmissionFlags & 2, 'READ_ONLY flag');
    assert.equal((await c.read(0, 4096)).length, 4096);
  } finally {
    await c.disconnect();
  }
  await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port, exportName: 'nope' }), /export "nope" not found/);
});

test('NbdDevice: a BlockDevice over duet\'s own server', async () => {
  const dev = await NbdDevice.open({ host: '127.0.0.1', port, exportName: 'disk' });
  try {
    assert.equal(dev.size, SIZE);
    assert.ok(dev.capabilities.trim && dev.capabilities.multiConn && dev.capabilities.extents);
    const data = randomBytes(300000);
    await dev.write(3 * MiB + 17, data, { fua: true });
    const back = Buffer.alloc(data.length);
    await dev.read(3 * MiB + 17, back);
    assert.ok(back.equals(data));
    // The bytes really are in the served device.
    const direct = Buffer.alloc(data.length);
    disk.read(3 * MiB + 17, direct);
    assert.ok(direct.equals(data));
  } finally {
    await dev.close();
  }
});
