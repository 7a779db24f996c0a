/**
 * Seeded fuzz test of the NBD server: random handshakes, garbage options,
 * garbage / truncated requests and abrupt closes on many connections, then
 * checks that the server still serves, that nothing threw, that no
 * connection leaked, and that devices were only modified by requests the
 * fuzzer really sent (a canary export nobody writes stays all holes).
 *
 * The seed is printed; rerun a failure with DUET_FUZZ_SEED=<seed>.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { createHash } from 'node:crypto';
import { NbdServer } from '../../src/nbd/server.js';
import { StaticExports } from '../../src/nbd/exports.js';
import type { WriteOptions, ZeroOptions } from '../../src/blockdev/types.js';
import { silentLogger } from '../../src/util/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import * as P from '../../src/nbd/protocol.js';
import { LIMITS } from '../../src/nbd/protocol.js';
import { Raw } from './raw-client.js';
import { PassthroughDevice } from './passthrough-device.js';

// ---- process-level failure recorders ---------------------------------------------

const uncaught: unknown[] = [];
const onUncaught = (err: unknown): void => void uncaught.push(err);
const onUnhandled = (reason: unknown): void => void uncaught.push(reason);
process.on('uncaughtException', onUncaught);
process.on('unhandledRejection', onUnhandled);

// ---- seeded randomness -------------------------------------------------------------

const SEED = process.env.DUET_FUZZ_SEED !== undefined ? Number(process.env.DUET_FUZZ_SEED) >>> 0 : (Date.now() ^ (process.pid << 16)) >>> 0;

class Rng {
  private a: number;
  constructor(seed: number) {
    this.a = seed >>> 0;
  }
  /** mulberry32 */
  next(): number {
    this.a = (this.a + 0x6d2b79f5) | 0;
    let t = Math.imul(this.a ^ (this.a >>> 15), 1 | this.a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }
  bool(p = 0.5): boolean {
    return this.next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)];
  }
  u32(): number {
    return (this.next() * 4294967296) >>> 0;
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = (this.next() * 256) | 0;
    return b;
  }
}

// ---- a minimal raw client ----------------------------------------------------------


const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u16 = (v: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v & 0xffff);
  return b;
};

function optionHeader(opt: number, length: number, magic = P.IHAVEOPT): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(magic, 0);
  h.writeUInt32BE(opt >>> 0, 8);
  h.writeUInt32BE(length >>> 0, 12);
  return h;
}
const option = (opt: number, data: Buffer = Buffer.alloc(0)): Buffer => Buffer.concat([optionHeader(opt, data.length), data]);

async function optionReply(r: Raw): Promise<{ opt: number; type: number; data: Buffer }> {
  const h = await r.read(20);
  assert.equal(h.readBigUInt64BE(0), P.NBD_OPT_REPLY_MAGIC, 'option reply magic');
  return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await r.read(h.readUInt32BE(16)) };
}

async function greet(r: Raw, clientFlags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<void> {
  const g = await r.read(18);
  assert.equal(g.readBigUInt64BE(0), P.NBDMAGIC);
  assert.equal(g.readBigUInt64BE(8), P.IHAVEOPT);
  r.write(u32(clientFlags));
}

const infoData = (name: string | Buffer, requests: number[] = []): Buffer => {
  const n = typeof name === 'string' ? Buffer.from(name) : name;
  return Buffer.concat([u32(n.length), n, u16(requests.length), ...requests.map(u16)]);
};
const metaData = (name: string, queries: string[]): Buffer => {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u32(queries.length), ...queries.flatMap((q) => [u32(Buffer.byteLength(q)), Buffer.from(q)])]);
};

interface HandshakeChoice {
  structured: boolean;
  meta: boolean;
  exportName: boolean;
  name: string;
}

