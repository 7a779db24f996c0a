/**
 * Crash safety of the thin-volume pool: random command sequences over
 * FaultyDevice wrappers (writes sit in a volatile cache until flush/FUA),
 * power cut at random points, then the pool is opened again and compared
 * with what must have survived.
 *
 * The model, per volume: `cur` (what reads return now), `durable` (the
 * contents as of the last completed commit: a flush, or an admin operation
 * that resolved), and `since`, the values written since then. After a
 * power cut every byte must equal `durable` or one of the values written
 * to it since; a FUA write's bytes must be exactly its data (FUA as NBD
 * defines it: that write is durable, not the unflushed ones before it).
 * Snapshots must read exactly as when they were taken; every volume an
 * acknowledged admin operation created must exist, and none it removed.
 *
 * Seeds are printed on failure; DUET_CRASH_SEED=N reruns one seed of each
 * random test (DUET_CRASH_RUNS=N widens the search).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { BlockDeviceError } from '../../src/blockdev/types.js';
import { Pool } from '../../src/volume/pool.js';
import { createVolume, shareVolume, resizeVolume, removeVolume } from '../../src/volume/operations.js';
import { JOURNAL_OFFSET } from '../../src/volume/format.js';
import {
  KiB,
  MiB,
  type Align,
  assertPoolOk,
  describeDiff,
  keep,
  macrotick,
  microticks,
  mulberry32,
  pattern,
  pickRange,
  readVolume,
  trimmedRange,
  vol,
} from './helpers.js';

/* -------------------------------------------------------------------- model */

interface Seg {
  offset: number;
  data: Buffer;
}

interface CVol {
  cur: Buffer;
  durable: Buffer;
  /** Values written since the last completed commit (zeros for trim/zeroes), oldest first. */
  since: Seg[];
  snapshot: boolean;
}

type KeepMode = 'none' | 'random' | 'prefix';

const TRACE = process.env.DUET_CRASH_TRACE === '1';
class TracedLog extends Array<string> {
  override push(...items: string[]): number {
    for (const i of items) console.error(`  ${i}`);
    return super.push(...items);
  }
}

class Rig {
  readonly inners: MemoryDevice[];
  devices: FaultyDevice[];
  pool!: Pool;
  readonly vols = new Map<string, CVol>();
  /** Steps so far (DUET_CRASH_TRACE=1 prints them as they happen). */
  readonly log: string[] = TRACE ? new TracedLog() : [];
  private nextName = 0;
  readonly cs: number;

  constructor(
    readonly rng: () => number,
    readonly seed: number,
    sizes: number[],
    cs: number,
  ) {
    this.cs = cs;
    this.inners = sizes.map((s, i) => new MemoryDevice(s, `m${i}`));
    this.devices = this.inners.map((d) => this.wrap(d));
  }

  wrap(d: MemoryDevice): FaultyDevice {
    return new FaultyDevice(keep(d), { random: this.rng });
  }

  int(n: number): number {
    return Math.floor(this.rng() * n);
  }

  freshName(prefix = 'v'): string {
    return `${prefix}${this.nextName++}`;
  }

  names(filter: (v: CVol) => boolean = () => true): string[] {
    return [...this.vols.entries()].filter(([, v]) => filter(v)).map(([n]) => n);
  }

  pick(filter?: (v: CVol) => boolean): string | undefined {
    const names = this.names(filter);
    return names.length === 0 ? undefined : names[this.int(names.length)];
  }

  /** A completed commit: everything written so far is durable. */
  committed(): void {
    for (const v of this.vols.values()) {
      v.durable = Buffer.from(v.cur);
      v.since = [];
    }
  }

  /** A completed write (or zeroing) of `data` at `o`; with `fua` that range alone is durable. */
  wrote(name: string, o: number, data: Buffer, fua: boolean): void {
    const v = this.vols.get(name)!;
    data.copy(v.cur, o);
    if (!fua) {
      v.since.push({ offset: o, data: Buffer.from(data) });
      return;
    }
    data.copy(v.durable, o);
    // Older unflushed values of these bytes cannot come back over a FUA write.
    const end = o + data.length;
    const kept: Seg[] = [];
    for (const s of v.since) {
      const sEnd = s.offset + s.data.length;
      if (sEnd <= o || s.offset >= end) kept.push(s);
      else {
        if (s.offset < o) kept.push({ offset: s.offset, data: s.data.subarray(0, o - s.offset) });
        if (sEnd > end) kept.push({ offset: end, data: s.data.subarray(end - s.offset) });
      }
    }
    v.since = kept;
  }

