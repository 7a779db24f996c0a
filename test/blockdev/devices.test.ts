import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FileDevice, FileDeviceOptions } from '../../src/blockdev/file.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { native, nativeUnavailableReason } from '../../src/blockdev/native.js';
import { UserError } from '../../src/util/errors.js';
import {
  describeBlockDevice,
  DeviceFactory,
  checkExtents,
  isZero,
  pattern,
  readAll,
  rejectsCode,
} from './conformance.js';

const MiB = 1024 * 1024;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-devices-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

let fileCounter = 0;
/** A sparse file of `size` bytes. */
function sparseFile(size: number): string {
  const file = path.join(dir, `dev-${fileCounter++}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  return file;
}

function fileFactory(options: FileDeviceOptions): DeviceFactory {
  return async (size, opts = {}) => {
    const file = sparseFile(size);
    const dev = FileDevice.open(file, { ...options, readOnly: opts.readOnly });
    return {
      dev,
      cleanup: () => {
        dev.close();
        fs.rmSync(file, { force: true });
      },
    };
  };
}

const skipNative = native === null ? `native add-on not loaded: ${nativeUnavailableReason}` : false;
const ALL_TRUE = { trim: true, fastZero: true, extents: true, flush: true, fua: true };
const NO_HOLES = { trim: false, fastZero: false, extents: false, flush: true, fua: true };

describeBlockDevice('MemoryDevice', async (size, opts = {}) => {
  const dev = new MemoryDevice(size, 'mem', { readOnly: opts.readOnly });
  return { dev, cleanup: () => dev.close() };
}, { capabilities: { ...ALL_TRUE, multiConn: true } });

describeBlockDevice('FileDevice (native)', fileFactory({}), { capabilities: ALL_TRUE, skip: skipNative });
describeBlockDevice('FileDevice (native, syncIoMaxBytes 0)', fileFactory({ syncIoMaxBytes: 0 }), {
  capabilities: ALL_TRUE,
  skip: skipNative,
  numRuns: 20,
});
describeBlockDevice('FileDevice (useNative:false, syncIoMaxBytes 0: async path)', fileFactory({ useNative: false, syncIoMaxBytes: 0 }), {
  capabilities: NO_HOLES,
});
describeBlockDevice(
  'FileDevice (useNative:false, syncIoMaxBytes 64 MiB: sync path)',
  fileFactory({ useNative: false, syncIoMaxBytes: 64 * MiB }),
  { capabilities: NO_HOLES },
);

describeBlockDevice('FileDevice (native, writes asynchronous: syncWriteMaxBytes 0)', fileFactory({ syncWriteMaxBytes: 0 }), {
  capabilities: ALL_TRUE,
  skip: skipNative,
  numRuns: 20,
});

test('FileDevice syncWriteMaxBytes 0: small writes leave the event loop (a promise), small reads stay synchronous', async () => {
  const file = sparseFile(MiB);
  const dev = FileDevice.open(file, { syncWriteMaxBytes: 0 });
  try {
    const written = dev.write(4096, pattern(7, 4096));
    assert.ok(written instanceof Promise, 'a 4 KiB write goes to the thread pool');
    await written;
    const back = Buffer.alloc(4096);
    assert.equal(dev.read(4096, back), undefined, 'a 4 KiB read is done on the spot');
    assert.ok(back.equals(pattern(7, 4096)));
  } finally {
    dev.close();
  }
});

describeBlockDevice('FaultyDevice(MemoryDevice)', async (size, opts = {}) => {
  const dev = new FaultyDevice(new MemoryDevice(size, 'mem', { readOnly: opts.readOnly }));
  return { dev, cleanup: () => dev.close() };
}, { capabilities: ALL_TRUE });

describeBlockDevice('FaultyDevice(MemoryDevice, writeBack:false)', async (size, opts = {}) => {
  const dev = new FaultyDevice(new MemoryDevice(size, 'mem', { readOnly: opts.readOnly }), { writeBack: false });
  return { dev, cleanup: () => dev.close() };
}, { capabilities: ALL_TRUE, numRuns: 20 });

describe('FileDevice.open errors', () => {
  function userError(fn: () => unknown, file: string, pattern: RegExp): void {
    assert.throws(fn, (err: unknown) => {
      assert.ok(err instanceof UserError, `expected a UserError, got ${String(err)}`);
      assert.ok(err.message.includes(file), `message names the path: ${err.message}`);
      assert.ok(!err.message.includes('\n'), `one line: ${JSON.stringify(err.message)}`);
      assert.match(err.message, pattern);
      return true;
    });
  }

  test('missing file', () => {
    const file = path.join(dir, 'no-such-file.img');
    userError(() => FileDevice.open(file), file, /no such file/);
    userError(() => FileDevice.open(file, { readOnly: true }), file, /no such file/);
    userError(() => FileDevice.open(file, { useNative: false }), file, /no such file/);
  });

  test('a directory', () => {
    const sub = fs.mkdtempSync(path.join(dir, 'a-dir-'));
    userError(() => FileDevice.open(sub), sub, /directory|not a regular file/);
    userError(() => FileDevice.open(sub, { readOnly: true }), sub, /directory|not a regular file/);
  });

  test('a character device', () => {
    userError(() => FileDevice.open('/dev/null'), '/dev/null', /not a regular file or block device/);
  });

  test('a missing parent directory', () => {
    const file = path.join(dir, 'nope', 'x.img');
    userError(() => FileDevice.open(file), file, /./);
  });
});

describe('FileDevice: size not a multiple of 512', () => {
  const SIZE = 3 * 4096 + 7 * 512 + 3; // 15875
  for (const [label, opts] of [
    ['native', {}],
    ['useNative:false', { useNative: false }],
    ['useNative:false, async', { useNative: false, syncIoMaxBytes: 0 }],
  ] as [string, FileDeviceOptions][]) {
    test(label, { skip: label === 'native' ? skipNative : false }, async () => {
      const file = sparseFile(SIZE);
      const dev = FileDevice.open(file, opts);
      try {
        assert.equal(dev.size, SIZE);
        const data = pattern(99, SIZE);
        await dev.write(0, data);
        assert.ok((await readAll(dev)).equals(data));
        const tail = pattern(100, 5);
        await dev.write(SIZE - 5, tail, { fua: true });
        data.set(tail, SIZE - 5);
        assert.ok((await readAll(dev, SIZE - 5, 5)).equals(tail));
        await rejectsCode(() => dev.read(SIZE - 2, Buffer.alloc(3)), 'EINVAL', 'read past the odd end');
        await rejectsCode(() => dev.write(SIZE - 2, Buffer.alloc(3)), 'ENOSPC', 'write past the odd end');
        await dev.writeZeroes(SIZE - 700, 700);
        data.fill(0, SIZE - 700);
        await dev.trim(SIZE - 3, 3);
        await dev.write(SIZE - 3, Buffer.from([7, 8, 9]));
        data.set([7, 8, 9], SIZE - 3);
        await dev.flush();
        assert.ok((await readAll(dev)).equals(data), 'byte-exact content');
        const ext = await checkExtents(dev, SIZE - 1, 1);
        assert.equal(ext[ext.length - 1]!.offset + ext[ext.length - 1]!.length, SIZE);
        await checkExtents(dev, 0, SIZE);
        assert.equal(fs.statSync(file).size, SIZE, 'file size unchanged');
        assert.ok(fs.readFileSync(file).equals(data), 'file content byte-exact');
      } finally {
        dev.close();
      }
    });
  }
});

describe('FileDevice on a block device (loop)', () => {
  test('size, capabilities and a write/read round trip', async (t) => {
    if (process.platform !== 'linux') return t.skip('not Linux');
    const SIZE = 16 * MiB;
    const backing = sparseFile(SIZE);
    let loop: string;
    try {
      loop = execFileSync('losetup', ['--find', '--show', backing], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
    } catch (err) {
      return t.skip(`losetup failed, skipping: ${(err as Error).message.split('\n')[0]}`);
    }
    // Hold the loop device open and detach at once: the kernel then sets
    // autoclear and frees it on the last close, even if this process is killed.
    let holder = -1;
    let detached = false;
    try {
      holder = fs.openSync(loop, 'r');
      execFileSync('losetup', ['-d', loop], { stdio: 'ignore' });
      detached = true;
    } catch {
      // fall back to detaching in finally
    }
    try {
      for (const useNative of [true, false]) {
        if (useNative && native === null) continue;
        const dev = FileDevice.open(loop, { useNative });
        try {
          assert.equal(dev.size, SIZE, `size (useNative ${useNative})`);
          assert.equal(dev.capabilities.extents, false, 'no extents on a block device');
          assert.equal(dev.capabilities.fastZero, false, 'no fast zero on a block device');
          assert.equal(dev.capabilities.trim, useNative, 'trim = BLKDISCARD with the add-on');
          const data = pattern(useNative ? 1 : 2, 3 * 65536 + 11);
          const offset = 5 * MiB + 513; // unaligned: buffered I/O on the block device
          await dev.write(offset, data);
          assert.ok((await readAll(dev, offset, data.length)).equals(data), 'round trip');
          await dev.write(SIZE - 3, Buffer.from([1, 2, 3]), { fua: true });
          await dev.flush();
          assert.ok((await readAll(dev, SIZE - 3, 3)).equals(Buffer.from([1, 2, 3])));
          await dev.writeZeroes(offset, 100);
          assert.ok(isZero(await readAll(dev, offset, 100)));
          assert.ok((await readAll(dev, offset + 100, data.length - 100)).equals(data.subarray(100)));
          await rejectsCode(() => dev.write(SIZE, Buffer.alloc(1)), 'ENOSPC', 'write past the end');
          await rejectsCode(() => dev.writeZeroes(0, 1, { fastOnly: true }), 'ENOTSUP', 'no fast zero');
          const ext = await checkExtents(dev, 0, SIZE);
          assert.deepEqual(ext, [{ offset: 0, length: SIZE, flags: 0 }]);
        } finally {
          dev.close();
        }
      }
      const ro = FileDevice.open(loop, { readOnly: true });
      try {
        assert.equal(ro.size, SIZE);
        assert.equal(ro.capabilities.trim, false);
        await rejectsCode(() => ro.write(0, Buffer.alloc(1)), 'EPERM', 'read-only write');
        assert.ok((await readAll(ro, SIZE - 3, 3)).equals(Buffer.from([1, 2, 3])));
      } finally {
        ro.close();
      }
    } finally {
      if (holder >= 0) fs.closeSync(holder); // with autoclear set, this detaches it
      // Never detach by name once autoclear may have freed it: another
      // process may have attached the same /dev/loopN since.
      if (!detached) execFileSync('losetup', ['-d', loop]);
    }
  });
});

test('FileDevice blockStatus firstOnly: one extent, the same as the first of the whole answer', { skip: skipNative }, async () => {
  const file = sparseFile(8 * MiB);
  const dev = FileDevice.open(file);
  try {
    // Data and holes alternating every 64 KiB.
    for (let at = 0; at < 8 * MiB; at += 128 * 1024) await dev.write(at, pattern(at, 64 * 1024));
    for (const offset of [0, 4096, 64 * 1024, 100 * 1024, 8 * MiB - 4096]) {
      const all = dev.blockStatus(offset, 8 * MiB - offset);
      const first = dev.blockStatus(offset, 8 * MiB - offset, { firstOnly: true });
      assert.equal(first.length, 1);
      assert.deepEqual(first[0], all[0]);
    }
    assert.ok(dev.blockStatus(0, 8 * MiB).length > 1);
  } finally {
    dev.close();
  }
});
