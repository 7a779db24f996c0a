/**
 * Power cut at every step of an extend and two volume resizes running
 * under writers that write and flush three volumes as fast as they can
 * (and a journal about to fill, so a journal-full checkpoint joins the
 * race). One run without a cut counts the device requests (writes,
 * zeroings, trims, flushes) of the scenario; then the scenario runs again
 * for each request index k (or a seeded sample of them when there are too
 * many), with the power cut at the k-th. After each cut the pool is opened
 * again the way an admin would (the devices the registry knows; the new
 * one too if the pool says it is missing), and then:
 *  - pool check passes;
 *  - every write acknowledged before a flush that completed reads back,
 *    and every other block holds its old or its new content;
 *  - each volume has its old size or its new one (the new one if its
 *    resize was acknowledged), with the old tail intact or zeros past the
 *    old end accordingly;
 *  - the pool has the new device if the extend was acknowledged, and if it
 *    does not, the device can be added again.
 *
 * DUET_EXTEND_CRASH_ALL=1 tries every k; DUET_EXTEND_CRASH_AT=k one of them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { DelegatingDevice } from '../../src/blockdev/delegating.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice, WriteOptions, ZeroOptions } from '../../src/blockdev/types.js';
import { Pool } from '../../src/volume/pool.js';
import { createVolume, resizeVolume, shareVolume } from '../../src/volume/operations.js';
import { KiB, MiB, assertPoolOk, describeDiff, keep, macrotick, mulberry32, pattern, readVolume, vol } from './helpers.js';

const CS = 4 * KiB;
const BLOCK = CS;
const SIZES = [8 * MiB, 6 * MiB, 6 * MiB];

/** Counts mutating requests across every device of a run; at the cut-th, the power goes. */
class PowerSwitch {
  requests = 0;
  cutAt = Number.POSITIVE_INFINITY;
  readonly cuts: Promise<void>[] = [];
  constructor(
    readonly disks: FaultyDevice[],
    readonly keepMode: 'none' | 'random',
    readonly random: () => number,
  ) {}
  arm(cutAt: number): void {
    this.cutAt = cutAt;
    this.requests = 0;
  }
  get cut(): boolean {
    return this.cuts.length > 0;
  }
  step(): void {
    if (++this.requests !== this.cutAt) return;
    // Synchronously off on every disk: nothing issued from here on lands.
    for (const d of this.disks) this.cuts.push(d.powerCut({ keep: this.keepMode, random: this.random }));
  }
}

class Switched extends DelegatingDevice {
  constructor(
    inner: BlockDevice,
    private readonly power: PowerSwitch,
  ) {
    super(inner);
  }
  override write(offset: number, data: Buffer, options?: WriteOptions) {
    this.power.step();
    return this.inner.write(offset, data, options);
  }
  override writeZeroes(offset: number, length: number, options?: ZeroOptions) {
    this.power.step();
    return this.inner.writeZeroes(offset, length, options);
  }
  override trim(offset: number, length: number, options?: WriteOptions) {
    this.power.step();
    return this.inner.trim(offset, length, options);
  }
  override flush() {
    this.power.step();
    return this.inner.flush();
  }
}

/* ------------------------------------------------------------------ model */

/** One block's story in a run: what it held before, what the run wrote, how far that got. */
interface Block {
  old: Buffer;
  new?: Buffer;
  state?: 'issued' | 'acked' | 'flushed';
}

interface VolumePlan {
  name: string;
  size: number;
  /** Size the run resizes it to (undefined: not resized). */
  resizeTo?: number;
  /** The writer writes below this offset only (both sizes hold it). */
  writable: number;
}

const PLANS: VolumePlan[] = [
  { name: 'a', size: 1 * MiB, writable: 1 * MiB },
  { name: 'b', size: 1 * MiB, resizeTo: 2 * MiB, writable: 1 * MiB },
  { name: 'c', size: 1 * MiB, resizeTo: 512 * KiB, writable: 512 * KiB },
];
const WRITES_PER_VOLUME = 14;
const SEED = 42;

interface Write {
  block: number;
  within: number;
  data: Buffer;
}

/** The same writes for every run (the cut point is the only thing that changes). */
function planWrites(seed: number): Map<string, Write[]> {
  const rng = mulberry32(seed);
  const plan = new Map<string, Write[]>();
  for (const p of PLANS) {
    const blocks = new Set<number>();
    const writes: Write[] = [];
    while (writes.length < WRITES_PER_VOLUME) {
      const block = Math.floor(rng() * (p.writable / BLOCK));
      if (blocks.has(block)) continue;
      blocks.add(block);
      const whole = rng() < 0.5;
      const within = whole ? 0 : Math.floor(rng() * 3000);
      const len = whole ? BLOCK : 1 + Math.floor(rng() * (BLOCK - within - 1));
      writes.push({ block, within, data: pattern(Math.floor(rng() * 2 ** 30), len) });
    }
    plan.set(p.name, writes);
  }
  return plan;
}

