/**
 * A BlockDevice that passes every call to an inner MemoryDevice: tests
 * subclass it and override only the calls they watch or hold back.
 */
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice, Extent, MaybePromise, WriteOptions, ZeroOptions } from '../../src/blockdev/types.js';

export class PassthroughDevice implements BlockDevice {
  readonly inner: MemoryDevice;

  constructor(size: number, readonly name: string) {
    this.inner = new MemoryDevice(size, name);
  }
  get size(): number {
    return this.inner.size;
  }
  get blockSize() {
    return this.inner.blockSize;
  }
  get capabilities() {
    return this.inner.capabilities;
  }
  read(offset: number, into: Buffer): MaybePromise<void> {
    return this.inner.read(offset, into);
  }
  write(offset: number, data: Buffer, o?: WriteOptions): MaybePromise<void> {
    return this.inner.write(offset, data, o);
  }
  flush(): MaybePromise<void> {
    return this.inner.flush();
  }
  trim(offset: number, length: number, o?: WriteOptions): MaybePromise<void> {
    return this.inner.trim(offset, length, o);
  }
  writeZeroes(offset: number, length: number, o?: ZeroOptions): MaybePromise<void> {
    return this.inner.writeZeroes(offset, length, o);
  }
  blockStatus(offset: number, length: number): MaybePromise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  cache(offset: number, length: number): MaybePromise<void> {
    return this.inner.cache(offset, length);
  }
  close(): MaybePromise<void> {
    return this.inner.close();
  }
}
