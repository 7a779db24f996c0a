/**
 * `duet cert` and `duet token`: what a browser or a script needs to use a
 * node's API (the CA certificate to trust, the bearer token to send).
 * Both follow from the cluster secret, so they work on any machine that has
 * the cluster file and its secret, without a daemon.
 */
import fs from 'node:fs';
import type { Command } from 'commander';
import { loadSecret } from '../cluster/config.js';
import { caOf } from '../api/target.js';
import { apiToken } from '../api/token.js';
import { UserError, errnoCode } from '../util/errors.js';
import { requireConfig } from './cluster-client.js';

export function registerApi(program: Command): void {
  program
    .command('cert')
    .description("print the cluster CA's certificate (PEM): import it in a browser, or give it to curl --cacert, to trust the nodes' API")
    .option('--out <file>', 'write it to FILE instead')
    .action((options: { out?: string }, cmd: Command) => {
      const config = requireConfig(cmd);
      if (!config.api.tls) throw new UserError(`${config.file}: api.tls is false: the API is plain HTTP on loopback, with no certificate`);
      const pem = caOf(config, loadSecret(config)).certPem;
      if (options.out === undefined) return void process.stdout.write(pem);
      try {
        fs.writeFileSync(options.out, pem, { mode: 0o644 });
      } catch (err) {
        throw new UserError(`cert: cannot write ${options.out} (${errnoCode(err) ?? (err as Error).message})`);
      }
      process.stdout.write(`wrote the CA certificate of cluster ${config.cluster} to ${options.out}\n`);
    });
  program
    .command('token')
    .description('print the API token (send it as "Authorization: Bearer TOKEN"; the dashboard asks for it)')
    .action((_o: unknown, cmd: Command) => {
      const config = requireConfig(cmd);
      process.stdout.write(`${apiToken(loadSecret(config))}\n`);
    });
}
