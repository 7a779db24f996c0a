/**
 * Split brain: both nodes wrote since their last common generation. Nothing
 * is merged silently. The resource's policy may pick a side automatically
 * (DRBD's after-sb-0pri policies), or an admin picks one with
 * `resource resolve RES --keep NODE`; otherwise both stay StandAlone.
 *
 * Before the losing side's blocks are overwritten, every block the resync
 * will overwrite there is saved to a file on that node, so a resolution can
 * be inspected and undone (`duet resource restore-blocks FILE`).
 *
 * Both sides compute the outcome from the same inputs (their own and the
 * peer's state), so they always agree on who is source and who is target.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Resource } from './resource.js';
import type { PeerState } from './wire.js';

export function resolveSplitBrain(r: Resource, peer: PeerState, peerNode: string): 'source' | 'target' | 'disconnect' {
  const policy = r.options.afterSplitBrain ?? 'disconnect';
  const local = r.bitmap.outOfSyncBytes;
  const remote = peer.outOfSyncBytes;
  r.splitBrain = {
    detectedAt: new Date().toISOString(),
    policy,
    localChangedBytes: local,
    peerChangedBytes: remote,
    resolution: null,
    savedTo: null,
  };
  r.log.error(
    { event: 'split-brain', resource: r.name, peer: peerNode, policy, localChangedBytes: local, peerChangedBytes: remote },
    `resource ${r.name}: split brain with ${peerNode} (${local} bytes changed here, ${remote} there)`,
  );
  const outcome = choose(r, peer, peerNode, policy, local, remote);
  // A Primary keeps serving its data: it can never be the side that is overwritten.
  if (outcome === 'target' && r.role === 'Primary') return 'disconnect';
  if (outcome === 'source' && peer.role === 'Primary') return 'disconnect';
  if (outcome !== 'disconnect') r.keepNode = undefined;
  return outcome;
}

function choose(r: Resource, peer: PeerState, peerNode: string, policy: string, local: number, remote: number): 'source' | 'target' | 'disconnect' {
  if (r.keepNode && peer.keep && r.keepNode !== peer.keep) return 'disconnect';
  const keep = r.keepNode ?? peer.keep;
  if (keep === r.node) return 'source';
  if (keep === peerNode) return 'target';
  const younger = (): 'source' | 'target' | 'disconnect' =>
    r.record.primarySince === peer.primarySince ? 'disconnect' : r.record.primarySince > peer.primarySince ? 'target' : 'source';
  switch (policy) {
    case 'discard-zero-changes':
      if (local === 0 && remote > 0) return 'target';
      if (remote === 0 && local > 0) return 'source';
      return 'disconnect';
    case 'discard-least-changes':
      if (local !== remote) return local < remote ? 'target' : 'source';
      return younger();
    case 'discard-younger-primary':
      return younger();
    default:
      return 'disconnect';
  }
}

/**
 * Save the blocks a resync is about to overwrite on this node (its whole
 * out-of-sync set, both sides' changes) to a file:
 * one JSON header line, then the bytes of each range in order.
 */
export async function saveBlocks(r: Resource, peerNode: string): Promise<string | undefined> {
  const dev = r.backing;
  if (!dev) return undefined;
  const dir = r.options.splitBrainDir ?? path.join(os.tmpdir(), 'duet-split-brain');
  fs.mkdirSync(dir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const file = path.join(dir, `${r.name}-${r.node}-${stamp}.blocks`);
  const ranges = [...r.bitmap.runs()];
  const header = {
    format: 'duet-split-brain-blocks-v1',
    resource: r.name,
    node: r.node,
    peer: peerNode,
    generation: r.record.gi,
    savedAt: new Date().toISOString(),
    bytes: ranges.reduce((n, x) => n + x.length, 0),
    ranges,
  };
  const fd = fs.openSync(file, 'wx', 0o600);
  try {
    fs.writeSync(fd, `${JSON.stringify(header)}\n`);
    const piece = Buffer.allocUnsafe(1024 * 1024);
    for (const range of ranges) {
      for (let done = 0; done < range.length; ) {
        const n = Math.min(piece.length, range.length - done);
        const view = piece.subarray(0, n);
        await dev.read(range.offset + done, view);
        fs.writeSync(fd, view);
        done += n;
      }
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  if (r.splitBrain) r.splitBrain.savedTo = file;
  r.log.warn({ event: 'split-brain-saved', resource: r.name, file, bytes: header.bytes }, `resource ${r.name}: saved ${header.bytes} bytes this node is about to lose to ${file}`);
  return file;
}

/** Read a saved-blocks file: its header and an iterator over its ranges' bytes. */
export function readSavedBlocks(file: string): { header: { resource: string; node: string; ranges: { offset: number; length: number }[]; bytes: number }; dataOffset: number } {
  const fd = fs.openSync(file, 'r');
  try {
    const head = Buffer.alloc(1024 * 1024);
    const n = fs.readSync(fd, head, 0, head.length, 0);
    const nl = head.subarray(0, n).indexOf(0x0a);
    if (nl < 0) throw new Error(`${file}: not a duet split-brain blocks file`);
    const header = JSON.parse(head.subarray(0, nl).toString('utf8')) as { format: string; resource: string; node: string; ranges: { offset: number; length: number }[]; bytes: number };
    if (header.format !== 'duet-split-brain-blocks-v1') throw new Error(`${file}: not a duet split-brain blocks file`);
    return { header, dataOffset: nl + 1 };
  } finally {
    fs.closeSync(fd);
  }
}
