/**
 * Seeded fuzz test of the authenticated peer link: a real node (bravo, a
 * Resource behind its Connector) and a hand-driven alpha that passes the
 * real link handshake, then, connection after connection, brings the
 * session to a phase (mid-handshake, Connected, SyncTarget), sends a few
 * valid frames and then random, truncated, oversized-field and out-of-range
 * frames of every type.
 *
 * Checked after every connection: the node dropped that link and logged a
 * protocol error naming alpha and the frame; its disk is attached; the data
 * area holds exactly what the valid frames wrote (a model kept here); the
 * activity log, bitmap and metadata record after it are byte for byte what
 * they were, except what a legitimate connect writes (becoming SyncTarget
 * writes the record once, with the sync generation and Inconsistent, and
 * nothing else). At the end a
 * valid connection works and so does local I/O.
 *
 * The seed is printed; rerun a failure with DUET_FUZZ_SEED=<seed>.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import * as W from '../../src/replication/wire.js';
import { encodeFrame } from '../../src/replication/link-auth.js';
import { decodeRecord, newGi, NO_GI } from '../../src/replication/meta.js';
import { BLOCK } from '../../src/replication/bitmap.js';
import { syncGeneration } from '../../src/replication/connect-decision.js';
import { mulberry32, pattern } from '../blockdev/conformance.js';
import { until } from './pair.js';
import { bounded, dataArea, droppedFor, establish, metaArea, Mode, RawPeer, startTarget, stateOf, stopTarget, Target, u32, u64, verifyDigests } from './raw-peer.js';

const SEED = process.env.DUET_FUZZ_SEED !== undefined ? Number(process.env.DUET_FUZZ_SEED) >>> 0 : (Date.now() ^ (process.pid << 16)) >>> 0;
const CONNECTIONS = 120;
const MIN_FRAMES = 300;

const uncaught: unknown[] = [];
const onUncaught = (err: unknown): void => void uncaught.push(err);

class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    this.next = mulberry32(seed);
  }
  float(): number {
    return this.next();
  }
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }
  bool(p = 0.5): boolean {
    return this.next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)];
  }
  u64(): bigint {
    return (BigInt(this.int(0, 0xffffffff)) << 32n) | BigInt(this.int(0, 0xffffffff));
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.int(0, 255);
    return b;
  }
}

interface Frame {
  type: number;
  payload: Buffer;
}

const KNOWN = [
  W.F_STATE,
  W.F_BITMAP,
  W.F_BITMAP_DONE,
  W.F_WRITE,
  W.F_ACK_RECV,
  W.F_ACK_WRITE,
  W.F_FLUSH,
  W.F_FLUSH_ACK,
  W.F_READ,
  W.F_READ_REPLY,
  W.F_RS_DATA,
  W.F_RS_ACK,
  W.F_RS_CSUM,
  W.F_RS_CSUM_REPLY,
  W.F_RS_DONE,
  W.F_VERIFY,
  W.F_VERIFY_REPLY,
  W.F_REFUSE,
  W.F_OUTDATE,
  W.F_PROMOTE,
  W.F_PROMOTE_REPLY,
] as const;
/** PING and PONG are the link's own: never a protocol error. */
const LINK_TYPES = new Set([10, 11]);

const writeFrame = (seq: number | bigint, offset: number | bigint, flags: number, length: number, data?: Buffer): Buffer =>
  Buffer.concat([u64(seq), u64(offset), u32(flags), u32(length), ...(data ? [data] : [])]);
const range = (offset: number | bigint, length: number, ...rest: Buffer[]): Buffer => Buffer.concat([u64(offset), u32(length), ...rest]);
const seqFrame = (seq: number | bigint, status = 0): Buffer => Buffer.concat([u64(seq), u32(status)]);

/** Everything the fuzzer knows of the node: what its data area must hold, what its metadata must be. */
class Model {
  constructor(
    readonly data: Buffer,
    public meta: Buffer,
  ) {}
  write(offset: number, bytes: Buffer): void {
    bytes.copy(this.data, offset);
  }
  zero(offset: number, length: number): void {
    this.data.fill(0, offset, offset + length);
  }
}

