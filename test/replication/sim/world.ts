/**
 * The simulated world: two nodes, each a disk that outlives its processes
 * (a FaultyDevice over memory) and at most one process at a time running
 * the real Resource on it; the network between them; the application on
 * whichever node is Primary; and what the application was promised
 * (lineages, model.ts). Links are made the way the Connector makes them
 * (the node whose name sorts first dials, every `retryMs`, while neither
 * side has a link or is StandAlone), but over the simulated network and
 * without the authentication handshake.
 *
 * Everything that happens goes through here, so the checks can follow it:
 * the application's writes and what they were told, the decisions the
 * nodes log on connect (who overwrites whom), promotions (did the new
 * Primary have the promised data?), and after every event of the
 * scheduler, the invariants.
 */
import { createHash, Hash } from 'node:crypto';
import type { Socket } from 'node:net';
import { pino } from 'pino';
import { MemoryDevice } from '../../../src/blockdev/memory.js';
import { FaultRule, FaultyDevice } from '../../../src/blockdev/faulty.js';
import type { BorrowedDevice } from '../../../src/blockdev/delegating.js';
import { PeerLink } from '../../../src/replication/link.js';
import { PeerSession } from '../../../src/replication/peer.js';
import { Resource, ResourceOptions } from '../../../src/replication/resource.js';
import fs from 'node:fs';
import type { FileIo } from '../../../src/util/file-io.js';
import { SimDisk } from './disk.js';
import { decodeAll, decodeSector, describeValue, GARBAGE, Lineage, pattern, SECTOR, ZERO } from './model.js';
import { Network, SimSocket } from './net.js';
import { Owner, OwnerClock, Scheduler } from './scheduler.js';
import path from 'node:path';
import { Quorum } from '../../../src/cluster/quorum.js';
import { Witness, WitnessCommand, WitnessReply } from '../../../src/cluster/witness.js';

/** How long a node waits for the witness's answer (WitnessClient's default). */
const WITNESS_TIMEOUT_MS = 1000;
/** The node daemon's heartbeat to the witness. */
const HEARTBEAT_MS = 500;

export interface WorldConfig {
  seed: number;
  /** A witness (a third vote) on its own host: fencing, quorum for promotion. */
  witness: boolean;
  onNoQuorum: 'suspend' | 'error';
  deviceBytes: number;
  resource: Partial<ResourceOptions>;
  diskLatency: [number, number];
  link: { pingIntervalMs: number; pingTimeoutMs: number };
  retryMs: number;
  splitBrainDir: string;
}

/** A seeded stream of numbers in [0, 1) (mulberry32). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The stream of one purpose (the schedule, the network, a disk...) of one seed. */
export function seededStream(seed: number, name: string): () => number {
  let h = seed >>> 0;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
  return prng(h);
}

export class Violation extends Error {}

export interface LogLine {
  node: string;
  event?: string;
  msg?: string;
  [k: string]: unknown;
}

/** One run of the Resource on a node's disk; it ends when the process dies. */
export class Process {
  readonly owner: Owner;
  readonly clock: OwnerClock;
  readonly disk: SimDisk;
  r!: Resource;
  app: App | undefined;
  socket: SimSocket | undefined;
  quorum: Quorum | undefined;

  constructor(
    readonly node: SimNode,
    readonly world: World,
    incarnation: number,
  ) {
    this.owner = new Owner(`${node.name}#${incarnation}`);
    this.clock = new OwnerClock(world.sched, this.owner);
    this.disk = new SimDisk(node.hw, this.clock, world.stream(`disk-${node.name}-${incarnation}`), world.config.diskLatency);
  }

  get alive(): boolean {
    return this.owner.alive;
  }
}

export class SimNode {
  readonly mem: MemoryDevice;
  readonly hw: FaultyDevice;
  proc: Process | undefined;
  incarnations = 0;
  /** Errors injected into the disk (the hardware keeps them across restarts until cleared). */
  faults: FaultRule[] = [];

  constructor(
    readonly name: string,
    readonly world: World,
  ) {
    this.mem = new MemoryDevice(world.config.deviceBytes, `${name}-disk`);
    this.hw = new FaultyDevice(this.mem, { writeBack: true, random: world.stream(`hw-${name}`) });
  }

  get r(): Resource | undefined {
    return this.proc?.alive ? this.proc.r : undefined;
  }

  fail(rule: FaultRule): void {
    this.faults.push(rule);
    this.hw.failWith(rule);
  }

  clearFaults(): void {
    this.faults = [];
    this.hw.clearFaults();
  }

