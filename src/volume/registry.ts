/**
 * The home directory (`--home`, DUET_HOME, default /var/lib/duet): which
 * pools this machine knows and on which device paths, plus each pool's lock
 * and admin socket. The devices themselves stay the truth (the superblocks
 * name the pool and every member); the registry only says where to look.
 *
 *   HOME/pools/NAME.json   {name, uuid, devices: [absolute paths]}
 *   HOME/pools/NAME.lock   flock(2)ed by the process holding the pool; holds its pid
 *   HOME/pools/NAME.sock   that process's admin socket
 */
import fs from 'node:fs';
import path from 'node:path';
import { native } from '../blockdev/native.js';
import { alive } from '../blockdev/claim.js';
import { NotFoundError, UserError, errnoCode } from '../util/errors.js';

export const DEFAULT_HOME = '/var/lib/duet';

export function resolveHome(option?: string): string {
  return path.resolve(option ?? process.env.DUET_HOME ?? DEFAULT_HOME);
}

export interface PoolEntry {
  name: string;
  uuid: string;
  devices: string[];
}

export class Registry {
  readonly dir: string;

  constructor(readonly home: string) {
    this.dir = path.join(home, 'pools');
  }

  private file(name: string): string {
    return path.join(this.dir, `${name}.json`);
  }

  lockPath(name: string): string {
    return path.join(this.dir, `${name}.lock`);
  }

  socketPath(name: string): string {
    return path.join(this.dir, `${name}.sock`);
  }

  has(name: string): boolean {
    return fs.existsSync(this.file(name));
  }

  get(name: string): PoolEntry {
    let text: string;
    try {
      text = fs.readFileSync(this.file(name), 'utf8');
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') throw new NotFoundError(`pool ${name} does not exist in ${this.home} (duet pool list shows the pools; --home or DUET_HOME picks another home)`);
      throw new UserError(`pool ${name}: cannot read ${this.file(name)} (${errnoCode(err) ?? (err as Error).message})`);
    }
    try {
      const entry = JSON.parse(text) as PoolEntry;
      if (typeof entry.uuid !== 'string' || !Array.isArray(entry.devices)) throw new Error('missing fields');
      return entry;
    } catch (err) {
      throw new UserError(`pool ${name}: ${this.file(name)} is damaged (${(err as Error).message}); fix or remove it`);
    }
  }

  list(): PoolEntry[] {
    let names: string[];
    try {
      names = fs.readdirSync(this.dir).filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5));
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return [];
      throw new UserError(`${this.dir}: cannot list (${errnoCode(err) ?? (err as Error).message})`);
    }
    return names.sort().map((n) => this.get(n));
  }

  /** Atomic replace: a crash leaves the old or the new file. */
  save(entry: PoolEntry): void {
    try {
      fs.mkdirSync(this.dir, { recursive: true });
      const tmp = `${this.file(entry.name)}.tmp-${process.pid}`;
      const fd = fs.openSync(tmp, 'w', 0o644);
      try {
        fs.writeSync(fd, `${JSON.stringify(entry, null, 2)}\n`);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, this.file(entry.name));
      const dirFd = fs.openSync(this.dir, 'r');
      try {
        fs.fsyncSync(dirFd);
      } finally {
        fs.closeSync(dirFd);
      }
    } catch (err) {
      if (err instanceof UserError) throw err;
      throw new UserError(`home ${this.home}: cannot write the pool registry (${errnoCode(err) ?? (err as Error).message}); check --home`);
    }
  }

  /** Which known pool already uses this device path, if any. */
  ownerOf(devicePath: string): string | undefined {
    for (const e of this.list()) if (e.devices.includes(devicePath)) return e.name;
    return undefined;
  }
}

/** Thrown when another live process holds the pool. */
export class PoolInUse extends UserError {
  constructor(
    readonly pool: string,
    readonly pid: number,
  ) {
    super(`pool ${pool} is in use by pid ${pid}`);
  }
}

/**
 * Exclusive hold on a pool for this process: flock(2) on the lock file
 * (released by the kernel if we die), or, without the add-on, a pid file
 * whose owner must be alive.
 */
export class PoolLock {
  private constructor(
    private readonly file: string,
    private readonly fd: number,
    private readonly flocked: boolean,
  ) {}

  static acquire(registry: Registry, name: string): PoolLock {
    const file = registry.lockPath(name);
    try {
      fs.mkdirSync(path.dirname(file), { recursive: true });
    } catch (err) {
      throw new UserError(`home ${registry.home}: cannot create ${path.dirname(file)} (${errnoCode(err)})`);
    }
    if (native) {
      const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
      try {
        native.flock(fd, true, true);
      } catch (err) {
        const pid = readPid(file);
        fs.closeSync(fd);
        if (errnoCode(err) === 'EWOULDBLOCK' || errnoCode(err) === 'EAGAIN') throw new PoolInUse(name, pid);
        throw new UserError(`pool ${name}: cannot lock ${file} (${errnoCode(err) ?? (err as Error).message})`);
      }
      fs.ftruncateSync(fd, 0);
      fs.writeSync(fd, `${process.pid}\n`, 0);
      return new PoolLock(file, fd, true);
    }
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
        fs.writeSync(fd, `${process.pid}\n`, 0);
        return new PoolLock(file, fd, false);
      } catch (err) {
        if (errnoCode(err) !== 'EEXIST') throw new UserError(`pool ${name}: cannot create ${file} (${errnoCode(err)})`);
        const pid = readPid(file);
        if (pid > 0 && pid !== process.pid && alive(pid)) throw new PoolInUse(name, pid);
        // Its owner died without cleaning up: take it over.
        fs.rmSync(file, { force: true });
      }
    }
    throw new UserError(`pool ${name}: cannot take ${file}; remove it if no duet process runs`);
  }

  release(): void {
    try {
      if (this.flocked) {
        fs.ftruncateSync(this.fd, 0);
        native?.funlock(this.fd);
      } else {
        fs.rmSync(this.file, { force: true });
      }
    } finally {
      fs.closeSync(this.fd);
    }
  }
}

function readPid(file: string): number {
  try {
    return Number.parseInt(fs.readFileSync(file, 'utf8').trim(), 10) || 0;
  } catch {
    return 0;
  }
}


