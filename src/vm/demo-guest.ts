/**
 * A tiny guest for VM tests and the demo: a busybox initramfs built from the
 * host's Debian packages (linux-image-amd64, busybox-static), booted with
 * QEMU's -kernel/-initrd, whose only job is to write a self-checking pattern
 * to its virtio disk and say on the serial console whether the disk still
 * holds what it wrote. A failover or a migration that loses or reorders an
 * acknowledged write makes it print `duet-guest ERROR`.
 *
 * The pattern (the guest's /init writes it, verifyPattern checks it from the host):
 * - S = 64 slots of 4 KiB from byte 1 MiB of the disk; write number N (seq)
 *   goes to slot N mod S, as one line `duet-pattern seq=N slot=K boot=ID
 *   sum=MD5` padded with zeros to 4 KiB, where MD5 is the md5 of the text
 *   before " sum=" and ID the first 8 characters of the guest's boot_id.
 * - Seqs never restart: at boot the guest reads every slot and goes on from
 *   the largest seq with a valid sum. The guest writes one block at a time
 *   (O_DIRECT, then fsync: a flush, waiting for each; a write not yet
 *   flushed is not durable, on a thin volume its new chunk's mapping least
 *   of all), so every state a crash, a failover or a migration can leave is
 *   a prefix of the write sequence: for the largest
 *   seq M on the disk, slot K holds the one seq of M-S+1..M that is K mod S
 *   (empty while that seq would be < 1). Nothing else is a legal state.
 * - Before overwriting slot K with seq N the guest checks that the slot holds
 *   seq N-S: byte for byte what it wrote itself when N-S is from this boot;
 *   a valid line with seq N-S (any boot id: the older run) when N-S is
 *   before this boot's first seq; zeros when N-S < 1. This is stricter than
 *   "any valid older line on the first round": as numbering goes on across
 *   boots, the older run's line expected in each slot is known exactly, and a
 *   slot left behind by a lost write is caught on the first round too.
 * - At boot, after the scan, every slot must hold its seq of M-S+1..M (or
 *   be empty below seq 1): a write lost by a failover shows at the boot
 *   after it, not a round of 64 writes later.
 * - After writing it reads the slot back (O_DIRECT) and compares.
 * Any mismatch or dd failure prints `duet-guest ERROR <what> seq=N`; the
 * loop goes on (the slot is rewritten, later checks stay meaningful).
 * What the pattern cannot show: a lost *last* write, or a disk rolled back
 * to an older prefix, is a legal state. The guest reports the first (its
 * dd fails or the read-back differs); for the second compare verifyPattern's
 * maxSeq with the last `tick` on the console.
 *
 * Console lines: `duet-guest boot_id=ID memory=KB` once, `duet-guest disk
 * last_seq=M`, then `tick N boot=ID` after each write of seq N (200 ms apart
 * plus the checks: ~275 ms under TCG; an ERROR line comes before the tick it
 * is about), `duet-guest ok seq=N` every 25 seqs when the 25 before had
 * no ERROR, `duet-guest memory total=KB available=KB seq=N` when MemTotal
 * changes (a virtio balloon inflating or deflating), and `duet-guest
 * poweroff seq=N boot=ID` on the way out.
 *
 * Benchmark mode (for bench/vm.sh), chosen on the kernel command line:
 * `duet.bench=1` measures the disk once, after the boot scan and before the
 * tick loop, in `duet.bench.mib=N` MiB (default 128) from BENCH_OFFSET_MIB
 * on (past the pattern), each for about `duet.bench.secs=S` seconds (default
 * 10, whole passes; /proc/uptime counts in 10 ms): sequential 1 MiB O_DIRECT
 * writes, then reads, in passes over the area; then 4 KiB O_DIRECT writes,
 * then reads, in runs of 256 blocks (one dd, so its start-up is paid once
 * per MiB) at pseudo-random MiB offsets. Each result is one line
 * `duet-bench result name=NAME ops=N bytes=B csec=C` (C: centiseconds from
 * /proc/uptime around it; the host divides), with `name=spawn` timing 20
 * empty dd runs (what a run of 256 includes once). Then `duet-bench done`,
 * and the tick loop, or with `duet.bench.then=poweroff` a power off. The
 * default command line runs no benchmark.
 *
 * Power off: QMP system_powerdown presses the ACPI power button; the kernel's
 * `button` driver reports it as an input event (evdev), busybox acpid runs
 * /etc/acpi/PWRF/00000080, which asks the loop to stop between two writes;
 * the loop powers off (`poweroff -f`: PID 1 is a shell, nothing else would).
 * Both `button` and `evdev` are needed (without either the guest ignores
 * system_powerdown); a press before acpid runs (the first second or so of
 * boot, before the boot_id line) is lost.
 */
