"""Differential privacy in the simulator: gossip's Gaussian mechanism, batched over nodes.

The semantics are :class:`gossip.privacy.GaussianMechanism`'s: each honest
node that trained in a round clips that round's update delta (its model after
local training minus before) to L2 norm ``C``, adds ``N(0, (sigma C)^2)`` per
coordinate, and applies the noisy delta instead of the real one. Clipping is
:func:`gossip.privacy.clip_rows` itself, the rule the daemon clips with; the
noise is drawn from a seeded torch generator, which a simulation needs for
reproducibility and a real node must never do (gossip draws from OS entropy).

The privacy cost is gossip's own accounting: a :class:`gossip.privacy.RdpAccountant`
at the mechanism's effective multiplier (``sigma / 2``, since the whole
round's delta is clipped, sensitivity ``2 C``), one step per round the node
trained. The run reports the worst node's ``epsilon`` at ``delta``.
"""

from __future__ import annotations

import numpy as np
import torch

from gossip.privacy import GaussianMechanism, RdpAccountant, clip_rows

DELTA = 1e-5


class BatchedGaussianMechanism:
    """Clip and noise the round deltas of the selected rows of a stacked [n, P] tensor."""

    def __init__(self, clip_norm: float, noise_multiplier: float, nodes: int, seed: int) -> None:
        # Validates C and sigma with gossip's one-line errors, and fixes the accounting.
        self.mechanism = GaussianMechanism(clip_norm, noise_multiplier, np.random.default_rng(0))
        self.steps = np.zeros(nodes, dtype=np.int64)
        self._generator = torch.Generator().manual_seed(seed + 0x4450)

    @property
    def clip_norm(self) -> float:
        return self.mechanism.clip_norm

    @property
    def noise_std(self) -> float:
        return self.mechanism.noise_std

    def clip(self, deltas: torch.Tensor) -> torch.Tensor:
        """Each row scaled down to L2 norm at most ``C``: :func:`gossip.privacy.clip_rows`,
        with its guards (ValueError on NaN or inf, no overflow for huge finite rows)."""
        clipped = clip_rows(deltas.detach().cpu().double().numpy(), self.clip_norm)
        return torch.from_numpy(clipped).to(device=deltas.device, dtype=deltas.dtype)

    def privatize(self, before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor) -> None:
        """Replace ``after[rows]`` with ``before + clip(after - before) + noise``, in place."""
        if len(rows) == 0:
            return
        start = before.index_select(0, rows)
        delta = self.clip(after.index_select(0, rows) - start)
        noise = torch.randn(delta.shape, generator=self._generator, dtype=delta.dtype)
        after[rows] = start + delta + self.noise_std * noise
        self.steps[rows.numpy()] += 1

    def epsilon(self, delta: float = DELTA) -> float:
        """The largest epsilon of any node so far, from gossip's accountant."""
        steps = int(self.steps.max()) if len(self.steps) else 0
        accountant = RdpAccountant(self.mechanism.accountant.noise_multiplier, steps=steps)
        return accountant.epsilon(delta)
