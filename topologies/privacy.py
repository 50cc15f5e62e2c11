"""Differential privacy in the simulator: gossip's Gaussian mechanism, batched over nodes.

The semantics are :class:`gossip.privacy.GaussianMechanism`'s: each honest
node that trained in a round clips that round's update delta (its model after
local training minus before) to L2 norm ``C``, adds ``N(0, (sigma C)^2)`` per
coordinate, and applies the noisy delta instead of the real one. Clipping is
:func:`gossip.privacy.clip_rows` itself, the rule the daemon clips with; the
noise is drawn from a seeded torch generator, which a simulation needs for
reproducibility and a real node must never do (gossip draws from OS entropy).
Each node has its own stream, seeded by (seed, node, the node's step), so a
node's noise is the same whichever rank holds it (:mod:`topologies.ranks`).

The privacy cost is gossip's own accounting: a :class:`gossip.privacy.RdpAccountant`
at the mechanism's effective multiplier (``sigma / 2``, since the whole
round's delta is clipped, sensitivity ``2 C``), one step per round the node
trained. The run reports the worst node's ``epsilon`` at ``delta``.
"""

from __future__ import annotations

import numpy as np
import torch

from fltasks import Task
from fltasks.dp_defaults import DP_SGD_LR
from gossip.privacy import GaussianMechanism, RdpAccountant, clip_rows
from topologies.batched import ParameterLayout

DELTA = 1e-5


class BatchedGaussianMechanism:
    """Clip and noise the round deltas of the selected rows of a stacked [n, P] tensor."""

    def __init__(self, clip_norm: float, noise_multiplier: float, nodes: int, seed: int) -> None:
        # Validates C and sigma with gossip's one-line errors, and fixes the accounting.
        self.mechanism = GaussianMechanism(clip_norm, noise_multiplier, np.random.default_rng(0))
        self.steps = np.zeros(nodes, dtype=np.int64)
        self.seed = seed

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

    def privatize(
        self, before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor, first: int = 0
    ) -> None:
        """Replace ``after[rows]`` with ``before + clip(after - before) + noise``, in place.

        The tensors hold nodes ``first ..`` (a rank's block, or every node)."""
        if len(rows) == 0:
            return
        start = before.index_select(0, rows)
        delta = self.clip(after.index_select(0, rows) - start)
        nodes = rows.numpy() + first
        noise = torch.empty_like(delta)
        for row, node in enumerate(nodes.tolist()):
            stream = np.random.SeedSequence([self.seed, 0x4450, node, int(self.steps[node])])
            generator = torch.Generator().manual_seed(int(stream.generate_state(1, np.uint64)[0]))
            noise[row] = torch.randn(delta.shape[1], generator=generator, dtype=delta.dtype)
        after[rows] = start + delta + self.noise_std * noise
        self.steps[nodes] += 1

    def epsilon(self, delta: float = DELTA) -> float:
        """The largest epsilon of any node so far, from gossip's accountant."""
        steps = int(self.steps.max()) if len(self.steps) else 0
        accountant = RdpAccountant(self.mechanism.accountant.noise_multiplier, steps=steps)
        return accountant.epsilon(delta)


class DpSgdNodes:
    """``--dp sample`` in the simulator: each honest node runs the daemon's own DP-SGD.

    opacus computes per-sample gradients of one model, not of n stacked ones,
    so the nodes are not batched here: every active honest node loads its row
    into its own copy of the model and runs :class:`fltasks.dp_sgd.DpSgdTrainer`,
    the code the daemon runs, with the same sample rate, clipping, noise and
    accountant. One difference, on purpose: the generators are seeded from
    the simulation's seed, so a run is reproducible (a daemon draws from OS
    entropy). The reported epsilon is the worst node's, from opacus's RDP
    accountant.
    """

    def __init__(
        self,
        task: Task,
        layout: ParameterLayout,
        shards: list[np.ndarray],
        clip_norm: float,
        noise_multiplier: float,
        seed: int,
        lr: float = DP_SGD_LR,
        first: int = 0,
    ) -> None:
        """``shards``: those of nodes ``first ..`` (a rank's block, or every node)."""
        from fltasks.dp_sgd import DpSgdTrainer  # opacus only when asked for

        self.layout = layout
        self.models = [task.make_model() for _ in shards]
        self.trainers = []
        for index, (model, shard) in enumerate(zip(self.models, shards, strict=True)):
            rows = torch.as_tensor(shard, dtype=torch.long)
            generator = torch.Generator().manual_seed(seed * 100_003 + first + index + 0x5347)
            self.trainers.append(
                DpSgdTrainer(
                    model,
                    task.x_train[rows],
                    task.y_train[rows],
                    lr=lr,
                    batch_size=task.batch_size,
                    noise_multiplier=noise_multiplier,
                    clip_norm=clip_norm,
                    generator=generator,
                )
            )

    def train(self, flat: torch.Tensor, rows: torch.Tensor, epochs: int) -> None:
        """Replace each of ``flat[rows]`` by its node's DP-SGD result, in place."""
        for row in rows.tolist():
            model, start = self.models[row], flat[row].clone()
            views = self.layout.views(start.unsqueeze(0))
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    parameter.copy_(views[name][0])
            self.trainers[row].train(epochs)
            trained = self.layout.flatten(model)
            # From noisy steps only: keeping the start instead is post-processing.
            flat[row] = trained if torch.isfinite(trained).all() else start

    def epsilon(self, delta: float = DELTA) -> float:
        """The largest epsilon of any node so far, from opacus's RDP accountant."""
        return max((trainer.epsilon(delta) for trainer in self.trainers), default=0.0)
