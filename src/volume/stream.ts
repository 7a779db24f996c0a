/**
 * `vol send` / `vol receive`: a self-checking stream of a snapshot, full or
 * incremental (only what changed since an older snapshot, found from the
 * maps as `vol diff` does).
 *
 * Stream format, version 1 (all integers little-endian):
 *   "DUETSEND" u32 version u32 headerLength JSON-header u32 crc(all before)
 *   records: u8 type, u64 offset, u32 length, u32 dataCrc, u32 headerCrc
 *            (crc of the 21 bytes before it), then `length` bytes for DATA
 *     1 DATA  bytes at offset          2 ZERO  range reads as zeros
 *     3 END   offset = data bytes sent, length = records before it,
 *             dataCrc = running crc of every record's header
 * A receiver applies records to a hidden volume and makes it visible (or
 * swaps it with the target) in one commit only after END checks out: a
 * truncated or damaged stream changes nothing the user can see.
 */
import { randomUUID } from 'node:crypto';
import type { Readable, Writable } from 'node:stream';
import { crc32 } from 'node:zlib';
import { UserError } from '../util/errors.js';
import type { Pool, VolumeState } from './pool.js';
import { forEachMapped, lookup } from './thinmap.js';
import { ThinVolume } from './volume.js';
import { diffStates, findVolume, checkName, resizeVolume } from './operations.js';
import type { VolumeRecord } from './format.js';

const MAGIC = Buffer.from('DUETSEND');
const VERSION = 1;
const DATA = 1;
const ZERO = 2;
const END = 3;
const RECORD_HEADER = 21;
/** Largest DATA record: consecutive changed chunks are merged up to this. */
const MAX_RECORD = 4 * 1024 * 1024;

export interface StreamHeader {
  pool: string;
  volume: string;
  uuid: string;
  sizeBytes: number;
  chunkSize: number;
  base?: { name: string; uuid: string };
  createdAt: string;
}

export interface SendResult {
  records: number;
  dataBytes: number;
  zeroBytes: number;
}

/** Write the stream of snapshot `name` (incremental from `fromName`) to `out`. */
export async function sendVolume(pool: Pool, name: string, fromName: string | undefined, out: Writable): Promise<SendResult> {
  const snap = findVolume(pool, name);
  if (!snap.record.readOnly) throw new UserError(`volume ${pool.name}/${name} is writable; send a snapshot of it (duet vol snapshot ${pool.name}/${name} ${pool.name}/SNAP)`);
  const base = fromName === undefined ? undefined : findVolume(pool, fromName);
  if (base && !base.record.readOnly) throw new UserError(`volume ${pool.name}/${fromName} is writable; --from needs a snapshot`);
  if (base === snap) throw new UserError(`--from ${pool.name}/${fromName} is the snapshot being sent`);
  const header: StreamHeader = {
    pool: pool.name,
    volume: name,
    uuid: snap.record.uuid,
    sizeBytes: snap.record.sizeBytes,
    chunkSize: pool.chunkSize,
    ...(base ? { base: { name: base.record.name, uuid: base.record.uuid } } : {}),
    createdAt: snap.record.createdAt,
  };
  const ranges = changedRanges(pool, snap, base);
  const writer = new RecordWriter(out);
  await writer.raw(encodeHeader(header));
  const device = new ThinVolume(pool, snap);
  const result: SendResult = { records: 0, dataBytes: 0, zeroBytes: 0 };
  for (const r of ranges) {
    if (r.zero) {
      await writer.record(ZERO, r.offset, r.length);
      result.zeroBytes += r.length;
    } else {
      const data = Buffer.alloc(r.length);
      await device.read(r.offset, data);
      await writer.record(DATA, r.offset, r.length, data);
      result.dataBytes += r.length;
    }
    result.records++;
  }
  await writer.end(result.dataBytes);
  return result;
}

interface SendRange {
  offset: number;
  length: number;
  zero: boolean;
}

