/**
 * A VM's serial console as `vm console` shows it: what QEMU writes now
 * (console.log, appended by QEMU) after what the VM printed before it came
 * to this node (console.history, the source's whole console at the end of a
 * migration). Positions are counted from the VM's first byte ever printed,
 * the same on every node, so `vm console --follow` goes on across a
 * migration without repeating or skipping a line.
 *
 * Bounded: once console.log holds more than LIVE_MAX new bytes, they move
 * into console.history (whose last HISTORY_MAX bytes are kept) and their
 * blocks are punched out of console.log (QEMU appends to it all along, so
 * it keeps its length, with a hole where they were). console.history starts
 * with one header line saying the position of its first byte and how much
 * of console.log it holds already (`skip`); it is replaced whole (rename),
 * so a crash leaves the old or the new one. Without the native add-on,
 * console.log is truncated instead (what QEMU appends in between is lost).
 */
import fs from 'node:fs';
import path from 'node:path';
import { native } from '../blockdev/native.js';

/** At most this much history moves with a VM (CONTRACT: at least the last 64 KiB). */
export const HISTORY_MAX = 1024 * 1024;
/** One answer of `vm console` carries at most this much. */
export const READ_MAX = 256 * 1024;
/** console.log bytes beyond this move into console.history (checked now and then by the daemon). */
export const LIVE_MAX = 4 * 1024 * 1024;

const HEADER = /^duet-console v1 start=(\d+) skip=(\d+)\n/;

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

interface History {
  /** Position of the first byte of `bytes`. */
  start: number;
  /** console.log's first `skip` bytes are in `bytes` already (or punched out). */
  skip: number;
  bytes: Buffer;
}

export interface ConsoleOptions {
  /** How console.log's moved bytes are freed: the native punch-hole (default when built), or null: truncate it. */
  punch?: ((fd: number, offset: number, length: number) => void) | null;
  liveMax?: number;
}

export class ConsoleLog {
  readonly live: string;
  private readonly history: string;
  /** Where versions before the header kept the start position. */
  private readonly legacyBase: string;
  private readonly punch: ((fd: number, offset: number, length: number) => void) | null;
  private readonly liveMax: number;

  constructor(
    readonly dir: string,
    options: ConsoleOptions = {},
  ) {
    this.live = path.join(dir, 'console.log');
    this.history = path.join(dir, 'console.history');
    this.legacyBase = path.join(dir, 'console.base');
    this.punch = options.punch !== undefined ? options.punch : native ? (fd, offset, length) => native!.punchHole(fd, offset, length) : null;
    this.liveMax = options.liveMax ?? LIVE_MAX;
  }

  private readHistory(): History {
    const raw = readOr(this.history);
    const m = HEADER.exec(raw.subarray(0, 80).toString('latin1'));
    if (m) return { start: Number(m[1]), skip: Number(m[2]), bytes: raw.subarray(m[0].length) };
    let start = 0;
    try {
      const b = JSON.parse(fs.readFileSync(this.legacyBase, 'utf8')) as { start: number };
      if (Number.isSafeInteger(b.start) && b.start >= 0) start = b.start;
    } catch {
      // none: the console starts here
    }
    return { start, skip: 0, bytes: raw };
  }

  private writeHistory(h: History): void {
    fs.mkdirSync(this.dir, { recursive: true });
    writeAtomic(this.history, Buffer.concat([Buffer.from(`duet-console v1 start=${h.start} skip=${h.skip}\n`, 'latin1'), h.bytes]));
    fs.rmSync(this.legacyBase, { force: true });
  }

  /** console.log from byte `skip` on (all of it when it is shorter: it was truncated after the history was written). */
  private readLive(skip: number): Buffer {
    let fd: number;
    try {
      fd = fs.openSync(this.live, 'r');
    } catch {
      return Buffer.alloc(0);
    }
    try {
      const size = fs.fstatSync(fd).size;
      const from = size >= skip ? skip : 0;
      const out = Buffer.alloc(size - from);
      let got = 0;
      while (got < out.length) {
        const n = fs.readSync(fd, out, got, out.length - got, from + got);
        if (n === 0) break;
        got += n;
      }
      return out.subarray(0, got);
    } finally {
      fs.closeSync(fd);
    }
  }

  /** Everything kept, as one buffer, and the position of its first byte. */
  all(): { start: number; bytes: Buffer } {
    const h = this.readHistory();
    return { start: h.start, bytes: Buffer.concat([h.bytes, this.readLive(h.skip)]) };
  }

  /**
   * Keep the console bounded (see the file's comment): move console.log's bytes into the history once
   * there are more than liveMax of them. True when it moved some.
   */
  rotate(): boolean {
    const h = this.readHistory();
    const size = fs.statSync(this.live, { throwIfNoEntry: false })?.size ?? 0;
    const skip = size >= h.skip ? h.skip : 0;
    if (size - skip <= this.liveMax) return false;
    const fresh = this.readLive(skip);
    const upTo = skip + fresh.length;
    const joined = Buffer.concat([h.bytes, fresh]);
    const keep = joined.length > HISTORY_MAX ? joined.subarray(joined.length - HISTORY_MAX) : joined;
    const start = h.start + (joined.length - keep.length);
    // First the history that holds them (a crash after it leaves them counted once: skip says so), then free them.
    this.writeHistory({ start, skip: upTo, bytes: keep });
    if (this.punch) {
      const fd = fs.openSync(this.live, 'r+');
      try {
        this.punch(fd, 0, upTo);
      } finally {
        fs.closeSync(fd);
      }
    } else {
      fs.truncateSync(this.live, 0);
      this.writeHistory({ start, skip: 0, bytes: keep });
    }
    return true;
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
    this.writeHistory({ start: at, skip: 0, bytes: keep });
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
