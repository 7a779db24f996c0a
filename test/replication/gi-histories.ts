/**
 * fast-check arbitraries of the two sides of a connect, for the decision
 * table and its DRBD oracle (drbd-reference.ts):
 *
 * - `historyPairs`: REALISTIC pairs. Two nodes start from one history (two
 *   new disks, usually followed by the initial full sync) and live through
 *   random events: writes while connected and alone, disconnects, role
 *   changes, forced promotions, crashes (of a Primary: crashedPrimary),
 *   resyncs started, interrupted, finished, with the finish recorded on only
 *   one side, the sync UUID lost, disks outdated or replaced. The pair is
 *   the two nodes' state when they next connect. Each value carries its
 *   events and a trace of the states, so a counterexample reads as a story.
 *
 *   The generation ids evolve by one of two mechanics:
 *   'drbd' — DRBD 8.4 (drbd_main.c, drbd_receiver.c, drbd_worker.c,
 *     drbd_nl.c, drbd_state.c): a new current UUID when a Primary loses its
 *     peer or is promoted without one (drbd_uuid_new_current: bitmap :=
 *     current, current := new), always on a forced promotion; at resync start
 *     the source's bitmap UUID becomes old bitmap + UUID_NEW_BM_OFFSET (or a
 *     random one when it was 0), rotating the old one into the history
 *     (drbd_gen_and_send_sync_uuid), and the target takes it as its current
 *     with bitmap 0 (receive_sync_uuid); at the end the target takes the
 *     source's UUIDs as it got them on connect and both rotate the sync
 *     UUID into the history (drbd_resync_finished, drbd_uuid_set_bm(0));
 *     on every connect a node repairs its own UUIDs where drbd_uuid_compare()
 *     does (rules 34 and 71).
 *   'duet' — src/replication (resource.ts newGeneration, promote,
 *     beginSync, finishSyncSource, finishSyncTarget): a new generation at a
 *     Primary's first write without the peer (or its promotion without it,
 *     or a disconnect with writes in flight); nothing at resync start; at
 *     the end the source rotates its bitmap GI into the history, durably,
 *     and only then sends the result, which the target adopts whole (so a
 *     source that crashes before recording the end leaves the target
 *     unfinished too).
 *
 *   Who syncs from whom on a connect is decided by the data, not by any
 *   decision procedure under test: the simulation knows which acknowledged
 *   writes each disk holds. The newer copy is the source; when both went
 *   on (split brain) the nodes stay apart unless the event names the node
 *   to keep; a node without a usable copy (new disk, interrupted target)
 *   syncs from the other; with the same data, a resync runs when the GIs
 *   differ or a Primary crashed, from the Primary, else the crashed
 *   Primary, else the event's `prefer` (either way is safe: the data is the
 *   same). A sync that would overwrite a Primary is refused, as both
 *   systems refuse it. So every pair is reachable by the mechanics plus an
 *   admin who always picks the right side; `truth` says what the data is.
 *
 * - `randomSides`: plain random tuples for the adversarial space (GIs from
 *   a small pool, including UUID_JUST_CREATED and sync UUIDs, so that every
 *   rule can fire; no history behind them).
 */
import fc from 'fast-check';
import { DiskState, GenerationIds, Gi, NO_GI } from '../../src/replication/meta.js';
import { ConnectSide, decideConnect, forcedGeneration, syncGeneration } from '../../src/replication/connect-decision.js';
import type { Role } from '../../src/replication/wire.js';
import { drbdConnect, giOf, plusNewBmOffset, Side, uuidOf } from './drbd-reference.js';

export type Mechanics = 'drbd' | 'duet';
export const NODES = ['alpha', 'bravo'] as const;
export type NodeIndex = 0 | 1;
/** Blocks of the simulated disk (a block is one bitmap bit). */
export const BLOCKS = 16;
export const BLOCK_BYTES = 4096;
/** UUID_JUST_CREATED as a GI: what DRBD's new-current puts in the bitmap slot of a disk that had no generation yet. */
export const JUST_CREATED_GI: Gi = '4';

