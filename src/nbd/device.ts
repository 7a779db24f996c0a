/**
 * A BlockDevice backed by a remote NBD export, so an NBD server (ours,
 * nbdkit, qemu-nbd) can stand in for a local device in any layer.
 */
import {
  BlockDeviceError,
  checkRange,
  type BlockDevice,
  type BlockErrorCode,
  type BlockSizeLimits,
  type Capabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from '../blockdev/types.js';
import { NbdClient, NbdError, type NbdConnectOptions } from './client.js';
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  BASE_ALLOCATION,
} from './protocol.js';

/** Spec defaults when the server sends no NBD_INFO_BLOCK_SIZE. */
const DEFAULT_BLOCK_SIZE: BlockSizeLimits = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
/** Split trim/zero/cache/block-status ranges (lengths are 32-bit on the wire). */
const RANGE_CHUNK = 1024 * 1024 * 1024;
/** Buffer size for emulated write-zeroes. */
const ZERO_CHUNK = 1024 * 1024;

const BLOCK_CODES: ReadonlySet<string> = new Set<BlockErrorCode>([
  'EIO', 'ENOSPC', 'EPERM', 'EINVAL', 'ENOTSUP', 'ENOMEM', 'ESHUTDOWN', 'EOVERFLOW',
]);

function blockCode(code: string): BlockErrorCode {
  return BLOCK_CODES.has(code) ? (code as BlockErrorCode) : 'EIO';
}

/** NbdError (or anything else) → BlockDeviceError with the matching code. */
export function toBlockDeviceError(err: unknown): BlockDeviceError {
  if (err instanceof BlockDeviceError) return err;
  if (err instanceof NbdError) {
    const e = new BlockDeviceError(blockCode(err.code), err.message);
    e.cause = err;
    return e;
  }
  const e = new BlockDeviceError('EIO', err instanceof Error ? err.message : String(err));
  e.cause = err;
  return e;
}

export class NbdDevice implements BlockDevice {
  readonly name: string;
  readonly size: number;
  readonly blockSize: BlockSizeLimits;
  readonly capabilities: Capabilities;

  constructor(readonly client: NbdClient, name?: string) {
    const f = client.transmissionFlags;
    const has = (flag: number): boolean => (f & flag) !== 0;
    this.name = name ?? client.uri;
    this.size = client.size;
    const bs = client.blockSize ?? DEFAULT_BLOCK_SIZE;
    this.blockSize = { minimum: bs.minimum, preferred: bs.preferred, maximum: Math.min(bs.maximum, DEFAULT_BLOCK_SIZE.maximum) };
    this.capabilities = {
      readOnly: has(NBD_FLAG_READ_ONLY),
      flush: has(NBD_FLAG_SEND_FLUSH),
      fua: has(NBD_FLAG_SEND_FUA) || has(NBD_FLAG_SEND_FLUSH),
      trim: has(NBD_FLAG_SEND_TRIM),
      fastZero: has(NBD_FLAG_SEND_WRITE_ZEROES) && has(NBD_FLAG_SEND_FAST_ZERO),
      extents: client.structuredReplies && client.metaContexts.has(BASE_ALLOCATION),
      multiConn: has(NBD_FLAG_CAN_MULTI_CONN),
      rotational: has(NBD_FLAG_ROTATIONAL),
    };
  }

  /** Connect to an NBD export. Connection and handshake failures are NbdError (clear, with the server address). */
  static async open(opts: NbdConnectOptions): Promise<NbdDevice> {
    return new NbdDevice(await NbdClient.connect(opts));
  }

  private has(flag: number): boolean {
    return (this.client.transmissionFlags & flag) !== 0;
  }

  private checkWritable(): void {
    if (this.capabilities.readOnly) throw new BlockDeviceError('EPERM', `${this.name}: the export is read-only`);
  }

  /** Split [offset, offset+length) into pieces of at most `step` bytes and run them concurrently. */
  private async pieces(offset: number, length: number, step: number, fn: (off: number, len: number) => Promise<void>): Promise<void> {
    if (length <= step) return fn(offset, length);
    const all: Promise<void>[] = [];
    for (let at = 0; at < length; at += step) all.push(fn(offset + at, Math.min(step, length - at)));
    await Promise.all(all);
  }

