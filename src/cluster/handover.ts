/**
 * A planned move of the Primary role (`resource primary RES --handover`, run
 * on the node that takes it): the VMs using the resource's pools are paused
 * (their disks flushed while the old Primary still serves them), the old
 * Primary closes its pools and steps down, this node is promoted and opens
 * them, and the VMs' disks are reconnected to this node's exports before
 * they run on. The guests see a pause, never an I/O error. Every resource of
 * the pools moves together (a pool spans its resources).
 *
 * If a step fails, the role is given back to the old Primary where it can
 * be, and the VMs resume on whatever node serves their disks.
 */
import { UserError } from '../util/errors.js';
import type { Logger } from '../util/log.js';
import type { Resource } from '../replication/resource.js';
import type { VmManager } from '../vm/manager.js';
import type { ClusterConfig } from './config.js';
import type { NodeCommand } from './node.js';

/** How long the old Primary's step-down may take to arrive over the peer link. */
const PEER_STATE_WAIT_MS = 5000;

export interface HandoverHost {
  readonly node: string;
  readonly config: ClusterConfig;
  readonly log: Logger;
  readonly vms: VmManager;
  /** The resource of this node (throws a UserError naming it when there is none). */
  resourceOf(name: string): { resource: Resource; peerNode: string };
  /** Promote `name` here and open the pools that can be (serialized with other role changes). */
  promoteHere(name: string): Promise<void>;
  /** Close the pools on `name` here and make it Secondary (serialized with other role changes). */
  demoteHere(name: string): Promise<void>;
  call(node: string, request: NodeCommand, timeoutMs?: number): Promise<unknown>;
}

export interface HandoverResult {
  resources: string[];
  from: string;
  to: string;
  /** From the first VM paused to the last resumed (0 without VMs). */
  pausedMs: number;
  vms: { name: string; node: string; pausedMs: number }[];
  message: string;
}

