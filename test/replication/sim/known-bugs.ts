/**
 * Bugs the simulator found that are not fixed yet: a seed whose first
 * violation matches one is reported as that bug (TODO), not as a new
 * failure. Each lists the seeds that found it (on the code of its day:
 * the same seed on later code may run differently). Remove an entry when
 * its bug is fixed; its seeds then run as ordinary ones.
 */
import type { SeedResult } from './run.js';

export interface KnownBug {
  id: string;
  title: string;
  diagnosis: string;
  /** Matches the first violation of a seed that hits it. */
  match: RegExp;
  seeds: number[];
}

export const KNOWN_BUGS: KnownBug[] = [];

export function knownBug(r: SeedResult): KnownBug | undefined {
  const first = r.violations[0] ?? '';
  return KNOWN_BUGS.find((b) => b.match.test(first));
}
