import fs from 'node:fs';
import path from 'node:path';
import {
  BlockDevice,
  BlockDeviceError,
  BlockSizeLimits,
  BlockStatusOptions,
  Capabilities,
  checkRange,
  Extent,
  EXTENT_HOLE,
  EXTENT_ZERO,
  WriteOptions,
  ZeroOptions,
} from './types.js';
import { native, blockDeviceSizeOf, NativeOps } from './native.js';
import { blockDeviceInUse, claimFile, DiskClaim, exclusiveOpenFlags } from './claim.js';
import { errnoCode, UserError } from '../util/errors.js';
import { RangeOrder } from '../util/range-order.js';
import { WriteBackoff, WriteBackoffFigures, WriteBackoffOptions } from './write-backoff.js';

export type WriteMode = 'sync' | 'pool' | 'adaptive';

export interface FileDeviceOptions {
  readOnly?: boolean;
  /**
   * Requests up to this many bytes are done with synchronous pread/pwrite on
   * the calling thread; larger ones go to libuv's thread pool so several run
   * in parallel. Measured on this machine (shared/bench/FINDINGS.md): the pool
   * hop halves small-request throughput, while big copies need parallelism.
   * 0 = always asynchronous (safest with a cold cache on a slow disk).
   */
  syncIoMaxBytes?: number;
  /**
   * Where writes of up to syncWriteMaxBytes run (FUA and larger writes
   * always go to the pool):
   * - 'sync' (default): on the calling thread.
   * - 'pool': in libuv's pool. A write into the page cache sleeps when the
   *   kernel throttles dirty pages (up to 200 ms a call, measured 140-250 ms
   *   on the node daemon under write load), and on the calling thread that
   *   stops everything else its event loop does (peer links, exports).
   * - 'adaptive': on the calling thread while writes are fast, in the pool
   *   for a growing back-off after one was slow (write-backoff.ts): most
   *   of 'sync''s rate (the pool hop halves the small-write rate) with the
   *   pool's loop delay (bench/README.md). The node daemon's disks
   *   (cluster/disk-options.ts).
   */
  writeMode?: WriteMode;
  /** The largest write 'sync' and 'adaptive' may do on the calling thread (default: syncIoMaxBytes; 0 = 'pool'). */
  syncWriteMaxBytes?: number;
  /** Tuning of 'adaptive' (and its clock, for tests). */
  adaptive?: WriteBackoffOptions;
  /** Use the native add-on when present (tests turn it off to cover the fallback). */
  useNative?: boolean;
  /**
   * Claim the disk for this open (claim.ts): default true. Only a serve
   * worker thread passes false, re-opening what its process already holds.
   */
  exclusive?: boolean;
}

const DEFAULT_SYNC_IO_MAX_BYTES = Number(process.env.DUET_SYNC_IO_MAX_BYTES ?? 64 * 1024);
const ZERO_BUFFER = Buffer.alloc(1024 * 1024);
const EXTENTS_MAX = 1024;
/** Time one blockStatus call may spend walking extents on the event loop. */
const BLOCK_STATUS_BUDGET_MS = 2;
const CACHE_BYTES_MAX = 64 * 1024 * 1024;

/**
 * A regular file or a block device. flush = fdatasync; FUA = a write through a
 * second descriptor opened O_DSYNC. Holes are punched and seen only with the
 * native add-on; without it the capabilities say so and the NBD server does
 * not advertise trim, fast zero or real extents.
 */
export class FileDevice implements BlockDevice {
  readonly blockSize: BlockSizeLimits = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  readonly capabilities: Capabilities;
  private fd: number;
  private dsyncFd = -1;
  private readonly syncIoMaxBytes: number;
  private readonly syncWriteMaxBytes: number;
  private readonly backoff: WriteBackoff | undefined;
  private readonly ops: NativeOps | null;
  private claim: DiskClaim | undefined;
  private closed = false;
  /**
   * Writes, trims and zeroings still under way in the pool. A later one that
   * overlaps them waits for them: done on the spot, it would overtake them
   * (two pool writes could as well, on two pool threads) and the older data
   * would win.
   */
  private readonly pending = new RangeOrder();
  /** Requests under way in libuv's pool: the descriptors stay open until they are over (close). */
  private inPool = 0;
  private drained: (() => void) | undefined;
  /** A close waiting for the pool: every caller of close waits for the same one. */
  private closing: Promise<void> | undefined;

