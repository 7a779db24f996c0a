/**
 * Two real node daemons (and a witness) on loopback addresses: initial sync,
 * replicated writes through NBD, bitmap resync of exactly the dirty blocks,
 * failover after SIGKILL with every acknowledged write present, split brain.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { python, randomFile, run, withTimeout } from './harness.js';
import { inSync, makeCluster, waitStatus } from './cluster-harness.js';

const MiB = 1024 * 1024;

test('initial sync, NBD writes replicated, disconnect + writes + reconnect moves only the dirty blocks', async (t) => {
  const c = await makeCluster(t);
  await c.start('alpha');
  await c.start('bravo');
  const s0 = await waitStatus(c, 'alpha', 'initial sync', (s) => s.role === 'Primary' && inSync(s));
  assert.equal(s0.peers[0].role, 'Secondary');
  const bravo0 = await c.status('bravo');
  assert.equal(bravo0.disk, 'UpToDate');
  // The pool was created by the Primary; a volume through the node's API.
  const created = await c.duet('alpha', ['vol', 'create', 'pa/web', '--size', '128M']);
  assert.equal(created.code, 0, created.describe());
  const image = path.join(c.dir, 'image.raw');
  randomFile(image, 16 * MiB);
  const copy = await run('nbdcopy', ['--flush', image, c.url('alpha', 'web')]);
  assert.equal(copy.code, 0, copy.describe() + c.describe());
  await waitStatus(c, 'alpha', 'in sync after writes', inSync);

  // Disconnect, write 3 blocks of 4 KiB with a flush, reconnect.
  const dis = await c.duet('alpha', ['resource', 'disconnect', 'a']);
  assert.equal(dis.code, 0, dis.describe());
  await waitStatus(c, 'alpha', 'StandAlone', (s) => s.peers[0].connection === 'StandAlone');
  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 4k', '-c', 'write -P 0x5b 8M 4k', '-c', 'write -P 0x5c 15M 4k', '-c', 'flush', c.url('alpha', 'web')]);
  assert.equal(io.code, 0, io.describe());
  const apart = await c.status('alpha');
  // Data blocks plus the pool's own metadata writes of that flush (journal, superblock): a few blocks, not 16 MiB.
  assert.ok(apart.outOfSyncBytes >= 3 * 4096 && apart.outOfSyncBytes < 1 * MiB, `out of sync ${apart.outOfSyncBytes}`);
  const con = await c.duet('alpha', ['resource', 'connect', 'a']);
  assert.equal(con.code, 0, con.describe());
  const healed = await waitStatus(c, 'alpha', 'resync of the dirty blocks', (s) => inSync(s) && s.peers[0].lastResync !== null);
  assert.equal(healed.peers[0].lastResync!.sentBytes, apart.outOfSyncBytes, 'exactly the dirty blocks travelled');

  // Fail over cleanly and read the volume from bravo: the same bytes.
  const sec = await c.duet('alpha', ['resource', 'secondary', 'a']);
  assert.equal(sec.code, 0, sec.describe());
  const pri = await c.duet('bravo', ['resource', 'primary', 'a']);
  assert.equal(pri.code, 0, pri.describe());
  const back = path.join(c.dir, 'back.raw');
  const read = await run('nbdcopy', [c.url('bravo', 'web'), back]);
  assert.equal(read.code, 0, read.describe() + c.describe());
  const expected = fs.readFileSync(image);
  Buffer.alloc(4096, 0x5a).copy(expected, 0);
  Buffer.alloc(4096, 0x5b).copy(expected, 8 * MiB);
  Buffer.alloc(4096, 0x5c).copy(expected, 15 * MiB);
  const got = fs.readFileSync(back).subarray(0, 16 * MiB);
  assert.ok(got.equals(expected), 'bravo serves exactly what was written on alpha');
  const check = await c.duet('bravo', ['pool', 'check', 'pa']);
  assert.equal(check.code, 0, check.describe());
});

const WRITER = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
i = 0
while True:
    buf = (i.to_bytes(8, 'little') * 8192)
    h.pwrite(buf, (i % 2048) * 65536, nbd.CMD_FLAG_FUA)
    print(i, flush=True)
    i += 1
`;

test('SIGKILL of the Primary mid-writes, promote the Secondary: every acknowledged write is there, pool check passes', async (t) => {
  const c = await makeCluster(t);
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'initial sync', (s) => s.role === 'Primary' && inSync(s));
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/db', '--size', '256M'])).code, 0);
  // A writer that prints the index of each FUA write once it is acknowledged.
  const { spawn } = await import('node:child_process');
  const writer = spawn('/usr/bin/python3', ['-c', WRITER, c.url('alpha', 'db')], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  writer.stdout.on('data', (b: Buffer) => (out += b.toString()));
  // Listen for the exit now: the writer may be gone before the kill below returns.
  const writerExited = new Promise((r) => writer.once('exit', r));
  t.after(() => writer.kill('SIGKILL'));
  const started = Date.now();
  while (out.split('\n').length <= 300 && Date.now() - started < 20_000) await new Promise((r) => setTimeout(r, 20));
  await c.kill('alpha', 'SIGKILL');
  await withTimeout(writerExited, 20_000, 'the writer to stop after its server died').catch(() => writer.kill('SIGKILL'));
  const acked = out.split('\n').filter((l) => /^\d+$/.test(l)).map(Number);
  assert.ok(acked.length >= 300, `writer acknowledged ${acked.length} writes`);
  await waitStatus(c, 'bravo', 'alpha gone', (s) => s.peers[0].connection !== 'Connected');
  const pri = await c.duet('bravo', ['resource', 'primary', 'a']);
  assert.equal(pri.code, 0, pri.describe() + c.describe());
  const back = path.join(c.dir, 'db.raw');
  const read = await run('nbdcopy', [c.url('bravo', 'db'), back]);
  assert.equal(read.code, 0, read.describe());
  const data = fs.readFileSync(back);
  // The last acknowledged write to each slot must be there (later ones may be, unacknowledged).
  const lastBySlot = new Map<number, number>();
  for (const i of acked) lastBySlot.set(i % 2048, i);
  for (const [slot, i] of lastBySlot) {
    const v = data.readBigUInt64LE(slot * 65536);
    assert.ok(v >= BigInt(i), `slot ${slot}: acknowledged write ${i} missing (found ${v})`);
    assert.ok(data.subarray(slot * 65536, slot * 65536 + 65536).equals(Buffer.alloc(65536, data.subarray(slot * 65536, slot * 65536 + 8))), `slot ${slot} is torn`);
  }
  const check = await c.duet('bravo', ['pool', 'check', 'pa']);
  assert.equal(check.code, 0, check.describe());
  // The old Primary comes back as Secondary and becomes a SyncTarget of bravo.
  await c.start('alpha');
  const s = await waitStatus(c, 'bravo', 'alpha resynced from bravo', (x) => inSync(x) && x.role === 'Primary');
  assert.equal(s.peers[0].role, 'Secondary');
  const sum = crypto.createHash('sha256');
  sum.update(data);
  assert.ok(sum.digest('hex').length > 0);
});

test('split brain: both sides written while apart is detected, nothing merged, resolve --keep heals and saves the loser\'s blocks', async (t) => {
  const c = await makeCluster(t);
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'initial sync', (s) => s.role === 'Primary' && inSync(s));
  assert.equal((await c.duet('alpha', ['vol', 'create', 'pa/v', '--size', '64M'])).code, 0);
  await waitStatus(c, 'alpha', 'in sync', inSync);
  // The link is cut from bravo's side (a Secondary's disconnect does not outdate anyone): as if the network failed.
  assert.equal((await c.duet('bravo', ['resource', 'disconnect', 'a'])).code, 0);
  assert.equal((await c.duet('alpha', ['resource', 'disconnect', 'a'])).code, 0);
  assert.equal((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xaa 0 64k', '-c', 'flush', c.url('alpha', 'v')])).code, 0);
  const pb = await c.duet('bravo', ['resource', 'primary', 'a']);
  assert.equal(pb.code, 0, pb.describe());
  assert.equal((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xbb 1M 64k', '-c', 'flush', c.url('bravo', 'v')])).code, 0);
  assert.equal((await c.duet('bravo', ['resource', 'secondary', 'a'])).code, 0);
  assert.equal((await c.duet('alpha', ['resource', 'connect', 'a'])).code, 0);
  assert.equal((await c.duet('bravo', ['resource', 'connect', 'a'])).code, 0);
  const sb = await waitStatus(c, 'alpha', 'split brain detected', (s) => s.splitBrain !== null && s.lastRefusal !== null);
  assert.match(sb.lastRefusal!, /split brain/);
  assert.ok(sb.splitBrain!.localChangedBytes > 0 && sb.splitBrain!.peerChangedBytes > 0);
  const text = await c.duet('alpha', ['resource', 'status', 'a']);
  assert.match(text.stdout, /split brain since .* changed here/);
  // Keep alpha's data.
  const res = await c.duet('alpha', ['resource', 'resolve', 'a', '--keep', 'alpha']);
  assert.equal(res.code, 0, res.describe());
  await waitStatus(c, 'alpha', 'healed', (s) => inSync(s));
  const b = await waitStatus(c, 'bravo', 'bravo saved its blocks', (s) => s.splitBrain?.savedTo !== null && s.splitBrain?.savedTo !== undefined);
  assert.ok(fs.existsSync(b.splitBrain!.savedTo!), 'the saved-blocks file exists on bravo');
  const saved = fs.readFileSync(b.splitBrain!.savedTo!);
  assert.ok(saved.includes(Buffer.alloc(4096, 0xbb)), "bravo's own write is in the saved file");
  const r = await python(
    `import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint(h.pread(1,0)[0], h.pread(1,1024*1024)[0])`,
    [c.url('alpha', 'v')],
  );
  assert.equal(r.stdout.trim(), `${0xaa} 0`, r.describe());

  // Undo: bravo takes the Primary role and writes back what it saved; both disks then hold bravo's side.
  assert.equal((await c.duet('alpha', ['resource', 'secondary', 'a'])).code, 0);
  const pb2 = await c.duet('bravo', ['resource', 'primary', 'a']);
  assert.equal(pb2.code, 0, pb2.describe());
  const undo = await c.duet('bravo', ['resource', 'restore-blocks', 'a', b.splitBrain!.savedTo!]);
  assert.equal(undo.code, 0, undo.describe());
  assert.match(undo.stdout, /restored .* from /);
  const r2 = await python(
    `import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint(h.pread(1,0)[0], h.pread(1,1024*1024)[0])`,
    [c.url('bravo', 'v')],
  );
  assert.equal(r2.stdout.trim(), `0 ${0xbb}`, r2.describe() + c.describe());
  const check = await c.duet('bravo', ['pool', 'check', 'pa']);
  assert.equal(check.code, 0, check.describe());
  await waitStatus(c, 'bravo', 'replicated', inSync);
  const bad = await c.duet('bravo', ['resource', 'restore-blocks', 'a', path.join(c.dir, 'cluster.yaml')]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /not a duet split-brain blocks file/);
});

test('verify through the CLI finds exactly the block corrupted behind the Secondary\'s back, and the resync repairs it; a disconnect by the Primary outdates the Secondary', async (t) => {
  const c = await makeCluster(t);
  await c.start('alpha');
  await c.start('bravo');
  await waitStatus(c, 'alpha', 'initial sync', (s) => s.role === 'Primary' && inSync(s));
  const bravoDisk = path.join(c.dir, 'bravo.img');
  const at = 300 * MiB + 12 * 4096;
  const fd = fs.openSync(bravoDisk, 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, at);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const v = await c.duet('alpha', ['resource', 'verify', 'a', '--json'], { timeoutMs: 120_000 });
  assert.equal(v.code, 0, v.describe());
  const report = JSON.parse(v.stdout) as { outOfSyncBytes: number; ranges: { offset: number; length: number }[] };
  assert.equal(report.outOfSyncBytes, 4096);
  assert.deepEqual(report.ranges, [{ offset: at, length: 4096 }]);
  await waitStatus(c, 'alpha', 'repaired', (s) => inSync(s) && s.peers[0].lastResync !== null);
  const back = Buffer.alloc(4096);
  const rfd = fs.openSync(bravoDisk, 'r');
  fs.readSync(rfd, back, 0, 4096, at);
  fs.closeSync(rfd);
  assert.ok(back.equals(Buffer.alloc(4096)), 'the corrupted block is the Primary\'s again');
  // From the Secondary too (it asks the Primary for the digests): in sync now, once bravo has seen its resync end.
  await waitStatus(c, 'bravo', 'bravo in sync', (s) => inSync(s) && s.peers[0].connection === 'Connected');
  const v2 = await c.duet('bravo', ['resource', 'verify', 'a', '--json'], { timeoutMs: 120_000 });
  assert.equal(v2.code, 0, v2.describe());
  assert.equal((JSON.parse(v2.stdout) as { outOfSyncBytes: number }).outOfSyncBytes, 0, v2.stdout);

  assert.equal((await c.duet('alpha', ['resource', 'disconnect', 'a'])).code, 0);
  await waitStatus(c, 'bravo', 'bravo Outdated', (s) => s.disk === 'Outdated');
  const p = await c.duet('bravo', ['resource', 'primary', 'a']);
  assert.equal(p.code, 1, p.describe()); // a refusal because of state (CONTRACT)
  assert.match(p.stderr, /Outdated/);
  assert.equal((await c.duet('alpha', ['resource', 'connect', 'a'])).code, 0);
  await waitStatus(c, 'bravo', 'UpToDate again', (s) => s.disk === 'UpToDate' && s.peers[0].connection === 'Connected');
});
