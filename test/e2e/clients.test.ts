/**
 * Real NBD clients against `duet serve`: nbdinfo, nbdcopy, qemu-img, qemu-io,
 * fio (ioengine=nbd) and libnbd's Python bindings for protocol corners.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  firstDifference,
  haveProgram,
  nonJsonLines,
  PYTHON,
  python,
  randomFile,
  readAt,
  run,
  RunResult,
  Server,
  sha256,
  sparseFile,
  startServe,
  tmpDir,
} from './harness.js';

const MiB = 1024 * 1024;

function ok(r: RunResult, server?: Server): void {
  assert.equal(r.code, 0, `${r.describe()}\n${server ? server.describe() : ''}`);
}

function fail(r: RunResult, server: Server, msg: string): string {
  return `${msg}\n${r.describe()}\n${server.describe()}`;
}

/** nbdinfo --json, the first export's object. */
async function infoJson(uri: string, server: Server): Promise<Record<string, unknown>> {
  const r = await run('nbdinfo', ['--json', uri], { timeoutMs: 10_000 });
  ok(r, server);
  const j = JSON.parse(r.stdout) as { exports: Record<string, unknown>[] };
  assert.ok(Array.isArray(j.exports) && j.exports.length >= 1, fail(r, server, 'nbdinfo --json: no exports'));
  return j.exports[0];
}

const haveLibnbdPython = fs.existsSync('/usr/lib/python3/dist-packages/nbd.py') && fs.existsSync(PYTHON);
const skipPy = haveLibnbdPython ? false : 'python3-libnbd is not installed (/usr/lib/python3/dist-packages/nbd.py)';

/** Shared Python prelude: open handles with strict mode off, so the server (not libnbd) judges requests. */
const PY_PRELUDE = `
import nbd, sys, json, errno
def errname(e):
    v = getattr(e, 'errno', None)
    if isinstance(v, int): return errno.errorcode.get(v, str(v))
    return v
def attempt(fn):
    try:
        fn()
        return 'ok'
    except nbd.Error as e:
        return errname(e)
def handle(uri, meta=False):
    h = nbd.NBD()
    h.set_strict_mode(0)
    if meta: h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h
`;

async function py(server: Server, script: string, args: string[] = [], timeoutMs = 30_000): Promise<Record<string, unknown>> {
  const r = await python(PY_PRELUDE + script, args, { timeoutMs });
  assert.equal(r.code, 0, fail(r, server, 'python script failed'));
  const last = r.stdout.trim().split('\n').pop() ?? '';
  try {
    return JSON.parse(last) as Record<string, unknown>;
  } catch {
    assert.fail(fail(r, server, 'python script printed no JSON result'));
  }
}

// ---- nbdinfo ---------------------------------------------------------------

test('nbdinfo: plain output names the export, its size and uri', async (t) => {
  const dir = tmpDir(t);
  sparseFile(path.join(dir, 'disk.img'), 16 * MiB);
  const s = await startServe([path.join(dir, 'disk.img')], { t });
  assert.deepEqual(s.uris, [`nbd://127.0.0.1:${s.port}/disk`], s.describe());
  const r = await run('nbdinfo', [s.uris[0]], { timeoutMs: 10_000 });
  ok(r, s);
  assert.match(r.stdout, /protocol: newstyle-fixed/, fail(r, s, 'not fixed newstyle'));
  assert.match(r.stdout, /export="disk":/, fail(r, s, 'export name'));
  assert.match(r.stdout, /export-size: 16777216\b/, fail(r, s, 'export size'));
  assert.match(r.stdout, new RegExp(`uri: nbd://127\\.0\\.0\\.1:${s.port}/disk`), fail(r, s, 'uri'));
  assert.match(r.stdout, /is_read_only: false/, fail(r, s, 'read-only flag'));
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
  assert.deepEqual(nonJsonLines(stop.stderr), [], `stderr must be JSON lines\n${s.describe()}`);
});

