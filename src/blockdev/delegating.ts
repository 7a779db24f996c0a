import type { BlockDevice, BlockSizeLimits, BlockStatusOptions, Capabilities, Extent, MaybePromise, WriteOptions, ZeroOptions } from './types.js';

/**
 * A device that passes every call to another: subclasses override the calls
 * they change (nbdkit's filters, in miniature).
 */
export class DelegatingDevice<T extends BlockDevice = BlockDevice> implements BlockDevice {
  constructor(readonly inner: T) {}
  get name(): string {
    return this.inner.name;
  }
  get size(): number {
    return this.inner.size;
  }
  get blockSize(): BlockSizeLimits {
    return this.inner.blockSize;
  }
  get capabilities(): Capabilities {
    return this.inner.capabilities;
  }
  read(offset: number, into: Buffer): MaybePromise<void> {
    return this.inner.read(offset, into);
  }
  write(offset: number, data: Buffer, options?: WriteOptions): MaybePromise<void> {
    return this.inner.write(offset, data, options);
  }
  flush(): MaybePromise<void> {
    return this.inner.flush();
  }
  trim(offset: number, length: number, options?: WriteOptions): MaybePromise<void> {
    return this.inner.trim(offset, length, options);
  }
  writeZeroes(offset: number, length: number, options?: ZeroOptions): MaybePromise<void> {
    return this.inner.writeZeroes(offset, length, options);
  }
  blockStatus(offset: number, length: number, options?: BlockStatusOptions): MaybePromise<Extent[]> {
    return this.inner.blockStatus(offset, length, options);
  }
  cache(offset: number, length: number): MaybePromise<void> {
    return this.inner.cache(offset, length);
  }
  close(): MaybePromise<void> {
    return this.inner.close();
  }
}

/**
 * A device lent to a user that must not close it: the node daemon lends its
 * replicated resources to the pools on them; closing a pool flushes them
 * but leaves them open (the resource outlives the pool: it demotes, resyncs,
 * and is promoted again).
 */
export class BorrowedDevice extends DelegatingDevice {
  /** Flush only: the owner closes the device. */
  override close(): MaybePromise<void> {
    return this.inner.flush();
  }
}
