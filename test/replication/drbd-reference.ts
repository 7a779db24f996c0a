/**
 * Test oracle: DRBD 8.4's decision when two nodes connect, ported from
 * drivers/block/drbd/drbd_receiver.c of the Linux kernel (DRBD 8.4, the
 * in-tree driver): drbd_uuid_compare(), the part of drbd_sync_handshake()
 * that turns its result into an action, and drbd_asb_recover_0p/1p/2p().
 * Each branch carries the C it mirrors. Pure: no I/O, no clock, no
 * randomness; DRBD's corrections of the UUIDs (rules 34, 35, 51, 71) are
 * not written anywhere, only reported in `log`.
 *
 * What is deliberately NOT ported (and what is assumed instead):
 * - Protocol-version branches: the peer is new (agreed_pro_version >= 101,
 *   DRBD_FF_WSAME agreed), so the `-1091` (needs protocol 91) and
 *   `-(0x10000 | ...)` (needs feature flags) returns never happen, and rules
 *   51/71 use the protocol-96 test `history[0] + UUID_NEW_BM_OFFSET == bitmap`,
 *   not the older `history[0] == peer history[1]` one.
 * - Handlers (drbd_khelper "initial-split-brain", "split-brain", "pri-lost",
 *   "pri-lost-after-sb") and the policies that run them (after-sb-*pri
 *   call-pri-lost-after-sb, rr-conflict call-pri-lost); rr-conflict is
 *   DRBD's default, disconnect.
 * - after-sb-0pri discard-local / discard-remote: one option set is used for
 *   both sides here, and receive_protocol() refuses those unless the two
 *   sides are configured as mirror images of each other.
 * - Dry-run connect (--tentative), and what happens after the decision
 *   (bitmap exchange, "No resync, but N bits in bitmap!").
 * - receive_uuids()'s check of a Diskless Primary ("Can only connect to data
 *   with current UUID=..."): duet's side carries no effective-data UUID.
 *
 * Mapping of duet's inputs (see `Side`):
 * - GenerationIds -> md.uuid[]: current -> UI_CURRENT, bitmap -> UI_BITMAP,
 *   history -> UI_HISTORY_START..END. A GI is a hex string read as the u64
 *   it spells; NO_GI ('0') is 0, except that a current of NO_GI is
 *   UUID_JUST_CREATED (4), a new disk. DRBD masks the lowest bit (its "role
 *   was Primary" bit) in every comparison: so does this port. duet's random
 *   GIs carry no such bit; the two facts DRBD reads from it come in as
 *   `crashedPrimary` (CRASHED_PRIMARY and uuid flag 2) and `primaryAtSplit`
 *   (UI_BITMAP & 1, read by discard-younger/older-primary).
 * - disk: duet's names are DRBD's; duet has no Consistent (an UpToDate disk
 *   not known to be the newest), UpToDate stands for both. Diskless and
 *   Failed (< D_NEGOTIATING) mean no sync handshake at all.
 * - changedBytes -> comm_bm_set / p_uuid[UI_SIZE] (bitmap weight; only
 *   compared with each other and with 0, so bytes or bits alike).
 * - keep (a node name, duet's `resource resolve --keep`) -> DRBD's
 *   discard-my-data on every node whose name is not the kept one.
 * - RESOLVE_CONFLICTS (DRBD sets it on exactly one end of a connection) is
 *   held by the node whose name sorts last (JavaScript `>` on the names).
 * - duet's after-split-brain -> after-sb-0pri of the same name;
 *   after-sb-1pri consensus and after-sb-2pri disconnect (see
 *   `drbdPoliciesFor` for why).
 */
import { DiskState, GenerationIds, Gi, NO_GI } from '../../src/replication/meta.js';
import type { SplitBrainPolicy } from '../../src/replication/resource.js';
import type { Role } from '../../src/replication/wire.js';

/** One node as DRBD's handshake sees it (itself, or the peer from the P_UUIDS and P_STATE packets). */
export interface Side {
  node: string;
  role: Role;
  disk: DiskState;
  gi: GenerationIds;
  /** Was Primary when it went down uncleanly (DRBD's CRASHED_PRIMARY flag, sent as uuid flag 2). */
  crashedPrimary: boolean;
  /** Bitmap weight: what this node changed that the peer does not have (comm_bm_set / p_uuid[UI_SIZE]). */
  changedBytes: number;
  /** When this node last became Primary (ms; 0 never). Stands in for `primaryAtSplit` when that is not given. */
  primarySince: number;
  /** A manual resolution asked on this node: the node whose data stays (duet's resolve --keep). */
  keep?: string;
  /**
   * DRBD's UI_BITMAP & 1: this node was Primary when its bitmap UUID was
   * made, i.e. when it split from the peer (it is the older Primary).
   * Leave it out to derive it from `primarySince` (see `primaryBit`).
   */
  primaryAtSplit?: boolean;
}

