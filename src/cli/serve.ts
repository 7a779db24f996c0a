import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import type { Command } from 'commander';
import { FileDevice } from '../blockdev/file.js';
import type { BlockDevice } from '../blockdev/types.js';
import { StaticExports, NbdExport } from '../nbd/exports.js';
import { NbdServer, NbdServerTls } from '../nbd/server.js';
import { native } from '../blockdev/native.js';
import { ServeWorkers } from './serve-workers.js';
import { createLogger, Logger } from '../util/log.js';
import { UserError, errnoCode } from '../util/errors.js';
import { formatHostPort, listenError, parseListen } from './listen.js';
import { servePool } from './serve-pool.js';

export interface ServeOptions {
  listen: string;
  readOnly?: boolean;
  tls?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  workers?: string;
  pool?: string;
}

/**
 * How many worker threads serve connections: each has its own event loop
 * and its own descriptors on the exported files, so connections (e.g. a
 * multi-conn client) use several cores. Handing a socket to a thread needs
 * dup(2) from the native add-on; without it everything runs on one thread.
 */
export function resolveWorkers(text: string | undefined): number {
  if (text === undefined || text === 'auto') {
    if (!native) return 0;
    return Math.min(os.availableParallelism(), WORKERS_AUTO_MAX);
  }
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0 || n > WORKERS_MAX) throw new UserError(`--workers ${text}: use auto or a number from 0 to ${WORKERS_MAX}`);
  if (n > 0 && !native) throw new UserError(`--workers ${text}: needs the native add-on (npm install builds it); use --workers 0`);
  return n;
}

const WORKERS_AUTO_MAX = 4;
const WORKERS_MAX = 64;

export function registerServe(program: Command): void {
  program
    .command('serve')
    .description('export files or block devices over NBD (fixed newstyle)')
    .argument('[exports...]', '[NAME=]PATH of a file or block device; the first is also the default export ""')
    .option('--pool <pool>', 'export every volume of POOL (snapshots read-only) instead of PATHs')
    .option('--listen <host:port>', 'address to listen on', '127.0.0.1:10809')
    .option('--read-only', 'refuse writes on every export')
    .option('--tls <mode>', 'on (clients may use STARTTLS) or require (they must); needs --tls-cert and --tls-key')
    .option('--tls-cert <file>', 'server certificate chain (PEM)')
    .option('--tls-key <file>', 'server private key (PEM)')
    .option('--tls-ca <file>', 'CA (PEM) that client certificates must be signed by; asks every client for one')
    .option('--workers <n>', 'extra threads serving connections: a number, or auto (one per core, at most 4); 0 = the main thread only', '0')
    .action(async (specs: string[], options: ServeOptions, cmd: Command) => {
      if (options.pool !== undefined) {
        if (specs.length > 0) throw new UserError('serve: give either PATHs or --pool POOL, not both');
        await servePool(options.pool, options, cmd);
        return;
      }
      if (specs.length === 0) throw new UserError('serve: name at least one PATH to export (or --pool POOL)');
      await serve(specs, options);
    });
}

/** NAME=PATH, or PATH whose export name is its file name without extension. */
export function parseExportSpec(spec: string): { name: string; path: string } {
  const eq = spec.indexOf('=');
  // A path may contain '=' itself; only treat the prefix as a name if it has no '/'.
  if (eq > 0 && !spec.slice(0, eq).includes('/')) return { name: spec.slice(0, eq), path: spec.slice(eq + 1) };
  if (eq === 0) throw new UserError(`"${spec}": empty export name before "="`);
  const base = path.basename(spec);
  const ext = path.extname(base);
  return { name: ext && ext !== base ? base.slice(0, -ext.length) : base, path: spec };
}

