/**
 * A VM's serial console as `vm console` shows it: what QEMU writes now
 * (console.log, appended by QEMU) after what the VM printed before it came
 * to this node (console.history, the source's whole console at the end of a
 * migration). Positions are counted from the VM's first byte ever printed,
 * the same on every node, so `vm console --follow` goes on across a
 * migration without repeating or skipping a line.
 */
import fs from 'node:fs';
import path from 'node:path';

/** At most this much history moves with a VM (CONTRACT: at least the last 64 KiB). */
export const HISTORY_MAX = 1024 * 1024;
/** One answer of `vm console` carries at most this much. */
export const READ_MAX = 256 * 1024;

export interface ConsoleChunk {
  /** Position of the first byte still kept. */
  start: number;
  /** Position after the last byte printed so far. */
  end: number;
  /** The bytes from max(since, start) to end (at most READ_MAX of them, the last ones when since is absent). */
  text: string;
  /** Position of text's first byte. */
  from: number;
  /**
   * Position after the bytes `text` was decoded from: where the next read starts. Not from + the
   * length of text re-encoded: bytes that are not UTF-8 decode to a replacement character of another length.
   */
  next: number;
  /** The same bytes, base64 (asked with raw: what a migration's destination keeps must be byte for byte). */
  data?: string;
  /** When this node's copy last changed (ms since the epoch; 0: it has none). */
  updatedAt: number;
}

interface Base {
  start: number;
}

export class ConsoleLog {
  readonly live: string;
  private readonly history: string;
  private readonly base: string;

  constructor(readonly dir: string) {
    this.live = path.join(dir, 'console.log');
    this.history = path.join(dir, 'console.history');
    this.base = path.join(dir, 'console.base');
  }

  private readBase(): Base {
    try {
      const b = JSON.parse(fs.readFileSync(this.base, 'utf8')) as Base;
      return Number.isSafeInteger(b.start) && b.start >= 0 ? b : { start: 0 };
    } catch {
      return { start: 0 };
    }
  }

  /** Everything kept, as one buffer, and the position of its first byte. */
  all(): { start: number; bytes: Buffer } {
    const parts = [readOr(this.history), readOr(this.live)];
    return { start: this.readBase().start, bytes: Buffer.concat(parts) };
  }

  read(since?: number, options: { raw?: boolean } = {}): ConsoleChunk {
    const { start, bytes } = this.all();
    const end = start + bytes.length;
    const from = since === undefined ? Math.max(start, end - READ_MAX) : Math.min(Math.max(since, start), end);
    let to = since === undefined ? end : Math.min(end, from + READ_MAX);
    // A character cut at the end comes whole with the next read (not as two replacement characters).
    if (!options.raw) to = from + completeUtf8(bytes.subarray(from - start, to - start));
    const slice = bytes.subarray(from - start, to - start);
    const updatedAt = Math.max(...[this.live, this.history].map((f) => fs.statSync(f, { throwIfNoEntry: false })?.mtimeMs ?? 0));
    return { start, end, from, next: to, text: slice.toString('utf8'), updatedAt, ...(options.raw ? { data: slice.toString('base64') } : {}) };
  }

  /**
   * Take the console a VM had before it came here (a migration's source, whose QEMU is stopped: its
   * console is complete). QEMU here has printed nothing yet (the guest runs from the switchover on).
   */
  adopt(start: number, bytes: Buffer): void {
    const keep = bytes.length > HISTORY_MAX ? bytes.subarray(bytes.length - HISTORY_MAX) : bytes;
    const at = start + (bytes.length - keep.length);
    fs.mkdirSync(this.dir, { recursive: true });
    writeAtomic(this.history, keep);
    writeAtomic(this.base, Buffer.from(JSON.stringify({ start: at })));
  }

  /** A migration's destination: what an earlier run printed here is not this VM's latest console (adopt follows). */
  clearLive(): void {
    fs.rmSync(this.live, { force: true });
  }
}

/** How many bytes of `b` to take so as not to end inside a UTF-8 sequence (at most 3 are left for later). */
function completeUtf8(b: Buffer): number {
  for (let back = 1; back <= Math.min(3, b.length); back++) {
    const c = b[b.length - back];
    if ((c & 0xc0) === 0x80) continue; // a continuation byte: look further back for its lead
    const need = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 1;
    return need > back ? b.length - back : b.length;
  }
  return b.length;
}

function readOr(file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch {
    return Buffer.alloc(0);
  }
}

function writeAtomic(file: string, data: Buffer): void {
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, data);
  fs.renameSync(tmp, file);
}