/** DRBD's after-sb-0pri values ported here (enum drbd_after_sb_p). */
export type AfterSb0p = 'disconnect' | 'discard-zero-changes' | 'discard-least-changes' | 'discard-younger-primary' | 'discard-older-primary';
/** after-sb-1pri values ported here. */
export type AfterSb1p = 'disconnect' | 'consensus' | 'discard-secondary' | 'violently-as0p';
/** after-sb-2pri values ported here. */
export type AfterSb2p = 'disconnect' | 'violently-as0p';

export interface DrbdOptions {
  afterSb0p: AfterSb0p;
  afterSb1p: AfterSb1p;
  afterSb2p: AfterSb2p;
  /** always-asbp: run the after-split-brain policies also when the UUIDs are ambiguous (-100), with a full sync. */
  alwaysAsbp?: boolean;
  /** allow-two-primaries (net option); off by default as in DRBD. */
  allowTwoPrimaries?: boolean;
}

export type ConnectOptions = { afterSplitBrain: SplitBrainPolicy } & Partial<DrbdOptions>;

/**
 * duet's one `after-split-brain` setting as DRBD's three. 0pri takes the
 * same name. With one Primary, DRBD's "consensus": the 0pri policy decides,
 * and its decision stands only if it discards the Secondary (so a Primary
 * is never overwritten, and `disconnect` stays disconnect). Not
 * discard-secondary: it would discard the Secondary's changes even under
 * after-split-brain=disconnect, whatever the 0pri policy says. With two
 * Primaries: disconnect (DRBD's default; the only safe choice).
 */
export function drbdPoliciesFor(policy: SplitBrainPolicy): DrbdOptions {
  return { afterSb0p: policy, afterSb1p: 'consensus', afterSb2p: 'disconnect' };
}

export type DrbdAction =
  /** C_CONNECTED: same data, no resync. */
  | { kind: 'in-sync' }
  /** C_WF_BITMAP_S / C_WF_BITMAP_T; `full` when |hg| >= 2 (drbd_bmio_set_n_write: every bit set). */
  | { kind: 'sync'; direction: 'source' | 'target'; full: boolean }
  /** "Split-Brain detected but unresolved, dropping connection!" */
  | { kind: 'split-brain-unresolved' }
  /** "Unrelated data, aborting!" */
  | { kind: 'unrelated' }
  /** Any other refusal; `reason` is DRBD's message. */
  | { kind: 'refuse'; reason: string }
  /** No sync handshake: a side has no disk (receive_state() calls drbd_sync_handshake() only when both are >= D_NEGOTIATING). Not in duet's list: C_CONNECTED with a diskless side. */
  | { kind: 'diskless' };

export interface DrbdResult {
  /** rule_nr of drbd_uuid_compare() (0 when it did not run). */
  rule: number;
  /** What drbd_uuid_compare() returned. */
  compareHg: number;
  /** hg after disk states, split-brain recovery and discard-my-data (what drbd_sync_handshake() acts on). */
  hg: number;
  action: DrbdAction;
  /** Set when an after-sb policy or discard-my-data settled a split brain (the sync discards the target's changes). */
  resolvedBy?: 'after-sb-0pri' | 'after-sb-1pri' | 'after-sb-2pri' | 'discard-my-data';
  /** DRBD's log lines in order (drbd_info/warn/err/alert texts). */
  log: string[];
}

/* ------------------------------------------------------------------ UUIDs */

/** UUID_JUST_CREATED in drbd_int.h: the current UUID of freshly created meta data. */
export const UUID_JUST_CREATED = 4n;
/** UUID_NEW_BM_OFFSET in drbd_int.h: a sync source's new bitmap UUID is its old one plus this. */
export const UUID_NEW_BM_OFFSET = 0x0001000000000000n;
const U64 = (1n << 64n) - 1n;
const LOW_BIT = ~1n & U64;

/** A GI as DRBD's u64 (hex digits; NO_GI is 0). */
export function uuidOf(gi: Gi): bigint {
  if (!/^[0-9a-f]{1,16}$/i.test(gi)) throw new Error(`drbd-reference: generation id ${JSON.stringify(gi)} is not up to 16 hex digits`);
  return BigInt(`0x${gi}`);
}

