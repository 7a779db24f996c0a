import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { serve } from './serve.js';

/**
 * `npm start`: serve a demo image from a data directory and say how to reach
 * it. (The two-node cluster demo replaces this once replication lands.)
 */
export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('serve a demo disk image over NBD and print how to use it')
    .option('--data <dir>', 'data directory', process.env.DUET_DEMO_DIR ?? path.resolve('data'))
    .option('--size <bytes>', 'size of the demo image when it is created', String(1024 * 1024 * 1024))
    .option('--listen <host:port>', 'address to listen on', '127.0.0.1:10809')
    .action(async (options: { data: string; size: string; listen: string }) => {
      fs.mkdirSync(options.data, { recursive: true });
      const image = path.join(options.data, 'demo.img');
      if (!fs.existsSync(image)) {
        const fd = fs.openSync(image, 'wx');
        fs.ftruncateSync(fd, Number(options.size));
        fs.closeSync(fd);
      }
      const url = `nbd://${options.listen}/demo`;
      process.stdout.write(
        [
          `duet demo: serving ${image} (${fs.statSync(image).size} bytes, sparse) as ${url}`,
          'try, from another terminal:',
          `  nbdinfo ${url}                      # size, flags, block sizes`,
          `  nbdinfo --map ${url}                # allocated vs hole extents`,
          `  head -c 64M /dev/urandom > /tmp/rand.img && nbdcopy /tmp/rand.img ${url}`,
          `  qemu-img info ${url}`,
          `  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' ${url}`,
          `  nbdfuse /tmp/demo-mnt ${url} &   # then losetup + mkfs.ext4 + mount (README)`,
          'Ctrl-C stops the server (in-flight requests finish, data is flushed).',
          '',
        ].join('\n'),
      );
      await serve([`demo=${image}`], { listen: options.listen });
    });
}
