/**
 * The VM manager's promises that need no cluster, only real QEMUs: one VM
 * never runs twice (a QEMU found again but not answering QMP is still this
 * node's; two starts at once make one QEMU), a migration whose source
 * daemon never says "done" still leaves a VM the destination owns, a
 * handover pause that is never ended runs out, the console moves byte for
 * byte.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { qemusUnder, twoNodes, until } from './manager-harness.js';
import { vmSkip } from './vm-harness.js';
import type { VmInfo } from '../../src/vm/manager.js';
import { ConsoleLog, READ_MAX } from '../../src/vm/console.js';
import { NbdClient } from '../../src/nbd/client.js';
import { QmpClient } from '../../src/vm/qmp.js';
import type { Nodes } from './manager-harness.js';

test('a QEMU found again whose QMP does not answer (another client holds it) is still the VM running here: no second copy starts', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web' });
  assert.equal(qemusUnder(n.dir).length, 1);
  // The daemon stops (its QEMU runs on); an admin's QMP shell holds the socket while it comes back.
  n.managers.alpha.stop();
  const admin = net.createConnection(path.join(n.dir, 'alpha', 'vms', 'web', 'qmp.sock'));
  t.after(() => admin.destroy());
  await new Promise((resolve) => admin.once('data', resolve));
  const alpha = await n.restart('alpha');
  const started = (await alpha.handle({ cmd: 'vm.start', vm: 'web' })) as { already?: boolean; node?: string };
  assert.equal(started.already, true, `vm start: ${JSON.stringify(started)}`);
  assert.equal(started.node, 'alpha');
  assert.equal(qemusUnder(n.dir).length, 1, 'one QEMU for the VM');
  const list = ((await n.managers.bravo.handle({ cmd: 'vm.list' })) as { vms: VmInfo[] }).vms;
  assert.equal(list[0].node, 'alpha');
  // Once the other client leaves, the daemon takes the QEMU over again.
  admin.destroy();
  await until(async () => ((await alpha.handle({ cmd: 'vm.list' })) as { vms: VmInfo[] }).vms[0].state === 'running', 15_000, 'the QEMU taken over');
  assert.equal(qemusUnder(n.dir).length, 1);
});

test('two starts of one VM on a node at once make one QEMU', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  // Not started by the cluster meanwhile: only the two starts below.
  await n.managers.alpha.handle({ cmd: 'vm.mark', vm: 'web', stopped: true, at: Date.now() });
  const both = await Promise.allSettled([n.managers.bravo.handle({ cmd: 'vm.start-here', vm: 'web' }), n.managers.bravo.handle({ cmd: 'vm.start-here', vm: 'web' })]);
  assert.equal(qemusUnder(n.dir).length, 1, `one QEMU (${JSON.stringify(both.map((b) => (b.status === 'rejected' ? String(b.reason) : 'ok')))})`);
  for (const b of both) assert.equal(b.status, 'fulfilled', b.status === 'rejected' ? String(b.reason) : '');
  const pids = both.map((b) => (b.status === 'fulfilled' ? (b.value as VmInfo).pid : 0));
  assert.equal(pids[0], pids[1]);
});
test('a VM whose start is under way here (its autostart) is still a takeover\'s to boot and report as started (a fresh-clone run\'s failover mail named one VM of two)', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.mark', vm: 'web', stopped: true, at: Date.now() });
  await n.managers.alpha.handle({ cmd: 'vm.mark', vm: 'web', stopped: false, at: Date.now() + 1 });
  // A start on alpha is under way (as an autostart's) when the takeover looks for lost VMs and boots them.
  const starting = n.managers.alpha.handle({ cmd: 'vm.start-here', vm: 'web' });
  assert.deepEqual(await n.managers.alpha.lostVms(), ['web']);
  const booted = await n.managers.alpha.bootHere('web');
  assert.equal(booted.started, true, JSON.stringify(booted));
  await starting;
  assert.equal(qemusUnder(n.dir).length, 1);
});
test('a lost VM that its autostart started here while the takeover booted the others is still reported as started by the takeover (a fresh-clone run\'s failover mail named one VM of two)', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.mark', vm: 'web', stopped: true, at: Date.now() });
  await n.managers.alpha.handle({ cmd: 'vm.mark', vm: 'web', stopped: false, at: Date.now() + 1 });
  // The takeover lists the lost VMs; before it gets to this one, an autostart has started it here, all the way.
  assert.deepEqual(await n.managers.alpha.lostVms(), ['web']);
  await n.managers.alpha.handle({ cmd: 'vm.start-here', vm: 'web' });
  const booted = await n.managers.alpha.bootHere('web');
  assert.equal(booted.started, true, JSON.stringify(booted));
  assert.equal(booted.already, true);
  assert.equal(qemusUnder(n.dir).length, 1, 'not started twice');
});
test('a migration whose source never says it is done: the destination owns the VM once it runs there (a handover pauses it)', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web' });
  // The source daemon dies after the migration completed, before it tells the destination.
  n.drop = (_node, request) => request.cmd === 'vm.migrate-done';
  await n.managers.alpha.handle({ cmd: 'vm.migrate', vm: 'web', to: 'bravo' });
  n.drop = undefined;
  assert.equal(n.qemuPids('alpha').length, 0);
  assert.equal(n.qemuPids('bravo').length, 1);
  await until(async () => ((await n.managers.bravo.handle({ cmd: 'vm.local' })) as { vms: VmInfo[] }).vms[0]?.state === 'running', 10_000, 'the VM running on bravo');
  const paused = await n.managers.bravo.pauseIo(['pa']);
  assert.deepEqual(paused.vms, ['web'], 'a handover pauses the VM where it runs');
  const resumed = await n.managers.bravo.resumeIo(['pa'], 'alpha');
  assert.deepEqual(resumed.vms.map((v) => v.name), ['web']);
  // It can move on from there.
  await n.managers.bravo.handle({ cmd: 'vm.migrate', vm: 'web', to: 'alpha' });
  assert.equal(n.qemuPids('alpha').length, 1);
  assert.equal(n.qemuPids('bravo').length, 0);
});

test('a VM paused for a handover that never resumes it (its node died, a step failed) runs on by itself when the pause runs out', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web' });
  const state = async (): Promise<string> => ((await n.managers.alpha.handle({ cmd: 'vm.local' })) as { vms: VmInfo[] }).vms[0].state;
  await until(async () => (await state()) === 'running', 10_000, 'the VM running');
  const paused = (await n.managers.alpha.handle({ cmd: 'vm.pause-io', pools: ['pa'], leaseMs: 1000 })) as { vms: string[] };
  assert.deepEqual(paused.vms, ['web']);
  assert.equal(await state(), 'paused');
  // No vm.resume-io comes.
  await until(async () => (await state()) === 'running', 10_000, 'the VM running again after its handover pause ran out');
});

test('the console moves with a migration byte for byte, whatever it holds (bytes that are not UTF-8, a character across a chunk boundary): the positions go on', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web' });
  // What the guest printed (QEMU appends to this file; the BIOS here prints nothing).
  const printed = Buffer.concat([Buffer.alloc(READ_MAX - 1, 'a'), Buffer.from('é\n', 'utf8'), Buffer.from([0xff, 0xfe, 0x0a]), Buffer.alloc(70_000, 'b')]);
  fs.appendFileSync(path.join(n.dir, 'alpha', 'vms', 'web', 'console.log'), printed);
  const before = new ConsoleLog(path.join(n.dir, 'alpha', 'vms', 'web')).all();
  await n.managers.alpha.handle({ cmd: 'vm.migrate', vm: 'web', to: 'bravo' });
  const after = new ConsoleLog(path.join(n.dir, 'bravo', 'vms', 'web')).all();
  assert.equal(after.start, before.start);
  assert.equal(after.bytes.length, before.bytes.length, 'the console ends at the same position after the migration');
  assert.ok(after.bytes.equals(before.bytes), 'the same bytes');
});

test('vm stop sticks even when the node that started it has a clock an hour ahead (the newest mark is not the one with the latest clock)', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  // alpha's clock runs an hour ahead: its `vm start` mark is dated then.
  await n.managers.alpha.handle({ cmd: 'vm.mark', vm: 'web', stopped: false, at: Date.now() + 3_600_000 });
  await n.managers.bravo.handle({ cmd: 'vm.stop', vm: 'web', force: true });
  for (const node of ['alpha', 'bravo']) {
    const marks = ((await n.managers[node].handle({ cmd: 'vm.local' })) as { marks: Record<string, { stopped: boolean }> }).marks;
    assert.equal(marks.web?.stopped, true, `${node} knows web is stopped`);
  }
});

test('vm stop during a migration does not say "stopped" while the VM runs on at the destination', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web' });
  let stop: Promise<unknown> | undefined;
  n.drop = (_node, request) => {
    // The moment the source asks the destination to listen: the migration is under way.
    if (request.cmd === 'vm.migrate-in' && !stop) stop = n.managers.bravo.handle({ cmd: 'vm.stop', vm: 'web' }).then((r) => r, (err: Error) => err);
    return false;
  };
  await n.managers.alpha.handle({ cmd: 'vm.migrate', vm: 'web', to: 'bravo' });
  const result = await stop!;
  if (result instanceof Error) {
    assert.match(result.message, /migrating/);
  } else {
    assert.deepEqual(qemusUnder(n.dir), [], `vm stop said ${JSON.stringify(result)}: nothing runs`);
  }
});

test('a destination whose migration never comes (the source daemon died before sending) ends its waiting QEMU', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.mark', vm: 'web', stopped: true, at: Date.now() });
  // What alpha's daemon asks before it migrates; then it is gone.
  const port = n.config.exports.port;
  await n.managers.bravo.handle({ cmd: 'vm.migrate-in', vm: 'web', from: 'alpha', memoryBytes: 128 * 1024 * 1024, cpus: 1, disks: [{ volume: 'pa/web', node: 'alpha', host: '127.0.0.1', port, export: 'web' }], waitMs: 1000 });
  assert.equal(n.qemuPids('bravo').length, 1);
  await until(() => n.qemuPids('bravo').length === 0, 15_000, 'the waiting QEMU ended');
  // The node no longer has it (its exit noticed).
  await until(async () => ((await n.managers.bravo.handle({ cmd: 'vm.local' })) as { vms: VmInfo[] }).vms.length === 0, 15_000, 'bravo without a QEMU of web');
});

test('a destination daemon restarted while its QEMU waits for an incoming migration still treats it as a migration: an abort ends it, so does the end of its wait', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.mark', vm: 'web', stopped: true, at: Date.now() });
  const port = n.config.exports.port;
  const disks = [{ volume: 'pa/web', node: 'alpha', host: '127.0.0.1', port, export: 'web' }];
  const migrateIn = (waitMs: number) => n.managers.bravo.handle({ cmd: 'vm.migrate-in', vm: 'web', from: 'alpha', memoryBytes: 128 * 1024 * 1024, cpus: 1, disks, waitMs });

  // The source gives up (a failed migration) after bravo's daemon restarted: its abort ends the waiting QEMU.
  await migrateIn(120_000);
  assert.equal(n.qemuPids('bravo').length, 1);
  await n.restart('bravo');
  const found = ((await n.managers.bravo.handle({ cmd: 'vm.local' })) as { vms: VmInfo[] }).vms;
  assert.equal(found[0]?.state, 'migrating', `found again as a migration's destination: ${JSON.stringify(found)}`);
  await n.managers.bravo.handle({ cmd: 'vm.migrate-abort', vm: 'web' });
  await until(() => n.qemuPids('bravo').length === 0, 15_000, 'the aborted destination QEMU ended');

  // The source never sends: the restarted daemon ends the QEMU when the wait the first daemon was given runs out.
  await migrateIn(4000);
  await n.restart('bravo');
  await until(() => n.qemuPids('bravo').length === 0, 20_000, 'the waiting QEMU ended after its wait');
  await until(async () => ((await n.managers.bravo.handle({ cmd: 'vm.local' })) as { vms: VmInfo[] }).vms.length === 0, 15_000, 'bravo without a QEMU of web');
  // Its end is not taken for a crash of the VM (that would keep it from starting by itself).
  const list = ((await n.managers.bravo.handle({ cmd: 'vm.list' })) as { vms: VmInfo[] }).vms;
  assert.notEqual(list[0]?.state, 'failed', JSON.stringify(list));
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

test('the cluster comes up without a VM\'s prefer node: the node serving its disks starts it after startup.waitForPeer, not while a client still uses its disks; the prefer node coming back makes no second copy', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const n = await twoNodes(t, { vm: 'prefer: bravo', extra: ['startup: { waitForPeer: 2 }'], up: ['alpha'] });
  // Something still reads the disk (a QEMU whose daemon is down would): the VM may run there, so no start.
  const client = await NbdClient.connect({ host: '127.0.0.1', port: n.config.exports.port, exportName: 'web' });
  await sleep(5000);
  assert.deepEqual(n.qemuPids('alpha'), [], 'not started while a client uses its disk');
  await client.close();
  await until(() => n.qemuPids('alpha').length === 1, 20_000, 'web started on alpha, its prefer node down');
  await n.restart('bravo');
  await sleep(5000);
  assert.deepEqual(n.qemuPids('bravo'), [], 'bravo back: no second copy');
  assert.equal(n.qemuPids('alpha').length, 1);
  const list = ((await n.managers.bravo.handle({ cmd: 'vm.list' })) as { vms: VmInfo[] }).vms;
  assert.equal(list[0].node, 'alpha');
});

test('a prefer node lost after it answered (its VM with it) is not replaced by a start elsewhere: that is failover\'s, after fencing', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const n = await twoNodes(t, { vm: 'prefer: bravo', extra: ['startup: { waitForPeer: 1 }'] });
  await until(() => n.qemuPids('bravo').length === 1, 20_000, 'web started on bravo');
  n.down('bravo');
  for (const pid of n.qemuPids('bravo')) process.kill(pid, 'SIGKILL');
  await sleep(5000);
  assert.deepEqual(n.qemuPids('alpha'), [], 'no copy started on alpha');
  await assert.rejects(n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web', on: 'alpha' }), /cannot reach bravo to make sure it does not run there/);
});

test('a long console (more than 16 MiB printed) moves with a migration as its last MiB, at the same positions', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web' });
  const file = path.join(n.dir, 'alpha', 'vms', 'web', 'console.log');
  const block = Buffer.from(Array.from({ length: 65536 }, (_, i) => `line ${String(i).padStart(8, '0')}\n`).join(''));
  for (let i = 0; i < 20; i++) fs.appendFileSync(file, block);
  fs.appendFileSync(file, 'the last line\n');
  const before = new ConsoleLog(path.join(n.dir, 'alpha', 'vms', 'web')).all();
  await n.managers.alpha.handle({ cmd: 'vm.migrate', vm: 'web', to: 'bravo' });
  const after = new ConsoleLog(path.join(n.dir, 'bravo', 'vms', 'web')).all();
  assert.equal(after.start + after.bytes.length, before.start + before.bytes.length, 'the console ends at the same position');
  assert.ok(after.bytes.length >= 64 * 1024, `kept ${after.bytes.length} bytes`);
  assert.ok(after.bytes.equals(before.bytes.subarray(before.bytes.length - after.bytes.length)), 'the last bytes, the same');
  assert.match(after.bytes.toString('latin1'), /the last line\n$/);
});

test('a daemon restarting answers for its VMs only once it has found its QEMUs again: a start asked meanwhile makes no second copy', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web', on: 'bravo' });
  assert.equal(n.qemuPids('bravo').length, 1);
  // bravo's daemon restarts (its QEMU runs on); alpha, which decides for web, asks where it runs before bravo has found it.
  const restarting = n.restart('bravo');
  const started = (await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web' })) as { already?: boolean; node?: string };
  await restarting;
  assert.deepEqual(n.qemuPids('alpha'), [], `no second copy on alpha (vm start said ${JSON.stringify(started)})`);
  assert.equal(started.already, true);
  assert.equal(started.node, 'bravo');
});

/**
 * Two copies of web, as the cluster coming up without bravo leaves them: bravo's (older, its daemon down)
 * and alpha's, started after startup.waitForPeer once nothing used the disk. Returns their pids.
 */
