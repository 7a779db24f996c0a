/**
 * VMs that run on one node from the other node's exports (their resource
 * Primary there), when that other node dies. The survivor declares it
 * dead, takes its resource over, and restarts those guests from its own
 * exports: writes the dead server had not flushed may be gone with it (a
 * thin pool's new mappings commit at a flush), so the guests restart as
 * after a crash of their disk, and each boot check finds every write the
 * guest had flushed. The ways there:
 * - the host goes silent (every packet dropped, no RST: the VM's requests
 *   hang) and its daemon dies;
 * - the daemon dies with its kernel up (RST): the VMs pause on the error,
 *   and their recovery must not move them onto the survivor's exports on
 *   its own (found by review: a guest resumed there would be told its next
 *   flush made durable what the dead server lost);
 * - the VM was migrating to the node that dies (a rejoin moving it back):
 *   the migration is cancelled, the guest restarted;
 * - the serving node's main address dies but its heartbeat's second path
 *   lives: it is not silent, and nothing it serves is written on its side,
 *   but its peer says its VMs cannot reach it: it yields, and is taken
 *   over (found by review 2).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Cleanup, tmpDir, type AfterContext } from '../e2e/harness.js';
import { ADDRESS, cut, inSync, iptablesSkip, makeCluster, waitStatus, type Cluster } from '../e2e/cluster-harness.js';
import { buildDemoGuest, DEMO_GUEST_APPEND } from '../../src/vm/demo-guest.js';
import { consoleOf, guestErrors, ticks, vmList, vmSkip, waitFor, waitTicks } from '../vm/vm-harness.js';
import type { EventRecord } from '../../src/cluster/events.js';

const skip = vmSkip || iptablesSkip();

/** alpha Primary of a with the witness; `vms` run on bravo (their prefer node) from alpha's exports, ticking. */
async function servedByAlpha(t: AfterContext, vms: string[], extra: string[] = [], heartbeatAddresses = false): Promise<{ c: Cluster; boots: Map<string, string> }> {
  const guest = await buildDemoGuest(tmpDir(t, 'duet-vm-guest-'));
  const c = await makeCluster(t, {
    witness: true,
    heartbeatAddresses,
    diskBytes: 128 * 1024 * 1024,
    extra: ['vms:', ...vms.map((v) => `  ${v}: { disks: [pa/${v}], memory: 128M, prefer: bravo, boot: { kernel: ${guest.kernel}, initrd: ${guest.initrd}, append: "${DEMO_GUEST_APPEND}" } }`), ...extra],
  });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => inSync(s) && s.role === 'Primary', 60_000);
  for (const v of vms) assert.equal((await c.duet('alpha', ['vol', 'create', `pa/${v}`, '--size', '16M'])).code, 0);
  const boots = new Map<string, string>();
  for (const v of vms) {
    await waitFor(async () => (await vmList(c, 'bravo')).find((x) => x.name === v)?.node === 'bravo', 120_000, () => `${v} running on bravo\n${c.describe()}`);
    await waitFor(async () => ticks(await consoleOf(c, 'bravo', v)).length >= 3, 90_000, () => `${v} ticking`);
    boots.set(v, ticks(await consoleOf(c, 'bravo', v))[0].boot);
  }
  return { c, boots };
}

/** Every packet to and from alpha's main address dropped (bravo, the witness, and the QEMUs, which connect from 127.0.0.1); `cleanup` heals. */
async function silence(cleanup: Cleanup): Promise<void> {
  const tag = `duet-served-by-lost-${process.pid}`;
  for (const other of [ADDRESS.bravo, ADDRESS.witness, '127.0.0.1']) await cut(cleanup, ADDRESS.alpha, other, tag);
}

