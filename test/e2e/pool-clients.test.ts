/**
 * Real NBD clients against `serve --pool` (thin volumes and snapshots as
 * exports): nbdcopy, qemu-img, qemu-io, nbdinfo --map, libnbd, fio, and a
 * real ext4 through nbdfuse + loop that is grown online with `vol resize`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import {
  Cleanup,
  AfterContext,
  DUET,
  firstDifference,
  haveProgram,
  nonJsonLines,
  PYTHON,
  python,
  randomFile,
  run,
  RunOptions,
  RunResult,
  Server,
  sha256,
  sparseFile,
  spawnTracked,
  startServe,
  tmpDir,
  waitFor,
  withTimeout,
} from './harness.js';

const MiB = 1024 * 1024;

const haveLibnbdPython = fs.existsSync('/usr/lib/python3/dist-packages/nbd.py') && fs.existsSync(PYTHON);

function ctx(r: RunResult, server?: Server | null): string {
  return `${r.describe()}${server ? `\n${server.describe()}` : ''}`;
}

function duet(home: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [DUET, '--home', home, ...args], { timeoutMs: 30_000, ...opts });
}

async function duetOk(home: string, args: string[], server?: Server | null): Promise<RunResult> {
  const r = await duet(home, args);
  assert.equal(r.code, 0, ctx(r, server));
  return r;
}

async function must(cmd: string, args: string[], server: Server | null, timeoutMs = 30_000, what = ''): Promise<RunResult> {
  const r = await run(cmd, args, { timeoutMs });
  assert.equal(r.code, 0, `${what}\n${ctx(r, server)}`);
  return r;
}

/** qemu-io commands against a raw NBD export; every command must succeed (pattern checks included). */
async function qio(uri: string, cmds: string[], server: Server, readOnly = false): Promise<RunResult> {
  const r = await run('qemu-io', [...(readOnly ? ['-r'] : []), '-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])], { timeoutMs: 60_000 });
  assert.equal(r.code, 0, ctx(r, server));
  assert.doesNotMatch(r.stdout + r.stderr, /fail|error/i, `qemu-io reported a failure\n${ctx(r, server)}`);
  return r;
}

/** A home with pool P on two sparse device files and the given volumes; served. */
async function servedPool(
  t: AfterContext,
  volumes: [string, string][],
  deviceBytes = 64 * MiB,
): Promise<{ dir: string; home: string; s: Server; uri: (vol: string) => string }> {
  const dir = tmpDir(t);
  const home = path.join(dir, 'home');
  const devices = ['dev1.img', 'dev2.img'].map((n) => path.join(dir, n));
  for (const d of devices) sparseFile(d, deviceBytes);
  await duetOk(home, ['pool', 'create', 'P', ...devices]);
  for (const [name, size] of volumes) await duetOk(home, ['vol', 'create', `P/${name}`, '--size', size]);
  const s = await startServe(['--home', home, '--pool', 'P'], { t, exports: Math.max(1, volumes.length) });
  return { dir, home, s, uri: (vol) => `${s.base}/${vol}` };
}

async function stopClean(s: Server, home: string): Promise<void> {
  const stop = await s.stop();
  assert.equal(stop.code, 0, s.describe());
  assert.deepEqual(nonJsonLines(stop.stderr), [], `server stderr must be JSON lines\n${s.describe()}`);
  const chk = await duet(home, ['pool', 'check', 'P']);
  assert.equal(chk.code, 0, `pool check after the test\n${chk.describe()}`);
}

type Ext = { offset: number; length: number; type: number };

// ---- nbdcopy ----------------------------------------------------------------------

test('nbdcopy: a random 64 MiB image into a volume and back, byte for byte', async (t) => {
  const { dir, home, s, uri } = await servedPool(t, [['V', '64M']]);
  const src = path.join(dir, 'src.bin');
  const back = path.join(dir, 'back.bin');
  randomFile(src, 64 * MiB);
  await must('nbdcopy', ['--flush', src, uri('V')], s, 60_000);
  await must('nbdcopy', [uri('V'), back], s, 60_000);
  assert.equal(firstDifference(src, back), -1, `copy back differs from the source\n${s.describe()}`);
  await stopClean(s, home);
  // and after a restart of the server
  const s2 = await startServe(['--home', home, '--pool', 'P'], { t, exports: 1 });
  fs.rmSync(back);
  await must('nbdcopy', [`${s2.base}/V`, back], s2, 60_000);
  assert.equal(firstDifference(src, back), -1, `the volume after a restart\n${s2.describe()}`);
  await stopClean(s2, home);
});

// ---- snapshots ------------------------------------------------------------------------

test('qemu-img compare: a snapshot export stays identical to the image while the volume is overwritten', async (t) => {
  const { dir, home, s, uri } = await servedPool(t, [['V', '64M']]);
  const img = path.join(dir, 'image.bin');
  randomFile(img, 64 * MiB);
  await must('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', img, uri('V')], s, 60_000);
  await duetOk(home, ['vol', 'snapshot', 'P/V', 'P/SNAP'], s);
  await qio(uri('V'), ['write -P 0x01 0 1M', 'write -P 0x02 20M 64k', 'write -z 40M 2M', 'discard 50M 1M', 'write -P 0x03 63M 4096', 'flush'], s);
  const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri('SNAP'), img], { timeoutMs: 60_000 });
  assert.equal(same.code, 0, `the snapshot must still equal the original image\n${ctx(same, s)}`);
  assert.match(same.stdout, /Images are identical/, ctx(same, s));
  const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri('V'), img], { timeoutMs: 60_000 });
  assert.equal(differ.code, 1, `the volume must differ from the image\n${ctx(differ, s)}`);
  assert.match(differ.stdout, /differ at offset 0\b|offset 0\b/, ctx(differ, s));
  // the volume holds the new data, the snapshot the old
  await qio(uri('V'), ['read -P 0x01 0 1M', 'read -P 0x02 20M 64k', 'read -P 0 40M 2M', 'read -P 0x03 63M 4096'], s);
  const snapInfo = await must('qemu-img', ['info', '--output=json', '-f', 'raw', uri('SNAP')], s);
  assert.equal((JSON.parse(snapInfo.stdout) as { 'virtual-size': number })['virtual-size'], 64 * MiB, ctx(snapInfo, s));
  await stopClean(s, home);
});

