/**
 * `serve --pool POOL`: hold the pool (its lock), export every volume over
 * NBD, and answer the admin socket so `duet vol ...` works online.
 */
import type { Command } from 'commander';
import { NbdServer } from '../nbd/server.js';
import { AdminServer } from '../api/line-socket.js';
import { PoolExports } from '../volume/exports.js';
import { holdPool } from '../volume/session.js';
import { runCommand } from '../volume/service.js';
import { createLogger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { formatHostPort, listenError, parseListen } from './listen.js';
import { homeOf } from './pool.js';
import { installShutdown, loadTls, tlsSettingsOf, type ServeOptions } from './serve.js';

export async function servePool(name: string, options: ServeOptions, cmd: Command): Promise<void> {
  const log = createLogger('duet-serve');
  const addr = parseListen(options.listen);
  const tlsFiles = loadTls(options);
  if (options.workers !== undefined && options.workers !== '0') {
    throw new UserError('--workers: a pool is served from one thread (its map lives there); drop --workers');
  }
  const registry = homeOf(cmd);
  const hold = await holdPool(registry, name, { readOnly: false, log });
  const { pool } = hold;
  const exports = new PoolExports(pool);
  const devicePaths = [...hold.entry.devices];
  const server = new NbdServer({ exports, log, tls: tlsFiles ? tlsSettingsOf(tlsFiles) : undefined });
  let admin: AdminServer | undefined;
  let port = addr.port;
  try {
    const bound = await server.listen(addr.host, addr.port);
    if (typeof bound !== 'string') port = bound.port;
  } catch (err) {
    await hold.release();
    throw listenError(addr, err);
  }
  try {
    admin = await AdminServer.listen(
      registry.socketPath(name),
      (command, io) =>
        runCommand(
          {
            pool,
            registry,
            devicePaths,
            pid: process.pid,
            connections: (vol) => exports.connections(vol),
            changed: () => exports.prune(),
            ...io,
          },
          command,
        ),
      log,
    );
  } catch (err) {
    await server.close();
    await hold.release();
    throw new UserError(`pool ${name}: cannot open the admin socket ${registry.socketPath(name)} (${(err as Error).message})`);
  }
  const where = formatHostPort(addr.host, port);
  log.info({ event: 'serving', listen: where, pool: name, volumes: pool.listVolumes().map((v) => v.record.name) });
  installShutdown(server, log, async () => {
    await admin?.close();
    await hold.release();
  });
  const volumes = pool.listVolumes();
  if (volumes.length === 0) process.stdout.write(`listening nbd://${where}/ (pool ${name} has no volumes yet: duet vol create ${name}/NAME --size SIZE)\n`);
  for (const v of volumes) process.stdout.write(`listening nbd://${where}/${v.record.name}\n`);
}
