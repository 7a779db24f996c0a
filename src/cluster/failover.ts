/**
 * Takeover: the peer is declared dead (membership.ts) and has had its
 * self-fence time. In order, each step an event with its time:
 *
 * 1. fence command (if the cluster file has one): `COMMAND PEER off`; a
 *    failure stops here (raised as an alert; tried again later);
 * 2. storage fence: the peer's addresses are cut off from this node's NBD
 *    exports (a QEMU still running there must not write again);
 * 3. promote every resource shared with the peer that is not Primary here
 *    (each promotion outdates the peer at the witness first), which opens
 *    their pools and exports their volumes at this node's address; VMs
 *    running here from the peer's exports are restarted on this node's
 *    (writes the peer had not flushed may be gone with it);
 * 4. boot the VMs that should run and run nowhere, in priority order,
 *    squeezing memory to fit `nodes.THIS.vmMemory` (memory-plan.ts): running
 *    VMs are ballooned down first; a VM that cannot fit is left stopped and
 *    reported.
 */
import os from 'node:os';
import type { Logger } from '../util/log.js';
import { parseSize } from '../util/size.js';
import type { Resource } from '../replication/resource.js';
import type { VmManager } from '../vm/manager.js';
import type { ClusterConfig } from './config.js';
import { runFence } from './fence.js';
import { planMemory, planVmOf } from './memory-plan.js';

export interface TakeoverHost {
  readonly node: string;
  readonly config: ClusterConfig;
  readonly log: Logger;
  readonly vms: VmManager;
  readonly secret: Buffer;
  resourceEntries(): { name: string; resource: Resource; peerNode: string }[];
  /** Promote `name` here and open the pools that can be (serialized with other role changes). */
  promoteHere(name: string): Promise<void>;
  fenceStorage(addresses: string[], fenced: boolean): number;
}

/**
 * The addresses a storage fence can go by: not loopback ones, nor this host's own (nodes on one machine,
 * as the demo: every local client comes from 127.0.0.1, this node's own QEMUs too).
 */
export function fenceableAddresses(addresses: string[]): string[] {
  const own = new Set(Object.values(os.networkInterfaces()).flatMap((l) => (l ?? []).map((i) => i.address)));
  return addresses.filter((a) => !own.has(a) && !/^127\./.test(a) && a !== '::1');
}

export interface TakeoverReport {
  peer: string;
  /** Every resource is Primary here (VMs that failed to boot are retried by the VM manager's autostart). */
  complete: boolean;
  /** Milliseconds from the start of the takeover. */
  steps: { step: string; atMs: number }[];
  resources: { name: string; ok: boolean; err?: string }[];
  vms: { name: string; started: boolean; atMs: number; was?: string; targetBytes?: number; err?: string; skipped?: string }[];
  leftOut: string[];
  /** VMs running here from the lost node's exports, restarted (step 3b). */
  restarted: { vm: string; restarted: boolean; err?: string }[];
  totalMs: number;
}

/** Two nodes without a witness both fence at once after a cut: the node named later waits this many deadTimes first (Pacemaker's fencing delay). */
const FENCE_DELAY_DEADTIMES = 2;

/**
 * `stillDead`: the peer is still declared dead and this node has not fenced itself; checked before every
 * step that cannot be taken back (a peer back in the middle stops the takeover where it is).
 */
