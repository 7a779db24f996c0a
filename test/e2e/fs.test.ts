/**
 * A real filesystem on a duet export. No kernel nbd module here, so:
 * duet serve -> nbdfuse (FUSE file) -> losetup /dev/loopN -> mkfs.ext4 -> mount.
 * Write files, sync, umount, e2fsck -fn clean, remount and check contents;
 * then stop the server, check the backing file itself (e2fsck + debugfs), and
 * mount it again through a fresh --read-only server.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Cleanup, haveProgram, run, RunResult, Server, spawnTracked, sparseFile, startServe, tmpDir, waitFor, withTimeout, AfterContext } from './harness.js';

const MiB = 1024 * 1024;

function skipReason(): string | false {
  if (!fs.existsSync('/dev/fuse')) return '/dev/fuse is missing: cannot run nbdfuse here';
  if (process.getuid?.() !== 0) return 'needs root (losetup, mount)';
  for (const p of ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'e2fsck', 'debugfs', 'mount', 'umount']) {
    if (!haveProgram(p)) return `${p} is not installed`;
  }
  return false;
}


function must(r: RunResult, server: Server | null, what: string): void {
  assert.equal(r.code, 0, `${what}\n${r.describe()}\n${server?.describe() ?? ''}`);
}

async function isMountpoint(dir: string): Promise<boolean> {
  const mounts = fs.readFileSync('/proc/mounts', 'utf8');
  const real = fs.existsSync(dir) ? fs.realpathSync(dir) : dir;
  return mounts.split('\n').some((l) => l.split(' ')[1] === real);
}

async function unmount(dir: string): Promise<void> {
  if (!(await isMountpoint(dir))) return;
  const r = await run('umount', [dir], { timeoutMs: 15_000 });
  if (r.code !== 0) await run('umount', ['-l', dir], { timeoutMs: 15_000 });
}

/** nbdfuse DIR URI, then a loop device on DIR/nbd; both undone by `cleanup`. */
async function attach(
  t: AfterContext,
  cleanup: Cleanup,
  server: Server,
  uri: string,
  fuseDir: string,
  readOnly: boolean,
): Promise<string> {
  fs.mkdirSync(fuseDir, { recursive: true });
  const pidFile = path.join(fuseDir + '.pid');
  const fuse = spawnTracked(t, 'nbdfuse', [...(readOnly ? ['-r'] : []), '-P', pidFile, fuseDir, uri]);
  cleanup.push(`stop nbdfuse (pid ${fuse.child.pid})`, async () => {
    if (await isMountpoint(fuseDir)) {
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
  const lo = await run('losetup', [...(readOnly ? ['-r'] : []), '-f', '--show', path.join(fuseDir, 'nbd')], { timeoutMs: 15_000 });
  must(lo, server, 'losetup');
  const loop = lo.stdout.trim();
  assert.match(loop, /^\/dev\/loop\d+$/, lo.describe());
  cleanup.push(`losetup -d ${loop}`, async () => {
    const r = await run('losetup', ['-d', loop], { timeoutMs: 10_000 });
    if (r.code !== 0) throw new Error(r.describe());
  });
  return loop;
}

async function treeSums(root: string): Promise<Map<string, string>> {
  const sums = new Map<string, string>();
  for (const name of fs.readdirSync(root)) {
    if (name === 'lost+found') continue;
    sums.set(name, crypto.createHash('sha256').update(fs.readFileSync(path.join(root, name))).digest('hex'));
  }
  return sums;
}

test('ext4 on a duet export through nbdfuse + loop: mkfs, write, fsck clean, remount, contents survive', { skip: skipReason(), timeout: 90_000 }, async (t) => {
  const dir = tmpDir(t);
  const disk = path.join(dir, 'fs.img');
  sparseFile(disk, 256 * MiB);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const cleanup = new Cleanup();
  try {
    const s = await startServe([disk], { t });
    const loop = await attach(t, cleanup, s, s.uris[0], path.join(dir, 'fuse'), false);

    must(await run('mkfs.ext4', ['-q', '-F', '-L', 'duet', loop], { timeoutMs: 60_000 }), s, 'mkfs.ext4');
    must(await run('mount', [loop, mnt], { timeoutMs: 15_000 }), s, 'mount');
    cleanup.push(`umount ${mnt}`, () => unmount(mnt));

    const expected = new Map<string, string>();
    for (let i = 0; i < 50; i++) {
      const body = Buffer.from(`file ${i} ${crypto.randomBytes(8).toString('hex')}\n`.repeat(i + 1));
      fs.writeFileSync(path.join(mnt, `f${i}`), body);
      expected.set(`f${i}`, crypto.createHash('sha256').update(body).digest('hex'));
    }
    const big = crypto.randomBytes(16 * MiB);
    fs.writeFileSync(path.join(mnt, 'big'), big);
    expected.set('big', crypto.createHash('sha256').update(big).digest('hex'));
    must(await run('sync', ['-f', mnt], { timeoutMs: 30_000 }), s, 'sync');
    must(await run('umount', [mnt], { timeoutMs: 30_000 }), s, 'umount');

    const fsck = await run('e2fsck', ['-fn', loop], { timeoutMs: 30_000 });
    must(fsck, s, 'e2fsck -fn on the loop device must find a clean filesystem');

    must(await run('mount', ['-o', 'ro', loop, mnt], { timeoutMs: 15_000 }), s, 'remount read-only');
    assert.deepEqual(await treeSums(mnt), expected, `file contents after remount\n${s.describe()}`);
    must(await run('umount', [mnt], { timeoutMs: 30_000 }), s, 'umount');

    // detach everything, stop the server: it must exit 0
    const problems = await cleanup.runAll();
    assert.deepEqual(problems, [], 'detaching the loop device and nbdfuse');
    const stop = await s.stop();
    assert.equal(stop.code, 0, `server exit\n${s.describe()}`);

    // the backing file itself holds the clean filesystem
    must(await run('e2fsck', ['-fn', disk], { timeoutMs: 30_000 }), s, 'e2fsck -fn on the backing file');
    const dumped = path.join(dir, 'big.out');
    must(await run('debugfs', ['-R', `dump /big ${dumped}`, disk], { timeoutMs: 30_000 }), s, 'debugfs dump');
    assert.ok(fs.readFileSync(dumped).equals(big), 'the big file read from the backing file with debugfs');

    // a fresh, read-only server on the same file: mount again and check
    const ro = await startServe([disk, '--read-only'], { t });
    const loop2 = await attach(t, cleanup, ro, ro.uris[0], path.join(dir, 'fuse2'), true);
    must(await run('mount', ['-o', 'ro,noload', loop2, mnt], { timeoutMs: 15_000 }), ro, 'mount through the read-only export');
    cleanup.push(`umount ${mnt}`, () => unmount(mnt));
    assert.deepEqual(await treeSums(mnt), expected, `file contents through a new read-only server\n${ro.describe()}`);
    const write = await run('sh', ['-c', `echo x > ${mnt}/new`], { timeoutMs: 10_000 });
    assert.notEqual(write.code, 0, 'writing into a read-only mount must fail');
    const problems2 = await cleanup.runAll();
    assert.deepEqual(problems2, [], 'detaching the second loop device and nbdfuse');
    const stop2 = await ro.stop();
    assert.equal(stop2.code, 0, ro.describe());
  } finally {
    await cleanup.runAll();
  }
});

test('a block device PATH: serve /dev/loopN, write and read through NBD, the data lands on the device', { skip: skipReason(), timeout: 60_000 }, async (t) => {
  const dir = tmpDir(t);
  const backing = path.join(dir, 'backing.img');
  fs.writeFileSync(backing, crypto.randomBytes(8 * MiB));
  const cleanup = new Cleanup();
  try {
    const lo = await run('losetup', ['-f', '--show', backing], { timeoutMs: 15_000 });
    must(lo, null, 'losetup');
    const loop = lo.stdout.trim();
    cleanup.push(`losetup -d ${loop}`, async () => {
      const r = await run('losetup', ['-d', loop], { timeoutMs: 10_000 });
      if (r.code !== 0) throw new Error(r.describe());
    });
    const s = await startServe([loop], { t });
    assert.deepEqual(s.uris, [`${s.base}/${path.basename(loop)}`], `export name of ${loop}\n${s.describe()}`);
    const size = await run('nbdinfo', ['--size', s.uris[0]], { timeoutMs: 10_000 });
    must(size, s, 'nbdinfo --size');
    assert.equal(size.stdout.trim(), String(8 * MiB), `${size.describe()}\n${s.describe()}`);
    const io = await run(
      'qemu-io',
      ['-f', 'raw', s.uris[0], '-c', 'write -f -P 0x6b 1M 1M', '-c', 'write -z 3M 64k', '-c', 'flush', '-c', 'read -P 0x6b 1M 1M', '-c', 'read -P 0 3M 64k'],
      { timeoutMs: 20_000 },
    );
    must(io, s, 'qemu-io on a block device export');
    const stop = await s.stop();
    assert.equal(stop.code, 0, s.describe());
    const problems = await cleanup.runAll();
    assert.deepEqual(problems, [], 'losetup -d');
    const data = fs.readFileSync(backing);
    assert.ok(data.subarray(MiB, 2 * MiB).equals(Buffer.alloc(MiB, 0x6b)), 'the pattern reached the device');
    assert.ok(data.subarray(3 * MiB, 3 * MiB + 65536).equals(Buffer.alloc(65536)), 'the zeroes reached the device');
  } finally {
    await cleanup.runAll();
  }
});
