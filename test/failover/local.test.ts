/**
 * The cluster manager on loopback addresses (no VMs, no namespaces): the
 * takeover of a killed node, the fence command (its failure blocks the
 * takeover and alerts, a hanging one is bounded, `fence test` dry-runs
 * it), self-fencing of a node cut off from everyone, the webhook alert,
 * `events`, `cluster status`, and the bad input of drain and rejoin.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { Cleanup, python, until } from '../e2e/harness.js';
import { ADDRESS, HEARTBEAT_ADDRESS, cut, inSync, iptablesSkip, makeCluster, waitStatus, type Cluster } from '../e2e/cluster-harness.js';
import type { ClusterStatus, FenceTestReport } from '../../src/cluster/status.js';
import type { EventRecord } from '../../src/cluster/events.js';

/** A webhook receiver: every POSTed alert. */
/** A webhook that takes alerts (or, while `down`, answers 503 and keeps none). */
async function webhook(t: { after(fn: () => unknown): void }): Promise<{ url: string; alerts: Array<Record<string, unknown>>; down: boolean }> {
  const hook = { url: '', alerts: [] as Array<Record<string, unknown>>, down: false };
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (b: Buffer) => (body += b.toString()));
    req.on('end', () => {
      if (hook.down) return void res.writeHead(503).end();
      try {
        hook.alerts.push(JSON.parse(body) as Record<string, unknown>);
      } catch {
        // not an alert
      }
      res.end('ok');
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => (server.closeAllConnections(), server.close(() => resolve()))));
  hook.url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/hook`;
  return hook;
}


async function clusterStatus(c: Cluster, node: string): Promise<ClusterStatus> {
  const r = await c.duet(node, ['cluster', 'status', '--json']);
  assert.equal(r.code, 0, r.describe());
  return JSON.parse(r.stdout) as ClusterStatus;
}

async function events(c: Cluster, node: string): Promise<EventRecord[]> {
  const r = await c.duet(node, ['events', '--json']);
  assert.equal(r.code, 0, r.describe());
  return r.stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as EventRecord);
}

test('kill -9 of the Primary\'s daemon: its peer declares it dead at the witness, fences and takes over within seconds; status, events and a webhook alert say so', async (t) => {
  const hook = await webhook(t);
  const c = await makeCluster(t, { witness: true, extra: [`alerts: { webhook: { url: "${hook.url}" } }`] });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => s.role === 'Primary' && inSync(s), 60_000);
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v', '--size', '16M'])).code, 0);
  const before = await clusterStatus(c, 'bravo');
  assert.deepEqual(before.nodes.map((n) => [n.name, n.state]), [['bravo', 'online'], ['alpha', 'online']]);
  assert.equal(before.quorum, true);
  assert.deepEqual(before.warnings, []);
  const killedAt = Date.now();
  await c.kill('alpha');
  const s = await waitStatus(c, 'bravo', 'bravo Primary by itself', (x) => x.role === 'Primary', 30_000);
  const tookMs = Date.now() - killedAt;
  assert.equal(s.disk, 'UpToDate');
  // Exported at bravo's address: a client writes there.
  const w = await python('import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.pwrite(b"x"*4096,0)\nh.flush()\nprint("ok")', [c.url('bravo', 'v')]);
  assert.equal(w.stdout.trim(), 'ok', w.describe());
  const st = await clusterStatus(c, 'bravo');
  assert.equal(st.nodes.find((n) => n.name === 'alpha')?.state, 'fenced');
  assert.deepEqual(st.resources.map((r) => [r.name, r.primary]), [['a', 'bravo']]);
  assert.ok(st.lastTakeover?.complete);
  const ev = await events(c, 'bravo');
  const names = ev.map((e) => e.event);
  for (const e of ['node-lost', 'takeover-start', 'takeover-promoted', 'failover-done']) assert.ok(names.includes(e), `${e} in ${names.join(' ')}`);
  assert.ok(names.indexOf('node-lost') < names.indexOf('takeover-start'));
  for (const e of ev) assert.ok(typeof e.time === 'string' && typeof e.node === 'string' && typeof e.seq === 'number', JSON.stringify(e));
  // The plain listing: one line per event, the last ones with -n.
  const plain = await c.duet('bravo', ['events', '-n', '3']);
  assert.equal(plain.code, 0, plain.describe());
  assert.equal(plain.stdout.trim().split('\n').length, 3, plain.stdout);
  const alert = await until(() => hook.alerts.find((a) => a.event === 'failover-done'), 30_000, () => `the failover alert (got ${hook.alerts.map((a) => a.event).join(', ')})`);
  assert.equal(alert.node, 'alpha');
  assert.ok(hook.alerts.some((a) => a.event === 'node-lost'));
  t.diagnostic(`kill -9 to bravo Primary: ${tookMs} ms`);
});

test('two nodes, no witness: a failing fence command blocks the takeover and alerts; a hanging one is cut at its timeout; fence test dry-runs it; once it works, the takeover goes on', async (t) => {
  const hook = await webhook(t);
  const dir = fs.mkdtempSync('/tmp/duet-fence-');
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const script = path.join(dir, 'fence.sh');
  // Powers "off" a node by writing a line; fails until ALLOW exists; `status` answers only whether it could.
  fs.writeFileSync(script, `#!/bin/sh\necho "$1 $2" >> ${dir}/calls\n[ -e ${dir}/HANG ] && sleep 100\n[ -e ${dir}/ALLOW ] || { echo "plug ${'$'}1 does not answer" >&2; exit 3; }\necho "power $2 for $1"\n`, { mode: 0o755 });
  const c = await makeCluster(t, { extra: [`fence: { command: ${script}, timeout: 2s }`, `alerts: { webhook: { url: "${hook.url}" } }`] });
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => s.role === 'Primary' && inSync(s), 60_000);
  const st = await clusterStatus(c, 'bravo');
  assert.match(st.warnings.join('\n'), /no witness: a lost peer cannot be told from a cut link; takeover relies on the fence command/);
  // The dry run: exit 1 while the command fails, naming why; exit 0 once it works.
  const dry = await c.duet('bravo', ['fence', 'test', 'alpha']);
  assert.equal(dry.code, 1, dry.describe());
  assert.match(dry.stdout, /fence command, dry run: fence command \(status alpha\) failed with exit code 3: plug alpha does not answer/);
  assert.match(dry.stdout, /it would promote a here/);
  fs.writeFileSync(path.join(dir, 'ALLOW'), '');
  const ok = await c.duet('bravo', ['fence', 'test', 'alpha', '--json']);
  assert.equal(ok.code, 0, ok.describe());
  assert.equal((JSON.parse(ok.stdout) as FenceTestReport).command?.ok, true);
  fs.writeFileSync(path.join(dir, 'HANG'), '');
  const hung = await c.duet('bravo', ['fence', 'test', 'alpha']);
  assert.equal(hung.code, 1, hung.describe());
  assert.match(hung.stdout, /did not finish within 2 s \(killed\)/);
  fs.rmSync(path.join(dir, 'HANG'));
  fs.rmSync(path.join(dir, 'ALLOW'));
  assert.ok(!fs.readFileSync(path.join(dir, 'calls'), 'utf8').includes('off'), 'a dry run never powers off');
  // alpha dies: the fence command fails, nothing is taken over, an alert says why.
  await c.kill('alpha');
  await until(() => hook.alerts.find((a) => a.event === 'fence-failed'), 30_000, () => `the fence-failed alert (got ${hook.alerts.map((a) => a.event).join(', ')})`);
  assert.equal((await c.status('bravo')).role, 'Secondary', 'no takeover while the fence fails');
  fs.writeFileSync(path.join(dir, 'ALLOW'), '');
  await waitStatus(c, 'bravo', 'bravo Primary once alpha is fenced', (x) => x.role === 'Primary', 60_000);
  assert.match(fs.readFileSync(path.join(dir, 'calls'), 'utf8'), /^alpha off$/m);
  await until(() => hook.alerts.find((a) => a.event === 'failover-done'), 30_000, () => 'the failover alert');
});

