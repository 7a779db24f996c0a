/**
 * duet's decision on connect (connect-decision.ts) checked against DRBD's
 * (the ported drbd_uuid_compare + drbd_sync_handshake in drbd-reference.ts)
 * and against the truth of simulated histories (gi-histories.ts: which
 * acknowledged writes each disk really holds).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ConnectAction, ConnectSide, decideConnect } from '../../src/replication/connect-decision.js';
import type { SplitBrainPolicy } from '../../src/replication/resource.js';
import { drbdConnect, DrbdResult, Side } from './drbd-reference.js';
import { HistoryPair, historyPairs, simulate } from './gi-histories.js';

const POLICIES: SplitBrainPolicy[] = ['disconnect', 'discard-zero-changes', 'discard-least-changes', 'discard-younger-primary'];
const policyArb = fc.constantFrom(...POLICIES);

function sideOf(s: Side): ConnectSide {
  return {
    node: s.node,
    role: s.role,
    disk: s.disk,
    dataBytes: 1 << 30,
    gi: s.gi,
    crashedPrimary: s.crashedPrimary,
    outOfSyncBytes: s.changedBytes,
    primarySince: s.primarySince,
    fullSyncNeeded: false,
    peerDiskFailed: false,
    inUse: false,
    keep: s.keep,
  };
}

function decide(p: { self: Side; peer: Side }, policy: SplitBrainPolicy): ConnectAction {
  return decideConnect(sideOf(p.self), sideOf(p.peer), { resource: 'r0', allowTwoPrimaries: false, afterSplitBrain: policy });
}

function story(p: HistoryPair, a: ConnectAction, d?: DrbdResult): string {
  return `${p.trace.join('\n')}\nself ${p.self.node}, truth ${p.truth}\nduet: ${JSON.stringify(a)}${d ? `\ndrbd: rule ${d.rule} hg ${d.compareHg} -> ${JSON.stringify(d.action)}` : ''}`;
}

test('duet histories: no resync overwrites acknowledged writes unless a split-brain resolution chose it, and every divergence is caught', () => {
  fc.assert(
    fc.property(historyPairs({ mechanics: 'duet' }), policyArb, (p, policy) => {
      // Every connect on the way went as duet decides; none of them may have lost a write.
      assert.deepEqual(p.losses, [], p.trace.join('\n'));
      fc.pre(p.hazards.length === 0);
      const a = decide(p, policy);
      if (a.kind === 'sync' && !a.splitBrain) {
        const loses = a.direction === 'source' ? ['peer-newer', 'diverged', 'self-no-copy'] : ['self-newer', 'diverged', 'peer-no-copy'];
        assert.ok(!loses.includes(p.truth), story(p, a));
      }
      if (p.truth === 'diverged') assert.ok(a.kind !== 'sync' || a.splitBrain !== undefined, story(p, a));
    }),
    { numRuns: Number(process.env.DUET_PROP_RUNS ?? 3000) },
  );
});

/**
 * Where duet decides otherwise than DRBD on DRBD's own histories, on
 * purpose (each in connect-decision.ts, marked DUET):
 * - rules 51/71 (DRBD's sync UUID that never reached the target) do not
 *   exist in duet: its histories never make such UUIDs; duet's rules
 *   53/73 resume from the bitmaps where DRBD would sync everything;
 * - rule 100 does not count two empty history slots as common history
 *   (DRBD: split brain; duet: unrelated data);
 * - refusals are made on both sides (DRBD: by the side that must act);
 *   the two-Primaries refusal comes before the sync checks;
 * - a split brain resolved further back than the bitmaps (rule 100) is a
 *   full resync (DRBD: a bitmap resync after discard-my-data);
 * - an admin's --keep comes before the split-brain policy;
 * - discard-younger-primary compares promotion times (DRBD: whether each
 *   side was Primary when it made its bitmap UUID, which after a crash
 *   and two promotions can name the later one the older).
 */
function comparable(d: DrbdResult): boolean {
  return d.rule !== 51 && d.rule !== 71 && d.rule !== 100 && d.action.kind !== 'diskless';
}

test('drbd histories: where both apply, duet decides as DRBD does', () => {
  let compared = 0;
  fc.assert(
    fc.property(historyPairs({ mechanics: 'drbd' }), policyArb, (p, policy) => {
      const d = drbdConnect(p.self, p.peer, { afterSplitBrain: policy });
      const theirs = drbdConnect(p.peer, p.self, { afterSplitBrain: policy });
      const a = decide(p, policy);
      if (!comparable(d) || /^(53|73)\b/.test(a.rule)) return;
      if (policy === 'discard-younger-primary' && Math.abs(d.compareHg) === 100) return;
      // DUET: an admin's resolve --keep comes before the policy (DRBD: the policy first, discard-my-data if it fails).
      if ((p.self.keep !== undefined || p.peer.keep !== undefined) && (d.resolvedBy?.startsWith('after-sb') || theirs.resolvedBy?.startsWith('after-sb'))) return;
      compared++;
      // DRBD refuses on the side that must act; the connection fails if either side refuses.
      if (d.action.kind === 'refuse' || theirs.action.kind === 'refuse') {
        assert.ok(a.kind === 'refuse' || a.kind === 'split-brain', story(p, a, d));
        return;
      }
      if (a.kind === 'refuse' && a.rule === 'both-primary') return;
      const want = d.action;
      switch (want.kind) {
        case 'in-sync':
          assert.equal(a.kind, 'connected', story(p, a, d));
          break;
        case 'sync':
          assert.equal(a.kind, 'sync', story(p, a, d));
          if (a.kind === 'sync') {
            assert.equal(a.direction, want.direction, story(p, a, d));
            assert.equal(a.full, want.full, story(p, a, d));
          }
          break;
        case 'split-brain-unresolved':
          assert.equal(a.kind, 'split-brain', story(p, a, d));
          break;
        case 'unrelated':
          assert.equal(a.kind, 'refuse', story(p, a, d));
          break;
      }
    }),
    { numRuns: 4000 },
  );
  assert.ok(compared > 1000, `only ${compared} histories compared`);
});

test('a forced, interrupted sync target is not silently behind its source: split brain, as in DRBD (rule 90)', () => {
  // alpha, Primary, crashes; its activity-log extent resyncs to bravo (same generation); the link
  // breaks midway; bravo, with its mix of old and new blocks, is forced Primary (the helper's note 4:
  // before the sync generation duet made alpha the sync target of bravo here, losing alpha's blocks).
  const events = [
    { kind: 'force-primary', node: 0 },
    { kind: 'resync-done', lost: null },
    { kind: 'crash', node: 0, hot: 5 },
    { kind: 'connect', prefer: 0, keep: null, syncUuidLost: false },
    { kind: 'disconnect', inFlight: null },
    { kind: 'force-primary', node: 1 },
  ] as const;
  const drbd = simulate('drbd', [...events], 1);
  assert.equal(drbd.truth, 'diverged');
  const d = drbdConnect(drbd.self, drbd.peer, { afterSplitBrain: 'disconnect' });
  assert.deepEqual([d.rule, d.action.kind], [90, 'split-brain-unresolved'], drbd.trace.join('\n'));
  const duet = simulate('duet', [...events], 1);
  assert.equal(duet.truth, 'diverged');
  const a = decide(duet, 'disconnect');
  assert.equal(a.kind, 'split-brain', `${duet.trace.join('\n')}\n${JSON.stringify(a)}`);
});
