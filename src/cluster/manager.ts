/**
 * The cluster manager of one node: a reconciler on its own clock. Every
 * heartbeat interval it sends its UDP beat, asks the witness, feeds what it
 * observed to the membership table (membership.ts) and carries out the
 * actions the table returns:
 *
 * - the peer silent on every path: ask the witness to declare it dead; once
 *   declared, wait selfFence (the lost node's time to kill its VMs), run the
 *   fence command if there is one, then take over (failover.ts): promote its
 *   resources, open their pools, export their volumes, boot the lost VMs in
 *   priority order, squeezed to fit vmMemory;
 * - quorum lost: fence itself: every QEMU here killed at once, every NBD
 *   client cut off and refused, nothing starts here until the peer has
 *   heard this node again (a node that may have been declared dead must not
 *   write a byte);
 * - a resource Primary here that the cluster went on without (the witness
 *   holds this node Outdated for it, or the peer came back as Primary):
 *   step down (close its pools, Secondary), so it resyncs from the peer.
 *
 * Alerts (alerts.ts) follow the event log: node lost, fenced, failover
 * done, disk failed, resync started and done, node rejoined, pool nearly
 * full, quorum lost. Nothing here waits for a mail server.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../util/log.js';
import type { Resource } from '../replication/resource.js';
import type { VmManager } from '../vm/manager.js';
import type { ClusterConfig } from './config.js';
import type { Quorum } from './quorum.js';
import type { EventLog, EventRecord } from './events.js';
import { Alerter, type Alert } from './alerts.js';
import { Heartbeat, monotonicMs, type BeatSummary } from './heartbeat.js';
import { heartbeatFor, initialState, step, tookOver, type MembershipAction, type MembershipState, type MembershipTiming, type Observation, type PeerView } from './membership.js';
import { fenceableAddresses, takeOver, type TakeoverHost, type TakeoverReport } from './failover.js';

/** Witness requests in flight at most (each bounded by the client's timeout). */
const WITNESS_IN_FLIGHT_MAX = 3;
/** A connected peer link proves two-way contact within its ping interval + timeout (link.ts): counted so much older. */
const LINK_SLACK_MS = 700;
/** A failed takeover (fence command failed, a promotion refused) is tried again after this long, doubling up to the max. */
const TAKEOVER_RETRY_MS = 5000;
const TAKEOVER_RETRY_MAX_MS = 5 * 60_000;

export interface ClusterHost extends TakeoverHost {
  call(node: string, request: { cmd: 'vm.local' }, timeoutMs?: number): Promise<unknown>;
  readonly node: string;
  readonly home: string;
  readonly config: ClusterConfig;
  readonly log: Logger;
  readonly vms: VmManager;
  readonly events: EventLog;
  /** This node's resources (those that are up). */
  resourceEntries(): { name: string; resource: Resource; peerNode: string }[];
  /** Close the pools on `name` and make it Secondary; `force`: held writes fail. */
  demoteHere(name: string, force?: boolean): Promise<void>;
  /** Cut off and refuse NBD clients from these addresses ('*': everyone), or let them in again. */
  fenceStorage(addresses: string[], fenced: boolean): number;
  /** Move the VMs and Primary roles on these resources (their disk failed here) to the peer. */
  evacuate(resources: string[]): Promise<unknown>;
}

export type NodeState = 'online' | 'offline' | 'fenced' | 'draining';

