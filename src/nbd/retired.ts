/**
 * What a connection serves once its export is gone because the Primary role
 * moved away (a handover): a FLUSH answers whether everything written
 * before is durable (the pool closed cleanly: it flushed), every other
 * request fails. A client reopening its disk onto the new Primary flushes
 * the old connection first (QEMU's blockdev-reopen does, measured): that
 * flush must succeed for the guest to move without an error, and it is
 * true once the close has flushed.
 */
import { BlockDeviceError, type BlockDevice, type BlockSizeLimits, type Capabilities, type Extent } from '../blockdev/types.js';

export class RetiredDevice implements BlockDevice {
  constructor(
    private readonly was: { name: string; size: number; blockSize: BlockSizeLimits; capabilities: Capabilities },
    /** Resolves when what was written is durable (the pool closed); rejects when the close failed. */
    private readonly closed: Promise<void>,
  ) {}

  get name(): string {
    return this.was.name;
  }
  get size(): number {
    return this.was.size;
  }
  get blockSize(): BlockSizeLimits {
    return this.was.blockSize;
  }
  get capabilities(): Capabilities {
    return this.was.capabilities;
  }

  private gone(): never {
    throw new BlockDeviceError('EIO', `${this.was.name}: no longer served here (its Primary role moved): reconnect to the new Primary`);
  }

  read(): void {
    this.gone();
  }
  write(): void {
    this.gone();
  }
  trim(): void {
    this.gone();
  }
  writeZeroes(): void {
    this.gone();
  }
  cache(): void {
    this.gone();
  }
  blockStatus(): Extent[] {
    this.gone();
  }
  async flush(): Promise<void> {
    try {
      await this.closed;
    } catch (err) {
      throw new BlockDeviceError('EIO', `${this.was.name}: its last writes may not be durable: ${(err as Error).message}`);
    }
  }
  close(): void {}
}