  async create(): Promise<void> {
    this.pool = await Pool.create('cp', this.devices, { chunkSize: this.cs });
  }

  /** Open the pool again from the devices, in a random order. */
  async open(): Promise<void> {
    const order = [...this.devices];
    if (this.rng() < 0.5) order.reverse();
    this.pool = await Pool.open('cp', order);
  }

  async cut(mode: KeepMode): Promise<void> {
    for (const d of this.devices) {
      if (mode === 'prefix') {
        // A disk that destaged the oldest part of its cache, in order.
        let n = this.int(4);
        await d.powerCut({ keep: 'random', random: () => (n-- > 0 ? 0 : 0.99) });
      } else {
        await d.powerCut({ keep: mode, random: this.rng });
      }
    }
    // Anything the dead pool still had queued runs into the dead devices now, not later.
    await macrotick();
  }

  /** Every volume as the model allows after a power cut; then the model takes what is there as the new truth. */
  async verifyCrashed(when: string): Promise<void> {
    await assertPoolOk(this.pool, when);
    const listed = this.pool.listVolumes().map((v) => v.record.name).sort();
    assert.deepEqual(listed, this.names().sort(), `${when}: the volumes acknowledged admin operations left`);
    for (const [name, v] of this.vols) {
      const got = await readVolume(this.pool, name);
      assert.equal(got.length, v.cur.length, `${when}: size of ${name}`);
      if (v.snapshot && !got.equals(v.cur)) assert.fail(describeDiff(`${when}: snapshot ${name} changed`, v.cur, got));
      checkBytes(`${when}: volume ${name}`, v, got);
      v.cur = got;
      v.durable = Buffer.from(got);
      v.since = [];
    }
  }

  /** What reads return now must be `cur` (no crash involved). */
  async verifyLive(when: string, names = this.names()): Promise<void> {
    for (const name of names) {
      const v = this.vols.get(name);
      if (!v) continue;
      const got = await readVolume(this.pool, name);
      if (!got.equals(v.cur)) assert.fail(describeDiff(`${when}: volume ${name}`, v.cur, got));
    }
  }

  context(): string {
    return `chunk size ${this.cs}; steps:\n    ${this.log.slice(-60).join('\n    ')}`;
  }
}

/** Each byte: the durable value, or one written since the last commit. */
function checkBytes(what: string, v: CVol, got: Buffer): void {
  const step = 4096;
  for (let at = 0; at < got.length; at += step) {
    const end = Math.min(got.length, at + step);
    if (got.subarray(at, end).equals(v.durable.subarray(at, end))) continue;
    for (let i = at; i < end; i++) {
      const b = got[i];
      if (b === v.durable[i]) continue;
      const ok = v.since.some((s) => i >= s.offset && i < s.offset + s.data.length && s.data[i - s.offset] === b);
      if (!ok) {
        const written = v.since.filter((s) => i >= s.offset && i < s.offset + s.data.length).map((s) => s.data[i - s.offset]);
        assert.fail(
          `${what}: byte ${i} (chunk ${Math.floor(i / 4096)} of 4K) reads ${b}; durable value ${v.durable[i]}, ` +
            `written since the last commit: [${written.join(', ')}]`,
        );
      }
    }
  }
}

/* ------------------------------------------------------------------ steps */

const ALIGNS: Align[] = ['any', 'any', 'sector', 'chunk', 'straddle', 'tail'];
const MAX_VOLUMES = 7;

function randomSize(r: Rig): number {
  return 512 * (r.rng() < 0.85 ? 1 + r.int(2048) : 2048 + r.int(4 * 2048));
}

