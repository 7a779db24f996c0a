/**
 * on-no-quorum: suspend, end to end in one process: two real Resources over
 * a real link, each with a Quorum whose witness is a real Witness reached
 * through a switch (a partition cuts a node from it). Writes are held in
 * every path while there is no quorum, reads go on; they complete when the
 * witness or the peer is back; they fail at once when the node learns the
 * other side went on without it; `demote(force)` ends them; the node then
 * resyncs from the new Primary by itself, with no split brain.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Quorum } from '../../src/cluster/quorum.js';
import { Witness } from '../../src/cluster/witness.js';
import { FORCED_FENCE_WAIT_MS, type Resource } from '../../src/replication/resource.js';
import { UserError } from '../../src/util/errors.js';
import { silentLogger } from '../../src/util/log.js';
import { connected, freePort, newDisk, Node, readAll, startNode, stopNode, until, upToDate } from '../replication/pair.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

interface Cluster {
  a: Node;
  b: Node;
  /** Can each node reach the witness? */
  reach: Record<string, boolean>;
  witnessDir: string;
}

async function cluster(): Promise<Cluster> {
  const witnessDir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-quorum-'));
  const witness = new Witness(path.join(witnessDir, 'witness.json'), ['alpha', 'bravo'], silentLogger());
  const reach: Record<string, boolean> = { alpha: true, bravo: true };
  const port = await freePort();
  const nodes: Record<string, { r?: Resource }> = { alpha: {}, bravo: {} };
  const start = async (name: 'alpha' | 'bravo'): Promise<Node> => {
    const peer = name === 'alpha' ? 'bravo' : 'alpha';
    const quorum = new Quorum({
      node: name,
      log: silentLogger(),
      call: async (c) => {
        // A little latency, as over a network; unreachable: the call fails as a timed-out one does.
        await new Promise((r) => setTimeout(r, 2));
        if (!reach[name]) throw new UserError(`the witness did not answer within 1000 ms`);
        return witness.handle({ ...c, node: name });
      },
    });
    const n = await startNode(name, await newDisk(SIZE, name), port, {
      fence: (_r, generation, signal) => quorum.fence(nodes[name].r!, peer, 'suspend', generation, signal),
      mayPromote: (_r, force) => quorum.mayPromote(nodes[name].r!, force),
    });
    nodes[name].r = n.resource;
    return n;
  };
  const a = await start('alpha');
  const b = await start('bravo');
  await until('both-new', () => connected(a, b));
  await a.resource.promote(true);
  await until('initial sync', () => upToDate(a, b));
  return { a, b, reach, witnessDir };
}

async function apart(c: Cluster): Promise<void> {
  c.a.resource.standAlone = true;
  c.b.resource.standAlone = true;
  c.a.connector.kick('test: partition');
  await until('apart', () => !c.a.resource.peer && !c.b.resource.peer);
}

function heal(c: Cluster): void {
  c.a.resource.standAlone = false;
  c.b.resource.standAlone = false;
}

/** Settles to 'ok', 'error: ...' or 'pending' (still held after `ms`). */
async function outcome(p: Promise<unknown> | void, ms = 300): Promise<string> {
  return Promise.race([
    Promise.resolve(p).then(
      () => 'ok',
      (err: unknown) => `error: ${(err as Error).message}`,
    ),
    new Promise<string>((r) => setTimeout(() => r('pending'), ms)),
  ]);
}

/** Unhandled rejections during a test: each one would end a node daemon. */
const unhandled: unknown[] = [];
process.on('unhandledRejection', (err) => unhandled.push(err));

async function done(c: Cluster): Promise<void> {
  assert.deepEqual(unhandled.splice(0).map((e) => (e as Error).message), [], 'no unhandled rejection');
  await stopNode(c.a);
  await stopNode(c.b);
  fs.rmSync(c.witnessDir, { recursive: true, force: true });
}

test('no peer and no witness: the first write and every later one are held, reads go on; the witness back releases them all', async () => {
  const c = await cluster();
  try {
    await apart(c);
    c.reach.alpha = false;
    const first = Promise.resolve(c.a.resource.write(0, Buffer.alloc(4096, 1)));
    assert.equal(await outcome(first), 'pending');
    assert.equal(c.a.resource.suspended, true);
    // Suspended now: a new write is held too (it failed with EIO before).
    const second = Promise.resolve(c.a.resource.write(MiB, Buffer.alloc(4096, 2)));
    assert.equal(await outcome(second), 'pending');
    const got = Buffer.alloc(4096);
    await c.a.resource.read(8 * MiB, got);
    c.reach.alpha = true;
    assert.equal(await outcome(first, 5000), 'ok');
    assert.equal(await outcome(second, 5000), 'ok');
    assert.equal(c.a.resource.suspended, false);
    assert.notEqual(c.a.resource.record.gi.bitmap, '0', 'a new generation, the peer outdated at the witness');
    await c.a.resource.write(2 * MiB, Buffer.alloc(4096, 3));
  } finally {
    await done(c);
  }
});

