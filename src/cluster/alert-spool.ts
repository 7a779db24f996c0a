/**
 * Alerts not yet delivered, kept on disk like a mail spool: a daemon that
 * stops or crashes while alerts wait (the mail server was down during the
 * failover, the usual case for a home network whose router died with the
 * node) delivers them when it starts again, in the order they were raised.
 *
 * One file per alert and channel, DIR/<channel>/<seq>.json, written to a
 * temporary name, fsynced and renamed (a crash leaves the whole file or
 * none), removed once that channel sent the alert or gave it up. Each file
 * carries a format name, a version, its sequence number and a SHA-256 of
 * the alert, so a damaged file is set aside (NAME.bad), not sent as
 * garbage. Delivery is at least once: an alert sent just before a crash,
 * its file not yet removed, is sent again.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import type { Logger } from '../util/log.js';
import type { Alert } from './alerts.js';

const FORMAT = 'duet-alert';
const VERSION = 1;

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
  /** The alert's JSON text: the checksum is of exactly these bytes. */
  alert: z.string(),
});

/** An alert of one channel, saved (or being saved) in the spool. */
export interface Spooled {
  channel: string;
  seq: number;
  alert: Alert;
  /** Settles once the file is durable (false: it could not be written; the alert still goes from memory). */
  saved: Promise<boolean>;
}

export class AlertSpool {
  private nextSeq = 1;

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
    let names: string[] = [];
    try {
      names = fs.readdirSync(dir);
    } catch {
      // No spool yet: nothing waits.
    }
    let maxSeq = 0;
    for (const channel of names) {
      const sub = path.join(dir, channel);
      let files: string[];
      try {
        if (!fs.statSync(sub).isDirectory()) continue;
        files = fs.readdirSync(sub);
      } catch {
        continue;
      }
      const found: Spooled[] = [];
      for (const name of files) {
        const file = path.join(sub, name);
        if (name.endsWith('.tmp')) {
          spool.unlink(file);
          continue;
        }
        if (!name.endsWith('.json')) continue;
        const entry = spool.read(file, channel);
        if (!entry) continue;
        maxSeq = Math.max(maxSeq, entry.seq);
        if (!channels.includes(channel)) {
          log.warn({ event: 'alert-dropped', channel, alert: entry.alert.event, node: entry.alert.node, reason: 'channel no longer configured' }, `alert ${entry.alert.event} dropped: channel ${channel} is no longer configured`);
          spool.unlink(file);
          continue;
        }
        found.push(entry);
      }
      if (found.length) waiting.set(channel, found.sort((a, b) => a.seq - b.seq));
    }
    spool.nextSeq = maxSeq + 1;
    return { spool, waiting };
  }

  /** Save `alert` for `channel`; returns at once, the file is written in the background. */
  save(channel: string, alert: Alert): Spooled {
    const seq = this.nextSeq++;
    const entry: Spooled = { channel, seq, alert, saved: Promise.resolve(false) };
    entry.saved = this.write(channel, seq, alert);
    return entry;
  }

  /** `channel` is done with the alert (sent, given up or dropped): its file goes. */
  async remove(entry: Spooled): Promise<void> {
    if (!(await entry.saved)) return;
    try {
      await fsp.unlink(this.file(entry.channel, entry.seq));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.failed('remove', entry.channel, err);
    }
  }

  private file(channel: string, seq: number): string {
    return path.join(this.dir, channel, `${String(seq).padStart(12, '0')}.json`);
  }

  private async write(channel: string, seq: number, alert: Alert): Promise<boolean> {
    const file = this.file(channel, seq);
    const tmp = `${file}.tmp`;
    let body: string;
    try {
      const text = JSON.stringify(alert, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
      body = JSON.stringify({ format: FORMAT, version: VERSION, seq, channel, sha256: checksum(text), alert: text });
    } catch (err) {
      this.failed('save', channel, err); // data that is not JSON (a cycle): it goes from memory only
      return false;
    }
    try {
      await fsp.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
      const fh = await fsp.open(tmp, 'w', 0o600);
      try {
        await fh.writeFile(body);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fsp.rename(tmp, file);
      const dir = await fsp.open(path.dirname(file), 'r');
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
      return true;
    } catch (err) {
      this.failed('save', channel, err);
      await fsp.rm(tmp, { force: true }).catch(() => undefined);
      return false;
    }
  }

  /** One spooled alert, or undefined (a damaged file is renamed NAME.bad, with a warning). */
  private read(file: string, channel: string): Spooled | undefined {
    let why: string;
    try {
      const parsed = fileSchema.safeParse(JSON.parse(fs.readFileSync(file, 'utf8')));
      if (!parsed.success) why = `not a ${FORMAT} v${VERSION} file (${parsed.error.issues[0]?.path.join('.') || 'root'}: ${parsed.error.issues[0]?.message})`;
      else if (parsed.data.channel !== channel) why = `it belongs to channel ${parsed.data.channel}, not ${channel}`;
      else if (parsed.data.sha256 !== checksum(parsed.data.alert)) why = 'its checksum does not match (damaged)';
      else {
        const alert = alertSchema.safeParse(JSON.parse(parsed.data.alert));
        if (!alert.success) why = `the alert in it is not an alert (${alert.error.issues[0]?.path.join('.')}: ${alert.error.issues[0]?.message})`;
        else return { channel, seq: parsed.data.seq, alert: alert.data as Alert, saved: Promise.resolve(true) };
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

  private unlink(file: string): void {
    try {
      fs.unlinkSync(file);
    } catch {
      // Gone already, or not ours to remove: nothing to send from it either way.
    }
  }

  private failed(what: 'save' | 'remove', channel: string, err: unknown): void {
    this.log.warn({ event: 'alert-spool-failed', channel, op: what, dir: this.dir, err: (err as Error).message }, `could not ${what} an alert in ${this.dir}: ${(err as Error).message} (it is delivered from memory; a restart before then loses it)`);
  }
}

function checksum(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}
