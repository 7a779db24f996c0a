/**
 * `duet doctor` on a healthy node and on a broken one (a missing disk, a
 * disk without metadata, a busy port, a secret others can read).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { DUET, ROOT, run } from './harness.js';
import { ADDRESS, inSync, makeCluster, waitStatus } from './cluster-harness.js';

interface Check {
  check: string;
  verdict: 'ok' | 'warning' | 'problem';
  detail: string;
}

test('doctor: a healthy node has no problem (each check one line); a broken one names each problem and its fix, exit 1', { timeout: 180_000 }, async (t) => {
  const c = await makeCluster(t, { diskBytes: 64 * 1024 * 1024, witness: true, resourceB: true });
  fs.chmodSync(path.join(c.dir, 'secret'), 0o600);
  await c.startWitness();
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'alpha Primary and in sync', (s) => s.role === 'Primary' && inSync(s));

  const text = await c.duet('alpha', ['doctor'], { timeoutMs: 60_000 });
  assert.equal(text.code, 0, text.describe());
  const lines = text.stdout.trim().split('\n');
  for (const l of lines) assert.match(l, /^(ok|warning|problem) +\S/, l);
  const json = await c.duet('alpha', ['doctor', '--json'], { timeoutMs: 60_000 });
  assert.equal(json.code, 0, json.describe());
  const checks = JSON.parse(json.stdout) as Check[];
  assert.equal(checks.length, lines.length, 'the same checks either way');
  const of = (name: string): Check => {
    const found = checks.find((x) => x.check === name);
    assert.ok(found, `check ${name} in ${JSON.stringify(checks.map((x) => x.check))}`);
    return found;
  };
  assert.deepEqual(checks.filter((x) => x.verdict === 'problem'), []);
  for (const name of ['secret', 'daemon', 'disk a', 'metadata a', 'disk b', 'metadata b', 'witness', 'clock bravo', 'home']) assert.equal(of(name).verdict, 'ok', JSON.stringify(of(name)));
  assert.match(of('clock bravo').detail, /ms (ahead|behind)/);
  assert.ok(['ok', 'warning'].includes(of('kvm').verdict));
  assert.ok(checks.some((x) => x.check.startsWith('port ') && /held by node alpha's daemon/.test(x.detail)));
  assert.equal(of('alerts').verdict, 'warning');
  assert.match(of('alerts').detail, /no alerts in .*nobody is told when a node fails/);

  // Broken: alpha stopped; its disk of b gone, its disk of a without metadata, its API port taken, the secret readable by all.
  await c.kill('alpha', 'SIGTERM');
  fs.chmodSync(path.join(c.dir, 'secret'), 0o644);
  const blank = path.join(c.dir, 'blank.img');
  fs.writeFileSync(blank, '');
  fs.truncateSync(blank, 64 * 1024 * 1024);
  const broken = path.join(c.dir, 'broken.yaml');
  const cfg = fs.readFileSync(c.file, 'utf8');
  fs.writeFileSync(broken, `${cfg.replace(path.join(c.dir, 'alpha-b.img'), path.join(c.dir, 'gone.img')).replace(path.join(c.dir, 'alpha.img'), blank)}alerts: { webhook: { url: "http://127.0.0.1:9/hook" } }\n`);
  // Two alerts the webhook never took, left in alpha's spool, and one damaged file set aside.
  const spool = path.join(c.dir, 'home-alpha', 'alerts', 'webhook');
  fs.mkdirSync(spool, { recursive: true });
  for (const f of ['000000000001.json', '000000000002.json', '000000000003.json.bad']) fs.writeFileSync(path.join(spool, f), '{}');
  const apiPort = Number(/api: \{ port: (\d+)/.exec(cfg)![1]);
  const squatter = net.createServer((s) => s.destroy());
  await new Promise<void>((resolve) => squatter.listen(apiPort, ADDRESS.alpha, resolve));
  t.after(() => new Promise<void>((resolve) => squatter.close(() => resolve())));
  const bad = await run(process.execPath, [DUET, '--home', path.join(c.dir, 'home-alpha'), '--config', broken, '--node', 'alpha', 'doctor', '--json'], { cwd: ROOT, timeoutMs: 60_000 });
  assert.equal(bad.code, 1, bad.describe());
  const found = JSON.parse(bad.stdout) as Check[];
  const problem = (name: string, re: RegExp): void => {
    const x = found.find((k) => k.check === name);
    assert.ok(x, `${name} in ${bad.stdout}`);
    assert.equal(x.verdict, 'problem', JSON.stringify(x));
    assert.match(x.detail, re);
  };
  problem('secret', /mode 644: others can read .*chmod 600/);
  problem(`port ${apiPort}`, /in use by another program: stop it .* or change api\.port/);
  problem('disk b', /gone\.img: missing: attach the disk, or fix resources\.b\.disk\.alpha/);
  problem('metadata a', /has no duet metadata: duet --config .* resource create-md a/);
  assert.equal(found.find((k) => k.check === 'daemon')?.verdict, 'warning');
  const alerts = found.find((k) => k.check === 'alerts');
  assert.equal(alerts?.verdict, 'warning', JSON.stringify(alerts));
  assert.match(alerts.detail, /2 webhook alert\(s\) not sent yet: is alerts\.webhook\.url \(http:\/\/127\.0\.0\.1:9\) reachable from here\?; 1 damaged webhook alert file\(s\) set aside/);
  // The text form: one line each, the problems among them.
  const badText = await run(process.execPath, [DUET, '--home', path.join(c.dir, 'home-alpha'), '--config', broken, '--node', 'alpha', 'doctor'], { cwd: ROOT, timeoutMs: 60_000 });
  assert.equal(badText.code, 1);
  assert.equal(badText.stdout.trim().split('\n').filter((l) => l.startsWith('problem')).length, found.filter((k) => k.verdict === 'problem').length);
});
