/**
 * The DRBD oracle (drbd-reference.ts) on hand-made cases, one per rule of
 * drbd_uuid_compare() and per branch of drbd_sync_handshake(), each from
 * both ends; then on the histories of gi-histories.ts.
 *
 * Where DRBD's behaviour is, I believe, wrong or inapplicable for duet:
 * 1. Rule 100 counts an empty history slot on each side as a common
 *    ancestor (0 == 0): two data sets with no generation in common are a
 *    split brain (-100), not unrelated (-1000), as soon as each has an empty
 *    slot. Two new disks each forced Primary hit it under duet's GIs
 *    ({C1,0,[0,0]} vs {C2,0,[0,0]}); under DRBD's own, rule 90 does (both
 *    bitmap UUIDs are UUID_JUST_CREATED). With always-asbp or discard-my-data
 *    DRBD would then sync one unrelated data set over the other. Unrelated
 *    is right for duet (its connect-decision.ts skips empty slots).
 * 2. Rule 40 with no crashed Primary ignores a non-empty bitmap ("No
 *    resync, but N bits in bitmap!"); duet resyncs marked blocks (a crashed
 *    Primary's activity-log extents, blocks a verify found). Keep duet's.
 * 3. Rules 51/71 recognise DRBD's sync UUID (bitmap + UUID_NEW_BM_OFFSET,
 *    written when a resync starts). duet changes no GI when a resync starts,
 *    so they never fire on duet's GIs.
 * 4. Found by the histories: for the same reason, under duet's GIs the
 *    target of an interrupted same-generation resync (a crashed Primary's
 *    extents), forced Primary, is one generation ahead of its old source
 *    (rules 70/50: the old source becomes a bitmap sync target and loses
 *    its version of those blocks, with no split-brain decision), where
 *    DRBD's GIs (the target took the sync UUID as its current) make the same
 *    history a split brain (rule 90). See "the same history under both
 *    mechanics" below.
 * 5. discard-younger-primary reads "was Primary when the nodes split" from
 *    bit 0 of the bitmap UUID. duet has only primarySince; where both or
 *    neither side was Primary at the split, DRBD falls through to
 *    discard-least-changes while primarySince still orders them.
 * 6. The after-split-brain policies run for rule 90 only (hg 100), not for
 *    rule 100 (-100) unless always-asbp, and then as a full sync; and the
 *    disk-state override turns a split brain with an Inconsistent side into
 *    a plain sync with no policy consulted.
 * 7. DRBD makes the new current UUID when a Primary loses its peer; duet
 *    at the first write without it. A Primary that disconnects and writes
 *    nothing is rule 50/70 (a bitmap sync of nothing) in DRBD and rule 40
 *    (in sync) in duet: different, neither wrong.
 * 8. On arbitrary tuples DRBD's two ends can disagree (rule 50 at one end,
 *    rule 60 at the other: both SyncTarget) when a current UUID is both in
 *    the other's bitmap and its history; no single history makes that
 *    (checked below on both mechanics' histories).
 * 9. Found by the histories, in DRBD itself: a SyncSource that crashes
 *    before recording the end of its resync keeps its bitmap UUID; promoted
 *    without its peer it makes no new current UUID (drbd_set_role() wants
 *    bitmap UUID 0), so what it then writes is in no UUID. If the peer is
 *    promoted and writes too, the reconnect is a plain bitmap sync (rules
 *    70/50) that silently discards the first node's writes. duet avoids it
 *    twice: its source records the end before the target hears of it (a
 *    lost end leaves the target unfinished, Inconsistent), and its promote
 *    makes a new generation whatever the bitmap GI. Keep both. See "a lost
 *    resync end, then both write" below.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { GenerationIds, Gi, NO_GI } from '../../src/replication/meta.js';
import type { SplitBrainPolicy } from '../../src/replication/resource.js';
import {
  ConnectOptions,
  drbdConnect,
  drbdPoliciesFor,
  DrbdResult,
  MIRROR_RULE,
  mirrorHg,
  plusNewBmOffset,
  Side,
  uuidOf,
} from './drbd-reference.js';
import { historyPairs, HistoryPair, Mechanics, randomSides, simulate } from './gi-histories.js';

const gi = (current: Gi, bitmap: Gi = NO_GI, h0: Gi = NO_GI, h1: Gi = NO_GI): GenerationIds => ({ current, bitmap, history: [h0, h1] });

function side(node: 'alpha' | 'bravo', g: GenerationIds, more: Partial<Side> = {}): Side {
  return { node, role: 'Secondary', disk: 'UpToDate', gi: g, crashedPrimary: false, changedBytes: 0, primarySince: 0, ...more };
}
const alpha = (g: GenerationIds, more?: Partial<Side>): Side => side('alpha', g, more);
const bravo = (g: GenerationIds, more?: Partial<Side>): Side => side('bravo', g, more);
const DISCONNECT: ConnectOptions = { afterSplitBrain: 'disconnect' };

/** Both ends' decisions; checks drbd_uuid_compare() gave mirror results with mirror rule numbers. */
function both(a: Side, b: Side, opts: ConnectOptions = DISCONNECT): [DrbdResult, DrbdResult] {
  const ra = drbdConnect(a, b, opts);
  const rb = drbdConnect(b, a, opts);
  assert.equal(rb.rule, MIRROR_RULE[ra.rule], `rules ${ra.rule} / ${rb.rule}`);
  assert.equal(rb.compareHg, mirrorHg(ra.compareHg), `uuid_compare ${ra.compareHg} / ${rb.compareHg}`);
  return [ra, rb];
}

