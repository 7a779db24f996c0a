/**
 * The deterministic simulation of a replicated pair (test/replication/sim/):
 * real Resources, PeerSessions, resyncs, activity logs and bitmaps on a
 * fake clock, over a simulated network, on disks that lose their cache in a
 * power cut. The same seed is the same run, event for event.
 *
 * - seeded runs: DUET_SIM_SEEDS=N (default 300) seeds from DUET_SIM_FROM
 *   (default 1); DUET_SIM_SEED=S (or S,T,...) runs those only. A failing
 *   seed prints its schedule; `npm run sim -- --seed S` replays it.
 * - seeds that fail on a known, not yet fixed bug (sim/known-bugs.ts) are
 *   reported as TODO, not as failures;
 * - scripted scenarios for bugs the simulator found, so they stay fixed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FIXED_BUGS, knownBug, KNOWN_BUGS } from './sim/known-bugs.js';
import { Driver, runSeed, SeedResult } from './sim/run.js';
import type { World } from './sim/world.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function seeds(): number[] {
  const only = process.env.DUET_SIM_SEED;
  if (only) return only.split(',').map((x) => Number(x.trim()));
  const n = Number(process.env.DUET_SIM_SEEDS ?? 300);
  const from = Number(process.env.DUET_SIM_FROM ?? 1);
  return Array.from({ length: n }, (_, i) => from + i);
}

function failure(r: SeedResult): string {
  return [
    `seed ${r.seed} (${r.config}) — replay: npm run sim -- --seed ${r.seed}`,
    ...r.violations.map((v) => `  violation: ${v}`),
    '  schedule (last 40):',
    ...r.trace.slice(-40).map((t) => `    ${t}`),
    '  log (last 20):',
    ...r.logTail.slice(-20).map((t) => `    ${t}`),
  ].join('\n');
}

test('seeded simulation: writes, flushes, link cuts, power cuts, crashes, promotions, failback, EIO, split brains, verify; healed, both disks identical and holding what was promised', async (t) => {
  const started = performance.now();
  const failed: SeedResult[] = [];
  const known = new Map<string, number[]>();
  let events = 0;
  let fake = 0;
  const totals: Record<string, number> = {};
  for (const seed of seeds()) {
    const r = await runSeed({ seed });
    events += r.events;
    fake += r.fakeMs;
    for (const [k, v] of Object.entries(r.stats)) totals[k] = (totals[k] ?? 0) + v;
    if (r.ok) continue;
    const bug = knownBug(r);
    if (bug) known.set(bug.id, [...(known.get(bug.id) ?? []), seed]);
    else failed.push(r);
    if (failed.length >= 3) break;
  }
  const ms = performance.now() - started;
  const n = seeds().length;
  t.diagnostic(`${n} seeds in ${(ms / 1000).toFixed(1)} s (${(ms / n).toFixed(0)} ms per seed), ${events} events, ${(fake / 1000).toFixed(0)} s of simulated time`);
  t.diagnostic(`totals: ${JSON.stringify(totals)}`);
  for (const [id, s] of known) t.diagnostic(`known bug ${id} (not fixed yet): seeds ${s.join(', ')}`);
  assert.equal(failed.length, 0, `${failed.length} seed(s) failed:\n${failed.map(failure).join('\n\n')}`);
  assert.ok(totals.powerCuts > 0 && totals.resyncs > n && totals.splitBrains > 0, 'the schedules did cut power, resync and split brains');
});

for (const bug of KNOWN_BUGS) {
  test(`known bug, not fixed yet: ${bug.title}`, { todo: bug.diagnosis }, async () => {
    for (const seed of bug.seeds) {
      const r = await runSeed({ seed });
      assert.ok(r.ok, failure(r));
    }
  });
}

test('the seeds that found fixed bugs run clean', async () => {
  const failed: SeedResult[] = [];
  for (const bug of FIXED_BUGS) {
    for (const seed of bug.seeds) {
      const r = await runSeed({ seed });
      if (!r.ok) failed.push(r);
    }
  }
  assert.equal(failed.length, 0, `${failed.length} seed(s) failed:\n${failed.map(failure).join('\n\n')}`);
});

test('the same seed is the same run', async () => {
  for (const seed of [3, 46, 118]) {
    const a = await runSeed({ seed });
    const b = await runSeed({ seed });
    assert.equal(a.fingerprint, b.fingerprint, `seed ${seed} ran differently twice`);
    assert.equal(a.events, b.events);
    assert.deepEqual(a.trace, b.trace);
  }
});

/**
 * Run `body` as on a loaded machine, without waiting for one: the process's
 * real clocks race ahead (10 ms more at every reading) and the event loop
 * stalls now and then between turns. Code that reads real time, or waits
 * for it, behaves as it would under heavy load every time.
 */
