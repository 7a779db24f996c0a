/**
 * Online verify when things go wrong (found by two hostile reviews of the
 * verify started on the Secondary, VERIFY_ASK): a link that goes down with
 * pieces not yet compared is no "in sync"; a disk that fails on either side
 * is an error, not "every block out of sync"; a switchover mid-verify is no
 * verdict; a hostile peer can neither lift the cap on asks nor flood verify
 * pieces; a correct Primary that verifies at the same time cannot make the
 * Secondary drop the link; the list of ranges that differ is bounded.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import * as W from '../../src/replication/wire.js';
import { encodeFrame } from '../../src/replication/link-auth.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import { DelegatingDevice } from '../../src/blockdev/delegating.js';
import type { BlockDevice, MaybePromise } from '../../src/blockdev/types.js';
import { freePort, initialSync, newDisk, startNode, stopNode, until } from './pair.js';
import { bounded, connectToPrimary, dataArea, droppedFor, establish, LogEvent, RawPeer, serveFrames, settledFlag, startTarget, stateOf, stopTarget, Target, verifyDigests } from './raw-peer.js';

const PIECE = W.VERIFY_PIECE;
const range = (offset: number, length: number, ...rest: Buffer[]): Buffer => W.encodeRange(offset, length, ...rest);
const offsetOf = (p: Buffer): number => Number(p.readBigUInt64BE(0));
const lengthOf = (p: Buffer): number => p.readUInt32BE(8);

/** Resolves 'passed' or the error's message once `p` settles (so a test can wait for it bounded). */
function outcome(p: Promise<unknown>): Promise<string> {
  return p.then(
    () => 'passed',
    (err: Error) => `failed: ${err.message}`,
  );
}

test('a Secondary\'s verify whose link goes down before its last asks are answered does not report "in sync"', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t);
    await establish(t, p, 'connected');
    const mine = await dataArea(t);
    const last = (Math.ceil(r.size / PIECE) - 1) * PIECE;
    const verifying = outcome(r.peer!.runVerify());
    let lastAsked = false;
    // The Primary answers every piece but the last; once the last is asked, the link goes down.
    await serveFrames(
      p,
      W.F_VERIFY_ASK,
      (f) => {
        const offset = offsetOf(f);
        if (offset === last) lastAsked = true;
        else p.send(W.F_VERIFY, range(offset, lengthOf(f), verifyDigests(mine.subarray(offset, offset + lengthOf(f)))));
      },
      () => lastAsked,
    );
    p.close();
    const result = await bounded(verifying, 5000, 'the verify');
    assert.match(result, /^failed: .*went down/, `the verify ${result}, but the piece at ${last} was never compared`);
  } finally {
    await stopTarget(t);
  }
});

test('a verify sent to a peer of an older build whose link goes down before its last answers does not report "in sync"', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t, { features: [] });
    await establish(t, p, 'connected');
    const last = (Math.ceil(r.size / PIECE) - 1) * PIECE;
    const verifying = outcome(r.peer!.runVerify());
    let lastSent = false;
    await serveFrames(
      p,
      W.F_VERIFY,
      (f) => {
        const offset = offsetOf(f);
        if (offset === last) lastSent = true;
        else p.send(W.F_VERIFY_REPLY, range(offset, lengthOf(f), Buffer.alloc(W.VERIFY_REPLY_BYTES)));
      },
      () => lastSent,
    );
    p.close();
    const result = await bounded(verifying, 5000, 'the verify');
    assert.match(result, /^failed: .*went down/, `the verify ${result}, but the piece at ${last} was never compared`);
  } finally {
    await stopTarget(t);
  }
});

