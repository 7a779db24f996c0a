/**
 * The decision two nodes make when their link comes up, in one place: from
 * both sides' role, disk state, generation ids, out-of-sync marks and
 * crash flag, one action — in sync, a bitmap or a full resync and its
 * direction, split brain, or a refusal with its reason.
 *
 * It is DRBD's decision (drbd_uuid_compare and drbd_sync_handshake in
 * drbd_receiver.c, 8.4): the generation ids give a verdict `hg` (0 in sync,
 * ±1 bitmap resync, ±2 full resync, +100 split brain a policy may resolve,
 * -100 split brain only an admin may resolve, -1000 unrelated data; > 0
 * means this node is the sync source), numbered by DRBD's rules; then the
 * disk states, the split-brain policy, the roles and the admin's choice
 * turn it into an action. Where duet differs from DRBD it says so (DUET:).
 *
 * Pure and symmetric: both nodes evaluate it with the sides swapped and
 * reach mirror-image actions (property-tested), so neither needs to be told
 * what the other decided. PeerSession only transports the inputs and
 * carries the action out.
 */
import { createHash } from 'node:crypto';
import { DiskState, GenerationIds, NO_GI } from './meta.js';
import type { Role } from './wire.js';

export type SplitBrainPolicy = 'disconnect' | 'discard-zero-changes' | 'discard-least-changes' | 'discard-younger-primary';

/** What one side brings to the decision (its own state, or what the peer reported). */
export interface ConnectSide {
  node: string;
  role: Role;
  disk: DiskState;
  dataBytes: number;
  gi: GenerationIds;
  /** Was Primary when it crashed: the extents it had hot may differ from the peer's. */
  crashedPrimary: boolean;
  /** Bytes marked out of sync on this side (what it changed since the generations parted). */
  outOfSyncBytes: number;
  /** When it last became Primary (ms since the epoch; 0 never): discard-younger-primary. */
  primarySince: number;
  /** This disk must be overwritten whole before it is good (a new or failed disk). */
  fullSyncNeeded: boolean;
  /** Its peer's disk failed while this side kept the data: the peer's disk gets a full sync. */
  peerDiskFailed: boolean;
  /**
   * The generation that failed disk claimed then (NO_GI or absent: not known, from an older record). A
   * disk that claims another one now has been written since (promoted alone on it, after a repair): it
   * is not the disk that failed any more, and nothing about its data is known here.
   */
  peerDiskFailedGi?: string;
  /**
   * The generations that disk's node had gone on from then (its bitmap and history generations). Its
   * record is in memory before it is on disk: a disk that failed on the write of a new generation (and
   * took no Failed record) claims one of these when it is back, and it is that failed disk all the same.
   */
  peerDiskFailedFrom?: string[];
  /** Something above the resource (an open pool) uses the data on this side. */
  inUse: boolean;
  /** `resource resolve --keep NODE` asked on this side: the node whose data stays. */
  keep?: string;
}

export interface ConnectPolicy {
  /** The resource's name (for the messages). */
  resource: string;
  allowTwoPrimaries: boolean;
  afterSplitBrain: SplitBrainPolicy;
}

export type ConnectAction =
  /** Link up, no resync (in sync, both disks new, or one side without a disk). */
  | { kind: 'connected'; rule: string; why: string }
  /** Resync in the background; this node is `direction`. */
  | { kind: 'sync'; rule: string; direction: 'source' | 'target'; full: boolean; why: string; splitBrain?: SplitBrainFound }
  /** Split brain nobody resolved: both stay StandAlone until an admin does. */
  | { kind: 'split-brain'; rule: string; why: string; splitBrain: SplitBrainFound }
  /**
   * Not now: `retry` when a change of role or disk on either side may
   * clear it (the link is retried), otherwise the node stays StandAlone
   * until an admin acts.
   */
  | { kind: 'refuse'; rule: string; reason: string; retry: boolean };

export interface SplitBrainFound {
  /** The last generation both sides had. */
  common: string;
  localChangedBytes: number;
  peerChangedBytes: number;
  /** How it was resolved (`null`: not resolved). */
  resolution: string | null;
  /** Resolved for the peer of the node whose disk failed (that node's blocks are saved as far as they can be read). */
  failedDisk?: string;
}

/** The generation-id verdict: DRBD's `hg` and rule number. */
export interface Verdict {
  hg: number;
  rule: number;
  /** Split brain: the newest generation both sides had. */
  common?: string;
}

