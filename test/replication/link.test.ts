import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { authenticateLink, encodeFrame } from '../../src/replication/link-auth.js';
import { PeerLink } from '../../src/replication/link.js';

const SECRET = Buffer.from('correct horse battery staple, twice');

async function linkedPair(
  t: { after(fn: () => void): void },
  options = { pingIntervalMs: 100, pingTimeoutMs: 300 },
  wrapPeer = true,
): Promise<[PeerLink, PeerLink | undefined, net.Socket, net.Socket]> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = net.createConnection(port, '127.0.0.1');
  const srv = await accepted;
  const pa = authenticateLink(client, { cluster: 'home', node: 'alpha', resource: 'a', secret: SECRET }, ['bravo']);
  const pb = authenticateLink(srv, { cluster: 'home', node: 'bravo', resource: 'a', secret: SECRET }, ['alpha']);
  const [a, b] = await Promise.all([pa, pb]);
  const la = new PeerLink(client, a.leftover, options);
  // Without a PeerLink on it, the peer socket is a hung process: it answers nothing.
  const lb = wrapPeer ? new PeerLink(srv, b.leftover, options) : undefined;
  srv.on('error', () => undefined);
  t.after(() => {
    la.close();
    lb?.close();
    srv.destroy();
    server.close();
  });
  return [la, lb, client, srv];
}

function nextDown(link: PeerLink): Promise<{ why: string; at: number }> {
  return new Promise((resolve) => link.once('down', (why) => resolve({ why, at: Date.now() })));
}

test('frames of every size arrive whole and in order; pings keep an idle link up', async (t) => {
  const [a, b0] = await linkedPair(t);
  const b = b0!;
  const got: [number, number][] = [];
  b.on('frame', (type, payload) => got.push([type, payload.length]));
  const sizes = [0, 1, 4096, 65536, 1024 * 1024];
  for (const [i, n] of sizes.entries()) a.send(100 + i, Buffer.alloc(n, i));
  await new Promise((r) => setTimeout(r, 700)); // several ping intervals, idle after the burst
  assert.deepEqual(got, sizes.map((n, i) => [100 + i, n]));
  assert.ok(a.isUp && b.isUp, 'an idle but live link must stay up');
});

test('a peer that stops answering is declared dead within the ping timeout (sub-second)', async (t) => {
  const [a, , , srv] = await linkedPair(t, undefined, false);
  const down = nextDown(a);
  const t0 = Date.now();
  srv.pause(); // the peer's process hangs: it reads nothing, answers nothing
  const { why, at } = await down;
  assert.match(why, /did not answer a ping within 300 ms/);
  const ms = at - t0;
  t.diagnostic(`dead peer detected after ${ms} ms (interval 100, timeout 300)`);
  assert.ok(ms < 2000, `detection took ${ms} ms`);
});

test('a closed peer and a protocol violation end the link with the reason; nothing throws', async (t) => {
  {
    const [a, , , srv] = await linkedPair(t);
    const down = nextDown(a);
    srv.destroy();
    assert.match((await down).why, /closed the connection|connection error/);
  }
  {
    const [a, , , srv] = await linkedPair(t);
    const down = nextDown(a);
    srv.write(Buffer.from('not a frame at all, just bytes'));
    assert.match((await down).why, /bad frame magic/);
  }
  {
    const [a, , , srv] = await linkedPair(t);
    const down = nextDown(a);
    const huge = encodeFrame(50, Buffer.alloc(0));
    huge.writeUInt32BE(64 * 1024 * 1024, 8);
    srv.write(huge);
    assert.match((await down).why, /frame of 67108864 bytes/);
  }
});

test('frames cut into pieces at any byte (headers too) are put back together byte for byte, in order', async (t) => {
  const [a, , , srv] = await linkedPair(t, { pingIntervalMs: 10_000, pingTimeoutMs: 20_000 }, false);
  const got: Buffer[] = [];
  a.on('frame', (_type, payload) => got.push(Buffer.from(payload)));
  const sent: Buffer[] = [];
  let seed = 7;
  const rnd = (n: number): number => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % n;
  for (let i = 0; i < 60; i++) {
    const payload = Buffer.alloc(rnd(3) === 0 ? rnd(20) : rnd(300_000));
    for (let j = 0; j < payload.length; j++) payload[j] = (i * 31 + j) & 0xff;
    sent.push(payload);
  }
  const wire = Buffer.concat(sent.map((p, i) => encodeFrame(200 + (i % 50), p)));
  // Pieces from 1 byte to 200 KiB, each its own socket write and, with a pause now and then, its own read.
  for (let at = 0; at < wire.length; ) {
    const n = Math.min(wire.length - at, rnd(4) === 0 ? 1 + rnd(11) : 1 + rnd(200_000));
    srv.write(wire.subarray(at, at + n));
    at += n;
    if (rnd(5) === 0) await new Promise((r) => setImmediate(r));
  }
  const deadline = Date.now() + 10_000;
  while (got.length < sent.length && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  assert.equal(got.length, sent.length);
  for (const [i, p] of sent.entries()) assert.ok(got[i].equals(p), `frame ${i} (${p.length} bytes)`);
});