/** A well-formed handshake; returns the export size. */
async function handshake(r: Raw, h: HandshakeChoice): Promise<number> {
  await greet(r);
  if (h.structured) {
    r.write(option(P.NBD_OPT_STRUCTURED_REPLY));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
    if (h.meta) {
      r.write(option(P.NBD_OPT_SET_META_CONTEXT, metaData(h.name, [P.BASE_ALLOCATION])));
      assert.equal((await optionReply(r)).type, P.NBD_REP_META_CONTEXT);
      assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
    }
  }
  if (h.exportName) {
    r.write(option(P.NBD_OPT_EXPORT_NAME, Buffer.from(h.name)));
    const b = await r.read(10);
    return Number(b.readBigUInt64BE(0));
  }
  r.write(option(P.NBD_OPT_GO, infoData(h.name)));
  let size = -1;
  for (;;) {
    const rep = await optionReply(r);
    if (rep.type === P.NBD_REP_ACK) return size;
    assert.equal(rep.type, P.NBD_REP_INFO, `GO refused: ${rep.data.toString()}`);
    if (rep.data.readUInt16BE(0) === P.NBD_INFO_EXPORT) size = Number(rep.data.readBigUInt64BE(2));
  }
}

function requestHeader(type: number, cookie: bigint, offset: bigint, length: number, flags = 0, magic = P.NBD_REQUEST_MAGIC): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(magic >>> 0, 0);
  h.writeUInt16BE(flags & 0xffff, 4);
  h.writeUInt16BE(type & 0xffff, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeBigUInt64BE(offset, 16);
  h.writeUInt32BE(length >>> 0, 24);
  return h;
}

async function simpleReply(r: Raw, dataLength = 0): Promise<{ error: number; cookie: bigint; data: Buffer }> {
  const h = await r.read(16);
  assert.equal(h.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC, 'simple reply magic');
  const error = h.readUInt32BE(4);
  return { error, cookie: h.readBigUInt64BE(8), data: error === 0 && dataLength ? await r.read(dataLength) : Buffer.alloc(0) };
}

/** Any reply (simple or one structured chunk) to a request without data: [cookie, error]. */
async function anyErrorReply(r: Raw): Promise<{ cookie: bigint; error: number }> {
  const m = (await r.read(4)).readUInt32BE(0);
  if (m === P.NBD_SIMPLE_REPLY_MAGIC) {
    const h = await r.read(12);
    return { error: h.readUInt32BE(0), cookie: h.readBigUInt64BE(4) };
  }
  assert.equal(m, P.NBD_STRUCTURED_REPLY_MAGIC, 'reply magic');
  const h = await r.read(16);
  const payload = await r.read(h.readUInt32BE(12));
  const type = h.readUInt16BE(2);
  assert.ok(h.readUInt16BE(0) & P.NBD_REPLY_FLAG_DONE);
  return { cookie: h.readBigUInt64BE(4), error: type & 0x8000 ? payload.readUInt32BE(0) : 0 };
}

// ---- devices with spies --------------------------------------------------------------

const hash = (b: Buffer): string => createHash('sha1').update(b).digest('hex');

/** Records every modifying call; `allowed` decides whether it was legitimately requested. */
class SpyDevice extends PassthroughDevice {
  readonly violations: string[] = [];
  mutations = 0;
  constructor(
    size: number,
    name: string,
    private readonly allowed: (key: string) => boolean,
  ) {
    super(size, name);
  }
  private note(key: string): void {
    this.mutations++;
    if (!this.allowed(key)) this.violations.push(key);
  }
  override write(offset: number, data: Buffer, o?: WriteOptions) {
    this.note(`w:${offset}:${data.length}:${hash(data)}`);
    return super.write(offset, data, o);
  }
  override trim(offset: number, length: number, o?: WriteOptions) {
    this.note(`t:${offset}:${length}`);
    return super.trim(offset, length, o);
  }
  override writeZeroes(offset: number, length: number, o?: ZeroOptions) {
    this.note(`z:${offset}:${length}`);
    return super.writeZeroes(offset, length, o);
  }
}

const MiB = 1024 * 1024;
const SIZE_A = 8 * MiB + 123;
const SIZE_B = 2 * MiB;
/** Modifications the fuzzer (or a well-behaved client) really asked for on export A. */
const intents = new Set<string>();
const devA = new SpyDevice(SIZE_A, 'A', (k) => intents.has(k));
const devB = new SpyDevice(SIZE_B, 'B', () => false); // the canary: nobody may modify it

let server: NbdServer;
let port: number;

before(async () => {
  server = new NbdServer({
    exports: new StaticExports([
      { name: 'A', device: devA }, // first: also the default export ""
      { name: 'B', device: devB },
    ]),
    log: silentLogger(),
  });
  port = ((await server.listen('127.0.0.1', 0)) as net.AddressInfo).port;
});

