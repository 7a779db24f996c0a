/**
 * The VMs of the cluster, as one node daemon sees and runs them.
 *
 * Each node runs the QEMU of the VMs placed on it (QemuProcess) and answers
 * for them; any node answers for the whole cluster by asking the others.
 * Where a VM starts is decided by one node only, the one serving its boot
 * disk (Primary for the pool): two nodes asked at once to start the same VM
 * are serialized there, and it starts nowhere while a node that might run it
 * does not answer (two copies writing the same volume would corrupt it).
 *
 * "VMs run unless stopped": the serving node starts each VM that is not
 * marked stopped and runs nowhere, on its `prefer` node. `vm stop` marks it
 * on every node (the newest mark wins when nodes compare them), `vm start`
 * clears the mark; a guest that powers itself off is marked stopped too.
 */
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import type { ClusterConfig } from '../cluster/config.js';
import { NotFoundError, UserError } from '../util/errors.js';
import type { Logger } from '../util/log.js';
import { formatSize, parseSize } from '../util/size.js';
import { ConsoleLog, HISTORY_MAX, type ConsoleChunk } from './console.js';
import { QemuProcess, detectAccel, type QemuExit } from './qemu.js';
import { vmPaths, type DiskEndpoint, type VmSpec } from './qemu-args.js';
import { endOf, type PoolIncarnation } from '../cluster/pool-incarnations.js';
import { nbdNodesInUse, pauseGuest, switchDisks } from './disks.js';
import { listenIncoming, migrateOut, settleMigration } from './migrate.js';
import { xlConfig } from './xl-config.js';

export type VmState = 'running' | 'stopped' | 'starting' | 'migrating' | 'paused' | 'failed';

export interface VmInfo {
  name: string;
  /** Where it runs (or last ran, for a failed one); null when stopped. */
  node: string | null;
  state: VmState;
  /** Guest memory now (the balloon's actual size), or the boot size when not running. */
  memoryBytes: number;
  cpus: number;
  disks: string[];
  pid?: number;
  /** When it started on its node (ISO time). */
  since?: string;
  /** Why it is failed or stopped, when known. */
  reason?: string;
  /** Its node did not answer: this is what it said last. */
  stale?: boolean;
  /** While it migrates away: QEMU's RAM transfer so far (RAM is sent again where the guest rewrites it). */
  migration?: { to: string; transferredBytes: number; totalBytes: number; rateBytesPerSec: number };
}

/** `vm stop` / `vm start` remembered: the newest mark (by time) wins between nodes. */
interface Mark {
  stopped: boolean;
  at: number;
}

export type VmCommand =
  | { cmd: 'vm.list' }
  | { cmd: 'vm.local' }
  | { cmd: 'vm.incarnations' }
  | { cmd: 'vm.start'; vm: string; on?: string; auto?: boolean; forwarded?: boolean }
  | { cmd: 'vm.start-here'; vm: string }
  | { cmd: 'vm.stop'; vm: string; force?: boolean }
  | { cmd: 'vm.stop-here'; vm: string; force?: boolean }
  | { cmd: 'vm.mark'; vm: string; stopped: boolean; at: number }
  | { cmd: 'vm.console'; vm: string; since?: number; here?: boolean; raw?: boolean }
  | { cmd: 'vm.migrate'; vm: string; to: string }
  | { cmd: 'vm.migrate-out'; vm: string; to: string }
  | { cmd: 'vm.migrate-in'; vm: string; from: string; memoryBytes: number; cpus: number; disks: DiskEndpoint[]; waitMs?: number }
  | { cmd: 'vm.migrate-done'; vm: string; from: string }
  | { cmd: 'vm.migrate-abort'; vm: string }
  | { cmd: 'vm.set-memory'; vm: string; bytes: number }
  | { cmd: 'vm.xl-config'; vm: string }
  | { cmd: 'vm.pause-io'; pools: string[]; leaseMs?: number }
  | { cmd: 'vm.resume-io'; pools: string[]; server: string };

const vmName = z.string().max(64);
const commandSchema = z.discriminatedUnion('cmd', [
  z.object({ cmd: z.literal('vm.list') }).strict(),
  z.object({ cmd: z.literal('vm.local') }).strict(),
  z.object({ cmd: z.literal('vm.incarnations') }).strict(),
  z.object({ cmd: z.literal('vm.start'), vm: vmName, on: z.string().max(64).optional(), auto: z.boolean().optional(), forwarded: z.boolean().optional() }).strict(),
  z.object({ cmd: z.literal('vm.start-here'), vm: vmName }).strict(),
  z.object({ cmd: z.literal('vm.stop'), vm: vmName, force: z.boolean().optional() }).strict(),
  z.object({ cmd: z.literal('vm.stop-here'), vm: vmName, force: z.boolean().optional() }).strict(),
  z.object({ cmd: z.literal('vm.mark'), vm: vmName, stopped: z.boolean(), at: z.number().int().nonnegative() }).strict(),
  z.object({ cmd: z.literal('vm.console'), vm: vmName, since: z.number().int().nonnegative().optional(), here: z.boolean().optional(), raw: z.boolean().optional() }).strict(),
  z.object({ cmd: z.literal('vm.migrate'), vm: vmName, to: z.string().max(64) }).strict(),
  z.object({ cmd: z.literal('vm.migrate-out'), vm: vmName, to: z.string().max(64) }).strict(),
  z
    .object({
      cmd: z.literal('vm.migrate-in'),
      vm: vmName,
      from: z.string().max(64),
      memoryBytes: z.number().int().positive(),
      cpus: z.number().int().positive(),
      disks: z.array(z.object({ volume: z.string(), node: z.string(), host: z.string(), port: z.number().int(), export: z.string(), incarnation: z.string().regex(/^[0-9a-f]{16}$/).optional() }).strict()).max(64),
      waitMs: z.number().int().positive().max(11 * 60_000).optional(),
    })
    .strict(),
  z.object({ cmd: z.literal('vm.migrate-done'), vm: vmName, from: z.string().max(64) }).strict(),
  z.object({ cmd: z.literal('vm.migrate-abort'), vm: vmName }).strict(),
  z.object({ cmd: z.literal('vm.set-memory'), vm: vmName, bytes: z.number().int().positive() }).strict(),
  z.object({ cmd: z.literal('vm.xl-config'), vm: vmName }).strict(),
  z.object({ cmd: z.literal('vm.pause-io'), pools: z.array(z.string().max(64)).max(64), leaseMs: z.number().int().positive().max(3_600_000).optional() }).strict(),
  z.object({ cmd: z.literal('vm.resume-io'), pools: z.array(z.string().max(64)).max(64), server: z.string().max(64) }).strict(),
]);

/** What the manager needs of its node daemon. */
export interface VmHost {
  readonly node: string;
  readonly home: string;
  readonly config: ClusterConfig;
  readonly log: Logger;
  /** The node serving a pool's volumes (Primary for all its resources), as far as this node knows. */
  poolServer(pool: string): string | undefined;
  /** This node's address (where a migration's destination listens). */
  readonly address: string;
  /** Ask another node's daemon; throws when it does not answer. */
  call(node: string, request: VmCommand, timeoutMs?: number): Promise<unknown>;
  /** The clients using NBD export `name` (a volume) on this node. */
  exportClients(name: string): string[];
  /** Which open of each pool this node serves, and how earlier ones ended (cluster/pool-incarnations.ts); undefined: none kept. */
  poolIncarnations(): Record<string, PoolIncarnation> | undefined;
}

/** Where a migration's destination waits for the guest from, and until when (kept across a daemon restart). */
interface IncomingRecord {
  from: string;
  until: number;
}

interface LocalVm {
  name: string;
  qemu: QemuProcess;
  spec: VmSpec;
  state: VmState;
  since: number;
  /** duet asked it to exit (vm stop, a finished migration): not a crash. */
  stopping: boolean;
  /** Its disks are being reconnected after an I/O error (the VM paused by werror=stop). */
  recovering: boolean;
  /** The destination of a migration under way: its QEMU waits for the source's state. */
  incoming?: { from: string };
  /** The source of a migration under way: where to. */
  migratingTo?: string;
  /** The running migration's RAM progress (QEMU's query-migrate), for `vm migrate`'s progress bar. */
  migration?: { to: string; transferredBytes: number; totalBytes: number; startedAt: number };
  /** Paused for a move of its disks' Primary role (since then). */
  handoverPaused?: number;
  /** When a handover pause runs out: the VM resumes by itself, whatever became of the handover. */
  pauseUntil?: number;
  /** Its last disk error was "no space" (the pool is full): the index of that disk (-1: not known). */
  noSpace?: number;
  /** Its disks being switched (one switch at a time: the recovery loop, a handover and a lease may meet). */
  switching?: Promise<unknown>;
}

interface LocalAnswer {
  node: string;
  vms: VmInfo[];
  marks: Record<string, Mark>;
}

const POWERDOWN_TIMEOUT_MS = 30_000;
const MIGRATION_TIMEOUT_MS = 10 * 60_000;
const AUTOSTART_EVERY_MS = 2000;
const PEER_TIMEOUT_MS = 5000;
/**
 * How long a handover may keep a VM paused. Past it, the VM resumes on whatever serves its disks then (a
 * handover whose node died, or that failed to resume it, must not leave it paused for good). Resuming early
 * is safe: a write to a retired connection fails, werror=stop pauses the VM and the recovery loop moves it.
 */
export const HANDOVER_LEASE_MS = 60_000;

export class VmManager {
  private readonly local = new Map<string, LocalVm>();
  /** The last exit of VMs that ran here (a crash shows as failed until the next start). */
  private readonly exits = new Map<string, { reason: string; failed: boolean; at: number; incoming?: boolean }>();
  private marks: Record<string, Mark> = {};
  /** One placement decision per VM at a time (this node decides for the VMs it serves). */
  private readonly locks = new Map<string, Promise<unknown>>();
  /** What other nodes said last (shown, marked stale, when they do not answer). */
  private readonly lastSeen = new Map<string, VmInfo[]>();
  private autostartTimer: NodeJS.Timeout | undefined;
  private readonly reported = new Map<string, string>();
  /**
   * QEMUs of this node that run but cannot be steered (their QMP does not answer: another client holds
   * the socket, a main loop stuck on a dead disk server; or their vm.json is gone). They still count as the
   * VM running here, or another copy would be started on the same disks; taken over when they answer.
   */
  private readonly unattached = new Map<string, { pid: number; since: number; reason: string }>();
  /** Starts under way here (QEMU spawned, QMP not answering yet): a second start waits for the first. */
  private readonly starting = new Map<string, Promise<VmInfo>>();
  /** Guests being restarted here (killed, not started again yet): reported as starting (localInfos). */
  private readonly restarting = new Set<string>();
  private stopped = false;
  private autostarting = false;
  readonly accel = detectAccel();
  /** When this daemon started placing VMs, and the nodes that have answered it since ("the cluster came up"). */
  private readonly startedAt = Date.now();
  private readonly heard = new Set<string>();
  /**
   * Nodes the cluster manager has declared dead and taken over: they run nothing (their VMs were killed by
   * their own self-fence, or died with them), so they are not asked, and a VM that prefers one starts here.
   */
  private readonly fencedNodes = new Set<string>();
  /** Nodes drained for maintenance (node drain): a VM that prefers one runs elsewhere until node rejoin. */
  private readonly drainedNodes = new Set<string>();
  /** This node lost quorum and killed its VMs: nothing starts here until the cluster is whole again (why). */
  private selfFenced: string | undefined;
  /**
   * Resolved once start() has found the QEMUs an earlier daemon left: until then this node would answer
   * that it runs nothing (and a peer would start a second copy) or pause nothing for a handover.
   */
  private readonly ready: Promise<void>;
  private markReady!: () => void;

