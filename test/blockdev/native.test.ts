import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import {
  native,
  nativeUnavailableReason,
  loadNative,
  nativeAddonPath,
  blockDeviceSizeOf,
  blockDeviceSizeFromSysfs,
  type NativeOps,
} from '../../src/blockdev/native.js';

const MiB = 1024 * 1024;
const skipNative = native === null ? `add-on not loaded: ${nativeUnavailableReason}` : false;

let dir = '';
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-native-'));
});
after(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/** A file of `size` bytes filled with 0xAB, fsynced so its blocks are allocated. */
function dataFile(name: string, size: number): { file: string; fd: number } {
  const file = path.join(dir, name);
  fs.writeFileSync(file, Buffer.alloc(size, 0xab));
  const fd = fs.openSync(file, 'r+');
  fs.fsyncSync(fd);
  return { file, fd };
}

function readAt(fd: number, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  const n = fs.readSync(fd, buf, 0, length, offset);
  assert.equal(n, length);
  return buf;
}

function isAll(buf: Buffer, byte: number): boolean {
  for (const b of buf) if (b !== byte) return false;
  return true;
}

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return (err as NodeJS.ErrnoException).code;
  }
  return undefined;
}

describe('native add-on', { skip: skipNative }, () => {
  const n = native as NativeOps;

  test('exports every function', () => {
    for (const name of [
      'punchHole', 'zeroRange', 'seekData', 'seekHole', 'flock', 'funlock', 'blockDeviceSize', 'discard', 'dup',
    ] as const) {
      assert.equal(typeof n[name], 'function', name);
    }
    assert.ok(fs.existsSync(nativeAddonPath()));
    assert.equal(nativeUnavailableReason, undefined);
  });

  test('punchHole deallocates, reads zeros, and SEEK_HOLE/SEEK_DATA find it', (t) => {
    const { fd } = dataFile('punch.bin', 4 * MiB);
    try {
      const blocksBefore = fs.fstatSync(fd).blocks;
      const holeOff = MiB;
      const holeLen = MiB;
      const code = codeOf(() => n.punchHole(fd, holeOff, holeLen));
      if (code === 'EOPNOTSUPP') {
        t.skip(`${os.tmpdir()} does not support punching holes`);
        return;
      }
      assert.equal(code, undefined);
      const st = fs.fstatSync(fd);
      assert.equal(st.size, 4 * MiB, 'KEEP_SIZE');
      assert.ok(st.blocks < blocksBefore, `blocks ${st.blocks} < ${blocksBefore}`);
      assert.ok(isAll(readAt(fd, holeOff, holeLen), 0));
      assert.ok(isAll(readAt(fd, 0, holeOff), 0xab));
      assert.ok(isAll(readAt(fd, holeOff + holeLen, MiB), 0xab));

      assert.equal(n.seekHole(fd, 0), holeOff);
      assert.equal(n.seekData(fd, 0), 0);
      assert.equal(n.seekData(fd, holeOff), holeOff + holeLen);
      assert.equal(n.seekHole(fd, holeOff + holeLen), 4 * MiB, 'implicit hole at EOF');
      assert.equal(n.seekHole(fd, 4 * MiB), -1, 'beyond end');
      assert.equal(n.seekData(fd, 4 * MiB), -1);
      n.punchHole(fd, 0, 0); // zero length is a no-op
    } finally {
      fs.closeSync(fd);
    }
  });

  test('zeroRange reads zeros and keeps the size', (t) => {
    const { fd } = dataFile('zero.bin', 2 * MiB);
    try {
      const code = codeOf(() => n.zeroRange(fd, 4096, 64 * 1024));
      if (code === 'EOPNOTSUPP') {
        t.skip(`${os.tmpdir()} does not support FALLOC_FL_ZERO_RANGE`);
        return;
      }
      assert.equal(code, undefined);
      assert.equal(fs.fstatSync(fd).size, 2 * MiB);
      assert.ok(isAll(readAt(fd, 4096, 64 * 1024), 0));
      assert.ok(isAll(readAt(fd, 0, 4096), 0xab));
      assert.ok(isAll(readAt(fd, 4096 + 64 * 1024, 4096), 0xab));
    } finally {
      fs.closeSync(fd);
    }
  });

  test('seekData on an all-hole sparse file returns -1', () => {
    const file = path.join(dir, 'sparse.bin');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 8 * MiB);
    const fd = fs.openSync(file, 'r');
    try {
      assert.equal(n.seekData(fd, 0), -1);
      assert.equal(n.seekHole(fd, 0), 0);
    } finally {
      fs.closeSync(fd);
    }
  });

  test('dup gives a second descriptor on the same open file that outlives the first', () => {
    const file = path.join(dir, 'dup.bin');
    fs.writeFileSync(file, 'hello duet');
    const fd = fs.openSync(file, 'r');
    const copy = n.dup(fd);
    assert.notEqual(copy, fd);
    fs.closeSync(fd);
    const buf = Buffer.alloc(10);
    assert.equal(fs.readSync(copy, buf, 0, 10, 0), 10);
    assert.equal(buf.toString(), 'hello duet');
    fs.closeSync(copy);
    assert.throws(() => n.dup(copy), (e: NodeJS.ErrnoException) => e.code === 'EBADF');
  });

  test('flock conflicts between separately opened fds', () => {
    const file = path.join(dir, 'lock');
    fs.writeFileSync(file, '');
    const a = fs.openSync(file, 'r');
    const b = fs.openSync(file, 'r');
    try {
      n.flock(a, true, true);
      assert.throws(() => n.flock(b, true, true), (err: NodeJS.ErrnoException) => {
        assert.equal(err.code, 'EWOULDBLOCK');
        assert.equal(err.errno, os.constants.errno.EWOULDBLOCK);
        assert.equal(err.syscall, 'flock');
        return true;
      });
      assert.equal(codeOf(() => n.flock(b, false, true)), 'EWOULDBLOCK', 'shared vs exclusive');
      n.funlock(a);
      n.flock(b, true, true);
      n.funlock(b);
      // two shared locks coexist
      n.flock(a, false, true);
      n.flock(b, false, true);
      n.funlock(a);
      n.funlock(b);
    } finally {
      fs.closeSync(a);
      fs.closeSync(b);
    }
  });

  test('errors carry .code, .errno and .syscall', () => {
    const file = path.join(dir, 'err.bin');
    fs.writeFileSync(file, Buffer.alloc(8192, 1));
    const ro = fs.openSync(file, 'r');
    const closed = fs.openSync(file, 'r');
    fs.closeSync(closed);
    try {
      assert.throws(() => n.seekData(closed, 0), (err: NodeJS.ErrnoException) => {
        assert.ok(err instanceof Error);
        assert.equal(err.code, 'EBADF');
        assert.equal(err.errno, os.constants.errno.EBADF);
        assert.match(err.message, /EBADF/);
        return true;
      });
      assert.equal(codeOf(() => n.punchHole(ro, 0, 4096)), 'EBADF', 'fallocate needs a writable fd');
      assert.equal(codeOf(() => n.blockDeviceSize(ro)), 'ENOTTY', 'regular file is not a block device');
      assert.equal(codeOf(() => n.discard(ro, 0, 4096)), 'ENOTTY');
      assert.equal(codeOf(() => n.funlock(closed)), 'EBADF');
      // argument validation: TypeError, not a crash
      assert.throws(() => n.punchHole(ro, -1, 4096), TypeError);
      assert.throws(() => n.seekData(ro, 1.5), TypeError);
      assert.throws(() => n.seekData(ro, 2 ** 53), TypeError);
      assert.throws(() => (n.seekData as (...a: unknown[]) => number)(ro), TypeError);
      assert.throws(() => (n.flock as (...a: unknown[]) => void)('x', true, true), TypeError);
    } finally {
      fs.closeSync(ro);
    }
  });
});

