/**
 * One process at a time per disk: the policy FileDevice.open applies to
 * every backing device duet opens (a node's disks, pool devices, `serve`
 * paths), so an offline command, a `serve` or a second daemon never writes
 * (or reads half-written data) behind the back of the process using it.
 *
 * - A block device is opened O_EXCL: Linux refuses (EBUSY) while it is
 *   mounted, part of a device-mapper/md device, or open O_EXCL elsewhere.
 * - A regular file gets a lock file beside it, DISK.duet-lock, holding the
 *   pid and start time of its holder (a pid reused by another program is
 *   not mistaken for the holder; a holder that died leaves a stale file
 *   that the next open takes over). With the native add-on the disk file is
 *   also flock(2)ed, so the kernel itself keeps two duet processes apart
 *   and drops the lock when its holder dies, whatever becomes of the lock
 *   file. Without the add-on the lock file is all there is: it keeps duet
 *   processes apart (native or not, since both write it), and two that
 *   find the same stale file at the same instant could both take it.
 *   Neither stops a program that is not duet: locks on files are advisory.
 *
 * The claim is per open, not per process: a second open in this process is
 * refused too, except for the serve worker threads, which re-open what
 * their process already holds (`exclusive: false`).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { NativeOps } from './native.js';
import { errnoCode, UserError } from '../util/errors.js';

/** Another process (or another open in this one) holds the disk. */
export class DiskInUse extends UserError {
  constructor(
    readonly disk: string,
    readonly holder: string | undefined,
    advice = 'stop that process first (a disk is used by one process at a time)',
  ) {
    super(`disk ${disk} is in use by ${holder ?? 'another program'}: ${advice}`);
  }
}

export interface DiskClaim {
  release(): void;
}

const NO_CLAIM: DiskClaim = { release: () => undefined };

/** Where the pid of the process holding regular file `file` is kept. */
export function lockFileOf(file: string): string {
  return `${realPath(file)}.duet-lock`;
}

/** Extra open(2) flags that claim `file`: O_EXCL when it is a block device. */
export function exclusiveOpenFlags(file: string): number {
  try {
    return fs.statSync(file).isBlockDevice() ? fs.constants.O_EXCL : 0;
  } catch {
    return 0; // the open itself reports what is wrong with the path
  }
}

/** Why the O_EXCL open of block device `file` failed with EBUSY, as an error naming the holder. */
export function blockDeviceInUse(file: string): DiskInUse {
  try {
    const rdev = fs.statSync(file, { bigint: true }).rdev;
    const { major, minor } = splitDev(rdev);
    for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
      const f = line.split(' ');
      if (f[2] === `${major}:${minor}`) return new DiskInUse(file, `the mount at ${unescapeMount(f[4])}`, `mounted at ${unescapeMount(f[4])}: unmount it first`);
    }
    const holders = readDirOr(`/sys/dev/block/${major}:${minor}/holders`);
    if (holders.length > 0) return new DiskInUse(file, `the kernel (${holders.join(', ')})`, `it is part of ${holders.join(', ')}: take it out of there first`);
    const real = realPath(file);
    for (const pid of readDirOr('/proc').filter((d) => /^\d+$/.test(d))) {
      for (const fd of readDirOr(`/proc/${pid}/fd`)) {
        let target: string;
        try {
          target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
        } catch {
          continue;
        }
        if (target === real) return new DiskInUse(file, describePid(Number(pid)));
      }
    }
  } catch {
    /* naming the holder is best effort */
  }
  return new DiskInUse(file, undefined);
}

/**
 * Claim regular file `file`, open as `fd`: flock with the add-on, then the
 * lock file either way. Throws DiskInUse if it is held.
 */
export function claimFile(file: string, fd: number, ops: NativeOps | null, readOnly: boolean): DiskClaim {
  if (ops) {
    try {
      ops.flock(fd, true, true);
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'EWOULDBLOCK' || code === 'EAGAIN') throw new DiskInUse(file, liveHolder(lockFileOf(file)) ?? flockHolder(fd));
      // A file system without flock (some network ones): the lock file still keeps duet processes apart.
      if (code !== 'ENOLCK' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw new UserError(`disk ${file}: cannot lock it (${code ?? (err as Error).message})`);
    }
  }
  const lock = lockFileOf(file);
  try {
    takeLockFile(file, lock);
  } catch (err) {
    if (ops) ops.funlock(fd);
    if (err instanceof UserError) throw err;
    const code = errnoCode(err);
    // Nobody can write a disk on a read-only file system, and a reader there harms no one.
    if (readOnly && (code === 'EROFS' || code === 'EACCES' || code === 'EPERM')) return NO_CLAIM;
    if (ops) return { release: () => ops.funlock(fd) }; // flock alone still holds
    throw new UserError(
      `disk ${file}: cannot create its lock file ${lock} (${code ?? (err as Error).message}): make its directory writable, or build the native add-on (npm install) so the disk itself is locked`,
    );
  }
  const mine = ownStamp();
  return {
    release() {
      // Only our own stamp: never a file another process took over meanwhile.
      try {
        if (fs.readFileSync(lock, 'utf8') === mine) fs.rmSync(lock, { force: true });
      } catch {
        /* already gone */
      }
      if (ops) ops.funlock(fd);
    },
  };
}