after(async () => {
  await server.close();
  process.off('uncaughtException', onUncaught);
  process.off('unhandledRejection', onUnhandled);
});

async function waitNoConnections(timeoutMs: number): Promise<number> {
  const until = Date.now() + timeoutMs;
  while (server.connectionCount > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
  return server.connectionCount;
}

async function wellBehaved(offset: number): Promise<void> {
  const c = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'A' });
  try {
    const data = Buffer.from(`well-behaved ${offset} ${SEED}`);
    intents.add(`w:${offset}:${data.length}:${hash(data)}`);
    await c.write(offset, data);
    assert.deepEqual(await c.read(offset, data.length), data);
    await c.flush();
  } finally {
    await c.disconnect();
  }
}

// ---- the fuzzer ----------------------------------------------------------------------------

/** Names a fuzzed client may select: never the canary "B". */
function fuzzName(rng: Rng): Buffer {
  const n = rng.pick(['', 'A', 'nope', 'a', 'AA', '\u0000', 'rand']);
  if (n !== 'rand') return Buffer.from(n);
  const b = rng.bytes(rng.int(0, 12));
  return b.toString('latin1') === 'B' || b.toString('utf8') === 'B' ? Buffer.from('C') : b;
}

async function sendPieces(r: Raw, data: Buffer, rng: Rng): Promise<void> {
  if (data.length > 64 * 1024 || rng.bool(0.4)) {
    r.write(data);
    return;
  }
  for (let pos = 0; pos < data.length && !r.closed; ) {
    const n = rng.int(1, Math.max(1, Math.min(data.length - pos, rng.pick([1, 7, 64, 4096]))));
    r.write(data.subarray(pos, pos + n));
    pos += n;
    if (rng.bool(0.3)) await new Promise((res) => setImmediate(res));
  }
}

const stats = { randomBytes: 0, options: 0, transmission: 0, bigWrites: 0, handshakeErrors: 0 };
let bigWritesLeft = 3;

/** Random bytes as a handshake (sometimes after valid client flags). */
async function fuzzRandomBytes(r: Raw, rng: Rng): Promise<void> {
  stats.randomBytes++;
  if (rng.bool(0.3)) r.write(u32(rng.int(0, 3)));
  else if (rng.bool(0.3)) r.write(u32(rng.u32()));
  await sendPieces(r, rng.bytes(rng.int(0, 400)), rng);
}

