/**
 * The heartbeat: small signed UDP datagrams each node daemon sends its peer
 * every H, on `heartbeatPort` at each of the node's addresses (its address,
 * and its heartbeatAddress on another NIC): a path between the nodes besides
 * the resources' peer links, one per address pair.
 *
 * Every beat echoes the peer's own send time (the peer's clock) of the newest
 * beat this node got from the peer. So a node reads, in a beat it receives,
 * a time of its *own* clock: the peer heard it then or later (heardByPeerMs,
 * membership.ts). No clock sync is needed; no echo of another node's clock
 * is ever compared with this one.
 *
 * A beat counts only when it is fresh. The peer's process (`boot`, random per
 * start) and a sequence number per datagram refuse a replay within a process;
 * each path's copy of a beat has its own seq and paths may overtake each
 * other, so a window of recent seqs is kept (as IPsec does) instead of "seq
 * must grow". A process of the peer not seen before (a restart, or a replay
 * from an older one) counts only once its beat echoes a send of *this*
 * process later than anything the peer echoed before: a datagram captured
 * earlier cannot do that, and the last boot ids replaced are refused outright.
 * An echo that is not a send time of this process (the peer still echoing
 * this node's previous process) is ignored, or it could fake heardByPeerMs.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import dgram from 'node:dgram';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { z } from 'zod';
import { UserError, errnoCode } from '../util/errors.js';
import type { Logger } from '../util/log.js';

/** A beat is about 400 bytes; anything over this is not one. */
export const MAX_BEAT_BYTES = 2048;
/** How far back accepted seqs are remembered: enough for paths overtaking each other by many beats. */
const SEQ_WINDOW = 64;
/** The peer's replaced boot ids kept to refuse their datagrams. */
const RETIRED_BOOTS_MAX = 8;
const REPORT_EVERY_MS = 60_000;

/**
 * The default clock: monotonic, offset to the epoch so that the send times
 * of this process lie above those of an earlier one on this host (an old
 * echo then falls outside this process's sends). The caller's membership
 * clock must be this same one (or pass its own as `now`).
 */
export const monotonicMs = (): number => performance.timeOrigin + performance.now();

/** What a node tells its peer about itself in every beat. */
/**
 * `yielded`: the sender cannot serve and fenced itself (membership.ts); `witnessVote`: it has the witness's
 * vote; `upToDate`: the resources whose disk is UpToDate on the sender (it could be promoted for them);
 * `stuckPools`: pools the receiver serves to VMs on the sender while a link of theirs is down.
 */
export interface BeatSummary { quorum: boolean; selfFenced: boolean; peerView: string; draining: boolean; yielded?: boolean; witnessVote?: boolean; upToDate?: string[]; stuckPools?: string[] }

const summarySchema = z.object({
  quorum: z.boolean(),
  selfFenced: z.boolean(),
  peerView: z.string().max(32),
  draining: z.boolean(),
  yielded: z.boolean().optional(),
  witnessVote: z.boolean().optional(),
  upToDate: z.array(z.string().max(63)).max(64).optional(),
  stuckPools: z.array(z.string().max(63)).max(64).optional(),
});
const beatSchema = z.object({
  v: z.number(),
  cluster: z.string(),
  from: z.string(),
  to: z.string(),
  boot: z.string().regex(/^[0-9a-f]{16}$/),
  seq: z.number().int().positive().safe(),
  sentMs: z.number(),
  /** The receiver's own send time (receiver's clock) of the newest beat the sender got from it. */
  echoMs: z.number().optional(),
  summary: summarySchema,
  mac: z.string().regex(/^[0-9a-f]{64}$/),
});
export type BeatBody = Omit<z.infer<typeof beatSchema>, 'mac'>;

const REFUSALS: Record<string, string> = {
  oversized: `bigger than ${MAX_BEAT_BYTES} bytes`,
  garbage: 'not JSON',
  malformed: 'not a heartbeat',
  version: 'another heartbeat version',
  'wrong-cluster': 'it belongs to another cluster (the same heartbeatPort on this network?)',
  stranger: 'it comes from a node that is not the peer',
  'wrong-node': 'it is meant for another node',
  'bad-mac': 'its MAC does not match: another cluster secret, or forged',
  replay: 'a datagram received before (replayed)',
  'old-boot': "from one of the peer's earlier processes (replayed)",
  'unproven-boot': "from a new process of the peer that has not yet echoed this node's beats",
};

/** JSON with keys sorted, so that the MAC does not depend on how a sender orders them. */
function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (v === null || typeof v !== 'object') return JSON.stringify(v);
  const o = v as Record<string, unknown>;
  return `{${Object.keys(o).filter((k) => o[k] !== undefined).sort().map((k) => `${JSON.stringify(k)}:${canonical(o[k])}`).join(',')}}`;
}

function macOf(secret: Buffer, body: object): Buffer {
  // Prefixed, as api-auth's: a MAC made for one purpose never passes for another.
  return createHmac('sha256', secret).update(`duet-heartbeat-v1\n${canonical(body)}`).digest();
}

