/**
 * The event log: what happened to the cluster (nodes lost, fences,
 * failovers, resyncs, VMs moved), kept in a file under the node's home so
 * `duet events` can tell what happened last night, across restarts too.
 * The daemon's logger is tapped (tapEvents): the lines that name an event in
 * RECORDED_EVENTS are recorded as well as logged; the chatter is not.
 *
 * One JSON object a line in DIR/events.jsonl, appended synchronously (events
 * are small and rare, and the file stays in the order they happened). Not
 * fsynced per record: an event log is history, not data; a crash may lose
 * the last lines, never corrupt earlier ones, and a torn last line is cut
 * off at the next open. Bounded: past maxBytes the file becomes
 * events.1.jsonl (replacing the older one), so between maxBytes and
 * 2 × maxBytes of history is kept.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { format } from 'node:util';
import type { ChildLoggerOptions } from 'pino';
import { createLogger, type Logger } from '../util/log.js';

export interface EventRecord {
  seq: number;
  /** ISO 8601, UTC. */
  time: string;
  event: string;
  node: string;
  message: string;
  level: 'info' | 'warn' | 'error';
  [field: string]: unknown;
}
type Level = EventRecord['level'];

export const EVENT_LOG_MAX_BYTES = 4 * 1024 * 1024;
/** Recent records kept in memory, so a follower's since() reads no file. */
export const EVENT_RING_RECORDS = 1000;
export const EVENT_SINCE_LIMIT = 1000;
/** A longer record (a huge field) keeps only its head and 1 KiB of message. */
export const EVENT_LINE_MAX_BYTES = 8 * 1024;

const RESERVED = new Set(['time', 'event', 'node', 'seq', 'level', 'message']);

export class EventLog extends EventEmitter {
  private readonly ring: EventRecord[];
  private fd: number | undefined;
  private sizeBytes: number;
  private last: number;
  /** The first seq in events.jsonl: from it on, nothing is in events.1.jsonl. */
  private currentFirstSeq: number;
  /** The oldest seq kept (rotation dropped those before). */
  private keptFirstSeq: number;
  private diskFailing = false;

  private constructor(
    readonly dir: string,
    readonly node: string,
    private readonly maxBytes: number,
    private readonly ringRecords: number,
    private readonly log: () => Logger,
  ) {
    super();
    const current = this.currentFile;
    const old = readRecords([this.rotatedFile]);
    // A line torn by a crash mid-write is cut off, or the next append would continue it.
    const bytes = fs.existsSync(current) ? fs.readFileSync(current) : Buffer.alloc(0);
    this.sizeBytes = bytes.lastIndexOf(0x0a) + 1;
    if (this.sizeBytes < bytes.length) fs.truncateSync(current, this.sizeBytes);
    const cur = parseLines(bytes.subarray(0, this.sizeBytes).toString(), old.at(-1)?.seq ?? 0);
    this.ring = [...old, ...cur].slice(-ringRecords);
    this.last = cur.at(-1)?.seq ?? old.at(-1)?.seq ?? 0;
    this.currentFirstSeq = cur[0]?.seq ?? this.last + 1;
    this.keptFirstSeq = old[0]?.seq ?? this.currentFirstSeq;
    this.fd = fs.openSync(current, 'a', 0o600);
  }

  /** `ringRecords` is for tests (the default keeps the last EVENT_RING_RECORDS). */
  static open(dir: string, node: string, options: { maxBytes?: number; log?: Logger; ringRecords?: number } = {}): EventLog {
    fs.mkdirSync(dir, { recursive: true });
    let log = options.log;
    const logger = () => (log ??= createLogger('duet-events'));
    return new EventLog(dir, node, options.maxBytes ?? EVENT_LOG_MAX_BYTES, Math.max(1, options.ringRecords ?? EVENT_RING_RECORDS), logger);
  }

  get lastSeq(): number {
    return this.last;
  }

  get closed(): boolean {
    return this.fd === undefined;
  }

  private get currentFile(): string {
    return path.join(this.dir, 'events.jsonl');
  }

  private get rotatedFile(): string {
    return path.join(this.dir, 'events.1.jsonl');
  }

  /** `fields.node` names the node the event is about (default: this one); other reserved names are ignored. */
  record(event: string, fields: Record<string, unknown>, message: string, level: Level = 'info'): EventRecord {
    if (this.fd === undefined) throw new Error(`event log ${this.dir}: record(${event}) after close`);
    const head = { time: new Date().toISOString(), event, node: typeof fields.node === 'string' ? fields.node : this.node, seq: this.last + 1, level, message };
    const full: Record<string, unknown> = { ...head };
    for (const [k, v] of Object.entries(fields)) if (!RESERVED.has(k)) full[k] = v;
    let line: string | undefined;
    try {
      line = JSON.stringify(full, jsonSafe);
    } catch {
      // A circular field: recorded without its fields, as an oversized one is.
    }
    if (line === undefined || Buffer.byteLength(line) > EVENT_LINE_MAX_BYTES) line = JSON.stringify({ ...head, message: message.slice(0, 1024), truncated: true });
    // Read back, so the record in memory is exactly the one in the file (Errors as messages, bigints as numbers).
    const r = JSON.parse(line) as EventRecord;
    this.last = r.seq;
    this.append(line);
    this.ring.push(r);
    if (this.ring.length > this.ringRecords) this.ring.shift();
    this.emit('event', r);
    return r;
  }

