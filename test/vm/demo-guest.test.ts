/**
 * The demo guest (src/vm/demo-guest.ts) booted for real: QEMU (TCG) with its
 * virtio disk on an nbdkit export. It ticks, powers off on QMP
 * system_powerdown, leaves a pattern verifyPattern accepts, goes on from it
 * on the next boot, and prints ERROR when the disk does not hold what it wrote.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { UserError } from '../../src/util/errors.js';
import { QmpClient } from '../../src/vm/qmp.js';
import {
  BENCH_OFFSET_MIB,
  buildDemoGuest,
  DEMO_GUEST_APPEND,
  PATTERN_OFFSET,
  PATTERN_SLOT_SIZE,
  PATTERN_SLOTS,
  verifyPattern,
  type DemoGuest,
} from '../../src/vm/demo-guest.js';
import { AfterContext, haveProgram, run, spawnTracked, tmpDir, waitFor, withTimeout } from '../e2e/harness.js';
import { freePorts } from '../ports.js';

const S = PATTERN_SLOTS;
/** TCG boot here takes 4-10 s; a CI run shares the 2 cores. */
const BOOT_MS = 60_000;

const haveQemu = haveProgram('qemu-system-x86_64');
const skipVm = !haveQemu && process.env.CI !== 'true' ? 'qemu-system-x86_64 is not installed' : false;

// ---- the pattern, checked from the host (no VM) ------------------------------------------------

function line(seq: number, boot = 'b00710ad', slot = seq % S): string {
  const body = `duet-pattern seq=${seq} slot=${slot} boot=${boot}`;
  return `${body} sum=${createHash('md5').update(body).digest('hex')}`;
}

/** The slots' area as the guest leaves it after writing seqs 1..max (lines given per slot override). */
function area(max: number, over: Record<number, string | Buffer> = {}): Buffer {
  const buf = Buffer.alloc(S * PATTERN_SLOT_SIZE);
  for (let seq = Math.max(1, max - S + 1); seq <= max; seq++) buf.write(`${line(seq)}\n`, (seq % S) * PATTERN_SLOT_SIZE, 'latin1');
  for (const [k, v] of Object.entries(over)) {
    const at = Number(k) * PATTERN_SLOT_SIZE;
    buf.fill(0, at, at + PATTERN_SLOT_SIZE);
    if (typeof v === 'string') buf.write(v, at, 'latin1');
    else v.copy(buf, at);
  }
  return buf;
}

const reader = (buf: Buffer) => async (offset: number, length: number) => {
  assert.equal(offset, PATTERN_OFFSET);
  return buf.subarray(0, length);
};

test('verifyPattern accepts every prefix of the write sequence', async () => {
  for (const max of [0, 1, 30, S - 1, S, S + 1, 1000]) {
    const r = await verifyPattern(reader(area(max)));
    assert.deepEqual(r.errors, [], `max ${max}`);
    assert.equal(r.maxSeq, max);
    assert.equal(r.slots, Math.min(max, S));
  }
  // lines of two boots: numbering goes on across boots
  const two = area(100, { 37: `${line(101, 'b00720ad')}\n`, 38: `${line(102, 'b00720ad')}\n` });
  const r = await verifyPattern(reader(two));
  assert.deepEqual(r.errors, []);
  assert.deepEqual(r.bootIds, ['b00710ad', 'b00720ad']);
});

test('verifyPattern reports a lost write, a bad sum, a misplaced line, garbage and trailing bytes', async () => {
  const cases: [string, Buffer, RegExp][] = [
    ['lost write (the slot still holds the round before)', area(100, { [90 % S]: `${line(90 - S)}\n` }), /slot 26: holds seq 26, expected 90/],
    ['lost write in the first round', area(30, { 12: '' }), /slot 12: empty, expected seq 12/],
    ['bad sum', area(30, { 5: `${line(5).replace('sum=', 'sum=0').slice(0, -1)}\n` }), /slot 5: bad sum/],
    ['line of another slot', area(30, { 6: `${line(7)}\n` }), /slot 6: holds the line of slot 7/],
    ['garbage', area(30, { 40: Buffer.alloc(100, 0x41) }), /slot 40: not a pattern line/],
    ['bytes after the line', area(30, { 3: `${line(3)}\nx` }), /slot 3: bytes after the line of seq 3/],
  ];
  for (const [what, buf, want] of cases) {
    const r = await verifyPattern(reader(buf));
    assert.ok(r.errors.some((e) => want.test(e)), `${what}: ${JSON.stringify(r.errors)}`);
  }
});

