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
 *
 * Everything a peer sends is checked here before it is used, even though
 * the peer has proved it knows the cluster secret: a bug or a bad build on
 * the other node must not write into the metadata after the data area,
 * allocate what it likes, or be taken as data. Offsets and lengths lie in
 * the data area, sizes are what the protocol allows, lists have a cap, JSON
 * has a schema. A frame that breaks a rule throws a ProtocolError; the
 * session drops that link and the node serves on.
 */
import { z } from 'zod';
import { BLOCK } from './bitmap.js';
import { diskStateSchema, generationIdsSchema, giSchema, DiskState, GenerationIds } from './meta.js';

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
/**
 * u64 offset | u32 length: a Secondary's verify asks the Primary to send a
 * VERIFY for this piece. The Primary's application writes order the link, so
 * only digests read in that order (and compared in the receiver's apply
 * order) never take a write in flight for a difference. Sent only to a peer
 * whose hello lists FEATURE_VERIFY_ASK.
 */
export const F_VERIFY_ASK = 52;
/**
 * u64 offset | u32 length | u8 why: "no verdict on this piece", the answer
 * to a VERIFY_ASK or a VERIFY in place of VERIFY or VERIFY_REPLY; the verify
 * stops with that error instead of counting the piece as different or not.
 * Why: NO_VERDICT_UNREADABLE (my disk failed) or NO_VERDICT_ROLES (I became
 * Primary since the digests were read: my writes since are not in them).
 * Sent only to a peer that lists FEATURE_VERIFY_ASK (an older build gets a
 * VERIFY_REPLY with every block different, as before).
 */
export const F_VERIFY_NO_VERDICT = 53;
export const NO_VERDICT_UNREADABLE = 0;
export const NO_VERDICT_ROLES = 1;
/** JSON {reason}: the sender refuses to go on (split brain, unrelated data...) */
export const F_REFUSE = 60;
/** The Primary is about to go on without the receiver (an admin disconnect): its copy is Outdated from now on. */
export const F_OUTDATE = 61;
/**
 * "May this node become Primary?" (DRBD's cluster-wide state change): a node
 * connected to its peer is promoted only once the peer agreed, so two
 * promotions racing over the link (or over a partition neither side has
 * noticed yet) cannot both succeed.
 */
export const F_PROMOTE = 62;
/** JSON {granted, reason?}: the answer to F_PROMOTE. */
export const F_PROMOTE_REPLY = 63;

export const WF_FUA = 1;
export const WF_ZERO = 2;
export const WF_TRIM = 4;

export type Role = 'Primary' | 'Secondary';

/* ----------------------------------------------------------------- limits */

/** Largest data payload of one WRITE or READ frame (the link's frame cap is a little above). */
export const MAX_DATA_PIECE = 1024 * 1024;
/** Largest payload of one resync data frame (the source reads and sends pieces of this size). */
export const RESYNC_PIECE = 256 * 1024;
/** Largest range one resync "zero this" frame covers (a hole the source found). */
export const RESYNC_ZERO_MAX = 64 * 1024 * 1024;
/** Bytes of the digest in a checksum-based resync request (SHA-256). */
export const RESYNC_DIGEST = 32;
/** Bytes one verify request covers at most. */
export const VERIFY_PIECE = 256 * 1024;
/** Bytes of one 4 KiB block's digest in a verify request (SHA-256, truncated). */
export const VERIFY_DIGEST = 16;
/** A verify answer: one bit per block of a whole verify piece, set where the blocks differ. */
export const VERIFY_REPLY_BYTES = VERIFY_PIECE / BLOCK / 8;
/**
 * Bitmap runs in one BITMAP frame. The total is bounded by the data size:
 * runs come in order, block-aligned, none empty or overlapping, so there are
 * at most as many as the data area has blocks.
 */
export const MAX_RUNS_PER_FRAME = 4096;
/** Largest JSON frame (a state, a refusal, resync done): a few hundred bytes in practice. */
export const MAX_JSON_FRAME = 8 * 1024;
/** Longest node name taken from the peer (its own, or the node a split-brain resolution keeps). */
export const MAX_NAME = 255;
/** Longest refusal reason taken from the peer (it is logged). */
export const MAX_REASON = 1024;