  /**
   * What the disk holds now, per sector of the data area: durable (what a
   * power cut with nothing kept leaves) and cached (what reads return).
   */
  contents(dataBytes: number): { durable: Int32Array; cached: Int32Array } {
    const durable = new Int32Array(dataBytes / SECTOR);
    // Holes read as zeros (ZERO is 0): decode only what is allocated.
    for (const e of this.mem.blockStatus(0, dataBytes)) {
      if (e.flags !== 0) continue;
      const buf = scratch(0, e.length);
      this.mem.read(e.offset, buf);
      durable.set(decodeAll(buf, e.offset / SECTOR), e.offset / SECTOR);
    }
    if (this.hw.unflushedWrites === 0) return { durable, cached: durable };
    // What reads return: the durable data with the cache's writes on top, oldest first.
    const cached = Int32Array.from(durable);
    const pending = (this.hw as unknown as { pending: { kind: 'write' | 'zero' | 'trim'; offset: number; length?: number; data?: Buffer }[] }).pending;
    for (const p of pending) {
      const length = p.data?.length ?? p.length ?? 0;
      if (p.offset >= dataBytes) continue;
      const end = Math.min(dataBytes, p.offset + length);
      if (p.data) cached.set(decodeAll(p.data.subarray(0, end - p.offset), p.offset / SECTOR), p.offset / SECTOR);
      else cached.fill(ZERO, p.offset / SECTOR, end / SECTOR);
    }
    return { durable, cached };
  }
}

const scratchBufs: Buffer[] = [];

/** Buffers reused across reads of whole disks (fresh 16 MiB buffers cost page faults every time). */
function scratch(i: number, bytes: number): Buffer {
  if (!scratchBufs[i] || scratchBufs[i].length < bytes) scratchBufs[i] = Buffer.alloc(bytes);
  return scratchBufs[i].subarray(0, bytes);
}

interface AppOp {
  offset: number;
  end: number;
  done: Promise<void>;
}

interface WriteRec {
  id: number;
  offset: number;
  length: number;
  lineage: Lineage;
}

/**
 * The application on a Primary (what a pool and its VMs are): it holds the
 * device open (borrowed: a resync may not change it), never races itself on
 * the same blocks, and remembers what it was told.
 */
export class App {
  readonly dev: BorrowedDevice;
  readonly inFlight = new Set<AppOp>();
  /** Acknowledged writes not yet known durable. */
  private acked: WriteRec[] = [];
  closed = false;
  stats = { writes: 0, failed: 0, flushes: 0, reads: 0 };

  constructor(
    readonly proc: Process,
    readonly world: World,
  ) {
    this.dev = proc.r.borrow();
  }

  private track(offset: number, end: number, run: () => Promise<void>): void {
    const entry: AppOp = { offset, end, done: Promise.resolve() };
    // Registered at once, so later overlapping requests wait for this one (issue order).
    const earlier = [...this.inFlight].filter((x) => x.offset < end && offset < x.end).map((x) => x.done);
    entry.done = (async () => {
      await Promise.all(earlier);
      await run();
    })().catch((err: unknown) => this.world.violation(`application bug in the simulation: ${(err as Error).stack}`));
    this.inFlight.add(entry);
    void entry.done.then(() => this.inFlight.delete(entry));
  }

  /** kind: data, zeroes (kept allocated), or trim. */
  write(kind: 'data' | 'zero' | 'trim', offset: number, length: number, fua: boolean): void {
    if (this.closed) return;
    this.track(offset, offset + length, async () => {
      if (this.closed) return;
      const lineage = this.world.lineageOf(this.proc.node.name);
      const id = this.world.nextWriteId++;
      this.world.note(`${this.proc.node.name}: ${kind} #${id} ${offset}+${length}${fua ? ' fua' : ''} issued`);
      const value = kind === 'data' ? id : -id;
      lineage.issued(value, offset, length);
      const rec: WriteRec = { id: value, offset, length, lineage };
      this.stats.writes++;
      const diskAtIssue = this.proc.r.disk;
      if (diskAtIssue === 'Diskless') {
        const peer = this.world.other(this.proc.node).r;
        // The receiver marks nothing for a Diskless Primary's writes; only peerDiskFailed (when it was UpToDate then) saves them.
        if (!peer || peer.disk !== 'UpToDate' || !peer.record.peerDiskFailed) this.world.disklessToInconsistent = true;
      }
      try {
        if (kind === 'data') await this.dev.write(offset, pattern(id, offset, length), { fua });
        else if (kind === 'zero') await this.dev.writeZeroes(offset, length, { fua, noHole: true });
        else await this.dev.trim(offset, length, { fua });
      } catch (err) {
        this.stats.failed++;
        this.world.note(`${this.proc.node.name}: ${kind} #${id} ${offset}+${length} failed: ${(err as Error).message}`);
        return;
      }
      const r = this.proc.r;
      if (this.proc.alive && diskAtIssue !== 'UpToDate' && r.disk !== 'UpToDate' && r.peer?.state?.disk !== 'UpToDate') {
        // DRBD refuses writes then (may_do_writes): no copy of the data it lands on is good.
        this.world.violation(`${this.proc.node.name} acknowledged ${kind} #${id} while neither its disk (${r.disk}) nor its peer's (${r.peer?.state?.disk ?? 'not connected'}) is UpToDate`);
      }
      if (fua) lineage.durable(value, offset, length);
      else this.acked.push(rec);
    });
  }

