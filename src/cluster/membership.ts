/**
 * Membership of a two-node cluster, as seen by one node: is the peer alive,
 * does this node have quorum, must it fence itself, may it take the peer's
 * resources and VMs over. One pure table (`step`); the cluster manager
 * feeds it observations on its own clock (every heartbeat) and carries out
 * the actions it returns.
 *
 * Signs of life come on two kinds of path: direct (the resources' peer
 * links, the UDP heartbeat on each node address) and through the witness.
 * Votes: this node, the peer, the witness; quorum is two of the three. The
 * peer's vote counts only while the peer has heard *this node* lately, not
 * merely while this node hears the peer: each heartbeat echoes the send
 * time (the receiver's own clock) of the last heartbeat its sender got, so a
 * link cut one way cannot leave one side counting a vote the other side
 * no longer gives. The witness's vote counts from the send time of the
 * request it answered, for the same reason.
 *
 * Declaring the peer dead is a request to the witness, decided there at
 * once (witness.declare): granted only when the witness has not heard the
 * peer for deadTime D itself; from then on the witness refuses the peer its
 * vote. Without that, a node could act on a "silent for D" the witness
 * said a moment ago while the peer reached the witness just after.
 *
 * Why takeover cannot overlap the lost node's writes (the timing argument,
 * checked by the simulation in test/cluster/membership.test.ts): both
 * nodes heartbeat each other and the witness every H (heartbeatMs), late
 * by up to H/4. The survivor asks for the declaration only when nothing came
 * directly for D; the witness grants it only when it has not heard the lost
 * node for D. The lost node counts its quorum gone when neither the peer
 * nor the witness has heard a heartbeat it sent in the last Q = D - 3H, and
 * fences itself at its next beat (its VMs killed, its writes refused): by
 * then both have been silent about it for less than D, so it fenced itself
 * before the declaration, and the survivor waits selfFence S more (the time
 * the kill may take) before it takes over.
 *
 * A node that cannot serve: its main link is dead but the peer still hears
 * it on the heartbeat's second path, so it keeps quorum and is never
 * declared dead, while its resources cannot reach the peer's link nor the
 * witness to write alone (their writes are held, its VMs hang), or the
 * peer's VMs on its exports cannot reach them (the peer says so in its
 * heartbeat). It gives its work up: once that has lasted D with the witness silent,
 * and the peer says it has the witness's vote, it fences itself as if it
 * had lost quorum and tells the peer so in its heartbeats (it yields). The
 * peer then asks the witness to declare it dead like a silent node, and the
 * witness grants it only when it has not heard the node for D (it cannot
 * reach it either); from then on the witness refuses the node's writes
 * alone (witness.outdate), so its held writes can never be acknowledged
 * once its peer took over. It yields until its writes are no longer held
 * (its link is back, or it learned the peer went on without it).
 *
 * Two nodes and no witness: neither side can tell its peer's death from a
 * cut link. Nobody fences itself (there is no majority to lose), and a
 * peer silent for D is taken over only through the fence command (the
 * peer is powered off first); without one the takeover waits for an admin
 * (`resource primary --force`). `cluster status` warns about it.
 */

/** What one node knows of the peer at the peer: online (direct path), unreachable (alive by the witness only), suspect, dead, fenced (taken over). */
export type PeerView = 'online' | 'unreachable' | 'suspect' | 'dead' | 'fenced';

export interface MembershipTiming {
  deadTimeMs: number;
  selfFenceMs: number;
  /** Interval of the heartbeats to the peer and the witness. */
  heartbeatMs: number;
}

/** The heartbeat interval for a deadTime: eight beats per deadTime, at most 500 ms. */
export function heartbeatFor(deadTimeMs: number): number {
  return Math.min(500, Math.max(25, Math.floor(deadTimeMs / 8)));
}

/** How long without the peer and the witness before this node has lost quorum: D - 3H. */
export function quorumWindow(t: MembershipTiming): number {
  return t.deadTimeMs - 3 * t.heartbeatMs;
}

