/**
 * Long work in bounded slices. A loop whose steps complete synchronously
 * (page-cache reads, a socket with room, promises that are already
 * resolved) never gives the event loop a turn: its `await`s are microtasks,
 * and timers, socket reads and pings wait until the whole loop is done. A
 * Slicer gives the loop a turn (setImmediate: after pending I/O) once a
 * slice of SLICE_MS has run.
 */
import { setImmediate as nextTurn } from 'node:timers/promises';

/** Work between two turns of the event loop: well under the delay budget (p99 < 20 ms). */
export const SLICE_MS = 5;

/** Where a Slicer reads the time: the process's monotonic clock, or the resource's Clock (clock.ts). */
export interface SliceClock {
  now(): number;
}

const monotonic: SliceClock = { now: () => performance.now() };

export class Slicer {
  private since: number;

  /**
   * `clock`: the resource's clock where there is one. Under the simulator's
   * fake clock time stands still within an event, so a slice never ends and
   * the run stays the same for the same seed (a real turn of the event loop
   * would let real time decide the interleaving).
   */
  constructor(
    private readonly clock: SliceClock = monotonic,
    private readonly sliceMs = SLICE_MS,
  ) {
    this.since = clock.now();
  }

  /** A promise to await when the slice is used up (the event loop gets a turn), else undefined. */
  due(): Promise<void> | undefined {
    if (this.clock.now() - this.since < this.sliceMs) return undefined;
    return this.turn();
  }

  /** Give the event loop a turn now. */
  async turn(): Promise<void> {
    await nextTurn();
    this.since = this.clock.now();
  }
}

/** Give the event loop a turn (between two bounded pieces of work). */
export function yieldToLoop(): Promise<void> {
  return nextTurn().then(() => undefined);
}
