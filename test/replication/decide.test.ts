import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { decide, mirror } from '../../src/replication/decide.js';
import { GenerationIds, NO_GI } from '../../src/replication/meta.js';

const gi = (current: string, bitmap = NO_GI, h1 = NO_GI, h2 = NO_GI): GenerationIds => ({ current, bitmap, history: [h1, h2] });

test('the cases of the DRBD guide, each from both sides', () => {
  const cases: [string, GenerationIds, GenerationIds, ReturnType<typeof decide>][] = [
    ['both new', gi(NO_GI), gi(NO_GI), { kind: 'both-new' }],
    ['peer new', gi('A'), gi(NO_GI), { kind: 'sync', direction: 'source', full: true, why: 'the peer has a new disk' }],
    ['same generation', gi('A', NO_GI, 'X'), gi('A', NO_GI, 'X'), { kind: 'in-sync' }],
    // Primary went on alone: new current B, bitmap at A; the secondary still at A.
    ['bitmap sync', gi('B', 'A', 'X'), gi('A', NO_GI, 'X'), { kind: 'sync', direction: 'source', full: false, why: 'this node changed data while the peer was away' }],
    // Both promoted while apart, both from A: split brain, A in common.
    ['split brain', gi('B', 'A', 'X'), gi('C', 'A', 'X'), { kind: 'split-brain', common: 'A' }],
    // The peer went through two generations since our current: no bitmap reaches back, full sync.
    ['history', gi('A', NO_GI, 'X'), gi('C', 'B', 'A', 'X'), { kind: 'sync', direction: 'target', full: true, why: 'the peer is generations ahead' }],
    ['split brain further back', gi('D', 'B', 'A'), gi('E', 'C', 'A'), { kind: 'split-brain', common: 'A' }],
    ['unrelated', gi('A', 'B', 'C', 'D'), gi('E', 'F', 'G', 'H'), { kind: 'unrelated' }],
  ];
  for (const [name, self, peer, want] of cases) {
    assert.deepEqual(decide(self, peer), want, `${name} (self view)`);
    const other = decide(peer, self);
    assert.deepEqual({ ...mirror(want), ...(other.kind === 'sync' ? { why: other.why } : {}) }, other, `${name} (peer view)`);
  }
});

test('both sides always reach mirror-image decisions', () => {
  const id = fc.constantFrom(NO_GI, 'A', 'B', 'C', 'D', 'E');
  const tuple = fc.record({ current: id, bitmap: id, history: fc.tuple(id, id) });
  fc.assert(
    fc.property(tuple, tuple, (a, b) => {
      const ab = decide(a, b);
      const ba = decide(b, a);
      assert.equal(ab.kind, ba.kind, `${JSON.stringify(a)} vs ${JSON.stringify(b)}`);
      if (ab.kind === 'sync' && ba.kind === 'sync') {
        assert.notEqual(ab.direction, ba.direction, 'both sides want the same direction');
        assert.equal(ab.full, ba.full);
      }
    }),
    { numRuns: 2000 },
  );
});
