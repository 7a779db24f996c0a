/**
 * How the CLI and a peer node reach a node daemon: a command becomes its
 * route's HTTP request (routes.ts), sent with the cluster token over TLS
 * checked against the cluster CA.
 */
import http from 'node:http';
import https from 'node:https';
import type { Readable, Writable } from 'node:stream';
import { UserError, errnoCode } from '../util/errors.js';
import { requestOf } from './routes.js';

export interface ApiTarget {
  host: string;
  port: number;
  token: string;
  /** The cluster CA (PEM) the node's certificate must chain to; absent: plain HTTP. */
  ca?: string;
  /** Source address (a node calls its peer from its own address). */
  localAddress?: string;
  /** What the target is, for error messages. */
  what: string;
}

export interface CallOptions {
  /** A volume stream to send (vol.receive). */
  input?: Readable;
  /** Where a volume stream goes (vol.send). */
  output?: Writable;
  /**
   * No answer within this: the call fails and its connection is dropped.
   * A request the node has read runs on all the same (as with any RPC): the
   * error says the call may have run.
   */
  timeoutMs?: number;
  /** TCP keepalive idle time (default KEEPALIVE_MS; tests shorten it). */
  keepAliveMs?: number;
}

/**
 * A long call (a verify, a migration) waits for its answer with nothing in
 * flight: if the node loses power, no segment is ever retransmitted and TCP
 * alone would wait forever on the half-open connection. Keepalive probes
 * (libuv: after this idle time, 10 probes a second apart) end it in about
 * this + 10 s; a node that is up answers them from its kernel however long
 * the command runs.
 */
export const KEEPALIVE_MS = 15_000;

interface ErrorBody {
  error?: unknown;
  hint?: unknown;
  exitCode?: unknown;
}

/** A request to the node: HTTPS checked against the cluster CA when the target has one, plain HTTP otherwise. */
function requestTo(target: ApiTarget, method: string, path: string, headers: Record<string, string>, keepAliveMs = KEEPALIVE_MS): http.ClientRequest {
  const options: https.RequestOptions = {
    host: target.host,
    port: target.port,
    method,
    path,
    headers,
    ...(target.localAddress ? { localAddress: target.localAddress } : {}),
    ...(target.ca ? { ca: target.ca } : {}),
    // One connection a request: a timed-out call drops its connection, which must not be a pooled one.
    agent: false,
  };
  const req = target.ca ? https.request(options) : http.request(options);
  req.on('socket', (socket) => socket.setKeepAlive(true, keepAliveMs));
  return req;
}

/** An error code that says the node's certificate did not check out against the cluster CA. */
function isCertificateError(code: string | undefined): boolean {
  return code !== undefined && /CERT|SELF_SIGNED|UNABLE_TO|ERR_TLS|HOSTNAME|IP_ADDRESS/.test(code);
}

/** Send `command` to the node and return its result (the route's JSON answer). */
export function callApi(target: ApiTarget, command: { cmd: string } & Record<string, unknown>, o: CallOptions = {}): Promise<unknown> {
  const { route, method, path, body } = requestOf(command);
  const where = `${target.host}:${target.port}`;
  const headers: Record<string, string> = { authorization: `Bearer ${target.token}`, accept: 'application/json' };
  let payload: Buffer | undefined;
  if (route.stream === 'in') headers['content-type'] = 'application/octet-stream';
  else if (body !== undefined) {
    payload = Buffer.from(JSON.stringify(body));
    headers['content-type'] = 'application/json';
    headers['content-length'] = String(payload.length);
  }
  return new Promise<unknown>((resolve, reject) => {
    let settled = false;
    const fail = (err: Error): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      reject(err);
    };
    const done = (value: unknown): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(value);
    };
    const req = requestTo(target, method, path, headers, o.keepAliveMs);
    const timer =
      o.timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            fail(new UserError(`${target.what} at ${where} did not answer within ${o.timeoutMs} ms${sent ? ' (the request was sent: it may have run)' : ''}`));
            // RST where the socket allows it (plain TCP), so the node sees the hang-up at once; a TLS socket cannot: FIN.
            try {
              const socket = req.socket;
              if (socket && !socket.connecting && !socket.destroyed && !target.ca) socket.resetAndDestroy();
            } catch {
              // Dropped below either way.
            }
            req.destroy();
          }, o.timeoutMs);
    // Once the whole request is out, a broken connection no longer means "not done": the node may have run it.
    let sent = false;
    req.on('finish', () => (sent = true));
    req.on('error', (err) => {
      const code = errnoCode(err);
      if (sent && code === 'ETIMEDOUT') {
        fail(new UserError(`${target.what} at ${where} went silent (no answer to TCP keepalives: powered off, or cut off?); the command may have run: look (status) once it is back`));
        return;
      }
      if (sent && code !== 'EPROTO' && !isCertificateError(code)) {
        fail(new UserError(`the connection to ${target.what} at ${where} broke after the request was sent (${code ?? err.message}): it may have run; look (status) before trying again`));
        return;
      }
      if (isCertificateError(code)) {
        fail(new UserError(`${target.what} at ${where}: its TLS certificate is not the cluster's (${code}); is it a node of this cluster, with the same secret?`));
      } else if (code === 'EPROTO' || /wrong version number|packet length too long/i.test(err.message)) {
        fail(new UserError(`${target.what} at ${where}: TLS and plain HTTP do not match (the cluster files differ in api.tls?)`));
      } else fail(new UserError(`cannot reach ${target.what} at ${where} (${code ?? err.message})`));
    });
    req.on('response', (res) => {
      const status = res.statusCode ?? 0;
      if (route.stream === 'out' && status === 200 && o.output) {
        const output = o.output;
        res.on('data', (chunk: Buffer) => {
          if (!output.write(chunk)) {
            res.pause();
            output.once('drain', () => res.resume());
          }
        });
        res.on('aborted', () => fail(new UserError(`${target.what} at ${where} cut the stream half-way; the output is incomplete`)));
        res.on('error', () => fail(new UserError(`${target.what} at ${where} cut the stream half-way; the output is incomplete`)));
        res.on('end', () => {
          if (!res.complete) return fail(new UserError(`${target.what} at ${where} cut the stream half-way; the output is incomplete`));
          const trailer = res.trailers['x-duet-result'];
          try {
            done(trailer === undefined ? undefined : JSON.parse(trailer));
          } catch {
            fail(new UserError(`${target.what} at ${where} sent a malformed result`));
          }
        });
        return;
      }
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', (err) => fail(new UserError(`the connection to ${target.what} at ${where} broke in the middle of the answer (${errnoCode(err) ?? err.message}): the request may have run`)));
      res.on('aborted', () => fail(new UserError(`the connection to ${target.what} at ${where} broke in the middle of the answer: the request may have run`)));
      res.on('end', () => {
        if (!res.complete) return fail(new UserError(`the connection to ${target.what} at ${where} broke in the middle of the answer: the request may have run`));
        const text = Buffer.concat(chunks).toString('utf8');
        let parsed: unknown;
        try {
          parsed = text === '' ? undefined : JSON.parse(text);
        } catch {
          return fail(new UserError(`${target.what} at ${where} sent a malformed answer (HTTP ${status})`));
        }
        if (status >= 200 && status < 300) return done(parsed ?? undefined);
        const e = (parsed ?? {}) as ErrorBody;
        const message = typeof e.error === 'string' ? e.error : `HTTP ${status}`;
        const exitCode = typeof e.exitCode === 'number' && Number.isInteger(e.exitCode) && e.exitCode > 0 ? e.exitCode : status === 409 ? 1 : 2;
        fail(new UserError(message, exitCode, typeof e.hint === 'string' ? e.hint : undefined));
      });
    });
    if (route.stream === 'in' && o.input) {
      o.input.on('error', (err) => {
        req.destroy();
        fail(new UserError(`reading the stream to send failed: ${err.message}`));
      });
      o.input.pipe(req);
    } else req.end(payload);
  });
}