  constructor(private readonly host: VmHost) {
    this.ready = new Promise((resolve) => (this.markReady = resolve));
  }

  private get dir(): string {
    return path.join(this.host.home, 'vms');
  }

  private vmDir(name: string): string {
    return path.join(this.dir, name);
  }

  /** Find the QEMUs left running by an earlier daemon, and start placing VMs. */
  async start(): Promise<void> {
    this.marks = this.loadMarks();
    let names: string[] = [];
    try {
      names = fs.readdirSync(this.dir);
    } catch {
      // No VM ran here yet.
    }
    try {
      for (const name of names) if (this.isVm(name)) await this.reattach(name);
    } finally {
      this.markReady();
    }
    void this.endCopiesRunningElsewhere();
    this.autostartTimer = setInterval(() => void this.autostart(), AUTOSTART_EVERY_MS);
    this.autostartTimer.unref();
  }

  /**
   * After a daemon start: a QEMU found running here while the VM runs on another node too, started there
   * later, is a copy from before this node was declared dead and taken over (its daemon was down, its QEMUs
   * were not): it is ended before it writes again. Until then the other node keeps it fenced off its exports
   * (it asks vm.local before it lets this node in).
   */
  private async endCopiesRunningElsewhere(): Promise<void> {
    for (const vm of [...this.local.values()]) {
      if (vm.incoming || vm.state === 'migrating' || this.stopped) continue;
      for (const node of this.otherNodes()) {
        let answer: LocalAnswer;
        try {
          answer = await this.askLocal(node);
        } catch {
          continue; // Not reachable: it cannot have taken this VM over without declaring this node dead; the stale-copy check of recover() covers a copy paused on a disk error.
        }
        // Running the guest there (a migration's destination still waiting for it is not a copy: this one is its source).
        const theirs = answer.vms.find((v) => v.name === vm.name && v.state === 'running');
        const since = theirs?.since !== undefined ? Date.parse(theirs.since) : NaN;
        if (!theirs || Number.isNaN(since) || since <= vm.since) continue;
        this.host.log.warn({ event: 'vm-stale-copy-ended', vm: vm.name, runsOn: node, pid: vm.qemu.pid }, `vm ${vm.name}: found running here (QEMU ${vm.qemu.pid}, from before this node was taken over) while it runs on ${node} since later: ending this stale copy`);
        vm.stopping = true;
        await vm.qemu.kill().catch(() => undefined);
        break;
      }
    }
  }

  /** Take over the QEMU an earlier daemon left running for `name`, if one runs. */
  private async reattach(name: string): Promise<void> {
    const paths = vmPaths(this.vmDir(name));
    const since = fs.statSync(paths.pid, { throwIfNoEntry: false })?.mtimeMs ?? Date.now();
    const unsteerable = (pid: number, reason: string): void => {
      if (this.unattached.get(name)?.reason !== reason) {
        this.host.log.error({ event: 'vm-attach-failed', vm: name, pid, reason }, `vm ${name}: QEMU ${pid} runs but ${reason}: it counts as running here (vm stop ${name} --force ends it)`);
      }
      this.unattached.set(name, { pid, since, reason });
    };
    const qemu = await QemuProcess.attach(name, paths, this.host.log);
    if (!qemu) {
      const pid = QemuProcess.livePid(paths);
      if (pid === undefined) this.unattached.delete(name);
      else unsteerable(pid, 'its QMP does not answer (another client on its socket, or QEMU is stuck)');
      return;
    }
    const record = this.readSpec(name);
    if (!record) {
      unsteerable(qemu.pid, 'its vm.json is gone');
      qemu.detach();
      return;
    }
    this.unattached.delete(name);
    const status = await qemu.status().catch(() => ({ status: 'unknown', running: false }));
    // A migration finished while no daemon watched: the copy here is the stale one.
    if (status.status === 'postmigrate') {
      this.host.log.info({ event: 'vm-migrated-away', vm: name }, `vm ${name}: migrated away while the daemon was down: ending the copy here`);
      await qemu.kill().catch(() => undefined);
      return;
    }
    const vm = this.adopt(name, qemu, record.spec, stateOf(status.status));
    vm.since = since;
    if (status.status === 'inmigrate') {
      // The destination of a migration that was under way when the daemon stopped: still a copy that is not the
      // VM (a migrate-abort ends it; so does the end of its wait), not a VM of this node that crashes if it exits.
      vm.incoming = { from: record.incoming?.from ?? 'another node' };
      vm.stopping = true;
      const left = (record.incoming?.until ?? Date.now() + MIGRATION_TIMEOUT_MS + 60_000) - Date.now();
      setTimeout(() => void this.endStaleIncoming(vm), Math.max(0, left)).unref();
    } else if (record.incoming) {
      // The migration ended while no daemon watched, and the guest runs here: the VM is this node's.
      try {
        this.writeSpec(name, record.spec);
      } catch (err) {
        this.host.log.error({ event: 'vm-spec-write-failed', vm: name, err: (err as Error).message }, `vm ${name}: cannot write its vm.json: ${(err as Error).message}`);
      }
    }
    // A migration an earlier daemon started, ending now: the STOP that says so may have come before this daemon,
    // or between the status read above and the adoption (no listener yet): the status again, now that one listens.
    if (status.status === 'finish-migrate') void this.endIfMigratedAway(vm);
    else if (status.status === 'running') {
      void vm.qemu.status().then((st) => {
        if (st.status === 'finish-migrate' || st.status === 'postmigrate') void this.endIfMigratedAway(vm);
      }, () => undefined);
    }
    // Its disks failed while no daemon watched (this node's own exports went with the old daemon).
    if (status.status === 'io-error') void this.recover(vm, 'found paused after a disk error');
    this.host.log.info({ event: 'vm-reattached', vm: name, pid: qemu.pid, status: status.status }, `vm ${name}: QEMU ${qemu.pid} found running (${status.status})`);
  }

  /**
   * A QEMU that finished a migration no daemon of this node watches any more (its daemon restarted while
   * QEMU sent the guest) is the stale source: the guest runs at the destination. Ended as reattach does.
   */
  private async endIfMigratedAway(vm: LocalVm): Promise<void> {
    for (let i = 0; i < 100; i++) {
      const st = await vm.qemu.status().catch(() => undefined);
      if (!st || this.local.get(vm.name) !== vm) return;
      if (st.status === 'postmigrate') {
        this.host.log.info({ event: 'vm-migrated-away', vm: vm.name }, `vm ${vm.name}: migrated away while no daemon watched the migration: ending the copy here`);
        vm.stopping = true;
        await vm.qemu.kill().catch(() => undefined);
        return;
      }
      if (st.status !== 'finish-migrate') return;
      await sleep(100);
    }
  }

  /** Daemon stop: the VMs keep running; only this daemon's QMP sessions end. */
  stop(): void {
    this.stopped = true;
    this.markReady();
    if (this.autostartTimer) clearInterval(this.autostartTimer);
    for (const vm of this.local.values()) vm.qemu.detach();
    this.local.clear();
  }

  /* ------------------------------------------------------------ commands */

  async handle(request: VmCommand): Promise<unknown> {
    await this.ready;
    const parsed = commandSchema.safeParse(request);
    if (!parsed.success) throw new UserError(`${request.cmd}: malformed request (${parsed.error.issues[0]?.message ?? 'invalid'})`);
    const c = parsed.data;
    switch (c.cmd) {
      case 'vm.list':
        return { vms: await this.list() };
      case 'vm.local':
        return this.localAnswer();
      case 'vm.incarnations':
        return { node: this.host.node, pools: this.host.poolIncarnations() };
      case 'vm.start':
        return this.startVm(c.vm, c.on, c.auto === true, c.forwarded === true);
      case 'vm.start-here':
        return this.startHere(c.vm);
      case 'vm.stop':
        return this.stopVm(c.vm, c.force === true);
      case 'vm.stop-here':
        return this.stopHere(c.vm, c.force === true);
      case 'vm.mark':
        this.config(c.vm);
        this.setMark(c.vm, { stopped: c.stopped, at: c.at });
        // What this node holds now: a newer mark (a clock ahead of the sender's) is the sender's to outdate.
        return { vm: c.vm, mark: this.marks[c.vm] };
      case 'vm.console':
        return this.console(c.vm, c.since, c.here === true, c.raw === true);
      case 'vm.migrate':
        return this.migrate(c.vm, c.to);
      case 'vm.migrate-out':
        return this.migrateOut(c.vm, c.to);
      case 'vm.migrate-in':
        return this.migrateIn(c);
      case 'vm.migrate-done':
        return this.migrateDone(c.vm, c.from);
      case 'vm.migrate-abort':
        return this.migrateAbort(c.vm);
      case 'vm.set-memory':
        return this.setMemory(c.vm, c.bytes);
      case 'vm.xl-config':
        this.config(c.vm);
        return { vm: c.vm, text: xlConfig(this.host.config, c.vm, (pool) => this.host.poolServer(pool)) };
      case 'vm.pause-io':
        return this.pauseIo(c.pools, c.leaseMs);
      case 'vm.resume-io':
        return this.resumeIo(c.pools, c.server);
    }
  }

  private isVm(name: string): boolean {
    return Object.hasOwn(this.host.config.vms, name);
  }

  private config(name: string): ClusterConfig['vms'][string] {
    const vm = Object.hasOwn(this.host.config.vms, name) ? this.host.config.vms[name] : undefined;
    if (!vm) {
      const known = Object.keys(this.host.config.vms);
      throw new NotFoundError(`no VM named ${name} in ${this.host.config.file} (VMs: ${known.join(', ') || 'none'})`);
    }
    return vm;
  }

  /** What `node` runs (and the stop marks it knows); it has answered since this daemon started. */
  private async askLocal(node: string, timeoutMs = PEER_TIMEOUT_MS): Promise<LocalAnswer> {
    const answer = (await this.host.call(node, { cmd: 'vm.local' }, timeoutMs)) as LocalAnswer;
    this.heard.add(node);
    this.lastSeen.set(node, answer.vms);
    this.mergeMarks(answer.marks);
    return answer;
  }

  private otherNodes(): string[] {
    return Object.keys(this.host.config.nodes).filter((n) => n !== this.host.node && !this.fencedNodes.has(n));
  }

  /* ------------------------------------------------------------- failover */

  /** Does a VM running here have a disk in one of `pools`? */
  usesPools(pools: string[]): boolean {
    return this.usersOf(pools).length > 0;
  }

  setNodeDrained(node: string, drained: boolean): void {
    if (drained) this.drainedNodes.add(node);
    else this.drainedNodes.delete(node);
  }

  /** The VMs `node` ran when it last answered. */
  lastKnownOn(node: string): string[] {
    return (this.lastSeen.get(node) ?? []).filter((v) => runsThere(v)).map((v) => v.name);
  }

  /** The cluster manager declared `node` dead and fenced (or it is back). */
  setNodeFenced(node: string, fenced: boolean): void {
    if (fenced) this.fencedNodes.add(node);
    else this.fencedNodes.delete(node);
    this.lastSeen.delete(node);
  }

