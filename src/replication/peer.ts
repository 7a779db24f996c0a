/**
 * One live link between the two nodes of a resource, after authentication:
 * the state exchange and the decision on connect, replicated writes and
 * their acknowledgements, flushes, reads for a Diskless Primary, resync and
 * online verify. When the link goes down, every write the peer may not have
 * (unacknowledged, or acknowledged but not yet flushed there) is marked out
 * of sync here.
 */
import { createHash } from 'node:crypto';
import type { PeerLink } from './link.js';
import { BLOCK, Bitmap } from './bitmap.js';
import { ConnectAction, ConnectSide, decideConnect, SplitBrainFound, syncGeneration } from './connect-decision.js';
import { subtract } from '../util/ranges.js';
import type { Resource } from './resource.js';
import { RangeOrder } from '../util/range-order.js';
import { BlockDeviceError, EXTENT_HOLE, EXTENT_ZERO } from '../blockdev/types.js';
import * as W from './wire.js';
import { Resync, ResyncProgress } from './resync.js';
import { finishedWithin } from '../util/timeout.js';
import type { TimerHandle } from '../util/clock.js';
import { FEATURE_VERIFY_ASK, LINK_FEATURES } from './link-auth.js';

export type ConnectionState = 'Connected' | 'Connecting' | 'StandAlone' | 'SyncSource' | 'SyncTarget';

export interface PeerStatus {
  node: string;
  connection: ConnectionState;
  disk: string;
  role: string;
  outOfSyncBytes: number;
  resync: ResyncProgress | null;
  /** The resync that finished on this connection, if any (what it moved, how fast). */
  lastResync: ResyncProgress | null;
  verify: VerifyProgress | null;
}

export interface VerifyProgress {
  doneBytes: number;
  totalBytes: number;
  outOfSyncBytes: number;
  running: boolean;
  ranges: { offset: number; length: number }[];
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (v: T) => void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** The peer's answer to this node's promotion: agreed, refused (why), or the link went first. */
export type PromotionAnswer = { outcome: 'granted' } | { outcome: 'refused'; reason: string } | { outcome: 'down' };

interface PendingWrite {
  offset: number;
  length: number;
  received: Deferred<boolean>;
  done: Deferred<boolean>;
}

/** An epoch ends this long after its first write at the latest (a background flush on the peer). */
const EPOCH_MS = 100;
/** ... or once it holds this many bytes. */
const EPOCH_BYTES_MAX = 4 * 1024 * 1024;
/** ... or this many separate ranges (bounds the memory of one epoch). */
const EPOCH_RANGES_MAX = 65536;

/** Byte ranges written in one epoch, adjacent and overlapping ones merged with the last. */
class WriteSet {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];
  /** Bytes written (counting overlaps once only when they touch the last range). */
  bytes = 0;

  get count(): number {
    return this.starts.length;
  }

  add(offset: number, length: number): void {
    if (length <= 0) return;
    const end = offset + length;
    const last = this.starts.length - 1;
    if (last >= 0 && offset <= this.ends[last] && end >= this.starts[last]) {
      const before = this.ends[last] - this.starts[last];
      this.starts[last] = Math.min(this.starts[last], offset);
      this.ends[last] = Math.max(this.ends[last], end);
      this.bytes += this.ends[last] - this.starts[last] - before;
      return;
    }
    this.starts.push(offset);
    this.ends.push(end);
    this.bytes += length;
  }

  *ranges(): Generator<[number, number]> {
    for (let i = 0; i < this.starts.length; i++) yield [this.starts[i], this.ends[i] - this.starts[i]];
  }
}

/** Receive-side cap: past this many writes waiting for the disk, stop reading the link. */
const APPLY_MAX = 256;
const VERIFY_PIECE = W.VERIFY_PIECE;
/** Largest write payload in one frame (the link's frame limit is a little above). */
const WRITE_PIECE = W.MAX_DATA_PIECE;
/** A zeroing or trim in one frame: well under the 32-bit length field, block-aligned. */
const ZERO_PIECE = 1024 * 1024 * 1024;
const VERIFY_WINDOW = 16;
/** A verify lists at most this many ranges that differ (its byte count covers them all). */
export const VERIFY_RANGES_MAX = 1000;
/** How long a handshake waits for writes under way before it says what this side has. */
const WRITES_SETTLE_MS = 1000;

export class PeerSession {
  phase: 'handshake' | 'connected' | 'sync-source' | 'sync-target' | 'closed' = 'handshake';
  state: W.PeerState | undefined;
  /** The peer's marks as its bitmap frames come (4096 runs a frame: bounded work per frame). */
  private peerMarks: Bitmap | undefined;
  /** Where the runs received so far end (each frame continues after it). */
  private peerRunsEnd = 0;
  private bitmapDone = false;
  /** This side's bitmap is out (it goes a slice at a time): only then may this side act on a decision. */
  private bitmapSent = false;
  private seq = 0;
  private readonly pending = new Map<number, PendingWrite>();
  /** Flushes in flight: an application's, or the barrier that closes an epoch; each with the writes it makes durable there. */
  private readonly flushes = new Map<number, { done: Deferred<boolean>; writes: WriteSet; barrier: boolean }>();
  private readonly reads = new Map<number, { into: Buffer; done: Deferred<number> }>();
  /** Extents written to the peer since its last completed flush (lost there if it crashes). */
  private epoch = new WriteSet();
  private epochTimer: TimerHandle | undefined;
  /** Receive side: writes from the peer, applied in order where they overlap. */
  private readonly applying = new RangeOrder();
  resync: Resync | undefined;
  verify: VerifyProgress | undefined;
  /** Verify requests waiting for their answer: a bit per block, set where the peer's block differs. */
  private verifyWaiters = new Map<number, Deferred<PieceAnswer>>();
  /** A Secondary's verify: pieces asked of the Primary, answered by its VERIFY (this side compares). */
  private askWaiters = new Map<number, Deferred<PieceAnswer>>();
  /** Pieces the peer asked this side (its Primary) for, not answered yet. */
  private asksUnanswered = 0;
  /** Verify pieces from the peer waiting to be compared here (bounded: a correct peer waits for its answers). */
  private verifyQueued = 0;
  /** VERIFYs this side sent for the peer's asks, by offset, waiting for its VERIFY_REPLY (which marks this side's bitmap too). */
  private askedOfMe = new Map<number, number>();
  private askedOfMeTotal = 0;
  private targetReady: Promise<void> | undefined;
  /** A disk failed during this link's resync, which ended without the link: resync frames still on their way are dropped. */
  private resyncAborted = false;
  /** The source said the resync is done (once per link). */
  private resyncDoneSeen = false;
  private readonly downHandlers: ((why: string) => void)[] = [];
  /** What this side told the peer when the link came up: both sides decide from exactly that. */
  private sent: W.PeerState | undefined;
  private sentMarks = 0;
  /** The peer sent a new state during the handshake (it reconnects; so does this side). */
  private peerChanged = false;
  /** Set when the peer lost its disk: applying its writes waits until this side recorded that. */
  private peerDiskGate: Promise<void> | undefined;
  /** Recording it failed (the witness did not outdate the failed disk): the peer's next write tries again. */
  private peerDiskRetry = false;
  /** Aborted when the link goes down: nothing waits for the peer's writes any more. */
  private readonly down = new AbortController();
  private readonly handshakeOver = deferred<void>();
  /** This node's promotion, asked of the peer: granted once the peer agreed, until this node is Primary or gives up. */
  private promotion: { granted: boolean; answer: Deferred<PromotionAnswer> } | undefined;

