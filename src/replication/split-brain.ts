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
import fsp, { type FileHandle } from 'node:fs/promises';
import { asyncFileIo } from '../util/file-io.js';
import os from 'node:os';
import path from 'node:path';
import type { Resource } from './resource.js';
import type { Bitmap } from './bitmap.js';
import { UserError } from '../util/errors.js';
import { BlockDeviceError } from '../blockdev/types.js';
import { Slicer } from '../util/slice.js';
import { subtract } from '../util/ranges.js';

/** Ranges written to the header per write, and bytes of data per read and write. */
const HEADER_RANGES_PER_WRITE = 4096;
const PIECE_BYTES = 1024 * 1024;
/** A header line longer than this is not one of ours. */
const HEADER_BYTES_MAX = 64 * 1024 * 1024;

/**
 * Save the blocks a resync is about to overwrite on this node (its whole
 * out-of-sync set, both sides' changes; or `blocks`, this node's own
 * changes when a full sync overwrites every block) to a file:
 * one JSON header line, then the bytes of each range in order.
 * Asynchronous, in bounded pieces (the header's ranges 4096 at a time, the
 * data 1 MiB at a time, a turn of the event loop every few milliseconds):
 * the set may be millions of ranges or a whole disk, and the peer links
 * must keep answering meanwhile.
 */
