/**
 * What goes wrong around a running VM: a migration whose destination QEMU
 * dies half-way leaves the VM running where it was; one whose source QEMU
 * dies half-way leaves no copy running (the destination exits by itself);
 * the balloon squeezes memory within minMemory..memory; `vm xl-config`
 * prints a Xen config for the volume as imported by nbd-client; a full
 * pool pauses the VM until there is room again.
 * Migrations are capped at 16 MiB/s here (migration.bandwidth) so that
 * "half-way" lasts seconds.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { Cluster } from '../e2e/cluster-harness.js';
import { run } from '../e2e/harness.js';
import { consoleOf, guestErrors, ticks, vmCluster, vmList, vmSkip, waitFor, waitTicks } from './vm-harness.js';

function qemuPid(c: Cluster, node: string): number | undefined {
  try {
    return Number(fs.readFileSync(path.join(c.dir, `home-${node}`, 'vms', 'web', 'qemu.pid'), 'utf8').trim());
  } catch {
    return undefined;
  }
}

/** What `node`'s daemon has logged so far. */
function logOf(c: Cluster, node: string): string {
  const p = c.procs.get(node);
  return p ? p.out() + p.err() : '';
}

/** Start `vm migrate web --to to`, wait until the VM is migrating and `waitMs` more, then SIGKILL `victim`'s QEMU. */
async function migrateAndKill(c: Cluster, to: string, victim: string, waitMs: number): Promise<Awaited<ReturnType<Cluster['duet']>>> {
  const migrating = c.duet('alpha', ['vm', 'migrate', 'web', '--to', to], { timeoutMs: 120_000 });
  await waitFor(async () => (await vmList(c, 'alpha'))[0].state === 'migrating' && qemuPid(c, to) !== undefined, 30_000, () => `vm web migrating\n${c.describe()}`);
  await new Promise((r) => setTimeout(r, waitMs));
  const pid = qemuPid(c, victim);
  assert.ok(pid, `${victim}'s QEMU pid`);
  process.kill(pid, 'SIGKILL');
  return migrating;
}