  constructor(
    readonly resource: Resource,
    readonly link: PeerLink,
    readonly peerNode: string,
    /** What both builds can do beyond link protocol 1 (link-auth.ts). */
    readonly features: ReadonlySet<string> = new Set(LINK_FEATURES),
  ) {
    link.on('frame', (type, payload) => {
      try {
        this.onFrame(type, payload);
      } catch (err) {
        // Whatever the peer sent that this node cannot take: drop this link, serve on.
        const frame = W.frameName(type);
        const message = (err as Error).message;
        this.resource.log.warn(
          { event: 'peer-protocol-error', resource: resource.name, peer: peerNode, frame, bytes: payload.length, err: message },
          `protocol error in a ${frame} frame from ${peerNode}: ${message}; dropping the link`,
        );
        this.close(`protocol error in a ${frame} frame: ${message}`);
      }
    });
    link.on('down', (why) => this.onDown(why));
    void this.sendStateAndBitmap();
  }

  /**
   * This side's state, then its marks (W.MAX_RUNS_PER_FRAME runs a frame, with turns of the
   * event loop between slices); then the decision may be acted on. Writes
   * are held from the start (replicate waits for the handshake); the ones
   * already on their way to the disk finish first, so what is sent still
   * holds when the decision is made (a write landing meanwhile changes the
   * marks, and the handshake would start over, again and again while the
   * application writes). Bounded: a write waiting for quorum does not hold
   * the link back.
   */
  private async sendStateAndBitmap(): Promise<void> {
    await finishedWithin(this.resource.writesSettled(), WRITES_SETTLE_MS, this.resource.clock);
    if (this.phase !== 'handshake' || !this.link.isUp) return;
    this.sent = this.resource.peerState(true);
    this.sentMarks = this.resource.bitmap.count;
    this.link.send(W.F_STATE, W.encodeJson(this.sent));
    for await (const runs of this.resource.bitmap.runBatches(W.MAX_RUNS_PER_FRAME, 0, this.resource.options.clock)) {
      if (!this.link.send(W.F_BITMAP, W.encodeRuns(runs))) await this.link.drained();
      if (!this.link.isUp) return;
    }
    this.link.send(W.F_BITMAP_DONE);
    this.bitmapSent = true;
    if (this.phase === 'handshake' && this.state && this.bitmapDone) this.onHandshakeDone();
  }

  /** While the handshake runs: resolves once it is over (connected, syncing, refused or down). */
  get handshake(): Promise<void> | undefined {
    return this.phase === 'handshake' ? this.handshakeOver.promise : undefined;
  }

  /**
   * Resolves 'in-sync' once this link is Connected with no resync running
   * (the peer has everything this node had marked for it), 'down' if the
   * link goes first.
   */
  untilInSync(): Promise<'in-sync' | 'down'> {
    return new Promise((resolve) => {
      const check = (): void => {
        if (this.phase === 'closed') return resolve('down');
        if (this.phase === 'connected' && this.replicating && this.resource.bitmap.count === 0) return resolve('in-sync');
        this.resource.once('changed', check);
      };
      check();
    });
  }

  onceDown(fn: (why: string) => void): void {
    this.downHandlers.push(fn);
  }

  /** Writes go to the peer: the handshake is over and the peer has a disk that takes them. */
  get replicating(): boolean {
    const p = this.phase;
    return (p === 'connected' || p === 'sync-source' || p === 'sync-target') && this.state !== undefined && this.state.disk !== 'Diskless' && this.state.disk !== 'Failed';
  }

  connection(): ConnectionState {
    switch (this.phase) {
      case 'handshake':
        return 'Connecting';
      case 'sync-source':
        return 'SyncSource';
      case 'sync-target':
        return 'SyncTarget';
      case 'closed':
        return 'Connecting';
      default:
        return 'Connected';
    }
  }

  /** Writes sent to the peer and not yet acknowledged by it (the replication lag, metrics). */
  inFlight(): { writes: number; bytes: number } {
    let bytes = 0;
    for (const p of this.pending.values()) bytes += p.length;
    return { writes: this.pending.size, bytes };
  }

  status(): PeerStatus {
    return {
      node: this.peerNode,
      connection: this.connection(),
      disk: this.state?.disk ?? 'DUnknown',
      role: this.state?.role ?? 'Unknown',
      outOfSyncBytes: this.resource.bitmap.outOfSyncBytes,
      resync: this.resync?.running ? this.resync.progress() : null,
      lastResync: this.resync && !this.resync.running ? this.resync.progress() : null,
      verify: this.verify ? { ...this.verify, ranges: this.verify.ranges.slice(0, 100) } : null,
    };
  }

  sendState(): void {
    // Before the handshake's own state is out, that one (taken when it goes) says it all.
    if (!this.sent) return;
    this.link.send(W.F_STATE, W.encodeJson(this.resource.peerState()));
  }

  close(why: string): void {
    this.link.close(why);
  }

  /**
   * Ask the peer to let this node become Primary (DRBD's cluster-wide
   * state change). Once it agrees, the peer holds this node Primary (and
   * refuses a promotion of its own) until it hears otherwise: the caller
   * ends with promotionDone. 'down': the link went first, this node is on
   * its own (and fences as such).
   */
  askPromotion(): Promise<PromotionAnswer> {
    if (this.phase === 'closed' || !this.link.isUp) return Promise.resolve({ outcome: 'down' });
    if (this.promotion) return this.promotion.answer.promise;
    this.promotion = { granted: false, answer: deferred() };
    this.link.send(W.F_PROMOTE);
    return this.promotion.answer.promise;
  }

  /** The promotion the peer agreed to is over: this node is Primary (and says so), or it gave up (and says that). */
  promotionDone(promoted: boolean): void {
    this.promotion = undefined;
    if (!promoted && this.phase !== 'closed') this.sendState();
  }

  /** Resolves once every write received from the peer so far is on the local disk (or failed). */
  applied(): Promise<void> {
    return this.applying.barrier();
  }

  /**
   * The peer asks to become Primary. Granted unless this node is Primary
   * or being promoted itself (both asked at once: the node whose name sorts
   * last goes first, as for racing writes of two Primaries). Every write
   * this node sent before is ahead of the answer on the link.
   */
  private onPromoteRequest(): void {
    if (this.phase === 'handshake') {
      // Answered once the decision is made: it is made from the states both sides sent.
      void this.handshakeOver.promise.then(() => {
        if (this.phase === 'closed') return;
        if (this.phase === 'handshake') return this.answerPromotion(`${this.resource.node} is still connecting: try again in a moment`);
        this.onPromoteRequest();
      });
      return;
    }
    const r = this.resource;
    if (!r.options.allowTwoPrimaries) {
      if (r.role === 'Primary') return this.answerPromotion(`${r.node} is Primary; make it Secondary first (resource secondary ${r.name} on ${r.node})`);
      if (this.promotion && (this.promotion.granted || r.node > this.peerNode)) return this.answerPromotion(`${r.node} is being promoted at the same time`);
    }
    // From now on this node takes the peer for Primary: its own promotion is refused.
    if (this.state) this.state = { ...this.state, role: 'Primary' };
    r.log.info({ event: 'promotion-granted', resource: r.name, peer: this.peerNode }, `${this.peerNode} may become Primary`);
    this.answerPromotion(undefined);
    r.emit('changed');
  }

