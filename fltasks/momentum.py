"""Quasi-global momentum (Lin, Karimireddy, Stich and Jaggi, ICML 2021), one rule for all.

Local heavy-ball momentum under label skew remembers the node's *own*
gradients, which point away from the others'; averaged models then chase
each node's drift. Quasi-global momentum builds the buffer instead from how
the node's model actually moved between rounds, gossip included, which is an
estimate of the network's direction:

* before round t's local training, from the model it starts from ``x_t``:
  ``m <- beta * m + (1 - beta) * (x_{t-1} - x_t) / (lr * tau_{t-1})``,
  where ``x_{t-1}`` is where the previous round's training started and
  ``tau`` the number of SGD steps it ran (displacement per step);
* every SGD step of the round: ``x <- x - lr * (g + beta * m)``.

The paper updates after every step, which here is every round of ``tau``
local steps, hence the division by ``tau``. Nothing here depends on the
shape: the daemon keeps one flat [P] buffer, the simulator an [n, P] stack
with ``tau`` as an [n, 1] column. Its state (buffer, anchor, tau) is what a
checkpoint keeps (p2pfl/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# The default of the simulator and the daemon (README, "Learning under skew"): at
# Dirichlet(0.1) on 32 nodes, 0.5 and 0.6 lift every topology; 0.7 and 0.9 lift the
# ring further but cost the complete graph 0.5 to 1 point.
DEFAULT_BETA = 0.5


@dataclass
class QuasiGlobalMomentum:
    """The buffer ``m``, the last round's start ``anchor`` and its step count ``steps``."""

    beta: float
    buffer: torch.Tensor | None = None
    anchor: torch.Tensor | None = None
    steps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.beta}")

    def begin_round(self, start: torch.Tensor, steps: torch.Tensor, lr: float) -> torch.Tensor:
        """Update the buffer from the move since the last round; return ``beta * m``.

        ``start`` is the model this round trains from (after gossip), ``steps``
        how many SGD steps this round will run (broadcastable against ``start``).
        """
        start = start.detach()
        steps = steps.to(start.dtype).clamp(min=1.0)
        if self.buffer is None or self.anchor is None or self.steps is None:
            self.buffer = torch.zeros_like(start)
        else:
            moved = (self.anchor - start) / (lr * self.steps)
            self.buffer.mul_(self.beta).add_(moved, alpha=1.0 - self.beta)
        self.anchor = start.clone()
        self.steps = steps.clone()
        return self.beta * self.buffer

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: flat float64 buffer and anchor, and steps; {} before use."""
        if self.buffer is None or self.anchor is None or self.steps is None:
            return {}
        return {
            "buffer": self.buffer.double().reshape(-1).numpy().copy(),
            "anchor": self.anchor.double().reshape(-1).numpy().copy(),
            "steps": float(self.steps.reshape(-1)[0]),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state` (a one-node, flat buffer: the daemon's)."""
        if not state:
            return
        self.buffer = torch.from_numpy(np.asarray(state["buffer"], dtype=np.float64).copy())
        self.anchor = torch.from_numpy(np.asarray(state["anchor"], dtype=np.float64).copy())
        self.steps = torch.tensor(float(state["steps"]), dtype=torch.float64)
