/**
 * A thin volume as a BlockDevice: what the NBD server exports.
 *
 * Reads of unmapped chunks return zeros without touching a disk. A write to
 * a chunk this volume owns alone goes straight to its place on the device
 * (the fast path, synchronous when the device is); a write to an unmapped
 * or shared chunk "provisions" a fresh chunk: the old content (or zeros) is
 * merged with the new bytes and written there, and only then is the new
 * mapping recorded for the next commit (a snapshot's chunk is never written).
 */
import {
  BlockDevice,
  BlockDeviceError,
  BlockSizeLimits,
  Capabilities,
  Extent,
  EXTENT_HOLE,
  EXTENT_ZERO,
  MaybePromise,
  WriteOptions,
  ZeroOptions,
  checkRange,
} from '../blockdev/types.js';
import type { Pool, VolumeState } from './pool.js';
import { FANOUT, Inner, Leaf, forEachMapped, lookup, setEntry, writableLeaf } from './thinmap.js';

const MASK = FANOUT - 1;
/** Extents returned by one block-status call at most (clients ask again from where we stopped). */
const MAX_EXTENTS = 4096;

export class ThinVolume implements BlockDevice {
  readonly blockSize: BlockSizeLimits = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  readonly capabilities: Capabilities;
  private readonly cs: number;

  constructor(
    readonly pool: Pool,
    readonly state: VolumeState,
  ) {
    this.cs = pool.chunkSize;
    this.capabilities = {
      readOnly: state.record.readOnly || pool.readOnly,
      flush: true,
      fua: true,
      trim: true,
      fastZero: true,
      extents: true,
      // One process, one map, one commit covers every connection.
      multiConn: true,
      rotational: false,
    };
  }

  get name(): string {
    return `${this.pool.name}/${this.state.record.name}`;
  }

  /** Live: a resize is seen by the next request and the next connection. */
  get size(): number {
    return this.state.removed ? 0 : this.state.record.sizeBytes;
  }

  /* ------------------------------------------------------------------ read */

  read(offset: number, into: Buffer): MaybePromise<void> {
    this.usable();
    checkRange(this, offset, into.length);
    if (this.state.busy.size > 0) return this.readAfterBusy(offset, into);
    return this.readMapped(offset, into);
  }

  private async readAfterBusy(offset: number, into: Buffer): Promise<void> {
    await this.waitBusy(offset, into.length);
    return this.read(offset, into);
  }

  private readMapped(offset: number, into: Buffer): MaybePromise<void> {
    const cs = this.cs;
    const root = this.state.root;
    const pool = this.pool;
    const end = offset + into.length;
    let pos = offset;
    let pending: Promise<void>[] | undefined;
    while (pos < end) {
      const v = Math.floor(pos / cs);
      const e = lookup(root, v);
      let runEnd = Math.min(end, (v + 1) * cs);
      if (e === 0) {
        // A run of unmapped chunks reads as zeros.
        let next = v + 1;
        while (runEnd < end && lookup(root, next) === 0) runEnd = Math.min(end, ++next * cs);
        into.fill(0, pos - offset, runEnd - offset);
      } else {
        // Merge physically consecutive chunks on one device into one read.
        const p = e - 1;
        const d = pool.deviceOf(p);
        const lastOnDevice = d.firstChunk + d.entry.chunks - 1;
        let next = v + 1;
        let expect = p + 1;
        while (runEnd < end && expect <= lastOnDevice && lookup(root, next) === expect + 1) {
          runEnd = Math.min(end, ++next * cs);
          expect++;
        }
        const r = d.device.read(pool.chunkOffset(d, p) + (pos - v * cs), into.subarray(pos - offset, runEnd - offset));
        if (r) (pending ??= []).push(r);
      }
      pos = runEnd;
    }
    if (pending) return pending.length === 1 ? pending[0] : Promise.all(pending).then(() => undefined);
  }

  /* ----------------------------------------------------------------- write */

