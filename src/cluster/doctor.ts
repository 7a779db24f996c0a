/**
 * `duet doctor`: a preflight of one node. Each check is one line, ok /
 * warning / problem, and a problem says how to fix it. Nothing is changed:
 * disks are read (their metadata slots), ports are bound for an instant
 * only when no daemon of this node holds them, the witness is pinged (a
 * ping is no sign of life for it), the peer is asked the time.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { callApi } from '../api/client.js';
import { apiTargetOf } from '../api/target.js';
import { callAdmin } from '../api/line-socket.js';
import { blockDeviceSizeOf } from '../blockdev/native.js';
import { layoutFor, readRecord, type MetaRecord } from '../replication/meta.js';
import { errnoCode } from '../util/errors.js';
import { formatSize, parseSize } from '../util/size.js';
import { loadSecret, type ClusterConfig } from './config.js';
import { signRequest } from './witness-auth.js';
import { DEFAULT_WITNESS_PORT } from './witness.js';

export type Verdict = 'ok' | 'warning' | 'problem';

export interface Check {
  check: string;
  verdict: Verdict;
  detail: string;
}

/** Clocks further apart than this make events hard to read side by side; past the larger, signed requests fail. */
const SKEW_WARN_MS = 500;
const SKEW_PROBLEM_MS = 30_000;
const FREE_WARN_BYTES = 1024 ** 3;

export interface DoctorOptions {
  config: ClusterConfig;
  node: string;
  home: string;
}

