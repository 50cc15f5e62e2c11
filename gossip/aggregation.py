"""How a node folds what it received into its model: pluggable rules behind one interface.

The plain rule is push-sum's weighted mean. Robust rules (trimmed mean,
median, clipping) are small classes here, chosen by name
(:func:`aggregator_by_name`), never branches inside the push-sum code. Their
arithmetic lives in :mod:`gossip.robust`, shared with the batched simulator.

What becomes of push-sum's mass under a robust rule (also in
docs/PROTOCOL.md, "Aggregation"): the *weight* is conserved exactly, the
*estimate* is not a mass-weighted mean any more. A robust node computes its
estimate as a robust statistic of {own estimate} and one latest estimate per
neighbour, each counted once whatever weight it claims (a weight is only a
sender's claim), so the network no longer converges to the exact
sample-weighted mean but to a point inside the honest values' range. Every
admitted share's weight is still added, once, to the receiver's weight
(``w <- w + sum w_j``) and split on sending as under ``mean``, so the sum of
all weights (nodes plus messages in flight) stays constant, and weights stay
comparable with those of ``mean`` nodes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from gossip import robust
from gossip.pushsum import MAX_WEIGHT, PushSum, Share


class Aggregator(Protocol):
    name: str
    # False: exact push-sum over the shares themselves. True: a vote over one
    # latest estimate per neighbour (:meth:`aggregate`), with a quorum.
    robust: bool
    # Fewest received estimates with which the rule can discard at least one.
    min_senders: int

    def aggregate(self, own: np.ndarray, others: np.ndarray) -> np.ndarray:
        """The new estimate from ``own`` ([P]) and one row per neighbour (``others``: a
        [k, P] array, or a list of k [P] rows, which spares the clipped rule a stack)."""

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        """One synchronous round: update ``state`` in place with the ``received`` shares."""


class PushSumMean:
    """Exact push-sum: the weighted mean, conserving mass."""

    name = "mean"
    robust = False
    min_senders = 1

    def aggregate(self, own: np.ndarray, others: np.ndarray) -> np.ndarray:
        """The plain mean of the set (push-sum itself folds weighted shares, see combine)."""
        return np.vstack([own[None, :], others]).mean(axis=0)

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        state.absorb_all(received)


class RobustRule:
    """What every robust rule shares: the synchronous form over its :meth:`aggregate`."""

    name = ""
    robust = True
    min_senders = 2

    def aggregate(self, own: np.ndarray, others: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def combine(self, state: PushSum, received: Sequence[Share]) -> None:
        if not received:
            return
        dtype = state.estimate.dtype
        others = np.stack([np.asarray(share.estimate, dtype=dtype) for share in received])
        state.estimate[...] = self.aggregate(state.estimate, others)
        add_weight(state, sum(share.weight for share in received))


def add_weight(state: PushSum, weight: float) -> None:
    """Fold received weight in, capped at MAX_WEIGHT (see gossip.pushsum): a robust node
    conserves weight, not estimates."""
    # Plain float sums: they overflow to inf, not to an exception as fsum does.
    state.weight = min(state.weight + weight, MAX_WEIGHT)


class TrimmedMean(RobustRule):
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

    def aggregate(self, own: np.ndarray, others: np.ndarray) -> np.ndarray:
        return robust.trimmed_mean(np.vstack([own[None, :], others]), self.beta)


class CoordinateMedian(RobustRule):
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

    def aggregate(self, own: np.ndarray, others: np.ndarray) -> np.ndarray:
        return robust.median(np.vstack([own[None, :], others]))


class ClippedGossip(RobustRule):
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
        self, tau: float | None = None, beta: float = robust.DEFAULT_CLIP_FRACTION
    ) -> None:
        if tau is not None and not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"the clipping radius tau must be a finite number >= 0, got {tau}")
        robust.trim_count(3, beta)
        self.tau = None if tau is None else float(tau)
        self.beta = float(beta)

    def aggregate(self, own: np.ndarray, others: np.ndarray) -> np.ndarray:
        # One neighbour at a time (``others`` may be a list of rows): no [k, P]
        # temporaries, which at 11M parameters are hundreds of MB each.
        return robust.clipped_step(own, others, self.tau, self.beta)


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