import { createHash } from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createGzip, gunzipSync } from 'node:zlib';
import { pipeline } from 'node:stream/promises';
import { UserError, errnoCode } from '../util/errors.js';

/** Kernel command line for the demo guest (serial console, no boot chatter, a kernel panic powers off at once). */
export const DEMO_GUEST_APPEND = 'console=ttyS0 quiet panic=-1';

/** Where benchmark mode (duet.bench=1) writes and reads: past the pattern. */
export const BENCH_OFFSET_MIB = 4;

/** Where the pattern lives on the guest's disk. */
export const PATTERN_OFFSET = 1024 * 1024;
export const PATTERN_SLOT_SIZE = 4096;
export const PATTERN_SLOTS = 64;
/** The disk must reach past the last slot. */
export const PATTERN_END = PATTERN_OFFSET + PATTERN_SLOTS * PATTERN_SLOT_SIZE;

const INSTALL_HINT = 'install busybox-static linux-image-amd64 cpio';

/**
 * Modules the guest loads, dependencies resolved from modules.dep:
 * virtio-blk-pci and virtio-balloon-pci, and the ACPI power button with
 * evdev so that acpid sees it.
 */
const WANTED_MODULES = ['virtio_pci', 'virtio_blk', 'virtio_balloon', 'button', 'evdev'];

/** Busybox applets /init and the power-off hook use. */
const APPLETS = ['sh', 'mount', 'insmod', 'acpid', 'dd', 'cmp', 'tr', 'head', 'cut', 'sed', 'md5sum', 'sleep', 'poweroff', 'touch', 'mv', 'cat', 'sync'];

export interface DemoGuestSources {
  /** Default /boot. */
  bootDir?: string;
  /** Default /lib/modules. */
  modulesDir?: string;
  /** Default /bin/busybox (busybox-static). */
  busybox?: string;
}

export interface DemoGuest {
  kernel: string;
  initrd: string;
}

/**
 * Build (or reuse) the demo guest's initramfs in outDir. The file name
 * carries a hash of everything in it (kernel version, modules, busybox, the
 * scripts), so a changed kernel or script builds a new one and concurrent
 * builders never mix their files (each renames a complete file into place).
 */
export async function buildDemoGuest(outDir: string, sources: DemoGuestSources = {}): Promise<DemoGuest> {
  const bootDir = sources.bootDir ?? '/boot';
  const modulesDir = sources.modulesDir ?? '/lib/modules';
  const busybox = sources.busybox ?? '/bin/busybox';

  const { version, kernel } = pickKernel(bootDir, modulesDir);
  try {
    fs.accessSync(kernel, fs.constants.R_OK);
  } catch {
    throw new UserError(
      `${kernel}: not readable by this user (QEMU boots the demo guest from it): run \`sudo chmod 0644 ${kernel}\` or copy it somewhere readable`,
    );
  }
  checkBusybox(busybox);
  const modules = resolveModules(path.join(modulesDir, version), WANTED_MODULES);
  const init = initScript(modules.map((m) => m.name));

  const key = createHash('sha256');
  key.update(`duet-guest 1\0${version}\0${init}\0${POWER_BUTTON_HOOK}\0`);
  key.update(fs.readFileSync(busybox));
  for (const m of modules) {
    const st = fs.statSync(m.file);
    key.update(`${m.file}\0${st.size}\0${st.mtimeMs}\0`);
  }
  const initrd = path.join(outDir, `duet-guest-${version}-${key.digest('hex').slice(0, 16)}.cpio.gz`);
  if (fs.existsSync(initrd)) return { kernel, initrd };

  fs.mkdirSync(outDir, { recursive: true });
  const root = fs.mkdtempSync(path.join(outDir, '.duet-guest-build-'));
  const partial = `${root}.cpio.gz`;
  try {
    const entries = await populate(root, busybox, modules, init);
    await writeCpioGz(root, entries, partial);
    fs.renameSync(partial, initrd);
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
    fs.rmSync(partial, { force: true });
  }
  return { kernel, initrd };
}