export async function runDoctor(o: DoctorOptions): Promise<Check[]> {
  const out: Check[] = [];
  const add = (check: string, verdict: Verdict, detail: string): void => void out.push({ check, verdict, detail });
  const { config, node } = o;
  const me = config.nodes[node];

  // ---- the secret: the key to every node.
  let secret: Buffer | undefined;
  try {
    secret = loadSecret(config);
    if (config.secret.file !== undefined) {
      const file = path.resolve(path.dirname(config.file), config.secret.file);
      const mode = fs.statSync(file).mode & 0o777;
      if (mode & 0o077) add('secret', 'problem', `${file} has mode ${mode.toString(8).padStart(3, '0')}: others can read the cluster's key; chmod 600 ${file}`);
      else add('secret', 'ok', `${file} (mode ${mode.toString(8).padStart(3, '0')})`);
    } else add('secret', 'warning', `the secret is written in ${config.file} itself: keep that file unreadable by others (chmod 600), or move the secret to secret: { file: PATH }`);
  } catch (err) {
    add('secret', 'problem', (err as Error).message);
  }

  // ---- this node's daemon: is it up? (Then its ports are its own.)
  let daemonUp = false;
  if (secret) {
    try {
      await callApi(apiTargetOf(config, node, secret, `node ${node}'s daemon`), { cmd: 'resource.status' }, { timeoutMs: 3000 });
      daemonUp = true;
      add('daemon', 'ok', `node ${node}'s daemon answers at ${me.address}:${config.api.port}`);
    } catch (err) {
      add('daemon', 'warning', `node ${node}'s daemon does not answer (${(err as Error).message}): start it with duet node run --node ${node}`);
    }
  }

  // ---- QEMU and KVM.
  const qemu = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (qemu.error) add('qemu', Object.keys(config.vms).length ? 'problem' : 'warning', `qemu-system-x86_64 not found: VMs cannot run here; install qemu-system-x86 (apt-get install qemu-system-x86)`);
  else add('qemu', 'ok', (qemu.stdout.split('\n')[0] ?? 'qemu-system-x86_64').trim());
  const kvm = kvmUsable();
  add('kvm', kvm.ok ? 'ok' : 'warning', kvm.detail);

  // ---- FUSE and loop devices (importing a volume where no nbd driver is: nbdfuse + losetup).
  add('fuse', fs.existsSync('/dev/fuse') ? 'ok' : 'warning', fs.existsSync('/dev/fuse') ? '/dev/fuse present' : '/dev/fuse missing: nbdfuse cannot mount volumes here; modprobe fuse');
  add('loop', fs.existsSync('/dev/loop-control') ? 'ok' : 'warning', fs.existsSync('/dev/loop-control') ? '/dev/loop-control present' : '/dev/loop-control missing: losetup cannot attach volumes here; modprobe loop');

  // ---- ports.
  const ports: { what: string; address: string; port: number }[] = [
    { what: 'api.port', address: me.address, port: config.api.port },
    { what: 'exports.port', address: me.address, port: config.exports.port },
    { what: 'cluster.heartbeatPort', address: me.address, port: config.membership.heartbeatPort },
    ...(me.heartbeatAddress ? [{ what: 'cluster.heartbeatPort (second path)', address: me.heartbeatAddress, port: config.membership.heartbeatPort }] : []),
    ...Object.entries(config.resources)
      .filter(([, r]) => r.disk[node] !== undefined)
      .map(([name, r]) => ({ what: `resources.${name}.port`, address: me.address, port: r.port })),
  ];
  for (const p of ports) {
    if (daemonUp) {
      add(`port ${p.port}`, 'ok', `${p.address}:${p.port} (${p.what}) is held by node ${node}'s daemon`);
      continue;
    }
    const err = await tryListen(p.address, p.port);
    if (err === undefined) add(`port ${p.port}`, 'ok', `${p.address}:${p.port} (${p.what}) is free`);
    else if (err === 'EADDRINUSE') add(`port ${p.port}`, 'problem', `${p.address}:${p.port} (${p.what}) is in use by another program: stop it (ss -ltnp 'sport = :${p.port}' shows which) or change ${p.what} in ${config.file}`);
    else if (err === 'EADDRNOTAVAIL') add(`port ${p.port}`, 'problem', `${p.address} (${p.what}) is not an address of this machine: is this node ${node}? (--node), or fix nodes.${node}.address`);
    else add(`port ${p.port}`, 'problem', `${p.address}:${p.port} (${p.what}): cannot listen (${err})`);
  }

  // ---- disks and their metadata.
  for (const [name, r] of Object.entries(config.resources)) {
    const disk = r.disk[node];
    if (disk === undefined) continue;
    const file = path.resolve(path.dirname(config.file), disk);
    let size: number;
    let fd: number | undefined;
    try {
      fd = fs.openSync(file, 'r');
      const st = fs.fstatSync(fd);
      size = st.isBlockDevice() ? blockDeviceSizeOf(file, fd) : st.size;
      if (!st.isBlockDevice() && !st.isFile()) throw Object.assign(new Error('not a file or block device'), { code: 'EINVAL' });
    } catch (err) {
      if (fd !== undefined) fs.closeSync(fd);
      add(`disk ${name}`, 'problem', `${file}: ${errnoCode(err) === 'ENOENT' ? 'missing' : (errnoCode(err) ?? (err as Error).message)}: attach the disk, or fix resources.${name}.disk.${node} in ${config.file}`);
      continue;
    }
    try {
      let dataBytes: number;
      try {
        dataBytes = layoutFor(size).dataBytes;
      } catch {
        add(`disk ${name}`, 'problem', `${file} holds ${formatSize(size)}: too small for a resource; give it a bigger disk`);
        continue;
      }
      const want = r.size !== undefined ? parseSize(String(r.size)) : undefined;
      if (want !== undefined && dataBytes < want) add(`disk ${name}`, 'problem', `${file} holds ${formatSize(dataBytes)} of data, less than resources.${name}.size ${r.size}: give this node a bigger disk`);
      else add(`disk ${name}`, 'ok', `${file}: ${formatSize(size)} (${formatSize(dataBytes)} of data)`);
      const record = await readMeta(fd, size);
      if (!record) add(`metadata ${name}`, 'problem', `${file} has no duet metadata: duet --config ${config.file} --node ${node} resource create-md ${name}`);
      else if (record.resource !== name || record.node !== node) add(`metadata ${name}`, 'problem', `${file} holds the metadata of resource ${record.resource} on node ${record.node}: the wrong disk? (resource create-md ${name} --force makes it a new, empty copy)`);
      else add(`metadata ${name}`, 'ok', `${record.disk}${record.primary ? ', was Primary' : ''}, generation ${record.gi.current}`);
      if (!fs.fstatSync(fd).isBlockDevice()) {
        // A disk in a sparse file can run out of room under the guest: the file system must hold what is not yet written.
        const st = fs.fstatSync(fd);
        const fsFree = fs.statfsSync(file);
        const free = fsFree.bavail * fsFree.bsize;
        const unwritten = Math.max(0, size - st.blocks * 512);
        if (free < unwritten) add(`space ${name}`, 'warning', `${file} is sparse: ${formatSize(unwritten)} of it is not yet allocated and its file system has ${formatSize(free)} free; writes will fail with ENOSPC once it fills (preallocate it: fallocate -l ${size} ${file})`);
      }
    } finally {
      fs.closeSync(fd);
    }
  }

  // ---- free space where duet keeps its state.
  try {
    fs.mkdirSync(o.home, { recursive: true });
    const s = fs.statfsSync(o.home);
    const free = s.bavail * s.bsize;
    add('home', free < FREE_WARN_BYTES ? 'warning' : 'ok', `${o.home}: ${formatSize(free)} free${free < FREE_WARN_BYTES ? ': the event log and the VM consoles need room; free some space' : ''}`);
  } catch (err) {
    add('home', 'problem', `${o.home}: ${errnoCode(err) ?? (err as Error).message}: give a writable directory (--home or DUET_HOME)`);
  }

  // ---- alerts: configured, and nothing stuck in the spool (HOME/alerts, alert-spool.ts).
  const channels = [...(config.alerts?.email ? ['email'] : []), ...(config.alerts?.webhook ? ['webhook'] : [])];
  if (channels.length === 0) add('alerts', 'warning', `no alerts in ${config.file}: nobody is told when a node fails (add alerts: { email: { to, smtp } } or alerts: { webhook: { url } })`);
  else {
    const waiting: string[] = [];
    const bad: string[] = [];
    for (const ch of channels) {
      const dir = path.join(o.home, 'alerts', ch);
      let names: string[] = [];
      try {
        names = fs.readdirSync(dir);
      } catch {
        // No spool yet: nothing waits.
      }
      const n = names.filter((f) => /^\d+\.json$/.test(f)).length;
      const b = names.filter((f) => f.endsWith('.bad')).length;
      const where = ch === 'email' ? `alerts.email.smtp (${new URL(config.alerts!.email!.smtp).host})` : `alerts.webhook.url (${new URL(config.alerts!.webhook!.url).origin})`;
      if (n) waiting.push(`${n} ${ch} alert(s) not sent yet: is ${where} reachable from here?`);
      if (b) bad.push(`${b} damaged ${ch} alert file(s) set aside in ${dir} (*.bad): read them, then remove them`);
    }
    if (waiting.length || bad.length) add('alerts', 'warning', [...waiting, ...bad].join('; '));
    else add('alerts', 'ok', `${channels.join(' and ')}; nothing waiting to be sent`);
  }

  // ---- the witness.
  if (!config.witness) add('witness', 'warning', `no witness in ${config.file}: a lost peer cannot be told from a cut link (add witness: { address })`);
  else if (secret) {
    const port = config.witness.port ?? DEFAULT_WITNESS_PORT;
    try {
      await callAdmin({ host: config.witness.address, port, localAddress: me.address }, signRequest(secret, { cmd: 'witness.ping', node }), { timeoutMs: 3000, what: 'the witness' });
      add('witness', 'ok', `answers at ${config.witness.address}:${port}`);
    } catch (err) {
      add('witness', 'problem', `${(err as Error).message}: start it (duet witness run) and check the network between ${me.address} and ${config.witness.address}`);
    }
  }

  // ---- the peer's clock.
  if (secret) {
    for (const peer of Object.keys(config.nodes).filter((n) => n !== node)) {
      try {
        const t0 = Date.now();
        const s = (await callApi(apiTargetOf(config, peer, secret, `node ${peer}'s daemon`), { cmd: 'cluster.status' }, { timeoutMs: 5000 })) as { time?: string };
        const t1 = Date.now();
        const theirs = s.time ? Date.parse(s.time) : NaN;
        if (!Number.isFinite(theirs)) {
          add(`clock ${peer}`, 'warning', `${peer} did not say its time (an older duet?)`);
          continue;
        }
        const skew = theirs - (t0 + t1) / 2;
        const abs = Math.abs(skew);
        const detail = `${peer}'s clock is ${Math.round(abs)} ms ${skew >= 0 ? 'ahead' : 'behind'} (± ${Math.ceil((t1 - t0) / 2)} ms)`;
        add(`clock ${peer}`, abs > SKEW_PROBLEM_MS ? 'problem' : abs > SKEW_WARN_MS ? 'warning' : 'ok', abs > SKEW_WARN_MS ? `${detail}: run NTP (systemd-timesyncd or chrony) on both nodes` : detail);
      } catch (err) {
        add(`clock ${peer}`, 'warning', `cannot ask ${peer} the time (${(err as Error).message})`);
      }
    }
  }
  return out;
}

