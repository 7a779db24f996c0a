/**
 * End-to-end test harness: start `bin/duet serve` as a real process, run real
 * client programs with hard timeouts, make temporary files.
 *
 * Rules every e2e test follows: it kills only the processes it started (by
 * pid), removes its temporary directories, undoes its mounts even when it
 * fails, and bounds every wait.
 */
import { spawn, ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** dist/test/e2e/harness.js is three levels below the repository root. */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const DUET = path.join(ROOT, 'bin', 'duet');
/** Debian's python3 has the libnbd bindings; a pyenv python3 may shadow it on PATH. */
export const PYTHON = '/usr/bin/python3';
/** Environment for client tools: system binaries first (nbdsh runs "python3 -m nbd"). */
export const TOOL_ENV: NodeJS.ProcessEnv = {
  ...process.env,
  PATH: `/usr/sbin:/usr/bin:/sbin:/bin:${process.env.PATH ?? ''}`,
  LIBNBD_DEBUG: '0',
};

/** Minimal view of node:test's TestContext (t.after) so helpers work in tests and hooks. */
export interface AfterContext {
  after(fn: () => unknown): void;
}

// Every child we start, so a crashed test run still kills them (by pid) on exit.
const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of live) {
    if (c.exitCode === null && c.signalCode === null && c.pid) {
      try {
        process.kill(c.pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
  }
});

function track(child: ChildProcess): void {
  live.add(child);
  child.once('exit', () => live.delete(child));
}

function exitOf(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Race `p` against a timer; the timer never keeps the process alive. */
export async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([p, t]);
  } finally {
    clearTimeout(timer);
  }
}

/** Poll `check` until it returns a truthy value (bounded). */
export async function waitFor<T>(check: () => T | undefined | null | false, ms: number, what: string, everyMs = 20): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await delay(everyMs);
  }
}

/** Poll an async `check` until it returns a truthy value (bounded); a check that throws counts as "not yet". */
export async function until<T>(check: () => T | Promise<T>, ms: number, what: string | (() => string), everyMs = 200): Promise<NonNullable<T>> {
  const deadline = Date.now() + ms;
  for (;;) {
    let v: T | undefined;
    try {
      v = await check();
    } catch {
      v = undefined;
    }
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${typeof what === 'string' ? what : what()}`);
    await delay(everyMs);
  }
}

// ---- run -------------------------------------------------------------------

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  /** For assertion messages. */
  describe(): string;
}

export interface RunOptions {
  timeoutMs?: number;
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** Run a program to completion; killed (SIGKILL, by pid) after timeoutMs. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  return new Promise((resolve, reject) => {
    // cwd: a neutral directory, so tools that drop files (fio verify state) never write into the repository
    const child = spawn(cmd, args, { env: opts.env ?? TOOL_ENV, cwd: opts.cwd ?? os.tmpdir(), stdio: ['pipe', 'pipe', 'pipe'] });
    track(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      if (child.pid) {
        try {
          process.kill(child.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const stdout = Buffer.concat(out).toString();
      const stderr = Buffer.concat(err).toString();
      resolve({
        code,
        signal,
        stdout,
        stderr,
        timedOut,
        describe: () =>
          `$ ${cmd} ${args.map((a) => (/[\s'"]/.test(a) ? JSON.stringify(a) : a)).join(' ').slice(0, 400)}\n` +
          `exit ${code}${signal ? ` signal ${signal}` : ''}${timedOut ? ` (killed after ${timeoutMs} ms)` : ''}\n` +
          `--- stdout ---\n${clip(stdout)}\n--- stderr ---\n${clip(stderr)}`,
      });
    });
    child.stdin!.on('error', () => {
      /* the program may exit without reading its input */
    });
    child.stdin!.end(opts.input ?? '');
  });
}

function clip(s: string, max = 4000): string {
  return s.length <= max ? s : `${s.slice(0, max / 2)}\n... (${s.length - max} chars cut) ...\n${s.slice(-max / 2)}`;
}