async function twoCopies(n: Nodes): Promise<{ stale: number; real: number }> {
  await until(() => n.qemuPids('bravo').length === 1, 20_000, 'web started on bravo, its prefer node');
  const [stale] = n.qemuPids('bravo');
  // Its BIOS done with the disk (it found nothing to boot): an idle QEMU notices a lost connection only at its next request.
  await sleep(4000);
  n.down('bravo');
  // alpha comes up again (it has not heard bravo since), and the disk's clients are gone with its old daemon.
  await n.restartServer();
  await n.restart('alpha');
  await until(() => n.qemuPids('alpha').length === 1, 20_000, 'web started on alpha without its prefer node');
  const [real] = n.qemuPids('alpha');
  await sleep(4000);
  return { stale, real };
}

/** `node`'s QEMU of web (no daemon holds its QMP) reboots: its BIOS reads the disk, whose connection is gone, and werror/rerror=stop pauses it. */
async function pauseOnDiskError(n: Nodes, node: string): Promise<void> {
  const qmp = await QmpClient.connect(path.join(n.dir, node, 'vms', 'web', 'qmp.sock'));
  try {
    await qmp.execute('system_reset');
    await until(async () => (await qmp.execute<{ status: string }>('query-status')).status === 'io-error', 15_000, `web on ${node} paused on a disk error`);
  } finally {
    qmp.close();
  }
}