export class ClusterManager {
  readonly peer: string | undefined;
  private state: MembershipState;
  private readonly timing: MembershipTiming;
  private heartbeat: Heartbeat | undefined;
  private timer: NodeJS.Timeout | undefined;
  private witnessView: NonNullable<Observation['witness']> | undefined;
  private witnessOutdated: string[] = [];
  /** Send time of the witness request whose answer gave witnessOutdated. */
  private witnessOutdatedSentMs = -Infinity;
  /** When each resource was last seen becoming Primary here (a witness answer older than that says nothing of it). */
  private readonly primarySince = new Map<string, number>();
  private witnessPending = 0;
  private lastWitnessAsk = -Infinity;
  /** The witness's boot as this node last saw it before fencing itself (see membership's vouchedMs). */
  private witnessBoot: string | undefined;
  private declaring = false;
  private clearing = false;
  private unfencing = false;
  private takingOver: Promise<unknown> | undefined;
  private lastTakeoverTry = -Infinity;
  private takeoverRetryMs = TAKEOVER_RETRY_MS;
  /** The peer has been heard since this daemon started (a peer never seen is not declared dead before startup.waitForPeer). */
  private peerSeen = false;
  private readonly steppingDown = new Set<string>();
  private stopped = false;
  /** Moving VMs and roles off a failed disk (one move at a time; tried again after a failure). */
  private evacuating = false;
  private lastEvacuation = -Infinity;
  private evacuationRetryMs = 0;
  private evacuationSet = '';
  /** Manual failover: node-lost was reported (the table never declares it dead there). */
  private reportedLost = false;
  readonly alerter: Alerter;
  /** Nodes drained for maintenance (node drain), until node rejoin; kept in HOME/cluster.json. */
  private readonly drained = new Set<string>();
  /** Peers this node took over that have not been heard since (a restart here takes them over again at once). */
  private readonly takenOver = new Set<string>();
  lastTakeover: TakeoverReport | undefined;
  private readonly started = monotonicMs();
  /** Since when writes here have been held without the peer's link and the witness (see stuck). */
  private stuckSince: number | undefined;

  constructor(
    private readonly host: ClusterHost,
    private readonly quorum: Quorum,
  ) {
    const others = Object.keys(host.config.nodes).filter((n) => n !== host.node);
    // Membership is between two nodes (beyond two is future work): with one node there is nobody to watch.
    this.peer = others.length === 1 ? others[0] : undefined;
    const m = host.config.membership;
    this.timing = { deadTimeMs: m.deadTimeMs, selfFenceMs: m.selfFenceMs, heartbeatMs: heartbeatFor(m.deadTimeMs) };
    this.state = initialState(this.now());
    this.witnessView = quorum.hasWitness ? { answeredMs: undefined, peerSilentMs: undefined, peerDeclared: false, selfDeclared: false } : undefined;
    // Undelivered alerts survive a restart (NODE_HOME/alerts): the failover mail must not be lost with the daemon that raised it.
    this.alerter = new Alerter(host.config.alerts, { log: host.log, from: host.node, spoolDir: path.join(host.home, 'alerts') });
    host.events.on('event', (r: EventRecord) => this.alertFor(r));
    const saved = this.loadState();
    for (const n of saved.drained) if (host.config.nodes[n]) this.drained.add(n);
    for (const n of saved.takenOver) if (host.config.nodes[n]) this.takenOver.add(n);
    for (const n of this.drained) host.vms.setNodeDrained(n, true);
  }

  private get stateFile(): string {
    return path.join(this.host.home, 'cluster.json');
  }

  private loadState(): { drained: string[]; takenOver: string[] } {
    const strings = (v: unknown): string[] => (Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : []);
    try {
      const j = JSON.parse(fs.readFileSync(this.stateFile, 'utf8')) as { drained?: unknown; takenOver?: unknown };
      return { drained: strings(j.drained), takenOver: strings(j.takenOver) };
    } catch {
      return { drained: [], takenOver: [] }; // none yet (a damaged file only loses drain marks: node drain again)
    }
  }

  private saveState(): void {
    const tmp = `${this.stateFile}.tmp`;
    fs.mkdirSync(this.host.home, { recursive: true });
    fs.writeFileSync(tmp, JSON.stringify({ drained: [...this.drained], takenOver: [...this.takenOver] }));
    fs.renameSync(tmp, this.stateFile);
  }

