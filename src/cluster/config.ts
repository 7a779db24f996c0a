/**
 * The cluster file: one YAML file, the same on every node, that describes
 * the nodes, the witness, the replicated resources, the pools on them, the
 * exports, VMs and alerts (../shared/ARCHITECTURE.md has an example).
 *
 * Every mistake is reported, not just the first, each as
 * `FILE:LINE: key.path: what is wrong; what to do`, so an admin can fix the
 * whole file in one go.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { LineCounter, parseDocument, isNode } from 'yaml';
import { z } from 'zod';
import { UserError, errnoCode } from '../util/errors.js';
import { parseSize } from '../util/size.js';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,62}$/;
const nameMessage = 'use letters, digits, ".", "_", "+" or "-" (not first), at most 63 characters';

const port = z.number({ invalid_type_error: 'must be a port number' }).int('must be a whole number').min(1, 'must be 1..65535').max(65535, 'must be 1..65535');
const address = z.string({ invalid_type_error: 'must be an IP address' }).refine((a) => net.isIP(a) !== 0, 'is not an IP address (write e.g. 192.0.2.1 or 127.0.0.2)');
const size = z
  .union([z.string(), z.number()])
  .refine((v) => {
    try {
      parseSize(String(v));
      return true;
    } catch {
      return false;
    }
  }, 'is not a size (write e.g. 64K, 10G)');

/**
 * A duration between minMs and maxMs: a number of seconds (fractions allowed) or a string with its unit
 * (`1500ms`, `2s`); kept in milliseconds.
 */
function duration(minMs: number, maxMs: number) {
  const range = `between ${minMs < 1000 ? `${minMs}ms` : `${minMs / 1000}s`} and ${maxMs / 1000}s`;
  return z.union([z.number(), z.string()], { invalid_type_error: 'must be a duration (2, 1.5, 2s or 1500ms)' }).transform((v, ctx) => {
    const m = typeof v === 'number' ? [String(v), String(v), 's'] : /^(\d+(?:\.\d+)?)\s*(ms|s)?$/.exec(v.trim());
    const ms = m ? Math.round(Number(m[1]) * (m[2] === 'ms' ? 1 : 1000)) : NaN;
    if (!Number.isFinite(ms)) ctx.addIssue({ code: z.ZodIssueCode.custom, message: `${JSON.stringify(v)} is not a duration (write 2, 1.5, 2s or 1500ms)` });
    else if (ms < minMs || ms > maxMs) ctx.addIssue({ code: z.ZodIssueCode.custom, message: `${JSON.stringify(v)} is out of range: must be ${range}` });
    else return ms;
    return z.NEVER;
  });
}

const nodeSchema = z
  .object({
    address,
    /** A second address for the heartbeat (another NIC, a crossover cable): a second path between the nodes. */
    heartbeatAddress: address.optional(),
    /** Memory this node gives its VMs; absent: no limit (no squeezing). */
    vmMemory: size.optional(),
  })
  .strict();

/** Membership timing (`cluster: {name, deadTime, selfFence, heartbeatPort}`); ARCHITECTURE's `cluster: home` is the short form. */
const clusterOptions = z
  .object({
    name: z.string().regex(NAME, nameMessage),
    /** A peer silent this long on every path (and at the witness) is dead. */
    deadTime: duration(200, 60_000).default(2),
    /**
     * How long a node that lost quorum may take to stop its VMs and writes; the survivor waits this long
     * after declaring it dead before taking over.
     */
    selfFence: duration(100, 60_000).default(1),
    /** UDP port of the heartbeat between the nodes, at each node's address (and heartbeatAddress). */
    heartbeatPort: port.default(7797),
    /**
     * auto: a lost node is fenced and taken over, a node without quorum fences itself. manual: the cluster
     * manager only watches, reports and alerts (maintenance, or an admin who decides every failover).
     */
    failover: z.enum(['auto', 'manual'], { errorMap: () => ({ message: 'must be auto or manual' }) }).default('auto'),
  })
  .strict();

