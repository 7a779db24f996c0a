/**
 * `duet doctor`: the preflight of a node (src/cluster/doctor.ts), one line
 * a check; exit 1 when any check is a problem.
 */
import type { Command } from 'commander';
import { formatChecks, runDoctor } from '../cluster/doctor.js';
import { resolveHome } from '../volume/registry.js';
import { requireCluster } from './cluster-client.js';
import { print } from './pool.js';

export function registerDoctor(program: Command): void {
  program
    .command('doctor')
    .description('check this node before (or while) it runs: QEMU and KVM, FUSE, loop devices, ports, disks and their metadata, the secret, free space, the witness, the clock against the peer')
    .option('--json', 'machine-readable output')
    .action(async (options: { json?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const opts = cmd.optsWithGlobals() as { home?: string };
      const checks = await runDoctor({ config: t.config, node: t.node, home: resolveHome(opts.home) });
      print(options.json === true, checks, () => formatChecks(checks));
      if (checks.some((c) => c.verdict === 'problem')) process.exitCode = 1;
    });
}
