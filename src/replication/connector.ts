/**
 * Keeps a resource's peer link up: listens at this node's address on the
 * resource's port, and (the node whose name sorts first) dials the peer
 * until a link is up, so exactly one TCP connection exists per resource.
 * Every link is authenticated (link-auth.ts) before a byte of data moves;
 * a refused link is logged and the connector keeps serving and retrying.
 */
import net from 'node:net';
import { authenticateLink, LinkIdentity, LinkRefused, sharedFeatures } from './link-auth.js';
import { LinkOptions, PeerLink } from './link.js';
import { PeerSession } from './peer.js';
import type { Resource } from './resource.js';
import type { TimerHandle } from '../util/clock.js';

export interface ConnectorOptions {
  identity: LinkIdentity;
  address: string;
  peerNode: string;
  peerAddress: string;
  port: number;
  link?: LinkOptions;
  retryMs?: number;
}

export class Connector {
  private server: net.Server | undefined;
  private timer: TimerHandle | undefined;
  private dialing = false;
  private stopped = false;
  /** Sockets in their handshake, to close on stop. */
  private readonly handshaking = new Set<net.Socket>();

  constructor(
    private readonly resource: Resource,
    private readonly options: ConnectorOptions,
  ) {}

  get dials(): boolean {
    return this.options.identity.node < this.options.peerNode;
  }

  async start(): Promise<void> {
    const server = net.createServer((socket) => this.accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: this.options.address, port: this.options.port }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => this.resource.log.error({ event: 'link-listener-error', resource: this.resource.name, err: err.message }));
    this.server = server;
    if (this.dials) {
      this.timer = this.resource.clock.setInterval(() => this.dial(), this.options.retryMs ?? 300);
      this.timer.unref();
      this.dial();
    }
  }

  /** Drop the current link now (a new one follows unless the resource is StandAlone). */
  kick(why: string): void {
    this.resource.peer?.close(why);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.resource.clock.clearInterval(this.timer);
    for (const s of this.handshaking) s.destroy();
    this.resource.peer?.close('node stopping');
    if (this.server) await new Promise<void>((resolve) => this.server!.close(() => resolve()));
  }

  private wanted(): boolean {
    return !this.stopped && !this.resource.standAlone && this.resource.peer === undefined;
  }

  private accept(socket: net.Socket): void {
    socket.on('error', () => undefined);
    if (!this.wanted()) {
      socket.destroy();
      return;
    }
    void this.handshake(socket);
  }

  private dial(): void {
    if (!this.wanted() || this.dialing) return;
    this.dialing = true;
    const socket = net.createConnection({ host: this.options.peerAddress, port: this.options.port, localAddress: this.options.address });
    socket.on('error', () => undefined);
    const fail = (): void => {
      this.dialing = false;
      socket.destroy();
    };
    const timer = this.resource.clock.setTimeout(fail, 2000);
    socket.once('error', () => {
      this.resource.clock.clearTimeout(timer);
      fail();
    });
    socket.once('connect', () => {
      this.resource.clock.clearTimeout(timer);
      void this.handshake(socket).finally(() => (this.dialing = false));
    });
  }

  private async handshake(socket: net.Socket): Promise<void> {
    const r = this.resource;
    this.handshaking.add(socket);
    try {
      const { peer, leftover } = await authenticateLink(socket, this.options.identity, [this.options.peerNode], undefined, r.clock);
      if (!this.wanted()) {
        socket.destroy();
        return;
      }
      const link = new PeerLink(socket, leftover, { clock: r.clock, ...this.options.link });
      r.peer = new PeerSession(r, link, peer.node, sharedFeatures(peer, this.options.identity.features));
      r.log.info({ event: 'link-up', resource: r.name, peer: peer.node }, `link to ${peer.node} up`);
      r.emit('changed');
    } catch (err) {
      if (err instanceof LinkRefused) {
        const level = err.reason === 'wrong-secret' || err.reason === 'other-cluster' || err.reason === 'unknown-node' ? 'warn' : 'debug';
        r.log[level]({ event: 'link-refused', resource: r.name, reason: err.reason, from: socket.remoteAddress, err: err.message }, `peer link refused: ${err.message}`);
      } else {
        r.log.warn({ event: 'link-failed', resource: r.name, err: (err as Error).message });
      }
      socket.destroy();
    } finally {
      this.handshaking.delete(socket);
    }
  }
}