const SOURCE = { kind: 'sync', direction: 'source', full: false } as const;
const TARGET = { kind: 'sync', direction: 'target', full: false } as const;
const FULL_SOURCE = { kind: 'sync', direction: 'source', full: true } as const;
const FULL_TARGET = { kind: 'sync', direction: 'target', full: true } as const;
const UNRESOLVED = { kind: 'split-brain-unresolved' } as const;

test('rule 10: two new disks: nothing to compare, both stay Inconsistent', () => {
  const [a, b] = both(alpha(gi(NO_GI), { disk: 'Inconsistent' }), bravo(gi(NO_GI), { disk: 'Inconsistent' }));
  assert.deepEqual([a.rule, a.compareHg, a.action], [10, 0, { kind: 'in-sync' }]);
  assert.deepEqual([b.rule, b.action], [10, { kind: 'in-sync' }]);
});

test('rules 20 and 30: a new disk is the full sync target of a disk with data', () => {
  const [a, b] = both(alpha(gi(NO_GI), { disk: 'Inconsistent' }), bravo(gi('a0')));
  assert.deepEqual([a.rule, a.compareHg, a.action], [20, -2, FULL_TARGET]);
  assert.deepEqual([b.rule, b.compareHg, b.action], [30, 2, FULL_SOURCE]);
  assert.ok(a.log.includes('Becoming sync target due to disk states.'));
});

test('rules 34 and 35: the source missed the end of the resync the target recorded', () => {
  // The source had gone on alone from a0 (bitmap a0); the resync started with sync UUID x.
  const x = plusNewBmOffset('a0');
  const source = alpha(gi('b0', x, 'a0'));
  const target = bravo(gi('b0', NO_GI, x, 'a0'));
  const [s, t] = both(source, target);
  assert.deepEqual([s.rule, s.compareHg, s.action], [34, 1, SOURCE]);
  assert.deepEqual([t.rule, t.compareHg, t.action], [35, -1, TARGET]);
  assert.ok(s.log.includes('was SyncSource, missed the resync finished event, corrected myself:'));
  assert.ok(t.log.includes('was SyncTarget, peer missed the resync finished event, corrected peer:'));
});

test('rules 36 and 37: same current, a bitmap UUID on one side only and no history to explain it', () => {
  const [s, t] = both(alpha(gi('b0', 'c0', 'a0')), bravo(gi('b0', NO_GI, 'd0', 'e0')));
  assert.deepEqual([s.rule, s.compareHg, s.action], [36, 1, SOURCE]);
  assert.deepEqual([t.rule, t.compareHg, t.action], [37, -1, TARGET]);
  assert.ok(s.log.includes('was SyncSource (peer failed to write sync_uuid)'));
});