/** One random data-path step (write, trim, zeroes) on a writable volume; `fua` may be used when allowed. */
async function dataStep(r: Rig, allowFua: boolean): Promise<void> {
  const name = r.pick((v) => !v.snapshot);
  if (!name) return;
  const v = r.vols.get(name)!;
  const size = v.cur.length;
  const [o, l] = pickRange(size, r.cs, r.int(1 << 30), 1 + r.int(1 << 30), ALIGNS[r.int(ALIGNS.length)]);
  const fua = allowFua && r.rng() < 0.25;
  const kind = r.rng();
  const dev = vol(r.pool, name);
  if (kind < 0.7) {
    const seed = r.int(1 << 30);
    const data = pattern(seed, l);
    r.log.push(`write ${name} ${o}+${l}${fua ? ' fua' : ''}`);
    await dev.write(o, data, fua ? { fua } : undefined);
    r.wrote(name, o, data, fua);
  } else if (kind < 0.85) {
    r.log.push(`trim ${name} ${o}+${l}${fua ? ' fua' : ''}`);
    await dev.trim(o, l, fua ? { fua } : undefined);
    const t = trimmedRange(size, r.cs, o, l);
    if (t) r.wrote(name, t[0], Buffer.alloc(t[1] - t[0]), fua);
  } else {
    const noHole = r.rng() < 0.3;
    r.log.push(`zero ${name} ${o}+${l}${fua ? ' fua' : ''}${noHole ? ' noHole' : ''}`);
    await dev.writeZeroes(o, l, { fua, noHole });
    r.wrote(name, o, Buffer.alloc(l), fua);
  }
}

/** One random admin step; each commits when it resolves. */
async function adminStep(r: Rig): Promise<void> {
  const pool = r.pool;
  const k = r.rng();
  if (k < 0.25) {
    if (r.vols.size >= MAX_VOLUMES) return;
    const name = r.freshName();
    const size = randomSize(r);
    r.log.push(`create ${name} ${size}`);
    await createVolume(pool, name, size);
    r.vols.set(name, { cur: Buffer.alloc(size), durable: Buffer.alloc(size), since: [], snapshot: false });
  } else if (k < 0.55) {
    const src = r.pick();
    if (!src || r.vols.size >= MAX_VOLUMES) return;
    const snapshot = r.rng() < 0.6;
    const name = r.freshName(snapshot ? 's' : 'c');
    r.log.push(`${snapshot ? 'snapshot' : 'clone'} ${src} -> ${name}`);
    await shareVolume(pool, src, name, !snapshot);
    const from = r.vols.get(src)!;
    r.vols.set(name, { cur: Buffer.from(from.cur), durable: Buffer.alloc(0), since: [], snapshot });
  } else if (k < 0.8) {
    const name = r.pick((v) => !v.snapshot);
    if (!name) return;
    const v = r.vols.get(name)!;
    const size = randomSize(r);
    r.log.push(`resize ${name} ${v.cur.length} -> ${size} force`);
    await resizeVolume(pool, name, size, true);
    const cur = Buffer.alloc(size);
    v.cur.copy(cur, 0, 0, Math.min(size, v.cur.length));
    v.cur = cur;
  } else {
    const name = r.pick();
    if (!name) return;
    r.log.push(`remove ${name}`);
    await removeVolume(pool, name);
    r.vols.delete(name);
  }
  r.committed();
}

async function flushStep(r: Rig): Promise<void> {
  const name = r.pick();
  if (!name) return;
  r.log.push(`flush ${name}`);
  await vol(r.pool, name).flush();
  r.committed();
}

/** Many small commits: the journal fills and a commit turns into a checkpoint. */
async function burstStep(r: Rig): Promise<void> {
  const name = r.pick((v) => !v.snapshot);
  if (!name) return;
  const n = 10 + r.int(40);
  r.log.push(`burst of ${n} write+flush on ${name}`);
  for (let i = 0; i < n; i++) {
    const v = r.vols.get(name)!;
    if (r.rng() < 0.5) {
      // Unmap a chunk first, so the write below provisions and the commit has a record to journal.
      const [t] = pickRange(v.cur.length, r.cs, r.int(1 << 30), 1, 'chunk');
      const len = Math.min(r.cs, v.cur.length - t);
      await vol(r.pool, name).trim(t, len);
      const z = trimmedRange(v.cur.length, r.cs, t, len);
      if (z) r.wrote(name, z[0], Buffer.alloc(z[1] - z[0]), false);
    }
    const [o, l] = pickRange(v.cur.length, r.cs, r.int(1 << 30), 1 + r.int(600), 'any');
    const data = pattern(r.int(1 << 30), l);
    await vol(r.pool, name).write(o, data);
    r.wrote(name, o, data, false);
    await vol(r.pool, name).flush();
    r.committed();
  }
}

