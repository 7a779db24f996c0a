/**
 * Background resync: the sync source walks its out-of-sync bitmap (the union
 * of both sides' bitmaps) and pushes those blocks to the target, which
 * writes them and acknowledges; a block's bit is cleared when its ack comes
 * back, so progress survives a broken link (the rest stays marked).
 *
 * Each piece is read and sent under the application write order, so a
 * resync read never races an application write to the same blocks: either
 * the write is sent first and the read sees it, or the read is sent first
 * and the write follows it on the same ordered link.
 *
 * Rate: a fixed cap (token bucket) when `resyncRateBytesPerSec` is set;
 * otherwise dynamic: as fast as a window of bytes in flight allows, with a
 * window 8x smaller while the application is writing, so application writes
 * do not queue behind megabytes of resync data on the link.
 *
 * Zeros: a piece the local disk reports as a hole or zeros travels as a
 * "zero this range" frame, so the first full sync of a sparse disk moves
 * only what was written.
 *
 * Checksum-based resync: the source sends a digest first and the target
 * answers whether it already has exactly those bytes; only differing pieces
 * travel.
 *
 * The event loop: small pieces are read synchronously from the page cache
 * and a socket with room takes frames at once, so the loop would run a
 * whole window of pieces without a turn for pings and the application's
 * I/O; it gives the event loop a turn every few milliseconds (slice.ts).
 */
import * as W from './wire.js';
import { BLOCK } from './bitmap.js';
import { digest } from './peer.js';
import type { PeerSession } from './peer.js';
import { LoopDelaySpan, type LoopDelayFigures } from '../util/loop-delay.js';

const NO_FIGURES: LoopDelayFigures = { samples: 0, meanMs: 0, p50Ms: 0, p99Ms: 0, maxMs: 0 };
import { Slicer } from '../util/slice.js';

export interface ResyncProgress {
  doneBytes: number;
  totalBytes: number;
  rateBytesPerSec: number;
  etaSeconds: number | null;
  /** Bytes that actually crossed the link (zeros and matching checksums do not). */
  sentBytes: number;
  checksum: boolean;
  /** How late this node's event loop ran while the resync did (a stall past the ping timeout drops the link). */
  eventLoop: LoopDelayFigures;
}

const PIECE = W.RESYNC_PIECE;
const ZERO_PIECE_MAX = W.RESYNC_ZERO_MAX;
const WINDOW = 8 * 1024 * 1024;
const QUIET_MS = 100;
const BURST_MS = 100;
/** What a zero frame or a digest counts for in the window and the rate. */
const SMALL = 4096;
/** Passes over the bitmap before giving up on blocks that keep failing. */
const PASSES_MAX = 8;

export class Resync {
  running = true;
  private done = 0;
  private sent = 0;
  private readonly startedAt: number;
  private inFlightBytes = 0;
  /** Pieces sent and not yet acknowledged, by offset; `checksum` while only their digest went. */
  private readonly inFlight = new Map<number, { length: number; cost: number; checksum: boolean }>();
  private wake: (() => void) | undefined;
  private nextSendAt = 0;
  private endedAt: number | undefined;
  /** None under a simulated clock: real delays would make the same seed log differently. */
  private readonly loop: LoopDelaySpan | undefined;
  private readonly slicer: Slicer;

  constructor(
    private readonly session: PeerSession,
    readonly totalBytes: number,
  ) {
    this.startedAt = session.resource.clock.now();
    this.slicer = new Slicer(session.resource.options.clock);
    this.loop = session.resource.options.clock ? undefined : new LoopDelaySpan();
  }

  progress(): ResyncProgress {
    const seconds = ((this.endedAt ?? this.session.resource.clock.now()) - this.startedAt) / 1000;
    const rate = seconds > 0 ? Math.round(this.done / seconds) : 0;
    const left = this.totalBytes - this.done;
    return {
      doneBytes: this.done,
      totalBytes: this.totalBytes,
      rateBytesPerSec: rate,
      etaSeconds: rate > 0 ? Math.round(left / rate) : null,
      sentBytes: this.sent,
      checksum: this.session.resource.options.checksumResync === true,
      eventLoop: this.loop?.figures() ?? NO_FIGURES,
    };
  }

  /** Count resolved bytes; never past the total, never backwards. */
  account(length: number, _sameChecksum: boolean): void {
    this.done = Math.min(this.totalBytes, this.done + length);
  }

  stop(): void {
    this.endedAt ??= this.session.resource.clock.now();
    this.loop?.stop();
    this.running = false;
    this.wake?.();
  }

