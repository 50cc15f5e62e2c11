"""Top-k on the wire: differences to a public copy that the sender and its receivers share.

A sparse whole model cannot be averaged (a receiver would fold in a vector
that is 99% zeros), so a node whose codec is ``topk:F`` sends, as in
CHOCO-gossip (Koloskova, Stich and Jaggi, ICML 2019), the largest entries of
``z - x̂``: the difference between its estimate ``z`` and a public copy ``x̂``
that every receiver holds too. Both sides then add what was sent to ``x̂``,
and receivers fold in ``x̂`` with the message's push-sum weight. The residual
``z - x̂`` is the error-feedback memory: nothing is dropped, only sent later.

Receivers must see every difference, in order. Sequence numbers rise by one
per message, so a receiver knows when it missed one; its copy is then
useless until the sender's next ``raw`` message, which carries the whole
estimate and resets the copy on both sides. A sender sends ``raw`` first,
after :meth:`PublicCopySender.reset` (a restart or an adopted model), and
every ``sync_every`` messages, so a receiver that joined late or lost a
message is back in step within that many rounds. A difference that arrives
out of step is not folded in: it is refused as ``out-of-step``.

The daemon needs no periodic resync: receipts (:mod:`gossip.delivery`) tell
the sender which peer did not fold in its last message, and that peer alone
gets the whole copy (:meth:`gossip.node.GossipNode.whole`) instead of the
difference.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from gossip.compression import TensorCodec, codec_by_id
from gossip.compression.feedback import round_trip
from gossip.layout import ModelLayout

DEFAULT_SYNC_EVERY = 20
DEFAULT_MAX_COPIES = 32


def is_difference_codec(codec_id: str) -> bool:
    """Codecs whose payloads are differences to the public copy rather than models."""
    return codec_id.startswith("topk:")


@dataclass
class PublicCopySender:
    """The sender's side: its public copy and when to send it whole."""

    codec_id: str
    sync_every: int | None = DEFAULT_SYNC_EVERY  # None: whole only after a reset
    copy: np.ndarray | None = None
    since_sync: int = 0

    def __post_init__(self) -> None:
        codec = codec_by_id(self.codec_id)
        if codec is None or not is_difference_codec(self.codec_id):
            raise ValueError(f"{self.codec_id!r} is not a difference codec (topk:F)")
        if self.sync_every is not None and self.sync_every < 1:
            raise ValueError("sync_every must be at least 1")
        self.codec: TensorCodec = codec

    def reset(self) -> None:
        """The next message goes whole (after a restart or an adopted model)."""
        self.copy = None

    def next_message(
        self, estimate: np.ndarray, layout: ModelLayout
    ) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
        """(codec id, tensors to send, the copy receivers will fold in) for this round.

        Both sides add the same decoded values to the copy in the same order
        and round the sum to the model's dtypes, so the sender's and every
        in-step receiver's copies are equal bit for bit, and the whole copy
        (:meth:`gossip.node.GossipNode.whole`) is exactly representable.
        """
        due = self.sync_every is not None and self.since_sync + 1 >= self.sync_every
        if self.copy is None or due:
            tensors = {
                name: np.array(a, copy=True) for name, a in layout.unflatten(estimate).items()
            }
            self.copy = layout.flatten(tensors, dtype=np.float64)
            self.since_sync = 0
            return "raw", tensors, self.copy.copy()
        difference = layout.unflatten(estimate - self.copy)
        sent = {name: round_trip(self.codec, array) for name, array in difference.items()}
        self.copy = in_model_dtypes(layout, self.copy + layout.flatten(sent, dtype=np.float64))
        self.since_sync += 1
        return self.codec_id, sent, self.copy.copy()


def in_model_dtypes(layout: ModelLayout, vector: np.ndarray) -> np.ndarray:
    """``vector`` rounded to the model's tensor dtypes (float32, mostly), as float64."""
    return layout.flatten(layout.unflatten(vector), dtype=np.float64)


@dataclass
class _Copy:
    seq: int
    vector: np.ndarray


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
    copies: OrderedDict[bytes, _Copy] = field(default_factory=OrderedDict)
    difference_senders: set[bytes] = field(default_factory=set)
    out_of_step: int = 0

    def model_of(
        self, sender: bytes, seq: int, codec_id: str, values: np.ndarray
    ) -> np.ndarray | None:
        """What to fold in for this message, or None when a difference arrives out of step.

        ``values`` is never modified; copies are replaced, never updated in
        place, so a returned array stays valid while it waits in an inbox.
        """
        if not is_difference_codec(codec_id):
            if self.keep_all or sender in self.difference_senders:
                self._keep(sender, _Copy(seq, values))
            return values
        self.difference_senders.add(sender)
        known = self.copies.get(sender)
        if known is None or known.seq != seq - 1:
            self.copies.pop(sender, None)
            self.out_of_step += 1
            return None
        summed = known.vector + values
        if self.layout is not None:
            summed = in_model_dtypes(self.layout, summed)
        updated = _Copy(seq, summed)
        self._keep(sender, updated)
        return updated.vector

    def _keep(self, sender: bytes, copy: _Copy) -> None:
        self.copies[sender] = copy
        self.copies.move_to_end(sender)
        while len(self.copies) > self.limit:
            self.copies.popitem(last=False)
