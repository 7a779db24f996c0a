/**
 * Frames of the peer link after the handshake (link-auth.ts) and keepalive
 * (link.ts): the state exchange, replicated writes and their acks, flushes,
 * resync and verify. Binary headers for the data path, JSON for state.
 *
 * Writes carry a sequence number; the link is one TCP stream, so frames
 * arrive in the order they were sent, and the receiver applies writes that
 * overlap in that order (write ordering across the link). A FLUSH is a
 * barrier: the peer acknowledges it only after every earlier write is on
 * its disk and its disk has been flushed.
 */
import type { DiskState, GenerationIds } from './meta.js';

export const F_STATE = 20;
export const F_BITMAP = 21;
export const F_BITMAP_DONE = 22;
/** u64 seq | u64 offset | u32 flags | u32 length | payload (WRITE only) */
export const F_WRITE = 30;
export const F_ACK_RECV = 31;
/** u64 seq | u32 status (0 ok, else errno-like code index) */
export const F_ACK_WRITE = 32;
export const F_FLUSH = 33;
export const F_FLUSH_ACK = 34;
/** u64 seq | u64 offset | u32 length */
export const F_READ = 35;
/** u64 seq | u32 status | payload */
export const F_READ_REPLY = 36;
/** u64 offset | u32 flags | u32 length | payload: resync data pushed by the sync source */
export const F_RS_DATA = 40;
/** u64 offset | u32 length: written on the target */
export const F_RS_ACK = 41;
/** u64 offset | u32 length | 32-byte digest: "do you have exactly this?" */
export const F_RS_CSUM = 42;
/** u64 offset | u32 length | u8 same */
export const F_RS_CSUM_REPLY = 43;
/** JSON: the source finished; the target takes these generation ids */
export const F_RS_DONE = 44;
/** u64 offset | u32 length | 32-byte digest */
export const F_VERIFY = 50;
/** u64 offset | u32 length | u8 same */
export const F_VERIFY_REPLY = 51;
/** JSON {reason}: the sender refuses to go on (split brain, unrelated data...) */
export const F_REFUSE = 60;
/** The Primary is about to go on without the receiver (an admin disconnect): its copy is Outdated from now on. */
export const F_OUTDATE = 61;

export const WF_FUA = 1;
export const WF_ZERO = 2;
export const WF_TRIM = 4;

export type Role = 'Primary' | 'Secondary';

/** What each side tells the other on connect and whenever it changes. */
export interface PeerState {
  node: string;
  role: Role;
  disk: DiskState;
  gi: GenerationIds;
  dataBytes: number;
  /** Blocks this side changed since the generations diverged (for split-brain policies and status). */
  outOfSyncBytes: number;
  /** When this side last became Primary (ms since epoch; discard-younger-primary). */
  primarySince: number;
  /** Set while this side is mid-handshake: its bitmap follows. */
  sendingBitmap?: boolean;
  /** This side was Primary when it crashed: its hot extents are suspect, its copy wins them. */
  crashedPrimary?: boolean;
  /** A manual split-brain resolution asked on this side: the node whose data stays. */
  keep?: string;
  /** This disk must be overwritten whole before it is good (new or failed). */
  fullSyncNeeded?: boolean;
  /** This side kept the data while the peer's disk failed: the peer's disk gets a full sync. */
  peerDiskFailed?: boolean;
  /** A pool is open on this side's data. */
  inUse?: boolean;
}

export function encodeJson(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}

export function decodeJson<T>(payload: Buffer): T {
  return JSON.parse(payload.toString('utf8')) as T;
}

export const WRITE_HEADER = 24;

export function encodeWrite(seq: number, offset: number, flags: number, length: number, data?: Buffer): Buffer[] {
  const h = Buffer.allocUnsafe(WRITE_HEADER);
  h.writeBigUInt64BE(BigInt(seq), 0);
  h.writeBigUInt64BE(BigInt(offset), 8);
  h.writeUInt32BE(flags, 16);
  h.writeUInt32BE(length, 20);
  return data ? [h, data] : [h];
}

export interface WriteFrame {
  seq: number;
  offset: number;
  flags: number;
  length: number;
  data: Buffer | undefined;
}

export function decodeWrite(p: Buffer): WriteFrame {
  if (p.length < WRITE_HEADER) throw new Error('short write frame');
  const flags = p.readUInt32BE(16);
  const length = p.readUInt32BE(20);
  const isData = (flags & (WF_ZERO | WF_TRIM)) === 0;
  if (isData && p.length !== WRITE_HEADER + length) throw new Error('write frame length mismatch');
  return {
    seq: Number(p.readBigUInt64BE(0)),
    offset: Number(p.readBigUInt64BE(8)),
    flags,
    length,
    data: isData ? p.subarray(WRITE_HEADER) : undefined,
  };
}

export function encodeSeq(seq: number, status = 0): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeBigUInt64BE(BigInt(seq), 0);
  b.writeUInt32BE(status, 8);
  return b;
}

export function decodeSeq(p: Buffer): { seq: number; status: number } {
  if (p.length < 12) throw new Error('short ack frame');
  return { seq: Number(p.readBigUInt64BE(0)), status: p.readUInt32BE(8) };
}

/** u64 offset | u32 length | rest */
export function encodeRange(offset: number, length: number, ...rest: Buffer[]): Buffer {
  const h = Buffer.allocUnsafe(12);
  h.writeBigUInt64BE(BigInt(offset), 0);
  h.writeUInt32BE(length, 8);
  return rest.length === 0 ? h : Buffer.concat([h, ...rest]);
}

export function decodeRange(p: Buffer): { offset: number; length: number; rest: Buffer } {
  if (p.length < 12) throw new Error('short range frame');
  return { offset: Number(p.readBigUInt64BE(0)), length: p.readUInt32BE(8), rest: p.subarray(12) };
}

/** Bitmap runs: pairs of u64 offset, u64 length. */
export function encodeRuns(runs: { offset: number; length: number }[]): Buffer {
  const b = Buffer.allocUnsafe(runs.length * 16);
  // Two 32-bit halves per u64 (exact to 2^53): a BigInt per number costs ~10x more, and a fragmented bitmap has millions of runs.
  for (let i = 0; i < runs.length; i++) {
    writeU64(b, runs[i].offset, i * 16);
    writeU64(b, runs[i].length, i * 16 + 8);
  }
  return b;
}

export function decodeRuns(p: Buffer): { offset: number; length: number }[] {
  if (p.length % 16 !== 0) throw new Error('bitmap frame is not whole runs');
  const runs = [];
  for (let i = 0; i < p.length; i += 16) runs.push({ offset: readU64(p, i), length: readU64(p, i + 8) });
  return runs;
}

function writeU64(b: Buffer, n: number, at: number): void {
  b.writeUInt32BE(Math.floor(n / 2 ** 32), at);
  b.writeUInt32BE(n % 2 ** 32, at + 4);
}

function readU64(b: Buffer, at: number): number {
  const hi = b.readUInt32BE(at);
  if (hi >= 2 ** 21) throw new Error('bitmap run past 2^53');
  return hi * 2 ** 32 + b.readUInt32BE(at + 4);
}

export const ERROR_CODES = ['OK', 'EIO', 'ENOSPC', 'EPERM', 'EINVAL', 'ENOTSUP', 'ENOMEM', 'ESHUTDOWN', 'EOVERFLOW'] as const;