/** What to send: every mapped chunk (full) or every chunk that differs from the base. */
function changedRanges(pool: Pool, snap: VolumeState, base: VolumeState | undefined): SendRange[] {
  const cs = pool.chunkSize;
  const size = snap.record.sizeBytes;
  const out: SendRange[] = [];
  const add = (v: number, zero: boolean): void => {
    const offset = v * cs;
    if (offset >= size) return;
    const length = Math.min(cs, size - offset);
    const last = out[out.length - 1];
    if (last && last.zero === zero && last.offset + last.length === offset && (zero || last.length + length <= MAX_RECORD)) last.length += length;
    else out.push({ offset, length, zero });
  };
  if (!base) {
    forEachMapped(snap.root, 0, pool.chunksOf(size), (v) => add(v, false));
  } else {
    for (const r of diffStates(pool, base, snap)) {
      for (let off = r.offset; off < r.offset + r.length; off += cs) {
        const v = off / cs;
        add(v, lookup(snap.root, v) === 0);
      }
    }
  }
  return out;
}

function encodeHeader(h: StreamHeader): Buffer {
  const json = Buffer.from(JSON.stringify(h));
  const buf = Buffer.alloc(8 + 8 + json.length + 4);
  MAGIC.copy(buf, 0);
  buf.writeUInt32LE(VERSION, 8);
  buf.writeUInt32LE(json.length, 12);
  json.copy(buf, 16);
  buf.writeUInt32LE(crc32(buf.subarray(0, 16 + json.length)), 16 + json.length);
  return buf;
}

class RecordWriter {
  private running = 0;
  private count = 0;

  constructor(private readonly out: Writable) {}

  async raw(buf: Buffer): Promise<void> {
    // A stream its reader gave up on (an API client that left) is destroyed: after that a write
    // neither errs nor drains, so it is asked first, and 'close' ends a wait too.
    if (this.out.destroyed) throw new UserError(`send: cannot write the stream (${this.out.errored?.message ?? 'its reader is gone'})`);
    if (!this.out.write(buf)) {
      await new Promise<void>((resolve, reject) => {
        const done = (): void => {
          this.out.off('drain', onDrain);
          this.out.off('error', onError);
          this.out.off('close', onClose);
        };
        const onError = (err: Error): void => {
          done();
          reject(new UserError(`send: cannot write the stream (${err.message})`));
        };
        const onClose = (): void => {
          done();
          reject(new UserError(`send: cannot write the stream (${this.out.errored?.message ?? 'its reader is gone'})`));
        };
        const onDrain = (): void => {
          done();
          resolve();
        };
        this.out.once('drain', onDrain);
        this.out.once('error', onError);
        this.out.once('close', onClose);
      });
    }
  }

  async record(type: number, offset: number, length: number, data?: Buffer): Promise<void> {
    const header = Buffer.alloc(RECORD_HEADER);
    header[0] = type;
    header.writeBigUInt64LE(BigInt(offset), 1);
    header.writeUInt32LE(length, 9);
    header.writeUInt32LE(data ? crc32(data) : 0, 13);
    header.writeUInt32LE(crc32(header.subarray(0, 17)), 17);
    // The running crc chains every header, so END catches a dropped or reordered record.
    this.running = crc32(header, this.running);
    this.count++;
    await this.raw(header);
    if (data) await this.raw(data);
  }

  async end(dataBytes: number): Promise<void> {
    const before = this.count;
    const running = this.running;
    const h = Buffer.alloc(RECORD_HEADER);
    h[0] = END;
    h.writeBigUInt64LE(BigInt(dataBytes), 1);
    h.writeUInt32LE(before, 9);
    h.writeUInt32LE(running, 13);
    h.writeUInt32LE(crc32(h.subarray(0, 17)), 17);
    await this.raw(h);
  }
}

/* ---------------------------------------------------------------- receive */

/** Reads exact byte counts from a stream; EOF mid-way is a truncated stream. */
class ByteReader {
  private chunks: Buffer[] = [];
  private have = 0;
  private ended = false;
  private readonly iterator: AsyncIterator<Buffer>;
  total = 0;

