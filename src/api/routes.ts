/**
 * The node daemon's HTTP API, /api/v1: one table that both the server and
 * the client read, so a command and its route can never drift apart.
 *
 * Every route names the daemon command it runs (the `cmd` of NodeCommand).
 * A request's fields come from the URL's parameters plus the query string
 * (GET, DELETE) or the JSON body (POST, PUT); `fields` checks them all, and
 * the daemon receives `{cmd, ...fields}`. Query strings carry text, so their
 * numbers and booleans are read with `num` and `bool`.
 *
 * Routes under /api/v1/node/ are what one node asks of its peer during a
 * migration or a takeover; the CLI and the dashboard use the others.
 */
import { z } from 'zod';
import * as S from './schemas.js';

export type Method = 'GET' | 'POST' | 'PUT' | 'DELETE';

/** How a route moves bytes besides JSON: a volume stream out or in. */
export type StreamKind = 'out' | 'in';

export interface Route {
  cmd: string;
  method: Method;
  /** Fastify's form: /api/v1/resources/:resource */
  url: string;
  /** All the request's fields (URL parameters included), without cmd. */
  fields: z.ZodObject<z.ZodRawShape>;
  stream?: StreamKind;
  /** One line for the route index (GET /api/v1). */
  summary: string;
  /** The answer's shape (schemas.ts), where scripts rely on it. */
  response?: z.ZodTypeAny;
}

const name = z.string().min(1).max(64);
const volName = z.string().min(1).max(128);
/** A query string's number: decimal digits only (not "", not 0x10, not 1e3). */
const num = z
  .string()
  .regex(/^\d{1,15}$/, 'must be a whole number')
  .transform(Number);
/** A query string's boolean: true/false, 1/0. */
const bool = z.union([z.boolean(), z.enum(['true', 'false', '1', '0']).transform((s) => s === 'true' || s === '1')]);
const size = z.number().int().positive();

const diskEndpoint = z
  .object({ volume: z.string(), node: z.string(), host: z.string(), port: z.number().int(), export: z.string(), incarnation: z.string().regex(/^[0-9a-f]{16}$/).optional() })
  .strict();

const V = '/api/v1';

function route(cmd: string, method: Method, url: string, shape: z.ZodRawShape, summary: string, stream?: StreamKind): Route {
  const response = RESPONSES[cmd];
  return { cmd, method, url: `${V}${url}`, fields: z.object(shape).strict(), summary, ...(stream ? { stream } : {}), ...(response ? { response } : {}) };
}

const RESPONSES: Record<string, z.ZodTypeAny> = {
  'cluster.status': S.clusterStatusSchema,
  'pools.list': S.poolListSchema,
  'resource.status': S.nodeStatusSchema,
  'resource.primary': S.nodeStatusSchema,
  'resource.secondary': S.nodeStatusSchema,
  'resource.attach': S.nodeStatusSchema,
  'resource.verify': S.verifySchema,
  'cluster.fence-test': S.fenceTestSchema,
  'events.list': S.eventsSchema,
  'vm.list': S.vmListSchema,
  'pool.show': S.poolInfoSchema,
  'vol.list': z.array(S.volumeSchema),
  'vol.create': S.volumeSchema,
  'vol.resize': S.volumeSchema,
  'vol.snapshot': S.volumeSchema,
  'vol.clone': S.volumeSchema,
};

