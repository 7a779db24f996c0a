/**
 * The start of every peer link: framing, a versioned hello, and mutual
 * HMAC challenge-response with the cluster secret (DRBD's cram-hmac-alg,
 * both ways). Nothing else is read from a peer before it has proved it
 * knows the secret, and a wrong or missing secret is refused on both sides.
 *
 * Frame: u32 magic "DUEL", u16 type, u16 reserved, u32 payload length, payload.
 * 1. both send HELLO  {protocol, cluster, node, resource} + 32-byte challenge
 * 2. both send AUTH   HMAC-SHA256(secret, "duet-link-v1" | peer's challenge |
 *                     own challenge | own node | resource)
 * 3. both check the peer's AUTH in constant time; then the link carries data.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Socket } from 'node:net';
import { Clock, realClock } from '../util/clock.js';

export const LINK_MAGIC = 0x4455454c; // "DUEL"
export const LINK_PROTOCOL = 1;
export const FRAME_HEADER = 12;
/** Handshake frames are small; anything bigger is a stranger talking. */
const MAX_HANDSHAKE_PAYLOAD = 4096;
const CHALLENGE = 32;

export const FRAME_HELLO = 1;
export const FRAME_AUTH = 2;
export const FRAME_REFUSED = 3;

export interface LinkIdentity {
  cluster: string;
  node: string;
  resource: string;
  secret: Buffer;
  /** What this side's hello lists (default LINK_FEATURES; tests play an older build with []). */
  features?: readonly string[];
}

/**
 * What this build can do beyond link protocol 1: a peer that does not list a
 * feature never receives its frames (a node of an older build connects and
 * works as before).
 */
export const FEATURE_VERIFY_ASK = 'verify-ask';
export const LINK_FEATURES: readonly string[] = [FEATURE_VERIFY_ASK];

export interface Hello {
  protocol: number;
  cluster: string;
  node: string;
  resource: string;
  /** Absent from older builds' hellos. */
  features?: string[];
}

/** The features both sides have: `mine` (this side's hello) and the peer's list as it came (anything not a list of strings is none). */
export function sharedFeatures(peer: Hello, mine: readonly string[] = LINK_FEATURES): Set<string> {
  const theirs = Array.isArray(peer.features) ? peer.features.filter((f): f is string => typeof f === 'string') : [];
  return new Set(theirs.filter((f) => mine.includes(f)));
}

export class LinkRefused extends Error {
  constructor(
    readonly reason: 'wrong-secret' | 'other-cluster' | 'other-resource' | 'unknown-node' | 'protocol' | 'malformed' | 'timeout' | 'closed' | 'refused-by-peer',
    message: string,
  ) {
    super(message);
    this.name = 'LinkRefused';
  }
}

export function encodeFrame(type: number, payload: Buffer): Buffer {
  const buf = Buffer.alloc(FRAME_HEADER + payload.length);
  buf.writeUInt32BE(LINK_MAGIC, 0);
  buf.writeUInt16BE(type, 4);
  buf.writeUInt32BE(payload.length, 8);
  payload.copy(buf, FRAME_HEADER);
  return buf;
}

