/**
 * The node API against two real daemons: every route of routes.ts with a
 * well-formed request and a malformed one, the token, TLS with the cluster
 * CA, the error bodies, and the CLI agreeing with the API.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import https from 'node:https';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { PassThrough } from 'node:stream';
import { ROUTES } from '../../src/api/routes.js';
import { errorSchema, indexSchema } from '../../src/api/schemas.js';
import { callApi, type ApiTarget } from '../../src/api/client.js';
import { makeCluster, waitStatus, inSync } from '../e2e/cluster-harness.js';
import { DUET, ROOT, run } from '../e2e/harness.js';
import { peerToken, raw, readCa, targetOf } from './api-harness.js';

const MiB = 1024 * 1024;

function isErrorBody(v: unknown): v is { error: string; hint: string; exitCode: number } {
  const b = v as { error?: unknown; hint?: unknown; exitCode?: unknown };
  return typeof b?.error === 'string' && typeof b.hint === 'string' && typeof b.exitCode === 'number';
}

/** A request of each route: a well-formed one (and the statuses it may get) and a malformed one (always 400). */
interface Case {
  node?: 'alpha' | 'bravo';
  /** A peer route (/api/v1/node/...): sent with the peers' token. */
  peer?: boolean;
  /** Wait for the link to be up and in sync again afterwards. */
  resettle?: boolean;
  good: { path: string; body?: unknown; status: number[] };
  bad: { path: string; body?: unknown };
}

const long = 'x'.repeat(65);

