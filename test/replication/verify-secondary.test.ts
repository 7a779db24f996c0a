/**
 * Online verify started on the Secondary. The Primary's application writes
 * order the link: a block the Primary has just written is on its disk before
 * the Secondary has it. If the Secondary read its own copy and sent the
 * digests, the Primary would compare them with newer data and report a block
 * "out of sync" that is only in flight. So a Secondary asks the Primary to
 * send its digests (read in the Primary's write order) and compares them in
 * its own receive order, as a verify started on the Primary does.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { DelegatingDevice } from '../../src/blockdev/delegating.js';
import type { BlockDevice, WriteOptions } from '../../src/blockdev/types.js';
import { freePort, initialSync, newDisk, readAll, startNode, stopNode, until } from './pair.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Holds writes to one range until released: the Secondary has received a write but not applied it yet. */
class GatedDevice extends DelegatingDevice {
  private gate: { offset: number; length: number } | undefined;
  held: (() => void)[] = [];
  hold(offset: number, length: number): void {
    this.gate = { offset, length };
  }
  release(): void {
    this.gate = undefined;
    for (const go of this.held.splice(0)) go();
  }
  override async write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    const g = this.gate;
    if (g && offset < g.offset + g.length && g.offset < offset + data.length) await new Promise<void>((go) => this.held.push(go));
    return this.inner.write(offset, data, options);
  }
}

test('verify started on the Secondary while the Primary writes: a block in flight is not reported out of sync', async () => {
  const port = await freePort();
  const size = 16 * MiB;
  const a = await startNode('alpha', await newDisk(size, 'alpha'), port);
  const gated = new GatedDevice(await newDisk(size, 'bravo'));
  const b = await startNode('bravo', gated as BlockDevice, port);
  try {
    await initialSync(a, b);
    await a.resource.write(0, randomBytes(2 * MiB));
    await a.resource.flush();
    const at = 512 * KiB + 8 * KiB;
    gated.hold(at, 4096);
    // Protocol C: the write completes once bravo has applied it, which the gate holds back.
    const write = a.resource.write(at, Buffer.alloc(4096, 0x77));
    await until('bravo received the write and holds it', () => gated.held.length > 0);
    const verify = b.resource.peer!.runVerify();
    const released = new Promise<void>((done) => setTimeout(() => { gated.release(); done(); }, 300));
    await write;
    const v = await verify;
    await released;
    assert.equal(v.outOfSyncBytes, 0, `verify reported ${JSON.stringify(v.ranges)} out of sync, but both disks agree once the write is applied`);
    assert.equal(a.resource.bitmap.count, 0);
    assert.equal(b.resource.bitmap.count, 0);
    assert.ok((await readAll(a.disk, size)).subarray(0, a.resource.size).equals((await readAll(b.disk, size)).subarray(0, a.resource.size)));
  } finally {
    gated.release();
    await stopNode(a);
    await stopNode(b);
  }
});
