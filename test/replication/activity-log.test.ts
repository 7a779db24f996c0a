/**
 * Unit tests of the activity log: which extents are hot, when a transaction
 * page is written (and that it is FUA), LRU eviction with beforeEvict first,
 * recovery of the newest valid transaction, torn pages, power cuts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ActivityLog, AL_EXTENT_BYTES, AL_SLOTS_MAX } from '../../src/replication/activity-log.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { DelegatingDevice } from '../../src/blockdev/delegating.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import type { BlockDevice, WriteOptions } from '../../src/blockdev/types.js';

const PAGE = 4096;
/** The log lives at AL_OFFSET..AL_OFFSET+AL_BYTES of a small device (4 pages: the ring wraps often). */
const AL_OFFSET = 8192;
const AL_PAGES = 4;
const AL_BYTES = AL_PAGES * PAGE;
const DEV_BYTES = 64 * 1024;
const E = AL_EXTENT_BYTES;

interface WriteRecord {
  offset: number;
  length: number;
  fua: boolean;
  data: Buffer;
}

/**
 * A memory device that records writes, can hold them at a gate (a slow
 * disk), and can tear the next write to the log area: part of the page
 * lands and the write never completes (the machine died during it).
 */
class ProbeDevice extends DelegatingDevice<MemoryDevice> {
  /** Writes that completed, in order. */
  readonly writes: WriteRecord[] = [];
  /** Writes started (including held ones). */
  started = 0;
  private gate: Promise<void> | undefined;
  /** When set, the next write is torn with this function (what lands) and hangs forever. */
  tearNext: ((fresh: Buffer, old: Buffer) => Buffer) | undefined;

  constructor(size = DEV_BYTES) {
    super(new MemoryDevice(size, 'probe'));
  }
  /** Hold every write from now on until the returned function is called. */
  hold(): () => void {
    let release!: () => void;
    this.gate = new Promise<void>((r) => (release = r));
    return () => {
      this.gate = undefined;
      release();
    };
  }
  override async write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    this.started++;
    while (this.gate) await this.gate;
    if (this.tearNext) {
      const tear = this.tearNext;
      this.tearNext = undefined;
      const old = Buffer.alloc(data.length);
      this.inner.read(offset, old);
      this.inner.write(offset, tear(Buffer.from(data), old));
      return new Promise<void>(() => undefined);
    }
    this.inner.write(offset, data);
    this.writes.push({ offset, length: data.length, fua: options?.fua === true, data: Buffer.from(data) });
  }
  override close(): void {}
}

/** Decode a transaction page the way the format documents it (test-local: checks the on-disk format too). */
function pageExtents(page: Buffer): number[] {
  assert.equal(page.subarray(0, 8).toString(), 'DUETAL01');
  const count = page.readUInt32LE(16);
  const out: number[] = [];
  for (let i = 0; i < count; i++) out.push(page.readUInt32LE(24 + i * 4));
  return out;
}

function sorted(xs: Iterable<number>): number[] {
  return [...xs].sort((a, b) => a - b);
}

async function fresh(options: { slots?: number; beforeEvict?: (extents: number[]) => Promise<void> } = {}, dev: BlockDevice = new ProbeDevice()) {
  await ActivityLog.format(dev, AL_OFFSET, AL_BYTES);
  const { log, recovered } = await ActivityLog.open(dev, AL_OFFSET, AL_BYTES, options);
  assert.deepEqual(recovered, [], 'a formatted log has nothing hot');
  return log;
}

async function recover(dev: BlockDevice): Promise<number[]> {
  return sorted((await ActivityLog.open(dev, AL_OFFSET, AL_BYTES)).recovered);
}

function isPromise(x: unknown): x is Promise<void> {
  return x instanceof Promise;
}

