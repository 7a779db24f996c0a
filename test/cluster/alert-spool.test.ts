/**
 * The alert spool where it could go wrong (found by a hostile review):
 * a stop right after an alert, an alert raised while the daemon stops, two
 * runs on one spool at once, a file whose header does not match its name,
 * numbers of files set aside. Each test uses a real node:http webhook and
 * a real spool directory.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { pino, type Logger } from 'pino';
import { Alerter, type Alert } from '../../src/cluster/alerts.js';

type After = { after: (fn: () => Promise<void> | void) => void };
interface LogEvent { event?: string; reason?: string }

const WAIT_MS = 20_000;
const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const ALERTS_JS = fileURLToPath(new URL('../../src/cluster/alerts.js', import.meta.url));

const numbered = (i: number): Alert => ({ event: `test-${i}`, node: 'bravo', cluster: 'home', time: '2024-05-01T12:00:00.000Z', summary: `alert ${i}` });

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function capture(): { log: Logger; events: () => LogEvent[] } {
  const lines: string[] = [];
  const log = pino({ level: 'debug' }, { write: (s: string) => void lines.push(s) });
  return { log, events: () => lines.map((l) => JSON.parse(l) as LogEvent) };
}

function tempDir(t: After): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-alert-spool-review-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function until(what: string, cond: () => boolean): Promise<void> {
  for (const deadline = Date.now() + WAIT_MS; !cond(); await sleep(20)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
  }
}

function spooled(dir: string, channel: string): string[] {
  try {
    return fs.readdirSync(path.join(dir, channel)).sort();
  } catch {
    return [];
  }
}

/** A webhook that answers 503 until `up`, then 200; `events` lists what it accepted (200), in order. */
async function startHook(t: After): Promise<{ url: string; setUp: (v: boolean) => void; accepted: () => string[] }> {
  let up = false;
  const accepted: string[] = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d: Buffer) => (body += d.toString()));
    req.on('end', () => {
      if (up) accepted.push((JSON.parse(body) as Alert).event);
      res.writeHead(up ? 200 : 503).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => (server.closeAllConnections(), server.close(() => resolve()))));
  return { url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/hook`, setUp: (v) => (up = v), accepted: () => [...accepted] };
}

/** The save promise of the alert a channel is delivering now (the spool does not expose it otherwise). */
function savedOfCurrent(a: Alerter): Promise<boolean> {
  const ch = (a as unknown as { channels: Array<{ current?: { spooled?: { saved: Promise<boolean> } } }> }).channels[0]!;
  const saved = ch.current?.spooled?.saved;
  assert.ok(saved, 'the alert is being delivered and spooled');
  return saved;
}

/** A fresh start on the spool with the webhook up: what it delivers, then the spool's files. */
async function nextStart(t: After, dir: string, hook: { url: string; setUp: (v: boolean) => void; accepted: () => string[] }): Promise<string[]> {
  hook.setUp(true);
  const before = hook.accepted().length;
  const { log } = capture();
  const b = new Alerter({ webhook: { url: hook.url } }, { log, from: 'bravo', retryDelaysMs: [100], timeoutMs: 3000, spoolDir: dir });
  b.start();
  t.after(() => b.close());
  await b.idle(WAIT_MS);
  await b.close();
  return hook.accepted().slice(before);
}

test('a daemon that stops right after raising an alert (close(), then exit, as `duet node run` does) finds it in the spool at the next start', async (t) => {
  const hook = await startHook(t);
  const dir = tempDir(t);
  // The daemon's shutdown: NodeDaemon.stop() awaits alerter.close() last, then `duet node run` exits.
  const script = `
    const { Alerter } = await import(${JSON.stringify(ALERTS_JS)});
    const { pino } = await import('pino');
    const a = new Alerter({ webhook: { url: ${JSON.stringify(hook.url)} } }, { log: pino({ level: 'silent' }), from: 'bravo', retryDelaysMs: [60000], timeoutMs: 3000, spoolDir: ${JSON.stringify(dir)} });
    a.start();
    a.send(${JSON.stringify(numbered(1))});
    await a.close();
    process.exit(0);
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  assert.equal(code, 0, stderr);
  assert.deepEqual(await nextStart(t, dir, hook), ['test-1'], `the alert "kept in the spool" by close() was not on disk; spool: ${spooled(dir, 'webhook').join(', ') || 'empty'}`);
});

test('an alert raised while the daemon stops (after the alerter closed, e.g. disk-detached while pools flush) is spooled, not dropped', async (t) => {
  const hook = await startHook(t);
  const dir = tempDir(t);
  const { log, events } = capture();
  const a = new Alerter({ webhook: { url: hook.url } }, { log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir });
  a.start();
  await a.close(); // NodeDaemon.stop(): cluster.stop() first, then the pools and resources close
  a.send(numbered(1));
  assert.deepEqual(events().filter((e) => e.event === 'alert-dropped').map((e) => e.reason), [], 'with a spool there is somewhere to keep it');
  assert.deepEqual(await nextStart(t, dir, hook), ['test-1']);
});

