/**
 * The event-loop figures a node reports: a loop held up is seen in the
 * window it happened in, logged as a stall, and counted since start.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { LoopDelayMonitor, LoopDelaySpan, LOOP_STALL_WARN_MS } from '../../src/util/loop-delay.js';

function busy(ms: number): void {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    /* hold the loop */
  }
}

const turn = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

test('a loop held past the warning threshold is reported in its window, logged once, and kept as the worst', { timeout: 10_000 }, async () => {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({ write: (chunk: Buffer, _e, cb) => (lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>), cb()) });
  const monitor = new LoopDelayMonitor(pino(sink), 300);
  const span = new LoopDelaySpan();
  try {
    await turn(50);
    busy(LOOP_STALL_WARN_MS + 100);
    await turn(700); // the window with the stall, and one more
    const s = monitor.status();
    assert.ok(s.worstMaxMs >= LOOP_STALL_WARN_MS, JSON.stringify(s));
    assert.ok(s.stallWindows >= 1);
    assert.ok(s.last.samples > 0);
    const stalls = lines.filter((l) => l.event === 'event-loop-stall');
    assert.equal(stalls.length, s.stallWindows);
    assert.ok((stalls[0].maxMs as number) >= LOOP_STALL_WARN_MS);
    span.stop();
    const f = span.figures();
    assert.ok(f.maxMs >= LOOP_STALL_WARN_MS && f.samples > 0, JSON.stringify(f));
    await turn(50);
    assert.deepEqual(span.figures(), f, 'a stopped span keeps its figures');
  } finally {
    monitor.stop();
    span.stop();
  }
});