  private constructor(
    readonly name: string,
    fd: number,
    readonly size: number,
    private readonly isBlockDevice: boolean,
    readOnly: boolean,
    options: FileDeviceOptions,
    rotational: boolean,
  ) {
    this.fd = fd;
    this.ops = options.useNative === false ? null : native;
    this.syncIoMaxBytes = options.syncIoMaxBytes ?? DEFAULT_SYNC_IO_MAX_BYTES;
    const writeMode = options.writeMode ?? 'sync';
    this.syncWriteMaxBytes = writeMode === 'pool' ? 0 : (options.syncWriteMaxBytes ?? this.syncIoMaxBytes);
    if (writeMode === 'adaptive') this.backoff = new WriteBackoff(options.adaptive);
    const holes = this.ops !== null;
    this.capabilities = {
      readOnly,
      flush: true,
      fua: true,
      trim: holes && !readOnly,
      fastZero: holes && !readOnly && !isBlockDevice,
      extents: holes && !isBlockDevice,
      multiConn: true,
      rotational,
    };
  }

  /**
   * Open PATH; errors are one-line UserErrors naming the path. The disk is
   * claimed for this open (claim.ts): held elsewhere, it is refused with
   * DiskInUse naming the holder.
   */
  static open(filePath: string, options: FileDeviceOptions = {}): FileDevice {
    const readOnly = options.readOnly ?? false;
    const exclusive = options.exclusive ?? true;
    const ops = options.useNative === false ? null : native;
    const excl = exclusive ? exclusiveOpenFlags(filePath) : 0;
    let fd: number;
    try {
      fd = fs.openSync(filePath, (readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR) | excl);
    } catch (err) {
      if (excl !== 0 && errnoCode(err) === 'EBUSY') throw blockDeviceInUse(filePath);
      throw openError(filePath, err, readOnly);
    }
    let claim: DiskClaim | undefined;
    try {
      const st = fs.fstatSync(fd);
      let size: number;
      let rotational = false;
      if (st.isFile()) {
        size = st.size;
        if (exclusive) claim = claimFile(filePath, fd, ops, readOnly);
      } else if (st.isBlockDevice()) {
        size = blockDeviceSizeOf(filePath, fd);
        rotational = readRotational(filePath);
      } else {
        throw new UserError(`${filePath}: not a regular file or block device`);
      }
      const dev = new FileDevice(filePath, fd, size, st.isBlockDevice(), readOnly, options, rotational);
      dev.claim = claim;
      // Not O_EXCL: this second descriptor shares the first one's claim.
      if (!readOnly) dev.dsyncFd = fs.openSync(filePath, fs.constants.O_WRONLY | fs.constants.O_DSYNC);
      return dev;
    } catch (err) {
      claim?.release();
      fs.closeSync(fd);
      throw err;
    }
  }

  read(offset: number, into: Buffer): void | Promise<void> {
    this.check(offset, into.length, false);
    if (into.length <= this.syncIoMaxBytes) {
      this.preadSync(into, offset);
      return;
    }
    return this.preadAsync(into, offset);
  }

  write(offset: number, data: Buffer, options?: WriteOptions): void | Promise<void> {
    this.check(offset, data.length, true);
    return this.inOrder(offset, data.length, () => this.writeNow(offset, data, options));
  }

  private writeNow(offset: number, data: Buffer, options?: WriteOptions): void | Promise<void> {
    this.stillOpen();
    // FUA waits for the disk: never on the event loop.
    if (options?.fua) return this.pwriteAsync(this.dsyncFd, data, offset);
    if (data.length > this.syncWriteMaxBytes) return this.pwriteAsync(this.fd, data, offset);
    if (!this.backoff) {
      this.pwriteSync(data, offset);
      return;
    }
    const started = this.backoff.begin();
    if (started === undefined) return this.pwriteAsync(this.fd, data, offset);
    this.pwriteSync(data, offset);
    this.backoff.end(started);
  }

  /** Where the small writes of an 'adaptive' device went, and its back-off (undefined in the other modes). */
  writeBackoff(): WriteBackoffFigures | undefined {
    return this.backoff?.stats();
  }

  flush(): Promise<void> {
    this.check(0, 0, false);
    return this.pooled(new Promise((resolve, reject) =>
      fs.fdatasync(this.fd, (err) => (err ? reject(ioError(this.name, 'flush', err)) : resolve())),
    ));
  }

  trim(offset: number, length: number, options?: WriteOptions): void | Promise<void> {
    this.check(offset, length, true);
    if (!this.ops || length === 0) return; // trim is advisory: doing nothing is correct
    return this.inOrder(offset, length, () => this.trimNow(offset, length, options));
  }

