/**
 * Model-based property test of the thin-volume manager: random sequences of
 * volume commands against a pool, compared after every command with a plain
 * model (name -> Buffer). Checks contents, checkPool, diffVolumes coverage and
 * block status, across reopens of the pool from the same devices.
 *
 * fast-check picks a new seed each run and prints seed and path on failure:
 * DUET_MODEL_SEED=<seed> DUET_MODEL_PATH=<path> reruns that case,
 * DUET_MODEL_RUNS=<n> widens the search (default 100 sequences, ~15-20 s).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';

import { MemoryDevice } from '../../src/blockdev/memory.js';
import { BlockDeviceError, EXTENT_HOLE, EXTENT_ZERO } from '../../src/blockdev/types.js';
import { Pool } from '../../src/volume/pool.js';
import { createVolume, shareVolume, resizeVolume, removeVolume } from '../../src/volume/operations.js';
import { UserError } from '../../src/util/errors.js';
import {
  KiB,
  MiB,
  assertDiffCovers,
  assertPoolOk,
  describeDiff,
  keep,
  memoryDevices,
  pattern,
  pickRange,
  trimmedRange,
  type Align,
  readVolume,
  vol,
} from './helpers.js';

/* ----------------------------------------------------------------- commands */

type Cmd =
  | { t: 'create'; sectors: number }
  | { t: 'write'; vol: number; off: number; len: number; align: Align; seed: number; fua: boolean }
  | { t: 'trim'; vol: number; off: number; len: number; align: Align; fua: boolean }
  | { t: 'zero'; vol: number; off: number; len: number; align: Align; fua: boolean; noHole: boolean }
  | { t: 'snap'; vol: number }
  | { t: 'clone'; vol: number }
  | { t: 'resize'; vol: number; sectors: number; force: boolean }
  | { t: 'remove'; vol: number }
  | { t: 'flush'; vol: number }
  | { t: 'readonly'; vol: number; seed: number }
  | { t: 'reopen'; reverse: boolean };

/** Volume sizes in sectors: often a few chunks (so commands overlap), mostly under 1 MiB, sometimes a few MiB. */
const sectorsArb = fc.oneof(
  { weight: 4, arbitrary: fc.integer({ min: 1, max: 256 }) },
  { weight: 3, arbitrary: fc.integer({ min: 1, max: 2048 }) },
  { weight: 1, arbitrary: fc.integer({ min: 2048, max: 6 * 2048 }) },
);
const alignArb = fc.constantFrom<Align>('any', 'any', 'sector', 'chunk', 'straddle', 'tail');
const vArb = fc.nat({ max: 1000 });
const offArb = fc.nat({ max: 1 << 30 });
const lenArb = fc.integer({ min: 1, max: 1 << 30 });

const cmdArb: fc.Arbitrary<Cmd> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ t: fc.constant('create' as const), sectors: sectorsArb }) },
  {
    weight: 12,
    arbitrary: fc.record({ t: fc.constant('write' as const), vol: vArb, off: offArb, len: lenArb, align: alignArb, seed: fc.nat(), fua: fc.boolean() }),
  },
  { weight: 3, arbitrary: fc.record({ t: fc.constant('trim' as const), vol: vArb, off: offArb, len: lenArb, align: alignArb, fua: fc.boolean() }) },
  {
    weight: 3,
    arbitrary: fc.record({ t: fc.constant('zero' as const), vol: vArb, off: offArb, len: lenArb, align: alignArb, fua: fc.boolean(), noHole: fc.boolean() }),
  },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('snap' as const), vol: vArb }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('clone' as const), vol: vArb }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('resize' as const), vol: vArb, sectors: sectorsArb, force: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('remove' as const), vol: vArb }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('flush' as const), vol: vArb }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('readonly' as const), vol: vArb, seed: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('reopen' as const), reverse: fc.boolean() }) },
);

interface Config {
  chunkSize: number;
  /** Device sizes: two, of different sizes, so volumes span devices. */
  devices: number[];
}
const configArb: fc.Arbitrary<Config> = fc.record({
  chunkSize: fc.constantFrom(4 * KiB, 64 * KiB),
  devices: fc.constantFrom([24 * MiB, 14 * MiB], [12 * MiB, 26 * MiB]),
});

/* -------------------------------------------------------------------- model */

interface MVol {
  data: Buffer;
  snapshot: boolean;
}

class Model {
  readonly vols = new Map<string, MVol>();
  /** (older, newer) pairs of a share: the diff between them must cover every changed byte. */
  readonly pairs: [string, string][] = [];
  private next = 0;

