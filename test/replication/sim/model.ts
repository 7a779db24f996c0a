/**
 * What the application was promised, and how to tell what a disk holds.
 *
 * Every 512-byte sector the simulation writes says who wrote it: the
 * pattern [write id u32][sector u32] repeated, so reading any sector of any
 * disk names the write it came from (0: zeros; a pattern that does not fit
 * is corruption or misplaced data, reported as such).
 *
 * A Lineage is one line of history of the data: per sector, the values
 * written in order, and how far they are durable (a FUA write acknowledged,
 * or a flush completed after the write was acknowledged). A sector of a
 * disk that follows the lineage may hold its durable value or any later
 * one (written but not yet durable: a crash may keep or lose it), nothing
 * else. Zeroing writes have negative ids (the disk reads 0 for all of
 * them); 0 is the initial content.
 *
 * Lineages branch where the data may: a node promoted without its peer on
 * a disk that lacks promised data, or forced. A resync overwrites the
 * target's lineage with the source's; that may discard promises only when
 * an admin chose it (a split brain resolved) or the target's data was not
 * good anyway.
 */
export const SECTOR = 512;
/** A sector that holds neither zeros nor a whole pattern. */
export const GARBAGE = -0x7fffffff;
/** A sector of zeros on disk (any zeroing write, or never written). */
export const ZERO = 0;

/** Fill `length` bytes at `offset` with write `id`'s pattern. */
export function pattern(id: number, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  const unit = Buffer.allocUnsafe(8);
  for (let at = 0; at < length; at += SECTOR) {
    unit.writeUInt32LE(id, 0);
    unit.writeUInt32LE((offset + at) / SECTOR, 4);
    b.fill(unit, at, at + SECTOR);
  }
  return b;
}

/**
 * The write a sector came from: its id, ZERO, or GARBAGE (torn, misplaced
 * or corrupt). Checks the first, a middle and the last unit of the pattern
 * (the simulated disks write whole sectors; a sector from elsewhere names
 * another sector).
 */
export function decodeSector(buf: Buffer, at: number, sector: number): number {
  const id = buf.readUInt32LE(at);
  const where = buf.readUInt32LE(at + 4);
  if (id === 0 && where === 0) {
    for (let i = 8; i < SECTOR; i += 4) if (buf.readUInt32LE(at + i) !== 0) return GARBAGE;
    return ZERO;
  }
  if (where !== sector) return GARBAGE;
  for (const i of [256, SECTOR - 8]) if (buf.readUInt32LE(at + i) !== id || buf.readUInt32LE(at + i + 4) !== sector) return GARBAGE;
  return id;
}

/** decodeSector for every sector of `buf`, which holds the disk from sector `first` on; fast. */
export function decodeAll(buf: Buffer, first: number): Int32Array {
  const sectors = buf.length / SECTOR;
  const out = new Int32Array(sectors);
  if (buf.byteOffset % 4 !== 0) {
    for (let s = 0; s < sectors; s++) out[s] = decodeSector(buf, s * SECTOR, first + s);
    return out;
  }
  const u = new Uint32Array(buf.buffer, buf.byteOffset, buf.length / 4);
  const per = SECTOR / 4;
  for (let s = 0; s < sectors; s++) {
    const base = s * per;
    const id = u[base];
    const where = u[base + 1];
    if (id === 0 && where === 0) {
      let zero = true;
      for (let i = 2; i < per; i++) {
        if (u[base + i] !== 0) {
          zero = false;
          break;
        }
      }
      out[s] = zero ? ZERO : GARBAGE;
      continue;
    }
    const sector = first + s;
    out[s] = where === sector && u[base + 64] === id && u[base + 65] === sector && u[base + per - 2] === id && u[base + per - 1] === sector ? id : GARBAGE;
  }
  return out;
}

export function describeValue(v: number): string {
  if (v === GARBAGE) return 'garbage';
  if (v === ZERO) return 'zeros';
  if (v < 0) return `zeroing #${-v}`;
  return `write #${v}`;
}

let lineageIds = 0;

export function resetLineageIds(): void {
  lineageIds = 0;
}

export class Lineage {
  readonly id = ++lineageIds;
  /** Per sector: values in the order written (undefined: [0], never written). */
  private readonly hist: (number[] | undefined)[];
  /** Per sector: index of the durable value in hist. */
  private readonly sure: Int32Array;
  /** Writes made in this lineage since it began (its own promises, not inherited ones). */
  readonly own = new Set<number>();
  /** Set when an admin chose another node's data over this lineage (split brain resolved). */
  discardedBy: string | undefined;

