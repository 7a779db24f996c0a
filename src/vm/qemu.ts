/**
 * One VM's QEMU process on this node: started detached (a daemon restart
 * leaves it running), found again by its pid file and QMP socket, watched
 * until it exits. QEMU's own exit (guest poweroff, crash, kill) is noticed
 * through the QMP socket closing, which works for a process this daemon did
 * not start too.
 */
import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import { UserError } from '../util/errors.js';
import type { Logger } from '../util/log.js';
import { QmpClient, type QmpEvent } from './qmp.js';
import { QEMU_BINARY, qemuArgs, type VmPaths, type VmSpec } from './qemu-args.js';

const START_TIMEOUT_MS = 15_000;
const POLL_MS = 50;

export interface QemuExit {
  /** What QEMU said last (its SHUTDOWN event): guest-shutdown, host-qmp-quit, host-signal, ... */
  reason: string;
  /** The guest asked for it (poweroff, reset with -no-reboot). */
  byGuest: boolean;
}

interface QemuEvents {
  exit: [QemuExit];
  event: [QmpEvent];
}

/** What QEMU runs here: `-accel kvm` only where /dev/kvm opens read-write (it boots nothing otherwise). */
export function detectAccel(): 'kvm' | 'tcg' {
  try {
    fs.closeSync(fs.openSync('/dev/kvm', 'r+'));
    return 'kvm';
  } catch {
    return 'tcg';
  }
}

export class QemuProcess extends EventEmitter<QemuEvents> {
  private exited: QemuExit | undefined;
  private lastShutdown: QemuExit | undefined;
  private qmpLost = false;

  private constructor(
    readonly name: string,
    readonly paths: VmPaths,
    readonly pid: number,
    readonly qmp: QmpClient,
    private readonly log: Logger,
  ) {
    super();
    qmp.on('event', (e) => {
      if (e.event === 'SHUTDOWN') {
        const data = e.data ?? {};
        this.lastShutdown = { reason: String(data.reason ?? 'unknown'), byGuest: data.guest === true };
      }
      this.emit('event', e);
    });
    qmp.on('close', () => void this.watchExit());
  }

