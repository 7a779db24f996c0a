#!/usr/bin/env node
// bench/vm-guest.mjs - what bench/vm.sh needs from the compiled tree (`npm run build` first):
//   build DIR                      build (or reuse) the demo guest in DIR; prints "KERNEL INITRD"
//   qemu-args DIR MIB HOST PORT EXPORT KERNEL INITRD APPEND
//                                  the QEMU command line duet itself would use for a one-disk VM
//                                  (same machine, accel, devices, nbd + raw nodes), one argument a line,
//                                  its files (qmp.sock, qemu.pid, console.log) in DIR
// It is how the nbdkit anchor runs "the same guest" as a duet VM, minus duet.
import { buildDemoGuest } from '../dist/src/vm/demo-guest.js';
import { qemuArgs, vmPaths } from '../dist/src/vm/qemu-args.js';
import { detectAccel } from '../dist/src/vm/qemu.js';

const [cmd, ...a] = process.argv.slice(2);
if (cmd === 'build' && a.length === 1) {
  const g = await buildDemoGuest(a[0]);
  console.log(`${g.kernel} ${g.initrd}`);
} else if (cmd === 'qemu-args' && a.length === 8) {
  const [dir, mib, host, port, exportName, kernel, initrd, append] = a;
  const spec = {
    name: 'anchor',
    memoryBytes: Number(mib) * 1024 * 1024,
    cpus: 1,
    disks: [{ volume: 'anchor/disk', node: 'nbdkit', host, port: Number(port), export: exportName }],
    boot: { kernel, initrd, append },
    accel: detectAccel(),
  };
  console.log(qemuArgs(spec, vmPaths(dir)).join('\n'));
} else {
  console.error('usage: vm-guest.mjs build DIR | qemu-args DIR MIB HOST PORT EXPORT KERNEL INITRD APPEND');
  process.exit(2);
}
