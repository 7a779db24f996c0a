import {
  BlockDevice,
  BlockSizeLimits,
  Capabilities,
  checkRange,
  Extent,
  EXTENT_HOLE,
  EXTENT_ZERO,
  WriteOptions,
  ZeroOptions,
  BlockDeviceError,
} from './types.js';

/** Granularity of allocation: a chunk exists once any byte of it is written. */
const CHUNK_BYTES = 64 * 1024;

/**
 * A sparse in-memory device: unwritten chunks are holes that read as zeros.
 * Used by tests and as the demo's scratch space; it has no volatile cache,
 * so flush and FUA are trivially honoured.
 */
export class MemoryDevice implements BlockDevice {
  readonly blockSize: BlockSizeLimits = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  readonly capabilities: Capabilities;
  private readonly chunks = new Map<number, Buffer>();
  private closed = false;

  constructor(
    readonly size: number,
    readonly name = 'memory',
    options: { readOnly?: boolean } = {},
  ) {
    if (!Number.isSafeInteger(size) || size < 0) throw new Error(`memory device: bad size ${size}`);
    this.capabilities = {
      readOnly: options.readOnly ?? false,
      flush: true,
      fua: true,
      trim: true,
      fastZero: true,
      extents: true,
      multiConn: true,
      rotational: false,
    };
  }

  /** Bytes of chunks currently allocated. */
  get allocatedBytes(): number {
    return this.chunks.size * CHUNK_BYTES;
  }

  read(offset: number, into: Buffer): void {
    this.check(offset, into.length, false);
    let done = 0;
    while (done < into.length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK_BYTES);
      const within = pos - index * CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, into.length - done);
      const chunk = this.chunks.get(index);
      if (chunk) chunk.copy(into, done, within, within + n);
      else into.fill(0, done, done + n);
      done += n;
    }
  }

  write(offset: number, data: Buffer, _options?: WriteOptions): void {
    this.check(offset, data.length, true);
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK_BYTES);
      const within = pos - index * CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, data.length - done);
      let chunk = this.chunks.get(index);
      if (!chunk) {
        chunk = Buffer.alloc(CHUNK_BYTES);
        this.chunks.set(index, chunk);
      }
      data.copy(chunk, within, done, done + n);
      done += n;
    }
  }

  flush(): void {
    this.check(0, 0, false);
  }

  trim(offset: number, length: number, _options?: WriteOptions): void {
    this.check(offset, length, true);
    this.zero(offset, length, true);
  }

  writeZeroes(offset: number, length: number, options: ZeroOptions = {}): void {
    this.check(offset, length, true);
    this.zero(offset, length, !options.noHole);
  }

  blockStatus(offset: number, length: number): Extent[] {
    this.check(offset, length, false);
    const extents: Extent[] = [];
    const end = Math.min(this.size, offset + Math.max(length, 1));
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / CHUNK_BYTES);
      const chunkEnd = Math.min((index + 1) * CHUNK_BYTES, this.size);
      const flags = this.chunks.has(index) ? 0 : EXTENT_HOLE | EXTENT_ZERO;
      const last = extents[extents.length - 1];
      if (last && last.flags === flags) last.length += chunkEnd - pos;
      else extents.push({ offset: pos, length: chunkEnd - pos, flags });
      pos = chunkEnd;
    }
    return extents;
  }

  cache(offset: number, length: number): void {
    this.check(offset, length, false);
  }

  close(): void {
    this.closed = true;
    this.chunks.clear();
  }

  private zero(offset: number, length: number, deallocate: boolean): void {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK_BYTES);
      const within = pos - index * CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, length - done);
      const chunk = this.chunks.get(index);
      if (deallocate && within === 0 && (n === CHUNK_BYTES || pos + n === this.size)) {
        this.chunks.delete(index);
      } else if (chunk) {
        chunk.fill(0, within, within + n);
      } else if (!deallocate) {
        this.chunks.set(index, Buffer.alloc(CHUNK_BYTES));
      }
      done += n;
    }
  }

  private check(offset: number, length: number, writing: boolean): void {
    if (this.closed) throw new BlockDeviceError('EIO', `${this.name}: device is closed`);
    if (writing && this.capabilities.readOnly) throw new BlockDeviceError('EPERM', `${this.name}: device is read-only`);
    checkRange(this, offset, length, writing ? 'ENOSPC' : 'EINVAL');
  }
}
