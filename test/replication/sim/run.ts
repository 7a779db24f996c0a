/**
 * One seed of the simulation: a configuration and a schedule drawn from the
 * seed, run on the fake clock, healed, checked.
 *
 * A run is a few episodes. In each, operations drawn from the seed hit the
 * pair: application writes, zeroes, trims (FUA sometimes), flushes and
 * checked reads on the Primary; link cuts (both ways or one), resets and
 * repairs; admin disconnects and connects; power cuts (the disk's cache is
 * lost, all or part) and process crashes of either node, and restarts;
 * promotions, forced promotions, demotions; the failback sequence; disk
 * I/O errors; split-brain resolutions; online verify; waits. Then the
 * healer (an admin) repairs everything: network, power, disks, roles,
 * split brains (keeping a node it picks), and waits for the resync; both
 * data areas must then be identical and hold what the application was
 * promised.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlockDeviceError } from '../../../src/blockdev/types.js';
import { UserError } from '../../../src/util/errors.js';
import { createMetadata } from '../../../src/replication/create-md.js';
import { FencedOff } from '../../../src/replication/resource.js';
import type { Protocol, SplitBrainPolicy } from '../../../src/replication/resource.js';
import { Lineage, resetLineageIds, SECTOR, describeValue } from './model.js';
import { EPOCH, drain } from './scheduler.js';
import { App, seededStream, SimNode, Violation, World, WorldConfig } from './world.js';

const MiB = 1024 * 1024;
const KiB = 1024;

export interface SimOptions {
  seed: number;
  /** Instead of the seeded episodes, a scripted scenario (the configuration is still the seed's, with `config` on top). */
  scenario?: (d: Driver, w: World) => Promise<void>;
  /** Configuration to use instead of the seed's (part of it). */
  config?: { resource?: WorldConfig['resource']; diskLatency?: [number, number]; link?: WorldConfig['link']; retryMs?: number; witness?: boolean; onNoQuorum?: 'suspend' | 'error' };
  /** Episodes of chaos, each followed by healing and the checks. */
  episodes?: number;
  /** Operations per episode. */
  ops?: number;
}

export interface SeedResult {
  seed: number;
  ok: boolean;
  violations: string[];
  config: string;
  trace: string[];
  logTail: string[];
  fingerprint: string;
  fakeMs: number;
  events: number;
  realMs: number;
  stats: World['stats'];
}

/** Fake time a whole run may take before it counts as stuck. */
const MAX_FAKE_MS = 30 * 60 * 1000;

function configFor(seed: number, splitBrainDir: string): { config: WorldConfig; describe: string } {
  const rand = seededStream(seed, 'config');
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)];
  const protocol = pick<Protocol>(['A', 'B', 'C', 'C']);
  const alSlots = pick([2, 3, 4, 64]);
  const checksumResync = rand() < 0.15;
  const afterSplitBrain = rand() < 0.7 ? 'disconnect' : pick<SplitBrainPolicy>(['discard-zero-changes', 'discard-least-changes', 'discard-younger-primary']);
  const diskLatency: [number, number] = rand() < 0.8 ? [0.01, 0.3] : [0.05, 4];
  const pingIntervalMs = pick([100, 200, 300]);
  const pingTimeoutMs = pick([300, 500, 800]);
  const retryMs = pick([50, 100, 300]);
  const witness = rand() < 0.4;
  const onNoQuorum = rand() < 0.8 ? 'suspend' : 'error';
  const config: WorldConfig = {
    seed,
    witness,
    onNoQuorum,
    deviceBytes: 16 * MiB,
    resource: { protocol, alSlots, checksumResync, afterSplitBrain },
    diskLatency,
    link: { pingIntervalMs, pingTimeoutMs },
    retryMs,
    splitBrainDir,
  };
  const describe = `${witness ? `witness (on-no-quorum ${onNoQuorum})` : 'no witness'}, protocol ${protocol}, alSlots ${alSlots}, checksumResync ${checksumResync}, after-split-brain ${afterSplitBrain}, disk latency ${diskLatency.join('-')} ms, ping ${pingIntervalMs}/${pingTimeoutMs} ms, retry ${retryMs} ms`;
  return { config, describe };
}

