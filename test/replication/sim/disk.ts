/**
 * A node's disk as its process sees it: the FaultyDevice (the hardware,
 * with its volatile cache, power switch and injected errors; it outlives
 * the process) behind a seeded latency on the fake clock. Every call
 * reaches the hardware at once, in the order made, and completes after a
 * random delay, so completions reorder as on a real queue. When the process
 * dies nothing it asked for ever completes, and it asks for nothing more;
 * closing it does not close the hardware (the next process opens it again).
 */
import type { FaultyDevice } from '../../../src/blockdev/faulty.js';
import { BlockDevice, BlockDeviceError, Extent, MaybePromise, WriteOptions, ZeroOptions } from '../../../src/blockdev/types.js';
import type { OwnerClock } from './scheduler.js';

export class SimDisk implements BlockDevice {
  private closed = false;
  /** Scenarios: runs on every blockStatus; a promise it returns holds the answer until it resolves. */
  blockStatusHook: ((offset: number, length: number) => Promise<void> | undefined) | undefined;

  constructor(
    readonly hw: FaultyDevice,
    private readonly clock: OwnerClock,
    private readonly rand: () => number,
    private readonly latency: [number, number],
  ) {}

  get name(): string {
    return this.hw.name;
  }
  get size(): number {
    return this.hw.size;
  }
  get blockSize() {
    return this.hw.blockSize;
  }
  get capabilities() {
    return this.hw.capabilities;
  }

  private go<T>(fn: () => MaybePromise<T>): Promise<T> {
    if (!this.clock.owner.alive) return new Promise<T>(() => undefined);
    if (this.closed) return Promise.reject(new BlockDeviceError('EIO', `${this.name}: closed by this process`));
    let result: Promise<T>;
    try {
      result = Promise.resolve(fn());
    } catch (err) {
      result = Promise.reject(err);
    }
    const [lo, hi] = this.latency;
    const delay = lo + this.rand() * (hi - lo);
    return new Promise<T>((resolve, reject) => {
      result.then(
        (v) => void this.clock.setTimeout(() => resolve(v), delay),
        (err: unknown) => void this.clock.setTimeout(() => reject(err), delay),
      );
    });
  }

  read(offset: number, into: Buffer): Promise<void> {
    return this.go(() => this.hw.read(offset, into));
  }
  write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    return this.go(() => this.hw.write(offset, data, options));
  }
  flush(): Promise<void> {
    return this.go(() => this.hw.flush());
  }
  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    return this.go(() => this.hw.trim(offset, length, options));
  }
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.go(() => this.hw.writeZeroes(offset, length, options));
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    const answer = this.go(() => this.hw.blockStatus(offset, length));
    const held = this.blockStatusHook?.(offset, length);
    return held ? held.then(() => answer) : answer;
  }
  cache(offset: number, length: number): Promise<void> {
    return this.go(() => this.hw.cache(offset, length));
  }
  close(): void {
    this.closed = true;
  }
}
