"""How a node folds admitted updates into its model: pluggable rules behind one interface.

The plain rule is push-sum's weighted mean. Robust rules (trimmed mean,
median, clipping) wrap the same state and are added as small classes here,
chosen by name, never as branches inside the push-sum code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gossip.pushsum import PushSum, Share


class Aggregator(Protocol):
    name: str

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        """Update ``state`` in place with the admitted ``received`` shares."""


class PushSumMean:
    """Exact push-sum: the weighted mean, conserving mass. The default."""

    name = "mean"

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        state.absorb_all(received)