test('rule 40: same current and no bitmap UUIDs: in sync, unless a Primary crashed: it is the source; both crashed: RESOLVE_CONFLICTS', () => {
  const g = gi('a0', NO_GI, 'f0');
  let [a, b] = both(alpha(g, { changedBytes: 4096 }), bravo(g));
  // The bits in the bitmap do not matter ("No resync, but N bits in bitmap!").
  assert.deepEqual([a.rule, a.action, b.action], [40, { kind: 'in-sync' }, { kind: 'in-sync' }]);
  [a, b] = both(alpha(g, { crashedPrimary: true }), bravo(g));
  assert.deepEqual([a.rule, a.action, b.action], [40, SOURCE, TARGET]);
  [a, b] = both(alpha(g), bravo(g, { crashedPrimary: true }));
  assert.deepEqual([a.action, b.action], [TARGET, SOURCE]);
  // Both crashed: bravo's name sorts last, it holds RESOLVE_CONFLICTS and becomes the target.
  [a, b] = both(alpha(g, { crashedPrimary: true }), bravo(g, { crashedPrimary: true }));
  assert.deepEqual([a.rule, a.action, b.action], [40, SOURCE, TARGET]);
});

test('rule 41: same current, a crashed Primary flag and a Primary now: the Primary is the source; two Primaries: unresolvable', () => {
  const g = gi('a0');
  let [a, b] = both(alpha(g, { crashedPrimary: true }), bravo(g, { role: 'Primary' }));
  assert.deepEqual([a.rule, a.compareHg, a.action], [41, -1, TARGET]);
  assert.deepEqual([b.rule, b.compareHg, b.action], [41, 1, SOURCE]);
  [a, b] = both(alpha(g, { role: 'Primary', crashedPrimary: true }), bravo(g, { role: 'Primary' }), { afterSplitBrain: 'discard-least-changes' });
  assert.deepEqual([a.rule, a.compareHg, a.action, b.action], [41, -100, UNRESOLVED, UNRESOLVED]);
  assert.ok(a.log.includes('Equivalent unrotated UUIDs, but both are primary. Can not resolve this.'));
});

test('rules 50 and 70: a Primary went on alone from the peer\'s current: bitmap sync from it', () => {
  const [a, b] = both(alpha(gi('b0', 'a0', 'f0'), { role: 'Primary' }), bravo(gi('a0', NO_GI, 'f0')));
  assert.deepEqual([a.rule, a.compareHg, a.action], [70, 1, SOURCE]);
  assert.deepEqual([b.rule, b.compareHg, b.action], [50, -1, TARGET]);
});

test('rules 51 and 71: the source made its sync UUID, the target never got it', () => {
  const x = plusNewBmOffset('a0');
  const [a, b] = both(alpha(gi('b0', x, 'a0')), bravo(gi('a0')));
  assert.deepEqual([a.rule, a.compareHg, a.action], [71, 1, SOURCE]);
  assert.deepEqual([b.rule, b.compareHg, b.action], [51, -1, TARGET]);
  assert.ok(a.log.includes('Last syncUUID did not get through, corrected:'));
  assert.ok(b.log.includes('Lost last syncUUID packet, corrected:'));
});

test('rules 60 and 80: generations ahead (the peer\'s current in the history): full sync', () => {
  let [a, b] = both(alpha(gi('c0', NO_GI, 'b0', 'a0')), bravo(gi('a0')));
  assert.deepEqual([a.rule, a.compareHg, a.action], [80, 2, FULL_SOURCE]);
  assert.deepEqual([b.rule, b.compareHg, b.action], [60, -2, FULL_TARGET]);
  // History[0] is the peer's current but the bitmap is no sync UUID of it: not 51/71, a full sync.
  [a, b] = both(alpha(gi('b0', 'c0', 'a0')), bravo(gi('a0')));
  assert.deepEqual([a.rule, a.action, b.rule, b.action], [80, FULL_SOURCE, 60, FULL_TARGET]);
});

