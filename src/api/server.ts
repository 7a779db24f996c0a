/**
 * The node daemon's HTTP API (Fastify): the routes of routes.ts, each turned
 * into the daemon command it names; the event stream (server-sent events);
 * Prometheus metrics; the dashboard.
 *
 * Every /api route needs the cluster's bearer token (token.ts); /metrics
 * needs it only when the cluster file says so. Errors are
 * {"error", "hint", "exitCode"} with a status code: 400 bad request, 401 no
 * or wrong token, 404 unknown object or route, 409 refused in this state
 * (the CLI's exit 1), 500 a fault of duet's.
 */
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { PassThrough, type Readable, type Writable } from 'node:stream';
import type { Logger } from '../util/log.js';
import { NotFoundError, UserError } from '../util/errors.js';
import { ROUTES, paramsOf, type Route } from './routes.js';
import { bearerOk } from './token.js';

export type ApiHandler = (command: { cmd: string } & Record<string, unknown>, io: { input?: Readable; output?: Writable }) => Promise<unknown>;

/** Where the event stream reads from: the recent records kept in memory, and new ones as they come. */
export interface EventSource {
  recent(seq: number): { seq: number }[];
  on(event: 'event', listener: (r: { seq: number }) => void): unknown;
  off(event: 'event', listener: (r: { seq: number }) => void): unknown;
}

export interface ApiOptions {
  host: string;
  port: number;
  token: string;
  /**
   * The nodes' own token: the only one the peer routes (/api/v1/node/...) take, and good for every
   * other route too. Absent: the peer routes are closed.
   */
  peerToken?: string;
  /** TLS key and certificate (PEM); absent: plain HTTP (loopback only, checked by the config). */
  tls?: { key: string; cert: string };
  handler: ApiHandler;
  events?: EventSource;
  /** Prometheus text and its content type. */
  metrics?: () => Promise<{ contentType: string; text: string }>;
  metricsNeedToken?: boolean;
  /** Static files of the dashboard: path below / → body and content type. */
  dashboard?: (path: string) => { body: Buffer; type: string } | undefined;
  /** Counts each request by route and status (metrics). */
  observe?: (route: string, method: string, status: number, seconds: number) => void;
  log: Logger;
}

export interface ApiError {
  error: string;
  hint: string;
  exitCode: number;
}

/** How long a stopping daemon lets running API requests finish (a rejoin can take hours: it is cut, and its caller told it may have run). */
const CLOSE_GRACE_MS = 10_000;

const HINTS: Record<number, string> = {
  403: 'this route is for the nodes themselves',
  400: 'see GET /api/v1 for the routes and their fields',
  401: 'send the cluster token as "Authorization: Bearer TOKEN" (duet api token prints it)',
  404: 'GET /api/v1 lists the routes; the listings (/api/v1/resources, /vms, /pools) name what exists',
  409: 'the cluster is not in a state that allows this now: GET /api/v1/status shows why',
  500: "this is duet's fault: the node's log has the details",
};

/** The HTTP status of an error a command threw. */
export function statusOf(err: unknown): number {
  if (err instanceof NotFoundError) return 404;
  if (err instanceof UserError) return err.exitCode === 1 ? 409 : 400;
  return 500;
}

export function errorBody(status: number, message: string, exitCode: number, hint?: string): ApiError {
  return { error: message, hint: hint ?? HINTS[status] ?? HINTS[400], exitCode };
}

export class ApiServer {
  private constructor(
    readonly app: FastifyInstance,
    readonly url: string,
    /** The open event streams: never idle, so ended by close() itself. */
    private readonly streams: Set<import('node:http').ServerResponse>,
  ) {}