  flush(): void {
    if (this.closed) return;
    this.track(0, 0, async () => this.flushNow());
  }

  /** Flush now (not queued behind other requests): what was acknowledged before is durable once it returns. */
  async flushNow(): Promise<void> {
    const covered = this.acked;
    this.acked = [];
    try {
      this.stats.flushes++;
      await this.dev.flush();
    } catch (err) {
      this.acked = covered.concat(this.acked);
      this.world.note(`${this.proc.node.name}: flush failed: ${(err as Error).message}`);
      return;
    }
    for (const w of covered) w.lineage.durable(w.id, w.offset, w.length);
  }

  /** Read through the Primary and check every sector against what was promised. */
  read(offset: number, length: number): void {
    if (this.closed) return;
    this.track(offset, offset + length, async () => {
      if (this.closed) return;
      const buf = Buffer.alloc(length);
      try {
        await this.dev.read(offset, buf);
      } catch (err) {
        this.world.note(`${this.proc.node.name}: read ${offset}+${length} failed: ${(err as Error).message}`);
        return;
      }
      this.stats.reads++;
      const lineage = this.world.lineageOf(this.proc.node.name);
      for (let at = 0; at < length; at += SECTOR) {
        const s = (offset + at) / SECTOR;
        const v = decodeSector(buf, at, s);
        if (!lineage.fits(s, v)) {
          this.world.violation(
            `read through Primary ${this.proc.node.name} at sector ${s} (offset ${offset + at}) returned ${describeValue(v)}; ${lineage.name} allows ${lineage
              .allowed(s)
              .map(describeValue)
              .join(', ')}`,
          );
          return;
        }
      }
    });
  }

  /** Everything in flight settled (or the process died: then it never will). */
  quiet(): Promise<void> {
    return Promise.all([...this.inFlight].map((x) => x.done)).then(() => undefined);
  }

  /** The pool closes: nothing new, what is in flight ends, flushed, the device given back. */
  async close(): Promise<void> {
    this.closed = true;
    await this.quiet();
    const covered = this.acked;
    this.acked = [];
    try {
      await this.dev.close();
      for (const w of covered) w.lineage.durable(w.id, w.offset, w.length);
    } catch (err) {
      this.world.note(`${this.proc.node.name}: closing the application's device failed: ${(err as Error).message}`);
    }
  }
}

export class World {
  readonly sched = new Scheduler();
  readonly owner = new Owner('simulation');
  readonly clock = new OwnerClock(this.sched, this.owner);
  readonly net: Network;
  readonly nodes: SimNode[];
  readonly violations: string[] = [];
  /** The schedule as it ran, and what happened: printed for a failing seed. */
  readonly trace: string[] = [];
  /** The last log lines of both nodes. */
  readonly logTail: string[] = [];
  private readonly lineage = new Map<string, Lineage>();
  /** When each node last became Primary (fake time). */
  readonly promotedAt = new Map<string, number>();
  nextWriteId = 1;
  dataBytes = 0;
  readonly fingerprint: Hash = createHash('sha256');
  /** Set by an admin (the healer) resolving a split brain: the node whose data stays. */
  keepChoice: string | undefined;
  /** The witness's process (undefined while it is down), when one is configured. */
  witnessProc: { owner: Owner; witness: Witness } | undefined;
  private witnessIncarnations = 0;
  /** An admin forced something (a promotion with --force) since the two were last in sync: a split brain may follow. */
  forcedSinceSync = false;
  stats = { bothOutdated: 0, promotionsWaiting: 0, witnessCalls: 0, fenced: 0, suspended: 0, connections: 0, resyncs: 0, splitBrains: 0, stalePromotions: 0, forcedPromotions: 0, powerCuts: 0, crashes: 0, detaches: 0, reads: 0, writes: 0, verifies: 0 };

  constructor(readonly config: WorldConfig) {
    this.net = new Network(this.sched, { latency: [0.05, 1.5], highWaterMark: 64 * 1024, window: 512 * 1024 }, this.stream('net'));
    this.nodes = [new SimNode('alpha', this), new SimNode('bravo', this)];
    this.gi = this.stream('gi');
  }

