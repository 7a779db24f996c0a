/**
 * What the VM tests share: a two-node cluster with one VM of the demo
 * guest on pool pa (see ../e2e/cluster-harness.ts), and reading its state
 * and console through the real CLI.
 */
import assert from 'node:assert/strict';
import { makeCluster, waitStatus, inSync, type Cluster } from '../e2e/cluster-harness.js';
import { haveProgram, tmpDir, type AfterContext } from '../e2e/harness.js';
import { buildDemoGuest, DEMO_GUEST_APPEND } from '../../src/vm/demo-guest.js';
import type { VmInfo } from '../../src/vm/manager.js';

/** The VM tests need QEMU; under CI a missing QEMU is a failure, not a skip. */
export const vmSkip = !haveProgram('qemu-system-x86_64') && process.env.CI !== 'true' ? 'qemu-system-x86_64 is not installed' : false;

/**
 * Both nodes up and in sync, volume pa/web created; VM web (`vmKeys`: more keys of its entry)
 * starts by itself on its prefer node. `extra`: more cluster-file lines.
 */
export async function vmCluster(t: AfterContext, vmKeys: string, extra: string[] = []): Promise<Cluster> {
  const guest = await buildDemoGuest(tmpDir(t, 'duet-vm-guest-'));
  const c = await makeCluster(t, {
    diskBytes: 128 * 1024 * 1024,
    extra: ['vms:', `  web: { disks: [pa/web], memory: 128M, ${vmKeys}, boot: { kernel: ${guest.kernel}, initrd: ${guest.initrd}, append: "${DEMO_GUEST_APPEND}" } }`, ...extra],
  });
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'the initial sync', (s) => inSync(s) && s.role === 'Primary', 60_000);
  const created = await c.duet('alpha', ['vol', 'create', 'pa/web', '--size', '16M']);
  assert.equal(created.code, 0, created.describe());
  return c;
}

/** Poll an async condition until it holds (bounded); a failing check (a daemon restarting) counts as "not yet". */
export async function waitFor(check: () => Promise<boolean>, ms: number, what: () => string): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {
      // Ask again.
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what()}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

export async function vmList(c: Cluster, node: string): Promise<VmInfo[]> {
  const r = await c.duet(node, ['vm', 'list', '--json']);
  assert.equal(r.code, 0, r.describe());
  return (JSON.parse(r.stdout) as { vms: VmInfo[] }).vms;
}

export async function consoleOf(c: Cluster, node: string, vm = 'web'): Promise<string> {
  const r = await c.duet(node, ['vm', 'console', vm]);
  assert.equal(r.code, 0, r.describe());
  return r.stdout;
}

export interface Tick {
  n: number;
  boot: string;
}

export function ticks(text: string): Tick[] {
  return [...text.matchAll(/^tick (\d+) boot=([0-9a-f]{8})$/gm)].map((m) => ({ n: Number(m[1]), boot: m[2] }));
}

export function guestErrors(text: string): string[] {
  return text.split('\n').filter((l) => l.includes('ERROR'));
}

/** Wait until the console (read through `node`) shows a tick at least `after + n`. */
export async function waitTicks(c: Cluster, node: string, after: number, n: number, ms = 90_000): Promise<Tick[]> {
  let last: Tick[] = [];
  await waitFor(
    async () => {
      last = ticks(await consoleOf(c, node));
      const top = last[last.length - 1];
      return top !== undefined && top.n >= after + n;
    },
    ms,
    () => `${n} ticks after tick ${after} (last: ${JSON.stringify(last.slice(-3))})\n${c.describe()}`,
  );
  return last;
}
