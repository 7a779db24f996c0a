/**
 * The activity log: the set of "hot" extents (4 MiB each) a Primary may be
 * writing to, kept on disk so that after a crash of the Primary only those
 * extents need a resync, not the whole device (DRBD's activity log).
 *
 * Before a write touches an extent that is not in the set, a transaction
 * page listing the whole new set is written (FUA) to the next slot of a ring
 * of pages; recovery takes the valid page with the highest sequence number.
 * A torn page fails its checksum and the previous one stands, which lists a
 * set that still covers every write acknowledged before the tear.
 *
 * The set is bounded (`slots`); when full, the least recently used extent
 * without writes in flight is evicted, and `beforeEvict` runs first, so the
 * out-of-sync bitmap covering it reaches the disk before the log forgets it;
 * then the disk is flushed, so the writes made in it are durable before the
 * page that forgets it is (else a power cut could lose them here while the
 * peer has them, and nothing would say the extent differs).
 *
 * Page: "DUETAL01" | u64 seq | u32 count | u32 crc32 | u32 extent[count]
 */
import { crc32 } from 'node:zlib';
import { BlockDeviceError, type BlockDevice } from '../blockdev/types.js';
import { Clock, realClock } from '../util/clock.js';

export const AL_EXTENT_BYTES = 4 * 1024 * 1024;
const PAGE = 4096;
const MAGIC = Buffer.from('DUETAL01');
const HEADER = 24;
/** Extents one page can list. */
export const AL_SLOTS_MAX = (PAGE - HEADER) / 4;

export interface ActivityLogOptions {
  /** Extents kept hot (default and maximum AL_SLOTS_MAX: ~4 GiB of hot data). */
  slots?: number;
  /** Runs before an extent leaves the log (write back the bitmap pages covering it). */
  beforeEvict?: (extents: number[]) => Promise<void>;
  /** Timers (the real clock unless a simulation runs). */
  clock?: Clock;
}

export class ActivityLog {
  /** Extent -> writes in flight; Map order is LRU order (oldest first). */
  private readonly active = new Map<number, number>();
  /**
   * Extents chosen to leave the log while the bitmap pages covering them are written back: a write on
   * one waits for that transaction, then makes it hot again (DRBD locks the extents it evicts). Its marks
   * would otherwise come after the pages taken, and a crash right after the eviction would lose them.
   */
  private readonly leaving = new Set<number>();
  private seq = 0;
  private readonly slots: number;
  private readonly pages: number;
  /** One transaction at a time; writers wanting new extents queue behind it. */
  private txn: Promise<void> = Promise.resolve();
  transactions = 0;
  /** Why the disk was detached: nothing more is written to it (see detach). */
  private detachedWhy: string | undefined;

  private constructor(
    private readonly device: BlockDevice,
    private readonly offset: number,
    bytes: number,
    private readonly options: ActivityLogOptions,
  ) {
    this.pages = Math.floor(bytes / PAGE);
    if (this.pages < 2) throw new Error('activity log area must hold at least two pages');
    this.slots = Math.min(options.slots ?? AL_SLOTS_MAX, AL_SLOTS_MAX);
  }

  /** Open the log in `[offset, offset+bytes)`: the extents of the newest valid transaction are hot. */
  static async open(device: BlockDevice, offset: number, bytes: number, options: ActivityLogOptions = {}): Promise<{ log: ActivityLog; recovered: number[] }> {
    const log = new ActivityLog(device, offset, bytes, options);
    const area = Buffer.alloc(log.pages * PAGE);
    await device.read(offset, area);
    let best: { seq: number; extents: number[] } | undefined;
    for (let p = 0; p < log.pages; p++) {
      const t = decodePage(area.subarray(p * PAGE, (p + 1) * PAGE));
      if (t && (!best || t.seq > best.seq)) best = t;
    }
    log.seq = best?.seq ?? 0;
    return { log, recovered: best?.extents ?? [] };
  }

  /** Wipe the area (a new disk): no extent is hot. */
  static async format(device: BlockDevice, offset: number, bytes: number): Promise<void> {
    await device.write(offset, Buffer.alloc(Math.floor(bytes / PAGE) * PAGE), { fua: true });
  }

  get hotExtents(): number[] {
    return [...this.active.keys()];
  }

