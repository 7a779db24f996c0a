/**
 * Property tests of the NBD wire protocol against the in-process server with a
 * MemoryDevice, compared with a flat Buffer model:
 *  - random sequences of valid requests, sent in random-sized pieces with
 *    small delays, in simple (GO / EXPORT_NAME) and structured modes;
 *  - encode/decode round trips of a local encoder, and requests with 64-bit
 *    cookies and offsets near and beyond 2^53 (answered with EINVAL / ENOSPC).
 *
 * Requests are pipelined, but a request that conflicts with one still in
 * flight (overlapping ranges, one of them modifying) starts a new batch: the
 * spec lets a server complete concurrent requests in any order, so only
 * non-conflicting requests are in flight together.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import fc from 'fast-check';
import { NbdServer } from '../../src/nbd/server.js';
import type { ExportProvider, NbdExport } from '../../src/nbd/exports.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { silentLogger } from '../../src/util/log.js';
import * as P from '../../src/nbd/protocol.js';
import { Raw } from './raw-client.js';

// ---- a minimal raw client ----------------------------------------------------


function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}
function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}

function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(P.IHAVEOPT, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

async function optionReply(r: Raw): Promise<{ opt: number; type: number; data: Buffer }> {
  const h = await r.read(20);
  assert.equal(h.readBigUInt64BE(0), P.NBD_OPT_REPLY_MAGIC, 'option reply magic');
  const len = h.readUInt32BE(16);
  return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await r.read(len) };
}

type Mode = 'simple-go' | 'simple-export-name' | 'structured';

async function handshake(r: Raw, mode: Mode, name: string): Promise<{ size: number; flags: number }> {
  const g = await r.read(18);
  assert.equal(g.readBigUInt64BE(0), P.NBDMAGIC);
  assert.equal(g.readBigUInt64BE(8), P.IHAVEOPT);
  r.write(u32(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
  if (mode === 'simple-export-name') {
    r.write(option(P.NBD_OPT_EXPORT_NAME, Buffer.from(name)));
    const b = await r.read(10);
    return { size: Number(b.readBigUInt64BE(0)), flags: b.readUInt16BE(8) };
  }
  if (mode === 'structured') {
    r.write(option(P.NBD_OPT_STRUCTURED_REPLY));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
    const q = Buffer.from(P.BASE_ALLOCATION);
    const n = Buffer.from(name);
    r.write(option(P.NBD_OPT_SET_META_CONTEXT, Buffer.concat([u32(n.length), n, u32(1), u32(q.length), q])));
    const ctx = await optionReply(r);
    assert.equal(ctx.type, P.NBD_REP_META_CONTEXT);
    assert.equal(ctx.data.readUInt32BE(0), P.BASE_ALLOCATION_ID);
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
  }
  const n = Buffer.from(name);
  r.write(option(P.NBD_OPT_GO, Buffer.concat([u32(n.length), n, u16(0)])));
  let size = -1;
  let flags = -1;
  for (;;) {
    const rep = await optionReply(r);
    assert.equal(rep.opt, P.NBD_OPT_GO);
    if (rep.type === P.NBD_REP_ACK) break;
    assert.equal(rep.type, P.NBD_REP_INFO, `GO refused: 0x${rep.type.toString(16)} ${rep.data.toString()}`);
    if (rep.data.readUInt16BE(0) === P.NBD_INFO_EXPORT) {
      size = Number(rep.data.readBigUInt64BE(2));
      flags = rep.data.readUInt16BE(10);
    }
  }
  return { size, flags };
}

// ---- the local encoder / decoder ----------------------------------------------

interface Request {
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
  payload?: Buffer;
}

function encodeRequest(req: Request): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(req.flags, 4);
  h.writeUInt16BE(req.type, 6);
  h.writeBigUInt64BE(req.cookie, 8);
  h.writeBigUInt64BE(req.offset, 16);
  h.writeUInt32BE(req.length, 24);
  return req.payload ? Buffer.concat([h, req.payload]) : h;
}

function decodeRequest(b: Buffer): Request {
  assert.equal(b.readUInt32BE(0), P.NBD_REQUEST_MAGIC);
  const type = b.readUInt16BE(6);
  const length = b.readUInt32BE(24);
  return {
    flags: b.readUInt16BE(4),
    type,
    cookie: b.readBigUInt64BE(8),
    offset: b.readBigUInt64BE(16),
    length,
    ...(type === P.NBD_CMD_WRITE ? { payload: b.subarray(28, 28 + length) } : {}),
  };
}

type Reply =
  | { kind: 'simple'; error: number; cookie: bigint; data: Buffer | null }
  | { kind: 'chunk'; flags: number; type: number; cookie: bigint; payload: Buffer };

function encodeSimpleReply(error: number, cookie: bigint, data?: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error, 4);
  h.writeBigUInt64BE(cookie, 8);
  return data ? Buffer.concat([h, data]) : h;
}

function encodeChunk(flags: number, type: number, cookie: bigint, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

/**
 * Read one reply. `simpleDataLength(cookie)` says how many data bytes follow a
 * successful simple reply (the read length, else 0).
 */