test('an Alerter opened on the spool while the closed one still saves (a restart in one process): both alerts survive, no number is used twice', async (t) => {
  const hook = await startHook(t);
  const dir = tempDir(t);
  const first = capture();
  const a = new Alerter({ webhook: { url: hook.url } }, { log: first.log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir });
  a.start();
  a.send(numbered(1));
  const savedA = savedOfCurrent(a);
  a.close();
  const second = capture();
  const b = new Alerter({ webhook: { url: hook.url } }, { log: second.log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir });
  b.start();
  b.send(numbered(2));
  const savedB = savedOfCurrent(b);
  const saves = await Promise.all([savedA, savedB]);
  await b.close();
  const files = spooled(dir, 'webhook');
  const failed = second.events().filter((e) => e.event === 'alert-spool-failed').length;
  // Each once (the order of two runs overlapping like this is not kept; a daemon's stop awaits close(), so its runs never overlap).
  assert.deepEqual((await nextStart(t, dir, hook)).sort(), ['test-1', 'test-2'], `saves ${JSON.stringify(saves)}, ${failed} alert-spool-failed, files: ${files.join(', ')}`);
  assert.equal(new Set(saves).size, 2, 'two files, two numbers');
});

test('a spooled file whose seq field does not match its name (its header damaged, or copied under another name) is set aside, not sent at every start', async (t) => {
  const hook = await startHook(t);
  const dir = tempDir(t);
  // A file whose header was damaged (the checksum covers only the alert text) or copied under another name.
  const text = JSON.stringify(numbered(1));
  const sub = path.join(dir, 'webhook');
  fs.mkdirSync(sub, { recursive: true, mode: 0o700 });
  const body = { format: 'duet-alert', version: 1, seq: 5, channel: 'webhook', sha256: createHash('sha256').update(text).digest('hex'), alert: text };
  fs.writeFileSync(path.join(sub, '000000000002.json'), JSON.stringify(body), { mode: 0o600 });
  const firstRun = await nextStart(t, dir, hook);
  const secondRun = await nextStart(t, dir, hook);
  assert.deepEqual([firstRun, secondRun], [[], []], `sent; spool now: ${spooled(dir, 'webhook').join(', ')}`);
  assert.deepEqual(spooled(dir, 'webhook'), ['000000000002.json.bad']);
});

test('a file set aside as .bad keeps its number: a later alert does not take it, and a second damaged file does not replace the first .bad', async (t) => {
  const hook = await startHook(t);
  const dir = tempDir(t);
  const sub = path.join(dir, 'webhook');
  const damage = (name: string): void => {
    const file = path.join(sub, name);
    fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace(/alert \d/, 'alert X'));
  };
  // Run 1: the webhook is down; alerts 1 and 2 wait on disk; file 2 gets damaged.
  const a = new Alerter({ webhook: { url: hook.url } }, { log: capture().log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir });
  a.start();
  a.send(numbered(1));
  a.send(numbered(2));
  await until('two alerts spooled', () => spooled(dir, 'webhook').filter((f) => f.endsWith('.json')).length === 2);
  await a.close();
  damage('000000000002.json');
  const firstBad = fs.readFileSync(path.join(sub, '000000000002.json'), 'utf8');

  // Run 2: 2 is set aside; the webhook is still down, alert 3 is raised and waits.
  const second = capture();
  const b = new Alerter({ webhook: { url: hook.url } }, { log: second.log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir });
  b.start();
  b.send(numbered(3));
  await until('alert 3 spooled', () => spooled(dir, 'webhook').filter((f) => f.endsWith('.json')).length === 2);
  await b.close();
  assert.ok(second.events().some((e) => e.event === 'alert-spool-bad'));
  const taken = spooled(dir, 'webhook').filter((f) => f.endsWith('.json') && spooled(dir, 'webhook').includes(`${f}.bad`));
  // Run 3: alert 3's file is damaged too; the evidence of the first damage must still be there.
  for (const f of spooled(dir, 'webhook').filter((n) => n.endsWith('.json') && n !== '000000000001.json')) damage(f);
  await nextStart(t, dir, hook);
  const bads = spooled(dir, 'webhook').filter((f) => f.endsWith('.bad'));
  assert.deepEqual({ taken, bads: bads.length, firstKept: bads.some((f) => fs.readFileSync(path.join(sub, f), 'utf8') === firstBad) }, { taken: [], bads: 2, firstKept: true });
});
