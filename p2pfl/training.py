"""Local training: this node's shard, its model, and train or evaluate from an estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fltasks import Task, partition
from fltasks.scaling import node_view
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
        shards = partition(task.y_train.numpy(), count, config.partition, config.seed)
        # Features scaled from this node's own shard (or public ranges under --dp sample).
        self.task = node_view(task, shards, record_private=config.dp_mode == "sample")
        self.shard = torch.as_tensor(shards[index], dtype=torch.long)
        self.x, self.y = self.task.x_train[self.shard], self.task.y_train[self.shard]
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

    def train(self, estimate: np.ndarray, dp_sgd: DpSgdTrainer | None = None) -> np.ndarray:
        """Runs in a worker thread: train from ``estimate``, return the trained vector."""
        load_arrays(self.model, self.layout.unflatten(estimate))
        if dp_sgd is not None:
            dp_sgd.train(self.config.local_epochs)
            trained = self.layout.flatten(model_arrays(self.model))
            # Computed from noisy steps only: falling back is post-processing, free.
            return trained if np.isfinite(trained).all() else estimate
        loss = self.task.train(self.model, self.x, self.y, self.config.local_epochs, self.generator)
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
