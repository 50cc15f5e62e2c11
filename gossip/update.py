"""The update message: what one node tells a neighbour after a local round."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gossip.layout import ModelLayout


@dataclass(frozen=True, eq=False)
class Update:
    """A model update as the gossip rules see it, before encoding or after decoding.

    ``weight`` is the push-sum weight share this message carries (see
    :mod:`gossip.pushsum`); ``samples`` is the sender's local sample count,
    kept for operators and robust rules. ``tensors`` are in layout order; after
    decoding they are read-only views into the received bytes.
    """

    sender: bytes
    seq: int
    samples: int
    weight: float
    fingerprint: bytes
    created_at: float
    tensors: Mapping[str, np.ndarray]
    codec: str = "raw"

    @property
    def layout(self) -> ModelLayout:
        return ModelLayout.of(self.tensors)

    def same_as(self, other: Update) -> bool:
        """Field-by-field equality, comparing tensors by dtype, shape and value."""
        head = (self.sender, self.seq, self.samples, self.weight, self.fingerprint)
        other_head = (other.sender, other.seq, other.samples, other.weight, other.fingerprint)
        if head != other_head or self.codec != other.codec:
            return False
        if not (
            self.created_at == other.created_at
            or (self.created_at != self.created_at and other.created_at != other.created_at)
        ):
            return False
        if list(self.tensors) != list(other.tensors):
            return False
        return all(
            self.tensors[name].dtype == other.tensors[name].dtype
            and self.tensors[name].shape == other.tensors[name].shape
            and np.array_equal(self.tensors[name], other.tensors[name], equal_nan=True)
            for name in self.tensors
        )
