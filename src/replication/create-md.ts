/**
 * Fresh replication metadata on a disk (`duet resource create-md`, as
 * `drbdadm create-md`): a formatted activity log, a clear bitmap and a
 * record saying Inconsistent, no generation, full sync needed. Opening a
 * resource never does this on its own, so a disk whose metadata is lost or
 * was never written is reported instead of silently starting over as a new
 * disk (which would throw away what the record knew: generations, role,
 * out-of-sync blocks).
 */
import type { BlockDevice } from '../blockdev/types.js';
import type { Logger } from '../util/log.js';
import type { SliceClock } from '../util/slice.js';
import { UserError } from '../util/errors.js';
import { ActivityLog } from './activity-log.js';
import { Bitmap } from './bitmap.js';
import { initialRecord, layoutFor, MetaLayout, MetaRecord, readRecord, writeRecord } from './meta.js';

/** The disk of a resource holds no (valid) duet metadata: the resource stays down until create-md. */
export class NoMetadata extends UserError {
  constructor(
    readonly disk: string,
    readonly resource: string,
  ) {
    super(`disk ${disk} of resource ${resource} has no duet metadata: run duet resource create-md ${resource}`, 1);
  }
}

export interface CreateMetadataOptions {
  resource: string;
  node: string;
  /** Overwrite metadata that is already there (this disk then counts as new). */
  force?: boolean;
  log?: Logger;
  /** Where the bitmap's write-back reads the time between slices (the resource's Clock; the process's monotonic clock by default). */
  clock?: SliceClock;
}

/**
 * Write fresh metadata on `backing`. Refuses (UserError, exit 1) a disk
 * that already holds metadata unless `force`. The data area is not touched.
 *
 * A crash at any point leaves the old state or the new one. On a disk
 * without metadata the record goes last, after a flush: until it is on disk
 * there is still no metadata (run create-md again). Over old metadata the
 * fresh record goes first: from that write on the disk counts as new (no
 * generation: it takes a full sync, whatever its bitmap and log still say),
 * and before it the old record still has its own bitmap and log.
 */
export async function createMetadata(backing: BlockDevice, options: CreateMetadataOptions): Promise<{ layout: MetaLayout; previous: MetaRecord | undefined }> {
  const layout = layoutFor(backing.size);
  const previous = await readRecord(backing, layout);
  if (previous && !options.force) {
    throw new UserError(
      `disk ${backing.name} of resource ${options.resource} already holds duet metadata (resource ${previous.resource}, disk ${previous.disk}, generation ${previous.gi.current}): ` +
        `use --force to write fresh metadata (this copy then counts as new and takes a full sync from the peer)`,
      1,
    );
  }
  const fresh = initialRecord(options.resource, options.node, layout);
  // Continuing the old sequence: the fresh record wins over both old slots.
  if (previous) await writeRecord(backing, layout, { ...fresh, seq: previous.seq });
  await ActivityLog.format(backing, layout.alOffset, layout.alBytes);
  await new Bitmap(layout.dataBytes).writeBack(backing, layout.bitmapOffset, true, options.clock);
  await backing.flush();
  if (!previous) await writeRecord(backing, layout, { ...fresh, seq: -1 });
  options.log?.info(
    { event: 'metadata-created', resource: options.resource, disk: backing.name, dataBytes: layout.dataBytes, replaced: previous ? { disk: previous.disk, generation: previous.gi.current } : null },
    `disk ${backing.name}: fresh replication metadata for resource ${options.resource}`,
  );
  return { layout, previous };
}
