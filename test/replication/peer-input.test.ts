/**
 * Peer input is bounded: every field of every frame from an authenticated
 * peer is checked before it is used. A frame that breaks a rule is a
 * protocol error: the node logs it (naming the peer and the frame), drops
 * that link and serves on; nothing of it reaches the disk, least of all the
 * activity log, bitmap and metadata record after the data area.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import * as W from '../../src/replication/wire.js';
import { encodeFrame } from '../../src/replication/link-auth.js';
import { newGi, NO_GI } from '../../src/replication/meta.js';
import { BLOCK } from '../../src/replication/bitmap.js';
import { pattern } from '../blockdev/conformance.js';
import { until } from './pair.js';
import { bounded, connectToPrimary, dataArea, droppedFor, establish, metaArea, Mode, RawPeer, serveFrames, settledFlag, startTarget, stateOf, stopTarget, Target, u32, u64, verifyDigests } from './raw-peer.js';

const uncaught: unknown[] = [];
const onUncaught = (err: unknown): void => void uncaught.push(err);
process.on('uncaughtException', onUncaught);
process.on('unhandledRejection', onUncaught);

interface Case {
  name: string;
  mode: Mode | 'link';
  /** The frame the node must name (undefined: a broken frame header, the link's own check). */
  frame?: string;
  send: (t: Target, p: RawPeer) => void;
}

const write = (seq: number | bigint, offset: number | bigint, flags: number, length: number, data?: Buffer): Buffer =>
  Buffer.concat([u64(seq), u64(offset), u32(flags), u32(length), ...(data ? [data] : [])]);
const range = (offset: number | bigint, length: number, ...rest: Buffer[]): Buffer => Buffer.concat([u64(offset), u32(length), ...rest]);
const seqFrame = (seq: number, status = 0): Buffer => Buffer.concat([u64(seq), u32(status)]);
const runs = (list: [number, number][]): Buffer => Buffer.concat(list.flatMap(([o, l]) => [u64(o), u64(l)]));

const layout = (t: Target) => t.node.resource.layout;

