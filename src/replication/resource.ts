/**
 * A replicated resource on one node: the local backing device, mirrored to
 * the peer's, presented as a `BlockDevice` (what the pool sits on).
 *
 * Only the Primary serves I/O. A write goes to the local disk and, over the
 * peer link, to the peer's disk at the same time, and is acknowledged as the
 * resource's protocol says (A: handed to the link, B: the peer received it,
 * C: the peer's disk has it). FUA and flush wait for every replica whatever
 * the protocol. While the peer is away, written blocks are marked in the
 * out-of-sync bitmap, and the first such write starts a new data generation
 * (and outdates the peer at the witness, when there is one) before it is
 * acknowledged. Every write first makes its 4 MiB extent hot in the activity
 * log, so that after a crash of the Primary only the hot extents resync.
 *
 * An I/O error on the local disk detaches it: the resource goes Diskless
 * here and goes on through the peer; the client sees no error as long as
 * the peer has the data.
 */
import { EventEmitter } from 'node:events';
import type { BlockDevice, BlockSizeLimits, Capabilities, Extent, WriteOptions, ZeroOptions } from '../blockdev/types.js';
import { BlockDeviceError, checkRange } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { ActivityLog, AL_EXTENT_BYTES } from './activity-log.js';
import { NoMetadata } from './create-md.js';
import { Bitmap } from './bitmap.js';
import { DiskState, GenerationIds, layoutFor, MetaLayout, MetaRecord, newGi, NO_GI, readRecord, writeRecord } from './meta.js';
import { RangeOrder } from '../util/range-order.js';
import type { PeerSession, PeerStatus } from './peer.js';
import type { PeerState, Role } from './wire.js';
import { ConnectPolicy, forcedGeneration, SplitBrainFound, SplitBrainPolicy } from './connect-decision.js';
import { saveBlocks } from './split-brain.js';
import { BorrowedDevice } from '../blockdev/delegating.js';
import { Clock, realClock } from '../util/clock.js';
import type { FileIo } from '../util/file-io.js';

export type Protocol = 'A' | 'B' | 'C';
export type { SplitBrainPolicy };

export interface ResourceOptions {
  resource: string;
  node: string;
  protocol: Protocol;
  log: Logger;
  /** Resync rate cap in bytes/s; 0 = dynamic (as fast as the link allows, yielding to application writes). */
  resyncRateBytesPerSec?: number;
  /** Checksum-based resync: only blocks whose digests differ travel. */
  checksumResync?: boolean;
  afterSplitBrain?: SplitBrainPolicy;
  allowTwoPrimaries?: boolean;
  /** Where blocks are saved before a split-brain resolution overwrites them. */
  splitBrainDir?: string;
  alSlots?: number;
  /** Asked before this node diverges from its peer (first unreplicated write): outdate the peer at the witness. */
  fence?: (resource: string, generation: { from: string; to: string }, signal: AbortSignal) => Promise<'fenced' | 'peer-back'>;
  /** A fence that turned out not to be needed (this node never started `generation.to`): the peer's mark goes. */
  unfence?: (resource: string, generation: { from: string; to: string }) => Promise<void>;
  /** Asked before a promotion: may this node become Primary (quorum, witness says not outdated)? Throws a UserError if not. */
  mayPromote?: (resource: string, force: boolean) => Promise<void>;
  /** Time and timers (the real clock unless a simulation runs). */
  clock?: Clock;
  /** How split-brain blocks are written to their file (asynchronously unless a simulation runs). */
  fileIo?: FileIo;
  /** Source of the random bytes of new generation ids (crypto.randomBytes unless a simulation runs). */
  randomBytes?: (size: number) => Buffer;
}

/** How long `promote --force` waits for the witness to fence the peer before it goes on unfenced. */
export const FORCED_FENCE_WAIT_MS = 3000;

/** The reason a forced promotion stops waiting for its fence. */
class ForcedPastFence extends Error {
  constructor() {
    super(`the witness did not answer within ${FORCED_FENCE_WAIT_MS} ms`);
  }
}

/** Writes here fail: the other side went on without this node (it must be made Secondary). */
export class FencedOff extends BlockDeviceError {
  constructor(message: string) {
    super('EIO', message);
  }
}

/** Writes held at most (no quorum, on-no-quorum: suspend); more fail with EIO rather than pile up. */
export const HELD_WRITES_MAX = 4096;

export interface SplitBrainInfo {
  detectedAt: string;
  policy: SplitBrainPolicy;
  /** Bytes this node changed since the split. */
  localChangedBytes: number;
  /** Bytes the peer changed since the split. */
  peerChangedBytes: number;
  /** How it was resolved, once it is. */
  resolution: string | null;
  /** File holding this node's blocks that the resolution overwrote. */
  savedTo: string | null;
}

export interface ResourceStatus {
  name: string;
  role: Role;
  disk: DiskState;
  protocol: Protocol;
  dataBytes: number;
  outOfSyncBytes: number;
  generation: GenerationIds;
  suspended: boolean;
  /** Why writes fail here until the node is made Secondary (the other side went on without it). */
  fencedOff: string | null;
  splitBrain: SplitBrainInfo | null;
  conflictingWrites: number;
  peers: PeerStatus[];
}

export interface ResourceEvents {
  /** Role, disk or connection changed. */
  changed: [];
}

export class Resource extends EventEmitter<ResourceEvents> implements BlockDevice {
  readonly blockSize: BlockSizeLimits;
  readonly capabilities: Capabilities;
  role: Role = 'Secondary';
  /** The peer session, while a link is up. */
  peer: PeerSession | undefined;
  /** Set by `disconnect`: no link is made until `connect`. */
  standAlone = false;
  splitBrain: SplitBrainInfo | null = null;
  /** Last Primary crashed here: its activity-log extents are out of sync. */
  crashedPrimary: boolean;
  /** Manual split-brain resolution waiting for the next connect: the node whose data stays. */
  keepNode: string | undefined;
  /** Why the last connection was refused (split brain, unrelated data...), until one succeeds. */
  lastRefusal: string | undefined;
  /** Dual-primary: writes from both Primaries to the same blocks at the same time (detected, resolved, counted). */
  conflictingWrites = 0;
  /** Writes held (no quorum with on-no-quorum: suspend). */
  suspended = false;
  /** Application writes in flight (resync and verify reads wait for overlapping ones). */
  readonly appWrites = new RangeOrder();
  /** Set while application I/O happened recently (the dynamic resync controller yields). */
  lastAppWriteAt = 0;
  /** Application writes past the handshake's hold, not finished (a handshake lets them finish first). */
  private writesUnderWay = 0;
  private writesSettledWaiters: (() => void)[] = [];
  private metaChain: Promise<unknown> = Promise.resolve();
  /** Sequence number of the record last written. */
  private recordSeq: number;
  private bitmapChain: Promise<void> = Promise.resolve();
  private bitmapQueued: Promise<void> | undefined;
  /** Openers of the data (pools): a resync must not change it under them. */
  private holders = 0;
  private diverging: Promise<void> | undefined;
  private divergeAbort: AbortController | undefined;
  /** Writes waiting for `diverging`. */
  private held = 0;
  /** Split-brain saves under way as a sync target: no role change meanwhile. */
  private syncStarting = 0;
  /** Why writes fail here until the node is Secondary (the other side went on without it). */
  fencedOff: string | undefined;
  private closed = false;

