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

/** Clean ends kept at most (older ones count as unknown: a guest that wrote to one restarts, the safe side). */
const CLEAN_KEPT = 32;

export interface PoolIncarnation {
  /** The incarnation serving now (open). */
  current?: string;
  /**
   * The opens that ended cleanly since the last one that did not, oldest first: a client of any of them lost
   * nothing (each committed all it acknowledged, and none after it lost anything).
   */
  clean?: string[];
  /** The last open that ended uncleanly (its daemon died with it open, or its close failed). */
  unclean?: string;
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
      endUncleanly(p, p.current);
      changed = true;
    }
    if (changed) this.trySave();
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
      const id = (v: unknown): string | undefined => (typeof v === 'string' && /^[0-9a-f]{16}$/.test(v) ? v : undefined);
      const out: Record<string, PoolIncarnation> = {};
      for (const [pool, p] of Object.entries(j.pools ?? {})) {
        const clean = Array.isArray(p?.clean) ? p.clean.map(id).filter((x): x is string => x !== undefined).slice(-CLEAN_KEPT) : [];
        out[pool] = { ...(id(p?.current) ? { current: id(p.current) } : {}), ...(clean.length > 0 ? { clean } : {}), ...(id(p?.unclean) ? { unclean: id(p.unclean) } : {}) };
      }
      return out;
    } catch (err) {
      // Damaged: every earlier open counts as unknown (a guest that wrote to one restarts, the safe side).
      this.log.warn({ event: 'pool-incarnations-unreadable', file: this.file, err: (err as Error).message }, `${this.file} is unreadable (${(err as Error).message}): earlier pool opens count as ended uncleanly`);
      return {};
    }
  }

  /** Durably (temp file fsynced, renamed, directory fsynced): a clean end believed after a power cut that undid it would be a lie. */
  private save(): void {
    const tmp = `${this.file}.tmp`;
    const dir = path.dirname(this.file);
    fs.mkdirSync(dir, { recursive: true });
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, JSON.stringify({ v: 1, pools: this.pools }));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.file);
    const d = fs.openSync(dir, 'r');
    try {
      fs.fsyncSync(d);
    } finally {
      fs.closeSync(d);
    }
  }

  private trySave(): void {
    try {
      this.save();
    } catch (err) {
      // Not recorded: the file may still say an open is going on or ended cleanly when it did not. The next
      // save (every open and close) writes the whole truth again.
      this.log.warn({ event: 'pool-incarnations-unsaved', file: this.file, err: (err as Error).message }, `could not save ${this.file}: ${(err as Error).message}`);
    }
  }

  /**
   * A new open of `pool`: recorded before it serves anything. Throws if that cannot be written (the pool
   * must not serve: a crash of this open would not be known for one at the next start).
   */
  opened(pool: string, incarnation: string): void {
    const before = structuredClone(this.pools[pool]);
    const p = (this.pools[pool] ??= {});
    // Still open at a new open: its end was never seen (a close that threw): not clean.
    if (p.current !== undefined && p.current !== incarnation) endUncleanly(p, p.current);
    p.current = incarnation;
    try {
      this.save();
    } catch (err) {
      // This open will not serve: the record stays as it was.
      if (before === undefined) delete this.pools[pool];
      else this.pools[pool] = before;
      throw err;
    }
  }

  closed(pool: string, incarnation: string, clean: boolean): void {
    const p = (this.pools[pool] ??= {});
    if (p.current === incarnation) delete p.current;
    if (clean) p.clean = [...(p.clean ?? []), incarnation].slice(-CLEAN_KEPT);
    else endUncleanly(p, incarnation);
    this.trySave();
  }

  /** How `incarnation` of `pool` ended on this node, as far as it knows. */
  endOf(pool: string, incarnation: string): IncarnationEnd {
    return endOf(this.pools[pool], incarnation);
  }

  snapshot(): Record<string, PoolIncarnation> {
    return structuredClone(this.pools);
  }
}

/** An open ended without committing all it acknowledged: every earlier clean end no longer vouches for its clients. */
function endUncleanly(p: PoolIncarnation, incarnation: string): void {
  if (p.current === incarnation) delete p.current;
  delete p.clean;
  p.unclean = incarnation;
}

/** How `incarnation` ended by a node's record of the pool (see PoolIncarnations). */
export function endOf(p: PoolIncarnation | undefined, incarnation: string): IncarnationEnd {
  if (p?.current === incarnation) return 'open';
  if (p?.clean?.includes(incarnation)) return 'clean';
  if (p?.unclean === incarnation) return 'unclean';
  return 'unknown';
}