  /** An independent seeded stream per purpose, so adding draws to one leaves the others alone. */
  stream(name: string): () => number {
    return seededStream(this.config.seed, name);
  }

  node(name: string): SimNode {
    return this.nodes.find((n) => n.name === name)!;
  }

  other(n: SimNode): SimNode {
    return this.nodes[0] === n ? this.nodes[1] : this.nodes[0];
  }

  /** Fake ms since the start. */
  get t(): string {
    return `${(this.sched.now - 1_700_000_000_000).toFixed(1)}ms`;
  }

  note(line: string): void {
    this.trace.push(`    ${this.t} ${line}`);
  }

  violation(what: string): void {
    this.violations.push(`${this.t} ${what}`);
    this.trace.push(`!!  ${this.t} VIOLATION: ${what}`);
  }

  lineageOf(node: string): Lineage {
    return this.lineage.get(node)!;
  }

  setLineage(node: string, l: Lineage): void {
    this.lineage.set(node, l);
  }

  /* ------------------------------------------------------------ processes */

  private readonly gi: () => number;

  /** Start a process on the node's disk: Resource.open (bounded by the caller). */
  async start(n: SimNode): Promise<Process> {
    const proc = new Process(n, this, ++n.incarnations);
    n.proc = proc;
    const log = pino(
      { level: 'info', base: { node: n.name }, timestamp: () => `,"t":${(this.sched.now - 1_700_000_000_000).toFixed(3)}` },
      { write: (line: string) => this.onLog(proc, line) },
    );
    const options: ResourceOptions = {
      resource: 'sim',
      node: n.name,
      protocol: 'C',
      log,
      ...this.config.resource,
      splitBrainDir: this.config.splitBrainDir,
      fileIo: slowFileIo(proc.clock),
      clock: proc.clock,
      randomBytes: (size) => {
        const b = Buffer.alloc(size);
        for (let i = 0; i < size; i++) b[i] = Math.floor(this.gi() * 256);
        return b;
      },
    };
    if (this.config.witness) {
      const quorum = new Quorum({ node: n.name, call: (c) => this.callWitness(proc, c), log, now: () => proc.clock.now(), sleep: (ms) => proc.clock.sleep(ms) });
      proc.quorum = quorum;
      const peerNode = this.other(n).name;
      options.fence = (_r, generation, signal) => quorum.fence(proc.r, peerNode, this.config.onNoQuorum, generation, signal);
      options.unfence = (_r, generation) => quorum.cancelFence(proc.r, peerNode, generation);
      options.mayPromote = (_r, force) => quorum.mayPromote(proc.r, force);
    }
    proc.r = await Resource.open(proc.disk, options);
    // The model learns whether a resync began on its target (see unbegunFollow).
    const r = proc.r;
    const beginSync = r.beginSync.bind(r);
    r.beginSync = (...args: Parameters<Resource['beginSync']>) => {
      const ready = beginSync(...args);
      if (args[1] === 'target') this.onTargetBegin(proc, ready);
      return ready;
    };
    this.dataBytes = proc.r.size;
    if (proc.quorum) {
      const quorum = proc.quorum;
      const entry = [{ name: 'sim', peerNode: this.other(n).name, resource: proc.r }];
      proc.clock.setInterval(() => void quorum.heartbeat(entry), HEARTBEAT_MS);
    }
    return proc;
  }

  /** The process dies: kill -9 (the kernel closes its sockets) or the power goes (nothing is said). */
  kill(n: SimNode, how: 'crash' | 'power'): void {
    const proc = n.proc;
    if (!proc?.alive) return;
    proc.owner.kill();
    if (proc.app) proc.app.closed = true;
    // A resync it was beginning as target never will: its disk holds what it held.
    this.neverBegan(n.name);
    for (const s of this.net.sockets) if (s.owner === proc.owner) s.vanish(how === 'crash');
  }

  /* --------------------------------------------------------------- witness */

  /** Start the witness's process on its state file (a restart reads the marks back). */
  startWitness(): void {
    if (this.witnessProc) return;
    const owner = new Owner(`witness#${++this.witnessIncarnations}`);
    const log = pino(
      { level: 'info', base: { node: 'witness' }, timestamp: () => `,"t":${(this.sched.now - 1_700_000_000_000).toFixed(3)}` },
      { write: (line: string) => owner.alive && this.onWitnessLog(line) },
    );
    this.witnessProc = { owner, witness: new Witness(path.join(this.config.splitBrainDir, 'witness', 'state.json'), ['alpha', 'bravo'], log, () => this.clock.now()) };
  }