async function underLoad<T>(body: () => Promise<T>): Promise<T> {
  const perfNow = performance.now;
  const dateNow = Date.now;
  let ahead = 0;
  performance.now = () => perfNow.call(performance) + (ahead += 10);
  Date.now = () => dateNow() + (ahead += 10);
  const stalls = setInterval(() => {
    const until = perfNow.call(performance) + 1;
    while (perfNow.call(performance) < until);
  }, 5);
  try {
    return await body();
  } finally {
    clearInterval(stalls);
    performance.now = perfNow;
    Date.now = dateNow;
  }
}

test('the same seed is the same run on a loaded machine: real time passing fast (slices of work yielding to the event loop, stalls between turns) changes nothing in a run', async () => {
  // Seeds with crashes of a Primary (its recovery writes the bitmap back), split-brain saves, a witness, resyncs.
  for (const seed of [2, 3, 11, 24]) {
    const quiet = await runSeed({ seed });
    const loaded = await underLoad(() => runSeed({ seed }));
    const at = quiet.trace.findIndex((line, i) => line !== loaded.trace[i]);
    assert.equal(loaded.fingerprint, quiet.fingerprint, `seed ${seed} ran differently under load${at >= 0 ? `; first difference in the schedule: ${quiet.trace[at]} / ${loaded.trace[at]}` : ''}`);
    assert.equal(loaded.events, quiet.events);
  }
});

/* ------------------------------------------------- scripted scenarios */

async function scenario(seed: number, config: Parameters<typeof runSeed>[0]['config'], body: (d: Driver, w: World) => Promise<void>): Promise<void> {
  const r = await runSeed({ seed, config, scenario: body });
  assert.ok(r.ok, failure(r));
}

test('both nodes lose power after an extent left the Primary\'s activity log: the write to it, cached on the Secondary, is not lost there silently', async () => {
  for (const seed of [1, 2, 3, 4]) {
    await scenario(seed, { resource: { protocol: 'C', alSlots: 2 } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      const app = p.proc!.app!;
      // Acknowledged (protocol C: on the Secondary's disk, in its cache), never flushed by the application.
      app.write('data', 4 * KiB, 8 * KiB, false);
      await d.bounded(app.quiet(), 5000, 'the first write');
      // Two more extents: extent 0 leaves the two-slot activity log.
      app.write('data', 4 * MiB, 4 * KiB, false);
      app.write('data', 8 * MiB, 4 * KiB, false);
      await d.bounded(app.quiet(), 5000, 'the next writes');
      assert.ok(!p.r!.al.hotExtents.includes(0));
      // A power failure takes both machines; their caches are lost.
      for (const n of [p, s]) {
        w.kill(n, 'power');
        await n.hw.powerCut({ keep: 'none' });
        n.hw.powerOn();
      }
      await d.heal();
    });
  }
});