/* ------------------------------------------------------------------ a run */

interface Run {
  inners: MemoryDevice[];
  power: PowerSwitch;
  blocks: Map<string, Map<number, Block>>;
  initial: Map<string, Buffer>;
  resized: Set<string>;
  extended: boolean;
}

/** `room`: journal records left free, so a flush during the run becomes a checkpoint, sooner or later. */
async function setUp(power: PowerSwitch, room: number): Promise<{ pool: Pool; devices: BlockDevice[]; initial: Map<string, Buffer> }> {
  const devices = power.disks.map((d) => new Switched(d, power));
  const pool = await Pool.create('xp', devices.slice(0, 2), { chunkSize: CS });
  const initial = new Map<string, Buffer>();
  for (const [i, p] of PLANS.entries()) {
    await createVolume(pool, p.name, p.size);
    // Data everywhere, past the shrink point too, and a snapshot: writes copy on write.
    const content = Buffer.alloc(p.size);
    for (let at = 0; at < p.size; at += 64 * KiB) {
      const data = pattern(100 + i * 1000 + at / KiB, 8 * KiB);
      await vol(pool, p.name).write(at, data);
      data.copy(content, at);
    }
    initial.set(p.name, content);
  }
  await shareVolume(pool, 'a', 'a-snap', false);
  for (let i = 0; pool.describeMetadata().journalBytesUsed + room * 4096 <= pool.journalBytes; i++) {
    await vol(pool, 'a').trim(0, CS);
    const data = initial.get('a')!.subarray(0, CS);
    await vol(pool, 'a').write(0, data);
    await vol(pool, 'a').flush();
  }
  return { pool, devices, initial };
}

/** The scenario with the power cut at its `cutAt`-th request; `cutSeed` picks what a 'random' cut keeps. */
async function runScenario(room: number, cutAt: number, keepMode: 'none' | 'random', cutSeed: number): Promise<Run> {
  const inners = SIZES.map((s, i) => new MemoryDevice(s, `m${i}`));
  const disks = inners.map((d) => new FaultyDevice(keep(d)));
  const power = new PowerSwitch(disks, keepMode, mulberry32(cutSeed));
  const { pool, devices, initial } = await setUp(power, room);
  // Count from here: the scenario proper.
  power.arm(cutAt);
  const plan = planWrites(SEED);
  const blocks = new Map<string, Map<number, Block>>();
  for (const p of PLANS) {
    const m = new Map<number, Block>();
    for (const w of plan.get(p.name)!) m.set(w.block, { old: Buffer.from(initial.get(p.name)!.subarray(w.block * BLOCK, (w.block + 1) * BLOCK)) });
    blocks.set(p.name, m);
  }
  const run: Run = { inners, power, blocks, initial, resized: new Set(), extended: false };

  // The admin operations start once the writers are under way (everything here runs in microtasks).
  let started!: () => void;
  const underway = new Promise<void>((resolve) => (started = resolve));
  let flushes = 0;
  const writer = async (p: VolumePlan): Promise<void> => {
    const mine = blocks.get(p.name)!;
    for (const w of plan.get(p.name)!) {
      const b = mine.get(w.block)!;
      b.new = Buffer.from(b.old);
      w.data.copy(b.new, w.within);
      b.state = 'issued';
      await vol(pool, p.name).write(w.block * BLOCK + w.within, w.data);
      b.state = 'acked';
      const covered = [...mine.values()].filter((x) => x.state === 'acked');
      await vol(pool, p.name).flush();
      for (const x of covered) x.state = 'flushed';
      if (++flushes === 2) started();
    }
  };
  const admin = async (): Promise<void> => {
    await underway;
    const resizes = PLANS.filter((p) => p.resizeTo !== undefined).map(async (p) => {
      await resizeVolume(pool, p.name, p.resizeTo!, true);
      run.resized.add(p.name);
    });
    const extending = pool.exclusive(() => pool.extend(devices[2])).then(() => (run.extended = true));
    await Promise.all([...resizes, extending]);
  };
  const writers = PLANS.map(writer);
  void Promise.allSettled(writers).then(started); // a cut may stop them before their second flush
  const all = Promise.allSettled([...writers, admin()]);
  let settled = false;
  void all.then(() => (settled = true));
  for (let i = 0; i < 5000 && !settled; i++) await macrotick();
  assert.ok(settled, `cut at request ${cutAt}: every operation settles after the power cut`);
  if (!power.cut) {
    for (const r of await all) if (r.status === 'rejected') throw r.reason;
    // The close commits too: the cut may come during it.
    await pool.close().catch((err: unknown) => {
      if (!power.cut) throw err;
    });
  }
  await Promise.all(power.cuts);
  return run;
}

