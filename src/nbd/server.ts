/**
 * The NBD server: accepts connections, runs the handshake, then hands the
 * socket to the transmission phase. One connection's trouble (bad framing,
 * a device error, a bug) ends that connection only.
 */
import net from 'node:net';
import tls from 'node:tls';
import type { Logger } from '../util/log.js';
import { finishedWithin } from '../util/timeout.js';
import { ByteQueue } from './bytequeue.js';
import type { ExportProvider, NbdExport } from './exports.js';
import { negotiate, ProtocolError } from './handshake.js';
import * as P from './protocol.js';
import { Transmission, TransmissionStats } from './transmission.js';
import { ExportStats } from './io-stats.js';
import { RetiredDevice } from './retired.js';

export interface NbdServerOptions {
  exports: ExportProvider;
  log: Logger;
  /** How long shutdown waits for in-flight requests before cutting connections. */
  shutdownTimeoutMs?: number;
  tls?: NbdServerTls;
  /** Offered every accepted socket first; returns true if it took it (serve workers). */
  handoff?: (socket: net.Socket) => boolean;
  onConnections?: (count: number) => void;
}

export interface NbdServerTls {
  context: tls.SecureContext;
  /** FORCEDTLS mode: clients must upgrade before anything else. */
  required: boolean;
  /** Ask for and verify a client certificate against the context's CA. */
  verifyClient?: boolean;
}

class ClosedError extends Error {}

const EMPTY = Buffer.alloc(0);
const READ_SLAB_BYTES = 256 * 1024;
const READ_REGION_MIN_BYTES = 16 * 1024;

/** DUET_NO_USER_BUFFER=1 selects the plain 'data' event path (tests cover both). */
function userBufferEnabled(): boolean {
  return process.env.DUET_NO_USER_BUFFER !== '1';
}

/**
 * Re-create an accepted (paused) socket so that reads land in buffers we
 * choose (net's `onread` option): no stream machinery per read, fewer and
 * larger reads, and a large write payload read straight into its own buffer.
 * Node offers `onread` only to sockets it creates, so the handle moves to a
 * new Socket. Returns null if this Node does not look as expected; the caller
 * then uses 'data' events.
 */
function adoptWithUserBuffer(
  accepted: net.Socket,
  buffer: () => Buffer,
  callback: (n: number, buf: Buffer) => boolean,
): net.Socket | null {
  if (!userBufferEnabled()) return null;
  const holder = accepted as unknown as { _handle: { useUserBuffer?: unknown } | null };
  const handle = holder._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function') return null;
  holder._handle = null;
  accepted.destroy(); // only the empty shell: the server's connection count drops
  return new net.Socket({ handle, onread: { buffer, callback }, readable: true, writable: true } as unknown as net.SocketConstructorOpts);
}

/** How long a connection we ended may linger before its socket is destroyed. */
const FINISH_GRACE_MS = 5_000;
/** A retired connection's client is asked (TCP keepalive) whether it is still there after this long idle. */
const RETIRED_KEEPALIVE_MS = 60_000;

class Connection {
  readonly queue = new ByteQueue();
  private waiter: { n: number; resolve: () => void; reject: (e: Error) => void } | null = null;
  transmission: Transmission | null = null;
  closed = false;
  /** The export this connection negotiated, once in transmission. */
  openedExport: NbdExport | undefined;
  /** Its export moved away (retireConnections): it only waits for its client to leave. */
  retired = false;
  private readonly handshakeTimer: NodeJS.Timeout;

  private readonly dataListener = (chunk: Buffer): void => this.onData(chunk);
  /** Reads land in regions of this slab (each region handed out once, never reused). */
  private slab = EMPTY;
  private slabUsed = 0;
  /** The buffer of the read in progress is a write payload, not the slab. */
  private readDirect = false;
  /** We ended the connection: drop whatever still arrives. */
  private draining = false;
  socket: net.Socket;

