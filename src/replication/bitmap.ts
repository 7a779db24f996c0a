/**
 * The out-of-sync bitmap of a replicated resource: one bit per 4 KiB block
 * of the data area, set while a block was written here and not on the peer
 * (DRBD's quick-sync bitmap). After an outage only the set blocks travel.
 *
 * In memory it is a plain bit array with a running count; on disk it is an
 * area of the backing device, written back page by page: only the 4 KiB
 * pages of bits that changed since the last write-back are written.
 */
import type { BlockDevice } from '../blockdev/types.js';

export const BLOCK = 4096;
const PAGE = 4096;
const BITS_PER_PAGE = PAGE * 8;

export class Bitmap {
  readonly bits: number;
  private readonly words: Uint32Array;
  private set_ = 0;
  /** Pages (of PAGE bytes) changed since the last write-back. */
  private readonly dirtyPages = new Set<number>();

  constructor(readonly dataBytes: number) {
    this.bits = Math.ceil(dataBytes / BLOCK);
    this.words = new Uint32Array(Math.ceil(this.bits / 32));
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
    this.range(0, this.bits, true);
  }

  clearAll(): void {
    this.range(0, this.bits, false);
  }

  isMarked(block: number): boolean {
    return (this.words[block >>> 5] & (1 << (block & 31))) !== 0;
  }

  private range(from: number, to: number, value: boolean): void {
    to = Math.min(to, this.bits);
    for (let b = Math.max(0, from); b < to; ) {
      const w = b >>> 5;
      const bit = b & 31;
      const n = Math.min(32 - bit, to - b);
      const mask = n === 32 ? 0xffffffff : ((1 << n) - 1) << bit;
      const before = this.words[w];
      const after = value ? (before | mask) >>> 0 : (before & ~mask) >>> 0;
      if (before !== after) {
        this.words[w] = after;
        this.set_ += popcount(after) - popcount(before);
        this.dirtyPages.add(Math.floor((w * 4) / PAGE));
      }
      b += n;
    }
  }

  /**
   * The first out-of-sync range starting at or after `fromOffset` (a block
   * that starts before it counts as handed out already), at most `maxBytes`
   * long (whole words are skipped and taken 32 blocks at a time), or
   * undefined when nothing is marked there.
   */
  firstRun(fromOffset: number, maxBytes: number): { offset: number; length: number } | undefined {
    let b = Math.ceil(fromOffset / BLOCK);
    while (b < this.bits) {
      const w = b >>> 5;
      if (this.words[w] === 0) {
        b = (w + 1) * 32;
        continue;
      }
      if (!this.isMarked(b)) {
        b++;
        continue;
      }
      const limit = Math.min(this.bits, b + Math.max(1, Math.floor(maxBytes / BLOCK)));
      let e = b + 1;
      while (e < limit) {
        if ((e & 31) === 0 && e + 32 <= limit && this.words[e >>> 5] === 0xffffffff) {
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

  /** Out-of-sync byte ranges in order, adjacent blocks merged, starting at `fromOffset` (block-aligned). */
  *runs(fromOffset = 0): Generator<{ offset: number; length: number }> {
    for (let r = this.firstRun(fromOffset, Infinity); r; r = this.firstRun(r.offset + r.length, Infinity)) yield r;
  }

  /** Write changed pages to `area` of `device` (at `areaOffset`); all pages with `full`. */
  async writeBack(device: BlockDevice, areaOffset: number, full = false): Promise<number> {
    const bytes = new Uint8Array(this.words.buffer, this.words.byteOffset, this.words.byteLength);
    const pages = full ? [...Array(Math.ceil(bytes.length / PAGE)).keys()] : [...this.dirtyPages].sort((a, b) => a - b);
    this.dirtyPages.clear();
    for (const p of pages) {
      const page = Buffer.alloc(PAGE);
      // Little-endian words: bit b of the device's bitmap is bit (b & 7) of byte b >> 3 on any host.
      Buffer.from(bytes.buffer, bytes.byteOffset + p * PAGE, Math.min(PAGE, bytes.length - p * PAGE)).copy(page);
      if (!LITTLE_ENDIAN) swapWords(page);
      await device.write(areaOffset + p * PAGE, page);
    }
    return pages.length;
  }

  /** Load the bitmap from its area. */
  static async read(device: BlockDevice, areaOffset: number, dataBytes: number): Promise<Bitmap> {
    const bm = new Bitmap(dataBytes);
    const raw = Buffer.alloc(Bitmap.bytesFor(dataBytes));
    await device.read(areaOffset, raw);
    if (!LITTLE_ENDIAN) swapWords(raw);
    const bytes = new Uint8Array(bm.words.buffer, bm.words.byteOffset, bm.words.byteLength);
    bytes.set(raw.subarray(0, bytes.length));
    // Bits past the data end are not blocks: ignore whatever is there.
    const tail = bm.bits & 31;
    if (tail !== 0) bm.words[bm.words.length - 1] &= (1 << tail) - 1;
    bm.set_ = 0;
    for (const w of bm.words) bm.set_ += popcount(w);
    return bm;
  }
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
