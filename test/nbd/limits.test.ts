/**
 * One test per cap in LIMITS (src/nbd/protocol.ts): the server really
 * enforces it, at the boundary, and keeps going where the spec says it should.
 */
import { test, before, after, mock } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { NbdServer } from '../../src/nbd/server.js';
import { StaticExports } from '../../src/nbd/exports.js';
import type { Extent } from '../../src/blockdev/types.js';
import { silentLogger } from '../../src/util/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import * as P from '../../src/nbd/protocol.js';
import { LIMITS } from '../../src/nbd/protocol.js';
import { Raw } from './raw-client.js';
import { PassthroughDevice } from './passthrough-device.js';

// ---- a minimal raw client ----------------------------------------------------


const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u16 = (v: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
};

function option(opt: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(P.IHAVEOPT, 0);
  h.writeUInt32BE(opt >>> 0, 8);
  h.writeUInt32BE(declaredLength >>> 0, 12);
  return Buffer.concat([h, data]);
}

async function optionReply(r: Raw): Promise<{ opt: number; type: number; data: Buffer }> {
  const h = await r.read(20);
  assert.equal(h.readBigUInt64BE(0), P.NBD_OPT_REPLY_MAGIC, 'option reply magic');
  return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await r.read(h.readUInt32BE(16)) };
}

async function greet(r: Raw): Promise<void> {
  const g = await r.read(18);
  assert.equal(g.readBigUInt64BE(0), P.NBDMAGIC);
  assert.equal(g.readBigUInt64BE(8), P.IHAVEOPT);
  r.write(u32(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
}

const infoData = (name: string | Buffer, requests: number[] = []): Buffer => {
  const n = typeof name === 'string' ? Buffer.from(name) : name;
  return Buffer.concat([u32(n.length), n, u16(requests.length), ...requests.map(u16)]);
};
const metaData = (name: string, queries: (string | Buffer)[]): Buffer => {
  const n = Buffer.from(name);
  const qs = queries.map((q) => (typeof q === 'string' ? Buffer.from(q) : q));
  return Buffer.concat([u32(n.length), n, u32(qs.length), ...qs.flatMap((q) => [u32(q.length), q])]);
};

/** Send GO; returns the INFO replies by type. */
async function go(r: Raw, name: string): Promise<Map<number, Buffer>> {
  r.write(option(P.NBD_OPT_GO, infoData(name, [P.NBD_INFO_BLOCK_SIZE])));
  const infos = new Map<number, Buffer>();
  for (;;) {
    const rep = await optionReply(r);
    assert.equal(rep.opt, P.NBD_OPT_GO);
    if (rep.type === P.NBD_REP_ACK) return infos;
    assert.equal(rep.type, P.NBD_REP_INFO, `GO refused: 0x${rep.type.toString(16)} ${rep.data.toString()}`);
    infos.set(rep.data.readUInt16BE(0), rep.data);
  }
}

async function handshake(r: Raw, name: string, structured: boolean): Promise<Map<number, Buffer>> {
  await greet(r);
  if (structured) {
    r.write(option(P.NBD_OPT_STRUCTURED_REPLY));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
    r.write(option(P.NBD_OPT_SET_META_CONTEXT, metaData(name, [P.BASE_ALLOCATION])));
    assert.equal((await optionReply(r)).type, P.NBD_REP_META_CONTEXT);
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
  }
  return go(r, name);
}

function request(type: number, cookie: bigint, offset: number | bigint, length: number, flags = 0, payload?: Buffer): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length >>> 0, 24);
  return payload ? Buffer.concat([h, payload]) : h;
}

/** Simple reply: [error, cookie, data]. */
async function simpleReply(r: Raw, dataLength = 0): Promise<{ error: number; cookie: bigint; data: Buffer }> {
  const h = await r.read(16);
  assert.equal(h.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC, 'simple reply magic');
  const error = h.readUInt32BE(4);
  return { error, cookie: h.readBigUInt64BE(8), data: error === 0 && dataLength ? await r.read(dataLength) : Buffer.alloc(0) };
}