/** The newest /boot/vmlinuz-VERSION-amd64 that has /lib/modules/VERSION. */
export function pickKernel(bootDir: string, modulesDir: string): { version: string; kernel: string } {
  let names: string[];
  try {
    names = fs.readdirSync(bootDir);
  } catch (err) {
    throw new UserError(`${bootDir}: cannot list kernels (${errnoCode(err) ?? String(err)}): ${INSTALL_HINT}`);
  }
  const versions = names
    .map((n) => /^vmlinuz-(.+-amd64)$/.exec(n)?.[1])
    .filter((v): v is string => v !== undefined)
    .sort(compareVersions)
    .reverse();
  if (versions.length === 0) throw new UserError(`no ${bootDir}/vmlinuz-*-amd64 kernel: ${INSTALL_HINT}`);
  const withModules = versions.find((v) => isDir(path.join(modulesDir, v)));
  if (withModules === undefined) {
    throw new UserError(
      `no ${modulesDir}/<version> for the kernels in ${bootDir} (${versions.join(', ')}): reinstall the kernel's package (${INSTALL_HINT})`,
    );
  }
  return { version: withModules, kernel: path.join(bootDir, `vmlinuz-${withModules}`) };
}

/** Version order: digit runs compare as numbers (6.1.0-10 after 6.1.0-9). */
function compareVersions(a: string, b: string): number {
  const pa = a.split(/(\d+)/);
  const pb = b.split(/(\d+)/);
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    if (pa[i] === pb[i]) continue;
    const na = Number(pa[i]);
    const nb = Number(pb[i]);
    if (i % 2 === 1 && Number.isFinite(na) && Number.isFinite(nb)) return na - nb;
    return pa[i] < pb[i] ? -1 : 1;
  }
  return pa.length - pb.length;
}

function isDir(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/** busybox must be the static one: the initramfs has no C library. */
function checkBusybox(busybox: string): void {
  let elf: Buffer;
  try {
    elf = fs.readFileSync(busybox);
  } catch (err) {
    throw new UserError(`${busybox}: cannot read busybox (${errnoCode(err) ?? String(err)}): ${INSTALL_HINT}`);
  }
  if (hasInterpreter(elf)) {
    throw new UserError(`${busybox} is dynamically linked (package busybox), the guest needs a static one: ${INSTALL_HINT}`);
  }
  let list: string;
  try {
    list = execFileSync(busybox, ['--list'], { encoding: 'utf8', timeout: 10_000 });
  } catch (err) {
    throw new UserError(`${busybox} --list failed (${(err as Error).message.split('\n')[0]}): ${INSTALL_HINT}`);
  }
  const have = new Set(list.split('\n'));
  const missing = APPLETS.filter((a) => !have.has(a));
  if (missing.length > 0) throw new UserError(`${busybox} lacks the applets ${missing.join(', ')} the demo guest needs: ${INSTALL_HINT}`);
}

/** Whether a 64-bit little-endian ELF file has a PT_INTERP program header (a dynamic executable). */
function hasInterpreter(elf: Buffer): boolean {
  if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46) throw new UserError(`busybox is not an ELF executable: ${INSTALL_HINT}`);
  if (elf[4] !== 2 || elf[5] !== 1) throw new UserError(`busybox is not a 64-bit little-endian executable: ${INSTALL_HINT}`);
  const phoff = Number(elf.readBigUInt64LE(32));
  const phentsize = elf.readUInt16LE(54);
  const phnum = elf.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) {
    const at = phoff + i * phentsize;
    if (at + 4 > elf.length) break;
    if (elf.readUInt32LE(at) === 3 /* PT_INTERP */) return true;
  }
  return false;
}

interface GuestModule {
  /** Module name as insmod sees the file (virtio_blk). */
  name: string;
  /** Path on the host (.ko, .ko.xz, .ko.zst or .ko.gz). */
  file: string;
}

/**
 * `wanted` and their dependencies, dependencies first (insmod resolves
 * nothing), from the kernel's modules.dep; modules built into the kernel
 * (modules.builtin) need no file.
 */
