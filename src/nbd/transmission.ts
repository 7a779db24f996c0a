/**
 * The transmission phase (doc/proto.md "Transmission"): parse requests as
 * they stream in, check each once, run it on the export's BlockDevice and
 * send simple or structured replies. This is the hot path: requests that the
 * device completes synchronously are answered inline with no promise, reply
 * headers come from a slab instead of one allocation each, and every reply
 * produced by one batch of pipelined requests leaves in one writev.
 */
import type { Socket } from 'node:net';
import type { BlockDevice, Extent } from '../blockdev/types.js';
import { BlockDeviceError } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import { ByteQueue } from './bytequeue.js';
import type { Negotiated } from './handshake.js';
import * as P from './protocol.js';
import { now, since, type ExportStats } from './io-stats.js';

/** Reads at least this long look for holes first and send them as OFFSET_HOLE. */
const SPARSE_READ_MIN_BYTES = 64 * 1024;
const SLAB_BYTES = 1024 * 1024;
/** Write payloads at least this long are gathered into their own buffer as they arrive. */
const ASSEMBLE_MIN_BYTES = 128 * 1024;
const SLAB_OBJECT_MAX_BYTES = 64 * 1024 + 64;
const TWO_32 = 2 ** 32;

/**
 * Large buffers (write payloads, read replies) kept for reuse: a fresh
 * 1 MiB allocation costs page faults and kernel zeroing every time (seen as
 * ~8 % of a sequential write's CPU with perf). Bounded in bytes.
 */
class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  get(n: number): Buffer {
    const list = this.free.get(n);
    const b = list?.pop();
    if (b) {
      this.pooledBytes -= n;
      return b;
    }
    return Buffer.allocUnsafe(n);
  }

  put(b: Buffer): void {
    if (b.length < POOL_BUFFER_MIN_BYTES || this.pooledBytes + b.length > POOL_BYTES_MAX) return;
    let list = this.free.get(b.length);
    if (!list) {
      if (this.free.size >= POOL_SIZES_MAX) return;
      list = [];
      this.free.set(b.length, list);
    }
    list.push(b);
    this.pooledBytes += b.length;
  }
}

const POOL_BUFFER_MIN_BYTES = 128 * 1024;
const POOL_BYTES_MAX = 64 * 1024 * 1024;
const POOL_SIZES_MAX = 16;
/** One pool for the process: every connection runs on this thread. */
const largeBuffers = new BufferPool();

/** Carves small reply buffers out of 1 MiB slabs (Node's own pool stops at 4 KiB). */
class Slab {
  private slab = Buffer.allocUnsafe(SLAB_BYTES);
  private used = 0;

  alloc(n: number): Buffer {
    if (n > SLAB_OBJECT_MAX_BYTES) return Buffer.allocUnsafe(n);
    if (this.used + n > SLAB_BYTES) {
      this.slab = Buffer.allocUnsafe(SLAB_BYTES);
      this.used = 0;
    }
    const out = this.slab.subarray(this.used, this.used + n);
    this.used += (n + 7) & ~7; // keep 8-byte alignment
    return out;
  }
}

export interface TransmissionHooks {
  /** The client sent NBD_CMD_DISC, or the framing broke: finish and close. */
  onDisconnect(reason: string): void;
  /** Count of requests and bytes, for metrics. */
  stats: TransmissionStats;
  /** The export's requests, bytes and latency by operation (metrics). */
  exportStats?: ExportStats;
}

export interface TransmissionStats {
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
}