  /** The peer was taken over and has not been heard since (kept across a restart of this daemon). */
  private setTakenOver(node: string, yes: boolean): void {
    if (yes === this.takenOver.has(node)) return;
    if (yes) this.takenOver.add(node);
    else this.takenOver.delete(node);
    try {
      this.saveState();
    } catch (err) {
      this.host.log.warn({ event: 'cluster-state-unsaved', err: (err as Error).message }, `could not save ${this.stateFile}: ${(err as Error).message}`);
    }
  }

  setDrained(node: string, drained: boolean): void {
    if (drained === this.drained.has(node)) return;
    if (drained) this.drained.add(node);
    else this.drained.delete(node);
    this.host.vms.setNodeDrained(node, drained);
    this.saveState();
    this.host.log.info({ event: drained ? 'node-drained' : 'node-undrained', node }, drained ? `node ${node} is drained: no VM starts or returns there until node rejoin ${node}` : `node ${node} may run VMs again`);
  }

  isDrained(node: string): boolean {
    return this.drained.has(node);
  }

  /** The heartbeat's clock: its lastHeardMs and heardByPeerMs are on it. */
  private now(): number {
    return monotonicMs();
  }

  get heartbeatMs(): number {
    return this.timing.heartbeatMs;
  }

  async start(): Promise<void> {
    // The daemon runs (its disks are claimed): alerts earlier runs left are sent now.
    this.alerter.start();
    if (this.peer) {
      const nodes = this.host.config.nodes;
      const addresses = (n: string): string[] => [nodes[n].address, ...(nodes[n].heartbeatAddress ? [nodes[n].heartbeatAddress!] : [])];
      const local = addresses(this.host.node);
      const remote = addresses(this.peer);
      // A second path only where both nodes have one.
      const paths = Math.min(local.length, remote.length);
      this.heartbeat = await Heartbeat.start({
        cluster: this.host.config.cluster,
        node: this.host.node,
        peer: this.peer,
        secret: this.host.secret,
        local: local.slice(0, paths),
        remote: remote.slice(0, paths),
        port: this.host.config.membership.heartbeatPort,
        log: this.host.log,
      });
    }
    this.timer = setInterval(() => void this.tick(), this.timing.heartbeatMs);
    this.timer.unref();
    void this.tick();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    await this.heartbeat?.close();
  }

  /**
   * The last step of a daemon's stop: alerts raised while its pools and
   * resources closed (a disk that failed its last flush) are still sent or
   * spooled; what waits is on disk when this returns.
   */
  async closeAlerts(): Promise<void> {
    await this.alerter.close();
  }

  private summary(): BeatSummary {
    const upToDate = this.host.resourceEntries().filter((e) => e.resource.disk === 'UpToDate').map((e) => e.name).slice(0, 64);
    return { quorum: this.state.quorum, selfFenced: this.state.selfFenced, peerView: this.state.peer, draining: this.drained.has(this.host.node), yielded: this.state.yielded === true, witnessVote: this.state.witnessVote === true, upToDate, stuckPools: this.stuckPools() };
  }

  /** Pools the peer serves to VMs here while a link of theirs to the peer is down (their I/O hangs or fails). */
  private stuckPools(): string[] {
    if (!this.peer) return [];
    const down = (pool: string): boolean => (this.host.config.pools[pool]?.devices ?? []).some((d) => this.host.resourceEntries().find((e) => e.name === d)?.resource.peer?.replicating !== true);
    return this.host.vms.poolsServedBy(this.peer).filter(down).slice(0, 64);
  }

  /**
   * The resources Primary here that cannot serve: their peer's link is down and either their writes are
   * held (the witness does not answer either) or the peer's VMs on their pools cannot reach them (the peer
   * says so: its heartbeat still comes, on another path).
   */
  private heldHere(peerStuckPools: string[]): string[] {
    const usedByPeer = new Set(peerStuckPools.flatMap((p) => this.host.config.pools[p]?.devices ?? []));
    return this.host
      .resourceEntries()
      .filter((e) => e.resource.role === 'Primary' && e.resource.peer?.replicating !== true && (e.resource.suspended || usedByPeer.has(e.name)))
      .map((e) => e.name);
  }