/** A valid greeting, then garbage, truncated or odd options. */
async function fuzzOptions(r: Raw, rng: Rng): Promise<void> {
  stats.options++;
  await greet(r, rng.bool(0.85) ? rng.int(0, 3) : rng.u32());
  const count = rng.int(1, 10);
  for (let i = 0; i < count && !r.closed; i++) {
    const kind = rng.int(0, 9);
    const opt = rng.bool(0.6) ? rng.int(0, 12) : rng.u32();
    switch (kind) {
      case 0: // random option, consistent length
        await sendPieces(r, option(opt, rng.bytes(rng.int(0, 80))), rng);
        break;
      case 1: {
        // structured-looking INFO / GO / meta data with random internal lengths
        const name = fuzzName(rng);
        const which = rng.pick([P.NBD_OPT_INFO, P.NBD_OPT_GO, P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT, P.NBD_OPT_STRUCTURED_REPLY, P.NBD_OPT_LIST]);
        let data: Buffer;
        if (which === P.NBD_OPT_INFO || which === P.NBD_OPT_GO) {
          data = Buffer.concat([u32(rng.bool(0.7) ? name.length : rng.u32()), name, u16(rng.int(0, 4)), rng.bytes(2 * rng.int(0, 4))]);
        } else if (which === P.NBD_OPT_LIST_META_CONTEXT || which === P.NBD_OPT_SET_META_CONTEXT) {
          const q = Buffer.from(rng.pick(['base:allocation', 'base:', 'qemu:dirty-bitmap:x', 'nocolon', '']));
          data = Buffer.concat([u32(rng.bool(0.7) ? name.length : rng.u32()), name, u32(rng.bool(0.7) ? 1 : rng.u32()), u32(rng.bool(0.7) ? q.length : rng.u32()), q]);
        } else {
          data = rng.bool(0.5) ? Buffer.alloc(0) : rng.bytes(rng.int(1, 8));
        }
        await sendPieces(r, option(which, data), rng);
        break;
      }
      case 2: {
        // declared length longer than the data, then the connection ends
        const n = rng.int(1, 5000);
        r.write(Buffer.concat([optionHeader(opt, n), rng.bytes(rng.int(0, n - 1))]));
        return;
      }
      case 3: {
        // declared length shorter than the data: the excess is read as the next header
        const data = rng.bytes(rng.int(1, 100));
        r.write(Buffer.concat([optionHeader(opt, rng.int(0, data.length - 1)), data]));
        break;
      }
      case 4: {
        // huge declared length with partial data, then the connection ends
        const n = rng.bool(0.5) ? 0xffffffff : rng.int(LIMITS.optionLengthMax + 1, 0xffffffff);
        r.write(optionHeader(opt === P.NBD_OPT_EXPORT_NAME ? P.NBD_OPT_INFO : opt, n));
        const partial = rng.int(0, 200_000);
        for (let sent = 0; sent < partial && !r.closed; sent += 16384) {
          r.write(rng.bytes(Math.min(16384, partial - sent)));
          if (rng.bool(0.3)) await new Promise((res) => setImmediate(res));
        }
        return;
      }
      case 5: // bad magic
        r.write(Buffer.concat([optionHeader(opt, 0, rng.u64()), rng.bytes(rng.int(0, 20))]));
        return;
      case 6: {
        // oversized option sent in full (TOO_BIG, skipped)
        const n = rng.int(LIMITS.optionLengthMax + 1, LIMITS.optionLengthMax + 100_000);
        r.write(optionHeader(opt === P.NBD_OPT_EXPORT_NAME ? P.NBD_OPT_LIST : opt, n));
        r.write(rng.bytes(n));
        break;
      }
      case 7: // EXPORT_NAME with a random name (never "B"): may enter transmission
        await sendPieces(r, option(P.NBD_OPT_EXPORT_NAME, fuzzName(rng)), rng);
        if (rng.bool(0.5)) await sendPieces(r, rng.bytes(rng.int(0, 100)), rng);
        return;
      case 8: // truncated header
        r.write(optionHeader(opt, rng.int(0, 100)).subarray(0, rng.int(1, 15)));
        return;
      default: // ABORT
        r.write(option(P.NBD_OPT_ABORT, rng.bool(0.8) ? Buffer.alloc(0) : rng.bytes(rng.int(1, 10))));
        return;
    }
    if (rng.bool(0.3)) await new Promise((res) => setTimeout(res, rng.int(0, 3)));
  }
}

const COMMANDS = [P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_FLUSH, P.NBD_CMD_TRIM, P.NBD_CMD_CACHE, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_BLOCK_STATUS];

function registerIntent(type: number, offset: bigint, length: number, payload?: Buffer): void {
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) return; // can never be executed
  const o = Number(offset);
  if (type === P.NBD_CMD_WRITE && payload) intents.add(`w:${o}:${length}:${hash(payload)}`);
  if (type === P.NBD_CMD_TRIM) intents.add(`t:${o}:${length}`);
  if (type === P.NBD_CMD_WRITE_ZEROES) intents.add(`z:${o}:${length}`);
}

function fuzzOffset(rng: Rng, size: number): bigint {
  switch (rng.int(0, 5)) {
    case 0:
      return 2n ** 64n - BigInt(rng.int(1, 5000));
    case 1:
      return rng.u64();
    case 2:
      return 2n ** 53n + BigInt(rng.int(-5000, 5000));
    case 3:
      return BigInt(size - rng.int(0, 100));
    default:
      return BigInt(rng.int(0, size - 1));
  }
}