  private append(line: string): void {
    const buf = Buffer.from(line + '\n');
    try {
      for (let at = 0; at < buf.length; ) at += fs.writeSync(this.fd!, buf, at, buf.length - at);
      this.sizeBytes += buf.length;
    } catch (err) {
      // A full or failing disk must not stop the daemon logging: the record stays in memory, the file loses it.
      try {
        fs.ftruncateSync(this.fd!, this.sizeBytes); // no half line for the next one to continue
      } catch {
        /* the same failure: the next open cuts the torn line */
      }
      this.warnOnce('event-log-write-failed', `${(err as Error).message}; events are not kept until it can be written again`, err);
      return;
    }
    if (this.sizeBytes > this.maxBytes) this.rotate();
    else this.diskFailing = false;
  }

  private rotate(): void {
    let fd: number;
    try {
      fs.renameSync(this.currentFile, this.rotatedFile); // the held fd follows the file: no line is lost
      fd = fs.openSync(this.currentFile, 'a', 0o600);
    } catch (err) {
      this.warnOnce('event-log-rotate-failed', `could not rotate (${(err as Error).message}); it grows on`, err);
      return;
    }
    fs.closeSync(this.fd!);
    this.fd = fd;
    this.sizeBytes = 0;
    this.diskFailing = false;
    this.keptFirstSeq = this.currentFirstSeq;
    this.currentFirstSeq = this.last + 1;
    while (this.ring.length > 0 && this.ring[0].seq < this.keptFirstSeq) this.ring.shift();
  }

  /** One warning per spell of failures (not one per record). */
  private warnOnce(event: string, what: string, err: unknown): void {
    if (!this.diskFailing) this.log().warn({ event, file: this.currentFile, err: (err as Error).message }, `event log ${this.currentFile}: ${what}`);
    this.diskFailing = true;
  }

  /** Records with seq > since, oldest first, at most limit; across the rotated file too. */
  since(since: number, limit = EVENT_SINCE_LIMIT): EventRecord[] {
    const from = Math.max(since + 1, this.keptFirstSeq);
    if (limit <= 0 || from > this.last) return [];
    if (this.ring.length > 0 && this.ring[0].seq <= from) {
      const i = this.ring.findIndex((r) => r.seq >= from);
      return this.ring.slice(i, i + limit);
    }
    return this.readKept(from).slice(0, limit);
  }

  /** The records with seq > since that are in memory (never a file read: cheap enough for anyone to ask). */
  recent(since: number): EventRecord[] {
    return this.ring.filter((r) => r.seq > since);
  }

  /** The last n records. */
  tail(n: number): EventRecord[] {
    if (n <= 0) return [];
    if (n <= this.ring.length || this.ring[0]?.seq === this.keptFirstSeq) return this.ring.slice(-n);
    return this.readKept(this.keptFirstSeq).slice(-n);
  }

  /** The kept records from seq `from` on, read from the files (older than the ring). */
  private readKept(from: number): EventRecord[] {
    const files = from >= this.currentFirstSeq ? [this.currentFile] : [this.rotatedFile, this.currentFile];
    return readRecords(files).filter((r) => r.seq >= from);
  }

  close(): void {
    if (this.fd === undefined) return;
    fs.closeSync(this.fd);
    this.fd = undefined;
  }
}

function jsonSafe(_key: string, v: unknown): unknown {
  if (typeof v === 'bigint') return Number.isSafeInteger(Number(v)) ? Number(v) : v.toString();
  return v instanceof Error ? v.message : v;
}

function readRecords(files: string[]): EventRecord[] {
  const out: EventRecord[] = [];
  for (const f of files) if (fs.existsSync(f)) out.push(...parseLines(fs.readFileSync(f, 'utf8'), out.at(-1)?.seq ?? 0));
  return out;
}

/** The valid lines, in increasing seq after `after`: a garbage line (a crash mid-write) is skipped, not fatal. */
function parseLines(text: string, after: number): EventRecord[] {
  const out: EventRecord[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    let r: Partial<EventRecord> | undefined;
    try {
      r = JSON.parse(line) as Partial<EventRecord>;
    } catch {
      continue;
    }
    const ok = typeof r === 'object' && r !== null && Number.isSafeInteger(r.seq) && typeof r.time === 'string' && typeof r.event === 'string' && typeof r.node === 'string';
    if (ok && r.seq! > after) out.push(r as EventRecord), (after = r.seq!);
  }
  return out;
}