const cases: Case[] = [
  // -------------------------------------------------------------- WRITE
  { name: 'a write into the activity log', mode: 'connected', frame: 'WRITE', send: (t, p) => p.send(W.F_WRITE, write(1, layout(t).alOffset, 0, 4096, Buffer.alloc(4096, 0xee))) },
  { name: 'a write across the end of the data area', mode: 'connected', frame: 'WRITE', send: (t, p) => p.send(W.F_WRITE, write(1, layout(t).dataBytes - 2048, 0, 4096, Buffer.alloc(4096, 0xee))) },
  { name: 'a zeroing over the bitmap and the record', mode: 'connected', frame: 'WRITE', send: (t, p) => p.send(W.F_WRITE, write(1, layout(t).bitmapOffset, W.WF_ZERO, layout(t).deviceBytes - layout(t).bitmapOffset)) },
  { name: 'a zeroing of 4 GiB', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, write(1, 0, W.WF_ZERO, 0xffffffff)) },
  { name: 'a trim of no bytes', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, write(1, 0, W.WF_ZERO | W.WF_TRIM, 0)) },
  { name: 'a trim without the zero flag', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, write(1, 0, W.WF_TRIM, 4096)) },
  { name: 'a write with an unknown flag', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, write(1, 0, 0x80, 4096, Buffer.alloc(4096))) },
  { name: 'a zeroing that carries data', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, write(1, 0, W.WF_ZERO, 4096, Buffer.alloc(4096))) },
  { name: 'a write with fewer bytes than its length', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, write(1, 0, 0, 4096, Buffer.alloc(100))) },
  { name: 'a write header cut short', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, Buffer.alloc(10)) },
  { name: 'a write at an offset past 2^53', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, write(1, 2n ** 64n - 4096n, 0, 4096, Buffer.alloc(4096))) },
  { name: 'a write with a sequence number past 2^53', mode: 'connected', frame: 'WRITE', send: (_t, p) => p.send(W.F_WRITE, write(2n ** 60n, 0, 0, 4096, Buffer.alloc(4096))) },
  // --------------------------------------------------- acks and flushes
  { name: 'an ack of a write never sent', mode: 'connected', frame: 'ACK_WRITE', send: (_t, p) => p.send(W.F_ACK_WRITE, seqFrame(77)) },
  { name: 'a receive ack cut short', mode: 'connected', frame: 'ACK_RECV', send: (_t, p) => p.send(W.F_ACK_RECV, Buffer.alloc(11)) },
  { name: 'a flush ack of a flush never sent', mode: 'connected', frame: 'FLUSH_ACK', send: (_t, p) => p.send(W.F_FLUSH_ACK, seqFrame(3)) },
  { name: 'a flush with trailing bytes', mode: 'connected', frame: 'FLUSH', send: (_t, p) => p.send(W.F_FLUSH, Buffer.concat([seqFrame(1), Buffer.alloc(1)])) },
  // ---------------------------------------------------------------- READ
  { name: 'a read of the metadata record', mode: 'connected', frame: 'READ', send: (t, p) => p.send(W.F_READ, Buffer.concat([u64(1), u64(layout(t).recordOffset), u32(4096)])) },
  { name: 'a read of no bytes', mode: 'connected', frame: 'READ', send: (_t, p) => p.send(W.F_READ, Buffer.concat([u64(1), u64(0), u32(0)])) },
  { name: 'a read request cut short', mode: 'connected', frame: 'READ', send: (_t, p) => p.send(W.F_READ, Buffer.alloc(19)) },
  { name: 'a read of more than a frame carries', mode: 'connected', frame: 'READ', send: (_t, p) => p.send(W.F_READ, Buffer.concat([u64(1), u64(0), u32(1024 * 1024 + 1)])) },
  { name: 'a read reply nobody asked for', mode: 'connected', frame: 'READ_REPLY', send: (_t, p) => p.send(W.F_READ_REPLY, Buffer.concat([seqFrame(5), Buffer.alloc(4096)])) },
  // ------------------------------------------------ resync outside a resync
  { name: 'resync data outside a resync', mode: 'connected', frame: 'RS_DATA', send: (_t, p) => p.send(W.F_RS_DATA, range(0, 4096, u32(0), Buffer.alloc(4096))) },
  { name: 'a resync ack to a node that is not the sync source', mode: 'connected', frame: 'RS_ACK', send: (_t, p) => p.send(W.F_RS_ACK, range(0, 4096)) },
  { name: 'a checksum answer to a node that sent none', mode: 'connected', frame: 'RS_CSUM_REPLY', send: (t, p) => p.send(W.F_RS_CSUM_REPLY, range(layout(t).alOffset, 4096, Buffer.from([0]))) },
  { name: 'resync done outside a resync', mode: 'connected', frame: 'RS_DONE', send: (t, p) => p.send(W.F_RS_DONE, W.encodeJson({ gi: t.node.resource.record.gi })) },
  // -------------------------------------------------------------- VERIFY
  { name: 'a verify of the bitmap area', mode: 'connected', frame: 'VERIFY', send: (t, p) => p.send(W.F_VERIFY, range(layout(t).bitmapOffset, 4096, Buffer.alloc(16))) },
  { name: 'a verify of no bytes', mode: 'connected', frame: 'VERIFY', send: (_t, p) => p.send(W.F_VERIFY, range(0, 0)) },
  { name: 'a verify larger than a verify piece', mode: 'connected', frame: 'VERIFY', send: (_t, p) => p.send(W.F_VERIFY, range(0, 512 * 1024, Buffer.alloc(128 * 16))) },
  { name: 'a verify with too few digests', mode: 'connected', frame: 'VERIFY', send: (_t, p) => p.send(W.F_VERIFY, range(0, 8192, Buffer.alloc(16))) },
  { name: 'a verify answer nobody asked for', mode: 'connected', frame: 'VERIFY_REPLY', send: (_t, p) => p.send(W.F_VERIFY_REPLY, range(0, 4096, Buffer.alloc(8))) },
  { name: 'a verify ask that is not a verify piece', mode: 'connected', frame: 'VERIFY_ASK', send: (_t, p) => p.send(W.F_VERIFY_ASK, range(4096, 4096)) },
  { name: 'a verify ask carrying bytes', mode: 'connected', frame: 'VERIFY_ASK', send: (_t, p) => p.send(W.F_VERIFY_ASK, range(0, W.VERIFY_PIECE, Buffer.alloc(1))) },
  { name: 'a verify ask past the data area', mode: 'connected', frame: 'VERIFY_ASK', send: (t, p) => p.send(W.F_VERIFY_ASK, range(layout(t).bitmapOffset, W.VERIFY_PIECE)) },
  { name: 'a verify no-verdict that is not a verify piece', mode: 'connected', frame: 'VERIFY_NO_VERDICT', send: (_t, p) => p.send(W.F_VERIFY_NO_VERDICT, range(0, 4096, Buffer.from([0]))) },
  { name: 'a verify no-verdict without its reason', mode: 'connected', frame: 'VERIFY_NO_VERDICT', send: (_t, p) => p.send(W.F_VERIFY_NO_VERDICT, range(0, W.VERIFY_PIECE)) },
  { name: 'a verify no-verdict with an unknown reason', mode: 'connected', frame: 'VERIFY_NO_VERDICT', send: (_t, p) => p.send(W.F_VERIFY_NO_VERDICT, range(0, W.VERIFY_PIECE, Buffer.from([9]))) },
  {
    name: 'verify asks without end, never answered',
    mode: 'connected',
    frame: 'VERIFY_ASK',
    send: (_t, p) => {
      for (let i = 0; i < 200; i++) p.send(W.F_VERIFY_ASK, range(0, W.VERIFY_PIECE));
    },
  },
  // --------------------------------------------------------------- STATE
  { name: 'a state that is not JSON', mode: 'connected', frame: 'STATE', send: (_t, p) => p.send(W.F_STATE, Buffer.from('{"node":')) },
  { name: 'a state with an unknown role', mode: 'connected', frame: 'STATE', send: (t, p) => p.send(W.F_STATE, stateOf(t, { role: 'Boss' })) },
  { name: 'a state with a malformed generation', mode: 'connected', frame: 'STATE', send: (t, p) => p.send(W.F_STATE, stateOf(t, { gi: { current: 'zz', bitmap: NO_GI, history: [NO_GI] } })) },
  { name: 'a state with a negative size', mode: 'connected', frame: 'STATE', send: (t, p) => p.send(W.F_STATE, stateOf(t, { dataBytes: -1 })) },
  { name: 'a state naming another node', mode: 'connected', frame: 'STATE', send: (t, p) => p.send(W.F_STATE, stateOf(t, { node: 'mallory' })) },
  { name: 'a state of 64 KiB', mode: 'connected', frame: 'STATE', send: (t, p) => p.send(W.F_STATE, stateOf(t, { keep: 'x'.repeat(64 * 1024) })) },
  { name: 'a handshake state with no generation', mode: 'handshake', frame: 'STATE', send: (t, p) => p.send(W.F_STATE, stateOf(t, { gi: undefined })) },
  // -------------------------------------------------------------- BITMAP
  { name: 'bitmap runs after the bitmap was done', mode: 'connected', frame: 'BITMAP', send: (_t, p) => p.send(W.F_BITMAP, runs([[0, 4096]])) },
  { name: 'a second bitmap done', mode: 'connected', frame: 'BITMAP_DONE', send: (_t, p) => p.send(W.F_BITMAP_DONE) },
  { name: 'a bitmap done with a payload', mode: 'handshake', frame: 'BITMAP_DONE', send: (_t, p) => p.send(W.F_BITMAP_DONE, Buffer.alloc(4)) },
  { name: 'a bitmap run past the data area', mode: 'handshake', frame: 'BITMAP', send: (t, p) => p.send(W.F_BITMAP, runs([[layout(t).dataBytes, 4096]])) },
  { name: 'a bitmap run of 2^64 bytes', mode: 'handshake', frame: 'BITMAP', send: (_t, p) => p.send(W.F_BITMAP, Buffer.concat([u64(0), u64(2n ** 64n - 1n)])) },
  { name: 'a bitmap run not on a block boundary', mode: 'handshake', frame: 'BITMAP', send: (_t, p) => p.send(W.F_BITMAP, runs([[100, 4096]])) },
  { name: 'a bitmap run of no bytes', mode: 'handshake', frame: 'BITMAP', send: (_t, p) => p.send(W.F_BITMAP, runs([[4096, 0]])) },
  { name: 'bitmap runs out of order', mode: 'handshake', frame: 'BITMAP', send: (_t, p) => p.send(W.F_BITMAP, runs([[8192, 4096], [0, 4096]])) },
  {
    name: 'bitmap runs out of order across frames',
    mode: 'handshake',
    frame: 'BITMAP',
    send: (_t, p) => {
      p.send(W.F_BITMAP, runs([[65536, 4096]]));
      p.send(W.F_BITMAP, runs([[0, 4096]]));
    },
  },
  { name: 'more bitmap runs in a frame than a frame may hold', mode: 'handshake', frame: 'BITMAP', send: (_t, p) => p.send(W.F_BITMAP, runs(Array.from({ length: 4097 }, (_, i): [number, number] => [i * 8192, 4096]))) },
  { name: 'a bitmap frame of partial runs', mode: 'handshake', frame: 'BITMAP', send: (_t, p) => p.send(W.F_BITMAP, Buffer.alloc(20)) },
  // ------------------------------------------------------- OUTDATE, REFUSE
  { name: 'an outdate with a payload', mode: 'connected', frame: 'OUTDATE', send: (_t, p) => p.send(W.F_OUTDATE, Buffer.from('x')) },
  { name: 'a promotion request with a payload', mode: 'connected', frame: 'PROMOTE', send: (_t, p) => p.send(W.F_PROMOTE, Buffer.from('x')) },
  { name: 'an answer to a promotion nobody asked for', mode: 'connected', frame: 'PROMOTE_REPLY', send: (_t, p) => p.send(W.F_PROMOTE_REPLY, W.encodeJson({ granted: true })) },
  { name: 'a refusal without a reason', mode: 'connected', frame: 'REFUSE', send: (_t, p) => p.send(W.F_REFUSE, W.encodeJson({ reason: 5 })) },
  { name: 'a frame of an unknown type', mode: 'connected', frame: 'type 99', send: (_t, p) => p.send(99, Buffer.alloc(8)) },
  // --------------------------------------------------- resync target side
  { name: 'resync data into the activity log', mode: 'target', frame: 'RS_DATA', send: (t, p) => p.send(W.F_RS_DATA, range(layout(t).alOffset, 4096, u32(0), Buffer.alloc(4096, 0xee))) },
  { name: 'resync zeroing over the record', mode: 'target', frame: 'RS_DATA', send: (t, p) => p.send(W.F_RS_DATA, range(layout(t).recordOffset, 8192, u32(W.WF_ZERO))) },
  { name: 'resync data with fewer bytes than its length', mode: 'target', frame: 'RS_DATA', send: (_t, p) => p.send(W.F_RS_DATA, range(0, 8192, u32(0), Buffer.alloc(4096, 0xee))) },
  { name: 'resync data without its flags', mode: 'target', frame: 'RS_DATA', send: (_t, p) => p.send(W.F_RS_DATA, range(0, 4096, Buffer.alloc(2))) },
  { name: 'resync data with a flag it cannot carry', mode: 'target', frame: 'RS_DATA', send: (_t, p) => p.send(W.F_RS_DATA, range(0, 4096, u32(W.WF_TRIM), Buffer.alloc(4096, 0xee))) },
  { name: 'resync data of no bytes', mode: 'target', frame: 'RS_DATA', send: (_t, p) => p.send(W.F_RS_DATA, range(4096, 0, u32(0))) },
  { name: 'a resync checksum with a short digest', mode: 'target', frame: 'RS_CSUM', send: (_t, p) => p.send(W.F_RS_CSUM, range(0, 4096, Buffer.alloc(31))) },
  { name: 'a resync checksum of 2 GiB', mode: 'target', frame: 'RS_CSUM', send: (_t, p) => p.send(W.F_RS_CSUM, range(0, 0x7fffffff, Buffer.alloc(32))) },
  { name: 'resync done with a malformed generation', mode: 'target', frame: 'RS_DONE', send: (_t, p) => p.send(W.F_RS_DONE, W.encodeJson({ gi: { current: 'DROP TABLE', bitmap: 1 } })) },
  { name: 'resync done that is not JSON', mode: 'target', frame: 'RS_DONE', send: (_t, p) => p.send(W.F_RS_DONE, Buffer.from([0xff, 0x00])) },
  // ------------------------------------------------------ broken framing
  { name: 'bytes that are no frame', mode: 'link', send: (_t, p) => p.sendRaw(Buffer.from('GET / HTTP/1.1\r\n\r\n')) },
  {
    name: 'a frame header announcing 64 MiB',
    mode: 'link',
    send: (_t, p) => {
      const h = encodeFrame(W.F_WRITE, Buffer.alloc(0));
      h.writeUInt32BE(64 * 1024 * 1024, 8);
      p.sendRaw(h);
    },
  },
];

