/**
 * The checkpoint encoded a slice at a time: the same stream as encoded at
 * once, reading back to the same maps; and while it is encoded the pool
 * stays quiesced and alone (Gate.alone): an admin operation's section
 * waits for it, data writes stay out.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { deserializeCheckpoint, serializeCheckpoint, serializeCheckpointInSlices, type CheckpointState } from '../../src/volume/checkpoint.js';
import type { VolumeRecord } from '../../src/volume/format.js';
import { Gate } from '../../src/volume/quiesce.js';
import { levelsFor, lookup, setEntry, shareRoot, type ChunkRefs, type ThinRoot } from '../../src/volume/thinmap.js';
import { macrotick } from './helpers.js';

const refs: ChunkRefs = { incref() {}, decref() {}, nodeCreated() {}, nodeFreed() {} };

function record(id: number): VolumeRecord {
  return { id, name: `v${id}`, uuid: `u${id}`, sizeBytes: 1, readOnly: false, snapshot: false, createdAt: '2026-01-01T00:00:00.000Z' };
}

test('checkpoint: the stream encoded in slices is the one encoded at once, and reads back to the same maps (shared nodes once)', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 2 ** 24 }),
      fc.array(fc.record({ at: fc.double({ min: 0, max: 1, noNaN: true }), run: fc.integer({ min: 1, max: 3000 }), snapshot: fc.boolean() }), { minLength: 1, maxLength: 12 }),
      async (chunks, writes) => {
        const roots: ThinRoot[] = [{ node: undefined, levels: levelsFor(chunks) }];
        let value = 1;
        for (const w of writes) {
          const from = Math.floor(w.at * chunks);
          for (let v = from; v < Math.min(chunks, from + w.run); v += 1 + (value % 3)) setEntry(roots[0], v, value++, refs);
          if (w.snapshot) roots.push(shareRoot(roots[0]));
        }
        const state: CheckpointState = { nextVolumeId: roots.length + 1, volumes: roots.map((root, i) => ({ record: record(i + 1), root })) };
        const once = serializeCheckpoint(state);
        const sliced = Buffer.concat(await serializeCheckpointInSlices(state));
        assert.ok(sliced.equals(once), 'same bytes');
        const back = deserializeCheckpoint(once);
        assert.equal(back.volumes.length, roots.length);
        for (const [i, root] of roots.entries()) {
          for (let probe = 0; probe < 200; probe++) {
            const v = Math.floor(((probe * 7919) % 200) / 200 * chunks);
            assert.equal(lookup(back.volumes[i].root, v), lookup(root, v));
          }
          for (const w of writes) {
            const v = Math.floor(w.at * chunks);
            assert.equal(lookup(back.volumes[i].root, v), lookup(root, v));
          }
        }
      },
    ),
    { numRuns: 60 },
  );
});

test('Gate.alone: a quiesced section that starts meanwhile waits until it is done; data writes stay out throughout', async () => {
  const gate = new Gate();
  const events: string[] = [];
  const checkpoint = gate.quiesced(() =>
    gate.alone(async () => {
      events.push('encode start');
      for (let i = 0; i < 5; i++) {
        await macrotick();
        assert.ok(gate.closed > 0, 'the gate stays closed to data writes');
      }
      events.push('encode end');
    }),
  );
  await macrotick();
  const admin = gate.quiesced(() => events.push('admin change'));
  // A data write arriving now waits for the gate to open.
  let wrote = false;
  const write = gate.closed > 0 ? gate.whenOpen().then(() => (wrote = true)) : Promise.resolve((wrote = true));
  await Promise.all([checkpoint, admin, write]);
  assert.deepEqual(events, ['encode start', 'encode end', 'admin change']);
  assert.ok(wrote);
  assert.equal(gate.closed, 0);
  await assert.rejects(gate.alone(async () => undefined), /outside a quiesced section/);
});
