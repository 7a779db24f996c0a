/**
 * NbdClient / NbdDevice against real nbdkit processes (TCP on 127.0.0.1 and
 * unix sockets), plus a tiny fake server for protocol violations.
 */
import { test } from 'node:test';
import type { TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes, randomInt } from 'node:crypto';
import { NbdClient, NbdError, type NbdConnectOptions } from '../../src/nbd/client.js';
import { NbdDevice } from '../../src/nbd/device.js';
import { BlockDeviceError, EXTENT_HOLE, EXTENT_ZERO } from '../../src/blockdev/types.js';
import {
  IHAVEOPT,
  NBDMAGIC,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_OPT_GO,
  NBD_OPT_REPLY_MAGIC,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_INFO_EXPORT,
  NBD_REPLY_FLAG_DONE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBD_CMD_WRITE,
} from '../../src/nbd/protocol.js';

const MiB = 1024 * 1024;

// ---- helpers ---------------------------------------------------------------

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Resolve with the promise, or reject after ms. */
async function within<T>(ms: number, p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, rej) => (timer = setTimeout(() => rej(new Error(`${what}: still waiting after ${ms} ms`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

interface Nbdkit {
  opts: NbdConnectOptions;
  pid: number;
  /** SIGKILL now (for connection-loss tests). */
  kill(): void;
}

/**
 * Start `nbdkit -f ARGS` listening on a random TCP port of 127.0.0.1 (retried
 * if the port is taken) or on a unix socket in a temp dir. Ready when nbdkit
 * has written its pidfile (after it listens). Stopped and cleaned in t.after.
 */
async function startNbdkit(t: TestContext, args: string[], mode: 'tcp' | 'unix' = 'tcp'): Promise<Nbdkit> {
  const dir = mkdtempSync(join(tmpdir(), 'duet-nbdc-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  for (let attempt = 0; attempt < 10; attempt++) {
    const pidfile = join(dir, `nbdkit-${attempt}.pid`);
    const sock = join(dir, `nbd-${attempt}.sock`);
    const port = randomInt(20000, 40000);
    const listen = mode === 'tcp' ? ['-i', '127.0.0.1', '-p', String(port)] : ['-U', sock];
    const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-P', pidfile, ...listen, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    let exited = false;
    const exit = new Promise<void>((resolve) => child.once('exit', () => ((exited = true), resolve())));
    child.once('error', () => (exited = true));
    const stop = async (): Promise<void> => {
      if (exited) return;
      child.kill('SIGTERM');
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([exit, new Promise<void>((r) => (timer = setTimeout(r, 5000)))]);
      clearTimeout(timer);
      if (!exited) {
        child.kill('SIGKILL');
        await within(5000, exit, 'nbdkit SIGKILL');
      }
    };
    // Poll for readiness every 50 ms for up to 5 s.
    const deadline = Date.now() + 5000;
    while (!exited && !existsSync(pidfile) && Date.now() < deadline) await sleep(50);
    if (!exited && existsSync(pidfile)) {
      t.after(stop);
      const pid = child.pid as number;
      return {
        opts: mode === 'tcp' ? { host: '127.0.0.1', port } : { path: sock },
        pid,
        kill: () => {
          if (!exited) child.kill('SIGKILL');
        },
      };
    }
    await stop();
    if (mode === 'unix' || !/address already in use|bind/i.test(stderr)) {
      throw new Error(`nbdkit ${args.join(' ')} did not start: ${stderr.trim() || 'timed out'}`);
    }
  }
  throw new Error('nbdkit: no free port found after 10 attempts');
}

async function connect(t: TestContext, opts: NbdConnectOptions): Promise<NbdClient> {
  const c = await NbdClient.connect(opts);
  t.after(() => c.close());
  return c;
}

async function rejectsWith(p: Promise<unknown>, code: string, message?: RegExp): Promise<NbdError> {
  try {
    await within(10_000, p, `expected ${code}`);
  } catch (err) {
    assert.ok(err instanceof NbdError, `expected NbdError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (message) assert.match(err.message, message);
    return err;
  }
  assert.fail(`expected rejection with ${code}`);
}

// ---- a fake NBD server ------------------------------------------------------

interface FakeRequest {
  cmd: number;
  flags: number;
  cookie: Buffer;
  offset: number;
  length: number;
}

function optReply(opt: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(NBD_OPT_REPLY_MAGIC, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(type, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

function structuredChunk(cookie: Buffer, flags: number, type: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  cookie.copy(h, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

/**
 * A minimal fixed-newstyle server: structured replies, base:allocation (id 1),
 * NBD_OPT_GO for a 1 MiB export with `flags`; each request goes to onRequest.
 * With `silent`, it accepts connections and never speaks.
 */
async function fakeServer(
  t: TestContext,
  flags: number,
  onRequest: (sock: net.Socket, req: FakeRequest, all: FakeRequest[]) => void,
  silent = false,
): Promise<NbdConnectOptions> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('error', () => undefined);
    sock.on('close', () => sockets.delete(sock));
    if (silent) return;
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
    sock.write(hello);
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    const all: FakeRequest[] = [];
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16) return;
          const opt = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          buf = buf.subarray(16 + len);
          if (opt === NBD_OPT_STRUCTURED_REPLY) sock.write(optReply(opt, NBD_REP_ACK));
          else if (opt === NBD_OPT_SET_META_CONTEXT) {
            const ctx = Buffer.concat([Buffer.from([0, 0, 0, 1]), Buffer.from('base:allocation')]);
            sock.write(Buffer.concat([optReply(opt, NBD_REP_META_CONTEXT, ctx), optReply(opt, NBD_REP_ACK)]));
          } else if (opt === NBD_OPT_GO) {
            const info = Buffer.alloc(12);
            info.writeUInt16BE(NBD_INFO_EXPORT, 0);
            info.writeBigUInt64BE(BigInt(MiB), 2);
            info.writeUInt16BE(flags, 10);
            sock.write(Buffer.concat([optReply(opt, NBD_REP_INFO, info), optReply(opt, NBD_REP_ACK)]));
            phase = 'transmission';
          } else sock.write(optReply(opt, NBD_REP_ERR_UNSUP));
        } else {
          if (buf.length < 28) return;
          const req: FakeRequest = {
            flags: buf.readUInt16BE(4),
            cmd: buf.readUInt16BE(6),
            cookie: Buffer.from(buf.subarray(8, 16)),
            offset: Number(buf.readBigUInt64BE(16)),
            length: buf.readUInt32BE(24),
          };
          const total = 28 + (req.cmd === NBD_CMD_WRITE ? req.length : 0);
          if (buf.length < total) return;
          buf = buf.subarray(total);
          all.push(req);
          onRequest(sock, req, all);
        }
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const addr = server.address() as net.AddressInfo;
  return { host: '127.0.0.1', port: addr.port };
}

// ---- tests -----------------------------------------------------------------

test('GO over TCP: export fields and 200 pipelined random writes/reads capped by maxInFlight', async (t) => {
  const srv = await startNbdkit(t, ['memory', '64M']);
  const c = await connect(t, { ...srv.opts, maxInFlight: 16 });
  assert.equal(c.size, 64 * MiB);
  assert.ok(c.structuredReplies);
  assert.equal(typeof c.metaContexts.get('base:allocation'), 'number');
  assert.ok(c.transmissionFlags & NBD_FLAG_HAS_FLAGS);
  assert.ok(c.transmissionFlags & NBD_FLAG_SEND_FLUSH);
  assert.equal(c.transmissionFlags & NBD_FLAG_READ_ONLY, 0);

  // 200 distinct 64 KiB slots; random length and in-slot offset.
  const slots = new Set<number>();
  while (slots.size < 200) slots.add(randomInt(0, 1024));
  const writes = [...slots].map((slot) => {
    const len = randomInt(1, 64 * 1024);
    const off = slot * 64 * 1024 + randomInt(0, 64 * 1024 - len + 1);
    return { off, data: randomBytes(len) };
  });
  let maxSeen = 0;
  const sample = (): void => {
    maxSeen = Math.max(maxSeen, c.inFlightCount);
  };
  const wp = writes.map((w) => c.write(w.off, w.data).then(sample));
  sample();
  assert.equal(c.inFlightCount, 16);
  assert.equal(c.queuedCount, 200 - 16);
  await within(20_000, Promise.all(wp), 'writes');
  const rp = writes.map((w) => c.read(w.off, w.data.length).then((b) => (sample(), b)));
  assert.ok(c.inFlightCount <= 16);
  const got = await within(20_000, Promise.all(rp), 'reads');
  got.forEach((b, i) => assert.ok(b.equals(writes[i].data), `read ${i} at ${writes[i].off} differs`));
  assert.ok(maxSeen <= 16, `saw ${maxSeen} in flight`);
  assert.equal(c.inFlightCount, 0);
  await within(5000, c.disconnect(), 'disconnect');
  assert.ok(c.closed);
});

test('NBD_OPT_EXPORT_NAME over a unix socket', async (t) => {
  const srv = await startNbdkit(t, ['memory', '16M'], 'unix');
  const c = await connect(t, { ...srv.opts, useExportNameOption: true });
  assert.equal(c.size, 16 * MiB);
  assert.ok(c.structuredReplies, 'structured replies negotiated before EXPORT_NAME');
  const data = randomBytes(100_000);
  await c.write(12345, data);
  assert.ok((await c.read(12345, data.length)).equals(data));
  const ext = await c.blockStatus(0, 1 * MiB);
  assert.equal(ext.reduce((a, e) => a + e.length, 0), 1 * MiB);
  await within(5000, c.disconnect(), 'disconnect');
});

test('simple replies (structuredReplies: false) round trip; block status refused locally', async (t) => {
  const srv = await startNbdkit(t, ['memory', '16M'], 'unix');
  const c = await connect(t, { ...srv.opts, structuredReplies: false });
  assert.equal(c.structuredReplies, false);
  assert.equal(c.metaContexts.size, 0);
  const data = randomBytes(70_000);
  await c.write(MiB - 5, data);
  const [a, b] = await Promise.all([c.read(MiB - 5, data.length), c.read(8 * MiB, 4096)]);
  assert.ok(a.equals(data));
  assert.ok(b.equals(Buffer.alloc(4096)));
  await rejectsWith(c.blockStatus(0, 4096), 'ENOTSUP', /structured replies were not negotiated/);
  await c.flush();
  await c.disconnect();
});

test('FUA write + flush, trim, writeZeroes (noHole, fastZero), cache', async (t) => {
  const srv = await startNbdkit(t, ['memory', '64M']);
  const c = await connect(t, srv.opts);
  const data = randomBytes(256 * 1024);
  await c.write(MiB, data, { fua: true });
  await c.flush();
  assert.ok((await c.read(MiB, data.length)).equals(data));

  await c.trim(MiB, 64 * 1024, { fua: true });
  assert.ok((await c.read(MiB, 64 * 1024)).equals(Buffer.alloc(64 * 1024)), 'trimmed range reads as zeros on memory');

  await c.writeZeroes(MiB + 64 * 1024, 64 * 1024, { noHole: true });
  assert.ok((await c.read(MiB + 64 * 1024, 64 * 1024)).equals(Buffer.alloc(64 * 1024)));
  await c.writeZeroes(MiB + 128 * 1024, 64 * 1024, { fastZero: true, fua: true });
  assert.ok((await c.read(MiB + 128 * 1024, 64 * 1024)).equals(Buffer.alloc(64 * 1024)));
  // The last quarter survived untouched.
  assert.ok((await c.read(MiB + 192 * 1024, 64 * 1024)).equals(data.subarray(192 * 1024)));

  await c.cache(0, 4 * MiB);
  await c.read(0, 4096, { df: true });
  await c.disconnect();
});

test('block status on a sparse memory disk: hole, data, and reqOne', async (t) => {
  const srv = await startNbdkit(t, ['memory', '64M']);
  const c = await connect(t, srv.opts);
  const fresh = await c.blockStatus(0, 4 * MiB);
  assert.equal(fresh.reduce((a, e) => a + e.length, 0), 4 * MiB);
  for (const e of fresh) assert.equal(e.flags, EXTENT_HOLE | EXTENT_ZERO);

  await c.write(MiB, randomBytes(64 * 1024));
  const ext = await c.blockStatus(0, 4 * MiB);
  assert.equal(ext.reduce((a, e) => a + e.length, 0), 4 * MiB, 'extents cover the request exactly');
  let at = 0;
  const flagsAt = (pos: number): number => {
    let o = 0;
    for (const e of ext) {
      if (pos < o + e.length) return e.flags;
      o += e.length;
    }
    return -1;
  };
  assert.equal(flagsAt(0), EXTENT_HOLE | EXTENT_ZERO);
  assert.equal(flagsAt(MiB), 0);
  assert.equal(flagsAt(MiB + 64 * 1024 - 1), 0);
  assert.equal(flagsAt(MiB + 64 * 1024), EXTENT_HOLE | EXTENT_ZERO);
  at = ext[0].length;
  assert.equal(at, MiB, 'first extent is the hole before the data');

  const one = await c.blockStatus(0, 4 * MiB, { reqOne: true });
  assert.equal(one.length, 1);
  assert.deepEqual(one[0], { length: MiB, flags: EXTENT_HOLE | EXTENT_ZERO });
  await rejectsWith(c.blockStatus(0, 4096, { context: 'qemu:dirty-bitmap:x' }), 'ENOTSUP', /not negotiated/);
  await c.disconnect();
});

test('injected EIO (error filter) surfaces as NbdError EIO; the connection stays usable', async (t) => {
  const srv = await startNbdkit(t, ['--filter=error', 'memory', '64M', 'error-pread=EIO', 'error-pread-rate=1']);
  for (const structuredReplies of [true, false]) {
    const c = await connect(t, { ...srv.opts, structuredReplies });
    const err = await rejectsWith(c.read(4096, 4096), 'EIO', /read 4096\+4096 .*EIO/);
    assert.equal(err.errno, 5);
    await c.write(0, Buffer.alloc(512, 1));
    await c.flush();
    await rejectsWith(c.read(0, 512), 'EIO');
    assert.equal(c.closed, false);
    await c.flush();
    await c.disconnect();
  }
});

test('list, info and unknown exports (exportname filter)', async (t) => {
  const srv = await startNbdkit(t, [
    '--filter=exportname', 'memory', '32M',
    'exportname=myexp', 'exportname=other', 'exportname-list=explicit', 'exportname-strict=true', 'exportdesc=fixed:hello',
  ]);
  const list = await within(10_000, NbdClient.list(srv.opts), 'list');
  assert.deepEqual(list.map((e) => e.name), ['myexp', 'other']);
  assert.equal(list[0].description, 'hello');

  const info = await NbdClient.info({ ...srv.opts, exportName: 'myexp' });
  assert.equal(info.size, 32 * MiB);
  assert.ok(info.flags & NBD_FLAG_HAS_FLAGS);
  assert.equal(info.description, 'hello');

  const c = await connect(t, { ...srv.opts, exportName: 'myexp' });
  assert.equal(c.size, 32 * MiB);
  assert.equal(c.exportName, 'myexp');
  await c.disconnect();

  const where = `127\\.0\\.0\\.1:${srv.opts.port}`;
  const e1 = await rejectsWith(NbdClient.connect({ ...srv.opts, exportName: 'nope' }), 'ENOENT', new RegExp(`^export "nope" not found on ${where} \\(NBD_REP_ERR_UNKNOWN`));
  assert.ok(e1.message.length < 300);
  await rejectsWith(NbdClient.info({ ...srv.opts, exportName: 'nope' }), 'ENOENT', /export "nope" not found/);
  await rejectsWith(NbdClient.connect({ ...srv.opts, exportName: 'nope', useExportNameOption: true }), 'ECONNRESET', /export "nope" not found or refused .*NBD_OPT_EXPORT_NAME/);
});

test('local refusals: alignment, maximum, range, unsupported zero, read-only', async (t) => {
  const srv = await startNbdkit(t, [
    '--filter=blocksize-policy', '--filter=nozero', 'memory', '64M',
    'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=1M',
  ], 'unix');
  const c = await connect(t, srv.opts);
  assert.deepEqual(c.blockSize, { minimum: 512, preferred: 4096, maximum: MiB });
  assert.equal(c.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES, 0);
  await rejectsWith(c.read(1, 512), 'EINVAL', /aligned/);
  await rejectsWith(c.read(0, 2 * MiB), 'EINVAL', /maximum block size/);
  await rejectsWith(c.read(64 * MiB - 512, 1024), 'EINVAL', /outside the export/);
  await rejectsWith(c.read(-512, 512), 'EINVAL');
  await rejectsWith(c.writeZeroes(0, 4096), 'ENOTSUP', /NBD_FLAG_SEND_WRITE_ZEROES/);
  assert.equal(c.inFlightCount, 0);
  assert.ok((await c.read(0, 512)).equals(Buffer.alloc(512)), 'connection unaffected');

  const ro = await startNbdkit(t, ['-r', 'memory', '1M']);
  const r = await connect(t, ro.opts);
  assert.ok(r.transmissionFlags & NBD_FLAG_READ_ONLY);
  await rejectsWith(r.write(0, Buffer.alloc(512)), 'EPERM', /read-only/);
  await rejectsWith(r.trim(0, 512), 'EPERM');
  assert.equal((await r.read(0, 10)).length, 10);
  await r.disconnect();
  await c.disconnect();
});

test('refuses commands the server did not advertise (fake server)', async (t) => {
  let seen = 0;
  const opts = await fakeServer(t, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_TRIM, () => seen++);
  const c = await connect(t, opts);
  await rejectsWith(c.flush(), 'ENOTSUP', /NBD_FLAG_SEND_FLUSH/);
  await rejectsWith(c.write(0, Buffer.alloc(10), { fua: true }), 'ENOTSUP', /NBD_FLAG_SEND_FUA/);
  await rejectsWith(c.cache(0, 10), 'ENOTSUP', /NBD_FLAG_SEND_CACHE/);
  await rejectsWith(c.read(0, 10, { df: true }), 'ENOTSUP', /DF/);
  await rejectsWith(c.writeZeroes(0, 10), 'ENOTSUP');
  await sleep(50);
  assert.equal(seen, 0, 'nothing was sent');
  c.close();
});

test('connection loss rejects pending and later requests', async (t) => {
  const srv = await startNbdkit(t, ['--filter=delay', 'memory', '16M', 'delay-read=10']);
  const c = await connect(t, srv.opts);
  const pending = [c.read(0, 4096), c.read(8192, 4096), c.read(MiB, 512)];
  await sleep(100);
  assert.equal(c.inFlightCount, 3);
  srv.kill();
  for (const p of pending) await rejectsWith(p, 'ESHUTDOWN', /closed by the server|failed/);
  assert.ok(c.closed);
  await rejectsWith(c.flush(), 'ESHUTDOWN');
  await rejectsWith(c.write(0, Buffer.alloc(1)), 'ESHUTDOWN');
});

test('an unknown non-error chunk type hard-disconnects and rejects everything', async (t) => {
  const opts = await fakeServer(t, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH, (sock, req, all) => {
    // Answer once three requests arrived, with an unknown chunk type 42.
    if (all.length === 3) sock.write(structuredChunk(req.cookie, NBD_REPLY_FLAG_DONE, 42, Buffer.alloc(4)));
  });
  const c = await connect(t, opts);
  const ps = [c.read(0, 512), c.read(512, 512), c.flush()];
  for (const p of ps) await rejectsWith(p, 'EPROTO', /unknown reply chunk type 42/);
  assert.ok(c.closed);
  await rejectsWith(c.read(0, 1), 'EPROTO');
});

test('bad reply magic hard-disconnects', async (t) => {
  const opts = await fakeServer(t, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH, (sock) => sock.write(Buffer.alloc(32, 0xab)));
  const c = await connect(t, opts);
  await rejectsWith(c.flush(), 'EPROTO', /bad reply magic 0xabababab/);
});

test('a read reply that does not cover the request is rejected', async (t) => {
  const opts = await fakeServer(t, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH, (sock, req) => {
    const p = Buffer.alloc(8 + 100);
    p.writeBigUInt64BE(BigInt(req.offset), 0);
    sock.write(structuredChunk(req.cookie, NBD_REPLY_FLAG_DONE, 1 /* OFFSET_DATA */, p));
  });
  const c = await connect(t, opts);
  await rejectsWith(c.read(0, 512), 'EPROTO', /covers only 100 of 512/);
});

test('connect timeout is bounded', async (t) => {
  const opts = await fakeServer(t, 0, () => undefined, true);
  const start = Date.now();
  await rejectsWith(NbdClient.connect({ ...opts, connectTimeoutMs: 300 }), 'ETIMEDOUT', /timed out after 300 ms/);
  assert.ok(Date.now() - start < 3000);
  await rejectsWith(NbdClient.connect({ host: '127.0.0.1', port: 1, connectTimeoutMs: 2000 }), 'ECONNREFUSED');
});

test('disconnect waits for in-flight requests, then sends NBD_CMD_DISC', async (t) => {
  const srv = await startNbdkit(t, ['--filter=delay', 'memory', '16M', 'delay-write=50ms']);
  const c = await connect(t, { ...srv.opts, maxInFlight: 4 });
  const blocks = Array.from({ length: 20 }, () => randomBytes(4096));
  const ws = blocks.map((b, i) => c.write(i * 4096, b));
  const d = c.disconnect();
  await rejectsWith(c.read(0, 1), 'ESHUTDOWN', /disconnect/);
  await within(10_000, Promise.all(ws), 'writes before disconnect');
  await within(10_000, d, 'disconnect');
  await rejectsWith(c.read(0, 1), 'ESHUTDOWN');
  const c2 = await connect(t, srv.opts);
  assert.ok((await c2.read(0, 20 * 4096)).equals(Buffer.concat(blocks)));
  await c2.disconnect();
});

test('NbdDevice: capabilities, data path, absolute extents, error mapping', async (t) => {
  const srv = await startNbdkit(t, ['memory', '64M'], 'unix');
  const dev = await NbdDevice.open(srv.opts);
  t.after(() => dev.client.close());
  assert.equal(dev.size, 64 * MiB);
  assert.match(dev.name, /^nbd\+unix:\/\/\//);
  assert.deepEqual(dev.capabilities, {
    readOnly: false, flush: true, fua: true, trim: true, fastZero: true, extents: true, multiConn: true, rotational: false,
  });
  const data = randomBytes(96 * 1024);
  await dev.write(2 * MiB, data, { fua: true });
  const into = Buffer.alloc(data.length);
  await dev.read(2 * MiB, into);
  assert.ok(into.equals(data));
  const ext = await dev.blockStatus(2 * MiB - 64 * 1024, 512 * 1024);
  assert.deepEqual(ext[0], { offset: 2 * MiB - 64 * 1024, length: 64 * 1024, flags: EXTENT_HOLE | EXTENT_ZERO });
  assert.equal(ext[1].offset, 2 * MiB);
  assert.equal(ext[1].flags, 0);
  for (let i = 1; i < ext.length; i++) assert.equal(ext[i].offset, ext[i - 1].offset + ext[i - 1].length);
  await dev.writeZeroes(2 * MiB, 4096, { fastOnly: true });
  await dev.trim(2 * MiB + 4096, 4096);
  await dev.cache(0, MiB);
  await dev.flush();
  const z = Buffer.alloc(8192, 1);
  await dev.read(2 * MiB, z);
  assert.ok(z.equals(Buffer.alloc(8192)));
  await assert.rejects(() => dev.read(64 * MiB - 1, Buffer.alloc(2)), (e: unknown) => e instanceof BlockDeviceError && e.code === 'EINVAL');
  await dev.close();

  const bad = await startNbdkit(t, ['--filter=error', 'memory', '1M', 'error-pread=EIO', 'error-pread-rate=1']);
  const d2 = await NbdDevice.open(bad.opts);
  t.after(() => d2.client.close());
  await assert.rejects(
    () => d2.read(0, Buffer.alloc(512)),
    (e: unknown) => e instanceof BlockDeviceError && e.code === 'EIO' && /read 0\+512/.test(e.message),
  );
  await d2.flush();
  await d2.close();
});