/** One node serves every case in turn (it must serve on after each); a case that breaks it gets a new one. */
let t0: Target | undefined;
async function target(): Promise<Target> {
  if (t0 && t0.node.resource.disk === 'Diskless') {
    await stopTarget(t0);
    t0 = undefined;
  }
  t0 ??= await startTarget();
  return t0;
}
after(async () => {
  if (t0) await stopTarget(t0);
  process.off('uncaughtException', onUncaught);
  process.off('unhandledRejection', onUncaught);
});

for (const c of cases) {
  test(`refused: ${c.name}`, async () => {
    const t = await target();
    const p = await RawPeer.connect(t);
    try {
      await establish(t, p, c.mode === 'link' ? 'connected' : c.mode);
      const meta = await metaArea(t);
      const data = await dataArea(t);
      const from = t.events.length;
      c.send(t, p);
      const e = await droppedFor(t, p, from);
      assert.equal(e.peer, 'alpha', 'the log names the peer');
      if (c.frame) assert.equal(e.frame, c.frame, 'the log names the frame');
      assert.notEqual(t.node.resource.disk, 'Diskless', 'the disk is still attached');
      assert.ok((await metaArea(t)).equals(meta), 'activity log, bitmap and record are untouched');
      assert.ok((await dataArea(t)).equals(data), 'the data area is untouched');
      assert.deepEqual(uncaught, []);
    } finally {
      p.close();
    }
  });
}

