/** `duet vol ...`: thin volumes, snapshots, clones, diffs, send/receive. */
import fs from 'node:fs';
import { Transform, Writable } from 'node:stream';
import type { Command } from 'commander';
import type { VolumeInfo } from '../volume/service.js';
import type { Range } from '../volume/operations.js';
import type { ReceiveResult, SendResult } from '../volume/stream.js';
import { UserError } from '../util/errors.js';
import { formatSize } from '../util/size.js';
import { poolCommand, print, sizeOption } from './pool.js';
import { ProgressView } from './progress.js';

/** POOL/VOL → [pool, vol]. */
export function parseVolumePath(text: string): [string, string] {
  const slash = text.indexOf('/');
  if (slash <= 0 || slash === text.length - 1 || text.indexOf('/', slash + 1) >= 0) throw new UserError(`"${text}": name a volume as POOL/VOLUME`);
  return [text.slice(0, slash), text.slice(slash + 1)];
}

function samePool(a: string, b: string): [string, string, string] {
  const [pa, va] = parseVolumePath(a);
  const [pb, vb] = parseVolumePath(b);
  if (pa !== pb) throw new UserError(`${a} and ${b} are in different pools; snapshots, clones and diffs stay within one pool`);
  return [pa, va, vb];
}

export function registerVol(program: Command): void {
  const vol = program.command('vol').description('thin volumes in a pool: create, resize, snapshot, clone, diff, send/receive');

  vol
    .command('create')
    .argument('<pool/vol>')
    .requiredOption('--size <size>', 'virtual size (thin: space is used only as data is written)')
    .action(async (target: string, options: { size: string }, cmd: Command) => {
      const [pool, name] = parseVolumePath(target);
      const info = (await poolCommand(cmd, pool, { cmd: 'vol.create', name, sizeBytes: sizeOption(options.size, '--size') })) as VolumeInfo;
      process.stdout.write(`created volume ${pool}/${info.name}: ${formatSize(info.sizeBytes)}\n`);
    });

  vol
    .command('resize')
    .argument('<pool/vol>')
    .requiredOption('--size <size>', 'new virtual size')
    .option('--force', 'allow shrinking below data in use (that data is dropped)')
    .action(async (target: string, options: { size: string; force?: boolean }, cmd: Command) => {
      const [pool, name] = parseVolumePath(target);
      const info = (await poolCommand(cmd, pool, {
        cmd: 'vol.resize',
        name,
        sizeBytes: sizeOption(options.size, '--size'),
        force: options.force === true,
      })) as VolumeInfo;
      process.stdout.write(`resized volume ${pool}/${info.name}: ${formatSize(info.sizeBytes)}\n`);
    });

  vol
    .command('snapshot')
    .description('read-only point-in-time copy, in constant time')
    .argument('<pool/vol>')
    .argument('<pool/snap>')
    .action(async (source: string, target: string, _o: unknown, cmd: Command) => {
      const [pool, src, name] = samePool(source, target);
      await poolCommand(cmd, pool, { cmd: 'vol.snapshot', source: src, name });
      process.stdout.write(`created snapshot ${pool}/${name} of ${pool}/${src}\n`);
    });

  vol
    .command('clone')
    .description('writable copy of a snapshot (or volume), in constant time')
    .argument('<pool/snap>')
    .argument('<pool/new>')
    .action(async (source: string, target: string, _o: unknown, cmd: Command) => {
      const [pool, src, name] = samePool(source, target);
      await poolCommand(cmd, pool, { cmd: 'vol.clone', source: src, name });
      process.stdout.write(`created clone ${pool}/${name} of ${pool}/${src}\n`);
    });

  vol
    .command('remove')
    .argument('<pool/vol>')
    .action(async (target: string, _o: unknown, cmd: Command) => {
      const [pool, name] = parseVolumePath(target);
      await poolCommand(cmd, pool, { cmd: 'vol.remove', name });
      process.stdout.write(`removed volume ${pool}/${name}\n`);
    });

  vol
    .command('list')
    .argument('<pool>')
    .option('--json', 'machine-readable output')
    .action(async (pool: string, options: { json?: boolean }, cmd: Command) => {
      const rows = (await poolCommand(cmd, pool, { cmd: 'vol.list' })) as VolumeInfo[];
      print(options.json === true, rows, () => {
        const lines = [['VOLUME', 'SIZE', 'USED', 'TYPE', 'ORIGIN'].map((c, i) => (i < 4 ? c.padEnd([20, 9, 9, 9][i]) : c)).join(' ')];
        for (const r of rows) {
          const type = r.snapshot ? 'snapshot' : r.origin ? 'clone' : 'volume';
          lines.push([r.name.padEnd(20), formatSize(r.sizeBytes).padEnd(9), formatSize(r.usedBytes).padEnd(9), type.padEnd(9), r.origin ?? '-'].join(' '));
        }
        return `${lines.join('\n')}\n`;
      });
    });

  vol
    .command('diff')
    .description('byte ranges where NEW differs from OLD, from the metadata alone')
    .argument('<pool/old>')
    .argument('<pool/new>')
    .option('--json', 'machine-readable output: [{"offset": n, "length": n}, ...]')
    .action(async (a: string, b: string, options: { json?: boolean }, cmd: Command) => {
      const [pool, oldName, newName] = samePool(a, b);
      const ranges = (await poolCommand(cmd, pool, { cmd: 'vol.diff', old: oldName, new: newName })) as Range[];
      print(options.json === true, ranges, () => {
        const total = ranges.reduce((n, r) => n + r.length, 0);
        return `${ranges.map((r) => `${r.offset} ${r.length}`).join('\n')}${ranges.length ? '\n' : ''}# ${ranges.length} range(s), ${formatSize(total)} changed\n`;
      });
    });

  vol
    .command('send')
    .description('write a snapshot (or, with --from, what changed since an older one) to stdout')
    .argument('<pool/snap>')
    .option('--from <pool/old>', 'older snapshot the receiver already has')
    .action(async (source: string, options: { from?: string }, cmd: Command) => {
      if (process.stdout.isTTY) throw new UserError('send writes a binary stream: redirect stdout to a file or a pipe');
      const [pool, name] = parseVolumePath(source);
      const from = options.from === undefined ? undefined : samePool(source, options.from)[2];
      const view = ProgressView.for(`send ${pool}/${name}`);
      // What the stream will roughly hold (its data; headers add a little): the snapshot's, or the changes since --from.
      const total = await (from === undefined
        ? (poolCommand(cmd, pool, { cmd: 'vol.list' }) as Promise<{ name: string; usedBytes: number }[]>).then((l) => l.find((v) => v.name === name)?.usedBytes)
        : (poolCommand(cmd, pool, { cmd: 'vol.diff', old: from, new: name }) as Promise<Range[]>).then((rs) => rs.reduce((n, x) => n + x.length, 0))
      ).catch(() => undefined);
      const out = new Counting(process.stdout, (n) => view.update({ done: n, total }));
      let r: SendResult;
      try {
        r = (await poolCommand(cmd, pool, { cmd: 'vol.send', name, from }, { output: out })) as SendResult;
      } finally {
        view.stop();
      }
      await new Promise<void>((resolve) => process.stdout.write('', () => resolve()));
      process.stderr.write(`sent ${pool}/${name}${from ? ` (incremental from ${from})` : ''}: ${r.records} record(s), ${formatSize(r.dataBytes)} of data\n`);
    });

  vol
    .command('receive')
    .description('apply a stream from duet vol send (stdin) to POOL/VOL')
    .argument('<pool/vol>')
    .action(async (target: string, _o: unknown, cmd: Command) => {
      if (process.stdin.isTTY) throw new UserError('receive reads a stream: redirect stdin from a file or a pipe');
      const [pool, name] = parseVolumePath(target);
      const view = ProgressView.for(`receive ${pool}/${name}`);
      let total: number | undefined;
      try {
        const st = fs.fstatSync(0);
        if (st.isFile()) total = st.size;
      } catch {
        // Unknown: the bytes and the rate alone.
      }
      let received = 0;
      const input = process.stdin.pipe(
        new Transform({
          transform(chunk: Buffer, _enc, done) {
            received += chunk.length;
            view.update({ done: received, total });
            done(null, chunk);
          },
        }),
      );
      let r: ReceiveResult;
      try {
        r = (await poolCommand(cmd, pool, { cmd: 'vol.receive', name }, { input })) as ReceiveResult;
      } finally {
        view.stop();
      }
      process.stdout.write(`received ${pool}/${r.volume}${r.incremental ? ' (incremental)' : ''}: ${r.records} record(s), ${formatSize(r.dataBytes)} of data\n`);
    });
}

/** Passes a send stream on to `target` (stdout), with its backpressure, counting the bytes. */
class Counting extends Writable {
  private bytes = 0;
  constructor(
    private readonly target: NodeJS.WritableStream,
    private readonly onBytes: (total: number) => void,
  ) {
    super();
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, done: (err?: Error | null) => void): void {
    this.bytes += chunk.length;
    this.onBytes(this.bytes);
    if (this.target.write(chunk)) done();
    else this.target.once('drain', () => done());
  }
}