function cases(now: number): Record<string, Case> {
  return {
    'GET /api/v1/status': { good: { path: '/api/v1/status', status: [200] }, bad: { path: '/api/v1/status?x=1' } },
    'GET /api/v1/pools': { good: { path: '/api/v1/pools', status: [200] }, bad: { path: '/api/v1/pools?x=1' } },
    'GET /api/v1/resources': { good: { path: '/api/v1/resources', status: [200] }, bad: { path: '/api/v1/resources?verbose=yes' } },
    'GET /api/v1/resources/:resource': { good: { path: '/api/v1/resources/a', status: [200] }, bad: { path: `/api/v1/resources/${long}` } },
    'POST /api/v1/resources/:resource/primary': { good: { path: '/api/v1/resources/a/primary', body: {}, status: [200] }, bad: { path: '/api/v1/resources/a/primary', body: { force: 'yes' } } },
    'POST /api/v1/resources/:resource/secondary': { node: 'bravo', good: { path: '/api/v1/resources/a/secondary', body: {}, status: [200] }, bad: { path: '/api/v1/resources/a/secondary', body: { force: 1 } } },
    'POST /api/v1/resources/:resource/disconnect': { node: 'bravo', good: { path: '/api/v1/resources/a/disconnect', body: {}, status: [200] }, bad: { path: '/api/v1/resources/a/disconnect', body: { now: true } } },
    'POST /api/v1/resources/:resource/connect': { node: 'bravo', resettle: true, good: { path: '/api/v1/resources/a/connect', body: {}, status: [200] }, bad: { path: '/api/v1/resources/a/connect', body: [] } },
    'POST /api/v1/resources/:resource/verify': { good: { path: '/api/v1/resources/a/verify', body: {}, status: [200] }, bad: { path: '/api/v1/resources/a/verify', body: { resource: 'b' } } },
    'POST /api/v1/resources/:resource/resolve': { good: { path: '/api/v1/resources/a/resolve', body: { keep: 'alpha' }, status: [200, 409] }, bad: { path: '/api/v1/resources/a/resolve', body: {} } },
    'POST /api/v1/resources/:resource/restore-blocks': { good: { path: '/api/v1/resources/a/restore-blocks', body: { file: '/nonexistent/saved.blocks' }, status: [400, 404, 409] }, bad: { path: '/api/v1/resources/a/restore-blocks', body: { file: 5 } } },
    'POST /api/v1/resources/:resource/attach': { good: { path: '/api/v1/resources/a/attach', body: {}, status: [200] }, bad: { path: '/api/v1/resources/a/attach', body: { disk: '/x' } } },
    'PUT /api/v1/nodes/:node/drained': { good: { path: '/api/v1/nodes/bravo/drained', body: { drained: false }, status: [200] }, bad: { path: '/api/v1/nodes/bravo/drained', body: { drained: 'no' } } },
    'POST /api/v1/nodes/:node/rejoin': { good: { path: '/api/v1/nodes/bravo/rejoin', body: {}, status: [200, 409] }, bad: { path: '/api/v1/nodes/bravo/rejoin', body: { force: true } } },
    'POST /api/v1/nodes/:node/drain': { good: { path: '/api/v1/nodes/charlie/drain', body: {}, status: [404] }, bad: { path: `/api/v1/nodes/${long}/drain`, body: {} } },
    'POST /api/v1/nodes/:node/fence-test': { good: { path: '/api/v1/nodes/bravo/fence-test', body: {}, status: [200] }, bad: { path: `/api/v1/nodes/${long}/fence-test`, body: {} } },
    'GET /api/v1/events': { good: { path: '/api/v1/events?tail=5', status: [200] }, bad: { path: '/api/v1/events?tail=-1' } },
    'GET /api/v1/vms': { good: { path: '/api/v1/vms', status: [200] }, bad: { path: '/api/v1/vms?all=1' } },
    // web's disk does not exist: a start is refused by the VM layer (no QEMU is run here; the VM tests boot real ones through the CLI).
    'POST /api/v1/vms/:vm/start': { good: { path: '/api/v1/vms/web/start', body: {}, status: [400, 404, 409] }, bad: { path: '/api/v1/vms/web/start', body: { on: 5 } } },
    'POST /api/v1/vms/:vm/stop': { good: { path: '/api/v1/vms/web/stop', body: {}, status: [200] }, bad: { path: '/api/v1/vms/web/stop', body: { force: 'x' } } },
    'GET /api/v1/vms/:vm/console': { good: { path: '/api/v1/vms/web/console', status: [200, 404, 409] }, bad: { path: '/api/v1/vms/web/console?since=abc' } },
    'POST /api/v1/vms/:vm/migrate': { good: { path: '/api/v1/vms/web/migrate', body: { to: 'bravo' }, status: [400, 409] }, bad: { path: '/api/v1/vms/web/migrate', body: {} } },
    'PUT /api/v1/vms/:vm/memory': { good: { path: '/api/v1/vms/web/memory', body: { bytes: 128 * MiB }, status: [400, 409] }, bad: { path: '/api/v1/vms/web/memory', body: { bytes: -1 } } },
    'GET /api/v1/vms/:vm/xl-config': { good: { path: '/api/v1/vms/web/xl-config', status: [200] }, bad: { path: `/api/v1/vms/${long}/xl-config` } },
    'GET /api/v1/node/vms': { good: { path: '/api/v1/node/vms', status: [200] }, bad: { path: '/api/v1/node/vms?x=1' } },
    'GET /api/v1/node/incarnations': { good: { path: '/api/v1/node/incarnations', status: [200] }, bad: { path: '/api/v1/node/incarnations?x=1' } },
    'POST /api/v1/node/vms/:vm/start': { good: { path: '/api/v1/node/vms/nosuch/start', body: {}, status: [404] }, bad: { path: '/api/v1/node/vms/nosuch/start', body: { vm: 'other' } } },
    'POST /api/v1/node/vms/:vm/stop': { good: { path: '/api/v1/node/vms/web/stop', body: {}, status: [200] }, bad: { path: '/api/v1/node/vms/web/stop', body: { force: 'x' } } },
    'PUT /api/v1/node/vms/:vm/mark': { good: { path: '/api/v1/node/vms/web/mark', body: { stopped: true, at: now }, status: [200] }, bad: { path: '/api/v1/node/vms/web/mark', body: { stopped: 'x', at: now } } },
    'POST /api/v1/node/vms/:vm/migrate-out': { good: { path: '/api/v1/node/vms/web/migrate-out', body: { to: 'bravo' }, status: [400, 409] }, bad: { path: '/api/v1/node/vms/web/migrate-out', body: { to: 7 } } },
    'POST /api/v1/node/vms/:vm/migrate-in': {
      node: 'bravo',
      good: { path: '/api/v1/node/vms/nosuch/migrate-in', body: { from: 'alpha', memoryBytes: 128 * MiB, cpus: 1, disks: [] }, status: [404] },
      bad: { path: '/api/v1/node/vms/nosuch/migrate-in', body: { from: 'alpha', memoryBytes: 128 * MiB, cpus: 0, disks: [] } },
    },
    'POST /api/v1/node/vms/:vm/migrate-done': { good: { path: '/api/v1/node/vms/nosuch/migrate-done', body: { from: 'bravo' }, status: [200, 404] }, bad: { path: '/api/v1/node/vms/nosuch/migrate-done', body: {} } },
    'POST /api/v1/node/vms/:vm/migrate-abort': { good: { path: '/api/v1/node/vms/nosuch/migrate-abort', body: {}, status: [200, 404] }, bad: { path: '/api/v1/node/vms/nosuch/migrate-abort', body: { why: 1 } } },
    'POST /api/v1/node/pause-io': { node: 'bravo', good: { path: '/api/v1/node/pause-io', body: { pools: ['pa'], leaseMs: 1000 }, status: [200] }, bad: { path: '/api/v1/node/pause-io', body: { pools: 'pa' } } },
    'POST /api/v1/node/resume-io': { node: 'bravo', good: { path: '/api/v1/node/resume-io', body: { pools: ['pa'], server: 'alpha' }, status: [200] }, bad: { path: '/api/v1/node/resume-io', body: { pools: ['pa'] } } },
    'GET /api/v1/pools/:pool': { good: { path: '/api/v1/pools/pa', status: [200] }, bad: { path: `/api/v1/pools/${long}` } },
    'GET /api/v1/pools/:pool/check': { good: { path: '/api/v1/pools/pa/check', status: [200] }, bad: { path: '/api/v1/pools/pa/check?repair=1' } },
    'POST /api/v1/pools/:pool/extend': { good: { path: '/api/v1/pools/pa/extend', body: { device: '/tmp/nothing.img' }, status: [400] }, bad: { path: '/api/v1/pools/pa/extend', body: { device: 1 } } },
    'GET /api/v1/pools/:pool/volumes': { good: { path: '/api/v1/pools/pa/volumes', status: [200] }, bad: { path: '/api/v1/pools/pa/volumes?all' } },
    'POST /api/v1/pools/:pool/volumes': { good: { path: '/api/v1/pools/pa/volumes', body: { name: 'v1', sizeBytes: 16 * MiB }, status: [200] }, bad: { path: '/api/v1/pools/pa/volumes', body: { name: 'v2', sizeBytes: '16M' } } },
    'PUT /api/v1/pools/:pool/volumes/:name/size': { good: { path: '/api/v1/pools/pa/volumes/v1/size', body: { sizeBytes: 32 * MiB }, status: [200] }, bad: { path: '/api/v1/pools/pa/volumes/v1/size', body: { sizeBytes: 0 } } },
    'POST /api/v1/pools/:pool/volumes/:source/snapshots': { good: { path: '/api/v1/pools/pa/volumes/v1/snapshots', body: { name: 's1' }, status: [200] }, bad: { path: '/api/v1/pools/pa/volumes/v1/snapshots', body: {} } },
    'POST /api/v1/pools/:pool/volumes/:source/clones': { good: { path: '/api/v1/pools/pa/volumes/s1/clones', body: { name: 'c1' }, status: [200] }, bad: { path: '/api/v1/pools/pa/volumes/s1/clones', body: { name: '' } } },
    'DELETE /api/v1/pools/:pool/volumes/:name': { good: { path: '/api/v1/pools/pa/volumes/c1', status: [200] }, bad: { path: '/api/v1/pools/pa/volumes/c1?force=1' } },
    'GET /api/v1/pools/:pool/diff': { good: { path: '/api/v1/pools/pa/diff?old=s1&new=s1', status: [200] }, bad: { path: '/api/v1/pools/pa/diff?old=s1' } },
    'GET /api/v1/pools/:pool/volumes/:name/stream': { good: { path: '/api/v1/pools/pa/volumes/nosuch/stream', status: [404] }, bad: { path: '/api/v1/pools/pa/volumes/s1/stream?from=' } },
    'PUT /api/v1/pools/:pool/volumes/:name/stream': { good: { path: '/api/v1/pools/pa/volumes/r0/stream', body: Buffer.from('not a stream'), status: [400, 409] }, bad: { path: '/api/v1/pools/pa/volumes/r0/stream', body: { not: 'a stream' } } },
  };
}

