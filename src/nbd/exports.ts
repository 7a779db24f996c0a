import type { BlockDevice } from '../blockdev/types.js';

/** One named export: what a client selects with NBD_OPT_GO / EXPORT_NAME. */
export interface NbdExport {
  name: string;
  description?: string;
  device: BlockDevice;
  /** Refuse writes even if the device could take them. */
  readOnly?: boolean;
}

/**
 * Where the server finds its exports. Looked up at every handshake, so a
 * provider whose exports change (volumes created, resized, removed) is seen
 * by new connections without restarting the server.
 */
export interface ExportProvider {
  list(): NbdExport[];
  /** The export for `name`; "" is the default export. */
  get(name: string): NbdExport | undefined;
  /** A connection entered transmission on `exp` (so a provider can tell what is in use). */
  opened?(exp: NbdExport): void;
  /** That connection is gone. */
  closed?(exp: NbdExport): void;
}

/** A fixed set of exports; the first is also the default export "". */
export class StaticExports implements ExportProvider {
  private readonly byName = new Map<string, NbdExport>();

  constructor(private readonly exports: NbdExport[]) {
    for (const e of exports) {
      if (this.byName.has(e.name)) throw new Error(`export name "${e.name}" is used twice: give each PATH its own NAME=`);
      this.byName.set(e.name, e);
    }
  }

  list(): NbdExport[] {
    return this.exports;
  }

  get(name: string): NbdExport | undefined {
    if (name === '') return this.exports[0];
    return this.byName.get(name);
  }
}