test('after all that, a valid peer connects, writes, reads back and flushes', async () => {
  const t = await target();
  const p = await RawPeer.connect(t);
  try {
    await establish(t, p, 'connected');
    const data = pattern(11, 8192);
    p.send(W.F_WRITE, write(1, 4096, 0, data.length, data));
    p.send(W.F_FLUSH, seqFrame(2));
    p.send(W.F_READ, Buffer.concat([u64(3), u64(4096), u32(8192)]));
    p.send(W.F_VERIFY, range(4096, 8192, verifyDigests(data)));
    assert.equal((await p.frame(W.F_ACK_WRITE)).readUInt32BE(8), 0);
    assert.equal((await p.frame(W.F_FLUSH_ACK)).readUInt32BE(8), 0);
    const reply = await p.frame(W.F_READ_REPLY);
    assert.equal(reply.readUInt32BE(8), 0);
    assert.ok(reply.subarray(12).equals(data));
    const v = await p.frame(W.F_VERIFY_REPLY);
    assert.ok(v.subarray(12).equals(Buffer.alloc(v.length - 12)), 'verify: same blocks');
    assert.ok(p.isUp);
  } finally {
    p.close();
  }
});

test('a short read reply is an error, not a partial read', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    r.detach(new Error('test: disk pulled'));
    const p = await RawPeer.connect(t);
    p.send(W.F_STATE, stateOf(t, { role: 'Secondary' }));
    p.send(W.F_BITMAP_DONE);
    await until('connected', () => r.peer?.phase === 'connected');
    await r.promote(false);
    const into = Buffer.alloc(8192, 0xaa);
    const from = t.events.length;
    const reading = Promise.resolve(r.read(0, into)).then(
      () => 'read',
      (err: Error) => err.message,
    );
    const ask = await p.frame(W.F_READ);
    p.send(W.F_READ_REPLY, Buffer.concat([ask.subarray(0, 8), u32(0), Buffer.alloc(100, 0x55)]));
    assert.match(await bounded(reading, 5000, 'the read'), /failed|no good copy/);
    const e = await droppedFor(t, p, from);
    assert.equal(e.frame, 'READ_REPLY');
  } finally {
    await stopTarget(t);
  }
});