test('a resync source sends only what its own disk keeps: writes it received as Secondary and never flushed are made durable before it sends them (sim seed 7017)', async () => {
  // Seeds whose resync window reaches the write's blocks before the source needs an acknowledgement back.
  for (const seed of [1, 3, 4, 5]) {
    await scenario(seed, { resource: { protocol: 'C' }, link: { pingIntervalMs: 200, pingTimeoutMs: 3000 } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      // Acknowledged (protocol C: in the Secondary's cache), never flushed.
      const app = p.proc!.app!;
      app.write('data', 8 * MiB, 64 * KiB, false);
      await d.bounded(app.quiet(), 5000, 'the write');
      // The Primary loses power (its cache too); the Secondary is promoted and goes on alone.
      w.kill(p, 'power');
      await p.hw.powerCut({ keep: 'none' });
      p.hw.powerOn();
      assert.ok(await d.waitFor(() => !s.r!.peer, 5000), 'the Secondary noticed');
      assert.ok(await d.promote(s, true), 'promoted');
      // The old Primary comes back: its hot extents (the write's among them) resync from the new Primary,
      // which reads them from its cache.
      // The target's answers never reach the source (a long ping timeout: the link stays up meanwhile, whatever
      // the source's flush before the resync takes): the source does not finish (which writes its bitmap,
      // and flushes) while the target writes everything and clears its marks.
      w.decisionHook = (n, action) => {
        // Once the source decided (the target's handshake is all in), before any resync data.
        if (n === s && action.kind === 'sync' && action.direction === 'source') w.net.partition(p.name, s.name, true);
      };
      await d.start(p);
      const written = (): boolean => {
        for (let b = (8 * MiB) / 4096; b < (8 * MiB + 64 * KiB) / 4096; b++) if (p.r!.bitmap.isMarked(b)) return false;
        return true;
      };
      assert.ok(await d.waitFor(() => p.r?.peer?.phase === 'sync-target' && written(), 10_000), `the target has the write's blocks: ${w.describe()}`);
      w.decisionHook = undefined;
      w.net.partition(p.name, s.name);
      // Now the new Primary loses power, cache and all. If the resync sent data its own disk did not keep,
      // the two disks differ where neither bitmap says so, and healing cannot find it.
      w.kill(s, 'power');
      await s.hw.powerCut({ keep: 'none' });
      s.hw.powerOn();
      await d.heal();
    });
  }
});

test('a split-brain resolution whose target dies before its resync began: its disk still holds its own branch, so keeping that node later keeps it (sim seeds 5088, 6652: the model took the target for the source\'s data)', async () => {
  // Seeds where the target decides first (its source then records nothing either) and only it took the
  // admin's first --keep (so the next verdict is the bare split brain, not that resolution again).
  for (const seed of [7, 15, 18, 20]) {
    await scenario(seed, { witness: false, resource: { protocol: 'C', afterSplitBrain: 'disconnect' } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      // Apart, both write, flushed: a split brain.
      w.net.partition(p.name, s.name);
      assert.ok(await d.waitFor(() => !p.r!.peer && !s.r!.peer, 5000), 'both noticed the cut');
      p.proc!.app!.write('data', 0, 64 * KiB, true);
      assert.ok(await d.promote(s, false), 'promoted without its peer');
      s.proc!.app!.write('data', 1 * MiB, 64 * KiB, true);
      await d.bounded(Promise.all([p.proc!.app!.quiet(), s.proc!.app!.quiet()]), 5000, 'the writes');
      await d.demote(s);
      // The admin keeps p's data; s dies just after it decided to be the target, before its resync began, and
      // what it sent last never reaches p (which decides nothing).
      let died = false;
      w.decisionHook = (n, action) => {
        if (n !== s || died || action.kind !== 'sync' || action.direction !== 'target') return;
        died = true;
        w.net.partition(s.name, p.name, true);
        void d.sleep(0).then(() => w.kill(s, 'crash'));
      };
      await d.resolve(p);
      w.net.healAll();
      assert.ok(await d.waitFor(() => died && !s.r, 5000), `s decided to be the target and died: ${w.describe()}`);
      assert.ok(await d.waitFor(() => !p.r!.peer, 5000), 'p noticed');
      w.net.healAll();
      // Nothing of its disk changed: back up, it meets p in the same split brain (p recorded nothing either).
      const rules: string[] = [];
      w.decisionHook = (n, action) => {
        if (n === s) rules.push(String((action as { rule?: string }).rule));
      };
      await d.start(s);
      assert.ok(await d.waitFor(() => rules.length > 0, 5000), 's decided again');
      // Rule 90 where neither side recorded the resolution's start; rule 92 where p did (a seed's timing decides).
      assert.match(rules[0], /^9[02]\//, 'still the split brain (rule 90 or 92)');
      w.decisionHook = undefined;
      // Now the admin keeps s's data after all: what p wrote apart is discarded, what s wrote stays.
      await d.demote(p);
      await d.resolve(s);
      await d.heal();
    });
  }
});

test('a node whose resync as target has just begun is not promoted (it would be Primary and SyncTarget)', async () => {
  for (const seed of [1, 2, 3, 4]) {
    await scenario(seed, { resource: { protocol: 'C' } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      await d.demote(p);
      // The Secondary misses some writes while apart, then comes back as sync target.
      w.net.partition(p.name, s.name);
      await d.waitFor(() => !p.r!.peer && !s.r!.peer, 5000);
      await d.promote(p, false);
      p.proc!.app!.write('data', 0, 64 * KiB, true);
      await d.bounded(p.proc!.app!.quiet(), 5000, 'the write');
      await d.demote(p);
      // The admin promotes it the moment it decides to be the target, before its disk is marked Inconsistent.
      let promoting: Promise<boolean> | undefined;
      w.decisionHook = (n, action) => {
        if (n === s && action.kind === 'sync' && action.direction === 'target') promoting ??= d.promote(s, false);
      };
      w.net.healAll();
      assert.ok(await d.waitFor(() => promoting !== undefined, 5000), 'the resync began');
      assert.equal(await promoting, false, 'promoted while SyncTarget');
      await d.heal();
    });
  }
});

test('a write on the Primary while a new link is in its handshake: both sides decide alike (no protocol error, no second connection)', async () => {
  for (const seed of [5, 6, 7]) {
    await scenario(seed, {}, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      w.net.partition(p.name, s.name);
      await d.waitFor(() => !p.r!.peer && !s.r!.peer, 5000);
      const before = w.stats.connections;
      let wrote = false;
      w.linkHook = () => {
        if (wrote) return;
        wrote = true;
        assert.equal(p.r!.peer?.phase, 'handshake');
        p.proc!.app!.write('data', 3 * MiB, 8 * KiB, false);
      };
      w.net.healAll();
      assert.ok(await d.waitFor(() => w.inSync(), 10_000), `in sync again: ${w.describe()}`);
      assert.ok(wrote);
      assert.equal(w.stats.connections, before + 1, 'the link stayed up: both sides made the same decision');
      await d.heal();
    });
  }
});