  private answerPromotion(refused: string | undefined): void {
    this.link.send(W.F_PROMOTE_REPLY, W.encodeJson(refused === undefined ? { granted: true } : { granted: false, reason: refused }));
  }

  /** Tell the peer (a Secondary) that this Primary goes on without it. */
  outdatePeer(): void {
    this.link.send(W.F_OUTDATE);
  }

  /* ------------------------------------------------------------ sending */

  sendWrite(offset: number, length: number, kind: 0 | 1 | 2, data: Buffer | undefined, fua: boolean): { sent: Promise<boolean>; received: Promise<boolean>; done: Promise<boolean> } {
    const piece = kind === 0 ? WRITE_PIECE : ZERO_PIECE;
    if (length > piece) {
      // A frame carries at most WRITE_PIECE bytes of data, and a length of 32 bits: a larger write or
      // zeroing travels as several, acknowledged together.
      const parts = [];
      for (let at = 0; at < length; at += piece) {
        const n = Math.min(piece, length - at);
        parts.push(this.sendWrite(offset + at, n, kind, data?.subarray(at, at + n), fua));
      }
      const all = (ps: Promise<boolean>[]): Promise<boolean> => Promise.all(ps).then((oks) => oks.every(Boolean));
      return { sent: all(parts.map((p) => p.sent)), received: all(parts.map((p) => p.received)), done: all(parts.map((p) => p.done)) };
    }
    const seq = ++this.seq;
    const p: PendingWrite = { offset, length, received: deferred(), done: deferred() };
    this.pending.set(seq, p);
    const flags = (fua ? W.WF_FUA : 0) | (kind === 1 ? W.WF_ZERO : kind === 2 ? W.WF_ZERO | W.WF_TRIM : 0);
    const room = this.link.sendv(W.F_WRITE, W.encodeWrite(seq, offset, flags, length, data));
    // A FUA write is durable there once acknowledged; the others are until the peer flushes.
    if (!fua) this.written(offset, length);
    // Protocol A: "sent" once the link has room for more (back-pressure on the writer).
    const sent = room ? Promise.resolve(true) : this.link.drained().then(() => this.link.isUp);
    return { sent, received: p.received.promise, done: p.done.promise };
  }

  sendFlush(): Promise<boolean> {
    return this.flushEpoch(false);
  }

  /**
   * Writes since the last barrier form the current epoch: what the peer
   * may lose if it dies before it flushes them. An epoch ends at most
   * EPOCH_MS after its first write or once it holds EPOCH_BYTES_MAX, with
   * a flush the peer does in the background (one such barrier in flight;
   * meanwhile the epoch grows); when the link dies, only the writes of
   * epochs the peer did not confirm are marked out of sync (DRBD's epochs
   * and barriers).
   */
  private written(offset: number, length: number): void {
    this.epoch.add(offset, length);
    this.scheduleEpoch();
  }

  /** Close the epoch now if it is full, else at most EPOCH_MS from now; never two barriers in flight. */
  private scheduleEpoch(): void {
    if (this.barrierInFlight || this.epoch.bytes === 0) return;
    if (this.epoch.bytes >= EPOCH_BYTES_MAX || this.epoch.count >= EPOCH_RANGES_MAX) return void this.flushEpoch(true);
    if (!this.epochTimer) {
      this.epochTimer = this.resource.clock.setTimeout(() => {
        this.epochTimer = undefined;
        if (!this.barrierInFlight && this.epoch.bytes > 0 && this.phase !== 'closed') void this.flushEpoch(true);
      }, EPOCH_MS);
      this.epochTimer.unref();
    }
  }

  private get barrierInFlight(): boolean {
    for (const f of this.flushes.values()) if (f.barrier) return true;
    return false;
  }

  /** Send a flush that makes the current epoch durable on the peer. */
  private flushEpoch(barrier: boolean): Promise<boolean> {
    if (this.epochTimer) this.resource.clock.clearTimeout(this.epochTimer);
    this.epochTimer = undefined;
    const seq = ++this.seq;
    const done = deferred<boolean>();
    this.flushes.set(seq, { done, writes: this.epoch, barrier });
    this.epoch = new WriteSet();
    this.link.send(W.F_FLUSH, W.encodeSeq(seq));
    return done.promise;
  }

  /** Bytes written to the peer that it has not confirmed durable (what a crash there would cost in resync). */
  get unconfirmedBytes(): number {
    let n = this.epoch.bytes;
    for (const f of this.flushes.values()) n += f.writes.bytes;
    return n;
  }

  async read(offset: number, into: Buffer): Promise<void> {
    // Nothing to ask for (a read of no bytes is no frame: the peer takes reads of 1 byte and up).
    if (into.length === 0) return;
    if (into.length > WRITE_PIECE) {
      const parts = [];
      for (let at = 0; at < into.length; at += WRITE_PIECE) parts.push(this.read(offset + at, into.subarray(at, Math.min(into.length, at + WRITE_PIECE))));
      await Promise.all(parts);
      return;
    }
    const seq = ++this.seq;
    const done = deferred<number>();
    this.reads.set(seq, { into, done });
    const h = Buffer.allocUnsafe(20);
    h.writeBigUInt64BE(BigInt(seq), 0);
    h.writeBigUInt64BE(BigInt(offset), 8);
    h.writeUInt32BE(into.length, 16);
    this.link.send(W.F_READ, h);
    const status = await done.promise;
    if (status !== 0) throw new BlockDeviceError('EIO', `resource ${this.resource.name}: reading from ${this.peerNode} failed (${W.ERROR_CODES[status] ?? status})`);
  }

  /* ---------------------------------------------------------- receiving */