  /**
   * Self-fence: this node lost quorum. Every QEMU here is killed at once (SIGKILL: no guest shutdown, no
   * flush; their in-flight writes are the ones nobody acknowledged), and nothing starts here until
   * endSelfFence. Returns the VMs killed.
   */
  selfFence(reason: string): string[] {
    this.selfFenced = reason;
    const killed: string[] = [];
    for (const vm of this.local.values()) {
      vm.stopping = true;
      killed.push(vm.name);
      try {
        process.kill(vm.qemu.pid, 'SIGKILL');
      } catch {
        // Gone already.
      }
    }
    for (const [name, u] of this.unattached) {
      killed.push(name);
      try {
        process.kill(u.pid, 'SIGKILL');
      } catch {
        // Gone already.
      }
    }
    return killed;
  }

  endSelfFence(): void {
    this.selfFenced = undefined;
  }

  private refuseWhileFenced(name: string): void {
    if (this.selfFenced !== undefined) throw new UserError(`vm ${name}: ${this.host.node} has fenced itself (${this.selfFenced}): no VM starts here until it is back in the cluster`, 1);
  }

  /**
   * Boot `name` here for a takeover (the cluster manager has fenced the node it ran on), then squeeze
   * it to `targetBytes` if given. A VM stopped by vm stop stays stopped; one running already is left alone.
   * `name` is one of lostVms(): if it runs here by now, its autostart got there first during the takeover,
   * and it is the takeover's to report as started all the same (`already`).
   */
  async bootHere(name: string, targetBytes?: number): Promise<{ vm: string; started: boolean; already?: boolean; skipped?: string; info?: VmInfo }> {
    await this.ready;
    this.config(name);
    if (this.marks[name]?.stopped) return { vm: name, started: false, skipped: 'stopped by vm stop' };
    return this.locked(name, async () => {
      const where = await this.locate(name);
      if (where.node && where.node !== this.host.node) return { vm: name, started: false, skipped: `runs on ${where.node}` };
      // (One starting here already, by its autostart, is started by this takeover all the same.)
      const running = where.node === this.host.node && where.state !== 'starting';
      const info = await this.startHere(name);
      if (targetBytes !== undefined && targetBytes < info.memoryBytes) {
        // The balloon driver loads a moment after boot: a squeeze asked too early is simply repeated by QEMU.
        const vm = this.local.get(name);
        await vm?.qemu.qmp.execute('balloon', { value: targetBytes }).catch((err: unknown) => {
          this.host.log.warn({ event: 'vm-squeeze-failed', vm: name, target: targetBytes, err: (err as Error).message }, `vm ${name}: could not set its memory to ${formatSize(targetBytes)}: ${(err as Error).message}`);
        });
      }
      return { vm: name, started: true, ...(running ? { already: true } : {}), info };
    });
  }

  /** The pools `node` serves to VMs running here. */
  poolsServedBy(node: string): string[] {
    return [...new Set([...this.local.values()].filter((vm) => !vm.incoming).flatMap((vm) => vm.spec.disks.filter((d) => d.node === node).map((d) => d.volume.split('/')[0])))];
  }

  /** The VMs running here whose disks `node` serves (what a takeover of `node` must restart, see restartServedBy). */
  servedBy(node: string): string[] {
    return [...this.local.values()].filter((vm) => !vm.incoming && vm.spec.disks.some((d) => d.node === node)).map((vm) => vm.name);
  }

  /**
   * Takeover of `node` (declared dead, fenced), once its resources are Primary here: the VMs running
   * here whose disks it served (`names`, taken before the promotions). Their I/O to it failed or hangs
   * (a dead host sends no RST), and writes it acknowledged but had not flushed may have died with it (a
   * thin pool's new mappings are committed at a flush or within its commit period), so their guests
   * cannot simply go on: each is restarted here with its disks from where they are served now, as after
   * a crash of its disk (its file system recovers to its last flush). The recovery loop leaves them
   * paused meanwhile (recover). A migration to `node` is cancelled first; a migration from it (a QEMU
   * here waiting for the guest) is ended: the guest is lost, and booted as the takeover's lost VMs are.
   */
  async restartServedBy(node: string, names: string[], why: string): Promise<{ vm: string; restarted: boolean; err?: string }[]> {
    await this.ready;
    const out: { vm: string; restarted: boolean; err?: string }[] = [];
    for (const vm of [...this.local.values()]) {
      if (vm.incoming?.from === node) {
        this.host.log.warn({ event: 'vm-incoming-from-lost', vm: vm.name, from: node }, `vm ${vm.name}: its migration from ${node} cannot finish (${why}): the waiting QEMU here is ended, the VM boots as a lost one`);
        await vm.qemu.kill().catch(() => undefined);
      } else if (vm.migratingTo === node) {
        // Its migration waits on a dead host: cancelled, it runs on here (and is restarted below if its disks were there).
        await vm.qemu.qmp.execute('migrate_cancel').catch(() => undefined);
      }
    }
    for (const name of names) {
      try {
        const done = await this.locked(name, async () => {
          const vm = this.local.get(name);
          if (!vm || vm.incoming) return { vm: name, restarted: false, err: 'no longer runs here' };
          // Its disks must be served here now (a promotion that failed leaves them nowhere: it stays paused).
          if (!this.servesEveryDisk(name)) return { vm: name, restarted: false, err: 'its disks are not served here (not taken over)' };
          await this.killAndBoot(vm, () =>
            this.host.log.warn({ event: 'vm-restarting', vm: name, servedBy: node, why }, `vm ${name}: its disks were served by ${node} (${why}): writes it had not flushed may be lost with it: restarting the guest on ${this.host.node}, as after a crash of its disk`),
          );
          return { vm: name, restarted: true };
        });
        out.push(done);
      } catch (err) {
        out.push({ vm: name, restarted: false, err: (err as Error).message });
        this.host.log.error({ event: 'vm-restart-failed', vm: name, err: (err as Error).message }, `vm ${name}: not restarted after ${node} was lost: ${(err as Error).message} (its autostart tries again)`);
      }
    }
    return out;
  }

  /** The VMs of the cluster that should run (not stopped by vm stop) and run nowhere now. */
  async lostVms(): Promise<string[]> {
    const all = await this.list();
    // One starting here already (its autostart got there first) is still the takeover's to boot and report:
    // bootHere waits for that start (a fresh-clone run's mail named one VM of two).
    const startingHere = (v: VmInfo): boolean => v.node === this.host.node && v.state === 'starting' && this.starting.has(v.name);
    return all.filter((v) => (!runsThere(v) || startingHere(v)) && !this.marks[v.name]?.stopped).map((v) => v.name);
  }

  /** The VMs running here, with their memory now (for the memory plan). */
  async runningHere(): Promise<{ name: string; memoryBytes: number }[]> {
    const out: { name: string; memoryBytes: number }[] = [];
    for (const vm of this.local.values()) out.push({ name: vm.name, memoryBytes: (await this.infoOf(vm)).memoryBytes });
    return out;
  }

  /** Squeeze (or give back) a VM running here to `bytes`; does not wait for the guest. */
  async balloonHere(name: string, bytes: number): Promise<void> {
    const vm = this.local.get(name);
    if (!vm) return;
    await vm.qemu.qmp.execute('balloon', { value: bytes });
    this.host.log.info({ event: 'vm-memory-set', vm: name, target: bytes }, `vm ${name}: memory squeezed to ${formatSize(bytes)} to make room`);
  }

  /** Every VM of the cluster file, with where it runs; other nodes are asked. */
  async list(): Promise<VmInfo[]> {
    const here = await this.localInfos();
    const found = new Map(here.map((v) => [v.name, v]));
    for (const node of this.otherNodes()) {
      let answer: LocalAnswer;
      try {
        answer = await this.askLocal(node);
        this.lastSeen.set(node, answer.vms);
      } catch {
        for (const v of this.lastSeen.get(node) ?? []) if (!found.has(v.name) && v.state !== 'stopped') found.set(v.name, { ...v, stale: true });
        continue;
      }
      for (const v of answer.vms) {
        const mine = found.get(v.name);
        // Running beats an exit remembered elsewhere.
        if (!mine || (mine.state === 'stopped' || mine.state === 'failed')) found.set(v.name, v);
      }
    }
    return Object.keys(this.host.config.vms).map((name) => found.get(name) ?? this.stoppedInfo(name));
  }

  private stoppedInfo(name: string, reason?: string): VmInfo {
    const c = this.config(name);
    return { name, node: null, state: 'stopped', memoryBytes: parseSize(String(c.memory)), cpus: c.cpus, disks: c.disks, ...(reason ? { reason } : {}) };
  }

  async localInfos(): Promise<VmInfo[]> {
    const out: VmInfo[] = [];
    for (const vm of this.local.values()) out.push(await this.infoOf(vm));
    for (const [name, u] of this.unattached) {
      if (this.local.has(name)) continue;
      out.push({ ...this.stoppedInfo(name, `its QEMU runs but ${u.reason}`), node: this.host.node, state: 'failed', pid: u.pid, since: new Date(u.since).toISOString() });
    }
    for (const [name, exit] of this.exits) {
      if (this.local.has(name) || this.unattached.has(name) || this.starting.has(name) || this.restarting.has(name) || !exit.failed || !this.isVm(name)) continue;
      out.push({ ...this.stoppedInfo(name, exit.reason), node: this.host.node, state: 'failed' });
    }
    // Being started (or restarted) here: it runs here, as far as any other node deciding is concerned.
    for (const name of new Set([...this.starting.keys(), ...this.restarting])) {
      if (this.local.has(name) || this.unattached.has(name) || !this.isVm(name)) continue;
      out.push({ ...this.stoppedInfo(name), node: this.host.node, state: 'starting' });
    }
    return out;
  }

  private async infoOf(vm: LocalVm): Promise<VmInfo> {
    const c = this.config(vm.name);
    let memoryBytes = vm.spec.memoryBytes;
    try {
      const b = await vm.qemu.qmp.execute<{ actual: number }>('query-balloon', undefined, { timeoutMs: 2000 });
      memoryBytes = b.actual;
    } catch {
      // No balloon answer (a guest without the driver, a busy QEMU): the boot size.
    }
    const m = vm.state === 'migrating' ? vm.migration : undefined;
    return {
      name: vm.name,
      node: this.host.node,
      state: vm.state,
      memoryBytes,
      cpus: vm.spec.cpus,
      disks: c.disks,
      pid: vm.qemu.pid,
      since: new Date(vm.since).toISOString(),
      ...(m ? { migration: { to: m.to, transferredBytes: m.transferredBytes, totalBytes: m.totalBytes, rateBytesPerSec: Math.round(m.transferredBytes / Math.max(0.001, (Date.now() - m.startedAt) / 1000)) } } : {}),
    };
  }

  private async localAnswer(): Promise<LocalAnswer> {
    return { node: this.host.node, vms: await this.localInfos(), marks: this.marks };
  }

