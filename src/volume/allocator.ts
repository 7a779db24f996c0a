/**
 * Who owns each pool chunk: per chunk, the number of map leaves referring
 * to it (dm-thin's lazy scheme: a leaf shared by snapshots counts once), or
 * META for a checkpoint piece. The counts are not stored: they are rebuilt
 * from the trees at open (and compared by pool check).
 */
import { BlockDeviceError } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import { CKPT_HEADER } from './format.js';
import { FANOUT, Leaf, type TreeNode } from './thinmap.js';

/** Reference count value of a chunk holding metadata (a checkpoint piece). */
export const META = 0xffff_ffff;

export class ChunkAllocator {
  private refs: Uint32Array;
  private total: number;
  private used = 0;
  private metaUsed = 0;
  private hint = 0;
  private warned = false;
  /** Map nodes in memory (a checkpoint's size grows with them). */
  nodes = 0;
  /** The counts were set once (a new array is all zeros already). */
  private counted = false;

  constructor(
    private readonly pool: string,
    total: number,
    private readonly log: Logger,
    private readonly warnAt: number,
  ) {
    this.total = total;
    this.refs = new Uint32Array(total);
  }

  get totalChunks(): number {
    return this.total;
  }
  get usedChunks(): number {
    return this.used;
  }
  get metadataChunks(): number {
    return this.metaUsed;
  }

  /**
   * Recount from the trees: every node reachable from `roots` once, and the
   * checkpoint's chunks. Costs the mapped entries, not the pool's chunks:
   * a pass over every count of a 4 TiB pool (256 MiB, touched page by page)
   * held the event loop ~1 s at each open.
   */
  rebuild(roots: Iterable<TreeNode>, metaChunks: number[]): void {
    if (this.counted) this.refs.fill(0);
    this.counted = true;
    this.nodes = 0;
    this.used = 0;
    this.metaUsed = 0;
    const seen = new Set<TreeNode>();
    const visit = (node: TreeNode): void => {
      if (seen.has(node)) return;
      seen.add(node);
      this.nodes++;
      if (node instanceof Leaf) {
        const map = node.map;
        for (let i = 0; i < FANOUT; i++) {
          const e = map[i];
          if (e !== 0 && e - 1 < this.total && this.refs[e - 1]++ === 0) this.used++;
        }
      } else {
        for (const kid of node.kids) if (kid) visit(kid);
      }
    };
    for (const root of roots) visit(root);
    for (const c of metaChunks) {
      if (this.refs[c] === META) continue;
      if (this.refs[c] !== 0) this.used--;
      this.refs[c] = META;
      this.metaUsed++;
    }
  }

  incref(p: number): void {
    if (this.refs[p]++ === 0) this.used++;
  }

  /** Drop one reference of each chunk in `list` (the commit that recorded the drops is durable). */
  release(list: readonly number[]): void {
    for (const p of list) {
      const r = this.refs[p];
      if (r === 0 || r === META) {
        this.log.error({ event: 'refcount-underflow', pool: this.pool, chunk: p }, 'reference count underflow');
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

  isMeta(p: number): boolean {
    return this.refs[p] === META;
  }

  freeChunks(): number {
    return this.total - this.used - this.metaUsed;
  }

  usedFraction(): number {
    return this.total === 0 ? 1 : (this.used + this.metaUsed) / this.total;
  }

  /** Chunks kept free so a checkpoint (two copies) of `volumes` volumes always fits. */
  reserved(volumes: number, chunkSize: number): number {
    const payload = chunkSize - CKPT_HEADER;
    const estimate = 4096 + volumes * 512 + this.nodes * (FANOUT * 4 + 1);
    return 2 * Math.ceil((estimate * 1.25) / payload) + 2;
  }

  /** A free chunk for data, or ENOSPC once only the `reserved` chunks are left (the writer sees it; the pool stays consistent). */
  allocData(volumeName: string, reserved: number): number {
    if (this.freeChunks() <= reserved) {
      throw new BlockDeviceError('ENOSPC', `pool ${this.pool} is full (volume ${volumeName}): extend it with duet pool extend ${this.pool} DEVICE, or remove snapshots`);
    }
    const p = this.findFree();
    this.refs[p] = 1;
    this.used++;
    if (!this.warned && this.usedFraction() >= this.warnAt) {
      this.warned = true;
      this.log.warn(
        { event: 'pool-nearly-full', pool: this.pool, usedPercent: Math.round(this.usedFraction() * 100) },
        `pool ${this.pool} is ${Math.round(this.usedFraction() * 100)}% full: extend it or free space before writes fail`,
      );
    }
    return p;
  }

  /** Free a data chunk no one else refers to at once; false if others do (then it is a decref like any other). */
  freeIfSole(p: number): boolean {
    if (this.refs[p] !== 1) return false;
    this.refs[p] = 0;
    this.used--;
    return true;
  }

  /** Chunks for one checkpoint copy, searched from chunk `start` on. */
  allocMeta(count: number, start: number): number[] {
    const full = (): never => {
      throw new BlockDeviceError('ENOSPC', `pool ${this.pool}: no room left for metadata; extend the pool`);
    };
    if (this.freeChunks() < count) full();
    const chain: number[] = [];
    for (let k = 0; k < this.total && chain.length < count; k++) {
      const p = (start + k) % this.total;
      if (this.refs[p] === 0) {
        this.refs[p] = META;
        this.metaUsed++;
        chain.push(p);
      }
    }
    if (chain.length < count) {
      this.freeMeta(chain);
      full();
    }
    return chain;
  }

  freeMeta(chunks: readonly number[]): void {
    for (const p of chunks) {
      if (p >= this.total || this.refs[p] !== META) continue;
      this.refs[p] = 0;
      this.metaUsed--;
    }
  }

  /** `extra` chunks join at the end (extend); the function returned takes them back. */
  grow(extra: number): () => void {
    const before = this.total;
    const refs = new Uint32Array(before + extra);
    refs.set(this.refs);
    this.refs = refs;
    this.total += extra;
    return () => {
      // Only metadata can be there: no data write allocates before the extend is durable.
      for (let p = before; p < this.total; p++) if (this.refs[p] === META) this.metaUsed--;
      this.refs = this.refs.slice(0, before);
      this.total = before;
      this.hint = 0;
    };
  }

  private findFree(): number {
    const n = this.total;
    for (let k = 0; k < n; k++) {
      const p = this.hint;
      this.hint = this.hint + 1 === n ? 0 : this.hint + 1;
      if (this.refs[p] === 0) return p;
    }
    throw new BlockDeviceError('ENOSPC', `pool ${this.pool} has no free chunk`);
  }
}