function generator(t: Target, rng: Rng, model: Model) {
  const r = t.node.resource;
  const l = r.layout;
  const size = r.size;
  let seq = 1000;

  /** A range in the data area, mostly small, now and then large. */
  const dataRange = (max: number): [number, number] => {
    const length = rng.bool(0.8) ? rng.int(1, Math.min(max, 65536)) : rng.int(1, max);
    const offset = rng.int(0, size - length);
    return [offset, length];
  };
  /** An offset where the peer must never reach: the metadata after the data area, past the device, past 2^53. */
  const forbiddenOffset = (): bigint =>
    rng.pick([
      () => BigInt(rng.int(l.alOffset, l.deviceBytes - 1)),
      () => BigInt(l.recordOffset + rng.int(0, 8191)),
      () => BigInt(l.bitmapOffset),
      () => BigInt(size + rng.int(0, 4095)),
      () => BigInt(l.deviceBytes + rng.int(0, 1 << 30)),
      () => 2n ** 53n + BigInt(rng.int(0, 1 << 20)),
      () => rng.u64() | (1n << 63n),
    ])();

  /** Valid frames for the session's phase; applied to the model as the node must apply them. */
  const valid = (mode: Mode, expectRead: Map<number, Buffer>, runEnd: { at: number }): Frame | undefined => {
    if (mode === 'handshake') {
      if (rng.bool(0.3)) return { type: W.F_STATE, payload: stateOf(t, { gi: r.record.gi }) };
      if (runEnd.at >= size) return undefined;
      const runs: { offset: number; length: number }[] = [];
      for (let i = rng.int(1, 8); i > 0 && runEnd.at + BLOCK <= size; i--) {
        const offset = runEnd.at + rng.int(0, 16) * BLOCK;
        if (offset + BLOCK > size) break;
        const length = Math.min(size - offset, rng.int(1, 8) * BLOCK);
        runs.push({ offset, length });
        runEnd.at = offset + length;
      }
      return runs.length > 0 ? { type: W.F_BITMAP, payload: W.encodeRuns(runs) } : undefined;
    }
    const kinds = ['write', 'zero', 'flush', 'read', 'verify', 'state', ...(mode === 'target' ? ['rs-data', 'rs-zero', 'rs-csum'] : [])];
    switch (rng.pick(kinds)) {
      case 'write': {
        const [offset, length] = dataRange(256 * 1024);
        const data = rng.bytes(length);
        model.write(offset, data);
        return { type: W.F_WRITE, payload: writeFrame(++seq, offset, rng.bool(0.2) ? W.WF_FUA : 0, length, data) };
      }
      case 'zero': {
        const [offset, length] = dataRange(size);
        model.zero(offset, length);
        return { type: W.F_WRITE, payload: writeFrame(++seq, offset, rng.pick([W.WF_ZERO, W.WF_ZERO | W.WF_TRIM, W.WF_ZERO | W.WF_FUA]), length) };
      }
      case 'flush':
        return { type: W.F_FLUSH, payload: seqFrame(++seq) };
      case 'read': {
        const [offset, length] = dataRange(W.MAX_DATA_PIECE);
        expectRead.set(++seq, Buffer.from(model.data.subarray(offset, offset + length)));
        return { type: W.F_READ, payload: Buffer.concat([u64(seq), u64(offset), u32(length)]) };
      }
      case 'verify': {
        const [offset, length] = dataRange(W.VERIFY_PIECE);
        return { type: W.F_VERIFY, payload: range(offset, length, verifyDigests(model.data.subarray(offset, offset + length))) };
      }
      case 'state':
        return { type: W.F_STATE, payload: stateOf(t, { gi: r.peer?.state?.gi ?? r.record.gi, sendingBitmap: false }) };
      case 'rs-data': {
        const [offset, length] = dataRange(W.RESYNC_PIECE);
        const data = rng.bytes(length);
        model.write(offset, data);
        return { type: W.F_RS_DATA, payload: range(offset, length, u32(0), data) };
      }
      case 'rs-zero': {
        const [offset, length] = dataRange(Math.min(size, W.RESYNC_ZERO_MAX));
        model.zero(offset, length);
        return { type: W.F_RS_DATA, payload: range(offset, length, u32(W.WF_ZERO)) };
      }
      default: {
        const [offset, length] = dataRange(W.RESYNC_PIECE);
        const digest = rng.bool() ? createHash('sha256').update(model.data.subarray(offset, offset + length)).digest() : rng.bytes(32);
        return { type: W.F_RS_CSUM, payload: range(offset, length, digest) };
      }
    }
  };

  /** A frame that breaks a rule, whatever the phase: the node must refuse it. */
  const invalid = (mode: Mode): Frame => {
    const families: (() => Frame)[] = [
      // WRITE: out of the data area, bad flags, sizes that do not match, cut short.
      () => {
        const data = rng.bytes(rng.int(1, 8192));
        return { type: W.F_WRITE, payload: writeFrame(++seq, forbiddenOffset(), 0, data.length, data) };
      },
      () => ({ type: W.F_WRITE, payload: writeFrame(++seq, forbiddenOffset(), W.WF_ZERO | (rng.bool() ? W.WF_TRIM : 0), rng.int(1, 0xffffffff)) }),
      () => ({ type: W.F_WRITE, payload: writeFrame(++seq, rng.int(0, size - 1), W.WF_ZERO, rng.int(size + 1, 0xffffffff)) }),
      () => {
        // Across the end of the data area, into the activity log.
        const before = rng.int(0, 4095);
        const data = rng.bytes(before + rng.int(1, 4096));
        return { type: W.F_WRITE, payload: writeFrame(++seq, size - before, 0, data.length, data) };
      },
      () => ({ type: W.F_WRITE, payload: writeFrame(++seq, 0, rng.pick([W.WF_TRIM, 8, 0x80000000, W.WF_TRIM | W.WF_FUA]), 4096, Buffer.alloc(4096)) }),
      () => ({ type: W.F_WRITE, payload: writeFrame(++seq, 0, W.WF_ZERO, 0) }),
      () => ({ type: W.F_WRITE, payload: writeFrame(++seq, 0, W.WF_ZERO, 4096, rng.bytes(rng.int(1, 100))) }),
      () => {
        const length = rng.int(2, 65536);
        return { type: W.F_WRITE, payload: writeFrame(++seq, 0, 0, length, rng.bytes(rng.bool() ? length - rng.int(1, length - 1) : length + rng.int(1, 100))) };
      },
      () => ({ type: W.F_WRITE, payload: writeFrame(++seq, 0, 0, W.MAX_DATA_PIECE + 1, Buffer.alloc(W.MAX_DATA_PIECE + 1)) }),
      () => ({ type: W.F_WRITE, payload: writeFrame(rng.u64() | (1n << 60n), 0, 0, 1, Buffer.alloc(1)) }),
      // Acks and flushes: no write or flush of this node is in flight (it is Secondary); sizes exact.
      () => ({ type: rng.pick([W.F_ACK_RECV, W.F_ACK_WRITE, W.F_FLUSH_ACK]), payload: seqFrame(rng.int(0, 1 << 30), rng.int(0, 1)) }),
      () => ({ type: rng.pick([W.F_ACK_RECV, W.F_ACK_WRITE, W.F_FLUSH_ACK, W.F_FLUSH]), payload: rng.bytes(rng.pick([0, 1, 8, 11, 13, 20, 100])) }),
      () => ({ type: W.F_FLUSH, payload: seqFrame(++seq, rng.int(1, 0xffffffff)) }),
      () => ({ type: W.F_FLUSH, payload: seqFrame(2n ** 53n + BigInt(rng.int(1, 1000))) }),
      // READ and READ_REPLY (this node asked nothing).
      () => ({ type: W.F_READ, payload: Buffer.concat([u64(++seq), u64(forbiddenOffset()), u32(rng.int(1, W.MAX_DATA_PIECE))]) }),
      () => ({ type: W.F_READ, payload: Buffer.concat([u64(++seq), u64(0), u32(rng.pick([0, W.MAX_DATA_PIECE + 1, 0xffffffff]))]) }),
      () => ({ type: W.F_READ, payload: rng.bytes(rng.pick([0, 8, 19, 21, 64])) }),
      () => ({ type: W.F_READ_REPLY, payload: Buffer.concat([seqFrame(rng.int(0, 1 << 30)), rng.bytes(rng.int(0, 4096))]) }),
      // Resync frames: outside a resync all are refused; inside, bad ranges and sizes.
      () => ({ type: W.F_RS_DATA, payload: range(forbiddenOffset(), 4096, u32(0), rng.bytes(4096)) }),
      () => ({ type: W.F_RS_DATA, payload: range(forbiddenOffset(), rng.int(1, W.RESYNC_ZERO_MAX), u32(W.WF_ZERO)) }),
      () => ({ type: W.F_RS_DATA, payload: range(0, 8192, u32(0), rng.bytes(rng.int(0, 8191))) }),
      () => ({ type: W.F_RS_DATA, payload: range(0, 4096, u32(rng.pick([W.WF_TRIM, W.WF_FUA, 0xff])), rng.bytes(4096)) }),
      () => ({ type: W.F_RS_DATA, payload: range(0, rng.pick([0, W.RESYNC_PIECE + 1]), u32(0), Buffer.alloc(W.RESYNC_PIECE + 1)) }),
      () => ({ type: W.F_RS_DATA, payload: rng.bytes(rng.int(0, 15)) }),
      () => ({ type: W.F_RS_CSUM, payload: range(rng.int(0, size - 4096), 4096, rng.bytes(rng.pick([0, 16, 31, 33, 64]))) }),
      () => ({ type: W.F_RS_CSUM, payload: range(0, rng.pick([0, W.RESYNC_PIECE + 1, 0x7fffffff]), rng.bytes(32)) }),
      () => ({ type: W.F_RS_CSUM, payload: range(forbiddenOffset(), 4096, rng.bytes(32)) }),
      () => ({ type: rng.pick([W.F_RS_ACK, W.F_RS_CSUM_REPLY]), payload: range(rng.int(0, size - 4096), 4096, ...(rng.bool() ? [Buffer.from([rng.int(0, 1)])] : [])) }),
      () => ({ type: W.F_RS_DONE, payload: rng.pick([Buffer.from('{"gi":'), W.encodeJson({ gi: { current: 'x', bitmap: NO_GI, history: [NO_GI, NO_GI] } }), W.encodeJson({ gi: null }), W.encodeJson({}), rng.bytes(40)]) }),
      () => ({ type: W.F_RS_DONE, payload: W.encodeJson({ gi: { current: newGi(), bitmap: NO_GI, history: [NO_GI, NO_GI] }, extra: true }) }),
      // VERIFY and VERIFY_REPLY (no verify runs here).
      () => ({ type: W.F_VERIFY, payload: range(forbiddenOffset(), 4096, rng.bytes(16)) }),
      () => {
        const length = rng.int(1, W.VERIFY_PIECE);
        const blocks = Math.ceil(length / BLOCK);
        return { type: W.F_VERIFY, payload: range(0, length, rng.bytes((blocks + rng.pick([-1, 1, 7])) * 16)) };
      },
      () => ({ type: W.F_VERIFY, payload: range(0, rng.pick([0, W.VERIFY_PIECE + 1, 0xffffffff]), rng.bytes(64)) }),
      () => ({ type: W.F_VERIFY_REPLY, payload: range(rng.int(0, size - 1), rng.int(1, W.VERIFY_PIECE), rng.bytes(rng.pick([0, 8, 32]))) }),
      // JSON frames of the wrong shape or size.
      () => ({
        type: W.F_STATE,
        payload: stateOf(
          t,
          rng.pick([
            { role: 'Tertiary' },
            { disk: 'Fine' },
            { gi: { current: 'g', bitmap: NO_GI, history: [NO_GI, NO_GI] } },
            { gi: { current: newGi(), bitmap: NO_GI, history: [NO_GI] } },
            { dataBytes: -rng.int(1, 100) },
            { dataBytes: 1.5 },
            { dataBytes: String(size) },
            { outOfSyncBytes: null },
            { primarySince: 'yesterday' },
            { node: rng.pick(['bravo', 'mallory', '']) },
            { keep: 'k'.repeat(W.MAX_NAME + 1) },
            { extra: 1 },
            { sendingBitmap: 'yes' },
          ]),
        ),
      }),
      () => ({ type: W.F_STATE, payload: rng.pick([Buffer.from('{'), Buffer.from('null'), Buffer.from('[]'), rng.bytes(rng.int(1, 200)), Buffer.alloc(W.MAX_JSON_FRAME + 1, 0x20)]) }),
      () => ({ type: W.F_REFUSE, payload: rng.pick([W.encodeJson({ reason: 7 }), W.encodeJson({}), W.encodeJson({ reason: 'r'.repeat(W.MAX_REASON + 1) }), Buffer.from('no')]) }),
      // BITMAP: bad runs (mid-handshake) or any runs at all once the bitmap was done.
      () => ({
        type: W.F_BITMAP,
        payload: rng.pick([
          () => Buffer.concat([u64(forbiddenOffset()), u64(BLOCK)]),
          () => Buffer.concat([u64(0), u64(rng.u64() | (1n << 62n))]),
          () => Buffer.concat([u64(rng.int(1, BLOCK - 1)), u64(BLOCK)]),
          () => Buffer.concat([u64(0), u64(0)]),
          () => Buffer.concat([u64(size - BLOCK), u64(BLOCK), u64(0), u64(BLOCK)]),
          () => rng.bytes(rng.pick([1, 15, 17, 31])),
          () => Buffer.alloc(16 * (W.MAX_RUNS_PER_FRAME + 1)),
        ])(),
      }),
      () => ({ type: W.F_BITMAP_DONE, payload: rng.bytes(rng.int(1, 16)) }),
      () => ({ type: W.F_OUTDATE, payload: rng.bytes(rng.int(1, 16)) }),
      // Types this node does not know.
      () => {
        let type: number;
        do type = rng.int(0, 0xffff);
        while ((KNOWN as readonly number[]).includes(type) || LINK_TYPES.has(type));
        return { type, payload: rng.bytes(rng.int(0, 64)) };
      },
    ];
    if (mode !== 'handshake') {
      // Once the bitmap is done, a bitmap frame or a second done is itself the violation.
      families.push(() => ({ type: rng.pick([W.F_BITMAP, W.F_BITMAP_DONE]), payload: Buffer.alloc(0) }));
    }
    return rng.pick(families)();
  };

  /** A valid frame for the phase, to be cut short (the caller undoes what it did to the model). */
  const truncated = (mode: Mode): Frame | undefined => {
    const f = valid(mode === 'handshake' ? 'connected' : mode, new Map(), { at: size });
    return f && f.payload.length >= 2 ? f : undefined;
  };

  /** Any type (mostly known ones), random bytes: no structure at all. */
  const random = (): Frame => ({
    type: rng.bool(0.9) ? rng.pick(KNOWN) : rng.int(0, 0xffff),
    payload: rng.bytes(rng.bool(0.9) ? rng.int(1, 256) : rng.int(257, 70000)),
  });

  return { valid, invalid, truncated, random };
}