/** A frame from the peer that breaks the protocol: the session logs it and drops that link. */
export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

const FRAME_NAMES: Record<number, string> = {
  [F_STATE]: 'STATE',
  [F_BITMAP]: 'BITMAP',
  [F_BITMAP_DONE]: 'BITMAP_DONE',
  [F_WRITE]: 'WRITE',
  [F_ACK_RECV]: 'ACK_RECV',
  [F_ACK_WRITE]: 'ACK_WRITE',
  [F_FLUSH]: 'FLUSH',
  [F_FLUSH_ACK]: 'FLUSH_ACK',
  [F_READ]: 'READ',
  [F_READ_REPLY]: 'READ_REPLY',
  [F_RS_DATA]: 'RS_DATA',
  [F_RS_ACK]: 'RS_ACK',
  [F_RS_CSUM]: 'RS_CSUM',
  [F_RS_CSUM_REPLY]: 'RS_CSUM_REPLY',
  [F_RS_DONE]: 'RS_DONE',
  [F_VERIFY]: 'VERIFY',
  [F_VERIFY_REPLY]: 'VERIFY_REPLY',
  [F_VERIFY_ASK]: 'VERIFY_ASK',
  [F_VERIFY_NO_VERDICT]: 'VERIFY_NO_VERDICT',
  [F_REFUSE]: 'REFUSE',
  [F_OUTDATE]: 'OUTDATE',
  [F_PROMOTE]: 'PROMOTE',
  [F_PROMOTE_REPLY]: 'PROMOTE_REPLY',
};

/** The frame's name for logs ("WRITE"), or "type N" for a type this node does not know. */
export function frameName(type: number): string {
  return FRAME_NAMES[type] ?? `type ${type}`;
}

/* ------------------------------------------------------------------- JSON */

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
  peerDiskFailedGi?: string;
  peerDiskFailedFrom?: string[];
  /** A pool is open on this side's data. */
  inUse?: boolean;
  /** This side holds writes until the witness answers (no quorum): a Diskless Primary's writes here wait too. */
  suspended?: boolean;
}

const count = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const nodeName = z.string().min(1).max(MAX_NAME);

/** Every field of PeerState, checked by the compiler: a field added there and not here does not build. */
const peerStateShape = {
  node: nodeName,
  role: z.enum(['Primary', 'Secondary']),
  disk: diskStateSchema,
  gi: generationIdsSchema,
  dataBytes: count,
  outOfSyncBytes: count,
  primarySince: count,
  sendingBitmap: z.boolean().optional(),
  crashedPrimary: z.boolean().optional(),
  keep: nodeName.optional(),
  fullSyncNeeded: z.boolean().optional(),
  peerDiskFailed: z.boolean().optional(),
  peerDiskFailedGi: giSchema.optional(),
  peerDiskFailedFrom: z.array(giSchema).max(3).optional(),
  inUse: z.boolean().optional(),
  suspended: z.boolean().optional(),
} satisfies Record<keyof PeerState, z.ZodTypeAny>;

// Strict: a field this node does not know is a peer of another protocol. So a release that adds a field
// (as `suspended` was, before any release) raises LINK_PROTOCOL (link-auth.ts), and the hello refuses the
// mix by name instead of each state frame dropping the link.
export const peerStateSchema: z.ZodType<PeerState> = z.object(peerStateShape).strict();

export const refuseSchema = z.object({ reason: z.string().max(MAX_REASON) }).strict();
export const promoteReplySchema = z.object({ granted: z.boolean(), reason: z.string().max(MAX_REASON).optional() }).strict();
export const resyncDoneSchema = z.object({ gi: generationIdsSchema }).strict();

export function encodeJson(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}

/** A JSON frame of the shape `schema` says, at most MAX_JSON_FRAME bytes. */
export function decodeJson<T>(payload: Buffer, schema: z.ZodType<T>, what: string): T {
  if (payload.length > MAX_JSON_FRAME) throw new ProtocolError(`${what} of ${payload.length} bytes (at most ${MAX_JSON_FRAME})`);
  let value: unknown;
  try {
    value = JSON.parse(payload.toString('utf8'));
  } catch {
    throw new ProtocolError(`${what} is not JSON`);
  }
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ProtocolError(`${what}: ${issue.path.join('.') || 'value'}: ${issue.message}`);
  }
  return parsed.data;
}