async function readReply(read: (n: number) => Promise<Buffer>, simpleDataLength: (cookie: bigint) => number): Promise<Reply> {
  const m = await read(4);
  const magic = m.readUInt32BE(0);
  if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
    const h = await read(12);
    const error = h.readUInt32BE(0);
    const cookie = h.readBigUInt64BE(4);
    const n = error === 0 ? simpleDataLength(cookie) : 0;
    return { kind: 'simple', error, cookie, data: n > 0 ? await read(n) : null };
  }
  assert.equal(magic, P.NBD_STRUCTURED_REPLY_MAGIC, `bad reply magic 0x${magic.toString(16)}`);
  const h = await read(16);
  const length = h.readUInt32BE(12);
  return { kind: 'chunk', flags: h.readUInt16BE(0), type: h.readUInt16BE(2), cookie: h.readBigUInt64BE(4), payload: await read(length) };
}

function bufferReader(b: Buffer): (n: number) => Promise<Buffer> {
  let pos = 0;
  return async (n) => {
    assert.ok(pos + n <= b.length, 'decoder ran past the end');
    const out = b.subarray(pos, pos + n);
    pos += n;
    return out;
  };
}

// ---- server with a swappable device ----------------------------------------------

const EXPORT = 'wire';
const SIZE = 1024 * 1024 + 4096 + 13; // not a multiple of the 64 KiB chunk: a partial last chunk

class SwitchableExports implements ExportProvider {
  current: NbdExport = { name: EXPORT, device: new MemoryDevice(SIZE, EXPORT) };
  list(): NbdExport[] {
    return [this.current];
  }
  get(name: string): NbdExport | undefined {
    return name === '' || name === EXPORT ? this.current : undefined;
  }
}

const exportsProvider = new SwitchableExports();
let server: NbdServer;
let port: number;

before(async () => {
  server = new NbdServer({ exports: exportsProvider, log: silentLogger() });
  const addr = await server.listen('127.0.0.1', 0);
  port = (addr as net.AddressInfo).port;
});

after(async () => {
  await server.close();
});

// ---- commands and the model ---------------------------------------------------------

type Cmd =
  | { t: 'read'; offset: number; length: number; df: boolean; fua: boolean }
  | { t: 'write'; offset: number; length: number; seed: number; fua: boolean }
  | { t: 'trim'; offset: number; length: number; fua: boolean }
  | { t: 'wz'; offset: number; length: number; noHole: boolean; fastZero: boolean; fua: boolean }
  | { t: 'flush' }
  | { t: 'cache'; offset: number; length: number }
  | { t: 'bs'; offset: number; length: number; reqOne: boolean };

const CHUNK = 64 * 1024;
const offsetArb = fc.oneof(
  { weight: 3, arbitrary: fc.integer({ min: 0, max: SIZE - 1 }) },
  { weight: 1, arbitrary: fc.constantFrom(0, CHUNK - 1, CHUNK, 2 * CHUNK, SIZE - 1, SIZE - 100, 16 * CHUNK) },
  { weight: 1, arbitrary: fc.tuple(fc.integer({ min: 0, max: 16 }), fc.integer({ min: -20, max: 20 })).map(([c, d]) => Math.min(SIZE - 1, Math.max(0, c * CHUNK + d))) },
);
const lengthArb = fc.oneof(
  { weight: 4, arbitrary: fc.integer({ min: 1, max: 512 }) },
  { weight: 3, arbitrary: fc.integer({ min: 1, max: 16384 }) },
  { weight: 1, arbitrary: fc.integer({ min: 60_000, max: 200_000 }) },
);
const rangeArb = fc.tuple(offsetArb, lengthArb).map(([offset, len]) => ({ offset, length: Math.min(len, SIZE - offset) }));