  static async listen(o: ApiOptions): Promise<ApiServer> {
    const app = Fastify({
      logger: false,
      // A request's fields are small; volume streams are not parsed (octet-stream passes through).
      bodyLimit: 1024 * 1024,
      ...(o.tls ? { https: { key: o.tls.key, cert: o.tls.cert, minVersion: 'TLSv1.2' as const } } : {}),
      // A stopping daemon closes idle keep-alive connections at once and lets running requests answer
      // (close() bounds that wait): a caller must not be told "cannot reach" for a command that still runs.
      forceCloseConnections: 'idle',
      return503OnClosing: false,
      // Volume names go up to 127 characters, and they are URL parameters.
      maxParamLength: 512,
    });
    // A receive's body is the volume stream itself: handed to the command unread.
    app.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));

    app.addHook('onRequest', async (req, reply) => {
      (req as RequestWithStart).startedAt = process.hrtime.bigint();
      // Decided by the route the router matched (it decodes the path), never by the raw URL: /%61pi/v1/...
      // reaches the /api/v1/... route and must be checked like it.
      const route = req.routeOptions.url ?? '';
      const peerRoute = route.startsWith('/api/v1/node/');
      const needsToken = route.startsWith('/api/') || (route === '/metrics' && o.metricsNeedToken === true);
      if (!needsToken) return;
      const header = req.headers.authorization;
      const peer = o.peerToken !== undefined && bearerOk(header, o.peerToken);
      if (peer) return;
      const user = bearerOk(header, o.token);
      if (user && !peerRoute) return;
      if (user) {
        o.log.warn({ event: 'api-refused', from: req.ip, url: route }, 'refused a peer route to a client token');
        return reply.code(403).send(errorBody(403, `${route} is for the nodes of the cluster only`, 2, 'scripts and dashboards use the other routes (GET /api/v1 lists them)'));
      }
      o.log.warn({ event: 'api-refused', from: req.ip, url: route }, 'refused an API request without the cluster token');
      return reply.code(401).send(errorBody(401, header ? 'wrong token: the node refused the request' : 'the API needs the cluster token', 2));
    });
    app.addHook('onResponse', async (req, reply) => {
      const started = (req as RequestWithStart).startedAt;
      if (started === undefined || !o.observe) return;
      o.observe(req.routeOptions.url ?? 'unknown', req.method, reply.statusCode, Number(process.hrtime.bigint() - started) / 1e9);
    });

    app.setNotFoundHandler((req, reply) => {
      reply.code(404).send(errorBody(404, `no route ${req.method} ${req.url.split('?')[0]}`, 2));
    });
    app.setErrorHandler((err: Error & { statusCode?: number; validation?: unknown }, req, reply) => {
      // Fastify's own refusals: a malformed JSON body, a body too large, a wrong content type.
      const status = err.statusCode && err.statusCode >= 400 && err.statusCode < 500 ? err.statusCode : 500;
      if (status === 500) o.log.error({ event: 'api-fault', url: req.url, err: err.stack }, 'API request failed');
      reply.code(status).send(errorBody(status, status === 500 ? `internal error: ${err.message}` : `bad request: ${err.message}`, status === 500 ? 70 : 2));
    });

    app.get('/api/v1', async () => ({
      version: 1,
      routes: ROUTES.map((r) => ({ method: r.method, url: r.url, command: r.cmd, summary: r.summary, ...(r.stream ? { stream: r.stream } : {}) })).concat([
        { method: 'GET', url: '/api/v1/events/stream', command: 'events.list', summary: 'the event log as server-sent events, from a sequence number on' },
      ]),
    }));

    for (const r of ROUTES) registerRoute(app, r, o);
    const streams = new Set<import('node:http').ServerResponse>();
    if (o.events) registerEventStream(app, o.events, o.log, streams);

    if (o.metrics) {
      const metrics = o.metrics;
      app.get('/metrics', async (_req, reply) => {
        const m = await metrics();
        reply.header('content-type', m.contentType).send(m.text);
      });
    }
    if (o.dashboard) {
      const dashboard = o.dashboard;
      app.get('/*', async (req, reply) => {
        const path = (req.params as { '*': string })['*'] || 'index.html';
        const file = dashboard(path);
        if (!file) return reply.code(404).send(errorBody(404, `no page /${path}`, 2, 'the dashboard is at /'));
        reply.header('content-type', file.type).header('cache-control', 'no-cache').send(file.body);
      });
    }

    try {
      await app.listen({ host: o.host, port: o.port });
    } catch (err) {
      await app.close().catch(() => undefined);
      throw err;
    }
    return new ApiServer(app, `${o.tls ? 'https' : 'http'}://${o.host.includes(':') ? `[${o.host}]` : o.host}:${o.port}`, streams);
  }

  /** Replace the certificate (a renewed one) for new connections. */
  setCertificate(tls: { key: string; cert: string }): void {
    const server = this.app.server as unknown as { setSecureContext?: (o: { key: string; cert: string }) => void };
    server.setSecureContext?.({ key: tls.key, cert: tls.cert });
  }

  /** Stop: running requests get up to `graceMs` to answer, then their connections are cut. */
  async close(graceMs = CLOSE_GRACE_MS): Promise<void> {
    const cut = setTimeout(() => (this.app.server as { closeAllConnections?: () => void }).closeAllConnections?.(), graceMs);
    for (const res of this.streams) res.end();
    this.streams.clear();
    try {
      await this.app.close();
    } finally {
      clearTimeout(cut);
    }
  }
}

