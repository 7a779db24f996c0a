/**
 * A duet cluster of real processes on loopback addresses: nodes alpha
 * (127.0.0.2) and bravo (127.0.0.3), optionally a witness (127.0.0.4),
 * file-backed disks in a temporary directory given fresh metadata with
 * `duet resource create-md` (as an admin would), ports picked free.
 */
import { spawn, ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';
import { AfterContext, Cleanup, DUET, ROOT, haveProgram, run, RunResult, waitFor, withTimeout } from './harness.js';
import { freePorts } from '../ports.js';

export const ADDRESS: Record<string, string> = { alpha: '127.0.0.2', bravo: '127.0.0.3', witness: '127.0.0.4' };
/** The nodes' second heartbeat addresses (ClusterOptions.heartbeatAddresses). */
export const HEARTBEAT_ADDRESS: Record<string, string> = { alpha: '127.0.1.2', bravo: '127.0.1.3' };

export interface ClusterOptions {
  diskBytes?: number;
  protocol?: 'A' | 'B' | 'C';
  witness?: boolean;
  /** Extra keys for resource a (YAML flow mapping entries, e.g. `"after-split-brain": disconnect`). */
  resourceExtra?: string;
  /** Disk path per node (default DIR/NODE.img, created sparse). */
  disks?: Record<string, string>;
  /** Run `resource create-md` on every disk before anything starts (default true). */
  createMd?: boolean;
  /** A second resource b (disks DIR/NODE-b.img, prefer alpha) with its own pool pb. */
  resourceB?: boolean;
  /** More lines at the end of the cluster file (e.g. a vms: section). */
  extra?: string[];
  /** The cluster manager's failover (default auto, as the cluster file's default). */
  failover?: 'auto' | 'manual';
  /** cluster.deadTime (default the file's default, 2 s). */
  deadTime?: string;
  /** A second heartbeat path: nodes.NODE.heartbeatAddress = HEARTBEAT_ADDRESS[NODE]. */
  heartbeatAddresses?: boolean;
}

export interface Proc {
  name: string;
  child: ChildProcess;
  out(): string;
  err(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface Cluster {
  dir: string;
  file: string;
  exportsPort: number;
  procs: Map<string, Proc>;
  start(name: string, file?: string): Promise<Proc>;
  startWitness(): Promise<Proc>;
  kill(name: string, signal?: NodeJS.Signals): Promise<void>;
  /** `duet --config F --node NODE ARGS` */
  duet(node: string, args: string[], opts?: { timeoutMs?: number; input?: Buffer; env?: NodeJS.ProcessEnv }): Promise<RunResult>;
  status(node: string, resource?: string): Promise<ResourceJson>;
  url(node: string, volume: string): string;
  describe(): string;
}

export interface PeerJson {
  node: string;
  connection: string;
  disk: string;
  role: string;
  outOfSyncBytes: number;
  resync: { doneBytes: number; totalBytes: number; rateBytesPerSec: number; sentBytes: number } | null;
  lastResync: { doneBytes: number; totalBytes: number; rateBytesPerSec: number; sentBytes: number } | null;
}

export interface ResourceJson {
  name: string;
  role: string;
  disk: string;
  outOfSyncBytes: number;
  quorum: boolean;
  suspended: boolean;
  fencedOff: string | null;
  splitBrain: { localChangedBytes: number; peerChangedBytes: number; savedTo: string | null; resolution: string | null } | null;
  lastRefusal: string | null;
  /** Why the resource is down on this node (its disk has no metadata), else null. */
  down: string | null;
  peers: PeerJson[];
}

export async function makeCluster(t: AfterContext, options: ClusterOptions = {}): Promise<Cluster> {
  // Removed by the after hook below, once the daemons and their VMs are gone (the pid files are in it).
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-cluster-'));
  let cleanup = async (): Promise<void> => fs.rmSync(dir, { recursive: true, force: true });
  t.after(() => cleanup());
  const diskBytes = options.diskBytes ?? 512 * 1024 * 1024;
  const disks = options.disks ?? { alpha: path.join(dir, 'alpha.img'), bravo: path.join(dir, 'bravo.img') };
  const disksB = { alpha: path.join(dir, 'alpha-b.img'), bravo: path.join(dir, 'bravo-b.img') };
  for (const p of [...Object.values(disks), ...(options.resourceB ? Object.values(disksB) : [])]) if (!fs.existsSync(p)) fs.writeFileSync(p, ''), fs.truncateSync(p, diskBytes);
  const [linkPort, exportsPort, apiPort, witnessPort, linkPortB, heartbeatPort] = await freePorts(6);
  fs.writeFileSync(path.join(dir, 'secret'), 'test-cluster-secret-0123456789\n');
  const file = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(
    file,
    [
      `cluster: { name: e2e, heartbeatPort: ${heartbeatPort}${options.failover ? `, failover: ${options.failover}` : ''}${options.deadTime ? `, deadTime: ${options.deadTime}` : ''} }`,
      'secret: { file: secret }',
      'nodes:',
      ...['alpha', 'bravo'].map((n) => `  ${n}: { address: ${ADDRESS[n]}${options.heartbeatAddresses ? `, heartbeatAddress: ${HEARTBEAT_ADDRESS[n]}` : ''} }`),
      ...(options.witness ? [`witness: { address: ${ADDRESS.witness}, port: ${witnessPort} }`] : []),
      'resources:',
      `  a: { protocol: ${options.protocol ?? 'C'}, port: ${linkPort}, disk: { alpha: ${disks.alpha}, bravo: ${disks.bravo} }, prefer: alpha, "ping-interval-ms": 100, "ping-timeout-ms": 400${options.resourceExtra ? `, ${options.resourceExtra}` : ''} }`,
      ...(options.resourceB ? [`  b: { protocol: C, port: ${linkPortB}, disk: { alpha: ${disksB.alpha}, bravo: ${disksB.bravo} }, prefer: alpha, "ping-interval-ms": 100, "ping-timeout-ms": 400 }`] : []),
      'pools:',
      '  pa: { devices: [a] }',
      ...(options.resourceB ? ['  pb: { devices: [b] }'] : []),
      `exports: { port: ${exportsPort} }`,
      `api: { port: ${apiPort} }`,
      ...(options.extra ?? []),
      '',
    ].join('\n'),
  );
  if (options.createMd ?? true) {
    for (const node of ['alpha', 'bravo']) {
      for (const res of options.resourceB ? ['a', 'b'] : ['a']) {
        const r = await run(process.execPath, [DUET, '--config', file, '--node', node, 'resource', 'create-md', res], { cwd: ROOT, timeoutMs: 30_000 });
        if (r.code !== 0) throw new Error(`create-md ${res} on ${node} failed\n${r.describe()}`);
      }
    }
  }
  const procs = new Map<string, Proc>();
  const spawnDuet = (name: string, args: string[], ready: RegExp): Promise<Proc> => {
    const child = spawn(process.execPath, [DUET, '--home', path.join(dir, `home-${name}`), ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, DUET_LOG_LEVEL: 'info' } });
    let out = '';
    let err = '';
    child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const proc: Proc = { name, child, out: () => out, err: () => err, exited };
    procs.set(name, proc);
    return waitFor(() => ready.test(out) || child.exitCode !== null, 15_000, `${name} to start`).then(() => {
      if (child.exitCode !== null) throw new Error(`${name} exited ${child.exitCode}:\n${err}`);
      return proc;
    });
  };
  const kill = async (name: string, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> => {
    const p = procs.get(name);
    if (!p || p.child.exitCode !== null || p.child.signalCode !== null) return;
    p.child.kill(signal);
    await withTimeout(p.exited, 15_000, `${name} to exit on ${signal}`).catch(() => p.child.kill('SIGKILL'));
  };
  cleanup = async () => {
    for (const name of procs.keys()) await kill(name, 'SIGKILL');
    killVms(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const cluster: Cluster = {
    dir,
    file,
    exportsPort,
    procs,
    start: (name, other) => spawnDuet(name, ['node', 'run', '--config', other ?? file, '--node', name], new RegExp(`node ${name} running`)),
    startWitness: () => spawnDuet('witness', ['witness', 'run', '--config', file], /witness of cluster/),
    kill,
    duet: (node, args, opts = {}) => run(process.execPath, [DUET, '--config', file, '--node', node, ...args], { cwd: ROOT, timeoutMs: opts.timeoutMs ?? 30_000, input: opts.input, env: opts.env }),
    async status(node, resource = 'a') {
      const r = await run(process.execPath, [DUET, '--config', file, '--node', node, 'resource', 'status', resource, '--json'], { cwd: ROOT, timeoutMs: 10_000 });
      if (r.code !== 0) throw new Error(r.describe());
      return (JSON.parse(r.stdout) as { resources: ResourceJson[] }).resources[0];
    },
    url: (node, volume) => `nbd://${ADDRESS[node]}:${exportsPort}/${volume}`,
    describe: () => [...procs.values()].map((p) => `--- ${p.name} stderr ---\n${p.err().split('\n').slice(-40).join('\n')}`).join('\n'),
  };
  return cluster;
}

/**
 * The QEMUs the nodes' daemons started (they outlive a daemon on purpose): found by the pid files under
 * this cluster's homes, killed only if the process is the QEMU of that pid file (its command line names it).
 */
export function killVms(dir: string): void {
  for (const home of fs.readdirSync(dir).filter((d) => d.startsWith('home-'))) {
    const vms = path.join(dir, home, 'vms');
    if (!fs.existsSync(vms)) continue;
    for (const vm of fs.readdirSync(vms)) {
      const pidFile = path.join(vms, vm, 'qemu.pid');
      let pid: number;
      try {
        pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
        if (!fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(path.join(vms, vm, 'qmp.sock'))) continue;
      } catch {
        continue;
      }
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // Gone meanwhile.
      }
    }
  }
}

/** Wait (bounded) until `cond(status of node)` holds; polls the real CLI. */
export async function waitStatus(c: Cluster, node: string, what: string, cond: (s: ResourceJson) => boolean, ms = 30_000, resource = 'a'): Promise<ResourceJson> {
  let last: ResourceJson | undefined;
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      last = await c.status(node, resource);
      if (cond(last)) return last;
    } catch {
      /* daemon not up yet */
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} on ${node}; last status: ${JSON.stringify(last)}\n${c.describe()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export function inSync(s: ResourceJson): boolean {
  const p = s.peers[0];
  return s.disk === 'UpToDate' && p?.connection === 'Connected' && p.disk === 'UpToDate' && s.outOfSyncBytes === 0;
}

/** Why a test of `cut` is skipped here (not root, no iptables), or false; under CI it never is (there a skip is a failure). */
export function iptablesSkip(): string | false {
  if (process.env.CI === 'true') return false;
  if (process.getuid?.() !== 0) return 'needs root (iptables)';
  return haveProgram('iptables') ? false : 'iptables is not installed';
}

/** DROP traffic between two loopback addresses, both ways; undone by `cleanup`. */
export async function cut(cleanup: Cleanup, a: string, b: string, tag: string): Promise<void> {
  for (const [s, d] of [
    [a, b],
    [b, a],
  ]) {
    const rule = ['OUTPUT', '-s', s, '-d', d, '-j', 'DROP', '-m', 'comment', '--comment', tag];
    const r = await run('iptables', ['-I', ...rule]);
    assert.equal(r.code, 0, r.describe());
    cleanup.push(`iptables -D ${s} -> ${d}`, async () => {
      await run('iptables', ['-D', ...rule]);
    });
  }
}