  private constructor(
    private backing_: BlockDevice | undefined,
    readonly layout: MetaLayout,
    public record: MetaRecord,
    readonly bitmap: Bitmap,
    readonly al: ActivityLog,
    readonly options: ResourceOptions,
    crashedPrimary: boolean,
  ) {
    super();
    this.crashedPrimary = crashedPrimary;
    this.recordSeq = record.seq;
    const inner = backing_!;
    this.blockSize = { ...inner.blockSize, minimum: Math.max(inner.blockSize.minimum, 512), maximum: Math.min(inner.blockSize.maximum, 1024 * 1024) };
    this.capabilities = {
      readOnly: false,
      flush: true,
      fua: true,
      // Trim is done as zeroing on every replica, so both read the same afterwards.
      trim: inner.capabilities.fastZero,
      fastZero: inner.capabilities.fastZero,
      extents: inner.capabilities.extents,
      multiConn: true,
      rotational: inner.capabilities.rotational,
    };
  }

  get name(): string {
    return this.options.resource;
  }
  get size(): number {
    return this.layout.dataBytes;
  }
  get node(): string {
    return this.options.node;
  }
  get log(): Logger {
    return this.options.log;
  }
  get clock(): Clock {
    return this.options.clock ?? realClock;
  }
  get backing(): BlockDevice | undefined {
    return this.backing_;
  }
  get disk(): DiskState {
    return this.backing_ ? this.record.disk : 'Diskless';
  }

  /**
   * Open the resource on its backing device. A device without metadata is
   * refused (NoMetadata) and left untouched: only `resource create-md`
   * (createMetadata) writes fresh metadata. A device smaller than its
   * metadata says is refused.
   */
  static async open(backing: BlockDevice, options: ResourceOptions): Promise<Resource> {
    const layout = layoutFor(backing.size);
    let record = await readRecord(backing, layout);
    if (!record) throw new NoMetadata(backing.name, options.resource);
    if (record.resource !== options.resource) {
      throw new UserError(`${backing.name}: holds resource ${record.resource}, not ${options.resource}; give ${options.resource} its own disk`);
    }
    if (record.dataBytes !== layout.dataBytes) {
      throw new UserError(`${backing.name}: is ${backing.size} bytes but its metadata says ${record.dataBytes} bytes of data; give it a disk of the size it had`);
    }
    const bitmap = await Bitmap.read(backing, layout.bitmapOffset, layout.dataBytes, options.clock);
    const self: { resource?: Resource } = {};
    const { log: al, recovered } = await ActivityLog.open(backing, layout.alOffset, layout.alBytes, {
      slots: options.alSlots,
      clock: options.clock,
      beforeEvict: async () => {
        // The peer's disk too must hold what was written in the extents for good before the log forgets
        // them: a power cut of both nodes would otherwise lose them there (a failed flush marks them).
        const peer = self.resource?.peer;
        if (peer?.replicating) await peer.sendFlush();
        await self.resource?.writeBitmap();
      },
    });
    // Records written before the field existed.
    record = { ...record, peerDiskFailed: record.peerDiskFailed ?? false, peerDiskFailedFrom: record.peerDiskFailedFrom ?? [] };
    const failedBefore = record.disk === 'Failed';
    const crashed = record.primary;
    if (crashed) {
      // The Primary died with these extents hot: their blocks may differ from the peer's.
      for (const e of recovered) bitmap.mark(e * AL_EXTENT_BYTES, AL_EXTENT_BYTES);
      // Durable before the record stops saying "crashed Primary".
      await bitmap.writeBack(backing, layout.bitmapOffset, false, options.clock);
      await backing.flush();
      options.log.warn({ event: 'crashed-primary-recovery', resource: options.resource, extents: recovered.length }, 'was Primary when it stopped: activity-log extents marked out of sync');
    }
    const r = new Resource(backing, layout, record, bitmap, al, options, crashed && recovered.length > 0);
    self.resource = r;
    if (crashed) await r.saveRecord({ primary: false });
    if (failedBefore) {
      // This disk failed while in use: whatever it holds is not trusted until a full sync overwrites it.
      options.log.warn({ event: 'failed-disk-attached', resource: options.resource, device: backing.name }, `resource ${options.resource}: ${backing.name} failed earlier: Inconsistent until a full sync from the peer`);
      await r.saveRecord({ disk: 'Inconsistent', fullSyncNeeded: true });
    }
    return r;
  }

  /* ------------------------------------------------------------ metadata */

  /**
   * Change the record and persist it (serialized; FUA; old or new survives a
   * crash). The change is visible in memory at once, so every decision made
   * meanwhile (a new generation, the next patch) starts from it; it resolves
   * once the disk holds it (or a later record that includes it).
   */
  saveRecord(patch: Partial<MetaRecord>): Promise<void> {
    this.record = { ...this.record, ...patch };
    const run = this.metaChain.then(async () => {
      if (!this.backing_) return;
      const written = await writeRecord(this.backing_, this.layout, { ...this.record, seq: this.recordSeq });
      this.recordSeq = written.seq;
    });
    this.metaChain = run.catch(() => undefined);
    return run.catch((err: unknown) => this.detach(err));
  }

  /**
   * Write the changed bitmap pages and make them durable, one write-back at
   * a time: the pages are taken as they are now, the data written so far is
   * flushed, then the pages are written and flushed. So a bit cleared after
   * its resync data was written reaches the disk only after that data, and
   * what waits for this (an activity-log page that forgets an extent, a
   * record that relies on the marks) follows the marks made before the call.
   */
  writeBitmap(): Promise<void> {
    // A write-back not yet started takes its pages when it starts: it covers this call's marks too.
    if (this.bitmapQueued) return this.bitmapQueued;
    const run = this.bitmapChain.then(async () => {
      this.bitmapQueued = undefined;
      const dev = this.backing_;
      if (!dev) return;
      const pages = this.bitmap.snapshot();
      if (pages.length === 0) return;
      try {
        await dev.flush();
        await Bitmap.writePages(dev, this.layout.bitmapOffset, pages, this.options.clock);
        await dev.flush();
      } catch (err) {
        this.detach(err);
      }
    });
    this.bitmapQueued = run;
    this.bitmapChain = run;
    return run;
  }

