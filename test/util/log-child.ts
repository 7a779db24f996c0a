/**
 * A process that logs COUNT lines of ~500 bytes through createLogger, says
 * "logged" on stdout, and ends as HOW says: `stop` (flushLogs, then
 * process.exit, as the node daemon stops), `exit` (process.exit at once),
 * `fatal` (an uncaught exception).
 * usage: node log-child.js async|sync COUNT stop|exit|fatal
 */
import { createLogger, flushLogs } from '../../src/util/log.js';

const [mode, count, how] = process.argv.slice(2);
// `node --test dist/test/` runs every file under test/ as a test file, this one too, without arguments.
if (mode === undefined) process.exit(0);
const log = createLogger('log-child', 'info', { async: mode === 'async' });
const pad = 'x'.repeat(400);
for (let i = 0; i < Number(count); i++) log.info({ event: 'line', i, pad }, `line ${i}`);
process.stdout.write('logged\n');
if (how === 'stop') {
  log.info({ event: 'stopped' });
  flushLogs();
  process.exit(0);
} else if (how === 'exit') {
  process.exit(0);
} else {
  setImmediate(() => {
    throw new Error('fatal: on purpose');
  });
}
