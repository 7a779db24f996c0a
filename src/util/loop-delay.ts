/**
 * How late the event loop runs (perf_hooks.monitorEventLoopDelay). One
 * thread serves every peer link, export and API call of a node: a stall
 * longer than a link's ping timeout (500 ms by default) drops the link and
 * costs a resync, so the daemon keeps these figures and warns on stalls.
 *
 * The histogram samples on a timer of RESOLUTION_MS; what it records is the
 * time between two ticks, so the resolution is taken off: 0 is "on time".
 */
import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';
import type { Logger } from './log.js';

const RESOLUTION_MS = 10;
/** The node's figures cover windows this long. */
export const LOOP_WINDOW_MS = 10_000;
/** A delay this long in a window is logged: well under the ping timeout, where it starts to matter. */
export const LOOP_STALL_WARN_MS = 200;

export interface LoopDelayFigures {
  /** Ticks measured. */
  samples: number;
  meanMs: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

function late(ns: number): number {
  return Math.max(0, Math.round((ns / 1e6 - RESOLUTION_MS) * 100) / 100);
}

function figuresOf(h: IntervalHistogram): LoopDelayFigures {
  if (h.count === 0) return { samples: 0, meanMs: 0, p50Ms: 0, p99Ms: 0, maxMs: 0 };
  return { samples: h.count, meanMs: late(h.mean), p50Ms: late(h.percentile(50)), p99Ms: late(h.percentile(99)), maxMs: late(h.max) };
}

/** The loop's delay from now until stop() (a resync, a benchmark). */
export class LoopDelaySpan {
  private readonly h = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
  private final: LoopDelayFigures | undefined;

  constructor() {
    this.h.enable();
  }

  figures(): LoopDelayFigures {
    return this.final ?? figuresOf(this.h);
  }

  stop(): void {
    if (this.final) return;
    this.final = figuresOf(this.h);
    this.h.disable();
  }
}

export interface LoopDelayStatus {
  windowSeconds: number;
  /** The last whole window. */
  last: LoopDelayFigures;
  /** The worst p99 and max of any window since the daemon started. */
  worstP99Ms: number;
  worstMaxMs: number;
  /** Windows with a delay of LOOP_STALL_WARN_MS or more. */
  stallWindows: number;
}

/** The node's event loop, window by window; a stall is logged with the window it was in. */
export class LoopDelayMonitor {
  private readonly h = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
  private readonly timer: NodeJS.Timeout;
  private last: LoopDelayFigures = figuresOf(this.h);
  private worstP99Ms = 0;
  private worstMaxMs = 0;
  private stallWindows = 0;

  constructor(
    private readonly log: Logger,
    private readonly windowMs = LOOP_WINDOW_MS,
  ) {
    this.h.enable();
    this.timer = setInterval(() => this.roll(), windowMs);
    this.timer.unref();
  }

  private roll(): void {
    const f = figuresOf(this.h);
    this.h.reset();
    this.last = f;
    this.worstP99Ms = Math.max(this.worstP99Ms, f.p99Ms);
    this.worstMaxMs = Math.max(this.worstMaxMs, f.maxMs);
    if (f.maxMs >= LOOP_STALL_WARN_MS) {
      this.stallWindows++;
      this.log.warn({ event: 'event-loop-stall', windowSeconds: this.windowMs / 1000, ...f }, `the event loop stalled for ${f.maxMs} ms (peer links time out after their ping timeout)`);
    }
  }

  status(): LoopDelayStatus {
    return { windowSeconds: this.windowMs / 1000, last: this.last, worstP99Ms: this.worstP99Ms, worstMaxMs: this.worstMaxMs, stallWindows: this.stallWindows };
  }

  stop(): void {
    clearInterval(this.timer);
    this.h.disable();
  }
}