export class Transmission {
  private dispatchedAt = 0;
  private device: BlockDevice;
  private readonly structured: boolean;
  private readonly baseAllocation: boolean;
  private readonly flags: number;
  private readonly readOnly: boolean;
  private readonly slab = new Slab();
  private inFlight = 0;
  /** Payload bytes of an oversized write still to discard, and its pending error reply. */
  private skipping = 0;
  private skipReply: { hi: number; lo: number; message: string } | null = null;
  /** The pooled payload of the write being dispatched; complete() takes it if the write goes async. */
  private pooledPayload: Buffer | null = null;
  /** A large write whose payload is still arriving. */
  private assembling: { target: Buffer; filled: number; cmdFlags: number; hi: number; lo: number; offset: number } | null = null;
  private paused = false;
  private stopped = false;
  private tickHeld = false;
  private idleWaiters: (() => void)[] = [];

  constructor(
    private readonly socket: Socket,
    private readonly queue: ByteQueue,
    negotiated: Negotiated,
    private readonly log: Logger,
    private readonly hooks: TransmissionHooks,
  ) {
    this.device = negotiated.export.device;
    this.structured = negotiated.structuredReplies;
    this.baseAllocation = negotiated.baseAllocation;
    this.flags = negotiated.transmissionFlags;
    this.readOnly = (this.flags & P.NBD_FLAG_READ_ONLY) !== 0;
    socket.on('drain', () => this.maybeResume());
  }

  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** Stop taking new requests (shutdown or DISC); resolves when in-flight ones are answered. */
  stop(): Promise<void> {
    this.stopped = true;
    this.socket.pause();
    return this.idle();
  }

  /** After stop(): serve `device` instead (a RetiredDevice) and take requests again. */
  retire(device: BlockDevice): void {
    this.device = device;
    this.stopped = false;
    this.socket.resume();
    this.process();
  }

  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Where the next socket read should land: the rest of a large write
   * payload being assembled, or null for the ordinary queue.
   */
  directTarget(): Buffer | null {
    const a = this.assembling;
    return a === null ? null : a.target.subarray(a.filled);
  }

  /** n bytes were read straight into directTarget(). */
  directReceived(n: number): void {
    const a = this.assembling!;
    a.filled += n;
    if (a.filled === a.target.length) this.assembled();
  }

  /** Copy queued bytes into the payload being assembled; true when it is complete. */
  private fillFromQueue(): boolean {
    const a = this.assembling!;
    const q = this.queue;
    while (a.filled < a.target.length && q.length > 0) {
      const [buf, pos] = q.contiguous(1);
      const n = Math.min(buf.length - pos, a.target.length - a.filled);
      buf.copy(a.target, a.filled, pos, pos + n);
      q.skip(n);
      a.filled += n;
    }
    if (a.filled < a.target.length) return false;
    this.assembled();
    return true;
  }

  private assembled(): void {
    const a = this.assembling!;
    this.assembling = null;
    this.pooledPayload = a.target;
    this.dispatch(P.NBD_CMD_WRITE, a.cmdFlags, a.hi, a.lo, a.offset, a.target.length, a.target);
    // Still set: the write was refused or completed synchronously.
    if (this.pooledPayload !== null) {
      largeBuffers.put(this.pooledPayload);
      this.pooledPayload = null;
    }
  }

  /** Parse and run every complete request in the queue. */
  process(): void {
    // Several requests waiting (pipelining): gather the replies the device
    // gives synchronously into one writev. A lone request is answered at once.
    const batch = this.queue.length >= 2 * P.REQUEST_SIZE;
    if (batch) this.socket.cork();
    try {
      this.processQueue();
    } finally {
      if (batch) this.socket.uncork();
    }
  }