  stopWitness(): void {
    this.witnessProc?.owner.kill();
    this.witnessProc = undefined;
  }

  private onWitnessLog(line: string): void {
    const text = line.endsWith('\n') ? line.slice(0, -1) : line;
    this.fingerprint.update(text);
    const e = JSON.parse(text) as LogLine;
    this.logTail.push(`${String(e.t)} witness ${e.event ?? ''} ${e.msg ?? ''}`);
    if (this.logTail.length > 60) this.logTail.shift();
    if (e.event === 'witness-outdated') {
      this.stats.fenced++;
      this.note(`witness: ${String(e.msg)}`);
    }
  }

  /**
   * A call to the witness over the simulated network (WitnessClient's
   * behaviour): the request and the answer each cross the path when it is
   * up; no answer within the timeout is an error, and a request that arrives
   * after its caller gave up is dropped (the caller reset its connection).
   */
  private callWitness(proc: Process, c: Omit<WitnessCommand, 'node'>): Promise<WitnessReply> {
    const node = proc.node.name;
    this.stats.witnessCalls++;
    return new Promise<WitnessReply>((resolve, reject) => {
      let over = false;
      const timer = proc.clock.setTimeout(() => {
        over = true;
        reject(new Error(`the witness did not answer within ${WITNESS_TIMEOUT_MS} ms`));
      }, WITNESS_TIMEOUT_MS);
      if (!this.net.isUp(node, 'witness')) return;
      this.sched.timer(this.net.oneWay(), () => {
        const wp = this.witnessProc;
        if (over || !wp || !this.net.isUp(node, 'witness')) return;
        let reply: WitnessReply | undefined;
        let error: unknown;
        try {
          reply = wp.witness.handle({ ...c, node });
        } catch (err) {
          error = err;
        }
        this.sched.timer(this.net.oneWay(), () => {
          if (over || !proc.alive || !this.net.isUp('witness', node)) return;
          over = true;
          proc.clock.clearTimeout(timer);
          if (error !== undefined) reject(error);
          else resolve(reply!);
        }, this.net.owner);
      }, this.net.owner);
    });
  }

  /* ----------------------------------------------------------------- links */

  /** The connector's job, for both nodes: a link when both want one and the path is up. */
  startConnector(): void {
    this.clock.setInterval(() => this.dial(), this.config.retryMs);
  }

  private wanted(r: Resource | undefined): boolean {
    return r !== undefined && !r.standAlone && r.peer === undefined;
  }

  private dial(): void {
    const [a, b] = this.nodes;
    if (!a.proc?.alive || !b.proc?.alive) return;
    if (!this.wanted(a.r) || !this.wanted(b.r)) return;
    if (!this.net.isUp(a.name, b.name) || !this.net.isUp(b.name, a.name)) return;
    const [sa, sb] = this.net.connect(a.name, a.proc.owner, b.name, b.proc.owner);
    this.stats.connections++;
    for (const [n, s, peer] of [
      [a, sa, b],
      [b, sb, a],
    ] as const) {
      const r = n.r!;
      const link = new PeerLink(s as unknown as Socket, Buffer.alloc(0), { ...this.config.link, clock: n.proc!.clock });
      r.peer = new PeerSession(r, link, peer.name);
      n.proc!.socket = s;
      r.emit('changed');
    }
    this.linkHook?.();
  }

  /** Scenarios: called right after a link comes up (both sessions made, nothing received yet). */
  linkHook: (() => void) | undefined;

  /* --------------------------------------------------------- observation */

  private onLog(proc: Process, line: string): void {
    if (!proc.alive) return;
    const text = line.endsWith('\n') ? line.slice(0, -1) : line;
    this.fingerprint.update(text.split(this.config.splitBrainDir).join('<dir>'));
    const e = JSON.parse(text) as LogLine;
    this.logTail.push(`${String(e.t)} ${e.node} ${e.event ?? ''} ${e.msg ?? ''}`);
    if (this.logTail.length > 60) this.logTail.shift();
    switch (e.event) {
      case 'connect-decision':
        this.onDecision(proc, e);
        break;
      case 'disk-detached':
        this.stats.detaches++;
        this.note(`${e.node}: disk detached (${String(e.err)})`);
        this.onDetach(proc);
        break;
      case 'failed-disk-attached':
        this.onFailedDiskBack(proc);
        break;
      case 'split-brain':
        this.stats.splitBrains++;
        if (this.config.witness && !this.forcedSinceSync) {
          const leftover = this.leftoverGeneration ? `; a refused promotion left a new generation on ${this.leftoverGeneration}` : '';
          this.violation(`split brain although a witness is configured and nobody forced a promotion (rule ${this.lastRule.get(proc.node.name)}${leftover}): both nodes went on writing without each other? (${String(e.msg)})`);
        }
        break;
      case 'peer-disk-lost':
        if (this.config.witness) this.unfencedGeneration = proc.node.name;
        break;
      case 'io-suspended':
        this.stats.suspended++;
        this.note(`${e.node}: writes held (no quorum)`);
        break;
      case 'fenced-off':
        this.note(`${e.node}: fenced off: ${String(e.reason)}`);
        break;
      case 'resync-done':
        if (String(e.msg).startsWith('resync to')) this.stats.resyncs++;
        break;
      case 'peer-protocol-error':
        // Both promoted while their link was silently down (neither had timed out yet): the first replicated
        // write that reaches a Primary is refused and the link drops; both go on in generations of their own.
        if (/write from the peer while Primary/.test(String(e.err)) && this.nodes.every((n) => n.r?.role === 'Primary')) {
          this.note(`${e.node}: ${String(e.err)} (both Primary)`);
          break;
        }
        this.violation(`${e.node}: protocol error from the peer: ${String(e.err)}`);
        break;
    }
  }

