/**
 * Alerts to a person (../shared/CONTRACT.md "Failover"): node lost, fenced,
 * failover done, disk failed, resync started/done, node rejoined, pool over
 * 90 % full, quorum lost. Sent by mail (SMTP) and/or as a JSON POST to a
 * webhook, each channel with its own queue and retries.
 *
 * `send()` only queues: the failover that raises an alert must never wait for
 * a mail server, so nothing here blocks or throws into the caller. Every
 * attempt is bounded (timeoutMs, also nodemailer's connection, greeting and
 * socket timeouts, so a server that accepts TCP and never answers cannot hold
 * a channel), every queue is bounded (maxQueued waiting, oldest dropped), and
 * every retry schedule is finite.
 *
 * Order: a channel delivers its alerts in the order they were raised (a reader
 * wants "node-lost" before "failover-done"), one at a time. A failing alert
 * holds the ones behind it only for its own retry schedule (sum of
 * retryDelaysMs, about 12 minutes by default), then is given up and logged, so
 * one undeliverable alert cannot hold back the others forever. When the
 * channel itself is down (the usual case) nothing behind it could get through
 * anyway; when it comes back, the queue drains at once.
 *
 * With a spool directory (the daemon's: NODE_HOME/alerts), what waits is
 * also on disk (alert-spool.ts): a daemon stopped or crashed before the mail
 * server came back sends those alerts when it starts again. The spool is
 * opened by start(), once the daemon is sure to run (a second daemon on the
 * same home that fails to claim its disks never sends the first one's
 * alerts); until then alerts wait in memory.
 */
