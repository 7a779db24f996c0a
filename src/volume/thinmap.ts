/**
 * The thin map of one volume: virtual chunk -> physical chunk, as a radix
 * tree of 1024-way nodes whose nodes are shared between volumes.
 *
 * Sharing is what makes snapshots and clones O(1): a snapshot is a second
 * root pointing at the same top node (its `ref` goes up by one). Nothing is
 * copied until someone writes: the writer copies the nodes on its path that
 * are shared ("path copying"), and copying a leaf adds one reference to
 * every data chunk in it. This is dm-thin's lazy reference counting (its
 * btree nodes carry the counts, data blocks are counted per leaf), which
 * keeps a snapshot of a 1 TiB volume as cheap as one of 1 GiB.
 *
 * Entries store physical chunk + 1, so 0 is "unmapped" (reads as zeros).
 */

export const FANOUT_BITS = 10;
export const FANOUT = 1 << FANOUT_BITS;
const MASK = FANOUT - 1;

export class Leaf {
  ref = 1;
  /** Mapped entries, so empty leaves can be dropped. */
  count = 0;
  readonly map: Uint32Array;
  constructor(map?: Uint32Array) {
    this.map = map ?? new Uint32Array(FANOUT);
  }
}

export class Inner {
  ref = 1;
  count = 0;
  readonly kids: (TreeNode | undefined)[];
  constructor() {
    this.kids = new Array<TreeNode | undefined>(FANOUT);
  }
}

export type TreeNode = Leaf | Inner;

/** What the tree needs from the pool: data-chunk reference counting. */
export interface ChunkRefs {
  /** One more leaf refers to physical chunk `p` (0-based). */
  incref(p: number): void;
  /** One leaf less refers to `p`; the pool decides when it is really free. */
  decref(p: number): void;
  /** Node accounting, for the metadata size estimate. */
  nodeCreated(): void;
  nodeFreed(): void;
}

/** Levels a tree needs to address `chunks` virtual chunks (at least 1). */
export function levelsFor(chunks: number): number {
  let levels = 1;
  let span = FANOUT;
  while (span < chunks) {
    levels++;
    span *= FANOUT;
  }
  return levels;
}

/** The root of one volume's map. */
export interface ThinRoot {
  node: TreeNode | undefined;
  levels: number;
}

function slot(v: number, level: number): number {
  // Division instead of shifts: virtual chunk numbers may exceed 2^31.
  return Math.floor(v / FANOUT ** level) & MASK;
}

/** Physical chunk + 1 mapped at virtual chunk `v`, 0 if unmapped. */
export function lookup(root: ThinRoot, v: number): number {
  let node = root.node;
  for (let level = root.levels - 1; level > 0; level--) {
    if (node === undefined) return 0;
    node = (node as Inner).kids[slot(v, level)];
  }
  if (node === undefined) return 0;
  return (node as Leaf).map[v & MASK];
}

/** Drop one reference to `node`; when it reaches 0 release what it refers to. */
export function release(node: TreeNode, refs: ChunkRefs): void {
  if (--node.ref > 0) return;
  refs.nodeFreed();
  if (node instanceof Leaf) {
    const map = node.map;
    for (let i = 0; i < FANOUT; i++) if (map[i] !== 0) refs.decref(map[i] - 1);
  } else {
    for (const kid of node.kids) if (kid !== undefined) release(kid, refs);
  }
}

function copyNode(node: TreeNode, refs: ChunkRefs): TreeNode {
  refs.nodeCreated();
  if (node instanceof Leaf) {
    const copy = new Leaf(new Uint32Array(node.map));
    copy.count = node.count;
    const map = copy.map;
    for (let i = 0; i < FANOUT; i++) if (map[i] !== 0) refs.incref(map[i] - 1);
    node.ref--;
    return copy;
  }
  const copy = new Inner();
  copy.count = node.count;
  for (let i = 0; i < FANOUT; i++) {
    const kid = node.kids[i];
    if (kid !== undefined) {
      kid.ref++;
      copy.kids[i] = kid;
    }
  }
  node.ref--;
  return copy;
}

/**
 * The leaf holding `v`, made private to this root (copying shared nodes on
 * the way down and creating missing ones), ready to be changed.
 */
export function writableLeaf(root: ThinRoot, v: number, refs: ChunkRefs): Leaf {
  if (root.node === undefined) {
    root.node = root.levels === 1 ? new Leaf() : new Inner();
    refs.nodeCreated();
  } else if (root.node.ref > 1) {
    root.node = copyNode(root.node, refs);
  }
  let node = root.node;
  for (let level = root.levels - 1; level > 0; level--) {
    const inner = node as Inner;
    const i = slot(v, level);
    let kid = inner.kids[i];
    if (kid === undefined) {
      kid = level === 1 ? new Leaf() : new Inner();
      refs.nodeCreated();
      inner.kids[i] = kid;
      inner.count++;
    } else if (kid.ref > 1) {
      kid = copyNode(kid, refs);
      inner.kids[i] = kid;
    }
    node = kid;
  }
  return node as Leaf;
}

/** Is the path to `v` private to this root (no node on it shared)? */
export function pathIsPrivate(root: ThinRoot, v: number): boolean {
  let node = root.node;
  for (let level = root.levels - 1; level >= 0; level--) {
    if (node === undefined || node.ref > 1) return false;
    if (level > 0) node = (node as Inner).kids[slot(v, level)];
  }
  return true;
}