test('rule 90: both went on from the same generation: split brain, left to the after-sb policy (disconnect)', () => {
  const [a, b] = both(alpha(gi('b0', 'a0'), { changedBytes: 4096 }), bravo(gi('c0', 'a0'), { changedBytes: 8192 }));
  assert.deepEqual([a.rule, a.compareHg, a.action], [90, 100, UNRESOLVED]);
  assert.deepEqual([b.rule, b.compareHg, b.action], [90, 100, UNRESOLVED]);
  assert.ok(a.log.includes('Split-Brain detected but unresolved, dropping connection!'));
});

test('rule 100: a common ancestor in the histories only is split brain; none is unrelated; two empty history slots count as common', () => {
  let [a, b] = both(alpha(gi('c0', 'b0', 'a0')), bravo(gi('e0', 'd0', 'a0')), { afterSplitBrain: 'discard-zero-changes' });
  // hg -100: the after-sb policies do not run (no always-asbp).
  assert.deepEqual([a.rule, a.compareHg, a.action, b.action], [100, -100, UNRESOLVED, UNRESOLVED]);
  [a, b] = both(alpha(gi('b0', NO_GI, 'a0', 'c0')), bravo(gi('e0', NO_GI, 'd0', 'f0')));
  assert.deepEqual([a.rule, a.compareHg, a.action, b.action], [100, -1000, { kind: 'unrelated' }, { kind: 'unrelated' }]);
  assert.ok(a.log.includes('Unrelated data, aborting!'));
  // Nothing in common but an empty slot each: DRBD says split brain, not unrelated (note 1).
  [a, b] = both(alpha(gi('b0', NO_GI, 'a0')), bravo(gi('e0', NO_GI, 'd0')));
  assert.deepEqual([a.rule, a.compareHg, a.action], [100, -100, UNRESOLVED]);
});

test('disk states: Inconsistent against a disk with data overrides the UUIDs; full when they were -100 or ±2', () => {
  // Same current (rule 40 says 0): the Inconsistent side is the target.
  let [a, b] = both(alpha(gi('a0'), { disk: 'Inconsistent' }), bravo(gi('a0'), { disk: 'Outdated' }));
  assert.deepEqual([a.compareHg, a.hg, a.action, b.action], [0, -1, TARGET, SOURCE]);
  assert.ok(b.log.includes('Becoming sync source due to disk states.'));
  // The UUIDs say the Inconsistent side is newer (rule 70): the disk states win.
  [a, b] = both(alpha(gi('b0', 'a0'), { disk: 'Inconsistent' }), bravo(gi('a0')));
  assert.deepEqual([a.compareHg, a.action, b.compareHg, b.action], [1, TARGET, -1, SOURCE]);
  // Split brain by rule 90 (100): a plain bitmap sync, no policy asked; by rule 100 (-100): full.
  [a, b] = both(alpha(gi('b0', 'a0'), { disk: 'Inconsistent' }), bravo(gi('c0', 'a0')));
  assert.deepEqual([a.hg, a.action, b.action], [-1, TARGET, SOURCE]);
  [a, b] = both(alpha(gi('c0', 'b0', 'a0'), { disk: 'Inconsistent' }), bravo(gi('e0', 'd0', 'a0')));
  assert.deepEqual([a.hg, a.action, b.action], [-2, FULL_TARGET, FULL_SOURCE]);
});

