/**
 * The witness cannot be fooled: a real Witness on a loopback port, real
 * WitnessClient calls (signed, over TCP). Marks clear only for the
 * generation they wait for; a caller that gave up cannot have its request
 * act later; the state file is never followed through a link, never read as
 * empty when it is damaged; malformed commands are refused one line each.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { MAX_RESOURCES, Witness, WitnessClient, isOutdatedRefusal } from '../../src/cluster/witness.js';
import { signRequest } from '../../src/cluster/witness-auth.js';
import { callAdmin } from '../../src/api/line-socket.js';

const HOST = '127.0.0.1';
const SECRET = Buffer.from('0123456789abcdef0123456789abcdef');
const NODES = ['alpha', 'bravo'];
/** Generations (16 hex digits, as newGi makes them). */
const G0 = '00000000000000a0';
const G1 = '00000000000000b1';
const G2 = '00000000000000c2';

interface LogEvent {
  event?: string;
  level: number;
  msg?: string;
  [k: string]: unknown;
}

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, HOST, r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

function tempDir(t: { after: (fn: () => void) => void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-witness-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

interface Running {
  witness: Witness;
  port: number;
  file: string;
  logs: LogEvent[];
  client: (node: string, timeoutMs?: number) => WitnessClient;
  /** Resolves with the first log event that matches, or rejects after `ms`. */
  waitLog: (match: (e: LogEvent) => boolean, ms: number, what: string) => Promise<LogEvent>;
}

async function startWitness(t: { after: (fn: () => Promise<void> | void) => void }, dir: string): Promise<Running> {
  const logs: LogEvent[] = [];
  const waiters: Array<() => void> = [];
  const log = pino({ level: 'debug' }, {
    write: (s: string) => {
      logs.push(JSON.parse(s) as LogEvent);
      for (const w of waiters.splice(0)) w();
    },
  });
  const file = path.join(dir, 'witness.json');
  const witness = new Witness(file, NODES, log);
  const port = await freePort();
  await witness.listen(HOST, port, SECRET);
  // Bounded: a connection the witness never closes would hold its close forever.
  t.after(() => within(witness.close(), 5000, 'the witness did not close: a connection is still open'));
  const waitLog = async (match: (e: LogEvent) => boolean, ms: number, what: string): Promise<LogEvent> => {
    const deadline = Date.now() + ms;
    for (;;) {
      const found = logs.find(match);
      if (found) return found;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no log event ${what} within ${ms} ms; got ${logs.map((e) => e.event).join(', ')}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  };
  return { witness, port, file, logs, client: (node, timeoutMs = 2000) => new WitnessClient(HOST, port, SECRET, node, undefined, timeoutMs), waitLog };
}

/** A signed request sent as is (the witness must judge what it gets, typed or not). */
function raw(w: Running, request: Record<string, unknown>): Promise<unknown> {
  return callAdmin({ host: HOST, port: w.port }, signRequest(SECRET, request as { cmd: string }), { what: 'the witness' });
}

async function isOutdated(w: Running, node: string, resource: string, current = G0): Promise<boolean> {
  return (await w.client(node).call({ cmd: 'witness.query', resource, current })).outdated;
}

/* ------------------------------------------------ marks and their claims */

test('a mark is cleared only by a claim naming the generation it waits for', async (t) => {
  const w = await startWitness(t, tempDir(t));
  const alpha = w.client('alpha');
  const bravo = w.client('bravo');
  // alpha goes on without bravo: bravo is outdated until it holds G1.
  await alpha.call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  assert.equal(await isOutdated(w, 'bravo', 'r'), true);

  // "In sync with bravo" with no generation (what nodes sent before): not a claim the mark waits for.
  await raw(w, { cmd: 'witness.heartbeat', node: 'alpha', inSync: { r: 'bravo' }, generations: { r: G1 } }).catch(() => undefined);
  assert.equal(await isOutdated(w, 'bravo', 'r'), true, 'a heartbeat without a generation cleared the mark');

  // In sync at another generation (stale or buggy state): ignored, and said so in the log.
  await alpha.call({ cmd: 'witness.heartbeat', inSync: { r: { peer: 'bravo', generation: G0 } }, generations: { r: G1 } });
  assert.equal(await isOutdated(w, 'bravo', 'r'), true, 'an in-sync claim at an old generation cleared the mark');
  await w.waitLog((e) => e.event === 'witness-claim-ignored' && e.node === 'bravo' && e.claimed === G0, 2000, 'witness-claim-ignored');

  // bravo reports a generation other than G1: still outdated.
  await bravo.call({ cmd: 'witness.heartbeat', inSync: {}, generations: { r: G2 } });
  assert.equal(await isOutdated(w, 'bravo', 'r', G2), true, 'bravo holds G2, not G1');

  // alpha in sync with bravo at G1: the mark ends.
  await alpha.call({ cmd: 'witness.heartbeat', inSync: { r: { peer: 'bravo', generation: G1 } }, generations: { r: G1 } });
  assert.equal(await isOutdated(w, 'bravo', 'r', G2), false);
  await w.waitLog((e) => e.event === 'witness-cleared' && e.node === 'bravo' && e.resource === 'r', 2000, 'witness-cleared');
});

test('a marked node clears its mark by reporting the generation it waits for, and not otherwise', async (t) => {
  const w = await startWitness(t, tempDir(t));
  await w.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  const bravo = w.client('bravo');
  assert.equal((await bravo.call({ cmd: 'witness.query', resource: 'r', current: G2 })).outdated, true);
  assert.equal((await bravo.call({ cmd: 'witness.heartbeat', inSync: {}, generations: { r: G0 } })).outdatedResources.includes('r'), true);
  assert.equal((await bravo.call({ cmd: 'witness.heartbeat', inSync: {}, generations: { r: G1 } })).outdatedResources.includes('r'), false);
  assert.equal((await bravo.call({ cmd: 'witness.query', resource: 'r', current: G0 })).outdated, false);
});

test('a heartbeat signed before the fence and delivered after it does not clear the mark', async (t) => {
  const w = await startWitness(t, tempDir(t));
  // alpha and bravo in sync at G0: the heartbeat is written, then held up on the way.
  const late = signRequest(SECRET, { cmd: 'witness.heartbeat', node: 'alpha', inSync: { r: { peer: 'bravo', generation: G0 } }, generations: { r: G0 } });
  await w.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  await callAdmin({ host: HOST, port: w.port }, late, { what: 'the witness' });
  assert.equal(await isOutdated(w, 'bravo', 'r'), true);
});

test('an outdated node cannot outdate its peer', async (t) => {
  const w = await startWitness(t, tempDir(t));
  await w.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  await assert.rejects(w.client('bravo').call({ cmd: 'witness.outdate', resource: 'r', peer: 'alpha', current: G0, until: G2 }), /bravo is itself outdated/);
  assert.equal(await isOutdated(w, 'alpha', 'r'), false);
  assert.equal(await isOutdated(w, 'bravo', 'r'), true);
});

test('a promotion by force ends the mark of the node promoted (the operator took its data as the good copy)', async (t) => {
  const w = await startWitness(t, tempDir(t));
  await w.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  await w.client('bravo').call({ cmd: 'witness.query', resource: 'r', current: G0, force: true });
  assert.equal(await isOutdated(w, 'bravo', 'r'), false);
  await w.waitLog((e) => e.event === 'witness-forced' && e.node === 'bravo', 2000, 'witness-forced');
  // Now bravo may fence alpha.
  await w.client('bravo').call({ cmd: 'witness.outdate', resource: 'r', peer: 'alpha', current: G0, until: G2 });
  assert.equal(await isOutdated(w, 'alpha', 'r'), true);
});

/* ----------------------------------------- a caller that gave up is gone */

interface Held {
  bytes: Buffer[];
  /** Resolves when the caller closed its side (FIN or RST). */
  gone: Promise<void>;
}

/** A proxy in front of the witness that keeps what callers send (a witness slow to read). */
async function holdingProxy(t: { after: (fn: () => Promise<void>) => void }): Promise<{ port: number; next: () => Promise<Held> }> {
  const conns: Held[] = [];
  const waiting: Array<(h: Held) => void> = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    const held: Held = {
      bytes: [],
      gone: new Promise<void>((resolve) => {
        socket.once('end', resolve);
        socket.once('close', () => resolve());
      }),
    };
    socket.on('error', () => undefined);
    socket.on('data', (b: Buffer) => held.bytes.push(b));
    const w = waiting.shift();
    if (w) w(held);
    else conns.push(held);
  });
  await new Promise<void>((r) => server.listen(0, HOST, r));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    next: () => {
      const h = conns.shift();
      return h ? Promise.resolve(h) : new Promise<Held>((resolve) => waiting.push(resolve));
    },
  };
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(what)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Hand bytes to the witness as the network would: the request, then the caller's hang-up. */
async function deliver(w: Running, bytes: Buffer, hangUp: 'fin' | 'rst'): Promise<net.Socket> {
  const s = net.createConnection({ host: HOST, port: w.port });
  s.on('error', () => undefined);
  await new Promise<void>((resolve) => s.once('connect', resolve));
  s.write(bytes);
  if (hangUp === 'fin') s.end();
  else s.resetAndDestroy();
  return s;
}

for (const hangUp of ['fin', 'rst'] as const) {
  test(`a timed-out witness call hangs up, and the witness never acts on it later (hang-up by ${hangUp.toUpperCase()})`, async (t) => {
    const w = await startWitness(t, tempDir(t));
    const proxy = await holdingProxy(t);
    const alpha = new WitnessClient(HOST, proxy.port, SECRET, 'alpha', undefined, 300);
    await assert.rejects(alpha.call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 }), /did not answer within 300 ms/);
    const held = await proxy.next();
    const request = Buffer.concat(held.bytes);
    assert.ok(request.includes(0x0a), 'the whole request reached the proxy before the timeout');
    await within(held.gone, 5000, 'the timed-out call left its connection open: the request could still be delivered');
    // The request reaches the witness only now, after the caller gave up.
    await deliver(w, request, hangUp);
    const seen = await w.waitLog((e) => e.event === 'admin-abandoned' || e.event === 'witness-outdated', 5000, 'about the late request');
    assert.equal(seen.event, 'admin-abandoned', 'the witness acted on a request whose caller had given up');
    assert.equal(await isOutdated(w, 'bravo', 'r'), false);
  });

  test(`a request whose caller hung up (${hangUp.toUpperCase()}) before the witness read it is not acted on`, async (t) => {
    const w = await startWitness(t, tempDir(t));
    const request = Buffer.from(`${JSON.stringify(signRequest(SECRET, { cmd: 'witness.outdate', node: 'alpha', resource: 'r', peer: 'bravo', current: G0, until: G1 }))}\n`);
    await deliver(w, request, hangUp);
    const seen = await w.waitLog((e) => e.event === 'admin-abandoned' || e.event === 'witness-outdated', 5000, 'about the request');
    assert.equal(seen.event, 'admin-abandoned', 'the witness acted on a request whose caller had hung up');
    assert.equal(await isOutdated(w, 'bravo', 'r'), false);
  });
}

