/**
 * The simulator's runner: `npm run sim -- --seeds N [--from S]` runs seeds
 * S, S+1, ... and stops at the first that fails, printing its schedule;
 * `--seed S` reruns one seed (exactly: the same seed is the same run) and
 * prints its schedule; `--verbose` prints it even when it passes.
 */
import { runSeed, SeedResult } from './sim/run.js';

function report(r: SeedResult, full: boolean): string {
  const lines = [`seed ${r.seed}: ${r.ok ? 'ok' : 'FAILED'} (${r.config}; ${r.events} events, ${(r.fakeMs / 1000).toFixed(1)} s simulated, ${r.realMs.toFixed(0)} ms, fingerprint ${r.fingerprint})`];
  if (!r.ok) lines.push(...r.violations.map((v) => `  violation: ${v}`));
  if (full || !r.ok) {
    lines.push('  schedule:', ...r.trace.map((t) => `    ${t}`), '  last log lines:', ...r.logTail.map((t) => `    ${t}`));
  }
  lines.push(`  stats: ${JSON.stringify(r.stats)}`);
  return lines.join('\n');
}

async function main(argv: string[]): Promise<number> {
  const arg = (name: string): string | undefined => {
    const i = argv.indexOf(name);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const verbose = argv.includes('--verbose');
  const episodes = arg('--episodes') ? Number(arg('--episodes')) : undefined;
  const ops = arg('--ops') ? Number(arg('--ops')) : undefined;
  const one = arg('--seed');
  if (one !== undefined) {
    const r = await runSeed({ seed: Number(one), episodes, ops });
    console.log(report(r, true));
    return r.ok ? 0 : 1;
  }
  const n = Number(arg('--seeds') ?? 100);
  const from = Number(arg('--from') ?? 1);
  const started = performance.now();
  const keepGoing = argv.includes('--keep-going');
  let failed: SeedResult | undefined;
  let failures = 0;
  let done = 0;
  for (let seed = from; seed < from + n; seed++) {
    const r = await runSeed({ seed, episodes, ops });
    done++;
    if (verbose) console.log(report(r, false));
    if (!r.ok) {
      failures++;
      failed ??= r;
      if (!keepGoing) break;
      console.log(`seed ${seed} FAILED: ${r.violations[0].split('\n')[0].slice(0, 400)}`);
    }
  }
  if (keepGoing) console.log(`${failures} of ${done} seeds failed`);
  const ms = performance.now() - started;
  console.log(`${done} seeds from ${from} in ${(ms / 1000).toFixed(1)} s (${(ms / done).toFixed(0)} ms per seed)`);
  if (failed) {
    console.log(report(failed, true));
    console.log(`rerun: npm run sim -- --seed ${failed.seed}`);
    return 1;
  }
  return 0;
}

// Under `node --test dist/test/` every file is run: only the command line runs seeds.
if (!process.env.NODE_TEST_CONTEXT) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err);
      process.exit(2);
    },
  );
}
