/**
 * The failback sequence the cluster manager will drive: a Primary stays
 * Primary while its peer was forced Primary elsewhere, wrote, and stepped
 * down. On reconnect the peer has the newer data, and the Primary must not
 * become its sync target (a resync would change blocks under the open
 * pool): refused on both sides, nothing touched, until the Primary steps
 * down; then the resync runs by itself.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { apart, readAll, stopNode, syncedPair, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;

test('an idle Primary whose peer was forced Primary and wrote is refused as sync target; after it steps down the resync runs', async () => {
  const { a, b } = await syncedPair();
  try {
    await a.resource.write(0, Buffer.alloc(MiB, 0x11));
    await a.resource.flush();
    // alpha holds its data open, as a pool does.
    const lent = a.resource.borrow();
    await apart(a, b);
    await b.resource.promote(true);
    await b.resource.write(0, Buffer.alloc(64 * 1024, 0x22));
    await b.resource.demote();
    const alphaBefore = await readAll(a.disk, a.resource.size);
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('refused on both sides', () => /alpha is Primary and would become sync target of bravo/.test(a.resource.lastRefusal ?? '') && /alpha is Primary/.test(b.resource.lastRefusal ?? ''));
    // Tried again and again (a role change clears it), refused every time, never StandAlone.
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(a.resource.standAlone, false);
    assert.equal(a.resource.role, 'Primary');
    assert.equal(a.resource.disk, 'UpToDate');
    assert.ok((await readAll(a.disk, a.resource.size)).equals(alphaBefore), "alpha's disk is untouched");
    const view = Buffer.alloc(4096);
    await a.resource.read(0, view);
    assert.ok(view.equals(Buffer.alloc(4096, 0x11)), 'the Primary still serves its own data');

    // Secondary, but the pool is still open: refused as in use.
    await a.resource.demote();
    await until('refused as in use', () => /its data is in use/.test(a.resource.lastRefusal ?? ''));
    assert.ok((await readAll(a.disk, a.resource.size)).equals(alphaBefore), "alpha's disk is still untouched");

    // Closed: the resync from bravo runs by itself.
    await lent.close();
    await until('resynced from bravo', () => upToDate(a, b) && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0);
    assert.ok((await readAll(a.disk, a.resource.size)).equals(await readAll(b.disk, a.resource.size)));
    await a.disk.read(0, view);
    assert.ok(view.equals(Buffer.alloc(4096, 0x22)));
    assert.equal(a.resource.lastRefusal, undefined);
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

test('a sync target is never promoted: not when the resync starts, nor while the witness is asked', async () => {
  const { a, b } = await syncedPair();
  try {
    await apart(a, b);
    for (let at = 0; at < 16 * MiB; at += MiB) await a.resource.write(at, Buffer.alloc(MiB, 0xaa));
    await a.resource.demote();
    let promoted: Promise<string> | undefined;
    let violated = false;
    b.resource.on('changed', () => {
      if (b.resource.role === 'Primary' && b.resource.peer?.phase === 'sync-target') violated = true;
      if (!promoted && b.resource.peer?.phase === 'sync-target') {
        promoted = b.resource.promote(false).then(
          () => 'ok',
          (err: unknown) => `refused: ${(err as Error).message}`,
        );
      }
    });
    a.resource.standAlone = false;
    b.resource.standAlone = false;
    await until('bravo became sync target', () => promoted !== undefined);
    assert.match(await promoted!, /^refused: .*sync target of alpha/);
    await until('resynced', () => upToDate(a, b) && b.resource.bitmap.count === 0);
    assert.equal(violated, false);
    assert.equal(b.resource.role, 'Secondary');
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});