/** Has the promise settled within a few macrotask turns? */
async function settledSoon(p: Promise<unknown>, ms = 20): Promise<boolean> {
  let done = false;
  p.then(
    () => (done = true),
    () => (done = true),
  );
  await new Promise((r) => setTimeout(r, ms));
  return done;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/* ------------------------------------------------------------------ tests */

test('begin makes the extents of a range hot (once its page is on disk); end keeps them hot', async () => {
  const dev = new ProbeDevice();
  const log = await fresh({}, dev);
  const p = log.begin(100, 4096);
  assert.ok(isPromise(p), 'a new extent needs a transaction');
  assert.deepEqual(await recover(dev), [], 'nothing on disk before the transaction ran');
  await p;
  assert.deepEqual(log.hotExtents, [0]);
  assert.deepEqual(await recover(dev), [0]);
  // A range straddling three extents: 1, 2, 3.
  await log.begin(2 * E - 1, E + 2);
  assert.deepEqual(sorted(log.hotExtents), [0, 1, 2, 3]);
  assert.deepEqual(await recover(dev), [0, 1, 2, 3]);
  // A zero-length request still counts as touching its extent.
  await log.begin(7 * E, 0);
  assert.deepEqual(sorted(log.hotExtents), [0, 1, 2, 3, 7]);
  log.end(100, 4096);
  log.end(2 * E - 1, E + 2);
  log.end(7 * E, 0);
  assert.deepEqual(sorted(log.hotExtents), [0, 1, 2, 3, 7], 'idle extents stay hot until evicted');
  assert.deepEqual(await recover(dev), [0, 1, 2, 3, 7]);
  // end() on an extent never begun is harmless.
  log.end(40 * E, 1);
  assert.deepEqual(sorted(log.hotExtents), [0, 1, 2, 3, 7]);
});

test('a transaction page is written (FUA, in the log area) only when a new extent becomes hot', async () => {
  const dev = new ProbeDevice();
  const log = await fresh({}, dev);
  const base = dev.writes.length;
  await log.begin(0, 512);
  assert.equal(dev.writes.length, base + 1);
  assert.equal(log.transactions, 1);
  // Writes within hot extents: no page, and begin completes synchronously.
  for (let i = 0; i < 50; i++) {
    const r = log.begin((i * 7919 * 512) % E, 512 * (1 + (i % 8)));
    assert.equal(r, undefined, 'a hot extent needs no transaction');
    if (i % 3 === 0) log.end((i * 7919 * 512) % E, 512 * (1 + (i % 8)));
  }
  assert.equal(dev.writes.length, base + 1);
  assert.equal(log.transactions, 1);
  await log.begin(5 * E + 4096, 4096);
  await log.begin(5 * E, 8192);
  assert.equal(dev.writes.length, base + 2);
  assert.equal(log.transactions, 2);
  for (const w of dev.writes.slice(base)) {
    assert.equal(w.fua, true, 'transaction pages are written FUA');
    assert.equal(w.length, PAGE);
    assert.ok(w.offset >= AL_OFFSET && w.offset + w.length <= AL_OFFSET + AL_BYTES, 'inside the log area');
    assert.equal((w.offset - AL_OFFSET) % PAGE, 0);
  }
  assert.deepEqual(pageExtents(dev.writes[base + 1].data).sort(), [0, 5]);
  // Consecutive transactions go to consecutive pages of the ring.
  assert.equal(dev.writes[base + 1].offset - dev.writes[base].offset, PAGE);
});

test('LRU eviction: the least recently used idle extent goes, beforeEvict runs first, busy extents stay', async () => {
  const dev = new ProbeDevice();
  const calls: { extents: number[]; onDisk: number[]; writesDone: number }[] = [];
  const log = await fresh(
    {
      slots: 3,
      beforeEvict: async (extents) => {
        // While beforeEvict runs, the log on disk must still list the extents leaving it.
        calls.push({ extents: [...extents], onDisk: await recover(dev), writesDone: dev.writes.length });
      },
    },
    dev,
  );
  const use = async (e: number, keepBusy = false) => {
    await log.begin(e * E, 4096);
    if (!keepBusy) log.end(e * E, 4096);
  };
  await use(0);
  await use(1);
  await use(2);
  assert.equal(calls.length, 0, 'no eviction while there is room');
  // Touch 0 again and keep it busy: LRU order is now 1, 2, 0.
  await use(0, true);
  let writes = dev.writes.length;
  await use(3);
  assert.deepEqual(calls.at(-1)!.extents, [1], 'the least recently used idle extent');
  assert.deepEqual(calls.at(-1)!.onDisk, [0, 1, 2], 'beforeEvict ran before the page dropping it');
  assert.equal(calls.at(-1)!.writesDone, writes, 'no page written before beforeEvict');
  assert.deepEqual(sorted(log.hotExtents), [0, 2, 3]);
  assert.deepEqual(await recover(dev), [0, 2, 3]);
  // Order now 2, 0 (busy), 3. Next goes 2.
  await use(4);
  assert.deepEqual(calls.at(-1)!.extents, [2]);
  assert.deepEqual(sorted(log.hotExtents), [0, 3, 4]);
  // 0 is still busy: 3 goes even though 0 is older.
  await use(5);
  assert.deepEqual(calls.at(-1)!.extents, [3]);
  assert.deepEqual(sorted(log.hotExtents), [0, 4, 5]);
  log.end(0, 4096);
  // A write spanning two new extents evicts two at once, in one call: 0 and 4 (the oldest idle).
  writes = dev.writes.length;
  await log.begin(7 * E - 1, 2);
  assert.deepEqual(calls.at(-1)!.extents, [0, 4]);
  assert.equal(dev.writes.length, writes + 1, 'one transaction for both');
  assert.deepEqual(sorted(log.hotExtents), [5, 6, 7]);
  assert.deepEqual(await recover(dev), [5, 6, 7]);
  assert.equal(calls.length, 4);
});

test('a write that begins and ends on an extent while beforeEvict runs for it keeps the extent hot: its bitmap mark came after the write-back (sim seed 4908)', async () => {
  const dev = new ProbeDevice();
  let during: (() => void) | undefined;
  const evicted: number[][] = [];
  const log = await fresh(
    {
      slots: 2,
      beforeEvict: async (extents) => {
        evicted.push([...extents]);
        // The write-back of the bitmap takes its pages here; a write on the leaving extent runs meanwhile.
        during?.();
        during = undefined;
      },
    },
    dev,
  );
  await log.begin(0, 1);
  log.end(0, 1);
  await log.begin(E, 1);
  log.end(E, 1);
  let late: Promise<void> | undefined;
  during = () => {
    // Extent 0 is leaving: a write on it does not take it at once (its marks would come after the pages
    // written back); it waits for the eviction, then makes extent 0 hot again before it lands.
    const b = log.begin(0, 1);
    assert.ok(isPromise(b), 'a write on a leaving extent waits for the eviction (DRBD locks the extents it evicts)');
    late = b.then(() => log.end(0, 1));
  };
  await log.begin(2 * E, 1);
  await late;
  assert.ok(log.hotExtents.includes(0), `extent 0 was written after the write-back began: it must be in the log again (hot: ${sorted(log.hotExtents)}; evictions ${JSON.stringify(evicted)})`);
  assert.ok((await recover(dev)).includes(0), 'and on disk');
  assert.deepEqual(sorted(log.hotExtents), [0, 2]);
});

test('a write spanning more extents than the log has slots is refused', async () => {
  const log = await fresh({ slots: 2 });
  await assert.rejects(Promise.resolve(log.begin(0, 3 * E)), /spans 3 activity log extents, more than the 2 slots/);
  // The log is still usable.
  await log.begin(0, 2 * E);
  assert.deepEqual(sorted(log.hotExtents), [0, 1]);
  assert.equal(AL_SLOTS_MAX, (PAGE - 24) / 4);
});

test('every slot busy: a new extent waits until a write ends, then takes the freed slot', async () => {
  const dev = new ProbeDevice();
  const evicted: number[][] = [];
  const log = await fresh({ slots: 2, beforeEvict: async (x) => void evicted.push(x) }, dev);
  await log.begin(0, 1);
  await log.begin(E, 1);
  const p = log.begin(2 * E, 1);
  assert.ok(isPromise(p));
  assert.equal(await settledSoon(p, 30), false, 'must wait: both slots have writes in flight');
  assert.deepEqual(sorted(log.hotExtents), [0, 1]);
  log.end(E, 1);
  await p;
  assert.deepEqual(evicted, [[1]]);
  assert.deepEqual(sorted(log.hotExtents), [0, 2]);
  assert.deepEqual(await recover(dev), [0, 2]);
});

test('beforeEvict failing: begin rejects, nothing is evicted, no page is written', async () => {
  const dev = new ProbeDevice();
  let fail = true;
  const log = await fresh(
    {
      slots: 1,
      beforeEvict: async () => {
        if (fail) throw new Error('bitmap write failed');
      },
    },
    dev,
  );
  await log.begin(0, 1);
  log.end(0, 1);
  const writes = dev.writes.length;
  await assert.rejects(Promise.resolve(log.begin(E, 1)), /bitmap write failed/);
  assert.equal(dev.writes.length, writes);
  assert.deepEqual(log.hotExtents, [0]);
  assert.deepEqual(await recover(dev), [0]);
  // The queue is not stuck after a failure.
  fail = false;
  await log.begin(E, 1);
  assert.deepEqual(log.hotExtents, [1]);
  assert.deepEqual(await recover(dev), [1]);
});

test('clear() forgets idle extents (beforeEvict first) and keeps the busy ones', async () => {
  const dev = new ProbeDevice();
  const evicted: number[][] = [];
  const log = await fresh({ beforeEvict: async (x) => void evicted.push(sorted(x)) }, dev);
  await log.begin(0, 1);
  await log.begin(3 * E, 1);
  await log.begin(9 * E, 1);
  log.end(0, 1);
  log.end(9 * E, 1);
  await log.clear();
  assert.deepEqual(evicted, [[0, 9]]);
  assert.deepEqual(log.hotExtents, [3]);
  assert.deepEqual(await recover(dev), [3]);
  log.end(3 * E, 1);
  await log.clear();
  assert.deepEqual(await recover(dev), []);
});

test('reopen recovers exactly the hot set of the newest transaction (random workloads, the ring wraps)', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 6 }),
      fc.array(
        fc.oneof(
          fc.record({ op: fc.constant('begin' as const), extent: fc.integer({ min: 0, max: 12 }), span: fc.integer({ min: 1, max: 2 }) }),
          fc.record({ op: fc.constant('end' as const), pick: fc.nat() }),
          fc.record({ op: fc.constant('clear' as const) }),
          fc.record({ op: fc.constant('reopen' as const) }),
        ),
        { maxLength: 60 },
      ),
      async (slots, ops) => {
        const dev = new ProbeDevice();
        const evictions: number[][] = [];
        const options = { slots, beforeEvict: async (x: number[]) => void evictions.push(x) };
        let log = await fresh(options, dev);
        let inFlight: [number, number][] = [];
        /** What the newest page on disk lists: the log's set after its last transaction, or what a reopen recovered. */
        let onDisk: number[] = [];
        for (const o of ops) {
          const txnsBefore = log.transactions;
          const logBefore = log;
          if (o.op === 'begin') {
            const span = Math.min(o.span, slots);
            // Only start a write that can get its slots (else it would wait forever in this sequential test).
            const busy = new Set(inFlight.flatMap(([off, len]) => [Math.floor(off / E), Math.floor((off + len - 1) / E)]));
            const wanted = new Set([o.extent, o.extent + span - 1]);
            const newBusy = [...wanted].filter((e) => !busy.has(e)).length;
            if (busy.size + newBusy > slots) continue;
            const off = o.extent * E + (span > 1 ? E - 512 : 0);
            const len = span > 1 ? 1024 : 4096;
            await log.begin(off, len);
            inFlight.push([off, len]);
          } else if (o.op === 'end') {
            if (inFlight.length === 0) continue;
            const [w] = inFlight.splice(o.pick % inFlight.length, 1);
            log.end(w[0], w[1]);
          } else if (o.op === 'clear') {
            await log.clear();
          } else {
            // A restart: what is on disk is the truth; the new log starts with nothing in flight.
            const expected = onDisk;
            const { log: l2, recovered } = await ActivityLog.open(dev, AL_OFFSET, AL_BYTES, options);
            assert.deepEqual(sorted(recovered), expected);
            log = l2;
            inFlight = [];
            onDisk = expected;
            assert.deepEqual(log.hotExtents, [], 'a reopened log starts with nothing hot in memory');
          }
          assert.ok(log.hotExtents.length <= slots);
          for (const [off, len] of inFlight) {
            for (let e = Math.floor(off / E); e <= Math.floor((off + len - 1) / E); e++) assert.ok(log.hotExtents.includes(e), `busy extent ${e} must be hot`);
          }
          if (log === logBefore && log.transactions !== txnsBefore) onDisk = sorted(log.hotExtents);
          assert.deepEqual(await recover(dev), onDisk);
        }
      },
    ),
    { numRuns: 60 },
  );
});