function cmdArb(structured: boolean): fc.Arbitrary<Cmd> {
  const arbs: fc.Arbitrary<Cmd>[] = [
    fc.tuple(rangeArb, fc.boolean(), fc.boolean()).map(([r, df, fua]) => ({ t: 'read' as const, ...r, df: structured && df, fua })),
    fc.tuple(rangeArb, fc.integer({ min: 1, max: 0x7fffffff }), fc.boolean()).map(([r, seed, fua]) => ({ t: 'write' as const, ...r, seed, fua })),
    fc.tuple(rangeArb, fc.boolean()).map(([r, fua]) => ({ t: 'trim' as const, ...r, fua })),
    fc.tuple(rangeArb, fc.boolean(), fc.boolean(), fc.boolean()).map(([r, noHole, fastZero, fua]) => ({ t: 'wz' as const, ...r, noHole, fastZero, fua })),
    fc.constant<Cmd>({ t: 'flush' }),
    rangeArb.map((r) => ({ t: 'cache' as const, ...r })),
    fc.tuple(rangeArb, fc.boolean()).map(([r, reqOne]) => ({ t: 'bs' as const, ...r, reqOne })),
  ];
  return fc.oneof(
    { weight: 5, arbitrary: arbs[0] },
    { weight: 5, arbitrary: arbs[1] },
    { weight: 2, arbitrary: arbs[2] },
    { weight: 2, arbitrary: arbs[3] },
    { weight: 1, arbitrary: arbs[4] },
    { weight: 1, arbitrary: arbs[5] },
    { weight: 3, arbitrary: arbs[6] },
  );
}

function payloadOf(seed: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = (x & 0xff) | 1; // never zero: a lost write is always visible
  }
  return b;
}

function toRequest(c: Cmd, cookie: bigint): Request {
  switch (c.t) {
    case 'read':
      return { type: P.NBD_CMD_READ, flags: (c.df ? P.NBD_CMD_FLAG_DF : 0) | (c.fua ? P.NBD_CMD_FLAG_FUA : 0), cookie, offset: BigInt(c.offset), length: c.length };
    case 'write':
      return { type: P.NBD_CMD_WRITE, flags: c.fua ? P.NBD_CMD_FLAG_FUA : 0, cookie, offset: BigInt(c.offset), length: c.length, payload: payloadOf(c.seed, c.length) };
    case 'trim':
      return { type: P.NBD_CMD_TRIM, flags: c.fua ? P.NBD_CMD_FLAG_FUA : 0, cookie, offset: BigInt(c.offset), length: c.length };
    case 'wz':
      return {
        type: P.NBD_CMD_WRITE_ZEROES,
        flags: (c.noHole ? P.NBD_CMD_FLAG_NO_HOLE : 0) | (c.fastZero ? P.NBD_CMD_FLAG_FAST_ZERO : 0) | (c.fua ? P.NBD_CMD_FLAG_FUA : 0),
        cookie,
        offset: BigInt(c.offset),
        length: c.length,
      };
    case 'flush':
      return { type: P.NBD_CMD_FLUSH, flags: 0, cookie, offset: 0n, length: 0 };
    case 'cache':
      return { type: P.NBD_CMD_CACHE, flags: 0, cookie, offset: BigInt(c.offset), length: c.length };
    case 'bs':
      return { type: P.NBD_CMD_BLOCK_STATUS, flags: c.reqOne ? P.NBD_CMD_FLAG_REQ_ONE : 0, cookie, offset: BigInt(c.offset), length: c.length };
  }
}

const modifies = (c: Cmd): boolean => c.t === 'write' || c.t === 'trim' || c.t === 'wz';
function conflicts(a: Cmd, b: Cmd): boolean {
  if (a.t === 'flush' || b.t === 'flush') return false;
  if (!modifies(a) && !modifies(b)) return false;
  return a.offset < b.offset + b.length && b.offset < a.offset + a.length;
}