  /**
   * Both nodes log the decision they made on connect. The target of a
   * resync gets the source's data: its lineage becomes the source's, and
   * what only it was promised is lost, which only an admin may choose.
   */
  /** Scenarios: called when a node logs its decision on connect (after the model followed it). */
  decisionHook: ((node: SimNode, action: { kind: string; direction?: string }) => void) | undefined;

  private onDecision(proc: Process, e: LogLine): void {
    this.followDecision(proc, e);
    this.decisionHook?.(proc.node, e.action as { kind: string; direction?: string });
  }

  /** A node that started a generation of its own when its peer's disk failed (without fencing the peer at the witness). */
  unfencedGeneration: string | undefined;
  /** A Diskless Primary sent a write to a peer whose disk was not UpToDate (a known bug marks nothing for it). */
  disklessToInconsistent = false;
  /** A node whose refused promotion left a generation of its own behind (a split brain without writes may follow). */
  leftoverGeneration: string | undefined;

  /** The rule of the last decision on connect that started a resync. */
  lastSyncRule: string | undefined;
  /** The rule of each node's last decision on connect. */
  private readonly lastRule = new Map<string, string>();

  private followDecision(proc: Process, e: LogLine): void {
    const action = e.action as { kind: string; direction?: string; rule?: string; splitBrain?: { resolution: string | null }; reason?: string };
    this.lastRule.set(proc.node.name, String(action.rule));
    if (action.kind === 'sync') this.lastSyncRule = String(action.rule);
    const here = proc.node.name;
    const peer = String(e.peer);
    this.note(`${here}: ${String(e.msg)} [rule ${action.rule}]`);
    if (action.kind === 'sync' && action.direction === 'target') {
      const mine = this.lineageOf(here);
      const theirs = this.lineageOf(peer);
      if (mine === theirs) {
        // Decided again (a new link) while the resync of the last decision was still beginning: whether the
        // disk holds the branch it had now depends on this resync, not on the one its link went down under.
        const pending = this.unbegunFollow.get(here);
        if (pending) this.unbegunFollow.set(here, { ...pending });
        return;
      }
      const disk = proc.r.record.disk;
      const resolution = action.splitBrain?.resolution ?? null;
      if (resolution && /resolve --keep/.test(resolution) && this.keepChoice !== undefined && this.keepChoice !== peer) {
        this.violation(`split brain resolved keeping ${peer}'s data, but the admin asked to keep ${this.keepChoice}'s`);
      }
      // The source remembers this disk failed (its data is not trusted: a full sync, whatever its record says).
      const failedDisk = this.node(peer).r?.record.peerDiskFailed === true;
      if (!resolution && !failedDisk && (disk === 'UpToDate' || disk === 'Outdated') && mine.discardedBy === undefined) {
        const lost = mine.missingFrom(theirs);
        if (lost.count > 0) {
          this.violation(
            `${here} (disk ${disk}) becomes sync target of ${peer} (${action.rule}): ${lost.count} sectors of durable, acknowledged writes only ${here} has (${mine.name}) would be overwritten by ${theirs.name}; first: ${lost.first.join('; ')}`,
          );
        }
      }
      this.note(`  model: ${here} follows ${theirs.name} (was ${mine.name})`);
      if (resolution) this.unbegunFollow.set(here, { was: mine, followed: theirs });
      this.setLineage(here, theirs);
      return;
    }
    if (action.kind === 'connected' && action.rule !== 'diskless' && action.rule !== '10') {
      const other = this.node(peer);
      const mine = this.lineageOf(here);
      const theirs = this.lineageOf(peer);
      if (mine === theirs || !other.r) return;
      for (const [x, y, xn, yn] of [
        [mine, theirs, here, peer],
        [theirs, mine, peer, here],
      ] as const) {
        const lost = x.missingFrom(y);
        if (lost.count > 0 && x.discardedBy === undefined) {
          this.violation(`${here} and ${peer} connected as in sync, but ${lost.count} sectors of durable writes of ${xn} (${x.name}) are unknown to ${yn} (${y.name}); first: ${lost.first.join('; ')}`);
        }
      }
      const keep = proc.r.role === 'Primary' ? mine : other.r.role === 'Primary' ? theirs : mine;
      this.note(`  model: both follow ${keep.name}`);
      this.setLineage(here, keep);
      this.setLineage(peer, keep);
    }
  }