/* ------------------------------------------------------ random crash runs */

const RUNS = Number(process.env.DUET_CRASH_RUNS ?? 60);
const ONE_SEED = process.env.DUET_CRASH_SEED !== undefined ? Number(process.env.DUET_CRASH_SEED) : undefined;

function seeds(base: number): number[] {
  if (ONE_SEED !== undefined) return [ONE_SEED];
  return Array.from({ length: RUNS }, (_, i) => base + i);
}

async function withSeed(name: string, seed: number, fn: (rig: Rig) => Promise<void>, make: (seed: number) => Rig): Promise<void> {
  const rig = make(seed);
  try {
    await fn(rig);
  } catch (err) {
    const e = err as Error;
    e.message = `${name}, seed ${seed} (rerun: DUET_CRASH_SEED=${seed} node --test dist/test/volume/crash.test.js): ${e.message}\n  ${rig.context()}`;
    throw e;
  }
}

function makeRig(seed: number): Rig {
  const rng = mulberry32(seed);
  const cs = rng() < 0.5 ? 4 * KiB : 64 * KiB;
  const sizes = rng() < 0.5 ? [20 * MiB, 12 * MiB] : [10 * MiB, 22 * MiB];
  return new Rig(rng, seed, sizes, cs);
}

async function randomRun(r: Rig, mode: KeepMode): Promise<void> {
  await r.create();
  r.log.push(`pool created (keep ${mode})`);
  const steps = 50 + r.int(40);
  let crashes = 0;
  for (let step = 0; step < steps; step++) {
    const k = r.rng();
    if (k < 0.5) await dataStep(r, true);
    else if (k < 0.62) await flushStep(r);
    else if (k < 0.78) await adminStep(r);
    else if (k < 0.8) await burstStep(r);
    else if (k < 0.9) {
      r.log.push(`power cut (keep ${mode})`);
      await r.cut(mode);
      for (const d of r.devices) d.powerOn();
      await r.open();
      await r.verifyCrashed(`after power cut ${++crashes} at step ${step}`);
      continue;
    } else if (k < 0.92) {
      r.log.push('clean close and reopen');
      await r.pool.close();
      // close() closed the FaultyDevice handles (not the disks under them).
      r.devices = r.inners.map((d) => r.wrap(d));
      await r.open();
      r.committed();
    } else {
      continue;
    }
    await r.verifyLive(`step ${step} (${r.log[r.log.length - 1]})`);
  }
  r.log.push(`final power cut (keep ${mode})`);
  await r.cut(mode);
  for (const d of r.devices) d.powerOn();
  await r.open();
  await r.verifyCrashed('after the final power cut');
  await r.pool.close();
}

for (const mode of ['none', 'random', 'prefix'] as KeepMode[]) {
  test(`random commands, power cut at random points (keep: ${mode}): acknowledged state survives, checkPool ok`, { timeout: 600_000 }, async () => {
    const base = { none: 1000, random: 2000, prefix: 3000 }[mode];
    for (const seed of seeds(base)) await withSeed(`keep ${mode}`, seed, (r) => randomRun(r, mode), makeRig);
  });
}

/* ------------------------------------------------------- cut during commit */

interface Snapshot {
  names: string[];
  contents: Map<string, Buffer>;
}

function stateOf(r: Rig, which: 'durable' | 'cur'): Snapshot {
  const contents = new Map<string, Buffer>();
  for (const [n, v] of r.vols) contents.set(n, Buffer.from(v[which]));
  return { names: [...contents.keys()].sort(), contents };
}

async function matches(pool: Pool, s: Snapshot): Promise<string | undefined> {
  const names = pool.listVolumes().map((v) => v.record.name).sort();
  if (names.join() !== s.names.join()) return `volumes [${names.join(', ')}], expected [${s.names.join(', ')}]`;
  for (const [n, want] of s.contents) {
    const got = await readVolume(pool, n);
    if (!got.equals(want)) return describeDiff(`volume ${n}`, want, got);
  }
  return undefined;
}

const outcomes = { before: 0, after: 0, completed: 0 };

/**
 * Set up a random pool state, make every writable volume's chunks shared
 * (a snapshot each), so the following writes only provision and become
 * visible only through the commit under test; then start that commit and
 * cut power after a random number of microtask turns.
 */