/** Split into batches in which no two requests conflict. */
function batches(cmds: Cmd[]): Cmd[][] {
  const out: Cmd[][] = [];
  let cur: Cmd[] = [];
  for (const c of cmds) {
    if (cur.some((p) => conflicts(p, c))) {
      out.push(cur);
      cur = [];
    }
    cur.push(c);
  }
  if (cur.length) out.push(cur);
  return out;
}

interface Chunking {
  pieces: number[];
  delays: number[]; // 0 = setImmediate, 1 = 1 ms timer, 2 = none
}
const chunkingArb: fc.Arbitrary<Chunking> = fc.record({
  pieces: fc.array(fc.oneof(fc.integer({ min: 1, max: 40 }), fc.integer({ min: 1, max: 8192 }), fc.integer({ min: 1, max: 70_000 })), { minLength: 1, maxLength: 16 }),
  delays: fc.array(fc.constantFrom(0, 0, 1, 2), { minLength: 1, maxLength: 8 }),
});

/** Bounds on the cost of chunking: at most ~MAX_PIECES writes and MAX_TIMER_DELAYS 1 ms sleeps per batch. */
const MAX_PIECES = 400;
const MAX_TIMER_DELAYS = 40;

async function sendChunked(r: Raw, data: Buffer, ch: Chunking): Promise<void> {
  const minPiece = Math.ceil(data.length / MAX_PIECES);
  let pos = 0;
  for (let i = 0; pos < data.length; i++) {
    const n = Math.max(ch.pieces[i % ch.pieces.length], minPiece);
    r.write(data.subarray(pos, pos + n));
    pos += n;
    const d = ch.delays[i % ch.delays.length];
    if (d === 1 && i < MAX_TIMER_DELAYS) await new Promise((res) => setTimeout(res, 1));
    else if (d !== 2) await new Promise((res) => setImmediate(res));
  }
}

const CHUNK_TYPES_FOR: Record<string, number[]> = {
  read: [P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_TYPE_OFFSET_HOLE],
  bs: [P.NBD_REPLY_TYPE_BLOCK_STATUS],
};

function checkErrorChunk(c: Extract<Reply, { kind: 'chunk' }>, req: Cmd): number {
  assert.ok(c.type === P.NBD_REPLY_TYPE_ERROR || c.type === P.NBD_REPLY_TYPE_ERROR_OFFSET);
  assert.ok(c.payload.length >= 6, 'error chunk carries error + message length');
  const error = c.payload.readUInt32BE(0);
  const msgLen = c.payload.readUInt16BE(4);
  const extra = c.type === P.NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
  assert.equal(c.payload.length, 6 + msgLen + extra, 'error chunk length = 6 + message + (offset)');
  if (extra && 'offset' in req) {
    const off = Number(c.payload.readBigUInt64BE(6 + msgLen));
    assert.ok(off >= req.offset && off < req.offset + req.length, 'ERROR_OFFSET offset lies inside the request');
  }
  assert.notEqual(error, 0, 'error chunk with error 0');
  return error;
}

