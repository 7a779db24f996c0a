/**
 * Alerts not yet delivered, kept on disk like a mail spool: a daemon that
 * stops or crashes while alerts wait (the mail server was down during the
 * failover, the usual case for a home network whose router died with the
 * node) delivers them when it starts again, in the order they were raised.
 *
 * One file per alert and channel, DIR/<channel>/<seq>.json. It is written
 * under a temporary name of its own (pid and random), fsynced, and linked to
 * its final name, which fails if the name is taken: no number is used twice,
 * even by two processes, and a crash leaves the whole file or none. It is
 * removed once that channel sent the alert or gave it up. Each file carries
 * a format name, a version, its sequence number (the one in its name) and a
 * SHA-256 of all of that and the alert, so a damaged or renamed file is set
 * aside (NAME.bad, its number never reused), not sent as garbage or again
 * at every start. Delivery is at least once: an alert sent just before a
 * crash or a stop, its file not yet removed, is sent again.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import type { Logger } from '../util/log.js';
import type { Alert } from './alerts.js';

const FORMAT = 'duet-alert';
const VERSION = 1;
/** A spool file is a few KiB; anything much bigger is not one of ours. */
const FILE_BYTES_MAX = 1024 * 1024;
/** seq.json, seq.json.bad, seq.json.PID.RANDOM.tmp: the number is the file's. */
const NAME = /^(\d{12,15})\.json(\.bad|\.(\d+)\.[0-9a-f]+\.tmp)?$/;

const alertSchema = z.object({
  event: z.string(),
  node: z.string(),
  cluster: z.string(),
  time: z.string(),
  summary: z.string(),
  details: z.array(z.string()).optional(),
  data: z.record(z.unknown()).optional(),
});

const fileSchema = z.object({
  format: z.literal(FORMAT),
  version: z.literal(VERSION),
  seq: z.number().int().nonnegative(),
  channel: z.string(),
  sha256: z.string(),
  /** The alert's JSON text. */
  alert: z.string(),
});

/** An alert of one channel, saved (or being saved) in the spool. */
export interface Spooled {
  channel: string;
  alert: Alert;
  /** Settles once the file is durable: its path, or undefined if it could not be written (the alert still goes from memory). */
  saved: Promise<string | undefined>;
}

export class AlertSpool {
  private nextSeq = 1;
  /** Saves under way: a stop waits for them, so what it says it kept is on disk. */
  private readonly saving = new Set<Promise<string | undefined>>();

  private constructor(
    readonly dir: string,
    private readonly log: Logger,
  ) {}

  /**
   * Open the spool and read what waits in it, per channel, oldest first.
   * Alerts of a channel no longer configured are dropped (logged); damaged
   * files are set aside; half-written ones (a crash while saving) removed.
   */
  static open(dir: string, channels: readonly string[], log: Logger): { spool: AlertSpool; waiting: Map<string, Spooled[]> } {
    const spool = new AlertSpool(dir, log);
    const waiting = new Map<string, Spooled[]>();
    let maxSeq = 0;
    for (const channel of spool.list(dir)) {
      const sub = path.join(dir, channel);
      if (!spool.isDir(sub)) continue;
      const found: Array<{ seq: number; entry: Spooled }> = [];
      for (const name of spool.list(sub)) {
        const m = NAME.exec(name);
        if (!m) continue;
        const seq = Number(m[1]);
        // Every number seen is taken, set aside or not: a new alert never reuses one.
        maxSeq = Math.max(maxSeq, seq);
        const file = path.join(sub, name);
        if (m[3] !== undefined) {
          // Half-written by a process that died (a live one is still writing it).
          if (!alive(Number(m[3]))) spool.unlink(file);
          continue;
        }
        if (m[2] === '.bad') continue;
        const entry = spool.read(file, channel, seq);
        if (!entry) continue;
        if (!channels.includes(channel)) {
          log.warn({ event: 'alert-dropped', channel, alert: entry.alert.event, node: entry.alert.node, reason: 'channel no longer configured' }, `alert ${entry.alert.event} dropped: channel ${channel} is no longer configured`);
          spool.unlink(file);
          continue;
        }
        found.push({ seq, entry });
      }
      if (found.length) waiting.set(channel, found.sort((a, b) => a.seq - b.seq).map((f) => f.entry));
    }
    spool.nextSeq = maxSeq + 1;
    return { spool, waiting };
  }

