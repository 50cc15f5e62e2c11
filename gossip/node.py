"""One gossip participant: push-sum state, signing, admission and the inbox, with no I/O.

The runtime (the libp2p daemon, or a test) feeds it bytes and the time and
carries out what it returns: after a local round, :meth:`GossipNode.prepare`
gives the one signed message to push to ``fanout`` neighbours; each incoming
message goes through :meth:`GossipNode.receive`; :meth:`GossipNode.merge`
folds the admitted ones into the model by the configured rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gossip import codec
from gossip.admission import (
    Accepted,
    Admission,
    AdmissionPolicy,
    Verdict,
    all_finite,
    check_layout,
)
from gossip.aggregation import Aggregator, PushSumMean
from gossip.compression import ErrorFeedback, codec_by_id
from gossip.errors import InvalidUpdate, Reason
from gossip.keys import NodeKey
from gossip.layout import ModelLayout
from gossip.public_copy import (
    DEFAULT_SYNC_EVERY,
    PublicCopies,
    PublicCopySender,
    is_difference_codec,
)
from gossip.pushsum import PushSum, Share
from gossip.update import Update

DEFAULT_INBOX_LIMIT = 64


@dataclass(frozen=True)
class Outgoing:
    """A signed message and what it carries, kept to refund it if delivery fails."""

    message: bytearray
    seq: int
    tensors: dict[str, np.ndarray]  # what receivers fold in (for top-k: the public copy)
    weight: float


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
    # Per tensor, what a lossy codec has not delivered yet (see compression/feedback.py).
    feedback: dict[str, ErrorFeedback] = field(default_factory=dict)
    # One entry per sender: a member that pushes many updates between merges
    # still gets one vote in a robust rule. Its shares combine exactly (push-sum).
    inbox: dict[bytes, Share] = field(default_factory=dict)
    # Top-k sends differences to a public copy (see gossip/public_copy.py).
    sync_every: int = DEFAULT_SYNC_EVERY
    sender_copy: PublicCopySender | None = None
    public_copies: PublicCopies = field(default_factory=PublicCopies)

    def __post_init__(self) -> None:
        if self.sender_copy is None and is_difference_codec(self.codec_id):
            self.sender_copy = PublicCopySender(self.codec_id, self.sync_every)
            self.public_copies.keep_all = True

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

    def apply_local_step(self, before: np.ndarray, after: np.ndarray) -> None:
        """Add what local training changed (``after - before``) to the estimate.

        Applying the change rather than replacing the estimate keeps whatever
        was merged while training ran.
        """
        self.pushsum.estimate += after - before

    def snapshot(self, now: float) -> bytearray:
        """The current model, signed, with weight 0: for a joining peer to adopt, not merge."""
        update = Update(
            sender=self.key.public_key,
            seq=self.seq,
            samples=self.samples,
            weight=0.0,
            fingerprint=self.layout.fingerprint,
            created_at=now,
            tensors=self.layout.unflatten(self.pushsum.estimate),
            codec="raw",  # a joining node adopts it whole: never lossy
        )
        return codec.encode(update, self.key)

    def adopt(self, data: bytes | bytearray | memoryview, expected_sender: bytes) -> None:
        """Take a neighbour's signed snapshot as our model (our weight stays ours).

        Raises InvalidUpdate when it is not a valid snapshot of this model by
        ``expected_sender``; the model is untouched then.
        """
        update = codec.decode(data, self.admission.policy.max_message_bytes)
        if update.sender != expected_sender:
            raise InvalidUpdate(Reason.SENDER_MISMATCH, "the snapshot is not the peer's own")
        if update.fingerprint != self.layout.fingerprint:
            raise InvalidUpdate(
                Reason.WRONG_MODEL, "the snapshot is of another model or task spec file"
            )
        check_layout(update, self.layout.fingerprint, self.layout.task_spec_hash)
        if not all_finite(update.tensors.values()):
            raise InvalidUpdate(Reason.NON_FINITE, "the snapshot holds NaN or inf")
        self.pushsum.replace_estimate(self.layout.flatten(update.tensors, dtype=np.float64))
        for feedback in self.feedback.values():
            feedback.reset()  # the residual belonged to the model we just dropped
        if self.sender_copy is not None:
            self.sender_copy.reset()

    def prepare(self, fanout: int, now: float) -> Outgoing:
        """Split the weight for ``fanout`` neighbours and sign the one message they all get."""
        weight = self.pushsum.split_weight(fanout)
        self.seq += 1
        # One cast of the estimate into the model's dtypes, then one copy into the
        # message: with multi-megabyte models every pass over the bytes shows.
        estimate = self.pushsum.estimate
        tensors = {
            name: array.copy() if np.shares_memory(array, estimate) else array
            for name, array in self.layout.unflatten(estimate).items()
        }
        codec_id, folded = self.codec_id, tensors
        if self.sender_copy is not None:
            codec_id, tensors, copy = self.sender_copy.next_message(estimate, self.layout)
            folded = self.layout.unflatten(copy)
        elif self.codec_id != "raw":
            tensors = folded = self._compress(tensors)
        update = Update(
            sender=self.key.public_key,
            seq=self.seq,
            samples=self.samples,
            weight=weight,
            fingerprint=self.layout.fingerprint,
            created_at=now,
            tensors=tensors,
            codec=codec_id,
        )
        return Outgoing(codec.encode(update, self.key), self.seq, folded, weight)

    def _compress(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What a lossy codec will deliver, with error feedback so its error is not lost."""
        tensor_codec = codec_by_id(self.codec_id)
        if tensor_codec is None:
            raise ValueError(f"unknown codec {self.codec_id!r}")
        for name in tensors:
            if name not in self.feedback:
                self.feedback[name] = ErrorFeedback(tensor_codec)
        return {name: self.feedback[name].compress(array) for name, array in tensors.items()}

    def refund(self, outgoing: Outgoing) -> None:
        """A delivery failed for sure: take its share back so that no mass is lost."""
        self.pushsum.absorb(self.layout.flatten(outgoing.tensors), outgoing.weight)

    def receive(
        self, data: bytes | bytearray | memoryview, now: float, remote_key: bytes | None = None
    ) -> Verdict:
        """Admit one message; an accepted one waits in the inbox until :meth:`merge`."""
        verdict = self.admission.admit(data, now, remote_key)
        if isinstance(verdict, Accepted):
            self._enqueue(verdict.update)
        return verdict

    def _enqueue(self, update: Update) -> None:
        values = self.layout.flatten(update.tensors, dtype=np.float64)
        estimate = self.public_copies.model_of(update.sender, update.seq, update.codec, values)
        if estimate is None:
            return  # a top-k difference to a copy we do not have: like a lost message
        earlier = self.inbox.get(update.sender)
        if earlier is not None and earlier.weight + update.weight > 0:
            total = earlier.weight + update.weight
            estimate = earlier.estimate + (update.weight / total) * (estimate - earlier.estimate)
            self.inbox[update.sender] = Share(estimate, total)
        else:
            self.inbox[update.sender] = Share(estimate, update.weight)
        if len(self.inbox) >= self.inbox_limit:
            self.merge()  # keeps memory bounded however many peers push

    def merge(self) -> int:
        """Fold every admitted update into the model; returns how many were merged."""
        received, self.inbox = list(self.inbox.values()), {}
        if received:
            self.aggregator.combine(self.pushsum, received)
        return len(received)