test('api: every route answers a well-formed request and refuses a malformed one (400, with error and hint); the token and TLS are required', { timeout: 240_000 }, async (t) => {
  const c = await makeCluster(t, { diskBytes: 64 * MiB, extra: ['vms:', '  web: { disks: [pa/web-disk], memory: 128M }'] });
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'alpha Primary and in sync', (s) => s.role === 'Primary' && inSync(s));
  const alpha = targetOf(c.file, 'alpha');
  const bravo = targetOf(c.file, 'bravo');

  // ---- TLS: the node's certificate chains to the cluster CA written beside the secret, and names the node's address.
  const ca = readCa(c.dir);
  // The same key as the CA the CLI derives from the secret (ECDSA signatures differ from copy to copy; any copy does).
  assert.ok(new X509Certificate(ca).publicKey.equals(new X509Certificate(alpha.ca!).publicKey), 'the CA file has the key the CLI derives from the secret');
  const peerCert = await new Promise<X509Certificate>((resolve, reject) => {
    const req = https.request({ host: alpha.host, port: alpha.port, path: '/api/v1', ca, agent: false, headers: { authorization: `Bearer ${alpha.token}` } }, (res) => {
      const cert = (res.socket as unknown as { getPeerX509Certificate(): X509Certificate }).getPeerX509Certificate();
      res.resume();
      resolve(cert);
    });
    req.on('error', reject);
    req.end();
  });
  assert.ok(peerCert.checkIP('127.0.0.2'), peerCert.subjectAltName);
  assert.ok(peerCert.checkIssued(new X509Certificate(ca)));
  // The node presents its own certificate only (the clients hold the CA; a second copy would clash in NSS).
  const shown = spawnSync('openssl', ['s_client', '-connect', `${alpha.host}:${alpha.port}`, '-showcerts'], { input: '', encoding: 'utf8', timeout: 20_000 });
  assert.equal((shown.stdout.match(/BEGIN CERTIFICATE/g) ?? []).length, 1, shown.stdout.slice(0, 2000));
  // Without the cluster CA a client refuses the node (a self-made CA, trusted by nobody else).
  await assert.rejects(raw(alpha, 'GET', '/api/v1', { ca: null }), /self-signed|unable to verify|certificate/i);
  // Plain HTTP to the TLS port gets nowhere.
  await assert.rejects(raw({ ...alpha, ca: undefined }, 'GET', '/api/v1', { timeoutMs: 5000 }));

  // ---- the token.
  for (const [token, why] of [
    [null, 'the API needs the cluster token'],
    ['wrong', 'wrong token'],
    [`${alpha.token}x`, 'wrong token'],
  ] as const) {
    const r = await raw(alpha, 'GET', '/api/v1/status', { token });
    assert.equal(r.status, 401, r.text);
    assert.ok(isErrorBody(r.json), r.text);
    assert.match(r.json.error, new RegExp(why));
    assert.match(r.json.hint, /Authorization: Bearer/);
  }
  const index = await raw(alpha, 'GET', '/api/v1');
  assert.equal(index.status, 200, index.text);
  assert.ok(indexSchema.safeParse(index.json).success, index.text.slice(0, 300));
  const listed = (index.json as { routes: { method: string; url: string }[] }).routes.map((r) => `${r.method} ${r.url}`);
  for (const r of ROUTES) assert.ok(listed.includes(`${r.method} ${r.url}`), `${r.method} ${r.url} in the index`);
  // /metrics is open by default (api.metricsToken), as Prometheus scrapes usually are.
  assert.equal((await raw(alpha, 'GET', '/metrics', { token: null })).status, 200);

  // ---- the token cannot be dodged by spelling the path another way (the router decodes it).
  for (const [method, p] of [
    ['GET', '/%61pi/v1/status'],
    ['POST', '/%61pi/v1/resources/a/primary'],
    ['GET', '/api/v1/%72esources'],
    ['GET', '/API/v1/status'],
  ] as const) {
    const r = await raw(alpha, method, p, { token: null, ...(method === 'POST' ? { body: '{"force":true}' } : {}) });
    assert.ok(r.status === 401 || r.status === 404, `${method} ${p} without a token: ${r.status} ${r.text}`);
  }
  // ---- the routes one node asks of the other take the peers' token only, not the token people and dashboards hold.
  const peerOnly = await raw(alpha, 'GET', '/api/v1/node/vms');
  assert.equal(peerOnly.status, 403, peerOnly.text);
  assert.ok(isErrorBody(peerOnly.json));
  assert.equal((await raw(alpha, 'GET', '/api/v1/node/vms', { token: peerToken(c.file) })).status, 200);
  // Query numbers are numbers: an empty or hex one is refused.
  for (const q of ['since=', 'since=0x10', 'tail=1.5']) assert.equal((await raw(alpha, 'GET', `/api/v1/events?${q}`)).status, 400, q);
  // Names up to the pool's limit (127 characters) work in URLs too.
  const longName = 'v'.repeat(120);
  assert.equal((await raw(alpha, 'POST', '/api/v1/pools/pa/volumes', { body: JSON.stringify({ name: longName, sizeBytes: 1048576 }) })).status, 200);
  const removed = await raw(alpha, 'DELETE', `/api/v1/pools/pa/volumes/${longName}`);
  assert.equal(removed.status, 200, removed.text);

  // ---- unknown routes and objects: 404 with a body.
  const nowhere = await raw(alpha, 'GET', '/api/v1/nowhere');
  assert.equal(nowhere.status, 404);
  assert.ok(isErrorBody(nowhere.json));
  const unknown = await raw(alpha, 'GET', '/api/v1/resources/zz');
  assert.equal(unknown.status, 404, unknown.text);
  assert.ok(isErrorBody(unknown.json));
  assert.match(unknown.json.error, /no resource zz on node alpha/);
  assert.equal(unknown.json.exitCode, 2);
  // A refusal by state: 409 and the CLI's exit code 1.
  const refused = await raw(bravo, 'POST', '/api/v1/resources/a/primary', { body: '{}' });
  assert.equal(refused.status, 409, refused.text);
  assert.ok(isErrorBody(refused.json));
  assert.equal(refused.json.exitCode, 1);
  // Malformed JSON and a wrong content type: 400 with a body, and the daemon goes on.
  const malformed = await raw(alpha, 'POST', '/api/v1/pools/pa/volumes', { body: '{"name": ' });
  assert.equal(malformed.status, 400);
  assert.ok(isErrorBody(malformed.json), malformed.text);
  const wrongType = await raw(alpha, 'POST', '/api/v1/pools/pa/volumes', { body: 'name=v9', contentType: 'application/x-www-form-urlencoded' });
  assert.ok(wrongType.status === 415 || wrongType.status === 400, wrongType.text);
  assert.ok(isErrorBody(wrongType.json), wrongType.text);

  // ---- every route: a good request, then a bad one.
  const table = cases(Date.now());
  for (const r of ROUTES) assert.ok(table[`${r.method} ${r.url}`], `a test case for ${r.method} ${r.url}`);
  for (const r of ROUTES) {
    const key = `${r.method} ${r.url}`;
    const k = table[key];
    const target = k.node === 'bravo' ? bravo : alpha;
    const body = (v: unknown): { body?: string | Buffer; contentType?: string } =>
      v === undefined ? {} : Buffer.isBuffer(v) ? { body: v, contentType: 'application/octet-stream' } : { body: JSON.stringify(v) };
    const token = r.url.startsWith('/api/v1/node/') ? peerToken(c.file) : undefined;
    const good = await raw(target, r.method, k.good.path, { ...body(k.good.body), token });
    assert.ok(k.good.status.includes(good.status), `${key}: good request got ${good.status}: ${good.text.slice(0, 300)}`);
    if (good.status < 300 && r.response) {
      const shape = r.response.safeParse(good.json);
      assert.ok(shape.success, `${key}: the answer does not have its documented shape: ${shape.success ? '' : JSON.stringify(shape.error.issues[0])}\n${good.text.slice(0, 500)}`);
    }
    if (good.status >= 400) {
      assert.ok(errorSchema.safeParse(good.json).success, `${key}: ${good.text}`);
      assert.ok(isErrorBody(good.json), `${key}: ${good.text}`);
      // 409 is the CLI's exit 1 (a refusal because of state), the rest exit 2.
      assert.equal(good.status === 409, good.json.exitCode === 1, `${key}: ${good.text}`);
      assert.ok(!/internal error/.test(good.json.error), `${key}: ${good.json.error}`);
    }
    const bad = await raw(target, r.method, k.bad.path, { ...body(k.bad.body), token });
    assert.equal(bad.status, 400, `${key}: bad request got ${bad.status}: ${bad.text.slice(0, 300)}`);
    assert.ok(isErrorBody(bad.json), `${key}: ${bad.text}`);
    assert.match(bad.json.error, /^bad request: /, key);
    if (k.resettle) await waitStatus(c, 'alpha', 'connected and in sync again', inSync);
  }
  // Both daemons still serve.
  assert.equal((await raw(alpha, 'GET', '/api/v1/status')).status, 200);
  assert.equal((await raw(bravo, 'GET', '/api/v1/status')).status, 200);
});