// ---- building the guest ----------------------------------------------------------------------

test('buildDemoGuest: missing kernel, modules or static busybox are UserErrors naming the fix', async (t) => {
  const dir = tmpDir(t, 'duet-guest-');
  const boot = path.join(dir, 'boot');
  const mods = path.join(dir, 'modules');
  fs.mkdirSync(boot);
  fs.mkdirSync(mods);
  await assert.rejects(buildDemoGuest(path.join(dir, 'out'), { bootDir: boot, modulesDir: mods }), (e) => {
    return e instanceof UserError && /no .*vmlinuz-\*-amd64 kernel: install busybox-static linux-image-amd64 cpio/.test(e.message);
  });
  fs.writeFileSync(path.join(boot, 'vmlinuz-9.9.9-1-amd64'), 'kernel');
  await assert.rejects(buildDemoGuest(path.join(dir, 'out'), { bootDir: boot, modulesDir: mods }), (e) => {
    return e instanceof UserError && /no .*modules\/<version> for the kernels in .* \(9\.9\.9-1-amd64\)/.test(e.message);
  });
  fs.mkdirSync(path.join(mods, '9.9.9-1-amd64'));
  fs.writeFileSync(path.join(mods, '9.9.9-1-amd64', 'modules.dep'), 'kernel/drivers/virtio/virtio.ko:\n');
  await assert.rejects(buildDemoGuest(path.join(dir, 'out'), { bootDir: boot, modulesDir: mods, busybox: process.execPath }), (e) => {
    return e instanceof UserError && /is dynamically linked .*install busybox-static/.test(e.message);
  });
  if (fs.existsSync('/bin/busybox')) {
    await assert.rejects(buildDemoGuest(path.join(dir, 'out'), { bootDir: boot, modulesDir: mods }), (e) => {
      return e instanceof UserError && /kernel module (virtio_pci|virtio_ring) is missing/.test(e.message);
    });
  }
});

test('buildDemoGuest: a kernel this user cannot read is a UserError naming the file and the fix', async (t) => {
  const dir = tmpDir(t, 'duet-guest-');
  fs.chmodSync(dir, 0o755);
  const boot = path.join(dir, 'boot');
  const mods = path.join(dir, 'modules');
  fs.mkdirSync(path.join(mods, '9.9.9-1-amd64'), { recursive: true });
  fs.mkdirSync(boot);
  const kernel = path.join(boot, 'vmlinuz-9.9.9-1-amd64');
  fs.writeFileSync(kernel, 'kernel', { mode: 0o600 });
  fs.chmodSync(kernel, 0o600);
  const want = new RegExp(`${kernel}: not readable by this user .*sudo chmod 0644 ${kernel}`);
  if (process.getuid?.() !== 0) {
    await assert.rejects(buildDemoGuest(path.join(dir, 'out'), { bootDir: boot, modulesDir: mods }), (e) => e instanceof UserError && want.test(e.message));
    return;
  }
  // root reads anything: try as nobody, as an ordinary user would on a host whose kernels are 0600 (Ubuntu)
  fs.chownSync(kernel, 0, 0);
  const moduleUrl = new URL('../../src/vm/demo-guest.js', import.meta.url).href;
  const script = `process.setgid(65534); process.setuid(65534);
    const { buildDemoGuest } = await import(${JSON.stringify(moduleUrl)});
    try { await buildDemoGuest(${JSON.stringify(path.join(dir, 'out'))}, { bootDir: ${JSON.stringify(boot)}, modulesDir: ${JSON.stringify(mods)} }); console.log('built'); }
    catch (e) { console.log(e.name + ': ' + e.message); }`;
  const r = await run(process.execPath, ['--input-type=module', '-e', script], { timeoutMs: 20_000 });
  assert.equal(r.code, 0, r.describe());
  assert.match(r.stdout, /^UserError: /, r.describe());
  assert.match(r.stdout, want, r.describe());
});

const skipBuild = !fs.existsSync('/bin/busybox') && process.env.CI !== 'true' ? 'busybox-static is not installed' : false;

