/**
 * The heartbeat on real UDP sockets over loopback addresses: two nodes hear
 * each other and learn, on their own clocks, when the other heard them; a
 * dead path shows in paths() while the other goes on; a restarted peer is
 * accepted once it echoes; forged, foreign, replayed and garbage datagrams
 * are refused without counting as a sign of life; a taken port is one line.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import dgram from 'node:dgram';
import { once } from 'node:events';
import { pino } from 'pino';
import { Heartbeat, MAX_BEAT_BYTES, sealBeat, type BeatBody, type BeatSummary } from '../../src/cluster/heartbeat.js';
import { UserError } from '../../src/util/errors.js';
import type { Logger } from '../../src/util/log.js';

const SECRET = Buffer.from('0123456789abcdef0123456789abcdef');
const clock = (): number => performance.now();
const ALPHA_SAYS: BeatSummary = { quorum: true, selfFenced: false, peerView: 'online', draining: false };
const BRAVO_SAYS: BeatSummary = { quorum: true, selfFenced: false, peerView: 'suspect', draining: true };

interface LogEvent { level: number; event?: string; reason?: string; from?: string }

function logger(logs: LogEvent[] = []): Logger {
  return pino({ level: 'debug' }, { write: (s: string) => void logs.push(JSON.parse(s) as LogEvent) });
}

async function rawSocket(t: TestContext, address: string, port: number): Promise<dgram.Socket> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject);
    s.bind({ address, port, exclusive: true }, resolve);
  });
  t.after(() => new Promise<void>((r) => s.close(() => r())).catch(() => undefined));
  return s;
}

/** A port free for UDP on every address (the probe binds the wildcard). */
async function freeUdpPort(t: TestContext): Promise<number> {
  const probe = await rawSocket(t, '0.0.0.0', 0);
  const port = probe.address().port;
  await new Promise<void>((r) => probe.close(() => r()));
  return port;
}

async function start(t: TestContext, node: 'alpha' | 'bravo', local: string[], remote: string[], port: number, logs?: LogEvent[]): Promise<Heartbeat> {
  const hb = await Heartbeat.start({ cluster: 'home', node, peer: node === 'alpha' ? 'bravo' : 'alpha', secret: SECRET, local, remote, port, log: logger(logs), now: clock });
  t.after(() => hb.close());
  return hb;
}

