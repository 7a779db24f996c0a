/**
 * The storage moves under a running VM: the Primary role of the VM's
 * resource goes back and forth between the nodes 10 times
 * (`resource primary a --handover`) while the guest writes its
 * sequence-numbered, checksummed pattern and reads every block back. No
 * guest-visible error, no reboot, the ticks go on without a gap, and the
 * pattern verifies from the host at the end. The pauses are reported.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/nbd/client.js';
import { verifyPattern } from '../../src/vm/demo-guest.js';
import { consoleOf, guestErrors, ticks, vmCluster, vmList, vmSkip, waitFor, waitTicks } from './vm-harness.js';

test('the Primary role moves back and forth 10 times under a VM writing and verifying its disk: no guest error, no reboot, every block verified', { skip: vmSkip, timeout: 240_000 }, async (t) => {
  const c = await vmCluster(t, 'prefer: bravo');
  // The VM runs on bravo, its disk served by alpha; then the disk's Primary moves under it.
  await waitFor(async () => ticks(await consoleOf(c, 'alpha')).length >= 10, 90_000, () => `10 ticks\n${c.describe()}`);
  const pauses: number[] = [];
  for (let i = 0; i < 10; i++) {
    const to = i % 2 === 0 ? 'bravo' : 'alpha';
    // (Read again until it shows ticks: a console read on a loaded machine may come back before the guest's output.)
    const before = (await waitTicks(c, 'alpha', 0, 1)).pop()!.n;
    const r = await c.duet(to, ['resource', 'primary', 'a', '--handover'], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, `handover ${i + 1} to ${to}\n${r.describe()}\n${c.describe()}`);
    const m = /vm web paused (\d+) ms/.exec(r.stdout);
    assert.ok(m, `${r.stdout}\n${c.describe()}`);
    pauses.push(Number(m[1]));
    const s = await c.status(to);
    assert.equal(s.role, 'Primary');
    // The guest goes on writing through the new Primary.
    await waitFor(async () => (ticks(await consoleOf(c, 'alpha')).pop()?.n ?? 0) >= before + 3, 60_000, () => `ticks after handover ${i + 1}\n${c.describe()}`);
  }
  const text = await consoleOf(c, 'alpha');
  const all = ticks(text);
  assert.equal(new Set(all.map((x) => x.boot)).size, 1, 'the guest never rebooted');
  for (let i = 1; i < all.length; i++) assert.equal(all[i].n, all[i - 1].n + 1, `ticks go on without a gap at ${all[i - 1].n}`);
  assert.deepEqual(guestErrors(text), [], 'no guest-visible error');
  const vms = await vmList(c, 'alpha');
  assert.equal(vms[0].state, 'running');
  assert.equal(vms[0].node, 'bravo');
  t.diagnostic(`handover pauses (ms): ${pauses.join(', ')}`);
  // Stop the guest, then check every slot of its pattern on the disk (through the Primary, alpha now).
  const stop = await c.duet('alpha', ['vm', 'stop', 'web'], { timeoutMs: 60_000 });
  assert.equal(stop.code, 0, stop.describe());
  const nbd = await NbdClient.connect({ host: '127.0.0.2', port: c.exportsPort, exportName: 'web' });
  const report = await verifyPattern((offset, length) => nbd.read(offset, length));
  await nbd.close();
  assert.deepEqual(report.errors, []);
  assert.ok(report.maxSeq >= all[all.length - 1].n - 1, `the pattern reaches the last tick (${report.maxSeq} vs ${all[all.length - 1].n})`);
});
