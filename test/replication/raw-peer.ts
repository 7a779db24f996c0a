/**
 * A real node ('bravo': a Resource behind its Connector, on an in-memory
 * disk) and a hand-driven peer ('alpha') that authenticates like a real one
 * (link-auth.ts) and then sends whatever frames a test wants, well-formed or
 * not. What the node logged is kept, to see it name the peer and the frame.
 */
import net from 'node:net';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { pino } from 'pino';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { authenticateLink } from '../../src/replication/link-auth.js';
import { PeerLink } from '../../src/replication/link.js';
import { newGi, NO_GI, GenerationIds } from '../../src/replication/meta.js';
import type { ResourceOptions } from '../../src/replication/resource.js';
import * as W from '../../src/replication/wire.js';
import { freePort, newDisk, Node, SECRET, startNode, stopNode, until } from './pair.js';

export interface LogEvent {
  event?: string;
  peer?: string;
  frame?: string;
  why?: string;
  err?: string;
  [k: string]: unknown;
}

export interface Target {
  node: Node;
  disk: MemoryDevice;
  events: LogEvent[];
  port: number;
}

export const DISK_BYTES = 8 * 1024 * 1024;

/** bravo: Secondary, UpToDate in a generation of its own, nothing out of sync, listening for alpha. */
export async function startTarget(options: Partial<ResourceOptions> = {}, diskBytes = DISK_BYTES): Promise<Target> {
  const events: LogEvent[] = [];
  const log = pino({ level: 'debug' }, { write: (s: string) => void events.push(JSON.parse(s) as LogEvent) });
  const port = await freePort();
  const disk = await newDisk(diskBytes, 'bravo');
  const node = await startNode('bravo', disk, port, { log, ...options });
  await node.resource.promote(true);
  await node.resource.demote();
  return { node, disk, events, port };
}

export async function stopTarget(t: Target): Promise<void> {
  await stopNode(t.node);
}

/** Everything on the backing device after the data area: activity log, bitmap, metadata record. */
export async function metaArea(t: Target): Promise<Buffer> {
  const l = t.node.resource.layout;
  const buf = Buffer.alloc(l.deviceBytes - l.alOffset);
  await t.disk.read(l.alOffset, buf);
  return buf;
}

export async function dataArea(t: Target): Promise<Buffer> {
  const buf = Buffer.alloc(t.node.resource.size);
  await t.disk.read(0, buf);
  return buf;
}

/** The authenticated link of alpha, driven by hand. */
export class RawPeer {
  readonly frames: { type: number; payload: Buffer }[] = [];
  readonly down: Promise<string>;
  private waiters: (() => void)[] = [];
  grantPromotions = true;

  private constructor(
    readonly socket: net.Socket,
    readonly link: PeerLink,
  ) {
    this.down = new Promise((resolve) => link.once('down', resolve));
    link.on('frame', (type, payload) => {
      this.frames.push({ type, payload: Buffer.from(payload) });
      // A Secondary lets the node be promoted (a test that wants otherwise answers itself first: set grantPromotions false).
      if (type === W.F_PROMOTE && this.grantPromotions) link.send(W.F_PROMOTE_REPLY, W.encodeJson({ granted: true }));
      for (const w of this.waiters.splice(0)) w();
    });
    link.on('down', () => {
      for (const w of this.waiters.splice(0)) w();
    });
  }

  /** Connect to the target once it has no link (it refuses a second one), and authenticate as alpha (`features`: as an older build would, e.g. []). */
  static async connect(t: Target, options: { features?: string[] } = {}): Promise<RawPeer> {
    await until('the previous link to be gone', () => t.node.resource.peer === undefined, 5000);
    const socket = net.createConnection({ host: '127.0.0.3', port: t.port, localAddress: '127.0.0.2' });
    socket.on('error', () => undefined);
    await once(socket, 'connect');
    const { leftover } = await authenticateLink(socket, { cluster: 'test', node: 'alpha', resource: 'r0', secret: SECRET, features: options.features }, ['bravo'], 5000);
    const link = new PeerLink(socket, leftover, { pingIntervalMs: 100, pingTimeoutMs: 5000 });
    return new RawPeer(socket, link);
  }

  get isUp(): boolean {
    return this.link.isUp;
  }

  send(type: number, payload: Buffer = Buffer.alloc(0)): void {
    this.link.send(type, payload);
  }

