/**
 * The console read in pieces, as `vm console --follow` reads it: each
 * piece starts where the last ended (its `next`), so what is printed is
 * what the guest printed, a character cut by a piece's end included.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ConsoleLog, READ_MAX } from '../../src/vm/console.js';

test('read piece by piece from each piece\'s next: the text printed is the console\'s, a character across pieces and bytes that are not UTF-8 included', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-console-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const printed = Buffer.concat([Buffer.alloc(READ_MAX - 1, 'a'), Buffer.from('é€\n', 'utf8'), Buffer.from([0xff, 0x0a]), Buffer.alloc(READ_MAX - 2, 'b'), Buffer.from('😀 done\n', 'utf8')]);
  fs.writeFileSync(path.join(dir, 'console.log'), printed);
  const log = new ConsoleLog(dir);
  let text = '';
  let at = 0;
  for (let i = 0; i < 10 && at < printed.length; i++) {
    const c = log.read(at);
    text += c.text;
    assert.ok(c.next > at, 'each piece moves on');
    at = c.next;
  }
  assert.equal(at, printed.length);
  assert.equal(text, printed.toString('utf8'));
  // Raw pieces are the bytes themselves.
  const raw = log.read(0, { raw: true });
  assert.ok(Buffer.from(raw.data!, 'base64').equals(printed.subarray(0, READ_MAX)));
  assert.equal(raw.next, READ_MAX);
});
