/**
 * The peer protocol's limits, one test per cap: the largest frame the
 * protocol allows decodes, one byte (or one item) more is a ProtocolError.
 * And what this node's encoders send, its decoders take.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import * as W from '../../src/replication/wire.js';
import { BLOCK } from '../../src/replication/bitmap.js';
import { newGi, NO_GI } from '../../src/replication/meta.js';
import { MAX_FRAME_PAYLOAD } from '../../src/replication/link.js';

const MiB = 1024 * 1024;
const DATA = 128 * MiB;

const refused = (fn: () => unknown, what: RegExp): void => assert.throws(fn, (err: Error) => err instanceof W.ProtocolError && what.test(err.message));
const write = (offset: number, flags: number, length: number, data?: Buffer): Buffer => Buffer.concat(W.encodeWrite(1, offset, flags, length, data));

test('cap MAX_DATA_PIECE: a write or read of one piece decodes, one byte more is refused', () => {
  const piece = Buffer.alloc(W.MAX_DATA_PIECE);
  assert.equal(W.decodeWrite(write(0, 0, W.MAX_DATA_PIECE, piece), DATA).length, W.MAX_DATA_PIECE);
  refused(() => W.decodeWrite(write(0, 0, W.MAX_DATA_PIECE + 1, Buffer.alloc(W.MAX_DATA_PIECE + 1)), DATA), /at most/);
  const read = (length: number): Buffer => Buffer.concat([W.encodeSeq(1).subarray(0, 8), W.encodeRange(0, length)]);
  assert.equal(W.decodeRead(read(W.MAX_DATA_PIECE), DATA).length, W.MAX_DATA_PIECE);
  refused(() => W.decodeRead(read(W.MAX_DATA_PIECE + 1), DATA), /1\.\.1048576/);
  refused(() => W.decodeRead(read(0), DATA), /1\.\.1048576/);
});

test('cap RESYNC_PIECE: resync data, checksums and their answers of one piece decode, one byte more is refused', () => {
  const flags0 = Buffer.alloc(4);
  assert.equal(W.decodeResyncData(W.encodeRange(0, W.RESYNC_PIECE, flags0, Buffer.alloc(W.RESYNC_PIECE)), DATA).length, W.RESYNC_PIECE);
  refused(() => W.decodeResyncData(W.encodeRange(0, W.RESYNC_PIECE + 1, flags0, Buffer.alloc(W.RESYNC_PIECE + 1)), DATA), /at most/);
  const digest = Buffer.alloc(W.RESYNC_DIGEST);
  assert.equal(W.decodeResyncChecksum(W.encodeRange(0, W.RESYNC_PIECE, digest), DATA).length, W.RESYNC_PIECE);
  refused(() => W.decodeResyncChecksum(W.encodeRange(0, W.RESYNC_PIECE + 1, digest), DATA), /1\.\./);
  refused(() => W.decodeResyncChecksum(W.encodeRange(0, 4096, digest.subarray(1)), DATA), /digest/);
  assert.equal(W.decodeResyncChecksumReply(W.encodeRange(0, W.RESYNC_PIECE, Buffer.from([1])), DATA).same, true);
  refused(() => W.decodeResyncChecksumReply(W.encodeRange(0, W.RESYNC_PIECE + 1, Buffer.from([1])), DATA), /1\.\./);
  refused(() => W.decodeResyncChecksumReply(W.encodeRange(0, 4096, Buffer.from([2])), DATA), /0 or 1/);
});

test('cap RESYNC_ZERO_MAX: a resync zeroing of the largest hole decodes, one byte more is refused', () => {
  const zero = Buffer.alloc(4);
  zero.writeUInt32BE(W.WF_ZERO);
  assert.equal(W.decodeResyncData(W.encodeRange(0, W.RESYNC_ZERO_MAX, zero), DATA).zero, true);
  refused(() => W.decodeResyncData(W.encodeRange(0, W.RESYNC_ZERO_MAX + 1, zero), DATA), /1\.\./);
  assert.equal(W.decodeResyncAck(W.encodeRange(0, W.RESYNC_ZERO_MAX), DATA).length, W.RESYNC_ZERO_MAX);
  refused(() => W.decodeResyncAck(W.encodeRange(0, W.RESYNC_ZERO_MAX + 1), DATA), /1\.\./);
});

test('cap VERIFY_PIECE: a verify of one piece with its digests decodes, one byte more is refused; answers are whole', () => {
  const digests = (length: number): Buffer => Buffer.alloc(Math.ceil(length / BLOCK) * W.VERIFY_DIGEST);
  assert.equal(W.decodeVerify(W.encodeRange(0, W.VERIFY_PIECE, digests(W.VERIFY_PIECE)), DATA).length, W.VERIFY_PIECE);
  refused(() => W.decodeVerify(W.encodeRange(0, W.VERIFY_PIECE + 1, digests(W.VERIFY_PIECE + 1)), DATA), /1\.\./);
  refused(() => W.decodeVerify(W.encodeRange(0, 8192, digests(4096)), DATA), /digests/);
  assert.equal(W.decodeVerifyReply(W.encodeRange(0, W.VERIFY_PIECE, Buffer.alloc(W.VERIFY_REPLY_BYTES)), DATA).length, W.VERIFY_PIECE);
  refused(() => W.decodeVerifyReply(W.encodeRange(0, W.VERIFY_PIECE, Buffer.alloc(W.VERIFY_REPLY_BYTES - 1)), DATA), /bits/);
});

test('cap MAX_RUNS_PER_FRAME: a frame of that many runs decodes, one run more is refused', () => {
  const runs = (n: number) => Array.from({ length: n }, (_, i) => ({ offset: i * 2 * BLOCK, length: BLOCK }));
  assert.equal(W.decodeRuns(W.encodeRuns(runs(W.MAX_RUNS_PER_FRAME)), DATA).length, W.MAX_RUNS_PER_FRAME);
  refused(() => W.decodeRuns(W.encodeRuns(runs(W.MAX_RUNS_PER_FRAME + 1)), DATA), /at most 4096/);
});

test('cap on all bitmap runs of a handshake: one per block at most; past a bitmap that covers every block, no run fits', () => {
  const data = 64 * MiB;
  const blocks = data / BLOCK;
  let after = 0;
  let total = 0;
  for (let first = 0; first < blocks; first += W.MAX_RUNS_PER_FRAME) {
    const frame = Array.from({ length: Math.min(W.MAX_RUNS_PER_FRAME, blocks - first) }, (_, i) => ({ offset: (first + i) * BLOCK, length: BLOCK }));
    const got = W.decodeRuns(W.encodeRuns(frame), data, after);
    after = got[got.length - 1].offset + BLOCK;
    total += got.length;
  }
  assert.equal(total, blocks);
  for (const extra of [{ offset: 0, length: BLOCK }, { offset: data - BLOCK, length: BLOCK }, { offset: data, length: BLOCK }]) {
    refused(() => W.decodeRuns(W.encodeRuns([extra]), data, after), /overlaps|outside/);
  }
});

test('cap MAX_JSON_FRAME: a state of that many bytes decodes, one byte more is refused', () => {
  const state: W.PeerState = {
    node: 'alpha',
    role: 'Primary',
    disk: 'UpToDate',
    gi: { current: newGi(), bitmap: NO_GI, history: [NO_GI, NO_GI] },
    dataBytes: DATA,
    outOfSyncBytes: 0,
    primarySince: Date.now(),
  };
  const padded = (n: number): Buffer => {
    const json = W.encodeJson(state);
    return Buffer.concat([json, Buffer.alloc(n - json.length, 0x20)]);
  };
  assert.deepEqual(W.decodeState(padded(W.MAX_JSON_FRAME), 'alpha'), state);
  refused(() => W.decodeState(padded(W.MAX_JSON_FRAME + 1), 'alpha'), /at most 8192/);
});

test('caps MAX_NAME and MAX_REASON: a name or reason at the cap decodes, one character more is refused', () => {
  const state = (keep: string) =>
    W.encodeJson({ node: 'alpha', role: 'Secondary', disk: 'Outdated', gi: { current: NO_GI, bitmap: NO_GI, history: [NO_GI, NO_GI] }, dataBytes: 0, outOfSyncBytes: 0, primarySince: 0, keep });
  assert.equal(W.decodeState(state('k'.repeat(W.MAX_NAME)), 'alpha').keep?.length, W.MAX_NAME);
  refused(() => W.decodeState(state('k'.repeat(W.MAX_NAME + 1)), 'alpha'), /keep/);
  assert.equal(W.decodeJson(W.encodeJson({ reason: 'r'.repeat(W.MAX_REASON) }), W.refuseSchema, 'refusal').reason.length, W.MAX_REASON);
  refused(() => W.decodeJson(W.encodeJson({ reason: 'r'.repeat(W.MAX_REASON + 1) }), W.refuseSchema, 'refusal'), /reason/);
});

test('what the encoders send, the decoders take (writes and zeroings anywhere in the data area)', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: DATA / BLOCK - 1 }),
      fc.integer({ min: 0, max: W.MAX_DATA_PIECE }),
      fc.constantFrom(0, W.WF_FUA, W.WF_ZERO, W.WF_ZERO | W.WF_TRIM, W.WF_ZERO | W.WF_FUA),
      (block, length, flags) => {
        const offset = block * BLOCK;
        length = Math.min(length, DATA - offset);
        const zero = (flags & W.WF_ZERO) !== 0;
        if (zero && length === 0) return;
        const w = W.decodeWrite(write(offset, flags, length, zero ? undefined : Buffer.alloc(length)), DATA);
        assert.deepEqual([w.offset, w.length, w.flags, w.data?.length], [offset, length, flags, zero ? undefined : length]);
      },
    ),
    { numRuns: 200 },
  );
});

test('every frame the caps allow fits the link\'s frame limit', () => {
  const largest = [
    W.WRITE_HEADER + W.MAX_DATA_PIECE,
    12 + W.MAX_DATA_PIECE, // read reply
    12 + 4 + W.RESYNC_PIECE,
    12 + (W.VERIFY_PIECE / BLOCK) * W.VERIFY_DIGEST,
    16 * W.MAX_RUNS_PER_FRAME,
    W.MAX_JSON_FRAME,
  ];
  for (const n of largest) assert.ok(n <= MAX_FRAME_PAYLOAD, `${n} bytes > ${MAX_FRAME_PAYLOAD}`);
});
