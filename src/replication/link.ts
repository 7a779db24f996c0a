/**
 * An authenticated peer link after its handshake: whole frames in and out,
 * and a keepalive that notices a dead peer fast (DRBD's ping / ping-timeout):
 * when nothing has arrived for `pingIntervalMs` a PING goes out, and if no
 * frame at all arrives within `pingTimeoutMs` after it, the link is dead.
 * A frame that breaks the rules (bad magic, too large) ends the link; the
 * process goes on.
 */
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { encodeFrame, FRAME_HEADER, LINK_MAGIC } from './link-auth.js';
import { Clock, realClock, TimerHandle } from '../util/clock.js';

export const FRAME_PING = 10;
export const FRAME_PONG = 11;
/** Data frames carry at most this much (a 1 MiB write plus its header fits). */
export const MAX_FRAME_PAYLOAD = 1024 * 1024 + 4096;

export interface LinkOptions {
  pingIntervalMs?: number;
  pingTimeoutMs?: number;
  /** Time and timers (the real clock unless a simulation runs). */
  clock?: Clock;
}

export interface PeerLinkEvents {
  frame: [type: number, payload: Buffer];
  /** The link is gone: `why` says if the peer went silent, closed, or broke the protocol. */
  down: [why: string];
}

export class PeerLink extends EventEmitter<PeerLinkEvents> {
  /** Received bytes not yet made into frames, as chunks (joined once a whole frame is there). */
  private chunks: Buffer[] = [];
  private buffered = 0;
  private lastHeard: number;
  private corked = false;
  private draining: Promise<void> | undefined;
  private pingSentAt = 0;
  private readonly timer: TimerHandle;
  private readonly clock: Clock;
  private closed = false;
  readonly pingIntervalMs: number;
  readonly pingTimeoutMs: number;

  constructor(
    private readonly socket: Socket,
    leftover: Buffer = Buffer.alloc(0),
    options: LinkOptions = {},
  ) {
    super();
    this.clock = options.clock ?? realClock;
    this.lastHeard = this.clock.now();
    this.pingIntervalMs = options.pingIntervalMs ?? 200;
    this.pingTimeoutMs = options.pingTimeoutMs ?? 500;
    if (leftover.length > 0) {
      this.chunks.push(leftover);
      this.buffered = leftover.length;
    }
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('close', () => this.down('the peer closed the connection'));
    socket.on('error', (err) => this.down(`connection error: ${err.message}`));
    this.timer = this.clock.setInterval(() => this.tick(), Math.max(10, Math.min(this.pingIntervalMs, this.pingTimeoutMs) / 2));
    this.timer.unref();
    if (leftover.length > 0) queueMicrotask(() => this.onData(Buffer.alloc(0)));
  }

  get isUp(): boolean {
    return !this.closed;
  }

  /** Queue a frame; false when the socket's buffer is full (wait with drained(): back-pressure). */
  send(type: number, payload: Buffer = Buffer.alloc(0)): boolean {
    if (this.closed) return false;
    this.batch();
    return this.socket.write(encodeFrame(type, payload));
  }

  /**
   * Frames queued while handling one batch of events (the acks of every
   * write in one received chunk, the writes of one batch of NBD requests)
   * leave in one writev: the socket is corked until the current callback
   * and its microtasks are done.
   */
  private batch(): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    process.nextTick(() => {
      this.corked = false;
      this.socket.uncork();
    });
  }

  /** Queue a frame made of several parts without joining them (a write's header and its data). */
  sendv(type: number, parts: Buffer[]): boolean {
    if (this.closed) return false;
    let length = 0;
    for (const p of parts) length += p.length;
    const header = Buffer.allocUnsafe(FRAME_HEADER);
    header.writeUInt32BE(LINK_MAGIC, 0);
    header.writeUInt16BE(type, 4);
    header.writeUInt16BE(0, 6);
    header.writeUInt32BE(length, 8);
    this.batch();
    this.socket.write(header);
    let ok = true;
    for (const p of parts) ok = this.socket.write(p);
    return ok && this.socket.writableLength < this.socket.writableHighWaterMark;
  }

  /** Bytes queued in this process, not yet taken by the kernel. */
  get queuedBytes(): number {
    return this.socket.writableLength;
  }

  /** Resolves when the send queue has room again (or the link is down); one waiter on the socket however many writers wait. */
  drained(): Promise<void> {
    if (this.closed || !this.socket.writableNeedDrain) return Promise.resolve();
    this.draining ??= new Promise<void>((resolve) => {
      const done = (): void => {
        this.socket.off('drain', done);
        this.off('down', done);
        this.draining = undefined;
        resolve();
      };
      this.socket.on('drain', done);
      this.on('down', done);
    });
    return this.draining;
  }

  /** Stop reading from the peer (the receiver's disk is behind: back-pressure on the sender). */
  pause(): void {
    this.socket.pause();
  }

  resume(): void {
    if (!this.closed) this.socket.resume();
  }

  /** Close from this side: what was queued (a last REFUSE or OUTDATE) still goes out, then the socket goes. */
  close(why = 'closed by this node'): void {
    this.down(why, true);
  }

  private onData(chunk: Buffer): void {
    if (this.closed) return;
    this.lastHeard = this.clock.now();
    this.pingSentAt = 0;
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    while (this.buffered >= FRAME_HEADER) {
      const head = this.peek(FRAME_HEADER);
      if (head.readUInt32BE(0) !== LINK_MAGIC) return this.down('protocol error: bad frame magic');
      const len = head.readUInt32BE(8);
      if (len > MAX_FRAME_PAYLOAD) return this.down(`protocol error: frame of ${len} bytes`);
      if (this.buffered < FRAME_HEADER + len) break;
      const type = head.readUInt16BE(4);
      const frame = this.take(FRAME_HEADER + len);
      const payload = frame.subarray(FRAME_HEADER);
      if (type === FRAME_PING) this.send(FRAME_PONG);
      else if (type !== FRAME_PONG) this.emit('frame', type, payload);
      if (this.closed) return;
    }
  }

  /** The first n buffered bytes, joining chunks only as far as needed (not the whole backlog: a 12-byte header must not copy megabytes). */
  private peek(n: number): Buffer {
    if (this.chunks[0].length < n) {
      let k = 0;
      let bytes = 0;
      while (bytes < n) bytes += this.chunks[k++].length;
      this.chunks.splice(0, k, Buffer.concat(this.chunks.slice(0, k), bytes));
    }
    return this.chunks[0];
  }

  private take(n: number): Buffer {
    const first = this.peek(n);
    this.buffered -= n;
    if (first.length === n) {
      this.chunks.shift();
      return first;
    }
    this.chunks[0] = first.subarray(n);
    return first.subarray(0, n);
  }

  private tick(): void {
    if (this.closed) return;
    const now = this.clock.now();
    if (this.pingSentAt !== 0) {
      if (now - this.pingSentAt >= this.pingTimeoutMs) this.down(`the peer did not answer a ping within ${this.pingTimeoutMs} ms`);
      return;
    }
    if (now - this.lastHeard >= this.pingIntervalMs) {
      this.pingSentAt = now;
      this.send(FRAME_PING);
    }
  }

  private down(why: string, graceful = false): void {
    if (this.closed) return;
    this.closed = true;
    this.clock.clearInterval(this.timer);
    if (graceful && !this.socket.destroyed) {
      this.socket.on('error', () => undefined);
      this.socket.end();
      this.clock.setTimeout(() => this.socket.destroy(), 200).unref();
    } else this.socket.destroy();
    this.emit('down', why);
  }
}
