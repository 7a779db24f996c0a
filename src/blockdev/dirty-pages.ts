/**
 * How close the kernel is to throttling writers of page-cache pages. Linux
 * (mm/page-writeback.c, balance_dirty_pages) lets writers run free while
 * dirty + under-writeback pages stay under the free-run ceiling, half way
 * between the background and the hard dirty limits; above it, each writer
 * sleeps in proportion. The limits are vm.dirty_bytes / dirty_ratio and
 * vm.dirty_background_bytes / dirty_background_ratio, the ratios of the
 * dirtyable memory (free pages plus file pages: not MemAvailable, which also
 * counts reclaimable slab). Cgroup-v2 writeback limits are not seen here.
 *
 * Read from /proc at most every intervalMs (a few small files), never per write.
 */
import fs from 'node:fs';
import path from 'node:path';

export interface DirtyLevel {
  /** Dirty + Writeback bytes. */
  dirtyBytes: number;
  /** Where the kernel starts throttling writers. */
  freerunBytes: number;
}

/** The level now, or undefined where /proc does not say (not Linux). */
export function readDirtyLevel(proc = '/proc'): DirtyLevel | undefined {
  try {
    const mem = new Map<string, number>();
    for (const line of fs.readFileSync(path.join(proc, 'meminfo'), 'utf8').split('\n')) {
      const m = /^([^:]+):\s+(\d+)\s*kB/.exec(line);
      if (m) mem.set(m[1], Number(m[2]) * 1024);
    }
    const vm = (name: string): number => Number(fs.readFileSync(path.join(proc, 'sys/vm', name), 'utf8').trim());
    const kb = (name: string): number => {
      const v = mem.get(name);
      if (v === undefined) throw new Error(`meminfo: no ${name}`);
      return v;
    };
    const dirtyable = kb('MemFree') + kb('Active(file)') + kb('Inactive(file)');
    const limit = vm('dirty_bytes') || (vm('dirty_ratio') * dirtyable) / 100;
    let background = vm('dirty_background_bytes') || (vm('dirty_background_ratio') * dirtyable) / 100;
    if (background >= limit) background = limit / 2; // as the kernel does
    const level = { dirtyBytes: kb('Dirty') + kb('Writeback'), freerunBytes: (background + limit) / 2 };
    return Number.isFinite(level.dirtyBytes) && Number.isFinite(level.freerunBytes) ? level : undefined;
  } catch {
    return undefined;
  }
}

export interface DirtyPagesOptions {
  /** Read /proc at most this often (ms). Default 100. */
  intervalMs?: number;
  /** Near: dirty at this fraction of the free-run ceiling or more. Default 0.9. */
  nearFraction?: number;
  /** Where the level comes from (tests: a directory laid out as /proc). */
  proc?: string;
}

export class DirtyPages {
  private readonly intervalMs: number;
  private readonly nearFraction: number;
  private readonly proc: string | undefined;
  private readAt = -Infinity;
  private level: DirtyLevel | undefined;

  constructor(options: DirtyPagesOptions = {}) {
    this.intervalMs = options.intervalMs ?? 100;
    this.nearFraction = options.nearFraction ?? 0.9;
    this.proc = options.proc;
  }

  /** Whether writers are being throttled or about to be, as of `now` (monotonic ms). */
  near(now: number): boolean {
    if (now - this.readAt >= this.intervalMs) {
      this.readAt = now;
      this.level = readDirtyLevel(this.proc);
    }
    return this.level !== undefined && this.level.dirtyBytes >= this.nearFraction * this.level.freerunBytes;
  }
}