  /**
   * Blocks written here and not on the peer. The first of them after the
   * generations were equal starts a new generation (after fencing the peer);
   * the caller acknowledges its write only after the returned promise.
   */
  markDiverged(offset: number, length: number): void | Promise<void> {
    this.bitmap.mark(offset, length);
    // Fenced off: whatever was in flight fails too, even after the node stepped down.
    if (this.fencedOff !== undefined) return Promise.reject(new FencedOff(this.fencedOff));
    // Without a disk nothing diverges here: the write is on no disk of this node (it fails), and the peer
    // holds the only copy: outdating it at the witness would keep the good data from being promoted
    // (DRBD's conn_try_outdate_peer: "Not fencing peer, I'm not even Consistent myself").
    if (!this.backing_) return;
    // A new generation (fencing the peer first, with a witness) unless one diverged already and the
    // peer is outdated at the witness for it (a forced promotion or a peer's lost disk diverge unfenced).
    const fenced = this.record.gi.bitmap !== NO_GI && (this.options.fence === undefined || this.record.peerOutdated);
    const wait = fenced || this.role !== 'Primary' ? this.diverging : this.newGeneration('writing without the peer');
    if (!wait) return;
    if (this.held >= HELD_WRITES_MAX) return Promise.reject(new BlockDeviceError('EIO', `resource ${this.name}: ${this.held} writes are held already (no quorum): write refused`));
    this.held++;
    return wait.finally(() => {
      this.held--;
    });
  }

  /**
   * Start a new data generation: the bitmap records from the current one
   * (DRBD's new current UUID). Fences the peer first when a witness is
   * configured, so it cannot be promoted with data that is now old.
   */
  private newGeneration(why: string, beforeSave?: () => void, forced = false): Promise<void> {
    if (this.fencedOff !== undefined) return Promise.reject(new FencedOff(this.fencedOff));
    this.diverging ??= (async () => {
      const abort = new AbortController();
      this.divergeAbort = abort;
      const gi = this.record.gi;
      const generation = { from: gi.current, to: newGi(this.options.randomBytes) };
      // `promote --force`: the admin says the peer is down. The witness is asked, but not waited for
      // for good (DRBD's primary --force goes on when the fence-peer handler fails): past a short wait
      // the node goes on unfenced, and says so.
      const giveUp = forced ? this.clock.setTimeout(() => abort.abort(new ForcedPastFence()), FORCED_FENCE_WAIT_MS) : undefined;
      try {
        // The peer is outdated until it holds the generation this node moves to.
        const outcome = (await this.options.fence?.(this.name, generation, abort.signal)) ?? 'fenced';
        if (outcome === 'peer-back') {
          // The peer came back and took this node's changes: they are on both disks, nothing diverged.
          // An outdate that timed out here may still have reached the witness: its mark goes too.
          void this.options.unfence?.(this.name, generation);
          this.log.info({ event: 'peer-back', resource: this.name }, `resource ${this.name}: the peer is back and has this node's changes: held writes complete`);
          return;
        }
      } catch (err) {
        if (forced && !(err instanceof FencedOff) && !this.closed) {
          // The admin's word stands for the fence: writes of this generation do not ask the witness again.
          this.log.warn(
            { event: 'fence-skipped-by-force', resource: this.name, err: (err as Error).message },
            `resource ${this.name}: promoted with --force without fencing the peer (${(err as Error).message}): make sure it is down, or it may be promoted on old data`,
          );
        } else {
          if (err instanceof FencedOff) this.fenceOff(err.message);
          // This node never starts that generation now; an outdate that timed out here may have reached the witness.
          void this.options.unfence?.(this.name, generation);
          throw err;
        }
      } finally {
        this.clock.clearTimeout(giveUp);
      }
      // The link came up while the witness was asked, and the handshake found both in sync at the old
      // generation: the peer takes every write from here. A new generation now would be one the peer
      // never hears of (a split brain on the next reconnect, though only this node wrote).
      if (this.inSyncWithPeer()) {
        this.log.info({ event: 'peer-back', resource: this.name }, `resource ${this.name}: the peer connected in sync meanwhile: no new generation`);
        // The witness's mark waits for a generation the peer will never hold.
        void this.options.unfence?.(this.name, generation);
        return;
      }
      // What the new generation is for may no longer be allowed (a promotion, once the link came up).
      try {
        beforeSave?.();
      } catch (err) {
        void this.options.unfence?.(this.name, generation);
        throw err;
      }
      // From the generations as they are now: a resync may have begun or ended while the witness was asked.
      const now = this.record.gi;
      const next: GenerationIds = now.bitmap === NO_GI ? { current: generation.to, bitmap: now.current, history: now.history } : { current: generation.to, bitmap: now.bitmap, history: [now.current, now.history[0]] };
      await this.saveRecord({ gi: next, peerOutdated: this.options.fence !== undefined });
      this.log.info({ event: 'new-generation', resource: this.name, gi: this.record.gi, why }, `${why}: new data generation`);
      // The link came up meanwhile but the two are not in sync (a handshake or a resync under way, or one
      // just ended): the peer decided, or is deciding, on the old generation. Connecting again lets it
      // decide on this one.
      if (this.peer && this.peer.phase !== 'closed') this.peer.close('a new data generation started while the link came up: connecting again');
    })().finally(() => {
      this.diverging = undefined;
      this.divergeAbort = undefined;
    });
    return this.diverging;
  }

  /** Connected, the peer's disk good, nothing marked out of sync: the peer has every block this node has. */
  private inSyncWithPeer(): boolean {
    return this.peer?.phase === 'connected' && this.peer.replicating && this.peer.state?.disk === 'UpToDate' && this.bitmap.count === 0;
  }

  /** Writes waiting for quorum (or waiting to learn they may not have it), for `resource status`. */
  setSuspended(on: boolean, why?: string): void {
    if (this.suspended === on) return;
    this.suspended = on;
    if (on) this.log.error({ event: 'io-suspended', resource: this.name, why }, `resource ${this.name}: lost the peer and the witness: writes held until one is back`);
    else this.log.warn({ event: 'io-resumed', resource: this.name }, `resource ${this.name}: writes no longer held`);
    // A Diskless Primary's writes wait here too (its failed disk is being outdated at the witness): it learns why.
    this.peer?.sendState();
    this.emit('changed');
  }

  /**
   * The other side went on without this node (or an admin forces it to
   * step down): every held write fails with EIO now, and so does every new
   * one until the node is Secondary. Its unacknowledged blocks stay marked:
   * they resync from the new Primary later.
   */
  fenceOff(reason: string): void {
    if (this.fencedOff === undefined) {
      this.fencedOff = reason;
      this.log.error({ event: 'fenced-off', resource: this.name, reason }, reason);
      this.emit('changed');
    }
    this.divergeAbort?.abort(new FencedOff(reason));
    // Without a disk, this node's writes wait at the peer (until its failed disk is outdated at the
    // witness): they end with the link, never applied there.
    // (Also before the peer has said so: its first witness call may still be under way.)
    if (this.heldAtPeer || (this.role === 'Primary' && !this.backing_ && this.writesUnderWay > 0 && this.peer)) {
      this.peer!.close(`${reason}: the writes ${this.peer!.peerNode} holds for quorum fail`);
    }
  }

