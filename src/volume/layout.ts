/** Where things lie on one device of a pool, computed the same way at create and extend. */
import { JOURNAL_OFFSET, SECTOR, roundUp } from './format.js';

export const MIN_CHUNK = 4096;
export const MAX_CHUNK = 16 * 1024 * 1024;
export const DEFAULT_CHUNK = 64 * 1024;
/** A device must hold its headers, the journal and at least this many chunks. */
export const MIN_DATA_CHUNKS = 16;
/** Physical chunk numbers are stored as u32 (+1): the pool's address space. */
export const MAX_POOL_CHUNKS = 0xffff_fff0;

export function checkChunkSize(bytes: number): string | undefined {
  if (!Number.isSafeInteger(bytes) || bytes < MIN_CHUNK || bytes > MAX_CHUNK || (bytes & (bytes - 1)) !== 0) {
    return `chunk size ${bytes}: use a power of two from 4K to 16M (default 64K)`;
  }
  return undefined;
}

/** Journal size for a new pool: ~1/256 of its first device, 256 KiB to 8 MiB. */
export function journalBytesFor(deviceSize: number): number {
  return Math.min(8 * 1024 * 1024, Math.max(256 * 1024, roundUp(Math.floor(deviceSize / 256), SECTOR)));
}

export function dataStartFor(journalBytes: number, chunkSize: number): number {
  return roundUp(JOURNAL_OFFSET + journalBytes, Math.max(chunkSize, 1024 * 1024));
}

export function dataChunksFor(deviceSize: number, dataStart: number, chunkSize: number): number {
  return Math.max(0, Math.floor((deviceSize - dataStart) / chunkSize));
}

export function minDeviceBytes(journalBytes: number, chunkSize: number): number {
  return dataStartFor(journalBytes, chunkSize) + MIN_DATA_CHUNKS * chunkSize;
}