/** Run a Python 3 script with the libnbd bindings; argv[1..] = args. */
export function python(script: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(PYTHON, ['-c', script, ...args], opts);
}

/** Start a long-running program (killed by pid in t.after). */
export function spawnTracked(t: AfterContext, cmd: string, args: string[], env: NodeJS.ProcessEnv = TOOL_ENV): {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
} {
  const child = spawn(cmd, args, { env, cwd: os.tmpdir(), stdio: ['pipe', 'pipe', 'pipe'] });
  track(child);
  let out = '';
  let err = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  child.on('error', () => {
    /* reported through exit */
  });
  const exited = exitOf(child);
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null && child.pid) {
      try {
        process.kill(child.pid, 'SIGKILL');
      } catch {
        /* gone */
      }
      await withTimeout(exited, 5000, `${cmd} to exit after SIGKILL`).catch(() => undefined);
    }
  });
  return { child, stdout: () => out, stderr: () => err, exited };
}

// ---- duet serve ---------------------------------------------------------------

export interface StopResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  stdout: string;
  /** How long the server took to exit after the signal. */
  ms: number;
}

export interface Server {
  pid: number;
  /** One per export, in order: nbd://HOST:PORT/NAME */
  uris: string[];
  host: string;
  port: number;
  /** nbd://HOST:PORT (the default export "") */
  base: string;
  stdout(): string;
  stderr(): string;
  /** The stdout and stderr so far, for assertion messages. */
  describe(): string;
  /** Send `signal` (default SIGTERM) and wait (bounded) for the exit; SIGKILL if it hangs. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<StopResult>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface StartOptions {
  /** Registers stop (SIGKILL fallback) in t.after. */
  t?: AfterContext;
  /** Don't add `--listen 127.0.0.1:0`. */
  noListen?: boolean;
  /** How many `listening` lines to wait for (default: positional arguments). */
  exports?: number;
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
}

function countPositional(args: string[]): number {
  let n = 0;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--listen') i++;
    else if (!a.startsWith('--')) n++;
  }
  return n;
}

/** `node bin/duet serve ARGS --listen 127.0.0.1:0`, resolved once it prints its listening lines. */
export async function startServe(args: string[], opts: StartOptions = {}): Promise<Server> {
  const full = ['serve', ...args];
  if (!opts.noListen && !args.includes('--listen')) full.push('--listen', '127.0.0.1:0');
  const want = opts.exports ?? countPositional(args);
  const child = spawn(process.execPath, [DUET, ...full], {
    cwd: ROOT,
    env: { ...process.env, ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  track(child);
  let out = '';
  let err = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = exitOf(child);
  const describe = (): string => `duet ${full.join(' ')} (pid ${child.pid})\n--- server stdout ---\n${clip(out)}\n--- server stderr ---\n${clip(err)}`;

  let stopped: Promise<StopResult> | null = null;
  const stop = (signal: NodeJS.Signals = 'SIGTERM', timeoutMs = 10_000): Promise<StopResult> => {
    if (stopped) return stopped;
    stopped = (async () => {
      const t0 = Date.now();
      if (child.exitCode === null && child.signalCode === null && child.pid) {
        try {
          process.kill(child.pid, signal);
        } catch {
          /* gone */
        }
      }
      let res: { code: number | null; signal: NodeJS.Signals | null };
      try {
        res = await withTimeout(exited, timeoutMs, `duet serve to exit after ${signal}`);
      } catch {
        if (child.pid) {
          try {
            process.kill(child.pid, 'SIGKILL');
          } catch {
            /* gone */
          }
        }
        res = await withTimeout(exited, 5000, 'duet serve to exit after SIGKILL').catch(() => ({ code: null, signal: null }));
        err += `\n[harness: no exit within ${timeoutMs} ms of ${signal}: killed with SIGKILL]`;
        return { code: null, signal: 'SIGKILL' as NodeJS.Signals, stderr: err, stdout: out, ms: Date.now() - t0 };
      }
      return { ...res, stderr: err, stdout: out, ms: Date.now() - t0 };
    })();
    return stopped;
  };
  opts.t?.after(() => stop('SIGKILL', 5000));

  const timeoutMs = opts.timeoutMs ?? 10_000;
  const deadline = Date.now() + timeoutMs;
  const lines = (): string[] => out.split('\n').filter((l) => l.startsWith('listening '));
  while (lines().length < Math.max(want, 1)) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`duet serve exited (${child.exitCode ?? child.signalCode}) before listening\n${describe()}`);
    }
    if (Date.now() > deadline) {
      await stop('SIGKILL', 2000);
      throw new Error(`duet serve did not print ${want} listening line(s) within ${timeoutMs} ms\n${describe()}`);
    }
    await delay(20);
  }
  const uris = lines().map((l) => l.slice('listening '.length).trim());
  const m = /^nbd:\/\/(\[[^\]]+\]|[^:/]+):(\d+)\//.exec(uris[0]);
  if (!m) {
    await stop('SIGKILL', 2000);
    throw new Error(`cannot parse listening line "${uris[0]}"\n${describe()}`);
  }
  const host = m[1].replace(/^\[|\]$/g, '');
  const port = Number(m[2]);
  return {
    pid: child.pid!,
    uris,
    host,
    port,
    base: `nbd://${m[1]}:${port}`,
    stdout: () => out,
    stderr: () => err,
    describe,
    stop,
    exited,
  };
}

