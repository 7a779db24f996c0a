import {
  BlockDevice,
  BlockDeviceError,
  BlockErrorCode,
  Capabilities,
  checkRange,
  BlockStatusOptions,
  Extent,
  WriteOptions,
  ZeroOptions,
} from './types.js';

export type FaultOp = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes' | 'blockStatus' | 'cache';

export interface FaultRule {
  op: FaultOp | '*';
  /** Fail only requests touching [offset, offset+length). */
  offset?: number;
  length?: number;
  /** Fail this many matching requests, then stop (default: forever). */
  count?: number;
  /** Fail a matching request with this probability (default 1). */
  probability?: number;
  code?: BlockErrorCode;
}

/** A write not yet made durable: replayed onto the inner device at flush time. */
type Pending = (
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'zero'; offset: number; length: number; noHole: boolean }
  | { kind: 'trim'; offset: number; length: number }
) & {
  /** Already durable (FUA): always part of what survives a power cut. */
  fua: boolean;
};

export interface PowerCutOptions {
  /**
   * 'none': every unflushed write is lost (a disk with a volatile cache that
   * lost all of it). 'random': each unflushed write independently survives
   * with probability 1/2, in order (a disk that had destaged some of it).
   */
  keep?: 'none' | 'random';
  /** PRNG for 'random' (seeded by tests to reproduce a failure). */
  random?: () => number;
}

/**
 * A fault-injecting wrapper (nbdkit's error and delay filters, plus a power
 * switch). The inner device stands for stable storage: writes stay in a
 * volatile write-back cache here until a flush or FUA, so `powerCut()` can
 * drop exactly what a real disk may lose.
 */
export class FaultyDevice implements BlockDevice {
  readonly capabilities: Capabilities;
  private rules: FaultRule[] = [];
  private pending: Pending[] = [];
  private latencyMs = 0;
  private off = false;
  /** Power cuts so far: a flush in flight across one must fail. */
  private cuts = 0;
  /** Counts of calls per op, for tests that check what reached the device. */
  readonly calls: Record<FaultOp, number> = { read: 0, write: 0, flush: 0, trim: 0, writeZeroes: 0, blockStatus: 0, cache: 0 };

  constructor(
    readonly inner: BlockDevice,
    options: { writeBack?: boolean; random?: () => number } = {},
  ) {
    this.writeBack = options.writeBack ?? true;
    this.random = options.random ?? Math.random;
    this.capabilities = { ...inner.capabilities, flush: true, fua: true };
  }

  private readonly writeBack: boolean;
  private readonly random: () => number;

  get name(): string {
    return `faulty(${this.inner.name})`;
  }
  get size(): number {
    return this.inner.size;
  }
  get blockSize() {
    return this.inner.blockSize;
  }
  /** Number of write operations not yet flushed. */
  get unflushedWrites(): number {
    return this.pending.length;
  }

  /** Fail matching requests with an error (EIO by default). */
  failWith(rule: FaultRule): void {
    this.rules.push({ ...rule });
  }
  clearFaults(): void {
    this.rules = [];
    this.latencyMs = 0;
  }
  setLatency(ms: number): void {
    this.latencyMs = ms;
  }

  /**
   * Lose power: unflushed writes are dropped (all, or a random subset), and
   * the device stops answering (every call fails with EIO) until `powerOn()`.
   */
  async powerCut(options: PowerCutOptions = {}): Promise<void> {
    const random = options.random ?? this.random;
    const lost = this.pending;
    this.pending = [];
    this.off = true;
    this.cuts++;
    if (options.keep === 'random') {
      // What survives is a subsequence, in order, of the unflushed ops that
      // contains every FUA op (those were durable when acknowledged). FUA ops
      // are already on the inner device; replaying them in order keeps a later
      // kept write from being overtaken by an earlier one.
      for (const p of lost) if (p.fua || random() < 0.5) await this.applyDurably(p);
    }
  }
  powerOn(): void {
    this.off = false;
  }

  async read(offset: number, into: Buffer): Promise<void> {
    await this.enter('read', offset, into.length);
    await this.inner.read(offset, into);
    // Overlay the volatile cache, oldest first, so the newest write wins.
    for (const p of this.pending) overlay(p, offset, into);
  }