/**
 * Follow GET /api/v1/events/stream from `since` on: `onEvent` gets each
 * record once, in order. A dropped stream is opened again from the last
 * record seen (after `retryMs`), as a browser's EventSource would;
 * `onGap` hears of each outage. Runs until `signal` aborts.
 */
export async function followEvents(
  target: ApiTarget,
  since: number,
  onEvent: (r: { seq: number } & Record<string, unknown>) => void,
  o: { signal?: AbortSignal; retryMs?: number; onGap?: (why: string) => void; readTimeoutMs?: number } = {},
): Promise<void> {
  // The server sends a keep-alive comment every 15 s: longer silence is a dead connection (a half-open one never errs).
  const readTimeoutMs = o.readTimeoutMs ?? 45_000;
  let last = since;
  const where = `${target.host}:${target.port}`;
  while (!o.signal?.aborted) {
    const why = await new Promise<string>((resolve) => {
      const req = requestTo(target, 'GET', `/api/v1/events/stream?since=${last}`, { authorization: `Bearer ${target.token}`, accept: 'text/event-stream' });
      const abort = (): void => {
        req.destroy();
        resolve('stopped');
      };
      o.signal?.addEventListener('abort', abort, { once: true });
      req.once('close', () => o.signal?.removeEventListener('abort', abort));
      req.setTimeout(readTimeoutMs, () => {
        req.destroy();
        resolve(`no word from ${target.what} at ${where} for ${readTimeoutMs} ms`);
      });
      req.on('error', (err) => resolve(`cannot reach ${target.what} at ${where} (${errnoCode(err) ?? err.message})`));
      req.on('response', (res) => {
        if (res.statusCode !== 200) {
          res.resume();
          resolve(`${target.what} at ${where} answered HTTP ${res.statusCode}`);
          return;
        }
        let buf = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          buf += chunk;
          for (let end = buf.indexOf('\n\n'); end >= 0; end = buf.indexOf('\n\n')) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            if (/^event: gap$/m.test(block)) {
              const g = /^data: (.*)$/m.exec(block);
              const gap = g ? (JSON.parse(g[1]) as { after: number; next: number }) : undefined;
              if (gap) o.onGap?.(`events ${gap.after + 1} to ${gap.next - 1} are older than what ${target.what} keeps in memory: duet events lists them`);
              if (gap) last = Math.max(last, gap.next - 1);
              continue;
            }
            const data = block
              .split('\n')
              .filter((l) => l.startsWith('data: '))
              .map((l) => l.slice(6))
              .join('\n');
            if (!data) continue;
            try {
              const r = JSON.parse(data) as { seq: number } & Record<string, unknown>;
              if (typeof r.seq === 'number' && r.seq > last) {
                last = r.seq;
                onEvent(r);
              }
            } catch {
              // A record cut by a dropped connection: it comes again after the reconnect.
            }
          }
        });
        res.on('close', () => resolve(`${target.what} at ${where} closed the event stream`));
      });
      req.end();
    }).finally(() => undefined);
    if (o.signal?.aborted) return;
    o.onGap?.(why);
    await new Promise((resolve) => setTimeout(resolve, o.retryMs ?? 1000));
  }
}
