/**
 * Quiescing a pool: the gate every mutating data-path operation passes
 * (counted while in flight), which admin operations and checkpoints close
 * to see the maps with no write half done; and the lock that runs admin
 * operations one at a time.
 */
export class Gate {
  /** Mutating data-path operations in flight. */
  inflight = 0;
  /** Holders of the closed gate (quiesced sections nest). */
  closed = 0;
  private openWaiters: (() => void)[] = [];
  private drainWaiters: (() => void)[] = [];
  /** Set while a quiesced section works alone (alone()): other sections wait before their work. */
  private lone: Promise<void> | undefined;

  /** A data-path operation starts its part that must not overlap a quiesced section. */
  enter(): void {
    this.inflight++;
  }

  /** That part is done. */
  leave(): void {
    if (--this.inflight === 0 && this.drainWaiters.length > 0) wake(this.drainWaiters.splice(0));
  }

  /**
   * Inside a quiesced section: run `fn`, which reads the pool's state over
   * several turns of the event loop, with no other quiesced section starting
   * its work (changing that state) until it is done. Sections already under
   * way have made their (synchronous) change; data writes are kept out by
   * the section around this call.
   */
  async alone<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed === 0) throw new Error('Gate.alone outside a quiesced section');
    while (this.lone) await this.lone;
    let done!: () => void;
    this.lone = new Promise<void>((resolve) => (done = resolve));
    try {
      return await fn();
    } finally {
      this.lone = undefined;
      done();
    }
  }

  whenOpen(): Promise<void> {
    return new Promise((resolve) => this.openWaiters.push(resolve));
  }

  /** Wait until no mutating data-path operation is in flight, and keep new ones out while `fn` runs. */
  async quiesced<T>(fn: () => T | Promise<T>): Promise<T> {
    this.closed++;
    try {
      while (this.inflight > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
      while (this.lone) await this.lone;
      return await fn();
    } finally {
      if (--this.closed === 0) wake(this.openWaiters.splice(0));
    }
  }
}

/** Runs the functions given to it one at a time, in call order. */
export class OneAtATime {
  private last: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.last;
    let done!: () => void;
    this.last = new Promise<void>((resolve) => (done = resolve));
    await prev;
    try {
      return await fn();
    } finally {
      done();
    }
  }
}

function wake(waiters: (() => void)[]): void {
  for (const w of waiters) w();
}