  async read(offset: number, into: Buffer): Promise<void> {
    checkRange(this, offset, into.length);
    try {
      await this.pieces(offset, into.length, this.blockSize.maximum, (off, len) =>
        this.client.readInto(off, into.subarray(off - offset, off - offset + len)),
      );
    } catch (err) {
      throw toBlockDeviceError(err);
    }
  }

  async write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    checkRange(this, offset, data.length);
    this.checkWritable();
    const nativeFua = options?.fua === true && this.has(NBD_FLAG_SEND_FUA);
    try {
      await this.pieces(offset, data.length, this.blockSize.maximum, (off, len) =>
        this.client.write(off, data.subarray(off - offset, off - offset + len), { fua: nativeFua }),
      );
      if (options?.fua && !nativeFua && this.capabilities.flush) await this.client.flush();
    } catch (err) {
      throw toBlockDeviceError(err);
    }
  }

  async flush(): Promise<void> {
    if (!this.capabilities.flush) return; // no volatile cache advertised
    try {
      await this.client.flush();
    } catch (err) {
      throw toBlockDeviceError(err);
    }
  }

  async trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    checkRange(this, offset, length);
    this.checkWritable();
    if (!this.capabilities.trim || length === 0) return; // trim is advisory
    const nativeFua = options?.fua === true && this.has(NBD_FLAG_SEND_FUA);
    try {
      await this.pieces(offset, length, RANGE_CHUNK, (off, len) => this.client.trim(off, len, { fua: nativeFua }));
      if (options?.fua && !nativeFua && this.capabilities.flush) await this.client.flush();
    } catch (err) {
      throw toBlockDeviceError(err);
    }
  }

  async writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    checkRange(this, offset, length);
    this.checkWritable();
    if (options?.fastOnly && !this.capabilities.fastZero) {
      throw new BlockDeviceError('ENOTSUP', `${this.name}: the server does not support fast zeroing`);
    }
    if (length === 0) return;
    const nativeFua = options?.fua === true && this.has(NBD_FLAG_SEND_FUA);
    try {
      if (this.has(NBD_FLAG_SEND_WRITE_ZEROES)) {
        const opts = { fua: nativeFua, noHole: options?.noHole, fastZero: options?.fastOnly };
        await this.pieces(offset, length, RANGE_CHUNK, (off, len) => this.client.writeZeroes(off, len, opts));
      } else {
        // Emulate with plain writes, one shared zero buffer, sequential chunks.
        const step = Math.min(ZERO_CHUNK, this.blockSize.maximum);
        const zeros = Buffer.alloc(Math.min(step, length));
        for (let at = 0; at < length; at += step) {
          const n = Math.min(step, length - at);
          await this.client.write(offset + at, n === zeros.length ? zeros : zeros.subarray(0, n), { fua: nativeFua });
        }
      }
      if (options?.fua && !nativeFua && this.capabilities.flush) await this.client.flush();
    } catch (err) {
      throw toBlockDeviceError(err);
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    checkRange(this, offset, length);
    if (offset >= this.size) return [];
    const want = Math.min(Math.max(length, 1), RANGE_CHUNK);
    if (!this.capabilities.extents) return [{ offset, length: want, flags: 0 }];
    try {
      const extents = await this.client.blockStatus(offset, want);
      const out: Extent[] = [];
      let at = offset;
      for (const e of extents) {
        out.push({ offset: at, length: e.length, flags: e.flags });
        at += e.length;
      }
      return out;
    } catch (err) {
      throw toBlockDeviceError(err);
    }
  }

  async cache(offset: number, length: number): Promise<void> {
    checkRange(this, offset, length);
    if (!this.has(NBD_FLAG_SEND_CACHE) || length === 0) return; // advisory
    try {
      await this.pieces(offset, length, RANGE_CHUNK, (off, len) => this.client.cache(off, len));
    } catch (err) {
      throw toBlockDeviceError(err);
    }
  }

  async close(): Promise<void> {
    await this.client.disconnect();
  }
}