/**
 * alpha Primary of a with the witness, volume pa/v, then cut off from bravo and the witness (its main
 * address; `secondPath`: the heartbeat's second addresses stay up). `cleanup` heals.
 */
async function alphaCutOff(t: { after(fn: () => unknown): void }, secondPath: boolean): Promise<{ c: Cluster; cleanup: Cleanup; cutAt: number }> {
  const cleanup = new Cleanup();
  t.after(() => cleanup.runAll());
  const c = await makeCluster(t, { witness: true, heartbeatAddresses: secondPath });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => s.role === 'Primary' && inSync(s), 60_000);
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v', '--size', '16M'])).code, 0);
  const tag = `duet-failover-${process.pid}`;
  await cut(cleanup, ADDRESS.alpha, ADDRESS.bravo, tag);
  await cut(cleanup, ADDRESS.alpha, ADDRESS.witness, tag);
  return { c, cleanup, cutAt: Date.now() };
}

test('a node cut off from its peer and the witness fences itself: its NBD clients are cut off, no write is acknowledged; its peer takes over; healed, it steps down and resyncs', { skip: iptablesSkip() }, async (t) => {
  const { c, cleanup, cutAt } = await alphaCutOff(t, false);
  await waitStatus(c, 'bravo', 'bravo takes over', (x) => x.role === 'Primary', 30_000);
  // alpha (asked through its own address, which still works from here) fenced itself first.
  const ev = await events(c, 'alpha');
  const fenced = ev.find((e) => e.event === 'self-fenced' && Date.parse(e.time) >= cutAt);
  assert.ok(fenced, ev.map((e) => e.event).join(' '));
  const took = (await events(c, 'bravo')).find((e) => e.event === 'takeover-start' && Date.parse(e.time) >= cutAt);
  assert.ok(took && Date.parse(fenced.time) < Date.parse(took.time), `self-fenced ${fenced.time}, takeover ${took?.time}`);
  const st = await clusterStatus(c, 'alpha');
  assert.equal(st.quorum, false);
  assert.equal(st.nodes.find((n) => n.name === 'alpha')?.state, 'fenced');
  // Its exports refuse everyone.
  const w = await python('import nbd,sys\nh=nbd.NBD()\ntry:\n  h.connect_uri(sys.argv[1])\n  h.pwrite(b"y"*4096,0)\n  h.flush()\n  print("ok")\nexcept nbd.Error as e:\n  print("error")', [c.url('alpha', 'v')], { timeoutMs: 20_000 });
  assert.equal(w.stdout.trim(), 'error', w.describe());
  await cleanup.runAll();
  // Healed: alpha steps down (the cluster went on without it) and resyncs from bravo by itself.
  await waitStatus(c, 'alpha', 'alpha Secondary and in sync', (x) => x.role === 'Secondary' && inSync(x), 60_000);
  assert.equal((await clusterStatus(c, 'alpha')).quorum, true);
});

