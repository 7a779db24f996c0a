/**
 * A JSON-lines request/answer socket. Two users, neither of them the admin
 * API (that is HTTP, server.ts): the Unix socket of a process that holds a
 * pool offline (HOME/pools/NAME.sock, how `duet vol ...` acts while
 * `serve --pool` runs), and the witness's vote protocol (TCP, each request
 * signed with the cluster secret, witness-auth.ts).
 *
 * Protocol: the client sends one JSON line, the Command. For `vol.receive`
 * the stream bytes follow and the client half-closes when done. The server
 * answers one JSON line, {"ok":true,"result":...} or {"ok":false,"error":
 * "...","exitCode":n}. For `vol.send` the answer line is preceded by the
 * stream in frames ('D' u32 length, bytes), then 'E' (complete) or 'X'
 * (failed), so a failure half-way can never pass for a complete stream.
 */
import fs from 'node:fs';
import net from 'node:net';
import { PassThrough, Readable, Writable } from 'node:stream';
import { z } from 'zod';
import type { Logger } from '../util/log.js';
import { UserError, errnoCode } from '../util/errors.js';
import type { Command } from '../volume/service.js';

/** Any request: the pool commands, or the node daemon's (resource.*, and pool commands naming their pool). */
export type Request = { cmd: string };

export type Handler<C extends Request = Command> = (command: C, io: { input?: Readable; output?: Writable }) => Promise<unknown>;

/** Where an admin server listens: a Unix socket path, or a TCP address (the node daemon's API). */
export type AdminTarget = string | { host: string; port: number; localAddress?: string };

export interface AdminOptions {
  /** Check a request before it runs (the node API's HMAC); throw a UserError to refuse it. */
  authorize?: (request: Record<string, unknown>) => void;
  /**
   * The callers never half-close (no streamed input): a hang-up before the
   * answer means the caller gave up (its timeout), so its request is dropped
   * rather than run late, when the caller may already act on "it failed".
   */
  dropIfCallerLeft?: boolean;
}

const MAX_REQUEST = 64 * 1024;
/** Longest command name (the longest today, resource.restore-blocks, is 23). */
const MAX_CMD = 64;

/**
 * The envelope every request has: a command name of dotted lower-case words
 * (vol.create, resource.primary, witness.query) and, when signed, a
 * signature of the right shape. The command's own fields are the handler's
 * to check (each command has its own); here they only pass through.
 */
const requestEnvelope = z
  .object({
    cmd: z
      .string()
      .max(MAX_CMD)
      .regex(/^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+$/),
    auth: z.object({ ts: z.number(), mac: z.string().max(256) }).strict().optional(),
  })
  .passthrough();

const answerSchema = z
  .object({ ok: z.boolean(), result: z.unknown().optional(), error: z.string().optional(), exitCode: z.number().int().optional() })
  .passthrough();

export class AdminServer {
  private constructor(
    private readonly server: net.Server,
    readonly path: string,
    private readonly isPath: boolean,
  ) {}

  static async listen<C extends Request = Command>(target: AdminTarget, handler: Handler<C>, log: Logger, options: AdminOptions = {}): Promise<AdminServer> {
    // A socket file left by a process that died: nobody can be listening (we hold the pool lock).
    if (typeof target === 'string') fs.rmSync(target, { force: true });
    // Half-open: a receive's client ends its side when the stream is sent and still waits for the answer.
    const server = net.createServer({ allowHalfOpen: true }, (socket) => serveOne(socket, handler, log, options));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const done = (): void => {
        server.off('error', reject);
        resolve();
      };
      if (typeof target === 'string') server.listen(target, done);
      else server.listen({ host: target.host, port: target.port }, done);
    });
    server.on('error', (err) => log.error({ event: 'admin-listener-error', err: err.message }));
    if (typeof target === 'string') fs.chmodSync(target, 0o600);
    return new AdminServer(server, typeof target === 'string' ? target : `${target.host}:${target.port}`, typeof target === 'string');
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    if (this.isPath) fs.rmSync(this.path, { force: true });
  }
}

