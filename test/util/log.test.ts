/**
 * The daemon's asynchronous log: a stderr nobody reads (a full pipe) does
 * not stop the process, and no line is lost when it stops, exits at once
 * or dies of an uncaught exception.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const CHILD = fileURLToPath(new URL('./log-child.js', import.meta.url));
const COUNT = 5000; // ~2.5 MB: far more than a pipe holds (64 KiB)

async function run(mode: 'async' | 'sync', how: 'stop' | 'exit' | 'fatal'): Promise<{ loggedWhileUnread: boolean; lines: { event: string; i?: number }[]; code: number | null }> {
  const child = spawn(process.execPath, [CHILD, mode, String(COUNT), how], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  // stderr is not read until the child says it logged everything: with a synchronous log it never can.
  const loggedWhileUnread = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 10_000);
    let out = '';
    child.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      if (out.includes('logged\n')) {
        clearTimeout(timer);
        resolve(true);
      }
    });
  });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const code = await Promise.race([exited, new Promise<null>((resolve) => setTimeout(() => resolve(null), 20_000))]);
  if (child.exitCode === null) child.kill('SIGKILL');
  await new Promise((resolve) => setImmediate(resolve));
  const lines = err
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { event: string; i?: number });
  return { loggedWhileUnread, lines, code };
}

function assertAll(lines: { event: string; i?: number }[]): void {
  const numbered = lines.filter((l) => l.event === 'line').map((l) => l.i);
  assert.equal(numbered.length, COUNT, `${numbered.length} of ${COUNT} lines written`);
  assert.deepEqual(numbered, [...Array(COUNT).keys()], 'in order');
}

test('async log: a stderr nobody reads does not hold the process up; a stop writes every line, the last one too', { timeout: 60_000 }, async () => {
  const r = await run('async', 'stop');
  assert.ok(r.loggedWhileUnread, 'the logging calls returned while stderr was full');
  assert.equal(r.code, 0);
  assertAll(r.lines);
  assert.equal(r.lines[r.lines.length - 1].event, 'stopped');
});

test('async log: process.exit at once and an uncaught exception lose no line', { timeout: 60_000 }, async () => {
  const exit = await run('async', 'exit');
  assert.equal(exit.code, 0);
  assertAll(exit.lines);
  const fatal = await run('async', 'fatal');
  assert.notEqual(fatal.code, 0);
  assertAll(fatal.lines);
});