  private onFrame(type: number, payload: Buffer): void {
    if (this.phase === 'closed') return;
    // Every field is checked before use (wire.ts); a ProtocolError drops the link.
    const size = this.resource.size;
    switch (type) {
      case W.F_STATE:
        return this.onState(W.decodeState(payload, this.peerNode));
      case W.F_BITMAP: {
        if (this.phase !== 'handshake' || this.bitmapDone) throw new W.ProtocolError('bitmap runs after the bitmap was done');
        this.peerMarks ??= new Bitmap(size);
        for (const run of W.decodeRuns(payload, size, this.peerRunsEnd)) {
          this.peerMarks.mark(run.offset, run.length);
          this.peerRunsEnd = run.offset + run.length;
        }
        return;
      }
      case W.F_BITMAP_DONE:
        W.expectEmpty(payload, 'bitmap done');
        if (this.bitmapDone) throw new W.ProtocolError('a second bitmap done');
        this.bitmapDone = true;
        if (this.phase === 'handshake' && this.state && this.bitmapSent) this.onHandshakeDone();
        return;
      case W.F_WRITE:
        return this.onWrite(W.decodeWrite(payload, size));
      case W.F_ACK_RECV: {
        const { seq } = W.decodeSeq(payload, 'receive ack');
        const p = this.pending.get(seq);
        if (!p) throw new W.ProtocolError(`receive ack of write ${seq}, which is not in flight`);
        p.received.resolve(true);
        return;
      }
      case W.F_ACK_WRITE: {
        const { seq, status } = W.decodeSeq(payload, 'write ack');
        const p = this.pending.get(seq);
        if (!p) throw new W.ProtocolError(`ack of write ${seq}, which is not in flight`);
        this.pending.delete(seq);
        if (status !== 0) {
          // The peer's disk failed this write: it is not there.
          this.resource.markUnreplicated(p.offset, p.length);
          p.received.resolve(true);
          p.done.resolve(false);
          return;
        }
        p.received.resolve(true);
        p.done.resolve(true);
        return;
      }
      case W.F_FLUSH: {
        const { seq, status } = W.decodeSeq(payload, 'flush');
        if (status !== 0) throw new W.ProtocolError(`flush with status ${status}`);
        return this.onFlush(seq);
      }
      case W.F_FLUSH_ACK: {
        const { seq, status } = W.decodeSeq(payload, 'flush ack');
        const f = this.flushes.get(seq);
        if (!f) throw new W.ProtocolError(`ack of flush ${seq}, which is not in flight`);
        this.flushes.delete(seq);
        if (status !== 0) for (const [at, n] of f.writes.ranges()) this.resource.markUnreplicated(at, n);
        f.done.resolve(status === 0);
        // The epoch that grew while this barrier was out may be due already.
        if (f.barrier) this.scheduleEpoch();
        return;
      }
      case W.F_READ:
        return this.onRead(W.decodeRead(payload, size));
      case W.F_READ_REPLY: {
        const { seq, status, data } = W.decodeReadReply(payload);
        const r = this.reads.get(seq);
        if (!r) throw new W.ProtocolError(`reply to read ${seq}, which is not in flight`);
        // A short reply is not a partial read: the read fails (EIO) when the link drops.
        if (status === 0 && data.length !== r.into.length) throw new W.ProtocolError(`read reply of ${data.length} bytes to a read of ${r.into.length}`);
        this.reads.delete(seq);
        if (status === 0) data.copy(r.into);
        r.done.resolve(status);
        return;
      }
      case W.F_RS_DATA:
      case W.F_RS_CSUM:
      case W.F_RS_DONE:
        return this.onResyncTarget(type, payload);
      case W.F_RS_ACK:
      case W.F_RS_CSUM_REPLY:
        if (!this.resync) throw new W.ProtocolError('resync answer while no resync runs');
        this.resync.onFrame(type, payload);
        return;
      case W.F_VERIFY:
        return this.onVerifyRequest(W.decodeVerify(payload, size));
      case W.F_VERIFY_REPLY: {
        const { offset, length, differs } = W.decodeVerifyReply(payload, size);
        if (length !== Math.min(VERIFY_PIECE, size - offset)) throw new W.ProtocolError(`verify answer for ${offset}+${length}, which was not asked`);
        const waiter = this.verifyWaiters.get(offset);
        if (waiter) {
          this.verifyWaiters.delete(offset);
          waiter.resolve(Buffer.from(differs));
          return;
        }
        // The answer to a VERIFY this side sent for the peer's ask: what differs resyncs from here.
        if (!this.answeredVerifyFor(offset)) throw new W.ProtocolError(`verify answer for ${offset}+${length}, which was not asked`);
        this.markDiffering(offset, length, differs);
        return;
      }
      case W.F_VERIFY_ASK: {
        const { offset, length } = W.decodeVerifyAsk(payload, size);
        return this.onVerifyAsk(offset, length);
      }
      case W.F_VERIFY_NO_VERDICT: {
        const { offset, why } = W.decodeVerifyNoVerdict(payload, size);
        const waiter = this.verifyWaiters.get(offset) ?? this.askWaiters.get(offset);
        if (waiter) {
          this.verifyWaiters.delete(offset) || this.askWaiters.delete(offset);
          waiter.resolve(why === W.NO_VERDICT_ROLES ? 'roles-changed' : 'peer-unreadable');
          return;
        }
        // The answer to a VERIFY sent for the peer's ask (nothing to mark), or to an ask that the
        // Primary's own verify already answered (its VERIFY crossed the ask): nothing waits for it.
        this.answeredVerifyFor(offset);
        return;
      }
      case W.F_OUTDATE:
        W.expectEmpty(payload, 'outdate');
        void this.resource.outdatedBy(this.peerNode);
        return;
      case W.F_PROMOTE:
        W.expectEmpty(payload, 'promote');
        return this.onPromoteRequest();
      case W.F_PROMOTE_REPLY: {
        const { granted, reason } = W.decodeJson(payload, W.promoteReplySchema, 'promotion reply');
        const p = this.promotion;
        if (!p || p.granted) throw new W.ProtocolError('an answer to a promotion that was not asked');
        if (granted) p.granted = true;
        else this.promotion = undefined;
        p.answer.resolve(granted ? { outcome: 'granted' } : { outcome: 'refused', reason: reason ?? 'refused' });
        return;
      }
      case W.F_REFUSE: {
        const { reason } = W.decodeJson(payload, W.refuseSchema, 'refusal');
        this.resource.log.warn({ event: 'peer-refused', resource: this.resource.name, peer: this.peerNode, reason }, `${this.peerNode} refused the connection: ${reason}`);
        return;
      }
      default:
        throw new W.ProtocolError(`unknown frame type ${type}`);
    }
  }

  private onState(s: W.PeerState): void {
    const before = this.state;
    // A second state during the handshake: the peer changed after it sent the one it decides from.
    if (this.phase === 'handshake' && before) this.peerChanged = true;
    this.state = this.asResynced(s);
    if (this.phase === 'handshake') {
      if (this.bitmapDone && this.bitmapSent) this.onHandshakeDone();
      return;
    }
    if (before && before.disk !== s.disk) {
      this.resource.log.info({ event: 'peer-disk', resource: this.resource.name, peer: this.peerNode, disk: s.disk }, `peer disk ${s.disk}`);
      if (s.disk === 'Diskless' || s.disk === 'Failed') {
        this.abortResync(`${this.peerNode} lost its disk`);
        this.peerHasNoDisk();
      }
    }
    this.resource.emit('changed');
  }

  /**
   * The peer's state as this side must take it: while this node resyncs it, its disk is Inconsistent
   * (DRBD's pdsk in SyncSource), whatever it said before its resync began (UpToDate or Outdated in the
   * handshake). It says UpToDate again once it has recorded the end of the resync. Otherwise a source
   * whose own disk failed would take the target for a good copy: write to it and read from it.
   */
  private asResynced(s: W.PeerState): W.PeerState {
    return this.phase === 'sync-source' && (s.disk === 'UpToDate' || s.disk === 'Outdated') ? { ...s, disk: 'Inconsistent' } : s;
  }