  write(offset: number, data: Buffer, options?: WriteOptions): MaybePromise<void> {
    return this.writeAt(offset, data, options, false);
  }

  /**
   * Zero the bytes between the volume's end and the end of its last chunk,
   * which a shrink left in place: a grow must show zeros there. Runs before
   * the size changes, so no client can write that range meanwhile.
   */
  zeroPastEnd(): MaybePromise<void> {
    const size = this.size;
    const chunkEnd = Math.ceil(size / this.cs) * this.cs;
    if (chunkEnd === size || lookup(this.state.root, Math.floor(size / this.cs)) === 0) return;
    return this.writeAt(size, Buffer.alloc(chunkEnd - size), undefined, true);
  }

  private writeAt(offset: number, data: Buffer, options: WriteOptions | undefined, pastEnd: boolean): MaybePromise<void> {
    this.writable();
    if (!pastEnd) checkRange(this, offset, data.length);
    const pool = this.pool;
    if (pool.gate.closed > 0) return pool.gate.whenOpen().then(() => this.writeAt(offset, data, options, pastEnd));
    if (this.state.busy.size > 0 && this.overlapsBusy(offset, data.length)) {
      return this.waitBusy(offset, data.length).then(() => this.writeAt(offset, data, options, pastEnd));
    }
    if (this.state.record.receivedUuid !== undefined) {
      // Changed since it was received: an incremental stream no longer applies.
      pool.apply({ type: 'set', id: this.state.record.id, fields: { receivedUuid: null } }, true);
    }
    pool.gate.enter();
    let pending: Promise<void>[] | undefined;
    let provisioned = false;
    try {
      const cs = this.cs;
      const root = this.state.root;
      const end = offset + data.length;
      const fua = options?.fua === true;
      let pos = offset;
      while (pos < end) {
        const v = Math.floor(pos / cs);
        const leaf = privateLeaf(root.node, root.levels, v);
        const e = leaf === undefined ? 0 : leaf.map[v & MASK];
        let runEnd = Math.min(end, (v + 1) * cs);
        if (e !== 0 && pool.refcount(e - 1) === 1) {
          // Owned alone: overwrite in place, merging consecutive owned chunks.
          const p = e - 1;
          const d = pool.deviceOf(p);
          const lastOnDevice = d.firstChunk + d.entry.chunks - 1;
          let next = v + 1;
          let expect = p + 1;
          while (runEnd < end && expect <= lastOnDevice) {
            const l = privateLeaf(root.node, root.levels, next);
            const ne = l === undefined ? 0 : l.map[next & MASK];
            if (ne !== expect + 1 || pool.refcount(expect) !== 1) break;
            runEnd = Math.min(end, ++next * cs);
            expect++;
          }
          const r = d.device.write(pool.chunkOffset(d, p) + (pos - v * cs), data.subarray(pos - offset, runEnd - offset), fua ? { fua } : undefined);
          if (r) (pending ??= []).push(r);
        } else {
          provisioned = true;
          const r = this.provision(v, pos - v * cs, data.subarray(pos - offset, runEnd - offset));
          if (r) (pending ??= []).push(r);
        }
        pos = runEnd;
      }
    } catch (err) {
      pool.gate.leave();
      if (pending) return Promise.allSettled(pending).then(() => Promise.reject(err));
      throw err;
    }
    if (!pending) {
      pool.gate.leave();
      // In place and synchronous: the data is durable, its mapping may not be yet.
      if (options?.fua && pool.hasUncommitted()) return pool.commit();
      return;
    }
    return Promise.all(pending).then(
      () => {
        pool.gate.leave();
        // A new mapping is durable only once committed; so is one an earlier write
        // made that this one overwrote in place (FUA covers the data, not the map).
        if (options?.fua && (provisioned || pool.hasUncommitted())) return pool.commit();
      },
      (err) => {
        pool.gate.leave();
        throw err;
      },
    );
  }