  constructor(
    readonly id: number,
    source: net.Socket | number,
    private readonly server: NbdServer,
    readonly log: Logger,
  ) {
    const buffer = (): Buffer => this.nextReadBuffer();
    const callback = (n: number, buf: Buffer): boolean => this.onRead(n, buf);
    let socket: net.Socket;
    if (typeof source === 'number') {
      // A descriptor handed over by another thread (serve workers): ours alone now.
      socket = userBufferEnabled()
        ? new net.Socket({ fd: source, readable: true, writable: true, onread: { buffer, callback } } as unknown as net.SocketConstructorOpts)
        : new net.Socket({ fd: source, readable: true, writable: true }).on('data', this.dataListener);
    } else {
      socket = adoptWithUserBuffer(source, buffer, callback) ?? source.on('data', this.dataListener).resume();
    }
    this.socket = socket;
    socket.setNoDelay(true);
    socket.on('error', (err) => log.debug({ event: 'socket error', err: err.message }));
    socket.on('close', () => this.onClose());
    this.handshakeTimer = setTimeout(() => {
      if (!this.transmission) this.abort('handshake took too long');
    }, P.LIMITS.handshakeTimeoutMs);
    this.handshakeTimer.unref();
  }

  async run(): Promise<void> {
    try {
      const negotiated = await negotiate(
        {
          queue: this.queue,
          need: (n) => this.need(n),
          write: (data) => {
            if (!this.socket.destroyed) this.socket.write(data);
          },
        },
        this.server.exports,
        this.log,
        {
          shuttingDown: () => this.server.shuttingDown,
          tls: this.server.tls ? { required: this.server.tls.required, upgrade: () => this.startTls() } : undefined,
        },
      );
      clearTimeout(this.handshakeTimer);
      if (!negotiated) {
        this.log.debug({ event: 'client aborted handshake' });
        this.socket.end();
        return;
      }
      this.log.info({
        event: 'client connected',
        export: negotiated.export.name,
        structuredReplies: negotiated.structuredReplies,
        baseAllocation: negotiated.baseAllocation,
      });
      if (!this.closed) {
        this.openedExport = negotiated.export;
        this.server.exports.opened?.(negotiated.export);
      }
      this.transmission = new Transmission(this.socket, this.queue, negotiated, this.log, {
        onDisconnect: (reason) => void this.disconnect(reason),
        stats: this.server.stats,
        exportStats: this.server.exportStats(negotiated.export.name),
      });
      this.transmission.process();
    } catch (err) {
      clearTimeout(this.handshakeTimer);
      if (err instanceof ClosedError) return;
      if (err instanceof ProtocolError) this.abort(err.message);
      else {
        this.log.error({ event: 'handshake failed', err: (err as Error).stack });
        this.abort('internal error');
      }
    }
  }

