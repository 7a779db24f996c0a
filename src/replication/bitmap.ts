/**
 * The out-of-sync bitmap of a replicated resource: one bit per 4 KiB block
 * of the data area, set while a block was written here and not on the peer
 * (DRBD's quick-sync bitmap). After an outage only the set blocks travel.
 *
 * In memory it is a sparse array of 4 KiB pages of bits with a running
 * count: a page exists only while it holds a mark (or waits to be written
 * back), so a clean bitmap of a 16 TiB device costs almost nothing. On disk
 * it is an area of the backing device, written back page by page: only the
 * pages that changed since the last write-back are written.
 *
 * Block numbers go past 2^32 on devices above 16 TiB: every index is
 * computed with plain arithmetic (exact to 2^53); 32-bit operators are used
 * only within one page (32,768 bits).
 *
 * A page with every block marked is one shared, read-only page (copied
 * when a block of it is cleared): marking all of a 32 TiB device (2^33
 * blocks, 1 GiB of bits) costs a pass over its 262,144 page slots, not a
 * gigabyte of memory and seconds of the event loop, and walking it skips
 * whole pages. A write-back gives the event loop a turn between bounded
 * pieces (slice.ts).
 */
import type { BlockDevice } from '../blockdev/types.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '../blockdev/types.js';
import { Slicer, type SliceClock } from '../util/slice.js';

export const BLOCK = 4096;
const PAGE = 4096;
const WORDS_PER_PAGE = PAGE / 4;
const BITS_PER_PAGE = PAGE * 8;
/** Pages read at once when loading the bitmap. */
const READ_PAGES = 256;
/** How far one question about holes looks when loading (a clean bitmap of 32 TiB is 1 GiB of holes). */
const HOLE_QUERY_BYTES = 64 * 1024 * 1024;
/** The words of every page whose blocks are all marked: shared, never written to. */
const FULL_WORDS = new Uint32Array(WORDS_PER_PAGE).fill(0xffffffff);
/** Consecutive full pages go to disk this many at a time. */
const FULL_WRITE_PAGES = 256;
const FULL_BYTES = Buffer.alloc(FULL_WRITE_PAGES * PAGE, 0xff);
const FULL_PAGE = FULL_BYTES.subarray(0, PAGE);

/** Pages of a write-back: `count` pages from `page`, all clear (no bytes), all full, or one page's bytes. */
export interface PageRun {
  page: number;
  count: number;
  bytes: Buffer | undefined;
}

export class Bitmap {
  readonly bits: number;
  readonly pageCount: number;
  /** Page index -> its words (FULL_WORDS when all are marked), absent while the page is all clear on disk and in memory. */
  private readonly pages: (Uint32Array | undefined)[];
  /** Marks per page (skip clean pages without looking at them). */
  private readonly marks: Uint32Array;
  private set_ = 0;
  /** Pages changed since the last write-back. */
  private readonly dirtyPages = new Set<number>();
  /** Every page changed (markAll, clearAll): the set is not filled one by one. */
  private allDirty = false;

  constructor(readonly dataBytes: number) {
    this.bits = Math.ceil(dataBytes / BLOCK);
    this.pageCount = Math.ceil(this.bits / BITS_PER_PAGE);
    // Filled, not holey: a holey array this long is a slow dictionary in V8.
    this.pages = new Array<Uint32Array | undefined>(this.pageCount).fill(undefined);
    this.marks = new Uint32Array(this.pageCount);
  }

  /** Bytes the bitmap takes on disk (whole pages). */
  static bytesFor(dataBytes: number): number {
    return Math.ceil(Math.ceil(dataBytes / BLOCK) / BITS_PER_PAGE) * PAGE;
  }

  /** Blocks marked out of sync. */
  get count(): number {
    return this.set_;
  }

  get outOfSyncBytes(): number {
    return Math.min(this.dataBytes, this.set_ * BLOCK);
  }

  /** Pages held in memory (the rest are clear). */
  get residentPages(): number {
    let n = 0;
    for (const p of this.pages) if (p) n++;
    return n;
  }

