"""How a node folds admitted updates into its model: pluggable rules behind one interface.

The plain rule is push-sum's weighted mean. Robust rules (trimmed mean,
median, clipping) wrap the same state and are added as small classes here,
chosen by name (:func:`aggregator_by_name`), never as branches inside the
push-sum code. Their arithmetic lives in :mod:`gossip.robust`, shared with
the batched simulator.

A robust rule trades push-sum's exact mass conservation for robustness: the
estimate becomes a robust statistic of the set {own estimate} ∪ {received
estimates}, each counted once whatever weight it claims (a weight is only a
sender's claim), so the network no longer converges to the exact
sample-weighted mean but to some point inside the honest values' range.
The weight still adds up, ``w <- w + sum w_j``, so that weights stay
comparable with those of ``mean`` nodes and shares keep their meaning.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from gossip import robust
from gossip.pushsum import PushSum, Share

# A weight is a finite float on the wire; sums of large claimed weights must
# not overflow to inf, which would make every later message of this node
# unsendable (receivers reject a non-finite weight).
MAX_WEIGHT = sys.float_info.max / 4


class Aggregator(Protocol):
    name: str

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        """Update ``state`` in place with the admitted ``received`` shares."""


class PushSumMean:
    """Exact push-sum: the weighted mean, conserving mass. The default."""

    name = "mean"

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        state.absorb_all(received)


def _stack(state: PushSum, received: Sequence[Share]) -> np.ndarray:
    """Own estimate first, then each received one: the [m, P] set a robust rule reads."""
    rows = [state.estimate, *(share.estimate for share in received)]
    return np.stack([np.asarray(row, dtype=state.estimate.dtype) for row in rows])


def _add_weights(state: PushSum, received: Sequence[Share]) -> None:
    # Plain float sums: they overflow to inf, not to an exception as fsum does.
    total = state.weight + sum(share.weight for share in received)
    state.weight = min(total, MAX_WEIGHT)


class TrimmedMean:
    """Coordinate-wise trimmed mean of {own} ∪ received (:func:`gossip.robust.trimmed_mean`).

    ``beta`` is the fraction trimmed from each end, at least one value once
    the set has 3 members. It must exceed the fraction of Byzantine senders
    among a node's neighbours. Exact mass conservation is traded for
    robustness: the estimate is the robust statistic, the weight still adds up.
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = robust.DEFAULT_TRIM_FRACTION) -> None:
        robust.trim_count(3, beta)  # validates beta with a one-line error
        self.beta = float(beta)

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        if not received:
            return
        state.estimate[...] = robust.trimmed_mean(_stack(state, received), self.beta)
        _add_weights(state, received)


class CoordinateMedian:
    """Coordinate-wise median of {own} ∪ received (:func:`gossip.robust.median`).

    Robust while Byzantine senders are fewer than half of the set. Exact mass
    conservation is traded for robustness: the estimate is the median, the
    weight still adds up.

    Median gossip can stop short of consensus on sparse graphs, even with no
    attacker: once every node's value is the median of its neighbourhood
    (two groups each holding their own majority, say), nothing moves. In the
    tests it agrees on complete graphs but stalls on random 4- to 6-regular
    ones of 12 nodes, where ``trimmed-mean`` and ``clipped`` reach
    agreement. Prefer those for gossip; use this one on dense neighbourhoods.
    """

    name = "median"

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        if not received:
            return
        state.estimate[...] = robust.median(_stack(state, received))
        _add_weights(state, received)


class ClippedGossip:
    """Self-centred clipping: ``z <- z + (1/m) sum_j clip(z_j - z, tau)`` over the set.

    He, Karimireddy and Jaggi, "Byzantine-Robust Decentralized Learning via
    ClippedGossip" (arXiv:2202.01545); see :func:`gossip.robust.clipped_step`.
    ``tau`` fixed when given, else adaptive per merge
    (:func:`gossip.robust.adaptive_tau`): the radius that clips the
    ``max(1, floor(beta * k))`` farthest of the ``k`` received estimates.
    Exact mass conservation is traded for robustness: the estimate moves by
    the clipped step, the weight still adds up.
    """

    name = "clipped"

    def __init__(
        self, tau: float | None = None, beta: float = robust.DEFAULT_TRIM_FRACTION
    ) -> None:
        if tau is not None and not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"the clipping radius tau must be a finite number >= 0, got {tau}")
        robust.trim_count(3, beta)
        self.tau = None if tau is None else float(tau)
        self.beta = float(beta)

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        if not received:
            return
        others = _stack(state, received)[1:]
        tau = self.tau
        if tau is None:
            tau = robust.adaptive_tau(state.estimate, others, self.beta)
        state.estimate[...] = robust.clipped_step(state.estimate, others, tau)
        _add_weights(state, received)


AGGREGATORS: dict[str, type] = {
    rule.name: rule for rule in (PushSumMean, TrimmedMean, CoordinateMedian, ClippedGossip)
}


def aggregator_by_name(name: str, **params: float | None) -> Aggregator:
    """The rule called ``name`` (mean, trimmed-mean, median, clipped) with its ``params``."""
    rule = AGGREGATORS.get(name)
    if rule is None:
        raise ValueError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    accepted = list(inspect.signature(rule).parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes none"
        raise ValueError(f"aggregator {name!r} has no parameter {unknown[0]!r}; {takes}")
    return rule(**params)
