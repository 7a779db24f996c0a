/**
 * A checkpoint's stream (checkpoint.ts) cut into chunk-sized pieces that
 * form a chain in pool chunks: each piece names its generation, its index
 * and the next piece, so a copy is read back only if every piece is of the
 * superblock's generation and the whole stream matches its CRC.
 */
import { CKPT_HEADER, type CheckpointCopy, crc32, decodeCheckpointChunk, encodeCheckpointChunk } from './format.js';
import type { ChunkSpace } from './chunk-space.js';

/** Pieces a stream of `bytes` takes at `chunkSize`. */
export function piecesFor(bytes: number, chunkSize: number): number {
  return Math.max(1, Math.ceil(bytes / (chunkSize - CKPT_HEADER)));
}

/** Write `stream` into the chunks of `chain` (not flushed); the superblock's copy entry for it. */
export async function writeChain(space: ChunkSpace, chain: number[], gen: number, stream: Buffer): Promise<CheckpointCopy> {
  const payload = space.chunkSize - CKPT_HEADER;
  for (let i = 0; i < chain.length; i++) {
    const part = stream.subarray(i * payload, Math.min(stream.length, (i + 1) * payload));
    const next = i + 1 < chain.length ? chain[i + 1] + 1 : 0;
    await space.writeChunk(chain[i], encodeCheckpointChunk(space.chunkSize, gen, i, next, part));
  }
  return { first: chain[0], chunks: chain.length, bytes: stream.length, crc: crc32(stream) };
}

/** Read one copy: its stream and the chunks it occupies; throws saying what is wrong with it. */
export async function readChain(space: ChunkSpace, copy: CheckpointCopy, gen: number): Promise<{ stream: Buffer; chain: number[] }> {
  const parts: Buffer[] = [];
  const chain: number[] = [];
  let chunk = copy.first;
  for (let index = 0; index < copy.chunks; index++) {
    if (chunk < 0 || chunk >= space.totalChunks) throw new Error(`piece ${index} at chunk ${chunk} is outside the pool`);
    const buf = Buffer.alloc(space.chunkSize);
    await space.readChunk(chunk, buf);
    const piece = decodeCheckpointChunk(buf, gen, index);
    if (!piece.ok) throw new Error(`piece ${index} at chunk ${chunk}: ${piece.why}`);
    parts.push(Buffer.from(piece.value.payload));
    chain.push(chunk);
    if (index === copy.chunks - 1) break;
    if (piece.value.next === 0) throw new Error(`chain ends after ${index + 1} of ${copy.chunks} pieces`);
    chunk = piece.value.next - 1;
  }
  const stream = Buffer.concat(parts);
  if (stream.length !== copy.bytes || crc32(stream) !== copy.crc) throw new Error('stream checksum mismatch');
  return { stream, chain };
}