test('a torn or corrupt newest page: recovery falls back to the previous page, which covers every acknowledged write', async () => {
  // Deterministic cases first: the newest page overwritten with garbage, zeros, or one flipped bit.
  const damage: [string, (page: Buffer) => void][] = [
    ['garbage', (p) => p.set(Buffer.from(Array.from({ length: PAGE }, (_, i) => (i * 131 + 7) & 0xff)))],
    ['zeros', (p) => p.fill(0)],
    ['a flipped bit in the extent list', (p) => (p[25] ^= 0x10)],
    ['a flipped bit in the sequence number', (p) => (p[8] ^= 0x01)],
  ];
  for (const [what, spoil] of damage) {
    const dev = new ProbeDevice();
    const log = await fresh({}, dev);
    for (const e of [0, 3, 5]) {
      await log.begin(e * E, 4096);
      log.end(e * E, 4096);
    }
    // Acknowledged so far: 0, 3, 5. The newest page adds 8.
    await log.begin(8 * E, 4096);
    const newest = dev.writes.at(-1)!;
    const page = Buffer.alloc(PAGE);
    dev.inner.read(newest.offset, page);
    spoil(page);
    dev.inner.write(newest.offset, page);
    assert.deepEqual(await recover(dev), [0, 3, 5], what);
    // The log goes on from there: the next transaction lands and is the newest.
    const { log: l2 } = await ActivityLog.open(dev, AL_OFFSET, AL_BYTES);
    await l2.begin(11 * E, 1);
    assert.deepEqual(await recover(dev), [11], `${what}: a transaction after recovery wins`);
  }
});