test('buildDemoGuest builds a gzip newc initramfs once and reuses it', { skip: skipBuild }, async (t) => {
  const dir = tmpDir(t, 'duet-guest-');
  const g = await buildDemoGuest(dir);
  assert.match(path.basename(g.initrd), /^duet-guest-.+-amd64-[0-9a-f]{16}\.cpio\.gz$/);
  const list = await run('sh', ['-c', `gzip -dc '${g.initrd}' | cpio -it --quiet`], { timeoutMs: 20_000 });
  assert.equal(list.code, 0, list.describe());
  for (const f of ['init', 'bin/busybox', 'bin/sh', 'etc/acpi/PWRF/00000080', 'lib/modules/virtio_blk.ko', 'lib/modules/virtio_balloon.ko', 'lib/modules/button.ko']) {
    assert.ok(list.stdout.split('\n').includes(f), `${f} in the initramfs:\n${list.stdout}`);
  }
  const before = fs.statSync(g.initrd);
  const again = await buildDemoGuest(dir);
  assert.deepEqual(again, g);
  const after = fs.statSync(g.initrd);
  assert.equal(after.ino, before.ino, 'the cached initramfs is reused, not rebuilt');
  assert.equal(after.mtimeMs, before.mtimeMs);
  assert.deepEqual(fs.readdirSync(dir), [path.basename(g.initrd)], 'no build leftovers');
});

// ---- booted under QEMU ----------------------------------------------------------------------------

