/**
 * The commit pump: the one writer of a pool's metadata. Journal records,
 * checkpoints and superblocks are written in its steps only, one step at a
 * time. Everything else (a flush, an admin operation, extend, a full
 * journal, close) hands its change to the pump and waits for the step that
 * makes it durable. So a checkpoint never resets the journal under a
 * record being written, and superblock sequence numbers only grow.
 *
 * Crash safety rests on three rules, the same ones dm-thin follows:
 *  1. Metadata never points at data that is not durable: a new mapping is
 *     recorded only after its data write completed, and every step flushes
 *     the data devices before it writes metadata.
 *  2. A chunk the committed metadata still refers to is never reused: a
 *     dropped reference (trim, copy-on-write, remove) takes effect only
 *     after the step that records the drop.
 *  3. Superblocks are switched last, alternating between two slots, so a
 *     crash leaves the old or the new checkpoint readable.
 */
import type { Logger } from '../util/log.js';
import type { ChunkAllocator } from './allocator.js';
import type { ChunkSpace } from './chunk-space.js';
import { serializeCheckpointInSlices } from './checkpoint.js';
import { bytesOf, piecesFor, writeChain } from './checkpoint-chain.js';
import { type CheckpointCopy, type JournalOp, type Superblock, encodeJournalRecord, encodeOps } from './format.js';
import { appendRecord } from './journal.js';
import type { Gate } from './quiesce.js';
import { writeSuperblocks } from './superblock.js';
import type { VolumeTable } from './volume-table.js';

/** A change of what the pool is made of (a device joining), made in a pump step and durable with its checkpoint. */
export interface MetadataChange {
  /** Runs in the step, with no data write in flight; none starts until the step is durable or undone. */
  apply(): void;
  /** The step failed: take the change back. */
  undo(): void;
}

/** What the pump works on; the pool owns it. */
export interface PumpContext {
  readonly name: string;
  readonly log: Logger;
  readonly journalBytes: number;
  readonly space: ChunkSpace;
  readonly alloc: ChunkAllocator;
  readonly gate: Gate;
  readonly table: VolumeTable;
  /** A metadata write failed: the pool refuses writes from now on. */
  fail(err: unknown): void;
}

/** The metadata on disk, as the pump finds it and keeps it. */
export interface Committed {
  superblock: Superblock;
  checkpointChunks: number[];
  journalBytesUsed: number;
  journalRecords: number;
}