  freshName(): string {
    return `v${this.next++}`;
  }
  names(filter: (v: MVol) => boolean = () => true): string[] {
    return [...this.vols.entries()].filter(([, v]) => filter(v)).map(([n]) => n);
  }
  pick(index: number, filter?: (v: MVol) => boolean): string | undefined {
    const names = this.names(filter);
    return names.length === 0 ? undefined : names[index % names.length];
  }
}

const MAX_VOLUMES = 8;

async function runCommands(config: Config, cmds: Cmd[]): Promise<void> {
  const devs: MemoryDevice[] = memoryDevices(config.devices);
  let pool = await Pool.create('mp', devs.map(keep), { chunkSize: config.chunkSize });
  const cs = config.chunkSize;
  const m = new Model();
  const log: string[] = [];
  try {
    for (const [step, cmd] of cmds.entries()) {
      const touched = await apply(cmd);
      log.push(touched.describe);
      await verify(`step ${step} (${touched.describe})`, touched.names);
    }
    await verify('the end', undefined);
    await pool.close();
    pool = await Pool.open('mp', devs.map(keep));
    await verify('the final reopen', undefined);
    await pool.close();
  } catch (err) {
    (err as Error).message += `\n  chunk size ${cs}, devices ${config.devices.join('+')}; commands run:\n    ${log.join('\n    ')}`;
    throw err;
  }

  async function apply(cmd: Cmd): Promise<{ describe: string; names?: string[] }> {
    switch (cmd.t) {
      case 'create': {
        if (m.vols.size >= MAX_VOLUMES) return { describe: 'create skipped (enough volumes)', names: [] };
        const name = m.freshName();
        const size = cmd.sectors * 512;
        await createVolume(pool, name, size);
        m.vols.set(name, { data: Buffer.alloc(size), snapshot: false });
        return { describe: `create ${name} ${size}`, names: [name] };
      }
      case 'write': {
        const name = m.pick(cmd.vol, (v) => !v.snapshot);
        if (!name) return { describe: 'write skipped', names: [] };
        const mv = m.vols.get(name)!;
        const [o, l] = pickRange(mv.data.length, cs, cmd.off, cmd.len, cmd.align);
        const data = pattern(cmd.seed, l);
        await vol(pool, name).write(o, data, cmd.fua ? { fua: true } : undefined);
        data.copy(mv.data, o);
        return { describe: `write ${name} ${o}+${l}${cmd.fua ? ' fua' : ''} seed ${cmd.seed}`, names: [name] };
      }
      case 'trim': {
        const name = m.pick(cmd.vol, (v) => !v.snapshot);
        if (!name) return { describe: 'trim skipped', names: [] };
        const mv = m.vols.get(name)!;
        const [o, l] = pickRange(mv.data.length, cs, cmd.off, cmd.len, cmd.align);
        await vol(pool, name).trim(o, l, cmd.fua ? { fua: true } : undefined);
        // Whole chunks read as zeros after a trim; a partial chunk is left as it was.
        const r = trimmedRange(mv.data.length, cs, o, l);
        if (r) mv.data.fill(0, r[0], r[1]);
        return { describe: `trim ${name} ${o}+${l}${cmd.fua ? ' fua' : ''}`, names: [name] };
      }
      case 'zero': {
        const name = m.pick(cmd.vol, (v) => !v.snapshot);
        if (!name) return { describe: 'zero skipped', names: [] };
        const mv = m.vols.get(name)!;
        const [o, l] = pickRange(mv.data.length, cs, cmd.off, cmd.len, cmd.align);
        await vol(pool, name).writeZeroes(o, l, { fua: cmd.fua, noHole: cmd.noHole });
        mv.data.fill(0, o, o + l);
        return { describe: `zero ${name} ${o}+${l}${cmd.fua ? ' fua' : ''}${cmd.noHole ? ' noHole' : ''}`, names: [name] };
      }
      case 'snap':
      case 'clone': {
        const src = m.pick(cmd.vol);
        if (!src || m.vols.size >= MAX_VOLUMES) return { describe: `${cmd.t} skipped`, names: [] };
        const name = m.freshName();
        const st = await shareVolume(pool, src, name, cmd.t === 'clone');
        assert.equal(st.record.readOnly, cmd.t === 'snap');
        m.vols.set(name, { data: Buffer.from(m.vols.get(src)!.data), snapshot: cmd.t === 'snap' });
        m.pairs.push([name, src]);
        return { describe: `${cmd.t} ${src} -> ${name}`, names: [name, src] };
      }
      case 'resize': {
        const name = m.pick(cmd.vol, (v) => !v.snapshot);
        if (!name) return { describe: 'resize skipped', names: [] };
        const mv = m.vols.get(name)!;
        const size = cmd.sectors * 512;
        const old = mv.data.length;
        const what = `resize ${name} ${old} -> ${size}${cmd.force ? ' force' : ''}`;
        try {
          await resizeVolume(pool, name, size, cmd.force);
        } catch (err) {
          // Refusing is allowed only for a shrink without force (data past the new end).
          if (err instanceof UserError && size < old && !cmd.force) return { describe: `${what}: refused`, names: [name] };
          throw err;
        }
        if (size < old && !cmd.force) {
          const dropped = mv.data.subarray(size);
          assert.ok(dropped.every((b) => b === 0), `${what}: a shrink without force dropped non-zero data`);
        }
        const data = Buffer.alloc(size);
        mv.data.copy(data, 0, 0, Math.min(size, old));
        mv.data = data;
        assert.equal(vol(pool, name).size, size);
        return { describe: what, names: [name] };
      }
      case 'remove': {
        const name = m.pick(cmd.vol);
        if (!name) return { describe: 'remove skipped', names: [] };
        await removeVolume(pool, name);
        m.vols.delete(name);
        return { describe: `remove ${name}`, names: [] };
      }
      case 'flush': {
        const name = m.pick(cmd.vol);
        if (!name) return { describe: 'flush skipped', names: [] };
        await vol(pool, name).flush();
        return { describe: `flush ${name}`, names: [] };
      }
      case 'readonly': {
        // A snapshot refuses every change with EPERM and stays as it was.
        const name = m.pick(cmd.vol, (v) => v.snapshot);
        if (!name) return { describe: 'snapshot write skipped', names: [] };
        const v = vol(pool, name);
        const size = v.size;
        const o = cmd.seed % size;
        const attempts: [string, () => unknown][] = [
          ['write', () => v.write(o, Buffer.alloc(Math.min(100, size - o), 7))],
          ['trim', () => v.trim(0, size)],
          ['writeZeroes', () => v.writeZeroes(0, size)],
        ];
        for (const [op, fn] of attempts) {
          await assert.rejects(
            async () => fn(),
            (err: unknown) => err instanceof BlockDeviceError && err.code === 'EPERM',
            `${op} on snapshot ${name} must fail with EPERM`,
          );
        }
        await assert.rejects(resizeVolume(pool, name, size + 512), UserError, `resize of snapshot ${name}`);
        return { describe: `writes to snapshot ${name} refused`, names: [name] };
      }
      case 'reopen': {
        await pool.close();
        const order = cmd.reverse ? [...devs].reverse() : devs;
        pool = await Pool.open('mp', order.map(keep));
        return { describe: `reopen${cmd.reverse ? ' (devices reversed)' : ''}` };
      }
    }
  }

  /** Contents of `names` (all volumes if undefined), the pool's check, diffs of shared pairs, the volume list. */
  async function verify(when: string, names: string[] | undefined): Promise<void> {
    const listed = pool.listVolumes().map((v) => v.record.name).sort();
    assert.deepEqual(listed, m.names().sort(), `${when}: volume list`);
    const contents = new Map<string, Buffer>();
    const read = async (name: string): Promise<Buffer> => {
      let c = contents.get(name);
      if (!c) {
        c = await readVolume(pool, name);
        contents.set(name, c);
      }
      return c;
    };
    for (const name of names ?? m.names()) {
      const mv = m.vols.get(name);
      if (!mv) continue;
      const got = await read(name);
      if (!got.equals(mv.data)) assert.fail(describeDiff(`${when}: volume ${name}`, mv.data, got));
      // Holes the block status reports must read as zeros.
      const extents = await vol(pool, name).blockStatus(0, mv.data.length);
      let pos = 0;
      for (const e of extents) {
        assert.equal(e.offset, pos, `${when}: ${name} extents contiguous`);
        if (e.flags & EXTENT_ZERO) {
          const slice = mv.data.subarray(e.offset, e.offset + e.length);
          assert.ok(slice.every((b) => b === 0), `${when}: ${name} extent ${JSON.stringify(e)} says zero, the data is not`);
        }
        assert.ok(e.flags === 0 || e.flags === (EXTENT_HOLE | EXTENT_ZERO), `${when}: extent flags ${e.flags}`);
        pos += e.length;
      }
      assert.equal(pos, mv.data.length, `${when}: ${name} extents cover the volume`);
    }
    await assertPoolOk(pool, when);
    for (const [older, newer] of m.pairs) {
      if (!m.vols.has(older) || !m.vols.has(newer)) continue;
      if (names && !names.includes(older) && !names.includes(newer)) continue;
      const a = m.vols.get(older)!.data;
      const b = m.vols.get(newer)!.data;
      assertDiffCovers(pool, older, a, newer, b, when);
      assertDiffCovers(pool, newer, b, older, a, when);
      // The contents the diff is judged by are the real ones.
      assert.ok((await read(older)).equals(a) && (await read(newer)).equals(b), `${when}: pair ${older}/${newer} reads as modelled`);
    }
  }
}

