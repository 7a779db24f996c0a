/**
 * Faults on a real cluster: a partition (iptables on the loopback
 * addresses) with a witness, where at most one Primary may accept writes;
 * EIO on the Primary's disk (nbdkit's error filter under nbdfuse) that
 * detaches it while the NBD client sees no error; a peer with the wrong
 * secret refused.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Cleanup, haveProgram, python, run, spawnTracked, waitFor, withTimeout } from './harness.js';
import { ADDRESS, Cluster, cut, inSync, iptablesSkip, makeCluster, waitStatus } from './cluster-harness.js';

const MiB = 1024 * 1024;

const PWRITE = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(bytes([int(sys.argv[2])]) * 4096, int(sys.argv[3]))
    h.flush()
    print("ok")
except nbd.Error as e:
    print("error", e.errno)
`;


/**
 * alpha Primary with a witness, volume pa/v holding byte 1 at 0, then cut
 * off from bravo and from the witness (iptables; `cleanup` heals it).
 */
/**
 * alpha cut off from bravo and the witness. With failover manual: these tests are about what the
 * resources do by themselves (the cluster manager's automatic takeover has its own tests).
 */
async function alphaCutOff(t: Parameters<typeof makeCluster>[0], resourceExtra?: string): Promise<{ c: Cluster; cleanup: Cleanup }> {
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  const c = await makeCluster(t, { witness: true, failover: 'manual', ...(resourceExtra ? { resourceExtra } : {}) });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'initial sync', (s) => s.role === 'Primary' && inSync(s));
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v', '--size', '64M'])).code, 0);
  const w0 = await python(PWRITE, [c.url('alpha', 'v'), '1', '0']);
  assert.equal(w0.stdout.trim(), 'ok', w0.describe());
  const tag = `duet-test-${process.pid}`;
  await cut(cleanup, ADDRESS.alpha, ADDRESS.bravo, tag);
  await cut(cleanup, ADDRESS.alpha, ADDRESS.witness, tag);
  await waitStatus(c, 'bravo', 'bravo lost alpha', (s) => s.peers[0].connection !== 'Connected');
  await waitStatus(c, 'alpha', 'alpha lost quorum', (s) => s.peers[0].connection !== 'Connected' && !s.quorum);
  return { c, cleanup };
}

test('partition with a witness: the cut-off Primary refuses writes, the other side is promoted; at most one Primary accepts writes', { skip: iptablesSkip() }, async (t) => {
  const { c, cleanup } = await alphaCutOff(t, '"on-no-quorum": error');
  // alpha cannot fence bravo: its unreplicated write is refused.
  const wa = await python(PWRITE, [c.url('alpha', 'v'), '2', '4096'], { timeoutMs: 20_000 });
  assert.match(wa.stdout.trim(), /^error/, `alpha accepted a write without quorum\n${wa.describe()}`);
  // bravo has the witness: it may be promoted, and it writes.
  const pb = await c.duet('bravo', ['resource', 'primary', 'a']);
  assert.equal(pb.code, 0, pb.describe() + c.describe());
  const wb = await python(PWRITE, [c.url('bravo', 'v'), '3', '8192']);
  assert.equal(wb.stdout.trim(), 'ok', wb.describe());
  // alpha still refuses: at most one Primary takes writes.
  const wa2 = await python(PWRITE, [c.url('alpha', 'v'), '4', '12288'], { timeoutMs: 20_000 });
  assert.match(wa2.stdout.trim(), /^error/, wa2.describe());
  // Heal; the admin steps alpha down; it resyncs from bravo.
  await cleanup.runAll();
  const sa = await c.duet('alpha', ['resource', 'secondary', 'a']);
  assert.equal(sa.code, 0, sa.describe());
  await waitStatus(c, 'bravo', 'healed', (s) => s.role === 'Primary' && inSync(s), 60_000);
  const r = await python(`import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint(h.pread(1,0)[0], h.pread(1,4096)[0], h.pread(1,8192)[0], h.pread(1,12288)[0])`, [c.url('bravo', 'v')]);
  assert.equal(r.stdout.trim(), '1 0 3 0', r.describe());
});