test('after-sb-0pri: discard-zero-changes, discard-least-changes (tie: RESOLVE_CONFLICTS), discard-younger/older-primary', () => {
  const split = (a: Partial<Side>, b: Partial<Side>, opts: ConnectOptions): [DrbdResult, DrbdResult] => both(alpha(gi('b0', 'a0'), a), bravo(gi('c0', 'a0'), b), opts);
  const zero: ConnectOptions = { afterSplitBrain: 'discard-zero-changes' };
  let [a, b] = split({ changedBytes: 0 }, { changedBytes: 4096 }, zero);
  assert.deepEqual([a.action, b.action, a.resolvedBy], [TARGET, SOURCE, 'after-sb-0pri']);
  assert.ok(a.log.includes('Split-Brain detected, 0 primaries, automatically solved. Sync from peer node'));
  [a, b] = split({ changedBytes: 0 }, { changedBytes: 0 }, zero);
  assert.deepEqual([a.action, b.action], [SOURCE, TARGET], 'both zero: bravo holds RESOLVE_CONFLICTS and discards');
  [a, b] = split({ changedBytes: 4096 }, { changedBytes: 8192 }, zero);
  assert.deepEqual([a.action, b.action], [UNRESOLVED, UNRESOLVED], 'both changed: zero-changes does not decide');

  const least: ConnectOptions = { afterSplitBrain: 'discard-least-changes' };
  [a, b] = split({ changedBytes: 4096 }, { changedBytes: 8192 }, least);
  assert.deepEqual([a.action, b.action], [TARGET, SOURCE]);
  [a, b] = split({ changedBytes: 8192 }, { changedBytes: 8192 }, least);
  assert.deepEqual([a.action, b.action], [SOURCE, TARGET], 'a tie: RESOLVE_CONFLICTS (bravo) discards');

  // alpha was Primary at the split (promoted at 1000), bravo promoted after it (2000): bravo is the younger.
  const younger: ConnectOptions = { afterSplitBrain: 'discard-younger-primary' };
  [a, b] = split({ primarySince: 1000, changedBytes: 0 }, { primarySince: 2000, changedBytes: 8192 }, younger);
  assert.deepEqual([a.action, b.action], [SOURCE, TARGET]);
  [a, b] = split({ primarySince: 1000, changedBytes: 0 }, { primarySince: 2000, changedBytes: 8192 }, { ...younger, afterSb0p: 'discard-older-primary' });
  assert.deepEqual([a.action, b.action], [TARGET, SOURCE]);
  // Both Primary at the split (DRBD's bitmap bits equal): falls through to zero-changes, then least-changes.
  [a, b] = split({ primaryAtSplit: true, changedBytes: 4096 }, { primaryAtSplit: true, changedBytes: 8192 }, younger);
  assert.deepEqual([a.action, b.action], [TARGET, SOURCE]);
  assert.ok(a.log.includes('Discard younger/older primary did not find a decision\nUsing discard-least-changes instead'));
  [a, b] = split({ primaryAtSplit: false, changedBytes: 0 }, { primaryAtSplit: false, changedBytes: 4096 }, younger);
  assert.deepEqual([a.action, b.action], [TARGET, SOURCE], 'neither was: zero-changes decides');
});

test('after-sb-1pri consensus (duet\'s mapping): the 0pri policy decides, only if its loser is the Secondary', () => {
  assert.deepEqual(drbdPoliciesFor('discard-least-changes'), { afterSb0p: 'discard-least-changes', afterSb1p: 'consensus', afterSb2p: 'disconnect' });
  const least: ConnectOptions = { afterSplitBrain: 'discard-least-changes' };
  let [a, b] = both(alpha(gi('b0', 'a0'), { role: 'Primary', changedBytes: 8192 }), bravo(gi('c0', 'a0'), { changedBytes: 4096 }), least);
  assert.deepEqual([a.action, b.action, a.resolvedBy], [SOURCE, TARGET, 'after-sb-1pri']);
  // The policy would discard the Primary: refused on both ends.
  [a, b] = both(alpha(gi('b0', 'a0'), { role: 'Primary', changedBytes: 4096 }), bravo(gi('c0', 'a0'), { changedBytes: 8192 }), least);
  assert.deepEqual([a.action, b.action], [UNRESOLVED, UNRESOLVED]);
  // after-split-brain disconnect stays disconnect with one Primary.
  [a, b] = both(alpha(gi('b0', 'a0'), { role: 'Primary', changedBytes: 8192 }), bravo(gi('c0', 'a0')), DISCONNECT);
  assert.deepEqual([a.action, b.action], [UNRESOLVED, UNRESOLVED]);
});