  private processQueue(): void {
    const q = this.queue;
    if (this.assembling !== null && !this.fillFromQueue()) return;
    while (!this.stopped) {
      if (this.skipping > 0) {
        const n = Math.min(this.skipping, q.length);
        q.skip(n);
        this.skipping -= n;
        if (this.skipping > 0) return;
        const r = this.skipReply!;
        this.skipReply = null;
        this.replyError(r.hi, r.lo, P.NBD_EINVAL, r.message, null);
      }
      if (this.inFlight >= P.LIMITS.inFlightPerConnectionMax || this.socket.writableLength > P.LIMITS.queuedReplyBytesMax) {
        this.pause();
        return;
      }
      if (q.length < P.REQUEST_SIZE) return;
      const [buf, pos] = q.contiguous(P.REQUEST_SIZE);
      if (buf.readUInt32BE(pos) !== P.NBD_REQUEST_MAGIC) {
        this.hooks.onDisconnect('bad request magic');
        return;
      }
      const cmdFlags = buf.readUInt16BE(pos + 4);
      const type = buf.readUInt16BE(pos + 6);
      const cookieHi = buf.readUInt32BE(pos + 8);
      const cookieLo = buf.readUInt32BE(pos + 12);
      const offsetHi = buf.readUInt32BE(pos + 16);
      const offset = offsetHi * TWO_32 + buf.readUInt32BE(pos + 20);
      const length = buf.readUInt32BE(pos + 24);
      let payload: Buffer | null = null;
      if (type === P.NBD_CMD_WRITE) {
        if (length > P.LIMITS.requestBytesMax) {
          // Too big to buffer: discard it as it arrives, keep the stream in sync.
          // The reply waits until the payload is consumed: a client may not
          // expect an answer to a request it has not finished sending.
          q.skip(P.REQUEST_SIZE);
          this.skipping = length;
          this.skipReply = { hi: cookieHi, lo: cookieLo, message: `write of ${length} bytes exceeds the maximum of ${P.LIMITS.requestBytesMax}` };
          this.hooks.stats.requests++;
          continue;
        }
        if (q.length < P.REQUEST_SIZE + length) {
          if (length < ASSEMBLE_MIN_BYTES) return; // small: wait, then take a view
          // Large: gather the payload into its own buffer as it arrives (the
          // connection may read the rest straight into it), not by merging chunks later.
          q.skip(P.REQUEST_SIZE);
          this.hooks.stats.requests++;
          const target = largeBuffers.get(length);
          this.assembling = { target, filled: 0, cmdFlags, hi: cookieHi, lo: cookieLo, offset: offsetHi >= 0x200000 ? Number.MAX_SAFE_INTEGER : offset };
          if (!this.fillFromQueue()) return;
          continue;
        }
        q.skip(P.REQUEST_SIZE);
        payload = q.take(length);
      } else {
        q.skip(P.REQUEST_SIZE);
      }
      this.hooks.stats.requests++;
      // offsetHi >= 2^21 means the offset is not a safe integer: out of range anyway.
      this.dispatch(type, cmdFlags, cookieHi, cookieLo, offsetHi >= 0x200000 ? Number.MAX_SAFE_INTEGER : offset, length, payload);
    }
  }