const resourceSchema = z
  .object({
    protocol: z.enum(['A', 'B', 'C'], { errorMap: () => ({ message: 'must be A, B or C' }) }).default('C'),
    port,
    disk: z.record(z.string().min(1, 'must be a device path')),
    prefer: z.string().optional(),
    /** Data size every node's disk must provide (after the metadata at its end); checked at start. */
    size: size.optional(),
    /** Failover and split-brain settings refined by the replication issue; accepted as given. */
    'after-split-brain': z.enum(['disconnect', 'discard-zero-changes', 'discard-least-changes', 'discard-younger-primary']).optional(),
    'on-no-quorum': z.enum(['suspend', 'error']).optional(),
    /** Fixed resync rate cap (e.g. 100M per second); absent = dynamic (as fast as the link allows, yielding to application writes). */
    'resync-rate': size.optional(),
    'checksum-resync': z.boolean().optional(),
    'allow-two-primaries': z.boolean().optional(),
    'ping-interval-ms': z.number().int().positive().optional(),
    'ping-timeout-ms': z.number().int().positive().optional(),
  })
  .strict();

const schema = z
  .object({
    cluster: z.union([z.string().regex(NAME, nameMessage), clusterOptions], {
      errorMap: (_issue, ctx) => ({ message: ctx.data === undefined ? 'is missing: name the cluster (cluster: home)' : `must be the cluster's name (${nameMessage}) or {name, deadTime, selfFence, heartbeatPort, failover}` }),
    }),
    secret: z
      .object({ file: z.string().min(1).optional(), value: z.string().min(16, 'must be at least 16 characters').optional() })
      .strict()
      .refine((s) => (s.file === undefined) !== (s.value === undefined), 'give exactly one of file: PATH or value: TEXT'),
    nodes: z.record(nodeSchema).refine((n) => Object.keys(n).length >= 1, 'name at least one node'),
    witness: z.object({ address, port: port.optional() }).strict().optional(),
    resources: z.record(resourceSchema).default({}),
    pools: z
      .record(z.object({ devices: z.array(z.string()).min(1, 'name at least one resource'), 'chunk-size': size.optional() }).strict())
      .default({}),
    exports: z.object({ port: port.default(10809) }).strict().default({ port: 10809 }),
    /**
     * The node daemon's HTTP API and dashboard (what `duet --config F --node N ...` talks to), at each
     * node's address. tls: false (plain HTTP) only when every node's address is a loopback one.
     * metricsToken: /metrics needs the API token too (default: open, as Prometheus scrapes usually are).
     */
    api: z
      .object({ port: port.default(7800), tls: z.boolean().default(true), metricsToken: z.boolean().default(false) })
      .strict()
      .default({ port: 7800, tls: true, metricsToken: false }),
    vms: z
      .record(
        z
          .object({
            /** POOL/VOLUME each; the first is the boot disk. */
            disks: z.array(z.string().regex(/^[^/]+\/[^/]+$/, 'must be POOL/VOLUME')).min(1, 'name at least one volume (disks: [pa/web])'),
            memory: size,
            /** The floor a crowded node may squeeze the VM to (balloon); absent: memory. */
            minMemory: size.optional(),
            cpus: z.number().int().positive('must be at least 1').default(1),
            prefer: z.string().optional(),
            priority: z.number().int().default(0),
            boot: z.object({ kernel: z.string().min(1), initrd: z.string().min(1).optional(), append: z.string().optional() }).strict().optional(),
          })
          .strict(),
      )
      .default({}),
    /**
     * When the cluster comes up: how long (seconds) a node waits for a VM's `prefer` node before it starts
     * the VM itself (as DRBD's degr-wfc-timeout; 0: never, wait for the prefer node).
     */
    startup: z.object({ waitForPeer: z.number({ invalid_type_error: 'must be a number of seconds' }).int('must be whole seconds').min(0, 'must be 0 or more seconds').default(60) }).strict().default({ waitForPeer: 60 }),
    /**
     * Live migration of VMs between nodes: a bandwidth cap per migration (per second), for a LAN shared with
     * other traffic; the longest pause of the guest QEMU aims for at the switch-over (ms; QEMU's own default is
     * 300, Proxmox's migrate_downtime 100).
     */
    migration: z
      .object({ bandwidth: size.optional(), maxDowntime: z.number({ invalid_type_error: 'must be milliseconds' }).int('must be whole milliseconds').min(1, 'must be 1 ms or more').max(60_000, 'must be at most 60000 ms').default(100) })
      .strict()
      .default({ maxDowntime: 100 }),
    /** Fencing a lost node before its VMs boot elsewhere: `command NODE off` (and `NODE status` for `fence test`); timeout in seconds. */
    fence: z.object({ command: z.string().min(1, 'give the command to run'), timeout: duration(1000, 600_000).default(30) }).strict().optional(),
    alerts: z
      .object({
        email: z
          .object({
            to: z.string().email('is not an email address'),
            smtp: z.string().url('is not a URL (smtp://host:25)').refine((u) => /^smtps?:\/\//.test(u), 'must start with smtp:// or smtps://'),
            from: z.string().optional(),
          })
          .strict()
          .optional(),
        webhook: z.object({ url: z.string().url('is not a URL').refine((u) => /^https?:\/\//.test(u), 'must start with http:// or https://') }).strict().optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

const MISSING_HINTS: Record<string, string> = {
  cluster: 'name the cluster (cluster: home)',
  secret: 'give the shared key of the cluster (secret: { file: /etc/duet/secret })',
  nodes: 'list the nodes (nodes: { alpha: { address: 192.0.2.1 } })',
  address: 'give the node\'s IP address',
  port: 'give a TCP port for this resource\'s peer link',
  disk: 'give each node\'s backing device (disk: { alpha: /dev/sdb1, bravo: /dev/sdb1 })',
  devices: 'list the resources the pool spans (devices: [a])',
};

type Parsed = z.infer<typeof schema>;
export type ClusterOptions = { name: string; deadTime: number; selfFence: number; heartbeatPort: number; failover: 'auto' | 'manual' };
/** `cluster` is always the name; `membership` holds its timing (milliseconds) whichever form the file used. */
export type ClusterConfig = Omit<Parsed, 'cluster'> & { cluster: string; membership: { deadTimeMs: number; selfFenceMs: number; heartbeatPort: number; failover: 'auto' | 'manual' }; file: string };

export interface ConfigProblem {
  path: (string | number)[];
  line?: number;
  message: string;
}

export class ConfigError extends UserError {
  constructor(
    readonly file: string,
    readonly problems: ConfigProblem[],
  ) {
    super(
      problems.length === 1
        ? formatProblem(file, problems[0])
        : `${file}: ${problems.length} mistakes:\n${problems.map((p) => `  ${formatProblem(file, p)}`).join('\n')}`,
    );
  }
}

function formatProblem(file: string, p: ConfigProblem): string {
  const where = p.line !== undefined ? `${file}:${p.line}` : file;
  return p.path.length > 0 ? `${where}: ${p.path.join('.')}: ${p.message}` : `${where}: ${p.message}`;
}

export function loadClusterConfig(file: string): ClusterConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    const code = errnoCode(err);
    throw new UserError(
      code === 'ENOENT' ? `${file}: no such cluster file (give --config FILE or DUET_CONFIG)` : `${file}: cannot read (${code ?? (err as Error).message})`,
    );
  }
  return parseClusterConfig(text, file);
}

export function parseClusterConfig(text: string, file: string): ClusterConfig {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, uniqueKeys: true, prettyErrors: false });
  if (doc.errors.length > 0) {
    throw new ConfigError(
      file,
      doc.errors.map((e) => ({ path: [], line: lines.linePos(e.pos[0]).line, message: `not valid YAML: ${e.message.split('\n')[0]}` })),
    );
  }
  const lineOf = (path: (string | number)[]): number | undefined => {
    // The deepest node that exists on the path: a missing key points at its parent.
    for (let n = path.length; n >= 0; n--) {
      const node = n === 0 ? doc.contents : doc.getIn(path.slice(0, n), true);
      if (isNode(node) && node.range) return lines.linePos(node.range[0]).line;
    }
    return undefined;
  };
  const raw = doc.toJS() as unknown;
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new ConfigError(file, [{ path: [], line: 1, message: 'must be a mapping (cluster:, secret:, nodes:, resources:, ...)' }]);
  }
  const parsed = schema.safeParse(raw);
  const problems: ConfigProblem[] = [];
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      let message = issue.message;
      if (issue.code === 'unrecognized_keys') message = `unknown key${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `"${k}"`).join(', ')}: remove or correct ${issue.keys.length > 1 ? 'them' : 'it'}`;
      else if (issue.code === 'invalid_type' && issue.received === 'undefined') {
        const hint = MISSING_HINTS[String(issue.path[issue.path.length - 1])];
        message = hint ? `is missing: ${hint}` : 'is missing';
      }
      problems.push({ path: issue.path, line: lineOf(issue.path), message });
    }
    throw new ConfigError(file, problems);
  }
  const options: ClusterOptions = typeof parsed.data.cluster === 'string' ? { name: parsed.data.cluster, deadTime: 2000, selfFence: 1000, heartbeatPort: 7797, failover: 'auto' } : parsed.data.cluster;
  const config: ClusterConfig = {
    ...parsed.data,
    cluster: options.name,
    membership: { deadTimeMs: options.deadTime, selfFenceMs: options.selfFence, heartbeatPort: options.heartbeatPort, failover: options.failover },
    file,
  };
  crossCheck(config, (path, message) => problems.push({ path, line: lineOf(path), message }));
  if (problems.length > 0) throw new ConfigError(file, problems);
  return config;
}

/** What one section says about another: names that must exist, ports that must not clash. */
function crossCheck(c: ClusterConfig, problem: (path: (string | number)[], message: string) => void): void {
  const nodes = Object.keys(c.nodes);
  const nodeList = nodes.join(', ');
  for (const n of nodes) if (!NAME.test(n)) problem(['nodes', n], `node name: ${nameMessage}`);
  const addresses = new Map<string, string>();
  for (const [n, node] of Object.entries(c.nodes)) {
    const other = addresses.get(node.address);
    if (other) problem(['nodes', n, 'address'], `${node.address} is also node ${other}'s address; every node needs its own`);
    addresses.set(node.address, n);
  }
  if (c.witness && addresses.has(c.witness.address)) problem(['witness', 'address'], `${c.witness.address} is node ${addresses.get(c.witness.address)}'s address; the witness needs its own`);
  const ports = new Map<number, string>([[c.exports.port, 'exports.port']]);
  if (ports.has(c.api.port)) problem(['api', 'port'], `port ${c.api.port} is already used by exports.port; give the API its own port`);
  ports.set(c.api.port, 'api.port');
  if (!c.api.tls) {
    const open = Object.entries(c.nodes).filter(([, node]) => !isLoopback(node.address));
    if (open.length) problem(['api', 'tls'], `plain HTTP is only for loopback addresses, and node ${open[0][0]} is at ${open[0][1].address}: remove tls: false (the API then uses TLS with the cluster's own CA)`);
  }
  if (ports.has(c.membership.heartbeatPort)) problem(['cluster', 'heartbeatPort'], `port ${c.membership.heartbeatPort} is already used by ${ports.get(c.membership.heartbeatPort)}; give the heartbeat its own port`);
  ports.set(c.membership.heartbeatPort, 'cluster.heartbeatPort');
  if (c.membership.selfFenceMs >= c.membership.deadTimeMs * 4) problem(['cluster', 'selfFence'], `${c.membership.selfFenceMs}ms is long next to deadTime (${c.membership.deadTimeMs}ms): a lost node's VMs would be down for both; keep selfFence under 4 × deadTime`);
  for (const [n, node] of Object.entries(c.nodes)) {
    if (node.heartbeatAddress === undefined) continue;
    const other = addresses.get(node.heartbeatAddress);
    if (other && other !== n) problem(['nodes', n, 'heartbeatAddress'], `${node.heartbeatAddress} is node ${other}'s address; a second path needs an address of ${n}'s own`);
  }
  for (const [r, res] of Object.entries(c.resources)) {
    if (!NAME.test(r)) problem(['resources', r], `resource name: ${nameMessage}`);
    for (const n of Object.keys(res.disk)) if (!c.nodes[n]) problem(['resources', r, 'disk', n], `no node named ${n} (nodes: ${nodeList})`);
    if (Object.keys(res.disk).length !== 2) problem(['resources', r, 'disk'], 'a resource mirrors one disk on each of two nodes: give exactly two nodes');
    if (res.prefer !== undefined && !res.disk[res.prefer]) problem(['resources', r, 'prefer'], `${res.prefer} has no disk in this resource (disk: ${Object.keys(res.disk).join(', ')})`);
    const clash = ports.get(res.port);
    if (clash) problem(['resources', r, 'port'], `port ${res.port} is already used by ${clash}; give each resource its own port`);
    ports.set(res.port, `resources.${r}.port`);
  }
  const poolOf = new Map<string, string>();
  for (const [p, pool] of Object.entries(c.pools)) {
    if (!NAME.test(p)) problem(['pools', p], `pool name: ${nameMessage}`);
    pool.devices.forEach((d, i) => {
      if (!c.resources[d]) problem(['pools', p, 'devices', i], `no resource named ${d} (resources: ${Object.keys(c.resources).join(', ') || 'none'})`);
      const other = poolOf.get(d);
      if (other) problem(['pools', p, 'devices', i], `resource ${d} is already in pool ${other}; a resource belongs to one pool`);
      poolOf.set(d, p);
    });
  }
  for (const [p, pool] of Object.entries(c.pools)) {
    // A pool opens where all its resources are Primary: preferring two nodes would keep it closed on both.
    const known = pool.devices.filter((d) => c.resources[d]?.prefer !== undefined);
    if (new Set(known.map((d) => c.resources[d].prefer)).size > 1) {
      problem(['pools', p, 'devices'], `its resources prefer different nodes (${known.map((d) => `${d}: ${c.resources[d].prefer}`).join(', ')}); a pool is served by one node: give them the same prefer`);
    }
  }
  for (const [v, vm] of Object.entries(c.vms)) {
    const floor = parseSize(String(vm.minMemory ?? vm.memory));
    for (const [n, node] of Object.entries(c.nodes)) {
      if (node.vmMemory !== undefined && floor > parseSize(String(node.vmMemory))) {
        problem(['vms', v, vm.minMemory !== undefined ? 'minMemory' : 'memory'], `${vm.minMemory ?? vm.memory} does not fit nodes.${n}.vmMemory (${node.vmMemory}): it could never run there; lower it or raise vmMemory`);
      }
    }
  }
  for (const [v, vm] of Object.entries(c.vms)) {
    if (!NAME.test(v)) problem(['vms', v], `VM name: ${nameMessage}`);
    vm.disks.forEach((d, i) => {
      const pool = d.split('/')[0];
      if (!c.pools[pool]) problem(['vms', v, 'disks', i], `no pool named ${pool} (pools: ${Object.keys(c.pools).join(', ') || 'none'})`);
    });
    if (vm.prefer !== undefined && !c.nodes[vm.prefer]) problem(['vms', v, 'prefer'], `no node named ${vm.prefer} (nodes: ${nodeList})`);
    if (vm.minMemory !== undefined && parseSize(String(vm.minMemory)) > parseSize(String(vm.memory))) {
      problem(['vms', v, 'minMemory'], `${vm.minMemory} is more than memory (${vm.memory}): the floor must be at most the boot size`);
    }
  }
}

/** 127.0.0.0/8 or ::1: traffic that never leaves the machine. */
export function isLoopback(a: string): boolean {
  return net.isIPv4(a) ? a.startsWith('127.') : a === '::1';
}

/**
 * Where the cluster CA's certificate is kept: beside the secret file, named after it (SECRET.ca.pem), so
 * two clusters' secrets in one directory keep their own; for an inline secret, beside the cluster file.
 */
export function caFileOf(c: ClusterConfig): string {
  const base = c.secret.file !== undefined ? path.resolve(path.dirname(c.file), c.secret.file) : path.resolve(c.file);
  return `${base}.ca.pem`;
}

/** The cluster secret (file relative to the cluster file, or inline), as bytes. */
export function loadSecret(c: ClusterConfig): Buffer {
  if (c.secret.value !== undefined) return Buffer.from(c.secret.value);
  const file = path.resolve(path.dirname(c.file), c.secret.file!);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new UserError(`${c.file}: secret.file: cannot read ${file} (${errnoCode(err) ?? (err as Error).message}); create it with e.g. head -c 32 /dev/urandom | base64 > ${file}`);
  }
  const secret = text.trim();
  if (secret.length < 16) throw new UserError(`${file}: the cluster secret is too short (${secret.length} characters); use at least 16`);
  return Buffer.from(secret);
}

/** The node named on the command line, checked against the file. */
export function nodeOf(c: ClusterConfig, node: string | undefined): string {
  if (!node) throw new UserError(`name this node with --node NAME or DUET_NODE (nodes in ${c.file}: ${Object.keys(c.nodes).join(', ')})`);
  if (!c.nodes[node]) throw new UserError(`${c.file}: there is no node named ${node} (nodes: ${Object.keys(c.nodes).join(', ')})`);
  return node;
}
