/**
 * The journal area of a pool (the same on every device): the commits made
 * since the checkpoint, one record each, read back as the longest valid
 * prefix of records of the checkpoint's generation.
 */
import { JOURNAL_HEADER, JOURNAL_OFFSET, type JournalOp, decodeJournalHeader, decodeOps, journalPayloadValid } from './format.js';
import type { PoolDevice } from './chunk-space.js';

export interface JournalContent {
  /** The operations of each valid record, in order. */
  records: JournalOp[][];
  /** Where the next record goes. */
  bytes: number;
  /** Devices whose journal could not be read, with why. */
  unreadable: { device: string; why: string }[];
  /** The readable devices do not all hold the same number of records. */
  disagree: boolean;
}

/** The longest valid journal of generation `gen` among the devices (every commit went to all of them). */
export async function readJournal(devices: PoolDevice[], journalBytes: number, gen: number): Promise<JournalContent> {
  const content: JournalContent = { records: [], bytes: 0, unreadable: [], disagree: false };
  const lengths = new Set<number>();
  for (const d of devices) {
    const area = Buffer.alloc(journalBytes);
    try {
      await d.device.read(JOURNAL_OFFSET, area);
    } catch (err) {
      content.unreadable.push({ device: d.device.name, why: (err as Error).message });
      lengths.add(-1);
      continue;
    }
    const records: JournalOp[][] = [];
    let at = 0;
    while (at + JOURNAL_HEADER <= area.length) {
      const h = decodeJournalHeader(area.subarray(at));
      if (!h || h.gen !== gen || h.seq !== records.length + 1 || at + h.recordBytes > area.length) break;
      const record = area.subarray(at, at + h.recordBytes);
      if (!journalPayloadValid(record, h)) break;
      records.push(decodeOps(record.subarray(JOURNAL_HEADER, JOURNAL_HEADER + h.payloadLength)));
      at += h.recordBytes;
    }
    lengths.add(records.length);
    if (records.length > content.records.length) Object.assign(content, { records, bytes: at });
  }
  content.disagree = lengths.size > 1;
  return content;
}

/** Put one encoded record at byte `at` of every device's journal (not flushed). */
export async function appendRecord(devices: PoolDevice[], at: number, record: Buffer): Promise<void> {
  await Promise.all(devices.map((d) => d.device.write(JOURNAL_OFFSET + at, record)));
}
