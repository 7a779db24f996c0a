/**
 * Opening a pool: find its devices and the newest superblock among them,
 * read its checkpoint (either copy), and replay the journal records of the
 * checkpoint's generation on top.
 */
import type { BlockDevice } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { deserializeCheckpoint } from './checkpoint.js';
import { readChain } from './checkpoint-chain.js';
import { type ChunkSpace, type PoolDevice, placeDevices } from './chunk-space.js';
import type { Committed } from './commit-pump.js';
import type { Superblock } from './format.js';
import { readJournal } from './journal.js';
import { readBestSuperblock } from './superblock.js';
import type { VolumeTable } from './volume-table.js';

/** The pool cannot be opened because its metadata is damaged (pool check reports it as damage, exit 1). */
export class PoolDamaged extends UserError {}

export interface Located {
  /** The newest superblock: the pool's state. */
  superblock: Superblock;
  /** The pool's devices, in the superblock's order. */
  devices: PoolDevice[];
  /** Disagreements a writable open fixes with a fresh checkpoint. */
  repairs: string[];
}

/** Find the pool among `devices` (any order). `expectUuid`, from the home registry, guards against a disk swapped behind our back. */
export async function locatePool(name: string, devices: BlockDevice[], expectUuid?: string): Promise<Located> {
  const found: { dev: BlockDevice; sb: Superblock }[] = [];
  for (const dev of devices) {
    const sb = await readBestSuperblock(dev);
    if (!sb) throw new PoolDamaged(`pool ${name}: ${dev.name} has no readable pool superblock (not a duet pool device, or both copies damaged)`);
    if (expectUuid && sb.poolUuid !== expectUuid) {
      throw new UserError(`pool ${name}: ${dev.name} belongs to pool ${sb.pool} (${sb.poolUuid}), not to this one`);
    }
    found.push({ dev, sb });
  }
  const uuid = expectUuid ?? found[0].sb.poolUuid;
  const stranger = found.find((f) => f.sb.poolUuid !== uuid);
  if (stranger) throw new UserError(`pool ${name}: ${stranger.dev.name} belongs to pool ${stranger.sb.pool}, not to this one`);
  // The newest superblock on any device is the pool's state; it lists the devices.
  const best = found.reduce((a, b) => (b.sb.seq > a.sb.seq ? b : a)).sb;
  const ordered: BlockDevice[] = [];
  const repairs: string[] = [];
  for (const entry of best.devices) {
    const f = found.find((m) => m.sb.deviceUuid === entry.uuid);
    if (!f) throw new UserError(`pool ${name}: device ${entry.uuid} (${entry.sizeBytes} bytes) is missing; attach it and name it in the pool`);
    if (f.dev.size < entry.sizeBytes) throw new UserError(`pool ${name}: ${f.dev.name} is smaller (${f.dev.size} bytes) than when it joined the pool (${entry.sizeBytes})`);
    if (f.sb.seq !== best.seq) repairs.push('a device missed the last superblock update');
    ordered.push(f.dev);
  }
  return { superblock: { ...best, deviceUuid: '', deviceIndex: 0 }, devices: placeDevices(ordered, best.devices), repairs: [...new Set(repairs)] };
}

export interface Loaded {
  committed: Committed;
  /** Damage that did not stop the open (a bad copy, an unreadable journal): check reports it. */
  problems: string[];
  repairs: string[];
}

/** Read the committed metadata of `superblock` into `table`. */
export async function loadMetadata(name: string, log: Logger, superblock: Superblock, space: ChunkSpace, table: VolumeTable, journalBytes: number): Promise<Loaded> {
  const problems: string[] = [];
  const repairs: string[] = [];
  const errors: string[] = [];
  let stream: Buffer | undefined;
  const checkpointChunks: number[] = [];
  // Read every copy: the good one gives the state, and all of them must be
  // kept off the allocator until the next checkpoint replaces them.
  for (const [i, copy] of superblock.checkpoint.entries()) {
    try {
      const read = await readChain(space, copy, superblock.gen);
      stream ??= read.stream;
      checkpointChunks.push(...read.chain);
    } catch (err) {
      errors.push(`copy ${i + 1}: ${(err as Error).message}`);
    }
  }
  if (!stream) throw new PoolDamaged(`pool ${name}: metadata checkpoint unreadable (${errors.join('; ')}); run duet pool check ${name}`);
  if (errors.length > 0) {
    for (const e of errors) problems.push(`checkpoint ${e}`);
    repairs.push('a checkpoint copy is damaged');
    log.warn({ event: 'checkpoint-copy-damaged', pool: name, errors }, 'a checkpoint copy is damaged; the other one was used');
  }
  table.load(deserializeCheckpoint(stream));
  const journal = await readJournal(space.devices, journalBytes, superblock.gen);
  for (const u of journal.unreadable) {
    problems.push(`journal on ${u.device} unreadable: ${u.why}`);
    log.warn({ event: 'journal-unreadable', pool: name, device: u.device, err: u.why }, 'journal unreadable on one device');
  }
  if (journal.disagree) repairs.push('the devices hold journals of different lengths');
  // Replay without reference accounting: the counts are rebuilt from the result.
  for (const ops of journal.records) for (const op of ops) table.replay(op);
  return {
    committed: { superblock, checkpointChunks, journalBytesUsed: journal.bytes, journalRecords: journal.records.length },
    problems,
    repairs,
  };
}