/** The GI spelling of a u64 (16 hex digits; 0 is NO_GI): for tests that build sync UUIDs. */
export function giOf(u: bigint): Gi {
  return u === 0n ? NO_GI : (u & U64).toString(16).padStart(16, '0');
}

/** history[0] + UUID_NEW_BM_OFFSET, as a GI: the bitmap UUID drbd_gen_and_send_sync_uuid() makes from `gi`. */
export function plusNewBmOffset(gi: Gi): Gi {
  return giOf((uuidOf(gi) + UUID_NEW_BM_OFFSET) & U64);
}

/** md.uuid[] of one side: [UI_CURRENT, UI_BITMAP, UI_HISTORY_START, UI_HISTORY_END]. */
interface Uuids {
  current: bigint;
  bitmap: bigint;
  history: [bigint, bigint];
}

function uuidsOf(gi: GenerationIds): Uuids {
  return {
    current: gi.current === NO_GI ? UUID_JUST_CREATED : uuidOf(gi.current),
    bitmap: uuidOf(gi.bitmap),
    history: [uuidOf(gi.history[0]), uuidOf(gi.history[1])],
  };
}

/* ------------------------------------------------------- drbd_uuid_compare */

/*
  From drbd_receiver.c, above drbd_uuid_compare():
  100   after split brain try auto recover
    2   C_SYNC_SOURCE set BitMap
    1   C_SYNC_SOURCE use BitMap
    0   no Sync
   -1   C_SYNC_TARGET use BitMap
   -2   C_SYNC_TARGET set BitMap
 -100   after split brain, disconnect
-1000   unrelated data
 */
interface Compared {
  hg: number;
  rule: number;
}

