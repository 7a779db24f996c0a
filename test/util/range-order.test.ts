/**
 * RangeOrder (indexed by buckets of the device) against a plain list of
 * the requests in flight: the same overlaps are found for every request,
 * ranges that span many buckets, or the whole device, included; and a
 * request waits for exactly the earlier ones it overlaps.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { RangeOrder } from '../../src/util/range-order.js';

const MiB = 1024 * 1024;

interface Req {
  offset: number;
  length: number;
  done: () => void;
  started: boolean;
  finished: boolean;
  id: number;
}

const sizes = fc.oneof(fc.integer({ min: 0, max: 64 * 1024 }), fc.integer({ min: 1, max: 20 * MiB }), fc.integer({ min: 60 * MiB, max: 400 * MiB }));

test('RangeOrder: overlaps, waits and settles agree with a plain list of requests in flight', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(
        fc.oneof(
          { arbitrary: fc.record({ op: fc.constant('run' as const), offset: fc.integer({ min: 0, max: 512 * MiB }), length: sizes }), weight: 4 },
          { arbitrary: fc.record({ op: fc.constant('finish' as const), pick: fc.nat() }), weight: 1 },
          { arbitrary: fc.record({ op: fc.constant('query' as const), offset: fc.integer({ min: 0, max: 512 * MiB }), length: sizes }), weight: 3 },
        ),
        { minLength: 10, maxLength: 120, size: 'max' },
      ),
      async (ops) => {
        const order = new RangeOrder();
        const reqs: Req[] = [];
        const early: string[] = [];
        const overlaps = (a: { offset: number; length: number }, b: { offset: number; length: number }): boolean =>
          a.offset < b.offset + Math.max(b.length, 1) && b.offset < a.offset + Math.max(a.length, 1);
        for (const o of ops) {
          if (o.op === 'run') {
            const id = reqs.length;
            const waitsFor = reqs.filter((r) => !r.finished && overlaps(r, o));
            let done!: () => void;
            const finished = new Promise<void>((resolve) => (done = resolve));
            const req: Req = { offset: o.offset, length: o.length, done, started: false, finished: false, id };
            reqs.push(req);
            void order.run(o.offset, o.length, () => {
              for (const w of waitsFor) if (!w.finished) early.push(`request ${id} started before ${w.id}, which it overlaps, finished`);
              req.started = true;
              return finished;
            });
          } else if (o.op === 'finish') {
            const started = reqs.filter((r) => r.started && !r.finished);
            if (started.length === 0) continue;
            const r = started[o.pick % started.length];
            r.finished = true;
            r.done();
          } else {
            const want = reqs
              .filter((r) => !r.finished && overlaps(r, o))
              .map((r): [number, number] => [r.offset, r.offset + Math.max(r.length, 1)])
              .sort((a, b) => a[0] - b[0] || a[1] - b[1]);
            const got = order.overlapping(o.offset, o.length).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
            // Finished requests leave the index a few microtasks later: let them.
            if (got.length !== want.length) await new Promise((resolve) => setImmediate(resolve));
            assert.deepEqual(order.overlapping(o.offset, o.length).sort((a, b) => a[0] - b[0] || a[1] - b[1]), want);
            assert.equal(order.settled(o.offset, o.length) === undefined, want.length === 0);
          }
          await new Promise((resolve) => setImmediate(resolve));
        }
        // Everything ends: each request, once the ones it waits for are done.
        for (;;) {
          const open = reqs.filter((r) => !r.finished);
          if (open.length === 0) break;
          const r = open.find((x) => x.started);
          assert.ok(r, 'some request in flight has started');
          r.finished = true;
          r.done();
          await new Promise((resolve) => setImmediate(resolve));
        }
        await order.barrier();
        assert.equal(order.size, 0);
        assert.deepEqual(early, []);
      },
    ),
    { numRuns: 300 },
  );
});

test('a request is out of the index by the time its caller resumes: the next one to its range runs at once', async () => {
  const order = new RangeOrder();
  let finish!: () => void;
  const first = order.run(0, 4096, () => new Promise<void>((resolve) => (finish = resolve)));
  assert.ok(first instanceof Promise);
  finish();
  await first;
  assert.equal(order.size, 0);
  let ran = false;
  const next = order.run(0, 4096, () => {
    ran = true;
  });
  assert.equal(ran, true, 'not held behind a request already done');
  assert.equal(next, undefined);
});
