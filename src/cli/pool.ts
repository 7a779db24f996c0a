/** `duet pool ...`: create, extend, list, show, check. */
import path from 'node:path';
import type { Command } from 'commander';
import { FileDevice } from '../blockdev/file.js';
import type { BlockDevice } from '../blockdev/types.js';
import { Pool, PoolDamaged } from '../volume/pool.js';
import { Registry, resolveHome } from '../volume/registry.js';
import { runPoolCommand } from '../volume/session.js';
import type { Command as PoolCmd, PoolInfo } from '../volume/service.js';
import type { Readable, Writable } from 'node:stream';
import { callNode, clusterOf } from './cluster-client.js';
import type { CheckReport } from '../volume/check.js';
import { checkName } from '../volume/operations.js';
import { createLogger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { formatSize, parseSize } from '../util/size.js';

export function homeOf(cmd: Command): Registry {
  const opts = cmd.optsWithGlobals() as { home?: string };
  return new Registry(resolveHome(opts.home));
}

/**
 * Run a pool command: through the node daemon that holds the pool when a
 * cluster is named (--config/--node), else on the local registry (here, or
 * through the process serving the pool).
 */
export async function poolCommand(cmd: Command, pool: string, command: PoolCmd, io: { input?: Readable; output?: Writable } = {}): Promise<unknown> {
  const cluster = clusterOf(cmd);
  if (cluster) return callNode(cluster, { ...command, pool }, io);
  return runPoolCommand(homeOf(cmd), pool, command, io);
}

export function sizeOption(text: string, what: string): number {
  try {
    return parseSize(text);
  } catch (err) {
    throw new UserError(`${what}: ${(err as Error).message}`);
  }
}

export function print(json: boolean, value: unknown, text: () => string): void {
  process.stdout.write(json ? `${JSON.stringify(value, null, 2)}\n` : text());
}

export function registerPool(program: Command): void {
  const pool = program.command('pool').description('pools: thin-provisioned space over one or more devices');

  pool
    .command('create')
    .description('make a new pool on DEVICE... (files or block devices; their contents are lost)')
    .argument('<pool>')
    .argument('<devices...>')
    .option('--chunk-size <size>', 'allocation unit of thin volumes and snapshots', '64K')
    .action(async (name: string, paths: string[], options: { chunkSize: string }, cmd: Command) => {
      const registry = homeOf(cmd);
      checkName('pool', name);
      const chunkSize = sizeOption(options.chunkSize, '--chunk-size');
      if (registry.has(name)) throw new UserError(`pool ${name} already exists in ${registry.home}`);
      const resolved = paths.map((p) => path.resolve(p));
      const dup = resolved.find((p, i) => resolved.indexOf(p) !== i);
      if (dup) throw new UserError(`${dup} is named twice`);
      for (const p of resolved) {
        const owner = registry.ownerOf(p);
        if (owner) throw new UserError(`${p} already belongs to pool ${owner}`);
      }
      const devices: BlockDevice[] = [];
      try {
        for (const p of resolved) devices.push(FileDevice.open(p));
        const created = await Pool.create(name, devices, { chunkSize, log: createLogger('duet-pool', process.env.DUET_LOG_LEVEL ?? 'warn') });
        registry.save({ name, uuid: created.uuid, devices: resolved });
        const u = created.usage();
        await created.close();
        process.stdout.write(`created pool ${name}: ${formatSize(u.dataChunks * u.chunkSize)} on ${resolved.length} device(s), chunk size ${formatSize(u.chunkSize)}\n`);
      } catch (err) {
        for (const d of devices) await d.close();
        throw err;
      }
    });

  pool
    .command('extend')
    .description('add DEVICE to POOL (online if the pool is being served)')
    .argument('<pool>')
    .argument('<device>')
    .action(async (name: string, device: string, _o: unknown, cmd: Command) => {
      const info = (await poolCommand(cmd, name, { cmd: 'pool.extend', device: path.resolve(device) })) as PoolInfo;
      process.stdout.write(`extended pool ${name}: ${formatSize(info.sizeBytes)} on ${info.devices.length} device(s)\n`);
    });

  pool
    .command('list')
    .description('the pools this home knows')
    .option('--json', 'machine-readable output')
    .action(async (options: { json?: boolean }, cmd: Command) => {
      const cluster = clusterOf(cmd);
      const registry = homeOf(cmd);
      const rows: (PoolInfo | { name: string; devices: string[]; error: string })[] = [];
      const entries = cluster
        ? Object.entries(cluster.config.pools).map(([name, p]) => ({ name, devices: p.devices.map((d) => `resource:${d}`) }))
        : registry.list();
      for (const entry of entries) {
        try {
          rows.push((await poolCommand(cmd, entry.name, { cmd: 'pool.show' })) as PoolInfo);
        } catch (err) {
          rows.push({ name: entry.name, devices: entry.devices, error: (err as Error).message });
        }
      }
      print(options.json === true, rows, () => {
        const lines = [pad(['POOL', 'SIZE', 'USED', 'FREE', 'USE%', 'VOLUMES', 'DEVICES'])];
        for (const r of rows) {
          if ('error' in r) lines.push(`${r.name}  (${r.error})`);
          else lines.push(pad([r.name, formatSize(r.sizeBytes), formatSize(r.usedBytes), formatSize(r.freeBytes), `${r.usedPercent}%`, String(r.volumes), String(r.devices.length)]));
        }
        return `${lines.join('\n')}\n`;
      });
    });

  pool
    .command('show')
    .description('size, use, metadata, chunk size and devices of POOL')
    .argument('<pool>')
    .option('--json', 'machine-readable output')
    .action(async (name: string, options: { json?: boolean }, cmd: Command) => {
      const info = (await poolCommand(cmd, name, { cmd: 'pool.show' })) as PoolInfo;
      print(options.json === true, info, () =>
        [
          `pool:          ${info.name} (${info.uuid})`,
          `size:          ${formatSize(info.sizeBytes)} (${info.sizeBytes} bytes)`,
          `used:          ${formatSize(info.usedBytes)} (${info.usedPercent}% with metadata)`,
          `free:          ${formatSize(info.freeBytes)}`,
          `metadata:      ${formatSize(info.metadataBytes)} (checkpoint ${formatSize(info.metadataUsedBytes)}, ${formatSize(info.reservedBytes)} kept free for it)`,
          `chunk size:    ${formatSize(info.chunkSizeBytes)}`,
          `volumes:       ${info.volumes}`,
          `devices:       ${info.devices.join(', ')}`,
          ...(info.heldBy !== null ? [`served by:     pid ${info.heldBy}`] : []),
          ...(info.warning ? [`warning:       ${info.warning}`] : []),
          '',
        ].join('\n'),
      );
    });

  pool
    .command('check')
    .description('walk all metadata of POOL: exit 0 consistent, 1 damaged (prints what)')
    .argument('<pool>')
    .option('--json', 'machine-readable output')
    .action(async (name: string, options: { json?: boolean }, cmd: Command) => {
      let report: CheckReport;
      try {
        report = (await poolCommand(cmd, name, { cmd: 'pool.check' })) as CheckReport;
      } catch (err) {
        // Metadata too damaged to open the pool at all: that is the check's answer, not a usage error.
        if (!(err instanceof PoolDamaged)) throw err;
        report = { ok: false, problems: [err.message], notes: [], volumes: 0, nodes: 0, mappedChunks: 0 };
      }
      print(options.json === true, report, () =>
        [
          report.ok
            ? `pool ${name}: consistent (${report.volumes} volumes, ${report.mappedChunks} mapped chunks, ${report.nodes} map nodes)`
            : `pool ${name}: DAMAGED, ${report.problems.length} problem(s):`,
          ...report.problems.map((p) => `  ${p}`),
          ...report.notes.map((n) => `  note: ${n}`),
          '',
        ].join('\n'),
      );
      if (!report.ok) process.exitCode = 1;
    });
}

export function pad(cols: string[]): string {
  const widths = [16, 9, 9, 9, 6, 8, 8];
  return cols.map((c, i) => (i === cols.length - 1 ? c : c.padEnd(widths[i] ?? 10))).join(' ');
}
