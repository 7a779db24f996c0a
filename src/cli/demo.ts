import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { FileDevice } from '../blockdev/file.js';
import { Pool } from '../volume/pool.js';
import { createVolume } from '../volume/operations.js';
import { Registry } from '../volume/registry.js';
import { servePool } from './serve-pool.js';

/**
 * `npm start`: a pool on a sparse disk image in a data directory, a thin
 * volume `demo` in it, served over NBD; prints how to use it. (The two-node
 * cluster demo replaces this once replication lands.)
 */
export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('serve a demo pool with a thin volume "demo" over NBD and print how to use it')
    .option('--data <dir>', 'data directory', process.env.DUET_DEMO_DIR ?? path.resolve('data'))
    .option('--size <bytes>', 'size of the demo disk image when it is created', String(4 * 1024 * 1024 * 1024))
    .option('--listen <host:port>', 'address to listen on', '127.0.0.1:10809')
    .action(async (options: { data: string; size: string; listen: string }, cmd: Command) => {
      fs.mkdirSync(options.data, { recursive: true });
      const home = path.join(options.data, 'home');
      const registry = new Registry(home);
      const disk = path.join(options.data, 'disk0.img');
      if (!registry.has('demo')) {
        if (!fs.existsSync(disk)) {
          const fd = fs.openSync(disk, 'wx');
          fs.ftruncateSync(fd, Number(options.size));
          fs.closeSync(fd);
        }
        const pool = await Pool.create('demo', [FileDevice.open(disk)]);
        await createVolume(pool, 'demo', 1024 * 1024 * 1024);
        registry.save({ name: 'demo', uuid: pool.uuid, devices: [disk] });
        await pool.close();
      }
      const url = `nbd://${options.listen}/demo`;
      const duet = `bin/duet --home ${home}`;
      process.stdout.write(
        [
          `duet demo: pool "demo" on ${disk} (sparse), thin volume demo (1G) served as ${url}`,
          'try, from another terminal:',
          `  nbdinfo ${url}                      # size, flags, block sizes`,
          `  head -c 64M /dev/urandom > /tmp/rand.img && nbdcopy /tmp/rand.img ${url}`,
          `  nbdinfo --map ${url}                # written chunks vs holes`,
          `  ${duet} vol snapshot demo/demo demo/before   # O(1) snapshot, exported read-only`,
          `  ${duet} vol list demo; ${duet} pool show demo`,
          `  ${duet} vol resize demo/demo --size 2G       # online; new connections see it`,
          `  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' ${url}`,
          'Ctrl-C stops the server (in-flight requests finish, data is flushed).',
          '',
        ].join('\n'),
      );
      cmd.parent?.setOptionValue('home', home);
      await servePool('demo', { listen: options.listen }, cmd);
    });
}