test('a snapshot export is read-only: nbdinfo says so, qemu-io and libnbd writes fail, its bytes stay', async (t) => {
  const { home, s, uri } = await servedPool(t, [['V', '16M']]);
  await qio(uri('V'), ['write -P 0x7a 0 16M', 'flush'], s);
  await duetOk(home, ['vol', 'snapshot', 'P/V', 'P/SNAP'], s);
  const info = await must('nbdinfo', ['--json', uri('SNAP')], s, 10_000);
  const e = (JSON.parse(info.stdout) as { exports: Record<string, unknown>[] }).exports[0];
  assert.equal(e.is_read_only, true, ctx(info, s));
  assert.equal(e['export-size'], 16 * MiB, ctx(info, s));
  const plain = await must('nbdinfo', [uri('SNAP')], s, 10_000);
  assert.match(plain.stdout, /is_read_only: true/, ctx(plain, s));
  assert.match((await must('nbdinfo', [uri('V')], s, 10_000)).stdout, /is_read_only: false/, 'the volume itself is writable');

  const w = await run('qemu-io', ['-f', 'raw', uri('SNAP'), '-c', 'write -P 0x00 0 64k'], { timeoutMs: 15_000 });
  assert.ok(w.code !== 0 || /fail|denied|read-only/i.test(w.stdout + w.stderr), `a write to the snapshot must fail\n${ctx(w, s)}`);
  assert.match(w.stdout + w.stderr, /Permission denied|read-only|Operation not permitted/i, ctx(w, s));
  if (haveLibnbdPython) {
    const r = await python(
      `
import nbd, sys, json, errno
h = nbd.NBD()
h.set_strict_mode(0)  # let the server, not libnbd, refuse the writes
h.connect_uri(sys.argv[1])
out = {'ro': h.is_read_only()}
for name, fn in [('pwrite', lambda: h.pwrite(b'x' * 4096, 0)), ('zero', lambda: h.zero(4096, 0)), ('trim', lambda: h.trim(4096, 0))]:
    try:
        fn(); out[name] = 'ok'
    except nbd.Error as e:
        v = getattr(e, 'errno', None)
        out[name] = errno.errorcode.get(v, str(v)) if isinstance(v, int) else (v or e.string)
h.shutdown()
print(json.dumps(out))
`,
      [uri('SNAP')],
      { timeoutMs: 15_000 },
    );
    assert.equal(r.code, 0, ctx(r, s));
    const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as Record<string, unknown>;
    assert.equal(out.ro, true, r.stdout);
    for (const op of ['pwrite', 'zero', 'trim']) assert.equal(out[op], 'EPERM', `${op} on a snapshot must fail with EPERM\n${r.stdout}\n${s.describe()}`);
  }
  await qio(uri('SNAP'), ['read -P 0x7a 0 16M'], s, true);
  // the volume stays writable and its writes do not reach the snapshot
  await qio(uri('V'), ['write -P 0x7b 0 64k', 'flush'], s);
  await qio(uri('SNAP'), ['read -P 0x7a 0 64k'], s, true);
  await stopClean(s, home);
});