test('a node whose main address is cut off (its peer link and the witness gone) but heard on the heartbeat\'s second path cannot serve: its held write is never acknowledged, it fences itself and yields; its peer takes over; healed, it steps down and resyncs', { skip: iptablesSkip() }, async (t) => {
  const { c, cleanup, cutAt } = await alphaCutOff(t, true);
  // A write on alpha now must wait for the witness (alpha would write without its peer): it is held.
  const w = python('import nbd,sys\nh=nbd.NBD()\ntry:\n  h.connect_uri(sys.argv[1])\n  h.pwrite(b"y"*4096,0)\n  h.flush()\n  print("ok")\nexcept nbd.Error as e:\n  print("error", e)', [c.url('alpha', 'v')], { timeoutMs: 60_000 });
  // bravo still hears alpha on the second path: alpha is not silent, yet it is taken over.
  await waitStatus(c, 'bravo', 'bravo takes over', (x) => x.role === 'Primary', 30_000);
  const st = await clusterStatus(c, 'bravo');
  const path2 = st.nodes.find((n) => n.name === 'alpha')?.paths?.find((p) => p.remote === HEARTBEAT_ADDRESS.alpha);
  assert.ok(path2 && path2.lastHeardMsAgo !== null && path2.lastHeardMsAgo < 2000, JSON.stringify(st.nodes));
  const ev = await events(c, 'alpha');
  const fenced = ev.find((e) => e.event === 'self-fenced' && Date.parse(e.time) >= cutAt);
  assert.ok(fenced && /cannot serve/.test(String(fenced.why)), ev.map((e) => `${e.event} ${String(e.why ?? '')}`).join('\n'));
  assert.ok(ev.some((e) => e.event === 'node-yields'));
  assert.ok(!ev.some((e) => e.event === 'quorum-lost' && Date.parse(e.time) >= cutAt), 'it never lost quorum (its peer hears it): it yielded');
  assert.equal((await clusterStatus(c, 'alpha')).nodes.find((n) => n.name === 'alpha')?.state, 'fenced');
  const bravoEv = await events(c, 'bravo');
  const took = bravoEv.find((e) => e.event === 'takeover-start' && Date.parse(e.time) >= cutAt);
  assert.ok(took && Date.parse(fenced.time) < Date.parse(took.time), `self-fenced ${fenced.time}, takeover ${took?.time}`);
  assert.match(String(bravoEv.find((e) => e.event === 'node-lost' && Date.parse(e.time) >= cutAt)?.why), /cannot serve/);
  // The held write was never acknowledged.
  const wr = await w;
  assert.match(wr.stdout, /^error/, wr.describe());
  await cleanup.runAll();
  // Healed: alpha steps down (bravo went on without it) and resyncs; it stops yielding and is back.
  await waitStatus(c, 'alpha', 'alpha Secondary and in sync', (x) => x.role === 'Secondary' && inSync(x), 60_000);
  await until(async () => (await clusterStatus(c, 'bravo')).nodes.find((n) => n.name === 'alpha')?.state === 'online' || undefined, 30_000, 'alpha back in the cluster');
  assert.equal((await clusterStatus(c, 'alpha')).nodes.find((n) => n.name === 'alpha')?.state, 'online');
});

