/**
 * Online verify when things go wrong (found by a hostile review of the
 * verify started on the Secondary, VERIFY_ASK): a link that goes down with
 * pieces not yet compared is no "in sync"; a disk that fails on either side
 * is an error, not "every block out of sync"; a hostile peer cannot lift the
 * cap on asks by answering for the Primary; and a correct Primary that
 * verifies at the same time cannot make the Secondary drop the link.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import * as W from '../../src/replication/wire.js';
import { encodeFrame } from '../../src/replication/link-auth.js';
import { FaultyDevice } from '../../src/blockdev/faulty.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { freePort, initialSync, newDisk, startNode, stopNode, until } from './pair.js';
import { bounded, connectToPrimary, dataArea, droppedFor, establish, LogEvent, RawPeer, serveFrames, settledFlag, startTarget, stopTarget, Target, verifyDigests } from './raw-peer.js';

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
    // then fails, so the ask for piece 0, answered after, fails: VERIFY_ASK_FAILED, as onVerifyAsk sends it.
    const ask0 = await p.frame(W.F_VERIFY_ASK, (f) => offsetOf(f) === 0);
    p.send(W.F_VERIFY, range(0, lengthOf(ask0), digestsAt(0, lengthOf(ask0))));
    await p.frame(W.F_VERIFY_REPLY, (f) => offsetOf(f) === 0);
    p.send(W.F_VERIFY_UNREADABLE, range(0, lengthOf(ask0)));
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