test('a crash in the middle of a transaction write (random tears): recovery covers every acknowledged, not-evicted extent', async () => {
  const tears: ((fresh: Buffer, old: Buffer, k: number) => Buffer)[] = [
    // First k sectors of the new page, the rest old.
    (f, o, k) => Buffer.concat([f.subarray(0, k * 512), o.subarray(k * 512)]),
    // Last sectors new, first old.
    (f, o, k) => Buffer.concat([o.subarray(0, k * 512), f.subarray(k * 512)]),
    // Garbage.
    (f, _o, k) => Buffer.alloc(f.length, (k * 37) & 0xff),
  ];
  let crashes = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 5 }),
      fc.array(fc.record({ extent: fc.integer({ min: 0, max: 10 }), end: fc.boolean() }), { minLength: 1, maxLength: 40 }),
      fc.nat(),
      fc.integer({ min: 0, max: tears.length - 1 }),
      fc.integer({ min: 1, max: 7 }),
      async (slots, ops, crashAtRaw, tearKind, k) => {
        const dev = new ProbeDevice();
        const pages = () => dev.writes.filter((w) => w.length === PAGE && w.offset >= AL_OFFSET && w.offset < AL_OFFSET + AL_BYTES);
        let clock = 0;
        const lastAck = new Map<number, number>();
        const lastEvict = new Map<number, number>();
        const evictCalls: { extents: number[]; pagesBefore: number }[] = [];
        const log = await fresh(
          {
            slots,
            beforeEvict: async (x) => {
              evictCalls.push({ extents: [...x], pagesBefore: pages().length });
              for (const e of x) lastEvict.set(e, ++clock);
            },
          },
          dev,
        );
        const busy = new Map<number, number>();
        const crashAt = crashAtRaw % ops.length;
        for (let i = 0; i < ops.length; i++) {
          const { extent, end } = ops[i];
          if (!busy.has(extent) && busy.size >= slots) continue; // would wait forever in this sequential test
          if (i >= crashAt && !log.hotExtents.includes(extent)) {
            crashes++;
            // This begin needs a transaction: the machine dies while its page is being written.
            dev.tearNext = (f, o) => tears[tearKind](f, o, k);
            const done = pages();
            const lastSet = done.length > 0 ? sorted(pageExtents(done.at(-1)!.data)) : [];
            const p = log.begin(extent * E, 4096);
            assert.ok(isPromise(p));
            assert.equal(await settledSoon(p, 2), false, 'the begin waiting for a torn page never acknowledges');
            const recovered = await recover(dev);
            const evictedNow = evictCalls.filter((c) => c.pagesBefore === done.length).flatMap((c) => c.extents);
            const tornSet = sorted(new Set([...lastSet.filter((e) => !evictedNow.includes(e)), extent]));
            // Either the torn page was rejected (the previous one stands), or all its meaningful bytes landed.
            assert.ok(
              JSON.stringify(recovered) === JSON.stringify(lastSet) || JSON.stringify(recovered) === JSON.stringify(tornSet),
              `recovered ${recovered} is neither the last complete set ${lastSet} nor the torn one ${tornSet}`,
            );
            for (const [e, at] of lastAck) {
              // Not covered by the log is fine only if beforeEvict wrote its bitmap after its last write.
              if ((lastEvict.get(e) ?? -1) > at) continue;
              assert.ok(recovered.includes(e), `extent ${e} had acknowledged writes but is not in the recovered set ${recovered}`);
            }
            for (const e of busy.keys()) assert.ok(recovered.includes(e), `extent ${e} has writes in flight but is not recovered`);
            return;
          }
          await log.begin(extent * E, 4096);
          lastAck.set(extent, ++clock);
          busy.set(extent, (busy.get(extent) ?? 0) + 1);
          if (end) {
            log.end(extent * E, 4096);
            const n = busy.get(extent)! - 1;
            if (n === 0) busy.delete(extent);
            else busy.set(extent, n);
          }
        }
      },
    ),
    { numRuns: 150 },
  );
  assert.ok(crashes > 50, `only ${crashes} runs reached a crash`);
});