async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = clock() + ms;
  while (!cond()) {
    if (clock() > deadline) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** The callers' timers: each node beats every 10 ms; `lastSendEnd` is the time just after its latest send. */
function beating(t: TestContext, nodes: { alpha: Heartbeat; bravo: Heartbeat }): { stop: () => void; lastSendEnd: { alpha: number; bravo: number } } {
  const lastSendEnd = { alpha: 0, bravo: 0 };
  const timer = setInterval(() => {
    nodes.alpha.send(ALPHA_SAYS);
    lastSendEnd.alpha = clock();
    nodes.bravo.send(BRAVO_SAYS);
    lastSendEnd.bravo = clock();
  }, 10);
  t.after(() => clearInterval(timer));
  return { stop: () => clearInterval(timer), lastSendEnd };
}

test('two nodes beat each other: each hears the other, learns when the other heard it, gets its summary', async (t) => {
  const port = await freeUdpPort(t);
  const alpha = await start(t, 'alpha', ['127.0.0.2'], ['127.0.0.3'], port);
  const bravo = await start(t, 'bravo', ['127.0.0.3'], ['127.0.0.2'], port);
  assert.equal(alpha.lastHeardMs, undefined);
  const { stop, lastSendEnd } = beating(t, { alpha, bravo });
  const mark = clock();
  await until(() => (alpha.heardByPeerMs ?? 0) > mark && (bravo.heardByPeerMs ?? 0) > mark, 'both heard by the other after the mark');
  stop();
  for (const [hb, self, says] of [[alpha, 'alpha', BRAVO_SAYS], [bravo, 'bravo', ALPHA_SAYS]] as const) {
    // An echo of one of its own sends: after the mark, not after its latest send.
    assert.ok(hb.heardByPeerMs! > mark && hb.heardByPeerMs! <= lastSendEnd[self], `${self}: heardByPeerMs ${hb.heardByPeerMs} in (${mark}, ${lastSendEnd[self]}]`);
    assert.ok(hb.lastHeardMs! > mark);
    assert.deepEqual(hb.peerSummary, says);
    assert.deepEqual(hb.paths(), [{ local: self === 'alpha' ? '127.0.0.2' : '127.0.0.3', remote: self === 'alpha' ? '127.0.0.3' : '127.0.0.2', lastHeardMs: hb.lastHeardMs }]);
  }
});

test('two paths: a path that goes silent stops advancing while the other goes on; the restarted peer is accepted', async (t) => {
  const port = await freeUdpPort(t);
  const alpha = await start(t, 'alpha', ['127.0.0.2', '127.0.0.4'], ['127.0.0.3', '127.0.0.5'], port);
  const nodes = { alpha, bravo: await start(t, 'bravo', ['127.0.0.3', '127.0.0.5'], ['127.0.0.2', '127.0.0.4'], port) };
  beating(t, nodes);
  await until(() => [alpha, nodes.bravo].every((hb) => hb.paths().every((p) => p.lastHeardMs !== undefined)), 'both paths heard both ways');
  await nodes.bravo.close();
  const before = alpha.paths()[0].lastHeardMs!;
  // bravo back on its main address only: 127.0.0.5 → 127.0.0.4 is gone.
  nodes.bravo = await start(t, 'bravo', ['127.0.0.3'], ['127.0.0.2'], port);
  await until(() => alpha.paths()[0].lastHeardMs! > before && nodes.bravo.lastHeardMs !== undefined, 'the restarted bravo heard and accepted');
  const cut = alpha.paths()[1].lastHeardMs;
  const main = alpha.paths()[0].lastHeardMs!;
  await until(() => alpha.paths()[0].lastHeardMs! > main && (alpha.heardByPeerMs ?? 0) > main, 'the main path goes on, echoes too');
  assert.equal(alpha.paths()[1].lastHeardMs, cut);
  assert.deepEqual(alpha.paths().map((p) => p.remote), ['127.0.0.3', '127.0.0.5']);
});

test('forged, foreign, replayed, garbage and oversized datagrams are refused: no sign of life, the receiver goes on', async (t) => {
  const port = await freeUdpPort(t);
  let alpha = await start(t, 'alpha', ['127.0.0.2'], ['127.0.0.3'], port);
  // Listen as bravo first, to capture a genuine beat of alpha's.
  const sniffer = await rawSocket(t, '127.0.0.3', port);
  const got = once(sniffer, 'message');
  alpha.send(ALPHA_SAYS);
  const [captured] = (await got) as [Buffer];
  await new Promise<void>((r) => sniffer.close(() => r()));
  const logs: LogEvent[] = [];
  const bravo = await start(t, 'bravo', ['127.0.0.3'], ['127.0.0.2'], port, logs);
  const nodes = { alpha, bravo };
  const { stop } = beating(t, nodes);
  await until(() => alpha.heardByPeerMs !== undefined && bravo.heardByPeerMs !== undefined, 'alpha and bravo heard each other');
  stop();
  const intruder = await rawSocket(t, '127.0.0.6', 0);
  const deliver = (buf: Buffer): void => intruder.send(buf, port, '127.0.0.3');
  // The captured beat was never delivered: genuine, it counts once; its second coming is a replay.
  const late = once(bravo, 'beat');
  deliver(captured);
  await late;
  const heard = bravo.lastHeardMs;
  const genuine = JSON.parse(captured.toString()) as BeatBody & { mac?: string };
  const forge = (changes: Partial<BeatBody>, secret = SECRET): Buffer => {
    const body: BeatBody & { mac?: string } = { ...genuine, seq: 1000, ...changes };
    delete body.mac;
    return sealBeat(secret, body);
  };
  const refusals: [string, Buffer][] = [
    ['replay', captured],
    ['bad-mac', forge({}, Buffer.from('another cluster secret, 32 bytes'))],
    ['bad-mac', Buffer.from(JSON.stringify({ ...genuine, seq: 1000 }))],
    ['wrong-cluster', forge({ cluster: 'other' })],
    ['stranger', forge({ from: 'charlie' })],
    ['wrong-node', forge({ to: 'charlie' })],
    ['unproven-boot', forge({ boot: 'ffffffffffffffff' })],
    ['garbage', Buffer.from([0xff, 0x00, 0x7b, 0x22])],
    ['malformed', Buffer.from('{"v":1,"cluster":"home"}')],
    ['oversized', Buffer.from(JSON.stringify({ ...genuine, pad: 'x'.repeat(MAX_BEAT_BYTES) }))],
  ];
  for (const [reason, buf] of refusals) {
    const before = bravo.refused()[reason] ?? 0;
    deliver(buf);
    await until(() => (bravo.refused()[reason] ?? 0) === before + 1, `refused as ${reason}`);
  }
  assert.equal(bravo.lastHeardMs, heard);
  assert.equal(bravo.paths()[0].lastHeardMs, heard);
  const logged = logs.filter((e) => e.event === 'heartbeat-refused' && e.level === 40);
  // Each kind warned about once (bad-mac came twice), naming where it came from; an unproven boot is how every first contact starts.
  assert.deepEqual(logged.map((e) => e.reason).sort(), [...new Set(refusals.map(([r]) => r))].filter((r) => r !== 'unproven-boot').sort());
  assert.ok(logged.every((e) => e.from === '127.0.0.6'));
  // Still working: alpha's next beat counts; a restarted alpha is accepted once it echoed bravo; its old process is refused.
  const next = once(bravo, 'beat');
  alpha.send(ALPHA_SAYS);
  await next;
  assert.ok(bravo.lastHeardMs! > heard!);
  // A signed beat echoing a time bravo never sent (a later clock, another process's) counts as life, not as an echo.
  const echoed = bravo.heardByPeerMs;
  const odd = once(bravo, 'beat');
  deliver(forge({ seq: 2000, echoMs: clock() + 60_000 }));
  await odd;
  assert.equal(bravo.heardByPeerMs, echoed);
  await alpha.close();
  nodes.alpha = alpha = await start(t, 'alpha', ['127.0.0.2'], ['127.0.0.3'], port);
  const restarted = clock();
  beating(t, nodes);
  await until(() => (bravo.lastHeardMs ?? 0) > restarted && alpha.heardByPeerMs !== undefined, 'the restarted alpha accepted by bravo');
  deliver(forge({ seq: 5000 }));
  await until(() => bravo.refused()['old-boot'] === 1, "alpha's earlier process refused");
});

test('a heartbeat port already taken is a one-line UserError naming address:port; nothing stays bound', async (t) => {
  const port = await freeUdpPort(t);
  await rawSocket(t, '127.0.0.2', port);
  await assert.rejects(
    Heartbeat.start({ cluster: 'home', node: 'alpha', peer: 'bravo', secret: SECRET, local: ['127.0.0.3', '127.0.0.2'], remote: ['127.0.0.4', '127.0.0.5'], port, log: logger() }),
    (err: unknown) => err instanceof UserError && err.message.includes(`127.0.0.2:${port} (EADDRINUSE)`) && !err.message.includes('\n'),
  );
  await rawSocket(t, '127.0.0.3', port); // the address bound before the failure was released
});