test('nbdinfo --list shows every export with its name', async (t) => {
  const dir = tmpDir(t);
  const files = ['first.img', 'second.raw', 'third'].map((f, i) => {
    const p = path.join(dir, f);
    sparseFile(p, (i + 1) * MiB);
    return p;
  });
  const s = await startServe([`alpha=${files[0]}`, files[1], files[2]], { t });
  assert.deepEqual(
    s.uris,
    ['alpha', 'second', 'third'].map((n) => `nbd://127.0.0.1:${s.port}/${n}`),
    s.describe(),
  );
  const r = await run('nbdinfo', ['--list', s.base], { timeoutMs: 10_000 });
  ok(r, s);
  for (const [name, size] of [['alpha', MiB], ['second', 2 * MiB], ['third', 3 * MiB]] as const) {
    const m = new RegExp(`export="${name}":[^]*?export-size: (\\d+)`).exec(r.stdout);
    assert.ok(m, fail(r, s, `export ${name} missing from --list`));
    assert.equal(Number(m[1]), size, fail(r, s, `export ${name} size`));
  }
  const rj = await run('nbdinfo', ['--list', '--json', s.base], { timeoutMs: 10_000 });
  ok(rj, s);
  const names = (JSON.parse(rj.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']);
  assert.deepEqual([...names].sort(), ['alpha', 'second', 'third'], fail(rj, s, 'exports in --list --json'));
});

test('nbdinfo --json: size and flags of a writable and of a --read-only export', async (t) => {
  const dir = tmpDir(t);
  const file = path.join(dir, 'vol.img');
  sparseFile(file, 24 * MiB);
  const s = await startServe([file], { t });
  const e = await infoJson(s.uris[0], s);
  const msg = `${JSON.stringify(e, null, 1)}\n${s.describe()}`;
  assert.equal(e['export-name'], 'vol', msg);
  assert.equal(e['export-size'], 24 * MiB, msg);
  for (const flag of ['can_flush', 'can_fua', 'can_multi_conn', 'can_df', 'can_zero', 'can_trim', 'can_cache', 'can_fast_zero']) {
    assert.equal(e[flag], true, `${flag}\n${msg}`);
  }
  assert.equal(e.is_read_only, false, msg);
  assert.ok(Array.isArray(e.contexts) && (e.contexts as string[]).includes('base:allocation'), `base:allocation\n${msg}`);
  assert.equal(typeof e.block_size_minimum, 'number', msg);
  await s.stop();

  const ro = await startServe([file, '--read-only'], { t });
  const r = await infoJson(ro.uris[0], ro);
  const rmsg = `${JSON.stringify(r, null, 1)}\n${ro.describe()}`;
  assert.equal(r.is_read_only, true, rmsg);
  assert.equal(r['export-size'], 24 * MiB, rmsg);
  assert.equal(r.can_flush, true, rmsg);
  assert.equal(r.can_zero, false, `a read-only export must not offer write zeroes\n${rmsg}`);
  assert.equal(r.can_trim, false, `a read-only export must not offer trim\n${rmsg}`);
});

test('nbdinfo --map shows data vs hole extents after writing into a sparse file', async (t) => {
  const dir = tmpDir(t);
  const file = path.join(dir, 'sparse.img');
  sparseFile(file, 16 * MiB);
  const s = await startServe([file], { t });
  const before = await run('nbdinfo', ['--map', '--json', s.uris[0]], { timeoutMs: 10_000 });
  ok(before, s);
  type Ext = { offset: number; length: number; type: number };
  const b = JSON.parse(before.stdout) as Ext[];
  assert.ok(b.every((x) => (x.type & 2) !== 0), fail(before, s, 'a fresh sparse file must map as zero everywhere'));

  const w = await run('qemu-io', ['-f', 'raw', s.uris[0], '-c', 'write -P 0x55 4M 1M', '-c', 'write -P 0x66 12M 64k', '-c', 'flush'], {
    timeoutMs: 15_000,
  });
  ok(w, s);
  const m = await run('nbdinfo', ['--map', '--json', s.uris[0]], { timeoutMs: 10_000 });
  ok(m, s);
  const ext = JSON.parse(m.stdout) as Ext[];
  const msg = fail(m, s, 'extent map');
  // contiguous, covering the export
  let pos = 0;
  for (const x of ext) {
    assert.equal(x.offset, pos, msg);
    pos += x.length;
  }
  assert.equal(pos, 16 * MiB, msg);
  const typeAt = (off: number): number => ext.find((x) => x.offset <= off && off < x.offset + x.length)!.type;
  for (const off of [4 * MiB, 4 * MiB + 512 * 1024, 5 * MiB - 1, 12 * MiB, 12 * MiB + 65535]) {
    assert.equal(typeAt(off), 0, `offset ${off} was written: must be data\n${msg}`);
  }
  for (const off of [0, 4 * MiB - 1, 5 * MiB, 8 * MiB, 12 * MiB - 1, 12 * MiB + 65536, 16 * MiB - 1]) {
    assert.equal(typeAt(off), 3, `offset ${off} was never written: must be hole,zero\n${msg}`);
  }
  // the bytes agree with the map
  assert.ok(readAt(file, 4 * MiB, MiB).equals(Buffer.alloc(MiB, 0x55)), s.describe());
});

// ---- nbdcopy, qemu-img -----------------------------------------------------------

// Both receive paths of the server: reads into its own buffers (default) and 'data' events.
// And the worker threads of --workers, which get each connection as a dup'd descriptor.
const RECEIVE_PATHS: [string, NodeJS.ProcessEnv, string[]][] = [
  ['', {}, []],
  [' (data-event receive path)', { DUET_NO_USER_BUFFER: '1' }, []],
  [' (3 worker threads)', {}, ['--workers', '3']],
];

for (const [mode, env, extra] of RECEIVE_PATHS) {
  test(`nbdcopy: a random 64 MiB file into an export and back, byte for byte${mode}`, async (t) => {
    const dir = tmpDir(t);
    const src = path.join(dir, 'src.bin');
    const back = path.join(dir, 'back.bin');
    const disk = path.join(dir, 'disk.img');
    randomFile(src, 64 * MiB);
    sparseFile(disk, 64 * MiB);
    const s = await startServe([disk, ...extra], { t, env, exports: 1 });
    ok(await run('nbdcopy', ['--flush', src, s.uris[0]], { timeoutMs: 60_000 }), s);
    ok(await run('nbdcopy', [s.uris[0], back], { timeoutMs: 60_000 }), s);
    assert.equal(firstDifference(src, back), -1, `copy back differs from the source\n${s.describe()}`);
    const stop = await s.stop();
    assert.equal(stop.code, 0, s.describe());
    assert.equal(firstDifference(src, disk), -1, `the backing file differs from what nbdcopy wrote\n${s.describe()}`);
  });

  test(`qemu-img: convert into the export, compare, convert nbd -> qcow2 -> compare${mode}`, async (t) => {
    const dir = tmpDir(t);
    const src = path.join(dir, 'src.bin');
    const disk = path.join(dir, 'disk.img');
    const qcow = path.join(dir, 'out.qcow2');
    randomFile(src, 8 * MiB);
    fs.appendFileSync(src, Buffer.alloc(8 * MiB)); // second half zero: holes on the way out
    sparseFile(disk, 16 * MiB);
    const s = await startServe([disk, ...extra], { t, env, exports: 1 });
    const uri = s.uris[0];
    ok(await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri], { timeoutMs: 30_000 }), s);
    ok(await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri], { timeoutMs: 30_000 }), s);
    const info = await run('qemu-img', ['info', '--output=json', '-f', 'raw', uri], { timeoutMs: 10_000 });
    ok(info, s);
    assert.equal((JSON.parse(info.stdout) as { 'virtual-size': number })['virtual-size'], 16 * MiB, fail(info, s, 'virtual-size'));
    ok(await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri, qcow], { timeoutMs: 30_000 }), s);
    ok(await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow, src], { timeoutMs: 30_000 }), s);
    // a one-byte change must be seen (the byte's complement: a fixed value is already there one run in 256)
    const changed = readAt(src, 5 * MiB, 1)[0] ^ 0xff;
    ok(await run('qemu-io', ['-f', 'raw', uri, '-c', `write -P ${changed} 5M 1`], { timeoutMs: 10_000 }), s);
    const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri], { timeoutMs: 30_000 });
    assert.equal(differ.code, 1, fail(differ, s, 'qemu-img compare must report the changed byte'));
    assert.match(differ.stdout, /offset 5242880/, fail(differ, s, 'first difference'));
  });

  // ---- qemu-io ---------------------------------------------------------------------

  test(`qemu-io: FUA pattern writes, flush, write zeroes, discard, verified reads${mode}`, async (t) => {
    const dir = tmpDir(t);
    const disk = path.join(dir, 'disk.img');
    randomFile(disk, 16 * MiB);
    const original = fs.readFileSync(disk);
    const s = await startServe([disk, ...extra], { t, env, exports: 1 });
    const uri = s.uris[0];
    const r = await run(
      'qemu-io',
      [
        '-f', 'raw', uri,
        '-c', 'write -f -P 0xa5 0 1M',
        '-c', 'read -P 0xa5 0 1M',
        '-c', 'write -P 0x5a 1M 1M',
        '-c', 'flush',
        '-c', 'read -P 0x5a 1M 1M',
        '-c', 'write -z 2M 1M',
        '-c', 'read -P 0 2M 1M',
        '-c', 'write -z -u 3M 1M',
        '-c', 'read -P 0 3M 1M',
        '-c', 'write -z -f 4M 64k',
        '-c', 'read -P 0 4M 64k',
        '-c', 'write -P 0x3c 5M 1M',
        '-c', 'discard 5M 512k',
        '-c', 'read -P 0x3c 5632k 512k',
        '-c', 'write -f -P 0x11 15M 1M',
        '-c', 'aio_write -P 0x22 6M 256k',
        '-c', 'aio_write -f -P 0x33 7M 256k',
        '-c', 'aio_flush',
        '-c', 'read -P 0x22 6M 256k',
        '-c', 'read -P 0x33 7M 256k',
        '-c', 'write -P 0x77 1000 3000',
        '-c', 'read -P 0x77 1000 3000',
        '-c', 'flush',
      ],
      { timeoutMs: 30_000 },
    );
    ok(r, s);
    assert.doesNotMatch(r.stdout + r.stderr, /fail|error/i, fail(r, s, 'qemu-io reported a failure'));
    // a wrong pattern must be caught (the checks above are real)
    const neg = await run('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0xa6 0 4k'], { timeoutMs: 10_000 });
    assert.match(neg.stdout + neg.stderr, /Pattern verification failed/, fail(neg, s, 'wrong pattern not detected'));

    const stop = await s.stop();
    assert.equal(stop.code, 0, s.describe());
    // the backing file holds exactly what was written; untouched ranges are unchanged
    const expect = Buffer.from(original);
    expect.fill(0xa5, 0, MiB);
    expect.fill(0x5a, MiB, 2 * MiB);
    expect.fill(0, 2 * MiB, 4 * MiB + 64 * 1024);
    expect.fill(0x3c, 5632 * 1024, 6 * MiB);
    expect.fill(0x22, 6 * MiB, 6 * MiB + 256 * 1024);
    expect.fill(0x33, 7 * MiB, 7 * MiB + 256 * 1024);
    expect.fill(0x11, 15 * MiB, 16 * MiB);
    const got = fs.readFileSync(disk);
    // 1000..4000 lies in the 0xa5 range and was overwritten with 0x77 afterwards
    expect.fill(0x77, 1000, 4000);
    // the discarded range 5M..5.5M is undefined after trim: take it from the file
    got.copy(expect, 5 * MiB, 5 * MiB, 5632 * 1024);
    assert.equal(got.length, expect.length, s.describe());
    const diff = got.findIndex((v, i) => v !== expect[i]);
    assert.equal(diff, -1, `backing file differs at byte ${diff}\n${s.describe()}`);
  });
}

