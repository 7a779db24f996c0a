/**
 * What an export's clients asked of it: requests, bytes and latency by
 * operation, kept as plain numbers on the I/O path (a few additions a
 * request) and read by the metrics at scrape time (src/api/metrics.ts).
 */
import * as P from './protocol.js';

export type IoOp = 'read' | 'write' | 'flush' | 'trim' | 'write_zeroes' | 'block_status' | 'cache';

/** Upper bounds in seconds, Prometheus-style (the last bucket is +Inf). */
export const LATENCY_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10];

const OP_OF: (IoOp | undefined)[] = [];
OP_OF[P.NBD_CMD_READ] = 'read';
OP_OF[P.NBD_CMD_WRITE] = 'write';
OP_OF[P.NBD_CMD_FLUSH] = 'flush';
OP_OF[P.NBD_CMD_TRIM] = 'trim';
OP_OF[P.NBD_CMD_CACHE] = 'cache';
OP_OF[P.NBD_CMD_WRITE_ZEROES] = 'write_zeroes';
OP_OF[P.NBD_CMD_BLOCK_STATUS] = 'block_status';

export class OpStats {
  requests = 0;
  errors = 0;
  bytes = 0;
  seconds = 0;
  /** Cumulative-free counts per bucket; index LATENCY_BUCKETS.length is +Inf. */
  readonly buckets = new Float64Array(LATENCY_BUCKETS.length + 1);

  observe(seconds: number): void {
    this.seconds += seconds;
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]) i++;
    this.buckets[i]++;
  }
}

export class ExportStats {
  readonly ops = new Map<IoOp, OpStats>();

  /** The stats of NBD command `type` (undefined for DISC and unknown types). */
  of(type: number): OpStats | undefined {
    const op = OP_OF[type];
    if (op === undefined) return undefined;
    let s = this.ops.get(op);
    if (!s) {
      s = new OpStats();
      this.ops.set(op, s);
    }
    return s;
  }
}

const hrtime = process.hrtime;

/** Now, in milliseconds from an arbitrary point (monotonic): a request's start, for since(). */
export function now(): number {
  const t = hrtime();
  return t[0] * 1e3 + t[1] / 1e6;
}

/** Seconds since a now() reading. */
export function since(t0: number): number {
  return (now() - t0) / 1000;
}
