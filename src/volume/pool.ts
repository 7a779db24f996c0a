/**
 * A pool: thin volumes over one or more devices, with its metadata on the
 * devices themselves (see format.ts and docs/volume-format.md).
 *
 * Crash safety rests on three rules, the same ones dm-thin follows:
 *  1. Metadata never points at data that is not durable: a new mapping is
 *     journaled only after its data write completed, and every commit
 *     flushes the data devices before writing the journal record.
 *  2. A chunk the committed metadata still refers to is never reused: when
 *     a mapping goes away (trim, copy-on-write, remove) the chunk's
 *     reference is dropped only after the commit that records it.
 *  3. Superblocks are switched last, alternating between two slots, so a
 *     crash leaves the old or the new checkpoint readable.
 */
import { randomUUID, randomInt } from 'node:crypto';
import type { BlockDevice, Extent, MaybePromise } from '../blockdev/types.js';
import { EXTENT_ZERO } from '../blockdev/types.js';
import { BlockDeviceError } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import { silentLogger } from '../util/log.js';
import {
  AdminAction,
  CKPT_HEADER,
  CheckpointCopy,
  DeviceEntry,
  JOURNAL_HEADER,
  JOURNAL_OFFSET,
  JournalOp,
  SUPERBLOCK_BYTES,
  Superblock,
  VolumeRecord,
  crc32,
  decodeCheckpointChunk,
  decodeJournalHeader,
  decodeOps,
  decodeSuperblock,
  encodeCheckpointChunk,
  encodeJournalRecord,
  encodeOps,
  encodeSuperblock,
  hasPoolMagic,
  journalPayloadValid,
} from './format.js';
import { deserializeCheckpoint, serializeCheckpoint } from './checkpoint.js';
import {
  ChunkRefs,
  FANOUT,
  Leaf,
  ThinRoot,
  TreeNode,
  forEachMapped,
  growLevels,
  levelsFor,
  release,
  setEntry,
  shareRoot,
} from './thinmap.js';
import {
  DEFAULT_CHUNK,
  MAX_POOL_CHUNKS,
  checkChunkSize,
  dataChunksFor,
  dataStartFor,
  journalBytesFor,
  minDeviceBytes,
} from './layout.js';
import { UserError } from '../util/errors.js';

/** The pool cannot be opened because its metadata is damaged (pool check reports it as damage, exit 1). */
export class PoolDamaged extends UserError {}

/** Chunks one hole query looks ahead (64 MiB at 64 KiB chunks). */
const HOLE_PROBE = 1024;

/** Reference count value of a chunk holding metadata (a checkpoint piece). */
const META = 0xffff_ffff;

export interface PoolDevice {
  device: BlockDevice;
  entry: DeviceEntry;
  firstChunk: number;
}

export interface VolumeState {
  record: VolumeRecord;
  root: ThinRoot;
  /** Mapped chunks, kept current for listings. */
  mapped: number;
  /** Virtual chunks being provisioned: other requests on them wait. */
  busy: Map<number, Promise<void>>;
  /** Set once removed, so open devices of it fail cleanly. */
  removed?: boolean;
}