/** The events worth keeping (cluster state changes), not the chatter. */
export const RECORDED_EVENTS: ReadonlySet<string> = new Set([
  'node-online', 'node-lost', 'node-offline', 'quorum-lost', 'quorum-regained', 'self-fenced',
  'fence-started', 'fence-done', 'fence-failed', 'fence-skipped-by-force', 'takeover-start', 'takeover-done', 'failover-done',
  'role', 'promotion-granted', 'forced-promotion', 'crashed-primary-recovery',
  'pool-open', 'pool-closed', 'pool-created', 'pool-nearly-full', 'pool-failed',
  'disk-failed-recorded', 'disk-detached', 'peer-disk-lost',
  'resync-start', 'resync-done', 'resync-aborted', 'split-brain', 'split-brain-saved',
  'connected', 'disconnected', 'outdated', 'fenced-off', 'io-suspended', 'io-resumed',
  'handover-start', 'handover-done', 'handover-rollback-failed',
  'vm-started', 'vm-stopped', 'vm-exited', 'vm-autostarted', 'vm-autostart-failed', 'vm-migrated', 'vm-migrated-away', 'vm-migration-failed',
  'vm-memory-set', 'vm-disk-full', 'vm-stale-copy-ended', 'vm-start-without-prefer', 'vm-restarting', 'vm-restart-failed', 'vm-disks-lost', 'vm-incoming-from-lost',
  'drain-start', 'drain-done', 'rejoin-start', 'rejoin-done', 'alert-gave-up', 'alert-dropped', 'alert-spool-loaded', 'alert-spool-bad', 'alert-spool-failed', 'verify-done', 'event-loop-stall',
  // The cluster manager's steps (manager.ts, failover.ts, rejoin.ts).
  'node-unreachable', 'node-back', 'node-drained', 'node-undrained', 'node-yields', 'self-fence-ended', 'self-fence-skipped', 'step-down', 'step-down-failed',
  'takeover-promoted', 'takeover-promote-failed', 'takeover-vm-failed', 'takeover-incomplete', 'takeover-failed', 'storage-fenced', 'vm-left-out',
  'disk-failover-start', 'disk-failover-done', 'disk-failover-failed', 'vm-squeeze-failed', 'storage-unfenced', 'storage-fence-kept',
]);

const TAPPED: Record<string, Level> = { info: 'info', warn: 'warn', error: 'error', fatal: 'error' };

/**
 * A Logger that logs as `log` does and records its lines naming a
 * RECORDED_EVENTS event into `events`, whatever the log level: quieting
 * stderr (DUET_LOG_LEVEL=warn) must not empty the history. A child keeps
 * tapping, its bindings among the recorded fields. After events.close()
 * lines are only logged.
 */
export function tapEvents(log: Logger, events: EventLog): Logger {
  return tapped(log, events, {});
}

function tapped(log: Logger, events: EventLog, bindings: Record<string, unknown>): Logger {
  const methods: Record<string | symbol, unknown> = {
    child: (b: Record<string, unknown>, options?: ChildLoggerOptions<never>) => tapped(log.child(b, options), events, { ...bindings, ...b }),
  };
  for (const [name, level] of Object.entries(TAPPED)) {
    const original = log[name as 'info'];
    methods[name] = (...args: unknown[]) => {
      (original as (...a: unknown[]) => void).apply(log, args);
      tapLine(log, events, level, bindings, args);
    };
  }
  return new Proxy(log, { get: (target, prop) => (Object.hasOwn(methods, prop) ? methods[prop] : Reflect.get(target, prop, target)) });
}

/** pino's call forms: (obj, msg?, ...interpolation) or (msg, ...); only an obj can name an event. */
function tapLine(log: Logger, events: EventLog, level: Level, bindings: Record<string, unknown>, args: unknown[]): void {
  const [obj, msg, ...rest] = args;
  if (typeof obj !== 'object' || obj === null || events.closed) return;
  const { event, msg: objMsg, ...fields } = obj as Record<string, unknown>;
  if (typeof event !== 'string') return;
  // Every named line, recorded or not, for whoever counts them (the metrics: alerts sent, role changes).
  if (events.listenerCount('line') > 0) {
    try {
      events.emit('line', event, { ...bindings, ...fields });
    } catch {
      // A counter's failure must not fail the caller's log line.
    }
  }
  if (!RECORDED_EVENTS.has(event)) return;
  const message = typeof msg === 'string' ? format(msg, ...rest) : typeof objMsg === 'string' ? objMsg : event;
  try {
    events.record(event, { ...bindings, ...fields }, message, level);
  } catch (err) {
    // An 'event' listener's failure must not fail the caller's log line: said on the untapped log.
    log.warn({ event: 'event-record-failed', recorded: event, err: (err as Error)?.message }, `event ${event} not recorded: ${(err as Error)?.message}`);
  }
}

/** One line for people, local time: "2026-12-01 09:43:20.123  alpha  vm-started  vm web started on alpha". */
export function formatEvent(r: EventRecord): string {
  const t = new Date(r.time);
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  const when = `${t.getFullYear()}-${p(t.getMonth() + 1)}-${p(t.getDate())} ${p(t.getHours())}:${p(t.getMinutes())}:${p(t.getSeconds())}.${p(t.getMilliseconds(), 3)}`;
  return `${when}  ${r.node}  ${r.event}  ${r.message}`;
}