/** A valid handshake to A, then random, odd and truncated requests. */
async function fuzzTransmission(r: Raw, rng: Rng): Promise<void> {
  stats.transmission++;
  const h: HandshakeChoice = { structured: rng.bool(), meta: rng.bool(), exportName: rng.bool(0.3), name: rng.bool(0.7) ? 'A' : '' };
  try {
    await handshake(r, h);
  } catch (err) {
    stats.handshakeErrors++;
    throw err;
  }
  const count = rng.int(1, 14);
  for (let i = 0; i < count && !r.closed; i++) {
    const cookie = rng.u64();
    const kind = rng.int(0, 15);
    let type = rng.pick(COMMANDS);
    let flags = rng.bool(0.8) ? 0 : rng.pick([P.NBD_CMD_FLAG_FUA, P.NBD_CMD_FLAG_DF, P.NBD_CMD_FLAG_REQ_ONE, P.NBD_CMD_FLAG_NO_HOLE, P.NBD_CMD_FLAG_FAST_ZERO]);
    let offset = BigInt(rng.int(0, SIZE_A - 1));
    let length = rng.int(1, Math.min(70_000, SIZE_A - Number(offset)));
    switch (kind) {
      case 0: // bad magic: the server drops the connection
        r.write(Buffer.concat([requestHeader(type, cookie, offset, length, flags, rng.u32()), rng.bytes(rng.int(0, 64))]));
        return;
      case 1: // unknown command
        type = rng.int(8, 0xffff);
        break;
      case 2: // unknown flags
        flags = rng.int(0, 0xffff);
        break;
      case 3: {
        // write > 32 MiB: without its payload (the connection ends), with part of it, or (rarely) all of it
        length = rng.int(LIMITS.requestBytesMax + 1, rng.bool(0.5) ? LIMITS.requestBytesMax + MiB : 0xffffffff);
        r.write(requestHeader(P.NBD_CMD_WRITE, cookie, offset, length, flags));
        if (bigWritesLeft > 0 && length <= LIMITS.requestBytesMax + MiB && rng.bool(0.5)) {
          bigWritesLeft--;
          stats.bigWrites++;
          const piece = Buffer.alloc(MiB, 0x77);
          for (let left = length; left > 0 && !r.closed; left -= piece.length) r.write(left >= piece.length ? piece : piece.subarray(0, left));
          continue; // stream in sync: go on
        }
        r.write(rng.bytes(rng.int(0, 100_000)));
        return;
      }
      case 4: // offsets near 2^64 / 2^53 / the end
        offset = fuzzOffset(rng, SIZE_A);
        length = rng.int(1, 8192);
        break;
      case 5: // zero length
        length = 0;
        break;
      case 6: // DF (valid only with structured replies) on a read
        type = P.NBD_CMD_READ;
        flags = P.NBD_CMD_FLAG_DF;
        break;
      case 7: // block status (valid only with base:allocation)
        type = P.NBD_CMD_BLOCK_STATUS;
        flags = rng.bool() ? P.NBD_CMD_FLAG_REQ_ONE : 0;
        length = rng.int(1, 0xffffffff);
        break;
      case 8: // truncated header, then the connection ends
        r.write(requestHeader(type, cookie, offset, length, flags).subarray(0, rng.int(1, 27)));
        return;
      case 9: // write with part of its payload, then the connection ends
        type = P.NBD_CMD_WRITE;
        r.write(Buffer.concat([requestHeader(type, cookie, offset, length, flags), rng.bytes(rng.int(0, length - 1))]));
        return;
      case 10: // DISC (with random flags sometimes), then maybe more garbage
        r.write(requestHeader(P.NBD_CMD_DISC, cookie, 0n, 0, rng.bool(0.7) ? 0 : rng.int(1, 0xffff)));
        if (rng.bool(0.5)) r.write(rng.bytes(rng.int(0, 100)));
        return;
      case 11: // random 28 bytes
        await sendPieces(r, rng.bytes(28), rng);
        return;
      default: // a valid-looking request
        break;
    }
    const payload = type === P.NBD_CMD_WRITE ? rng.bytes(length) : undefined;
    registerIntent(type, offset, length, payload);
    await sendPieces(r, payload ? Buffer.concat([requestHeader(type, cookie, offset, length, flags), payload]) : requestHeader(type, cookie, offset, length, flags), rng);
    if (rng.bool(0.3)) {
      // wait a little for replies, then ignore them
      await new Promise((res) => setTimeout(res, rng.int(0, 3)));
      r.discard();
    }
  }
}

