/**
 * The seed scenario of the cluster manager, end to end: two nodes in
 * network namespaces joined by a bridge, the witness and an SMTP server in
 * a third; resource a (pool pa) Primary on alpha, b (pool pb) on bravo;
 * two demo guests per node (128 MiB, TCG), each writing and verifying its
 * pattern; nodes.*.vmMemory 448M, so four VMs on one node are squeezed.
 *
 * In order, on one cluster: node death (alpha's namespace killed) and
 * takeover; rejoin with the same disk (only what changed resyncs, the VMs
 * go back live); partition (alpha cut off, alive: it fences itself before
 * bravo takes over, and none of its writes after the cut counts); disk
 * failure on alpha (EIO: its VMs run on, then move to bravo live); rejoin
 * with a new empty disk (full sync); drain of bravo.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { buildDemoGuest, DEMO_GUEST_APPEND } from '../../src/vm/demo-guest.js';
import { spawn } from 'node:child_process';
import os from 'node:os';
import { Cleanup, haveProgram, run, tmpDir, withTimeout } from '../e2e/harness.js';
import { NsCluster, netnsSkip, type NodeName } from './netns-harness.js';
import type { EventRecord } from '../../src/cluster/events.js';
import type { NodeResourceStatus } from '../../src/cluster/node.js';

const MiB = 1024 * 1024;
const VMS = { web1: 'alpha', web2: 'alpha', db1: 'bravo', db2: 'bravo' } as const;
type VmName = keyof typeof VMS;

function skip(): string | false {
  const ns = netnsSkip();
  if (ns) return ns;
  if (process.env.CI === 'true') return false;
  for (const p of ['qemu-system-x86_64', 'nbdkit', 'nbdfuse']) if (!haveProgram(p)) return `${p} is not installed`;
  return false;
}

function inSync(r: NodeResourceStatus): boolean {
  const p = r.peers[0];
  return r.disk === 'UpToDate' && p?.connection === 'Connected' && p.disk === 'UpToDate' && p.outOfSyncBytes === 0;
}

interface Tick {
  n: number;
  boot: string;
}

function ticks(text: string): Tick[] {
  return [...text.matchAll(/^tick (\d+) boot=([0-9a-f]{8})$/gm)].map((m) => ({ n: Number(m[1]), boot: m[2] }));
}

function errors(text: string): string[] {
  return text.split('\n').filter((l) => l.includes('ERROR'));
}

function eventsOf(list: EventRecord[], name: string, since = 0): EventRecord[] {
  return list.filter((e) => e.event === name && Date.parse(e.time) >= since);
}

test('seed scenario: node death, rejoin, partition, disk failure, rejoin with a new disk, drain', { skip: skip(), timeout: 900_000 }, async (t) => {
  const guest = await buildDemoGuest(tmpDir(t, 'duet-seed-guest-'));
  // Torn down last-in first-out: the cluster, then the FUSE mount, nbdkit, the directory.
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  // alpha's disk of resource a goes through nbdkit's error filter (EIO while FAIL exists), imported by nbdfuse.
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-seed-disk-'));
  cleanup.push('remove the disk directory', async () => fs.rmSync(base, { recursive: true, force: true }));
  const realA = path.join(base, 'alpha-a-real.img');
  fs.writeFileSync(realA, '');
  fs.truncateSync(realA, 128 * MiB);
  const failFile = path.join(base, 'FAIL');
  const sock = path.join(base, 'nbdkit.sock');
  const kit = spawn('nbdkit', ['-f', '-U', sock, '--filter=error', 'file', realA, 'error-rate=100%', `error-file=${failFile}`, 'error=EIO'], { stdio: 'ignore' });
  const kitExit = new Promise((resolve) => kit.once('exit', resolve));
  cleanup.push('stop nbdkit', async () => {
    kit.kill('SIGKILL');
    await kitExit;
  });
  const mnt = path.join(base, 'fuse');
  fs.mkdirSync(mnt);
  await waitUntil(() => fs.existsSync(sock), 10_000, 'nbdkit');
  const fuse = spawn('nbdfuse', [mnt, `nbd+unix:///?socket=${sock}`], { stdio: 'ignore' });
  const fuseExit = new Promise((resolve) => fuse.once('exit', resolve));
  cleanup.push('unmount nbdfuse', async () => {
    const r = await run('fusermount3', ['-u', mnt]);
    if (r.code !== 0) await run('fusermount3', ['-uz', mnt]);
    await withTimeout(fuseExit, 10_000, 'nbdfuse exit').catch(() => fuse.kill('SIGKILL'));
  });
  await waitUntil(() => fs.existsSync(path.join(mnt, 'nbd')) || fuse.exitCode !== null, 10_000, 'nbdfuse');

  const vm = (name: VmName, priority: number): string =>
    `  ${name}: { disks: [${VMS[name] === 'alpha' ? 'pa' : 'pb'}/${name}], memory: 128M, minMemory: 96M, prefer: ${VMS[name]}, priority: ${priority}, boot: { kernel: ${guest.kernel}, initrd: ${guest.initrd}, append: "${DEMO_GUEST_APPEND}" } }`;
  const c = await NsCluster.create(t, {
    vmMemory: '448M',
    disks: { alpha: { a: path.join(mnt, 'nbd') } },
    extra: ['vms:', vm('web1', 10), vm('web2', 5), vm('db1', 10), vm('db2', 5)],
  }, cleanup);
  await c.createMd();
  await c.startWitness();
  await c.startSmtp();
  await c.start('alpha');
  await c.start('bravo');
  await c.until(async () => (await c.resources('alpha')).resources.every(inSync), 90_000, 'the initial sync');
  for (const [name, node] of Object.entries(VMS)) {
    const r = await c.duet(node, ['vol', 'create', `${node === 'alpha' ? 'pa' : 'pb'}/${name}`, '--size', '16M']);
    assert.equal(r.code, 0, r.describe());
  }
  const consoleOf = async (name: VmName, via: NodeName = 'bravo'): Promise<string> => {
    const r = await c.duet(via, ['vm', 'console', name]);
    assert.equal(r.code, 0, r.describe());
    return r.stdout;
  };
  /**
   * Every VM runs where `where` says, and has ticked `n` times on its current boot; a boot in `stale`
   * does not count (the console kept from an earlier run on that node, before the new copy prints).
   */
  const allRun = async (where: Record<VmName, NodeName>, via: NodeName, n = 3, ms = 120_000, stale: Partial<Record<VmName, string[]>> = {}): Promise<Record<VmName, Tick>> => {
    const last = {} as Record<VmName, Tick>;
    await c.until(
      async () => {
        const vms = await c.vms(via);
        for (const name of Object.keys(VMS) as VmName[]) {
          const v = vms.find((x) => x.name === name);
          if (v?.node !== where[name] || v.state !== 'running') return false;
          const ts = ticks(await consoleOf(name, via));
          const top = ts.at(-1);
          if (!top || stale[name]?.includes(top.boot) || ts.filter((x) => x.boot === top.boot).length < n) return false;
          last[name] = top;
        }
        return true;
      },
      ms,
      () => `VMs running as ${JSON.stringify(where)}`,
      500,
    );
    return last;
  };
  const noGuestErrors = async (via: NodeName): Promise<void> => {
    for (const name of Object.keys(VMS) as VmName[]) assert.deepEqual(errors(await consoleOf(name, via)), [], `vm ${name}: a guest-visible error`);
  };
  const home = { ...VMS } as Record<VmName, NodeName>;
  const onBravo = { web1: 'bravo', web2: 'bravo', db1: 'bravo', db2: 'bravo' } as Record<VmName, NodeName>;
  const onAlpha = { web1: 'alpha', web2: 'alpha', db1: 'alpha', db2: 'alpha' } as Record<VmName, NodeName>;
  const figures: Record<string, unknown> = {};
  await allRun(home, 'bravo');

  await t.test('node death: bravo fences alpha and takes over; all 4 VMs run on bravo, squeezed to fit; a mail names the moved VMs', async () => {
    const killedAt = await c.killNode('alpha');
    const firstLine: Partial<Record<VmName, number>> = {};
    // Each lost guest's first console line on bravo (its new boot), as it comes.
    await c.until(
      () => {
        for (const name of ['web1', 'web2'] as const) if (firstLine[name] === undefined && /duet-guest boot_id=/.test(c.consoleFile('bravo', name))) firstLine[name] = Date.now();
        return firstLine.web1 !== undefined && firstLine.web2 !== undefined;
      },
      60_000,
      'the lost guests to boot on bravo',
      50,
    );
    const after = await allRun(onBravo, 'bravo');
    await noGuestErrors('bravo');
    const ev = c.events('bravo');
    const start = eventsOf(ev, 'takeover-start', killedAt)[0];
    const done = eventsOf(ev, 'failover-done', killedAt)[0];
    assert.ok(start && done, `takeover events on bravo:\n${ev.map((e) => e.event).join(' ')}`);
    const started = eventsOf(ev, 'vm-started', killedAt).map((e) => Date.parse(e.time));
    figures.nodeDeath = {
      decisionMs: Date.parse(start.time) - killedAt,
      lastVmStartedMs: Math.max(...started) - killedAt,
      firstLineMs: { web1: firstLine.web1! - killedAt, web2: firstLine.web2! - killedAt },
      steps: done.steps,
    };
    // Squeezed: 4 × 128M do not fit 448M; each gets 112M (the same share above its 96M floor).
    assert.deepEqual((done.vms as { name: string; targetBytes?: number }[]).map((v) => [v.name, v.targetBytes]), [['web1', 112 * MiB], ['web2', 112 * MiB]]);
    const s = await c.clusterStatus('bravo');
    assert.equal(s.nodes.find((n) => n.name === 'alpha')?.state, 'fenced');
    assert.deepEqual(s.resources.map((r) => [r.name, r.primary]), [['a', 'bravo'], ['b', 'bravo']]);
    const mail = await c.until(() => c.mails().find((m) => /^Subject: .*failover-done/m.test(m)), 60_000, 'the failover mail');
    assert.match(mail, /web1: now runs on bravo/);
    assert.match(mail, /web2: now runs on bravo/);
    assert.match(c.mails().join('\n'), /^Subject: .*node-lost on alpha/m);
    figures.afterDeath = after;
  });

  await t.test('rejoin with the same disk: only what changed resyncs; the VMs go back live (same boot), roles return', async () => {
    const bootOnBravo = figures.afterDeath as Record<VmName, Tick>;
    await c.heal('alpha');
    await c.start('alpha');
    const r = await c.duet('bravo', ['node', 'rejoin', 'alpha'], 300_000);
    assert.equal(r.code, 0, `${r.describe()}\n${c.describe()}`);
    const now = await allRun(home, 'bravo');
    for (const name of ['web1', 'web2'] as const) assert.equal(now[name].boot, bootOnBravo[name].boot, `vm ${name} rebooted on its way back`);
    const s = await c.clusterStatus('alpha');
    assert.deepEqual(s.resources.map((x) => [x.name, x.primary]), [['a', 'alpha'], ['b', 'bravo']]);
    const resync = c.events('alpha').filter((e) => e.event === 'resync-done' && e.resource === 'a').at(-1);
    assert.ok(resync, 'a resync of a on alpha');
    const bytes = Number(resync.doneBytes);
    assert.ok(bytes > 0 && bytes < 32 * MiB, `resynced ${bytes} bytes of a 128 MiB disk: only what changed`);
    figures.rejoinResyncBytes = bytes;
    assert.match(c.mails().join('\n'), /^Subject: .*rejoin-done on alpha/m);
    await noGuestErrors('alpha');
  });

  await t.test('partition: alpha, cut off but alive, fences itself before bravo takes over; nothing its old VMs wrote after the cut counts', async () => {
    const before = await allRun(home, 'bravo');
    const pids = Object.fromEntries((['web1', 'web2'] as const).map((n) => [n, Number(fs.readFileSync(path.join(c.home('alpha'), 'vms', n, 'qemu.pid'), 'utf8'))]));
    // Every boot either console shows now is an old copy's.
    const seen: Partial<Record<VmName, string[]>> = {};
    for (const name of ['web1', 'web2'] as const) seen[name] = [...new Set([...ticks(await consoleOf(name, 'bravo')), ...ticks(await consoleOf(name, 'alpha'))].map((x) => x.boot))];
    const cutAt = Date.now();
    await c.cut('alpha');
    const after = await allRun(onBravo, 'bravo', 3, 120_000, seen);
    const fenced = eventsOf(c.events('alpha'), 'self-fenced', cutAt)[0];
    const start = eventsOf(c.events('bravo'), 'takeover-start', cutAt)[0];
    assert.ok(fenced, `alpha fenced itself:\n${c.events('alpha').slice(-20).map((e) => `${e.time} ${e.event} ${e.message}`).join('\n')}`);
    assert.ok(start, 'bravo took over');
    assert.ok(Date.parse(fenced.time) < Date.parse(start.time), `alpha fenced itself at ${fenced.time}, bravo took over at ${start.time}`);
    figures.partition = { selfFencedMs: Date.parse(fenced.time) - cutAt, takeoverMs: Date.parse(start.time) - cutAt };
    for (const [name, pid] of Object.entries(pids)) assert.throws(() => process.kill(pid, 0), `vm ${name}'s old QEMU (${pid}) still runs on alpha`);
    // Every write an old copy acknowledged (a tick) is on the disk the new copy booted from, and nothing
    // beyond the one write that may have been in flight at the cut.
    for (const name of ['web1', 'web2'] as const) {
      const old = ticks(c.consoleFile('alpha', name)).filter((x) => x.boot === before[name].boot);
      const lastOld = old.at(-1)!.n;
      const text = await consoleOf(name, 'bravo');
      const boot = text.lastIndexOf(`boot=${after[name].boot}`);
      const scan = [...text.matchAll(/^duet-guest disk last_seq=(\d+)$/gm)].filter((m) => m.index! < boot).at(-1);
      assert.ok(scan, `vm ${name}: the new copy's disk scan`);
      const found = Number(scan[1]);
      assert.ok(found >= lastOld && found <= lastOld + 1, `vm ${name}: the old copy's last acknowledged write is ${lastOld}, the new copy found ${found}`);
    }
    await noGuestErrors('bravo');
    // Heal: alpha steps down and resyncs from bravo; the disks are the same again; everything goes home.
    await c.heal('alpha');
    const r = await c.duet('bravo', ['node', 'rejoin', 'alpha'], 300_000);
    assert.equal(r.code, 0, `${r.describe()}\n${c.describe()}`);
    await allRun(home, 'bravo');
    // Each on its Primary: a verify started on the Secondary compares a block the Primary is writing at that
    // moment (its db guests write all the time) as it was before the write on one side and after on the other.
    for (const [res, primary] of [['a', 'alpha'], ['b', 'bravo']] as const) {
      const v = await c.duet(primary, ['resource', 'verify', res], 120_000);
      assert.equal(v.code, 0, v.describe());
      assert.match(v.stdout, /no difference/, v.stdout);
    }
  });

  await t.test('disk failure: EIO on alpha\'s disk; its VMs run on through bravo\'s disk, then move to bravo live with the Primary role', async () => {
    const before = await allRun(home, 'bravo');
    fs.writeFileSync(failFile, '');
    const moved = { web1: 'bravo', web2: 'bravo', db1: 'bravo', db2: 'bravo' } as Record<VmName, NodeName>;
    const now = await allRun(moved, 'bravo', 3, 180_000);
    for (const name of ['web1', 'web2'] as const) assert.equal(now[name].boot, before[name].boot, `vm ${name} rebooted`);
    await noGuestErrors('bravo');
    const s = await c.resources('alpha');
    const a = s.resources.find((x) => x.name === 'a')!;
    assert.equal(a.disk, 'Diskless');
    assert.equal(a.role, 'Secondary');
    assert.ok(eventsOf(c.events('alpha'), 'disk-failover-done').length > 0);
    await c.until(() => c.mails().some((m) => /^Subject: .*disk-detached on alpha/m.test(m)), 60_000, 'the disk-failed mail');
    figures.diskFailure = now;
  });

  await t.test('rejoin with a new empty disk: create-md, a full sync, then the VMs go back live', async () => {
    const before = figures.diskFailure as Record<VmName, Tick>;
    const downAt = await c.killNode('alpha');
    void downAt;
    // The repair: a new, empty disk in place of the failed one.
    fs.rmSync(failFile, { force: true });
    fs.truncateSync(realA, 0);
    fs.truncateSync(realA, 128 * MiB);
    await c.createMdOf('alpha', 'a', true);
    await c.heal('alpha');
    await c.start('alpha');
    const r = await c.duet('bravo', ['node', 'rejoin', 'alpha'], 600_000);
    assert.equal(r.code, 0, `${r.describe()}\n${c.describe()}`);
    const now = await allRun(home, 'bravo');
    for (const name of ['web1', 'web2'] as const) assert.equal(now[name].boot, before[name].boot, `vm ${name} rebooted`);
    const full = c.events('alpha').filter((e) => e.event === 'resync-done' && e.resource === 'a').at(-1);
    assert.ok(full && Number(full.doneBytes) > 100 * MiB, `a full sync of the new disk: ${JSON.stringify(full)}`);
    await noGuestErrors('alpha');
  });

  await t.test('drain bravo: every VM runs on alpha, live, squeezed to fit; bravo shows draining', async () => {
    const before = await allRun(home, 'alpha');
    const r = await c.duet('alpha', ['node', 'drain', 'bravo'], 600_000);
    assert.equal(r.code, 0, `${r.describe()}\n${c.describe()}`);
    const now = await allRun(onAlpha, 'alpha');
    for (const name of Object.keys(VMS) as VmName[]) assert.equal(now[name].boot, before[name].boot, `vm ${name} rebooted`);
    const s = await c.clusterStatus('alpha');
    assert.equal(s.nodes.find((n) => n.name === 'bravo')?.state, 'draining');
    assert.deepEqual(s.resources.map((x) => [x.name, x.primary]), [['a', 'alpha'], ['b', 'alpha']]);
    const total = (await c.vms('alpha')).reduce((sum, v) => sum + v.memoryBytes, 0);
    assert.ok(total <= 448 * MiB + 8 * MiB, `4 VMs squeezed into 448M: ${total / MiB} MiB`);
    await noGuestErrors('alpha');
    // Again: nothing to do, exit 0.
    const again = await c.duet('alpha', ['node', 'drain', 'bravo'], 60_000);
    assert.equal(again.code, 0, again.describe());
  });

  t.diagnostic(`figures: ${JSON.stringify(figures)}`);
  process.stderr.write(`seed figures: ${JSON.stringify(figures)}\n`);
});

async function waitUntil(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