async function chunk(r: Raw): Promise<{ flags: number; type: number; cookie: bigint; payload: Buffer }> {
  const h = await r.read(20);
  assert.equal(h.readUInt32BE(0), P.NBD_STRUCTURED_REPLY_MAGIC, 'structured reply magic');
  return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), payload: await r.read(h.readUInt32BE(16)) };
}

/** A quick write / read-back / flush on a raw simple-reply connection. */
async function rawSmoke(r: Raw, offset = 4096): Promise<void> {
  const data = Buffer.from('limits smoke test');
  r.write(request(P.NBD_CMD_WRITE, 0x1111n, offset, data.length, 0, data));
  assert.equal((await simpleReply(r)).error, 0);
  r.write(request(P.NBD_CMD_READ, 0x2222n, offset, data.length));
  const rd = await simpleReply(r, data.length);
  assert.equal(rd.cookie, 0x2222n);
  assert.deepEqual(rd.data, data);
  r.write(request(P.NBD_CMD_FLUSH, 0x3333n, 0, 0));
  assert.equal((await simpleReply(r)).error, 0);
}

// ---- device wrappers ----------------------------------------------------------

/** Delegates to a MemoryDevice; reads can be held until release(), extents overridden. */
class WrappedDevice extends PassthroughDevice {
  reads = 0;
  private gated = false;
  private waiting: (() => void)[] = [];
  extentsOverride: ((offset: number, length: number) => Extent[] | Promise<Extent[]>) | null = null;

  constructor(size: number, name = 'wrapped') {
    super(size, name);
  }
  hold(): void {
    this.gated = true;
  }
  release(): void {
    this.gated = false;
    const w = this.waiting;
    this.waiting = [];
    for (const f of w) f();
  }
  override read(offset: number, into: Buffer): void | Promise<void> {
    this.reads++;
    if (!this.gated) return this.inner.read(offset, into);
    return new Promise<void>((resolve) => this.waiting.push(resolve)).then(() => this.inner.read(offset, into));
  }
  override blockStatus(offset: number, length: number) {
    return this.extentsOverride ? this.extentsOverride(offset, length) : this.inner.blockStatus(offset, length);
  }
}

// ---- server ------------------------------------------------------------------------

const MiB = 1024 * 1024;
const small = new WrappedDevice(4 * MiB, 'small');
const big = new WrappedDevice(LIMITS.requestBytesMax * 2, 'big'); // sparse: costs nothing until written
let server: NbdServer;
let port: number;

before(async () => {
  server = new NbdServer({
    exports: new StaticExports([
      { name: 'small', device: small },
      { name: 'big', device: big },
    ]),
    log: silentLogger(),
  });
  port = ((await server.listen('127.0.0.1', 0)) as net.AddressInfo).port;
});

after(async () => {
  small.release();
  big.release();
  await server.close();
});

async function withRaw(fn: (r: Raw) => Promise<void>): Promise<void> {
  const r = await Raw.connect(port);
  try {
    await fn(r);
  } finally {
    r.destroy();
  }
}

// ---- the caps -------------------------------------------------------------------------

test('LIMITS: every cap is a positive finite number', () => {
  for (const [k, v] of Object.entries(LIMITS)) assert.ok(Number.isFinite(v) && v > 0, `${k} = ${v}`);
});