async function fuzzConnection(index: number): Promise<void> {
  const rng = new Rng((SEED ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0);
  const r = await Raw.connect(port);
  const kill = setTimeout(() => r.destroy(), 3000);
  try {
    const scenario = rng.int(0, 9);
    if (scenario < 2) await fuzzRandomBytes(r, rng);
    else if (scenario < 5) await fuzzOptions(r, rng);
    else await fuzzTransmission(r, rng);
    // End: abrupt close, half-close and wait, or wait for the server to give up.
    const end = rng.int(0, 2);
    if (end === 0) r.destroy();
    else if (end === 1) {
      r.socket.end();
      await r.waitClosed(200);
    } else await r.waitClosed(rng.int(0, 50));
  } finally {
    clearTimeout(kill);
    r.destroy();
  }
}

// ---- the tests --------------------------------------------------------------------------------

test(`fuzz: ${300} random connections (seed ${SEED}; rerun with DUET_FUZZ_SEED=${SEED})`, async (t) => {
  t.diagnostic(`fuzz seed ${SEED} (DUET_FUZZ_SEED=${SEED} to reproduce)`);
  console.log(`# nbd fuzz seed: ${SEED}`);
  const CONNECTIONS = 300;
  const WORKERS = 12;
  const BUDGET_MS = 15_000;
  const start = Date.now();
  let next = 0;
  let done = 0;
  const failures: string[] = [];
  await Promise.all(
    Array.from({ length: WORKERS }, async () => {
      while (next < CONNECTIONS && Date.now() - start < BUDGET_MS) {
        const i = next++;
        try {
          await fuzzConnection(i);
        } catch (err) {
          failures.push(`connection ${i}: ${(err as Error).stack ?? err}`);
        }
        done++;
      }
    }),
  );
  t.diagnostic(`${done} connections in ${Date.now() - start} ms: ${JSON.stringify(stats)}, ${devA.mutations} device modifications on A`);
  assert.ok(done >= 100, `only ${done} connections in the time budget`);
  // A valid handshake must always succeed, whatever happened before.
  assert.deepEqual(failures, [], 'fuzz client errors (a valid handshake failed?)');

  assert.deepEqual(uncaught, [], 'no uncaught exception / unhandled rejection');

  // Still serving: write + read + flush on a fresh connection.
  await wellBehaved(SIZE_A - 100);
  await wellBehaved(12345);

  // Only requested modifications reached A; the canary B was never touched.
  assert.deepEqual(devA.violations, [], 'export A was modified by something the fuzzer never sent');
  assert.deepEqual(devB.violations, [], 'canary export B was modified');
  assert.equal(devB.mutations, 0);
  assert.equal(devB.inner.allocatedBytes, 0, 'canary export B is all holes');
  const c = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'B' });
  try {
    const all = await c.read(0, SIZE_B);
    assert.ok(all.equals(Buffer.alloc(SIZE_B)), 'canary export B reads as zeros');
  } finally {
    await c.disconnect();
  }
  assert.deepEqual(uncaught, []);

  // Last (so that the checks above run even when this fails): no connection leaked.
  const left = await waitNoConnections(3000);
  if (left) t.diagnostic(`leaked server connections: ${JSON.stringify(describeConnections())}`);
  assert.equal(left, 0, 'every fuzzed connection is closed on the server too (no leak)');
});

/** Server-side state of the connections still open (for the failure message). */
function describeConnections(): object[] {
  // Private fields, read for diagnostics only.
  const conns = (server as unknown as { connections?: Set<{ id: number; socket: net.Socket; transmission: unknown; queue: { length: number } }> }).connections;
  if (!(conns instanceof Set)) return [];
  return [...conns].map((c) => ({
    id: c.id,
    inTransmission: c.transmission !== null,
    readyState: c.socket?.readyState,
    destroyed: c.socket?.destroyed,
    socketPaused: c.socket?.isPaused(),
    readableLength: c.socket?.readableLength,
    queued: c.queue?.length,
  }));
}

/** Connections open now, once the count has settled. */
async function settledConnectionCount(): Promise<number> {
  let last = -1;
  for (let i = 0; i < 50 && server.connectionCount !== last; i++) {
    last = server.connectionCount;
    await new Promise((r) => setTimeout(r, 20));
  }
  return server.connectionCount;
}