export function resolveModules(kernelModulesDir: string, wanted: string[]): GuestModule[] {
  let depText: string;
  try {
    depText = fs.readFileSync(path.join(kernelModulesDir, 'modules.dep'), 'utf8');
  } catch (err) {
    throw new UserError(`${kernelModulesDir}/modules.dep: cannot read it (${errnoCode(err) ?? String(err)}): ${INSTALL_HINT}`);
  }
  const deps = new Map<string, string[]>();
  const fileOf = new Map<string, string>();
  for (const line of depText.split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const file = line.slice(0, colon);
    const name = moduleName(file);
    fileOf.set(name, file);
    deps.set(name, line.slice(colon + 1).trim().split(/\s+/).filter(Boolean).map(moduleName));
  }
  let builtin = new Set<string>();
  try {
    builtin = new Set(fs.readFileSync(path.join(kernelModulesDir, 'modules.builtin'), 'utf8').split('\n').filter(Boolean).map(moduleName));
  } catch {
    // an old or trimmed module tree: treat nothing as built in
  }
  const out: GuestModule[] = [];
  const done = new Set<string>();
  const visit = (name: string, chain: string[]): void => {
    if (done.has(name) || builtin.has(name)) return;
    if (chain.includes(name)) throw new UserError(`${kernelModulesDir}/modules.dep: dependency loop ${[...chain, name].join(' -> ')}`);
    const file = fileOf.get(name);
    if (file === undefined) throw new UserError(`kernel module ${name} is missing from ${kernelModulesDir}: ${INSTALL_HINT}`);
    for (const d of deps.get(name) ?? []) visit(d, [...chain, name]);
    done.add(name);
    out.push({ name, file: path.join(kernelModulesDir, file) });
  };
  for (const w of wanted) visit(w.replace(/-/g, '_'), []);
  return out;
}

/** kernel/drivers/block/virtio_blk.ko.xz -> virtio_blk (the kernel treats - and _ alike). */
function moduleName(file: string): string {
  return path.basename(file).replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_');
}

interface CpioEntry {
  /** Relative to the initramfs root, './'-less. */
  path: string;
}

/** Lay out the initramfs tree; returns its entries, parents before children. */
async function populate(root: string, busybox: string, modules: GuestModule[], init: string): Promise<CpioEntry[]> {
  const dirs = ['bin', 'dev', 'proc', 'sys', 'run', 'tmp', 'etc', 'etc/acpi', 'etc/acpi/PWRF', 'lib', 'lib/modules'];
  fs.chmodSync(root, 0o755); // mkdtemp's 0700 would become the guest's /
  for (const d of dirs) fs.mkdirSync(path.join(root, d));
  fs.copyFileSync(busybox, path.join(root, 'bin/busybox'));
  fs.chmodSync(path.join(root, 'bin/busybox'), 0o755);
  fs.symlinkSync('busybox', path.join(root, 'bin/sh'));
  fs.writeFileSync(path.join(root, 'init'), init, { mode: 0o755 });
  fs.writeFileSync(path.join(root, 'etc/acpi/PWRF/00000080'), POWER_BUTTON_HOOK, { mode: 0o755 });
  const files = ['bin/busybox', 'bin/sh', 'init', 'etc/acpi/PWRF/00000080'];
  for (const m of modules) {
    const rel = `lib/modules/${m.name}.ko`;
    await unpackModule(m.file, path.join(root, rel));
    files.push(rel);
  }
  return ['.', ...dirs, ...files].map((p) => ({ path: p }));
}

async function unpackModule(src: string, dest: string): Promise<void> {
  try {
    if (src.endsWith('.ko')) fs.copyFileSync(src, dest);
    else if (src.endsWith('.ko.gz')) fs.writeFileSync(dest, gunzipSync(fs.readFileSync(src)));
    else if (src.endsWith('.ko.xz')) await decompressWith('xz', 'xz-utils', src, dest);
    else if (src.endsWith('.ko.zst')) await decompressWith('zstd', 'zstd', src, dest);
    else throw new UserError(`${src}: unknown kernel module format`);
  } catch (err) {
    if (err instanceof UserError) throw err;
    throw new UserError(`${src}: cannot read the kernel module (${errnoCode(err) ?? (err as Error).message}): ${INSTALL_HINT}`);
  }
}