test('power cut (write-back cache): the transaction pages survive, being FUA; unflushed data does not', async () => {
  for (const keep of ['none', 'random'] as const) {
    let seed = 12345;
    const random = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x80000000);
    const faulty = new FaultyDevice(new MemoryDevice(DEV_BYTES, 'disk'), { writeBack: true, random });
    // Old transactions on disk first, then format: the wipe itself is FUA and survives.
    {
      const { log } = await ActivityLog.open(faulty, AL_OFFSET, AL_BYTES);
      await log.begin(30 * E, 1);
      await ActivityLog.format(faulty, AL_OFFSET, AL_BYTES);
    }
    const { log, recovered } = await ActivityLog.open(faulty, AL_OFFSET, AL_BYTES, { slots: 3, beforeEvict: async () => undefined });
    assert.deepEqual(recovered, []);
    for (const e of [1, 2, 4, 6]) {
      await log.begin(e * E, 512);
      // Some data write of the application (not FUA) in between: volatile.
      await faulty.write(0, Buffer.alloc(512, e));
      log.end(e * E, 512);
    }
    assert.ok(faulty.unflushedWrites > 0, 'data writes are in the volatile cache');
    const expected = sorted(log.hotExtents);
    assert.deepEqual(expected, [2, 4, 6]);
    await faulty.powerCut({ keep });
    await assert.rejects(Promise.resolve(faulty.read(0, Buffer.alloc(1))), /no power/);
    faulty.powerOn();
    assert.deepEqual(await recover(faulty), expected, `keep=${keep}`);
    if (keep === 'none') {
      const data = Buffer.alloc(512);
      await faulty.read(0, data);
      // Extent 1 left the log before extent 6 came in, so the writes before it were flushed; the last one was not.
      assert.ok(data.equals(Buffer.alloc(512, 4)), 'the last data write, unflushed, was lost: the cut was real');
    }
  }
});

