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

export function serializeCheckpoint(state: CheckpointState): Buffer {
  const index = new Map<TreeNode, number>();
  const parts: Buffer[] = [];
  const visit = (node: TreeNode): number => {
    const known = index.get(node);
    if (known !== undefined) return known;
    let buf: Buffer;
    if (node instanceof Leaf) {
      const map = node.map;
      let count = 0;
      for (let i = 0; i < FANOUT; i++) if (map[i] !== 0) count++;
      if (count * 6 + 3 >= FANOUT * 4 + 1) {
        buf = Buffer.allocUnsafe(1 + FANOUT * 4);
        buf[0] = DENSE_LEAF;
        Buffer.from(map.buffer, map.byteOffset, map.byteLength).copy(buf, 1);
        // Uint32Array is host-endian; the format is little-endian.
        if (!LITTLE_ENDIAN) for (let i = 0; i < FANOUT; i++) buf.writeUInt32LE(map[i], 1 + i * 4);
      } else {
        buf = Buffer.allocUnsafe(3 + count * 6);
        buf[0] = SPARSE_LEAF;
        buf.writeUInt16LE(count, 1);
        let at = 3;
        for (let i = 0; i < FANOUT; i++) {
          if (map[i] === 0) continue;
          buf.writeUInt16LE(i, at);
          buf.writeUInt32LE(map[i], at + 2);
          at += 6;
        }
      }
    } else {
      const kids: [number, number][] = [];
      for (let i = 0; i < FANOUT; i++) {
        const kid = node.kids[i];
        if (kid !== undefined) kids.push([i, visit(kid)]);
      }
      buf = Buffer.allocUnsafe(3 + kids.length * 6);
      buf[0] = INNER;
      buf.writeUInt16LE(kids.length, 1);
      let at = 3;
      for (const [i, k] of kids) {
        buf.writeUInt16LE(i, at);
        buf.writeUInt32LE(k, at + 2);
        at += 6;
      }
    }
    const n = parts.length;
    parts.push(buf);
    index.set(node, n);
    return n;
  };
  const volumes = state.volumes.map((v) => ({
    record: v.record,
    root: v.root.node === undefined ? -1 : visit(v.root.node),
    levels: v.root.levels,
  }));
  const header: Header = { nextVolumeId: state.nextVolumeId, nodes: parts.length, volumes };
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.allocUnsafe(4);
  len.writeUInt32LE(json.length, 0);
  return Buffer.concat([len, json, ...parts]);
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