test('after-sb-1pri discard-secondary and violently, after-sb-2pri', () => {
  // discard-secondary discards the Secondary whatever after-sb-0pri says: why it is not duet's mapping.
  let [a, b] = both(alpha(gi('b0', 'a0'), { role: 'Primary' }), bravo(gi('c0', 'a0'), { changedBytes: 8192 }), { afterSplitBrain: 'disconnect', afterSb1p: 'discard-secondary' });
  assert.deepEqual([a.action, b.action], [SOURCE, TARGET]);
  // violently-as0p: the 0pri result even if the Primary loses; it then refuses to be overwritten.
  [a, b] = both(alpha(gi('b0', 'a0'), { role: 'Primary', changedBytes: 4096 }), bravo(gi('c0', 'a0'), { changedBytes: 8192 }), { afterSplitBrain: 'discard-least-changes', afterSb1p: 'violently-as0p' });
  assert.deepEqual([a.action, b.action], [{ kind: 'refuse', reason: 'I shall become SyncTarget, but I am primary!' }, SOURCE]);
  // Two Primaries: disconnect.
  [a, b] = both(alpha(gi('b0', 'a0'), { role: 'Primary' }), bravo(gi('c0', 'a0'), { role: 'Primary', changedBytes: 8192 }), { afterSplitBrain: 'discard-zero-changes' });
  assert.deepEqual([a.action, b.action], [UNRESOLVED, UNRESOLVED]);
  // violently-as0p with two Primaries resolves, but the loser is Primary and two Primaries are not allowed anyway.
  [a, b] = both(alpha(gi('b0', 'a0'), { role: 'Primary' }), bravo(gi('c0', 'a0'), { role: 'Primary', changedBytes: 8192 }), { afterSplitBrain: 'discard-zero-changes', afterSb2p: 'violently-as0p' });
  assert.deepEqual([a.action, b.action], [{ kind: 'refuse', reason: 'I shall become SyncTarget, but I am primary!' }, { kind: 'refuse', reason: 'Multiple primaries not allowed by config' }]);
});

test('always-asbp: an ambiguous split brain (rule 100) goes to the policy, and is a full sync', () => {
  const opts: ConnectOptions = { afterSplitBrain: 'discard-zero-changes', alwaysAsbp: true };
  const [a, b] = both(alpha(gi('c0', 'b0', 'a0')), bravo(gi('e0', 'd0', 'a0'), { changedBytes: 4096 }), opts);
  assert.deepEqual([a.compareHg, a.hg, a.action, b.action], [-100, -2, FULL_TARGET, FULL_SOURCE]);
  assert.ok(a.log.includes('Doing a full sync, since UUIDs where ambiguous.'));
});

test('discard-my-data (resolve --keep NODE): every other node discards; opposite requests are refused', () => {
  const a0 = alpha(gi('b0', 'a0'));
  const b0 = bravo(gi('c0', 'a0'));
  // Asked on bravo to keep alpha, or on alpha itself: the same resolution.
  for (const [a1, b1] of [
    [a0, { ...b0, keep: 'alpha' }],
    [{ ...a0, keep: 'alpha' }, b0],
    [{ ...a0, keep: 'alpha' }, { ...b0, keep: 'alpha' }],
  ] as [Side, Side][]) {
    const [a, b] = both(a1, b1);
    assert.deepEqual([a.action, b.action, b.resolvedBy], [SOURCE, TARGET, 'discard-my-data']);
    assert.ok(b.log.includes('Split-Brain detected, manually solved. Sync from peer node'));
  }
  // Each keeps itself: both discard (receive_protocol refuses before any compare).
  const [a, b] = both({ ...a0, keep: 'alpha' }, { ...b0, keep: 'bravo' });
  assert.deepEqual([a.rule, a.action, b.action], [0, { kind: 'refuse', reason: 'incompatible discard-my-data settings' }, { kind: 'refuse', reason: 'incompatible discard-my-data settings' }]);
  // No split brain: discard-my-data changes nothing.
  const [c, d] = both(alpha(gi('b0', 'a0'), { keep: 'bravo' }), bravo(gi('a0')));
  assert.deepEqual([c.action, d.action], [SOURCE, TARGET]);
});