test('a request cut off half-way: the witness closes the connection and acts on nothing', async (t) => {
  const w = await startWitness(t, tempDir(t));
  const request = Buffer.from(`${JSON.stringify(signRequest(SECRET, { cmd: 'witness.outdate', node: 'alpha', resource: 'r', peer: 'bravo', current: G0, until: G1 }))}\n`);
  const s = net.createConnection({ host: HOST, port: w.port, allowHalfOpen: true });
  s.on('error', () => undefined);
  await new Promise<void>((resolve) => s.once('connect', resolve));
  const closedByWitness = new Promise<void>((resolve) => s.once('end', resolve));
  s.write(request.subarray(0, request.length >> 1));
  s.end();
  await within(closedByWitness, 5000, 'the witness kept a half-received request open');
  s.destroy();
  assert.equal(await isOutdated(w, 'bravo', 'r'), false);
});

/* ------------------------------------------------------- the state file */

test('marks survive a restart of the witness', async (t) => {
  const dir = tempDir(t);
  const w = await startWitness(t, dir);
  await w.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  await w.witness.close();
  assert.ok(!fs.existsSync(`${w.file}.tmp`), 'the temp file was renamed into place');
  const again = await startWitness(t, dir);
  assert.equal(await isOutdated(again, 'bravo', 'r'), true);
});