  async write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    await this.enter('write', offset, data.length, true);
    const copy = Buffer.from(data); // the caller may reuse its buffer
    if (!this.writeBack) return this.inner.write(offset, copy, options);
    await this.queue({ kind: 'write', offset, data: copy, fua: options?.fua ?? false });
  }

  async flush(): Promise<void> {
    const cuts = this.cuts;
    await this.enter('flush', 0, 0);
    const batch = this.pending;
    this.pending = [];
    for (let i = 0; i < batch.length; i++) {
      try {
        // FUA ops are replayed too, in order, so an older write cannot land on top of them.
        await this.applyDurably(batch[i]);
      } catch (err) {
        // Not durable after all: keep the rest pending so no later flush reports success for them.
        this.pending = batch.slice(i).concat(this.pending);
        throw err;
      }
    }
    await this.inner.flush();
    // Power lost while this flush ran (it may have taken nothing yet): what it was to make durable is gone.
    if (this.cuts !== cuts) throw new BlockDeviceError('EIO', `${this.name}: power lost during flush`);
  }

  async trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    await this.enter('trim', offset, length, true);
    if (!this.writeBack) return this.inner.trim(offset, length, options);
    await this.queue({ kind: 'trim', offset, length, fua: options?.fua ?? false });
  }

  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    await this.enter('writeZeroes', offset, length, true);
    if (options.fastOnly && !this.inner.capabilities.fastZero) {
      throw new BlockDeviceError('ENOTSUP', `${this.name}: zeroing is not fast here`);
    }
    if (!this.writeBack) return this.inner.writeZeroes(offset, length, options);
    await this.queue({ kind: 'zero', offset, length, noHole: options.noHole ?? false, fua: options.fua ?? false });
  }

  /** Into the volatile cache; a FUA op also goes to stable storage before completing. */
  private async queue(p: Pending): Promise<void> {
    if (p.fua) await this.applyDurably(p);
    this.pending.push(p);
  }

  async blockStatus(offset: number, length: number, options?: BlockStatusOptions): Promise<Extent[]> {
    await this.enter('blockStatus', offset, length);
    const extents = await this.inner.blockStatus(offset, length, options);
    if (this.pending.length === 0) return extents;
    // Unflushed writes make their ranges data; keep it simple and honest.
    return [{ offset, length: Math.min(length, this.size - offset) || 1, flags: 0 }];
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.enter('cache', offset, length);
    await this.inner.cache(offset, length);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.inner.close();
  }

  private closed = false;

  private async enter(op: FaultOp, offset: number, length: number, writing = false): Promise<void> {
    this.calls[op]++;
    if (this.off) throw new BlockDeviceError('EIO', `${this.name}: device has no power`);
    if (this.closed) throw new BlockDeviceError('EIO', `${this.name}: device is closed`);
    // The same checks the inner device makes, before anything is queued.
    if (writing && this.inner.capabilities.readOnly) throw new BlockDeviceError('EPERM', `${this.name}: device is read-only`);
    if (op !== 'flush') checkRange(this, offset, length, writing ? 'ENOSPC' : 'EINVAL');
    if (this.latencyMs > 0) await new Promise((r) => setTimeout(r, this.latencyMs));
    for (const rule of this.rules) {
      if (rule.op !== '*' && rule.op !== op) continue;
      if (rule.count !== undefined && rule.count <= 0) continue;
      if (rule.offset !== undefined) {
        const end = rule.offset + (rule.length ?? 1);
        if (offset + Math.max(length, 1) <= rule.offset || offset >= end) continue;
      }
      if (rule.probability !== undefined && this.random() >= rule.probability) continue;
      if (rule.count !== undefined) rule.count--;
      throw new BlockDeviceError(rule.code ?? 'EIO', `${this.name}: injected ${rule.code ?? 'EIO'} on ${op} at ${offset}`);
    }
  }

  private async applyDurably(p: Pending): Promise<void> {
    if (p.kind === 'write') await this.inner.write(p.offset, p.data);
    else if (p.kind === 'zero') await this.inner.writeZeroes(p.offset, p.length, { noHole: p.noHole });
    else await this.inner.trim(p.offset, p.length);
  }
}

function overlay(p: Pending, offset: number, into: Buffer): void {
  const start = Math.max(p.offset, offset);
  const pLength = p.kind === 'write' ? p.data.length : p.length;
  const end = Math.min(p.offset + pLength, offset + into.length);
  if (start >= end) return;
  if (p.kind === 'write') p.data.copy(into, start - offset, start - p.offset, end - p.offset);
  else into.fill(0, start - offset, end - offset);
}