// ---- fio -------------------------------------------------------------------------

for (const [mode, env, extra] of RECEIVE_PATHS) {
  test(`fio ioengine=nbd randrw with crc32c verify${mode}`, { skip: haveProgram('fio') ? false : 'fio not installed' }, async (t) => {
    const dir = tmpDir(t);
    const disk = path.join(dir, 'disk.img');
    sparseFile(disk, 64 * MiB);
    const s = await startServe([disk, ...extra], { t, env, exports: 1 });
    const r = await run(
      'fio',
      [
        '--name=duet', '--ioengine=nbd', `--uri=${s.uris[0]}`, '--rw=randrw', '--bs=4k', '--iodepth=16',
        '--size=32M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
      ],
      { timeoutMs: 60_000, cwd: dir },
    );
    ok(r, s);
    const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as {
      jobs: { error: number; read: { io_bytes: number }; write: { io_bytes: number } }[];
    };
    const job = json.jobs[0];
    assert.equal(job.error, 0, fail(r, s, 'fio job error'));
    assert.ok(job.write.io_bytes > 0 && job.read.io_bytes > 0, fail(r, s, 'fio did no reads or writes'));
    assert.doesNotMatch(r.stderr, /verify|bad magic|crc32c/i, fail(r, s, 'fio verify complained'));

    // a second pass with bigger random blocks and a deeper queue
    const r2 = await run(
      'fio',
      [
        '--name=duet2', '--ioengine=nbd', `--uri=${s.uris[0]}`, '--rw=randwrite', '--bsrange=512-256k', '--iodepth=32',
        '--size=32M', '--offset=32M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0',
      ],
      { timeoutMs: 60_000, cwd: dir },
    );
    ok(r2, s);
    assert.match(r2.stdout, /err= 0/, fail(r2, s, 'fio error'));
  });
}

