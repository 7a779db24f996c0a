/**
 * The pool's volumes: records, thin maps, and the admin actions that change
 * them (create, share, remove, resize, set, swap). Live changes and journal
 * replay apply the same actions here, so they cannot drift.
 */
import type { AdminAction, JournalOp, VolumeRecord } from './format.js';
import type { CheckpointState } from './checkpoint.js';
import { type ChunkRefs, type ThinRoot, type TreeNode, forEachMapped, growLevels, levelsFor, release, setEntry, shareRoot } from './thinmap.js';
import { UserError } from '../util/errors.js';

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

/** Reference accounting that does nothing: replay rebuilds the counts from the result instead. */
export const NO_REFS: ChunkRefs = { incref() {}, decref() {}, nodeCreated() {}, nodeFreed() {} };

export class VolumeTable {
  readonly volumes = new Map<number, VolumeState>();
  private readonly byName = new Map<string, VolumeState>();
  nextVolumeId = 1;

  constructor(
    private readonly pool: string,
    private readonly chunkSize: number,
  ) {}

  chunksOf(sizeBytes: number): number {
    return Math.ceil(sizeBytes / this.chunkSize);
  }

  named(name: string): VolumeState | undefined {
    return this.byName.get(name);
  }

  list(): VolumeState[] {
    return [...this.volumes.values()].filter((v) => !v.record.incomplete).sort((a, b) => a.record.name.localeCompare(b.record.name));
  }

  /** What a checkpoint holds. */
  state(): CheckpointState {
    return { nextVolumeId: this.nextVolumeId, volumes: [...this.volumes.values()].map((v) => ({ record: v.record, root: v.root })) };
  }

  /** Start from a checkpoint's content. */
  load(state: CheckpointState): void {
    this.nextVolumeId = state.nextVolumeId;
    for (const v of state.volumes) this.add(v.record, v.root);
  }

  /** Every volume's top node, for recounting references. */
  *roots(): Iterable<TreeNode> {
    for (const v of this.volumes.values()) if (v.root.node) yield v.root.node;
  }

  /** Recount each volume's mapped chunks from its map (after a load). */
  recountMapped(): void {
    for (const v of this.volumes.values()) {
      v.mapped = 0;
      forEachMapped(v.root, 0, this.chunksOf(v.record.sizeBytes), () => v.mapped++);
    }
  }

  /** Apply one journaled operation of a replay. */
  replay(op: JournalOp): void {
    if (op.kind === 'admin') {
      this.apply(op.action, NO_REFS);
      return;
    }
    const v = this.volumes.get(op.vol);
    if (!v) throw new UserError(`pool ${this.pool}: journal maps a chunk of volume id ${op.vol}, which does not exist; run duet pool check ${this.pool}`);
    setEntry(v.root, op.v, op.entry, NO_REFS);
  }

  apply(action: AdminAction, refs: ChunkRefs): void {
    switch (action.type) {
      case 'create': {
        this.add(action.volume, { node: undefined, levels: levelsFor(this.chunksOf(action.volume.sizeBytes)) });
        this.nextVolumeId = Math.max(this.nextVolumeId, action.volume.id + 1);
        break;
      }
      case 'share': {
        const from = this.must(action.from);
        const state = this.add(action.volume, shareRoot(from.root));
        state.mapped = from.mapped;
        growLevels(state.root, this.chunksOf(action.volume.sizeBytes), refs);
        this.nextVolumeId = Math.max(this.nextVolumeId, action.volume.id + 1);
        break;
      }
      case 'remove': {
        const v = this.must(action.id);
        if (v.root.node) release(v.root.node, refs);
        this.volumes.delete(action.id);
        v.removed = true;
        if (this.byName.get(v.record.name) === v) this.byName.delete(v.record.name);
        break;
      }
      case 'resize': {
        const v = this.must(action.id);
        // Entries past the new end were unmapped by map ops before this action.
        growLevels(v.root, this.chunksOf(action.sizeBytes), refs);
        v.record = { ...v.record, sizeBytes: action.sizeBytes };
        break;
      }
      case 'set': {
        const v = this.must(action.id);
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
        const a = this.must(action.id);
        const b = this.must(action.with);
        [a.root, b.root] = [b.root, a.root];
        [a.mapped, b.mapped] = [b.mapped, a.mapped];
        const size = a.record.sizeBytes;
        a.record = { ...a.record, sizeBytes: b.record.sizeBytes };
        b.record = { ...b.record, sizeBytes: size };
        break;
      }
    }
  }

  private add(record: VolumeRecord, root: ThinRoot): VolumeState {
    const state: VolumeState = { record, root, mapped: 0, busy: new Map() };
    this.volumes.set(record.id, state);
    this.byName.set(record.name, state);
    return state;
  }

  private must(id: number): VolumeState {
    const v = this.volumes.get(id);
    if (!v) throw new Error(`pool ${this.pool}: no volume with id ${id}`);
    return v;
  }
}