  /**
   * Targets of a split-brain resolution, and the branch they held, until
   * their resync began (Resource.beginSync recorded its start: the disk
   * changes only after that). The model follows the source at the decision;
   * a resync that never begins (the link went down while the blocks were
   * saved, they could not be saved, the process died first) changed nothing
   * on that disk: it still holds its own branch, and the split brain stands.
   * The next decision then says so (rule 92 if the source recorded its
   * start, rule 90 if it did not either: seeds 2355, 5088, 6652), so the
   * model goes back at once instead of guessing from rules.
   */
  private readonly unbegunFollow = new Map<string, { was: Lineage; followed: Lineage }>();

  /** A node begins a resync as target (beginSync was called): its disk changes only if `ready` resolves. */
  private onTargetBegin(proc: Process, ready: Promise<void>): void {
    const name = proc.node.name;
    const entry = this.unbegunFollow.get(name);
    if (!entry) return;
    ready.then(
      () => {
        if (this.unbegunFollow.get(name) === entry) this.unbegunFollow.delete(name);
      },
      () => this.neverBegan(name, entry),
    );
  }

  /** A split-brain resolution never began on `name` (see unbegunFollow): back on the branch its disk holds. */
  private neverBegan(name: string, entry = this.unbegunFollow.get(name)): void {
    // (A later decision may have replaced the entry: that one is its own resync's.)
    if (!entry || this.unbegunFollow.get(name) !== entry) return;
    this.unbegunFollow.delete(name);
    // Nothing else moved it since (the roles stay while the blocks are saved).
    if (this.lineageOf(name) !== entry.followed) return;
    this.note(`  model: the resolution never began on ${name}: back on ${entry.was.name}`);
    entry.was.discardedBy = undefined;
    this.setLineage(name, entry.was);
  }

  /** Nodes whose disk failed while their peer was not taking their writes. */
  private readonly failedAlone = new Set<string>();

  /** A disk failed: if the peer was not taking this node's writes, what only it held may be lost (see onFailedDiskBack). */
  private onDetach(proc: Process): void {
    // Taking its writes by both sides' account and over a path that is up: a session that only one side,
    // or both, still believe in (the peer lost power, the network is cut and no ping has timed out yet)
    // takes nothing.
    const peer = this.other(proc.node).proc;
    const replicating =
      proc.r.peer?.replicating === true && proc.r.peer.phase !== 'handshake' && peer?.alive === true && peer.r?.peer?.replicating === true && this.net.isUp(proc.node.name, this.other(proc.node).name);
    if (replicating) this.failedAlone.delete(proc.node.name);
    else this.failedAlone.add(proc.node.name);
  }

  /**
   * A disk that failed is attached again, known Failed: nothing on it counts
   * ("while one UpToDate copy survives"). If it failed while apart from its
   * peer, the peer's disk is all that is left of their common lineage: what
   * the peer lacks of it was lost with the failed disk. If the peer was
   * taking its writes, the peer has everything: nothing is forgiven.
   */
  private onFailedDiskBack(proc: Process): void {
    const here = proc.node;
    const other = this.other(here);
    const l = this.lineageOf(here.name);
    if (!this.failedAlone.delete(here.name)) return;
    const theirs = this.lineageOf(other.name);
    if (theirs !== l) l.discardedBy ??= `${here.name}'s disk failure`;
    // What the peer lacks of its own lineage (written here before a branch, say) was only here too.
    const c = other.contents(this.dataBytes);
    const lost = theirs.rebase(c.durable, c.cached);
    if (lost > 0) this.note(`  model: ${here.name}'s disk failed while apart from ${other.name}: ${lost} sectors only it had are lost`);
  }