test('a damaged or wrong-shaped state file stops the witness at startup, naming the file (never an empty state)', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'witness.json');
  const good = await startWitness(t, dir);
  await good.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  await good.witness.close();
  const text = fs.readFileSync(file, 'utf8');
  const cases: Array<[string, string]> = [
    ['truncated', text.slice(0, text.length >> 1)],
    ['not JSON', 'hello'],
    ['an array', '[]'],
    ['outdated is a list', '{"outdated": []}'],
    ['a mark without its generation', text.replace(`"until": "${G1}"`, '"until": 7')],
    ['a flipped generation digit', text.replace(G1, G2)],
    ['empty', ''],
    ['an empty object', '{}'],
  ];
  for (const [what, content] of cases) {
    fs.writeFileSync(file, content);
    assert.throws(
      () => new Witness(file, NODES, pino({ level: 'silent' })),
      (err: Error) => err.name === 'UserError' && err.message.includes(file) && !err.message.includes('\n') && /restore|remove|delete/.test(err.message),
      `${what}: not refused with a one-line error naming ${file}`,
    );
  }
  // Missing: the first start, an empty state.
  fs.rmSync(file);
  const fresh = await startWitness(t, dir);
  assert.equal(await isOutdated(fresh, 'bravo', 'r'), false);
});

