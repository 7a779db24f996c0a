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

export const KNOWN_BUGS: KnownBug[] = [];

/**
 * Bugs the simulator found and that are fixed: their seeds run in npm test
 * (sim.test.ts) so they stay fixed. The seed numbers are those that hit the
 * bug on the code of its day; the unit test named beside each checks the
 * fix directly.
 */
export const FIXED_BUGS: { id: string; fix: string; seeds: number[] }[] = [
  {
    id: 'diskless-through-failed-peer-disk',
    fix: 'a Diskless node that saw its peer\'s disk fail refuses to work through that disk (it lacks writes made since): its own disk must come back, or an admin forces the peer (connect-decision.test.ts)',
    seeds: [7558],
  },
  {
    id: 'stale-keep-after-conflicting-resolve',
    fix: 'two different --keep choices are forgotten on both nodes when the connect refuses them (split-brain-resolve.test.ts)',
    seeds: [4055],
  },
  {
    id: 'split-brain-keeps-failed-disk',
    fix: 'a split brain where one disk failed (its peer recorded it) is resolved by itself: a full sync to the failed disk, its own changes saved first (connect-decision.test.ts; detach.test.ts)',
    seeds: [1493, 2819],
  },
  {
    id: 'split-brain-save-eio',
    fix: 'the blocks are saved before anything changes; a read error detaches the disk, the resolution is refused and the link closed (no unhandled rejection)',
    seeds: [7, 10, 114, 206, 494, 828, 855, 1027],
  },
  {
    id: 'failed-disk-unrelated',
    fix: 'a failed disk (recorded Failed, or seen failing by its peer) facing an UpToDate peer gets a full sync whatever the generations say; both failed: "nobody has good data" (connect-decision.test.ts)',
    seeds: [151, 292, 302, 372, 504, 509, 512, 541, 601, 656, 660, 717, 837, 854, 859, 863, 866, 871, 977, 984, 1041, 1053],
  },
  {
    id: 'interrupted-same-generation-resync',
    fix: 'rule 70 before rule 60 when this side\'s bitmap generation is the peer\'s current (connect-decision.test.ts)',
    seeds: [252, 622, 752, 1042, 1154],
  },
  {
    id: 'refused-promotion-leaves-generation',
    fix: 'no new generation when the link came up in sync while the fence waited; the witness clears a mark its setter is in sync at the generation it did not leave',
    seeds: [63, 123],
  },
  {
    id: 'marks-resync-direction-by-name',
    fix: 'same generation, marks on one side only: that side is the source (connect-decision.test.ts)',
    seeds: [83],
  },
  {
    id: 'diskless-primary-writes-to-inconsistent',
    fix: 'a Diskless Primary writes only to an UpToDate peer; a sync target that ends its resync while the peer is Diskless records peerDiskFailed and a new generation first',
    seeds: [671, 1115],
  },
  {
    id: 'sync-source-takes-target-for-uptodate',
    fix: 'a sync source takes its target\'s disk for Inconsistent until the target says it recorded the end (it said UpToDate or Outdated in the handshake): a source whose disk failed refuses writes and reads instead of acknowledging them from the target; a write whose activity-log page failed is checked again before it goes to the peer (sim.test.ts: a sync source whose disk fails during the resync)',
    seeds: [1339, 1813, 2255],
  },
  {
    id: 'both-inconsistent-in-sync',
    fix: 'two Inconsistent disks of the same generation (both failed) are refused with "nobody has good data ... promote the better copy with --force", not connected "in sync" (connect-decision.test.ts)',
    seeds: [1388],
  },
  {
    id: 'diskless-peer-writes-unmarked',
    fix: 'writes from a peer without a disk are marked out of sync where they land (DRBD\'s receive_Data), so a later bitmap resync to that peer\'s disk covers them',
    seeds: [4349],
  },
  {
    id: 'promotion-races-the-peer',
    fix: 'a connected node is promoted only once its peer agreed (PROMOTE/PROMOTE_REPLY, DRBD\'s cluster-wide state change), or once the link is down (then fenced as without the peer): no write of one Primary reaches another (sim.test.ts: promotions during an unnoticed partition)',
    seeds: [1232, 1594],
  },
  {
    id: 'diskless-sync-source-stuck',
    fix: 'a disk that fails on either side during a resync aborts the resync on both sides and the link stays (DRBD\'s sanitize_state); the target stays Inconsistent with its marks. The healer attaches a disk that failed after its repair by restarting the node (sim.test.ts: a sync source / a sync target whose disk fails during the resync)',
    seeds: [4267, 4553],
  },
  {
    id: 'al-evicts-extent-written-during-write-back',
    fix: 'an extent written (begun and ended) while the bitmap write-back before its eviction ran stays in the activity log: its marks came after the write-back took its pages, and a crash then lost them (activity-log.test.ts: a write that begins and ends on an extent while beforeEvict runs for it)',
    seeds: [4908, 5730, 6033],
  },
  {
    id: 'flush-promises-fenced-off-writes',
    fix: 'a flush on a node fenced off (the other side went on, the witness holds this node Outdated) fails as its writes do: under protocol A a write acknowledged on send before the fence was known, then "made durable" by a flush, was overwritten by the resync from the new Primary (quorum.test.ts: a cut-off Primary learns from the witness that its peer went on)',
    seeds: [6444],
  },
  {
    id: 'promotion-completes-on-changed-disk',
    fix: 'a promotion that waited (for the witness to fence the peer) checks again that the disk is still the one it was asked for: one that became Inconsistent (an aborted resync) or Diskless meanwhile is not made Primary (quorum.test.ts: a promotion waiting for the witness fails if the disk changed meanwhile)',
    seeds: [7524],
  },
  {
    id: 'resync-source-sends-unflushed',
    fix: 'a sync source flushes its disk before the resync reads from it: writes it took as Secondary (in no bitmap of its own) were sent from its cache, cleared on the target, then lost in a power cut of the source (sim.test.ts: a resync source sends only what its own disk keeps)',
    seeds: [7017],
  },
  {
    id: 'split-brain-target-never-began',
    fix: 'the model (not a product bug): the target of a split-brain resolution whose resync never began (the link went down while its blocks were saved, or its process died first, or its source lost its disk meanwhile) goes back to the branch its disk holds as soon as beginSync gives up, not only when a later decision says rule 92 (here neither side recorded the start: rule 90); a resolution decided again on a new link meanwhile goes by its own resync',
    seeds: [5088, 6652, 7527],
  },
  {
    id: 'failed-disk-outdated-in-background',
    fix: 'the node keeping the data records its peer\'s failed disk at once, and outdates it at the witness before it starts its generation and takes the Diskless peer\'s writes (they wait for the witness as a Primary\'s own do, and fail if the link goes first); the Diskless Primary counts them as held, secondary --force ends them; a failed disk back at the generation its peer still holds is overwritten whole (sim.test.ts: a Primary whose disk fails while its peer cannot reach the witness; quorum.test.ts; connect-decision.test.ts). Seed 4942 failed on a first version of this fix (a refused fence left the failed disk the source of its crashed extents)',
    seeds: [4811, 5605, 4942],
  },
  {
    id: 'witness-cancel-dropped-older-mark',
    fix: 'a witness mark replaced by its setter for a newer generation remembers the older one: cancelling the newer (a promotion refused after its fence) falls back to the older mark instead of clearing the peer, which still lacked that older generation (witness.test.ts: a fence for a newer generation that is then cancelled)',
    seeds: [1061],
  },
  {
    id: 'final-flush-fenced-off',
    fix: 'the driver: the admin\'s final flush on a node whose forced promotion is then refused by the witness reports that refusal; healing goes on (not a product bug)',
    seeds: [1949],
  },
];

export function knownBug(r: SeedResult): KnownBug | undefined {
  const first = r.violations[0] ?? '';
  return KNOWN_BUGS.find((b) => b.match.test(first));
}