export async function takeOver(host: TakeoverHost, peer: string, why: string, stillDead: () => boolean = () => true): Promise<TakeoverReport> {
  const t0 = performance.now();
  const at = (): number => Math.round(performance.now() - t0);
  const log = host.log;
  const report: TakeoverReport = { peer, complete: false, steps: [], resources: [], vms: [], leftOut: [], restarted: [], totalMs: 0 };
  const stepDone = (step: string): void => {
    report.steps.push({ step, atMs: at() });
  };
  log.warn({ event: 'takeover-start', node: peer, why }, `taking over ${peer} (${why})`);

  const abortIfBack = (step: string): void => {
    if (!stillDead()) throw new Error(`${peer} is back (or this node fenced itself) before ${step}: takeover stopped`);
  };
  const fence = host.config.fence;
  if (fence && host.config.witness === undefined && host.node > peer) {
    // Both sides of a cut would power each other off at the same moment: this one gives the other a head start.
    await new Promise((r) => setTimeout(r, FENCE_DELAY_DEADTIMES * host.config.membership.deadTimeMs));
    abortIfBack('the fence command (after the fencing delay)');
  }
  if (fence) {
    log.warn({ event: 'fence-started', node: peer, command: fence.command }, `fencing ${peer}: ${fence.command} ${peer} off`);
    const r = await runFence(fence.command, peer, 'off', fence.timeout, { DUET_CLUSTER: host.config.cluster });
    if (!r.ok) {
      log.error({ event: 'fence-failed', node: peer, exitCode: r.exitCode, timedOut: r.timedOut, output: r.output }, `${r.message}: not taking over ${peer} (a node that may still write keeps its VMs); tried again`);
      throw new Error(r.message);
    }
    log.warn({ event: 'fence-done', node: peer, ms: r.ms }, r.message);
    stepDone('fence-command');
  }

  const n = host.config.nodes[peer];
  const cut = host.fenceStorage(fenceableAddresses([n.address, ...(n.heartbeatAddress ? [n.heartbeatAddress] : [])]), true);
  const was = new Set(host.vms.lastKnownOn(peer));
  host.vms.setNodeFenced(peer, true);
  stepDone('storage-fenced');
  if (cut > 0) log.warn({ event: 'storage-fenced', node: peer, nbdClientsCut: cut }, `cut ${cut} NBD clients of ${peer} off`);

  abortIfBack('promoting its resources');
  // Taken before the promotions: a VM whose disks it served must restart even if its recovery moves them meanwhile.
  const served = host.vms.servedBy(peer);
  for (const e of host.resourceEntries()) {
    if (e.peerNode !== peer || e.resource.role === 'Primary') continue;
    const t = at();
    try {
      await host.promoteHere(e.name);
      report.resources.push({ name: e.name, ok: true });
      log.warn({ event: 'takeover-promoted', resource: e.name, node: peer, ms: at() - t }, `resource ${e.name}: Primary on ${host.node} (was on ${peer}), its pools open and exported`);
    } catch (err) {
      report.resources.push({ name: e.name, ok: false, err: (err as Error).message });
      log.error({ event: 'takeover-promote-failed', resource: e.name, node: peer, err: (err as Error).message }, `resource ${e.name}: cannot take it over from ${peer}: ${(err as Error).message}`);
    }
  }
  stepDone('promoted');

  // VMs here on the lost node's exports: their guests restart (its unflushed writes may be gone with it).
  abortIfBack('restarting the VMs it served');
  const restarted = await host.vms.restartServedBy(peer, served, `${peer} was lost`);
  report.restarted = restarted;
  if (restarted.length > 0) stepDone('vms-restarted');

  const lost = await host.vms.lostVms();
  const running = await host.vms.runningHere();
  const budget = host.config.nodes[host.node].vmMemory;
  const vms = host.config.vms;
  const plan = planMemory(budget !== undefined ? parseSize(String(budget)) : undefined, [...running.map((v) => planVmOf(vms, v.name, true, v.memoryBytes)), ...lost.map((name) => planVmOf(vms, name, false))]);
  for (const v of running) {
    const target = plan.targets.get(v.name);
    if (target !== undefined && target < v.memoryBytes) await host.vms.balloonHere(v.name, target).catch((err: unknown) => log.warn({ event: 'vm-squeeze-failed', vm: v.name, err: (err as Error).message }));
  }
  if (plan.boot.length > 0 || running.length > 0) stepDone('memory-planned');
  for (const name of plan.boot) {
    if (!stillDead()) {
      report.vms.push({ name, started: false, atMs: at(), skipped: `${peer} is back: not started here` });
      continue;
    }
    const target = plan.targets.get(name);
    const c = host.config.vms[name];
    const squeezed = target !== undefined && target < parseSize(String(c.memory)) ? target : undefined;
    try {
      const r = await host.vms.bootHere(name, squeezed);
      report.vms.push({ name, started: r.started, atMs: at(), ...(was.has(name) ? { was: peer } : {}), ...(squeezed ? { targetBytes: squeezed } : {}), ...(r.skipped ? { skipped: r.skipped } : {}) });
    } catch (err) {
      report.vms.push({ name, started: false, atMs: at(), err: (err as Error).message });
      log.error({ event: 'takeover-vm-failed', vm: name, err: (err as Error).message }, `vm ${name}: not started on ${host.node}: ${(err as Error).message}`);
    }
  }
  for (const name of plan.leftOut) {
    log.error({ event: 'vm-left-out', vm: name, vmMemory: budget }, `vm ${name}: left stopped: even at its minMemory it does not fit nodes.${host.node}.vmMemory (${budget}) beside the VMs that run there`);
  }
  report.leftOut = plan.leftOut;
  stepDone('vms-started');
  report.totalMs = at();
  report.complete = report.resources.every((r) => r.ok);
  const moved = report.vms.filter((v) => v.started);
  const details = [
    ...moved.map((v) => `${v.name}: now runs on ${host.node}${v.was ? ` (was ${v.was})` : ''}${v.targetBytes ? `, squeezed to ${Math.round(v.targetBytes / 1048576)} MiB` : ''}, started ${v.atMs} ms into the takeover`),
    ...report.vms.filter((v) => v.err).map((v) => `${v.name}: NOT started: ${v.err}`),
    ...report.leftOut.map((v) => `${v}: left stopped: does not fit ${host.node}'s vmMemory`),
    ...report.restarted.map((v) => `${v.vm}: ran on ${host.node} from ${peer}'s exports: ${v.restarted ? 'restarted (as after a crash of its disk)' : `NOT restarted${v.err ? `: ${v.err}` : ''}`}`),
    ...report.resources.map((r) => `resource ${r.name}: ${r.ok ? `Primary on ${host.node}` : `NOT taken over: ${r.err}`}`),
  ];
  log.warn(
    { event: report.complete ? 'failover-done' : 'takeover-incomplete', node: peer, by: host.node, totalMs: report.totalMs, steps: report.steps, vms: report.vms, resources: report.resources, leftOut: report.leftOut, details },
    `${report.complete ? 'failover done' : 'takeover incomplete'}: ${host.node} took over ${peer} in ${report.totalMs} ms; ${moved.length > 0 ? `${moved.map((v) => v.name).join(', ')} now run on ${host.node}` : 'no VM started'}${report.vms.some((v) => v.err) ? `; NOT started: ${report.vms.filter((v) => v.err).map((v) => v.name).join(', ')}` : ''}${report.leftOut.length > 0 ? `; left stopped (memory): ${report.leftOut.join(', ')}` : ''}`,
  );
  return report;
}