/** Reads whole frames from a socket during the handshake, with a deadline. */
class FrameReader {
  private buf: Buffer = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  private ended = false;
  private readonly onData = (chunk: Buffer): void => {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    this.waiter?.();
  };
  private readonly onEnd = (): void => {
    this.ended = true;
    this.waiter?.();
  };

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onEnd);
  }

  async next(deadline: number, clock: Clock): Promise<{ type: number; payload: Buffer }> {
    for (;;) {
      if (this.buf.length >= FRAME_HEADER) {
        if (this.buf.readUInt32BE(0) !== LINK_MAGIC) throw new LinkRefused('malformed', 'the peer does not speak the duet link protocol (bad magic)');
        const len = this.buf.readUInt32BE(8);
        if (len > MAX_HANDSHAKE_PAYLOAD) throw new LinkRefused('malformed', `handshake frame of ${len} bytes is too large`);
        if (this.buf.length >= FRAME_HEADER + len) {
          const type = this.buf.readUInt16BE(4);
          const payload = Buffer.from(this.buf.subarray(FRAME_HEADER, FRAME_HEADER + len));
          this.buf = this.buf.subarray(FRAME_HEADER + len);
          return { type, payload };
        }
      }
      if (this.ended) throw new LinkRefused('closed', 'the peer closed the connection during the handshake');
      const left = deadline - clock.now();
      if (left <= 0) throw new LinkRefused('timeout', 'the peer did not complete the handshake in time');
      await new Promise<void>((resolve) => {
        const timer = clock.setTimeout(resolve, left);
        this.waiter = () => {
          clock.clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
  }

  /** Stop reading; bytes after the handshake belong to the caller. */
  detach(): Buffer {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onEnd);
    return this.buf;
  }
}

function proof(secret: Buffer, peerChallenge: Buffer, ownChallenge: Buffer, node: string, resource: string): Buffer {
  return createHmac('sha256', secret).update('duet-link-v1').update(peerChallenge).update(ownChallenge).update(`${node}\0${resource}`).digest();
}

export interface Authenticated {
  peer: Hello;
  /** Bytes the peer sent after its AUTH (the start of the data stream). */
  leftover: Buffer;
}

/**
 * Run the handshake on a connected socket (either side: it is symmetric).
 * `allowedPeers` are the node names that may connect for this resource.
 * On refusal the socket is destroyed and LinkRefused says why. On success
 * the caller owns the socket again (and must listen for its 'error').
 */
export async function authenticateLink(socket: Socket, me: LinkIdentity, allowedPeers: string[], timeoutMs = 5000, clock: Clock = realClock): Promise<Authenticated> {
  // The injected clock: under the simulator a handshake's deadline is fake time like everything else.
  const deadline = clock.now() + timeoutMs;
  const reader = new FrameReader(socket);
  const challenge = randomBytes(CHALLENGE);
  const hello: Hello = { protocol: LINK_PROTOCOL, cluster: me.cluster, node: me.node, resource: me.resource, features: [...(me.features ?? LINK_FEATURES)] };
  const refuse = (err: LinkRefused): never => {
    // The link is being torn down: a late reset must not become an uncaught 'error'.
    socket.on('error', () => undefined);
    // Tell the peer why, if it still listens; then make sure the socket goes.
    if (!socket.destroyed && socket.writable) {
      try {
        socket.end(encodeFrame(FRAME_REFUSED, Buffer.from(err.reason)));
      } catch {
        /* the peer is gone already */
      }
    }
    clock.setTimeout(() => socket.destroy(), 200).unref();
    reader.detach();
    throw err;
  };
  try {
    socket.write(encodeFrame(FRAME_HELLO, Buffer.concat([challenge, Buffer.from(JSON.stringify(hello))])));
    const h = await reader.next(deadline, clock);
    if (h.type === FRAME_REFUSED) throw new LinkRefused('refused-by-peer', `the peer refused the link (${h.payload.toString('utf8').slice(0, 40)})`);
    if (h.type !== FRAME_HELLO || h.payload.length <= CHALLENGE) throw new LinkRefused('malformed', 'the peer did not start with a hello');
    const peerChallenge = h.payload.subarray(0, CHALLENGE);
    let peer: Hello;
    try {
      peer = JSON.parse(h.payload.subarray(CHALLENGE).toString('utf8')) as Hello;
    } catch {
      throw new LinkRefused('malformed', 'the peer sent an unreadable hello');
    }
    if (peer.protocol !== LINK_PROTOCOL) throw new LinkRefused('protocol', `the peer speaks link protocol ${String(peer.protocol)}, this node ${LINK_PROTOCOL}`);
    if (peer.cluster !== me.cluster) throw new LinkRefused('other-cluster', `the peer belongs to cluster ${String(peer.cluster)}, not ${me.cluster}`);
    if (peer.resource !== me.resource) throw new LinkRefused('other-resource', `the peer offers resource ${String(peer.resource)}, not ${me.resource}`);
    if (typeof peer.node !== 'string' || !allowedPeers.includes(peer.node) || peer.node === me.node) {
      throw new LinkRefused('unknown-node', `node ${String(peer.node)} is not a peer of resource ${me.resource}`);
    }
    socket.write(encodeFrame(FRAME_AUTH, proof(me.secret, peerChallenge, challenge, me.node, me.resource)));
    const a = await reader.next(deadline, clock);
    if (a.type === FRAME_REFUSED) throw new LinkRefused('refused-by-peer', `the peer refused the link (${a.payload.toString('utf8').slice(0, 40)})`);
    if (a.type !== FRAME_AUTH) throw new LinkRefused('malformed', 'the peer did not answer the challenge');
    const expected = proof(me.secret, challenge, peerChallenge, peer.node, me.resource);
    if (a.payload.length !== expected.length || !timingSafeEqual(a.payload, expected)) {
      throw new LinkRefused('wrong-secret', `node ${peer.node} does not know the cluster secret`);
    }
    return { peer, leftover: reader.detach() };
  } catch (err) {
    if (err instanceof LinkRefused) return refuse(err);
    return refuse(new LinkRefused('malformed', (err as Error).message));
  }
}
