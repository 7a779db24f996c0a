/**
 * Where the memory goes when a node takes its peer's VMs: the VMs running
 * here and those to boot must fit the node's `vmMemory`. Each VM may be
 * squeezed from its boot size (`memory`) down to its floor (`minMemory`,
 * by the balloon). The plan:
 *
 * 1. Boot in priority order (higher first; running VMs are already in)
 *    every VM whose floor still fits beside the floors of those before it;
 *    a VM whose floor does not fit is left stopped (and reported), and the
 *    ones after it are still tried (a smaller one may fit).
 * 2. Share what is left above the floors in proportion to what each VM
 *    could give up (memory - minMemory): everyone is squeezed by the same
 *    fraction, nobody below its floor, nobody above its boot size.
 *
 * Pure; property-tested (test/cluster/memory-plan.test.ts).
 */
import { parseSize } from '../util/size.js';

export interface PlanVm {
  name: string;
  memoryBytes: number;
  minMemoryBytes: number;
  priority: number;
  /** Already running on this node (cannot be left out, only squeezed). */
  running: boolean;
}

/** A VM's sizes as the cluster file gives them (vms.NAME). */
export interface VmSizes {
  memory: string | number;
  minMemory?: string | number;
  priority: number;
}

/**
 * One VM of a plan from its cluster-file entry: its boot size, or `memoryBytes` (what it has now, for a
 * running one or one about to move), floored at minMemory but never above that size.
 */
export function planVmOf(vms: Record<string, VmSizes>, name: string, running: boolean, memoryBytes?: number): PlanVm {
  const c = vms[name];
  const memory = memoryBytes ?? parseSize(String(c.memory));
  return { name, memoryBytes: memory, minMemoryBytes: Math.min(memory, parseSize(String(c.minMemory ?? c.memory))), priority: c.priority, running };
}

export interface MemoryPlan {
  /** Every VM that runs (running ones and those booted) and the memory it gets. */
  targets: Map<string, number>;
  /** To boot, in order. */
  boot: string[];
  /** To boot that do not fit even at their floor. */
  leftOut: string[];
  /** Total of the targets. */
  totalBytes: number;
}

/** Round down to whole MiB: a balloon target in odd bytes only makes the guest work for nothing. */
const MIB = 1024 * 1024;

export function planMemory(budgetBytes: number | undefined, vms: PlanVm[]): MemoryPlan {
  const running = vms.filter((v) => v.running);
  // Stable: equal priorities keep the cluster file's order.
  const candidates = vms.filter((v) => !v.running).map((v, i) => ({ v, i })).sort((a, b) => b.v.priority - a.v.priority || a.i - b.i).map((x) => x.v);
  if (budgetBytes === undefined) {
    const all = [...running, ...candidates];
    return { targets: new Map(all.map((v) => [v.name, v.memoryBytes])), boot: candidates.map((v) => v.name), leftOut: [], totalBytes: all.reduce((s, v) => s + v.memoryBytes, 0) };
  }
  let floors = running.reduce((s, v) => s + v.minMemoryBytes, 0);
  const boot: PlanVm[] = [];
  const leftOut: string[] = [];
  for (const v of candidates) {
    if (floors + v.minMemoryBytes <= budgetBytes) {
      boot.push(v);
      floors += v.minMemoryBytes;
    } else leftOut.push(v.name);
  }
  const members = [...running, ...boot];
  const full = members.reduce((s, v) => s + v.memoryBytes, 0);
  const targets = new Map<string, number>();
  if (full <= budgetBytes) {
    for (const v of members) targets.set(v.name, v.memoryBytes);
  } else {
    // floors <= budget < full: each gives up the same fraction of what it can give.
    const give = members.reduce((s, v) => s + (v.memoryBytes - v.minMemoryBytes), 0);
    const keep = Math.max(0, budgetBytes - floors) / give;
    for (const v of members) {
      const above = Math.floor(((v.memoryBytes - v.minMemoryBytes) * keep) / MIB) * MIB;
      targets.set(v.name, Math.min(v.memoryBytes, v.minMemoryBytes + above));
    }
  }
  return { targets, boot: boot.map((v) => v.name), leftOut, totalBytes: [...targets.values()].reduce((s, b) => s + b, 0) };
}
