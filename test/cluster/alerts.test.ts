/**
 * Alerts reach a person through real servers: Debian's aiosmtpd writing a
 * Maildir, a node:http webhook, a TCP server that never says a word. send()
 * returns at once; each attempt is bounded; retries deliver once the server
 * is back; the queue is bounded; secrets never reach the log.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pino, type Logger } from 'pino';
import { Alerter, bodyOf, subjectOf, type Alert } from '../../src/cluster/alerts.js';
import { freePorts } from '../ports.js';

interface LogEvent { level: number; event?: string; channel?: string; alert?: string; attempt?: number; err?: string; reason?: string }
type After = { after: (fn: () => Promise<void> | void) => void };

// The system interpreter: aiosmtpd is a Debian package (python3-aiosmtpd), not in a pyenv python3 on PATH.
const PYTHON = '/usr/bin/python3';
const WAIT_MS = 20_000;

const FAILOVER: Alert = {
  event: 'failover-done', node: 'bravo', cluster: 'home', time: '2024-05-01T12:00:00.000Z',
  summary: 'web, db now run on bravo',
  details: ['web: now runs on bravo (was alpha)', 'db: now runs on bravo (was alpha)', 'failover took 14.2 s'],
  data: { vms: [{ name: 'web', node: 'bravo', was: 'alpha' }, { name: 'db', node: 'bravo', was: 'alpha' }], durationMs: 14200 },
};
const numbered = (i: number): Alert => ({ ...FAILOVER, event: `test-${i}`, summary: `alert ${i}` });

function capture(): { log: Logger; lines: string[]; events: () => LogEvent[]; waitFor: (match: (e: LogEvent) => boolean, what: string) => Promise<void> } {
  const lines: string[] = [];
  const log = pino({ level: 'debug' }, { write: (s: string) => void lines.push(s) });
  const events = (): LogEvent[] => lines.map((l) => JSON.parse(l) as LogEvent);
  const waitFor = async (match: (e: LogEvent) => boolean, what: string): Promise<void> => {
    for (const deadline = Date.now() + WAIT_MS; !events().some(match); await sleep(20)) {
      if (Date.now() > deadline) throw new Error(`no log line ${what} within ${WAIT_MS} ms; got ${events().map((e) => e.event).join(', ')}`);
    }
  };
  return { log, lines, events, waitFor };
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function tempDir(t: After): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-alerts-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** aiosmtpd with its Mailbox handler: every message it accepts is a file in maildir/new. */
async function startSmtp(t: After, port: number, maildir: string): Promise<ChildProcess> {
  const child = spawn(PYTHON, ['-m', 'aiosmtpd', '-n', '-l', `127.0.0.1:${port}`, '-c', 'aiosmtpd.handlers.Mailbox', maildir], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([exited, new Promise((resolve) => (timer = setTimeout(resolve, 5000)))]).finally(() => clearTimeout(timer));
  });
  for (const deadline = Date.now() + WAIT_MS; !(await connects(port)); await sleep(50)) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`aiosmtpd did not listen on port ${port}: ${stderr}`);
  }
  return child;
}

function connects(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
}

/** The one message in the Maildir: unfolded headers, decoded body. */
function readMail(maildir: string): { headers: Map<string, string>; body: string } {
  const files = fs.readdirSync(path.join(maildir, 'new'));
  assert.equal(files.length, 1, `one message in the Maildir, found ${files.length}`);
  const text = fs.readFileSync(path.join(maildir, 'new', files[0]!), 'utf8').replace(/\r\n/g, '\n');
  const split = text.indexOf('\n\n');
  const headers = new Map<string, string>();
  for (const h of text.slice(0, split).replace(/\n[ \t]+/g, ' ').split('\n')) {
    const colon = h.indexOf(':');
    headers.set(h.slice(0, colon).toLowerCase(), h.slice(colon + 1).trim().replace(/\s+/g, ' '));
  }
  let body = text.slice(split + 2);
  if (/quoted-printable/i.test(headers.get('content-transfer-encoding') ?? '')) {
    body = Buffer.from(body.replace(/=\n/g, '').replace(/=([0-9A-F]{2})/g, (_m, hex: string) => String.fromCharCode(parseInt(hex, 16))), 'latin1').toString('utf8');
  }
  return { headers, body };
}