/** An established TCP connection to `address` (bravo's: only a migration stream goes there in these tests). */
function streamTo(address: string): boolean {
  const hex = address.split('.').map((b) => Number(b).toString(16).padStart(2, '0').toUpperCase()).reverse().join('');
  return fs.readFileSync('/proc/net/tcp', 'utf8').split('\n').some((l) => {
    const f = l.trim().split(/\s+/);
    return f[2]?.startsWith(`${hex}:`) && f[3] === '01';
  });
}

const localState = async (n: Nodes, node: string): Promise<string | undefined> => ((await n.managers[node].handle({ cmd: 'vm.local' })) as { vms: VmInfo[] }).vms.find((v) => v.name === 'web')?.state;

/**
 * Two copies of web (see twoCopies); bravo's, the stale one, paused on a disk error, and bravo's daemon back but
 * unable to ask alpha (its API does not answer in time; alpha serves the disk all the same): it stays paused.
 */
async function staleCopyWaiting(t: { after(fn: () => unknown): void }): Promise<{ n: Nodes; stale: number; real: number }> {
  const n = await twoNodes(t, { vm: 'prefer: bravo', extra: ['startup: { waitForPeer: 1 }'] });
  const { stale, real } = await twoCopies(n);
  await pauseOnDiskError(n, 'bravo');
  n.drop = (node, request) => node === 'alpha' && request.cmd === 'vm.local';
  await n.restart('bravo');
  await sleep(4000);
  assert.equal(await localState(n, 'bravo'), 'paused', 'the stale copy stays paused while alpha does not answer');
  return { n, stale, real };
}