/** Open as the admin would: the devices the registry knows, and the new one if the pool asks for it. */
async function reopen(run: Run): Promise<Pool> {
  const handles = (): FaultyDevice[] => run.inners.map((d) => new FaultyDevice(keep(d)));
  const members = run.extended ? 3 : 2;
  try {
    return await Pool.open('xp', handles().slice(0, members));
  } catch (err) {
    if (members === 3 || !/is missing/.test((err as Error).message)) throw err;
    return await Pool.open('xp', handles());
  }
}

async function verify(run: Run, where: string): Promise<void> {
  const pool = await reopen(run);
  await assertPoolOk(pool, where);
  if (run.extended) assert.equal(pool.devices.length, 3, `${where}: the extend was acknowledged`);
  for (const p of PLANS) {
    const got = await readVolume(pool, p.name);
    const sizes = p.resizeTo === undefined ? [p.size] : run.resized.has(p.name) ? [p.resizeTo] : [p.size, p.resizeTo];
    assert.ok(sizes.includes(got.length), `${where}: volume ${p.name} has size ${got.length}, expected one of ${sizes.join(', ')}`);
    const blocks = run.blocks.get(p.name)!;
    for (const [block, b] of blocks) {
      const at = block * BLOCK;
      const now = got.subarray(at, at + BLOCK);
      if (b.state === 'flushed') {
        if (!now.equals(b.new!)) assert.fail(describeDiff(`${where}: volume ${p.name} block ${block} was flushed`, b.new!, now));
      } else if (!now.equals(b.old) && !(b.new && now.equals(b.new))) {
        assert.fail(describeDiff(`${where}: volume ${p.name} block ${block} (write ${b.state ?? 'not issued'}) holds neither old nor new content`, b.old, now));
      }
    }
    // Outside the written blocks: the old content up to the smaller size, zeros where a grow added room.
    const old = run.initial.get(p.name)!;
    for (let at = 0; at < got.length; at += BLOCK) {
      if (blocks.has(at / BLOCK)) continue;
      const want = at < p.size ? old.subarray(at, Math.min(at + BLOCK, got.length)) : Buffer.alloc(Math.min(BLOCK, got.length - at));
      const now = got.subarray(at, at + want.length);
      if (!now.equals(want)) assert.fail(describeDiff(`${where}: volume ${p.name} at ${at} (not written in the run)`, want, now));
    }
  }
  const snap = await readVolume(pool, 'a-snap');
  if (!snap.equals(run.initial.get('a')!)) assert.fail(describeDiff(`${where}: snapshot a-snap`, run.initial.get('a')!, snap));
  if (pool.devices.length === 2) {
    // The extend did not happen: the device, whatever it holds now, can join again.
    await pool.exclusive(() => pool.extend(new FaultyDevice(keep(run.inners[2]))));
    await assertPoolOk(pool, `${where}, extended again`);
  }
  await pool.close();
}

/** Up to this many requests every one is a cut point; past it, a seeded sample of this many. */
const SAMPLE = 600;

/**
 * Journal records left free at the start: with 6 the journal fills while
 * the extend waits its turn (its checkpoint covers the full journal too);
 * with 2 a journal-full checkpoint comes first, the extend's after it.
 */
for (const room of [6, 2]) {
  test(`power cut at every step of extend and resize under fsync-heavy writers (journal room ${room}): the pool opens, checks clean, flushed writes and sizes hold`, { timeout: 300_000 }, async (t) => {
    const full = await runScenario(room, Number.POSITIVE_INFINITY, 'none', SEED);
    const total = full.power.requests;
    assert.ok(full.extended && full.resized.size === 2, 'the scenario completes without a cut');
    await verify(full, 'no power cut');
    let points: number[];
    if (process.env.DUET_EXTEND_CRASH_AT) points = [Number(process.env.DUET_EXTEND_CRASH_AT)];
    else if (process.env.DUET_EXTEND_CRASH_ALL === '1' || total <= SAMPLE) points = Array.from({ length: total }, (_, i) => i + 1);
    else {
      const rng = mulberry32(SEED);
      const set = new Set<number>();
      while (set.size < SAMPLE) set.add(1 + Math.floor(rng() * total));
      points = [...set].sort((a, b) => a - b);
    }
    const outcomes = { extended: 0, notExtended: 0 };
    for (const k of points) {
      const keepMode = (k + room) % 2 === 0 ? 'none' : 'random';
      const where = `journal room ${room}, power cut at request ${k} of ${total} (keep ${keepMode}; rerun: DUET_EXTEND_CRASH_AT=${k})`;
      try {
        const run = await runScenario(room, k, keepMode, SEED + k);
        await verify(run, where);
        if (run.extended) outcomes.extended++;
        else outcomes.notExtended++;
      } catch (err) {
        const e = err as Error;
        if (!e.message.includes(where)) e.message = `${where}: ${e.message}`;
        throw err;
      }
    }
    t.diagnostic(`${points.length} cut points of ${total} requests; ${JSON.stringify(outcomes)}`);
  });
}