/** The peer's state; it must speak for the node that authenticated the link. */
export function decodeState(payload: Buffer, peerNode: string): PeerState {
  const s = decodeJson(payload, peerStateSchema, 'state');
  if (s.node !== peerNode) throw new ProtocolError(`state of node ${s.node} on the link of ${peerNode}`);
  return s;
}

/* ----------------------------------------------------------------- binary */

/** A frame that carries nothing (BITMAP_DONE, OUTDATE). */
export function expectEmpty(p: Buffer, what: string): void {
  if (p.length !== 0) throw new ProtocolError(`${what} with ${p.length} bytes of payload (none expected)`);
}

/** A u64 that is a safe integer (offsets, sequence numbers): above 2^53 a Number is not exact. */
function safeU64(p: Buffer, at: number, what: string): number {
  const v = p.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`${what} ${v} is past 2^53`);
  return Number(v);
}

/** [offset, offset+length) lies in the data area: never the activity log, bitmap or record after it. */
function inData(offset: number, length: number, dataBytes: number, what: string): void {
  if (offset > dataBytes || length > dataBytes - offset) throw new ProtocolError(`${what} ${offset}+${length} is outside the ${dataBytes}-byte data area`);
}

function exactly(p: Buffer, n: number, what: string): void {
  if (p.length !== n) throw new ProtocolError(`${what} of ${p.length} bytes (${n} expected)`);
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

/**
 * A replicated write: data (at most MAX_DATA_PIECE, exactly as long as it
 * says; zero bytes is a write of nothing, as a BlockDevice allows) or a
 * zeroing (ZERO, with TRIM if it may punch a hole; no payload, at least one
 * byte), inside the data area, known flags only.
 */
export function decodeWrite(p: Buffer, dataBytes: number): WriteFrame {
  if (p.length < WRITE_HEADER) throw new ProtocolError(`write frame of ${p.length} bytes, shorter than its header`);
  const seq = safeU64(p, 0, 'write sequence number');
  const offset = safeU64(p, 8, 'write offset');
  const flags = p.readUInt32BE(16);
  const length = p.readUInt32BE(20);
  if ((flags & ~(WF_FUA | WF_ZERO | WF_TRIM)) !== 0) throw new ProtocolError(`write with unknown flags ${flags.toString(16)}`);
  if ((flags & (WF_ZERO | WF_TRIM)) === WF_TRIM) throw new ProtocolError('trim without the zero flag');
  const isData = (flags & WF_ZERO) === 0;
  if (isData) {
    if (length > MAX_DATA_PIECE) throw new ProtocolError(`write of ${length} bytes (at most ${MAX_DATA_PIECE} in one frame)`);
    if (p.length !== WRITE_HEADER + length) throw new ProtocolError(`write of ${length} bytes carrying ${p.length - WRITE_HEADER}`);
  } else {
    if (length === 0) throw new ProtocolError('zeroing of no bytes');
    if (p.length !== WRITE_HEADER) throw new ProtocolError(`zeroing carrying ${p.length - WRITE_HEADER} bytes of data`);
  }
  inData(offset, length, dataBytes, 'write');
  return { seq, offset, flags, length, data: isData ? p.subarray(WRITE_HEADER) : undefined };
}

export function encodeSeq(seq: number, status = 0): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeBigUInt64BE(BigInt(seq), 0);
  b.writeUInt32BE(status, 8);
  return b;
}

/** u64 seq | u32 status: exactly 12 bytes, a status this protocol knows. */
export function decodeSeq(p: Buffer, what: string): { seq: number; status: number } {
  exactly(p, 12, what);
  const status = p.readUInt32BE(8);
  if (status >= ERROR_CODES.length) throw new ProtocolError(`${what} with unknown status ${status}`);
  return { seq: safeU64(p, 0, `${what} sequence number`), status };
}

/** u64 seq | u64 offset | u32 length: a read for a Diskless Primary, in the data area, at most one piece. */
export function decodeRead(p: Buffer, dataBytes: number): { seq: number; offset: number; length: number } {
  exactly(p, 20, 'read request');
  const seq = safeU64(p, 0, 'read sequence number');
  const offset = safeU64(p, 8, 'read offset');
  const length = p.readUInt32BE(16);
  if (length === 0 || length > MAX_DATA_PIECE) throw new ProtocolError(`read of ${length} bytes (1..${MAX_DATA_PIECE})`);
  inData(offset, length, dataBytes, 'read');
  return { seq, offset, length };
}

