/**
 * A two-node cluster in network namespaces, as the failover tests need it:
 * a "switch" namespace with a bridge, one namespace per node and one for
 * the witness and a real SMTP server (Debian's aiosmtpd), each on its own
 * port of the bridge. A node's death is its switch port going down and
 * every process of its namespace (daemon and QEMUs) killed with SIGKILL:
 * no FIN, no RST reaches the others, as when a machine loses power. A
 * partition is the switch port down while the node runs on.
 *
 * Everything is named after this process's pid (namespaces, subnet), and
 * the cleanup kills only processes in the namespaces it made, then deletes
 * them and the data directory.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Cleanup, DUET, PYTHON, ROOT, run, until, withTimeout, type AfterContext, type RunResult } from '../e2e/harness.js';
import type { Proc } from '../e2e/cluster-harness.js';
import type { EventRecord } from '../../src/cluster/events.js';
import type { NodeStatus } from '../../src/cluster/node.js';
import type { ClusterStatus } from '../../src/cluster/status.js';
import type { VmInfo } from '../../src/vm/manager.js';

export type NodeName = 'alpha' | 'bravo';
const NODES: NodeName[] = ['alpha', 'bravo'];

/** Namespaces need root; under CI a skip is a failure. */
export function netnsSkip(): string | false {
  if (process.getuid?.() === 0) return false;
  return process.env.CI === 'true' ? false : 'needs root (network namespaces)';
}


export interface NsClusterOptions {
  /** Cluster-file lines after the fixed part (vms:, fence:, alerts: are written by the harness when given). */
  extra?: string[];
  diskBytes?: number;
  /** Disk file per node and resource (default DIR/NODE-RES.img). */
  disks?: Partial<Record<NodeName, Partial<Record<'a' | 'b', string>>>>;
  /** cluster: keys beyond the name (e.g. `deadTime: 2`). */
  clusterKeys?: string;
  vmMemory?: string;
}

export class NsCluster {
  readonly dir: string;
  readonly file: string;
  readonly ns: Record<NodeName | 'witness' | 'sw', string>;
  readonly addr: Record<NodeName | 'witness', string>;
  readonly procs = new Map<string, Proc>();
  readonly maildir: string;
  readonly smtpPort = 2525;

  private constructor(dir: string, tag: string, subnet: string) {
    this.dir = dir;
    this.file = path.join(dir, 'cluster.yaml');
    this.maildir = path.join(dir, 'mail');
    this.ns = { sw: `${tag}-sw`, alpha: `${tag}-a`, bravo: `${tag}-b`, witness: `${tag}-w` };
    this.addr = { alpha: `${subnet}.1`, bravo: `${subnet}.2`, witness: `${subnet}.3` };
  }