  private trimNow(offset: number, length: number, options?: WriteOptions): void | Promise<void> {
    this.stillOpen();
    if (!this.ops) return;
    try {
      if (this.isBlockDevice) this.ops.discard(this.fd, offset, length);
      else this.ops.punchHole(this.fd, offset, length);
    } catch (err) {
      if (!isUnsupported(err)) throw ioError(this.name, 'trim', err);
    }
    if (options?.fua) return this.flush();
  }

  writeZeroes(offset: number, length: number, options: ZeroOptions = {}): void | Promise<void> {
    this.check(offset, length, true);
    if (length === 0) return;
    return this.inOrder(offset, length, () => this.writeZeroesNow(offset, length, options));
  }

  private writeZeroesNow(offset: number, length: number, options: ZeroOptions): void | Promise<void> {
    this.stillOpen();
    if (this.ops && !this.isBlockDevice) {
      try {
        if (options.noHole) this.ops.zeroRange(this.fd, offset, length);
        else this.ops.punchHole(this.fd, offset, length);
        return options.fua ? this.flush() : undefined;
      } catch (err) {
        if (!isUnsupported(err)) throw ioError(this.name, 'write zeroes', err);
      }
    }
    if (options.fastOnly) throw new BlockDeviceError('ENOTSUP', `${this.name}: zeroing is not faster than writing here`);
    return this.writeZeroBuffers(offset, length, options.fua ?? false);
  }

  /**
   * Holes and data by lseek SEEK_DATA/SEEK_HOLE. Each call is synchronous
   * and waits for the file's lock (held by writes under way and writeback):
   * measured 160 ms for one look over a fragmented 64 MiB on the node
   * daemon. So the walk stops after EXTENTS_MAX extents or
   * BLOCK_STATUS_BUDGET_MS (callers take fewer extents than asked for as
   * "ask again from there"), and after the first with `firstOnly`.
   */
  blockStatus(offset: number, length: number, options: BlockStatusOptions = {}): Extent[] {
    this.check(offset, length, false);
    const end = Math.min(this.size, offset + Math.max(length, 1));
    if (!this.ops || this.isBlockDevice) return [{ offset, length: end - offset, flags: 0 }];
    const extents: Extent[] = [];
    const most = options.firstOnly ? 1 : EXTENTS_MAX;
    const started = performance.now();
    let pos = offset;
    try {
      while (pos < end && extents.length < most && (extents.length === 0 || performance.now() - started < BLOCK_STATUS_BUDGET_MS)) {
        let data = this.ops.seekData(this.fd, pos);
        if (data < 0 || data > end) data = end;
        if (data > pos) {
          extents.push({ offset: pos, length: data - pos, flags: EXTENT_HOLE | EXTENT_ZERO });
          pos = data;
          continue;
        }
        let hole = this.ops.seekHole(this.fd, pos);
        if (hole < 0 || hole > end) hole = end;
        if (hole <= pos) hole = end; // defensive: never loop without progress
        extents.push({ offset: pos, length: hole - pos, flags: 0 });
        pos = hole;
      }
    } catch (err) {
      if (extents.length === 0) return [{ offset, length: end - offset, flags: 0 }];
    }
    return extents;
  }

  async cache(offset: number, length: number): Promise<void> {
    this.check(offset, length, false);
    // No posix_fadvise in Node: reading the range populates the page cache.
    // Advisory only, so bound the work one request can cause.
    length = Math.min(length, CACHE_BYTES_MAX);
    const scratch = Buffer.allocUnsafe(Math.min(length, 1024 * 1024));
    for (let done = 0; done < length; ) {
      const n = Math.min(scratch.length, length - done);
      await this.preadAsync(scratch.subarray(0, n), offset + done);
      done += n;
    }
  }

  close(): void | Promise<void> {
    if (this.closed) return this.closing;
    this.closed = true;
    const closeFds = (): void => {
      this.claim?.release();
      fs.closeSync(this.fd);
      if (this.dsyncFd >= 0) fs.closeSync(this.dsyncFd);
    };
    // Closed now, a descriptor number is the next open's: a request still in the pool would land there.
    if (this.inPool === 0) return closeFds();
    this.closing = new Promise((resolve) => (this.drained = () => resolve(closeFds())));
    return this.closing;
  }

  private stillOpen(): void {
    if (this.closed) throw new BlockDeviceError('EIO', `${this.name}: device is closed`);
  }

  private pooled<T>(work: Promise<T>): Promise<T> {
    this.inPool++;
    const over = (): void => {
      if (--this.inPool === 0 && this.drained) this.drained();
    };
    work.then(over, over);
    return work;
  }