export async function runSeed(options: SimOptions): Promise<SeedResult> {
  const started = performance.now();
  resetLineageIds();
  // Split-brain block files and the witness's state (fsynced on every change): in memory where there is /dev/shm.
  const dir = mkdtempSync(path.join(existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'duet-sim-'));
  const seeded = configFor(options.seed, dir);
  const o = options.config ?? {};
  const config: WorldConfig = { ...seeded.config, ...o, resource: { ...seeded.config.resource, ...o.resource } };
  const describe = options.config ? `${seeded.describe}; overridden: ${JSON.stringify(options.config)}` : seeded.describe;
  const w = new World(config);
  const onUnhandled = (reason: unknown): void => w.violation(`unhandled rejection: ${(reason as Error)?.stack ?? String(reason)}`);
  // An unhandled rejection in the replication code is a violation of this seed (reported, or a known bug),
  // not the test runner's: its listeners are set aside while the seed runs.
  const others = process.listeners('unhandledRejection');
  process.removeAllListeners('unhandledRejection');
  process.on('unhandledRejection', onUnhandled);
  let finished = false;
  void drive(w, options).then(
    () => (finished = true),
    (err: unknown) => {
      if (err instanceof Violation) w.violation(err.message);
      else w.violation(`simulation error: ${(err as Error).stack ?? String(err)}`);
      finished = true;
    },
  );
  try {
    const outcome = await w.sched.run(() => finished || w.violations.length > 0, EPOCH + MAX_FAKE_MS, () => w.checkInvariants());
    if (outcome !== 'done') w.violation(`the run ${outcome === 'idle' ? 'has nothing left to do but is not finished (a promise nobody will resolve)' : 'took too long'}: ${w.describe()}`);
  } finally {
    for (const n of w.nodes) w.kill(n, 'crash');
    w.owner.kill();
    await drain();
    await drain();
    process.off('unhandledRejection', onUnhandled);
    for (const l of others) process.on('unhandledRejection', l);
    // What the run left in its files (split-brain blocks, the witness's state) is part of the run too.
    for (const file of filesUnder(dir)) w.fingerprint.update(file).update(readFileSync(path.join(dir, file)));
    rmSync(dir, { recursive: true, force: true });
  }
  for (const line of w.trace) w.fingerprint.update(line);
  return {
    seed: options.seed,
    ok: w.violations.length === 0,
    violations: w.violations,
    config: describe,
    trace: w.trace,
    logTail: w.logTail,
    fingerprint: w.fingerprint.digest('hex').slice(0, 16),
    fakeMs: w.sched.now - EPOCH,
    events: w.sched.ran,
    realMs: performance.now() - started,
    stats: w.stats,
  };
}

/** The files under `dir`, by their path from it, in a fixed order. */
function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => path.relative(dir, path.join(e.parentPath ?? e.path, e.name)))
    .sort();
}

/* ------------------------------------------------------------ the driver */

async function drive(w: World, options: SimOptions): Promise<void> {
  const d = new Driver(w);
  await d.setUp();
  if (options.scenario) {
    await options.scenario(d, w);
    return;
  }
  const episodes = options.episodes ?? 2;
  const ops = options.ops ?? 30;
  for (let e = 1; e <= episodes; e++) {
    w.trace.push(`episode ${e}`);
    await d.ensurePrimary();
    for (let i = 0; i < ops; i++) {
      await d.step();
      if (w.violations.length > 0) return;
    }
    await d.heal();
    if (w.violations.length > 0) return;
  }
}

type OpName =
  | 'write'
  | 'zero'
  | 'trim'
  | 'flush'
  | 'read'
  | 'cut'
  | 'heal-net'
  | 'reset'
  | 'disconnect'
  | 'connect'
  | 'power'
  | 'crash'
  | 'restart'
  | 'promote'
  | 'force'
  | 'demote'
  | 'failback'
  | 'eio'
  | 'resolve'
  | 'verify'
  | 'witness-cut'
  | 'witness-down'
  | 'witness-up'
  | 'wait';

export class Driver {
  private readonly rand: () => number;
  private readonly opRand: () => number;

  constructor(private readonly w: World) {
    this.rand = w.stream('driver');
    this.opRand = w.stream('ops');
  }

  private int(lo: number, hi: number): number {
    return lo + Math.floor(this.rand() * (hi - lo + 1));
  }

