/**
 * The event log on real files in a temp dir: records, reads, restarts, torn
 * lines, rotation (with a model of what must be kept), the tap on a real
 * pino logger, and the line for people.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { destination, pino } from 'pino';
import { EventLog, formatEvent, tapEvents, type EventRecord } from '../../src/cluster/events.js';
import { silentLogger } from '../../src/util/log.js';

function tmpDir(t: TestContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-events-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** What is on disk, parsed independently of EventLog (events.1.jsonl first). */
function onDisk(dir: string): EventRecord[] {
  return ['events.1.jsonl', 'events.jsonl']
    .map((f) => path.join(dir, f))
    .filter((f) => fs.existsSync(f))
    .flatMap((f) => fs.readFileSync(f, 'utf8').split('\n').filter((l) => l !== ''))
    .map((l) => JSON.parse(l) as EventRecord);
}

const seqs = (rs: EventRecord[]) => rs.map((r) => r.seq);

test('record, since and tail; the file holds the same records, time/event/node first', (t) => {
  const dir = path.join(tmpDir(t), 'home', 'events'); // created by open
  const ev = EventLog.open(dir, 'alpha', { log: silentLogger() });
  t.after(() => ev.close());
  const seen: EventRecord[] = [];
  ev.on('event', (r: EventRecord) => seen.push(r));
  const a = ev.record('vm-started', { vm: 'web' }, 'vm web started on alpha');
  const b = ev.record('node-lost', { node: 'bravo', seq: 99, level: 'debug', time: 'x' }, 'bravo lost', 'warn');
  const c = ev.record('fence-failed', { err: new Error('witness unreachable'), sizeBytes: 5n }, 'fence of bravo failed', 'error');
  const big = ev.record('pool-created', { blob: 'x'.repeat(20_000) }, 'pool pa created');

  assert.deepEqual(seqs([a, b, c, big]), [1, 2, 3, 4]);
  assert.equal(a.node, 'alpha');
  assert.equal(a.vm, 'web');
  assert.equal(a.level, 'info');
  assert.equal(new Date(a.time).toISOString(), a.time);
  assert.equal(b.node, 'bravo', 'fields.node names the node the event is about');
  assert.equal(b.level, 'warn', 'reserved names in fields do not override the record');
  assert.notEqual(b.time, 'x');
  assert.equal(c.err, 'witness unreachable');
  assert.equal(c.sizeBytes, 5);
  assert.equal(big.blob, undefined, 'an oversized record keeps only its head');
  assert.equal(big.truncated, true);
  assert.equal(big.message, 'pool pa created');

  assert.deepEqual(seen, [a, b, c, big]);
  assert.equal(ev.lastSeq, 4);
  assert.deepEqual(ev.since(0), [a, b, c, big]);
  assert.deepEqual(ev.since(2), [c, big]);
  assert.deepEqual(ev.since(0, 2), [a, b]);
  assert.deepEqual(ev.since(4), []);
  assert.deepEqual(ev.tail(2), [c, big]);
  assert.deepEqual(ev.tail(10), [a, b, c, big]);
  assert.deepEqual(ev.tail(0), []);

  assert.deepEqual(onDisk(dir), [a, b, c, big]);
  const first = fs.readFileSync(path.join(dir, 'events.jsonl'), 'utf8').split('\n')[0];
  assert.deepEqual(Object.keys(JSON.parse(first)).slice(0, 3), ['time', 'event', 'node']);
});

test('seq goes on after close and reopen; record after close is refused', (t) => {
  const dir = tmpDir(t);
  let ev = EventLog.open(dir, 'alpha');
  const before = [ev.record('role', { resource: 'r0', role: 'Primary' }, 'Primary'), ev.record('connected', { peer: 'bravo' }, 'connected to bravo')];
  ev.close();
  assert.throws(() => ev.record('role', {}, 'Secondary'), /after close/);
  ev = EventLog.open(dir, 'alpha');
  t.after(() => ev.close());
  assert.equal(ev.lastSeq, 2);
  assert.deepEqual(ev.since(0), before);
  assert.deepEqual(ev.tail(1), [before[1]]);
  assert.equal(ev.record('disconnected', { peer: 'bravo' }, 'lost bravo').seq, 3);
  assert.deepEqual(seqs(onDisk(dir)), [1, 2, 3]);
});

