/**
 * Epochs: a Primary that writes without flushing still learns, within
 * ~100 ms, that the peer made its writes durable (a background barrier),
 * so when the peer dies only the writes after the last confirmed epoch are
 * marked out of sync, block by block — not every 4 MiB extent written
 * since the application's last flush.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readAll, syncedPair, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;

test('64 MiB written with no flush, the peer dies, 8 MiB more: at most 16 MiB out of sync, and exactly what changed resyncs', async () => {
  const { a, b } = await syncedPair(128 * MiB);
  try {
    for (let at = 0; at < 64 * MiB; at += MiB) await a.resource.write(at, randomBytes(MiB));
    // No flush from the application: the epochs' barriers confirm the writes in the background.
    await until('the peer confirmed every epoch', () => a.resource.peer?.unconfirmedBytes === 0, 10_000);
    a.resource.standAlone = true;
    b.resource.standAlone = true;
    b.connector.kick('test: the peer dies');
    await until('alpha saw bravo go', () => !a.resource.peer);
    for (let at = 64 * MiB; at < 72 * MiB; at += MiB) await a.resource.write(at, randomBytes(MiB));
    const outOfSync = a.resource.bitmap.outOfSyncBytes;
    assert.ok(outOfSync <= 16 * MiB, `${outOfSync / MiB} MiB out of sync`);
    assert.ok(outOfSync >= 8 * MiB, 'the writes made without the peer are marked');
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('resynced', () => upToDate(a, b) && a.resource.bitmap.count === 0, 20_000);
    assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(b.disk, b.resource.size)));
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});