  /**
   * Writes the peer sends from now on are applied only after this side recorded that it keeps the data
   * (with a witness, once the failed disk is outdated there).
   */
  private peerHasNoDisk(): void {
    this.peerDiskRetry = false;
    const gate = this.resource.peerLostDisk(this.peerNode, this.state!.gi, this.down.signal);
    this.peerDiskGate = gate;
    // A failure here fails the writes waiting on the gate (their nack); the next write from the peer tries again.
    void gate.then(
      () => {
        if (this.peerDiskGate === gate) this.peerDiskGate = undefined;
      },
      () => {
        if (this.peerDiskGate !== gate) return;
        this.peerDiskGate = undefined;
        this.peerDiskRetry = true;
      },
    );
  }

  private onHandshakeDone(): void {
    const r = this.resource;
    const peer = this.state!;
    this.handshakeOver.resolve();
    if (this.peerChanged || JSON.stringify(r.peerState(true)) !== JSON.stringify(this.sent) || r.bitmap.count !== this.sentMarks) {
      // Both sides decide from what each sent; deciding from newer state here (or there) could disagree
      // (e.g. "in sync" there, "sync source" here). Start over with the state as it is now.
      this.phase = 'closed';
      this.close('the state changed during the handshake: connecting again');
      return;
    }
    const action = decideConnect(sideOf(this.sent!), sideOf(peer), r.connectPolicy());
    r.log.info({ event: 'connect-decision', resource: r.name, peer: this.peerNode, action }, `${this.peerNode}: ${describe(action)}`);
    switch (action.kind) {
      case 'refuse':
        return this.refuse(action.reason, action.retry, action.rule);
      case 'split-brain':
        r.splitBrainFound(this.peerNode, action.splitBrain);
        // Two different --keep choices are no answer, and neither may outlive it: a stale one left here would
        // decide the next connect against the admin's next choice, asked on the other node only (seed 4055).
        if (this.sent!.keep !== undefined && peer.keep !== undefined && this.sent!.keep !== peer.keep && r.keepNode === this.sent!.keep) r.keepNode = undefined;
        return this.refuse(action.why, false, action.rule);
      case 'connected':
        // A --keep choice is for the split brain it was asked for: connected without one, it is moot, and
        // kept it would decide a later split brain nobody asked about.
        r.keepNode = undefined;
        return this.connected(action.why);
      case 'sync':
        r.keepNode = undefined;
        if (action.splitBrain) r.splitBrainFound(this.peerNode, action.splitBrain);
        return this.startSync(action.direction, action.full, action.splitBrain);
    }
  }

  /** Nothing more is taken from this link: it closes once the refusal is out (the peer decided the same). */
  private refuse(reason: string, retry: boolean, rule: string): void {
    this.link.send(W.F_REFUSE, W.encodeJson({ reason }));
    this.phase = 'closed';
    this.resource.connectionRefused(this.peerNode, reason, retry, rule);
    this.resource.clock.setTimeout(() => this.close(reason), 50).unref();
  }

  private connected(why: string): void {
    this.phase = 'connected';
    this.peerMarks = undefined;
    const r = this.resource;
    if (this.state!.disk === 'Diskless' || this.state!.disk === 'Failed') this.peerHasNoDisk();
    void r.connectedTo(this.state!).then((changed) => {
      if (changed && this.phase !== 'closed') this.sendState();
    });
    r.log.info({ event: 'connected', resource: r.name, peer: this.peerNode, why }, `connected to ${this.peerNode}`);
    r.emit('changed');
  }

  private startSync(direction: 'source' | 'target', full: boolean, splitBrain: SplitBrainFound | undefined): void {
    const r = this.resource;
    const [source, target] = direction === 'source' ? [this.sent!, this.state!] : [this.state!, this.sent!];
    const ready = r.beginSync(this.peerNode, direction, full, this.peerMarks, splitBrain, syncGeneration(source.gi.current, target.gi.current), () => r.peer === this && this.phase === 'sync-target');
    // A resync that cannot begin (its record or bitmap not written, a split brain's blocks not saved) ends the link:
    // everything waiting on `ready` gives up with it.
    ready.catch((err: unknown) => this.close(`resync ${direction === 'source' ? 'to' : 'from'} ${this.peerNode} could not begin: ${(err as Error).message}`));
    this.peerMarks = undefined;
    const total = r.bitmap.outOfSyncBytes;
    this.resync = new Resync(this, total);
    r.log.info({ event: 'resync-start', resource: r.name, peer: this.peerNode, role: direction === 'source' ? 'SyncSource' : 'SyncTarget', totalBytes: total, full }, `resync ${direction === 'source' ? 'to' : 'from'} ${this.peerNode}: ${total} bytes`);
    if (direction === 'source') {
      this.phase = 'sync-source';
      this.state = this.asResynced(this.state!);
      ready.then(
        () =>
          this.resync!.run().then((finished) => {
            if (finished && this.phase === 'sync-source') return this.finishSource();
          }),
        () => undefined, // closed above
      );
    } else {
      this.phase = 'sync-target';
      this.targetReady = ready;
    }
    r.emit('changed');
  }

  /**
   * A disk failed on either side during the resync: the resync ends and the link stays, as DRBD's
   * sanitize_state does ("abort resync if a disk fails/detaches"). The target keeps its marks and
   * stays Inconsistent; a Diskless source has nothing more to send, and a source must not go on
   * sending to a target that cannot write. The next connect decides again from both records.
   */
  abortResync(why: string): void {
    if (this.phase !== 'sync-source' && this.phase !== 'sync-target') return;
    const r = this.resource;
    const direction = this.phase === 'sync-source' ? 'to' : 'from';
    this.resync?.stop();
    this.resyncAborted = true;
    this.phase = 'connected';
    r.log.warn({ event: 'resync-aborted', resource: r.name, peer: this.peerNode, why, ...this.resync?.progress() }, `resync ${direction} ${this.peerNode} aborted: ${why}`);
    r.emit('changed');
  }

  private async finishSource(): Promise<void> {
    const r = this.resource;
    const gi = await r.finishSyncSource();
    if (this.phase !== 'sync-source') return;
    this.link.send(W.F_RS_DONE, W.encodeJson({ gi }));
    r.log.info({ event: 'resync-done', resource: r.name, peer: this.peerNode, ...this.resync!.progress() }, `resync to ${this.peerNode} done`);
    this.phase = 'connected';
    r.emit('changed');
  }