test('a cut-off Primary learns from the witness that its peer went on: its held writes fail at once; forced Secondary, it resyncs from the new Primary by itself, no split brain', async () => {
  const c = await cluster();
  try {
    await apart(c);
    c.reach.alpha = false;
    const held = Promise.resolve(c.a.resource.write(0, Buffer.alloc(64 * 1024, 0xaa)));
    assert.equal(await outcome(held), 'pending');
    // bravo, which still reaches the witness, is promoted and writes: it outdates alpha there.
    await c.b.resource.promote(false);
    await c.b.resource.write(0, Buffer.alloc(4096, 0xbb));
    await c.b.resource.flush();
    // alpha reaches the witness again: it is the outdated one.
    c.reach.alpha = true;
    const failed = await outcome(held, 5000);
    assert.match(failed, /^error: .*went on without alpha/);
    assert.throws(() => c.a.resource.write(MiB, Buffer.alloc(4096, 1)), /went on without alpha/);
    assert.ok(c.a.resource.fencedOff);
    // A flush fails too: it would promise the application durability for writes acknowledged here (protocol A,
    // before the fence was known) that the resync from the new Primary is about to overwrite (sim seed 6444).
    await assert.rejects(c.a.resource.flush(), /went on without alpha/);
    await c.a.resource.demote(true);
    heal(c);
    await until('alpha resynced from bravo', () => upToDate(c.a, c.b) && c.a.resource.bitmap.count === 0 && c.b.resource.bitmap.count === 0, 15_000);
    assert.equal(c.a.resource.splitBrain, null);
    assert.equal(c.b.resource.splitBrain, null);
    assert.ok((await readAll(c.a.disk, c.a.resource.size)).equals(await readAll(c.b.disk, c.b.resource.size)));
    const first = Buffer.alloc(8192);
    await c.a.disk.read(0, first);
    assert.ok(first.subarray(0, 4096).equals(Buffer.alloc(4096, 0xbb)), "bravo's acknowledged write");
    assert.ok(first.subarray(4096).equals(Buffer.alloc(4096)), "alpha's never-acknowledged write is gone");
  } finally {
    await done(c);
  }
});

test('a cut-off Primary learns from its peer (the link heals first) that the peer went on: held writes fail at once; demote(force) and it resyncs', async () => {
  const c = await cluster();
  try {
    await apart(c);
    c.reach.alpha = false;
    const held = Promise.resolve(c.a.resource.write(0, Buffer.alloc(4096, 0xaa)));
    assert.equal(await outcome(held), 'pending');
    await c.b.resource.promote(false);
    await c.b.resource.write(4096, Buffer.alloc(4096, 0xbb));
    heal(c);
    assert.match(await outcome(held, 5000), /^error: .*went on without alpha/);
    await until('refused: both Primary', () => /both nodes are Primary/.test(c.a.resource.lastRefusal ?? ''));
    await c.a.resource.demote(true);
    await until('alpha resynced from bravo', () => upToDate(c.a, c.b) && c.a.resource.bitmap.count === 0 && c.b.resource.bitmap.count === 0, 15_000);
    assert.equal(c.a.resource.splitBrain, null);
    assert.ok((await readAll(c.a.disk, c.a.resource.size)).equals(await readAll(c.b.disk, c.b.resource.size)));
  } finally {
    await done(c);
  }
});

test('a promotion waiting for the witness fails if the disk changed meanwhile: it is not completed on a disk that is no longer the one it was asked for (sim seed 7524)', async () => {
  const c = await cluster();
  try {
    await c.a.resource.demote();
    await apart(c);
    c.reach.bravo = false;
    // Forced (neither peer nor witness answers): it waits for the witness to fence alpha.
    const promoting = c.b.resource.promote(true);
    assert.equal(await outcome(promoting), 'pending');
    // bravo's disk fails while the promotion waits (in seed 7524 it became Inconsistent: an aborted resync).
    c.b.resource.detach(new Error('test: the disk failed'));
    assert.equal(c.b.resource.disk, 'Diskless');
    c.reach.bravo = true;
    assert.match(await outcome(promoting, 5000), /^error: .*became Diskless meanwhile/);
    assert.equal(c.b.resource.role, 'Secondary');
  } finally {
    await done(c);
  }
});

