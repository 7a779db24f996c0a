/**
 * NBD client: fixed-newstyle handshake (NBD_OPT_GO, or the old
 * NBD_OPT_EXPORT_NAME), structured replies, base:allocation block status,
 * and pipelined requests keyed by 64-bit cookies.
 *
 * Spec: NetworkBlockDevice/nbd doc/proto.md.
 */
import * as net from 'node:net';
import {
  BASE_ALLOCATION,
  COMMAND_NAMES,
  IHAVEOPT,
  LIMITS,
  NBDMAGIC,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_PEEK_EXPORT,
  NBD_OPT_REPLY_MAGIC,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
  REQUEST_SIZE,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
} from './protocol.js';

/** Oldstyle negotiation magic (not in protocol.ts: only a client needs it). */
const CLISERV_MAGIC = 0x00420281861253n;
/** EPROTO: local code for protocol violations (not an NBD error value). */
const EPROTO = 71;
/** Payload cap for read/write when the server sent no block size (spec's interoperable 32 MiB). */
const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Largest option reply payload we accept (each reply carries one small item). */
const OPTION_REPLY_MAX = LIMITS.optionLengthMax;
/** Largest non-data structured chunk (block status descriptors, error messages). */
const CHUNK_MAX = 16 * 1024 * 1024;
/** How long NBD_OPT_ABORT and NBD_CMD_DISC wait for the server to close. */
const CLOSE_WAIT_MS = 2000;

export interface NbdConnectOptions {
  host?: string;
  port?: number;
  /** Unix domain socket path (instead of host/port). */
  path?: string;
  /** Default ''. */
  exportName?: string;
  /** Negotiate NBD_OPT_STRUCTURED_REPLY (default true). */
  structuredReplies?: boolean;
  /** Meta contexts to request when structured (default ['base:allocation']). */
  metaContexts?: string[];
  /** Use the old NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO. */
  useExportNameOption?: boolean;
  /** Requests on the wire at once; further calls wait in a queue (default 64). */
  maxInFlight?: number;
  /** Bound on TCP connect + handshake (default 10000). */
  connectTimeoutMs?: number;
}

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface NbdExportInfo {
  size: number;
  flags: number;
  blockSize?: NbdBlockSize;
  name?: string;
  description?: string;
}

export interface NbdExtent {
  length: number;
  flags: number;
}

const CODE_OF_ERRNO: Record<number, string> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
  [EPROTO]: 'EPROTO',
};
const ERRNO_OF_CODE: Record<string, number> = Object.fromEntries(
  Object.entries(CODE_OF_ERRNO).map(([n, c]) => [c, Number(n)]),
);

/** An NBD failure: a server error reply, an option refusal, a local refusal or a lost connection. */
export class NbdError extends Error {
  readonly errno: number;
  readonly code: string;
  constructor(message: string, code: string, errno?: number) {
    super(message);
    this.name = 'NbdError';
    this.code = code;
    this.errno = errno ?? ERRNO_OF_CODE[code] ?? NBD_EIO;
  }
}