/** Each VM runs on bravo again, a new boot ticking, no guest error (its boot check passed); the takeover says it restarted them. */
async function restartedOnBravo(c: Cluster, boots: Map<string, string>, since: number): Promise<void> {
  await waitStatus(c, 'bravo', 'bravo takes a over', (s) => s.role === 'Primary', 60_000);
  for (const [v, boot] of boots) {
    let text = '';
    await waitFor(
      async () => {
        text = await consoleOf(c, 'bravo', v);
        return ticks(text).filter((x) => x.boot !== boot).length >= 5;
      },
      150_000,
      () => `${v} ticking again after a new boot\n${text.slice(-2000)}\n${c.describe()}`,
    );
    assert.deepEqual(guestErrors(text), [], text.slice(-3000));
    const info = (await vmList(c, 'bravo')).find((x) => x.name === v);
    assert.equal(info?.node, 'bravo');
    assert.equal(info?.state, 'running');
  }
  const r = await c.duet('bravo', ['events', '--json']);
  const ev = r.stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as EventRecord).filter((e) => Date.parse(e.time) >= since);
  for (const v of boots.keys()) {
    assert.ok(ev.some((e) => e.event === 'vm-restarting' && e.vm === v && e.servedBy === 'alpha'), `${v}: ${ev.map((e) => `${e.event}${e.vm ? ` ${String(e.vm)}` : ''}`).join(', ')}`);
  }
  assert.ok(!ev.some((e) => e.event === 'vm-disks-reconnected'), 'no guest went on over the lost server\'s data');
  const done = ev.find((e) => e.event === 'failover-done');
  for (const v of boots.keys()) assert.ok(done && (done.details as string[]).some((d) => d.startsWith(`${v}: ran on bravo from alpha's exports: restarted`)), JSON.stringify(done));
}

test('the node serving a VM running on its peer dies (no RST): the peer takes the resource over and restarts the guest from its own exports; the guest finds every flushed write', { skip, timeout: 300_000 }, async (t) => {
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  const { c, boots } = await servedByAlpha(t, ['web']);
  const cutAt = Date.now();
  // alpha's host goes silent: everything to and from its address dropped, then its daemon dies.
  await silence(cleanup);
  await c.kill('alpha', 'SIGKILL');
  await restartedOnBravo(c, boots, cutAt);
});

test('the daemon serving two VMs on its peer is killed (RST): the VMs pause, and neither goes on over the survivor\'s exports: both restart', { skip, timeout: 400_000 }, async (t) => {
  const { c, boots } = await servedByAlpha(t, ['web', 'db']);
  const killedAt = Date.now();
  await c.kill('alpha', 'SIGKILL');
  await restartedOnBravo(c, boots, killedAt);
});

test('a VM migrating to the node that dies (no RST): the migration is cancelled and the guest restarts on the survivor', { skip, timeout: 300_000 }, async (t) => {
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  const { c, boots } = await servedByAlpha(t, ['web'], ['migration: { bandwidth: 2M }']);
  const migrating = c.duet('bravo', ['vm', 'migrate', 'web', '--to', 'alpha'], { timeoutMs: 240_000 });
  await waitFor(async () => (await vmList(c, 'bravo'))[0]?.state === 'migrating', 30_000, () => 'web migrating');
  await new Promise((r) => setTimeout(r, 500));
  const cutAt = Date.now();
  await silence(cleanup);
  await c.kill('alpha', 'SIGKILL');
  await restartedOnBravo(c, boots, cutAt);
  const m = await migrating;
  assert.equal(m.code, 1, m.describe());
  assert.match(m.stderr, /migration to alpha failed/);
});

test('the serving node\'s main address dies, its heartbeat\'s second path lives, and only its peer\'s VM uses it: the peer says its VM is stuck, the node yields, the peer takes over and restarts the guest', { skip, timeout: 300_000 }, async (t) => {
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  const { c, boots } = await servedByAlpha(t, ['web'], [], true);
  const cutAt = Date.now();
  await silence(cleanup);
  await restartedOnBravo(c, boots, cutAt);
  const r = await c.duet('bravo', ['events', '--json']);
  const lost = r.stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as EventRecord).find((e) => e.event === 'node-lost' && Date.parse(e.time) >= cutAt);
  assert.match(String(lost?.why), /cannot serve/, JSON.stringify(lost));
});
