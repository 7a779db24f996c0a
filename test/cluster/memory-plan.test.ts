import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { planMemory, planVmOf, type PlanVm } from '../../src/cluster/memory-plan.js';

const M = 1024 * 1024;
const vm = (name: string, memory: number, min: number, priority = 0, running = false): PlanVm => ({ name, memoryBytes: memory * M, minMemoryBytes: min * M, priority, running });

test('everything fits: nobody is squeezed; no budget: nobody is', () => {
  const p = planMemory(1024 * M, [vm('web', 256, 128, 0, true), vm('db', 512, 256)]);
  assert.deepEqual([...p.targets], [['web', 256 * M], ['db', 512 * M]]);
  assert.deepEqual(p.boot, ['db']);
  assert.deepEqual(planMemory(undefined, [vm('a', 9000, 1), vm('b', 9000, 1)]).leftOut, []);
});

test('a crowded node: boots by priority, squeezes everyone by the same fraction, leaves out what cannot fit', () => {
  const p = planMemory(768 * M, [vm('web', 512, 256, 0, true), vm('db', 512, 256, 5), vm('media', 1024, 512, 1), vm('tiny', 128, 128, 0)]);
  // Floors: web 256 + db 256 = 512; media's 512 does not fit beside them; tiny's 128 does.
  assert.deepEqual(p.boot, ['db', 'tiny']);
  assert.deepEqual(p.leftOut, ['media']);
  assert.ok(p.totalBytes <= 768 * M);
  // Above the floors (640): 128 left; web and db can each give 256, tiny nothing: 64 each.
  assert.equal(p.targets.get('web'), 320 * M);
  assert.equal(p.targets.get('db'), 320 * M);
  assert.equal(p.targets.get('tiny'), 128 * M);
});

test('property: within the budget, within each VM\'s bounds, running VMs kept, priorities respected', () => {
  const arbVm = fc.record({ memory: fc.integer({ min: 64, max: 4096 }), min: fc.integer({ min: 16, max: 4096 }), priority: fc.integer({ min: -3, max: 3 }), running: fc.boolean() });
  fc.assert(
    fc.property(fc.array(arbVm, { maxLength: 8 }), fc.integer({ min: 0, max: 16384 }), (raw, budget) => {
      const vms = raw.map((r, i) => vm(`v${i}`, r.memory, Math.min(r.min, r.memory), r.priority, r.running));
      const floorsRunning = vms.filter((v) => v.running).reduce((s, v) => s + v.minMemoryBytes, 0);
      fc.pre(floorsRunning <= budget * M); // the running VMs fit at their floors (the node ran them)
      const p = planMemory(budget * M, vms);
      assert.ok(p.totalBytes <= budget * M, 'over the budget');
      for (const v of vms) {
        const t = p.targets.get(v.name);
        if (v.running) assert.notEqual(t, undefined, 'a running VM left out');
        if (t === undefined) continue;
        assert.ok(t >= v.minMemoryBytes && t <= v.memoryBytes, `${v.name} outside its bounds`);
      }
      assert.equal(p.boot.length + p.leftOut.length, vms.filter((v) => !v.running).length);
      // A VM left out did not fit at its floor beside those booted and running.
      const floors = [...p.targets.keys()].reduce((s, n) => s + vms.find((v) => v.name === n)!.minMemoryBytes, 0);
      for (const n of p.leftOut) assert.ok(floors + vms.find((v) => v.name === n)!.minMemoryBytes > budget * M, `${n} would have fit`);
      // Boot order: priority, higher first.
      const pr = p.boot.map((n) => vms.find((v) => v.name === n)!.priority);
      for (let i = 1; i < pr.length; i++) assert.ok(pr[i - 1] >= pr[i]);
      // Squeezed only when needed, and then not wastefully (within a MiB per VM of the budget).
      const full = [...p.targets.keys()].reduce((s, n) => s + vms.find((v) => v.name === n)!.memoryBytes, 0);
      if (full <= budget * M) assert.equal(p.totalBytes, full);
      else assert.ok(budget * M - p.totalBytes <= p.targets.size * M, 'squeezed more than needed');
    }),
    { numRuns: 500 },
  );
});

test('planVmOf: boot size from the cluster file, or what the VM has now; the floor never above it', () => {
  const vms = { web: { memory: '512M', minMemory: '256M', priority: 5 }, db: { memory: '1G', priority: 1 } };
  assert.deepEqual(planVmOf(vms, 'web', false), { name: 'web', memoryBytes: 512 * M, minMemoryBytes: 256 * M, priority: 5, running: false });
  assert.deepEqual(planVmOf(vms, 'web', true, 200 * M), { name: 'web', memoryBytes: 200 * M, minMemoryBytes: 200 * M, priority: 5, running: true });
  assert.deepEqual(planVmOf(vms, 'db', false), { name: 'db', memoryBytes: 1024 * M, minMemoryBytes: 1024 * M, priority: 1, running: false });
});