// ---- libnbd: protocol corners -----------------------------------------------------

test('libnbd: reads beyond the end fail with EINVAL, writes with ENOSPC, the connection goes on', { skip: skipPy }, async (t) => {
  const dir = tmpDir(t);
  const disk = path.join(dir, 'disk.img');
  randomFile(disk, 4 * MiB);
  const before = sha256(disk);
  const s = await startServe([disk], { t });
  const out = await py(
    s,
    `
h = handle(sys.argv[1])
size = h.get_size()
r = {'size': size}
r['read_past_end'] = attempt(lambda: h.pread(512, size))
r['read_straddling_end'] = attempt(lambda: h.pread(1024, size - 512))
r['read_far_beyond'] = attempt(lambda: h.pread(512, 1 << 62))
r['alive_after_reads'] = len(h.pread(4096, size - 4096))
r['write_past_end'] = attempt(lambda: h.pwrite(b'x' * 512, size))
r['write_straddling_end'] = attempt(lambda: h.pwrite(b'x' * 1024, size - 512))
r['zero_past_end'] = attempt(lambda: h.zero(4096, size))
r['last_bytes'] = h.pread(512, size - 512).hex()
h.pwrite(b'y' * 512, size - 512)
r['tail_write'] = h.pread(512, size - 512) == b'y' * 512
h.shutdown()
print(json.dumps(r))
`,
    [s.uris[0]],
  );
  const msg = `${JSON.stringify(out)}\n${s.describe()}`;
  assert.equal(out.size, 4 * MiB, msg);
  assert.equal(out.read_past_end, 'EINVAL', msg);
  assert.equal(out.read_straddling_end, 'EINVAL', msg);
  assert.equal(out.read_far_beyond, 'EINVAL', msg);
  assert.equal(out.alive_after_reads, 4096, msg);
  assert.equal(out.write_past_end, 'ENOSPC', msg);
  assert.equal(out.write_straddling_end, 'ENOSPC', msg);
  assert.equal(out.zero_past_end, 'ENOSPC', msg);
  assert.equal(out.tail_write, true, msg);
  await s.stop();
  const after = fs.readFileSync(disk);
  assert.equal(after.length, 4 * MiB, `the file must not grow\n${s.describe()}`);
  assert.notEqual(sha256(disk), before, 'the tail write must have landed');
  assert.ok(after.subarray(after.length - 512).equals(Buffer.alloc(512, 'y')), s.describe());
});