describe('loader', () => {
  test('DUET_NO_NATIVE=1 in a child process: native is null with a reason', () => {
    const modUrl = new URL('../../src/blockdev/native.js', import.meta.url).href;
    const script =
      `const m = await import(${JSON.stringify(modUrl)});` +
      `console.log(JSON.stringify({ isNull: m.native === null, reason: m.nativeUnavailableReason,` +
      ` reload: m.loadNative() === null }));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, DUET_NO_NATIVE: '1' },
      encoding: 'utf8',
      timeout: 10_000,
    });
    assert.equal(r.status, 0, r.stderr);
    const out = JSON.parse(r.stdout.trim()) as { isNull: boolean; reason?: string; reload: boolean };
    assert.equal(out.isNull, true);
    assert.equal(out.reload, true);
    assert.equal(typeof out.reason, 'string');
    assert.match(out.reason as string, /DUET_NO_NATIVE/);
  });

  test('loadNative re-reads DUET_NO_NATIVE', () => {
    const saved = process.env['DUET_NO_NATIVE'];
    try {
      process.env['DUET_NO_NATIVE'] = '1';
      assert.equal(loadNative(), null);
      delete process.env['DUET_NO_NATIVE'];
      const again = loadNative();
      if (native !== null) assert.ok(again !== null && typeof again.punchHole === 'function');
    } finally {
      if (saved === undefined) delete process.env['DUET_NO_NATIVE'];
      else process.env['DUET_NO_NATIVE'] = saved;
    }
  });

  test('blockDeviceSizeFromSysfs rejects a regular file with ENOTTY', () => {
    const file = path.join(dir, 'notdev.bin');
    fs.writeFileSync(file, 'x');
    const fd = fs.openSync(file, 'r');
    try {
      assert.equal(codeOf(() => blockDeviceSizeFromSysfs(file, fd)), 'ENOTTY');
      assert.equal(codeOf(() => blockDeviceSizeOf(file, fd)), 'ENOTTY');
    } finally {
      fs.closeSync(fd);
    }
  });
});

function losetupAvailable(): string | false {
  if (process.platform !== 'linux') return 'not Linux';
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'needs root';
  try {
    execFileSync('losetup', ['--version'], { stdio: 'ignore' });
  } catch {
    return 'losetup not available';
  }
  return false;
}

describe('block device (loop)', { skip: losetupAvailable() }, () => {
  test('size via ioctl, sysfs and blockDeviceSizeOf; discard zeros the range', (t) => {
    const size = 4 * MiB;
    const backing = path.join(dir, 'loop.img');
    fs.writeFileSync(backing, Buffer.alloc(size, 0xcd));
    let dev: string;
    try {
      dev = execFileSync('losetup', ['--find', '--show', backing], { encoding: 'utf8' }).trim();
    } catch (err) {
      t.skip(`losetup failed: ${(err as Error).message}`);
      return;
    }
    let fd = -1;
    try {
      fd = fs.openSync(dev, 'r+');
      assert.equal(blockDeviceSizeFromSysfs(dev, fd), size);
      assert.equal(blockDeviceSizeOf(dev, fd), size);
      if (native === null) return;
      assert.equal(native.blockDeviceSize(fd), size);

      const code = codeOf(() => native!.discard(fd, MiB, MiB));
      if (code === 'EOPNOTSUPP') return; // loop without discard support: sizes were checked
      assert.equal(code, undefined);
      assert.ok(isAll(readAt(fd, MiB, MiB), 0), 'discarded range reads zeros');
      assert.ok(isAll(readAt(fd, 0, 4096), 0xcd));
      assert.ok(isAll(readAt(fd, 2 * MiB, 4096), 0xcd));
    } finally {
      if (fd >= 0) fs.closeSync(fd);
      execFileSync('losetup', ['-d', dev]);
    }
  });
});