test('a torn last line (crash mid-write) and a garbage line are skipped, not fatal', (t) => {
  const dir = tmpDir(t);
  let ev = EventLog.open(dir, 'alpha');
  const kept = [ev.record('vm-started', { vm: 'web' }, 'started'), ev.record('vm-stopped', { vm: 'web' }, 'stopped')];
  ev.close();
  const file = path.join(dir, 'events.jsonl');
  fs.appendFileSync(file, 'not json at all\n{"seq":3,"time":"2026-');
  ev = EventLog.open(dir, 'alpha');
  t.after(() => ev.close());
  assert.equal(ev.lastSeq, 2);
  assert.deepEqual(ev.since(0), kept);
  const next = ev.record('vm-started', { vm: 'db' }, 'started');
  assert.equal(next.seq, 3);
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  assert.deepEqual(lines.slice(2), ['not json at all', JSON.stringify(next), ''], 'the torn tail is cut off, the new record on a line of its own');
  const again = EventLog.open(dir, 'alpha');
  assert.deepEqual(again.since(0), [...kept, next]);
  again.close();
});

test('rotation keeps the history bounded, and since() reads across the rotated file', (t) => {
  const dir = tmpDir(t);
  const maxBytes = 64 * 1024;
  const ev = EventLog.open(dir, 'alpha', { maxBytes });
  t.after(() => ev.close());
  const n = 3000; // more than the in-memory ring: the oldest are read from the files
  for (let i = 1; i <= n; i++) ev.record('vm-memory-set', { vm: `vm${i}`, memoryBytes: i * 4096 }, `vm vm${i}: memory set`);
  const current = fs.statSync(path.join(dir, 'events.jsonl')).size;
  const rotated = fs.statSync(path.join(dir, 'events.1.jsonl')).size;
  assert.ok(current <= maxBytes && rotated > maxBytes && rotated + current <= 2 * maxBytes + 1024, `${rotated} + ${current}`);
  const kept = onDisk(dir);
  assert.equal(kept.at(-1)!.seq, n);
  assert.ok(kept.length < n, 'the oldest records were dropped');
  assert.deepEqual(seqs(kept), seqs(kept).map((_, i) => kept[0].seq + i), 'the kept history is contiguous');
  assert.deepEqual(ev.since(0, 1e6), kept);
  assert.deepEqual(ev.since(0), kept.slice(0, 1000));
  assert.deepEqual(ev.since(kept[5].seq, 3), kept.slice(6, 9));
  assert.deepEqual(ev.tail(kept.length - 1), kept.slice(1));
  assert.deepEqual(ev.tail(kept.length + 10), kept);
});

type Op = { op: 'record'; text: string; level: 'info' | 'warn' | 'error' } | { op: 'reopen' } | { op: 'torn'; tail: string };

test('property: for any records, restarts and torn lines, since(k) returns exactly the kept records with seq > k', (t) => {
  const op: fc.Arbitrary<Op> = fc.oneof(
    { weight: 8, arbitrary: fc.record({ op: fc.constant('record' as const), text: fc.string({ maxLength: 150, unit: 'binary' }), level: fc.constantFrom('info' as const, 'warn' as const, 'error' as const) }) },
    { weight: 1, arbitrary: fc.constant({ op: 'reopen' as const }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('torn' as const), tail: fc.string({ minLength: 1, maxLength: 40 }).map((s) => s.replaceAll('\n', '')) }) },
  );
  const root = tmpDir(t);
  let run = 0;
  fc.assert(
    fc.property(fc.array(op, { maxLength: 60 }), fc.integer({ min: 300, max: 2000 }), fc.integer({ min: 1, max: 8 }), (ops, maxBytes, ringRecords) => {
      const dir = path.join(root, String(run++));
      let ev = EventLog.open(dir, 'alpha', { maxBytes, ringRecords });
      // The model: what the contract says is kept, with each line's size.
      let old: EventRecord[] = [];
      let cur: EventRecord[] = [];
      let curBytes = 0;
      let last = 0;
      try {
        for (const o of ops) {
          if (o.op === 'record') {
            const r = ev.record('vm-started', { vm: o.text }, o.text, o.level);
            assert.equal(r.seq, ++last);
            cur.push(r);
            curBytes += Buffer.byteLength(JSON.stringify(r)) + 1;
            if (curBytes > maxBytes) [old, cur, curBytes] = [cur, [], 0];
          } else {
            ev.close();
            if (o.op === 'torn') fs.appendFileSync(path.join(dir, 'events.jsonl'), o.tail);
            ev = EventLog.open(dir, 'alpha', { maxBytes, ringRecords });
          }
          assert.equal(ev.lastSeq, last);
        }
        const kept = [...old, ...cur];
        assert.deepEqual(onDisk(dir), kept);
        assert.equal(fs.statSync(path.join(dir, 'events.jsonl')).size, curBytes);
        for (let k = -1; k <= last + 1; k++) {
          assert.deepEqual(ev.since(k, 1e6), kept.filter((r) => r.seq > k), `since(${k})`);
          assert.deepEqual(ev.since(k, 2), kept.filter((r) => r.seq > k).slice(0, 2), `since(${k}, 2)`);
        }
        for (let n = 0; n <= kept.length + 1; n++) assert.deepEqual(ev.tail(n), n === 0 ? [] : kept.slice(-n), `tail(${n})`);
      } finally {
        ev.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }),
    { numRuns: 100 },
  );
});

