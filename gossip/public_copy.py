"""Top-k on the wire: differences to a public copy that a sender and one receiver share.

A sparse whole model cannot be averaged (a receiver would fold in a vector
that is 99% zeros), so a node whose codec is ``topk:F`` sends, as in
CHOCO-gossip (Koloskova, Stich and Jaggi, ICML 2019), the largest entries of
``z - x̂``: the difference between its estimate ``z`` and a public copy ``x̂``
that the receiver holds too. Both sides then add what was sent to ``x̂``, and
the receiver folds in ``x̂`` with the message's push-sum weight. The residual
``z - x̂`` is the error-feedback memory: nothing is dropped, only sent later.

One copy per link (CHOCO's per-edge copies, :class:`LinkCopies`), not one
per sender: a neighbour whose link is slow or that missed a message is put
back in step on its own, and the others go on getting differences meanwhile.
With one shared copy every neighbour had to get every difference, so one slow
link held up all of them, and each resync was the whole raw model (4.5 MB at
1.1M parameters; measured in the lab at 1 Mbit/s, top-k lost to int8).

A sender sends a difference to a neighbour only when that neighbour's
receipt (:mod:`gossip.delivery`) confirmed the message the copy was last
advanced by; otherwise it sends the copy afresh, whole, with the
``RESYNC_CODEC`` (int8: a quarter of raw; the copy is whatever the receiver
decodes, so nothing is lost, the residual sends the rounding later). A
receiver applies a difference to its copy from the last message it accepted
from that sender (every accepted message from a top-k sender replaces it),
and refuses it as ``out-of-step`` when it holds none.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from gossip.compression import TensorCodec, resolve_codec
from gossip.compression.feedback import round_trip
from gossip.delivery import Receipt
from gossip.errors import InvalidUpdate, Reason
from gossip.layout import ModelLayout

# A resync carries the whole copy; int8 sends it in a quarter of raw's bytes.
RESYNC_CODEC = "int8"
DEFAULT_MAX_COPIES = 32

Tensors = dict[str, np.ndarray]


def is_difference_codec(codec_id: str) -> bool:
    """Codecs whose payloads are differences to the public copy rather than models."""
    return codec_id.startswith("topk:")


def in_model_dtypes(layout: ModelLayout, vector: np.ndarray) -> np.ndarray:
    """``vector`` rounded to the model's tensor dtypes (float32, mostly), as float64."""
    return layout.flatten(layout.unflatten(vector), dtype=np.float64)


@dataclass(frozen=True)
class LinkMessage:
    """What to sign for one neighbour: the tensors and their codec."""

    codec_id: str
    tensors: Tensors  # encoded with codec_id on the wire
    resync: bool  # the whole copy, sent afresh (the neighbour was not in step)


@dataclass
class _Link:
    confirmed: tuple[int, np.ndarray] | None = None  # (seq, copy) the neighbour holds
    pending: tuple[int, np.ndarray] | None = None  # (seq, copy) if the push in flight lands