  /** Bytes straight onto the socket, framed or not. */
  sendRaw(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** The first frame of `type` (after `from` frames) matching `pred`; bounded. */
  async frame(type: number, pred: (p: Buffer) => boolean = () => true, timeoutMs = 5000, from = 0): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const f = this.frames.slice(from).find((x) => x.type === type && pred(x.payload));
      if (f) return f.payload;
      if (!this.link.isUp) throw new Error(`the link went down before a frame of type ${type} came`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no frame of type ${type} within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  close(): void {
    this.link.close('test done');
  }
}

/** A state as a real alpha would send it; `patch` overrides fields. */
export function stateOf(t: Target, patch: Record<string, unknown> = {}): Buffer {
  const r = t.node.resource;
  return W.encodeJson({
    node: 'alpha',
    role: 'Primary',
    disk: 'UpToDate',
    gi: r.record.gi,
    dataBytes: r.size,
    outOfSyncBytes: 0,
    primarySince: Date.now(),
    sendingBitmap: true,
    crashedPrimary: false,
    ...patch,
  });
}

export type Mode = 'handshake' | 'connected' | 'target';

/**
 * Bring the session to `mode`: 'handshake' sends nothing (the node waits for
 * alpha's state), 'connected' claims bravo's own generation and disk state
 * (in sync, alpha Primary), 'target' claims a newer generation (bravo
 * becomes SyncTarget and records the sync generation and Inconsistent on
 * its disk; one zeroed block resyncs so that is all written before the
 * caller looks at the disk).
 */
export async function establish(t: Target, p: RawPeer, mode: Mode): Promise<void> {
  const r = t.node.resource;
  if (mode === 'handshake') return;
  if (mode === 'connected') {
    // In sync: the same generation and bravo's own disk state. An Inconsistent bravo (a sync target earlier)
    // connects without a resync only to a Diskless alpha: facing a better disk it would be a sync target,
    // and facing another Inconsistent one it refuses (nobody has good data).
    p.send(W.F_STATE, stateOf(t, { gi: r.record.gi, disk: r.disk === 'Inconsistent' ? 'Diskless' : r.disk }));
  } else {
    const gi: GenerationIds = { current: newGi(), bitmap: r.record.gi.current, history: [NO_GI, NO_GI] };
    p.send(W.F_STATE, stateOf(t, { gi }));
  }
  p.send(W.F_BITMAP_DONE);
  const phase = mode === 'connected' ? 'connected' : 'sync-target';
  await until(`bravo ${phase}`, () => r.peer?.phase === phase || !p.isUp, 5000);
  if (!p.isUp) throw new Error(`the link went down while reaching ${mode}`);
  if (mode === 'target') {
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(W.WF_ZERO);
    const from = p.frames.length;
    p.send(W.F_RS_DATA, W.encodeRange(0, 4096, flags));
    await p.frame(W.F_RS_ACK, () => true, 5000, from);
  }
}

/**
 * Wait (bounded) until the node drops the link for a protocol violation;
 * returns what it logged about it: a `peer-protocol-error` naming the peer,
 * or for a broken frame header the link's own `disconnected`.
 */
export async function droppedFor(t: Target, p: RawPeer, fromEvent: number, timeoutMs = 2000): Promise<LogEvent> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const why = await Promise.race([p.down, new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), timeoutMs);
    })]);
  clearTimeout(timer);
  if (why === undefined) throw new Error(`the node kept the link up for ${timeoutMs} ms`);
  await until('the node to see its link down', () => t.node.resource.peer === undefined, 5000);
  const mine = t.events.slice(fromEvent);
  const found = mine.find((e) => e.event === 'peer-protocol-error') ?? mine.find((e) => e.event === 'disconnected' && /protocol error/.test(String(e.why)));
  if (!found) throw new Error(`the link went down (${why}) but the node logged no protocol error: ${JSON.stringify(mine.map((e) => e.event))}`);
  return found;
}

export function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

/** The verify request a real Primary would send for `data` at `offset`: truncated SHA-256 per 4 KiB block. */
export function verifyDigests(data: Buffer): Buffer {
  const parts = [];
  for (let i = 0; i < data.length; i += 4096) parts.push(createHash('sha256').update(data.subarray(i, i + 4096)).digest().subarray(0, 16));
  return Buffer.concat(parts);
}

/** `promise`, or an error naming `what` after `ms`. */
export async function bounded<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** () => true once `p` has settled (either way). */
export function settledFlag(p: Promise<unknown>): () => boolean {
  let settled = false;
  void p.then(
    () => (settled = true),
    () => (settled = true),
  );
  return () => settled;
}

/** Poll every 5 ms, bounded, until `done` holds, handing each new frame of `type` to `each`. */
export async function serveFrames(p: RawPeer, type: number, each: (payload: Buffer) => void, done: () => boolean, timeoutMs = 10_000): Promise<void> {
  let seen = 0;
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`serving frames of type ${type}: not done within ${timeoutMs} ms`);
    const frames = p.frames.filter((f) => f.type === type);
    for (const f of frames.slice(seen)) each(f.payload);
    seen = frames.length;
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** The target (bravo) made Primary, and a raw alpha connected to it as its Secondary, in sync. */
export async function connectToPrimary(t: Target): Promise<RawPeer> {
  const r = t.node.resource;
  const p = await RawPeer.connect(t);
  await establish(t, p, 'connected');
  r.peer!.close('test: reconnect with bravo Primary');
  await until('raw link down', () => !p.isUp, 5000);
  await r.promote(true);
  const q = await RawPeer.connect(t);
  q.send(W.F_STATE, stateOf(t, { role: 'Secondary', gi: r.record.gi }));
  q.send(W.F_BITMAP_DONE);
  await until('connected', () => r.peer?.phase === 'connected', 5000);
  return q;
}