test('an extent leaves the log only once what was written in it is durable: a power cut after its eviction loses nothing the log forgot', async () => {
  for (const how of ['evict', 'clear'] as const) {
    // The log after three extents of data (a Primary's disk in miniature), on a disk with a volatile cache.
    const at = 3 * E;
    const faulty = new FaultyDevice(new MemoryDevice(at + AL_BYTES, 'disk'), { writeBack: true });
    await ActivityLog.format(faulty, at, AL_BYTES);
    const { log } = await ActivityLog.open(faulty, at, AL_BYTES, { slots: 2, beforeEvict: async () => undefined });
    await log.begin(0, 512);
    // Acknowledged to the writer (and, on a Primary, sent to the peer): in the disk's cache only.
    await faulty.write(0, Buffer.alloc(512, 7));
    log.end(0, 512);
    if (how === 'evict') {
      await log.begin(E, 512);
      log.end(E, 512);
      await log.begin(2 * E, 512);
    } else await log.clear();
    assert.ok(!log.hotExtents.includes(0), 'extent 0 left the log');
    await faulty.powerCut({ keep: 'none' });
    faulty.powerOn();
    const recovered = sorted((await ActivityLog.open(faulty, at, AL_BYTES)).recovered);
    const data = Buffer.alloc(512);
    await faulty.read(0, data);
    assert.ok(
      recovered.includes(0) || data.equals(Buffer.alloc(512, 7)),
      `${how}: the write to extent 0 is lost and the log does not list extent 0 (recovered ${recovered}): after a crash of the Primary it would never be resynced, though the peer has it`,
    );
  }
});