/**
 * The sync generation of a resync from a source at generation `source` to
 * a target at `target` (DRBD's sync UUID, but computed, not sent): when a
 * resync starts, the source records it as its bitmap generation and the
 * target as its current one. An interrupted resync then resumes from the
 * bitmaps (rule 70/50), a target forced Primary midway is a split brain
 * with its source (rule 90: both went on from the sync generation), and
 * either side can tell a start the other never recorded (rules 53/54).
 */
export function syncGeneration(source: string, target: string): string {
  const gi = createHash('sha256').update(`duet-sync:${source}:${target}`).digest('hex').slice(0, 16);
  return gi === '0000000000000000' ? '0000000000000001' : gi;
}

/**
 * The generations of a disk that is not UpToDate when it is promoted with
 * --force: a generation of its own, gone on from its current one. An
 * Inconsistent disk that has a generation is an interrupted sync target
 * (its current is the sync generation): it forgets the generation it had
 * before that resync, so no rule can take it for "generations ahead" of
 * the source it never caught up with (that is a split brain: both went on
 * from the sync generation, or from an older common one).
 */
export function forcedGeneration(gi: GenerationIds, disk: DiskState, fresh: string): GenerationIds {
  if (gi.current === NO_GI) return { current: fresh, bitmap: NO_GI, history: gi.history };
  const history: [string, string] = disk === 'Inconsistent' ? [gi.history[1], NO_GI] : gi.history;
  return { current: fresh, bitmap: gi.bitmap === NO_GI ? gi.current : gi.bitmap, history };
}

/**
 * drbd_uuid_compare, from `self`'s side. `resolver` is the node that loses
 * ties (DRBD's RESOLVE_CONFLICTS): the one whose name sorts last.
 *
 * Not ported: protocol-version fallbacks (duet speaks one version), and
 * rules 51 and 71, which repair DRBD's sync-UUID handshake. DUET: rules
 * 53/73 take their place for duet's computed sync generation.
 */
export function compareGenerations(self: ConnectSide, peer: ConnectSide): Verdict {
  const s = self.gi;
  const p = peer.gi;
  if (s.current === NO_GI && p.current === NO_GI) return { hg: 0, rule: 10 };
  if (s.current === NO_GI) return { hg: -2, rule: 20 };
  if (p.current === NO_GI) return { hg: 2, rule: 30 };
  if (s.current === p.current) {
    // One side finished a resync as source and the other did not record it (or the reverse).
    if (p.bitmap === NO_GI && s.bitmap !== NO_GI) return { hg: 1, rule: s.bitmap === p.history[0] && s.history[0] === p.history[1] ? 34 : 36 };
    if (s.bitmap === NO_GI && p.bitmap !== NO_GI) return { hg: -1, rule: p.bitmap === s.history[0] && p.history[0] === s.history[1] ? 35 : 37 };
    // Same generation: only a crash of a Primary can have left blocks that differ.
    const rct = (self.crashedPrimary ? 1 : 0) + (peer.crashedPrimary ? 2 : 0);
    if (rct === 0) return { hg: 0, rule: 40 };
    if (self.role === 'Primary' || peer.role === 'Primary') {
      if (self.role === 'Primary' && peer.role === 'Primary') return { hg: -100, rule: 41, common: s.current };
      return { hg: self.role === 'Primary' ? 1 : -1, rule: 41 };
    }
    if (rct === 1) return { hg: 1, rule: 40 };
    if (rct === 2) return { hg: -1, rule: 40 };
    return { hg: isResolver(self, peer) ? -1 : 1, rule: 40 };
  }
  // DUET: a split-brain resolution whose source recorded its start (its bitmap generation is the sync
  // generation from the peer's current; the common generation went to its history) and whose target did
  // not (it refused: its blocks could not be saved; or it never heard): still the split brain of rule 90.
  if (s.bitmap !== NO_GI && p.bitmap !== NO_GI && s.history[0] === p.bitmap && s.bitmap === syncGeneration(s.current, p.current)) return { hg: 100, rule: 92, common: p.bitmap };
  if (s.bitmap !== NO_GI && p.bitmap !== NO_GI && p.history[0] === s.bitmap && p.bitmap === syncGeneration(p.current, s.current)) return { hg: 100, rule: 92, common: s.bitmap };
  // DUET: checked before 50-80 (DRBD: after them): both went on from the same generation. In DRBD's
  // histories nothing else can match then; in duet's a resync target keeps its old generation in its
  // history, which rule 80 would otherwise take for "generations ahead".
  if (s.bitmap !== NO_GI && s.bitmap === p.bitmap) return { hg: 100, rule: 90, common: s.bitmap };
  if (s.current === p.bitmap) return { hg: -1, rule: 50 };
  // DUET: a resync from the peer to this node one of them never recorded the start or the end of.
  if (missedResync(s, p)) return { hg: -1, rule: 53 };
  // DUET: this side's bitmap starts at the peer's current while the peer keeps this side's current in its
  // history: an interrupted resync from here, the peer's current being the sync generation (a target
  // records the generation it left in its history). Rule 70, as the peer's rule 50 says; rule 60 would
  // take it for "the peer is generations ahead".
  if (s.bitmap !== NO_GI && s.bitmap === p.current) return { hg: 1, rule: 70 };
  if (p.history.includes(s.current)) return { hg: -2, rule: 60 };
  if (s.bitmap === p.current) return { hg: 1, rule: 70 };
  if (missedResync(p, s)) return { hg: 1, rule: 73 };
  if (s.history.includes(p.current)) return { hg: 2, rule: 80 };
  // DUET: DRBD compares history slots without skipping empty ones; two empty slots are no common history.
  const shared = s.history.filter((h) => h !== NO_GI && p.history.includes(h));
  if (shared.length > 0) return { hg: -100, rule: 100, common: shared.sort()[0] };
  return { hg: -1000, rule: 1000 };
}

