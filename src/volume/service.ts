/**
 * The pool and volume commands as one dispatcher over an open pool, so the
 * CLI runs exactly the same code whether it opened the pool itself or asks
 * the process that holds it (serve --pool, the node daemon) over the admin
 * socket. Results are plain JSON: the `--json` output is these objects.
 */
import path from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { FileDevice } from '../blockdev/file.js';
import { UserError } from '../util/errors.js';
import type { Pool, VolumeState } from './pool.js';
import { checkPool, CheckReport } from './check.js';
import { createVolume, diffVolumes, findVolume, Range, removeVolume, resizeVolume, shareVolume } from './operations.js';
import { receiveVolume, sendVolume } from './stream.js';
import type { Registry } from './registry.js';

export interface VolumeInfo {
  name: string;
  sizeBytes: number;
  usedBytes: number;
  snapshot: boolean;
  readOnly: boolean;
  origin: string | null;
  uuid: string;
  createdAt: string;
  exported: boolean;
  connections: number;
}

export interface PoolInfo {
  name: string;
  uuid: string;
  sizeBytes: number;
  usedBytes: number;
  freeBytes: number;
  usedPercent: number;
  metadataBytes: number;
  metadataUsedBytes: number;
  reservedBytes: number;
  chunkSizeBytes: number;
  volumes: number;
  devices: string[];
  heldBy: number | null;
  warning: string | null;
}

export type Command =
  | { cmd: 'pool.show' }
  | { cmd: 'pool.check' }
  | { cmd: 'pool.extend'; device: string }
  | { cmd: 'vol.create'; name: string; sizeBytes: number }
  | { cmd: 'vol.resize'; name: string; sizeBytes: number; force: boolean }
  | { cmd: 'vol.snapshot'; source: string; name: string }
  | { cmd: 'vol.clone'; source: string; name: string }
  | { cmd: 'vol.remove'; name: string }
  | { cmd: 'vol.list' }
  | { cmd: 'vol.diff'; old: string; new: string }
  | { cmd: 'vol.send'; name: string; from?: string }
  | { cmd: 'vol.receive'; name: string };

export interface ServiceContext {
  pool: Pool;
  registry: Registry;
  /** Device paths of the pool, in pool order (from the registry). */
  devicePaths: string[];
  /** pid of the process holding the pool (this one). */
  pid: number;
  /** Open NBD connections on a volume's export (0 when nothing is served). */
  connections?: (volume: string) => number;
  /** The stream for send (out) or receive (in). */
  output?: Writable;
  input?: Readable;
  /** Called after a change that alters the export list. */
  changed?: () => void;
}

export const WARN_AT = 0.8;

export async function runCommand(ctx: ServiceContext, c: Command): Promise<unknown> {
  const { pool } = ctx;
  switch (c.cmd) {
    case 'pool.show':
      return poolInfo(ctx);
    case 'pool.check':
      return (await checkPool(pool)) satisfies CheckReport;
    case 'pool.extend': {
      const device = path.resolve(c.device);
      const owner = ctx.registry.ownerOf(device);
      if (owner) throw new UserError(`${device} already belongs to pool ${owner}`);
      const dev = FileDevice.open(device);
      try {
        await pool.exclusive(() => pool.extend(dev));
      } catch (err) {
        await dev.close();
        throw err;
      }
      ctx.devicePaths.push(device);
      ctx.registry.save({ name: pool.name, uuid: pool.uuid, devices: ctx.devicePaths });
      return poolInfo(ctx);
    }
    case 'vol.create': {
      const v = await createVolume(pool, c.name, c.sizeBytes);
      ctx.changed?.();
      return volumeInfo(ctx, v);
    }
    case 'vol.resize': {
      await resizeVolume(pool, c.name, c.sizeBytes, c.force);
      return volumeInfo(ctx, findVolume(pool, c.name));
    }
    case 'vol.snapshot':
    case 'vol.clone': {
      const v = await shareVolume(pool, c.source, c.name, c.cmd === 'vol.clone');
      ctx.changed?.();
      return volumeInfo(ctx, v);
    }
    case 'vol.remove': {
      await removeVolume(pool, c.name, ctx.connections);
      ctx.changed?.();
      return { removed: c.name };
    }
    case 'vol.list':
      return pool.listVolumes().map((v) => volumeInfo(ctx, v));
    case 'vol.diff':
      return diffVolumes(pool, c.old, c.new) satisfies Range[];
    case 'vol.send': {
      if (!ctx.output) throw new Error('send needs an output stream');
      return sendVolume(pool, c.name, c.from, ctx.output);
    }
    case 'vol.receive': {
      if (!ctx.input) throw new Error('receive needs an input stream');
      const r = await receiveVolume(pool, c.name, ctx.input, ctx.connections);
      ctx.changed?.();
      return r;
    }
  }
}

export function poolInfo(ctx: ServiceContext): PoolInfo {
  const { pool } = ctx;
  const u = pool.usage();
  const cs = u.chunkSize;
  const usedPercent = u.dataChunks === 0 ? 100 : Math.round(((u.usedChunks + u.metadataChunks) / u.dataChunks) * 1000) / 10;
  return {
    name: pool.name,
    uuid: pool.uuid,
    sizeBytes: u.dataChunks * cs,
    usedBytes: u.usedChunks * cs,
    freeBytes: u.freeChunks * cs,
    usedPercent,
    metadataBytes: u.metadataBytes,
    metadataUsedBytes: u.metadataChunks * cs,
    reservedBytes: u.reservedChunks * cs,
    chunkSizeBytes: cs,
    volumes: pool.listVolumes().length,
    devices: [...ctx.devicePaths],
    heldBy: ctx.connections ? ctx.pid : null,
    warning: usedPercent >= WARN_AT * 100 ? `pool ${pool.name} is ${usedPercent}% full: extend it (duet pool extend ${pool.name} DEVICE) or remove snapshots` : null,
  };
}

export function volumeInfo(ctx: ServiceContext, v: VolumeState): VolumeInfo {
  const connections = ctx.connections?.(v.record.name) ?? 0;
  return {
    name: v.record.name,
    sizeBytes: v.record.sizeBytes,
    usedBytes: v.mapped * ctx.pool.chunkSize,
    snapshot: v.record.snapshot,
    readOnly: v.record.readOnly,
    origin: v.record.origin ? (nameOfUuid(ctx.pool, v.record.origin) ?? v.record.origin) : null,
    uuid: v.record.uuid,
    createdAt: v.record.createdAt,
    exported: ctx.connections !== undefined,
    connections,
  };
}

function nameOfUuid(pool: Pool, uuid: string): string | undefined {
  for (const v of pool.volumes.values()) if (v.record.uuid === uuid) return v.record.name;
  return undefined;
}
