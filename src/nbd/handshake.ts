/**
 * The fixed-newstyle handshake (doc/proto.md "Handshake"): greeting, client
 * flags, then option haggling until GO / EXPORT_NAME selects an export or the
 * client aborts. Every option gets a reply; malformed ones an error reply,
 * so a confused client can go on. Only a broken framing (bad magic, unknown
 * client flags, a runaway number of options) ends the connection.
 */
import type { Logger } from '../util/log.js';
import { ByteQueue } from './bytequeue.js';
import type { ExportProvider, NbdExport } from './exports.js';
import * as P from './protocol.js';

export interface HandshakeIO {
  readonly queue: ByteQueue;
  /** Resolve once `queue` holds n bytes; reject if the connection closes. */
  need(n: number): Promise<void>;
  write(data: Buffer): void;
}

export interface Negotiated {
  export: NbdExport;
  structuredReplies: boolean;
  /** base:allocation was selected for this export. */
  baseAllocation: boolean;
  transmissionFlags: number;
}

/** A violation that leaves us unable to continue: hard disconnect. */
export class ProtocolError extends Error {}

export interface HandshakeOptions {
  shuttingDown(): boolean;
  /** TLS via NBD_OPT_STARTTLS; absent = NOTLS mode (STARTTLS refused with ERR_POLICY). */
  tls?: HandshakeTls;
}

export interface HandshakeTls {
  /** FORCEDTLS: every option but STARTTLS and ABORT is refused until TLS is up. */
  required: boolean;
  /** Switch the connection to TLS (called right after the ACK is written). */
  upgrade(): Promise<void>;
}

export function transmissionFlagsFor(exp: NbdExport, structuredReplies: boolean): number {
  const caps = exp.device.capabilities;
  const readOnly = exp.readOnly || caps.readOnly;
  let flags = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_CACHE;
  if (readOnly) flags |= P.NBD_FLAG_READ_ONLY;
  else {
    flags |= P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO;
    if (caps.trim) flags |= P.NBD_FLAG_SEND_TRIM;
  }
  if (structuredReplies) flags |= P.NBD_FLAG_SEND_DF;
  if (caps.multiConn) flags |= P.NBD_FLAG_CAN_MULTI_CONN;
  if (caps.rotational) flags |= P.NBD_FLAG_ROTATIONAL;
  return flags;
}