import { createTransport } from 'nodemailer';
import type { Logger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { AlertSpool, type Spooled } from './alert-spool.js';

export interface AlertsConfig {
  /** smtp: "smtp://host:port" (smtps:// = TLS from the start); user:pass@ in the URL allowed. */
  email?: { to: string; from?: string; smtp: string };
  /** http(s)://...; the whole Alert is POSTed as JSON. */
  webhook?: { url: string };
}

export interface Alert {
  /** e.g. 'failover-done', 'node-lost', 'disk-failed', 'quorum-lost' */
  event: string;
  /** The node the alert is about (or that raises it). */
  node: string;
  cluster: string;
  /** ISO 8601 */
  time: string;
  /** One line, for a person. */
  summary: string;
  /** Body lines, e.g. "web: now runs on bravo (was alpha)". */
  details?: string[];
  /** Machine fields; go into the webhook JSON as they are. */
  data?: Record<string, unknown>;
}

export interface AlertOptions {
  log: Logger;
  /** The sending node's name: the default From is duet@<node>.<cluster>.invalid. */
  from: string;
  /** Waits between attempts; their count + 1 is the number of attempts per alert. */
  retryDelaysMs?: number[];
  /** Per attempt (connect + send). */
  timeoutMs?: number;
  /** Alerts waiting per channel, besides the one being delivered; beyond it the oldest is dropped. */
  maxQueued?: number;
  /** Keep undelivered alerts here too, and deliver what an earlier run left (see alert-spool.ts). */
  spoolDir?: string;
}

type ChannelName = 'email' | 'webhook';
interface Counters { sent: number; failedAttempts: number; gaveUp: number }

/** An alert in a channel's queue; `spooled` when it is also on disk. */
interface Queued {
  alert: Alert;
  spooled?: Spooled;
}

interface Channel {
  name: ChannelName;
  /** Where it goes, without secrets: safe to log. */
  target: string;
  deliver: (a: Alert, signal: AbortSignal) => Promise<void>;
  waiting: Queued[];
  current: Queued | undefined;
  counters: Counters;
}

const RETRY_DELAYS_MS = [1000, 5000, 30_000, 120_000, 600_000];
/** How long a stop waits for alerts still being written to the spool. */
const SPOOL_SETTLE_MS = 10_000;
const SUBJECT_SUMMARY_CHARS_MAX = 200;

export class Alerter {
  private readonly channels: Channel[] = [];
  private readonly log: Logger;
  private readonly retryDelaysMs: number[];
  private readonly timeoutMs: number;
  private readonly maxQueued: number;
  private readonly stop = new AbortController();
  private readonly idleWaiters = new Set<() => void>();
  private readonly secrets: string[] = [];
  private closeTransport = (): void => {};
  private readonly spoolDir: string | undefined;
  private spool: AlertSpool | undefined;
  /** With a spool: nothing is delivered before start() (it puts what earlier runs left first). */
  private started: boolean;

  constructor(config: AlertsConfig | undefined, options: AlertOptions) {
    this.log = options.log;
    this.retryDelaysMs = options.retryDelaysMs ?? RETRY_DELAYS_MS;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.maxQueued = Math.max(1, options.maxQueued ?? 100);
    if (config?.email) this.channels.push(this.emailChannel(config.email, options.from));
    if (config?.webhook) this.channels.push(this.webhookChannel(config.webhook.url));
    this.spoolDir = options.spoolDir;
    this.started = this.spoolDir === undefined;
  }

  /** Open the spool: what earlier runs left goes first, then what was raised since this one began; delivery starts. */
  start(): void {
    if (this.started || this.stop.signal.aborted) return;
    this.started = true;
    const { spool, waiting } = AlertSpool.open(this.spoolDir!, this.channels.map((c) => c.name), this.log);
    this.spool = spool;
    for (const ch of this.channels) {
      const raised = ch.waiting.splice(0);
      const left = waiting.get(ch.name) ?? [];
      if (left.length) this.log.info({ event: 'alert-spool-loaded', channel: ch.name, alerts: left.length }, `${left.length} alert(s) for ${ch.name} left undelivered before this start go out now`);
      for (const spooled of left) this.enqueue(ch, { alert: spooled.alert, spooled });
      for (const q of raised) this.enqueue(ch, { alert: q.alert, spooled: spool.save(ch.name, q.alert) });
    }
  }

  send(alert: Alert): void {
    if (this.stop.signal.aborted) {
      // Raised while the daemon stops: kept for its next start if there is a spool (written now: the process may exit next).
      for (const ch of this.channels) {
        if (this.spool?.saveNow(ch.name, alert)) this.log.info({ event: 'alert-spool-kept', channel: ch.name, alerts: 1, dir: this.spool.dir }, `alert ${alert.event} kept in ${this.spool.dir} for the next start`);
        else this.drop(ch, { alert }, 'alerter closed');
      }
      return;
    }
    for (const ch of this.channels) this.enqueue(ch, { alert, spooled: this.spool?.save(ch.name, alert) });
  }

  private enqueue(ch: Channel, q: Queued): void {
    if (ch.waiting.length >= this.maxQueued) this.drop(ch, ch.waiting.shift()!, `queue full (${this.maxQueued} waiting)`);
    ch.waiting.push(q);
    if (!ch.current && this.started) this.pump(ch).catch((err: unknown) => this.log.error({ event: 'alert-bug', channel: ch.name, err: String(err) }, 'alert queue failed'));
  }

  idle(timeoutMs: number): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((resolve) => {
      const done = (): void => (clearTimeout(timer), this.idleWaiters.delete(done), resolve());
      const timer = setTimeout(done, timeoutMs);
      this.idleWaiters.add(done);
    });
  }

  stats(): Record<ChannelName, Counters> {
    const of = (name: ChannelName): Counters => ({ ...(this.channels.find((c) => c.name === name)?.counters ?? { sent: 0, failedAttempts: 0, gaveUp: 0 }) });
    return { email: of('email'), webhook: of('webhook') };
  }

  /** Stop delivering; with a spool, resolves once what waits is on disk (bounded), for the next start. */
  async close(): Promise<void> {
    if (this.stop.signal.aborted) return;
    this.stop.abort(); // cuts the attempt in flight and every retry wait
    const kept: Array<[Channel, Queued[]]> = [];
    for (const ch of this.channels) {
      const left = [...(ch.current ? [ch.current] : []), ...ch.waiting.splice(0)];
      if (this.spool) kept.push([ch, left]);
      else for (const q of left) this.drop(ch, q, 'alerter closed');
    }
    this.closeTransport();
    for (const done of [...this.idleWaiters]) done();
    if (!this.spool) return;
    await this.spool.settled(SPOOL_SETTLE_MS);
    for (const [ch, left] of kept) {
      const onDisk: Queued[] = [];
      // A save still under way after the wait counts as not on disk (a race with an already settled promise reads it without waiting).
      for (const q of left) if (q.spooled && (await Promise.race([q.spooled.saved, Promise.resolve(undefined)]))) onDisk.push(q);
      if (onDisk.length) this.log.info({ event: 'alert-spool-kept', channel: ch.name, alerts: onDisk.length, dir: this.spool.dir }, `${onDisk.length} undelivered alert(s) of ${ch.name} kept in ${this.spool.dir} for the next start`);
      for (const q of left) if (!onDisk.includes(q)) this.drop(ch, q, 'alerter closed before it was on disk');
    }
  }

  private async pump(ch: Channel): Promise<void> {
    try {
      for (let q = ch.waiting.shift(); q && !this.stop.signal.aborted; q = ch.waiting.shift()) {
        ch.current = q;
        // Done with it (sent or given up) unless the alerter was closed meanwhile: then the spool keeps it.
        if ((await this.deliverWithRetries(ch, q.alert)) && q.spooled) await this.spool?.remove(q.spooled);
      }
    } finally {
      ch.current = undefined;
      if (this.isIdle()) for (const done of [...this.idleWaiters]) done();
    }
  }

  /** Delivered or given up: true; cut short by close(): false. */
  private async deliverWithRetries(ch: Channel, a: Alert): Promise<boolean> {
    const base = { channel: ch.name, target: ch.target, alert: a.event, node: a.node };
    for (let attempt = 1; ; attempt++) {
      const timeout = AbortSignal.timeout(this.timeoutMs);
      try {
        await ch.deliver(a, AbortSignal.any([this.stop.signal, timeout]));
        ch.counters.sent++;
        this.log.info({ event: 'alert-sent', ...base, attempt }, `alert ${a.event} sent by ${ch.name}`);
        return true;
      } catch (err) {
        if (this.stop.signal.aborted) return false; // dropped (or kept in the spool) and logged by close()
        ch.counters.failedAttempts++;
        const why = timeout.aborted ? `no answer within ${this.timeoutMs} ms` : this.scrub(errorText(err));
        this.log.warn({ event: 'alert-failed', ...base, attempt, err: why }, `alert ${a.event} not sent by ${ch.name} (attempt ${attempt}): ${why}`);
        const delayMs = this.retryDelaysMs[attempt - 1];
        if (delayMs === undefined) {
          ch.counters.gaveUp++;
          this.log.error({ event: 'alert-gave-up', ...base, attempts: attempt, err: why }, `alert ${a.event} given up on ${ch.name} after ${attempt} attempts`);
          return true;
        }
        await this.sleep(delayMs);
        if (this.stop.signal.aborted) return false;
      }
    }
  }

  private emailChannel(email: NonNullable<AlertsConfig['email']>, sender: string): Channel {
    const url = parseUrl(email.smtp, ['smtp:', 'smtps:'], 'alerts.email.smtp', 'smtp://host:25');
    for (const s of [url.password, decodeURIComponent(url.password)]) if (s) this.secrets.push(s);
    const t = this.timeoutMs;
    const transport = createTransport({ url: email.smtp, connectionTimeout: t, greetingTimeout: t, socketTimeout: t });
    this.closeTransport = () => transport.close();
    return this.channel('email', `${url.protocol}//${url.host}`, async (a, signal) => {
      const from = email.from ?? `duet <duet@${dnsLabel(sender)}.${dnsLabel(a.cluster)}.invalid>`;
      await transport.sendMail({ from, to: email.to, subject: subjectOf(a), text: bodyOf(a), signal });
    });
  }

  private webhookChannel(raw: string): Channel {
    const url = parseUrl(raw, ['http:', 'https:'], 'alerts.webhook.url', 'https://host/path');
    const headers: Record<string, string> = { 'content-type': 'application/json' };
    // fetch refuses a URL with user:pass; send them as Basic auth instead.
    if (url.username || url.password) {
      headers.authorization = `Basic ${Buffer.from(`${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`).toString('base64')}`;
      url.username = url.password = '';
    }
    // Only the origin is logged: webhook paths often carry the token (Slack, Matrix hooks).
    return this.channel('webhook', url.origin, async (a, signal) => {
      const res = await fetch(url, { method: 'POST', headers, body: alertJson(a), signal });
      await res.body?.cancel(); // the answer's content is not used; free the connection
      if (!res.ok) throw new Error(`${url.origin} answered ${res.status} ${res.statusText}`.trim());
    });
  }

  private channel(name: ChannelName, target: string, deliver: Channel['deliver']): Channel {
    return { name, target, deliver, waiting: [], current: undefined, counters: { sent: 0, failedAttempts: 0, gaveUp: 0 } };
  }

  private drop(ch: Channel | undefined, q: Queued, reason: string): void {
    const a = q.alert;
    this.log.warn({ event: 'alert-dropped', channel: ch?.name, alert: a.event, node: a.node, reason }, `alert ${a.event} dropped: ${reason}`);
    if (q.spooled) void this.spool?.remove(q.spooled);
  }

  private isIdle(): boolean {
    return this.channels.every((c) => !c.current && c.waiting.length === 0);
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => (clearTimeout(timer), this.stop.signal.removeEventListener('abort', done), resolve());
      const timer = setTimeout(done, ms);
      this.stop.signal.addEventListener('abort', done, { once: true });
    });
  }

  /** An error text may quote the SMTP URL (or the server may echo a credential): never log the password. */
  private scrub(text: string): string {
    return this.secrets.reduce((t, s) => t.split(s).join('***'), text);
  }
}

