/**
 * Reading and switching the superblocks: two slots per device, written
 * alternately (slot = seq % 2), so a crash during a switch leaves the old
 * or the new one readable on every device.
 */
import type { BlockDevice } from '../blockdev/types.js';
import { SUPERBLOCK_BYTES, type Superblock, decodeSuperblock, encodeSuperblock } from './format.js';
import type { PoolDevice } from './chunk-space.js';

/** Read both superblock slots; the valid one with the higher sequence wins. */
export async function readBestSuperblock(dev: BlockDevice): Promise<Superblock | undefined> {
  let best: Superblock | undefined;
  for (let slot = 0; slot < 2; slot++) {
    if (dev.size < (slot + 1) * SUPERBLOCK_BYTES) break;
    const buf = Buffer.alloc(SUPERBLOCK_BYTES);
    try {
      await dev.read(slot * SUPERBLOCK_BYTES, buf);
    } catch {
      continue;
    }
    const sb = decodeSuperblock(buf);
    if (sb.ok && (!best || sb.value.seq > best.seq)) best = sb.value;
  }
  return best;
}

/**
 * Switch every device of `devices` to `sb`. Devices the committed
 * superblock does not list yet (joining by extend) get theirs first, made
 * durable before any other device's: a superblock that names a device must
 * never be on disk while that device has none, or a crash between the two
 * leaves a pool that cannot open.
 */
export async function writeSuperblocks(devices: PoolDevice[], sb: Superblock, committed: Superblock): Promise<void> {
  const listed = new Set(committed.devices.map((e) => e.uuid));
  const joining = devices.filter((d) => !listed.has(d.entry.uuid));
  const rest = devices.filter((d) => listed.has(d.entry.uuid));
  const slot = sb.seq % 2;
  const write = async (group: PoolDevice[]): Promise<void> => {
    await Promise.all(
      group.map((d) => d.device.write(slot * SUPERBLOCK_BYTES, encodeSuperblock({ ...sb, deviceUuid: d.entry.uuid, deviceIndex: devices.indexOf(d) }), { fua: true })),
    );
    await Promise.all(group.map((d) => d.device.flush()));
  };
  // A new pool: no device has a superblock yet, all go at once.
  if (rest.length === 0 || joining.length === 0) return write(devices);
  await write(joining);
  await write(rest);
}
