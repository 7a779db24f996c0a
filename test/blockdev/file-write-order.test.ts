/**
 * FileDevice lands overlapping writes in the order they were issued, also
 * when the later one would run on the calling thread while the earlier one
 * still waits in libuv's thread pool (a large write, a FUA write, a write
 * made while the kernel throttled: file.ts). To make "still waits" certain,
 * every pool thread is first held by a read of an empty FIFO, so the pool
 * write sits in the queue until the test lets the pool go.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { FileDevice } from '../../src/blockdev/file.js';
import { native, nativeUnavailableReason } from '../../src/blockdev/native.js';
import { pattern } from './conformance.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-write-order-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
const skipNative = native === null ? `native add-on not loaded: ${nativeUnavailableReason}` : false;

let counter = 0;
function sparseFile(size: number): string {
  const file = path.join(dir, `dev-${counter++}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  return file;
}

function fileBytes(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    fs.readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

/** Hold every libuv pool thread in a read of an empty FIFO; release() lets them go. */
function holdPool(): { release: () => Promise<void> } {
  const threads = Number(process.env.UV_THREADPOOL_SIZE) || 4;
  const fifo = path.join(dir, `fifo-${counter++}`);
  execFileSync('mkfifo', [fifo]);
  // O_RDWR: the open does not wait for a writer (Linux); each read waits for a byte.
  const fd = fs.openSync(fifo, fs.constants.O_RDWR);
  const reads = Array.from(
    { length: threads },
    () => new Promise<void>((resolve, reject) => fs.read(fd, Buffer.alloc(1), 0, 1, null, (err) => (err ? reject(err) : resolve()))),
  );
  return {
    release: async () => {
      fs.writeSync(fd, Buffer.alloc(threads));
      await Promise.all(reads);
      fs.closeSync(fd);
    },
  };
}

test('a small write issued while an overlapping large write waits in the pool lands after it', async () => {
  const file = sparseFile(MiB);
  const dev = FileDevice.open(file);
  try {
    const pool = holdPool();
    const large = dev.write(0, pattern(1, 128 * KiB)); // over syncWriteMaxBytes: the pool
    assert.ok(large instanceof Promise);
    const small = dev.write(4 * KiB, pattern(2, 4 * KiB));
    await pool.release();
    await Promise.all([large, small]);
    assert.ok(fileBytes(file, 4 * KiB, 4 * KiB).equals(pattern(2, 4 * KiB)), 'the later 4 KiB write is what the file holds');
    assert.ok(fileBytes(file, 0, 4 * KiB).equals(pattern(1, 128 * KiB).subarray(0, 4 * KiB)));
  } finally {
    dev.close();
  }
});

test('a small write issued while an overlapping FUA write waits in the pool lands after it', async () => {
  const file = sparseFile(MiB);
  const dev = FileDevice.open(file);
  try {
    const pool = holdPool();
    const fua = dev.write(8 * KiB, pattern(3, 4 * KiB), { fua: true });
    const plain = dev.write(8 * KiB, pattern(4, 4 * KiB));
    await pool.release();
    await Promise.all([fua, plain]);
    assert.ok(fileBytes(file, 8 * KiB, 4 * KiB).equals(pattern(4, 4 * KiB)));
  } finally {
    dev.close();
  }
});

test('a trim or a zeroing issued while an overlapping write waits in the pool comes after it', { skip: skipNative }, async () => {
  const file = sparseFile(MiB);
  const dev = FileDevice.open(file);
  try {
    const pool = holdPool();
    const first = dev.write(0, pattern(5, 128 * KiB));
    const trim = dev.trim(0, 64 * KiB);
    const second = dev.write(256 * KiB, pattern(6, 128 * KiB));
    const zero = dev.writeZeroes(256 * KiB, 64 * KiB, { noHole: true });
    await pool.release();
    await Promise.all([first, trim, second, zero]);
    assert.ok(fileBytes(file, 0, 64 * KiB).equals(Buffer.alloc(64 * KiB)), 'trimmed after the write');
    assert.ok(fileBytes(file, 64 * KiB, 64 * KiB).equals(pattern(5, 128 * KiB).subarray(64 * KiB)));
    assert.ok(fileBytes(file, 256 * KiB, 64 * KiB).equals(Buffer.alloc(64 * KiB)), 'zeroed after the write');
  } finally {
    dev.close();
  }
});

test('writes to different blocks do not wait for each other', async () => {
  const file = sparseFile(MiB);
  const dev = FileDevice.open(file);
  try {
    const pool = holdPool();
    const large = dev.write(0, pattern(7, 128 * KiB));
    assert.equal(dev.write(512 * KiB, pattern(8, 4 * KiB)), undefined, 'done on the spot while the pool is held');
    assert.ok(fileBytes(file, 512 * KiB, 4 * KiB).equals(pattern(8, 4 * KiB)));
    await pool.release();
    await large;
  } finally {
    dev.close();
  }
});

test('overlapping writes issued back to back across a switch of an adaptive device land in issue order', async () => {
  const file = sparseFile(MiB);
  const clock = { now: 0, lag: 0 };
  const dev = FileDevice.open(file, {
    writeMode: 'adaptive',
    adaptive: { clock: () => clock.now, afterSyncWrite: () => ((clock.now += clock.lag), (clock.lag = 0)) },
  });
  try {
    clock.lag = 50;
    assert.equal(dev.write(0, pattern(10, 4 * KiB)), undefined, 'a slow write on the spot: small writes go to the pool');
    const pool = holdPool();
    const pooled = dev.write(0, pattern(11, 4 * KiB));
    assert.ok(pooled instanceof Promise, 'in the pool');
    clock.now += 100; // the back-off is over: the next small write would be done on the spot
    const next = dev.write(0, pattern(12, 4 * KiB));
    await pool.release();
    await Promise.all([pooled, next]);
    assert.ok(fileBytes(file, 0, 4 * KiB).equals(pattern(12, 4 * KiB)), 'the later write is what the file holds');

    // The other way round: on the spot (slow), then in the pool.
    clock.now += 1000;
    clock.lag = 50;
    assert.equal(dev.write(8 * KiB, pattern(13, 4 * KiB)), undefined);
    const after = dev.write(8 * KiB, pattern(14, 4 * KiB));
    assert.ok(after instanceof Promise);
    await after;
    assert.ok(fileBytes(file, 8 * KiB, 4 * KiB).equals(pattern(14, 4 * KiB)));
  } finally {
    dev.close();
  }
});