test('"I shall become SyncSource, but I am inconsistent!"', () => {
  const [a, b] = both(alpha(gi('a0'), { disk: 'Inconsistent' }), bravo(gi(NO_GI), { disk: 'Inconsistent' }));
  assert.deepEqual([a.rule, a.hg, a.action], [30, 2, { kind: 'refuse', reason: 'I shall become SyncSource, but I am inconsistent!' }]);
  // The other end would take the sync; one refusal drops the connection.
  assert.deepEqual([b.rule, b.action], [20, FULL_TARGET]);
});

test('"I shall become SyncTarget, but I am primary!" (rr-conflict disconnect)', () => {
  const [a, b] = both(alpha(gi('a0'), { role: 'Primary' }), bravo(gi('b0', 'a0')));
  assert.deepEqual([a.rule, a.action], [50, { kind: 'refuse', reason: 'I shall become SyncTarget, but I am primary!' }]);
  assert.deepEqual([b.rule, b.action], [70, SOURCE]);
  // An Inconsistent Primary (serving through its peer) may become the target: the check needs disk >= Consistent.
  const [c] = both(alpha(gi('a0'), { role: 'Primary', disk: 'Inconsistent' }), bravo(gi('b0', 'a0')));
  assert.deepEqual(c.action, TARGET);
});

test('a side without a disk: no handshake; two Primaries: refused after the handshake unless allowed', () => {
  for (const disk of ['Diskless', 'Failed'] as const) {
    const [a, b] = both(alpha(gi('a0'), { disk }), bravo(gi('b0', 'a0')));
    assert.deepEqual([a.rule, a.action, b.action], [0, { kind: 'diskless' }, { kind: 'diskless' }]);
  }
  const g = gi('a0');
  let [a] = both(alpha(g, { role: 'Primary' }), bravo(g, { role: 'Primary' }));
  assert.deepEqual(a.action, { kind: 'refuse', reason: 'Multiple primaries not allowed by config' });
  [a] = both(alpha(g, { role: 'Primary' }), bravo(g, { role: 'Primary' }), { afterSplitBrain: 'disconnect', allowTwoPrimaries: true });
  assert.deepEqual(a.action, { kind: 'in-sync' });
});

test('UUIDs are compared without their lowest bit; GIs must be hex', () => {
  const [a] = both(alpha(gi('a1', NO_GI, 'f0')), bravo(gi('a0', NO_GI, 'f1')));
  assert.deepEqual([a.rule, a.action], [40, { kind: 'in-sync' }]);
  assert.equal(uuidOf(plusNewBmOffset('a0')), 0x00010000000000a0n);
  assert.throws(() => drbdConnect(alpha(gi('X')), bravo(gi('a0')), DISCONNECT), /not up to 16 hex digits/);
});

test('a lost resync end, then both write: DRBD discards one side\'s writes; duet\'s target never finished (note 9)', () => {
  const events = [
    { kind: 'force-primary', node: 0 },
    { kind: 'resync-done', lost: null },
    { kind: 'disconnect', inFlight: null },
    { kind: 'write', node: 0, block: 1 },
    { kind: 'connect', prefer: 0, keep: null, syncUuidLost: false },
    // alpha, the source, crashes before recording the end of the resync; bravo recorded it.
    { kind: 'resync-done', lost: 'source' },
    { kind: 'primary', node: 0 },
    { kind: 'write', node: 0, block: 2 },
    { kind: 'primary', node: 1 },
    { kind: 'write', node: 1, block: 3 },
    { kind: 'secondary', node: 0 },
  ] as const;
  const drbd = simulate('drbd', [...events], 1);
  assert.equal(drbd.truth, 'diverged');
  assert.equal(drbd.hazards.length, 1, drbd.trace.join('\n'));
  const [b, a] = both(drbd.self, drbd.peer);
  assert.deepEqual([b.rule, b.action, a.rule, a.action], [70, SOURCE, 50, TARGET], drbd.trace.join('\n'));
  // duet: alpha recorded nothing, so bravo never heard of the end: Inconsistent, not promotable, the target again.
  const duet = simulate('duet', [...events], 1);
  assert.deepEqual([duet.hazards, duet.truth, duet.self.disk], [[], 'self-no-copy', 'Inconsistent']);
  const [d] = both(duet.self, duet.peer);
  assert.deepEqual([d.rule, d.action], [50, TARGET], duet.trace.join('\n'));
});

