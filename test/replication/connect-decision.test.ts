import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ConnectAction, ConnectPolicy, ConnectSide, decideConnect, mirrorAction, syncGeneration } from '../../src/replication/connect-decision.js';
import { DiskState, GenerationIds, NO_GI } from '../../src/replication/meta.js';

const gi = (current: string, bitmap = NO_GI, h1 = NO_GI, h2 = NO_GI): GenerationIds => ({ current, bitmap, history: [h1, h2] });
const policy: ConnectPolicy = { resource: 'r0', allowTwoPrimaries: false, afterSplitBrain: 'disconnect' };

function side(node: string, over: Partial<ConnectSide> = {}): ConnectSide {
  return {
    node,
    role: 'Secondary',
    disk: 'UpToDate',
    dataBytes: 1 << 30,
    gi: gi('C0'),
    crashedPrimary: false,
    outOfSyncBytes: 0,
    primarySince: 0,
    fullSyncNeeded: false,
    peerDiskFailed: false,
    inUse: false,
    ...over,
  };
}

/** What must agree between the two sides' decisions (the texts name each side's own view). */
function shape(a: ConnectAction): unknown {
  switch (a.kind) {
    case 'connected':
      return { kind: a.kind };
    case 'refuse':
      return { kind: a.kind, rule: a.rule, retry: a.retry };
    case 'split-brain':
      return { kind: a.kind, common: a.splitBrain.common, local: a.splitBrain.localChangedBytes, peer: a.splitBrain.peerChangedBytes };
    case 'sync':
      return { kind: a.kind, direction: a.direction, full: a.full, split: a.splitBrain ? [a.splitBrain.common, a.splitBrain.localChangedBytes, a.splitBrain.peerChangedBytes] : null };
  }
}

test('a Primary never becomes sync target: the failback of a forced peer is refused on both sides, and runs once the Primary is Secondary', () => {
  // alpha Primary and idle at C0; bravo was forced Primary while apart (C2, bitmap from C0), wrote, went Secondary.
  const alpha = side('alpha', { role: 'Primary', inUse: true, gi: gi('C0') });
  const bravo = side('bravo', { gi: gi('C2', 'C0'), outOfSyncBytes: 8192 });
  const a = decideConnect(alpha, bravo, policy);
  const b = decideConnect(bravo, alpha, policy);
  assert.equal(a.kind, 'refuse');
  assert.equal(b.kind, 'refuse');
  assert.equal(a.kind === 'refuse' && a.rule, 'primary-target');
  assert.match(a.kind === 'refuse' ? a.reason : '', /alpha is Primary and would become sync target of bravo/);
  assert.equal(a.kind === 'refuse' && a.retry, true, 'retried: a demotion clears it');
  // Still holding the pool open after a demotion attempt: refused as in use.
  const inUse = decideConnect({ ...alpha, role: 'Secondary' }, bravo, policy);
  assert.equal(inUse.kind === 'refuse' && inUse.rule, 'in-use');
  // Secondary and closed: a bitmap resync from bravo.
  const after = decideConnect({ ...alpha, role: 'Secondary', inUse: false }, bravo, policy);
  assert.deepEqual(shape(after), { kind: 'sync', direction: 'target', full: false, split: null });
});