test('bad input: rejoin or drain of an unknown node, a rejoin of a node that is down, a drain with nowhere to go', async (t) => {
  const c = await makeCluster(t, { witness: true });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => s.role === 'Primary' && inSync(s), 60_000);
  const unknown = await c.duet('alpha', ['node', 'rejoin', 'charlie']);
  assert.equal(unknown.code, 2, unknown.describe());
  assert.match(unknown.stderr, /^duet: node rejoin charlie: no node named charlie in .* \(nodes: alpha, bravo\)\n$/);
  // A rejoin of a node that is in place: nothing to do, exit 0 (idempotent).
  const noop = await c.duet('alpha', ['node', 'rejoin', 'alpha']);
  assert.equal(noop.code, 0, noop.describe());
  assert.match(noop.stdout, /node alpha rejoined/);
  await c.kill('bravo');
  const down = await c.duet('alpha', ['node', 'rejoin', 'bravo']);
  assert.equal(down.code, 1, down.describe());
  assert.match(down.stderr, /^duet: node bravo does not answer .*: start its daemon \(duet node run --node bravo\) and try again\n$/);
  const nowhere = await c.duet('alpha', ['node', 'drain', 'alpha']);
  assert.equal(nowhere.code, 1, nowhere.describe());
  assert.match(nowhere.stderr, /^duet: node bravo does not answer|^duet: node drain alpha: bravo is (offline|fenced): its VMs would have nowhere to run\n$/);
});

