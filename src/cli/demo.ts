/**
 * `npm start`: the embedded default cluster on this one machine. Two node
 * daemons (alpha at 127.0.0.1, bravo at 127.0.0.2) and a witness
 * (127.0.0.3), file-backed sparse disks in a data directory, one resource
 * mirrored between them, a pool on it and a volume `demo` exported by the
 * Primary at nbd://127.0.0.1:10809/demo, and a small VM (the demo guest,
 * ticking on its console) on volume demo/web, running on alpha where QEMU
 * is installed. New disk images get their duet metadata first (what `duet
 * resource create-md` does). Prints the status and what to try; Ctrl-C
 * stops the VM and all three processes cleanly.
 */
import { spawn, ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import { FileDevice } from '../blockdev/file.js';
import { loadClusterConfig, loadSecret } from '../cluster/config.js';
import { apiToken } from '../api/token.js';
import { createMetadata } from '../replication/create-md.js';
import { layoutFor, readRecord } from '../replication/meta.js';
import type { NodeStatus } from '../cluster/node.js';
import { UserError } from '../util/errors.js';
import { buildDemoGuest, DEMO_GUEST_APPEND, type DemoGuest } from '../vm/demo-guest.js';
import { QEMU_BINARY } from '../vm/qemu-args.js';
import { detectAccel } from '../vm/qemu.js';
import { callNode } from './cluster-client.js';
import { formatStatus } from './resource.js';

const DUET = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'bin', 'duet');
const NODES = { alpha: '127.0.0.1', bravo: '127.0.0.2' } as const;
const WITNESS = '127.0.0.3';

/** The demo VMs: the demo guest (built from this machine's kernel and busybox), web on alpha's resource, db on bravo's. */
function vmYaml(guest: DemoGuest): string[] {
  const boot = `boot: { kernel: ${guest.kernel}, initrd: ${guest.initrd}, append: "${DEMO_GUEST_APPEND}" }`;
  return ['vms:', `  web: { disks: [demo/web], memory: 128M, minMemory: 96M, prefer: alpha, priority: 10, ${boot} }`, `  db: { disks: [store/db], memory: 128M, minMemory: 96M, prefer: bravo, ${boot} }`];
}

/** The demo's resources: r0 Primary on alpha (pool demo), r1 on bravo (pool store). */
const RESOURCES = { r0: { port: 7801, prefer: 'alpha', pool: 'demo', suffix: '' }, r1: { port: 7802, prefer: 'bravo', pool: 'store', suffix: '-r1' } } as const;

function clusterYaml(dir: string, guest: DemoGuest | undefined): string {
  return [
    '# The demo cluster: two nodes and a witness on loopback addresses of this machine.',
    'cluster: demo',
    'secret: { file: secret }',
    'nodes:',
    `  alpha: { address: ${NODES.alpha} }`,
    `  bravo: { address: ${NODES.bravo} }`,
    `witness: { address: ${WITNESS}, port: 7899 }`,
    'resources:',
    ...Object.entries(RESOURCES).map(([r, x]) => `  ${r}: { protocol: C, port: ${x.port}, disk: { alpha: ${path.join(dir, `alpha${x.suffix}.img`)}, bravo: ${path.join(dir, `bravo${x.suffix}.img`)} }, prefer: ${x.prefer} }`),
    'pools:',
    ...Object.entries(RESOURCES).map(([r, x]) => `  ${x.pool}: { devices: [${r}] }`),
    'exports: { port: 10809 }',
    'api: { port: 7800 }',
    ...(guest ? vmYaml(guest) : []),
    '',
  ].join('\n');
}

/** The demo guest, or why there is no VM in the demo (no QEMU, no kernel to boot). */
async function demoGuest(dir: string): Promise<{ guest?: DemoGuest; why?: string }> {
  const onPath = (process.env.PATH ?? '').split(':').some((d) => d && fs.existsSync(path.join(d, QEMU_BINARY)));
  if (!onPath) return { why: `${QEMU_BINARY} is not installed (apt-get install qemu-system-x86)` };
  try {
    return { guest: await buildDemoGuest(path.join(dir, 'guest')) };
  } catch (err) {
    return { why: (err as Error).message };
  }
}

