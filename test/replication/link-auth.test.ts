import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { authenticateLink, encodeFrame, FEATURE_VERIFY_ASK, FRAME_HELLO, LinkIdentity, LinkRefused, sharedFeatures } from '../../src/replication/link-auth.js';

const SECRET = Buffer.from('correct horse battery staple, twice');

function id(node: string, over: Partial<LinkIdentity> = {}): LinkIdentity {
  return { cluster: 'home', node, resource: 'a', secret: SECRET, ...over };
}

/** A connected pair of sockets over loopback; both closed after the test. */
async function pair(t: { after(fn: () => void): void }): Promise<[net.Socket, net.Socket]> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = net.createConnection(port, '127.0.0.1');
  const srv = await accepted;
  t.after(() => {
    client.destroy();
    srv.destroy();
    server.close();
  });
  return [client, srv];
}

async function both(a: Promise<unknown>, b: Promise<unknown>): Promise<[unknown, unknown]> {
  // Both handlers at once: a side that fails first must not count as an unhandled rejection.
  const settle = (p: Promise<unknown>) => p.then((v) => v, (e: unknown) => e);
  const sa = settle(a);
  const sb = settle(b);
  return [await sa, await sb];
}

test('same secret: both sides authenticate and learn who the peer is; data after the handshake is kept', async (t) => {
  const [c, s] = await pair(t);
  const [ra, rb] = await both(authenticateLink(c, id('alpha'), ['bravo']), authenticateLink(s, id('bravo'), ['alpha']));
  assert.equal((ra as { peer: { node: string } }).peer.node, 'bravo');
  assert.equal((rb as { peer: { node: string } }).peer.node, 'alpha');
});

test('a wrong secret is refused on both sides', async (t) => {
  const [c, s] = await pair(t);
  const [ra, rb] = await both(
    authenticateLink(c, id('alpha'), ['bravo']),
    authenticateLink(s, id('bravo', { secret: Buffer.from('another secret entirely, 32 chars') }), ['alpha']),
  );
  for (const r of [ra, rb]) {
    assert.ok(r instanceof LinkRefused, String(r));
    assert.ok(['wrong-secret', 'refused-by-peer', 'closed'].includes(r.reason), r.reason);
  }
  assert.ok([ra, rb].some((r) => (r as LinkRefused).reason === 'wrong-secret'));
});

test('another cluster, another resource, a node not in the resource: refused with the reason', async (t) => {
  for (const [over, allowed, reason] of [
    [{ cluster: 'office' }, ['alpha'], 'other-cluster'],
    [{ resource: 'b' }, ['alpha'], 'other-resource'],
    [{ node: 'mallory' }, ['alpha'], 'unknown-node'],
  ] as const) {
    const [c, s] = await pair(t);
    const [ra, rb] = await both(authenticateLink(c, id('alpha'), ['bravo']), authenticateLink(s, id('bravo', over), [...allowed]));
    assert.ok(ra instanceof LinkRefused && rb instanceof LinkRefused, `${reason}: ${String(ra)} / ${String(rb)}`);
    assert.ok([ra.reason, rb.reason].includes(reason), `${reason}: got ${ra.reason} / ${rb.reason}`);
  }
});

test('garbage, an oversized frame, a truncated hello and silence are refused without a crash', async (t) => {
  const cases: [string, (sock: net.Socket) => void, string][] = [
    ['garbage', (sock) => sock.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')), 'malformed'],
    ['oversized', (sock) => sock.write(encodeFrame(FRAME_HELLO, Buffer.alloc(100_000))), 'malformed'],
    ['truncated', (sock) => sock.end(encodeFrame(FRAME_HELLO, Buffer.alloc(40)).subarray(0, 20)), 'closed'],
    ['silence', () => undefined, 'timeout'],
  ];
  for (const [name, act, reason] of cases) {
    const [c, s] = await pair(t);
    s.on('error', () => undefined);
    act(s);
    const r = await authenticateLink(c, id('alpha'), ['bravo'], 300).then((v) => v, (e: unknown) => e);
    assert.ok(r instanceof LinkRefused, `${name}: ${String(r)}`);
    assert.equal(r.reason, reason, name);
  }
});

test('features: each side learns what both builds can do; an older build (no list), a garbled list or an unknown feature counts for nothing', async (t) => {
  const [c, s] = await pair(t);
  const [ra, rb] = await both(authenticateLink(c, id('alpha'), ['bravo']), authenticateLink(s, id('bravo', { features: [] }), ['alpha']));
  type Peer = { peer: Parameters<typeof sharedFeatures>[0] };
  assert.deepEqual([...sharedFeatures((ra as Peer).peer)], [], 'bravo plays an older build: alpha sees no feature');
  assert.deepEqual([...sharedFeatures((rb as Peer).peer)], [FEATURE_VERIFY_ASK], 'alpha lists verify-ask');
  const hello = { protocol: 1, cluster: 'home', node: 'x', resource: 'a' };
  assert.deepEqual([...sharedFeatures(hello)], []);
  assert.deepEqual([...sharedFeatures({ ...hello, features: 'verify-ask' as unknown as string[] })], []);
  assert.deepEqual([...sharedFeatures({ ...hello, features: [FEATURE_VERIFY_ASK, 'teleport', 7 as unknown as string] })], [FEATURE_VERIFY_ASK]);
  assert.deepEqual([...sharedFeatures({ ...hello, features: [FEATURE_VERIFY_ASK] }, [])], [], 'this side plays an older build: none either');
});
