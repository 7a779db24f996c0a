/**
 * Crash tests with real Resources over real (loopback TCP) links: a Primary
 * whose machine dies (its process stops doing I/O, its disk loses the
 * volatile cache), failover to the Secondary, a Secondary cut off while the
 * Primary writes. The data is checked against a model of what the writers
 * were told: acknowledged + flushed (or FUA) writes must survive, anything
 * else may or may not, and both disks must end byte-identical.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DelegatingDevice } from '../../src/blockdev/delegating.js';
import { mulberry32 } from '../blockdev/conformance.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import type { Extent, WriteOptions, ZeroOptions } from '../../src/blockdev/types.js';
import { AL_EXTENT_BYTES } from '../../src/replication/activity-log.js';
import { BLOCK } from '../../src/replication/bitmap.js';
import { Resource } from '../../src/replication/resource.js';
import { apart, connected, freePort, initialSync, newDisk, Node, readAll, startNode, stopNode, syncedPair, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;
const SECTOR = 512;
const SIZE = 64 * MiB;
const E = AL_EXTENT_BYTES;


function randomData(rand: () => number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i + 4 <= length; i += 4) b.writeUInt32LE((rand() * 0x100000000) >>> 0, i);
  return b;
}

/**
 * The disk of a machine that can die: after crash() no call reaches the
 * disk and none ever completes (the process is gone), but calls already
 * handed to the disk finish there. The power cut itself is the FaultyDevice's.
 */
class Crashable extends DelegatingDevice {
  private dead = false;
  crash(): void {
    this.dead = true;
  }
  private go<T>(fn: () => T | Promise<T>): T | Promise<T> {
    if (this.dead) return new Promise<T>(() => undefined);
    return fn();
  }
  override read(offset: number, into: Buffer) {
    return this.go(() => this.inner.read(offset, into));
  }
  override write(offset: number, data: Buffer, options?: WriteOptions) {
    return this.go(() => this.inner.write(offset, data, options));
  }
  override flush() {
    return this.go(() => this.inner.flush());
  }
  override trim(offset: number, length: number, options?: WriteOptions) {
    return this.go(() => this.inner.trim(offset, length, options));
  }
  override writeZeroes(offset: number, length: number, options?: ZeroOptions) {
    return this.go(() => this.inner.writeZeroes(offset, length, options));
  }
  override blockStatus(offset: number, length: number): Extent[] | Promise<Extent[]> {
    return this.go(() => this.inner.blockStatus(offset, length));
  }
  override cache(offset: number, length: number) {
    return this.go(() => this.inner.cache(offset, length));
  }
  override close() {
    // A dead machine closes nothing; a live one closes its disk.
    return this.go(() => this.inner.close());
  }
}

/**
 * What the data must be, per 512-byte sector: `sure` values were made durable
 * (flush completed after they were acknowledged, or FUA); `maybe` values were
 * written since and may or may not have survived (any of them, or the sure one).
 */
class Model {
  private readonly sure = new Map<number, Buffer>();
  private readonly maybe = new Map<number, Buffer[]>();

  /** An acknowledged write that is durable now (FUA, or replicated to a disk without a cache). */
  durable(offset: number, data: Buffer): void {
    for (let at = 0; at < data.length; at += SECTOR) {
      const s = (offset + at) / SECTOR;
      this.sure.set(s, data.subarray(at, at + SECTOR));
      this.maybe.delete(s);
    }
  }

  /** A write that may or may not be there after a crash (not yet flushed, or never acknowledged). */
  volatile(offset: number, data: Buffer): void {
    for (let at = 0; at < data.length; at += SECTOR) {
      const s = (offset + at) / SECTOR;
      const list = this.maybe.get(s) ?? [];
      list.push(data.subarray(at, at + SECTOR));
      this.maybe.set(s, list);
    }
  }

  /** A flush completed: every write acknowledged before it is durable (the newest value per sector). */
  flushed(): void {
    for (const [s, list] of this.maybe) this.sure.set(s, list[list.length - 1]);
    this.maybe.clear();
  }

  sectorsInDoubt(): number {
    return this.maybe.size;
  }

