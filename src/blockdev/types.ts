/**
 * The one interface every storage layer implements (file, memory, faulty,
 * later volume and replicated resource), so layers stack and the NBD server
 * can serve any of them. Modelled on nbdkit's `struct backend`: explicit
 * capabilities plus the data path.
 *
 * Data-path methods may complete synchronously (return void / a value) or
 * asynchronously (return a Promise). The synchronous path exists because a
 * promise per 4 KiB request costs real throughput in Node (see
 * shared/bench/FINDINGS.md); callers that do not care simply `await`.
 */

export type MaybePromise<T> = T | Promise<T>;

/** base:allocation flags, same values as the NBD spec's NBD_STATE_*. */
export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

export interface Extent {
  offset: number;
  length: number;
  /** EXTENT_HOLE | EXTENT_ZERO, 0 = allocated data (or unknown). */
  flags: number;
}

export interface BlockSizeLimits {
  /** Smallest addressable unit; requests must be aligned to it. Power of 2, 1..65536. */
  minimum: number;
  /** Size below which read-modify-write or other penalties occur. */
  preferred: number;
  /** Largest single request this device accepts. */
  maximum: number;
}

export interface Capabilities {
  readOnly: boolean;
  /** flush() makes earlier writes durable (the device has a volatile cache). */
  flush: boolean;
  /** write(..., {fua}) is honoured (natively or by the device itself). */
  fua: boolean;
  /** trim() really deallocates (reads may then return zeros or old data). */
  trim: boolean;
  /** writeZeroes() can deallocate or zero without writing data (fast). */
  fastZero: boolean;
  /** blockStatus() reports real holes/zeros, not just "all data". */
  extents: boolean;
  /**
   * Writes, flushes and FUA are visible and durable across every handle of
   * this device in the process (one cache): NBD_FLAG_CAN_MULTI_CONN.
   */
  multiConn: boolean;
  rotational: boolean;
}

export interface WriteOptions {
  /** Force unit access: durable before the call completes. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** Must stay allocated (no hole may be punched). */
  noHole?: boolean;
  /** Fail with ENOTSUP at once unless zeroing is faster than writing. */
  fastOnly?: boolean;
}

export interface BlockDevice {
  /** Human name for logs and errors (path, volume name...). */
  readonly name: string;
  readonly size: number;
  readonly blockSize: BlockSizeLimits;
  readonly capabilities: Capabilities;

  /** Fill `into` with the bytes at `offset` (into.length bytes). */
  read(offset: number, into: Buffer): MaybePromise<void>;
  write(offset: number, data: Buffer, options?: WriteOptions): MaybePromise<void>;
  flush(): MaybePromise<void>;
  trim(offset: number, length: number, options?: WriteOptions): MaybePromise<void>;
  writeZeroes(offset: number, length: number, options?: ZeroOptions): MaybePromise<void>;
  /** Extents covering at least [offset, offset+1), contiguous from offset, within the device. */
  blockStatus(offset: number, length: number, options?: BlockStatusOptions): MaybePromise<Extent[]>;
  /** Advisory: warm caches for this range. */
  cache(offset: number, length: number): MaybePromise<void>;
  close(): MaybePromise<void>;
}

export interface BlockStatusOptions {
  /** Only the first extent is wanted (is this a hole, and how long?): a device may stop after it. */
  firstOnly?: boolean;
}

/** errno-like codes a device may raise; the NBD server maps them to NBD errors. */
export type BlockErrorCode = 'EIO' | 'ENOSPC' | 'EPERM' | 'EINVAL' | 'ENOTSUP' | 'ENOMEM' | 'ESHUTDOWN' | 'EOVERFLOW';

export class BlockDeviceError extends Error {
  constructor(readonly code: BlockErrorCode, message: string) {
    super(message);
    this.name = 'BlockDeviceError';
  }
}

/** Range check shared by every device: one choke point, as nbdkit's backend.c. */
export function checkRange(dev: { size: number; name: string }, offset: number, length: number, code: BlockErrorCode = 'EINVAL'): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > dev.size) {
    throw new BlockDeviceError(code, `${dev.name}: range ${offset}+${length} is outside the device (size ${dev.size})`);
  }
}