  /** How long a Primary here has not been able to serve (membership's "cannot serve", see heldHere); undefined: it can. */
  private stuck(now: number, held: string[]): number | undefined {
    if (held.length === 0) this.stuckSince = undefined;
    else this.stuckSince ??= now;
    return this.stuckSince === undefined ? undefined : now - this.stuckSince;
  }

  private async tick(): Promise<void> {
    if (this.stopped) return;
    const now = this.now();
    // Overlapping, a few at most: one slow or lost request (a SYN retransmitted after 1 s) must not leave this
    // node without the witness's vote for a whole quorum window.
    if (this.quorum.hasWitness && this.witnessPending < WITNESS_IN_FLIGHT_MAX && now - this.lastWitnessAsk >= this.timing.heartbeatMs / 2) {
      this.witnessPending++;
      this.lastWitnessAsk = now;
      const sent = now;
      void this.quorum
        .heartbeat(this.host.resourceEntries())
        .then((reply) => {
          if (!reply || !this.witnessView || !this.peer) return;
          // Only a newer request's answer counts (answers may come back out of order).
          if (sent < (this.witnessView.answeredMs ?? -Infinity)) return;
          const selfDeclared = reply.declared?.[this.host.node] !== undefined;
          if (!this.state.selfFenced) this.witnessBoot = reply.boot;
          this.witnessView = {
            answeredMs: sent,
            peerSilentMs: reply.silentMs?.[this.peer],
            peerDeclared: reply.declared?.[this.peer] === this.host.node,
            selfDeclared,
            vouchedMs: this.state.selfFenced && reply.boot !== undefined && reply.boot === this.witnessBoot && !selfDeclared ? sent : this.witnessView.vouchedMs,
          };
          if (sent >= this.witnessOutdatedSentMs) {
            this.witnessOutdated = reply.outdatedResources;
            this.witnessOutdatedSentMs = sent;
          }
        })
        .finally(() => this.witnessPending--);
    }
    if (!this.peer) return;
    this.observe(now);
    // After acting: a node that must fence itself has killed its VMs before its peer hears it again (and,
    // hearing it, lets its storage fence go).
    this.heartbeat?.send(this.summary());
  }

  private observe(now: number): void {
    let direct = this.heartbeat?.lastHeardMs;
    let heard = this.heartbeat?.heardByPeerMs;
    for (const e of this.host.resourceEntries()) {
      if (e.resource.peer?.phase === 'connected' || e.resource.peer?.replicating) {
        direct = Math.max(direct ?? -Infinity, now);
        heard = Math.max(heard ?? -Infinity, now - LINK_SLACK_MS);
      }
    }
    if (direct !== undefined) this.peerSeen = true;
    const says = this.heartbeat?.peerSummary;
    const held = this.heldHere(says?.stuckPools ?? []);
    const peerSays = says ? { yielded: says.yielded === true, witnessVote: says.witnessVote === true, canTakeOver: held.every((r) => says.upToDate?.includes(r) === true) } : undefined;
    // A declaration of the peer by this node that outlived its reason (the clear at peer-back was lost, or this
    // daemon restarted and never saw the peer dead): the peer is heard directly, so it goes, or the peer would
    // keep no vote at the witness (a later loss of this node would leave it fencing itself).
    // (Not while the peer yields: it is heard, but declared so that this node takes its work over.)
    if (this.witnessView?.peerDeclared && direct !== undefined && now - direct < this.timing.deadTimeMs && !peerSays?.yielded && !this.clearing) {
      this.clearing = true;
      void this.quorum
        .witness({ cmd: 'witness.clear', peer: this.peer! })
        .then((reply) => {
          if (this.witnessView) this.witnessView = { ...this.witnessView, peerDeclared: reply.declared?.[this.peer!] === this.host.node };
        })
        .catch(() => undefined)
        .finally(() => (this.clearing = false));
    }
    const wasFenced = this.state.selfFenced;
    const stuckMs = this.stuck(now, held);
    const r = step(this.state, { nowMs: now, directMs: direct, heardByPeerMs: heard, witness: this.witnessView, fenceCommand: this.host.config.fence !== undefined, ...(stuckMs !== undefined ? { stuckMs } : {}), ...(peerSays ? { peerSays } : {}) }, this.timing);
    this.state = r.state;
    for (const a of r.actions) this.act(a);
    if (wasFenced && !this.state.selfFenced) this.endSelfFence();
    this.stepDownIfOvertaken();
    this.evacuateFailedDisks();
  }

