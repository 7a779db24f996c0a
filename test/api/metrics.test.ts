/**
 * GET /metrics of a real node: the exposition parses line by line, states
 * are right, and the export counters and latency histogram move when a real
 * NBD client (qemu-io) does I/O.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { makeCluster, waitStatus, inSync } from '../e2e/cluster-harness.js';
import { python, run } from '../e2e/harness.js';
import { raw, targetOf } from './api-harness.js';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The Prometheus text format (0.0.4), strictly: every line a comment, a HELP/TYPE, or a sample. */
export function parseProm(text: string): Sample[] {
  const out: Sample[] = [];
  const types = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const meta = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line);
    if (meta) {
      if (meta[1] === 'TYPE') {
        assert.match(meta[3], /^(counter|gauge|histogram|summary|untyped)$/, line);
        assert.ok(!types.has(meta[2]), `TYPE twice: ${meta[2]}`);
        types.set(meta[2], meta[3]);
      }
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf)( -?\d+)?$/.exec(line);
    assert.ok(m, `not a sample line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    if (m[3]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/gy;
      let l: RegExpExecArray | null;
      let at = 0;
      while ((l = re.exec(m[3])) !== null) {
        labels[l[1]] = l[2];
        at = re.lastIndex;
      }
      assert.equal(at, m[3].length, `bad labels: ${line}`);
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function pick(samples: Sample[], name: string, labels: Record<string, string>): Sample[] {
  return samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
}

function value(samples: Sample[], name: string, labels: Record<string, string>): number {
  const s = pick(samples, name, labels);
  assert.equal(s.length, 1, `${name} ${JSON.stringify(labels)}: ${s.length} samples`);
  return s[0].value;
}

test('metrics: states, pools, export I/O and latency move with real I/O; the exposition parses; metricsToken closes it', { timeout: 180_000 }, async (t) => {
  const c = await makeCluster(t, { diskBytes: 64 * 1024 * 1024 });
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'alpha Primary and in sync', (s) => s.role === 'Primary' && inSync(s));
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v', '--size', '16M'])).code, 0);
  const alpha = targetOf(c.file, 'alpha');
  const scrape = async (): Promise<Sample[]> => {
    const r = await raw(alpha, 'GET', '/metrics', { token: null });
    assert.equal(r.status, 200, r.text);
    assert.match(String(r.headers['content-type']), /^text\/plain/);
    return parseProm(r.text);
  };

  const before = await scrape();
  assert.equal(value(before, 'duet_resource_role', { node: 'alpha', resource: 'a', role: 'Primary' }), 1);
  assert.equal(value(before, 'duet_resource_role', { resource: 'a', role: 'Secondary' }), 0);
  assert.equal(value(before, 'duet_resource_disk_state', { resource: 'a', state: 'UpToDate' }), 1);
  assert.equal(value(before, 'duet_resource_connection_state', { resource: 'a', peer: 'bravo', state: 'Connected' }), 1);
  assert.equal(value(before, 'duet_resource_peer_disk_state', { resource: 'a', peer: 'bravo', state: 'UpToDate' }), 1);
  assert.equal(value(before, 'duet_resource_out_of_sync_bytes', { resource: 'a' }), 0);
  assert.equal(value(before, 'duet_resource_quorum', { resource: 'a' }), 1);
  assert.equal(value(before, 'duet_pool_open', { pool: 'pa' }), 1);
  assert.ok(value(before, 'duet_pool_size_bytes', { pool: 'pa' }) > 0);
  assert.ok(pick(before, 'duet_process_resident_memory_bytes', {}).length === 1, 'the process metrics');
  const writesBefore = pick(before, 'duet_export_requests_total', { export: 'v', op: 'write' })[0]?.value ?? 0;

  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', 'flush', '-c', 'read -P 0x5a 0 1M', c.url('alpha', 'v')]);
  assert.equal(io.code, 0, io.describe());

  const after = await scrape();
  assert.ok(value(after, 'duet_export_requests_total', { export: 'v', op: 'write' }) > writesBefore);
  assert.ok(value(after, 'duet_export_bytes_total', { export: 'v', op: 'write' }) >= 1024 * 1024);
  assert.ok(value(after, 'duet_export_bytes_total', { export: 'v', op: 'read' }) >= 1024 * 1024);
  assert.ok(value(after, 'duet_export_requests_total', { export: 'v', op: 'flush' }) >= 1);
  // The histogram: cumulative buckets, +Inf equal to the count, a sum.
  const buckets = pick(after, 'duet_export_request_duration_seconds_bucket', { export: 'v', op: 'write' });
  assert.ok(buckets.length > 2);
  for (let i = 1; i < buckets.length; i++) assert.ok(buckets[i].value >= buckets[i - 1].value, 'cumulative');
  const count = value(after, 'duet_export_request_duration_seconds_count', { export: 'v', op: 'write' });
  assert.equal(buckets.at(-1)!.labels.le, '+Inf');
  assert.equal(buckets.at(-1)!.value, count);
  assert.ok(count >= 1);
  assert.ok(value(after, 'duet_export_request_duration_seconds_sum', { export: 'v', op: 'write' }) > 0);
  assert.ok(value(after, 'duet_pool_used_bytes', { pool: 'pa' }) >= 1024 * 1024, 'the written MiB is allocated');
  // The API's own requests are counted.
  assert.ok(pick(after, 'duet_api_request_duration_seconds_count', { route: '/metrics' }).length >= 1);

  // A request the export refuses (past its end) is an error the client saw.
  const past = await python(`import nbd,sys\nh=nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri(sys.argv[1])\ntry:\n  h.pwrite(b'x'*4096, 32*1024*1024)\n  print('written')\nexcept nbd.Error as e:\n  print('refused')`, [c.url('alpha', 'v')]);
  assert.equal(past.stdout.trim(), 'refused', past.describe());
  const refused = await scrape();
  assert.ok((pick(refused, 'duet_export_errors_total', { export: 'v', op: 'write' })[0]?.value ?? 0) >= 1, 'the refused write is counted');

  // The Grafana dashboard in docs/ uses only metrics that exist.
  const dashboard = fs.readFileSync(new URL('../../../docs/grafana-dashboard.json', import.meta.url), 'utf8');
  const exposed = new Set(after.map((x) => x.name.replace(/_(bucket|sum|count)$/, '')));
  for (const name of new Set(dashboard.match(/duet_[a-z_]+/g))) {
    const base = name.replace(/_(bucket|sum|count)$/, '');
    // Counted only when they happen (none here): declared all the same.
    if (['duet_failovers_total', 'duet_failover_duration_seconds', 'duet_alerts_total', 'duet_vm_memory_bytes'].includes(base)) continue;
    assert.ok(exposed.has(base), `${name} (docs/grafana-dashboard.json) is not exposed`);
  }
  const help = (await raw(alpha, 'GET', '/metrics', { token: null })).text;
  for (const name of ['duet_failovers_total', 'duet_failover_duration_seconds', 'duet_alerts_total', 'duet_vm_memory_bytes']) assert.match(help, new RegExp(`# TYPE ${name} `));

  // Role changes are counted as they happen.
  const changesBefore = pick(after, 'duet_resource_role_changes_total', { resource: 'a', role: 'Secondary' })[0]?.value ?? 0;
  assert.equal((await c.duet('alpha', ['resource', 'secondary', 'a'])).code, 0);
  const demoted = await scrape();
  assert.equal(value(demoted, 'duet_resource_role_changes_total', { resource: 'a', role: 'Secondary' }), changesBefore + 1);
  assert.equal(value(demoted, 'duet_resource_role', { resource: 'a', role: 'Secondary' }), 1);
  assert.equal(value(demoted, 'duet_pool_open', { pool: 'pa' }), 0);

  // api.metricsToken: true → /metrics wants the token like the rest.
  await c.kill('alpha', 'SIGTERM');
  const closed = `${c.file}.metrics.yaml`;
  fs.writeFileSync(closed, fs.readFileSync(c.file, 'utf8').replace(/api: \{ port: (\d+) \}/, 'api: { port: $1, metricsToken: true }'));
  await c.start('alpha', closed);
  assert.equal((await raw(alpha, 'GET', '/metrics', { token: null })).status, 401);
  assert.equal((await raw(alpha, 'GET', '/metrics')).status, 200);
});
