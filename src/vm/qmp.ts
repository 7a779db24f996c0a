/**
 * A client of QEMU's machine protocol (QMP): JSON objects, one a line, over
 * the unix socket each VM's QEMU listens on. Commands carry an id and are
 * matched to their answers by it; events go to listeners. With the "oob"
 * capability enabled, a command sent with `oob` (QMP's exec-oob) is run at
 * once even while QEMU's main loop is stuck: `yank` cuts an NBD connection
 * whose server died without a RST, which would otherwise block `stop`.
 */
import net from 'node:net';
import { EventEmitter } from 'node:events';

export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command}: ${desc}`);
  }
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

interface QmpEvents {
  event: [QmpEvent];
  close: [];
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

const GREETING_TIMEOUT_MS = 5000;
/** A line longer than this is no QMP answer (query-* answers are a few KiB). */
const MAX_LINE = 16 * 1024 * 1024;

export class QmpClient extends EventEmitter<QmpEvents> {
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private buffer = '';
  private closed = false;
  /** QEMU offered out-of-band execution and it is enabled on this session. */
  oob = false;
  version = '';

  private constructor(private readonly socket: net.Socket) {
    super();
  }

  /** Connect, read the greeting, leave capabilities negotiation (enabling oob when offered). */
  static async connect(socketPath: string, options: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const socket = net.createConnection(socketPath);
    const client = new QmpClient(socket);
    const greeting = await new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => fail(new Error(`QMP ${socketPath}: no greeting within ${options.timeoutMs ?? GREETING_TIMEOUT_MS} ms`)), options.timeoutMs ?? GREETING_TIMEOUT_MS);
      let text = '';
      const onData = (chunk: Buffer): void => {
        text += chunk.toString('utf8');
        const nl = text.indexOf('\n');
        if (nl < 0) return;
        socket.off('data', onData);
        clearTimeout(timer);
        socket.off('error', fail);
        socket.off('close', closed);
        client.buffer = text.slice(nl + 1);
        try {
          resolve(JSON.parse(text.slice(0, nl)) as Record<string, unknown>);
        } catch {
          fail(new Error(`QMP ${socketPath}: the greeting is not JSON`));
        }
      };
      const fail = (err: Error): void => {
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      const closed = (): void => fail(new Error(`QMP ${socketPath}: closed before the greeting`));
      socket.on('data', onData);
      socket.once('error', fail);
      socket.once('close', closed);
    });
    const qmp = greeting.QMP as { version?: { qemu?: { major: number; minor: number; micro: number } }; capabilities?: string[] } | undefined;
    if (!qmp) {
      socket.destroy();
      throw new Error(`QMP ${socketPath}: not a QMP greeting`);
    }
    const v = qmp.version?.qemu;
    client.version = v ? `${v.major}.${v.minor}.${v.micro}` : 'unknown';
    client.listen();
    const offered = qmp.capabilities ?? [];
    client.oob = offered.includes('oob');
    await client.execute('qmp_capabilities', client.oob ? { enable: ['oob'] } : undefined, { timeoutMs: options.timeoutMs });
    return client;
  }

  private listen(): void {
    this.socket.on('data', (chunk: Buffer) => this.consume(chunk.toString('utf8')));
    // The socket's end is QEMU's exit (or its monitor closing): every pending command fails.
    this.socket.on('error', (err) => this.fail(err));
    this.socket.on('close', () => this.fail(new Error('QMP: the connection to QEMU closed')));
    const rest = this.buffer;
    this.buffer = '';
    this.consume(rest);
  }

  private consume(text: string): void {
    this.buffer += text;
    if (this.buffer.length > MAX_LINE) {
      this.fail(new Error('QMP: an answer longer than 16 MiB'));
      return;
    }
    for (let nl = this.buffer.indexOf('\n'); nl >= 0; nl = this.buffer.indexOf('\n')) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.receive(line);
    }
  }

  private receive(line: string): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // Not ours to crash on: QEMU sends only JSON here.
    }
    if (typeof m.event === 'string') {
      this.emit('event', m as unknown as QmpEvent);
      return;
    }
    const id = typeof m.id === 'string' ? m.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p) return; // An answer to a command that timed out.
    this.pending.delete(id!);
    clearTimeout(p.timer);
    if (m.error) {
      const e = m.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, e.class ?? 'GenericError', e.desc ?? 'failed'));
    } else {
      p.resolve(m.return);
    }
  }

  /** Run `command`; its answer's `return`, or a QmpError. `oob`: run it out of band (only when enabled). */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: { timeoutMs?: number; oob?: boolean } = {}): Promise<T> {
    if (this.closed) return Promise.reject(new Error(`QMP ${command}: the connection to QEMU is closed`));
    const id = `duet-${this.nextId++}`;
    const oob = options.oob === true && this.oob;
    const message = { [oob ? 'exec-oob' : 'execute']: command, ...(args ? { arguments: args } : {}), id };
    return new Promise<T>((resolve, reject) => {
      const timeoutMs = options.timeoutMs ?? 10_000;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command}: no answer from QEMU within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(`${JSON.stringify(message)}\n`);
    });
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.closed = true;
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new Error(`QMP ${p.command}: ${err.message}`));
    }
    this.socket.destroy();
    this.emit('close');
  }

  get isClosed(): boolean {
    return this.closed;
  }

  close(): void {
    this.fail(new Error('closed by duet'));
  }
}