const OPTION_NAMES: Record<number, string> = {
  [NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
  [NBD_OPT_ABORT]: 'NBD_OPT_ABORT',
  [NBD_OPT_LIST]: 'NBD_OPT_LIST',
  [NBD_OPT_PEEK_EXPORT]: 'NBD_OPT_PEEK_EXPORT',
  [NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS',
  [NBD_OPT_INFO]: 'NBD_OPT_INFO',
  [NBD_OPT_GO]: 'NBD_OPT_GO',
  [NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
  [NBD_OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
  [NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
  [NBD_OPT_EXTENDED_HEADERS]: 'NBD_OPT_EXTENDED_HEADERS',
};

const REP_ERR_NAMES: Record<number, [string, string]> = {
  [NBD_REP_ERR_UNSUP]: ['NBD_REP_ERR_UNSUP', 'ENOTSUP'],
  [NBD_REP_ERR_POLICY]: ['NBD_REP_ERR_POLICY', 'EPERM'],
  [NBD_REP_ERR_INVALID]: ['NBD_REP_ERR_INVALID', 'EINVAL'],
  [NBD_REP_ERR_PLATFORM]: ['NBD_REP_ERR_PLATFORM', 'ENOTSUP'],
  [NBD_REP_ERR_TLS_REQD]: ['NBD_REP_ERR_TLS_REQD', 'EPERM'],
  [NBD_REP_ERR_UNKNOWN]: ['NBD_REP_ERR_UNKNOWN', 'ENOENT'],
  [NBD_REP_ERR_SHUTDOWN]: ['NBD_REP_ERR_SHUTDOWN', 'ESHUTDOWN'],
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: ['NBD_REP_ERR_BLOCK_SIZE_REQD', 'EINVAL'],
  [NBD_REP_ERR_TOO_BIG]: ['NBD_REP_ERR_TOO_BIG', 'EOVERFLOW'],
};

function optName(opt: number): string {
  return OPTION_NAMES[opt] ?? `option ${opt}`;
}

function protoError(message: string): NbdError {
  return new NbdError(message, 'EPROTO', EPROTO);
}

function targetOf(opts: NbdConnectOptions): string {
  if (opts.path !== undefined) return `unix:${opts.path}`;
  const host = opts.host ?? 'localhost';
  return `${host.includes(':') ? `[${host}]` : host}:${opts.port ?? 10809}`;
}

function uriOf(opts: NbdConnectOptions): string {
  const name = encodeURIComponent(opts.exportName ?? '');
  if (opts.path !== undefined) return `nbd+unix:///${name}?socket=${opts.path}`;
  const host = opts.host ?? 'localhost';
  return `nbd://${host.includes(':') ? `[${host}]` : host}:${opts.port ?? 10809}/${name}`;
}

/**
 * Socket bytes kept as the chunks that arrived: no O(n^2) concatenation; a
 * contiguous copy is made only for small headers that straddle chunks, and
 * read payloads are copied once, straight into the caller's buffer.
 */
class ChunkQueue {
  private chunks: Buffer[] = [];
  private first = 0; // index of the first live chunk
  private pos = 0; // read position inside chunks[first]
  length = 0;

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.length += b.length;
  }

  /** The first n bytes (n <= length) as one buffer, without consuming. */
  peek(n: number): Buffer {
    const head = this.chunks[this.first];
    if (head.length - this.pos >= n) return head.subarray(this.pos, this.pos + n);
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, 0, n, false);
    return out;
  }

  take(n: number): Buffer {
    const b = this.peek(n);
    this.skip(n);
    return b;
  }

  skip(n: number): void {
    this.length -= n;
    while (n > 0) {
      const head = this.chunks[this.first];
      const left = head.length - this.pos;
      if (n < left) {
        this.pos += n;
        return;
      }
      n -= left;
      this.dropHead();
    }
  }

  /** Move n bytes from the front into target[at..]. */
  copyTo(target: Buffer, at: number, n: number): void {
    this.copyOut(target, at, n, true);
  }

  clear(): void {
    this.chunks = [];
    this.first = 0;
    this.pos = 0;
    this.length = 0;
  }

  private dropHead(): void {
    this.chunks[this.first] = EMPTY;
    this.first++;
    this.pos = 0;
    if (this.first === this.chunks.length) {
      this.chunks.length = 0;
      this.first = 0;
    } else if (this.first >= 64 && this.first * 2 >= this.chunks.length) {
      this.chunks = this.chunks.slice(this.first);
      this.first = 0;
    }
  }

  private copyOut(target: Buffer, at: number, n: number, consume: boolean): void {
    let i = this.first;
    let pos = this.pos;
    let done = 0;
    while (done < n) {
      const c = this.chunks[i];
      const step = Math.min(c.length - pos, n - done);
      c.copy(target, at + done, pos, pos + step);
      done += step;
      pos += step;
      if (pos === c.length) {
        i++;
        pos = 0;
      }
    }
    if (consume) this.skip(n);
  }
}
const EMPTY = Buffer.alloc(0);

/** Async reads over a socket, for the handshake phase. */
class HandshakeStream {
  readonly q = new ChunkQueue();
  private want = 0;
  private waiter: { resolve: () => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;
  /** Message used when the server closes the socket (set per phase). */
  closeMessage: string;

  constructor(readonly socket: net.Socket, readonly target: string) {
    this.closeMessage = `${target} closed the connection during the NBD handshake`;
    socket.on('data', this.onData);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
  }

  private readonly onData = (b: Buffer): void => {
    this.q.push(b);
    if (this.waiter && this.q.length >= this.want) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve();
    }
  };

  private readonly onError = (err: Error): void => {
    const code = (err as NodeJS.ErrnoException).code ?? 'EIO';
    this.fail(new NbdError(`connection to ${this.target} failed: ${err.message}`, code));
  };

  private readonly onClose = (): void => {
    this.fail(new NbdError(this.closeMessage, 'ECONNRESET', NBD_ESHUTDOWN));
  };

  fail(err: Error): void {
    if (!this.failure) this.failure = err;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(this.failure);
    }
  }

  async read(n: number): Promise<Buffer> {
    if (this.q.length < n) {
      if (this.failure) throw this.failure;
      this.want = n;
      await new Promise<void>((resolve, reject) => {
        this.waiter = { resolve, reject };
      });
    }
    return this.q.take(n);
  }

  /** Stop listening (the caller must attach its own 'error' listener first). */
  detach(): void {
    this.socket.off('data', this.onData);
    this.socket.off('error', this.onError);
    this.socket.off('close', this.onClose);
  }

  sendOption(opt: number, data: Buffer = EMPTY): void {
    const h = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    data.copy(h, OPTION_HEADER_SIZE);
    this.socket.write(h);
  }

  async readOptionReply(opt: number): Promise<{ type: number; data: Buffer }> {
    const h = await this.read(OPTION_REPLY_HEADER_SIZE);
    const magic = h.readBigUInt64BE(0);
    if (magic !== NBD_OPT_REPLY_MAGIC) {
      throw protoError(`${this.target}: bad option reply magic 0x${magic.toString(16)} to ${optName(opt)}`);
    }
    const got = h.readUInt32BE(8);
    if (got !== opt) throw protoError(`${this.target}: reply to ${optName(got)} while waiting for ${optName(opt)}`);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (len > OPTION_REPLY_MAX) throw protoError(`${this.target}: ${optName(opt)} reply of ${len} bytes is too large`);
    const data = len > 0 ? Buffer.from(await this.read(len)) : EMPTY;
    return { type, data };
  }
}

function openSocket(opts: NbdConnectOptions): net.Socket {
  const socket =
    opts.path !== undefined
      ? net.createConnection({ path: opts.path })
      : net.createConnection({ host: opts.host ?? 'localhost', port: opts.port ?? 10809 });
  socket.setNoDelay(true);
  return socket;
}

/**
 * Open a socket and run `body` on it within the connect timeout; on failure
 * the socket is destroyed.
 */
async function withHandshake<T>(
  opts: NbdConnectOptions,
  body: (s: HandshakeStream) => Promise<T>,
): Promise<T> {
  const target = targetOf(opts);
  const timeoutMs = opts.connectTimeoutMs ?? 10_000;
  const socket = openSocket(opts);
  const stream = new HandshakeStream(socket, target);
  const timer = setTimeout(() => {
    stream.fail(new NbdError(`timed out after ${timeoutMs} ms connecting to ${target}`, 'ETIMEDOUT'));
    socket.destroy();
  }, timeoutMs);
  try {
    await new Promise<void>((resolve, reject) => {
      if (!socket.connecting) return resolve();
      const onConnect = (): void => {
        socket.off('close', onClose);
        resolve();
      };
      const onClose = (): void => {
        socket.off('connect', onConnect);
        // The stream has recorded the real cause (error or timeout).
        stream.read(1).then(() => reject(new NbdError(`cannot connect to ${target}`, 'ECONNREFUSED')), reject);
      };
      socket.once('connect', onConnect);
      socket.once('close', onClose);
    });
    return await body(stream);
  } catch (err) {
    socket.destroy();
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

interface Greeting {
  fixed: boolean;
  noZeroes: boolean;
  /** Set for an oldstyle server (no options at all). */
  oldstyle?: { size: number; flags: number };
}

async function greet(s: HandshakeStream): Promise<Greeting> {
  const m1 = (await s.read(8)).readBigUInt64BE(0);
  if (m1 !== NBDMAGIC) throw protoError(`${s.target} is not an NBD server (bad magic 0x${m1.toString(16)})`);
  const m2 = (await s.read(8)).readBigUInt64BE(0);
  if (m2 === CLISERV_MAGIC) {
    const b = await s.read(8 + 4 + 124);
    return { fixed: false, noZeroes: false, oldstyle: { size: Number(b.readBigUInt64BE(0)), flags: b.readUInt32BE(8) & 0xffff } };
  }
  if (m2 !== IHAVEOPT) throw protoError(`${s.target}: unknown NBD handshake magic 0x${m2.toString(16)}`);
  const hflags = (await s.read(2)).readUInt16BE(0);
  const fixed = (hflags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (hflags & NBD_FLAG_NO_ZEROES) !== 0;
  const c = Buffer.allocUnsafe(4);
  c.writeUInt32BE((fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0), 0);
  s.socket.write(c);
  return { fixed, noZeroes };
}

function optionError(s: HandshakeStream, opt: number, type: number, data: Buffer, exportName?: string): NbdError {
  const [repName, code] = REP_ERR_NAMES[type] ?? [`error reply 0x${type.toString(16)}`, 'EINVAL'];
  const said = data.length > 0 ? `; server says: ${data.toString('utf8')}` : '';
  const exp = exportName === undefined ? '' : ` export "${exportName}"`;
  if (type === NBD_REP_ERR_UNKNOWN && exportName !== undefined) {
    return new NbdError(`export "${exportName}" not found on ${s.target} (${repName}${said})`, code);
  }
  const hint = type === NBD_REP_ERR_TLS_REQD ? ' (the server requires TLS, which this client does not support)' : '';
  return new NbdError(`${optName(opt)} for${exp || ' the server'} on ${s.target} failed: ${repName}${said}${hint}`, code);
}

function stringField(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length > LIMITS.stringBytesMax) throw new NbdError(`string "${s.slice(0, 40)}..." is longer than ${LIMITS.stringBytesMax} bytes`, 'EINVAL');
  return b;
}

/** Payload of NBD_OPT_INFO / NBD_OPT_GO. */
function infoRequest(name: string, infos: number[]): Buffer {
  const n = stringField(name);
  const b = Buffer.allocUnsafe(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

/** Send NBD_OPT_INFO or NBD_OPT_GO and collect NBD_REP_INFO until ACK. Returns null on NBD_REP_ERR_UNSUP. */
async function infoOrGo(s: HandshakeStream, opt: number, name: string, infos: number[]): Promise<NbdExportInfo | null> {
  s.sendOption(opt, infoRequest(name, infos));
  const result: Partial<NbdExportInfo> = {};
  for (let i = 0; ; i++) {
    if (i > LIMITS.optionsPerHandshakeMax) throw protoError(`${s.target}: too many replies to ${optName(opt)}`);
    const { type, data } = await s.readOptionReply(opt);
    if (type === NBD_REP_ACK) {
      if (result.size === undefined || result.flags === undefined) {
        throw protoError(`${s.target}: ${optName(opt)} succeeded without NBD_INFO_EXPORT`);
      }
      return result as NbdExportInfo;
    }
    if (type === NBD_REP_INFO) {
      if (data.length < 2) throw protoError(`${s.target}: short NBD_REP_INFO`);
      const info = data.readUInt16BE(0);
      switch (info) {
        case NBD_INFO_EXPORT:
          if (data.length !== 12) throw protoError(`${s.target}: NBD_INFO_EXPORT of ${data.length} bytes`);
          result.size = Number(data.readBigUInt64BE(2));
          result.flags = data.readUInt16BE(10);
          if (!Number.isSafeInteger(result.size)) throw protoError(`${s.target}: export size ${data.readBigUInt64BE(2)} is too large`);
          break;
        case NBD_INFO_NAME:
          result.name = data.toString('utf8', 2);
          break;
        case NBD_INFO_DESCRIPTION:
          result.description = data.toString('utf8', 2);
          break;
        case NBD_INFO_BLOCK_SIZE: {
          if (data.length !== 14) throw protoError(`${s.target}: NBD_INFO_BLOCK_SIZE of ${data.length} bytes`);
          const bs = { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
          if (bs.minimum < 1 || bs.minimum > bs.preferred || bs.preferred > bs.maximum || (bs.minimum & (bs.minimum - 1)) !== 0) {
            throw protoError(`${s.target}: invalid block sizes ${bs.minimum}/${bs.preferred}/${bs.maximum}`);
          }
          result.blockSize = bs;
          break;
        }
        default:
          break; // unknown information types are ignored, per spec
      }
      continue;
    }
    if (type & NBD_REP_FLAG_ERROR) {
      if (type === NBD_REP_ERR_UNSUP) return null;
      throw optionError(s, opt, type, data, name);
    }
    throw protoError(`${s.target}: unexpected reply type ${type} to ${optName(opt)}`);
  }
}

async function abortOptions(s: HandshakeStream): Promise<void> {
  s.sendOption(NBD_OPT_ABORT);
  s.closeMessage = 'closed';
  // The server should ACK and close; wait briefly, then close anyway.
  const closed = new Promise<void>((resolve) => {
    if (s.socket.destroyed) return resolve();
    s.socket.once('close', () => resolve());
  });
  s.socket.end();
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([closed, new Promise<void>((r) => (timer = setTimeout(r, CLOSE_WAIT_MS)))]);
  clearTimeout(timer);
  s.socket.destroy();
}

interface Negotiated {
  size: number;
  flags: number;
  structured: boolean;
  contexts: Map<string, number>;
  blockSize?: NbdBlockSize;
  description?: string;
}

async function negotiate(s: HandshakeStream, opts: NbdConnectOptions): Promise<Negotiated> {
  const name = opts.exportName ?? '';
  const g = await greet(s);
  if (g.oldstyle) return { ...g.oldstyle, structured: false, contexts: new Map() };
  let structured = false;
  const contexts = new Map<string, number>();
  if (g.fixed && (opts.structuredReplies ?? true)) {
    s.sendOption(NBD_OPT_STRUCTURED_REPLY);
    const r = await s.readOptionReply(NBD_OPT_STRUCTURED_REPLY);
    if (r.type === NBD_REP_ACK) structured = true;
    else if (!(r.type & NBD_REP_FLAG_ERROR)) throw protoError(`${s.target}: unexpected reply ${r.type} to NBD_OPT_STRUCTURED_REPLY`);
  }
  const wanted = opts.metaContexts ?? [BASE_ALLOCATION];
  if (structured && wanted.length > 0) {
    if (wanted.length > LIMITS.metaQueriesMax) throw new NbdError(`too many meta contexts (${wanted.length})`, 'EINVAL');
    const n = stringField(name);
    const qs = wanted.map(stringField);
    const b = Buffer.allocUnsafe(4 + n.length + 4 + qs.reduce((a, q) => a + 4 + q.length, 0));
    let p = b.writeUInt32BE(n.length, 0);
    p += n.copy(b, p);
    p = b.writeUInt32BE(qs.length, p);
    for (const q of qs) {
      p = b.writeUInt32BE(q.length, p);
      p += q.copy(b, p);
    }
    s.sendOption(NBD_OPT_SET_META_CONTEXT, b);
    for (let i = 0; ; i++) {
      if (i > LIMITS.metaQueriesMax * 4) throw protoError(`${s.target}: too many NBD_REP_META_CONTEXT replies`);
      const r = await s.readOptionReply(NBD_OPT_SET_META_CONTEXT);
      if (r.type === NBD_REP_ACK) break;
      if (r.type === NBD_REP_META_CONTEXT) {
        if (r.data.length < 5) throw protoError(`${s.target}: short NBD_REP_META_CONTEXT`);
        contexts.set(r.data.toString('utf8', 4), r.data.readUInt32BE(0));
        continue;
      }
      if (r.type & NBD_REP_FLAG_ERROR) {
        if (r.type === NBD_REP_ERR_UNKNOWN) throw optionError(s, NBD_OPT_SET_META_CONTEXT, r.type, r.data, name);
        contexts.clear(); // meta contexts are optional: carry on without block status
        break;
      }
      throw protoError(`${s.target}: unexpected reply ${r.type} to NBD_OPT_SET_META_CONTEXT`);
    }
  }
  if (g.fixed && !opts.useExportNameOption) {
    const info = await infoOrGo(s, NBD_OPT_GO, name, [NBD_INFO_BLOCK_SIZE]);
    if (info) return { size: info.size, flags: info.flags, structured, contexts, blockSize: info.blockSize, description: info.description };
    // NBD_REP_ERR_UNSUP: an old server; fall back to NBD_OPT_EXPORT_NAME.
  }
  s.closeMessage = `export "${name}" not found or refused on ${s.target} (server closed the connection after NBD_OPT_EXPORT_NAME)`;
  s.sendOption(NBD_OPT_EXPORT_NAME, stringField(name));
  const b = await s.read(10 + (g.noZeroes ? 0 : 124));
  const size = Number(b.readBigUInt64BE(0));
  if (!Number.isSafeInteger(size)) throw protoError(`${s.target}: export size ${b.readBigUInt64BE(0)} is too large`);
  return { size, flags: b.readUInt16BE(8), structured, contexts };
}

interface Pending {
  cmd: number;
  flags: number;
  offset: number;
  length: number;
  payload?: Buffer;
  resolve: () => void;
  reject: (e: Error) => void;
  /** NBD_CMD_READ: where the data goes. */
  into?: Buffer;
  /** NBD_CMD_READ (structured): covered [start, end) ranges relative to offset. */
  covered?: number[][];
  /** NBD_CMD_BLOCK_STATUS: context id we want and the extents received. */
  contextId?: number;
  extents?: NbdExtent[];
  error?: NbdError;
}

/** FIFO with O(1) shift. */
class Fifo<T> {
  private items: (T | undefined)[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(v: T): void {
    this.items.push(v);
  }
  shift(): T | undefined {
    if (this.head >= this.items.length) return undefined;
    const v = this.items[this.head];
    this.items[this.head++] = undefined;
    if (this.head === this.items.length) {
      this.items = [];
      this.head = 0;
    } else if (this.head >= 1024 && this.head * 2 >= this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return v;
  }
  drain(): T[] {
    const out = this.items.slice(this.head) as T[];
    this.items = [];
    this.head = 0;
    return out;
  }
}

export class NbdClient {
  readonly size: number;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  readonly blockSize?: NbdBlockSize;
  readonly metaContexts: ReadonlyMap<string, number>;
  readonly exportName: string;
  /** Export description, when the server sent one with NBD_OPT_GO. */
  readonly description?: string;
  /** "host:port" or "unix:PATH", for messages. */
  readonly target: string;
  /** NBD URI of the export (nbd://host:port/name or nbd+unix:///name?socket=path). */
  readonly uri: string;
  readonly maxInFlight: number;

  private readonly socket: net.Socket;
  private readonly q: ChunkQueue;
  private readonly inFlight = new Map<bigint, Pending>();
  private readonly waiting = new Fifo<Pending>();
  private readonly contextIds: Set<number>;
  private nextCookie = 1n;
  private corked = false;
  /** Set once the connection is unusable; every later request rejects with a copy of it. */
  private closedError: NbdError | undefined;
  private disconnecting = false;
  private disconnectPromise: Promise<void> | undefined;
  private idleWaiters: (() => void)[] = [];
  private closeWaiters: (() => void)[] = [];

  private constructor(socket: net.Socket, q: ChunkQueue, n: Negotiated, opts: NbdConnectOptions) {
    this.socket = socket;
    this.q = q;
    this.size = n.size;
    this.transmissionFlags = n.flags;
    this.structuredReplies = n.structured;
    this.blockSize = n.blockSize;
    this.description = n.description;
    this.metaContexts = n.contexts;
    this.contextIds = new Set(n.contexts.values());
    this.exportName = opts.exportName ?? '';
    this.target = targetOf(opts);
    this.uri = uriOf(opts);
    this.maxInFlight = opts.maxInFlight ?? LIMITS.inFlightPerConnectionMax;
    socket.on('data', this.onData);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
  }

  static async connect(opts: NbdConnectOptions): Promise<NbdClient> {
    const maxInFlight = opts.maxInFlight ?? LIMITS.inFlightPerConnectionMax;
    if (!Number.isSafeInteger(maxInFlight) || maxInFlight < 1) throw new NbdError(`maxInFlight must be a positive integer (got ${maxInFlight})`, 'EINVAL');
    return withHandshake(opts, async (s) => {
      const n = await negotiate(s, opts);
      const client = new NbdClient(s.socket, s.q, n, opts);
      s.detach();
      // Replies can only follow requests, but be safe about bytes already queued.
      if (s.q.length > 0) client.parse();
      return client;
    });
  }

  /** NBD_OPT_LIST then NBD_OPT_ABORT. */
  static async list(opts: NbdConnectOptions): Promise<{ name: string; description: string }[]> {
    return withHandshake(opts, async (s) => {
      const g = await greet(s);
      if (!g.fixed) throw new NbdError(`${s.target} is not a fixed-newstyle NBD server: it cannot list exports`, 'ENOTSUP');
      s.sendOption(NBD_OPT_LIST);
      const out: { name: string; description: string }[] = [];
      for (;;) {
        const { type, data } = await s.readOptionReply(NBD_OPT_LIST);
        if (type === NBD_REP_ACK) break;
        if (type === NBD_REP_SERVER) {
          if (data.length < 4) throw protoError(`${s.target}: short NBD_REP_SERVER`);
          const len = data.readUInt32BE(0);
          if (len > data.length - 4) throw protoError(`${s.target}: NBD_REP_SERVER name overruns the reply`);
          out.push({ name: data.toString('utf8', 4, 4 + len), description: data.toString('utf8', 4 + len) });
          if (out.length > 100_000) throw protoError(`${s.target}: too many exports listed`);
          continue;
        }
        if (type & NBD_REP_FLAG_ERROR) throw optionError(s, NBD_OPT_LIST, type, data);
        throw protoError(`${s.target}: unexpected reply ${type} to NBD_OPT_LIST`);
      }
      await abortOptions(s);
      return out;
    });
  }

  /** NBD_OPT_INFO (export size, flags, name, description, block size) then NBD_OPT_ABORT. */
  static async info(opts: NbdConnectOptions): Promise<NbdExportInfo> {
    return withHandshake(opts, async (s) => {
      const g = await greet(s);
      if (g.oldstyle) return { size: g.oldstyle.size, flags: g.oldstyle.flags };
      if (!g.fixed) throw new NbdError(`${s.target} is not a fixed-newstyle NBD server: NBD_OPT_INFO is not available`, 'ENOTSUP');
      const name = opts.exportName ?? '';
      const info = await infoOrGo(s, NBD_OPT_INFO, name, [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE]);
      if (!info) throw new NbdError(`${s.target} does not support NBD_OPT_INFO (NBD_REP_ERR_UNSUP)`, 'ENOTSUP');
      await abortOptions(s);
      return info;
    });
  }

  /** Requests sent and not yet answered. */
  get inFlightCount(): number {
    return this.inFlight.size;
  }

  /** Requests waiting for an in-flight slot. */
  get queuedCount(): number {
    return this.waiting.length;
  }

  /** True once the connection can no longer carry requests. */
  get closed(): boolean {
    return this.closedError !== undefined;
  }

  private has(flag: number): boolean {
    return (this.transmissionFlags & flag) !== 0;
  }

  async read(offset: number, length: number, opts?: { df?: boolean }): Promise<Buffer> {
    this.checkPayload('read', offset, length);
    const into = Buffer.allocUnsafe(length);
    await this.readInto(offset, into, opts);
    return into;
  }

  /** Read into.length bytes at offset straight into `into` (no extra copy). */
  async readInto(offset: number, into: Buffer, opts?: { df?: boolean }): Promise<void> {
    const length = into.length;
    this.checkPayload('read', offset, length);
    let flags = 0;
    if (opts?.df) {
      if (!this.has(NBD_FLAG_SEND_DF) || !this.structuredReplies) this.refuse('read', offset, length, 'the DF flag was not advertised (NBD_FLAG_SEND_DF)');
      flags |= NBD_CMD_FLAG_DF;
    }
    if (length === 0) return;
    return this.submit({ cmd: NBD_CMD_READ, flags, offset, length, into, covered: this.structuredReplies ? [] : undefined });
  }

  async write(offset: number, data: Buffer, opts?: { fua?: boolean }): Promise<void> {
    this.checkPayload('write', offset, data.length);
    this.checkWritable('write', offset, data.length);
    const flags = this.fuaFlag('write', offset, data.length, opts?.fua);
    if (data.length === 0) return;
    return this.submit({ cmd: NBD_CMD_WRITE, flags, offset, length: data.length, payload: data });
  }

  async flush(): Promise<void> {
    if (!this.has(NBD_FLAG_SEND_FLUSH)) this.refuse('flush', 0, 0, 'the server did not advertise NBD_FLAG_SEND_FLUSH');
    return this.submit({ cmd: NBD_CMD_FLUSH, flags: 0, offset: 0, length: 0 });
  }

  async trim(offset: number, length: number, opts?: { fua?: boolean }): Promise<void> {
    this.checkRange('trim', offset, length);
    this.checkWritable('trim', offset, length);
    if (!this.has(NBD_FLAG_SEND_TRIM)) this.refuse('trim', offset, length, 'the server did not advertise NBD_FLAG_SEND_TRIM');
    const flags = this.fuaFlag('trim', offset, length, opts?.fua);
    if (length === 0) return;
    return this.submit({ cmd: NBD_CMD_TRIM, flags, offset, length });
  }

  async writeZeroes(offset: number, length: number, opts?: { fua?: boolean; noHole?: boolean; fastZero?: boolean }): Promise<void> {
    const what = 'write-zeroes';
    this.checkRange(what, offset, length);
    this.checkWritable(what, offset, length);
    if (!this.has(NBD_FLAG_SEND_WRITE_ZEROES)) this.refuse(what, offset, length, 'the server did not advertise NBD_FLAG_SEND_WRITE_ZEROES');
    let flags = this.fuaFlag(what, offset, length, opts?.fua);
    if (opts?.noHole) flags |= NBD_CMD_FLAG_NO_HOLE;
    if (opts?.fastZero) {
      if (!this.has(NBD_FLAG_SEND_FAST_ZERO)) this.refuse(what, offset, length, 'the server did not advertise NBD_FLAG_SEND_FAST_ZERO');
      flags |= NBD_CMD_FLAG_FAST_ZERO;
    }
    if (length === 0) return;
    return this.submit({ cmd: NBD_CMD_WRITE_ZEROES, flags, offset, length });
  }

  async cache(offset: number, length: number): Promise<void> {
    this.checkRange('cache', offset, length);
    if (!this.has(NBD_FLAG_SEND_CACHE)) this.refuse('cache', offset, length, 'the server did not advertise NBD_FLAG_SEND_CACHE');
    if (length === 0) return;
    return this.submit({ cmd: NBD_CMD_CACHE, flags: 0, offset, length });
  }

  /**
   * Extents of `context` (default base:allocation) from offset, clamped to
   * the requested range. With reqOne the server returns a single extent.
   */
  async blockStatus(offset: number, length: number, opts?: { reqOne?: boolean; context?: string }): Promise<NbdExtent[]> {
    const what = 'block-status';
    this.checkRange(what, offset, length);
    if (length === 0) this.refuse(what, offset, length, 'length must be positive', 'EINVAL');
    const context = opts?.context ?? BASE_ALLOCATION;
    if (!this.structuredReplies) this.refuse(what, offset, length, 'structured replies were not negotiated');
    const contextId = this.metaContexts.get(context);
    if (contextId === undefined) this.refuse(what, offset, length, `meta context "${context}" was not negotiated`);
    const p: Pending = {
      cmd: NBD_CMD_BLOCK_STATUS,
      flags: opts?.reqOne ? NBD_CMD_FLAG_REQ_ONE : 0,
      offset,
      length,
      contextId,
      resolve: noop,
      reject: noop,
    };
    await this.submit(p);
    return p.extents ?? [];
  }

  /** Wait for every queued and in-flight request, send NBD_CMD_DISC, close. */
  disconnect(): Promise<void> {
    if (this.disconnectPromise) return this.disconnectPromise;
    this.disconnecting = true;
    this.disconnectPromise = (async () => {
      while (!this.closedError && (this.inFlight.size > 0 || this.waiting.length > 0)) {
        await new Promise<void>((r) => this.idleWaiters.push(r));
      }
      if (this.closedError) {
        this.socket.destroy();
        return;
      }
      this.closedError = new NbdError(`${this.target}: the client has disconnected`, 'ESHUTDOWN');
      const h = this.header(NBD_CMD_DISC, 0, this.nextCookie++, 0, 0);
      const closed = new Promise<void>((r) => {
        if (this.socket.destroyed) r();
        else this.closeWaiters.push(r);
      });
      this.socket.end(h);
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([closed, new Promise<void>((r) => (timer = setTimeout(r, CLOSE_WAIT_MS)))]);
      clearTimeout(timer);
      this.socket.destroy();
    })();
    return this.disconnectPromise;
  }

  /** Hard close: every pending request rejects at once. */
  close(): void {
    this.fail(new NbdError(`${this.target}: connection closed by the client`, 'ESHUTDOWN'));
  }

  // ---- validation ----------------------------------------------------------

  private refuse(what: string, offset: number, length: number, why: string, code = 'ENOTSUP'): never {
    throw new NbdError(`${what} ${offset}+${length} on ${this.uri}: ${why}`, code);
  }

  private checkRange(what: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      this.refuse(what, offset, length, `range is outside the export (size ${this.size})`, 'EINVAL');
    }
    if (length > 0xffffffff) this.refuse(what, offset, length, 'length does not fit in 32 bits', 'EINVAL');
    const min = this.blockSize?.minimum ?? 1;
    if (min > 1 && (offset % min !== 0 || length % min !== 0)) {
      this.refuse(what, offset, length, `not aligned to the minimum block size ${min}`, 'EINVAL');
    }
  }

  private checkPayload(what: string, offset: number, length: number): void {
    this.checkRange(what, offset, length);
    const max = this.blockSize?.maximum ?? DEFAULT_MAX_PAYLOAD;
    if (length > max) this.refuse(what, offset, length, `length exceeds the maximum block size ${max}`, 'EINVAL');
  }

  private checkWritable(what: string, offset: number, length: number): void {
    if (this.has(NBD_FLAG_READ_ONLY)) this.refuse(what, offset, length, 'the export is read-only', 'EPERM');
  }

  private fuaFlag(what: string, offset: number, length: number, fua: boolean | undefined): number {
    if (!fua) return 0;
    if (!this.has(NBD_FLAG_SEND_FUA)) this.refuse(what, offset, length, 'the server did not advertise NBD_FLAG_SEND_FUA');
    return NBD_CMD_FLAG_FUA;
  }

  // ---- sending -------------------------------------------------------------

  private submit(p: Omit<Pending, 'resolve' | 'reject'> & Partial<Pick<Pending, 'resolve' | 'reject'>>): Promise<void> {
    const req = p as Pending;
    if (this.closedError) return Promise.reject(this.copyClosed());
    if (this.disconnecting) return Promise.reject(new NbdError(`${this.target}: disconnect() is in progress`, 'ESHUTDOWN'));
    return new Promise<void>((resolve, reject) => {
      req.resolve = resolve;
      req.reject = reject;
      if (this.inFlight.size < this.maxInFlight) this.send(req);
      else this.waiting.push(req);
    });
  }

  private copyClosed(): NbdError {
    const e = this.closedError as NbdError;
    return new NbdError(e.message, e.code, e.errno);
  }

  private header(cmd: number, flags: number, cookie: bigint, offset: number, length: number): Buffer {
    const h = Buffer.allocUnsafe(REQUEST_SIZE);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(cmd, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    return h;
  }

  private send(p: Pending): void {
    const cookie = this.nextCookie++;
    this.inFlight.set(cookie, p);
    // Cork until the end of this tick: pipelined requests leave in one writev.
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(this.header(p.cmd, p.flags, cookie, p.offset, p.length));
    if (p.payload) this.socket.write(p.payload);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  // ---- receiving -----------------------------------------------------------

  private readonly onData = (b: Buffer): void => {
    if (this.closedError) return;
    this.q.push(b);
    this.parse();
  };

  private readonly onError = (err: Error): void => {
    this.fail(new NbdError(`connection to ${this.target} failed: ${err.message}`, 'ESHUTDOWN'));
  };

  private readonly onClose = (): void => {
    this.fail(new NbdError(`connection to ${this.target} was closed by the server`, 'ESHUTDOWN'));
    for (const w of this.closeWaiters.splice(0)) w();
  };

  /** Hard disconnect: reject everything pending and every later request. */
  private fail(err: NbdError): void {
    if (!this.closedError) this.closedError = err;
    this.socket.destroy();
    this.q.clear();
    const pending = [...this.inFlight.values(), ...this.waiting.drain()];
    this.inFlight.clear();
    for (const p of pending) p.reject(new NbdError(err.message, err.code, err.errno));
    for (const w of this.idleWaiters.splice(0)) w();
  }

  private parse(): void {
    try {
      this.parseLoop();
    } catch (err) {
      this.fail(err instanceof NbdError ? err : protoError(`${this.target}: ${(err as Error).message}`));
    }
  }

  private parseLoop(): void {
    const q = this.q;
    while (!this.closedError && q.length >= 4) {
      const magic = q.peek(4).readUInt32BE(0);
      if (magic === NBD_SIMPLE_REPLY_MAGIC) {
        if (q.length < SIMPLE_REPLY_SIZE) return;
        const h = q.peek(SIMPLE_REPLY_SIZE);
        const error = h.readUInt32BE(4);
        const cookie = h.readBigUInt64BE(8);
        const p = this.inFlight.get(cookie);
        if (!p) throw protoError(`${this.target}: protocol error: simple reply for unknown cookie ${cookie}`);
        if (p.cmd === NBD_CMD_READ && error === 0) {
          if (this.structuredReplies) throw protoError(`${this.target}: protocol error: simple reply with data to a read after structured replies were negotiated`);
          if (q.length < SIMPLE_REPLY_SIZE + p.length) return;
          q.skip(SIMPLE_REPLY_SIZE);
          q.copyTo(p.into as Buffer, 0, p.length);
        } else {
          q.skip(SIMPLE_REPLY_SIZE);
        }
        this.inFlight.delete(cookie);
        if (error !== 0) this.settle(p, this.commandError(p, error, ''));
        else if (p.cmd === NBD_CMD_BLOCK_STATUS) this.settle(p, protoError(`${this.describe(p)}: server sent a simple reply without extents`));
        else this.settle(p);
        continue;
      }
      if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
        if (!this.structuredReplies) throw protoError(`${this.target}: protocol error: structured reply although structured replies were not negotiated`);
        if (q.length < STRUCTURED_REPLY_HEADER_SIZE) return;
        const h = q.peek(STRUCTURED_REPLY_HEADER_SIZE);
        const flags = h.readUInt16BE(4);
        const type = h.readUInt16BE(6);
        const cookie = h.readBigUInt64BE(8);
        const len = h.readUInt32BE(16);
        const p = this.inFlight.get(cookie);
        if (!p) throw protoError(`${this.target}: protocol error: structured reply chunk for unknown cookie ${cookie}`);
        const max = type === NBD_REPLY_TYPE_OFFSET_DATA ? 8 + p.length : CHUNK_MAX;
        if (len > max) throw protoError(`${this.describe(p)}: protocol error: reply chunk type ${type} of ${len} bytes is too large`);
        if (q.length < STRUCTURED_REPLY_HEADER_SIZE + len) return;
        q.skip(STRUCTURED_REPLY_HEADER_SIZE);
        this.chunk(p, flags, type, len);
        if (flags & NBD_REPLY_FLAG_DONE) {
          this.inFlight.delete(cookie);
          this.finish(p);
        }
        continue;
      }
      throw protoError(`${this.target}: protocol error: bad reply magic 0x${magic.toString(16)}`);
    }
  }

  /** Consume one structured chunk payload of `len` bytes. */
  private chunk(p: Pending, flags: number, type: number, len: number): void {
    const q = this.q;
    const bad = (why: string): never => {
      throw protoError(`${this.describe(p)}: protocol error: ${why}`);
    };
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (len !== 0) bad(`NBD_REPLY_TYPE_NONE with ${len} bytes`);
        if (!(flags & NBD_REPLY_FLAG_DONE)) bad('NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE');
        return;
      case NBD_REPLY_TYPE_OFFSET_DATA: {
        if (p.cmd !== NBD_CMD_READ) bad('NBD_REPLY_TYPE_OFFSET_DATA to a non-read command');
        if (len <= 8) bad(`NBD_REPLY_TYPE_OFFSET_DATA of ${len} bytes`);
        const rel = Number(q.peek(8).readBigUInt64BE(0)) - p.offset;
        const n = len - 8;
        if (rel < 0 || rel + n > p.length) bad(`data chunk at ${rel + p.offset}+${n} is outside the request`);
        q.skip(8);
        q.copyTo(p.into as Buffer, rel, n);
        p.covered?.push([rel, rel + n]);
        return;
      }
      case NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (p.cmd !== NBD_CMD_READ) bad('NBD_REPLY_TYPE_OFFSET_HOLE to a non-read command');
        if (len !== 12) bad(`NBD_REPLY_TYPE_OFFSET_HOLE of ${len} bytes`);
        const b = q.take(12);
        const rel = Number(b.readBigUInt64BE(0)) - p.offset;
        const n = b.readUInt32BE(8);
        if (n === 0 || rel < 0 || rel + n > p.length) bad(`hole chunk at ${rel + p.offset}+${n} is outside the request`);
        (p.into as Buffer).fill(0, rel, rel + n);
        p.covered?.push([rel, rel + n]);
        return;
      }
      case NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (p.cmd !== NBD_CMD_BLOCK_STATUS) bad('NBD_REPLY_TYPE_BLOCK_STATUS to a non-block-status command');
        if (len < 12 || (len - 4) % 8 !== 0) bad(`NBD_REPLY_TYPE_BLOCK_STATUS of ${len} bytes`);
        const b = q.take(len);
        const id = b.readUInt32BE(0);
        if (!this.contextIds.has(id)) bad(`block status for unknown meta context id ${id}`);
        if (id !== p.contextId || p.extents) return;
        const extents: NbdExtent[] = [];
        const end = p.length;
        let at = 0;
        for (let i = 4; i < len && at < end; i += 8) {
          const length = b.readUInt32BE(i);
          if (length === 0) bad('block status extent of length 0');
          const clamped = Math.min(length, end - at);
          extents.push({ length: clamped, flags: b.readUInt32BE(i + 4) });
          at += clamped;
        }
        p.extents = extents;
        return;
      }
      default: {
        if (!(type & 0x8000)) {
          q.skip(len);
          bad(`unknown reply chunk type ${type}`);
        }
        // NBD_REPLY_TYPE_ERROR, _ERROR_OFFSET, and unknown error types.
        if (len < 6) bad(`error chunk of ${len} bytes`);
        const b = q.take(len);
        const errno = b.readUInt32BE(0);
        const mlen = b.readUInt16BE(4);
        if (6 + mlen > len) bad('error message overruns the chunk');
        if (errno === 0) bad('error chunk with error value 0');
        let msg = b.toString('utf8', 6, 6 + mlen);
        if (type === NBD_REPLY_TYPE_ERROR_OFFSET) {
          if (len !== 6 + mlen + 8) bad(`NBD_REPLY_TYPE_ERROR_OFFSET of ${len} bytes`);
          const at = Number(b.readBigUInt64BE(6 + mlen));
          if (at < p.offset || at >= p.offset + p.length) bad(`error offset ${at} is outside the request`);
          msg = msg ? `${msg} (at offset ${at})` : `at offset ${at}`;
        }
        if (!p.error) p.error = this.commandError(p, errno, msg);
        return;
      }
    }
  }

  /** The final chunk arrived: check the reply as a whole and settle. */
  private finish(p: Pending): void {
    if (p.error) return this.settle(p, p.error);
    if (p.cmd === NBD_CMD_READ && p.covered) {
      const ranges = p.covered.sort((a, b) => a[0] - b[0]);
      let at = 0;
      for (const [s, e] of ranges) {
        if (s !== at) {
          return this.settle(p, protoError(`${this.describe(p)}: server reply ${s < at ? 'overlaps itself' : 'leaves a gap'} at offset ${p.offset + Math.min(s, at)}`));
        }
        at = e;
      }
      if (at !== p.length) return this.settle(p, protoError(`${this.describe(p)}: server reply covers only ${at} of ${p.length} bytes`));
    }
    if (p.cmd === NBD_CMD_BLOCK_STATUS && (!p.extents || p.extents.length === 0)) {
      return this.settle(p, protoError(`${this.describe(p)}: server sent no extents for the requested meta context`));
    }
    this.settle(p);
  }

  private settle(p: Pending, err?: NbdError): void {
    if (err) p.reject(err);
    else p.resolve();
    // Refill the pipeline.
    while (this.inFlight.size < this.maxInFlight && !this.closedError) {
      const next = this.waiting.shift();
      if (!next) break;
      this.send(next);
    }
    if (this.inFlight.size === 0 && this.waiting.length === 0) {
      for (const w of this.idleWaiters.splice(0)) w();
    }
  }

  private describe(p: Pending): string {
    return `${COMMAND_NAMES[p.cmd] ?? `command ${p.cmd}`} ${p.offset}+${p.length} on ${this.uri}`;
  }

  private commandError(p: Pending, errno: number, msg: string): NbdError {
    const code = CODE_OF_ERRNO[errno] ?? 'EIO';
    const known = CODE_OF_ERRNO[errno] ? code : `unknown NBD error ${errno}`;
    return new NbdError(`${this.describe(p)}: server returned ${known}${msg ? `: ${msg}` : ''}`, code, errno);
  }
}

function noop(): void {}