  /**
   * Run a change of [offset, offset+length) now, or after the earlier ones
   * it overlaps that are still under way; one that returns a promise is
   * remembered until it settles. Nothing under way (the common case with
   * writes on the calling thread): one size check, and errors still throw.
   */
  private inOrder(offset: number, length: number, fn: () => void | Promise<void>): void | Promise<void> {
    if (this.pending.size > 0 && this.pending.settled(offset, length)) return this.pending.run(offset, length, fn);
    const result = fn();
    if (!(result instanceof Promise)) return result;
    return this.pending.run(offset, length, () => result);
  }

  private check(offset: number, length: number, writing: boolean): void {
    if (this.closed) throw new BlockDeviceError('EIO', `${this.name}: device is closed`);
    if (writing && this.capabilities.readOnly) throw new BlockDeviceError('EPERM', `${this.name}: export is read-only`);
    checkRange(this, offset, length, writing ? 'ENOSPC' : 'EINVAL');
  }

  private preadSync(into: Buffer, offset: number): void {
    let done = 0;
    try {
      while (done < into.length) {
        const n = fs.readSync(this.fd, into, done, into.length - done, offset + done);
        if (n === 0) throw new BlockDeviceError('EIO', `${this.name}: unexpected end of file at ${offset + done}`);
        done += n;
      }
    } catch (err) {
      throw ioError(this.name, 'read', err);
    }
  }

  private pwriteSync(data: Buffer, offset: number): void {
    let done = 0;
    try {
      while (done < data.length) done += fs.writeSync(this.fd, data, done, data.length - done, offset + done);
    } catch (err) {
      throw ioError(this.name, 'write', err);
    }
  }

  private preadAsync(into: Buffer, offset: number): Promise<void> {
    return this.pooled(new Promise((resolve, reject) => {
      const step = (done: number): void => {
        fs.read(this.fd, into, done, into.length - done, offset + done, (err, n) => {
          if (err) return reject(ioError(this.name, 'read', err));
          if (n === 0) return reject(new BlockDeviceError('EIO', `${this.name}: unexpected end of file at ${offset + done}`));
          if (done + n < into.length) return step(done + n);
          resolve();
        });
      };
      step(0);
    }));
  }

  private pwriteAsync(fd: number, data: Buffer, offset: number): Promise<void> {
    return this.pooled(new Promise((resolve, reject) => {
      const step = (done: number): void => {
        fs.write(fd, data, done, data.length - done, offset + done, (err, n) => {
          if (err) return reject(ioError(this.name, 'write', err));
          if (done + n < data.length) return step(done + n);
          resolve();
        });
      };
      step(0);
    }));
  }

  private async writeZeroBuffers(offset: number, length: number, fua: boolean): Promise<void> {
    for (let done = 0; done < length; ) {
      const n = Math.min(ZERO_BUFFER.length, length - done);
      await this.pwriteAsync(this.fd, ZERO_BUFFER.subarray(0, n), offset + done);
      done += n;
    }
    if (fua) await this.flush();
  }
}

function isUnsupported(err: unknown): boolean {
  const code = errnoCode(err);
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'ENOTTY';
}

function ioError(name: string, op: string, err: unknown): BlockDeviceError {
  if (err instanceof BlockDeviceError) return err;
  const code = errnoCode(err);
  const mapped = code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG' ? 'ENOSPC' : code === 'EROFS' || code === 'EPERM' ? 'EPERM' : 'EIO';
  return new BlockDeviceError(mapped, `${name}: ${op} failed: ${code ?? (err as Error).message}`);
}

function openError(filePath: string, err: unknown, readOnly: boolean): UserError {
  switch (errnoCode(err)) {
    case 'ENOENT':
      return new UserError(`${filePath}: no such file or block device (create it first, e.g. truncate -s 1G ${filePath})`);
    case 'EACCES':
    case 'EPERM':
      return new UserError(`${filePath}: permission denied${readOnly ? '' : ' (use --read-only to export it read-only)'}`);
    case 'EROFS':
      return new UserError(`${filePath}: read-only file system (use --read-only)`);
    case 'EISDIR':
      return new UserError(`${filePath}: is a directory, not a file or block device`);
    case 'EBUSY':
      return new UserError(`${filePath}: device is busy (in use by another program)`);
    default:
      return new UserError(`${filePath}: cannot open: ${(err as Error).message}`);
  }
}

function readRotational(devicePath: string): boolean {
  try {
    const base = path.basename(fs.realpathSync(devicePath));
    return fs.readFileSync(`/sys/class/block/${base}/queue/rotational`, 'utf8').trim() === '1';
  } catch {
    return false;
  }
}
