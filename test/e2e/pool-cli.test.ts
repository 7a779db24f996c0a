/**
 * `duet pool ...` / `duet vol ...` end to end (CONTRACT.md, "Pools and
 * volumes"): the real CLI against pools on sparse device files, offline
 * and online (while `serve --pool` holds the pool), with real NBD clients
 * (nbdinfo, nbdcopy, qemu-io, libnbd) to put data in and take it out.
 *
 * Every test has its own home (--home) and its own device files.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import {
  AfterContext,
  DUET,
  PYTHON,
  randomFile,
  readAt,
  run,
  RunOptions,
  RunResult,
  Server,
  sha256,
  sparseFile,
  spawnTracked,
  startServe,
  TOOL_ENV,
  tmpDir,
  waitFor,
  withTimeout,
} from './harness.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const CHUNK = 64 * KiB;

const haveLibnbdPython = fs.existsSync('/usr/lib/python3/dist-packages/nbd.py') && fs.existsSync(PYTHON);

// ---- helpers -------------------------------------------------------------------

/** `duet --home HOME ARGS...` */
function duet(home: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [DUET, '--home', home, ...args], { timeoutMs: 30_000, ...opts });
}

function ctx(r: RunResult, server?: Server | null): string {
  return `${r.describe()}${server ? `\n${server.describe()}` : ''}`;
}

async function duetOk(home: string, args: string[], server?: Server | null, opts: RunOptions = {}): Promise<RunResult> {
  const r = await duet(home, args, opts);
  assert.equal(r.code, 0, ctx(r, server));
  return r;
}

async function duetJson<T>(home: string, args: string[], server?: Server | null): Promise<T> {
  const r = await duetOk(home, [...args, '--json'], server);
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    assert.fail(`not JSON\n${ctx(r, server)}`);
  }
}

/** The contract for bad input: exit 2, exactly one stderr line `duet: ...`, no stack trace. */
function assertUserError(r: RunResult, pattern?: RegExp, server?: Server | null): void {
  const msg = ctx(r, server);
  assert.equal(r.code, 2, `exit status must be 2\n${msg}`);
  const lines = r.stderr.split('\n').filter((l) => l.trim() !== '');
  assert.equal(lines.length, 1, `exactly one line on stderr\n${msg}`);
  assert.match(lines[0], /^duet: \S/, `stderr must start with "duet: "\n${msg}`);
  assert.doesNotMatch(r.stderr, /internal error|\n\s+at \S+ \(|\bat file:\/\/|Error: /, `no stack trace / internal error\n${msg}`);
  if (pattern) assert.match(lines[0], pattern, msg);
}

/** Sparse device files made like `truncate -s SIZE FILE`. */
function devs(dir: string, names: string[], size: number): string[] {
  return names.map((n) => {
    const p = path.join(dir, n);
    sparseFile(p, size);
    return p;
  });
}

interface PoolInfo {
  name: string;
  uuid: string;
  sizeBytes: number;
  usedBytes: number;
  freeBytes: number;
  usedPercent: number;
  chunkSizeBytes: number;
  volumes: number;
  devices: string[];
  heldBy: number | null;
  warning: string | null;
}

interface VolumeInfo {
  name: string;
  sizeBytes: number;
  usedBytes: number;
  snapshot: boolean;
  readOnly: boolean;
  origin: string | null;
  uuid: string;
  createdAt: string;
  exported: boolean;
  connections: number;
}

interface Range {
  offset: number;
  length: number;
}

const volList = (home: string, pool: string, server?: Server | null): Promise<VolumeInfo[]> => duetJson<VolumeInfo[]>(home, ['vol', 'list', pool], server);
const poolShow = (home: string, pool: string, server?: Server | null): Promise<PoolInfo> => duetJson<PoolInfo>(home, ['pool', 'show', pool], server);

/** What `vol list --json` says about a volume, minus what differs between two pools by nature. */
function shape(v: VolumeInfo): Record<string, unknown> {
  return { name: v.name, sizeBytes: v.sizeBytes, usedBytes: v.usedBytes, snapshot: v.snapshot, readOnly: v.readOnly, origin: v.origin };
}

/** The volume list with fields that a served pool changes (connections) left out. */
function listState(list: VolumeInfo[]): Record<string, unknown>[] {
  return list.map((v) => ({ ...shape(v), uuid: v.uuid, createdAt: v.createdAt }));
}

async function serve(t: AfterContext, home: string, pool: string, volumes: number): Promise<Server> {
  return startServe(['--home', home, '--pool', pool], { t, exports: Math.max(volumes, 1) });
}

async function must(cmd: string, args: string[], server: Server | null, timeoutMs = 30_000): Promise<RunResult> {
  const r = await run(cmd, args, { timeoutMs });
  assert.equal(r.code, 0, ctx(r, server));
  return r;
}

/** qemu-io commands against a raw NBD export; every command must succeed. */
async function qio(uri: string, cmds: string[], server: Server): Promise<RunResult> {
  const r = await run('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])], { timeoutMs: 60_000 });
  assert.equal(r.code, 0, ctx(r, server));
  assert.doesNotMatch(r.stdout + r.stderr, /fail|error/i, `qemu-io reported a failure\n${ctx(r, server)}`);
  return r;
}

async function nbdSize(uri: string, server: Server): Promise<number> {
  const r = await must('nbdinfo', ['--size', uri], server, 10_000);
  return Number(r.stdout.trim());
}

/** Copy an export into a file with nbdcopy; its sha256. */
async function exportSha(uri: string, file: string, server: Server): Promise<string> {
  fs.rmSync(file, { force: true });
  await must('nbdcopy', [uri, file], server, 60_000);
  return sha256(file);
}

/** `duet vol send ...` with stdout into a file (binary safe). */
function sendToFile(home: string, args: string[], file: string, timeoutMs = 30_000): Promise<{ code: number | null; stderr: string }> {
  const fd = fs.openSync(file, 'w');
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [DUET, '--home', home, 'vol', 'send', ...args], { env: TOOL_ENV, stdio: ['ignore', fd, 'pipe'] });
    fs.closeSync(fd);
    let err = '';
    child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
    const timer = setTimeout(() => child.pid && process.kill(child.pid, 'SIGKILL'), timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr: err });
    });
  });
}

async function sendOk(home: string, args: string[], file: string, server: Server | null): Promise<void> {
  const r = await sendToFile(home, args, file);
  assert.equal(r.code, 0, `duet vol send ${args.join(' ')}: exit ${r.code}\n${r.stderr}\n${server?.describe() ?? ''}`);
  assert.ok(fs.statSync(file).size > 0, 'send wrote nothing');
}

