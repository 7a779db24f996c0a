/**
 * One writer of pool metadata: a commit, a journal-full checkpoint, an
 * extend and a close must never write metadata at the same time. Each test
 * stops one metadata write (MetadataLog.hold), starts the other operation,
 * lets it run as far as it can, then releases the write and checks what
 * reached the disks: sequence numbers, and what a reopen after a power cut
 * finds.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { Pool } from '../../src/volume/pool.js';
import { createVolume } from '../../src/volume/operations.js';
import { JOURNAL_OFFSET } from '../../src/volume/format.js';
import { KiB, MiB, assertPoolOk, describeDiff, keep, macrotick, pattern, readVolume, vol } from './helpers.js';
import { MetadataLog, ProbeDevice, type MetadataWrite, settle } from './metadata-probe.js';

const CS = 4 * KiB;

interface Rig {
  inners: MemoryDevice[];
  faulty: FaultyDevice[];
  probes: ProbeDevice[];
  log: MetadataLog;
  pool: Pool;
  /** What volume v must read. */
  model: Buffer;
}

/** A pool on the first two of three disks (the third is for extend), with one volume v. */
async function rig(): Promise<Rig> {
  const inners = [new MemoryDevice(8 * MiB, 'm0'), new MemoryDevice(6 * MiB, 'm1'), new MemoryDevice(6 * MiB, 'm2')];
  const faulty = inners.map((d) => new FaultyDevice(keep(d)));
  const log = new MetadataLog();
  const probes = faulty.map((d) => new ProbeDevice(d, log));
  const pool = await Pool.create('rp', probes.slice(0, 2), { chunkSize: CS });
  const size = 256 * KiB;
  await createVolume(pool, 'v', size);
  return { inners, faulty, probes, log, pool, model: Buffer.alloc(size) };
}

async function write(r: Rig, at: number, data: Buffer): Promise<void> {
  await vol(r.pool, 'v').write(at, data);
  data.copy(r.model, at);
}

/** Power cut on every disk, then open the pool from fresh handles on its first `members` disks: it must have them all, and v its model. */
async function cutAndReopen(r: Rig, members = 3): Promise<void> {
  for (const d of r.faulty) await d.powerCut({ keep: 'none' });
  await macrotick();
  const pool = await Pool.open('rp', r.inners.slice(0, members).map((d) => new FaultyDevice(keep(d))));
  await assertPoolOk(pool, 'reopen after a power cut');
  assert.equal(pool.devices.length, members, 'the acknowledged extend holds after the reopen');
  const got = await readVolume(pool, 'v');
  if (!got.equals(r.model)) assert.fail(describeDiff('v after the power cut (every write was flushed)', r.model, got));
  await pool.close();
}

function outcome(p: Promise<unknown>): Promise<string> {
  return p.then(
    () => 'ok',
    (err: Error) => `failed: ${err.message}`,
  );
}

/** `p`, which must settle within `turns` event-loop turns (no timers: every device here is in memory). */
async function bounded<T>(p: Promise<T>, what: string, turns = 500): Promise<T> {
  let done = false;
  let value!: T;
  void p.then((v) => {
    done = true;
    value = v;
  });
  for (let i = 0; i < turns && !done; i++) await macrotick();
  assert.ok(done, `${what} did not happen within ${turns} event-loop turns`);
  return value;
}

/** An extend, as the service runs it: admin operations one at a time. */
function extend(r: Rig): () => Promise<unknown> {
  return () => r.pool.exclusive(() => r.pool.extend(r.probes[2]));
}

interface Racer {
  what: string;
  run: () => Promise<unknown>;
}

/**
 * Start `first` and stop the metadata write of it that `match` accepts;
 * meanwhile start `second` and let it run as far as it can; then release
 * the write. Both must succeed. Returns the metadata writes issued while
 * the write was held, other than the same write to the other devices (one
 * writer: there must be none).
 */
