/**
 * A BlockDevice that passes every call to an inner MemoryDevice: tests
 * subclass it and override only the calls they watch or hold back.
 */
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { DelegatingDevice } from '../../src/blockdev/delegating.js';

export class PassthroughDevice extends DelegatingDevice<MemoryDevice> {
  constructor(size: number, name: string) {
    super(new MemoryDevice(size, name));
  }
}
