/**
 * Connections to an export that moved away (its Primary role went to the
 * peer) are retired, not cut: a flush answers whether the close made their
 * writes durable (QEMU's blockdev-reopen flushes the old connection before
 * it moves a VM's disk; a cut connection failed that flush and the move),
 * everything else fails, other exports are not touched.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type net from 'node:net';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { StaticExports } from '../../src/nbd/exports.js';
import { NbdServer } from '../../src/nbd/server.js';
import { NbdClient } from '../../src/nbd/client.js';
import { silentLogger } from '../../src/util/log.js';

const SIZE = 1024 * 1024;

async function setup(t: { after(fn: () => unknown): void }): Promise<{ server: NbdServer; port: number }> {
  const server = new NbdServer({
    exports: new StaticExports([
      { name: 'moving', device: new MemoryDevice(SIZE, 'moving') },
      { name: 'staying', device: new MemoryDevice(SIZE, 'staying') },
    ]),
    log: silentLogger(),
  });
  const port = ((await server.listen('127.0.0.1', 0)) as net.AddressInfo).port;
  t.after(() => server.close());
  return { server, port };
}

test('a retired connection answers a flush with the close\'s outcome and fails reads and writes; other exports go on', async (t) => {
  const { server, port } = await setup(t);
  const moving = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'moving' });
  const staying = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'staying' });
  t.after(() => { moving.close(); staying.close(); });
  await moving.write(0, Buffer.alloc(4096, 1));
  let closeDone!: () => void;
  const closed = new Promise<void>((resolve) => (closeDone = resolve));
  await server.retireConnections((exp) => exp.name === 'moving', closed);
  // The flush waits for the close: it may only say "durable" once the close has flushed.
  let flushed = false;
  const flush = moving.flush().then(() => (flushed = true));
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(flushed, false, 'a flush is not answered before the close is over');
  closeDone();
  await flush;
  await assert.rejects(moving.read(0, 4096), /no longer served here|EIO|Input\/output/i);
  await assert.rejects(moving.write(0, Buffer.alloc(4096, 2)), /no longer served here|EIO|Input\/output/i);
  await moving.flush();
  await staying.write(0, Buffer.alloc(4096, 3));
  assert.equal((await staying.read(0, 4096))[0], 3);
});

test('a retired connection\'s flush fails when the close failed (its writes may not be durable), and no close outcome is left unhandled without clients', async (t) => {
  const { server, port } = await setup(t);
  const moving = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'moving' });
  t.after(() => moving.close());
  await server.retireConnections((exp) => exp.name === 'moving', Promise.reject(new Error('commit failed: no quorum')));
  await assert.rejects(moving.flush(), /may not be durable|EIO|Input\/output/i);
  // No connection to the export at all: a failed close is nobody's unhandled rejection.
  await server.retireConnections((exp) => exp.name === 'staying', Promise.reject(new Error('commit failed')));
  await new Promise((r) => setTimeout(r, 50));
});

test('a retired connection stays until its client leaves: a VM moved minutes later still gets its flush answered (a cut one fails the move for good)', async (t) => {
  const { server, port } = await setup(t);
  const moving = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'moving' });
  t.after(() => moving.close());
  // Minutes pass (mocked: the server's timers only).
  t.mock.timers.enable({ apis: ['setTimeout'] });
  await server.retireConnections((exp) => exp.name === 'moving', Promise.resolve());
  t.mock.timers.tick(10 * 60_000);
  t.mock.timers.reset();
  await moving.flush();
  await assert.rejects(moving.write(0, Buffer.alloc(4096, 2)), /no longer served here|EIO|Input\/output/i);
  await moving.flush();
});
