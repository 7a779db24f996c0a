/**
 * The QEMU command line of a VM, from what the cluster file says of it and
 * where its disks are served. Every disk is two block nodes: an `nbd` node
 * (the connection to the Primary's export) under a `raw` node the virtio
 * device uses. Moving the storage swaps the nbd node under the raw one
 * (`blockdev-reopen`), so the device and the guest never notice; the
 * device stops the VM on an I/O error (werror/rerror=stop) instead of
 * handing the error to the guest, whose file system would go read-only.
 */
import path from 'node:path';

/** Where a disk's data is served: a volume's NBD export on the node that is Primary for its pool. */
export interface DiskEndpoint {
  /** POOL/VOLUME, as the cluster file names it. */
  volume: string;
  /** The node serving it (Primary for the pool's resources). */
  node: string;
  host: string;
  port: number;
  /** The export name (the volume's name). */
  export: string;
  /**
   * The open of the pool (Pool.incarnation) serving it when the VM connected: QEMU asks for
   * `VOLUME@INCARNATION`, which a pool reopened since refuses (see VmManager.recover). Absent: the plain name.
   */
  incarnation?: string;
}

export interface VmSpec {
  name: string;
  memoryBytes: number;
  cpus: number;
  disks: DiskEndpoint[];
  boot?: { kernel: string; initrd?: string; append?: string };
  accel: 'kvm' | 'tcg';
}

/** The files of one VM on the node running it. */
export interface VmPaths {
  dir: string;
  qmp: string;
  console: string;
  pid: string;
  stderr: string;
}

export function vmPaths(dir: string): VmPaths {
  return {
    dir,
    qmp: path.join(dir, 'qmp.sock'),
    console: path.join(dir, 'console.log'),
    pid: path.join(dir, 'qemu.pid'),
    stderr: path.join(dir, 'qemu.stderr'),
  };
}

export const QEMU_BINARY = 'qemu-system-x86_64';

/** The nbd node of disk `index` in its `generation`-th placement (a swap adds a node under a new name). */
export function nbdNodeName(index: number, generation: number): string {
  return `nbd${index}-${generation}`;
}

export function rawNodeName(index: number): string {
  return `disk${index}`;
}

export function nbdNode(index: number, generation: number, disk: DiskEndpoint): Record<string, unknown> {
  return {
    driver: 'nbd',
    'node-name': nbdNodeName(index, generation),
    server: { type: 'inet', host: disk.host, port: String(disk.port) },
    export: disk.incarnation ? `${disk.export}@${disk.incarnation}` : disk.export,
    // No waiting reconnect: with a delay, requests in flight when the connection breaks wait and are resent
    // after the reconnect, maybe to a node that was not fenced. Measured on QEMU 7.2: 0 does not mean "never
    // reconnect": the requests in flight fail (werror=stop keeps them), and a later request on this node
    // reconnects to the same address. Only a node with the pool open exports the volume, so that is the
    // Primary again, or nothing. duet moves the connection itself (a swap of this node), knowing who is Primary.
    'reconnect-delay': 0,
    discard: 'unmap',
  };
}

/** A value inside QEMU's `key=value,...` option syntax: a comma in it is written twice (a home path may have one). */
export function optionValue(value: string): string {
  return value.replace(/,/g, ',,');
}

export function qemuArgs(spec: VmSpec, paths: VmPaths, options: { incoming?: boolean; generation?: number } = {}): string[] {
  const generation = options.generation ?? 0;
  const args = [
    '-name', `${spec.name},process=duet-vm-${spec.name}`,
    '-accel', spec.accel,
    '-machine', 'q35',
    '-m', `${Math.floor(spec.memoryBytes / (1024 * 1024))}M`,
    '-smp', String(spec.cpus),
    '-nodefaults', '-no-user-config', '-display', 'none', '-nic', 'none',
    // The console: a file the daemon reads for `vm console` (append: a restarted QEMU adds to it).
    '-chardev', `file,id=console0,path=${optionValue(paths.console)},append=on`,
    '-serial', 'chardev:console0',
    '-chardev', `socket,id=qmp0,path=${optionValue(paths.qmp)},server=on,wait=off`,
    '-mon', 'chardev=qmp0,mode=control',
    '-pidfile', paths.pid,
    // deflate-on-oom: a guest squeezed too far gets its memory back instead of its OOM killer running (measured).
    '-device', 'virtio-balloon-pci,id=balloon0,deflate-on-oom=on',
  ];
  spec.disks.forEach((disk, i) => {
    args.push('-blockdev', JSON.stringify(nbdNode(i, generation, disk)));
    args.push('-blockdev', JSON.stringify({ driver: 'raw', 'node-name': rawNodeName(i), file: nbdNodeName(i, generation), discard: 'unmap' }));
    args.push('-device', `virtio-blk-pci,id=vd${i},drive=${rawNodeName(i)},werror=stop,rerror=stop${!spec.boot && i === 0 ? ',bootindex=1' : ''}`);
  });
  if (spec.boot) {
    args.push('-kernel', spec.boot.kernel);
    if (spec.boot.initrd) args.push('-initrd', spec.boot.initrd);
    if (spec.boot.append) args.push('-append', spec.boot.append);
  }
  if (options.incoming) args.push('-incoming', 'defer');
  return args;
}