// ---- block status ------------------------------------------------------------------------

test('nbdinfo --map: a fresh 1 GiB volume is a hole except the 1 MiB written at 256M', async (t) => {
  const { home, s, uri } = await servedPool(t, [['V', '1G']]);
  const before = await must('nbdinfo', ['--map', '--json', uri('V')], s, 10_000);
  const b = JSON.parse(before.stdout) as Ext[];
  assert.ok(b.every((x) => (x.type & 3) === 3), `a fresh volume maps as hole,zero everywhere\n${ctx(before, s)}`);
  assert.equal(b.reduce((n, x) => n + x.length, 0), 1024 * MiB, ctx(before, s));

  await qio(uri('V'), ['write -P 0x5a 256M 1M', 'flush'], s);
  const m = await must('nbdinfo', ['--map', '--json', uri('V')], s, 10_000);
  const ext = JSON.parse(m.stdout) as Ext[];
  const msg = ctx(m, s);
  let pos = 0;
  for (const x of ext) {
    assert.equal(x.offset, pos, `extents are contiguous\n${msg}`);
    pos += x.length;
  }
  assert.equal(pos, 1024 * MiB, `extents cover the volume\n${msg}`);
  const data = ext.filter((x) => (x.type & 3) !== 3);
  assert.ok(data.every((x) => x.type === 0), `written data is plain data (not zero)\n${msg}`);
  assert.deepEqual(
    data.length === 0 ? [] : [data[0].offset, data[data.length - 1].offset + data[data.length - 1].length],
    [256 * MiB, 257 * MiB],
    `data exactly at [256M, 257M)\n${msg}`,
  );
  assert.equal(data.reduce((n, x) => n + x.length, 0), MiB, `only 1 MiB is data\n${msg}`);
  // the text form agrees
  const txt = await must('nbdinfo', ['--map', uri('V')], s, 10_000);
  assert.match(txt.stdout, /268435456\s+1048576\s+0\s+data/, ctx(txt, s));
  const used = (JSON.parse((await duetOk(home, ['vol', 'list', 'P', '--json'], s)).stdout) as { usedBytes: number }[])[0].usedBytes;
  assert.equal(used, MiB, 'the volume uses 1 MiB of the pool');
  await stopClean(s, home);
});

// ---- qemu-io, fio ------------------------------------------------------------------------