test('a Secondary whose own disk fails during its verify reports the failure, not every block out of sync', async () => {
  // As startTarget, on a disk that can fail.
  const events: LogEvent[] = [];
  const log = pino({ level: 'debug' }, { write: (s: string) => void events.push(JSON.parse(s) as LogEvent) });
  const port = await freePort();
  const inner = await newDisk(8 * 1024 * 1024, 'bravo');
  const faulty = new FaultyDevice(inner, { writeBack: false });
  const node = await startNode('bravo', faulty as BlockDevice, port, { log });
  await node.resource.promote(true);
  await node.resource.demote();
  const t: Target = { node, disk: inner, events, port };
  const r = node.resource;
  try {
    const p = await RawPeer.connect(t);
    await establish(t, p, 'connected');
    const theirs = await dataArea(t);
    const verifying = outcome(r.peer!.runVerify());
    // From its first comparison on, bravo's disk returns errors: it detaches and goes Diskless.
    faulty.failWith({ op: 'read' });
    const settled = settledFlag(verifying);
    await serveFrames(
      p,
      W.F_VERIFY_ASK,
      (f) => p.send(W.F_VERIFY, range(offsetOf(f), lengthOf(f), verifyDigests(theirs.subarray(offsetOf(f), offsetOf(f) + lengthOf(f))))),
      settled,
    );
    const result = await bounded(verifying, 5000, 'the verify');
    assert.equal(r.disk === 'UpToDate', false, 'the disk failed (the test made it)');
    assert.match(result, /^failed: /, `the verify ${result} with ${r.peer?.verify?.outOfSyncBytes} bytes "out of sync": bravo compared with a disk it no longer has`);
  } finally {
    await stopTarget(t);
  }
});

test('a peer cannot lift the cap on verify asks by answering each one before the Primary did', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    // bravo Primary, the raw alpha Secondary (as peer-input.test.ts does it).
    const q = await connectToPrimary(t);
    // 200 asks, each followed at once by a "reply" to it: every ask costs the Primary a 256 KiB read
    // under its write order, and the cap of 4*VERIFY_WINDOW outstanding asks never sees more than one.
    const pieces = Math.floor(r.size / PIECE);
    const frames: Buffer[] = [];
    for (let i = 0; i < 200; i++) {
      const offset = (i % pieces) * PIECE;
      frames.push(encodeFrame(W.F_VERIFY_ASK, range(offset, PIECE)), encodeFrame(W.F_VERIFY_REPLY, range(offset, PIECE, Buffer.alloc(W.VERIFY_REPLY_BYTES))));
    }
    const from = t.events.length;
    q.sendRaw(Buffer.concat(frames));
    const dropped = await droppedFor(t, q, from);
    assert.ok(dropped.frame === 'VERIFY_REPLY' || dropped.frame === 'VERIFY_ASK', `dropped for ${JSON.stringify(dropped)}`);
  } finally {
    await stopTarget(t);
  }
});

test('a Primary verifying at the same time, whose disk then fails, does not make the Secondary drop the link', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t);
    await establish(t, p, 'connected');
    const mine = await dataArea(t);
    const digestsAt = (offset: number, length: number): Buffer => verifyDigests(mine.subarray(offset, offset + length));
    const from = t.events.length;
    const verifying = outcome(r.peer!.runVerify());
    // alpha's own verify sends piece 0 (crossing bravo's ask for it) and gets bravo's answer; its disk
    // then fails, so the ask for piece 0, answered after, gets no verdict: VERIFY_NO_VERDICT, as onVerifyAsk sends it.
    const ask0 = await p.frame(W.F_VERIFY_ASK, (f) => offsetOf(f) === 0);
    p.send(W.F_VERIFY, range(0, lengthOf(ask0), digestsAt(0, lengthOf(ask0))));
    await p.frame(W.F_VERIFY_REPLY, (f) => offsetOf(f) === 0);
    p.send(W.F_VERIFY_NO_VERDICT, range(0, lengthOf(ask0), Buffer.from([W.NO_VERDICT_UNREADABLE])));
    // Every other piece alpha still answers (those it had read before the failure).
    const settled = settledFlag(verifying);
    await serveFrames(
      p,
      W.F_VERIFY_ASK,
      (f) => {
        if (offsetOf(f) !== 0) p.send(W.F_VERIFY, range(offsetOf(f), lengthOf(f), digestsAt(offsetOf(f), lengthOf(f))));
      },
      () => settled() || !p.isUp,
    );
    await bounded(verifying, 5000, 'the verify');
    const errors = t.events.slice(from).filter((e) => e.event === 'peer-protocol-error');
    assert.deepEqual(errors.map((e) => e.err), [], 'a correct Primary sent nothing wrong');
    assert.ok(p.isUp, 'the link (a Diskless Primary\'s only disk now) stays up');
  } finally {
    await stopTarget(t);
  }
});