const runs = Number(process.env.DUET_MODEL_RUNS ?? 100);
const seed = process.env.DUET_MODEL_SEED !== undefined ? Number(process.env.DUET_MODEL_SEED) : undefined;
/** fast-check's replay path of a failure (printed with its seed), to rerun just the shrunk case. */
const path = process.env.DUET_MODEL_PATH;

test(`volume commands match a plain model (${runs} random sequences, checkPool and diff after every command)`, { timeout: 600_000 }, async () => {
  await fc.assert(
    fc.asyncProperty(configArb, fc.array(cmdArb, { minLength: 1, maxLength: 50, size: 'max' }), async (config, cmds) => {
      await runCommands(config, cmds);
    }),
    { numRuns: runs, seed, path },
  );
});

test('the model test itself: a fixed sequence touching every command', async () => {
  const all: Cmd[] = [
    { t: 'create', sectors: 300 },
    { t: 'write', vol: 0, off: 1000, len: 70_000, align: 'any', seed: 1, fua: false },
    { t: 'snap', vol: 0 },
    { t: 'write', vol: 0, off: 5, len: 9, align: 'straddle', seed: 2, fua: true },
    { t: 'clone', vol: 1 },
    { t: 'write', vol: 1, off: 3, len: 100_000, align: 'tail', seed: 3, fua: false },
    { t: 'trim', vol: 0, off: 0, len: 1, align: 'chunk', fua: false },
    { t: 'zero', vol: 1, off: 77, len: 5000, align: 'any', fua: true, noHole: false },
    { t: 'readonly', vol: 0, seed: 10 },
    { t: 'resize', vol: 0, sectors: 1000, force: false },
    { t: 'resize', vol: 0, sectors: 7, force: false },
    { t: 'resize', vol: 0, sectors: 7, force: true },
    { t: 'resize', vol: 0, sectors: 500, force: false },
    { t: 'flush', vol: 0 },
    { t: 'reopen', reverse: true },
    { t: 'remove', vol: 0 },
    { t: 'reopen', reverse: false },
  ];
  for (const chunkSize of [4 * KiB, 64 * KiB]) await runCommands({ chunkSize, devices: [12 * MiB, 26 * MiB] }, all);
});

