/**
 * FileDevice's write modes: 'adaptive' writes small blocks on the calling
 * thread while that is fast and in libuv's pool for a back-off after one was
 * slow (the kernel throttling dirty pages). A slow write is made by moving
 * an injected clock from the hook that runs after each synchronous write:
 * the writes themselves are real and land in a temporary file.
 */
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { FileDevice, FileDeviceOptions } from '../../src/blockdev/file.js';
import { nodeDiskOptions } from '../../src/cluster/disk-options.js';
import { native, nativeUnavailableReason } from '../../src/blockdev/native.js';
import { UserError } from '../../src/util/errors.js';
import { describeBlockDevice, pattern } from './conformance.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-write-mode-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

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

/** An adaptive FileDevice on a fake clock; slow(ms) makes its next synchronous write take that long. */
function adaptive(extra: FileDeviceOptions = {}) {
  const file = sparseFile(MiB);
  const clock = { now: 1000, lag: 0 };
  const dev = FileDevice.open(file, {
    writeMode: 'adaptive',
    adaptive: {
      clock: () => clock.now,
      afterSyncWrite: () => {
        clock.now += clock.lag;
        clock.lag = 0;
      },
    },
    ...extra,
  });
  let seed = 100;
  /** Write a fresh 4 KiB at `offset`; whether it ran on the spot; the file holds it either way. */
  async function write4k(offset: number): Promise<boolean> {
    const data = pattern(seed++, 4 * KiB);
    const result = dev.write(offset, data);
    const onSpot = !(result instanceof Promise);
    await result;
    assert.ok(fileBytes(file, offset, data.length).equals(data), `the write at ${offset} landed in the file`);
    return onSpot;
  }
  return {
    file,
    dev,
    clock,
    write4k,
    slow: (ms: number) => (clock.lag = ms),
  };
}

describe('FileDevice writeMode adaptive', () => {
  test('small writes run on the spot while fast; a slow one sends them to the pool for 100 ms, then a fast probe returns them', async () => {
    const a = adaptive();
    try {
      assert.equal(await a.write4k(0), true);
      assert.equal(await a.write4k(4096), true);
      a.slow(3);
      assert.equal(await a.write4k(8192), true, 'a slow write is only known once done');
      const end = a.clock.now;
      assert.equal(await a.write4k(0), false, 'in the pool after a slow write');
      a.clock.now = end + 99;
      assert.equal(await a.write4k(4096), false, 'still in the pool 99 ms on');
      a.clock.now = end + 100;
      assert.equal(await a.write4k(8192), true, 'the back-off is over: a probe on the spot');
      assert.equal(await a.write4k(0), true, 'the probe was fast: on the spot again');
      a.slow(1.5);
      assert.equal(await a.write4k(0), true);
      assert.equal(await a.write4k(0), true, 'a write of 1.5 ms is not slow (limit 2 ms)');
    } finally {
      a.dev.close();
    }
  });

  test('the back-off doubles while probes stay slow, up to 10 s, and starts at 100 ms again after a fast probe', async () => {
    const a = adaptive();
    try {
      a.slow(5);
      await a.write4k(0);
      let end = a.clock.now;
      const seen: number[] = [];
      for (let i = 0; i < 10; i++) {
        // Find when the device writes on the spot again: that write is the probe, made slow.
        let waited = 0;
        for (;;) {
          a.clock.now = end + waited;
          const data = pattern(i * 1000 + waited, 4 * KiB);
          a.slow(5);
          const r = a.dev.write(4096, data);
          if (!(r instanceof Promise)) break;
          a.slow(0);
          await r;
          waited += 50;
        }
        assert.ok(fileBytes(a.file, 4096, 4096).equals(pattern(i * 1000 + waited, 4 * KiB)));
        seen.push(waited);
        end = a.clock.now;
      }
      assert.deepEqual(seen, [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]);
      a.clock.now = end + 10_000;
      assert.equal(await a.write4k(0), true, 'a fast probe');
      a.slow(5);
      await a.write4k(0);
      end = a.clock.now;
      a.clock.now = end + 99;
      assert.equal(await a.write4k(0), false);
      a.clock.now = end + 100;
      assert.equal(await a.write4k(0), true, 'back to the first back-off of 100 ms');
    } finally {
      a.dev.close();
    }
  });

  test('tunable: slow-write limit and back-off bounds', async () => {
    const file = sparseFile(MiB);
    const clock = { now: 0, lag: 0 };
    const dev = FileDevice.open(file, {
      writeMode: 'adaptive',
      adaptive: {
        slowWriteMs: 10,
        firstBackoffMs: 30,
        maxBackoffMs: 50,
        clock: () => clock.now,
        afterSyncWrite: () => ((clock.now += clock.lag), (clock.lag = 0)),
      },
    });
    try {
      clock.lag = 9;
      assert.equal(dev.write(0, pattern(1, 4096)), undefined);
      assert.equal(dev.write(0, pattern(2, 4096)), undefined, 'under the 10 ms limit');
      clock.lag = 11;
      assert.equal(dev.write(0, pattern(3, 4096)), undefined);
      const pooled = dev.write(0, pattern(4, 4096));
      assert.ok(pooled instanceof Promise);
      await pooled;
      clock.now += 30;
      clock.lag = 11;
      assert.equal(dev.write(0, pattern(5, 4096)), undefined, 'probe after 30 ms, slow');
      clock.now += 49;
      const pooledAgain = dev.write(0, pattern(6, 4096));
      assert.ok(pooledAgain instanceof Promise, 'back-off of 50 ms');
      await pooledAgain;
      clock.now += 1;
      assert.equal(dev.write(0, pattern(7, 4096)), undefined, 'over at 50 ms: doubled to 60, capped at 50');
      assert.ok(fileBytes(file, 0, 4096).equals(pattern(7, 4096)));
    } finally {
      dev.close();
    }
  });

  test('FUA and large writes stay in the pool, small reads on the spot', async () => {
    const a = adaptive();
    try {
      const fua = a.dev.write(0, pattern(1, 4096), { fua: true });
      assert.ok(fua instanceof Promise, 'FUA in the pool');
      await fua;
      const large = a.dev.write(0, pattern(2, 128 * KiB));
      assert.ok(large instanceof Promise, 'over syncWriteMaxBytes: the pool');
      await large;
      const back = Buffer.alloc(4096);
      assert.equal(a.dev.read(0, back), undefined);
      assert.ok(back.equals(pattern(2, 128 * KiB).subarray(0, 4096)));
      assert.equal(await a.write4k(0), true, 'small writes on the spot');
    } finally {
      a.dev.close();
    }
  });

  test('syncWriteMaxBytes bounds what may run on the spot', async () => {
    const a = adaptive({ syncWriteMaxBytes: 2048 });
    try {
      assert.equal(await a.write4k(0), false, '4 KiB over a 2 KiB bound');
      assert.equal(a.dev.write(0, pattern(9, 2048)), undefined);
    } finally {
      a.dev.close();
    }
  });
});

