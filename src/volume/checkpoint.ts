/**
 * The checkpoint: every volume record and every map node, serialized once
 * per node however many volumes share it, so the checkpoint of a pool with
 * ten snapshots is no bigger than the data they really map.
 *
 * Stream: u32 header length, JSON header, then the nodes children-first:
 *   1 sparse leaf:  u16 count, count x (u16 slot, u32 entry)
 *   2 dense leaf:   1024 x u32 entry
 *   3 inner node:   u16 count, count x (u16 slot, u32 node index)
 */
import { FANOUT, Inner, Leaf, ThinRoot, TreeNode } from './thinmap.js';
import type { VolumeRecord } from './format.js';
import { Slicer } from '../util/slice.js';

export interface CheckpointVolume {
  record: VolumeRecord;
  root: ThinRoot;
}

export interface CheckpointState {
  nextVolumeId: number;
  volumes: CheckpointVolume[];
}

interface Header {
  nextVolumeId: number;
  nodes: number;
  volumes: { record: VolumeRecord; root: number; levels: number }[];
}

const SPARSE_LEAF = 1;
const DENSE_LEAF = 2;
const INNER = 3;

/** Map nodes encoded between two looks at the clock (a dense leaf is 4 KiB). */
const NODES_PER_STEP = 64;

/**
 * The stream as its parts (a 4-byte header length, the header, then one
 * part per node), encoded a step at a time: the generator yields every
 * NODES_PER_STEP nodes so a caller can give the event loop a turn (a pool
 * with a TiB mapped has 16,000 leaves: ~1.5 s in one go).
 */
function* encodeParts(state: CheckpointState): Generator<void, Buffer[], void> {
  const index = new Map<TreeNode, number>();
  const nodes: Buffer[] = [];
  let sinceStep = 0;
  /** Encode the nodes under `root` not encoded yet, children first, without recursion (a step may end anywhere in the tree). */
  const visit = function* (root: TreeNode): Generator<void, number, void> {
    const known = index.get(root);
    if (known !== undefined) return known;
    const stack: { node: TreeNode; slot: number; kids: [number, number][] }[] = [{ node: root, slot: 0, kids: [] }];
    let n = -1;
    while (stack.length > 0) {
      const top = stack[stack.length - 1];
      if (top.node instanceof Inner && descend(top, stack)) continue;
      stack.pop();
      n = nodes.length;
      nodes.push(top.node instanceof Leaf ? encodeLeaf(top.node) : encodeInner(top.kids));
      index.set(top.node, n);
      const parent = stack[stack.length - 1];
      if (parent) parent.kids.push([parent.slot++, n]);
      if (++sinceStep >= NODES_PER_STEP) {
        sinceStep = 0;
        yield;
      }
    }
    return n;
  };
  /** Take the inner node's known children in slot order; push its first one not encoded yet (true) or find none left (false). */
  const descend = (top: { node: TreeNode; slot: number; kids: [number, number][] }, stack: (typeof top)[]): boolean => {
    const kids = (top.node as Inner).kids;
    for (; top.slot < FANOUT; top.slot++) {
      const kid = kids[top.slot];
      if (kid === undefined) continue;
      const n = index.get(kid);
      if (n === undefined) {
        // Its number is taken when it is done (the slot moves on then).
        stack.push({ node: kid, slot: 0, kids: [] });
        return true;
      }
      top.kids.push([top.slot, n]);
    }
    return false;
  };
  const volumes: Header['volumes'] = [];
  for (const v of state.volumes) {
    const root = v.root.node === undefined ? -1 : yield* visit(v.root.node);
    volumes.push({ record: v.record, root, levels: v.root.levels });
  }
  const header: Header = { nextVolumeId: state.nextVolumeId, nodes: nodes.length, volumes };
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.allocUnsafe(4);
  len.writeUInt32LE(json.length, 0);
  return [len, json, ...nodes];
}

function encodeLeaf(node: Leaf): Buffer {
  const map = node.map;
  let count = 0;
  for (let i = 0; i < FANOUT; i++) if (map[i] !== 0) count++;
  if (count * 6 + 3 >= FANOUT * 4 + 1) {
    const buf = Buffer.allocUnsafe(1 + FANOUT * 4);
    buf[0] = DENSE_LEAF;
    Buffer.from(map.buffer, map.byteOffset, map.byteLength).copy(buf, 1);
    // Uint32Array is host-endian; the format is little-endian.
    if (!LITTLE_ENDIAN) for (let i = 0; i < FANOUT; i++) buf.writeUInt32LE(map[i], 1 + i * 4);
    return buf;
  }
  const buf = Buffer.allocUnsafe(3 + count * 6);
  buf[0] = SPARSE_LEAF;
  buf.writeUInt16LE(count, 1);
  let at = 3;
  for (let i = 0; i < FANOUT; i++) {
    if (map[i] === 0) continue;
    buf.writeUInt16LE(i, at);
    buf.writeUInt32LE(map[i], at + 2);
    at += 6;
  }
  return buf;
}

