/**
 * The pool's chunk address space: the devices' data areas laid end to end
 * (device i holds pool chunks first_i .. first_i + chunks_i - 1, in the
 * order the superblock lists the devices), and chunk I/O on it for the
 * volumes and the checkpoint.
 */
import type { BlockDevice, Extent, MaybePromise } from '../blockdev/types.js';
import { EXTENT_ZERO } from '../blockdev/types.js';
import type { DeviceEntry } from './format.js';

export interface PoolDevice {
  device: BlockDevice;
  entry: DeviceEntry;
  firstChunk: number;
}

/** Chunks one hole query looks ahead (64 MiB at 64 KiB chunks). */
const HOLE_PROBE = 1024;

export function placeDevices(devices: BlockDevice[], entries: DeviceEntry[]): PoolDevice[] {
  let first = 0;
  return devices.map((device, i) => {
    const d = { device, entry: entries[i], firstChunk: first };
    first += entries[i].chunks;
    return d;
  });
}

export class ChunkSpace {
  private list: PoolDevice[];
  private total: number;
  private readonly holes = new Map<PoolDevice, { from: number; to: number }>();

  constructor(
    readonly chunkSize: number,
    devices: PoolDevice[],
  ) {
    this.list = devices;
    this.total = devices.reduce((n, d) => n + d.entry.chunks, 0);
  }

  get devices(): PoolDevice[] {
    return this.list;
  }

  get totalChunks(): number {
    return this.total;
  }

  /** A device joins at the end of the address space (extend). */
  append(device: BlockDevice, entry: DeviceEntry): void {
    this.list = [...this.list, { device, entry, firstChunk: this.total }];
    this.total += entry.chunks;
  }

  /** Take back the last append (its extend was not committed). */
  dropLast(): void {
    const last = this.list[this.list.length - 1];
    this.list = this.list.slice(0, -1);
    this.total -= last.entry.chunks;
    this.holes.delete(last);
  }

  /** Device holding pool chunk `p`. */
  deviceOf(p: number): PoolDevice {
    const ds = this.list;
    if (ds.length === 1) return ds[0];
    for (let i = ds.length - 1; i > 0; i--) if (p >= ds[i].firstChunk) return ds[i];
    return ds[0];
  }

  /** Byte offset of pool chunk `p` on its device `d`. */
  chunkOffset(d: PoolDevice, p: number): number {
    return d.entry.dataStart + (p - d.firstChunk) * this.chunkSize;
  }

  /**
   * Is pool chunk `p` still a hole on its device (so it reads as zeros)?
   * One extent query covers up to HOLE_PROBE chunks ahead and is remembered
   * per device, so sequential allocation asks the device once per run;
   * every write to a chunk goes through chunkWritten, which forgets it.
   */
  chunkIsHole(d: PoolDevice, p: number): MaybePromise<boolean> {
    const known = this.holes.get(d);
    if (known !== undefined && p >= known.from && p < known.to) return true;
    if (!d.device.capabilities.extents) return false;
    const base = this.chunkOffset(d, p);
    const span = Math.min(HOLE_PROBE, d.firstChunk + d.entry.chunks - p) * this.chunkSize;
    const judge = (extents: Extent[]): boolean => {
      const e = extents[0];
      if (e === undefined || e.offset !== base || (e.flags & EXTENT_ZERO) === 0) return false;
      const n = Math.floor(Math.min(e.length, span) / this.chunkSize);
      if (n < 1) return false;
      this.holes.set(d, { from: p, to: p + n });
      return true;
    };
    const r = d.device.blockStatus(base, span);
    return r instanceof Promise ? r.then(judge) : judge(r);
  }

  /** Chunk `p` is being written: it is no hole any more. */
  chunkWritten(d: PoolDevice, p: number): void {
    const known = this.holes.get(d);
    if (known === undefined || p < known.from || p >= known.to) return;
    if (p === known.from) known.from++;
    else known.to = p;
  }

  async readChunk(p: number, into: Buffer): Promise<void> {
    const d = this.deviceOf(p);
    await d.device.read(this.chunkOffset(d, p), into);
  }

  async writeChunk(p: number, data: Buffer): Promise<void> {
    const d = this.deviceOf(p);
    this.chunkWritten(d, p);
    await d.device.write(this.chunkOffset(d, p), data);
  }

  async flushDevices(): Promise<void> {
    await Promise.all(this.list.map((d) => d.device.flush()));
  }
}
