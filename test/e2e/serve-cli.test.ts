/**
 * `duet serve` as a command: error handling (exit 2, one `duet: ` line,
 * nothing written), export names, the listening lines, the default listen
 * address, and graceful shutdown on SIGTERM / SIGINT.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import {
  DUET,
  nonJsonLines,
  PYTHON,
  randomFile,
  readAt,
  ROOT,
  run,
  sha256,
  sparseFile,
  spawnTracked,
  startServe,
  tmpDir,
  waitFor,
  withTimeout,
} from './harness.js';

const MiB = 1024 * 1024;

interface Snapshot {
  file: string;
  sha: string;
  mtimeMs: number;
  size: number;
}

function snapshot(file: string): Snapshot {
  const st = fs.statSync(file);
  return { file, sha: sha256(file), mtimeMs: st.mtimeMs, size: st.size };
}

function assertUntouched(s: Snapshot, context: string): void {
  const st = fs.statSync(s.file);
  assert.equal(st.size, s.size, `${s.file}: size changed\n${context}`);
  assert.equal(st.mtimeMs, s.mtimeMs, `${s.file}: mtime changed\n${context}`);
  assert.equal(sha256(s.file), s.sha, `${s.file}: content changed\n${context}`);
}

/** `duet serve ARGS` must fail: exit 2, one `duet: ` line on stderr, no stack, empty stdout, files untouched. */
async function expectServeError(args: string[], untouched: Snapshot[], mention?: RegExp): Promise<string> {
  const r = await run(process.execPath, [DUET, 'serve', ...args], { timeoutMs: 10_000, cwd: ROOT, env: process.env });
  const ctx = r.describe();
  assert.equal(r.timedOut, false, `duet serve kept running instead of failing\n${ctx}`);
  assert.equal(r.code, 2, `exit code\n${ctx}`);
  assert.equal(r.stdout, '', `nothing on stdout\n${ctx}`);
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  assert.equal(lines.length, 1, `exactly one line on stderr\n${ctx}`);
  assert.ok(r.stderr.endsWith('\n'), `the error line ends with a newline\n${ctx}`);
  assert.match(lines[0], /^duet: \S/, `the line starts with "duet: "\n${ctx}`);
  assert.doesNotMatch(r.stderr, /\n\s+at |Error:|internal error/, `no stack trace or internal error\n${ctx}`);
  if (mention) assert.match(lines[0], mention, `the message names the problem\n${ctx}`);
  for (const s of untouched) assertUntouched(s, ctx);
  return lines[0];
}

function goodFile(dir: string, name = 'good.img'): Snapshot {
  const f = path.join(dir, name);
  randomFile(f, 256 * 1024);
  // an mtime in the past, so a write during the run would show
  const past = new Date(Date.now() - 3600_000);
  fs.utimesSync(f, past, past);
  return snapshot(f);
}

// ---- errors ------------------------------------------------------------------

test('serve errors: a missing PATH', async (t) => {
  const dir = tmpDir(t);
  const good = goodFile(dir);
  const missing = path.join(dir, 'missing.img');
  await expectServeError([good.file, missing, '--listen', '127.0.0.1:0'], [good], /missing\.img/);
  assert.equal(fs.existsSync(missing), false, 'a missing PATH must not be created');
  await expectServeError([`x=${path.join(dir, 'no', 'such', 'dir.img')}`, '--listen', '127.0.0.1:0'], [good]);
  await expectServeError([good.file, `y=${missing}`, '--listen', '127.0.0.1:0'], [good], /missing\.img/);
});

test('serve errors: a bad --workers, or workers without the native add-on', async (t) => {
  const dir = tmpDir(t);
  const good = goodFile(dir);
  await expectServeError([good.file, '--workers', 'many', '--listen', '127.0.0.1:0'], [good], /--workers many/);
  await expectServeError([good.file, '--workers', '-1', '--listen', '127.0.0.1:0'], [good], /--workers/);
  const r = await run(process.execPath, [DUET, 'serve', good.file, '--workers', '2', '--listen', '127.0.0.1:0'], {
    timeoutMs: 10_000,
    cwd: ROOT,
    env: { ...process.env, DUET_NO_NATIVE: '1' },
  });
  assert.equal(r.code, 2, r.describe());
  assert.match(r.stderr, /^duet: --workers 2: needs the native add-on/, r.describe());
  assertUntouched(good, r.describe());
});

test('serve errors: no PATH at all', async (t) => {
  const dir = tmpDir(t);
  const good = goodFile(dir);
  await expectServeError(['--listen', '127.0.0.1:0'], [good]);
});