test('resync of a range that was a hole when checked but written before its zero frame left: the write is not undone on the target', async () => {
  for (const seed of [6, 8]) {
    await scenario(seed, {}, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      w.net.partition(p.name, s.name);
      await d.waitFor(() => !p.r!.peer && !s.r!.peer, 5000);
      // Written then trimmed while apart: marked, and a hole on the Primary's disk.
      const Z = 5 * MiB;
      const app = p.proc!.app!;
      app.write('data', Z, 128 * KiB, false);
      app.write('trim', Z, 128 * KiB, false);
      await d.bounded(app.quiet(), 5000, 'the writes');
      // The resync asks whether the range is a hole: yes, but the answer is held...
      let release: (() => void) | undefined;
      const disk = p.proc!.disk;
      disk.blockStatusHook = (offset, length) => {
        if (release || offset > Z || offset + length <= Z) return undefined;
        return new Promise<void>((r) => (release = r));
      };
      w.net.healAll();
      assert.ok(await d.waitFor(() => release !== undefined, 5000), 'the resync checked the range');
      assert.equal(p.r!.peer?.phase, 'sync-source');
      // ...and meanwhile the application writes there (replicated: the target has it when this is acknowledged).
      app.write('data', Z + 8 * KiB, 4 * KiB, true);
      await d.bounded(app.quiet(), 5000, 'the write during the resync');
      disk.blockStatusHook = undefined;
      release!();
      await d.heal();
    });
  }
});