/** u64 seq | u32 status | data (status 0) or nothing: the caller checks the length against what it asked. */
export function decodeReadReply(p: Buffer): { seq: number; status: number; data: Buffer } {
  if (p.length < 12) throw new ProtocolError(`read reply of ${p.length} bytes, shorter than its header`);
  const status = p.readUInt32BE(8);
  if (status >= ERROR_CODES.length) throw new ProtocolError(`read reply with unknown status ${status}`);
  const data = p.subarray(12);
  if (status !== 0 && data.length !== 0) throw new ProtocolError('failed read reply carrying data');
  return { seq: safeU64(p, 0, 'read reply sequence number'), status, data };
}

/** u64 offset | u32 length | rest */
export function encodeRange(offset: number, length: number, ...rest: Buffer[]): Buffer {
  const h = Buffer.allocUnsafe(12);
  h.writeBigUInt64BE(BigInt(offset), 0);
  h.writeUInt32BE(length, 8);
  return rest.length === 0 ? h : Buffer.concat([h, ...rest]);
}

/** u64 offset | u32 length | rest: a range of 1..maxLength bytes in the data area. */
export function decodeRange(p: Buffer, dataBytes: number, maxLength: number, what: string): { offset: number; length: number; rest: Buffer } {
  if (p.length < 12) throw new ProtocolError(`${what} of ${p.length} bytes, shorter than its header`);
  const offset = safeU64(p, 0, `${what} offset`);
  const length = p.readUInt32BE(8);
  if (length === 0 || length > maxLength) throw new ProtocolError(`${what} of ${length} bytes (1..${maxLength})`);
  inData(offset, length, dataBytes, what);
  return { offset, length, rest: p.subarray(12) };
}

/** Resync data: u32 flags (0 = data, at most RESYNC_PIECE; WF_ZERO = zero the range, at most RESYNC_ZERO_MAX) | data. */
export function decodeResyncData(p: Buffer, dataBytes: number): { offset: number; length: number; zero: boolean; data: Buffer } {
  const { offset, length, rest } = decodeRange(p, dataBytes, RESYNC_ZERO_MAX, 'resync data');
  if (rest.length < 4) throw new ProtocolError('resync data without its flags');
  const flags = rest.readUInt32BE(0);
  if (flags !== 0 && flags !== WF_ZERO) throw new ProtocolError(`resync data with flags ${flags.toString(16)}`);
  const data = rest.subarray(4);
  if (flags === WF_ZERO) {
    if (data.length !== 0) throw new ProtocolError(`resync zeroing carrying ${data.length} bytes of data`);
  } else {
    if (length > RESYNC_PIECE) throw new ProtocolError(`resync data of ${length} bytes (at most ${RESYNC_PIECE})`);
    if (data.length !== length) throw new ProtocolError(`resync data of ${length} bytes carrying ${data.length}`);
  }
  return { offset, length, zero: flags === WF_ZERO, data };
}

/** "Do you have exactly this?": a piece and its SHA-256. */
export function decodeResyncChecksum(p: Buffer, dataBytes: number): { offset: number; length: number; digest: Buffer } {
  const { offset, length, rest } = decodeRange(p, dataBytes, RESYNC_PIECE, 'resync checksum');
  exactly(rest, RESYNC_DIGEST, 'resync checksum digest');
  return { offset, length, digest: rest };
}

/** The target wrote a piece: its range, nothing more. */
export function decodeResyncAck(p: Buffer, dataBytes: number): { offset: number; length: number } {
  const { offset, length, rest } = decodeRange(p, dataBytes, RESYNC_ZERO_MAX, 'resync ack');
  expectEmpty(rest, 'resync ack');
  return { offset, length };
}

/** The target's answer to a checksum: one byte, 1 = it has exactly those bytes, 0 = send them. */
export function decodeResyncChecksumReply(p: Buffer, dataBytes: number): { offset: number; length: number; same: boolean } {
  const { offset, length, rest } = decodeRange(p, dataBytes, RESYNC_PIECE, 'resync checksum answer');
  if (rest.length !== 1 || rest[0] > 1) throw new ProtocolError('resync checksum answer is not one byte 0 or 1');
  return { offset, length, same: rest[0] === 1 };
}

