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
 * A mark reads "outdated until it holds generation G" (G: the generation the
 * fencing node moved to). The rules, so that no stale, late or buggy message
 * can end a mark that should stand:
 *
 * - a mark ends only on a claim that names G: the marked node reporting it
 *   holds G (it resynced), or its peer, not outdated itself, reporting "in
 *   sync with it at generation G". A claim naming any other generation (sent
 *   before the fence, or from stale state) is ignored and logged
 *   (witness-claim-ignored); one naming no generation is refused as malformed;
 * - or the operator promotes the marked node by force (query with force):
 *   its data is then the good copy by decree;
 * - a new fence of the same node replaces its mark (a newer G).
 *
 * Membership (membership.ts): every command counts as a sign of life of its
 * sender, and every answer says how long the witness has not heard each
 * node (`silentMs`; a node never heard since the witness started counts as
 * silent since then) and which nodes it holds dead. `witness.declare` asks
 * it to hold the sender's peer dead; it is decided here, at once, and only
 * granted when the witness itself has not heard the peer for deadTime, and
 * the sender is not held dead itself: of two nodes cut from each other, at
 * most one is declared. A node held dead gets no vote from the witness (its
 * answers say so) until the node that declared it clears the mark
 * (`witness.clear`, once it hears its peer again). The marks are kept in
 * memory only: a node declared dead has fenced itself and stays so until
 * its peer has heard it again (membership.ts), whatever the witness forgets.
 *
 * A caller that timed out resets its connection, and the witness drops a
 * request whose caller hung up before it ran (AdminServer's
 * dropIfCallerLeft): a request the caller gave up on does not act later.
 * Only one the witness ran before the hang-up reached it (a network delay
 * after the timeout) may have acted, so a timed-out fence is "maybe done".
 *
 * Every command is checked against a schema (known nodes, names, generation
 * ids) before use; a bad one gets a one-line error, the witness serves on.
 *
 * The marks are kept in a JSON file (format, version, sequence, checksum),
 * written to a temp file, fsynced, renamed over the old one, and the
 * directory fsynced, so a crash leaves the old or the new marks. Neither path
 * is followed through a symbolic link. A missing file is a first start; a
 * damaged one stops the witness at startup: an empty state would quietly
 * un-outdate every node.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import type { Logger } from '../util/log.js';
import { UserError, errnoCode } from '../util/errors.js';
import { AdminServer, callAdmin } from '../api/line-socket.js';
import { signRequest, verifyRequest } from './witness-auth.js';

export const DEFAULT_WITNESS_PORT = 7899;
/** The exit code of the witness's answer "you are outdated yourself" (a refusal because of state). */
const OUTDATED_REFUSAL = 1;

/** The witness refused a fence because the caller is the outdated one: its peer went on without it. */
export function isOutdatedRefusal(err: unknown): boolean {
  return err instanceof UserError && err.exitCode === OUTDATED_REFUSAL && /is itself outdated/.test(err.message);
}

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

/** Names as the cluster file allows them (config.ts): never "__proto__" and friends. */
const name = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._+-]{0,62}$/, 'not a node or resource name');
/** A data generation id (replication/meta.ts): 16 hex digits, or "0" before the first. */
const generation = z.string().regex(/^(0|[0-9a-f]{16})$/, 'not a generation id (16 hex digits)');