  /** NBD_OPT_STARTTLS was acknowledged: run the TLS handshake on this socket. */
  private startTls(): Promise<void> {
    const settings = this.server.tls!;
    const raw = this.socket;
    raw.off('data', this.dataListener);
    const secure = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: settings.context,
      requestCert: settings.verifyClient ?? false,
      rejectUnauthorized: settings.verifyClient ?? false,
    });
    this.socket = secure;
    secure.on('data', this.dataListener);
    secure.on('error', (err) => this.log.debug({ event: 'tls error', err: err.message }));
    secure.on('close', () => raw.destroy());
    return new Promise((resolve, reject) => {
      secure.once('secure', () => {
        this.log.debug({ event: 'tls established', protocol: secure.getProtocol() });
        resolve();
      });
      secure.once('error', (err) => reject(new ProtocolError(`TLS handshake failed: ${err.message}`)));
    });
  }

  /** Finish in-flight requests, then close (DISC, or a broken stream). */
  async disconnect(reason: string): Promise<void> {
    if (this.closed) return;
    this.log.debug({ event: 'disconnecting', reason });
    if (this.transmission) await this.transmission.stop();
    if (reason !== 'client disconnected') this.log.warn({ event: 'connection dropped', reason });
    this.finish();
  }

  /**
   * Half-close and drain: a paused socket with unread bytes never sees the
   * client's FIN, so discard whatever still arrives and keep reading until
   * the close; a client that never closes is cut after a grace period.
   */
  finish(): void {
    const socket = this.socket;
    this.draining = true;
    this.queue.clear();
    socket.resume();
    socket.end();
    setTimeout(() => socket.destroy(), FINISH_GRACE_MS).unref();
  }

  abort(reason: string): void {
    if (this.closed) return;
    this.log.warn({ event: 'connection dropped', reason });
    this.socket.destroy();
  }

  private need(n: number): Promise<void> {
    if (this.queue.length >= n) return Promise.resolve();
    if (this.closed) return Promise.reject(new ClosedError());
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  /** Where the next socket read goes: straight into a large write payload, or the slab. */
  private nextReadBuffer(): Buffer {
    const direct = this.draining ? null : this.transmission?.directTarget();
    if (direct) {
      this.readDirect = true;
      return direct;
    }
    this.readDirect = false;
    if (this.slab.length - this.slabUsed < READ_REGION_MIN_BYTES) {
      this.slab = Buffer.allocUnsafe(READ_SLAB_BYTES);
      this.slabUsed = 0;
    }
    return this.slab.subarray(this.slabUsed);
  }

  private onRead(n: number, buf: Buffer): boolean {
    if (this.draining) return true;
    if (this.readDirect) {
      this.runTransmission((t) => {
        t.directReceived(n);
        t.process();
      });
      return true;
    }
    this.slabUsed += (n + 7) & ~7;
    this.onData(buf.subarray(0, n));
    return true;
  }

  /** A bug while handling requests ends this connection only. */
  private runTransmission(step: (t: Transmission) => void): void {
    try {
      step(this.transmission!);
    } catch (err) {
      this.log.error({ event: 'request processing failed', err: (err as Error).stack });
      this.abort('internal error');
    }
  }

  private onData(chunk: Buffer): void {
    if (this.draining) return;
    this.queue.push(chunk);
    if (this.transmission) {
      this.runTransmission((t) => t.process());
      return;
    }
    // Handshake: bound what a client can make us buffer (options are capped,
    // and a client must wait for each reply before sending the next).
    if (this.queue.length > P.LIMITS.optionLengthMax + 1024 * 1024) {
      this.abort('client sent too much data during the handshake');
      return;
    }
    const w = this.waiter;
    if (w && this.queue.length >= w.n) {
      this.waiter = null;
      w.resolve();
    }
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.openedExport) this.server.exports.closed?.(this.openedExport);
    clearTimeout(this.handshakeTimer);
    this.queue.clear();
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(new ClosedError());
    }
    this.server.forget(this);
  }
}

export class NbdServer {
  readonly exports: ExportProvider;
  readonly tls: NbdServerTls | undefined;
  readonly stats: TransmissionStats = { requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0 };
  /** Per export, since the server started (metrics read them). */
  readonly byExport = new Map<string, ExportStats>();

  exportStats(name: string): ExportStats {
    let s = this.byExport.get(name);
    if (!s) {
      s = new ExportStats();
      this.byExport.set(name, s);
    }
    return s;
  }
  shuttingDown = false;
  private readonly log: Logger;
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  private nextId = 1;
  private readonly shutdownTimeoutMs: number;

  /** Give an accepted socket to someone else (serve workers); true when taken. */
  private readonly handoff: ((socket: net.Socket) => boolean) | undefined;
  /** Told the number of open connections whenever it changes. */
  private readonly onConnections: ((count: number) => void) | undefined;