/** Run one random session against a fresh device and compare with the model. */
async function runSession(mode: Mode, cmds: Cmd[], chunking: Chunking, cookies: bigint[]): Promise<void> {
  const device = new MemoryDevice(SIZE, EXPORT);
  exportsProvider.current = { name: EXPORT, device };
  const model = Buffer.alloc(SIZE);
  const structured = mode === 'structured';
  const r = await Raw.connect(port);
  try {
    const { size, flags } = await handshake(r, mode, mode === 'simple-go' ? '' : EXPORT);
    assert.equal(size, SIZE);
    assert.ok(flags & P.NBD_FLAG_HAS_FLAGS);
    assert.ok(flags & P.NBD_FLAG_SEND_TRIM);
    assert.equal((flags & P.NBD_FLAG_SEND_DF) !== 0, structured, 'DF advertised only with structured replies');

    let k = 0;
    for (const batch of batches(cmds)) {
      const pending = new Map<bigint, { cmd: Cmd; chunks: Extract<Reply, { kind: 'chunk' }>[] }>();
      const wire: Buffer[] = [];
      for (const c of batch) {
        const cookie = cookies[k++];
        pending.set(cookie, { cmd: c, chunks: [] });
        wire.push(encodeRequest(toRequest(c, cookie)));
      }
      // What the model says each read returns, captured before this batch's writes
      // (none of which overlap a read in the same batch).
      const expectRead = new Map<bigint, Buffer>();
      for (const [cookie, p] of pending) if (p.cmd.t === 'read') expectRead.set(cookie, Buffer.from(model.subarray(p.cmd.offset, p.cmd.offset + p.cmd.length)));
      const bsModel = Buffer.from(model); // block status judged against the pre-batch model (no overlap with writes)

      const sending = sendChunked(r, Buffer.concat(wire), chunking);
      while (pending.size > 0) {
        const rep = await readReply(
          (n) => r.read(n),
          (cookie) => {
            const p = pending.get(cookie);
            return p && p.cmd.t === 'read' ? p.cmd.length : 0;
          },
        );
        const p = pending.get(rep.cookie);
        assert.ok(p, `reply for cookie ${rep.cookie} which matches no outstanding request`);
        const c = p.cmd;
        if (rep.kind === 'simple') {
          assert.equal(p.chunks.length, 0, 'simple reply after structured chunks');
          if (structured) assert.notEqual(c.t, 'read', 'simple reply to a read with structured replies negotiated');
          if (c.t === 'bs' && !structured) {
            assert.equal(rep.error, P.NBD_EINVAL, 'block status without base:allocation must fail EINVAL');
          } else {
            assert.equal(rep.error, 0, `${c.t} failed with error ${rep.error}`);
          }
          if (c.t === 'read') assert.deepEqual(rep.data, expectRead.get(rep.cookie), 'simple read data matches the model');
          pending.delete(rep.cookie);
          continue;
        }
        assert.ok(structured, 'structured chunk on a connection without structured replies');
        assert.equal(rep.flags & ~P.NBD_REPLY_FLAG_DONE, 0, 'unknown reply flags');
        p.chunks.push(rep);
        if (rep.type & 0x8000) checkErrorChunk(rep, c);
        if (!(rep.flags & P.NBD_REPLY_FLAG_DONE)) {
          assert.notEqual(rep.type, P.NBD_REPLY_TYPE_NONE, 'NONE chunk without DONE');
          continue;
        }
        pending.delete(rep.cookie);
        // The whole reply for this cookie is in p.chunks.
        const errors = p.chunks.filter((x) => x.type & 0x8000);
        assert.equal(errors.length, 0, `${c.t} got an error chunk`);
        const allowed = CHUNK_TYPES_FOR[c.t] ?? [];
        for (const x of p.chunks) {
          if (x.type === P.NBD_REPLY_TYPE_NONE) {
            assert.equal(x.payload.length, 0);
            assert.equal(x, p.chunks[p.chunks.length - 1], 'NONE only as the final chunk');
            continue;
          }
          assert.ok(allowed.includes(x.type), `chunk type ${x.type} for ${c.t}`);
        }
        if (c.t === 'read') {
          const got = Buffer.alloc(c.length, 0xee);
          const seen = new Uint8Array(c.length);
          const dataChunks = p.chunks.filter((x) => x.type === P.NBD_REPLY_TYPE_OFFSET_DATA);
          if (c.df) {
            assert.equal(p.chunks.filter((x) => x.type !== P.NBD_REPLY_TYPE_NONE).length, 1, 'DF read: exactly one data chunk');
            assert.equal(dataChunks.length, 1, 'DF read: no holes');
          }
          for (const x of p.chunks) {
            if (x.type === P.NBD_REPLY_TYPE_NONE) continue;
            const off = Number(x.payload.readBigUInt64BE(0));
            const len = x.type === P.NBD_REPLY_TYPE_OFFSET_DATA ? x.payload.length - 8 : x.payload.readUInt32BE(8);
            if (x.type === P.NBD_REPLY_TYPE_OFFSET_HOLE) assert.equal(x.payload.length, 12);
            assert.ok(len > 0, 'empty read chunk');
            assert.ok(off >= c.offset && off + len <= c.offset + c.length, 'read chunk inside the request');
            const start: number = off - c.offset;
            assert.ok(seen.subarray(start, start + len).every((v) => v === 0), 'read chunks overlap');
            seen.fill(1, start, start + len);
            if (x.type === P.NBD_REPLY_TYPE_OFFSET_DATA) x.payload.copy(got, start, 8);
            else got.fill(0, start, start + len);
          }
          assert.ok(seen.every((v) => v === 1), 'read chunks cover the whole request');
          assert.deepEqual(got, expectRead.get(rep.cookie), 'structured read data matches the model');
        } else if (c.t === 'bs') {
          const bs = p.chunks.filter((x) => x.type === P.NBD_REPLY_TYPE_BLOCK_STATUS);
          assert.equal(bs.length, 1, 'one BLOCK_STATUS chunk for the one selected context');
          const pl = bs[0].payload;
          assert.equal(pl.readUInt32BE(0), P.BASE_ALLOCATION_ID);
          assert.equal((pl.length - 4) % 8, 0);
          const n = (pl.length - 4) / 8;
          assert.ok(n >= 1, 'at least one extent');
          if (c.reqOne) assert.equal(n, 1, 'REQ_ONE: exactly one extent');
          let pos = c.offset;
          for (let i = 0; i < n; i++) {
            const len = pl.readUInt32BE(4 + 8 * i);
            const fl = pl.readUInt32BE(8 + 8 * i);
            assert.ok(len > 0, 'zero-length extent');
            assert.equal(fl & ~(P.NBD_STATE_HOLE | P.NBD_STATE_ZERO), 0, 'unknown extent flags');
            if (fl & P.NBD_STATE_ZERO) {
              let zero = true;
              for (let j = pos; j < pos + len; j++) if (bsModel[j] !== 0) zero = false;
              assert.ok(zero, `extent ${pos}+${len} claims zeros but the model has data`);
            }
            pos += len;
          }
          assert.ok(pos <= c.offset + c.length, 'extents stay within the request');
        } else {
          // Non-read commands: only a NONE chunk is a valid structured success.
          assert.ok(p.chunks.every((x) => x.type === P.NBD_REPLY_TYPE_NONE), `${c.t}: unexpected chunks`);
        }
      }
      await sending;
      // Apply the batch to the model (no two conflicting requests in a batch: order is irrelevant).
      for (const c of batch) {
        if (c.t === 'write') payloadOf(c.seed, c.length).copy(model, c.offset);
        else if (c.t === 'trim' || c.t === 'wz') model.fill(0, c.offset, c.offset + c.length); // MemoryDevice trims to zeros
      }
    }
    // Nothing stray left on the wire.
    await new Promise((res) => setTimeout(res, 2));
    assert.equal(r.available, 0, 'unexpected extra reply bytes');
    // The device agrees with the model, and DISC closes the connection.
    const whole = Buffer.alloc(SIZE);
    device.read(0, whole);
    assert.ok(whole.equals(model), 'device content equals the model');
    r.write(encodeRequest({ type: P.NBD_CMD_DISC, flags: 0, cookie: 0n, offset: 0n, length: 0 }));
    await Promise.race([r.closedPromise, new Promise((_, rej) => setTimeout(() => rej(new Error('DISC did not close the connection')), 2000))]);
  } finally {
    r.destroy();
  }
}