test(`LIMITS.optionLengthMax (${LIMITS.optionLengthMax}): a larger option gets NBD_REP_ERR_TOO_BIG and haggling continues`, async () => {
  await withRaw(async (r) => {
    await greet(r);
    // One byte over: refused as too big, its data skipped.
    r.write(option(P.NBD_OPT_INFO, Buffer.alloc(LIMITS.optionLengthMax + 1, 0x41)));
    const tooBig = await optionReply(r);
    assert.equal(tooBig.opt, P.NBD_OPT_INFO);
    assert.equal(tooBig.type, P.NBD_REP_ERR_TOO_BIG);
    // An unknown option far over the cap, streamed in pieces: also TOO_BIG.
    const huge = 3 * LIMITS.optionLengthMax + 7;
    r.write(option(0x7777, Buffer.alloc(0), huge));
    for (let sent = 0; sent < huge; sent += 10_000) {
      r.write(Buffer.alloc(Math.min(10_000, huge - sent), 0x42));
      await new Promise((res) => setImmediate(res));
    }
    const tooBig2 = await optionReply(r);
    assert.equal(tooBig2.opt, 0x7777);
    assert.equal(tooBig2.type, P.NBD_REP_ERR_TOO_BIG);
    // Exactly the cap: read and parsed (and refused as malformed, not as too big).
    r.write(option(P.NBD_OPT_INFO, Buffer.alloc(LIMITS.optionLengthMax, 0)));
    const atCap = await optionReply(r);
    assert.equal(atCap.type, P.NBD_REP_ERR_INVALID);
    // Framing intact: the handshake goes on and the export works.
    await go(r, 'small');
    await rawSmoke(r);
  });
});

test(`LIMITS.optionLengthMax: NBD_OPT_EXPORT_NAME over the cap ends the connection (no reply is possible)`, async () => {
  await withRaw(async (r) => {
    await greet(r);
    r.write(option(P.NBD_OPT_EXPORT_NAME, Buffer.alloc(0), LIMITS.optionLengthMax + 1));
    assert.ok(await r.waitClosed(), 'server closes the connection');
  });
});

test(`LIMITS.optionsPerHandshakeMax (${LIMITS.optionsPerHandshakeMax}): the option after the cap ends the connection`, async () => {
  const N = LIMITS.optionsPerHandshakeMax;
  // N-1 refused options, then GO as option number N: allowed.
  await withRaw(async (r) => {
    await greet(r);
    r.write(Buffer.concat(Array.from({ length: N - 1 }, () => option(0x4242))));
    for (let i = 0; i < N - 1; i++) assert.equal((await optionReply(r)).type, P.NBD_REP_ERR_UNSUP);
    await go(r, 'small');
    await rawSmoke(r);
  });
  // N options answered, the N+1th gets no reply: disconnect.
  await withRaw(async (r) => {
    await greet(r);
    r.write(Buffer.concat(Array.from({ length: N + 1 }, () => option(0x4242))));
    for (let i = 0; i < N; i++) assert.equal((await optionReply(r)).type, P.NBD_REP_ERR_UNSUP);
    assert.ok(await r.waitClosed(), 'server closes the connection after the cap');
    assert.equal(r.available, 0, 'no reply to the option over the cap');
  });
});