async function cutDuringCommit(r: Rig, mode: KeepMode): Promise<void> {
  await r.create();
  const ensureWritable = async (): Promise<void> => {
    if (r.names((v) => !v.snapshot).length > 0) return;
    const name = r.freshName();
    r.log.push(`create ${name} ${512 * 700}`);
    await createVolume(r.pool, name, 512 * 700);
    r.vols.set(name, { cur: Buffer.alloc(512 * 700), durable: Buffer.alloc(512 * 700), since: [], snapshot: false });
    r.committed();
  };
  for (let i = 0; i < 3; i++) await adminStep(r);
  await ensureWritable();
  const prefix = 5 + r.int(20);
  for (let i = 0; i < prefix; i++) {
    const k = r.rng();
    if (k < 0.7) await dataStep(r, true);
    else if (k < 0.8) await flushStep(r);
    else await adminStep(r);
  }
  await ensureWritable();
  for (const name of r.names((v) => !v.snapshot)) {
    const s = r.freshName('pre');
    r.log.push(`snapshot ${name} -> ${s}`);
    await shareVolume(r.pool, name, s, false);
    r.vols.set(s, { cur: Buffer.from(r.vols.get(name)!.cur), durable: Buffer.alloc(0), since: [], snapshot: true });
  }
  r.committed();
  if (r.rng() < 0.35) {
    // Bring the journal to its end, so the commit under test becomes a checkpoint.
    const { journalBytes } = r.pool;
    const name = r.pick((v) => !v.snapshot)!;
    r.log.push(`fill the journal (flushes on ${name})`);
    const room = 4096 * (1 + r.int(2));
    for (let i = 0; r.pool.describeMetadata().journalBytesUsed < journalBytes - room; i++) {
      assert.ok(i < journalBytes / 4096, 'every flush here adds a journal record');
      // Unmap and provision chunk 0 again: a mapping change for every commit.
      const len = Math.min(r.cs, r.vols.get(name)!.cur.length);
      await vol(r.pool, name).trim(0, len);
      r.wrote(name, 0, Buffer.alloc(len), false);
      const data = Buffer.alloc(1, 1 + r.int(200));
      await vol(r.pool, name).write(0, data);
      r.wrote(name, 0, data, false);
      await vol(r.pool, name).flush();
      r.committed();
    }
    // Those writes provisioned once and then overwrote the new chunk: share again so the next writes provision.
    const s = r.freshName('pre');
    await shareVolume(r.pool, name, s, false);
    r.vols.set(s, { cur: Buffer.from(r.vols.get(name)!.cur), durable: Buffer.alloc(0), since: [], snapshot: true });
    r.committed();
  }
  const writes = 1 + r.int(6);
  for (let i = 0; i < writes; i++) await dataStep(r, false);

  await r.verifyLive('before the commit under test');
  const before = stateOf(r, 'durable');
  // The commit under test and the state it leads to.
  let op: () => Promise<unknown>;
  const k = r.rng();
  const target = r.pick((v) => !v.snapshot)!;
  if (k < 0.35) {
    r.log.push(`COMMIT: flush ${target}`);
    op = async () => vol(r.pool, target).flush();
  } else if (k < 0.5) {
    const name = r.freshName();
    const size = randomSize(r);
    r.log.push(`COMMIT: create ${name} ${size}`);
    op = () => createVolume(r.pool, name, size);
    r.vols.set(name, { cur: Buffer.alloc(size), durable: Buffer.alloc(size), since: [], snapshot: false });
  } else if (k < 0.65) {
    const name = r.freshName('s');
    r.log.push(`COMMIT: snapshot ${target} -> ${name}`);
    op = () => shareVolume(r.pool, target, name, false);
    r.vols.set(name, { cur: Buffer.from(r.vols.get(target)!.cur), durable: Buffer.alloc(0), since: [], snapshot: true });
  } else if (k < 0.85) {
    const v = r.vols.get(target)!;
    const size = randomSize(r);
    r.log.push(`COMMIT: resize ${target} ${v.cur.length} -> ${size} force`);
    op = () => resizeVolume(r.pool, target, size, true);
    const cur = Buffer.alloc(size);
    v.cur.copy(cur, 0, 0, Math.min(size, v.cur.length));
    v.cur = cur;
  } else {
    const name = r.pick()!;
    r.log.push(`COMMIT: remove ${name}`);
    op = () => removeVolume(r.pool, name);
    r.vols.delete(name);
  }
  const after = stateOf(r, 'cur');

  let done = false;
  let failed: unknown;
  const running = op().then(
    () => (done = true),
    (err) => (failed = err),
  );
  let where: string;
  if (r.rng() < 0.4) {
    const ticks = r.int(r.rng() < 0.7 ? 40 : 200);
    await microticks(ticks);
    where = `${ticks} microtask turns`;
  } else {
    // Cut right after the k-th device request of the commit (plus a few turns): spreads the
    // cut points over the commit's I/O (data flush, journal or checkpoint writes, superblocks).
    const requests = (): number => r.devices.reduce((n, d) => n + d.calls.write + d.calls.flush + d.calls.writeZeroes + d.calls.trim, 0);
    const start = requests();
    const k = 1 + r.int(8);
    let turns = 0;
    while (!done && requests() - start < k && turns < 100_000) {
      await microticks(1);
      turns++;
    }
    const extra = r.int(4);
    await microticks(extra);
    where = `device request ${k} (+${extra} turns)`;
  }
  const completed = done;
  r.log.push(`power cut at ${where} (keep ${mode}); the commit had ${completed ? '' : 'not '}completed`);
  await r.cut(mode);
  await running;
  if (!completed && failed !== undefined) {
    assert.ok(failed instanceof BlockDeviceError && ['EIO', 'ESHUTDOWN'].includes(failed.code), `the interrupted operation failed with ${String(failed)}`);
  }
  // Fresh handles on the same disks: the dead pool's handles stay without power.
  r.devices = r.inners.map((d) => r.wrap(d));
  await r.open();
  await assertPoolOk(r.pool, 'open after a cut during a commit');
  const asAfter = await matches(r.pool, after);
  if (asAfter === undefined) outcomes.after++;
  else {
    assert.ok(!completed, `the commit completed before the cut, yet the pool does not hold its result: ${asAfter}`);
    const asBefore = await matches(r.pool, before);
    assert.equal(asBefore, undefined, `neither the state before the commit (${asBefore}) nor after it (${asAfter})`);
    outcomes.before++;
  }
  if (completed) outcomes.completed++;
  await r.pool.close();
}

