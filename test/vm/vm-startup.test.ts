/**
 * "When the cluster comes up each VM starts on its prefer node (or the
 * other one if that is down)", with real daemons, QEMU and the demo guest:
 * - a prefer node that stops answering while its VM runs is not replaced
 *   by a start elsewhere (that is failover's, after fencing);
 * - the other node restarted without it starts the VM itself after
 *   `startup.waitForPeer`, once Primary, when nothing uses the VM's disks;
 * - the prefer node coming back to life with its old QEMU, which cannot
 *   reach its disks (paused by werror=stop), ends that stale copy instead
 *   of resuming it: two copies never write.
 * bravo "freezes" (SIGSTOP of its daemon and QEMU: a hung machine) and the
 * stale QEMU's reconnection is refused by iptables (new connections to the
 * exports port), as across a partition.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { Cluster } from '../e2e/cluster-harness.js';
import { haveProgram, run } from '../e2e/harness.js';
import { consoleOf, guestErrors, ticks, vmCluster, vmList, vmSkip, waitFor, waitTicks } from './vm-harness.js';

const skip = vmSkip || (process.env.CI !== 'true' && (process.getuid?.() !== 0 || !haveProgram('iptables')) ? 'needs root and iptables' : false);

function qemuPid(c: Cluster, node: string): number | undefined {
  try {
    const pid = Number(fs.readFileSync(path.join(c.dir, `home-${node}`, 'vms', 'web', 'qemu.pid'), 'utf8').trim());
    process.kill(pid, 0);
    return pid;
  } catch {
    return undefined;
  }
}

function logOf(c: Cluster, node: string): string {
  const p = c.procs.get(node);
  return p ? p.out() + p.err() : '';
}

function signal(pids: (number | undefined)[], sig: NodeJS.Signals): void {
  for (const pid of pids) if (pid !== undefined) process.kill(pid, sig);
}

test('the cluster comes up without the VM\'s prefer node: the other node starts it once Primary; the prefer node back ends its stale paused copy', { skip, timeout: 300_000 }, async (t) => {
  const c = await vmCluster(t, 'prefer: bravo', ['startup: { waitForPeer: 3 }']);
  await waitFor(async () => (await vmList(c, 'alpha'))[0].state === 'running', 60_000, () => `vm web running\n${c.describe()}`);
  assert.equal((await vmList(c, 'alpha'))[0].node, 'bravo');
  const first = await waitTicks(c, 'alpha', 0, 3);
  const stale = qemuPid(c, 'bravo');
  const bravoDaemon = c.procs.get('bravo')!.child.pid;
  assert.ok(stale && bravoDaemon);
  // Whatever happens below, bravo is not left frozen.
  t.after(() => {
    try {
      signal([bravoDaemon, stale], 'SIGCONT');
    } catch {
      // gone
    }
  });

  // bravo hangs, its VM with it. alpha heard bravo before: it starts nothing.
  signal([bravoDaemon, stale], 'SIGSTOP');
  await new Promise((r) => setTimeout(r, 6000));
  assert.equal(qemuPid(c, 'alpha'), undefined, "no second copy while bravo's may run");

  // alpha restarts without bravo and is made Primary alone: the cluster comes up without the VM's prefer node.
  await c.kill('alpha', 'SIGTERM');
  await c.start('alpha');
  let p = await c.duet('alpha', ['resource', 'primary', 'a']);
  if (p.code !== 0) p = await c.duet('alpha', ['resource', 'primary', 'a', '--force']);
  assert.equal(p.code, 0, p.describe());
  await waitFor(async () => qemuPid(c, 'alpha') !== undefined, 60_000, () => `web started on alpha\n${c.describe()}`);
  assert.match(logOf(c, 'alpha'), /vm web: bravo \(where it prefers to run\) has not answered since alpha came up \d+ s ago, and nothing uses its disks: starting it on alpha/);
  await waitFor(async () => ticks(await consoleOf(c, 'alpha')).some((x) => x.boot !== first[0].boot), 90_000, () => `a new boot on alpha\n${c.describe()}`);

  // bravo comes back to life cut off from the exports (new connections refused): its QEMU's next write fails,
  // werror=stop pauses it, and bravo's daemon, finding the VM running on alpha, ends it.
  const rule = ['INPUT', '-p', 'tcp', '-d', '127.0.0.2', '--dport', String(c.exportsPort), '--syn', '-j', 'REJECT', '--reject-with', 'tcp-reset', '-m', 'comment', '--comment', 'duet-vm-startup'];
  const r = await run('iptables', ['-I', ...rule]);
  assert.equal(r.code, 0, r.describe());
  let blocked = true;
  const unblock = async (): Promise<void> => {
    if (blocked) await run('iptables', ['-D', ...rule]);
    blocked = false;
  };
  t.after(unblock);
  signal([stale, bravoDaemon], 'SIGCONT');
  await waitFor(async () => qemuPid(c, 'bravo') === undefined, 60_000, () => `bravo's stale copy ended\n${c.describe()}`);
  assert.match(logOf(c, 'bravo'), new RegExp(`vm web: found paused here \\(QEMU ${stale}\\) while it runs on alpha: ending this stale copy`));
  await unblock();
  await new Promise((r) => setTimeout(r, 3000));
  assert.equal(qemuPid(c, 'bravo'), undefined, 'still one copy once bravo reaches the exports again');
  const vms = await vmList(c, 'bravo');
  assert.equal(vms[0].node, 'alpha');
  assert.equal(vms[0].state, 'running');
  const seen = ticks(await consoleOf(c, 'alpha'));
  await waitTicks(c, 'alpha', seen[seen.length - 1].n, 5);
  assert.deepEqual(guestErrors(await consoleOf(c, 'alpha')), []);
});
