/**
 * The daemon serving a VM's disk dies and comes straight back (no
 * failover: no witness here, and it is back at once). Its pool lost the
 * new mappings it had not committed (dm-thin's semantics: a flush or the
 * commit period commits them), so a guest that went on would be told by
 * its next flush that writes are durable which are gone. Restarted by its
 * service manager (SIGTERM) the pool closed cleanly and the guest goes on,
 * the same boot; killed (-9), the guest restarts, as after a crash of its
 * disk, whether it runs on the peer or beside the daemon that died.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { EventRecord } from '../../src/cluster/events.js';
import type { Cluster } from '../e2e/cluster-harness.js';
import { consoleOf, guestErrors, ticks, vmCluster, vmList, vmSkip, waitFor, waitTicks } from './vm-harness.js';
import { qemusUnder } from './manager-harness.js';

async function events(c: Cluster, node: string, since: number): Promise<EventRecord[]> {
  const r = await c.duet(node, ['events', '--json']);
  assert.equal(r.code, 0, r.describe());
  return r.stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as EventRecord).filter((e) => Date.parse(e.time) >= since);
}

/** web (on `on`) restarts: a new boot ticking, no guest error, a vm-restarting event naming the reopened pool. */
async function restarted(c: Cluster, on: string, boot: string, since: number): Promise<void> {
  let text = '';
  await waitFor(
    async () => {
      text = await consoleOf(c, on);
      return ticks(text).filter((x) => x.boot !== boot).length >= 5;
    },
    150_000,
    () => `web ticking after a new boot\n${text.slice(-2000)}\n${c.describe()}`,
  );
  assert.deepEqual(guestErrors(text), [], text.slice(-3000));
  const ev = await events(c, on, since);
  const r = ev.find((e) => e.event === 'vm-restarting' && e.vm === 'web');
  assert.ok(r && /pool pa on alpha was reopened after its daemon died with it open/.test(String(r.why)), ev.map((e) => `${e.event} ${String(e.why ?? '')}`).join('\n'));
  assert.ok(!ev.some((e) => e.event === 'vm-disks-reconnected' && e.vm === 'web'), 'it did not go on over the reopened pool');
  const vms = await vmList(c, on);
  assert.equal(vms[0].node, on);
  assert.equal(vms[0].state, 'running');
}

test('a VM on the peer: its disk server restarted gracefully (twice), the guest goes on (same boot); killed -9 and back at once, the guest restarts on the peer, and its prefer node never starts a second copy', { skip: vmSkip, timeout: 400_000 }, async (t) => {
  // web prefers alpha (alpha decides where it starts), and is moved to bravo: alpha serves its disk to bravo.
  const c = await vmCluster(t, 'prefer: alpha');
  let seen = await waitTicks(c, 'alpha', 0, 3);
  const m = await c.duet('alpha', ['vm', 'migrate', 'web', '--to', 'bravo'], { timeoutMs: 120_000 });
  assert.equal(m.code, 0, m.describe());
  seen = await waitTicks(c, 'bravo', seen[seen.length - 1].n, 3);
  const boot = seen[0].boot;
  for (let i = 0; i < 2; i++) {
    await c.kill('alpha', 'SIGTERM');
    await c.start('alpha');
    seen = await waitTicks(c, 'bravo', seen[seen.length - 1].n, 5);
  }
  assert.deepEqual([...new Set(ticks(await consoleOf(c, 'bravo')).map((x) => x.boot))], [boot], 'one boot: clean closes let the guest go on');
  const killedAt = Date.now();
  await c.kill('alpha', 'SIGKILL');
  await c.start('alpha');
  // While the guest restarts on bravo, alpha (its prefer node, which decides) must not start one too (review 3 H1).
  let most = 0;
  const watch = setInterval(() => (most = Math.max(most, qemusUnder(c.dir).length)), 100);
  try {
    await restarted(c, 'bravo', boot, killedAt);
    await new Promise((r) => setTimeout(r, 5000)); // alpha's autostart has had its rounds
  } finally {
    clearInterval(watch);
  }
  assert.equal(most, 1, 'never two QEMUs of web');
  assert.equal(qemusUnder(c.dir).length, 1);
});

test('a VM beside its disk server: the daemon killed -9 (the QEMU lives on) and back at once: the guest restarts there', { skip: vmSkip, timeout: 300_000 }, async (t) => {
  const c = await vmCluster(t, 'prefer: alpha');
  const seen = await waitTicks(c, 'alpha', 0, 5);
  const killedAt = Date.now();
  await c.kill('alpha', 'SIGKILL');
  await c.start('alpha');
  await restarted(c, 'alpha', seen[0].boot, killedAt);
});