  private dispatch(type: number, cmdFlags: number, hi: number, lo: number, offset: number, length: number, payload: Buffer | null): void {
    if (type === P.NBD_CMD_DISC) {
      // No reply to DISC, whatever its flags: finish in-flight work and close.
      this.hooks.onDisconnect('client disconnected');
      return;
    }
    // When the request began (for its latency): complete() and track() read it, synchronously below.
    this.dispatchedAt = now();
    const counted = this.hooks.exportStats?.of(type);
    if (counted) counted.requests++;
    const invalid = this.validate(type, cmdFlags, offset, length);
    if (invalid !== null) {
      // A refused request (past the end, a write to a read-only export) is an error the client saw.
      if (counted) counted.errors++;
      this.replyError(hi, lo, invalid[0], invalid[1], null);
      return;
    }
    const dev = this.device;
    const fua = (cmdFlags & P.NBD_CMD_FLAG_FUA) !== 0;
    try {
      switch (type) {
        case P.NBD_CMD_READ:
          return this.read(hi, lo, offset, length, (cmdFlags & P.NBD_CMD_FLAG_DF) !== 0);
        case P.NBD_CMD_WRITE: {
          this.hooks.stats.bytesWritten += length;
          const op = this.hooks.exportStats?.of(type);
          if (op) op.bytes += length;
          return this.complete(hi, lo, type, offset, dev.write(offset, payload!, fua ? { fua } : undefined));
        }
        case P.NBD_CMD_FLUSH:
          return this.complete(hi, lo, type, 0, dev.flush());
        case P.NBD_CMD_TRIM:
          return this.complete(hi, lo, type, offset, dev.trim(offset, length, { fua }));
        case P.NBD_CMD_WRITE_ZEROES:
          return this.complete(
            hi,
            lo,
            type,
            offset,
            dev.writeZeroes(offset, length, {
              fua,
              noHole: (cmdFlags & P.NBD_CMD_FLAG_NO_HOLE) !== 0,
              fastOnly: (cmdFlags & P.NBD_CMD_FLAG_FAST_ZERO) !== 0,
            }),
          );
        case P.NBD_CMD_CACHE:
          return this.complete(hi, lo, type, offset, dev.cache(offset, length));
        case P.NBD_CMD_BLOCK_STATUS:
          return this.blockStatus(hi, lo, offset, length, (cmdFlags & P.NBD_CMD_FLAG_REQ_ONE) !== 0);
      }
    } catch (err) {
      this.failed(hi, lo, type, offset, err);
    }
  }

  /** [nbd error, message] when the request must be refused, else null. One choke point for every check. */
  private validate(type: number, cmdFlags: number, offset: number, length: number): [number, string] | null {
    const size = this.device.size;
    let allowed = P.NBD_CMD_FLAG_FUA;
    switch (type) {
      case P.NBD_CMD_READ:
        if (this.structured) allowed |= P.NBD_CMD_FLAG_DF;
        break;
      case P.NBD_CMD_WRITE_ZEROES:
        allowed |= P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO;
        break;
      case P.NBD_CMD_BLOCK_STATUS:
        allowed |= P.NBD_CMD_FLAG_REQ_ONE;
        break;
      case P.NBD_CMD_WRITE:
      case P.NBD_CMD_TRIM:
      case P.NBD_CMD_CACHE:
      case P.NBD_CMD_FLUSH:
        break;
      default:
        return [P.NBD_EINVAL, `unknown command ${type}`];
    }
    if (cmdFlags & ~allowed) return [P.NBD_EINVAL, `flags 0x${cmdFlags.toString(16)} are not valid for ${P.COMMAND_NAMES[type]}`];
    if (type === P.NBD_CMD_FLUSH) return null;
    const writing = type === P.NBD_CMD_WRITE || type === P.NBD_CMD_WRITE_ZEROES || type === P.NBD_CMD_TRIM;
    if (writing && this.readOnly) return [P.NBD_EPERM, 'export is read-only'];
    if (type === P.NBD_CMD_TRIM && (this.flags & P.NBD_FLAG_SEND_TRIM) === 0) return [P.NBD_EINVAL, 'trim is not supported by this export'];
    if (type === P.NBD_CMD_BLOCK_STATUS && !this.baseAllocation) {
      return [P.NBD_EINVAL, 'block status needs base:allocation selected with NBD_OPT_SET_META_CONTEXT'];
    }
    if (length === 0) return [P.NBD_EINVAL, `${P.COMMAND_NAMES[type]} of zero bytes`];
    if (offset + length > size) {
      const code = type === P.NBD_CMD_WRITE || type === P.NBD_CMD_WRITE_ZEROES ? P.NBD_ENOSPC : P.NBD_EINVAL;
      return [code, `range ${offset}+${length} is beyond the end of the export (${size} bytes)`];
    }
    if (length > P.LIMITS.requestBytesMax && type !== P.NBD_CMD_TRIM && type !== P.NBD_CMD_WRITE_ZEROES && type !== P.NBD_CMD_BLOCK_STATUS && type !== P.NBD_CMD_CACHE) {
      return [P.NBD_EINVAL, `request of ${length} bytes exceeds the maximum of ${P.LIMITS.requestBytesMax}`];
    }
    const minimum = this.device.blockSize.minimum;
    if (minimum > 1 && (offset % minimum !== 0 || length % minimum !== 0)) {
      return [P.NBD_EINVAL, `request is not aligned to the ${minimum}-byte block size`];
    }
    return null;
  }