  private onResyncTarget(type: number, payload: Buffer): void {
    const r = this.resource;
    if (this.phase !== 'sync-target') {
      // Sent before the source learned that the resync was aborted here.
      if (this.resyncAborted && this.phase === 'connected') return;
      throw new W.ProtocolError(`${W.frameName(type)} outside a resync`);
    }
    const ready = this.targetReady!;
    if (type === W.F_RS_DONE) {
      const { gi } = W.decodeJson(payload, W.resyncDoneSchema, 'resync done');
      // One end per resync: a second one while the first is being recorded would record it again.
      if (this.resyncDoneSeen) throw new W.ProtocolError('a second resync done');
      this.resyncDoneSeen = true;
      void this.applying.barrier().then(async () => {
        if (!(await readyOk(ready))) return; // the link was closed for it
        await r.finishSyncTarget(this.peerNode, gi);
        if (this.phase !== 'sync-target') return;
        r.log.info({ event: 'resync-done', resource: r.name, peer: this.peerNode, ...this.resync!.progress() }, `resync from ${this.peerNode} done: UpToDate`);
        this.resync!.stop();
        this.phase = 'connected';
        // The peer lost its disk while this one was still Inconsistent: it is the only good copy now,
        // so it records that before the Diskless peer's writes (which it may send from now on) land.
        if (this.state?.disk === 'Diskless' || this.state?.disk === 'Failed') this.peerHasNoDisk();
        this.sendState();
        r.emit('changed');
      }).catch((err: unknown) => this.close(`resync from ${this.peerNode} could not finish: ${(err as Error).message}`));
      return;
    }
    if (type === W.F_RS_CSUM) {
      const { offset, length, digest: theirs } = W.decodeResyncChecksum(payload, r.size);
      void this.applying.run(offset, length, async () => {
        if (!(await readyOk(ready))) return; // the resync could not begin: the link is closing
        const mine = await this.readLocal(offset, length);
        const same = mine !== undefined && digest(mine).equals(theirs);
        if (same) {
          r.bitmap.clear(offset, length);
          this.resync?.account(length, true);
        }
        this.link.send(W.F_RS_CSUM_REPLY, W.encodeRange(offset, length, Buffer.from([same ? 1 : 0])));
      });
      return;
    }
    const { offset, length, zero, data } = W.decodeResyncData(payload, r.size);
    void this.applying.run(offset, length, async () => {
      if (!(await readyOk(ready))) return;
      const dev = r.backing;
      if (!dev) return;
      try {
        if (zero) await dev.writeZeroes(offset, length, {});
        else await dev.write(offset, data);
        r.bitmap.clear(offset, length);
        this.resync?.account(length, false);
        this.link.send(W.F_RS_ACK, W.encodeRange(offset, length));
      } catch (err) {
        r.detach(err);
      }
    });
  }

  private onWrite(w: W.WriteFrame): void {
    const r = this.resource;
    if (r.role === 'Primary' && !r.options.allowTwoPrimaries) throw new Error('write from the peer while Primary here');
    if (r.options.protocol === 'B') this.link.send(W.F_ACK_RECV, W.encodeSeq(w.seq));
    const data = w.data;
    const fua = (w.flags & W.WF_FUA) !== 0;
    // A write from a peer without a disk is a block that peer's own (failed) disk lacks: marked here, as
    // DRBD's receive_Data does, so a later bitmap resync to it covers it even if no full sync is asked.
    if (this.state?.disk === 'Diskless' || this.state?.disk === 'Failed') r.bitmap.mark(w.offset, w.length);
    /** Apply the part [from, to) of the peer's write to the local disk. */
    const writePart = (from: number, to: number): void | Promise<void> => {
      const dev = r.backing;
      if (!dev) throw new BlockDeviceError('EIO', 'no disk');
      if (w.flags & W.WF_ZERO) return dev.writeZeroes(from, to - from, { fua, noHole: (w.flags & W.WF_TRIM) === 0 });
      return dev.write(from, from === w.offset && to === w.offset + w.length ? data! : data!.subarray(from - w.offset, to - w.offset), { fua });
    };
    const ack = (): void => {
      this.link.send(W.F_ACK_WRITE, W.encodeSeq(w.seq, 0));
      if (this.applying.size < APPLY_MAX / 2) this.link.resume();
    };
    const nack = (err: unknown): void => {
      // Only the disk's own error detaches it (a resync that could not begin fails the write, not the disk).
      if (err instanceof BlockDeviceError) r.detach(err);
      this.link.send(W.F_ACK_WRITE, W.encodeSeq(w.seq, 1));
      this.link.resume();
    };
    // Dual-primary: a peer write racing a local one on the same blocks. Both nodes see the race;
    // the write of the node whose name sorts last wins on both, so the replicas stay identical.
    const racing = r.role === 'Primary' ? r.appWrites.settled(w.offset, w.length) : undefined;
    if (racing) {
      r.conflictingWrites++;
      r.log.warn({ event: 'write-conflict', resource: r.name, peer: this.peerNode, offset: w.offset, length: w.length }, `concurrent writes from both Primaries to ${w.offset}+${w.length}`);
      if (r.node > this.peerNode) {
        // This node's write wins: take only the parts of the peer's write that no local write covers.
        const pieces = subtract(w.offset, w.offset + w.length, r.appWrites.overlapping(w.offset, w.length));
        Promise.all(pieces.map(([from, to]) => this.applying.run(from, to - from, () => writePart(from, to)))).then(ack, nack);
        return;
      }
    }
    const write = (): void | Promise<void> => writePart(w.offset, w.offset + w.length);
    if (this.peerDiskRetry && (this.state?.disk === 'Diskless' || this.state?.disk === 'Failed')) this.peerHasNoDisk();
    const gates = [racing, this.targetReady, this.peerDiskGate].filter((g) => g !== undefined);
    const waitFirst = gates.length === 0 ? undefined : gates.length === 1 ? gates[0] : Promise.all(gates);
    // Nothing to wait for and a synchronous disk: applied and acknowledged with no promise at all.
    const apply = waitFirst ? () => waitFirst.then(write) : write;
    if (this.applying.size >= APPLY_MAX) {
      this.link.pause();
    }
    let done: void | Promise<void>;
    try {
      done = this.applying.run(w.offset, w.length, apply);
    } catch (err) {
      return nack(err);
    }
    if (done instanceof Promise) done.then(ack, nack);
    else ack();
  }

  private onFlush(seq: number): void {
    const r = this.resource;
    void this.applying.barrier().then(async () => {
      let status = 0;
      try {
        if (!r.backing) throw new Error('no disk');
        await r.backing.flush();
      } catch (err) {
        r.detach(err);
        status = 1;
      }
      this.link.send(W.F_FLUSH_ACK, W.encodeSeq(seq, status));
    });
  }

  private onRead({ seq, offset, length }: { seq: number; offset: number; length: number }): void {
    void this.applying.run(offset, length, async () => {
      const data = await this.readLocal(offset, length);
      const h = Buffer.allocUnsafe(12);
      h.writeBigUInt64BE(BigInt(seq), 0);
      h.writeUInt32BE(data ? 0 : 1, 8);
      this.link.sendv(W.F_READ_REPLY, data ? [h, data] : [h]);
    });
  }

  /** Read from the local disk; undefined (and detach) on an I/O error. */
  async readLocal(offset: number, length: number): Promise<Buffer | undefined> {
    const dev = this.resource.backing;
    if (!dev) return undefined;
    const buf = Buffer.allocUnsafe(length);
    try {
      await dev.read(offset, buf);
      return buf;
    } catch (err) {
      this.resource.detach(err);
      return undefined;
    }
  }

  /** Is [offset, offset+length) a hole or zeros on the local disk (so zeroing it on the peer is enough)? */
  async isZero(offset: number, length: number): Promise<number> {
    const dev = this.resource.backing;
    if (!dev || !dev.capabilities.extents) return 0;
    try {
      const extents = await dev.blockStatus(offset, length, { firstOnly: true });
      const e = extents[0];
      if (e && e.offset === offset && (e.flags & (EXTENT_HOLE | EXTENT_ZERO)) !== 0) return Math.min(e.length, length);
    } catch {
      /* unknown: send data */
    }
    return 0;
  }

  /* ------------------------------------------------------------- verify */