/**
 * Set entry `v` to `value` (physical chunk + 1, or 0 to unmap). Returns the
 * previous entry. The caller accounts the data-chunk references of the
 * entries themselves (it knows whether the old chunk must be released).
 */
export function setEntry(root: ThinRoot, v: number, value: number, refs: ChunkRefs): number {
  if (value === 0 && lookup(root, v) === 0) return 0;
  const leaf = writableLeaf(root, v, refs);
  const i = v & MASK;
  const old = leaf.map[i];
  leaf.map[i] = value;
  if (old === 0 && value !== 0) leaf.count++;
  else if (old !== 0 && value === 0) leaf.count--;
  if (leaf.count === 0) prune(root, v, refs);
  return old;
}

/** Remove empty private nodes on the path to `v`, bottom up. */
function prune(root: ThinRoot, v: number, refs: ChunkRefs): void {
  const path: Inner[] = [];
  let node = root.node;
  for (let level = root.levels - 1; level > 0; level--) {
    if (node === undefined || node.ref > 1) return;
    path.push(node as Inner);
    node = (node as Inner).kids[slot(v, level)];
  }
  if (node === undefined || node.ref > 1 || node.count > 0) return;
  for (let depth = path.length - 1; depth >= 0; depth--) {
    const parent = path[depth];
    const level = root.levels - 1 - depth;
    const i = slot(v, level);
    const kid = parent.kids[i]!;
    if (kid.count > 0) return;
    parent.kids[i] = undefined;
    parent.count--;
    release(kid, refs);
  }
  if (root.node !== undefined && root.node.count === 0 && root.node.ref === 1) {
    release(root.node, refs);
    root.node = undefined;
  }
}

/** Grow the tree so it addresses `chunks` virtual chunks (sizes only go up here). */
export function growLevels(root: ThinRoot, chunks: number, refs: ChunkRefs): void {
  const want = levelsFor(chunks);
  while (root.levels < want) {
    if (root.node !== undefined) {
      const top = new Inner();
      refs.nodeCreated();
      // The root's reference moves into the new top node: no count changes.
      top.kids[0] = root.node;
      top.count = 1;
      root.node = top;
    }
    root.levels++;
  }
}

/** A second root sharing everything with `root` (snapshot, clone): O(1). */
export function shareRoot(root: ThinRoot): ThinRoot {
  if (root.node !== undefined) root.node.ref++;
  return { node: root.node, levels: root.levels };
}

/**
 * Call `fn(v, entry)` for every mapped entry with from <= v < to, in order,
 * skipping empty subtrees (so a sparse 1 TiB volume walks fast).
 */
export function forEachMapped(root: ThinRoot, from: number, to: number, fn: (v: number, entry: number) => void): void {
  if (root.node === undefined || from >= to) return;
  walk(root.node, root.levels - 1, 0, from, to, fn);
}

function walk(node: TreeNode, level: number, base: number, from: number, to: number, fn: (v: number, entry: number) => void): void {
  const span = FANOUT ** level;
  const first = Math.max(0, Math.floor((from - base) / span));
  const last = Math.min(FANOUT - 1, Math.floor((to - 1 - base) / span));
  if (level === 0) {
    const map = (node as Leaf).map;
    for (let i = first; i <= last; i++) if (map[i] !== 0) fn(base + i, map[i]);
    return;
  }
  const kids = (node as Inner).kids;
  for (let i = first; i <= last; i++) {
    const kid = kids[i];
    if (kid !== undefined) walk(kid, level - 1, base + i * span, from, to, fn);
  }
}

/**
 * Virtual chunks where two roots differ, in order, from the tree structure
 * alone: a subtree both roots share is skipped without looking inside
 * (thin_delta's trick), so the cost follows the changes, not the size.
 */
export function diffRoots(a: ThinRoot, b: ThinRoot, chunks: number, fn: (v: number, before: number, after: number) => void): void {
  const levels = Math.max(a.levels, b.levels);
  diffNodes(lift(a, levels), lift(b, levels), levels - 1, 0, chunks, fn);
}

/** View a root at a given height (a shorter tree is the first child of a taller one). */
function lift(root: ThinRoot, levels: number): TreeNode | undefined {
  let node = root.node;
  for (let l = root.levels; l < levels && node !== undefined; l++) {
    const top = new Inner();
    top.kids[0] = node;
    top.count = 1;
    node = top;
  }
  return node;
}

function diffNodes(
  a: TreeNode | undefined,
  b: TreeNode | undefined,
  level: number,
  base: number,
  chunks: number,
  fn: (v: number, before: number, after: number) => void,
): void {
  if (a === b || base >= chunks) return;
  const span = FANOUT ** level;
  if (level === 0) {
    const am = (a as Leaf | undefined)?.map;
    const bm = (b as Leaf | undefined)?.map;
    const end = Math.min(FANOUT, chunks - base);
    for (let i = 0; i < end; i++) {
      const x = am ? am[i] : 0;
      const y = bm ? bm[i] : 0;
      if (x !== y) fn(base + i, x, y);
    }
    return;
  }
  const ak = (a as Inner | undefined)?.kids;
  const bk = (b as Inner | undefined)?.kids;
  for (let i = 0; i < FANOUT; i++) {
    const start = base + i * span;
    if (start >= chunks) break;
    diffNodes(ak?.[i], bk?.[i], level - 1, start, chunks, fn);
  }
}