  constructor(
    readonly sectors: number,
    readonly origin: string,
    from?: Lineage,
  ) {
    this.hist = from ? from.hist.map((h) => (h ? [...h] : undefined)) : new Array<number[] | undefined>(sectors);
    this.sure = from ? Int32Array.from(from.sure) : new Int32Array(sectors);
  }

  get name(): string {
    return `L${this.id}(${this.origin})`;
  }

  private h(s: number): number[] {
    let h = this.hist[s];
    if (!h) {
      h = [0];
      this.hist[s] = h;
    }
    return h;
  }

  /** A write (id > 0) or zeroing (id < 0) was issued over these sectors: a possible value from now on. */
  issued(id: number, offset: number, length: number): void {
    this.own.add(Math.abs(id));
    for (let s = offset / SECTOR; s < (offset + length) / SECTOR; s++) this.h(s).push(id);
  }

  /** The write is durable: its value (or a later one) is what a crash leaves. */
  durable(id: number, offset: number, length: number): void {
    for (let s = offset / SECTOR; s < (offset + length) / SECTOR; s++) {
      const h = this.h(s);
      const i = h.lastIndexOf(id);
      if (i > this.sure[s]) this.sure[s] = i;
    }
  }

  /** Values a disk following this lineage may hold at sector s. */
  allowed(s: number): number[] {
    return this.h(s).slice(this.sure[s]);
  }

  /** Does `value` (as decoded from a disk) fit sector s? */
  fits(s: number, value: number): boolean {
    if (value === GARBAGE) return false;
    const h = this.hist[s];
    if (!h) return value === ZERO;
    for (let i = this.sure[s]; i < h.length; i++) {
      const v = h[i];
      if (value === ZERO ? v <= 0 : v === value) return true;
    }
    return false;
  }

  /** The durable value of sector s (its id; <= 0 for zeros). */
  sureValue(s: number): number {
    const h = this.hist[s];
    return h ? h[this.sure[s]] : 0;
  }

  /** Has this lineage ever had value `id` at sector s (zeros match zeros)? */
  hasEver(s: number, id: number): boolean {
    const h = this.hist[s];
    if (!h) return id <= 0;
    return id <= 0 ? h.some((v) => v <= 0) : h.includes(id);
  }

  /**
   * Both disks hold `value` at s now, flushed: it is the durable value, and
   * the later values it overtook are gone (the application waited for all).
   */
  settle(s: number, value: number): void {
    const h = this.hist[s];
    if (!h) return;
    for (let i = h.length - 1; i >= this.sure[s]; i--) {
      const v = h[i];
      if (value === ZERO ? v <= 0 : v === value) {
        this.hist[s] = [v];
        this.sure[s] = 0;
        return;
      }
    }
  }

  /**
   * The only disk left holds this: where it does not fit, what it holds is
   * the data from now on (the rest was lost with another disk). Returns the
   * sectors changed.
   */
  rebase(durable: Int32Array, cached: Int32Array): number {
    let n = 0;
    for (let s = 0; s < this.sectors; s++) {
      if (this.fits(s, durable[s]) && this.fits(s, cached[s])) continue;
      this.rebaseSector(s, durable[s], cached[s]);
      n++;
    }
    return n;
  }

  /** Sector s holds `durable` for good and maybe `cached` (what one disk holds, as its own truth). */
  rebaseSector(s: number, durable: number, cached: number): void {
    this.hist[s] = cached === durable ? [durable] : [durable, cached];
    this.sure[s] = 0;
  }

  /** A lineage that starts from what a disk holds (durable and cached values). */
  static fromDisk(origin: string, durable: Int32Array, cached: Int32Array): Lineage {
    const l = new Lineage(durable.length, origin);
    for (let s = 0; s < durable.length; s++) {
      const d = durable[s];
      const c = cached[s];
      if (d === ZERO && c === ZERO) continue;
      l.hist[s] = c === d ? [d] : [d, c];
    }
    return l;
  }

  /**
   * Promises of this lineage that `other` never had: sectors whose durable
   * value was written in this lineage and is unknown to `other`.
   */
  missingFrom(other: Lineage, limit = 5): { count: number; first: string[] } {
    let count = 0;
    const first: string[] = [];
    for (let s = 0; s < this.sectors; s++) {
      const v = this.sureValue(s);
      if (v === 0 || !this.own.has(Math.abs(v))) continue;
      // Kept if `other` has it, or a value written after it here (it went on from there).
      const h = this.hist[s]!;
      let kept = false;
      for (let i = this.sure[s]; i < h.length && !kept; i++) kept = other.hasEver(s, h[i]);
      if (kept) continue;
      count++;
      if (first.length < limit) first.push(`sector ${s}: ${describeValue(v)}`);
    }
    return { count, first };
  }
}