  /**
   * Give virtual chunk `v` a fresh chunk holding the old content (zeros if
   * unmapped) with `part` written at `within`.
   */
  private provision(v: number, within: number, part: Buffer): MaybePromise<void> {
    const pool = this.pool;
    const state = this.state;
    const leaf = writableLeaf(state.root, v, pool);
    const i = v & MASK;
    const old = leaf.map[i];
    const p = pool.allocData(this.name);
    leaf.map[i] = p + 1;
    if (old === 0) {
      leaf.count++;
      state.mapped++;
    }
    const done = (): void => {
      pool.recordMap(state.record.id, v, p + 1);
      if (old !== 0) pool.decref(old - 1);
    };
    const undo = (): void => {
      // Nothing was recorded: put the old mapping back and forget the new chunk.
      leaf.map[i] = old;
      if (old === 0) {
        leaf.count--;
        state.mapped--;
      }
      pool.unallocData(p);
    };
    let filling: MaybePromise<void>;
    try {
      filling = this.fill(p, old, within, part);
    } catch (err) {
      undo();
      throw err;
    }
    if (!filling) {
      // Synchronous device, nothing to wait for: the common first write to a sparse file.
      done();
      return;
    }
    const settled = filling.then(
      () => {
        done();
        state.busy.delete(v);
      },
      (err) => {
        undo();
        state.busy.delete(v);
        throw err;
      },
    );
    // Other requests on this chunk wait until its content is in place.
    state.busy.set(
      v,
      settled.catch(() => undefined),
    );
    return settled;
  }

  /** Put the new content of a provisioned chunk `p` on its device. */
  private fill(p: number, old: number, within: number, part: Buffer): MaybePromise<void> {
    const cs = this.cs;
    const pool = this.pool;
    const d = pool.deviceOf(p);
    const base = pool.chunkOffset(d, p);
    if (within === 0 && part.length === cs) {
      pool.chunkWritten(d, p);
      return d.device.write(base, part);
    }
    if (old === 0) {
      // Still a hole on the device (a sparse file never written there): it reads as zeros already.
      const hole = pool.chunkIsHole(d, p);
      const write = (isHole: boolean): MaybePromise<void> => {
        if (!isHole) return this.fillSlow(p, old, within, part);
        pool.chunkWritten(d, p);
        return d.device.write(base + within, part);
      };
      return hole instanceof Promise ? hole.then(write) : write(hole);
    }
    return this.fillSlow(p, old, within, part);
  }

  /** Copy-on-write (old content + part) or a fresh chunk that needs zeros around part. */
  private async fillSlow(p: number, old: number, within: number, part: Buffer): Promise<void> {
    if (old === 0 && (await this.zeroAround(p, within, part))) return;
    const buf = Buffer.alloc(this.cs);
    if (old !== 0) await this.pool.readChunk(old - 1, buf);
    part.copy(buf, within);
    await this.pool.writeChunk(p, buf);
  }

  /**
   * A fresh chunk gets `part` at `within` and zeros around it. Where the
   * device zeroes without writing (fallocate on a file), that beats writing
   * a whole chunk of zeros for a 4 KiB write (16x less data at 64 KiB
   * chunks). False when it cannot: the caller writes the whole chunk.
   */
  private async zeroAround(p: number, within: number, part: Buffer): Promise<boolean> {
    const pool = this.pool;
    const d = pool.deviceOf(p);
    if (!d.device.capabilities.fastZero) return false;
    const base = pool.chunkOffset(d, p);
    const tail = within + part.length;
    pool.chunkWritten(d, p);
    try {
      const steps: MaybePromise<void>[] = [];
      if (within > 0) steps.push(d.device.writeZeroes(base, within, { noHole: true, fastOnly: true }));
      if (tail < this.cs) steps.push(d.device.writeZeroes(base + tail, this.cs - tail, { noHole: true, fastOnly: true }));
      await Promise.all(steps);
    } catch (err) {
      if (err instanceof BlockDeviceError && err.code === 'ENOTSUP') return false;
      throw err;
    }
    await d.device.write(base + within, part);
    return true;
  }

