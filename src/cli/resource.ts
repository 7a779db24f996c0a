/**
 * `duet node run` (the daemon of one node) and `duet resource ...` (what an
 * admin asks of a node's resources, through its daemon; `create-md` alone
 * works offline, on the disk itself).
 */
import type { Command } from 'commander';
import path from 'node:path';
import { loadClusterConfig, loadSecret } from '../cluster/config.js';
import { DEFAULT_WITNESS_PORT, Witness } from '../cluster/witness.js';
import type { NodeResourceStatus, NodeStatus } from '../cluster/node.js';
import { FileDevice } from '../blockdev/file.js';
import { DiskInUse } from '../blockdev/claim.js';
import { createMetadata } from '../replication/create-md.js';
import type { PeerStatus, VerifyProgress } from '../replication/peer.js';
import { createLogger, flushLogs } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { formatSize } from '../util/size.js';
import { resolveHome } from '../volume/registry.js';
import { callNode, requireCluster } from './cluster-client.js';
import { ProgressView, withProgress } from './progress.js';
import { print } from './pool.js';

export function registerNode(program: Command): void {
  const node = program.command('node').description('the duet daemon of one node');
  node
    .command('run')
    .description('run this node: its resources, peer links, pools, NBD exports and API')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals() as { config?: string; node?: string; home?: string };
      const file = opts.config ?? process.env.DUET_CONFIG;
      if (!file) throw new UserError('node run: give the cluster file with --config FILE (or DUET_CONFIG)');
      const config = loadClusterConfig(file);
      const log = createLogger('duet-node', undefined, { async: true });
      const home = resolveHome(opts.home);
      // Loaded here: the daemon (HTTP server, metrics, VMs) is not what the other commands need to start fast.
      const { NodeDaemon } = await import('../cluster/node.js');
      const daemon = await NodeDaemon.start(config, opts.node ?? process.env.DUET_NODE, { home, log });
      let stopping = false;
      const stop = async (signal: string): Promise<void> => {
        if (stopping) return;
        stopping = true;
        log.info({ event: 'shutting-down', signal });
        let code = 0;
        try {
          await daemon.stop();
        } catch (err) {
          log.error({ event: 'shutdown-failed', err: (err as Error).message });
          code = 1;
        }
        log.info({ event: 'stopped' });
        flushLogs();
        process.exit(code);
      };
      process.on('SIGINT', () => void stop('SIGINT'));
      process.on('SIGTERM', () => void stop('SIGTERM'));
      const s = daemon.status();
      process.stdout.write(
        [
          `node ${daemon.node} running (cluster ${config.cluster}, home ${home})`,
          ...s.resources.map((r) =>
            r.down ? `resource ${r.name}: down: ${r.down}` : `resource ${r.name}: ${r.role}, disk ${r.disk}, peer ${r.peers[0]?.node} on port ${config.resources[r.name].port}`,
          ),
          `api ${daemon.address}:${config.api.port}`,
          `exports nbd://${daemon.address}:${config.exports.port}/VOLUME`,
          '',
        ].join('\n'),
      );
    });
}

export function registerWitness(program: Command): void {
  const witness = program.command('witness').description('the diskless third vote of a two-node cluster');
  witness
    .command('run')
    .description('run the witness at the cluster file\'s witness address')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals() as { config?: string; home?: string };
      const file = opts.config ?? process.env.DUET_CONFIG;
      if (!file) throw new UserError('witness run: give the cluster file with --config FILE (or DUET_CONFIG)');
      const config = loadClusterConfig(file);
      if (!config.witness) throw new UserError(`${file}: has no witness: section (witness: { address: IP })`);
      const log = createLogger('duet-witness', undefined, { async: true });
      const home = resolveHome(opts.home);
      const w = new Witness(path.join(home, 'witness.json'), Object.keys(config.nodes), log, Date.now, config.membership.deadTimeMs);
      const port = config.witness.port ?? DEFAULT_WITNESS_PORT;
      try {
        await w.listen(config.witness.address, port, loadSecret(config));
      } catch (err) {
        throw new UserError(`witness: cannot listen on ${config.witness.address}:${port} (${(err as Error).message})`);
      }
      const stop = (): void => {
        void w.close().finally(() => {
          flushLogs();
          process.exit(0);
        });
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
      process.stdout.write(`witness of cluster ${config.cluster} at ${config.witness.address}:${port} (state ${path.join(home, 'witness.json')})\n`);
    });
}