  constructor(options: NbdServerOptions) {
    this.handoff = options.handoff;
    this.onConnections = options.onConnections;
    this.exports = options.exports;
    this.tls = options.tls;
    this.log = options.log;
    this.shutdownTimeoutMs = options.shutdownTimeoutMs ?? 10_000;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Where the clients using export `name` here connect from (retired connections are not using it). */
  clientsOf(name: string): string[] {
    return [...this.connections].filter((c) => !c.closed && !c.retired && c.openedExport?.name === name).map((c) => `${c.socket.remoteAddress ?? 'unix'}:${c.socket.remotePort ?? ''}`);
  }

  /** Listen on HOST:PORT (or a Unix socket path when `port` is undefined). */
  listen(host: string, port?: number): Promise<net.AddressInfo | string> {
    const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.accept(socket));
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      const done = (): void => {
        server.off('error', reject);
        server.on('error', (err) => this.log.error({ event: 'listener error', err: err.message }));
        this.servers.push(server);
        const addr = server.address();
        resolve(addr as net.AddressInfo | string);
      };
      if (port === undefined) server.listen(host, done);
      else server.listen({ host, port, backlog: 511 }, done);
    });
  }

  /**
   * Storage fencing: clients from these addresses (a node declared dead) are cut off and refused, so a
   * QEMU left running there cannot write to a disk whose VM now runs elsewhere (it would resend its
   * in-flight writes on reconnecting).
   */
  private readonly fenced = new Set<string>();

  fenceAddresses(addresses: string[], fenced: boolean): number {
    let cut = 0;
    for (const a of addresses) {
      if (fenced) this.fenced.add(a);
      else this.fenced.delete(a);
    }
    if (!fenced) return 0;
    for (const c of this.connections) {
      if (this.fenced.has('*') || (c.socket.remoteAddress !== undefined && this.isFenced(c.socket.remoteAddress))) {
        c.socket.destroy();
        cut++;
      }
    }
    return cut;
  }

  private isFenced(address: string): boolean {
    // An IPv4 client may show as ::ffff:a.b.c.d on a dual-stack listener.
    // '*': this node fenced itself: nobody may write here.
    return this.fenced.has('*') || this.fenced.has(address) || (address.startsWith('::ffff:') && this.fenced.has(address.slice(7)));
  }

  private accept(socket: net.Socket): void {
    if (this.shuttingDown || (socket.remoteAddress !== undefined && this.isFenced(socket.remoteAddress))) {
      socket.destroy();
      return;
    }
    if (this.handoff?.(socket)) return;
    this.start(socket, `${socket.remoteAddress ?? 'unix'}:${socket.remotePort ?? ''}`);
  }

  /** Serve a connected socket descriptor accepted elsewhere (another thread). */
  adopt(fd: number, peer: string): void {
    if (this.shuttingDown) {
      new net.Socket({ fd }).destroy();
      return;
    }
    this.start(fd, peer);
  }

  private start(source: net.Socket | number, peer: string): void {
    const id = this.nextId++;
    const log = this.log.child({ conn: id, peer });
    const conn = new Connection(id, source, this, log);
    this.connections.add(conn);
    log.debug({ event: 'connection accepted' });
    this.onConnections?.(this.connections.size);
    void conn.run();
  }

  forget(conn: Connection): void {
    this.connections.delete(conn);
    this.onConnections?.(this.connections.size);
  }

  /**
   * The exports `which` are no longer served here (the Primary role moves away): in-flight requests
   * finish, then the connections stay open, answering a FLUSH with `closed`'s outcome and failing
   * anything else (see RetiredDevice), so a client can move to the new Primary without an error.
   * They close when the client leaves (or its host is gone: TCP keepalive), not after a while: QEMU
   * cannot move a disk whose old connection fails its flush, so a VM paused until the role lands
   * somewhere, minutes later, would stay paused for good.
   */
  async retireConnections(which: (exp: NbdExport) => boolean, closed: Promise<void>): Promise<void> {
    // With no client left to ask, a failed close is the caller's to report, not an unhandled rejection.
    closed.catch(() => undefined);
    const going = [...this.connections].filter((c) => c.openedExport !== undefined && which(c.openedExport));
    const stopped = await finishedWithin(Promise.all(going.map(async (conn) => conn.transmission?.stop())), this.shutdownTimeoutMs);
    for (const conn of going) {
      const t = conn.transmission;
      if (!stopped || !t || !conn.openedExport) {
        conn.socket.destroy();
        continue;
      }
      const d = conn.openedExport.device;
      conn.retired = true;
      t.retire(new RetiredDevice({ name: d.name, size: d.size, blockSize: d.blockSize, capabilities: d.capabilities }, closed));
      conn.socket.setKeepAlive(true, RETIRED_KEEPALIVE_MS);
    }
  }

  /**
   * Graceful shutdown: stop accepting, let every connection finish its
   * in-flight requests (bounded by shutdownTimeoutMs), then close them.
   * The caller flushes and closes the devices afterwards.
   */
  async close(): Promise<void> {
    this.shuttingDown = true;
    const listening = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    const draining = [...this.connections].map(async (conn) => {
      if (conn.transmission) {
        await conn.transmission.stop();
        conn.finish();
      } else {
        conn.socket.destroy();
      }
    });
    if (!(await finishedWithin(Promise.all(draining), this.shutdownTimeoutMs))) {
      this.log.warn({ event: 'shutdown timeout', connections: this.connections.size });
    }
    for (const conn of this.connections) conn.socket.destroy();
    await Promise.all(listening);
  }
}
