/**
 * The simulated network: TCP-like connections between hosts, on the fake
 * clock. What one end writes leaves in chunks of seeded random sizes and
 * arrives in order after a seeded latency, while the path between the two
 * hosts is up. A partition holds everything in flight (TCP retransmits: if
 * the path comes back before either end gives up, the bytes still arrive);
 * an end that gives up destroys its socket and a reset follows the data in
 * flight. A host whose process dies closes its sockets (the kernel's FIN);
 * a host that loses power just goes silent: its peer finds out by its
 * keepalive. A paused reader stops delivery, so back-pressure reaches the
 * writer (writableLength, 'drain'), as over a real socket.
 */
import { EventEmitter } from 'node:events';
import { Owner, Scheduler } from './scheduler.js';

const KiB = 1024;

export interface NetOptions {
  /** One-way latency range, ms. */
  latency: [number, number];
  /** Sender buffer size before write() says "wait" (the socket's highWaterMark). */
  highWaterMark: number;
  /** Bytes in the network plus unread at the receiver before the sender stops sending (the TCP window). */
  window: number;
}

type WireItem = { kind: 'data'; buf: Buffer; at: number } | { kind: 'fin' | 'rst'; at: number };

/** One direction of one connection: the bytes on their way, in order. */
class Wire {
  items: WireItem[] = [];
  bytes = 0;
  lastAt = 0;
  scheduled = false;
}

export class SimSocket extends EventEmitter {
  peer!: SimSocket;
  destroyed = false;
  paused = false;
  /** Bytes written, not yet handed to the network. */
  private queue: Buffer[] = [];
  private queued = 0;
  private corks = 0;
  private needDrain = false;
  private ending = false;
  private finSent = false;
  /** What travels from this end to the peer. */
  readonly out = new Wire();
  bytesSent = 0;

  constructor(
    readonly net: Network,
    readonly host: string,
    readonly peerHost: string,
    /** The process this end belongs to: nothing reaches a dead one. */
    readonly owner: Owner,
  ) {
    super();
    this.setMaxListeners(0);
  }

  setNoDelay(): this {
    return this;
  }
  get writableLength(): number {
    return this.queued;
  }
  get writableHighWaterMark(): number {
    return this.net.options.highWaterMark;
  }
  get writableNeedDrain(): boolean {
    return this.needDrain;
  }

  write(chunk: Buffer): boolean {
    if (this.destroyed || this.ending || !this.owner.alive) return false;
    if (chunk.length > 0) {
      this.queue.push(chunk);
      this.queued += chunk.length;
    }
    this.pump();
    if (this.queued >= this.writableHighWaterMark) {
      this.needDrain = true;
      return false;
    }
    return true;
  }
  cork(): void {
    this.corks++;
  }
  uncork(): void {
    if (this.corks > 0) this.corks--;
    this.pump();
  }
  pause(): this {
    this.paused = true;
    return this;
  }
  resume(): this {
    if (this.paused) {
      this.paused = false;
      this.net.kick(this.peer.out, this.peer, this);
    }
    return this;
  }
  /** Half-close: what is queued still goes, then a FIN (the peer sees 'close', as without allowHalfOpen). */
  end(): this {
    if (this.destroyed || this.ending) return this;
    this.ending = true;
    this.pump();
    return this;
  }
  /** Close now: unsent bytes are dropped, a reset follows what is already on its way. */
  destroy(): this {
    if (this.destroyed) return this;
    this.destroyed = true;
    this.queue = [];
    this.queued = 0;
    if (this.owner.alive) this.net.scheduler.timer(0, () => this.emit('close', false), this.owner);
    if (!this.finSent) this.net.send(this.out, { kind: 'rst', at: 0 }, this, this.peer);
    return this;
  }
  /** The process died (its kernel closes the socket) or the host lost power (nothing is sent). */
  vanish(kernelCloses: boolean): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.queue = [];
    this.queued = 0;
    if (kernelCloses && !this.finSent) this.net.send(this.out, { kind: 'rst', at: 0 }, this, this.peer);
  }

  /** Hand queued bytes to the network, as far as the window allows. */
  pump(): void {
    if (this.destroyed || this.corks > 0) return;
    const net = this.net;
    while (this.queued > 0 && this.out.bytes < net.options.window) {
      let n = Math.min(net.chunkSize(), this.queued);
      const parts: Buffer[] = [];
      while (n > 0) {
        const head = this.queue[0];
        if (head.length <= n) {
          parts.push(head);
          this.queue.shift();
          n -= head.length;
          this.queued -= head.length;
        } else {
          parts.push(head.subarray(0, n));
          this.queue[0] = head.subarray(n);
          this.queued -= n;
          n = 0;
        }
      }
      const buf = parts.length === 1 ? parts[0] : Buffer.concat(parts);
      this.bytesSent += buf.length;
      net.send(this.out, { kind: 'data', buf, at: 0 }, this, this.peer);
    }
    if (this.queued === 0 && this.ending && !this.finSent) {
      this.finSent = true;
      net.send(this.out, { kind: 'fin', at: 0 }, this, this.peer);
    }
    if (this.needDrain && this.queued < this.writableHighWaterMark) {
      this.needDrain = false;
      // 'drain' is an event of its own, as from a real socket.
      this.net.scheduler.timer(0, () => this.emit('drain'), this.owner);
    }
  }

  /** The network delivers to this end. */
  receive(item: WireItem): boolean {
    if (this.destroyed || !this.owner.alive) return true;
    if (item.kind !== 'data') {
      this.destroyed = true;
      this.queue = [];
      this.queued = 0;
      this.emit('close', item.kind === 'rst');
      return true;
    }
    if (this.paused) return false;
    this.emit('data', item.buf);
    return true;
  }
}