  // ---- read -----------------------------------------------------------------

  private read(hi: number, lo: number, offset: number, length: number, df: boolean): void {
    const t0 = now();
    this.hooks.stats.bytesRead += length;
    const op = this.hooks.exportStats?.of(P.NBD_CMD_READ);
    if (op) op.bytes += length;
    if (this.structured && !df && length >= SPARSE_READ_MIN_BYTES && this.device.capabilities.extents) {
      this.track(this.sparseRead(hi, lo, offset, length), hi, lo, P.NBD_CMD_READ, offset, t0);
      return;
    }
    const headerBytes = this.structured ? P.STRUCTURED_REPLY_HEADER_SIZE + 8 : P.SIMPLE_REPLY_SIZE;
    const pooled = headerBytes + length >= POOL_BUFFER_MIN_BYTES;
    const reply = pooled ? largeBuffers.get(headerBytes + length) : this.slab.alloc(headerBytes + length);
    if (this.structured) {
      writeChunkHeader(reply, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, hi, lo, 8 + length);
      writeU64(reply, 20, offset);
    } else {
      writeSimpleHeader(reply, 0, hi, lo);
    }
    let result: void | Promise<void>;
    try {
      result = this.device.read(offset, reply.subarray(headerBytes));
    } catch (err) {
      if (pooled) largeBuffers.put(reply);
      throw err;
    }
    if (result === undefined) {
      op?.observe(since(t0));
      this.sendData(reply, pooled);
      return;
    }
    this.inFlight++;
    result.then(
      () => {
        op?.observe(since(t0));
        this.sendData(reply, pooled);
        this.done();
      },
      (err: unknown) => {
        op?.observe(since(t0));
        if (pooled) largeBuffers.put(reply);
        this.failed(hi, lo, P.NBD_CMD_READ, offset, err);
        this.done();
      },
    );
  }