/** e.g. "[duet home] failover-done on bravo: web, db now run on bravo" */
export function subjectOf(a: Alert): string {
  const summary = a.summary.replace(/\s+/g, ' ').trim();
  const short = summary.length > SUBJECT_SUMMARY_CHARS_MAX ? `${summary.slice(0, SUBJECT_SUMMARY_CHARS_MAX - 3)}...` : summary;
  return `[duet ${a.cluster}] ${a.event} on ${a.node}: ${short}`;
}

/** The summary, the facts, the details lines, then data as indented JSON. */
export function bodyOf(a: Alert): string {
  const lines = [a.summary, '', `event:   ${a.event}`, `node:    ${a.node}`, `cluster: ${a.cluster}`, `time:    ${a.time}`];
  if (a.details?.length) lines.push('', ...a.details);
  if (a.data && Object.keys(a.data).length) lines.push('', 'data:', ...dataJson(a.data).split('\n').map((l) => `  ${l}`));
  return `${lines.join('\n')}\n`;
}

/** The webhook body; it never throws: bigints go as strings, unserializable data (a cycle) is named instead. */
function alertJson(a: Alert): string {
  try {
    return JSON.stringify(a, bigintsAsText);
  } catch (err) {
    return JSON.stringify({ ...a, data: { unserializable: errorText(err) } });
  }
}

function dataJson(data: Record<string, unknown>): string {
  try {
    return JSON.stringify(data, bigintsAsText, 2);
  } catch (err) {
    return JSON.stringify({ unserializable: errorText(err) }, null, 2);
  }
}

function bigintsAsText(_key: string, v: unknown): unknown {
  return typeof v === 'bigint' ? v.toString() : v;
}

function parseUrl(raw: string, protocols: string[], where: string, example: string): URL {
  let url: URL | undefined;
  try {
    url = new URL(raw);
  } catch {
    /* reported below */
  }
  if (!url || !protocols.includes(url.protocol)) throw new UserError(`${where} is not a ${protocols.map((p) => p.slice(0, -1)).join(' or ')} URL: give one like ${example}`);
  return url;
}

function dnsLabel(name: string): string {
  return name.toLowerCase().replace(/[^a-z0-9-]+/g, '-').replace(/^-+|-+$/g, '') || 'node';
}

/** fetch says only "fetch failed"; the reason (ECONNREFUSED...) is in its cause. */
function errorText(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const cause = err.cause instanceof Error ? `: ${err.cause.message}` : '';
  return `${err.message}${cause}`;
}