/** A webhook receiver; `answer` picks each response's status. */
async function startHook(t: After, answer: (n: number) => number): Promise<{ url: string; requests: Array<{ method?: string; type?: string; body: string; status: number }> }> {
  const requests: Array<{ method?: string; type?: string; body: string; status: number }> = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d: Buffer) => (body += d.toString()));
    req.on('end', () => {
      const status = answer(requests.length + 1);
      requests.push({ method: req.method, type: req.headers['content-type'], body, status });
      res.writeHead(status).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => (server.closeAllConnections(), server.close(() => resolve()))));
  return { url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/hook/s3cret-token`, requests };
}

test('a failover alert arrives by mail: the subject names the event and the node, the body each VM moved', async (t) => {
  const maildir = path.join(tempDir(t), 'Maildir');
  const [port] = await freePorts(1);
  await startSmtp(t, port!, maildir);
  const { log, events } = capture();
  const alerter = new Alerter({ email: { to: 'ops@example.org', smtp: `smtp://127.0.0.1:${port}` } }, { log, from: 'bravo', retryDelaysMs: [200] });
  t.after(() => alerter.close());
  alerter.send(FAILOVER);
  await alerter.idle(WAIT_MS);
  assert.deepEqual(alerter.stats().email, { sent: 1, failedAttempts: 0, gaveUp: 0 });
  const { headers, body } = readMail(maildir);
  assert.equal(headers.get('subject'), '[duet home] failover-done on bravo: web, db now run on bravo');
  assert.equal(headers.get('subject'), subjectOf(FAILOVER));
  assert.match(headers.get('from') ?? '', /duet@bravo\.home\.invalid/);
  assert.equal(headers.get('to'), 'ops@example.org');
  for (const line of FAILOVER.details!) assert.ok(body.includes(line), `body names "${line}":\n${body}`);
  assert.equal(body.trimEnd(), bodyOf(FAILOVER).trimEnd());
  assert.ok(body.includes('"durationMs": 14200'), 'the data go in as JSON');
  assert.ok(events().some((e) => e.event === 'alert-sent' && e.channel === 'email' && e.alert === 'failover-done' && e.level === 30));
});

test('a mail server that is down at first gets the alert on a retry; send() does not wait', async (t) => {
  const maildir = path.join(tempDir(t), 'Maildir');
  const [port] = await freePorts(1);
  const { log, lines, events, waitFor } = capture();
  const smtp = `smtp://alerts:pw-s3cret@127.0.0.1:${port}`;
  const alerter = new Alerter({ email: { to: 'ops@example.org', smtp } }, { log, from: 'bravo', retryDelaysMs: [300, 600, 1000, 2000, 4000, 8000], timeoutMs: 3000 });
  t.after(() => alerter.close());
  assert.equal(alerter.send(FAILOVER), undefined);
  assert.deepEqual(alerter.stats().email, { sent: 0, failedAttempts: 0, gaveUp: 0 }, 'send() only queued the alert');
  await waitFor((e) => e.event === 'alert-failed' && e.attempt === 1, 'alert-failed (nothing listens yet)');
  await startSmtp(t, port!, maildir);
  await alerter.idle(WAIT_MS);
  const { email } = alerter.stats();
  assert.equal(email.sent, 1);
  assert.ok(email.failedAttempts >= 1);
  assert.match(readMail(maildir).headers.get('subject') ?? '', /failover-done on bravo/);
  const failed = events().find((e) => e.event === 'alert-failed')!;
  assert.equal(failed.level, 40);
  assert.match(failed.err ?? '', /ECONNREFUSED/);
  assert.ok(!lines.some((l) => l.includes('pw-s3cret')), 'the SMTP password is not logged');
});