const cookiesArb = fc.uniqueArray(fc.bigUintN(64), { minLength: 40, maxLength: 40, selector: (x) => x });

for (const mode of ['simple-go', 'simple-export-name', 'structured'] as Mode[]) {
  test(`wire: random valid request sequences match the model (${mode})`, async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(cmdArb(mode === 'structured'), { minLength: 1, maxLength: 40 }), chunkingArb, cookiesArb, (cmds, chunking, cookies) =>
        runSession(mode, cmds, chunking, cookies),
      ),
      { numRuns: mode === 'structured' ? 80 : 40 },
    );
  });
}

// ---- encoder round trips ------------------------------------------------------------------

test('wire: request encode/decode round-trips for any 64-bit cookie and offset', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 0xffff }),
      fc.integer({ min: 0, max: 0xffff }),
      fc.bigUintN(64),
      fc.bigUintN(64),
      fc.integer({ min: 0, max: 300 }),
      (flags, type, cookie, offset, length) => {
        const req: Request = { flags, type, cookie, offset, length, ...(type === P.NBD_CMD_WRITE ? { payload: payloadOf(length + 1, length) } : {}) };
        const b = encodeRequest(req);
        assert.equal(b.length, 28 + (type === P.NBD_CMD_WRITE ? length : 0));
        assert.deepEqual(decodeRequest(b), req);
      },
    ),
  );
});