async function decompressWith(tool: string, pkg: string, src: string, dest: string): Promise<void> {
  const child = spawn(tool, ['-dc', src], { stdio: ['ignore', 'pipe', 'pipe'] });
  const stderr: Buffer[] = [];
  child.stderr.on('data', (b: Buffer) => stderr.push(b));
  const exit = childExit(child, tool, `install ${pkg} (${src} is compressed)`);
  await pipeline(child.stdout, fs.createWriteStream(dest));
  const code = await exit;
  if (code !== 0) throw new UserError(`${src}: ${tool} -dc failed (exit ${code}): ${Buffer.concat(stderr).toString().trim()}`);
}

/** newc cpio (every file owned by root), gzip-compressed. */
async function writeCpioGz(root: string, entries: CpioEntry[], dest: string): Promise<void> {
  const child = spawn('cpio', ['-o', '-H', 'newc', '--quiet', '-R', '0:0'], { cwd: root, stdio: ['pipe', 'pipe', 'pipe'] });
  const stderr: Buffer[] = [];
  child.stderr.on('data', (b: Buffer) => stderr.push(b));
  const exit = childExit(child, 'cpio', INSTALL_HINT);
  child.stdin.on('error', () => {
    // cpio missing or dead: its exit says why
  });
  child.stdin.end(entries.map((e) => `${e.path}\n`).join(''));
  await Promise.all([pipeline(child.stdout, createGzip({ level: 9 }), fs.createWriteStream(dest)), exit]).then(([, code]) => {
    if (code !== 0) throw new UserError(`cpio failed (exit ${code}) building ${dest}: ${Buffer.concat(stderr).toString().trim()}`);
  });
}

/** The child's exit code; a missing program is a UserError naming what to install. */
function childExit(child: ReturnType<typeof spawn>, tool: string, hint: string): Promise<number | null> {
  return new Promise((resolve, reject) => {
    child.once('error', (err) => {
      reject(errnoCode(err) === 'ENOENT' ? new UserError(`${tool} is not installed: ${hint}`) : err);
    });
    child.once('close', (code) => resolve(code));
  });
}

/**
 * Run by busybox acpid on the power button. The loop in /init stops between
 * two writes and powers off; if it does not within 5 s (a hung disk), power
 * off anyway and say so.
 */
const POWER_BUTTON_HOOK = `#!/bin/sh
touch /run/duet-stop
sleep 5
echo "duet-guest ERROR poweroff: the tick loop did not stop within 5 s seq=?" > /dev/console
poweroff -f
`;

