"""One gossip participant: push-sum state, signing, admission and the vote table, with no I/O.

The runtime (the libp2p daemon, or a test) feeds it bytes and the time and
carries out what it returns: after a local round, :meth:`GossipNode.prepare`
splits the weight for ``fanout`` neighbours, and :meth:`GossipNode.addressed`
gives the signed message for each of them (the same one, except for top-k,
whose differences are per link); each incoming
message goes through :meth:`GossipNode.receive` into the vote table
(:mod:`gossip.votes`); :meth:`GossipNode.merge` folds it into the model by the
configured rule. :meth:`GossipNode.set_peers` says who may push at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gossip import codec, robust
from gossip.admission import (
    Accepted,
    Admission,
    AdmissionPolicy,
    Rejected,
    Verdict,
    all_finite,
    check_declared_layout,
    check_layout,
)
from gossip.aggregation import Aggregator, PushSumMean, add_weight
from gossip.delivery import READY, Receipt
from gossip.encoders import Encoder, codec_error, encoder_for, own_tensors
from gossip.errors import InvalidUpdate, Reason
from gossip.keys import NodeKey
from gossip.layout import ModelLayout
from gossip.public_copy import RESYNC_CODEC, LinkCopies, PublicCopies, is_difference_codec
from gossip.pushsum import MAX_WEIGHT, PushSum, Share
from gossip.update import Update
from gossip.votes import DEFAULT_MAX_AGE_ROUNDS, VoteTable, distances_from

# With no neighbour set (tests, the simulator), at most this many senders are
# kept; a new one beyond it folds the table in first, which bounds memory.
DEFAULT_INBOX_LIMIT = 64
# Distinct merged senders remembered (merged_from): far above any real membership.
MAX_MERGED_FROM = 65_536
# Distinct fresh senders a robust merge needs (the and the literature's
# floor: with fewer, one attacker can be the whole majority of what is trimmed).
DEFAULT_QUORUM = 3
# The highest sequence a saved state may hold: far above any real count, far
# enough below the wire's 2**63 - 1 that no restored node is stuck at the top.
MAX_RESTORED_SEQ = 2**62
# Coordinates per block of the joining median (adopt): 1M values, 8 MB per model.
ADOPT_BLOCK_VALUES = 1 << 20


@dataclass(frozen=True)
class Outgoing:
    """A signed message and what it carries, kept to refund it if delivery fails."""

    message: bytearray
    seq: int
    # What a refund folds back: the message's model; for top-k, the estimate at prepare
    # (receivers fold in their link's copy, which lags it; refunding that copy instead
    # would pull the sender back towards it round after round).
    tensors: dict[str, np.ndarray]
    weight: float
    # Top-k before :meth:`GossipNode.addressed`: no message yet.
    per_link: bool = False
    # Top-k: this message carries the link's whole copy afresh (the peer was not in step).
    resync: bool = False
    # A weight-0 probe of a silent peer (:meth:`GossipNode.probe`): no link copy moves.
    probe: bool = False


@dataclass(frozen=True)
class GossipState:
    """What a node must keep across restarts: :meth:`GossipNode.state` and ``restore``."""

    seq: int
    weight: float
    estimate: np.ndarray
    last_seq: dict[bytes, int]


@dataclass
class GossipNode:
    key: NodeKey
    layout: ModelLayout
    pushsum: PushSum
    samples: int
    admission: Admission
    aggregator: Aggregator = field(default_factory=PushSumMean)
    codec_id: str = "raw"
    seq: int = 0
    inbox_limit: int = DEFAULT_INBOX_LIMIT
    # One vote per sender (gossip/votes.py): a member that pushes many updates
    # between merges still gets one vote. Its shares combine exactly (push-sum).
    votes: VoteTable = field(default_factory=lambda: VoteTable(DEFAULT_MAX_AGE_ROUNDS))
    quorum: int = DEFAULT_QUORUM
    # Local rounds so far (one per prepare): the clock votes' freshness is counted in.
    round: int = 0
    # How far our own last local step moved us: below a quorum, no neighbour may
    # pull us further than that (see merge).
    last_step_norm: float = 0.0
    merges: dict[str, int] = field(default_factory=lambda: {"quorum": 0, "bounded": 0})
    # Per in-neighbour, the distance from our estimate to its latest vote a merge saw,
    # relative to our estimate's norm: how far we are from each. Measured only while
    # ``measure_distance`` (a node that finished training asks: p2pfl/rounds.py).
    vote_distances: dict[bytes, float] = field(default_factory=dict)
    measure_distance: bool = False
    # Distinct senders whose votes a merge has folded in: an exported model's card says
    # how many members it was trained with. Bounded like the replay table.
    merged_from: set[bytes] = field(default_factory=set)
    # What each message carries, per whole-model codec (gossip/encoders.py).
    encoder: Encoder | None = None
    # Top-k: one public copy per neighbour, kept in step by receipts (gossip/public_copy.py).
    links: LinkCopies | None = None
    # Receivers' copies of top-k senders' public models.
    public_copies: PublicCopies = field(default_factory=PublicCopies)
    # Top-k: the last per-link message signed, for the links in step that share it.
    _signed: tuple[object, bytearray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ValueError(f"the quorum must be at least 1 sender, got {self.quorum}")
        self.quorum = max(self.quorum, self.aggregator.min_senders)
        if is_difference_codec(self.codec_id):
            self.links = LinkCopies(self.codec_id, self.layout)
            self.public_copies.keep_all = True
        elif self.encoder is None:
            self.encoder = encoder_for(self.codec_id)
        self.public_copies.layout = self.layout

    @classmethod
    def create(
        cls,
        key: NodeKey,
        initial: dict[str, np.ndarray],
        samples: int,
        policy: AdmissionPolicy | None = None,
        task_spec_hash: bytes = b"",
        **options: object,
    ) -> GossipNode:
        """A node starting from model ``initial``, weighted by its ``samples``.

        ``task_spec_hash``: the shared task spec's SHA-256, which joins the model
        fingerprint (see :func:`gossip.layout.model_fingerprint`).
        """
        layout = ModelLayout.of(initial, task_spec_hash)
        policy = policy or AdmissionPolicy(
            fingerprint=layout.fingerprint, task_spec_hash=task_spec_hash
        )
        if policy.fingerprint != layout.fingerprint or policy.task_spec_hash != task_spec_hash:
            raise ValueError("the admission policy's fingerprint is not this model's")
        state = PushSum(layout.flatten(initial, dtype=np.float64), weight=max(samples, 1))
        return cls(key, layout, state, samples, Admission(policy), **options)  # type: ignore[arg-type]

    @property
    def estimate(self) -> np.ndarray:
        return self.pushsum.estimate

    def model(self) -> dict[str, np.ndarray]:
        """The current estimate as named tensors in their own dtypes."""
        return self.layout.unflatten(self.pushsum.estimate)

    def set_model(self, tensors: dict[str, np.ndarray]) -> None:
        self.pushsum.replace_estimate(self.layout.flatten(tensors, dtype=np.float64))

    def state(self) -> GossipState:
        """A copy of what :meth:`restore` needs to resume this node."""
        pushsum = self.pushsum
        return GossipState(
            self.seq, pushsum.weight, pushsum.estimate.copy(), dict(self.admission.last_seq)
        )

    def restore(self, state: GossipState) -> None:
        """Resume from ``state``; ValueError (one line) if it cannot be this node's.

        A checkpoint can be copied from anywhere, so nothing is taken on trust:
        a NaN weight, an estimate of another size, or a sequence at the top of
        the range (which would make every later update of ours, or of a peer,
        unsendable or refused for good) is refused before anything changes.
        """
        estimate = np.asarray(state.estimate)
        if estimate.shape != self.pushsum.estimate.shape:
            raise ValueError(
                f"the saved estimate has shape {estimate.shape}, "
                f"the model {self.pushsum.estimate.shape}"
            )
        if not np.isfinite(estimate).all():
            raise ValueError("the saved estimate holds NaN or inf")
        if not (math.isfinite(state.weight) and 0 < state.weight <= MAX_WEIGHT):
            raise ValueError(f"the saved weight {state.weight!r} is not a finite number > 0")
        if not 0 <= state.seq < MAX_RESTORED_SEQ:
            raise ValueError(f"the saved sequence {state.seq} is out of range")
        for sender, seq in state.last_seq.items():
            if len(sender) != 32 or not 0 <= seq < MAX_RESTORED_SEQ:
                raise ValueError(f"a saved peer sequence ({seq}) is out of range")
        self.seq = state.seq
        self.pushsum.weight = float(state.weight)
        self.pushsum.replace_estimate(estimate)
        self.admission.last_seq.clear()
        self.admission.last_seq.update(state.last_seq)

    def counters(self) -> dict[str, object]:
        """What operators read: admissions, rejections by reason, votes and merges."""
        return {
            "accepted": self.admission.accepted,
            "rejected": {reason.value: n for reason, n in self.admission.rejected.items()},
            "coalesced": self.votes.coalesced,
            "votes": len(self.votes.fresh(self.round)),
            "merges": dict(self.merges),
        }

    def apply_local_step(self, before: np.ndarray, after: np.ndarray) -> None:
        """Add what local training changed (``after - before``) to the estimate.

        Applying the change rather than replacing the estimate keeps whatever
        was merged while training ran.
        """
        step = after - before
        self.last_step_norm = float(np.linalg.norm(step))
        self.pushsum.estimate += step

    def snapshot(self, now: float) -> bytearray:
        """The current model, signed, with weight 0: for a joining peer to adopt, not merge."""
        # Raw: a joining node adopts it whole, never lossy.
        return self._sign(self.seq, 0.0, "raw", self.layout.unflatten(self.pushsum.estimate), now)

    def read_snapshot(
        self, data: bytes | bytearray | memoryview, expected_sender: bytes
    ) -> np.ndarray:
        """A member's signed snapshot as a flat vector; InvalidUpdate if it is not one.

        The safe path for joining: the whole snapshot is size-capped, it must be
        signed by ``expected_sender``, use the ``raw`` codec (a joining node
        takes it whole, never lossy) and declare exactly our layout, all checked
        before any tensor is decoded, so a hostile header cannot make us
        allocate. Our own state is never touched here.
        """
        signed = codec.parse(data, self.admission.policy.max_message_bytes)
        if signed.sender != expected_sender:
            raise InvalidUpdate(Reason.SENDER_MISMATCH, "the snapshot is not the peer's own")
        if signed.header["codec"] != "raw":
            raise InvalidUpdate(Reason.MALFORMED, "a snapshot must use the raw codec")
        if signed.header["fingerprint"] != self.layout.fingerprint:
            raise InvalidUpdate(
                Reason.WRONG_MODEL, "the snapshot is of another model or task spec file"
            )
        check_declared_layout(signed, self.layout.fingerprint, self.layout.task_spec_hash)
        codec.check_signature(signed)
        update = codec.decode_tensors(signed)
        check_layout(update, self.layout.fingerprint, self.layout.task_spec_hash)
        if not all_finite(update.tensors.values()):
            raise InvalidUpdate(Reason.NON_FINITE, "the snapshot holds NaN or inf")
        return self.layout.flatten(update.tensors, dtype=np.float64)

    def adopt(self, models: Sequence[np.ndarray]) -> None:
        """Start from the coordinate-wise median of several members' models (ours weight stays).

        Never one peer's word: with three or more models, a minority of
        hostile ones cannot move any coordinate outside the honest values.
        """
        if not models:
            raise ValueError("adopt needs at least one model")
        # Column block by column block: the median of each coordinate needs only its
        # column, and stacking and sorting whole 11M-parameter models took ~1 GB at once.
        estimate = self.pushsum.estimate
        if any(np.shape(model) != estimate.shape for model in models):
            raise ValueError(f"adopt needs models of shape {estimate.shape}")
        for start in range(0, len(estimate), ADOPT_BLOCK_VALUES):
            block = np.stack([model[start : start + ADOPT_BLOCK_VALUES] for model in models])
            estimate[start : start + ADOPT_BLOCK_VALUES] = robust.median(block)
        self._reset_encoding()

    def _reset_encoding(self) -> None:
        """Forget what belonged to the model we dropped: feedback memory, link copies."""
        if self.links is not None:
            self.links.reset()
        if self.encoder is not None:
            self.encoder.reset()

    def prepare(self, fanout: int, now: float) -> Outgoing:
        """Split the weight for ``fanout`` neighbours and number this round's message.

        A whole-model codec signs the one message they all get. Top-k signs
        nothing yet: :meth:`addressed` makes each neighbour's difference when it
        is pushed, from the estimate as it is now.
        """
        weight = self.pushsum.split_weight(fanout)
        self.seq += 1
        self.round += 1
        if self.links is not None:
            estimate = own_tensors(self.pushsum.estimate, self.layout)
            return Outgoing(bytearray(), self.seq, estimate, weight, per_link=True)
        assert self.encoder is not None
        codec_id, tensors, folded = self.encoder.encode(self.pushsum.estimate, self.layout)
        message = self._sign(self.seq, weight, codec_id, tensors, now)
        return Outgoing(message, self.seq, folded, weight)

    def probe(self, now: float) -> Outgoing:
        """The current model with weight 0 and a new ``seq``: what a silent peer gets
        instead of a share (p2pfl/silence.py), so its silence costs nothing more. In
        the node's codec, or a top-k resync's (int8) for a difference codec, encoded
        afresh: no encoder memory or top-k link copy is spent on it."""
        self.seq += 1
        tensors = self.layout.unflatten(self.pushsum.estimate)
        message = self._sign(self.seq, 0.0, self.whole_model_codec, tensors, now)
        return Outgoing(message, self.seq, tensors, 0.0, probe=True)

    def addressed(self, outgoing: Outgoing, peer: bytes, now: float) -> Outgoing:
        """``outgoing`` as pushed to ``peer`` (its ed25519 key): for top-k the difference
        to that link's copy, or the copy afresh; any other codec's message as it is.

        The caller reports the push's receipt to :meth:`settled`.
        """
        if not outgoing.per_link:
            return outgoing
        assert self.links is not None
        link = self.links.message_for(peer, outgoing.tensors, outgoing.seq)
        if self._signed is None or self._signed[0] is not link:  # links in step share one
            message = self._sign(outgoing.seq, outgoing.weight, link.codec_id, link.tensors, now)
            self._signed = (link, message)
        message = self._signed[1]
        return Outgoing(
            message, outgoing.seq, outgoing.tensors, outgoing.weight, resync=link.resync
        )

    def keep_links(self, peers: Iterable[bytes]) -> None:
        """Top-k: drop the public copies of links to anyone but ``peers`` (the current
        neighbours), so that copies are bounded by the degree, not by churn."""
        if self.links is not None:
            self.links.keep_only(frozenset(peers))

    def settled(self, peer: bytes, outgoing: Outgoing, receipt: Receipt | None) -> None:
        """The push of ``outgoing`` to ``peer`` went out whole and was answered by
        ``receipt`` (None: it was not): top-k learns which copy that neighbour holds."""
        if self.links is not None and not outgoing.probe:
            self.links.settled(peer, outgoing.seq, receipt)

    def not_sent(self, peer: bytes, outgoing: Outgoing) -> None:
        """The push of ``outgoing`` to ``peer`` failed before its frame was wholly
        written: that neighbour's top-k copy did not change."""
        if self.links is not None and not outgoing.probe:
            self.links.not_sent(peer, outgoing.seq)

    def _sign(
        self, seq: int, weight: float, codec_id: str, tensors: dict[str, np.ndarray], now: float
    ) -> bytearray:
        update = Update(
            sender=self.key.public_key,
            seq=seq,
            samples=self.samples,
            weight=weight,
            fingerprint=self.layout.fingerprint,
            created_at=now,
            tensors=tensors,
            codec=codec_id,
        )
        return codec.encode(update, self.key)

    def refund(self, outgoing: Outgoing) -> None:
        """A delivery failed for sure: take its share back so that no mass is lost."""
        if outgoing.weight <= 0:
            return
        self.pushsum.absorb(self.layout.flatten(outgoing.tensors), outgoing.weight)

    def set_peers(self, senders: frozenset[bytes] | None) -> None:
        """Admit updates for merging only from ``senders`` (None: from anyone admitted).

        The runtime passes the peers that choose this node as a neighbour (its
        in-neighbours, at most the degree). Anyone else's
        update is refused as ``not-neighbour``. A sender that leaves the set
        loses its vote; the weight it already delivered is kept.
        """
        self.admission.neighbours = senders
        if senders is not None:
            for vote in self.votes.keep_only(senders):
                self._fold_weight_of(vote.share())
            for sender in [s for s in self.vote_distances if s not in senders]:
                del self.vote_distances[sender]

    def receive(
        self, data: bytes | bytearray | memoryview, now: float, remote_key: bytes | None = None
    ) -> Verdict:
        """Admit one message; an accepted one becomes its sender's vote until :meth:`merge`."""
        verdict = self.admission.admit(data, now, remote_key)
        if isinstance(verdict, Accepted):
            try:
                self._record(verdict.update)
            except InvalidUpdate as error:
                # A top-k difference with nothing usable to fold in. Refused, so that
                # the sender takes its share back and resyncs the link's copy next.
                return self.admission.withdraw(verdict, error)
        return verdict

    def screen(
        self, offer: bytes | bytearray | memoryview, now: float, remote_key: bytes
    ) -> tuple[Receipt, int]:
        """Judge a pushed message by its offer (prefix and header) before its payloads
        come: the receipt (``ready``, or the refusal the sender may refund), and how many
        payload bytes to read next (0 when refused). See :meth:`Admission.screen`."""
        last_seq = self.admission.last_seq.get(remote_key)
        verdict = self.admission.screen(offer, now, remote_key)
        if isinstance(verdict, Rejected):
            return Receipt(verdict.reason.value, last_seq or 0), 0
        try:
            self.public_copies.check_in_step(verdict.sender, verdict.header["codec"])
        except InvalidUpdate as error:
            self.admission.rejected[error.reason] += 1
            return Receipt(error.reason.value, last_seq or 0), 0
        return Receipt(READY, last_seq or 0), verdict.payload_bytes

    def deliver(
        self, data: bytes | bytearray | memoryview, now: float, remote_key: bytes
    ) -> tuple[Verdict, Receipt]:
        """:meth:`receive`, and the receipt for the peer ``remote_key`` that pushed it
        (see :mod:`gossip.delivery`)."""
        last_seq = self.admission.last_seq.get(remote_key)
        verdict = self.receive(data, now, remote_key)
        return verdict, Receipt.of(verdict, last_seq)

    def _record(self, update: Update) -> None:
        """Make ``update`` its sender's vote; InvalidUpdate if it has nothing to fold in."""
        values = self.layout.flatten(update.tensors, dtype=np.float64)
        estimate = self.public_copies.model_of(update.sender, update.codec, values)
        if update.sender not in self.votes and len(self.votes) >= self.inbox_limit:
            self.merge()  # keeps memory bounded however many peers push
            self.votes.forget_merged()
        self.votes.record(update.sender, estimate, update.weight, self.round)

    def _fold_weight_of(self, share: Share) -> None:
        if self.aggregator.robust:
            add_weight(self.pushsum, share.weight)
        else:
            self.pushsum.absorb(share.estimate, share.weight)

    def _note_merged(self, senders: Iterable[bytes]) -> None:
        for sender in senders:
            if len(self.merged_from) >= MAX_MERGED_FROM:
                return
            self.merged_from.add(sender)

    @property
    def whole_model_codec(self) -> str:
        """The codec of a whole model from us: ours, or top-k's resync codec (int8)."""
        return RESYNC_CODEC if self.links is not None else self.codec_id

    def codec_error(self) -> float:
        """How far a receiver's copy of our estimate is from it, from the codec alone
        (gossip/encoders.py): no vote can be closer, however settled the network is."""
        return codec_error(self.whole_model_codec, self.layout, self.pushsum.estimate)

    def close_to_neighbours(self, threshold: float, ignoring: frozenset[bytes] = frozenset()
                            ) -> bool:
        """Is every in-neighbour heard from (but those ``ignoring``: they left), at its
        latest vote, within ``threshold``? Not while nobody was heard from."""
        distances = [d for s, d in self.vote_distances.items() if s not in ignoring]
        return bool(self.vote_distances) and (not distances or max(distances) <= threshold)

    def merge(self) -> int:
        """Fold the vote table into the model; returns how many senders' votes counted.

        ``mean``: exact push-sum over the shares received since the last merge.
        A robust rule: with a quorum of distinct fresh senders, the rule over
        {own estimate} and one latest estimate per fresh sender. Below the
        quorum, a bounded step: each neighbour's pull is clipped to the length
        of our own last local step (ClippedGossip's step with that radius), so
        an attacker alone with us moves us no faster than our own training
        does, and honest neighbours still mix. Either way the shares' weight
        is added once, so weight is conserved.
        """
        if self.measure_distance:
            self.vote_distances.update(distances_from(self.pushsum.estimate,
                                                      self.votes.fresh(self.round)))
        if not self.aggregator.robust:
            shares = self.votes.pending_shares()
            self._note_merged(self.votes.senders())
            self.pushsum.absorb_all(shares)
            self.votes.clear()
            return len(shares)
        fresh = self.votes.fresh(self.round)
        if fresh:
            # A list, not a stack: the clipped rule reads one vote at a time, and a
            # stack would copy every vote (268 MB for three ResNet-18 votes).
            others = [vote.estimate for vote in fresh.values()]
            own = self.pushsum.estimate
            if len(fresh) >= self.quorum:
                own[...] = self.aggregator.aggregate(own, others)
                self.merges["quorum"] += 1
                self._note_merged(fresh)
            elif self.last_step_norm > 0:
                own[...] = robust.clipped_step(own, others, self.last_step_norm)
                self.merges["bounded"] += 1
                self._note_merged(fresh)
        add_weight(self.pushsum, self.votes.take_pending_weight())
        self.votes.forget_stale(self.round)
        return len(fresh)