  /**
   * Compare every block with the peer by digest; mark what differs (it
   * resyncs on the next connect). The digests go from the Primary to the
   * Secondary, whichever side runs the verify: the Primary reads each piece
   * in the order of its application writes and the Secondary compares in the
   * order it applies them, so a write on its way is never taken for a
   * difference. A Secondary asks the Primary for each piece (VERIFY_ASK);
   * with no Primary (or a peer of an older build) this side sends its own.
   * A piece that either side cannot read, or that the link took down with it,
   * is not compared: the verify fails rather than call it in sync or not.
   */
  async runVerify(onProgress?: (v: VerifyProgress) => void): Promise<VerifyProgress> {
    const r = this.resource;
    if (!this.replicating || this.phase !== 'connected') throw new Error(`resource ${r.name} is not Connected to ${this.peerNode} (${this.connection()})`);
    if (this.verify?.running) throw new Error(`a verify of ${r.name} is already running`);
    if (!r.backing) throw new Error(`resource ${r.name} has no disk on ${r.node} (Diskless): nothing to verify; attach it first`);
    if (this.state?.disk === 'Diskless') throw new Error(`resource ${r.name} has no disk on ${this.peerNode} (Diskless): nothing to verify against`);
    const ask = r.role !== 'Primary' && this.state?.role === 'Primary' && this.features.has(FEATURE_VERIFY_ASK);
    const v: VerifyProgress = { doneBytes: 0, totalBytes: r.size, outOfSyncBytes: 0, running: true, ranges: [] };
    this.verify = v;
    r.log.info({ event: 'verify-start', resource: r.name, peer: this.peerNode, digestsFrom: ask ? this.peerNode : r.node }, 'online verify started');
    const inFlight = new Set<Promise<void>>();
    let failed: string | undefined;
    // The digests go from the Primary: a switchover during the verify leaves pieces read under the old roles.
    const roles = (): string => `${r.node} ${r.role}, ${this.peerNode} ${this.state?.role ?? 'Unknown'}`;
    const startRoles = roles();
    const stopped = (why: VerifyStop, at: number): string | undefined => {
      if (why === 'down') return undefined; // said below, with how much was compared
      if (why === 'roles-changed') return `the roles changed during the verify of ${r.name} (${startRoles}; now ${roles()}); nothing after ${at} was compared: run it again`;
      const node = why === 'local-unreadable' ? r.node : this.peerNode;
      return `the disk of ${r.name} on ${node} could not be read during verify (at ${at}); nothing after it was compared`;
    };
    try {
      for (let offset = 0; offset < r.size && this.link.isUp && failed === undefined; offset += VERIFY_PIECE) {
        const length = Math.min(VERIFY_PIECE, r.size - offset);
        while (inFlight.size >= VERIFY_WINDOW) await Promise.race(inFlight);
        // Down while waiting for room: a waiter added now would never be answered.
        if (!this.link.isUp || failed !== undefined) break;
        const answered = deferred<PieceAnswer>();
        if (ask) {
          this.askWaiters.set(offset, answered);
          this.link.send(W.F_VERIFY_ASK, W.encodeRange(offset, length));
        } else {
          this.verifyWaiters.set(offset, answered);
          // Read and send under the write order, so the peer compares with the same writes applied.
          const sent = await r.appWrites.run(offset, length, async () => {
            const data = await this.readLocal(offset, length);
            if (!data) return false;
            this.link.send(W.F_VERIFY, W.encodeRange(offset, length, blockDigests(data)));
            return true;
          });
          if (!sent) {
            this.verifyWaiters.delete(offset);
            failed = stopped('local-unreadable', offset);
            break;
          }
        }
        const job: Promise<void> = answered.promise.then((answer) => {
          inFlight.delete(job);
          if (typeof answer !== 'string' && roles() !== startRoles) answer = 'roles-changed';
          if (typeof answer === 'string') {
            failed ??= stopped(answer, offset);
            return;
          }
          v.outOfSyncBytes += this.markDiffering(offset, length, answer, v.ranges);
          v.doneBytes += length;
          onProgress?.(v);
        });
        inFlight.add(job);
      }
      await Promise.all(inFlight);
    } finally {
      v.running = false;
    }
    if (failed !== undefined) throw new Error(failed);
    // Every piece answered, or the verify is no verdict: pieces the link took down with it were never compared.
    if (v.doneBytes < v.totalBytes) throw new Error(`the link to ${this.peerNode} went down during verify (${v.doneBytes} of ${v.totalBytes} bytes compared)`);
    await r.writeBitmap();
    r.log.info({ event: 'verify-done', resource: r.name, peer: this.peerNode, outOfSyncBytes: v.outOfSyncBytes, ranges: v.ranges.slice(0, 20) }, `verify done: ${v.outOfSyncBytes} bytes out of sync`);
    return v;
  }

  /** Mark the blocks of a piece whose "differs" bit is set; the bytes marked (and their ranges appended, merged, to `ranges`, at most VERIFY_RANGES_MAX). */
  private markDiffering(offset: number, length: number, differs: Buffer, ranges?: { offset: number; length: number }[]): number {
    let marked = 0;
    for (let i = 0; i * BLOCK < length; i++) {
      if ((differs[i >> 3] & (1 << (i & 7))) === 0) continue;
      const at = offset + i * BLOCK;
      const n = Math.min(BLOCK, length - i * BLOCK);
      this.resource.bitmap.mark(at, n);
      marked += n;
      if (!ranges) continue;
      const last = ranges[ranges.length - 1];
      if (last && last.offset + last.length === at) last.length += n;
      else if (ranges.length < VERIFY_RANGES_MAX) ranges.push({ offset: at, length: n });
    }
    return marked;
  }

  /** The peer sends a verify piece: compare in the order writes from the peer are applied here. */
  private onVerifyRequest({ offset, length, digests: rest }: { offset: number; length: number; digests: Buffer }): void {
    // A correct peer keeps VERIFY_WINDOW pieces of its own and its answers to this side's asks in flight.
    if (this.verifyQueued >= 8 * VERIFY_WINDOW) throw new W.ProtocolError(`more than ${8 * VERIFY_WINDOW} verify pieces sent without waiting for the answers`);
    this.verifyQueued++;
    void this.applying.run(offset, length, async () => {
      try {
        await this.compareVerifyPiece(offset, length, rest);
      } finally {
        this.verifyQueued--;
      }
    });
  }