export async function negotiate(
  io: HandshakeIO,
  exports: ExportProvider,
  log: Logger,
  options: HandshakeOptions,
): Promise<Negotiated | null> {
  const greeting = Buffer.allocUnsafe(18);
  greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
  greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
  greeting.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
  io.write(greeting);

  await io.need(4);
  const clientFlags = io.queue.take(4).readUInt32BE(0);
  if (clientFlags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) {
    throw new ProtocolError(`unknown client flags 0x${clientFlags.toString(16)}`);
  }
  const noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;

  let structuredReplies = false;
  let tlsActive = false;
  /** Export name the last SET_META_CONTEXT referred to, and whether it selected base:allocation. */
  let meta: { exportName: string; baseAllocation: boolean } | null = null;

  const reply = (option: number, type: number, data?: Buffer): void => {
    const header = Buffer.allocUnsafe(P.OPTION_REPLY_HEADER_SIZE);
    header.writeBigUInt64BE(P.NBD_OPT_REPLY_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(data?.length ?? 0, 16);
    io.write(data && data.length ? Buffer.concat([header, data]) : header);
  };
  const replyError = (option: number, type: number, message: string): void => {
    log.debug({ event: 'option refused', option, type, message });
    reply(option, type, Buffer.from(message));
  };

  for (let count = 0; ; count++) {
    if (count >= P.LIMITS.optionsPerHandshakeMax) {
      throw new ProtocolError(`more than ${P.LIMITS.optionsPerHandshakeMax} options: giving up on this client`);
    }
    await io.need(P.OPTION_HEADER_SIZE);
    const header = io.queue.take(P.OPTION_HEADER_SIZE);
    if (header.readBigUInt64BE(0) !== P.IHAVEOPT) throw new ProtocolError('bad option magic');
    const option = header.readUInt32BE(8);
    const length = header.readUInt32BE(12);

    if (length > P.LIMITS.optionLengthMax) {
      // Too big to buffer: skip it as it streams in, then refuse it.
      if (option === P.NBD_OPT_EXPORT_NAME) throw new ProtocolError(`export name of ${length} bytes`);
      for (let left = length; left > 0; ) {
        await io.need(1);
        const n = Math.min(left, io.queue.length);
        io.queue.skip(n);
        left -= n;
      }
      replyError(option, P.NBD_REP_ERR_TOO_BIG, `option of ${length} bytes is larger than ${P.LIMITS.optionLengthMax}`);
      continue;
    }
    await io.need(length);
    const data = Buffer.from(io.queue.take(length)); // small; own copy

    if (options.shuttingDown() && option !== P.NBD_OPT_ABORT) {
      if (option === P.NBD_OPT_EXPORT_NAME) throw new ProtocolError('server is shutting down');
      replyError(option, P.NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
      continue;
    }

    if (options.tls?.required && !tlsActive && option !== P.NBD_OPT_STARTTLS && option !== P.NBD_OPT_ABORT) {
      if (option === P.NBD_OPT_EXPORT_NAME) throw new ProtocolError('client chose an export without TLS, which this server requires');
      replyError(option, P.NBD_REP_ERR_TLS_REQD, 'this server requires TLS: use NBD_OPT_STARTTLS first');
      continue;
    }

    switch (option) {
      case P.NBD_OPT_EXPORT_NAME: {
        const name = data.toString('utf8');
        const exp = exports.get(name);
        if (!exp) {
          log.info({ event: 'export not found', export: name });
          throw new ProtocolError(`export "${name}" not found`);
        }
        const flags = transmissionFlagsFor(exp, structuredReplies);
        const out = Buffer.alloc(noZeroes ? 10 : 134);
        out.writeBigUInt64BE(BigInt(exp.device.size), 0);
        out.writeUInt16BE(flags, 8);
        io.write(out);
        return {
          export: exp,
          structuredReplies,
          baseAllocation: meta !== null && meta.baseAllocation && meta.exportName === name,
          transmissionFlags: flags,
        };
      }

      case P.NBD_OPT_ABORT:
        reply(option, P.NBD_REP_ACK);
        return null;

      case P.NBD_OPT_LIST: {
        if (length !== 0) {
          replyError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
          break;
        }
        for (const exp of exports.list()) {
          const name = Buffer.from(exp.name);
          const desc = Buffer.from(exp.description ?? '');
          const body = Buffer.allocUnsafe(4 + name.length + desc.length);
          body.writeUInt32BE(name.length, 0);
          name.copy(body, 4);
          desc.copy(body, 4 + name.length);
          reply(option, P.NBD_REP_SERVER, body);
        }
        reply(option, P.NBD_REP_ACK);
        break;
      }

      case P.NBD_OPT_STARTTLS:
        if (!options.tls) replyError(option, P.NBD_REP_ERR_POLICY, 'TLS is not configured on this server');
        else if (tlsActive) replyError(option, P.NBD_REP_ERR_INVALID, 'TLS is already active');
        else if (length !== 0) replyError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
        else {
          reply(option, P.NBD_REP_ACK);
          await options.tls.upgrade();
          tlsActive = true;
          // Everything negotiated in clear text is void after the upgrade (spec, STARTTLS).
          structuredReplies = false;
          meta = null;
        }
        break;

      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO: {
        const parsed = parseInfoRequest(data);
        if (typeof parsed === 'string') {
          replyError(option, P.NBD_REP_ERR_INVALID, parsed);
          break;
        }
        const exp = exports.get(parsed.name);
        if (!exp) {
          replyError(option, P.NBD_REP_ERR_UNKNOWN, `export "${parsed.name}" not found`);
          break;
        }
        const flags = transmissionFlagsFor(exp, structuredReplies);
        const info = Buffer.allocUnsafe(12);
        info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
        info.writeBigUInt64BE(BigInt(exp.device.size), 2);
        info.writeUInt16BE(flags, 10);
        reply(option, P.NBD_REP_INFO, info);
        if (parsed.requests.includes(P.NBD_INFO_NAME) || parsed.name === '') {
          reply(option, P.NBD_REP_INFO, Buffer.concat([u16(P.NBD_INFO_NAME), Buffer.from(exp.name)]));
        }
        if (parsed.requests.includes(P.NBD_INFO_DESCRIPTION) && exp.description) {
          reply(option, P.NBD_REP_INFO, Buffer.concat([u16(P.NBD_INFO_DESCRIPTION), Buffer.from(exp.description)]));
        }
        // Sent even when not asked: our limits are the spec's defaults, so a
        // client that ignores them is still correct.
        const bs = exp.device.blockSize;
        const block = Buffer.allocUnsafe(14);
        block.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
        block.writeUInt32BE(bs.minimum, 2);
        block.writeUInt32BE(bs.preferred, 6);
        block.writeUInt32BE(Math.min(bs.maximum, P.LIMITS.requestBytesMax), 10);
        reply(option, P.NBD_REP_INFO, block);
        reply(option, P.NBD_REP_ACK);
        if (option === P.NBD_OPT_GO) {
          return {
            export: exp,
            structuredReplies,
            baseAllocation: meta !== null && meta.baseAllocation && (meta.exportName === parsed.name || exports.get(meta.exportName) === exp),
            transmissionFlags: flags,
          };
        }
        break;
      }

      case P.NBD_OPT_STRUCTURED_REPLY:
        if (length !== 0) replyError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        else if (structuredReplies) replyError(option, P.NBD_REP_ERR_INVALID, 'structured replies are already negotiated');
        else {
          structuredReplies = true;
          reply(option, P.NBD_REP_ACK);
        }
        break;

      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT: {
        const set = option === P.NBD_OPT_SET_META_CONTEXT;
        if (set) meta = null; // "replaces all previously-set contexts, including when this fails"
        if (!structuredReplies) {
          replyError(option, P.NBD_REP_ERR_INVALID, 'negotiate structured replies first');
          break;
        }
        const parsed = parseMetaRequest(data);
        if (typeof parsed === 'string') {
          replyError(option, P.NBD_REP_ERR_INVALID, parsed);
          break;
        }
        if (!exports.get(parsed.name)) {
          replyError(option, P.NBD_REP_ERR_UNKNOWN, `export "${parsed.name}" not found`);
          break;
        }
        let selected = false;
        if (!set && parsed.queries.length === 0) selected = true;
        for (const q of parsed.queries) {
          if (q === P.BASE_ALLOCATION || (!set && q === 'base:')) selected = true;
        }
        if (selected) {
          const name = Buffer.from(P.BASE_ALLOCATION);
          const body = Buffer.allocUnsafe(4 + name.length);
          body.writeUInt32BE(set ? P.BASE_ALLOCATION_ID : 0, 0);
          name.copy(body, 4);
          reply(option, P.NBD_REP_META_CONTEXT, body);
        }
        if (set) meta = { exportName: parsed.name, baseAllocation: selected };
        reply(option, P.NBD_REP_ACK);
        break;
      }

      default:
        replyError(option, P.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }
}

function u16(v: number): Buffer {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(v, 0);
  return b;
}

/** NBD_OPT_INFO / GO data: u32 name length, name, u16 count, u16 requests[]. */
function parseInfoRequest(data: Buffer): { name: string; requests: number[] } | string {
  if (data.length < 6) return 'option data too short';
  const nameLength = data.readUInt32BE(0);
  if (nameLength > P.LIMITS.stringBytesMax || 4 + nameLength + 2 > data.length) return 'export name length does not fit the option';
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 4 + nameLength + 2 + 2 * count) return 'information request count does not match the option length';
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(4 + nameLength + 2 + 2 * i));
  return { name, requests };
}

/** LIST/SET_META_CONTEXT data: u32 name length, name, u32 count, (u32 len, query)[]. */
function parseMetaRequest(data: Buffer): { name: string; queries: string[] } | string {
  if (data.length < 8) return 'option data too short';
  const nameLength = data.readUInt32BE(0);
  if (nameLength > P.LIMITS.stringBytesMax || 4 + nameLength + 4 > data.length) return 'export name length does not fit the option';
  const name = data.toString('utf8', 4, 4 + nameLength);
  let pos = 4 + nameLength;
  const count = data.readUInt32BE(pos);
  pos += 4;
  if (count > P.LIMITS.metaQueriesMax) return `more than ${P.LIMITS.metaQueriesMax} queries`;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) return 'query length does not fit the option';
    const qLength = data.readUInt32BE(pos);
    pos += 4;
    if (qLength > P.LIMITS.stringBytesMax || pos + qLength > data.length) return 'query does not fit the option';
    const q = data.toString('utf8', pos, pos + qLength);
    pos += qLength;
    if (!q.includes(':')) return `query "${q}" has no namespace`;
    queries.push(q);
  }
  if (pos !== data.length) return 'trailing bytes after the queries';
  return { name, queries };
}
