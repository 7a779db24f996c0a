/**
 * Volume operations as users name them (create, resize, snapshot, clone,
 * remove, diff): each checks everything first, changes the in-memory map
 * with no write in flight, and returns only once the change is committed.
 */
import { randomUUID } from 'node:crypto';
import { NotFoundError, UserError } from '../util/errors.js';
import { formatSize } from '../util/size.js';
import type { Pool, VolumeState } from './pool.js';
import type { VolumeRecord } from './format.js';
import { diffRoots, forEachMapped, lookup, setEntry } from './thinmap.js';
import { ThinVolume } from './volume.js';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,126}$/;
/** Volume sizes are whole 512-byte sectors, as block devices are. */
export const SECTOR_BYTES = 512;
/** Virtual chunk numbers are stored as u32. */
const MAX_VIRTUAL_CHUNKS = 0xffff_ffff;

export function checkName(kind: 'pool' | 'volume', name: string): void {
  if (!NAME.test(name)) {
    throw new UserError(`${kind} name "${name}": use letters, digits, '.', '_', '+' or '-' (not first), at most 127 characters`);
  }
}

export function findVolume(pool: Pool, name: string, includeHidden = false): VolumeState {
  const v = pool.volume(name);
  if (!v || (v.record.incomplete && !includeHidden)) throw new NotFoundError(`volume ${pool.name}/${name} does not exist (duet vol list ${pool.name} shows the volumes)`);
  return v;
}

function checkSize(pool: Pool, name: string, size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new UserError(`volume ${pool.name}/${name}: size must be positive`);
  if (size % SECTOR_BYTES !== 0) throw new UserError(`volume ${pool.name}/${name}: size ${size} is not a multiple of the ${SECTOR_BYTES}-byte block size`);
  if (pool.chunksOf(size) > MAX_VIRTUAL_CHUNKS) {
    throw new UserError(`volume ${pool.name}/${name}: ${formatSize(size)} is more than a volume can address with ${formatSize(pool.chunkSize)} chunks`);
  }
}

function checkFree(pool: Pool, name: string): void {
  checkName('volume', name);
  if (pool.volume(name)) throw new UserError(`volume ${pool.name}/${name} already exists`);
}

function newRecord(pool: Pool, name: string, size: number, extra: Partial<VolumeRecord> = {}): VolumeRecord {
  return {
    id: pool.nextVolumeId++,
    name,
    uuid: randomUUID(),
    sizeBytes: size,
    readOnly: false,
    snapshot: false,
    createdAt: new Date().toISOString(),
    ...extra,
  };
}

export async function createVolume(pool: Pool, name: string, size: number, extra: Partial<VolumeRecord> = {}): Promise<VolumeState> {
  writableOrThrow(pool);
  return pool.exclusive(async () => {
    checkFree(pool, name);
    checkSize(pool, name, size);
    pool.apply({ type: 'create', volume: newRecord(pool, name, size, extra) }, true);
    await pool.commit();
    pool.log.info({ event: 'volume-created', pool: pool.name, volume: name, sizeBytes: size }, 'volume created');
    return pool.volume(name)!;
  });
}

/**
 * A read-only snapshot (or with `writable`, a clone) sharing every chunk:
 * O(1) whatever the volume's size, because only the root is shared.
 */
export async function shareVolume(pool: Pool, source: string, name: string, writable: boolean, extra: Partial<VolumeRecord> = {}): Promise<VolumeState> {
  writableOrThrow(pool);
  return pool.exclusive(async () => {
    const src = findVolume(pool, source);
    checkFree(pool, name);
    await pool.quiesced(() => {
      const record = newRecord(pool, name, src.record.sizeBytes, {
        readOnly: !writable,
        snapshot: !writable,
        origin: src.record.uuid,
        ...(src.record.receivedUuid !== undefined ? { receivedUuid: src.record.receivedUuid } : {}),
        ...extra,
      });
      pool.apply({ type: 'share', from: src.record.id, volume: record }, true);
    });
    await pool.commit();
    pool.log.info({ event: writable ? 'volume-cloned' : 'snapshot-created', pool: pool.name, source, volume: name }, writable ? 'clone created' : 'snapshot created');
    return pool.volume(name)!;
  });
}