test('a read reply longer than asked is an error', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    r.detach(new Error('test: disk pulled'));
    const p = await RawPeer.connect(t);
    p.send(W.F_STATE, stateOf(t, { role: 'Secondary' }));
    p.send(W.F_BITMAP_DONE);
    await until('connected', () => r.peer?.phase === 'connected');
    await r.promote(false);
    const from = t.events.length;
    const reading = Promise.resolve(r.read(0, Buffer.alloc(4096))).then(
      () => 'read',
      (err: Error) => err.message,
    );
    const ask = await p.frame(W.F_READ);
    p.send(W.F_READ_REPLY, Buffer.concat([ask.subarray(0, 8), u32(0), Buffer.alloc(8192, 0x55)]));
    assert.match(await bounded(reading, 5000, 'the read'), /failed|no good copy/);
    assert.equal((await droppedFor(t, p, from)).frame, 'READ_REPLY');
  } finally {
    await stopTarget(t);
  }
});

/** bravo with data in its first MiB, as sync source of a full sync to alpha (a new disk). */
async function syncSource(options = {}): Promise<{ t: Target; p: RawPeer }> {
  const t = await startTarget(options);
  const r = t.node.resource;
  await r.promote(false);
  await r.write(0, pattern(5, 1024 * 1024));
  await r.demote();
  const p = await RawPeer.connect(t);
  p.send(W.F_STATE, stateOf(t, { role: 'Secondary', disk: 'Inconsistent', gi: { current: NO_GI, bitmap: NO_GI, history: [NO_GI, NO_GI] } }));
  p.send(W.F_BITMAP_DONE);
  await until('sync source', () => r.peer?.phase === 'sync-source');
  return { t, p };
}