  /** Mark every block touching [offset, offset+length) out of sync. */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    this.range(Math.floor(offset / BLOCK), Math.ceil((offset + length) / BLOCK), true);
  }

  /**
   * Clear blocks wholly inside [offset, offset+length) (a block only partly
   * synced stays marked; the last block counts as whole at the data end).
   */
  clear(offset: number, length: number): void {
    if (length <= 0) return;
    const end = offset + length >= this.dataBytes ? this.bits : Math.floor((offset + length) / BLOCK);
    this.range(Math.ceil(offset / BLOCK), end, false);
  }

  markAll(): void {
    this.allPagesDirty();
    this.range(0, this.bits, true);
  }

  clearAll(): void {
    this.allPagesDirty();
    this.range(0, this.bits, false);
  }

  private allPagesDirty(): void {
    this.allDirty = true;
    this.dirtyPages.clear();
  }

  /** Mark every block `other` (a bitmap of the same size) marks: page by page, whole pages at once. */
  merge(other: Bitmap): void {
    if (other.bits !== this.bits) throw new Error(`bitmap of ${other.bits} blocks merged into one of ${this.bits}`);
    for (let p = 0; p < this.pageCount; p++) {
      const theirs = other.pages[p];
      const mine = this.pages[p];
      if (!theirs || other.marks[p] === 0 || mine === FULL_WORDS) continue;
      if (theirs === FULL_WORDS || !mine) {
        this.setPage(p, theirs === FULL_WORDS ? FULL_WORDS : theirs.slice(), other.marks[p]);
        continue;
      }
      let marks = 0;
      for (let w = 0; w < WORDS_PER_PAGE; w++) marks += popcount((mine[w] |= theirs[w]));
      if (marks !== this.marks[p]) this.setPage(p, marks === BITS_PER_PAGE ? FULL_WORDS : mine, marks);
    }
  }

  isMarked(block: number): boolean {
    const p = Math.floor(block / BITS_PER_PAGE);
    const words = this.pages[p];
    if (!words) return false;
    const within = block - p * BITS_PER_PAGE;
    return (words[within >>> 5] & (1 << (within & 31))) !== 0;
  }

  private range(from: number, to: number, value: boolean): void {
    to = Math.min(to, this.bits);
    for (let b = Math.max(0, from); b < to; ) {
      const p = Math.floor(b / BITS_PER_PAGE);
      const pageStart = p * BITS_PER_PAGE;
      const pageEnd = Math.min(to, pageStart + BITS_PER_PAGE);
      const start = b;
      b = pageEnd;
      let words = this.pages[p];
      if (value ? words === FULL_WORDS : !words) continue;
      if (start === pageStart && pageEnd === pageStart + BITS_PER_PAGE) {
        // The whole page (never the last, partial one): no word needs looking at.
        this.setPage(p, value ? FULL_WORDS : undefined, value ? BITS_PER_PAGE : 0);
        continue;
      }
      if (!words) words = new Uint32Array(WORDS_PER_PAGE);
      else if (words === FULL_WORDS) words = FULL_WORDS.slice();
      let changed = 0;
      for (let within = start - pageStart; within < pageEnd - pageStart; ) {
        const w = within >>> 5;
        const bit = within & 31;
        const n = Math.min(32 - bit, pageEnd - pageStart - within);
        const mask = n === 32 ? 0xffffffff : ((1 << n) - 1) << bit;
        const before = words[w];
        const after = value ? (before | mask) >>> 0 : (before & ~mask) >>> 0;
        if (before !== after) {
          words[w] = after;
          changed += popcount(after) - popcount(before);
        }
        within += n;
      }
      const marks = this.marks[p] + changed;
      if (changed !== 0) this.setPage(p, marks === BITS_PER_PAGE ? FULL_WORDS : marks === 0 ? undefined : words, marks);
    }
  }

  /** Page `p` now holds `marks` marks, in `words` (none: all clear, written as zeros by the next write-back). */
  private setPage(p: number, words: Uint32Array | undefined, marks: number): void {
    this.pages[p] = words;
    this.set_ += marks - this.marks[p];
    this.marks[p] = marks;
    if (!this.allDirty) this.dirtyPages.add(p);
  }

  /**
   * The first out-of-sync range starting at or after `fromOffset` (a block
   * that starts before it counts as handed out already), at most `maxBytes`
   * long, or undefined when nothing is marked there. Clean and full pages
   * are skipped whole, clear and full words 32 blocks at a time.
   */
  firstRun(fromOffset: number, maxBytes: number): { offset: number; length: number } | undefined {
    let b = Math.ceil(fromOffset / BLOCK);
    while (b < this.bits) {
      const p = Math.floor(b / BITS_PER_PAGE);
      if (this.marks[p] === 0) {
        b = (p + 1) * BITS_PER_PAGE;
        continue;
      }
      const words = this.pages[p]!;
      const within = b - p * BITS_PER_PAGE;
      if (words[within >>> 5] === 0) {
        b = p * BITS_PER_PAGE + ((within >>> 5) + 1) * 32;
        continue;
      }
      if (!this.isMarked(b)) {
        b++;
        continue;
      }
      const limit = Math.min(this.bits, b + Math.max(1, Math.floor(maxBytes / BLOCK)));
      let e = b + 1;
      while (e < limit) {
        if (e % BITS_PER_PAGE === 0 && e + BITS_PER_PAGE <= limit && this.pages[e / BITS_PER_PAGE] === FULL_WORDS) {
          e += BITS_PER_PAGE;
          continue;
        }
        if (e % 32 === 0 && e + 32 <= limit && this.wordAt(e) === 0xffffffff) {
          e += 32;
          continue;
        }
        if (!this.isMarked(e)) break;
        e++;
      }
      const offset = b * BLOCK;
      return { offset, length: Math.min(this.dataBytes, e * BLOCK) - offset };
    }
    return undefined;
  }

  /** The 32-bit word holding block `b` (b a multiple of 32). */
  private wordAt(b: number): number {
    const p = Math.floor(b / BITS_PER_PAGE);
    const words = this.pages[p];
    return words ? words[(b - p * BITS_PER_PAGE) >>> 5] : 0;
  }

  /** Out-of-sync byte ranges in order, adjacent blocks merged, starting at `fromOffset` (block-aligned). */
  *runs(fromOffset = 0): Generator<{ offset: number; length: number }> {
    for (let r = this.firstRun(fromOffset, Infinity); r; r = this.firstRun(r.offset + r.length, Infinity)) yield r;
  }

  /**
   * The runs, `perBatch` at most at a time, with a turn of the event loop
   * between slices (a fragmented bitmap of a big device has millions of
   * runs). Marks changed meanwhile may or may not be seen: the caller
   * compares counts before and after if it matters.
   */
  async *runBatches(perBatch: number, fromOffset = 0, clock?: SliceClock): AsyncGenerator<{ offset: number; length: number }[]> {
    const slicer = new Slicer(clock);
    let batch: { offset: number; length: number }[] = [];
    for (let r = this.firstRun(fromOffset, Infinity); r; r = this.firstRun(r.offset + r.length, Infinity)) {
      batch.push(r);
      if (batch.length >= perBatch) {
        yield batch;
        batch = [];
      }
      const pause = slicer.due();
      if (pause) await pause;
    }
    if (batch.length > 0) yield batch;
  }

  /**
   * The changed pages as they are now (all pages with `full`), copied, so a
   * write-back records one instant even while marks change during its I/O.
   * Consecutive clear pages, and consecutive full pages, are one entry of
   * `count` pages; full pages are not copied (they share one buffer).
   */
  snapshot(full = false): PageRun[] {
    const all = full || this.allDirty;
    const dirty = all ? [] : [...this.dirtyPages].sort((a, b) => a - b);
    this.dirtyPages.clear();
    this.allDirty = false;
    const out: PageRun[] = [];
    const n = all ? this.pageCount : dirty.length;
    for (let i = 0; i < n; i++) {
      const p = all ? i : dirty[i];
      const words = this.pages[p];
      if (!words || words === FULL_WORDS) {
        const bytes = words ? FULL_PAGE : undefined;
        const last = out[out.length - 1];
        if (last && last.bytes === bytes && last.page + last.count === p) last.count++;
        else out.push({ page: p, count: 1, bytes });
        continue;
      }
      const bytes = Buffer.from(words.buffer.slice(words.byteOffset, words.byteOffset + PAGE));
      // Little-endian words: bit b of the device's bitmap is bit (b & 7) of byte b >> 3 on any host.
      if (!LITTLE_ENDIAN) swapWords(bytes);
      out.push({ page: p, count: 1, bytes });
    }
    return out;
  }

  /**
   * Write a snapshot to the area at `areaOffset` of `device` (clear pages as
   * one zeroing, full pages FULL_WRITE_PAGES at a time), giving the event
   * loop a turn between bounded pieces. Returns the pages written.
   */
  static async writePages(device: BlockDevice, areaOffset: number, runs: PageRun[], clock?: SliceClock): Promise<number> {
    const slicer = new Slicer(clock);
    let written = 0;
    for (const { page, count, bytes } of runs) {
      if (bytes === undefined) {
        await device.writeZeroes(areaOffset + page * PAGE, count * PAGE, { noHole: true });
      } else {
        for (let done = 0; done < count; ) {
          const pause = slicer.due();
          if (pause) await pause;
          const n = bytes === FULL_PAGE ? Math.min(FULL_WRITE_PAGES, count - done) : 1;
          await device.write(areaOffset + (page + done) * PAGE, bytes === FULL_PAGE ? FULL_BYTES.subarray(0, n * PAGE) : bytes);
          done += n;
        }
      }
      written += count;
      const pause = slicer.due();
      if (pause) await pause;
    }
    return written;
  }

  /** Write changed pages (all pages with `full`) to the area at `areaOffset` of `device`. */
  async writeBack(device: BlockDevice, areaOffset: number, full = false, clock?: SliceClock): Promise<number> {
    return Bitmap.writePages(device, areaOffset, this.snapshot(full), clock);
  }

  /** Load the bitmap from its area (holes and all-zero pages stay unallocated). */
  static async read(device: BlockDevice, areaOffset: number, dataBytes: number, clock?: SliceClock): Promise<Bitmap> {
    const bm = new Bitmap(dataBytes);
    const areaBytes = Bitmap.bytesFor(dataBytes);
    const buf = Buffer.alloc(READ_PAGES * PAGE);
    const slicer = new Slicer(clock);
    for (let at = 0; at < areaBytes; ) {
      const pause = slicer.due();
      if (pause) await pause;
      const want = Math.min(buf.length, areaBytes - at);
      const hole = await holeBytes(device, areaOffset + at, Math.min(areaBytes - at, HOLE_QUERY_BYTES));
      if (hole >= PAGE) {
        at += Math.floor(hole / PAGE) * PAGE;
        continue;
      }
      const chunk = buf.subarray(0, want);
      await device.read(areaOffset + at, chunk);
      for (let off = 0; off < want; off += PAGE) bm.loadPage((at + off) / PAGE, chunk.subarray(off, off + PAGE));
      at += want;
    }
    return bm;
  }

  private loadPage(p: number, raw: Buffer): void {
    if (raw.equals(FULL_PAGE) && (p + 1) * BITS_PER_PAGE <= this.bits) {
      this.pages[p] = FULL_WORDS;
      this.marks[p] = BITS_PER_PAGE;
      this.set_ += BITS_PER_PAGE;
      return;
    }
    let any = false;
    for (let i = 0; i < raw.length; i += 4) {
      if (raw.readUInt32LE(i) !== 0) {
        any = true;
        break;
      }
    }
    if (!any) return;
    const words = new Uint32Array(WORDS_PER_PAGE);
    for (let w = 0; w < WORDS_PER_PAGE; w++) words[w] = raw.readUInt32LE(w * 4);
    // Bits past the data end are not blocks: ignore whatever is there.
    const valid = Math.min(BITS_PER_PAGE, this.bits - p * BITS_PER_PAGE);
    for (let w = 0; w < WORDS_PER_PAGE; w++) {
      const first = w * 32;
      if (first >= valid) words[w] = 0;
      else if (first + 32 > valid) words[w] &= (1 << (valid - first)) - 1;
    }
    let n = 0;
    for (const w of words) n += popcount(w);
    if (n === 0) return;
    this.pages[p] = n === BITS_PER_PAGE ? FULL_WORDS : words;
    this.marks[p] = n;
    this.set_ += n;
  }
}

/** Bytes at `offset` the device reports as a hole or zeros (0 when unknown or data). */
async function holeBytes(device: BlockDevice, offset: number, length: number): Promise<number> {
  if (!device.capabilities.extents) return 0;
  try {
    const [e] = await device.blockStatus(offset, length, { firstOnly: true });
    if (e && e.offset <= offset && (e.flags & (EXTENT_HOLE | EXTENT_ZERO)) !== 0) return Math.min(length, e.offset + e.length - offset);
  } catch {
    /* unknown: read it */
  }
  return 0;
}

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

function swapWords(buf: Buffer): void {
  for (let i = 0; i + 4 <= buf.length; i += 4) buf.writeUInt32LE(buf.readUInt32BE(i), i);
}

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}