test('libnbd: every write to a --read-only export fails with EPERM; reads, flush and cache work', { skip: skipPy }, async (t) => {
  const dir = tmpDir(t);
  const disk = path.join(dir, 'ro.img');
  randomFile(disk, 2 * MiB);
  const before = sha256(disk);
  const st0 = fs.statSync(disk);
  const s = await startServe([disk, '--read-only'], { t });
  const out = await py(
    s,
    `
h = handle(sys.argv[1])
r = {'read_only': h.is_read_only()}
r['pwrite'] = attempt(lambda: h.pwrite(b'z' * 4096, 0))
r['pwrite_fua'] = attempt(lambda: h.pwrite(b'z' * 4096, 0, nbd.CMD_FLAG_FUA))
r['zero'] = attempt(lambda: h.zero(4096, 0))
r['trim'] = attempt(lambda: h.trim(4096, 0))
r['read'] = len(h.pread(4096, 0))
r['flush'] = attempt(lambda: h.flush())
r['cache'] = attempt(lambda: h.cache(65536, 0))
h.shutdown()
print(json.dumps(r))
`,
    [s.uris[0]],
  );
  const msg = `${JSON.stringify(out)}\n${s.describe()}`;
  assert.equal(out.read_only, true, msg);
  for (const op of ['pwrite', 'pwrite_fua', 'zero', 'trim']) assert.equal(out[op], 'EPERM', `${op}\n${msg}`);
  assert.equal(out.read, 4096, msg);
  assert.equal(out.flush, 'ok', msg);
  assert.equal(out.cache, 'ok', msg);
  await s.stop();
  assert.equal(sha256(disk), before, 'a read-only export changed its file');
  assert.equal(fs.statSync(disk).mtimeMs, st0.mtimeMs, 'a read-only export touched its file');
});