  /**
   * A resource whose disk failed here (Diskless, going on through the peer's disk) while this node is
   * Primary or runs VMs on it: those move to the peer, live, once the peer is connected with good data.
   */
  private evacuateFailedDisks(): void {
    if (this.host.config.membership.failover === 'manual' || this.evacuating || this.state.selfFenced) return;
    const failed = this.host.resourceEntries().filter((e) => {
      const r = e.resource;
      return (r.disk === 'Diskless' || r.disk === 'Failed') && r.peer?.replicating === true && r.peer.state?.disk === 'UpToDate';
    });
    const names = failed.map((e) => e.name);
    // Tried again with a growing delay (a migration that keeps failing, a VM that does not fit the peer),
    // from the start once the failed set changes.
    if (names.join() !== this.evacuationSet) {
      this.evacuationSet = names.join();
      this.evacuationRetryMs = 0;
    }
    if (failed.length === 0 || this.now() - this.lastEvacuation < this.evacuationRetryMs) return;
    const pools = Object.entries(this.host.config.pools).filter(([, p]) => p.devices.some((d) => names.includes(d))).map(([p]) => p);
    if (!failed.some((e) => e.resource.role === 'Primary') && !this.host.vms.usesPools(pools)) return;
    this.evacuating = true;
    this.lastEvacuation = this.now();
    this.evacuationRetryMs = Math.min(Math.max(TAKEOVER_RETRY_MS, this.evacuationRetryMs * 2), TAKEOVER_RETRY_MAX_MS);
    void this.host
      .evacuate(names)
      .catch((err: unknown) => this.host.log.error({ event: 'disk-failover-failed', resources: names, err: (err as Error).message }, `could not move off the failed disk of ${names.join(', ')}: ${(err as Error).message} (tried again)`))
      .finally(() => (this.evacuating = false));
  }

