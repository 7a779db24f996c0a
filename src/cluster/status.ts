/**
 * `cluster status` (the whole cluster as one node sees it) and `fence test`
 * (what a takeover of a node would do, with the fence command run as a dry
 * run: `COMMAND NODE status`).
 */
import { NotFoundError, UserError } from '../util/errors.js';
import { formatSize, parseSize } from '../util/size.js';
import type { VmInfo } from '../vm/manager.js';
import { runFence } from './fence.js';
import { planMemory, planVmOf } from './memory-plan.js';
import type { NodeDaemon } from './node.js';

export interface ClusterStatus {
  cluster: string;
  /** The node that answered. */
  node: string;
  /** Its clock when it answered (ISO 8601, ms): `duet doctor` measures the skew with it. */
  time: string;
  quorum: boolean;
  witness: { configured: boolean; reachable: boolean | null };
  warnings: string[];
  nodes: ReturnType<NodeDaemon['cluster']['nodeStates']>;
  resources: { name: string; primary: string | null; disk: string; connection: string; outOfSyncBytes: number }[];
  vms: { name: string; node: string | null; state: string }[];
  lastTakeover?: NodeDaemon['cluster']['lastTakeover'];
}

export async function clusterStatus(d: NodeDaemon): Promise<ClusterStatus> {
  const c = d.config;
  const warnings: string[] = [];
  const peer = d.cluster.peer;
  if (peer && !c.witness) {
    warnings.push(
      c.fence
        ? 'no witness: a lost peer cannot be told from a cut link; takeover relies on the fence command alone (both nodes may try to fence each other)'
        : 'no witness and no fence command: a lost node is not taken over automatically (add witness: { address } to the cluster file)',
    );
  }
  const reachable = d.cluster.witnessReachable();
  if (reachable === false) warnings.push('the witness does not answer: quorum rests on the peer alone');
  const resources = Object.keys(c.resources).map((name) => {
    const s = d.status().resources.find((r) => r.name === name);
    const e = d.resources.get(name);
    const peerRole = e?.resource.peer?.state?.role;
    const primary = e?.resource.role === 'Primary' ? d.node : peerRole === 'Primary' ? e!.peerNode : null;
    const p = s?.peers[0];
    return { name, primary, disk: s?.disk ?? 'Diskless', connection: p?.connection ?? 'StandAlone', outOfSyncBytes: p?.outOfSyncBytes ?? 0 };
  });
  let vms: VmInfo[] = [];
  try {
    vms = await d.vms.list();
  } catch (err) {
    warnings.push(`VMs: ${(err as Error).message}`);
  }
  return {
    cluster: c.cluster,
    node: d.node,
    time: new Date().toISOString(),
    quorum: d.cluster.hasQuorum,
    witness: { configured: c.witness !== undefined, reachable },
    warnings,
    nodes: d.cluster.nodeStates(),
    resources,
    vms: vms.map((v) => ({ name: v.name, node: v.node, state: v.state })),
    ...(d.cluster.lastTakeover ? { lastTakeover: d.cluster.lastTakeover } : {}),
  };
}

export interface FenceTestReport {
  node: string;
  by: string;
  ok: boolean;
  lines: string[];
  command?: { ok: boolean; exitCode: number | null; ms: number; output: string };
}