test('serve errors: an unreadable PATH (a directory)', async (t) => {
  const dir = tmpDir(t);
  const good = goodFile(dir);
  const sub = path.join(dir, 'adir');
  fs.mkdirSync(sub);
  await expectServeError([good.file, sub, '--listen', '127.0.0.1:0'], [good], /adir/);
  await expectServeError([sub, good.file, '--listen', '127.0.0.1:0'], [good], /adir/);
  await expectServeError([good.file, '/dev/null', '--listen', '127.0.0.1:0'], [good]);
});

test('serve errors: a busy port', async (t) => {
  const dir = tmpDir(t);
  const good = goodFile(dir);
  const blocker = net.createServer((s) => s.destroy());
  await new Promise<void>((resolve, reject) => {
    blocker.once('error', reject);
    blocker.listen(0, '127.0.0.1', () => resolve());
  });
  t.after(() => new Promise<void>((r) => blocker.close(() => r())));
  const port = (blocker.address() as net.AddressInfo).port;
  const line = await expectServeError([good.file, '--listen', `127.0.0.1:${port}`], [good], new RegExp(String(port)));
  assert.ok(blocker.listening, `the other program's port must stay its own: ${line}`);
});

test('serve errors: a bad option', async (t) => {
  const dir = tmpDir(t);
  const good = goodFile(dir);
  await expectServeError([good.file, '--bogus', '--listen', '127.0.0.1:0'], [good], /bogus/);
  await expectServeError(['--bogus', good.file], [good], /bogus/);
  await expectServeError([good.file, '--read-only=maybe', '--listen', '127.0.0.1:0'], [good]);
});

test('serve errors: a bad --listen', async (t) => {
  const dir = tmpDir(t);
  const good = goodFile(dir);
  for (const bad of ['nonsense:abc', '127.0.0.1:99999', '127.0.0.1:-1', '127.0.0.1:', '1.2.3.4.5:80:90', '192.0.2.1:0']) {
    await expectServeError([good.file, '--listen', bad], [good]);
  }
  await expectServeError([good.file, '--listen'], [good]); // no value
});

test('serve errors: an export name used twice, an empty NAME', async (t) => {
  const dir = tmpDir(t);
  const a = goodFile(dir, 'a.img');
  const b = goodFile(dir, 'b.img');
  await expectServeError([`v=${a.file}`, `v=${b.file}`, '--listen', '127.0.0.1:0'], [a, b], /"?v"?/);
  await expectServeError([a.file, a.file, '--listen', '127.0.0.1:0'], [a, b], /"?a"?/);
  await expectServeError([`=${a.file}`, '--listen', '127.0.0.1:0'], [a, b]);
});

// ---- names and listening lines ------------------------------------------------------