test('writeZeroes straddling one chunk boundary (no whole chunk inside) zeroes both sides, whichever is mapped', async () => {
  for (const cs of [4 * KiB, 64 * KiB]) {
    const pool = await Pool.create('zp', memoryDevices([12 * MiB, 26 * MiB]), { chunkSize: cs });
    await createVolume(pool, 'v', 4 * cs);
    const v = vol(pool, 'v');
    const model = Buffer.alloc(4 * cs);
    // Chunk 0 unmapped, chunk 1 mapped; chunk 2 mapped, chunk 3 unmapped.
    const data = pattern(11, 2 * cs);
    await v.write(cs, data);
    data.copy(model, cs);
    for (const [o, l] of [
      [cs - 100, 200],
      [3 * cs - 50, 120],
      [2 * cs - 1, 2],
    ]) {
      await v.writeZeroes(o, l);
      model.fill(0, o, o + l);
      const got = await readVolume(pool, 'v');
      if (!got.equals(model)) assert.fail(describeDiff(`chunk ${cs}: writeZeroes(${o}, ${l})`, model, got));
    }
    await assertPoolOk(pool, 'writeZeroes');
    await pool.close();
  }
});

test('a shrink without force refuses to drop data in the part of the last kept chunk past the new end', async () => {
  const cs = 4 * KiB;
  const pool = await Pool.create('rp', memoryDevices([12 * MiB, 26 * MiB]), { chunkSize: cs });
  await createVolume(pool, 'v', 34 * 512); // 4 whole chunks and a partial one
  await vol(pool, 'v').write(34 * 512 - 1, Buffer.from([7]));
  // Within the last chunk: no whole chunk is dropped, but the byte is.
  await assert.rejects(resizeVolume(pool, 'v', 33 * 512), /use --force/);
  await assert.rejects(resizeVolume(pool, 'v', 4 * cs + 512), /use --force/);
  assert.equal(vol(pool, 'v').size, 34 * 512);
  assert.equal((await readVolume(pool, 'v'))[34 * 512 - 1], 7, 'the data is still there');
  // Zeros past the new end: nothing to lose, no force needed.
  await vol(pool, 'v').write(4 * cs, Buffer.from([9]));
  await vol(pool, 'v').writeZeroes(34 * 512 - 1, 1);
  await resizeVolume(pool, 'v', 4 * cs + 512);
  await resizeVolume(pool, 'v', 34 * 512, false);
  const expect = Buffer.alloc(34 * 512);
  expect[4 * cs] = 9;
  assert.ok((await readVolume(pool, 'v')).equals(expect));
  await resizeVolume(pool, 'v', 4 * cs, true);
  await assertPoolOk(pool, 'resizes');
  await pool.close();
});

