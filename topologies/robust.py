"""Robust aggregation for all nodes at once: gossip's rules, batched over a padded [n, k, P] stack.

Each rule is :mod:`gossip.robust`'s arithmetic, written for torch so that every
node aggregates in one pass: a node's set is its own estimate plus the
estimates it received this round, padded to the largest in-degree ``k`` and
masked. The rules and their parameters come from
:func:`gossip.aggregation.aggregator_by_name` (the gossip core validates them
and :func:`batched_rule` reads them), and the trim counts from
:func:`gossip.robust.trim_count` itself; ``tests/test_sim_attacks.py`` checks
every batched rule against the numpy one on the same inputs.

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

import math
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


def _members(
    own: torch.Tensor, others: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The node's set sorted per coordinate (padding as +inf, last) and its size m."""
    present = torch.cat([torch.ones(len(own), 1, dtype=torch.bool), valid], dim=1)
    members = torch.cat([own.unsqueeze(1), others], dim=1)
    members = members.masked_fill(~present.unsqueeze(2), math.inf)
    return members.sort(dim=1).values, present.sum(dim=1)


def trimmed_mean(
    own: torch.Tensor,
    others: torch.Tensor,
    valid: torch.Tensor,
    beta: float = robust.DEFAULT_TRIM_FRACTION,
) -> torch.Tensor:
    """:func:`gossip.robust.trimmed_mean` of each node's {own} ∪ received."""
    ordered, m = _members(own, others, valid)
    table = torch.tensor([0] + [robust.trim_count(c, beta) for c in range(1, ordered.shape[1] + 1)])
    cut = table[m]
    position = torch.arange(ordered.shape[1])
    keep = (position >= cut.unsqueeze(1)) & (position < (m - cut).unsqueeze(1))
    total = torch.where(keep.unsqueeze(2), ordered, torch.zeros((), dtype=own.dtype)).sum(dim=1)
    return total / (m - 2 * cut).unsqueeze(1).to(own.dtype)


def median(own: torch.Tensor, others: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`gossip.robust.median` of each node's {own} ∪ received."""
    ordered, m = _members(own, others, valid)
    size = own.shape[1]
    middle = m // 2

    def at(index: torch.Tensor) -> torch.Tensor:
        return ordered.gather(1, index.view(-1, 1, 1).expand(-1, 1, size)).squeeze(1)

    high = at(middle)
    low = at((middle - 1).clamp(min=0))
    even = (m % 2 == 0).unsqueeze(1)
    return torch.where(even, low + (high - low) / 2, high)


def clipped_step(
    own: torch.Tensor,
    others: torch.Tensor,
    valid: torch.Tensor,
    tau: float | None = None,
    beta: float = robust.DEFAULT_TRIM_FRACTION,
) -> torch.Tensor:
    """:func:`gossip.robust.clipped_step`, ``tau`` fixed or :func:`gossip.robust.adaptive_tau`."""
    differences = others - own.unsqueeze(1)
    distances = torch.linalg.vector_norm(differences, dim=2)
    received = valid.sum(dim=1)
    if tau is None:
        ordered = distances.masked_fill(~valid, math.inf).sort(dim=1).values
        farthest = torch.tensor(
            [0] + [min(max(1, math.floor(beta * k)), k - 1) for k in range(1, valid.shape[1] + 1)]
        )[received]
        rank = (received - 1 - farthest).clamp(min=0)
        radius = ordered.gather(1, rank.unsqueeze(1))
    else:
        radius = torch.full((len(own), 1), float(tau), dtype=own.dtype)
    scale = torch.where(distances > radius, radius / distances, torch.ones((), dtype=own.dtype))
    scale = scale.masked_fill(~torch.isfinite(distances) | ~valid, 0.0)
    step = (differences * scale.unsqueeze(2)).sum(dim=1)
    return own + step / (received + 1).unsqueeze(1).to(own.dtype)


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
