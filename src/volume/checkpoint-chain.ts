/**
 * A checkpoint's stream (checkpoint.ts) cut into chunk-sized pieces that
 * form a chain in pool chunks: each piece names its generation, its index
 * and the next piece, so a copy is read back only if every piece is of the
 * superblock's generation and the whole stream matches its CRC.
 */
import { CKPT_HEADER, type CheckpointCopy, crc32, decodeCheckpointChunk, encodeCheckpointChunk } from './format.js';
import type { ChunkSpace } from './chunk-space.js';
import { Slicer } from '../util/slice.js';

/** Pieces a stream of `bytes` takes at `chunkSize`. */
export function piecesFor(bytes: number, chunkSize: number): number {
  return Math.max(1, Math.ceil(bytes / (chunkSize - CKPT_HEADER)));
}

/**
 * Write the stream (its parts, in order) into the chunks of `chain` (not
 * flushed); the superblock's copy entry for it. The CRC of the whole
 * stream is carried piece by piece, so no step touches all of it at once,
 * and the event loop gets a turn between pieces (a device that writes
 * synchronously would run the whole chain as one task).
 */
export async function writeChain(space: ChunkSpace, chain: number[], gen: number, parts: Buffer[]): Promise<CheckpointCopy> {
  const payload = space.chunkSize - CKPT_HEADER;
  const stream = new PartReader(parts);
  let crc = 0;
  const slicer = new Slicer();
  for (let i = 0; i < chain.length; i++) {
    const pause = slicer.due();
    if (pause) await pause;
    const part = stream.take(payload);
    crc = crc32(part, crc);
    const next = i + 1 < chain.length ? chain[i + 1] + 1 : 0;
    await space.writeChunk(chain[i], encodeCheckpointChunk(space.chunkSize, gen, i, next, part));
  }
  return { first: chain[0], chunks: chain.length, bytes: stream.bytes, crc };
}

/** Bytes of a list of buffers. */
export function bytesOf(parts: Buffer[]): number {
  return parts.reduce((n, p) => n + p.length, 0);
}

/** Reads a list of buffers front to back as one stream. */
class PartReader {
  readonly bytes: number;
  private part = 0;
  private at = 0;

  constructor(private readonly parts: Buffer[]) {
    this.bytes = bytesOf(parts);
  }

  /** The next `n` bytes (fewer at the end), copied only when they span parts. */
  take(n: number): Buffer {
    const pieces: Buffer[] = [];
    let want = n;
    while (want > 0 && this.part < this.parts.length) {
      const p = this.parts[this.part];
      const k = Math.min(want, p.length - this.at);
      pieces.push(p.subarray(this.at, this.at + k));
      this.at += k;
      want -= k;
      if (this.at === p.length) {
        this.part++;
        this.at = 0;
      }
    }
    return pieces.length === 1 ? pieces[0] : Buffer.concat(pieces);
  }
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