export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('run a two-node cluster with a witness on this machine and export a volume "demo" over NBD')
    .option('--data <dir>', 'data directory', process.env.DUET_DEMO_DIR ?? path.resolve('data'))
    .option('--size <bytes>', 'size of each node\'s disk image when it is created', String(4 * 1024 * 1024 * 1024))
    .action(async (options: { data: string; size: string }) => {
      const dir = path.resolve(options.data);
      fs.mkdirSync(path.join(dir, 'logs'), { recursive: true });
      const file = path.join(dir, 'cluster.yaml');
      const { guest, why } = await demoGuest(dir);
      // Rewritten while it is the demo's own (a data directory of an older demo has no VM in it).
      // (And one of a demo before the second resource.)
      if (!fs.existsSync(file) || (guest && !fs.readFileSync(file, 'utf8').includes(guest.initrd)) || !fs.readFileSync(file, 'utf8').includes('r1:')) fs.writeFileSync(file, clusterYaml(dir, guest));
      const secret = path.join(dir, 'secret');
      if (!fs.existsSync(secret)) fs.writeFileSync(secret, `${randomBytes(24).toString('base64')}\n`, { mode: 0o600 });
      for (const n of Object.keys(NODES)) {
        for (const x of Object.values(RESOURCES)) {
          const img = path.join(dir, `${n}${x.suffix}.img`);
          if (!fs.existsSync(img)) {
            fs.writeFileSync(img, '');
            fs.truncateSync(img, Number(options.size) / (x.suffix ? 4 : 1));
          }
        }
      }
      const config = loadClusterConfig(file);
      // A node never writes metadata on its own: give each image without it (a new one) fresh metadata, as an admin would.
      for (const resource of Object.keys(RESOURCES)) {
        for (const [node, disk] of Object.entries(config.resources[resource].disk)) {
          const img = path.resolve(dir, disk);
          const device = FileDevice.open(img);
          try {
            if (!(await readRecord(device, layoutFor(device.size)))) await createMetadata(device, { resource, node });
          } finally {
            await device.close();
          }
        }
      }
      const children: { name: string; child: ChildProcess }[] = [];
      const start = (name: string, args: string[]): void => {
        const log = fs.openSync(path.join(dir, 'logs', `${name}.log`), 'a');
        const child = spawn(process.execPath, [DUET, '--home', path.join(dir, `home-${name}`), ...args], { stdio: ['ignore', 'ignore', log] });
        fs.closeSync(log);
        children.push({ name, child });
        child.on('exit', (code, signal) => {
          if (!stopping) process.stdout.write(`duet demo: ${name} exited (${signal ?? code}); restart it with: bin/duet --home ${path.join(dir, `home-${name}`)} ${args.join(' ')}\n`);
        });
      };
      let stopping = false;
      const stop = (): void => {
        if (stopping) return;
        stopping = true;
        process.stdout.write(`duet demo: stopping ${guest ? 'the VMs, ' : ''}the nodes and the witness\n`);
        // A VM outlives its node's daemon on purpose; the demo's go with the demo (asked of either node: one may be dead).
        const stopVm = async (vm: string): Promise<void> => {
          for (const node of Object.keys(NODES)) {
            const ok = await callNode({ config, node }, { cmd: 'vm.stop', vm, force: true }, { timeoutMs: 10_000 }).then(() => true, () => false);
            if (ok) return;
          }
        };
        const vmDown = guest ? Promise.all([stopVm('web'), stopVm('db')]) : Promise.resolve();
        void vmDown.then(() => {
          for (const c of children) if (c.child.exitCode === null) c.child.kill('SIGTERM');
        });
        const deadline = Date.now() + 15_000;
        const wait = (): void => {
          if (children.every((c) => c.child.exitCode !== null || c.child.signalCode !== null) || Date.now() > deadline) process.exit(0);
          setTimeout(wait, 50);
        };
        wait();
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
      start('witness', ['witness', 'run', '--config', file]);
      for (const n of Object.keys(NODES)) start(n, ['node', 'run', '--config', file, '--node', n]);
      const alpha = { config, node: 'alpha' };
      const bravo = { config, node: 'bravo' };
      // Wait (bounded) for each node to be Primary for its resource and its pool open, then make the volumes once.
      const deadline = Date.now() + 60_000;
      let status: NodeStatus | undefined;
      for (;;) {
        try {
          status = (await callNode(alpha, { cmd: 'resource.status' })) as NodeStatus;
          const other = (await callNode(bravo, { cmd: 'resource.status' })) as NodeStatus;
          if (status.pools.find((p) => p.name === 'demo')?.open && other.pools.find((p) => p.name === 'store')?.open) break;
        } catch {
          /* not up yet */
        }
        if (Date.now() > deadline) {
          stop();
          throw new UserError(`the demo cluster did not come up within 60 s; see ${path.join(dir, 'logs')}`);
        }
        await new Promise((r) => setTimeout(r, 200));
      }
      const volumes = (await callNode(alpha, { cmd: 'vol.list', pool: 'demo' })) as { name: string }[];
      if (!volumes.some((v) => v.name === 'demo')) await callNode(alpha, { cmd: 'vol.create', pool: 'demo', name: 'demo', sizeBytes: 1024 * 1024 * 1024 });
      if (guest && !volumes.some((v) => v.name === 'web')) await callNode(alpha, { cmd: 'vol.create', pool: 'demo', name: 'web', sizeBytes: 64 * 1024 * 1024 });
      const stored = (await callNode(bravo, { cmd: 'vol.list', pool: 'store' })) as { name: string }[];
      if (guest && !stored.some((v) => v.name === 'db')) await callNode(bravo, { cmd: 'vol.create', pool: 'store', name: 'db', sizeBytes: 64 * 1024 * 1024 });
      // Started here, not left to "VMs run unless stopped": the demo's Ctrl-C stopped them last time.
      let vmNote = `no VM in this demo: ${why ?? 'unknown'}`;
      if (guest) {
        const notes: string[] = [];
        for (const [vm, node] of [['web', 'alpha'], ['db', 'bravo']] as const) {
          let note = `vm ${vm} did not start within 90 s: see vm list and the logs`;
          await callNode(alpha, { cmd: 'vm.start', vm }, { timeoutMs: 60_000 }).catch((err: unknown) => (note = `vm ${vm} did not start: ${(err as Error).message}`));
          for (const until = Date.now() + 90_000; Date.now() < until; await new Promise((r) => setTimeout(r, 500))) {
            const c = (await callNode(alpha, { cmd: 'vm.console', vm }).catch(() => undefined)) as { text: string } | undefined;
            const ticks = c?.text.split('\n').filter((l) => l.startsWith('tick ')) ?? [];
            if (ticks.length >= 3) {
              note = `vm ${vm} runs on ${node} from volume ${vm === 'web' ? 'demo/web' : 'store/db'} (QEMU, ${detectAccel() === 'kvm' ? 'KVM' : 'TCG: no KVM here'}); its console: ${ticks[ticks.length - 1]}`;
              break;
            }
          }
          notes.push(note);
        }
        vmNote = notes.join('\n');
      }
      // Show a settled picture: wait (bounded) for the initial syncs.
      for (const until = Date.now() + 30_000; Date.now() < until; await new Promise((r) => setTimeout(r, 200))) {
        status = (await callNode(alpha, { cmd: 'resource.status' })) as NodeStatus;
        if (status.resources.every((r) => r.peers[0]?.connection === 'Connected' && r.peers[0].disk === 'UpToDate' && r.outOfSyncBytes === 0)) break;
      }
      const url = `nbd://${NODES.alpha}:10809/demo`;
      const d = `bin/duet --config ${file}`;
      process.stdout.write(
        [
          `duet demo: cluster "demo" on this machine (data in ${dir}, logs in ${path.join(dir, 'logs')})`,
          `  alpha   ${NODES.alpha}  disks ${path.join(dir, 'alpha.img')}, ${path.join(dir, 'alpha-r1.img')} (sparse)`,
          `  bravo   ${NODES.bravo}  disks ${path.join(dir, 'bravo.img')}, ${path.join(dir, 'bravo-r1.img')} (sparse)`,
          `  witness ${WITNESS}:7899`,
          'resource r0 (pool demo) is Primary on alpha, r1 (pool store) on bravo; each mirrored to the other node',
          `volume demo (1G) of pool demo on resource r0, exported by the Primary at ${url}`,
          vmNote,
          '',
          formatStatus(status).trimEnd(),
          '',
          `dashboard: https://${NODES.alpha}:7800/ (or bravo's, https://${NODES.bravo}:7800/); sign in with the token ${apiToken(loadSecret(config))}`,
          `  the browser trusts it once the cluster CA is imported: ${path.join(dir, 'secret.ca.pem')} (${d} cert prints it)`,
          `  metrics: curl --cacert ${path.join(dir, 'secret.ca.pem')} https://${NODES.alpha}:7800/metrics`,
          '',
          'try, from another terminal:',
          `  ${d} --node alpha doctor                    # preflight: QEMU/KVM, ports, disks, metadata, witness, clock`,
          `  ${d} --node alpha resource status            # roles, disks, connection, resync`,
          `  head -c 64M /dev/urandom > /tmp/rand.img && nbdcopy --flush /tmp/rand.img ${url}`,
          `  ${d} --node alpha resource disconnect r0; qemu-io -f raw -c 'write -P 7 0 1M' ${url}`,
          `  ${d} --node alpha resource connect r0; ${d} --node alpha resource status   # only the dirty blocks resync`,
          `  ${d} --node alpha resource verify r0        # compare every block with bravo`,
          ...(guest
            ? [
                `  ${d} --node alpha vm list; ${d} --node alpha vm console web --follow   # the VM ticking`,
                `  ${d} --node alpha vm migrate web --to bravo   # live: its console goes on, no reboot`,
                `  ${d} --node bravo resource primary r0 --handover   # the disks' Primary moves under the running VM`,
              ]
            : []),
          `  ${d} --node bravo cluster status             # nodes, quorum, who is Primary, where each VM runs`,
          `  kill -9 ${children.find((c) => c.name === 'alpha')?.child.pid}${guest ? ` $(cat ${path.join(dir, 'home-alpha', 'vms', 'web', 'qemu.pid')})` : ''}   # kill -9 alpha's daemon${guest ? ' and its VM' : ''} and watch bravo take over:`,
          `  ${d} --node bravo events --follow            # node-lost, takeover, ${guest ? 'vm web started on bravo, ' : ''}failover-done (about 3 s)`,
          `  bin/duet --home ${path.join(dir, 'home-alpha')} node run --config ${file} --node alpha &   # alpha repaired: back, it resyncs`,
          `  ${d} --node bravo node rejoin alpha         # ${guest ? 'vm web and ' : ''}r0 move back to alpha, live`,
          `  ${d} --node alpha node drain bravo          # maintenance: everything on alpha; node rejoin bravo brings it back`,
          'Ctrl-C stops the cluster (in-flight requests finish, data is flushed).',
          '',
        ].join('\n'),
      );
    });
}