export type HistoryEvent =
  /** `primary --force`: a disk that is not UpToDate becomes the good data. */
  | { kind: 'force-primary'; node: NodeIndex }
  | { kind: 'primary'; node: NodeIndex }
  | { kind: 'secondary'; node: NodeIndex }
  /** A Primary writes `block`: to both disks when the link is up, else to its own and its bitmap. */
  | { kind: 'write'; node: NodeIndex; block: number }
  /** The link breaks; `inFlight`: a block a Primary wrote that reached only its own disk. */
  | { kind: 'disconnect'; inFlight: number | null }
  /** The link comes up. `keep`: an admin's resolution of a split brain; `syncUuidLost`: the link breaks right after the source starts the resync. */
  | { kind: 'connect'; prefer: NodeIndex; keep: NodeIndex | null; syncUuidLost: boolean }
  /** The resync ends; `lost`: that node crashed before recording the end (the other recorded it, except that duet's target hears of the end only once its source recorded it). */
  | { kind: 'resync-done'; lost: 'source' | 'target' | null }
  /** The node dies and comes back Secondary (a Primary: crashed Primary, its hot extent `hot` out of sync). */
  | { kind: 'crash'; node: NodeIndex; hot: number }
  /** Fencing marks a disconnected Secondary Outdated. */
  | { kind: 'outdate'; node: NodeIndex }
  /** The disk is replaced by a new one (new metadata). */
  | { kind: 'new-disk'; node: NodeIndex };

/** What the two disks really hold, from `self`'s point of view ("no copy": a new disk or a resync target that did not finish). */
export type Truth = 'same' | 'self-newer' | 'peer-newer' | 'diverged' | 'self-no-copy' | 'peer-no-copy' | 'no-copy';

export interface HistoryPair {
  mechanics: Mechanics;
  self: Side;
  peer: Side;
  truth: Truth;
  /** Every event, in order; the trace says which ones changed nothing. */
  events: HistoryEvent[];
  trace: string[];
  /**
   * Writes no generation id records: a node wrote without its peer while
   * both still had the same current GI (DRBD: a promotion with a bitmap UUID
   * left over from a resync end the node never recorded makes no new current
   * UUID). Nothing in the GIs can tell such a divergence from a plain lead.
   */
  hazards: string[];
  /** duet: resyncs on the way that overwrote acknowledged writes only the target had. */
  losses: string[];
}

interface SimNode {
  name: string;
  gi: GenerationIds;
  role: Role;
  disk: DiskState;
  crashedPrimary: boolean;
  primarySince: number;
  /** DRBD: UI_CURRENT & 1 (the node was Primary when its current UUID was last set, or is now). */
  curBit: boolean;
  /** DRBD: UI_BITMAP & 1 (the node was Primary when it split from the peer). */
  bmBit: boolean;
  bitmap: Set<number>;
  /** Acknowledged writes on this disk; null: not a usable copy of anything. */
  data: Set<number> | null;
}

type Link = { state: 'down' } | { state: 'connected' } | { state: 'syncing'; source: NodeIndex; sourceAtConnect: GenerationIds };

const copyGi = (g: GenerationIds): GenerationIds => ({ current: g.current, bitmap: g.bitmap, history: [g.history[0], g.history[1]] });
const short = (g: Gi): string => (g === NO_GI ? '0' : uuidOf(g).toString(16));

/** One simulated history; `run` applies events one by one (an event that cannot happen now changes nothing). */
export class History {
  readonly nodes: [SimNode, SimNode];
  link: Link = { state: 'connected' };
  readonly trace: string[] = [];
  readonly hazards: string[] = [];
  /** duet: resyncs its decision on connect started that overwrote acknowledged writes (never expected). */
  readonly losses: string[] = [];
  private clock = 1_000_000;
  private nextGi = 0;
  private nextWrite = 0;

  constructor(readonly mechanics: Mechanics) {
    // Two new disks, connected: DRBD's rule 10, nothing to do until one is forced Primary.
    this.nodes = [this.newNode(NODES[0]), this.newNode(NODES[1])];
  }

  private newNode(name: string): SimNode {
    return {
      name,
      gi: { current: NO_GI, bitmap: NO_GI, history: [NO_GI, NO_GI] },
      role: 'Secondary',
      disk: 'Inconsistent',
      crashedPrimary: false,
      primarySince: 0,
      curBit: false,
      bmBit: false,
      bitmap: new Set(),
      data: null,
    };
  }

  /** A GI never used before: 16 hex digits, low bit clear, far from any other plus UUID_NEW_BM_OFFSET. */
  private freshGi(): Gi {
    return giOf(BigInt(++this.nextGi) << 4n);
  }

  run(events: HistoryEvent[]): this {
    for (const e of events) {
      this.clock += 1000;
      const skipped = this.apply(e);
      this.trace.push(`${describeEvent(e)}${skipped ? ` (no effect: ${skipped})` : ''} => ${this.describe()}`);
    }
    return this;
  }

