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

export const FRAME_PING = 10;
export const FRAME_PONG = 11;
/** Data frames carry at most this much (a 1 MiB write plus its header fits). */
export const MAX_FRAME_PAYLOAD = 1024 * 1024 + 4096;

export interface LinkOptions {
  pingIntervalMs?: number;
  pingTimeoutMs?: number;
}

export interface PeerLinkEvents {
  frame: [type: number, payload: Buffer];
  /** The link is gone: `why` says if the peer went silent, closed, or broke the protocol. */
  down: [why: string];
}

export class PeerLink extends EventEmitter<PeerLinkEvents> {
  private buf: Buffer;
  private lastHeard = Date.now();
  private pingSentAt = 0;
  private readonly timer: NodeJS.Timeout;
  private closed = false;
  readonly pingIntervalMs: number;
  readonly pingTimeoutMs: number;

  constructor(
    private readonly socket: Socket,
    leftover: Buffer = Buffer.alloc(0),
    options: LinkOptions = {},
  ) {
    super();
    this.pingIntervalMs = options.pingIntervalMs ?? 200;
    this.pingTimeoutMs = options.pingTimeoutMs ?? 500;
    this.buf = leftover;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('close', () => this.down('the peer closed the connection'));
    socket.on('error', (err) => this.down(`connection error: ${err.message}`));
    this.timer = setInterval(() => this.tick(), Math.max(10, Math.min(this.pingIntervalMs, this.pingTimeoutMs) / 2));
    this.timer.unref();
    if (leftover.length > 0) queueMicrotask(() => this.onData(Buffer.alloc(0)));
  }

  get isUp(): boolean {
    return !this.closed;
  }

  /** Queue a frame; false when the socket's buffer is full (wait for 'drain' on it: back-pressure). */
  send(type: number, payload: Buffer = Buffer.alloc(0)): boolean {
    if (this.closed) return false;
    return this.socket.write(encodeFrame(type, payload));
  }

  close(why = 'closed by this node'): void {
    this.down(why);
  }

  private onData(chunk: Buffer): void {
    if (this.closed) return;
    this.lastHeard = Date.now();
    this.pingSentAt = 0;
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    while (this.buf.length >= FRAME_HEADER) {
      if (this.buf.readUInt32BE(0) !== LINK_MAGIC) return this.down('protocol error: bad frame magic');
      const len = this.buf.readUInt32BE(8);
      if (len > MAX_FRAME_PAYLOAD) return this.down(`protocol error: frame of ${len} bytes`);
      if (this.buf.length < FRAME_HEADER + len) break;
      const type = this.buf.readUInt16BE(4);
      const payload = this.buf.subarray(FRAME_HEADER, FRAME_HEADER + len);
      this.buf = this.buf.subarray(FRAME_HEADER + len);
      if (type === FRAME_PING) this.send(FRAME_PONG);
      else if (type !== FRAME_PONG) this.emit('frame', type, payload);
      if (this.closed) return;
    }
  }

  private tick(): void {
    if (this.closed) return;
    const now = Date.now();
    if (this.pingSentAt !== 0) {
      if (now - this.pingSentAt >= this.pingTimeoutMs) this.down(`the peer did not answer a ping within ${this.pingTimeoutMs} ms`);
      return;
    }
    if (now - this.lastHeard >= this.pingIntervalMs) {
      this.pingSentAt = now;
      this.send(FRAME_PING);
    }
  }

  private down(why: string): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    this.socket.destroy();
    this.emit('down', why);
  }
}