test(`LIMITS.stringBytesMax (${LIMITS.stringBytesMax}): longer export names and queries are NBD_REP_ERR_INVALID`, async () => {
  const M = LIMITS.stringBytesMax;
  await withRaw(async (r) => {
    await greet(r);
    // INFO with a name one byte over the cap.
    r.write(option(P.NBD_OPT_INFO, infoData(Buffer.alloc(M + 1, 0x61))));
    const over = await optionReply(r);
    assert.equal(over.opt, P.NBD_OPT_INFO);
    assert.equal(over.type, P.NBD_REP_ERR_INVALID);
    // Exactly the cap: parsed, then simply not found.
    r.write(option(P.NBD_OPT_INFO, infoData(Buffer.alloc(M, 0x61))));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ERR_UNKNOWN);
    // GO over the cap: same, and the handshake goes on.
    r.write(option(P.NBD_OPT_GO, infoData(Buffer.alloc(M + 1, 0x61))));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ERR_INVALID);
    // Meta-context query strings and names are capped too.
    r.write(option(P.NBD_OPT_STRUCTURED_REPLY));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
    const longQuery = Buffer.concat([Buffer.from('base:'), Buffer.alloc(M + 1 - 5, 0x62)]);
    r.write(option(P.NBD_OPT_LIST_META_CONTEXT, metaData('small', [longQuery])));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ERR_INVALID);
    const capQuery = Buffer.concat([Buffer.from('base:'), Buffer.alloc(M - 5, 0x62)]);
    r.write(option(P.NBD_OPT_LIST_META_CONTEXT, metaData('small', [capQuery])));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK, 'a query of exactly the cap is fine (matches nothing)');
    r.write(option(P.NBD_OPT_LIST_META_CONTEXT, metaData('x'.repeat(M + 1), [])));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ERR_INVALID);
    await go(r, 'small');
    // Structured, no meta context: writes still answered (simple or NONE).
    r.write(request(P.NBD_CMD_FLUSH, 9n, 0, 0));
    const h = await r.read(4);
    assert.ok([P.NBD_SIMPLE_REPLY_MAGIC, P.NBD_STRUCTURED_REPLY_MAGIC].includes(h.readUInt32BE(0)));
  });
});

test(`LIMITS.metaQueriesMax (${LIMITS.metaQueriesMax}): more queries in one option are NBD_REP_ERR_INVALID`, async () => {
  const M = LIMITS.metaQueriesMax;
  await withRaw(async (r) => {
    await greet(r);
    r.write(option(P.NBD_OPT_STRUCTURED_REPLY));
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
    const others = Array.from({ length: M }, (_, i) => `other${i}:x`);
    // M+1 queries: refused, for LIST and SET.
    for (const opt of [P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT]) {
      r.write(option(opt, metaData('small', [P.BASE_ALLOCATION, ...others])));
      const rep = await optionReply(r);
      assert.equal(rep.opt, opt);
      assert.equal(rep.type, P.NBD_REP_ERR_INVALID);
    }
    // Exactly M: accepted, base:allocation selected.
    r.write(option(P.NBD_OPT_SET_META_CONTEXT, metaData('small', [P.BASE_ALLOCATION, ...others.slice(1)])));
    const ctx = await optionReply(r);
    assert.equal(ctx.type, P.NBD_REP_META_CONTEXT);
    assert.equal(ctx.data.subarray(4).toString(), P.BASE_ALLOCATION);
    assert.equal((await optionReply(r)).type, P.NBD_REP_ACK);
    await go(r, 'small');
    r.write(request(P.NBD_CMD_BLOCK_STATUS, 77n, 0, 4096));
    const bs = await chunk(r);
    assert.equal(bs.cookie, 77n);
    assert.equal(bs.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
  });
});

test(`LIMITS.requestBytesMax (${LIMITS.requestBytesMax}): larger reads and writes get EINVAL, the connection goes on`, async () => {
  const M = LIMITS.requestBytesMax;
  await withRaw(async (r) => {
    const infos = await handshake(r, 'big', false);
    const bsInfo = infos.get(P.NBD_INFO_BLOCK_SIZE);
    assert.ok(bsInfo, 'NBD_INFO_BLOCK_SIZE sent');
    assert.ok(bsInfo.readUInt32BE(10) <= M, 'advertised maximum block size is within the cap');
    // Read one byte over: EINVAL, no data follows.
    r.write(request(P.NBD_CMD_READ, 1n, 0, M + 1));
    const over = await simpleReply(r);
    assert.equal(over.cookie, 1n);
    assert.equal(over.error, P.NBD_EINVAL);
    // Read the maximum: fine.
    r.write(request(P.NBD_CMD_READ, 2n, 0, M));
    const atCap = await simpleReply(r, M);
    assert.equal(atCap.error, 0);
    assert.equal(atCap.data.length, M);
    // Write one byte over, payload streamed: EINVAL, payload skipped, stream in sync.
    r.write(request(P.NBD_CMD_WRITE, 3n, 0, M + 1));
    const piece = Buffer.alloc(MiB, 0x5a);
    for (let left = M + 1; left > 0; left -= piece.length) r.write(left >= piece.length ? piece : piece.subarray(0, left));
    const w = await simpleReply(r);
    assert.equal(w.cookie, 3n);
    assert.equal(w.error, P.NBD_EINVAL);
    assert.equal(big.inner.allocatedBytes, 0, 'the oversized write did not reach the device');
    // Commands without a payload are not limited by the block size.
    r.write(request(P.NBD_CMD_WRITE_ZEROES, 4n, 0, M + MiB));
    assert.equal((await simpleReply(r)).error, 0);
    await rawSmoke(r);
  });
});

test(`LIMITS.inFlightPerConnectionMax (${LIMITS.inFlightPerConnectionMax}): the server stops reading requests until some complete`, async () => {
  const M = LIMITS.inFlightPerConnectionMax;
  const N = 200;
  const pattern = Buffer.alloc(N * 16);
  for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7 + 3) & 0xff;
  small.inner.write(MiB, pattern);
  small.reads = 0;
  small.hold();
  try {
    await withRaw(async (r) => {
      await handshake(r, 'small', false);
      r.write(Buffer.concat(Array.from({ length: N }, (_, i) => request(P.NBD_CMD_READ, BigInt(1000 + i), MiB + 16 * i, 16))));
      // Give the server ample time to read everything it is willing to.
      const until = Date.now() + 300;
      while (Date.now() < until && small.reads < N) await new Promise((res) => setTimeout(res, 10));
      assert.ok(small.reads > 0, 'reads reached the device');
      assert.ok(small.reads <= M, `${small.reads} reads reached the device; at most ${M} may be in flight`);
      assert.equal(r.available, 0, 'no reply before the device completes');
      small.release();
      const seen = new Set<bigint>();
      for (let i = 0; i < N; i++) {
        const rep = await simpleReply(r, 16);
        assert.equal(rep.error, 0);
        const k = Number(rep.cookie - 1000n);
        assert.ok(k >= 0 && k < N && !seen.has(rep.cookie), `cookie ${rep.cookie}`);
        seen.add(rep.cookie);
        assert.deepEqual(rep.data, pattern.subarray(16 * k, 16 * k + 16));
      }
      assert.equal(small.reads, N);
      await rawSmoke(r);
    });
  } finally {
    small.release();
  }
});

