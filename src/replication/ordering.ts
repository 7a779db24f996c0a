/**
 * Ordering of overlapping requests: a request that overlaps earlier ones
 * still in flight starts only after they finish, so two writes to the same
 * block land in the order they were issued (or received from the peer),
 * while requests to different blocks run in parallel. A barrier waits for
 * everything issued before it.
 */
interface Entry {
  offset: number;
  end: number;
  done: Promise<void>;
}

export class RangeOrder {
  private readonly inFlight = new Set<Entry>();

  get size(): number {
    return this.inFlight.size;
  }

  /**
   * Register [offset, offset+length) now (in issue order) and run `fn` once
   * every earlier overlapping request is done. Synchronous when nothing
   * overlaps and `fn` is synchronous.
   */
  run<T>(offset: number, length: number, fn: () => T | Promise<T>): T | Promise<T> {
    const end = offset + Math.max(length, 1);
    let before: Promise<void>[] | undefined;
    for (const e of this.inFlight) if (e.offset < end && offset < e.end) (before ??= []).push(e.done);
    if (!before) {
      let result: T | Promise<T>;
      try {
        result = fn();
      } catch (err) {
        return Promise.reject(err);
      }
      if (!(result instanceof Promise)) return result;
      return this.track(offset, end, result);
    }
    return this.track(offset, end, Promise.all(before).then(fn));
  }

  private track<T>(offset: number, end: number, work: Promise<T>): Promise<T> {
    const entry: Entry = { offset, end, done: work.then(() => undefined, () => undefined) };
    this.inFlight.add(entry);
    void entry.done.then(() => this.inFlight.delete(entry));
    return work;
  }

  /** Resolves when every request registered so far has finished. */
  barrier(): Promise<void> {
    return Promise.all([...this.inFlight].map((e) => e.done)).then(() => undefined);
  }

  /** The in-flight ranges overlapping [offset, offset+length), as [start, end) pairs. */
  overlapping(offset: number, length: number): [number, number][] {
    const end = offset + Math.max(length, 1);
    const out: [number, number][] = [];
    for (const e of this.inFlight) if (e.offset < end && offset < e.end) out.push([e.offset, e.end]);
    return out;
  }

  /** Resolves when every request overlapping the range, registered so far, has finished. */
  settled(offset: number, length: number): Promise<void> | undefined {
    const end = offset + Math.max(length, 1);
    let before: Promise<void>[] | undefined;
    for (const e of this.inFlight) if (e.offset < end && offset < e.end) (before ??= []).push(e.done);
    return before ? Promise.all(before).then(() => undefined) : undefined;
  }
}
