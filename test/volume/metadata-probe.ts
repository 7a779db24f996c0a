/**
 * A device wrapper that sees the pool's metadata writes (superblocks,
 * journal records, checkpoint pieces, told apart by their magic), logs
 * them in one list shared by every device of a pool, and can hold one of
 * them until the test releases it: the way to stop a commit or a
 * checkpoint at an exact point and start something else meanwhile.
 */
import assert from 'node:assert/strict';
import { DelegatingDevice } from '../../src/blockdev/delegating.js';
import type { BlockDevice, WriteOptions } from '../../src/blockdev/types.js';
import { CKPT_MAGIC, JOURNAL_MAGIC, SB_MAGIC, decodeJournalHeader, decodeSuperblock } from '../../src/volume/format.js';
import { macrotick } from './helpers.js';

export type MetadataKind = 'superblock' | 'journal' | 'checkpoint';

export interface MetadataWrite {
  device: string;
  kind: MetadataKind;
  /** Superblock or journal record sequence number. */
  seq?: number;
  /** Checkpoint generation (journal records and checkpoint pieces carry it; superblocks name it). */
  gen?: number;
  /** Set when the write completed. */
  done: boolean;
}

interface Hold {
  match: (w: MetadataWrite) => boolean;
  reached: (w: MetadataWrite) => void;
  gate: Promise<void>;
}

export interface HeldWrite {
  /** Resolves with the write once one matching it was issued (and stopped). */
  reached: Promise<MetadataWrite>;
  release(): void;
}

/** The metadata writes of one pool, in the order they were issued, and the holds set on them. */
export class MetadataLog {
  readonly writes: MetadataWrite[] = [];
  private holds: Hold[] = [];

  /** Stop the next metadata write that `match` accepts (on any device) until release(). */
  hold(match: (w: MetadataWrite) => boolean): HeldWrite {
    let reached!: (w: MetadataWrite) => void;
    let release!: () => void;
    const seen = new Promise<MetadataWrite>((resolve) => (reached = resolve));
    const gate = new Promise<void>((resolve) => (release = resolve));
    this.holds.push({ match, reached, gate });
    return { reached: seen, release };
  }

  /** Called by a probe for each metadata write it sees: the write waits while a hold keeps it. */
  async issued(w: MetadataWrite): Promise<void> {
    this.writes.push(w);
    const at = this.holds.findIndex((h) => h.match(w));
    if (at < 0) return;
    const [h] = this.holds.splice(at, 1);
    h.reached(w);
    await h.gate;
  }

  /** Superblock sequence numbers written to `device`, in order. */
  superblockSeqs(device: string): number[] {
    return this.writes.filter((w) => w.device === device && w.kind === 'superblock').map((w) => w.seq!);
  }

  /** Every device's superblocks went out with strictly increasing sequence numbers. */
  assertSeqsIncrease(what: string): void {
    const devices = new Set(this.writes.map((w) => w.device));
    for (const d of devices) {
      const seqs = this.superblockSeqs(d);
      for (let i = 1; i < seqs.length; i++) {
        assert.ok(seqs[i] > seqs[i - 1], `${what}: superblock sequence numbers written to ${d}: ${seqs.join(', ')} (one written twice or going back)`);
      }
    }
  }
}

export function classify(data: Buffer): Pick<MetadataWrite, 'kind' | 'seq' | 'gen'> | undefined {
  const magic = data.subarray(0, 8);
  if (magic.equals(SB_MAGIC)) {
    const sb = decodeSuperblock(data);
    return sb.ok ? { kind: 'superblock', seq: sb.value.seq, gen: sb.value.gen } : { kind: 'superblock' };
  }
  if (magic.equals(JOURNAL_MAGIC)) {
    const h = decodeJournalHeader(data);
    return { kind: 'journal', seq: h?.seq, gen: h?.gen };
  }
  if (magic.equals(CKPT_MAGIC)) return { kind: 'checkpoint', gen: Number(data.readBigUInt64LE(8)) };
  return undefined;
}

export class ProbeDevice extends DelegatingDevice {
  constructor(
    inner: BlockDevice,
    readonly log: MetadataLog,
  ) {
    super(inner);
  }

  override async write(offset: number, data: Buffer, options?: WriteOptions): Promise<void> {
    const kind = classify(data);
    if (!kind) return this.inner.write(offset, data, options);
    const w: MetadataWrite = { device: this.name, ...kind, done: false };
    await this.log.issued(w);
    await this.inner.write(offset, data, options);
    w.done = true;
  }
}

/** Let everything that can run without the held write run (bounded). */
export async function settle(turns = 50): Promise<void> {
  for (let i = 0; i < turns; i++) await macrotick();
}