@dataclass
class LinkCopies:
    """The sender's side: one public copy per neighbour (:meth:`keep_only` drops the
    links to former ones, so copies are bounded by the degree)."""

    codec_id: str
    layout: ModelLayout
    links: dict[bytes, _Link] = field(default_factory=dict)
    # This round's messages by the copy they start from (None: a resync): links in
    # step share one copy object, so they share one top-k and one signature, and a
    # round costs what one shared copy did, not one selection of 1.1M values per link
    # (8 daemons share the lab's 2 cores).
    _made: dict[int | None, tuple[object, LinkMessage, np.ndarray]] = field(
        default_factory=dict
    )
    _made_for: object = None  # the estimate (one per prepare) the cache is for

    def __post_init__(self) -> None:
        codec = resolve_codec(self.codec_id)
        if codec is None or not is_difference_codec(self.codec_id):
            raise ValueError(f"{self.codec_id!r} is not a difference codec (topk:F)")
        resync = resolve_codec(RESYNC_CODEC)
        assert resync is not None
        self.codec: TensorCodec = codec
        self.resync_codec: TensorCodec = resync

    def message_for(self, peer: bytes, estimate: Tensors, seq: int) -> LinkMessage:
        """The message ``seq`` to ``peer`` for ``estimate``: a difference to the copy the
        peer confirmed, or (if it confirmed none) the whole copy afresh.

        Both sides add the same decoded values to the copy in the same order and
        round the sum to the model's dtypes, so the sender's and the receiver's
        copies are equal bit for bit.
        """
        link = self.links.setdefault(peer, _Link())
        if self._made_for is not estimate:
            self._made, self._made_for = {}, estimate
        base = None if link.confirmed is None else link.confirmed[1]
        key = None if base is None else id(base)
        if key not in self._made:
            # The entry holds ``base`` so that its id is not reused while it is cached.
            self._made[key] = (base, *self._make(estimate, base))
        _, message, updated = self._made[key]
        link.pending = (seq, updated)
        return message

    def _make(self, estimate: Tensors, base: np.ndarray | None) -> tuple[LinkMessage, np.ndarray]:
        """The message from copy ``base`` (None: a resync) and the copy it makes."""
        layout = self.layout
        if base is None:
            sent = {name: round_trip(self.resync_codec, a) for name, a in estimate.items()}
            return LinkMessage(RESYNC_CODEC, estimate, True), layout.flatten(sent, np.float64)
        difference = layout.unflatten(layout.flatten(estimate, dtype=np.float64) - base)
        sent = {name: round_trip(self.codec, a) for name, a in difference.items()}
        updated = in_model_dtypes(layout, base + layout.flatten(sent, dtype=np.float64))
        return LinkMessage(self.codec_id, sent, False), updated

    def settled(self, peer: bytes, seq: int, receipt: Receipt | None) -> None:
        """What became of message ``seq`` to ``peer`` once its frame was written
        (``receipt`` None: no answer came; see :meth:`not_sent` for the rest).

        Accepted: the peer's copy is now the one that message made. Refused for
        another reason than ``out-of-step``, with the last message it had
        accepted from us still the one our confirmed copy came from: its copy did
        not change. Anything else: the next message to it resyncs its copy.
        """
        link = self.links.get(peer)
        if link is None:
            return
        pending, link.pending = link.pending, None
        confirmed, link.confirmed = link.confirmed, None
        if receipt is None or pending is None or pending[0] != seq:
            return
        if receipt.accepted:
            link.confirmed = pending
        elif (
            receipt.verdict != Reason.OUT_OF_STEP.value
            and confirmed is not None
            and receipt.last_seq == confirmed[0]
        ):
            link.confirmed = confirmed

    def not_sent(self, peer: bytes, seq: int) -> None:
        """Message ``seq`` to ``peer`` never wholly left (the dial or the write failed): a
        receiver drops a partial frame, so its copy is still the confirmed one, and
        the link stays in step without a resync (half the lab's failed pushes)."""
        link = self.links.get(peer)
        if link is not None and link.pending is not None and link.pending[0] == seq:
            link.pending = None

    def keep_only(self, peers: frozenset[bytes]) -> None:
        """Forget the links to anyone not in ``peers``; one that comes back is resynced."""
        for peer in [p for p in self.links if p not in peers]:
            del self.links[peer]

    def held(self, peer: bytes) -> np.ndarray | None:
        """The copy ``peer`` is confirmed to hold, or None."""
        link = self.links.get(peer)
        return None if link is None or link.confirmed is None else link.confirmed[1]

    def reset(self) -> None:
        """Every neighbour gets the whole copy next (after a restart or an adopted model)."""
        self.links.clear()
        self._made, self._made_for = {}, None


@dataclass
class PublicCopies:
    """The receiver's side: one public copy per sender, the most recent ``limit`` of them.

    Copies cost a model each, so whole models are kept only from senders that
    have sent differences before, or from everyone when ``keep_all`` (a node
    that sends top-k itself expects its neighbours to do the same).
    """

    keep_all: bool = False
    limit: int = DEFAULT_MAX_COPIES
    # Set by the node: sums are rounded to its model's dtypes, as the sender's are.
    layout: ModelLayout | None = None
    copies: OrderedDict[bytes, np.ndarray] = field(default_factory=OrderedDict)
    difference_senders: set[bytes] = field(default_factory=set)
    out_of_step: int = 0

    def check_in_step(self, sender: bytes, codec_id: str) -> None:
        """Raise InvalidUpdate(out-of-step) if a message of ``codec_id`` from ``sender``
        would be a difference to a copy we do not hold: judged from the offer, before
        the sender sends (and gives) anything."""
        if is_difference_codec(codec_id) and sender not in self.copies:
            self.difference_senders.add(sender)
            self.out_of_step += 1
            raise InvalidUpdate(Reason.OUT_OF_STEP, "a top-k difference to a copy we do not hold")

    def model_of(self, sender: bytes, codec_id: str, values: np.ndarray) -> np.ndarray:
        """What to fold in for this accepted message; InvalidUpdate if there is nothing
        usable: a difference to a copy we do not hold (``out-of-step``), or one whose
        sum overflows the model's dtypes (``non-finite``).

        Every accepted message from a sender whose copy is kept replaces it, so
        a held copy is always the one from the sender's last accepted message:
        the one its receipts confirm. ``values`` is never modified; copies are
        replaced, never updated in place, so a returned array stays valid while
        it waits in an inbox.
        """
        if not is_difference_codec(codec_id):
            if self.keep_all or sender in self.difference_senders:
                self._keep(sender, values)
            return values
        self.difference_senders.add(sender)
        known = self.copies.get(sender)
        if known is None:
            self.out_of_step += 1
            raise InvalidUpdate(Reason.OUT_OF_STEP, "a top-k difference to a copy we do not hold")
        summed = known + values
        if self.layout is not None:
            with np.errstate(over="ignore"):  # an overflow is refused just below
                summed = in_model_dtypes(self.layout, summed)
        if not np.isfinite(summed).all():
            # Finite values can still sum past float32's range; the copy stays as it was.
            raise InvalidUpdate(Reason.NON_FINITE, "the difference overflows the public copy")
        self._keep(sender, summed)
        return summed

    def _keep(self, sender: bytes, copy: np.ndarray) -> None:
        self.copies[sender] = copy
        self.copies.move_to_end(sender)
        while len(self.copies) > self.limit:
            self.copies.popitem(last=False)
