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
import { makeCluster, waitStatus, inSync, type Cluster } from '../e2e/cluster-harness.js';
import { haveProgram, tmpDir } from '../e2e/harness.js';
import { buildDemoGuest, DEMO_GUEST_APPEND, verifyPattern } from '../../src/vm/demo-guest.js';
import { NbdClient } from '../../src/nbd/client.js';
import type { VmInfo } from '../../src/vm/manager.js';

const skip = !haveProgram('qemu-system-x86_64') && process.env.CI !== 'true' ? 'qemu-system-x86_64 is not installed' : false;

async function waitFor(check: () => Promise<boolean>, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {
      // A daemon busy: ask again.
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function consoleOf(c: Cluster, vm: string): Promise<string> {
  const r = await c.duet('alpha', ['vm', 'console', vm]);
  assert.equal(r.code, 0, r.describe());
  return r.stdout;
}

function ticks(text: string): { n: number; boot: string }[] {
  return [...text.matchAll(/^tick (\d+) boot=([0-9a-f]{8})$/gm)].map((m) => ({ n: Number(m[1]), boot: m[2] }));
}

test('the Primary role moves back and forth 10 times under a VM writing and verifying its disk: no guest error, no reboot, every block verified', { skip, timeout: 240_000 }, async (t) => {
  const guest = await buildDemoGuest(tmpDir(t, 'duet-vm-guest-'));
  const c = await makeCluster(t, {
    diskBytes: 128 * 1024 * 1024,
    extra: ['vms:', `  web: { disks: [pa/web], memory: 128M, prefer: bravo, boot: { kernel: ${guest.kernel}, initrd: ${guest.initrd}, append: "${DEMO_GUEST_APPEND}" } }`],
  });
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => inSync(s) && s.role === 'Primary', 60_000);
  const created = await c.duet('alpha', ['vol', 'create', 'pa/web', '--size', '16M']);
  assert.equal(created.code, 0, created.describe());
  // The VM runs on bravo, its disk served by alpha; then the disk's Primary moves under it.
  await waitFor(async () => ticks(await consoleOf(c, 'web')).length >= 10, 90_000, `10 ticks\n${c.describe()}`);
  const pauses: number[] = [];
  for (let i = 0; i < 10; i++) {
    const to = i % 2 === 0 ? 'bravo' : 'alpha';
    const before = ticks(await consoleOf(c, 'web')).pop()!.n;
    const r = await c.duet(to, ['resource', 'primary', 'a', '--handover'], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, `handover ${i + 1} to ${to}\n${r.describe()}\n${c.describe()}`);
    const m = /vm web paused (\d+) ms/.exec(r.stdout);
    assert.ok(m, `${r.stdout}\n${c.describe()}`);
    pauses.push(Number(m[1]));
    const s = await c.status(to);
    assert.equal(s.role, 'Primary');
    // The guest goes on writing through the new Primary.
    await waitFor(async () => ticks(await consoleOf(c, 'web')).pop()!.n >= before + 3, 60_000, `ticks after handover ${i + 1}\n${c.describe()}`);
  }
  const text = await consoleOf(c, 'web');
  const all = ticks(text);
  assert.equal(new Set(all.map((x) => x.boot)).size, 1, 'the guest never rebooted');
  for (let i = 1; i < all.length; i++) assert.equal(all[i].n, all[i - 1].n + 1, `ticks go on without a gap at ${all[i - 1].n}`);
  assert.deepEqual(text.split('\n').filter((l) => l.includes('ERROR')), [], 'no guest-visible error');
  const vms = JSON.parse((await c.duet('alpha', ['vm', 'list', '--json'])).stdout) as { vms: VmInfo[] };
  assert.equal(vms.vms[0].state, 'running');
  assert.equal(vms.vms[0].node, 'bravo');
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
