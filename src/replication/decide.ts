/**
 * Who has the good data: the decision two nodes make when they connect,
 * from their generation-identifier tuples alone (the DRBD user's guide,
 * "Generation Identifiers": the cases below are its cases, in its order).
 */
import { GenerationIds, NO_GI } from './meta.js';

export type Decision =
  /** Same generation: nothing to sync. */
  | { kind: 'in-sync' }
  /** Both brand new: the admin picks a side (the first promotion with --force does). */
  | { kind: 'both-new' }
  /** Resync in the background; `full` = every block, else the bitmap's blocks. */
  | { kind: 'sync'; direction: 'source' | 'target'; full: boolean; why: string }
  /** Both sides changed since a common generation: nothing may be merged silently. */
  | { kind: 'split-brain'; common: string }
  /** No common history at all: another data set, refuse. */
  | { kind: 'unrelated' };

/** Decide from `self`'s point of view (the peer decides the mirror image). */
export function decide(self: GenerationIds, peer: GenerationIds): Decision {
  const selfNew = self.current === NO_GI;
  const peerNew = peer.current === NO_GI;
  if (selfNew && peerNew) return { kind: 'both-new' };
  if (peerNew) return { kind: 'sync', direction: 'source', full: true, why: 'the peer has a new disk' };
  if (selfNew) return { kind: 'sync', direction: 'target', full: true, why: 'this node has a new disk' };
  if (self.current === peer.current) return { kind: 'in-sync' };
  // One side went on (its bitmap started at the other's current generation), the other did not.
  if (self.bitmap === peer.current && peer.bitmap === NO_GI) {
    return { kind: 'sync', direction: 'source', full: false, why: 'this node changed data while the peer was away' };
  }
  if (peer.bitmap === self.current && self.bitmap === NO_GI) {
    return { kind: 'sync', direction: 'target', full: false, why: 'the peer changed data while this node was away' };
  }
  // Both went on from the same generation: split brain (its bitmaps say what each changed).
  if (self.bitmap !== NO_GI && self.bitmap === peer.bitmap) return { kind: 'split-brain', common: self.bitmap };
  // A common ancestor further back: the side whose history holds the other's current is newer,
  // but the bitmaps do not reach back that far, so every block goes.
  const peerAhead = peer.history.includes(self.current);
  const selfAhead = self.history.includes(peer.current);
  // Each ahead of the other cannot happen in one history: treat it as the divergence it is.
  if (peerAhead && selfAhead) return { kind: 'split-brain', common: self.current < peer.current ? self.current : peer.current };
  if (peerAhead) return { kind: 'sync', direction: 'target', full: true, why: 'the peer is generations ahead' };
  if (selfAhead) return { kind: 'sync', direction: 'source', full: true, why: 'this node is generations ahead' };
  const selfAll = [self.bitmap, ...self.history].filter((g) => g !== NO_GI);
  const peerAll = [peer.bitmap, ...peer.history].filter((g) => g !== NO_GI);
  const common = selfAll.find((g) => peerAll.includes(g));
  if (common !== undefined) return { kind: 'split-brain', common };
  return { kind: 'unrelated' };
}

/** The peer's view of the same connection, to check both sides agree. */
export function mirror(d: Decision): Decision {
  if (d.kind !== 'sync') return d;
  return { ...d, direction: d.direction === 'source' ? 'target' : 'source' };
}