function kvmUsable(): { ok: boolean; detail: string } {
  if (!fs.existsSync('/dev/kvm')) {
    const cpu = fs.existsSync('/proc/cpuinfo') ? fs.readFileSync('/proc/cpuinfo', 'utf8') : '';
    const flags = /\b(vmx|svm)\b/.test(cpu);
    return { ok: false, detail: `/dev/kvm missing: VMs run under TCG (correct but slow); ${flags ? 'load the module (modprobe kvm_intel or kvm_amd)' : 'the CPU shows no vmx/svm: enable virtualization in the firmware (or nested virtualization in the host)'}` };
  }
  try {
    fs.closeSync(fs.openSync('/dev/kvm', 'r+'));
    return { ok: true, detail: '/dev/kvm usable' };
  } catch (err) {
    return { ok: false, detail: `/dev/kvm: ${errnoCode(err) ?? (err as Error).message}: VMs run under TCG (slow); add the user to the kvm group` };
  }
}

function tryListen(address: string, port: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', (err) => resolve(errnoCode(err) ?? err.message));
    s.listen({ host: address, port, exclusive: true }, () => s.close(() => resolve(undefined)));
  });
}

/** The metadata record of a disk, read straight from the file (the daemon may hold the disk: reading is harmless). */
async function readMeta(fd: number, size: number): Promise<MetaRecord | undefined> {
  let layout;
  try {
    layout = layoutFor(size);
  } catch {
    return undefined;
  }
  return readRecord({ read: (offset: number, buf: Buffer) => void fs.readSync(fd, buf, 0, buf.length, offset) }, layout);
}

export function formatChecks(checks: Check[]): string {
  return checks.map((c) => `${c.verdict.padEnd(8)} ${c.check.padEnd(18)} ${c.detail}\n`).join('');
}