function uuidCompare(me: Side, peerSide: Side, resolveConflicts: boolean, log: string[]): Compared {
  const md = uuidsOf(me.gi);
  const p = uuidsOf(peerSide.gi);
  const m = (u: bigint): bigint => u & LOW_BIT;

  // self = device->ldev->md.uuid[UI_CURRENT] & ~((u64)1);
  // peer = device->p_uuid[UI_CURRENT] & ~((u64)1);
  let self = m(md.current);
  let peer = m(p.current);

  // *rule_nr = 10;
  // if (self == UUID_JUST_CREATED && peer == UUID_JUST_CREATED) return 0;
  if (self === UUID_JUST_CREATED && peer === UUID_JUST_CREATED) return { hg: 0, rule: 10 };

  // *rule_nr = 20;
  // if ((self == UUID_JUST_CREATED || self == (u64)0) && peer != UUID_JUST_CREATED) return -2;
  if ((self === UUID_JUST_CREATED || self === 0n) && peer !== UUID_JUST_CREATED) return { hg: -2, rule: 20 };

  // *rule_nr = 30;
  // if (self != UUID_JUST_CREATED && (peer == UUID_JUST_CREATED || peer == (u64)0)) return 2;
  if (self !== UUID_JUST_CREATED && (peer === UUID_JUST_CREATED || peer === 0n)) return { hg: 2, rule: 30 };

  if (self === peer) {
    // if (device->p_uuid[UI_BITMAP] == (u64)0 && device->ldev->md.uuid[UI_BITMAP] != (u64)0) {
    //   (agreed_pro_version < 91: return -1091 -- skipped, new peer)
    if (p.bitmap === 0n && md.bitmap !== 0n) {
      // if ((md.uuid[UI_BITMAP] & ~1) == (p_uuid[UI_HISTORY_START] & ~1) &&
      //     (md.uuid[UI_HISTORY_START] & ~1) == (p_uuid[UI_HISTORY_START + 1] & ~1)) {
      if (m(md.bitmap) === m(p.history[0]) && m(md.history[0]) === m(p.history[1])) {
        // drbd_info(device, "was SyncSource, missed the resync finished event, corrected myself:\n");
        // drbd_uuid_move_history(device); md.uuid[UI_HISTORY_START] = md.uuid[UI_BITMAP]; md.uuid[UI_BITMAP] = 0;
        log.push('was SyncSource, missed the resync finished event, corrected myself:');
        // *rule_nr = 34;
        return { hg: 1, rule: 34 };
      }
      // drbd_info(device, "was SyncSource (peer failed to write sync_uuid)\n"); *rule_nr = 36;
      log.push('was SyncSource (peer failed to write sync_uuid)');
      return { hg: 1, rule: 36 };
    }

    // if (device->ldev->md.uuid[UI_BITMAP] == (u64)0 && device->p_uuid[UI_BITMAP] != (u64)0) {
    if (md.bitmap === 0n && p.bitmap !== 0n) {
      // if ((md.uuid[UI_HISTORY_START] & ~1) == (p_uuid[UI_BITMAP] & ~1) &&
      //     (md.uuid[UI_HISTORY_START + 1] & ~1) == (p_uuid[UI_HISTORY_START] & ~1)) {
      if (m(md.history[0]) === m(p.bitmap) && m(md.history[1]) === m(p.history[0])) {
        // drbd_info(device, "was SyncTarget, peer missed the resync finished event, corrected peer:\n");
        // (p_uuid[UI_HISTORY_START + 1] = p_uuid[UI_HISTORY_START]; p_uuid[UI_HISTORY_START] = p_uuid[UI_BITMAP]; p_uuid[UI_BITMAP] = 0)
        log.push('was SyncTarget, peer missed the resync finished event, corrected peer:');
        // *rule_nr = 35;
        return { hg: -1, rule: 35 };
      }
      // drbd_info(device, "was SyncTarget (failed to write sync_uuid)\n"); *rule_nr = 37;
      log.push('was SyncTarget (failed to write sync_uuid)');
      return { hg: -1, rule: 37 };
    }

    /* Common power [off|failure] */
    // rct = (test_bit(CRASHED_PRIMARY, &device->flags) ? 1 : 0) + (device->p_uuid[UI_FLAGS] & 2);
    /* lowest bit is set when we were primary, next bit (weight 2) is set when peer was primary */
    const rct = (me.crashedPrimary ? 1 : 0) + (peerSide.crashedPrimary ? 2 : 0);
    // *rule_nr = 40;
    /* Neither has the "crashed primary" flag set, only a replication link hickup. */
    // if (rct == 0) return 0;
    if (rct === 0) return { hg: 0, rule: 40 };

    /* Current UUID equal and no bitmap uuid; does not necessarily mean this was a
     * "simultaneous hard crash", maybe IO was frozen, so no UUID-bump happened. */
    // if (device->state.role == R_PRIMARY || peer_role == R_PRIMARY) {
    if (me.role === 'Primary' || peerSide.role === 'Primary') {
      // *rule_nr = 41;
      // (!(connection->agreed_features & DRBD_FF_WSAME): "Equivalent unrotated UUIDs, but current
      //  primary present." return -(0x10000 | ...) -- skipped, new peer)
      // if (device->state.role == R_PRIMARY && peer_role == R_PRIMARY) {
      if (me.role === 'Primary' && peerSide.role === 'Primary') {
        // drbd_err(peer_device, "Equivalent unrotated UUIDs, but both are primary. Can not resolve this.\n");
        log.push('Equivalent unrotated UUIDs, but both are primary. Can not resolve this.');
        return { hg: -100, rule: 41 };
      }
      // if (device->state.role == R_PRIMARY) return 1; return -1;
      return { hg: me.role === 'Primary' ? 1 : -1, rule: 41 };
    }

    /* Both are secondary. Really looks like recovery from simultaneous hard crash.
     * Check which had been primary before, and arbitrate. */
    switch (rct) {
      case 1: /*  self_pri && !peer_pri */
        return { hg: 1, rule: 40 };
      case 2: /* !self_pri &&  peer_pri */
        return { hg: -1, rule: 40 };
      default: /*  self_pri &&  peer_pri */
        // dc = test_bit(RESOLVE_CONFLICTS, &connection->flags); return dc ? -1 : 1;
        return { hg: resolveConflicts ? -1 : 1, rule: 40 };
    }
  }

  // *rule_nr = 50;
  // peer = device->p_uuid[UI_BITMAP] & ~((u64)1); if (self == peer) return -1;
  peer = m(p.bitmap);
  if (self === peer) return { hg: -1, rule: 50 };

  // *rule_nr = 51;
  // peer = device->p_uuid[UI_HISTORY_START] & ~((u64)1);
  peer = m(p.history[0]);
  if (self === peer) {
    // (agreed_pro_version >= 96:) peer + UUID_NEW_BM_OFFSET == (device->p_uuid[UI_BITMAP] & ~((u64)1))
    if (((peer + UUID_NEW_BM_OFFSET) & U64) === m(p.bitmap)) {
      /* The last P_SYNC_UUID did not get though. Undo the last start of
         resync as sync source modifications of the peer's UUIDs. */
      // p_uuid[UI_BITMAP] = p_uuid[UI_HISTORY_START]; p_uuid[UI_HISTORY_START] = p_uuid[UI_HISTORY_START + 1];
      // drbd_info(device, "Lost last syncUUID packet, corrected:\n");
      log.push('Lost last syncUUID packet, corrected:');
      return { hg: -1, rule: 51 };
    }
  }

  // *rule_nr = 60;
  // self = md.uuid[UI_CURRENT] & ~1; for (i = UI_HISTORY_START; i <= UI_HISTORY_END; i++) { peer = p_uuid[i] & ~1; if (self == peer) return -2; }
  self = m(md.current);
  for (const h of p.history) {
    if (self === m(h)) return { hg: -2, rule: 60 };
  }

  // *rule_nr = 70;
  // self = md.uuid[UI_BITMAP] & ~1; peer = p_uuid[UI_CURRENT] & ~1; if (self == peer) return 1;
  self = m(md.bitmap);
  peer = m(p.current);
  if (self === peer) return { hg: 1, rule: 70 };

  // *rule_nr = 71;
  // self = md.uuid[UI_HISTORY_START] & ~((u64)1);
  self = m(md.history[0]);
  if (self === peer) {
    // (agreed_pro_version >= 96:) self + UUID_NEW_BM_OFFSET == (md.uuid[UI_BITMAP] & ~((u64)1))
    if (((self + UUID_NEW_BM_OFFSET) & U64) === m(md.bitmap)) {
      /* The last P_SYNC_UUID did not get though. Undo the last start of
         resync as sync source modifications of our UUIDs. */
      // __drbd_uuid_set(device, UI_BITMAP, md.uuid[UI_HISTORY_START]);
      // __drbd_uuid_set(device, UI_HISTORY_START, md.uuid[UI_HISTORY_START + 1]);
      // drbd_info(device, "Last syncUUID did not get through, corrected:\n");
      log.push('Last syncUUID did not get through, corrected:');
      return { hg: 1, rule: 71 };
    }
  }

  // *rule_nr = 80;
  // peer = p_uuid[UI_CURRENT] & ~1; for (i = UI_HISTORY_START; i <= UI_HISTORY_END; i++) { self = md.uuid[i] & ~1; if (self == peer) return 2; }
  peer = m(p.current);
  for (const h of md.history) {
    if (m(h) === peer) return { hg: 2, rule: 80 };
  }

  // *rule_nr = 90;
  // self = md.uuid[UI_BITMAP] & ~1; peer = p_uuid[UI_BITMAP] & ~1; if (self == peer && self != ((u64)0)) return 100;
  self = m(md.bitmap);
  peer = m(p.bitmap);
  if (self === peer && self !== 0n) return { hg: 100, rule: 90 };

  // *rule_nr = 100;
  // for (i = UI_HISTORY_START; i <= UI_HISTORY_END; i++) { self = md.uuid[i] & ~1;
  //   for (j = UI_HISTORY_START; j <= UI_HISTORY_END; j++) { peer = p_uuid[j] & ~1; if (self == peer) return -100; } }
  // NB: no test for 0 here: an empty history slot on each side is a match.
  for (const hs of md.history) {
    for (const hp of p.history) {
      if (m(hs) === m(hp)) return { hg: -100, rule: 100 };
    }
  }

  // return -1000;
  return { hg: -1000, rule: 100 };
}