export interface PoolOptions {
  log?: Logger;
  readOnly?: boolean;
  /** Warn once usage crosses this fraction (default 0.8). */
  warnAt?: number;
}

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
  readonly chunkSize: number;
  readonly journalBytes: number;
  devices: PoolDevice[];
  readonly volumes = new Map<number, VolumeState>();
  private readonly byName = new Map<string, VolumeState>();
  nextVolumeId = 1;

  /** Per pool chunk: leaves referring to it, or META. */
  private refs: Uint32Array;
  private totalChunks: number;
  private used = 0;
  private metaUsed = 0;
  private hint = 0;
  private nodes = 0;
  private warnAt: number;
  private warned = false;

  private sb: Superblock;
  private checkpointChunks: number[] = [];
  private staleMeta: number[] = [];
  /** Damage found while opening that did not stop it (a bad copy, an unreadable journal): check reports it. */
  readonly loadProblems: string[] = [];
  /** Disagreements found at open that a writable open fixes with a fresh checkpoint. */
  private readonly repairs: string[] = [];
  private journalAt = 0;
  private journalSeq = 0;

  /** Completed changes not yet committed, and references to drop after they are. */
  private ops: JournalOp[] = [];
  private decrefs: number[] = [];

  private commitRequested = 0;
  private commitWaiters: { target: number; resolve: () => void; reject: (e: unknown) => void }[] = [];
  private pumping = false;

  /** Mutating data-path operations in flight, and the gate admin operations close. */
  inflight = 0;
  gateClosed = 0;
  private gateWaiters: (() => void)[] = [];
  private drainWaiters: (() => void)[] = [];
  private adminLock: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(sb: Superblock, devices: PoolDevice[], options: PoolOptions) {
    this.log = options.log ?? silentLogger();
    this.readOnly = options.readOnly ?? false;
    this.warnAt = options.warnAt ?? 0.8;
    this.sb = sb;
    this.name = sb.pool;
    this.uuid = sb.poolUuid;
    this.chunkSize = sb.chunkSize;
    this.journalBytes = sb.journalBytes;
    this.devices = devices;
    this.totalChunks = devices.reduce((n, d) => n + d.entry.chunks, 0);
    this.refs = new Uint32Array(this.totalChunks);
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
    const entries: DeviceEntry[] = devices.map((dev) => {
      const dataStart = dataStartFor(journalBytes, chunkSize);
      return { uuid: randomUUID(), sizeBytes: dev.size, dataStart, chunks: dataChunksFor(dev.size, dataStart, chunkSize) };
    });
    const total = entries.reduce((n, e) => n + e.chunks, 0);
    if (total > MAX_POOL_CHUNKS) throw new UserError(`pool ${name}: ${total} chunks is more than a pool can address; use a larger --chunk-size`);
    const sb: Superblock = {
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
    const pool = new Pool(sb, placeDevices(devices, entries), options);
    for (const d of pool.devices) await d.device.writeZeroes(0, JOURNAL_OFFSET + journalBytes);
    await pool.writeCheckpoint();
    pool.log.info({ event: 'pool-created', pool: name, uuid: pool.uuid, devices: devices.map((d) => d.name), chunkSize }, 'pool created');
    return pool;
  }

  /**
   * Open the pool whose devices are `devices` (any order). `expectUuid`,
   * from the home registry, guards against a disk swapped behind our back.
   */
  static async open(name: string, devices: BlockDevice[], options: PoolOptions & { expectUuid?: string } = {}): Promise<Pool> {
    const found: { dev: BlockDevice; sb: Superblock }[] = [];
    for (const dev of devices) {
      const sb = await readBestSuperblock(dev);
      if (!sb) throw new PoolDamaged(`pool ${name}: ${dev.name} has no readable pool superblock (not a duet pool device, or both copies damaged)`);
      if (options.expectUuid && sb.poolUuid !== options.expectUuid) {
        throw new UserError(`pool ${name}: ${dev.name} belongs to pool ${sb.pool} (${sb.poolUuid}), not to this one`);
      }
      found.push({ dev, sb });
    }
    const uuid = options.expectUuid ?? found[0].sb.poolUuid;
    const mine = found.filter((f) => f.sb.poolUuid === uuid);
    if (mine.length !== found.length) {
      const stranger = found.find((f) => f.sb.poolUuid !== uuid)!;
      throw new UserError(`pool ${name}: ${stranger.dev.name} belongs to pool ${stranger.sb.pool}, not to this one`);
    }
    // The newest superblock on any device is the pool's state; it lists the devices.
    const best = mine.reduce((a, b) => (b.sb.seq > a.sb.seq ? b : a)).sb;
    const ordered: BlockDevice[] = [];
    for (const entry of best.devices) {
      const f = mine.find((m) => m.sb.deviceUuid === entry.uuid);
      if (!f) throw new UserError(`pool ${name}: device ${entry.uuid} (${entry.sizeBytes} bytes) is missing; attach it and name it in the pool`);
      if (f.dev.size < entry.sizeBytes) throw new UserError(`pool ${name}: ${f.dev.name} is smaller (${f.dev.size} bytes) than when it joined the pool (${entry.sizeBytes})`);
      ordered.push(f.dev);
    }
    const pool = new Pool({ ...best, deviceUuid: '', deviceIndex: 0 }, placeDevices(ordered, best.devices), options);
    if (ordered.some((d) => mine.find((m) => m.dev === d)!.sb.seq !== best.seq)) pool.repairs.push('a device missed the last superblock update');
    await pool.load();
    if (!pool.readOnly) {
      // Receives that never finished leave hidden volumes: drop them.
      const incomplete = [...pool.volumes.values()].filter((v) => v.record.incomplete);
      for (const v of incomplete) pool.apply({ type: 'remove', id: v.record.id }, true);
      if (incomplete.length > 0) pool.repairs.push(`${incomplete.length} unfinished receive(s) dropped`);
      // Only when something disagrees: a fresh checkpoint makes every device's
      // superblock and journal agree again. A clean open writes nothing.
      if (pool.repairs.length > 0) {
        pool.log.warn({ event: 'pool-repaired', pool: name, repairs: pool.repairs }, 'pool metadata rewritten at open');
        await pool.writeCheckpoint();
      }
    }
    pool.log.info({ event: 'pool-opened', pool: name, volumes: pool.volumes.size, readOnly: pool.readOnly }, 'pool opened');
    return pool;
  }

  private async load(): Promise<void> {
    const errors: string[] = [];
    let stream: Buffer | undefined;
    // Read every copy: the good one gives the state, and all of them must be
    // kept off the allocator until the next checkpoint replaces them.
    for (const [i, copy] of this.sb.checkpoint.entries()) {
      try {
        const s = await this.readCheckpointCopy(copy, this.sb.gen);
        stream ??= s;
      } catch (err) {
        errors.push(`copy ${i + 1}: ${(err as Error).message}`);
      }
    }
    if (!stream) throw new PoolDamaged(`pool ${this.name}: metadata checkpoint unreadable (${errors.join('; ')}); run duet pool check ${this.name}`);
    for (const e of errors) this.loadProblems.push(`checkpoint ${e}`);
    if (errors.length > 0) this.repairs.push('a checkpoint copy is damaged');
    if (errors.length > 0) this.log.warn({ event: 'checkpoint-copy-damaged', pool: this.name, errors }, 'a checkpoint copy is damaged; the other one was used');
    const state = deserializeCheckpoint(stream);
    this.nextVolumeId = state.nextVolumeId;
    for (const v of state.volumes) this.addVolume(v.record, v.root);
    this.checkpointChunks = this.sb.checkpoint.flatMap((c) => this.chainChunks(c));
    const { records, bytes } = await this.readJournal();
    // Replay without reference accounting: the counts are rebuilt below from the result.
    for (const ops of records) for (const op of ops) this.replay(op);
    this.journalAt = bytes;
    this.journalSeq = records.length;
    this.rebuildCounts();
  }

  /** Chunks of a checkpoint chain, from the copy's first chunk (chains are contiguous runs or linked). */
  private chainChunks(copy: CheckpointCopy): number[] {
    return this.chainOf.get(copy.first) ?? [];
  }
  private chainOf = new Map<number, number[]>();

  private async readCheckpointCopy(copy: CheckpointCopy, gen: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    const chain: number[] = [];
    let chunk = copy.first;
    for (let index = 0; index < copy.chunks; index++) {
      if (chunk < 0 || chunk >= this.totalChunks) throw new Error(`piece ${index} at chunk ${chunk} is outside the pool`);
      const buf = Buffer.alloc(this.chunkSize);
      await this.readChunk(chunk, buf);
      const piece = decodeCheckpointChunk(buf, gen, index);
      if (!piece.ok) throw new Error(`piece ${index} at chunk ${chunk}: ${piece.why}`);
      parts.push(Buffer.from(piece.value.payload));
      chain.push(chunk);
      if (index === copy.chunks - 1) break;
      if (piece.value.next === 0) throw new Error(`chain ends after ${index + 1} of ${copy.chunks} pieces`);
      chunk = piece.value.next - 1;
    }
    const stream = Buffer.concat(parts);
    if (stream.length !== copy.bytes || crc32(stream) !== copy.crc) throw new Error('stream checksum mismatch');
    this.chainOf.set(copy.first, chain);
    return stream;
  }

  /** The longest valid journal among the devices (every commit went to all of them). */
  private async readJournal(): Promise<{ records: JournalOp[][]; bytes: number }> {
    let best: { records: JournalOp[][]; bytes: number } = { records: [], bytes: 0 };
    const lengths = new Set<number>();
    for (const d of this.devices) {
      const area = Buffer.alloc(this.journalBytes);
      try {
        await d.device.read(JOURNAL_OFFSET, area);
      } catch (err) {
        this.loadProblems.push(`journal on ${d.device.name} unreadable: ${(err as Error).message}`);
        lengths.add(-1);
        this.log.warn({ event: 'journal-unreadable', pool: this.name, device: d.device.name, err: (err as Error).message }, 'journal unreadable on one device');
        continue;
      }
      const records: JournalOp[][] = [];
      let at = 0;
      while (at + JOURNAL_HEADER <= area.length) {
        const h = decodeJournalHeader(area.subarray(at));
        if (!h || h.gen !== this.sb.gen || h.seq !== records.length + 1 || at + h.recordBytes > area.length) break;
        const record = area.subarray(at, at + h.recordBytes);
        if (!journalPayloadValid(record, h)) break;
        records.push(decodeOps(record.subarray(JOURNAL_HEADER, JOURNAL_HEADER + h.payloadLength)));
        at += h.recordBytes;
      }
      lengths.add(records.length);
      if (records.length > best.records.length) best = { records, bytes: at };
    }
    if (lengths.size > 1) this.repairs.push('the devices hold journals of different lengths');
    return best;
  }

  /** Recount data-chunk references and usage from the trees (also what check compares). */
  private rebuildCounts(): void {
    this.refs.fill(0);
    this.nodes = 0;
    const seen = new Set<TreeNode>();
    const visit = (node: TreeNode): void => {
      if (seen.has(node)) return;
      seen.add(node);
      this.nodes++;
      if (node instanceof Leaf) {
        const map = node.map;
        for (let i = 0; i < FANOUT; i++) {
          const e = map[i];
          if (e !== 0 && e - 1 < this.totalChunks) this.refs[e - 1]++;
        }
      } else {
        for (const kid of node.kids) if (kid) visit(kid);
      }
    };
    for (const v of this.volumes.values()) {
      if (v.root.node) visit(v.root.node);
      v.mapped = 0;
      forEachMapped(v.root, 0, this.chunksOf(v.record.sizeBytes), () => v.mapped++);
    }
    for (const c of this.checkpointChunks) this.refs[c] = META;
    this.used = 0;
    this.metaUsed = 0;
    for (let i = 0; i < this.totalChunks; i++) {
      if (this.refs[i] === META) this.metaUsed++;
      else if (this.refs[i] !== 0) this.used++;
    }
  }

  /* ------------------------------------------------------- chunk accounting */

  incref(p: number): void {
    if (this.refs[p]++ === 0) this.used++;
  }
  decref(p: number): void {
    // Dropped after the next commit: the committed metadata may still point here.
    this.decrefs.push(p);
  }
  nodeCreated(): void {
    this.nodes++;
  }
  nodeFreed(): void {
    this.nodes--;
  }

  private applyDecrefs(list: number[]): void {
    for (const p of list) {
      const r = this.refs[p];
      if (r === 0 || r === META) {
        this.log.error({ event: 'refcount-underflow', pool: this.name, chunk: p }, 'reference count underflow');
        continue;
      }
      this.refs[p] = r - 1;
      if (r === 1) this.used--;
    }
    if (this.warned && this.usedFraction() < this.warnAt) this.warned = false;
  }

  refcount(p: number): number {
    return this.refs[p];
  }

  /** References dropped but not yet committed (check adds them back). */
  pendingDecrefs(): readonly number[] {
    return this.decrefs;
  }

  isMetadataChunk(p: number): boolean {
    return this.refs[p] === META;
  }

  /** Chunks kept free so a checkpoint (two copies) always fits. */
  reservedChunks(): number {
    const payload = this.chunkSize - CKPT_HEADER;
    const estimate = 4096 + this.volumes.size * 512 + this.nodes * (FANOUT * 4 + 1);
    return 2 * Math.ceil((estimate * 1.25) / payload) + 2;
  }

  freeChunks(): number {
    return this.totalChunks - this.used - this.metaUsed;
  }

  usedFraction(): number {
    return this.totalChunks === 0 ? 1 : (this.used + this.metaUsed) / this.totalChunks;
  }

  /** A free chunk for data, or ENOSPC (the writer sees it; the pool stays consistent). */
  allocData(volumeName: string): number {
    if (this.freeChunks() <= this.reservedChunks()) {
      throw new BlockDeviceError('ENOSPC', `pool ${this.name} is full (volume ${volumeName}): extend it with duet pool extend ${this.name} DEVICE, or remove snapshots`);
    }
    const p = this.findFree();
    this.refs[p] = 1;
    this.used++;
    if (!this.warned && this.usedFraction() >= this.warnAt) {
      this.warned = true;
      this.log.warn(
        { event: 'pool-nearly-full', pool: this.name, usedPercent: Math.round(this.usedFraction() * 100) },
        `pool ${this.name} is ${Math.round(this.usedFraction() * 100)}% full: extend it or free space before writes fail`,
      );
    }
    return p;
  }

  /** Give back a chunk allocated by allocData that never made it into the metadata. */
  unallocData(p: number): void {
    if (this.refs[p] === 1) {
      this.refs[p] = 0;
      this.used--;
    } else {
      this.decrefs.push(p);
    }
  }

  private findFree(): number {
    const n = this.totalChunks;
    for (let k = 0; k < n; k++) {
      const p = this.hint;
      this.hint = this.hint + 1 === n ? 0 : this.hint + 1;
      if (this.refs[p] === 0) return p;
    }
    throw new BlockDeviceError('ENOSPC', `pool ${this.name} has no free chunk`);
  }

  usage(): PoolUsage {
    return {
      chunkSize: this.chunkSize,
      dataChunks: this.totalChunks,
      usedChunks: this.used,
      metadataChunks: this.metaUsed,
      freeChunks: this.freeChunks(),
      reservedChunks: this.reservedChunks(),
      metadataBytes: this.metaUsed * this.chunkSize + this.devices.length * (JOURNAL_OFFSET + this.journalBytes),
    };
  }

  /* ------------------------------------------------------------- chunk I/O */

  /** Device and byte offset of pool chunk `p`. */
  deviceOf(p: number): PoolDevice {
    const ds = this.devices;
    if (ds.length === 1) return ds[0];
    for (let i = ds.length - 1; i > 0; i--) if (p >= ds[i].firstChunk) return ds[i];
    return ds[0];
  }

  chunkOffset(d: PoolDevice, p: number): number {
    return d.entry.dataStart + (p - d.firstChunk) * this.chunkSize;
  }

  /**
   * Is pool chunk `p` still a hole on its device (so it reads as zeros)?
   * One extent query covers up to HOLE_PROBE chunks ahead and is remembered
   * per device, so sequential allocation asks the device once per run;
   * every write to a chunk goes through chunkWritten, which forgets it.
   */
  chunkIsHole(d: PoolDevice, p: number): MaybePromise<boolean> {
    const known = this.holes.get(d);
    if (known !== undefined && p >= known.from && p < known.to) return true;
    if (!d.device.capabilities.extents) return false;
    const base = this.chunkOffset(d, p);
    const span = Math.min(HOLE_PROBE, d.firstChunk + d.entry.chunks - p) * this.chunkSize;
    const judge = (extents: Extent[]): boolean => {
      const e = extents[0];
      if (e === undefined || e.offset !== base || (e.flags & EXTENT_ZERO) === 0) return false;
      const n = Math.floor(Math.min(e.length, span) / this.chunkSize);
      if (n < 1) return false;
      this.holes.set(d, { from: p, to: p + n });
      return true;
    };
    const r = d.device.blockStatus(base, span);
    return r instanceof Promise ? r.then(judge) : judge(r);
  }

  /** Chunk `p` is being written: it is no hole any more. */
  chunkWritten(d: PoolDevice, p: number): void {
    const known = this.holes.get(d);
    if (known === undefined || p < known.from || p >= known.to) return;
    if (p === known.from) known.from++;
    else known.to = p;
  }

  private readonly holes = new Map<PoolDevice, { from: number; to: number }>();

  async readChunk(p: number, into: Buffer): Promise<void> {
    const d = this.deviceOf(p);
    await d.device.read(this.chunkOffset(d, p), into);
  }

  async writeChunk(p: number, data: Buffer): Promise<void> {
    const d = this.deviceOf(p);
    this.chunkWritten(d, p);
    await d.device.write(this.chunkOffset(d, p), data);
  }

  async flushDevices(): Promise<void> {
    await Promise.all(this.devices.map((d) => d.device.flush()));
  }

  /* ---------------------------------------------------------------- volumes */

  chunksOf(sizeBytes: number): number {
    return Math.ceil(sizeBytes / this.chunkSize);
  }

  volume(name: string): VolumeState | undefined {
    return this.byName.get(name);
  }

  volumeById(id: number): VolumeState | undefined {
    return this.volumes.get(id);
  }

  listVolumes(): VolumeState[] {
    return [...this.volumes.values()].filter((v) => !v.record.incomplete).sort((a, b) => a.record.name.localeCompare(b.record.name));
  }

  private addVolume(record: VolumeRecord, root: ThinRoot): VolumeState {
    const state: VolumeState = { record, root, mapped: 0, busy: new Map() };
    this.volumes.set(record.id, state);
    this.byName.set(record.name, state);
    return state;
  }

  /** Record a completed mapping change of the data path. */
  recordMap(vol: number, v: number, entry: number): void {
    this.ops.push({ kind: 'map', vol, v, entry });
  }

  /**
   * Apply an admin action to the in-memory state; `journal` also queues it
   * for the next commit. Live and replay share this, so they cannot drift.
   */
  apply(action: AdminAction, journal: boolean): void {
    const refs: ChunkRefs = journal ? this : NO_REFS;
    switch (action.type) {
      case 'create': {
        this.addVolume(action.volume, { node: undefined, levels: levelsFor(this.chunksOf(action.volume.sizeBytes)) });
        this.nextVolumeId = Math.max(this.nextVolumeId, action.volume.id + 1);
        break;
      }
      case 'share': {
        const from = this.mustVolume(action.from);
        const state = this.addVolume(action.volume, shareRoot(from.root));
        state.mapped = from.mapped;
        growLevels(state.root, this.chunksOf(action.volume.sizeBytes), refs);
        this.nextVolumeId = Math.max(this.nextVolumeId, action.volume.id + 1);
        break;
      }
      case 'remove': {
        const v = this.mustVolume(action.id);
        if (v.root.node) release(v.root.node, refs);
        this.volumes.delete(action.id);
        v.removed = true;
        if (this.byName.get(v.record.name) === v) this.byName.delete(v.record.name);
        break;
      }
      case 'resize': {
        const v = this.mustVolume(action.id);
        const chunks = this.chunksOf(action.sizeBytes);
        // Entries past the new end were unmapped by map ops before this action.
        growLevels(v.root, chunks, refs);
        v.record = { ...v.record, sizeBytes: action.sizeBytes };
        break;
      }
      case 'set': {
        const v = this.mustVolume(action.id);
        if (action.fields.name !== undefined && action.fields.name !== v.record.name) {
          if (this.byName.get(v.record.name) === v) this.byName.delete(v.record.name);
          this.byName.set(action.fields.name, v);
        }
        const record: Record<string, unknown> = { ...v.record };
        for (const [k, val] of Object.entries(action.fields)) {
          if (val === null) delete record[k];
          else if (val !== undefined) record[k] = val;
        }
        v.record = record as unknown as VolumeRecord;
        break;
      }
      case 'swap': {
        // The content (map and size) of two volumes changes places; names and ids stay.
        const a = this.mustVolume(action.id);
        const b = this.mustVolume(action.with);
        [a.root, b.root] = [b.root, a.root];
        [a.mapped, b.mapped] = [b.mapped, a.mapped];
        const size = a.record.sizeBytes;
        a.record = { ...a.record, sizeBytes: b.record.sizeBytes };
        b.record = { ...b.record, sizeBytes: size };
        break;
      }
    }
    if (journal) this.ops.push({ kind: 'admin', action });
  }

  private replay(op: JournalOp): void {
    if (op.kind === 'admin') {
      this.apply(op.action, false);
      return;
    }
    const v = this.volumes.get(op.vol);
    if (!v) throw new UserError(`pool ${this.name}: journal maps a chunk of volume id ${op.vol}, which does not exist; run duet pool check ${this.name}`);
    setEntry(v.root, op.v, op.entry, NO_REFS);
  }

  private mustVolume(id: number): VolumeState {
    const v = this.volumes.get(id);
    if (!v) throw new Error(`pool ${this.name}: no volume with id ${id}`);
    return v;
  }

  /* ------------------------------------------------------ gate (quiescing) */

  /** Wait until no mutating data-path operation is in flight, and keep new ones out while `fn` runs. */
  async quiesced<T>(fn: () => T | Promise<T>): Promise<T> {
    this.gateClosed++;
    try {
      while (this.inflight > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
      return await fn();
    } finally {
      if (--this.gateClosed === 0) {
        const waiters = this.gateWaiters;
        this.gateWaiters = [];
        for (const w of waiters) w();
      }
    }
  }

  whenGateOpen(): Promise<void> {
    return new Promise((resolve) => this.gateWaiters.push(resolve));
  }

  /** A data-path operation finished its part that must not overlap a snapshot. */
  leave(): void {
    if (--this.inflight === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
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
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.adminLock;
    let done!: () => void;
    this.adminLock = new Promise<void>((resolve) => (done = resolve));
    await prev;
    try {
      return await fn();
    } finally {
      done();
    }
  }

  /* ---------------------------------------------------------------- commit */

  /**
   * Some change is not committed yet (queued, or its commit still running):
   * a FUA write that went in place may be writing a chunk whose mapping is
   * among them.
   */
  hasUncommitted(): boolean {
    return this.ops.length > 0 || this.pumping;
  }

  /**
   * Make every write completed before this call durable, with the metadata
   * that maps it. Concurrent callers share commits: one that starts after
   * the call covers it.
   */
  commit(): Promise<void> {
    if (this.closed) return Promise.reject(new BlockDeviceError('ESHUTDOWN', `pool ${this.name} is closed`));
    if (this.readOnly) return Promise.resolve();
    const target = ++this.commitRequested;
    const p = new Promise<void>((resolve, reject) => this.commitWaiters.push({ target, resolve, reject }));
    void this.pump();
    return p;
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.commitWaiters.length > 0) {
        const upto = this.commitRequested;
        let error: unknown;
        try {
          await this.commitOnce();
        } catch (err) {
          error = err;
        }
        const ready = this.commitWaiters.filter((w) => w.target <= upto);
        this.commitWaiters = this.commitWaiters.filter((w) => w.target > upto);
        for (const w of ready) (error === undefined ? w.resolve() : w.reject(error));
      }
    } finally {
      this.pumping = false;
    }
  }

  private async commitOnce(): Promise<void> {
    const ops = this.ops;
    const decrefs = this.decrefs;
    this.ops = [];
    this.decrefs = [];
    try {
      // Rule 1: data first, then the metadata that points at it.
      await this.flushDevices();
      if (ops.length > 0) {
        const record = encodeJournalRecord(this.sb.gen, this.journalSeq + 1, encodeOps(ops));
        if (this.journalAt + record.length > this.journalBytes) {
          // The journal is full: a checkpoint covers these ops (they are in memory already).
          this.ops = ops.concat(this.ops);
          this.decrefs = decrefs.concat(this.decrefs);
          await this.writeCheckpoint();
          return;
        }
        await Promise.all(this.devices.map((d) => d.device.write(JOURNAL_OFFSET + this.journalAt, record)));
        await this.flushDevices();
        this.journalAt += record.length;
        this.journalSeq++;
      }
    } catch (err) {
      this.ops = ops.concat(this.ops);
      this.decrefs = decrefs.concat(this.decrefs);
      this.fail(err);
      throw err;
    }
    this.applyDecrefs(decrefs);
  }

  /**
   * Serialize the whole metadata into fresh chunks (two copies), then switch
   * every device's superblock to it; the journal starts over. The state is
   * taken with no data write in flight, so it maps only completed writes.
   */
  async writeCheckpoint(): Promise<void> {
    const taken = await this.quiesced(() => {
      const ops = this.ops;
      const decrefs = this.decrefs;
      this.ops = [];
      this.decrefs = [];
      const stream = serializeCheckpoint({
        nextVolumeId: this.nextVolumeId,
        volumes: [...this.volumes.values()].map((v) => ({ record: v.record, root: v.root })),
      });
      return { ops, decrefs, stream };
    });
    const { stream } = taken;
    const gen = this.sb.gen + 1;
    const payload = this.chunkSize - CKPT_HEADER;
    const pieces = Math.max(1, Math.ceil(stream.length / payload));
    const copies: CheckpointCopy[] = [];
    const chains: number[][] = [];
    const newChunks: number[] = [];
    let switching = false;
    try {
      for (let c = 0; c < 2; c++) {
        const chain = this.allocMeta(pieces, c);
        newChunks.push(...chain);
        chains.push(chain);
        copies.push({ first: chain[0], chunks: pieces, bytes: stream.length, crc: crc32(stream) });
      }
      await this.flushDevices();
      for (const chain of chains) {
        for (let i = 0; i < pieces; i++) {
          const part = stream.subarray(i * payload, Math.min(stream.length, (i + 1) * payload));
          const next = i + 1 < pieces ? chain[i + 1] + 1 : 0;
          await this.writeChunk(chain[i], encodeCheckpointChunk(this.chunkSize, gen, i, next, part));
        }
      }
      await this.flushDevices();
      const sb: Superblock = { ...this.sb, gen, seq: this.sb.seq + 1, checkpoint: copies };
      switching = true;
      await this.writeSuperblocks(sb);
      this.sb = sb;
    } catch (err) {
      if (switching) {
        // Some device may already point at the new checkpoint: keep it until a later one replaces it.
        this.staleMeta.push(...newChunks);
      } else {
        for (const p of newChunks) {
          this.refs[p] = 0;
          this.metaUsed--;
        }
      }
      this.ops = taken.ops.concat(this.ops);
      this.decrefs = taken.decrefs.concat(this.decrefs);
      this.fail(err);
      throw err;
    }
    // Rule 3 done: the old checkpoint is garbage now.
    for (const p of [...this.checkpointChunks, ...this.staleMeta]) {
      this.refs[p] = 0;
      this.metaUsed--;
    }
    this.staleMeta = [];
    this.checkpointChunks = newChunks;
    chains.forEach((chain, i) => this.chainOf.set(copies[i].first, chain));
    this.journalAt = 0;
    this.journalSeq = 0;
    this.applyDecrefs(taken.decrefs);
    this.log.debug({ event: 'checkpoint', pool: this.name, gen, bytes: stream.length }, 'metadata checkpoint written');
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

  /** Why the pool refuses writes, if it does. */
  failure: string | undefined;

  private async writeSuperblocks(sb: Superblock): Promise<void> {
    const slot = sb.seq % 2;
    await Promise.all(
      this.devices.map((d, i) =>
        d.device.write(slot * SUPERBLOCK_BYTES, encodeSuperblock({ ...sb, deviceUuid: d.entry.uuid, deviceIndex: i }), { fua: true }),
      ),
    );
    await this.flushDevices();
  }

  /** Chunks for one checkpoint copy; the second copy prefers another device than the first. */
  private allocMeta(count: number, copy: number): number[] {
    if (this.freeChunks() < count) {
      throw new BlockDeviceError('ENOSPC', `pool ${this.name}: no room left for metadata; extend the pool`);
    }
    const chain: number[] = [];
    const start = copy === 1 && this.devices.length > 1 ? this.devices[this.devices.length - 1].firstChunk : 0;
    for (let k = 0; k < this.totalChunks && chain.length < count; k++) {
      const p = (start + k) % this.totalChunks;
      if (this.refs[p] === 0) {
        this.refs[p] = META;
        this.metaUsed++;
        chain.push(p);
      }
    }
    if (chain.length < count) throw new BlockDeviceError('ENOSPC', `pool ${this.name}: no room left for metadata; extend the pool`);
    return chain;
  }

  /* ---------------------------------------------------------------- extend */

  /** Add a device online: it is written first, then one checkpoint makes it part of the pool. */
  async extend(device: BlockDevice): Promise<void> {
    await checkNewDevice(this.name, device, this.journalBytes, this.chunkSize);
    const dataStart = dataStartFor(this.journalBytes, this.chunkSize);
    const entry: DeviceEntry = { uuid: randomUUID(), sizeBytes: device.size, dataStart, chunks: dataChunksFor(device.size, dataStart, this.chunkSize) };
    if (this.totalChunks + entry.chunks > MAX_POOL_CHUNKS) throw new UserError(`pool ${this.name}: adding ${device.name} would exceed the chunks a pool can address`);
    await device.writeZeroes(0, JOURNAL_OFFSET + this.journalBytes);
    await device.flush();
    // No data write may allocate while the chunk table is swapped and committed.
    await this.quiesced(async () => {
      const before = { devices: this.devices, refs: this.refs, total: this.totalChunks, sb: this.sb };
      const refs = new Uint32Array(this.totalChunks + entry.chunks);
      refs.set(this.refs);
      this.devices = [...this.devices, { device, entry, firstChunk: this.totalChunks }];
      this.refs = refs;
      this.totalChunks += entry.chunks;
      this.sb = { ...this.sb, devices: [...this.sb.devices, entry] };
      try {
        await this.writeCheckpoint();
      } catch (err) {
        // Not committed: the pool goes on without the device.
        this.devices = before.devices;
        this.refs = before.refs;
        this.totalChunks = before.total;
        this.sb = before.sb;
        throw err;
      }
    });
    this.log.info({ event: 'pool-extended', pool: this.name, device: device.name, chunks: entry.chunks }, 'pool extended');
  }

  /* ----------------------------------------------------------------- close */

  async close(): Promise<void> {
    if (this.closed) return;
    if (!this.readOnly) await this.commit();
    this.closed = true;
    for (const d of this.devices) await d.device.close();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** For check and tests: the committed superblock and checkpoint chunks. */
  describeMetadata(): { superblock: Superblock; checkpointChunks: number[]; journalBytesUsed: number } {
    return { superblock: this.sb, checkpointChunks: [...this.checkpointChunks], journalBytesUsed: this.journalAt };
  }

  get chunkCount(): number {
    return this.totalChunks;
  }

  get nodeCount(): number {
    return this.nodes;
  }
}

const NO_REFS: ChunkRefs = { incref() {}, decref() {}, nodeCreated() {}, nodeFreed() {} };

function placeDevices(devices: BlockDevice[], entries: DeviceEntry[]): PoolDevice[] {
  let first = 0;
  return devices.map((device, i) => {
    const d = { device, entry: entries[i], firstChunk: first };
    first += entries[i].chunks;
    return d;
  });
}

/** Read both superblock slots; the valid one with the higher sequence wins. */
export async function readBestSuperblock(dev: BlockDevice): Promise<Superblock | undefined> {
  let best: Superblock | undefined;
  for (let slot = 0; slot < 2; slot++) {
    if (dev.size < (slot + 1) * SUPERBLOCK_BYTES) break;
    const buf = Buffer.alloc(SUPERBLOCK_BYTES);
    try {
      await dev.read(slot * SUPERBLOCK_BYTES, buf);
    } catch {
      continue;
    }
    const sb = decodeSuperblock(buf);
    if (sb.ok && (!best || sb.value.seq > best.seq)) best = sb.value;
  }
  return best;
}

/** A device may join a pool only if it is big enough and not in a pool already. */
async function checkNewDevice(pool: string, dev: BlockDevice, journalBytes: number, chunkSize: number): Promise<void> {
  if (dev.capabilities.readOnly) throw new UserError(`${dev.name}: read-only; a pool device must be writable`);
  const min = minDeviceBytes(journalBytes, chunkSize);
  if (dev.size < min) throw new UserError(`${dev.name}: too small for pool ${pool} (${dev.size} bytes; needs at least ${min})`);
  const sb = await readBestSuperblock(dev);
  if (sb) throw new UserError(`${dev.name} already belongs to pool ${sb.pool} (${sb.poolUuid}); wipe its first 8 KiB if that pool is gone`);
  const head = Buffer.alloc(SUPERBLOCK_BYTES);
  await dev.read(0, head);
  if (hasPoolMagic(head)) throw new UserError(`${dev.name} carries a damaged duet pool superblock; wipe its first 8 KiB if you mean to reuse it`);
}