export async function saveBlocks(r: Resource, peerNode: string, blocks: Bitmap = r.bitmap, failedDisk = false): Promise<string | undefined> {
  const dev = r.backing;
  if (!dev) return undefined;
  const dir = r.options.splitBrainDir ?? path.join(os.tmpdir(), 'duet-split-brain');
  const io = r.options.fileIo ?? asyncFileIo;
  await io.mkdir(dir);
  const now = new Date(r.clock.now());
  const stamp = now.toISOString().replace(/[:.]/g, '-');
  const file = path.join(dir, `${r.name}-${r.node}-${stamp}.blocks`);
  const ranges: { offset: number; length: number }[] = [];
  for await (const batch of blocks.runBatches(HEADER_RANGES_PER_WRITE, 0, r.options.clock)) ranges.push(...batch);
  const header = {
    format: 'duet-split-brain-blocks-v1',
    resource: r.name,
    node: r.node,
    peer: peerNode,
    generation: r.record.gi,
    savedAt: now.toISOString(),
    bytes: ranges.reduce((n, x) => n + x.length, 0),
  };
  const slicer = new Slicer(r.options.clock);
  /** Blocks of a failed disk that could not be read (zeros in the file). */
  const unreadable: { offset: number; length: number }[] = [];
  const fh = await io.create(file, 0o600);
  try {
    // JSON.stringify({...header, ranges}) written a piece at a time (ranges is the last key).
    const head = JSON.stringify(header);
    await fh.write(Buffer.from(`${head.slice(0, -1)},"ranges":[`));
    for (let i = 0; i < ranges.length; i += HEADER_RANGES_PER_WRITE) {
      const part = JSON.stringify(ranges.slice(i, i + HEADER_RANGES_PER_WRITE)).slice(1, -1);
      await fh.write(Buffer.from(i === 0 ? part : `,${part}`));
      const pause = slicer.due();
      if (pause) await pause;
    }
    await fh.write(Buffer.from(']}\n'));
    const piece = Buffer.allocUnsafe(PIECE_BYTES);
    for (const range of ranges) {
      for (let done = 0; done < range.length; ) {
        const n = Math.min(piece.length, range.length - done);
        const view = piece.subarray(0, n);
        // Detached meanwhile (another I/O error): every read fails from now on, and a file of zeros would
        // claim to hold this node's changes.
        if (r.backing !== dev) throw new Error(`${dev.name} was detached while its blocks were saved`);
        if (failedDisk) await readWhatCanBe(dev, range.offset + done, view, unreadable);
        else await dev.read(range.offset + done, view);
        await fh.write(view);
        done += n;
        const pause = slicer.due();
        if (pause) await pause;
      }
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  if (unreadable.length > 0) {
    // Beside the file: restore-blocks leaves these blocks alone (their data was lost with the disk's sectors).
    const side = await io.create(`${file}.unreadable`, 0o600);
    try {
      await side.write(Buffer.from(`${JSON.stringify({ format: 'duet-split-brain-unreadable-v1', ranges: unreadable })}\n`));
      await side.sync();
    } finally {
      await side.close();
    }
    r.log.error(
      { event: 'split-brain-unreadable', resource: r.name, file, ranges: unreadable.length, bytes: unreadable.reduce((n, x) => n + x.length, 0) },
      `resource ${r.name}: ${unreadable.length} ranges of the failed disk could not be read: zeros in ${file}, listed in ${file}.unreadable`,
    );
  }
  // The file's entry too: without it a power cut can lose the whole file after the resync overwrote the blocks.
  await io.syncDir(dir);
  if (r.splitBrain) r.splitBrain.savedTo = file;
  r.log.warn({ event: 'split-brain-saved', resource: r.name, file, bytes: header.bytes }, `resource ${r.name}: saved ${header.bytes} bytes this node is about to lose to ${file}`);
  return file;
}

/**
 * Read [offset, offset+into.length) of a failed disk: what cannot be read,
 * 4 KiB block by block, is left as zeros and listed in `unreadable`. Its
 * full sync rewrites those sectors (a disk remaps a bad sector on a write),
 * so a failed disk's bad sectors must not keep it from ever getting one.
 */
async function readWhatCanBe(dev: { read(offset: number, into: Buffer): unknown }, offset: number, into: Buffer, unreadable: { offset: number; length: number }[]): Promise<void> {
  try {
    await dev.read(offset, into);
    return;
  } catch (err) {
    if (!(err instanceof BlockDeviceError)) throw err;
  }
  for (let at = 0; at < into.length; at += UNREADABLE_BLOCK) {
    const part = into.subarray(at, Math.min(at + UNREADABLE_BLOCK, into.length));
    try {
      await dev.read(offset + at, part);
    } catch (err) {
      if (!(err instanceof BlockDeviceError)) throw err;
      part.fill(0);
      const last = unreadable[unreadable.length - 1];
      if (last && last.offset + last.length === offset + at) last.length += part.length;
      else unreadable.push({ offset: offset + at, length: part.length });
    }
  }
}

const UNREADABLE_BLOCK = 4096;

/** The blocks a failed disk could not give when its blocks were saved (restore-blocks leaves them alone). */
async function unreadableOf(file: string): Promise<{ offset: number; length: number }[]> {
  let text: string;
  try {
    text = await fsp.readFile(`${file}.unreadable`, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new UserError(`${file}.unreadable: cannot read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  try {
    const parsed = JSON.parse(text) as { format?: string; ranges?: { offset: number; length: number }[] };
    if (parsed.format === 'duet-split-brain-unreadable-v1' && Array.isArray(parsed.ranges) && parsed.ranges.every((x) => Number.isSafeInteger(x.offset) && Number.isSafeInteger(x.length))) return parsed.ranges;
  } catch {
    /* reported below */
  }
  throw new UserError(`${file}.unreadable: not a list of unreadable blocks: move it away to restore every block`);
}

/**
 * Put saved blocks back (undo a split-brain resolution on the node that
 * lost): every range of the file is written to `dev` (the resource, Primary
 * here, so the peer gets them too). The file's checks come first: its
 * format, its resource, and that its ranges fit the device.
 */
export async function restoreBlocks(file: string, resource: string, dev: { size: number; write(offset: number, data: Buffer): unknown }): Promise<{ ranges: number; bytes: number }> {
  let fh: FileHandle;
  try {
    fh = await fsp.open(file, 'r');
  } catch (err) {
    throw new UserError(`${file}: cannot open (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  try {
    const size = (await fh.stat()).size;
    // The header line, read a piece at a time up to its newline (at most HEADER_BYTES_MAX).
    const pieces: Buffer[] = [];
    let nl = -1;
    for (let at = 0; nl < 0 && at < Math.min(size, HEADER_BYTES_MAX); ) {
      const buf = Buffer.alloc(Math.min(PIECE_BYTES, HEADER_BYTES_MAX - at));
      const { bytesRead } = await fh.read(buf, 0, buf.length, at);
      if (bytesRead === 0) break;
      const i = buf.subarray(0, bytesRead).indexOf(0x0a);
      if (i >= 0) nl = at + i;
      pieces.push(buf.subarray(0, i >= 0 ? i : bytesRead));
      at += bytesRead;
    }
    let header: { format?: string; resource?: string; ranges?: { offset: number; length: number }[] } = {};
    try {
      header = nl > 0 ? (JSON.parse(Buffer.concat(pieces).toString('utf8')) as typeof header) : {};
    } catch {
      /* reported below */
    }
    if (header.format !== 'duet-split-brain-blocks-v1' || !Array.isArray(header.ranges)) throw new UserError(`${file}: not a duet split-brain blocks file`);
    if (header.resource !== resource) throw new UserError(`${file}: holds blocks of resource ${String(header.resource)}, not ${resource}`);
    const total = header.ranges.reduce((sum, r) => sum + r.length, 0);
    if (size !== nl + 1 + total) throw new UserError(`${file}: truncated or damaged (${size} bytes, expected ${nl + 1 + total})`);
    for (const r of header.ranges) if (r.offset < 0 || r.offset + r.length > dev.size) throw new UserError(`${file}: range ${r.offset}+${r.length} is outside resource ${resource}`);
    const skip = await unreadableOf(file);
    let pos = nl + 1;
    const piece = Buffer.allocUnsafe(PIECE_BYTES);
    const slicer = new Slicer();
    for (const r of header.ranges) {
      for (let done = 0; done < r.length; ) {
        const len = Math.min(piece.length, r.length - done);
        for (let got = 0; got < len; ) {
          const { bytesRead } = await fh.read(piece, got, len - got, pos + got);
          if (bytesRead === 0) throw new UserError(`${file}: truncated or damaged (ends at ${pos + got})`);
          got += bytesRead;
        }
        for (const [from, to] of subtract(r.offset + done, r.offset + done + len, skip.map((x): [number, number] => [x.offset, x.offset + x.length]))) {
          await dev.write(from, Buffer.from(piece.subarray(from - (r.offset + done), to - (r.offset + done))));
        }
        pos += len;
        done += len;
        const pause = slicer.due();
        if (pause) await pause;
      }
    }
    return { ranges: header.ranges.length, bytes: total };
  } finally {
    await fh.close();
  }
}

