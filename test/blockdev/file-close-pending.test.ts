/**
 * Review of the 'adaptive' write mode: FileDevice.close() closes its descriptors at once, while writes
 * it accepted may still wait in libuv's pool (a back-off, a large or FUA write) or behind one (RangeOrder).
 * The descriptor numbers are free again: the next file the process opens takes them, and the queued
 * write lands in that file, at this device's offset, and resolves as done. A disk detached on an I/O
 * error is closed so (Resource.detach) while writes to it are still under way.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FileDevice } from '../../src/blockdev/file.js';
import { pattern } from './conformance.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-close-pending-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

function sparseFile(name: string, size: number): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  return file;
}

/** Hold every libuv pool thread in a read of an empty FIFO; release() lets them go. */
function holdPool(): { release: () => Promise<void> } {
  const threads = Number(process.env.UV_THREADPOOL_SIZE) || 4;
  const fifo = path.join(dir, `fifo-${Math.random().toString(16).slice(2)}`);
  execFileSync('mkfifo', [fifo]);
  const fd = fs.openSync(fifo, fs.constants.O_RDWR);
  const reads = Array.from({ length: threads }, () => new Promise<void>((resolve, reject) => fs.read(fd, Buffer.alloc(1), 0, 1, null, (err) => (err ? reject(err) : resolve()))));
  return {
    release: async () => {
      fs.writeSync(fd, Buffer.alloc(threads));
      await Promise.all(reads);
      fs.closeSync(fd);
    },
  };
}

test('a write still in the pool when its device is closed never lands in a file opened after the close', async () => {
  const mine = sparseFile('mine.img', MiB);
  const other = sparseFile('other.img', MiB);
  const clock = { now: 0, lag: 0 };
  const dev = FileDevice.open(mine, { writeMode: 'adaptive', adaptive: { clock: () => clock.now, afterSyncWrite: () => ((clock.now += clock.lag), (clock.lag = 0)) } });
  clock.lag = 50;
  dev.write(64 * KiB, pattern(1, 4 * KiB)); // slow: small writes go to the pool for a back-off
  const pool = holdPool();
  const pooled = dev.write(0, pattern(2, 4 * KiB));
  const queued = dev.write(0, pattern(3, 4 * KiB)); // behind it (same block)
  assert.ok(pooled instanceof Promise && queued instanceof Promise);
  dev.close();
  // Whatever the process opens next (another resource's disk, a split-brain file, the witness state).
  const fds = [fs.openSync(other, 'r+'), fs.openSync(other, 'r+')];
  try {
    await pool.release();
    const outcomes = await Promise.allSettled([pooled, queued]);
    const head = Buffer.alloc(4 * KiB);
    fs.readSync(fds[0], head, 0, head.length, 0);
    assert.ok(head.equals(Buffer.alloc(4 * KiB)), `another file got this device's write (first byte 0x${head[0].toString(16)}; the writes: ${outcomes.map((o) => o.status).join(', ')})`);
  } finally {
    for (const fd of fds) fs.closeSync(fd);
  }
});
