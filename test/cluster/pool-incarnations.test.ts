/**
 * Pool incarnations: each open of a pool is told apart, a daemon killed
 * with a pool open finds that open ended uncleanly at its next start, and
 * an export asked for as VOLUME@INCARNATION is served only by that open.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PoolIncarnations, endOf } from '../../src/cluster/pool-incarnations.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { Pool } from '../../src/volume/pool.js';
import { PoolExports } from '../../src/volume/exports.js';
import { createVolume } from '../../src/volume/operations.js';
import { silentLogger } from '../../src/util/log.js';

const A = '0123456789abcdef';
const B = 'fedcba9876543210';

function tempFile(t: { after(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-incarnations-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, 'pool-incarnations.json');
}

test('an open ended by a clean close is clean; one still open when the daemon died is unclean at the next start', (t) => {
  const file = tempFile(t);
  const a = new PoolIncarnations(file, silentLogger());
  a.opened('pa', A);
  assert.equal(a.endOf('pa', A), 'open');
  a.closed('pa', A, true);
  assert.equal(a.endOf('pa', A), 'clean');
  a.opened('pa', B);
  // The daemon dies here (no close): the next one reads the file.
  const b = new PoolIncarnations(file, silentLogger());
  assert.equal(b.endOf('pa', B), 'unclean');
  assert.equal(b.endOf('pa', A), 'unknown', 'an unclean end voids the clean ones before it (a guest that wrote to A and reconnected to B lost what B lost)');
  assert.deepEqual(b.snapshot(), { pa: { unclean: B } });
  // A close that failed is not clean either.
  b.opened('pa', A);
  b.closed('pa', A, false);
  assert.equal(b.endOf('pa', A), 'unclean');
});

test('clean ends since the last unclean one all vouch for their clients (a graceful restart, then a handover): review 3 M1', (t) => {
  const file = tempFile(t);
  const p = new PoolIncarnations(file, silentLogger());
  const ids = ['1111111111111111', '2222222222222222', '3333333333333333'];
  for (const id of ids) {
    p.opened('pa', id);
    p.closed('pa', id, true);
  }
  for (const id of ids) assert.equal(p.endOf('pa', id), 'clean');
  assert.equal(new PoolIncarnations(file, silentLogger()).endOf('pa', ids[0]), 'clean', 'kept across a restart');
  p.opened('pa', A);
  p.closed('pa', A, false);
  for (const id of ids) assert.equal(p.endOf('pa', id), 'unknown');
});

test('an open that cannot be recorded throws (the pool must not serve), durably written otherwise: review 3 H2', (t) => {
  const file = tempFile(t);
  const p = new PoolIncarnations(file, silentLogger());
  p.opened('pa', A);
  p.closed('pa', A, true);
  fs.mkdirSync(`${file}.tmp`);
  assert.throws(() => p.opened('pa', B), /EISDIR|directory/);
  assert.equal(p.endOf('pa', B), 'unknown', 'not recorded: it never served');
  assert.equal(p.endOf('pa', A), 'clean');
  fs.rmdirSync(`${file}.tmp`);
  p.opened('pa', B);
  assert.equal(new PoolIncarnations(file, silentLogger()).endOf('pa', B), 'unclean', 'recorded once it could be');
});

test('a damaged record counts every earlier open as unknown, and is rewritten at the next change', (t) => {
  const file = tempFile(t);
  fs.writeFileSync(file, '{"v":1,"pools":{"pa":{"current":"01');
  const p = new PoolIncarnations(file, silentLogger());
  assert.equal(p.endOf('pa', A), 'unknown');
  p.opened('pa', A);
  assert.equal(new PoolIncarnations(file, silentLogger()).endOf('pa', A), 'unclean');
  assert.equal(endOf(undefined, A), 'unknown');
});

test('an export asked for as VOLUME@INCARNATION is served by that open of the pool only', async (t) => {
  const pool = await Pool.create('pa', [new MemoryDevice(64 * 1024 * 1024, 'd0')], { commitPeriodMs: 0 });
  t.after(() => pool.close());
  await createVolume(pool, 'web', 4 * 1024 * 1024);
  const exports = new PoolExports(pool);
  assert.match(pool.incarnation, /^[0-9a-f]{16}$/);
  assert.equal(exports.get('web')?.name, 'web');
  assert.equal(exports.get(`web@${pool.incarnation}`)?.name, 'web');
  assert.equal(exports.get(`web@${pool.incarnation === A ? B : A}`), undefined, 'another open: refused');
  assert.equal(exports.get(`nope@${pool.incarnation}`), undefined);
  // An earlier open that closed cleanly (as the node daemon tells the exports): its clients may go on.
  const clean = new PoolExports(pool, (inc) => inc === B);
  assert.equal(clean.get(`web@${B}`)?.name, 'web');
  assert.equal(clean.get(`web@${A === pool.incarnation ? '1111111111111111' : A}`), undefined);
  const again = await Pool.create('pb', [new MemoryDevice(64 * 1024 * 1024, 'd1')], { commitPeriodMs: 0 });
  t.after(() => again.close());
  assert.notEqual(again.incarnation, pool.incarnation);
});