test('partition with a witness, on-no-quorum suspend: the cut-off Primary holds a write; when the partition heals it fails at once (the peer went on), secondary --force steps down and it resyncs by itself, no split brain', { skip: iptablesSkip() }, async (t) => {
  const { c, cleanup } = await alphaCutOff(t);
  // A write on alpha is held (its client waits), not failed.
  const held = python(PWRITE, [c.url('alpha', 'v'), '2', '4096'], { timeoutMs: 120_000 });
  await waitStatus(c, 'alpha', 'the write is held', (s) => s.suspended);
  // bravo reaches the witness: it is promoted and writes.
  const pb = await c.duet('bravo', ['resource', 'primary', 'a']);
  assert.equal(pb.code, 0, pb.describe() + c.describe());
  const wb = await python(PWRITE, [c.url('bravo', 'v'), '3', '8192']);
  assert.equal(wb.stdout.trim(), 'ok', wb.describe());
  // Heal: alpha learns bravo went on (from the witness or from bravo) and fails the held write.
  await cleanup.runAll();
  const ended = await held;
  assert.match(ended.stdout.trim(), /^error/, `the held write must fail: bravo went on without alpha\n${ended.describe()}`);
  const st = await c.status('alpha');
  assert.ok(st.fencedOff, `alpha is fenced off: ${JSON.stringify(st)}`);
  const sa = await c.duet('alpha', ['resource', 'secondary', 'a', '--force'], { timeoutMs: 20_000 });
  assert.equal(sa.code, 0, sa.describe() + c.describe());
  // alpha resyncs from bravo by itself: no split brain, its never-acknowledged write is gone.
  await waitStatus(c, 'bravo', 'healed', (s) => s.role === 'Primary' && inSync(s), 60_000);
  assert.equal((await c.status('bravo')).splitBrain, null);
  assert.equal((await c.status('alpha')).splitBrain, null);
  const r = await python(`import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint(h.pread(1,0)[0], h.pread(1,4096)[0], h.pread(1,8192)[0])`, [c.url('bravo', 'v')]);
  assert.equal(r.stdout.trim(), '1 0 3', r.describe());
});

test("a witness-outdated Secondary is refused promotion without --force", { skip: iptablesSkip() }, async (t) => {
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  const c = await makeCluster(t, { witness: true });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'initial sync', (s) => s.role === 'Primary' && inSync(s));
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v', '--size', '64M'])).code, 0);
  await cut(cleanup, ADDRESS.alpha, ADDRESS.bravo, `duet-test-${process.pid}`);
  await waitStatus(c, 'alpha', 'alpha lost bravo', (s) => s.peers[0].connection !== 'Connected');
  // alpha goes on writing: it outdates bravo at the witness first.
  const w = await python(PWRITE, [c.url('alpha', 'v'), '7', '0']);
  assert.equal(w.stdout.trim(), 'ok', w.describe());
  await waitStatus(c, 'bravo', 'bravo Outdated', (s) => s.disk === 'Outdated');
  const p = await c.duet('bravo', ['resource', 'primary', 'a']);
  assert.equal(p.code, 1, p.describe()); // a refusal because of state (CONTRACT)
  assert.match(p.stderr, /Outdated/);
  await cleanup.runAll();
  await waitStatus(c, 'bravo', 'bravo resynced', (s) => inSync(s), 60_000);
});

function fuseSkip(): string | false {
  if (!fs.existsSync('/dev/fuse')) return '/dev/fuse is missing';
  if (process.getuid?.() !== 0) return 'needs root';
  for (const p of ['nbdkit', 'nbdfuse', 'fusermount3']) if (!haveProgram(p)) return `${p} is not installed`;
  return false;
}