/** Create `lock` holding our stamp; a stale one (its holder is gone) is replaced. */
function takeLockFile(file: string, lock: string): void {
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fd = fs.openSync(lock, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
      try {
        fs.writeSync(fd, ownStamp());
      } finally {
        fs.closeSync(fd);
      }
      return;
    } catch (err) {
      if (errnoCode(err) !== 'EEXIST') throw err;
    }
    const holder = liveHolder(lock);
    if (holder) throw new DiskInUse(file, holder);
    fs.rmSync(lock, { force: true });
  }
  throw new UserError(`disk ${file}: cannot take its lock file ${lock}; remove it if no duet process uses the disk`);
}

/** The live process named in a lock file, described; undefined when there is none or it is stale. */
function liveHolder(lock: string): string | undefined {
  let text: string;
  try {
    text = fs.readFileSync(lock, 'utf8');
  } catch {
    return undefined;
  }
  const [pidText, startText] = text.trim().split(/\s+/);
  const pid = Number(pidText);
  if (!Number.isSafeInteger(pid) || pid <= 0) return undefined;
  if (!alive(pid)) return undefined;
  const start = startTimeOf(pid);
  if (start !== undefined && startText !== undefined && start !== startText) return undefined; // the pid was reused
  return describePid(pid);
}

/** Without a lock file to read: the flock holder of the same inode, from /proc/locks. */
function flockHolder(fd: number): string | undefined {
  try {
    const st = fs.fstatSync(fd, { bigint: true });
    const { major, minor } = splitDev(st.dev);
    for (const line of fs.readFileSync('/proc/locks', 'utf8').split('\n')) {
      // "1: FLOCK  ADVISORY  WRITE 1234 00:2e:5678 0 EOF" (waiters have "->" after the number)
      const f = line.trim().split(/\s+/);
      if (f[1] !== 'FLOCK') continue;
      const [maj, min, ino] = (f[5] ?? '').split(':');
      if (BigInt(`0x${maj}`) === major && BigInt(`0x${min}`) === minor && BigInt(ino) === st.ino) return describePid(Number(f[4]));
    }
  } catch {
    /* best effort */
  }
  return undefined;
}

function ownStamp(): string {
  return `${process.pid} ${startTimeOf(process.pid) ?? '?'}\n`;
}

/** Start time of a process (clock ticks since boot, /proc/PID/stat field 22): tells a reused pid apart. */
function startTimeOf(pid: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** Is process `pid` running (ours or another user's)? */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return errnoCode(err) === 'EPERM';
  }
}

/** "this process (pid N)" or "pid N (duet node run ...)": who to stop. */
export function describePid(pid: number): string {
  if (pid === process.pid) return `this process (pid ${pid})`;
  let argv: string[] = [];
  try {
    argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((a) => a !== '');
  } catch {
    /* gone, or not Linux */
  }
  if (argv.length === 0) return `pid ${pid}`;
  // `node .../bin/duet node run ...` reads better as `duet node run ...`.
  const duet = argv.findIndex((a) => /(^|\/)duet$/.test(a));
  const words = duet >= 0 ? ['duet', ...argv.slice(duet + 1)] : [path.basename(argv[0]), ...argv.slice(1)];
  let cmd = words.join(' ').replace(/\s+/g, ' ');
  if (cmd.length > 160) cmd = `${cmd.slice(0, 157)}...`;
  return `pid ${pid} (${cmd})`;
}

/** glibc's major()/minor() of a dev_t. */
function splitDev(dev: bigint): { major: bigint; minor: bigint } {
  return {
    major: ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn),
    minor: (dev & 0xffn) | ((dev >> 12n) & ~0xffn),
  };
}

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

function realPath(file: string): string {
  try {
    return fs.realpathSync(file);
  } catch {
    return path.resolve(file);
  }
}

function readDirOr(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch {
    return [];
  }
}