test('a state file from before format 1 (the marks alone) is read, and rewritten as format 1 on the next change', async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, 'witness.json'), JSON.stringify({ outdated: { r: { bravo: { by: 'alpha', at: '2025-01-01T00:00:00.000Z', until: G1 } } } }));
  const w = await startWitness(t, dir);
  assert.equal(await isOutdated(w, 'bravo', 'r'), true);
  await w.client('alpha').call({ cmd: 'witness.outdate', resource: 's', peer: 'bravo', current: G0, until: G2 });
  const saved = JSON.parse(fs.readFileSync(w.file, 'utf8')) as { format: string; version: number; sequence: number; outdated: Record<string, unknown> };
  assert.equal(saved.format, 'duet-witness-state');
  assert.equal(saved.version, 1);
  assert.equal(saved.sequence, 1);
  assert.deepEqual(Object.keys(saved.outdated), ['r', 's']);
});

test(`the witness keeps marks for at most ${MAX_RESOURCES} resources: a fence for one more is refused, one for a known resource is not`, async (t) => {
  const dir = tempDir(t);
  const outdated: Record<string, unknown> = {};
  for (let i = 0; i < MAX_RESOURCES; i++) outdated[`r${i}`] = { bravo: { by: 'alpha', at: '2025-01-01T00:00:00.000Z', until: G1 } };
  fs.writeFileSync(path.join(dir, 'witness.json'), JSON.stringify({ outdated }));
  const w = await startWitness(t, dir);
  const alpha = w.client('alpha');
  await assert.rejects(alpha.call({ cmd: 'witness.outdate', resource: 'one-more', peer: 'bravo', current: G0, until: G1 }), (err: Error) => err.message.includes(`${MAX_RESOURCES} resources`) && !err.message.includes('\n'));
  assert.equal(await isOutdated(w, 'bravo', 'one-more'), false);
  await alpha.call({ cmd: 'witness.outdate', resource: 'r0', peer: 'bravo', current: G0, until: G2 });
  // A resource whose last mark ends frees its place.
  await w.client('bravo').call({ cmd: 'witness.heartbeat', inSync: {}, generations: { r1: G1 } });
  await alpha.call({ cmd: 'witness.outdate', resource: 'one-more', peer: 'bravo', current: G0, until: G1 });
  assert.equal(await isOutdated(w, 'bravo', 'one-more'), true);
});