test('a resync one side never recorded the start or the end of resumes from the bitmaps, never a split brain or a full sync', () => {
  // alpha went on alone from C1 (C2, bitmap C1); bravo is at C1. The resync from alpha starts: the sync generation.
  const S = syncGeneration('C2', 'C1');
  const alphaBefore = side('alpha', { gi: gi('C2', 'C1', 'C0') });
  const alphaStarted = side('alpha', { gi: gi('C2', S, 'C1', 'C0') });
  const alphaDone = side('alpha', { gi: gi('C2', NO_GI, S, 'C1') });
  const alphaDoneWroteOn = side('alpha', { gi: gi('C3', 'C2', S, 'C1') });
  const bravoBefore = side('bravo', { gi: gi('C1', NO_GI, 'C0') });
  const bravoStarted = side('bravo', { gi: gi(S, NO_GI, 'C1', 'C0'), disk: 'Inconsistent', outOfSyncBytes: 4096 });
  const bravoDone = side('bravo', { gi: gi('C2', NO_GI, S, 'C1') });
  const bitmapFromAlpha = { kind: 'sync', direction: 'source', full: false, split: null };
  for (const [what, a, b, rule] of [
    ['both recorded the start (interrupted)', alphaStarted, bravoStarted, '70'],
    ['only alpha recorded the start', alphaStarted, bravoBefore, '73'],
    ['only bravo recorded the start', alphaBefore, bravoStarted, '73'],
    ['bravo missed the end', alphaDone, bravoStarted, '73'],
    ['bravo missed the end, alpha wrote on alone', alphaDoneWroteOn, bravoStarted, '73'],
  ] as const) {
    const act = decideConnect(a, b, policy);
    assert.deepEqual(shape(act), bitmapFromAlpha, what);
    assert.equal(act.rule.split('/')[0], rule, what);
  }
  // alpha missed the end (it records it before telling bravo, so only with the record lost on its disk).
  assert.deepEqual(shape(decideConnect(alphaStarted, bravoDone, policy)), bitmapFromAlpha);
  assert.equal(decideConnect(alphaStarted, bravoDone, policy).rule, '34');
  // bravo, interrupted, is forced Primary: it went on from the sync generation, as did alpha: split brain.
  const forced = side('bravo', { role: 'Primary', gi: gi('D1', S, 'C1', 'C0') });
  assert.equal(decideConnect(alphaStarted, forced, policy).kind, 'split-brain');
});

test('split brain: unresolved stays apart; --keep and the policies resolve it, never overwriting a Primary; further back it is a full sync', () => {
  const a = side('alpha', { gi: gi('C2', 'C1', 'C0'), outOfSyncBytes: 4096, primarySince: 10 });
  const b = side('bravo', { gi: gi('C3', 'C1', 'C0'), outOfSyncBytes: 8192, primarySince: 20 });
  assert.equal(decideConnect(a, b, policy).kind, 'split-brain');
  assert.deepEqual(shape(decideConnect({ ...a, keep: 'bravo' }, b, policy)), { kind: 'sync', direction: 'target', full: false, split: ['C1', 4096, 8192] });
  assert.deepEqual(shape(decideConnect(a, { ...b, keep: 'bravo' }, policy)), { kind: 'sync', direction: 'target', full: false, split: ['C1', 4096, 8192] });
  assert.equal(decideConnect({ ...a, keep: 'alpha' }, { ...b, keep: 'bravo' }, policy).kind, 'split-brain');
  const least = { ...policy, afterSplitBrain: 'discard-least-changes' as const };
  assert.equal((decideConnect(a, b, least) as { direction?: string }).direction, 'target');
  // bravo has more changes but is Primary: the policy may not overwrite alpha... it would overwrite alpha, a Secondary: fine.
  assert.equal((decideConnect(a, { ...b, role: 'Primary' }, least) as { direction?: string }).direction, 'target');
  // The policy would overwrite bravo, a Primary: unresolved.
  assert.equal(decideConnect({ ...a, outOfSyncBytes: 1 << 20 }, { ...b, role: 'Primary' }, least).kind, 'split-brain');
  const younger = { ...policy, afterSplitBrain: 'discard-younger-primary' as const };
  assert.equal((decideConnect(a, b, younger) as { direction?: string }).direction, 'source', 'bravo was promoted last: its changes go');
  // Common generation further back than both bitmaps: only an admin resolves it, and every block goes.
  const fa = side('alpha', { gi: gi('D1', 'C2', 'C0') , outOfSyncBytes: 4096 });
  const fb = side('bravo', { gi: gi('D2', 'C3', 'C0'), outOfSyncBytes: 4096 });
  assert.equal(decideConnect(fa, fb, least).kind, 'split-brain');
  assert.deepEqual(shape(decideConnect({ ...fa, keep: 'alpha' }, fb, least)), { kind: 'sync', direction: 'source', full: true, split: ['C0', 4096, 4096] });
});