  check(image: Buffer, what: string): void {
    const zero = Buffer.alloc(SECTOR);
    const sectors = image.length / SECTOR;
    let bad = 0;
    let first = '';
    for (let s = 0; s < sectors; s++) {
      const got = image.subarray(s * SECTOR, (s + 1) * SECTOR);
      const sure = this.sure.get(s) ?? zero;
      const maybe = this.maybe.get(s);
      const ok = got.equals(sure) || (maybe !== undefined && maybe.some((m) => got.equals(m)));
      if (!ok) {
        if (bad === 0) first = `sector ${s} (offset ${s * SECTOR}): ${maybe ? `none of ${maybe.length + 1} possible values` : 'not the durable value'}`;
        bad++;
      }
    }
    assert.equal(bad, 0, `${what}: ${bad} sectors hold data no writer was promised; first: ${first}`);
  }
}

/** Random sector-aligned writes in the first `span` bytes. */
function randomWrite(rand: () => number, span: number): { offset: number; data: Buffer } {
  const length = SECTOR * (1 + Math.floor(rand() * (rand() < 0.2 ? 2048 : 64)));
  const offset = SECTOR * Math.floor(rand() * ((span - length) / SECTOR));
  return { offset, data: randomData(rand, length) };
}

const ticks = async (n = 5) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

/** The machine dies: no more disk I/O from its process, its links drop, its disk's cache is lost. */
const crashedNodes = new WeakSet<Node>();

async function crashNode(n: Node, disk: Crashable, faulty: FaultyDevice, keep: 'none' | 'random', random: () => number): Promise<void> {
  crashedNodes.add(n);
  disk.crash();
  await n.connector.stop();
  await ticks();
  await faulty.powerCut({ keep, random });
  faulty.powerOn();
}

function extentsOf(offset: number, length: number): number[] {
  const out: number[] = [];
  for (let e = Math.floor(offset / E); e <= Math.floor((offset + length - 1) / E); e++) out.push(e);
  return out;
}

function extentBytes(r: Resource, extents: Iterable<number>): number {
  let n = 0;
  for (const e of extents) n += Math.max(0, Math.min(E, r.size - e * E));
  return n;
}

/** Extents whose every block is marked in the bitmap; asserts no partial extent is marked. */
function markedExtents(r: Resource): Set<number> {
  const out = new Set<number>();
  for (let e = 0; e * E < r.size; e++) {
    const first = (e * E) / BLOCK;
    const last = Math.ceil(Math.min(r.size, (e + 1) * E) / BLOCK) - 1;
    let marked = 0;
    for (let b = first; b <= last; b++) if (r.bitmap.isMarked(b)) marked++;
    if (marked === 0) continue;
    assert.equal(marked, last - first + 1, `extent ${e} is only partly marked (${marked} blocks)`);
    out.add(e);
  }
  return out;
}

async function assertIdentical(a: Node, b: Node, model: Model | undefined, what: string): Promise<void> {
  const size = a.resource.size;
  const da = await readAll(a.disk, size);
  const db = await readAll(b.disk, size);
  if (!da.equals(db)) {
    let at = 0;
    while (at < size && da[at] === db[at]) at++;
    assert.fail(`${what}: the data areas differ, first at byte ${at} (extent ${Math.floor(at / E)})`);
  }
  model?.check(da, what);
}

async function settled(a: Node, b: Node, what: string, timeoutMs = 15_000): Promise<void> {
  await until(what, () => upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0, timeoutMs);
}

/* ------------------------------------------------------------------ (a) */