test('wire: reply encode/decode round-trips for any 64-bit cookie', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.bigUintN(64),
      fc.nat({ max: 0xffffffff }),
      fc.integer({ min: 0, max: 0xffff }),
      fc.integer({ min: 0, max: 0xffff }),
      fc.uint8Array({ maxLength: 64 }),
      async (cookie, error, flags, type, bytes) => {
        const data = Buffer.from(bytes);
        const simple = encodeSimpleReply(error, cookie, error === 0 ? data : undefined);
        const s = await readReply(bufferReader(simple), () => data.length);
        assert.deepEqual(s, { kind: 'simple', error, cookie, data: error === 0 && data.length ? data : null });
        const chunk = encodeChunk(flags, type, cookie, data);
        const c = await readReply(bufferReader(chunk), () => 0);
        assert.deepEqual(c, { kind: 'chunk', flags, type, cookie, payload: data });
      },
    ),
  );
});

// ---- out-of-range offsets against the server ------------------------------------------------

const TWO53 = 2n ** 53n;
const hugeOffsetArb = fc.oneof(
  fc.constantFrom(TWO53 - 1n, TWO53, TWO53 + 1n, 2n ** 64n - 1n, 2n ** 63n, 2n ** 32n, BigInt(SIZE), BigInt(SIZE) - 1n),
  fc.bigInt({ min: TWO53 - (1n << 20n), max: TWO53 + (1n << 20n) }),
  fc.bigInt({ min: BigInt(SIZE), max: 2n ** 64n - 1n }),
  fc.bigUintN(64),
);

test('wire: offsets near and beyond 2^53 get EINVAL / ENOSPC and the connection goes on', async () => {
  for (const structured of [false, true]) {
    const device = new MemoryDevice(SIZE, EXPORT);
    exportsProvider.current = { name: EXPORT, device };
    const r = await Raw.connect(port);
    try {
      await handshake(r, structured ? 'structured' : 'simple-go', EXPORT);
      await fc.assert(
        fc.asyncProperty(
          fc.constantFrom(P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_CACHE, P.NBD_CMD_BLOCK_STATUS),
          fc.bigUintN(64),
          hugeOffsetArb,
          fc.integer({ min: 1, max: 4096 }),
          async (type, cookie, offset, length) => {
            // Keep only requests that really are out of range (offset + length > size).
            if (offset + BigInt(length) <= BigInt(SIZE)) return;
            const payload = type === P.NBD_CMD_WRITE ? Buffer.alloc(length, 0xab) : undefined;
            r.write(encodeRequest({ type, flags: 0, cookie, offset, length, payload }));
            const rep = await readReply((n) => r.read(n), () => 0);
            assert.equal(rep.cookie, cookie, 'the reply carries the request cookie bit for bit');
            const expected = type === P.NBD_CMD_WRITE || type === P.NBD_CMD_WRITE_ZEROES ? P.NBD_ENOSPC : P.NBD_EINVAL;
            if (rep.kind === 'simple') {
              assert.equal(rep.error, expected);
              assert.equal(rep.data, null);
            } else {
              assert.ok(structured);
              assert.ok(rep.flags & P.NBD_REPLY_FLAG_DONE);
              const reqLike = { t: 'read', offset: Number(offset), length } as unknown as Cmd;
              assert.equal(checkErrorChunk(rep, reqLike), expected);
            }
          },
        ),
        { numRuns: 300 },
      );
      // The connection still works and the device was not touched.
      const cookie = 0xfedcba9876543210n;
      r.write(encodeRequest({ type: P.NBD_CMD_WRITE, flags: 0, cookie, offset: BigInt(SIZE - 3), length: 3, payload: Buffer.from([1, 2, 3]) }));
      const w = await readReply((n) => r.read(n), () => 0);
      assert.equal(w.cookie, cookie);
      assert.ok(w.kind === 'simple' ? w.error === 0 : w.type === P.NBD_REPLY_TYPE_NONE);
      assert.deepEqual(device.blockStatus(0, SIZE), [
        { offset: 0, length: 16 * CHUNK, flags: 3 },
        { offset: 16 * CHUNK, length: SIZE - 16 * CHUNK, flags: 0 },
      ]);
    } finally {
      r.destroy();
    }
  }
});