test('with a witness, a Primary that loses its peer and the witness with writes in flight: the failed fence fails those writes, it does not crash the node (unhandled rejection)', async () => {
  for (const [seed, onNoQuorum] of [
    [1, 'error'],
    [2, 'error'],
    [3, 'suspend'],
    [4, 'suspend'],
  ] as const) {
    await scenario(seed, { witness: true, onNoQuorum, resource: { protocol: 'C' } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      w.net.partition(p.name, 'witness');
      w.net.partition(p.name, s.name);
      // In flight when the link goes: marked, and a new generation needs a fence nobody answers.
      for (let i = 0; i < 4; i++) p.proc!.app!.write('data', i * MiB, 64 * KiB, false);
      await d.waitFor(() => !p.r!.peer, 5000);
      await d.sleep(3000);
      // The admin steps it down (held writes fail) and repairs everything.
      if (p.r!.role === 'Primary') await d.demote(p);
      await d.heal();
    });
  }
});

test('with a witness, resource secondary --force on a Primary holding writes: a write that was waiting for an activity-log slot then fails too, it does not start a new fence and hold the step-down', async () => {
  for (const seed of [1, 2, 3, 4]) {
    await scenario(seed, { witness: true, onNoQuorum: 'suspend', resource: { protocol: 'C', alSlots: 2 } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      w.net.partition(p.name, 'witness');
      w.net.partition(p.name, s.name);
      await d.waitFor(() => !p.r!.peer, 5000);
      // Writes without the peer to four extents: two take the log's two slots and wait for a fence nobody
      // answers (held, their extents busy); the other two wait for a slot.
      for (let e = 0; e < 4; e++) p.proc!.app!.write('data', e * 4 * MiB, 4 * KiB, false);
      await d.waitFor(() => p.r!.holding, 5000);
      await d.demote(p);
      assert.equal(p.r!.role, 'Secondary');
      await d.heal();
    });
  }
});

test('a promotion that waits for the witness does not make a second Primary when the link to the Primary comes up meanwhile', async () => {
  for (const seed of [1, 2, 3, 4]) {
    await scenario(seed, { witness: true, resource: { protocol: 'C' } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      w.net.partition(s.name, p.name);
      w.net.partition(s.name, 'witness');
      await d.waitFor(() => !p.r!.peer && !s.r!.peer, 5000);
      // The admin forces the cut-off node while it cannot reach the witness (the call times out after 1 s)...
      const promoting = d.promote(s, true);
      // ...and the link to the Primary comes back before that.
      w.net.heal(s.name, p.name);
      await promoting;
      assert.ok(await d.waitFor(() => w.inSync(), 5000), w.describe());
      await d.heal();
    });
  }
});

/**
 * The Primary writes while apart from its peer, then the link heals: a bitmap resync from the Primary is
 * under way, held at its first look at the source's disk until `release`.
 */
async function resyncUnderWay(d: Driver, w: World) {
  await d.ensurePrimary();
  const p = d.primaries[0];
  const s = w.other(p);
  w.net.partition(p.name, s.name);
  await d.waitFor(() => !p.r!.peer && !s.r!.peer, 5000);
  // Written while apart: the Secondary (UpToDate when the link comes up) becomes the bitmap resync's target.
  const app = p.proc!.app!;
  app.write('data', 2 * MiB, 256 * KiB, false);
  await d.bounded(app.quiet(), 5000, 'the write while apart');
  let held: (() => void) | undefined;
  const disk = p.proc!.disk;
  disk.blockStatusHook = () => {
    if (held) return undefined;
    return new Promise<void>((r) => (held = r));
  };
  w.net.healAll();
  assert.ok(await d.waitFor(() => held !== undefined, 5000), 'the resync began');
  return { p, s, app, disk, release: () => held!() };
}

test('a sync source whose disk fails during the resync: its writes are refused (the target is Inconsistent, whatever it said when the link came up), not acknowledged from a disk nobody resyncs', async () => {
  for (const seed of [1, 2, 3, 4]) {
    await scenario(seed, { resource: { protocol: 'C' } }, async (d, w) => {
      const { p, s, app, disk, release } = await resyncUnderWay(d, w);
      assert.equal(p.r!.peer?.phase, 'sync-source');
      assert.equal(s.r!.disk, 'Inconsistent');
      // The Primary's disk fails: it goes Diskless, and its peer's disk holds no good copy.
      p.fail({ op: '*', code: 'EIO' });
      const failed = app.stats.failed;
      app.write('data', 6 * MiB, 64 * KiB, false);
      await d.bounded(app.quiet(), 5000, 'the write after the disk failed');
      assert.equal(p.r!.disk, 'Diskless');
      assert.equal(app.stats.failed, failed + 1, 'a write with no good copy anywhere is refused');
      // The resync ends on both sides and the link stays (DRBD aborts a resync when either disk detaches):
      // a Diskless source would otherwise stay "sync source" for good and the pair never heal (seed 4267).
      assert.ok(await d.waitFor(() => p.r!.peer?.phase === 'connected' && s.r!.peer?.phase === 'connected', 5000), `the resync is aborted on both sides: ${w.describe()}`);
      assert.equal(s.r!.disk, 'Inconsistent');
      disk.blockStatusHook = undefined;
      release();
      await d.heal();
    });
  }
});