test('power cut in the middle of a commit (flush or admin operation): the pool opens, checks clean, and holds the state before or after it', { timeout: 600_000 }, async (t) => {
  const n = ONE_SEED !== undefined ? 1 : RUNS * 3;
  const modes: KeepMode[] = ['none', 'random', 'prefix'];
  for (let i = 0; i < n; i++) {
    const seed = ONE_SEED ?? 5000 + i;
    await withSeed(`cut during commit`, seed, (r) => cutDuringCommit(r, modes[seed % 3]), makeRig);
  }
  t.diagnostic(`outcomes: ${JSON.stringify(outcomes)}`);
  if (ONE_SEED === undefined) {
    // Both outcomes must have happened, or the cut points are not where the commits are.
    assert.ok(outcomes.before > 0 && outcomes.after > outcomes.completed, `outcomes ${JSON.stringify(outcomes)}`);
  }
});

/* ------------------------------------------------- deterministic regressions */

/** A pool over two FaultyDevices whose disks (MemoryDevices) outlive every handle. */
async function faultyPool(cs: number): Promise<{ inners: MemoryDevice[]; devs: FaultyDevice[]; pool: Pool }> {
  const inners = [new MemoryDevice(10 * MiB, 'm0'), new MemoryDevice(6 * MiB, 'm1')];
  const devs = inners.map((d) => new FaultyDevice(keep(d)));
  const pool = await Pool.create('fp', devs, { chunkSize: cs });
  return { inners, devs, pool };
}

async function cutAndReopen(inners: MemoryDevice[], devs: FaultyDevice[], keepMode: 'none' | 'random', random?: () => number): Promise<{ devs: FaultyDevice[]; pool: Pool }> {
  for (const d of devs) await d.powerCut({ keep: keepMode, random });
  await macrotick();
  const fresh = inners.map((d) => new FaultyDevice(keep(d)));
  const pool = await Pool.open('fp', fresh);
  await assertPoolOk(pool, 'reopen after a power cut');
  return { devs: fresh, pool };
}

