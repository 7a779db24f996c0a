/**
 * The witness: a diskless third vote (`duet witness run`). It remembers, per
 * resource, which node's data is Outdated, and refuses to let an outdated
 * node outdate its peer, so of two nodes that cannot see each other at most
 * one can go on writing:
 *
 * - a Primary that must write without its peer first asks the witness to
 *   outdate the peer (fencing); if it cannot reach the witness, or the
 *   witness says it is outdated itself, it stops accepting writes;
 * - a node asks the witness before it is promoted; an outdated node is
 *   refused (unless forced), and so is a node that reaches neither its peer
 *   nor the witness (no quorum).
 *
 * A mark reads "outdated until it holds generation G" (the generation the
 * fencing node moved to): it ends when the node reports G (it resynced),
 * or when its peer reports being in sync with it. The marks are kept in a JSON
 * file written atomically (temp file + rename), so a restart keeps them.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { AdminServer } from '../volume/admin-socket.js';
import { signRequest, verifyRequest } from './api-auth.js';
import { callAdmin } from '../volume/admin-socket.js';

export const DEFAULT_WITNESS_PORT = 7899;

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

/**
 * `current` is the sender's data generation for the resource (per resource
 * in a heartbeat): a mark "outdated until generation G" stops counting once
 * the node holds G (it resynced), so a mark can never outlive the resync
 * that healed it, however late the heartbeats come.
 */
export type WitnessCommand =
  | { cmd: 'witness.heartbeat'; node: string; inSync: Record<string, string>; generations: Record<string, string> }
  | { cmd: 'witness.outdate'; node: string; resource: string; peer: string; current: string; until: string }
  | { cmd: 'witness.query'; node: string; resource: string; current: string };

interface WitnessState {
  /** resource -> node -> outdated until it holds generation `until`; when, and by whom */
  outdated: Record<string, Record<string, { by: string; at: string; until: string }>>;
}

export interface WitnessReply {
  outdated: boolean;
  /** Resources for which this node's data is outdated. */
  outdatedResources: string[];
}

export class Witness {
  private state: WitnessState;
  private readonly lastSeen = new Map<string, number>();
  private server: AdminServer | undefined;

  constructor(
    private readonly file: string,
    private readonly nodes: string[],
    private readonly log: Logger,
  ) {
    this.state = load(file);
  }

  async listen(host: string, port: number, secret: Buffer): Promise<void> {
    this.server = await AdminServer.listen<WitnessCommand>({ host, port }, async (c) => this.handle(c), this.log, {
      authorize: (request) => verifyRequest(secret, request),
    });
  }

  async close(): Promise<void> {
    await this.server?.close();
  }

  handle(c: WitnessCommand): WitnessReply {
    if (!this.nodes.includes(c.node)) throw new UserError(`the witness does not know node ${c.node}`);
    this.lastSeen.set(c.node, Date.now());
    switch (c.cmd) {
      case 'witness.heartbeat':
        for (const [resource, current] of Object.entries(c.generations ?? {})) this.caughtUp(resource, c.node, current);
        // The sender is in sync with these peers: their data is good again.
        for (const [resource, peer] of Object.entries(c.inSync ?? {})) {
          if (this.isOutdated(resource, c.node)) continue;
          if (this.isOutdated(resource, peer)) this.clear(resource, peer, `in sync with ${c.node}`);
        }
        break;
      case 'witness.outdate':
        this.caughtUp(c.resource, c.node, c.current);
        if (this.isOutdated(c.resource, c.node)) {
          throw new UserError(`node ${c.node} is itself outdated for resource ${c.resource}: it may not go on without its peer`);
        }
        (this.state.outdated[c.resource] ??= {})[c.peer] = { by: c.node, at: new Date().toISOString(), until: c.until };
        this.save();
        this.log.warn({ event: 'witness-outdated', resource: c.resource, node: c.peer, by: c.node, until: c.until }, `${c.peer} outdated for ${c.resource} by ${c.node}`);
        break;
      case 'witness.query':
        this.caughtUp(c.resource, c.node, c.current);
        break;
    }
    return {
      outdated: 'resource' in c ? this.isOutdated(c.resource, c.node) : false,
      outdatedResources: Object.keys(this.state.outdated).filter((r) => this.isOutdated(r, c.node)),
    };
  }

  private isOutdated(resource: string, node: string): boolean {
    return this.state.outdated[resource]?.[node] !== undefined;
  }

  /** A node that holds the generation its mark waits for is no longer outdated. */
  private caughtUp(resource: string, node: string, current: string | undefined): void {
    const mark = this.state.outdated[resource]?.[node];
    if (mark && current !== undefined && mark.until === current) this.clear(resource, node, `holds generation ${current}`);
  }

  private clear(resource: string, node: string, why: string): void {
    delete this.state.outdated[resource][node];
    this.save();
    this.log.info({ event: 'witness-cleared', resource, node, why }, `${node} is good again for ${resource}: ${why}`);
  }

  private save(): void {
    fs.mkdirSync(path.dirname(this.file), { recursive: true });
    const tmp = `${this.file}.tmp`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, JSON.stringify(this.state, null, 2));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.file);
  }
}

function load(file: string): WitnessState {
  try {
    const s = JSON.parse(fs.readFileSync(file, 'utf8')) as WitnessState;
    if (typeof s.outdated === 'object' && s.outdated !== null) return s;
  } catch {
    /* first start */
  }
  return { outdated: {} };
}

/** A node's side of the witness: signed requests with a short timeout. */
export class WitnessClient {
  constructor(
    private readonly host: string,
    private readonly port: number,
    private readonly secret: Buffer,
    private readonly node: string,
    /** This node's address: the witness sees the node's traffic come from it (and a partition cuts it). */
    private readonly localAddress?: string,
    private readonly timeoutMs = 1000,
  ) {}

  async call(c: DistributiveOmit<WitnessCommand, 'node'>): Promise<WitnessReply> {
    const request = signRequest(this.secret, { ...c, node: this.node });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new UserError(`the witness at ${this.host}:${this.port} did not answer within ${this.timeoutMs} ms`)), this.timeoutMs);
    });
    try {
      return (await Promise.race([callAdmin({ host: this.host, port: this.port, localAddress: this.localAddress }, request, { what: 'the witness' }), timeout])) as WitnessReply;
    } finally {
      clearTimeout(timer);
    }
  }
}