export async function handover(host: HandoverHost, resource: string): Promise<HandoverResult> {
  const pools = Object.entries(host.config.pools)
    .filter(([, p]) => p.devices.includes(resource))
    .map(([name]) => name);
  const resources = [...new Set([resource, ...pools.flatMap((p) => host.config.pools[p].devices)])];
  const entries = resources.map((r) => ({ name: r, ...host.resourceOf(r) }));
  const from = entries[0].peerNode;
  if (entries.every((e) => e.resource.role === 'Primary')) {
    return { resources, from: host.node, to: host.node, pausedMs: 0, vms: [], message: `resource ${resources.join(', ')} is already Primary on ${host.node}` };
  }
  for (const e of entries) {
    const r = e.resource;
    const peer = r.peer;
    const why =
      e.peerNode !== from
        ? `its peer is ${e.peerNode}, not ${from}`
        : r.role === 'Primary'
          ? `it is Primary here already while ${resources.filter((x) => x !== e.name).join(', ')} ${resources.length > 2 ? 'are' : 'is'} not`
          : !peer || peer.phase !== 'connected'
            ? `it is not connected to ${from}`
            : peer.state?.role !== 'Primary'
              ? `${from} is not Primary for it (resource primary ${e.name} promotes it without a handover)`
              : // (A Diskless old Primary, its disk failed, wrote only to this node's disk: this copy is the data.)
                r.disk !== 'UpToDate' || (peer.state.disk !== 'Diskless' && (peer.state.disk !== 'UpToDate' || r.bitmap.outOfSyncBytes > 0))
                ? `the disks are not in sync (${host.node}: ${r.disk}, ${from}: ${peer.state.disk}${r.bitmap.outOfSyncBytes > 0 ? `, ${r.bitmap.outOfSyncBytes} bytes out of sync` : ''}): wait for the resync`
                : undefined;
    if (why) throw new UserError(`resource ${e.name}: no handover from ${from} to ${host.node}: ${why}`, 1);
  }
  const nodes = [host.node, from];
  const pauseOn = (node: string): Promise<{ vms: string[] }> =>
    node === host.node ? host.vms.pauseIo(pools) : (host.call(node, { cmd: 'vm.pause-io', pools }, 60_000) as Promise<{ vms: string[] }>);
  const resumeOn = (node: string, server: string): Promise<{ vms: { name: string; pausedMs: number }[] }> =>
    node === host.node ? host.vms.resumeIo(pools, server) : (host.call(node, { cmd: 'vm.resume-io', pools, server }, 60_000) as Promise<{ vms: { name: string; pausedMs: number }[] }>);
  /**
   * Let every paused VM run on, its disks from `server`. `left` says what could not be resumed: those VMs
   * resume by themselves when their pause runs out (VmManager's lease), onto whatever serves their disks then.
   */
  const resumeAll = async (server: string): Promise<{ vms: { name: string; node: string; pausedMs: number }[]; left: string }> => {
    const out: { name: string; node: string; pausedMs: number }[] = [];
    const left: string[] = [];
    for (const node of nodes) {
      try {
        for (const v of (await resumeOn(node, server)).vms) out.push({ ...v, node });
      } catch (err) {
        left.push((err as Error).message);
        host.log.error({ event: 'handover-resume-failed', node, server, err: (err as Error).message }, `handover: VMs on ${node} could not resume: ${(err as Error).message}`);
      }
    }
    return { vms: out, left: left.length > 0 ? `; VMs left paused: ${left.join('; ')} (duet tries again every 2 s once their pause runs out, in a minute: vm list)` : '' };
  };
  /** The role back to `from`, its pools open again, the VMs resumed there: what can be of it. */
  const giveBack = async (): Promise<string> => {
    // Everything this node took, it gives up first (the peer cannot be promoted while this node is Primary).
    for (const e of entries) if (e.resource.role === 'Primary') await host.demoteHere(e.name).catch((err: unknown) => host.log.error({ event: 'handover-rollback-failed', resource: e.name, err: (err as Error).message }, `handover: ${e.name} could not be made Secondary again here: ${(err as Error).message}`));
    // Every resource, not only those it stepped down for: a failed step-down may have closed the pools already.
    for (const e of entries) await host.call(from, { cmd: 'resource.primary', resource: e.name, force: false }, 60_000).catch((err: unknown) => host.log.error({ event: 'handover-rollback-failed', resource: e.name, node: from, err: (err as Error).message }, `handover: ${e.name} could not be given back to ${from}: ${(err as Error).message}`));
    return (await resumeAll(from)).left;
  };

  const t0 = Date.now();
  host.log.info({ event: 'handover-start', resources, from, to: host.node, pools }, `handover of ${resources.join(', ')} from ${from} to ${host.node}`);
  try {
    for (const node of nodes) await pauseOn(node);
  } catch (err) {
    const left = (await resumeAll(from)).left;
    throw new UserError(`handover of ${resources.join(', ')}: could not pause the VMs using ${pools.join(', ')}: ${(err as Error).message}; nothing moved${left}`, 1);
  }
  try {
    for (const e of entries) await host.call(from, { cmd: 'resource.secondary', resource: e.name }, 60_000);
  } catch (err) {
    const left = await giveBack();
    throw new UserError(`handover of ${resources.join(', ')}: ${from} could not step down: ${(err as Error).message}; ${from} stays Primary${left}`, 1);
  }
  try {
    for (const e of entries) {
      // Its new role reaches this node over the peer link, a moment after its answer.
      const deadline = Date.now() + PEER_STATE_WAIT_MS;
      while (e.resource.peer?.state?.role === 'Primary' && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      await host.promoteHere(e.name);
    }
  } catch (err) {
    // Give the role back: the old Primary has the same data (nothing was written meanwhile).
    const left = await giveBack();
    throw new UserError(`handover of ${resources.join(', ')}: ${host.node} could not become Primary: ${(err as Error).message}; given back to ${from}${left}`, 1);
  }
  const { vms, left } = await resumeAll(host.node);
  if (left) throw new UserError(`handover of ${resources.join(', ')}: ${host.node} is Primary now (handed over by ${from})${left}`, 1);
  const pausedMs = vms.length > 0 ? Date.now() - t0 : 0;
  const result = { resources, from, to: host.node, pausedMs, vms };
  host.log.info({ event: 'handover-done', ...result }, `handover of ${resources.join(', ')} from ${from} to ${host.node} done${vms.length > 0 ? `: ${vms.length} VMs paused at most ${Math.max(...vms.map((v) => v.pausedMs))} ms` : ''}`);
  return {
    ...result,
    message: `resource ${resources.join(', ')} is Primary on ${host.node} (handed over by ${from})${vms.length > 0 ? `; ${vms.map((v) => `vm ${v.name} paused ${v.pausedMs} ms`).join(', ')}` : ''}`,
  };
}