test(`LIMITS.queuedReplyBytesMax (${LIMITS.queuedReplyBytesMax / MiB} MiB): a client that does not read its replies stops being read`, async () => {
  const M = LIMITS.requestBytesMax;
  const N = 8; // 8 x 32 MiB = 256 MiB of replies
  big.reads = 0;
  await withRaw(async (r) => {
    await handshake(r, 'big', false);
    r.socket.pause(); // stop reading replies
    r.write(Buffer.concat(Array.from({ length: N }, (_, i) => request(P.NBD_CMD_READ, BigInt(i + 1), 0, M))));
    await new Promise((res) => setTimeout(res, 400));
    // 64 MiB queued + kernel socket buffers: about 3 reads; never all of them.
    const allowed = Math.ceil(LIMITS.queuedReplyBytesMax / M) + 2;
    assert.ok(big.reads >= 1, 'some reads were processed');
    assert.ok(big.reads <= allowed, `${big.reads} reads processed while nothing was read (allowed ${allowed})`);
    r.socket.resume();
    for (let i = 0; i < N; i++) {
      const rep = await simpleReply(r, M);
      assert.equal(rep.error, 0);
    }
    assert.equal(big.reads, N);
  });
});

test(`LIMITS.extentsPerReplyMax (${LIMITS.extentsPerReplyMax}): a device returning 5000 extents gives at most the cap`, async () => {
  const K = 5000;
  const E = 16;
  for (const asPromise of [false, true]) {
    small.extentsOverride = (offset) => {
      const list: Extent[] = Array.from({ length: K }, (_, i) => ({ offset: offset + i * E, length: E, flags: i % 2 ? 3 : 0 }));
      return asPromise ? Promise.resolve(list) : list;
    };
    try {
      await withRaw(async (r) => {
        await handshake(r, 'small', true);
        const offset = 100;
        for (const [cookie, flags] of [
          [1n, 0],
          [2n, P.NBD_CMD_FLAG_REQ_ONE],
        ] as const) {
          r.write(request(P.NBD_CMD_BLOCK_STATUS, cookie, offset, K * E, flags));
          const c = await chunk(r);
          assert.equal(c.cookie, cookie);
          assert.equal(c.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
          assert.ok(c.flags & P.NBD_REPLY_FLAG_DONE);
          const n = (c.payload.length - 4) / 8;
          if (flags) assert.equal(n, 1, 'REQ_ONE: one extent');
          else assert.equal(n, LIMITS.extentsPerReplyMax, 'capped at extentsPerReplyMax');
          let total = 0;
          for (let i = 0; i < n; i++) {
            assert.equal(c.payload.readUInt32BE(4 + 8 * i), E);
            assert.equal(c.payload.readUInt32BE(8 + 8 * i), i % 2 ? 3 : 0);
            total += E;
          }
          assert.ok(total <= K * E);
        }
      });
    } finally {
      small.extentsOverride = null;
    }
  }
});

test(`LIMITS.handshakeTimeoutMs (${LIMITS.handshakeTimeoutMs} ms): a stalled handshake is dropped, a finished one is not`, async () => {
  assert.ok(Number.isFinite(LIMITS.handshakeTimeoutMs) && LIMITS.handshakeTimeoutMs > 0);
  const settle = async (): Promise<void> => {
    for (let i = 0; i < 20; i++) await new Promise((res) => setImmediate(res));
  };
  // Earlier tests' connections must be gone first (their closes would skew the count).
  for (let i = 0; i < 200 && server.connectionCount > 0; i++) await new Promise((res) => setTimeout(res, 10));
  assert.equal(server.connectionCount, 0, 'connections of earlier tests are closed');
  mock.timers.enable({ apis: ['setTimeout'] });
  try {
    const stalled = await Raw.connect(port);
    const done = await Raw.connect(port);
    try {
      for (let i = 0; i < 10_000 && server.connectionCount < 2; i++) await new Promise((res) => setImmediate(res));
      assert.equal(server.connectionCount, 2);
      // `done` completes its handshake (Raw.read's own timers are mocked too: data is already there).
      await greet(done);
      done.write(option(P.NBD_OPT_GO, infoData('small')));
      for (;;) {
        while (done.available < 20) await new Promise((res) => setImmediate(res));
        const rep = await optionReply(done);
        if (rep.type === P.NBD_REP_ACK) break;
      }
      mock.timers.tick(LIMITS.handshakeTimeoutMs - 1);
      await settle();
      assert.equal(stalled.closed, false, 'not dropped before the timeout');
      mock.timers.tick(1);
      for (let i = 0; i < 200 && !stalled.closed; i++) await new Promise((res) => setImmediate(res));
      assert.equal(stalled.closed, true, 'stalled handshake dropped at the timeout');
      mock.timers.tick(10 * LIMITS.handshakeTimeoutMs);
      await settle();
      assert.equal(done.closed, false, 'a connection past its handshake is not timed out');
    } finally {
      stalled.destroy();
      done.destroy();
    }
  } finally {
    mock.timers.reset();
  }
});

test('limits: the server still serves a well-behaved client afterwards', async () => {
  const c = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'small' });
  try {
    const data = Buffer.from('still here');
    await c.write(2 * MiB, data);
    assert.deepEqual(await c.read(2 * MiB, data.length), data);
    await c.flush();
  } finally {
    await c.disconnect();
  }
});