  /**
   * The session's marking: blocks the peer may not have (unacknowledged
   * or unconfirmed writes when the link drops, a write the peer failed).
   * Nobody waits on it: a failure here is the writers' to see.
   */
  markUnreplicated(offset: number, length: number): void {
    const r = this.markDiverged(offset, length);
    if (r instanceof Promise) r.catch(() => undefined);
  }

  /** Writes are held now (waiting for a new generation the witness must allow, here or at the peer). */
  get holding(): boolean {
    return this.diverging !== undefined || this.heldAtPeer;
  }

  /** A Diskless Primary whose peer holds writes until the witness answers: this node's writes among them. */
  private get heldAtPeer(): boolean {
    return this.role === 'Primary' && !this.backing_ && this.peer?.state?.suspended === true;
  }

  /* ---------------------------------------------------------------- roles */

  async promote(force: boolean): Promise<void> {
    if (this.role === 'Primary') return;
    this.mayChangeRole();
    const peer = this.peer?.state;
    if (peer?.role === 'Primary' && !this.options.allowTwoPrimaries) {
      throw new UserError(`resource ${this.name}: ${peer.node} is Primary; make it Secondary first (resource secondary ${this.name} on ${peer.node})`, 1);
    }
    const disk = this.disk;
    const peerGood = this.peerServes();
    if (disk === 'Diskless' && !peerGood) throw this.nothingToServe();
    if (disk !== 'UpToDate' && disk !== 'Diskless') {
      if (peerGood && peer) throw new UserError(`resource ${this.name}: the disk here is ${disk} and ${peer.node} has the good data: let the resync finish, or promote ${peer.node}`, 1);
      if (!force) {
        throw new UserError(`resource ${this.name}: the disk on ${this.node} is ${disk}: it may hold old or partial data; promote with --force only if you know it is the best copy`, 1);
      }
    }
    await this.options.mayPromote?.(this.name, force);
    // The link may have come up (and a resync begun here) while the witness was asked.
    this.mayChangeRole();
    if (this.disk !== disk) throw new UserError(`resource ${this.name}: the disk on ${this.node} became ${this.disk} meanwhile: try again`, 1);
    // Connected: the peer agrees first. It may be promoted at this very moment, or be Primary already over
    // a partition neither side has noticed yet (its writes on their way here). If the link goes first,
    // this node is promoted without the peer (a new generation, fenced).
    const session = this.peer;
    if (session) {
      const answer = await session.askPromotion();
      if (answer.outcome === 'refused') throw new UserError(`resource ${this.name}: ${session.peerNode} refused the promotion: ${answer.reason}`, 1);
      try {
        // The previous Primary's last writes are on this disk before this node's own.
        if (answer.outcome === 'granted') await session.applied();
        await this.promoteAgreed(force, disk);
      } catch (err) {
        session.promotionDone(false);
        throw err;
      }
      session.promotionDone(true);
      return;
    }
    await this.promoteAgreed(force, disk);
  }

  /** Without a disk, a node serves its peer's: only while that peer is connected with good data. */
  private peerServes(): boolean {
    return this.peer?.replicating === true && this.peer.state?.disk === 'UpToDate';
  }

  private nothingToServe(): UserError {
    return new UserError(`resource ${this.name}: no disk here and no UpToDate peer connected: nothing to serve`, 1);
  }

  private async promoteAgreed(force: boolean, disk: DiskState): Promise<void> {
    // Checked again after every wait (the peer's answer, the witness's fence, which may take as long as the
    // witness stays away): the disk it was asked for may have failed, or become a resync's Inconsistent target.
    const still = (expected: DiskState): void => {
      this.mayChangeRole();
      if (this.disk !== expected) throw new UserError(`resource ${this.name}: the disk on ${this.node} became ${this.disk} meanwhile: try again`, 1);
      // (The link may have gone while the peer was asked.)
      if (!this.backing_ && !this.peerServes()) throw this.nothingToServe();
    };
    still(disk);
    const patch: Partial<MetaRecord> = { primary: true, primarySince: this.clock.now() };
    if (disk !== 'UpToDate' && disk !== 'Diskless') {
      // Forced: this disk becomes the good data, in a generation of its own.
      const gi = this.record.gi;
      patch.disk = 'UpToDate';
      patch.fullSyncNeeded = false;
      patch.gi = forcedGeneration(gi, disk, newGi(this.options.randomBytes));
      this.log.warn({ event: 'forced-promotion', resource: this.name, disk }, 'promoted with --force: this disk is now the good data');
    }
    await this.saveRecord(patch);
    // Promoted without the peer: what is written from now on is a generation the peer does not have.
    // A forced promotion has made this disk UpToDate by now.
    const now = patch.disk ?? disk;
    // (A node without a disk starts no generation and fences nobody: its peer holds the only good copy.)
    if (!patch.gi && !this.peer?.replicating && this.backing_) await this.newGeneration('Primary without the peer', () => still(now), force);
    still(now);
    this.role = 'Primary';
    this.fencedOff = undefined;
    this.log.info({ event: 'role', resource: this.name, role: 'Primary' }, 'Primary');
    if (patch.gi && this.peer) {
      // The generations changed under a live link: let the handshake decide again (a full sync to the peer).
      this.peer.close('generation changed by a forced promotion: reconnecting');
    } else this.peer?.sendState();
    this.emit('changed');
  }

  /**
   * A node in a handshake or a resync target takes no role change: the
   * decision was made on its old role. Nor does one whose peer is Primary
   * (a link may have come up while the witness was asked).
   */
  private mayChangeRole(): void {
    if (this.syncStarting > 0) throw new UserError(`resource ${this.name}: a resync is starting on ${this.node} (saving the blocks a split-brain resolution overwrites): try again in a moment`, 1);
    if (this.peer?.handshake) throw new UserError(`resource ${this.name}: connecting to ${this.peer.peerNode} right now: try again in a moment`, 1);
    if (this.peer?.phase === 'sync-target') throw new UserError(`resource ${this.name}: ${this.node} is sync target of ${this.peer.peerNode}: let the resync finish, or promote ${this.peer.peerNode}`, 1);
    const peer = this.peer?.state;
    if (this.role === 'Secondary' && peer?.role === 'Primary' && !this.options.allowTwoPrimaries) {
      throw new UserError(`resource ${this.name}: ${peer.node} is Primary; make it Secondary first (resource secondary ${this.name} on ${peer.node})`, 1);
    }
  }

