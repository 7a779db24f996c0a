/**
 * Time as the replication code sees it: the wall clock and timers, behind
 * one interface, so a deterministic simulation can run the real code on a
 * fake clock (test/replication/sim) and the same seed replays the same run.
 * Everything else gets the real one.
 */
export interface TimerHandle {
  /** Do not keep the process alive for this timer (a no-op on a fake clock). */
  unref(): unknown;
}

export interface Clock {
  /** Milliseconds since the epoch. */
  now(): number;
  setTimeout(fn: () => void, ms: number): TimerHandle;
  clearTimeout(timer: TimerHandle | undefined): void;
  setInterval(fn: () => void, ms: number): TimerHandle;
  clearInterval(timer: TimerHandle | undefined): void;
}

export const realClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (timer) => clearTimeout(timer as NodeJS.Timeout | undefined),
  setInterval: (fn, ms) => setInterval(fn, ms),
  clearInterval: (timer) => clearInterval(timer as NodeJS.Timeout | undefined),
};