test('a sync target whose disk fails during the resync: the resync is aborted on both sides, the source keeps the data in a new generation and serves the Diskless peer', async () => {
  for (const seed of [1, 2, 3]) {
    await scenario(seed, { resource: { protocol: 'C' } }, async (d, w) => {
      const { p, s, app, disk, release } = await resyncUnderWay(d, w);
      assert.equal(s.r!.peer?.phase, 'sync-target');
      const before = p.r!.record.gi.current;
      // The target's disk fails on the Primary's next write.
      s.fail({ op: '*', code: 'EIO' });
      const failed = app.stats.failed;
      app.write('data', 6 * MiB, 64 * KiB, false);
      await d.bounded(app.quiet(), 5000, 'the write after the target\'s disk failed');
      assert.ok(await d.waitFor(() => s.r!.disk === 'Diskless' && p.r!.peer?.phase === 'connected' && s.r!.peer?.phase === 'connected', 5000), `the resync is aborted on both sides: ${w.describe()}`);
      assert.equal(app.stats.failed, failed, 'the source still has the good copy: the write succeeds');
      assert.ok(await d.waitFor(() => p.r!.record.gi.current !== before && p.r!.record.peerDiskFailed === true, 5000), 'the source starts a new generation and remembers the failed disk');
      disk.blockStatusHook = undefined;
      release();
      await d.heal();
    });
  }
});

test('promotions during a partition neither side has noticed yet: a node becomes Primary only with its peer\'s agreement or once the link is down, so no write of one Primary reaches the other', async () => {
  for (const seed of [1, 2, 3]) {
    await scenario(seed, { resource: { protocol: 'C' } }, async (d, w) => {
      await d.ensurePrimary();
      const [a] = d.primaries;
      const b = w.other(a);
      await d.demote(a);
      assert.ok(await d.waitFor(() => w.inSync() && a.r!.peer?.state?.role === 'Secondary' && b.r!.peer?.state?.role === 'Secondary', 5000), w.describe());
      w.net.partition(a.name, b.name);
      // Both think the other is a connected Secondary: each is promoted, its application writes at once.
      const promotions = [a, b].map(async (n) => {
        if (await d.promote(n, false)) n.proc!.app!.write('data', 2 * MiB, 8 * KiB, false);
      });
      await d.bounded(Promise.all(promotions), 10_000, 'the promotions');
      const live = (n: typeof a): boolean => n.r!.peer !== undefined && n.r!.peer.phase !== 'closed';
      assert.ok(!(a.r!.role === 'Primary' && b.r!.role === 'Primary' && (live(a) || live(b))), `both Primary over a link that is still up: ${w.describe()}`);
      w.net.healAll();
      await d.heal();
    });
  }
});

test('a node promoted during an unnoticed partition writes and loses power; its peer is promoted: the writes still in the network never reach the new Primary', async () => {
  for (const seed of [1, 2, 3]) {
    await scenario(seed, { resource: { protocol: 'C' } }, async (d, w) => {
      await d.ensurePrimary();
      const [a] = d.primaries;
      const b = w.other(a);
      await d.demote(a);
      assert.ok(await d.waitFor(() => w.inSync() && b.r!.peer?.state?.role === 'Secondary', 5000), w.describe());
      w.net.partition(a.name, b.name);
      if (await d.promote(a, false)) a.proc!.app!.write('data', 2 * MiB, 8 * KiB, false);
      await d.sleep(20);
      w.kill(a, 'power');
      await a.hw.powerCut({ keep: 'none' });
      a.hw.powerOn();
      await d.promote(b, true);
      w.net.healAll();
      await d.sleep(50);
      await d.heal();
    });
  }
});

