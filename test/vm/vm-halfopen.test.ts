/**
 * A handover while the old Primary's replies to the VM never arrive (a
 * half-open connection: packets dropped, no RST, as with a dead switch
 * port). QMP `stop` would wait for the stuck requests forever; the daemon
 * cuts the VM's NBD connections out of band (yank), the failed requests are
 * kept by werror=stop and retried on the new Primary. The guest sees a
 * pause, no error, and its pattern verifies.
 *
 * TODO (known gap of a *planned* handover whose old Primary is alive but
 * cannot answer the VM): the yank works (the pause no longer hangs), but
 * moving the disk then fails: blockdev-reopen flushes the old nbd node
 * first, and its failed writes left it dirty, so the flush goes to a server
 * that cannot answer. Here the data is safe (the old Primary's demotion
 * flushed it), so a graph where the old node can be dropped without a flush
 * (a quorum node's x-blockdev-change, or a mirror swap, both measured in
 * issue 9) would finish the move. When the server *died* (a takeover), a
 * swap would not be safe (what it had not flushed may be gone): the
 * survivor restarts the guest instead (test/failover/served-by-lost.test.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { haveProgram, run } from '../e2e/harness.js';
import { NbdClient } from '../../src/nbd/client.js';
import { verifyPattern } from '../../src/vm/demo-guest.js';
import { consoleOf, guestErrors, ticks, vmCluster, vmList, vmSkip, waitFor, waitTicks } from './vm-harness.js';

const skip = vmSkip || (process.getuid?.() !== 0 ? 'needs root (iptables)' : !haveProgram('iptables') && process.env.CI !== 'true' ? 'iptables is not installed' : false);

test('a handover whose old Primary no longer answers the VM (half-open NBD connection): yanked, moved, no guest error', { skip, todo: 'a planned handover off a live server that cannot answer the VM needs a swap without a flush of the old node (quorum/mirror)', timeout: 240_000 }, async (t) => {
  const c = await vmCluster(t, 'prefer: bravo');
  let seen = await waitTicks(c, 'alpha', 0, 10);
  const boot = seen[0].boot;
  // alpha's NBD replies are dropped on the way out: the VM's requests hang, no RST.
  const rule = ['OUTPUT', '-s', '127.0.0.2', '-p', 'tcp', '--sport', String(c.exportsPort), '-j', 'DROP', '-m', 'comment', '--comment', 'duet-test-halfopen'];
  const added = await run('iptables', ['-I', ...rule]);
  assert.equal(added.code, 0, added.describe());
  let removed = false;
  const unblock = async (): Promise<void> => {
    if (removed) return;
    removed = true;
    await run('iptables', ['-D', ...rule]);
  };
  t.after(unblock);
  await new Promise((r) => setTimeout(r, 1500));
  const r = await c.duet('bravo', ['resource', 'primary', 'a', '--handover'], { timeoutMs: 120_000 });
  await unblock();
  assert.equal(r.code, 0, `${r.describe()}\n${c.describe()}`);
  assert.match(r.stdout, /vm web paused \d+ ms/, c.describe());
  assert.match(c.describe(), /vm-disks-yanked/, 'the stuck connection was yanked');
  seen = await waitTicks(c, 'alpha', seen[seen.length - 1].n, 10);
  const text = await consoleOf(c, 'alpha');
  assert.deepEqual(guestErrors(text), []);
  assert.deepEqual([...new Set(ticks(text).map((x) => x.boot))], [boot]);
  const vms = await vmList(c, 'alpha');
  assert.equal(vms[0].state, 'running');
  const stop = await c.duet('alpha', ['vm', 'stop', 'web'], { timeoutMs: 60_000 });
  assert.equal(stop.code, 0, stop.describe());
  await waitFor(async () => (await vmList(c, 'alpha'))[0].state === 'stopped', 30_000, () => 'vm web stopped');
  const nbd = await NbdClient.connect({ host: '127.0.0.3', port: c.exportsPort, exportName: 'web' });
  const report = await verifyPattern((offset, length) => nbd.read(offset, length));
  await nbd.close();
  assert.deepEqual(report.errors, []);
});