export function registerResource(program: Command): void {
  const res = program.command('resource').description('replicated resources of a node (through its daemon): status, roles, connection, verify, split brain');

  res
    .command('status')
    .description('role, disk, connection, resync and verify progress of each resource on the node')
    .argument('[resource]')
    .option('--json', 'machine-readable output')
    .action(async (name: string | undefined, options: { json?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const s = (await callNode(t, { cmd: 'resource.status', resource: name })) as NodeStatus;
      print(options.json === true, { node: s.node, resources: s.resources, eventLoop: s.eventLoop }, () => formatStatus(s));
    });

  res
    .command('wait-sync')
    .description('wait until the resource is connected and both disks are UpToDate, showing the resync (like drbdsetup wait-sync)')
    .argument('<resource>')
    .option('--timeout <seconds>', 'give up after this long (exit 1)', (v) => {
      const n = Number(v);
      if (!Number.isFinite(n) || n <= 0) throw new UserError(`--timeout ${v}: give a number of seconds`);
      return n;
    })
    .option('--json', 'print the final status as JSON (no progress)')
    .action(async (name: string, options: { timeout?: number; json?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const deadline = options.timeout === undefined ? Infinity : Date.now() + options.timeout * 1000;
      const view = ProgressView.for(`resource ${name} on ${t.node}: resync`, { json: options.json });
      try {
        for (;;) {
          const s = ((await callNode(t, { cmd: 'resource.status', resource: name }, { timeoutMs: 10_000 })) as NodeStatus).resources[0];
          const p = s.peers[0];
          if (s.disk === 'UpToDate' && p?.disk === 'UpToDate' && p.connection === 'Connected' && !p.resync) {
            view.stop();
            print(options.json === true, s, () => `resource ${name}: in sync with ${p.node} (${s.role} on ${t.node})\n`);
            return;
          }
          if (s.down) throw new UserError(`resource ${name} is down on ${t.node}: ${s.down}`, 1);
          if (p?.resync && p.resync.totalBytes > 0) view.update({ done: p.resync.doneBytes, total: p.resync.totalBytes, rate: p.resync.rateBytesPerSec });
          if (Date.now() > deadline) {
            throw new UserError(`resource ${name}: not in sync after ${options.timeout} s (${s.disk}, peer ${p?.node ?? '?'} ${p?.connection ?? 'StandAlone'} ${p?.disk ?? ''}${p?.resync ? `, resync ${Math.floor((100 * p.resync.doneBytes) / Math.max(1, p.resync.totalBytes))}%` : ''})`, 1);
          }
          await new Promise((r) => setTimeout(r, 500));
        }
      } finally {
        view.stop();
      }
    });

  res
    .command('primary')
    .description('make the resource Primary on this node (its pools open and their volumes are exported here)')
    .argument('<resource>')
    .option('--force', 'promote a disk that is not UpToDate (Inconsistent or Outdated): it becomes the good data')
    .option('--handover', 'take the role from the peer while VMs use the volumes: they pause, their disks move here, they run on')
    .action(async (name: string, options: { force?: boolean; handover?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      if (options.handover) {
        if (options.force) throw new UserError('resource primary: --handover and --force do not go together (a handover needs both disks in sync)');
        const r = (await callNode(t, { cmd: 'resource.primary', resource: name, force: false, handover: true }, { timeoutMs: 300_000 })) as { message: string };
        process.stdout.write(`${r.message}\n`);
        return;
      }
      const s = (await callNode(t, { cmd: 'resource.primary', resource: name, force: options.force === true })) as NodeStatus;
      process.stdout.write(`resource ${name} is Primary on ${s.node}\n`);
    });

  res
    .command('secondary')
    .description('make the resource Secondary on this node (its pools close, their exports go away)')
    .argument('<resource>')
    .option('--force', 'also when writes are held for quorum: they end with EIO (their blocks resync from the peer later)')
    .action(async (name: string, options: { force?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const s = (await callNode(t, { cmd: 'resource.secondary', resource: name, force: options.force === true })) as NodeStatus;
      process.stdout.write(`resource ${name} is Secondary on ${s.node}\n`);
    });

  for (const what of ['disconnect', 'connect'] as const) {
    res
      .command(what)
      .description(what === 'disconnect' ? 'drop the peer link and stay StandAlone (writes are tracked in the bitmap)' : 'let the peer link come back (and resync what changed)')
      .argument('<resource>')
      .action(async (name: string, _o: unknown, cmd: Command) => {
        const t = requireCluster(cmd);
        await callNode(t, { cmd: `resource.${what}`, resource: name });
        process.stdout.write(`resource ${name}: ${what === 'disconnect' ? 'StandAlone' : 'connecting'} on ${t.node}\n`);
      });
  }

  res
    .command('verify')
    .description('compare every block with the peer by checksum; out-of-sync blocks are reported and resynced')
    .argument('<resource>')
    .option('--json', 'machine-readable output')
    .action(async (name: string, options: { json?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const work = callNode(t, { cmd: 'resource.verify', resource: name }) as Promise<VerifyProgress & { resource: string }>;
      const v = await withProgress(ProgressView.for(`verify ${name}`, { json: options.json }), work, async () => {
        const p = ((await callNode(t, { cmd: 'resource.status', resource: name }, { timeoutMs: 5000 })) as NodeStatus).resources[0]?.peers[0]?.verify;
        return p?.running ? { done: p.doneBytes, total: p.totalBytes, note: `${formatSize(p.outOfSyncBytes)} out of sync` } : undefined;
      });
      print(options.json === true, v, () =>
        v.outOfSyncBytes === 0
          ? `resource ${name}: verified ${formatSize(v.totalBytes)}, no difference\n`
          : `resource ${name}: ${formatSize(v.outOfSyncBytes)} out of sync, marked for resync:\n${v.ranges.map((r) => `  ${r.offset}+${r.length}\n`).join('')}${listedBytes(v.ranges) < v.outOfSyncBytes ? `  ... (the first ${v.ranges.length} ranges; ${formatSize(v.outOfSyncBytes - listedBytes(v.ranges))} more)\n` : ''}`,
      );
    });

  res
    .command('resolve')
    .description("end a split brain: keep NODE's data; the other node's changed blocks are saved to a file there, then overwritten")
    .argument('<resource>')
    .requiredOption('--keep <node>', 'the node whose data stays')
    .action(async (name: string, options: { keep: string }, cmd: Command) => {
      const t = requireCluster(cmd);
      await callNode(t, { cmd: 'resource.resolve', resource: name, keep: options.keep });
      // The peer is StandAlone after the split brain: let it connect again too.
      const peer = Object.keys(t.config.resources[name]?.disk ?? {}).find((n) => n !== t.node);
      let peerNote = '';
      if (peer) {
        try {
          await callNode(t, { cmd: 'resource.resolve', resource: name, keep: options.keep }, {}, peer);
        } catch (err) {
          peerNote = ` (${peer} could not be told: ${(err as Error).message}; run this command with --node ${peer} too)`;
        }
      }
      process.stdout.write(`resource ${name}: resolving split brain, keeping ${options.keep}'s data${peerNote}\n`);
    });

  registerRestore(res);
  registerCreateMd(res);
}

function registerCreateMd(res: Command): void {
  res
    .command('create-md')
    .description("write fresh duet metadata on this node's disk of the resource (a new or replaced disk); refused while any process uses the disk")
    .argument('<resource>')
    .option('--force', 'overwrite the metadata the disk already holds (this copy then counts as new: a full sync from the peer)')
    .action(async (name: string, options: { force?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const res = t.config.resources[name];
      if (!res) throw new UserError(`no resource ${name} in ${t.config.file} (resources: ${Object.keys(t.config.resources).join(', ') || 'none'})`);
      const diskPath = res.disk[t.node];
      if (diskPath === undefined) throw new UserError(`resource ${name} has no disk on node ${t.node} in ${t.config.file}`);
      const file = path.resolve(path.dirname(t.config.file), diskPath);
      let device: FileDevice;
      try {
        device = FileDevice.open(file);
      } catch (err) {
        // Most likely this node's daemon, running the resource: a refusal because of state.
        if (err instanceof DiskInUse) throw new UserError(err.message, 1);
        throw err;
      }
      let done;
      try {
        done = await createMetadata(device, { resource: name, node: t.node, force: options.force === true, log: createLogger('duet-create-md', process.env.DUET_LOG_LEVEL ?? 'warn') });
      } catch (err) {
        if (err instanceof UserError) throw err;
        throw new UserError(`disk ${file} of resource ${name}: ${(err as Error).message}`);
      } finally {
        await device.close();
      }
      const replaced = done.previous ? ` (replaced metadata of a ${done.previous.disk} disk, generation ${done.previous.gi.current})` : '';
      // A daemon already running this node kept the resource down for want of metadata: bring it up now.
      let next: string;
      try {
        await callNode(t, { cmd: 'resource.attach', resource: name }, { timeoutMs: 30_000 });
        next = `node ${t.node} brought it up`;
      } catch (err) {
        next = /cannot reach/.test((err as Error).message) ? `start the node (duet node run --node ${t.node}) to bring it up` : `node ${t.node} could not bring it up: ${(err as Error).message}`;
      }
      process.stdout.write(`resource ${name}: fresh duet metadata on ${file}${replaced}, ${formatSize(done.layout.dataBytes)} of data, Inconsistent until its first sync; ${next}\n`);
    });
}

export function registerRestore(res: Command): void {
  res
    .command('restore-blocks')
    .description('undo a split-brain resolution: write back the blocks this node saved before they were overwritten (the resource must be Primary here)')
    .argument('<resource>')
    .argument('<file>', 'a .blocks file from HOME/split-brain on this node')
    .action(async (name: string, file: string, _o: unknown, cmd: Command) => {
      const t = requireCluster(cmd);
      const r = (await callNode(t, { cmd: 'resource.restore-blocks', resource: name, file: path.resolve(file) })) as { bytes: number; ranges: number };
      process.stdout.write(`resource ${name}: restored ${formatSize(r.bytes)} in ${r.ranges} ranges from ${file}\n`);
    });
}

function percent(done: number, total: number): string {
  return total === 0 ? '100%' : `${((done / total) * 100).toFixed(1)}%`;
}

function formatPeer(p: PeerStatus): string {
  let line = `  ${p.node} connection:${p.connection} role:${p.role} disk:${p.disk} out-of-sync:${formatSize(p.outOfSyncBytes)}`;
  if (p.resync) {
    const eta = p.resync.etaSeconds !== null ? ` eta ${p.resync.etaSeconds}s` : '';
    line += `\n    resync: ${percent(p.resync.doneBytes, p.resync.totalBytes)} (${formatSize(p.resync.doneBytes)} of ${formatSize(p.resync.totalBytes)}) at ${formatSize(p.resync.rateBytesPerSec)}/s${eta}`;
  }
  if (p.verify?.running) line += `\n    verify: ${percent(p.verify.doneBytes, p.verify.totalBytes)}, ${formatSize(p.verify.outOfSyncBytes)} out of sync so far`;
  return line;
}

function formatResource(r: NodeResourceStatus): string {
  const lines = [`${r.name} role:${r.role} disk:${r.disk} protocol:${r.protocol}${r.suspended ? ' suspended' : ''}`];
  if (r.down) return [...lines, `  down: ${r.down}`].join('\n');
  for (const p of r.peers) lines.push(formatPeer(p));
  if (r.splitBrain) {
    const sb = r.splitBrain;
    lines.push(`  split brain since ${sb.detectedAt}: ${formatSize(sb.localChangedBytes)} changed here, ${formatSize(sb.peerChangedBytes)} on the peer; ${sb.resolution ?? `unresolved (policy ${sb.policy}): duet resource resolve ${r.name} --keep NODE`}`);
    if (sb.savedTo) lines.push(`  blocks overwritten here were saved to ${sb.savedTo}`);
  }
  if (r.lastRefusal) lines.push(`  not connected: ${r.lastRefusal}`);
  if (r.suspended) lines.push(`  writes held: no quorum (the peer and the witness are unreachable)`);
  if (r.fencedOff) lines.push(`  writes fail: ${r.fencedOff}`);
  return lines.join('\n');
}

export function formatStatus(s: NodeStatus): string {
  const l = s.eventLoop;
  const loop = l ? [`event loop: p99 ${l.last.p99Ms} ms, max ${l.last.maxMs} ms in the last ${l.windowSeconds} s; worst max ${l.worstMaxMs} ms since start`] : [];
  return `${[...s.resources.map((r) => formatResource(r)), ...loop].join('\n')}\n`;
}

/** Bytes in a verify's listed ranges (it lists the first VERIFY_RANGES_MAX). */
function listedBytes(ranges: { offset: number; length: number }[]): number {
  return ranges.reduce((n, r) => n + r.length, 0);
}