test('with a witness, a Primary whose disk fails while its peer cannot reach the witness: the peer takes its writes only once the failed disk is outdated there, so that disk, back with its old record, is not promoted on old data without --force', async () => {
  for (const seed of [1, 2, 3]) {
    await scenario(seed, { witness: true, onNoQuorum: 'suspend', resource: { protocol: 'C' } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      w.net.partition(s.name, 'witness');
      // The Primary's disk takes no more writes (not even its Failed record): it goes on Diskless through its peer.
      p.fail({ op: 'write', code: 'EIO' });
      const app = p.proc!.app!;
      app.write('data', 2 * MiB, 64 * KiB, false);
      app.write('data', 6 * MiB, 64 * KiB, true);
      assert.ok(await d.waitFor(() => p.r!.disk === 'Diskless', 5000), w.describe());
      const before = s.r!.record.gi.current;
      // Its peer may not take them for good while the witness does not know that disk is behind.
      await d.sleep(3000);
      assert.equal(s.r!.record.peerDiskFailed, true, 'the peer remembers the failed disk at once');
      assert.equal(s.r!.record.gi.current, before, 'no generation of its own before the failed disk is outdated at the witness');
      // The Diskless Primary counts them as held: secondary --force ends them (they fail with the link).
      assert.ok(p.r!.holding, `its writes are held at its peer: ${w.describe()}`);
      const failed = app.stats.failed;
      await d.demote(p);
      assert.equal(p.r!.role, 'Secondary');
      assert.equal(app.stats.failed, failed + 2);
      // The node restarts with its disk repaired (its record still says UpToDate), cut off from its peer,
      // and is promoted: it is behind by nothing that was acknowledged (before: by what its peer took alone).
      w.kill(p, 'crash');
      p.clearFaults();
      w.net.partition(p.name, s.name);
      await d.start(p);
      await d.promote(p, false);
      w.net.healAll();
      await d.heal();
    });
  }
});

test('with a witness, a Diskless Primary whose writes do not reach its peer (the peer refuses them, or the link goes) fences nobody: the peer holds the only good copy, and a node without a disk starts no generation', async () => {
  for (const [seed, onNoQuorum] of [
    [1, 'error'],
    [2, 'error'],
    [3, 'suspend'],
    [4, 'suspend'],
  ] as const) {
    await scenario(seed, { witness: true, onNoQuorum, resource: { protocol: 'C' } }, async (d, w) => {
      await d.ensurePrimary();
      const p = d.primaries[0];
      const s = w.other(p);
      w.net.partition(s.name, 'witness');
      p.fail({ op: 'write', code: 'EIO' });
      const app = p.proc!.app!;
      app.write('data', 2 * MiB, 64 * KiB, false);
      assert.ok(await d.waitFor(() => p.r!.disk === 'Diskless', 5000), w.describe());
      const gi = p.r!.record.gi.current;
      // The peer refuses the writes (error) or holds them (suspend): its failed disk is not outdated at the witness yet.
      await d.sleep(1500);
      w.net.partition(p.name, s.name);
      assert.ok(await d.waitFor(() => !p.r!.peer && !s.r!.peer, 5000), w.describe());
      await d.bounded(app.quiet(), 5000, 'the writes');
      assert.equal(p.r!.record.gi.current, gi, 'no generation on a node without a disk');
      await d.demote(p);
      // The only good copy is not outdated at the witness: promoted without --force once it reaches it.
      w.net.heal(s.name, 'witness');
      assert.ok(await d.promote(s, false), `promoted: ${w.describe()}`);
      w.net.healAll();
      await d.heal();
    });
  }
});