test('migration faults: the destination dies half-way (the VM runs on at the source), the source dies half-way (no copy runs anywhere); memory squeeze; xl-config', { skip: vmSkip, timeout: 300_000 }, async (t) => {
  const c = await vmCluster(t, 'minMemory: 96M, prefer: alpha', ['  ghost: { disks: [pa/ghost], memory: 128M, prefer: bravo }', 'migration: { bandwidth: 4M }']);
  await waitFor(async () => (await vmList(c, 'alpha'))[0].state === 'running', 60_000, () => `vm web running\n${c.describe()}`);
  let seen = await waitTicks(c, 'alpha', 0, 5);
  const boot = seen[0].boot;

  // A VM whose volume does not exist: one line naming it, exit 1, nothing else changes.
  const ghost = await c.duet('alpha', ['vm', 'start', 'ghost'], { timeoutMs: 60_000 });
  assert.equal(ghost.code, 1, ghost.describe());
  assert.match(ghost.stderr, /^duet: vm ghost: a disk's volume is not exported: pa\/ghost \(from alpha\): does it exist\? \(vol list; vol create\)\n$/);
  assert.equal((await vmList(c, 'alpha')).find((v) => v.name === 'ghost')?.state, 'stopped');

  // Memory: squeezed to minMemory by the balloon, refused below it, given back.
  const squeeze = await c.duet('bravo', ['vm', 'set-memory', 'web', '96M'], { timeoutMs: 60_000 });
  assert.equal(squeeze.code, 0, squeeze.describe());
  let vms = (await vmList(c, 'bravo')).filter((v) => v.name === 'web');
  assert.ok(Math.abs(vms[0].memoryBytes - 96 * 1024 * 1024) <= 4 * 1024 * 1024, `memory ${vms[0].memoryBytes}`);
  const tooLow = await c.duet('alpha', ['vm', 'set-memory', 'web', '64M']);
  assert.equal(tooLow.code, 2, tooLow.describe());
  assert.match(tooLow.stderr, /^duet: vm web: 64M is outside 96M \(minMemory\) \.\. 128M \(memory, the boot size\)\n$/);
  const back = await c.duet('alpha', ['vm', 'set-memory', 'web', '128M'], { timeoutMs: 60_000 });
  assert.equal(back.code, 0, back.describe());

  // xl-config: the volume as nbd-client imports it from the Primary.
  const xl = await c.duet('bravo', ['vm', 'xl-config', 'web']);
  assert.equal(xl.code, 0, xl.describe());
  assert.match(xl.stdout, new RegExp(`nbd-client -N web 127\\.0\\.0\\.2 ${c.exportsPort} /dev/nbd0`));
  assert.match(xl.stdout, /^disk = \['phy:\/dev\/nbd0,xvda,w'\]$/m);
  assert.match(xl.stdout, /^memory = 128$/m);

  // The destination dies half-way: the migration fails, the guest runs on at alpha, no reboot, no error.
  const r1 = await migrateAndKill(c, 'bravo', 'bravo', 500);
  assert.equal(r1.code, 1, r1.describe());
  assert.match(r1.stderr, /migration to bravo failed .*; it still runs on alpha/);
  vms = await vmList(c, 'bravo');
  assert.equal(vms[0].node, 'alpha');
  assert.equal(vms[0].state, 'running');
  seen = await waitTicks(c, 'alpha', seen[seen.length - 1].n, 5);
  assert.deepEqual([...new Set(ticks(await consoleOf(c, 'alpha')).map((x) => x.boot))], [boot]);
  assert.deepEqual(guestErrors(await consoleOf(c, 'alpha')), []);

  // A full pool: the guest's writes after a snapshot need room the pool does not have. The VM pauses (werror=stop:
  // the guest sees no error) with one line naming the pool, and runs on by itself once there is room again.
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/fill', '--size', '256M'])).code, 0);
  await run('qemu-io', ['-f', 'raw', c.url('alpha', 'fill'), '-c', 'write -P 0xab 0 200M'], { timeoutMs: 60_000 });
  const snap = await c.duet('alpha', ['vol', 'snapshot', 'pa/web', 'pa/web-snap']);
  assert.equal(snap.code, 0, snap.describe());
  await waitFor(async () => (await vmList(c, 'bravo'))[0].state === 'paused', 30_000, () => `vm web paused on the full pool\n${c.describe()}`);
  await waitFor(async () => /"event":"vm-disk-full"/.test(logOf(c, 'alpha')), 10_000, () => `the vm-disk-full event\n${c.describe()}`);
  assert.match(logOf(c, 'alpha'), /vm web: paused: its disk pa\/web cannot be written, pool pa is full: extend it \(pool extend pa DEVICE\) or make room/);
  await new Promise((r) => setTimeout(r, 3000));
  assert.doesNotMatch(logOf(c, 'alpha'), /"event":"vm-disks-reconnected"/, 'a full pool is not a server gone: no reconnecting');
  assert.equal((await c.duet('alpha', ['vol', 'remove', 'pa/fill'])).code, 0);
  await waitFor(async () => (await vmList(c, 'bravo'))[0].state === 'running', 30_000, () => `vm web running again\n${c.describe()}`);
  seen = await waitTicks(c, 'alpha', seen[seen.length - 1].n, 5);
  assert.equal((await c.duet('alpha', ['vol', 'remove', 'pa/web-snap'])).code, 0);
  assert.deepEqual([...new Set(ticks(await consoleOf(c, 'alpha')).map((x) => x.boot))], [boot]);
  assert.deepEqual(guestErrors(await consoleOf(c, 'alpha')), []);

  // The source dies half-way: the destination's QEMU ends by itself; the VM runs nowhere.
  const r2 = await migrateAndKill(c, 'bravo', 'alpha', 500);
  assert.equal(r2.code, 1, r2.describe());
  await waitFor(async () => qemuPid(c, 'bravo') === undefined && qemuPid(c, 'alpha') === undefined, 30_000, () => `both QEMUs gone\n${c.describe()}`);
  vms = await vmList(c, 'bravo');
  assert.ok(vms[0].state === 'stopped' || vms[0].state === 'failed', `vm web is ${vms[0].state} on ${vms[0].node}`);
  assert.notEqual(vms[0].node, 'bravo');
  // A crashed VM waits for the admin: nothing starts it again by itself.
  await new Promise((r) => setTimeout(r, 5000));
  assert.equal(qemuPid(c, 'alpha') ?? qemuPid(c, 'bravo'), undefined, 'no copy was started');
});