test('a symbolic link at the state path is refused, not followed', async (t) => {
  const dir = tempDir(t);
  const elsewhere = path.join(dir, 'elsewhere.json');
  const good = await startWitness(t, dir);
  await good.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  await good.witness.close();
  fs.renameSync(good.file, elsewhere);
  fs.symlinkSync(elsewhere, good.file);
  assert.throws(() => new Witness(good.file, NODES, pino({ level: 'silent' })), (err: Error) => err.name === 'UserError' && err.message.includes(good.file) && /link/.test(err.message) && !err.message.includes('\n'));
});

test('a symbolic link planted at the temp path is refused, and the file it points to is left alone', async (t) => {
  const dir = tempDir(t);
  const w = await startWitness(t, dir);
  const victim = path.join(dir, 'victim');
  fs.writeFileSync(victim, 'precious\n');
  fs.symlinkSync(victim, `${w.file}.tmp`);
  await assert.rejects(w.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 }), (err: Error) => /link/.test(err.message) && err.message.includes(`${w.file}.tmp`) && !err.message.includes('\n'));
  assert.equal(fs.readFileSync(victim, 'utf8'), 'precious\n');
  // The refused mark is not in force: the caller knows it failed and so does the witness.
  assert.equal(await isOutdated(w, 'bravo', 'r'), false);
  // A restart refuses the link too, before any command.
  await w.witness.close();
  assert.throws(() => new Witness(w.file, NODES, pino({ level: 'silent' })), (err: Error) => err.name === 'UserError' && /link/.test(err.message));
});

/* ------------------------------------------------------------- commands */

test('malformed commands get a one-line error and the witness keeps serving', async (t) => {
  const w = await startWitness(t, tempDir(t));
  const bad: Array<[string, Record<string, unknown>, RegExp]> = [
    ['unknown node', { cmd: 'witness.query', node: 'charlie', resource: 'r', current: G0 }, /charlie/],
    ['unknown peer', { cmd: 'witness.outdate', node: 'alpha', resource: 'r', peer: 'charlie', current: G0, until: G1 }, /charlie/],
    ['itself as peer', { cmd: 'witness.outdate', node: 'alpha', resource: 'r', peer: 'alpha', current: G0, until: G1 }, /alpha/],
    ['until is a number', { cmd: 'witness.outdate', node: 'alpha', resource: 'r', peer: 'bravo', current: G0, until: 5 }, /until/],
    ['no resource', { cmd: 'witness.outdate', node: 'alpha', peer: 'bravo', current: G0, until: G1 }, /resource/],
    ['resource __proto__', { cmd: 'witness.outdate', node: 'alpha', resource: '__proto__', peer: 'bravo', current: G0, until: G1 }, /resource/],
    ['inSync a string', { cmd: 'witness.heartbeat', node: 'alpha', inSync: 'bravo', generations: {} }, /inSync/],
    ['generation not hex', { cmd: 'witness.heartbeat', node: 'alpha', inSync: {}, generations: { r: 'zz' } }, /generations/],
    ['unknown command', { cmd: 'witness.forget', node: 'alpha' }, /witness\.forget/],
  ];
  for (const [what, request, names] of bad) {
    await assert.rejects(raw(w, request), (err: Error) => err.name === 'UserError' && names.test(err.message) && !err.message.includes('\n'), what);
  }
  assert.equal(({} as Record<string, unknown>).bravo, undefined, 'Object.prototype was polluted');
  // Nothing of the above took effect, and the witness still answers.
  assert.equal(await isOutdated(w, 'bravo', 'r'), false);
  assert.equal(await isOutdated(w, 'alpha', 'r'), false);
  await w.client('alpha').call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  assert.equal(await isOutdated(w, 'bravo', 'r'), true);
});

