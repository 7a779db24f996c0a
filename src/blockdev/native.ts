/**
 * Loader for the optional N-API add-on (native/duet_native.c, built by
 * `npm install` through node-gyp into build/Release/duet_native.node) that
 * gives Node the Linux syscalls it lacks: fallocate punch-hole/zero-range,
 * lseek SEEK_DATA/SEEK_HOLE, flock, and the BLKGETSIZE64/BLKDISCARD ioctls.
 *
 * `native` is null when the add-on is missing, fails to load, or
 * DUET_NO_NATIVE=1 is set; callers must then degrade (the file BlockDevice
 * reports no trim/extents capability). Nothing here throws at import time.
 *
 * All functions are synchronous and throw an Error with `.code` (errno name,
 * e.g. 'EOPNOTSUPP', 'EWOULDBLOCK'), `.errno` and `.syscall` on failure.
 */

import { createRequire } from 'node:module';
import { existsSync, fstatSync, readFileSync, realpathSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeOps {
  /** fallocate(PUNCH_HOLE|KEEP_SIZE): deallocate, reads return zeros. */
  punchHole(fd: number, offset: number, length: number): void;
  /** fallocate(ZERO_RANGE|KEEP_SIZE): zero the range, it stays allocated. */
  zeroRange(fd: number, offset: number, length: number): void;
  seekData(fd: number, offset: number): number; // -1 = no more data
  seekHole(fd: number, offset: number): number; // -1 = beyond end
  /** flock(2) on the open file description; non-blocking conflict throws code 'EWOULDBLOCK'. */
  flock(fd: number, exclusive: boolean, nonBlocking: boolean): void;
  funlock(fd: number): void;
  /** ioctl(BLKGETSIZE64): size in bytes of a block device. */
  blockDeviceSize(fd: number): number;
  /** ioctl(BLKDISCARD) on a block device. */
  discard(fd: number, offset: number, length: number): void;
  /** fcntl(F_DUPFD_CLOEXEC): a second descriptor for the same open file (or socket). */
  dup(fd: number): number;
}

const FUNCTIONS: readonly (keyof NativeOps)[] = [
  'punchHole',
  'zeroRange',
  'seekData',
  'seekHole',
  'flock',
  'funlock',
  'blockDeviceSize',
  'discard',
  'dup',
];

const ADDON_RELATIVE = join('build', 'Release', 'duet_native.node');

/**
 * The package root: the nearest ancestor of this file holding package.json
 * (this file runs as dist/src/blockdev/native.js, so normally three levels
 * up), falling back to exactly three levels up.
 */
function packageRoot(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  let dir = here;
  for (;;) {
    if (existsSync(join(dir, 'package.json'))) return dir;
    const parent = dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  return join(here, '..', '..', '..');
}

/** Path the add-on is loaded from. */
export function nativeAddonPath(): string {
  return join(packageRoot(), ADDON_RELATIVE);
}

interface LoadResult {
  ops: NativeOps | null;
  reason: string | undefined;
}

function tryLoad(): LoadResult {
  try {
    const flag = process.env['DUET_NO_NATIVE'];
    if (flag !== undefined && flag !== '' && flag !== '0') {
      return { ops: null, reason: 'disabled by DUET_NO_NATIVE' };
    }
    if (process.platform !== 'linux') {
      return { ops: null, reason: `native add-on is Linux-only (platform ${process.platform})` };
    }
    const path = nativeAddonPath();
    if (!existsSync(path)) {
      return { ops: null, reason: `native add-on not built (${path} missing; run npm install)` };
    }
    const require = createRequire(import.meta.url);
    const mod = require(path) as Partial<Record<keyof NativeOps, unknown>>;
    const missing = FUNCTIONS.filter((name) => typeof mod[name] !== 'function');
    if (missing.length > 0) {
      return { ops: null, reason: `native add-on at ${path} lacks ${missing.join(', ')} (stale build?)` };
    }
    return { ops: mod as NativeOps, reason: undefined };
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    return { ops: null, reason: `native add-on failed to load: ${msg}` };
  }
}

const initial = tryLoad();

/** null when the add-on is not built or DUET_NO_NATIVE=1 is set in the environment. */
export const native: NativeOps | null = initial.ops;
/** Why native is null (for logs), undefined when loaded. */
export const nativeUnavailableReason: string | undefined = initial.reason;

/** Loads the add-on again, re-reading DUET_NO_NATIVE (for tests). Never throws. */
export function loadNative(): NativeOps | null {
  return tryLoad().ops;
}

function errnoError(code: string, errno: number, syscall: string, message: string): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error(`${code}: ${syscall} failed: ${message}`);
  err.code = code;
  err.errno = errno;
  err.syscall = syscall;
  return err;
}

/**
 * Size in bytes of a block device from sysfs (/sys/class/block/<name>/size,
 * in 512-byte sectors), <name> being the basename of realpath(path). `fd` is
 * used to check that it really is a block device (throws code 'ENOTTY' like
 * the ioctl would otherwise).
 */
export function blockDeviceSizeFromSysfs(path: string, fd: number): number {
  if (!fstatSync(fd).isBlockDevice()) {
    throw errnoError('ENOTTY', 25, 'blockDeviceSize', `${path} is not a block device`);
  }
  const name = basename(realpathSync(path));
  const text = readFileSync(join('/sys/class/block', name, 'size'), 'utf8').trim();
  const sectors = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(sectors * 512)) {
    throw errnoError('EINVAL', 22, 'blockDeviceSize', `unexpected sysfs size "${text}" for ${name}`);
  }
  return sectors * 512;
}

/** Size in bytes of the block device `path` open as `fd`: the ioctl if the add-on is loaded, else sysfs. */
export function blockDeviceSizeOf(path: string, fd: number): number {
  if (native !== null) return native.blockDeviceSize(fd);
  return blockDeviceSizeFromSysfs(path, fd);
}
