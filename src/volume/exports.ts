/**
 * Every volume of a pool as an NBD export named after it (snapshots
 * read-only). Looked up at each handshake, so volumes created, resized or
 * removed while serving are seen by the next connection.
 */
import type { ExportProvider, NbdExport } from '../nbd/exports.js';
import type { Pool, VolumeState } from './pool.js';
import { ThinVolume } from './volume.js';

export class PoolExports implements ExportProvider {
  private readonly devices = new Map<VolumeState, NbdExport>();
  private readonly users = new Map<string, number>();

  /**
   * `accepts`: an earlier open of the pool whose clients may go on here (one closed cleanly: every write it
   * acknowledged was committed); absent: only this open.
   */
  constructor(
    private readonly pool: Pool,
    private readonly accepts: (incarnation: string) => boolean = () => false,
  ) {}

  list(): NbdExport[] {
    return this.pool.listVolumes().map((v) => this.exportOf(v));
  }

  /**
   * `VOLUME`, or `VOLUME@INCARNATION`: the volume only if this open of the pool, or an earlier one that
   * closed cleanly, is the one named (duet's VMs connect so: a QEMU reconnecting by itself to a pool
   * reopened after a crash, which lost what it had not committed, is refused, and its daemon restarts the
   * guest; see VmManager.recover).
   */
  get(name: string): NbdExport | undefined {
    if (name === '') return this.list()[0];
    const at = name.indexOf('@');
    if (at >= 0) {
      const incarnation = name.slice(at + 1);
      if (incarnation !== this.pool.incarnation && !this.accepts(incarnation)) return undefined;
      name = name.slice(0, at);
    }
    const v = this.pool.volume(name);
    if (!v || v.record.incomplete || v.removed) return undefined;
    return this.exportOf(v);
  }

  private exportOf(v: VolumeState): NbdExport {
    let exp = this.devices.get(v);
    if (!exp) {
      const device = new ThinVolume(this.pool, v);
      exp = { name: v.record.name, device, readOnly: device.capabilities.readOnly, description: `${this.pool.name}/${v.record.name}${v.record.snapshot ? ' (snapshot)' : ''}` };
      this.devices.set(v, exp);
    }
    return exp;
  }

  opened(exp: NbdExport): void {
    this.users.set(exp.name, (this.users.get(exp.name) ?? 0) + 1);
  }

  closed(exp: NbdExport): void {
    const n = (this.users.get(exp.name) ?? 1) - 1;
    if (n > 0) this.users.set(exp.name, n);
    else this.users.delete(exp.name);
  }

  /** Open connections on a volume's export. */
  connections(name: string): number {
    return this.users.get(name) ?? 0;
  }

  /** Forget devices of volumes that are gone. */
  prune(): void {
    for (const v of [...this.devices.keys()]) if (v.removed) this.devices.delete(v);
  }
}