  /** Where the VM runs now: this node, another, or nowhere; nodes that did not answer are listed. */
  private async locate(name: string): Promise<{ node: string | undefined; state?: VmState; unreachable: string[] }> {
    const mine = this.local.get(name);
    if (mine) return { node: this.host.node, state: mine.state, unreachable: [] };
    if (this.unattached.has(name) || this.starting.has(name)) return { node: this.host.node, state: this.unattached.has(name) ? 'failed' : 'starting', unreachable: [] };
    const unreachable: string[] = [];
    for (const node of this.otherNodes()) {
      try {
        const answer = await this.askLocal(node);
        const v = answer.vms.find((x) => x.name === name && runsThere(x));
        if (v) return { node, state: v.state, unreachable };
      } catch {
        unreachable.push(node);
      }
    }
    return { node: undefined, unreachable };
  }

  /** The node that decides where `name` runs: the one serving its boot disk's pool. */
  private decider(name: string): string {
    const pool = this.config(name).disks[0].split('/')[0];
    const server = this.host.poolServer(pool);
    if (!server) {
      const resources = this.host.config.pools[pool]?.devices ?? [];
      throw new UserError(`vm ${name}: pool ${pool} is open on no node (no node is Primary for ${resources.join(', ')}): make one Primary (resource primary ${resources[0] ?? 'RES'})`, 1);
    }
    return server;
  }

  private async startVm(name: string, on: string | undefined, auto: boolean, forwarded = false): Promise<unknown> {
    const c = this.config(name);
    if (on !== undefined && !this.host.config.nodes[on]) throw new UserError(`vm start ${name} --on ${on}: no node named ${on} (nodes: ${Object.keys(this.host.config.nodes).join(', ')})`);
    const decider = this.decider(name);
    if (decider !== this.host.node) {
      // Sent here by a node that took this one for the decider: the two disagree (a role is changing).
      if (forwarded) throw new UserError(`vm ${name}: ${this.host.node} and the node that sent the request disagree on which node serves its disks (a Primary role is moving): try again`, 1);
      return this.host.call(decider, { cmd: 'vm.start', vm: name, ...(on ? { on } : {}), ...(auto ? { auto } : {}), forwarded: true }, 120_000);
    }
    return this.locked(name, async () => {
      const where = await this.locate(name);
      if (where.node) return { vm: name, node: where.node, state: where.state, already: true, message: `vm ${name} is already running on ${where.node}${on && on !== where.node ? ` (vm migrate ${name} --to ${on} moves it)` : ''}` };
      if (on !== undefined && this.fencedNodes.has(on)) throw new UserError(`vm start ${name} --on ${on}: ${on} is fenced (declared dead): start it elsewhere, or rejoin ${on} first`, 1);
      let target = on ?? c.prefer ?? this.host.node;
      // Its prefer node is fenced or drained: it runs elsewhere meanwhile (node rejoin moves it back).
      if (on === undefined && (this.fencedNodes.has(target) || this.drainedNodes.has(target))) {
        target = [this.host.node, ...this.otherNodes()].find((n) => !this.drainedNodes.has(n)) ?? this.host.node;
      }
      if (where.unreachable.length > 0) {
        const whyNot = auto || on === this.host.node ? this.whyNotStartWithout(name, where.unreachable) : undefined;
        if (!(auto || on === this.host.node) || whyNot !== undefined) {
          throw new UserError(`vm ${name}: cannot reach ${where.unreachable.join(', ')} to make sure it does not run there: start it when ${where.unreachable.length > 1 ? 'they answer' : 'it answers'}${whyNot ? `; ${whyNot}` : ''}`, 1);
        }
        if (auto && this.marks[name]?.stopped) return { vm: name, skipped: 'stopped by vm stop' };
        if (where.unreachable.includes(target)) {
          const waited = Math.round((Date.now() - this.startedAt) / 1000);
          this.host.log.warn(
            { event: 'vm-start-without-prefer', vm: name, prefer: target, waitedSeconds: waited },
            `vm ${name}: ${target} (where it prefers to run) has not answered since ${this.host.node} came up ${waited} s ago, and nothing uses its disks: starting it on ${this.host.node}`,
          );
          target = this.host.node;
        }
      }
      if (auto && this.marks[name]?.stopped) return { vm: name, skipped: 'stopped by vm stop' };
      await this.markEverywhere(name, false);
      const started = target === this.host.node ? await this.startHere(name) : await this.host.call(target, { cmd: 'vm.start-here', vm: name }, 120_000);
      return started;
    });
  }

  /**
   * "When the cluster comes up, each VM starts on its prefer node, or the other one if that is down":
   * a node that cannot ask `unreachable` whether the VM runs there starts it itself only when it can
   * tell that no copy of it runs anywhere:
   * - those nodes have not answered once since this daemon started (`startup.waitForPeer` seconds ago
   *   at least), so this is the cluster coming up without them, not a node lost while its VMs ran
   *   (that is failover's, which fences first);
   * - this node serves every disk of the VM (a copy elsewhere could only write through here), and
   * - no client uses those disks' exports here (a QEMU whose daemon is down still reads them).
   * A copy found paused later on the node that comes back is ended there (see recover).
   */
  private whyNotStartWithout(name: string, unreachable: string[]): string | undefined {
    const heard = unreachable.filter((n) => this.heard.has(n));
    if (heard.length > 0) return `${heard.join(', ')} answered since ${this.host.node} came up: a node lost while its VMs ran is failover's`;
    const wait = this.host.config.startup.waitForPeer;
    if (wait === 0) return 'startup.waitForPeer is 0: VMs wait for their prefer node';
    const left = Math.ceil((this.startedAt + wait * 1000 - Date.now()) / 1000);
    if (left > 0) return `if it does not answer within ${left} s more (startup.waitForPeer), it starts here`;
    for (const d of this.config(name).disks) {
      const [pool, volume] = d.split('/');
      if (this.host.poolServer(pool) !== this.host.node) return `its disk ${d} is not served here`;
      const clients = this.host.exportClients(volume);
      if (clients.length > 0) return `its disk ${d} is in use here by ${clients.join(', ')}: a copy may run there`;
    }
    return undefined;
  }

  /**
   * Whether this copy of a VM, paused on a disk error, may run on: another node may hold a copy too (the VM
   * was started there while this node was down or hung, see whyNotStartWithout). Of two copies the VM is the
   * one running, or else the one started later: the older one has not written since the newer one started
   * (it has been paused since its disks failed), and resuming it would run a guest whose memory no longer
   * matches its disks. `end`: this copy is stale; `wait`: it cannot be told yet (a node does not answer, or
   * holds a copy in a state that says nothing); undefined: this copy is the VM.
   */
  private async otherCopy(vm: LocalVm): Promise<{ end: string } | { wait: string } | undefined> {
    for (const node of this.otherNodes()) {
      let answer: LocalAnswer;
      try {
        answer = await this.askLocal(node);
      } catch {
        // A copy there could only write through this node's exports if this node serves every disk.
        if (this.servesEveryDisk(vm.name)) continue;
        return { wait: `${node} does not answer: a copy of it may run there` };
      }
      const theirs = answer.vms.find((v) => v.name === vm.name && runsThere(v));
      if (!theirs) continue;
      if (theirs.state === 'running') return { end: node };
      const since = theirs.since !== undefined ? Date.parse(theirs.since) : NaN;
      if ((theirs.state !== 'paused' && theirs.state !== 'starting') || Number.isNaN(since)) return { wait: `its copy on ${node} is ${theirs.state}` };
      if (since > vm.since || (since === vm.since && node < this.host.node)) return { end: node };
    }
    return undefined;
  }

  private servesEveryDisk(name: string): boolean {
    return this.config(name).disks.every((d) => this.host.poolServer(d.split('/')[0]) === this.host.node);
  }

  /** Start QEMU for `name` on this node, its disks from the nodes serving their pools. */
  private async startHere(name: string): Promise<VmInfo> {
    this.config(name);
    this.refuseWhileFenced(name);
    const running = this.local.get(name);
    if (running) return this.infoOf(running);
    const u = this.unattached.get(name);
    if (u) throw new UserError(`vm ${name}: its QEMU (pid ${u.pid}) runs on ${this.host.node} but ${u.reason}: vm stop ${name} --force ends it`, 1);
    const under = this.starting.get(name);
    if (under) return under;
    const start = this.spawnHere(name).finally(() => this.starting.delete(name));
    this.starting.set(name, start);
    return start;
  }

  private async spawnHere(name: string): Promise<VmInfo> {
    const c = this.config(name);
    const spec = await this.specOf(name);
    const paths = vmPaths(this.vmDir(name));
    fs.mkdirSync(paths.dir, { recursive: true, mode: 0o700 });
    this.writeSpec(name, spec);
    this.host.log.info({ event: 'vm-starting', vm: name, disks: spec.disks, accel: spec.accel }, `vm ${name}: starting (${spec.accel}, disks from ${[...new Set(spec.disks.map((d) => d.node))].join(', ')})`);
    let qemu: QemuProcess;
    try {
      qemu = await QemuProcess.start(spec, paths, this.host.log);
    } catch (err) {
      throw explainStartError(err, name, spec);
    }
    if (this.selfFenced !== undefined) {
      // This node fenced itself while the QEMU was starting: it never runs.
      await qemu.kill().catch(() => undefined);
      throw new UserError(`vm ${name}: ${this.host.node} fenced itself while it started (${this.selfFenced}): not started`, 1);
    }
    const vm = this.adopt(name, qemu, spec, 'running');
    const status = await qemu.status().catch(() => undefined);
    if (status) vm.state = stateOf(status.status);
    this.exits.delete(name);
    this.host.log.info({ event: 'vm-started', vm: name, pid: qemu.pid, memory: c.memory }, `vm ${name}: running on ${this.host.node} (QEMU ${qemu.pid})`);
    return this.infoOf(vm);
  }

  private async specOf(name: string, given?: DiskEndpoint[]): Promise<VmSpec> {
    const c = this.config(name);
    const base = path.dirname(this.host.config.file);
    const disks = given ?? (await this.endpoints(name));
    const boot = c.boot ? { kernel: path.resolve(base, c.boot.kernel), ...(c.boot.initrd ? { initrd: path.resolve(base, c.boot.initrd) } : {}), ...(c.boot.append !== undefined ? { append: c.boot.append } : {}) } : undefined;
    return { name, memoryBytes: parseSize(String(c.memory)), cpus: c.cpus, disks, ...(boot ? { boot } : {}), accel: this.accel };
  }

  /** The pool incarnations `node` keeps (undefined: it keeps none); throws when it does not answer. */
  private async incarnationsOf(node: string): Promise<Record<string, PoolIncarnation> | undefined> {
    if (node === this.host.node) return this.host.poolIncarnations();
    const answer = (await this.host.call(node, { cmd: 'vm.incarnations' }, PEER_TIMEOUT_MS)) as { pools?: Record<string, PoolIncarnation> };
    return answer.pools;
  }

  /** Where each disk of `name` is served now, by which open of its pool (throws, exit 1, when a pool is open nowhere). */
  private async endpoints(name: string): Promise<DiskEndpoint[]> {
    const c = this.config(name);
    const pools = new Map<string, Record<string, PoolIncarnation> | undefined>();
    const out: DiskEndpoint[] = [];
    for (const d of c.disks) {
      const [pool, volume] = d.split('/');
      const node = this.host.poolServer(pool);
      if (!node) {
        const resources = this.host.config.pools[pool]?.devices ?? [];
        throw new UserError(`vm ${name}: disk ${d}: pool ${pool} is open on no node (no node is Primary for ${resources.join(', ')}): make one Primary (resource primary ${resources[0] ?? 'RES'})`, 1);
      }
      if (!pools.has(node)) pools.set(node, await this.incarnationsOf(node));
      const served = pools.get(node);
      const incarnation = served?.[pool]?.current;
      // (A node that keeps no incarnations, an older daemon: the plain name.)
      if (served !== undefined && incarnation === undefined) throw new UserError(`vm ${name}: disk ${d}: ${node} does not serve pool ${pool} right now (a role is moving): try again`, 1);
      out.push({ volume: d, node, host: this.host.config.nodes[node].address, port: this.host.config.exports.port, export: volume, ...(incarnation ? { incarnation } : {}) });
    }
    return out;
  }

