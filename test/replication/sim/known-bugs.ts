/**
 * Bugs the simulator found that are not fixed yet: a seed whose first
 * violation matches one is reported as that bug (TODO), not as a new
 * failure. Each lists the seeds that found it (on the code of its day:
 * the same seed on later code may run differently). Remove an entry when
 * its bug is fixed; its seeds then run as ordinary ones.
 */
import type { SeedResult } from './run.js';

export interface KnownBug {
  id: string;
  title: string;
  diagnosis: string;
  /** Matches the first violation of a seed that hits it. */
  match: RegExp;
  seeds: number[];
}

export const KNOWN_BUGS: KnownBug[] = [
  {
    id: 'split-brain-save-eio',
    title: 'a read error while the sync target saves the blocks a split-brain resolution overwrites crashes the node (unhandled rejection)',
    diagnosis:
      'Resource.beginSync awaits saveBlocks (split-brain.ts), which reads the blocks to save from the local disk; an I/O error (or a failure to write the file) rejects beginSync. ' +
      'PeerSession.startSync keeps that promise as targetReady with no handler (and the resync frames that arrive wait on it inside `void this.applying.run(...)`), so the rejection is unhandled: ' +
      'Node 20 ends the daemon. It should detach the disk on a read error (and refuse the resolution if the blocks cannot be kept), and the session should close the link when beginSync fails.',
    match: /unhandled rejection: [\s\S]*saveBlocks/,
    seeds: [7, 10, 114, 206, 494, 828, 855, 1027],
  },
  {
    id: 'failed-disk-unrelated',
    title: 'a disk recorded Failed is refused as "unrelated data" once its peer has moved two generations on, instead of the full sync its record asks for',
    diagnosis:
      'A detached disk is recorded Failed and attached again as Inconsistent with fullSyncNeeded ("Inconsistent until a full sync from the peer"), but keeps its old generation ids. ' +
      'Its peer meanwhile started new generations (peerLostDisk, a promotion without the peer, the sync generation of a resync) and keeps only two in its history, ' +
      'so decideConnect finds no common generation (rule 1000) and refuses for good before looking at the disk states. ' +
      'A side with fullSyncNeeded and an Inconsistent disk facing an UpToDate one should get a full sync whatever the generations say (as rules 20/30 do for a new disk). ' +
      'Workaround for an admin: resource create-md --force on the failed node.',
    match: /refuse to connect: .*holds unrelated data/,
    seeds: [151, 292, 302, 372, 504, 509, 512, 541, 601, 656, 660, 717, 837, 854, 859, 863, 866, 871, 977, 984, 1041, 1053],
  },
  {
    id: 'interrupted-same-generation-resync',
    title: 'an interrupted resync between two nodes of the same generation (a crashed Primary\'s hot extents, marked blocks) is seen as contradictory histories (rule 110): a full resync, or a split brain when the source\'s disk failed too',
    diagnosis:
      'The sync generation of a resync from A to A (both at A) is G = syncGeneration(A, A): the source records bitmap G, the target current G with A in its history. ' +
      'Reconnecting, the source finds its current A in the target\'s history and takes rule 60 ("the peer is generations ahead", hg -2) before rule 70 (its bitmap G is the peer\'s current, +1); ' +
      'the target finds rule 50 (-1). The verdicts disagree: rule 110. With an UpToDate source the disk-state override then makes it a full resync (instead of resuming the bitmap); ' +
      'with both disks Inconsistent (the source detached meanwhile) it is a split brain for an admin, where "nobody has good data" (inconsistent-source) is the truth. ' +
      'Checked directly: decideConnect(S {A, bitmap G}, T {G, history [A]}) = sync full rule 110/disk-states. Rule 70 (or 53/73) should be tried before 60 when the peer\'s current is this side\'s bitmap generation.',
    match: /split brain although a witness .*\(rule 110/,
    seeds: [252, 622, 752, 1042, 1154],
  },
  {
    id: 'refused-promotion-leaves-generation',
    title: 'a promotion that waited for its fence and was refused at the end (the peer came back as Primary) leaves a new generation behind, and a mark at the witness: a split brain without any write',
    diagnosis:
      'promote() awaits newGeneration (fence at the witness, save a new generation) before it takes the role. If the link to the peer comes up meanwhile and the peer is Primary ' +
      '(or the resync begins), the promotion is refused at the end (see the re-checks in promote), but the new generation is recorded and the witness holds the peer Outdated ' +
      'until a generation it will never hold. On the next connect after a gap the two have diverged generations: a split brain (rule 90) although only one of them wrote. ' +
      'newGeneration for a promotion should be dropped when the peer is back and replicating before it saves (as the fence\'s "peer-back" outcome does for writes).',
    match: /a refused promotion left a new generation/,
    seeds: [123],
  },
  {
    id: 'marks-resync-direction-by-name',
    title: 'with a witness, a Primary whose fence failed keeps its unflushed-extent marks at the same generation; on reconnect "same generation, blocks marked" resyncs from the node whose name sorts first, overwriting the writes only the marked node has',
    diagnosis:
      'When the link drops, the Primary marks what the peer may not have (unacknowledged writes, extents not flushed there) and starts a new generation after fencing. ' +
      'With no quorum the fence never succeeds: the held writes fail (or it steps down with --force) and no generation is recorded, so both nodes keep the same generation. ' +
      'If the Secondary lost its cache (power cut), it lacks acknowledged writes the marks cover. decideConnect then takes rule 40/marks and, both being Secondary, ' +
      'picks the source by name: when that is the Secondary, the resync copies its older blocks over the marked ones. Marks on one side only should make that side the source ' +
      '(or the failed fence should still leave a record that this side diverged).',
    match: /not promised \(last resync rule 40\/marks\)/,
    // Seed 83 found it on the code before main's fencing fixes; it runs differently now (no seed of 1-1200 hits it today).
    seeds: [83],
  },
  {
    id: 'diskless-primary-writes-to-inconsistent',
    title: 'writes of a Diskless Primary are marked nowhere on the peer that takes them: if the peer was not UpToDate when the disk failed (a resync under way), the failed disk comes back behind without anyone knowing; and with the peer Inconsistent they are acknowledged although no copy is good',
    diagnosis:
      'When the sync source (Primary) detaches mid-resync, finishWrite sends every write to the peer, an Inconsistent SyncTarget, and acknowledges it; reads fail (no UpToDate copy). ' +
      'DRBD refuses writes then (may_do_writes: neither disk UpToDate). The receiver does not mark writes from a diskless peer either (DRBD does, drbd_set_out_of_sync in receive_Data ' +
      'when pdsk < D_INCONSISTENT; peerLostDisk only records peerDiskFailed when the receiver is UpToDate), so after both come back and an admin forces one, a bitmap resync leaves ' +
      'the blocks those writes changed different on the two disks. Seed 671: the source\'s disk fails as a resync ends (its Failed record cannot be written either); the target, ' +
      'Inconsistent at that moment, records neither peerDiskFailed nor a new generation, then takes the Diskless Primary\'s writes as UpToDate; the failed disk comes back with the same ' +
      'generation and record UpToDate, and a later bitmap resync leaves those writes out of it.',
    match: /acknowledged .* while neither its disk .* nor its peer's .* is UpToDate|after a Diskless Primary wrote to a peer that neither was UpToDate nor had recorded its disk failure/,
    seeds: [671, 1115],
  },
];

export function knownBug(r: SeedResult): KnownBug | undefined {
  const first = r.violations[0] ?? '';
  return KNOWN_BUGS.find((b) => b.match.test(first));
}
