import { type Clock, type TimerHandle, realClock } from './clock.js';

/**
 * Wait for `work`, but no longer than `ms`: true if it finished in time.
 * The timer is always cleared, so a finished wait keeps nothing alive.
 */
export async function finishedWithin(work: Promise<unknown>, ms: number, clock: Clock = realClock): Promise<boolean> {
  let timer: TimerHandle | undefined;
  const timedOut = new Promise<false>((resolve) => {
    timer = clock.setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([work.then(() => true as const), timedOut]);
  } finally {
    clock.clearTimeout(timer);
  }
}
