"""Robust aggregation for all nodes at once: gossip's rules, batched over a padded [n, k, P] stack.

Each rule is :mod:`gossip.robust`'s own batched function (``*_sets``), called
on the simulator's rows, so that every node aggregates in one pass with the
daemon's arithmetic: a node's set is its own estimate plus the estimates it
received this round, padded to the largest in-degree ``k`` and masked.
The rules and their parameters come from
:func:`gossip.aggregation.aggregator_by_name` (the gossip core validates them
and :func:`batched_rule` reads them); ``tests/test_sim_attacks.py`` checks
every batched rule against the one-set one on the same inputs.

* ``trimmed-mean``: coordinate-wise, the ``trim_count(m, beta)`` smallest and
  largest of the ``m`` members dropped (Yin et al., ICML 2018).
* ``median``: coordinate-wise; the midpoint ``low + (high - low) / 2`` for an
  even count.
* ``clipped``: ``z + (1/m) sum_j clip(z_j - z, tau)`` (He, Karimireddy and
  Jaggi, arXiv:2202.01545), ``tau`` fixed or the adaptive radius that clips
  the ``max(1, floor(beta k))`` farthest of the ``k`` received estimates.

As in :mod:`gossip.aggregation`, a robust rule replaces the estimate with the
robust statistic and the push-sum weight still adds up (the caller does that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gossip import robust
from gossip.aggregation import ClippedGossip, CoordinateMedian, TrimmedMean, aggregator_by_name
from topologies.network import DELIVERED, NetworkModel, RoundPlan

# (own [n, P], others [n, k, P], valid [n, k]) -> new estimates [n, P]
BatchedRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Received:
    """Who sent each node what this round: sender ids [n, k] (padded with 0) and a mask."""

    senders: torch.Tensor
    valid: torch.Tensor


def received_now(network: NetworkModel, plan: RoundPlan) -> Received:
    """The messages delivered in this round (no delay), grouped by receiver."""
    n = network.n
    arcs = np.flatnonzero((plan.fate == DELIVERED) & (network.delay == 0))
    dst, src = network.dst[arcs], network.src[arcs]
    order = np.argsort(dst, kind="stable")
    dst, src = dst[order], src[order]
    counts = np.bincount(dst, minlength=n)
    width = int(counts.max()) if len(dst) else 0
    position = np.arange(len(dst)) - (np.cumsum(counts) - counts)[dst]
    senders = np.zeros((n, width), dtype=np.int64)
    valid = np.zeros((n, width), dtype=bool)
    senders[dst, position] = src
    valid[dst, position] = True
    return Received(torch.from_numpy(senders), torch.from_numpy(valid))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _own_and_received(
    own: torch.Tensor, others: torch.Tensor, valid: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Each node's set {own} ∪ received as a padded [n, 1 + k, P] stack and its mask."""
    members = torch.cat([own.unsqueeze(1), others], dim=1)
    present = torch.cat([torch.ones(len(own), 1, dtype=torch.bool), valid], dim=1)
    return _numpy(members), _numpy(present)


def trimmed_mean(
    own: torch.Tensor,
    others: torch.Tensor,
    valid: torch.Tensor,
    beta: float = robust.DEFAULT_TRIM_FRACTION,
) -> torch.Tensor:
    """:func:`gossip.robust.trimmed_mean` of each node's {own} ∪ received."""
    return torch.from_numpy(robust.trimmed_mean_sets(*_own_and_received(own, others, valid), beta))


def median(own: torch.Tensor, others: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`gossip.robust.median` of each node's {own} ∪ received."""
    return torch.from_numpy(robust.median_sets(*_own_and_received(own, others, valid)))


def clipped_step(
    own: torch.Tensor,
    others: torch.Tensor,
    valid: torch.Tensor,
    tau: float | None = None,
    beta: float = robust.DEFAULT_CLIP_FRACTION,
) -> torch.Tensor:
    """:func:`gossip.robust.clipped_step` for every node, ``tau`` fixed or adaptive.

    gossip's step walks the neighbour axis first ([k, n, P], mask [k, n]):
    swapping the axes of the simulator's [n, k, P] is a view, not a copy.
    """
    stepped = robust.clipped_step(
        _numpy(own), _numpy(others).swapaxes(0, 1), tau, beta, _numpy(valid).T
    )
    return torch.from_numpy(stepped)


def batched_rule(
    name: str, beta: float | None = None, tau: float | None = None
) -> BatchedRule | None:
    """The batched form of gossip's rule ``name``; None for ``mean`` (exact push-sum).

    The rule object is built by :func:`gossip.aggregation.aggregator_by_name`,
    so names and parameters are validated by the gossip core, with its errors.
    """
    params: dict[str, float] = {}
    if beta is not None and name in ("trimmed-mean", "clipped"):
        params["beta"] = beta
    if tau is not None and name == "clipped":
        params["tau"] = tau
    rule = aggregator_by_name(name, **params)
    if isinstance(rule, TrimmedMean):
        return lambda own, others, valid: trimmed_mean(own, others, valid, rule.beta)
    if isinstance(rule, CoordinateMedian):
        return median
    if isinstance(rule, ClippedGossip):
        return lambda own, others, valid: clipped_step(own, others, valid, rule.tau, rule.beta)
    return None
