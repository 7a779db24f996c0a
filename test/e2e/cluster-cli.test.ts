/**
 * The cluster commands' errors and the demo (`npm start` = `duet demo`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DUET, ROOT, run, tmpDir, waitFor, withTimeout } from './harness.js';
import { makeCluster } from './cluster-harness.js';

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
  assert.equal(r3.code, 2);
  assert.match(r3.stderr, /not connected to bravo/);
  const r4 = await c.duet('alpha', ['resource', 'primary', 'a']);
  assert.equal(r4.code, 2);
  assert.match(r4.stderr, /Inconsistent.*--force/);
  const r5 = await c.duet('alpha', ['vol', 'list', 'pa']);
  assert.equal(r5.code, 2);
  assert.match(r5.stderr, /pool pa is not open on alpha/);
  const s = await c.status('alpha');
  assert.equal(s.role, 'Secondary');
});

test('npm start (duet demo): two nodes and a witness come up, the demo volume is served, Ctrl-C stops them all', async (t) => {
  const dir = tmpDir(t, 'duet-demo-');
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
  });
  await waitFor(() => /Ctrl-C stops the cluster/.test(out) || child.exitCode !== null, 90_000, `the demo to come up:\n${out}`);
  assert.match(out, /exported by the Primary at nbd:\/\/127\.0\.0\.1:10809\/demo/);
  assert.match(out, /r0 role:Primary disk:UpToDate/);
  const info = await run('nbdinfo', ['--size', 'nbd://127.0.0.1:10809/demo']);
  assert.equal(info.stdout.trim(), String(1024 * 1024 * 1024), info.describe());
  const pids = [...fs.readdirSync(path.join(dir, 'logs'))];
  assert.deepEqual(pids.sort(), ['alpha.log', 'bravo.log', 'witness.log']);
  child.kill('SIGINT');
  assert.equal(await withTimeout(exited, 30_000, 'demo exit'), 0);
  // Its nodes are gone too: the export no longer answers.
  const after = await run('nbdinfo', ['--size', 'nbd://127.0.0.1:10809/demo'], { timeoutMs: 10_000 });
  assert.notEqual(after.code, 0);
});
