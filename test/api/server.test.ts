/**
 * The API server with real parts behind it (an EventLog, a pool on a
 * memory device with the real send stream): the event stream's backlog,
 * a send whose client leaves, and the client's follow of a silent server.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { EventLog } from '../../src/cluster/events.js';
import { ApiServer } from '../../src/api/server.js';
import { followEvents } from '../../src/api/client.js';
import { createLogger } from '../../src/util/log.js';
import { Pool } from '../../src/volume/pool.js';
import { createVolume, shareVolume } from '../../src/volume/operations.js';
import { sendVolume } from '../../src/volume/stream.js';
import { freePorts } from '../ports.js';

const log = createLogger('api-test', 'silent');
const TOKEN = 'test-token';
const MiB = 1024 * 1024;

function get(port: number, urlPath: string, onData?: (chunk: string, req: http.ClientRequest) => void): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: urlPath, agent: false, headers: { authorization: `Bearer ${TOKEN}` } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        body += c;
        onData?.(c, req);
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
  });
}

test('api server: the event stream sends only the recent records it has in memory, never the whole history from disk', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-api-events-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const events = EventLog.open(dir, 'alpha', { ringRecords: 20, log });
  t.after(() => events.close());
  for (let i = 0; i < 500; i++) events.record('vm-started', { vm: `v${i}` }, `vm v${i} started`);
  const [port] = await freePorts(1);
  const server = await ApiServer.listen({ host: '127.0.0.1', port, token: TOKEN, handler: async () => null, events, log });
  t.after(() => server.close());
  const seqs: number[] = [];
  await get(port, '/api/v1/events/stream?since=0', (chunk, req) => {
    for (const m of chunk.matchAll(/^id: (\d+)$/gm)) seqs.push(Number(m[1]));
    if (seqs.length >= 20) req.destroy();
  }).catch(() => undefined);
  assert.equal(seqs[0], 481, 'the backlog starts at the oldest record in memory (the history is GET /api/v1/events, paged)');
  assert.equal(seqs.at(-1), 500);
});

test('api server: a send whose client leaves half-way ends (the command settles), it does not hang on a stream nobody reads', async (t) => {
  const pool = await Pool.create('p', [new MemoryDevice(256 * MiB, 'd0')]);
  t.after(() => pool.close());
  await createVolume(pool, 'v', 64 * MiB);
  const { vol } = await import('../volume/helpers.js');
  await vol(pool, 'v').write(0, Buffer.alloc(32 * MiB, 0x5a));
  await shareVolume(pool, 'v', 's', false);
  let settled: 'resolved' | 'rejected' | undefined;
  const [port] = await freePorts(1);
  const server = await ApiServer.listen({
    host: '127.0.0.1',
    port,
    token: TOKEN,
    log,
    handler: async (c, io) => {
      try {
        const r = await sendVolume(pool, c.name as string, undefined, io.output!);
        settled = 'resolved';
        return r;
      } catch (err) {
        settled = 'rejected';
        throw err;
      }
    },
  });
  t.after(() => server.close());
  let got = 0;
  await get(port, '/api/v1/pools/p/volumes/s/stream', (chunk, req) => {
    got += chunk.length;
    if (got > MiB) req.destroy();
  }).catch(() => undefined);
  for (let i = 0; i < 100 && settled === undefined; i++) await new Promise((r) => setTimeout(r, 50));
  assert.equal(settled, 'rejected', 'the send ended when its client left');
});

test('api client: following the events of a server that falls silent (no keep-alive) reconnects instead of hanging', async (t) => {
  let connections = 0;
  const silent = http.createServer((_req, res) => {
    connections++;
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.flushHeaders();
    // ... and then nothing, not even the keep-alive comment.
  });
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    silent.closeAllConnections();
    return new Promise<void>((resolve) => silent.close(() => resolve()));
  });
  const port = (silent.address() as { port: number }).port;
  const stop = new AbortController();
  const gaps: string[] = [];
  const following = followEvents({ host: '127.0.0.1', port, token: TOKEN, what: 'the test server' }, 0, () => undefined, {
    signal: stop.signal,
    retryMs: 50,
    readTimeoutMs: 300,
    onGap: (why) => gaps.push(why),
  });
  for (let i = 0; i < 100 && connections < 2; i++) await new Promise((r) => setTimeout(r, 50));
  stop.abort();
  await following;
  assert.ok(connections >= 2, `reconnected after the silence (${connections} connection(s))`);
  assert.match(gaps[0] ?? '', /no word .* for 300 ms/);
});

test('api client over TLS: a call that times out fails with a clear error and the caller goes on (the reset must not throw in the timer)', async (t) => {
  const { clusterCa, serverCertificate } = await import('../../src/api/tls.js');
  const { callApi } = await import('../../src/api/client.js');
  const ca = clusterCa(Buffer.from('a-cluster-secret-for-tls-tests'), 't', { ips: ['127.0.0.1'], dns: ['alpha'] });
  const [port] = await freePorts(1);
  let release: () => void = () => undefined;
  let slow = true;
  const server = await ApiServer.listen({
    host: '127.0.0.1',
    port,
    token: TOKEN,
    tls: serverCertificate(ca, 'alpha', ['127.0.0.1']),
    log,
    handler: () => (slow ? new Promise((resolve) => (release = () => resolve({ late: true }))) : Promise.resolve({ late: true })),
  });
  t.after(async () => {
    release();
    await server.close();
  });
  await assert.rejects(callApi({ host: '127.0.0.1', port, token: TOKEN, ca: ca.certPem, what: 'node alpha' }, { cmd: 'cluster.status' }, { timeoutMs: 300 }), /node alpha at 127\.0\.0\.1:\d+ did not answer within 300 ms/);
  // Still here, and the server still serves.
  slow = false;
  release();
  assert.deepEqual(await callApi({ host: '127.0.0.1', port, token: TOKEN, ca: ca.certPem, what: 'node alpha' }, { cmd: 'cluster.status' }, { timeoutMs: 5000 }), { late: true });
});

/** An API server whose every command takes 500 ms, and a promise that resolves when one has started. */
async function slowServer(): Promise<{ server: ApiServer; port: number; running: Promise<void> }> {
  const [port] = await freePorts(1);
  let started: () => void = () => undefined;
  const running = new Promise<void>((resolve) => (started = resolve));
  const server = await ApiServer.listen({
    host: '127.0.0.1',
    port,
    token: TOKEN,
    log,
    handler: async () => {
      started();
      await new Promise((r) => setTimeout(r, 500));
      return { done: true };
    },
  });
  return { server, port, running };
}