/**
 * Was `t` the target of a resync from `s` that one of them never recorded
 * the start or the end of? Then `t`'s bitmap (on its disk since the start)
 * and `s`'s cover what `t` lacks: a bitmap resync, where the generations
 * alone would say "generations ahead" or "unrelated". Exact, because the
 * sync generation is computed from both sides' generations at the start:
 * - `s` recorded the start, `t` did not: `t`'s current moved to `s`'s
 *   history and `s`'s bitmap generation is the sync generation from it;
 * - `t` recorded the start (its current is the sync generation from `s`'s
 *   current then, which `s` still has as current, or as bitmap generation
 *   once it went on alone) and `s` did not, or `t` missed the end.
 */
function missedResync(t: GenerationIds, s: GenerationIds): boolean {
  if (t.current === s.history[0] && s.bitmap === syncGeneration(s.current, t.current)) return true;
  return t.current === syncGeneration(s.current, t.history[0]) || (s.bitmap !== NO_GI && t.current === syncGeneration(s.bitmap, t.history[0]));
}

/**
 * The verdict, checked from both sides: histories that contradict each
 * other (each side would be the target, say: impossible in one history,
 * so one of them is damaged or foreign) are a split brain for an admin.
 */
function verdict(self: ConnectSide, peer: ConnectSide): Verdict {
  const mine = compareGenerations(self, peer);
  const theirs = compareGenerations(peer, self);
  // Resyncs mirror each other (+1 here is -1 there); the other verdicts are the same on both sides.
  const agree = Math.abs(mine.hg) <= 2 ? mine.hg === -theirs.hg : mine.hg === theirs.hg;
  if (agree) return mine;
  const theirIds = [peer.gi.current, peer.gi.bitmap, ...peer.gi.history];
  const common = [self.gi.current, self.gi.bitmap, ...self.gi.history].filter((g) => g !== NO_GI && theirIds.includes(g)).sort();
  return { hg: -100, rule: 110, common: common[0] ?? NO_GI };
}

/** DRBD's RESOLVE_CONFLICTS holder: the node whose name sorts last. */
function isResolver(self: ConnectSide, peer: ConnectSide): boolean {
  return self.node > peer.node;
}

const DISK_RANK: Record<DiskState, number> = { Failed: 0, Diskless: 1, Inconsistent: 2, Outdated: 3, UpToDate: 4 };

/**
 * `blank`'s disk failed (its record says so, or `other` saw it fail) and `other` has good data. At one
 * generation a peer that saw it fail has every write it had, and maybe more: Outdated since (a witness's
 * mark) or not, that peer is the better copy.
 */