  constructor(input: Readable) {
    this.iterator = (input as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  }

  private async fill(n: number): Promise<boolean> {
    while (this.have < n && !this.ended) {
      const next = await this.iterator.next();
      if (next.done) this.ended = true;
      else {
        const b = Buffer.isBuffer(next.value) ? next.value : Buffer.from(next.value);
        this.chunks.push(b);
        this.have += b.length;
      }
    }
    return this.have >= n;
  }

  async read(n: number, what: string): Promise<Buffer> {
    if (!(await this.fill(n))) throw new UserError(`receive: stream truncated in ${what} (after ${this.total + this.have} bytes); nothing was changed`);
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.have = rest.length;
    this.total += n;
    return out;
  }

  async atEnd(): Promise<boolean> {
    return !(await this.fill(1));
  }
}

export interface ReceiveResult {
  volume: string;
  incremental: boolean;
  records: number;
  dataBytes: number;
  sizeBytes: number;
}

/**
 * Apply a stream to POOL/`name`: a full stream creates it; an incremental
 * one needs `name` to hold exactly the stream's base (unchanged since it
 * received it).
 */
export async function receiveVolume(pool: Pool, name: string, input: Readable, inUse?: (name: string) => number): Promise<ReceiveResult> {
  checkName('volume', name);
  const reader = new ByteReader(input);
  const header = await readHeader(reader);
  let target: VolumeState | undefined;
  if (header.base) {
    target = findVolume(pool, name);
    if (target.record.receivedUuid !== header.base.uuid) {
      const has = target.record.receivedUuid ? `it holds ${target.record.receivedUuid}` : 'it was not received from a stream or was written since';
      throw new UserError(
        `receive: ${pool.name}/${name} does not hold the base of this incremental stream (${header.base.name}, ${header.base.uuid}); ${has}. Nothing was changed`,
      );
    }
    const users = inUse?.(name) ?? 0;
    if (users > 0) throw new UserError(`receive: ${pool.name}/${name} is in use by ${users} NBD connection(s); disconnect them first`);
  } else if (pool.volume(name)) {
    throw new UserError(`receive: ${pool.name}/${name} already exists; a full stream creates a new volume (remove it, or send incrementally with --from)`);
  }

  // Build the result in a hidden volume; the target is untouched until the end.
  const hidden = `.receive-${randomUUID()}`;
  const temp = target ? await shareHidden(pool, target, hidden, header.sizeBytes) : await createHiddenVolume(pool, hidden, header.sizeBytes);
  const device = new ThinVolume(pool, temp);
  let records = 0;
  let dataBytes = 0;
  try {
    let running = 0;
    for (;;) {
      const h = await reader.read(RECORD_HEADER, `record ${records + 1}`);
      const type = h[0];
      const offset = Number(h.readBigUInt64LE(1));
      const length = h.readUInt32LE(9);
      const dataCrc = h.readUInt32LE(13);
      if (crc32(h.subarray(0, 17)) !== h.readUInt32LE(17)) throw new UserError(`receive: record ${records + 1} header is damaged (checksum mismatch); nothing was changed`);
      if (type === END) {
        if (length !== records || dataCrc !== running || offset !== dataBytes) {
          throw new UserError(`receive: stream end does not match what came before (records ${records}/${length}); nothing was changed`);
        }
        if (!(await reader.atEnd())) throw new UserError('receive: data after the end of the stream; nothing was changed');
        break;
      }
      running = crc32(h, running);
      if ((type !== DATA && type !== ZERO) || offset + length > header.sizeBytes || length === 0) {
        throw new UserError(`receive: record ${records + 1} is invalid (type ${type}, ${offset}+${length} in a ${header.sizeBytes}-byte volume); nothing was changed`);
      }
      if (type === DATA) {
        if (length > MAX_RECORD) throw new UserError(`receive: record ${records + 1} is larger than a stream record can be; nothing was changed`);
        const data = await reader.read(length, `record ${records + 1} data`);
        if (crc32(data) !== dataCrc) throw new UserError(`receive: record ${records + 1} data is damaged (checksum mismatch at offset ${offset}); nothing was changed`);
        await device.write(offset, data);
        dataBytes += length;
      } else {
        await device.writeZeroes(offset, length);
      }
      records++;
    }
    await finishReceive(pool, temp, target, name, header.uuid);
  } catch (err) {
    await dropHidden(pool, temp).catch(() => undefined);
    throw err;
  }
  pool.log.info({ event: 'volume-received', pool: pool.name, volume: name, incremental: !!header.base, records, dataBytes }, 'stream received');
  return { volume: name, incremental: !!header.base, records, dataBytes, sizeBytes: header.sizeBytes };
}

async function readHeader(reader: ByteReader): Promise<StreamHeader> {
  const fixed = await reader.read(16, 'the header');
  if (!fixed.subarray(0, 8).equals(MAGIC)) throw new UserError('receive: not a duet send stream (bad magic); nothing was changed');
  const version = fixed.readUInt32LE(8);
  if (version !== VERSION) throw new UserError(`receive: stream format version ${version}, this duet reads ${VERSION}; nothing was changed`);
  const len = fixed.readUInt32LE(12);
  if (len > 1024 * 1024) throw new UserError('receive: stream header is damaged (length); nothing was changed');
  const rest = await reader.read(len + 4, 'the header');
  const crc = crc32(rest.subarray(0, len), crc32(fixed));
  if (crc !== rest.readUInt32LE(len)) throw new UserError('receive: stream header is damaged (checksum mismatch); nothing was changed');
  const header = JSON.parse(rest.subarray(0, len).toString('utf8')) as StreamHeader;
  if (!Number.isSafeInteger(header.sizeBytes) || header.sizeBytes <= 0 || typeof header.uuid !== 'string') {
    throw new UserError('receive: stream header is invalid; nothing was changed');
  }
  return header;
}

/* A receive builds into a hidden volume (flagged incomplete: dropped at open if we die). */

async function createHiddenVolume(pool: Pool, name: string, size: number): Promise<VolumeState> {
  return pool.exclusive(async () => {
    pool.apply({ type: 'create', volume: hiddenRecord(pool, name, size) }, true);
    return pool.volume(name)!;
  });
}

async function shareHidden(pool: Pool, from: VolumeState, name: string, size: number): Promise<VolumeState> {
  const state = await pool.exclusive(() =>
    pool.quiesced(() => {
      pool.apply({ type: 'share', from: from.record.id, volume: hiddenRecord(pool, name, from.record.sizeBytes) }, true);
      return pool.volume(name)!;
    }),
  );
  if (size !== from.record.sizeBytes) {
    try {
      await resizeVolume(pool, name, size, true, true);
    } catch (err) {
      await dropHidden(pool, state).catch(() => undefined);
      throw err;
    }
  }
  return state;
}

function hiddenRecord(pool: Pool, name: string, size: number): VolumeRecord {
  return { id: pool.nextVolumeId++, name, uuid: randomUUID(), sizeBytes: size, readOnly: false, snapshot: false, createdAt: new Date().toISOString(), incomplete: true };
}

/** One commit makes the result visible: rename (full) or swap contents with the target (incremental). */
async function finishReceive(pool: Pool, temp: VolumeState, target: VolumeState | undefined, name: string, uuid: string): Promise<void> {
  await pool.commit(); // the received data is durable before the metadata shows it
  await pool.exclusive(() =>
    pool.quiescedCommit(() => {
      if (target) {
        if (target.removed || target.record.receivedUuid === undefined) throw new UserError(`receive: ${pool.name}/${name} changed while receiving; nothing was changed`);
        pool.apply({ type: 'swap', id: target.record.id, with: temp.record.id }, true);
        pool.apply({ type: 'set', id: target.record.id, fields: { receivedUuid: uuid } }, true);
        pool.apply({ type: 'remove', id: temp.record.id }, true);
      } else {
        if (pool.volume(name)) throw new UserError(`receive: ${pool.name}/${name} was created while receiving; nothing was changed`);
        pool.apply({ type: 'set', id: temp.record.id, fields: { name, incomplete: null, receivedUuid: uuid, readOnly: false } }, true);
      }
    }),
  );
}

async function dropHidden(pool: Pool, temp: VolumeState): Promise<void> {
  if (temp.removed) return;
  await pool.exclusive(() => pool.quiescedCommit(() => pool.apply({ type: 'remove', id: temp.record.id }, true)));
}

/** The send stream's writer, for the API server's tests of a reader that leaves. */
export { RecordWriter as RecordWriterForTests };