export async function serve(specs: string[], options: ServeOptions): Promise<void> {
  const log = createLogger('duet-serve');
  // Check every option before opening anything.
  const addr = parseListen(options.listen);
  const tlsFiles = loadTls(options);
  const workerCount = resolveWorkers(options.workers);
  const parsed = specs.map(parseExportSpec);
  const names = new Set<string>();
  for (const p of parsed) {
    if (!p.path) throw new UserError(`export "${p.name}": no PATH after "="`);
    if (names.has(p.name)) throw new UserError(`export name "${p.name}" is used twice: give each PATH its own NAME=PATH`);
    names.add(p.name);
  }

  const { devices, exports } = await openExports(parsed, options.readOnly ?? false);
  let workers: ServeWorkers | undefined;
  if (workerCount > 0) {
    workers = await ServeWorkers.start(workerCount, { exports: parsed, readOnly: options.readOnly ?? false, tls: tlsFiles }, log);
  }
  const server = new NbdServer({
    exports: new StaticExports(exports),
    log,
    tls: tlsFiles ? tlsSettingsOf(tlsFiles) : undefined,
    handoff: workers ? (socket) => workers.handoff(socket) : undefined,
  });
  let port = addr.port;
  try {
    const bound = await server.listen(addr.host, addr.port);
    if (typeof bound !== 'string') port = bound.port; // --listen HOST:0 picks a free port
  } catch (err) {
    await workers?.stop();
    for (const d of devices) await d.close();
    throw listenError(addr, err);
  }
  const where = formatHostPort(addr.host, port);
  log.info({
    event: 'serving',
    listen: where,
    workers: workers?.count ?? 0,
    exports: exports.map((e) => ({ name: e.name, path: e.description, size: e.device.size })),
  });
  // Signal handlers before the ready lines: a script may send SIGTERM the
  // moment it reads them.
  installShutdown(server, log, async () => {
    for (const d of devices) {
      if (!d.capabilities.readOnly) await d.flush();
      await d.close();
    }
  }, workers);
  for (const e of exports) process.stdout.write(`listening nbd://${where}/${e.name}\n`);
}

/** The TLS material, read and checked once; plain data so it can go to worker threads. */
export interface TlsFiles {
  cert: Buffer;
  key: Buffer;
  ca?: Buffer;
  required: boolean;
}

/** Read --tls-* options; undefined when TLS is off. */
export function loadTls(options: ServeOptions): TlsFiles | undefined {
  const mode = options.tls ?? (options.tlsCert || options.tlsKey ? 'on' : 'off');
  if (mode !== 'on' && mode !== 'require' && mode !== 'off') throw new UserError(`--tls ${mode}: use on, require or off`);
  if (mode === 'off') return undefined;
  if (!options.tlsCert || !options.tlsKey) throw new UserError(`--tls ${mode} needs --tls-cert FILE and --tls-key FILE`);
  const read = (what: string, file: string): Buffer => {
    try {
      return fs.readFileSync(file);
    } catch (err) {
      throw new UserError(`${what} ${file}: cannot read (${errnoCode(err) ?? (err as Error).message})`);
    }
  };
  const files: TlsFiles = {
    cert: read('--tls-cert', options.tlsCert),
    key: read('--tls-key', options.tlsKey),
    ca: options.tlsCa ? read('--tls-ca', options.tlsCa) : undefined,
    required: mode === 'require',
  };
  try {
    tlsSettingsOf(files);
  } catch (err) {
    throw new UserError(`--tls-cert/--tls-key: not a usable certificate and key: ${(err as Error).message}`);
  }
  return files;
}

export function tlsSettingsOf(files: TlsFiles): NbdServerTls {
  // Buffers reach worker threads as plain Uint8Arrays: view them as Buffers again.
  const buf = (b: Uint8Array): Buffer => Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  const context = tls.createSecureContext({ cert: buf(files.cert), key: buf(files.key), ca: files.ca && buf(files.ca), minVersion: 'TLSv1.2' });
  return { context, required: files.required, verifyClient: files.ca !== undefined };
}

export interface ExportSpec {
  name: string;
  path: string;
}

/**
 * Open every export's device; on failure close what was opened and rethrow.
 * `exclusive` false: a worker thread, re-opening what its process holds.
 */
export async function openExports(specs: ExportSpec[], readOnly: boolean, exclusive = true): Promise<{ devices: BlockDevice[]; exports: NbdExport[] }> {
  const devices: BlockDevice[] = [];
  const exports: NbdExport[] = [];
  try {
    for (const p of specs) {
      const device = FileDevice.open(p.path, { readOnly, exclusive });
      devices.push(device);
      exports.push({ name: p.name, device, description: p.path, readOnly });
    }
  } catch (err) {
    for (const d of devices) await d.close();
    throw err;
  }
  return { devices, exports };
}

/** SIGINT/SIGTERM: stop accepting, finish in-flight requests, then `cleanup` (flush, close), exit 0. */
export function installShutdown(server: NbdServer, log: Logger, cleanup: () => Promise<void>, workers?: ServeWorkers): void {
  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) return;
    stopping = true;
    log.info({ event: 'shutting down', signal, connections: server.connectionCount });
    let code = 0;
    try {
      await Promise.all([server.close(), workers?.stop()]);
      await cleanup();
    } catch (err) {
      log.error({ event: 'shutdown failed', err: (err as Error).message });
      code = 1;
    }
    log.info({ event: 'stopped', stats: server.stats, workerStats: workers?.stats });
    process.exit(code);
  };
  process.on('SIGINT', () => void stop('SIGINT'));
  process.on('SIGTERM', () => void stop('SIGTERM'));
}