function failedFacing(blank: ConnectSide, other: ConnectSide, sameGeneration = false): boolean {
  // A disk `blank` saw fail itself is no better (both failed: nobody has good data).
  if (seenFailed(other, blank)) return false;
  if (other.disk !== 'UpToDate' && !(sameGeneration && other.disk === 'Outdated' && seenFailed(blank, other))) return false;
  return (blank.fullSyncNeeded && blank.disk === 'Inconsistent') || (seenFailed(blank, other) && blank.role === 'Secondary');
}

/** `by` saw `disk` fail (it recorded peerDiskFailed), and that disk has not been written since (it claims the same generation). */
function seenFailed(disk: ConnectSide, by: ConnectSide): boolean {
  if (!by.peerDiskFailed) return false;
  // Not known (a record from before the field). NO_GI is known: a new disk, which claims a generation only once written.
  if (by.peerDiskFailedGi === undefined || by.peerDiskFailedGi === disk.gi.current) return true;
  return disk.gi.current !== NO_GI && (by.peerDiskFailedFrom ?? []).includes(disk.gi.current);
}

function hasDisk(side: ConnectSide): boolean {
  return side.disk !== 'Diskless' && side.disk !== 'Failed';
}

/** The whole decision, from `self`'s side. */
export function decideConnect(self: ConnectSide, peer: ConnectSide, policy: ConnectPolicy): ConnectAction {
  if (self.dataBytes !== peer.dataBytes) {
    return refuse('size', `the disks differ in size (${self.dataBytes} bytes of data on ${self.node}, ${peer.dataBytes} on ${peer.node}): give both nodes disks of the same size`, false);
  }
  const bothPrimary = self.role === 'Primary' && peer.role === 'Primary' && !policy.allowTwoPrimaries;
  // Without a disk on one side there is nothing to compare: the diskless side works through the other.
  if (!hasDisk(self) || !hasDisk(peer)) {
    if (bothPrimary) return refuse('both-primary', 'both nodes are Primary: make one Secondary', true);
    // A node without a disk that saw its peer's disk fail (and never gave it a full sync since) knows that
    // disk lacks writes its own disk took: working through it would serve old data as current, and make it
    // the keeper of a new generation. Its own disk has the data: it must come back, or an admin goes on
    // from the peer's with --force (DRBD: a Diskless node needs an UpToDate peer, and that disk is not).
    for (const [diskless, other] of [[self, peer], [peer, self]] as const) {
      if (!hasDisk(diskless) && hasDisk(other) && seenFailed(other, diskless)) {
        return refuse('stale-peer-disk', `${other.node}'s disk failed (${diskless.node} saw it) and lacks writes made since, and ${diskless.node} has no disk: attach ${diskless.node}'s disk again, or make ${other.node} Primary with --force to go on from its older data`, true);
      }
    }
    // A Primary without a disk serves the peer's data: only the very data it was serving (DRBD: "Can only
    // connect to data with current UUID").
    for (const [diskless, other] of [[self, peer], [peer, self]] as const) {
      if (diskless.role === 'Primary' && !hasDisk(diskless) && hasDisk(other) && diskless.gi.current !== other.gi.current) {
        return refuse('diskless-primary', `${diskless.node} is Primary without a disk and ${other.node} holds other data (generation ${other.gi.current}, not ${diskless.gi.current}): make ${diskless.node} Secondary first`, true);
      }
    }
    return { kind: 'connected', rule: 'diskless', why: `${hasDisk(self) ? peer.node : self.node} has no disk` };
  }
  const v = verdict(self, peer);
  // DUET: a disk that must be overwritten whole (a failed disk attached again) has nothing to compare:
  // its generations are those it failed with, and the peer may have moved on past its history since.
  // Facing a disk with good data it gets a full sync, as a new disk does (rules 20/30).
  // Likewise a disk its peer saw fail (peerDiskFailed there) when it could not be marked Failed itself:
  // it comes back claiming its old generation, which the peer may have left behind by now, or still
  // hold (with a witness the peer starts its generation only once that disk is outdated there): then
  // too it is overwritten whole, never the source of a crashed Primary's extents (rules 40/41).
  // Only when exactly one side is that disk (both claiming it of each other is no answer).
  // And after a split brain: the failed disk's own branch (written while apart, before it failed) was left
  // when its node went on Diskless through the peer, whose data its users then saw: the peer's data stays,
  // with no admin needed. The failed disk's changes are saved first, as any split-brain loser's are.
  const sameGeneration = self.gi.current !== NO_GI && self.gi.current === peer.gi.current && Math.abs(v.hg) <= 1;
  const diverged = Math.abs(v.hg) === 100;
  const failedSelf = failedFacing(self, peer, sameGeneration);
  if ((v.hg === -1000 || sameGeneration || diverged) && failedSelf !== failedFacing(peer, self, sameGeneration)) {
    const [blank, other, hg] = failedSelf ? [self, peer, -2] : [peer, self, 2];
    if (bothPrimary) return refuse('both-primary', 'both nodes are Primary: make one Secondary', true);
    if (blank.role === 'Primary' && !policy.allowTwoPrimaries) {
      return refuse('primary-target', `${blank.node} is Primary and would become sync target of ${other.node} (its disk failed and needs a full sync): make ${blank.node} Secondary (resource secondary) and the resync runs`, true);
    }
    if (blank.inUse) return refuse('in-use', `${blank.node} would become sync target of ${other.node} but its data is in use (a pool is open there): close it first`, true);
    if (diverged) {
      const resolution = `${blank.node}'s disk failed (${other.node} saw it fail): kept ${other.node}'s data, the data ${blank.node} served since`;
      const splitBrain: SplitBrainFound = { common: v.common ?? NO_GI, localChangedBytes: self.outOfSyncBytes, peerChangedBytes: peer.outOfSyncBytes, resolution, failedDisk: blank.node };
      return sync(hg > 0 ? 'source' : 'target', true, `${v.rule}/split-brain/failed-disk`, `full resync: split brain, ${resolution}`, splitBrain);
    }
    return sync(hg > 0 ? 'source' : 'target', true, v.hg === -1000 ? '1000/full-sync-needed' : `${v.rule}/peer-disk-failed`, `full resync: ${blank.node}'s disk failed and must be overwritten whole`);
  }
  if (v.hg === -1000 && (self.fullSyncNeeded || peer.fullSyncNeeded) && DISK_RANK[self.disk] <= DISK_RANK.Inconsistent && DISK_RANK[peer.disk] <= DISK_RANK.Inconsistent) {
    // Both disks failed (or are new): no generation to compare and no good data on either side.
    return refuse('inconsistent-source', `nobody has good data: the disks of ${self.node} and ${peer.node} are both ${self.disk === peer.disk ? self.disk : `${self.disk} and ${peer.disk}`}: promote the better copy with --force`, true);
  }
  if (v.hg === -1000) {
    return refuse('unrelated', `${peer.node} holds unrelated data (no common generation): check the disks; to replace one node's data, give it a new disk (resource create-md)`, false);
  }
  let hg = v.hg;
  let rule = `${v.rule}`;
  // An Inconsistent disk facing a better one is the target, whatever the generations say.
  if ((self.disk === 'Inconsistent' && DISK_RANK[peer.disk] > DISK_RANK.Inconsistent) || (peer.disk === 'Inconsistent' && DISK_RANK[self.disk] > DISK_RANK.Inconsistent)) {
    const full = hg === -100 || Math.abs(hg) === 2;
    hg = (DISK_RANK[self.disk] > DISK_RANK.Inconsistent ? 1 : -1) * (full ? 2 : 1);
    rule += '/disk-states';
  }
  let splitBrain: SplitBrainFound | undefined;
  if (Math.abs(hg) === 100) {
    splitBrain = { common: v.common ?? NO_GI, localChangedBytes: self.outOfSyncBytes, peerChangedBytes: peer.outOfSyncBytes, resolution: null };
    const resolved = resolveSplitBrain(self, peer, policy, hg === 100, splitBrain.common);
    if (resolved.hg === 0) {
      return { kind: 'split-brain', rule: `${rule}/split-brain`, why: resolved.why, splitBrain };
    }
    // DUET: the bitmaps reach back to the common generation only when it is the bitmap generation of
    // both (rule 90); further back (rule 100, or 41) every block goes. DRBD syncs the bitmap after a
    // manual resolution of -100.
    hg = resolved.hg * (hg === 100 ? 1 : 2);
    splitBrain.resolution = resolved.why;
    rule += `/split-brain/${resolved.how}`;
  }
  if (hg === 0 && v.rule !== 10 && (self.outOfSyncBytes > 0 || peer.outOfSyncBytes > 0)) {
    // DUET: same generation, no crash, yet blocks are marked (online verify found them, or a peer write
    // failed): DRBD leaves them until the next generation; duet resyncs them now, from the Primary if
    // there is one, else from the side that marked blocks (a Primary whose fence failed keeps the marks of
    // writes its peer may have lost with its cache: that peer's copy of them is the old one), else from
    // the node whose name sorts first.
    const marked = (self.outOfSyncBytes > 0 ? 1 : 0) - (peer.outOfSyncBytes > 0 ? 1 : 0);
    hg = self.role !== peer.role ? (self.role === 'Primary' ? 1 : -1) : marked !== 0 ? marked : isResolver(self, peer) ? -1 : 1;
    rule += '/marks';
  }
  if (bothPrimary) return refuse('both-primary', 'both nodes are Primary: make one Secondary', true);
  if (hg === 0 && v.rule !== 10 && self.disk === 'Inconsistent' && peer.disk === 'Inconsistent') {
    // DUET: the same generation on two Inconsistent disks (both failed, or a resync's target facing a source
    // whose disk failed) is not "in sync": neither copy is good, and nothing would ever resync them.
    return refuse('inconsistent-source', `nobody has good data: the disks of ${self.node} and ${peer.node} are both Inconsistent: promote the better copy with --force`, true);
  }
  if (hg === 0) return { kind: 'connected', rule, why: v.rule === 10 ? 'both disks are new: promote one with --force to start the initial sync' : 'in sync' };
  const source = hg > 0 ? self : peer;
  const target = hg > 0 ? peer : self;
  if (DISK_RANK[source.disk] <= DISK_RANK.Inconsistent) {
    return refuse('inconsistent-source', `${source.node} would be the sync source but its disk is ${source.disk}: nobody has good data for ${target.node}`, true);
  }
  // A disk its peer saw fail lacks what was written since (whatever its own record says): never a source.
  // (The peer's disk, if it were good, would have been the source above; it failed too, or is new.)
  if (seenFailed(source, target)) {
    return refuse('inconsistent-source', `nobody has good data: ${source.node}'s disk failed (${target.node} saw it) and lacks writes made since, and ${target.node}'s disk is ${target.disk}: promote the better copy with --force`, true);
  }
  // DRBD's "I shall become SyncTarget, but I am primary!": a resync would change data under the Primary's users.
  if (target.role === 'Primary' && !policy.allowTwoPrimaries) {
    return refuse('primary-target', `${target.node} is Primary and would become sync target of ${source.node} (${source.node} has newer data): make ${target.node} Secondary (resource secondary) and the resync runs`, true);
  }
  if (target.inUse) {
    return refuse('in-use', `${target.node} would become sync target of ${source.node} but its data is in use (a pool is open there): close it first`, true);
  }
  // A disk that must be overwritten whole (new or failed) gets every block, whatever the bitmaps say.
  const full = Math.abs(hg) >= 2 || target.fullSyncNeeded || source.peerDiskFailed;
  return sync(hg > 0 ? 'source' : 'target', full, rule, describeRule(rule, hg, full), splitBrain);
}

