/**
 * The simulation's time: one queue of events on a fake clock, run one at a
 * time, each followed by every promise and nextTick it set off, so the
 * replication code (which sees only `Clock`) runs the same way for the same
 * seed. Nothing here uses a real timer; the only real macrotask is the
 * setImmediate that lets the microtasks of one event drain before the next.
 *
 * Each timer belongs to an Owner (a node's process, the network, the
 * simulation itself): a process that dies takes its timers with it, and
 * nothing it scheduled ever runs again.
 */
import type { Clock, TimerHandle } from '../../../src/util/clock.js';

export class Owner {
  alive = true;
  constructor(readonly name: string) {}
  kill(): void {
    this.alive = false;
  }
}

interface SimEvent extends TimerHandle {
  at: number;
  seq: number;
  fn: () => void;
  owner: Owner;
  cancelled: boolean;
  /** Repeat period (setInterval), or 0. */
  every: number;
}

/**
 * How long an empty queue is waited on before the run is declared stuck:
 * turns of the event loop, never real time (what is still under way then is
 * promises and turns the code asked for, the same number on any machine).
 */
const IDLE_TURNS = 200;

/** Where fake time starts (ms since the epoch: a plausible date, so promotion times look real). */
export const EPOCH = 1_700_000_000_000;

export class Scheduler {
  now = EPOCH;
  /** Events run so far. */
  ran = 0;
  private readonly heap: SimEvent[] = [];
  private seq = 0;

  /** Run `fn` in `ms` fake milliseconds (at least a microsecond later: nothing runs inside the event that scheduled it). */
  timer(ms: number, fn: () => void, owner: Owner, every = 0): TimerHandle {
    const ev: SimEvent = { at: this.now + Math.max(0.001, ms), seq: this.seq++, fn, owner, cancelled: false, every, unref: () => ev };
    this.push(ev);
    return ev;
  }

  cancel(t: TimerHandle | undefined): void {
    if (t) (t as SimEvent).cancelled = true;
  }

  get pending(): number {
    return this.heap.length;
  }

  /**
   * Run events until `done()` holds (checked after each event and its
   * microtasks), fake time passes `deadline`, or nothing is left to run.
   * `afterEach` runs after every event (the invariants).
   */
  async run(done: () => boolean, deadline: number, afterEach: () => void): Promise<'done' | 'deadline' | 'idle'> {
    for (;;) {
      if (done()) return 'done';
      const ev = this.pop();
      if (!ev) {
        // Promises may still be settling from the last event (a slice of work that gave the event loop a
        // turn, the driver between two steps): some turns before "nothing left to do". Counted in turns,
        // not real time: a run that waited for real time would end differently on a loaded machine.
        for (let turn = 0; turn < IDLE_TURNS && this.heap.length === 0 && !done(); turn++) await drain();
        if (done()) return 'done';
        if (this.heap.length === 0) return 'idle';
        continue;
      }
      if (ev.cancelled || !ev.owner.alive) continue;
      if (ev.at > deadline) {
        this.push(ev);
        this.now = deadline;
        return 'deadline';
      }
      this.now = ev.at;
      if (ev.every > 0) {
        ev.at = this.now + ev.every;
        ev.seq = this.seq++;
        this.push(ev);
      }
      this.ran++;
      ev.fn();
      await drain();
      afterEach();
    }
  }

  private push(ev: SimEvent): void {
    const h = this.heap;
    h.push(ev);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i], h[p])) break;
      [h[i], h[p]] = [h[p], h[i]];
      i = p;
    }
  }

  private pop(): SimEvent | undefined {
    const h = this.heap;
    if (h.length === 0) return undefined;
    const top = h[0];
    const last = h.pop()!;
    if (h.length > 0) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && before(h[l], h[m])) m = l;
        if (r < h.length && before(h[r], h[m])) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
    return top;
  }
}

function before(a: SimEvent, b: SimEvent): boolean {
  return a.at < b.at || (a.at === b.at && a.seq < b.seq);
}

/** Let every promise and nextTick set off so far run (one real macrotask turn). */
export function drain(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** The clock one owner's code sees: fake time, timers that die with the owner. */
export class OwnerClock implements Clock {
  constructor(
    private readonly s: Scheduler,
    readonly owner: Owner,
  ) {}
  /** Whole milliseconds, as Date.now(). */
  now(): number {
    return Math.floor(this.s.now);
  }
  setTimeout(fn: () => void, ms: number): TimerHandle {
    return this.s.timer(ms, fn, this.owner);
  }
  clearTimeout(t: TimerHandle | undefined): void {
    this.s.cancel(t);
  }
  setInterval(fn: () => void, ms: number): TimerHandle {
    return this.s.timer(ms, fn, this.owner, Math.max(0.001, ms));
  }
  clearInterval(t: TimerHandle | undefined): void {
    this.s.cancel(t);
  }
  /** A promise resolved `ms` from now (never, if the owner dies first). */
  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => this.s.timer(ms, resolve, this.owner));
  }
}
