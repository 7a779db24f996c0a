/**
 * Worker threads for `duet serve`: the main thread accepts connections and
 * hands each one (a dup'd descriptor) to the least busy worker, which runs
 * the handshake and transmission on its own event loop with its own
 * descriptors on the exported files. Files are shared through the kernel's
 * page cache, and flush is fdatasync of the file, so NBD_FLAG_CAN_MULTI_CONN
 * holds across threads exactly as across connections of one thread.
 */
import type net from 'node:net';
import { Worker } from 'node:worker_threads';
import { native } from '../blockdev/native.js';
import type { TransmissionStats } from '../nbd/transmission.js';
import type { Logger } from '../util/log.js';
import { finishedWithin } from '../util/timeout.js';
import type { ExportSpec, TlsFiles } from './serve.js';

export interface WorkerSetup {
  exports: ExportSpec[];
  readOnly: boolean;
  tls?: TlsFiles;
}

/** Messages between the main thread and a worker. */
export type ToWorker = { type: 'connection'; fd: number; peer: string } | { type: 'shutdown' };
export type FromWorker =
  | { type: 'ready' }
  | { type: 'failed'; message: string }
  | { type: 'load'; connections: number }
  | { type: 'stopped'; stats: TransmissionStats };

const START_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 15_000;

interface Slot {
  worker: Worker;
  index: number;
  connections: number;
  alive: boolean;
  stopped: Promise<void>;
}

export class ServeWorkers {
  private readonly slots: Slot[] = [];
  private nextIndex = 0;
  readonly stats: TransmissionStats[] = [];

  private constructor(private readonly log: Logger) {}

  /** Start `count` workers; those that fail to start are logged and left out. */
  static async start(count: number, setup: WorkerSetup, log: Logger): Promise<ServeWorkers> {
    const pool = new ServeWorkers(log);
    await Promise.all(Array.from({ length: count }, (_, i) => pool.spawn(i, setup)));
    return pool;
  }

  get count(): number {
    return this.slots.filter((s) => s.alive).length;
  }

  private spawn(index: number, setup: WorkerSetup): Promise<void> {
    const worker = new Worker(new URL('./serve-worker.js', import.meta.url), { workerData: setup });
    let resolveStopped!: () => void;
    const slot: Slot = {
      worker,
      index,
      connections: 0,
      alive: false,
      stopped: new Promise((r) => (resolveStopped = r)),
    };
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.log.error({ event: 'worker did not start', worker: index });
        void worker.terminate();
        resolve();
      }, START_TIMEOUT_MS);
      worker.on('message', (m: FromWorker) => {
        switch (m.type) {
          case 'ready':
            clearTimeout(timer);
            slot.alive = true;
            this.slots.push(slot);
            resolve();
            break;
          case 'failed':
            clearTimeout(timer);
            this.log.error({ event: 'worker failed to start', worker: index, err: m.message });
            resolve();
            break;
          case 'load':
            slot.connections = m.connections;
            break;
          case 'stopped':
            this.stats.push(m.stats);
            resolveStopped();
            break;
        }
      });
      worker.on('error', (err) => {
        // A worker that dies takes only its own connections with it.
        this.log.error({ event: 'worker died', worker: index, err: err.stack ?? err.message });
        slot.alive = false;
      });
      worker.on('exit', (code) => {
        clearTimeout(timer);
        if (slot.alive) this.log.error({ event: 'worker exited', worker: index, code });
        slot.alive = false;
        resolveStopped();
        resolve();
      });
    });
  }

  /** Give an accepted socket to the least busy live worker; false if none can take it. */
  handoff(socket: net.Socket): boolean {
    const live = this.slots.filter((s) => s.alive);
    if (live.length === 0 || !native) return false;
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd !== 'number' || fd < 0) return false;
    let min = Infinity;
    for (const s of live) min = Math.min(min, s.connections);
    // Among the least busy, rotate so simultaneous connections spread out.
    const candidates = live.filter((s) => s.connections === min);
    const slot = candidates[this.nextIndex++ % candidates.length];
    let copy: number;
    try {
      copy = native.dup(fd);
    } catch (err) {
      this.log.warn({ event: 'handoff failed', err: (err as Error).message });
      return false;
    }
    const peer = `${socket.remoteAddress ?? 'unix'}:${socket.remotePort ?? ''}`;
    socket.destroy(); // closes our descriptor; the worker owns the copy
    slot.connections++; // until the worker reports its own count
    slot.worker.postMessage({ type: 'connection', fd: copy, peer } satisfies ToWorker);
    return true;
  }

  /** Each worker drains its connections, flushes and closes its devices. */
  async stop(): Promise<void> {
    const waits = this.slots.map(async (s) => {
      if (s.alive) s.worker.postMessage({ type: 'shutdown' } satisfies ToWorker);
      const inTime = await finishedWithin(s.stopped, STOP_TIMEOUT_MS);
      if (!inTime && s.alive) this.log.warn({ event: 'worker stop timeout', worker: s.index });
      s.alive = false;
      await s.worker.terminate();
    });
    await Promise.all(waits);
  }
}
