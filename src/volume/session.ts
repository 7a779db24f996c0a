/**
 * Holding a pool from the CLI: take its lock and open it from the device
 * paths the registry knows, or, when a live process already holds it, send
 * the command to that process's admin socket instead.
 */
import fs from 'node:fs';
import type { Readable, Writable } from 'node:stream';
import { FileDevice } from '../blockdev/file.js';
import type { BlockDevice } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import { Pool } from './pool.js';
import { PoolEntry, PoolInUse, PoolLock, Registry } from './registry.js';
import { callAdmin } from '../api/line-socket.js';
import { Command, runCommand } from './service.js';

export interface PoolHold {
  pool: Pool;
  entry: PoolEntry;
  registry: Registry;
  release(): Promise<void>;
}

/** Lock and open a pool; `readOnly` skips the fresh checkpoint a writable open writes. */
export async function holdPool(registry: Registry, name: string, options: { readOnly: boolean; log?: Logger }): Promise<PoolHold> {
  const entry = registry.get(name);
  const lock = PoolLock.acquire(registry, name);
  const devices: BlockDevice[] = [];
  try {
    for (const p of entry.devices) devices.push(FileDevice.open(p, { readOnly: options.readOnly }));
    const pool = await Pool.open(name, devices, { expectUuid: entry.uuid, readOnly: options.readOnly, log: options.log });
    let released = false;
    return {
      pool,
      entry,
      registry,
      async release() {
        if (released) return;
        released = true;
        try {
          await pool.close();
        } finally {
          lock.release();
        }
      },
    };
  } catch (err) {
    for (const d of devices) await d.close();
    lock.release();
    throw err;
  }
}

const READ_ONLY = new Set<Command['cmd']>(['pool.show', 'pool.check', 'vol.list', 'vol.diff', 'vol.send']);

/** Run one command on a pool: here, or through the process holding it. */
export async function runPoolCommand(
  registry: Registry,
  name: string,
  command: Command,
  io: { input?: Readable; output?: Writable; log?: Logger } = {},
): Promise<unknown> {
  let hold: PoolHold;
  try {
    hold = await holdPool(registry, name, { readOnly: READ_ONLY.has(command.cmd), log: io.log });
  } catch (err) {
    if (err instanceof PoolInUse && fs.existsSync(registry.socketPath(name))) {
      return callAdmin(registry.socketPath(name), command, io);
    }
    throw err;
  }
  try {
    return await runCommand(
      { pool: hold.pool, registry, devicePaths: [...hold.entry.devices], pid: process.pid, input: io.input, output: io.output },
      command,
    );
  } finally {
    await hold.release();
  }
}
