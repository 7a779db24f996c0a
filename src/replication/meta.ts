/**
 * Replication metadata of one resource on one node, kept *inside* the
 * backing device, at its end (DRBD's "internal meta-data"), so the data
 * area is the device minus this tail:
 *
 *   0 .. dataBytes                    the replicated data (the pool lives here)
 *   dataBytes ..                      activity log (alBytes)
 *   .. + alBytes                      out-of-sync bitmap (Bitmap.bytesFor(dataBytes))
 *   last 8 KiB                        metadata record, two 4 KiB slots (seq % 2)
 *
 * The record holds what decides who has the good data after any outage:
 * the generation identifiers (current, bitmap, history; DRBD's UUIDs), the
 * disk state and the role flags. It is written to the other slot with a
 * higher sequence number, FUA, so a crash leaves the old or the new record.
 */
import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { z } from 'zod';
import type { BlockDevice } from '../blockdev/types.js';
import { Bitmap } from './bitmap.js';

export const META_MAGIC = Buffer.from('DUETREPL');
export const META_VERSION = 1;
const SLOT = 4096;
const HEADER = 32;
/** Default activity log: 64 slots of 4 MiB extents, each a 4 KiB transaction page. */
export const DEFAULT_AL_BYTES = 256 * 1024;
const ALIGN = 1024 * 1024;

export type DiskState = 'UpToDate' | 'Inconsistent' | 'Outdated' | 'Diskless' | 'Failed';

export const diskStateSchema = z.enum(['UpToDate', 'Inconsistent', 'Outdated', 'Diskless', 'Failed']);

/** A generation identifier: 64 random bits, as 16 hex digits ("0" means none). */
export type Gi = string;

export const giSchema = z.string().regex(/^(0|[0-9a-f]{16})$/, 'is not a generation identifier (16 hex digits, or 0)');

export interface GenerationIds {
  /** Changes when the data starts to diverge from what the peer may have (e.g. a Primary writes unconnected). */
  current: Gi;
  /** The current GI at the moment the bitmap started recording (0 when the bitmap is clear). */
  bitmap: Gi;
  /** Earlier current GIs, newest first (two kept, as DRBD). */
  history: [Gi, Gi];
}

export const generationIdsSchema = z.object({ current: giSchema, bitmap: giSchema, history: z.tuple([giSchema, giSchema]) }).strict();

export interface MetaRecord {
  resource: string;
  node: string;
  dataBytes: number;
  alBytes: number;
  gi: GenerationIds;
  disk: DiskState;
  /** Was Primary when last shut down or crashed: activity log extents must be resynced. */
  primary: boolean;
  /** Full sync needed on the next connect (new or replaced disk). */
  fullSyncNeeded: boolean;
  /** When this node last became Primary (ms since epoch; 0 never): discard-younger-primary. */
  primarySince: number;
  /** Peer marked Outdated by this Primary (it went on writing without it). */
  peerOutdated: boolean;
  /** The peer's disk failed (or went away) while this node kept the data: the peer's disk gets a full sync. */
  peerDiskFailed: boolean;
  /** The generation the failed disk claimed then (NO_GI: not known). Claiming another one, it was written since. */
  peerDiskFailedGi?: string;
  /** The generations it had gone on from then (its record may claim one of them: it is that failed disk). */
  peerDiskFailedFrom: string[];
  seq: number;
}

export interface MetaLayout {
  deviceBytes: number;
  dataBytes: number;
  alOffset: number;
  alBytes: number;
  bitmapOffset: number;
  bitmapBytes: number;
  recordOffset: number;
}

const count = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

/**
 * The record's JSON body (every field of MetaRecord: the compiler checks).
 * Fields added after the first version default to what an older record
 * meant; unknown fields (from a newer duet of the same record version) are
 * kept rather than making the slot invalid, since a device with no valid
 * slot is taken for a new disk.
 */
const recordBodyShape = {
  resource: z.string().min(1),
  node: z.string().min(1),
  dataBytes: count,
  alBytes: count,
  gi: generationIdsSchema,
  disk: diskStateSchema,
  primary: z.boolean(),
  fullSyncNeeded: z.boolean(),
  primarySince: count.default(0),
  peerOutdated: z.boolean().default(false),
  peerDiskFailed: z.boolean().default(false),
  peerDiskFailedGi: giSchema.optional(), // absent: not known (a record from before the field)
  peerDiskFailedFrom: z.array(giSchema).max(3).default([]),
} satisfies Record<keyof Omit<MetaRecord, 'seq'>, z.ZodTypeAny>;

const recordBodySchema: z.ZodType<Omit<MetaRecord, 'seq'>, z.ZodTypeDef, unknown> = z.object(recordBodyShape).passthrough();