const commandSchema = z.discriminatedUnion('cmd', [
  /**
   * `generations`: the sender's data generation per resource where its disk
   * is UpToDate; `inSync`: per resource, the peer it is connected to and in
   * sync with, and the generation they share.
   */
  z
    .object({
      cmd: z.literal('witness.heartbeat'),
      node: name,
      generations: z.record(name, generation),
      inSync: z.record(name, z.object({ peer: name, generation }).strict()),
    })
    .strict(),
  /** `current`: the sender's generation now; `until`: the one it moves to, which the peer's mark waits for. */
  z.object({ cmd: z.literal('witness.outdate'), node: name, resource: name, peer: name, current: generation, until: generation }).strict(),
  /**
   * The sender fenced `peer` for a generation `until` it then did not start (the peer came back in sync
   * meanwhile): the mark it set for `until` goes. Only its setter can name `until` (a fresh generation,
   * unknown before the fence), so no message from before the fence can clear the mark this way.
   */
  z.object({ cmd: z.literal('witness.cancel'), node: name, resource: name, peer: name, until: generation }).strict(),
  /** Before a promotion; `force`: the operator promotes this copy whatever the witness holds. */
  z.object({ cmd: z.literal('witness.query'), node: name, resource: name, current: generation, force: z.boolean().optional() }).strict(),
  /** Is the witness there, with this secret? (`duet doctor`.) Not a sign of life of the node: it changes nothing. */
  z.object({ cmd: z.literal('witness.ping'), node: name }).strict(),
  /** Hold `peer` dead (granted only if the witness has not heard it for deadTime either). */
  z.object({ cmd: z.literal('witness.declare'), node: name, peer: name }).strict(),
  /** `peer` is back: the sender's declaration of it goes. */
  z.object({ cmd: z.literal('witness.clear'), node: name, peer: name }).strict(),
]);

export type WitnessCommand = z.infer<typeof commandSchema>;

export interface WitnessReply {
  outdated: boolean;
  /** Resources for which this node's data is outdated. */
  outdatedResources: string[];
  /** Per node: milliseconds since the witness last heard it (or since the witness started, if never). */
  silentMs?: Record<string, number>;
  /** Nodes the witness holds dead, and who declared them. */
  declared?: Record<string, string>;
  /** Random per witness start: declarations are kept in memory, so a new boot knows none of the earlier ones. */
  boot?: string;
}

/** Outdated until it holds generation `until`; when, and by whom. */
type Mark = {
  by: string;
  at: string;
  until: string;
  /** Earlier generations of the same setter this mark replaced, newest first: a cancel of `until` falls back to them. */
  prior?: string[];
};
/** Earlier generations a mark remembers (a setter fences again only for promotions and writes without its peer). */
const PRIOR_MAX = 4;
/** resource -> node -> mark (Maps: names from the network never meet Object.prototype). */
type Marks = Map<string, Map<string, Mark>>;

/** Resources the witness keeps marks for: far more than a cluster has; bounds what a (buggy) node can make it store. */
export const MAX_RESOURCES = 256;

const FORMAT = 'duet-witness-state';
const VERSION = 1;
const markSchema = z.object({ by: name, at: z.string(), until: generation, prior: z.array(generation).max(PRIOR_MAX).optional() }).strict();
const marksSchema = z.record(name, z.record(name, markSchema));
const stateFileSchema = z.object({ format: z.literal(FORMAT), version: z.literal(VERSION), sequence: z.number().int().nonnegative(), outdated: marksSchema, checksum: z.string() }).strict();
/** Before format 1: the marks alone (no checksum); rewritten as format 1 on the first change. */
const unversionedStateSchema = z.object({ outdated: marksSchema }).strict();

export class Witness {
  private marks: Marks;
  private sequence: number;
  private readonly lastSeen = new Map<string, number>();
  /** Node held dead -> the node that declared it (membership; in memory, see above). */
  private readonly declared = new Map<string, string>();
  private readonly startedAt: number;
  private readonly boot = randomBytes(8).toString('hex');
  /** For silences: monotonic (a wall clock stepped forward must not make a live node look silent), or the fake clock. */
  private readonly mono: () => number;
  /** The last ignored claim logged per (resource, node, claimer): logged once, not on every heartbeat. */
  private readonly ignoredLogged = new Map<string, string>();
  private server: AdminServer | undefined;

  constructor(
    private readonly file: string,
    private readonly nodes: string[],
    private readonly log: Logger,
    /** Milliseconds since the epoch, for the marks' times (a simulation's fake clock; the wall clock by default). */
    private readonly now: () => number = Date.now,
    /** The cluster's deadTime: how long a node must be silent here before it may be declared dead. */
    private readonly deadTimeMs = 2000,
  ) {
    this.mono = now === Date.now ? () => performance.now() : now;
    this.startedAt = this.mono();
    fs.mkdirSync(path.dirname(file), { recursive: true });
    refuseLink(`${file}.tmp`);
    ({ marks: this.marks, sequence: this.sequence } = load(file));
  }