/** One datagram, signed with the cluster secret. */
export function sealBeat(secret: Buffer, body: BeatBody): Buffer {
  return Buffer.from(JSON.stringify({ ...body, mac: macOf(secret, body).toString('hex') }));
}

export interface HeartbeatOptions {
  cluster: string; node: string; peer: string; secret: Buffer;
  /** This node's addresses to bind (UDP) on `port`; the first is the main one. */
  local: string[];
  /** The peer's addresses, same order (a beat goes to each). */
  remote: string[];
  port: number;
  log: Logger;
  /** Monotonic ms (default monotonicMs). */
  now?: () => number;
}

/** Emits 'beat' (BeatSummary, path: the peer's address) on each accepted datagram. */
export class Heartbeat extends EventEmitter {
  /** This process on the wire: new at every start, so the peer tells a restart from a replay. */
  private readonly boot = randomBytes(8).toString('hex');
  private seq = 0;
  private firstSentMs: number | undefined;
  private lastSentMs: number | undefined;
  /** The peer's own send time (THE PEER's clock) of its newest authenticated beat: echoed back to it in every beat. */
  private peerSentMsToEcho: { boot: string; sentMs: number } | undefined;
  private peerBoot: string | undefined;
  private readonly retiredPeerBoots: string[] = [];
  private peerSeqMax = 0;
  private readonly peerSeqsSeen = new Set<number>();
  private heardMs: number | undefined;
  /** THIS node's clock: the latest of its own send times the peer echoed. */
  private ownSentMsEchoed: number | undefined;
  private summary: BeatSummary | undefined;
  private readonly pathHeardMs: (number | undefined)[];
  private readonly counts = new Map<string, { count: number; unreported: number; reportedMs?: number }>();
  private closed = false;
  private readonly now: () => number;

  private constructor(private readonly o: HeartbeatOptions, private readonly sockets: dgram.Socket[]) {
    super();
    this.now = o.now ?? monotonicMs;
    this.pathHeardMs = o.local.map(() => undefined);
    sockets.forEach((s, i) => {
      s.on('message', (buf, rinfo) => this.receive(i, buf, rinfo.address));
      s.on('error', (err) => this.report('socket-error', { event: 'heartbeat-socket-error', local: o.local[i], error: err.message }, `heartbeat socket ${o.local[i]}: ${err.message}`));
    });
  }

  /** Binds every local address; a failure closes those bound and is a UserError naming address:port. */
  static async start(o: HeartbeatOptions): Promise<Heartbeat> {
    if (o.local.length === 0 || o.local.length !== o.remote.length) {
      throw new UserError(`heartbeat to ${o.peer}: ${o.local.length} local and ${o.remote.length} peer addresses; give one peer address per local address`);
    }
    const sockets: dgram.Socket[] = [];
    try {
      for (const address of o.local) sockets.push(await bind(address, o.port));
    } catch (err) {
      await Promise.all(sockets.map((s) => new Promise<void>((r) => s.close(() => r()))));
      throw err;
    }
    return new Heartbeat(o, sockets);
  }

  send(summary: BeatSummary): void {
    if (this.closed) return;
    const s = summarySchema.parse(summary); // what the peer would refuse is a bug here
    const sentMs = this.now();
    this.firstSentMs ??= sentMs;
    this.lastSentMs = sentMs;
    const echo = this.peerSentMsToEcho ? { echoMs: this.peerSentMsToEcho.sentMs } : {};
    this.sockets.forEach((socket, i) => {
      const body: BeatBody = { v: 1, cluster: this.o.cluster, from: this.o.node, to: this.o.peer, boot: this.boot, seq: ++this.seq, sentMs, ...echo, summary: s };
      const to = this.o.remote[i];
      socket.send(sealBeat(this.o.secret, body), this.o.port, to, (err) => {
        if (err) this.report(`send-${i}`, { event: 'heartbeat-send-failed', to, error: err.message }, `heartbeat to ${this.o.peer} at ${to}: ${err.message}`);
      });
    });
  }