function serveOne<C extends Request>(socket: net.Socket, handler: Handler<C>, log: Logger, options: AdminOptions): void {
  let buffered: Buffer = Buffer.alloc(0);
  let requestRead = false;
  let callerLeft = false;
  socket.on('error', (err) => log.debug({ event: 'admin-socket-error', err: err.message }));
  socket.once('end', () => {
    callerLeft = true;
    // Half-open sockets stay open until we end them: a caller that left mid-request would hold one forever.
    if (!requestRead) {
      log.debug({ event: 'admin-request-incomplete', from: socket.remoteAddress, bytes: buffered.length }, 'the caller left before its request was complete');
      socket.destroy();
    }
  });
  socket.once('close', () => {
    callerLeft = true;
  });
  const onData = (chunk: Buffer): void => {
    buffered = Buffer.concat([buffered, chunk]);
    const nl = buffered.indexOf(0x0a);
    if (nl < 0) {
      if (buffered.length > MAX_REQUEST) socket.destroy();
      return;
    }
    requestRead = true;
    socket.off('data', onData);
    // Reading on (bytes after the line are dropped) is how a hang-up gets noticed.
    if (!options.dropIfCallerLeft) socket.pause();
    let command: C;
    try {
      const raw: unknown = JSON.parse(buffered.subarray(0, nl).toString('utf8'));
      if (!requestEnvelope.safeParse(raw).success) throw new Error('not a request');
      // The request as sent, not zod's copy: a signature covers its exact text (key order included).
      command = raw as C;
    } catch {
      log.warn({ event: 'admin-malformed', from: socket.remoteAddress }, 'refused a malformed admin request');
      reply(socket, { ok: false, error: 'admin socket: malformed request', exitCode: 2 });
      return;
    }
    try {
      options.authorize?.(command as unknown as Record<string, unknown>);
    } catch (err) {
      log.warn({ event: 'admin-refused', from: socket.remoteAddress, cmd: command.cmd, err: (err as Error).message }, 'refused an admin request');
      reply(socket, { ok: false, error: (err as Error).message, exitCode: 2 });
      return;
    }
    const rest = buffered.subarray(nl + 1);
    let input: Readable | undefined;
    if (command.cmd === 'vol.receive') {
      const pass = new PassThrough();
      if (rest.length > 0) pass.write(rest);
      socket.pipe(pass);
      input = pass;
    }
    let output: Writable | undefined;
    if (command.cmd === 'vol.send') output = new FrameWriter(socket);
    const run = (): void => {
      log.info({ event: 'admin-command', cmd: command.cmd }, 'admin command');
      handler(command, { input, output }).then(
        async (result) => {
          if (output) socket.write('E');
          reply(socket, { ok: true, result });
        },
        (err: unknown) => {
          if (!(err instanceof UserError)) log.error({ event: 'admin-command-failed', cmd: command.cmd, err: (err as Error).stack }, 'admin command failed');
          const message = err instanceof UserError ? err.message : `internal error: ${(err as Error).message}`;
          // Mid-stream: 'X' tells the client what it got is not a whole stream.
          if (output) socket.write('X');
          reply(socket, { ok: false, error: message, exitCode: err instanceof UserError ? err.exitCode : 70 });
        },
      );
    };
    if (!options.dropIfCallerLeft) {
      run();
      return;
    }
    // A request read late (the process was slow) may have its caller's hang-up right behind it in the
    // kernel's buffer: libuv stops reading after a short read, so look once more before acting on it.
    setImmediate(() =>
      setImmediate(() => {
        if (!callerLeft) return run();
        log.warn({ event: 'admin-abandoned', from: socket.remoteAddress, cmd: command.cmd }, 'the caller hung up before its request ran: dropped');
        socket.destroy();
      }),
    );
  };
  socket.on('data', onData);
}

function reply(socket: net.Socket, answer: unknown): void {
  if (!socket.destroyed) socket.end(`${JSON.stringify(answer)}\n`);
}