/* ------------------------------------------------- after split brain (asb) */

/**
 * DRBD's `self = md.uuid[UI_BITMAP] & 1` for `side`: was it Primary when
 * it split from `other`? Given as `primaryAtSplit`, or else derived from
 * the promotion times: the side that became Primary first is the one that
 * was Primary at the split, the other was promoted after it. Exact when
 * one side was Primary at the split and the other was promoted later (the
 * common case); where both or neither were Primary at the split, DRBD sees
 * equal bits and falls through to discard-least-changes, while this
 * derivation picks the later promotion as the younger.
 */
export function primaryBit(side: Side, other: Side): 0 | 1 {
  if (side.primaryAtSplit !== undefined) return side.primaryAtSplit ? 1 : 0;
  if (side.primarySince === 0) return 0;
  if (other.primarySince === 0) return 1;
  return side.primarySince < other.primarySince ? 1 : 0;
}

/* drbd_asb_recover_0p  -  Recover after split-brain with no remaining primaries */
function asbRecover0p(me: Side, peerSide: Side, policy: AfterSb0p, resolveConflicts: boolean, log: string[]): number {
  // self = device->ldev->md.uuid[UI_BITMAP] & 1; peer = device->p_uuid[UI_BITMAP] & 1;
  const self = primaryBit(me, peerSide);
  const peer = primaryBit(peerSide, me);
  // ch_peer = device->p_uuid[UI_SIZE]; ch_self = device->comm_bm_set;
  const chPeer = peerSide.changedBytes;
  const chSelf = me.changedBytes;
  // The C switch falls through from case to case; each block below is one case label, in order.
  let step: AfterSb0p | 'zero' | 'least' = policy;
  // case ASB_DISCONNECT: break;   (rv = -100)
  if (step === 'disconnect') return -100;
  // case ASB_DISCARD_YOUNGER_PRI:
  if (step === 'discard-younger-primary') {
    if (self === 0 && peer === 1) return -1;
    if (self === 1 && peer === 0) return 1;
    step = 'discard-older-primary'; /* fall through to one of the other strategies */
  }
  // case ASB_DISCARD_OLDER_PRI:
  if (step === 'discard-older-primary') {
    if (self === 0 && peer === 1) return 1;
    if (self === 1 && peer === 0) return -1;
    /* Else fall through to one of the other strategies... */
    log.push('Discard younger/older primary did not find a decision\nUsing discard-least-changes instead');
    step = 'zero';
  }
  // case ASB_DISCARD_ZERO_CHG:
  if (step === 'discard-zero-changes' || step === 'zero') {
    if (chPeer === 0 && chSelf === 0) {
      // rv = test_bit(RESOLVE_CONFLICTS, &peer_device->connection->flags) ? -1 : 1;
      return resolveConflicts ? -1 : 1;
    }
    if (chPeer === 0) return 1;
    if (chSelf === 0) return -1;
    // if (after_sb_0p == ASB_DISCARD_ZERO_CHG) break;
    if (policy === 'discard-zero-changes') return -100;
    step = 'least'; /* fallthrough */
  }
  // case ASB_DISCARD_LEAST_CHG:
  if (chSelf < chPeer) return -1;
  if (chSelf > chPeer) return 1;
  /* ( ch_self == ch_peer ) Well, then use something else. */
  return resolveConflicts ? -1 : 1;
}