  /** `cleanup`: where to register the teardown (a Cleanup runs last-in first-out); else t.after. */
  static async create(t: AfterContext, options: NsClusterOptions = {}, cleanup?: Cleanup): Promise<NsCluster> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-failover-'));
    const pid = process.pid;
    const c = new NsCluster(dir, `duet${pid}`, `10.${160 + (pid % 64)}.${(pid >> 6) % 250}`);
    if (cleanup) cleanup.push('the namespaced cluster', () => c.cleanup());
    else t.after(() => c.cleanup());
    await c.network();
    c.writeConfig(options);
    return c;
  }

  /** The bridge and one port per namespace; the witness namespace also runs the CLI (it reaches both nodes). */
  private async network(): Promise<void> {
    const ip = async (...args: string[]): Promise<void> => {
      const r = await run('ip', args);
      assert.equal(r.code, 0, r.describe());
    };
    for (const n of Object.values(this.ns)) await ip('netns', 'add', n);
    await ip('-n', this.ns.sw, 'link', 'add', 'br0', 'type', 'bridge');
    await ip('-n', this.ns.sw, 'link', 'set', 'br0', 'up');
    for (const who of ['alpha', 'bravo', 'witness'] as const) {
      const port = `p-${who}`;
      await ip('-n', this.ns[who], 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', port, 'netns', this.ns.sw);
      await ip('-n', this.ns.sw, 'link', 'set', port, 'master', 'br0');
      await ip('-n', this.ns.sw, 'link', 'set', port, 'up');
      await ip('-n', this.ns[who], 'addr', 'add', `${this.addr[who]}/24`, 'dev', 'eth0');
      await ip('-n', this.ns[who], 'link', 'set', 'eth0', 'up');
      await ip('-n', this.ns[who], 'link', 'set', 'lo', 'up');
    }
  }

  private writeConfig(o: NsClusterOptions): void {
    const size = o.diskBytes ?? 128 * 1024 * 1024;
    const disk = (node: NodeName, res: 'a' | 'b'): string => {
      const p = o.disks?.[node]?.[res] ?? path.join(this.dir, `${node}-${res}.img`);
      if (!o.disks?.[node]?.[res]) {
        fs.writeFileSync(p, '');
        fs.truncateSync(p, size);
      }
      return p;
    };
    fs.writeFileSync(path.join(this.dir, 'secret'), 'failover-test-secret-0123456789\n');
    // (The maildir is aiosmtpd's to create: an empty directory without tmp/ new/ cur/ makes it fail.)
    fs.writeFileSync(
      this.file,
      [
        `cluster: { name: seed${o.clusterKeys ? `, ${o.clusterKeys}` : ''} }`,
        'secret: { file: secret }',
        'nodes:',
        `  alpha: { address: ${this.addr.alpha}${o.vmMemory ? `, vmMemory: ${o.vmMemory}` : ''} }`,
        `  bravo: { address: ${this.addr.bravo}${o.vmMemory ? `, vmMemory: ${o.vmMemory}` : ''} }`,
        `witness: { address: ${this.addr.witness} }`,
        'resources:',
        `  a: { port: 7801, disk: { alpha: ${disk('alpha', 'a')}, bravo: ${disk('bravo', 'a')} }, prefer: alpha }`,
        `  b: { port: 7802, disk: { alpha: ${disk('alpha', 'b')}, bravo: ${disk('bravo', 'b')} }, prefer: bravo }`,
        'pools: { pa: { devices: [a] }, pb: { devices: [b] } }',
        `alerts: { email: { to: admin@example.org, from: duet@seed.example.org, smtp: "smtp://${this.addr.witness}:${this.smtpPort}" } }`,
        ...(o.extra ?? []),
        '',
      ].join('\n'),
    );
  }

  home(node: string): string {
    return path.join(this.dir, `home-${node}`);
  }

  /** Run a process in a namespace, tracked (killed by cleanup with its namespace). */
  private spawnIn(name: string, ns: string, cmd: string, args: string[]): Proc {
    const child = spawn('ip', ['netns', 'exec', ns, cmd, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, DUET_LOG_LEVEL: 'info' } });
    let out = '';
    let err = '';
    child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr!.on('data', (b: Buffer) => {
      err += b.toString();
      // Bounded: a long test's logs stay in memory for describe().
      if (err.length > 4_000_000) err = err.slice(-2_000_000);
    });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const proc: Proc = { name, child, out: () => out, err: () => err, exited };
    this.procs.set(name, proc);
    return proc;
  }

  async createMd(): Promise<void> {
    for (const node of NODES) for (const res of ['a', 'b']) await this.createMdOf(node, res);
  }

  async createMdOf(node: NodeName, res: string, force = false): Promise<void> {
    const r = await run(process.execPath, [DUET, '--home', this.home(node), '--config', this.file, '--node', node, 'resource', 'create-md', res, ...(force ? ['--force'] : [])], { cwd: ROOT, timeoutMs: 30_000 });
    assert.equal(r.code, 0, r.describe());
  }

  async startWitness(): Promise<void> {
    const p = this.spawnIn('witness', this.ns.witness, process.execPath, [DUET, '--home', this.home('witness'), '--config', this.file, 'witness', 'run']);
    await this.until(() => /witness of cluster/.test(p.out()) || p.child.exitCode !== null, 15_000, 'the witness to start');
    assert.equal(p.child.exitCode, null, p.err());
  }

  async startSmtp(): Promise<void> {
    const p = this.spawnIn('smtp', this.ns.witness, PYTHON, ['-m', 'aiosmtpd', '-n', '-l', `${this.addr.witness}:${this.smtpPort}`, '-c', 'aiosmtpd.handlers.Mailbox', this.maildir]);
    await this.until(async () => (await run('ip', ['netns', 'exec', this.ns.witness, 'bash', '-c', `exec 3<>/dev/tcp/${this.addr.witness}/${this.smtpPort}`])).code === 0 || p.child.exitCode !== null, 15_000, 'the SMTP server');
    assert.equal(p.child.exitCode, null, p.err());
  }

  async start(node: NodeName): Promise<Proc> {
    const p = this.spawnIn(node, this.ns[node], process.execPath, [DUET, '--home', this.home(node), '--config', this.file, '--node', node, 'node', 'run']);
    await this.until(() => /node \S+ running/.test(p.out()) || p.child.exitCode !== null, 30_000, `${node} to start`);
    assert.equal(p.child.exitCode, null, `${node} exited:\n${p.err().slice(-3000)}`);
    return p;
  }

  /** The CLI, run in the witness's namespace (it reaches both nodes), talking to `node`'s daemon. */
  duet(node: string, args: string[], timeoutMs = 60_000): Promise<RunResult> {
    return run('ip', ['netns', 'exec', this.ns.witness, process.execPath, DUET, '--config', this.file, '--node', node, ...args], { cwd: ROOT, timeoutMs });
  }

  async json<T>(node: string, args: string[], timeoutMs = 60_000): Promise<T> {
    const r = await this.duet(node, [...args, '--json'], timeoutMs);
    assert.equal(r.code, 0, r.describe());
    return JSON.parse(r.stdout) as T;
  }

  resources(node: string): Promise<NodeStatus> {
    return this.json<NodeStatus>(node, ['resource', 'status']);
  }

  vms(node: string): Promise<VmInfo[]> {
    return this.json<{ vms: VmInfo[] }>(node, ['vm', 'list']).then((r) => r.vms);
  }

  clusterStatus(node: string): Promise<ClusterStatus> {
    return this.json<ClusterStatus>(node, ['cluster', 'status']);
  }

  /** The node's event log, read from its file (works while the node is cut off or dead). */
  events(node: string): EventRecord[] {
    const dir = path.join(this.home(node), 'events');
    const out: EventRecord[] = [];
    for (const f of ['events.1.jsonl', 'events.jsonl']) {
      let text = '';
      try {
        text = fs.readFileSync(path.join(dir, f), 'utf8');
      } catch {
        continue;
      }
      for (const line of text.split('\n')) {
        try {
          if (line) out.push(JSON.parse(line) as EventRecord);
        } catch {
          // A line being written.
        }
      }
    }
    return out;
  }

  /** The console of `vm`, read from the node's VM directory (works while the node is cut off). */
  consoleFile(node: string, vm: string): string {
    const dir = path.join(this.home(node), 'vms', vm);
    let text = '';
    for (const f of ['console.base', 'console.history', 'console.log']) {
      try {
        text += fs.readFileSync(path.join(dir, f), 'latin1');
      } catch {
        // absent
      }
    }
    return text;
  }

  /** The mails the SMTP server received (Maildir). */
  mails(): string[] {
    const out: string[] = [];
    for (const sub of ['new', 'cur']) {
      const d = path.join(this.maildir, sub);
      if (!fs.existsSync(d)) continue;
      for (const f of fs.readdirSync(d).sort()) out.push(fs.readFileSync(path.join(d, f), 'utf8'));
    }
    return out;
  }

  private async link(who: NodeName | 'witness', up: boolean): Promise<void> {
    const r = await run('ip', ['-n', this.ns.sw, 'link', 'set', `p-${who}`, up ? 'up' : 'down']);
    assert.equal(r.code, 0, r.describe());
  }

  /** The node's switch port down: it runs on, alone (a partition). */
  cut(node: NodeName): Promise<void> {
    return this.link(node, false);
  }

  heal(node: NodeName): Promise<void> {
    return this.link(node, true);
  }

  /** Every process in a namespace. */
  private async pidsIn(ns: string): Promise<number[]> {
    const r = await run('ip', ['netns', 'pids', ns]);
    return r.stdout
      .split('\n')
      .map((l) => Number(l.trim()))
      .filter((n) => Number.isInteger(n) && n > 0);
  }

  /** The node dies: its switch port first (no FIN, no RST reaches anyone), then SIGKILL to every process in it. */
  async killNode(node: NodeName): Promise<number> {
    await this.cut(node);
    const at = Date.now();
    for (let i = 0; i < 50; i++) {
      const pids = await this.pidsIn(this.ns[node]);
      if (pids.length === 0) break;
      for (const pid of pids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    const p = this.procs.get(node);
    if (p) await withTimeout(p.exited, 10_000, `${node} to exit`).catch(() => undefined);
    return at;
  }

  /** Poll (bounded); a timeout's message carries the processes' last log lines. */
  async until<T>(check: () => T | Promise<T>, ms: number, what: string | (() => string), everyMs = 200): Promise<NonNullable<T>> {
    try {
      return await until(check, ms, what, everyMs);
    } catch (err) {
      throw new Error(`${(err as Error).message}\n${this.describe()}`);
    }
  }


  describe(): string {
    const parts: string[] = [];
    for (const [name, p] of this.procs) {
      const lines = p.err().trim().split('\n').filter((l) => !/"admin-command"|"client connected"|"connection accepted"/.test(l));
      parts.push(`--- ${name} (last lines) ---\n${lines.slice(-40).join('\n')}`);
    }
    return parts.join('\n');
  }

  async cleanup(): Promise<void> {
    for (const n of [this.ns.alpha, this.ns.bravo, this.ns.witness]) {
      for (const pid of await this.pidsIn(n).catch(() => [] as number[])) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
    }
    for (const p of this.procs.values()) await withTimeout(p.exited, 5000, `${p.name} to exit`).catch(() => undefined);
    for (const n of Object.values(this.ns)) await run('ip', ['netns', 'del', n]).catch(() => undefined);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