/** nbdkit serving a 64 MiB memory disk on 127.0.0.1 (killed by pid in t.after). */
async function startNbdkit(t: AfterContext, plugin = ['memory', '64M']): Promise<{ port: number; client(): Promise<NbdClient> }> {
  const [port] = await freePorts(1);
  const p = spawnTracked(t, 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...plugin]);
  const client = () => NbdClient.connect({ host: '127.0.0.1', port, connectTimeoutMs: 5000 });
  let last: unknown;
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (p.child.exitCode !== null) assert.fail(`nbdkit exited (${p.child.exitCode}): ${p.stderr()}`);
    try {
      await (await client()).disconnect();
      break;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) assert.fail(`nbdkit on port ${port} never answered: ${String(last)}\n${p.stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { port, client };
}

interface Vm {
  console(): string;
  ticks(): { seq: number; boot: string }[];
  qmp: QmpClient;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr(): string;
}

/** QEMU (TCG) booting the demo guest from nbd://127.0.0.1:PORT (killed by pid in t.after). */
async function startVm(t: AfterContext, dir: string, name: string, guest: DemoGuest, port: number, errorPolicy = 'werror=stop,rerror=stop', append = DEMO_GUEST_APPEND): Promise<Vm> {
  const consoleFile = path.join(dir, `${name}.console`);
  const qmpFile = path.join(dir, `${name}.qmp`);
  const nbd = { driver: 'nbd', 'node-name': 'nbd0', server: { type: 'inet', host: '127.0.0.1', port: String(port) }, export: '' };
  const p = spawnTracked(t, 'qemu-system-x86_64', [
    '-accel', 'tcg', '-machine', 'q35', '-m', '128', '-nodefaults', '-no-user-config', '-display', 'none',
    '-kernel', guest.kernel, '-initrd', guest.initrd, '-append', append,
    '-blockdev', JSON.stringify(nbd),
    '-blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'disk0', file: 'nbd0' }),
    '-device', `virtio-blk-pci,drive=disk0,${errorPolicy}`,
    '-device', 'virtio-balloon-pci',
    '-chardev', `file,id=con0,path=${consoleFile},append=on`, '-serial', 'chardev:con0',
    '-chardev', `socket,id=qmp0,path=${qmpFile},server=on,wait=off`, '-mon', 'chardev=qmp0,mode=control',
    '-pidfile', path.join(dir, `${name}.pid`),
  ]);
  await waitFor(() => fs.existsSync(qmpFile) || p.child.exitCode !== null, 10_000, `QMP socket ${qmpFile}`);
  const qmp = await QmpClient.connect(qmpFile).catch((err: Error) => assert.fail(`${err.message}\nqemu: ${p.stderr()}`));
  t.after(() => qmp.close());
  const readConsole = () => (fs.existsSync(consoleFile) ? fs.readFileSync(consoleFile, 'latin1') : '');
  return {
    console: readConsole,
    ticks: () => [...readConsole().matchAll(/^tick (\d+) boot=([0-9a-f]{8})\r?$/gm)].map((m) => ({ seq: Number(m[1]), boot: m[2] })),
    qmp,
    exited: p.exited,
    stderr: p.stderr,
  };
}

function errorsOn(vm: Vm): string[] {
  return vm.console().split('\n').filter((l) => l.includes('duet-guest ERROR'));
}

/** Wait for `count` ticks of this boot; an ERROR on the way fails at once. */
async function waitTicks(vm: Vm, count: number, ms: number): Promise<void> {
  await waitFor(
    () => {
      assert.deepEqual(errorsOn(vm), [], `guest console:\n${vm.console().slice(-3000)}`);
      return vm.ticks().length >= count;
    },
    ms,
    `${count} ticks on the guest console (qemu: ${vm.stderr()})\n${vm.console().slice(-2000)}`,
    100,
  ).catch((err: Error) => assert.fail(`${err.message}`));
}

async function powerdown(vm: Vm): Promise<void> {
  await vm.qmp.execute('system_powerdown');
  const exit = await withTimeout(vm.exited, 30_000, 'QEMU to exit after system_powerdown');
  assert.deepEqual(exit, { code: 0, signal: null }, `qemu: ${vm.stderr()}`);
  assert.match(vm.console(), /^duet-guest poweroff seq=\d+ boot=[0-9a-f]{8}\r?$/m, 'the guest stopped its loop and powered off');
}

async function verifyDisk(nbd: { client(): Promise<NbdClient> }) {
  const c = await nbd.client();
  try {
    return await verifyPattern((o, l) => c.read(o, l));
  } finally {
    await c.disconnect();
  }
}

async function guestFor(t: AfterContext): Promise<DemoGuest> {
  return buildDemoGuest(tmpDir(t, 'duet-guest-build-'));
}

test('demo guest: ticks, powers off on system_powerdown, and the next boot goes on from its pattern', { skip: skipVm, timeout: 300_000 }, async (t) => {
  const dir = tmpDir(t, 'duet-guest-vm-');
  const guest = await guestFor(t);
  const nbd = await startNbdkit(t);

  const vm1 = await startVm(t, dir, 'boot1', guest, nbd.port);
  await waitTicks(vm1, 1, BOOT_MS);
  await waitTicks(vm1, 30, 60_000);
  const head = vm1.console().match(/^duet-guest boot_id=([0-9a-f]{8}) memory=(\d+)\r?$/m);
  assert.ok(head, vm1.console());
  const boot1 = head[1];
  assert.ok(Number(head[2]) > 32_000 && Number(head[2]) < 128 * 1024, `MemTotal ${head[2]} kB with -m 128`);
  assert.match(vm1.console(), /^duet-guest disk last_seq=0\r?$/m);
  assert.doesNotMatch(vm1.console(), /duet-bench/, 'no benchmark without duet.bench=1');
  await powerdown(vm1);
  const ticks1 = vm1.ticks();
  assert.deepEqual(ticks1.map((x) => x.seq), ticks1.map((_, i) => i + 1), 'seqs 1, 2, 3... on the first boot');
  assert.ok(ticks1.every((x) => x.boot === boot1));
  assert.match(vm1.console(), /^duet-guest ok seq=25\r?$/m);
  const last1 = ticks1[ticks1.length - 1].seq;

  const r1 = await verifyDisk(nbd);
  assert.deepEqual(r1.errors, []);
  assert.equal(r1.maxSeq, last1, 'the last tick printed is the last write on the disk');
  assert.ok(r1.maxSeq >= 30);
  assert.deepEqual(r1.bootIds, [boot1]);

  // the older run's pattern is on the disk: a full round checks every slot's line of it
  const vm2 = await startVm(t, dir, 'boot2', guest, nbd.port);
  await waitTicks(vm2, S + 6, BOOT_MS + 90_000);
  assert.match(vm2.console(), new RegExp(`^duet-guest disk last_seq=${last1}\\r?$`, 'm'));
  const ticks2 = vm2.ticks();
  assert.equal(ticks2[0].seq, last1 + 1, 'numbering goes on from the disk');
  assert.notEqual(ticks2[0].boot, boot1, 'a new boot id');
  await powerdown(vm2);
  assert.deepEqual(errorsOn(vm2), []);
  const r2 = await verifyDisk(nbd);
  assert.deepEqual(r2.errors, []);
  assert.equal(r2.maxSeq, vm2.ticks()[vm2.ticks().length - 1].seq);
  assert.deepEqual(r2.bootIds, [ticks2[0].boot]);
});

/** A first boot of the guest on a fresh nbdkit disk: 10 ticks, powered off, its pattern verified from the host. */
async function tenTicksThenOff(t: { after(fn: () => unknown): void }) {
  const dir = tmpDir(t, 'duet-guest-vm-');
  const guest = await guestFor(t);
  const nbd = await startNbdkit(t);
  const vm1 = await startVm(t, dir, 'boot1', guest, nbd.port);
  await waitTicks(vm1, 10, BOOT_MS + 30_000);
  await powerdown(vm1);
  const r1 = await verifyDisk(nbd);
  assert.deepEqual(r1.errors, []);
  return { dir, guest, nbd, r1 };
}

test('demo guest: a slot corrupted between boots makes the guest print ERROR', { skip: skipVm, timeout: 300_000 }, async (t) => {
  const { dir, guest, nbd, r1 } = await tenTicksThenOff(t);

  // garbage in the slot the next boot writes first (it must be empty: seq maxSeq+1-S < 1)
  const k = (r1.maxSeq + 1) % S;
  const c = await nbd.client();
  await c.write(PATTERN_OFFSET + k * PATTERN_SLOT_SIZE, Buffer.alloc(PATTERN_SLOT_SIZE, 0x5a));
  await c.flush();
  await c.disconnect();
  const r2 = await verifyDisk(nbd);
  assert.ok(r2.errors.some((e) => e.startsWith(`slot ${k}: not a pattern line`)), JSON.stringify(r2.errors));

  const vm2 = await startVm(t, dir, 'boot2', guest, nbd.port);
  const want = `duet-guest ERROR slot ${k}: expected empty, found garbage seq=${r1.maxSeq + 1}`;
  await waitFor(() => vm2.console().includes(want), BOOT_MS, `"${want}" on the console:\n${vm2.console().slice(-2000)}`, 100);
  // the guest goes on and rewrites the slot; the next checks pass
  await waitFor(() => vm2.ticks().length >= 5, 30_000, `ticks after the ERROR:\n${vm2.console().slice(-2000)}`, 100);
  assert.equal(errorsOn(vm2).length, 1, vm2.console());
  await powerdown(vm2);
  assert.deepEqual((await verifyDisk(nbd)).errors, []);
});

test('demo guest: a write lost before the last one (a failover that lost it) is an ERROR at the next boot, at once', { skip: skipVm, timeout: 300_000 }, async (t) => {
  const { dir, guest, nbd, r1 } = await tenTicksThenOff(t);
  // The write of seq maxSeq-3 never happened (its slot empty), the later ones did.
  const c = await nbd.client();
  await c.write(PATTERN_OFFSET + ((r1.maxSeq - 3) % S) * PATTERN_SLOT_SIZE, Buffer.alloc(PATTERN_SLOT_SIZE));
  await c.flush();
  await c.disconnect();
  const vm2 = await startVm(t, dir, 'boot2', guest, nbd.port);
  const want = `duet-guest ERROR disk at boot: ${r1.maxSeq - 1} of the last ${r1.maxSeq} writes up to seq ${r1.maxSeq} are on it seq=`;
  await waitFor(() => vm2.console().includes(want), BOOT_MS, `"${want}" on the console:\n${vm2.console().slice(-2000)}`, 100);
  // Before the first tick: found at boot, not a round of writes later.
  const text = vm2.console();
  assert.ok(text.indexOf(want) < (text.indexOf('\ntick ') >>> 0), text);
  await powerdown(vm2);
});

test('demo guest: a failed write prints ERROR, and the host check finds the lost write', { skip: skipVm, timeout: 300_000 }, async (t) => {
  const dir = tmpDir(t, 'duet-guest-vm-');
  const guest = await guestFor(t);
  // writes fail with EIO while the trigger file exists; QEMU passes errors to the guest (werror=report)
  const trigger = path.join(dir, 'fail-writes');
  const nbd = await startNbdkit(t, ['--filter=error', 'memory', '64M', 'error=EIO', 'error-pwrite-rate=100%', `error-file=${trigger}`]);
  const vm = await startVm(t, dir, 'boot1', guest, nbd.port, 'werror=report,rerror=report');
  const failedWrites = () => [...vm.console().matchAll(/^duet-guest ERROR write slot (\d+): dd: .*Input\/output error seq=(\d+)\r?$/gm)];
  await waitTicks(vm, 3, BOOT_MS);
  fs.writeFileSync(trigger, '');
  await waitFor(() => failedWrites().length > 0, 30_000, `a write ERROR on the console:\n${vm.console().slice(-2000)}`, 50);
  fs.rmSync(trigger);
  // a lost last write leaves a legal (shorter) pattern: the host sees the loss once a later write landed
  const lastFailed = Math.max(...failedWrites().map((m) => Number(m[2])));
  await waitFor(() => vm.ticks().length >= lastFailed + 3, 30_000, `ticks after the failed writes:\n${vm.console().slice(-2000)}`, 100);
  await powerdown(vm);
  const r = await verifyDisk(nbd);
  const lost = failedWrites().filter((m) => Number(m[2]) < r.maxSeq);
  assert.ok(lost.length > 0, vm.console());
  for (const m of lost) {
    assert.ok(r.errors.includes(`slot ${m[1]}: empty, expected seq ${m[2]} (largest seq ${r.maxSeq})`), `seq ${m[2]}: ${JSON.stringify(r)}\n${vm.console()}`);
  }
});

test('demo guest: duet.bench=1 prints one result line per disk measurement, then powers off (duet.bench.then=poweroff)', { skip: skipVm, timeout: 300_000 }, async (t) => {
  const dir = tmpDir(t, 'duet-guest-vm-');
  const guest = await guestFor(t);
  const nbd = await startNbdkit(t);
  // 0x5a everywhere in the first 16 MiB: the benchmark zeroes its area (4..12 MiB) and nothing else
  const MiB = 1024 * 1024;
  const c = await nbd.client();
  await c.write(0, Buffer.alloc(16 * MiB, 0x5a));
  await c.flush();
  await c.disconnect();
  const append = `${DEMO_GUEST_APPEND} duet.bench=1 duet.bench.mib=8 duet.bench.secs=1 duet.bench.then=poweroff`;
  const vm = await startVm(t, dir, 'bench', guest, nbd.port, undefined, append);
  const exit = await withTimeout(vm.exited, BOOT_MS + 60_000, `the benchmark to finish and power off:\n${vm.console().slice(-2000)}`);
  assert.deepEqual(exit, { code: 0, signal: null }, `qemu: ${vm.stderr()}\n${vm.console()}`);
  const text = vm.console();
  assert.match(text, /^duet-bench start mib=8 secs=1\r?$/m);
  const results = new Map([...text.matchAll(/^duet-bench result name=(\w+) ops=(\d+) bytes=(\d+) csec=(\d+)\r?$/gm)].map((m) => [m[1], m.slice(2).map(Number)]));
  assert.deepEqual([...results.keys()], ['spawn', 'seqwrite_1M', 'seqread_1M', 'randwrite_4k', 'randread_4k'], text);
  for (const [name, [ops, bytes, csec]] of results) {
    if (name === 'spawn') continue;
    const block = name.endsWith('_1M') ? 1024 * 1024 : 4096;
    assert.ok(ops > 0 && bytes === ops * block, `${name}: ${ops} ops, ${bytes} bytes`);
    assert.ok(csec >= 100, `${name} ran for the 1 s asked (${csec} cs)`);
    if (name.startsWith('seq')) assert.equal(ops % 8, 0, `${name}: whole passes over the 8 MiB`);
  }
  assert.match(text, /^duet-bench done\r?$/m);
  assert.match(text, /^duet-guest poweroff seq=0 boot=[0-9a-f]{8}\r?$/m);
  assert.doesNotMatch(text, /ERROR|^tick /m, 'no error, and no tick loop before the power off');
  const after = await nbd.client();
  const disk = await after.read(0, 16 * MiB);
  await after.disconnect();
  const runs = (from: number, to: number) => new Set(disk.subarray(from * MiB, to * MiB));
  assert.deepEqual(runs(0, BENCH_OFFSET_MIB), new Set([0x5a]), 'the pattern and what is before the benchmark area are untouched');
  assert.deepEqual(runs(BENCH_OFFSET_MIB, BENCH_OFFSET_MIB + 8), new Set([0]), 'the benchmark wrote its whole area');
  assert.deepEqual(runs(BENCH_OFFSET_MIB + 8, 16), new Set([0x5a]), 'and nothing after it');
});