test('libnbd: block_status with REQ_ONE, FAST_ZERO, cache, structured read of a hole', { skip: skipPy }, async (t) => {
  const dir = tmpDir(t);
  const disk = path.join(dir, 'disk.img');
  sparseFile(disk, 16 * MiB);
  const s = await startServe([disk], { t });
  const out = await py(
    s,
    `
h = handle(sys.argv[1], meta=True)
size = h.get_size()
r = {'meta': h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), 'structured': h.get_structured_replies_negotiated()}
h.pwrite(b'D' * 65536, 1 << 20)
h.pwrite(b'E' * 4096, (8 << 20) + 131072)
h.flush()
def extents(length, offset, flags=0):
    got = []
    def cb(meta, off, ents, err):
        got.append({'meta': meta, 'offset': off, 'entries': list(ents)})
        return 0
    h.block_status(length, offset, cb, flags)
    return got
r['req_one_hole'] = extents(size, 0, nbd.CMD_FLAG_REQ_ONE)
r['req_one_data'] = extents(size - (1 << 20), 1 << 20, nbd.CMD_FLAG_REQ_ONE)
r['full'] = extents(size, 0)
# FAST_ZERO: success or ENOTSUP, never anything else; on success the range reads back as zeros
h.pwrite(b'F' * 65536, 2 << 20)
r['fast_zero'] = attempt(lambda: h.zero(65536, 2 << 20, nbd.CMD_FLAG_FAST_ZERO))
r['fast_zero_reads_zero'] = h.pread(65536, 2 << 20) == bytes(65536) if r['fast_zero'] == 'ok' else None
r['zero_no_hole'] = attempt(lambda: h.zero(4096, 3 << 20, nbd.CMD_FLAG_NO_HOLE))
r['cache'] = attempt(lambda: h.cache(1 << 20, 0))
r['cache_past_end'] = attempt(lambda: h.cache(4096, size))
# structured read of a pure hole
chunks = []
def chunk(sub, off, status, err):
    chunks.append({'offset': off, 'length': len(sub), 'status': status})
    return 0
buf = h.pread_structured(1 << 20, 12 << 20, chunk)
r['hole_read_zero'] = buf == bytes(1 << 20)
r['hole_chunks'] = chunks
# structured read across data and holes
chunks2 = []
def chunk2(sub, off, status, err):
    chunks2.append({'offset': off, 'length': len(sub), 'status': status})
    return 0
buf = h.pread_structured(1 << 20, 8 << 20, chunk2)
expect = bytearray(1 << 20)
expect[131072:131072 + 4096] = b'E' * 4096
r['mixed_read_ok'] = buf == bytes(expect)
r['mixed_chunks'] = chunks2
r['df_read'] = h.pread(1 << 20, 8 << 20, nbd.CMD_FLAG_DF) == bytes(expect)
h.shutdown()
print(json.dumps(r))
`,
    [s.uris[0]],
  );
  const msg = `${JSON.stringify(out)}\n${s.describe()}`;
  assert.equal(out.meta, true, msg);
  assert.equal(out.structured, true, msg);
  type Bs = { meta: string; offset: number; entries: number[] }[];
  const one = out.req_one_hole as Bs;
  assert.equal(one.length, 1, `one block status chunk\n${msg}`);
  assert.equal(one[0].meta, 'base:allocation', msg);
  assert.equal(one[0].entries.length, 2, `REQ_ONE must return exactly one extent\n${msg}`);
  assert.equal(one[0].entries[0], MiB, `first extent: the hole up to the data at 1 MiB\n${msg}`);
  assert.equal(one[0].entries[1] & 3, 3, `first extent is a hole reading as zero\n${msg}`);
  const oneData = out.req_one_data as Bs;
  assert.equal(oneData[0].entries.length, 2, `REQ_ONE must return exactly one extent\n${msg}`);
  assert.ok(oneData[0].entries[0] > 0 && oneData[0].entries[0] <= 65536, `data extent length\n${msg}`);
  assert.equal(oneData[0].entries[1] & 2, 0, `data at 1 MiB must not be reported zero\n${msg}`);
  const full = (out.full as Bs)[0].entries;
  let total = 0;
  for (let i = 0; i < full.length; i += 2) total += full[i];
  assert.ok(total > 0 && total <= 16 * MiB, `full block status length ${total}\n${msg}`);
  assert.ok(full.length > 2, `several extents expected\n${msg}`);

  assert.ok(out.fast_zero === 'ok' || out.fast_zero === 'ENOTSUP', `FAST_ZERO: ${String(out.fast_zero)}\n${msg}`);
  if (out.fast_zero === 'ok') assert.equal(out.fast_zero_reads_zero, true, msg);
  assert.equal(out.zero_no_hole, 'ok', msg);
  assert.equal(out.cache, 'ok', msg);
  assert.equal(out.cache_past_end, 'EINVAL', msg);
  assert.equal(out.hole_read_zero, true, `a hole must read back as zeros\n${msg}`);
  type Ch = { offset: number; length: number; status: number }[];
  const hc = out.hole_chunks as Ch;
  assert.equal(hc.reduce((a, c) => a + c.length, 0), MiB, `chunks cover the read exactly\n${msg}`);
  assert.equal(out.mixed_read_ok, true, `data between holes reads back right\n${msg}`);
  const mc = out.mixed_chunks as Ch;
  assert.equal(mc.reduce((a, c) => a + c.length, 0), MiB, `chunks cover the read exactly\n${msg}`);
  assert.equal(out.df_read, true, msg);
});