type RequestWithStart = FastifyRequest & { startedAt?: bigint };

/** The command a request asks for, or an error body. */
function commandOf(r: Route, req: FastifyRequest): { command: { cmd: string } & Record<string, unknown> } | { error: ApiError } {
  const params = (req.params ?? {}) as Record<string, string>;
  const rest = r.method === 'GET' || r.method === 'DELETE' || r.stream === 'in' ? ((req.query ?? {}) as Record<string, unknown>) : req.body;
  if (rest !== undefined && rest !== null && (typeof rest !== 'object' || Array.isArray(rest))) return { error: errorBody(400, 'bad request: the body must be a JSON object', 2) };
  const raw: Record<string, unknown> = { ...((rest as Record<string, unknown> | undefined) ?? {}) };
  for (const p of paramsOf(r)) {
    if (p in raw && raw[p] !== params[p]) return { error: errorBody(400, `bad request: ${p} is given by the URL`, 2) };
    raw[p] = params[p];
  }
  const parsed = r.fields.safeParse(raw);
  if (!parsed.success) {
    const first = parsed.error.issues[0];
    const where = first.path.join('.') || 'request';
    return { error: errorBody(400, `bad request: ${where}: ${first.message}`, 2) };
  }
  return { command: { cmd: r.cmd, ...parsed.data } };
}

/** The status and body of a command's failure (a fault of duet's is logged). */
function commandError(err: unknown, log: Logger, cmd: string): { status: number; body: ApiError } {
  const status = statusOf(err);
  if (status === 500) log.error({ event: 'api-command-failed', cmd, err: (err as Error).stack }, 'API command failed');
  const message = status === 500 ? `internal error: ${(err as Error).message}` : (err as Error).message;
  const hint = err instanceof UserError ? err.hint : undefined;
  return { status, body: errorBody(status, message, err instanceof UserError ? err.exitCode : 70, hint) };
}

function sendError(reply: FastifyReply, err: unknown, log: Logger, cmd: string): void {
  const { status, body } = commandError(err, log, cmd);
  reply.code(status).send(body);
}

function registerRoute(app: FastifyInstance, r: Route, o: ApiOptions): void {
  app.route({
    method: r.method,
    url: r.url,
    handler: async (req, reply) => {
      const c = commandOf(r, req);
      if ('error' in c) return reply.code(400).send(c.error);
      if (r.cmd !== 'vol.send') o.log.info({ event: 'api-command', cmd: r.cmd, from: req.ip }, 'API command');
      if (r.stream === 'out') return streamOut(c.command, req, reply, o);
      const input = r.stream === 'in' ? (req.body as Readable | undefined) : undefined;
      if (r.stream === 'in' && (!input || typeof (input as Readable).pipe !== 'function')) {
        return reply.code(400).send(errorBody(400, 'bad request: send the stream as the body, with Content-Type: application/octet-stream', 2));
      }
      try {
        const result = await o.handler(c.command, input ? { input } : {});
        return reply.send(result ?? null);
      } catch (err) {
        sendError(reply, err, o.log, r.cmd);
        return reply;
      }
    },
  });
}

