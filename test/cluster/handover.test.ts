/**
 * The handover's failure paths, against a scripted old Primary whose steps
 * fail where a real one fails under disk errors: whatever step fails, the
 * old Primary ends up serving the pools again (the role given back, its
 * pools opened again), never neither node.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseClusterConfig } from '../../src/cluster/config.js';
import { handover, type HandoverHost } from '../../src/cluster/handover.js';
import type { NodeCommand } from '../../src/cluster/node.js';
import type { Resource } from '../../src/replication/resource.js';
import { silentLogger } from '../../src/util/log.js';
import { VmManager, type VmCommand } from '../../src/vm/manager.js';

type Role = 'Primary' | 'Secondary';

/** Two nodes of one resource r0 under pool pa: who is Primary, whose pool is open; bravo runs the handover. */
function world(t: { after(fn: () => unknown): void }, faults: { secondaryFails?: boolean; openFailsHere?: boolean }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-handover-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const text = [
    'cluster: t',
    'secret: { value: "0123456789abcdef" }',
    'nodes: { alpha: { address: 127.0.0.7 }, bravo: { address: 127.0.0.8 } }',
    'resources: { r0: { protocol: C, port: 7801, disk: { alpha: /a, bravo: /b }, prefer: alpha } }',
    'pools: { pa: { devices: [r0] } }',
  ].join('\n');
  const config = parseClusterConfig(text, path.join(dir, 'c.yaml'));
  const s = { alpha: 'Primary' as Role, bravo: 'Secondary' as Role, alphaOpen: true, bravoOpen: false };
  const resource = {
    get role() {
      return s.bravo;
    },
    disk: 'UpToDate',
    bitmap: { outOfSyncBytes: 0 },
    peer: {
      phase: 'connected',
      get state() {
        return { role: s.alpha, disk: 'UpToDate' };
      },
    },
  } as unknown as Resource;
  const poolServer = (): string | undefined => (s.alphaOpen ? 'alpha' : s.bravoOpen ? 'bravo' : undefined);
  const vms = new VmManager({ node: 'bravo', home: dir, config, log: silentLogger(), address: '127.0.0.8', poolServer, call: () => Promise.reject(new Error('no VMs here')), exportClients: () => [], poolIncarnations: () => undefined });
  // As the node daemon does at its start: the manager answers for its VMs once it has looked for them.
  void vms.start();
  t.after(() => vms.stop());
  const host: HandoverHost = {
    node: 'bravo',
    config,
    log: silentLogger(),
    vms,
    resourceOf: () => ({ resource, peerNode: 'alpha' }),
    promoteHere: async () => {
      if (s.alpha === 'Primary') throw new Error('alpha is Primary');
      s.bravo = 'Primary';
      if (faults.openFailsHere) throw new Error('pool pa: superblock unreadable');
      s.bravoOpen = true;
    },
    demoteHere: async () => {
      s.bravoOpen = false;
      s.bravo = 'Secondary';
    },
    // The old Primary's daemon: a step-down closes its pools first, then steps down (as NodeDaemon does).
    call: async (node: string, request: NodeCommand) => {
      assert.equal(node, 'alpha');
      const c = request as NodeCommand | VmCommand;
      switch (c.cmd) {
        case 'vm.pause-io':
          return { vms: [] };
        case 'vm.resume-io':
          return { vms: [] };
        case 'resource.secondary':
          s.alphaOpen = false;
          if (faults.secondaryFails) throw new Error('resource r0: I/O error writing the metadata');
          s.alpha = 'Secondary';
          return {};
        case 'resource.primary':
          if (s.bravo === 'Primary') throw new Error('bravo is Primary');
          s.alpha = 'Primary';
          s.alphaOpen = true;
          return {};
        default:
          throw new Error(`unexpected ${c.cmd}`);
      }
    },
  };
  return { s, host };
}

test('a handover whose old Primary fails to step down after closing its pools: the pools open there again', { timeout: 30_000 }, async (t) => {
  const { s, host } = world(t, { secondaryFails: true });
  await assert.rejects(handover(host, 'r0'), /alpha could not step down: .*I\/O error.*; alpha stays Primary/);
  assert.deepEqual(s, { alpha: 'Primary', bravo: 'Secondary', alphaOpen: true, bravoOpen: false });
});

test('a handover whose new Primary cannot open the pools: it steps down again and the old Primary serves them', { timeout: 30_000 }, async (t) => {
  const { s, host } = world(t, { openFailsHere: true });
  await assert.rejects(handover(host, 'r0'), /bravo could not become Primary: .*superblock unreadable.*; given back to alpha/);
  assert.deepEqual(s, { alpha: 'Primary', bravo: 'Secondary', alphaOpen: true, bravoOpen: false });
});