  /** After every event: what must always hold. */
  checkInvariants(): void {
    const [a, b] = this.nodes;
    const ra = a.r;
    const rb = b.r;
    if (
      ra?.role === 'Primary' &&
      rb?.role === 'Primary' &&
      ra.peer?.phase !== undefined &&
      ra.peer.phase !== 'closed' &&
      ra.peer.phase !== 'handshake' &&
      rb.peer?.phase !== undefined &&
      rb.peer.phase !== 'closed' &&
      rb.peer.phase !== 'handshake' &&
      this.net.isUp(a.name, b.name) &&
      this.net.isUp(b.name, a.name) &&
      // Two promotions during a partition neither side had noticed yet are a known race (each saw the other
      // Secondary): the first replicated write is refused and the link drops. Only a path up all along counts.
      this.net.lastDownAt(a.name, b.name) < Math.max(this.promotedAt.get(a.name) ?? 0, this.promotedAt.get(b.name) ?? 0)
    ) {
      this.violation(`both nodes are Primary over a live link (${ra.peer.phase}/${rb.peer.phase}): each takes writes the other refuses`);
    }
    if ((this.forcedSinceSync || this.leftoverGeneration) && this.inSync()) {
      this.forcedSinceSync = false;
      this.leftoverGeneration = undefined;
    }
    for (const n of this.nodes) {
      const r = n.r;
      if (!r) continue;
      if (r.role === 'Primary' && r.peer?.phase === 'sync-target') {
        this.violation(`${n.name} is Primary and SyncTarget of ${r.peer.peerNode}: a resync is changing the data under its users`);
      }
    }
  }

  /* ------------------------------------------------------------- helpers */

  /** Both nodes up, linked, UpToDate, nothing to resync. */
  inSync(): boolean {
    const [a, b] = this.nodes;
    const ra = a.r;
    const rb = b.r;
    if (!ra || !rb) return false;
    return (
      ra.peer?.phase === 'connected' &&
      rb.peer?.phase === 'connected' &&
      ra.disk === 'UpToDate' &&
      rb.disk === 'UpToDate' &&
      ra.peer.state?.disk === 'UpToDate' &&
      rb.peer.state?.disk === 'UpToDate' &&
      ra.bitmap.count === 0 &&
      rb.bitmap.count === 0 &&
      ra.record.gi.current === rb.record.gi.current
    );
  }

  /** One line of state, for traces. */
  describe(): string {
    const cut = this.net.partitions;
    return (cut.length > 0 ? `cut ${cut.join(',')} | ` : '') + (this.config.witness && !this.witnessProc ? 'witness down | ' : '') + this.nodes
      .map((n) => {
        const r = n.r;
        if (!r) return `${n.name}: down`;
        const p = r.peer ? `${r.peer.phase}` : r.standAlone ? 'StandAlone' : 'no link';
        return `${n.name}: ${r.role} ${r.disk} ${p} oos=${r.bitmap.count} gi=${r.record.gi.current.slice(0, 4)}/${r.record.gi.bitmap.slice(0, 4)}${r.lastRefusal ? ` refused(${r.lastRefusal.slice(0, 50)})` : ''} ${this.lineageOf(n.name)?.name}`;
      })
      .join(' | ');
  }

  /** Garbage on a disk is never allowed: every sector holds zeros or a whole write. */
  checkNoGarbage(n: SimNode, c: { durable: Int32Array; cached: Int32Array }): void {
    for (let s = 0; s < c.durable.length; s++) {
      if (c.durable[s] === GARBAGE || c.cached[s] === GARBAGE) {
        this.violation(`${n.name}'s disk holds garbage at sector ${s} (offset ${s * SECTOR}): neither zeros nor one whole write`);
        return;
      }
    }
  }
}

/**
 * Files as the simulated process writes them (split-brain blocks): each
 * write and sync takes fake time, so other events (a link lost, a
 * promotion, a crash) land in the middle of a save as they do in a daemon;
 * done synchronously underneath, and with no descriptor held between two
 * calls (a process killed mid-save leaves none open).
 */
function slowFileIo(clock: OwnerClock): FileIo {
  const STEP_MS = 0.2;
  return {
    mkdir: async (dir) => {
      fs.mkdirSync(dir, { recursive: true });
    },
    create: async (file, mode) => {
      fs.closeSync(fs.openSync(file, 'wx', mode));
      return {
        write: async (data) => {
          await clock.sleep(STEP_MS);
          fs.appendFileSync(file, data);
        },
        sync: async () => {
          await clock.sleep(STEP_MS);
          fsyncPath(file);
        },
        close: async () => undefined,
      };
    },
    syncDir: async (dir) => {
      await clock.sleep(STEP_MS);
      fsyncPath(dir);
    },
  };
}

/** fsync a file or a directory by its path. */
function fsyncPath(at: string): void {
  const fd = fs.openSync(at, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