  /**
   * A VM whose disks lost their server (a connection broken, a role moved) may go on over `disks` only if
   * every write its old server acknowledged is there: the same open of the pool, or one that closed cleanly
   * (a daemon restarted by its service manager, a handover: every mapping committed). A pool whose server
   * died with it open (kill -9, a crash) lost the new mappings it had not committed: a guest going on would
   * be told by its next flush that writes are durable which are gone. It restarts instead, as after a crash
   * of its disk. `wait`: the old server cannot be asked yet.
   */
  private async mayGoOn(vm: LocalVm, disks: DiskEndpoint[]): Promise<{ ok: true } | { restart: string } | { wait: string }> {
    for (let i = 0; i < vm.spec.disks.length; i++) {
      const was = vm.spec.disks[i];
      if (was.incarnation === undefined || disks[i]?.incarnation === was.incarnation) continue;
      const pool = was.volume.split('/')[0];
      let record: PoolIncarnation | undefined;
      {
        try {
          const all = await this.incarnationsOf(was.node);
          if (!all) continue; // a node that keeps no incarnations: as before
          record = all[pool];
        } catch (err) {
          return { wait: `${was.node}, which served its disk ${was.volume}, does not answer (${(err as Error).message})` };
        }
      }
      const end = endOf(record, was.incarnation);
      if (end === 'clean') continue;
      if (end === 'open') return { wait: `${was.node} still serves pool ${pool} as it did` };
      return { restart: `pool ${pool} on ${was.node} was ${end === 'unclean' ? 'reopened after its daemon died with it open' : 'reopened since (how its earlier open ended is not known)'}: writes it acknowledged but had not committed may be gone` };
    }
    return { ok: true };
  }

  /**
   * Kill this copy of the guest (`vm`, if it is still the one here) and boot it again here, its disks from
   * where they are served now. Reported as starting here all along (localInfos), so a node deciding
   * meanwhile does not start a copy of its own.
   */
  private async restartGuest(vm: LocalVm, why: string, fields: Record<string, unknown> = {}): Promise<void> {
    const name = vm.name;
    await this.locked(name, async () => {
      if (this.local.get(name) !== vm || vm.incoming) return;
      // Where its disks are served now, before it is killed: if they are served nowhere it stays paused.
      await this.endpoints(name);
      await this.killAndBoot(vm, () => this.host.log.warn({ event: 'vm-restarting', vm: name, why, ...fields }, `vm ${name}: ${why}: restarting the guest on ${this.host.node}, as after a crash of its disk`));
    });
  }

  /** Under the VM's lock: kill this copy and boot the guest again here, reported as starting all along (localInfos); `said` logs why, once it is dead. */
  private async killAndBoot(vm: LocalVm, said: () => void): Promise<void> {
    this.restarting.add(vm.name);
    try {
      vm.stopping = true;
      await vm.qemu.kill();
      said();
      await this.startHere(vm.name);
    } finally {
      this.restarting.delete(vm.name);
    }
  }

  /** The VM's record beside its QEMU: what it runs with and, on a migration's destination, where from and until when. */
  private writeSpec(name: string, spec: VmSpec, incoming?: IncomingRecord): void {
    const file = path.join(this.vmDir(name), 'vm.json');
    fs.writeFileSync(`${file}.tmp`, JSON.stringify({ spec, ...(incoming ? { incoming } : {}) }));
    fs.renameSync(`${file}.tmp`, file);
  }

  /**
   * A disk of the VM failed an I/O (its server went away: a daemon restart, a role that moved) and
   * werror=stop paused it: the guest saw nothing. Reconnect its disks to wherever they are served now
   * and let it go on; until they are served somewhere, it stays paused (tried again with a backoff).
   */
  private async recover(vm: LocalVm, reason: string): Promise<void> {
    if (vm.recovering) return;
    vm.recovering = true;
    const t0 = Date.now();
    let wait = 250;
    let told = '';
    let full = false;
    try {
      while (this.local.get(vm.name) === vm && !this.stopped) {
        // Paused for a handover: its resume moves the disks (or, once the pause runs out, endExpiredPauses).
        if (vm.handoverPaused !== undefined && Date.now() < (vm.pauseUntil ?? 0)) {
          await sleep(500);
          continue;
        }
        const st = await vm.qemu.status().catch(() => undefined);
        if (!st || st.status !== 'io-error') {
          if (full && st?.running) this.host.log.info({ event: 'vm-disk-room', vm: vm.name, pausedMs: Date.now() - t0 }, `vm ${vm.name}: its pool has room again: running after ${Math.round((Date.now() - t0) / 1000)} s paused`);
          return;
        }
        if (vm.noSpace !== undefined) {
          // Paused until there is room: `cont` now and then retries the write (it pauses again while the pool is full).
          if (!full) {
            full = true;
            const volume = vm.spec.disks[vm.noSpace]?.volume;
            const pools = [...new Set((volume ? [volume] : vm.spec.disks.map((d) => d.volume)).map((v) => v.split('/')[0]))];
            this.host.log.warn(
              { event: 'vm-disk-full', vm: vm.name, volume, pools },
              `vm ${vm.name}: paused: ${volume ? `its disk ${volume}` : 'a disk'} cannot be written, pool ${pools.join(', ')} is full: extend it (pool extend ${pools[0]} DEVICE) or make room (remove snapshots or volumes); it runs on by itself once there is room`,
            );
          }
          await sleep(Math.max(wait, 1000));
          wait = Math.min(wait * 2, 10_000);
          if (this.local.get(vm.name) !== vm || this.stopped) return;
          vm.noSpace = undefined;
          await vm.qemu.qmp.execute('cont').catch(() => undefined);
          // A write that still finds no room pauses it again (its event sets noSpace) before the next look.
          await sleep(500);
          continue;
        }
        // A copy paused with no daemon to steer it (its node was down) while the VM was started elsewhere: this one
        // may be stale. Resuming it would make two copies on the same disks.
        const other = vm.state === 'migrating' || vm.incoming ? undefined : await this.otherCopy(vm);
        if (other && 'end' in other) {
          this.host.log.warn({ event: 'vm-stale-copy-ended', vm: vm.name, runsOn: other.end, pid: vm.qemu.pid }, `vm ${vm.name}: found paused here (QEMU ${vm.qemu.pid}) while it runs on ${other.end}: ending this stale copy`);
          vm.stopping = true;
          await vm.qemu.kill().catch(() => undefined);
          return;
        }
        if (other) {
          if (other.wait !== told) {
            told = other.wait;
            this.host.log.warn({ event: 'vm-stale-copy-check', vm: vm.name, reason, err: other.wait }, `vm ${vm.name}: paused after a disk error (${reason}); not resumed while ${other.wait} (tried again)`);
          }
          await sleep(wait);
          wait = Math.min(wait * 2, 5000);
          continue;
        }
        // Its disks were served by a node declared dead: what that server had not flushed may be gone, so the
        // guest must not go on (a flush here would tell it all is durable): the takeover restarts it.
        const lost = [...new Set(vm.spec.disks.map((d) => d.node))].filter((n) => n !== this.host.node && this.fencedNodes.has(n));
        if (lost.length > 0) {
          const why = `its disks were served by ${lost.join(', ')}, declared dead: it is restarted once they are taken over`;
          if (why !== told) {
            told = why;
            this.host.log.warn({ event: 'vm-disks-lost', vm: vm.name, servedBy: lost }, `vm ${vm.name}: paused after a disk error (${reason}); ${why}`);
          }
          await sleep(wait);
          wait = Math.min(wait * 2, 5000);
          continue;
        }
        try {
          const disks = await this.endpoints(vm.name);
          const verdict = await this.mayGoOn(vm, disks);
          if ('restart' in verdict) {
            await this.restartGuest(vm, verdict.restart, { reason });
            return;
          }
          if ('wait' in verdict) throw new Error(verdict.wait);
          await this.moveDisks(vm, disks);
          await vm.qemu.qmp.execute('cont');
          this.host.log.warn(
            { event: 'vm-disks-reconnected', vm: vm.name, reason, pausedMs: Date.now() - t0, servers: [...new Set(disks.map((d) => d.node))] },
            `vm ${vm.name}: a disk failed (${reason}): paused ${Date.now() - t0} ms, reconnected to ${[...new Set(disks.map((d) => d.node))].join(', ')}, running again`,
          );
        } catch (err) {
          const message = (err as Error).message;
          if (message !== told) {
            told = message;
            this.host.log.warn({ event: 'vm-disks-unreachable', vm: vm.name, reason, err: message }, `vm ${vm.name}: paused after a disk error (${reason}); its disks cannot be reconnected yet: ${message}`);
          }
        }
        await sleep(wait);
        wait = Math.min(wait * 2, 5000);
      }
    } finally {
      vm.recovering = false;
    }
  }

  private readSpec(name: string): { spec: VmSpec; incoming?: IncomingRecord } | undefined {
    try {
      return JSON.parse(fs.readFileSync(path.join(this.vmDir(name), 'vm.json'), 'utf8')) as { spec: VmSpec; incoming?: IncomingRecord };
    } catch {
      return undefined;
    }
  }

  /** Watch a QEMU of this node: its exit ends the VM here. */
  private adopt(name: string, qemu: QemuProcess, spec: VmSpec, state: VmState): LocalVm {
    const vm: LocalVm = { name, qemu, spec, state, since: Date.now(), stopping: false, recovering: false };
    this.local.set(name, vm);
    qemu.on('event', (e) => {
      if (e.event === 'STOP') {
        // Not a migration of this daemon's: one an earlier daemon started may have finished by itself (postmigrate).
        if (vm.state !== 'migrating' && !vm.incoming) void this.endIfMigratedAway(vm);
        vm.state = vm.state === 'migrating' ? 'migrating' : 'paused';
      }
      else if (e.event === 'RESUME') {
        vm.state = 'running';
        // A migration's destination runs the guest: the migration is over (the source's migrate-done may never come:
        // its daemon died). From now on this is the VM, not a copy a late migrate-abort may end.
        if (vm.incoming) this.owned(vm);
      }
      else if (e.event === 'BLOCK_IO_ERROR') {
        // A full pool (the server's ENOSPC) is not a server gone: reconnecting would not help.
        vm.noSpace = e.data?.nospace === true ? diskIndexOf(String(e.data?.['node-name'] ?? e.data?.device ?? '')) : undefined;
        void this.recover(vm, String(e.data?.reason ?? 'I/O error'));
      }
    });
    qemu.once('exit', (exit) => this.exited(vm, exit));
    return vm;
  }