test('a verify started on the Primary whose Secondary\'s disk fails reports the failure, not every block out of sync', async () => {
  const port = await freePort();
  const size = 8 * 1024 * 1024;
  const a = await startNode('alpha', await newDisk(size, 'alpha'), port);
  const faulty = new FaultyDevice(await newDisk(size, 'bravo'), { writeBack: false });
  const b = await startNode('bravo', faulty as BlockDevice, port);
  try {
    await initialSync(a, b);
    faulty.failWith({ op: 'read' });
    const result = await bounded(outcome(a.resource.peer!.runVerify()), 10_000, 'the verify');
    assert.match(result, /^failed: the disk of r0 on bravo could not be read during verify/);
    assert.equal(a.resource.bitmap.outOfSyncBytes, 0, 'nothing marked from a copy that was never read');
  } finally {
    await stopNode(a);
    await stopNode(b);
  }
});

/** Holds reads of [0, PIECE) while `on`: a disk slower than the link (or one that stalls for a while). */
class SlowFirstPiece extends DelegatingDevice {
  on = false;
  private held: (() => void)[] = [];
  override read(offset: number, into: Buffer): MaybePromise<void> {
    if (this.on && offset < PIECE) return new Promise<void>((go) => this.held.push(go)).then(() => this.inner.read(offset, into));
    return this.inner.read(offset, into);
  }
  release(): void {
    this.on = false;
    for (const go of this.held.splice(0)) go();
  }
}

test('a peer that sends verify pieces without waiting for the answers cannot make the node queue them without bound', async () => {
  // As startTarget (bravo Secondary, a raw alpha Primary), on a disk whose first piece reads slowly.
  const events: LogEvent[] = [];
  const log = pino({ level: 'debug' }, { write: (s: string) => void events.push(JSON.parse(s) as LogEvent) });
  const port = await freePort();
  const inner = await newDisk(8 * 1024 * 1024, 'bravo');
  const slow = new SlowFirstPiece(inner);
  const node = await startNode('bravo', slow as BlockDevice, port, { log });
  await node.resource.promote(true);
  await node.resource.demote();
  const t: Target = { node, disk: inner, events, port };
  const r = node.resource;
  try {
    const p = await RawPeer.connect(t);
    await establish(t, p, 'connected');
    slow.on = true;
    // A correct peer has at most VERIFY_WINDOW (16) of its own pieces and the 64 asks the cap allows in
    // flight. This one sends 1000 (1 MB on the wire); each is queued behind the ones before it in the
    // receive order, and RangeOrder makes each new one wait on all earlier overlapping ones (Promise.all
    // of every one before it): memory and CPU grow with the square (8000 such frames: 3.4 GB of heap).
    const digests = verifyDigests(Buffer.alloc(PIECE));
    const frames: Buffer[] = [];
    for (let i = 0; i < 1000; i++) frames.push(encodeFrame(W.F_VERIFY, range(0, PIECE, digests)));
    p.sendRaw(Buffer.concat(frames));
    const queued = (): number => (r.peer as unknown as { applying?: { size: number } } | undefined)?.applying?.size ?? 0;
    let most = 0;
    // Until the node drops the link (a protocol error, or it stopped reading and its pings went unanswered),
    // or has queued more than the receive side's own cap on writes (APPLY_MAX, 256); bounded.
    await until('the node to drop the link or queue the flood', () => {
      most = Math.max(most, queued());
      return !p.isUp || most > 256;
    }, 5000).catch(() => undefined);
    assert.ok(most <= 256, `${most} verify comparisons queued for a peer that never waited for an answer (the link ${p.isUp ? 'still up' : 'down'})`);
  } finally {
    slow.release();
    await stopTarget(t);
  }
});