test('regression: an option of 2^32-1 bytes whose data never arrives, then close: no leak, server fine', async () => {
  const baseline = await settledConnectionCount(); // the fuzz test above may have leaked some (see the bug test below)
  for (const partial of [0, 1000, 300_000]) {
    const r = await Raw.connect(port);
    await greet(r);
    r.write(optionHeader(P.NBD_OPT_INFO, 0xffffffff));
    if (partial) r.write(Buffer.alloc(partial, 1));
    await new Promise((res) => setTimeout(res, 20));
    assert.equal(r.closed, false, 'the server waits for the rest');
    r.destroy();
  }
  assert.equal(await settledConnectionCount(), baseline, 'connections forgotten after close');
  await wellBehaved(3 * MiB);
  assert.deepEqual(uncaught, []);
});

test('regression: a 64 MiB write streamed in full gets EINVAL and the connection continues', async () => {
  for (const structured of [false, true]) {
    const r = await Raw.connect(port);
    try {
      await handshake(r, { structured, meta: structured, exportName: false, name: 'A' });
      const length = 64 * MiB;
      r.write(requestHeader(P.NBD_CMD_WRITE, 0xabcdef0123456789n, 0n, length));
      const piece = Buffer.alloc(MiB, 0x99);
      for (let i = 0; i < length / MiB; i++) r.write(piece);
      const rep = await anyErrorReply(r);
      assert.equal(rep.cookie, 0xabcdef0123456789n);
      assert.equal(rep.error, P.NBD_EINVAL);
      // The next request is parsed from the right place.
      const data = Buffer.from('after the big write');
      intents.add(`w:${5 * MiB}:${data.length}:${hash(data)}`);
      r.write(Buffer.concat([requestHeader(P.NBD_CMD_WRITE, 1n, BigInt(5 * MiB), data.length), data]));
      const w = await anyErrorReply(r);
      assert.deepEqual(w, { cookie: 1n, error: 0 });
      r.write(requestHeader(P.NBD_CMD_FLUSH, 2n, 0n, 0));
      assert.deepEqual(await anyErrorReply(r), { cookie: 2n, error: 0 });
      assert.equal(r.closed, false);
    } finally {
      r.destroy();
    }
  }
  const check = Buffer.alloc(MiB);
  devA.inner.read(0, check);
  assert.ok(!check.includes(Buffer.alloc(256, 0x99)), 'no run of the refused payload reached the device');
  assert.deepEqual(devA.violations, []);
});

test('regression: the handshake timeout exists and is finite', () => {
  assert.ok(Number.isFinite(LIMITS.handshakeTimeoutMs) && LIMITS.handshakeTimeoutMs > 0 && LIMITS.handshakeTimeoutMs <= 5 * 60_000);
});

test('regression: a stalled handshake does not hold up other clients', async () => {
  const stalled = await Raw.connect(port);
  const greeted = await Raw.connect(port);
  try {
    await greet(greeted); // greeted and then silent
    await wellBehaved(6 * MiB);
    assert.equal(stalled.closed, false);
    assert.equal(greeted.closed, false);
  } finally {
    stalled.destroy();
    greeted.destroy();
  }
});

test(`regression: more than optionsPerHandshakeMax (${LIMITS.optionsPerHandshakeMax}) options: disconnect`, async () => {
  const r = await Raw.connect(port);
  try {
    await greet(r);
    r.write(Buffer.concat(Array.from({ length: LIMITS.optionsPerHandshakeMax + 5 }, () => option(P.NBD_OPT_STRUCTURED_REPLY))));
    assert.ok(await r.waitClosed(3000), 'server disconnects');
  } finally {
    r.destroy();
  }
});