  describe(): string {
    const n = (s: SimNode): string =>
      `${s.name} ${s.role[0]}/${s.disk} ${short(s.gi.current)}:${short(s.gi.bitmap)}:${short(s.gi.history[0])}:${short(s.gi.history[1])}` +
      `${s.crashedPrimary ? ' crashed' : ''}${s.bitmap.size ? ` bits=${s.bitmap.size}` : ''}${this.mechanics === 'drbd' && s.bmBit ? ' bm&1' : ''}` +
      ` data=${s.data ? `{${[...s.data].join(',')}}` : 'none'}`;
    const l = this.link.state === 'syncing' ? `syncing ${this.nodes[this.link.source].name}->` : this.link.state;
    return `${n(this.nodes[0])} | ${n(this.nodes[1])} | ${l}`;
  }

  /** Apply one event; a string says why it had no effect. */
  private apply(e: HistoryEvent): string | undefined {
    switch (e.kind) {
      case 'force-primary':
        return this.forcePrimary(e.node);
      case 'primary':
        return this.primary(e.node);
      case 'secondary': {
        const n = this.nodes[e.node];
        if (n.role !== 'Primary') return 'not Primary';
        n.role = 'Secondary';
        // drbd_set_role(R_SECONDARY): device->ldev->md.uuid[UI_CURRENT] &= ~(u64)1;
        n.curBit = false;
        return undefined;
      }
      case 'write':
        return this.write(e.node, e.block);
      case 'disconnect':
        if (this.link.state === 'down') return 'not connected';
        this.linkDown(e.inFlight, null);
        return undefined;
      case 'connect':
        return this.connect(e.prefer, e.keep, e.syncUuidLost);
      case 'resync-done':
        return this.resyncDone(e.lost);
      case 'crash':
        this.crash(e.node, e.hot);
        return undefined;
      case 'outdate': {
        const n = this.nodes[e.node];
        if (this.link.state !== 'down' || n.role !== 'Secondary' || n.disk !== 'UpToDate') return 'only a disconnected UpToDate Secondary is outdated';
        n.disk = 'Outdated';
        return undefined;
      }
      case 'new-disk': {
        const n = this.nodes[e.node];
        if (n.role === 'Primary') return 'Primary';
        if (this.link.state !== 'down') this.linkDown(null, null);
        this.nodes[e.node] = this.newNode(n.name);
        return undefined;
      }
    }
  }

  private other(i: NodeIndex): NodeIndex {
    return i === 0 ? 1 : 0;
  }

  /** DRBD's drbd_uuid_new_current(): bitmap := current (a warning, not a refusal, when it was set), current := new. */
  private drbdNewCurrent(n: SimNode): void {
    n.gi = { current: this.freshGi(), bitmap: n.gi.current === NO_GI ? JUST_CREATED_GI : n.gi.current, history: n.gi.history };
    n.bmBit = n.curBit;
    // __drbd_uuid_set(UI_CURRENT): val |= 1 when Primary.
    n.curBit = n.role === 'Primary';
  }

  /** duet's Resource.newGeneration(). */
  private duetNewGeneration(n: SimNode): void {
    const gi = n.gi;
    n.gi = gi.bitmap === NO_GI ? { current: this.freshGi(), bitmap: gi.current, history: gi.history } : { current: this.freshGi(), bitmap: gi.bitmap, history: [gi.current, gi.history[0]] };
  }

  private forcePrimary(i: NodeIndex): string | undefined {
    const n = this.nodes[i];
    const o = this.nodes[this.other(i)];
    if (n.role === 'Primary') return 'already Primary';
    if (n.disk === 'UpToDate') return 'UpToDate: no --force needed';
    if (this.link.state === 'syncing') return 'resync running';
    if (this.link.state === 'connected' && (o.disk === 'UpToDate' || o.role === 'Primary')) return 'the peer has good data';
    const diskBefore = n.disk;
    n.role = 'Primary';
    n.primarySince = this.clock;
    n.disk = 'UpToDate';
    if (this.mechanics === 'drbd') {
      // drbd_set_role(): if (... || forced) drbd_uuid_new_current(device); md.uuid[UI_CURRENT] |= 1;
      this.drbdNewCurrent(n);
      n.curBit = true;
    } else {
      // Resource.promote(force): a generation of its own.
      n.gi = forcedGeneration(n.gi, diskBefore, this.freshGi());
    }
    // Whatever the disk held is now the good data; with no copy, it starts a lineage of its own.
    n.data ??= new Set([-++this.nextWrite]);
    if (this.link.state === 'connected') {
      // DRBD: CONSIDER_RESYNC, a new handshake; duet: the session closes and reconnects.
      this.link = { state: 'down' };
      this.connect(i, null, false);
    }
    return undefined;
  }