  /**
   * Start QEMU for `spec`; resolves once its QMP answers. A QEMU that exits
   * first (a bad option, a disk it cannot open) is a one-line UserError
   * quoting the last line it printed.
   */
  static async start(spec: VmSpec, paths: VmPaths, log: Logger, options: { incoming?: boolean; generation?: number; binary?: string } = {}): Promise<QemuProcess> {
    fs.mkdirSync(paths.dir, { recursive: true, mode: 0o700 });
    // The files of a QEMU that still runs are its only trace: removing them would start a second copy on the same disks.
    const running = QemuProcess.livePid(paths);
    if (running !== undefined) throw new UserError(`vm ${spec.name}: a QEMU (pid ${running}) already runs for it here: vm stop ${spec.name} first`, 1);
    for (const f of [paths.qmp, paths.pid]) fs.rmSync(f, { force: true });
    const args = qemuArgs(spec, paths, options);
    const stderr = fs.openSync(paths.stderr, 'w');
    let child;
    try {
      child = spawn(options.binary ?? QEMU_BINARY, args, { detached: true, stdio: ['ignore', stderr, stderr] });
    } finally {
      fs.closeSync(stderr);
    }
    let exit: { code: number | null; signal: string | null } | undefined;
    let spawnError: Error | undefined;
    child.once('exit', (code, signal) => (exit = { code, signal }));
    child.once('error', (err) => (spawnError = err));
    // Not ours to wait for: the VM outlives this daemon.
    child.unref();
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      if (spawnError) {
        const code = (spawnError as NodeJS.ErrnoException).code;
        throw new UserError(code === 'ENOENT' ? `vm ${spec.name}: ${options.binary ?? QEMU_BINARY} not found: install qemu-system-x86 (apt-get install qemu-system-x86)` : `vm ${spec.name}: cannot run QEMU (${spawnError.message})`);
      }
      if (exit) throw new UserError(`vm ${spec.name}: QEMU did not start: ${stderrSummary(paths.stderr) || `exit ${exit.code ?? exit.signal}`}`);
      if (fs.existsSync(paths.qmp)) {
        try {
          const qmp = await QmpClient.connect(paths.qmp);
          const p = new QemuProcess(spec.name, paths, child.pid!, qmp, log);
          child.once('exit', () => void p.watchExit());
          return p;
        } catch {
          // The socket is there before QEMU accepts on it: try again.
        }
      }
      if (Date.now() > deadline) {
        if (child.pid !== undefined) killQuietly(child.pid);
        throw new UserError(`vm ${spec.name}: QEMU did not answer on ${paths.qmp} within ${START_TIMEOUT_MS / 1000} s: ${stderrSummary(paths.stderr) || 'no error printed'}`);
      }
      await sleep(POLL_MS);
    }
  }

  /** The pid of this VM's QEMU if its pid file names one that runs (not a recycled pid), whether or not its QMP answers. */
  static livePid(paths: VmPaths): number | undefined {
    let pid: number;
    try {
      pid = Number(fs.readFileSync(paths.pid, 'utf8').trim());
    } catch {
      return undefined;
    }
    return Number.isInteger(pid) && pid > 0 && isOurQemu(pid, paths) ? pid : undefined;
  }

  /**
   * The QEMU of a VM started before this daemon, if it still runs (its pid file and QMP socket say so).
   * Undefined also when it runs but its QMP does not answer (livePid tells): the caller must not take it for gone.
   */
  static async attach(name: string, paths: VmPaths, log: Logger): Promise<QemuProcess | undefined> {
    const pid = QemuProcess.livePid(paths);
    if (pid === undefined) return undefined;
    let qmp: QmpClient;
    try {
      qmp = await QmpClient.connect(paths.qmp);
    } catch (err) {
      log.warn({ event: 'vm-attach-failed', vm: name, pid, err: (err as Error).message }, `vm ${name}: QEMU ${pid} runs but its QMP does not answer: ${(err as Error).message}`);
      return undefined;
    }
    return new QemuProcess(name, paths, pid, qmp, log);
  }

  get running(): boolean {
    return this.exited === undefined;
  }

  async status(): Promise<{ status: string; running: boolean }> {
    return this.qmp.execute<{ status: string; running: boolean }>('query-status');
  }

  /** Ask the guest to power off (ACPI); kill QEMU if it has not exited after `timeoutMs`. */
  async powerdown(timeoutMs: number): Promise<QemuExit> {
    if (this.exited) return this.exited;
    await this.qmp.execute('system_powerdown').catch(() => undefined);
    const exit = await this.waitExit(timeoutMs);
    if (exit) return exit;
    this.log.warn({ event: 'vm-powerdown-timeout', vm: this.name, timeoutMs }, `vm ${this.name}: the guest did not power off within ${timeoutMs / 1000} s: killing QEMU`);
    return this.kill();
  }

  /** Kill QEMU at once (SIGKILL): the guest loses what it had not written. */
  async kill(): Promise<QemuExit> {
    if (this.exited) return this.exited;
    this.lastShutdown = { reason: 'killed', byGuest: false };
    killQuietly(this.pid);
    const exit = await this.waitExit(5000);
    if (!exit) throw new UserError(`vm ${this.name}: QEMU ${this.pid} does not die (SIGKILL sent): check the process by hand`);
    return exit;
  }

  /** Resolves when QEMU has exited (undefined if it has not within `timeoutMs`). */
  waitExit(timeoutMs: number): Promise<QemuExit | undefined> {
    if (this.exited) return Promise.resolve(this.exited);
    const exited = new Promise<QemuExit | undefined>((resolve) => {
      const timer = setTimeout(() => {
        this.off('exit', done);
        resolve(undefined);
      }, timeoutMs);
      const done = (e: QemuExit): void => {
        clearTimeout(timer);
        resolve(e);
      };
      this.once('exit', done);
    });
    // No QMP to close when it goes (lost earlier, QEMU lived on): watch the process itself (after listening:
    // a process gone already is reported at once).
    if (this.qmp.isClosed) void this.watchExit(timeoutMs);
    return exited;
  }

  /** The QMP socket closed or the child exited: wait (bounded) for the process to be gone, then report the exit once. */
  private async watchExit(maxMs = 10_000): Promise<void> {
    if (this.exited) return;
    const deadline = Date.now() + maxMs;
    while (Date.now() < deadline && processAlive(this.pid) && isOurQemu(this.pid, this.paths)) await sleep(POLL_MS);
    if (this.exited) return;
    if (processAlive(this.pid) && isOurQemu(this.pid, this.paths)) {
      // QMP gone, the process alive: a QEMU nobody can steer. Report it (once); the caller decides (kill).
      if (this.qmpLost) return;
      this.qmpLost = true;
      this.log.error({ event: 'vm-qmp-lost', vm: this.name, pid: this.pid }, `vm ${this.name}: lost QMP to QEMU ${this.pid}, which still runs`);
      return;
    }
    this.exited = this.lastShutdown ?? { reason: 'crashed', byGuest: false };
    this.qmp.close();
    for (const f of [this.paths.qmp, this.paths.pid]) fs.rmSync(f, { force: true });
    this.emit('exit', this.exited);
  }

  /** Leave QEMU running (daemon stop): only the QMP session ends. */
  detach(): void {
    this.qmp.removeAllListeners('close');
    this.qmp.close();
  }
}

/** A pid that is this VM's QEMU (not a recycled pid): its command line names this VM's QMP socket. */
function isOurQemu(pid: number, paths: VmPaths): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(paths.qmp);
  } catch {
    return false;
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function killQuietly(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // Gone already.
  }
}

/** QEMU's last error line, without its program-name prefix and the long JSON of a -blockdev. */
export function stderrSummary(file: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
  const last = lines[lines.length - 1] ?? '';
  // "qemu-system-x86_64: -blockdev {...}: Failed to connect to ...": the part after the program and the option.
  const message = last.replace(/^qemu-system-[\w-]+: /, '').replace(/^-[\w-]+ (\{.*\}|\S+): /, '');
  return message.length > 300 ? `${message.slice(0, 300)}...` : message;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
