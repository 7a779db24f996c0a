import { pino, destination, Logger } from 'pino';

export type { Logger };

/**
 * Structured JSON logs on stderr (stdout is for command output such as
 * `listening nbd://...`). Level from DUET_LOG_LEVEL (default info).
 */
export function createLogger(name: string, level = process.env.DUET_LOG_LEVEL ?? 'info'): Logger {
  return pino({ name, level, base: { pid: process.pid } }, destination({ fd: 2, sync: true }));
}

/** A logger that drops everything (tests, embedded use). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
