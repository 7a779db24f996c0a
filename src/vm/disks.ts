/**
 * Moving a running VM's disks to another NBD server (or to the same one,
 * restarted) without the guest noticing: for each disk a new nbd node is
 * added, the raw node the virtio device uses is reopened onto it
 * (blockdev-reopen), and the old nbd node is deleted. Measured on QEMU 7.2
 * (issue 9): the address of an nbd node cannot be changed in place, and a
 * reconnect of the old node would resend in-flight writes to whatever
 * answers at its address; a new node under the raw one is the way.
 *
 * The VM is paused while this runs (by the caller, or by werror=stop after
 * an I/O error): requests that failed are kept by the device and retried on
 * `cont`, on the new node.
 */
import type { QmpClient } from './qmp.js';
import { nbdNode, nbdNodeName, rawNodeName, type DiskEndpoint } from './qemu-args.js';

interface BlockNode {
  'node-name': string;
  drv: string;
}

/** The generation of disk `index`'s nbd node now in use (the highest present). */
function currentGeneration(nodes: BlockNode[], index: number): number | undefined {
  const re = new RegExp(`^nbd${index}-(\\d+)$`);
  let best: number | undefined;
  for (const n of nodes) {
    const m = re.exec(n['node-name']);
    if (m && (best === undefined || Number(m[1]) > best)) best = Number(m[1]);
  }
  return best;
}

/** The nbd nodes the VM's disks use now (what a yank must name). */
export async function nbdNodesInUse(qmp: QmpClient, count: number, timeoutMs = 10_000): Promise<string[]> {
  const nodes = await qmp.execute<BlockNode[]>('query-named-block-nodes', { flat: true }, { timeoutMs });
  const out: string[] = [];
  for (let i = 0; i < count; i++) {
    const g = currentGeneration(nodes, i);
    if (g !== undefined) out.push(nbdNodeName(i, g));
  }
  return out;
}

/**
 * Pause the guest (QMP stop: it drains and flushes the disks). A disk whose server died without a RST
 * (a dead node, a cut link) blocks that drain, and QMP with it: after `timeoutMs` the nbd connections
 * (`nbdNodes`, known before: no query runs while QEMU's main loop is stuck) are yanked out of band; the
 * requests they had fail, werror=stop keeps them for a retry, and the stop completes.
 */
export async function pauseGuest(qmp: QmpClient, nbdNodes: string[], timeoutMs = 2000): Promise<{ yanked: boolean }> {
  try {
    await qmp.execute('stop', undefined, { timeoutMs });
    return { yanked: false };
  } catch (err) {
    if (!/no answer from QEMU/.test((err as Error).message) || !qmp.oob) throw err;
  }
  await qmp.execute('yank', { instances: nbdNodes.map((n) => ({ type: 'block-node', 'node-name': n })) }, { oob: true, timeoutMs: 5000 });
  // The first stop goes on once its drain is over; a second one answers when the VM is paused.
  await qmp.execute('stop', undefined, { timeoutMs: 30_000 });
  return { yanked: true };
}

/** Point every disk of the VM at `disks` (index = the disk's position). Throws if a server does not answer. */
export async function switchDisks(qmp: QmpClient, disks: DiskEndpoint[], timeoutMs = 10_000): Promise<void> {
  const nodes = await qmp.execute<BlockNode[]>('query-named-block-nodes', { flat: true }, { timeoutMs });
  for (let i = 0; i < disks.length; i++) {
    const old = currentGeneration(nodes, i);
    const next = (old ?? -1) + 1;
    await qmp.execute('blockdev-add', nbdNode(i, next, disks[i]), { timeoutMs });
    try {
      await qmp.execute('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': rawNodeName(i), file: nbdNodeName(i, next), discard: 'unmap' }] }, { timeoutMs });
    } catch (err) {
      // The new node is not used: remove it, the disk stays where it was.
      await qmp.execute('blockdev-del', { 'node-name': nbdNodeName(i, next) }, { timeoutMs }).catch(() => undefined);
      throw err;
    }
    if (old !== undefined) await qmp.execute('blockdev-del', { 'node-name': nbdNodeName(i, old) }, { timeoutMs }).catch(() => undefined);
  }
}
