/**
 * A VM that runs on one node from the other node's exports (its resource
 * Primary there), when that other node dies without a word: its host is cut
 * off (every packet dropped, no RST: the VM's requests hang) and its daemon
 * killed. The survivor declares it dead, takes its resource over, and
 * restarts the guest from its own exports: writes the dead server had not
 * flushed may be gone with it, so the guest restarts as after a crash of
 * its disk, and its boot check finds every write it had flushed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Cleanup, tmpDir } from '../e2e/harness.js';
import { ADDRESS, cut, inSync, iptablesSkip, makeCluster, waitStatus } from '../e2e/cluster-harness.js';
import { buildDemoGuest, DEMO_GUEST_APPEND } from '../../src/vm/demo-guest.js';
import { consoleOf, guestErrors, ticks, vmList, vmSkip, waitFor, waitTicks } from '../vm/vm-harness.js';
import type { EventRecord } from '../../src/cluster/events.js';

test('the node serving a VM running on its peer dies (no RST): the peer takes the resource over and restarts the guest from its own exports; the guest finds every flushed write', { skip: vmSkip || iptablesSkip(), timeout: 300_000 }, async (t) => {
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  const guest = await buildDemoGuest(tmpDir(t, 'duet-vm-guest-'));
  const c = await makeCluster(t, {
    witness: true,
    diskBytes: 128 * 1024 * 1024,
    extra: ['vms:', `  web: { disks: [pa/web], memory: 128M, prefer: bravo, boot: { kernel: ${guest.kernel}, initrd: ${guest.initrd}, append: "${DEMO_GUEST_APPEND}" } }`],
  });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => inSync(s) && s.role === 'Primary', 60_000);
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/web', '--size', '16M'])).code, 0);
  // web runs on bravo (its prefer node), its disk served by alpha (Primary of a).
  await waitFor(async () => (await vmList(c, 'bravo'))[0]?.node === 'bravo', 90_000, () => `web running on bravo\n${c.describe()}`);
  const before = await waitTicks(c, 'bravo', 0, 5);
  const boot = before[0].boot;
  const cutAt = Date.now();
  // alpha's host goes silent: everything to and from its address dropped, then its daemon dies.
  const tag = `duet-served-by-lost-${process.pid}`;
  await cut(cleanup, ADDRESS.alpha, ADDRESS.bravo, tag);
  await cut(cleanup, ADDRESS.alpha, ADDRESS.witness, tag);
  await cut(cleanup, ADDRESS.alpha, '127.0.0.1', tag);
  await c.kill('alpha', 'SIGKILL');
  await waitStatus(c, 'bravo', 'bravo takes a over', (s) => s.role === 'Primary', 30_000);
  // The guest runs again on bravo, a new boot, and its boot check finds its flushed writes.
  let text = '';
  await waitFor(
    async () => {
      text = await consoleOf(c, 'bravo');
      return ticks(text).filter((x) => x.boot !== boot).length >= 5;
    },
    120_000,
    () => `web ticking again after a new boot\n${text.slice(-2000)}\n${c.describe()}`,
  );
  assert.deepEqual(guestErrors(text), [], text.slice(-3000));
  const vms = await vmList(c, 'bravo');
  assert.equal(vms[0].node, 'bravo');
  assert.equal(vms[0].state, 'running');
  const r = await c.duet('bravo', ['events', '--json']);
  const ev = r.stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as EventRecord).filter((e) => Date.parse(e.time) >= cutAt);
  const restarting = ev.find((e) => e.event === 'vm-restarting');
  assert.ok(restarting && restarting.vm === 'web' && restarting.servedBy === 'alpha', ev.map((e) => e.event).join(' '));
  const done = ev.find((e) => e.event === 'failover-done');
  assert.ok(done && (done.details as string[]).some((d) => /web: ran on bravo from alpha's exports: restarted/.test(d)), JSON.stringify(done));
});