  private primary(i: NodeIndex): string | undefined {
    const n = this.nodes[i];
    const o = this.nodes[this.other(i)];
    if (n.role === 'Primary') return 'already Primary';
    if (n.disk !== 'UpToDate') return `disk ${n.disk}`;
    if (this.link.state !== 'down' && o.role === 'Primary') return 'the peer is Primary';
    n.role = 'Primary';
    n.primarySince = this.clock;
    if (this.mechanics === 'drbd') {
      // drbd_set_role(): if ((conn < C_CONNECTED || pdsk <= D_FAILED) && md.uuid[UI_BITMAP] == 0) drbd_uuid_new_current(device);
      if (this.link.state === 'down' && n.gi.bitmap === NO_GI) this.drbdNewCurrent(n);
      n.curBit = true;
    } else if (this.link.state === 'down') {
      // Resource.promote(): "Primary without the peer".
      this.duetNewGeneration(n);
    }
    return undefined;
  }

  private write(i: NodeIndex, block: number): string | undefined {
    const n = this.nodes[i];
    if (n.role !== 'Primary') return 'not Primary';
    const w = ++this.nextWrite;
    n.data!.add(w);
    if (this.link.state !== 'down') {
      const o = this.nodes[this.other(i)];
      o.data?.add(w);
      return undefined;
    }
    n.bitmap.add(block);
    // duet: Resource.markDiverged(); DRBD bumped the UUID when the link went or at promotion.
    if (this.mechanics === 'duet' && n.gi.bitmap === NO_GI) this.duetNewGeneration(n);
    const o = this.nodes[this.other(i)];
    if (n.gi.current === o.gi.current) this.hazards.push(`${n.name} wrote block ${block} without ${o.name} while both had current ${short(n.gi.current)}`);
    // DRBD: a write under a generation the peer knows already (as its bitmap or history: a resync end the
    // source never recorded left this node's UUIDs unbumped) is recorded by no UUID either (note 9; seed
    // -500593096 found it with the peer promoted meanwhile, so the currents differed).
    else if (this.mechanics === 'drbd' && n.gi.current !== NO_GI && [o.gi.bitmap, ...o.gi.history].includes(n.gi.current)) {
      this.hazards.push(`${n.name} wrote block ${block} without ${o.name} under ${short(n.gi.current)}, a generation ${o.name} already holds`);
    }
    return undefined;
  }

  /** The link goes down (`crashed`: that node died, so only the other reacts). */
  private linkDown(inFlight: number | null, crashed: NodeIndex | null): void {
    const was = this.link;
    this.link = { state: 'down' };
    if (was.state === 'syncing') {
      // Interrupted midway: the target holds a mix of old and new blocks.
      const t = this.nodes[this.other(was.source)];
      t.data = null;
    }
    for (const i of [0, 1] as const) {
      if (i === crashed) continue;
      const n = this.nodes[i];
      if (n.role !== 'Primary') continue;
      if (inFlight !== null) {
        // A write that reached this disk only: out of sync.
        n.data!.add(++this.nextWrite);
        n.bitmap.add(inFlight);
      }
      if (this.mechanics === 'drbd') {
        // after_state_ch(), "Lost contact to peer's copy of the data": (os.pdsk >= D_INCONSISTENT ...) &&
        // (ns.role == R_PRIMARY || ns.peer == R_PRIMARY) && md.uuid[UI_BITMAP] == 0 && ns.disk >= D_UP_TO_DATE
        const peerDisk = this.nodes[this.other(i)].disk;
        if (peerDisk !== 'Outdated' && n.gi.bitmap === NO_GI && n.disk === 'UpToDate') this.drbdNewCurrent(n);
      } else if (inFlight !== null && n.gi.bitmap === NO_GI) {
        // PeerSession.onDown(): markDiverged() for what the peer may not have.
        this.duetNewGeneration(n);
      }
    }
  }

  private crash(i: NodeIndex, hot: number): void {
    const n = this.nodes[i];
    if (this.link.state !== 'down') this.linkDown(null, i);
    if (n.role === 'Primary') {
      // Comes back with MDF_PRIMARY_IND set: CRASHED_PRIMARY, the activity log's extents out of sync.
      n.crashedPrimary = true;
      n.bitmap.add(hot);
      n.role = 'Secondary';
    }
  }