for (const [seed, keep] of [
  [1, 'none'],
  [2, 'random'],
  [3, 'random'],
] as const) {
  test(`(a) Primary crash with a write-back disk (seed ${seed}, cache ${keep === 'none' ? 'all lost' : 'partly kept'}): AL extents marked, resync from the crashed Primary, disks identical, flushed writes kept`, async (t) => {
    const rand = mulberry32(seed);
    const port = await freePort();
    const faulty = new FaultyDevice(await newDisk(SIZE, 'alpha'), { writeBack: true, random: mulberry32(seed * 7919) });
    const disk = new Crashable(faulty);
    const a = await startNode('alpha', disk, port);
    const bDisk = await newDisk(SIZE, 'bravo');
    const b = await startNode('bravo', bDisk, port);
    let a2: Node | undefined;
    try {
      await initialSync(a, b);
      await a.resource.flush();
      const model = new Model();
      const span = 40 * MiB; // extents 0..9
      const acked = new Set<number>();
      const issued = new Set<number>();
      for (let i = 0; i < 80; i++) {
        const { offset, data } = randomWrite(rand, span);
        const fua = rand() < 0.1;
        for (const e of extentsOf(offset, data.length)) issued.add(e);
        await a.resource.write(offset, data, { fua });
        for (const e of extentsOf(offset, data.length)) acked.add(e);
        if (fua) model.durable(offset, data);
        else model.volatile(offset, data);
        if (rand() < 0.12) {
          await a.resource.flush();
          model.flushed();
        }
      }
      // The last acknowledged writes are not flushed: they are in the disk's cache only.
      for (let i = 0; i < 3; i++) {
        const { offset, data } = randomWrite(rand, span);
        for (const e of extentsOf(offset, data.length)) issued.add(e);
        await a.resource.write(offset, data);
        for (const e of extentsOf(offset, data.length)) acked.add(e);
        model.volatile(offset, data);
      }
      // A few writes in flight when the machine dies (never acknowledged).
      for (let i = 0; i < 4; i++) {
        const { offset, data } = randomWrite(rand, span);
        model.volatile(offset, data);
        for (const e of extentsOf(offset, data.length)) issued.add(e);
        void Promise.resolve(a.resource.write(offset, data)).catch(() => undefined);
      }
      assert.ok(faulty.unflushedWrites > 0, 'some writes are only in the disk cache');
      const inDoubt = model.sectorsInDoubt();
      await crashNode(a, disk, faulty, keep, mulberry32(seed * 31));
      await until('bravo sees alpha gone', () => b.resource.peer === undefined);

      a2 = await startNode('alpha', faulty, port);
      const r = a2.resource;
      assert.equal(r.crashedPrimary, true, 'alpha was Primary when it died');
      assert.equal(r.role, 'Secondary');
      assert.equal(r.record.primary, false, 'the crash is recorded as handled');
      // The activity-log extents are marked, whole: every extent with an acknowledged write, none never written.
      const marked = markedExtents(r);
      for (const e of acked) assert.ok(marked.has(e), `extent ${e} had acknowledged writes but is not marked`);
      for (const e of marked) assert.ok(issued.has(e), `extent ${e} was never written but is marked`);
      assert.equal(r.bitmap.outOfSyncBytes, extentBytes(r, marked));
      t.diagnostic(`seed ${seed}: ${marked.size} extents marked, ${inDoubt} sectors written after the last flush`);

      await settled(a2, b, 'resync after the crash');
      assert.equal(r.crashedPrimary, false);
      assert.equal(a2.resource.record.gi.current, b.resource.record.gi.current);
      await assertIdentical(a2, b, model, `seed ${seed}`);
    } finally {
      if (!crashedNodes.has(a)) await stopNode(a);
      if (a2) await stopNode(a2);
      await stopNode(b);
    }
  });
}

/* ------------------------------------------------------------------ (b) */