function encodeInner(kids: [number, number][]): Buffer {
  const buf = Buffer.allocUnsafe(3 + kids.length * 6);
  buf[0] = INNER;
  buf.writeUInt16LE(kids.length, 1);
  let at = 3;
  for (const [i, k] of kids) {
    buf.writeUInt16LE(i, at);
    buf.writeUInt32LE(k, at + 2);
    at += 6;
  }
  return buf;
}

export function serializeCheckpoint(state: CheckpointState): Buffer {
  const steps = encodeParts(state);
  for (let r = steps.next(); ; r = steps.next()) if (r.done) return Buffer.concat(r.value);
}

/**
 * The same stream as serializeCheckpoint, as parts, with a turn of the
 * event loop every few milliseconds. The state must not change until it
 * resolves (the commit pump holds the pool quiesced and alone).
 */
export async function serializeCheckpointInSlices(state: CheckpointState): Promise<Buffer[]> {
  const slicer = new Slicer();
  const steps = encodeParts(state);
  for (let r = steps.next(); ; r = steps.next()) {
    if (r.done) return r.value;
    const pause = slicer.due();
    if (pause) await pause;
  }
}

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** Rebuild the shared tree: node refs count their parents and roots. */
export function deserializeCheckpoint(stream: Buffer): CheckpointState {
  const fail = (why: string): never => {
    throw new Error(`checkpoint: ${why}`);
  };
  if (stream.length < 4) fail('too short');
  const hlen = stream.readUInt32LE(0);
  if (4 + hlen > stream.length) fail('header runs past the end');
  const header = JSON.parse(stream.subarray(4, 4 + hlen).toString('utf8')) as Header;
  const nodes: TreeNode[] = [];
  let at = 4 + hlen;
  const need = (n: number): void => {
    if (at + n > stream.length) fail(`node ${nodes.length} runs past the end`);
  };
  for (let n = 0; n < header.nodes; n++) {
    need(1);
    const kind = stream[at++];
    if (kind === DENSE_LEAF) {
      need(FANOUT * 4);
      const leaf = new Leaf();
      for (let i = 0; i < FANOUT; i++) {
        const e = stream.readUInt32LE(at + i * 4);
        leaf.map[i] = e;
        if (e !== 0) leaf.count++;
      }
      at += FANOUT * 4;
      leaf.ref = 0;
      nodes.push(leaf);
    } else if (kind === SPARSE_LEAF || kind === INNER) {
      need(2);
      const count = stream.readUInt16LE(at);
      at += 2;
      need(count * 6);
      if (kind === SPARSE_LEAF) {
        const leaf = new Leaf();
        for (let k = 0; k < count; k++) {
          const i = stream.readUInt16LE(at);
          const e = stream.readUInt32LE(at + 2);
          at += 6;
          if (i >= FANOUT || e === 0) fail(`leaf ${n} has a bad entry`);
          if (leaf.map[i] === 0) leaf.count++;
          leaf.map[i] = e;
        }
        leaf.ref = 0;
        nodes.push(leaf);
      } else {
        const inner = new Inner();
        for (let k = 0; k < count; k++) {
          const i = stream.readUInt16LE(at);
          const child = stream.readUInt32LE(at + 2);
          at += 6;
          if (i >= FANOUT || child >= n) fail(`inner node ${n} points forward or out of range`);
          if (inner.kids[i] === undefined) inner.count++;
          inner.kids[i] = nodes[child];
          nodes[child].ref++;
        }
        inner.ref = 0;
        nodes.push(inner);
      }
    } else {
      fail(`node ${n} has unknown kind ${kind}`);
    }
  }
  const volumes = header.volumes.map((v) => {
    let node: TreeNode | undefined;
    if (v.root >= 0) {
      if (v.root >= nodes.length) fail(`volume ${v.record.name} has a root out of range`);
      node = nodes[v.root];
      node.ref++;
    }
    return { record: v.record, root: { node, levels: v.levels } };
  });
  return { nextVolumeId: header.nextVolumeId, volumes };
}