export const ROUTES: readonly Route[] = [
  route('cluster.status', 'GET', '/status', {}, 'the cluster: nodes, quorum, witness, resources, VMs, alerts'),
  route('pools.list', 'GET', '/pools', {}, 'the pools of the cluster file, with their usage where open here'),

  route('resource.status', 'GET', '/resources', {}, 'every resource of this node'),
  route('resource.status', 'GET', '/resources/:resource', { resource: name }, 'one resource: role, disk, peer, resync, verify'),
  route('resource.primary', 'POST', '/resources/:resource/primary', { resource: name, force: z.boolean().default(false), handover: z.boolean().optional() }, 'make this node Primary (handover: live, moving the VMs)'),
  route('resource.secondary', 'POST', '/resources/:resource/secondary', { resource: name, force: z.boolean().optional() }, 'make this node Secondary'),
  route('resource.disconnect', 'POST', '/resources/:resource/disconnect', { resource: name }, 'drop the peer link and stay StandAlone'),
  route('resource.connect', 'POST', '/resources/:resource/connect', { resource: name }, 'connect to the peer again'),
  route('resource.verify', 'POST', '/resources/:resource/verify', { resource: name }, 'compare both disks block by block'),
  route('resource.resolve', 'POST', '/resources/:resource/resolve', { resource: name, keep: z.string().min(1).max(64) }, 'end a split brain, keeping one side'),
  route('resource.restore-blocks', 'POST', '/resources/:resource/restore-blocks', { resource: name, file: z.string().min(1).max(4096) }, 'write back blocks saved by a split-brain resolve'),
  route('resource.attach', 'POST', '/resources/:resource/attach', { resource: name }, 'bring up a resource whose disk just got metadata'),

  route('cluster.set-drained', 'PUT', '/nodes/:node/drained', { node: name, drained: z.boolean() }, 'mark a node drained (no VM goes there) or not'),
  route('node.rejoin', 'POST', '/nodes/:node/rejoin', { node: name }, 'resync a repaired node and move its VMs and roles back'),
  route('node.drain', 'POST', '/nodes/:node/drain', { node: name }, 'move every VM and role off a node, live'),
  route('cluster.fence-test', 'POST', '/nodes/:node/fence-test', { node: name }, 'dry run of the fence path for a node'),

  route('events.list', 'GET', '/events', { since: num.optional(), limit: num.optional(), tail: num.optional() }, 'the event log (since a sequence number, or the last N)'),

  route('vm.list', 'GET', '/vms', {}, 'every VM of the cluster: where it runs, state, memory'),
  route('vm.start', 'POST', '/vms/:vm/start', { vm: name, on: name.optional(), auto: z.boolean().optional(), forwarded: z.boolean().optional() }, 'start a VM (on a node, or where it is preferred)'),
  route('vm.stop', 'POST', '/vms/:vm/stop', { vm: name, force: z.boolean().optional() }, 'stop a VM (force: kill it)'),
  route('vm.console', 'GET', '/vms/:vm/console', { vm: name, since: num.optional(), here: bool.optional(), raw: bool.optional() }, "a VM's serial console (since an offset)"),
  route('vm.migrate', 'POST', '/vms/:vm/migrate', { vm: name, to: name }, 'live-migrate a VM to a node'),
  route('vm.set-memory', 'PUT', '/vms/:vm/memory', { vm: name, bytes: size }, "set a running VM's memory (balloon)"),
  route('vm.xl-config', 'GET', '/vms/:vm/xl-config', { vm: name }, 'the VM as a Xen xl config'),

  route('vm.local', 'GET', '/node/vms', {}, 'the VMs running on this node (peer call)'),
  route('vm.incarnations', 'GET', '/node/incarnations', {}, 'which open of each pool this node serves (peer call)'),
  route('vm.start-here', 'POST', '/node/vms/:vm/start', { vm: name }, 'boot a VM on this node (peer call)'),
  route('vm.stop-here', 'POST', '/node/vms/:vm/stop', { vm: name, force: z.boolean().optional() }, 'stop a VM running on this node (peer call)'),
  route('vm.mark', 'PUT', '/node/vms/:vm/mark', { vm: name, stopped: z.boolean(), at: z.number().int().nonnegative() }, "record a VM's stopped mark (peer call)"),
  route('vm.migrate-out', 'POST', '/node/vms/:vm/migrate-out', { vm: name, to: name }, 'send a VM to a node (peer call)'),
  route(
    'vm.migrate-in',
    'POST',
    '/node/vms/:vm/migrate-in',
    { vm: name, from: name, memoryBytes: size, cpus: z.number().int().positive(), disks: z.array(diskEndpoint).max(64), waitMs: z.number().int().nonnegative().optional() },
    'receive a VM from a node (peer call)',
  ),
  route('vm.migrate-done', 'POST', '/node/vms/:vm/migrate-done', { vm: name, from: name }, 'a migration to this node finished (peer call)'),
  route('vm.migrate-abort', 'POST', '/node/vms/:vm/migrate-abort', { vm: name }, 'a migration to this node failed (peer call)'),
  route('vm.pause-io', 'POST', '/node/pause-io', { pools: z.array(name).max(64), leaseMs: z.number().int().nonnegative().optional() }, "hold the I/O of this node's VMs on pools (peer call)"),
  route('vm.resume-io', 'POST', '/node/resume-io', { pools: z.array(name).max(64), server: name }, "let this node's VMs go on, served by a node (peer call)"),

  route('pool.show', 'GET', '/pools/:pool', { pool: name }, 'a pool: size, used, devices, volumes'),
  route('pool.check', 'GET', '/pools/:pool/check', { pool: name }, "check a pool's metadata"),
  route('pool.extend', 'POST', '/pools/:pool/extend', { pool: name, device: z.string().min(1).max(4096) }, 'add a device to a pool'),
  route('vol.list', 'GET', '/pools/:pool/volumes', { pool: name }, 'the volumes and snapshots of a pool'),
  route('vol.create', 'POST', '/pools/:pool/volumes', { pool: name, name: volName, sizeBytes: size }, 'create a thin volume'),
  route('vol.resize', 'PUT', '/pools/:pool/volumes/:name/size', { pool: name, name: volName, sizeBytes: size, force: z.boolean().default(false) }, 'grow (or, with force, shrink) a volume'),
  route('vol.snapshot', 'POST', '/pools/:pool/volumes/:source/snapshots', { pool: name, source: volName, name: volName }, 'take a read-only snapshot'),
  route('vol.clone', 'POST', '/pools/:pool/volumes/:source/clones', { pool: name, source: volName, name: volName }, 'make a writable clone'),
  route('vol.remove', 'DELETE', '/pools/:pool/volumes/:name', { pool: name, name: volName }, 'remove a volume or snapshot'),
  route('vol.diff', 'GET', '/pools/:pool/diff', { pool: name, old: volName, new: volName }, 'the ranges that differ between two snapshots'),
  route('vol.send', 'GET', '/pools/:pool/volumes/:name/stream', { pool: name, name: volName, from: volName.optional() }, 'a send stream of a snapshot (incremental from another)', 'out'),
  route('vol.receive', 'PUT', '/pools/:pool/volumes/:name/stream', { pool: name, name: volName }, 'receive a send stream into a new volume', 'in'),
];

