/**
 * The worker end of an asynchronous logger (log.ts, a pino transport):
 * lines are written here synchronously, so this thread waits for a slow
 * stderr instead of the daemon's event loop, and a line the worker took is
 * on its way out (what a flush before exit waits for). Not libuv's thread
 * pool: that one also does the disk I/O, and a hung disk must not hold
 * back the lines that say so.
 */
import { destination } from 'pino';

export default function logWriter(options: { fd: number }): ReturnType<typeof destination> {
  return destination({ fd: options.fd, sync: true });
}