function receive(home: string, target: string, stream: Buffer | string): Promise<RunResult> {
  return duet(home, ['vol', 'receive', target], { input: typeof stream === 'string' ? fs.readFileSync(stream) : stream });
}

/** Wait (bounded) until the server counts no NBD connection on `vol`. */
async function noConnections(home: string, pool: string, vol: string, server: Server): Promise<void> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const v = (await volList(home, pool, server)).find((x) => x.name === vol);
    if (!v || v.connections === 0) return;
    if (Date.now() > deadline) assert.fail(`volume ${pool}/${vol} still has ${v.connections} connection(s)\n${server.describe()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Hold one libnbd connection to `uri` open until release(). */
async function holdConnection(t: AfterContext, uri: string): Promise<{ release(): Promise<void> }> {
  const script = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(512, 0)
print('connected', flush=True)
sys.stdin.read()
h.shutdown()
print('closed', flush=True)
`;
  const p = spawnTracked(t, PYTHON, ['-c', script, uri]);
  await waitFor(() => p.stdout().includes('connected') || p.child.exitCode !== null, 10_000, 'python libnbd to connect');
  assert.ok(p.stdout().includes('connected'), `python could not connect: ${p.stderr()}`);
  return {
    async release() {
      p.child.stdin!.end();
      await withTimeout(p.exited, 10_000, 'python libnbd to disconnect');
    },
  };
}

type Ext = { offset: number; length: number; type: number };

// ---- pool create / list / show; a volume larger than any one device ------------

test('pool create/list/show over 2 devices; a volume larger than either device is written end to end', async (t) => {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  devs(dir, ['dev1.img', 'dev2.img'], 48 * MiB);
  // relative device paths: the pool must remember absolute ones
  const c = await duetOk(home, ['pool', 'create', 'P', 'dev1.img', 'dev2.img'], null, { cwd: dir });
  assert.match(c.stdout, /created pool P/, c.describe());

  const list = await duetJson<PoolInfo[]>(home, ['pool', 'list']);
  assert.equal(list.length, 1, JSON.stringify(list));
  assert.equal(list[0].name, 'P');
  const info = await poolShow(home, 'P');
  const msg = JSON.stringify(info, null, 1);
  assert.deepEqual(info.devices, [path.join(dir, 'dev1.img'), path.join(dir, 'dev2.img')], `devices are absolute paths, in order\n${msg}`);
  for (const k of ['sizeBytes', 'usedBytes', 'freeBytes', 'chunkSizeBytes'] as const) assert.equal(typeof info[k], 'number', `${k}\n${msg}`);
  assert.equal(info.chunkSizeBytes, 64 * KiB, `default chunk size\n${msg}`);
  assert.ok(info.sizeBytes > 48 * MiB && info.sizeBytes <= 96 * MiB, `the pool spans both devices\n${msg}`);
  assert.equal(info.usedBytes, 0, msg);
  assert.ok(info.freeBytes > 80 * MiB && info.freeBytes <= info.sizeBytes, msg);
  assert.equal(info.volumes, 0, msg);
  assert.deepEqual(list[0], info, 'pool list --json holds the same object as pool show --json');
  const text = await duetOk(home, ['pool', 'list']);
  assert.match(text.stdout, /^P\s/m, text.describe());

  // 80 MiB: more than either 48 MiB device holds
  const cv = await duetOk(home, ['vol', 'create', 'P/big', '--size', '80M']);
  assert.match(cv.stdout, /created volume P\/big/, cv.describe());
  const src = path.join(dir, 'src.bin');
  randomFile(src, 80 * MiB);
  const s = await serve(t, home, 'P', 1);
  assert.deepEqual(s.uris, [`${s.base}/big`], s.describe());
  assert.equal(await nbdSize(s.uris[0], s), 80 * MiB);
  await must('nbdcopy', ['--flush', src, s.uris[0]], s, 60_000);
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());

  const after = await poolShow(home, 'P');
  assert.ok(after.usedBytes >= 80 * MiB, `usedBytes after writing 80 MiB\n${JSON.stringify(after)}`);
  assert.equal(after.usedBytes + after.freeBytes <= after.sizeBytes, true, JSON.stringify(after));
  const vols = await volList(home, 'P');
  assert.equal(vols[0].usedBytes, 80 * MiB, JSON.stringify(vols));
  // both devices carry data (past the first 1 MiB of headers and journal)
  for (const d of ['dev1.img', 'dev2.img']) {
    const st = fs.statSync(path.join(dir, d));
    assert.ok(st.blocks * 512 > 16 * MiB, `${d} holds a share of the volume (${st.blocks * 512} bytes allocated)`);
  }
  // a fresh server reads back exactly what was written
  const s2 = await serve(t, home, 'P', 1);
  const back = path.join(dir, 'back.bin');
  assert.equal(await exportSha(s2.uris[0], back, s2), sha256(src), `the volume reads back as written\n${s2.describe()}`);
  await s2.stop();
  const chk = await duetOk(home, ['pool', 'check', 'P']);
  assert.match(chk.stdout, /consistent/, chk.describe());
});

// ---- vol create/list/resize/snapshot/clone/remove, offline and online ------------