/**
 * Hosts and the paths between them. A path is up or partitioned in each
 * direction separately; a partition holds deliveries, it does not drop them.
 */
export class Network {
  private readonly down = new Set<string>();
  readonly owner = new Owner('network');
  /** Every connection made, both ends. */
  readonly sockets: SimSocket[] = [];

  constructor(
    readonly scheduler: Scheduler,
    readonly options: NetOptions,
    private readonly rand: () => number,
  ) {}

  chunkSize(): number {
    const r = this.rand();
    if (r < 0.3) return 1 + Math.floor(this.rand() * 64);
    if (r < 0.7) return 1 + Math.floor(this.rand() * 4 * KiB);
    return 1 + Math.floor(this.rand() * 256 * KiB);
  }

  /** A one-way latency drawn from the range (for messages that are not stream bytes). */
  oneWay(): number {
    return this.latency();
  }

  private latency(): number {
    const [lo, hi] = this.options.latency;
    return lo + this.rand() * (hi - lo);
  }

  isUp(from: string, to: string): boolean {
    return !this.down.has(`${from}>${to}`);
  }

  /** When the path between two hosts (either way) was last down: now if it is, 0 if never. */
  lastDownAt(a: string, b: string): number {
    if (!this.isUp(a, b) || !this.isUp(b, a)) return this.scheduler.now;
    return this.healedAt.get([a, b].sort().join('|')) ?? 0;
  }
  private readonly healedAt = new Map<string, number>();

  /** Cut the path between two hosts (both directions unless `oneWay`). */
  partition(a: string, b: string, oneWay = false): void {
    this.down.add(`${a}>${b}`);
    if (!oneWay) this.down.add(`${b}>${a}`);
  }

  heal(a: string, b: string): void {
    if (!this.isUp(a, b) || !this.isUp(b, a)) this.healedAt.set([a, b].sort().join('|'), this.scheduler.now);
    this.down.delete(`${a}>${b}`);
    this.down.delete(`${b}>${a}`);
    for (const s of this.sockets) if ((s.host === a && s.peerHost === b) || (s.host === b && s.peerHost === a)) this.kick(s.out, s, s.peer);
  }

  healAll(): void {
    for (const d of this.down) this.healedAt.set(d.split('>').sort().join('|'), this.scheduler.now);
    this.down.clear();
    for (const s of this.sockets) this.kick(s.out, s, s.peer);
  }

  get partitions(): string[] {
    return [...this.down].sort();
  }

  /** A new connection between two hosts' processes. */
  connect(a: string, aOwner: Owner, b: string, bOwner: Owner): [SimSocket, SimSocket] {
    const sa = new SimSocket(this, a, b, aOwner);
    const sb = new SimSocket(this, b, a, bOwner);
    sa.peer = sb;
    sb.peer = sa;
    this.sockets.push(sa, sb);
    // Forget connections that are over on both ends.
    if (this.sockets.length > 64) {
      const live = this.sockets.filter((s) => !(s.destroyed && s.peer.destroyed && s.out.items.length === 0 && s.peer.out.items.length === 0));
      this.sockets.length = 0;
      this.sockets.push(...live);
    }
    return [sa, sb];
  }

  send(wire: Wire, item: WireItem, from: SimSocket, to: SimSocket): void {
    item.at = Math.max(wire.lastAt, this.scheduler.now + this.latency());
    wire.lastAt = item.at;
    wire.items.push(item);
    if (item.kind === 'data') wire.bytes += item.buf.length;
    this.kick(wire, from, to);
  }

  /** Make sure the head of `wire` is on its way (if the path is up and the reader reads). */
  kick(wire: Wire, from: SimSocket, to: SimSocket): void {
    if (wire.scheduled || wire.items.length === 0) return;
    const head = wire.items[0];
    wire.scheduled = true;
    this.scheduler.timer(Math.max(0, head.at - this.scheduler.now), () => {
      wire.scheduled = false;
      this.deliver(wire, from, to);
    }, this.owner);
  }

  private deliver(wire: Wire, from: SimSocket, to: SimSocket): void {
    while (wire.items.length > 0) {
      const head = wire.items[0];
      if (head.at > this.scheduler.now) return this.kick(wire, from, to);
      if (!this.isUp(from.host, to.host)) {
        // Held in the network; retransmitted when the path heals (a little later than it would have arrived).
        head.at = this.scheduler.now;
        return;
      }
      if (!to.receive(head)) return; // the reader paused: resume() kicks again
      wire.items.shift();
      if (head.kind === 'data') wire.bytes -= head.buf.length;
      // Room in the window: the sender may hand over more.
      from.pump();
      // One delivery per event: each is a macrotask of its own, as from a real socket.
      if (wire.items.length > 0) return this.kick(wire, from, to);
    }
  }
}