/** A verify request: a piece and one VERIFY_DIGEST per 4 KiB block of it. */
export function decodeVerify(p: Buffer, dataBytes: number): { offset: number; length: number; digests: Buffer } {
  const { offset, length, rest } = decodeRange(p, dataBytes, VERIFY_PIECE, 'verify request');
  exactly(rest, Math.ceil(length / BLOCK) * VERIFY_DIGEST, 'verify digests');
  return { offset, length, digests: rest };
}

/** A verify piece asked of the Primary: a whole piece, nothing more. */
export function decodeVerifyAsk(p: Buffer, dataBytes: number): { offset: number; length: number } {
  const { offset, length, rest } = decodeRange(p, dataBytes, VERIFY_PIECE, 'verify ask');
  expectEmpty(rest, 'verify ask');
  return wholePiece(offset, length, dataBytes, 'verify ask');
}

/** No verdict on a verify piece: the piece and one byte saying why. */
export function decodeVerifyNoVerdict(p: Buffer, dataBytes: number): { offset: number; length: number; why: number } {
  const { offset, length, rest } = decodeRange(p, dataBytes, VERIFY_PIECE, 'verify no-verdict');
  if (rest.length !== 1 || rest[0] > NO_VERDICT_ROLES) throw new ProtocolError('verify no-verdict without a known reason byte');
  return { ...wholePiece(offset, length, dataBytes, 'verify no-verdict'), why: rest[0] };
}

function wholePiece(offset: number, length: number, dataBytes: number, what: string): { offset: number; length: number } {
  if (offset % VERIFY_PIECE !== 0 || length !== Math.min(VERIFY_PIECE, dataBytes - offset)) throw new ProtocolError(`${what} for ${offset}+${length}, not a verify piece`);
  return { offset, length };
}

/** A verify answer: the piece asked and VERIFY_REPLY_BYTES of "differs" bits. */
export function decodeVerifyReply(p: Buffer, dataBytes: number): { offset: number; length: number; differs: Buffer } {
  const { offset, length, rest } = decodeRange(p, dataBytes, VERIFY_PIECE, 'verify answer');
  exactly(rest, VERIFY_REPLY_BYTES, 'verify answer bits');
  return { offset, length, differs: rest };
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

/**
 * At most MAX_RUNS_PER_FRAME runs, each of whole blocks inside the data area,
 * in order and not overlapping, starting at or after `after` (where the
 * previous frame's runs ended): so all the runs of one handshake together are
 * at most one per block of the data area.
 */
export function decodeRuns(p: Buffer, dataBytes: number, after = 0): { offset: number; length: number }[] {
  if (p.length % 16 !== 0) throw new ProtocolError('bitmap frame is not whole runs');
  if (p.length / 16 > MAX_RUNS_PER_FRAME) throw new ProtocolError(`bitmap frame of ${p.length / 16} runs (at most ${MAX_RUNS_PER_FRAME})`);
  const runs = [];
  let end = after;
  for (let i = 0; i < p.length; i += 16) {
    const offset = safeU64(p, i, 'bitmap run offset');
    const length = safeU64(p, i + 8, 'bitmap run length');
    if (length === 0 || offset % BLOCK !== 0 || length % BLOCK !== 0) throw new ProtocolError(`bitmap run ${offset}+${length} is not whole blocks`);
    if (offset < end) throw new ProtocolError(`bitmap run at ${offset} overlaps or precedes the run before it (ending at ${end})`);
    inData(offset, length, dataBytes, 'bitmap run');
    end = offset + length;
    runs.push({ offset, length });
  }
  return runs;
}

function writeU64(b: Buffer, n: number, at: number): void {
  b.writeUInt32BE(Math.floor(n / 2 ** 32), at);
  b.writeUInt32BE(n % 2 ** 32, at + 4);
}


export const ERROR_CODES = ['OK', 'EIO', 'ENOSPC', 'EPERM', 'EINVAL', 'ENOTSUP', 'ENOMEM', 'ESHUTDOWN', 'EOVERFLOW'] as const;
