/**
 * The `duet` command line: a thin layer that parses arguments and calls the
 * layers below. Errors meant for people are one line on stderr, exit 2.
 */
import { Command, CommanderError } from 'commander';
import { UserError } from '../util/errors.js';
import { flushLogs } from '../util/log.js';
import { registerServe } from './serve.js';
import { registerDemo } from './demo.js';
import { registerPool } from './pool.js';
import { registerVol } from './vol.js';
import { registerNode, registerResource, registerWitness } from './resource.js';
import { registerVm } from './vm.js';
import { registerCluster } from './cluster.js';
import { registerApi } from './api.js';
import { registerDoctor } from './doctor.js';

export async function main(argv: string[]): Promise<void> {
  const program = new Command();
  program
    .name('duet')
    .description('Two computers, one whole-system RAID: mirrored disks, thin volumes, NBD exports, VM failover')
    .version('0.1.0')
    .exitOverride()
    .configureOutput({ outputError: (str, write) => write(`duet: ${str.replace(/^error: /, '')}`) })
    .option('--home <dir>', 'where duet keeps its pool registry, locks and admin sockets (DUET_HOME; default /var/lib/duet)')
    .option('--config <file>', 'the cluster file (DUET_CONFIG): resource, pool and vol commands then act through a node daemon')
    .option('--node <name>', 'the node of the cluster file to act on (DUET_NODE)');
  registerServe(program);
  registerPool(program);
  registerVol(program);
  registerNode(program);
  registerResource(program);
  registerWitness(program);
  registerVm(program);
  registerCluster(program);
  registerApi(program);
  registerDoctor(program);
  registerDemo(program);
  try {
    await program.parseAsync(argv, { from: 'user' });
  } catch (err) {
    exitWithError(err);
  }
}

export function exitWithError(err: unknown): never {
  // A daemon's log lines come before the error that ends it.
  flushLogs();
  if (err instanceof CommanderError) {
    const ok = err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help';
    process.exit(ok ? 0 : 2);
  }
  if (err instanceof UserError) {
    process.stderr.write(`duet: ${err.message}\n`);
    process.exit(err.exitCode);
  }
  process.stderr.write(`duet: internal error: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(70);
}