  private connect(prefer: NodeIndex, keep: NodeIndex | null, syncUuidLost: boolean): string | undefined {
    if (this.link.state !== 'down') return 'already connected';
    if (this.mechanics === 'duet') return this.duetConnect(keep, syncUuidLost);
    this.drbdSelfCorrections();
    const [a, b] = this.nodes;
    const ca = usable(a);
    const cb = usable(b);
    let source: NodeIndex;
    if (!ca && !cb) {
      this.link = { state: 'connected' };
      return undefined;
    } else if (!ca || !cb) {
      source = ca ? 0 : 1;
    } else {
      const r = relation(ca, cb);
      if (r === 'same') {
        const sameGi = JSON.stringify(a.gi) === JSON.stringify(b.gi);
        if (sameGi && !a.crashedPrimary && !b.crashedPrimary && a.bitmap.size === 0 && b.bitmap.size === 0) {
          this.connected();
          return undefined;
        }
        source = a.role === 'Primary' ? 0 : b.role === 'Primary' ? 1 : a.crashedPrimary !== b.crashedPrimary ? (a.crashedPrimary ? 0 : 1) : prefer;
      } else if (r === 'first-newer') source = 0;
      else if (r === 'second-newer') source = 1;
      else if (keep !== null) source = keep;
      else return 'split brain, no resolution';
    }
    const t = this.nodes[this.other(source)];
    if (t.role === 'Primary') return `${t.name} is Primary and would be overwritten`;
    this.startSync(source, syncUuidLost);
    return undefined;
  }

  /**
   * duet connects as its decision on connect says (what the real nodes
   * would do), not as the data would want: so every later state is one
   * duet can reach. A resync that would overwrite acknowledged writes the
   * source lacks, without a split-brain resolution choosing it, is
   * recorded in `losses`.
   */
  private duetConnect(keep: NodeIndex | null, syncUuidLost: boolean): string | undefined {
    const [a, b] = this.nodes;
    const toSide = (n: SimNode): ConnectSide => ({
      node: n.name,
      role: n.role,
      disk: n.disk,
      dataBytes: BLOCKS * BLOCK_BYTES,
      gi: copyGi(n.gi),
      crashedPrimary: n.crashedPrimary,
      outOfSyncBytes: n.bitmap.size * BLOCK_BYTES,
      primarySince: n.primarySince,
      fullSyncNeeded: n.gi.current === NO_GI,
      peerDiskFailed: false,
      inUse: n.role === 'Primary',
      ...(keep !== null ? { keep: NODES[keep] } : {}),
    });
    const act = decideConnect(toSide(a), toSide(b), { resource: 'r0', allowTwoPrimaries: false, afterSplitBrain: 'disconnect' });
    if (act.kind === 'refuse') return act.reason;
    if (act.kind === 'split-brain') return act.why;
    if (act.kind === 'connected') {
      // Resource.connectedTo(): only an Outdated disk facing an UpToDate one of its generation changes.
      this.link = { state: 'connected' };
      for (const [n, o] of [[a, b], [b, a]] as const) {
        if (n.disk === 'Outdated' && o.disk === 'UpToDate' && n.gi.current === o.gi.current) n.disk = 'UpToDate';
      }
      return undefined;
    }
    const source: NodeIndex = act.direction === 'source' ? 0 : 1;
    const s = this.nodes[source];
    const t = this.nodes[this.other(source)];
    if (!act.splitBrain && t.data !== null && [...t.data].some((w) => !s.data?.has(w))) {
      this.losses.push(`connect: ${s.name} -> ${t.name} (${act.rule}) overwrites writes only ${t.name} has`);
    }
    this.startSync(source, syncUuidLost);
    return undefined;
  }

  /**
   * drbd_uuid_compare() runs on both nodes at every handshake and repairs a
   * node's own UUIDs in two cases (the peer repairs only its copy of them):
   * rule 34, "was SyncSource, missed the resync finished event, corrected
   * myself" (drbd_uuid_move_history; history[0] = bitmap; bitmap = 0), and
   * rule 71, "Last syncUUID did not get through, corrected" (bitmap =
   * history[0]; history[0] = history[1]).
   */
  private drbdSelfCorrections(): void {
    const [a, b] = [this.side(this.nodes[0]), this.side(this.nodes[1])];
    const rules = [drbdConnect(a, b, { afterSplitBrain: 'disconnect' }).rule, drbdConnect(b, a, { afterSplitBrain: 'disconnect' }).rule];
    for (const i of [0, 1] as const) {
      const n = this.nodes[i];
      const gi = n.gi;
      if (rules[i] === 34) {
        n.gi = { current: gi.current, bitmap: NO_GI, history: [gi.bitmap, gi.history[0]] };
        n.bmBit = false;
      } else if (rules[i] === 71) n.gi = { current: gi.current, bitmap: gi.history[0], history: [gi.history[1], gi.history[1]] };
    }
  }

  /** Both UpToDate and connected: DRBD clears CRASHED_PRIMARY and Outdated goes (sanitize_state). */
  private connected(): void {
    this.link = { state: 'connected' };
    for (const n of this.nodes) {
      n.disk = 'UpToDate';
      if (this.mechanics === 'drbd') n.crashedPrimary = false;
    }
  }