test('a Secondary\'s verify across a switchover does not count a block written by the new Primary as different', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t);
    await establish(t, p, 'connected');
    const theirs = await dataArea(t);
    // bravo (Secondary) verifies: it asks alpha (Primary) for the digests of the first VERIFY_WINDOW pieces.
    const verifying = outcome(r.peer!.runVerify());
    await p.frame(W.F_VERIFY_ASK, (f) => offsetOf(f) === 0);
    // A switchover while the asks are on their way: alpha becomes Secondary, bravo Primary (the raw alpha
    // grants the promotion), and bravo writes a block of piece 0.
    p.send(W.F_STATE, stateOf(t, { role: 'Secondary', gi: r.record.gi }));
    await until('bravo sees alpha Secondary', () => r.peer?.state?.role === 'Secondary', 5000);
    await r.promote(false);
    const at = 8192;
    const block = Buffer.alloc(4096, 0x77);
    const written = r.write(at, block);
    // alpha takes the write (and any flush) as a real Secondary does.
    const w = await p.frame(W.F_WRITE);
    assert.equal(Number(w.readBigUInt64BE(8)), at);
    p.send(W.F_ACK_WRITE, W.encodeSeq(Number(w.readBigUInt64BE(0)), 0));
    await written;
    // A real alpha read piece 0 when its ask came, before bravo's write did (the ask was on the wire
    // first): its digests are of the data as it was, which the write changed only at `at`.
    const digestsOf = (offset: number, length: number): Buffer => verifyDigests(theirs.subarray(offset, offset + length));
    let settled = false;
    void verifying.then(() => (settled = true));
    let seen = 0;
    const deadline = Date.now() + 10_000;
    while (!settled && p.isUp && Date.now() < deadline) {
      const frames = p.frames.filter((f) => f.type === W.F_VERIFY_ASK || f.type === W.F_FLUSH);
      for (const f of frames.slice(seen)) {
        if (f.type === W.F_FLUSH) p.send(W.F_FLUSH_ACK, W.encodeSeq(Number(f.payload.readBigUInt64BE(0)), 0));
        else p.send(W.F_VERIFY, range(offsetOf(f.payload), lengthOf(f.payload), digestsOf(offsetOf(f.payload), lengthOf(f.payload))));
      }
      seen = frames.length;
      await new Promise((res) => setTimeout(res, 5));
    }
    const result = await bounded(verifying, 5000, 'the verify');
    const v = r.peer?.verify;
    // alpha applied (and acknowledged) the write: both copies are the same, before it and after it.
    assert.ok(result !== 'passed' || v?.outOfSyncBytes === 0, `the verify ${result} with ${JSON.stringify(v?.ranges)} out of sync: only the block bravo wrote after the switchover, compared with alpha's copy from before it`);
    assert.equal(r.bitmap.outOfSyncBytes, 0, 'a block both sides hold the same is marked for resync');
  } finally {
    await stopTarget(t);
  }
});

test('a verify whose peer reports every other block different keeps a bounded list of ranges', async () => {
  // 64 MiB: 16384 blocks. A peer (or a disk really that different) answering "every other block differs"
  // makes one range per block: 8192 here, 134 million for 1 TiB (gigabytes of objects, then all sent to
  // the CLI). The status shows 100 of them and the log 20.
  const t = await startTarget({}, 64 * 1024 * 1024);
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t, { features: [] });
    await establish(t, p, 'connected');
    const verifying = r.peer!.runVerify();
    let settled = false;
    void verifying.then(() => (settled = true), () => (settled = true));
    const differs = Buffer.alloc(W.VERIFY_REPLY_BYTES, 0x55);
    let seen = 0;
    const deadline = Date.now() + 20_000;
    while (!settled && p.isUp && Date.now() < deadline) {
      const frames = p.frames.filter((f) => f.type === W.F_VERIFY);
      for (const f of frames.slice(seen)) p.send(W.F_VERIFY_REPLY, range(offsetOf(f.payload), lengthOf(f.payload), differs));
      seen = frames.length;
      await new Promise((res) => setTimeout(res, 5));
    }
    const v = await bounded(verifying, 5000, 'the verify');
    assert.equal(v.outOfSyncBytes, r.size / 2);
    assert.ok(v.ranges.length <= 1000, `the verify holds ${v.ranges.length} ranges (one per differing block)`);
  } finally {
    await stopTarget(t);
  }
});
