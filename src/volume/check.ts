/**
 * `pool check`: walk every piece of metadata and compare it with what it
 * must be (thin_check's job for dm-thin). Problems are precise sentences:
 * which volume, which virtual chunk, which physical chunk, what is wrong.
 */
import type { Pool } from './pool.js';
import { readBestSuperblock } from './pool.js';
import { decodeSuperblock, SUPERBLOCK_BYTES } from './format.js';
import { FANOUT, Inner, Leaf, TreeNode } from './thinmap.js';
import { SECTOR_BYTES } from './operations.js';

export interface CheckReport {
  ok: boolean;
  /** Damage: metadata that is wrong. */
  problems: string[];
  /** Worth knowing, not damage (e.g. a stale superblock copy the next open rewrites). */
  notes: string[];
  volumes: number;
  nodes: number;
  mappedChunks: number;
}

const MAX_REPORTED = 50;

export async function checkPool(pool: Pool): Promise<CheckReport> {
  const problems: string[] = [...pool.loadProblems];
  const notes: string[] = [];
  const report = (list: string[], text: string): void => {
    if (list.length < MAX_REPORTED) list.push(text);
    else if (list.length === MAX_REPORTED) list.push('... more problems not listed');
  };
  const { superblock } = pool.describeMetadata();

  // Superblocks: both slots of every device.
  for (const [i, d] of pool.devices.entries()) {
    const best = await readBestSuperblock(d.device);
    if (!best) {
      report(problems, `device ${d.device.name}: no valid superblock`);
      continue;
    }
    if (best.poolUuid !== pool.uuid) report(problems, `device ${d.device.name}: superblock names pool ${best.poolUuid}, not ${pool.uuid}`);
    if (best.deviceUuid !== d.entry.uuid || best.deviceIndex !== i) report(problems, `device ${d.device.name}: superblock says it is device ${best.deviceIndex} (${best.deviceUuid}), the pool expects ${i} (${d.entry.uuid})`);
    if (best.seq < superblock.seq) report(notes, `device ${d.device.name}: superblock at sequence ${best.seq}, the pool is at ${superblock.seq} (rewritten at the next open)`);
    let valid = 0;
    for (let slot = 0; slot < 2; slot++) {
      const buf = Buffer.alloc(SUPERBLOCK_BYTES);
      await d.device.read(slot * SUPERBLOCK_BYTES, buf);
      if (decodeSuperblock(buf).ok) valid++;
    }
    if (valid < 2 && superblock.seq > 1) report(notes, `device ${d.device.name}: only ${valid} of 2 superblock slots valid`);
  }

  // Trees: structure, entries in range, counts.
  const expected = new Uint32Array(pool.chunkCount);
  const seen = new Set<TreeNode>();
  let nodes = 0;
  let mappedChunks = 0;
  const names = new Set<string>();
  for (const v of pool.volumes.values()) {
    const r = v.record;
    const label = `volume ${r.name}`;
    if (names.has(r.name)) report(problems, `${label}: name used twice`);
    names.add(r.name);
    if (r.id >= pool.nextVolumeId) report(problems, `${label}: id ${r.id} not below the next id ${pool.nextVolumeId}`);
    if (r.sizeBytes <= 0 || r.sizeBytes % SECTOR_BYTES !== 0) report(problems, `${label}: size ${r.sizeBytes} is not a positive multiple of ${SECTOR_BYTES}`);
    const chunks = pool.chunksOf(r.sizeBytes);
    if (FANOUT ** v.root.levels < chunks) report(problems, `${label}: map of ${v.root.levels} levels cannot address ${chunks} chunks`);
    let mapped = 0;
    const walk = (node: TreeNode, level: number, base: number): void => {
      const first = !seen.has(node);
      if (first) {
        seen.add(node);
        nodes++;
      }
      const span = FANOUT ** level;
      if (level === 0) {
        if (!(node instanceof Leaf)) {
          report(problems, `${label}: inner node where a leaf belongs (chunks ${base}..)`);
          return;
        }
        let count = 0;
        for (let i = 0; i < FANOUT; i++) {
          const e = node.map[i];
          if (e === 0) continue;
          count++;
          const vc = base + i;
          const p = e - 1;
          if (vc >= chunks) report(problems, `${label}: virtual chunk ${vc} is mapped (to chunk ${p}) but lies past the volume's end (${chunks} chunks)`);
          else mapped++;
          if (p >= pool.chunkCount) report(problems, `${label}: virtual chunk ${vc} maps to chunk ${p}, outside the pool (${pool.chunkCount} chunks)`);
          else if (pool.isMetadataChunk(p)) report(problems, `${label}: virtual chunk ${vc} maps to chunk ${p}, which holds metadata`);
          else if (first) expected[p]++;
        }
        if (count !== node.count) report(problems, `${label}: leaf at chunks ${base}.. counts ${node.count} entries, holds ${count}`);
        return;
      }
      if (!(node instanceof Inner)) {
        report(problems, `${label}: leaf where an inner node belongs (level ${level}, chunks ${base}..)`);
        return;
      }
      let count = 0;
      for (let i = 0; i < FANOUT; i++) {
        const kid = node.kids[i];
        if (kid === undefined) continue;
        count++;
        walk(kid, level - 1, base + i * span);
      }
      if (count !== node.count) report(problems, `${label}: inner node at chunks ${base}.. counts ${node.count} children, holds ${count}`);
    };
    if (v.root.node) walk(v.root.node, v.root.levels - 1, 0);
    if (mapped !== v.mapped) report(problems, `${label}: records ${v.mapped} mapped chunks, its map holds ${mapped}`);
    mappedChunks += mapped;
  }

  // Reference counts and free space: what the pool keeps vs what the maps say.
  for (const p of pool.pendingDecrefs()) if (p < expected.length) expected[p]++;
  let used = 0;
  let meta = 0;
  for (let p = 0; p < pool.chunkCount; p++) {
    const have = pool.refcount(p);
    if (pool.isMetadataChunk(p)) {
      meta++;
      continue;
    }
    if (have !== 0) used++;
    if (have !== expected[p]) report(problems, `chunk ${p}: reference count ${have}, the maps refer to it ${expected[p]} time(s)${have === 0 ? ' (a free chunk in use: it could be handed out twice)' : expected[p] === 0 ? ' (leaked: never freed)' : ''}`);
  }
  const u = pool.usage();
  if (u.usedChunks !== used) report(problems, `pool: counts ${u.usedChunks} used chunks, the table holds ${used}`);
  if (u.metadataChunks !== meta) report(problems, `pool: counts ${u.metadataChunks} metadata chunks, the table holds ${meta}`);
  if (u.usedChunks + u.metadataChunks + u.freeChunks !== pool.chunkCount) report(problems, `pool: used + metadata + free != ${pool.chunkCount} chunks`);
  return { ok: problems.length === 0, problems, notes, volumes: pool.volumes.size, nodes, mappedChunks };
}