test('api server stop: a request already running gets its answer; a connection cut after the request was sent says it may have run', async (t) => {
  const { callApi } = await import('../../src/api/client.js');
  const one = await slowServer();
  const target = { host: '127.0.0.1', port: one.port, token: TOKEN, what: 'node alpha' };
  const call = callApi(target, { cmd: 'cluster.status' });
  await one.running;
  await one.server.close();
  assert.deepEqual(await call, { done: true }, 'the daemon stopping let the running command answer');

  const two = await slowServer();
  t.after(() => two.server.close());
  const call2 = callApi({ ...target, port: two.port }, { cmd: 'cluster.status' });
  await two.running;
  (two.server.app.server as http.Server).closeAllConnections();
  await assert.rejects(call2, /the connection to node alpha at 127\.0\.0\.1:\d+ broke after the request was sent .*it may have run/);
});


test('api server: a send whose client leaves while the sender is between writes (reading the disk) fails that send, and the daemon lives on', async (t) => {
  const { RecordWriterForTests } = await import('../../src/volume/stream.js');
  const [port] = await freePorts(1);
  let between: () => void = () => undefined;
  const paused = new Promise<void>((resolve) => (between = resolve));
  let goOn: () => void = () => undefined;
  const disk = new Promise<void>((resolve) => (goOn = resolve));
  let outcome: string | undefined;
  const server = await ApiServer.listen({
    host: '127.0.0.1',
    port,
    token: TOKEN,
    log,
    handler: async (_c, io) => {
      const w = new RecordWriterForTests(io.output!);
      try {
        await w.raw(Buffer.alloc(64 * 1024, 1));
        between();
        // "Reading the disk": the client leaves meanwhile.
        await disk;
        for (let i = 0; i < 64; i++) await w.raw(Buffer.alloc(64 * 1024, 2));
        outcome = 'finished';
      } catch (err) {
        outcome = `failed: ${(err as Error).message}`;
        throw err;
      }
      return { records: 0 };
    },
  });
  t.after(() => server.close());
  const req = http.get({ host: '127.0.0.1', port, path: '/api/v1/pools/p/volumes/s/stream', agent: false, headers: { authorization: `Bearer ${TOKEN}` } });
  req.on('error', () => undefined);
  req.on('response', (res) => res.resume());
  await paused;
  req.destroy();
  await new Promise((r) => setTimeout(r, 200));
  goOn();
  for (let i = 0; i < 100 && outcome === undefined; i++) await new Promise((r) => setTimeout(r, 50));
  assert.match(outcome ?? 'still running', /^failed: send: cannot write the stream/);
});

test('api server: a stop ends the open event streams at once (they are never idle); a follower behind the records in memory is told of the gap', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-api-events-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const events = EventLog.open(dir, 'alpha', { ringRecords: 10, log });
  t.after(() => events.close());
  for (let i = 0; i < 30; i++) events.record('vm-started', { vm: `v${i}` }, `vm v${i} started`);
  const [port] = await freePorts(1);
  const server = await ApiServer.listen({ host: '127.0.0.1', port, token: TOKEN, handler: async () => null, events, log });
  const gaps: string[] = [];
  const got: number[] = [];
  const stop = new AbortController();
  const following = followEvents({ host: '127.0.0.1', port, token: TOKEN, what: 'node alpha' }, 5, (r) => got.push(r.seq), { signal: stop.signal, retryMs: 60_000, onGap: (why) => gaps.push(why) });
  for (let i = 0; i < 100 && got.length < 10; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(got[0], 21);
  assert.match(gaps[0] ?? '', /events 6 to 20 are older than what node alpha keeps in memory/);
  // close() with a long grace: the stream must not hold it.
  const closed = server.close(60_000).then(() => 'closed');
  const first = await Promise.race([closed, new Promise((r) => setTimeout(() => r('held'), 5000))]);
  stop.abort();
  await following;
  assert.equal(first, 'closed', 'an open event stream held the stop');
});