interface Request {
  checkpoint: boolean;
  change?: MetadataChange;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class CommitPump {
  /** Completed changes not yet committed, and references to drop once they are. */
  private ops: JournalOp[] = [];
  private decrefs: number[] = [];
  private queue: Request[] = [];
  private running = false;
  private idleWaiters: (() => void)[] = [];

  private sb: Superblock;
  private checkpointChunks: number[];
  /** Chunks of a checkpoint some device may point at after a failed switch: kept until a later one replaces it. */
  private staleMeta: number[] = [];
  private journalAt: number;
  private journalSeq: number;
  /** Highest superblock sequence number and generation ever sent to a device (a failed switch may have reached some). */
  private issued: { seq: number; gen: number };
  /** A switch failed: a device may already expect journal records of a newer generation, so the next step is a checkpoint. */
  private mustCheckpoint = false;

  constructor(
    private readonly ctx: PumpContext,
    committed: Committed,
  ) {
    this.sb = committed.superblock;
    this.checkpointChunks = committed.checkpointChunks;
    this.journalAt = committed.journalBytesUsed;
    this.journalSeq = committed.journalRecords;
    this.issued = { seq: this.sb.seq, gen: this.sb.gen };
  }

  /* ----------------------------------------------- what the next step commits */

  record(op: JournalOp): void {
    this.ops.push(op);
  }

  /** Drop a reference after the next step: the committed metadata may still point here. */
  decref(p: number): void {
    this.decrefs.push(p);
  }

  /** References dropped but not yet committed (check adds them back). */
  pendingDecrefs(): readonly number[] {
    return this.decrefs;
  }

  /** Some change is not committed yet (queued, or its step still running). */
  hasUncommitted(): boolean {
    return this.ops.length > 0 || this.running;
  }

  /** Changes wait and no step runs or is asked for (the periodic commit's cue). */
  waiting(): boolean {
    return this.ops.length > 0 && !this.running && this.queue.length === 0;
  }

  /* ------------------------------------------------------------- requests */

  /** Make every change completed before this call durable. Concurrent callers share steps: one that starts after the call covers it. */
  commit(): Promise<void> {
    return this.request(false);
  }

  /** The same as a checkpoint (the journal starts over), with `change` made in the step first. */
  checkpoint(change?: MetadataChange): Promise<void> {
    return this.request(true, change);
  }

  /** Resolves once no step runs and none is asked for. */
  idle(): Promise<void> {
    if (!this.running && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** The committed metadata (for check and tests). */
  committed(): Committed {
    return { superblock: this.sb, checkpointChunks: [...this.checkpointChunks], journalBytesUsed: this.journalAt, journalRecords: this.journalSeq };
  }

  private request(checkpoint: boolean, change?: MetadataChange): Promise<void> {
    const done = new Promise<void>((resolve, reject) => this.queue.push({ checkpoint, change, resolve, reject }));
    void this.run();
    return done;
  }

  /* ---------------------------------------------------------------- steps */

  private async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0);
        let error: unknown;
        try {
          await this.step(batch);
        } catch (err) {
          error = err;
        }
        for (const r of batch) (error === undefined ? r.resolve() : r.reject(error));
      }
    } finally {
      this.running = false;
      for (const w of this.idleWaiters.splice(0)) w();
    }
  }

  private async step(batch: Request[]): Promise<void> {
    const changes = batch.flatMap((r) => (r.change ? [r.change] : []));
    if (changes.length > 0) {
      // No data write may allocate in what a failed step would take back: the gate stays closed until it is durable.
      await this.ctx.gate.quiesced(() => this.writeCheckpoint(changes));
      return;
    }
    if (this.mustCheckpoint || batch.some((r) => r.checkpoint)) return this.writeCheckpoint([]);
    if (!(await this.writeJournal())) await this.writeCheckpoint([]);
  }

  /** One journal record of the changes completed so far; false when it does not fit (a checkpoint must cover them). */
  private async writeJournal(): Promise<boolean> {
    const { space, alloc } = this.ctx;
    const { ops, decrefs } = this.take();
    try {
      // Rule 1: data first, then the metadata that points at it.
      await space.flushDevices();
      if (ops.length > 0) {
        const record = encodeJournalRecord(this.sb.gen, this.journalSeq + 1, encodeOps(ops));
        if (this.journalAt + record.length > this.ctx.journalBytes) {
          this.putBack(ops, decrefs);
          return false;
        }
        await appendRecord(space.devices, this.journalAt, record);
        await space.flushDevices();
        this.journalAt += record.length;
        this.journalSeq++;
      }
    } catch (err) {
      this.putBack(ops, decrefs);
      this.ctx.fail(err);
      throw err;
    }
    alloc.release(decrefs);
    return true;
  }

  /**
   * Serialize the whole metadata into fresh chunks (two copies), then switch
   * every device's superblock to it; the journal starts over. The state is
   * taken with no data write in flight, so it maps only completed writes;
   * it is encoded a slice at a time (a big map takes seconds) with the pool
   * quiesced and alone: no data write and no other quiesced section (an
   * admin operation) changes it meanwhile.
   */
  private async writeCheckpoint(changes: MetadataChange[]): Promise<void> {
    const { space, alloc, gate, table } = this.ctx;
    const taken = await gate.quiesced(async () => {
      applyAll(changes);
      const ops = this.take();
      return { ...ops, stream: await gate.alone(() => serializeCheckpointInSlices(table.state())) };
    });
    // Never one sequence number or generation twice on a disk, even after a failed switch.
    const gen = Math.max(this.sb.gen, this.issued.gen) + 1;
    const seq = Math.max(this.sb.seq, this.issued.seq) + 1;
    const streamBytes = bytesOf(taken.stream);
    const pieces = piecesFor(streamBytes, space.chunkSize);
    const chains: number[][] = [];
    let switching = false;
    try {
      const devices = space.devices;
      chains.push(alloc.allocMeta(pieces, 0));
      // The second copy prefers another device than the first.
      chains.push(alloc.allocMeta(pieces, devices.length > 1 ? devices[devices.length - 1].firstChunk : 0));
      await space.flushDevices();
      const copies: CheckpointCopy[] = [];
      for (const chain of chains) copies.push(await writeChain(space, chain, gen, taken.stream));
      await space.flushDevices();
      const sb: Superblock = { ...this.sb, devices: devices.map((d) => d.entry), gen, seq, checkpoint: copies };
      switching = true;
      this.issued = { seq, gen };
      await writeSuperblocks(devices, sb, this.sb);
      this.sb = sb;
    } catch (err) {
      undoAll(changes);
      const written = chains.flat();
      if (switching) {
        // Some device may point at the new checkpoint already: keep it until a later one replaces it.
        this.staleMeta.push(...written.filter((p) => alloc.isMeta(p)));
        this.mustCheckpoint = true;
      } else {
        alloc.freeMeta(written);
      }
      this.putBack(taken.ops, taken.decrefs);
      this.ctx.fail(err);
      throw err;
    }
    // Rule 3 done: the old checkpoint is garbage now.
    alloc.freeMeta([...this.checkpointChunks, ...this.staleMeta]);
    this.staleMeta = [];
    this.checkpointChunks = chains.flat();
    this.journalAt = 0;
    this.journalSeq = 0;
    this.mustCheckpoint = false;
    alloc.release(taken.decrefs);
    this.ctx.log.debug({ event: 'checkpoint', pool: this.ctx.name, gen, seq, bytes: streamBytes }, 'metadata checkpoint written');
  }

  private take(): { ops: JournalOp[]; decrefs: number[] } {
    const taken = { ops: this.ops, decrefs: this.decrefs };
    this.ops = [];
    this.decrefs = [];
    return taken;
  }

  /** A step failed: what it took is still to be committed, before anything queued since. */
  private putBack(ops: JournalOp[], decrefs: number[]): void {
    this.ops = ops.concat(this.ops);
    this.decrefs = decrefs.concat(this.decrefs);
  }
}

function applyAll(changes: MetadataChange[]): void {
  for (const [i, c] of changes.entries()) {
    try {
      c.apply();
    } catch (err) {
      undoAll(changes.slice(0, i));
      throw err;
    }
  }
}

function undoAll(changes: MetadataChange[]): void {
  for (const c of [...changes].reverse()) c.undo();
}