export interface Observation {
  nowMs: number;
  /** Last sign of life from the peer on a direct path; undefined: none since this node started. */
  directMs: number | undefined;
  /** Send time (this node's clock) of the latest heartbeat of this node the peer says it got; undefined: none. */
  heardByPeerMs: number | undefined;
  /** Absent: no witness configured. */
  witness?: {
    /** Send time (this node's clock) of the latest request the witness answered; undefined: none. */
    answeredMs: number | undefined;
    /** By that answer: how long the witness had not heard the peer; undefined: it never did (since its start). */
    peerSilentMs: number | undefined;
    /** The witness holds the peer dead, declared by this node. */
    peerDeclared: boolean;
    /** The witness holds this node dead, declared by the peer: no vote from it. */
    selfDeclared: boolean;
    /**
     * Send time of the latest answer from a witness up since before this node fenced itself (the same
     * boot) saying this node is not declared: nobody took it over, its fence may end.
     */
    vouchedMs?: number;
  };
  /** A fence command is configured (the two-node way to take over). */
  fenceCommand: boolean;
  /**
   * How long a Primary here has not been able to serve: its peer's link down, and its writes held (the
   * witness silent too) or the peer's VMs on its exports unable to reach them; absent: it can.
   */
  stuckMs?: number;
  /**
   * The peer's latest heartbeat: it yields (cannot serve, fenced itself), whether it has the witness's
   * vote, and whether its disk is UpToDate for every resource whose writes are held here (it could be
   * promoted for them).
   */
  peerSays?: { yielded: boolean; witnessVote: boolean; canTakeOver: boolean };
}

export interface MembershipState {
  startedMs: number;
  peer: PeerView;
  /** When the peer was declared dead (it stays declared until a sign of life). */
  deadSinceMs?: number;
  quorum: boolean;
  /** This node fenced itself (latched until the peer has heard it again since). */
  selfFenced: boolean;
  selfFencedAtMs?: number;
  /** Fenced because it cannot serve (see above): its peer may take it over while it hears it. */
  yielded?: boolean;
  /** The witness's vote is this node's (it answered within the quorum window and does not hold this node dead). */
  witnessVote?: boolean;
}

export type MembershipAction =
  | { do: 'peer-online' }
  | { do: 'peer-unreachable' }
  /** Ask the witness to declare the peer dead (the answer comes back as witness.peerDeclared). */
  | { do: 'declare'; why: string }
  | { do: 'peer-lost'; why: string }
  | { do: 'take-over'; why: string }
  /** The peer is back: the witness's declaration (if any) goes. */
  | { do: 'peer-back'; was: PeerView }
  | { do: 'quorum-lost'; why: string }
  | { do: 'self-fence'; why: string }
  /** This node cannot serve and has fenced itself: its heartbeats say so, so that its peer takes it over. */
  | { do: 'yield'; why: string }
  | { do: 'quorum-regained' };

export function initialState(startedMs: number): MembershipState {
  // At start the peer is unknown: suspect until it answers or deadTime passes.
  return { startedMs, peer: 'suspect', quorum: true, selfFenced: false };
}

/** The takeover was carried out: the peer counts as fenced until it is back. */
export function tookOver(s: MembershipState): MembershipState {
  return s.peer === 'dead' ? { ...s, peer: 'fenced' } : s;
}