test('a fence that was not needed after all is cancelled by its setter naming the generation it never started, and by nothing else', async (t) => {
  const w = await startWitness(t, tempDir(t));
  const alpha = w.client('alpha');
  const bravo = w.client('bravo');
  await alpha.call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  // Another generation, or another node naming it: the mark stays.
  await alpha.call({ cmd: 'witness.cancel', resource: 'r', peer: 'bravo', until: G2 });
  assert.equal(await isOutdated(w, 'bravo', 'r'), true, 'a cancel for another generation cleared the mark');
  await bravo.call({ cmd: 'witness.cancel', resource: 'r', peer: 'alpha', until: G1 }).catch(() => undefined);
  assert.equal(await isOutdated(w, 'bravo', 'r'), true);
  // An in-sync claim at the generation alpha left is still no claim the mark waits for (it may be stale).
  await alpha.call({ cmd: 'witness.heartbeat', inSync: { r: { peer: 'bravo', generation: G0 } }, generations: { r: G0 } });
  assert.equal(await isOutdated(w, 'bravo', 'r'), true);
  // alpha never started G1 (bravo came back in sync before it did): its cancel ends the mark.
  await alpha.call({ cmd: 'witness.cancel', resource: 'r', peer: 'bravo', until: G1 });
  assert.equal(await isOutdated(w, 'bravo', 'r'), false);
  await w.waitLog((e) => e.event === 'witness-cleared' && e.node === 'bravo' && e.resource === 'r', 2000, 'witness-cleared');
});

test('a fence for a newer generation that is then cancelled leaves the older mark in force (sim seed 1061: a refused promotion cancelled the mark its earlier generation still needed)', async (t) => {
  const w = await startWitness(t, tempDir(t));
  const alpha = w.client('alpha');
  // alpha went on alone at G1: bravo outdated until it holds G1.
  await alpha.call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  // alpha is promoted again and fences for G2 (still without bravo); that promotion is refused: G2 never starts.
  await alpha.call({ cmd: 'witness.outdate', resource: 'r', peer: 'bravo', current: G1, until: G2 });
  await alpha.call({ cmd: 'witness.cancel', resource: 'r', peer: 'bravo', until: G2 });
  assert.equal(await isOutdated(w, 'bravo', 'r'), true, 'bravo still lacks G1: it may not be promoted');
  // Only holding G1 clears it.
  await w.client('bravo').call({ cmd: 'witness.heartbeat', inSync: {}, generations: { r: G1 } });
  assert.equal(await isOutdated(w, 'bravo', 'r'), false);
});

/** A Witness called in-process on a fake clock (silences are measured on it); removed at the test's end. */
function clockedWitness(t: { after(fn: () => void): void }): { call: (c: Record<string, unknown>) => { reply?: ReturnType<Witness['handle']>; err?: Error & { exitCode?: number } }; clock: { now: number } } {
  const clock = { now: 1_000_000 };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-witness-clocked-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const w = new Witness(path.join(dir, 'witness.json'), NODES, pino({ level: 'silent' }), () => clock.now, 2000);
  const call = (c: Record<string, unknown>) => {
    try {
      return { reply: w.handle(c) };
    } catch (err) {
      return { err: err as Error & { exitCode?: number } };
    }
  };
  return { call, clock };
}