/** `hidden`: the volume may be one a receive is building (flagged incomplete). */
export async function resizeVolume(pool: Pool, name: string, size: number, force = false, hidden = false): Promise<void> {
  writableOrThrow(pool);
  await pool.exclusive(async () => {
    const v = findVolume(pool, name, hidden);
    checkSize(pool, name, size);
    if (v.record.readOnly) throw new UserError(`volume ${pool.name}/${name} is a read-only snapshot; clone it to change it`);
    const old = v.record.sizeBytes;
    if (size === old) return;
    const cs = pool.chunkSize;
    if (size < old) {
      const keep = pool.chunksOf(size);
      let past = 0;
      forEachMapped(v.root, keep, pool.chunksOf(old), () => past++);
      // The part of the last kept chunk past the new end is dropped too (zeroed when growing).
      let tailData = false;
      if (!force && past === 0 && Math.min(old, keep * cs) > size) {
        const tail = Buffer.alloc(Math.min(old, keep * cs) - size);
        await new ThinVolume(pool, v).read(size, tail);
        tailData = tail.some((b) => b !== 0);
      }
      if ((past > 0 || tailData) && !force) {
        throw new UserError(
          `volume ${pool.name}/${name} has data past ${formatSize(size)} (${tailData ? 'in its last chunk' : `${formatSize(past * cs)} mapped`}); shrinking would drop it: use --force`,
        );
      }
    } else {
      // What a shrink left past the old end inside its last chunk must read as zeros now.
      await new ThinVolume(pool, v).zeroPastEnd();
    }
    await pool.quiesced(() => {
      if (size < old) {
        forEachMappedList(v, pool.chunksOf(size), pool.chunksOf(old)).forEach((c) => {
          const was = setEntry(v.root, c, 0, pool);
          if (was !== 0) {
            pool.decref(was - 1);
            pool.recordMap(v.record.id, c, 0);
            v.mapped--;
          }
        });
      }
      pool.apply({ type: 'resize', id: v.record.id, sizeBytes: size }, true);
    });
    await pool.commit();
    pool.log.info({ event: 'volume-resized', pool: pool.name, volume: name, fromBytes: old, toBytes: size }, 'volume resized');
  });
}

function forEachMappedList(v: VolumeState, from: number, to: number): number[] {
  const list: number[] = [];
  forEachMapped(v.root, from, to, (c) => list.push(c));
  return list;
}

export async function removeVolume(pool: Pool, name: string, inUse?: (name: string) => number): Promise<void> {
  writableOrThrow(pool);
  await pool.exclusive(async () => {
    const v = findVolume(pool, name);
    const users = inUse?.(name) ?? 0;
    if (users > 0) throw new UserError(`volume ${pool.name}/${name} is in use by ${users} NBD connection${users === 1 ? '' : 's'}; disconnect them first`);
    await pool.quiescedCommit(() => pool.apply({ type: 'remove', id: v.record.id }, true));
    pool.log.info({ event: 'volume-removed', pool: pool.name, volume: name }, 'volume removed');
  });
}

export interface Range {
  offset: number;
  length: number;
}

/**
 * Byte ranges (chunk-aligned, sorted, merged) where NEW differs from OLD,
 * from the maps alone: shared subtrees are skipped unopened.
 */
export function diffVolumes(pool: Pool, oldName: string, newName: string): Range[] {
  const a = findVolume(pool, oldName);
  const b = findVolume(pool, newName);
  return diffStates(pool, a, b);
}

export function diffStates(pool: Pool, a: VolumeState, b: VolumeState): Range[] {
  const cs = pool.chunkSize;
  const chunks = Math.max(pool.chunksOf(a.record.sizeBytes), pool.chunksOf(b.record.sizeBytes));
  const changed: number[] = [];
  diffRoots(a.root, b.root, chunks, (v) => changed.push(v));
  // Sizes differ and the smaller ends inside a chunk: past that end one side
  // has bytes the other lacks (a shrink leaves the tail in place until a grow
  // zeroes it), so that chunk differs even when both map it the same.
  const small = Math.min(a.record.sizeBytes, b.record.sizeBytes);
  const edge = Math.floor(small / cs);
  if (a.record.sizeBytes !== b.record.sizeBytes && small % cs !== 0 && (lookup(a.root, edge) !== 0 || lookup(b.root, edge) !== 0)) {
    const at = changed.findIndex((v) => v >= edge);
    if (at < 0) changed.push(edge);
    else if (changed[at] !== edge) changed.splice(at, 0, edge);
  }
  const ranges: Range[] = [];
  for (const v of changed) {
    const last = ranges[ranges.length - 1];
    if (last && last.offset + last.length === v * cs) last.length += cs;
    else ranges.push({ offset: v * cs, length: cs });
  }
  return ranges;
}

function writableOrThrow(pool: Pool): void {
  if (pool.readOnly) throw new Error(`pool ${pool.name} is open read-only`);
  if (pool.failure !== undefined) {
    throw new UserError(`pool ${pool.name} refuses changes after a failed metadata commit (${pool.failure}); fix the device, then restart what serves it`);
  }
}