  private overlapsBusy(offset: number, length: number): boolean {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + Math.max(1, length) - 1) / this.cs);
    if (last - first + 1 < this.state.busy.size) {
      for (let v = first; v <= last; v++) if (this.state.busy.has(v)) return true;
      return false;
    }
    for (const v of this.state.busy.keys()) if (v >= first && v <= last) return true;
    return false;
  }

  private async waitBusy(offset: number, length: number): Promise<void> {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + Math.max(1, length) - 1) / this.cs);
    for (;;) {
      const waits: Promise<void>[] = [];
      for (const [v, p] of this.state.busy) if (v >= first && v <= last) waits.push(p);
      if (waits.length === 0) return;
      await Promise.all(waits);
    }
  }

  /* --------------------------------------------------- flush, trim, zeroes */

  flush(): MaybePromise<void> {
    this.usable();
    return this.pool.commit();
  }

  trim(offset: number, length: number, options?: WriteOptions): MaybePromise<void> {
    this.writable();
    checkRange(this, offset, length);
    return this.unmapWhole(offset, length, options?.fua === true);
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): MaybePromise<void> {
    this.writable();
    checkRange(this, offset, length);
    const cs = this.cs;
    const end = offset + length;
    const firstWhole = Math.ceil(offset / cs) * cs;
    const lastWhole = end === this.size ? end : Math.floor(end / cs) * cs;
    if (options?.noHole) {
      if (options.fastOnly) throw new BlockDeviceError('ENOTSUP', `${this.name}: zeroing without unmapping is not faster than writing`);
      return this.writeZeroBytes(offset, length, options.fua === true);
    }
    const steps: (() => MaybePromise<void>)[] = [];
    if (firstWhole >= lastWhole) {
      // No whole chunk inside, but the range may still straddle one chunk boundary:
      // zeroPartial handles one chunk only.
      const cut = Math.min(end, firstWhole);
      steps.push(() => this.zeroPartial(offset, cut - offset));
      if (cut < end) steps.push(() => this.zeroPartial(cut, end - cut));
    } else {
      if (offset < firstWhole) steps.push(() => this.zeroPartial(offset, firstWhole - offset));
      steps.push(() => this.unmapWhole(firstWhole, lastWhole - firstWhole, false));
      if (lastWhole < end) steps.push(() => this.zeroPartial(lastWhole, end - lastWhole));
    }
    if (options?.fua) steps.push(() => this.pool.commit());
    return runSteps(steps);
  }

  /** Zero a range inside one chunk: only a mapped chunk needs writing. */
  private zeroPartial(offset: number, length: number): MaybePromise<void> {
    if (length === 0) return;
    const v = Math.floor(offset / this.cs);
    if (this.state.busy.has(v)) return this.waitBusy(offset, length).then(() => this.zeroPartial(offset, length));
    if (lookup(this.state.root, v) === 0) return;
    return this.write(offset, Buffer.alloc(length));
  }

  private writeZeroBytes(offset: number, length: number, fua: boolean): MaybePromise<void> {
    const step = 4 * 1024 * 1024;
    const steps: (() => MaybePromise<void>)[] = [];
    for (let at = offset; at < offset + length; at += step) {
      const n = Math.min(step, offset + length - at);
      steps.push(() => this.write(at, Buffer.alloc(n)));
    }
    if (fua) steps.push(() => this.pool.commit());
    return runSteps(steps);
  }

  /**
   * Unmap every chunk wholly inside [offset, offset+length) (the volume's
   * last, partial chunk counts as whole when the range reaches the end).
   */
  private unmapWhole(offset: number, length: number, fua: boolean): MaybePromise<void> {
    const pool = this.pool;
    if (pool.gate.closed > 0) return pool.gate.whenOpen().then(() => this.unmapWhole(offset, length, fua));
    const cs = this.cs;
    const from = Math.ceil(offset / cs);
    const to = offset + length === this.size ? Math.ceil(this.size / cs) : Math.floor((offset + length) / cs);
    if (from >= to) return fua ? pool.commit() : undefined;
    if (this.state.busy.size > 0 && this.overlapsBusy(from * cs, (to - from) * cs)) {
      return this.waitBusy(from * cs, (to - from) * cs).then(() => this.unmapWhole(offset, length, fua));
    }
    const victims: number[] = [];
    forEachMapped(this.state.root, from, to, (v) => victims.push(v));
    if (victims.length > 0 && this.state.record.receivedUuid !== undefined) {
      pool.apply({ type: 'set', id: this.state.record.id, fields: { receivedUuid: null } }, true);
    }
    for (const v of victims) {
      const old = setEntry(this.state.root, v, 0, pool);
      if (old !== 0) {
        pool.decref(old - 1);
        pool.recordMap(this.state.record.id, v, 0);
        this.state.mapped--;
      }
    }
    if (fua) return pool.commit();
  }

  /* ---------------------------------------------------------- block status */

  blockStatus(offset: number, length: number): MaybePromise<Extent[]> {
    this.usable();
    checkRange(this, offset, length);
    const cs = this.cs;
    const end = offset + length;
    const extents: Extent[] = [];
    const push = (from: number, to: number, flags: number): void => {
      const last = extents[extents.length - 1];
      if (last && last.flags === flags && last.offset + last.length === from) last.length += to - from;
      else extents.push({ offset: from, length: to - from, flags });
    };
    let pos = offset;
    const stop = {};
    try {
      forEachMapped(this.state.root, Math.floor(offset / cs), Math.ceil(end / cs), (v) => {
        const start = Math.max(offset, v * cs);
        if (start > pos) push(pos, start, EXTENT_HOLE | EXTENT_ZERO);
        const to = Math.min(end, (v + 1) * cs);
        push(start, to, 0);
        pos = to;
        if (extents.length >= MAX_EXTENTS) throw stop;
      });
    } catch (err) {
      if (err !== stop) throw err;
      return extents;
    }
    if (pos < end) push(pos, end, EXTENT_HOLE | EXTENT_ZERO);
    return extents;
  }

  cache(offset: number, length: number): MaybePromise<void> {
    this.usable();
    checkRange(this, offset, length);
  }

  close(): void {
    // The pool owns the devices; a volume has nothing of its own to release.
  }

  private usable(): void {
    if (this.state.removed) throw new BlockDeviceError('ESHUTDOWN', `${this.name} was removed`);
    if (this.pool.isClosed) throw new BlockDeviceError('ESHUTDOWN', `pool ${this.pool.name} is closed`);
  }

  private writable(): void {
    this.usable();
    if (this.pool.failure !== undefined) throw new BlockDeviceError('EIO', `pool ${this.pool.name} refuses writes after a failed metadata commit (${this.pool.failure}); fix the device and reopen the pool`);
    if (this.capabilities.readOnly || this.state.record.readOnly) throw new BlockDeviceError('EPERM', `${this.name} is read-only (a snapshot: clone it to write)`);
  }
}

/** The leaf holding `v` if every node on the way is private (ref 1), else undefined. */
function privateLeaf(node: Leaf | Inner | undefined, levels: number, v: number): Leaf | undefined {
  for (let level = levels - 1; level > 0; level--) {
    if (node === undefined || node.ref !== 1) return undefined;
    node = (node as Inner).kids[Math.floor(v / FANOUT ** level) & MASK];
  }
  if (node === undefined || node.ref !== 1) return undefined;
  return node as Leaf;
}

/** Run steps in order, staying synchronous while they are. */
function runSteps(steps: (() => MaybePromise<void>)[], from = 0): MaybePromise<void> {
  for (let i = from; i < steps.length; i++) {
    const r = steps[i]();
    if (r) return r.then(() => runSteps(steps, i + 1));
  }
}