  async listen(host: string, port: number, secret: Buffer): Promise<void> {
    this.server = await AdminServer.listen<WitnessCommand>({ host, port }, async (c) => this.handle(c), this.log, {
      authorize: (request) => verifyRequest(secret, request),
      dropIfCallerLeft: true,
    });
  }

  async close(): Promise<void> {
    await this.server?.close();
  }

  /** Serve one command (already authenticated, not yet checked). */
  handle(request: unknown): WitnessReply {
    const c = this.check(request);
    // A ping comes from a tool, not from the node's daemon: the node's silence must stay what it is.
    if (c.cmd === 'witness.ping') return this.reply(c.node);
    this.lastSeen.set(c.node, this.mono());
    // Changes go to a draft, saved before they count: a failed save leaves the marks as they were.
    const draft: Marks = new Map([...this.marks].map(([r, m]) => [r, new Map(m)]));
    const logs: Array<() => void> = [];
    let refusal: UserError | undefined;
    switch (c.cmd) {
      case 'witness.heartbeat':
        for (const [resource, current] of Object.entries(c.generations)) this.caughtUp(draft, logs, resource, c.node, current);
        for (const [resource, claim] of Object.entries(c.inSync)) this.inSyncClaim(draft, logs, resource, c.node, claim);
        break;
      case 'witness.outdate':
        this.caughtUp(draft, logs, c.resource, c.node, c.current);
        if (draft.get(c.resource)?.has(c.node)) {
          refusal = new UserError(`node ${c.node} is itself outdated for resource ${c.resource}: it may not go on without its peer`, OUTDATED_REFUSAL);
          break;
        }
        // Held dead: its peer is taking its resources over (it may have promoted and not yet written). Its
        // writes stay held (not a final refusal): they fail once the peer's first write outdates it, and go
        // through if the declaration is cleared without a takeover.
        if (this.declared.has(c.node)) {
          refusal = new UserError(`node ${c.node} is held dead by ${this.declared.get(c.node)}: it may not go on without ${c.peer}`, 1);
          break;
        }
        if (!draft.has(c.resource) && draft.size >= MAX_RESOURCES) {
          refusal = new UserError(`the witness already keeps marks for ${MAX_RESOURCES} resources, its limit: resource ${c.resource} cannot be fenced; check the cluster's resource names`);
          break;
        }
        {
          // The same setter fencing again for a newer generation: the peer still lacks the older one too. If the
          // newer is cancelled (never started), the older mark must still hold.
          const was = draft.get(c.resource)?.get(c.peer);
          const prior = was && was.by === c.node && was.until !== c.until ? [was.until, ...(was.prior ?? [])].slice(0, PRIOR_MAX) : undefined;
          setMark(draft, c.resource, c.peer, { by: c.node, at: new Date(this.now()).toISOString(), until: c.until, ...(prior ? { prior } : {}) });
        }
        logs.push(() => this.log.warn({ event: 'witness-outdated', resource: c.resource, node: c.peer, by: c.node, until: c.until }, `${c.peer} outdated for ${c.resource} by ${c.node}`));
        break;
      case 'witness.cancel': {
        const mark = draft.get(c.resource)?.get(c.peer);
        if (mark && mark.by === c.node && mark.until === c.until) {
          const [back, ...rest] = mark.prior ?? [];
          if (back !== undefined) {
            setMark(draft, c.resource, c.peer, { by: mark.by, at: mark.at, until: back, ...(rest.length > 0 ? { prior: rest } : {}) });
            logs.push(() => this.log.warn({ event: 'witness-cancel-fallback', resource: c.resource, node: c.peer, by: c.node, until: back }, `${c.node} did not start generation ${c.until}: ${c.peer} stays outdated for ${c.resource} until it holds ${back}`));
          } else this.clear(draft, logs, c.resource, c.peer, mark, `${c.node} did not start generation ${c.until} after all (${c.peer} came back in sync)`);
        }
        break;
      }
      case 'witness.declare': {
        const silent = this.silentMs(c.peer);
        if (this.declared.has(c.node)) {
          refusal = new UserError(`node ${c.node} is held dead by ${this.declared.get(c.node)}: it may not declare ${c.peer} dead`, 1);
        } else if (this.declared.get(c.peer) !== c.node && silent < this.deadTimeMs) {
          refusal = new UserError(`the witness heard ${c.peer} ${silent} ms ago: it is not dead (deadTime ${this.deadTimeMs} ms)`, 1);
        } else if (!this.declared.has(c.peer)) {
          this.declared.set(c.peer, c.node);
          logs.push(() => this.log.warn({ event: 'witness-declared', node: c.peer, by: c.node, silentMs: silent }, `${c.peer} declared dead by ${c.node} (silent here for ${silent} ms)`));
        }
        break;
      }
      case 'witness.clear':
        if (this.declared.get(c.peer) === c.node) {
          this.declared.delete(c.peer);
          logs.push(() => this.log.info({ event: 'witness-declaration-cleared', node: c.peer, by: c.node }, `${c.peer} is back for ${c.node}: no longer held dead`));
        }
        break;
      case 'witness.query':
        if (c.force) {
          const mark = draft.get(c.resource)?.get(c.node);
          deleteMark(draft, c.resource, c.node);
          logs.push(() => this.log.warn({ event: 'witness-forced', resource: c.resource, node: c.node, until: mark?.until }, `${c.node} promoted by force for ${c.resource}: its data is the good copy${mark ? ' (its Outdated mark is cleared)' : ''}`));
        } else this.caughtUp(draft, logs, c.resource, c.node, c.current);
        break;
    }
    if (!sameMarks(draft, this.marks)) {
      this.save(draft);
      this.marks = draft;
    }
    for (const l of logs) l();
    if (refusal) throw refusal;
    return this.reply(c.node, 'resource' in c ? c.resource : undefined);
  }

