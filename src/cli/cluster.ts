/**
 * `duet cluster status`, `duet events`, `duet fence test NODE`: the
 * cluster manager's view, through any node's daemon.
 */
import type { Command } from 'commander';
import type { ClusterStatus, FenceTestReport } from '../cluster/status.js';
import { formatEvent, type EventRecord } from '../cluster/events.js';
import { UserError } from '../util/errors.js';
import { followEvents } from '../api/client.js';
import { callNode, nodeTarget, requireCluster } from './cluster-client.js';
import { print } from './pool.js';
import { ProgressView, withProgress } from './progress.js';
import type { NodeStatus } from '../cluster/node.js';

export function registerCluster(program: Command): void {
  const cluster = program.command('cluster').description('the cluster as a whole: nodes, quorum, roles, VMs');
  cluster
    .command('status')
    .description('nodes (online, offline, fenced, draining), quorum and the witness, who is Primary, where each VM runs')
    .option('--json', 'machine-readable output')
    .action(async (options: { json?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const s = (await callNode(t, { cmd: 'cluster.status' }, { timeoutMs: 30_000 })) as ClusterStatus;
      print(options.json === true, s, () => formatStatus(s));
    });

  program
    .command('events')
    .description('what happened to the cluster, as this node recorded it (nodes lost, fences, failovers, resyncs, VMs)')
    .option('--follow', 'keep printing new events')
    .option('--json', 'one JSON object a line')
    .option('-n, --lines <n>', 'only the last N events', (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new UserError(`--lines ${v}: give a whole number`);
      return n;
    })
    .action(async (options: { follow?: boolean; json?: boolean; lines?: number }, cmd: Command) => {
      const t = requireCluster(cmd);
      const show = (r: EventRecord): void => {
        process.stdout.write(options.json ? `${JSON.stringify(r)}\n` : `${formatEvent(r)}\n`);
      };
      const first = (await callNode(t, options.lines !== undefined ? { cmd: 'events.list', tail: options.lines } : { cmd: 'events.list', since: 0 })) as { events: EventRecord[]; lastSeq: number };
      let since = first.lastSeq;
      for (const r of first.events) show(r);
      if (options.lines === undefined) {
        // More than one page of history: read on until the end.
        let last = first.events.at(-1)?.seq ?? first.lastSeq;
        while (last < since) {
          const more = (await callNode(t, { cmd: 'events.list', since: last })) as { events: EventRecord[]; lastSeq: number };
          if (more.events.length === 0) break;
          for (const r of more.events) show(r);
          last = more.events.at(-1)!.seq;
          since = more.lastSeq;
        }
        since = Math.max(since, last);
      }
      if (!options.follow) return;
      // New records as server-sent events; a dropped stream is picked up again where it stopped.
      let gap = false;
      await followEvents(nodeTarget(t), since, (r) => {
        if (gap) process.stderr.write(`duet: events: connected to node ${t.node} again\n`);
        gap = false;
        show(r as unknown as EventRecord);
      }, {
        onGap: (why) => {
          if (!gap) process.stderr.write(`duet: events: ${why}; trying again every second\n`);
          gap = true;
        },
      });
    });

  const node = program.commands.find((c) => c.name() === 'node') ?? program.command('node');
  node
    .command('drain')
    .description('move NODE\'s VMs (live) and Primary roles to its peer, for maintenance; it stays drained until node rejoin')
    .argument('<node>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      const t = requireCluster(cmd);
      const r = await resyncProgress(t, name, 'drain', callNode(t, { cmd: 'node.drain', node: name }, { timeoutMs: 24 * 3600_000 }) as Promise<{ message: string }>);
      process.stdout.write(`${r.message}\n`);
    });
  node
    .command('rejoin')
    .description('after a repair: wait for NODE\'s resync (shown), then move its Primary roles and VMs back to it, live')
    .argument('<node>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      const t = requireCluster(cmd);
      const r = await resyncProgress(t, name, 'rejoin', callNode(t, { cmd: 'node.rejoin', node: name }, { timeoutMs: 24 * 3600_000 }) as Promise<{ message: string }>);
      process.stdout.write(`${r.message}\n`);
    });

  const fence = program.command('fence').description('fencing: making sure a lost node writes nothing before its VMs boot elsewhere');
  fence
    .command('test')
    .description('dry run: what a takeover of NODE would do, and whether the fence command answers (it runs with "status", not "off")')
    .argument('<node>')
    .option('--json', 'machine-readable output')
    .action(async (node: string, options: { json?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const r = (await callNode(t, { cmd: 'cluster.fence-test', node }, { timeoutMs: (t.config.fence?.timeout ?? 0) + 30_000 })) as FenceTestReport;
      print(options.json === true, r, () => `fence test of ${r.node}, as ${r.by} would do it:\n${r.lines.map((l) => `  ${l}`).join('\n')}\n${r.ok ? 'ok' : 'PROBLEM: see above'}\n`);
      if (!r.ok) process.exitCode = 1;
    });
}

/**
 * While a long node command runs (drain, rejoin), the resyncs of NODE's
 * resources as one progress view on stderr (stdout keeps the result alone).
 */
function resyncProgress<T>(t: ReturnType<typeof requireCluster>, node: string, what: string, work: Promise<T>): Promise<T> {
  return withProgress(ProgressView.for(`${what} ${node}: resync`), work, async () => {
    const s = (await callNode(t, { cmd: 'resource.status' }, { timeoutMs: 5000 }, node)) as NodeStatus;
    const running = s.resources.map((r) => r.peers[0]?.resync).filter((r) => r && r.totalBytes > 0);
    if (running.length === 0) return undefined;
    return { done: running.reduce((a, r) => a + r!.doneBytes, 0), total: running.reduce((a, r) => a + r!.totalBytes, 0), rate: running.reduce((a, r) => a + r!.rateBytesPerSec, 0) };
  });
}

function formatStatus(s: ClusterStatus): string {
  const out: string[] = [];
  out.push(`cluster ${s.cluster} (as ${s.node} sees it): ${s.quorum ? 'quorum' : 'NO QUORUM'}; witness ${s.witness.configured ? (s.witness.reachable ? 'answering' : 'NOT answering') : 'none'}`);
  for (const w of s.warnings) out.push(`warning: ${w}`);
  out.push('nodes:');
  for (const n of s.nodes) {
    const paths = n.paths?.map((p) => `${p.remote}: ${p.lastHeardMsAgo === null ? 'never' : `${p.lastHeardMsAgo} ms ago`}`).join(', ');
    out.push(`  ${n.name.padEnd(12)} ${n.state}${n.view && n.view !== 'online' ? ` (${n.view})` : ''}${paths ? `  heartbeat ${paths}` : ''}`);
  }
  out.push('resources:');
  for (const r of s.resources) out.push(`  ${r.name.padEnd(12)} Primary on ${r.primary ?? 'none'}, ${r.disk}, ${r.connection}${r.outOfSyncBytes > 0 ? `, ${r.outOfSyncBytes} bytes out of sync` : ''}`);
  out.push('vms:');
  for (const v of s.vms) out.push(`  ${v.name.padEnd(12)} ${v.state}${v.node ? ` on ${v.node}` : ''}`);
  if (s.lastTakeover) out.push(`last takeover: of ${s.lastTakeover.peer} in ${s.lastTakeover.totalMs} ms (${s.lastTakeover.steps.map((x) => `${x.step} ${x.atMs} ms`).join(', ')})`);
  return `${out.join('\n')}\n`;
}
