"""Local training: this node's shard, its model, and train or evaluate from an estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fltasks import Task, partition
from fltasks.momentum import QuasiGlobalMomentum
from fltasks.scaling import Statistics, node_view
from fltasks.task import normalises_over_batch
from gossip.feature_stats import FeatureAggregates
from gossip.layout import ModelLayout
from p2pfl.config import NodeConfig
from p2pfl.dp import os_entropy_generator

if TYPE_CHECKING:
    from fltasks.dp_sgd import DpSgdTrainer  # opacus is imported only under --dp sample


def model_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays sharing memory with the tensors."""
    return {name: value.detach().numpy() for name, value in model.state_dict().items()}


def load_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    model.load_state_dict(
        {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    )


class LocalTraining:
    """This node's shard of the task and the model it trains on it.

    ``train`` and ``evaluate`` run in worker threads; they only read the estimate
    they are given, never the gossip core.
    """

    def __init__(self, config: NodeConfig, task: Task) -> None:
        self.config = config
        index, count = config.shard_index
        self._unscaled = task
        self._shards = partition(task.y_train.numpy(), count, config.partition, config.seed)
        # Features scaled from this node's own shard (or public ranges under --dp sample)
        # until the network's statistics are agreed (p2pfl/feature_stats.py: rescale).
        self.task = node_view(task, self._shards, record_private=config.dp_mode == "sample")
        self.shard = torch.as_tensor(self._shards[index], dtype=torch.long)
        self.x, self.y = self.task.x_train[self.shard], self.task.y_train[self.shard]
        # The (mean, std) this node scales with once agreed by gossip; None: its own shard's.
        self.statistics: Statistics | None = None
        self.momentum = (
            QuasiGlobalMomentum(config.momentum)
            if config.momentum > 0 and config.dp_mode != "sample"
            else None
        )
        self.model = self.task.make_model()
        # With DP on, batches must be secret (p2pfl/dp.py); without it, reproducible.
        self.generator = (
            os_entropy_generator()
            if config.dp_enabled
            else torch.Generator().manual_seed(config.seed * 100_003 + index)
        )
        self.initial = model_arrays(self.model)
        # The last round's mean training loss (/status), when the task's train reports one.
        self.last_loss: float | None = None
        # The shared task spec joins the fingerprint: the gossip core's layout is this one.
        self.layout = ModelLayout.of(self.initial, self.task.spec_hash)

    @property
    def samples(self) -> int:
        return len(self.shard)

    def own_aggregates(self) -> FeatureAggregates | None:
        """This shard's per-feature aggregates, when its scaling may come from the network.

        None when there is nothing to agree on: a task its one owner already
        scaled (no raw features), ``--feature-stats local``, or DP on: the
        aggregates would leave the node in the clear, outside the accountant's
        epsilon (``--dp node`` keeps its own statistics, covered by the clipped
        delta; ``--dp sample`` the published ranges; fltasks/scaling.py).
        """
        raw = self._unscaled.raw_features
        if raw is None or self.config.feature_stats == "local" or self.config.dp_enabled:
            return None
        return FeatureAggregates.of(raw.x_train[self.shard.numpy()])

    def rescale(self, statistics: Statistics) -> None:
        """Standardise this node's shard and the test split with agreed (mean, std)."""
        agreed = [statistics] * len(self._shards)
        self.task = node_view(self._unscaled, self._shards, record_private=False, agreed=agreed)
        self.x = self.task.x_train[self.shard]
        self.statistics = statistics

    def restore(self, statistics: Statistics | None, momentum: dict[str, Any]) -> bool:
        """Resume a checkpoint's agreed statistics and momentum; True when rescaled."""
        if self.momentum is not None:
            self.momentum.restore(momentum)
        if statistics is None:
            return False
        self.rescale(statistics)
        return True

    def _direction(self, estimate: np.ndarray) -> dict[str, torch.Tensor] | None:
        """Quasi-global momentum's pull for this round, by parameter name (or None)."""
        if self.momentum is None:
            return None
        steps = self.task.steps_per_round(len(self.x), self.config.local_epochs,
                                          normalises_over_batch(self.model))
        start = torch.from_numpy(np.asarray(estimate, dtype=np.float64))
        pull = self.momentum.begin_round(start, torch.tensor(float(steps)), self.task.lr)
        return {name: torch.from_numpy(array) for name, array in
                self.layout.unflatten(pull.numpy()).items()}

    def train(self, estimate: np.ndarray, dp_sgd: DpSgdTrainer | None = None) -> np.ndarray:
        """Runs in a worker thread: train from ``estimate``, return the trained vector."""
        load_arrays(self.model, self.layout.unflatten(estimate))
        if dp_sgd is not None:
            dp_sgd.train(self.config.local_epochs)
            trained = self.layout.flatten(model_arrays(self.model))
            # Computed from noisy steps only: falling back is post-processing, free.
            return trained if np.isfinite(trained).all() else estimate
        loss = self.task.train(self.model, self.x, self.y, self.config.local_epochs,
                               self.generator, self._direction(estimate))
        self.last_loss = float(loss) if isinstance(loss, int | float) else None
        return self.layout.flatten(model_arrays(self.model))

    def evaluate(self, estimate: np.ndarray) -> float:
        load_arrays(self.model, self.layout.unflatten(estimate))
        return float(self.task.evaluate(self.model))

    def held_out(self, estimate: np.ndarray) -> tuple[float, float]:
        """Accuracy and mean cross-entropy of ``estimate`` on the held-out split."""
        load_arrays(self.model, self.layout.unflatten(estimate))
        self.model.eval()
        with torch.no_grad():
            logits = self.model(self.task.x_test)
            loss = torch.nn.functional.cross_entropy(logits, self.task.y_test).item()
            accuracy = (logits.argmax(dim=1) == self.task.y_test).float().mean().item()
        return float(accuracy), float(loss) if np.isfinite(loss) else float("inf")