  private reply(node: string, resource?: string): WitnessReply {
    return {
      outdated: resource !== undefined ? this.isOutdated(resource, node) : false,
      outdatedResources: [...this.marks].filter(([, m]) => m.has(node)).map(([r]) => r),
      silentMs: Object.fromEntries(this.nodes.map((n) => [n, this.silentMs(n)])),
      declared: Object.fromEntries(this.declared),
      boot: this.boot,
    };
  }

  private silentMs(node: string): number {
    return Math.max(0, this.mono() - (this.lastSeen.get(node) ?? this.startedAt));
  }

  private check(request: unknown): WitnessCommand {
    const parsed = commandSchema.safeParse(request);
    const r = (typeof request === 'object' && request !== null ? request : {}) as Record<string, unknown>;
    const what = `${typeof r.cmd === 'string' ? JSON.stringify(r.cmd.slice(0, 40)) : 'a request'}${typeof r.node === 'string' ? ` from ${JSON.stringify(r.node.slice(0, 63))}` : ''}`;
    let problem: string | undefined;
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      problem = issue.code === 'invalid_union_discriminator' ? 'unknown command' : `${issue.path.join('.') || 'request'}: ${issue.message}`;
    } else {
      const c = parsed.data;
      const known = (n: string): boolean => this.nodes.includes(n);
      if (!known(c.node)) problem = `the witness does not know node ${c.node} (nodes: ${this.nodes.join(', ')})`;
      else if ((c.cmd === 'witness.outdate' || c.cmd === 'witness.cancel') && (!known(c.peer) || c.peer === c.node)) problem = `peer ${c.peer} is not the other node of ${c.resource}`;
      else if ((c.cmd === 'witness.declare' || c.cmd === 'witness.clear') && (!known(c.peer) || c.peer === c.node)) problem = `peer ${c.peer} is not another node of the cluster`;
      else if (c.cmd === 'witness.heartbeat') {
        const bad = Object.entries(c.inSync).find(([, claim]) => !known(claim.peer) || claim.peer === c.node);
        if (bad) problem = `inSync.${bad[0]}.peer ${bad[1].peer} is not the other node`;
      }
      if (!problem) return c;
    }
    this.log.warn({ event: 'witness-bad-request', cmd: r.cmd, node: r.node, problem }, 'refused a malformed witness command');
    throw new UserError(`the witness refused ${what}: ${problem}`);
  }

  private isOutdated(resource: string, node: string): boolean {
    return this.marks.get(resource)?.has(node) === true;
  }

  /** A node that holds the generation its mark waits for is no longer outdated. */
  private caughtUp(draft: Marks, logs: Array<() => void>, resource: string, node: string, current: string): void {
    const mark = draft.get(resource)?.get(node);
    if (!mark) return;
    if (mark.until === current) return this.clear(draft, logs, resource, node, mark, `holds generation ${current}`);
    this.ignored(logs, resource, node, node, current, mark, `it reports generation ${current}`);
  }

  /** `sender` says it is in sync with `claim.peer` at `claim.generation`. */
  private inSyncClaim(draft: Marks, logs: Array<() => void>, resource: string, sender: string, claim: { peer: string; generation: string }): void {
    const mark = draft.get(resource)?.get(claim.peer);
    if (!mark) return;
    if (draft.get(resource)?.has(sender)) return this.ignored(logs, resource, claim.peer, sender, claim.generation, mark, `${sender} is outdated itself`);
    if (mark.until !== claim.generation) return this.ignored(logs, resource, claim.peer, sender, claim.generation, mark, `${sender} is in sync with it at generation ${claim.generation}`);
    this.clear(draft, logs, resource, claim.peer, mark, `in sync with ${sender} at generation ${claim.generation}`);
  }

  private clear(draft: Marks, logs: Array<() => void>, resource: string, node: string, mark: Mark, why: string): void {
    deleteMark(draft, resource, node);
    logs.push(() => this.log.info({ event: 'witness-cleared', resource, node, until: mark.until, why }, `${node} is good again for ${resource}: ${why}`));
  }

  private ignored(logs: Array<() => void>, resource: string, node: string, by: string, claimed: string, mark: Mark, why: string): void {
    const key = `${resource}\0${node}\0${by}`;
    const value = `${claimed}\0${mark.until}\0${why}`;
    if (this.ignoredLogged.get(key) === value) return;
    this.ignoredLogged.set(key, value);
    logs.push(() =>
      this.log.warn({ event: 'witness-claim-ignored', resource, node, by, claimed, until: mark.until, why }, `${node} stays outdated for ${resource} until it holds ${mark.until}: ${why}`),
    );
  }

  private save(marks: Marks): void {
    const sequence = this.sequence + 1;
    const tmp = `${this.file}.tmp`;
    let fd: number;
    try {
      // O_NOFOLLOW: a link planted at the temp path must not redirect the write.
      fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_NOFOLLOW, 0o600);
    } catch (err) {
      if (errnoCode(err) === 'ELOOP') throw linkError(tmp);
      throw new UserError(`witness state: cannot write ${tmp} (${errnoCode(err) ?? (err as Error).message}): check the witness's home directory`);
    }
    try {
      fs.writeFileSync(fd, serialize(marks, sequence));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.file);
    // The rename itself is durable only once the directory is.
    const dir = fs.openSync(path.dirname(this.file), fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    try {
      fs.fsyncSync(dir);
    } finally {
      fs.closeSync(dir);
    }
    this.sequence = sequence;
  }
}