/* ------------------------------------------------------------------ ENOSPC */

test('a full pool: ENOSPC naming the pool, consistent, acknowledged data intact, room again after a remove', async () => {
  const cs = 4 * KiB;
  const dev = new MemoryDevice(1 * MiB + 120 * cs, 'small');
  let pool = await Pool.create('tiny', [keep(dev)], { chunkSize: cs });
  await createVolume(pool, 'a', 1 * MiB);
  await createVolume(pool, 'b', 1 * MiB);
  const model = new Map<string, Buffer>([
    ['a', Buffer.alloc(1 * MiB)],
    ['b', Buffer.alloc(1 * MiB)],
  ]);
  let full: unknown;
  let acknowledged = 0;
  for (let i = 0; i < 512 && !full; i++) {
    const name = i % 2 === 0 ? 'a' : 'b';
    const k = Math.floor(i / 2);
    // Partial-chunk writes at the middle of each chunk: every one provisions a chunk.
    const data = pattern(1000 + i, 1500);
    const at = k * cs + 1000;
    try {
      await vol(pool, name).write(at, data);
      data.copy(model.get(name)!, at);
      acknowledged++;
      if (i % 16 === 15) await vol(pool, name).flush();
    } catch (err) {
      full = err;
    }
  }
  assert.ok(full, 'the pool filled up');
  assert.ok(full instanceof BlockDeviceError, `a BlockDeviceError, got ${String(full)}`);
  assert.equal(full.code, 'ENOSPC');
  assert.match(full.message, /\btiny\b/, 'the message names the pool');
  assert.ok(acknowledged > 50, `${acknowledged} writes fitted before the pool was full`);
  await assertPoolOk(pool, 'ENOSPC');

  // A multi-chunk write on a full pool fails too; the range is then unknown, the rest is not touched.
  const big = pattern(99, 3 * cs);
  await assert.rejects(async () => vol(pool, 'b').write(200 * cs, big), (e: unknown) => e instanceof BlockDeviceError && e.code === 'ENOSPC');
  await assertPoolOk(pool, 'a failed multi-chunk write');
  const bData = model.get('b')!;
  const bNow = await readVolume(pool, 'b');
  bNow.copy(bData, 200 * cs, 200 * cs, 203 * cs);

  for (const [name, data] of model) {
    const got = await readVolume(pool, name);
    if (!got.equals(data)) assert.fail(describeDiff(`after ENOSPC: ${name}`, data, got));
  }
  // Still full: overwriting an owned chunk in place needs no new chunk and works.
  const inPlace = pattern(5, 100);
  await vol(pool, 'b').write(cs + 1000, inPlace);
  inPlace.copy(bData, cs + 1000);

  await removeVolume(pool, 'a');
  model.delete('a');
  await vol(pool, 'b').flush();
  for (let k = 0; k < 20; k++) {
    const data = pattern(5000 + k, 3000);
    await vol(pool, 'b').write((210 + k) * cs + 10, data);
    data.copy(bData, (210 + k) * cs + 10);
  }
  await assertPoolOk(pool, 'writes after freeing room');
  assert.ok((await readVolume(pool, 'b')).equals(bData), 'b reads as written');
  await pool.close();
  pool = await Pool.open('tiny', [keep(dev)]);
  await assertPoolOk(pool, 'reopen after ENOSPC');
  const got = await readVolume(pool, 'b');
  if (!got.equals(bData)) assert.fail(describeDiff('after reopen: b', bData, got));
  await pool.close();
});