/* ---------------------------------------------------- ordering hazards */

test('a begin on an extent whose transaction page is still being written waits for that page', async () => {
  const dev = new ProbeDevice();
  const log = await fresh({}, dev);
  const release = dev.hold();
  const first = log.begin(0, 4096);
  assert.ok(isPromise(first));
  await sleep(5); // the transaction is now writing its page (held by the slow disk)
  assert.equal(dev.started, dev.writes.length + 1, 'the page write is in progress');
  const second = log.begin(8192, 4096);
  // The second writer must not go to disk before the page listing extent 0 is durable:
  // if the machine died now, its data could be on disk with the log not covering it.
  const safe = isPromise(second) && !(await settledSoon(second, 10));
  release();
  await first;
  if (isPromise(second)) await second;
  assert.ok(safe, 'begin() on an extent whose page is not yet on disk returned before the page was written');
});

test('an extent chosen for eviction that gets a new write while beforeEvict runs is not evicted', async () => {
  const dev = new ProbeDevice();
  const evictions: number[][] = [];
  let release!: () => void;
  let entered!: () => void;
  const inEvict = new Promise<void>((r) => (entered = r));
  const held = new Promise<void>((r) => (release = r));
  const log = await fresh(
    {
      slots: 2,
      beforeEvict: async (x) => {
        evictions.push([...x]);
        if (evictions.length === 1) {
          entered();
          await held; // the bitmap write-out takes a while
        }
      },
    },
    dev,
  );
  await log.begin(0, 1);
  log.end(0, 1);
  await log.begin(E, 1);
  log.end(E, 1);
  // Extent 2 needs a slot: 0 (least recently used, idle) is picked and beforeEvict starts...
  const p = log.begin(2 * E, 1);
  await inEvict;
  assert.deepEqual(evictions, [[0]]);
  // ...meanwhile a write to extent 0 arrives; 0 is still hot in the log, so it may go ahead.
  const w0 = log.begin(0, 512);
  release();
  await withTimeout(Promise.resolve(w0), 2000, 'the write to extent 0');
  await withTimeout(Promise.resolve(p), 2000, 'the begin on extent 2');
  // Extent 0 has a write in flight: it must still be hot, in memory and on disk.
  assert.ok(log.hotExtents.includes(0), `extent 0 has a write in flight but the log evicted it (hot: ${sorted(log.hotExtents)}, evicted: ${JSON.stringify(evictions)})`);
  assert.ok((await recover(dev)).includes(0), `extent 0 has a write in flight but the newest page on disk does not list it (${await recover(dev)})`);
  log.end(0, 512);
});