function sync(direction: 'source' | 'target', full: boolean, rule: string, why: string, splitBrain?: SplitBrainFound): ConnectAction {
  return splitBrain ? { kind: 'sync', rule, direction, full, why, splitBrain } : { kind: 'sync', rule, direction, full, why };
}

function refuse(rule: string, reason: string, retry: boolean): ConnectAction {
  return { kind: 'refuse', rule, reason, retry };
}

/**
 * Who keeps their data after a split brain: the admin's `--keep` first,
 * then the policy (DRBD's after-sb-0pri, with its fall-throughs), with
 * DRBD's after-sb-1pri "consensus" (a Primary is never overwritten: the
 * policy may only discard a Secondary) and after-sb-2pri "disconnect".
 * A policy applies only to hg 100 (both bitmaps start at the common
 * generation); -100 is for an admin to resolve. hg 0 = unresolved.
 */
function resolveSplitBrain(self: ConnectSide, peer: ConnectSide, policy: ConnectPolicy, automatic: boolean, common: string): { hg: number; how: string; why: string } {
  if (self.keep !== undefined && peer.keep !== undefined && self.keep !== peer.keep) {
    return { hg: 0, how: 'keep', why: `split brain: resolve was asked to keep ${self.keep} on ${self.node} and ${peer.keep} on ${peer.node}: ask for one` };
  }
  const keep = self.keep ?? peer.keep;
  const primaries = (self.role === 'Primary' ? 1 : 0) + (peer.role === 'Primary' ? 1 : 0);
  const unresolved = `split brain: both nodes changed data since generation ${common}; resolve with: duet resource resolve ${policy.resource} --keep NODE`;
  let hg = 0;
  let how = 'keep';
  if (keep === self.node) hg = 1;
  else if (keep === peer.node) hg = -1;
  else if (automatic && primaries < 2) {
    how = policy.afterSplitBrain;
    hg = afterSb0p(self, peer, policy.afterSplitBrain);
  }
  if (hg === 0) return { hg: 0, how, why: unresolved };
  // A Primary keeps serving its data: it is never the side that gets overwritten.
  const loser = hg > 0 ? peer : self;
  if (loser.role === 'Primary') return { hg: 0, how, why: `split brain: resolving it would overwrite the data of ${loser.node}, which is Primary: make it Secondary first` };
  const winner = hg > 0 ? self : peer;
  return { hg, how, why: how === 'keep' ? `kept ${winner.node}'s data (resolve --keep)` : `kept ${winner.node}'s data (after-split-brain: ${how})` };
}