test('promote --force with neither peer nor witness does not wait for the witness for good: it goes on unfenced and says so', async () => {
  const c = await cluster();
  try {
    await c.a.resource.demote();
    await apart(c);
    c.reach.bravo = false;
    const promoting = c.b.resource.promote(true);
    assert.equal(await outcome(promoting, FORCED_FENCE_WAIT_MS / 2), 'pending', 'the witness is asked first');
    assert.equal(await outcome(promoting, FORCED_FENCE_WAIT_MS + 3000), 'ok');
    assert.equal(c.b.resource.role, 'Primary');
    // Its writes do not wait for the witness either: the admin's word stands for the fence.
    assert.equal(await outcome(Promise.resolve(c.b.resource.write(0, Buffer.alloc(4096, 5))), 2000), 'ok');
    c.reach.bravo = true;
  } finally {
    await done(c);
  }
});

test('demote(force) ends held writes with EIO at once; a plain demotion would wait for them', async () => {
  const c = await cluster();
  try {
    await apart(c);
    c.reach.alpha = false;
    const held = Promise.resolve(c.a.resource.write(0, Buffer.alloc(4096, 7)));
    assert.equal(await outcome(held), 'pending');
    assert.equal(c.a.resource.holding, true);
    const demoted = c.a.resource.demote(true);
    assert.match(await outcome(held, 2000), /^error: .*made Secondary by force/);
    assert.equal(await outcome(demoted, 5000), 'ok');
    assert.equal(c.a.resource.role, 'Secondary');
    // Fenced off until it has the new Primary's data (or is promoted again): a write still in flight fails.
    assert.ok(c.a.resource.fencedOff);
  } finally {
    await done(c);
  }
});

test('no witness, then the peer comes back as Secondary: the held write completes once the peer has it, with no new generation', async () => {
  const c = await cluster();
  try {
    await apart(c);
    c.reach.alpha = false;
    const before = c.a.resource.record.gi.current;
    const held = Promise.resolve(c.a.resource.write(0, Buffer.alloc(4096, 0x5c)));
    assert.equal(await outcome(held), 'pending');
    heal(c);
    assert.equal(await outcome(held, 10_000), 'ok');
    const onBravo = Buffer.alloc(4096);
    await c.b.disk.read(0, onBravo);
    assert.ok(onBravo.equals(Buffer.alloc(4096, 0x5c)), 'bravo has the write before it is acknowledged');
    assert.equal(c.a.resource.record.gi.current, before);
    assert.equal(c.a.resource.suspended, false);
  } finally {
    await done(c);
  }
});

test('a write in flight when the partition hits, bravo promoted, the partition heals: the write fails, nothing is left unhandled (a daemon would exit)', async () => {
  const c = await cluster();
  try {
    await c.a.resource.write(0, Buffer.alloc(4096, 6));
    c.reach.alpha = false;
    const inFlight = Promise.resolve(c.a.resource.write(0, Buffer.alloc(64 * 1024, 7)));
    await apart(c);
    assert.equal(await outcome(inFlight), 'pending');
    await c.b.resource.promote(false);
    c.reach.alpha = true;
    assert.match(await outcome(inFlight, 5000), /^error: .*went on without alpha/);
    await new Promise((r) => setTimeout(r, 200));
  } finally {
    await done(c);
  }
});

test('a forced promotion fences the peer at the witness before its first write alone: the other node is not promoted without --force', async () => {
  const c = await cluster();
  try {
    await apart(c);
    await c.a.resource.write(0, Buffer.alloc(4096, 1)); // alpha diverges: bravo outdated at the witness
    await c.a.resource.demote();
    await c.b.resource.promote(true); // the operator takes bravo's older copy
    await c.b.resource.write(4096, Buffer.alloc(4096, 2));
    await assert.rejects(c.a.resource.promote(false), /Outdated/);
  } finally {
    await done(c);
  }
});

test('a node that kept the data when its peer lost its disk fences the peer before its first write alone', async () => {
  const c = await cluster();
  try {
    await c.a.resource.peerLostDisk('bravo', c.b.resource.record.gi, new AbortController().signal);
    await apart(c);
    await c.a.resource.write(0, Buffer.alloc(4096, 0xa));
    await assert.rejects(c.b.resource.promote(false), /Outdated/);
  } finally {
    await done(c);
  }
});