export function step(s: MembershipState, o: Observation, t: MembershipTiming): { state: MembershipState; actions: MembershipAction[] } {
  const D = t.deadTimeMs;
  const Q = quorumWindow(t);
  const directAge = o.nowMs - (o.directMs ?? s.startedMs);
  const heardAge = o.nowMs - (o.heardByPeerMs ?? s.startedMs);
  const w = o.witness;
  const witnessAge = w ? o.nowMs - (w.answeredMs ?? s.startedMs) : Infinity;
  const witnessVotes = w !== undefined && witnessAge < Q && !w.selfDeclared;
  const actions: MembershipAction[] = [];
  const next: MembershipState = { ...s };

  // --- quorum (self) ---
  const quorum = !w || heardAge < Q || witnessVotes;
  const why = (): string => (w?.selfDeclared ? `${quorumWhy(heardAge, witnessAge)}; the witness holds this node dead` : quorumWhy(heardAge, witnessAge));
  if (s.quorum && !quorum) actions.push({ do: 'quorum-lost', why: why() });
  if (!s.quorum && quorum) actions.push({ do: 'quorum-regained' });
  next.quorum = quorum;
  next.witnessVote = witnessVotes;
  if (!quorum && !s.selfFenced) {
    next.selfFenced = true;
    next.selfFencedAtMs = o.nowMs;
    actions.push({ do: 'self-fence', why: why() });
  }

  // Cannot serve: writes held for D, the witness silent too, and a peer that can take over (it has the
  // witness, and good data for the resources held here): fence and yield. (A peer that could not take over
  // would leave both nodes' guests dead: the writes stay held and go on by themselves when the link or the
  // witness comes back.)
  const witnessFresh = w !== undefined && witnessAge < Q;
  const heard = o.directMs !== undefined && directAge < D;
  if (next.yielded && o.stuckMs === undefined) {
    // The peer may be taking this node over on its yield until it hears that it no longer yields: the fence
    // ends as if it began now (the peer hears a beat sent from now on, or the witness vouches after it).
    next.yielded = false;
    next.selfFencedAtMs = o.nowMs;
  }
  if (!next.yielded && w && !witnessFresh && (o.stuckMs ?? 0) >= D && heard && o.peerSays?.witnessVote === true && o.peerSays.canTakeOver && !o.peerSays.yielded) {
    next.yielded = true;
    const why = `cannot serve: writes held for ${o.stuckMs} ms, neither the peer's link nor the witness answers`;
    if (!next.selfFenced) {
      next.selfFenced = true;
      next.selfFencedAtMs = o.nowMs;
      actions.push({ do: 'self-fence', why });
    }
    actions.push({ do: 'yield', why });
  }

  // A witness that has known all along says nobody declared this node: nobody took it over. Its fence ends
  // (its VMs start again) without waiting for a peer that may never come back.
  if (next.selfFenced && !next.yielded && quorum && w?.vouchedMs !== undefined && w.vouchedMs > (next.selfFencedAtMs ?? Infinity) && !w.selfDeclared) {
    next.selfFenced = false;
    next.selfFencedAtMs = undefined;
  }

  // --- the peer ---
  const peerAtWitness = witnessFresh && w.peerSilentMs !== undefined && w.peerSilentMs < D;
  // Heard directly lately (a peer never heard since this node started is not online: suspect until it is);
  // a peer that yields is heard but gives its work up: it is taken over like a silent one.
  const peerYields = heard && o.peerSays?.yielded === true;
  if (!peerYields && (heard || (peerAtWitness && !w!.peerDeclared))) {
    const view: PeerView = heard ? 'online' : 'unreachable';
    if (s.peer === 'dead' || s.peer === 'fenced') actions.push({ do: 'peer-back', was: s.peer });
    if (view !== s.peer) actions.push({ do: view === 'online' ? 'peer-online' : 'peer-unreachable' });
    next.peer = view;
    next.deadSinceMs = undefined;
    // The peer heard this node after it fenced itself: it knows this node lives (it cannot be declaring
    // it dead), and this node's own fence ends. A peer merely heard of lately is not enough.
    if (next.selfFenced && !next.yielded && quorum && o.heardByPeerMs !== undefined && o.heardByPeerMs > (next.selfFencedAtMs ?? Infinity)) {
      next.selfFenced = false;
      next.selfFencedAtMs = undefined;
    }
    return { state: next, actions };
  }
  if (s.peer === 'fenced') return { state: next, actions }; // taken over: stays so until it is back
  // Dead: declared at the witness (with a witness), or silent for D (two nodes: all this node can know).
  // Only a fresh answer says so: an old one may predate the clear this node sent when the peer came back
  // (sim seed 998814685: a node cut off again took a cleared declaration for a new one).
  const declared = w ? w.peerDeclared && witnessFresh : directAge >= D;
  if (!declared) {
    // A declaration gone (cleared, forgotten by a restarted witness): a new one waits selfFence again.
    next.peer = 'suspect';
    next.deadSinceMs = undefined;
    // Silent for D (counted from this node's start when never heard), or yielding: only then is the witness asked.
    if (witnessVotes && !next.selfFenced && (directAge >= D || peerYields)) actions.push({ do: 'declare', why: peerYields ? 'it cannot serve (it fenced itself and yields)' : `no sign of life for ${directAge} ms` });
    return { state: next, actions };
  }
  if (s.peer !== 'dead') {
    next.peer = 'dead';
    next.deadSinceMs = o.nowMs;
    actions.push({ do: 'peer-lost', why: peerYields ? 'it cannot serve: it fenced itself and yields; declared dead at the witness' : w ? `no sign of life for ${directAge} ms, nor at the witness` : `no sign of life for ${directAge} ms (no witness to ask)` });
  }
  const since = next.deadSinceMs ?? o.nowMs;
  // Takeover: the lost node's self-fence time after the declaration; without a witness only through the fence command.
  if (!next.selfFenced && o.nowMs - since >= t.selfFenceMs && (w ? quorum : o.fenceCommand)) {
    actions.push({ do: 'take-over', why: w ? `declared dead ${o.nowMs - since} ms ago, with the witness` : 'silent, to be fenced by the fence command' });
  }
  return { state: next, actions };
}

function quorumWhy(heardAge: number, witnessAge: number): string {
  const w = Number.isFinite(witnessAge) ? `the witness has not answered it for ${witnessAge} ms` : 'no witness';
  return `the peer has not heard this node for ${heardAge} ms and ${w}`;
}
