/**
 * Where a small write of an 'adaptive' FileDevice runs. On the calling
 * thread a 4 KiB page-cache write costs a few microseconds, half the cost of
 * a hop to libuv's pool and back (shared/bench/FINDINGS.md); but a write
 * can sleep in the kernel: balance_dirty_pages once dirty pages pass its
 * limit (up to 200 ms a call), ext4 waiting for its journal or for a page
 * under writeback (measured 140-370 ms on this machine under write load),
 * and on an event loop that stops every peer link and export with it.
 *
 * So: write on the calling thread while writes are fast. One that took
 * longer than slowWriteMs sends small writes to the pool for a back-off;
 * the first write after it is a probe on the calling thread again: slow,
 * the back-off doubles (up to maxBackoffMs, so a throttled disk costs one
 * sleep on the loop per back-off at most); fast, it is over.
 *
 * No prediction from the kernel's dirty level (/proc/meminfo against the
 * free-run ceiling of vm.dirty_*): measured (bench/README.md), the long
 * sleeps here came at a half to two thirds of that ceiling (a journal or a
 * page lock, not balance_dirty_pages), and the prediction kept writes in
 * the pool for as long as a writer kept the level up, at the pool's rate.
 */
export interface WriteBackoffOptions {
  /** A write on the calling thread longer than this (ms) is slow. Default 2. */
  slowWriteMs?: number;
  /** The first back-off after a slow write (ms). Default 100. */
  firstBackoffMs?: number;
  /** The longest back-off (ms). Default 10 000. */
  maxBackoffMs?: number;
  /** Monotonic milliseconds: default performance.now; tests inject a fake one. */
  clock?: () => number;
  /** Run after each write on the calling thread, before its end is taken: a test makes it slow by moving its clock. */
  afterSyncWrite?: () => void;
}

export interface WriteBackoffFigures {
  /** Small writes done on the calling thread. */
  onThread: number;
  /** Small writes sent to the pool by a back-off. */
  inPool: number;
  /** Writes on the calling thread that were slow. */
  slow: number;
  /** The longest a write on the calling thread took (ms). */
  slowestMs: number;
  /** The back-off now under way or last started (ms; 0: writes are fast). */
  backoffMs: number;
}

export class WriteBackoff {
  private readonly slowWriteMs: number;
  private readonly firstBackoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly clock: () => number;
  private readonly afterSyncWrite: (() => void) | undefined;
  private poolUntil = -Infinity;
  private backoffMs = 0;
  private readonly figures: WriteBackoffFigures = { onThread: 0, inPool: 0, slow: 0, slowestMs: 0, backoffMs: 0 };

  constructor(options: WriteBackoffOptions = {}) {
    this.slowWriteMs = options.slowWriteMs ?? 2;
    this.firstBackoffMs = options.firstBackoffMs ?? 100;
    this.maxBackoffMs = Math.max(this.firstBackoffMs, options.maxBackoffMs ?? 10_000);
    this.clock = options.clock ?? (() => performance.now());
    this.afterSyncWrite = options.afterSyncWrite;
  }

  /** The start time of a write that may run on the calling thread now; undefined: it goes to the pool. */
  begin(): number | undefined {
    const now = this.clock();
    if (now < this.poolUntil) {
      this.figures.inPool++;
      return undefined;
    }
    this.figures.onThread++;
    return now;
  }

  /** The write begun at `started` (on the calling thread) is done. */
  end(started: number): void {
    this.afterSyncWrite?.();
    const now = this.clock();
    const took = now - started;
    if (took > this.figures.slowestMs) this.figures.slowestMs = took;
    if (took <= this.slowWriteMs) {
      this.backoffMs = 0;
      return;
    }
    this.figures.slow++;
    this.backoffMs = this.backoffMs === 0 ? this.firstBackoffMs : Math.min(this.backoffMs * 2, this.maxBackoffMs);
    this.poolUntil = now + this.backoffMs;
  }

  stats(): WriteBackoffFigures {
    return { ...this.figures, backoffMs: this.backoffMs };
  }
}