/**
 * A volume stream out. The status is only known once the stream starts or
 * the command ends: a command that fails before its first byte answers with
 * an error body; one that fails later cuts the connection, so the stream
 * the client got ends without chunked encoding's last chunk and can never
 * pass for a complete one. The command's result comes as a trailer.
 */
async function streamOut(command: { cmd: string } & Record<string, unknown>, req: FastifyRequest, reply: FastifyReply, o: ApiOptions): Promise<void> {
  reply.hijack();
  const res = reply.raw;
  const out = new PassThrough();
  // Destroyed with an error when the client leaves: the writer hears of it by its next write (stream.ts),
  // and an 'error' nobody listens to would end the whole daemon.
  out.on('error', () => undefined);
  let started = false;
  const start = (): void => {
    if (started) return;
    started = true;
    res.writeHead(200, { 'content-type': 'application/octet-stream', trailer: 'x-duet-result' });
    out.pipe(res, { end: false });
  };
  out.once('readable', start);
  res.once('close', () => {
    // The client left: the send fails (with an error, so a writer waiting for 'drain' hears it) and stops reading the volume.
    if (!res.writableFinished) out.destroy(new Error('the client left before the stream ended'));
  });
  o.log.info({ event: 'api-command', cmd: command.cmd, from: req.ip }, 'API command');
  try {
    const result = await o.handler(command, { output: out });
    out.end();
    start();
    await new Promise<void>((resolve) => (out.readableEnded ? resolve() : out.once('end', resolve)));
    res.addTrailers({ 'x-duet-result': JSON.stringify(result ?? null) });
    res.end();
  } catch (err) {
    if (!started) {
      out.destroy();
      const { status, body: answer } = commandError(err, o.log, command.cmd);
      const body = JSON.stringify(answer);
      res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    o.log.warn({ event: 'api-stream-failed', cmd: command.cmd, err: (err as Error).message }, 'a stream failed half-way: connection cut');
    out.destroy();
    res.destroy();
  }
}

/**
 * GET /api/v1/events/stream?since=SEQ: the records after SEQ (or after the
 * Last-Event-ID a reconnecting browser sends), then each new one, as
 * server-sent events; a comment every 15 s keeps proxies from closing it.
 */
function registerEventStream(app: FastifyInstance, events: EventSource, log: Logger, streams: Set<import('node:http').ServerResponse>): void {
  app.get('/api/v1/events/stream', async (req, reply) => {
    const q = (req.query ?? {}) as { since?: string };
    const lastId = req.headers['last-event-id'];
    const sinceText = typeof lastId === 'string' ? lastId : q.since ?? '0';
    const since = /^\d{1,15}$/.test(sinceText) ? Number(sinceText) : NaN;
    if (!Number.isSafeInteger(since)) return reply.code(400).send(errorBody(400, 'bad request: since must be a sequence number', 2));
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    let last = since;
    const write = (r: { seq: number }): void => {
      if (r.seq <= last) return;
      last = r.seq;
      res.write(`id: ${r.seq}\nevent: duet\ndata: ${JSON.stringify(r)}\n\n`);
    };
    const listener = (r: { seq: number }): void => write(r);
    events.on('event', listener);
    // The backlog is what is kept in memory only (the whole history is GET /api/v1/events, paged): reading
    // the files here would stall the event loop, and with it the heartbeats, for a stream anyone may open.
    const backlog = events.recent(last);
    // Records older than the ones in memory are not sent: say so, so a follower does not take the hole for silence.
    if (backlog.length > 0 && backlog[0].seq > last + 1) {
      res.write(`event: gap\ndata: ${JSON.stringify({ after: last, next: backlog[0].seq })}\n\n`);
    }
    for (const r of backlog) write(r);
    streams.add(res);
    const keepAlive = setInterval(() => res.write(': keep-alive\n\n'), 15_000);
    keepAlive.unref();
    req.raw.once('close', () => {
      clearInterval(keepAlive);
      streams.delete(res);
      events.off('event', listener);
      log.debug({ event: 'api-events-closed', from: req.ip }, 'event stream closed');
    });
  });
}