test('specific malformed requests: each gets the right error and the connection goes on', async () => {
  const r = await Raw.connect(port);
  try {
    await handshake(r, { structured: false, meta: false, exportName: false, name: 'A' });
    const cases: [string, Buffer, number][] = [
      ['unknown command', requestHeader(99, 10n, 0n, 512), P.NBD_EINVAL],
      ['unknown flags on read', requestHeader(P.NBD_CMD_READ, 11n, 0n, 512, 0x8000), P.NBD_EINVAL],
      ['DF without structured replies', requestHeader(P.NBD_CMD_READ, 12n, 0n, 512, P.NBD_CMD_FLAG_DF), P.NBD_EINVAL],
      ['block status without base:allocation', requestHeader(P.NBD_CMD_BLOCK_STATUS, 13n, 0n, 512), P.NBD_EINVAL],
      ['zero-length read', requestHeader(P.NBD_CMD_READ, 14n, 0n, 0), P.NBD_EINVAL],
      ['zero-length write', requestHeader(P.NBD_CMD_WRITE, 15n, 0n, 0), P.NBD_EINVAL],
      ['read at 2^64-512', requestHeader(P.NBD_CMD_READ, 16n, 2n ** 64n - 512n, 512), P.NBD_EINVAL],
      ['write at 2^64-4', Buffer.concat([requestHeader(P.NBD_CMD_WRITE, 17n, 2n ** 64n - 4n, 4), Buffer.from([1, 2, 3, 4])]), P.NBD_ENOSPC],
      ['write-zeroes past the end', requestHeader(P.NBD_CMD_WRITE_ZEROES, 18n, BigInt(SIZE_A - 1), 2), P.NBD_ENOSPC],
      ['trim at 2^53', requestHeader(P.NBD_CMD_TRIM, 19n, 2n ** 53n, 1), P.NBD_EINVAL],
      ['read > 32 MiB', requestHeader(P.NBD_CMD_READ, 20n, 0n, LIMITS.requestBytesMax + 1), P.NBD_EINVAL],
    ];
    for (const [what, bytes, error] of cases) {
      const cookie = bytes.readBigUInt64BE(8);
      r.write(bytes);
      const rep = await simpleReply(r);
      assert.equal(rep.cookie, cookie, what);
      assert.equal(rep.error, error, what);
    }
    // A normal read still works on this connection.
    r.write(requestHeader(P.NBD_CMD_READ, 30n, 0n, 16));
    const ok = await simpleReply(r, 16);
    assert.equal(ok.error, 0);
    // Bad magic ends the connection.
    r.write(requestHeader(P.NBD_CMD_READ, 31n, 0n, 16, 0, 0x12345678));
    assert.ok(await r.waitClosed(2000), 'bad request magic closes the connection');
  } finally {
    r.destroy();
  }
  assert.deepEqual(devA.violations, []);
  assert.deepEqual(uncaught, []);
});

/**
 * BUG (found by this fuzz test): when the server ends a connection itself
 * (bad request magic, or NBD_CMD_DISC), Transmission.stop() pauses the socket
 * (src/nbd/transmission.ts, stop(): socket.pause()) and Connection.disconnect()
 * half-closes it (src/nbd/server.ts, disconnect(): socket.end()). Any bytes that arrive after the pause
 * stay in the socket's readable buffer; a paused Readable with buffered data
 * never emits 'end', so net.Socket (allowHalfOpen: false) never destroys
 * itself, 'close' never fires and the Connection stays in server.connections
 * with an open fd until server.close(), even after the client has gone.
 * One leaked fd per such connection: a hostile client can exhaust them.
 */
test('bug: a connection the server ends (bad magic / DISC) is never closed if more bytes arrive after it (fd leak)', async () => {
  const baseline = await settledConnectionCount();
  const cases: [string, Buffer, Buffer][] = [
    ['bad request magic, 100 more bytes 20 ms later', requestHeader(P.NBD_CMD_READ, 1n, 0n, 16, 0, 0xdeadbeef), Buffer.alloc(100, 1)],
    ['NBD_CMD_DISC, 100 more bytes 20 ms later', requestHeader(P.NBD_CMD_DISC, 2n, 0n, 0), Buffer.alloc(100, 2)],
    ['bad request magic followed at once by 1 MiB', Buffer.concat([requestHeader(P.NBD_CMD_READ, 3n, 0n, 16, 0, 0xdeadbeef), Buffer.alloc(MiB, 3)]), Buffer.alloc(0)],
  ];
  const leaked: string[] = [];
  for (const [what, first, later] of cases) {
    const r = await Raw.connect(port, true); // half-open: we may still send after the server's FIN
    try {
      await handshake(r, { structured: false, meta: false, exportName: false, name: 'A' });
      r.write(first);
      await new Promise((res) => setTimeout(res, 20));
      if (later.length) r.write(later);
      await new Promise((res) => setTimeout(res, 20));
    } finally {
      r.destroy(); // the client is certainly gone now
    }
    const now = await settledConnectionCount();
    if (now > baseline + leaked.length) leaked.push(what);
  }
  assert.deepEqual(leaked, [], `server kept these connections open after the client closed: ${JSON.stringify(describeConnections())}`);
});