test('a mail server that accepts and never answers: each attempt is bounded, then the alert is given up', async (t) => {
  const sockets: net.Socket[] = [];
  const silent = net.createServer((s) => void sockets.push(s));
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => (sockets.forEach((s) => s.destroy()), silent.close(() => resolve()))));
  const { log, events } = capture();
  const port = (silent.address() as net.AddressInfo).port;
  const alerter = new Alerter({ email: { to: 'ops@example.org', smtp: `smtp://127.0.0.1:${port}` } }, { log, from: 'bravo', retryDelaysMs: [50, 50], timeoutMs: 300 });
  t.after(() => alerter.close());
  alerter.send(FAILOVER);
  await alerter.idle(WAIT_MS);
  assert.deepEqual(alerter.stats().email, { sent: 0, failedAttempts: 3, gaveUp: 1 });
  assert.equal(sockets.length, 3, 'one connection per attempt');
  assert.deepEqual(events().filter((e) => e.event === 'alert-failed').map((e) => [e.attempt, e.level, e.channel]), [[1, 40, 'email'], [2, 40, 'email'], [3, 40, 'email']]);
  const gaveUp = events().filter((e) => e.event === 'alert-gave-up');
  assert.equal(gaveUp.length, 1);
  assert.equal(gaveUp[0]!.level, 50);
});

test('a webhook that answers 500 gets the alert again; the body is the Alert as JSON', async (t) => {
  const hook = await startHook(t, (n) => (n === 1 ? 500 : 200));
  const { log, lines, events } = capture();
  const alerter = new Alerter({ webhook: { url: hook.url } }, { log, from: 'bravo', retryDelaysMs: [100, 500, 1000], timeoutMs: 3000 });
  t.after(() => alerter.close());
  alerter.send(FAILOVER);
  await alerter.idle(WAIT_MS);
  assert.deepEqual(alerter.stats().webhook, { sent: 1, failedAttempts: 1, gaveUp: 0 });
  assert.deepEqual(hook.requests.map((r) => r.status), [500, 200]);
  for (const r of hook.requests) {
    assert.equal(r.method, 'POST');
    assert.equal(r.type, 'application/json');
    assert.deepEqual(JSON.parse(r.body), FAILOVER);
  }
  assert.match(events().find((e) => e.event === 'alert-failed')?.err ?? '', /500/);
  assert.ok(events().some((e) => e.event === 'alert-sent' && e.channel === 'webhook' && e.attempt === 2));
  assert.ok(!lines.some((l) => l.includes('s3cret-token')), 'the webhook path (often a token) is not logged');
});

test('without alerts configured, send() does nothing', async (t) => {
  for (const config of [undefined, {}]) {
    const { log, lines } = capture();
    const alerter = new Alerter(config, { log, from: 'bravo' });
    t.after(() => alerter.close());
    alerter.send(FAILOVER);
    await alerter.idle(WAIT_MS);
    assert.deepEqual(alerter.stats(), { email: { sent: 0, failedAttempts: 0, gaveUp: 0 }, webhook: { sent: 0, failedAttempts: 0, gaveUp: 0 } });
    assert.deepEqual(lines, []);
  }
});

test('while a channel is down at most maxQueued alerts wait: the oldest waiting is dropped; the rest go in order', async (t) => {
  let up = false;
  const hook = await startHook(t, () => (up ? 200 : 503));
  const { log, events, waitFor } = capture();
  const alerter = new Alerter({ webhook: { url: hook.url } }, { log, from: 'bravo', retryDelaysMs: Array<number>(50).fill(100), timeoutMs: 3000, maxQueued: 3 });
  t.after(() => alerter.close());
  for (let i = 1; i <= 6; i++) alerter.send(numbered(i)); // 1 in delivery, 2..4 wait, 5 and 6 push out 2 and 3
  const dropped = events().filter((e) => e.event === 'alert-dropped');
  assert.deepEqual(dropped.map((e) => [e.alert, e.channel, e.level]), [['test-2', 'webhook', 40], ['test-3', 'webhook', 40]]);
  assert.match(dropped[0]!.reason ?? '', /queue full/);
  await waitFor((e) => e.event === 'alert-failed', 'alert-failed (503)');
  up = true;
  await alerter.idle(WAIT_MS);
  const delivered = hook.requests.filter((r) => r.status === 200).map((r) => (JSON.parse(r.body) as Alert).event);
  assert.deepEqual(delivered, ['test-1', 'test-4', 'test-5', 'test-6']);
  assert.equal(alerter.stats().webhook.sent, 4);
});

