/**
 * VMs on a two-node cluster of real daemons (loopback addresses), real QEMU
 * (TCG here) and the demo guest, whose disk is a replicated volume exported
 * by the Primary: it boots by itself (VMs run unless stopped), its console
 * is read from any node, it survives a restart of the daemon that serves its
 * disk, migrates alpha → bravo → alpha without a reboot, powers off on
 * `vm stop` and stays off, starts on the other node, and its disk pattern
 * verifies from the host afterwards.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdClient } from '../../src/nbd/client.js';
import { verifyPattern } from '../../src/vm/demo-guest.js';
import { consoleOf, guestErrors, ticks, vmCluster, vmList, vmSkip, waitFor, waitTicks } from './vm-harness.js';

test('a VM on a replicated volume: boots by itself, console from any node, survives a daemon restart, migrates there and back without a reboot, stops and stays stopped, starts elsewhere; its pattern verifies', { skip: vmSkip, timeout: 240_000 }, async (t) => {
  const c = await vmCluster(t, 'cpus: 1, prefer: alpha');
  let vms: Awaited<ReturnType<typeof vmList>>;

  // It starts by itself on its prefer node, and any node tells where it runs.
  await waitFor(async () => (await vmList(c, 'bravo'))[0].state === 'running', 60_000, () => `vm web running\n${c.describe()}`);
  vms = await vmList(c, 'bravo');
  assert.equal(vms[0].node, 'alpha');
  assert.equal(vms[0].memoryBytes, 128 * 1024 * 1024);
  const pid = vms[0].pid;
  let seen = await waitTicks(c, 'bravo', 0, 10);
  const boot = seen[0].boot;
  const again = await c.duet('bravo', ['vm', 'start', 'web']);
  assert.equal(again.code, 0, again.describe());
  assert.match(again.stdout, /vm web is already running on alpha/);

  // The daemon serving the disk (and running the VM) restarts: the VM goes on, same QEMU, no guest error.
  await c.kill('alpha', 'SIGTERM');
  await c.start('alpha');
  seen = await waitTicks(c, 'alpha', seen[seen.length - 1].n, 10);
  vms = await vmList(c, 'alpha');
  assert.equal(vms[0].pid, pid, 'the same QEMU runs on (re-attached)');
  assert.equal(vms[0].state, 'running');

  // Live migration there and back: the guest does not reboot, its console goes on.
  for (const to of ['bravo', 'alpha']) {
    const m = await c.duet('alpha', ['vm', 'migrate', 'web', '--to', to], { timeoutMs: 120_000 });
    assert.equal(m.code, 0, m.describe());
    assert.match(m.stdout, new RegExp(`vm web migrated from \\w+ to ${to}: \\d+ ms, guest paused \\d+ ms`));
    vms = await vmList(c, 'alpha');
    assert.equal(vms[0].node, to);
    seen = await waitTicks(c, to === 'alpha' ? 'bravo' : 'alpha', seen[seen.length - 1].n, 5);
  }
  const text = await consoleOf(c, 'bravo');
  const all = ticks(text).filter((x) => x.boot === boot);
  assert.equal(new Set(ticks(text).map((x) => x.boot)).size, 1, 'one boot: the guest never restarted');
  for (let i = 1; i < all.length; i++) assert.equal(all[i].n, all[i - 1].n + 1, `the console goes on without a gap or a repeat at tick ${all[i - 1].n}`);
  assert.deepEqual(guestErrors(text), []);
  const bad = await c.duet('bravo', ['vm', 'migrate', 'web', '--to', 'alpha']);
  assert.equal(bad.code, 1, bad.describe());
  assert.match(bad.stderr, /vm web already runs on alpha: nothing to migrate/);

  // vm stop: the guest powers off (not killed), and it stays off.
  const stop = await c.duet('bravo', ['vm', 'stop', 'web'], { timeoutMs: 60_000 });
  assert.equal(stop.code, 0, stop.describe());
  assert.match(stop.stdout, /^vm web stopped on alpha\n$/);
  await new Promise((r) => setTimeout(r, 5000));
  vms = await vmList(c, 'alpha');
  assert.equal(vms[0].state, 'stopped', 'a stopped VM is not started again by itself');
  // Read through bravo, which ran it before: the newest console kept (alpha's) is shown.
  const lastTick = ticks(await consoleOf(c, 'bravo')).pop()!.n;
  assert.equal(lastTick, ticks(await consoleOf(c, 'alpha')).pop()!.n);

  // The disk holds the guest's pattern, whole, up to its last write.
  const nbd = await NbdClient.connect({ host: '127.0.0.2', port: c.exportsPort, exportName: 'web' });
  const report = await verifyPattern((offset, length) => nbd.read(offset, length));
  await nbd.close();
  assert.deepEqual(report.errors, []);
  assert.ok(report.maxSeq >= lastTick - 1, `the pattern reaches the last tick (${report.maxSeq} vs ${lastTick})`);

  // Started on the other node: a new boot, the disks still from alpha (the Primary).
  const start = await c.duet('alpha', ['vm', 'start', 'web', '--on', 'bravo'], { timeoutMs: 60_000 });
  assert.equal(start.code, 0, start.describe());
  assert.match(start.stdout, /vm web is running on bravo/);
  await waitFor(async () => ticks(await consoleOf(c, 'alpha')).filter((x) => x.boot !== boot).length >= 5, 90_000, () => `5 ticks of a new boot on bravo\n${c.describe()}`);
  const kill = await c.duet('alpha', ['vm', 'stop', 'web', '--force']);
  assert.equal(kill.code, 0, kill.describe());
  assert.match(kill.stdout, /vm web stopped on bravo \(killed\)/);

  // Bad input: one line each, the right exit code.
  const unknown = await c.duet('alpha', ['vm', 'start', 'nope']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /^duet: no VM named nope in .* \(VMs: web\)\n$/);
  const noNode = await c.duet('alpha', ['vm', 'start', 'web', '--on', 'charlie']);
  assert.equal(noNode.code, 2);
  assert.match(noNode.stderr, /no node named charlie/);
  const notRunning = await c.duet('alpha', ['vm', 'migrate', 'web', '--to', 'bravo']);
  assert.equal(notRunning.code, 1);
  assert.match(notRunning.stderr, /vm web is not running: start it where you want it/);
});
