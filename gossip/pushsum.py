"""Push-sum averaging: asynchronous, no rounds, converging to the sample-weighted mean.

Why push-sum (Kempe, Dobra and Gehrke, FOCS 2003; with SGD, Assran et al.,
"Stochastic Gradient Push", ICML 2019) and not pairwise exchange or
Metropolis–Hastings weights:

* It needs no agreement between peers. A node splits its mass and pushes
  shares; nobody waits for an answer, so a slow or dead neighbour costs the
  sender a timeout and never a stall. Pairwise exchange needs both sides to
  update atomically, and MH weights need every node to know its neighbours'
  degrees at the same instant.
* It is exact under delay: mass in flight is only late, not lost, so the
  ratio converges to the true weighted mean whatever the order in which
  messages from different senders arrive.
* It weighs by samples for free: a node starts with weight ``w = n_i`` (its
  sample count) and mass ``x = n_i * theta_i``; every rule below conserves the
  total of ``x`` and of ``w``, so ``x / w`` at every node tends to
  ``sum(n_i theta_i) / sum(n_i)`` on any connected graph.

Each node stores its estimate ``z = x / w`` and its weight ``w`` rather than
the raw mass, so that the vector on the wire is a model that robust rules
and compression can act on. Sending to ``k`` neighbours keeps ``w / (k+1)``
and gives each message the same estimate with weight ``w / (k+1)``. A share
that could not be delivered is taken back (:meth:`PushSum.absorb` with the
estimate it carried), so a dead link loses nothing. A lost message does lose
its share of mass: that shifts the weights a little but never breaks
consensus, since every estimate stays a convex combination of models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Share:
    """What one outgoing message carries: the sender's estimate and a weight share."""

    estimate: np.ndarray
    weight: float


# The largest weight a node holds, and the largest share admission takes (one rule, two
# ends). Weights are sample counts split into shares, far below it; claimed weights
# above it are refused, and what a node absorbs is capped at it, so a member claiming
# huge weights cannot push a node's weight out of range, and a node's own share
# (w/(k+1) <= MAX_WEIGHT) is never refused for its weight by an honest neighbour.
MAX_WEIGHT = 1e12


class PushSum:
    """One node's push-sum state: its estimate ``z`` and weight ``w``."""

    def __init__(self, estimate: np.ndarray, weight: float) -> None:
        if not weight > 0:
            raise ValueError("the initial push-sum weight must be positive (use the sample count)")
        self.estimate = np.array(estimate, copy=True)
        self.weight = float(weight)

    @property
    def mass(self) -> np.ndarray:
        return self.estimate * self.weight

    def split_weight(self, fanout: int) -> float:
        """Keep ``1/(fanout+1)`` of the weight; return the weight each message carries."""
        if fanout < 0:
            raise ValueError("fanout must be >= 0")
        share = self.weight / (fanout + 1)
        self.weight = share
        return share

    def split(self, fanout: int) -> Share:
        """:meth:`split_weight`, with a copy of the estimate the messages carry."""
        return Share(self.estimate.copy(), self.split_weight(fanout))

    def absorb(self, estimate: np.ndarray, weight: float) -> None:
        """Add a received (or refunded) share: ``z <- (w z + w_j z_j) / (w + w_j)``."""
        if weight <= 0:
            return
        total = self.weight + weight
        self.estimate += (weight / total) * (
            np.asarray(estimate, dtype=self.estimate.dtype) - self.estimate
        )
        # The estimate mixes by the true ratio; only the weight is capped (mass above
        # MAX_WEIGHT is lost, never honest: see MAX_WEIGHT).
        self.weight = min(total, MAX_WEIGHT)

    def absorb_all(self, shares: Sequence[Share]) -> None:
        for share in shares:
            self.absorb(share.estimate, share.weight)

    def replace_estimate(self, estimate: np.ndarray) -> None:
        """After local training: the node's model moves, its weight does not."""
        self.estimate[...] = estimate
