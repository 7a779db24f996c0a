/**
 * Quorum for the resources of one node: three votes (this node, its peer,
 * the witness). A Primary that must write without its peer first outdates
 * the peer at the witness (fencing), and so does the node that keeps the
 * data when its peer's disk fails, before it takes the Diskless peer's
 * writes; without a vote beyond its own it holds those writes
 * (`on-no-quorum: suspend`, the default) or fails them (`error`). A node
 * is promoted only with the peer or the witness on its side, and never
 * when the witness says its data is Outdated.
 *
 * Held writes end one of three ways:
 * - the witness answers and outdates the peer: a new generation starts
 *   and the writes are acknowledged;
 * - the peer comes back and takes this node's changes (a resync from
 *   here): they are on both disks, no new generation is needed;
 * - this node learns the other side went on without it (the witness says
 *   this node is the Outdated one, or the peer connects as Primary): they
 *   fail with EIO at once and the resource is fenced off until it is made
 *   Secondary. So do they on `resource secondary --force`.
 *
 * The witness is reached through `call`; the node daemon gives it the
 * network client, the simulator an in-memory one.
 */
import { BlockDeviceError } from '../blockdev/types.js';
import type { PeerSession } from '../replication/peer.js';
import { FencedOff, Resource } from '../replication/resource.js';
import type { Logger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import type { WitnessCommand, WitnessReply } from './witness.js';
import { isOutdatedRefusal } from './witness.js';

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;
export type WitnessCall = (c: DistributiveOmit<WitnessCommand, 'node'>) => Promise<WitnessReply>;

/** The witness counts as a vote this long after it last answered. */
export const WITNESS_FRESH_MS = 2000;
/** Between two attempts to reach the witness while writes are held (grows to this from 100 ms). */
const RETRY_MAX_MS = 1000;
/** witness.cancel tries, RETRY_MAX_MS apart at most: about a minute. */
const CANCEL_ATTEMPTS = 60;

export interface QuorumOptions {
  node: string;
  /** Absent: no witness configured (two votes; documented two-node behaviour). */
  call: WitnessCall | undefined;
  log: Logger;
  now?: () => number;
  sleep?: (ms: number) => Promise<void>;
}

export type FenceOutcome = 'fenced' | 'peer-back';

export class Quorum {
  /** When the witness last answered. */
  private witnessSeenAt = 0;
  stopping = false;
  private readonly now: () => number;
  private readonly sleep: (ms: number) => Promise<void>;

  constructor(private readonly options: QuorumOptions) {
    this.now = options.now ?? Date.now;
    this.sleep = options.sleep ?? ((ms) => new Promise((resolve) => setTimeout(resolve, ms)));
  }

  get hasWitness(): boolean {
    return this.options.call !== undefined;
  }

  /** A command of the cluster manager (declare, clear). */
  async witness(c: DistributiveOmit<WitnessCommand, 'node'>): Promise<WitnessReply> {
    return this.call(c);
  }

  private async call(c: DistributiveOmit<WitnessCommand, 'node'>): Promise<WitnessReply> {
    const reply = await this.options.call!(c);
    this.witnessSeenAt = this.now();
    return reply;
  }

  /** Votes: this node, its peer if connected, the witness if it answered lately. */
  hasQuorum(r: Resource): boolean {
    if (r.peer?.replicating) return true;
    if (!this.hasWitness) return true;
    return this.now() - this.witnessSeenAt < WITNESS_FRESH_MS;
  }

  /**
   * Before the first write the peer will not have: outdate the peer at the
   * witness (the peer is Outdated until it holds `generation.to`).
   */
  async fence(r: Resource, peer: string, onNoQuorum: 'suspend' | 'error', generation: { from: string; to: string }, signal: AbortSignal): Promise<FenceOutcome> {
    const resource = r.name;
    // One watch per link: a new one each attempt would pile up listeners while a link stays up out of
    // sync (a Diskless peer's, whose failed disk this node fences).
    let watched: PeerSession | undefined;
    let back: Promise<'in-sync' | 'down'> | undefined;
    try {
      for (let attempt = 0; ; attempt++) {
        if (signal.aborted) throw signal.reason;
        try {
          await this.call({ cmd: 'witness.outdate', resource, peer, current: generation.from, until: generation.to });
          return 'fenced';
        } catch (err) {
          if (signal.aborted) throw signal.reason;
          if (isOutdatedRefusal(err)) {
            // The peer fenced this node first: it went on without it. Nothing held here may be acknowledged.
            throw new FencedOff(`resource ${resource}: ${peer} went on without ${this.options.node} (the witness holds ${this.options.node} Outdated): writes here fail; make it Secondary (resource secondary ${resource} --force)`);
          }
          if (onNoQuorum === 'error' || this.stopping) {
            throw new BlockDeviceError('EIO', `resource ${resource}: no quorum (${(err as Error).message}): write refused`);
          }
          r.setSuspended(true, (err as Error).message);
        }
        // The peer is back: once it took this node's changes (a resync from here), they are on both disks.
        const wait = this.sleep(Math.min(RETRY_MAX_MS, 100 * (attempt + 1))).then(() => 'waited' as const);
        const session = r.peer?.phase !== 'closed' ? r.peer : undefined;
        if (session !== watched) {
          watched = session;
          back = session?.untilInSync();
        }
        const outcome = back ? await Promise.race([back, wait]) : await wait;
        if (outcome === 'in-sync') return 'peer-back';
        if (outcome === 'down') back = watched = undefined;
      }
    } finally {
      if (r.suspended) r.setSuspended(false);
    }
  }

  /**
   * The fence for `generation.to` was not needed after all (the peer came back in sync before this
   * node started that generation): the peer's mark goes. If the witness does not answer, the mark
   * stays until an admin promotes the peer with --force; that is logged.
   */
  async cancelFence(r: Resource, peer: string, generation: { from: string; to: string }): Promise<void> {
    await this.tellWitness({ cmd: 'witness.cancel', resource: r.name, peer, until: generation.to }, (err) => {
      this.options.log.warn(
        { event: 'witness-cancel-failed', resource: r.name, peer, until: generation.to, err: err.message },
        `resource ${r.name}: could not tell the witness that ${peer} is not outdated after all (${err.message}): it stays marked until promoted with --force`,
      );
    });
  }

  /**
   * A command nobody waits on: the witness is often out of reach just then (a partition), so it is
   * tried again for a while (CANCEL_ATTEMPTS); `gaveUp` hears the last error. A refusal because this
   * node is outdated itself is final.
   */
  private async tellWitness(c: DistributiveOmit<WitnessCommand, 'node'>, gaveUp: (err: Error) => void): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.call(c);
        return;
      } catch (err) {
        if (isOutdatedRefusal(err) || attempt + 1 >= CANCEL_ATTEMPTS || this.stopping) return gaveUp(err as Error);
      }
      await this.sleep(Math.min(RETRY_MAX_MS, 100 * (attempt + 1)));
    }
  }

  /** May `r` be promoted here? Throws a UserError saying why not. */
  async mayPromote(r: Resource, force: boolean): Promise<void> {
    const resource = r.name;
    const current = r.record.gi.current;
    if (force) {
      // This copy is the good data by the operator's word: a mark left at the witness would refuse its
      // fences from now on (no claim can name the generation it waits for: this node will never hold it).
      try {
        await this.call({ cmd: 'witness.query', resource, current, force: true });
      } catch (err) {
        this.options.log.warn(
          { event: 'witness-force-unrecorded', resource, err: (err as Error).message },
          `resource ${resource}: promoted by force without telling the witness; if it holds ${this.options.node} Outdated, writes without the peer stay refused until it is told (make it Secondary and promote it with --force again once the witness answers)`,
        );
      }
      return;
    }
    let reply;
    try {
      reply = await this.call({ cmd: 'witness.query', resource, current });
    } catch (err) {
      if (r.peer?.replicating) return;
      throw new UserError(`resource ${resource}: no quorum: neither the peer nor the witness answers (${(err as Error).message}); promoting could make two Primaries; use --force only if the peer is surely down`, 1);
    }
    if (reply.outdated) {
      throw new UserError(`resource ${resource}: the witness says the data on ${this.options.node} is Outdated (its peer went on writing without it): promote the peer, or use --force to take this older copy`, 1);
    }
  }

  /**
   * One heartbeat: tell the witness each resource's generation and which
   * peers this node is in sync with (a mark ends only on a claim naming
   * the generation it waits for); a Secondary the witness holds Outdated
   * records it.
   */
  async heartbeat(resources: { name: string; peerNode: string; resource: Resource }[]): Promise<WitnessReply | undefined> {
    const inSync: Record<string, { peer: string; generation: string }> = {};
    const generations: Record<string, string> = {};
    for (const e of resources) {
      const r = e.resource;
      if (r.disk === 'UpToDate') generations[e.name] = r.record.gi.current;
      if (r.peer?.phase === 'connected' && r.disk === 'UpToDate' && r.peer.state?.disk === 'UpToDate') inSync[e.name] = { peer: e.peerNode, generation: r.record.gi.current };
    }
    let reply: WitnessReply;
    try {
      reply = await this.call({ cmd: 'witness.heartbeat', inSync, generations });
    } catch {
      return undefined; // no witness now: quorum then rests on the peer
    }
    for (const name of reply.outdatedResources) {
      const r = resources.find((e) => e.name === name)?.resource;
      if (r && r.role === 'Secondary' && !r.peer?.replicating && r.record.disk === 'UpToDate') {
        await r.saveRecord({ disk: 'Outdated' });
        this.options.log.warn({ event: 'outdated', resource: name }, `resource ${name}: the peer went on without this node: disk Outdated`);
        // A Diskless Primary connected here writes only to an UpToDate disk: it hears of the change.
        r.peer?.sendState();
        r.emit('changed');
      }
    }
    return reply;
  }
}