function deleteMark(marks: Marks, resource: string, node: string): void {
  const m = marks.get(resource);
  m?.delete(node);
  if (m?.size === 0) marks.delete(resource);
}

function setMark(marks: Marks, resource: string, node: string, mark: Mark): void {
  let m = marks.get(resource);
  if (!m) marks.set(resource, (m = new Map()));
  m.set(node, mark);
}

function sameMarks(a: Marks, b: Marks): boolean {
  return JSON.stringify(toObject(a)) === JSON.stringify(toObject(b));
}

function toObject(marks: Marks): Record<string, Record<string, Mark>> {
  const out: Record<string, Record<string, Mark>> = {};
  for (const [resource, m] of [...marks].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    if (m.size === 0) continue;
    out[resource] = Object.fromEntries([...m].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([n, k]) => [n, { by: k.by, at: k.at, until: k.until, ...(k.prior ? { prior: k.prior } : {}) }]));
  }
  return out;
}

function checksum(sequence: number, outdated: Record<string, Record<string, Mark>>): string {
  return createHash('sha256').update(JSON.stringify({ format: FORMAT, version: VERSION, sequence, outdated })).digest('hex');
}

function serialize(marks: Marks, sequence: number): string {
  const outdated = toObject(marks);
  return `${JSON.stringify({ format: FORMAT, version: VERSION, sequence, outdated, checksum: checksum(sequence, outdated) }, null, 2)}\n`;
}