/** The guest's PID 1 (busybox ash). */
export function initScript(modules: string[]): string {
  return `#!/bin/sh
# duet demo guest, PID 1. Written by duet's src/vm/demo-guest.ts: the pattern's rules are there.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
S=${PATTERN_SLOTS}
BASE=${PATTERN_OFFSET / PATTERN_SLOT_SIZE}
N=0
ERRORS=0
error() { echo "duet-guest ERROR $1 seq=$N"; ERRORS=$((ERRORS + 1)); }
for m in ${modules.join(' ')}; do insmod /lib/modules/$m.ko || error "insmod $m"; done
BOOT=$(cut -c1-8 /proc/sys/kernel/random/boot_id)
MEM=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB$/\\1/p' /proc/meminfo)
acpid -c /etc/acpi -p /run/acpid.pid -l /run/acpid.log || error "acpid did not start (no clean power off)"
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "duet-guest boot_id=$BOOT memory=$MEM"
SECTORS=$(cat /sys/block/vda/size 2>/dev/null)
[ "\${SECTORS:-0}" -ge $(((BASE + S) * 8)) ] || error "/dev/vda missing or smaller than $(((BASE + S) * 4)) KiB"
dd if=/dev/zero of=/tmp/zero bs=4096 count=1 2>/dev/null

# line_ok LINE: a pattern line whose sum matches; sets L_SEQ L_SLOT L_BOOT
line_ok() {
  case "$1" in "duet-pattern seq="*" slot="*" boot="*" sum="*) ;; *) return 1 ;; esac
  body=\${1% sum=*}
  set -- "\${1##* sum=}" $(printf '%s' "$body" | md5sum)
  [ "$1" = "$2" ] || return 1
  set -- $body
  L_SEQ=\${2#seq=}; L_SLOT=\${3#slot=}; L_BOOT=\${4#boot=}
  case "$L_SEQ$L_SLOT" in *[!0-9]* | '') return 1 ;; esac
  [ "$body" = "duet-pattern seq=$L_SEQ slot=$L_SLOT boot=$L_BOOT" ]
}
# what /tmp/blk holds, for messages
describe() {
  if cmp -s /tmp/blk /tmp/zero; then echo zeros; return; fi
  if line_ok "$(tr -d '\\000' < /tmp/blk | head -n 1)"; then echo "seq $L_SEQ slot $L_SLOT boot $L_BOOT"; else echo garbage; fi
}
read_slot() { # read_slot K FILE
  dd if=/dev/vda of=$2 bs=4096 skip=$((BASE + $1)) count=1 iflag=direct 2>/tmp/dd.err && return 0
  error "read slot $1: $(head -n 1 /tmp/dd.err)"; return 1
}
# slot K must hold the previous write to it, seq P
check_prev() {
  read_slot $K /tmp/blk || return
  if [ $P -le 0 ]; then
    cmp -s /tmp/blk /tmp/zero || error "slot $K: expected empty, found $(describe)"
  elif [ $P -ge $START ]; then
    cmp -s /tmp/blk /tmp/slot.$K || error "slot $K: expected seq $P of this boot, found $(describe)"
  else
    line=$(tr -d '\\000' < /tmp/blk | head -n 1)
    if line_ok "$line" && [ "$L_SEQ" = $P ] && [ "$L_SLOT" = $K ]; then
      printf '%s\\n' "$line" | dd of=/tmp/exp bs=4096 count=1 iflag=fullblock conv=sync 2>/dev/null
      cmp -s /tmp/blk /tmp/exp || error "slot $K: bytes after the line of seq $P"
    else
      error "slot $K: expected seq $P of the older run, found $(describe)"
    fi
  fi
}

# Go on from the largest valid seq on the disk (numbering never restarts).
M0=0
if dd if=/dev/vda of=/tmp/scan bs=4096 skip=$BASE count=$S iflag=direct 2>/tmp/dd.err; then
  tr -d '\\000' < /tmp/scan > /tmp/scan.txt
  while read -r line; do
    if line_ok "$line" && [ "$L_SEQ" -gt "$M0" ]; then M0=$L_SEQ; fi
  done < /tmp/scan.txt
else
  error "read /dev/vda at boot: $(head -n 1 /tmp/dd.err)"
fi
START=$((M0 + 1))
echo "duet-guest disk last_seq=$M0"
# At once, not a round of writes later: the disk must hold the last min(M0, S) writes, each in its slot
# (a write lost by a failover or a crash before the last shows here, at the boot after it).
C=0; STALE=""
while read -r line; do
  if line_ok "$line"; then
    if [ "$L_SEQ" -le $((M0 - S)) ] || [ $((L_SEQ % S)) != "$L_SLOT" ]; then STALE="$STALE $L_SLOT"; else C=$((C + 1)); fi
  fi
done < /tmp/scan.txt
W=$M0; [ $W -gt $S ] && W=$S
[ $C = $W ] && [ -z "$STALE" ] || error "disk at boot: $C of the last $W writes up to seq $M0 are on it\${STALE:+; slots holding older writes:$STALE}"

# Benchmark mode (bench/vm.sh): duet.bench=1 [duet.bench.mib=N] [duet.bench.secs=S] [duet.bench.then=poweroff]
BENCH=0; BENCH_MIB=128; BENCH_SECS=10; BENCH_THEN=tick
read -r CMDLINE < /proc/cmdline
for w in $CMDLINE; do
  case "$w" in
    duet.bench=*) BENCH=\${w#*=} ;;
    duet.bench.mib=*) BENCH_MIB=\${w#*=} ;;
    duet.bench.secs=*) BENCH_SECS=\${w#*=} ;;
    duet.bench.then=*) BENCH_THEN=\${w#*=} ;;
  esac
done
# uptime in centiseconds (/proc/uptime has two decimals; uptime is well past 1 s here)
now_cs() { read -r UP _ < /proc/uptime; NOW=\${UP%.*}\${UP#*.}; }
bench_result() { echo "duet-bench result name=$1 ops=$2 bytes=$3 csec=$4"; }
bench_seq() { # w|r NAME
  OPS=0
  now_cs; T0=$NOW; END=$((T0 + BENCH_SECS * 100))
  while [ $NOW -lt $END ]; do
    if [ $1 = w ]; then
      dd if=/dev/zero of=/dev/vda bs=1048576 count=$BENCH_MIB seek=${BENCH_OFFSET_MIB} oflag=direct conv=notrunc 2>/tmp/dd.err
    else
      dd if=/dev/vda of=/dev/null bs=1048576 count=$BENCH_MIB skip=${BENCH_OFFSET_MIB} iflag=direct 2>/tmp/dd.err
    fi || { echo "duet-bench ERROR $2: $(head -n 1 /tmp/dd.err)"; return 1; }
    OPS=$((OPS + BENCH_MIB))
    now_cs
  done
  bench_result $2 $OPS $((OPS * 1048576)) $((NOW - T0))
}
bench_4k() { # w|r NAME
  OPS=0; X=12345
  now_cs; T0=$NOW; END=$((T0 + BENCH_SECS * 100))
  while [ $NOW -lt $END ]; do
    X=$(((X * 1103515245 + 12345) % 2147483648)); AT=$(((${BENCH_OFFSET_MIB} + X % BENCH_MIB) * 256))
    if [ $1 = w ]; then
      dd if=/dev/zero of=/dev/vda bs=4096 count=256 seek=$AT oflag=direct conv=notrunc 2>/tmp/dd.err
    else
      dd if=/dev/vda of=/dev/null bs=4096 count=256 skip=$AT iflag=direct 2>/tmp/dd.err
    fi || { echo "duet-bench ERROR $2: $(head -n 1 /tmp/dd.err)"; return 1; }
    OPS=$((OPS + 256))
    now_cs
  done
  bench_result $2 $OPS $((OPS * 4096)) $((NOW - T0))
}
bench() {
  case "$BENCH_MIB$BENCH_SECS" in *[!0-9]* | '') echo "duet-bench ERROR bad duet.bench.mib=$BENCH_MIB or duet.bench.secs=$BENCH_SECS"; return 1 ;; esac
  [ "\${SECTORS:-0}" -ge $(((${BENCH_OFFSET_MIB} + BENCH_MIB) * 2048)) ] || { echo "duet-bench ERROR /dev/vda is smaller than $((${BENCH_OFFSET_MIB} + BENCH_MIB)) MiB"; return 1; }
  echo "duet-bench start mib=$BENCH_MIB secs=$BENCH_SECS"
  i=0; now_cs; T0=$NOW
  while [ $i -lt 20 ]; do dd if=/dev/zero of=/dev/null bs=4096 count=0 2>/dev/null; i=$((i + 1)); done
  now_cs; bench_result spawn 20 0 $((NOW - T0))
  bench_seq w seqwrite_1M && bench_seq r seqread_1M && bench_4k w randwrite_4k && bench_4k r randread_4k
}
if [ "$BENCH" = 1 ]; then
  bench
  echo "duet-bench done"
  if [ "$BENCH_THEN" = poweroff ]; then
    echo "duet-guest poweroff seq=$M0 boot=$BOOT"
    sync
    poweroff -f
  fi
fi

N=$M0
E_LAST=$ERRORS
while :; do
  if [ -e /run/duet-stop ]; then
    echo "duet-guest poweroff seq=$N boot=$BOOT"
    sync
    poweroff -f
  fi
  N=$((N + 1)); K=$((N % S)); P=$((N - S))
  check_prev
  body="duet-pattern seq=$N slot=$K boot=$BOOT"
  set -- $(printf '%s' "$body" | md5sum)
  printf '%s sum=%s\\n' "$body" "$1" | dd of=/tmp/new bs=4096 count=1 iflag=fullblock conv=sync 2>/dev/null
  if dd if=/tmp/new of=/dev/vda bs=4096 seek=$((BASE + K)) count=1 oflag=direct conv=notrunc,fsync 2>/tmp/dd.err; then
    if read_slot $K /tmp/back; then
      cmp -s /tmp/new /tmp/back || error "slot $K: read back differs from the write"
    fi
  else
    error "write slot $K: $(head -n 1 /tmp/dd.err)"
  fi
  mv /tmp/new /tmp/slot.$K
  echo "tick $N boot=$BOOT"
  # balloon: say when MemTotal moves (builtins only, no process per tick)
  { read -r _ MT _; read -r _ _ _; read -r _ MA _; } < /proc/meminfo
  [ "$MT" = "$MEM" ] || { echo "duet-guest memory total=$MT available=$MA seq=$N"; MEM=$MT; }
  if [ $((N % 25)) -eq 0 ]; then
    [ $ERRORS -eq $E_LAST ] && echo "duet-guest ok seq=$N"
    E_LAST=$ERRORS
  fi
  sleep 0.2
done
`;
}