test('qemu-io on a volume: pattern writes, discard, write -z, FUA, aio, verified reads', async (t) => {
  const { home, s, uri } = await servedPool(t, [['V', '32M']]);
  const V = uri('V');
  await qio(V, [
    'write -P 0xa5 0 4M',
    'read -P 0xa5 0 4M',
    'write -f -P 0x5a 4M 1M',
    'read -P 0x5a 4M 1M',
    'discard 1M 1M',
    'read -P 0 1M 1M', // a thin volume reads a discarded whole chunk as zeros
    'read -P 0xa5 0 1M',
    'read -P 0xa5 2M 2M',
    'write -z 2M 64k',
    'read -P 0 2M 64k',
    'read -P 0xa5 2112k 64k',
    'write -z 3M 1000',
    'read -P 0 3M 1000',
    'read -P 0xa5 3146728 4096',
    'write -z -u 8M 4M', // zeroes with unmap on never-written space
    'read -P 0 8M 4M',
    'write -P 0x11 31M 1M',
    'aio_write -P 0x22 16M 256k',
    'aio_write -f -P 0x33 17M 256k',
    'aio_flush',
    'read -P 0x22 16M 256k',
    'read -P 0x33 17M 256k',
    'write -P 0x77 1000 3000',
    'read -P 0x77 1000 3000',
    'read -P 0xa5 4000 4096',
    'flush',
  ], s);
  const neg = await run('qemu-io', ['-f', 'raw', V, '-c', 'read -P 0xa6 0 4k'], { timeoutMs: 10_000 });
  assert.match(neg.stdout + neg.stderr, /Pattern verification failed/, `the pattern checks are real\n${ctx(neg, s)}`);
  // discarded chunks are given back to the pool
  const vol = (JSON.parse((await duetOk(home, ['vol', 'list', 'P', '--json'], s)).stdout) as { usedBytes: number }[])[0];
  assert.ok(vol.usedBytes <= 7 * MiB, `a discarded MiB is not counted as used\n${JSON.stringify(vol)}`);
  await stopClean(s, home);
  // the same bytes after a restart
  const s2 = await startServe(['--home', home, '--pool', 'P'], { t, exports: 1 });
  await qio(`${s2.base}/V`, ['read -P 0xa5 0 1000', 'read -P 0x77 1000 3000', 'read -P 0 1M 1M', 'read -P 0x5a 4M 1M', 'read -P 0x11 31M 1M', 'read -P 0x33 17M 256k'], s2);
  await stopClean(s2, home);
});

test('fio ioengine=nbd randrw with crc32c verify on a thin volume', { skip: haveProgram('fio') ? false : 'fio not installed' }, async (t) => {
  const { dir, home, s, uri } = await servedPool(t, [['V', '64M']]);
  const r = await run(
    'fio',
    [
      '--name=duet', '--ioengine=nbd', `--uri=${uri('V')}`, '--rw=randrw', '--bs=4k', '--iodepth=16',
      '--size=32M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
    ],
    { timeoutMs: 60_000, cwd: dir },
  );
  assert.equal(r.code, 0, ctx(r, s));
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as {
    jobs: { error: number; read: { io_bytes: number }; write: { io_bytes: number } }[];
  };
  assert.equal(json.jobs[0].error, 0, ctx(r, s));
  assert.ok(json.jobs[0].write.io_bytes > 0 && json.jobs[0].read.io_bytes > 0, ctx(r, s));
  assert.doesNotMatch(r.stderr, /verify|bad magic|crc32c/i, ctx(r, s));
  // and again on a snapshot-shared volume: every write is a copy-on-write
  await duetOk(home, ['vol', 'snapshot', 'P/V', 'P/S'], s);
  const snapSum = path.join(dir, 'snap.raw');
  await must('nbdcopy', [uri('S'), snapSum], s, 60_000);
  const before = sha256(snapSum);
  // snapshots taken while fio writes: each must wait for in-flight writes, never tear the pool
  const fio2 = run(
    'fio',
    [
      '--name=cow', '--ioengine=nbd', `--uri=${uri('V')}`, '--rw=randwrite', '--bs=16k', '--iodepth=8',
      '--size=32M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0',
    ],
    { timeoutMs: 60_000, cwd: dir },
  );
  let done = false;
  void fio2.finally(() => (done = true));
  let taken = 0;
  await new Promise((r) => setTimeout(r, 300));
  while (!done && taken < 5) {
    await duetOk(home, ['vol', 'snapshot', 'P/V', `P/during${taken}`], s);
    taken++;
  }
  const r2 = await fio2;
  assert.equal(r2.code, 0, ctx(r2, s));
  t.diagnostic(`${taken} snapshot(s) taken while fio wrote`);
  assert.match(r2.stdout, /err= 0/, ctx(r2, s));
  fs.rmSync(snapSum);
  await must('nbdcopy', [uri('S'), snapSum], s, 60_000);
  assert.equal(sha256(snapSum), before, `writes to the volume must not reach its snapshot\n${s.describe()}`);
  await stopClean(s, home);
});