/**
 * DRBD's drbd_asb_recover_0p for duet's policies, with its fall-throughs:
 * younger-primary without an answer tries zero-changes, which (for the
 * other policies) tries least-changes; ties go against the resolver.
 * DUET: "younger" compares promotion times (DRBD: the bitmap UUID's
 * primary bit).
 */
function afterSb0p(self: ConnectSide, peer: ConnectSide, policy: SplitBrainPolicy): number {
  if (policy === 'disconnect') return 0;
  const tie = isResolver(self, peer) ? -1 : 1;
  const chSelf = self.outOfSyncBytes;
  const chPeer = peer.outOfSyncBytes;
  if (policy === 'discard-younger-primary' && self.primarySince !== peer.primarySince) return self.primarySince > peer.primarySince ? -1 : 1;
  if (policy !== 'discard-least-changes') {
    if (chSelf === 0 && chPeer === 0) return tie;
    if (chPeer === 0) return 1;
    if (chSelf === 0) return -1;
    if (policy === 'discard-zero-changes') return 0;
  }
  if (chSelf !== chPeer) return chSelf < chPeer ? -1 : 1;
  return tie;
}

function describeRule(rule: string, hg: number, full: boolean): string {
  const kind = full ? 'full' : 'bitmap';
  if (rule.includes('split-brain')) return `split brain resolved: ${kind} resync`;
  if (rule.endsWith('/marks')) return 'same generation, blocks marked out of sync';
  if (rule.includes('disk-states')) return `${kind} resync: ${hg > 0 ? 'the peer' : 'this node'} has an Inconsistent disk`;
  switch (Number.parseInt(rule, 10)) {
    case 20:
      return 'this node has a new disk';
    case 30:
      return 'the peer has a new disk';
    case 34:
    case 35:
    case 36:
    case 37:
      return `a resync's end was not recorded on ${hg > 0 ? 'the peer' : 'this node'}: resync again from the bitmap`;
    case 40:
    case 41:
      return `${hg > 0 ? 'this node' : 'the peer'} ${rule.startsWith('41') ? 'is Primary' : 'was Primary when it crashed'}: its hot extents resync`;
    case 50:
      return 'the peer changed data while this node was away';
    case 53:
    case 73:
      return `a resync ${hg > 0 ? 'to the peer' : 'from the peer'} resumes from the bitmaps`;
    case 70:
      return 'this node changed data while the peer was away';
    case 60:
      return 'the peer is generations ahead';
    case 80:
      return 'this node is generations ahead';
    default:
      return `${kind} resync as ${hg > 0 ? 'source' : 'target'}`;
  }
}

/** The peer's view of the same connection (what `decideConnect(peer, self)` must return). */
export function mirrorAction(a: ConnectAction): ConnectAction {
  if (a.kind === 'connected' || a.kind === 'refuse') return a;
  const splitBrain = a.splitBrain && { ...a.splitBrain, localChangedBytes: a.splitBrain.peerChangedBytes, peerChangedBytes: a.splitBrain.localChangedBytes };
  if (a.kind === 'split-brain') return { ...a, splitBrain: splitBrain! };
  const direction = a.direction === 'source' ? 'target' : 'source';
  return splitBrain ? { ...a, direction, splitBrain } : { ...a, direction };
}