  /**
   * Become Secondary; the caller has closed everything that used the
   * device. Held writes (no quorum) would keep a plain demotion waiting:
   * `force` fails them with EIO first.
   */
  async demote(force = false): Promise<void> {
    if (this.role === 'Secondary') return;
    if (force) this.fenceOff(`resource ${this.name}: made Secondary by force: held writes fail`);
    await this.flush().catch(() => undefined);
    // Stays fenced off (writes still in flight fail) until it has the new Primary's data or is promoted.
    this.role = 'Secondary';
    await this.al.clear().catch((err: unknown) => this.detach(err));
    await this.writeBitmap();
    await this.saveRecord({ primary: false });
    this.log.info({ event: 'role', resource: this.name, role: 'Secondary' }, 'Secondary');
    this.peer?.sendState();
    this.emit('changed');
  }

  /* ------------------------------------------------------------ disk loss */

  /** The local disk failed: go Diskless and carry on through the peer. */
  detach(err: unknown): void {
    if (!this.backing_) return;
    const dev = this.backing_;
    this.backing_ = undefined;
    this.al.detach((err as Error)?.message ?? String(err));
    this.log.error({ event: 'disk-detached', resource: this.name, device: dev.name, err: (err as Error)?.message }, `resource ${this.name}: I/O error on ${dev.name}: disk detached, going on Diskless through the peer`);
    // Say so on the disk itself if it still takes a write: when it is attached again it is not
    // trusted until a full sync. If it does not, the peer remembers that this disk failed.
    this.record = { ...this.record, disk: 'Failed', fullSyncNeeded: true };
    const failed = { ...this.record, seq: this.recordSeq };
    void this.metaChain
      .then(() => writeRecord(dev, this.layout, failed))
      .then(
        () => this.log.warn({ event: 'disk-failed-recorded', resource: this.name, device: dev.name }, `resource ${this.name}: ${dev.name} marked Failed in its metadata`),
        (e: unknown) => this.log.warn({ event: 'disk-failed-unrecorded', resource: this.name, device: dev.name, err: (e as Error)?.message }, `resource ${this.name}: could not mark ${dev.name} Failed in its metadata (${(e as Error)?.message}): the peer remembers that it failed`),
      )
      .finally(() => Promise.resolve(dev.close()).catch(() => undefined));
    this.peer?.abortResync(`${this.node}'s disk failed`);
    this.peer?.sendState();
    this.emit('changed');
  }

  /**
   * The peer's disk failed or went away while this node keeps the data: the
   * record says the peer's disk gets a full sync (it may lack writes applied
   * here, in flight when it failed), and a new generation starts here (so
   * the old disk, if it comes back, is behind). Durable before any write
   * from a Diskless Primary is applied here.
   *
   * With a witness, the generation starts only once the failed disk is
   * outdated there: its own record may still say UpToDate (a failed disk
   * seldom takes that last write), and if it comes back so, only the
   * witness stops a promotion on it. So, as a Primary's first write without
   * its peer, the Diskless peer's writes wait for the witness (on-no-quorum:
   * suspend) or fail (error): DRBD 9 suspends I/O when a copy of the data is
   * lost without quorum (drbd_state.c, lost_contact_to_peer_data).
   * `linkDown` ends the wait: the writes waiting then were never applied
   * here, and no generation starts (a failed disk promoted meanwhile would
   * otherwise meet it as a split brain).
   */
  async peerLostDisk(peerNode: string, peerGis: GenerationIds, linkDown: AbortSignal): Promise<void> {
    const peerGi = peerGis.current;
    const peerFrom = [peerGis.bitmap, ...peerGis.history].filter((g) => g !== NO_GI);
    const fence = this.options.fence;
    // Not the data's keeper (a Diskless Primary writes only to an UpToDate disk: DRBD's may_do_writes), or
    // it has recorded the loss already.
    if (!this.backing_ || this.record.disk !== 'UpToDate') return;
    if (this.record.peerDiskFailed && (fence === undefined || this.record.peerOutdated)) return;
    const generation = { from: this.record.gi.current, to: newGi(this.options.randomBytes) };
    if (!this.record.peerDiskFailed) {
      this.log.warn({ event: 'peer-disk-lost', resource: this.name, peer: peerNode }, `resource ${this.name}: ${peerNode} lost its disk: it gets a full sync when it has one again`);
      // With the generation that disk claims (its Diskless node's): back claiming it, it is that failed disk.
      if (!fence) return this.saveRecord({ gi: nextGeneration(this.record.gi, generation.to), peerDiskFailed: true, peerDiskFailedGi: peerGi, peerDiskFailedFrom: peerFrom });
      await this.saveRecord({ peerDiskFailed: true, peerDiskFailedGi: peerGi, peerDiskFailedFrom: peerFrom, peerOutdated: false });
    }
    try {
      // 'peer-back' only for a peer that replicates again (it has a disk): nothing diverged then.
      if ((await fence!(this.name, generation, linkDown)) === 'peer-back') {
        void this.options.unfence?.(this.name, generation);
        return;
      }
    } catch (err) {
      // This node never starts that generation now; an outdate that timed out here may have reached the witness.
      void this.options.unfence?.(this.name, generation);
      const why = (err as Error)?.message;
      this.log.warn({ event: 'witness-outdate-failed', resource: this.name, peer: peerNode, err: why }, `resource ${this.name}: could not outdate ${peerNode}'s failed disk at the witness (${why}): its writes are refused`);
      // Not a BlockDeviceError: the writes waiting on this fail, the disk here did not.
      throw new UserError(`resource ${this.name}: ${peerNode}'s failed disk is not outdated at the witness (${why}): write refused`);
    }
    // From the generations as they are now: a resync may have ended while the witness was asked.
    await this.saveRecord({ gi: nextGeneration(this.record.gi, generation.to), peerOutdated: true });
  }

  /* ---------------------------------------------------------- connecting */

  /** What this side tells the peer when a link comes up, and whenever it changes. */
  peerState(sendingBitmap = false): PeerState {
    return {
      node: this.node,
      role: this.role,
      disk: this.disk,
      gi: this.record.gi,
      dataBytes: this.size,
      outOfSyncBytes: this.bitmap.outOfSyncBytes,
      primarySince: this.record.primarySince,
      sendingBitmap,
      crashedPrimary: this.crashedPrimary,
      keep: this.keepNode,
      fullSyncNeeded: this.record.fullSyncNeeded,
      peerDiskFailed: this.record.peerDiskFailed,
      ...(this.record.peerDiskFailed ? { peerDiskFailedGi: this.record.peerDiskFailedGi, peerDiskFailedFrom: this.record.peerDiskFailedFrom } : {}),
      inUse: this.holders > 0,
      // Only while it is so: the state is what it was for a peer that does not know the field.
      ...(this.suspended ? { suspended: true } : {}),
    };
  }

