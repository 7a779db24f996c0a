/**
 * For users who keep Xen (the classic design ran Xen dom0s): an `xl`
 * domain config for a VM of the cluster file, its disks imported as block
 * devices with `nbd-client` from the node serving them (the Primary).
 * Xen does not migrate or fail over through duet; the admin runs
 * `xl create` on the node where the disks are imported.
 */
import type { ClusterConfig } from '../cluster/config.js';
import { parseSize } from '../util/size.js';

export function xlConfig(config: ClusterConfig, name: string, server: (pool: string) => string | undefined): string {
  const vm = config.vms[name];
  const mib = (v: string | number): number => Math.floor(parseSize(String(v)) / (1024 * 1024));
  const lines = [`# duet vm ${name} (cluster ${config.cluster}) as a Xen domain: xl create THIS_FILE`, '# Import its disks first, on the node that runs it:'];
  const disks: string[] = [];
  vm.disks.forEach((d, i) => {
    const [pool, volume] = d.split('/');
    const node = server(pool);
    const address = node ? config.nodes[node].address : 'PRIMARY_ADDRESS';
    lines.push(`#   nbd-client -N ${volume} ${address} ${config.exports.port} /dev/nbd${i}${node ? `    # ${d}, served by ${node} (Primary for pool ${pool})` : `    # ${d}: pool ${pool} is open on no node now`}`);
    disks.push(`'phy:/dev/nbd${i},xvd${String.fromCharCode(97 + i)},w'`);
  });
  lines.push(
    `name = "${name}"`,
    `memory = ${mib(vm.memory)}`,
    `maxmem = ${mib(vm.memory)}`,
    `vcpus = ${vm.cpus}`,
  );
  if (vm.boot) {
    lines.push(`kernel = "${vm.boot.kernel}"`);
    if (vm.boot.initrd) lines.push(`ramdisk = "${vm.boot.initrd}"`);
    // Xen's PV console is hvc0, not the serial port QEMU gives.
    if (vm.boot.append) lines.push(`extra = "${vm.boot.append.replace(/console=ttyS0/g, 'console=hvc0')}"`);
  } else {
    lines.push('type = "hvm"', 'boot = "c"');
  }
  lines.push(`disk = [${disks.join(', ')}]`, 'on_poweroff = "destroy"', 'on_reboot = "restart"', 'on_crash = "restart"', '');
  return lines.join('\n');
}
