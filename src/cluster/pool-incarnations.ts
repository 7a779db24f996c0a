/**
 * The pools this node serves, by incarnation (one open of a pool,
 * Pool.incarnation), and how the last one ended: closed cleanly (every
 * acknowledged write's mapping committed) or not (the daemon died with
 * the pool open: mappings it had not committed are gone).
 *
 * A VM's disk remembers the incarnation it wrote to. When its connection
 * breaks, its daemon asks the serving node how that incarnation ended: a
 * clean end (a daemon restarted by its service manager, a handover) lets
 * the guest go on; an unclean one means the guest may have been told
 * writes were done that are gone, so it restarts, as after a crash of its
 * disk (VmManager.recover).
 *
 * Kept in HOME/pool-incarnations.json, written at each open and close
 * (temp file, rename): a daemon killed with a pool open finds it "open" at
 * its next start and records that incarnation as ended uncleanly.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../util/log.js';

export type IncarnationEnd = 'open' | 'clean' | 'unclean' | 'unknown';

export interface PoolIncarnation {
  /** The incarnation serving now (open). */
  current?: string;
  /** The last one that ended, and whether cleanly. */
  ended?: { incarnation: string; clean: boolean };
}

export class PoolIncarnations {
  private readonly pools: Record<string, PoolIncarnation>;

  constructor(
    private readonly file: string,
    private readonly log: Logger,
  ) {
    this.pools = this.load();
    let changed = false;
    for (const p of Object.values(this.pools)) {
      if (p.current === undefined) continue;
      // Open when the last daemon ended: it died with the pool open.
      p.ended = { incarnation: p.current, clean: false };
      delete p.current;
      changed = true;
    }
    if (changed) this.save();
  }

  private load(): Record<string, PoolIncarnation> {
    let text: string;
    try {
      text = fs.readFileSync(this.file, 'utf8');
    } catch {
      return {}; // none yet
    }
    try {
      const j = JSON.parse(text) as { pools?: Record<string, PoolIncarnation> };
      const out: Record<string, PoolIncarnation> = {};
      for (const [pool, p] of Object.entries(j.pools ?? {})) {
        const id = (v: unknown): string | undefined => (typeof v === 'string' && /^[0-9a-f]{16}$/.test(v) ? v : undefined);
        const ended = p?.ended && id(p.ended.incarnation) ? { incarnation: id(p.ended.incarnation)!, clean: p.ended.clean === true } : undefined;
        out[pool] = { ...(id(p?.current) ? { current: id(p.current) } : {}), ...(ended ? { ended } : {}) };
      }
      return out;
    } catch (err) {
      // Damaged: every earlier incarnation counts as unknown (a guest that wrote to one restarts, the safe side).
      this.log.warn({ event: 'pool-incarnations-unreadable', file: this.file, err: (err as Error).message }, `${this.file} is unreadable (${(err as Error).message}): earlier pool opens count as ended uncleanly`);
      return {};
    }
  }

  private save(): void {
    const tmp = `${this.file}.tmp`;
    try {
      fs.mkdirSync(path.dirname(this.file), { recursive: true });
      fs.writeFileSync(tmp, JSON.stringify({ v: 1, pools: this.pools }));
      fs.renameSync(tmp, this.file);
    } catch (err) {
      this.log.warn({ event: 'pool-incarnations-unsaved', file: this.file, err: (err as Error).message }, `could not save ${this.file}: ${(err as Error).message}`);
    }
  }

  opened(pool: string, incarnation: string): void {
    const p = (this.pools[pool] ??= {});
    // Still open at a new open: its end was never seen (a close that threw): not clean.
    if (p.current !== undefined && p.current !== incarnation) p.ended = { incarnation: p.current, clean: false };
    p.current = incarnation;
    this.save();
  }

  closed(pool: string, incarnation: string, clean: boolean): void {
    const p = (this.pools[pool] ??= {});
    if (p.current === incarnation) delete p.current;
    p.ended = { incarnation, clean };
    this.save();
  }

  /** How `incarnation` of `pool` ended on this node, as far as it knows. */
  endOf(pool: string, incarnation: string): IncarnationEnd {
    return endOf(this.pools[pool], incarnation);
  }

  snapshot(): Record<string, PoolIncarnation> {
    return structuredClone(this.pools);
  }
}

/** How `incarnation` ended by a node's record of the pool (see PoolIncarnations). */
export function endOf(p: PoolIncarnation | undefined, incarnation: string): IncarnationEnd {
  if (p?.current === incarnation) return 'open';
  if (p?.ended?.incarnation === incarnation) return p.ended.clean ? 'clean' : 'unclean';
  return 'unknown';
}
