/**
 * Live migration between two QEMUs over QMP: the destination, started with
 * `-incoming defer`, listens; the source sends the guest's memory while it
 * runs, then stops it for the last pages and the device state (the
 * downtime), and the destination runs it on. Both QEMUs use the same NBD
 * exports (the Primary's), so there is no storage to copy.
 *
 * A migration that fails leaves the guest running on the source (QEMU
 * resumes it); the destination QEMU exits by itself when its incoming
 * stream breaks. After a completed migration the source QEMU is paused
 * (postmigrate) and must be ended: never two running copies.
 */
import type { QmpClient } from './qmp.js';

export interface MigrationResult {
  status: 'completed' | 'failed' | 'cancelled';
  /** From the start of `migrate` to the end, as QEMU counts it. */
  totalTimeMs: number;
  /** How long the guest did not run. */
  downtimeMs: number;
  transferredBytes: number;
  error?: string;
}

interface QueryMigrate {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'error-desc'?: string;
  ram?: { transferred?: number; total?: number; remaining?: number };
  'socket-address'?: { type: string; host?: string; port?: string }[];
}

const POLL_MS = 50;

/** Destination: listen for the incoming migration at `host`; resolves with the port QEMU picked. */
export async function listenIncoming(qmp: QmpClient, host: string): Promise<number> {
  await qmp.execute('migrate-incoming', { uri: `tcp:${host}:0` });
  const q = await qmp.execute<QueryMigrate>('query-migrate');
  const port = Number(q['socket-address']?.find((a) => a.type === 'inet')?.port);
  if (!Number.isInteger(port) || port <= 0) throw new Error(`QEMU did not say which port it listens on for the migration (query-migrate: ${JSON.stringify(q)})`);
  return port;
}

/**
 * Source: migrate to `host:port` and wait (bounded) for the end. A migration still running at
 * `timeoutMs` is cancelled (the guest keeps running here).
 */
export async function migrateOut(
  qmp: QmpClient,
  host: string,
  port: number,
  options: { timeoutMs: number; bandwidthBytesPerSec?: number; maxDowntimeMs?: number; progress?: (q: { transferred: number; total: number }) => void },
): Promise<MigrationResult> {
  // The LAN is the limit unless the cluster file caps it (QEMU's own default is 128 MiB/s).
  // The pause at the switch-over: QEMU stops the guest once what is left to send fits in this time at the rate measured.
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': options.bandwidthBytesPerSec ?? 10 * 1024 * 1024 * 1024, 'downtime-limit': options.maxDowntimeMs ?? 100 });
  await qmp.execute('migrate', { uri: `tcp:${host}:${port}` });
  const deadline = Date.now() + options.timeoutMs;
  let cancelled = false;
  for (;;) {
    const q = await qmp.execute<QueryMigrate>('query-migrate');
    const status = q.status ?? 'none';
    if (status === 'completed' || status === 'failed' || status === 'cancelled') {
      return {
        status,
        totalTimeMs: q['total-time'] ?? 0,
        downtimeMs: q.downtime ?? 0,
        transferredBytes: q.ram?.transferred ?? 0,
        ...(q['error-desc'] ? { error: q['error-desc'] } : status === 'cancelled' && cancelled ? { error: `not done within ${options.timeoutMs / 1000} s: cancelled` } : {}),
      };
    }
    options.progress?.({ transferred: q.ram?.transferred ?? 0, total: q.ram?.total ?? 0 });
    if (!cancelled && Date.now() > deadline) {
      cancelled = true;
      await qmp.execute('migrate_cancel').catch(() => undefined);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

/**
 * A migration reported as not completed (polling it failed: QMP did not answer in time; a cancel came
 * too late) may have completed all the same, and then the guest runs at the destination while this QEMU
 * is paused for good (postmigrate). QEMU's runstate says which: taking such a copy for the VM would
 * leave two (and `cont` would run it again on the same disks).
 */
export async function settleMigration(qmp: QmpClient, result: MigrationResult): Promise<MigrationResult> {
  if (result.status === 'completed') return result;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const st = await qmp.execute<{ status: string }>('query-status');
      if (st.status !== 'postmigrate') return result;
      const q = await qmp.execute<QueryMigrate>('query-migrate').catch((): QueryMigrate => ({}));
      return { status: 'completed', totalTimeMs: q['total-time'] ?? result.totalTimeMs, downtimeMs: q.downtime ?? result.downtimeMs, transferredBytes: q.ram?.transferred ?? result.transferredBytes };
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
  return result;
}