test('close() drops what is pending, with a log line, and stops retrying', async (t) => {
  const hook = await startHook(t, () => 503);
  const { log, events, waitFor } = capture();
  const alerter = new Alerter({ webhook: { url: hook.url } }, { log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000 });
  alerter.send(numbered(1));
  alerter.send(numbered(2));
  await waitFor((e) => e.event === 'alert-failed', 'alert-failed (503)');
  alerter.close();
  await alerter.idle(WAIT_MS);
  alerter.send(numbered(3));
  assert.deepEqual(events().filter((e) => e.event === 'alert-dropped').map((e) => e.alert), ['test-1', 'test-2', 'test-3']);
  assert.deepEqual(alerter.stats().webhook, { sent: 0, failedAttempts: 1, gaveUp: 0 });
});

/** The spool's files of one channel, oldest first (names are zero-padded sequence numbers). */
function spooled(dir: string, channel: string): string[] {
  try {
    return fs.readdirSync(path.join(dir, channel)).sort();
  } catch {
    return [];
  }
}

async function until(what: string, cond: () => boolean): Promise<void> {
  for (const deadline = Date.now() + WAIT_MS; !cond(); await sleep(20)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
  }
}

test('alerts still waiting when the daemon stops are on disk; the next start delivers them in order, then the spool is empty', async (t) => {
  let up = false;
  const hook = await startHook(t, () => (up ? 200 : 503));
  const dir = tempDir(t);
  const first = capture();
  const a = new Alerter({ webhook: { url: hook.url } }, { log: first.log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir });
  a.start();
  for (let i = 1; i <= 3; i++) a.send(numbered(i));
  await first.waitFor((e) => e.event === 'alert-failed', 'alert-failed (503)');
  await until('three alerts spooled', () => spooled(dir, 'webhook').filter((f) => f.endsWith('.json')).length === 3);
  await a.close();
  assert.deepEqual(first.events().filter((e) => e.event === 'alert-dropped'), [], 'closing with a spool drops nothing');
  assert.ok(first.events().some((e) => e.event === 'alert-spool-kept'));
  const files = spooled(dir, 'webhook');
  assert.deepEqual(files, ['000000000001.json', '000000000002.json', '000000000003.json']);
  assert.equal(fs.statSync(path.join(dir, 'webhook', files[0]!)).mode & 0o777, 0o600, 'alerts may quote hostnames and VM names: not world-readable');

  up = true;
  const second = capture();
  const b = new Alerter({ webhook: { url: hook.url } }, { log: second.log, from: 'bravo', retryDelaysMs: [100], timeoutMs: 3000, spoolDir: dir });
  b.start();
  t.after(() => b.close());
  b.send(numbered(4));
  await b.idle(WAIT_MS);
  const delivered = hook.requests.filter((r) => r.status === 200).map((r) => JSON.parse(r.body) as Alert);
  assert.deepEqual(delivered.map((x) => x.event), ['test-1', 'test-2', 'test-3', 'test-4'], 'the old ones first, in the order they were raised');
  assert.deepEqual(delivered[0], numbered(1), 'read back as it was sent');
  assert.ok(second.events().some((e) => e.event === 'alert-spool-loaded'));
  await until('spool empty', () => spooled(dir, 'webhook').length === 0);
});

