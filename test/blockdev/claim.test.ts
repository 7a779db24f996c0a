/**
 * One process at a time per disk: FileDevice.open claims the disk (O_EXCL on
 * a block device; flock plus a pid lock file on a regular file, the lock
 * file alone without the native add-on) and a second open, in this process
 * or another, is refused with one line naming the disk and its holder.
 */
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

import { FileDevice } from '../../src/blockdev/file.js';
import { DiskInUse, lockFileOf } from '../../src/blockdev/claim.js';
import { native, nativeUnavailableReason } from '../../src/blockdev/native.js';

const MiB = 1024 * 1024;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-claim-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

let counter = 0;
function disk(): string {
  const file = path.join(dir, `disk-${counter++}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 4 * MiB);
  return file;
}

const PATHS = [
  { name: 'native (flock + lock file)', useNative: true, skip: native === null ? `add-on not loaded: ${nativeUnavailableReason}` : false },
  { name: 'fallback (lock file with pid and start time)', useNative: false, skip: false },
] as const;

function refused(fn: () => unknown, file: string, holder: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof DiskInUse, `not DiskInUse: ${String(err)}`);
    assert.equal(err.exitCode, 2);
    assert.ok(err.message.startsWith(`disk ${file} is in use by `), err.message);
    assert.match(err.message, holder);
    assert.doesNotMatch(err.message, /\n/);
    return true;
  });
}

/** A child process that opens FILE as a FileDevice and holds it until its stdin closes. */
async function holder(file: string, env: NodeJS.ProcessEnv): Promise<{ pid: number; stop(): Promise<void> }> {
  const script = `
    const { FileDevice } = await import(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'blockdev', 'file.js'))});
    const d = FileDevice.open(process.argv[1]);
    process.stdout.write('held\\n');
    process.stdin.on('end', () => { d.close(); process.exit(0); });
    process.stdin.resume();`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, file], { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const deadline = Date.now() + 10_000;
  while (!out.includes('held')) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`holder did not start: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    pid: child.pid!,
    async stop() {
      child.stdin.end();
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

for (const p of PATHS) {
  describe(`regular file, ${p.name}`, { skip: p.skip }, () => {
    test('a second open in this process is refused, naming this process; after close it opens again', () => {
      const file = disk();
      const a = FileDevice.open(file, { useNative: p.useNative });
      try {
        refused(() => FileDevice.open(file, { useNative: p.useNative }), file, new RegExp(`this process \\(pid ${process.pid}\\)`));
        refused(() => FileDevice.open(file, { useNative: p.useNative, readOnly: true }), file, /this process/);
        // Another path to the same file is the same disk.
        const link = path.join(dir, `link-${counter++}.img`);
        fs.symlinkSync(file, link);
        refused(() => FileDevice.open(link, { useNative: p.useNative }), link, /this process/);
        assert.ok(fs.existsSync(lockFileOf(file)), 'the lock file names the holder while the disk is open');
      } finally {
        a.close();
      }
      assert.ok(!fs.existsSync(lockFileOf(file)), 'the lock file is removed on close');
      FileDevice.open(file, { useNative: p.useNative }).close();
    });

    test('a worker re-opening what its process holds (exclusive: false) is allowed', () => {
      const file = disk();
      const a = FileDevice.open(file, { useNative: p.useNative });
      try {
        FileDevice.open(file, { useNative: p.useNative, exclusive: false }).close();
        assert.ok(fs.existsSync(lockFileOf(file)), 'closing the shared open must not drop the claim');
        refused(() => FileDevice.open(file, { useNative: p.useNative }), file, /this process/);
      } finally {
        a.close();
      }
    });

    for (const other of PATHS) {
      test(`held by another process (${other.useNative ? 'native' : 'fallback'}): refused, naming its pid`, { skip: other.skip }, async () => {
        const file = disk();
        const h = await holder(file, other.useNative ? {} : { DUET_NO_NATIVE: '1' });
        try {
          refused(() => FileDevice.open(file, { useNative: p.useNative }), file, new RegExp(`pid ${h.pid} \\(node --input-type=module`));
        } finally {
          await h.stop();
        }
        FileDevice.open(file, { useNative: p.useNative }).close();
      });
    }

    test('a lock file left by a process that died (or whose pid now runs another program) is taken over', () => {
      const file = disk();
      const gone = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
      fs.writeFileSync(lockFileOf(file), `${gone.stdout} 12345\n`);
      FileDevice.open(file, { useNative: p.useNative }).close();
      // pid 1 is alive, but it did not start at that time: the lock is not its.
      fs.writeFileSync(lockFileOf(file), '1 999999999999\n');
      FileDevice.open(file, { useNative: p.useNative }).close();
      assert.ok(!fs.existsSync(lockFileOf(file)));
    });
  });
}

test('native and fallback opens in one process exclude each other both ways', { skip: PATHS[0].skip }, () => {
  const file = disk();
  for (const [first, second] of [
    [true, false],
    [false, true],
  ]) {
    const a = FileDevice.open(file, { useNative: first });
    try {
      refused(() => FileDevice.open(file, { useNative: second }), file, /this process/);
    } finally {
      a.close();
    }
  }
});

describe('block device (loop)', () => {
  test('O_EXCL: a second open is refused, with or without the add-on, naming this process; a mounted device names its mount point', async (t) => {
    if (process.getuid?.() !== 0) return t.skip('needs root (losetup, mount)');
    const backing = disk();
    let loop: string;
    try {
      loop = execFileSync('losetup', ['--find', '--show', backing], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
    } catch (err) {
      return t.skip(`losetup failed: ${(err as Error).message.split('\n')[0]}`);
    }
    try {
      for (const useNative of [true, false]) {
        if (useNative && native === null) continue;
        const a = FileDevice.open(loop, { useNative });
        try {
          refused(() => FileDevice.open(loop, { useNative }), loop, new RegExp(`this process \\(pid ${process.pid}\\)`));
        } finally {
          a.close();
        }
        FileDevice.open(loop, { useNative, readOnly: true }).close();
      }
      execFileSync('mkfs.ext4', ['-q', '-F', loop], { stdio: 'ignore' });
      const mnt = fs.mkdtempSync(path.join(dir, 'mnt-'));
      execFileSync('mount', [loop, mnt], { stdio: 'ignore' });
      try {
        refused(() => FileDevice.open(loop), loop, new RegExp(`mounted at ${mnt}`));
      } finally {
        execFileSync('umount', [mnt], { stdio: 'ignore' });
      }
    } finally {
      execFileSync('losetup', ['-d', loop], { stdio: 'ignore' });
    }
  });
});