test('the peer loses its disk while the witness is out of reach: no generation of its own here (nor the peer\'s writes) until the failed disk is outdated there; a link that goes down ends the wait', async () => {
  const c = await cluster();
  try {
    // (Apart: a peer that replicates would count as back, and the fence as not needed.)
    await apart(c);
    c.reach.alpha = false;
    const before = c.a.resource.record.gi.current;
    const link = new AbortController();
    const abandoned = c.a.resource.peerLostDisk('bravo', c.b.resource.record.gi, link.signal);
    assert.equal(await outcome(abandoned), 'pending');
    link.abort(new Error('the link went down'));
    assert.match(await outcome(abandoned, 3000), /^error: .*not outdated at the witness/);
    // Remembered at once (the disk gets a full sync when it is back), but no generation of its own.
    assert.equal(c.a.resource.record.peerDiskFailed, true);
    assert.equal(c.a.resource.record.gi.current, before);
    const recording = c.a.resource.peerLostDisk('bravo', c.b.resource.record.gi, new AbortController().signal);
    assert.equal(await outcome(recording), 'pending');
    assert.equal(c.a.resource.record.gi.current, before);
    c.reach.alpha = true;
    assert.equal(await outcome(recording, 5000), 'ok');
    assert.notEqual(c.a.resource.record.gi.current, before);
    await assert.rejects(c.b.resource.promote(false), /Outdated/);
  } finally {
    await done(c);
  }
});

test('secondary --force with a write still on its way to the disk: the write fails and the demotion does not hang', async () => {
  const c = await cluster();
  try {
    await apart(c);
    c.reach.alpha = false;
    const held = Promise.resolve(c.a.resource.write(0, Buffer.alloc(4096, 1)));
    assert.equal(await outcome(held), 'pending');
    // A slow disk: the next write's local I/O is still running when the admin forces the demotion.
    const disk = c.a.disk as unknown as { write: (o: number, d: Buffer, opt?: unknown) => unknown };
    const original = disk.write.bind(c.a.disk);
    disk.write = (o, d, opt) => (o < c.a.resource.size ? new Promise((r) => setTimeout(() => r(original(o, d, opt)), 300)) : original(o, d, opt));
    const slow = outcome(c.a.resource.write(8192, Buffer.alloc(4096, 2)), 5000);
    const heldEnd = outcome(held, 5000);
    await new Promise((r) => setTimeout(r, 50));
    c.a.resource.fenceOff('made Secondary by force');
    // The daemon's order: close the pool (a flush), then demote.
    assert.match(await outcome(c.a.resource.flush(), 3000), /^(ok|error: )/);
    assert.equal(await outcome(c.a.resource.demote(true), 3000), 'ok');
    assert.match(await heldEnd, /^error/);
    assert.match(await slow, /^error/, 'a write that exists only on the fenced-off node is never acknowledged');
    disk.write = original;
  } finally {
    await done(c);
  }
});

test('a fence that was not needed is cancelled at the witness even when the witness answers only after a few tries', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-cancel-'));
  try {
    const witness = new Witness(path.join(dir, 'witness.json'), ['alpha', 'bravo'], silentLogger());
    const G0 = '00000000000000a0';
    const G1 = '00000000000000b1';
    witness.handle({ cmd: 'witness.outdate', node: 'alpha', resource: 'r0', peer: 'bravo', current: G0, until: G1 });
    assert.equal(witness.handle({ cmd: 'witness.query', node: 'bravo', resource: 'r0', current: G0 }).outdated, true);
    let unreachable = 3;
    const calls: string[] = [];
    const quorum = new Quorum({
      node: 'alpha',
      log: silentLogger(),
      call: async (c) => {
        calls.push(c.cmd);
        if (unreachable-- > 0) throw new UserError('the witness did not answer within 1000 ms');
        return witness.handle({ ...c, node: 'alpha' });
      },
      sleep: async () => undefined,
    });
    await quorum.cancelFence({ name: 'r0' } as Resource, 'bravo', { from: G0, to: G1 });
    assert.deepEqual(calls, ['witness.cancel', 'witness.cancel', 'witness.cancel', 'witness.cancel']);
    assert.equal(witness.handle({ cmd: 'witness.query', node: 'bravo', resource: 'r0', current: G0 }).outdated, false);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