function linkError(file: string): UserError {
  return new UserError(`witness state: ${file} is a symbolic link, which the witness does not follow: remove the link (and put the state file itself at ${file} if that is what it pointed to)`);
}

function refuseLink(file: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(file);
  } catch {
    return;
  }
  if (st.isSymbolicLink()) throw linkError(file);
}

function load(file: string): { marks: Marks; sequence: number } {
  let text: string;
  try {
    // O_NONBLOCK: a FIFO planted here must not hang the start; it is refused below as not a file.
    const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    try {
      if (!fs.fstatSync(fd).isFile()) throw new UserError(`witness state: ${file} is not a regular file: move it away and restore the state file from a backup`);
      text = fs.readFileSync(fd, 'utf8');
    } finally {
      fs.closeSync(fd);
    }
  } catch (err) {
    if (err instanceof UserError) throw err;
    if (errnoCode(err) === 'ENOENT') return { marks: new Map(), sequence: 0 }; // first start
    if (errnoCode(err) === 'ELOOP') throw linkError(file);
    throw new UserError(`witness state: cannot read ${file} (${errnoCode(err) ?? (err as Error).message}): check its permissions`);
  }
  const damaged = (why: string): UserError =>
    new UserError(
      `witness state ${file} is damaged (${why}): restore it from a backup; removing it forgets which nodes are Outdated, so do that only when every resource is connected and UpToDate on both nodes`,
    );
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw damaged(`not JSON: ${(err as Error).message}`);
  }
  const problem = (error: z.ZodError): UserError => {
    const issue = error.issues[0];
    return damaged(`${issue.path.join('.') || 'the file'}: ${issue.message}`.replace(/\s+/g, ' '));
  };
  const toMarks = (outdated: z.infer<typeof marksSchema>): Marks =>
    new Map(
      Object.entries(outdated)
        .filter(([, m]) => Object.keys(m).length > 0)
        .map(([r, m]) => [r, new Map(Object.entries(m))]),
    );
  if (typeof json === 'object' && json !== null && !Array.isArray(json) && !('format' in json)) {
    const old = unversionedStateSchema.safeParse(json);
    if (!old.success) throw problem(old.error);
    return { marks: toMarks(old.data.outdated), sequence: 0 };
  }
  const parsed = stateFileSchema.safeParse(json);
  if (!parsed.success) throw problem(parsed.error);
  const marks = toMarks(parsed.data.outdated);
  if (parsed.data.checksum !== checksum(parsed.data.sequence, toObject(marks))) throw damaged('its checksum does not match its content');
  return { marks, sequence: parsed.data.sequence };
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

  /** A call that times out resets its connection: its request cannot reach the witness after the caller gave up. */
  async call(c: DistributiveOmit<WitnessCommand, 'node'>): Promise<WitnessReply> {
    const request = signRequest(this.secret, { ...c, node: this.node });
    return (await callAdmin({ host: this.host, port: this.port, localAddress: this.localAddress }, request, { what: 'the witness', timeoutMs: this.timeoutMs })) as WitnessReply;
  }
}
