/**
 * `node rejoin NODE` and `node drain NODE`: the planned moves of a whole
 * node, run by whichever daemon gets the command, as a sequence of the
 * live operations duet already has (handover of a Primary role, live
 * migration of a VM). Each step checks where things are first, so both
 * are idempotent: interrupted (a node restarted, the CLI stopped) and run
 * again, they go on from where things stand.
 *
 * rejoin (after a repair, with the old disk or a new empty one): wait until
 * NODE is connected and UpToDate for every resource it shares (the resync
 * runs by itself: a bitmap resync of what changed, or a full sync of a disk
 * given new metadata by create-md), then hand every resource that prefers
 * NODE back to it, then migrate every VM that prefers NODE back, live. The
 * drain mark on NODE (if any) goes first, so its VMs may run there again.
 *
 * drain (maintenance): mark NODE drained (no VM starts or returns there
 * until rejoin), migrate every VM running on NODE to its peer, live, then
 * hand every resource NODE is Primary for to the peer. Refused before
 * anything moves when the peer could not take it: the peer down or fenced,
 * a resource not in sync (the peer's copy would be old), or the VMs not
 * fitting the peer's vmMemory even at their minMemory.
 */
import { NotFoundError, UserError } from '../util/errors.js';
import { parseSize } from '../util/size.js';
import type { NodeResourceStatus, NodeStatus } from './node.js';
import type { NodeDaemon } from './node.js';
import { planMemory, planVmOf } from './memory-plan.js';
import type { VmInfo } from '../vm/manager.js';

/** How long rejoin waits for NODE's disks to be UpToDate (a full sync of a big disk takes a while). */
const RESYNC_WAIT_MS = 6 * 3600_000;
const POLL_MS = 1000;

export interface MoveResult {
  node: string;
  steps: string[];
  message: string;
}

async function statusOf(d: NodeDaemon, node: string): Promise<NodeStatus> {
  if (node === d.node) return d.status();
  try {
    return (await d.call(node, { cmd: 'resource.status' }, 10_000)) as NodeStatus;
  } catch (err) {
    throw new UserError(`node ${node} does not answer (${(err as Error).message}): start its daemon (duet node run --node ${node}) and try again`, 1);
  }
}

/** The resources `node` shares with its peer. */
function sharedResources(d: NodeDaemon, node: string): string[] {
  return Object.entries(d.config.resources)
    .filter(([, r]) => r.disk[node] !== undefined)
    .map(([name]) => name);
}

function inSync(r: NodeResourceStatus): boolean {
  const p = r.peers[0];
  return r.disk === 'UpToDate' && p?.connection === 'Connected' && p.disk === 'UpToDate' && p.outOfSyncBytes === 0 && r.outOfSyncBytes === 0;
}

function peerOf(d: NodeDaemon, node: string): string {
  const other = Object.keys(d.config.nodes).find((n) => n !== node);
  if (!other) throw new UserError(`node ${node} has no peer in ${d.config.file}`);
  return other;
}

function checkNode(d: NodeDaemon, node: string, what: string): void {
  if (!d.config.nodes[node]) throw new NotFoundError(`${what} ${node}: no node named ${node} in ${d.config.file} (nodes: ${Object.keys(d.config.nodes).join(', ')})`);
}