test('a second resync done is refused: the end of a resync is recorded once', async () => {
  const t = await startTarget();
  const p = await RawPeer.connect(t);
  try {
    await establish(t, p, 'target');
    const from = t.events.length;
    const done = W.encodeJson({ gi: t.node.resource.record.gi });
    p.send(W.F_RS_DONE, done);
    p.send(W.F_RS_DONE, done);
    const e = await droppedFor(t, p, from);
    assert.equal(e.frame, 'RS_DONE');
    assert.match(String(e.err), /a second resync done/);
  } finally {
    p.close();
    await stopTarget(t);
  }
});

test('a resync ack must match the piece sent: a longer one clears nothing', async () => {
  const { t, p } = await syncSource();
  const r = t.node.resource;
  try {
    const piece = await p.frame(W.F_RS_DATA);
    const offset = Number(piece.readBigUInt64BE(0));
    const from = t.events.length;
    p.send(W.F_RS_ACK, range(offset, r.size - offset));
    assert.equal((await droppedFor(t, p, from)).frame, 'RS_ACK');
    assert.equal(r.bitmap.count, r.bitmap.bits, 'every block is still to be synced');
  } finally {
    await stopTarget(t);
  }
});

test('a checksum answer for a range never asked about sends nothing from it', async () => {
  const { t, p } = await syncSource({ checksumResync: true });
  try {
    await p.frame(W.F_RS_CSUM);
    const from = t.events.length;
    const framesBefore = p.frames.length;
    p.send(W.F_RS_CSUM_REPLY, range(t.node.resource.layout.alOffset, 65536, Buffer.from([0])));
    assert.equal((await droppedFor(t, p, from)).frame, 'RS_CSUM_REPLY');
    const leaked = p.frames.slice(framesBefore).filter((f) => f.type === W.F_RS_DATA);
    assert.deepEqual(leaked.map((f) => Number(f.payload.readBigUInt64BE(0))), [], 'no resync data for the unasked range');
  } finally {
    await stopTarget(t);
  }
});