  connectPolicy(): ConnectPolicy {
    return { resource: this.name, allowTwoPrimaries: this.options.allowTwoPrimaries === true, afterSplitBrain: this.options.afterSplitBrain ?? 'disconnect' };
  }

  /** The data lent to a user (a pool): while it is out, no resync may change it. Closing it gives it back. */
  borrow(): BorrowedDevice {
    this.holders++;
    let returned = false;
    const give = (): void => {
      if (returned) return;
      returned = true;
      this.holders--;
      this.peer?.sendState();
    };
    const lent = new (class extends BorrowedDevice {
      override close(): void | Promise<void> {
        give();
        return super.close();
      }
    })(this);
    this.peer?.sendState();
    return lent;
  }

  /** A connection was refused (by the decision on connect): say why once, and stay StandAlone unless it may clear by itself. */
  connectionRefused(peerNode: string, reason: string, retry: boolean, rule = ''): void {
    // Writes held for quorum, and the peer turns out to be Primary or to have gone on: they may never complete.
    if (this.holding && this.role === 'Primary' && /^(both-primary|primary-target)$|split-brain/.test(rule)) {
      this.fenceOff(`resource ${this.name}: ${peerNode} went on without ${this.node} (${reason}): writes here fail; make it Secondary (resource secondary ${this.name} --force)`);
    }
    if (this.lastRefusal !== reason) {
      this.log.error({ event: 'connect-refused', resource: this.name, peer: peerNode, reason, retry }, `resource ${this.name}: not connecting to ${peerNode}: ${reason}`);
    }
    this.lastRefusal = reason;
    if (!retry) this.standAlone = true;
    this.emit('changed');
  }

  splitBrainFound(peerNode: string, found: SplitBrainFound): void {
    const policy = this.options.afterSplitBrain ?? 'disconnect';
    this.splitBrain = { detectedAt: new Date(this.clock.now()).toISOString(), policy, localChangedBytes: found.localChangedBytes, peerChangedBytes: found.peerChangedBytes, resolution: null, savedTo: null };
    this.log.error(
      { event: 'split-brain', resource: this.name, peer: peerNode, policy, common: found.common, localChangedBytes: found.localChangedBytes, peerChangedBytes: found.peerChangedBytes, resolution: found.resolution },
      `resource ${this.name}: split brain with ${peerNode} (${found.localChangedBytes} bytes changed here, ${found.peerChangedBytes} there)${found.resolution ? `: ${found.resolution}` : ''}`,
    );
  }

  /** Connected without a resync. An Outdated disk facing an UpToDate peer of the same generation is good again. */
  async connectedTo(peer: PeerState): Promise<boolean> {
    this.lastRefusal = undefined;
    // In sync with the peer: it is no longer outdated by this node (the next divergence fences it again).
    if (this.record.peerOutdated && this.record.gi.current === peer.gi.current) void this.saveRecord({ peerOutdated: false });
    if (this.role === 'Secondary' && this.record.gi.current === peer.gi.current) this.fencedOff = undefined;
    if (this.record.disk === 'Outdated' && peer.disk === 'UpToDate' && this.record.gi.current === peer.gi.current) {
      await this.saveRecord({ disk: 'UpToDate' });
      return true;
    }
    return false;
  }

  /**
   * A resync begins: both sides' marks (and every block for a full sync)
   * are out of sync, and both record the sync generation (computed from
   * the source's and the target's current generation as they met): the
   * source as its bitmap generation, the target as its current one, with
   * its data Inconsistent. The target's marks are on its disk first, so
   * an interrupted resync resumes from them; after a split brain it first
   * keeps what it will lose. Nothing moves before this resolves.
   */
  async beginSync(peerNode: string, direction: 'source' | 'target', full: boolean, peerMarks: Bitmap | undefined, splitBrain: SplitBrainFound | undefined, sync: string, stillTarget: () => boolean = () => true): Promise<void> {
    this.lastRefusal = undefined;
    if (splitBrain) this.keepNode = undefined;
    if (peerMarks) this.bitmap.merge(peerMarks);
    // A split brain's loser keeps what it changed since the split: its marks, when its bitmap reaches back
    // that far (a full sync to a failed disk, rule 90), else every block (rule 100).
    let own: Bitmap | undefined;
    if (full && direction === 'target' && splitBrain !== undefined && splitBrain.common !== NO_GI && this.record.gi.bitmap === splitBrain.common) {
      own = new Bitmap(this.bitmap.dataBytes);
      own.merge(this.bitmap);
    }
    if (full) this.bitmap.markAll();
    if (direction === 'source') {
      // The sync generation first, as the target records it: whatever happens next (a failing flush
      // detaches this disk), the two records agree on which resync this was.
      const gi = this.record.gi;
      if (gi.bitmap !== sync) await this.saveRecord({ gi: { current: gi.current, bitmap: sync, history: gi.bitmap !== NO_GI ? [gi.bitmap, gi.history[0]] : gi.history } });
      // What this disk sends must be what it keeps: writes it took as Secondary may still be in its cache,
      // and no bitmap here covers them (its activity log holds only its own writes as Primary). Sent
      // unflushed, a power cut here would leave the target with data the source lost, both bitmaps clear.
      const dev = this.backing_;
      if (dev) {
        try {
          await dev.flush();
        } catch (err) {
          this.detach(err);
          throw err;
        }
      }
      return;
    }
    // The blocks a split-brain resolution overwrites are kept first: if they cannot be (a read error, a
    // full file system), nothing here has changed and the resolution is refused. (The session is in
    // sync-target already, so no promotion slips in meanwhile.)
    if (splitBrain) {
      // No role change while the blocks are saved, even if the link drops meanwhile (it would be promoted
      // on data the resync was about to overwrite, and be made Inconsistent under its users).
      this.syncStarting++;
      try {
        // A failed disk's unreadable sectors must not keep it from ever getting its full sync.
        await saveBlocks(this, peerNode, own, splitBrain.failedDisk === this.node);
      } catch (err) {
        if (err instanceof BlockDeviceError) this.detach(err);
        throw new UserError(`resource ${this.name}: could not save the blocks the resync from ${peerNode} overwrites (${(err as Error).message}): split-brain resolution refused`);
      } finally {
        this.syncStarting--;
      }
      // The link went down while they were saved: nothing here has changed; the next connect decides again.
      if (!stillTarget()) throw new UserError(`resource ${this.name}: the link to ${peerNode} went down before the resync began: nothing changed`);
    }
    const gi = this.record.gi;
    // Inconsistent from this moment on (in memory at once, before the bitmap is written).
    await this.saveRecord({ disk: 'Inconsistent' });
    await this.writeBitmap();
    const next: GenerationIds = gi.current === sync ? gi : { current: sync, bitmap: NO_GI, history: [gi.current, gi.history[0]] };
    // The bitmap holds every block now: a full sync that breaks off resumes instead of starting over.
    await this.saveRecord({ gi: next, disk: 'Inconsistent', fullSyncNeeded: false });
  }