test('libnbd: NAME=PATH export and the default export "" reach the right files', { skip: skipPy }, async (t) => {
  const dir = tmpDir(t);
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b.img');
  sparseFile(a, 4 * MiB);
  sparseFile(b, 2 * MiB);
  const s = await startServe([`vol=${a}`, b], { t });
  assert.deepEqual(s.uris, [`${s.base}/vol`, `${s.base}/b`], s.describe());
  const out = await py(
    s,
    `
base = sys.argv[1]
d = handle(base)               # no path: the default export ""
v = handle(base + '/vol')
b = handle(base + '/b')
r = {'default_name': d.get_export_name(), 'default_size': d.get_size(), 'vol_size': v.get_size(), 'b_size': b.get_size()}
d.pwrite(b'Q' * 4096, 8192)
d.flush()
r['vol_sees_default'] = v.pread(4096, 8192) == b'Q' * 4096
r['b_does_not'] = b.pread(4096, 8192) == bytes(4096)
b.pwrite(b'B' * 512, 0)
b.flush()
r['vol_untouched_by_b'] = v.pread(512, 0) == bytes(512)
r['unknown'] = attempt(lambda: handle(base + '/nosuch'))
for x in (d, v, b): x.shutdown()
print(json.dumps(r))
`,
    [s.base],
  );
  const msg = `${JSON.stringify(out)}\n${s.describe()}`;
  assert.equal(out.default_name, '', msg);
  assert.equal(out.default_size, 4 * MiB, `"" must be the first export (vol, 4 MiB)\n${msg}`);
  assert.equal(out.vol_size, 4 * MiB, msg);
  assert.equal(out.b_size, 2 * MiB, msg);
  assert.equal(out.vol_sees_default, true, msg);
  assert.equal(out.b_does_not, true, msg);
  assert.equal(out.vol_untouched_by_b, true, msg);
  assert.equal(out.unknown, 'ENOENT', `an unknown export name must be refused\n${msg}`);
  const info = await infoJson(s.base, s);
  assert.equal(info['export-size'], 4 * MiB, s.describe());
  await s.stop();
  assert.ok(readAt(a, 8192, 4096).equals(Buffer.alloc(4096, 'Q')), 'default export wrote into a.img');
  assert.ok(readAt(b, 0, 512).equals(Buffer.alloc(512, 'B')), 'export b wrote into b.img');
  assert.ok(readAt(b, 8192, 4096).equals(Buffer.alloc(4096)), 'b.img untouched by the default export');
});

for (const workers of ['0', '3']) {
test(`libnbd: multi-conn, a write flushed on one connection is seen on the others; 8 connections at once (--workers ${workers})`, { skip: skipPy }, async (t) => {
  const dir = tmpDir(t);
  const disk = path.join(dir, 'disk.img');
  sparseFile(disk, 32 * MiB);
  const s = await startServe([disk, "--workers", workers], { t, exports: 1 });
  const out = await py(
    s,
    `
import os
uri = sys.argv[1]
hs = [handle(uri) for _ in range(8)]
r = {'multi_conn': all(h.can_multi_conn() for h in hs)}
# write on one, flush, read on every other
pat = os.urandom(65536)
hs[0].pwrite(pat, 5 << 20)
hs[0].flush()
r['seen_everywhere'] = all(h.pread(65536, 5 << 20) == pat for h in hs[1:])
# every connection writes its own 1 MiB region concurrently (aio), then one flush,
# then each region is read back on a different connection
BS = 65536
data = {i: os.urandom(1 << 20) for i in range(8)}
cookies = []
for i, h in enumerate(hs):
    for k in range(16):
        off = (8 << 20) + i * (1 << 20) + k * BS
        buf = nbd.Buffer.from_bytearray(bytearray(data[i][k * BS:(k + 1) * BS]))
        cookies.append((h, h.aio_pwrite(buf, off)))
pending = list(cookies)
import time
deadline = time.time() + 20
while pending and time.time() < deadline:
    for h in hs:
        if h.aio_in_flight() > 0:
            h.poll(10)
    pending = [(h, c) for (h, c) in pending if not h.aio_command_completed(c)]
r['all_completed'] = not pending
hs[3].flush()
r['cross_reads'] = [hs[(i + 1) % 8].pread(1 << 20, (8 << 20) + i * (1 << 20)) == data[i] for i in range(8)]
for h in hs: h.shutdown()
print(json.dumps(r))
`,
    [s.uris[0]],
    40_000,
  );
  const msg = `${JSON.stringify(out)}\n${s.describe()}`;
  assert.equal(out.multi_conn, true, msg);
  assert.equal(out.seen_everywhere, true, msg);
  assert.equal(out.all_completed, true, msg);
  assert.deepEqual(out.cross_reads, Array(8).fill(true), msg);
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
});
}