/** Frames the send stream: u32 length + bytes. */
class FrameWriter extends Writable {
  constructor(private readonly socket: net.Socket) {
    super();
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, done: (err?: Error | null) => void): void {
    const head = Buffer.alloc(5);
    head[0] = 0x44; // 'D'
    head.writeUInt32LE(chunk.length, 1);
    this.socket.write(head);
    if (this.socket.write(chunk)) done();
    else this.socket.once('drain', () => done());
  }
}

/* ------------------------------------------------------------------ client */

export interface Answer {
  ok: boolean;
  result?: unknown;
  error?: string;
  exitCode?: number;
}

/**
 * Send `command` to the process holding the pool. `input` is streamed after
 * the request (receive); stream frames are written to `output` (send).
 * After `timeoutMs` without an answer the connection is reset, so a request
 * still on its way or unread at the server can no longer act after the
 * caller was told it failed (with `dropIfCallerLeft` at the server).
 */
export async function callAdmin(
  target: AdminTarget,
  command: Request,
  io: { input?: Readable; output?: Writable; what?: string; timeoutMs?: number } = {},
): Promise<unknown> {
  const socket = typeof target === 'string' ? net.createConnection(target) : net.createConnection({ host: target.host, port: target.port, localAddress: target.localAddress });
  const where = typeof target === 'string' ? target : `${target.host}:${target.port}`;
  const exchange = (async (): Promise<Answer> => {
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (err) => reject(new UserError(`cannot reach ${io.what ?? 'the process holding the pool'} at ${where} (${errnoCode(err) ?? err.message})`)));
    });
    socket.write(`${JSON.stringify(command)}\n`);
    if (io.input) {
      io.input.pipe(socket, { end: true });
    }
    return readAnswer(socket, io.output);
  })();
  let answer: Answer;
  if (io.timeoutMs === undefined) answer = await exchange;
  else {
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        // RST, not FIN: what is not yet sent is discarded, and the server sees the hang-up at once.
        if (typeof target === 'string' || socket.connecting || socket.destroyed) socket.destroy();
        else socket.resetAndDestroy();
        reject(new UserError(`${io.what ?? 'the process holding the pool'} at ${where} did not answer within ${io.timeoutMs} ms`));
      }, io.timeoutMs);
    });
    exchange.catch(() => undefined);
    try {
      answer = await Promise.race([exchange, timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }
  if (!answer.ok) throw new UserError(answer.error ?? 'the pool holder refused the command', answer.exitCode ?? 2);
  return answer.result;
}

async function readAnswer(socket: net.Socket, output: Writable | undefined): Promise<Answer> {
  let buf: Buffer = Buffer.alloc(0);
  let framing = output !== undefined;
  for await (const chunk of socket as AsyncIterable<Buffer>) {
    buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
    while (framing && buf.length > 0) {
      if (buf[0] === 0x45 || buf[0] === 0x58) {
        // 'E' complete, 'X' failed: the answer line follows either way.
        buf = buf.subarray(1);
        framing = false;
        break;
      }
      if (buf[0] !== 0x44) throw new UserError('the pool holder sent a malformed stream frame');
      if (buf.length < 5) break;
      const len = buf.readUInt32LE(1);
      if (buf.length < 5 + len) break;
      const frame = buf.subarray(5, 5 + len);
      buf = buf.subarray(5 + len);
      if (!output!.write(frame)) await new Promise<void>((resolve) => output!.once('drain', resolve));
    }
  }
  if (framing) throw new UserError('the pool holder closed the connection in the middle of the stream; the output is incomplete');
  const text = buf.toString('utf8').trim();
  if (!text) throw new UserError('the pool holder closed the connection without an answer');
  let answer: unknown;
  try {
    answer = JSON.parse(text);
  } catch {
    throw new UserError('the pool holder sent a malformed answer');
  }
  const parsed = answerSchema.safeParse(answer);
  if (!parsed.success) throw new UserError('the pool holder sent a malformed answer');
  return parsed.data;
}

