/**
 * Property tests for ByteQueue: whatever the chunking of the bytes pushed and
 * whatever sequence of take / skip / contiguous the reader performs, the bytes
 * seen are those of the flat string, and views handed out earlier stay intact.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ByteQueue } from '../../src/nbd/bytequeue.js';

type Op = { kind: 'take' | 'skip' | 'contiguous' | 'push'; n: number };

/** Split `flat` at the given cut points (sorted, deduplicated) into chunks; empty chunks allowed. */
function split(flat: Uint8Array, cuts: number[], empties: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (flat.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of points) {
    out.push(Buffer.from(flat.subarray(prev, p)));
    prev = p;
  }
  out.push(Buffer.from(flat.subarray(prev)));
  // Sprinkle zero-length chunks (push must ignore them).
  for (const e of empties) out.splice(e % (out.length + 1), 0, Buffer.alloc(0));
  return out;
}

const opArb: fc.Arbitrary<Op> = fc.record({
  kind: fc.constantFrom<Op['kind']>('take', 'skip', 'contiguous', 'push'),
  n: fc.nat({ max: 300 }),
});

test('ByteQueue: any chunking and any take/skip/contiguous sequence sees the flat bytes', () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: 0, maxLength: 600 }),
      fc.array(fc.nat(), { maxLength: 40 }),
      fc.array(fc.nat(), { maxLength: 5 }),
      fc.array(opArb, { maxLength: 80 }),
      (flat, cuts, empties, ops) => {
        const chunks = split(flat, cuts, empties);
        const q = new ByteQueue();
        let pushed = 0; // chunks pushed so far
        let pushedBytes = 0;
        let pos = 0; // read position in flat
        const handedOut: { view: Buffer; at: number }[] = [];
        const pushOne = (): void => {
          const c = chunks[pushed++];
          q.push(c);
          pushedBytes += c.length;
        };
        // Start with one chunk queued (if any).
        if (chunks.length) pushOne();

        for (const op of ops) {
          assert.equal(q.length, pushedBytes - pos, 'length is bytes pushed minus bytes consumed');
          if (op.kind === 'push') {
            if (pushed < chunks.length) pushOne();
            continue;
          }
          const avail = q.length;
          const n = avail === 0 ? 0 : op.n % (avail + 1);
          if (op.kind === 'take') {
            const got = q.take(n);
            assert.equal(got.length, n);
            assert.deepEqual(Buffer.from(got), Buffer.from(flat.subarray(pos, pos + n)));
            handedOut.push({ view: got, at: pos });
            pos += n;
          } else if (op.kind === 'skip') {
            q.skip(n);
            pos += n;
          } else {
            // contiguous(n) requires n <= length; n = 0 on an empty queue is covered by a separate test.
            if (avail === 0) continue;
            const m = Math.max(1, n);
            const [buf, at] = q.contiguous(m);
            assert.ok(at >= 0 && at + m <= buf.length, 'contiguous range lies inside the returned buffer');
            assert.deepEqual(Buffer.from(buf.subarray(at, at + m)), Buffer.from(flat.subarray(pos, pos + m)));
            assert.equal(q.length, avail, 'contiguous does not consume');
          }
        }
        // Drain the rest in one take and compare.
        while (pushed < chunks.length) pushOne();
        const rest = q.take(q.length);
        assert.deepEqual(Buffer.from(rest), Buffer.from(flat.subarray(pos)));
        handedOut.push({ view: rest, at: pos });
        assert.equal(q.length, 0);
        // Earlier views are not clobbered by later merges / skips.
        for (const h of handedOut) {
          assert.deepEqual(Buffer.from(h.view), Buffer.from(flat.subarray(h.at, h.at + h.view.length)));
        }
      },
    ),
    { numRuns: 500 },
  );
});

test('ByteQueue: reading a request-sized header across many 1-byte chunks', () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 28, maxLength: 100 }), fc.nat({ max: 27 }), (flat, split1) => {
      const q = new ByteQueue();
      for (let i = 0; i < flat.length; i++) q.push(Buffer.from(flat.subarray(i, i + 1)));
      q.skip(split1);
      const [buf, at] = q.contiguous(28 - split1 > 0 ? 28 - split1 : 1);
      assert.equal(buf[at], flat[split1]);
      const all = q.take(q.length);
      assert.deepEqual(Buffer.from(all), Buffer.from(flat.subarray(split1)));
    }),
    { numRuns: 200 },
  );
});

test('ByteQueue: take(0) and skip(0) on an empty queue work', () => {
  const q = new ByteQueue();
  const z = q.take(0);
  assert.equal(z.length, 0);
  q.skip(0);
  assert.equal(q.length, 0);
  q.push(Buffer.alloc(0));
  assert.equal(q.length, 0);
  assert.equal(q.take(0).length, 0);
  q.push(Buffer.from([1, 2, 3]));
  assert.equal(q.take(0).length, 0);
  assert.equal(q.length, 3);
  assert.deepEqual([...q.take(3)], [1, 2, 3]);
  assert.equal(q.take(0).length, 0);
  q.clear();
  assert.equal(q.length, 0);
  q.push(Buffer.from([9]));
  assert.deepEqual([...q.take(1)], [9]);
});

test('ByteQueue: contiguous(0) on an empty queue', () => {
  const q = new ByteQueue();
  const [buf, at] = q.contiguous(0);
  assert.ok(at <= buf.length);
});
