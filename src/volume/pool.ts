/**
 * A pool: thin volumes over one or more devices, with its metadata on the
 * devices themselves (see format.ts and docs/volume-format.md).
 *
 * The parts: the chunk address space over the devices (chunk-space.ts),
 * who owns each chunk (allocator.ts), the volumes and the admin actions on
 * them (volume-table.ts), the gate that quiesces the data path
 * (quiesce.ts), and the commit pump (commit-pump.ts), the one writer of
 * metadata, whose rules make a crash at any point leave the old or the new
 * state. Opening reads it all back (pool-open.ts).
 */
import { randomInt, randomUUID } from 'node:crypto';
import type { BlockDevice, MaybePromise } from '../blockdev/types.js';
import { BlockDeviceError } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import { silentLogger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { ChunkAllocator } from './allocator.js';
import { ChunkSpace, type PoolDevice, placeDevices } from './chunk-space.js';
import { type Committed, CommitPump, type MetadataChange } from './commit-pump.js';
import { checkNewDevice, joinChange, newDeviceEntry } from './device-join.js';
import { type AdminAction, JOURNAL_OFFSET, type Superblock } from './format.js';
import { DEFAULT_CHUNK, MAX_POOL_CHUNKS, checkChunkSize, journalBytesFor } from './layout.js';
import { loadMetadata, locatePool } from './pool-open.js';
import { Gate, OneAtATime } from './quiesce.js';
import type { ChunkRefs } from './thinmap.js';
import { NO_REFS, VolumeTable, type VolumeState } from './volume-table.js';

export { PoolDamaged } from './pool-open.js';
export { readBestSuperblock } from './superblock.js';
export type { PoolDevice } from './chunk-space.js';
export type { VolumeState } from './volume-table.js';

export interface PoolOptions {
  log?: Logger;
  readOnly?: boolean;
  /** Warn once usage crosses this fraction (default 0.8). */
  warnAt?: number;
  /**
   * Commit the metadata this often while changes wait (ms; default 1000, 0: only on flush), as dm-thin's
   * commit period: a client that never flushes loses at most this much of its new chunks' mappings in a
   * crash, not everything since its last flush.
   */
  commitPeriodMs?: number;
}

/** dm-thin's default commit period. */
const COMMIT_PERIOD_MS = 1000;

export interface PoolUsage {
  chunkSize: number;
  dataChunks: number;
  usedChunks: number;
  metadataChunks: number;
  freeChunks: number;
  /** Chunks kept back so a checkpoint can always be written. */
  reservedChunks: number;
  metadataBytes: number;
}

export class Pool implements ChunkRefs {
  readonly log: Logger;
  readonly readOnly: boolean;
  readonly name: string;
  readonly uuid: string;
  /**
   * This open of the pool (random, in memory): a client that knows which open it wrote to can tell a
   * server that restarted, and may have lost new mappings it had not committed, from the same one.
   */
  readonly incarnation = randomUUID().replace(/-/g, '').slice(0, 16);
  readonly chunkSize: number;
  readonly journalBytes: number;
  /** The gate of the data path: volumes pass it, quiesced sections close it. */
  readonly gate = new Gate();
  /** Damage found while opening that did not stop it (a bad copy, an unreadable journal): check reports it. */
  readonly loadProblems: string[] = [];
  /** Why the pool refuses writes, if it does. */
  failure: string | undefined;

  private readonly space: ChunkSpace;
  private readonly alloc: ChunkAllocator;
  private readonly table: VolumeTable;
  private readonly pump: CommitPump;
  private readonly admin = new OneAtATime();
  private closing: Promise<void> | undefined;
  private closed = false;
  private readonly periodic: NodeJS.Timeout | undefined;

  private constructor(space: ChunkSpace, table: VolumeTable, committed: Committed, options: PoolOptions) {
    const sb = committed.superblock;
    this.log = options.log ?? silentLogger();
    this.readOnly = options.readOnly ?? false;
    this.name = sb.pool;
    this.uuid = sb.poolUuid;
    this.chunkSize = sb.chunkSize;
    this.journalBytes = sb.journalBytes;
    this.space = space;
    this.table = table;
    this.alloc = new ChunkAllocator(this.name, space.totalChunks, this.log, options.warnAt ?? 0.8);
    this.alloc.rebuild(table.roots(), committed.checkpointChunks);
    table.recountMapped();
    const { name, log, journalBytes, gate, alloc } = this;
    this.pump = new CommitPump({ name, log, journalBytes, space, alloc, gate, table, fail: (err) => this.fail(err) }, committed);
    const period = options.commitPeriodMs ?? COMMIT_PERIOD_MS;
    if (!this.readOnly && period > 0) {
      this.periodic = setInterval(() => {
        // Only while changes wait and nothing runs: an idle pool writes nothing.
        if (this.closed || this.closing || this.failure !== undefined || !this.pump.waiting()) return;
        // A failed commit fails the pool (fail()); nobody waits on this one.
        this.pump.commit().catch(() => undefined);
      }, period);
      this.periodic.unref();
    }
  }

  /* ------------------------------------------------------------ create/open */

  /** Write a new, empty pool on `devices` (checked first: nothing written on error). */
  static async create(name: string, devices: BlockDevice[], options: PoolOptions & { chunkSize?: number } = {}): Promise<Pool> {
    const chunkSize = options.chunkSize ?? DEFAULT_CHUNK;
    const bad = checkChunkSize(chunkSize);
    if (bad) throw new UserError(`pool ${name}: ${bad}`);
    if (devices.length === 0) throw new UserError(`pool ${name}: name at least one device`);
    const journalBytes = journalBytesFor(devices[0].size);
    for (const dev of devices) await checkNewDevice(name, dev, journalBytes, chunkSize);
    const entries = devices.map((dev) => newDeviceEntry(dev, journalBytes, chunkSize));
    const total = entries.reduce((n, e) => n + e.chunks, 0);
    if (total > MAX_POOL_CHUNKS) throw new UserError(`pool ${name}: ${total} chunks is more than a pool can address; use a larger --chunk-size`);
    const superblock: Superblock = {
      pool: name,
      poolUuid: randomUUID(),
      deviceUuid: '',
      deviceIndex: 0,
      chunkSize,
      journalBytes,
      // A random start keeps journal records of an old pool on the same disk from ever matching.
      gen: randomInt(1, 2 ** 47),
      devices: entries,
      checkpoint: [],
      createdAt: new Date().toISOString(),
      seq: 0,
    };
    const space = new ChunkSpace(chunkSize, placeDevices(devices, entries));
    const committed = { superblock, checkpointChunks: [], journalBytesUsed: 0, journalRecords: 0 };
    const pool = new Pool(space, new VolumeTable(name, chunkSize), committed, options);
    for (const d of space.devices) await d.device.writeZeroes(0, JOURNAL_OFFSET + journalBytes);
    await pool.pump.checkpoint();
    pool.log.info({ event: 'pool-created', pool: name, uuid: pool.uuid, devices: devices.map((d) => d.name), chunkSize }, 'pool created');
    return pool;
  }

  /**
   * Open the pool whose devices are `devices` (any order). `expectUuid`,
   * from the home registry, guards against a disk swapped behind our back.
   */
  static async open(name: string, devices: BlockDevice[], options: PoolOptions & { expectUuid?: string } = {}): Promise<Pool> {
    const log = options.log ?? silentLogger();
    const located = await locatePool(name, devices, options.expectUuid);
    const { chunkSize, journalBytes } = located.superblock;
    const space = new ChunkSpace(chunkSize, located.devices);
    const table = new VolumeTable(located.superblock.pool, chunkSize);
    const loaded = await loadMetadata(name, log, located.superblock, space, table, journalBytes);
    const pool = new Pool(space, table, loaded.committed, options);
    pool.loadProblems.push(...loaded.problems);
    const repairs = [...located.repairs, ...loaded.repairs];
    if (!pool.readOnly) {
      // Receives that never finished leave hidden volumes: drop them.
      const incomplete = [...pool.volumes.values()].filter((v) => v.record.incomplete);
      for (const v of incomplete) pool.apply({ type: 'remove', id: v.record.id }, true);
      if (incomplete.length > 0) repairs.push(`${incomplete.length} unfinished receive(s) dropped`);
      // Only when something disagrees: a fresh checkpoint makes every device's
      // superblock and journal agree again. A clean open writes nothing.
      if (repairs.length > 0) {
        pool.log.warn({ event: 'pool-repaired', pool: name, repairs }, 'pool metadata rewritten at open');
        await pool.pump.checkpoint();
      }
    }
    pool.log.info({ event: 'pool-opened', pool: name, volumes: pool.volumes.size, readOnly: pool.readOnly }, 'pool opened');
    return pool;
  }

  /* ------------------------------------------------------- chunk accounting */

  incref(p: number): void {
    this.alloc.incref(p);
  }
  decref(p: number): void {
    this.pump.decref(p);
  }
  nodeCreated(): void {
    this.alloc.nodes++;
  }
  nodeFreed(): void {
    this.alloc.nodes--;
  }

  refcount(p: number): number {
    return this.alloc.refcount(p);
  }

  /** References dropped but not yet committed (check adds them back). */
  pendingDecrefs(): readonly number[] {
    return this.pump.pendingDecrefs();
  }

  isMetadataChunk(p: number): boolean {
    return this.alloc.isMeta(p);
  }

  /** Chunks kept free so a checkpoint (two copies) always fits. */
  reservedChunks(): number {
    return this.alloc.reserved(this.table.volumes.size, this.chunkSize);
  }

  freeChunks(): number {
    return this.alloc.freeChunks();
  }

  usedFraction(): number {
    return this.alloc.usedFraction();
  }

  /** A free chunk for data, or ENOSPC (the writer sees it; the pool stays consistent). */
  allocData(volumeName: string): number {
    return this.alloc.allocData(volumeName, this.reservedChunks());
  }

  /** Give back a chunk allocated by allocData that never made it into the metadata. */
  unallocData(p: number): void {
    if (!this.alloc.freeIfSole(p)) this.pump.decref(p);
  }

  usage(): PoolUsage {
    const a = this.alloc;
    return {
      chunkSize: this.chunkSize,
      dataChunks: a.totalChunks,
      usedChunks: a.usedChunks,
      metadataChunks: a.metadataChunks,
      freeChunks: a.freeChunks(),
      reservedChunks: this.reservedChunks(),
      metadataBytes: a.metadataChunks * this.chunkSize + this.space.devices.length * (JOURNAL_OFFSET + this.journalBytes),
    };
  }

  /* ------------------------------------------------------------- chunk I/O */

  get devices(): PoolDevice[] {
    return this.space.devices;
  }

  deviceOf(p: number): PoolDevice {
    return this.space.deviceOf(p);
  }

  chunkOffset(d: PoolDevice, p: number): number {
    return this.space.chunkOffset(d, p);
  }

  chunkIsHole(d: PoolDevice, p: number): MaybePromise<boolean> {
    return this.space.chunkIsHole(d, p);
  }

  chunkWritten(d: PoolDevice, p: number): void {
    this.space.chunkWritten(d, p);
  }

  readChunk(p: number, into: Buffer): Promise<void> {
    return this.space.readChunk(p, into);
  }

  writeChunk(p: number, data: Buffer): Promise<void> {
    return this.space.writeChunk(p, data);
  }

  /* ---------------------------------------------------------------- volumes */

  get volumes(): ReadonlyMap<number, VolumeState> {
    return this.table.volumes;
  }

  get nextVolumeId(): number {
    return this.table.nextVolumeId;
  }
  set nextVolumeId(id: number) {
    this.table.nextVolumeId = id;
  }

  chunksOf(sizeBytes: number): number {
    return this.table.chunksOf(sizeBytes);
  }

  volume(name: string): VolumeState | undefined {
    return this.table.named(name);
  }

  volumeById(id: number): VolumeState | undefined {
    return this.table.volumes.get(id);
  }

  listVolumes(): VolumeState[] {
    return this.table.list();
  }

  /** Record a completed mapping change of the data path. */
  recordMap(vol: number, v: number, entry: number): void {
    this.pump.record({ kind: 'map', vol, v, entry });
  }

  /** Apply an admin action to the in-memory state; `journal` also queues it for the next commit. */
  apply(action: AdminAction, journal: boolean): void {
    this.table.apply(action, journal ? this : NO_REFS);
    if (journal) this.pump.record({ kind: 'admin', action });
  }

  /* ------------------------------------------------------ quiescing, admin */

  /** Wait until no mutating data-path operation is in flight, and keep new ones out while `fn` runs. */
  quiesced<T>(fn: () => T | Promise<T>): Promise<T> {
    return this.gate.quiesced(fn);
  }

  /**
   * Apply `fn` and commit it with no data write allowed until the commit is
   * done. Needed when `fn` drops map nodes (remove, swap): a leaf it
   * shared becomes private to the survivor at once, whose next write would
   * go in place into chunks the still-committed old state refers to.
   */
  async quiescedCommit(fn: () => void): Promise<void> {
    await this.quiesced(async () => {
      fn();
      await this.commit();
    });
  }

  /** Admin operations run one at a time. */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.admin.run(fn);
  }

  /* ---------------------------------------------------------------- commit */

  /** A change is not committed yet (queued, or its commit still running): a FUA write in place may depend on it. */
  hasUncommitted(): boolean {
    return this.pump.hasUncommitted();
  }

  /**
   * Make every write completed before this call durable, with the metadata
   * that maps it. Concurrent callers share commits: one that starts after
   * the call covers it.
   */
  commit(): Promise<void> {
    if (this.closed) return Promise.reject(new BlockDeviceError('ESHUTDOWN', `pool ${this.name} is closed`));
    if (this.readOnly) return Promise.resolve();
    return this.pump.commit();
  }

  /** A change of what the pool is made of, durable with one checkpoint written by the pump. */
  private change(change: MetadataChange): Promise<void> {
    if (this.closed) return Promise.reject(new BlockDeviceError('ESHUTDOWN', `pool ${this.name} is closed`));
    if (this.readOnly) return Promise.reject(new UserError(`pool ${this.name} is open read-only`));
    return this.pump.checkpoint(change);
  }

  /**
   * Metadata could not be committed: what is in memory may be ahead of the
   * disks in ways later writes must not build on. Like dm-thin's fail mode,
   * the pool refuses writes until it is reopened (reads go on).
   */
  private fail(err: unknown): void {
    if (this.failure === undefined) {
      this.failure = (err as Error).message;
      this.log.error({ event: 'pool-failed', pool: this.name, err: this.failure }, `pool ${this.name}: metadata commit failed; writes refused until it is reopened`);
    }
  }

  /* ---------------------------------------------------------------- extend */

  /** Add a device online: it is checked and its headers zeroed first, then one checkpoint makes it part of the pool. */
  async extend(device: BlockDevice): Promise<void> {
    if (this.readOnly) throw new UserError(`pool ${this.name} is open read-only; open it writable to extend it`);
    const leftOver = await checkNewDevice(this.name, device, this.journalBytes, this.chunkSize, { uuid: this.uuid, devices: this.devices.map((d) => d.entry) });
    const entry = newDeviceEntry(device, this.journalBytes, this.chunkSize);
    if (this.space.totalChunks + entry.chunks > MAX_POOL_CHUNKS) throw new UserError(`pool ${this.name}: adding ${device.name} would exceed the chunks a pool can address`);
    if (leftOver) this.log.warn({ event: 'device-rejoins', pool: this.name, device: device.name }, `${device.name} carries a superblock of an extend of pool ${this.name} that never completed; it joins again`);
    // Nothing of an earlier life (a superblock, journal records) may be read as this pool's.
    await device.writeZeroes(0, JOURNAL_OFFSET + this.journalBytes);
    await device.flush();
    await this.change(joinChange(this.space, this.alloc, device, entry));
    this.log.info({ event: 'pool-extended', pool: this.name, device: device.name, chunks: entry.chunks }, 'pool extended');
  }

  /* ----------------------------------------------------------------- close */

  /** Commit, let the pump finish whatever else it was handed, then close the devices. */
  close(): Promise<void> {
    this.closing ??= this.shutDown().catch((err: unknown) => {
      this.closing = undefined;
      throw err;
    });
    return this.closing;
  }

  private async shutDown(): Promise<void> {
    if (this.periodic) clearInterval(this.periodic);
    if (this.closed) return;
    try {
      if (!this.readOnly) await this.commit();
      await this.pump.idle();
    } finally {
      // Given back even when the last commit fails (the disk failed, or the resource is fenced off and
      // fails the flush): the metadata on disk is what was last committed, and a device still lent out
      // would keep its resource "in use" (no resync could ever overwrite it).
      this.closed = true;
      for (const d of this.space.devices) await Promise.resolve(d.device.close()).catch(() => undefined);
    }
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** For check and tests: the committed superblock and checkpoint chunks. */
  describeMetadata(): { superblock: Superblock; checkpointChunks: number[]; journalBytesUsed: number } {
    const { superblock, checkpointChunks, journalBytesUsed } = this.pump.committed();
    return { superblock, checkpointChunks, journalBytesUsed };
  }

  get chunkCount(): number {
    return this.space.totalChunks;
  }

  get nodeCount(): number {
    return this.alloc.nodes;
  }
}