  private act(a: MembershipAction): void {
    const peer = this.peer!;
    const log = this.host.log;
    // Manual failover: watch, report and alert; an admin decides (resource primary --force, vm start).
    if (this.host.config.membership.failover === 'manual' && (a.do === 'declare' || a.do === 'take-over' || a.do === 'self-fence' || a.do === 'yield')) {
      if (a.do === 'declare' && !this.reportedLost) {
        this.reportedLost = true;
        log.error({ event: 'node-lost', node: peer, why: a.why }, `node ${peer} is lost (${a.why}): cluster.failover is manual: no automatic takeover`);
      }
      if (a.do === 'self-fence') log.error({ event: 'self-fence-skipped', why: a.why }, `${this.host.node} would fence itself (${a.why}) but cluster.failover is manual: its VMs keep running`);
      return;
    }
    switch (a.do) {
      case 'peer-online':
        this.reportedLost = false;
        this.setTakenOver(peer, false);
        log.info({ event: 'node-online', node: peer }, `node ${peer} is online`);
        return;
      case 'peer-unreachable':
        log.warn({ event: 'node-unreachable', node: peer }, `node ${peer} is alive (the witness hears it) but unreachable from ${this.host.node}`);
        return;
      case 'declare':
        if (this.declaring || this.waitingForPeerAtStartup()) return;
        this.declaring = true;
        void this.quorum
          .witness({ cmd: 'witness.declare', peer })
          .then((reply) => {
            if (this.witnessView) this.witnessView = { ...this.witnessView, peerDeclared: reply.declared?.[peer] === this.host.node };
          })
          .catch((err: unknown) => log.debug({ event: 'declare-refused', node: peer, err: (err as Error).message }))
          .finally(() => (this.declaring = false));
        return;
      case 'peer-lost': {
        const plan = this.host.config.membership.failover === 'manual' ? 'cluster.failover is manual: no automatic takeover' : this.quorum.hasWitness || this.host.config.fence ? `taking over in ${this.timing.selfFenceMs} ms (its self-fence time)` : 'no witness and no fence command: no automatic takeover; make sure it is off, then resource primary RES --force on this node';
        log.error({ event: 'node-lost', node: peer, why: a.why }, `node ${peer} is lost (${a.why}): ${plan}`);
        return;
      }
      case 'take-over':
        if (this.takingOver || this.now() - this.lastTakeoverTry < this.takeoverRetryMs || this.waitingForPeerAtStartup()) return;
        if (this.lastTakeoverTry > -Infinity) this.takeoverRetryMs = Math.min(this.takeoverRetryMs * 2, TAKEOVER_RETRY_MAX_MS);
        this.lastTakeoverTry = this.now();
        this.takingOver = takeOver(this.host, peer, a.why, () => this.state.peer === 'dead' && !this.state.selfFenced)
          .then((report) => {
            this.lastTakeover = report;
            if (report.complete) {
              this.state = tookOver(this.state);
              this.setTakenOver(peer, true);
            }
          })
          .catch((err: unknown) => log.error({ event: 'takeover-failed', node: peer, err: (err as Error).message }, `takeover of ${peer} failed: ${(err as Error).message} (tried again in ${Math.round(this.takeoverRetryMs / 1000)} s)`))
          .finally(() => (this.takingOver = undefined));
        return;
      case 'peer-back':
        this.setTakenOver(peer, false);
        this.lastTakeoverTry = -Infinity;
        this.takeoverRetryMs = TAKEOVER_RETRY_MS;
        log.warn({ event: 'node-back', node: peer, was: a.was }, `node ${peer} is back (it was ${a.was})${a.was === 'fenced' ? `: its resources and VMs stay here until node rejoin ${peer}` : ''}`);
        // Its storage fence stays until it shows it runs no copy of a VM that runs here (its QEMUs may have
        // outlived its daemon: their node was declared dead, not powered off).
        this.unfenceWhenClean(peer);
        return;
      case 'quorum-lost':
        log.error({ event: 'quorum-lost', why: a.why }, `${this.host.node} lost quorum: ${a.why}`);
        return;
      case 'quorum-regained':
        log.info({ event: 'quorum-regained' }, `${this.host.node} has quorum again`);
        return;
      case 'self-fence':
        this.selfFence(a.why);
        return;
      case 'yield':
        log.error({ event: 'node-yields', why: a.why }, `${this.host.node} ${a.why}: it gives its resources and VMs up to ${peer} (its heartbeats say so) until its writes go through again`);
        return;
    }
  }

  /**
   * The cluster is coming up and the peer has not been heard yet: it is not declared dead before
   * startup.waitForPeer (as DRBD's wfc-timeout, Pacemaker's wait_for_all), so a node that starts a few
   * seconds after the other still gets its own VMs (0: a peer never seen is never taken over).
   */
  private waitingForPeerAtStartup(): boolean {
    if (this.peerSeen) return false;
    // This node took the peer over before it restarted, and has not heard it since: not a cold start.
    if (this.peer && this.takenOver.has(this.peer)) return false;
    // Two nodes without a witness: a peer never heard since this daemon started is never taken over
    // (corosync's wait_for_all): the node with the newer data may be the one that stays down, and this
    // node's copy could be old (a powered-on node behind a cut link would fence the good one).
    if (!this.quorum.hasWitness) return true;
    const wait = this.host.config.startup.waitForPeer;
    return wait === 0 || this.upSinceMs < wait * 1000;
  }