test('nbdsh -c: a quick scripted session', { skip: haveProgram('nbdsh') && haveLibnbdPython ? false : 'nbdsh not installed' }, async (t) => {
  const dir = tmpDir(t);
  const disk = path.join(dir, 'disk.img');
  sparseFile(disk, MiB);
  const s = await startServe([disk], { t });
  const r = await run(
    'nbdsh',
    ['-u', s.uris[0], '-c', 'buf = b"HELLO-NBD" * 455 + b"x"\nh.pwrite(buf, 4096)\nh.flush()\nassert h.pread(4096, 4096) == buf\nprint("size", h.get_size())'],
    { timeoutMs: 15_000 },
  );
  ok(r, s);
  assert.match(r.stdout, new RegExp(`size ${MiB}`), fail(r, s, 'nbdsh output'));
  await s.stop();
  assert.equal(readAt(disk, 4096, 9).toString(), 'HELLO-NBD');
});

test('libnbd: odd requests get a well-formed error and the connection survives', { skip: skipPy }, async (t) => {
  const dir = tmpDir(t);
  const disk = path.join(dir, 'disk.img');
  sparseFile(disk, 64 * MiB);
  const s = await startServe([disk], { t });
  // Each case on a fresh connection: [result of the odd request, whether a normal read works afterwards].
  const out = await py(
    s,
    `
uri = sys.argv[1]
cases = {
    'zero_length_read': lambda h: h.pread(0, 0),
    'zero_length_write': lambda h: h.pwrite(b'', 0),
    'zero_length_trim': lambda h: h.trim(0, 0),
    'zero_length_zero': lambda h: h.zero(0, 0),
    'zero_length_cache': lambda h: h.cache(0, 0),
    'read_32MiB_plus_1': lambda h: h.pread((32 << 20) + 1, 0),
    'write_32MiB_plus_1': lambda h: h.pwrite(b'w' * ((32 << 20) + 1), 0),
    'unknown_flag_on_read': lambda h: h.pread(4096, 0, 0x80),
    'fua_on_read_ok': lambda h: h.pread(4096, 0, nbd.CMD_FLAG_FUA),
    'read_unaligned_tail': lambda h: h.pread(3, h.get_size() - 3),
}
r = {}
for name, fn in cases.items():
    h = handle(uri)
    try:
        fn(h)
        res = 'ok'
    except nbd.Error as e:
        res = errname(e) or ('protocol error: ' + e.string)
    try:
        alive = len(h.pread(4096, 4096)) == 4096
    except nbd.Error as e:
        alive = 'dead: ' + e.string
    r[name] = [res, alive]
print(json.dumps(r))
`,
    [s.uris[0]],
    60_000,
  );
  const msg = (k: string): string => `${k}: ${JSON.stringify(out[k])}\n${JSON.stringify(out, null, 1)}\n${s.describe()}`;
  const expectations: [string, string[]][] = [
    ['zero_length_read', ['ok', 'EINVAL']],
    ['zero_length_write', ['ok', 'EINVAL']],
    ['zero_length_trim', ['ok', 'EINVAL']],
    ['zero_length_zero', ['ok', 'EINVAL']],
    ['zero_length_cache', ['ok', 'EINVAL']],
    ['read_32MiB_plus_1', ['EINVAL', 'EOVERFLOW']],
    ['write_32MiB_plus_1', ['EINVAL', 'EOVERFLOW']],
    ['unknown_flag_on_read', ['EINVAL']],
    ['fua_on_read_ok', ['ok', 'EINVAL']],
    ['read_unaligned_tail', ['ok']],
  ];
  for (const [k, allowed] of expectations) {
    await t.test(k, () => {
      const [res, alive] = out[k] as [string, boolean | string];
      assert.ok(allowed.includes(res), `result must be one of ${allowed.join('/')}\n${msg(k)}`);
      assert.equal(alive, true, `the connection must survive\n${msg(k)}`);
    });
  }
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
});