  private exited(vm: LocalVm, exit: QemuExit): void {
    if (this.local.get(vm.name) !== vm) return;
    this.local.delete(vm.name);
    const failed = !vm.stopping && !exit.byGuest;
    this.exits.set(vm.name, { reason: exit.reason, failed, at: Date.now(), ...(vm.incoming ? { incoming: true } : {}) });
    // A guest that powered itself off stays off, as after vm stop.
    if (exit.byGuest && !this.stopped) void this.markEverywhere(vm.name, true).catch(() => undefined);
    if (vm.incoming) {
      this.host.log.warn({ event: 'vm-incoming-ended', vm: vm.name, from: vm.incoming.from, reason: exit.reason }, `vm ${vm.name}: the migration from ${vm.incoming.from} did not finish: its QEMU here exited (${exit.reason})`);
      return;
    }
    const level = failed ? 'error' : 'info';
    this.host.log[level](
      { event: 'vm-exited', vm: vm.name, reason: exit.reason, byGuest: exit.byGuest, failed },
      `vm ${vm.name}: QEMU exited (${exit.byGuest ? 'the guest powered off' : exit.reason})${failed ? ': not asked by duet' : ''}`,
    );
  }

  private async stopVm(name: string, force: boolean): Promise<unknown> {
    this.config(name);
    await this.markEverywhere(name, true);
    const where = await this.locate(name);
    if (!where.node) {
      if (where.unreachable.length > 0) throw new UserError(`vm ${name}: not running on any node that answers; ${where.unreachable.join(', ')} did not answer: it stays marked stopped, and is stopped there when it answers`, 1);
      return { vm: name, state: 'stopped', message: `vm ${name} is not running` };
    }
    if (where.node === this.host.node) return this.stopHere(name, force);
    return this.host.call(where.node, { cmd: 'vm.stop-here', vm: name, force }, POWERDOWN_TIMEOUT_MS + 15_000);
  }

  private async stopHere(name: string, force: boolean): Promise<unknown> {
    this.config(name);
    const u = this.unattached.get(name);
    if (u && !this.local.has(name)) {
      if (!force) throw new UserError(`vm ${name}: its QEMU (pid ${u.pid}) on ${this.host.node} cannot be asked to power off: ${u.reason}; vm stop ${name} --force kills it`, 1);
      killPid(u.pid);
      this.unattached.delete(name);
      this.host.log.info({ event: 'vm-stopped', vm: name, forced: true, pid: u.pid }, `vm ${name}: QEMU ${u.pid} killed on ${this.host.node}`);
      return { vm: name, node: this.host.node, state: 'stopped', killed: true };
    }
    const vm = this.local.get(name);
    if (!vm) return { vm: name, state: 'stopped', message: `vm ${name} is not running on ${this.host.node}` };
    // Mid-migration, a power-off reaches a copy that is about to be ended (or one that is not the VM yet), and
    // the guest runs on at the destination. Killing the source's copy (--force) fails the migration: that stops it.
    if (vm.incoming || (vm.state === 'migrating' && !force)) {
      throw new UserError(`vm ${name} is migrating ${vm.incoming ? `from ${vm.incoming.from} to ${this.host.node}` : `away from ${this.host.node}`}: stop it when the migration is done${vm.incoming ? '' : ` (or vm stop ${name} --force now)`}`, 1);
    }
    vm.stopping = true;
    const exit = force ? await vm.qemu.kill() : await vm.qemu.powerdown(POWERDOWN_TIMEOUT_MS);
    this.host.log.info({ event: 'vm-stopped', vm: name, forced: force, reason: exit.reason }, `vm ${name}: stopped on ${this.host.node}${exit.reason === 'killed' ? ' (killed)' : ''}`);
    return { vm: name, node: this.host.node, state: 'stopped', killed: exit.reason === 'killed' };
  }

  private console(name: string, since: number | undefined, here = false, raw = false): Promise<ConsoleChunk & { node: string }> | (ConsoleChunk & { node: string }) {
    this.config(name);
    const log = new ConsoleLog(this.vmDir(name));
    // An incoming migration's QEMU has printed nothing: the console is still the source's.
    if (here || (this.local.has(name) && !this.local.get(name)!.incoming)) return { ...log.read(since, { raw }), node: this.host.node };
    return this.consoleElsewhere(name, since, log);
  }

  private async consoleElsewhere(name: string, since: number | undefined, log: ConsoleLog): Promise<ConsoleChunk & { node: string }> {
    const where = await this.locate(name);
    if (where.node && where.node !== this.host.node) {
      return (await this.host.call(where.node, { cmd: 'vm.console', vm: name, ...(since !== undefined ? { since } : {}) }, PEER_TIMEOUT_MS)) as ConsoleChunk & { node: string };
    }
    // Running nowhere: the newest console any node kept (where it ran last).
    let best = { ...log.read(since), node: this.host.node };
    for (const node of this.otherNodes()) {
      if (where.unreachable.includes(node)) continue;
      try {
        const theirs = (await this.host.call(node, { cmd: 'vm.console', vm: name, here: true, ...(since !== undefined ? { since } : {}) }, PEER_TIMEOUT_MS)) as ConsoleChunk & { node: string };
        if (theirs.updatedAt > best.updatedAt) best = theirs;
      } catch {
        // Not there to ask: what this node has.
      }
    }
    return best;
  }

  /* ----------------------------------------------------------- migration */

  /** `vm migrate VM --to NODE`, asked of any node: the node running it does it. */
  private async migrate(name: string, to: string): Promise<unknown> {
    this.config(name);
    if (!this.host.config.nodes[to]) throw new UserError(`vm migrate ${name} --to ${to}: no node named ${to} (nodes: ${Object.keys(this.host.config.nodes).join(', ')})`);
    const where = await this.locate(name);
    if (!where.node) throw new UserError(`vm ${name} is not running${where.unreachable.length > 0 ? ` on any node that answers (${where.unreachable.join(', ')} did not)` : ''}: start it where you want it (vm start ${name} --on ${to})`, 1);
    if (where.node === to) throw new UserError(`vm ${name} already runs on ${to}: nothing to migrate`, 1);
    if (where.node === this.host.node) return this.migrateOut(name, to);
    return this.host.call(where.node, { cmd: 'vm.migrate-out', vm: name, to }, MIGRATION_TIMEOUT_MS + 60_000);
  }

  /** The source's side: start the destination, send the guest, end the copy here. */
  private async migrateOut(name: string, to: string): Promise<unknown> {
    return this.locked(name, async () => {
      const vm = this.local.get(name);
      if (!vm || vm.incoming) throw new UserError(`vm ${name} is not running on ${this.host.node}`, 1);
      if (to === this.host.node) throw new UserError(`vm ${name} already runs on ${to}: nothing to migrate`, 1);
      if (vm.state !== 'running') throw new UserError(`vm ${name} is ${vm.state} on ${this.host.node}: only a running VM migrates`, 1);
      const t0 = Date.now();
      vm.state = 'migrating';
      vm.migratingTo = to;
      this.host.log.info({ event: 'vm-migrating', vm: name, from: this.host.node, to }, `vm ${name}: migrating from ${this.host.node} to ${to}`);
      let port: number;
      try {
        ({ port } = (await this.host.call(to, { cmd: 'vm.migrate-in', vm: name, from: this.host.node, memoryBytes: vm.spec.memoryBytes, cpus: vm.spec.cpus, disks: vm.spec.disks, waitMs: MIGRATION_TIMEOUT_MS + 60_000 }, 60_000)) as { port: number });
      } catch (err) {
        vm.state = 'running';
        // It may have started its incoming QEMU all the same (the answer was lost or late): end it, or it waits for a
        // migration that never comes and refuses the next one. Harmless when nothing started there.
        void this.host.call(to, { cmd: 'vm.migrate-abort', vm: name }, 10_000).catch(() => undefined);
        throw new UserError(`vm ${name}: ${to} cannot take it: ${(err as Error).message}; it still runs on ${this.host.node}`, 1);
      }
      let result;
      try {
        const cap = this.host.config.migration.bandwidth;
        result = await migrateOut(vm.qemu.qmp, this.host.config.nodes[to].address, port, {
          timeoutMs: MIGRATION_TIMEOUT_MS,
          maxDowntimeMs: this.host.config.migration.maxDowntime,
          ...(cap !== undefined ? { bandwidthBytesPerSec: parseSize(String(cap)) } : {}),
          progress: (q) => (vm.migration = { to, transferredBytes: q.transferred, totalBytes: q.total, startedAt: t0 }),
        });
      } catch (err) {
        result = { status: 'failed' as const, totalTimeMs: Date.now() - t0, downtimeMs: 0, transferredBytes: 0, error: (err as Error).message };
      }
      result = await settleMigration(vm.qemu.qmp, result);
      vm.migratingTo = undefined;
      vm.migration = undefined;
      if (result.status !== 'completed') {
        // (A destination declared dead and taken over is not asked: it is fenced, and would cost the timeout.)
        if (!this.fencedNodes.has(to)) await this.host.call(to, { cmd: 'vm.migrate-abort', vm: name }, 30_000).catch(() => undefined);
        const exit = await vm.qemu.waitExit(vm.qemu.running ? 0 : 5000);
        if (exit || !vm.qemu.running) {
          this.host.log.error({ event: 'vm-migration-failed', vm: name, to, error: result.error, sourceExited: true }, `vm ${name}: its QEMU here exited during the migration to ${to}: it runs nowhere`);
          throw new UserError(`vm ${name}: its QEMU on ${this.host.node} exited during the migration to ${to} (${exit?.reason ?? result.error ?? 'gone'}): it runs nowhere now (vm start ${name})`, 1);
        }
        vm.state = await vm.qemu.status().then((st) => stateOf(st.status)).catch(() => 'running' as VmState);
        this.host.log.warn({ event: 'vm-migration-failed', vm: name, to, error: result.error }, `vm ${name}: migration to ${to} failed (${result.error ?? result.status}): it runs on ${this.host.node}`);
        throw new UserError(`vm ${name}: migration to ${to} failed (${result.error ?? result.status}); it still runs on ${this.host.node}`, 1);
      }
      // QEMU here has sent everything and is paused for good (postmigrate, its disks given up). The destination
      // confirms it runs the guest before this copy is ended: one that failed to load it never ran it, and then the
      // guest goes on here (libvirt's confirm step). One that ran it, or cannot be asked, has the VM: never two copies.
      let note = '';
      let confirm: { running?: boolean; neverRan?: boolean; reason?: string } | undefined;
      try {
        confirm = (await this.host.call(to, { cmd: 'vm.migrate-done', vm: name, from: this.host.node }, 60_000)) as typeof confirm;
      } catch (err) {
        note = ` (${to} was not told it is done: ${(err as Error).message}; it runs the VM all the same)`;
      }
      if (confirm?.running === false && confirm.neverRan === true) {
        const why = confirm.reason ?? 'its QEMU exited';
        try {
          await vm.qemu.qmp.execute('cont');
          vm.state = 'running';
          this.host.log.warn({ event: 'vm-migration-failed', vm: name, to, error: why, resumedHere: true }, `vm ${name}: ${to} did not run the guest it received (${why}): it runs on ${this.host.node}`);
          throw new UserError(`vm ${name}: migration to ${to} failed (${to}'s QEMU did not run the guest: ${why}); it still runs on ${this.host.node}`, 1);
        } catch (err) {
          if (err instanceof UserError) throw err;
          this.host.log.error({ event: 'vm-migration-failed', vm: name, to, error: why, resumedHere: false, err: (err as Error).message }, `vm ${name}: ${to} did not run the guest and it could not run on here again: ${(err as Error).message}`);
        }
      }
      vm.stopping = true;
      await vm.qemu.kill().catch((err: unknown) => this.host.log.error({ event: 'vm-source-kill-failed', vm: name, err: (err as Error).message }, (err as Error).message));
      if (confirm?.running === false) {
        this.host.log.error({ event: 'vm-migration-failed', vm: name, to, error: confirm.reason, sourceExited: true }, `vm ${name}: its QEMU on ${to} ended after the migration: it runs nowhere`);
        throw new UserError(`vm ${name}: its QEMU on ${to} ended right after the migration (${confirm.reason ?? 'gone'}): it runs nowhere now (vm start ${name})`, 1);
      }
      const summary = { vm: name, from: this.host.node, to, totalTimeMs: result.totalTimeMs, downtimeMs: result.downtimeMs, transferredBytes: result.transferredBytes, wallTimeMs: Date.now() - t0 };
      this.host.log.info({ event: 'vm-migrated', ...summary }, `vm ${name}: migrated from ${this.host.node} to ${to} in ${result.totalTimeMs} ms, ${result.downtimeMs} ms downtime${note}`);
      return { ...summary, message: `vm ${name} migrated from ${this.host.node} to ${to}: ${result.totalTimeMs} ms, guest paused ${result.downtimeMs} ms${note}` };
    });
  }