  /**
   * The source finished: its bitmap generation is history now. Durable
   * before the target hears of it, so a crash in between cannot leave the
   * target newer than the source's record says.
   */
  async finishSyncSource(): Promise<GenerationIds> {
    const gi = this.record.gi;
    const next: GenerationIds = gi.bitmap === NO_GI ? gi : { current: gi.current, bitmap: NO_GI, history: [gi.bitmap, gi.history[0]] };
    this.crashedPrimary = false;
    if (this.splitBrain && !this.splitBrain.resolution) this.splitBrain.resolution = `kept ${this.node}'s data`;
    await this.saveRecord({ gi: next, peerOutdated: false, peerDiskFailed: false, peerDiskFailedGi: NO_GI, peerDiskFailedFrom: [] });
    await this.writeBitmap();
    return next;
  }

  /** The target has every block: the data (flushed first, with the bitmap) is the source's generation, UpToDate. */
  async finishSyncTarget(peerNode: string, gi: GenerationIds): Promise<void> {
    await this.writeBitmap();
    // This node holds the source's data now: what it remembered of the peer's failed disk is moot (the
    // source's disk is good), and a stale mark would make that disk a full-sync target again.
    await this.saveRecord({ gi, disk: 'UpToDate', fullSyncNeeded: false, peerOutdated: false, peerDiskFailed: false, peerDiskFailedGi: NO_GI, peerDiskFailedFrom: [] });
    this.crashedPrimary = false;
    this.fencedOff = undefined;
    if (this.splitBrain && !this.splitBrain.resolution) this.splitBrain.resolution = `kept ${peerNode}'s data`;
  }

  /** The Primary goes on without this Secondary (an admin disconnect there): this copy is Outdated from now on. */
  async outdatedBy(peerNode: string): Promise<void> {
    if (this.role !== 'Secondary' || this.record.disk !== 'UpToDate') return;
    this.log.warn({ event: 'outdated', resource: this.name, by: peerNode }, `${peerNode} goes on without this node: disk Outdated`);
    await this.saveRecord({ disk: 'Outdated' });
    this.emit('changed');
  }

  /* -------------------------------------------------------------- status */

  status(): ResourceStatus {
    return {
      name: this.name,
      role: this.role,
      disk: this.disk,
      protocol: this.options.protocol,
      dataBytes: this.size,
      outOfSyncBytes: this.bitmap.outOfSyncBytes,
      generation: this.record.gi,
      suspended: this.suspended,
      fencedOff: this.fencedOff ?? null,
      splitBrain: this.splitBrain,
      conflictingWrites: this.conflictingWrites,
      peers: this.peer ? [this.peer.status()] : [],
    };
  }

  /* --------------------------------------------------------- data path */

  private checkIo(offset: number, length: number, writing: boolean): void {
    if (this.closed) throw new BlockDeviceError('ESHUTDOWN', `resource ${this.name} is closed`);
    if (this.role !== 'Primary') throw this.notPrimary();
    checkRange(this, offset, length);
    // While suspended, writes are held (in markDiverged); once fenced off they fail.
    if (writing && this.fencedOff !== undefined) throw new FencedOff(this.fencedOff);
  }

  read(offset: number, into: Buffer): void | Promise<void> {
    this.checkIo(offset, into.length, false);
    const local = this.backing_;
    if (local && this.record.disk === 'UpToDate') {
      try {
        const r = local.read(offset, into);
        if (r instanceof Promise) return r.catch((err: unknown) => this.readFromPeer(offset, into, err));
        return;
      } catch (err) {
        return this.readFromPeer(offset, into, err);
      }
    }
    return this.readFromPeer(offset, into, undefined);
  }

  private async readFromPeer(offset: number, into: Buffer, localErr: unknown): Promise<void> {
    if (localErr !== undefined) this.detach(localErr);
    const peer = this.peer;
    if (!peer || !peer.replicating || peer.state?.disk !== 'UpToDate') {
      throw new BlockDeviceError('EIO', `resource ${this.name}: no good copy of the data is reachable (local disk ${this.disk}, peer ${peer ? 'not UpToDate' : 'not connected'})`);
    }
    await peer.read(offset, into);
  }

  write(offset: number, data: Buffer, options?: WriteOptions): void | Promise<void> {
    this.checkIo(offset, data.length, true);
    return this.replicate(offset, data.length, 0, data, options?.fua === true);
  }

  trim(offset: number, length: number, options?: WriteOptions): void | Promise<void> {
    this.checkIo(offset, length, true);
    if (length === 0) return;
    return this.replicate(offset, length, 2, undefined, options?.fua === true);
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): void | Promise<void> {
    this.checkIo(offset, length, true);
    if (length === 0) return;
    if (options?.fastOnly && !this.capabilities.fastZero) throw new BlockDeviceError('ENOTSUP', `${this.name}: fast zeroing is not supported`);
    return this.replicate(offset, length, options?.noHole ? 1 : 2, undefined, options?.fua === true);
  }

  /**
   * kind 0 = data, 1 = zeroes kept allocated, 2 = zeroes that may punch a
   * hole (also how trim is done, so replicas read the same).
   */
  private replicate(offset: number, length: number, kind: 0 | 1 | 2, data: Buffer | undefined, fua: boolean): void | Promise<void> {
    this.lastAppWriteAt = this.clock.now();
    // The peer is deciding from this node's data as it was when the link came up: hold writes until it has.
    const handshake = this.peer?.handshake;
    if (handshake) return handshake.then(() => this.replicate(offset, length, kind, data, fua));
    // Checked again here: a write that waited for a handshake may find the node made Secondary meanwhile.
    if (this.role !== 'Primary') return Promise.reject(this.notPrimary());
    // Without a disk here the peer's is the only copy: only an UpToDate one may take writes (DRBD's
    // may_do_writes). An Inconsistent sync target would acknowledge data nobody holds a good copy of.
    if (!this.backing_ && this.peer?.state?.disk !== 'UpToDate') return Promise.reject(this.noGoodCopy());
    this.writesUnderWay++;
    const local = this.backing_;
    const hot = local ? this.al.begin(offset, length) : undefined;
    // A write waiting for quorum waits outside the write order: the resync that would release it
    // (the peer came back) reads the same blocks under that order.
    const go = (): void | Promise<void> => {
      // Checked again here: the disk may have failed meanwhile (its activity-log page could not be written),
      // and the peer may be a sync target: the write would land on no good copy (and unmarked on the peer).
      if (!this.backing_ && this.peer?.state?.disk !== 'UpToDate') throw this.noGoodCopy();
      // And the role: a Secondary sends no write to its peer (which may be Primary by now).
      if (this.role !== 'Primary') throw this.notPrimary();
      let hold: void | Promise<void> = undefined;
      const landed = this.appWrites.run(offset, length, () => {
        const remote = this.peer?.replicating ? this.peer.sendWrite(offset, length, kind, data, fua) : undefined;
        let localDone: void | Promise<void> = undefined;
        if (local && this.backing_ === local) {
          try {
            localDone = kind === 0 ? local.write(offset, data!, { fua }) : local.writeZeroes(offset, length, { fua, noHole: kind === 1 });
          } catch (err) {
            localDone = Promise.reject(err);
          }
        }
        if (!remote && localDone === undefined && local && this.backing_ === local) {
          // Local only, synchronous: the common case without a peer.
          hold = this.markDiverged(offset, length);
          return;
        }
        return this.finishWrite(offset, length, localDone, remote, fua, local !== undefined && this.backing_ === local).then((h) => {
          hold = h.hold;
        });
      });
      if (landed instanceof Promise) return landed.then(() => hold);
      return hold;
    };
    const finish = (): void => {
      if (local) this.al.end(offset, length);
      if (--this.writesUnderWay === 0) for (const w of this.writesSettledWaiters.splice(0)) w();
    };
    if (hot instanceof Promise) {
      // The activity log's page could not be written: the disk failed; go on through the peer.
      const detached = (err: unknown): void | Promise<void> => {
        this.detach(err);
        return go();
      };
      return hot.then(go, detached).then(finish, (err: unknown) => {
        finish();
        throw err;
      });
    }
    try {
      const r = go();
      if (r instanceof Promise) {
        return r.then(finish, (err: unknown) => {
          finish();
          throw err;
        });
      }
      finish();
    } catch (err) {
      finish();
      throw err;
    }
  }