test('(b) failover: the Primary dies, the Secondary is promoted and writes on; the old Primary comes back as SyncTarget and ends identical', async () => {
  const rand = mulberry32(42);
  const port = await freePort();
  const faulty = new FaultyDevice(await newDisk(SIZE, 'alpha'), { writeBack: true, random: mulberry32(4242) });
  const disk = new Crashable(faulty);
  const a = await startNode('alpha', disk, port);
  const b = await startNode('bravo', await newDisk(SIZE, 'bravo'), port);
  let a2: Node | undefined;
  try {
    await initialSync(a, b);
    // Protocol C: an acknowledged write is on bravo's disk (a disk without a cache here): durable for the model.
    const model = new Model();
    for (let i = 0; i < 60; i++) {
      const { offset, data } = randomWrite(rand, 48 * MiB);
      await a.resource.write(offset, data);
      model.durable(offset, data);
      if (rand() < 0.1) await a.resource.flush();
    }
    for (let i = 0; i < 4; i++) {
      const { offset, data } = randomWrite(rand, 48 * MiB);
      model.volatile(offset, data);
      void Promise.resolve(a.resource.write(offset, data)).catch(() => undefined);
    }
    const oldGi = a.resource.record.gi.current;
    await crashNode(a, disk, faulty, 'random', mulberry32(99));
    await until('bravo sees alpha gone', () => b.resource.peer === undefined);
    assert.equal(b.resource.disk, 'UpToDate');
    // Failover: bravo was connected and UpToDate, so a plain promotion must work.
    await b.resource.promote(false);
    assert.equal(b.resource.role, 'Primary');
    for (let i = 0; i < 40; i++) {
      const { offset, data } = randomWrite(rand, 56 * MiB);
      await b.resource.write(offset, data);
      model.durable(offset, data);
    }
    await b.resource.writeZeroes(50 * MiB, 3 * MiB);
    model.durable(50 * MiB, Buffer.alloc(3 * MiB));
    await b.resource.flush();
    assert.notEqual(b.resource.record.gi.current, oldGi, 'bravo started a new generation writing alone');

    // The old Primary comes back, as Secondary.
    a2 = await startNode('alpha', faulty, port);
    const r = a2.resource;
    assert.equal(r.role, 'Secondary');
    assert.equal(r.crashedPrimary, true);
    const phases: string[] = [];
    const record = () => {
      const p = r.peer?.phase;
      if (p && phases.at(-1) !== p) phases.push(p);
    };
    r.on('changed', record);
    await settled(a2, b, 'alpha resynced from bravo');
    record();
    assert.ok(phases.includes('sync-target'), `alpha must be SyncTarget (phases seen: ${phases})`);
    assert.ok(!phases.includes('sync-source'), `alpha must never be SyncSource (phases seen: ${phases})`);
    assert.equal(b.resource.role, 'Primary');
    assert.equal(r.record.gi.current, b.resource.record.gi.current);
    assert.equal(r.crashedPrimary, false);
    await assertIdentical(a2, b, model, 'after failover');
    // And the new Primary keeps replicating to it (or, if a loaded machine dropped the link meanwhile, resyncs it).
    await b.resource.write(0, Buffer.alloc(4096, 0x5a));
    const got = Buffer.alloc(4096);
    await until('alpha has the new write', () => {
      void Promise.resolve(faulty.read(0, got)).catch(() => undefined);
      return got.equals(Buffer.alloc(4096, 0x5a));
    });
  } finally {
    if (!crashedNodes.has(a)) await stopNode(a);
    if (a2) await stopNode(a2);
    await stopNode(b);
  }
});

/* ------------------------------------------------------------------ (c) */