  /**
   * Source side: acks and checksum answers from the target. Each answers a
   * piece in flight, exactly: an ack of anything else would clear bits of
   * blocks the target never got, a checksum answer for anything else would
   * make this node read and send what it never offered.
   */
  onFrame(type: number, payload: Buffer): void {
    const r = this.session.resource;
    const checksum = type === W.F_RS_CSUM_REPLY;
    const { offset, length, same } = checksum ? W.decodeResyncChecksumReply(payload, r.size) : { ...W.decodeResyncAck(payload, r.size), same: true };
    const entry = this.inFlight.get(offset);
    if (!entry || entry.length !== length || entry.checksum !== checksum) {
      throw new W.ProtocolError(`${W.frameName(type)} for ${offset}+${length}, which is not a piece in flight`);
    }
    if (checksum && !same) {
      // The target's bytes differ: send them, still under the write order.
      entry.checksum = false;
      void this.sendData(offset, length, false);
      return;
    }
    this.inFlight.delete(offset);
    this.inFlightBytes -= entry.cost;
    r.bitmap.clear(offset, length);
    this.account(length, type === W.F_RS_CSUM_REPLY);
    this.wake?.();
  }

  /** Source side: push every marked block; true when the bitmap is empty. */
  async run(): Promise<boolean> {
    const r = this.session.resource;
    const rate = r.options.resyncRateBytesPerSec ?? 0;
    for (let pass = 0; pass < PASSES_MAX && this.running; pass++) {
      let cursor = 0;
      for (;;) {
        const pause = this.slicer.due();
        if (pause) await pause;
        if (!this.running) return false;
        const run = r.bitmap.firstRun(cursor, ZERO_PIECE_MAX);
        if (!run) break;
        let length = Math.min(run.length, PIECE);
        const zero = await this.session.isZero(run.offset, Math.min(run.length, ZERO_PIECE_MAX));
        const isZero = zero >= length;
        if (isZero) length = zero >= run.length ? run.length : Math.max(BLOCK, Math.floor(zero / BLOCK) * BLOCK);
        const cost = isZero || r.options.checksumResync ? SMALL : length;
        await this.room(cost, rate);
        if (!this.running) return false;
        cursor = run.offset + length;
        this.inFlight.set(run.offset, { length, cost, checksum: !isZero && r.options.checksumResync === true });
        this.inFlightBytes += cost;
        if (isZero) await this.sendZero(run.offset, length);
        else await this.sendData(run.offset, length, r.options.checksumResync === true);
      }
      while (this.inFlight.size > 0 && this.running) await new Promise<void>((resolve) => (this.wake = resolve));
      if (r.bitmap.count === 0) break;
    }
    this.stop();
    return r.bitmap.count === 0 && this.session.link.isUp;
  }

  private async room(cost: number, rate: number): Promise<void> {
    const r = this.session.resource;
    const clock = r.clock;
    for (;;) {
      if (!this.running) return;
      const window = clock.now() - r.lastAppWriteAt < QUIET_MS ? WINDOW / 8 : WINDOW;
      if (this.inFlightBytes + cost <= window || this.inFlight.size === 0) break;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        // Re-check when the application goes quiet, even if no ack comes.
        clock.setTimeout(resolve, QUIET_MS).unref();
      });
    }
    if (rate > 0) {
      // Token bucket: time lost reading or waiting for acks is made up, up to a 100 ms burst.
      const now = clock.now();
      const at = Math.max(this.nextSendAt, now - BURST_MS);
      this.nextSendAt = at + (cost / rate) * 1000;
      if (at > now) await new Promise<void>((resolve) => clock.setTimeout(resolve, at - now));
    }
  }

  private async sendZero(offset: number, length: number): Promise<void> {
    const r = this.session.resource;
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(W.WF_ZERO, 0);
    await r.appWrites.run(offset, length, async () => {
      // Checked again under the write order: an application write may have landed since the range was
      // found empty (and went to the peer already); zeroing it there now would undo it.
      if ((await this.session.isZero(offset, length)) < length) {
        const entry = this.inFlight.get(offset);
        if (entry) {
          // Not sent: the blocks stay marked and go as data in the next pass.
          this.inFlight.delete(offset);
          this.inFlightBytes -= entry.cost;
          this.wake?.();
        }
        return;
      }
      // Aborted meanwhile (a disk failed): the target is told by the state that follows, not by more data.
      if (!this.running) return;
      this.session.link.send(W.F_RS_DATA, W.encodeRange(offset, length, flags));
    });
  }

  private async sendData(offset: number, length: number, checksumFirst: boolean): Promise<void> {
    const r = this.session.resource;
    await r.appWrites.run(offset, length, async () => {
      const data = await this.session.readLocal(offset, length);
      if (!data || !this.running) {
        this.stop();
        return;
      }
      if (checksumFirst) {
        this.session.link.send(W.F_RS_CSUM, W.encodeRange(offset, length, digest(data)));
        return;
      }
      const head = W.encodeRange(offset, length, Buffer.alloc(4));
      this.sent += length;
      if (!this.session.link.sendv(W.F_RS_DATA, [head, data])) await this.session.link.drained();
    });
  }
}