/** alpha answers again: bravo's stale copy is ended, alpha's runs on. */
async function endedOnceAlphaAnswers(n: Nodes, stale: number, real: number): Promise<void> {
  n.drop = undefined;
  await until(() => !n.qemuPids('bravo').includes(stale), 20_000, 'the stale copy ended once alpha answers');
  assert.deepEqual(n.qemuPids('alpha'), [real]);
}

test('a stale copy paused on a disk error is not resumed while the node running the VM does not answer: it is ended once that node answers', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const { n, stale, real } = await staleCopyWaiting(t);
  await endedOnceAlphaAnswers(n, stale, real);
});

test('both copies paused on a disk error at once (both daemons restarting): the older one is ended, the one started later runs on', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const n = await twoNodes(t, { vm: 'prefer: bravo', extra: ['startup: { waitForPeer: 1 }'] });
  const { stale, real } = await twoCopies(n);
  // alpha's daemon goes too (it served the disk): both copies lose their disk and pause.
  n.down('alpha');
  await n.restartServer();
  await pauseOnDiskError(n, 'alpha');
  await pauseOnDiskError(n, 'bravo');
  await Promise.all([n.restart('alpha'), n.restart('bravo')]);
  await until(() => !n.qemuPids('bravo').includes(stale), 20_000, 'the older copy ended');
  await until(async () => (await localState(n, 'alpha')) === 'running', 20_000, 'the copy started later running again');
  assert.deepEqual(n.qemuPids('alpha'), [real], 'the copy started later is the VM');
});