test('(c) a Secondary cut off while the Primary writes: on reconnect only the marked blocks travel', async () => {
  const rand = mulberry32(7);
  const { a, b } = await syncedPair(SIZE);
  try {
    const model = new Model();
    // Some replicated writes first, flushed, so nothing is pending when the link goes.
    for (let i = 0; i < 10; i++) {
      const { offset, data } = randomWrite(rand, SIZE - MiB);
      await a.resource.write(offset, data);
      model.durable(offset, data);
    }
    await a.resource.flush();
    await apart(a, b);
    assert.equal(a.resource.bitmap.count, 0, 'nothing was in flight or unflushed');
    const touched = new Set<number>();
    for (let i = 0; i < 50; i++) {
      const { offset, data } = randomWrite(rand, SIZE - MiB);
      await a.resource.write(offset, data, { fua: rand() < 0.1 });
      model.durable(offset, data);
      for (let blk = Math.floor(offset / BLOCK); blk < Math.ceil((offset + data.length) / BLOCK); blk++) touched.add(blk);
      if (rand() < 0.1) await a.resource.flush();
    }
    const marked = a.resource.bitmap.outOfSyncBytes;
    assert.equal(marked, touched.size * BLOCK, 'exactly the written blocks are marked');
    assert.equal(b.resource.bitmap.count, 0);
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await settled(a, b, 'resync of the marked blocks');
    const progress = a.resource.peer!.resync!.progress();
    assert.equal(progress.sentBytes, marked, 'only the marked blocks crossed the link');
    assert.equal(progress.doneBytes, marked);
    assert.equal(progress.totalBytes, marked);
    await assertIdentical(a, b, model, 'after the resync');
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

/* ------------------------------------------------- durability of the bitmap */

test('(d) an extent evicted from the activity log while disconnected: its out-of-sync bits survive a power cut', async () => {
  const port = await freePort();
  const faulty = new FaultyDevice(await newDisk(SIZE, 'alpha'), { writeBack: true });
  const disk = new Crashable(faulty);
  const options = { alSlots: 2 };
  const a = await startNode('alpha', disk, port, options);
  const b = await startNode('bravo', await newDisk(SIZE, 'bravo'), port, options);
  let a2: Node | undefined;
  try {
    await initialSync(a, b);
    await a.resource.flush();
    await apart(a, b);
    const model = new Model();
    // Written alone and flushed: durable here, not on bravo, marked in the (in-memory) bitmap.
    const x = Buffer.alloc(8192, 0x11);
    await a.resource.write(0, x);
    await a.resource.flush();
    model.durable(0, x);
    // Two more extents: extent 0 is evicted from the 2-slot log (its bitmap is written out first).
    const y = Buffer.alloc(4096, 0x22);
    const z = Buffer.alloc(4096, 0x33);
    await a.resource.write(E, y);
    await a.resource.write(2 * E, z);
    model.volatile(E, y);
    model.volatile(2 * E, z);
    assert.ok(!a.resource.al.hotExtents.includes(0), 'extent 0 left the activity log');
    await crashNode(a, disk, faulty, 'none', Math.random);
    a2 = await startNode('alpha', faulty, port, options);
    assert.ok(a2.resource.bitmap.isMarked(0), 'the block written while disconnected is still marked after the power cut');
    a2.resource.standAlone = false;
    b.resource.standAlone = false;
    await settled(a2, b, 'resync after the crash');
    await assertIdentical(a2, b, model, 'after the crash');
  } finally {
    if (!crashedNodes.has(a)) await stopNode(a);
    if (a2) await stopNode(a2);
    await stopNode(b);
  }
});

test('(e) a second power cut right after crash recovery: the recovered extents are still out of sync', async () => {
  const port = await freePort();
  const faulty = new FaultyDevice(await newDisk(SIZE, 'alpha'), { writeBack: true });
  const disk = new Crashable(faulty);
  const a = await startNode('alpha', disk, port);
  const b = await startNode('bravo', await newDisk(SIZE, 'bravo'), port);
  let a3: Node | undefined;
  try {
    await initialSync(a, b);
    await a.resource.flush();
    const model = new Model();
    // Acknowledged (protocol C: on bravo), not flushed on alpha: lost from alpha's cache by the power cut.
    const w = Buffer.alloc(64 * 1024, 0x77);
    await a.resource.write(5 * E + 4096, w);
    model.volatile(5 * E + 4096, w);
    await crashNode(a, disk, faulty, 'none', Math.random);
    await until('bravo sees alpha gone', () => b.resource.peer === undefined);
    // The machine boots, recovery runs (marks the hot extents, clears the Primary flag)...
    const disk2 = new Crashable(faulty);
    b.resource.standAlone = true; // so the recovering node does not connect before dying again
    const r2 = await Resource.open(disk2, { ...a.resource.options, node: 'alpha' });
    assert.equal(r2.crashedPrimary, true);
    assert.ok(r2.bitmap.isMarked((5 * E) / BLOCK));
    // ...and the power goes again before anything else happens.
    disk2.crash();
    await ticks();
    await faulty.powerCut({ keep: 'none' });
    faulty.powerOn();
    b.resource.standAlone = false;
    a3 = await startNode('alpha', faulty, port);
    assert.ok(a3.resource.crashedPrimary || a3.resource.bitmap.isMarked((5 * E) / BLOCK), 'the hot extent of the crashed Primary is no longer marked: it will never be resynced');
    await settled(a3, b, 'resync after the second boot');
    await assertIdentical(a3, b, model, 'after two crashes');
  } finally {
    if (!crashedNodes.has(a)) await stopNode(a);
    if (a3) await stopNode(a3);
    await stopNode(b);
  }
});

/* ------------------------------------------- the target's bitmap write-back */

/** Crashes its machine right after the n-th write into the bitmap area once armed (a write-back has begun). */
class CrashInBitmapWriteBack extends Crashable {
  /** Bitmap-area writes to let through before the one that crashes (0: not armed). */
  armed = 0;
  onBitmapWrite: (() => void) | undefined;
  constructor(
    inner: FaultyDevice,
    private readonly area: { from: number; to: number },
  ) {
    super(inner);
  }
  override write(offset: number, data: Buffer, options?: WriteOptions) {
    return this.watch(offset, super.write(offset, data, options));
  }
  override writeZeroes(offset: number, length: number, options?: ZeroOptions) {
    return this.watch(offset, super.writeZeroes(offset, length, options));
  }
  private watch<T>(offset: number, r: T): T {
    if (this.armed > 0 && offset >= this.area.from && offset < this.area.to && --this.armed === 0) {
      const hook = this.onBitmapWrite;
      void Promise.resolve(r).then(() => hook?.());
    }
    return r;
  }
}

for (const seed of [11, 12, 13, 14, 15, 16]) {
  test(`(f) a power cut on the sync target while it writes back its bitmap (seed ${seed}): every block clear on its disk holds the source's data`, async () => {
    const rand = mulberry32(seed);
    const port = await freePort();
    const { layoutFor } = await import('../../src/replication/meta.js');
    const layout = layoutFor(SIZE);
    const faulty = new FaultyDevice(await newDisk(SIZE, 'bravo'), { writeBack: true, random: mulberry32(seed * 13) });
    const disk = new CrashInBitmapWriteBack(faulty, { from: layout.bitmapOffset, to: layout.recordOffset });
    const a = await startNode('alpha', await newDisk(SIZE, 'alpha'), port);
    const b = await startNode('bravo', disk, port);
    let b2: Node | undefined;
    try {
      await initialSync(a, b);
      await apart(a, b);
      for (let i = 0; i < 60; i++) {
        const { offset, data } = randomWrite(rand, SIZE - MiB);
        await a.resource.write(offset, data);
      }
      const resyncSet = [...a.resource.bitmap.runs()];
      // The resync runs with nothing flushed on bravo's side until its bitmap write-back at the end.
      const crashed = new Promise<void>((resolve) => {
        disk.onBitmapWrite = () => void crashNode(b, disk, faulty, 'random', mulberry32(seed * 31)).then(resolve);
      });
      // The first write-back says what is out of sync before the resync starts; the second is at its end.
      disk.armed = 2;
      b.resource.standAlone = false;
      a.resource.standAlone = false;
      await Promise.race([crashed, until('resync over', () => upToDate(a, b), 15_000)]);
      assert.ok(crashedNodes.has(b), 'the crash happened during a bitmap write-back');
      await until('alpha sees bravo gone', () => a.resource.peer === undefined);
      a.resource.standAlone = true;
      // Back up on what survived: whatever its bitmap on disk says is in sync must be.
      b2 = await startNode('bravo', faulty, port);
      b2.resource.standAlone = true;
      const source = await readAll(a.disk, a.resource.size);
      const target = await readAll(faulty, a.resource.size);
      let wrong = 0;
      for (const run of resyncSet) {
        for (let at = run.offset; at < run.offset + run.length; at += BLOCK) {
          if (b2.resource.bitmap.isMarked(at / BLOCK)) continue;
          if (!source.subarray(at, at + BLOCK).equals(target.subarray(at, at + BLOCK))) wrong++;
        }
      }
      assert.equal(wrong, 0, `${wrong} blocks are clear in bravo's bitmap but do not hold alpha's data`);
      // And the resync completes from there.
      b2.resource.standAlone = false;
      a.resource.standAlone = false;
      await settled(a, b2, 'resync after the cut');
      assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(faulty, a.resource.size)));
    } finally {
      await stopNode(a);
      if (!crashedNodes.has(b)) await stopNode(b);
      if (b2) await stopNode(b2);
    }
  });
}
