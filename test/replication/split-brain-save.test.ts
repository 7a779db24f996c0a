/**
 * The blocks a split-brain resolution overwrites are saved on the losing
 * node before the resync begins there. While they are saved (it can take
 * long: the whole out-of-sync set is read and written to a file) the link
 * may drop, or the save may fail; neither may cost the data on either side.
 * (Found by a hostile review of the asynchronous save.)
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BLOCK } from '../../src/replication/bitmap.js';
import type { ResourceOptions } from '../../src/replication/resource.js';
import { syncFileIo, type FileIo } from '../../src/util/file-io.js';
import { apart, connected, freePort, initialSync, newDisk, Node, startNode, stopNode, until, upToDate } from './pair.js';

const MiB = 1024 * 1024;

/** A FileIo whose writes can be made slow, or fail with ENOSPC after `failAfter` writes. */
function controlledIo(): { io: FileIo; slowMs: number; failAfter: number | undefined; done: string[] } {
  const ctl = {
    slowMs: 0,
    failAfter: undefined as number | undefined,
    /** What was done to the file and its directory, in order (the real calls, on the real file system). */
    done: [] as string[],
    io: {
      mkdir: (dir: string) => syncFileIo.mkdir(dir),
      async syncDir(dir: string) {
        await syncFileIo.syncDir(dir);
        ctl.done.push(`syncDir ${dir}`);
      },
      async create(file: string, mode: number) {
        const inner = await syncFileIo.create(file, mode);
        let writes = 0;
        return {
          async write(data: Buffer) {
            if (ctl.slowMs > 0) await new Promise((r) => setTimeout(r, ctl.slowMs));
            if (ctl.failAfter !== undefined && ++writes > ctl.failAfter) throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
            await inner.write(data);
          },
          sync: async () => {
            await inner.sync();
            ctl.done.push(`sync ${path.basename(file)}`);
          },
          close: async () => {
            await inner.close();
            ctl.done.push(`close ${path.basename(file)}`);
          },
        };
      },
    } as FileIo,
  };
  return ctl;
}

/**
 * A split brain: alpha and bravo both wrote while apart (alpha more), and
 * both are Secondary again, StandAlone until the test lets them connect.
 * The policy discards the side with fewer changes: bravo.
 */
async function splitBrain(t: { after: (fn: () => Promise<void> | void) => void }, io: FileIo): Promise<{ a: Node; b: Node; dir: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-sb-save-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const options: Partial<ResourceOptions> = { afterSplitBrain: 'discard-least-changes', splitBrainDir: dir, fileIo: io };
  const port = await freePort();
  const a = await startNode('alpha', await newDisk(64 * MiB, 'alpha'), port, options);
  const b = await startNode('bravo', await newDisk(64 * MiB, 'bravo'), port, options);
  t.after(async () => {
    await stopNode(a).catch(() => undefined);
    await stopNode(b).catch(() => undefined);
  });
  await initialSync(a, b);
  await apart(a, b);
  for (let blk = 0; blk < 4000; blk += 2) await a.resource.write(blk * BLOCK, Buffer.alloc(BLOCK, 0xaa));
  await a.resource.demote();
  await b.resource.promote(false);
  for (let blk = 3; blk < 400; blk += 4) await b.resource.write(blk * BLOCK, Buffer.alloc(BLOCK, 0xbb));
  await b.resource.demote();
  return { a, b, dir };
}

test('the link drops while the losing side saves its blocks: it cannot be promoted meanwhile, and afterwards its disk and generation are as they were', { timeout: 60_000 }, async (t) => {
  const ctl = controlledIo();
  const { a, b } = await splitBrain(t, ctl.io);
  const before = b.resource.record.gi;
  ctl.slowMs = 20;
  a.resource.standAlone = false;
  b.resource.standAlone = false;
  await until('bravo sync target', () => b.resource.peer?.phase === 'sync-target', 20_000);
  // The source goes away while bravo is still saving.
  await a.connector.stop();
  await until('bravo lost alpha', () => !b.resource.peer || b.resource.peer.phase === 'closed');
  b.resource.standAlone = true;
  await assert.rejects(b.resource.promote(false), /a resync is starting/);
  ctl.slowMs = 0;
  await until('save over', () => (b.resource as unknown as { syncStarting: number }).syncStarting === 0, 30_000);
  assert.equal(b.resource.record.disk, 'UpToDate', 'made Inconsistent for a resync that never began');
  assert.deepEqual(b.resource.record.gi, before, 'its generations changed for a resync that never began');
  // Its own writes are still there.
  const one = Buffer.alloc(BLOCK);
  await b.disk.read(3 * BLOCK, one);
  assert.equal(one[0], 0xbb);
});