test('a verify answer of the wrong size fails the verify instead of passing it', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t);
    p.send(W.F_STATE, stateOf(t, { role: 'Secondary' }));
    p.send(W.F_BITMAP_DONE);
    await until('connected', () => r.peer?.phase === 'connected');
    const from = t.events.length;
    const verifying = r.peer!.runVerify().then(
      (v) => `passed with ${v.outOfSyncBytes} bytes out of sync`,
      (err: Error) => err.message,
    );
    const ask = await p.frame(W.F_VERIFY);
    p.send(W.F_VERIFY_REPLY, range(Number(ask.readBigUInt64BE(0)), ask.readUInt32BE(8), Buffer.alloc(2)));
    assert.match(await bounded(verifying, 5000, 'the verify'), /went down during verify/);
    assert.equal((await droppedFor(t, p, from)).frame, 'VERIFY_REPLY');
  } finally {
    await stopTarget(t);
  }
});

/**
 * A raw Primary answering the target's verify asks as they come, with what
 * `answer` says (digests, or a failed read), until `verifying` settles
 * (bounded); returns the offsets asked, in order.
 */
async function answerAsks(p: RawPeer, verifying: Promise<unknown>, answer: (offset: number, length: number) => Buffer | 'fail'): Promise<number[]> {
  const asked: number[] = [];
  await serveFrames(
    p,
    W.F_VERIFY_ASK,
    (f) => {
      const offset = Number(f.readBigUInt64BE(0));
      const length = f.readUInt32BE(8);
      asked.push(offset);
      const a = answer(offset, length);
      if (a === 'fail') p.send(W.F_VERIFY_NO_VERDICT, range(offset, length, Buffer.from([W.NO_VERDICT_UNREADABLE])));
      else p.send(W.F_VERIFY, range(offset, length, a));
    },
    settledFlag(verifying),
  );
  return asked;
}

test('a Secondary\'s verify asks its Primary for the digests and compares them; a block that differs is reported and marked', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t);
    await establish(t, p, 'connected');
    const mine = await dataArea(t);
    const theirs = Buffer.from(mine);
    theirs.fill(0x5a, 3 * W.VERIFY_PIECE + 8192, 3 * W.VERIFY_PIECE + 12288);
    const verifying = r.peer!.runVerify();
    const asked = await answerAsks(p, verifying, (offset, length) => verifyDigests(theirs.subarray(offset, offset + length)));
    const v = await bounded(verifying, 5000, 'the verify');
    assert.deepEqual(asked, Array.from({ length: Math.ceil(r.size / W.VERIFY_PIECE) }, (_, i) => i * W.VERIFY_PIECE));
    assert.deepEqual(v.ranges, [{ offset: 3 * W.VERIFY_PIECE + 8192, length: 4096 }]);
    assert.equal(v.outOfSyncBytes, 4096);
    assert.equal(r.bitmap.outOfSyncBytes, 4096);
    assert.equal(p.frames.filter((f) => f.type === W.F_VERIFY).length, 0, 'the Secondary sent no digests of its own');
    await until('each piece answered, so the Primary marks its side too', () => p.frames.filter((f) => f.type === W.F_VERIFY_REPLY).length === asked.length, 5000);
    assert.ok(p.isUp);
  } finally {
    await stopTarget(t);
  }
});

test('a Secondary\'s verify stops with a clear error when its Primary cannot read a piece', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t);
    await establish(t, p, 'connected');
    const mine = await dataArea(t);
    const verifying = r.peer!.runVerify().then(
      () => 'passed',
      (err: Error) => err.message,
    );
    await answerAsks(p, verifying, (offset, length) => (offset === 2 * W.VERIFY_PIECE ? 'fail' : verifyDigests(mine.subarray(offset, offset + length))));
    assert.match(await bounded(verifying, 5000, 'the verify'), /the disk of r0 on alpha could not be read during verify \(at 524288\)/);
    assert.equal(r.peer?.verify?.running, false);
    assert.ok(p.isUp, 'a failed piece is not a protocol error');
  } finally {
    await stopTarget(t);
  }
});