async function rejectsWith(p: () => unknown, code: string, what: string): Promise<void> {
  await assert.rejects(
    async () => p(),
    (err: unknown) => {
      assert.ok(err instanceof BlockDeviceError, `${what}: a BlockDeviceError, got ${String(err)}`);
      assert.equal(err.code, code, `${what}: ${err.message}`);
      return true;
    },
    what,
  );
}

for (const concurrentCommit of [false, true]) {
  test(`a FUA write over a chunk provisioned since the last commit survives a power cut${concurrentCommit ? ' (that commit running)' : ''}`, async () => {
    for (const keepMode of ['none', 'random'] as const) {
      const { inners, devs, pool } = await faultyPool(64 * KiB);
      await createVolume(pool, 'v', 1 * MiB);
      const v = vol(pool, 'v');
      const first = pattern(1, 100_000);
      await v.write(10_000, first); // provisions chunks 0 and 1; the mapping is not committed
      const flushing = concurrentCommit ? Promise.resolve(v.flush()).catch(() => undefined) : undefined;
      const fua = pattern(2, 5000);
      await v.write(20_000, fua, { fua: true }); // in place into the new chunk
      const { pool: again } = await cutAndReopen(inners, devs, keepMode, mulberry32(7));
      await flushing;
      const got = await readVolume(again, 'v');
      assert.ok(got.subarray(20_000, 25_000).equals(fua), `keep ${keepMode}: the FUA write was acknowledged, so it must be there after the power cut`);
      await again.close();
    }
  });
}

test('a write racing the removal of a snapshot cannot reach the snapshot before the removal is committed', async () => {
  for (const keepMode of ['none', 'all'] as const) {
    const { inners, devs, pool } = await faultyPool(64 * KiB);
    const A = pattern(3, 256 * KiB);
    await createVolume(pool, 'v', A.length);
    await vol(pool, 'v').write(0, A);
    await vol(pool, 'v').flush();
    await shareVolume(pool, 'v', 's', false);
    // Hold the removal's commit at its first device flush.
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const flushes = devs.map((d) => d.flush.bind(d));
    devs.forEach((d, i) => (d.flush = async () => (await gate, flushes[i]())));
    const removing = removeVolume(pool, 's').then(
      () => 'removed',
      (e: Error) => e.message,
    );
    for (let i = 0; i < 50 && pool.volume('s'); i++) await microticks(1);
    assert.equal(pool.volume('s'), undefined, 'the removal is applied in memory');
    const B = pattern(4, 256 * KiB);
    const writing = Promise.resolve(vol(pool, 'v').write(0, B)).then(
      () => 'written',
      (e: Error) => e.message,
    );
    for (let i = 0; i < 20; i++) await macrotick();
    // The disk keeps everything it was sent, but the removal's journal record never came.
    for (const d of devs) await d.powerCut(keepMode === 'none' ? { keep: 'none' } : { keep: 'random', random: () => 0 });
    release();
    await removing;
    await writing;
    await macrotick();
    const again = await Pool.open('fp', inners.map((d) => new FaultyDevice(keep(d))));
    await assertPoolOk(again, 'reopen');
    assert.ok(again.volume('s'), 'the removal was not committed: the snapshot is still there');
    const got = await readVolume(again, 's');
    if (!got.equals(A)) assert.fail(describeDiff(`keep ${keepMode}: snapshot s after the cut`, A, got));
    await again.close();
  }
});