test('disk states: an Inconsistent disk is the target; an Inconsistent source is refused; a failed disk gets a full sync', () => {
  const good = side('alpha', { gi: gi('C1', 'C0') });
  const inconsistent = side('bravo', { gi: gi('C0'), disk: 'Inconsistent' });
  assert.deepEqual(shape(decideConnect(good, inconsistent, policy)), { kind: 'sync', direction: 'source', full: false, split: null });
  // Generations say bravo is ahead, but bravo's disk is Inconsistent and alpha's is not: alpha is the source.
  assert.deepEqual(shape(decideConnect(side('alpha', { gi: gi('C0') }), { ...inconsistent, gi: gi('C1', 'C0') }, policy)), { kind: 'sync', direction: 'source', full: false, split: null });
  const both = decideConnect({ ...good, disk: 'Inconsistent' }, inconsistent, policy);
  assert.equal(both.kind === 'refuse' && both.rule, 'inconsistent-source');
  // bravo's disk failed while alpha kept the data: whatever the bitmaps, every block goes back.
  const failed = decideConnect({ ...good, peerDiskFailed: true }, { ...inconsistent, disk: 'UpToDate' }, policy);
  assert.deepEqual(shape(failed), { kind: 'sync', direction: 'source', full: true, split: null });
  const newDisk = decideConnect(good, { ...inconsistent, fullSyncNeeded: true }, policy);
  assert.deepEqual(shape(newDisk), { kind: 'sync', direction: 'source', full: true, split: null });
});

test('a Diskless Primary connects only to the data it served', () => {
  const diskless = side('alpha', { role: 'Primary', disk: 'Diskless', gi: gi('C1', 'C0') });
  assert.equal(decideConnect(diskless, side('bravo', { gi: gi('C1', 'C0') }), policy).kind, 'connected');
  const other = decideConnect(diskless, side('bravo', { gi: gi('C5', 'C0') }), policy);
  assert.equal(other.kind === 'refuse' && other.rule, 'diskless-primary');
});

const ids = fc.constantFrom(NO_GI, 'A', 'B', 'C', 'D', 'E');
const disks = fc.constantFrom<DiskState>('UpToDate', 'UpToDate', 'Outdated', 'Inconsistent', 'Diskless', 'Failed');
const sideArb = (node: string) =>
  fc.record({
    node: fc.constant(node),
    role: fc.constantFrom('Primary' as const, 'Secondary' as const),
    disk: disks,
    dataBytes: fc.constantFrom(1 << 30, 1 << 30, 1 << 29),
    gi: fc.record({ current: ids, bitmap: ids, history: fc.tuple(ids, ids) }),
    crashedPrimary: fc.boolean(),
    outOfSyncBytes: fc.constantFrom(0, 4096, 8192),
    primarySince: fc.constantFrom(0, 1, 2),
    fullSyncNeeded: fc.boolean(),
    peerDiskFailed: fc.boolean(),
    peerDiskFailedGi: fc.option(ids, { nil: undefined }),
    inUse: fc.boolean(),
    keep: fc.constantFrom(undefined, 'alpha', 'bravo'),
  });
const policyArb = fc.record({
  resource: fc.constant('r0'),
  allowTwoPrimaries: fc.boolean(),
  afterSplitBrain: fc.constantFrom('disconnect' as const, 'discard-zero-changes' as const, 'discard-least-changes' as const, 'discard-younger-primary' as const),
});

test('both sides always reach mirror-image actions', () => {
  fc.assert(
    fc.property(sideArb('alpha'), sideArb('bravo'), policyArb, (a, b, p) => {
      const ab = decideConnect(a, b, p);
      const ba = decideConnect(b, a, p);
      assert.deepEqual(shape(ab), shape(mirrorAction(ba)), `alpha: ${JSON.stringify(ab)}\nbravo: ${JSON.stringify(ba)}`);
    }),
    { numRuns: 20_000 },
  );
});

