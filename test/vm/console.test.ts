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
import { ConsoleLog, HISTORY_MAX, READ_MAX } from '../../src/vm/console.js';
import { native } from '../../src/blockdev/native.js';

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

/** The bytes `n` from position `from` of a console that printed "line N\n" lines. */
function lines(from: number, to: number): Buffer {
  const out: string[] = [];
  for (let i = from; i < to; i++) out.push(`line ${String(i).padStart(8, '0')}\n`);
  return Buffer.from(out.join(''));
}

for (const mode of ['punch', 'truncate'] as const) {
  test(`a console past its bound moves into the history and stays readable at the same positions (${mode === 'punch' ? 'blocks punched out: native add-on' : 'truncated: without the add-on'})`, { skip: mode === 'punch' && !native ? 'the native add-on is not built' : false }, (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-console-'));
    t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
    const options = { liveMax: 256 * 1024, ...(mode === 'truncate' ? { punch: null } : {}) };
    const log = new ConsoleLog(dir, options);
    const file = path.join(dir, 'console.log');
    const printed: Buffer[] = [];
    const print = (b: Buffer): void => {
      printed.push(b);
      fs.appendFileSync(file, b);
    };
    // 2.5 MiB printed in rounds, the daemon trimming between them, as it does every 2 s.
    for (let round = 0; round < 10; round++) {
      print(lines(round * 15_000, (round + 1) * 15_000));
      log.rotate();
    }
    const all = Buffer.concat(printed);
    const kept = log.all();
    assert.equal(kept.start + kept.bytes.length, all.length, 'the console ends where the guest stopped printing');
    assert.ok(kept.bytes.equals(all.subarray(kept.start)), 'what is kept is the end of what was printed, byte for byte');
    assert.ok(kept.bytes.length >= 64 * 1024 && kept.bytes.length <= HISTORY_MAX + options.liveMax, `kept ${kept.bytes.length} bytes`);
    // console.log no longer holds what moved: punched (its blocks freed, same length) or truncated.
    const st = fs.statSync(file);
    if (mode === 'punch') {
      assert.equal(st.size, all.length, 'QEMU appends on at the same offset');
      assert.ok(st.blocks * 512 <= options.liveMax + 64 * 1024, `console.log uses ${st.blocks * 512} bytes of disk`);
    } else {
      assert.ok(st.size <= options.liveMax, `console.log is ${st.size} bytes`);
    }
    // A reader following from a position before the move goes on from the history, without a gap or a repeat.
    const at = kept.start + 1000;
    const c = log.read(at);
    assert.equal(c.from, at);
    assert.ok(Buffer.from(c.text).equals(all.subarray(at, c.next)));
    // More printed after the move reads on.
    print(Buffer.from('after\n'));
    assert.equal(log.read(all.length).text, 'after\n');
  });
}

test('a crash after the history was written but before console.log was freed counts each byte once', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-console-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const printed = lines(0, 1000);
  fs.writeFileSync(path.join(dir, 'console.log'), printed);
  // The history holds the first 600 lines, and says so (skip); console.log still has them all.
  const cut = 600 * 14;
  fs.writeFileSync(path.join(dir, 'console.history'), Buffer.concat([Buffer.from(`duet-console v1 start=0 skip=${cut}\n`), printed.subarray(0, cut)]));
  const kept = new ConsoleLog(dir, { liveMax: 1024 }).all();
  assert.equal(kept.start, 0);
  assert.ok(kept.bytes.equals(printed));
  // The truncation happened too (console.log shorter than skip: what it holds now is new).
  fs.writeFileSync(path.join(dir, 'console.log'), 'new\n');
  const after = new ConsoleLog(dir).all();
  assert.ok(after.bytes.equals(Buffer.concat([printed.subarray(0, cut), Buffer.from('new\n')])));
});

test('a history written before the header (console.base beside it) still reads at its positions', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-console-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'console.history'), 'old\n');
  fs.writeFileSync(path.join(dir, 'console.base'), JSON.stringify({ start: 5000 }));
  fs.writeFileSync(path.join(dir, 'console.log'), 'new\n');
  const c = new ConsoleLog(dir).read(5000);
  assert.equal(c.start, 5000);
  assert.equal(c.text, 'old\nnew\n');
});