test('declarations: granted only for a node silent at the witness for deadTime, at most one of two, cleared by their setter', async (t) => {
  const { call, clock } = clockedWitness(t);
  assert.deepEqual(call({ cmd: 'witness.heartbeat', node: 'alpha', generations: {}, inSync: {} }).reply?.silentMs, { alpha: 0, bravo: 0 });
  clock.now += 1500;
  call({ cmd: 'witness.heartbeat', node: 'bravo', generations: {}, inSync: {} });
  clock.now += 1000;
  // alpha silent 2500 ms, bravo 1000 ms.
  const early = call({ cmd: 'witness.declare', node: 'alpha', peer: 'bravo' });
  assert.match(early.err?.message ?? '', /the witness heard bravo 1000 ms ago: it is not dead/);
  assert.equal(early.err?.exitCode, 1);
  clock.now += 100;
  // (alpha's request was itself a sign of life: alpha is not silent now.)
  assert.match(call({ cmd: 'witness.declare', node: 'bravo', peer: 'alpha' }).err?.message ?? '', /heard alpha 100 ms ago/);
  clock.now += 2000;
  const granted = call({ cmd: 'witness.declare', node: 'bravo', peer: 'alpha' });
  assert.deepEqual(granted.reply?.declared, { alpha: 'bravo' });
  // Declared: alpha may not declare bravo in turn, and every answer tells it it is held dead.
  clock.now += 5000;
  const back = call({ cmd: 'witness.declare', node: 'alpha', peer: 'bravo' });
  assert.match(back.err?.message ?? '', /node alpha is held dead by bravo/);
  assert.deepEqual(call({ cmd: 'witness.heartbeat', node: 'alpha', generations: {}, inSync: {} }).reply?.declared, { alpha: 'bravo' });
  // Asking again is harmless; only the setter clears it.
  assert.deepEqual(call({ cmd: 'witness.declare', node: 'bravo', peer: 'alpha' }).reply?.declared, { alpha: 'bravo' });
  call({ cmd: 'witness.clear', node: 'alpha', peer: 'alpha' });
  assert.deepEqual(call({ cmd: 'witness.clear', node: 'alpha', peer: 'bravo' }).reply?.declared, { alpha: 'bravo' });
  assert.deepEqual(call({ cmd: 'witness.clear', node: 'bravo', peer: 'alpha' }).reply?.declared, {});
  assert.match(call({ cmd: 'witness.declare', node: 'bravo', peer: 'bravo' }).err?.message ?? '', /peer bravo is not another node/);
});

test('a node held dead cannot outdate its peer (its held writes stay held): its peer is taking its work over; once cleared it can again', async (t) => {
  const { call, clock } = clockedWitness(t);
  call({ cmd: 'witness.heartbeat', node: 'bravo', generations: {}, inSync: {} });
  clock.now += 2500;
  assert.deepEqual(call({ cmd: 'witness.declare', node: 'bravo', peer: 'alpha' }).reply?.declared, { alpha: 'bravo' });
  // alpha reaches the witness again before bravo wrote: it may not go on without bravo, which is taking its
  // resources over (else bravo's first write would be refused and both would hold stale roles).
  const refused = call({ cmd: 'witness.outdate', node: 'alpha', resource: 'r', peer: 'bravo', current: G0, until: G1 });
  assert.match(refused.err?.message ?? '', /alpha is held dead by bravo: it may not go on without bravo/);
  assert.equal(isOutdatedRefusal(refused.err), false, 'not the final "outdated" refusal: the write stays held until the witness says which');
  assert.deepEqual(call({ cmd: 'witness.query', node: 'bravo', resource: 'r', current: G0 }).reply?.outdated, false);
  // bravo writes: alpha is outdated; alpha's next try is refused as outdated (its held writes fail).
  call({ cmd: 'witness.outdate', node: 'bravo', resource: 'r', peer: 'alpha', current: G0, until: G2 });
  assert.match(call({ cmd: 'witness.outdate', node: 'alpha', resource: 'r', peer: 'bravo', current: G0, until: G1 }).err?.message ?? '', /alpha is itself outdated/);
  // Cleared (bravo hears alpha again): alpha may fence again for another resource.
  call({ cmd: 'witness.clear', node: 'bravo', peer: 'alpha' });
  assert.ok(call({ cmd: 'witness.outdate', node: 'alpha', resource: 's', peer: 'bravo', current: G0, until: G1 }).reply);
});