// ---- ext4 through nbdfuse + loop, grown online ----------------------------------------------

function fsSkipReason(): string | false {
  if (!fs.existsSync('/dev/fuse')) return '/dev/fuse is missing: cannot run nbdfuse here';
  if (process.getuid?.() !== 0) return 'needs root (losetup, mount)';
  for (const p of ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'resize2fs', 'mount', 'umount', 'df']) {
    if (!haveProgram(p)) return `${p} is not installed`;
  }
  return false;
}


function isMountpoint(dir: string): boolean {
  const mounts = fs.readFileSync('/proc/mounts', 'utf8');
  const real = fs.existsSync(dir) ? fs.realpathSync(dir) : dir;
  return mounts.split('\n').some((l) => l.split(' ')[1] === real);
}

async function unmount(dir: string): Promise<void> {
  if (!isMountpoint(dir)) return;
  const r = await run('umount', [dir], { timeoutMs: 15_000 });
  if (r.code !== 0) await run('umount', ['-l', dir], { timeoutMs: 15_000 });
}

/** nbdfuse DIR URI, then a loop device on DIR/nbd; both undone by `cleanup`. */
async function attach(t: AfterContext, cleanup: Cleanup, server: Server, uri: string, fuseDir: string): Promise<string> {
  fs.mkdirSync(fuseDir, { recursive: true });
  const pidFile = path.join(fuseDir + '.pid');
  const fuse = spawnTracked(t, 'nbdfuse', ['-P', pidFile, fuseDir, uri]);
  cleanup.push(`stop nbdfuse (pid ${fuse.child.pid})`, async () => {
    if (isMountpoint(fuseDir)) {
      const r = await run('fusermount3', ['-u', fuseDir], { timeoutMs: 10_000 });
      if (r.code !== 0) await run('fusermount3', ['-uz', fuseDir], { timeoutMs: 10_000 });
    }
    await withTimeout(fuse.exited, 10_000, 'nbdfuse to exit after fusermount3 -u').catch(() => {
      if (fuse.child.pid) process.kill(fuse.child.pid, 'SIGTERM');
    });
  });
  await waitFor(
    () => (fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '' && fs.existsSync(path.join(fuseDir, 'nbd'))) || fuse.child.exitCode !== null,
    10_000,
    'nbdfuse to mount',
  );
  assert.equal(fuse.child.exitCode, null, `nbdfuse exited early: ${fuse.stderr()}\n${server.describe()}`);
  const lo = await must('losetup', ['-f', '--show', path.join(fuseDir, 'nbd')], server, 15_000, 'losetup');
  const loop = lo.stdout.trim();
  assert.match(loop, /^\/dev\/loop\d+$/, lo.describe());
  cleanup.push(`losetup -d ${loop}`, async () => {
    const r = await run('losetup', ['-d', loop], { timeoutMs: 10_000 });
    if (r.code !== 0) throw new Error(r.describe());
  });
  return loop;
}

function treeSums(root: string): Map<string, string> {
  const sums = new Map<string, string>();
  for (const name of fs.readdirSync(root)) {
    if (name === 'lost+found') continue;
    sums.set(name, crypto.createHash('sha256').update(fs.readFileSync(path.join(root, name))).digest('hex'));
  }
  return sums;
}

