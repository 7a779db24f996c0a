import { fileURLToPath } from 'node:url';
import { pino, destination, transport, type DestinationStream, Logger } from 'pino';

export type { Logger };

export interface LoggerOptions {
  /**
   * Lines go to a worker thread that writes them (log-writer.ts): the
   * event loop never waits for stderr (a full pipe, a slow journal, a
   * throttled disk), which would stall every peer link of a node daemon.
   * Lines logged before a stop are written before the process exits
   * (flushLogs; pino also flushes on 'exit', a fatal error included).
   */
  async?: boolean;
  /** Where lines go (default 2, stderr). */
  fd?: number;
}

interface AsyncStream extends DestinationStream {
  flushSync(): void;
}

const WRITER = fileURLToPath(new URL('./log-writer.js', import.meta.url));
const asyncStreams = new Set<AsyncStream>();

/**
 * Structured JSON logs on stderr (stdout is for command output such as
 * `listening nbd://...`). Level from DUET_LOG_LEVEL (default info).
 */
export function createLogger(name: string, level = process.env.DUET_LOG_LEVEL ?? 'info', options: LoggerOptions = {}): Logger {
  const fd = options.fd ?? 2;
  if (!options.async) return pino({ name, level, base: { pid: process.pid } }, destination({ fd, sync: true }));
  const stream = transport({ target: WRITER, options: { fd } }) as AsyncStream;
  asyncStreams.add(stream);
  return pino({ name, level, base: { pid: process.pid } }, stream);
}

/**
 * Block until every line logged so far by an asynchronous logger is
 * written: before process.exit, and before writing to stderr directly (an
 * error message comes after the log lines that led to it).
 */
export function flushLogs(): void {
  for (const s of asyncStreams) {
    try {
      s.flushSync();
    } catch {
      /* the writer is gone (closed, or stderr went away): nothing more can be written */
    }
  }
}

/** A logger that drops everything (tests, embedded use). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
