/**
 * `duet vm ...`: the cluster's VMs, through any node's daemon (it asks the
 * others). start/stop/migrate return when the operation is over.
 */
import type { Command } from 'commander';
import type { VmInfo } from '../vm/manager.js';
import type { ConsoleChunk } from '../vm/console.js';
import { formatSize, parseSize } from '../util/size.js';
import { UserError } from '../util/errors.js';
import { callNode, requireCluster } from './cluster-client.js';
import { ProgressView, withProgress } from './progress.js';
import { print } from './pool.js';

const LONG_MS = 180_000;
const FOLLOW_EVERY_MS = 300;

export function registerVm(program: Command): void {
  const vm = program.command('vm').description('virtual machines on the cluster\'s volumes: list, start, stop, console');

  vm.command('list')
    .description('every VM of the cluster file: where it runs, its state and memory')
    .option('--json', 'machine-readable output')
    .action(async (options: { json?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const r = (await callNode(t, { cmd: 'vm.list' }, { timeoutMs: 30_000 })) as { vms: VmInfo[] };
      print(options.json === true, r, () => formatList(r.vms));
    });

  vm.command('start')
    .description('start the VM (on its prefer node unless --on); a running VM is left as it is')
    .argument('<vm>')
    .option('--on <node>', 'the node to run it on')
    .action(async (name: string, options: { on?: string }, cmd: Command) => {
      const t = requireCluster(cmd);
      const r = (await callNode(t, { cmd: 'vm.start', vm: name, ...(options.on ? { on: options.on } : {}) }, { timeoutMs: LONG_MS })) as VmInfo & { message?: string };
      process.stdout.write(r.message ? `${r.message}\n` : `vm ${name} is running on ${r.node} (QEMU pid ${r.pid})\n`);
    });

  vm.command('stop')
    .description('ask the guest to power off (ACPI), kill it after 30 s; it stays stopped until vm start')
    .argument('<vm>')
    .option('--force', 'kill it at once (the guest loses what it had not written)')
    .action(async (name: string, options: { force?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      const r = (await callNode(t, { cmd: 'vm.stop', vm: name, force: options.force === true }, { timeoutMs: LONG_MS })) as { node?: string; message?: string; killed?: boolean };
      process.stdout.write(r.message ? `${r.message}\n` : `vm ${name} stopped on ${r.node}${r.killed ? ' (killed)' : ''}\n`);
    });

  vm.command('migrate')
    .description('move the running VM to NODE live: the guest goes on where it was (its memory is copied while it runs)')
    .argument('<vm>')
    .requiredOption('--to <node>', 'the node to move it to')
    .action(async (name: string, options: { to: string }, cmd: Command) => {
      const t = requireCluster(cmd);
      const work = callNode(t, { cmd: 'vm.migrate', vm: name, to: options.to }, { timeoutMs: 11 * 60_000 }) as Promise<{ message: string }>;
      const r = await withProgress(ProgressView.for(`migrate ${name} to ${options.to}`), work, async () => {
        const m = ((await callNode(t, { cmd: 'vm.list' }, { timeoutMs: 5000 })) as { vms: VmInfo[] }).vms.find((v) => v.name === name)?.migration;
        // RAM the guest rewrites goes again: the total is the guest's RAM, what was sent may pass it.
        return m ? { done: m.transferredBytes, total: m.totalBytes, rate: m.rateBytesPerSec } : undefined;
      });
      process.stdout.write(`${r.message}\n`);
    });

  vm.command('set-memory')
    .description('squeeze (or give back) a running VM\'s memory with its balloon, between minMemory and memory')
    .argument('<vm>')
    .argument('<size>', 'e.g. 96M')
    .action(async (name: string, size: string, _o: unknown, cmd: Command) => {
      const t = requireCluster(cmd);
      let bytes: number;
      try {
        bytes = parseSize(size);
      } catch {
        throw new UserError(`vm set-memory ${name}: ${size} is not a size (write e.g. 96M, 1G)`);
      }
      const r = (await callNode(t, { cmd: 'vm.set-memory', vm: name, bytes }, { timeoutMs: 60_000 })) as { message: string };
      process.stdout.write(`${r.message}\n`);
    });

  vm.command('xl-config')
    .description('print a Xen xl domain config for the VM, its disks imported with nbd-client (for users who keep Xen)')
    .argument('<vm>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      const t = requireCluster(cmd);
      const r = (await callNode(t, { cmd: 'vm.xl-config', vm: name }, { timeoutMs: 30_000 })) as { text: string };
      process.stdout.write(r.text);
    });

  vm.command('console')
    .description('the serial console\'s output (the last 256 KiB); --follow keeps printing')
    .argument('<vm>')
    .option('--follow', 'keep printing what the VM prints (Ctrl-C ends)')
    .action(async (name: string, options: { follow?: boolean }, cmd: Command) => {
      const t = requireCluster(cmd);
      let chunk = (await callNode(t, { cmd: 'vm.console', vm: name }, { timeoutMs: 30_000 })) as ConsoleChunk;
      process.stdout.write(chunk.text);
      if (!options.follow) return;
      let at = chunk.next;
      for (;;) {
        await new Promise((resolve) => setTimeout(resolve, FOLLOW_EVERY_MS));
        try {
          chunk = (await callNode(t, { cmd: 'vm.console', vm: name, since: at }, { timeoutMs: 10_000 })) as ConsoleChunk;
        } catch {
          continue; // A node restarting or a migration's switch: ask again.
        }
        if (chunk.from > at) process.stdout.write(`\n[duet: ${chunk.from - at} bytes of console output were not kept]\n`);
        process.stdout.write(chunk.text);
        at = chunk.next;
      }
    });
}

function formatList(vms: VmInfo[]): string {
  if (vms.length === 0) return 'no VMs in the cluster file (vms: section)\n';
  const rows = vms.map((v) => [v.name, v.node ?? '-', v.stale ? `${v.state}?` : v.state, formatSize(v.memoryBytes), String(v.cpus), v.disks.join(','), v.reason ?? '']);
  const head = ['VM', 'NODE', 'STATE', 'MEMORY', 'CPUS', 'DISKS', ''];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]): string => r.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd();
  const stale = vms.some((v) => v.stale) ? '? : its node did not answer; what it said last\n' : '';
  return `${[head, ...rows].map(line).join('\n')}\n${stale}`;
}