/* drbd_asb_recover_1p  -  Recover after split-brain with one remaining primary */
function asbRecover1p(me: Side, peerSide: Side, o: DrbdOptions, resolveConflicts: boolean, log: string[]): number {
  switch (o.afterSb1p) {
    case 'disconnect':
      return -100;
    case 'consensus': {
      // hg = drbd_asb_recover_0p(peer_device);
      // if (hg == -1 && device->state.role == R_SECONDARY) rv = hg;
      // if (hg == 1  && device->state.role == R_PRIMARY) rv = hg;
      const hg = asbRecover0p(me, peerSide, o.afterSb0p, resolveConflicts, log);
      if (hg === -1 && me.role === 'Secondary') return hg;
      if (hg === 1 && me.role === 'Primary') return hg;
      return -100;
    }
    case 'violently-as0p':
      // rv = drbd_asb_recover_0p(peer_device);
      return asbRecover0p(me, peerSide, o.afterSb0p, resolveConflicts, log);
    case 'discard-secondary':
      // return device->state.role == R_PRIMARY ? 1 : -1;
      return me.role === 'Primary' ? 1 : -1;
  }
}

/* drbd_asb_recover_2p  -  Recover after split-brain with two remaining primaries */
function asbRecover2p(me: Side, peerSide: Side, o: DrbdOptions, resolveConflicts: boolean, log: string[]): number {
  switch (o.afterSb2p) {
    case 'violently-as0p':
      return asbRecover0p(me, peerSide, o.afterSb0p, resolveConflicts, log);
    case 'disconnect':
      return -100;
  }
}

/* ------------------------------------------------------ drbd_sync_handshake */

/** enum drbd_disk_state, for the comparisons drbd_sync_handshake() makes (duet has no Consistent/Negotiating/Unknown). */
const D: Record<DiskState, number> = { Diskless: 0, Failed: 2, Inconsistent: 4, Outdated: 5, UpToDate: 8 };
const D_NEGOTIATING = 3;
const D_INCONSISTENT = 4;
const D_CONSISTENT = 7;

function discardsMyData(me: Side, peerSide: Side): boolean {
  return [me.keep, peerSide.keep].some((k) => k !== undefined && k !== me.node);
}

/**
 * What `self` decides on connecting to `peer` (the peer runs the same with
 * the roles swapped; DRBD has both ends decide and relies on them agreeing).
 */