test(`peer link fuzz: ${CONNECTIONS} connections of valid then malformed frames (seed ${SEED}; rerun with DUET_FUZZ_SEED=${SEED})`, async (t) => {
  t.diagnostic(`fuzz seed ${SEED} (DUET_FUZZ_SEED=${SEED} to reproduce)`);
  console.log(`# peer fuzz seed: ${SEED}`);
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  const target = await startTarget();
  t.after(async () => {
    await stopTarget(target);
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUncaught);
  });
  const r = target.node.resource;
  const l = r.layout;
  const rng = new Rng(SEED);
  const model = new Model(await dataArea(target), await metaArea(target));
  const gen = generator(target, rng, model);
  const stats = { frames: 0, valid: 0, invalid: 0, truncated: 0, random: 0, link: 0, cut: 0, drops: 0, byFrame: new Map<string, number>() };

  /**
   * Once a Diskless alpha wrote (an Inconsistent node is 'connected' by one, raw-peer.ts), the node holds
   * those blocks marked out of sync (DRBD's receive_Data) and writes its bitmap when it likes: from then
   * on the bitmap area may change; the activity log and the record still may not.
   */
  let bitmapMayChange = false;
  const [bmFrom, bmTo] = [l.bitmapOffset - l.alOffset, l.recordOffset - l.alOffset];
  const adoptBitmap = (meta: Buffer): void => {
    if (bitmapMayChange) model.meta.set(meta.subarray(bmFrom, bmTo), bmFrom);
  };
  const checkDisk = async (where: string): Promise<void> => {
    assert.notEqual(r.disk, 'Diskless', `${where}: the disk was detached`);
    const meta = await metaArea(target);
    adoptBitmap(meta);
    if (!meta.equals(model.meta)) {
      const at = [...meta].findIndex((b, i) => b !== model.meta[i]);
      assert.fail(`${where}: metadata area changed at device offset ${l.alOffset + at} (activity log ${l.alOffset}, bitmap ${l.bitmapOffset}, record ${l.recordOffset})`);
    }
    const data = await dataArea(target);
    if (!data.equals(model.data)) {
      const at = data.findIndex((b, i) => b !== model.data[i]);
      assert.fail(`${where}: data area differs from what the valid frames wrote, first at ${at}`);
    }
  };

  for (let c = 0; c < CONNECTIONS; c++) {
    const where = `connection ${c} (seed ${SEED})`;
    await checkDisk(`${where}, before`);
    const mode: Mode = rng.pick(['handshake', 'connected', 'connected', 'target']);
    const p = await RawPeer.connect(target);
    // An Inconsistent node is 'connected' by a Diskless alpha (raw-peer.ts), whose writes it marks out of
    // sync (DRBD's receive_Data): the bitmap area may change then, nothing else.
    const disklessPeer = mode === 'connected' && r.disk === 'Inconsistent';
    try {
      await establish(target, p, mode);
      if (mode === 'target') {
        // What becoming SyncTarget legitimately writes: the record twice (resource.ts beginSync: first
        // Inconsistent, then, once its bitmap is on disk, the sync generation and no full sync needed),
        // one per slot; and the zeroed first block (establish resyncs it).
        model.zero(0, BLOCK);
        const meta = await metaArea(target);
        const recordArea = l.recordOffset - l.alOffset;
        adoptBitmap(meta);
        assert.ok(meta.subarray(0, recordArea).equals(model.meta.subarray(0, recordArea)), `${where}: becoming SyncTarget wrote the activity log or bitmap`);
        const slots = (m: Buffer) => [0, 1].map((i) => decodeRecord(m.subarray(recordArea + i * 4096, recordArea + (i + 1) * 4096)));
        const prev = slots(model.meta).reduce((a, b) => (b && (!a || b.seq > a.seq) ? b : a))!;
        const gi = { current: syncGeneration(r.peer!.state!.gi.current, prev.gi.current), bitmap: NO_GI, history: [prev.gi.current, prev.gi.history[0]] };
        assert.deepEqual(slots(meta)[(prev.seq + 1) % 2], { ...prev, disk: 'Inconsistent', seq: prev.seq + 1 }, `${where}: the first record becoming SyncTarget wrote`);
        assert.deepEqual(slots(meta)[(prev.seq + 2) % 2], { ...prev, gi, disk: 'Inconsistent', fullSyncNeeded: false, seq: prev.seq + 2 }, `${where}: the record becoming SyncTarget wrote`);
        model.meta = meta;
      }
      await checkDisk(`${where}, ${mode}`);
      const from = target.events.length;
      const sent: string[] = [];
      const send = (f: Frame): void => {
        p.send(f.type, f.payload);
        sent.push(W.frameName(f.type));
        stats.frames++;
      };
      const reads = new Map<number, Buffer>();
      const runEnd = { at: 0 };
      for (let i = rng.int(0, 4); i > 0; i--) {
        const f = gen.valid(mode, reads, runEnd);
        if (!f) continue;
        send(f);
        stats.valid++;
      }
      const ending = rng.float();
      let expectProtocolError = true;
      if (ending < 0.55) {
        const f = gen.invalid(mode);
        send(f);
        stats.invalid++;
      } else if (ending < 0.7) {
        const snapshot = Buffer.from(model.data);
        const f = gen.truncated(mode);
        model.data.set(snapshot);
        if (f) {
          send({ type: f.type, payload: f.payload.subarray(0, rng.int(f.type === W.F_WRITE ? 0 : 1, f.payload.length - 1)) });
          stats.truncated++;
        } else send(gen.invalid(mode));
      } else if (ending < 0.88) {
        for (let i = rng.int(1, 3); i > 0; i--) send(gen.random());
        stats.random++;
        // Random bytes are almost never a valid frame; end on one that never is.
        send(gen.invalid(mode));
      } else if (ending < 0.95) {
        // A broken frame header: the link itself refuses it.
        const h = encodeFrame(W.F_WRITE, Buffer.alloc(0));
        if (rng.bool()) h.writeUInt32BE(((rng.int(0, 0xffffffff) ^ 0x4455454c) | 1) >>> 0, 0);
        else h.writeUInt32BE(rng.int(W.MAX_DATA_PIECE + 4097, 0xffffffff), 8);
        p.sendRaw(h);
        sent.push('(frame header)');
        stats.frames++;
        stats.link++;
      } else {
        // The peer goes away in the middle of a frame: a lost link, not a protocol error.
        const h = encodeFrame(W.F_WRITE, Buffer.alloc(0));
        h.writeUInt32BE(1000, 8);
        // end(), not destroy(): what was sent before must still arrive (and be applied).
        p.socket.end(Buffer.concat([h, rng.bytes(rng.int(0, 999))]));
        stats.frames++;
        stats.cut++;
        expectProtocolError = false;
      }
      if (expectProtocolError) {
        const e = await droppedFor(target, p, from, 3000).catch((err: Error) => assert.fail(`${where}: after ${sent.join(', ')}: ${err.message}`));
        assert.equal(e.peer, 'alpha', `${where}: the log names the peer`);
        if (e.event === 'peer-protocol-error') assert.ok(sent.includes(String(e.frame)), `${where}: logged frame ${e.frame}, sent ${sent.join(', ')}`);
        else assert.ok(sent.includes('(frame header)'), `${where}: the link refused a frame header, sent ${sent.join(', ')}`);
        stats.byFrame.set(String(e.frame ?? 'header'), (stats.byFrame.get(String(e.frame ?? 'header')) ?? 0) + 1);
        stats.drops++;
      } else {
        await until(`${where}: the node to see the link gone`, () => r.peer === undefined, 5000);
      }
      // Replies that made it out before the drop are right.
      for (const f of p.frames) {
        if (f.type === W.F_READ_REPLY) {
          const want = reads.get(Number(f.payload.readBigUInt64BE(0)));
          assert.ok(want && f.payload.readUInt32BE(8) === 0 && f.payload.subarray(12).equals(want), `${where}: a read reply differs from the data written`);
        }
        if (f.type === W.F_VERIFY_REPLY) assert.ok(f.payload.subarray(12).equals(Buffer.alloc(W.VERIFY_REPLY_BYTES)), `${where}: verify found a difference where there is none`);
        if (f.type === W.F_ACK_WRITE || f.type === W.F_FLUSH_ACK) assert.equal(f.payload.readUInt32BE(8), 0, `${where}: a valid write or flush failed`);
      }
    } finally {
      p.close();
    }
    // Writes the node took before the bad frame are done (a memory disk is synchronous; resync writes wait a turn).
    await new Promise((resolve) => setImmediate(resolve));
    if (disklessPeer) bitmapMayChange = true;
    await checkDisk(`${where}, after`);
    assert.deepEqual(uncaught, [], `${where}: nothing may throw out of the node`);
  }

  // The node serves on: a valid peer connects, writes, reads back, flushes and verifies.
  const p = await RawPeer.connect(target);
  try {
    await establish(target, p, 'connected');
    const data = pattern(SEED, 3 * BLOCK);
    p.send(W.F_WRITE, writeFrame(1, BLOCK, 0, data.length, data));
    p.send(W.F_FLUSH, seqFrame(2));
    p.send(W.F_READ, Buffer.concat([u64(3), u64(BLOCK), u32(data.length)]));
    p.send(W.F_VERIFY, range(BLOCK, data.length, verifyDigests(data)));
    assert.equal((await p.frame(W.F_ACK_WRITE)).readUInt32BE(8), 0);
    assert.equal((await p.frame(W.F_FLUSH_ACK)).readUInt32BE(8), 0);
    assert.ok((await p.frame(W.F_READ_REPLY)).subarray(12).equals(data));
    assert.ok((await p.frame(W.F_VERIFY_REPLY)).subarray(12).equals(Buffer.alloc(W.VERIFY_REPLY_BYTES)));
    assert.ok(p.isUp, 'a valid peer stays connected');
    model.write(BLOCK, data);
  } finally {
    p.close();
  }
  await until('the valid link gone', () => r.peer === undefined);
  // And local I/O works: promoted (forced if a SyncTarget connect left it Inconsistent), it writes and reads.
  await bounded(r.promote(r.disk !== 'UpToDate'), 5000, 'promotion');
  const local = pattern(SEED + 1, 2 * BLOCK);
  await r.write(r.size - local.length, local);
  const back = Buffer.alloc(local.length);
  await r.read(r.size - local.length, back);
  assert.ok(back.equals(local));
  await r.demote();
  assert.deepEqual(uncaught, []);
  assert.ok(stats.frames >= MIN_FRAMES, `only ${stats.frames} frames sent`);
  t.diagnostic(
    `${stats.frames} frames over ${CONNECTIONS} connections: ${stats.valid} valid, ${stats.invalid} malformed, ${stats.truncated} truncated, ${stats.random} random runs, ${stats.link} bad headers, ${stats.cut} cut mid-frame; ${stats.drops} protocol-error drops by frame: ${JSON.stringify(Object.fromEntries(stats.byFrame))}`,
  );
});