test('serve: export names are NAME or the file name without extension; one listening line each, in order', async (t) => {
  const dir = tmpDir(t);
  const files = ['disk.img', 'noext', 'my.disk.raw', 'other.qcow2'].map((f) => {
    const p = path.join(dir, f);
    sparseFile(p, MiB);
    return p;
  });
  const s = await startServe([files[0], files[1], files[2], `custom=${files[3]}`], { t });
  const names = ['disk', 'noext', 'my.disk', 'custom'];
  const expected = names.map((n) => `listening nbd://127.0.0.1:${s.port}/${n}`);
  assert.equal(s.stdout(), expected.join('\n') + '\n', `stdout must be exactly the listening lines\n${s.describe()}`);
  assert.ok(s.port > 0 && s.port < 65536, s.describe());
  const r = await run('nbdinfo', ['--list', '--json', s.base], { timeoutMs: 10_000 });
  assert.equal(r.code, 0, `${r.describe()}\n${s.describe()}`);
  const listed = (JSON.parse(r.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']);
  assert.deepEqual([...listed].sort(), [...names].sort(), `${r.describe()}\n${s.describe()}`);
  for (const uri of s.uris) {
    const c = await run('nbdinfo', ['--can', 'connect', uri], { timeoutMs: 10_000 });
    assert.equal(c.code, 0, `${uri}\n${c.describe()}\n${s.describe()}`);
  }
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
  assert.deepEqual(nonJsonLines(stop.stderr), [], `stderr must be JSON log lines only\n${s.describe()}`);
});

test('serve: --listen defaults to 127.0.0.1:10809', async (t) => {
  const probe = net.createServer();
  const free = await new Promise<boolean>((resolve) => {
    probe.once('error', () => resolve(false));
    probe.listen(10809, '127.0.0.1', () => resolve(true));
  });
  if (free) await new Promise<void>((r) => probe.close(() => r()));
  if (!free) {
    t.skip('127.0.0.1:10809 is in use by another program on this machine');
    return;
  }
  const dir = tmpDir(t);
  const f = path.join(dir, 'd.img');
  sparseFile(f, MiB);
  const s = await startServe([f], { t, noListen: true });
  assert.deepEqual(s.uris, ['nbd://127.0.0.1:10809/d'], s.describe());
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
});

test('serve: --listen [::1]:0 prints a bracketed IPv6 address that clients reach', async (t) => {
  const probe = net.createServer();
  const v6 = await new Promise<boolean>((resolve) => {
    probe.once('error', () => resolve(false));
    probe.listen(0, '::1', () => resolve(true));
  });
  if (v6) await new Promise<void>((r) => probe.close(() => r()));
  if (!v6) {
    t.skip('no IPv6 loopback on this machine');
    return;
  }
  const dir = tmpDir(t);
  const f = path.join(dir, 'v6.img');
  sparseFile(f, MiB);
  const s = await startServe([f, '--listen', '[::1]:0'], { t });
  assert.match(s.uris[0], /^nbd:\/\/\[::1\]:\d+\/v6$/, s.describe());
  const r = await run('nbdinfo', ['--size', s.uris[0]], { timeoutMs: 10_000 });
  assert.equal(r.code, 0, `${r.describe()}\n${s.describe()}`);
  assert.equal(r.stdout.trim(), String(MiB), s.describe());
});

// ---- graceful shutdown ------------------------------------------------------------

const IDLE_CLIENT = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print('connected', h.get_size(), flush=True)
sys.stdin.readline()          # stay idle until the test says so
try:
    h.pread(512, 0)
    print('read ok', flush=True)
except nbd.Error as e:
    print('read failed', e.string, flush=True)
`;

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  test(`serve: ${signal} with an idle client connected: exit 0 within seconds, the written pattern is in the file`, async (t) => {
    const dir = tmpDir(t);
    const disk = path.join(dir, 'disk.img');
    randomFile(disk, 16 * MiB);
    const s = await startServe([disk], { t });
    const w = await run('qemu-io', ['-f', 'raw', s.uris[0], '-c', 'write -P 0x5a 1M 4M'], { timeoutMs: 15_000 });
    assert.equal(w.code, 0, `${w.describe()}\n${s.describe()}`);
    const idle = spawnTracked(t, PYTHON, ['-c', IDLE_CLIENT, s.uris[0]]);
    await waitFor(() => idle.stdout().includes('connected') || idle.child.exitCode !== null, 10_000, 'the idle client to connect');
    assert.match(idle.stdout(), /connected 16777216/, `idle client: ${idle.stderr()}\n${s.describe()}`);

    const stop = await s.stop(signal, 8000);
    assert.equal(stop.code, 0, `exit code after ${signal} (${stop.ms} ms)\n${s.describe()}`);
    assert.ok(stop.ms < 5000, `took ${stop.ms} ms to exit after ${signal}\n${s.describe()}`);
    assert.deepEqual(nonJsonLines(stop.stderr), [], `stderr must be JSON log lines only\n${s.describe()}`);
    assert.ok(readAt(disk, MiB, 4 * MiB).equals(Buffer.alloc(4 * MiB, 0x5a)), `the pattern is not in the file after ${signal}`);

    // the idle client was disconnected, not left hanging
    idle.child.stdin!.end('go\n');
    await withTimeout(idle.exited, 10_000, 'the idle client to finish');
    assert.match(idle.stdout(), /read failed/, `idle client after shutdown: ${idle.stdout()} ${idle.stderr()}`);
    // and nobody listens there any more
    const c = await run('nbdinfo', ['--can', 'connect', s.uris[0]], { timeoutMs: 10_000 });
    assert.notEqual(c.code, 0, `still accepting after exit\n${c.describe()}`);
  });
}

const WRITER = `
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
BS = 65536
n = h.get_size() // BS
def block(i):
    b = bytearray(bytes([(i * 7) % 251 + 1]) * BS)
    b[0:8] = i.to_bytes(8, 'big')
    return b
pending = {}
nxt = 0
print('connected', flush=True)
try:
    while nxt < n or pending:
        while nxt < n and len(pending) < 16:
            flags = nbd.CMD_FLAG_FUA if nxt % 5 == 0 else 0
            c = h.aio_pwrite(nbd.Buffer.from_bytearray(block(nxt)), nxt * BS, None, flags)
            pending[c] = nxt
            nxt += 1
        h.poll(1000)
        for c in list(pending):
            if h.aio_command_completed(c):
                print('ack', pending.pop(c), flush=True)
        time.sleep(0.02)
    print('done', flush=True)
except nbd.Error as e:
    print('error', e.string, flush=True)
`;

function expectedBlock(i: number): Buffer {
  const b = Buffer.alloc(65536, ((i * 7) % 251) + 1);
  b.writeBigUInt64BE(BigInt(i), 0);
  return b;
}

for (const workers of ['0', '2']) {
test(`serve: SIGTERM while a client streams writes: exit 0, every acknowledged write is in the file (--workers ${workers})`, async (t) => {
  const dir = tmpDir(t);
  const disk = path.join(dir, 'disk.img');
  sparseFile(disk, 64 * MiB);
  const s = await startServe([disk, '--workers', workers], { t, exports: 1 });
  const writer = spawnTracked(t, PYTHON, ['-c', WRITER, s.uris[0]]);
  const acks = (): number[] =>
    writer
      .stdout()
      .split('\n')
      .filter((l) => /^ack \d+$/.test(l))
      .map((l) => Number(l.slice(4)));
  await waitFor(() => acks().length >= 48 || writer.child.exitCode !== null, 15_000, 'the writer to get 48 acknowledgements');
  assert.equal(writer.child.exitCode, null, `the writer ended early: ${writer.stdout().slice(-500)} ${writer.stderr()}\n${s.describe()}`);

  const stop = await s.stop('SIGTERM', 12_000);
  assert.equal(stop.code, 0, `exit code after SIGTERM mid-stream (${stop.ms} ms)\n${s.describe()}`);
  assert.ok(stop.ms < 10_000, `took ${stop.ms} ms\n${s.describe()}`);
  await withTimeout(writer.exited, 10_000, 'the writer to notice the shutdown');
  const out = writer.stdout();
  assert.doesNotMatch(out, /^done$/m, 'the shutdown must have come mid-stream (writer finished first: make it slower)');
  const acked = acks();
  assert.ok(acked.length >= 48, out.slice(-500));
  const fd = fs.openSync(disk, 'r');
  try {
    const buf = Buffer.alloc(65536);
    for (const i of acked) {
      fs.readSync(fd, buf, 0, 65536, i * 65536);
      assert.ok(buf.equals(expectedBlock(i)), `acknowledged block ${i} is not in the file\n${s.describe()}`);
    }
  } finally {
    fs.closeSync(fd);
  }
});
}

test('serve: SIGTERM during an nbdcopy: the server exits 0, nbdcopy fails or completes, nothing hangs', async (t) => {
  const dir = tmpDir(t);
  const src = path.join(dir, 'src.bin');
  const disk = path.join(dir, 'disk.img');
  randomFile(src, 64 * MiB);
  sparseFile(disk, 64 * MiB);
  const s = await startServe([disk], { t });
  const copy = spawnTracked(t, 'nbdcopy', ['--request-size=65536', '--requests=4', '--connections=1', src, s.uris[0]]);
  // wait until the copy has started writing
  await waitFor(() => fs.statSync(disk).blocks > 0 || copy.child.exitCode !== null, 10_000, 'nbdcopy to start writing', 5);
  const stop = await s.stop('SIGTERM', 12_000);
  assert.equal(stop.code, 0, `exit code after SIGTERM during nbdcopy (${stop.ms} ms)\n${s.describe()}`);
  const res = await withTimeout(copy.exited, 15_000, 'nbdcopy to end after the server stopped');
  // nbdcopy either finished before the signal (then the copy is complete) or reports the lost connection
  assert.equal(res.signal, null, `nbdcopy was killed: ${JSON.stringify(res)} ${copy.stderr()}`);
  if (res.code === 0) assert.equal(sha256(disk), sha256(src), 'nbdcopy reported success: the copy must be complete');
  else assert.match(copy.stderr(), /\S/, 'nbdcopy failed without saying why');
});

test('serve: SIGTERM the moment the listening line appears still exits 0 (handlers come first)', async (t) => {
  const dir = tmpDir(t);
  const f = path.join(dir, 'd.img');
  sparseFile(f, MiB);
  for (let i = 0; i < 10; i++) {
    const s = await startServe([f], { t });
    const stop = await s.stop('SIGTERM', 10_000);
    assert.equal(stop.code, 0, `round ${i}: ${s.describe()}`);
  }
});

test('a Node.js without zlib.crc32 (older than 20.15): one line saying which Node is needed, exit 2; package.json engines says the same', async () => {
  // Stands in for Node 20.0-20.14: the launcher must say so before anything imports crc32.
  const older = 'data:text/javascript,import zlib from "node:zlib"; delete zlib.crc32;';
  const r = await run(process.execPath, ['--import', older, DUET, '--version'], { cwd: ROOT, timeoutMs: 10_000, env: process.env });
  assert.equal(r.code, 2, r.describe());
  assert.equal(r.stderr, `duet: needs Node.js 20.15 or newer (zlib.crc32); this is ${process.version}: install a newer Node.js\n`);
  assert.equal(r.stdout, '');
  const ok = await run(process.execPath, [DUET, '--version'], { cwd: ROOT, timeoutMs: 10_000, env: process.env });
  assert.equal(ok.code, 0, ok.describe());
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { engines: { node: string } };
  assert.equal(pkg.engines.node, '>=20.15');
});