test('a transaction whose page write failed does not leave its extent hot (the next write retries the page)', async () => {
  const faulty = new FaultyDevice(new MemoryDevice(DEV_BYTES, 'disk'), { writeBack: false });
  const log = await fresh({}, faulty);
  faulty.failWith({ op: 'write', count: 1 });
  await assert.rejects(Promise.resolve(log.begin(0, 4096)), /injected EIO/);
  await withTimeout(Promise.resolve(log.begin(0, 4096)), 2000, 'the second begin');
  assert.deepEqual(await recover(faulty), [0], 'a write to extent 0 was let through but no page on disk lists extent 0');
});

test('writes that each hold one hot extent and wait for another do not deadlock the log', async () => {
  const log = await fresh({ slots: 2 });
  for (const e of [5, 7]) {
    await log.begin(e * E, 1);
    log.end(e * E, 1);
  }
  // Two writes straddling extent boundaries, issued together: W1 needs 4+5 (5 is hot), W2 needs 7+8 (7 is hot).
  // Only two slots: they cannot both be in the log at once, but one after the other they must both get through.
  const w1 = Promise.resolve(log.begin(5 * E - 512, 1024));
  const w2 = Promise.resolve(log.begin(8 * E - 512, 1024));
  let w1Done = false;
  try {
    await withTimeout(w1, 2000, 'W1 (extents 4 and 5)');
    w1Done = true;
    assert.deepEqual(sorted(log.hotExtents), [4, 5]);
    log.end(5 * E - 512, 1024);
    await withTimeout(w2, 2000, 'W2 (extents 7 and 8)');
    assert.deepEqual(sorted(log.hotExtents), [7, 8]);
    log.end(8 * E - 512, 1024);
  } finally {
    // Unstick a deadlocked log so its retry loop does not keep the process alive.
    for (let i = 0; i < 4; i++) {
      if (!w1Done) log.end(5 * E - 512, 1024);
      log.end(8 * E - 512, 1024);
    }
    await Promise.allSettled([withTimeout(w1, 1000, 'W1 after unsticking'), withTimeout(w2, 1000, 'W2 after unsticking')]);
    for (let i = 0; i < 4; i++) {
      log.end(5 * E - 512, 1024);
      log.end(8 * E - 512, 1024);
    }
  }
});

test('a write needing a new extent is not starved by short writes that keep touching the hot extents during each write-back', async () => {
  // Two slots, both extents written over and over by short writes (each begins and ends at once, so none
  // is in flight when the eviction checks). Before 8121e9a the eviction went ahead once the candidate was
  // idle; now any write that touched it since the choice sends the eviction back to choose again, and a
  // workload that touches every slot during every write-back keeps the waiting write out for good.
  let backs = 0;
  const log = await fresh({
    slots: 2,
    beforeEvict: async () => {
      backs++;
      // The bitmap write-back and the disk flush take a moment: the hot extents get a write meanwhile.
      await sleep(1);
    },
  });
  await log.begin(0, 1);
  log.end(0, 1);
  await log.begin(E, 1);
  log.end(E, 1);
  let stop = false;
  const hammer = (async () => {
    while (!stop) {
      for (const e of [0, 1]) {
        const b = log.begin(e * E, 1);
        if (b) await b;
        log.end(e * E, 1);
      }
      await new Promise((r) => setImmediate(r));
    }
  })();
  const third = log.begin(2 * E, 1);
  try {
    await withTimeout(Promise.resolve(third), 2000, 'the write to extent 2').catch((err: Error) => {
      throw new Error(`${err.message}: after ${backs} bitmap write-backs it still waits (each found a hot extent touched since its choice)`);
    });
    // Hot while its write is in flight (once it ends, the hammer's next extent may evict it: that is LRU).
    assert.ok(log.hotExtents.includes(2));
    log.end(2 * E, 1);
  } finally {
    stop = true;
    await hammer;
    await Promise.resolve(third).catch(() => undefined);
  }
});