test('safety: no resync overwrites a Primary, a disk in use or from a disk that is not good; nothing resyncs to or from a missing disk', () => {
  fc.assert(
    fc.property(sideArb('alpha'), sideArb('bravo'), policyArb, (a, b, p) => {
      const act = decideConnect(a, b, p);
      if (act.kind !== 'sync') return;
      const [source, target] = act.direction === 'source' ? [a, b] : [b, a];
      if (!p.allowTwoPrimaries) assert.notEqual(target.role, 'Primary', JSON.stringify({ a, b, act }));
      assert.equal(target.inUse, false);
      assert.ok(source.disk === 'UpToDate' || source.disk === 'Outdated', `source disk ${source.disk}`);
      assert.ok(target.disk !== 'Diskless' && target.disk !== 'Failed');
      assert.equal(a.dataBytes, b.dataBytes);
      if (target.fullSyncNeeded) assert.equal(act.full, true);
      // A disk the target saw fail (and that has not been written since) is never the source.
      const seen = target.peerDiskFailed && (target.peerDiskFailedGi === undefined || target.peerDiskFailedGi === source.gi.current);
      assert.ok(!seen, `${source.node}'s disk, seen failing by ${target.node}, is the source: ${JSON.stringify({ a, b, act })}`);
    }),
    { numRuns: 20_000 },
  );
});

test('the cases of the DRBD guide ("Generation Identifiers"), each from both sides', () => {
  const cases: [string, GenerationIds, GenerationIds, unknown][] = [
    ['both new', gi(NO_GI), gi(NO_GI), { kind: 'connected' }],
    ['peer new', gi('A'), gi(NO_GI), { kind: 'sync', direction: 'source', full: true, split: null }],
    ['same generation', gi('A', NO_GI, 'X'), gi('A', NO_GI, 'X'), { kind: 'connected' }],
    // The Primary went on alone: new current B, bitmap at A; the Secondary still at A.
    ['bitmap sync', gi('B', 'A', 'X'), gi('A', NO_GI, 'X'), { kind: 'sync', direction: 'source', full: false, split: null }],
    // Both went on while apart, both from A: split brain, A in common.
    ['split brain', gi('B', 'A', 'X'), gi('C', 'A', 'X'), { kind: 'split-brain', common: 'A', local: 0, peer: 0 }],
    // The peer went through two generations since our current: no bitmap reaches back, full sync.
    ['history', gi('A', NO_GI, 'X'), gi('C', 'B', 'A', 'X'), { kind: 'sync', direction: 'target', full: true, split: null }],
    ['split brain further back', gi('D', 'B', 'A'), gi('E', 'C', 'A'), { kind: 'split-brain', common: 'A', local: 0, peer: 0 }],
    ['unrelated', gi('A', 'B', 'C', 'D'), gi('E', 'F', 'G', 'H'), { kind: 'refuse', rule: 'unrelated', retry: false }],
  ];
  for (const [name, a, b, want] of cases) {
    const self = side('alpha', { gi: a, disk: a.current === NO_GI ? 'Inconsistent' : 'UpToDate' });
    const peer = side('bravo', { gi: b, disk: b.current === NO_GI ? 'Inconsistent' : 'UpToDate' });
    assert.deepEqual(shape(decideConnect(self, peer, policy)), want, `${name} (alpha's view)`);
    assert.deepEqual(shape(mirrorAction(decideConnect(peer, self, policy))), want, `${name} (bravo's view)`);
  }
});

