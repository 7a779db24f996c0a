/**
 * The QEMU process on its own (no cluster): started detached and found
 * again by pid file + QMP, its exit noticed; a QEMU that cannot start is one
 * line quoting what QEMU said; a missing binary names the package.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { QemuProcess, stderrSummary } from '../../src/vm/qemu.js';
import { listenIncoming, settleMigration } from '../../src/vm/migrate.js';
import { vmPaths, type VmSpec } from '../../src/vm/qemu-args.js';
import { UserError } from '../../src/util/errors.js';
import { pino } from 'pino';
import { silentLogger } from '../../src/util/log.js';
import { vmSkip } from './vm-harness.js';

function spec(extra: Partial<VmSpec> = {}): VmSpec {
  return { name: 'unit', memoryBytes: 128 * 1024 * 1024, cpus: 1, disks: [], accel: 'tcg', ...extra };
}

function tmp(t: { after(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-qemu-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A QEMU for one test, SIGKILLed (by pid) when the test ends whatever happened to it. */
async function startKilledAfter(t: { after(fn: () => void): void }, paths: ReturnType<typeof vmPaths>): Promise<QemuProcess> {
  const q = await QemuProcess.start(spec(), paths, silentLogger());
  t.after(() => {
    try {
      process.kill(q.pid, 'SIGKILL');
    } catch {
      // gone
    }
  });
  return q;
}

test('QEMU starts detached, is found again by its pid file and QMP after the first handle is gone, and its kill is noticed', { skip: vmSkip }, async (t) => {
  const paths = vmPaths(path.join(tmp(t), 'vm'));
  const first = await startKilledAfter(t, paths);
  assert.equal((await first.status()).status, 'running');
  assert.equal(first.qmp.oob, true, 'QMP offers out-of-band commands (yank)');
  first.detach();
  const again = await QemuProcess.attach('unit', paths, silentLogger());
  assert.ok(again, 'found again');
  assert.equal(again.pid, first.pid);
  const exit = await again.kill();
  assert.equal(exit.reason, 'killed');
  assert.equal(fs.existsSync(paths.pid), false, 'its pid file goes with it');
  assert.equal(await QemuProcess.attach('unit', paths, silentLogger()), undefined, 'nothing to attach to any more');
});

test('a QEMU found again whose QMP session is lost while it runs: killing it is still noticed', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const paths = vmPaths(path.join(tmp(t), 'vm'));
  const first = await startKilledAfter(t, paths);
  first.detach();
  const lines: string[] = [];
  const again = await QemuProcess.attach('unit', paths, pino({ level: 'info' }, { write: (line: string) => void lines.push(line) }));
  assert.ok(again);
  // The session ends, QEMU lives on (nobody can steer it) and is reported so; later a kill must still see it go.
  again.qmp.close();
  const deadline = Date.now() + 20_000;
  while (!lines.some((l) => l.includes('vm-qmp-lost'))) {
    assert.ok(Date.now() < deadline, 'the lost QMP is reported');
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(again.running, true);
  const exit = await again.kill();
  assert.equal(exit.reason, 'killed');
  assert.equal(again.running, false);
});

test('a pid file naming another process (a recycled pid) is not taken for the VM', { skip: vmSkip }, async (t) => {
  const paths = vmPaths(path.join(tmp(t), 'vm'));
  fs.mkdirSync(paths.dir, { recursive: true });
  fs.writeFileSync(paths.pid, String(process.pid));
  assert.equal(await QemuProcess.attach('unit', paths, silentLogger()), undefined);
});