test('api: the CLI and the API agree; a volume stream goes out and back in over HTTP; the event stream delivers new events', { timeout: 180_000 }, async (t) => {
  const c = await makeCluster(t, { diskBytes: 64 * MiB });
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'alpha Primary and in sync', (s) => s.role === 'Primary' && inSync(s));
  const alpha: ApiTarget = targetOf(c.file, 'alpha');

  // duet token and duet cert: what a browser or curl needs, from the cluster file alone.
  // (No --node: they are about the cluster, as the README and the demo show them.)
  const token = await run(process.execPath, [DUET, '--config', c.file, 'token'], { cwd: ROOT });
  assert.equal(token.stdout.trim(), alpha.token, token.describe());
  const cert = await run(process.execPath, [DUET, '--config', c.file, 'cert'], { cwd: ROOT });
  assert.equal(cert.code, 0, cert.describe());
  assert.ok(new X509Certificate(cert.stdout).publicKey.equals(new X509Certificate(alpha.ca!).publicKey));
  assert.ok(new X509Certificate(cert.stdout).ca);

  // CLI and API: the same resource, the same volumes.
  const cli = await c.duet('alpha', ['resource', 'status', 'a', '--json']);
  assert.equal(cli.code, 0, cli.describe());
  const api = (await callApi(alpha, { cmd: 'resource.status', resource: 'a' })) as { resources: { name: string; role: string; disk: string; generation: unknown }[] };
  const fromCli = (JSON.parse(cli.stdout) as typeof api).resources[0];
  assert.deepEqual({ name: api.resources[0].name, role: api.resources[0].role, disk: api.resources[0].disk, generation: api.resources[0].generation }, { name: fromCli.name, role: fromCli.role, disk: fromCli.disk, generation: fromCli.generation });
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v1', '--size', '8M'])).code, 0);
  assert.equal((await c.duet('alpha', ['vol', 'snapshot', 'pa/v1', 'pa/s1'])).code, 0);
  const vols = (await callApi(alpha, { cmd: 'vol.list', pool: 'pa' })) as { name: string }[];
  const cliVols = JSON.parse((await c.duet('alpha', ['vol', 'list', 'pa', '--json'])).stdout) as { name: string }[];
  assert.deepEqual(vols.map((v) => v.name).sort(), cliVols.map((v) => v.name).sort());

  // Send over the API, receive over the API: the stream round-trips, and its result comes as the trailer.
  const chunks: Buffer[] = [];
  const out = new PassThrough();
  out.on('data', (b: Buffer) => chunks.push(b));
  const sent = (await callApi(alpha, { cmd: 'vol.send', pool: 'pa', name: 's1' }, { output: out })) as { records: number };
  assert.ok(typeof sent.records === 'number', JSON.stringify(sent));
  const stream = Buffer.concat(chunks);
  assert.ok(stream.length > 0);
  const input = new PassThrough();
  input.end(stream);
  const got = (await callApi(alpha, { cmd: 'vol.receive', pool: 'pa', name: 'r1' }, { input })) as { volume: string; records: number };
  assert.equal(got.records, sent.records);
  // A cut stream is refused, and the pool goes on.
  const cutInput = new PassThrough();
  cutInput.end(stream.subarray(0, Math.floor(stream.length / 2)));
  await assert.rejects(callApi(alpha, { cmd: 'vol.receive', pool: 'pa', name: 'r2' }, { input: cutInput }), /stream|truncated|incomplete|end/i);
  const after = (await callApi(alpha, { cmd: 'vol.list', pool: 'pa' })) as { name: string }[];
  assert.ok(after.some((v) => v.name === 'r1'));
  assert.ok(!after.some((v) => v.name === 'r2'));

  // The CLI's send and receive over the API agree with the direct stream.
  const cliSend = await c.duet('alpha', ['vol', 'send', 'pa/s1']);
  assert.equal(cliSend.code, 0, cliSend.describe());

  // events --follow (server-sent events): a disconnect of bravo's link shows up.
  const follow = c.duet('alpha', ['events', '--follow', '--json'], { timeoutMs: 8000 });
  await new Promise((resolve) => setTimeout(resolve, 1500));
  assert.equal((await c.duet('bravo', ['resource', 'disconnect', 'a'])).code, 0);
  const r = await follow;
  const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { event: string; seq: number });
  const seqs = lines.map((l) => l.seq);
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), 'in order');
  assert.equal(new Set(seqs).size, seqs.length, 'each once');
  assert.ok(lines.some((l) => l.event === 'disconnected'), r.stdout.slice(-2000));
});