export async function rejoin(d: NodeDaemon, node: string): Promise<MoveResult> {
  checkNode(d, node, 'node rejoin');
  const steps: string[] = [];
  const t0 = Date.now();
  const resources = sharedResources(d, node);
  const peer = peerOf(d, node);
  // It must answer: a node still down cannot take anything back.
  await statusOf(d, node);
  d.log.info({ event: 'rejoin-start', node }, `rejoin of ${node}: waiting for its disks, then moving its resources and VMs back`);
  await setDrained(d, node, false);
  // 1. Its disks UpToDate and in sync (the resync runs by itself).
  const deadline = Date.now() + RESYNC_WAIT_MS;
  for (;;) {
    const s = await statusOf(d, node);
    const waiting = resources.filter((r) => {
      const st = s.resources.find((x) => x.name === r);
      return !st || !inSync(st);
    });
    if (waiting.length === 0) break;
    const down = s.resources.filter((x) => waiting.includes(x.name) && x.down !== null);
    if (down.length > 0) throw new UserError(`node rejoin ${node}: ${down.map((x) => `resource ${x.name} is down there: ${x.down}`).join('; ')}`, 1);
    if (Date.now() > deadline) throw new UserError(`node rejoin ${node}: ${waiting.join(', ')} not in sync after ${RESYNC_WAIT_MS / 3600_000} h: see resource status on ${node}`, 1);
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  steps.push(`disks in sync after ${Math.round((Date.now() - t0) / 1000)} s`);
  // 2. The Primary roles that prefer it, back (live: the VMs using them pause for a moment).
  const back = resources.filter((r) => d.config.resources[r].prefer === node);
  for (const r of back) {
    const s = await statusOf(d, node);
    if (s.resources.find((x) => x.name === r)?.role === 'Primary') continue;
    const done = (await d.call(node, { cmd: 'resource.primary', resource: r, force: false, handover: true }, 180_000)) as { message?: string };
    steps.push(done.message ?? `resource ${r} handed back to ${node}`);
  }
  // 3. Its VMs, back, live.
  const vms = await d.vms.list();
  for (const v of vms) {
    if (d.config.vms[v.name]?.prefer !== node || v.node !== peer || (v.state !== 'running' && v.state !== 'paused')) continue;
    const r = (await d.call(peer, { cmd: 'vm.migrate', vm: v.name, to: node }, 15 * 60_000)) as { message?: string };
    steps.push(r.message ?? `vm ${v.name} migrated to ${node}`);
  }
  const message = `node ${node} rejoined in ${Math.round((Date.now() - t0) / 1000)} s: ${steps.join('; ')}`;
  d.log.warn({ event: 'rejoin-done', node, steps, details: steps }, message);
  return { node, steps, message };
}

export async function drain(d: NodeDaemon, node: string): Promise<MoveResult> {
  checkNode(d, node, 'node drain');
  const steps: string[] = [];
  const t0 = Date.now();
  const peer = peerOf(d, node);
  const resources = sharedResources(d, node);
  const [here, there] = await Promise.all([statusOf(d, node), statusOf(d, peer)]);
  // Everything is checked before anything moves: nothing half-done.
  const fenced = d.cluster.nodeStates().find((s) => s.name === peer)?.state;
  if (fenced === 'fenced' || fenced === 'offline') throw new UserError(`node drain ${node}: ${peer} is ${fenced}: its VMs would have nowhere to run`, 1);
  for (const r of resources) {
    const st = here.resources.find((x) => x.name === r);
    if (!st || st.role !== 'Primary') continue;
    if (!inSync(st)) throw new UserError(`node drain ${node}: resource ${r} is not in sync with ${peer} (${st.disk}, peer ${st.peers[0]?.disk ?? 'unknown'} ${st.peers[0]?.connection ?? ''}): let the resync finish first`, 1);
  }
  void there; // (asked only to be sure the peer answers)
  const vms = await d.vms.list();
  const moving = vms.filter((v) => v.node === node && (v.state === 'running' || v.state === 'paused'));
  const leftOut = await makeRoom(d, peer, vms, moving);
  if (leftOut.length > 0) throw new UserError(`node drain ${node}: ${leftOut.join(', ')} would not fit ${peer}'s vmMemory (${d.config.nodes[peer].vmMemory}) even at minMemory: stop ${leftOut.length > 1 ? 'them' : 'it'} first (vm stop), or raise nodes.${peer}.vmMemory`, 1);
  d.log.info({ event: 'drain-start', node, vms: moving.map((v) => v.name) }, `drain of ${node}: moving ${moving.length} VMs and its Primary roles to ${peer}`);
  await setDrained(d, node, true);
  for (const v of moving) {
    const r = (await d.call(node, { cmd: 'vm.migrate', vm: v.name, to: peer }, 15 * 60_000)) as { message?: string };
    steps.push(r.message ?? `vm ${v.name} migrated to ${peer}`);
  }
  for (const r of resources) {
    const s = await statusOf(d, node);
    if (s.resources.find((x) => x.name === r)?.role !== 'Primary') continue;
    const done = (await d.call(peer, { cmd: 'resource.primary', resource: r, force: false, handover: true }, 180_000)) as { message?: string };
    steps.push(done.message ?? `resource ${r} handed to ${peer}`);
  }
  const message = `node ${node} drained in ${Math.round((Date.now() - t0) / 1000)} s${steps.length > 0 ? `: ${steps.join('; ')}` : ': nothing ran there'}`;
  d.log.warn({ event: 'drain-done', node, steps, details: steps }, message);
  return { node, steps, message };
}

/**
 * Before `moving` VMs go to `target`: the memory plan for target (memory-plan.ts); every VM of the plan
 * above its share is squeezed first (those on target and those about to move, at their source). Returns
 * the moving VMs that do not fit even at their floors (nothing is squeezed then).
 */
async function makeRoom(d: NodeDaemon, target: string, vms: VmInfo[], moving: VmInfo[]): Promise<string[]> {
  const budget = d.config.nodes[target].vmMemory;
  if (budget === undefined || moving.length === 0) return [];
  const staying = vms.filter((v) => v.node === target && (v.state === 'running' || v.state === 'paused'));
  // The VMs to move count as booting (they may be left out); their size is what they have now.
  const c = d.config.vms;
  const plan = planMemory(parseSize(String(budget)), [...staying.map((v) => planVmOf(c, v.name, true, v.memoryBytes)), ...moving.map((v) => planVmOf(c, v.name, false, v.memoryBytes))]);
  if (plan.leftOut.length > 0) return plan.leftOut;
  for (const v of [...staying, ...moving]) {
    const want = plan.targets.get(v.name);
    if (want !== undefined && want < v.memoryBytes - MIB) await d.call(v.node!, { cmd: 'vm.set-memory', vm: v.name, bytes: want }, 60_000);
  }
  return [];
}

const MIB = 1024 * 1024;

/**
 * This node's disk failed under `resources` (Diskless: it goes on through the peer's disk). Its VMs using
 * them move to the peer, live, and the Primary roles with them, so they run where the data is.
 */
export async function evacuate(d: NodeDaemon, resources: string[]): Promise<MoveResult> {
  const t0 = Date.now();
  const peer = peerOf(d, d.node);
  const steps: string[] = [];
  const pools = Object.entries(d.config.pools)
    .filter(([, p]) => p.devices.some((r) => resources.includes(r)))
    .map(([name]) => name);
  d.log.warn({ event: 'disk-failover-start', resources, pools, to: peer }, `the disk of ${resources.join(', ')} failed on ${d.node}: moving its VMs and roles to ${peer}`);
  const vms = await d.vms.list();
  const moving = vms.filter((v) => v.node === d.node && (v.state === 'running' || v.state === 'paused') && d.config.vms[v.name].disks.some((disk) => pools.includes(disk.split('/')[0])));
  const leftOut = await makeRoom(d, peer, vms, moving);
  for (const v of moving) {
    if (leftOut.includes(v.name)) {
      steps.push(`vm ${v.name} stays on ${d.node} (its disks through ${peer}): it does not fit ${peer}'s vmMemory`);
      continue;
    }
    const r = (await d.call(d.node, { cmd: 'vm.migrate', vm: v.name, to: peer }, 15 * 60_000)) as { message?: string };
    steps.push(r.message ?? `vm ${v.name} migrated to ${peer}`);
  }
  for (const name of resources) {
    if (d.resources.get(name)?.resource.role !== 'Primary') continue;
    const done = (await d.call(peer, { cmd: 'resource.primary', resource: name, force: false, handover: true }, 180_000)) as { message?: string };
    steps.push(done.message ?? `resource ${name} handed to ${peer}`);
  }
  const message = `disk failure on ${d.node}: ${steps.length > 0 ? steps.join('; ') : 'nothing to move'} (${Math.round((Date.now() - t0) / 1000)} s)`;
  d.log.warn({ event: 'disk-failover-done', resources, to: peer, steps, details: steps }, message);
  return { node: d.node, steps, message };
}

/** Drained: no VM starts or returns there (kept on both nodes, and across restarts). */
async function setDrained(d: NodeDaemon, node: string, drained: boolean): Promise<void> {
  d.cluster.setDrained(node, drained);
  for (const n of Object.keys(d.config.nodes)) {
    if (n === d.node) continue;
    await d.call(n, { cmd: 'cluster.set-drained', node, drained }, 10_000).catch((err: unknown) => {
      throw new UserError(`node ${drained ? 'drain' : 'rejoin'} ${node}: ${n} could not be told (${(err as Error).message}): try again when it answers`, 1);
    });
  }
}

export type { VmInfo };
