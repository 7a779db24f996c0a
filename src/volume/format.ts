/**
 * The on-disk format of a pool (docs/volume-format.md draws it).
 *
 * Every device of a pool starts with:
 *
 *   0      superblock slot 0   (4 KiB)
 *   4 KiB  superblock slot 1   (4 KiB)   written alternately: seq % 2
 *   8 KiB  journal             (journalBytes, the same on every device)
 *   dataStart                  chunks of chunkSize up to the end
 *
 * The superblock names the pool, this device, every device of the pool, and
 * where the current checkpoint (the whole metadata, serialized into pool
 * chunks, two copies) lies. The journal holds the commits made since that
 * checkpoint. A crash at any point leaves a valid superblock with the old
 * or the new checkpoint, plus a journal whose valid prefix is replayed.
 *
 * Checksums are CRC-32 (zlib's, native in Node); every structure has a
 * magic, a version and a sequence number.
 */
import { crc32 } from 'node:zlib';

export const FORMAT_VERSION = 1;
export const SECTOR = 4096;
export const SUPERBLOCK_BYTES = 4096;
export const SUPERBLOCK_SLOTS = 2;
export const JOURNAL_OFFSET = SUPERBLOCK_BYTES * SUPERBLOCK_SLOTS;

export const SB_MAGIC = Buffer.from('DUETPOOL');
export const JOURNAL_MAGIC = Buffer.from('DUETJRNL');
export const CKPT_MAGIC = Buffer.from('DUETCKPT');

export interface DeviceEntry {
  uuid: string;
  sizeBytes: number;
  dataStart: number;
  chunks: number;
}

export interface CheckpointCopy {
  /** First chunk of the chain (0-based pool chunk). */
  first: number;
  chunks: number;
  bytes: number;
  crc: number;
}

export interface SuperblockBody {
  pool: string;
  poolUuid: string;
  deviceUuid: string;
  deviceIndex: number;
  chunkSize: number;
  journalBytes: number;
  /** Checkpoint generation; journal records carry it so old ones are ignored. */
  gen: number;
  devices: DeviceEntry[];
  checkpoint: CheckpointCopy[];
  createdAt: string;
}

export interface Superblock extends SuperblockBody {
  seq: number;
}

/* Superblock: magic(8) version u32 flags u32 seq u64 bodyLen u32 crc u32 | JSON body. */
const SB_HEADER = 32;

export function encodeSuperblock(sb: Superblock): Buffer {
  const { seq, ...body } = sb;
  const json = Buffer.from(JSON.stringify(body));
  if (json.length > SUPERBLOCK_BYTES - SB_HEADER) {
    throw new Error(`pool ${sb.pool}: too many devices for one superblock`);
  }
  const buf = Buffer.alloc(SUPERBLOCK_BYTES);
  SB_MAGIC.copy(buf, 0);
  buf.writeUInt32LE(FORMAT_VERSION, 8);
  buf.writeUInt32LE(0, 12);
  buf.writeBigUInt64LE(BigInt(seq), 16);
  buf.writeUInt32LE(json.length, 24);
  json.copy(buf, SB_HEADER);
  buf.writeUInt32LE(crc32(buf.subarray(SB_HEADER, SB_HEADER + json.length), crc32(buf.subarray(0, 28))), 28);
  return buf;
}

export type Decoded<T> = { ok: true; value: T } | { ok: false; why: string };

/** Does this block start with our magic at all (device belongs to some pool)? */
export function hasPoolMagic(buf: Buffer): boolean {
  return buf.length >= 8 && buf.subarray(0, 8).equals(SB_MAGIC);
}