describe('FileDevice writeMode sync and pool', () => {
  test("'pool' sends every write to the pool, 'sync' none of the small ones", async () => {
    const fileA = sparseFile(MiB);
    const pooled = FileDevice.open(fileA, { writeMode: 'pool' });
    const fileB = sparseFile(MiB);
    const onSpot = FileDevice.open(fileB, { writeMode: 'sync' });
    try {
      const r = pooled.write(0, pattern(1, 4096));
      assert.ok(r instanceof Promise);
      await r;
      assert.equal(onSpot.write(0, pattern(1, 4096)), undefined);
      assert.ok(fileBytes(fileA, 0, 4096).equals(fileBytes(fileB, 0, 4096)));
    } finally {
      pooled.close();
      onSpot.close();
    }
  });
});

describe('node daemon disks: nodeDiskOptions', () => {
  test('adaptive writes by default', () => {
    assert.deepEqual(nodeDiskOptions({}), { writeMode: 'adaptive' });
  });

  test('DUET_NODE_SYNC_WRITE_MAX_BYTES overrides: 0 is every write in the pool, N is writes up to N bytes on the spot', () => {
    assert.deepEqual(nodeDiskOptions({ DUET_NODE_SYNC_WRITE_MAX_BYTES: '0' }), { writeMode: 'pool' });
    assert.deepEqual(nodeDiskOptions({ DUET_NODE_SYNC_WRITE_MAX_BYTES: '1048576' }), { writeMode: 'sync', syncWriteMaxBytes: 1048576 });
  });

  test('a value that is not a byte count is refused, naming the variable', () => {
    for (const bad of ['', 'abc', '-1', '1.5']) {
      assert.throws(
        () => nodeDiskOptions({ DUET_NODE_SYNC_WRITE_MAX_BYTES: bad }),
        (err: unknown) => err instanceof UserError && err.message.includes('DUET_NODE_SYNC_WRITE_MAX_BYTES') && !err.message.includes('\n'),
      );
    }
  });
});

describeBlockDevice(
  'FileDevice (writeMode adaptive)',
  async (size, opts = {}) => {
    const file = sparseFile(size);
    const dev = FileDevice.open(file, { writeMode: 'adaptive', readOnly: opts.readOnly });
    return {
      dev,
      cleanup: () => {
        dev.close();
        fs.rmSync(file, { force: true });
      },
    };
  },
  {
    capabilities: { trim: true, fastZero: true, extents: true, flush: true, fua: true },
    skip: native === null ? `native add-on not loaded: ${nativeUnavailableReason}` : false,
    numRuns: 20,
  },
);
