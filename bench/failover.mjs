#!/usr/bin/env node
// bench/failover.mjs - the failover breakdown, measured (not asserted): two nodes in network
// namespaces (test/failover/netns-harness.ts), the witness beside them, N demo guests (128 MiB, TCG
// here) all preferring alpha. Each round kills alpha's whole namespace (switch port down, SIGKILL to
// its daemon and QEMUs) and reads bravo's event log for the time from the kill to:
//   detect    node-lost (declared dead at the witness)
//   fence     takeover-start (after selfFence) -> storage-fenced
//   promote   takeover-promoted (the last resource)
//   export    pool-open (the last pool)
//   vm first  the first vm-started
//   vm last   the last vm-started
//   line      each guest's first console line on bravo (polled every 50 ms)
// then brings alpha back (node rejoin alpha: the VMs go home live) for the next round.
//
// usage: sudo node bench/failover.mjs [--vms 1,4] [--rounds 5]
// Needs `npm run build`, root (namespaces), qemu-system-x86_64, python3-aiosmtpd.
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import fs from 'node:fs';
import os from 'node:os';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const { NsCluster } = await import(path.join(ROOT, 'dist/test/failover/netns-harness.js'));
const { buildDemoGuest, DEMO_GUEST_APPEND } = await import(path.join(ROOT, 'dist/src/vm/demo-guest.js'));

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const counts = opt('--vms', '1,4').split(',').map(Number);
const rounds = Number(opt('--rounds', '5'));
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

async function one(n) {
  const cleanups = [];
  const t = { after: (fn) => cleanups.push(fn) };
  const guestDir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-bench-guest-'));
  cleanups.push(() => fs.rmSync(guestDir, { recursive: true, force: true }));
  try {
    const guest = await buildDemoGuest(guestDir);
    const names = Array.from({ length: n }, (_, i) => `vm${i + 1}`);
    const c = await NsCluster.create(t, {
      extra: ['vms:', ...names.map((v, i) => `  ${v}: { disks: [pa/${v}], memory: 128M, prefer: alpha, priority: ${n - i}, boot: { kernel: ${guest.kernel}, initrd: ${guest.initrd}, append: "${DEMO_GUEST_APPEND}" } }`)],
    });
    await c.createMd();
    await c.startWitness();
    await c.startSmtp();
    await c.start('alpha');
    await c.start('bravo');
    await c.until(async () => (await c.resources('alpha')).resources.every((r) => r.disk === 'UpToDate' && r.peers[0]?.disk === 'UpToDate' && r.peers[0].outOfSyncBytes === 0), 120_000, 'the initial sync');
    for (const v of names) {
      const r = await c.duet('alpha', ['vol', 'create', `pa/${v}`, '--size', '16M']);
      if (r.code !== 0) throw new Error(r.describe());
    }
    const rows = [];
    for (let round = 1; round <= rounds; round++) {
      await c.until(async () => (await c.vms('bravo')).filter((v) => v.node === 'alpha' && v.state === 'running').length === n, 180_000, `${n} VMs on alpha`);
      await sleep(3000);
      const boots = Object.fromEntries(names.map((v) => [v, (c.consoleFile('bravo', v).match(/duet-guest boot_id=/g) ?? []).length]));
      const killedAt = await c.killNode('alpha');
      const line = {};
      await c.until(
        () => {
          for (const v of names) if (line[v] === undefined && (c.consoleFile('bravo', v).match(/duet-guest boot_id=/g) ?? []).length > boots[v]) line[v] = Date.now() - killedAt;
          return names.every((v) => line[v] !== undefined);
        },
        120_000,
        'every guest booting on bravo',
        50,
      );
      const ev = c.events('bravo').filter((e) => Date.parse(e.time) >= killedAt);
      const at = (name, pick = 'first') => {
        const xs = ev.filter((e) => e.event === name).map((e) => Date.parse(e.time) - killedAt);
        return xs.length === 0 ? NaN : pick === 'first' ? Math.min(...xs) : Math.max(...xs);
      };
      const row = {
        detect: at('node-lost'),
        fence: at('takeover-start'),
        promote: at('takeover-promoted', 'last'),
        export: at('pool-open', 'last'),
        vmFirst: at('vm-started'),
        vmLast: at('vm-started', 'last'),
        lineFirst: Math.min(...Object.values(line)),
        lineLast: Math.max(...Object.values(line)),
      };
      rows.push(row);
      process.stdout.write(`${n} VMs, round ${round}: ${JSON.stringify(row)}\n`);
      await c.heal('alpha');
      await c.start('alpha');
      const r = await c.duet('bravo', ['node', 'rejoin', 'alpha'], 600_000);
      if (r.code !== 0) throw new Error(r.describe());
    }
    const keys = Object.keys(rows[0]);
    const med = Object.fromEntries(keys.map((k) => [k, median(rows.map((r) => r[k]))]));
    process.stdout.write(`${n} VMs, median of ${rounds} (ms from the kill): ${JSON.stringify(med)}\n`);
    return med;
  } finally {
    for (const fn of cleanups.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  }
}

const results = {};
for (const n of counts) results[n] = await one(n);
process.stdout.write(`\n| VMs | detect | fence | promote | export | first VM started | last VM started | first guest line | last guest line |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n`);
for (const [n, m] of Object.entries(results)) process.stdout.write(`| ${n} | ${m.detect} | ${m.fence} | ${m.promote} | ${m.export} | ${m.vmFirst} | ${m.vmLast} | ${m.lineFirst} | ${m.lineLast} |\n`);