  private startSync(si: NodeIndex, syncUuidLost: boolean): void {
    const s = this.nodes[si];
    const t = this.nodes[this.other(si)];
    const sourceAtConnect = copyGi(s.gi);
    if (this.mechanics === 'drbd') {
      // Outdated (and Consistent) vanish on connect (sanitize_state); the source is UpToDate.
      s.disk = 'UpToDate';
      // drbd_gen_and_send_sync_uuid(): uuid = md.uuid[UI_BITMAP];
      // if (uuid && uuid != UUID_JUST_CREATED) uuid = uuid + UUID_NEW_BM_OFFSET; else get_random_bytes(&uuid, sizeof(u64));
      // drbd_uuid_set(device, UI_BITMAP, uuid): the old bitmap UUID, if set, moves into the history.
      const old = s.gi.bitmap;
      const sync = old !== NO_GI && old !== JUST_CREATED_GI ? plusNewBmOffset(old) : this.freshGi();
      s.gi = { current: s.gi.current, bitmap: sync, history: old !== NO_GI ? [old, s.gi.history[0]] : s.gi.history };
      if (old === NO_GI || old === JUST_CREATED_GI) s.bmBit = false; // a random UUID's low bit: taken as clear
      if (syncUuidLost) return;
      // receive_sync_uuid(): _drbd_uuid_set(UI_CURRENT, uuid); _drbd_uuid_set(UI_BITMAP, 0UL);
      t.gi = { current: sync, bitmap: NO_GI, history: t.gi.history };
      t.bmBit = false;
    } else {
      // Resource.beginSync(): the computed sync generation, the source's bitmap generation and the target's current.
      const sync = syncGeneration(s.gi.current, t.gi.current);
      if (s.gi.bitmap !== sync) s.gi = { current: s.gi.current, bitmap: sync, history: s.gi.bitmap !== NO_GI ? [s.gi.bitmap, s.gi.history[0]] : s.gi.history };
      if (syncUuidLost) return;
      t.gi = { current: sync, bitmap: NO_GI, history: [t.gi.current, t.gi.history[0]] };
    }
    const full = usable(t) === null;
    for (const b of full ? Array.from({ length: BLOCKS }, (_, k) => k) : [...t.bitmap]) s.bitmap.add(b);
    t.bitmap = new Set(s.bitmap);
    t.disk = 'Inconsistent';
    t.data = null;
    this.link = { state: 'syncing', source: si, sourceAtConnect };
  }

  private resyncDone(lost: 'source' | 'target' | null): string | undefined {
    const l = this.link;
    if (l.state !== 'syncing') return 'no resync running';
    const si = l.source;
    const s = this.nodes[si];
    const t = this.nodes[this.other(si)];
    const sourceGi = copyGi(s.gi);
    if (lost !== 'source') this.finishSource(s);
    // duet's source records its end before it tells the target: losing it there loses it for both.
    const targetHears = lost !== 'target' && !(lost === 'source' && this.mechanics === 'duet');
    if (targetHears) {
      this.finishTarget(t, l.sourceAtConnect, sourceGi);
      t.data = new Set(s.data);
      t.disk = 'UpToDate';
      t.bitmap.clear();
    }
    this.link = { state: 'connected' };
    if (lost === null) {
      for (const n of this.nodes) {
        n.disk = 'UpToDate';
        n.crashedPrimary = false;
      }
      return undefined;
    }
    // The node that lost the end crashed before it could record it (the other reacts to the link going down).
    this.crash(lost === 'source' ? si : this.other(si), 0);
    return undefined;
  }

  private finishSource(s: SimNode): void {
    s.bitmap.clear();
    if (s.disk === 'Outdated') s.disk = 'UpToDate';
    s.crashedPrimary = false;
    if (this.mechanics === 'drbd') {
      // drbd_resync_finished(): drbd_uuid_set_bm(device, 0UL): the bitmap UUID moves into the history.
      s.gi = drbdSetBmZero(s.gi);
      s.bmBit = false;
    } else {
      // Resource.finishSyncSource().
      const gi = s.gi;
      s.gi = gi.bitmap === NO_GI ? gi : { current: gi.current, bitmap: NO_GI, history: [gi.bitmap, gi.history[0]] };
    }
  }

