import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ConfigError, loadClusterConfig, parseClusterConfig } from '../../src/cluster/config.js';

/** The example of ../shared/ARCHITECTURE.md, with the witness on loopback-style addresses. */
const EXAMPLE = `cluster: home
secret: { file: /etc/duet/secret }      # HMAC key for peer links and the API
nodes:
  alpha: { address: 192.0.2.1 }
  bravo: { address: 192.0.2.2 }
witness: { address: 192.0.2.3 }           # optional third vote, no disk
resources:
  a: { protocol: C, port: 7801, disk: { alpha: /dev/sdb1, bravo: /dev/sdb1 }, prefer: alpha }
  b: { protocol: C, port: 7802, disk: { alpha: /dev/sdc1, bravo: /dev/sdc1 }, prefer: bravo }
pools:
  pa: { devices: [a] }
  pb: { devices: [b] }
exports: { port: 10809 }                  # each node serves at its own address
vms:
  web:   { disks: [pa/web],   memory: 1G, minMemory: 512M, cpus: 1, prefer: alpha, priority: 10 }
  media: { disks: [pb/media], memory: 2G, minMemory: 1G,   cpus: 2, prefer: bravo }
alerts: { email: { to: admin@example.org, smtp: "smtp://localhost:25" } }
`;

function problemsOf(text: string): string[] {
  try {
    parseClusterConfig(text, 'c.yaml');
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected a ConfigError, got ${(err as Error).stack}`);
    return err.problems.map((p) => `${p.line ?? '?'} ${p.path.join('.')}: ${p.message}`);
  }
  return [];
}

test('the architecture example parses, with defaults filled in', () => {
  const c = parseClusterConfig(EXAMPLE, 'c.yaml');
  assert.equal(c.cluster, 'home');
  assert.deepEqual(Object.keys(c.nodes), ['alpha', 'bravo']);
  assert.equal(c.resources.a.protocol, 'C');
  assert.equal(c.resources.b.prefer, 'bravo');
  assert.deepEqual(c.pools.pa.devices, ['a']);
  assert.equal(c.exports.port, 10809);
  assert.equal(c.vms.media.cpus, 2);
  const minimal = parseClusterConfig('cluster: x\nsecret: {value: "0123456789abcdef"}\nnodes: {a: {address: 127.0.0.2}}\n', 'm.yaml');
  assert.equal(minimal.exports.port, 10809);
  assert.deepEqual(minimal.resources, {});
  assert.equal(minimal.migration.maxDowntime, 100);
  assert.equal(minimal.startup.waitForPeer, 60);
});

test('migration and startup settings: their values, and one line per mistake', () => {
  const base = 'cluster: x\nsecret: {value: "0123456789abcdef"}\nnodes: {a: {address: 127.0.0.2}}\n';
  const c = parseClusterConfig(`${base}migration: { bandwidth: 100M, maxDowntime: 30 }\nstartup: { waitForPeer: 0 }\n`, 'm.yaml');
  assert.equal(c.migration.maxDowntime, 30);
  assert.equal(c.startup.waitForPeer, 0);
  const problems = problemsOf(`${base}migration: { maxDowntime: 0 }\nstartup: { waitForPeer: -1, wfc: 3 }\n`);
  assert.ok(problems.some((p) => /^4 migration\.maxDowntime: must be 1 ms or more$/.test(p)), problems.join('\n'));
  assert.ok(problems.some((p) => /^5 startup\.waitForPeer: must be 0 or more seconds$/.test(p)), problems.join('\n'));
  assert.ok(problems.some((p) => /^5 startup: unknown key "wfc"/.test(p)), problems.join('\n'));
});

test('every mistake is reported, each with its key path and line', () => {
  const bad = EXAMPLE.replace('protocol: C, port: 7801', 'protocol: D, port: 7802')
    .replace('address: 192.0.2.2', 'address: 300.1.1.1')
    .replace('pb: { devices: [b] }', 'pb: { devices: [b, zz] }')
    .replace('prefer: bravo', 'prefer: charlie')
    .replace('cpus: 2', 'cpus: 2, disk: 3');
  const problems = problemsOf(bad);
  // Schema mistakes come first (and stop the cross-checks); all of them at once.
  assert.ok(problems.some((p) => /^8 resources\.a\.protocol: must be A, B or C$/.test(p)), problems.join('\n'));
  assert.ok(problems.some((p) => /^5 nodes\.bravo\.address: is not an IP address/.test(p)), problems.join('\n'));
  assert.ok(problems.some((p) => /^16 vms\.media: unknown key "disk"/.test(p)), problems.join('\n'));
  assert.equal(problems.length, 3, problems.join('\n'));
});

test('cross-references: unknown nodes, resources, pools, clashing ports and addresses', () => {
  const bad = EXAMPLE.replace('port: 7802', 'port: 7801')
    .replace('disk: { alpha: /dev/sdc1, bravo: /dev/sdc1 }, prefer: bravo', 'disk: { alpha: /dev/sdc1, charlie: /dev/sdc1 }, prefer: bravo')
    .replace('pb: { devices: [b] }', 'pb: { devices: [b, a, zz] }')
    .replace('disks: [pb/media]', 'disks: [pq/media]')
    .replace('minMemory: 1G', 'minMemory: 3G')
    .replace('cpus: 2, prefer: bravo', 'cpus: 2, prefer: charlie')
    .replace('witness: { address: 192.0.2.3 }', 'witness: { address: 192.0.2.1 }');
  const problems = problemsOf(bad);
  const expect = [
    /^6 witness\.address: 192\.0\.2\.1 is node alpha's address/,
    /^9 resources\.b\.disk\.charlie: no node named charlie \(nodes: alpha, bravo\)/,
    /^9 resources\.b\.prefer: bravo has no disk in this resource/,
    /^9 resources\.b\.port: port 7801 is already used by resources\.a\.port/,
    /^12 pools\.pb\.devices\.1: resource a is already in pool pa/,
    /^12 pools\.pb\.devices\.2: no resource named zz/,
    /^12 pools\.pb\.devices: its resources prefer different nodes \(b: bravo, a: alpha\)/,
    /^16 vms\.media\.disks\.0: no pool named pq/,
    /^16 vms\.media\.prefer: no node named charlie/,
    /^16 vms\.media\.minMemory: 3G is more than memory \(2G\)/,
  ];
  for (const re of expect) assert.ok(problems.some((p) => re.test(p)), `missing ${re}\n${problems.join('\n')}`);
  assert.equal(problems.length, expect.length, problems.join('\n'));
});

test('missing keys, wrong secrets, YAML syntax errors, duplicate keys', () => {
  assert.deepEqual(problemsOf('nodes: {a: {address: 127.0.0.2}}\n'), ['1 cluster: is missing: name the cluster (cluster: home)', '1 secret: is missing: give the shared key of the cluster (secret: { file: /etc/duet/secret })']);
  assert.match(problemsOf('cluster: x\nsecret: {file: /a, value: "0123456789abcdef"}\nnodes: {a: {address: 127.0.0.2}}\n')[0], /^2 secret: give exactly one of file: PATH or value: TEXT/);
  assert.match(problemsOf('cluster: x\nsecret: {value: short}\nnodes: {a: {address: 127.0.0.2}}\n')[0], /^2 secret\.value: must be at least 16 characters/);
  assert.match(problemsOf('cluster: x\nnodes: [a\n')[0], /not valid YAML/);
  assert.match(problemsOf('cluster: x\ncluster: y\n')[0], /^2 : not valid YAML: Map keys must be unique/);
  assert.match(problemsOf('- a\n- b\n')[0], /must be a mapping/);
});

test('the error message a user sees names the file, line and key; a missing file says what to pass', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-config-'));
  try {
    const file = path.join(dir, 'cluster.yaml');
    fs.writeFileSync(file, EXAMPLE.replace('port: 7801', 'port: 70000'));
    assert.throws(() => loadClusterConfig(file), (err: Error) => {
      assert.equal(err.message, `${file}:8: resources.a.port: must be 1..65535`);
      return true;
    });
    fs.writeFileSync(file, EXAMPLE.replace('port: 7801', 'port: 70000').replace('cpus: 1', 'cpus: 0'));
    assert.throws(() => loadClusterConfig(file), (err: Error) => {
      assert.equal(err.message.split('\n')[0], `${file}: 2 mistakes:`);
      assert.match(err.message, /cluster\.yaml:15: vms\.web\.cpus: must be at least 1/);
      return true;
    });
    assert.throws(() => loadClusterConfig(path.join(dir, 'nope.yaml')), /nope\.yaml: no such cluster file \(give --config FILE or DUET_CONFIG\)/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('cluster timing: the short form has defaults; the long form takes durations; fence, webhook, vmMemory', () => {
  const base = 'secret: {value: "0123456789abcdef"}\nnodes: {a: {address: 127.0.0.2, vmMemory: 1G, heartbeatAddress: 10.0.0.2}}\n';
  const short = parseClusterConfig(`cluster: x\n${base}`, 'm.yaml');
  assert.equal(short.cluster, 'x');
  assert.deepEqual(short.membership, { deadTimeMs: 2000, selfFenceMs: 1000, heartbeatPort: 7797, failover: 'auto' });
  const long = parseClusterConfig(
    `cluster: { name: x, deadTime: 1500ms, selfFence: 0.5, heartbeatPort: 7000, failover: manual }\n${base}fence: { command: /bin/true, timeout: 5s }\nalerts: { webhook: { url: "http://127.0.0.1:9/hook" } }\n`,
    'm.yaml',
  );
  assert.equal(long.cluster, 'x');
  assert.deepEqual(long.membership, { deadTimeMs: 1500, selfFenceMs: 500, heartbeatPort: 7000, failover: 'manual' });
  assert.deepEqual(long.fence, { command: '/bin/true', timeout: 5000 });
  assert.equal(long.alerts?.webhook?.url, 'http://127.0.0.1:9/hook');
  assert.equal(long.nodes.a.vmMemory, '1G');
  const problems = problemsOf(
    `cluster: { name: x, deadTime: soon, selfFence: 30s, heartbeatPort: 7800 }\n${base}fence: { timeout: 5 }\nalerts: { email: { to: a@b.c, smtp: "http://x" }, webhook: { url: "ftp://x" } }\n`,
  );
  assert.ok(problems.some((p) => /cluster\.deadTime: "soon" is not a duration/.test(p)), problems.join('\n'));
  assert.ok(problems.some((p) => /cluster\.selfFence: "30s" is out of range: must be between 100ms and 60s/.test(p)) === false, problems.join('\n'));
  assert.ok(problems.some((p) => /fence\.command: is missing/.test(p)), problems.join('\n'));
  assert.ok(problems.some((p) => /alerts\.email\.smtp: must start with smtp:\/\//.test(p)), problems.join('\n'));
  assert.ok(problems.some((p) => /alerts\.webhook\.url: must start with http/.test(p)), problems.join('\n'));
  // Cross checks run once the shapes are right.
  const clash = problemsOf(`cluster: { name: x, heartbeatPort: 7800, selfFence: 9s }\n${base}`);
  assert.ok(clash.some((p) => /cluster\.heartbeatPort: port 7800 is already used by api\.port/.test(p)), clash.join('\n'));
  assert.ok(clash.some((p) => /cluster\.selfFence: 9000ms is long next to deadTime/.test(p)), clash.join('\n'));
});

test('contradicting settings: a pool whose resources prefer two nodes, a VM that fits no node', () => {
  const text = `cluster: x
secret: {value: "0123456789abcdef"}
nodes: {alpha: {address: 127.0.0.2, vmMemory: 256M}, bravo: {address: 127.0.0.3}}
resources:
  a: { port: 7801, disk: { alpha: /d/a, bravo: /d/a }, prefer: alpha }
  b: { port: 7802, disk: { alpha: /d/b, bravo: /d/b }, prefer: bravo }
pools: { p: { devices: [a, b] } }
vms: { web: { disks: [p/web], memory: 1G, minMemory: 512M } }
`;
  const problems = problemsOf(text);
  assert.ok(problems.some((p) => /pools\.p\.devices: its resources prefer different nodes \(a: alpha, b: bravo\)/.test(p)), problems.join('\n'));
  assert.ok(problems.some((p) => /vms\.web\.minMemory: 512M does not fit nodes\.alpha\.vmMemory \(256M\)/.test(p)), problems.join('\n'));
});

test('api: TLS by default; plain HTTP (tls: false) only when every node is on loopback; the CA file sits beside the secret', async () => {
  const c = parseClusterConfig(EXAMPLE, '/etc/duet/c.yaml');
  assert.deepEqual(c.api, { port: 7800, tls: true, metricsToken: false });
  const { caFileOf } = await import('../../src/cluster/config.js');
  assert.equal(caFileOf(c), '/etc/duet/secret.ca.pem');
  assert.deepEqual(problemsOf(`${EXAMPLE}api: { tls: false }\n`), ['18 api.tls: plain HTTP is only for loopback addresses, and node alpha is at 192.0.2.1: remove tls: false (the API then uses TLS with the cluster\'s own CA)']);
  const loopback = EXAMPLE.replace('192.0.2.1', '127.0.0.2').replace('192.0.2.2', '127.0.0.3').replace('192.0.2.3', '127.0.0.4');
  assert.equal(parseClusterConfig(`${loopback}api: { tls: false, metricsToken: true }\n`, 'c.yaml').api.tls, false);
});