async function race(r: Rig, match: (w: MetadataWrite) => boolean, first: Racer, second: Racer): Promise<MetadataWrite[]> {
  const held = r.log.hold(match);
  const a = outcome(first.run());
  const w = await bounded(held.reached, `the held metadata write of ${first.what}`);
  const at = r.log.writes.length;
  const b = outcome(second.run());
  await settle();
  const others = r.log.writes.slice(at).filter((x) => !(x.kind === w.kind && x.seq === w.seq && x.gen === w.gen));
  held.release();
  assert.equal(await bounded(a, first.what), 'ok', `${first.what} completes`);
  assert.equal(await bounded(b, second.what), 'ok', `${second.what} completes`);
  return others;
}

const flush = (r: Rig): Racer => ({ what: 'the flush', run: async () => vol(r.pool, 'v').flush() });

/** Trim and rewrite chunk 0 and flush until no journal record fits any more: the next commit is a checkpoint. */
async function fillJournal(r: Rig): Promise<void> {
  const { pool } = r;
  for (let i = 0; pool.describeMetadata().journalBytesUsed + 4096 <= pool.journalBytes; i++) {
    assert.ok(i < pool.journalBytes / 4096, 'every flush here adds a journal record');
    await vol(pool, 'v').trim(0, CS);
    r.model.fill(0, 0, CS);
    await write(r, 0, Buffer.alloc(100, 1 + (i % 200)));
    await vol(pool, 'v').flush();
  }
}

test('close during an extend waits for its checkpoint: the extend completes and the pool reopens with the new device', async () => {
  const r = await rig();
  await write(r, 0, pattern(1, 3 * CS));
  await vol(r.pool, 'v').flush();

  const seq = r.pool.describeMetadata().superblock.seq;
  // The extend must complete: close must not take the devices from under it.
  const others = await race(r, (w) => w.kind === 'superblock' && w.seq! > seq, { what: 'the extend', run: extend(r) }, { what: 'the close', run: () => r.pool.close() });
  assert.deepEqual(others, [], 'no other metadata write while the superblock write was held');
  await cutAndReopen(r);
});

test('a journal record in flight while an extend checkpoints: flushes after both survive a power cut', async () => {
  const r = await rig();
  await write(r, 0, pattern(2, CS));
  await vol(r.pool, 'v').flush();

  await write(r, CS, pattern(3, CS)); // provisions chunk 1: the flush below journals it
  const others = await race(r, (w) => w.kind === 'journal', flush(r), { what: 'the extend', run: extend(r) });

  // Commits after the checkpoint must land where the next open looks for them.
  await write(r, 2 * CS, pattern(4, CS));
  await write(r, 40 * CS + 10, pattern(5, 3000));
  await vol(r.pool, 'v').flush();
  await cutAndReopen(r);
  assert.deepEqual(others, [], 'no other metadata write while the journal record was held');
});

test('a journal-full checkpoint racing an extend: superblock sequence numbers strictly increase on every device', async () => {
  const r = await rig();
  await fillJournal(r);
  await write(r, 5 * CS, pattern(6, CS)); // provisions: the next flush has a record to journal, and no room for it
  const seq = r.pool.describeMetadata().superblock.seq;
  const others = await race(r, (w) => w.kind === 'superblock' && w.seq! > seq, flush(r), { what: 'the extend', run: extend(r) });
  r.log.assertSeqsIncrease('a journal-full checkpoint and an extend');
  assert.deepEqual(others, [], 'no other metadata write while the superblock write was held');

  await write(r, 9 * CS, pattern(7, 2 * CS));
  await vol(r.pool, 'v').flush();
  await cutAndReopen(r);
});

test('a checkpoint whose superblock write failed is retried with a higher sequence number', async () => {
  const r = await rig();
  await fillJournal(r);
  await write(r, 3 * CS, pattern(8, CS));
  // The checkpoint's superblock reaches the first device, not the second.
  r.faulty[1].failWith({ op: 'write', offset: 0, length: JOURNAL_OFFSET, count: 1 });
  assert.match(await outcome(flush(r).run()), /injected EIO/);
  r.faulty[1].clearFaults();
  assert.equal(await outcome(r.pool.close()), 'ok', 'the device works again: the close commits');
  r.log.assertSeqsIncrease('a checkpoint retried after a failed superblock write');
  await cutAndReopen(r, 2);
});