  /**
   * Make the extents of [offset, offset+length) hot and count a write in
   * flight on each; resolves once the log on disk covers them. Pair with end().
   */
  begin(offset: number, length: number): void | Promise<void> {
    const first = Math.floor(offset / AL_EXTENT_BYTES);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / AL_EXTENT_BYTES);
    for (let e = first; e <= last; e++) {
      // An extent is in `active` only once a transaction listing it is on disk.
      if (!this.active.has(e) || this.leaving.has(e)) return this.activate(first, last);
    }
    for (let e = first; e <= last; e++) {
      const n = this.active.get(e)!;
      // Refresh the LRU position.
      this.active.delete(e);
      this.active.set(e, n + 1);
    }
  }

  end(offset: number, length: number): void {
    const first = Math.floor(offset / AL_EXTENT_BYTES);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / AL_EXTENT_BYTES);
    for (let e = first; e <= last; e++) {
      const n = this.active.get(e);
      if (n !== undefined && n > 0) this.active.set(e, n - 1);
    }
  }

  /**
   * Make extents first..last hot (one transaction at a time), then count
   * this write on all of them. The writer holds no count while it waits, so
   * writers waiting for room can never hold each other's slots.
   */
  private activate(first: number, last: number): Promise<void> {
    const wanted: number[] = [];
    for (let e = first; e <= last; e++) wanted.push(e);
    if (wanted.length > this.slots) return Promise.reject(new Error(`a write spans ${wanted.length} activity log extents, more than the ${this.slots} slots`));
    const run = this.txn.then(async () => {
      for (;;) {
        const need = wanted.filter((e) => !this.active.has(e));
        if (need.length === 0) break;
        const evict: number[] = [];
        let room = this.slots - this.active.size;
        for (const [e, n] of this.active) {
          if (room >= need.length) break;
          if (n === 0 && !wanted.includes(e)) {
            evict.push(e);
            room++;
          }
        }
        if (room < need.length) {
          // Every slot has writes in flight: wait for some to end (in-flight writes are bounded).
          await new Promise<void>((r) => (this.options.clock ?? realClock).setTimeout(r, 1));
          continue;
        }
        if (evict.length > 0) {
          for (const e of evict) this.leaving.add(e);
          try {
            await this.options.beforeEvict?.(evict);
            // What was written in them must be durable before the page that forgets them is.
            await this.device.flush();
          } catch (err) {
            for (const e of evict) this.leaving.delete(e);
            throw err;
          }
        }
        for (const e of evict) this.leaving.delete(e);
        // Out of the in-memory set before the page is written (a write on them now waits for a
        // transaction of its own); the page on disk still lists them until the new one lands.
        for (const e of evict) this.active.delete(e);
        await this.writeTransaction([...this.active.keys(), ...need]);
        for (const e of need) this.active.set(e, 0);
        break;
      }
      for (const e of wanted) {
        const n = this.active.get(e) ?? 0;
        this.active.delete(e);
        this.active.set(e, n + 1);
      }
    });
    this.txn = run.catch(() => undefined);
    return run;
  }

  /**
   * The disk failed and was detached: no page goes to it any more. The hot
   * extents its log lists now are what a restart on it recovers (their marks
   * may never have reached its bitmap): a page that forgot them, written by
   * a demotion or a close after the failure, would lose them for good.
   */
  detach(why: string): void {
    this.detachedWhy = why;
  }

  /** Record a set of hot extents (the current one by default); the set counts only once this resolves. */
  async writeTransaction(extents: number[] = [...this.active.keys()]): Promise<void> {
    if (this.detachedWhy !== undefined) throw new BlockDeviceError('EIO', `activity log: the disk was detached (${this.detachedWhy})`);
    this.seq++;
    this.transactions++;
    const page = Buffer.alloc(PAGE);
    MAGIC.copy(page, 0);
    page.writeBigUInt64LE(BigInt(this.seq), 8);
    page.writeUInt32LE(extents.length, 16);
    extents.forEach((e, i) => page.writeUInt32LE(e, HEADER + i * 4));
    page.writeUInt32LE(crc32(page.subarray(HEADER, HEADER + extents.length * 4), crc32(page.subarray(0, 20))), 20);
    await this.device.write(this.offset + (this.seq % this.pages) * PAGE, page, { fua: true });
  }

  /** Forget every idle extent (clean shutdown or demotion: nothing is in flight). */
  clear(): Promise<void> {
    // In the transaction chain, as an eviction: a write diverted to `activate` meanwhile runs after it.
    const run = this.txn.then(async () => {
      const idle = [...this.active].filter(([, n]) => n === 0).map(([e]) => e);
      // Leaving, as in an eviction: a write on one waits for this transaction, then makes it hot again.
      for (const e of idle) this.leaving.add(e);
      try {
        if (idle.length > 0) {
          await this.options.beforeEvict?.(idle);
          await this.device.flush();
        }
        for (const e of idle) this.active.delete(e);
        await this.writeTransaction();
      } finally {
        for (const e of idle) this.leaving.delete(e);
      }
    });
    this.txn = run.catch(() => undefined);
    return run;
  }
}

function decodePage(page: Buffer): { seq: number; extents: number[] } | undefined {
  if (!page.subarray(0, 8).equals(MAGIC)) return undefined;
  const count = page.readUInt32LE(16);
  if (count > AL_SLOTS_MAX) return undefined;
  if (crc32(page.subarray(HEADER, HEADER + count * 4), crc32(page.subarray(0, 20))) !== page.readUInt32LE(20)) return undefined;
  const extents: number[] = [];
  for (let i = 0; i < count; i++) extents.push(page.readUInt32LE(HEADER + i * 4));
  return { seq: Number(page.readBigUInt64LE(8)), extents };
}