  /** `p`: the source's UUIDs as the target got them on connect (DRBD) ; `sourceNow`: as the source holds them at the end (duet sends these). */
  private finishTarget(t: SimNode, p: GenerationIds, sourceNow: GenerationIds): void {
    t.crashedPrimary = false;
    if (this.mechanics === 'drbd') {
      // drbd_resync_finished(), C_SYNC_TARGET:
      // for (i = UI_BITMAP; i <= UI_HISTORY_END; i++) _drbd_uuid_set(device, i, device->p_uuid[i]);
      // drbd_uuid_set(device, UI_BITMAP, device->ldev->md.uuid[UI_CURRENT]);
      // _drbd_uuid_set(device, UI_CURRENT, device->p_uuid[UI_CURRENT]);
      // drbd_uuid_set_bm(device, 0UL);
      let gi: GenerationIds = { current: t.gi.current, bitmap: p.bitmap, history: [p.history[0], p.history[1]] };
      gi = { current: gi.current, bitmap: gi.current, history: gi.bitmap !== NO_GI ? [gi.bitmap, gi.history[0]] : gi.history };
      gi = { ...gi, current: p.current };
      t.gi = drbdSetBmZero(gi);
      t.bmBit = false;
    } else {
      // Resource.finishSyncTarget(): the target saves the GIs the source sent (finishSyncSource's result).
      const gi = sourceNow;
      t.gi = gi.bitmap === NO_GI ? copyGi(gi) : { current: gi.current, bitmap: NO_GI, history: [gi.bitmap, gi.history[0]] };
    }
  }

  /** The two sides as they meet on the next connect (`first` is self). */
  sides(first: NodeIndex): { self: Side; peer: Side; truth: Truth } {
    const s = this.nodes[first];
    const p = this.nodes[this.other(first)];
    return { self: this.side(s), peer: this.side(p), truth: truthOf(s, p) };
  }

  private side(n: SimNode): Side {
    return {
      node: n.name,
      role: n.role,
      disk: n.disk,
      gi: copyGi(n.gi),
      crashedPrimary: n.crashedPrimary,
      changedBytes: n.bitmap.size * BLOCK_BYTES,
      primarySince: n.primarySince,
      ...(this.mechanics === 'drbd' ? { primaryAtSplit: n.gi.bitmap !== NO_GI && n.bmBit } : {}),
    };
  }
}

/** drbd_uuid_set_bm(device, 0): if (bitmap) { move history; history[0] = bitmap; bitmap = 0; } */
function drbdSetBmZero(gi: GenerationIds): GenerationIds {
  if (gi.bitmap === NO_GI) return gi;
  return { current: gi.current, bitmap: NO_GI, history: [gi.bitmap, gi.history[0]] };
}

function usable(n: SimNode): Set<number> | null {
  return n.disk === 'Inconsistent' ? null : n.data;
}

function relation(a: Set<number>, b: Set<number>): 'same' | 'first-newer' | 'second-newer' | 'diverged' {
  const aInB = [...a].every((w) => b.has(w));
  const bInA = [...b].every((w) => a.has(w));
  if (aInB && bInA) return 'same';
  if (bInA) return 'first-newer';
  if (aInB) return 'second-newer';
  return 'diverged';
}

function truthOf(s: SimNode, p: SimNode): Truth {
  const cs = usable(s);
  const cp = usable(p);
  if (!cs && !cp) return 'no-copy';
  if (!cs) return 'self-no-copy';
  if (!cp) return 'peer-no-copy';
  const r = relation(cs, cp);
  return r === 'first-newer' ? 'self-newer' : r === 'second-newer' ? 'peer-newer' : r;
}

export function describeEvent(e: HistoryEvent): string {
  switch (e.kind) {
    case 'write':
      return `${NODES[e.node]} writes block ${e.block}`;
    case 'disconnect':
      return `disconnect${e.inFlight !== null ? ` (block ${e.inFlight} in flight)` : ''}`;
    case 'connect':
      return `connect${e.keep !== null ? ` keeping ${NODES[e.keep]}` : ''}${e.syncUuidLost ? ', sync UUID lost' : ''}`;
    case 'resync-done':
      return `resync done${e.lost ? `, ${e.lost} crashed before recording it` : ''}`;
    case 'crash':
      return `${NODES[e.node]} crashes`;
    default:
      return `${e.kind} ${NODES[e.node]}`;
  }
}

/** The usual start: alpha forced Primary on two new disks, the initial full sync done. */
export const INITIAL_SYNC: HistoryEvent[] = [
  { kind: 'force-primary', node: 0 },
  { kind: 'resync-done', lost: null },
];

/** Replay `events` from two new disks and take the sides as they next connect (`selfIndex` is self). */
export function simulate(mechanics: Mechanics, events: HistoryEvent[], selfIndex: NodeIndex = 0): HistoryPair {
  const all = [...events];
  const h = new History(mechanics).run(all);
  // The pair is two nodes about to connect: take the link down if the history left it up.
  if (h.link.state !== 'down') {
    const down: HistoryEvent = { kind: 'disconnect', inFlight: null };
    all.push(down);
    h.run([down]);
  }
  return { mechanics, ...h.sides(selfIndex), events: all, trace: h.trace, hazards: h.hazards, losses: h.losses };
}