test('a failed disk facing an UpToDate peer gets a full sync even when the peer has moved past its history (simulator seeds 151, 292: "unrelated data" for good)', () => {
  // bravo's disk failed at generation C1 and was attached again (Inconsistent, full sync needed); alpha went on
  // through three generations since, and keeps two in its history.
  const alpha = side('alpha', { gi: gi('C4', NO_GI, 'C3', 'C2'), peerDiskFailed: true });
  const bravo = side('bravo', { disk: 'Inconsistent', fullSyncNeeded: true, gi: gi('C1', NO_GI, 'C0') });
  const a = decideConnect(alpha, bravo, policy);
  const b = decideConnect(bravo, alpha, policy);
  assert.deepEqual(shape(a), { kind: 'sync', direction: 'source', full: true, split: null });
  assert.deepEqual(shape(b), { kind: 'sync', direction: 'target', full: true, split: null });
  // Its Failed record could not be written (the disk took no write): it claims UpToDate, but alpha saw it fail.
  const claims = decideConnect(alpha, { ...bravo, disk: 'UpToDate', fullSyncNeeded: false }, policy);
  assert.deepEqual(shape(claims), { kind: 'sync', direction: 'source', full: true, split: null });
  // ... unless it is Primary: then it is refused (a Primary is never sync target), retried after a demotion.
  const primary = decideConnect({ ...bravo, role: 'Primary' }, alpha, policy);
  assert.equal(primary.kind === 'refuse' && primary.rule, 'primary-target');
  // Both disks failed: nobody has good data, for an admin to force one (not "unrelated").
  const both = decideConnect({ ...alpha, disk: 'Inconsistent', fullSyncNeeded: true }, bravo, policy);
  assert.equal(both.kind === 'refuse' && both.rule, 'inconsistent-source');
  // Truly unrelated disks are still refused.
  const foreign = decideConnect({ ...alpha, peerDiskFailed: false }, { ...bravo, disk: 'UpToDate', fullSyncNeeded: false }, policy);
  assert.equal(foreign.kind === 'refuse' && foreign.rule, 'unrelated');
});

test('a disk its peer saw fail, back at the generation the peer still holds (the witness was out of reach, no new generation yet), is overwritten whole, never the source of a crashed Primary\'s extents (simulator seed 4942)', () => {
  const bravo = side('bravo', { gi: gi('C1', NO_GI, 'C0'), peerDiskFailed: true, outOfSyncBytes: 8192 });
  // alpha's Failed record could not be written: it claims UpToDate at C1, and it was Primary when it crashed.
  const alpha = side('alpha', { gi: gi('C1', NO_GI, 'C0'), crashedPrimary: true });
  assert.deepEqual(shape(decideConnect(bravo, alpha, policy)), { kind: 'sync', direction: 'source', full: true, split: null });
  assert.deepEqual(shape(decideConnect(alpha, bravo, policy)), { kind: 'sync', direction: 'target', full: true, split: null });
  // Not crashed: not "in sync" either.
  assert.deepEqual(shape(decideConnect({ ...alpha, crashedPrimary: false }, bravo, policy)), { kind: 'sync', direction: 'target', full: true, split: null });
  // bravo Outdated since (a witness's mark): at one generation it still has every write alpha's disk had.
  assert.deepEqual(shape(decideConnect(alpha, { ...bravo, disk: 'Outdated' }, policy)), { kind: 'sync', direction: 'target', full: true, split: null });
});