test('a QEMU that cannot start is one line saying why; a missing binary names the package', { skip: vmSkip }, async (t) => {
  const dir = tmp(t);
  // A port nobody listens on: QEMU cannot open the disk and exits.
  const port = await new Promise<number>((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
  await assert.rejects(
    QemuProcess.start(spec({ disks: [{ volume: 'p/v', node: 'x', host: '127.0.0.1', port, export: 'v' }] }), vmPaths(path.join(dir, 'a')), silentLogger()),
    (err: Error) => {
      assert.ok(err instanceof UserError);
      assert.match(err.message, new RegExp(`^vm unit: QEMU did not start: Failed to connect to '127\\.0\\.0\\.1:${port}': Connection refused$`));
      return true;
    },
  );
  await assert.rejects(QemuProcess.start(spec(), vmPaths(path.join(dir, 'b')), silentLogger(), { binary: 'qemu-system-nonexistent' }), /^UserError: vm unit: qemu-system-nonexistent not found: install qemu-system-x86/);
});

test('stderrSummary keeps the last line, without the program and option prefix', (t) => {
  const file = path.join(tmp(t), 'stderr');
  fs.writeFileSync(file, 'qemu-system-x86_64: warning: something\nqemu-system-x86_64: -blockdev {"driver":"nbd","server":{"type":"inet"}}: Requested export not available\n');
  assert.equal(stderrSummary(file), 'Requested export not available');
  fs.writeFileSync(file, 'qemu-system-x86_64: -m 1T: cannot set up guest memory \'pc.ram\': Cannot allocate memory\n');
  assert.equal(stderrSummary(file), "cannot set up guest memory 'pc.ram': Cannot allocate memory");
  assert.equal(stderrSummary(path.join(path.dirname(file), 'missing')), '');
});

test('a VM directory whose path has a comma (QEMU splits options at commas) still starts, with its console and QMP there', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const paths = vmPaths(path.join(tmp(t), 'home,of', 'vm'));
  fs.mkdirSync(paths.dir, { recursive: true });
  const q = await startKilledAfter(t, paths);
  assert.equal((await q.status()).status, 'running');
  assert.ok(fs.existsSync(paths.console), `the console file is ${paths.console}`);
  assert.ok(fs.existsSync(paths.qmp), `the QMP socket is ${paths.qmp}`);
  await q.kill();
});

test('a migration reported failed after it completed (its query timed out) is taken for completed: QEMU\'s runstate says', { skip: vmSkip, timeout: 60_000 }, async (t) => {
  const dir = tmp(t);
  const src = await startKilledAfter(t, vmPaths(path.join(dir, 'src')));
  const dstPaths = vmPaths(path.join(dir, 'dst'));
  const dst = await QemuProcess.start(spec(), dstPaths, silentLogger(), { incoming: true });
  t.after(() => {
    try {
      process.kill(dst.pid, 'SIGKILL');
    } catch {
      // gone
    }
  });
  const port = await listenIncoming(dst.qmp, '127.0.0.1');
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  const deadline = Date.now() + 30_000;
  while ((await dst.status()).status !== 'running') {
    assert.ok(Date.now() < deadline, 'the destination runs within 30 s');
    await new Promise((r) => setTimeout(r, 50));
  }
  const settled = await settleMigration(src.qmp, { status: 'failed', totalTimeMs: 0, downtimeMs: 0, transferredBytes: 0, error: 'QMP query-migrate: no answer from QEMU within 10000 ms' });
  assert.equal(settled.status, 'completed', JSON.stringify(settled));
  assert.ok(settled.totalTimeMs > 0, 'its figures come from QEMU');

  // A migration that really failed stays failed: the guest runs on at the source.
  const dst2 = await QemuProcess.start(spec(), vmPaths(path.join(dir, 'dst2')), silentLogger(), { incoming: true });
  const port2 = await listenIncoming(dst2.qmp, '127.0.0.1');
  const src2 = await QemuProcess.start(spec(), vmPaths(path.join(dir, 'src2')), silentLogger());
  t.after(() => {
    for (const pid of [dst2.pid, src2.pid]) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  });
  await dst2.kill();
  await src2.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port2}` }).catch(() => undefined);
  const failed = await settleMigration(src2.qmp, { status: 'failed', totalTimeMs: 0, downtimeMs: 0, transferredBytes: 0, error: 'refused' });
  assert.equal(failed.status, 'failed');
  assert.equal((await src2.status()).status, 'running');
});