/** Undo steps, run last-in first-out even when the test fails (mounts, loop devices, FUSE). */
export class Cleanup {
  private readonly steps: { what: string; fn: () => Promise<unknown> }[] = [];
  push(what: string, fn: () => Promise<unknown>): void {
    this.steps.push({ what, fn });
  }
  async runAll(): Promise<string[]> {
    const problems: string[] = [];
    while (this.steps.length) {
      const s = this.steps.pop()!;
      try {
        await withTimeout(s.fn(), 20_000, s.what);
      } catch (err) {
        problems.push(`${s.what}: ${(err as Error).message}`);
      }
    }
    return problems;
  }
}

// ---- files -------------------------------------------------------------------

/** A fresh directory under os.tmpdir(), removed in t.after. */
export function tmpDir(t: AfterContext, prefix = 'duet-e2e-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A file of `size` random bytes. */
export function randomFile(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = 1024 * 1024;
    for (let done = 0; done < size; ) {
      const n = Math.min(chunk, size - done);
      fs.writeSync(fd, crypto.randomBytes(n), 0, n, done);
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** A sparse file of `size` bytes (all holes). */
export function sparseFile(file: string, size: number): void {
  fs.closeSync(fs.openSync(file, 'w'));
  fs.truncateSync(file, size);
}

/** Read `length` bytes at `offset` of a file. */
export function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, buf, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return buf.subarray(0, done);
  } finally {
    fs.closeSync(fd);
  }
}

export function sha256(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** First differing offset of two files, or -1 when identical (sizes included). */
export function firstDifference(a: string, b: string): number {
  const A = fs.readFileSync(a);
  const B = fs.readFileSync(b);
  const n = Math.min(A.length, B.length);
  if (A.length === B.length && A.equals(B)) return -1;
  for (let i = 0; i < n; i += 4096) {
    const end = Math.min(n, i + 4096);
    if (!A.subarray(i, end).equals(B.subarray(i, end))) {
      for (let j = i; j < end; j++) if (A[j] !== B[j]) return j;
    }
  }
  return n;
}

/** Does a program exist on this machine? */
export function haveProgram(name: string): boolean {
  for (const dir of (TOOL_ENV.PATH ?? '').split(':')) {
    if (dir && fs.existsSync(path.join(dir, name))) return true;
  }
  return false;
}

/** Every non-empty stderr line of the server must be a JSON object (logs are JSON lines). */
export function nonJsonLines(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((l) => l.trim() !== '' && !l.startsWith('[harness:'))
    .filter((l) => {
      try {
        const v = JSON.parse(l);
        return typeof v !== 'object' || v === null;
      } catch {
        return true;
      }
    });
}
