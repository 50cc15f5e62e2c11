"""What an outgoing update carries, per codec: one small wrapper each, chosen once.

:meth:`gossip.node.GossipNode.prepare` asks its encoder for the tensors to
sign and for what receivers will fold in, and never branches on which
whole-model codec it is (as Flower's mods wrap a client, or hivemind's codecs
sit behind one interface):

* :class:`RawEncoder`: the estimate itself, exactly;
* :class:`FeedbackEncoder`: a lossy codec (fp16, int8) with error feedback,
  so what one message rounds away is sent with the next
  (:mod:`gossip.compression.feedback`).

``topk`` has no encoder here: its message differs per neighbour (a difference
to that link's public copy), so the node builds it per link
(:class:`gossip.public_copy.LinkCopies`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gossip.compression import ErrorFeedback, resolve_codec
from gossip.compression.feedback import round_trip
from gossip.layout import ModelLayout
from gossip.public_copy import is_difference_codec

Tensors = dict[str, np.ndarray]


class Encoder(Protocol):
    codec_id: str

    def encode(self, estimate: np.ndarray, layout: ModelLayout) -> tuple[str, Tensors, Tensors]:
        """``(codec id, tensors to sign, tensors receivers fold in)`` for ``estimate``."""

    def reset(self) -> None:
        """Forget what belonged to a model the node dropped (adopted another)."""


def own_tensors(estimate: np.ndarray, layout: ModelLayout) -> Tensors:
    """``estimate`` as named tensors in the model's dtypes, sharing no memory with it."""
    # One cast of the estimate into the model's dtypes, copied only where the cast
    # was a view: the message must not change when the estimate does.
    return {
        name: array.copy() if np.shares_memory(array, estimate) else array
        for name, array in layout.unflatten(estimate).items()
    }


@dataclass
class RawEncoder:
    codec_id: str = "raw"

    def encode(self, estimate: np.ndarray, layout: ModelLayout) -> tuple[str, Tensors, Tensors]:
        tensors = own_tensors(estimate, layout)
        return self.codec_id, tensors, tensors

    def reset(self) -> None:
        return None


@dataclass
class FeedbackEncoder:
    codec_id: str
    feedback: dict[str, ErrorFeedback] = field(default_factory=dict)

    def encode(self, estimate: np.ndarray, layout: ModelLayout) -> tuple[str, Tensors, Tensors]:
        tensor_codec = resolve_codec(self.codec_id)
        if tensor_codec is None:
            raise ValueError(f"unknown codec {self.codec_id!r}")
        tensors = own_tensors(estimate, layout)
        for name in tensors:
            if name not in self.feedback:
                self.feedback[name] = ErrorFeedback(tensor_codec)
        sent = {name: self.feedback[name].compress(array) for name, array in tensors.items()}
        return self.codec_id, sent, sent

    def reset(self) -> None:
        for feedback in self.feedback.values():
            feedback.reset()  # the residual belonged to the model we dropped


def encoder_for(codec_id: str) -> Encoder:
    """The encoder of a whole-model codec (raw, fp16, int8); ValueError otherwise."""
    if codec_id == "raw":
        return RawEncoder()
    if resolve_codec(codec_id) is None:
        raise ValueError(f"unknown codec {codec_id!r}")
    if is_difference_codec(codec_id):
        raise ValueError(f"{codec_id!r} sends differences per link (gossip.public_copy)")
    return FeedbackEncoder(codec_id)


def codec_error(codec_id: str, layout: ModelLayout, estimate: np.ndarray) -> float:
    """How far what a receiver decodes of ``estimate`` sent whole in ``codec_id`` is from
    it, relative to its norm (0 for raw)."""
    codec = resolve_codec(codec_id)
    if codec is None or codec_id == "raw":
        return 0.0
    tensors = layout.unflatten(estimate)
    sent = {name: round_trip(codec, array) for name, array in tensors.items()}
    error = layout.flatten(sent, dtype=np.float64) - estimate
    return float(np.linalg.norm(error)) / max(float(np.linalg.norm(estimate)), 1e-12)