export function drbdConnect(self: Side, peer: Side, opts: ConnectOptions): DrbdResult {
  if (self.node === peer.node) throw new Error(`drbd-reference: both sides are named ${self.node}; RESOLVE_CONFLICTS needs two names`);
  const o: DrbdOptions = { ...drbdPoliciesFor(opts.afterSplitBrain), ...stripUndefined(opts) };
  const log: string[] = [];
  const resolveConflicts = self.node > peer.node;
  const twoPrimaries = (r: DrbdResult): DrbdResult => {
    // After the handshake, receive_state() sets the new state; is_valid_state():
    // if (!nc->two_primaries && ns.role == R_PRIMARY && ns.peer == R_PRIMARY) rv = SS_TWO_PRIMARIES;
    if (!o.allowTwoPrimaries && self.role === 'Primary' && peer.role === 'Primary' && (r.action.kind === 'in-sync' || r.action.kind === 'sync' || r.action.kind === 'diskless')) {
      return { ...r, action: { kind: 'refuse', reason: 'Multiple primaries not allowed by config' } };
    }
    return r;
  };

  // receive_protocol(): if (p_discard_my_data && nc->discard_my_data) "incompatible %s settings", "discard-my-data"
  if (discardsMyData(self, peer) && discardsMyData(peer, self)) {
    return { rule: 0, compareHg: 0, hg: 0, action: { kind: 'refuse', reason: 'incompatible discard-my-data settings' }, log: ['incompatible discard-my-data settings'] };
  }

  // receive_state(): if (device->p_uuid && peer_state.disk >= D_NEGOTIATING && get_ldev_if_state(device, D_NEGOTIATING)) ... drbd_sync_handshake()
  if (D[self.disk] < D_NEGOTIATING || D[peer.disk] < D_NEGOTIATING) {
    return twoPrimaries({ rule: 0, compareHg: 0, hg: 0, action: { kind: 'diskless' }, log });
  }

  // mydisk = device->state.disk;  (D_NEGOTIATING -> new_state_tmp.disk: the disk as attached, here self.disk)
  const mydisk = D[self.disk];
  const peerDisk = D[peer.disk];

  // hg = drbd_uuid_compare(device, peer_role, &rule_nr);
  const c = uuidCompare(self, peer, resolveConflicts, log);
  let hg = c.hg;
  const rule = c.rule;
  log.push(`uuid_compare()=${hg} by rule ${rule}`);
  const done = (action: DrbdAction, resolvedBy?: DrbdResult['resolvedBy']): DrbdResult =>
    twoPrimaries({ rule, compareHg: c.hg, hg, action, ...(resolvedBy ? { resolvedBy } : {}), log });

  // if (hg == -1000) { drbd_alert(device, "Unrelated data, aborting!\n"); return C_MASK; }
  if (hg === -1000) {
    log.push('Unrelated data, aborting!');
    return { rule, compareHg: c.hg, hg, action: { kind: 'unrelated' }, log };
  }
  // (hg < -0x10000 and hg < -1000: protocol too old -- skipped, new peer)

  // if ((mydisk == D_INCONSISTENT && peer_disk > D_INCONSISTENT) ||
  //     (peer_disk == D_INCONSISTENT && mydisk    > D_INCONSISTENT)) {
  if ((mydisk === D_INCONSISTENT && peerDisk > D_INCONSISTENT) || (peerDisk === D_INCONSISTENT && mydisk > D_INCONSISTENT)) {
    // int f = (hg == -100) || abs(hg) == 2;
    const f = hg === -100 || Math.abs(hg) === 2;
    // hg = mydisk > D_INCONSISTENT ? 1 : -1; if (f) hg = hg*2;
    hg = mydisk > D_INCONSISTENT ? 1 : -1;
    if (f) hg *= 2;
    log.push(`Becoming sync ${hg > 0 ? 'source' : 'target'} due to disk states.`);
  }

  // (if (abs(hg) == 100) drbd_khelper(device, "initial-split-brain"); -- handler, skipped)

  let resolvedBy: DrbdResult['resolvedBy'];
  // if (hg == 100 || (hg == -100 && always_asbp)) {
  if (hg === 100 || (hg === -100 && o.alwaysAsbp)) {
    // int pcount = (device->state.role == R_PRIMARY) + (peer_role == R_PRIMARY);
    const pcount = (self.role === 'Primary' ? 1 : 0) + (peer.role === 'Primary' ? 1 : 0);
    // int forced = (hg == -100);
    const forced = hg === -100;
    if (pcount === 0) hg = asbRecover0p(self, peer, o.afterSb0p, resolveConflicts, log);
    else if (pcount === 1) hg = asbRecover1p(self, peer, o, resolveConflicts, log);
    else hg = asbRecover2p(self, peer, o, resolveConflicts, log);
    if (Math.abs(hg) < 100) {
      log.push(`Split-Brain detected, ${pcount} primaries, automatically solved. Sync from ${hg < 0 ? 'peer' : 'this'} node`);
      resolvedBy = pcount === 0 ? 'after-sb-0pri' : pcount === 1 ? 'after-sb-1pri' : 'after-sb-2pri';
      if (forced) {
        log.push('Doing a full sync, since UUIDs where ambiguous.');
        hg *= 2;
      }
    }
  }

  // if (hg == -100) {
  //   if (test_bit(DISCARD_MY_DATA, &device->flags) && !(device->p_uuid[UI_FLAGS]&1)) hg = -1;
  //   if (!test_bit(DISCARD_MY_DATA, &device->flags) && (device->p_uuid[UI_FLAGS]&1)) hg = 1;
  if (hg === -100) {
    const mine = discardsMyData(self, peer);
    const theirs = discardsMyData(peer, self);
    if (mine && !theirs) hg = -1;
    if (!mine && theirs) hg = 1;
    if (Math.abs(hg) < 100) {
      log.push(`Split-Brain detected, manually solved. Sync from ${hg < 0 ? 'peer' : 'this'} node`);
      resolvedBy = 'discard-my-data';
    }
  }

  // if (hg == -100) { drbd_alert(device, "Split-Brain detected but unresolved, dropping connection!\n"); return C_MASK; }
  if (hg === -100) {
    log.push('Split-Brain detected but unresolved, dropping connection!');
    return { rule, compareHg: c.hg, hg, action: { kind: 'split-brain-unresolved' }, log };
  }

  // if (hg > 0 && mydisk <= D_INCONSISTENT) { drbd_err(device, "I shall become SyncSource, but I am inconsistent!\n"); return C_MASK; }
  if (hg > 0 && mydisk <= D_INCONSISTENT) {
    const reason = 'I shall become SyncSource, but I am inconsistent!';
    log.push(reason);
    return { rule, compareHg: c.hg, hg, action: { kind: 'refuse', reason }, log };
  }

  // if (hg < 0 && /* by intention we do not use mydisk here. */
  //     device->state.role == R_PRIMARY && device->state.disk >= D_CONSISTENT) {
  //   switch (rr_conflict) { ... case ASB_DISCONNECT: drbd_err(device, "I shall become SyncTarget, but I am primary!\n"); return C_MASK;
  if (hg < 0 && self.role === 'Primary' && D[self.disk] >= D_CONSISTENT) {
    const reason = 'I shall become SyncTarget, but I am primary!';
    log.push(reason);
    return { rule, compareHg: c.hg, hg, action: { kind: 'refuse', reason }, log };
  }

  // (tentative / CONN_DRY_RUN -- skipped)
  // if (abs(hg) >= 2) "Writing the whole bitmap, full sync required after drbd_sync_handshake."
  // if (hg > 0) rv = C_WF_BITMAP_S; else if (hg < 0) rv = C_WF_BITMAP_T; else rv = C_CONNECTED;
  if (hg > 0) return done({ kind: 'sync', direction: 'source', full: hg >= 2 }, resolvedBy);
  if (hg < 0) return done({ kind: 'sync', direction: 'target', full: hg <= -2 }, resolvedBy);
  return done({ kind: 'in-sync' }, resolvedBy);
}

function stripUndefined(o: ConnectOptions): Partial<DrbdOptions> {
  const out: Partial<DrbdOptions> = {};
  for (const k of ['afterSb0p', 'afterSb1p', 'afterSb2p', 'alwaysAsbp', 'allowTwoPrimaries'] as const) {
    if (o[k] !== undefined) (out as Record<string, unknown>)[k] = o[k];
  }
  return out;
}

/** The rule the peer reports for the same pair when DRBD's two ends agree (0 (no compare), 10, 40, 41, 90 and 100 are their own mirror). */
export const MIRROR_RULE: Record<number, number> = { 0: 0, 10: 10, 20: 30, 30: 20, 34: 35, 35: 34, 36: 37, 37: 36, 40: 40, 41: 41, 50: 70, 70: 50, 51: 71, 71: 51, 60: 80, 80: 60, 90: 90, 100: 100 };

/** The hg the peer's drbd_uuid_compare() returns for the same pair when the ends agree: -hg for a direction, hg itself for 0, ±100 and -1000. */
export function mirrorHg(hg: number): number {
  return hg === 0 || hg === 100 || hg === -100 || hg === -1000 ? hg : -hg;
}