test('a Secondary facing a Primary of an older build (no verify-ask) sends its own digests, as before', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t, { features: [] });
    await establish(t, p, 'connected');
    const verifying = r.peer!.runVerify();
    let answered = 0;
    await serveFrames(
      p,
      W.F_VERIFY,
      (f) => {
        answered++;
        p.send(W.F_VERIFY_REPLY, range(Number(f.readBigUInt64BE(0)), f.readUInt32BE(8), Buffer.alloc(W.VERIFY_REPLY_BYTES)));
      },
      settledFlag(verifying),
    );
    const v = await bounded(verifying, 5000, 'the verify');
    assert.equal(v.outOfSyncBytes, 0);
    assert.equal(answered, Math.ceil(r.size / W.VERIFY_PIECE));
    assert.equal(p.frames.filter((f) => f.type === W.F_VERIFY_ASK).length, 0, 'no frame the older build does not know');
  } finally {
    await stopTarget(t);
  }
});

test('a Primary answers its peer\'s verify ask with its digests and marks what the peer found different', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const q = await connectToPrimary(t);
    q.send(W.F_VERIFY_ASK, range(W.VERIFY_PIECE, W.VERIFY_PIECE));
    const v = await q.frame(W.F_VERIFY);
    assert.equal(Number(v.readBigUInt64BE(0)), W.VERIFY_PIECE);
    const mine = await dataArea(t);
    assert.ok(v.subarray(12).equals(verifyDigests(mine.subarray(W.VERIFY_PIECE, 2 * W.VERIFY_PIECE))));
    const differs = Buffer.alloc(W.VERIFY_REPLY_BYTES);
    differs[0] = 0b10;
    q.send(W.F_VERIFY_REPLY, range(W.VERIFY_PIECE, W.VERIFY_PIECE, differs));
    await until('marked', () => r.bitmap.outOfSyncBytes === 4096, 5000);
    // The answer was taken: a second one for the same piece is not.
    const from = t.events.length;
    q.send(W.F_VERIFY_REPLY, range(W.VERIFY_PIECE, W.VERIFY_PIECE, differs));
    assert.equal((await droppedFor(t, q, from)).frame, 'VERIFY_REPLY');
  } finally {
    await stopTarget(t);
  }
});

test('a write from the peer that a real Primary sends is applied (the checks refuse nothing valid)', async () => {
  const t = await startTarget();
  const r = t.node.resource;
  try {
    const p = await RawPeer.connect(t);
    await establish(t, p, 'connected');
    const end = r.size;
    const last = pattern(3, 4096);
    p.send(W.F_WRITE, write(1, end - 4096, W.WF_FUA, 4096, last));
    p.send(W.F_WRITE, write(2, 0, W.WF_ZERO | W.WF_TRIM, end));
    p.send(W.F_WRITE, write(3, 8192, 0, 0, Buffer.alloc(0)));
    p.send(W.F_WRITE, write(4, end - 4096, 0, 4096, last));
    for (const seq of [1, 2, 3, 4]) assert.equal((await p.frame(W.F_ACK_WRITE, (b) => Number(b.readBigUInt64BE(0)) === seq)).readUInt32BE(8), 0);
    const got = Buffer.alloc(4096);
    await t.disk.read(end - 4096, got);
    assert.ok(got.equals(last));
    assert.ok(p.isUp);
    // A full bitmap: every block, in one run per frame of at most the cap, is accepted too.
    const q = await reconnectHandshake(t, p);
    const blocks = r.size / BLOCK;
    const list: [number, number][] = Array.from({ length: blocks / 2 }, (_, i) => [i * 2 * BLOCK, BLOCK]);
    for (let i = 0; i < list.length; i += 4096) q.send(W.F_BITMAP, runs(list.slice(i, i + 4096)));
    q.send(W.F_STATE, stateOf(t, { gi: { current: newGi(), bitmap: r.record.gi.current, history: [NO_GI, NO_GI] } }));
    q.send(W.F_BITMAP_DONE);
    await until('sync target with every other block marked', () => r.peer?.phase === 'sync-target' || !q.isUp);
    assert.ok(q.isUp);
    assert.equal(r.bitmap.count, blocks / 2);
    q.close();
  } finally {
    await stopTarget(t);
  }
});

async function reconnectHandshake(t: Target, p: RawPeer): Promise<RawPeer> {
  p.close();
  return RawPeer.connect(t);
}