test('a source daemon restarted while QEMU migrates on (it finishes by itself) ends its copy once the guest has left: a paused copy left behind would run again at the next cont', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  // 256 KiB/s: the migration of this guest lasts about 3 s.
  const n = await twoNodes(t, { extra: ['migration: { bandwidth: 256K }'] });
  await until(() => n.qemuPids('alpha').length === 1, 20_000, 'web started on alpha');
  const [source] = n.qemuPids('alpha');
  let sent: (() => void) | undefined;
  const migrating = new Promise<void>((resolve) => (sent = resolve));
  // Once the source asked the destination to listen, its daemon dies: it says nothing more to anyone.
  n.drop = (_node, request) => {
    if (request.cmd === 'vm.migrate-in') setTimeout(() => sent?.(), 1000);
    return request.cmd === 'vm.migrate-done' || request.cmd === 'vm.migrate-abort';
  };
  const old = n.managers.alpha.handle({ cmd: 'vm.migrate', vm: 'web', to: 'bravo' }).catch(() => undefined);
  await migrating;
  // The guest is on its way (QEMU's migration stream to bravo is open) before the source daemon goes.
  await until(async () => streamTo('127.0.0.6') || (await localState(n, 'bravo')) === 'running', 15_000, 'the migration stream to bravo');
  await n.restart('alpha');
  await old;
  await until(async () => (await localState(n, 'bravo')) === 'running', 30_000, 'the guest running on bravo');
  await until(() => !n.qemuPids('alpha').includes(source), 15_000, 'the source copy ended');
  // The process is gone before the daemon has seen its QMP close: wait for that too.
  let left: VmInfo[] = [];
  await until(async () => (left = ((await n.managers.alpha.handle({ cmd: 'vm.local' })) as { vms: VmInfo[] }).vms).length === 0, 15_000, `nothing of web left on alpha: ${JSON.stringify(left)}`);
  assert.equal(n.qemuPids('bravo').length, 1);
});