test('the losing side cannot save its blocks (ENOSPC) while the winner writes: its disk stays attached and good, its blocks stay, and the next connect is the same split brain', { timeout: 60_000 }, async (t) => {
  const ctl = controlledIo();
  const { a, b } = await splitBrain(t, ctl.io);
  await a.resource.promote(true);
  ctl.failAfter = 2;
  ctl.slowMs = 5;
  a.resource.standAlone = false;
  b.resource.standAlone = false;
  let stop = false;
  let writes = 0;
  const writer = (async () => {
    while (!stop) {
      await Promise.resolve(a.resource.write((15000 + (writes % 100)) * BLOCK, Buffer.alloc(BLOCK, 1))).catch(() => undefined);
      writes++;
      await new Promise((r) => setTimeout(r, 2));
    }
  })();
  try {
    await until('bravo sync target', () => b.resource.peer?.phase === 'sync-target', 20_000);
    await until('the resolution refused on bravo', () => b.resource.peer === undefined || b.resource.peer.phase !== 'sync-target', 20_000);
    // Writes from the Primary waited for the resync's start meanwhile; they failed with it.
    await new Promise((r) => setTimeout(r, 300));
  } finally {
    stop = true;
    await writer;
  }
  assert.ok(b.resource.backing, 'bravo detached its disk for a file it could not write');
  assert.equal(b.resource.record.disk, 'UpToDate');
  assert.equal(b.resource.record.fullSyncNeeded, false);
  const one = Buffer.alloc(BLOCK);
  await b.disk.read(3 * BLOCK, one);
  assert.equal(one[0], 0xbb, "bravo's own block was overwritten without being saved");
  // Room again: the next connect finds the same split brain (alpha recorded the start of the resolution,
  // bravo did not: not "unrelated data"), the resolution goes through, bravo's blocks are in the file.
  ctl.failAfter = undefined;
  ctl.slowMs = 0;
  b.resource.standAlone = false;
  a.resource.standAlone = false;
  await until('resolved', () => connected(a, b) && b.resource.disk === 'UpToDate' && a.resource.bitmap.count === 0 && b.resource.bitmap.count === 0, 30_000);
  assert.match(b.resource.splitBrain?.savedTo ?? '', /\.blocks$/);
  await b.disk.read(3 * BLOCK, one);
  assert.equal(one[0], 0, 'bravo has alpha\'s data now');
});

test('the saved blocks survive a power cut: the file is fsynced, then its directory (the new entry), before the resync overwrites anything', { timeout: 60_000 }, async (t) => {
  const ctl = controlledIo();
  const { a, b, dir } = await splitBrain(t, ctl.io);
  let overwritten: string[] | undefined;
  const write = b.disk.write.bind(b.disk);
  b.disk.write = ((offset: number, data: Buffer, options?: unknown) => {
    // The first block of bravo's own writes (3) is overwritten by the resync: what was done by then.
    if (overwritten === undefined && offset <= 3 * BLOCK && offset + data.length > 3 * BLOCK && b.resource.peer?.phase === 'sync-target') overwritten = [...ctl.done];
    return write(offset, data, options as never);
  }) as typeof b.disk.write;
  a.resource.standAlone = false;
  b.resource.standAlone = false;
  await until('resolved', () => upToDate(a, b) && b.resource.bitmap.count === 0, 30_000);
  const file = fs.readdirSync(dir).find((f) => f.endsWith('.blocks'));
  assert.ok(file, 'the blocks were saved');
  assert.deepEqual(overwritten, [`sync ${file}`, `close ${file}`, `syncDir ${dir}`]);
});