test('a split brain where one disk failed (its peer saw it fail) keeps the peer\'s data by itself: a full sync to the failed disk, its own changes saved first (simulator seeds 1493, 2819)', () => {
  // Apart since C0: bravo went on alone (C2, bitmap from C0), then its disk failed without taking its Failed
  // record; it came back Diskless and served through alpha (C1, bitmap from C0), which recorded the failure.
  const alpha = side('alpha', { gi: gi('C1', 'C0'), peerDiskFailed: true, peerDiskFailedGi: 'C2', outOfSyncBytes: 65536 });
  const bravo = side('bravo', { gi: gi('C2', 'C0'), outOfSyncBytes: 8192 });
  const split = { kind: 'sync', direction: 'source', full: true, split: ['C0', 65536, 8192] };
  assert.deepEqual(shape(decideConnect(alpha, bravo, policy)), split);
  assert.deepEqual(shape(mirrorAction(decideConnect(bravo, alpha, policy))), split);
  const b = decideConnect(bravo, alpha, policy);
  assert.match(b.kind === 'sync' ? `${b.rule} ${b.splitBrain?.resolution}` : '', /split-brain\/failed-disk .*bravo's disk failed/);
  // Further back than the bitmaps (rule 100): the same, every block.
  const far = decideConnect({ ...alpha, gi: gi('C1', NO_GI, 'C0') }, { ...bravo, gi: gi('C2', NO_GI, 'C0') }, policy);
  assert.deepEqual(shape(far), { kind: 'sync', direction: 'source', full: true, split: ['C0', 65536, 8192] });
  // The failed disk's node is Primary on it again (after a restart): its users write there now, so the
  // admin decides (a plain split brain).
  assert.equal(decideConnect({ ...bravo, role: 'Primary' }, alpha, policy).kind, 'split-brain');
  // Without the record of the failure, an ordinary split brain for the admin.
  assert.equal(decideConnect({ ...alpha, peerDiskFailed: false }, bravo, policy).kind, 'split-brain');
  // Each side saw the other fail: no answer from the records, the admin decides.
  assert.equal(decideConnect(alpha, { ...bravo, peerDiskFailed: true, peerDiskFailedGi: 'C1' }, policy).kind, 'split-brain');
  // The failed disk was repaired and written since (promoted alone on it: C3): not the disk alpha saw fail,
  // and its users' writes are not discarded by a record about its past (review of this rule).
  assert.equal(decideConnect(alpha, { ...bravo, gi: gi('C3', 'C0', 'C2') }, policy).kind, 'split-brain');
  assert.equal(decideConnect({ ...bravo, gi: gi('C3', 'C0', 'C2') }, alpha, policy).kind, 'split-brain');
});

test('a Diskless node that saw its peer\'s disk fail does not take that disk for the data: refused until its own disk is back or an admin forces the peer (simulator seed 7558)', () => {
  // alpha saw bravo's disk fail (it took no more writes) and went on (C2); then alpha's disk failed too. bravo's
  // disk is back, repaired, its record still UpToDate at C1: it lacks what alpha wrote since.
  const alpha = side('alpha', { disk: 'Diskless', gi: gi('C2', NO_GI, 'C1'), peerDiskFailed: true, peerDiskFailedGi: 'C1' });
  const bravo = side('bravo', { gi: gi('C1', NO_GI, 'C0') });
  for (const [self, peer] of [[alpha, bravo], [bravo, alpha]]) {
    const a = decideConnect(self, peer, policy);
    assert.equal(a.kind === 'refuse' && a.rule, 'stale-peer-disk', `${self.node}'s view`);
    assert.match(a.kind === 'refuse' ? a.reason : '', /bravo's disk failed .* alpha has no disk/);
  }
  // At the same generation too (the witness was out of reach: no new generation yet, but writes in flight).
  assert.equal(decideConnect({ ...alpha, gi: bravo.gi }, bravo, policy).kind, 'refuse');
  // Without that record, a Diskless node works through its peer's disk as before.
  assert.equal(decideConnect({ ...alpha, peerDiskFailed: false }, bravo, policy).kind, 'connected');
  // Nor once an admin went on from that disk (promote --force: a generation of its own).
  assert.equal(decideConnect(alpha, { ...bravo, gi: gi('C3', 'C1', 'C0') }, policy).kind, 'connected');
});

test('an interrupted resync between two nodes of the same generation resumes from the bitmaps (simulator seeds 81, 252: rule 110, a full sync or a split brain)', () => {
  const g = syncGeneration('A', 'A');
  const source = side('alpha', { gi: gi('A', g), outOfSyncBytes: 4096 });
  const target = side('bravo', { disk: 'Inconsistent', gi: gi(g, NO_GI, 'A'), outOfSyncBytes: 4096 });
  assert.deepEqual(shape(decideConnect(source, target, policy)), { kind: 'sync', direction: 'source', full: false, split: null });
  assert.deepEqual(shape(decideConnect(target, source, policy)), { kind: 'sync', direction: 'target', full: false, split: null });
  assert.equal(decideConnect(source, target, policy).kind === 'sync' && decideConnect(source, target, policy).rule.startsWith('70'), true);
});

test('same generation, blocks marked on one side only: that side is the source, whatever the names (simulator seed 83)', () => {
  // alpha (sorts first) lost its cache; bravo, Primary until its fence failed, keeps the marks of what alpha may lack.
  const alpha = side('alpha');
  const bravo = side('bravo', { outOfSyncBytes: 65536 });
  assert.deepEqual(shape(decideConnect(alpha, bravo, policy)), { kind: 'sync', direction: 'target', full: false, split: null });
  assert.deepEqual(shape(decideConnect(bravo, alpha, policy)), { kind: 'sync', direction: 'source', full: false, split: null });
  // Marks on both sides: the Primary, else by name, as before.
  const both = decideConnect({ ...alpha, outOfSyncBytes: 4096 }, bravo, policy);
  assert.deepEqual(shape(both), { kind: 'sync', direction: 'source', full: false, split: null });
});

test('a split-brain resolution the source recorded the start of and the target never did is still the split brain (rule 92), not unrelated data', () => {
  // Both went on from C: alpha to A (bitmap C), bravo to B (bitmap C). alpha, the resolution's source, recorded
  // the sync generation as its bitmap (C into its history); bravo refused (its blocks could not be saved).
  const alpha = side('alpha', { gi: gi('A', syncGeneration('A', 'B'), 'C', 'H'), outOfSyncBytes: 8192 });
  const bravo = side('bravo', { gi: gi('B', 'C', 'H'), outOfSyncBytes: 4096 });
  const a = decideConnect(alpha, bravo, policy);
  const b = decideConnect(bravo, alpha, policy);
  assert.equal(a.kind, 'split-brain');
  assert.equal(b.kind, 'split-brain');
  assert.match(a.rule, /^92/);
  assert.equal(a.kind === 'split-brain' && a.splitBrain.common, 'C');
  // A policy resolves it as it did the first time: a bitmap resync from alpha.
  const resolved = decideConnect(alpha, bravo, { ...policy, afterSplitBrain: 'discard-least-changes' });
  assert.deepEqual(shape(resolved), { kind: 'sync', direction: 'source', full: false, split: ['C', 8192, 4096] });
});

test('both disks failed at the same generation: "nobody has good data" for an admin to force one, not "in sync" (simulator seed 1388: both Inconsistent, connected, never converging)', () => {
  // Both detached on a flush error with nothing marked, both attached again: Inconsistent, full sync needed.
  const alpha = side('alpha', { disk: 'Inconsistent', fullSyncNeeded: true, gi: gi('A', NO_GI, 'X') });
  const bravo = side('bravo', { disk: 'Inconsistent', fullSyncNeeded: true, gi: gi('A', NO_GI, 'X') });
  for (const [self, peer] of [
    [alpha, bravo],
    [bravo, alpha],
    [{ ...alpha, fullSyncNeeded: false }, bravo],
  ]) {
    const act = decideConnect(self, peer, policy);
    assert.equal(act.kind === 'refuse' && act.rule, 'inconsistent-source', JSON.stringify(act));
    assert.match(act.kind === 'refuse' ? act.reason : '', /nobody has good data.*--force/);
  }
  // Whatever the sides: two disks with data, neither good, never "connected" (only two new disks are, for the initial sync).
  fc.assert(
    fc.property(sideArb('alpha'), sideArb('bravo'), policyArb, (a, b, p) => {
      const act = decideConnect(a, b, p);
      const bad = (s: ConnectSide) => s.disk === 'Inconsistent';
      if (act.kind === 'connected' && bad(a) && bad(b)) assert.ok(a.gi.current === NO_GI && b.gi.current === NO_GI, JSON.stringify({ a, b, act }));
    }),
    { numRuns: 20_000 },
  );
});

test('the disk a Diskless node kept the data on comes back recorded Failed, facing the peer disk it saw fail: nobody has good data, no resync from the stale disk (seed 7558, once the own disk is attached again)', () => {
  // alpha saw bravo's disk fail and went on (C2, writes only alpha's disk has); then alpha's disk failed and took
  // its Failed record. bravo's disk is back, repaired, still UpToDate at C1: it lacks every write of C2.
  const alpha = side('alpha', { disk: 'Inconsistent', fullSyncNeeded: true, peerDiskFailed: true, gi: gi('C2', 'C1'), outOfSyncBytes: 1 << 20 });
  const bravo = side('bravo', { gi: gi('C1') });
  for (const [self, peer] of [[alpha, bravo], [bravo, alpha]]) {
    const a = decideConnect(self, peer, policy);
    assert.notDeepEqual(shape(a), { kind: 'sync', direction: self === bravo ? 'source' : 'target', full: true, split: null }, `${self.node}: ${a.kind === 'sync' ? a.why : a.kind}`);
  }
});

test('mirror images and "never a source" hold where the records name each other (failed-disk generations drawn from the other side\'s ids)', () => {
  // The arbitraries above draw peerDiskFailedGi from all ids: the other side's current in 1 of 7. Here it is
  // one of the other side's generations (or unknown) most of the time, and the failed disk's lineage too.
  const pair = fc
    .tuple(sideArb('alpha'), sideArb('bravo'), fc.nat(5), fc.nat(5), fc.boolean(), fc.boolean())
    .map(([a, b, ia, ib, fa, fb]) => {
      const idsOf = (s: ConnectSide) => [s.gi.current, s.gi.bitmap, ...s.gi.history, NO_GI, 'E'];
      const aLine = idsOf(b);
      const bLine = idsOf(a);
      return [
        { ...a, peerDiskFailedGi: aLine[ia], peerDiskFailedFrom: fa ? [aLine[(ia + 1) % 6]] : undefined },
        { ...b, peerDiskFailedGi: bLine[ib], peerDiskFailedFrom: fb ? [bLine[(ib + 1) % 6]] : undefined },
      ] as const;
    });
  fc.assert(
    fc.property(pair, policyArb, ([a, b], p) => {
      const ab = decideConnect(a, b, p);
      const ba = decideConnect(b, a, p);
      assert.deepEqual(shape(ab), shape(mirrorAction(ba)), `alpha: ${JSON.stringify(ab)}\nbravo: ${JSON.stringify(ba)}\n${JSON.stringify({ a, b })}`);
      if (ab.kind !== 'sync') return;
      const [source, target] = ab.direction === 'source' ? [a, b] : [b, a];
      const g = source.gi.current;
      const seen = target.peerDiskFailed && (target.peerDiskFailedGi === undefined || target.peerDiskFailedGi === g || (g !== NO_GI && (target.peerDiskFailedFrom ?? []).includes(g)));
      assert.ok(!seen, `${source.node}'s disk, seen failing by ${target.node}, is the source: ${JSON.stringify({ a, b, ab })}`);
    }),
    { numRuns: 100_000 },
  );
});

test('a failed disk that had no generation yet (a new disk) and was promoted with --force and written since is not overwritten by itself (review of db9ab1e: NO_GI recorded is read as "not known")', () => {
  // bravo's new disk failed before its first sync; alpha recorded it (bravo claimed no generation: NO_GI). Later,
  // alpha away, bravo's disk (repaired, or a new one from create-md) was promoted with --force and its users wrote.
  const alpha = side('alpha', { gi: gi('C1'), peerDiskFailed: true, peerDiskFailedGi: NO_GI });
  const bravo = side('bravo', { gi: gi('B1'), outOfSyncBytes: 1 << 20 });
  for (const [self, peer] of [[alpha, bravo], [bravo, alpha]]) {
    const act = decideConnect(self, peer, policy);
    assert.ok(act.kind !== 'sync' || act.splitBrain !== undefined, `${self.node}: bravo's writes since its forced promotion are overwritten unsaved, no admin asked: ${act.kind === 'sync' ? `${act.rule}: ${act.why}` : act.kind}`);
  }
});