/** The URL parameters of a route, in order: ['pool', 'name'] for /pools/:pool/volumes/:name. */
export function paramsOf(r: Route): string[] {
  return [...r.url.matchAll(/:([a-zA-Z]+)/g)].map((m) => m[1]);
}

/**
 * The route a command goes by. A command with more than one route (resource
 * status with or without a resource) takes the one whose parameters it has.
 */
export function routeOf(command: { cmd: string } & Record<string, unknown>): Route {
  const candidates = ROUTES.filter((r) => r.cmd === command.cmd);
  if (candidates.length === 0) throw new Error(`no API route for ${command.cmd}`);
  const fits = candidates.filter((r) => paramsOf(r).every((p) => command[p] !== undefined));
  // The route that uses most of the command's fields in its path.
  fits.sort((a, b) => paramsOf(b).length - paramsOf(a).length);
  if (!fits[0]) throw new Error(`${command.cmd}: missing ${paramsOf(candidates[0]).join(', ')}`);
  return fits[0];
}

/** A command as an HTTP request: method, path (parameters and query filled in), JSON body. */
export function requestOf(command: { cmd: string } & Record<string, unknown>): { route: Route; method: Method; path: string; body?: Record<string, unknown> } {
  const route = routeOf(command);
  const params = paramsOf(route);
  const rest: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(command)) if (k !== 'cmd' && !params.includes(k) && v !== undefined) rest[k] = v;
  const path = route.url.replace(/:([a-zA-Z]+)/g, (_m, p: string) => encodeURIComponent(String(command[p])));
  if (route.method === 'GET' || route.method === 'DELETE') {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(rest)) q.set(k, String(v));
    const qs = q.toString();
    return { route, method: route.method, path: qs ? `${path}?${qs}` : path };
  }
  return { route, method: route.method, path, body: rest };
}