test("EIO on the Primary's disk: it detaches (Diskless) and the NBD client sees no error; reads come from the peer", { skip: fuseSkip() }, async (t) => {
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  // alpha's disk: a file served by nbdkit with the error filter (errors while FAIL exists), imported through nbdfuse.
  const base = fs.mkdtempSync('/tmp/duet-eio-');
  cleanup.push('remove dir', async () => fs.rmSync(base, { recursive: true, force: true }));
  const img = path.join(base, 'alpha-real.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 512 * MiB);
  const failFile = path.join(base, 'FAIL');
  const sock = path.join(base, 'nbdkit.sock');
  const kit = spawnTracked(t, 'nbdkit', ['-f', '-U', sock, '--filter=error', 'file', img, 'error-rate=100%', `error-file=${failFile}`, 'error=EIO']);
  cleanup.push('stop nbdkit', async () => {
    kit.child.kill('SIGTERM');
    await withTimeout(kit.exited, 10_000, 'nbdkit exit').catch(() => kit.child.kill('SIGKILL'));
  });
  await waitFor(() => fs.existsSync(sock), 10_000, 'nbdkit socket');
  const mnt = path.join(base, 'fuse');
  fs.mkdirSync(mnt);
  const fuse = spawnTracked(t, 'nbdfuse', [mnt, `nbd+unix:///?socket=${sock}`]);
  cleanup.push('unmount nbdfuse', async () => {
    const r = await run('fusermount3', ['-u', mnt]);
    if (r.code !== 0) await run('fusermount3', ['-uz', mnt]);
    await withTimeout(fuse.exited, 10_000, 'nbdfuse exit').catch(() => fuse.child.kill('SIGKILL'));
  });
  await waitFor(() => fs.existsSync(path.join(mnt, 'nbd')) || fuse.child.exitCode !== null, 10_000, 'nbdfuse');
  // Manual failover: this is about the resource going Diskless; the cluster manager's move off the failed disk has its own test.
  const c = await makeCluster(t, { disks: { alpha: path.join(mnt, 'nbd'), bravo: path.join(base, 'bravo.img') }, diskBytes: 512 * MiB, failover: 'manual' });
  // The cluster's processes must stop before the FUSE mount goes (cleanup runs last-in first-out).
  cleanup.push('stop nodes', async () => {
    await c.kill('alpha');
    await c.kill('bravo');
  });
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'initial sync', (s) => s.role === 'Primary' && inSync(s), 60_000);
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v', '--size', '64M'])).code, 0);
  const w1 = await python(PWRITE, [c.url('alpha', 'v'), '1', '0']);
  assert.equal(w1.stdout.trim(), 'ok', w1.describe());
  fs.writeFileSync(failFile, '');
  const w2 = await python(PWRITE, [c.url('alpha', 'v'), '2', '4096']);
  assert.equal(w2.stdout.trim(), 'ok', `the client saw the disk error\n${w2.describe()}\n${c.describe()}`);
  const s = await waitStatus(c, 'alpha', 'alpha Diskless', (x) => x.disk === 'Diskless');
  assert.equal(s.role, 'Primary');
  assert.match(c.procs.get('alpha')!.err(), /disk-detached/);
  const r = await python(`import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint(h.pread(1,0)[0], h.pread(1,4096)[0])`, [c.url('alpha', 'v')]);
  assert.equal(r.stdout.trim(), '1 2', r.describe());
  const bravo = await c.status('bravo');
  assert.equal(bravo.disk, 'UpToDate');
  assert.equal(bravo.peers[0].disk, 'Diskless');
});

test('a peer with another secret is refused and logged; nothing is synced', async (t) => {
  const c = await makeCluster(t);
  const other = path.join(c.dir, 'other.yaml');
  fs.writeFileSync(path.join(c.dir, 'other-secret'), 'a-completely-different-secret\n');
  fs.writeFileSync(other, fs.readFileSync(c.file, 'utf8').replace('secret: { file: secret }', 'secret: { file: other-secret }'));
  await c.start('alpha');
  await c.start('bravo', other);
  await waitFor(() => /does not know the cluster secret/.test(c.procs.get('alpha')!.err() + c.procs.get('bravo')!.err()), 15_000, 'the refusal in the logs');
  const s = await c.status('alpha');
  assert.notEqual(s.peers[0].connection, 'Connected');
  assert.equal(s.disk, 'Inconsistent', 'nothing was synced');
  // The node with the wrong secret cannot be driven with the cluster's secret either.
  const r = await c.duet('bravo', ['resource', 'status']);
  assert.equal(r.code, 2, r.describe());
  // Its API's certificate comes from its own secret's CA: the CLI does not even send the token.
  assert.match(r.stderr, /its TLS certificate is not the cluster's/);
});
