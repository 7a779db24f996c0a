import type { FileDeviceOptions } from '../blockdev/file.js';
import { UserError } from '../util/errors.js';

const OVERRIDE = 'DUET_NODE_SYNC_WRITE_MAX_BYTES';

/**
 * How the node daemon opens its replicated disks: small writes 'adaptive'
 * (on the event loop while fast, in libuv's pool while the kernel throttles
 * dirty pages: blockdev/write-backoff.ts). DUET_NODE_SYNC_WRITE_MAX_BYTES
 * overrides it with a fixed choice: 0 puts every write in the pool, N does
 * writes of up to N bytes on the event loop whatever they cost
 * (bench/README.md compares the three).
 */
export function nodeDiskOptions(env: NodeJS.ProcessEnv = process.env): FileDeviceOptions {
  const value = env[OVERRIDE];
  if (value === undefined) return { writeMode: 'adaptive' };
  if (!/^\d+$/.test(value)) throw new UserError(`${OVERRIDE}=${JSON.stringify(value)}: not a byte count (unset it for adaptive writes, 0 for all in the pool)`);
  const max = Number(value);
  return max === 0 ? { writeMode: 'pool' } : { writeMode: 'sync', syncWriteMaxBytes: max };
}