  /** Resolves once no application write is under way (a handshake holds new ones meanwhile). */
  writesSettled(): Promise<void> {
    if (this.writesUnderWay === 0) return Promise.resolve();
    return new Promise((resolve) => this.writesSettledWaiters.push(resolve));
  }

  /** Waits until the write is where the protocol says; returns what must complete before it is acknowledged. */
  private async finishWrite(
    offset: number,
    length: number,
    localDone: void | Promise<void>,
    remote: ReturnType<PeerSession['sendWrite']> | undefined,
    fua: boolean,
    hasLocal: boolean,
  ): Promise<{ hold?: void | Promise<void> }> {
    let localOk = hasLocal;
    if (hasLocal) {
      try {
        await localDone;
      } catch (err) {
        localOk = false;
        this.detach(err);
      }
    }
    if (!remote) {
      if (!localOk) throw new BlockDeviceError('EIO', `resource ${this.name}: the local disk failed and the peer is not connected`);
      return { hold: this.markDiverged(offset, length) };
    }
    // Without a good local copy, or for FUA, the peer's disk must have it whatever the protocol.
    const protocol = !localOk || fua ? 'C' : this.options.protocol;
    const ok = await (protocol === 'C' ? remote.done : protocol === 'B' ? remote.received : remote.sent);
    if (!ok) {
      if (!localOk) throw new BlockDeviceError('EIO', `resource ${this.name}: the write reached neither the local disk nor the peer`);
      // The local disk failed since it took the write: no good copy holds it (and no generation starts here).
      if (!this.backing_) throw new BlockDeviceError('EIO', `resource ${this.name}: the write reached neither the peer nor a disk that is still good`);
      // The link went down: the session marked the block; wait for the new generation before acknowledging.
      return { hold: this.diverging };
    }
    // The local disk failed under this write and the peer's is not good data either.
    if (!localOk && this.peer?.state?.disk !== 'UpToDate') throw this.noGoodCopy();
    return {};
  }

  private notPrimary(): BlockDeviceError {
    return new BlockDeviceError('EPERM', `resource ${this.name} is Secondary on ${this.node}: promote it first`);
  }

  private noGoodCopy(): BlockDeviceError {
    return new BlockDeviceError('EIO', `resource ${this.name}: no good copy of the data is reachable (local disk ${this.disk}, peer ${this.peer?.state ? this.peer.state.disk : 'not connected'}): write refused`);
  }

  async flush(): Promise<void> {
    if (this.closed) throw new BlockDeviceError('ESHUTDOWN', `resource ${this.name} is closed`);
    // Fenced off, a flush fails as writes do: the other side went on, and what was acknowledged here
    // meanwhile (protocol A acknowledges on send) is about to be overwritten by its resync: no promise of
    // durability for it.
    if (this.fencedOff !== undefined) throw new FencedOff(this.fencedOff);
    const local = this.backing_;
    const remote = this.peer?.replicating ? this.peer.sendFlush() : undefined;
    let localOk = false;
    if (local) {
      try {
        await local.flush();
        localOk = true;
      } catch (err) {
        this.detach(err);
      }
    }
    const remoteOk = remote ? await remote : false;
    if (!localOk && !remoteOk) throw new BlockDeviceError('EIO', `resource ${this.name}: the flush reached no disk`);
    await this.diverging;
    // A bitmap write-back under way ends first: a flush leaves the marks as durable as the data.
    await this.bitmapChain;
    if (this.fencedOff !== undefined) throw new FencedOff(this.fencedOff);
  }

  blockStatus(offset: number, length: number): Extent[] | Promise<Extent[]> {
    this.checkIo(offset, Math.min(length, this.size - offset), false);
    const local = this.backing_;
    if (!local || this.record.disk !== 'UpToDate' || !local.capabilities.extents) return [{ offset, length: Math.min(length, this.size - offset), flags: 0 }];
    return Promise.resolve(local.blockStatus(offset, Math.min(length, this.size - offset))).then((extents) => clip(extents, offset, this.size));
  }

  cache(): void {
    /* advisory */
  }

  /** Flush, write the bitmap and metadata, close the disk. Leaves the role record: a Primary that closes cleanly is not "crashed". */
  async close(): Promise<void> {
    if (this.closed) return;
    this.peer?.close('resource closed');
    if (this.role === 'Primary') await this.demote().catch(() => undefined);
    this.closed = true;
    await this.metaChain;
    if (this.backing_) {
      await this.writeBitmap();
      const dev = this.backing_;
      this.backing_ = undefined;
      await dev.close();
    }
  }
}

/** A new current generation `to`: the bitmap generation stays if there is one, else it is the old current (DRBD's new current UUID). */
function nextGeneration(gi: GenerationIds, to: string): GenerationIds {
  return gi.bitmap === NO_GI ? { current: to, bitmap: gi.current, history: gi.history } : { current: to, bitmap: gi.bitmap, history: [gi.current, gi.history[0]] };
}

function clip(extents: Extent[], offset: number, end: number): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    if (e.offset >= end) break;
    out.push({ ...e, length: Math.min(e.length, end - e.offset) });
  }
  return out.length > 0 ? out : [{ offset, length: Math.min(4096, end - offset), flags: 0 }];
}