/** What a takeover of `node` by this node would do; the fence command runs with `status`, not `off`. */
export async function fenceTest(d: NodeDaemon, node: string): Promise<FenceTestReport> {
  const c = d.config;
  if (!c.nodes[node]) throw new NotFoundError(`fence test ${node}: no node named ${node} in ${c.file} (nodes: ${Object.keys(c.nodes).join(', ')})`);
  const peer = d.cluster.peer;
  if (node === d.node) {
    if (!peer) throw new UserError(`fence test ${node}: ${node} is the only node: nobody would fence it`);
    // The node that would fence it is its peer.
    return (await d.call(peer, { cmd: 'cluster.fence-test', node }, (c.fence?.timeout ?? 0) + 15_000)) as FenceTestReport;
  }
  const lines: string[] = [];
  const m = c.membership;
  const states = d.cluster.nodeStates();
  const st = states.find((s) => s.name === node);
  const paths = st?.paths?.map((p) => `${p.remote} ${p.lastHeardMsAgo === null ? 'never heard' : `heard ${p.lastHeardMsAgo} ms ago`}`).join(', ');
  lines.push(`${node} is ${st?.state ?? 'unknown'} as ${d.node} sees it${paths ? ` (heartbeat: ${paths})` : ''}; ${d.node} ${d.cluster.hasQuorum ? 'has quorum' : 'has NO quorum: it would fence itself, not take over'}`);
  let ok = d.cluster.hasQuorum;
  if (c.witness) {
    lines.push(`after ${m.deadTimeMs} ms without any sign of ${node}, ${d.node} asks the witness to declare it dead (granted only if the witness has not heard it either), then waits ${m.selfFenceMs} ms (selfFence: ${node} kills its own VMs when it loses quorum)`);
  } else if (c.fence) {
    lines.push(`no witness: after ${m.deadTimeMs} ms without any sign of ${node}, ${d.node} fences it with the fence command and takes over`);
  } else {
    lines.push(`no witness and no fence command: ${d.node} would NOT take ${node} over by itself (an admin decides: resource primary RES --force)`);
    ok = false;
  }
  let command: FenceTestReport['command'];
  if (c.fence) {
    const r = await runFence(c.fence.command, node, 'status', c.fence.timeout, { DUET_CLUSTER: c.cluster });
    command = { ok: r.ok, exitCode: r.exitCode, ms: r.ms, output: r.output };
    lines.push(`fence command, dry run: ${r.message}`);
    if (!r.ok) {
      lines.push(`a takeover of ${node} would be blocked until the fence command works`);
      ok = false;
    }
  }
  const takes = [...d.resources.values()].filter((e) => e.peerNode === node && e.resource.role !== 'Primary').map((e) => e.name);
  const pools = Object.entries(c.pools).filter(([, p]) => p.devices.some((r) => takes.includes(r))).map(([p]) => p);
  lines.push(takes.length > 0 ? `it would promote ${takes.join(', ')} here, open pool ${pools.join(', ') || '(none)'} and export its volumes at ${d.address}:${c.exports.port}` : `no resource to promote: ${d.node} is Primary for all it shares with ${node}`);
  const vms = await d.vms.list().catch(() => [] as VmInfo[]);
  const lost = vms.filter((v) => v.node === node).map((v) => v.name);
  const here = vms.filter((v) => v.node === d.node);
  const budget = c.nodes[d.node].vmMemory;
  const plan = planMemory(budget !== undefined ? parseSize(String(budget)) : undefined, [...here.map((v) => planVmOf(c.vms, v.name, true, v.memoryBytes)), ...lost.map((n) => planVmOf(c.vms, n, false))]);
  if (lost.length === 0) lines.push(`no VM runs on ${node} now: none to boot`);
  else {
    lines.push(`it would boot ${plan.boot.map((n) => `${n} (priority ${c.vms[n].priority}, ${formatSize(plan.targets.get(n)!)})`).join(', ') || 'none'} here, in that order${budget !== undefined ? ` (vmMemory ${budget}: ${formatSize(plan.totalBytes)} planned)` : ''}`);
    const squeezed = here.filter((v) => (plan.targets.get(v.name) ?? v.memoryBytes) < v.memoryBytes);
    if (squeezed.length > 0) lines.push(`and squeeze ${squeezed.map((v) => `${v.name} to ${formatSize(plan.targets.get(v.name)!)}`).join(', ')}`);
    if (plan.leftOut.length > 0) lines.push(`${plan.leftOut.join(', ')} would be left stopped: ${plan.leftOut.length > 1 ? 'they do' : 'it does'} not fit even at minMemory`);
  }
  return { node, by: d.node, ok, lines, ...(command ? { command } : {}) };
}