/* ------------------------------------------------------------ histories */

const POLICIES: SplitBrainPolicy[] = ['disconnect', 'discard-zero-changes', 'discard-least-changes', 'discard-younger-primary'];
const policyArb = fc.constantFrom(...POLICIES);

function story(p: HistoryPair, r: DrbdResult): string {
  return `${p.trace.join('\n')}\nself ${p.self.node}, truth ${p.truth}: rule ${r.rule}, hg ${r.compareHg} -> ${JSON.stringify(r.action)}\n${r.log.join('\n')}`;
}

// DRBD's compare on DRBD's own histories (duet's decision has its own symmetry property).
for (const mechanics of ['drbd'] as Mechanics[]) {
  test(`${mechanics} histories: both ends of DRBD's compare agree`, () => {
    fc.assert(
      fc.property(historyPairs({ mechanics }), policyArb, (p, policy) => {
        const a = drbdConnect(p.self, p.peer, { afterSplitBrain: policy });
        const b = drbdConnect(p.peer, p.self, { afterSplitBrain: policy });
        if (a.rule === 0) return;
        assert.equal(b.rule, MIRROR_RULE[a.rule], story(p, a));
        assert.equal(b.compareHg, mirrorHg(a.compareHg), story(p, a));
      }),
      { numRuns: 1500 },
    );
  });
}

test('drbd histories: no sync overwrites acknowledged writes unless a split-brain resolution chose it, and every divergence is caught (but note 9)', () => {
  fc.assert(
    fc.property(historyPairs({ mechanics: 'drbd' }), policyArb, (p, policy) => {
      // Writes no UUID records (note 9) are DRBD's blind spot: nothing to check there.
      fc.pre(p.hazards.length === 0);
      const r = drbdConnect(p.self, p.peer, { afterSplitBrain: policy });
      if (r.action.kind === 'sync' && !r.resolvedBy) {
        const loses = r.action.direction === 'source' ? ['peer-newer', 'diverged', 'self-no-copy'] : ['self-newer', 'diverged', 'peer-no-copy'];
        assert.ok(!loses.includes(p.truth), story(p, r));
      }
      if (p.truth === 'diverged') assert.ok(r.resolvedBy !== undefined || r.action.kind !== 'sync', story(p, r));
    }),
    { numRuns: 1500 },
  );
});

test('every rule number but 41 fires on realistic DRBD histories (41 needs a Primary of the crashed Primary\'s generation, which neither mechanics makes)', () => {
  const seen = new Set<number>();
  for (const p of fc.sample(historyPairs({ mechanics: 'drbd' }), { numRuns: 6000, seed: 1 })) seen.add(drbdConnect(p.self, p.peer, DISCONNECT).rule);
  assert.deepEqual([...seen].sort((x, y) => x - y), [10, 20, 30, 34, 35, 36, 37, 40, 50, 51, 60, 70, 71, 80, 90, 100]);
});

test('random tuples: the oracle always answers, and its rule is one of DRBD\'s', () => {
  fc.assert(
    fc.property(randomSides(), policyArb, fc.boolean(), ({ self, peer }, policy, alwaysAsbp) => {
      const r = drbdConnect(self, peer, { afterSplitBrain: policy, alwaysAsbp });
      assert.ok(r.rule === 0 || MIRROR_RULE[r.rule] !== undefined);
      if (r.action.kind === 'sync') assert.equal(r.action.full, Math.abs(r.hg) >= 2);
    }),
    { numRuns: 2000 },
  );
});