  /** Lift the storage fence of a peer that is back once its vm.local lists no copy of the VMs running here (asked again each second). */
  private unfenceWhenClean(peer: string): void {
    if (this.unfencing) return;
    this.unfencing = true;
    let told = '';
    void (async () => {
      try {
        while (!this.stopped && (this.state.peer === 'online' || this.state.peer === 'unreachable')) {
          try {
            const here = new Set((await this.host.vms.runningHere()).map((v) => v.name));
            const theirs = (await this.host.call(peer, { cmd: 'vm.local' }, 5000)) as { vms: { name: string; state: string; pid?: number }[] };
            const copies = theirs.vms.filter((v) => here.has(v.name) && (v.state !== 'stopped' && (v.state !== 'failed' || v.pid !== undefined))).map((v) => v.name);
            if (copies.length === 0) {
              this.host.vms.setNodeFenced(peer, false);
              this.host.fenceStorage(fenceableAddresses(this.addressesOf(peer)), false);
              this.host.log.info({ event: 'storage-unfenced', node: peer }, `node ${peer} runs no copy of the VMs here: it may use this node's exports again`);
              return;
            }
            if (copies.join() !== told) {
              told = copies.join();
              this.host.log.warn({ event: 'storage-fence-kept', node: peer, vms: copies }, `node ${peer} is back but still runs ${copies.join(', ')}, which run here: it stays cut off this node's exports until those copies end`);
            }
          } catch {
            // Not answering yet: asked again.
          }
          await new Promise((r) => setTimeout(r, 1000));
        }
      } finally {
        this.unfencing = false;
      }
    })();
  }

  addressesOf(node: string): string[] {
    const n = this.host.config.nodes[node];
    return [n.address, ...(n.heartbeatAddress ? [n.heartbeatAddress] : [])];
  }

  /** No quorum: this node may be declared dead any moment. Nothing of it may write any more. */
  private selfFence(why: string): void {
    const t0 = this.now();
    const killed = this.host.vms.selfFence(why);
    const cut = this.host.fenceStorage(['*'], true);
    this.host.log.error(
      { event: 'self-fenced', why, vms: killed, nbdClientsCut: cut, ms: Math.round(this.now() - t0) },
      `${this.host.node} fenced itself (${why}): killed ${killed.length > 0 ? killed.join(', ') : 'no VMs'}, cut ${cut} NBD clients; nothing runs here until the peer hears this node again`,
    );
  }

  private endSelfFence(): void {
    this.host.vms.endSelfFence();
    this.host.fenceStorage(['*'], false);
    this.host.log.warn({ event: 'self-fence-ended' }, `${this.host.node} is back in the cluster: its self-fence ends (VMs start again where they should run)`);
  }

  /** A Primary the cluster went on without steps down, so that it resyncs from the peer. */
  private stepDownIfOvertaken(): void {
    const now = this.now();
    for (const e of this.host.resourceEntries()) {
      if (e.resource.role !== 'Primary') this.primarySince.delete(e.name);
      else if (!this.primarySince.has(e.name)) this.primarySince.set(e.name, now);
    }
    if (this.host.config.membership.failover === 'manual') return;
    for (const e of this.host.resourceEntries()) {
      const r = e.resource;
      if (r.role !== 'Primary' || this.steppingDown.has(e.name)) continue;
      // The witness's word counts only if asked after this node became Primary (a handover just gave it
      // the role with the peer's generation; the mark of an older generation goes with its next heartbeat),
      // and never while the peer replicates from here: then this node is the Primary they agree on.
      const outdated = this.witnessOutdated.includes(e.name) && this.witnessOutdatedSentMs > (this.primarySince.get(e.name) ?? now);
      const overtaken = (outdated || r.fencedOff !== undefined) && r.peer?.replicating !== true;
      if (!overtaken) continue;
      this.steppingDown.add(e.name);
      this.host.log.warn({ event: 'step-down', resource: e.name, why: r.fencedOff ?? 'the witness holds this node Outdated' }, `resource ${e.name}: ${e.peerNode} went on without ${this.host.node}: stepping down to resync from it`);
      void this.host
        .demoteHere(e.name, true)
        .catch((err: unknown) => this.host.log.error({ event: 'step-down-failed', resource: e.name, err: (err as Error).message }, `resource ${e.name}: could not step down: ${(err as Error).message}`))
        .finally(() => this.steppingDown.delete(e.name));
    }
  }