  private async compareVerifyPiece(offset: number, length: number, rest: Buffer): Promise<void> {
    const r = this.resource;
    // This side's own verify may have asked for this piece: this is its answer.
    const asked = this.askWaiters.get(offset);
    if (asked) this.askWaiters.delete(offset);
    const noVerdict = (why: number): void => {
      this.link.send(W.F_VERIFY_NO_VERDICT, W.encodeRange(offset, length, Buffer.from([why])));
      asked?.resolve(why === W.NO_VERDICT_ROLES ? 'roles-changed' : 'local-unreadable');
    };
    const current = this.features.has(FEATURE_VERIFY_ASK);
    // Digests come from the Primary; a Primary here means this side was promoted since they were read
    // (a peer of this build sends its own only as Primary, or with no Primary at its start): this
    // side's writes since are not in them, so no verdict rather than a false difference.
    if (current && r.role === 'Primary' && this.state?.role !== 'Primary') return noVerdict(W.NO_VERDICT_ROLES);
    const mine = await this.readLocal(offset, length);
    // No copy to compare (the disk failed): no verdict on the piece, not "every block differs".
    if (!mine && current) return noVerdict(W.NO_VERDICT_UNREADABLE);
    const ours = mine ? blockDigests(mine) : undefined;
    const differs = Buffer.alloc(W.VERIFY_REPLY_BYTES);
    for (let i = 0; i * BLOCK < length; i++) {
      const same = ours !== undefined && ours.subarray(i * DIGEST, (i + 1) * DIGEST).equals(rest.subarray(i * DIGEST, (i + 1) * DIGEST));
      if (!same) differs[i >> 3] |= 1 << (i & 7);
    }
    if (mine) this.markDiffering(offset, length, differs);
    this.link.send(W.F_VERIFY_REPLY, W.encodeRange(offset, length, differs));
    asked?.resolve(mine ? differs : 'local-unreadable');
  }

  /** The peer's verify asks this side (its Primary) for a piece: send the digests in the order of this side's writes. */
  private onVerifyAsk(offset: number, length: number): void {
    const r = this.resource;
    // A correct peer keeps VERIFY_WINDOW pieces in flight (its answers go out before its next asks): far more is a peer gone wrong.
    if (this.asksUnanswered + this.askedOfMeTotal >= 4 * VERIFY_WINDOW) throw new W.ProtocolError(`more than ${4 * VERIFY_WINDOW} verify pieces asked at once`);
    this.asksUnanswered++;
    void r.appWrites.run(offset, length, async () => {
      const data = await this.readLocal(offset, length);
      // Down meanwhile: the counts were reset with the link.
      if (!this.link.isUp) return;
      this.asksUnanswered--;
      if (!data) {
        this.link.send(W.F_VERIFY_NO_VERDICT, W.encodeRange(offset, length, Buffer.from([W.NO_VERDICT_UNREADABLE])));
        return;
      }
      // Only a piece sent may be answered: a reply that comes before it is a protocol error.
      this.askedOfMe.set(offset, (this.askedOfMe.get(offset) ?? 0) + 1);
      this.askedOfMeTotal++;
      this.link.send(W.F_VERIFY, W.encodeRange(offset, length, blockDigests(data)));
    });
  }

  /** The peer answered a VERIFY this side sent for its ask; false if none was waiting at `offset`. */
  private answeredVerifyFor(offset: number): boolean {
    const n = this.askedOfMe.get(offset) ?? 0;
    if (n === 0) return false;
    if (n === 1) this.askedOfMe.delete(offset);
    else this.askedOfMe.set(offset, n - 1);
    this.askedOfMeTotal--;
    return true;
  }

  /* ---------------------------------------------------------------- down */

  private onDown(why: string): void {
    const r = this.resource;
    const wasPhase = this.phase;
    this.handshakeOver.resolve();
    this.phase = 'closed';
    this.resync?.stop();
    // What the peer may not have: writes not acknowledged, and writes not yet flushed there.
    if (this.epochTimer) this.resource.clock.clearTimeout(this.epochTimer);
    this.epochTimer = undefined;
    for (const p of this.pending.values()) r.markUnreplicated(p.offset, p.length);
    if (wasPhase !== 'handshake' && r.role === 'Primary') {
      for (const f of this.flushes.values()) for (const [at, n] of f.writes.ranges()) r.markUnreplicated(at, n);
      for (const [at, n] of this.epoch.ranges()) r.markUnreplicated(at, n);
    }
    for (const p of this.pending.values()) {
      p.received.resolve(false);
      p.done.resolve(false);
    }
    this.pending.clear();
    for (const f of this.flushes.values()) f.done.resolve(false);
    this.flushes.clear();
    this.promotion?.answer.resolve({ outcome: 'down' });
    for (const rd of this.reads.values()) rd.done.resolve(1);
    this.reads.clear();
    // Pieces not compared: no verdict on them (runVerify says how much was).
    for (const w of this.verifyWaiters.values()) w.resolve('down');
    this.verifyWaiters.clear();
    for (const w of this.askWaiters.values()) w.resolve('down');
    this.askWaiters.clear();
    this.asksUnanswered = 0;
    this.askedOfMe.clear();
    this.askedOfMeTotal = 0;
    this.link.resume();
    r.log.warn({ event: 'disconnected', resource: r.name, peer: this.peerNode, why, phase: wasPhase }, `lost ${this.peerNode}: ${why}`);
    if (r.peer === this) r.peer = undefined;
    void r.writeBitmap();
    for (const fn of this.downHandlers) fn(why);
    this.down.abort(new Error(`the link to ${this.peerNode} went down`));
    r.emit('changed');
  }
}

/** Bytes of one block's digest in a verify request (SHA-256, truncated). */
const DIGEST = W.VERIFY_DIGEST;

/** Why a verify piece got no verdict: the link went down, one side could not read its copy, or a switchover. */
type VerifyStop = 'down' | 'local-unreadable' | 'peer-unreadable' | 'roles-changed';
/** A verify piece's answer: a bit per block, set where the copies differ; or why there is none. */
type PieceAnswer = Buffer | VerifyStop;

/** One truncated SHA-256 per 4 KiB block, so verify reports exactly which blocks differ. */
function blockDigests(data: Buffer): Buffer {
  const out = Buffer.allocUnsafe(Math.ceil(data.length / BLOCK) * DIGEST);
  for (let i = 0; i * BLOCK < data.length; i++) {
    createHash('sha256').update(data.subarray(i * BLOCK, (i + 1) * BLOCK)).digest().copy(out, i * DIGEST, 0, DIGEST);
  }
  return out;
}

export function digest(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest();
}

function describe(a: ConnectAction): string {
  switch (a.kind) {
    case 'sync':
      return `${a.full ? 'full' : 'bitmap'} resync as ${a.direction} (${a.why})`;
    case 'split-brain':
      return a.why;
    case 'refuse':
      return `refused: ${a.reason}`;
    case 'connected':
      return a.why;
  }
}

/** The decision's view of one side, from the state it sent. */
function sideOf(s: W.PeerState): ConnectSide {
  return {
    node: s.node,
    role: s.role,
    disk: s.disk,
    dataBytes: s.dataBytes,
    gi: s.gi,
    crashedPrimary: s.crashedPrimary === true,
    outOfSyncBytes: s.outOfSyncBytes,
    primarySince: s.primarySince,
    fullSyncNeeded: s.fullSyncNeeded === true,
    peerDiskFailed: s.peerDiskFailed === true,
    ...(s.peerDiskFailedGi !== undefined ? { peerDiskFailedGi: s.peerDiskFailedGi } : {}),
    ...(s.peerDiskFailedFrom !== undefined ? { peerDiskFailedFrom: s.peerDiskFailedFrom } : {}),
    inUse: s.inUse === true,
    keep: s.keep,
  };
}

export { BLOCK };

/** Did the resync's start get recorded (false: it could not begin, and the link is closing for it)? */
function readyOk(ready: Promise<void>): Promise<boolean> {
  return ready.then(
    () => true,
    () => false,
  );
}
