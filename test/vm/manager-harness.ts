/**
 * VmManagers of two nodes in one process, with real QEMUs (no guest: the
 * BIOS finds no boot sector and waits) whose disk is a real NBD export of a
 * memory device. The node daemons around the managers are replaced by a
 * host that hands a request to the other node's manager, so a test can
 * restart one node's manager (a daemon restart: its QEMUs live on) or lose a
 * request on the way (a daemon that died after a step).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type net from 'node:net';
import { parseClusterConfig, type ClusterConfig } from '../../src/cluster/config.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { StaticExports } from '../../src/nbd/exports.js';
import { NbdServer } from '../../src/nbd/server.js';
import { silentLogger } from '../../src/util/log.js';
import { VmManager, type VmCommand, type VmHost } from '../../src/vm/manager.js';
import type { AfterContext } from '../e2e/harness.js';

export interface Nodes {
  dir: string;
  config: ClusterConfig;
  managers: Record<string, VmManager>;
  /** Requests that fail on their way to a node (its daemon is gone): `(node, request) => true` drops it. */
  drop: ((node: string, request: VmCommand) => boolean) | undefined;
  /** A new manager for `node` on the same home (the daemon restarted; its QEMUs were left running). */
  restart(node: string): Promise<VmManager>;
  /** `node`'s daemon is gone (its QEMUs live on): it answers nothing. */
  down(node: string): void;
  /** The QEMU processes running for VM `vm` of `node` (by their command line). */
  qemuPids(node: string, vm?: string): number[];
  /** The disks' server restarts (as alpha's daemon would): every NBD connection is cut, the data stays. */
  restartServer(): Promise<void>;
}

export interface TwoNodesOptions {
  /** The keys of VM web's entry (default: prefer alpha). */
  vm?: string;
  /** More cluster-file lines. */
  extra?: string[];
  /** The nodes whose daemon runs at first (default both); a node without one does not answer. */
  up?: string[];
}

export async function twoNodes(t: AfterContext, options: TwoNodesOptions = {}): Promise<Nodes> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-vmm-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const exports = new StaticExports([{ name: 'web', device: new MemoryDevice(16 * 1024 * 1024, 'web') }]);
  let server = new NbdServer({ exports, log: silentLogger(), shutdownTimeoutMs: 1000 });
  const port = ((await server.listen('127.0.0.1', 0)) as net.AddressInfo).port;
  const file = path.join(dir, 'cluster.yaml');
  const text = [
    'cluster: t',
    'secret: { value: "0123456789abcdef" }',
    'nodes: { alpha: { address: 127.0.0.1 }, bravo: { address: 127.0.0.6 } }',
    `resources: { a: { protocol: C, port: 7801, disk: { alpha: ${dir}/a, bravo: ${dir}/b }, prefer: alpha } }`,
    'pools: { pa: { devices: [a] } }',
    `exports: { port: ${port} }`,
    'vms:',
    `  web: { disks: [pa/web], memory: 128M, cpus: 1, ${options.vm ?? 'prefer: alpha'} }`,
    ...(options.extra ?? []),
  ].join('\n');
  fs.writeFileSync(file, text);
  const config = parseClusterConfig(text, file);
  const nodes: Nodes = {
    dir,
    config,
    managers: {},
    drop: undefined,
    restart: async (node) => {
      nodes.managers[node]?.stop();
      const m = new VmManager(hostOf(node));
      nodes.managers[node] = m;
      await m.start();
      return m;
    },
    down: (node) => {
      nodes.managers[node]?.stop();
      delete nodes.managers[node];
    },
    qemuPids: (node, vm = 'web') => qemusUnder(path.join(dir, node, 'vms', vm)),
    restartServer: async () => {
      await server.close();
      server = new NbdServer({ exports, log: silentLogger(), shutdownTimeoutMs: 1000 });
      await server.listen('127.0.0.1', port);
    },
  };
  const hostOf = (node: string): VmHost => ({
    node,
    home: path.join(dir, node),
    config,
    log: silentLogger(),
    address: config.nodes[node].address,
    // The disks are served by alpha in these tests.
    poolServer: () => 'alpha',
    exportClients: (name) => server.clientsOf(name),
    // (No pool daemon here: the disks are asked for by their plain names.)
    poolIncarnations: () => undefined,
    call: async (to, request) => {
      if (nodes.drop?.(to, request)) throw new Error(`the duet daemon of node ${to} did not answer`);
      const m = nodes.managers[to];
      if (!m) throw new Error(`no node ${to}`);
      return m.handle(request);
    },
  });
  t.after(async () => {
    for (const m of Object.values(nodes.managers)) m.stop();
    for (const pid of qemusUnder(dir)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    await server.close();
  });
  for (const node of options.up ?? ['alpha', 'bravo']) await nodes.restart(node);
  return nodes;
}

/** The live QEMUs whose command line names a path under `dir`. */
export function qemusUnder(dir: string): number[] {
  const out: number[] = [];
  for (const p of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const cmd = fs.readFileSync(`/proc/${p}/cmdline`, 'utf8');
      if (cmd.startsWith('qemu-system') && cmd.includes(`${dir}/`)) out.push(Number(p));
    } catch {
      // gone
    }
  }
  return out;
}

export async function until(check: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