  /** A large structured read: holes go out as OFFSET_HOLE chunks, data as OFFSET_DATA. */
  private async sparseRead(hi: number, lo: number, offset: number, length: number): Promise<void> {
    const end = offset + length;
    const extents = clipExtents(await this.device.blockStatus(offset, length), offset, end);
    const chunks: Buffer[] = [];
    let pos = offset;
    for (const e of extents) {
      if (e.flags & P.NBD_STATE_ZERO) {
        const hole = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_SIZE + 12);
        writeChunkHeader(hole, 0, P.NBD_REPLY_TYPE_OFFSET_HOLE, hi, lo, 12);
        writeU64(hole, 20, e.offset);
        hole.writeUInt32BE(e.length, 28);
        chunks.push(hole);
      } else {
        const data = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_SIZE + 8 + e.length);
        writeChunkHeader(data, 0, P.NBD_REPLY_TYPE_OFFSET_DATA, hi, lo, 8 + e.length);
        writeU64(data, 20, e.offset);
        await this.device.read(e.offset, data.subarray(28));
        chunks.push(data);
      }
      pos = e.offset + e.length;
    }
    if (pos < end) {
      // blockStatus may stop early (cap on extents): the rest is plain data.
      const data = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_SIZE + 8 + (end - pos));
      writeChunkHeader(data, 0, P.NBD_REPLY_TYPE_OFFSET_DATA, hi, lo, 8 + (end - pos));
      writeU64(data, 20, pos);
      await this.device.read(pos, data.subarray(28));
      chunks.push(data);
    }
    // Every read succeeded before anything was sent, so the last chunk may carry DONE.
    const last = chunks[chunks.length - 1];
    last.writeUInt16BE(P.NBD_REPLY_FLAG_DONE, 4);
    for (const c of chunks) this.send(c);
  }

  // ---- block status ----------------------------------------------------------

  private blockStatus(hi: number, lo: number, offset: number, length: number, reqOne: boolean): void {
    const result = this.device.blockStatus(offset, length);
    const reply = (extents: Extent[]): void => {
      let list = clipExtents(extents, offset, offset + length);
      if (list.length === 0) list = [{ offset, length, flags: 0 }];
      if (reqOne) list = list.slice(0, 1);
      else if (list.length > P.LIMITS.extentsPerReplyMax) list = list.slice(0, P.LIMITS.extentsPerReplyMax);
      const out = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_SIZE + 4 + 8 * list.length);
      writeChunkHeader(out, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS, hi, lo, 4 + 8 * list.length);
      out.writeUInt32BE(P.BASE_ALLOCATION_ID, 20);
      let at = 24;
      for (const e of list) {
        out.writeUInt32BE(e.length, at);
        out.writeUInt32BE(e.flags & (P.NBD_STATE_HOLE | P.NBD_STATE_ZERO), at + 4);
        at += 8;
      }
      this.send(out);
    };
    if (!(result instanceof Promise)) {
      reply(result);
      return;
    }
    this.track(result.then(reply), hi, lo, P.NBD_CMD_BLOCK_STATUS, offset);
  }

  // ---- completion --------------------------------------------------------------

  /** Reply OK now if the device finished synchronously, else when it does. */
  private complete(hi: number, lo: number, type: number, offset: number, result: void | Promise<void>, t0 = this.dispatchedAt): void {
    const op = this.hooks.exportStats?.of(type);
    if (result === undefined) {
      op?.observe(since(t0));
      this.replyOk(hi, lo);
      return;
    }
    this.inFlight++;
    // The device may use a write payload until it completes: only then back to the pool.
    const release = this.pooledPayload;
    this.pooledPayload = null;
    result.then(
      () => {
        if (release) largeBuffers.put(release);
        op?.observe(since(t0));
        this.replyOk(hi, lo);
        this.done();
      },
      (err: unknown) => {
        if (release) largeBuffers.put(release);
        op?.observe(since(t0));
        this.failed(hi, lo, type, offset, err);
        this.done();
      },
    );
  }

  /** For work that sends its own replies: only errors are answered here. */
  private track(work: Promise<void>, hi: number, lo: number, type: number, offset: number, t0 = this.dispatchedAt): void {
    const op = this.hooks.exportStats?.of(type);
    this.inFlight++;
    work.then(
      () => {
        op?.observe(since(t0));
        this.done();
      },
      (err: unknown) => {
        op?.observe(since(t0));
        this.failed(hi, lo, type, offset, err);
        this.done();
      },
    );
  }

  private done(): void {
    this.inFlight--;
    if (this.inFlight === 0 && this.idleWaiters.length) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
    this.maybeResume();
  }

  private failed(hi: number, lo: number, type: number, offset: number, err: unknown): void {
    const op = this.hooks.exportStats?.of(type);
    if (op) op.errors++;
    const code = err instanceof BlockDeviceError ? err.code : (err as { code?: string })?.code;
    const message = err instanceof Error ? err.message : String(err);
    if (!(err instanceof BlockDeviceError)) this.log.error({ event: 'request failed', command: P.COMMAND_NAMES[type], offset, err: message });
    else this.log.debug({ event: 'request failed', command: P.COMMAND_NAMES[type], offset, err: message });
    // A device error on a read names where it happened (the request passed
    // validation, so offset lies inside the requested range).
    this.replyError(hi, lo, P.nbdErrorOf(code), message, type === P.NBD_CMD_READ ? offset : null);
  }

  private replyOk(hi: number, lo: number): void {
    const reply = this.slab.alloc(P.SIMPLE_REPLY_SIZE);
    writeSimpleHeader(reply, 0, hi, lo);
    this.send(reply);
  }

  private replyError(hi: number, lo: number, error: number, message: string, errorOffset: number | null): void {
    this.hooks.stats.errors++;
    if (!this.structured) {
      const reply = Buffer.allocUnsafe(P.SIMPLE_REPLY_SIZE);
      writeSimpleHeader(reply, error, hi, lo);
      this.send(reply);
      return;
    }
    const msg = Buffer.from(message.slice(0, 1024));
    const withOffset = errorOffset !== null;
    const payload = 6 + msg.length + (withOffset ? 8 : 0);
    const reply = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_SIZE + payload);
    writeChunkHeader(reply, P.NBD_REPLY_FLAG_DONE, withOffset ? P.NBD_REPLY_TYPE_ERROR_OFFSET : P.NBD_REPLY_TYPE_ERROR, hi, lo, payload);
    reply.writeUInt32BE(error, 20);
    reply.writeUInt16BE(msg.length, 24);
    msg.copy(reply, 26);
    if (withOffset) writeU64(reply, 26 + msg.length, errorOffset);
    this.send(reply);
  }

  /** Send a read reply; a pooled buffer goes back once the socket has taken it. */
  private sendData(buf: Buffer, pooled: boolean): void {
    if (!pooled) return this.send(buf);
    if (this.socket.destroyed) {
      largeBuffers.put(buf);
      return;
    }
    this.holdUntilTick();
    this.socket.write(buf, () => largeBuffers.put(buf));
  }

  private send(buf: Buffer): void {
    if (this.socket.destroyed) return;
    this.holdUntilTick();
    this.socket.write(buf);
  }

  /**
   * Replies completed together (a replicated device's acknowledgements
   * arrive in batches and resolve many requests in one go) leave in one
   * writev: hold the socket until the current callback and its
   * microtasks are done.
   */
  private holdUntilTick(): void {
    // A lone request is answered at once (a writev of one buffer costs more than a write).
    if (this.tickHeld || this.inFlight <= 1) return;
    this.tickHeld = true;
    this.socket.cork();
    process.nextTick(() => {
      this.tickHeld = false;
      this.socket.uncork();
    });
  }

  private pause(): void {
    if (this.paused) return;
    this.paused = true;
    this.socket.pause();
  }

  private maybeResume(): void {
    if (!this.paused || this.stopped) return;
    if (this.inFlight >= P.LIMITS.inFlightPerConnectionMax || this.socket.writableLength > P.LIMITS.queuedReplyBytesMax) return;
    this.paused = false;
    this.socket.resume();
    this.process();
  }
}

function writeSimpleHeader(buf: Buffer, error: number, hi: number, lo: number): void {
  buf.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  buf.writeUInt32BE(error, 4);
  buf.writeUInt32BE(hi, 8);
  buf.writeUInt32BE(lo, 12);
}

function writeChunkHeader(buf: Buffer, flags: number, type: number, hi: number, lo: number, length: number): void {
  buf.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeUInt32BE(hi, 8);
  buf.writeUInt32BE(lo, 12);
  buf.writeUInt32BE(length, 16);
}

function writeU64(buf: Buffer, at: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value % TWO_32, at + 4);
}

/** Extents cut to [start, end), contiguous from start, empty ones dropped. */
function clipExtents(extents: Extent[], start: number, end: number): Extent[] {
  const out: Extent[] = [];
  let pos = start;
  for (const e of extents) {
    const eEnd = Math.min(e.offset + e.length, end);
    if (e.offset > pos) break; // a gap: stop, the client asks again from here
    if (eEnd <= pos) continue;
    out.push({ offset: pos, length: eEnd - pos, flags: e.flags });
    pos = eEnd;
    if (pos >= end) break;
  }
  return out;
}