test('a handover on a node whose stale copy waits paused on a disk error leaves it to the recovery loop: it is not resumed', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const { n, stale, real } = await staleCopyWaiting(t);
  // The Primary role of pool pa moves: bravo pauses and resumes the VMs using it.
  const paused = await n.managers.bravo.pauseIo(['pa']);
  assert.deepEqual(paused.vms, [], 'a copy already paused on a disk error is not the handover\'s');
  await n.managers.bravo.resumeIo(['pa'], 'alpha');
  await sleep(1000);
  assert.equal(await localState(n, 'bravo'), 'paused', 'the stale copy still paused after the handover');
  await endedOnceAlphaAnswers(n, stale, real);
});

test('a destination that cannot run the guest it received (its QEMU fails to load the state) leaves it running on at the source', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const n = await twoNodes(t);
  await n.managers.alpha.handle({ cmd: 'vm.start', vm: 'web' });
  const [source] = n.qemuPids('alpha');
  // bravo's QEMU gets another vCPU count than the guest's (a config that differs): loading the device state, sent last, fails.
  n.drop = (_node, request) => {
    if (request.cmd === 'vm.migrate-in') (request as { cpus: number }).cpus = 2;
    return false;
  };
  await assert.rejects(n.managers.alpha.handle({ cmd: 'vm.migrate', vm: 'web', to: 'bravo' }), /migration to bravo failed \(bravo's QEMU did not run the guest: .*\); it still runs on alpha/);
  n.drop = undefined;
  assert.deepEqual(n.qemuPids('alpha'), [source], 'the same QEMU runs on at the source');
  assert.equal(await localState(n, 'alpha'), 'running');
  assert.deepEqual(n.qemuPids('bravo'), []);

  // It can move on from there.
  await n.managers.alpha.handle({ cmd: 'vm.migrate', vm: 'web', to: 'bravo' });
  assert.deepEqual(n.qemuPids('alpha'), []);
  assert.equal(n.qemuPids('bravo').length, 1);
});

test('a daemon back after its node was taken over finds its old QEMU still running (idle: no request failed, so nothing paused it): the VM runs elsewhere since later, so the old copy is ended before it writes again', { skip: vmSkip, timeout: 90_000 }, async (t) => {
  const n = await twoNodes(t, { vm: 'prefer: bravo', extra: ['startup: { waitForPeer: 1 }'] });
  const { stale, real } = await twoCopies(n);
  assert.equal(await localState(n, 'alpha'), 'running');
  await n.restart('bravo');
  await until(() => !n.qemuPids('bravo').includes(stale), 20_000, 'the stale running copy ended on bravo');
  assert.deepEqual(n.qemuPids('alpha'), [real], 'the copy started later is the VM');
});