  /** The destination's side: a QEMU waiting for the guest; answers the port it listens on. */
  private async migrateIn(c: { vm: string; from: string; memoryBytes: number; cpus: number; disks: DiskEndpoint[]; waitMs?: number }): Promise<{ port: number }> {
    this.config(c.vm);
    this.refuseWhileFenced(c.vm);
    if (this.local.has(c.vm) || this.unattached.has(c.vm) || this.starting.has(c.vm)) throw new UserError(`vm ${c.vm} already has a QEMU on ${this.host.node}`, 1);
    // The source's view of the VM: the same memory size (QEMU needs it) and the same disk servers.
    const spec = { ...(await this.specOf(c.vm, c.disks)), memoryBytes: c.memoryBytes, cpus: c.cpus };
    const paths = vmPaths(this.vmDir(c.vm));
    fs.mkdirSync(paths.dir, { recursive: true, mode: 0o700 });
    new ConsoleLog(paths.dir).clearLive();
    const waitMs = c.waitMs ?? MIGRATION_TIMEOUT_MS + 60_000;
    this.writeSpec(c.vm, spec, { from: c.from, until: Date.now() + waitMs });
    let qemu: QemuProcess;
    try {
      qemu = await QemuProcess.start(spec, paths, this.host.log, { incoming: true });
    } catch (err) {
      throw explainStartError(err, c.vm, spec);
    }
    const vm = this.adopt(c.vm, qemu, spec, 'migrating');
    vm.incoming = { from: c.from };
    // Its exit before the end is the migration's failure, not the VM's: the guest runs on the source.
    vm.stopping = true;
    // A source that never sends (its daemon died before `migrate`, its QEMU runs on there) would leave this
    // QEMU waiting for good: a copy that blocks the next migration here and cannot be stopped (vm stop refuses).
    setTimeout(() => void this.endStaleIncoming(vm), waitMs).unref();
    try {
      return { port: await listenIncoming(qemu.qmp, this.host.address) };
    } catch (err) {
      await qemu.kill().catch(() => undefined);
      throw err;
    }
  }

  private async endStaleIncoming(vm: LocalVm): Promise<void> {
    if (this.local.get(vm.name) !== vm || !vm.incoming || this.stopped) return;
    const st = await vm.qemu.status().catch(() => undefined);
    if (st && st.status !== 'inmigrate') return;
    this.host.log.warn({ event: 'vm-incoming-abandoned', vm: vm.name, from: vm.incoming.from }, `vm ${vm.name}: the migration from ${vm.incoming.from} never came: ending the QEMU waiting for it here`);
    await vm.qemu.kill().catch(() => undefined);
  }

  /** The guest runs here now: take the console it had, and own the VM. */
  private async migrateDone(name: string, from: string): Promise<unknown> {
    // The guest's state may still be loading: wait (bounded) until QEMU runs it or gives up.
    const deadline = Date.now() + 30_000;
    let vm = this.local.get(name);
    while (vm?.incoming && Date.now() < deadline) {
      const st = await vm.qemu.status().catch(() => undefined);
      if (!st || st.status !== 'inmigrate') break;
      await sleep(50);
      vm = this.local.get(name);
    }
    vm = this.local.get(name);
    if (!vm) {
      // Its QEMU is gone. The source may run the guest on only if it never ran here (it exited still loading it).
      if (this.unattached.has(name) || this.starting.has(name)) throw new UserError(`vm ${name}: its QEMU on ${this.host.node} cannot be asked`, 1);
      const exit = this.exits.get(name);
      return { vm: name, node: this.host.node, running: false, neverRan: exit?.incoming === true, reason: exit?.reason ?? 'no QEMU of it here' };
    }
    if (vm.incoming) this.owned(vm);
    const st = await vm.qemu.status().catch(() => undefined);
    // Still 'inmigrate' when asked: its RESUME event (handled as it comes) says when it runs.
    if (st && st.status !== 'inmigrate') vm.state = stateOf(st.status);
    try {
      await this.adoptConsole(name, from);
    } catch (err) {
      this.host.log.warn({ event: 'vm-console-not-moved', vm: name, from, err: (err as Error).message }, `vm ${name}: the console printed on ${from} was not brought here: ${(err as Error).message}`);
    }
    return { vm: name, node: this.host.node, state: vm.state, running: true };
  }

  /** The end of an incoming migration: the VM is this node's now (its exit is the VM's, not the migration's). */
  private owned(vm: LocalVm): void {
    if (vm.incoming) {
      // In an event handler: a home that cannot be written (full, read-only) must not take the daemon down.
      try {
        this.writeSpec(vm.name, vm.spec);
      } catch (err) {
        this.host.log.error({ event: 'vm-spec-write-failed', vm: vm.name, err: (err as Error).message }, `vm ${vm.name}: cannot write its vm.json: ${(err as Error).message}`);
      }
    }
    vm.incoming = undefined;
    vm.stopping = false;
    vm.since = Date.now();
  }

  private async adoptConsole(name: string, from: string): Promise<void> {
    const parts: Buffer[] = [];
    // Byte for byte (raw): the positions here must go on from the source's, whatever the guest printed.
    let chunk = (await this.host.call(from, { cmd: 'vm.console', vm: name, here: true, since: 0, raw: true }, PEER_TIMEOUT_MS)) as ConsoleChunk;
    // Only the last HISTORY_MAX bytes are kept here: fetch those, not the first ones of a long console.
    if (chunk.end - HISTORY_MAX > chunk.from) {
      chunk = (await this.host.call(from, { cmd: 'vm.console', vm: name, here: true, since: chunk.end - HISTORY_MAX, raw: true }, PEER_TIMEOUT_MS)) as ConsoleChunk;
    }
    const start = chunk.from;
    for (let i = 0; i < 64; i++) {
      parts.push(Buffer.from(chunk.data ?? '', 'base64'));
      if (chunk.next >= chunk.end || chunk.next <= chunk.from) break;
      chunk = (await this.host.call(from, { cmd: 'vm.console', vm: name, here: true, since: chunk.next, raw: true }, PEER_TIMEOUT_MS)) as ConsoleChunk;
    }
    new ConsoleLog(this.vmDir(name)).adopt(start, Buffer.concat(parts));
  }

  private async migrateAbort(name: string): Promise<unknown> {
    const vm = this.local.get(name);
    if (vm?.incoming) await vm.qemu.kill().catch(() => undefined);
    return { vm: name };
  }

  /* -------------------------------------------------------------- memory */

  /**
   * Squeeze or give back a running VM's memory with its balloon, between minMemory and its boot size
   * (the most it can have without a restart). Resolves when the guest has (nearly) got there.
   */
  private async setMemory(name: string, bytes: number): Promise<unknown> {
    const c = this.config(name);
    const most = parseSize(String(c.memory));
    const least = c.minMemory !== undefined ? parseSize(String(c.minMemory)) : most;
    if (bytes < least || bytes > most) {
      throw new UserError(`vm ${name}: ${formatSize(bytes)} is outside ${formatSize(least)} (minMemory) .. ${formatSize(most)} (memory, the boot size)${c.minMemory === undefined ? ': give it a minMemory to squeeze it' : ''}`);
    }
    const vm = this.local.get(name);
    if (!vm || vm.incoming) {
      const where = await this.locate(name);
      if (!where.node) throw new UserError(`vm ${name} is not running: its memory is ${c.memory} when it starts`, 1);
      if (where.node !== this.host.node) return this.host.call(where.node, { cmd: 'vm.set-memory', vm: name, bytes }, 60_000);
      throw new UserError(`vm ${name} is migrating to ${this.host.node}: set its memory when it is done`, 1);
    }
    await vm.qemu.qmp.execute('balloon', { value: bytes });
    // The guest gives pages back at its own pace (about 50 MiB/s measured under TCG): wait, bounded.
    const deadline = Date.now() + 20_000;
    let actual = bytes;
    for (;;) {
      actual = (await vm.qemu.qmp.execute<{ actual: number }>('query-balloon')).actual;
      if (Math.abs(actual - bytes) <= Math.max(bytes / 50, 2 * 1024 * 1024) || Date.now() > deadline) break;
      await sleep(100);
    }
    this.host.log.info({ event: 'vm-memory-set', vm: name, target: bytes, actual }, `vm ${name}: memory ${formatSize(actual)} (asked ${formatSize(bytes)})`);
    return { vm: name, node: this.host.node, targetBytes: bytes, memoryBytes: actual, message: `vm ${name} on ${this.host.node}: memory ${formatSize(actual)}${Math.abs(actual - bytes) > Math.max(bytes / 50, 2 * 1024 * 1024) ? ` (asked ${formatSize(bytes)}; the guest is still giving or taking pages)` : ''}` };
  }

  /* ------------------------------------------------------------ handover */

  /** The VMs of this node with a disk in one of `pools`. */
  private usersOf(pools: string[]): LocalVm[] {
    return [...this.local.values()].filter((vm) => !vm.incoming && vm.spec.disks.some((d) => pools.includes(d.volume.split('/')[0])));
  }

  /**
   * Before the Primary role of `pools`' resources moves: pause the VMs using them (QMP stop drains
   * and flushes their disks while the old Primary still serves them). The guest only sees time pass.
   */
  async pauseIo(pools: string[], leaseMs = HANDOVER_LEASE_MS): Promise<{ vms: string[] }> {
    await this.ready;
    const paused: string[] = [];
    for (const vm of this.usersOf(pools)) {
      if (vm.state === 'migrating') throw new UserError(`vm ${vm.name} is migrating: move the Primary role when it is done`, 1);
      // Already paused on a disk error: the recovery loop's, which first makes sure it is not a stale copy (a
      // handover's resume would `cont` it blindly). Its failed requests wait in QEMU, none reaches the old Primary.
      if (vm.handoverPaused === undefined && (await vm.qemu.status().catch(() => undefined))?.status === 'io-error') continue;
      // Marked first: a stop that times out may still take effect, and a VM paused must be resumed.
      vm.handoverPaused ??= Date.now();
      vm.pauseUntil = Date.now() + leaseMs;
      const nodes = await nbdNodesInUse(vm.qemu.qmp, vm.spec.disks.length);
      const { yanked } = await pauseGuest(vm.qemu.qmp, nodes);
      if (yanked) this.host.log.warn({ event: 'vm-disks-yanked', vm: vm.name, nodes }, `vm ${vm.name}: its disks' server did not answer: their connections were cut (yank) to pause it`);
      paused.push(vm.name);
    }
    return { vms: paused };
  }

