/**
 * The cluster commands' errors and the demo (`npm start` = `duet demo`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { DUET, haveProgram, readAt, ROOT, run, tmpDir, waitFor, withTimeout } from './harness.js';
import { inSync, killVms, makeCluster, waitStatus } from './cluster-harness.js';

const duet = (args: string[], env: NodeJS.ProcessEnv = process.env) => run(process.execPath, [DUET, ...args], { cwd: ROOT, timeoutMs: 20_000, env });

test('node run: an unknown node, a missing disk, a bad cluster file: one line naming what to fix, exit 2', async (t) => {
  const c = await makeCluster(t);
  const unknown = await duet(['node', 'run', '--config', c.file, '--node', 'charlie']);
  assert.equal(unknown.code, 2, unknown.describe());
  assert.match(unknown.stderr, /no node named charlie \(nodes: alpha, bravo\)/);
  assert.equal(unknown.stderr.trim().split('\n').length, 1, unknown.describe());

  const missing = path.join(c.dir, 'missing.yaml');
  fs.writeFileSync(missing, fs.readFileSync(c.file, 'utf8').replace(/alpha: [^,}]*alpha\.img/, 'alpha: /nonexistent/disk.img'));
  const nodisk = await duet(['node', 'run', '--config', missing, '--node', 'alpha']);
  assert.equal(nodisk.code, 2, nodisk.describe());
  assert.match(nodisk.stderr, /\/nonexistent\/disk\.img/);

  const small = path.join(c.dir, 'small.yaml');
  fs.writeFileSync(small, fs.readFileSync(c.file, 'utf8').replace('prefer: alpha,', 'prefer: alpha, size: 1G,'));
  const toosmall = await duet(['node', 'run', '--config', small, '--node', 'alpha']);
  assert.equal(toosmall.code, 2, toosmall.describe());
  assert.match(toosmall.stderr, /resource a: .*alpha\.img holds .* of data .* less than resources\.a\.size 1G .*: give this node a bigger disk/);

  const bad = path.join(c.dir, 'bad.yaml');
  fs.writeFileSync(bad, fs.readFileSync(c.file, 'utf8').replace('protocol: C', 'protocol: D'));
  const r = await duet(['node', 'run', '--config', bad, '--node', 'alpha']);
  assert.equal(r.code, 2, r.describe());
  assert.match(r.stderr, /bad\.yaml:\d+: resources\.a\.protocol: must be A, B or C/);
  fs.writeFileSync(bad, fs.readFileSync(c.file, 'utf8').replace('pa: { devices: [a] }', 'pa: { devices: [zz] }'));
  const r2 = await duet(['node', 'run', '--config', bad, '--node', 'alpha']);
  assert.equal(r2.code, 2, r2.describe());
  assert.match(r2.stderr, /bad\.yaml:\d+: pools\.pa\.devices\.0: no resource named zz/);

  const env = { ...process.env, DUET_CONFIG: c.file, DUET_NODE: 'alpha' };
  const down = await duet(['resource', 'status'], env);
  assert.equal(down.code, 2, down.describe());
  assert.match(down.stderr, /cannot reach the duet daemon of node alpha/);
  assert.equal(down.stderr.trim().split('\n').length, 1);
});

test('resource commands: unknown resource, resolve with a stranger, verify while not connected: clear errors, the daemon goes on', async (t) => {
  const c = await makeCluster(t);
  await c.start('alpha');
  const r1 = await c.duet('alpha', ['resource', 'primary', 'nosuch']);
  assert.equal(r1.code, 2);
  assert.match(r1.stderr, /no resource nosuch on node alpha \(resources here: a\)/);
  const r2 = await c.duet('alpha', ['resource', 'resolve', 'a', '--keep', 'zulu']);
  assert.equal(r2.code, 2);
  assert.match(r2.stderr, /--keep names zulu, which is not one of its nodes/);
  const r3 = await c.duet('alpha', ['resource', 'verify', 'a']);
  assert.equal(r3.code, 1); // a refusal because of state (CONTRACT)
  assert.match(r3.stderr, /not connected to bravo/);
  const r4 = await c.duet('alpha', ['resource', 'primary', 'a']);
  assert.equal(r4.code, 1); // a refusal because of state (CONTRACT)
  assert.match(r4.stderr, /Inconsistent.*--force/);
  const r5 = await c.duet('alpha', ['vol', 'list', 'pa']);
  assert.equal(r5.code, 1); // a refusal because of state (CONTRACT)
  assert.match(r5.stderr, /pool pa is not open on alpha/);
  const s = await c.status('alpha');
  assert.equal(s.role, 'Secondary');
});

test('a disk without metadata: the node reports it and keeps that resource down while serving the other; create-md brings it up; a disk in use is refused to create-md, offline commands and a second daemon', async (t) => {
  const c = await makeCluster(t, { createMd: false, resourceB: true });
  const alphaDisk = path.join(c.dir, 'alpha.img');
  const missing = `disk ${alphaDisk} of resource a has no duet metadata: run duet resource create-md a`;
  // Every disk but alpha's of resource a gets its metadata.
  for (const [node, res] of [['bravo', 'a'], ['alpha', 'b'], ['bravo', 'b']]) {
    const r = await c.duet(node, ['resource', 'create-md', res]);
    assert.equal(r.code, 0, r.describe());
    assert.match(r.stdout, new RegExp(`^resource ${res}: fresh duet metadata on .*${node}-?b?\\.img, .* of data, Inconsistent until its first sync; start the node`));
  }
  const alpha = await c.start('alpha');
  await c.start('bravo');
  assert.match(alpha.out(), new RegExp(`resource a: down: ${missing.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
  const logged = alpha.err().split('\n').filter((l) => l.includes('"no-metadata"')).map((l) => JSON.parse(l) as { msg: string });
  assert.deepEqual(logged.map((l) => l.msg), [missing]);
  // Resource a stays down; the daemon serves b: its initial sync, its pool, a volume.
  const a = await c.status('alpha', 'a');
  assert.equal(a.down, missing);
  assert.equal(a.disk, 'Diskless');
  assert.equal(a.role, 'Secondary');
  assert.equal(a.peers[0].connection, 'StandAlone');
  const tail = readAt(alphaDisk, fs.statSync(alphaDisk).size - 1024 * 1024, 1024 * 1024);
  assert.ok(tail.every((b) => b === 0), 'the node wrote metadata on its own');
  await waitStatus(c, 'alpha', 'resource b synced and Primary', (s) => s.role === 'Primary' && inSync(s), 60_000, 'b');
  const vol = await c.duet('alpha', ['vol', 'create', 'pb/v', '--size', '16M']);
  assert.equal(vol.code, 0, vol.describe());
  const text = await c.duet('alpha', ['resource', 'status']);
  assert.match(text.stdout, new RegExp(`^a role:Secondary disk:Diskless protocol:C\n  down: disk .* has no duet metadata: run duet resource create-md a$`, 'm'));
  const primary = await c.duet('alpha', ['resource', 'primary', 'a']);
  assert.equal(primary.code, 1, primary.describe());
  assert.equal(primary.stderr, `duet: resource a is down on alpha: ${missing}\n`);

  // create-md while the resource is down: the daemon does not hold that disk; told, it brings the resource up.
  const md = await c.duet('alpha', ['resource', 'create-md', 'a']);
  assert.equal(md.code, 0, md.describe());
  assert.match(md.stdout, /; node alpha brought it up\n$/);
  await waitStatus(c, 'alpha', 'resource a synced and Primary', (s) => s.role === 'Primary' && inSync(s) && s.down === null, 60_000);

  // Now the daemon holds the disk: create-md (even forced), an offline pool command, serve and a second daemon are refused.
  const holder = new RegExp(`^duet: (resource a: )?disk ${alphaDisk.replace(/[.]/g, '\\.')} is in use by pid ${alpha.child.pid} \\(duet --home \\S+ node run --config \\S+ --node alpha\\): stop that process first`);
  for (const force of [[], ['--force']]) {
    const r = await c.duet('alpha', ['resource', 'create-md', 'a', ...force]);
    assert.equal(r.code, 1, r.describe());
    assert.match(r.stderr, holder);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.describe());
  }
  for (const env of [process.env, { ...process.env, DUET_NO_NATIVE: '1' }]) {
    const pool = await duet(['--home', path.join(c.dir, 'home-offline'), 'pool', 'create', 'p', alphaDisk], env);
    assert.equal(pool.code, 2, pool.describe());
    assert.match(pool.stderr, holder);
    const serve = await duet(['serve', alphaDisk, '--listen', '127.0.0.1:0'], env);
    assert.equal(serve.code, 2, serve.describe());
    assert.match(serve.stderr, holder);
    const second = await duet(['--home', path.join(c.dir, 'home-second'), 'node', 'run', '--config', c.file, '--node', 'alpha'], env);
    assert.equal(second.code, 1, second.describe());
    assert.match(second.stderr, holder);
    assert.equal(second.stderr.trim().split('\n').length, 1, second.describe());
  }
  assert.equal((await c.status('alpha', 'a')).role, 'Primary', 'the refusals disturbed the running node');

  // Stopped: create-md refuses the disk that has metadata unless forced.
  await c.kill('alpha', 'SIGTERM');
  const again = await c.duet('alpha', ['resource', 'create-md', 'a']);
  assert.equal(again.code, 1, again.describe());
  assert.match(again.stderr, new RegExp(`^duet: disk ${alphaDisk.replace(/[.]/g, '\\.')} of resource a already holds duet metadata \\(resource a, disk UpToDate, generation [0-9a-f]{16}\\): use --force`));
  const forced = await c.duet('alpha', ['resource', 'create-md', 'a', '--force']);
  assert.equal(forced.code, 0, forced.describe());
  assert.match(forced.stdout, /replaced metadata of a UpToDate disk/);
});

test('npm start (duet demo): two nodes and a witness come up, the demo volume is served, a VM ticks on alpha, Ctrl-C stops them all', { timeout: 240_000 }, async (t) => {
  // Removed by the hook below, after the VM the demo started (its pid file is in it).
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-demo-'));
  // Its own process group: if the test fails midway, the demo and the nodes it started go together.
  const child = spawn(process.execPath, [DUET, 'demo', '--data', dir, '--size', String(256 * 1024 * 1024)], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let out = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.after(() => {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      /* the group is gone already */
    }
    // The VM's QEMU is in its own session (it outlives its daemon on purpose).
    killVms(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  await waitFor(() => /Ctrl-C stops the cluster/.test(out) || child.exitCode !== null, 90_000, `the demo to come up:\n${out}`);
  assert.match(out, /exported by the Primary at nbd:\/\/127\.0\.0\.1:10809\/demo/);
  assert.match(out, /r0 role:Primary disk:UpToDate/);
  if (haveProgram('qemu-system-x86_64') || process.env.CI === 'true') {
    assert.match(out, /vm web runs on alpha from volume demo\/web \(QEMU, (TCG|KVM)[^)]*\); its console: tick \d+ boot=[0-9a-f]{8}/);
    assert.match(out, /vm migrate web --to bravo/);
    assert.match(out, /vm console web --follow/);
  }
  const info = await run('nbdinfo', ['--size', 'nbd://127.0.0.1:10809/demo']);
  assert.equal(info.stdout.trim(), String(1024 * 1024 * 1024), info.describe());
  // The dashboard line: its URL and token work, over TLS checked against the CA file it names.
  const dash = /dashboard: (https:\/\/127\.0\.0\.\d+:7800\/) .*sign in with the token (\S+)\n\s+the browser trusts it once the cluster CA is imported: (\S+)/.exec(out);
  assert.ok(dash, out);
  const ca = fs.readFileSync(dash[3], 'utf8');
  const page = await httpsGet(`${dash[1]}`, ca);
  assert.equal(page.status, 200);
  assert.match(page.body, /<title>duet<\/title>/);
  const status = await httpsGet(`${dash[1]}api/v1/status`, ca, dash[2]);
  assert.equal(status.status, 200, status.body);
  assert.equal((JSON.parse(status.body) as { cluster: string }).cluster, 'demo');
  const pids = [...fs.readdirSync(path.join(dir, 'logs'))];
  assert.deepEqual(pids.sort(), ['alpha.log', 'bravo.log', 'witness.log']);
  const vmsRun = haveProgram('qemu-system-x86_64') || process.env.CI === 'true';
  if (vmsRun) {
    // The printed hint: kill -9 alpha's daemon and its VM; bravo takes over (web boots there, db runs on untouched).
    const hint = /kill -9 (\d+) \$\(cat (\S+)\)/.exec(out);
    assert.ok(hint, out);
    process.kill(Number(hint[1]), 'SIGKILL');
    process.kill(Number(fs.readFileSync(hint[2], 'utf8')), 'SIGKILL');
    const file = path.join(dir, 'cluster.yaml');
    await waitFor(
      () => {
        const r = spawnSync(process.execPath, [DUET, '--config', file, '--node', 'bravo', 'cluster', 'status', '--json'], { encoding: 'utf8', timeout: 20_000 });
        if (r.status !== 0) return false;
        const s = JSON.parse(r.stdout) as { vms: { name: string; node: string | null; state: string }[]; nodes: { name: string; state: string }[] };
        return s.vms.every((v) => v.node === 'bravo' && v.state === 'running') && s.nodes.find((n) => n.name === 'alpha')?.state === 'fenced';
      },
      90_000,
      'bravo running web and db after alpha was killed',
      1000,
    );
  }
  child.kill('SIGINT');
  assert.equal(await withTimeout(exited, 30_000, 'demo exit'), 0);
  // Its nodes are gone too: the export no longer answers.
  const after = await run('nbdinfo', ['--size', 'nbd://127.0.0.2:10809/demo'], { timeoutMs: 10_000 });
  assert.notEqual(after.code, 0);
  // And its VMs: none of their QEMUs runs on (they are stopped with the demo).
  await waitFor(() => liveQemus(dir).length === 0, 20_000, `the demo VMs stopped with the demo: ${liveQemus(dir).join(', ')}`);
});

/** QEMUs of the demo's pid files that still run. */
function liveQemus(dir: string): string[] {
  const out: string[] = [];
  for (const home of fs.readdirSync(dir).filter((d) => d.startsWith('home-'))) {
    const vms = path.join(dir, home, 'vms');
    if (!fs.existsSync(vms)) continue;
    for (const vm of fs.readdirSync(vms)) {
      try {
        const pid = Number(fs.readFileSync(path.join(vms, vm, 'qemu.pid'), 'utf8'));
        if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(path.join(vms, vm))) out.push(`${home}/${vm} (${pid})`);
      } catch {
        // no pid file, or the process is gone
      }
    }
  }
  return out;
}

function httpsGet(url: string, ca: string, token?: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = https.get(url, { ca, agent: false, headers: token ? { authorization: `Bearer ${token}` } : {} }, (res) => {
      let body = '';
      res.on('data', (b: Buffer) => (body += b.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.setTimeout(10_000, () => req.destroy(new Error(`${url}: no answer`)));
    req.on('error', reject);
  });
}
