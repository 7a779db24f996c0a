/**
 * A device joining a pool, at create or by extend: checked before anything
 * is written, given its entry (where its chunks start, how many), and for
 * extend, the change the commit pump makes durable with one checkpoint.
 */
import { randomUUID } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { UserError } from '../util/errors.js';
import type { ChunkAllocator } from './allocator.js';
import type { ChunkSpace } from './chunk-space.js';
import type { MetadataChange } from './commit-pump.js';
import { type DeviceEntry, SUPERBLOCK_BYTES, hasPoolMagic } from './format.js';
import { dataChunksFor, dataStartFor, minDeviceBytes } from './layout.js';
import { readBestSuperblock } from './superblock.js';

/** The pool a device would join, when it exists already (extend). */
export interface JoiningPool {
  uuid: string;
  devices: DeviceEntry[];
}

/**
 * A device may join a pool only if it is writable, big enough and not in a
 * pool already. One exception: a device an interrupted extend of this very
 * pool left a superblock on, which the pool does not list (its superblock
 * goes first, see writeSuperblocks): nothing the pool committed refers to
 * it. Returns true for such a left-over device.
 */
export async function checkNewDevice(pool: string, dev: BlockDevice, journalBytes: number, chunkSize: number, joining?: JoiningPool): Promise<boolean> {
  if (dev.capabilities.readOnly) throw new UserError(`${dev.name}: read-only; a pool device must be writable`);
  const min = minDeviceBytes(journalBytes, chunkSize);
  if (dev.size < min) throw new UserError(`${dev.name}: too small for pool ${pool} (${dev.size} bytes; needs at least ${min})`);
  const sb = await readBestSuperblock(dev);
  if (sb) {
    if (joining && sb.poolUuid === joining.uuid && !joining.devices.some((e) => e.uuid === sb.deviceUuid)) return true;
    throw new UserError(`${dev.name} already belongs to pool ${sb.pool} (${sb.poolUuid}); wipe its first 8 KiB if that pool is gone`);
  }
  const head = Buffer.alloc(SUPERBLOCK_BYTES);
  await dev.read(0, head);
  if (hasPoolMagic(head)) throw new UserError(`${dev.name} carries a damaged duet pool superblock; wipe its first 8 KiB if you mean to reuse it`);
  return false;
}

export function newDeviceEntry(dev: BlockDevice, journalBytes: number, chunkSize: number): DeviceEntry {
  const dataStart = dataStartFor(journalBytes, chunkSize);
  return { uuid: randomUUID(), sizeBytes: dev.size, dataStart, chunks: dataChunksFor(dev.size, dataStart, chunkSize) };
}

/** The device joins the address space and the chunk table; undone if its checkpoint fails. */
export function joinChange(space: ChunkSpace, alloc: ChunkAllocator, device: BlockDevice, entry: DeviceEntry): MetadataChange {
  let shrink: (() => void) | undefined;
  return {
    apply() {
      space.append(device, entry);
      shrink = alloc.grow(entry.chunks);
    },
    undo() {
      shrink?.();
      space.dropLast();
    },
  };
}