test('a Diskless node whose promotion finds the link gone fences nobody: its peer, the only good copy, is not outdated at the witness', async () => {
  for (const seed of [1, 2, 3]) {
    await scenario(seed, { resource: { protocol: 'C' }, witness: true, onNoQuorum: 'suspend' }, async (d, w) => {
      await d.ensurePrimary();
      const a = d.primaries[0];
      const b = w.other(a);
      // b cannot reach the witness: its fence of a's failed disk waits (and ends with the link, unmarked).
      w.net.partition(b.name, 'witness');
      a.fail({ op: '*', code: 'EIO' });
      a.proc!.app!.write('data', 2 * MiB, 8 * KiB, false);
      assert.ok(await d.waitFor(() => a.r!.disk === 'Diskless', 5000), 'a\'s disk failed');
      // a steps down (by force: its writes are held at b for the witness); the link comes back.
      await d.demote(a);
      assert.ok(await d.waitFor(() => a.r!.role === 'Secondary' && a.r!.peer?.phase === 'connected' && b.r!.peer?.phase === 'connected' && a.r!.fencedOff === undefined, 10_000), `reconnected: ${w.describe()}`);
      const marked = (n: typeof a): boolean => w.witnessProc!.witness.handle({ cmd: 'witness.heartbeat', node: n.name, inSync: {}, generations: {} }).outdatedResources.length > 0;
      assert.ok(!marked(a) && !marked(b), 'nobody is outdated at the witness yet');
      // The admin promotes a (Diskless: it serves b's data) just as the link to b fails, unnoticed yet.
      w.net.partition(a.name, b.name);
      const promoting = a.r!.promote(false).then(
        () => 'promoted',
        (err: Error) => `refused: ${err.message}`,
      );
      const outcome = await d.bounded(promoting, 20_000, 'the promotion');
      w.note(`  promotion of the Diskless ${a.name}: ${outcome}`);
      await d.sleep(2000);
      // b reaches the witness again; the admin, seeing a Primary with no disk and no peer, promotes b instead.
      w.net.heal(b.name, 'witness');
      await d.sleep(3000);
      const bPromotion = await d.bounded(
        b.r!.promote(false).then(
          () => 'promoted',
          (err: Error) => `refused: ${err.message}`,
        ),
        20_000,
        `promoting ${b.name}`,
      );
      // a has no data at all: outdating b at the witness makes the only good copy unpromotable without --force,
      // and b's heartbeat records its own disk Outdated.
      assert.ok(
        !marked(b) && b.r!.record.disk === 'UpToDate' && bPromotion === 'promoted',
        `${a.name} (Diskless, its promotion: ${outcome}) outdated ${b.name}, the only copy of the data, at the witness: ${b.name}'s disk is ${b.r!.record.disk}, its promotion ${bPromotion}`,
      );
    });
  }
});

test('resource secondary --force on a Diskless Primary whose writes its peer holds for the witness ends them, even in the first second (before the peer says it is suspended)', async () => {
  for (const seed of [1, 2, 3]) {
    await scenario(seed, { resource: { protocol: 'C' }, witness: true, onNoQuorum: 'suspend' }, async (d, w) => {
      await d.ensurePrimary();
      const a = d.primaries[0];
      const b = w.other(a);
      w.net.partition(b.name, 'witness');
      a.fail({ op: '*', code: 'EIO' });
      a.proc!.app!.write('data', 2 * MiB, 8 * KiB, false);
      assert.ok(await d.waitFor(() => a.r!.disk === 'Diskless', 5000), 'a\'s disk failed');
      a.proc!.app!.write('data', 4 * MiB, 8 * KiB, false);
      await d.sleep(50);
      // b's first call to the witness has not timed out yet: it holds a's write but has not said "suspended".
      assert.equal(b.r!.suspended, false);
      // The admin: resource secondary --force (node.ts: fenceOff, then the pools close, then demote(true)).
      a.r!.fenceOff(`resource sim: made Secondary by force on ${a.name}: held writes fail`);
      await d.bounded(a.r!.demote(true), 10_000, `${a.name} stepping down by force while ${b.name} waits for the witness`);
      assert.equal(a.r!.role, 'Secondary');
      // The held writes end with the step-down (they fail): none stays pending on a Secondary, to be applied at b
      // (and acknowledged) whenever the witness answers.
      await d.bounded(a.proc!.app!.quiet(), 5000, `${a.name}'s writes held at ${b.name} ending after resource secondary --force`);
    });
  }
});