  private pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.rand() * xs.length)];
  }

  sleep(ms: number): Promise<void> {
    return this.w.clock.sleep(ms);
  }

  /** Wait (fake time) until `cond`; false if it did not come within `ms`. */
  async waitFor(cond: () => boolean, ms: number): Promise<boolean> {
    const until = this.w.sched.now + ms;
    while (!cond()) {
      if (this.w.sched.now >= until) return false;
      await this.sleep(5);
    }
    return true;
  }

  /** `p`, or a violation if it has not settled within `ms` of fake time (something hangs). */
  async bounded<T>(p: Promise<T>, ms: number, what: string, why: () => string = () => ''): Promise<T> {
    let settled = false;
    const guarded = p.finally(() => (settled = true));
    void guarded.catch(() => undefined);
    const ok = await this.waitFor(() => settled, ms);
    if (!ok) throw new Violation(`stuck: ${what} did not finish within ${ms} ms of fake time${why()} (${this.w.describe()})`);
    return guarded;
  }

  get alive(): SimNode[] {
    return this.w.nodes.filter((n) => n.r !== undefined);
  }

  get primaries(): SimNode[] {
    return this.w.nodes.filter((n) => n.r?.role === 'Primary');
  }

  op(line: string): void {
    this.w.trace.push(`${this.w.t} ${line}   [${this.w.describe()}]`);
  }

  /* -------------------------------------------------------------- set up */

  async setUp(): Promise<void> {
    const w = this.w;
    w.trace.push(`seed ${w.config.seed}`);
    if (w.config.witness) w.startWitness();
    for (const n of w.nodes) {
      // `duet resource create-md` on each new disk.
      await createMetadata(n.hw, { resource: 'sim', node: n.name, clock: w.clock });
      await n.hw.flush();
      await this.bounded(w.start(n), 10_000, `opening ${n.name}`);
    }
    const sectors = w.dataBytes / SECTOR;
    const initial = new Lineage(sectors, 'new disks');
    for (const n of w.nodes) w.setLineage(n.name, initial);
    w.startConnector();
    if (!(await this.waitFor(() => w.nodes.every((n) => n.r?.peer?.phase === 'connected'), 10_000))) throw new Violation(`two new disks did not connect: ${w.describe()}`);
    const first = this.pick(w.nodes);
    this.op(`promote --force ${first.name} (initial)`);
    await this.promote(first, true);
    if (!(await this.waitFor(() => w.inSync(), 60_000))) throw new Violation(`the initial sync did not finish: ${w.describe()}`);
  }

  async ensurePrimary(): Promise<void> {
    if (this.primaries.length > 0) return;
    const n = this.pick(this.alive);
    if (!n) return;
    this.op(`promote ${n.name} (episode start)`);
    await this.promote(n, false);
  }

  /* --------------------------------------------------------- operations */

  private choose(): OpName {
    const w = this.w;
    const primaries = this.primaries.filter((n) => n.proc?.app);
    const down = w.nodes.filter((n) => !n.r);
    const splitBrain = w.nodes.some((n) => /split brain/.test(n.r?.lastRefusal ?? ''));
    const weights: [OpName, number][] = [
      ['write', primaries.length > 0 ? 30 : 0],
      ['zero', primaries.length > 0 ? 4 : 0],
      ['trim', primaries.length > 0 ? 3 : 0],
      ['flush', primaries.length > 0 ? 7 : 0],
      ['read', primaries.length > 0 ? 7 : 0],
      ['cut', w.net.partitions.length === 0 ? 4 : 0],
      ['heal-net', w.net.partitions.length > 0 ? 8 : 0],
      ['reset', this.alive.some((n) => n.r?.peer) ? 2 : 0],
      ['disconnect', 2],
      ['connect', w.nodes.some((n) => n.r?.standAlone) ? 4 : 0],
      ['power', 2.5],
      ['crash', 2.5],
      ['restart', down.length > 0 ? 8 : 0],
      ['promote', this.alive.some((n) => n.r!.role === 'Secondary') ? 5 : 0],
      ['force', 1.5],
      ['demote', primaries.length > 0 ? 4 : 0],
      ['failback', this.primaries.length === 1 && w.inSync() ? 1.5 : 0],
      ['eio', 1.5],
      ['resolve', splitBrain ? 6 : 0],
      ['verify', w.inSync() ? 1.5 : 0],
      ['witness-cut', w.config.witness ? 2 : 0],
      ['witness-down', w.witnessProc ? 1.5 : 0],
      ['witness-up', w.config.witness && !w.witnessProc ? 5 : 0],
      ['wait', 4],
    ];
    const total = weights.reduce((s, [, x]) => s + x, 0);
    let r = this.opRand() * total;
    for (const [name, x] of weights) {
      r -= x;
      if (r < 0) return name;
    }
    return 'wait';
  }

  /** A random range of the data area, sector-aligned: mostly small, sometimes large, often in the first extents. */
  private range(max: number): { offset: number; length: number } {
    const span = this.rand() < 0.6 ? Math.min(this.w.dataBytes, 8 * MiB) : this.w.dataBytes;
    const length = SECTOR * this.int(1, Math.max(1, Math.floor(max / SECTOR)));
    const offset = SECTOR * this.int(0, (span - length) / SECTOR);
    return { offset, length };
  }

  private size(): number {
    const r = this.rand();
    return r < 0.5 ? 8 * KiB : r < 0.9 ? 128 * KiB : 1536 * KiB;
  }

  async step(): Promise<void> {
    const w = this.w;
    const name = this.choose();
    const primary = (): SimNode | undefined => this.pick(this.primaries.filter((n) => n.proc?.app));
    switch (name) {
      case 'write':
      case 'zero':
      case 'trim': {
        const n = primary();
        if (!n) break;
        const { offset, length } = this.range(name === 'write' ? this.size() : this.rand() < 0.3 ? 2 * MiB : 64 * KiB);
        const fua = this.rand() < 0.15;
        this.op(`${name} ${offset}+${length}${fua ? ' fua' : ''} on ${n.name}`);
        n.proc!.app!.write(name === 'write' ? 'data' : name, offset, length, fua);
        w.stats.writes++;
        break;
      }
      case 'flush': {
        const n = primary();
        if (!n) break;
        this.op(`flush on ${n.name}`);
        n.proc!.app!.flush();
        break;
      }
      case 'read': {
        const n = primary();
        if (!n) break;
        const { offset, length } = this.range(this.rand() < 0.7 ? 64 * KiB : MiB);
        this.op(`read ${offset}+${length} on ${n.name}`);
        n.proc!.app!.read(offset, length);
        w.stats.reads++;
        break;
      }
      case 'cut': {
        const oneWay = this.rand() < 0.2;
        const [a, b] = this.rand() < 0.5 ? ['alpha', 'bravo'] : ['bravo', 'alpha'];
        this.op(`cut the network ${oneWay ? `${a} -> ${b}` : 'both ways'}`);
        w.net.partition(a, b, oneWay);
        break;
      }
      case 'heal-net':
        this.op('repair the network');
        w.net.healAll();
        break;
      case 'reset': {
        const n = this.pick(this.alive.filter((x) => x.proc?.socket && !x.proc.socket.destroyed));
        if (!n) break;
        this.op(`reset the connection (from ${n.name}'s side)`);
        n.proc!.socket!.destroy();
        break;
      }
      case 'disconnect': {
        const n = this.pick(this.alive);
        if (!n) break;
        this.op(`resource disconnect on ${n.name}`);
        await this.adminDisconnect(n);
        break;
      }
      case 'connect': {
        const n = this.pick(w.nodes.filter((x) => x.r?.standAlone));
        if (!n) break;
        this.op(`resource connect on ${n.name}`);
        n.r!.standAlone = false;
        n.r!.lastRefusal = undefined;
        break;
      }
      case 'power':
      case 'crash': {
        const n = this.pick(this.alive);
        if (!n) break;
        await this.down(n, name);
        break;
      }
      case 'restart': {
        const n = this.pick(w.nodes.filter((x) => !x.r));
        if (!n) break;
        const repaired = n.faults.length > 0 && this.rand() < 0.5;
        this.op(`restart ${n.name}${repaired ? ' (disk errors repaired)' : ''}`);
        if (repaired) n.clearFaults();
        await this.start(n);
        break;
      }
      case 'promote':
      case 'force': {
        const n = this.pick(this.alive.filter((x) => x.r!.role === 'Secondary'));
        if (!n) break;
        this.op(`promote${name === 'force' ? ' --force' : ''} ${n.name}`);
        await this.promote(n, name === 'force');
        break;
      }
      case 'demote': {
        const n = primary();
        if (!n) break;
        this.op(`demote ${n.name}`);
        await this.demote(n);
        break;
      }
      case 'failback':
        await this.failback();
        break;
      case 'eio': {
        const n = this.pick(this.alive);
        if (!n) break;
        const op = this.pick(['write', 'read', 'flush', '*'] as const);
        const ranged = op !== 'flush' && this.rand() < 0.7;
        const offset = ranged ? SECTOR * this.int(0, (w.dataBytes - MiB) / SECTOR) : undefined;
        const count = this.rand() < 0.5 ? this.int(1, 3) : undefined;
        this.op(`disk of ${n.name} fails: EIO on ${op}${ranged ? ` at ${offset}+1MiB` : ''}${count ? ` (${count} times)` : ' (until repaired)'}`);
        n.fail({ op, offset, length: ranged ? MiB : undefined, count, code: 'EIO' });
        break;
      }
      case 'resolve': {
        const keep = this.pick(this.alive);
        if (!keep) break;
        await this.resolve(keep);
        break;
      }
      case 'verify':
        this.verify();
        break;
      case 'witness-cut': {
        const n = this.pick(w.nodes);
        const oneWay = this.rand() < 0.2;
        this.op(`cut the network between ${n.name} and the witness${oneWay ? ' (one way)' : ''}`);
        if (oneWay && this.rand() < 0.5) w.net.partition('witness', n.name, true);
        else w.net.partition(n.name, 'witness', oneWay);
        break;
      }
      case 'witness-down':
        this.op('the witness stops');
        w.stopWitness();
        break;
      case 'witness-up':
        this.op('the witness starts');
        w.startWitness();
        break;
      case 'wait': {
        const ms = this.int(100, 2000);
        this.op(`wait ${ms} ms`);
        await this.sleep(ms);
        break;
      }
    }
    const gap = this.rand();
    await this.sleep(gap < 0.4 ? this.rand() * 2 : gap < 0.8 ? 2 + this.rand() * 28 : 30 + this.rand() * 270);
  }

  /* ---------------------------------------------------- admin actions */

  async start(n: SimNode): Promise<void> {
    const w = this.w;
    try {
      await this.bounded(w.start(n), 10_000, `restarting ${n.name}`);
    } catch (err) {
      if (err instanceof Violation) throw err;
      w.note(`${n.name} does not start: ${(err as Error).message}`);
      w.kill(n, 'crash');
    }
  }

  async down(n: SimNode, how: 'power' | 'crash'): Promise<void> {
    const w = this.w;
    if (how === 'power') {
      const keep = this.rand() < 0.5 ? 'none' : 'random';
      this.op(`power cut on ${n.name} (cache: ${keep === 'none' ? 'all lost' : 'partly kept'})`);
      w.kill(n, 'power');
      await n.hw.powerCut({ keep });
      n.hw.powerOn();
      w.stats.powerCuts++;
    } else {
      this.op(`${n.name}'s process crashes`);
      w.kill(n, 'crash');
      w.stats.crashes++;
    }
  }

  /** `resource disconnect` (as the node daemon does it): StandAlone; a Primary flushes and tells the peer it goes on alone. */
  async adminDisconnect(n: SimNode): Promise<void> {
    const r = n.r!;
    r.standAlone = true;
    const peer = r.peer;
    if (peer?.replicating && r.role === 'Primary') {
      let flushed = false;
      const flushing = r.flush().catch(() => undefined).finally(() => (flushed = true));
      await this.waitFor(() => flushed, 10_000);
      if (!flushed && r.holding) {
        // Its writes wait for quorum: so does the flush, and the admin's command (it times out; the node goes on).
        this.w.note(`  ${n.name}: the flush before disconnecting waits for quorum; the admin's command times out`);
        void flushing.then(() => peer.outdatePeer());
        r.peer?.close('disconnected by the admin');
        return;
      }
      await this.bounded(flushing, 1, `${n.name}'s flush before disconnecting`);
      peer.outdatePeer();
    }
    r.peer?.close('disconnected by the admin');
  }

  async promote(n: SimNode, force: boolean): Promise<boolean> {
    const w = this.w;
    const r = n.r;
    if (!r || r.role === 'Primary') return false;
    const diskBefore = r.disk;
    const proc = n.proc!;
    // --force: the admin's word, past the witness too.
    if (force) w.forcedSinceSync = true;
    const forced = force && diskBefore !== 'UpToDate' && diskBefore !== 'Diskless';
    const giBefore = r.record.gi.current;
    const promoting = r.promote(force);
    // A promotion refused after it started a new generation leaves that generation behind.
    void promoting.catch(() => {
      if (proc.alive && r.role === 'Secondary' && r.record.gi.current !== giBefore) {
        w.leftoverGeneration = n.name;
        w.note(`  ${n.name}: its refused promotion left a new generation (${r.record.gi.current.slice(0, 4)})`);
      }
    });
    let settled = false;
    void promoting.then(
      () => (settled = true),
      () => (settled = true),
    );
    await this.waitFor(() => settled, 10_000);
    if (!settled && r.holding) {
      // It waits to fence its peer and nobody answers (known: promote-waits-for-quorum): the admin's command
      // times out, the node goes on trying; once it is Primary the application starts on it.
      w.stats.promotionsWaiting++;
      w.note(`  ${n.name}: the promotion waits for quorum to fence its peer; the admin's command times out`);
      void promoting.then(async () => {
        if (!proc.alive || r.role !== 'Primary') return;
        w.promotedAt.set(n.name, w.sched.now);
        await this.promoted(n, forced, force);
        if (proc.alive && (r.role as string) === 'Primary') proc.app ??= new App(proc, w);
      }, () => undefined);
      return false;
    }
    try {
      await this.bounded(promoting, 10_000, `promoting ${n.name}${force ? ' with --force' : ''}`);
    } catch (err) {
      if (err instanceof Violation) throw err;
      if (!(err instanceof UserError) && !(err instanceof BlockDeviceError)) throw err;
      w.note(`${n.name}: promotion refused: ${err.message}`);
      return false;
    }
    if (!proc.alive) return false;
    w.promotedAt.set(n.name, w.sched.now);
    await this.promoted(n, forced, force);
    if (proc.alive && (r.role as string) === 'Primary') proc.app = new App(proc, w);
    return true;
  }

  /**
   * The lineage a new Primary serves: the one it follows if its disk has
   * every durable write of it; else (promoted without the peer on old data,
   * or forced) a new one from what its disk holds. Promoted without the
   * peer, it may diverge from it: a branch of its own.
   */
  private async promoted(n: SimNode, forced: boolean, force: boolean): Promise<void> {
    const w = this.w;
    const r = n.r!;
    const other = w.other(n);
    const current = w.lineageOf(n.name);
    if (r.disk === 'Diskless') {
      // It serves the peer's disk.
      if (r.peer?.replicating && other.r) w.setLineage(n.name, w.lineageOf(other.name));
      return;
    }
    const c = n.contents(w.dataBytes);
    w.checkNoGarbage(n, c);
    // --force: "this copy is the good data" (past the witness too): what only the other node has may be
    // overwritten from here, by the admin's word.
    if (force) w.lineageOf(other.name).discardedBy ??= `${n.name} promoted with --force`;
    if (forced) {
      w.stats.forcedPromotions++;
      const l = Lineage.fromDisk(`${n.name} forced`, c.durable, c.cached);
      w.note(`  model: ${n.name} forced Primary: ${l.name} from its disk`);
      const before = w.lineageOf(n.name);
      w.setLineage(n.name, l);
      // The link may have come up on the forced generation before this hook ran: a peer that already
      // decided to resync from it follows the new branch, not the one this disk held before.
      if (other.r?.peer?.phase === 'sync-target' && w.lineageOf(other.name) === before) {
        w.note(`  model: ${other.name} (its sync target already) follows ${l.name}`);
        w.setLineage(other.name, l);
      }
      return;
    }
    let stale = 0;
    let first = '';
    /** Sectors whose promised value is only in this node's cache: durable here only once it flushes. */
    const cachedOnly: number[] = [];
    for (let s = 0; s < c.durable.length; s++) {
      if (current.fits(s, c.durable[s])) continue;
      // Still in its cache counts: the node is up and will flush it (if it loses power first, the checks after that say so).
      if (current.fits(s, c.cached[s])) {
        cachedOnly.push(s);
        continue;
      }
      if (stale === 0) first = `sector ${s} holds ${describeValue(c.durable[s])}, ${current.name} promised ${describeValue(current.sureValue(s))}`;
      stale++;
    }
    if (stale > 0) {
      w.stats.stalePromotions++;
      const unfenced = w.unfencedGeneration && w.unfencedGeneration !== n.name ? `; ${w.unfencedGeneration} went on when this node's disk failed, without fencing it at the witness` : '';
      if (w.config.witness && !force) w.violation(`${n.name} was promoted without --force on a disk that lacks ${stale} sectors of durable writes (${first}) although a witness is configured${unfenced}`);
      const l = Lineage.fromDisk(`${n.name} promoted on old data`, c.durable, c.cached);
      w.note(`  model: ${n.name} promoted on a disk ${stale} sectors behind ${current.name} (first: ${first}): ${l.name} from its disk`);
      w.setLineage(n.name, l);
      return;
    }
    const peer = r.peer;
    // Without the peer (or with a peer that is Primary too: their link was down, not yet noticed), it may diverge.
    if (!peer || !peer.replicating || peer.phase === 'handshake' || other.r?.role === 'Primary') {
      const l = new Lineage(current.sectors, `${n.name} alone`, current);
      // On its own, a value it holds only in its cache is not durable yet: a power cut may take it.
      for (const s of cachedOnly) l.rebaseSector(s, c.durable[s], c.cached[s]);
      w.note(`  model: ${n.name} Primary without its peer: ${l.name} branches from ${current.name}`);
      w.setLineage(n.name, l);
    }
  }

  async demote(n: SimNode): Promise<void> {
    const proc = n.proc!;
    const app = proc.app;
    // Writes held for quorum (or failing: fenced off) keep the pool from closing: `resource secondary --force`
    // (at once, or when the admin sees the close hang on held writes).
    let force = false;
    const forced = (): void => {
      force = true;
      this.w.note(`  ${n.name}: writes held or fenced off: resource secondary --force`);
      proc.r.fenceOff(`resource sim: made Secondary by force on ${n.name}: held writes fail`);
    };
    if (proc.r.holding || proc.r.fencedOff !== undefined) forced();
    if (app) {
      let closed = false;
      const closing = app.close().finally(() => (closed = true));
      await this.waitFor(() => closed || !proc.alive || proc.r.holding, 20_000);
      if (!closed && proc.alive && proc.r.holding && !force) forced();
      await this.bounded(closing, 20_000, `${n.name}'s application closing`);
      proc.app = undefined;
    }
    if (!proc.alive) return;
    await this.bounded(proc.r.demote(force), 10_000, `demoting ${n.name}`);
  }

  /** An admin resolves a split brain: keep `keep`'s data (the other steps down first). */
  async resolve(keep: SimNode): Promise<void> {
    const w = this.w;
    const loser = w.other(keep);
    this.op(`resolve split brain --keep ${keep.name}`);
    if (loser.r?.role === 'Primary') await this.demote(loser);
    const lost = w.lineageOf(loser.name);
    if (lost !== w.lineageOf(keep.name)) lost.discardedBy = keep.name;
    w.keepChoice = keep.name;
    const where = this.pick(['keep', 'loser', 'both'] as const);
    for (const n of [keep, loser]) {
      const r = n.r;
      if (!r) continue;
      if (where === 'both' || (where === 'keep') === (n === keep)) r.keepNode = keep.name;
      r.standAlone = false;
      r.lastRefusal = undefined;
    }
  }

  /**
   * The failback sequence: the link goes, the Secondary is promoted with
   * --force (the Primary stays Primary), writes, steps down; the link comes
   * back. The Primary must not become its sync target while Primary.
   */
  async failback(): Promise<void> {
    const w = this.w;
    const p = this.primaries[0];
    const s = w.other(p);
    this.op(`failback sequence: ${p.name} stays Primary, ${s.name} forced Primary while apart`);
    w.net.partition(p.name, s.name);
    await this.waitFor(() => !p.r?.peer && !s.r?.peer, 10_000);
    if (!(await this.promote(s, true))) {
      w.net.healAll();
      return;
    }
    const app = s.proc?.app;
    for (let i = 0; app && i < this.int(1, 6); i++) {
      const { offset, length } = this.range(this.size());
      const fua = this.rand() < 0.2;
      app.write('data', offset, length, fua);
    }
    app?.flush();
    if (s.r) await this.demote(s);
    w.net.healAll();
  }

  verify(): void {
    const w = this.w;
    const n = this.pick(this.alive.filter((x) => x.r?.peer?.phase === 'connected'));
    if (!n) return;
    const r = n.r!;
    const session = r.peer!;
    this.op(`verify from ${n.name}`);
    w.stats.verifies++;
    const clean = (): boolean => w.nodes.every((x) => x.faults.length === 0 && x.r !== undefined) && r.peer === session && session.phase === 'connected' && w.inSync();
    const cleanBefore = clean();
    void session.runVerify().then(
      (v) => {
        if (v.outOfSyncBytes > 0 && cleanBefore && clean()) {
          w.violation(`online verify from ${n.name} found ${v.outOfSyncBytes} bytes that differ between two in-sync disks: ${JSON.stringify(v.ranges.slice(0, 5))}`);
        } else w.note(`verify from ${n.name}: ${v.outOfSyncBytes} bytes differ`);
      },
      (err: unknown) => w.note(`verify from ${n.name} ended: ${(err as Error).message}`),
    );
  }

  /* ------------------------------------------------------------- healing */

  /**
   * What an admin does to get a healthy pair back: the network repaired,
   * every node up on a working disk, both told to connect; then whatever
   * the nodes refuse for (a Primary that would be sync target, a split
   * brain, two Primaries, nobody with good data) is answered, until they
   * are in sync. Then both data areas must be the same and hold what the
   * application was promised.
   */
  async heal(): Promise<void> {
    const w = this.w;
    this.op('heal: repair the network, power, disks; connect');
    w.net.healAll();
    if (w.config.witness) w.startWitness();
    for (const n of w.nodes) {
      n.clearFaults();
      await this.attachRepaired(n);
    }
    for (const n of w.nodes) {
      if (n.r?.fencedOff !== undefined) {
        this.op(`heal: ${n.name} is fenced off: it steps down`);
        await this.demote(n);
      }
    }
    for (let attempt = 0; ; attempt++) {
      await this.untilInSync();
      // The application's last writes, flushed through the Primary (or by the admin).
      for (const n of this.primaries) if (n.proc?.app) await this.bounded(n.proc.app.quiet(), 20_000, `${n.name}'s application settling`);
      const p = this.primaries.find((n) => n.proc?.app);
      if (p) await this.bounded(p.proc!.app!.flushNow(), 10_000, 'the final flush');
      else {
        const n = w.nodes[0];
        try {
          await this.bounded(n.r!.flush(), 10_000, 'the final flush');
        } catch (err) {
          // A forced promotion still waiting to fence its peer may be refused meanwhile (the witness holds this node
          // Outdated): the flush reached the disks, then reports that refusal, as the admin's command would.
          if (!(err instanceof FencedOff)) throw err;
          w.note(`  heal: the final flush on ${n.name}: ${err.message}`);
        }
      }
      if (await this.waitFor(() => w.inSync(), 2_000)) break;
      // Blocks marked meanwhile (a verify still running found some): once more.
      if (attempt >= 2) throw new Violation(`not in sync after the final flush: ${w.describe()}`);
    }
    await this.checkHealed();
  }

  /** Every node up on its repaired disk: one that went Diskless is restarted, which attaches its disk again. */
  private async attachRepaired(n: SimNode): Promise<void> {
    const w = this.w;
    if (n.r?.disk === 'Diskless') {
      w.note(`  heal: restart ${n.name} to attach its repaired disk`);
      w.kill(n, 'crash');
    }
    if (!n.r) {
      n.clearFaults();
      await this.start(n);
      if (!n.r) throw new Violation(`${n.name} does not start on a repaired disk`);
    }
  }

  /** Answer what the nodes ask an admin for until they are in sync. */
  private async untilInSync(): Promise<void> {
    const w = this.w;
    for (let round = 0; ; round++) {
      if (round > 30) throw new Violation(`healing did not converge: ${w.describe()}`);
      // A disk can fail after the repair (a read under way when the faults were cleared): attached again.
      for (const n of w.nodes) await this.attachRepaired(n);
      for (const n of w.nodes) {
        const r = n.r!;
        if (r.standAlone) {
          r.standAlone = false;
          r.lastRefusal = undefined;
        }
      }
      const needsAdmin = (): boolean => w.nodes.some((n) => n.r!.standAlone || (n.r!.lastRefusal !== undefined && !n.r!.peer));
      await this.waitFor(() => w.inSync() || needsAdmin(), 5_000);
      if (w.inSync()) break;
      if (!needsAdmin() && w.nodes.every((n) => n.r!.peer?.phase === 'connected' && n.r!.disk === 'Outdated')) {
        // Both Outdated (each held Outdated at the witness, marks no claim can end): only --force gets them out.
        const n = this.pick(w.nodes);
        this.op(`heal: both disks Outdated: promote --force ${n.name}, then Secondary`);
        w.stats.bothOutdated++;
        if (await this.promote(n, true)) await this.demote(n);
        continue;
      }
      if (!needsAdmin() && w.nodes.every((n) => n.r!.peer?.phase === 'connected')) {
        // Connected, nothing resyncing, yet not in sync (blocks marked while connected, an Outdated disk next
        // to an UpToDate one): what an admin does is disconnect and connect again.
        this.op('heal: connected but not in sync: resource disconnect and connect');
        w.nodes[0].r!.peer!.close('admin: disconnect and connect again');
        continue;
      }
      await this.answerRefusal();
    }
  }

  private async answerRefusal(): Promise<void> {
    const w = this.w;
    const reasons = w.nodes.map((n) => n.r!.lastRefusal ?? '').filter((x) => x !== '');
    const reason = reasons[0] ?? '';
    if (reason === '') return;
    const primaries = this.primaries;
    if (/split brain/.test(reason)) {
      const keep = primaries.length === 1 ? primaries[0] : this.pick(w.nodes);
      await this.resolve(keep);
    } else if (/would become sync target|data is in use/.test(reason)) {
      const target = w.nodes.find((n) => reason.startsWith(`${n.name} `)) ?? primaries[0];
      if (target && (target.r!.role === 'Primary' || target.proc?.app)) {
        this.op(`heal: ${target.name} steps down so the resync can run`);
        await this.demote(target);
      }
    } else if (/both nodes are Primary/.test(reason)) {
      const n = this.pick(primaries);
      if (n) {
        this.op(`heal: both Primary: ${n.name} steps down`);
        await this.demote(n);
      }
    } else if (/Primary without a disk/.test(reason)) {
      const n = primaries.find((x) => x.r!.disk === 'Diskless');
      if (n) {
        this.op(`heal: ${n.name} (Primary without a disk) steps down`);
        await this.demote(n);
      }
    } else if (/would be the sync source but its disk is|nobody has good data/.test(reason)) {
      // Nobody has good data: the admin picks a disk and forces it.
      const n = this.pick(w.nodes);
      this.op(`heal: nobody has good data: promote --force ${n.name}`);
      if (n.r!.role === 'Primary') await this.demote(n);
      await this.promote(n, true);
    } else if (/lacks writes made since, and \w+ has no disk/.test(reason)) {
      // A Diskless node facing the disk it saw fail: its own disk, repaired, is attached at the top of each
      // round (attachRepaired), and the next connect decides on it. (The refusal may be the last one of a
      // node that has its disk back already.)
      this.op('heal: the Diskless node\'s own disk is attached again: connect');
    } else if (/holds unrelated data/.test(reason) && w.stats.forcedPromotions > 0) {
      // Forced promotions on both sides took them further apart than the generations' history reaches
      // (DRBD's "unrelated data" too). The admin does what the message says: keeps one copy (the Primary
      // with good data if there is one) and gives the other disk fresh metadata, which takes a full sync.
      const good = w.nodes.filter((n) => n.r!.disk === 'UpToDate');
      const keep = good.find((n) => n.r!.role === 'Primary') ?? good[0] ?? this.pick(w.nodes);
      const loser = w.other(keep);
      this.op(`heal: unrelated data: keep ${keep.name}; resource create-md --force on ${loser.name}`);
      if (loser.r?.role === 'Primary') await this.demote(loser);
      const lost = w.lineageOf(loser.name);
      if (lost !== w.lineageOf(keep.name)) lost.discardedBy = keep.name;
      w.kill(loser, 'crash');
      await createMetadata(loser.hw, { resource: 'sim', node: loser.name, force: true, clock: w.clock });
      await loser.hw.flush();
      await this.start(loser);
    } else {
      throw new Violation(`the nodes refuse to connect: ${reason} [${w.describe()}]`);
    }
    for (const n of w.nodes) {
      n.r!.standAlone = false;
      n.r!.lastRefusal = undefined;
    }
  }

  /** Both data areas identical, and each sector a value the application may see. */
  private async checkHealed(): Promise<void> {
    const w = this.w;
    const [a, b] = w.nodes;
    const la = w.lineageOf(a.name);
    const lb = w.lineageOf(b.name);
    if (la !== lb) throw new Violation(`in sync, but the model has ${a.name} on ${la.name} and ${b.name} on ${lb.name}`);
    const ca = a.contents(w.dataBytes);
    // Most of the time the two disks are the same: decode the second only if they differ.
    const cb = sameData(a, b, w.dataBytes) ? ca : b.contents(w.dataBytes);
    w.checkNoGarbage(a, ca);
    w.checkNoGarbage(b, cb);
    let differ = 0;
    let wrong = 0;
    const report: string[] = [];
    for (let s = 0; s < ca.cached.length; s++) {
      const va = ca.cached[s];
      const vb = cb.cached[s];
      if (va !== vb) {
        if (differ++ < 3) report.push(`sector ${s} (offset ${s * SECTOR}): ${a.name} has ${describeValue(va)}, ${b.name} ${describeValue(vb)}`);
        continue;
      }
      if (!la.fits(s, va)) {
        if (wrong++ < 3) report.push(`sector ${s} (offset ${s * SECTOR}): both have ${describeValue(va)}; ${la.name} allows ${la.allowed(s).map(describeValue).join(', ')}`);
      }
    }
    const known = w.disklessToInconsistent ? ' (after a Diskless Primary wrote to a peer that neither was UpToDate nor had recorded its disk failure)' : '';
    if (differ > 0) w.violation(`after healing, the data areas differ in ${differ} sectors${known}: ${report.join('; ')}`);
    else if (wrong > 0) w.violation(`after healing, ${wrong} sectors hold what the application was not promised (last resync rule ${w.lastSyncRule ?? 'none'}): ${report.join('; ')}`);
    else {
      for (let s = 0; s < ca.cached.length; s++) la.settle(s, ca.cached[s]);
      w.note(`healed: disks identical, ${la.name} holds`);
    }
  }
}

/** Are the data areas of both disks (as reads see them) byte for byte the same? */
function sameData(a: SimNode, b: SimNode, dataBytes: number): boolean {
  if (a.hw.unflushedWrites > 0 || b.hw.unflushedWrites > 0) return false;
  const piece = 1024 * 1024;
  const x = Buffer.allocUnsafe(piece);
  const y = Buffer.allocUnsafe(piece);
  for (let at = 0; at < dataBytes; at += piece) {
    const n = Math.min(piece, dataBytes - at);
    a.mem.read(at, x.subarray(0, n));
    b.mem.read(at, y.subarray(0, n));
    if (!x.subarray(0, n).equals(y.subarray(0, n))) return false;
  }
  return true;
}