test('EIO on a provisioning write (and on the copy-on-write read): the write fails, the pool stays consistent, old content stays, later writes work', async () => {
  const cs = 4 * KiB;
  let { inners, devs, pool } = await faultyPool(cs);
  const A = pattern(5, 512 * KiB);
  await createVolume(pool, 'v', A.length);
  await vol(pool, 'v').write(0, A);
  await vol(pool, 'v').flush();
  await shareVolume(pool, 'v', 's', false); // every chunk of v is shared now: a write provisions
  await createVolume(pool, 'w', 256 * KiB); // nothing mapped: a write provisions
  const dataArea = (i: number): { offset: number; length: number } => {
    const d = pool.devices[i];
    return { offset: d.entry.dataStart, length: d.device.size - d.entry.dataStart };
  };
  const arm = (op: 'write' | 'read'): void => pool.devices.forEach((d, i) => (d.device as FaultyDevice).failWith({ op, ...dataArea(i), count: 1 }));
  const disarm = (): void => pool.devices.forEach((d) => (d.device as FaultyDevice).clearFaults());

  const modelV = Buffer.from(A);
  const modelW = Buffer.alloc(256 * KiB);
  const cases: { name: string; vol: string; op: 'write' | 'read'; at: number; len: number }[] = [
    { name: 'copy-on-write of a shared chunk, partial', vol: 'v', op: 'write', at: 5 * cs + 100, len: 1000 },
    { name: 'copy-on-write of a shared chunk, whole', vol: 'v', op: 'write', at: 9 * cs, len: cs },
    { name: 'fresh chunk', vol: 'w', op: 'write', at: 3 * cs + 7, len: 300 },
    { name: 'reading the old chunk for copy-on-write', vol: 'v', op: 'read', at: 20 * cs + 5, len: 50 },
  ];
  for (const c of cases) {
    const data = pattern(c.at, c.len);
    arm(c.op);
    await rejectsWith(() => vol(pool, c.vol).write(c.at, data), 'EIO', c.name);
    disarm();
    await assertPoolOk(pool, `EIO (${c.name})`);
    const model = c.vol === 'v' ? modelV : modelW;
    const got = await readVolume(pool, c.vol);
    if (!got.equals(model)) assert.fail(describeDiff(`after EIO (${c.name}): ${c.vol} keeps its old content`, model, got));
    assert.ok((await readVolume(pool, 's')).equals(A), 'the snapshot is untouched');
    // The same write works once the device does.
    await vol(pool, c.vol).write(c.at, data);
    data.copy(model, c.at);
  }
  await vol(pool, 'v').flush();
  ({ devs, pool } = await cutAndReopen(inners, devs, 'none'));
  assert.ok((await readVolume(pool, 'v')).equals(modelV), 'v after the power cut');
  assert.ok((await readVolume(pool, 'w')).equals(modelW), 'w after the power cut');
  assert.ok((await readVolume(pool, 's')).equals(A), 's after the power cut');
  await pool.close();
});

test('EIO on the journal write: the flush fails, the pool refuses writes but stays consistent; after a reopen all is well', async () => {
  for (const ending of ['power cut', 'clean close'] as const) {
    let { inners, devs, pool } = await faultyPool(4 * KiB);
    const A = pattern(8, 300 * KiB);
    await createVolume(pool, 'v', A.length);
    await vol(pool, 'v').write(0, A);
    await vol(pool, 'v').flush();
    const B = pattern(9, 40 * KiB);
    await createVolume(pool, 'w', B.length);
    await vol(pool, 'w').write(0, B); // provisions: the flush must journal it
    devs[0].failWith({ op: 'write', offset: JOURNAL_OFFSET, length: pool.journalBytes, count: 1 });
    await rejectsWith(() => vol(pool, 'w').flush(), 'EIO', 'the flush whose journal write failed');
    await assertPoolOk(pool, 'a failed commit');
    await rejectsWith(() => vol(pool, 'v').write(0, Buffer.alloc(10, 1)), 'EIO', 'a write after a failed commit');
    assert.ok((await readVolume(pool, 'v')).equals(A), 'reads go on');
    assert.ok((await readVolume(pool, 'w')).equals(B), 'reads go on (w)');
    if (ending === 'power cut') {
      ({ devs, pool } = await cutAndReopen(inners, devs, 'none'));
      const w = await readVolume(pool, 'w');
      // w's data was never covered by a completed flush: all of it or none of it (one chunk map, one record).
      assert.ok(w.equals(B) || w.equals(Buffer.alloc(B.length)), 'w holds its data or nothing');
    } else {
      await pool.close(); // the device works again: this commit lands
      devs = inners.map((d) => new FaultyDevice(keep(d)));
      pool = await Pool.open('fp', devs);
      await assertPoolOk(pool, 'reopen after a clean close');
      assert.ok((await readVolume(pool, 'w')).equals(B), 'w after the clean close');
    }
    assert.ok((await readVolume(pool, 'v')).equals(A), 'v after the reopen');
    const C = pattern(10, 5000);
    await vol(pool, 'v').write(1000, C);
    await vol(pool, 'v').flush();
    ({ devs, pool } = await cutAndReopen(inners, devs, 'none'));
    const expect = Buffer.from(A);
    C.copy(expect, 1000);
    assert.ok((await readVolume(pool, 'v')).equals(expect), 'writes work and persist again');
    await pool.close();
  }
});