test('a declaration that outlived its reason (the declaring daemon restarted and never saw its peer dead) is cleared: the declared node keeps its witness vote and takes over when the other dies', async (t) => {
  const c = await makeCluster(t, { witness: true, extra: ['startup: { waitForPeer: 2 }'] });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => s.role === 'Primary' && inSync(s), 60_000);
  // bravo dies: alpha declares it dead at the witness (nothing to take over: alpha is Primary already).
  await c.kill('bravo');
  await until(async () => (await events(c, 'alpha')).some((e) => e.event === 'failover-done'), 30_000, () => 'alpha took bravo over');
  // alpha's daemon restarts and bravo comes back: the new alpha never saw bravo dead.
  await c.kill('alpha');
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'bravo', 'bravo back in sync', (s) => inSync(s), 60_000);
  await waitStatus(c, 'alpha', 'alpha Primary', (s) => s.role === 'Primary', 60_000);
  // alpha dies: bravo must have its witness vote back, or it fences itself instead of taking over.
  await new Promise((r) => setTimeout(r, 2000));
  await c.kill('alpha');
  await waitStatus(c, 'bravo', 'bravo takes over', (s) => s.role === 'Primary', 30_000);
  assert.ok(!(await events(c, 'bravo')).some((e) => e.event === 'self-fenced'), 'bravo fenced itself');
});

test('two nodes, no witness: a node that comes up alone never fences or takes over a peer it has not heard since it started (its copy may be the old one)', async (t) => {
  const dir = fs.mkdtempSync('/tmp/duet-fence-');
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const script = path.join(dir, 'fence.sh');
  fs.writeFileSync(script, `#!/bin/sh\necho "$1 $2" >> ${dir}/calls\n`, { mode: 0o755 });
  const c = await makeCluster(t, { extra: [`fence: { command: ${script}, timeout: 2s }`, 'startup: { waitForPeer: 1 }'] });
  await c.start('bravo');
  await new Promise((r) => setTimeout(r, 8000));
  assert.ok(!fs.existsSync(path.join(dir, 'calls')), `bravo fenced alpha: ${fs.existsSync(path.join(dir, 'calls')) ? fs.readFileSync(path.join(dir, 'calls'), 'utf8') : ''}`);
  assert.equal((await c.status('bravo')).role, 'Secondary');
  const s = await clusterStatus(c, 'bravo');
  assert.equal(s.nodes.find((n) => n.name === 'alpha')?.state, 'offline');
});

test('the survivor\'s daemon restarted after a takeover takes over again at once (not after startup.waitForPeer): the peer it took over has not been heard since; the failover alert it could not send before it died is sent after', async (t) => {
  const hook = await webhook(t);
  hook.down = true;
  const c = await makeCluster(t, { witness: true, extra: ['startup: { waitForPeer: 600 }', `alerts: { webhook: { url: "${hook.url}" } }`] });
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => s.role === 'Primary' && inSync(s), 60_000);
  await c.kill('alpha');
  await waitStatus(c, 'bravo', 'bravo takes over', (s) => s.role === 'Primary', 30_000);
  // The webhook is down: the failover alert waits in bravo's spool when its daemon dies (kill -9).
  const spool = path.join(c.dir, 'home-bravo', 'alerts', 'webhook');
  const spooled = (): string[] => (fs.existsSync(spool) ? fs.readdirSync(spool).filter((f) => f.endsWith('.json')) : []);
  await until(() => spooled().some((f) => fs.readFileSync(path.join(spool, f), 'utf8').includes('failover-done')) || undefined, 30_000, () => `the failover alert in ${spool} (${spooled().join(', ')})`);
  await c.kill('bravo');
  hook.down = false;
  await c.start('bravo');
  const alert = await until(() => hook.alerts.find((a) => a.event === 'failover-done'), 30_000, () => `the failover alert after the restart (got ${hook.alerts.map((a) => a.event).join(', ')})`);
  assert.equal(alert.node, 'alpha');
  // Its restart left it Secondary; with a 10-minute waitForPeer only its record of the takeover brings it back.
  try {
    await waitStatus(c, 'bravo', 'bravo Primary again', (s) => s.role === 'Primary', 30_000);
  } catch (err) {
    throw new Error(`${(err as Error).message.slice(0, 300)}\nbravo's events:\n${(await events(c, 'bravo')).slice(-15).map((e) => `${e.time} ${e.event} ${e.message}`).join('\n')}`);
  }
});
