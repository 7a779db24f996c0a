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

  read(since?: number): ConsoleChunk {
    const { start, bytes } = this.all();
    const end = start + bytes.length;
    const from = since === undefined ? Math.max(start, end - READ_MAX) : Math.min(Math.max(since, start), end);
    const to = since === undefined ? end : Math.min(end, from + READ_MAX);
    const updatedAt = Math.max(...[this.live, this.history].map((f) => fs.statSync(f, { throwIfNoEntry: false })?.mtimeMs ?? 0));
    return { start, end, from, text: bytes.subarray(from - start, to - start).toString('utf8'), updatedAt };
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