export interface PatternReport {
  /** Slots holding a line (valid or not). */
  slots: number;
  /** Largest valid seq (0: none). */
  maxSeq: number;
  /** Boot ids of the valid lines, in seq order. */
  bootIds: string[];
  errors: string[];
}

const LINE_RE = /^duet-pattern seq=(\d+) slot=(\d+) boot=([0-9a-f]{8}) sum=([0-9a-f]{32})$/;

/**
 * Check the demo guest's pattern on a disk from the host (see the top of
 * this file): every slot with data holds a valid line for that slot, and the
 * slots hold exactly the last S seqs up to the largest one.
 */
export async function verifyPattern(read: (offset: number, length: number) => Promise<Buffer>): Promise<PatternReport> {
  const S = PATTERN_SLOTS;
  const data = await read(PATTERN_OFFSET, S * PATTERN_SLOT_SIZE);
  if (data.length !== S * PATTERN_SLOT_SIZE) throw new Error(`verifyPattern: read returned ${data.length} bytes, wanted ${S * PATTERN_SLOT_SIZE}`);
  const errors: string[] = [];
  const seqOf: (number | undefined)[] = [];
  const boots: { seq: number; boot: string }[] = [];
  let slots = 0;
  for (let k = 0; k < S; k++) {
    const block = data.subarray(k * PATTERN_SLOT_SIZE, (k + 1) * PATTERN_SLOT_SIZE);
    if (block.every((b) => b === 0)) continue;
    slots++;
    const nl = block.indexOf(0x0a);
    const line = block.subarray(0, nl < 0 ? block.length : nl).toString('latin1');
    const m = LINE_RE.exec(line);
    if (nl < 0 || !m) {
      errors.push(`slot ${k}: not a pattern line (${JSON.stringify(line.slice(0, 60))})`);
      continue;
    }
    const [, seqText, slotText, boot, sum] = m;
    const body = line.slice(0, line.lastIndexOf(' sum='));
    if (createHash('md5').update(body).digest('hex') !== sum) {
      errors.push(`slot ${k}: bad sum in ${JSON.stringify(line)}`);
      continue;
    }
    const seq = Number(seqText);
    if (Number(slotText) !== k || seq % S !== k) {
      errors.push(`slot ${k}: holds the line of slot ${slotText}, seq ${seq}`);
      continue;
    }
    if (!block.subarray(nl + 1).every((b) => b === 0)) errors.push(`slot ${k}: bytes after the line of seq ${seq} are not zero`);
    seqOf[k] = seq;
    boots.push({ seq, boot });
  }
  const maxSeq = boots.reduce((m, b) => Math.max(m, b.seq), 0);
  for (let k = 0; k < S; k++) {
    // the seq of M-S+1..M that is k mod S
    const want = maxSeq - ((((maxSeq - k) % S) + S) % S);
    const got = seqOf[k];
    if (want >= 1 && got !== want) {
      if (got !== undefined) errors.push(`slot ${k}: holds seq ${got}, expected ${want} (largest seq ${maxSeq})`);
      else if (!errors.some((e) => e.startsWith(`slot ${k}:`))) errors.push(`slot ${k}: empty, expected seq ${want} (largest seq ${maxSeq})`);
    } else if (want < 1 && got !== undefined) {
      errors.push(`slot ${k}: holds seq ${got}, expected empty (largest seq ${maxSeq})`);
    }
  }
  boots.sort((a, b) => a.seq - b.seq);
  const bootIds = [...new Set(boots.map((b) => b.boot))];
  return { slots, maxSeq, bootIds, errors };
}