  get lastHeardMs(): number | undefined { return this.heardMs; }
  get heardByPeerMs(): number | undefined { return this.ownSentMsEchoed; }
  get peerSummary(): BeatSummary | undefined { return this.summary; }
  paths(): { local: string; remote: string; lastHeardMs: number | undefined }[] {
    return this.o.local.map((local, i) => ({ local, remote: this.o.remote[i], lastHeardMs: this.pathHeardMs[i] }));
  }
  /** Datagrams refused since the start, by reason. */
  refused(): Record<string, number> {
    return Object.fromEntries([...this.counts].filter(([k]) => k in REFUSALS).map(([k, c]) => [k, c.count]));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.sockets.map((s) => new Promise<void>((r) => s.close(() => r()))));
  }

  private receive(path: number, buf: Buffer, from: string): void {
    const b = this.authenticate(buf);
    if (typeof b === 'string') return this.refuse(b, from);
    if (this.retiredPeerBoots.includes(b.boot)) return this.refuse('old-boot', from);
    if (b.boot === this.peerBoot && (b.seq <= this.peerSeqMax - SEQ_WINDOW || this.peerSeqsSeen.has(b.seq))) return this.refuse('replay', from);
    // Echo even a beat not (yet) accepted: a new process of the peer is accepted only once it echoes, and so is this one by it.
    const e = this.peerSentMsToEcho;
    if (!e || e.boot !== b.boot || b.sentMs > e.sentMs) this.peerSentMsToEcho = { boot: b.boot, sentMs: b.sentMs };
    const ownSentMs = b.echoMs !== undefined && b.echoMs >= (this.firstSentMs ?? Infinity) && b.echoMs <= (this.lastSentMs ?? -Infinity) ? b.echoMs : undefined;
    if (b.boot !== this.peerBoot) {
      if (ownSentMs === undefined || ownSentMs <= (this.ownSentMsEchoed ?? -Infinity)) return this.refuse('unproven-boot', from);
      if (this.peerBoot !== undefined) this.retiredPeerBoots.push(this.peerBoot);
      if (this.retiredPeerBoots.length > RETIRED_BOOTS_MAX) this.retiredPeerBoots.shift();
      this.o.log.info({ event: 'heartbeat-peer-boot', peer: this.o.peer, boot: b.boot, was: this.peerBoot }, `heartbeat: ${this.o.peer} ${this.peerBoot ? 'restarted' : 'heard'} (process ${b.boot})`);
      this.peerBoot = b.boot;
      this.peerSeqMax = 0;
      this.peerSeqsSeen.clear();
    }
    this.peerSeqsSeen.add(b.seq);
    if (b.seq > this.peerSeqMax) {
      this.peerSeqMax = b.seq;
      this.summary = b.summary; // a copy overtaken on another path does not bring an older summary back
      for (const s of this.peerSeqsSeen) if (s <= b.seq - SEQ_WINDOW) this.peerSeqsSeen.delete(s);
    }
    this.heardMs = this.pathHeardMs[path] = this.now();
    if (ownSentMs !== undefined) this.ownSentMsEchoed = Math.max(this.ownSentMsEchoed ?? -Infinity, ownSentMs);
    this.emit('beat', b.summary, this.o.remote[path]);
  }

  /** The beat, checked and addressed to this node by the peer; or why not. */
  private authenticate(buf: Buffer): BeatBody | string {
    if (buf.length > MAX_BEAT_BYTES) return 'oversized';
    let raw: unknown;
    try {
      raw = JSON.parse(buf.toString('utf8'));
    } catch {
      return 'garbage';
    }
    const p = beatSchema.safeParse(raw);
    if (!p.success) return 'malformed';
    const b = p.data;
    if (b.v !== 1) return 'version';
    if (b.cluster !== this.o.cluster) return 'wrong-cluster';
    if (b.from !== this.o.peer) return 'stranger';
    if (b.to !== this.o.node) return 'wrong-node';
    const signed: Record<string, unknown> = { ...(raw as Record<string, unknown>) }; // as sent: extra keys too
    delete signed.mac;
    if (!timingSafeEqual(Buffer.from(b.mac, 'hex'), macOf(this.o.secret, signed))) return 'bad-mac';
    return b;
  }

  private refuse(reason: string, from: string): void {
    // Every first contact starts so (neither side has echoed the other yet): no warning.
    const level = reason === 'unproven-boot' ? 'debug' : 'warn';
    this.report(reason, { event: 'heartbeat-refused', reason, from, peer: this.o.peer }, `heartbeat datagram from ${from} refused: ${REFUSALS[reason]}`, level);
  }

  /** Counted always, logged at most once a minute per kind (a flood of garbage must not flood the log). */
  private report(kind: string, fields: Record<string, unknown>, msg: string, level: 'warn' | 'debug' = 'warn'): void {
    const c = this.counts.get(kind) ?? { count: 0, unreported: 0 };
    this.counts.set(kind, c);
    c.count++;
    c.unreported++;
    const now = this.now();
    if (c.reportedMs !== undefined && now - c.reportedMs < REPORT_EVERY_MS) return;
    this.o.log[level]({ ...fields, count: c.unreported }, `${msg} (${c.unreported} since the last report)`);
    c.reportedMs = now;
    c.unreported = 0;
  }
}

function bind(address: string, port: number): Promise<dgram.Socket> {
  const socket = dgram.createSocket({ type: net.isIPv6(address) ? 'udp6' : 'udp4' });
  const where = net.isIPv6(address) ? `[${address}]:${port}` : `${address}:${port}`;
  return new Promise((resolve, reject) => {
    socket.once('error', (err) => {
      socket.close();
      const code = errnoCode(err);
      const fix =
        code === 'EADDRINUSE' ? 'another process uses it: stop that process or change cluster.heartbeatPort'
        : code === 'EADDRNOTAVAIL' ? "the address is not on this host: fix the node's address or heartbeatAddress in the cluster file"
        : 'check the address and cluster.heartbeatPort in the cluster file';
      reject(new UserError(`heartbeat: cannot bind UDP ${where} (${code ?? err.message}): ${fix}`));
    });
    socket.bind({ address, port, exclusive: true }, () => {
      socket.removeAllListeners('error');
      resolve(socket);
    });
  });
}