/** Where everything lies on a backing device of `deviceBytes`. */
export function layoutFor(deviceBytes: number, alBytes = DEFAULT_AL_BYTES): MetaLayout {
  // The bitmap depends on the data size, which depends on the bitmap: the
  // data size is rounded down to 1 MiB and fits with room to spare.
  let dataBytes = Math.floor(deviceBytes / ALIGN) * ALIGN;
  for (;;) {
    const tail = alBytes + Bitmap.bytesFor(dataBytes) + 2 * SLOT;
    if (dataBytes + tail <= deviceBytes) break;
    dataBytes -= ALIGN;
    if (dataBytes <= 0) throw new Error(`a ${deviceBytes}-byte device is too small for replication metadata`);
  }
  const recordOffset = deviceBytes - 2 * SLOT;
  const bitmapBytes = Bitmap.bytesFor(dataBytes);
  const bitmapOffset = recordOffset - bitmapBytes;
  const alOffset = bitmapOffset - alBytes;
  return { deviceBytes, dataBytes, alOffset, alBytes, bitmapOffset, bitmapBytes, recordOffset };
}

export function newGi(random: (size: number) => Buffer = randomBytes): Gi {
  let gi = random(8).toString('hex');
  while (gi === '0000000000000000') gi = random(8).toString('hex');
  return gi;
}

export const NO_GI: Gi = '0';

export function encodeRecord(r: MetaRecord): Buffer {
  const { seq, ...body } = r;
  const json = Buffer.from(JSON.stringify(body));
  if (json.length > SLOT - HEADER) throw new Error(`metadata of ${r.resource} does not fit a slot`);
  const buf = Buffer.alloc(SLOT);
  META_MAGIC.copy(buf, 0);
  buf.writeUInt32LE(META_VERSION, 8);
  buf.writeBigUInt64LE(BigInt(seq), 16);
  buf.writeUInt32LE(json.length, 24);
  json.copy(buf, HEADER);
  buf.writeUInt32LE(crc32(json, crc32(buf.subarray(0, 28))), 28);
  return buf;
}

export function decodeRecord(buf: Buffer): MetaRecord | undefined {
  if (buf.length < SLOT || !buf.subarray(0, 8).equals(META_MAGIC) || buf.readUInt32LE(8) !== META_VERSION) return undefined;
  const len = buf.readUInt32LE(24);
  if (len > SLOT - HEADER) return undefined;
  const json = buf.subarray(HEADER, HEADER + len);
  if (crc32(json, crc32(buf.subarray(0, 28))) !== buf.readUInt32LE(28)) return undefined;
  const seq = buf.readBigUInt64LE(16);
  if (seq > BigInt(Number.MAX_SAFE_INTEGER)) return undefined;
  let body: unknown;
  try {
    body = JSON.parse(json.toString('utf8'));
  } catch {
    return undefined;
  }
  // A checksum only says the bytes are those written: the shape must be a record's too.
  const parsed = recordBodySchema.safeParse(body);
  return parsed.success ? { ...parsed.data, seq: Number(seq) } : undefined;
}

/** The valid slot with the higher sequence number, or undefined if neither is valid. */
export async function readRecord(device: Pick<BlockDevice, 'read'>, layout: MetaLayout): Promise<MetaRecord | undefined> {
  let best: MetaRecord | undefined;
  for (let slot = 0; slot < 2; slot++) {
    const buf = Buffer.alloc(SLOT);
    try {
      await device.read(layout.recordOffset + slot * SLOT, buf);
    } catch {
      continue;
    }
    const r = decodeRecord(buf);
    if (r && (!best || r.seq > best.seq)) best = r;
  }
  return best;
}

/** Write `r` with the next sequence number into the other slot; durable (FUA) when it resolves. */
export async function writeRecord(device: BlockDevice, layout: MetaLayout, r: MetaRecord): Promise<MetaRecord> {
  const next = { ...r, seq: r.seq + 1 };
  await device.write(layout.recordOffset + (next.seq % 2) * SLOT, encodeRecord(next), { fua: true });
  return next;
}

/**
 * Metadata for a disk that has never been synced: Inconsistent, no generation
 * yet (DRBD's "just created"); the first forced promotion or the first sync
 * gives it one.
 */
export function initialRecord(resource: string, node: string, layout: MetaLayout): MetaRecord {
  return {
    resource,
    node,
    dataBytes: layout.dataBytes,
    alBytes: layout.alBytes,
    gi: { current: NO_GI, bitmap: NO_GI, history: [NO_GI, NO_GI] },
    disk: 'Inconsistent',
    primary: false,
    fullSyncNeeded: true,
    primarySince: 0,
    peerOutdated: false,
    peerDiskFailed: false,
    peerDiskFailedGi: NO_GI,
    peerDiskFailedFrom: [],
    seq: 0,
  };
}
