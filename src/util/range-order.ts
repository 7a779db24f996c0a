/**
 * Ordering of overlapping requests: a request that overlaps earlier ones
 * still in flight starts only after they finish, so two writes to the same
 * block land in the order they were issued (or received from the peer),
 * while requests to different blocks run in parallel. A barrier waits for
 * everything issued before it.
 *
 * Thousands of requests can be in flight (a resync window of 4 KiB pieces
 * on top of the application's writes), and each new one looks for the ones
 * it overlaps: the in-flight ranges are indexed by 4 MiB buckets, so that
 * look-up costs the buckets the range touches, not every request in flight.
 */
interface Entry {
  offset: number;
  end: number;
  done: Promise<void>;
}

const BUCKET_BYTES = 4 * 1024 * 1024;
/** Ranges over this many buckets (a trim of a whole device) are kept in one list scanned by every look-up. */
const WIDE_BUCKETS = 16;

export class RangeOrder {
  private readonly inFlight = new Set<Entry>();
  private readonly buckets = new Map<number, Set<Entry>>();
  private readonly wide = new Set<Entry>();

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
    const before = this.doneOf(offset, end);
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
    // Out of the index in the first reaction to `work`, before the caller's
    // own (registered after this one): a request it then issues to the same
    // range must not wait for one that is over.
    const entry: Entry = { offset, end, done: Promise.resolve() };
    const over = (): void => this.remove(entry);
    entry.done = work.then(over, over);
    this.add(entry);
    return work;
  }

  /** Resolves when every request registered so far has finished. */
  barrier(): Promise<void> {
    return Promise.all([...this.inFlight].map((e) => e.done)).then(() => undefined);
  }

  /** The in-flight ranges overlapping [offset, offset+length), as [start, end) pairs. */
  overlapping(offset: number, length: number): [number, number][] {
    const out: [number, number][] = [];
    this.forOverlapping(offset, offset + Math.max(length, 1), (e) => out.push([e.offset, e.end]));
    return out;
  }

  /** Resolves when every request overlapping the range, registered so far, has finished. */
  settled(offset: number, length: number): Promise<void> | undefined {
    const before = this.doneOf(offset, offset + Math.max(length, 1));
    return before ? Promise.all(before).then(() => undefined) : undefined;
  }

  private doneOf(offset: number, end: number): Promise<void>[] | undefined {
    let before: Promise<void>[] | undefined;
    this.forOverlapping(offset, end, (e) => (before ??= []).push(e.done));
    return before;
  }

  /** Each in-flight entry overlapping [offset, end) once, in no particular order. */
  private forOverlapping(offset: number, end: number, fn: (e: Entry) => void): void {
    if (this.inFlight.size === 0) return;
    const first = Math.floor(offset / BUCKET_BYTES);
    const last = Math.floor((end - 1) / BUCKET_BYTES);
    if (last - first + 1 >= this.inFlight.size) {
      // A range over more buckets than there are requests: looking at each request is cheaper.
      for (const e of this.inFlight) if (e.offset < end && offset < e.end) fn(e);
      return;
    }
    for (const e of this.wide) if (e.offset < end && offset < e.end) fn(e);
    // An entry over several buckets is in each of them: report it from the first bucket both share.
    for (let b = first; b <= last; b++) {
      const set = this.buckets.get(b);
      if (!set) continue;
      for (const e of set) {
        if (!(e.offset < end && offset < e.end)) continue;
        if (b > first && Math.floor(e.offset / BUCKET_BYTES) < b) continue;
        fn(e);
      }
    }
  }

  private add(e: Entry): void {
    this.inFlight.add(e);
    const first = Math.floor(e.offset / BUCKET_BYTES);
    const last = Math.floor((e.end - 1) / BUCKET_BYTES);
    if (last - first + 1 > WIDE_BUCKETS) {
      this.wide.add(e);
      return;
    }
    for (let b = first; b <= last; b++) {
      let set = this.buckets.get(b);
      if (!set) this.buckets.set(b, (set = new Set()));
      set.add(e);
    }
  }

  private remove(e: Entry): void {
    this.inFlight.delete(e);
    if (this.wide.delete(e)) return;
    const first = Math.floor(e.offset / BUCKET_BYTES);
    const last = Math.floor((e.end - 1) / BUCKET_BYTES);
    for (let b = first; b <= last; b++) {
      const set = this.buckets.get(b);
      if (!set) continue;
      set.delete(e);
      if (set.size === 0) this.buckets.delete(b);
    }
  }
}