export function decodeSuperblock(buf: Buffer): Decoded<Superblock> {
  if (!hasPoolMagic(buf)) return { ok: false, why: 'no pool magic' };
  const version = buf.readUInt32LE(8);
  if (version !== FORMAT_VERSION) return { ok: false, why: `format version ${version}, this duet reads ${FORMAT_VERSION}` };
  const len = buf.readUInt32LE(24);
  if (len > SUPERBLOCK_BYTES - SB_HEADER) return { ok: false, why: 'body length out of range' };
  const crc = crc32(buf.subarray(SB_HEADER, SB_HEADER + len), crc32(buf.subarray(0, 28)));
  if (crc !== buf.readUInt32LE(28)) return { ok: false, why: 'checksum mismatch' };
  try {
    const body = JSON.parse(buf.subarray(SB_HEADER, SB_HEADER + len).toString('utf8')) as SuperblockBody;
    return { ok: true, value: { ...body, seq: Number(buf.readBigUInt64LE(16)) } };
  } catch {
    return { ok: false, why: 'unreadable body' };
  }
}

/* ---------------------------------------------------------------- journal */

/**
 * One commit = one journal record: header(32) + ops, padded to 4 KiB.
 * magic(8) gen u64 seq u64 len u32 crc u32. A torn record fails its
 * checksum and ends the replay: that commit was never acknowledged.
 */
export const JOURNAL_HEADER = 32;

export const OP_MAP = 1;
export const OP_ADMIN = 2;

export type JournalOp =
  | { kind: 'map'; vol: number; v: number; entry: number }
  | { kind: 'admin'; action: AdminAction };

/** Metadata changes other than mappings, journaled as small JSON objects. */
export type AdminAction =
  | { type: 'create'; volume: VolumeRecord }
  | { type: 'share'; from: number; volume: VolumeRecord }
  | { type: 'remove'; id: number }
  | { type: 'resize'; id: number; sizeBytes: number }
  | { type: 'set'; id: number; fields: VolumeFields }
  | { type: 'swap'; id: number; with: number };

export interface VolumeRecord {
  id: number;
  name: string;
  uuid: string;
  sizeBytes: number;
  readOnly: boolean;
  snapshot: boolean;
  /** uuid of the volume this one was snapshotted or cloned from. */
  origin?: string;
  createdAt: string;
  /** Set by `vol receive`: the sent snapshot this volume now equals; cleared by the first write. */
  receivedUuid?: string;
  /** A receive in progress: removed at open if the receiver died. */
  incomplete?: boolean;
}

/** Fields `set` may change; null removes an optional field. */
export interface VolumeFields {
  name?: string;
  readOnly?: boolean;
  receivedUuid?: string | null;
  incomplete?: boolean | null;
}

export function encodeOps(ops: JournalOp[]): Buffer {
  let size = 0;
  const admin: Buffer[] = [];
  for (const op of ops) {
    if (op.kind === 'map') size += 13;
    else {
      const json = Buffer.from(JSON.stringify(op.action));
      admin.push(json);
      size += 5 + json.length;
    }
  }
  const buf = Buffer.allocUnsafe(size);
  let at = 0;
  let a = 0;
  for (const op of ops) {
    if (op.kind === 'map') {
      buf[at] = OP_MAP;
      buf.writeUInt32LE(op.vol, at + 1);
      buf.writeUInt32LE(op.v, at + 5);
      buf.writeUInt32LE(op.entry, at + 9);
      at += 13;
    } else {
      const json = admin[a++];
      buf[at] = OP_ADMIN;
      buf.writeUInt32LE(json.length, at + 1);
      json.copy(buf, at + 5);
      at += 5 + json.length;
    }
  }
  return buf;
}

export function decodeOps(buf: Buffer): JournalOp[] {
  const ops: JournalOp[] = [];
  let at = 0;
  while (at < buf.length) {
    const kind = buf[at];
    if (kind === OP_MAP && at + 13 <= buf.length) {
      ops.push({ kind: 'map', vol: buf.readUInt32LE(at + 1), v: buf.readUInt32LE(at + 5), entry: buf.readUInt32LE(at + 9) });
      at += 13;
    } else if (kind === OP_ADMIN && at + 5 <= buf.length) {
      const len = buf.readUInt32LE(at + 1);
      if (at + 5 + len > buf.length) throw new Error('journal: admin op runs past its record');
      ops.push({ kind: 'admin', action: JSON.parse(buf.subarray(at + 5, at + 5 + len).toString('utf8')) as AdminAction });
      at += 5 + len;
    } else {
      throw new Error(`journal: unknown op ${kind} at ${at}`);
    }
  }
  return ops;
}