async function dfBytes(mnt: string, server: Server): Promise<number> {
  const r = await must('df', ['-B1', '--output=size', mnt], server, 10_000, 'df');
  return Number(r.stdout.trim().split('\n').pop());
}

test('ext4 on a volume via nbdfuse + loop: mkfs, files, vol resize online, reconnect, resize2fs, files intact, bigger, fsck clean', { skip: fsSkipReason(), timeout: 120_000 }, async (t) => {
  const { dir, home, s, uri } = await servedPool(t, [['V', '128M']], 128 * MiB);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const cleanup = new Cleanup();
  try {
    const loop = await attach(t, cleanup, s, uri('V'), path.join(dir, 'fuse'));
    await must('mkfs.ext4', ['-q', '-F', '-L', 'duetvol', loop], s, 60_000, 'mkfs.ext4');
    await must('mount', [loop, mnt], s, 15_000, 'mount');
    cleanup.push(`umount ${mnt}`, () => unmount(mnt));
    const expected = new Map<string, string>();
    for (let i = 0; i < 30; i++) {
      const body = Buffer.from(`file ${i} ${crypto.randomBytes(8).toString('hex')}\n`.repeat(i * 7 + 1));
      fs.writeFileSync(path.join(mnt, `f${i}`), body);
      expected.set(`f${i}`, crypto.createHash('sha256').update(body).digest('hex'));
    }
    const big = crypto.randomBytes(8 * MiB);
    fs.writeFileSync(path.join(mnt, 'big'), big);
    expected.set('big', crypto.createHash('sha256').update(big).digest('hex'));
    const sizeBefore = await dfBytes(mnt, s);
    await must('sync', ['-f', mnt], s, 30_000, 'sync');
    await must('umount', [mnt], s, 30_000, 'umount');
    await must('e2fsck', ['-fn', loop], s, 30_000, 'e2fsck -fn before the resize');
    assert.deepEqual(await cleanup.runAll(), [], 'detaching loop + nbdfuse');

    // grow the volume while the server runs
    await duetOk(home, ['vol', 'resize', 'P/V', '--size', '256M'], s);
    const size = await must('nbdinfo', ['--size', uri('V')], s, 10_000);
    assert.equal(Number(size.stdout.trim()), 256 * MiB, ctx(size, s));

    // reconnect: a new nbdfuse sees the new size
    const loop2 = await attach(t, cleanup, s, uri('V'), path.join(dir, 'fuse2'));
    const bsz = await must('blockdev', ['--getsize64', loop2], s, 10_000, 'blockdev');
    assert.equal(Number(bsz.stdout.trim()), 256 * MiB, `the loop device has the new size\n${ctx(bsz, s)}`);
    await must('e2fsck', ['-f', '-p', loop2], s, 60_000, 'e2fsck -f -p before resize2fs');
    await must('resize2fs', [loop2], s, 60_000, 'resize2fs');
    await must('mount', [loop2, mnt], s, 15_000, 'mount after resize2fs');
    cleanup.push(`umount ${mnt}`, () => unmount(mnt));
    assert.deepEqual(treeSums(mnt), expected, `file contents after the online resize\n${s.describe()}`);
    const sizeAfter = await dfBytes(mnt, s);
    assert.ok(sizeAfter > sizeBefore + 100 * MiB, `df shows the bigger filesystem: ${sizeBefore} -> ${sizeAfter}`);
    fs.writeFileSync(path.join(mnt, 'after'), 'written after the resize\n');
    await must('sync', ['-f', mnt], s, 30_000, 'sync');
    await must('umount', [mnt], s, 30_000, 'umount');
    await must('e2fsck', ['-fn', loop2], s, 30_000, 'e2fsck -fn after the resize must find a clean filesystem');
    assert.deepEqual(await cleanup.runAll(), [], 'detaching loop + nbdfuse');
    await stopClean(s, home);
  } finally {
    await cleanup.runAll();
  }
});
