/**
 * Progress on a terminal (a pseudo-TTY from script(1)), as plain lines
 * elsewhere, and never on stdout or with --json.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { DUET, haveProgram, ROOT, run } from './harness.js';
import { inSync, makeCluster, waitStatus } from './cluster-harness.js';

const ESC = '\u001b[';

function sh(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

test('progress: a bar with rate and ETA on a terminal, plain lines in a pipe, nothing with --json; stdout keeps the stream or the JSON alone', { timeout: 180_000 }, async (t) => {
  if (!haveProgram('script')) {
    if (process.env.CI) assert.fail('script(1) (bsdutils) is missing under CI');
    return t.skip('script(1) not installed');
  }
  const c = await makeCluster(t, { diskBytes: 96 * 1024 * 1024 });
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'alpha Primary and in sync', (s) => s.role === 'Primary' && inSync(s));
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v', '--size', '32M'])).code, 0);
  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 16M', '-c', 'flush', c.url('alpha', 'v')]);
  assert.equal(io.code, 0, io.describe());
  assert.equal((await c.duet('alpha', ['vol', 'snapshot', 'pa/v', 'pa/s1'])).code, 0);
  const duet = `${sh(process.execPath)} ${sh(DUET)} --config ${sh(c.file)} --node alpha`;
  const stream = path.join(c.dir, 's1.stream');
  // script(1) gives the command a terminal; what it drew comes out on script's stdout.
  const onTty = (cmd: string) => run('script', ['-qfec', cmd, '/dev/null'], { cwd: ROOT, timeoutMs: 60_000, env: { ...process.env, TERM: 'xterm' } });

  const send = await onTty(`${duet} vol send pa/s1 > ${sh(stream)}`);
  assert.equal(send.code, 0, send.describe());
  assert.match(send.stdout, /send pa\/s1 \[[█░]+\] \d+% \| .* of .* \| .*\/s \| ETA /, send.describe());
  assert.ok(send.stdout.includes(ESC), 'drawn in place (terminal escapes)');
  assert.match(send.stdout, /sent pa\/s1: \d+ record\(s\)/);
  // The stream in the file is whole: no progress got into it.
  assert.ok(!fs.readFileSync(stream).includes(Buffer.from('ETA')));
  const recv = await onTty(`${duet} vol receive pa/r1 < ${sh(stream)}`);
  assert.equal(recv.code, 0, recv.describe());
  assert.match(recv.stdout, /receive pa\/r1 \[[█░]+\] \d+% \|/, recv.describe());
  assert.match(recv.stdout, /received pa\/r1: \d+ record\(s\)/);

  // In a pipe: a plain line (no escapes) on stderr; stdout is only the stream.
  // (DUET_PROGRESS_EVERY_MS=0: at once; by default the first line comes after 3 s, so quick commands print none.)
  const piped = await c.duet('alpha', ['vol', 'send', 'pa/s1'], { env: { ...process.env, DUET_PROGRESS_EVERY_MS: '0' } });
  assert.equal(piped.code, 0, piped.describe());
  assert.match(piped.stderr, /^send pa\/s1: \d+% \(.* of .*\), .*\/s, ETA /m, piped.describe());
  assert.ok(!piped.stderr.includes(ESC));
  assert.equal(Buffer.byteLength(piped.stdout, 'latin1') > 0, true);

  // --json on a terminal: the JSON alone, no bar.
  const verify = await onTty(`${duet} resource verify a --json`);
  assert.equal(verify.code, 0, verify.describe());
  assert.ok(!verify.stdout.includes('[█') && !verify.stdout.includes('ETA'), verify.stdout);
  const doc = JSON.parse(verify.stdout.replace(/\r/g, '')) as { resource: string; outOfSyncBytes: number };
  assert.equal(doc.resource, 'a');
  assert.equal(doc.outOfSyncBytes, 0);
  const wait = await onTty(`${duet} resource wait-sync a --json`);
  assert.equal(wait.code, 0, wait.describe());
  assert.equal((JSON.parse(wait.stdout.replace(/\r/g, '')) as { name: string }).name, 'a');
});