test('vol create/list/resize/snapshot/clone/remove: same results offline and online; online resize and remove', async (t) => {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const [a1] = devs(dir, ['off.img'], 64 * MiB);
  const [b1] = devs(dir, ['on.img'], 64 * MiB);
  await duetOk(home, ['pool', 'create', 'OFF', a1]);
  await duetOk(home, ['pool', 'create', 'ON', b1]);

  const steps = async (pool: string, server: Server | null): Promise<void> => {
    await duetOk(home, ['vol', 'create', `${pool}/a`, '--size', '32M'], server);
    await duetOk(home, ['vol', 'create', `${pool}/gone`, '--size', '1M'], server);
    if (server) assert.equal(await nbdSize(`${server.base}/a`, server), 32 * MiB, 'a volume created online is exported');
    const r = await duetOk(home, ['vol', 'resize', `${pool}/a`, '--size', '64M'], server);
    assert.match(r.stdout, /resized volume/, r.describe());
    if (server) assert.equal(await nbdSize(`${server.base}/a`, server), 64 * MiB, `a NEW connection sees the online resize\n${server.describe()}`);
    await duetOk(home, ['vol', 'snapshot', `${pool}/a`, `${pool}/s`], server);
    await duetOk(home, ['vol', 'clone', `${pool}/s`, `${pool}/c`], server);
    await duetOk(home, ['vol', 'remove', `${pool}/gone`], server);
  };

  await steps('OFF', null);
  const offline = await volList(home, 'OFF');

  // no volume yet: serve prints one line naming the pool
  const s = await serve(t, home, 'ON', 0);
  assert.match(s.uris[0], /^nbd:\/\/127\.0\.0\.1:\d+\/ \(pool ON has no volumes yet/, s.describe());
  await steps('ON', s);
  const online = await volList(home, 'ON', s);

  const expected = [
    { name: 'a', sizeBytes: 64 * MiB, usedBytes: 0, snapshot: false, readOnly: false, origin: null },
    { name: 'c', sizeBytes: 64 * MiB, usedBytes: 0, snapshot: false, readOnly: false, origin: 's' },
    { name: 's', sizeBytes: 64 * MiB, usedBytes: 0, snapshot: true, readOnly: true, origin: 'a' },
  ];
  assert.deepEqual(offline.map(shape), expected, `offline vol list --json\n${JSON.stringify(offline, null, 1)}`);
  assert.deepEqual(online.map(shape), offline.map(shape), `online and offline give the same volumes\n${JSON.stringify(online, null, 1)}`);
  assert.ok(offline.every((v) => v.exported === false && v.connections === 0), JSON.stringify(offline));
  assert.ok(online.every((v) => v.exported === true && v.connections === 0), JSON.stringify(online));
  assert.equal(new Set(online.map((v) => v.uuid)).size, 3, 'every volume has its own uuid');
  const text = await duetOk(home, ['vol', 'list', 'ON'], s);
  assert.match(text.stdout, /^s\s+64M\s+0\s+snapshot\s+a$/m, text.describe());

  const listed = await must('nbdinfo', ['--list', '--json', s.base], s, 10_000);
  const names = (JSON.parse(listed.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']);
  assert.deepEqual([...names].sort(), ['a', 'c', 's'], `every volume made online is an export\n${ctx(listed, s)}`);
  // exports: the snapshot read-only, the clone writable
  const info = async (name: string): Promise<Record<string, unknown>> => {
    const r = await must('nbdinfo', ['--json', `${s.base}/${name}`], s, 10_000);
    return (JSON.parse(r.stdout) as { exports: Record<string, unknown>[] }).exports[0];
  };
  assert.equal((await info('s')).is_read_only, true, s.describe());
  assert.equal((await info('c')).is_read_only, false, s.describe());
  assert.equal((await info('a'))['export-size'], 64 * MiB, s.describe());

  // remove with an open connection: refused, then works after disconnect
  if (haveLibnbdPython) {
    const held = await holdConnection(t, `${s.base}/c`);
    const busy = (await volList(home, 'ON', s)).find((v) => v.name === 'c');
    assert.equal(busy?.connections, 1, `vol list counts the open connection\n${JSON.stringify(busy)}`);
    const before = listState(await volList(home, 'ON', s));
    const refused = await duet(home, ['vol', 'remove', 'ON/c']);
    assertUserError(refused, /in use/, s);
    assert.deepEqual(listState(await volList(home, 'ON', s)), before, 'a refused remove changes nothing');
    await held.release();
    await noConnections(home, 'ON', 'c', s);
    await duetOk(home, ['vol', 'remove', 'ON/c'], s);
    assert.deepEqual((await volList(home, 'ON', s)).map((v) => v.name), ['a', 's'], s.describe());
    const gone = await run('nbdinfo', ['--size', `${s.base}/c`], { timeoutMs: 10_000 });
    assert.notEqual(gone.code, 0, `a removed volume is no longer exported\n${ctx(gone, s)}`);
  } else {
    t.diagnostic('python3-libnbd missing: remove-while-connected not tested');
  }

  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
  // what the server committed is what a later offline open sees
  const reopened = await volList(home, 'ON');
  assert.deepEqual(reopened.map((v) => v.name), haveLibnbdPython ? ['a', 's'] : ['a', 'c', 's']);
  for (const p of ['OFF', 'ON']) {
    const chk = await duet(home, ['pool', 'check', p]);
    assert.equal(chk.code, 0, chk.describe());
  }
});

// ---- the pool lock ----------------------------------------------------------------

test('a second serve --pool is refused with the pid of the first; after SIGKILL of the first, serve works again', async (t) => {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const [d] = devs(dir, ['d.img'], 32 * MiB);
  await duetOk(home, ['pool', 'create', 'P', d]);
  await duetOk(home, ['vol', 'create', 'P/v', '--size', '8M']);
  const s = await serve(t, home, 'P', 1);
  const second = await run(process.execPath, [DUET, '--home', home, 'serve', '--pool', 'P', '--listen', '127.0.0.1:0'], { timeoutMs: 15_000 });
  assertUserError(second, undefined, s);
  assert.equal(second.stderr.trim(), `duet: pool P is in use by pid ${s.pid}`, ctx(second, s));
  assert.equal(second.stdout, '', 'the refused server prints no listening line');
  assert.equal((await poolShow(home, 'P', s)).heldBy, s.pid, 'pool show names the holder');
  assert.equal((await duetJson<PoolInfo[]>(home, ['pool', 'list'], s))[0].heldBy, s.pid, 'pool list names the holder');
  const showText = await duetOk(home, ['pool', 'show', 'P'], s);
  assert.match(showText.stdout, new RegExp(`served by:\\s+pid ${s.pid}\\b`), showText.describe());
  assert.equal(await nbdSize(s.uris[0], s), 8 * MiB, 'the first server still serves');

  await qio(s.uris[0], ['write -P 0x5c 0 1M', 'flush'], s);
  const killed = await s.stop('SIGKILL');
  assert.equal(killed.signal, 'SIGKILL', s.describe());
  // the kernel dropped the flock: offline commands and a new server work
  const chk = await duet(home, ['pool', 'check', 'P']);
  assert.equal(chk.code, 0, chk.describe());
  const s2 = await serve(t, home, 'P', 1);
  await qio(s2.uris[0], ['read -P 0x5c 0 1M'], s2);
  const third = await run(process.execPath, [DUET, '--home', home, 'serve', '--pool', 'P', '--listen', '127.0.0.1:0'], { timeoutMs: 15_000 });
  assertUserError(third, new RegExp(`^duet: pool P is in use by pid ${s2.pid}$`), s2);
  const stop = await s2.stop();
  assert.equal(stop.code, 0, s2.describe());
});

// ---- vol diff ------------------------------------------------------------------------

test('vol diff --json: sorted, merged, chunk-aligned ranges of exactly the chunks written between two snapshots', async (t) => {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const [d] = devs(dir, ['d.img'], 48 * MiB);
  await duetOk(home, ['pool', 'create', 'P', d]);
  await duetOk(home, ['vol', 'create', 'P/V', '--size', '16M']);
  const s = await serve(t, home, 'P', 1);
  const uri = s.uris[0];
  await qio(uri, ['write -P 0x11 0 8M', 'flush'], s);
  await duetOk(home, ['vol', 'snapshot', 'P/V', 'P/S1'], s);
  // [offset, length] of every write after S1
  const writes: [number, number, string][] = [
    [100, 10, 'write -P 0x22 100 10'], // inside chunk 0
    [5 * CHUNK - 512, 1024, `write -P 0x23 ${5 * CHUNK - 512} 1024`], // straddles chunks 4 and 5
    [MiB, 128 * KiB, `write -P 0x24 ${MiB} ${128 * KiB}`], // chunks 16-17
    [48 * CHUNK + 4096, 4096, `write -P 0x25 ${48 * CHUNK + 4096} 4096`], // chunk 48 ...
    [49 * CHUNK, CHUNK, `write -P 0x26 ${49 * CHUNK} ${CHUNK}`], // ... and 49: merged with 48
    [2 * MiB, CHUNK, `write -z ${2 * MiB} ${CHUNK}`], // write zeroes over data: chunk 32
    [12 * MiB, 4096, `write -P 0x27 ${12 * MiB} 4096`], // chunk 192, unmapped in S1
  ];
  await qio(uri, [...writes.map((w) => w[2]), 'flush'], s);
  await duetOk(home, ['vol', 'snapshot', 'P/V', 'P/S2'], s);

  // expected: every touched chunk, merged into runs
  const chunks = new Set<number>();
  for (const [off, len] of writes) for (let c = Math.floor(off / CHUNK); c * CHUNK < off + len; c++) chunks.add(c);
  const expected: Range[] = [];
  for (const c of [...chunks].sort((x, y) => x - y)) {
    const last = expected[expected.length - 1];
    if (last && last.offset + last.length === c * CHUNK) last.length += CHUNK;
    else expected.push({ offset: c * CHUNK, length: CHUNK });
  }
  assert.deepEqual(expected, [
    { offset: 0, length: CHUNK },
    { offset: 4 * CHUNK, length: 2 * CHUNK },
    { offset: MiB, length: 2 * CHUNK },
    { offset: 2 * MiB, length: CHUNK },
    { offset: 3 * MiB, length: 2 * CHUNK },
    { offset: 12 * MiB, length: CHUNK },
  ]);

  const online = await duetJson<Range[]>(home, ['vol', 'diff', 'P/S1', 'P/S2'], s);
  assert.deepEqual(online, expected, `vol diff P/S1 P/S2 --json (online)\n${JSON.stringify(online)}`);
  assert.deepEqual(await duetJson<Range[]>(home, ['vol', 'diff', 'P/S1', 'P/S1'], s), [], 'a snapshot does not differ from itself');
  assert.deepEqual(await duetJson<Range[]>(home, ['vol', 'diff', 'P/S2', 'P/V'], s), [], 'nothing written since S2');
  const txt = await duetOk(home, ['vol', 'diff', 'P/S1', 'P/S2'], s);
  assert.match(txt.stdout, /^0 65536$/m, txt.describe());
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
  assert.deepEqual(await duetJson<Range[]>(home, ['vol', 'diff', 'P/S1', 'P/S2']), expected, 'vol diff offline gives the same ranges');
  // across pools: refused
  assertUserError(await duet(home, ['vol', 'diff', 'P/S1', 'Q/S2']), /different pools/);
});

// ---- send / receive -----------------------------------------------------------------

test('vol send/receive: full + 3 incrementals into a second pool, offline and online; wrong base, truncated and damaged streams are refused', async (t) => {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const [pd] = devs(dir, ['p.img'], 48 * MiB);
  const [bd] = devs(dir, ['b.img'], 48 * MiB);
  await duetOk(home, ['pool', 'create', 'P', pd]);
  await duetOk(home, ['pool', 'create', 'B', bd, '--chunk-size', '16K']); // a different chunk size than P
  await duetOk(home, ['vol', 'create', 'P/V', '--size', '16M']);
  const sp = await serve(t, home, 'P', 1);
  const V = `${sp.base}/V`;
  const file = (n: string): string => path.join(dir, n);

  // four snapshots with changes between them (the volume grows, then shrinks to an odd size);
  // streams sent online (through the admin socket)
  const changes: { resize?: string[]; io: string[] }[] = [
    { io: ['write -P 0x11 0 4M', 'write -P 0x12 10M 1M'] },
    { io: ['write -P 0x21 1M 64k', 'write -P 0x22 6M 2M', 'write -z 10M 256k'] },
    { resize: ['--size', '24M'], io: ['write -P 0x31 0 4096', 'write -P 0x32 20M 1M', 'discard 2M 1M'] },
    { resize: ['--size', String(12 * MiB + 512), '--force'], io: ['write -P 0x41 8M 3M', 'write -z 0 64k'] },
  ];
  const sizes = [16 * MiB, 16 * MiB, 24 * MiB, 12 * MiB + 512];
  const shas: string[] = [];
  for (let i = 0; i < 4; i++) {
    if (changes[i].resize) await duetOk(home, ['vol', 'resize', 'P/V', ...changes[i].resize!], sp);
    await qio(V, [...changes[i].io, 'flush'], sp);
    await duetOk(home, ['vol', 'snapshot', 'P/V', `P/S${i + 1}`], sp);
    shas.push(await exportSha(`${sp.base}/S${i + 1}`, file(`S${i + 1}.raw`), sp));
  }
  assert.equal(new Set(shas).size, 4, 'the four snapshots differ');
  await sendOk(home, ['P/S1'], file('full1'), sp);
  for (let i = 2; i <= 4; i++) await sendOk(home, [`P/S${i}`, '--from', `P/S${i - 1}`], file(`inc${i}`), sp);
  assert.ok(fs.statSync(file('inc2')).size < fs.statSync(file('full1')).size, 'an incremental stream is smaller than a full one');

  /** The received volume read through a server of B equals snapshot k of P. */
  const assertHolds = async (sb: Server, k: number): Promise<void> => {
    const got = await exportSha(`${sb.base}/R`, file('R.raw'), sb);
    assert.equal(got, shas[k - 1], `B/R must equal P/S${k}\n${sb.describe()}`);
    await noConnections(home, 'B', 'R', sb);
    const r = (await volList(home, 'B', sb)).find((v) => v.name === 'R');
    assert.equal(r?.sizeBytes, sizes[k - 1], `B/R has the size of P/S${k}\n${JSON.stringify(r)}`);
  };
  const checkOffline = async (k: number): Promise<void> => {
    const sb = await serve(t, home, 'B', (await volList(home, 'B')).length);
    await assertHolds(sb, k);
    const stop = await sb.stop();
    assert.equal(stop.code, 0, sb.describe());
  };

  // offline (B not served): full
  const r1 = await receive(home, 'B/R', file('full1'));
  assert.equal(r1.code, 0, r1.describe());
  assert.match(r1.stdout, /received B\/R/, r1.describe());
  await checkOffline(1);

  // refused, and B unchanged: wrong base, truncated, one flipped byte, full stream onto an existing volume
  const known = listState(await volList(home, 'B'));
  const refusedOffline = async (stream: Buffer, target: string, why: RegExp): Promise<void> => {
    const r = await receive(home, target, stream);
    assertUserError(r, why);
    assert.deepEqual(listState(await volList(home, 'B')), known, `a refused receive changes nothing\n${r.describe()}`);
  };
  const inc2 = fs.readFileSync(file('inc2'));
  const full1 = fs.readFileSync(file('full1'));
  const flipped = Buffer.from(inc2);
  flipped[Math.floor(flipped.length / 2)] ^= 0x01;
  const flippedFull = Buffer.from(full1);
  flippedFull[Math.floor(flippedFull.length / 2)] ^= 0x80;
  await refusedOffline(fs.readFileSync(file('inc3')), 'B/R', /base/);
  await refusedOffline(inc2.subarray(0, Math.floor(inc2.length / 2)), 'B/R', /truncated/);
  await refusedOffline(flipped, 'B/R', /damaged|mismatch/);
  await refusedOffline(full1.subarray(0, full1.length - 7), 'B/X', /truncated/);
  await refusedOffline(flippedFull, 'B/X', /damaged|mismatch/);
  await refusedOffline(full1, 'B/R', /exists/);
  await refusedOffline(Buffer.from('not a stream at all'), 'B/X', /stream/);
  await checkOffline(1);
  assert.deepEqual((await volList(home, 'B')).map((v) => v.name), ['R'], 'no hidden or half-received volume shows');

  // offline: first incremental
  const r2 = await receive(home, 'B/R', inc2);
  assert.equal(r2.code, 0, r2.describe());
  assert.match(r2.stdout, /incremental/, r2.describe());
  await checkOffline(2);

  // online: B served, the rest of the chain through its admin socket
  const sb = await serve(t, home, 'B', 1);
  const refusedOnline = async (stream: Buffer, target: string, why: RegExp): Promise<void> => {
    const before = listState(await volList(home, 'B', sb));
    const r = await receive(home, target, stream);
    assertUserError(r, why, sb);
    assert.deepEqual(listState(await volList(home, 'B', sb)), before, `a refused receive changes nothing\n${r.describe()}`);
  };
  await refusedOnline(fs.readFileSync(file('inc4')), 'B/R', /base/);
  const inc3 = fs.readFileSync(file('inc3'));
  const flipped3 = Buffer.from(inc3);
  flipped3[Math.floor(flipped3.length / 2)] ^= 0x10;
  await refusedOnline(flipped3, 'B/R', /damaged|mismatch/);
  await refusedOnline(inc3.subarray(0, inc3.length - 100), 'B/R', /truncated/);
  await assertHolds(sb, 2);
  if (haveLibnbdPython) {
    const held = await holdConnection(t, `${sb.base}/R`);
    await refusedOnline(inc3, 'B/R', /in use/);
    await held.release();
    await noConnections(home, 'B', 'R', sb);
  }
  for (const k of [3, 4]) {
    const r = await receive(home, 'B/R', file(`inc${k}`));
    assert.equal(r.code, 0, ctx(r, sb));
    assert.match(r.stdout, /received B\/R \(incremental\)/, r.describe());
    await assertHolds(sb, k);
  }
  // once B/R is written to, the next incremental no longer applies
  await qio(V, ['write -P 0x51 0 4096', 'flush'], sp);
  await duetOk(home, ['vol', 'snapshot', 'P/V', 'P/S5'], sp);
  await sendOk(home, ['P/S5', '--from', 'P/S4'], file('inc5'), sp);
  await qio(`${sb.base}/R`, ['write -P 0x52 4M 512', 'flush'], sb);
  await noConnections(home, 'B', 'R', sb);
  await refusedOnline(fs.readFileSync(file('inc5')), 'B/R', /written since|does not hold the base/);
  const chkOnline = await duet(home, ['pool', 'check', 'B']);
  assert.equal(chkOnline.code, 0, ctx(chkOnline, sb));
  const stopB = await sb.stop();
  assert.equal(stopB.code, 0, sb.describe());
  await sp.stop();
  for (const p of ['P', 'B']) {
    const chk = await duet(home, ['pool', 'check', p]);
    assert.equal(chk.code, 0, chk.describe());
  }
});

// ---- extend online --------------------------------------------------------------------

test('pool extend online: a nearly full served pool gets a device, then writes that did not fit succeed', async (t) => {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const [d1, d2] = devs(dir, ['d1.img', 'd2.img'], 16 * MiB);
  fs.truncateSync(d2, 32 * MiB);
  await duetOk(home, ['pool', 'create', 'N', d1]);
  await duetOk(home, ['vol', 'create', 'N/V', '--size', '64M']);
  const s = await serve(t, home, 'N', 1);
  const uri = s.uris[0];
  await qio(uri, ['write -P 0x61 0 13M', 'flush'], s);
  const before = await poolShow(home, 'N', s);
  assert.ok(before.usedPercent >= 80, `nearly full\n${JSON.stringify(before)}`);
  assert.ok(before.warning, `pool show warns\n${JSON.stringify(before)}`);
  assert.ok(before.freeBytes < 4 * MiB, JSON.stringify(before));
  // 4 MiB more does not fit yet
  const full = await run('qemu-io', ['-f', 'raw', uri, '-c', `write -P 0x62 13M 4M`], { timeoutMs: 30_000 });
  assert.match(full.stdout + full.stderr, /No space left on device/, ctx(full, s));

  const ext = await duetOk(home, ['pool', 'extend', 'N', d2], s);
  assert.match(ext.stdout, /extended pool N/, ext.describe());
  const after = await poolShow(home, 'N', s);
  const msg = JSON.stringify(after, null, 1);
  assert.deepEqual(after.devices, [d1, d2], `pool show lists the new device\n${msg}`);
  assert.ok(after.sizeBytes >= before.sizeBytes + 30 * MiB, msg);
  assert.ok(after.freeBytes > 30 * MiB, msg);
  await qio(uri, ['write -P 0x62 13M 20M', 'flush', 'read -P 0x61 0 13M', 'read -P 0x62 13M 20M'], s);
  const chk = await duet(home, ['pool', 'check', 'N']);
  assert.equal(chk.code, 0, ctx(chk, s));
  // a device named twice is refused
  assertUserError(await duet(home, ['pool', 'extend', 'N', d2]), /belongs to pool N/, s);
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());

  // offline: still two devices, and the data is there after a restart
  assert.deepEqual((await poolShow(home, 'N')).devices, [d1, d2]);
  const s2 = await serve(t, home, 'N', 1);
  await qio(s2.uris[0], ['read -P 0x61 0 13M', 'read -P 0x62 13M 20M'], s2);
  await s2.stop();
  const chk2 = await duet(home, ['pool', 'check', 'N']);
  assert.equal(chk2.code, 0, chk2.describe());
});

// ---- a full pool ------------------------------------------------------------------------

test('a full pool: the writer gets ENOSPC, the server goes on serving, check is consistent, pool-nearly-full was logged first', async (t) => {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const [d] = devs(dir, ['d.img'], 16 * MiB);
  await duetOk(home, ['pool', 'create', 'F', d]);
  await duetOk(home, ['vol', 'create', 'F/V', '--size', '64M']);
  await duetOk(home, ['vol', 'create', 'F/W', '--size', '8M']);
  await duetOk(home, ['vol', 'create', 'F/X', '--size', '32M']);
  const s = await serve(t, home, 'F', 3);
  const V = `${s.base}/V`;
  const W = `${s.base}/W`;
  await qio(W, ['write -P 0x57 0 1M', 'flush'], s);
  await qio(V, ['write -P 0x56 0 12M', 'flush'], s);
  const events = (): Record<string, unknown>[] =>
    s
      .stderr()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  // past 80%: the warning is in the server's log before any write fails
  const warn = await waitFor(() => events().find((e) => e.event === 'pool-nearly-full'), 5000, `a pool-nearly-full event\n${s.describe()}`).catch(() =>
    assert.fail(`no pool-nearly-full event after filling the pool past 80%\n${s.describe()}`),
  );
  assert.equal(warn.level, 40, `pool-nearly-full is a warning\n${JSON.stringify(warn)}`);
  assert.equal(warn.pool, 'F', JSON.stringify(warn));

  // more than the pool holds
  const q = await run('qemu-io', ['-f', 'raw', V, '-c', 'write -P 0x58 12M 8M'], { timeoutMs: 30_000 });
  assert.match(q.stdout + q.stderr, /No space left on device/, ctx(q, s));
  const big = path.join(dir, 'big.bin');
  randomFile(big, 32 * MiB);
  const c = await run('nbdcopy', [big, `${s.base}/X`], { timeoutMs: 60_000 });
  assert.notEqual(c.code, 0, `nbdcopy of 32 MiB into a 15 MiB pool must fail\n${ctx(c, s)}`);
  assert.match(c.stderr, /No space left on device/, `nbdcopy sees ENOSPC\n${ctx(c, s)}`);
  const up = await Promise.race([s.exited.then(() => false), new Promise<boolean>((r) => setTimeout(() => r(true), 200))]);
  assert.equal(up, true, `the server must stay up after ENOSPC\n${s.describe()}`);
  // the server is up and serves the other volume (reads, and overwrites of its data)
  assert.equal(await nbdSize(W, s), 8 * MiB, s.describe());
  await qio(W, ['read -P 0x57 0 1M', 'write -P 0x59 0 64k', 'flush', 'read -P 0x59 0 64k', 'read -P 0x57 64k 960k'], s);
  await qio(V, ['read -P 0x56 0 12M'], s);
  const info = await poolShow(home, 'F', s);
  assert.ok(info.warning, JSON.stringify(info));
  const chk = await duet(home, ['pool', 'check', 'F']);
  assert.equal(chk.code, 0, `pool check while served\n${ctx(chk, s)}`);
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
  const warnAt = stop.stderr.indexOf('"pool-nearly-full"');
  const firstFail = stop.stderr.search(/ENOSPC|is full|No space/);
  assert.ok(warnAt >= 0 && (firstFail < 0 || warnAt < firstFail), `pool-nearly-full comes before any failure in the log\n${s.describe()}`);
  const chk2 = await duet(home, ['pool', 'check', 'F']);
  assert.equal(chk2.code, 0, chk2.describe());
});

// ---- bad input ----------------------------------------------------------------------------

/** A pool P (one 32 MiB device) with a volume a of 16 MiB; the list and the device sums before. */
async function badInputPool(t: AfterContext): Promise<{ dir: string; home: string; dev: string }> {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const [dev] = devs(dir, ['p.img'], 32 * MiB);
  await duetOk(home, ['pool', 'create', 'P', dev]);
  await duetOk(home, ['vol', 'create', 'P/a', '--size', '16M']);
  return { dir, home, dev };
}

/** Run each bad command: user error, and the pool list and every volume list unchanged. */
async function refusedUnchanged(home: string, cmds: [string[], RegExp][], server?: Server | null, files: string[] = []): Promise<void> {
  const pools = await duetJson<PoolInfo[]>(home, ['pool', 'list'], server);
  const lists = new Map<string, Record<string, unknown>[]>();
  for (const p of pools) lists.set(p.name, listState(await volList(home, p.name, server)));
  const sums = files.filter((f) => fs.existsSync(f)).map((f) => [f, sha256(f)] as const);
  const missing = files.filter((f) => !fs.existsSync(f));
  for (const [args, why] of cmds) {
    const r = await duet(home, args);
    assertUserError(r, why, server);
    for (const [f, sum] of sums) assert.equal(sha256(f), sum, `${f} changed\n${r.describe()}`);
    for (const f of missing) assert.equal(fs.existsSync(f), false, `${f} was created\n${r.describe()}`);
  }
  const after = await duetJson<PoolInfo[]>(home, ['pool', 'list'], server);
  assert.deepEqual(after.map((p) => p.name), pools.map((p) => p.name), 'pool list unchanged');
  for (const p of pools) assert.deepEqual(listState(await volList(home, p.name, server)), lists.get(p.name), `vol list ${p.name} unchanged`);
}

test('bad input: unknown pool', async (t) => {
  const { home } = await badInputPool(t);
  await refusedUnchanged(home, [
    [['vol', 'create', 'NOPE/v', '--size', '1M'], /pool NOPE does not exist/],
    [['vol', 'list', 'NOPE'], /pool NOPE does not exist/],
    [['pool', 'show', 'NOPE'], /pool NOPE does not exist/],
    [['pool', 'check', 'NOPE'], /pool NOPE does not exist/],
    [['serve', '--pool', 'NOPE', '--listen', '127.0.0.1:0'], /pool NOPE does not exist/],
    [['pool', 'create', 'P', '/nonexistent/dev.img'], /pool P already exists/],
    [['vol', 'snapshot', 'NOPE/a', 'NOPE/b'], /pool NOPE does not exist/],
  ]);
  assert.equal(fs.existsSync(path.join(home, 'pools', 'NOPE.json')), false);
});

test('bad input: unknown volume (and other volume-level mistakes), offline and online', async (t) => {
  const { home } = await badInputPool(t);
  await duetOk(home, ['vol', 'snapshot', 'P/a', 'P/sa']);
  const cmds: [string[], RegExp][] = [
    [['vol', 'resize', 'P/sa', '--size', '32M'], /read-only snapshot/],
    [['vol', 'send', 'P/a'], /writable/],
    [['vol', 'send', 'P/sa', '--from', 'P/a'], /writable/],
    [['vol', 'snapshot', 'P/a', 'Q/b'], /different pools/],
    [['vol', 'resize', 'P/nope', '--size', '1M'], /P\/nope does not exist/],
    [['vol', 'snapshot', 'P/nope', 'P/s'], /P\/nope does not exist/],
    [['vol', 'clone', 'P/nope', 'P/c'], /P\/nope does not exist/],
    [['vol', 'remove', 'P/nope'], /P\/nope does not exist/],
    [['vol', 'diff', 'P/a', 'P/nope'], /P\/nope does not exist/],
    [['vol', 'create', 'P/a', '--size', '1M'], /already exists/],
    [['vol', 'create', 'P/bad/name', '--size', '1M'], /POOL\/VOLUME/],
    [['vol', 'create', 'P/.hidden', '--size', '1M'], /volume name/],
    [['vol', 'send', 'P/nope'], /P\/nope does not exist/],
  ];
  await refusedUnchanged(home, cmds);
  const s = await serve(t, home, 'P', 1);
  await refusedUnchanged(home, cmds, s);
  await s.stop();
});

test('bad input: size not a multiple of 512', async (t) => {
  const { home } = await badInputPool(t);
  await refusedUnchanged(home, [
    [['vol', 'create', 'P/x', '--size', '1000'], /multiple of .*512/],
    [['vol', 'create', 'P/x', '--size', '513'], /multiple of .*512/],
    [['vol', 'resize', 'P/a', '--size', '1048577'], /multiple of .*512/],
    [['vol', 'create', 'P/x', '--size', '0'], /size/],
    [['vol', 'create', 'P/x', '--size', 'lots'], /size/],
  ]);
});

test('bad input: shrink below data in use is refused without --force, accepted with it', async (t) => {
  const { home } = await badInputPool(t);
  const s = await serve(t, home, 'P', 1);
  await qio(s.uris[0], ['write -P 0x44 0 1M', 'write -P 0x45 8M 2M', 'flush'], s);
  await refusedUnchanged(home, [[['vol', 'resize', 'P/a', '--size', '4M'], /--force/]], s);
  assert.equal(await nbdSize(s.uris[0], s), 16 * MiB);
  await qio(s.uris[0], ['read -P 0x45 8M 2M'], s);
  // shrinking to just above the data is fine without --force
  await duetOk(home, ['vol', 'resize', 'P/a', '--size', '10M'], s);
  await duetOk(home, ['vol', 'resize', 'P/a', '--size', '4M', '--force'], s);
  const a = (await volList(home, 'P', s))[0];
  assert.equal(a.sizeBytes, 4 * MiB, JSON.stringify(a));
  assert.equal(a.usedBytes, MiB, `the data past the new end is dropped\n${JSON.stringify(a)}`);
  await duetOk(home, ['vol', 'resize', 'P/a', '--size', '16M'], s);
  await qio(s.uris[0], ['read -P 0x44 0 1M', 'read -P 0 4M 12M'], s);
  await s.stop();
  const chk = await duet(home, ['pool', 'check', 'P']);
  assert.equal(chk.code, 0, chk.describe());
});

test('bad input: a device already in a pool (this home or another one)', async (t) => {
  const { dir, home, dev } = await badInputPool(t);
  const [fresh] = devs(dir, ['fresh.img'], 32 * MiB);
  await refusedUnchanged(
    home,
    [
      [['pool', 'create', 'Q', fresh, dev], /already belongs to pool P/],
      [['pool', 'create', 'Q', fresh, fresh], /named twice/],
    ],
    null,
    [dev, fresh],
  );
  // (an offline extend opens P for writing, which rewrites P's checkpoint: only the new device must stay untouched)
  await refusedUnchanged(home, [[['pool', 'extend', 'P', dev], /already belongs to pool P/]], null, [fresh]);
  // a home that does not know P: the superblock on the device still says so
  const other = path.join(dir, 'other-home');
  await refusedUnchanged(other, [[['pool', 'create', 'Q', fresh, dev], /already belongs to pool P/]], null, [dev, fresh]);
  assert.equal(fs.existsSync(path.join(other, 'pools', 'Q.json')), false);
});

test('bad input: a device too small, a missing device file, --chunk-size 3K', async (t) => {
  const { dir, home, dev } = await badInputPool(t);
  const [good] = devs(dir, ['good.img'], 32 * MiB);
  const [small] = devs(dir, ['small.img'], MiB);
  const missing = path.join(dir, 'missing.img');
  await refusedUnchanged(
    home,
    [
      [['pool', 'create', 'Q', good, small], /too small/],
      [['pool', 'create', 'Q', small], /too small/],
      [['pool', 'create', 'Q', good, missing], /missing\.img/],
      [['pool', 'create', 'Q', good, '--chunk-size', '3K'], /chunk size/],
      [['pool', 'create', 'Q', good, '--chunk-size', '2K'], /chunk size/],
      [['pool', 'create', 'Q', good, '--chunk-size', 'big'], /chunk-size/],
    ],
    null,
    [dev, good, small, missing],
  );
  await refusedUnchanged(
    home,
    [
      [['pool', 'extend', 'P', small], /too small/],
      [['pool', 'extend', 'P', missing], /missing\.img/],
    ],
    null,
    [good, small, missing],
  );
  assert.equal(fs.existsSync(path.join(home, 'pools', 'Q.json')), false);
  // the good device was not touched: a pool can still be made on it
  await duetOk(home, ['pool', 'create', 'Q', good, '--chunk-size', '4K']);
  assert.equal((await poolShow(home, 'Q')).chunkSizeBytes, 4096);
});

// ---- pool check on a damaged pool ------------------------------------------------------------

interface Superblock {
  seq: number;
  chunkSize: number;
  devices: { dataStart: number; chunks: number }[];
  checkpoint: { first: number; chunks: number }[];
}

/** The valid superblock slot with the higher sequence number (as duet reads it). */
function bestSuperblock(file: string): Superblock {
  let best: Superblock | undefined;
  for (const slot of [0, 1]) {
    const b = readAt(file, slot * 4096, 4096);
    if (!b.subarray(0, 8).equals(Buffer.from('DUETPOOL'))) continue;
    const len = b.readUInt32LE(24);
    if (len > 4096 - 32) continue;
    const crc = crc32(b.subarray(32, 32 + len), crc32(b.subarray(0, 28)));
    if (crc !== b.readUInt32LE(28)) continue;
    const sb = { ...(JSON.parse(b.subarray(32, 32 + len).toString()) as Omit<Superblock, 'seq'>), seq: Number(b.readBigUInt64LE(16)) };
    if (!best || sb.seq > best.seq) best = sb;
  }
  assert.ok(best, `${file}: no valid superblock`);
  return best;
}

test('pool check: consistent -> exit 0; one damaged checkpoint copy -> the pool still opens, check exits 1 naming the copy', async (t) => {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const [d1, d2] = devs(dir, ['d1.img', 'd2.img'], 32 * MiB);
  await duetOk(home, ['pool', 'create', 'P', d1, d2]);
  await duetOk(home, ['vol', 'create', 'P/a', '--size', '16M']);
  await duetOk(home, ['vol', 'snapshot', 'P/a', 'P/s']);
  const ok = await duet(home, ['pool', 'check', 'P']);
  assert.equal(ok.code, 0, ok.describe());
  assert.match(ok.stdout, /consistent/, ok.describe());
  const okJson = await duet(home, ['pool', 'check', 'P', '--json']);
  assert.equal(okJson.code, 0, okJson.describe());
  assert.equal((JSON.parse(okJson.stdout) as { ok: boolean }).ok, true);
  const listBefore = listState(await volList(home, 'P'));

  // the checkpoint copy that lies on device 0
  const sb = bestSuperblock(d1);
  const onDev0 = sb.checkpoint.findIndex((c) => c.first < sb.devices[0].chunks);
  assert.ok(onDev0 >= 0, `a checkpoint copy on device 0: ${JSON.stringify(sb.checkpoint)}`);
  const at = sb.devices[0].dataStart + sb.checkpoint[onDev0].first * sb.chunkSize;
  assert.ok(readAt(d1, at, 8).equals(Buffer.from('DUETCKPT')), `checkpoint piece at ${at}`);
  const fd = fs.openSync(d1, 'r+');
  try {
    fs.writeSync(fd, Buffer.alloc(64, 0xee), 0, 64, at + 40); // payload bytes: its checksum fails
  } finally {
    fs.closeSync(fd);
  }

  const bad = await duet(home, ['pool', 'check', 'P']);
  assert.equal(bad.code, 1, `a damaged checkpoint copy must make check exit 1\n${bad.describe()}`);
  assert.match(bad.stdout, /DAMAGED/, bad.describe());
  assert.match(bad.stdout, new RegExp(`checkpoint copy ${onDev0 + 1}\\b`), `the message names the checkpoint copy\n${bad.describe()}`);
  const badJson = await duet(home, ['pool', 'check', 'P', '--json']);
  assert.equal(badJson.code, 1, badJson.describe());
  const report = JSON.parse(badJson.stdout) as { ok: boolean; problems: string[] };
  assert.equal(report.ok, false, badJson.stdout);
  assert.ok(report.problems.some((p) => /checkpoint copy/.test(p)), badJson.stdout);
  // the other copy carries the pool: reads and the volumes are all there
  assert.deepEqual(listState(await volList(home, 'P')), listBefore, 'the pool opens from the other copy');

  // a writable open writes a fresh checkpoint: the damage is gone
  await duetOk(home, ['vol', 'create', 'P/b', '--size', '1M']);
  const fixed = await duet(home, ['pool', 'check', 'P']);
  assert.equal(fixed.code, 0, `after a writable open the pool is consistent again\n${fixed.describe()}`);

  // both copies damaged: the pool cannot open; check still answers "damaged" (exit 1), other commands refuse (exit 2)
  const sb2 = bestSuperblock(d1);
  for (const copy of sb2.checkpoint) {
    const dev = copy.first < sb2.devices[0].chunks ? 0 : 1;
    const file = [d1, d2][dev];
    const off = sb2.devices[dev].dataStart + (copy.first - (dev === 0 ? 0 : sb2.devices[0].chunks)) * sb2.chunkSize;
    assert.ok(readAt(file, off, 8).equals(Buffer.from('DUETCKPT')), `checkpoint piece at ${file}:${off}`);
    const f = fs.openSync(file, 'r+');
    fs.writeSync(f, Buffer.alloc(64, 0xee), 0, 64, off + 40);
    fs.closeSync(f);
  }
  const gone = await duet(home, ['pool', 'check', 'P']);
  assert.equal(gone.code, 1, `check of a pool whose metadata is unreadable: exit 1 (damaged)\n${gone.describe()}`);
  assert.match(gone.stdout, /DAMAGED/, gone.describe());
  assert.match(gone.stdout, /copy 1\b.*copy 2\b/, gone.describe());
  assertUserError(await duet(home, ['vol', 'list', 'P']), /checkpoint unreadable/);
});
