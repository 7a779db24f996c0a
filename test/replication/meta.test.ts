import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { Bitmap } from '../../src/replication/bitmap.js';
import { crc32 } from 'node:zlib';
import { decodeRecord, encodeRecord, initialRecord, layoutFor, readRecord, writeRecord } from '../../src/replication/meta.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

test('layout: data first, then activity log, bitmap and the two record slots at the very end', () => {
  for (const size of [8 * MiB, 1 * GiB + 12345, 4 * 1024 * GiB]) {
    const l = layoutFor(size);
    assert.equal(l.dataBytes % MiB, 0);
    assert.ok(l.dataBytes <= l.alOffset, `${size}: data overlaps the activity log`);
    assert.equal(l.alOffset + l.alBytes, l.bitmapOffset);
    assert.equal(l.bitmapBytes, Bitmap.bytesFor(l.dataBytes));
    assert.equal(l.bitmapOffset + l.bitmapBytes, l.recordOffset);
    assert.equal(l.recordOffset + 8192, size);
    // Little is lost: at most 1 MiB of alignment beyond the metadata itself.
    assert.ok(size - l.dataBytes <= l.alBytes + l.bitmapBytes + 8192 + MiB, `${size}: ${size - l.dataBytes} bytes of overhead`);
  }
  const big = layoutFor(4 * 1024 * GiB); // 32 KiB of bitmap per GiB of data: just under 128 MiB for 4 TiB
  assert.ok(big.bitmapBytes <= 128 * MiB && big.bitmapBytes > 127 * MiB, String(big.bitmapBytes));
  assert.throws(() => layoutFor(256 * 1024), /too small/);
});

test('record: checksummed; a damaged slot is ignored; the newer valid slot wins', async () => {
  const dev = new MemoryDevice(16 * MiB, 'disk');
  const l = layoutFor(dev.size);
  assert.equal(await readRecord(dev, l), undefined);
  let r = await writeRecord(dev, l, initialRecord('a', 'alpha', l));
  assert.equal(r.seq, 1);
  assert.deepEqual(await readRecord(dev, l), r);
  const r2 = await writeRecord(dev, l, { ...r, disk: 'UpToDate', fullSyncNeeded: false });
  assert.equal((await readRecord(dev, l))?.disk, 'UpToDate');
  // Damage the newer slot: the older one is what remains.
  const slot = l.recordOffset + (r2.seq % 2) * 4096;
  const buf = Buffer.alloc(4096);
  await dev.read(slot, buf);
  buf[40] ^= 0xff;
  await dev.write(slot, buf);
  assert.equal((await readRecord(dev, l))?.seq, r.seq);
  assert.equal(decodeRecord(buf), undefined);
  assert.deepEqual(decodeRecord(encodeRecord(r2)), r2);
  r = r2;
});

test('record: a power cut during an update leaves the old or the new record, never neither', async () => {
  for (let i = 0; i < 40; i++) {
    const inner = new MemoryDevice(16 * MiB, 'disk');
    const dev = new FaultyDevice(inner);
    const l = layoutFor(inner.size);
    let r = await writeRecord(dev, l, initialRecord('a', 'alpha', l));
    r = await writeRecord(dev, l, { ...r, disk: 'UpToDate' });
    const update = writeRecord(dev, l, { ...r, disk: 'Outdated' });
    // Cut after a random number of event-loop turns: before, during or after the write.
    for (let k = 0; k < i % 4; k++) await new Promise((res) => setImmediate(res));
    await dev.powerCut({ keep: i % 2 === 0 ? 'none' : 'random' });
    const done = await update.then(() => true, () => false);
    dev.powerOn();
    const after = await readRecord(dev, l);
    assert.ok(after, 'no valid record after the cut');
    assert.ok(after.disk === 'UpToDate' || after.disk === 'Outdated', after.disk);
    if (done) assert.equal(after.disk, 'Outdated', 'an acknowledged (FUA) update was lost');
  }
});

/** A slot holding `body` as its JSON, with a right magic, version and checksum: only the shape can be wrong. */
function slotWith(body: unknown, seq: bigint): Buffer {
  const json = Buffer.from(JSON.stringify(body));
  const buf = Buffer.alloc(4096);
  Buffer.from('DUETREPL').copy(buf, 0);
  buf.writeUInt32LE(1, 8);
  buf.writeBigUInt64LE(seq, 16);
  buf.writeUInt32LE(json.length, 24);
  json.copy(buf, 32);
  buf.writeUInt32LE(crc32(json, crc32(buf.subarray(0, 28))), 28);
  return buf;
}

test('record: a checksummed slot of the wrong shape is invalid; the other slot is used', async () => {
  const dev = new MemoryDevice(16 * MiB, 'disk');
  const l = layoutFor(dev.size);
  const good = await writeRecord(dev, l, { ...initialRecord('a', 'alpha', l), seq: 0 });
  const { seq: _seq, ...body } = good;
  const wrong: [string, unknown][] = [
    ['a generation that is not one', { ...body, gi: { ...body.gi, current: 'not-hex-at-all!!' } }],
    ['a short history', { ...body, gi: { ...body.gi, history: ['0'] } }],
    ['an unknown disk state', { ...body, disk: 'Happy' }],
    ['a size as a string', { ...body, dataBytes: String(body.dataBytes) }],
    ['a negative size', { ...body, dataBytes: -1 }],
    ['a flag that is not a boolean', { ...body, primary: 'yes' }],
    ['no resource', { ...body, resource: undefined }],
    ['an array', [body]],
    ['null', null],
  ];
  for (const [what, bad] of wrong) {
    const slot = slotWith(bad, BigInt(good.seq + 1));
    assert.equal(decodeRecord(slot), undefined, what);
    await dev.write(l.recordOffset + ((good.seq + 1) % 2) * 4096, slot);
    assert.deepEqual(await readRecord(dev, l), good, `${what}: the older valid slot wins`);
  }
  assert.equal(decodeRecord(slotWith(body, 2n ** 60n)), undefined, 'a sequence number past 2^53');
});

test('record: fields added after the first version default; fields of a newer duet are kept', () => {
  const l = layoutFor(16 * MiB);
  const { seq: _seq, primarySince: _p, peerOutdated: _o, ...old } = initialRecord('a', 'alpha', l);
  assert.deepEqual(decodeRecord(slotWith(old, 7n)), { ...old, primarySince: 0, peerOutdated: false, seq: 7 });
  const newer = decodeRecord(slotWith({ ...old, primarySince: 5, peerOutdated: true, someday: 1 }, 8n));
  assert.equal(newer?.seq, 8);
  assert.equal((newer as unknown as Record<string, unknown>).someday, 1);
});