export function encodeJournalRecord(gen: number, seq: number, payload: Buffer): Buffer {
  const total = roundUp(JOURNAL_HEADER + payload.length, SECTOR);
  const buf = Buffer.alloc(total);
  JOURNAL_MAGIC.copy(buf, 0);
  buf.writeBigUInt64LE(BigInt(gen), 8);
  buf.writeBigUInt64LE(BigInt(seq), 16);
  buf.writeUInt32LE(payload.length, 24);
  payload.copy(buf, JOURNAL_HEADER);
  buf.writeUInt32LE(crc32(payload, crc32(buf.subarray(0, 28))), 28);
  return buf;
}

export interface JournalHeader {
  gen: number;
  seq: number;
  payloadLength: number;
  /** Bytes the record takes on disk (header + payload, padded). */
  recordBytes: number;
}

export function decodeJournalHeader(buf: Buffer): JournalHeader | undefined {
  if (buf.length < JOURNAL_HEADER || !buf.subarray(0, 8).equals(JOURNAL_MAGIC)) return undefined;
  const payloadLength = buf.readUInt32LE(24);
  return {
    gen: Number(buf.readBigUInt64LE(8)),
    seq: Number(buf.readBigUInt64LE(16)),
    payloadLength,
    recordBytes: roundUp(JOURNAL_HEADER + payloadLength, SECTOR),
  };
}

export function journalPayloadValid(record: Buffer, header: JournalHeader): boolean {
  const payload = record.subarray(JOURNAL_HEADER, JOURNAL_HEADER + header.payloadLength);
  return crc32(payload, crc32(record.subarray(0, 28))) === record.readUInt32LE(28);
}

/* ------------------------------------------------------- checkpoint chain */

/**
 * A checkpoint is one byte stream cut into pool chunks that form a chain:
 * each chunk = header(32) + payload. magic(8) gen u64 index u32 next u32
 * (next chunk + 1, 0 = last) len u32 crc u32.
 */
export const CKPT_HEADER = 32;

export function encodeCheckpointChunk(chunkSize: number, gen: number, index: number, next: number, payload: Buffer): Buffer {
  const buf = Buffer.alloc(chunkSize);
  CKPT_MAGIC.copy(buf, 0);
  buf.writeBigUInt64LE(BigInt(gen), 8);
  buf.writeUInt32LE(index, 16);
  buf.writeUInt32LE(next, 20);
  buf.writeUInt32LE(payload.length, 24);
  payload.copy(buf, CKPT_HEADER);
  buf.writeUInt32LE(crc32(payload, crc32(buf.subarray(0, 28))), 28);
  return buf;
}

export function decodeCheckpointChunk(buf: Buffer, gen: number, index: number): Decoded<{ next: number; payload: Buffer }> {
  if (!buf.subarray(0, 8).equals(CKPT_MAGIC)) return { ok: false, why: 'no checkpoint magic' };
  if (Number(buf.readBigUInt64LE(8)) !== gen) return { ok: false, why: `generation ${buf.readBigUInt64LE(8)}, expected ${gen}` };
  if (buf.readUInt32LE(16) !== index) return { ok: false, why: `piece ${buf.readUInt32LE(16)}, expected ${index}` };
  const len = buf.readUInt32LE(24);
  if (len > buf.length - CKPT_HEADER) return { ok: false, why: 'length out of range' };
  const payload = buf.subarray(CKPT_HEADER, CKPT_HEADER + len);
  if (crc32(payload, crc32(buf.subarray(0, 28))) !== buf.readUInt32LE(28)) return { ok: false, why: 'checksum mismatch' };
  return { ok: true, value: { next: buf.readUInt32LE(20), payload } };
}

export function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

export { crc32 };