  /** Node states for cluster status. */
  nodeStates(): { name: string; state: NodeState; view?: PeerView; paths?: { local: string; remote: string; lastHeardMsAgo: number | null }[] }[] {
    const me = { name: this.host.node, state: (this.state.selfFenced ? 'fenced' : this.drained.has(this.host.node) ? 'draining' : 'online') as NodeState };
    if (!this.peer) return [me];
    const view = this.state.peer;
    const peerSummary = this.heartbeat?.peerSummary;
    let state: NodeState = view === 'online' || view === 'unreachable' ? 'online' : view === 'fenced' ? 'fenced' : 'offline';
    if (state === 'online' && peerSummary?.selfFenced) state = 'fenced';
    else if (state === 'online' && this.drained.has(this.peer)) state = 'draining';
    const now = this.now();
    const paths = this.heartbeat?.paths().map((p) => ({ local: p.local, remote: p.remote, lastHeardMsAgo: p.lastHeardMs === undefined ? null : Math.round(now - p.lastHeardMs) }));
    return [me, { name: this.peer, state, view, ...(paths ? { paths } : {}) }];
  }

  get hasQuorum(): boolean {
    return this.state.quorum && !this.state.selfFenced;
  }

  get selfFenced(): boolean {
    return this.state.selfFenced;
  }

  get upSinceMs(): number {
    return monotonicMs() - this.started;
  }

  witnessReachable(): boolean | null {
    if (!this.witnessView) return null;
    return this.witnessView.answeredMs !== undefined && this.now() - this.witnessView.answeredMs < this.timing.deadTimeMs;
  }

  /* -------------------------------------------------------------- alerts */

  private alertFor(r: EventRecord): void {
    const kinds: Record<string, string> = {
      'node-lost': 'node lost',
      'self-fenced': 'fenced itself',
      'fence-done': 'node fenced',
      'fence-failed': 'fence failed',
      'failover-done': 'failover done',
      'takeover-failed': 'failover failed',
      'takeover-incomplete': 'failover incomplete',
      'takeover-promote-failed': 'a resource could not be taken over',
      'takeover-vm-failed': 'a VM could not be started',
      'vm-left-out': 'a VM left stopped (no memory)',
      'vm-restart-failed': 'a VM could not be restarted',
      'split-brain': 'split brain',
      'disk-failover-failed': 'could not move off a failed disk',
      'disk-detached': 'disk failed',
      'resync-start': 'resync started',
      'resync-done': 'resync done',
      'rejoin-done': 'node rejoined',
      'pool-nearly-full': 'pool nearly full',
      'quorum-lost': 'quorum lost',
    };
    const kind = kinds[r.event];
    if (!kind) return;
    const alert: Alert = {
      event: r.event,
      node: typeof r.node === 'string' ? r.node : this.host.node,
      cluster: this.host.config.cluster,
      time: r.time,
      summary: `${kind}: ${r.message}`,
      details: Array.isArray(r.details) ? r.details.map(String) : undefined,
      data: { ...r, reportedBy: this.host.node },
    };
    this.alerter.send(alert);
  }
}