test('tapEvents records the tapped events with their fields and message, through child() too; the log lines are all written', (t) => {
  const dir = tmpDir(t);
  const out = path.join(dir, 'daemon.log');
  const base = pino({ level: 'debug' }, destination({ dest: out, sync: true }));
  const ev = EventLog.open(path.join(dir, 'events'), 'alpha');
  t.after(() => ev.close());
  const log = tapEvents(base, ev);

  log.info({ event: 'vm-started', vm: 'web' }, 'vm web started on alpha');
  log.info({ event: 'volume-created', pool: 'pa' }, 'volume created'); // chatter
  log.debug({ event: 'vm-stopped', vm: 'web' }, 'a debug line');
  log.info('a line without fields');
  log.warn({ event: 'node-lost', node: 'bravo' }, 'lost %s after %d ms', 'bravo', 1500);
  log.fatal({ event: 'self-fenced' }, 'no quorum: stopped writing');
  const child = log.child({ resource: 'r0' }).child({ peer: 'bravo' });
  child.error({ event: 'fence-failed', err: new Error('witness unreachable') }, 'fence of bravo failed');
  child.info({ event: 'pool-open', pool: 'pa' });

  const got = ev.since(0).map(({ seq, time, ...r }) => r);
  assert.deepEqual(got, [
    { event: 'vm-started', node: 'alpha', level: 'info', message: 'vm web started on alpha', vm: 'web' },
    { event: 'node-lost', node: 'bravo', level: 'warn', message: 'lost bravo after 1500 ms' },
    { event: 'self-fenced', node: 'alpha', level: 'error', message: 'no quorum: stopped writing' },
    { event: 'fence-failed', node: 'alpha', level: 'error', message: 'fence of bravo failed', resource: 'r0', peer: 'bravo', err: 'witness unreachable' },
    { event: 'pool-open', node: 'alpha', level: 'info', message: 'pool-open', resource: 'r0', peer: 'bravo', pool: 'pa' },
  ]);

  // The logger still behaves as pino: every line written, levels readable and settable.
  const lines = fs.readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.equal(lines.length, 8);
  assert.equal(lines[6].resource, 'r0');
  assert.equal(log.isLevelEnabled('debug'), true);
  log.level = 'info';
  assert.equal(base.level, 'info');
  log.debug({ event: 'vm-stopped' }, 'not written now');
  assert.equal(fs.readFileSync(out, 'utf8').trim().split('\n').length, 8);

  // A failing listener does not fail the log call; it is said on the log.
  ev.once('event', () => {
    throw new Error('listener broke');
  });
  log.info({ event: 'vm-stopped', vm: 'web' }, 'vm web stopped');
  const warned = JSON.parse(fs.readFileSync(out, 'utf8').trim().split('\n').at(-1)!) as Record<string, unknown>;
  assert.equal(warned.event, 'event-record-failed');
  assert.equal(ev.tail(1)[0].event, 'vm-stopped', 'recorded before the listener ran');

  // After close, lines are only logged.
  ev.close();
  log.info({ event: 'vm-started', vm: 'web' }, 'after close');
  assert.equal(ev.lastSeq, 6);
});

test('a tapped silent logger still records: the history does not depend on the log level', (t) => {
  const ev = EventLog.open(tmpDir(t), 'alpha');
  t.after(() => ev.close());
  tapEvents(silentLogger(), ev).child({ vm: 'web' }).info({ event: 'vm-exited', code: 0 }, 'vm web exited');
  assert.deepEqual(ev.since(0).map((r) => [r.event, r.vm, r.code]), [['vm-exited', 'web', 0]]);
});

test('formatEvent: one line for people, in local time', () => {
  const r: EventRecord = { seq: 7, time: '2026-12-01T09:43:20.123Z', event: 'vm-started', node: 'alpha', message: 'vm web started on alpha', level: 'info' };
  const tz = process.env.TZ;
  try {
    process.env.TZ = 'UTC';
    assert.equal(formatEvent(r), '2026-12-01 09:43:20.123  alpha  vm-started  vm web started on alpha');
    process.env.TZ = 'Asia/Kolkata';
    assert.equal(formatEvent({ ...r, time: '2026-12-31T20:00:00.004Z' }), '2027-01-01 01:30:00.004  alpha  vm-started  vm web started on alpha');
  } finally {
    if (tz === undefined) delete process.env.TZ;
    else process.env.TZ = tz;
  }
});