  /** Save `alert` for `channel`; returns at once, the file is written in the background. */
  save(channel: string, alert: Alert): Spooled {
    // The number is taken now, before any await: alerts raised one after another keep their order on disk.
    const saved = this.write(channel, alert, this.nextSeq++);
    this.saving.add(saved);
    void saved.finally(() => this.saving.delete(saved));
    return { channel, alert, saved };
  }

  /** Save `alert` for `channel` before returning (a daemon that is stopping may exit right after). */
  saveNow(channel: string, alert: Alert): boolean {
    const body = this.bodyFor(channel, alert);
    if (body === undefined) return false;
    try {
      const sub = path.join(this.dir, channel);
      fs.mkdirSync(sub, { recursive: true, mode: 0o700 });
      for (let tries = 0; tries < 1000; tries++) {
        const seq = this.nextSeq++;
        const tmp = this.tmpName(channel, seq);
        const fd = fs.openSync(tmp, 'wx', 0o600);
        try {
          fs.writeSync(fd, body(seq));
          fs.fsyncSync(fd);
        } finally {
          fs.closeSync(fd);
        }
        try {
          fs.linkSync(tmp, this.file(channel, seq));
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'EEXIST') continue;
          throw err;
        } finally {
          fs.rmSync(tmp, { force: true });
        }
        const d = fs.openSync(sub, 'r');
        try {
          fs.fsyncSync(d);
        } finally {
          fs.closeSync(d);
        }
        return true;
      }
      throw new Error('no free sequence number after 1000 tries');
    } catch (err) {
      this.failed('save', channel, err);
      return false;
    }
  }

  /** Wait (bounded) until every save under way has ended. */
  async settled(timeoutMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.allSettled([...this.saving]), new Promise((resolve) => (timer = setTimeout(resolve, timeoutMs)))]);
    clearTimeout(timer);
  }

  /** `channel` is done with the alert (sent, given up or dropped): its file goes. */
  async remove(entry: Spooled): Promise<void> {
    const file = await entry.saved;
    if (!file) return;
    try {
      await fsp.unlink(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.failed('remove', entry.channel, err);
    }
  }

  private file(channel: string, seq: number): string {
    return path.join(this.dir, channel, `${String(seq).padStart(12, '0')}.json`);
  }

  private tmpName(channel: string, seq: number): string {
    return `${this.file(channel, seq)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  }

  /** The file's text for a sequence number, or undefined (logged) if the alert is not JSON. */
  private bodyFor(channel: string, alert: Alert): ((seq: number) => string) | undefined {
    let text: string;
    try {
      text = JSON.stringify(alert, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
    } catch (err) {
      this.failed('save', channel, err); // data that is not JSON (a cycle): it goes from memory only
      return undefined;
    }
    return (seq) => JSON.stringify({ format: FORMAT, version: VERSION, seq, channel, sha256: checksum(seq, channel, text), alert: text });
  }

  private async write(channel: string, alert: Alert, first: number): Promise<string | undefined> {
    const body = this.bodyFor(channel, alert);
    if (body === undefined) return undefined;
    const sub = path.join(this.dir, channel);
    let tmp: string | undefined;
    try {
      await fsp.mkdir(sub, { recursive: true, mode: 0o700 });
      for (let tries = 0; tries < 1000; tries++) {
        // Taken (another process, a file not seen at open): the next free number after all seen.
        const seq = tries === 0 ? first : this.nextSeq++;
        tmp = this.tmpName(channel, seq);
        const fh = await fsp.open(tmp, 'wx', 0o600);
        try {
          await fh.writeFile(body(seq));
          await fh.sync();
        } finally {
          await fh.close();
        }
        const file = this.file(channel, seq);
        try {
          // A link, not a rename: it fails if the number is taken (another process, a file not seen at open).
          await fsp.link(tmp, file);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
            await fsp.rm(tmp, { force: true });
            continue;
          }
          throw err;
        }
        await fsp.rm(tmp, { force: true });
        tmp = undefined;
        const dir = await fsp.open(sub, 'r');
        try {
          await dir.sync();
        } finally {
          await dir.close();
        }
        return file;
      }
      throw new Error('no free sequence number after 1000 tries');
    } catch (err) {
      this.failed('save', channel, err);
      if (tmp) await fsp.rm(tmp, { force: true }).catch(() => undefined);
      return undefined;
    }
  }

  /** One spooled alert, or undefined (a damaged file is renamed NAME.bad, with a warning). */
  private read(file: string, channel: string, seq: number): Spooled | undefined {
    let why: string;
    try {
      const st = fs.lstatSync(file);
      if (!st.isFile()) why = 'it is not a regular file';
      else if (st.size > FILE_BYTES_MAX) why = `it is ${st.size} bytes, not an alert`;
      else {
        const parsed = fileSchema.safeParse(JSON.parse(fs.readFileSync(file, 'utf8')));
        if (!parsed.success) why = `not a ${FORMAT} v${VERSION} file (${parsed.error.issues[0]?.path.join('.') || 'root'}: ${parsed.error.issues[0]?.message})`;
        else if (parsed.data.seq !== seq || parsed.data.channel !== channel) why = `it says it is number ${parsed.data.seq} of ${parsed.data.channel}, not ${seq} of ${channel}`;
        else if (parsed.data.sha256 !== checksum(seq, channel, parsed.data.alert)) why = 'its checksum does not match (damaged)';
        else {
          const alert = alertSchema.safeParse(JSON.parse(parsed.data.alert));
          if (!alert.success) why = `the alert in it is not an alert (${alert.error.issues[0]?.path.join('.')}: ${alert.error.issues[0]?.message})`;
          else return { channel, alert: alert.data as Alert, saved: Promise.resolve(file) };
        }
      }
    } catch (err) {
      why = `unreadable: ${(err as Error).message}`;
    }
    this.log.warn({ event: 'alert-spool-bad', file, reason: why }, `alert spool file ${file} set aside as ${path.basename(file)}.bad: ${why}`);
    try {
      fs.renameSync(file, `${file}.bad`);
    } catch {
      this.unlink(file);
    }
    return undefined;
  }

  private list(dir: string): string[] {
    try {
      return fs.readdirSync(dir);
    } catch (err) {
      // None yet is the usual case; anything else is worth a line (the alerts in it wait).
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.failed('read', undefined, err);
      return [];
    }
  }

  private isDir(p: string): boolean {
    try {
      return fs.lstatSync(p).isDirectory();
    } catch {
      return false;
    }
  }

  private unlink(file: string): void {
    try {
      fs.unlinkSync(file);
    } catch {
      // Gone already, or not ours to remove: nothing to send from it either way.
    }
  }

  private failed(what: 'save' | 'remove' | 'read', channel: string | undefined, err: unknown): void {
    const tail = what === 'read' ? 'the alerts in it are not sent until it can be read' : 'it is delivered from memory; a restart before then loses it';
    this.log.warn({ event: 'alert-spool-failed', channel, op: what, dir: this.dir, err: (err as Error).message }, `could not ${what} ${what === 'read' ? 'the alert spool' : 'an alert'} in ${this.dir}: ${(err as Error).message} (${tail})`);
  }
}

/** Whether a process with this pid runs (EPERM: it does, as another user). */
function alive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Of the header (number, channel) and the alert's text: a file copied under another name does not check out. */
function checksum(seq: number, channel: string, text: string): string {
  return createHash('sha256').update(`${FORMAT}\n${VERSION}\n${seq}\n${channel}\n${text}`).digest('hex');
}