test('the spool after a crash: a half-written file is removed, a damaged one set aside with a warning, the good ones delivered; new alerts number after the old', async (t) => {
  const hook = await startHook(t, () => 200);
  const dir = tempDir(t);
  // What a run that died left: two alerts saved, one save cut short, one file damaged on disk.
  const first = capture();
  let down = true;
  const dead = await startHook(t, () => (down ? 503 : 200));
  const a = new Alerter({ webhook: { url: dead.url } }, { log: first.log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir });
  a.start();
  for (let i = 1; i <= 3; i++) a.send(numbered(i));
  await until('three alerts spooled', () => spooled(dir, 'webhook').filter((f) => f.endsWith('.json')).length === 3);
  await first.waitFor((e) => e.event === 'alert-failed', 'alert-failed (503)');
  await a.close();
  down = false;
  const sub = path.join(dir, 'webhook');
  // Half-written by a process that is gone (pid above any pid_max), and one this process is writing (left alone).
  fs.writeFileSync(path.join(sub, '000000000009.json.999999999.0badc0de.tmp'), '{"format":"duet-al');
  const mine = `000000000010.json.${process.pid}.00c0ffee.tmp`;
  fs.writeFileSync(path.join(sub, mine), '{"format":"duet-al');
  const damaged = path.join(sub, '000000000002.json');
  fs.writeFileSync(damaged, fs.readFileSync(damaged, 'utf8').replace('alert 2', 'alert X'));
  fs.writeFileSync(path.join(sub, '000000000007.json'), 'not json at all');

  const second = capture();
  const b = new Alerter({ webhook: { url: hook.url } }, { log: second.log, from: 'bravo', retryDelaysMs: [100], timeoutMs: 3000, spoolDir: dir });
  b.start();
  t.after(() => b.close());
  b.send(numbered(4));
  await b.idle(WAIT_MS);
  assert.deepEqual(hook.requests.map((r) => (JSON.parse(r.body) as Alert).event), ['test-1', 'test-3', 'test-4']);
  const bad = second.events().filter((e) => e.event === 'alert-spool-bad') as Array<LogEvent & { reason?: string }>;
  assert.equal(bad.length, 2);
  assert.ok(bad.some((e) => /checksum/.test(e.reason ?? '')), 'the edited alert fails its checksum');
  await until('only the set-aside files (and the live writer\'s) left', () => spooled(dir, 'webhook').join() === ['000000000002.json.bad', '000000000007.json.bad', mine].join());
  // New alerts are numbered after every file seen, set aside or half-written: nothing is overwritten.
  assert.ok(second.events().some((e) => e.event === 'alert-sent' && e.alert === 'test-4'));
  assert.ok(!second.events().some((e) => e.event === 'alert-spool-failed'));
});

test('the spool keeps each channel apart: mail down, webhook up; a channel taken out of the config has its alerts dropped with a log line', async (t) => {
  const hook = await startHook(t, () => 200);
  const dir = tempDir(t);
  const [smtpPort] = await freePorts(1); // nothing listens: mail is down
  const first = capture();
  const a = new Alerter({ webhook: { url: hook.url }, email: { to: 'admin@example.invalid', smtp: `smtp://127.0.0.1:${smtpPort}` } }, { log: first.log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir });
  a.start();
  a.send(FAILOVER);
  await first.waitFor((e) => e.event === 'alert-failed' && e.channel === 'email', 'the mail attempt failed');
  await until('webhook delivered and unspooled', () => hook.requests.length === 1 && spooled(dir, 'webhook').length === 0);
  assert.deepEqual(spooled(dir, 'email'), ['000000000001.json']);
  await a.close();

  const second = capture();
  const b = new Alerter({ webhook: { url: hook.url } }, { log: second.log, from: 'bravo', timeoutMs: 3000, spoolDir: dir });
  b.start();
  t.after(() => b.close());
  await b.idle(WAIT_MS);
  const dropped = second.events().filter((e) => e.event === 'alert-dropped');
  assert.deepEqual(dropped.map((e) => [e.channel, e.alert]), [['email', 'failover-done']]);
  assert.match(dropped[0]!.reason ?? '', /no longer configured/);
  assert.deepEqual(spooled(dir, 'email'), []);
  assert.equal(hook.requests.length, 1, 'the webhook did not get it twice');
});

test('alerts raised at once keep their order on disk: each takes its number when it is raised, not when its directory is ready', async (t) => {
  const hook = await startHook(t, () => 503);
  const dir = tempDir(t);
  const { log } = capture();
  const a = new Alerter({ webhook: { url: hook.url } }, { log, from: 'bravo', retryDelaysMs: [60_000], timeoutMs: 3000, spoolDir: dir, maxQueued: 300 });
  a.start();
  for (let i = 1; i <= 200; i++) a.send(numbered(i));
  await a.close();
  const files = spooled(dir, 'webhook').filter((f) => f.endsWith('.json'));
  assert.equal(files.length, 200);
  const order = files.map((f) => (JSON.parse((JSON.parse(fs.readFileSync(path.join(dir, 'webhook', f), 'utf8')) as { alert: string }).alert) as Alert).event);
  assert.deepEqual(order, Array.from({ length: 200 }, (_, i) => `test-${i + 1}`));
});
