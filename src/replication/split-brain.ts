/**
 * Split brain: both nodes wrote since their last common generation. Nothing
 * is merged silently. The resource's policy may pick a side automatically
 * (DRBD's after-sb-0pri policies), or an admin picks one with
 * `resource resolve RES --keep NODE`; otherwise both stay StandAlone. Who
 * wins is part of the decision on connect (connect-decision.ts).
 *
 * Before the losing side's blocks are overwritten, every block the resync
 * will overwrite there is saved to a file on that node (format in
 * docs/replication.md), so a resolution can be inspected and undone.
 *
 * Both sides compute the outcome from the same inputs (their own and the
 * peer's state), so they always agree on who is source and who is target.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Resource } from './resource.js';
import { UserError } from '../util/errors.js';

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
  const now = new Date(r.clock.now());
  const stamp = now.toISOString().replace(/[:.]/g, '-');
  const file = path.join(dir, `${r.name}-${r.node}-${stamp}.blocks`);
  const ranges = [...r.bitmap.runs()];
  const header = {
    format: 'duet-split-brain-blocks-v1',
    resource: r.name,
    node: r.node,
    peer: peerNode,
    generation: r.record.gi,
    savedAt: now.toISOString(),
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

/**
 * Put saved blocks back (undo a split-brain resolution on the node that
 * lost): every range of the file is written to `dev` (the resource, Primary
 * here, so the peer gets them too). The file's checks come first: its
 * format, its resource, and that its ranges fit the device.
 */
export async function restoreBlocks(file: string, resource: string, dev: { size: number; write(offset: number, data: Buffer): unknown }): Promise<{ ranges: number; bytes: number }> {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    throw new UserError(`${file}: cannot open (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  try {
    const head = Buffer.alloc(Math.min(64 * 1024 * 1024, fs.fstatSync(fd).size));
    const n = fs.readSync(fd, head, 0, head.length, 0);
    const nl = head.subarray(0, n).indexOf(0x0a);
    let header: { format?: string; resource?: string; ranges?: { offset: number; length: number }[] } = {};
    try {
      header = nl > 0 ? (JSON.parse(head.subarray(0, nl).toString('utf8')) as typeof header) : {};
    } catch {
      /* reported below */
    }
    if (header.format !== 'duet-split-brain-blocks-v1' || !Array.isArray(header.ranges)) throw new UserError(`${file}: not a duet split-brain blocks file`);
    if (header.resource !== resource) throw new UserError(`${file}: holds blocks of resource ${String(header.resource)}, not ${resource}`);
    const total = header.ranges.reduce((sum, r) => sum + r.length, 0);
    if (fs.fstatSync(fd).size !== nl + 1 + total) throw new UserError(`${file}: truncated or damaged (${fs.fstatSync(fd).size} bytes, expected ${nl + 1 + total})`);
    for (const r of header.ranges) if (r.offset < 0 || r.offset + r.length > dev.size) throw new UserError(`${file}: range ${r.offset}+${r.length} is outside resource ${resource}`);
    let pos = nl + 1;
    const piece = Buffer.allocUnsafe(1024 * 1024);
    for (const r of header.ranges) {
      for (let done = 0; done < r.length; ) {
        const len = Math.min(piece.length, r.length - done);
        fs.readSync(fd, piece, 0, len, pos);
        await dev.write(r.offset + done, Buffer.from(piece.subarray(0, len)));
        pos += len;
        done += len;
      }
    }
    return { ranges: header.ranges.length, bytes: total };
  } finally {
    fs.closeSync(fd);
  }
}