  /**
   * The role has moved (to `server`): reconnect the paused VMs' disks to its exports and let them run.
   * Waits (bounded) until this node sees `server` serve every pool (the peer's state comes over the link).
   */
  async resumeIo(pools: string[], server: string): Promise<{ vms: { name: string; pausedMs: number }[] }> {
    await this.ready;
    const out: { name: string; pausedMs: number }[] = [];
    const deadline = Date.now() + 15_000;
    while (pools.some((p) => this.host.poolServer(p) !== server)) {
      if (Date.now() > deadline) throw new UserError(`${this.host.node} does not see ${server} serve ${pools.join(', ')}: VMs using them stay paused (vm list)`, 1);
      await sleep(50);
    }
    let failed: Error | undefined;
    const left: string[] = [];
    for (const vm of this.usersOf(pools)) {
      if (vm.handoverPaused === undefined) continue;
      try {
        out.push({ name: vm.name, pausedMs: await this.resumePaused(vm) });
      } catch (err) {
        failed ??= err as Error;
        left.push(vm.name);
        this.host.log.error({ event: 'vm-disks-move-failed', vm: vm.name, server, err: (err as Error).message }, `vm ${vm.name}: its disks could not be moved to ${server}: ${(err as Error).message}; it stays paused (tried again)`);
      }
    }
    if (failed) throw new UserError(`vm ${left.join(', ')} on ${this.host.node} stay${left.length > 1 ? '' : 's'} paused: ${failed.message} (tried again until ${left.length > 1 ? 'they run' : 'it runs'})`, 1);
    return { vms: out };
  }

  /** A VM paused by a handover: its disks from where they are served now, then it runs on. Resolves with how long it was paused. */
  private async resumePaused(vm: LocalVm): Promise<number> {
    const disks = await this.endpoints(vm.name);
    // A handover closes the old open cleanly; one that did not finish may have left it dead.
    const verdict = await this.mayGoOn(vm, disks);
    if ('restart' in verdict) {
      void this.restartGuest(vm, verdict.restart).catch((err: unknown) => this.host.log.error({ event: 'vm-restart-failed', vm: vm.name, err: (err as Error).message }, `vm ${vm.name}: not restarted: ${(err as Error).message}`));
      throw new Error(`vm ${vm.name}: ${verdict.restart}: it restarts`);
    }
    if ('wait' in verdict) throw new Error(verdict.wait);
    await withRetries(() => this.moveDisks(vm, disks), 5, 200);
    await vm.qemu.qmp.execute('cont');
    const pausedMs = Date.now() - (vm.handoverPaused ?? Date.now());
    vm.handoverPaused = undefined;
    vm.pauseUntil = undefined;
    this.host.log.info({ event: 'vm-disks-moved', vm: vm.name, servers: [...new Set(disks.map((d) => d.node))], pausedMs }, `vm ${vm.name}: disks now from ${[...new Set(disks.map((d) => d.node))].join(', ')}; paused ${pausedMs} ms`);
    return pausedMs;
  }

  /** Point the VM's disks at `disks` (one switch of a VM at a time) and remember where they are. */
  private async moveDisks(vm: LocalVm, disks: DiskEndpoint[]): Promise<void> {
    const run = (vm.switching ?? Promise.resolve()).catch(() => undefined).then(() => switchDisks(vm.qemu.qmp, disks));
    vm.switching = run;
    await run;
    vm.spec = { ...vm.spec, disks };
    this.writeSpec(vm.name, vm.spec);
  }

  /** Handover pauses that ran out: resume those VMs (onto whatever serves their disks; tried again each round). */
  private async endExpiredPauses(): Promise<void> {
    for (const vm of [...this.local.values()]) {
      if (vm.handoverPaused === undefined || vm.pauseUntil === undefined || Date.now() < vm.pauseUntil || this.stopped) continue;
      try {
        const pausedMs = await this.resumePaused(vm);
        this.host.log.warn({ event: 'vm-handover-pause-expired', vm: vm.name, pausedMs }, `vm ${vm.name}: paused for a handover that did not resume it: running again after ${pausedMs} ms`);
      } catch (err) {
        const message = (err as Error).message;
        if (this.reported.get(`pause:${vm.name}`) !== message) {
          this.reported.set(`pause:${vm.name}`, message);
          this.host.log.warn({ event: 'vm-handover-pause-stuck', vm: vm.name, err: message }, `vm ${vm.name}: paused for a handover; cannot resume it yet: ${message}`);
        }
      }
    }
  }

  /* --------------------------------------------------------------- marks */

  private marksFile(): string {
    return path.join(this.dir, 'marks.json');
  }

  private loadMarks(): Record<string, Mark> {
    try {
      return JSON.parse(fs.readFileSync(this.marksFile(), 'utf8')) as Record<string, Mark>;
    } catch {
      return {};
    }
  }

  private setMark(name: string, mark: Mark): void {
    const old = this.marks[name];
    if (old && old.at >= mark.at) return;
    this.marks = { ...this.marks, [name]: mark };
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const tmp = `${this.marksFile()}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(this.marks));
    fs.renameSync(tmp, this.marksFile());
  }

  private mergeMarks(theirs: Record<string, Mark> | undefined): void {
    for (const [name, m] of Object.entries(theirs ?? {})) if (this.isVm(name)) this.setMark(name, m);
  }

  /**
   * Remember stop/start on every node that answers (the others learn it when they compare marks). The mark
   * is the newest: later than any this node or those it reaches hold, whatever their clocks say (a node whose
   * clock runs ahead dated the last mark in what is our future; a plain "now" would lose to it).
   */
  private async markEverywhere(name: string, stopped: boolean): Promise<void> {
    let at = Math.max(Date.now(), (this.marks[name]?.at ?? -1) + 1);
    for (let round = 0; round < 2; round++) {
      const mark = { stopped, at };
      this.setMark(name, mark);
      const answers = await Promise.all(this.otherNodes().map((n) => this.host.call(n, { cmd: 'vm.mark', vm: name, ...mark }, PEER_TIMEOUT_MS).catch(() => undefined)));
      const newer = answers.map((a) => (a as { mark?: Mark } | undefined)?.mark).filter((m): m is Mark => m !== undefined && m.at > at);
      if (newer.length === 0) return;
      at = Math.max(...newer.map((m) => m.at)) + 1;
    }
  }

  /* ----------------------------------------------------------- autostart */

  /** Start the VMs this node decides for that should run and run nowhere. */
  private async autostart(): Promise<void> {
    if (this.stopped || this.autostarting || this.selfFenced !== undefined) return;
    this.autostarting = true;
    try {
      await this.autostartOnce();
    } finally {
      this.autostarting = false;
    }
  }

  private async autostartOnce(): Promise<void> {
    for (const name of [...this.unattached.keys()]) await this.reattach(name).catch(() => undefined);
    // Who has answered since this daemon started decides whether a VM may start without its prefer node.
    for (const node of this.otherNodes()) if (!this.heard.has(node)) await this.askLocal(node, 2000).catch(() => undefined);
    await this.endExpiredPauses();
    for (const name of this.local.keys()) {
      try {
        new ConsoleLog(this.vmDir(name)).rotate();
      } catch (err) {
        this.host.log.warn({ event: 'vm-console-rotate-failed', vm: name, err: (err as Error).message }, `vm ${name}: its console log could not be trimmed: ${(err as Error).message}`);
      }
    }
    for (const name of Object.keys(this.host.config.vms)) {
      if (this.stopped) return;
      if (this.local.has(name) || this.unattached.has(name) || this.starting.has(name) || this.marks[name]?.stopped || this.locks.has(name)) continue;
      if (this.exits.get(name)?.failed) continue; // A crashed VM waits for the admin (vm start).
      let decider: string;
      try {
        decider = this.decider(name);
      } catch {
        continue; // Its disks are served nowhere yet.
      }
      if (decider !== this.host.node) continue;
      try {
        const r = (await this.startVm(name, undefined, true)) as { already?: boolean; skipped?: string };
        if (!r.already && !r.skipped) this.host.log.info({ event: 'vm-autostarted', vm: name }, `vm ${name}: started (it runs unless stopped)`);
        this.reported.delete(name);
      } catch (err) {
        const message = (err as Error).message;
        if (this.reported.get(name) !== message) {
          this.reported.set(name, message);
          this.host.log.warn({ event: 'vm-autostart-failed', vm: name, err: message }, message);
        }
      }
    }
  }

  private async locked<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const before = this.locks.get(name) ?? Promise.resolve();
    const run = before.catch(() => undefined).then(fn);
    const tail = run.catch(() => undefined);
    this.locks.set(name, tail);
    try {
      return await run;
    } finally {
      if (this.locks.get(name) === tail) this.locks.delete(name);
    }
  }
}

/** `fn` again after `waitMs` when it fails, `times` times in all (the last error is thrown). */
async function withRetries<T>(fn: () => Promise<T>, times: number, waitMs: number): Promise<T> {
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (i >= times) throw err;
      await sleep(waitMs);
    }
  }
}

/** The disk a QEMU block node or device belongs to (`disk1`, `nbd1-3`, `vd1`: 1), -1 when the name says nothing. */
function diskIndexOf(name: string): number {
  const m = /^(?:disk|nbd|vd)(\d+)/.exec(name);
  return m ? Number(m[1]) : -1;
}

/** What a node says of a VM means a QEMU of it lives there (a failed one with a pid is one that cannot be steered). */
function runsThere(v: VmInfo): boolean {
  return v.state !== 'stopped' && (v.state !== 'failed' || v.pid !== undefined);
}

function killPid(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // Gone already.
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function stateOf(status: string): VmState {
  switch (status) {
    case 'running':
      return 'running';
    case 'inmigrate':
    case 'postmigrate':
    case 'finish-migrate':
      return 'migrating';
    case 'prelaunch':
      return 'starting';
    case 'internal-error':
    case 'guest-panicked':
    case 'shutdown':
      return 'failed';
    default:
      // paused, io-error, suspended, debug, restore-vm, save-vm, watchdog, colo
      return 'paused';
  }
}

/** QEMU's start errors in the user's words: a missing volume is named as such. */
function explainStartError(err: unknown, name: string, spec: VmSpec): Error {
  const message = (err as Error).message;
  if (/export not available|Requested export|export "[^"]*" not found/i.test(message)) {
    const which = spec.disks.map((d) => `${d.volume} (from ${d.node})`).join(', ');
    return new UserError(`vm ${name}: a disk's volume is not exported: ${which}: does it exist? (vol list; vol create)`, 1);
  }
  if (/Failed to connect|Connection refused/i.test(message)) {
    return new UserError(`vm ${name}: cannot reach the NBD export of its disks (${spec.disks.map((d) => `nbd://${d.host}:${d.port}/${d.export}`).join(', ')}): ${message.replace(/^vm \S+: /, '')}`, 1);
  }
  if (err instanceof UserError) return new UserError(message, 1);
  return err as Error;
}
