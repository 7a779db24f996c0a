/**
 * `resource create-md` at the library level: Resource.open never writes
 * metadata of its own (a disk without it is refused, untouched), and
 * createMetadata refuses a disk that has metadata unless forced; a power
 * cut at any point of it leaves the old state or the new one.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { BorrowedDevice, DelegatingDevice } from '../../src/blockdev/delegating.js';
import type { BlockDevice, WriteOptions, ZeroOptions } from '../../src/blockdev/types.js';
import { createMetadata, NoMetadata } from '../../src/replication/create-md.js';
import { Resource } from '../../src/replication/resource.js';
import { layoutFor, readRecord } from '../../src/replication/meta.js';
import { UserError } from '../../src/util/errors.js';
import { silentLogger } from '../../src/util/log.js';
import { mulberry32 } from '../blockdev/conformance.js';

const MiB = 1024 * 1024;
const options = (node = 'alpha') => ({ resource: 'r0', node, protocol: 'C' as const, log: silentLogger() });

async function isAllZero(dev: BlockDevice): Promise<boolean> {
  const buf = Buffer.alloc(dev.size);
  await dev.read(0, buf);
  return buf.every((b) => b === 0);
}

test('Resource.open on a disk without metadata: refused with the CONTRACT line, nothing written', async () => {
  const disk = new MemoryDevice(16 * MiB, '/srv/alpha.img');
  await assert.rejects(Resource.open(disk, options()), (err: unknown) => {
    assert.ok(err instanceof NoMetadata, String(err));
    assert.ok(err instanceof UserError);
    assert.equal(err.message, 'disk /srv/alpha.img of resource r0 has no duet metadata: run duet resource create-md r0');
    return true;
  });
  assert.ok(await isAllZero(disk), 'the disk was written');
});

test('createMetadata: a new disk opens Inconsistent with no generation; a second create-md is refused without force, allowed with it', async () => {
  const disk = new MemoryDevice(16 * MiB, '/srv/alpha.img');
  const created = await createMetadata(disk, { resource: 'r0', node: 'alpha' });
  assert.equal(created.previous, undefined);
  // Borrowed: closing the resource leaves the disk open for the checks below.
  const r = await Resource.open(new BorrowedDevice(disk), options());
  assert.equal(r.disk, 'Inconsistent');
  assert.equal(r.record.gi.current, '0');
  assert.equal(r.record.fullSyncNeeded, true);
  await r.saveRecord({ disk: 'UpToDate', gi: { current: '1234567890abcdef', bitmap: '0', history: ['0', '0'] }, fullSyncNeeded: false });
  await r.close();

  const before = await readRecord(disk, layoutFor(disk.size));
  await assert.rejects(createMetadata(disk, { resource: 'r0', node: 'alpha' }), (err: unknown) => {
    assert.ok(err instanceof UserError);
    assert.equal(err.exitCode, 1, 'a refusal because of state');
    assert.match(err.message, /^disk \/srv\/alpha\.img of resource r0 already holds duet metadata \(resource r0, disk UpToDate, generation 1234567890abcdef\): .*--force/);
    assert.doesNotMatch(err.message, /\n/);
    return true;
  });
  assert.deepEqual(await readRecord(disk, layoutFor(disk.size)), before, 'the refused create-md wrote');

  const forced = await createMetadata(disk, { resource: 'r0', node: 'alpha', force: true });
  assert.equal(forced.previous?.disk, 'UpToDate');
  const after = await readRecord(disk, layoutFor(disk.size));
  assert.equal(after?.disk, 'Inconsistent');
  assert.equal(after?.gi.current, '0');
  assert.ok(after!.seq > before!.seq, 'the fresh record must supersede the old slot');
  const r2 = await Resource.open(new BorrowedDevice(disk), options());
  assert.equal(r2.disk, 'Inconsistent');
  await r2.close();
});

/** Cuts the power after `limit` writes, zeroings and flushes have been issued to the faulty device. */
class CutAfter extends DelegatingDevice<FaultyDevice> {
  private ops = 0;
  constructor(
    inner: FaultyDevice,
    private readonly limit: number,
    private readonly random: () => number,
  ) {
    super(inner);
  }
  private async tick(): Promise<void> {
    if (this.ops++ === this.limit) await this.inner.powerCut({ keep: 'random', random: this.random });
  }
  override async write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    await this.tick();
    return this.inner.write(offset, data, o);
  }
  override async writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    await this.tick();
    return this.inner.writeZeroes(offset, length, o);
  }
  override async flush(): Promise<void> {
    await this.tick();
    return this.inner.flush();
  }
}

test('createMetadata under power cuts at every point: the old state or the new one, never a record without its bitmap and log', async () => {
  const SIZE = 16 * MiB;
  const layout = layoutFor(SIZE);
  for (const force of [false, true]) {
    for (let limit = 0; ; limit++) {
      const inner = new MemoryDevice(SIZE, 'disk');
      let old;
      if (force) {
        await createMetadata(inner, { resource: 'r0', node: 'alpha' });
        const r = await Resource.open(new BorrowedDevice(inner), options());
        // An old state worth keeping apart from the new one: UpToDate, a generation, a dirty bitmap.
        r.bitmap.mark(0, 8 * MiB);
        await r.writeBitmap();
        await r.al.begin(0, 4096);
        await r.saveRecord({ disk: 'UpToDate', gi: { current: 'aaaaaaaaaaaaaaaa', bitmap: 'bbbbbbbbbbbbbbbb', history: ['0', '0'] }, fullSyncNeeded: false });
        await r.close();
        old = await readRecord(inner, layout);
      }
      const faulty = new FaultyDevice(inner, { writeBack: true });
      const random = mulberry32(limit + (force ? 1000 : 0));
      let finished = true;
      try {
        await createMetadata(new CutAfter(faulty, limit, random), { resource: 'r0', node: 'alpha', force });
      } catch {
        finished = false;
      }
      // Done: what it left unflushed may still be lost.
      if (finished) await faulty.powerCut({ keep: 'none' });
      faulty.powerOn();
      const rec = await readRecord(faulty, layout);
      if (rec === undefined) {
        assert.ok(!force, `limit ${limit}: the old metadata is gone`);
        assert.ok(!finished, 'create-md returned but left no metadata');
        continue;
      }
      const r = await Resource.open(new BorrowedDevice(faulty), options());
      try {
        if (force && rec.gi.current === 'aaaaaaaaaaaaaaaa') {
          assert.ok(!finished, 'create-md --force returned but the old record stands');
          assert.deepEqual(rec, old, `limit ${limit}: neither old nor new`);
          assert.equal(r.bitmap.outOfSyncBytes, 8 * MiB, `limit ${limit}: the old record stands over a cleared bitmap: its out-of-sync blocks are forgotten`);
          continue;
        }
        // New: a disk that takes a full sync; once create-md returned, its log and bitmap are fresh too.
        assert.equal(rec.disk, 'Inconsistent', `limit ${limit}`);
        assert.equal(rec.gi.current, '0', `limit ${limit}`);
        assert.equal(rec.fullSyncNeeded, true, `limit ${limit}`);
        if (finished || !force) {
          assert.equal(r.bitmap.outOfSyncBytes, 0, `limit ${limit}: an old bitmap under the new record`);
          assert.deepEqual(r.al.hotExtents, [], `limit ${limit}`);
        }
      } finally {
        await r.close();
      }
      if (finished) break;
    }
  }
});