const nodeArb = fc.constantFrom<NodeIndex>(0, 1);
/** `arb` one time in `n`, else null. */
const oneIn = <T>(n: number, arb: fc.Arbitrary<T>): fc.Arbitrary<T | null> => fc.oneof({ weight: n - 1, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: arb });
const blockArb = fc.integer({ min: 0, max: BLOCKS - 1 });

export const eventArb: fc.Arbitrary<HistoryEvent> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('write' as const), node: nodeArb, block: blockArb }) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('disconnect' as const), inFlight: oneIn(3, blockArb) }) },
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant('connect' as const),
      prefer: nodeArb,
      keep: oneIn(3, nodeArb),
      syncUuidLost: fc.oneof({ weight: 5, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
    }),
  },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('resync-done' as const), lost: oneIn(4, fc.constantFrom<'source' | 'target'>('source', 'target')) }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('primary' as const), node: nodeArb }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('secondary' as const), node: nodeArb }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('force-primary' as const), node: nodeArb }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('crash' as const), node: nodeArb, hot: blockArb }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('outdate' as const), node: nodeArb }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('new-disk' as const), node: nodeArb }) },
);

export interface HistoryOptions {
  mechanics: Mechanics;
  /** Events after the start (default 25). */
  maxEvents?: number;
}

/**
 * Realistic pairs: a random history (after the initial sync, or now and then
 * from two new disks), the sides as they next connect, seen from a random
 * one of the two; now and then an admin's `resolve --keep` on one side.
 */
export function historyPairs(o: HistoryOptions): fc.Arbitrary<HistoryPair> {
  return fc
    .record({
      start: fc.oneof({ weight: 6, arbitrary: fc.constant(INITIAL_SYNC) }, { weight: 1, arbitrary: fc.constant<HistoryEvent[]>([]) }),
      events: fc.array(eventArb, { maxLength: o.maxEvents ?? 25 }),
      self: nodeArb,
      keep: oneIn(8, fc.record({ on: nodeArb, keep: nodeArb })),
    })
    .map(({ start, events, self, keep }) => {
      const pair = simulate(o.mechanics, [...start, ...events], self);
      if (keep) {
        const side = keep.on === self ? pair.self : pair.peer;
        side.keep = NODES[keep.keep];
        pair.trace.push(`${NODES[keep.on]}: resolve --keep ${NODES[keep.keep]}`);
      }
      return pair;
    });
}

/* ------------------------------------------------------- random tuples */

/** GIs where coincidences happen: none, UUID_JUST_CREATED, a few generations, and sync UUIDs made from them. */
export const GI_POOL: Gi[] = [NO_GI, JUST_CREATED_GI, ...[0x10n, 0x20n, 0x30n, 0x40n].map(giOf), plusNewBmOffset(giOf(0x10n)), plusNewBmOffset(giOf(0x20n))];

const giArb = fc.constantFrom(...GI_POOL);
const gisArb: fc.Arbitrary<GenerationIds> = fc.record({ current: giArb, bitmap: giArb, history: fc.tuple(giArb, giArb) });

function sideArb(name: string): fc.Arbitrary<Side> {
  return fc
    .record({
      role: fc.oneof({ weight: 1, arbitrary: fc.constant<Role>('Primary') }, { weight: 2, arbitrary: fc.constant<Role>('Secondary') }),
      disk: fc.oneof(
        { weight: 4, arbitrary: fc.constant<DiskState>('UpToDate') },
        { weight: 2, arbitrary: fc.constantFrom<DiskState>('Outdated', 'Inconsistent') },
        { weight: 1, arbitrary: fc.constantFrom<DiskState>('Diskless', 'Failed') },
      ),
      gi: gisArb,
      crashedPrimary: fc.boolean(),
      changedBytes: fc.constantFrom(0, BLOCK_BYTES, 2 * BLOCK_BYTES),
      primarySince: fc.constantFrom(0, 1000, 2000),
      keep: oneIn(8, fc.constantFrom<string>(...NODES)),
      primaryAtSplit: oneIn(2, fc.boolean()),
    })
    .map(({ keep, primaryAtSplit, ...s }) => ({
      node: name,
      ...s,
      ...(keep !== null ? { keep } : {}),
      ...(primaryAtSplit !== null ? { primaryAtSplit } : {}),
    }));
}

/** Any two sides, no history behind them: the adversarial space. */
export function randomSides(): fc.Arbitrary<{ self: Side; peer: Side }> {
  return fc.record({ self: sideArb(NODES[0]), peer: sideArb(NODES[1]) }).chain(({ self, peer }) =>
    fc.boolean().map((swap) => (swap ? { self: peer, peer: self } : { self, peer })),
  );
}
